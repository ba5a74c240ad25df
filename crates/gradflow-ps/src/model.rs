//! The part of the model one shard holds: its dense pieces and its rows of every sparse table,
//! with the optimizer state beside them.
//!
//! Locks are fine-grained so that pushes and pulls of different pieces, and of rows in
//! different stripes of a table, proceed in parallel. All math here is blocking work: callers
//! run it on a blocking thread or on rayon, never on the async runtime.
//!
//! Every update is checked as it is applied (`OptimizerConfig::step_checked`): an update that
//! makes a value or its optimizer state NaN or infinite is stopped, and the model keeps the
//! fault ([`ShardModel::healthy`]) so that the shard refuses everything afterwards: pulls,
//! pushes and checkpoints. The bad values are not put back; the refusal is what keeps them
//! from being seen or saved. The
//! memory a model needs is worked out from the spec before anything is allocated
//! ([`ShardModel::check_fits`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use bytes::Bytes;

use gradflow_checkpoint::{DensePieceSnapshot, ShardSnapshot};
use gradflow_core::embedding::{EmbeddingError, EmbeddingSettings};
use gradflow_core::{Grad, ModelSpec, NonFiniteUpdate, OptimizerConfig, Placement};
use gradflow_proto::codec;
use rayon::prelude::*;

use crate::PsError;
pub use crate::table::{SparseAccum, Table, TableStats};

/// One shard's parameters.
pub struct ShardModel {
    spec: ModelSpec,
    placement: Placement,
    shard: u32,
    /// The dense pieces this shard holds.
    pieces: Vec<Piece>,
    /// Tensor name → for each partition, the index into `pieces` (None: held elsewhere).
    piece_index: HashMap<String, Vec<Option<usize>>>,
    tables: Vec<Table>,
    /// The first update that would have made the model non-finite; once set, for good.
    fault: OnceLock<Fault>,
}

/// An update that would have made a value or optimizer state NaN or infinite.
#[derive(Debug, Clone)]
struct Fault {
    /// The tensor or table.
    tensor: String,
    /// Where in it: `partition P` or `row ID`.
    at: String,
    step: u64,
    detail: String,
}

/// Bytes of bookkeeping per dense piece (its entry in the placement and the index, its locks
/// and name), counted in [`ShardModel::check_fits`].
const PIECE_OVERHEAD: u64 = 256;

/// A contiguous piece of a dense tensor.
pub struct Piece {
    tensor: String,
    partition: u32,
    /// Number of elements.
    len: usize,
    optimizer: OptimizerConfig,
    params: RwLock<PieceParams>,
    /// Sync mode: the sum of this step's gradients.
    accum: Mutex<Accum>,
    /// Whether updates are checked for NaN and infinity ([`ShardModel::set_check_finite`]).
    check_finite: AtomicBool,
}

struct PieceParams {
    /// Shared with the pulls in flight, which send these values without copying them
    /// ([`Piece::read`]); an update while one is in flight writes to a copy.
    values: Arc<Vec<f32>>,
    /// Optimizer state, slot-major (see `OptimizerConfig::step`).
    state: Vec<f32>,
    /// Updates applied so far.
    steps: u64,
}

/// A gradient sum for one piece; allocated on first use.
///
/// Between steps `sum` holds the last step's gradients, not zeros: the first push of a step
/// overwrites it (a copy, no pass to clear it after the step and none to add into zeros).
/// The first two pushes that arrived as one aligned slice each are not even copied: they are
/// `held` as received, and the update reads them directly, averaging as it goes
/// ([`Grad::SumScaled`]). Anything else moves them into `sum` (summed in one pass) first: a
/// third push, a push in several slices or not aligned for `f32`, or a partial gradient
/// ([`Piece::accumulate`]). A step of one or two workers thus never writes its gradient to
/// memory: the update is bound by memory traffic, and each pass saved is a pass over the piece.
#[derive(Default)]
struct Accum {
    sum: Vec<f32>,
    /// Whether `sum` holds this step's gradients (otherwise it is stale).
    touched: bool,
    /// The step's pushes so far while there are at most [`Accum::HELD`] and `sum` is stale,
    /// in the order they came, as received: each the whole piece as aligned little-endian
    /// `f32`. The vector keeps its capacity from step to step. Only
    /// [`Piece::accumulate_push`] adds to it, and only while `touched` is false.
    held: Vec<Bytes>,
}

impl Accum {
    /// Pushes held as received at most: as many as [`Grad`] can sum as it is read.
    const HELD: usize = 2;

    /// Moves held pushes into `sum` (of `len` elements), so that more can be added to it.
    fn settle(&mut self, len: usize) {
        if self.sum.len() != len {
            self.sum = vec![0f32; len];
        }
        match self.held.as_slice() {
            [] => return,
            [a] => codec::copy_f32s(&mut self.sum, a),
            [a, b] => {
                let (a, b) = (f32s_of_held(a), f32s_of_held(b));
                assert!(
                    a.len() == len && b.len() == len,
                    "held pushes of {} and {} for {len} elements",
                    a.len(),
                    b.len()
                );
                for ((s, x), y) in self.sum.iter_mut().zip(a).zip(b) {
                    *s = x + y;
                }
            }
            more => unreachable!("{} pushes held, at most {} are", more.len(), Self::HELD),
        }
        self.held.clear();
        self.touched = true;
    }

