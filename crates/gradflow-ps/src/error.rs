//! The server's errors, and the one place they become gRPC statuses.

use thiserror::Error;
use tonic::{Code, Status};

// The metadata keys a refusal carries are protocol facts, defined once in gradflow-proto.
use gradflow_proto::refusal::{self, RefusalCode};
pub use gradflow_proto::refusal::{LEASE_LOST_METADATA, NON_FINITE_METADATA, VERSION_METADATA};

/// Why a request was refused. Every refused request leaves the model as it was, but for the
/// step whose update made it non-finite ([`PsError::NonFiniteModel`]): that update is not
/// undone, and the shard serves the model no more.
#[derive(Debug, Error)]
pub enum PsError {
    #[error("no model declared yet: a worker must call DeclareSpec first")]
    NotDeclared,
    #[error("{0}")]
    InvalidSpec(String),
    #[error("{0}")]
    SpecMismatch(String),
    #[error("unknown dense tensor `{0}`")]
    UnknownTensor(String),
    #[error("unknown sparse table `{0}`")]
    UnknownTable(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error(
        "non-finite gradient (NaN or infinity) in `{0}`; refused (set reject_non_finite = false to allow)"
    )]
    NonFinite(String),
    #[error("worker {worker} is out of range: this job has {num_workers} workers")]
    UnknownWorker { worker: u32, num_workers: u32 },
    #[error("push for step {pushed} refused: the model is already at step {current}")]
    StaleStep { pushed: u64, current: u64 },
    #[error(
        "request for step {requested} refused: the model was restored from a checkpoint at step {current}; continue from there"
    )]
    Rewind { requested: u64, current: u64 },
    #[error("checkpoints are not configured on this server (checkpoint.url)")]
    NoCheckpoints,
    #[error(
        "a checkpoint of step {requested} was asked for, but this shard is at step {current} already; ask for a later step"
    )]
    CheckpointPassed { requested: u64, current: u64 },
    #[error("worker {worker} already pushed for step {step}")]
    DuplicatePush { worker: u32, step: u64 },
    #[error("timed out after {0:?} waiting for the model to reach the requested step")]
    WaitTimeout(std::time::Duration),
    #[error(
        "worker {worker} no longer holds data task lease {lease}: it was handed to another worker after this one stopped heartbeating; ask for a new task"
    )]
    LeaseLost { worker: u32, lease: u64 },
    #[error("dynamic data sharding is served by shard 0; this is shard {0}")]
    NotTaskShard(u32),
    #[error("no data tasks declared yet: a worker must call DeclareTasks first")]
    NoTasks,
    /// A checkpoint could not be read, written or used (the store's error, as it is).
    #[error("{0}")]
    Checkpoint(String),
    /// Checkpoints this run was asked for did not complete.
    #[error("{} checkpoint(s) failed: {}", .0.len(), .0.join("; "))]
    CheckpointsFailed(Vec<String>),
    /// An address could not be bound (in use, not this machine's).
    #[error("cannot listen {what} on {addr}: {source}")]
    Bind { what: &'static str, addr: std::net::SocketAddr, source: std::io::Error },
    #[error("server is shutting down")]
    ShuttingDown,
    /// Early stopping ended training with the model of step `at`: nothing later is trained.
    #[error(
        "training ended early (early stopping) with the model of step {at}; step {requested} will not be trained"
    )]
    Finished { at: u64, requested: u64 },
    #[error("internal error: {0}")]
    Internal(String),
    #[error(
        "the update of step {step} would have made `{tensor}` ({at}) non-finite: {detail}; this shard \
         refuses every push and pull from now on. Restart from the last checkpoint with a lower \
         learning rate, or clip gradients (clip_norm in the optimizer)"
    )]
    NonFiniteModel { tensor: String, at: String, step: u64, detail: String },
    #[error("model too large: {0}")]
    ModelTooLarge(String),
    /// The job's `[embedding]` section does not fit the declared model.
    #[error(transparent)]
    Embedding(#[from] gradflow_core::embedding::EmbeddingError),
}

