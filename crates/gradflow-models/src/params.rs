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
