//! [`TchAdapter`]: a tch `VarStore` as a gradflow model.
//!
//! Every variable of the store that requires gradients becomes a dense tensor of the
//! [`ModelSpec`], named by its VarStore path (`"l1.weight"`), with its shape, an initializer
//! read from its values ([`super::init`]) and the optimizer given to the builder. A variable
//! marked with [`TchAdapterBuilder::sparse_table`] (an embedding weight of shape
//! `[rows, dim]`) becomes a sparse table instead: each step pulls only the rows of the batch's
//! ids and pushes only their gradients. Variables that do not require gradients (batch-norm
//! running statistics, frozen layers) stay local to each worker.
//!
//! One step:
//!
//! 1. [`batch_ids`](TchAdapter::batch_ids) for every sparse table: the ids the batch looks up;
//! 2. [`pull`](TchAdapter::pull): the servers' values of every dense tensor and of those rows,
//!    into the variables (in sync mode this waits for the step's model);
//! 3. the user's forward pass, loss and `backward()`;
//! 4. [`push`](TchAdapter::push) (or [`step`](TchAdapter::step), which also calls
//!    [`Worker::step`]): every gradient to the servers, then the gradients are zeroed.
//!
//! tch has no autograd hooks, so a gradient can be pushed only once `backward()` has
//! returned; see `docs/tch.md` for what that means for overlapping the pushes.

use std::collections::HashMap;

use ::tch::nn::VarStore;
use ::tch::{Device, Kind, Tensor};
use gradflow_core::{DenseSpec, Initializer, ModelSpec, OptimizerConfig, SparseSpec};

use super::transfer::{HostBuffer, host_slice, host_slice_mut, synchronize};
use super::{TchError, Transfer, infer_initializer};
use crate::{StepOutcome, Worker};

/// Builds a [`TchAdapter`]; start with [`TchAdapter::builder`].
pub struct TchAdapterBuilder<'a> {
    vs: &'a VarStore,
    optimizer: OptimizerConfig,
    optimizers: HashMap<String, OptimizerConfig>,
    inits: HashMap<String, Initializer>,
    tables: Vec<String>,
    seed: u64,
    transfer: Option<Transfer>,
}

impl<'a> TchAdapterBuilder<'a> {
    /// Makes variable `name` (shape `[rows, dim]`, e.g. `"emb.weight"` of an `nn::embedding`)
    /// a sparse table: rows are pulled and pushed only where a batch's ids touch them.
    pub fn sparse_table(mut self, name: impl Into<String>) -> Self {
        self.tables.push(name.into());
        self
    }

    /// The optimizer of variable `name`, instead of the builder's default.
    pub fn optimizer(mut self, name: impl Into<String>, optimizer: OptimizerConfig) -> Self {
        self.optimizers.insert(name.into(), optimizer);
        self
    }

    /// The initializer the servers use for variable `name`, instead of the one read from its
    /// values.
    pub fn init(mut self, name: impl Into<String>, init: Initializer) -> Self {
        self.inits.insert(name.into(), init);
        self
    }

    /// Seed of the initializers read from the variables' values. Default 0.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// How values move between variables and network buffers. Default:
    /// [`Transfer::for_device`] of the store's device.
    pub fn transfer(mut self, transfer: Transfer) -> Self {
        self.transfer = Some(transfer);
        self
    }

