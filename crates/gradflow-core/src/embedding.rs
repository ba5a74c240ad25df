//! The job file's `[embedding]` section: which ids of a sparse table get a row, and when rows
//! go again.
//!
//! Without it a row is created the first time an id is pushed and kept for good, so a table
//! of raw 64-bit ids (`hash_buckets = 0`) grows without bound. The settings here bound it:
//! admission (an id gets a row only after it was pushed `admit_min_count` times, or with
//! probability `admit_probability`), eviction of rows not updated for `evict_after_steps` of
//! their table's steps, and a cap of `max_rows` rows per table per shard. Every option applies
//! to every sparse table; `[embedding.tables.NAME]` overrides them for one table. The servers
//! apply them ([`TablePolicy`] is what one table of one shard follows); they are in the job
//! file and not in the model spec, so a restored job may change them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{OptimizerConfig, SparseSpec};

/// The largest `admit_min_count`: counts are kept in one byte per sketch cell.
pub const MAX_ADMIT_MIN_COUNT: u32 = 255;

/// The job file's `[embedding]` section. Every field has a default: no admission filter, no
/// eviction, no cap.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddingSettings {
    /// See [`TableOptions::admit_min_count`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admit_min_count: Option<u32>,
    /// See [`TableOptions::admit_probability`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admit_probability: Option<f64>,
    /// See [`TableOptions::admit_sketch_cells`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admit_sketch_cells: Option<u64>,
    /// See [`TableOptions::evict_after_steps`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evict_after_steps: Option<u32>,
    /// See [`TableOptions::max_rows`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rows: Option<u64>,
    /// See [`TableOptions::evict`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evict: Option<EvictPolicy>,
    /// See [`TableOptions::storage`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<Storage>,
    /// Options of single tables, by table name; a key given here replaces the one above for
    /// that table.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tables: BTreeMap<String, TableOptions>,
}

/// Admission and eviction options of a table. Each is off when not given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TableOptions {
    /// An id gets a row only once it was in this many pushes, counted in a count-min sketch of
    /// bounded memory (`admit_sketch_cells` one-byte cells per table per shard). Until then its
    /// gradients are dropped (and counted); pulls return what a new row would hold. 1 to 255.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admit_min_count: Option<u32>,
    /// Instead of a count: each push of an id without a row gives it one with this
    /// probability. Above 0 and at most 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admit_probability: Option<f64>,
    /// Cells of the admission sketch (per table per shard, one byte each, four hashes per
    /// id). Default 4194304 (4 MiB); fewer cells count more ids too high.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admit_sketch_cells: Option<u64>,
    /// A row not updated for this many of its table's steps (sync steps, or applied pushes in
    /// async mode) is dropped. At least 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evict_after_steps: Option<u32>,
    /// At most this many rows per table per shard: when full, rows are dropped to make room
    /// (see `evict`). At least 32 (one per stripe of a table).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rows: Option<u64>,
    /// Which rows make room at `max_rows`: `"lfu"` (default) the rows updated fewest times
    /// (ties: longest ago), `"lru"` the rows updated longest ago. On Zipf-distributed
    /// click-through data `"lfu"` kept the test AUC of an uncapped table, `"lru"` lost about
    /// 0.004 of it (docs/performance.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evict: Option<EvictPolicy>,
    /// How a row's values are held on the server: `"f32"` (default), or in half the memory as
    /// `"f16"` or `"bf16"` (rounded to nearest after every update; the optimizer state stays
    /// f32). Checkpoints still carry f32; the wire carries what `[transport] compression`
    /// says. Refused for an Adam or AdamW table whose steps are too small for it to hold
    /// ([`EmbeddingSettings::check_storage`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<Storage>,
}

/// How a table's values are held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    #[default]
    F32,
    /// IEEE half precision: 11 bits of precision, values up to 65504.
    F16,
    /// bfloat16: 8 bits of precision, f32's range.
    Bf16,
}

/// Which rows a full table drops to make room.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum EvictPolicy {
    /// The rows updated fewest times, and of those the ones updated longest ago.
    #[default]
    #[serde(rename = "lfu")]
    LeastFrequent,
    /// The rows updated longest ago.
    #[serde(rename = "lru")]
    LeastRecent,
}

