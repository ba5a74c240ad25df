//! Placement (`gradflow_core::partition`): computed by every worker and every shard when a
//! model is declared, and `sparse_shard` once per sparse id on every pull and push.

#![forbid(unsafe_code)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gradflow_core::{DEFAULT_PARTITION_BYTES, DenseSpec, Initializer, ModelSpec, OptimizerConfig, Placement};

fn spec(sizes: impl IntoIterator<Item = u64>) -> ModelSpec {
    ModelSpec {
        dense: sizes
            .into_iter()
            .enumerate()
            .map(|(i, n)| DenseSpec {
                name: format!("t{i}"),
                shape: vec![n],
                init: Initializer::Zeros,
                optimizer: OptimizerConfig::sgd(0.1),
            })
            .collect(),
        sparse: Vec::new(),
    }
}

fn placement(c: &mut Criterion) {
    let mut group = c.benchmark_group("partition");
    // The bench's small-tensor model: 1000 tensors of 1-64 KiB.
    let small = spec((0..1000u64).map(|i| 256 + (i * 7919) % 16129));
    group.bench_function("Placement::new 1000 small tensors, 4 shards", |b| {
        b.iter(|| Placement::new(black_box(&small), 4, DEFAULT_PARTITION_BYTES))
    });
    // 512 MiB in 4 tensors: 128 pieces of 4 MiB.
    let large = spec([32 << 20; 4]);
    group.bench_function("Placement::new 512 MiB model, 4 shards", |b| {
        b.iter(|| Placement::new(black_box(&large), 4, DEFAULT_PARTITION_BYTES))
    });
    let ids: Vec<u64> = (0..10_000u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 20).collect();
    group.throughput(Throughput::Elements(ids.len() as u64));
    group.bench_function("sparse_shard 10k ids, 4 shards", |b| {
        b.iter(|| black_box(&ids).iter().map(|&id| Placement::sparse_shard(id, 4) as u64).sum::<u64>())
    });
    group.finish();
}

criterion_group!(benches, placement);
criterion_main!(benches);
