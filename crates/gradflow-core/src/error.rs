//! Errors raised by spec validation and the math kernels.

use thiserror::Error;

/// Something in a model spec or a kernel call was not what it had to be.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CoreError {
    /// The spec is malformed (empty name, zero dimension, duplicate name, bad hyperparameter...).
    #[error("invalid model spec: {0}")]
    InvalidSpec(String),
    /// A hyperparameter is out of its valid range.
    #[error("invalid optimizer setting for `{tensor}`: {message}")]
    InvalidOptimizer { tensor: String, message: String },
    /// Two specs differ; the message names the first difference.
    #[error("model spec differs from the one already declared: {0}")]
    SpecMismatch(String),
}