/// What one table of one shard follows: the resolved options of [`EmbeddingSettings`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TablePolicy {
    pub admit: Admission,
    pub evict_after_steps: Option<u32>,
    pub max_rows: Option<u64>,
    pub evict: EvictPolicy,
    pub storage: Storage,
}

/// How an id without a row gets one.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum Admission {
    /// On its first push.
    #[default]
    Always,
    /// Once it was in `min_count` pushes, counted in a sketch of `cells` cells.
    MinCount { min_count: u8, cells: u64 },
    /// On each push, with this probability.
    Probability(f64),
}

/// The default number of cells of an admission sketch.
pub const DEFAULT_SKETCH_CELLS: u64 = 1 << 22;

/// An `[embedding]` option that cannot apply; the message names the key.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum EmbeddingError {
    #[error("{key} is {value}; expected {expected}")]
    Invalid { key: String, value: String, expected: &'static str },
    #[error("{key}: give admit_min_count or admit_probability, not both")]
    BothAdmissions { key: String },
    #[error("embedding.tables.{name}: the model has no sparse table `{name}`; its tables are: {known}")]
    UnknownTable { name: String, known: String },
    #[error(
        "{key} = \"{storage}\" cannot hold table `{table}` as its {optimizer} optimizer moves it: \
         a step moves a value by about lr = {lr}, less than half a {storage} step at the size of \
         the table's initial values (up to {scale}), so those values would never change; expected \
         storage = \"f32\" for this table, or a learning rate of at least {min_lr}"
    )]
    StorageTooCoarse {
        key: String,
        storage: &'static str,
        table: String,
        optimizer: &'static str,
        lr: f64,
        scale: f32,
        min_lr: f64,
    },
}

impl Storage {
    fn name(self) -> &'static str {
        match self {
            Storage::F32 => "f32",
            Storage::F16 => "f16",
            Storage::Bf16 => "bf16",
        }
    }

    /// Half the distance between neighbouring values, relative to the value, at its smallest
    /// (a change below this times |v| always rounds back to v).
    fn half_step(self) -> Option<f64> {
        match self {
            Storage::F32 => None,
            Storage::F16 => Some((2f64).powi(-12)),
            Storage::Bf16 => Some((2f64).powi(-9)),
        }
    }
}

impl TableOptions {
    /// `self` with the keys `over` gives replaced.
    fn overridden_by(&self, over: &TableOptions) -> TableOptions {
        TableOptions {
            admit_min_count: over.admit_min_count.or(self.admit_min_count),
            admit_probability: over.admit_probability.or(self.admit_probability),
            admit_sketch_cells: over.admit_sketch_cells.or(self.admit_sketch_cells),
            evict_after_steps: over.evict_after_steps.or(self.evict_after_steps),
            max_rows: over.max_rows.or(self.max_rows),
            evict: over.evict.or(self.evict),
            storage: over.storage.or(self.storage),
        }
    }

    fn check(&self, prefix: &str) -> Result<(), EmbeddingError> {
        let invalid = |key: &str, value: String, expected| EmbeddingError::Invalid {
            key: format!("{prefix}{key}"),
            value,
            expected,
        };
        if let Some(n) = self.admit_min_count
            && !(1..=MAX_ADMIT_MIN_COUNT).contains(&n)
        {
            return Err(invalid("admit_min_count", n.to_string(), "1 to 255"));
        }
        if let Some(p) = self.admit_probability
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(invalid("admit_probability", p.to_string(), "above 0 and at most 1"));
        }
        if self.admit_min_count.is_some() && self.admit_probability.is_some() {
            return Err(EmbeddingError::BothAdmissions { key: prefix.trim_end_matches('.').to_string() });
        }
        if let Some(c) = self.admit_sketch_cells
            && !(1024..=1 << 32).contains(&c)
        {
            return Err(invalid("admit_sketch_cells", c.to_string(), "1024 to 4294967296"));
        }
        if self.evict_after_steps == Some(0) {
            return Err(invalid("evict_after_steps", "0".into(), "at least 1 (or leave it out)"));
        }
        if let Some(m) = self.max_rows
            && m < 32
        {
            return Err(invalid("max_rows", m.to_string(), "at least 32 (or leave it out)"));
        }
        Ok(())
    }

    fn policy(&self) -> TablePolicy {
        let admit = match (self.admit_min_count, self.admit_probability) {
            (Some(n), _) if n > 1 => Admission::MinCount {
                min_count: n.min(MAX_ADMIT_MIN_COUNT) as u8,
                cells: self.admit_sketch_cells.unwrap_or(DEFAULT_SKETCH_CELLS),
            },
            (_, Some(p)) if p < 1.0 => Admission::Probability(p),
            _ => Admission::Always,
        };
        TablePolicy {
            admit,
            evict_after_steps: self.evict_after_steps,
            max_rows: self.max_rows,
            evict: self.evict.unwrap_or_default(),
            storage: self.storage.unwrap_or_default(),
        }
    }
}

