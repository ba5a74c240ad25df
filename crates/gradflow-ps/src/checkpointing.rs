//! When a shard writes checkpoints, and restoring one at start.
//!
//! A checkpoint is taken between steps: the shard copies its model (a memcpy, on a blocking
//! thread) and training goes on while an uploader task writes the copy in the background.
//! One copy uploads while at most one more waits; a checkpoint that falls due while one waits
//! holds the step until there is room. A checkpoint is never skipped, so every shard writes
//! every checkpoint it was asked for, and memory stays bounded at two copies of the shard.
//!
//! One decision per checkpoint for the whole job:
//! - `every_steps` is a function of the model version, the same on every shard.
//! - `every` (time): shard 0 alone watches the clock. When it is due, shard 0 picks a step a
//!   little ahead and asks every shard for it (the `Checkpoint` RPC, at the addresses the
//!   workers declared). A shard that has gone past that step already says so and gives its part
//!   up; shard 0 then asks every shard again for a later step.
//! - A shard that cannot write its part (an upload failed, a step passed) writes an abandon
//!   marker ([`CheckpointStore::abandon`]): shard 0's finalize fails at once instead of waiting
//!   `finalize_timeout` for files that will not come.
//!
//! Every shard writes its own files; shard 0 then waits for all of them and writes the manifest
//! and the `latest` pointer (gradflow-checkpoint makes the order safe: a checkpoint without its
//! manifest does not exist). With `keep_best`, the scorer's score of a model version comes
//! with the `Score` RPC: every shard checkpoints that version, and shard 0 offers the
//! checkpoint as the `best` once it is complete, whichever of the two arrives last (both go
//! through shard 0's finalizing task, in order). Shard 0 finalizes on a task of its own, in order, so waiting for
//! the other shards never holds its own uploads. Checkpoints that failed are remembered: the
//! server reports them when it stops (and `gradflow ps` exits non-zero).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use gradflow_checkpoint::{CheckpointError, CheckpointStore, Score, ShardSnapshot};
use gradflow_core::{Metric, Mode};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::config::{CheckpointConfig, Restore};
use crate::model::ShardModel;
use crate::tasks::SavedTasks;
use crate::{PsError, ServerConfig};

/// The name of the data-task progress ([`SavedTasks`], JSON) among a checkpoint's extras;
/// shard 0 writes it when the job uses dynamic data sharding.
pub const TASKS_EXTRA: &str = "data_tasks.json";

/// The name of the scoring record ([`Scoring`], JSON) among a checkpoint's extras; shard 0
/// writes it.
pub const SCORING_EXTRA: &str = "scoring.json";

/// Static data sharding: how many epochs were scored when the checkpoint was taken, and how
/// the scores by the job's selection metric went (for early stopping across restarts).
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Scoring {
    pub scored_epochs: u64,
    /// The best selection score so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<BestSoFar>,
    /// Evaluations since the best one (0: the last one was the best).
    #[serde(default)]
    pub since_best: u64,
    /// Epochs whose selection score was counted (each is counted once).
    #[serde(default)]
    pub selected_epochs: u64,
}

/// The best selection score of a job so far.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BestSoFar {
    pub metric: Metric,
    pub value: f64,
    /// The model version scored.
    pub step: u64,
    /// The epoch scored, 1-based.
    pub epoch: u64,
}

impl Scoring {
    /// Counts epoch `epoch`'s (0-based) selection score of model version `step`, once per
    /// epoch; returns the evaluations since the best one.
    pub fn select(&mut self, epoch: u64, step: u64, metric: Metric, value: f64) -> u64 {
        if epoch < self.selected_epochs {
            return self.since_best;
        }
        self.selected_epochs = epoch + 1;
        match self.best {
            Some(b) if b.metric == metric && !metric.better(value, b.value) => self.since_best += 1,
            _ => {
                self.best = Some(BestSoFar { metric, value, step, epoch: epoch + 1 });
                self.since_best = 0;
            }
        }
        self.since_best
    }
}

/// What to do on shard 0's finalizing task, in order.
enum Finalize {
    /// Complete the checkpoint of this step.
    Checkpoint(u64),
    /// The model of this step was scored: offer its checkpoint as the best, if complete.
    Scored(u64),
}

