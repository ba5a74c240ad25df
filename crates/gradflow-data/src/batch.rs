//! A batch of examples in column form, the one shape every reader produces and every model reads.

/// `n` examples: labels, dense features (row-major), and sparse features in CSR form.
///
/// Example `i` has dense features `dense[i*num_dense..(i+1)*num_dense]` and sparse entries
/// `sparse_offsets[i]..sparse_offsets[i+1]` of `sparse_fields`/`sparse_ids`/`sparse_values`.
/// A categorical feature is a sparse entry with value 1.0; its `field` says which column it
/// came from (0 for formats without fields, such as libsvm).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    pub labels: Vec<f32>,
    pub num_dense: usize,
    pub dense: Vec<f32>,
    pub sparse_offsets: Vec<usize>,
    pub sparse_fields: Vec<u32>,
    pub sparse_ids: Vec<u64>,
    pub sparse_values: Vec<f32>,
}

impl Batch {
    /// An empty batch whose examples will have `num_dense` dense features.
    pub fn new(num_dense: usize) -> Batch {
        Batch { num_dense, sparse_offsets: vec![0], ..Batch::default() }
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Dense features of example `i`.
    pub fn dense_row(&self, i: usize) -> &[f32] {
        &self.dense[i * self.num_dense..(i + 1) * self.num_dense]
    }

    /// Range of example `i`'s sparse entries.
    pub fn sparse_range(&self, i: usize) -> std::ops::Range<usize> {
        self.sparse_offsets[i]..self.sparse_offsets[i + 1]
    }

    /// Appends one example. `sparse` is `(field, id, value)`.
    pub fn push(&mut self, label: f32, dense: &[f32], sparse: impl IntoIterator<Item = (u32, u64, f32)>) {
        assert_eq!(dense.len(), self.num_dense, "dense feature count");
        self.labels.push(label);
        self.dense.extend_from_slice(dense);
        for (f, id, v) in sparse {
            self.sparse_fields.push(f);
            self.sparse_ids.push(id);
            self.sparse_values.push(v);
        }
        self.sparse_offsets.push(self.sparse_ids.len());
    }

    /// Removes all examples, keeping the allocations.
    pub fn clear(&mut self) {
        self.labels.clear();
        self.dense.clear();
        self.sparse_offsets.clear();
        self.sparse_offsets.push(0);
        self.sparse_fields.clear();
        self.sparse_ids.clear();
        self.sparse_values.clear();
    }
}
