//! One shard's rows of one sparse embedding table: which ids have a row, the rows' values and
//! optimizer state, and the table's admission and eviction ([`TablePolicy`], the job file's
//! `[embedding]` section).
//!
//! - A **pull** reads the rows that exist and gives every other id what a new row would hold
//!   (the initializer's value for that id). It never creates a row, so scoring (evaluation,
//!   observers, serving) does not grow the table.
//! - A **push** updates rows. An id without a row gets one if the policy admits it: at once
//!   by default, after `admit_min_count` pushes counted in a count-min [`Sketch`], or with
//!   `admit_probability`; until then its gradient is dropped and counted.
//! - **Eviction**: each apply is one step of the table's clock; a row remembers the step it
//!   was last updated. Rows not updated for `evict_after_steps` steps are dropped, and at
//!   `max_rows` rows make room for new ones: those updated fewest times (`evict = "lfu"`, the
//!   default, chosen by AUC under a cap), or those updated longest ago (`"lru"`). A dropped row that comes back starts again from the initializer.
//!
//! Rows live in [`STRIPES`] independently locked stripes (by id), each one contiguous arena,
//! so pushes to different stripes proceed in parallel; the cap and the sketch are split
//! evenly over the stripes, so a stripe decides alone.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use gradflow_checkpoint::TableSnapshot;
use gradflow_core::embedding::{Admission, EvictPolicy, Storage, TablePolicy};
use gradflow_core::{Grad, Initializer, NonFiniteUpdate, OptimizerConfig, SparseSpec};
use gradflow_proto::codec;
use rayon::prelude::*;
use rustc_hash::FxHashMap;

use crate::PsError;

/// Rows of a table are spread over this many independently locked stripes.
pub(crate) const STRIPES: usize = 32;

/// Hashes of an id in the admission sketch (rows of the count-min sketch).
const SKETCH_DEPTH: usize = 4;

/// This shard's rows of one sparse table.
pub struct Table {
    name: String,
    dim: usize,
    init: Initializer,
    optimizer: OptimizerConfig,
    slots: usize,
    policy: TablePolicy,
    /// Compact storage of the values (`storage = "f16" | "bf16"`), or `None` for f32.
    half: Option<Half>,
    stripes: Vec<Mutex<RowStore>>,
    /// Sync mode: the sum of this step's gradients, per id.
    accum: Mutex<SparseAccum>,
    /// Whether updates are checked for NaN and infinity (`ShardModel::set_check_finite`).
    check_finite: AtomicBool,
    /// Applies so far: the table's steps, which eviction counts in.
    clock: AtomicU32,
    counts: TableCounts,
}

/// What a table's policy did, since the shard started.
#[derive(Default)]
struct TableCounts {
    admitted: AtomicU64,
    evicted: AtomicU64,
    dropped: AtomicU64,
}

/// A table's size and what its policy did, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TableStats {
    pub rows: u64,
    /// Memory of the rows: values, optimizer state, id, update count and clock, and the
    /// admission sketch.
    pub bytes: u64,
    /// Rows created (ids admitted), evicted, and gradient rows dropped because their id had no
    /// row and was not admitted.
    pub admitted: u64,
    pub evicted: u64,
    pub dropped: u64,
}

/// Rows in one contiguous arena: each row is `[value; dim]` then `[slot; dim]` per slot; with
/// compact storage the values are in `half` instead (`[value; dim]` per row, 16 bits each).
#[derive(Default)]
struct RowStore {
    index: RowIndex,
    /// The id of each row, in row order.
    ids: Vec<u64>,
    data: Vec<f32>,
    /// Compact storage: the rows' values as f16 or bf16 bits; `hdim` per row (0 with f32).
    half: Vec<u16>,
    hdim: usize,
    /// Compact storage: a new row's f32 values on their way into `half`.
    scratch: Vec<f32>,
    /// Optimizer updates of each row.
    steps: Vec<u32>,
    /// The table's clock when each row was last updated (or created).
    touched: Vec<u32>,
    /// Pushes of ids without a row (`admit_min_count`); `None` without one.
    sketch: Option<Sketch>,
    /// Draws made for `admit_probability`.
    draws: u64,
    /// The clock at the last sweep for `evict_after_steps`.
    swept: u32,
}

/// Where each id's row is in a [`RowStore`] of one stripe.
///
/// Ids of most tables are small and dense (hashed into a fixed number of buckets), so they are
/// indexed directly by `id / STRIPES` (the stripe is `id % STRIPES`): one load from an array
/// of 4 bytes per id instead of a hash probe, which on a large table is two cache misses. The
/// array grows only while it stays within a few entries per row, so sparse ids (large,
/// scattered) cannot make it big; those go to a hash table ([`IdMap`]). When the array grows,
/// the ids of the table that now fit move into it, so a table whose ids turn out dense ends up
/// with an empty map (and a lookup of a new id does not probe it).
///
/// Every method takes the store's `ids` (the id of each row): the hash table holds only row
/// numbers and reads a row's id from there, 4 bytes a slot instead of 16.
#[derive(Default)]
struct RowIndex {
    /// Row of id `local * STRIPES + stripe` at `direct[local]`; `ABSENT` where there is none.
    direct: Vec<u32>,
    /// Rows of ids that were past `direct`'s end when they came.
    other: IdMap,
}

/// An open-addressing hash table of row numbers keyed by their rows' ids (linear probing,
/// deletion by shifting back, so no tombstones), at most 7/8 full.
///
/// A capped stripe's map is sized for its cap when it first takes a row ([`IdMap::size_for`]):
/// 3/4 full at the cap, where doubling from a power of two would leave it half empty (4 bytes
/// a slot: about 2.7 bytes per row less).
#[derive(Default)]
struct IdMap {
    /// The slots (any number, or none), each a row number or `RowIndex::ABSENT`.
    slots: Vec<u32>,
    len: usize,
    /// The rows this map is expected to hold at most (a stripe's cap); 0 when unknown.
    expect: usize,
}

impl IdMap {
    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sizes the map for `rows` rows when it next grows.
    fn size_for(&mut self, rows: usize) {
        self.expect = rows;
    }

    fn home(&self, id: u64) -> usize {
        // The high bits of the product: a uniform slot for any number of slots.
        ((mix64(id) as u128 * self.slots.len() as u128) >> 64) as usize
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() { 0 } else { i + 1 }
    }