/// What shard 0 saves beside its part of the model: the data-task progress (dynamic data
/// sharding) and the scoring record, both of the checkpoint's version.
#[derive(Debug, Clone, Default)]
pub struct Extras {
    pub tasks: Option<SavedTasks>,
    pub scoring: Option<Scoring>,
    /// What a predictor needs beside the parameters; goes into the snapshot (and so into the
    /// manifests), not beside it.
    pub serving: Option<serde_json::Value>,
}

/// Fault injection for tests: a server whose environment sets this to a step, on its first
/// attempt (`GRADFLOW_ATTEMPT` unset or 0), writes its files of that step's checkpoint and then
/// stalls forever before the checkpoint is finalized, so that a test can kill it mid-write.
pub const ENV_FAULT_STALL_UPLOAD: &str = "GRADFLOW_FAULT_STALL_UPLOAD";

/// The run id the launcher gives every process of a run; written into checkpoint manifests.
pub use gradflow_core::settings::ENV_RUN_ID;

/// An abandon marker whose reason starts with this gives a checkpoint up in favour of a later
/// one (a shard passed the step it was asked for): not a failure of the job.
const SUPERSEDED: &str = "superseded";

/// How long a stopping server waits for checkpoints still uploading or being finalized.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(20);

/// How many times shard 0 asks every shard again for a later step before it gives a
/// time-based checkpoint up.
const COORDINATION_ATTEMPTS: u32 = 8;

fn stall_at_from_env() -> Option<u64> {
    let first_attempt = std::env::var("GRADFLOW_ATTEMPT").map_or(true, |a| a.trim() == "0");
    let step = std::env::var(ENV_FAULT_STALL_UPLOAD).ok()?.trim().parse().ok()?;
    first_attempt.then_some(step)
}

struct State {
    /// Version of the last snapshot taken (or restored).
    last_version: u64,
    last_time: Instant,
    /// A requested checkpoint: taken when the version reaches this.
    requested: Option<u64>,
}

/// A snapshot on its way to storage, with shard 0's extras of the same version.
pub struct Upload {
    snap: ShardSnapshot,
    extras: Extras,
}

/// Room for one snapshot in the upload queue ([`Checkpointer::reserve`]).
pub type Slot = mpsc::OwnedPermit<Upload>;

pub struct Checkpointer {
    pub store: CheckpointStore,
    config: CheckpointConfig,
    shard: u32,
    num_shards: u32,
    mode: Mode,
    state: Mutex<State>,
    /// The version of the last checkpoint this shard finished writing (shard 0: finalizing).
    written: watch::Sender<u64>,
    queue: mpsc::Sender<Upload>,
    finalize_queue: mpsc::UnboundedSender<Finalize>,
    /// Shard 0: the scores of recent model versions (`keep_best`), offered as the best once
    /// their checkpoint is complete.
    scores: Mutex<std::collections::BTreeMap<u64, Score>>,
    /// Snapshots queued or uploading, and checkpoints waiting for their finalize.
    busy: watch::Sender<usize>,
    /// Checkpoints that failed in this run, with why.
    failures: Mutex<Vec<String>>,
    /// Every shard's address, in shard order, as the workers declared them; set once.
    peers: OnceLock<Vec<String>>,
    /// Shard 0: a time-based checkpoint is being agreed on with the other shards.
    coordinating: AtomicBool,
    /// The server is stopping: requested checkpoints that were not reached will not come.
    stopping: AtomicBool,
    /// See [`ENV_FAULT_STALL_UPLOAD`].
    stall_at: Option<u64>,
}

impl Checkpointer {
    /// The shard's checkpointer, with its uploader (and on shard 0 its finalizer) running.
    pub fn new(config: &ServerConfig, start_version: u64) -> Result<Option<Arc<Checkpointer>>, PsError> {
        let Some(c) = &config.checkpoint else { return Ok(None) };
        let options = gradflow_checkpoint::StoreOptions {
            run_id: std::env::var(ENV_RUN_ID).ok().filter(|r| !r.trim().is_empty()),
            ..Default::default()
        };
        let store = CheckpointStore::open_with(&c.url, options)?;
        let (queue, uploads) = mpsc::channel(1);
        let (finalize_queue, finalizes) = mpsc::unbounded_channel();
        let ck = Arc::new(Checkpointer {
            store,
            config: c.clone(),
            shard: config.shard,
            num_shards: config.num_shards,
            mode: config.mode,
            state: Mutex::new(State {
                last_version: start_version,
                last_time: Instant::now(),
                requested: None,
            }),
            written: watch::channel(start_version).0,
            queue,
            finalize_queue,
            scores: Mutex::new(Default::default()),
            busy: watch::channel(0).0,
            failures: Mutex::new(Vec::new()),
            peers: OnceLock::new(),
            coordinating: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            stall_at: stall_at_from_env(),
        });
        tokio::spawn(upload_loop(Arc::downgrade(&ck), uploads));
        if config.shard == 0 {
            tokio::spawn(finalize_loop(Arc::downgrade(&ck), finalizes));
        }
        Ok(Some(ck))
    }

