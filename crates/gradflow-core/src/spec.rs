//! The model spec: the named dense tensors and sparse embedding tables a job trains.
//!
//! The first worker declares the spec to every shard. A later worker declaring the same spec is
//! a no-op; a different one is refused with the first difference ([`ModelSpec::first_difference`]).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::{CoreError, Initializer, OptimizerConfig};

/// Everything a parameter server needs to know to hold a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Dense tensors, in declaration order. Names are unique across dense and sparse.
    #[serde(default)]
    pub dense: Vec<DenseSpec>,
    /// Sparse embedding tables, in declaration order.
    #[serde(default)]
    pub sparse: Vec<SparseSpec>,
}

/// A dense `f32` tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenseSpec {
    pub name: String,
    /// Shape, outermost first. A scalar has shape `[]`.
    pub shape: Vec<u64>,
    pub init: Initializer,
    pub optimizer: OptimizerConfig,
}

/// A sparse embedding table: rows of `dim` floats keyed by `u64` ids, created on first touch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparseSpec {
    pub name: String,
    /// Floats per row.
    pub dim: u32,
    pub init: Initializer,
    pub optimizer: OptimizerConfig,
}

impl DenseSpec {
    /// Number of elements (1 for a scalar). Saturates at `u64::MAX` where the product
    /// overflows (never wraps): [`ModelSpec::validate`] refuses such shapes.
    pub fn numel(&self) -> u64 {
        self.checked_numel().unwrap_or(u64::MAX)
    }

    /// Number of elements, or `None` when the product of the shape overflows `u64`.
    pub fn checked_numel(&self) -> Option<u64> {
        self.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d))
    }
}

/// The most elements a dense tensor may have: its values and every optimizer slot, counted
/// in bytes, must fit in a `u64` (and in a 64-bit address space) with room to add them up.
pub const MAX_DENSE_ELEMENTS: u64 = 1 << 56;