    /// The slot holding the row of `id`.
    fn find(&self, id: u64, ids: &[u64]) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let mut i = self.home(id);
        loop {
            match self.slots[i] {
                RowIndex::ABSENT => return None,
                r if ids[r as usize] == id => return Some(i),
                _ => i = self.next(i),
            }
        }
    }

    fn get(&self, id: u64, ids: &[u64]) -> Option<u32> {
        self.find(id, ids).map(|i| self.slots[i])
    }

    /// Adds `row` (whose id, `ids[row]`, is not present).
    fn insert(&mut self, row: u32, ids: &[u64]) {
        if (self.len + 1) * 8 > self.slots.len() * 7 {
            let rows = self.take_rows();
            let wanted = rows.len() + 1;
            let size = if wanted <= self.expect { self.expect * 4 / 3 + 1 } else { rows.len() * 2 };
            self.slots = vec![RowIndex::ABSENT; size.max(16)];
            for r in rows {
                self.place(r, ids);
            }
        }
        self.place(row, ids);
    }

    fn place(&mut self, row: u32, ids: &[u64]) {
        let mut i = self.home(ids[row as usize]);
        while self.slots[i] != RowIndex::ABSENT {
            i = self.next(i);
        }
        self.slots[i] = row;
        self.len += 1;
    }

    /// Every row held, leaving the table empty (its slots kept).
    fn take_rows(&mut self) -> Vec<u32> {
        let rows: Vec<u32> = self.slots.iter().copied().filter(|&r| r != RowIndex::ABSENT).collect();
        self.slots.iter_mut().for_each(|s| *s = RowIndex::ABSENT);
        self.len = 0;
        rows
    }

    /// Points the present `id` at `row`; `ids` may already say `row` is `id`, but must still
    /// hold `id` at the old row.
    fn set(&mut self, id: u64, row: u32, ids: &[u64]) -> bool {
        match self.find(id, ids) {
            Some(i) => {
                self.slots[i] = row;
                true
            }
            None => false,
        }
    }

    /// Forgets the present `id`; the slots after it move back to where a lookup finds them.
    fn remove(&mut self, id: u64, ids: &[u64]) -> bool {
        let Some(mut hole) = self.find(id, ids) else { return false };
        self.slots[hole] = RowIndex::ABSENT;
        self.len -= 1;
        let mut j = hole;
        loop {
            j = self.next(j);
            let r = self.slots[j];
            if r == RowIndex::ABSENT {
                return true;
            }
            let home = self.home(ids[r as usize]);
            // The entry at `j` may fill the hole unless its home lies cyclically in (hole, j].
            let stays = if hole < j { hole < home && home <= j } else { hole < home || home <= j };
            if !stays {
                self.slots[hole] = r;
                self.slots[j] = RowIndex::ABSENT;
                hole = j;
            }
        }
    }
}

/// A count-min sketch with conservative update: counts of ids in one-byte cells, never too
/// low, too high only where ids share all their cells.
struct Sketch {
    /// `SKETCH_DEPTH` rows of `width` cells.
    cells: Vec<u8>,
    width: usize,
}

/// Gradients summed per id.
#[derive(Default)]
pub struct SparseAccum {
    index: FxHashMap<u64, u32>,
    ids: Vec<u64>,
    sums: Vec<f32>,
}

impl RowIndex {
    const ABSENT: u32 = u32::MAX;
    /// `direct` may always grow this far (256 KiB: 2M ids over the 32 stripes)...
    const DIRECT_MIN: usize = 1 << 16;
    /// ...and beyond it, to at most this many entries per row: about what a hash map spends
    /// per row, and room for the gaps of ids that other shards hold (with 8 shards, a shard
    /// holds one id in 8 of a dense range).
    const DIRECT_PER_ROW: usize = 8;

    /// Asks for the cache line [`get`](Self::get) reads first for `id`.
    #[inline(always)]
    fn prefetch(&self, id: u64) {
        if let Some(slot) = self.direct.get((id / STRIPES as u64) as usize) {
            prefetch(std::slice::from_ref(slot));
        }
    }

    fn get(&self, id: u64, ids: &[u64]) -> Option<u32> {
        let local = id / STRIPES as u64;
        if let Some(&r) = self.direct.get(local as usize)
            && r != Self::ABSENT
        {
            return Some(r);
        }
        if self.other.is_empty() { None } else { self.other.get(id, ids) }
    }

    /// Records `row` for `id` (not yet present, and `ids[row] == id`); `rows` is how many
    /// rows the store holds.
    fn insert(&mut self, id: u64, row: u32, rows: usize, ids: &[u64]) {
        let local = id / STRIPES as u64;
        let limit = Self::DIRECT_MIN.max(Self::DIRECT_PER_ROW * rows) as u64;
        if local < self.direct.len() as u64 || local < limit {
            let local = local as usize;
            if local >= self.direct.len() {
                let len = (local + 1).next_power_of_two().min(limit as usize).max(local + 1);
                self.direct.resize(len, Self::ABSENT);
                if !self.other.is_empty() {
                    for r in self.other.take_rows() {
                        match self.direct.get_mut((ids[r as usize] / STRIPES as u64) as usize) {
                            Some(slot) => *slot = r,
                            None => self.other.insert(r, ids),
                        }
                    }
                }
            }
            self.direct[local] = row;
        } else {
            self.other.insert(row, ids);
        }
    }

    /// Points the present `id` at `row` (see [`IdMap::set`] for what `ids` must hold).
    fn set(&mut self, id: u64, row: u32, ids: &[u64]) {
        match self.direct.get_mut((id / STRIPES as u64) as usize) {
            Some(slot) if *slot != Self::ABSENT => *slot = row,
            _ => {
                let found = self.other.set(id, row, ids);
                debug_assert!(found, "id {id} is present");
            }
        }
    }

    /// Forgets the present `id` (`ids` still holding it at its row).
    fn remove(&mut self, id: u64, ids: &[u64]) {
        match self.direct.get_mut((id / STRIPES as u64) as usize) {
            Some(slot) if *slot != Self::ABSENT => *slot = Self::ABSENT,
            _ => {
                let found = self.other.remove(id, ids);
                debug_assert!(found, "id {id} is present");
            }
        }
    }
}

impl Sketch {
    fn new(cells: u64) -> Sketch {
        let width = ((cells as usize) / SKETCH_DEPTH).max(1);
        Sketch { cells: vec![0; width * SKETCH_DEPTH], width }
    }

