//! gradflow's worker library: how a Rust trainer talks to the parameter servers.
//!
//! A [`Worker`] connects to every server shard, declares the model, and then, step after
//! step, pulls parameters, stages gradients and sends them. It computes where each dense piece
//! and each sparse row lives from the spec alone, and talks to all shards concurrently.
//!
//! ```no_run
//! use gradflow_core::{DenseSpec, Initializer, ModelSpec, OptimizerConfig, SparseSpec};
//! use gradflow_worker::{Worker, WorkerConfig};
//!
//! # async fn train() -> Result<(), gradflow_worker::WorkerError> {
//! let config = WorkerConfig::new(["127.0.0.1:7000", "127.0.0.1:7001"], /* worker */ 0);
//! let mut worker = Worker::connect(config).await?;
//! worker
//!     .declare(ModelSpec {
//!         dense: vec![DenseSpec {
//!             name: "w".into(),
//!             shape: vec![4],
//!             init: Initializer::Zeros,
//!             optimizer: OptimizerConfig::adagrad(0.1),
//!         }],
//!         sparse: vec![SparseSpec {
//!             name: "emb".into(),
//!             dim: 8,
//!             init: Initializer::Normal { mean: 0.0, std: 0.01, seed: 1 },
//!             optimizer: OptimizerConfig::adagrad(0.1),
//!         }],
//!     })
//!     .await?;
//! let mut dense = vec![Vec::new()];
//! let mut rows = Vec::new();
//! for _ in 0..100 {
//!     worker.pull_all_dense(&mut dense).await?; // sync mode: waits for this step's model
//!     worker.pull_sparse("emb", &[3, 17], &mut rows).await?;
//!     // ... compute gradients with dense[0] and rows ...
//!     worker.push_dense("w", &[0.1, 0.0, -0.2, 0.3])?;
//!     worker.push_sparse("emb", &[3, 17], &vec![0.01; 16])?;
//!     worker.step().await?; // sends the staged gradients to every shard
//! }
//! worker.leave().await?;
//! # Ok(()) }
//! ```
//!
//! Pushes and pulls go over the tensor link, a plain TCP connection beside gRPC that
//! moves tensor bytes without HTTP/2 or protobuf copies, where the servers offer one (not
//! with TLS; `transport.tensor_link = false` turns it off); everything else is gRPC.
//! Transient failures (a server restarting, a connection reset) are retried with jittered
//! exponential backoff (`transport.max_retries`, `initial_backoff`, `max_backoff`).
//!
//! Modules, by role:
//! - [`config`]: the settings and their defaults; [`error`]: what can go wrong.
//! - [`client`]: the [`Worker`] struct, [`Worker::connect`] and the step it is on.
//! - `connection`: one connection per shard (its gRPC client and, where chosen, its tensor
//!   link); the one place that picks the transport of a push or pull, and the two transports
//!   behind one interface (`connection/link.rs`, `connection/grpc.rs`).
//! - `retry`: which failures are retried and how long to wait; the one retry loop.
//! - `step`: staging gradients by shard and sending them ([`Worker::step`]).
//! - `pull`: pulling dense tensors and sparse rows into the caller's buffers.
//! - `control`: declare, leave, scoring holds, checkpoints, status, heartbeats.
//! - [`tasks`]: dynamic data sharding.
//! - [`init`]: the initializer that matches a framework's initial values.

pub mod client;
pub mod config;
mod connection;
mod control;
pub mod error;
pub mod init;
mod pull;
mod retry;
mod step;
pub mod tasks;
#[cfg(feature = "tch")]
pub mod tch;

pub use client::{StepOutcome, Worker};
pub use config::{ConfigError, WorkerConfig};
pub use control::Selection;
pub use error::WorkerError;
pub use tasks::{DataTask, NextTask, TaskHandout, TaskPiece};
/// gRPC status codes, as [`WorkerError::code`] returns them.
pub use tonic::Code;