    /// Reads the store: names, shapes, initial values. Fails on names that the store does
    /// not have, on variables that are not `f32`, and on sparse tables that are not 2-D.
    pub fn build(self) -> Result<TchAdapter, TchError> {
        let device = self.vs.device();
        let transfer = self.transfer.unwrap_or(Transfer::for_device(device));
        if transfer == Transfer::Direct && device != Device::Cpu {
            return Err(TchError::DirectNeedsCpu(device));
        }
        let all = self.vs.variables();
        let mut names: Vec<String> =
            all.iter().filter(|(_, t)| t.requires_grad()).map(|(n, _)| n.clone()).collect();
        names.sort();
        if names.is_empty() {
            return Err(TchError::NothingToTrain);
        }
        let referenced = self.tables.iter().chain(self.optimizers.keys()).chain(self.inits.keys());
        for name in referenced {
            if names.binary_search(name).is_err() {
                return Err(TchError::UnknownVariable { name: name.clone(), known: names.join(", ") });
            }
        }
        let mut spec = ModelSpec { dense: Vec::new(), sparse: Vec::new() };
        let (mut dense, mut tables) = (Vec::new(), Vec::new());
        for name in names {
            let var = all[&name].shallow_clone();
            let kind = var.f_kind()?;
            if kind != Kind::Float {
                return Err(TchError::Kind { name, kind: format!("{kind:?}") });
            }
            let shape = var.size();
            let init = match self.inits.get(&name) {
                Some(init) => init.clone(),
                None => {
                    let values = ::tch::no_grad(|| var.f_to_device(Device::Cpu)?.f_contiguous())?;
                    infer_initializer(host_slice(&values, &name)?, self.seed)
                }
            };
            let optimizer = self.optimizers.get(&name).unwrap_or(&self.optimizer).clone();
            if self.tables.contains(&name) {
                let &[rows, dim] = shape.as_slice() else {
                    return Err(TchError::NotATable { name, shape });
                };
                spec.sparse.push(SparseSpec { name: name.clone(), dim: dim as u32, init, optimizer });
                let host = match transfer {
                    Transfer::Staged => Some(HostBuffer::new(dim as usize, device)?),
                    Transfer::Direct => None,
                };
                tables.push(TableVar {
                    name,
                    var,
                    rows,
                    dim,
                    ids: None,
                    index: Tensor::f_from_slice::<i64>(&[])?,
                    values: Vec::new(),
                    host,
                });
            } else {
                spec.dense.push(DenseSpec {
                    name: name.clone(),
                    shape: shape.iter().map(|&d| d as u64).collect(),
                    init,
                    optimizer,
                });
                let host = match transfer {
                    Transfer::Staged => Some(HostBuffer::new(var.numel(), device)?),
                    Transfer::Direct => None,
                };
                dense.push(DenseVar { name, var, host });
            }
        }
        let dense_names = dense.iter().map(|d| d.name.clone()).collect();
        Ok(TchAdapter { spec, device, transfer, dense, dense_names, tables, uploads_pending: false })
    }
}

/// A dense variable and, when staged, its host buffer.
struct DenseVar {
    name: String,
    /// Shares its storage with the VarStore's variable.
    var: Tensor,
    host: Option<HostBuffer>,
}

/// A variable trained as a sparse table.
struct TableVar {
    name: String,
    var: Tensor,
    rows: i64,
    dim: i64,
    /// The distinct ids of this step's batch, sorted; set by `batch_ids`, used by the pull
    /// and the push, cleared by the push.
    ids: Option<Vec<u64>>,
    /// The same ids as an `Int64` tensor on the variable's device.
    index: Tensor,
    /// The pulled rows (reused between steps).
    values: Vec<f32>,
    host: Option<HostBuffer>,
}

/// A tch `VarStore` trained by gradflow's parameter servers; see the [module docs](self).
///
/// The adapter holds handles that share storage with the store's variables: values pulled
/// into the adapter are what the model computes with. Do not run the model on another thread
/// while a pull or a push is in progress.
pub struct TchAdapter {
    spec: ModelSpec,
    device: Device,
    transfer: Transfer,
    dense: Vec<DenseVar>,
    /// The names of `dense`, in the same order, as `Worker::pull_dense` takes them.
    dense_names: Vec<String>,
    tables: Vec<TableVar>,
    /// Staged pulls whose host-to-device copies may still be running.
    uploads_pending: bool,
}