    fn cell(&self, id: u64, k: usize) -> usize {
        let h = mix64(id ^ (k as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        k * self.width + (h % self.width as u64) as usize
    }

    /// Counts one more push of `id`; returns its count so far (at most 255).
    fn count(&mut self, id: u64) -> u8 {
        let cells: [usize; SKETCH_DEPTH] = std::array::from_fn(|k| self.cell(id, k));
        let now = cells.iter().map(|&c| self.cells[c]).min().unwrap_or(0).saturating_add(1);
        for c in cells {
            if self.cells[c] < now {
                self.cells[c] = now;
            }
        }
        now
    }
}

/// A 64-bit finalizer (splitmix64's): every bit of the id moves every bit of the result.
fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn stripe_of(id: u64) -> usize {
    // The low bits, so that `id / STRIPES` numbers a stripe's ids densely (see `RowIndex`).
    // The shard choice mixes the id first, so every stripe of a shard gets ids.
    (id % STRIPES as u64) as usize
}

/// How many rows ahead a pull or an update of a table's rows asks for the row it will need.
///
/// A large table's rows are mostly not in the cache, and a pull or an update knows every row
/// it will visit before it starts; the processor does not reach the next rows' loads on its
/// own, so they are asked for ahead: the row, and in an update its update count and clock
/// too (arrays of their own). With other ids at every step, as in a job, this took an apply
/// of 10,000 rows of a 1M-row table from 1.99 to 0.96 ms and a pull from 0.59 to 0.42 ms
/// (`cargo bench -p gradflow-benches --bench aggregate -- "other ids"`).
const PREFETCH_ROWS_AHEAD: usize = 8;

/// Hints the processor to load the cache lines of `row` (no effect on what the program does).
#[inline(always)]
fn prefetch<T>(row: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        const LINE: usize = 64;
        let (start, len) = (row.as_ptr().cast::<i8>(), std::mem::size_of_val(row));
        // One address every 64 bytes from the row's start, then its last byte: together they
        // fall on every line the row touches, whether or not it starts on a line.
        for offset in (0..len).step_by(LINE).chain(len.checked_sub(1)) {
            // SAFETY: a prefetch is a hint that never faults, and the address is inside
            // `row`; SSE is part of every x86-64.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(offset)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

impl RowStore {
    fn len(&self) -> usize {
        self.ids.len()
    }

    /// Drops row `r`: the last row moves into its place.
    fn swap_remove(&mut self, r: usize, stride: usize) {
        let last = self.len() - 1;
        self.index.remove(self.ids[r], &self.ids);
        if r != last {
            self.data.copy_within(last * stride..(last + 1) * stride, r * stride);
            let h = self.hdim;
            self.half.copy_within(last * h..(last + 1) * h, r * h);
            self.ids[r] = self.ids[last];
            self.steps[r] = self.steps[last];
            self.touched[r] = self.touched[last];
            self.index.set(self.ids[r], r as u32, &self.ids);
        }
        self.ids.truncate(last);
        self.steps.truncate(last);
        self.touched.truncate(last);
        self.data.truncate(last * stride);
        self.half.truncate(last * self.hdim);
    }

    /// Drops the rows at `rows` (each once); returns how many.
    fn remove_rows(&mut self, mut rows: Vec<u32>, stride: usize) -> u64 {
        // Highest first: the row that moves into a hole is then never one still to go.
        rows.sort_unstable_by(|a, b| b.cmp(a));
        for &r in &rows {
            self.swap_remove(r as usize, stride);
        }
        rows.len() as u64
    }

    /// Drops up to `n` rows as `policy` chooses them, none updated at `clock` (this step's).
    fn evict_oldest(&mut self, n: usize, clock: u32, stride: usize, policy: EvictPolicy) -> u64 {
        let key = |r: usize| match policy {
            EvictPolicy::LeastRecent => u64::from(self.touched[r]),
            EvictPolicy::LeastFrequent => (u64::from(self.steps[r]) << 32) | u64::from(self.touched[r]),
        };
        let mut old: Vec<(u64, u32)> = (0..self.len() as u32)
            .filter(|&r| self.touched[r as usize] != clock)
            .map(|r| (key(r as usize), r))
            .collect();
        if old.len() > n {
            old.select_nth_unstable(n);
            old.truncate(n);
        }
        self.remove_rows(old.into_iter().map(|(_, r)| r).collect(), stride)
    }

    /// Drops the rows not updated for more than `after` steps of `clock`.
    fn evict_idle(&mut self, after: u32, clock: u32, stride: usize) -> u64 {
        let idle: Vec<u32> = (0..self.len() as u32)
            .filter(|&r| clock.saturating_sub(self.touched[r as usize]) > after)
            .collect();
        self.remove_rows(idle, stride)
    }
}

impl Table {
    /// An empty table of `spec` following `policy`.
    pub fn new(spec: &SparseSpec, policy: TablePolicy) -> Table {
        let sketch_cells = match policy.admit {
            Admission::MinCount { cells, .. } => Some((cells / STRIPES as u64).max(SKETCH_DEPTH as u64)),
            _ => None,
        };
        let half = match policy.storage {
            Storage::F32 => None,
            Storage::F16 => Some(Half::F16),
            Storage::Bf16 => Some(Half::Bf16),
        };
        let hdim = if half.is_some() { spec.dim as usize } else { 0 };
        Table {
            name: spec.name.clone(),
            dim: spec.dim as usize,
            init: spec.init.clone(),
            optimizer: spec.optimizer.clone(),
            slots: spec.optimizer.num_slots(),
            policy,
            half,
            stripes: (0..STRIPES)
                .map(|_| {
                    Mutex::new(RowStore {
                        sketch: sketch_cells.map(Sketch::new),
                        hdim,
                        ..RowStore::default()
                    })
                })
                .collect(),
            accum: Mutex::new(SparseAccum::default()),
            check_finite: AtomicBool::new(true),
            clock: AtomicU32::new(0),
            counts: TableCounts::default(),
        }
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Values per row.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// What the table follows.
    pub fn policy(&self) -> &TablePolicy {
        &self.policy
    }

    pub(crate) fn set_check_finite(&self, on: bool) {
        self.check_finite.store(on, Ordering::Relaxed);
    }

    /// Sync: adds gradient rows (little-endian, [`Table::dim`] per id) for `ids` into the
    /// step's sums.
    pub fn accumulate(&self, ids: &[u64], values: &[u8]) {
        self.accum.lock().unwrap().add(ids, values, self.dim);
    }

    /// Ids in the step's sums.
    pub(crate) fn accumulated_ids(&self) -> usize {
        self.accum.lock().unwrap().ids.len()
    }

    /// Sync: applies the step's sums multiplied by `scale` and empties them.
    pub(crate) fn try_apply_accumulated(&self, scale: f32) -> Result<(), (u64, NonFiniteUpdate)> {
        let mut acc = std::mem::take(&mut *self.accum.lock().unwrap());
        let applied = self.try_apply(&acc, scale);
        // Back for the next step, emptied but with its capacity: a step's ids would
        // otherwise grow a new map from nothing, rehashing as it goes.
        acc.clear();
        let mut next = self.accum.lock().unwrap();
        if next.is_empty() {
            *next = acc;
        }
        applied
    }

    /// Floats of a row in `RowStore::data`: its values (unless compact) and its state.
    fn stride(&self) -> usize {
        self.dim * (self.slots + usize::from(self.half.is_none()))
    }

    /// The dim values of row `r` of `store`, as f32, into `out`.
    fn values_of(&self, store: &RowStore, r: usize, out: &mut [f32]) {
        match self.half {
            None => out.copy_from_slice(&store.data[r * self.stride()..][..self.dim]),
            Some(h) => h.decode(&store.half[r * self.dim..][..self.dim], out),
        }
    }

    /// Bytes one row takes: values and state, id, update count, clock.
    pub fn row_bytes(&self) -> u64 {
        let values = if self.half.is_some() { self.dim * 2 } else { 0 };
        (self.stride() * 4 + values + 8 + 4 + 4) as u64
    }

    /// A copy of every row of this table on this shard, with the clock and the sketch.
    pub(crate) fn snapshot(&self) -> TableSnapshot {
        let stride = self.stride();
        let mut snap = TableSnapshot {
            table: self.name.clone(),
            dim: self.dim as u32,
            num_slots: self.slots as u32,
            ids: Vec::new(),
            values: Vec::new(),
            state: Vec::new(),
            steps: Vec::new(),
            touched: Vec::new(),
            clock: self.clock.load(Ordering::Relaxed),
            sketch: Vec::new(),
        };
        let state_at = if self.half.is_some() { 0 } else { self.dim };
        let mut values = vec![0f32; self.dim];
        for stripe in &self.stripes {
            let store = stripe.lock().unwrap();
            for (row, &id) in store.ids.iter().enumerate() {
                let data = &store.data[row * stride..][..stride];
                snap.ids.push(id);
                self.values_of(&store, row, &mut values);
                snap.values.extend_from_slice(&values);
                snap.state.extend_from_slice(&data[state_at..]);
                snap.steps.push(store.steps[row]);
                snap.touched.push(store.touched[row]);
            }
            if let Some(s) = &store.sketch {
                snap.sketch.extend_from_slice(&s.cells);
            }
        }
        snap
    }

    /// Puts the rows of a snapshot into this (empty) table, with its clock and, where this
    /// table counts with a sketch of the same size, its counts. Rows past `max_rows` (a cap
    /// lowered since the checkpoint) go as eviction would take them.
    pub(crate) fn restore(&self, snap: &TableSnapshot) -> Result<(), PsError> {
        let (dim, slots) = (self.dim, self.slots);
        if snap.dim as usize != dim || snap.num_slots as usize != slots {
            return Err(PsError::Internal(format!(
                "checkpoint table `{}` has dim {} and {} optimizer slots, the spec says {dim} and {slots}",
                snap.table, snap.dim, snap.num_slots
            )));
        }
        let n = snap.ids.len();
        let touched_ok = snap.touched.is_empty() || snap.touched.len() == n;
        if snap.values.len() != n * dim
            || snap.state.len() != n * dim * slots
            || snap.steps.len() != n
            || !touched_ok
        {
            return Err(PsError::Internal(format!(
                "checkpoint table `{}` has inconsistent lengths",
                snap.table
            )));
        }
        self.clock.store(snap.clock, Ordering::Relaxed);
        let mut stores: Vec<_> = self.stripes.iter().map(|s| s.lock().unwrap()).collect();
        for (k, &id) in snap.ids.iter().enumerate() {
            let store = &mut stores[stripe_of(id)];
            let r = store.len();
            let values = &snap.values[k * dim..][..dim];
            match self.half {
                None => store.data.extend_from_slice(values),
                Some(h) => h.extend(&mut store.half, values),
            }
            store.data.extend_from_slice(&snap.state[k * dim * slots..][..dim * slots]);
            store.steps.push(snap.steps[k]);
            store.touched.push(snap.touched.get(k).copied().unwrap_or(snap.clock));
            store.ids.push(id);
            let store: &mut RowStore = store;
            store.index.insert(id, r as u32, r + 1, &store.ids);
        }
        let stride = self.stride();
        if let Some(cap) = self.stripe_cap() {
            for store in stores.iter_mut().filter(|s| s.len() > cap) {
                let excess = store.len() - cap;
                store.evict_oldest(excess, u32::MAX, stride, self.policy.evict);
            }
        }
        let total: usize = stores.iter().filter_map(|s| s.sketch.as_ref()).map(|s| s.cells.len()).sum();
        if total > 0 && snap.sketch.len() == total {
            let mut at = 0;
            for s in stores.iter_mut().filter_map(|s| s.sketch.as_mut()) {
                let n = s.cells.len();
                s.cells.copy_from_slice(&snap.sketch[at..at + n]);
                at += n;
            }
        } else if total > 0 && !snap.sketch.is_empty() {
            tracing::warn!(
                table = %self.name,
                "the checkpoint's admission counts were kept in {} cells, this table has {total}: counting starts again",
                snap.sketch.len()
            );
        }
        Ok(())
    }

    /// Rows this shard holds.
    pub fn rows(&self) -> u64 {
        self.stripes.iter().map(|s| s.lock().unwrap().len() as u64).sum()
    }

    /// Size and policy counts.
    pub fn stats(&self) -> TableStats {
        let (mut rows, mut sketch) = (0u64, 0u64);
        for s in &self.stripes {
            let s = s.lock().unwrap();
            rows += s.len() as u64;
            sketch += s.sketch.as_ref().map_or(0, |k| k.cells.len() as u64);
        }
        TableStats {
            rows,
            bytes: rows * self.row_bytes() + sketch,
            admitted: self.counts.admitted.load(Ordering::Relaxed),
            evicted: self.counts.evicted.load(Ordering::Relaxed),
            dropped: self.counts.dropped.load(Ordering::Relaxed),
        }
    }

    /// Appends the rows of `ids` to `out` as little-endian bytes: an id without a row gets
    /// what a new row would hold, and no row is created.
    pub fn pull(&self, ids: &[u64], out: &mut Vec<u8>) {
        let base = out.len();
        out.resize(base + ids.len() * self.dim * 4, 0);
        let out = &mut out[base..];
        let mut fresh = vec![0f32; self.dim];
        for (s, positions) in self.group_by_stripe(ids).into_iter().enumerate() {
            if positions.is_empty() {
                continue;
            }
            let store = self.stripes[s].lock().unwrap();
            let rows: Vec<Option<u32>> =
                positions.iter().map(|&p| store.index.get(ids[p as usize], &store.ids)).collect();
            for (i, (&pos, &row)) in positions.iter().zip(&rows).enumerate() {
                if let Some(&Some(ahead)) = rows.get(i + PREFETCH_ROWS_AHEAD) {
                    let ahead = ahead as usize;
                    match self.half {
                        None => prefetch(&store.data[ahead * self.stride()..][..self.dim]),
                        Some(_) => prefetch(&store.half[ahead * self.dim..][..self.dim]),
                    }
                }
                let dst = &mut out[pos as usize * self.dim * 4..][..self.dim * 4];
                match (row, self.half) {
                    (Some(r), None) => {
                        codec::write_f32s(dst, &store.data[r as usize * self.stride()..][..self.dim])
                    }
                    (Some(r), Some(_)) => {
                        self.values_of(&store, r as usize, &mut fresh);
                        codec::write_f32s(dst, &fresh);
                    }
                    (None, _) => {
                        self.fresh_values(ids[pos as usize], &mut fresh);
                        codec::write_f32s(dst, &fresh);
                    }
                }
            }
        }
    }

    /// [`try_apply`](Self::try_apply), for benches and tests: checked all the same, but
    /// whether every row went through is not returned.
    pub fn apply(&self, acc: &SparseAccum, scale: f32) {
        let _ = self.try_apply(acc, scale);
    }

    /// Applies per-id gradients `acc` (sums, multiplied by `scale`), one optimizer step per row,
    /// each clipped and checked (see `OptimizerConfig::step_checked`); one step of the table's
    /// clock. Ids without a row get one where the policy admits them (making room under
    /// `max_rows`); the gradients of the others are dropped. A row whose update turns it
    /// non-finite keeps the bad values and does not count the step; the rows after it in its
    /// stripe are left as they were, and the error names the id of the first such row found
    /// (the caller records the fault and serves the table no more).
    ///
    /// Large updates run on rayon's threads, one stripe at a time each: a sync step's update
    /// is on every worker's critical path, and the stripes are independent.
    pub fn try_apply(&self, acc: &SparseAccum, scale: f32) -> Result<(), (u64, NonFiniteUpdate)> {
        /// Fewer rows than this are not worth handing to other threads.
        const PARALLEL_ROWS: usize = 4096;
        let clock = self.clock.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        let groups = self.group_by_stripe(&acc.ids);
        if acc.ids.len() >= PARALLEL_ROWS {
            groups
                .into_par_iter()
                .enumerate()
                .map(|(s, positions)| self.apply_stripe(acc, scale, s, &positions, clock))
                .collect::<Result<(), _>>()
        } else {
            for (s, positions) in groups.into_iter().enumerate() {
                self.apply_stripe(acc, scale, s, &positions, clock)?;
            }
            Ok(())
        }
    }

    /// The most rows one stripe may hold.
    fn stripe_cap(&self) -> Option<usize> {
        self.policy.max_rows.map(|m| (m / STRIPES as u64).max(1) as usize)
    }

    /// Whether a push of `id`, which has no row, gives it one.
    fn admits(&self, store: &mut RowStore, id: u64) -> bool {
        match self.policy.admit {
            Admission::Always => true,
            Admission::MinCount { min_count, .. } => {
                store.sketch.as_mut().expect("a sketch where admission counts").count(id) >= min_count
            }
            Admission::Probability(p) => {
                store.draws += 1;
                let draw = mix64(id ^ mix64(store.draws));
                ((draw >> 11) as f64) * (1.0 / (1u64 << 53) as f64) < p
            }
        }
    }

    /// [`try_apply`](Self::try_apply) to the rows of `acc` at `positions`, all in stripe `s`,
    /// at table step `clock`.
    fn apply_stripe(
        &self,
        acc: &SparseAccum,
        scale: f32,
        s: usize,
        positions: &[u32],
        clock: u32,
    ) -> Result<(), (u64, NonFiniteUpdate)> {
        let stride = self.stride();
        let mut store = self.stripes[s].lock().unwrap();
        let mut evicted = 0;
        if let Some(after) = self.policy.evict_after_steps {
            // A sweep reads every row: once per eighth of the idle time is enough.
            if clock.saturating_sub(store.swept) >= (after / 8).max(1) {
                store.swept = clock;
                evicted += store.evict_idle(after, clock, stride);
            }
        }
        if positions.is_empty() {
            self.counts.evicted.fetch_add(evicted, Ordering::Relaxed);
            return Ok(());
        }
        // Ids without a row are admitted or dropped.
        let mut rows: Vec<u32> = Vec::with_capacity(positions.len());
        let mut fresh: Vec<usize> = Vec::new();
        let mut dropped = 0;
        for (i, &pos) in positions.iter().enumerate() {
            if let Some(&ahead) = positions.get(i + PREFETCH_ROWS_AHEAD) {
                store.index.prefetch(acc.ids[ahead as usize]);
            }
            let id = acc.ids[pos as usize];
            match store.index.get(id, &store.ids) {
                Some(r) => rows.push(r),
                None => {
                    if self.admits(&mut store, id) {
                        fresh.push(i);
                    } else {
                        dropped += 1;
                    }
                    rows.push(RowIndex::ABSENT);
                }
            }
        }
        if let Some(cap) = self.stripe_cap()
            && store.len() + fresh.len() > cap
        {
            // This step's rows are marked as recent first, so that making room spares them.
            for &r in rows.iter().filter(|&&r| r != RowIndex::ABSENT) {
                store.touched[r as usize] = clock;
            }
            // Room for this step's new rows and a sixteenth of the cap more, so that a full
            // table does not select its oldest rows at every step.
            let want = store.len() + fresh.len() - cap + cap / 16;
            evicted += store.evict_oldest(want, clock, stride, self.policy.evict);
            let room = cap.saturating_sub(store.len());
            if fresh.len() > room {
                dropped += (fresh.len() - room) as u64;
                fresh.truncate(room);
            }
            for (i, &pos) in positions.iter().enumerate() {
                if rows[i] != RowIndex::ABSENT {
                    rows[i] =
                        store.index.get(acc.ids[pos as usize], &store.ids).expect("this step's rows stay");
                }
            }
        }
        for &i in &fresh {
            rows[i] = self.create(&mut store, acc.ids[positions[i] as usize], clock) as u32;
        }
        self.counts.admitted.fetch_add(fresh.len() as u64, Ordering::Relaxed);
        self.counts.evicted.fetch_add(evicted, Ordering::Relaxed);
        self.counts.dropped.fetch_add(dropped, Ordering::Relaxed);

        let check = self.check_finite.load(Ordering::Relaxed);
        let mut compact = vec![0f32; if self.half.is_some() { self.dim } else { 0 }];
        for (i, (&pos, &row)) in positions.iter().zip(&rows).enumerate() {
            if row == RowIndex::ABSENT {
                continue;
            }
            if let Some(&ahead) = rows.get(i + PREFETCH_ROWS_AHEAD)
                && ahead != RowIndex::ABSENT
            {
                // A row's update count and clock live in arrays of their own: each is one more
                // cache miss per row unless asked for ahead too.
                let ahead = ahead as usize;
                prefetch(&store.data[ahead * stride..][..stride]);
                if self.half.is_some() {
                    prefetch(&store.half[ahead * self.dim..][..self.dim]);
                }
                prefetch(&store.steps[ahead..=ahead]);
                prefetch(&store.touched[ahead..=ahead]);
            }
            let (pos, row) = (pos as usize, row as usize);
            let sum = &acc.sums[pos * self.dim..][..self.dim];
            let grad = if scale == 1.0 { Grad::Plain(sum) } else { Grad::Scaled(sum, scale) };
            let RowStore { data, steps, touched, half, .. } = &mut *store;
            touched[row] = clock;
            let (values, state) = match self.half {
                None => data[row * stride..][..stride].split_at_mut(self.dim),
                Some(h) => {
                    h.decode(&half[row * self.dim..][..self.dim], &mut compact);
                    (&mut compact[..], &mut data[row * stride..][..stride])
                }
            };
            let t = steps[row] + 1;
            if check {
                self.optimizer
                    .step_checked(values, grad, state, u64::from(t))
                    .map_err(|e| (acc.ids[pos], e))?;
            } else {
                self.optimizer.step_clipped(values, grad, state, u64::from(t));
            }
            if let Some(h) = self.half {
                h.encode(values, &mut half[row * self.dim..][..self.dim]);
            }
            steps[row] = t;
        }
        Ok(())
    }

    /// Creates and initializes the row of `id` (which has none); returns its index.
    fn create(&self, store: &mut RowStore, id: u64, clock: u32) -> usize {
        let r = store.len();
        let stride = self.stride();
        if let Some(cap) = self.stripe_cap()
            && r == store.ids.capacity()
            && r < cap
        {
            // A capped stripe's arenas are sized for the cap once: doubling would leave up to
            // half of them as spare capacity that eviction has touched. Pages not yet written
            // take no memory. (A step that brings more new rows than the cap grows as usual.)
            let more = cap - r;
            store.data.reserve_exact(more * stride);
            store.half.reserve_exact(more * store.hdim);
            store.steps.reserve_exact(more);
            store.touched.reserve_exact(more);
            store.ids.reserve_exact(more);
            store.index.other.size_for(cap);
        }
        store.data.resize((r + 1) * stride, 0.0);
        match self.half {
            None => {
                let (values, state) = store.data[r * stride..].split_at_mut(self.dim);
                self.init.fill_row(&self.name, id, values);
                self.optimizer.init_state(state);
            }
            Some(h) => {
                let mut values = std::mem::take(&mut store.scratch);
                values.resize(self.dim, 0.0);
                self.init.fill_row(&self.name, id, &mut values);
                h.extend(&mut store.half, &values);
                store.scratch = values;
                self.optimizer.init_state(&mut store.data[r * stride..]);
            }
        }
        store.steps.push(0);
        store.touched.push(clock);
        store.ids.push(id);
        store.index.insert(id, r as u32, r + 1, &store.ids);
        r
    }

    /// What a new row of `id` holds, as this table stores it (rounded with compact storage).
    fn fresh_values(&self, id: u64, out: &mut [f32]) {
        self.init.fill_row(&self.name, id, out);
        if let Some(h) = self.half {
            h.round(out);
        }
    }

    fn group_by_stripe(&self, ids: &[u64]) -> Vec<Vec<u32>> {
        let mut groups = vec![Vec::new(); STRIPES];
        for (i, &id) in ids.iter().enumerate() {
            groups[stripe_of(id)].push(i as u32);
        }
        groups
    }
}

/// A 16-bit format of compact rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Half {
    F16,
    Bf16,
}

impl Half {
    /// Rounds to nearest; an f16 value past the format's range is held at its largest finite
    /// value (a parameter that large is already a fault; NaN and infinity are checked in f32).
    fn encode(self, values: &[f32], out: &mut [u16]) {
        for (o, &v) in out.iter_mut().zip(values) {
            *o = match self {
                Half::F16 => half::f16::from_f32(v.clamp(-65504.0, 65504.0)).to_bits(),
                Half::Bf16 => half::bf16::from_f32(v).to_bits(),
            };
        }
    }

    fn decode(self, bits: &[u16], out: &mut [f32]) {
        for (o, &b) in out.iter_mut().zip(bits) {
            *o = match self {
                Half::F16 => half::f16::from_bits(b).to_f32(),
                Half::Bf16 => half::bf16::from_bits(b).to_f32(),
            };
        }
    }

    /// `values` as this format holds them.
    fn round(self, values: &mut [f32]) {
        for v in values {
            let mut bits = [0u16];
            self.encode(std::slice::from_ref(v), &mut bits);
            self.decode(&bits, std::slice::from_mut(v));
        }
    }

    fn extend(self, half: &mut Vec<u16>, values: &[f32]) {
        let at = half.len();
        half.resize(at + values.len(), 0);
        self.encode(values, &mut half[at..]);
    }
}

impl SparseAccum {
    /// Adds the gradient rows in `values` (little-endian, `dim` per id) for `ids`.
    pub fn add(&mut self, ids: &[u64], values: &[u8], dim: usize) {
        for (i, &id) in ids.iter().enumerate() {
            let row = match self.index.get(&id) {
                Some(&r) => r as usize,
                None => {
                    let r = self.ids.len();
                    self.index.insert(id, r as u32);
                    self.ids.push(id);
                    self.sums.resize((r + 1) * dim, 0.0);
                    r
                }
            };
            codec::add_f32s(&mut self.sums[row * dim..][..dim], &values[i * dim * 4..][..dim * 4]);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Empties the sums, keeping their allocations.
    pub fn clear(&mut self) {
        self.index.clear();
        self.ids.clear();
        self.sums.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use gradflow_core::embedding::DEFAULT_SKETCH_CELLS;

    use super::*;

    /// Adds a row for `id` to `store` (as a stripe creates one, without values) and to `model`.
    fn add_row(store: &mut RowStore, model: &mut HashMap<u64, u32>, id: u64) {
        let row = store.len() as u32;
        store.ids.push(id);
        store.steps.push(0);
        store.touched.push(0);
        model.insert(id, row);
        store.index.insert(id, row, store.len(), &store.ids);
    }

    #[test]
    fn row_index_finds_what_a_hash_map_finds() {
        let mut state = 3u64;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            state ^ (state >> 29)
        };
        // A store without values: the index and the ids it reads, as a stripe keeps them.
        let mut store = RowStore::default();
        let mut model = HashMap::new();
        let check = |store: &RowStore, model: &HashMap<u64, u32>| {
            for (&id, &row) in model {
                assert_eq!(store.index.get(id, &store.ids), Some(row), "id {id}");
            }
        };
        for step in 0..200_000u64 {
            // Mostly small ids (dense ones go direct), some huge ones, some repeats.
            let id = match next() % 10 {
                0 => next(),
                1 => u64::MAX - next() % 100,
                _ => next() % (1 << 22),
            };
            // An index holds the ids of one stripe.
            let id = id - id % STRIPES as u64 + 5;
            match model.get(&id) {
                Some(&r) => assert_eq!(store.index.get(id, &store.ids), Some(r), "step {step}: id {id}"),
                None => {
                    assert_eq!(
                        store.index.get(id, &store.ids),
                        None,
                        "step {step}: id {id} was never inserted"
                    );
                    add_row(&mut store, &mut model, id);
                }
            }
        }
        check(&store, &model);
        let index = &store.index;
        assert!(!index.other.is_empty(), "huge ids go to the hash table");
        assert!(index.direct.len() <= RowIndex::DIRECT_PER_ROW * model.len());
        let fits = |r: &u32| ((store.ids[*r as usize] / STRIPES as u64) as usize) < index.direct.len();
        assert!(
            !index.other.slots.iter().filter(|&&r| r != RowIndex::ABSENT).any(fits),
            "ids that fit moved"
        );
        assert!(index.other.slots.len() * 7 >= index.other.len * 8, "at most 7/8 full");
        // Removing rows as eviction does (the last row moves into the hole), in both parts of
        // the index, then adding again.
        let mut k = 0;
        while store.len() > 1000 {
            k = (k + 7919) % store.len();
            let id = store.ids[k];
            store.swap_remove(k, 0);
            model.remove(&id);
            let moved = store.ids.get(k).copied();
            if let Some(m) = moved {
                model.insert(m, k as u32);
            }
            assert_eq!(store.index.get(id, &store.ids), None, "removed id {id}");
            if store.len() % 997 == 0 {
                check(&store, &model);
            }
        }
        check(&store, &model);
        for id in (1u64 << 40..(1 << 40) + 64 * 5000).step_by(64) {
            let id = id + 5;
            add_row(&mut store, &mut model, id);
        }
        check(&store, &model);
        assert_eq!(model.len(), store.len());
    }

    #[test]
    fn an_id_map_sized_for_a_cap_finds_what_a_hash_map_finds_through_evictions() {
        let cap = 3000;
        let mut state = 11u64;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            state ^ (state >> 29)
        };
        let mut store = RowStore::default();
        store.index.other.size_for(cap);
        let mut model: HashMap<u64, u32> = HashMap::new();
        for step in 0..60_000 {
            // Raw ids from a small vocabulary, so that some come back after their eviction.
            let id = (next() % 20_000).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1 << 63;
            if model.contains_key(&id) {
                continue;
            }
            if store.len() == cap {
                // Evict as a full stripe does: a row somewhere, the last row moving into it.
                let k = (next() % cap as u64) as usize;
                let gone = store.ids[k];
                store.swap_remove(k, 0);
                model.remove(&gone);
                if let Some(&m) = store.ids.get(k) {
                    model.insert(m, k as u32);
                }
                assert_eq!(store.index.get(gone, &store.ids), None, "step {step}: evicted id {gone}");
            }
            add_row(&mut store, &mut model, id);
            if step % 4999 == 0 {
                for (&id, &row) in &model {
                    assert_eq!(store.index.get(id, &store.ids), Some(row), "step {step}: id {id}");
                }
            }
        }
        assert_eq!(store.len(), cap);
        for (&id, &row) in &model {
            assert_eq!(store.index.get(id, &store.ids), Some(row), "id {id}");
        }
        // Sized once for the cap, 3/4 full there: never doubled.
        assert_eq!(store.index.other.slots.len(), cap * 4 / 3 + 1);
        assert!(store.index.direct.is_empty(), "raw ids stay out of the direct array");
    }

    fn table(policy: TablePolicy) -> Table {
        let spec = SparseSpec {
            name: "emb".into(),
            dim: 2,
            init: Initializer::Normal { mean: 0.0, std: 0.1, seed: 1 },
            optimizer: OptimizerConfig::sgd(1.0),
        };
        Table::new(&spec, policy)
    }

    fn push(t: &Table, ids: &[u64]) {
        let mut acc = SparseAccum::default();
        let grads: Vec<f32> = ids.iter().flat_map(|_| [1.0f32, 1.0]).collect();
        acc.add(ids, bytemuck::cast_slice(&grads), 2);
        t.apply(&acc, 1.0);
    }

    fn pulled(t: &Table, ids: &[u64]) -> Vec<f32> {
        let mut out = Vec::new();
        t.pull(ids, &mut out);
        out.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    #[test]
    fn a_pull_creates_no_row_and_gives_what_a_new_row_holds() {
        let t = table(TablePolicy::default());
        let before = pulled(&t, &[7, 1 << 60]);
        assert_eq!(t.rows(), 0, "pulls create nothing");
        push(&t, &[7]);
        let after = pulled(&t, &[7, 1 << 60]);
        assert_eq!(t.rows(), 1);
        assert_eq!(after[0], before[0] - 1.0, "the row was created from the value pulled, then updated");
        assert_eq!(&after[2..], &before[2..], "the other id still reads as new");
    }

    #[test]
    fn an_id_gets_a_row_on_its_nth_push_and_earlier_gradients_are_dropped() {
        let t = table(TablePolicy {
            admit: Admission::MinCount { min_count: 3, cells: DEFAULT_SKETCH_CELLS },
            ..TablePolicy::default()
        });
        let fresh = pulled(&t, &[42]);
        push(&t, &[42]);
        push(&t, &[42]);
        assert_eq!((t.rows(), pulled(&t, &[42])), (0, fresh.clone()), "two pushes: no row, nothing applied");
        push(&t, &[42]);
        assert_eq!(t.rows(), 1);
        assert_eq!(pulled(&t, &[42])[0], fresh[0] - 1.0, "the third push is applied");
        let s = t.stats();
        assert_eq!((s.admitted, s.dropped, s.evicted), (1, 2, 0));
        let snap = t.snapshot();
        let back = table(*t.policy());
        back.restore(&snap).unwrap();
        push(&back, &[43]);
        push(&back, &[43]);
        assert_eq!(back.rows(), 1, "43 needs three pushes in the copy too");
        push(&t, &[44]);
        push(&t, &[44]);
        let back = table(*t.policy());
        back.restore(&t.snapshot()).unwrap();
        push(&back, &[44]);
        assert_eq!(back.rows(), 2, "44's two counted pushes came back from the snapshot");
    }

    #[test]
    fn probability_admits_about_that_fraction() {
        let t = table(TablePolicy { admit: Admission::Probability(0.25), ..TablePolicy::default() });
        let ids: Vec<u64> = (0..20_000).collect();
        push(&t, &ids);
        let rows = t.rows() as f64;
        assert!((rows / 20_000.0 - 0.25).abs() < 0.02, "{rows}");
        assert_eq!(t.stats().dropped + t.rows(), 20_000);
    }

    #[test]
    fn rows_idle_for_longer_than_the_limit_go() {
        let t = table(TablePolicy { evict_after_steps: Some(8), ..TablePolicy::default() });
        push(&t, &(0..100).collect::<Vec<_>>());
        let fresh = pulled(&t, &[5]);
        for _ in 0..20 {
            push(&t, &[1000, 1001]);
        }
        assert_eq!(t.rows(), 2, "only the two ids still pushed keep their rows");
        assert_eq!(t.stats().evicted, 100);
        assert_ne!(pulled(&t, &[5]), fresh, "the row of 5 went");
        assert_eq!(pulled(&t, &[5]), pulled(&table(TablePolicy::default()), &[5]), "5 reads as new again");
        let snap = t.snapshot();
        assert!(snap.touched.iter().all(|&c| c == 21) && snap.clock == 21, "{:?}", snap.touched);
    }

    #[test]
    fn a_full_lru_table_drops_the_rows_updated_longest_ago_and_keeps_this_steps() {
        let cap = 64 * STRIPES as u64;
        let t = table(TablePolicy {
            max_rows: Some(cap),
            evict: EvictPolicy::LeastRecent,
            ..TablePolicy::default()
        });
        let hot: Vec<u64> = (0..STRIPES as u64 * 8).collect();
        let mut next = 1_000_000u64;
        for _ in 0..200 {
            let mut ids = hot.clone();
            ids.extend(next..next + 100);
            next += 100;
            push(&t, &ids);
            assert!(t.rows() <= cap, "{} rows over the cap {cap}", t.rows());
        }
        let (rows, ids) = (t.rows(), t.snapshot().ids);
        assert!(rows > cap / 2, "{rows}");
        for h in &hot {
            assert!(ids.contains(h), "hot id {h} was evicted");
        }
        assert_eq!(pulled(&t, &[0])[0], pulled(&table(TablePolicy::default()), &[0])[0] - 200.0);
        // A lower cap on restore trims to it.
        let small = table(TablePolicy { max_rows: Some(cap / 4), ..TablePolicy::default() });
        small.restore(&t.snapshot()).unwrap();
        assert!(small.rows() <= cap / 4);
    }

    #[test]
    fn making_room_spares_the_rows_of_the_step_that_needs_it_even_the_oldest() {
        let cap = 4 * STRIPES as u64;
        let t = table(TablePolicy {
            max_rows: Some(cap),
            evict: EvictPolicy::LeastRecent,
            ..TablePolicy::default()
        });
        // Four rows of stripe 0 fill its share of the cap; id 0's is the oldest.
        let stripe_0 = |k: u64| k * STRIPES as u64;
        for k in 0..4 {
            push(&t, &[stripe_0(k)]);
        }
        // A step updating the oldest row and bringing a new one: room is made from the others.
        push(&t, &[stripe_0(0), stripe_0(4)]);
        let ids = t.snapshot().ids;
        assert!(ids.contains(&stripe_0(0)) && ids.contains(&stripe_0(4)), "{ids:?}");
        assert!(!ids.contains(&stripe_0(1)), "the least recent row of the others goes: {ids:?}");
        let fresh = pulled(&table(TablePolicy::default()), &[stripe_0(0)]);
        assert_eq!(pulled(&t, &[stripe_0(0)]), vec![fresh[0] - 2.0, fresh[1] - 2.0]);
    }

    #[test]
    fn lfu_keeps_the_rows_updated_most_even_when_they_rest() {
        let cap = 4 * STRIPES as u64;
        let policy =
            TablePolicy { max_rows: Some(cap), evict: EvictPolicy::LeastFrequent, ..TablePolicy::default() };
        let (lfu, lru) = (table(policy), table(TablePolicy { evict: EvictPolicy::LeastRecent, ..policy }));
        let regulars: Vec<u64> = (0..STRIPES as u64 * 2).collect();
        for t in [&lfu, &lru] {
            for _ in 0..5 {
                push(t, &regulars);
            }
            // Many one-time ids, while the regulars rest.
            for k in 0..20u64 {
                push(t, &(1000 + k * 64..1000 + (k + 1) * 64).collect::<Vec<_>>());
            }
        }
        let kept = |t: &Table| {
            let ids = t.snapshot().ids;
            regulars.iter().filter(|r| ids.contains(r)).count()
        };
        assert_eq!(kept(&lfu), regulars.len(), "lfu keeps every regular");
        assert_eq!(kept(&lru), 0, "lru lets the resting regulars go");
    }

    #[test]
    fn compact_rows_hold_values_in_half_the_bytes_and_track_an_f32_table() {
        let full = table(TablePolicy::default());
        let ids: Vec<u64> = (0..500).map(|i| i * 7919).collect();
        for (storage, tolerance) in [(Storage::F16, 1e-3f32), (Storage::Bf16, 8e-3)] {
            let t = table(TablePolicy { storage, ..TablePolicy::default() });
            assert_eq!(
                t.row_bytes(),
                full.row_bytes() - 2 * 2,
                "{storage:?}: 2 bytes per value instead of 4"
            );
            let fresh = pulled(&t, &ids);
            assert_eq!(t.rows(), 0);
            for _ in 0..3 {
                push(&t, &ids);
                if storage == Storage::F16 {
                    push(&full, &ids);
                }
            }
            let (a, b) = (pulled(&t, &ids), pulled(&full, &ids));
            for (k, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!((x - y).abs() <= tolerance * y.abs().max(1.0), "{storage:?} value {k}: {x} vs {y}");
            }
            assert_ne!(a, fresh);
            // A snapshot carries the values as f32 and comes back to the same bits.
            let snap = t.snapshot();
            let back = table(*t.policy());
            back.restore(&snap).unwrap();
            assert_eq!(pulled(&back, &ids), a, "{storage:?}");
            assert_eq!(back.snapshot(), snap);
        }
    }
}
