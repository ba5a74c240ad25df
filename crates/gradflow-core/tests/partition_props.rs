//! Property tests of dense placement and sparse sharding.

use gradflow_core::partition::DEFAULT_PARTITION_BYTES;
use gradflow_core::{DenseSpec, Initializer, ModelSpec, OptimizerConfig, Placement};
use proptest::prelude::*;

fn spec_of(shapes: Vec<Vec<u64>>) -> ModelSpec {
    ModelSpec {
        dense: shapes
            .into_iter()
            .enumerate()
            .map(|(i, shape)| DenseSpec {
                name: format!("layer{i}/w"),
                shape,
                init: Initializer::Zeros,
                optimizer: OptimizerConfig::sgd(0.1),
            })
            .collect(),
        sparse: vec![],
    }
}

/// Shapes from scalars to about 4 million elements.
fn shape() -> impl Strategy<Value = Vec<u64>> {
    prop_oneof![
        prop::collection::vec(1u64..=64, 0..=3),
        prop::collection::vec(1u64..=2048, 1..=2),
        (1u64..=4_000_000).prop_map(|n| vec![n]),
    ]
}

/// Partition sizes from 16 KiB to 16 MiB, not always a multiple of 4.
fn partition_bytes() -> impl Strategy<Value = u64> {
    prop_oneof![
        (14u32..=24, 0u64..4).prop_map(|(k, extra)| (1u64 << k) + extra),
        Just(DEFAULT_PARTITION_BYTES),
        (16_384u64..=16 << 20),
    ]
}

fn check(spec: &ModelSpec, num_shards: u32, partition_bytes: u64) -> Result<(), TestCaseError> {
    let p = Placement::new(spec, num_shards, partition_bytes);
    prop_assert_eq!(p.num_shards, num_shards);
    prop_assert_eq!(p.partition_bytes, partition_bytes);

    // Coverage: each tensor's pieces tile [0, numel) in order, and pieces() is exactly the
    // concatenation of pieces_of() in spec order.
    let mut concatenated = Vec::new();
    for (t, dense) in spec.dense.iter().enumerate() {
        let pieces = p.pieces_of(t);
        prop_assert!(!pieces.is_empty());
        let mut next = 0;
        for (i, piece) in pieces.iter().enumerate() {
            prop_assert_eq!(piece.tensor, t);
            prop_assert_eq!(piece.partition as usize, i);
            prop_assert_eq!(piece.offset, next);
            prop_assert!(piece.shard < num_shards);
            prop_assert!(piece.len > 0);
            next += piece.len;
        }
        prop_assert_eq!(next, dense.numel());
        let numel = dense.numel();
        if numel * 4 <= partition_bytes {
            prop_assert_eq!(pieces.len(), 1);
        } else {
            // As few pieces as fit in partition_bytes, of near-equal length.
            prop_assert_eq!(pieces.len() as u64, numel.div_ceil(partition_bytes / 4));
            let min = pieces.iter().map(|x| x.len).min().unwrap();
            let max = pieces.iter().map(|x| x.len).max().unwrap();
            prop_assert!(max - min <= 1);
            prop_assert!(max * 4 <= partition_bytes);
        }
        concatenated.extend_from_slice(pieces);
    }
    prop_assert_eq!(&concatenated[..], p.pieces());

    // Balance.
    let bytes = p.shard_bytes();
    prop_assert_eq!(bytes.len(), num_shards as usize);
    let total: u64 = bytes.iter().sum();
    prop_assert_eq!(total, spec.dense_bytes());
    let largest = p.pieces().iter().map(|x| x.len * 4).max().unwrap_or(0);
    let max = *bytes.iter().max().unwrap();
    prop_assert!(
        max <= total / u64::from(num_shards) + largest,
        "shard bytes {:?}, total {}, largest piece {}",
        bytes,
        total,
        largest
    );

    // pieces_on partitions pieces() by shard.
    let mut seen = 0;
    for s in 0..num_shards {
        let on: Vec<_> = p.pieces_on(s).collect();
        prop_assert!(on.iter().all(|x| x.shard == s));
        prop_assert_eq!(on.iter().map(|x| x.len * 4).sum::<u64>(), bytes[s as usize]);
        seen += on.len();
    }
    prop_assert_eq!(seen, p.pieces().len());

    // Deterministic.
    prop_assert_eq!(&Placement::new(spec, num_shards, partition_bytes), &p);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn placement_covers_balances_and_is_deterministic(
        shapes in prop::collection::vec(shape(), 1..40),
        num_shards in 1u32..=8,
        partition_bytes in partition_bytes(),
    ) {
        check(&spec_of(shapes), num_shards, partition_bytes)?;
    }

    #[test]
    fn placement_with_tiny_partitions(
        shapes in prop::collection::vec(prop::collection::vec(1u64..=12, 0..=3), 1..20),
        num_shards in 1u32..=8,
        partition_bytes in 4u64..=256,
    ) {
        check(&spec_of(shapes), num_shards, partition_bytes)?;
    }

    #[test]
    fn sparse_shard_spreads_any_run_of_ids(start in any::<u64>(), num_shards in 2u32..=8) {
        let mut counts = vec![0u64; num_shards as usize];
        for i in 0..100_000u64 {
            counts[Placement::sparse_shard(start.wrapping_add(i), num_shards) as usize] += 1;
        }
        let expected = 100_000.0 / f64::from(num_shards);
        for &c in &counts {
            prop_assert!((c as f64 - expected).abs() <= 0.05 * expected, "{:?}", counts);
        }
    }
}

#[test]
fn sparse_shard_spreads_sequential_ids() {
    for num_shards in 2u32..=8 {
        let mut counts = vec![0u64; num_shards as usize];
        for id in 0..100_000u64 {
            counts[Placement::sparse_shard(id, num_shards) as usize] += 1;
        }
        let expected = 100_000.0 / f64::from(num_shards);
        for &c in &counts {
            assert!((c as f64 - expected).abs() <= 0.05 * expected, "{num_shards} shards: {counts:?}");
        }
    }
    // Strided ids (e.g. id = row * 1024 + field) must not collapse onto a few shards.
    for num_shards in [2u32, 4, 8] {
        let mut counts = vec![0u64; num_shards as usize];
        for id in (0..100_000u64).map(|i| i << 10) {
            counts[Placement::sparse_shard(id, num_shards) as usize] += 1;
        }
        let expected = 100_000.0 / f64::from(num_shards);
        assert!(counts.iter().all(|&c| (c as f64 - expected).abs() <= 0.05 * expected), "{counts:?}");
    }
}

#[test]
fn one_shard_holds_everything() {
    let spec = spec_of(vec![vec![1000, 1000], vec![10]]);
    let p = Placement::new(&spec, 1, DEFAULT_PARTITION_BYTES);
    assert!(p.pieces().iter().all(|x| x.shard == 0));
    assert_eq!(p.shard_bytes(), [spec.dense_bytes()]);
}
