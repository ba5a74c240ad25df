//! (3) Many small tensors: steps per second of a model of `tensors` tensors of 1-64 KiB each,
//! one worker, through in-process shards (see [`crate::cluster`]).
//!
//! A step is the same as in (2): stage every gradient, send, pull everything back. With a
//! thousand tensors of a few KiB the bytes are few (about 32 MiB each way) and what shows is
//! the per-tensor cost: names, messages, lookups, locks and tasks per piece.

use std::time::Instant;

use gradflow_core::{DenseSpec, Initializer, Mode, ModelSpec, OptimizerConfig};
use serde::{Deserialize, Serialize};

use crate::cluster::{self, Servers};
use crate::stats::{Timing, human_bytes, sig4};
use crate::{BenchError, Log, SmallConfig};
use gradflow_data::SplitMix64;

/// Warm-up steps before timing.
const WARMUP: usize = 3;

/// All shard counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SmallReport {
    pub tensors: usize,
    /// Total bytes of the model.
    pub model_bytes: u64,
    pub rows: Vec<SmallRow>,
}

/// One shard count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SmallRow {
    pub shards: u32,
    /// One push-then-pull step (median over steps).
    pub step: Timing,
    pub steps_per_sec: f64,
    /// Gradient plus parameter bytes per second at the median step, in MB/s.
    pub mb_per_s: f64,
}

/// Tensors of uniformly random sizes between `min_bytes` and `max_bytes` (whole floats).
pub fn spec(config: &SmallConfig) -> ModelSpec {
    let mut rng = SplitMix64::new(config.seed);
    let (lo, hi) = (config.min_bytes / 4, config.max_bytes / 4);
    ModelSpec {
        dense: (0..config.tensors)
            .map(|i| DenseSpec {
                name: format!("small{i}"),
                shape: vec![lo + rng.below(hi - lo + 1)],
                init: Initializer::Zeros,
                optimizer: OptimizerConfig::sgd(0.01),
            })
            .collect(),
        sparse: Vec::new(),
    }
}

pub fn run(config: &SmallConfig, log: Log<'_>) -> Result<SmallReport, BenchError> {
    let spec = spec(config);
    let model_bytes = spec.dense_bytes();
    let mut rows = Vec::new();
    for &shards in &config.shards {
        let servers = Servers::start(shards, 1, Mode::Sync)?;
        let addrs = servers.addrs();
        let mut secs = cluster::on_worker_threads(1, |w| {
            let (spec, addrs) = (spec.clone(), &addrs);
            async move {
                let mut worker = cluster::connect(addrs, w).await?;
                worker.declare(spec.clone()).await?;
                let grads: Vec<Vec<f32>> =
                    spec.dense.iter().map(|d| vec![1e-3; d.numel() as usize]).collect();
                let mut params: Vec<Vec<f32>> =
                    spec.dense.iter().map(|d| vec![0.0; d.numel() as usize]).collect();
                let mut secs = Vec::with_capacity(config.steps);
                for step in 0..WARMUP + config.steps {
                    let started = Instant::now();
                    for (d, g) in spec.dense.iter().zip(&grads) {
                        worker.push_dense(&d.name, g)?;
                    }
                    worker.step().await?;
                    worker.pull_all_dense(&mut params).await?;
                    if step >= WARMUP {
                        secs.push(started.elapsed().as_secs_f64());
                    }
                }
                worker.leave().await?;
                Ok(secs)
            }
        })?;
        servers.stop()?;
        let step = Timing::of(&secs.pop().expect("one worker"));
        let row = SmallRow {
            shards,
            steps_per_sec: sig4(step.rate(1.0)),
            mb_per_s: sig4(step.rate(2.0 * model_bytes as f64) / 1e6),
            step,
        };
        log(&format!(
            "small: {} tensors ({}), {shards} shard(s): {} steps/s",
            config.tensors,
            human_bytes(model_bytes),
            row.steps_per_sec
        ));
        rows.push(row);
    }
    Ok(SmallReport { tensors: config.tensors, model_bytes, rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_in_range_and_deterministic() {
        let c = SmallConfig::default();
        let s = spec(&c);
        assert_eq!(s.dense.len(), 1000);
        assert!(s.dense.iter().all(|d| (256..=16384).contains(&d.numel())));
        assert_eq!(s, spec(&c));
        s.validate().unwrap();
    }
}