    /// Records every shard's address (from a worker's declare); the first complete list wins.
    pub fn set_peers(&self, servers: &[String]) {
        if servers.len() == self.num_shards as usize
            && self.peers.set(servers.to_vec()).is_ok()
            && self.num_shards > 1
        {
            info!(
                ?servers,
                "checkpoints: shard addresses known; time-based checkpoints are decided by shard 0"
            );
        }
    }

    /// The other shards' addresses, when shard 0 decides time-based checkpoints for the job.
    pub fn peers(&self) -> Option<&[String]> {
        self.peers.get().map(|p| p.as_slice())
    }

    /// This shard follows its own clock for `every`: it is alone, or nobody told it where the
    /// other shards are (clients older than the `servers` field of DeclareSpec).
    fn own_clock(&self) -> bool {
        self.num_shards == 1 || self.peers.get().is_none()
    }

    /// Whether a checkpoint of `version` is due on this shard by steps, by a request, or by
    /// its own clock (see [`Checkpointer::own_clock`]).
    pub fn due(&self, version: u64) -> bool {
        let s = self.state.lock().unwrap();
        if version <= s.last_version {
            return false;
        }
        // Sync: a requested checkpoint is of exactly that version, as on every other shard; a
        // shard that passed it without taking it says so to the caller (see `missed`).
        let requested = match (self.mode, s.requested) {
            (Mode::Sync, Some(r)) => version == r,
            (_, Some(r)) => version >= r,
            (_, None) => false,
        };
        requested
            || self.config.every_steps.is_some_and(|n| version % n == 0)
            || (self.own_clock() && self.config.every.is_some_and(|t| s.last_time.elapsed() >= t))
    }

    /// Shard 0 of a job whose shards know each other: whether the job's time-based checkpoint
    /// is due, and if so claims the right to agree on its step (see [`coordinate`]).
    pub fn claim_time_checkpoint(&self) -> bool {
        if self.shard != 0 || self.own_clock() {
            return false;
        }
        let Some(every) = self.config.every else { return false };
        let due = self.state.lock().unwrap().last_time.elapsed() >= every;
        due && !self.coordinating.swap(true, Ordering::AcqRel)
    }

    /// Asks for a checkpoint when the model reaches `version`, replacing an earlier request
    /// (a caller that found one shard past its first choice asks all of them again).
    pub fn request(&self, version: u64) {
        self.state.lock().unwrap().requested = Some(version);
    }

    /// The server stops: checkpoint requests not reached yet are answered as such.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// The version of the last checkpoint this shard has finished writing.
    pub fn written(&self) -> u64 {
        *self.written.borrow()
    }

    /// Whether this shard, now at `version`, went past `target` without taking a snapshot of
    /// it (or of anything later): a requested checkpoint of `target` will not come.
    pub fn missed(&self, target: u64, version: u64) -> bool {
        version > target && self.state.lock().unwrap().last_version < target
    }

    /// The version of the last snapshot this shard took.
    pub fn last_taken(&self) -> u64 {
        self.state.lock().unwrap().last_version
    }

