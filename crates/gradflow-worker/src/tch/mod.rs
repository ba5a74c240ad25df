//! Training a [tch](https://docs.rs/tch) (libtorch) model with gradflow (cargo feature `tch`).
//!
//! A trainer that already builds its model in a [`VarStore`](::tch::nn::VarStore) keeps its
//! model code and its loss; the parameter servers take over the optimizer. [`TchAdapter`]
//! turns the store into a [`ModelSpec`](gradflow_core::ModelSpec), and for every batch pulls
//! the current values into the variables and pushes their gradients:
//!
//! ```no_run
//! use gradflow_core::OptimizerConfig;
//! use gradflow_worker::tch::TchAdapter;
//! use gradflow_worker::{Worker, WorkerConfig};
//! use tch::nn::{self, Module};
//!
//! # async fn train(batches: Vec<(tch::Tensor, tch::Tensor)>) -> Result<(), gradflow_worker::tch::TchError> {
//! let vs = nn::VarStore::new(tch::Device::Cpu);
//! let net = nn::seq()
//!     .add(nn::linear(vs.root() / "l1", 30, 16, Default::default()))
//!     .add_fn(|x| x.relu())
//!     .add(nn::linear(vs.root() / "l2", 16, 1, Default::default()));
//! let mut model = TchAdapter::builder(&vs, OptimizerConfig::adam(0.01)).build()?;
//! let mut worker = Worker::connect(WorkerConfig::new(["127.0.0.1:7000"], 0)).await?;
//! model.declare(&mut worker).await?;
//! for (x, y) in &batches {
//!     model.pull(&worker).await?; // the servers' current values, into the variables
//!     let loss = net.forward(x).binary_cross_entropy_with_logits::<tch::Tensor>(y, None, None, tch::Reduction::Mean);
//!     loss.backward();
//!     model.step(&mut worker).await?; // push every gradient, then complete the step
//! }
//! worker.leave().await?;
//! # Ok(()) }
//! ```
//!
//! - [`adapter`]: [`TchAdapter`] and its builder: which variables are dense tensors and which
//!   are sparse embedding tables, their initializers and optimizers.
//! - [`crate::init`]: the initializer a variable is declared with, read from its values.
//! - [`transfer`]: how values move between a variable and the network buffers: straight
//!   through the memory of CPU tensors, or through one (pinned) host buffer per tensor with
//!   non-blocking copies for CUDA tensors.
//!
//! See `docs/tch.md` for the guide.

pub mod adapter;
pub mod transfer;

use ::tch::Device;
use thiserror::Error;

use crate::WorkerError;

pub use crate::init::{self, infer_initializer};
pub use adapter::{TchAdapter, TchAdapterBuilder};
pub use transfer::Transfer;

/// What went wrong training a tch model through gradflow.
#[derive(Debug, Error)]
pub enum TchError {
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("libtorch: {0}")]
    Torch(#[from] ::tch::TchError),
    #[error("the VarStore has no variable `{name}` that requires gradients (it has: {known})")]
    UnknownVariable { name: String, known: String },
    #[error(
        "variable `{name}` holds {kind} values; gradflow trains f32 (call `vs.float()` before building the adapter)"
    )]
    Kind { name: String, kind: String },
    #[error("variable `{name}` has shape {shape:?}; a sparse table must be 2-D: [rows, dim]")]
    NotATable { name: String, shape: Vec<i64> },
    #[error("`{0}` is not a sparse table of this adapter (mark it with `sparse_table` first)")]
    NotSparse(String),
    #[error("no ids for sparse table `{0}` in this step: call `batch_ids` before `pull`")]
    MissingIds(String),
    #[error("sparse table `{table}`: id {id} is out of range for its {rows} rows")]
    IdOutOfRange { table: String, id: i64, rows: i64 },
    #[error("the VarStore has no variables that require gradients: nothing to train")]
    NothingToTrain,
    #[error(
        "`{name}` is not a contiguous f32 CPU tensor any more ({detail}); build the adapter again after moving or converting the VarStore"
    )]
    Layout { name: String, detail: String },
    #[error(
        "Transfer::Direct reads and writes host memory, but the VarStore is on {0:?}: use Transfer::Staged"
    )]
    DirectNeedsCpu(Device),
}

/// Number of CUDA devices libtorch can use (0 without CUDA, or without a GPU).
pub fn cuda_device_count() -> usize {
    if ::tch::Cuda::is_available() { ::tch::Cuda::device_count().max(0) as usize } else { 0 }
}

/// The device worker `index` trains on: CUDA device `index % count` when libtorch sees CUDA
/// devices, else the CPU. With several workers on one machine this spreads them over its GPUs.
pub fn device_for_worker(index: u32) -> Device {
    match cuda_device_count() {
        0 => Device::Cpu,
        n => Device::Cuda(index as usize % n),
    }
}
