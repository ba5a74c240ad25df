//! The error type of this crate.
//!
//! Models check their inputs once per batch (cheap, linear scans) so that a malformed batch or a
//! pull that does not match the batch is reported as a value the worker can log and skip,
//! instead of an index panic deep inside the math.

use gradflow_core::CoreError;
use thiserror::Error;

/// What went wrong building a model or running it on a batch.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ModelError {
    /// A model config is out of range (zero width layer, no inputs...).
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    /// The spec a model built, or a trainer was given, does not validate.
    #[error(transparent)]
    Spec(#[from] CoreError),
    /// The batch's dense feature count differs from the model's.
    #[error("batch has {got} dense features per example, the model expects {expected}")]
    DenseFeatureCount {
        /// The model's `num_dense`.
        expected: usize,
        /// The batch's `num_dense`.
        got: usize,
    },
    /// A sparse entry names a field the model has no embedding slot for.
    #[error("sparse entry has field {field}, the model has {num_fields} fields (0..{num_fields})")]
    FieldOutOfRange {
        /// The entry's field.
        field: u32,
        /// The model's `num_fields`.
        num_fields: usize,
    },
    /// The batch's arrays are inconsistent with each other.
    #[error("malformed batch: {0}")]
    MalformedBatch(String),
    /// The parameters (or gradients) do not have the layout the spec says.
    #[error("parameters do not match the model spec: {0}")]
    ParamsMismatch(String),
    /// The batch uses an id whose row was not pulled.
    #[error("sparse table `{table}` has no pulled row for id {id}")]
    MissingRow {
        /// Name of the sparse table.
        table: String,
        /// The (bucketed) row id.
        id: u64,
    },
}
