//! Optimizer kernels (`gradflow_core::optim`): one update of 1M floats (a 4 MiB piece, what a
//! server updates per piece), and of 10,000 sparse rows of 16 floats (a sparse push); each
//! unchecked (`step`) and as a server runs it, checked for NaN and infinity block by block
//! (`step_checked`, "... checked"), so that one run gives the cost of the check.

#![forbid(unsafe_code)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gradflow_core::{Grad, OptimizerConfig};

const N: usize = 1 << 20;

fn optimizers() -> [(&'static str, OptimizerConfig); 4] {
    [
        ("sgd", OptimizerConfig::sgd(0.01)),
        ("adagrad", OptimizerConfig::adagrad(0.05)),
        ("adam", OptimizerConfig::adam(1e-3)),
        ("ftrl", OptimizerConfig::ftrl(0.05)),
    ]
}

fn dense(c: &mut Criterion) {
    let mut group = c.benchmark_group("optim dense 1M floats");
    group.throughput(Throughput::Bytes(N as u64 * 4));
    let grad = vec![1e-3f32; N];
    for (name, opt) in optimizers() {
        for checked in [false, true] {
            let mut params = vec![0.1f32; N];
            let mut state = vec![0f32; N * opt.num_slots()];
            opt.init_state(&mut state);
            let mut t = 0;
            let label = if checked { format!("{name} checked") } else { name.to_string() };
            group.bench_function(label, |b| {
                b.iter(|| {
                    t += 1;
                    if checked {
                        let grad = Grad::Plain(black_box(&grad));
                        opt.step_checked(black_box(&mut params), grad, &mut state, t).unwrap()
                    } else {
                        opt.step(black_box(&mut params), black_box(&grad), &mut state, t)
                    }
                })
            });
        }
    }
    group.finish();
}

fn sparse_rows(c: &mut Criterion) {
    const ROWS: usize = 10_000;
    const DIM: usize = 16;
    let mut group = c.benchmark_group("optim 10k rows of 16");
    group.throughput(Throughput::Elements(ROWS as u64));
    let grad = vec![1e-3f32; DIM];
    for (name, opt) in optimizers() {
        for checked in [false, true] {
            let stride = DIM * (1 + opt.num_slots());
            let mut arena = vec![0f32; ROWS * stride];
            for row in arena.chunks_exact_mut(stride) {
                opt.init_state(&mut row[DIM..]);
            }
            let mut t = 0;
            let label = if checked { format!("{name} checked") } else { name.to_string() };
            group.bench_function(label, |b| {
                b.iter(|| {
                    t += 1;
                    for row in arena.chunks_exact_mut(stride) {
                        let (values, state) = row.split_at_mut(DIM);
                        if checked {
                            opt.step_checked(values, Grad::Plain(black_box(&grad)), state, t).unwrap();
                        } else {
                            opt.step(values, black_box(&grad), state, t);
                        }
                    }
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, dense, sparse_rows);
criterion_main!(benches);
