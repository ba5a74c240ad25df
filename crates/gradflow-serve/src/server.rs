//! [`Server`]: the serving core, with no transport in it. It holds the current model, batches
//! concurrent requests, follows a checkpoint root's `latest` and swaps in newer checkpoints,
//! and keeps the metrics. The HTTP adapter ([`crate::http`]) decodes a request and calls
//! [`Server::predict`].
//!
//! **Batching.** Requests go into one bounded queue. The batcher takes the first waiting
//! request and every other request already queued (up to [`ServeConfig::max_batch_rows`]
//! rows), runs one forward pass over all of them on a blocking thread, and answers each with
//! its own rows' probabilities. It never waits for more requests to come: an idle server
//! answers a lone request at once, and a busy one makes bigger batches.
//!
//! **Swapping models.** A request's rows are decoded against the model current when it
//! arrives and predicted by that same model, which it holds (an `Arc`) until answered; a
//! swap only changes which model the next requests get. So a reload drops no request. A
//! checkpoint that fails to load (missing files, a checksum mismatch, serving info this build
//! cannot use) is refused, logged and counted, and the previous model keeps serving.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use gradflow_checkpoint::CheckpointStore;
use gradflow_data::Batch;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::{LoadedModel, RowDecoder, ServeError};

/// How a [`Server`] runs. The defaults are `gradflow serve`'s.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeConfig {
    /// The checkpoint root (or one checkpoint's URL).
    pub url: String,
    /// Which checkpoint: `latest` or `best` (followed: newer complete checkpoints they point
    /// at are swapped in), a step, or a directory name (served as it is). Default `latest`.
    pub which: String,
    /// How often `latest` is looked at. Default 10 s.
    pub poll: Duration,
    /// Most rows in one forward pass. Default 1024.
    pub max_batch_rows: usize,
    /// Most requests waiting for the batcher; more wait to be queued. Default 1024.
    pub queue: usize,
}

impl ServeConfig {
    /// The defaults, serving checkpoint `which` of `url`.
    pub fn new(url: impl Into<String>, which: impl Into<String>) -> ServeConfig {
        ServeConfig {
            url: url.into(),
            which: which.into(),
            poll: Duration::from_secs(10),
            max_batch_rows: 1024,
            queue: 1024,
        }
    }
}

/// The model being served and what decodes its rows.
pub struct Current {
    pub model: Arc<LoadedModel>,
    pub decoder: RowDecoder,
}

/// One request waiting for the batcher: its rows, decoded for `model`.
struct Job {
    model: Arc<LoadedModel>,
    batch: Batch,
    reply: oneshot::Sender<Result<Vec<f32>, ServeError>>,
}

/// The serving core; see the module docs.
pub struct Server {
    config: ServeConfig,
    store: CheckpointStore,
    current: RwLock<Arc<Current>>,
    queue: mpsc::Sender<Job>,
    metrics: Metrics,
    stop: watch::Sender<bool>,
}

impl Server {
    /// Loads the checkpoint `config` names and starts the batcher and, for `latest` or `best`, the
    /// watcher of newer checkpoints. Call from within a tokio runtime.
    pub async fn start(config: ServeConfig) -> Result<Arc<Server>, ServeError> {
        let store = CheckpointStore::open(&config.url)?;
        let model = LoadedModel::load(&store, &config.which).await?;
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let metrics = Metrics::default();
        metrics.model_step.set(model.step() as i64);
        let server = Arc::new(Server {
            current: RwLock::new(Arc::new(Current {
                decoder: RowDecoder::new(&model.info().input),
                model: Arc::new(model),
            })),
            queue: tx,
            metrics,
            store,
            stop: watch::channel(false).0,
            config,
        });
        tokio::spawn(batcher(rx, server.config.max_batch_rows.max(1), server.metrics.clone()));
        // `latest` and `best` move on during a job; both only ever to a newer checkpoint.
        if [gradflow_checkpoint::LATEST, gradflow_checkpoint::BEST].contains(&server.config.which.trim()) {
            tokio::spawn(follow(Arc::downgrade(&server), server.stop.subscribe()));
        }
        Ok(server)
    }

    /// The model served now.
    pub fn current(&self) -> Arc<Current> {
        self.current.read().unwrap().clone()
    }

    /// The metrics, as Prometheus text.
    pub fn metrics_text(&self) -> String {
        self.metrics.encode()
    }

    /// The metrics, to record what the transports see.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The probability of each row, batched with whatever other requests are waiting. Rows
    /// that do not fit the model are an [`crate::InputError`] naming the first bad column.
    pub async fn predict(&self, rows: &[Map<String, Value>]) -> Result<Vec<f32>, ServeError> {
        Ok(self.predict_with_step(rows).await?.0)
    }

    /// [`Server::predict`], and the step of the checkpoint that answered.
    pub async fn predict_with_step(
        &self,
        rows: &[Map<String, Value>],
    ) -> Result<(Vec<f32>, u64), ServeError> {
        let current = self.current();
        let step = current.model.step();
        let batch = current.decoder.batch(rows)?;
        if batch.is_empty() {
            return Ok((Vec::new(), step));
        }
        let (reply, answer) = oneshot::channel();
        let job = Job { model: current.model.clone(), batch, reply };
        drop(current);
        self.queue.send(job).await.map_err(|_| ServeError::Stopped)?;
        Ok((answer.await.map_err(|_| ServeError::Stopped)??, step))
    }

