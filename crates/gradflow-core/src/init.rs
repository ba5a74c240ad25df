//! Deterministic initializers (STUB: being written by a helper).

use serde::{Deserialize, Serialize};

use crate::CoreError;

/// How the values of a dense tensor or of a new sparse row start out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Initializer {
    Zeros,
    Constant { value: f32 },
    Uniform { low: f32, high: f32, #[serde(default)] seed: u64 },
    Normal { mean: f32, std: f32, #[serde(default)] seed: u64 },
    XavierUniform { #[serde(default = "one")] gain: f32, #[serde(default)] seed: u64 },
    XavierNormal { #[serde(default = "one")] gain: f32, #[serde(default)] seed: u64 },
}

fn one() -> f32 {
    1.0
}

impl Initializer {
    pub fn validate(&self, _name: &str) -> Result<(), CoreError> {
        todo!()
    }
    /// Fills `out` with elements `[offset, offset + out.len())` of the flattened tensor `name`
    /// of shape `shape`. Values depend only on (seed, name, element index).
    pub fn fill_dense(&self, _name: &str, _shape: &[u64], _offset: u64, _out: &mut [f32]) {
        todo!()
    }
    /// Fills a new row of sparse table `name` for `id` (`out.len()` is the row dim).
    /// Values depend only on (seed, name, id, column).
    pub fn fill_row(&self, _name: &str, _id: u64, _out: &mut [f32]) {
        todo!()
    }
}
