//! `gradflow bench`: what gradflow's runtime achieves on this machine, next to what the
//! machine can do at best.
//!
//! [`run`] measures, in one go and in this order:
//!
//! 1. [`ceiling`]: raw TCP throughput over loopback between two processes, and memcpy
//!    bandwidth: the ceilings the other numbers are ratios of.
//!    [`compute`] (1b): the wide & deep MLP's matrix products alone, the ceiling of (6).
//! 2. [`dense`]: push then pull of dense models of 4, 64 and 512 MiB through 1, 2 and 4
//!    shards by 1 and 2 workers, in GB/s and as a fraction of raw TCP.
//! 3. [`small`]: steps per second of a model of 1000 tensors of 1-64 KiB.
//! 4. [`sparse`]: pull and push of 10,000 random ids (rows of 16 and 64 floats) in a table of
//!    10 million rows, in rows per second.
//! 5. [`update`]: Adam and Adagrad updates in GB/s of parameters, kernel and server apply, as a
//!    fraction of memcpy.
//! 6. [`training`]: samples per second of the wide & deep model with 1, 2 and 4 workers in
//!    sync and async mode, as real `gradflow launch` jobs, against the same model trained in
//!    one process with no servers.
//! 7. [`embedding`]: 50 million Zipf-distributed raw ids pushed through one server's table
//!    capped at 2 million rows, then the same ids with no cap: pull+push rows per second of
//!    both, and the process's resident memory against the cap's bytes.
//! 8. [`serve`]: `gradflow serve`'s HTTP endpoint over loopback, latency at batch 1 and
//!    throughput at batch 256, against the same forward pass in process.
//! 9. [`data`]: rows per second of each data reader (CSV plain, gzip and zstd; libsvm;
//!    Parquet; TFRecord), from local files and from `s3s-fs`, against pyarrow on the same
//!    Parquet file, and as a share of a training worker's time.
//!
//! What crosses a process boundary: (1) and (6) use child processes (a TCP sink; the job's
//! servers and workers). (2)-(4) run the servers in this process and each worker on its own
//! thread and tokio runtime, talking over loopback TCP, tensor link and gRPC ([`cluster`]). (5)
//! and (7) have no network at all.
//!
//! The result is a [`Report`]: one JSON object, and a table ([`Report::table`]). Every figure
//! is the median of a few repetitions after a warm-up ([`stats`]). [`BenchConfig`] holds the
//! sizes and repetitions; its defaults take about 95 s on 2 cores, and
//! [`BenchConfig::quick`] a few seconds.
//!
//! The hot paths also have criterion benches in `benches/` at the repository root, for
//! before/after comparisons of one change (`cargo bench -p gradflow-benches`).

#![forbid(unsafe_code)]

pub mod ceiling;
pub mod cluster;
pub mod compute;
pub mod config;
pub mod data;
pub mod dense;
pub mod embedding;
pub mod error;
pub mod report;
pub mod serve;
pub mod small;
pub mod sparse;
pub mod stats;
pub mod training;
pub mod update;

use std::path::Path;
use std::time::Instant;

pub use ceiling::{CeilingReport, TCP_SINK_ARGS, serve_tcp_sink};
pub use compute::{ComputeConfig, ComputeReport};
pub use config::{
    BenchConfig, CeilingConfig, DataBenchConfig, DenseConfig, EmbeddingConfig, Scenario, ServeBenchConfig,
    SmallConfig, SparseConfig, TrainingConfig, UpdateConfig,
};
pub use error::BenchError;
pub use report::{Machine, Report, Target};

/// Where progress lines go (one call per finished measurement).
pub type Log<'a> = &'a (dyn Fn(&str) + Sync);

/// Runs every scenario `config` selects and returns the report.
///
/// `program` is the `gradflow` executable (normally [`std::env::current_exe`]): the TCP sink
/// of (1) and the job processes of (6) are started from it.
pub fn run(config: &BenchConfig, program: &Path, log: Log<'_>) -> Result<Report, BenchError> {
    config.validate()?;
    let machine = Machine::detect();
    let started = Instant::now();
    let needs_ceiling =
        [Scenario::Ceiling, Scenario::Dense, Scenario::Update].into_iter().any(|s| config.runs(s));
    let ceiling = if needs_ceiling { Some(ceiling::run(&config.ceiling, program, log)?) } else { None };
    let compute = [Scenario::Compute, Scenario::Training]
        .into_iter()
        .any(|s| config.runs(s))
        .then(|| compute::run(&config.compute, log))
        .transpose()?;
    let dense =
        config.runs(Scenario::Dense).then(|| dense::run(&config.dense, ceiling.as_ref(), log)).transpose()?;
    let small = config.runs(Scenario::Small).then(|| small::run(&config.small, log)).transpose()?;
    let sparse = config.runs(Scenario::Sparse).then(|| sparse::run(&config.sparse, log)).transpose()?;
    let update = config
        .runs(Scenario::Update)
        .then(|| update::run(&config.update, ceiling.as_ref(), log))
        .transpose()?;
    let training = config
        .runs(Scenario::Training)
        .then(|| training::run(&config.training, program, compute.as_ref(), log))
        .transpose()?;
    let embedding =
        config.runs(Scenario::Embedding).then(|| embedding::run(&config.embedding, log)).transpose()?;
    let serve = config.runs(Scenario::Serve).then(|| serve::run(&config.serve, log)).transpose()?;
    let data = config.runs(Scenario::Data).then(|| data::run(&config.data, log)).transpose()?;
    let mut report = Report {
        version: report::REPORT_VERSION,
        machine,
        config: config.clone(),
        elapsed_s: 0.0,
        ceiling,
        compute,
        dense,
        small,
        sparse,
        update,
        training,
        embedding,
        serve,
        data,
        targets: Vec::new(),
    };
    report.targets = report.compute_targets();
    report.elapsed_s = stats::sig4(started.elapsed().as_secs_f64());
    Ok(report)
}
