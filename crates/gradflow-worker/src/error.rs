//! The worker library's errors.

use gradflow_proto::refusal;
use thiserror::Error;
use tonic::Code;

use crate::config::ConfigError;

/// What went wrong talking to the parameter servers.
#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("invalid worker configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot reach parameter server {shard} at {addr}: {message}")]
    Unreachable { shard: usize, addr: String, message: String },
    /// The server refused the request; `status` carries its code and message.
    #[error("parameter server {shard} ({addr}) refused {rpc}: {}", status.message())]
    Server { shard: usize, addr: String, rpc: &'static str, status: tonic::Status },
    #[error("no model declared: call Worker::declare first")]
    NotDeclared,
    #[error("invalid model spec: {0}")]
    InvalidSpec(String),
    #[error("unknown dense tensor `{0}`")]
    UnknownTensor(String),
    #[error("unknown sparse table `{0}`")]
    UnknownTable(String),
    #[error("`{name}`: expected {expected} values, got {got}")]
    Length { name: String, expected: usize, got: usize },
    #[error("protocol error from parameter server {shard}: {message}")]
    Protocol { shard: usize, message: String },
    /// The update of `step` would have made the model on a shard non-finite (NaN or
    /// infinity): that shard refuses every request from then on, so the job cannot go on.
    /// Permanent: retrying cannot help.
    #[error("parameter server {shard} ({addr}) stopped training: {message}")]
    ModelNotFinite { shard: usize, addr: String, step: u64, message: String },
}

impl WorkerError {
    /// The gRPC status code of a server refusal, if this is one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            WorkerError::Server { status, .. } => Some(status.code()),
            _ => None,
        }
    }

    /// Whether retrying the call, or restarting the worker, cannot help: the servers stopped
    /// the job (see [`WorkerError::ModelNotFinite`]).
    pub fn is_permanent(&self) -> bool {
        matches!(self, WorkerError::ModelNotFinite { .. })
    }

    /// Whether the servers ended training early (early stopping): this worker's training is
    /// over, which is no failure. The version training ended with, when so.
    pub fn finished_at(&self) -> Option<u64> {
        match self {
            WorkerError::Server { status, .. }
                if refusal::code(status) == Some(refusal::RefusalCode::Finished) =>
            {
                Some(refusal::version(status).unwrap_or(0))
            }
            _ => None,
        }
    }

    /// Whether the server refused because this worker's data task (dynamic sharding) was
    /// handed to another worker; ask for a new task with [`Worker::next_task`](crate::Worker::next_task).
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, WorkerError::Server { status, .. } if refusal::lease_lost(status).is_some())
    }

    /// The step a server asks this worker to continue from: after it fell behind (the servers
    /// moved on without it) or after the servers were restored from a checkpoint.
    pub(crate) fn rewind_target(&self) -> Option<u64> {
        match self {
            WorkerError::Server { status, .. } if status.code() == Code::FailedPrecondition => {
                refusal::version(status)
            }
            _ => None,
        }
    }
}
