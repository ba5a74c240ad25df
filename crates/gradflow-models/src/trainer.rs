//! [`LocalTrainer`]: training in one process, with no servers.
//!
//! It owns the parameters and applies the optimizers exactly as a parameter server does: dense
//! tensors start from their initializer over the whole tensor, sparse rows are created from
//! `fill_row` on first touch with fresh optimizer state, and every tensor and every row counts
//! its own updates for the optimizer's `t`. Every row the batch pulled is updated, even one
//! whose gradient is zero, because a worker pushes the gradient of every row it pulled. So it is
//! both the reference that synchronous distributed training must match and the single-process
//! baseline of the benchmarks.
//!
//! Tables the model pulls for the same ids ([`Model::shared_ids`]; wide & deep's two) keep
//! their rows together in one arena behind one index ([`Group`]), so a step finds each id once
//! and updates one record per id. A pull's lookups, row creations and copies, and the updates,
//! run on every rayon thread.

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
    groups: Vec<Group>,
    /// Per table: its group and its part there.
    parts: Vec<(usize, usize)>,
    /// Per table: the ids of the current batch.
    ids: Vec<Vec<u64>>,
    steps: u64,
}

struct DenseState {
    optimizer: OptimizerConfig,
    state: Vec<f32>,
    t: u64,
}

/// One table of a [`Group`]: where its part of a record starts, and how it starts and learns.
struct Part {
    /// Index of the table in the spec.
    table: usize,
    name: String,
    dim: usize,
    init: Initializer,
    optimizer: OptimizerConfig,
    /// Float of the record where this table's `dim` values start; its `slots * dim`
    /// optimizer state (slot-major, as the kernels expect) follows them.
    offset: usize,
    /// `dim * (1 + slots)`.
    len: usize,
}

/// Sparse tables that are always pulled for the same ids ([`Model::shared_ids`]): one index
/// from id to arena row, and one record per row holding every table's values and state, so a
/// step finds each id once and an update touches one stretch of memory instead of several
/// far-apart ones (with a million rows each would miss the cache).
///
/// Every table of a group is updated exactly when the others are, so they share one update
/// count per row, kept in the record's first float (its bits are a `u32`).
struct Group {
    parts: Vec<Part>,
    /// Floats per record: the update count, then each part.
    stride: usize,
    index: HashMap<u64, u32, IdBuildHasher>,
    /// Record of arena row `r`: `data[r*stride..(r+1)*stride]`.
    data: Vec<f32>,
    /// The step's buffers: the arena row of each id pulled, the ids of rows created, and
    /// scratch for finding the median row.
    step_rows: Vec<u32>,
    created: Vec<u64>,
    median: Vec<u32>,
}

impl Group {
    fn new(specs: &[SparseSpec], tables: &[usize]) -> Group {
        let mut offset = 1;
        let parts = tables
            .iter()
            .map(|&table| {
                let spec = &specs[table];
                let dim = spec.dim as usize;
                let len = dim * (1 + spec.optimizer.num_slots());
                let part = Part {
                    table,
                    name: spec.name.clone(),
                    dim,
                    init: spec.init.clone(),
                    optimizer: spec.optimizer.clone(),
                    offset,
                    len,
                };
                offset += len;
                part
            })
            .collect();
        Group {
            parts,
            stride: offset,
            index: HashMap::default(),
            data: Vec::new(),
            step_rows: Vec::new(),
            created: Vec::new(),
            median: Vec::new(),
        }
    }

    fn rows(&self) -> usize {
        self.data.len() / self.stride
    }

    /// Fills a new record: every table's initial values for `id` and fresh optimizer state.
    fn init_record(parts: &[Part], id: u64, record: &mut [f32]) {
        record[0] = f32::from_bits(0);
        for part in parts {
            let (values, state) = record[part.offset..part.offset + part.len].split_at_mut(part.dim);
            part.init.fill_row(&part.name, id, values);
            part.optimizer.init_state(state);
        }
    }

