//! gradflow's built-in training loop: what `gradflow worker` runs.
//!
//! A worker reads its shard of the training data, and for every batch pulls the parameters
//! the batch needs from the servers, computes the loss and gradients with a built-in model
//! (gradflow-models), and pushes the gradients. At the end of every epoch worker 0 scores the
//! model on the test data and reports the result; with `[checkpoint] keep_best` or `[train]
//! early_stop_patience` it also sends the servers the score by the selection metric (the
//! servers checkpoint the model scored and keep the best such checkpoint), and once
//! `early_stop_patience` evaluations in a row brought no better score it ends training there
//! (every worker's training ends when the servers refuse its next step as `finished`).
//!
//! - [`run_worker`]: the loop.
//! - [`evaluate`]: test loss, AUC and accuracy of the model the servers hold.
//! - [`standardizer`]: dense-feature scaling measured the same way on every worker.
//! - [`append_result`], [`recorded_result`]: the job's results file, one line per evaluation
//!   (also written by worker programs of their own, such as the Python package's).
//! - [`serving_info`]: what a predictor needs beside the parameters; worker 0 declares it to
//!   the servers, and every checkpoint carries it.
//! - [`observe`]: what a worker records about itself: TensorBoard scalars, each epoch's mean
//!   training loss (in the results line), the time a step spends in each phase.
//! - [`metrics`]: the worker's Prometheus `/metrics`.

#![forbid(unsafe_code)]

pub mod metrics;
pub mod observe;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use gradflow_core::{Metric, Mode};
use gradflow_data::metrics as scoring;
use gradflow_data::{Batch, FilePiece, Reader, ReaderConfig, ShardSpec, Standardizer};
use gradflow_job::contract::{ENV_ATTEMPT, ENV_RUN_ID};
use gradflow_job::{Event, JobConfig, Sharding};
use gradflow_models::{Grads, InputSchema, Model, Params, Scaling, ServingInfo, SparseRows};
use gradflow_worker::{DataTask, Selection, StepOutcome, TaskHandout, TaskPiece, Worker, WorkerConfig};
use observe::{Phases, Recorder};
use thiserror::Error;
use tracing::{debug, info, warn};

/// Fault injection for tests: epochs (1-based, comma-separated, or `all`) during whose
/// scoring worker 0 aborts, the way a kill would stop it. Start `k` of the process
/// (`GRADFLOW_ATTEMPT` = k) aborts only while scoring epoch k + 1, after the scores are
/// computed and before the results line is written; with the suffix `:written` (on the
/// whole value) after the line is written and before the servers hear of it. A restarted
/// worker under this hook waits three heartbeat timeouts before it connects, so that the
/// servers drop it first, as they would a worker that is slow to come back. A job killed so
/// at every epoch scores each epoch exactly once if it recovers as it should.
pub const ENV_FAULT_ABORT_SCORING: &str = "GRADFLOW_FAULT_ABORT_SCORING";

/// Why training stopped.
///
/// Messages of wrapped errors are written out in the variant's own message, so none of them
/// is a `#[source]`: a chain printed with `{:#}` would say each twice.
#[derive(Debug, Error)]
pub enum TrainError {
    #[error("data: {0}")]
    Data(gradflow_data::DataError),
    #[error("model: {0}")]
    Model(gradflow_models::ModelError),
    #[error(transparent)]
    Worker(#[from] gradflow_worker::WorkerError),
    #[error("{0}")]
    Config(String),
    #[error("results file {}: {cause}", .path.display())]
    Results { path: PathBuf, cause: std::io::Error },
    /// An epoch finished training but was not scored, and the model of its end is gone: the
    /// servers moved on while its scorer was down before it could hold them.
    #[error(
        "epoch {epoch} finished training at step {ended_at} but was not scored, and the servers are at step {resumed_at} now: worker 0 stopped before it could hold the model for scoring, and the model of that epoch's end is gone. Its score is missing from the results; the rest of the job is unaffected (rerun the epoch from a checkpoint to score it)"
    )]
    ScoreLost { epoch: u64, ended_at: u64, resumed_at: u64 },
    /// The training data, all of it, holds no example: nothing would be trained.
    #[error("the training data ({files}) holds no example: {why}")]
    NoExamples {
        /// The data files, cut short.
        files: String,
        /// What was found instead (only a header, or only malformed lines).
        why: String,
    },
}

impl From<gradflow_data::DataError> for TrainError {
    fn from(e: gradflow_data::DataError) -> TrainError {
        TrainError::Data(e)
    }
}

impl From<gradflow_models::ModelError> for TrainError {
    fn from(e: gradflow_models::ModelError) -> TrainError {
        TrainError::Model(e)
    }
}

impl TrainError {
    /// True when running the same worker again would fail the same way: the data, the job's
    /// configuration, or the model and the data disagree. False for what may pass (a server
    /// that went away, a network failure, a results file that could not be written).
    pub fn will_repeat(&self) -> bool {
        use gradflow_worker::WorkerError as W;
        match self {
            TrainError::Data(gradflow_data::DataError::Io { cause, .. }) => matches!(
                cause.kind(),
                std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::IsADirectory
                    | std::io::ErrorKind::NotADirectory
                    | std::io::ErrorKind::InvalidData
            ),
            TrainError::Data(_) | TrainError::Model(_) | TrainError::Config(_) => true,
            TrainError::NoExamples { .. } | TrainError::ScoreLost { .. } => true,
            TrainError::Worker(e) => {
                e.is_permanent()
                    || matches!(
                        e,
                        W::Config(_)
                            | W::InvalidSpec(_)
                            | W::NotDeclared
                            | W::UnknownTensor(_)
                            | W::UnknownTable(_)
                            | W::Length { .. }
                    )
            }
            TrainError::Results { .. } => false,
        }
    }
}

/// What one worker did.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerSummary {
    pub steps: u64,
    pub samples: u64,
    pub evals: Vec<Event>,
}