    /// This step's gradient averaged by `scale`, where there is one.
    fn grad(&self, scale: f32) -> Option<Grad<'_>> {
        let scaled = |g| if scale == 1.0 { Grad::Plain(g) } else { Grad::Scaled(g, scale) };
        match self.held.as_slice() {
            [] if self.touched => Some(scaled(&self.sum)),
            [] => None,
            [a] => Some(scaled(f32s_of_held(a))),
            [a, b] => Some(Grad::SumScaled(f32s_of_held(a), f32s_of_held(b), scale)),
            more => unreachable!("{} pushes held, at most {} are", more.len(), Self::HELD),
        }
    }
}

fn f32s_of_held(bytes: &Bytes) -> &[f32] {
    as_f32s(bytes).expect("held only when aligned")
}

impl ShardModel {
    /// Builds and initializes this shard's part of `spec`.
    pub fn new(spec: ModelSpec, num_shards: u32, shard: u32, partition_bytes: u64) -> ShardModel {
        let placement = Placement::new(&spec, num_shards, partition_bytes);
        let mut piece_index: HashMap<String, Vec<Option<usize>>> = HashMap::new();
        let mine: Vec<_> = placement.pieces().iter().filter(|p| p.shard == shard).copied().collect();
        for (t, d) in spec.dense.iter().enumerate() {
            piece_index.insert(d.name.clone(), vec![None; placement.pieces_of(t).len()]);
        }
        for (i, p) in mine.iter().enumerate() {
            piece_index.get_mut(&spec.dense[p.tensor].name).unwrap()[p.partition as usize] = Some(i);
        }
        let pieces = mine
            .par_iter()
            .map(|p| {
                let d = &spec.dense[p.tensor];
                let len = p.len as usize;
                let mut values = vec![0f32; len];
                d.init.fill_dense(&d.name, &d.shape, p.offset, &mut values);
                let mut state = vec![0f32; len * d.optimizer.num_slots()];
                d.optimizer.init_state(&mut state);
                Piece {
                    tensor: d.name.clone(),
                    partition: p.partition,
                    len,
                    optimizer: d.optimizer.clone(),
                    params: RwLock::new(PieceParams { values: Arc::new(values), state, steps: 0 }),
                    accum: Mutex::new(Accum::default()),
                    check_finite: AtomicBool::new(true),
                }
            })
            .collect();
        let tables = spec.sparse.iter().map(|s| Table::new(s, Default::default())).collect();
        ShardModel { spec, placement, shard, pieces, piece_index, tables, fault: OnceLock::new() }
    }

    /// This model with the `[embedding]` policies of its tables: admission and eviction (see
    /// the `table` module). Only an empty model takes them; a table the settings name that
    /// the spec does not have is an error that names it.
    pub fn with_embedding(mut self, settings: &EmbeddingSettings) -> Result<ShardModel, EmbeddingError> {
        let names: Vec<&str> = self.spec.sparse.iter().map(|s| s.name.as_str()).collect();
        let policies = settings.policies(&names)?;
        settings.check_storage(&self.spec.sparse)?;
        debug_assert!(self.tables.iter().all(|t| t.rows() == 0), "policies are set on an empty model");
        self.tables = self.spec.sparse.iter().zip(policies).map(|(s, p)| Table::new(s, p)).collect();
        Ok(self)
    }

    /// Checks, from the spec alone and before anything is allocated, that shard `shard`'s part
    /// of `spec` fits in `max_memory` bytes (`None`: no limit). Counted for each dense piece
    /// the shard holds: its values, its optimizer state and a gradient sum, 4 bytes per element
    /// each; for each sparse table one row of values and state. Also refuses a sparse row that
    /// no pull could carry (more than `max_message_bytes` of values). Returns the bytes
    /// counted; the error names the sizes.
    pub fn check_fits(
        spec: &ModelSpec,
        num_shards: u32,
        shard: u32,
        partition_bytes: u64,
        max_memory: Option<u64>,
        max_message_bytes: u64,
    ) -> Result<u64, PsError> {
        let too_large = |what: String| PsError::ModelTooLarge(what);
        for t in &spec.sparse {
            let row = u64::from(t.dim) * 4;
            if row > max_message_bytes {
                return Err(too_large(format!(
                    "a row of sparse table `{}` (dim {}) is {row} bytes, more than a message may carry \
                     (transport.max_message_bytes = {max_message_bytes})",
                    t.name, t.dim
                )));
            }
        }
        let pieces = Placement::count_pieces(spec, partition_bytes)
            .map_err(|e| PsError::InvalidSpec(e.to_string()))?;
        let budget = max_memory.unwrap_or(u64::MAX);
        let overhead = pieces.saturating_mul(PIECE_OVERHEAD);
        if overhead > budget {
            return Err(too_large(format!(
                "the spec's dense tensors make {pieces} pieces of at most {partition_bytes} bytes; their \
                 bookkeeping alone ({overhead} bytes) is more than server.max_memory ({budget} bytes)"
            )));
        }
        let placement = Placement::new(spec, num_shards, partition_bytes);
        let per_element = |t: usize| 4 * (2 + spec.dense[t].optimizer.num_slots() as u64);
        let (mut dense, mut held) = (0u64, 0u64);
        for p in placement.pieces_on(shard) {
            dense = dense.saturating_add(p.len.saturating_mul(per_element(p.tensor)));
            held += 1;
        }
        let rows: u64 = spec
            .sparse
            .iter()
            .map(|t| u64::from(t.dim) * 4 * (1 + t.optimizer.num_slots() as u64))
            .fold(0, u64::saturating_add);
        let total = dense.saturating_add(rows).saturating_add(held.saturating_mul(PIECE_OVERHEAD));
        if total > budget {
            let mut biggest: Vec<_> = spec.dense.iter().map(|d| (d.numel(), d)).collect();
            biggest.sort_by_key(|&(n, _)| std::cmp::Reverse(n));
            let named: Vec<String> = biggest
                .iter()
                .take(3)
                .map(|(n, d)| format!("`{}` {:?} ({n} elements)", d.name, d.shape))
                .collect();
            return Err(too_large(format!(
                "shard {shard} of {num_shards} would need {total} bytes for this model (dense values, optimizer \
                 state and gradient sums {dense} bytes, one row of each sparse table {rows} bytes), more than \
                 server.max_memory ({budget} bytes); largest dense tensors: {}",
                named.join(", ")
            )));
        }
        Ok(total)
    }

