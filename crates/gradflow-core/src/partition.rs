//! Placement of the model on server shards.
//!
//! Dense tensors are cut into contiguous pieces of at most `partition_bytes` and the pieces are
//! spread over the shards so that each holds about the same number of bytes. Sparse rows go to
//! the shard picked by a hash of their id. Both are pure functions of the spec, the number of
//! shards and the partition size: every worker and every shard computes the same placement on
//! its own, with nothing to exchange or agree on.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::ModelSpec;
use crate::init::mix64;

/// The default largest piece of a dense tensor: 4 MiB, big enough that per-piece overheads
/// (one RPC entry, one lock) are negligible, small enough to spread a large tensor over shards.
pub const DEFAULT_PARTITION_BYTES: u64 = 4 << 20;

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
    /// The server shard that holds the piece.
    pub shard: u32,
}

impl DensePiece {
    /// Size of the piece in bytes (`len * 4`).
    pub fn bytes(&self) -> u64 {
        self.len * 4
    }

    /// One past the last element of the piece.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Where every dense piece lives; sparse rows go by [`Placement::sparse_shard`].
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// Number of server shards.
    pub num_shards: u32,
    /// Largest piece of a dense tensor, in bytes.
    pub partition_bytes: u64,
    pieces: Vec<DensePiece>,
    /// `pieces[tensor_start[t]..tensor_start[t + 1]]` are the pieces of tensor `t`.
    tensor_start: Vec<usize>,
}

impl Placement {
    /// How many pieces every dense tensor of `spec` is cut into with pieces of at most
    /// `partition_bytes`, in all: arithmetic on the spec alone, so that a placement too large
    /// to hold can be refused before [`Placement::new`] allocates it. An error names a tensor
    /// that would need more than `u32::MAX` pieces.
    pub fn count_pieces(spec: &ModelSpec, partition_bytes: u64) -> Result<u64, crate::CoreError> {
        let max_elems = (partition_bytes / 4).max(1);
        spec.dense.iter().try_fold(0u64, |sum, d| {
            let numel = d.numel();
            let count = numel.div_ceil(max_elems).max(1);
            if count > u64::from(u32::MAX) {
                return Err(crate::CoreError::InvalidSpec(format!(
                    "dense tensor `{}` ({numel} elements) would need {count} pieces of {partition_bytes} bytes; \
                     expected at most {} (a larger partition_bytes)",
                    d.name,
                    u32::MAX
                )));
            }
            Ok(sum.saturating_add(count))
        })
    }

    /// Cuts every dense tensor of `spec` into pieces and assigns them to `num_shards` shards.
    ///
    /// A tensor of at most `partition_bytes` bytes is one piece. A larger one is cut into
    /// `ceil(numel / (partition_bytes / 4))` contiguous element ranges whose lengths differ by
    /// at most 1 (the first ones are the longer), so that no piece is over `partition_bytes`.
    ///
    /// Pieces go, largest first (ties in `(tensor, partition)` order), to the shard with the
    /// fewest bytes so far (ties to the lowest index). This keeps the largest shard within one
    /// piece of the mean: `max(shard_bytes) <= total / num_shards + largest piece`.
    ///
    /// # Panics
    /// If `num_shards == 0` or `partition_bytes < 4` (callers validate their config first), or
    /// if a tensor would need more than `u32::MAX` pieces.
    pub fn new(spec: &ModelSpec, num_shards: u32, partition_bytes: u64) -> Placement {
        assert!(num_shards > 0, "Placement::new: num_shards must be at least 1");
        assert!(
            partition_bytes >= 4,
            "Placement::new: partition_bytes is {partition_bytes}, must hold at least one f32 (4)"
        );
        let max_elems = partition_bytes / 4;
        let mut pieces = Vec::new();
        let mut tensor_start = Vec::with_capacity(spec.dense.len() + 1);
        for (tensor, dense) in spec.dense.iter().enumerate() {
            tensor_start.push(pieces.len());
            let numel = dense.numel();
            let count = numel.div_ceil(max_elems).max(1);
            let count = u32::try_from(count).unwrap_or_else(|_| {
                panic!(
                    "Placement::new: tensor `{}` ({numel} elements) would need {count} pieces of \
                     {partition_bytes} bytes",
                    dense.name
                )
            });
            let (base, longer) = (numel / u64::from(count), numel % u64::from(count));
            let mut offset = 0;
            for partition in 0..count {
                let len = base + u64::from(u64::from(partition) < longer);
                pieces.push(DensePiece { tensor, partition, offset, len, shard: 0 });
                offset += len;
            }
        }
        tensor_start.push(pieces.len());

        // Indices sorted by size (largest first); the stable sort keeps (tensor, partition)
        // order among equals, since `pieces` is already in that order.
        let mut order: Vec<usize> = (0..pieces.len()).collect();
        order.sort_by_key(|&i| Reverse(pieces[i].len));
        let mut load: BinaryHeap<Reverse<(u64, u32)>> = (0..num_shards).map(|s| Reverse((0, s))).collect();
        for i in order {
            let Reverse((bytes, shard)) = load.pop().expect("at least one shard");
            pieces[i].shard = shard;
            load.push(Reverse((bytes + pieces[i].bytes(), shard)));
        }

        Placement { num_shards, partition_bytes, pieces, tensor_start }
    }

