//! [`ServingInfo`]: what using a trained model on raw rows needs beside its parameters.
//!
//! The parameters alone do not say how a row of named columns becomes a model input: which
//! columns are dense and in what order, which are categorical fields, how dense values were
//! scaled during training, and how categorical values became ids. Worker 0 declares this
//! record to the servers, every checkpoint's manifest carries it, and an export writes it into
//! the file's metadata (key `serving`). docs/serving.md defines each field and the arithmetic
//! precisely enough to reimplement a prediction outside gradflow.

use serde::{Deserialize, Serialize};

use crate::{Model, ModelConfig, ModelError};

/// The version of the [`ServingInfo`] layout this build writes and reads.
pub const SERVING_FORMAT_VERSION: u32 = 1;

/// The name of the categorical id hashing gradflow-data implements
/// ([`gradflow_data::categorical_id`]): FNV-1a 64 over the field index (4 bytes,
/// little-endian) and the value's UTF-8 bytes, then the SplitMix64 finalizer.
pub const ID_HASH: &str = "fnv1a64-field-le32-splitmix64";

/// What a predictor needs beside a model's parameters; see the module docs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServingInfo {
    /// Always [`SERVING_FORMAT_VERSION`] when written by this build.
    pub format_version: u32,
    /// The job's name (the model's name when served).
    pub job: String,
    /// The model, as the job file configured it.
    pub model: ModelConfig,
    /// The columns a row has.
    pub input: InputSchema,
    /// The scaling of the dense features, when the job standardized them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standardize: Option<Scaling>,
    /// How a categorical value becomes an id: always [`ID_HASH`] in this version.
    pub id_hash: String,
}

/// The columns of a row, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSchema {
    /// The label column (read when scoring, never needed to predict).
    pub label: String,
    /// The dense columns, in feature order: dense feature `i` is column `dense[i]`.
    pub dense: Vec<String>,
    /// The categorical columns, in field order: field `f` is column `categorical[f]`.
    pub categorical: Vec<String>,
}

/// Dense feature `i` is used as `(x - mean[i]) * (1 / std[i])`, computed in `f64` and rounded
/// to `f32` (see [`gradflow_data::standardize::scale`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scaling {
    /// Mean of each dense feature over the rows the job measured.
    pub mean: Vec<f64>,
    /// Standard deviation (population) of each dense feature; 1 where a feature was constant.
    pub std: Vec<f64>,
}

impl Scaling {
    /// The scaling a fitted standardizer applies.
    pub fn of(s: &gradflow_data::Standardizer) -> Scaling {
        Scaling { mean: s.mean().to_vec(), std: s.std() }
    }
}

impl ServingInfo {
    /// The record for a job `job` training `model` on rows of `input`, scaled by `standardize`.
    pub fn new(
        job: &str,
        model: ModelConfig,
        input: InputSchema,
        standardize: Option<Scaling>,
    ) -> ServingInfo {
        ServingInfo {
            format_version: SERVING_FORMAT_VERSION,
            job: job.to_string(),
            model,
            input,
            standardize,
            id_hash: ID_HASH.to_string(),
        }
    }

    /// Checks that this build can use the record and that it agrees with itself: the version,
    /// the hashing, the dense columns against the model's `num_dense` and the scaling, the
    /// categorical columns against the model's fields, no column named twice. Returns the
    /// model it describes.
    pub fn check(&self) -> Result<Box<dyn Model>, ModelError> {
        let bad = |m: String| Err(ModelError::InvalidConfig(format!("serving info: {m}")));
        if self.format_version != SERVING_FORMAT_VERSION {
            return bad(format!(
                "format_version is {}, this build reads {SERVING_FORMAT_VERSION}",
                self.format_version
            ));
        }
        if self.id_hash != ID_HASH {
            return bad(format!("id_hash is `{}`, this build implements `{ID_HASH}`", self.id_hash));
        }
        let model = crate::build(&self.model)?;
        let input = &self.input;
        if input.dense.len() != model.num_dense() {
            return bad(format!(
                "{} dense columns, the model has num_dense {}",
                input.dense.len(),
                model.num_dense()
            ));
        }
        if let ModelConfig::WideDeep(c) = &self.model
            && c.num_fields > 0
            && c.num_fields != input.categorical.len()
        {
            return bad(format!(
                "{} categorical columns, the model has num_fields {}",
                input.categorical.len(),
                c.num_fields
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for name in std::iter::once(&input.label).chain(&input.dense).chain(&input.categorical) {
            if !seen.insert(name.as_str()) {
                return bad(format!("column `{name}` is named twice"));
            }
        }
        if let Some(s) = &self.standardize {
            let n = input.dense.len();
            if s.mean.len() != n || s.std.len() != n {
                return bad(format!(
                    "standardize has {} means and {} stds for {n} dense columns",
                    s.mean.len(),
                    s.std.len()
                ));
            }
            if s.mean.iter().chain(&s.std).any(|v| !v.is_finite()) || s.std.iter().any(|&v| v <= 0.0) {
                return bad("standardize holds a non-finite mean or a std that is not positive".into());
            }
        }
        Ok(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::WideDeepConfig;

    fn info() -> ServingInfo {
        let input = InputSchema {
            label: "label".into(),
            dense: vec!["d0".into(), "d1".into()],
            categorical: vec!["c0".into()],
        };
        let model = ModelConfig::WideDeep(WideDeepConfig::new(1, 2));
        ServingInfo::new("job", model, input, Some(Scaling { mean: vec![0.0, 1.0], std: vec![1.0, 2.0] }))
    }

    fn error(i: &ServingInfo) -> String {
        i.check().err().expect("refused").to_string()
    }

    #[test]
    fn checks_columns_against_the_model() {
        assert!(info().check().is_ok());
        let mut i = info();
        i.input.dense.pop();
        assert!(error(&i).contains("1 dense columns, the model has num_dense 2"));
        let mut i = info();
        i.input.categorical.push("d0".into());
        assert!(i.check().is_err());
        let mut i = info();
        i.id_hash = "other".into();
        assert!(error(&i).contains("id_hash is `other`"));
        let mut i = info();
        i.standardize.as_mut().unwrap().std[0] = 0.0;
        assert!(i.check().is_err());
    }
}
