//! The benchmark's errors: what failed, in which scenario's terms.

use thiserror::Error;

/// Why a benchmark could not be measured.
#[derive(Debug, Error)]
pub enum BenchError {
    /// A setting is out of range; the message names it.
    #[error("invalid bench setting: {0}")]
    Config(String),
    /// A file, socket, thread or child process failed.
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    /// The TCP sink process misbehaved (no address, early exit, short reply).
    #[error("TCP sink: {0}")]
    Sink(String),
    /// An in-process parameter server failed to start or stop.
    #[error("parameter server: {0}")]
    Server(#[from] gradflow_ps::PsError),
    /// A worker's request failed.
    #[error("worker: {0}")]
    Worker(#[from] gradflow_worker::WorkerError),
    /// A training job could not be set up or did not finish.
    #[error("training job {job}: {message}")]
    Job { job: String, message: String },
    /// Data for the training runs could not be written or read.
    #[error("data: {0}")]
    Data(#[from] gradflow_data::DataError),
    /// The single-process baseline failed.
    #[error("model: {0}")]
    Model(#[from] gradflow_models::ModelError),
    /// A measuring thread panicked or a runtime could not run.
    #[error("{0}")]
    Internal(String),
}

impl BenchError {
    /// An I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
        let context = context.into();
        move |source| BenchError::Io { context, source }
    }
}
