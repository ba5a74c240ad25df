//! The values a model reads and the gradients it writes, in [`ModelSpec`] order.
//!
//! A worker pulls one [`Params`] per batch: every dense tensor in full, and for each sparse
//! table only the rows of the ids the batch touches ([`crate::Model::sparse_ids`]). The model
//! answers with a [`Grads`] of the same layout, which the worker pushes back unchanged.

use gradflow_core::ModelSpec;

use crate::ModelError;

/// Parameter values for one batch, in spec order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params {
    /// One per [`ModelSpec::dense`]: the full tensor, row-major.
    pub dense: Vec<Vec<f32>>,
    /// One per [`ModelSpec::sparse`]: the rows of the ids the batch touches.
    pub sparse: Vec<SparseRows>,
}

/// Rows of one sparse table for a set of ids.
///
/// In [`Params`] the ids are the sorted unique ids from [`crate::Model::sparse_ids`], which lets
/// the model find a row by binary search instead of building a hash map per batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SparseRows {
    /// Row ids, strictly increasing.
    pub ids: Vec<u64>,
    /// Floats per row.
    pub dim: usize,
    /// `ids.len() * dim` floats; row `k` is `values[k*dim..(k+1)*dim]`.
    pub values: Vec<f32>,
}

/// Gradients of the mean batch loss, same layout as [`Params`]: dense gradients cover the full
/// tensors and sparse gradients have exactly the ids that were pulled, in the same order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Grads {
    /// One per [`ModelSpec::dense`].
    pub dense: Vec<Vec<f32>>,
    /// One per [`ModelSpec::sparse`], aligned with [`Params::sparse`].
    pub sparse: Vec<SparseRows>,
}

impl SparseRows {
    /// An empty set of rows of width `dim`.
    pub fn new(dim: usize) -> SparseRows {
        SparseRows { ids: Vec::new(), dim, values: Vec::new() }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Row `k` (the row of `ids[k]`).
    pub fn row(&self, k: usize) -> &[f32] {
        &self.values[k * self.dim..(k + 1) * self.dim]
    }

    /// Position of `id` in `ids`, by binary search (needs sorted ids).
    pub fn position(&self, id: u64) -> Option<usize> {
        self.ids.binary_search(&id).ok()
    }
}

/// Finds ids in a sorted id list ([`SparseRows::ids`]) with one short search instead of a
/// binary search over all of it: the range from the smallest id to the largest is cut into
/// slices of a power-of-two width, about one id per slice, and the position of each slice's
/// first id is kept. A lookup goes to its slice and searches only the ids in it. Hashed ids
/// spread evenly, so a slice holds one or two; ids bunched together still cost no more than
/// a binary search over their own slice.
#[derive(Debug, Clone, Default)]
pub struct IdIndex {
    min: u64,
    max: u64,
    shift: u32,
    /// `starts[s]`: position of the first id in slice `s` or a later one; one more than the
    /// slices, ending with the number of ids.
    starts: Vec<u32>,
}

impl IdIndex {
    /// Builds the index of `ids` (strictly increasing; fewer than 2^32), reusing its buffer.
    pub fn build(&mut self, ids: &[u64]) {
        self.starts.clear();
        let (Some(&min), Some(&max)) = (ids.first(), ids.last()) else {
            self.starts.push(0);
            (self.min, self.max, self.shift) = (1, 0, 0);
            return;
        };
        let span = max - min;
        // The narrowest slices of which there are at most as many as ids.
        let mut shift = 0;
        while (span >> shift) >= ids.len() as u64 {
            shift += 1;
        }
        let slices = (span >> shift) as usize + 1;
        self.starts.reserve(slices + 1);
        let mut k = 0;
        for s in 0..slices as u64 {
            while ((ids[k] - min) >> shift) < s {
                k += 1;
            }
            self.starts.push(k as u32);
        }
        self.starts.push(ids.len() as u32);
        (self.min, self.max, self.shift) = (min, max, shift);
    }