    /// Whether updates are checked for NaN and infinity (by default they are). Off, an update
    /// is applied whatever it makes of the values (a server with `reject_non_finite = false`
    /// lets NaN through); `clip_norm` applies either way.
    pub fn set_check_finite(&self, on: bool) {
        self.pieces.iter().for_each(|p| p.check_finite.store(on, Ordering::Relaxed));
        self.tables.iter().for_each(|t| t.set_check_finite(on));
    }

    /// `Ok` until an update would have made the model non-finite; then, for good, the error
    /// that names the tensor and the step.
    pub fn healthy(&self) -> Result<(), PsError> {
        match self.fault.get() {
            None => Ok(()),
            Some(f) => Err(PsError::NonFiniteModel {
                tensor: f.tensor.clone(),
                at: f.at.clone(),
                step: f.step,
                detail: f.detail.clone(),
            }),
        }
    }

    /// Records that the update of `tensor` (`at`: which partition or row) at `step` would have
    /// made it non-finite (the first such fault is kept) and returns the error that the shard
    /// answers with from now on.
    pub fn fail(&self, tensor: &str, at: String, step: u64, e: NonFiniteUpdate) -> PsError {
        let _ = self.fault.set(Fault { tensor: tensor.to_string(), at, step, detail: e.to_string() });
        self.healthy().expect_err("a fault was just recorded")
    }

    /// The index into `pieces` of `tensor`'s partition `partition`, or why there is none.
    pub fn piece(&self, tensor: &str, partition: u32) -> Result<usize, PsError> {
        let parts = self.piece_index.get(tensor).ok_or_else(|| PsError::UnknownTensor(tensor.to_string()))?;
        match parts.get(partition as usize) {
            None => Err(PsError::InvalidArgument(format!(
                "dense tensor `{tensor}` has {} partitions; partition {partition} does not exist",
                parts.len()
            ))),
            Some(None) => {
                let t = self.spec.dense_index(tensor).expect("indexed tensor is in the spec");
                let owner = self.placement.pieces_of(t)[partition as usize].shard;
                Err(PsError::InvalidArgument(format!(
                    "dense tensor `{tensor}` partition {partition} lives on shard {owner}, not on shard {}",
                    self.shard
                )))
            }
            Some(Some(i)) => Ok(*i),
        }
    }

    /// The index of sparse table `name`.
    pub fn table(&self, name: &str) -> Result<usize, PsError> {
        self.tables
            .iter()
            .position(|t| t.name() == name)
            .ok_or_else(|| PsError::UnknownTable(name.to_string()))
    }

    /// Bytes of dense parameters on this shard.
    pub fn dense_bytes(&self) -> u64 {
        self.pieces.iter().map(|p| p.len as u64 * 4).sum()
    }

    /// Bytes a sync step's apply works over: every dense piece, and the summed rows of every
    /// table.
    pub fn accumulated_bytes(&self) -> u64 {
        let rows = self.tables.iter().map(|t| (t.accumulated_ids() * t.dim() * 4) as u64);
        self.dense_bytes() + rows.sum::<u64>()
    }

    /// Sparse rows created on this shard so far.
    pub fn sparse_rows(&self) -> u64 {
        self.tables.iter().map(|t| t.rows()).sum()
    }

    /// Sync mode: applies every piece's and table's accumulated gradient divided by `divisor`,
    /// then clears the sums. An update that makes a value non-finite is stopped at the block
    /// where it does (see `OptimizerConfig::step_checked`; other pieces and rows are updated)
    /// and recorded as the model's fault, named with `step` ([`ShardModel::fail`]).
    pub fn try_apply_accumulated(&self, divisor: f32, step: u64) -> Result<(), PsError> {
        let scale = 1.0 / divisor;
        let dense: Vec<_> = self.pieces.par_iter().map(|p| p.apply_accumulated(scale)).collect();
        let sparse: Vec<_> = self.tables.par_iter().map(|t| t.try_apply_accumulated(scale)).collect();
        for (p, r) in self.pieces.iter().zip(dense) {
            r.map_err(|e| self.fail(&p.tensor, format!("partition {}", p.partition), step, e))?;
        }
        for (t, r) in self.tables.iter().zip(sparse) {
            r.map_err(|(id, e)| self.fail(t.name(), format!("row {id}"), step, e))?;
        }
        Ok(())
    }

    /// [`try_apply_accumulated`](Self::try_apply_accumulated) for benches and tests: the
    /// update is checked all the same, and a fault recorded, but not returned.
    pub fn apply_accumulated(&self, divisor: f32) {
        let _ = self.try_apply_accumulated(divisor, 0);
    }
}