impl ModelSpec {
    /// Checks names, shapes and hyperparameters.
    pub fn validate(&self) -> Result<(), CoreError> {
        let mut names = HashSet::new();
        let all_names = self.dense.iter().map(|d| &d.name).chain(self.sparse.iter().map(|s| &s.name));
        for name in all_names {
            if name.is_empty() {
                return Err(CoreError::InvalidSpec("a tensor or table has an empty name".into()));
            }
            if !names.insert(name.as_str()) {
                return Err(CoreError::InvalidSpec(format!("the name `{name}` is used twice")));
            }
        }
        for d in &self.dense {
            if d.shape.contains(&0) {
                return Err(CoreError::InvalidSpec(format!(
                    "dense tensor `{}` has a zero dimension in shape {:?}",
                    d.name, d.shape
                )));
            }
            match d.checked_numel() {
                Some(n) if n <= MAX_DENSE_ELEMENTS => {}
                n => {
                    return Err(CoreError::InvalidSpec(format!(
                        "dense tensor `{}` of shape {:?} is too large: {} elements; expected at most {MAX_DENSE_ELEMENTS}",
                        d.name,
                        d.shape,
                        n.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string())
                    )));
                }
            }
            d.optimizer.validate(&d.name)?;
            d.init.validate(&d.name)?;
        }
        for s in &self.sparse {
            if s.dim == 0 {
                return Err(CoreError::InvalidSpec(format!("sparse table `{}` has dim 0", s.name)));
            }
            s.optimizer.validate(&s.name)?;
            s.init.validate(&s.name)?;
        }
        Ok(())
    }

    /// Looks up a dense tensor by name.
    pub fn dense_index(&self, name: &str) -> Option<usize> {
        self.dense.iter().position(|d| d.name == name)
    }

    /// Looks up a sparse table by name.
    pub fn sparse_index(&self, name: &str) -> Option<usize> {
        self.sparse.iter().position(|s| s.name == name)
    }

    /// Total bytes of dense parameters (saturating: a spec that passed
    /// [`validate`](Self::validate) never reaches `u64::MAX`).
    pub fn dense_bytes(&self) -> u64 {
        self.dense.iter().fold(0u64, |sum, d| sum.saturating_add(d.numel().saturating_mul(4)))
    }

    /// `None` when `other` is the same spec, else a sentence naming the first difference.
    pub fn first_difference(&self, other: &ModelSpec) -> Option<String> {
        if self.dense.len() != other.dense.len() {
            return Some(format!(
                "{} dense tensors declared before, {} now",
                self.dense.len(),
                other.dense.len()
            ));
        }
        for (a, b) in self.dense.iter().zip(&other.dense) {
            if a.name != b.name {
                return Some(format!("dense tensor `{}` declared before, `{}` now", a.name, b.name));
            }
            if a.shape != b.shape {
                return Some(format!(
                    "dense tensor `{}`: shape {:?} before, {:?} now",
                    a.name, a.shape, b.shape
                ));
            }
            if a.init != b.init {
                return Some(format!(
                    "dense tensor `{}`: initializer {:?} before, {:?} now",
                    a.name, a.init, b.init
                ));
            }
            if a.optimizer != b.optimizer {
                return Some(format!(
                    "dense tensor `{}`: optimizer {:?} before, {:?} now",
                    a.name, a.optimizer, b.optimizer
                ));
            }
        }
        if self.sparse.len() != other.sparse.len() {
            return Some(format!(
                "{} sparse tables declared before, {} now",
                self.sparse.len(),
                other.sparse.len()
            ));
        }
        for (a, b) in self.sparse.iter().zip(&other.sparse) {
            if a.name != b.name {
                return Some(format!("sparse table `{}` declared before, `{}` now", a.name, b.name));
            }
            if a.dim != b.dim {
                return Some(format!("sparse table `{}`: dim {} before, {} now", a.name, a.dim, b.dim));
            }
            if a.init != b.init {
                return Some(format!(
                    "sparse table `{}`: initializer {:?} before, {:?} now",
                    a.name, a.init, b.init
                ));
            }
            if a.optimizer != b.optimizer {
                return Some(format!(
                    "sparse table `{}`: optimizer {:?} before, {:?} now",
                    a.name, a.optimizer, b.optimizer
                ));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Found by the `model_spec` fuzz target: a hyperparameter written with more digits than an
    // f64 holds read back one ulp off after a JSON round trip (serde_json's default float
    // parser is not exact), so a job could refuse its own checkpoint's spec as "different".
    #[test]
    fn hyperparameters_survive_json_exactly() {
        let text = format!(r#"{{"kind": "adam", "lr": 5.01, "beta2": 0.9{}199}}"#, "1".repeat(70));
        let config: OptimizerConfig = serde_json::from_str(&text).unwrap();
        let back: OptimizerConfig = serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
        assert_eq!(back, config);
        for x in [0.1f64, 1.0 / 3.0, 0.9111111111111111, 1e-300, 5e-324, f64::MAX] {
            let back: f64 = serde_json::from_str(&serde_json::to_string(&x).unwrap()).unwrap();
            assert_eq!(back.to_bits(), x.to_bits(), "{x:e}");
        }
    }

    fn spec() -> ModelSpec {
        ModelSpec {
            dense: vec![DenseSpec {
                name: "w".into(),
                shape: vec![3, 4],
                init: Initializer::Zeros,
                optimizer: OptimizerConfig::sgd(0.1),
            }],
            sparse: vec![SparseSpec {
                name: "emb".into(),
                dim: 8,
                init: Initializer::Zeros,
                optimizer: OptimizerConfig::sgd(0.1),
            }],
        }
    }

    #[test]
    fn same_spec_has_no_difference() {
        assert_eq!(spec().first_difference(&spec()), None);
    }

    #[test]
    fn difference_names_the_tensor_and_both_shapes() {
        let mut other = spec();
        other.dense[0].shape = vec![3, 5];
        let msg = spec().first_difference(&other).unwrap();
        assert!(msg.contains("`w`") && msg.contains("[3, 4]") && msg.contains("[3, 5]"), "{msg}");
    }

    #[test]
    fn duplicate_names_are_refused() {
        let mut s = spec();
        s.sparse[0].name = "w".into();
        assert!(matches!(s.validate(), Err(CoreError::InvalidSpec(m)) if m.contains("`w`")));
    }

    #[test]
    fn shapes_too_large_to_count_are_refused_by_name() {
        for (shape, says) in [
            (vec![4294967296, 4294967296], "more than 2^64"),
            (vec![1 << 57], "144115188075855872 elements"),
            (vec![u64::MAX, 2], "more than 2^64"),
        ] {
            let mut s = spec();
            s.dense[0].shape = shape.clone();
            let e = s.validate().unwrap_err().to_string();
            assert!(e.contains("`w`") && e.contains(says) && e.contains("at most"), "{shape:?}: {e}");
            assert_eq!(s.dense[0].numel(), s.dense[0].checked_numel().unwrap_or(u64::MAX), "never wraps");
        }
        let mut s = spec();
        s.dense[0].shape = vec![1_000_000_000_000];
        s.validate().unwrap();
        assert_eq!(s.dense_bytes(), 4_000_000_000_000);
    }

    #[test]
    fn zero_dimension_is_refused() {
        let mut s = spec();
        s.dense[0].shape = vec![3, 0];
        assert!(s.validate().is_err());
    }
}