    /// Waits until no snapshot is queued or uploading and no finalize is pending, or
    /// `timeout` passed; says whether it is idle.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let mut rx = self.busy.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|n| *n == 0)).await.is_ok_and(|r| r.is_ok())
    }

    /// The model changed since the last checkpoint.
    pub fn stale(&self, version: u64) -> bool {
        version > self.state.lock().unwrap().last_version
    }

    pub fn on_shutdown(&self) -> bool {
        self.config.on_shutdown
    }

    /// Room in the upload queue: waits while one snapshot uploads and another waits. Reserve
    /// before taking a snapshot, so at most two copies of the shard exist at once.
    pub async fn reserve(&self) -> Result<Slot, PsError> {
        self.queue.clone().reserve_owned().await.map_err(|_| PsError::ShuttingDown)
    }

    /// Copies `model` at `version` into `slot`; the caller is on a blocking thread between
    /// steps and has checked [`Checkpointer::due`] (or is forced).
    pub fn take(&self, slot: Slot, model: &ShardModel, version: u64, extras: Extras) {
        let mut s = self.state.lock().unwrap();
        // Async shards reach a due version at different moments: name the checkpoint after
        // the version that was due, so that every shard writes into the same checkpoint.
        // (Sync shards snapshot exactly there.)
        let name = match (self.mode, s.requested, self.config.every_steps) {
            (Mode::Async, Some(r), _) if version >= r && r > s.last_version => r,
            (Mode::Async, _, Some(n)) if version - version % n > s.last_version => version - version % n,
            _ => version,
        };
        s.last_version = version;
        s.last_time = Instant::now();
        if s.requested.is_some_and(|r| version >= r) {
            s.requested = None;
        }
        drop(s);
        let mut snap = model.snapshot(name, self.mode);
        snap.serving = extras.serving.clone();
        self.busy.send_modify(|n| *n += 1);
        slot.send(Upload { snap, extras });
    }

    /// Gives this shard's part of checkpoint `step` up (best effort), so that shard 0 does not
    /// wait for it; `superseded` when a later checkpoint replaces it (not a failure).
    pub async fn give_up(&self, step: u64, reason: &str, superseded: bool) {
        let reason = if superseded { format!("{SUPERSEDED}: {reason}") } else { reason.to_string() };
        if let Err(e) = self.store.abandon(step, self.shard, &reason).await {
            warn!(step, error = %e, "could not mark the checkpoint as given up; shard 0 waits for it until finalize_timeout");
        }
    }

    /// Remembers a failed checkpoint, for the server's exit.
    fn failed(&self, step: u64, error: &dyn std::fmt::Display) {
        error!(step, error = %error, "checkpoint failed; the previous one stays the latest");
        self.failures.lock().unwrap().push(format!("step {step}: {error}"));
    }

    /// Remembers a checkpoint that could not be agreed on or written (see [`Checkpointer::failures`]).
    pub fn record_failure(&self, step: u64, error: &dyn std::fmt::Display) {
        self.failed(step, error);
    }

    /// The checkpoints that failed in this run.
    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    /// Writes one snapshot; shard 0 hands the checkpoint on to its finalizer.
    async fn upload(&self, job: Upload) {
        let Upload { snap, extras } = job;
        let version = snap.version;
        let started = Instant::now();
        let result = async {
            self.store.write_shard(version, &snap).await?;
            drop(snap);
            if let Some(tasks) = extras.tasks {
                let json = serde_json::to_vec(&tasks).expect("task state serializes");
                self.store.put_extra(version, TASKS_EXTRA, json).await?;
            }
            if let Some(scoring) = extras.scoring {
                let json = serde_json::to_vec(&scoring).expect("scoring serializes");
                self.store.put_extra(version, SCORING_EXTRA, json).await?;
            }
            Ok::<_, CheckpointError>(())
        }
        .await;
        if self.stall_at == Some(version) {
            warn!(step = version, "{ENV_FAULT_STALL_UPLOAD}: stalling this checkpoint's upload forever");
            std::future::pending::<()>().await;
        }
        match result {
            Ok(()) if self.shard == 0 => {
                // Finalized in order on its own task; `busy` goes down there.
                let _ = self.finalize_queue.send(Finalize::Checkpoint(version));
                return;
            }
            Ok(()) => {
                info!(step = version, elapsed = ?started.elapsed(), "checkpoint files written");
                self.written.send_modify(|v| *v = (*v).max(version));
            }
            Err(e) => {
                self.failed(version, &e);
                self.give_up(version, &format!("shard {} could not write its files: {e}", self.shard), false)
                    .await;
            }
        }
        self.busy.send_modify(|n| *n -= 1);
    }

    /// Shard 0: model version `version` was scored `score` (`keep_best`); its checkpoint is
    /// offered as the best once complete, whichever comes first, the score or the checkpoint.
    pub fn scored(&self, version: u64, score: Score) {
        if self.shard != 0 {
            return;
        }
        let mut scores = self.scores.lock().unwrap();
        scores.insert(version, score);
        while scores.len() > 64 {
            scores.pop_first();
        }
        drop(scores);
        self.busy.send_modify(|n| *n += 1);
        if self.finalize_queue.send(Finalize::Scored(version)).is_err() {
            self.busy.send_modify(|n| *n -= 1);
        }
    }

    /// Shard 0: points `best` at checkpoint `step` if it is complete, scored, and better than
    /// the one `best` names. A pointer that cannot be written fails the run like a checkpoint.
    async fn offer_best(&self, step: u64) {
        let Some(score) = self.scores.lock().unwrap().get(&step).copied() else { return };
        match self.store.offer_best(step, score, self.config.keep).await {
            Ok(true) => info!(step, metric = %score.metric, score = score.value, "best checkpoint so far"),
            Ok(false) => {}
            Err(e) => self.failed(step, &format!("the `best` pointer could not be moved to it: {e}")),
        }
    }

    /// Shard 0: completes checkpoint `step` once every shard's files are there.
    async fn finalize(&self, step: u64) {
        let started = Instant::now();
        let result =
            self.store.finalize(step, self.num_shards, self.config.keep, self.config.finalize_timeout).await;
        match result {
            Ok(_) => {
                info!(step, elapsed = ?started.elapsed(), "checkpoint written");
                self.offer_best(step).await;
                self.written.send_modify(|v| *v = (*v).max(step));
            }
            Err(CheckpointError::Abandoned { reason, shard, .. }) if reason.starts_with(SUPERSEDED) => {
                info!(step, shard, reason, "checkpoint given up for a later one");
            }
            Err(e) => self.failed(step, &e),
        }
        self.busy.send_modify(|n| *n -= 1);
    }
}