/// The scaling of dense features: measured on the first `standardize_rows` rows of the
/// training data, read in file order, so every worker computes the same one.
pub fn standardizer(job: &JobConfig) -> Result<Option<Standardizer>, TrainError> {
    if !job.data.standardize {
        return Ok(None);
    }
    let mut cfg = job.train_reader();
    cfg.shuffle_buffer = 0;
    cfg.epochs = gradflow_data::Epochs::Count(1);
    let mut reader = Reader::open(&cfg, ShardSpec::new(0, 1)?)?;
    if reader.num_dense() == 0 {
        return Ok(None);
    }
    let mut s = Standardizer::new(reader.num_dense());
    let mut batch = Batch::new(reader.num_dense());
    let mut left = job.data.standardize_rows;
    while left > 0 {
        let n = reader.next_batch(&mut batch, left.min(4096))?;
        if n == 0 {
            break;
        }
        s.observe(&batch);
        left -= n;
    }
    Ok(Some(s))
}

/// What a predictor needs beside the parameters of `job`'s model: the model config, the
/// columns of a row (`dense` in feature order, as the reader resolved them), and the scaling.
pub fn serving_info(
    job: &JobConfig,
    dense: &[String],
    scaler: Option<&Standardizer>,
) -> Result<ServingInfo, TrainError> {
    let model = job.model().map_err(|e| TrainError::Config(e.to_string()))?.clone();
    // The columns the readers use (a synthetic-data job names its own).
    let columns = job.train_reader().csv;
    let input = InputSchema { label: columns.label, dense: dense.to_vec(), categorical: columns.categorical };
    Ok(ServingInfo::new(&job.name, model, input, scaler.map(Scaling::of)))
}

/// Reusable buffers for one step: the parameters a batch needs and their gradients.
struct StepBuffers {
    ids: Vec<Vec<u64>>,
    params: Params,
    grads: Grads,
    pulled: Vec<Vec<f32>>,
}

impl StepBuffers {
    fn new(model: &dyn Model) -> StepBuffers {
        let spec = model.spec();
        StepBuffers {
            ids: Vec::new(),
            params: Params {
                dense: vec![Vec::new(); spec.dense.len()],
                sparse: spec.sparse.iter().map(|s| SparseRows::new(s.dim as usize)).collect(),
            },
            grads: Grads::default(),
            pulled: vec![Vec::new(); spec.sparse.len()],
        }
    }

    /// Pulls what `batch` needs: every dense tensor and the batch's rows of every table.
    async fn pull(&mut self, worker: &Worker, model: &dyn Model, batch: &Batch) -> Result<(), TrainError> {
        model.sparse_ids(batch, &mut self.ids);
        let spec = model.spec();
        let requests: Vec<(&str, &[u64])> =
            spec.sparse.iter().zip(&self.ids).map(|(s, ids)| (s.name.as_str(), ids.as_slice())).collect();
        let (dense, sparse) = tokio::join!(
            worker.pull_all_dense(&mut self.params.dense),
            worker.pull_sparse_many(&requests, &mut self.pulled)
        );
        dense?;
        sparse?;
        for ((rows, ids), values) in self.params.sparse.iter_mut().zip(&self.ids).zip(&mut self.pulled) {
            rows.ids.clear();
            rows.ids.extend_from_slice(ids);
            std::mem::swap(&mut rows.values, values);
        }
        Ok(())
    }
}

/// Adds the time since `since` to `into` when dropped.
struct PhaseTimer<'a> {
    since: Instant,
    into: &'a mut f64,
}

impl Drop for PhaseTimer<'_> {
    fn drop(&mut self) {
        *self.into += self.since.elapsed().as_secs_f64();
    }
}

/// Runs compute on rayon's pool without stalling the async runtime.
fn compute<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    tokio::task::block_in_place(|| rayon::scope(|_| f()))
}

/// Reads a batch: here, on the runtime's thread. Parsing one batch takes a fraction of a
/// millisecond and uses one thread, less than handing it to another thread costs; the
/// runtime's other thread keeps the heartbeats going meanwhile. The training loop reads each
/// batch while the step before it waits for the servers ([`NextBatch`]).
fn read_batch(reader: &mut Reader, batch: &mut Batch, rows: usize) -> Result<usize, TrainError> {
    Ok(reader.next_batch(batch, rows)?)
}

/// One batch read, and what the reader said of it then (the reader moves on when the batch
/// after it is read ahead).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Read {
    /// Examples in the batch; 0: the reader is done.
    n: usize,
    /// The batch's epoch, 0-based ([`Reader::epoch`]).
    epoch: u64,
    /// Whether the batch is the last of its epoch ([`Reader::end_of_epoch`]).
    end_of_epoch: bool,
    /// Malformed lines skipped up to and with this batch ([`Reader::skipped`]), and how many
    /// of them the reader named ([`Reader::skipped_lines`]).
    skipped: u64,
    noted: usize,
}

impl Read {
    /// Where `reader` stands now, its last batch holding `n` examples.
    fn of(reader: &Reader, n: usize) -> Read {
        Read {
            n,
            epoch: reader.epoch(),
            end_of_epoch: reader.end_of_epoch(),
            skipped: reader.skipped(),
            noted: reader.skipped_lines().len(),
        }
    }
}

/// Reads the next batch of `reader` into `batch`, scaled; adds the time it took to `data`.
fn read_scaled(
    reader: &mut Reader,
    batch: &mut Batch,
    rows: usize,
    scaler: Option<&Standardizer>,
    data: &mut f64,
) -> Result<Read, TrainError> {
    let started = Instant::now();
    let n = read_batch(reader, batch, rows)?;
    if let (Some(s), true) = (scaler, n > 0) {
        s.apply(batch);
    }
    *data += started.elapsed().as_secs_f64();
    Ok(Read::of(reader, n))
}

/// The batch after the one in training, read while that one's step waits for the servers
/// ([`Session::train_batch`]), so that parsing it is off a step's critical path.
///
/// Nothing of a batch read ahead counts until it is taken ([`NextBatch::next`]) in the order
/// the batches come: an error reading it is returned there, where reading it would have
/// failed before; a batch read ahead and never taken (training ended first) is dropped.
struct NextBatch {
    batch: Batch,
    /// The read into `batch`, if one was made and not taken yet.
    read: Option<Result<Read, TrainError>>,
}

impl NextBatch {
    fn new(num_dense: usize) -> NextBatch {
        NextBatch { batch: Batch::new(num_dense), read: None }
    }

