//! One training step of the built-in wide&deep model (the bench's headline model: 26 fields
//! hashed into 1M buckets, embeddings of 8, MLP 64-32, Adagrad, batches of 256) in one
//! process, on the synthetic click-through data `gradflow bench` trains on, split into its
//! parts so that a change to one part shows where the time went:
//!
//! - `train_step`: [`LocalTrainer::train_step`], the whole step (the single-process baseline);
//! - `sparse_ids`: the batch's ids per table;
//! - `forward_backward`: the model's pass alone, on parameters pulled once.
//!
//! The step minus the other two is the tables' part: finding and creating rows, copying them
//! out, and the optimizer updates. Every table row of the data exists before timing starts
//! (one warm-up epoch), as in a long run. Both run on the global rayon pool (every core).

#![forbid(unsafe_code)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gradflow_data::synth::{SynthConfig, schema, write_synth};
use gradflow_data::{Batch, Format, Reader, ReaderConfig, ShardSpec};
use gradflow_models::{Grads, LocalTrainer, ModelConfig, WideDeepConfig, build};

const ROWS: u64 = 64_000;
const BATCH: usize = 256;

fn batches() -> Vec<Batch> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("train.csv");
    let synth = SynthConfig { rows: ROWS, ..SynthConfig::default() };
    write_synth(&synth, &path).expect("writing synthetic data");
    let mut config = ReaderConfig::new(Format::Csv, vec![path]);
    config.csv = schema(&synth);
    let mut reader = Reader::open(&config, ShardSpec::new(0, 1).unwrap()).expect("opening the data");
    let mut out = Vec::new();
    loop {
        let mut batch = Batch::new(reader.num_dense());
        if reader.next_batch(&mut batch, BATCH).expect("reading the data") == 0 {
            return out;
        }
        out.push(batch);
    }
}

fn model() -> ModelConfig {
    ModelConfig::WideDeep(WideDeepConfig::new(26, 13))
}

fn step(c: &mut Criterion) {
    let batches = batches();
    let mut group = c.benchmark_group("wide&deep step, batch 256");
    group.throughput(Throughput::Elements(BATCH as u64));

    let mut trainer = LocalTrainer::from_config(&model()).unwrap();
    for batch in &batches {
        trainer.train_step(batch).unwrap();
    }
    let mut next = batches.iter().cycle();
    group.bench_function("train_step", |b| {
        b.iter(|| trainer.train_step(black_box(next.next().unwrap())).unwrap())
    });

    let wide_deep = build(&model()).unwrap();
    let mut ids = Vec::new();
    let mut next = batches.iter().cycle();
    group.bench_function("sparse_ids", |b| {
        b.iter(|| wide_deep.sparse_ids(black_box(next.next().unwrap()), &mut ids))
    });

    let pulled: Vec<_> = batches.iter().take(64).map(|b| trainer.pull(b)).collect();
    let mut grads = Grads::default();
    let mut next = batches.iter().zip(&pulled).cycle();
    group.bench_function("forward_backward", |b| {
        b.iter(|| {
            let (batch, params) = next.next().unwrap();
            wide_deep.forward_backward(black_box(batch), params, &mut grads).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, step);
criterion_main!(benches);