async fn upload_loop(ck: Weak<Checkpointer>, mut uploads: mpsc::Receiver<Upload>) {
    while let Some(job) = uploads.recv().await {
        let Some(ck) = ck.upgrade() else { return };
        ck.upload(job).await;
    }
}

async fn finalize_loop(ck: Weak<Checkpointer>, mut jobs: mpsc::UnboundedReceiver<Finalize>) {
    while let Some(job) = jobs.recv().await {
        let Some(ck) = ck.upgrade() else { return };
        match job {
            Finalize::Checkpoint(step) => ck.finalize(step).await,
            Finalize::Scored(step) => {
                ck.offer_best(step).await;
                ck.busy.send_modify(|n| *n -= 1);
            }
        }
    }
}

/// Shard 0: agrees with every other shard on the step of a time-based checkpoint and asks each
/// for it. A shard that has passed the chosen step already answers with its version; every
/// shard is then asked again for a step further ahead (the first choice's files are given up).
/// `target` is the first choice, which the caller has already requested on shard 0 (before
/// shard 0 can pass it); `ask` asks shard `s` for a checkpoint of a step and answers with the
/// shard's version when it had passed it.
pub async fn coordinate<F, Fut>(ck: &Checkpointer, mut target: u64, ask: F)
where
    F: Fn(u32, u64) -> Fut,
    Fut: std::future::Future<Output = Result<(), AskError>>,
{
    for attempt in 0..COORDINATION_ATTEMPTS {
        ck.request(target);
        let answers = futures::future::join_all((1..ck.num_shards).map(|s| ask(s, target))).await;
        let mut passed = None;
        for (i, answer) in answers.into_iter().enumerate() {
            match answer {
                Ok(()) => {}
                Err(AskError::Passed(current)) => passed = Some(passed.unwrap_or(0).max(current)),
                // The job ended before the step: the last checkpoint replaces this one.
                Err(AskError::Stopping) => {
                    ck.coordinating.store(false, Ordering::Release);
                    return;
                }
                Err(AskError::Failed(_)) if ck.stopping() => {
                    ck.coordinating.store(false, Ordering::Release);
                    return;
                }
                Err(AskError::Failed(message)) => {
                    ck.record_failure(target, &format!("shard {} could not take it: {message}", i + 1));
                    ck.coordinating.store(false, Ordering::Release);
                    return;
                }
            }
        }
        let Some(current) = passed else {
            ck.coordinating.store(false, Ordering::Release);
            return;
        };
        // Steps may be faster than a round trip: look further ahead each time.
        let next = current.max(target) + (2u64 << attempt.min(16));
        info!(
            step = target,
            next, "a shard had passed the checkpoint's step; asking every shard for a later one"
        );
        target = next;
    }
    ck.record_failure(target, &format!("no step agreed on after {COORDINATION_ATTEMPTS} attempts"));
    ck.coordinating.store(false, Ordering::Release);
}