    /// Reads the next batch of `reader` ahead, unless one is waiting already (a batch being
    /// trained again has its successor read).
    fn fill(&mut self, reader: &mut Reader, rows: usize, scaler: Option<&Standardizer>, data: &mut f64) {
        if self.read.is_none() {
            self.read = Some(read_scaled(reader, &mut self.batch, rows, scaler, data));
        }
    }

    /// The next batch of `reader`, into `batch`: the one read ahead if there is one (the
    /// buffers are swapped), else read now.
    fn next(
        &mut self,
        reader: &mut Reader,
        batch: &mut Batch,
        rows: usize,
        scaler: Option<&Standardizer>,
        data: &mut f64,
    ) -> Result<Read, TrainError> {
        match self.read.take() {
            Some(read) => {
                std::mem::swap(batch, &mut self.batch);
                read
            }
            None => read_scaled(reader, batch, rows, scaler, data),
        }
    }

    /// Drops a batch read ahead: its reader is done with (a task given up).
    fn clear(&mut self) {
        self.read = None;
    }
}

/// Trains worker `index` of `job` against `servers` until its data (or `max_steps`) is done;
/// serves its Prometheus metrics on `metrics_listen` meanwhile, if given (and says where in a
/// `listening` event).
pub async fn run_worker(
    job: &JobConfig,
    index: u32,
    servers: Vec<String>,
    metrics_listen: Option<std::net::SocketAddr>,
) -> Result<WorkerSummary, TrainError> {
    let worker_metrics = metrics::WorkerMetrics::default();
    let stop_metrics = tokio_util::sync::CancellationToken::new();
    let _stop_metrics = stop_metrics.clone().drop_guard();
    if let Some(addr) = metrics_listen {
        match worker_metrics.serve(addr, stop_metrics).await {
            Ok(bound) => {
                Event::Listening { addr: bound.to_string(), metrics: Some(bound.to_string()) }.emit()
            }
            Err(e) => warn!(worker = index, "no /metrics for this worker: cannot listen on {addr}: {e}"),
        }
    }
    let config = job.model().map_err(|e| TrainError::Config(e.to_string()))?;
    let model: Arc<dyn Model> = Arc::from(gradflow_models::build(config)?);
    // Opening the reader checks the data against the model before any server is involved.
    let reader = Reader::open(&job.train_reader(), ShardSpec::new(index as usize, job.workers as usize)?)?;
    if reader.num_dense() != model.num_dense() {
        return Err(TrainError::Config(format!(
            "the training data has {} dense features ({}) but model.num_dense is {}",
            reader.num_dense(),
            gradflow_data::csv::column_list(reader.dense_names()),
            model.num_dense()
        )));
    }
    ensure_examples(job)?;
    let scaler = standardizer(job)?;

    let mut config = WorkerConfig::new(servers, index);
    config.partition_bytes = job.server.partition_bytes;
    config.transport = job.transport.clone();
    config.heartbeat_interval = (job.server.heartbeat_timeout / 5).max(std::time::Duration::from_millis(20));
    config.startup_timeout = job.server.startup_timeout;
    // The job's [tls] section, if any; without one the worker library reads the environment.
    config.tls = job.client_tls();
    if std::env::var_os(ENV_FAULT_ABORT_SCORING).is_some() && attempt() > 0 {
        tokio::time::sleep(job.server.heartbeat_timeout * 3).await;
    }
    let mut worker = Worker::connect(config).await?;
    worker.declare(model.spec().clone()).await?;
    if index == 0 {
        let info = serving_info(job, reader.dense_names(), scaler.as_ref())?;
        worker.declare_serving(&serde_json::to_string(&info).expect("serving info serializes")).await?;
    }
    if job.mode == Mode::Sync {
        // A restarted worker joins the step the servers are on.
        catch_up(&mut worker).await?;
    }
    info!(worker = index, step = worker.current_step(), sharding = ?job.data.sharding, "training");
    let mut session = Session {
        job,
        index,
        buffers: StepBuffers::new(model.as_ref()),
        batch: Batch::new(reader.num_dense()),
        ahead: NextBatch::new(reader.num_dense()),
        model,
        scaler,
        worker,
        summary: WorkerSummary { steps: 0, samples: 0, evals: Vec::new() },
        window: Window::new(),
        recorder: Recorder::open(job, index),
        metrics: worker_metrics,
    };
    match job.data.sharding {
        Sharding::Static => session.train_static(reader).await?,
        Sharding::Dynamic => session.train_dynamic().await?,
    }
    let Session { worker, summary, .. } = session;
    Event::Done { worker: index, step: worker.current_step(), samples: summary.samples }.emit();
    worker.leave().await?;
    Ok(summary)
}

/// Fails unless the job's training data, all of it, holds at least one example.
///
/// Decided from the whole data, not this worker's share: with many workers a small file
/// leaves some of them an empty share, which is no error. Reads until the first example,
/// which in a usable file is at its start.
pub fn ensure_examples(job: &JobConfig) -> Result<(), TrainError> {
    let mut cfg = job.train_reader();
    cfg.shuffle_buffer = 0;
    cfg.epochs = gradflow_data::Epochs::Count(1);
    let mut reader = Reader::open(&cfg, ShardSpec::new(0, 1)?)?;
    let mut batch = Batch::new(reader.num_dense());
    if reader.next_batch(&mut batch, 1)? > 0 {
        return Ok(());
    }
    let files = cfg.files()?;
    let mut named = files.first().map(|f| f.display().to_string()).unwrap_or_default();
    if files.len() > 1 {
        named.push_str(&format!(" and {} more files", files.len() - 1));
    }
    let why = if reader.skipped() == 0 {
        "no data lines (only a header, or empty)".to_string()
    } else {
        format!(
            "every one of its {} data lines is malformed (skipped: skip_malformed is set); {}",
            reader.skipped(),
            first_skipped(&shown(reader.skipped_lines()))
        )
    };
    Err(TrainError::NoExamples { files: named, why })
}

/// "the first: FILE, line N: expected ..., found ...; ..." for skipped lines.
fn first_skipped(lines: &[String]) -> String {
    format!("the first: {}", lines.join("; "))
}

