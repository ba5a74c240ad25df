//! gradflow's built-in training loop: what `gradflow worker` runs.
//!
//! A worker reads its shard of the training data, and for every batch pulls the parameters
//! the batch needs from the servers, computes the loss and gradients with a built-in model
//! (gradflow-models), and pushes the gradients. At the end of every epoch worker 0 scores the
//! model on the test data and reports the result.
//!
//! - [`run_worker`]: the loop.
//! - [`evaluate`]: test loss, AUC and accuracy of the model the servers hold.
//! - [`standardizer`]: dense-feature scaling measured the same way on every worker.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use gradflow_core::Mode;
use gradflow_data::{Batch, Reader, ReaderConfig, ShardSpec, Standardizer, metrics};
use gradflow_launch::{Event, JobConfig};
use gradflow_models::{Grads, Model, Params, SparseRows};
use gradflow_worker::{StepOutcome, Worker, WorkerConfig};
use thiserror::Error;
use tracing::{info, warn};

/// Why training stopped.
#[derive(Debug, Error)]
pub enum TrainError {
    #[error("data: {0}")]
    Data(#[from] gradflow_data::DataError),
    #[error("model: {0}")]
    Model(#[from] gradflow_models::ModelError),
    #[error(transparent)]
    Worker(#[from] gradflow_worker::WorkerError),
    #[error("{0}")]
    Config(String),
    #[error("results file {path}: {source}")]
    Results { path: PathBuf, source: std::io::Error },
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

/// Runs compute on rayon's pool without stalling the async runtime.
fn compute<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    tokio::task::block_in_place(|| rayon::scope(|_| f()))
}

/// Trains worker `index` of `job` against `servers` until its data (or `max_steps`) is done.
pub async fn run_worker(
    job: &JobConfig,
    index: u32,
    servers: Vec<String>,
) -> Result<WorkerSummary, TrainError> {
    let config = job.model().map_err(|e| TrainError::Config(e.to_string()))?;
    let model: Arc<dyn Model> = Arc::from(gradflow_models::build(config)?);
    let shard = ShardSpec::new(index as usize, job.workers as usize)?;
    let mut reader = Reader::open(&job.train_reader(), shard)?;
    if reader.num_dense() != model.num_dense() {
        return Err(TrainError::Config(format!(
            "the training data has {} dense features ({:?}) but model.num_dense is {}",
            reader.num_dense(),
            reader.dense_names(),
            model.num_dense()
        )));
    }
    let scaler = standardizer(job)?;

    let mut config = WorkerConfig::new(servers, index);
    config.partition_bytes = job.server.partition_bytes;
    config.transport = job.transport.clone();
    config.heartbeat_interval = (job.server.heartbeat_timeout / 5).max(std::time::Duration::from_millis(20));
    config.startup_timeout = job.server.startup_timeout;
    let mut worker = Worker::connect(config).await?;
    worker.declare(model.spec().clone()).await?;
    if job.mode == Mode::Sync {
        // A restarted worker joins the step the servers are on.
        let version = worker.status().await?.iter().map(|s| s.version).max().unwrap_or(0);
        worker.set_step(version);
    }
    let first_step = worker.current_step();
    info!(worker = index, step = first_step, "training");

    let mut buffers = StepBuffers::new(model.as_ref());
    let mut batch = Batch::new(reader.num_dense());
    if first_step > 0 {
        // Joining a job at step k (a restart, or a job restored from a checkpoint): the first
        // k batches of this worker's data went into the model already. The data order is a
        // function of the seed, so skipping them resumes exactly where the job was.
        for _ in 0..first_step {
            if compute(|| reader.next_batch(&mut batch, job.train.batch_size))? == 0 {
                break;
            }
        }
        info!(worker = index, batches = first_step, "skipped the batches trained before this step");
    }
    let mut summary = WorkerSummary { steps: 0, samples: 0, evals: Vec::new() };
    let (mut window_loss, mut window_batches, mut window_samples) = (0f64, 0u64, 0u64);
    let mut window_start = Instant::now();
    let spec = model.spec().clone();
    loop {
        if job.train.max_steps.is_some_and(|m| worker.current_step() >= m) {
            break;
        }
        let n = compute(|| reader.next_batch(&mut batch, job.train.batch_size))?;
        if n == 0 {
            break;
        }
        if let Some(s) = &scaler {
            s.apply(&mut batch);
        }
        buffers.pull(&worker, model.as_ref(), &batch).await?;
        let StepBuffers { params, grads, .. } = &mut buffers;
        let loss = compute(|| model.forward_backward(&batch, params, grads))?;
        for (d, g) in spec.dense.iter().zip(&grads.dense) {
            worker.push_dense(&d.name, g)?;
        }
        for (s, g) in spec.sparse.iter().zip(&grads.sparse) {
            worker.push_sparse(&s.name, &g.ids, &g.values)?;
        }
        if let StepOutcome::Stale { resumed_at } = worker.step().await? {
            warn!(
                worker = index,
                resumed_at, "this batch's gradients were discarded: the servers had moved on"
            );
        }
        summary.steps += 1;
        summary.samples += n as u64;
        window_loss += loss as f64;
        window_batches += 1;
        window_samples += n as u64;
        if summary.steps % job.train.log_every_steps == 0 {
            let secs = window_start.elapsed().as_secs_f64().max(1e-9);
            Event::Progress {
                worker: index,
                step: worker.current_step(),
                epoch: reader.epoch(),
                samples: summary.samples,
                loss: window_loss / window_batches as f64,
                samples_per_sec: window_samples as f64 / secs,
            }
            .emit();
            (window_loss, window_batches, window_samples) = (0.0, 0, 0);
            window_start = Instant::now();
        }
        if reader.end_of_epoch() && index == 0 {
            if let Some(test) = job.test_reader() {
                let e =
                    evaluate(&worker, model.as_ref(), &test, scaler.as_ref(), job.train.batch_size).await?;
                let event = Event::Eval {
                    worker: index,
                    epoch: reader.epoch() + 1,
                    step: worker.current_step(),
                    test_loss: e.loss,
                    test_auc: e.auc,
                    test_accuracy: e.accuracy,
                    test_examples: e.examples,
                };
                event.emit();
                append_result(job, &event)?;
                summary.evals.push(event);
            }
        }
    }
    if reader.skipped() > 0 {
        warn!(worker = index, skipped = reader.skipped(), "malformed lines were skipped");
    }
    Event::Done { worker: index, step: worker.current_step(), samples: summary.samples }.emit();
    worker.leave().await?;
    Ok(summary)
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
        loss: metrics::log_loss(&labels, &probs),
        auc: metrics::auc(&labels, &probs),
        accuracy: metrics::accuracy(&labels, &probs),
        examples: labels.len() as u64,
    })
}

/// Appends an evaluation to the job's results file as one JSON line.
fn append_result(job: &JobConfig, event: &Event) -> Result<(), TrainError> {
    let path = job.output_dir().join(&job.output.results);
    let err = |source| TrainError::Results { path: path.clone(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut line = serde_json::to_value(event).expect("events serialize");
    line["job"] = job.name.clone().into();
    line["mode"] = job.mode.to_string().into();
    line["workers"] = job.workers.into();
    line["servers"] = job.servers.into();
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(err)?;
    writeln!(f, "{line}").map_err(err)?;
    Ok(())
}