/// Why a shard did not take a checkpoint it was asked for (see [`coordinate`]).
#[derive(Debug)]
pub enum AskError {
    /// It had passed the step already; its version.
    Passed(u64),
    /// It is stopping before it reached the step.
    Stopping,
    Failed(String),
}

/// What a shard starts from when it restores a checkpoint.
pub struct Restored {
    pub model: ShardModel,
    pub version: u64,
    /// Shard 0 of a job with dynamic data sharding: the data tasks done at that version.
    pub tasks: Option<SavedTasks>,
    /// Shard 0: the scoring record at that version; `None` in checkpoints written before it
    /// was recorded.
    pub scoring: Option<Scoring>,
    /// Shard 0: what the checkpoint's manifest says a predictor needs, kept for the next
    /// checkpoints until worker 0 declares it again.
    pub serving: Option<serde_json::Value>,
}

/// Loads the checkpoint `which` (latest, a step, a URL or path) for this shard.
pub async fn restore(config: &ServerConfig, which: &Restore) -> Result<Restored, PsError> {
    let store = match &config.checkpoint {
        Some(c) if which.needs_checkpoint_store() => CheckpointStore::open(&c.url)?,
        _ => CheckpointStore::open(&which.to_string())?,
    };
    let which = which.to_string();
    let manifest = store.resolve(&which).await?;
    let snap = store.load_shard(&manifest, config.shard, config.num_shards, manifest.partition_bytes).await?;
    let version = snap.version;
    let serving = snap.serving.clone();
    let embedding = config.embedding.clone();
    let model = tokio::task::spawn_blocking(move || ShardModel::from_snapshot(snap, &embedding))
        .await
        .map_err(|e| PsError::Internal(e.to_string()))??;
    let (tasks, scoring) = match config.shard {
        0 => (extra(&store, &manifest, TASKS_EXTRA).await?, extra(&store, &manifest, SCORING_EXTRA).await?),
        _ => (None, None),
    };
    info!(step = version, checkpoint = which, "model restored from checkpoint");
    Ok(Restored { model, version, tasks, scoring, serving })
}

/// The JSON extra `name` of a checkpoint, if it has one.
async fn extra<T: serde::de::DeserializeOwned>(
    store: &CheckpointStore,
    manifest: &gradflow_checkpoint::Manifest,
    name: &str,
) -> Result<Option<T>, PsError> {
    match store.get_extra(manifest, name).await? {
        Some(json) => Ok(Some(
            serde_json::from_slice(&json)
                .map_err(|e| PsError::Checkpoint(format!("{name} of checkpoint {}: {e}", manifest.url())))?,
        )),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_counts_each_epoch_once_and_restarts_the_count_at_a_better_score() {
        let mut s = Scoring::default();
        assert_eq!(s.select(0, 10, Metric::TestAuc, 0.70), 0);
        assert_eq!(s.select(1, 20, Metric::TestAuc, 0.74), 0);
        assert_eq!(s.select(2, 30, Metric::TestAuc, 0.74), 1, "equal is no improvement");
        // A restarted scorer reporting epoch 2 again changes nothing.
        assert_eq!(s.select(2, 30, Metric::TestAuc, 0.10), 1);
        assert_eq!(s.select(3, 40, Metric::TestAuc, f64::NAN), 2);
        assert_eq!(s.best, Some(BestSoFar { metric: Metric::TestAuc, value: 0.74, step: 20, epoch: 2 }));
        // It survives a checkpoint: old records without the fields read as no selection yet.
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Scoring>(&json).unwrap(), s);
        let old: Scoring = serde_json::from_str(r#"{"scored_epochs":3}"#).unwrap();
        assert_eq!(old, Scoring { scored_epochs: 3, ..Scoring::default() });
        // Lower is better for the loss.
        let mut s = Scoring::default();
        s.select(0, 1, Metric::TestLoss, 0.5);
        assert_eq!(s.select(1, 2, Metric::TestLoss, 0.4), 0);
        assert_eq!(s.select(2, 3, Metric::TestLoss, 0.45), 1);
    }
}
