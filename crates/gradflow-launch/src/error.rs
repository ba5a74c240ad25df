//! The launcher's errors.

use gradflow_job::JobError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LaunchError {
    /// The job file or the job (see [`JobError`]).
    #[error(transparent)]
    Job(#[from] JobError),
    #[error("{0}")]
    Process(String),
    #[error("job failed: {0}")]
    JobFailed(String),
    /// Another run of the job holds its output folder or checkpoint root.
    #[error("{0}")]
    InUse(String),
    /// A run without `restore` into a checkpoint root that holds an earlier run's checkpoints.
    #[error("{0}")]
    CheckpointRootUsed(String),
    /// More local processes than the machine can run well, without `allow_oversubscribe`.
    #[error("{0}")]
    TooManyProcesses(String),
    /// The data does not fit the job (files, columns, the model's features), found before any
    /// process started.
    #[error("data: {0}")]
    Data(String),
    /// A local job's state record or log files that are missing or unreadable.
    #[error("{0}")]
    State(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    /// The Kubernetes backend failed (see [`KubernetesError`](crate::kubernetes::KubernetesError)).
    #[error(transparent)]
    Kubernetes(#[from] crate::kubernetes::KubernetesError),
}