    /// Values of part `p` of arena row `r`.
    fn values(&self, p: usize, r: u32) -> &[f32] {
        let start = r as usize * self.stride + self.parts[p].offset;
        &self.data[start..start + self.parts[p].dim]
    }

    /// Updates of arena row `r` so far.
    fn count(&self, r: u32) -> u64 {
        u64::from(self.data[r as usize * self.stride].to_bits())
    }

    /// Finds or creates the rows of `ids` (recorded for [`Group::update`]) and copies each
    /// table's values into its `pulled` rows, as a pull from a server would. Rows are created
    /// as a server creates them on first touch.
    fn pull(&mut self, ids: &[u64], pulled: &mut [SparseRows]) {
        const NEW: u32 = u32::MAX;
        let Group { parts, stride, index, data, step_rows: rows, created, .. } = self;
        let stride = *stride;
        rows.clear();
        rows.resize(ids.len(), NEW);
        let found_in = &*index;
        rows.par_chunks_mut(ROWS_PER_TASK).zip(ids.par_chunks(ROWS_PER_TASK)).for_each(|(rows, ids)| {
            for (r, id) in rows.iter_mut().zip(ids) {
                if let Some(&found) = found_in.get(id) {
                    *r = found;
                }
            }
        });
        let old = data.len() / stride;
        created.clear();
        for (r, &id) in rows.iter_mut().zip(ids) {
            if *r == NEW {
                // u32 row indices halve the size of the index; 2^32 rows of floats would not
                // fit in memory anyway.
                *r = u32::try_from(old + created.len())
                    .ok()
                    .filter(|&r| r != NEW)
                    .expect("a sparse table holds fewer than 2^32 - 1 rows");
                index.insert(id, *r);
                created.push(id);
            }
        }
        data.resize((old + created.len()) * stride, 0.0);
        data[old * stride..]
            .par_chunks_mut(stride * ROWS_PER_TASK)
            .zip(created.par_chunks(ROWS_PER_TASK))
            .for_each(|(records, ids)| {
                for (record, &id) in records.chunks_exact_mut(stride).zip(ids) {
                    Self::init_record(parts, id, record);
                }
            });
        let data = &*data;
        for part in parts.iter() {
            let out = &mut pulled[part.table];
            out.ids.clear();
            out.ids.extend_from_slice(ids);
            out.values.resize(ids.len() * part.dim, 0.0);
            out.values.par_chunks_mut(part.dim * ROWS_PER_TASK).zip(rows.par_chunks(ROWS_PER_TASK)).for_each(
                |(values, rows)| {
                    for (v, &r) in values.chunks_exact_mut(part.dim).zip(rows) {
                        let start = r as usize * stride + part.offset;
                        v.copy_from_slice(&data[start..start + part.dim]);
                    }
                },
            );
        }
    }

    /// One optimizer update of each row the last pull found, every table with its gradient
    /// row in `grads`. Rows are distinct, so the arena is split in two at their median and
    /// each half updated on its own thread.
    fn update(&mut self, grads: &[SparseRows]) {
        let Group { parts, stride, data, step_rows: rows, median, .. } = self;
        let (rows, stride) = (&*rows, *stride);
        median.clear();
        median.extend_from_slice(rows);
        let mid = if median.len() < 2 * MIN_ROWS_PER_THREAD {
            u32::MAX
        } else {
            let half = median.len() / 2;
            *median.select_nth_unstable(half).1
        };
        let split = (mid as usize).min(data.len() / stride) * stride;
        let (low, high) = data.split_at_mut(split);
        let parts = &*parts;
        let apply = |arena: &mut [f32], first: u32, last: u32| {
            for (k, &r) in rows.iter().enumerate() {
                if r < first || r >= last {
                    continue;
                }
                let start = (r - first) as usize * stride;
                let record = &mut arena[start..start + stride];
                let t = record[0].to_bits().saturating_add(1);
                record[0] = f32::from_bits(t);
                for part in parts {
                    let grad = &grads[part.table].values[k * part.dim..(k + 1) * part.dim];
                    let (values, state) = record[part.offset..part.offset + part.len].split_at_mut(part.dim);
                    part.optimizer.step(values, grad, state, u64::from(t));
                }
            }
        };
        rayon::join(|| apply(low, 0, mid), || apply(high, mid, u32::MAX));
    }
}

