//! (6) Training: samples per second of the wide & deep headline model (26 fields hashed into
//! 1M buckets, embeddings of 8 plus a wide weight, MLP 64-32, Adagrad, batches of 256) on
//! synthetic data, as real jobs and in one process.
//!
//! - *Jobs*: each configuration (workers x mode, `servers` shards) runs through
//!   `gradflow launch`'s local backend ([`LocalLauncher`]): every server and every worker is
//!   a child process (`gradflow ps`, `gradflow worker`) talking over loopback (tensor link and gRPC). Every job
//!   trains one epoch over the same file. Its rate is read from the workers' progress
//!   reports ([`gradflow_launch::local::JobOutcome::progress`]: the sum of every running worker's latest rate, as the
//!   launcher's progress line shows it); the first report of each worker (start-up, first rows created) is skipped and the
//!   median of the rest is taken. The end-to-end rate (all samples over the job's wall time,
//!   process start and stop included) is reported beside it.
//! - *Single process*: the same file, read and standardized the same way (on a thread of its
//!   own, [`ReadAhead`], a few batches ahead), trained with [`LocalTrainer`] (no servers, no
//!   network) in this process, with every core and with one thread; timed in windows of
//!   `log_every_steps` steps, the first skipped, median of the rest.
//!
//! On one machine both share the same cores, so the ratio of a job's samples/s to the
//! single-process samples/s is also the ratio per core: what running distributed costs.
//!
//! When the compute ceiling was measured ([`crate::compute`]), every rate is also given as a
//! fraction of it: the one-thread baseline of the one-thread ceiling, every other rate of the
//! all-threads ceiling (the jobs' processes share the same cores).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gradflow_core::Mode;
use gradflow_data::{ReadAhead, Reader, ShardSpec};
use gradflow_job::{Event, JobConfig};
use gradflow_launch::local::{Console, LocalLauncher};
use gradflow_models::LocalTrainer;
use gradflow_proto::Compression;
use serde::{Deserialize, Serialize};

use crate::compute::ComputeReport;
use crate::stats::{median, sig4};
use crate::{BenchError, Log, TrainingConfig};

/// Every configuration and the baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingReport {
    /// Training rows (one epoch per run).
    pub rows: u64,
    pub batch_size: usize,
    /// Cores of this machine, shared by every process of a job.
    pub cores: usize,
    pub single_process: SingleProcess,
    pub runs: Vec<TrainingRun>,
}

/// [`LocalTrainer`] in this process, no servers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SingleProcess {
    /// With rayon on every core.
    pub samples_per_sec: f64,
    pub threads: usize,
    /// With one rayon thread.
    pub one_thread_samples_per_sec: f64,
    /// `samples_per_sec` over the compute ceiling on every thread.
    #[serde(default)]
    pub ratio_to_compute: Option<f64>,
    /// `one_thread_samples_per_sec` over the compute ceiling on one thread.
    #[serde(default)]
    pub one_thread_ratio_to_compute: Option<f64>,
}

/// One job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingRun {
    pub workers: u32,
    pub servers: u32,
    pub mode: Mode,
    /// `[transport] compression`.
    #[serde(default)]
    pub compression: Compression,
    /// Bytes over loopback during the job (every process of it; read from the kernel's
    /// counters of the `lo` interface, so other traffic on this machine adds to it), per
    /// training sample. `None` where the kernel does not say.
    #[serde(default)]
    pub loopback_bytes_per_sample: Option<f64>,
    /// All workers together, steady state (see the module docs).
    pub samples_per_sec: f64,
    pub per_worker_samples_per_sec: f64,
    /// `samples_per_sec` over the single process's (every core).
    pub ratio_to_single: f64,
    /// `samples_per_sec` over the compute ceiling on every thread.
    #[serde(default)]
    pub ratio_to_compute: Option<f64>,
    /// Samples of all workers over the job's wall time, start-up and shutdown included.
    pub end_to_end_samples_per_sec: f64,
    pub wall_s: f64,
    pub samples: u64,
    /// Progress reports the steady-state rate is the median of.
    pub reports_used: usize,
}

