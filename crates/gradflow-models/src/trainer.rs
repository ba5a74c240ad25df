//! [`LocalTrainer`]: training in one process, with no servers.
//!
//! It owns the parameters and applies the optimizers exactly as a parameter server does: dense
//! tensors start from their initializer over the whole tensor, sparse rows are created from
//! `fill_row` on first touch with fresh optimizer state, and every tensor and every row counts
//! its own updates for the optimizer's `t`. Every row the batch pulled is updated, even one
//! whose gradient is zero, because a worker pushes the gradient of every row it pulled. So it is
//! both the reference that synchronous distributed training must match and the single-process
//! baseline of the benchmarks.

use std::collections::HashMap;

use gradflow_core::{Initializer, OptimizerConfig, SparseSpec};
use gradflow_data::Batch;
use rayon::prelude::*;

use crate::util::IdBuildHasher;
use crate::{Grads, Model, ModelConfig, ModelError, Params, SparseRows, build};

/// A single-process trainer; see the module docs.
pub struct LocalTrainer {
    model: Box<dyn Model>,
    /// Dense values live in `params.dense`, so a step needs no copy; `params.sparse` is the
    /// per-batch gather buffer.
    params: Params,
    grads: Grads,
    dense: Vec<DenseState>,
    tables: Vec<Table>,
    /// Per table: the ids of the current batch, and the arena row of each.
    ids: Vec<Vec<u64>>,
    rows: Vec<Vec<u32>>,
    steps: u64,
}

struct DenseState {
    optimizer: OptimizerConfig,
    state: Vec<f32>,
    t: u64,
}

/// One sparse table: rows in a contiguous arena, found through a hash map from id to arena row.
struct Table {
    name: String,
    dim: usize,
    init: Initializer,
    optimizer: OptimizerConfig,
    /// Floats per arena record: the row's `dim` values, then its `slots * dim` optimizer state
    /// (slot-major, as the kernels expect). Keeping them together makes an update touch one
    /// stretch of memory instead of two far-apart ones; with a million rows both would miss
    /// the cache.
    stride: usize,
    index: HashMap<u64, u32, IdBuildHasher>,
    /// Record of arena row `r`: `data[r*stride..(r+1)*stride]`; its update count is `t[r]`.
    data: Vec<f32>,
    t: Vec<u64>,
}

impl Table {
    fn new(spec: &SparseSpec) -> Table {
        let dim = spec.dim as usize;
        Table {
            name: spec.name.clone(),
            dim,
            init: spec.init.clone(),
            optimizer: spec.optimizer.clone(),
            stride: dim * (1 + spec.optimizer.num_slots()),
            index: HashMap::default(),
            data: Vec::new(),
            t: Vec::new(),
        }
    }

    /// Arena row of `id`, creating it as a parameter server would on first touch.
    fn row(&mut self, id: u64) -> u32 {
        if let Some(&r) = self.index.get(&id) {
            return r;
        }
        let r = self.t.len();
        // u32 row indices halve the size of the index; 2^32 rows of floats would not fit in
        // memory anyway.
        let r32 = u32::try_from(r).expect("a sparse table holds fewer than 2^32 rows");
        let start = self.data.len();
        self.data.resize(start + self.stride, 0.0);
        let (values, state) = self.data[start..].split_at_mut(self.dim);
        self.init.fill_row(&self.name, id, values);
        self.optimizer.init_state(state);
        self.t.push(0);
        self.index.insert(id, r32);
        r32
    }

    /// Values of arena row `r`.
    fn values(&self, r: u32) -> &[f32] {
        let start = r as usize * self.stride;
        &self.data[start..start + self.dim]
    }

    /// Values of row `id`, if it exists.
    fn get(&self, id: u64) -> Option<&[f32]> {
        self.index.get(&id).map(|&r| self.values(r))
    }

    /// Finds or creates the rows of `ids` (recorded in `rows`) and copies their values into
    /// `pulled`, as a pull from a server would.
    fn pull(&mut self, ids: &[u64], rows: &mut Vec<u32>, pulled: &mut SparseRows) {
        rows.clear();
        rows.extend(ids.iter().map(|&id| self.row(id)));
        pulled.ids.clear();
        pulled.ids.extend_from_slice(ids);
        pulled.values.clear();
        for &r in rows.iter() {
            pulled.values.extend_from_slice(self.values(r));
        }
    }

    /// One optimizer update of each row in `rows` with its gradient row in `grads`.
    fn update(&mut self, rows: &[u32], grads: &SparseRows) {
        let dim = self.dim;
        for (&r, grad) in rows.iter().zip(grads.values.chunks_exact(dim)) {
            let r = r as usize;
            self.t[r] += 1;
            let (values, state) = self.data[r * self.stride..(r + 1) * self.stride].split_at_mut(dim);
            self.optimizer.step(values, grad, state, self.t[r]);
        }
    }
}