/// Below this many rows per thread an update is not split.
const MIN_ROWS_PER_THREAD: usize = 256;

/// Rows each task of a pull finds, creates or copies.
const ROWS_PER_TASK: usize = 512;

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
        let shared = model.shared_ids();
        if shared.len() != spec.sparse.len() || shared.iter().enumerate().any(|(table, &first)| first > table)
        {
            return Err(ModelError::InvalidConfig(format!(
                "the model's shared_ids {shared:?} must name, for each of its {} sparse tables, itself or a table before it",
                spec.sparse.len()
            )));
        }
        let mut members: Vec<Vec<usize>> = Vec::new();
        let mut parts = Vec::with_capacity(spec.sparse.len());
        for (table, &first) in shared.iter().enumerate() {
            if first >= table {
                parts.push((members.len(), 0));
                members.push(vec![table]);
            } else {
                let group = parts[first].0;
                parts.push((group, members[group].len()));
                members[group].push(table);
            }
        }
        let groups: Vec<Group> = members.iter().map(|tables| Group::new(&spec.sparse, tables)).collect();
        params.sparse = spec.sparse.iter().map(|t| SparseRows::new(t.dim as usize)).collect();
        Ok(LocalTrainer {
            model,
            params,
            grads: Grads::default(),
            dense,
            groups,
            parts,
            ids: Vec::new(),
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
        for (table, &(group, part)) in self.parts.iter().enumerate() {
            let first = self.groups[group].parts[0].table;
            if part > 0 && self.ids[table] != self.ids[first] {
                return Err(ModelError::ParamsMismatch(format!(
                    "the model said sparse tables `{}` and `{}` are always pulled for the same ids, but this batch's differ",
                    self.model.spec().sparse[first].name,
                    self.model.spec().sparse[table].name
                )));
            }
        }
        let (groups, ids, pulled) = (&mut self.groups, &self.ids, &mut self.params.sparse);
        for group in groups.iter_mut() {
            group.pull(&ids[group.parts[0].table], pulled);
        }
        let loss = self.model.forward_backward(batch, &self.params, &mut self.grads)?;
        let (params, grads, dense, groups) =
            (&mut self.params, &self.grads, &mut self.dense, &mut self.groups);
        rayon::join(
            || {
                for ((values, grad), d) in params.dense.iter_mut().zip(&grads.dense).zip(dense) {
                    d.t += 1;
                    d.optimizer.step(values, grad, &mut d.state, d.t);
                }
            },
            || {
                for group in groups.iter_mut() {
                    group.update(&grads.sparse);
                }
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
            .parts
            .iter()
            .zip(ids)
            .map(|(&(g, p), ids)| {
                let (group, part) = (&self.groups[g], &self.groups[g].parts[p]);
                let dim = part.dim;
                let mut values = vec![0.0; ids.len() * dim];
                for (&id, out) in ids.iter().zip(values.chunks_exact_mut(dim.max(1))) {
                    match group.index.get(&id) {
                        Some(&r) => out.copy_from_slice(group.values(p, r)),
                        None => part.init.fill_row(&part.name, id, out),
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
        let (g, p) = self.parts[self.model.spec().sparse_index(table)?];
        let group = &self.groups[g];
        group.index.get(&id).map(|&r| group.values(p, r))
    }

    /// Updates row `id` of `table` has had (0 when it does not exist).
    pub fn sparse_row_steps(&self, table: &str, id: u64) -> u64 {
        self.model
            .spec()
            .sparse_index(table)
            .and_then(|i| {
                let group = &self.groups[self.parts[i].0];
                group.index.get(&id).map(|&r| group.count(r))
            })
            .unwrap_or(0)
    }

    /// Rows created so far in sparse table `table` (0 for an unknown table).
    pub fn num_rows(&self, table: &str) -> usize {
        self.model.spec().sparse_index(table).map_or(0, |i| self.groups[self.parts[i].0].rows())
    }
}
