//! Small shared pieces: the logistic link, batch checks, chunking for rayon, a scratch pool and
//! a fast hasher for `u64` keys.

use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Range;
use std::sync::Mutex;

use gradflow_data::Batch;

use crate::ModelError;

/// `1 / (1 + e^-z)`; saturates cleanly to 0 or 1 since `exp` overflows to infinity, not NaN.
#[inline]
pub(crate) fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// Log-loss of logit `z` against label `y`, in the form that neither overflows nor loses the
/// tail: `max(z, 0) - z*y + ln(1 + e^-|z|)`.
#[inline]
pub(crate) fn log_loss(z: f32, y: f32) -> f32 {
    z.max(0.0) - z * y + (-z.abs()).exp().ln_1p()
}

/// Maps a raw feature id to its row id (`id % buckets`, or `id` itself when `buckets == 0`).
#[inline]
pub(crate) fn bucket(id: u64, buckets: u64) -> u64 {
    if buckets == 0 { id } else { id % buckets }
}

/// Fills `out` with the sorted unique bucketed ids of all sparse entries of `batch`.
pub(crate) fn collect_ids(batch: &Batch, buckets: u64, out: &mut Vec<u64>) {
    out.clear();
    out.extend(batch.sparse_ids.iter().map(|&id| bucket(id, buckets)));
    out.sort_unstable();
    out.dedup();
}

/// Checks the batch's arrays against each other and its dense width against the model's.
pub(crate) fn check_batch(batch: &Batch, num_dense: usize) -> Result<(), ModelError> {
    let n = batch.labels.len();
    if batch.num_dense != num_dense {
        return Err(ModelError::DenseFeatureCount { expected: num_dense, got: batch.num_dense });
    }
    if batch.dense.len() != n * num_dense {
        return Err(ModelError::MalformedBatch(format!(
            "{} dense values for {n} examples of {num_dense} features",
            batch.dense.len()
        )));
    }
    let nnz = batch.sparse_ids.len();
    if batch.sparse_offsets.len() != n + 1
        || batch.sparse_offsets[0] != 0
        || batch.sparse_offsets[n] != nnz
        || batch.sparse_offsets.windows(2).any(|w| w[0] > w[1])
    {
        return Err(ModelError::MalformedBatch(format!(
            "sparse offsets do not split {nnz} entries among {n} examples"
        )));
    }
    if batch.sparse_fields.len() != nnz || batch.sparse_values.len() != nnz {
        return Err(ModelError::MalformedBatch(format!(
            "{nnz} sparse ids but {} fields and {} values",
            batch.sparse_fields.len(),
            batch.sparse_values.len()
        )));
    }
    Ok(())
}

/// Splits `n` examples into contiguous chunks of at least `min_chunk` examples, at most one per
/// rayon thread: one chunk per core is enough to use both cores, and fewer, larger chunks keep
/// the matrix products efficient and the per-chunk reductions small.
pub(crate) fn num_chunks(n: usize, min_chunk: usize) -> usize {
    (n / min_chunk.max(1)).clamp(1, rayon::current_num_threads().max(1))
}

/// Example range of chunk `c` of `k` over `n` examples.
pub(crate) fn chunk_range(n: usize, k: usize, c: usize) -> Range<usize> {
    (c * n / k)..((c + 1) * n / k)
}

/// A pool of scratch workspaces, so forward and backward allocate nothing in steady state.
///
/// A pool rather than a single `Mutex<T>` lets several threads run the same model at once, and
/// rather than a thread-local so that a model called re-entrantly from a rayon task (which may
/// steal another call while it waits) never finds its own workspace borrowed.
pub(crate) struct ScratchPool<T>(Mutex<Vec<T>>);

impl<T: Default> ScratchPool<T> {
    pub(crate) fn new() -> Self {
        ScratchPool(Mutex::new(Vec::new()))
    }

    pub(crate) fn take(&self) -> T {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default()
    }

    pub(crate) fn put(&self, scratch: T) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(scratch);
    }
}

/// A hasher for `u64` keys: the splitmix64 finalizer. SipHash would cost more than the rest of
/// a sparse row update, and ids are not attacker-controlled here.
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    #[inline]
    fn finish(&self) -> u64 {
        let mut z = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        // Only reached for non-u64 keys; fold the bytes in so it is still a correct hasher.
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.0 = i;
    }
}

/// `BuildHasher` for [`IdHasher`].
pub(crate) type IdBuildHasher = BuildHasherDefault<IdHasher>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_loss_matches_the_naive_formula_and_stays_finite() {
        for &z in &[-5.0f32, -0.3, 0.0, 0.7, 4.0] {
            for &y in &[0.0f32, 1.0] {
                let p = sigmoid(z);
                let naive = -(y * p.ln() + (1.0 - y) * (1.0 - p).ln());
                assert!((log_loss(z, y) - naive).abs() < 1e-5, "z={z} y={y}");
            }
        }
        assert!((log_loss(200.0, 0.0) - 200.0).abs() < 1e-3);
        assert!(log_loss(-200.0, 0.0) >= 0.0 && log_loss(-200.0, 0.0) < 1e-30);
    }

    #[test]
    fn chunks_cover_the_range_exactly() {
        for n in [0usize, 1, 7, 64, 255, 256, 1000] {
            let k = num_chunks(n, 32);
            let mut next = 0;
            for c in 0..k {
                let r = chunk_range(n, k, c);
                assert_eq!(r.start, next);
                next = r.end;
            }
            assert_eq!(next, n);
        }
    }
}