/// A push that passed validation ([`crate::push::validate`]), with names resolved to indices:
/// what the model takes, in sync mode into the step's sums ([`ShardModel::accumulate`]), in
/// async mode at once ([`ShardModel::apply_now`]).
pub struct ValidPush {
    pub worker: u32,
    pub step: u64,
    /// (index into [`ShardModel::pieces`], slices in element order covering the piece), each
    /// slice little-endian `f32` bytes as received.
    pub dense: Vec<(usize, Vec<Bytes>)>,
    /// (index into [`ShardModel::tables`], ids, gradient rows as little-endian bytes).
    pub sparse: Vec<(usize, Vec<u64>, Bytes)>,
    /// Gradient bytes received, for metrics.
    pub bytes: u64,
}

impl ShardModel {
    /// The spec this model was declared with.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Where every piece and row of the spec lives.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// The shard this model is.
    pub fn shard(&self) -> u32 {
        self.shard
    }

    /// The dense pieces this shard holds, indexed as [`ShardModel::piece`] says.
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// This shard's part of every sparse table, indexed as [`ShardModel::table`] says.
    pub fn tables(&self) -> &[Table] {
        &self.tables
    }

    /// Sync: adds a validated push into the step's sums (applied when the step completes,
    /// [`ShardModel::try_apply_accumulated`]). The push's buffers may be held, not copied (see
    /// [`Piece::accumulate_push`]).
    pub fn accumulate(&self, push: ValidPush) {
        for (idx, slices) in push.dense {
            self.pieces[idx].accumulate_push(&slices);
        }
        for (t, ids, values) in push.sparse {
            self.tables[t].accumulate(&ids, &values);
        }
    }

    /// Async: applies a validated push at once. An update that would make the model
    /// non-finite is recorded as its fault ([`ShardModel::fail`]).
    pub fn apply_now(&self, push: ValidPush) -> Result<(), PsError> {
        let step = push.step;
        let fail = |tensor: &str, at: String, e| self.fail(tensor, at, step, e);
        let mut grad = Vec::new();
        for (idx, slices) in push.dense {
            let piece = &self.pieces[idx];
            // A piece that arrived whole and aligned is applied from the received bytes.
            if let [whole] = slices.as_slice()
                && let Some(g) = as_f32s(whole)
            {
                piece
                    .try_apply(g)
                    .map_err(|e| fail(&piece.tensor, format!("partition {}", piece.partition), e))?;
                continue;
            }
            grad.clear();
            grad.resize(piece.len, 0.0);
            let mut offset = 0;
            for s in slices {
                let n = s.len() / 4;
                codec::copy_f32s(&mut grad[offset..offset + n], &s);
                offset += n;
            }
            piece
                .try_apply(&grad)
                .map_err(|e| fail(&piece.tensor, format!("partition {}", piece.partition), e))?;
        }
        for (t, ids, values) in push.sparse {
            let table = &self.tables[t];
            let mut acc = SparseAccum::default();
            acc.add(&ids, &values, table.dim());
            table.try_apply(&acc, 1.0).map_err(|(id, e)| fail(table.name(), format!("row {id}"), e))?;
        }
        Ok(())
    }
}

impl ShardModel {
    /// A copy of everything this shard holds, for a checkpoint. Each piece and each stripe of
    /// rows is copied under its own lock; in sync mode the caller takes it between steps, so
    /// the copy is one model version.
    pub fn snapshot(&self, version: u64, mode: gradflow_core::Mode) -> ShardSnapshot {
        let dense = self
            .pieces
            .par_iter()
            .map(|p| {
                let params = p.params.read().unwrap();
                let t = self.spec.dense_index(&p.tensor).expect("piece of a spec tensor");
                DensePieceSnapshot {
                    tensor: p.tensor.clone(),
                    partition: p.partition,
                    offset: self.placement.pieces_of(t)[p.partition as usize].offset,
                    values: params.values.to_vec(),
                    state: params.state.clone(),
                    steps: params.steps,
                }
            })
            .collect();
        let sparse = self.tables.iter().map(|t| t.snapshot()).collect();
        ShardSnapshot {
            shard: self.shard,
            num_shards: self.placement.num_shards,
            version,
            mode,
            spec: self.spec.clone(),
            partition_bytes: self.placement.partition_bytes,
            dense,
            sparse,
            serving: None,
        }
    }

    /// A shard holding exactly what `snap` holds. `snap` must have been loaded for this
    /// shard's placement (see `CheckpointStore::load_shard`).
    pub fn from_snapshot(snap: ShardSnapshot, embedding: &EmbeddingSettings) -> Result<ShardModel, PsError> {
        let model = ShardModel::new(snap.spec.clone(), snap.num_shards, snap.shard, snap.partition_bytes)
            .with_embedding(embedding)?;
        for d in snap.dense {
            let idx = model.piece(&d.tensor, d.partition)?;
            let piece = &model.pieces[idx];
            let mut p = piece.params.write().unwrap();
            if d.values.len() != p.values.len() || d.state.len() != p.state.len() {
                return Err(PsError::Internal(format!(
                    "checkpoint piece `{}` partition {} has {} values and {} state, expected {} and {}",
                    d.tensor,
                    d.partition,
                    d.values.len(),
                    d.state.len(),
                    p.values.len(),
                    p.state.len()
                )));
            }
            p.values = Arc::new(d.values);
            p.state = d.state;
            p.steps = d.steps;
        }
        for t in snap.sparse {
            let idx = model.table(&t.table)?;
            model.tables[idx].restore(&t)?;
        }
        Ok(model)
    }
}

impl Piece {
    /// The dense tensor this is a piece of.
    pub fn tensor(&self) -> &str {
        &self.tensor
    }