/// Warns that `count` malformed lines were skipped, naming the first few.
fn warn_skipped(worker: u32, count: u64, first: &[String]) {
    if count > 0 {
        warn!(worker, skipped = count, "malformed lines were skipped; {}", first_skipped(first));
    }
}

fn shown(lines: &[gradflow_data::DataError]) -> Vec<String> {
    lines.iter().map(ToString::to_string).collect()
}

/// Moves a sync worker to the step the servers are on: the lowest shard's. A worker killed
/// while pushing may have reached some shards and not others, and the shards it did not
/// reach wait for it at that step; the ones ahead refuse the step as stale and say where to
/// go on.
pub async fn catch_up(worker: &mut Worker) -> Result<(), TrainError> {
    let version = worker.status().await?.iter().map(|s| s.version).min().unwrap_or(0);
    worker.set_step(version);
    Ok(())
}

/// Loss, throughput and the time in each phase of a step since the last progress report.
struct Window {
    loss: f64,
    batches: u64,
    samples: u64,
    start: Instant,
    phases: Phases,
}

impl Window {
    fn new() -> Window {
        Window { loss: 0.0, batches: 0, samples: 0, start: Instant::now(), phases: Phases::default() }
    }
}

/// One worker's training: its connection, model, buffers and counters.
struct Session<'a> {
    job: &'a JobConfig,
    index: u32,
    model: Arc<dyn Model>,
    scaler: Option<Standardizer>,
    worker: Worker,
    buffers: StepBuffers,
    /// The batch in training.
    batch: Batch,
    /// The batch after it, read while its step waits.
    ahead: NextBatch,
    summary: WorkerSummary,
    window: Window,
    recorder: Recorder,
    metrics: metrics::WorkerMetrics,
}

/// What became of one batch.
enum Trained {
    Applied,
    /// Sync: the servers finished the step without this batch; its gradients were discarded.
    Discarded,
    /// Dynamic sharding: the task was handed to another worker; nothing of the batch counted.
    LeaseLost,
}

