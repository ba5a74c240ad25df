//! Throughput of `LocalTrainer` on the benchmark model: Wide & Deep with Criteo's shape (26
//! categorical fields, 13 dense features), 1M hash buckets, embeddings of width 8, MLP 64-32,
//! Adagrad, batches of 256.
//!
//! ```text
//! cargo run --release -p gradflow-models --example bench_wide_deep [steps] [rounds]
//! ```
//!
//! Ids follow a power law per field (a few values are frequent, most are rare), like Criteo's,
//! so batches mix rows that already exist with rows created on first touch. Batches are built
//! before the clock starts; the first steps are a warm-up. Every round measures each matrix
//! kernel in turn ([`Kernel::ALL`]), so a noisy machine weighs on both alike.

use std::time::Instant;

use gradflow_data::Batch;
use gradflow_models::{Grads, Kernel, LocalTrainer, Model, WideDeep, WideDeepConfig};

const BATCH: usize = 256;
const FIELDS: u32 = 26;
const DENSE: usize = 13;

fn main() {
    let steps: usize = std::env::args().nth(1).map_or(400, |s| s.parse().expect("steps"));
    let rounds: usize = std::env::args().nth(2).map_or(1, |s| s.parse().expect("rounds"));
    let warmup = 50;
    let mut rng = 0x5eed_u64;
    let batches: Vec<Batch> = (0..64).map(|_| criteo_like_batch(&mut rng)).collect();
    let config = WideDeepConfig::new(FIELDS as usize, DENSE);
    // One trainer per kernel, each measured in turn in every round (a before/after pair per
    // round when the machine is noisy).
    let mut trainers: Vec<(Kernel, LocalTrainer)> = Kernel::ALL
        .iter()
        .map(|&k| {
            (k, LocalTrainer::new(Box::new(WideDeep::new(config.clone()).unwrap().with_kernel(k))).unwrap())
        })
        .collect();

    // Fresh batches for the timed part too, so new rows keep being created as in a real run.
    let timed: Vec<Batch> = (0..steps.min(1000)).map(|_| criteo_like_batch(&mut rng)).collect();
    for (_, trainer) in &mut trainers {
        for b in batches.iter().cycle().take(warmup) {
            trainer.train_step(b).unwrap();
        }
    }
    // The model alone, on pulled parameters: what a worker spends per batch besides the network.
    let params: Vec<_> = timed.iter().take(32).map(|b| trainers[0].1.pull(b)).collect();
    let reps = steps.max(32);
    for round in 0..rounds {
        for (kernel, trainer) in &mut trainers {
            let (kernel, name) = (*kernel, kernel.name());
            let start = Instant::now();
            let mut loss = 0.0;
            for b in timed.iter().cycle().take(steps) {
                loss += trainer.train_step(b).unwrap();
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "round {round} {name}: LocalTrainer wide&deep: {steps} steps of {BATCH} in {secs:.3} s = {:.0} samples/s \
                 ({:.3} ms/step, mean loss {:.4}, {} threads, {} embedding rows)",
                (steps * BATCH) as f64 / secs,
                secs * 1e3 / steps as f64,
                loss / steps as f32,
                rayon::current_num_threads(),
                trainer.num_rows("embedding"),
            );

            let model = WideDeep::new(config.clone()).unwrap().with_kernel(kernel);
            let mut grads = Grads::default();
            let start = Instant::now();
            for k in 0..reps {
                model.forward_backward(&timed[k % 32], &params[k % 32], &mut grads).unwrap();
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "round {round} {name}: forward_backward alone: {:.0} samples/s ({:.3} ms/batch)",
                (reps * BATCH) as f64 / secs,
                secs * 1e3 / reps as f64
            );
        }
    }
    let model = WideDeep::new(config).unwrap();
    let mut ids = Vec::new();
    let start = Instant::now();
    for k in 0..reps {
        model.sparse_ids(&timed[k % 32], &mut ids);
    }
    println!(
        "sparse_ids alone: {:.3} ms/batch ({} unique ids in the last batch, of {} entries)",
        start.elapsed().as_secs_f64() * 1e3 / reps as f64,
        ids[0].len(),
        BATCH * FIELDS as usize
    );
}

fn next(rng: &mut u64) -> u64 {
    *rng = rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *rng;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn uniform(rng: &mut u64) -> f64 {
    (next(rng) >> 11) as f64 / (1u64 << 53) as f64
}

fn criteo_like_batch(rng: &mut u64) -> Batch {
    let mut batch = Batch::new(DENSE);
    let mut dense = [0.0f32; DENSE];
    let mut sparse = Vec::with_capacity(FIELDS as usize);
    for _ in 0..BATCH {
        for d in &mut dense {
            *d = (uniform(rng) * 4.0) as f32;
        }
        sparse.clear();
        for f in 0..FIELDS {
            // Field cardinalities from 10 to about 10M; a value's rank is log-uniform, so the
            // head of each field is hit often and the tail rarely.
            let card = 10f64.powf(1.0 + 6.0 * f as f64 / (FIELDS - 1) as f64);
            let rank = card.powf(uniform(rng)) as u64;
            sparse.push((f, (f as u64) << 40 | rank, 1.0));
        }
        batch.push((uniform(rng) < 0.25) as u32 as f32, &dense, sparse.iter().copied());
    }
    batch
}
