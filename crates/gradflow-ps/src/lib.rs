//! gradflow's parameter server: one shard of the model and the optimizer that updates it.
//!
//! Read it in this order:
//! - [`config`]: the settings of a shard and their defaults.
//! - [`server`]: [`start`] binds the gRPC port (and optionally a `/metrics` port), spawns the
//!   task that drops silent workers, and returns a handle that shuts everything down.
//! - [`service`]: the RPC handlers of `proto/gradflow.proto`.
//! - [`coord`]: worker liveness and the sync-step / async-staleness rules.
//! - [`push`]: a push is validated whole before any of it is applied.
//! - [`model`]: the parameters this shard holds, dense pieces and sparse rows, and the math.
//! - [`tasks`]: dynamic data sharding, the queue of data tasks shard 0 hands out.
//! - [`checkpointing`]: when a shard writes checkpoints, and restoring one at start; `peer`:
//!   shard 0 asking the other shards for a checkpoint.
//! - [`metrics`]: Prometheus counters.
//! - [`error`]: [`PsError`] and its mapping to gRPC status codes.

pub mod checkpointing;
pub mod config;
pub mod coord;
pub mod error;
pub mod link;
pub mod metrics;
pub mod model;
mod peer;
pub mod push;
pub mod server;
pub mod service;
pub mod tasks;

pub use checkpointing::ENV_FAULT_STALL_UPLOAD;
pub use config::{CheckpointConfig, ConfigError, Restore, ServerConfig, ServerSettings};
pub use error::PsError;
pub use server::{RunningServer, serve_until, start};