impl Session<'_> {
    fn max_steps_reached(&self) -> bool {
        self.job.train.max_steps.is_some_and(|m| self.worker.current_step() >= m)
    }

    /// The next batch of `reader` into `self.batch` (scaled; the one read ahead during the
    /// last step, if any); `n` = 0 at the end.
    fn read(&mut self, reader: &mut Reader) -> Result<Read, TrainError> {
        let data = &mut self.window.phases.data;
        self.ahead.next(reader, &mut self.batch, self.job.train.batch_size, self.scaler.as_ref(), data)
    }

    /// Pulls what the batch in `self.batch` needs, computes its gradients and pushes them;
    /// while the step waits for the servers, reads the next batch of `next` ahead (see
    /// [`NextBatch`]), unless one is read already.
    async fn train_batch(&mut self, next: Option<&mut Reader>) -> Result<(Trained, f32), TrainError> {
        let Session { job, model, worker, batch, ahead, scaler, window, buffers, .. } = self;
        let (model, batch, rows) = (model.as_ref(), &*batch, job.train.batch_size);
        let phases = &mut window.phases;
        let started = Instant::now();
        buffers.pull(worker, model, batch).await?;
        let pulled = Instant::now();
        phases.pull += (pulled - started).as_secs_f64();
        let StepBuffers { params, grads, .. } = buffers;
        let loss = compute(|| model.forward_backward(batch, params, grads))?;
        let computed = Instant::now();
        phases.compute += (computed - pulled).as_secs_f64();
        // Pushing, from here to the end of the step, is counted on every way out.
        let _push = PhaseTimer { since: computed, into: &mut phases.push };
        let spec = model.spec();
        for (d, g) in spec.dense.iter().zip(&grads.dense) {
            worker.push_dense(&d.name, g)?;
        }
        for (s, g) in spec.sparse.iter().zip(&grads.sparse) {
            worker.push_sparse(&s.name, &g.ids, &g.values)?;
        }
        let step = worker.step();
        let outcome = match next {
            Some(reader) if ahead.read.is_none() => {
                // The first poll sends the gradients to every shard; the batch is read while
                // the servers answer (with another runtime thread driving the connections).
                let mut step = std::pin::pin!(step);
                let polled = std::future::poll_fn(|cx| Poll::Ready(step.as_mut().poll(cx))).await;
                ahead.fill(reader, rows, scaler.as_ref(), &mut phases.data);
                match polled {
                    Poll::Ready(outcome) => outcome,
                    Poll::Pending => step.await,
                }
            }
            _ => step.await,
        };
        match outcome {
            Ok(StepOutcome::Applied) => Ok((Trained::Applied, loss)),
            Ok(StepOutcome::Stale { .. }) => Ok((Trained::Discarded, loss)),
            Err(e) if e.is_lease_lost() => Ok((Trained::LeaseLost, loss)),
            Err(e) => Err(e.into()),
        }
    }

    /// Counts a trained batch of `n` examples and reports progress every `log_every_steps`:
    /// to the launcher, and as TensorBoard scalars (worker 0 adds every shard's model version).
    async fn count(&mut self, n: usize, loss: f32, epoch: u64) {
        self.summary.steps += 1;
        self.summary.samples += n as u64;
        self.recorder.batch(epoch, loss);
        let w = &mut self.window;
        w.loss += loss as f64;
        w.batches += 1;
        w.samples += n as u64;
        if self.summary.steps % self.job.train.log_every_steps == 0 {
            let secs = w.start.elapsed().as_secs_f64().max(1e-9);
            let step = self.worker.current_step();
            let (loss, samples_per_sec) = (w.loss / w.batches as f64, w.samples as f64 / secs);
            Event::Progress {
                worker: self.index,
                step,
                epoch,
                samples: self.summary.samples,
                loss,
                samples_per_sec,
            }
            .emit();
            self.recorder.progress(step, loss, samples_per_sec, w.phases.per_step(w.batches));
            self.metrics.observe(&metrics::Window {
                steps: w.batches,
                samples: w.samples,
                phases: w.phases,
                samples_per_second: samples_per_sec,
                loss,
                step,
                epoch,
            });
            self.window = Window::new();
            if self.index == 0 {
                // Scalars only: a shard that does not answer now will be asked again.
                match self.worker.status().await {
                    Ok(shards) => {
                        let versions: Vec<u64> = shards.iter().map(|s| s.version).collect();
                        self.recorder.shard_versions(step, &versions);
                    }
                    Err(e) => debug!(worker = self.index, "no shard versions for TensorBoard: {e}"),
                }
            }
        }
    }

    /// Scores the model on the test data after `epoch` (0-based) and records the result,
    /// with `trained`, the examples the epoch put in the model, when known. An epoch this run
    /// already recorded (its scorer stopped after writing the line) is not scored again.
    async fn evaluate_epoch(
        &mut self,
        epoch: u64,
        trained: Option<u64>,
    ) -> Result<Option<Scores>, TrainError> {
        let Some(test) = self.job.test_reader() else { return Ok(None) };
        if let Some(line) = recorded_result(self.job, epoch + 1)? {
            info!(
                worker = self.index,
                epoch = epoch + 1,
                "this epoch's score is in the results already: {line}"
            );
            return Ok(recorded_scores(&line));
        }
        let e = evaluate(
            &self.worker,
            self.model.as_ref(),
            &test,
            self.scaler.as_ref(),
            self.job.train.batch_size,
        )
        .await?;
        let step = self.worker.current_step();
        let train_loss = self.recorder.epoch_loss(epoch);
        self.recorder.eval(step, &e, train_loss);
        let event = Event::Eval {
            worker: self.index,
            epoch: epoch + 1,
            step,
            test_loss: e.loss,
            test_auc: e.auc,
            test_accuracy: e.accuracy,
            test_examples: e.examples,
        };
        fault_abort_scoring(epoch + 1, false);
        event.emit();
        append_result(self.job, &event, trained, train_loss)?;
        fault_abort_scoring(epoch + 1, true);
        self.summary.evals.push(event);
        Ok(Some(e))
    }

    /// Static sharding, the scorer: scores epoch `epoch`, whose last batch was step `step`,
    /// and tells the servers; its next push ends the hold on the step after it. With
    /// `keep_best` or `early_stop_patience` the servers get the score by the selection metric
    /// (and checkpoint the model scored, for `keep_best`); after `early_stop_patience`
    /// evaluations without a better one, training ends here: returns true.
    async fn score_epoch(&mut self, epoch: u64, step: u64) -> Result<bool, TrainError> {
        let scores = self.evaluate_epoch(epoch, None).await?;
        let keep_best = self.job.checkpoint.as_ref().is_some_and(|c| c.keep_best.is_some());
        let patience = self.job.train.early_stop_patience;
        let Some(scores) = scores.filter(|_| keep_best || patience.is_some()) else {
            self.worker.scored(epoch, step).await?;
            return Ok(false);
        };
        let metric = self.job.selection_metric();
        let value = match metric {
            Metric::TestAuc => scores.auc,
            Metric::TestLoss => scores.loss,
            Metric::TestAccuracy => scores.accuracy,
        };
        let since_best = self.worker.scored_with(epoch, step, Selection { metric, value, keep_best }).await?;
        let Some(patience) = patience.filter(|p| since_best >= *p) else { return Ok(false) };
        info!(
            worker = self.index,
            epoch = epoch + 1,
            step = step + 1,
            "early stopping: {since_best} evaluations in a row without a better {metric} (early_stop_patience = {patience}); training ends with this model"
        );
        self.worker.stop_training(epoch, step).await?;
        Ok(true)
    }

    /// Static sharding, a restarted scorer: scores the epochs that ended in the batches it
    /// skipped (`ends`: epoch and the step of its last batch) and were not scored. In sync
    /// mode the servers held the step after an epoch's end until its score came, so an
    /// unscored epoch ended right where the job is now, and the model is that epoch's end
    /// model. In async mode the model never stops: a late score is of the model now.
    async fn score_missed(&mut self, ends: &[(u64, u64)], resumed_at: u64) -> Result<bool, TrainError> {
        let Some(shard0) = self.worker.status().await?.into_iter().next() else { return Ok(false) };
        for &(epoch, step) in ends {
            let scored = match shard0.scored_epochs {
                Some(n) => epoch < n,
                // Restored from a checkpoint that did not record it: what ended before the
                // restored step was scored then.
                None => step + 1 < resumed_at,
            };
            if scored {
                continue;
            }
            if step + 1 != resumed_at {
                if self.job.mode == Mode::Sync {
                    return Err(TrainError::ScoreLost { epoch: epoch + 1, ended_at: step + 1, resumed_at });
                }
                warn!(
                    worker = self.index,
                    epoch = epoch + 1,
                    ended_at = step + 1,
                    resumed_at,
                    "scoring an epoch late: it ended before this worker restarted, and in async mode the model has moved on since"
                );
            } else {
                info!(
                    worker = self.index,
                    epoch = epoch + 1,
                    step = resumed_at,
                    "scoring the epoch that ended where this worker resumes"
                );
            }
            if self.score_epoch(epoch, step).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Static sharding: this worker's fixed byte range of every file, epoch after epoch;
    /// worker 0 scores the model at the end of each of its epochs.
    async fn train_static(&mut self, mut reader: Reader) -> Result<(), TrainError> {
        let scorer = self.index == 0 && self.job.test_reader().is_some();
        let first_step = self.worker.current_step();
        if first_step > 0 {
            // Joining a job at step k (a restart, or a job restored from a checkpoint): the
            // first k batches of this worker's data went into the model already. The data
            // order is a function of the seed, so skipping them resumes exactly where the job
            // was.
            let mut ends = Vec::new();
            for step in 0..first_step {
                if read_batch(&mut reader, &mut self.batch, self.job.train.batch_size)? == 0 {
                    break;
                }
                if reader.end_of_epoch() {
                    ends.push((reader.epoch(), step));
                }
            }
            info!(worker = self.index, batches = first_step, "skipped the batches trained before this step");
            if scorer && self.score_missed(&ends, first_step).await? {
                return Ok(());
            }
        }
        // The skipped lines of the batches taken: a batch read ahead and never trained is not
        // counted.
        let mut taken = Read::of(&reader, 0);
        while !self.max_steps_reached() {
            let read = self.read(&mut reader)?;
            taken = read;
            let (n, epoch) = (read.n, read.epoch);
            if n == 0 {
                break;
            }
            let step = self.worker.current_step();
            let ends_epoch = scorer && read.end_of_epoch;
            if ends_epoch {
                self.worker.hold_for_scoring(epoch, step).await?;
            }
            let (outcome, loss) = match self.train_batch(Some(&mut reader)).await {
                Ok(trained) => trained,
                Err(e) => match finished_at(&e) {
                    Some(at) => {
                        info!(worker = self.index, step = at, "training ended early (early stopping)");
                        break;
                    }
                    None => return Err(e),
                },
            };
            if let Trained::Discarded = outcome {
                warn!(
                    worker = self.index,
                    resumed_at = self.worker.current_step(),
                    "this batch's gradients were discarded: the servers had moved on"
                );
            }
            self.count(n, loss, epoch).await;
            if ends_epoch && self.score_epoch(epoch, step).await? {
                break;
            }
        }
        warn_skipped(self.index, taken.skipped, &shown(&reader.skipped_lines()[..taken.noted]));
        Ok(())
    }

    /// Dynamic sharding: tasks from shard 0 until every epoch is done. A batch whose
    /// gradients the servers discarded is trained again, so every example of an epoch is in
    /// the model exactly once; the worker that finishes an epoch's last task scores the model.
    async fn train_dynamic(&mut self) -> Result<(), TrainError> {
        let pieces = task_pieces(self.job)?;
        let created = self.worker.declare_tasks(&pieces, self.job.train.epochs, self.job.train.seed).await?;
        info!(worker = self.index, tasks = pieces.len(), created, "data tasks declared");
        let (mut done, mut paused, mut skipped, mut scored) = (0u64, false, 0u64, None);
        let mut noted = Vec::new();
        let mut idle_wait = Duration::from_millis(10);
        while !self.max_steps_reached() {
            let next = self.worker.next_task(std::mem::take(&mut done), scored.take()).await?;
            if let Some((epoch, examples)) = next.completed_epoch {
                info!(worker = self.index, epoch, examples, "epoch done; scoring the model");
                self.evaluate_epoch(epoch, Some(examples)).await?;
                scored = Some(epoch);
            }
            let task = match next.handout {
                TaskHandout::Finished => break,
                TaskHandout::Wait => {
                    if !paused {
                        self.worker.pause().await?;
                        paused = true;
                    }
                    tokio::time::sleep(idle_wait).await;
                    idle_wait = (idle_wait * 2).min(Duration::from_millis(200));
                    continue;
                }
                TaskHandout::Task(task) => task,
            };
            idle_wait = Duration::from_millis(10);
            if paused && self.job.mode == Mode::Sync {
                catch_up(&mut self.worker).await?;
            }
            paused = false;
            let mut reader = self.task_reader(&task)?;
            let mut examples = task.skip_examples;
            if examples > 0 {
                skip_examples(&mut reader, &mut self.batch, examples)?;
                info!(
                    worker = self.index,
                    lease = task.lease,
                    examples,
                    "resuming a task another attempt started"
                );
            }
            let mut taken = Read::of(&reader, 0);
            let finished = loop {
                if self.max_steps_reached() {
                    break false;
                }
                taken = self.read(&mut reader)?;
                let n = taken.n;
                if n == 0 {
                    break true;
                }
                let outcome = loop {
                    self.worker.set_task_progress(task.lease, examples + n as u64);
                    match self.train_batch(Some(&mut reader)).await? {
                        (Trained::Discarded, _) => {
                            debug!(worker = self.index, "batch discarded by the servers; training it again");
                        }
                        (outcome, loss) => break (outcome, loss),
                    }
                };
                match outcome {
                    (Trained::Applied, loss) => {
                        examples += n as u64;
                        self.count(n, loss, task.epoch).await;
                    }
                    _ => {
                        warn!(
                            worker = self.index,
                            lease = task.lease,
                            "this worker's task was handed to another worker while it was unreachable; asking for a new one"
                        );
                        if self.job.mode == Mode::Sync {
                            catch_up(&mut self.worker).await?;
                        }
                        break false;
                    }
                }
            };
            // A batch read ahead of this task's reader goes with it.
            self.ahead.clear();
            skipped += taken.skipped;
            let room = gradflow_data::SKIPPED_LINES_KEPT.saturating_sub(noted.len());
            noted.extend(reader.skipped_lines()[..taken.noted].iter().take(room).map(|e| e.to_string()));
            if finished {
                done = task.lease;
            }
        }
        warn_skipped(self.index, skipped, &noted);
        Ok(())
    }

    fn task_reader(&self, task: &DataTask) -> Result<Reader, TrainError> {
        task_reader(self.job, task)
    }
}

/// The reader of one task: its piece, in an example order drawn from the job's seed, the
/// epoch and the piece, so that any worker reading it again sees the same order.
pub fn task_reader(job: &JobConfig, task: &DataTask) -> Result<Reader, TrainError> {
    let mut cfg = job.train_reader();
    cfg.epochs = gradflow_data::Epochs::Count(1);
    let mut rng = gradflow_data::SplitMix64::new(
        job.train.seed ^ task.epoch.rotate_left(32) ^ u64::from(task.piece_index).wrapping_mul(0x9E37_79B9),
    );
    cfg.seed = rng.next_u64();
    let piece = FilePiece { path: PathBuf::from(&task.piece.path), range: task.piece.start..task.piece.end };
    Ok(Reader::from_pieces(&cfg, vec![piece])?)
}

/// Reads and drops `count` examples.
pub fn skip_examples(reader: &mut Reader, batch: &mut Batch, mut count: u64) -> Result<(), TrainError> {
    while count > 0 {
        let n = compute(|| reader.next_batch(batch, count.min(4096) as usize))?;
        if n == 0 {
            break;
        }
        count -= n as u64;
    }
    Ok(())
}

/// The job's data tasks: every training file cut into pieces of about `data.task_bytes`
/// (see [`gradflow_data::task_pieces`]: a file that cannot be cut is one task, a Parquet row
/// group is one task).
pub fn task_pieces(job: &JobConfig) -> Result<Vec<TaskPiece>, TrainError> {
    let reader = job.train_reader();
    let files = reader.files()?;
    let pieces = gradflow_data::task_pieces(&files, job.data.task_bytes, &reader.stores(), reader.format)?;
    Ok(pieces
        .into_iter()
        .map(|p| TaskPiece { path: p.path.display().to_string(), start: p.range.start, end: p.range.end })
        .collect())
}

/// Scores on a test set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    pub loss: f64,
    pub auc: f64,
    pub accuracy: f64,
    pub examples: u64,
}

