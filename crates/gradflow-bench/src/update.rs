//! (5) Server update cost: Adam and Adagrad over `params` floats, in GB/s of parameters.
//!
//! Two measures per optimizer, neither with any network:
//! - *kernel*: `OptimizerConfig::step` over one flat slice on one thread, compared with the
//!   one-thread memcpy of (1);
//! - *server apply*: what a sync shard does when a step completes, through the server's own
//!   model (`gradflow_ps::model::ShardModel`, the tensor cut in 4 MiB pieces): two workers'
//!   pushes are taken into the step's accumulators (`Piece::accumulate_push`, which holds
//!   both as received; reported as *aggregate*), then `apply_accumulated` runs the optimizer
//!   on every piece in parallel, averaging the two pushes as it reads them; compared with the
//!   all-threads memcpy of (1). The two measures together are the server's whole cost of a
//!   two-worker step's dense update, from the pushes received to the parameters updated.
//!
//! Note what the ratio means: it compares parameters updated per second with bytes copied per
//! second, and an update reads the parameter, the gradient and each state slot and writes the
//! parameter and the state (the server apply of two pushes, Adam: 5 streams in, 3 out;
//! Adagrad: 4 in, 2 out), where a copy reads one and writes one.

use std::hint::black_box;
use std::time::Instant;

use gradflow_core::{DEFAULT_PARTITION_BYTES, DenseSpec, Initializer, ModelSpec, OptimizerConfig};
use gradflow_proto::codec;
use gradflow_ps::model::ShardModel;
use serde::{Deserialize, Serialize};

use crate::stats::{GB, Timing, sig4};
use crate::{BenchError, CeilingReport, Log, UpdateConfig};

/// Workers whose gradients the server apply averages (one extra pass, as in a 2-worker job).
const WORKERS: f32 = 2.0;

/// Both optimizers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateReport {
    /// Parameters updated, in floats.
    pub params: usize,
    pub rows: Vec<UpdateRow>,
}

/// One optimizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateRow {
    pub optimizer: String,
    pub kernel: Timing,
    /// Parameters updated per second by the kernel on one thread, GB/s.
    pub kernel_gb_per_s: f64,
    /// `kernel_gb_per_s` over one-thread memcpy.
    pub kernel_ratio_to_memcpy: Option<f64>,
    pub apply: Timing,
    /// Parameters updated per second by the server's apply on all threads, GB/s.
    pub apply_gb_per_s: f64,
    /// `apply_gb_per_s` over all-threads memcpy.
    pub apply_ratio_to_memcpy: Option<f64>,
    pub aggregate: Timing,
    /// Gradient bytes taken into the step's accumulators per second (one thread), GB/s: the
    /// pushes are held as received, so this is large.
    pub aggregate_gb_per_s: f64,
}

pub fn run(
    config: &UpdateConfig,
    ceiling: Option<&CeilingReport>,
    log: Log<'_>,
) -> Result<UpdateReport, BenchError> {
    let mut rows = Vec::new();
    for (name, opt) in [("adam", OptimizerConfig::adam(1e-3)), ("adagrad", OptimizerConfig::adagrad(0.05))] {
        let kernel = kernel(&opt, config.params, config.reps);
        let (aggregate, apply) = server_apply(&opt, config.params, config.reps);
        let bytes = config.params as f64 * 4.0;
        let kernel_gb_per_s = sig4(kernel.rate(bytes) / GB);
        let apply_gb_per_s = sig4(apply.rate(bytes) / GB);
        let row = UpdateRow {
            optimizer: name.into(),
            kernel,
            kernel_gb_per_s,
            kernel_ratio_to_memcpy: ceiling.map(|c| sig4(kernel_gb_per_s / c.memcpy_gb_per_s)),
            apply,
            apply_gb_per_s,
            apply_ratio_to_memcpy: ceiling.map(|c| sig4(apply_gb_per_s / c.memcpy_all_threads_gb_per_s)),
            aggregate,
            aggregate_gb_per_s: sig4(aggregate.rate(bytes * WORKERS as f64) / GB),
        };
        log(&format!(
            "update: {name} kernel {} GB/s (1 thread), server apply {} GB/s, aggregate {} GB/s",
            row.kernel_gb_per_s, row.apply_gb_per_s, row.aggregate_gb_per_s
        ));
        rows.push(row);
    }
    Ok(UpdateReport { params: config.params, rows })
}

fn kernel(opt: &OptimizerConfig, n: usize, reps: usize) -> Timing {
    let mut params = vec![0.1f32; n];
    let grad = vec![1e-3f32; n];
    let mut state = vec![0f32; n * opt.num_slots()];
    opt.init_state(&mut state);
    let mut secs = Vec::with_capacity(reps);
    for rep in 0..=reps {
        let started = Instant::now();
        opt.step(&mut params, &grad, &mut state, rep as u64 + 1);
        black_box(&mut params);
        if rep > 0 {
            secs.push(started.elapsed().as_secs_f64());
        }
    }
    Timing::of(&secs)
}

/// (aggregate, apply) timings through the server's model.
fn server_apply(opt: &OptimizerConfig, n: usize, reps: usize) -> (Timing, Timing) {
    let spec = ModelSpec {
        dense: vec![DenseSpec {
            name: "w".into(),
            shape: vec![n as u64],
            init: Initializer::Constant { value: 0.1 },
            optimizer: opt.clone(),
        }],
        sparse: Vec::new(),
    };
    let model = ShardModel::new(spec, 1, 0, DEFAULT_PARTITION_BYTES);
    // One buffer per worker, as two workers' pushes are: the update reads both from memory.
    let grads: Vec<_> =
        (0..WORKERS as usize).map(|w| codec::f32s_to_bytes(&vec![1e-3 * (w + 1) as f32; n])).collect();
    let pieces = model.placement().pieces_of(0).to_vec();
    let (mut aggregate, mut apply) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    for rep in 0..=reps {
        let started = Instant::now();
        // Both workers' pushes, held as received.
        for grad in &grads {
            for p in &pieces {
                let piece =
                    &model.pieces()[model.piece("w", p.partition).expect("every piece is on the one shard")];
                piece.accumulate_push(&[grad.slice(p.offset as usize * 4..p.end() as usize * 4)]);
            }
        }
        let summed = Instant::now();
        model.apply_accumulated(WORKERS);
        let applied = Instant::now();
        if rep > 0 {
            aggregate.push((summed - started).as_secs_f64());
            apply.push((applied - summed).as_secs_f64());
        }
    }
    (Timing::of(&aggregate), Timing::of(&apply))
}
