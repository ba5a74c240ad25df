//! The error type of this crate.

use thiserror::Error;

/// Why a model could not be loaded or a request not answered.
///
/// The messages of wrapped errors are part of the variant's own message, so none of them is a
/// `#[source]`: a chain printed with `{:#}` would say each twice.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The checkpoint could not be found, read or verified.
    #[error("{0}")]
    Checkpoint(gradflow_checkpoint::CheckpointError),
    /// The checkpoint was written without what prediction needs (by a gradflow before
    /// checkpoints carried it, or by a trainer that did not declare it).
    #[error(
        "checkpoint `{checkpoint}` has no serving info (the model config, input columns and scaling \
         that prediction needs): it was written by a gradflow older than this, or by a trainer that \
         did not declare it; train the job again with this version"
    )]
    NoServingInfo { checkpoint: String },
    /// The serving info of a checkpoint is not usable by this build, or disagrees with the
    /// checkpoint's parameters.
    #[error("checkpoint `{checkpoint}`: {reason}")]
    BadServingInfo { checkpoint: String, reason: String },
    /// A row of input does not fit the model's columns; `field` names the column.
    #[error("{0}")]
    Input(#[from] InputError),
    /// A data file could not be read.
    #[error("{0}")]
    Data(gradflow_data::DataError),
    /// The model refused a batch (an internal inconsistency: decoded rows always fit).
    #[error("model: {0}")]
    Model(gradflow_models::ModelError),
    /// A batch of several requests failed inside the forward pass; each of them gets this.
    #[error("prediction failed: {0}")]
    Internal(String),
    /// The server is stopping and no longer answers.
    #[error("the server is stopping")]
    Stopped,
}

impl From<gradflow_checkpoint::CheckpointError> for ServeError {
    fn from(e: gradflow_checkpoint::CheckpointError) -> Self {
        ServeError::Checkpoint(e)
    }
}

impl From<gradflow_data::DataError> for ServeError {
    fn from(e: gradflow_data::DataError) -> Self {
        ServeError::Data(e)
    }
}

impl From<gradflow_models::ModelError> for ServeError {
    fn from(e: gradflow_models::ModelError) -> Self {
        ServeError::Model(e)
    }
}

/// A row that does not fit the model's input: the row's index, the column, and what was
/// expected against what was found.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("instance {row}: {problem}")]
pub struct InputError {
    /// 0-based index of the row in its request or file.
    pub row: usize,
    /// The column at fault.
    pub field: String,
    /// What is wrong, naming the column.
    pub problem: String,
}
