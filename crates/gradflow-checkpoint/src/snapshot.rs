//! In-memory copies of what one shard holds: the values a checkpoint is written from, and
//! what [`crate::CheckpointStore::load_shard`] gives back.

use std::collections::HashSet;

use gradflow_core::{Mode, ModelSpec};

use crate::CheckpointError;

/// One contiguous piece of a dense tensor with its optimizer state.
#[derive(Debug, Clone, PartialEq)]
pub struct DensePieceSnapshot {
    /// Name of the tensor (in `ModelSpec::dense`).
    pub tensor: String,
    /// Index of the piece among the tensor's pieces under the shard's placement.
    pub partition: u32,
    /// First element of the piece in the flattened tensor.
    pub offset: u64,
    /// The piece's values; its length is the piece's length.
    pub values: Vec<f32>,
    /// Optimizer state, slot-major: slot `s` is `state[s * len..(s + 1) * len]`
    /// (`num_slots * len` floats; empty for an optimizer without state).
    pub state: Vec<f32>,
    /// Optimizer updates applied to the piece so far.
    pub steps: u64,
}

impl DensePieceSnapshot {
    /// Number of elements.
    pub fn len(&self) -> u64 {
        self.values.len() as u64
    }

    /// True when the piece has no elements (never the case for a valid snapshot).
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// A shard's rows of one sparse embedding table, with their optimizer state.
#[derive(Debug, Clone, PartialEq)]
pub struct TableSnapshot {
    /// Name of the table (in `ModelSpec::sparse`).
    pub table: String,
    /// Floats per row.
    pub dim: u32,
    /// Optimizer state slots per element.
    pub num_slots: u32,
    /// Row ids, each at most once.
    pub ids: Vec<u64>,
    /// Row values, `ids.len() * dim`: row `i` is `values[i * dim..(i + 1) * dim]`.
    pub values: Vec<f32>,
    /// Optimizer state, `ids.len() * num_slots * dim`; per row: slot 0 (`dim` floats), slot 1, ...
    pub state: Vec<f32>,
    /// Optimizer updates applied to each row so far.
    pub steps: Vec<u32>,
    /// The table's clock when each row was last updated (see `evict_after_steps`): empty, or
    /// one per row.
    pub touched: Vec<u32>,
    /// The table's clock: its applied steps on this shard.
    pub clock: u32,
    /// The admission sketch's cells (see `admit_min_count`); empty without one.
    pub sketch: Vec<u8>,
}

impl TableSnapshot {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.ids.len()
    }
}

/// Everything one parameter-server shard holds at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardSnapshot {
    /// This shard's index.
    pub shard: u32,
    /// Number of shards of the job.
    pub num_shards: u32,
    /// The shard's model version (completed steps in sync mode, applied pushes in async mode).
    pub version: u64,
    pub mode: Mode,
    pub spec: ModelSpec,
    /// The placement's largest dense piece, in bytes (`Placement::new(spec, num_shards, partition_bytes)`).
    pub partition_bytes: u64,
    /// The dense pieces this shard holds.
    pub dense: Vec<DensePieceSnapshot>,
    /// This shard's rows of every sparse table.
    pub sparse: Vec<TableSnapshot>,
    /// What a predictor needs beside the parameters (the model config, the input columns, the
    /// scaling of dense features: gradflow-models' `ServingInfo` as JSON), as the job's first
    /// worker declared it. Opaque here; recorded in the shard's manifest and, from shard 0, in
    /// the checkpoint's manifest. `None` when no worker declared one.
    pub serving: Option<serde_json::Value>,
}

