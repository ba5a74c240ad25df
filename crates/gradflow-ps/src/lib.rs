//! gradflow's parameter server: one shard of the model and the optimizer that updates it.
//!
//! One core, two transports. [`shard`] is the shard core: its state and everything a request
//! does to it, in domain types, with no protobuf and no sockets. The gRPC service
//! ([`service`]) and the tensor link ([`link`]) are sibling adapters over it: each decodes its
//! wire format once (a push into a [`push::Push`], a pull into names and ids), calls the
//! [`shard::Shard`], and encodes the answer.
//!
//! **What happens when a push arrives: `src/shard.rs`, [`shard::Shard::push`].**
//!
//! Read it in this order:
//! - [`config`]: the settings of a shard and their defaults.
//! - [`server`]: [`start`] binds the gRPC port, the tensor link and optionally a `/metrics`
//!   port, spawns the task that drops silent workers, and returns a handle that shuts
//!   everything down.
//! - [`shard`]: the core: pushes, pulls, the step protocol, declaring the model, data tasks,
//!   scoring holds and selection scores (`keep_best`, early stopping), checkpoint triggering;
//!   and the request metrics, recorded there only.
//! - [`push`]: a push as the core takes it, and its validation: checked whole before any of
//!   it is applied.
//! - [`coord`]: worker liveness, the sync-step / async-staleness rules, and where training
//!   ends when it stops early.
//! - [`model`]: the parameters this shard holds, dense pieces and sparse rows, and the update
//!   math beside them (accumulating a push, applying a step).
//! - [`service`]: the gRPC adapter, one handler per RPC of `proto/gradflow.proto`.
//! - [`link`]: the tensor-link adapter, pushes and pulls over plain TCP.
//! - [`encoding`]: the compact wire encodings of values (f16, bf16), decoded by both adapters.
//! - [`tasks`]: dynamic data sharding, the queue of data tasks shard 0 hands out.
//! - [`checkpointing`]: when a shard writes checkpoints, and restoring one at start; `peer`:
//!   shard 0 asking the other shards for a checkpoint.
//! - [`metrics`]: the Prometheus counters.
//! - [`error`]: [`PsError`] and its mapping to gRPC status codes.

pub mod checkpointing;
pub mod config;
pub mod coord;
pub mod encoding;
pub mod error;
pub mod link;
pub mod metrics;
pub mod model;
mod peer;
pub mod push;
pub mod server;
pub mod service;
pub mod shard;
pub mod table;
pub mod tasks;

pub use checkpointing::ENV_FAULT_STALL_UPLOAD;
pub use config::{CheckpointConfig, ConfigError, Restore, ServerConfig, ServerSettings};
pub use error::PsError;
pub use server::{RunningServer, serve_until, start};