impl EmbeddingSettings {
    /// The options every table has unless `[embedding.tables.NAME]` says otherwise.
    fn all(&self) -> TableOptions {
        TableOptions {
            admit_min_count: self.admit_min_count,
            admit_probability: self.admit_probability,
            admit_sketch_cells: self.admit_sketch_cells,
            evict_after_steps: self.evict_after_steps,
            max_rows: self.max_rows,
            evict: self.evict,
            storage: self.storage,
        }
    }

    /// Checks every option; the error names the key (`embedding.max_rows`,
    /// `embedding.tables.NAME.max_rows`).
    pub fn validate(&self) -> Result<(), EmbeddingError> {
        self.all().check("embedding.")?;
        for (name, t) in &self.tables {
            self.all().overridden_by(t).check(&format!("embedding.tables.{name}."))?;
        }
        Ok(())
    }

    /// The policy of each of `tables` (the model's sparse tables, in order). A table named in
    /// `[embedding.tables]` that the model does not have is an error.
    pub fn policies(&self, tables: &[&str]) -> Result<Vec<TablePolicy>, EmbeddingError> {
        self.validate()?;
        if let Some(name) = self.tables.keys().find(|n| !tables.contains(&n.as_str())) {
            return Err(EmbeddingError::UnknownTable { name: name.clone(), known: tables.join(", ") });
        }
        Ok(tables
            .iter()
            .map(|t| match self.tables.get(*t) {
                Some(over) => self.all().overridden_by(over).policy(),
                None => self.all().policy(),
            })
            .collect())
    }

    /// Checks that each table's storage can hold what its optimizer does to it. Adam and AdamW
    /// move a value by about `lr` per step whatever the gradient's size; where that is below
    /// half a step of compact storage at the size of the table's initial values, those values
    /// could never change, and the table is refused (the error names the key that set its
    /// storage). SGD, Adagrad and FTRL steps scale with the gradient, so no setting of theirs
    /// is refused; their optimizer state stays f32 in every case.
    pub fn check_storage(&self, tables: &[SparseSpec]) -> Result<(), EmbeddingError> {
        for t in tables {
            let over = self.tables.get(&t.name);
            let (storage, key) = match over.and_then(|o| o.storage) {
                Some(s) => (s, format!("embedding.tables.{}.storage", t.name)),
                None => (self.storage.unwrap_or_default(), "embedding.storage".to_string()),
            };
            let Some(half_step) = storage.half_step() else { continue };
            let (optimizer, lr) = match t.optimizer {
                OptimizerConfig::Adam { lr, .. } => ("Adam", lr),
                OptimizerConfig::AdamW { lr, .. } => ("AdamW", lr),
                _ => continue,
            };
            // The largest initial value over a sample of rows (values depend on the id).
            let mut row = vec![0f32; t.dim as usize];
            let scale = (0..64u64)
                .map(|id| {
                    t.init.fill_row(&t.name, id, &mut row);
                    row.iter().fold(0f32, |m, v| m.max(v.abs()))
                })
                .fold(0f32, f32::max);
            let min_lr = f64::from(scale) * half_step;
            if lr < min_lr {
                return Err(EmbeddingError::StorageTooCoarse {
                    key,
                    storage: storage.name(),
                    table: t.name.clone(),
                    optimizer,
                    lr,
                    scale,
                    min_lr,
                });
            }
        }
        Ok(())
    }