    /// Which partition of its tensor this piece is.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// Elements in this piece.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the piece has no elements (never, for a declared spec).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A copy of the values (for tests and tools; pulls use [`Piece::read`]).
    pub fn values(&self) -> Vec<f32> {
        self.params.read().unwrap().values.to_vec()
    }

    /// A copy of the optimizer state, slot-major.
    pub fn state(&self) -> Vec<f32> {
        self.params.read().unwrap().state.clone()
    }

    /// Updates applied to this piece so far.
    pub fn steps(&self) -> u64 {
        self.params.read().unwrap().steps
    }

    /// Applies one gradient (already averaged) to this piece, checked (see
    /// [`Piece::try_apply_with`]); whether it went through is not returned.
    pub fn apply(&self, grad: &[f32]) {
        let _ = self.try_apply_with(Grad::Plain(grad));
    }

    /// Applies one gradient (already averaged) to this piece, checked.
    pub fn try_apply(&self, grad: &[f32]) -> Result<(), NonFiniteUpdate> {
        self.try_apply_with(Grad::Plain(grad))
    }

    /// Applies one gradient, computed as it is read (see [`Grad`]), to this piece, clipped and
    /// checked as `OptimizerConfig::step_checked` does: an update that makes a value or its
    /// state non-finite is stopped after the block where it does (that block keeps the bad
    /// values: the caller records the fault and serves the piece no more), and does not count
    /// as a step of the piece.
    pub fn try_apply_with(&self, grad: Grad<'_>) -> Result<(), NonFiniteUpdate> {
        let mut p = self.params.write().unwrap();
        let PieceParams { values, state, steps } = &mut *p;
        let t = *steps + 1;
        let values = Arc::make_mut(values).as_mut_slice();
        if self.check_finite.load(Ordering::Relaxed) {
            self.optimizer.step_checked(values, grad, state, t)?;
        } else {
            self.optimizer.step_clipped(values, grad, state, t);
        }
        *steps = t;
        Ok(())
    }

    /// Adds little-endian gradient bytes at element `offset` into this step's sum.
    pub fn accumulate(&self, offset: usize, bytes: &[u8]) {
        let mut acc = self.accum.lock().unwrap();
        acc.settle(self.len);
        if !acc.touched {
            acc.sum.fill(0.0);
        }
        let n = bytes.len() / 4;
        codec::add_f32s(&mut acc.sum[offset..offset + n], bytes);
        acc.touched = true;
    }

    /// Adds one worker's gradient for the whole piece, in `slices` that cover it in order (as
    /// a validated push's do), into this step's sum. The first two pushes of a step are held
    /// as received where they can be (see [`Accum`]); otherwise the first is copied.
    pub fn accumulate_push(&self, slices: &[Bytes]) {
        debug_assert_eq!(slices.iter().map(|s| s.len()).sum::<usize>(), self.len * 4);
        let mut acc = self.accum.lock().unwrap();
        if let [whole] = slices
            && !acc.touched
            && acc.held.len() < Accum::HELD
            && as_f32s(whole).is_some()
        {
            acc.held.push(whole.clone());
            return;
        }
        acc.settle(self.len);
        let first = !acc.touched;
        let mut offset = 0;
        for s in slices {
            let n = s.len() / 4;
            let dst = &mut acc.sum[offset..offset + n];
            if first {
                codec::copy_f32s(dst, s)
            } else {
                codec::add_f32s(dst, s)
            }
            offset += n;
        }
        acc.touched = true;
    }

    fn apply_accumulated(&self, scale: f32) -> Result<(), NonFiniteUpdate> {
        let mut acc = self.accum.lock().unwrap();
        let Some(grad) = acc.grad(scale) else { return Ok(()) };
        let applied = self.try_apply_with(grad);
        acc.held.clear();
        acc.touched = false;
        applied
    }

    /// Elements `[start, start + n)` of the values as little-endian bytes. On little-endian
    /// machines the bytes are the values themselves, not a copy: the `Bytes` keeps this
    /// version of the values alive until it is sent.
    pub fn read(&self, start: usize, n: usize) -> Bytes {
        let p = self.params.read().unwrap();
        if cfg!(target_endian = "little") {
            Bytes::from_owner(ValuesRange { values: p.values.clone(), start, end: start + n })
        } else {
            codec::f32s_to_bytes(&p.values[start..start + n])
        }
    }
}

/// Little-endian `f32` bytes as `f32`s without a copy, where the host and the bytes' alignment
/// allow it.
pub(crate) fn as_f32s(bytes: &[u8]) -> Option<&[f32]> {
    if cfg!(target_endian = "little") { bytemuck::try_cast_slice(bytes).ok() } else { None }
}

