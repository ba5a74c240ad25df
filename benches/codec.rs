//! The byte codecs every tensor goes through (`gradflow_proto::codec`), on one 4 MiB chunk
//! (the default `transport.chunk_bytes`): encode on push and on pull, decode and add on
//! arrival, and the finiteness check of every pushed gradient.

#![forbid(unsafe_code)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gradflow_proto::codec;

const FLOATS: usize = 1 << 20;

fn codecs(c: &mut Criterion) {
    let values: Vec<f32> = (0..FLOATS).map(|i| (i % 1000) as f32 * 1e-3).collect();
    let bytes = codec::f32s_to_bytes(&values);
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("f32s_to_bytes 4MiB", |b| b.iter(|| codec::f32s_to_bytes(black_box(&values))));
    let mut out = vec![0u8; bytes.len()];
    group.bench_function("write_f32s 4MiB", |b| {
        b.iter(|| codec::write_f32s(black_box(&mut out), black_box(&values)))
    });
    let mut dst = vec![0f32; FLOATS];
    group.bench_function("copy_f32s 4MiB", |b| {
        b.iter(|| codec::copy_f32s(black_box(&mut dst), black_box(&bytes)))
    });
    group.bench_function("add_f32s 4MiB", |b| {
        b.iter(|| codec::add_f32s(black_box(&mut dst), black_box(&bytes)))
    });
    group.bench_function("all_finite 4MiB", |b| b.iter(|| codec::all_finite(black_box(&bytes))));
    let ids: Vec<u64> = (0..FLOATS as u64 / 2).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
    let id_bytes = codec::u64s_to_bytes(&ids);
    let mut decoded = Vec::with_capacity(ids.len());
    group.bench_function("read_u64s 4MiB", |b| {
        b.iter(|| codec::read_u64s(black_box(&id_bytes), &mut decoded))
    });
    group.finish();
}

criterion_group!(benches, codecs);
criterion_main!(benches);
