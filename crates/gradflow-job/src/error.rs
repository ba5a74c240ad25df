//! What can be wrong with a job: its file, its values, the environment a process of it was
//! started with.
//!
//! Messages of wrapped errors are written out in the variant's own message, so none of them
//! is a `#[source]`: a chain printed with `{:#}` would say each twice.

use std::path::PathBuf;

use gradflow_core::SettingsError;
use gradflow_models::ModelError;
use gradflow_proto::tls::TlsError;
use thiserror::Error;

/// A job that cannot be read or cannot run; the message names the file, the key or the
/// variable.
#[derive(Debug, Error)]
pub enum JobError {
    /// The job file at `path` cannot be read, or is not a valid job: `error` says why.
    #[error("job file {}: {error}", path.display())]
    File { path: PathBuf, error: Box<JobError> },
    /// A file could not be read.
    #[error("{0}")]
    Io(std::io::Error),
    /// Not TOML, or not the shape of a job: an unknown key, a value of the wrong type. The
    /// message names the key and its line.
    #[error("{0}")]
    Toml(toml::de::Error),
    /// A value that parses but makes no sense: `key` names it (`train.batch_size`).
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    /// A server setting (`[server]`, `[checkpoint]`, `restore`).
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// The `[embedding]` section: an option that cannot apply (the message names the key).
    #[error(transparent)]
    Embedding(#[from] gradflow_core::embedding::EmbeddingError),
    /// The `[tls]` section: a key missing or the wrong kind of file (the message names both).
    #[error("{0}")]
    Tls(TlsError),
    /// The `[model]` section describes no model that can be built.
    #[error("model: {0}")]
    Model(ModelError),
    /// A process of a job without a built-in model (it runs its own trainer,
    /// `worker.command`) was asked for the model.
    #[error("environment: the job has no [model]: its workers run their own trainer (worker.command)")]
    NoModel,
    /// The environment contract was not met: a variable missing or malformed
    /// (`GRADFLOW_CLUSTER_SPEC`, `GRADFLOW_TOKEN`, a token file).
    #[error("environment: {0}")]
    Environment(String),
    /// The job token given to this process cannot be used.
    #[error("environment: {0}")]
    Token(#[from] gradflow_proto::auth::TokenSourceError),
}

// Not `#[from]`, which would also make the TLS error a `source`, said twice in a chain.
impl From<TlsError> for JobError {
    fn from(e: TlsError) -> Self {
        JobError::Tls(e)
    }
}
