//! Placement of the model on server shards (STUB: being written by a helper).

use crate::ModelSpec;

/// One contiguous piece of a dense tensor and the shard that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DensePiece {
    /// Index of the tensor in `ModelSpec::dense`.
    pub tensor: usize,
    /// Index of this piece among the tensor's pieces (0-based, in element order).
    pub partition: u32,
    /// First element of the piece in the flattened tensor.
    pub offset: u64,
    /// Number of elements.
    pub len: u64,
    pub shard: u32,
}

/// Where every dense piece lives; sparse rows go by [`Placement::sparse_shard`].
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub num_shards: u32,
    pub partition_bytes: u64,
    pieces: Vec<DensePiece>,
}

impl Placement {
    pub fn new(_spec: &ModelSpec, _num_shards: u32, _partition_bytes: u64) -> Placement {
        todo!()
    }
    /// The pieces of dense tensor `tensor`, in element order.
    pub fn pieces_of(&self, _tensor: usize) -> &[DensePiece] {
        todo!()
    }
    /// All pieces, grouped by tensor in spec order, each tensor's in element order.
    pub fn pieces(&self) -> &[DensePiece] {
        &self.pieces
    }
    pub fn sparse_shard(_id: u64, _num_shards: u32) -> u32 {
        todo!()
    }
}