    /// Position of `id` in the `ids` this index was built from.
    #[inline]
    pub fn position(&self, ids: &[u64], id: u64) -> Option<usize> {
        if id < self.min || id > self.max {
            return None;
        }
        let s = ((id - self.min) >> self.shift) as usize;
        let (start, end) = (self.starts[s] as usize, self.starts[s + 1] as usize);
        let slice = &ids[start..end];
        let found = if slice.len() <= 8 {
            slice.iter().position(|&x| x == id)
        } else {
            slice.binary_search(&id).ok()
        };
        found.map(|k| start + k)
    }
}

impl Params {
    /// Checks that the layout matches `spec`: tensor counts and lengths, row widths, and
    /// strictly increasing ids (which the models' binary search relies on).
    pub fn check(&self, spec: &ModelSpec) -> Result<(), ModelError> {
        let mismatch = |m: String| Err(ModelError::ParamsMismatch(m));
        if self.dense.len() != spec.dense.len() {
            return mismatch(format!(
                "{} dense tensors given, the spec has {}",
                self.dense.len(),
                spec.dense.len()
            ));
        }
        for (values, d) in self.dense.iter().zip(&spec.dense) {
            if values.len() as u64 != d.numel() {
                return mismatch(format!(
                    "dense tensor `{}` has {} values, shape {:?} needs {}",
                    d.name,
                    values.len(),
                    d.shape,
                    d.numel()
                ));
            }
        }
        if self.sparse.len() != spec.sparse.len() {
            return mismatch(format!(
                "{} sparse tables given, the spec has {}",
                self.sparse.len(),
                spec.sparse.len()
            ));
        }
        for (rows, s) in self.sparse.iter().zip(&spec.sparse) {
            if rows.dim != s.dim as usize {
                return mismatch(format!(
                    "sparse table `{}` has dim {}, the spec says {}",
                    s.name, rows.dim, s.dim
                ));
            }
            if rows.values.len() != rows.ids.len() * rows.dim {
                return mismatch(format!(
                    "sparse table `{}` has {} values for {} rows of dim {}",
                    s.name,
                    rows.values.len(),
                    rows.ids.len(),
                    rows.dim
                ));
            }
            if rows.ids.windows(2).any(|w| w[0] >= w[1]) {
                return mismatch(format!("sparse table `{}`: ids are not sorted and unique", s.name));
            }
        }
        Ok(())
    }
}

impl Grads {
    /// Shapes `self` like `params` with all gradients zero, reusing the allocations.
    pub fn reset_like(&mut self, params: &Params) {
        self.dense.resize_with(params.dense.len(), Vec::new);
        for (g, p) in self.dense.iter_mut().zip(&params.dense) {
            g.clear();
            g.resize(p.len(), 0.0);
        }
        self.sparse.resize_with(params.sparse.len(), SparseRows::default);
        for (g, p) in self.sparse.iter_mut().zip(&params.sparse) {
            g.ids.clone_from(&p.ids);
            g.dim = p.dim;
            g.values.clear();
            g.values.resize(p.values.len(), 0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sorted unique ids drawn from `draw`, and ids near them that are absent.
    fn check(ids: &[u64], probes: &[u64]) {
        let mut index = IdIndex::default();
        index.build(ids);
        for (k, &id) in ids.iter().enumerate() {
            assert_eq!(index.position(ids, id), Some(k), "id {id} of {ids:?}");
        }
        for &id in probes {
            assert_eq!(index.position(ids, id), ids.binary_search(&id).ok(), "probe {id} of {ids:?}");
        }
    }

    #[test]
    fn an_id_index_finds_what_a_binary_search_finds() {
        check(&[], &[0, 1, u64::MAX]);
        check(&[7], &[0, 6, 8, u64::MAX]);
        check(&[0, u64::MAX], &[1, u64::MAX - 1, 1 << 63]);
        check(&[u64::MAX - 2, u64::MAX - 1, u64::MAX], &[0, u64::MAX - 3]);
        let mut rng = gradflow_data::SplitMix64::new(5);
        for (n, modulus) in
            [(1, 10), (2, 3), (100, 1_000_000), (3000, 1_000_000), (500, 600), (1000, u64::MAX)]
        {
            // Half spread over the range, half bunched at its start (raw ids are often
            // sequential), so slices with many ids and empty slices both occur.
            let mut ids: Vec<u64> =
                (0..n).map(|i| if i % 2 == 0 { rng.next_u64() % modulus } else { i / 2 }).collect();
            ids.sort_unstable();
            ids.dedup();
            let probes: Vec<u64> =
                (0..2 * n).map(|i| if i % 2 == 0 { rng.next_u64() % modulus } else { i }).collect();
            check(&ids, &probes);
        }
    }
}
