//! Server-side optimizers (STUB: being written by a helper).

use serde::{Deserialize, Serialize};

use crate::CoreError;

/// An optimizer and its hyperparameters; names follow PyTorch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerConfig {
    Sgd { lr: f64 },
}

impl OptimizerConfig {
    pub fn sgd(lr: f64) -> Self {
        OptimizerConfig::Sgd { lr }
    }
    pub fn validate(&self, _tensor: &str) -> Result<(), CoreError> {
        todo!()
    }
    /// Per-element state arrays this optimizer keeps (0 for plain SGD, 2 for Adam...).
    pub fn num_slots(&self) -> usize {
        todo!()
    }
    /// Sets the initial optimizer state; `state.len() == num_slots() * n`.
    pub fn init_state(&self, _state: &mut [f32]) {
        todo!()
    }
    /// One update in place. `state` is slot-major: slot `s` is `state[s*n..(s+1)*n]` with
    /// `n = param.len()`. `t` is the 1-based count of updates this tensor or row has had.
    pub fn step(&self, _param: &mut [f32], _grad: &[f32], _state: &mut [f32], _t: u64) {
        todo!()
    }
}