/// A range of a piece's values, seen as bytes (little-endian machines only).
struct ValuesRange {
    values: Arc<Vec<f32>>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for ValuesRange {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.values[self.start..self.end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use gradflow_core::{DenseSpec, Initializer, SparseSpec};

    fn spec() -> ModelSpec {
        ModelSpec {
            dense: vec![DenseSpec {
                name: "w".into(),
                shape: vec![10],
                init: Initializer::Constant { value: 1.0 },
                optimizer: OptimizerConfig::sgd(0.5),
            }],
            sparse: vec![SparseSpec {
                name: "emb".into(),
                dim: 2,
                init: Initializer::Constant { value: 0.25 },
                optimizer: OptimizerConfig::sgd(1.0),
            }],
        }
    }

    #[test]
    fn dense_accumulate_then_apply_averages() {
        let m = ShardModel::new(spec(), 1, 0, 1 << 20);
        let p = &m.pieces[m.piece("w", 0).unwrap()];
        p.accumulate(0, &codec::f32s_to_bytes(&[2.0; 10]));
        p.accumulate(0, &codec::f32s_to_bytes(&[4.0; 10]));
        m.apply_accumulated(2.0);
        // 1 - 0.5 * mean(2, 4)
        assert_eq!(*p.params.read().unwrap().values, vec![-0.5; 10]);
        assert_eq!(p.params.read().unwrap().steps, 1);
        // a step with no gradient leaves the piece alone
        m.apply_accumulated(2.0);
        assert_eq!(p.params.read().unwrap().steps, 1);
    }

    #[test]
    fn a_step_sums_only_its_own_pushes() {
        let m = ShardModel::new(spec(), 1, 0, 1 << 20);
        let p = &m.pieces[m.piece("w", 0).unwrap()];
        let halves = |a: f32, b: f32| [codec::f32s_to_bytes(&[a; 4]), codec::f32s_to_bytes(&[b; 6])];
        p.accumulate_push(&halves(2.0, 4.0));
        p.accumulate_push(&halves(6.0, 8.0));
        m.apply_accumulated(2.0);
        // 1 - 0.5 * mean: 1 - 0.5 * 4 = -1 on the first 4, 1 - 0.5 * 6 = -2 on the rest.
        let mut want = vec![-1.0; 4];
        want.extend([-2.0; 6]);
        assert_eq!(*p.params.read().unwrap().values, want);
        // The next step's first push overwrites the last sum; a partial one starts from zero.
        p.accumulate_push(&halves(1.0, 1.0));
        m.apply_accumulated(1.0);
        want.iter_mut().for_each(|v| *v -= 0.5);
        assert_eq!(*p.params.read().unwrap().values, want);
        p.accumulate(2, &codec::f32s_to_bytes(&[2.0; 2]));
        m.apply_accumulated(1.0);
        want[2..4].iter_mut().for_each(|v| *v -= 1.0);
        assert_eq!(*p.params.read().unwrap().values, want);
    }

    #[test]
    fn the_first_two_pushes_are_applied_from_their_own_bytes_and_more_are_summed() {
        let m = ShardModel::new(spec(), 1, 0, 1 << 20);
        let p = &m.pieces[m.piece("w", 0).unwrap()];
        let whole = |v: f32| codec::f32s_to_bytes(&[v; 10]);
        let held = || p.accum.lock().unwrap().held.len();
        // One push in the step: held as received, applied from it.
        p.accumulate_push(&[whole(2.0)]);
        assert_eq!(held(), 1);
        m.apply_accumulated(1.0);
        assert_eq!(held(), 0);
        assert_eq!(*p.params.read().unwrap().values, vec![0.0; 10]);
        // Two pushes: both held, averaged over two as the update reads them.
        p.accumulate_push(&[whole(2.0)]);
        p.accumulate_push(&[whole(4.0)]);
        assert_eq!(held(), 2);
        m.apply_accumulated(2.0);
        assert_eq!(held(), 0);
        assert_eq!(*p.params.read().unwrap().values, vec![-1.5; 10]);
        // One push averaged over two workers (a step completed by a dropped worker's absence
        // is still divided by its divisor).
        p.accumulate_push(&[whole(2.0)]);
        m.apply_accumulated(2.0);
        assert_eq!(*p.params.read().unwrap().values, vec![-2.0; 10]);
        // A third push: the two held ones are summed into the sum, the third added to it.
        for v in [1.0, 2.0, 3.0] {
            p.accumulate_push(&[whole(v)]);
        }
        assert_eq!(held(), 0);
        m.apply_accumulated(3.0);
        assert_eq!(*p.params.read().unwrap().values, vec![-3.0; 10]);
        // Two held pushes followed by a partial one.
        p.accumulate_push(&[whole(2.0)]);
        p.accumulate_push(&[whole(2.0)]);
        p.accumulate(0, &codec::f32s_to_bytes(&[2.0; 5]));
        m.apply_accumulated(2.0);
        // (2 + 2 + 2) / 2 on the first five, (2 + 2) / 2 on the rest, times the rate 0.5.
        let mut want = vec![-4.5; 5];
        want.extend([-4.0; 5]);
        assert_eq!(*p.params.read().unwrap().values, want);
        // Bytes that are not aligned for f32 are copied, not held; a whole push after them is
        // added to the sum.
        p.accumulate_push(&[unaligned(&[2.0; 10])]);
        p.accumulate_push(&[whole(4.0)]);
        assert_eq!(held(), 0);
        m.apply_accumulated(2.0);
        want.iter_mut().for_each(|v| *v -= 1.5);
        assert_eq!(*p.params.read().unwrap().values, want);
        // A step with nothing pushed leaves the piece alone.
        m.apply_accumulated(2.0);
        assert_eq!(*p.params.read().unwrap().values, want);
    }

    #[test]
    fn a_pull_in_flight_keeps_its_values_while_a_step_updates_the_piece() {
        let m = ShardModel::new(spec(), 1, 0, 1 << 20);
        let p = &m.pieces[m.piece("w", 0).unwrap()];
        let before = p.read(2, 4);
        assert_eq!(before, codec::f32s_to_bytes(&[1.0; 4]));
        p.accumulate(0, &codec::f32s_to_bytes(&[3.0; 10]));
        m.apply_accumulated(1.0);
        // The update went to a copy: the bytes taken before it are unchanged, a new read sees it.
        assert_eq!(before, codec::f32s_to_bytes(&[1.0; 4]));
        assert_eq!(p.read(0, 10), codec::f32s_to_bytes(&[-0.5; 10]));
        assert_eq!(*p.params.read().unwrap().values, vec![-0.5; 10]);
        // With no read in flight the update is in place.
        let at = p.params.read().unwrap().values.as_ptr();
        p.accumulate(0, &codec::f32s_to_bytes(&[1.0; 10]));
        m.apply_accumulated(1.0);
        assert_eq!(p.params.read().unwrap().values.as_ptr(), at);
        assert_eq!(*p.params.read().unwrap().values, vec![-1.0; 10]);
    }

    #[test]
    fn sparse_rows_are_created_by_pushes_not_pulls() {
        let m = ShardModel::new(spec(), 1, 0, 1 << 20);
        let t = &m.tables[0];
        let mut out = Vec::new();
        t.pull(&[7, 9, 7], &mut out);
        assert_eq!(t.rows(), 0, "a pull reads what a new row would hold and creates none");
        let vals: Vec<f32> = out.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(vals, vec![0.25; 6]);
        let mut acc = SparseAccum::default();
        // duplicate id 7: its gradients are summed
        acc.add(&[7, 7, 11], &codec::f32s_to_bytes(&[0.5, 0.5, 0.25, 0.25, 1.0, 1.0]), 2);
        t.apply(&acc, 1.0);
        let mut out = Vec::new();
        t.pull(&[7, 9, 11], &mut out);
        let vals: Vec<f32> = out.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(vals, vec![-0.5, -0.5, 0.25, 0.25, -0.75, -0.75]);
        assert_eq!(t.rows(), 2, "9 was only pulled");
    }

    #[test]
    fn a_sync_step_applies_only_its_own_sparse_gradients() {
        let m = ShardModel::new(spec(), 1, 0, 1 << 20);
        let t = &m.tables[0];
        let rows = |ids: &[u64]| {
            let mut out = Vec::new();
            t.pull(ids, &mut out);
            out.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<f32>>()
        };
        let push = |ids: &[u64], g: f32| t.accumulate(ids, &codec::f32s_to_bytes(&vec![g; ids.len() * 2]));
        push(&[3, 5], 1.0);
        push(&[5], 1.0);
        m.apply_accumulated(2.0);
        // 0.25 - (sum / 2): id 3 had one gradient of 1, id 5 two.
        assert_eq!(rows(&[3, 5]), vec![-0.25, -0.25, -0.75, -0.75]);
        // The sums went back emptied: the next step sees only its own pushes.
        assert_eq!(t.accumulated_ids(), 0);
        // Id 5 again, and a new one: had the emptied sums kept their index, 5 would find a
        // stale slot.
        push(&[8, 5], 0.5);
        m.apply_accumulated(1.0);
        assert_eq!(rows(&[3, 5, 8]), vec![-0.25, -0.25, -1.25, -1.25, -0.25, -0.25]);
        m.apply_accumulated(1.0);
        assert_eq!(rows(&[8]), vec![-0.25, -0.25], "a step with no push changes nothing");
    }

    #[test]
    fn rows_of_small_and_huge_ids_survive_a_snapshot() {
        let m = ShardModel::new(spec(), 1, 0, 1 << 20);
        let t = &m.tables[0];
        // Small ids are indexed directly, huge ones by hash; both must update and come back.
        let ids: Vec<u64> = (0..5000u64).map(|i| i * 7).chain([u64::MAX, 1 << 50, (1 << 50) + 32]).collect();
        let grads: Vec<f32> = (0..ids.len() * 2).map(|i| (i % 13) as f32 * 0.125).collect();
        let mut acc = SparseAccum::default();
        acc.add(&ids, &codec::f32s_to_bytes(&grads), 2);
        t.apply(&acc, 1.0);
        let (mut before, mut after) = (Vec::new(), Vec::new());
        t.pull(&ids, &mut before);
        for (k, id) in ids.iter().enumerate() {
            let row = f32::from_le_bytes(before[k * 8..][..4].try_into().unwrap());
            assert_eq!(row, 0.25 - grads[k * 2], "id {id}");
        }
        let restored =
            ShardModel::from_snapshot(m.snapshot(1, gradflow_core::Mode::Sync), &Default::default()).unwrap();
        assert_eq!(restored.tables[0].rows(), ids.len() as u64);
        restored.tables[0].pull(&ids, &mut after);
        assert_eq!(after, before);
        assert_eq!(restored.tables[0].rows(), ids.len() as u64, "no row was created twice");
    }

    /// A gradient that no sum of a few terms can make round like another: different in every
    /// element and worker.
    fn irregular(n: usize, worker: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 0.7311 + worker as f32 * 1.37).sin() * 0.1) / (1.0 + i as f32 * 1e-3))
            .collect()
    }

    /// Bytes of `values` that start one byte into their buffer: not aligned for `f32`.
    fn unaligned(values: &[f32]) -> Bytes {
        let mut raw = vec![0u8];
        codec::extend_f32s(&mut raw, values);
        Bytes::from(raw).slice(1..)
    }

    #[test]
    fn a_steps_update_rounds_exactly_as_the_mean_worked_out_first() {
        const N: usize = 1003;
        let spec = ModelSpec {
            dense: vec![DenseSpec {
                name: "w".into(),
                shape: vec![N as u64],
                init: Initializer::Normal { mean: 0.0, std: 0.3, seed: 11 },
                optimizer: OptimizerConfig::adam(0.01),
            }],
            sparse: vec![],
        };
        let whole = |w: u32| vec![codec::f32s_to_bytes(&irregular(N, w))];
        let sliced = |w: u32| {
            let g = codec::f32s_to_bytes(&irregular(N, w));
            vec![g.slice(..400), g.slice(400..1200), g.slice(1200..)]
        };
        let odd = |w: u32| vec![unaligned(&irregular(N, w))];
        type Push = Box<dyn Fn(u32) -> Vec<Bytes>>;
        // The pushes of a step, and how many workers the step counts: a step completed without
        // a dropped worker's push is still divided by its count. (Halving is exact, so only a
        // divisor like 3 tells `(a + b) * s` from `a * s + b * s`.)
        let (wh, sl, od): (Push, Push, Push) = (Box::new(whole), Box::new(sliced), Box::new(odd));
        let cases: Vec<(&str, Vec<&Push>, f32)> = vec![
            ("one whole push", vec![&wh], 1.0),
            ("one whole push of three workers", vec![&wh], 3.0),
            ("two whole pushes (both held)", vec![&wh, &wh], 2.0),
            ("two whole pushes (both held) of three workers", vec![&wh, &wh], 3.0),
            ("three whole pushes", vec![&wh, &wh, &wh], 3.0),
            ("a sliced push, then a whole one", vec![&sl, &wh], 3.0),
            ("a whole push, then a sliced one", vec![&wh, &sl], 3.0),
            ("an unaligned push, then a whole one", vec![&od, &wh], 3.0),
            ("two whole pushes, then an unaligned one", vec![&wh, &wh, &od], 3.0),
        ];
        for (what, pushes, divisor) in cases {
            let m = ShardModel::new(spec.clone(), 1, 0, 1 << 20);
            let p = &m.pieces[m.piece("w", 0).unwrap()];
            let (mut want, mut state) = {
                let params = p.params.read().unwrap();
                (params.values.to_vec(), params.state.clone())
            };
            // Two steps, so that the second starts from what the first left behind.
            for step in 1..=2u64 {
                let workers = pushes.len() as u32;
                for (w, push) in pushes.iter().enumerate() {
                    p.accumulate_push(&push(w as u32 + 10 * step as u32));
                }
                m.apply_accumulated(divisor);
                // In one process: the workers' gradients summed in the order they came, then
                // scaled by 1 / divisor, then one optimizer step.
                let mut sum = irregular(N, 10 * step as u32);
                for w in 1..workers {
                    sum.iter_mut().zip(irregular(N, w + 10 * step as u32)).for_each(|(s, g)| *s += g);
                }
                let scale = 1.0 / divisor;
                let mean: Vec<f32> = sum.iter().map(|g| g * scale).collect();
                spec.dense[0].optimizer.step(&mut want, &mean, &mut state, step);
                let got = p.params.read().unwrap().values.to_vec();
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "{what}, step {step}, element {i}: got {g}, want {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_large_sparse_update_matches_one_row_at_a_time() {
        let dim = 8;
        let table = SparseSpec {
            name: "emb".into(),
            dim: dim as u32,
            init: Initializer::Uniform { low: -0.1, high: 0.1, seed: 5 },
            optimizer: OptimizerConfig::adagrad(0.1),
        };
        let m = ShardModel::new(ModelSpec { dense: vec![], sparse: vec![table.clone()] }, 1, 0, 1 << 20);
        let t = &m.tables[0];
        // Enough ids for the parallel path and for rows far past the prefetch distance in
        // every stripe; some repeated, some huge.
        let ids: Vec<u64> =
            (0..6000u64).map(|i| if i % 500 == 0 { u64::MAX - i } else { (i * 7919) % 4000 }).collect();
        let grads: Vec<f32> = (0..ids.len() * dim).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut acc = SparseAccum::default();
        acc.add(&ids, &codec::f32s_to_bytes(&grads), dim);
        t.apply(&acc, 0.5);
        // One row at a time: the sum of each id's gradients in the order they came, scaled.
        let mut sums: Vec<(u64, Vec<f32>)> = Vec::new();
        for (k, &id) in ids.iter().enumerate() {
            let g = &grads[k * dim..(k + 1) * dim];
            match sums.iter_mut().find(|(i, _)| *i == id) {
                Some((_, s)) => s.iter_mut().zip(g).for_each(|(a, b)| *a += b),
                None => sums.push((id, g.to_vec())),
            }
        }
        assert!(sums.len() < ids.len(), "some ids repeat");
        let unique: Vec<u64> = sums.iter().map(|(id, _)| *id).collect();
        let mut out = Vec::new();
        t.pull(&unique, &mut out);
        for (k, (id, sum)) in sums.iter().enumerate() {
            let mut row = vec![0f32; dim];
            table.init.fill_row(&table.name, *id, &mut row);
            let mut state = vec![0f32; dim * table.optimizer.num_slots()];
            table.optimizer.init_state(&mut state);
            let mean: Vec<f32> = sum.iter().map(|g| g * 0.5).collect();
            table.optimizer.step(&mut row, &mean, &mut state, 1);
            let got: Vec<f32> = out[k * dim * 4..][..dim * 4]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&row), "id {id}: got {got:?}, want {row:?}");
        }
    }

    #[test]
    fn missing_pieces_and_tables_are_named() {
        let m = ShardModel::new(spec(), 1, 0, 1 << 20);
        assert!(matches!(m.piece("nope", 0), Err(PsError::UnknownTensor(n)) if n == "nope"));
        assert!(matches!(m.piece("w", 3), Err(PsError::InvalidArgument(_))));
        assert!(matches!(m.table("x"), Err(PsError::UnknownTable(n)) if n == "x"));
    }
}
