//! (2) Dense exchange: one step of push then pull of a whole dense model, through 1, 2 or 4
//! in-process shards (see [`crate::cluster`]), by one or two workers, in sync mode.
//!
//! The model is `tensors` equal tensors (SGD, so that the update is one cheap pass; scenario
//! 5 measures the optimizers). Before each repetition every worker writes each tensor's
//! gradient where the worker sends it from (`push_dense_mut`), as a model that produces its
//! gradient in place does; the gradient is made before the clock starts, as a model's
//! backward pass would be. A repetition is, on every worker at once: send the gradients
//! (`step`: the servers sum and apply them once every worker has pushed), and pull every
//! tensor back (`pull_all_dense`, which waits for the updated model). It lasts from the
//! first worker's start to the last worker's end; bytes moved are `2 * model bytes *
//! workers` (gradients up, parameters down), reported in GB/s next to the raw TCP ceiling of
//! (1). Buffers are allocated once per configuration and reused.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use gradflow_core::{DenseSpec, Initializer, Mode, ModelSpec, OptimizerConfig};
use serde::{Deserialize, Serialize};

use crate::cluster::{self, Servers};
use crate::stats::{GB, Timing, human_bytes, median, sig4};
use crate::{BenchError, CeilingReport, DenseConfig, Log};

/// Gradient value pushed everywhere: finite, small, and not zero.
const GRAD: f32 = 1e-3;

/// All configurations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DenseReport {
    pub rows: Vec<DenseRow>,
}

/// One model size, shard count and worker count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DenseRow {
    pub model_bytes: u64,
    pub tensors: usize,
    pub shards: u32,
    pub workers: u32,
    /// Push then pull, all workers (median over repetitions).
    pub step: Timing,
    /// Gradient plus parameter bytes of all workers per second at the median step.
    pub gb_per_s: f64,
    /// `gb_per_s` over the raw TCP loopback throughput of (1), the data in the cache.
    pub ratio_to_tcp: Option<f64>,
    /// `gb_per_s` over the raw TCP loopback throughput of (1), memory to memory.
    pub ratio_to_tcp_memory: Option<f64>,
    /// The push half alone (`step`, slowest worker, median), in GB/s of gradients.
    pub push_gb_per_s: f64,
    /// The pull half alone (slowest worker, median), in GB/s of parameters.
    pub pull_gb_per_s: f64,
}

/// Runs every configuration of `config`; `ceiling`'s TCP figures are the ceilings of the ratios.
pub fn run(
    config: &DenseConfig,
    ceiling: Option<&CeilingReport>,
    log: Log<'_>,
) -> Result<DenseReport, BenchError> {
    let mut rows = Vec::new();
    for &bytes in &config.model_bytes {
        for &shards in &config.shards {
            for &workers in &config.workers {
                let row = measure(config, bytes, shards, workers, ceiling)?;
                log(&format!(
                    "dense: {} model, {shards} shard(s), {workers} worker(s): {} GB/s (push {}, pull {}){}",
                    human_bytes(bytes),
                    row.gb_per_s,
                    row.push_gb_per_s,
                    row.pull_gb_per_s,
                    row.ratio_to_tcp.map(|r| format!(", {:.0}% of TCP", r * 100.0)).unwrap_or_default()
                ));
                rows.push(row);
            }
        }
    }
    Ok(DenseReport { rows })
}

/// A model of `tensors` tensors adding up to `bytes` (the first ones take the remainder).
pub fn spec(bytes: u64, tensors: usize) -> ModelSpec {
    let floats = bytes / 4;
    let (base, extra) = (floats / tensors as u64, floats % tensors as u64);
    ModelSpec {
        dense: (0..tensors)
            .map(|i| DenseSpec {
                name: format!("dense{i}"),
                shape: vec![base + u64::from((i as u64) < extra)],
                init: Initializer::Zeros,
                optimizer: OptimizerConfig::sgd(0.01),
            })
            .collect(),
        sparse: Vec::new(),
    }
}

/// When one repetition started, finished pushing, and finished pulling, on one worker.
type Marks = (Instant, Instant, Instant);

fn measure(
    config: &DenseConfig,
    bytes: u64,
    shards: u32,
    workers: u32,
    ceiling: Option<&CeilingReport>,
) -> Result<DenseRow, BenchError> {
    let spec = spec(bytes, config.tensors);
    let servers = Servers::start(shards, workers, Mode::Sync)?;
    let addrs = servers.addrs();
    let barrier = tokio::sync::Barrier::new(workers as usize);
    let reps = AtomicUsize::new(config.min_reps);
    let marks = cluster::on_worker_threads(workers, |w| {
        let (spec, addrs, barrier, reps) = (spec.clone(), &addrs, &barrier, &reps);
        async move {
            let mut worker = cluster::connect(addrs, w).await?;
            worker.declare(spec.clone()).await?;
            let mut params: Vec<Vec<f32>> =
                spec.dense.iter().map(|d| vec![0.0; d.numel() as usize]).collect();
            let mut one_rep = async |worker: &mut gradflow_worker::Worker| -> Result<Marks, BenchError> {
                for d in &spec.dense {
                    worker.push_dense_mut(&d.name)?.fill(GRAD);
                }
                barrier.wait().await;
                let start = Instant::now();
                worker.step().await?;
                let pushed = Instant::now();
                worker.pull_all_dense(&mut params).await?;
                Ok((start, pushed, Instant::now()))
            };
            // The warm-up also sizes the run: as many repetitions as fit in the budget.
            let (start, _, end) = one_rep(&mut worker).await?;
            if w == 0 {
                let warm = (end - start).as_secs_f64().max(1e-6);
                let n = (config.rep_budget_seconds / warm) as usize;
                reps.store(n.clamp(config.min_reps, config.max_reps), Ordering::SeqCst);
            }
            barrier.wait().await;
            let n = reps.load(Ordering::SeqCst);
            let mut marks = Vec::with_capacity(n);
            for _ in 0..n {
                marks.push(one_rep(&mut worker).await?);
            }
            worker.leave().await?;
            Ok(marks)
        }
    })?;
    servers.stop()?;

    let n = marks[0].len();
    let (mut step, mut push, mut pull) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for rep in 0..n {
        let start = marks.iter().map(|m| m[rep].0).min().expect("at least one worker");
        let end = marks.iter().map(|m| m[rep].2).max().expect("at least one worker");
        step.push((end - start).as_secs_f64());
        push.push(marks.iter().map(|m| (m[rep].1 - m[rep].0).as_secs_f64()).fold(0.0, f64::max));
        pull.push(marks.iter().map(|m| (m[rep].2 - m[rep].1).as_secs_f64()).fold(0.0, f64::max));
    }
    let step = Timing::of(&step);
    let one_way = bytes as f64 * f64::from(workers);
    let gb_per_s = sig4(step.rate(2.0 * one_way) / GB);
    Ok(DenseRow {
        model_bytes: bytes,
        tensors: config.tensors,
        shards,
        workers,
        step,
        gb_per_s,
        ratio_to_tcp: ceiling.map(|c| sig4(gb_per_s / c.tcp_gb_per_s)),
        ratio_to_tcp_memory: ceiling.map(|c| sig4(gb_per_s / c.tcp_memory_gb_per_s)),
        push_gb_per_s: sig4(one_way / median(&push).max(1e-12) / GB),
        pull_gb_per_s: sig4(one_way / median(&pull).max(1e-12) / GB),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_adds_up() {
        let s = spec(4 << 20, 3);
        assert_eq!(s.dense_bytes(), 4 << 20);
        s.validate().unwrap();
    }
}