impl LocalTrainer {
    /// Validates the model's spec and initializes its dense tensors; sparse tables start empty.
    pub fn new(model: Box<dyn Model>) -> Result<Self, ModelError> {
        let spec = model.spec().clone();
        spec.validate()?;
        let mut params = Params::default();
        let mut dense = Vec::with_capacity(spec.dense.len());
        for d in &spec.dense {
            let mut values = vec![0.0; d.numel() as usize];
            d.init.fill_dense(&d.name, &d.shape, 0, &mut values);
            let mut state = vec![0.0; d.optimizer.num_slots() * values.len()];
            d.optimizer.init_state(&mut state);
            params.dense.push(values);
            dense.push(DenseState { optimizer: d.optimizer.clone(), state, t: 0 });
        }
        let tables: Vec<Table> = spec.sparse.iter().map(Table::new).collect();
        params.sparse = tables.iter().map(|t| SparseRows::new(t.dim)).collect();
        Ok(LocalTrainer {
            model,
            params,
            grads: Grads::default(),
            dense,
            tables,
            ids: Vec::new(),
            rows: Vec::new(),
            steps: 0,
        })
    }

    /// [`LocalTrainer::new`] for the model [`build`] makes of `config`.
    pub fn from_config(config: &ModelConfig) -> Result<Self, ModelError> {
        Self::new(build(config)?)
    }

    /// The model being trained.
    pub fn model(&self) -> &dyn Model {
        self.model.as_ref()
    }

    /// Training steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One synchronous step: pull (creating rows on first touch), forward and backward, then
    /// one optimizer update of every dense tensor and every pulled row. Returns the mean loss
    /// of the batch before the update. On an error nothing is updated, though rows the pull
    /// created stay, as they would on a server.
    pub fn train_step(&mut self, batch: &Batch) -> Result<f32, ModelError> {
        // Run the whole step on a rayon worker: called from outside the pool, the model's
        // parallel chunks would otherwise leave both workers spinning for work while this
        // thread does the serial parts, three busy threads on two cores.
        rayon::scope(|_| self.step_in_pool(batch))
    }

    fn step_in_pool(&mut self, batch: &Batch) -> Result<f32, ModelError> {
        self.model.sparse_ids(batch, &mut self.ids);
        self.rows.resize_with(self.tables.len(), Vec::new);
        // Tables are independent, so each pulls (and later updates) on its own thread.
        self.tables
            .par_iter_mut()
            .zip(&self.ids)
            .zip(self.rows.par_iter_mut().zip(&mut self.params.sparse))
            .for_each(|((table, ids), (rows, pulled))| table.pull(ids, rows, pulled));
        let loss = self.model.forward_backward(batch, &self.params, &mut self.grads)?;
        let (params, grads, dense, tables, rows) =
            (&mut self.params, &self.grads, &mut self.dense, &mut self.tables, &self.rows);
        rayon::join(
            || {
                for ((values, grad), d) in params.dense.iter_mut().zip(&grads.dense).zip(dense) {
                    d.t += 1;
                    d.optimizer.step(values, grad, &mut d.state, d.t);
                }
            },
            || {
                tables
                    .par_iter_mut()
                    .zip(rows)
                    .zip(&grads.sparse)
                    .for_each(|((table, rows), grads)| table.update(rows, grads));
            },
        );
        self.steps += 1;
        Ok(loss)
    }

    /// Predicted click probabilities for `batch` with the current parameters. Rows not created
    /// yet read as their initial values, as a server's pull would, but are not stored.
    pub fn predict(&self, batch: &Batch, out: &mut Vec<f32>) -> Result<(), ModelError> {
        let params = self.pull(batch);
        self.model.predict(batch, &params, out)
    }

    /// The parameters a worker would pull for `batch` right now (without creating rows).
    pub fn pull(&self, batch: &Batch) -> Params {
        let mut ids = Vec::new();
        self.model.sparse_ids(batch, &mut ids);
        let sparse = self
            .tables
            .iter()
            .zip(ids)
            .map(|(table, ids)| {
                let dim = table.dim;
                let mut values = vec![0.0; ids.len() * dim];
                for (&id, out) in ids.iter().zip(values.chunks_exact_mut(dim.max(1))) {
                    match table.get(id) {
                        Some(row) => out.copy_from_slice(row),
                        None => table.init.fill_row(&table.name, id, out),
                    }
                }
                SparseRows { ids, dim, values }
            })
            .collect();
        Params { dense: self.params.dense.clone(), sparse }
    }

    /// Current values of the dense tensor `name`.
    pub fn dense(&self, name: &str) -> Option<&[f32]> {
        let i = self.model.spec().dense_index(name)?;
        Some(&self.params.dense[i])
    }

    /// Current values of row `id` of sparse table `table`, if that row has been created.
    pub fn sparse_row(&self, table: &str, id: u64) -> Option<&[f32]> {
        self.tables[self.model.spec().sparse_index(table)?].get(id)
    }

    /// Updates row `id` of `table` has had (0 when it does not exist).
    pub fn sparse_row_steps(&self, table: &str, id: u64) -> u64 {
        self.model
            .spec()
            .sparse_index(table)
            .and_then(|i| {
                let t = &self.tables[i];
                t.index.get(&id).map(|&r| t.t[r as usize])
            })
            .unwrap_or(0)
    }

    /// Rows created so far in sparse table `table` (0 for an unknown table).
    pub fn num_rows(&self, table: &str) -> usize {
        self.model.spec().sparse_index(table).map_or(0, |i| self.tables[i].t.len())
    }
}