pub fn run(
    config: &TrainingConfig,
    program: &Path,
    compute: Option<&ComputeReport>,
    log: Log<'_>,
) -> Result<TrainingReport, BenchError> {
    let dir = tempfile::Builder::new()
        .prefix("gradflow-bench-")
        .tempdir()
        .map_err(BenchError::io("creating a temporary directory"))?;
    let first = job(config, dir.path(), 1, Mode::Sync, Compression::None)?;
    let started = Instant::now();
    gradflow_launch::prepare::prepare_data(&first).map_err(|e| job_error(&first, e))?;
    log(&format!(
        "training: wrote {} synthetic rows in {:.1} s",
        config.rows,
        started.elapsed().as_secs_f64()
    ));

    let single = single_process(config, &first, compute)?;
    log(&format!(
        "training: single process {:.0} samples/s ({} threads), {:.0} on one thread",
        single.samples_per_sec, single.threads, single.one_thread_samples_per_sec
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(BenchError::io("starting the launcher's runtime"))?;
    let mut runs = Vec::new();
    for &mode in &config.modes {
        for &workers in &config.workers {
            for &compression in &config.compression {
                let job = job(config, dir.path(), workers, mode, compression)?;
                let run = launch(&runtime, job, program, &single, compute)?;
                log(&format!(
                    "training: {workers} worker(s) {mode}, {} server(s), compression {}: {:.0} samples/s ({:.0}% of single process), end to end {:.0} in {:.1} s{}",
                    run.servers,
                    compression.name(),
                    run.samples_per_sec,
                    run.ratio_to_single * 100.0,
                    run.end_to_end_samples_per_sec,
                    run.wall_s,
                    run.loopback_bytes_per_sample
                        .map_or(String::new(), |b| format!(", {b:.0} loopback bytes per sample"))
                ));
                runs.push(run);
            }
        }
    }
    Ok(TrainingReport {
        rows: config.rows,
        batch_size: config.batch_size,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        single_process: single,
        runs,
    })
}

fn job_error(job: &JobConfig, e: impl std::fmt::Display) -> BenchError {
    BenchError::Job { job: job.name.clone(), message: e.to_string() }
}

/// The job file of one configuration; every job reads `dir/data/train.csv`.
fn job(
    config: &TrainingConfig,
    dir: &Path,
    workers: u32,
    mode: Mode,
    compression: Compression,
) -> Result<JobConfig, BenchError> {
    let name = format!("bench-{workers}w-{mode}-{}", compression.name());
    let train = dir.join("data").join("train.csv");
    let out = dir.join("runs").join(&name);
    let text = format!(
        r#"
name = "{name}"
servers = {servers}
workers = {workers}
mode = "{mode}"

[model]
kind = "wide_deep"
num_fields = 26
num_dense = 13
hash_buckets = 1000000
embedding_dim = 8
hidden = [64, 32]
sparse_optimizer = {{ kind = "adagrad", lr = 0.05 }}
dense_optimizer = {{ kind = "adagrad", lr = 0.05 }}

[data]
train = {train:?}

[data.synth]
train_rows = {rows}
test_rows = 0
seed = 0

[train]
batch_size = {batch}
epochs = 1
log_every_steps = {every}

[transport]
compression = "{compression}"

[output]
dir = {out:?}
log = "warn"
metrics = false
"#,
        compression = compression.name(),
        servers = config.servers,
        train = path_str(&train),
        rows = config.rows,
        batch = config.batch_size,
        every = config.log_every_steps,
        out = path_str(&out),
    );
    JobConfig::parse(&text).map_err(|e| BenchError::Job { job: name, message: e.to_string() })
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Rates of windows of `every` steps of [`LocalTrainer`] over the whole file; the median of
/// all windows but the first.
fn single_process_rate(config: &TrainingConfig, job: &JobConfig) -> Result<f64, BenchError> {
    let model = job.model().map_err(|e| job_error(job, e))?;
    let scaler = gradflow_trainer::standardizer(job).map_err(|e| job_error(job, e))?;
    let reader = Reader::open(&job.train_reader(), ShardSpec::new(0, 1)?)?;
    let mut trainer = LocalTrainer::from_config(model)?;
    let mut batches = ReadAhead::spawn(reader, config.batch_size, READ_AHEAD, move |batch| {
        if let Some(s) = &scaler {
            s.apply(batch);
        }
    })?;
    let mut rates = Vec::new();
    let (mut steps, mut window_samples, mut window_start) = (0u64, 0usize, Instant::now());
    while let Some(ahead) = batches.next()? {
        trainer.train_step(&ahead.batch)?;
        steps += 1;
        window_samples += ahead.batch.len();
        batches.recycle(ahead.batch);
        if steps % config.log_every_steps == 0 {
            rates.push(window_samples as f64 / window_start.elapsed().as_secs_f64().max(1e-9));
            (window_samples, window_start) = (0, Instant::now());
        }
    }
    if rates.is_empty() {
        return Err(BenchError::Config(format!(
            "training.rows ({}) is less than one window of {} steps of {}",
            config.rows, config.log_every_steps, config.batch_size
        )));
    }
    Ok(median(if rates.len() > 1 { &rates[1..] } else { &rates }))
}

/// Batches the single process reads ahead of the one it trains.
const READ_AHEAD: usize = 2;

/// `rate` over the compute ceiling on one thread or every thread.
fn ratio_to_compute(rate: f64, compute: Option<&ComputeReport>, all_threads: bool) -> Option<f64> {
    compute.map(|c| sig4(rate / c.ceiling(all_threads).0.max(1e-9)))
}

fn single_process(
    config: &TrainingConfig,
    job: &JobConfig,
    compute: Option<&ComputeReport>,
) -> Result<SingleProcess, BenchError> {
    let all = single_process_rate(config, job)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(|e| BenchError::Internal(format!("a one-thread pool: {e}")))?;
    let one = pool.install(|| single_process_rate(config, job))?;
    Ok(SingleProcess {
        samples_per_sec: sig4(all),
        threads: rayon::current_num_threads(),
        one_thread_samples_per_sec: sig4(one),
        ratio_to_compute: ratio_to_compute(all, compute, true),
        one_thread_ratio_to_compute: ratio_to_compute(one, compute, false),
    })
}

/// Collects what the launcher prints: its progress lines, and the rest for error messages.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<CaptureState>>);

#[derive(Default)]
struct CaptureState {
    partial: Vec<u8>,
    lines: Vec<String>,
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        s.partial.extend_from_slice(buf);
        while let Some(i) = s.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = s.partial.drain(..=i).collect();
            s.lines.push(String::from_utf8_lossy(&line).trim_end().to_string());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn launch(
    runtime: &tokio::runtime::Runtime,
    job: JobConfig,
    program: &Path,
    single: &SingleProcess,
    compute: Option<&ComputeReport>,
) -> Result<TrainingRun, BenchError> {
    let (name, workers, servers, mode) = (job.name.clone(), job.workers, job.servers, job.mode);
    let compression = job.transport.compression;
    let loopback_before = loopback_bytes();
    let capture = Capture::default();
    let console = Console::lines(capture.clone()).progress_every(Duration::ZERO);
    let launcher = LocalLauncher::new(job, PathBuf::from(program)).console(console);
    let outcome = runtime.block_on(launcher.run(std::future::pending::<()>()));
    let loopback = loopback_before.zip(loopback_bytes()).map(|(a, b)| b.saturating_sub(a));
    let lines = std::mem::take(&mut capture.0.lock().unwrap_or_else(|p| p.into_inner()).lines);
    let outcome = outcome.map_err(|e| {
        let tail: Vec<&str> = lines.iter().rev().take(20).rev().map(String::as_str).collect();
        BenchError::Job { job: name.clone(), message: format!("{e}\nlast lines:\n{}", tail.join("\n")) }
    })?;
    let samples: u64 = outcome
        .done
        .iter()
        .map(|e| match e {
            Event::Done { samples, .. } => *samples,
            _ => 0,
        })
        .sum();
    let wall_s = outcome.wall_time.as_secs_f64();
    let end_to_end = samples as f64 / wall_s.max(1e-9);
    let rates: Vec<f64> = outcome.progress.iter().map(|p| p.samples_per_sec).collect();
    // The first report of every worker covers its start-up.
    let steady = rates.get(workers as usize..).filter(|r| !r.is_empty()).unwrap_or(&rates);
    let samples_per_sec = if steady.is_empty() { end_to_end } else { median(steady) };
    Ok(TrainingRun {
        workers,
        servers,
        mode,
        compression,
        loopback_bytes_per_sample: loopback.map(|b| sig4(b as f64 / samples.max(1) as f64)),
        samples_per_sec: sig4(samples_per_sec),
        per_worker_samples_per_sec: sig4(samples_per_sec / f64::from(workers)),
        ratio_to_single: sig4(samples_per_sec / single.samples_per_sec),
        ratio_to_compute: ratio_to_compute(samples_per_sec, compute, true),
        end_to_end_samples_per_sec: sig4(end_to_end),
        wall_s: sig4(wall_s),
        samples,
        reports_used: steady.len(),
    })
}

/// Bytes received on the loopback interface so far (Linux: `/proc/net/dev`); every byte sent
/// over loopback is received once.
fn loopback_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/dev").ok()?;
    let line = text.lines().find(|l| l.trim_start().starts_with("lo:"))?;
    line.split_once(':')?.1.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_splits_lines() {
        let mut c = Capture::default();
        c.write_all(b"step 1  samples/s 10  loss 1\nstep 2").unwrap();
        c.write_all(b"  samples/s 20  loss 1\n").unwrap();
        let lines = c.0.lock().unwrap().lines.clone();
        assert_eq!(lines, ["step 1  samples/s 10  loss 1", "step 2  samples/s 20  loss 1"]);
    }

    #[test]
    fn job_files_parse() {
        let dir = tempfile::tempdir().unwrap();
        let j = job(&TrainingConfig::default(), dir.path(), 2, Mode::Async, Compression::Bf16).unwrap();
        assert_eq!(j.transport.compression, Compression::Bf16);
        assert_eq!((j.workers, j.servers, j.mode), (2, 1, Mode::Async));
        assert_eq!(j.train.batch_size, 256);
    }
}
