//! The launcher's errors.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum LaunchError {
    #[error("job file {}: {message}", path.display())]
    JobFile { path: PathBuf, message: String },
    #[error("environment: {0}")]
    Environment(String),
    #[error("{0}")]
    Process(String),
    #[error("job failed: {0}")]
    JobFailed(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    /// The Kubernetes backend failed (see [`KubernetesError`](crate::kubernetes::KubernetesError)).
    #[error(transparent)]
    Kubernetes(#[from] crate::kubernetes::KubernetesError),
}