/// Scores the model the servers hold now on the data `test` describes.
pub async fn evaluate(
    worker: &Worker,
    model: &dyn Model,
    test: &ReaderConfig,
    scaler: Option<&Standardizer>,
    batch_size: usize,
) -> Result<Scores, TrainError> {
    let mut reader = Reader::open(test, ShardSpec::new(0, 1)?)?;
    let mut batch = Batch::new(reader.num_dense());
    let mut buffers = StepBuffers::new(model);
    let (mut labels, mut probs, mut out) = (Vec::new(), Vec::new(), Vec::new());
    loop {
        let n = reader.next_batch(&mut batch, batch_size.max(1024))?;
        if n == 0 {
            break;
        }
        if let Some(s) = scaler {
            s.apply(&mut batch);
        }
        buffers.pull(worker, model, &batch).await?;
        compute(|| model.predict(&batch, &buffers.params, &mut out))?;
        labels.extend_from_slice(&batch.labels);
        probs.extend_from_slice(&out);
    }
    if labels.is_empty() {
        return Err(TrainError::Config("the test data has no examples".into()));
    }
    Ok(Scores {
        loss: scoring::log_loss(&labels, &probs),
        auc: scoring::auc(&labels, &probs),
        accuracy: scoring::accuracy(&labels, &probs),
        examples: labels.len() as u64,
    })
}