impl TchAdapter {
    /// Starts building an adapter for `vs`, with `optimizer` for every variable (see
    /// [`TchAdapterBuilder::optimizer`] for exceptions).
    pub fn builder(vs: &VarStore, optimizer: OptimizerConfig) -> TchAdapterBuilder<'_> {
        TchAdapterBuilder {
            vs,
            optimizer,
            optimizers: HashMap::new(),
            inits: HashMap::new(),
            tables: Vec::new(),
            seed: 0,
            transfer: None,
        }
    }

    /// The model spec this adapter declares: dense tensors and sparse tables in name order.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The device of the variables.
    pub fn device(&self) -> Device {
        self.device
    }

    /// How values move between the variables and the network buffers.
    pub fn transfer(&self) -> Transfer {
        self.transfer
    }

    /// Whether every host buffer is page-locked memory (true on CUDA, false otherwise).
    pub fn buffers_pinned(&self) -> bool {
        let hosts = self
            .dense
            .iter()
            .filter_map(|d| d.host.as_ref())
            .chain(self.tables.iter().filter_map(|t| t.host.as_ref()));
        let mut any = false;
        for h in hosts {
            if !h.is_pinned() {
                return false;
            }
            any = true;
        }
        any
    }

    /// Declares the spec on every server (the first worker creates the model, later ones
    /// check that theirs is the same). Every worker must build the same spec: build the model
    /// after the same `tch::manual_seed` everywhere, or give every variable an initializer.
    pub async fn declare(&mut self, worker: &mut Worker) -> Result<(), TchError> {
        // `&mut self`: a shared borrow of tensors (which are not `Sync`) held across the await
        // would make the future unfit for `tokio::spawn`.
        worker.declare(self.spec.clone()).await?;
        Ok(())
    }

    fn table_mut(&mut self, table: &str) -> Result<&mut TableVar, TchError> {
        self.tables.iter_mut().find(|t| t.name == table).ok_or_else(|| TchError::NotSparse(table.to_string()))
    }

    /// Records the ids that this step's batch looks up in sparse table `table`: an integer
    /// tensor of any shape and device, such as the input of the embedding layer. Repeated
    /// ids are pulled and pushed once.
    pub fn batch_ids(&mut self, table: &str, ids: &Tensor) -> Result<(), TchError> {
        let device = self.device;
        let t = self.table_mut(table)?;
        let flat = ids.f_to_kind(Kind::Int64)?.f_to_device(Device::Cpu)?.f_flatten(0, -1)?.f_contiguous()?;
        let n = flat.numel();
        let mut sorted = vec![0i64; n];
        flat.f_copy_data(&mut sorted, n)?;
        sorted.sort_unstable();
        sorted.dedup();
        for &id in [sorted.first(), sorted.last()].into_iter().flatten() {
            if id < 0 || id >= t.rows {
                return Err(TchError::IdOutOfRange { table: table.to_string(), id, rows: t.rows });
            }
        }
        t.index = Tensor::f_from_slice(&sorted)?.f_to_device(device)?;
        t.ids = Some(sorted.into_iter().map(|id| id as u64).collect());
        Ok(())
    }

    /// Pulls the servers' current values into the variables: every dense tensor, and the rows
    /// of each sparse table that [`batch_ids`](Self::batch_ids) named. In sync mode this waits
    /// for the model of the worker's current step. Nothing is recorded for autograd.
    pub async fn pull(&mut self, worker: &Worker) -> Result<(), TchError> {
        if let Some(t) = self.tables.iter().find(|t| t.ids.is_none()) {
            return Err(TchError::MissingIds(t.name.clone()));
        }
        if self.uploads_pending {
            // The host buffers are about to be overwritten: let the last copies out of them finish.
            synchronize(self.device);
            self.uploads_pending = false;
        }
        let Self { dense, dense_names, tables, uploads_pending, .. } = &mut *self;
        let names: Vec<&str> = dense_names.iter().map(String::as_str).collect();
        let mut outs = Vec::with_capacity(dense.len());
        for d in dense.iter_mut() {
            outs.push(match &mut d.host {
                Some(h) => h.slice_mut(d.var.numel())?,
                None => host_slice_mut(&mut d.var, &d.name)?,
            });
        }
        let mut rows: Vec<Vec<f32>> = tables.iter_mut().map(|t| std::mem::take(&mut t.values)).collect();
        let requests: Vec<(&str, &[u64])> =
            tables.iter().map(|t| (t.name.as_str(), t.ids.as_deref().unwrap_or(&[]))).collect();
        let (dense_pulled, rows_pulled) = tokio::join!(worker.pull_dense(&names, &mut outs), async {
            if requests.is_empty() { Ok(()) } else { worker.pull_sparse_many(&requests, &mut rows).await }
        });
        dense_pulled?;
        rows_pulled?;
        drop(outs);
        for d in dense.iter_mut() {
            if let Some(h) = &d.host {
                h.upload(&mut d.var)?;
                *uploads_pending = true;
            }
        }
        for (t, values) in tables.iter_mut().zip(rows) {
            let shape = [t.index.numel() as i64, t.dim];
            if shape[0] > 0 {
                match &mut t.host {
                    Some(h) => {
                        h.reserve(values.len())?;
                        h.slice_mut(values.len())?.copy_from_slice(&values);
                        let src = h.to_device(&shape)?;
                        ::tch::no_grad(|| t.var.f_index_copy_(0, &t.index, &src).map(drop))?;
                        *uploads_pending = true;
                    }
                    None => {
                        // SAFETY: `values` holds shape[0] * shape[1] f32 values and outlives
                        // `src`, which is only read by the synchronous CPU `index_copy_` below
                        // and dropped before `values` is moved.
                        let src = unsafe {
                            Tensor::f_from_blob(
                                values.as_ptr() as *const u8,
                                &shape,
                                &[],
                                Kind::Float,
                                Device::Cpu,
                            )?
                        };
                        ::tch::no_grad(|| t.var.f_index_copy_(0, &t.index, &src).map(drop))?;
                    }
                }
            }
            t.values = values;
        }
        Ok(())
    }

    /// Stages every gradient for the worker's current step: each dense variable's gradient
    /// whole, and for each sparse table the gradient rows of the batch's ids. Then zeroes the
    /// gradients, ready for the next `backward()`. A variable without a gradient (unused by
    /// this step's loss) is skipped: the servers count it as zero.
    pub fn push(&mut self, worker: &mut Worker) -> Result<(), TchError> {
        for d in &mut self.dense {
            let grad = d.var.grad();
            if !grad.defined() {
                continue;
            }
            match &mut d.host {
                Some(h) => {
                    h.download(&grad)?;
                    worker.push_dense(&d.name, h.slice(grad.numel())?)?;
                }
                None => {
                    let grad = if grad.is_contiguous() { grad } else { grad.f_contiguous()? };
                    worker.push_dense(&d.name, host_slice(&grad, &d.name)?)?;
                }
            }
            if d.host.is_some() {
                // The download waited for the stream, so the pull's uploads are done too.
                self.uploads_pending = false;
            }
            d.var.zero_grad();
        }
        for t in &mut self.tables {
            let Some(ids) = t.ids.take() else { continue };
            let grad = t.var.grad();
            if !grad.defined() {
                continue;
            }
            let (ids, rows) = if grad.is_sparse() {
                // `nn::embedding` with `sparse: true`: the gradient lists its touched rows.
                let g = grad.f_coalesce()?;
                let index =
                    g.f_internal_indices()?.f_to_device(Device::Cpu)?.f_flatten(0, -1)?.f_contiguous()?;
                let n = index.numel();
                let mut touched = vec![0i64; n];
                index.f_copy_data(&mut touched, n)?;
                (touched.into_iter().map(|id| id as u64).collect(), g.f_internal_values()?)
            } else {
                (ids, grad.f_index_select(0, &t.index)?)
            };
            if !ids.is_empty() {
                match &mut t.host {
                    Some(h) => {
                        h.download(&rows)?;
                        worker.push_sparse(&t.name, &ids, h.slice(rows.numel())?)?;
                    }
                    None => {
                        let rows = rows.f_contiguous()?;
                        worker.push_sparse(&t.name, &ids, host_slice(&rows, &t.name)?)?;
                    }
                }
            }
            t.var.zero_grad();
        }
        Ok(())
    }

    /// [`push`](Self::push), then [`Worker::step`]: sends the gradients and moves the worker to
    /// its next step.
    pub async fn step(&mut self, worker: &mut Worker) -> Result<StepOutcome, TchError> {
        self.push(worker)?;
        Ok(worker.step().await?)
    }
}
