//! The [`Model`] trait every built-in model implements, and [`build`] from a [`ModelConfig`].

use gradflow_core::ModelSpec;
use gradflow_data::Batch;
use serde::{Deserialize, Serialize};

use crate::{
    Grads, LogisticRegression, LogisticRegressionConfig, ModelError, Params, WideDeep, WideDeepConfig,
};

/// A model whose forward and backward passes run on the CPU over pulled parameters.
///
/// A model is pure compute: it holds its spec and scratch space, never parameter values, so
/// one instance can serve any number of threads and workers. The labels it trains on must be 0
/// or 1 (soft labels in between also work); all losses are the mean log-loss over the batch.
pub trait Model: Send + Sync {
    /// The dense tensors and sparse tables this model reads, in the order of [`Params`].
    fn spec(&self) -> &ModelSpec;

    /// Dense features per example the model expects (`Batch::num_dense`).
    fn num_dense(&self) -> usize;

    /// Fills `out` with the sorted unique row ids each sparse table needs for `batch`, in spec
    /// order, reusing its buffers.
    fn sparse_ids(&self, batch: &Batch, out: &mut Vec<Vec<u64>>);

    /// Which sparse tables [`Model::sparse_ids`] always returns the same ids for: for each
    /// table in spec order, the first table whose ids it always shares (itself when none
    /// before it). A trainer may then find each id once for all of them; [`crate::LocalTrainer`]
    /// keeps their rows together and refuses a batch that breaks the promise. Default: every
    /// table on its own.
    fn shared_ids(&self) -> Vec<usize> {
        (0..self.spec().sparse.len()).collect()
    }

    /// Mean log-loss over the batch. Writes the gradients of that mean loss into `grads`,
    /// reshaping it like `params` and reusing its buffers. `params` must hold the rows of at
    /// least the ids [`Model::sparse_ids`] returned for this batch, with sorted unique ids.
    fn forward_backward(&self, batch: &Batch, params: &Params, grads: &mut Grads) -> Result<f32, ModelError>;

    /// Predicted click probabilities for each example of `batch`, written into `out`.
    fn predict(&self, batch: &Batch, params: &Params, out: &mut Vec<f32>) -> Result<(), ModelError>;
}

/// Which model to build, tagged by `kind` in JSON or TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelConfig {
    /// `kind = "logistic_regression"`: see [`LogisticRegressionConfig`].
    LogisticRegression(LogisticRegressionConfig),
    /// `kind = "wide_deep"`: see [`WideDeepConfig`].
    WideDeep(WideDeepConfig),
}

/// Builds the model a config describes, checking the config and the spec it yields.
pub fn build(config: &ModelConfig) -> Result<Box<dyn Model>, ModelError> {
    Ok(match config {
        ModelConfig::LogisticRegression(c) => Box::new(LogisticRegression::new(c.clone())?),
        ModelConfig::WideDeep(c) => Box::new(WideDeep::new(c.clone())?),
    })
}
