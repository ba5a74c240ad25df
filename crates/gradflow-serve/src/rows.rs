//! Raw rows (named columns with JSON values, as a request carries them) into a model's input
//! [`Batch`].
//!
//! A dense column takes a finite number. A categorical column takes a string, an integer
//! (hashed as its decimal text, as Parquet and TFRecord integers are) or `null` (hashed as the
//! empty string, as a Parquet null is); its id is [`gradflow_data::categorical_id`] of the
//! field index and those bytes, exactly what the training readers compute. The label column
//! may be present and is ignored. Any other column, a missing one, or a value of the wrong
//! type is an [`InputError`] naming the column.

use std::collections::HashMap;

use gradflow_data::{Batch, categorical_id};
use gradflow_models::InputSchema;
use serde_json::{Map, Value};

use crate::InputError;

/// What a column of the input is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Label,
    Dense(usize),
    Categorical(u32),
}

/// Decodes rows of one model's input schema; build it once per model.
#[derive(Debug, Clone)]
pub struct RowDecoder {
    roles: HashMap<String, Role>,
    num_dense: usize,
    num_fields: usize,
}

impl RowDecoder {
    /// The decoder of rows with `schema`'s columns.
    pub fn new(schema: &InputSchema) -> RowDecoder {
        let mut roles = HashMap::new();
        roles.insert(schema.label.clone(), Role::Label);
        for (i, d) in schema.dense.iter().enumerate() {
            roles.insert(d.clone(), Role::Dense(i));
        }
        for (f, c) in schema.categorical.iter().enumerate() {
            roles.insert(c.clone(), Role::Categorical(f as u32));
        }
        RowDecoder { roles, num_dense: schema.dense.len(), num_fields: schema.categorical.len() }
    }

    /// Dense features per row.
    pub fn num_dense(&self) -> usize {
        self.num_dense
    }

    /// Appends row `index` (its position in the request, for messages) to `batch`, with label
    /// 0; on error `batch` is unchanged. `dense` and `ids` are scratch space.
    pub fn push(
        &self,
        index: usize,
        row: &Map<String, Value>,
        batch: &mut Batch,
        dense: &mut Vec<f32>,
        ids: &mut Vec<Option<u64>>,
    ) -> Result<(), InputError> {
        let err = |field: &str, problem: String| InputError { row: index, field: field.to_string(), problem };
        dense.clear();
        dense.resize(self.num_dense, f32::NAN);
        let mut seen_dense = 0;
        ids.clear();
        ids.resize(self.num_fields, None);
        for (name, value) in row {
            match self.roles.get(name) {
                None => {
                    let mut known: Vec<&str> = self.roles.keys().map(String::as_str).collect();
                    known.sort_unstable();
                    let shown = if known.len() > 8 {
                        format!("{} and {} more", known[..8].join(", "), known.len() - 8)
                    } else {
                        known.join(", ")
                    };
                    return Err(err(
                        name,
                        format!("unknown column `{name}`; the model's columns are {shown}"),
                    ));
                }
                Some(Role::Label) => {}
                Some(&Role::Dense(i)) => {
                    let x = value.as_f64().map(|v| v as f32).filter(|v| v.is_finite()).ok_or_else(|| {
                        err(
                            name,
                            format!("column `{name}` must be a finite number (dense), got {}", shown(value)),
                        )
                    })?;
                    dense[i] = x;
                    seen_dense += 1;
                }
                Some(&Role::Categorical(f)) => {
                    let id = match value {
                        Value::String(s) => categorical_id(f, s.as_bytes()),
                        Value::Null => categorical_id(f, b""),
                        Value::Number(n) if n.is_i64() || n.is_u64() => {
                            categorical_id(f, n.to_string().as_bytes())
                        }
                        _ => {
                            return Err(err(
                                name,
                                format!(
                                    "column `{name}` must be a string or an integer (categorical), got {}",
                                    shown(value)
                                ),
                            ));
                        }
                    };
                    ids[f as usize] = Some(id);
                }
            }
        }
        if seen_dense < self.num_dense || ids.iter().any(Option::is_none) {
            let missing = self
                .roles
                .iter()
                .filter(|(_, r)| match **r {
                    Role::Label => false,
                    Role::Dense(i) => dense[i].is_nan(),
                    Role::Categorical(f) => ids[f as usize].is_none(),
                })
                .map(|(n, _)| n.as_str())
                .min()
                .expect("a column is missing");
            return Err(err(missing, format!("column `{missing}` is missing")));
        }
        batch.push(0.0, dense, ids.iter().enumerate().map(|(f, id)| (f as u32, id.expect("checked"), 1.0)));
        Ok(())
    }

    /// A batch of `rows`; the first row that does not fit is the error.
    pub fn batch(&self, rows: &[Map<String, Value>]) -> Result<Batch, InputError> {
        let mut batch = Batch::new(self.num_dense);
        let (mut dense, mut ids) = (Vec::new(), Vec::new());
        for (i, row) in rows.iter().enumerate() {
            self.push(i, row, &mut batch, &mut dense, &mut ids)?;
        }
        Ok(batch)
    }
}

/// A JSON value for a message, cut short.
fn shown(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 { format!("{}...", s.chars().take(60).collect::<String>()) } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decoder() -> RowDecoder {
        RowDecoder::new(&InputSchema {
            label: "label".into(),
            dense: vec!["d0".into(), "d1".into()],
            categorical: vec!["c0".into(), "c1".into()],
        })
    }

    fn row(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn decodes_like_the_csv_reader() {
        let b =
            decoder().batch(&[row(json!({"d1": 2.5, "c1": 7, "d0": -1, "c0": "red", "label": 1}))]).unwrap();
        assert_eq!(b.dense, vec![-1.0, 2.5]);
        assert_eq!(b.sparse_fields, vec![0, 1]);
        assert_eq!(b.sparse_ids, vec![categorical_id(0, b"red"), categorical_id(1, b"7")]);
        assert_eq!(b.labels, vec![0.0]);
    }

    #[test]
    fn names_the_field_at_fault() {
        let d = decoder();
        let full = json!({"d0": 1, "d1": 2, "c0": "a", "c1": "b"});
        let cases = [
            ("nope", json!({"nope": 1})),
            ("d1", json!({"d1": "x"})),
            ("c0", json!({"c0": 1.5})),
            ("c0", json!({"c0": [1]})),
        ];
        for (field, change) in cases {
            let mut r = row(full.clone());
            r.extend(row(change));
            let e = d.batch(&[row(full.clone()), r]).unwrap_err();
            assert_eq!((e.row, e.field.as_str()), (1, field), "{e}");
            assert!(e.to_string().contains(&format!("`{field}`")), "{e}");
        }
        let mut r = row(full);
        r.remove("d1");
        let e = d.batch(&[r]).unwrap_err();
        assert_eq!(e.field, "d1");
        assert!(e.to_string().contains("column `d1` is missing"), "{e}");
    }
}
