//! Server-side aggregation and apply, through `gradflow_ps`'s public model API: what a shard
//! does with a push between receiving its bytes and answering.
//!
//! - `validate`: `gradflow_ps::push::validate` of a 16 MiB dense push in 4 MiB slices (names,
//!   offsets, lengths, finiteness).
//! - two workers: their pushes (each from its own buffer) taken into the step's accumulators
//!   (`Piece::accumulate_push`, as `ShardModel::accumulate` does for a sync push: both are
//!   held as received), then
//!   `ShardModel::apply_accumulated` (Adagrad, reading both pushes and averaging them as it
//!   goes), on every core;
//! - three workers: the same, where the third push makes the first two be summed into the
//!   step's sum and is added to it.
//! - sparse: a 10,000-id push summed per id (`SparseAccum::add`) and applied
//!   (`Table::apply`, Adagrad), and a 10,000-id `Table::pull`, in a table of 1M rows; and
//!   applies of other ids at every step, as a job's steps are (rows mostly not in the cache).

#![forbid(unsafe_code)]

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gradflow_core::{
    DEFAULT_PARTITION_BYTES, DenseSpec, Initializer, ModelSpec, OptimizerConfig, SparseSpec,
};
use gradflow_proto::codec;
use gradflow_ps::model::{ShardModel, SparseAccum};
use gradflow_ps::push::{DenseGrad, Push, validate};

const FLOATS: u64 = 4 << 20;
const ROWS: u64 = 1_000_000;
const IDS: usize = 10_000;
const DIM: u32 = 16;

fn model() -> ShardModel {
    let spec = ModelSpec {
        dense: vec![DenseSpec {
            name: "w".into(),
            shape: vec![FLOATS],
            init: Initializer::Zeros,
            optimizer: OptimizerConfig::adagrad(0.05),
        }],
        sparse: vec![SparseSpec {
            name: "emb".into(),
            dim: DIM,
            init: Initializer::Zeros,
            optimizer: OptimizerConfig::adagrad(0.05),
        }],
    };
    ShardModel::new(spec, 1, 0, DEFAULT_PARTITION_BYTES)
}

/// A push of the whole tensor, one 4 MiB slice per piece (the worker's packing).
fn push(model: &ShardModel, grad: &Bytes) -> Push {
    let dense = model
        .placement()
        .pieces_of(0)
        .iter()
        .map(|p| DenseGrad {
            tensor: "w".into(),
            partition: p.partition,
            offset: 0,
            data: grad.slice(p.offset as usize * 4..p.end() as usize * 4),
        })
        .collect();
    Push { worker: 0, step: 0, task: None, dense, sparse: Vec::new() }
}

fn dense(c: &mut Criterion) {
    let model = model();
    let grad = codec::f32s_to_bytes(&vec![1e-3f32; FLOATS as usize]);
    let mut group = c.benchmark_group("server dense 16 MiB");
    group.throughput(Throughput::Bytes(FLOATS * 4));
    group.bench_function("validate", |b| {
        b.iter(|| validate(&model, push(&model, &grad)).expect("valid push"))
    });
    // One push per worker, each from its own buffer as in a job: the update reads every one
    // from memory (one buffer pushed twice would be read the second time from the cache).
    let pushes: Vec<_> = (0..3)
        .map(|w| {
            let grad = codec::f32s_to_bytes(&vec![1e-3 * (w + 1) as f32; FLOATS as usize]);
            validate(&model, push(&model, &grad)).expect("valid push")
        })
        .collect();
    for workers in [2, 3] {
        let name = format!("accumulate_push and apply_accumulated (adagrad, {workers} workers)");
        group.bench_function(name, |b| {
            b.iter(|| {
                for valid in &pushes[..workers] {
                    for (idx, slices) in &valid.dense {
                        model.pieces()[*idx].accumulate_push(slices);
                    }
                }
                model.apply_accumulated(black_box(workers as f32));
            })
        });
    }
    group.finish();
}

fn sparse(c: &mut Criterion) {
    let model = model();
    let table = &model.tables()[0];
    let all: Vec<u64> = (0..ROWS).collect();
    // Rows are created by pushes (of zero gradients here), not by pulls.
    let mut fill = SparseAccum::default();
    fill.add(&all, &vec![0u8; all.len() * DIM as usize * 4], DIM as usize);
    table.apply(&fill, 1.0);
    assert_eq!(table.rows(), ROWS);
    let mut out = Vec::new();
    let ids: Vec<u64> =
        (0..IDS as u64).map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 11) % ROWS).collect();
    let values = codec::f32s_to_bytes(&vec![1e-3f32; IDS * DIM as usize]);
    let mut group = c.benchmark_group("server sparse 10k ids of 16, 1M rows");
    group.throughput(Throughput::Elements(IDS as u64));
    group.bench_function("pull", |b| {
        b.iter(|| {
            out.clear();
            table.pull(black_box(&ids), &mut out)
        })
    });
    group.bench_function("SparseAccum::add", |b| {
        b.iter(|| {
            let mut acc = SparseAccum::default();
            acc.add(black_box(&ids), &values, DIM as usize);
            acc
        })
    });
    let mut acc = SparseAccum::default();
    acc.add(&ids, &values, DIM as usize);
    group.bench_function("Table::apply (adagrad)", |b| b.iter(|| table.apply(black_box(&acc), 1.0)));
    // As in a job's steps: other ids every time, so most rows are not in the cache.
    let steps: Vec<(Vec<u64>, SparseAccum)> = (1..=64u64)
        .map(|k| {
            let ids: Vec<u64> = (0..IDS as u64)
                .map(|i| ((i + k * IDS as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 11) % ROWS)
                .collect();
            let mut acc = SparseAccum::default();
            acc.add(&ids, &values, DIM as usize);
            (ids, acc)
        })
        .collect();
    let mut next = steps.iter().cycle();
    group.bench_function("pull, other ids each step", |b| {
        b.iter(|| {
            out.clear();
            table.pull(black_box(&next.next().expect("a cycle").0), &mut out)
        })
    });
    group.bench_function("Table::apply (adagrad), other ids each step", |b| {
        b.iter(|| table.apply(black_box(&next.next().expect("a cycle").1), 1.0))
    });
    group.finish();
}

criterion_group!(benches, dense, sparse);
criterion_main!(benches);