    /// Looks at the checkpoint `latest` (or `best`) names now and swaps it in if it is newer than the
    /// served one and loads; returns the step served afterwards. A checkpoint that fails to
    /// load is the error, and the served model stays.
    pub async fn reload(&self) -> Result<u64, ServeError> {
        let manifest = self.store.resolve(&self.config.which).await?;
        let served = self.current().model.step();
        // Never backwards, and the same step is the same checkpoint.
        if manifest.step <= served {
            return Ok(served);
        }
        let loaded = LoadedModel::from_manifest(&self.store, &manifest).await;
        let model = match loaded {
            Ok(m) => m,
            Err(e) => {
                self.metrics.reloads.get_or_create(&crate::metrics::ResultLabel { result: "refused" }).inc();
                return Err(e);
            }
        };
        let step = model.step();
        let next =
            Arc::new(Current { decoder: RowDecoder::new(&model.info().input), model: Arc::new(model) });
        *self.current.write().unwrap() = next;
        self.metrics.model_step.set(step as i64);
        self.metrics.reloads.get_or_create(&crate::metrics::ResultLabel { result: "swapped" }).inc();
        info!(step, checkpoint = %manifest.url(), "serving a newer checkpoint");
        Ok(step)
    }

    /// Stops following `latest` (or `best`); requests are still answered.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// Every `poll`, swaps in the checkpoint `latest` (or `best`) names if it is newer; until the server is
/// dropped or stopped. A checkpoint that fails is logged once.
async fn follow(server: std::sync::Weak<Server>, mut stop: watch::Receiver<bool>) {
    let mut refused: Option<String> = None;
    loop {
        let Some(poll) = server.upgrade().map(|s| s.config.poll) else { return };
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let Some(s) = server.upgrade() else { return };
        match s.reload().await {
            Ok(_) => refused = None,
            Err(e) => {
                let said = e.to_string();
                if refused.as_deref() != Some(&said) {
                    warn!(error = %said, "a newer checkpoint was refused; the previous model keeps serving");
                    refused = Some(said);
                }
            }
        }
    }
}

/// Takes waiting jobs in batches of at most `max_rows` rows (a single larger job alone) and
/// answers them; see the module docs.
async fn batcher(mut rx: mpsc::Receiver<Job>, max_rows: usize, metrics: Metrics) {
    let mut held: Option<Job> = None;
    loop {
        let first = match held.take() {
            Some(j) => j,
            None => match rx.recv().await {
                Some(j) => j,
                None => return,
            },
        };
        let mut rows = first.batch.len();
        let mut jobs = vec![first];
        while rows < max_rows {
            match rx.try_recv() {
                Ok(j) if Arc::ptr_eq(&j.model, &jobs[0].model) && rows + j.batch.len() <= max_rows => {
                    rows += j.batch.len();
                    jobs.push(j);
                }
                Ok(j) => {
                    held = Some(j);
                    break;
                }
                Err(_) => break,
            }
        }
        metrics.batch_rows.observe(rows as f64);
        metrics.predictions.inc_by(rows as u64);
        let started = Instant::now();
        let done = tokio::task::spawn_blocking(move || run(jobs)).await;
        if let Err(e) = done {
            warn!(error = %e, "a prediction batch panicked; its requests got no answer");
        }
        metrics.batch_seconds.observe(started.elapsed().as_secs_f64());
    }
}

/// One forward pass over every job's rows (all for the same model), each job answered with
/// its own part.
fn run(jobs: Vec<Job>) {
    let model = jobs[0].model.clone();
    let mut batch = Batch::new(jobs[0].batch.num_dense);
    let mut sizes = Vec::with_capacity(jobs.len());
    for j in &jobs {
        append(&mut batch, &j.batch);
        sizes.push(j.batch.len());
    }
    let mut out = Vec::new();
    match model.predict(&mut batch, &mut out) {
        Ok(()) => {
            let mut rest = out.as_slice();
            for (job, n) in jobs.into_iter().zip(sizes) {
                let (mine, others) = rest.split_at(n);
                rest = others;
                let _ = job.reply.send(Ok(mine.to_vec()));
            }
        }
        Err(e) => {
            let said = e.to_string();
            for job in jobs {
                let _ = job.reply.send(Err(ServeError::Internal(said.clone())));
            }
        }
    }
}

/// Appends the examples of `src` to `dst` (same dense width).
fn append(dst: &mut Batch, src: &Batch) {
    let base = dst.sparse_ids.len();
    dst.labels.extend_from_slice(&src.labels);
    dst.dense.extend_from_slice(&src.dense);
    dst.sparse_offsets.extend(src.sparse_offsets[1..].iter().map(|o| o + base));
    dst.sparse_fields.extend_from_slice(&src.sparse_fields);
    dst.sparse_ids.extend_from_slice(&src.sparse_ids);
    dst.sparse_values.extend_from_slice(&src.sparse_values);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_batches_keep_their_rows() {
        let mut a = Batch::new(1);
        a.push(0.0, &[1.0], [(0, 5, 1.0)]);
        let mut b = Batch::new(1);
        b.push(0.0, &[2.0], [(0, 6, 1.0), (1, 7, 1.0)]);
        b.push(0.0, &[3.0], []);
        let mut all = Batch::new(1);
        append(&mut all, &a);
        append(&mut all, &b);
        let mut expected = a.clone();
        expected.push(0.0, &[2.0], [(0, 6, 1.0), (1, 7, 1.0)]);
        expected.push(0.0, &[3.0], []);
        assert_eq!(all, expected);
    }
}