    /// Whether any table has a policy other than the default.
    pub fn is_default(&self) -> bool {
        *self == EmbeddingSettings::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> EmbeddingSettings {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn table_keys_override_the_section_and_unknown_tables_are_named() {
        let e = parse(
            "admit_min_count = 2\nmax_rows = 20000\n[tables.wide]\nadmit_min_count = 1\nevict_after_steps = 50\nevict = \"lru\"\n",
        );
        let p = e.policies(&["wide", "embedding"]).unwrap();
        assert_eq!(
            p[0],
            TablePolicy {
                admit: Admission::Always,
                evict_after_steps: Some(50),
                max_rows: Some(20000),
                evict: EvictPolicy::LeastRecent,
                storage: Storage::F32
            }
        );
        assert_eq!(
            p[1],
            TablePolicy {
                admit: Admission::MinCount { min_count: 2, cells: DEFAULT_SKETCH_CELLS },
                evict_after_steps: None,
                max_rows: Some(20000),
                evict: EvictPolicy::LeastFrequent,
                storage: Storage::F32
            }
        );
        let e = e.policies(&["embedding"]).unwrap_err().to_string();
        assert!(e.contains("embedding.tables.wide") && e.contains("embedding"), "{e}");
    }

    #[test]
    fn options_that_cannot_apply_name_their_key() {
        for (text, key) in [
            ("max_rows = 0", "embedding.max_rows"),
            ("[tables.emb]\nmax_rows = 3", "embedding.tables.emb.max_rows"),
            ("admit_min_count = 0", "embedding.admit_min_count"),
            ("admit_min_count = 300", "embedding.admit_min_count"),
            ("admit_probability = 0.0", "embedding.admit_probability"),
            ("admit_probability = 1.5", "embedding.admit_probability"),
            ("evict_after_steps = 0", "embedding.evict_after_steps"),
            ("admit_sketch_cells = 10", "embedding.admit_sketch_cells"),
            ("admit_min_count = 2\n[tables.emb]\nadmit_probability = 0.5", "embedding.tables.emb"),
        ] {
            let e = parse(text).validate().unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
        assert!(toml::from_str::<EmbeddingSettings>("max_row = 5").is_err());
        assert!(EmbeddingSettings::default().policies(&["a"]).unwrap()[0] == TablePolicy::default());
    }

    #[test]
    fn compact_storage_too_coarse_for_adam_steps_is_refused_by_key() {
        use crate::Initializer;
        let table = |name: &str, optimizer: OptimizerConfig| SparseSpec {
            name: name.into(),
            dim: 8,
            init: Initializer::Uniform { low: -0.5, high: 0.5, seed: 1 },
            optimizer,
        };
        // Near 0.5, bf16's values are 2^-9 apart and f16's 2^-12: an Adam step of 5e-4 is lost
        // in bf16 (half a step is 9.8e-4), kept in f16 (half a step is 1.2e-4).
        let tables = [table("wide", OptimizerConfig::sgd(1e-4)), table("deep", OptimizerConfig::adam(5e-4))];
        let e = parse("storage = \"bf16\"\n").check_storage(&tables).unwrap_err().to_string();
        assert!(
            e.contains("embedding.storage = \"bf16\"") && e.contains("`deep`") && e.contains("Adam"),
            "{e}"
        );
        // Named by the table's own key where that set it; f16 is fine at this lr, f32 always.
        let e = parse("[tables.deep]\nstorage = \"bf16\"\n").check_storage(&tables).unwrap_err().to_string();
        assert!(e.contains("embedding.tables.deep.storage"), "{e}");
        assert!(parse("storage = \"f16\"\n").check_storage(&tables).is_ok());
        assert!(parse("").check_storage(&tables).is_ok());
        // A learning rate Adam can take steps of in bf16, and SGD at any rate, pass.
        let ok = [table("wide", OptimizerConfig::sgd(1e-9)), table("deep", OptimizerConfig::adamw(1e-2))];
        assert!(parse("storage = \"bf16\"\n").check_storage(&ok).is_ok());
    }
}