/// The results line of this run (the launcher's run id) for `epoch` (1-based), if one was
/// written; never one without a run id to tell runs apart.
pub fn recorded_result(job: &JobConfig, epoch: u64) -> Result<Option<String>, TrainError> {
    let Some(run) = std::env::var(ENV_RUN_ID).ok().filter(|r| !r.is_empty()) else { return Ok(None) };
    let path = job.output_dir().join(&job.output.results);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(cause) => return Err(TrainError::Results { path, cause }),
    };
    Ok(text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
                v["event"] == "eval"
                    && v["run_id"] == run.as_str()
                    && v["job"] == job.name.as_str()
                    && v["epoch"] == epoch
            })
        })
        .last()
        .map(str::to_string))
}

/// The version training ended with, when `e` says that the servers ended it early (early
/// stopping): the end of this worker's training, not a failure.
fn finished_at(e: &TrainError) -> Option<u64> {
    match e {
        TrainError::Worker(e) => e.finished_at(),
        _ => None,
    }
}

/// The scores a results line holds.
fn recorded_scores(line: &str) -> Option<Scores> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    Some(Scores {
        loss: v["test_loss"].as_f64()?,
        auc: v["test_auc"].as_f64()?,
        accuracy: v["test_accuracy"].as_f64()?,
        examples: v["test_examples"].as_u64()?,
    })
}

/// This process's start: 0 for the first, +1 per restart (`GRADFLOW_ATTEMPT`).
fn attempt() -> u64 {
    std::env::var(ENV_ATTEMPT).ok().and_then(|a| a.trim().parse().ok()).unwrap_or(0)
}

/// See [`ENV_FAULT_ABORT_SCORING`].
fn fault_abort_scoring(epoch: u64, written: bool) {
    let Ok(value) = std::env::var(ENV_FAULT_ABORT_SCORING) else { return };
    let (epochs, after_line) = match value.strip_suffix(":written") {
        Some(e) => (e, true),
        None => (value.as_str(), false),
    };
    let listed = epochs.trim() == "all" || epochs.split(',').any(|e| e.trim().parse() == Ok(epoch));
    if listed && after_line == written && epoch == attempt() + 1 {
        tracing::error!(epoch, "{ENV_FAULT_ABORT_SCORING}: aborting while scoring this epoch");
        std::process::abort();
    }
}

