//! Core types and math shared by every gradflow process.
//!
//! - [`spec`]: what a model is made of (dense tensors and sparse embedding tables), and how
//!   two specs are compared when a second worker declares one.
//! - [`init`]: deterministic initializers. A value depends only on the seed and its position,
//!   so any shard can initialize any slice of a tensor, or any row of a table, on its own.
//! - [`optim`]: the server-side optimizers (SGD, Adagrad, Adam, AdamW, FTRL) as kernels over
//!   flat `f32` slices, shared by dense partitions and sparse rows.
//! - [`partition`]: where each piece of the model lives, a pure function of the spec and the
//!   number of server shards.
//! - [`mode`]: synchronous or asynchronous training.
//! - [`settings`]: what a job says about its servers (`[server]`, `[checkpoint]`, `restore`),
//!   defined once for the job file and the server.
//! - `store` (with the `object-store` feature): a cloud object store built from its URL, for
//!   checkpoints and training data alike.
//! - [`error`]: the error type of this crate.

pub mod embedding;
pub mod error;
pub mod init;
pub mod mode;
pub mod optim;
pub mod partition;
pub mod settings;
pub mod spec;
#[cfg(feature = "object-store")]
pub mod store;

pub use error::CoreError;
pub use init::Initializer;
pub use mode::Mode;
pub use optim::{Grad, NonFiniteUpdate, OptimizerConfig};
pub use partition::{DEFAULT_PARTITION_BYTES, DensePiece, Placement};
pub use settings::{CheckpointConfig, Metric, Restore, ServerSettings, SettingsError};
pub use spec::{DenseSpec, ModelSpec, SparseSpec};