    /// The pieces of dense tensor `tensor`, in element order.
    ///
    /// # Panics
    /// If `tensor` is not an index into the spec's dense tensors.
    pub fn pieces_of(&self, tensor: usize) -> &[DensePiece] {
        assert!(
            tensor + 1 < self.tensor_start.len(),
            "pieces_of: dense tensor {tensor} does not exist (the spec has {})",
            self.tensor_start.len() - 1
        );
        &self.pieces[self.tensor_start[tensor]..self.tensor_start[tensor + 1]]
    }

    /// All pieces, grouped by tensor in spec order, each tensor's in element order.
    pub fn pieces(&self) -> &[DensePiece] {
        &self.pieces
    }

    /// The pieces held by `shard`, in the order of [`Placement::pieces`].
    pub fn pieces_on(&self, shard: u32) -> impl Iterator<Item = &DensePiece> {
        self.pieces.iter().filter(move |p| p.shard == shard)
    }

    /// Bytes of dense parameters on each shard (indexed by shard).
    pub fn shard_bytes(&self) -> Vec<u64> {
        let mut bytes = vec![0; self.num_shards as usize];
        for p in &self.pieces {
            bytes[p.shard as usize] += p.bytes();
        }
        bytes
    }

    /// The shard of sparse row `id`: the splitmix64 hash of the id, modulo `num_shards`.
    ///
    /// Hashing spreads sequential or strided ids (common for vocabulary indices) evenly.
    ///
    /// # Panics
    /// If `num_shards == 0`.
    pub fn sparse_shard(id: u64, num_shards: u32) -> u32 {
        assert!(num_shards > 0, "sparse_shard: num_shards must be at least 1");
        (mix64(id.wrapping_add(0x9e37_79b9_7f4a_7c15)) % u64::from(num_shards)) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DenseSpec, Initializer, OptimizerConfig};

    fn spec(shapes: &[&[u64]]) -> ModelSpec {
        ModelSpec {
            dense: shapes
                .iter()
                .enumerate()
                .map(|(i, s)| DenseSpec {
                    name: format!("t{i}"),
                    shape: s.to_vec(),
                    init: Initializer::Zeros,
                    optimizer: OptimizerConfig::sgd(0.1),
                })
                .collect(),
            sparse: vec![],
        }
    }

    #[test]
    fn small_tensors_are_one_piece_large_ones_split_evenly() {
        let s = spec(&[&[4], &[10], &[]]);
        let p = Placement::new(&s, 2, 16);
        assert_eq!(p.pieces_of(0).len(), 1);
        let lens: Vec<u64> = p.pieces_of(1).iter().map(|x| x.len).collect();
        assert_eq!(lens, [4, 3, 3]);
        let offsets: Vec<u64> = p.pieces_of(1).iter().map(|x| x.offset).collect();
        assert_eq!(offsets, [0, 4, 7]);
        assert_eq!(
            p.pieces_of(2),
            &[DensePiece { tensor: 2, partition: 0, offset: 0, len: 1, shard: p.pieces_of(2)[0].shard }]
        );
    }

    #[test]
    fn partition_bytes_not_a_multiple_of_four() {
        // 6 bytes hold one f32, so 5 elements are 5 pieces, none over 6 bytes.
        let p = Placement::new(&spec(&[&[5]]), 3, 6);
        assert_eq!(p.pieces().len(), 5);
        assert!(p.pieces().iter().all(|x| x.bytes() <= 6));
    }

    #[test]
    fn greedy_assignment_is_largest_first_to_least_loaded() {
        // Pieces: t0 = 40 B, t1 = 24 B, t2 = 24 B, t3 = 8 B.
        let p = Placement::new(&spec(&[&[10], &[6], &[6], &[2]]), 2, 1 << 20);
        let shards: Vec<u32> = p.pieces().iter().map(|x| x.shard).collect();
        // 40 -> s0; 24 (t1) -> s1; 24 (t2) -> s1 (24 < 40); 8 -> s0 (40 < 48).
        assert_eq!(shards, [0, 1, 1, 0]);
        assert_eq!(p.shard_bytes(), [48, 48]);
        let on1: Vec<usize> = p.pieces_on(1).map(|x| x.tensor).collect();
        assert_eq!(on1, [1, 2]);
    }

    #[test]
    fn ties_go_to_the_lowest_shard() {
        let p = Placement::new(&spec(&[&[3], &[3], &[3]]), 4, 1 << 20);
        let shards: Vec<u32> = p.pieces().iter().map(|x| x.shard).collect();
        assert_eq!(shards, [0, 1, 2]);
        assert_eq!(p.shard_bytes(), [12, 12, 12, 0]);
    }

    #[test]
    fn empty_spec() {
        let p = Placement::new(&ModelSpec { dense: vec![], sparse: vec![] }, 3, 1024);
        assert!(p.pieces().is_empty());
        assert_eq!(p.shard_bytes(), [0, 0, 0]);
    }

    #[test]
    #[should_panic(expected = "num_shards must be at least 1")]
    fn zero_shards_panics() {
        Placement::new(&spec(&[&[3]]), 0, 1024);
    }

    #[test]
    #[should_panic(expected = "partition_bytes is 3")]
    fn tiny_partitions_panic() {
        Placement::new(&spec(&[&[3]]), 1, 3);
    }

    #[test]
    fn sparse_shard_is_stable_and_in_range() {
        for n in 1..10 {
            for id in [0, 1, 2, u64::MAX, 1 << 40] {
                let s = Placement::sparse_shard(id, n);
                assert!(s < n);
                assert_eq!(s, Placement::sparse_shard(id, n));
            }
        }
    }
}