/// Appends an evaluation to the job's results file as one JSON line, with the examples the
/// epoch trained when known (dynamic sharding), the mean loss of the scoring worker's
/// training batches in the epoch (`train_loss`), the run id when the launcher gave one
/// (`run_id`), and when it was written (`time`, RFC 3339 UTC).
pub fn append_result(
    job: &JobConfig,
    event: &Event,
    trained: Option<u64>,
    train_loss: Option<f64>,
) -> Result<(), TrainError> {
    let path = job.output_dir().join(&job.output.results);
    let err = |cause| TrainError::Results { path: path.clone(), cause };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut line = serde_json::to_value(event).expect("events serialize");
    line["job"] = job.name.clone().into();
    line["mode"] = job.mode.to_string().into();
    line["workers"] = job.workers.into();
    line["servers"] = job.servers.into();
    if let Some(n) = trained {
        line["epoch_train_examples"] = n.into();
    }
    if let Some(loss) = train_loss.filter(|l| l.is_finite()) {
        line["train_loss"] = loss.into();
    }
    if let Some(run) = std::env::var(ENV_RUN_ID).ok().filter(|r| !r.is_empty()) {
        line["run_id"] = run.into();
    }
    line["time"] = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true).into();
    // One write of the whole line: formatting straight into the file writes it in pieces, and
    // a scorer killed between two of them left a line that the next one's text continued.
    let mut text = line.to_string();
    text.push('\n');
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `e` and its sources as `{:#}` prints them.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut out = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            out.push_str(&format!(": {s}"));
            source = s.source();
        }
        out
    }

    #[test]
    fn every_message_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such thing");
        let errors = [
            TrainError::from(gradflow_data::DataError::io("train.csv", io)),
            TrainError::from(gradflow_data::DataError::Config("directory d holds no data files".into())),
            TrainError::from(gradflow_models::ModelError::InvalidConfig("hidden is empty".into())),
            TrainError::Results { path: "r.jsonl".into(), cause: std::io::Error::other("disk full") },
        ];
        for (e, said) in
            errors.iter().zip(["no such thing", "holds no data files", "hidden is empty", "disk full"])
        {
            let text = chain(e);
            assert_eq!(text.matches(said).count(), 1, "{text}");
        }
    }

    /// A CSV file of `rows` (label, dense a, dense b) in a fresh folder; `bad` lines (0-based
    /// data line numbers) have a dense value that does not parse.
    fn csv_file(name: &str, rows: usize, bad: &[usize]) -> (PathBuf, ReaderConfig) {
        let dir = std::env::temp_dir().join(format!("gradflow-trainer-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("train.csv");
        let mut text = String::from("label,a,b\n");
        for i in 0..rows {
            let a = if bad.contains(&i) { "oops".to_string() } else { i.to_string() };
            text.push_str(&format!("{},{a},{}\n", i % 2, i * 10));
        }
        std::fs::write(&path, text).unwrap();
        let cfg = ReaderConfig::new(gradflow_data::Format::Csv, vec![path]);
        (dir, cfg)
    }

    /// Every batch of `reader` read in turn, with what the reader said of it, up to and with
    /// the first error or the end.
    fn in_turn(reader: &mut Reader, rows: usize) -> Vec<Result<(Read, Batch), String>> {
        let mut out = Vec::new();
        let mut batch = Batch::new(reader.num_dense());
        while record(&mut out, read_scaled(reader, &mut batch, rows, None, &mut 0.0), &batch) {}
        out
    }

    /// Adds a read to `out`; whether reading goes on (not at the end, nor after an error).
    fn record(
        out: &mut Vec<Result<(Read, Batch), String>>,
        read: Result<Read, TrainError>,
        batch: &Batch,
    ) -> bool {
        let more = matches!(read, Ok(read) if read.n > 0);
        out.push(read.map(|read| (read, batch.clone())).map_err(|e| e.to_string()));
        more
    }

    /// The same as the training loop takes them: each batch's successor read ahead while it
    /// "trains", read twice at some steps (a batch trained again), not at all at others.
    fn read_ahead(reader: &mut Reader, rows: usize) -> Vec<Result<(Read, Batch), String>> {
        let mut out = Vec::new();
        let mut batch = Batch::new(reader.num_dense());
        let mut ahead = NextBatch::new(reader.num_dense());
        let mut data = 0.0;
        for step in 0.. {
            if !record(&mut out, ahead.next(reader, &mut batch, rows, None, &mut data), &batch) {
                return out;
            }
            // "Training" overwrites nothing of the batch read ahead.
            if step % 5 != 3 {
                ahead.fill(reader, rows, None, &mut data);
            }
            if step % 3 == 1 {
                ahead.fill(reader, rows, None, &mut data);
            }
        }
        unreachable!()
    }

    #[test]
    fn reading_ahead_takes_the_batches_epoch_ends_and_skipped_lines_of_reading_in_turn() {
        let (dir, mut cfg) = csv_file("order", 23, &[4, 17]);
        cfg.skip_malformed = true;
        cfg.shuffle_buffer = 5;
        cfg.seed = 7;
        cfg.epochs = gradflow_data::Epochs::Count(3);
        let open = || Reader::open(&cfg, ShardSpec::new(0, 1).unwrap()).unwrap();
        let expected = in_turn(&mut open(), 4);
        let got = read_ahead(&mut open(), 4);
        std::fs::remove_dir_all(dir).unwrap();
        assert_eq!(got, expected);
        // 21 good rows an epoch: 5 batches of 4 and one of 1 that ends the epoch, 3 epochs.
        let reads: Vec<Read> = expected.iter().map(|r| r.as_ref().unwrap().0).collect();
        assert_eq!(reads.len(), 3 * 6 + 1);
        let ends: Vec<(usize, u64)> =
            reads.iter().enumerate().filter(|(_, r)| r.end_of_epoch).map(|(i, r)| (i, r.epoch)).collect();
        assert_eq!(ends, [(5, 0), (11, 1), (17, 2)]);
        assert_eq!(reads[5].n, 1);
        assert_eq!(reads.last().unwrap().skipped, 6, "two bad lines in each of 3 epochs");
        assert!(reads.iter().any(|r| r.skipped > 0 && r.skipped < 6), "counted as the batches come");
    }

    #[test]
    fn an_error_reading_ahead_is_returned_when_its_batch_is_taken_and_not_before() {
        let (dir, mut cfg) = csv_file("error", 9, &[5]);
        cfg.epochs = gradflow_data::Epochs::Count(1);
        let open = || Reader::open(&cfg, ShardSpec::new(0, 1).unwrap()).unwrap();
        let expected = in_turn(&mut open(), 2);
        let got = read_ahead(&mut open(), 2);
        // Taken one by one: the error comes third, where reading in turn fails.
        let mut reader = open();
        let mut batch = Batch::new(reader.num_dense());
        let mut ahead = NextBatch::new(reader.num_dense());
        let mut data = 0.0;
        let mut take = |reader: &mut Reader, batch: &mut Batch, ahead: &mut NextBatch| {
            let read = ahead.next(reader, batch, 2, None, &mut data).map_err(|e| e.to_string());
            ahead.fill(reader, 2, None, &mut data);
            read.map(|r| r.n)
        };
        let taken: Vec<_> = (0..3).map(|_| take(&mut reader, &mut batch, &mut ahead)).collect();
        std::fs::remove_dir_all(dir).unwrap();
        assert_eq!(expected.len(), 3, "{expected:?}");
        let message = expected[2].as_ref().unwrap_err();
        assert!(message.contains("line 7"), "{message}");
        assert_eq!(got, expected);
        assert_eq!(taken, [Ok(2), Ok(2), Err(message.clone())]);
    }

    #[test]
    fn errors_of_the_data_and_the_config_repeat_and_network_ones_may_not() {
        let data = TrainError::from(gradflow_data::DataError::Config("x".into()));
        let missing = TrainError::from(gradflow_data::DataError::io(
            "t.csv",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
        let flaky = TrainError::from(gradflow_data::DataError::io(
            "t.csv",
            std::io::Error::from(std::io::ErrorKind::TimedOut),
        ));
        let gone = TrainError::Worker(gradflow_worker::WorkerError::Unreachable {
            shard: 0,
            addr: "a:1".into(),
            message: "refused".into(),
        });
        assert!(data.will_repeat() && missing.will_repeat());
        assert!(TrainError::Config("num_dense".into()).will_repeat());
        assert!(!flaky.will_repeat() && !gone.will_repeat());
    }
}