impl ShardSnapshot {
    /// Checks that every piece and table fits the spec: known names, in-range offsets, the
    /// lengths of values, state and steps, and that every value and state is finite (a model
    /// with a NaN or an infinity in it is not worth restoring).
    pub fn validate(&self) -> Result<(), CheckpointError> {
        let bad = |reason: String| CheckpointError::InvalidSnapshot { shard: self.shard, reason };
        if self.num_shards == 0 || self.shard >= self.num_shards {
            return Err(bad(format!("shard {} of {} does not exist", self.shard, self.num_shards)));
        }
        if self.partition_bytes < 4 {
            return Err(bad(format!("partition_bytes is {}, must be at least 4", self.partition_bytes)));
        }
        self.spec.validate().map_err(|e| bad(format!("invalid spec: {e}")))?;
        let mut seen = HashSet::new();
        for p in &self.dense {
            let t = self
                .spec
                .dense_index(&p.tensor)
                .ok_or_else(|| bad(format!("dense tensor `{}` is not in the spec", p.tensor)))?;
            let d = &self.spec.dense[t];
            if !seen.insert((p.tensor.as_str(), p.partition)) {
                return Err(bad(format!(
                    "dense tensor `{}` partition {} appears twice",
                    p.tensor, p.partition
                )));
            }
            if p.values.is_empty() || p.offset + p.len() > d.numel() {
                return Err(bad(format!(
                    "dense tensor `{}` partition {}: elements {}..{} are outside the tensor's {}",
                    p.tensor,
                    p.partition,
                    p.offset,
                    p.offset + p.len(),
                    d.numel()
                )));
            }
            let want = d.optimizer.num_slots() * p.values.len();
            if p.state.len() != want {
                return Err(bad(format!(
                    "dense tensor `{}` partition {}: {} state floats, the optimizer ({}) needs {want}",
                    p.tensor,
                    p.partition,
                    p.state.len(),
                    d.optimizer.kind()
                )));
            }
            if let Some((what, i)) = non_finite(&p.values, &p.state) {
                return Err(bad(format!(
                    "dense tensor `{}` partition {}: {what} {i} is NaN or infinite; a checkpoint holds finite values only",
                    p.tensor, p.partition
                )));
            }
        }
        let mut tables = HashSet::new();
        for t in &self.sparse {
            let i = self
                .spec
                .sparse_index(&t.table)
                .ok_or_else(|| bad(format!("sparse table `{}` is not in the spec", t.table)))?;
            let s = &self.spec.sparse[i];
            if !tables.insert(t.table.as_str()) {
                return Err(bad(format!("sparse table `{}` appears twice", t.table)));
            }
            if t.dim != s.dim || t.num_slots as usize != s.optimizer.num_slots() {
                return Err(bad(format!(
                    "sparse table `{}`: dim {} with {} slots, the spec says dim {} with {} slots",
                    t.table,
                    t.dim,
                    t.num_slots,
                    s.dim,
                    s.optimizer.num_slots()
                )));
            }
            let (n, dim, slots) = (t.ids.len(), t.dim as usize, t.num_slots as usize);
            if t.values.len() != n * dim || t.state.len() != n * slots * dim || t.steps.len() != n {
                return Err(bad(format!(
                    "sparse table `{}`: {n} ids need {} values, {} state floats and {n} steps; got {}, {} and {}",
                    t.table,
                    n * dim,
                    n * slots * dim,
                    t.values.len(),
                    t.state.len(),
                    t.steps.len()
                )));
            }
            if let Some((what, i)) = non_finite(&t.values, &t.state) {
                let id = t.ids[if what == "value" { i / dim } else { i / (slots * dim) }];
                return Err(bad(format!(
                    "sparse table `{}` row id {id}: {what} {i} is NaN or infinite; a checkpoint holds finite values only",
                    t.table
                )));
            }
        }
        Ok(())
    }
}

/// The first NaN or infinity in `values`, else in `state`: which of the two and where.
fn non_finite(values: &[f32], state: &[f32]) -> Option<(&'static str, usize)> {
    let first = |x: &[f32]| {
        let bad = x.iter().fold(false, |bad, v| bad | (v.to_bits() & 0x7f80_0000 == 0x7f80_0000));
        if bad { x.iter().position(|v| !v.is_finite()) } else { None }
    };
    first(values).map(|i| ("value", i)).or_else(|| first(state).map(|i| ("optimizer state float", i)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_snapshot_with_a_non_finite_value_or_state_is_refused_by_name() {
        let mut s = super::tiny();
        s.validate().unwrap();
        s.dense[0].values[2] = f32::NAN;
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("`w` partition 0: value 2 is NaN or infinite"), "{e}");
        let mut s = super::tiny();
        s.dense[0].state[3] = f32::INFINITY;
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("optimizer state float 3"), "{e}");
    }
}

/// A one-shard snapshot of a 4-element tensor `w` with Adagrad (one slot), for tests.
#[cfg(test)]
pub(crate) fn tiny() -> ShardSnapshot {
    use gradflow_core::{DenseSpec, Initializer, OptimizerConfig};
    ShardSnapshot {
        shard: 0,
        num_shards: 1,
        version: 1,
        mode: Mode::Sync,
        spec: ModelSpec {
            dense: vec![DenseSpec {
                name: "w".into(),
                shape: vec![4],
                init: Initializer::Zeros,
                optimizer: OptimizerConfig::adagrad(0.1),
            }],
            sparse: vec![],
        },
        partition_bytes: 1024,
        dense: vec![DensePieceSnapshot {
            tensor: "w".into(),
            partition: 0,
            offset: 0,
            values: vec![1.0, 2.0, 3.0, 4.0],
            state: vec![0.5; 4],
            steps: 1,
        }],
        sparse: vec![],
        serving: None,
    }
}