impl From<gradflow_checkpoint::CheckpointError> for PsError {
    fn from(e: gradflow_checkpoint::CheckpointError) -> PsError {
        PsError::Checkpoint(e.to_string())
    }
}

impl From<PsError> for Status {
    fn from(e: PsError) -> Status {
        let code = match &e {
            PsError::NotDeclared
            | PsError::SpecMismatch(_)
            | PsError::StaleStep { .. }
            | PsError::Rewind { .. }
            | PsError::NoCheckpoints
            | PsError::LeaseLost { .. }
            | PsError::NotTaskShard(_)
            | PsError::NoTasks => Code::FailedPrecondition,
            // Lost a race with training: ask again, for a later step.
            PsError::CheckpointPassed { .. } => Code::Aborted,
            PsError::DuplicatePush { .. } => Code::AlreadyExists,
            PsError::UnknownTensor(_) | PsError::UnknownTable(_) => Code::NotFound,
            PsError::InvalidSpec(_)
            | PsError::InvalidArgument(_)
            | PsError::NonFinite(_)
            | PsError::UnknownWorker { .. }
            | PsError::Embedding(_) => Code::InvalidArgument,
            PsError::WaitTimeout(_) => Code::DeadlineExceeded,
            PsError::Checkpoint(_) | PsError::CheckpointsFailed(_) | PsError::Bind { .. } => {
                Code::FailedPrecondition
            }
            PsError::ShuttingDown => Code::Unavailable,
            PsError::Finished { .. } => Code::OutOfRange,
            PsError::Internal(_) => Code::Internal,
            PsError::NonFiniteModel { .. } => Code::FailedPrecondition,
            PsError::ModelTooLarge(_) => Code::ResourceExhausted,
        };
        let mut status = Status::new(code, e.to_string());
        match e {
            PsError::StaleStep { current, .. }
            | PsError::Rewind { current, .. }
            | PsError::CheckpointPassed { current, .. } => {
                // Lets a worker that fell behind resynchronise without another round trip.
                refusal::set_u64(&mut status, VERSION_METADATA, current);
            }
            PsError::LeaseLost { lease, .. } => refusal::set_u64(&mut status, LEASE_LOST_METADATA, lease),
            PsError::NonFiniteModel { step, .. } => refusal::set_u64(&mut status, NON_FINITE_METADATA, step),
            // UNAVAILABLE is otherwise worth retrying: this one is not.
            PsError::ShuttingDown => refusal::set_code(&mut status, RefusalCode::ShuttingDown),
            PsError::Finished { at, .. } => {
                refusal::set_code(&mut status, RefusalCode::Finished);
                refusal::set_u64(&mut status, VERSION_METADATA, at);
            }
            _ => {}
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_carry_their_typed_facts() {
        let s = Status::from(PsError::ShuttingDown);
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(refusal::code(&s), Some(RefusalCode::ShuttingDown));
        let s = Status::from(PsError::StaleStep { pushed: 3, current: 5 });
        assert_eq!(
            (s.code(), refusal::version(&s), refusal::code(&s)),
            (Code::FailedPrecondition, Some(5), None)
        );
        let s = Status::from(PsError::LeaseLost { worker: 1, lease: 9 });
        assert_eq!(refusal::lease_lost(&s), Some(9));
        let s = Status::from(PsError::NonFiniteModel {
            tensor: "w".into(),
            at: "0".into(),
            step: 4,
            detail: "NaN".into(),
        });
        assert_eq!(refusal::non_finite_step(&s), Some(4));
        let s = Status::from(PsError::Finished { at: 7, requested: 8 });
        assert_eq!(
            (s.code(), refusal::code(&s), refusal::version(&s)),
            (Code::OutOfRange, Some(RefusalCode::Finished), Some(7))
        );
    }
}
