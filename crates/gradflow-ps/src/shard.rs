//! The shard core: one shard's state and everything a request does to it, whatever transport
//! brought the request.
//!
//! The gRPC service (`service.rs`) and the tensor link (`link.rs`) are sibling adapters over
//! this file: each decodes its wire format once into the domain types here and in `push.rs`
//! ([`Push`], [`TableIds`], [`Declare`], ...), calls a method of [`Shard`], and encodes the
//! answer. Nothing here knows about protobuf or sockets; errors are [`PsError`]s, which the
//! adapters turn into their wire's refusals (`error.rs` for gRPC statuses).
//!
//! **What happens when a push arrives: [`Shard::push`]**, top to bottom: the model and the
//! worker are checked, the push is validated whole (`push.rs`), it waits for its step
//! (`coord.rs`), then sync mode adds it to the step's sums and, if it completes the step,
//! applies the step ([`Shard::complete_step`]), and async mode applies it at once; the math
//! is the model's (`model.rs`). Checkpoints fall due here too. The request metrics (pushes,
//! pulls, bytes, steps, version, live workers) are recorded here and nowhere else.
//!
//! Blocking work (validation of a large push, the optimizer, checkpoint snapshots) runs off
//! the async runtime unless it is small (`ServerConfig::inline_bytes`).

use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bytes::Bytes;
use gradflow_core::{Mode, ModelSpec};
use gradflow_proto::codec;
use tracing::{debug, info};

use crate::checkpointing::{Checkpointer, Extras, Restored, Scoring};
use crate::coord::{Coordinator, StepTicket};
use crate::metrics::Metrics;
use crate::model::{Piece, ShardModel};
use crate::push::{Push, check_ids_on_shard, validate};
use crate::tasks::{Handout, SavedTasks, TaskPlan, TaskQueue};
use crate::{PsError, ServerConfig};

/// A worker declaring the model (the `DeclareSpec` RPC).
#[derive(Debug, Clone)]
pub struct Declare {
    pub worker: u32,
    /// The shard and the number of shards the worker believes this is.
    pub shard: u32,
    pub num_shards: u32,
    pub partition_bytes: u64,
    /// The [`ModelSpec`] as JSON.
    pub spec_json: String,
    /// Every shard's address, in shard order (for shard 0's time-based checkpoints).
    pub servers: Vec<String>,
}

/// The answer to a [`Declare`]: whether this declare created the model, and its version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Declared {
    pub created: bool,
    pub version: u64,
}

/// Ids of one sparse table to pull, little-endian `u64`s as received.
#[derive(Debug, Clone, Default)]
pub struct TableIds {
    pub table: String,
    pub ids: Bytes,
}

/// One table's pulled rows: `dim` little-endian `f32`s per requested id, in request order.
#[derive(Debug, Clone, Default)]
pub struct Rows {
    pub table: String,
    pub values: Bytes,
}

/// A dense pull the shard has answered: the pieces to send and the version they are of. The
/// transport sends them, then reports what it sent ([`DenseRead::sent`]).
pub struct DenseRead {
    version: u64,
    model: Arc<ShardModel>,
    pieces: Vec<usize>,
    started: Instant,
    metrics: Metrics,
}

impl DenseRead {
    /// The model version the pieces are of.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The pieces asked for, in order; each one's values are read with [`Piece::read`], which
    /// shares them rather than copying.
    pub fn pieces(&self) -> impl ExactSizeIterator<Item = &Piece> {
        self.pieces.iter().map(|&i| &self.model.pieces()[i])
    }

    /// Bytes of values the pieces hold.
    pub fn bytes(&self) -> u64 {
        self.pieces().map(|p| p.len() as u64 * 4).sum()
    }

    /// The pull was sent whole, `bytes` of values: counts it.
    pub fn sent(self, bytes: u64) {
        self.metrics.bytes_sent.inc_by(bytes);
        self.metrics.observe_pull("dense", self.started.elapsed());
    }
}

/// An evaluation's score by the job's selection metric (the `Score` RPC's `selection`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Selection {
    pub metric: gradflow_core::Metric,
    pub value: f64,
    /// Checkpoint the scored model and keep the best such checkpoint (`keep_best`).
    pub keep_best: bool,
}

/// The scorer's report on an epoch's end (the `Score` RPC): `step` is the step whose batch
/// ends epoch `epoch` (0-based); the model scored is version `step` + 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreCall {
    pub worker: u32,
    pub epoch: u64,
    pub step: u64,
    /// False: hold the next step while the scorer scores; true: the epoch is scored.
    pub scored: bool,
    pub selection: Option<Selection>,
    /// End training with the model scored (early stopping).
    pub stop: bool,
}

/// What a shard reports about itself (the `Status` RPC).
#[derive(Debug, Clone)]
pub struct ShardStatus {
    pub shard: u32,
    pub num_shards: u32,
    pub mode: Mode,
    pub version: u64,
    pub declared: bool,
    pub live_workers: Vec<u32>,
    pub dense_bytes: u64,
    pub sparse_rows: u64,
    pub num_workers: u32,
    pub link_port: u16,
    pub scored_epochs: Option<u64>,
}

/// One shard: its state and the requests it answers, shared by both transports' adapters and
/// the server's background tasks. The request methods are grouped below: pushes, pulls,
/// declaring and status, data tasks.
pub struct Shard {
    pub config: ServerConfig,
    pub coord: Coordinator,
    pub metrics: Metrics,
    /// The port of this shard's tensor link; 0 when it has none. Set by `server::start`.
    pub link_port: u16,
    model: RwLock<Option<Arc<ShardModel>>>,
    declare_lock: tokio::sync::Mutex<()>,
    pub checkpointer: Option<Arc<Checkpointer>>,
    /// Shard 0, dynamic data sharding: the job's data tasks, once a worker declared them.
    tasks: Mutex<Option<TaskQueue>>,
    /// Shard 0: the task progress of the checkpoint this shard was restored from, until the
    /// workers declare the plan again.
    restored_tasks: Mutex<Option<SavedTasks>>,
    /// Epochs scored so far (static data sharding, see the `Score` RPC); `None` when unknown
    /// (restored from a checkpoint that did not record it).
    scored_epochs: Mutex<Option<u64>>,
    /// Shard 0: the selection scores so far (best, evaluations since); `scored_epochs` of it
    /// is not used (see the field above).
    selection: Mutex<Scoring>,
    /// Shard 0: what a predictor needs beside the parameters, as worker 0 declared it (or as
    /// the restored checkpoint had it); written into every checkpoint.
    serving: Mutex<Option<serde_json::Value>>,
}

impl Shard {
    /// A shard with no model yet (the first worker declares it), or one restored from a
    /// checkpoint.
    pub fn new(config: ServerConfig, restored: Option<Restored>) -> Result<Shard, PsError> {
        let coord = Coordinator::new(
            config.mode,
            config.num_workers,
            config.max_staleness,
            config.settings.heartbeat_timeout,
            config.settings.startup_timeout,
        )
        .with_backup_workers(config.settings.backup_workers);
        let version = restored.as_ref().map_or(0, |r| r.version);
        if let Some(r) = &restored {
            r.model.set_check_finite(config.settings.reject_non_finite);
        }
        if restored.is_some() {
            coord.restore(version);
        }
        let checkpointer = Checkpointer::new(&config, version)?;
        let metrics = Metrics::default();
        metrics.version.set(version as i64);
        Ok(Shard {
            config,
            coord,
            metrics,
            restored_tasks: Mutex::new(restored.as_ref().and_then(|r| r.tasks.clone())),
            serving: Mutex::new(restored.as_ref().and_then(|r| r.serving.clone())),
            scored_epochs: Mutex::new(match &restored {
                None => Some(0),
                Some(r) => r.scoring.map(|s| s.scored_epochs),
            }),
            selection: Mutex::new(restored.as_ref().and_then(|r| r.scoring).unwrap_or_default()),
            model: RwLock::new(restored.map(|r| Arc::new(r.model))),
            declare_lock: tokio::sync::Mutex::new(()),
            checkpointer,
            tasks: Mutex::new(None),
            link_port: 0,
        })
    }

    /// What to save beside the model with a checkpoint: shard 0's data-task progress (dynamic
    /// sharding) and scoring record.
    fn extras(&self) -> Extras {
        if self.config.shard != 0 {
            return Extras::default();
        }
        let tasks = match &*self.tasks.lock().unwrap() {
            Some(q) => Some(q.save()),
            // Declared by no one yet after a restore: keep what the checkpoint had.
            None => self.restored_tasks.lock().unwrap().clone(),
        };
        let selection = *self.selection.lock().unwrap();
        let scoring = self.scored_epochs().map(|scored_epochs| Scoring { scored_epochs, ..selection });
        let serving = self.serving.lock().unwrap().clone();
        Extras { tasks, scoring, serving }
    }

    /// Worker 0 declares what a predictor needs beside the parameters (see the
    /// `DeclareServing` RPC): kept by shard 0 and written into its next checkpoints. It must be
    /// a JSON object; the servers do not look inside.
    pub fn declare_serving(&self, worker: u32, json: &str) -> Result<(), PsError> {
        self.touch(worker)?;
        let value: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| PsError::InvalidArgument(format!("serving_json is not JSON: {e}")))?;
        if !value.is_object() {
            return Err(PsError::InvalidArgument("serving_json must be a JSON object".into()));
        }
        if self.config.shard == 0 {
            *self.serving.lock().unwrap() = Some(value);
        }
        Ok(())
    }

    /// Epochs scored so far; `None` when not known (see [`Scoring`]).
    pub fn scored_epochs(&self) -> Option<u64> {
        *self.scored_epochs.lock().unwrap()
    }

    /// The scorer reached the end of epoch `epoch` at `step` (see [`ScoreCall`]): holds the
    /// next step (sync) so that the model stays the epoch's end model until the scorer has
    /// scored it and pushed its next batch; or, with `scored`, records that the epoch is
    /// scored, and with a selection score counts it (shard 0) and, for `keep_best`,
    /// checkpoints the model scored; or, with `stop`, ends training with that model. Returns
    /// shard 0's evaluations since the best selection score (0 elsewhere).
    pub async fn score(self: &Arc<Self>, call: ScoreCall) -> Result<u64, PsError> {
        let ScoreCall { worker, epoch, step, scored, selection, stop } = call;
        self.touch(worker)?;
        if stop {
            self.coord.finish(step + 1);
            return Ok(0);
        }
        if !scored {
            self.coord.hold(worker, step + 1)?;
            return Ok(0);
        }
        {
            let mut n = self.scored_epochs.lock().unwrap();
            *n = Some(n.unwrap_or(0).max(epoch + 1));
        }
        info!(worker, epoch = epoch + 1, "epoch scored");
        let Some(sel) = selection else { return Ok(0) };
        let since_best = match self.config.shard {
            0 => self.selection.lock().unwrap().select(epoch, step + 1, sel.metric, sel.value),
            _ => 0,
        };
        if sel.keep_best {
            self.checkpoint_scored(epoch, step + 1, sel).await;
        }
        Ok(since_best)
    }

    /// `keep_best`: model version `version`, held while it was scored, gets a checkpoint (unless
    /// it has one), and shard 0 offers that checkpoint as the best once it is complete.
    async fn checkpoint_scored(self: &Arc<Self>, epoch: u64, version: u64, sel: Selection) {
        let Some(ck) = self.checkpointer.clone() else { return };
        ck.scored(
            version,
            gradflow_checkpoint::Score { metric: sel.metric, value: sel.value, epoch: Some(epoch + 1) },
        );
        if self.coord.version() != version || ck.last_taken() >= version {
            // Taken already (`every_steps`), or the model moved on (a score of a past epoch).
            return;
        }
        ck.request(version);
        if self.coord.between_steps() {
            self.checkpoint_if_due(version, true).await;
        }
    }

    fn task_queue(&self) -> Result<std::sync::MutexGuard<'_, Option<TaskQueue>>, PsError> {
        if self.config.shard != 0 {
            return Err(PsError::NotTaskShard(self.config.shard));
        }
        Ok(self.tasks.lock().unwrap())
    }

    /// Takes a checkpoint now if one is due at `version` (or `force`), on a blocking thread,
    /// and queues it for upload; waits while the upload queue is full.
    pub async fn checkpoint_if_due(self: &Arc<Self>, version: u64, force: bool) {
        let (Some(ck), Ok(model)) = (self.checkpointer.clone(), self.model()) else { return };
        if !(force || ck.due(version)) {
            return;
        }
        let Ok(slot) = ck.reserve().await else { return };
        let shard = self.clone();
        let _ = blocking(move || {
            // Another push may have taken it while this one waited for room.
            if force || ck.due(version) {
                ck.take(slot, &model, version, shard.extras());
            }
        })
        .await;
    }

    /// Shard 0: starts agreeing on a time-based checkpoint with the other shards when one is
    /// due (see `checkpointing::coordinate`).
    fn coordinate_if_due(self: &Arc<Self>) {
        let Some(ck) = self.checkpointer.clone() else { return };
        if !ck.claim_time_checkpoint() {
            return;
        }
        let Some(peers) = ck.peers().map(|p| p.to_vec()) else { return };
        // Two steps ahead: no shard can be past it yet (a shard completes a step only after
        // every worker pulled shard 0's model of the step before).
        let target = self.coord.version() + 2;
        ck.request(target);
        let (token, tls) = (self.config.token.clone(), self.config.peer_tls.clone());
        tokio::spawn(async move {
            crate::checkpointing::coordinate(&ck, target, |s, target| {
                crate::peer::ask_checkpoint(peers[s as usize].clone(), token.clone(), tls.clone(), target)
            })
            .await;
        });
    }

    /// The declared model, or `NotDeclared`; or the model's fault once an update would have
    /// made it non-finite.
    pub fn model(&self) -> Result<Arc<ShardModel>, PsError> {
        let model = self.model.read().unwrap().clone().ok_or(PsError::NotDeclared)?;
        model.healthy()?;
        Ok(model)
    }

    /// The declared model, whether or not an update made it fail (see [`ShardModel::healthy`]).
    pub fn declared(&self) -> Option<Arc<ShardModel>> {
        self.model.read().unwrap().clone()
    }

    /// Applies a completed sync step on a blocking thread and advances the version.
    ///
    /// Runs on a task of its own, which the caller awaits: the request that completed the step
    /// may be cancelled while the update is applied (its worker killed mid-call, the
    /// connection reset), and a step left applying would stop every worker for good.
    pub async fn complete_step(self: &Arc<Self>, ticket: StepTicket) -> Result<(), PsError> {
        let shard = self.clone();
        tokio::spawn(async move { shard.apply_step(ticket).await })
            .await
            .map_err(|e| PsError::Internal(format!("applying the step failed: {e}")))?
    }

    async fn apply_step(self: &Arc<Self>, ticket: StepTicket) -> Result<(), PsError> {
        let model = self.model()?;
        let started = Instant::now();
        let divisor = ticket.divisor as f32;
        let (step, ck) = (ticket.step, self.checkpointer.clone());
        // The snapshot is taken before the version moves on, so no push of the next step can
        // be in it: every shard's checkpoint of a version holds the same model.
        let shard = self.clone();
        // Room in the upload queue first: a checkpoint is never skipped, so a step that falls
        // due while the queue is full waits for it (every shard must write every checkpoint).
        let slot = match ck.as_ref().filter(|c| c.due(step + 1)) {
            Some(c) => Some(c.reserve().await?),
            None => None,
        };
        // A checkpoint's snapshot copies the whole shard: never on a runtime thread.
        let bytes = if slot.is_some() { u64::MAX } else { model.accumulated_bytes() };
        let applied = offload(bytes, self.config.inline_bytes, move || {
            let applied = model.try_apply_accumulated(divisor, step);
            // A model that is not finite any more is never checkpointed.
            if let (Some(c), Some(slot), true) = (ck, slot, applied.is_ok()) {
                c.take(slot, &model, step + 1, shard.extras());
            }
            applied
        })
        .await?;
        debug!(step = ticket.step, workers = ticket.divisor, elapsed = ?started.elapsed(), "step applied");
        // Finished even when refused, so that the requests waiting for it wake and hear why.
        self.coord.finish_step(ticket);
        self.metrics.steps.inc();
        self.metrics.version.set(self.coord.version() as i64);
        self.coordinate_if_due();
        applied
    }

    fn touch(&self, worker: u32) -> Result<(), PsError> {
        self.coord.touch(worker)?;
        self.metrics.live_workers.set(self.coord.live_workers().len() as i64);
        Ok(())
    }
}

/// Pushes.
impl Shard {
    /// Takes one worker's push for one step: checks it whole, then adds it to the step (sync)
    /// or applies it (async). Returns the model version: sync, the step the push joined;
    /// async, the version after applying it. `started` is when the push began to arrive (for
    /// the metrics, recorded here).
    ///
    /// A refused push changes nothing; a push taken is in the model (sync: in the step's sums)
    /// even if the caller goes away meanwhile (see below).
    pub async fn push(self: &Arc<Self>, push: Push, started: Instant) -> Result<u64, PsError> {
        let result = self.take_push(push).await;
        self.metrics.observe_push(result.is_ok(), started.elapsed());
        if let Err(e) = &result {
            self.metrics.observe_refusal(e);
        }
        result
    }

    /// A push refused while it was being received (not finite, lengths a transport could not
    /// take): counted as a refused push, and the error given back.
    pub fn refuse_push(&self, e: PsError, started: Instant) -> PsError {
        self.metrics.observe_push(false, started.elapsed());
        self.metrics.observe_refusal(&e);
        e
    }

    /// The refusal of gradients holding NaN or infinity, when this shard refuses them (see
    /// [`crate::push::non_finite`]); transports check each part of a push as it arrives.
    pub fn refuses_non_finite(
        &self,
        dense: &[crate::push::DenseGrad],
        sparse: &[crate::push::SparseGrad],
    ) -> Option<PsError> {
        let name = self
            .config
            .settings
            .reject_non_finite
            .then(|| crate::push::non_finite(dense, sparse))
            .flatten()?;
        Some(PsError::NonFinite(name.to_string()))
    }

    async fn take_push(self: &Arc<Self>, push: Push) -> Result<u64, PsError> {
        let shard = self.clone();
        let model = shard.model()?;
        let worker = push.worker;
        if worker == gradflow_proto::OBSERVER {
            return Err(PsError::InvalidArgument("an observer cannot push gradients".into()));
        }
        shard.touch(worker)?;
        let task = push.task;
        if let Some(t) = task {
            // A push quoting a task that was handed to someone else must not be taken.
            shard.task_queue()?.as_ref().ok_or(PsError::NoTasks)?.check(worker, t.lease)?;
        }
        let record_progress = move |shard: &Shard| {
            if let (Some(t), Ok(mut q)) = (task, shard.task_queue()) {
                // Cannot fail: only a worker that stopped heartbeating loses its lease.
                let _ = q.as_mut().map(|q| q.progress(worker, t.lease, t.examples));
            }
        };
        let m = model.clone();
        let received = push.bytes();
        let push = offload(received, shard.config.inline_bytes, move || validate(&m, push)).await??;
        shard.metrics.bytes_received.inc_by(push.bytes);
        let (worker, step) = (push.worker, push.step);
        shard.coord.wait_for_step(worker, step, shard.config.settings.wait_timeout).await?;
        match shard.config.mode {
            Mode::Sync => {
                // From the reservation of its slot to the end of the step it may complete, a
                // push runs on a task of its own, awaited here: this request may be cancelled
                // (its worker killed, the connection reset), and a push half-counted or a step
                // left applying would stop every worker for good.
                let task = async move {
                    shard.coord.begin_push(worker, step)?;
                    let m = model.clone();
                    let bytes = push.bytes;
                    let added = offload(bytes, shard.config.inline_bytes, move || m.accumulate(push)).await;
                    if added.is_ok() {
                        // Before the push counts: the step's checkpoint must hold its progress.
                        record_progress(&shard);
                    }
                    if let Some(ticket) = shard.coord.end_push(worker, added.is_ok()) {
                        shard.apply_step(ticket).await?;
                    }
                    added?;
                    Ok(step)
                };
                tokio::spawn(task)
                    .await
                    .map_err(|e| PsError::Internal(format!("taking the push failed: {e}")))?
            }
            Mode::Async => {
                let bytes = push.bytes;
                offload(bytes, shard.config.inline_bytes, move || model.apply_now(push)).await??;
                record_progress(&shard);
                let v = shard.coord.applied_async(worker, step);
                shard.metrics.version.set(v as i64);
                shard.checkpoint_if_due(v, false).await;
                shard.coordinate_if_due();
                Ok(v)
            }
        }
    }
}

/// Pulls.
impl Shard {
    /// A dense pull of `worker` for `step`: the pieces named (all this shard holds when none
    /// is), once the model has reached the step.
    pub async fn pull_dense<'a>(
        &self,
        worker: u32,
        step: u64,
        pieces: impl IntoIterator<Item = (&'a str, u32)>,
    ) -> Result<DenseRead, PsError> {
        let started = Instant::now();
        self.touch(worker)?;
        let model = self.model()?;
        let named: Vec<usize> =
            pieces.into_iter().map(|(t, p)| model.piece(t, p)).collect::<Result<_, _>>()?;
        let pieces = if named.is_empty() { (0..model.pieces().len()).collect() } else { named };
        let version = self.coord.wait_for_step(worker, step, self.config.settings.wait_timeout).await?;
        model.healthy()?;
        Ok(DenseRead { version, model, pieces, started, metrics: self.metrics.clone() })
    }

    /// A sparse pull of `worker` for `step`: the rows of `tables`' ids (created where new),
    /// table by table in request order, and the model version they are of, once the model has
    /// reached the step.
    pub async fn pull_sparse(
        &self,
        worker: u32,
        step: u64,
        tables: Vec<TableIds>,
    ) -> Result<(Vec<Rows>, u64), PsError> {
        let started = Instant::now();
        self.touch(worker)?;
        let model = self.model()?;
        let mut wanted = Vec::with_capacity(tables.len());
        for t in &tables {
            let idx = model.table(&t.table)?;
            if codec::u64_len(&t.ids).is_none() {
                return Err(PsError::InvalidArgument(format!(
                    "ids of `{}`: {} bytes is not a whole number of u64 ids",
                    t.table,
                    t.ids.len()
                )));
            }
            let ids: Vec<u64> = codec::u64s(&t.ids).collect();
            check_ids_on_shard(&model, &t.table, &ids)?;
            wanted.push((idx, ids));
        }
        let version = self.coord.wait_for_step(worker, step, self.config.settings.wait_timeout).await?;
        model.healthy()?;
        let bytes: u64 =
            wanted.iter().map(|(idx, ids)| (ids.len() * model.tables()[*idx].dim() * 4) as u64).sum();
        let rows = offload(bytes, self.config.inline_bytes, move || {
            wanted
                .into_iter()
                .map(|(idx, ids)| {
                    let table = &model.tables()[idx];
                    let mut values = Vec::with_capacity(ids.len() * table.dim() * 4);
                    table.pull(&ids, &mut values);
                    Rows { table: table.name().to_string(), values: values.into() }
                })
                .collect::<Vec<_>>()
        })
        .await?;
        let sent: u64 = rows.iter().map(|t| t.values.len() as u64).sum();
        self.metrics.bytes_sent.inc_by(sent);
        self.metrics.observe_pull("sparse", started.elapsed());
        Ok((rows, version))
    }
}

/// Declaring the model, workers coming and going, status and checkpoints.
impl Shard {
    /// A worker declares the model: the first declare creates it (within the memory budget),
    /// later ones must declare the same.
    pub async fn declare(&self, d: Declare) -> Result<Declared, PsError> {
        let cfg = &self.config;
        if d.num_shards != cfg.num_shards || d.shard != cfg.shard {
            return Err(PsError::SpecMismatch(format!(
                "the worker believes this is shard {} of {}, but it is shard {} of {}: check the order of server addresses",
                d.shard, d.num_shards, cfg.shard, cfg.num_shards
            )));
        }
        if d.partition_bytes < 1024 {
            return Err(PsError::InvalidArgument(format!(
                "partition_bytes is {}; expected at least 1024",
                d.partition_bytes
            )));
        }
        let spec: ModelSpec = serde_json::from_str(&d.spec_json).map_err(|e| {
            PsError::InvalidSpec(format!("model spec is not valid JSON for a ModelSpec: {e}"))
        })?;
        spec.validate().map_err(|e| PsError::InvalidSpec(e.to_string()))?;
        self.touch(d.worker)?;
        if let Some(ck) = &self.checkpointer {
            ck.set_peers(&d.servers);
        }

        let _guard = self.declare_lock.lock().await;
        if let Some(existing) = self.declared() {
            if let Some(diff) = existing.spec().first_difference(&spec) {
                return Err(PsError::SpecMismatch(format!(
                    "model spec differs from the one already declared: {diff}"
                )));
            }
            if existing.placement().partition_bytes != d.partition_bytes {
                return Err(PsError::SpecMismatch(format!(
                    "partition_bytes is {} but the model was declared with {}",
                    d.partition_bytes,
                    existing.placement().partition_bytes
                )));
            }
            return Ok(Declared { created: false, version: self.coord.version() });
        }
        let (n, s, pb_) = (cfg.num_shards, cfg.shard, d.partition_bytes);
        let max_message = cfg.transport.max_message_bytes as u64;
        ShardModel::check_fits(&spec, n, s, pb_, cfg.memory_budget(), max_message)?;
        let embedding = cfg.embedding.clone();
        let model = blocking(move || ShardModel::new(spec, n, s, pb_).with_embedding(&embedding)).await??;
        model.set_check_finite(cfg.settings.reject_non_finite);
        info!(
            dense_tensors = model.spec().dense.len(),
            pieces = model.pieces().len(),
            dense_bytes = model.dense_bytes(),
            sparse_tables = model.tables().len(),
            worker = d.worker,
            "model declared"
        );
        *self.model.write().unwrap() = Some(Arc::new(model));
        Ok(Declared { created: true, version: self.coord.version() })
    }

    /// A worker is alive: the model version and how many workers are live.
    pub fn heartbeat(&self, worker: u32) -> Result<(u64, u32), PsError> {
        self.touch(worker)?;
        Ok((self.coord.version(), self.coord.live_workers().len() as u32))
    }

    /// A worker finished, or with `pause` is idle until its next push; the step it was
    /// waited for in may complete.
    pub async fn leave(self: &Arc<Self>, worker: u32, pause: bool) -> Result<(), PsError> {
        if let Some(ticket) = self.coord.leave(worker, pause)? {
            self.complete_step(ticket).await?;
        }
        self.metrics.live_workers.set(self.coord.live_workers().len() as i64);
        Ok(())
    }

    /// Drops workers not heard from in time (the server's reaper calls it); the step may
    /// complete without them.
    pub async fn reap(self: &Arc<Self>) -> Result<(), PsError> {
        let done = match self.coord.reap() {
            Some(ticket) => self.complete_step(ticket).await,
            None => Ok(()),
        };
        self.metrics.live_workers.set(self.coord.live_workers().len() as i64);
        done
    }

    /// What this shard reports about itself.
    pub fn status(&self) -> ShardStatus {
        let model = self.declared();
        ShardStatus {
            shard: self.config.shard,
            num_shards: self.config.num_shards,
            mode: self.config.mode,
            version: self.coord.version(),
            declared: model.is_some(),
            live_workers: self.coord.live_workers(),
            dense_bytes: model.as_ref().map_or(0, |m| m.dense_bytes()),
            sparse_rows: model.as_ref().map_or(0, |m| m.sparse_rows()),
            num_workers: self.coord.num_workers(),
            link_port: self.link_port,
            scored_epochs: self.scored_epochs(),
        }
    }

    /// The metrics in the Prometheus text format (the `/metrics` endpoint).
    pub fn metrics_text(&self) -> String {
        if let Ok(m) = self.model() {
            self.metrics.sparse_rows.set(m.sparse_rows() as i64);
            for t in m.tables() {
                self.metrics.observe_table(t.name(), t.stats());
            }
        }
        if let Some(ck) = &self.checkpointer {
            self.metrics.checkpoint_step.set(ck.written() as i64);
            let (failed, counter) = (ck.failures().len() as u64, &self.metrics.checkpoint_failures);
            counter.inc_by(failed.saturating_sub(counter.get()));
        }
        self.metrics.encode()
    }

    /// A checkpoint of step `target` is asked for (shard 0 agreeing on a time-based
    /// checkpoint, or an operator): waits until it is written; returns the step written.
    pub async fn checkpoint(self: &Arc<Self>, target: u64) -> Result<u64, PsError> {
        let shard = self;
        let ck = shard.checkpointer.clone().ok_or(PsError::NoCheckpoints)?;
        shard.model()?;
        // Sync: every shard must write the same step. One that is past it already cannot, and
        // says so, so that the caller asks every shard for a later step instead.
        let version = shard.coord.version();
        if shard.config.mode == Mode::Sync && version > target {
            if ck.missed(target, version) {
                let reason = format!(
                    "shard {} was at step {version} when step {target} was asked for",
                    shard.config.shard
                );
                ck.give_up(target, &reason, true).await;
            }
            return Err(PsError::CheckpointPassed { requested: target, current: version });
        }
        ck.request(target);
        let version = shard.coord.version();
        if version >= target && shard.coord.between_steps() {
            shard.checkpoint_if_due(version, true).await;
        }
        // Until written; in sync mode the shard may also have passed the step before the
        // request was in (a step completing meanwhile), which the caller must hear about.
        let deadline = tokio::time::Instant::now() + shard.config.settings.wait_timeout;
        loop {
            let written = ck.written();
            if written >= target {
                return Ok(written);
            }
            let version = shard.coord.version();
            if shard.config.mode == Mode::Sync && ck.missed(target, version) {
                let reason = format!(
                    "shard {} was at step {version} when step {target} was asked for",
                    shard.config.shard
                );
                ck.give_up(target, &reason, true).await;
                return Err(PsError::CheckpointPassed { requested: target, current: version });
            }
            if ck.stopping() {
                return Err(PsError::ShuttingDown);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(PsError::WaitTimeout(shard.config.settings.wait_timeout));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// Dynamic data sharding (shard 0).
impl Shard {
    /// A worker declares the job's data tasks: the first declare (or the checkpoint this shard
    /// was restored from) sets them, later ones must declare the same. Whether this one set
    /// them.
    pub fn declare_tasks(&self, worker: u32, plan: TaskPlan) -> Result<bool, PsError> {
        self.touch(worker)?;
        plan.validate()?;
        let mut tasks = self.task_queue()?;
        let differs = |have: &TaskPlan, source: &str| {
            PsError::SpecMismatch(format!(
                "the data tasks differ from the ones {source}: {}",
                plan_difference(have, &plan)
            ))
        };
        if let Some(q) = tasks.as_ref() {
            return if q.plan() == &plan { Ok(false) } else { Err(differs(q.plan(), "already declared")) };
        }
        let queue = match self.restored_tasks.lock().unwrap().take() {
            Some(saved) if saved.plan != plan => {
                return Err(differs(&saved.plan, "in the checkpoint this server restored"));
            }
            Some(saved) => {
                info!("data tasks restored from the checkpoint");
                TaskQueue::restore(saved)?
            }
            None => TaskQueue::new(plan),
        };
        info!(pieces = queue.plan().pieces.len(), epochs = queue.plan().epochs, "data tasks declared");
        *tasks = Some(queue);
        Ok(true)
    }

    /// A worker asks for work, having finished the task of `done_lease` (0: none) and scored
    /// epoch `scored` (if any): its next task, and the epoch it is to score with the number
    /// of examples trained in it, if any (see [`TaskQueue::next`]).
    pub fn next_task(
        &self,
        worker: u32,
        done_lease: u64,
        scored: Option<u64>,
    ) -> Result<(Handout, Option<(u64, u64)>), PsError> {
        self.touch(worker)?;
        // Paused workers are idle, not gone: a scoring they were given stays theirs.
        let live = self.coord.alive_workers();
        let mut tasks = self.task_queue()?;
        let queue = tasks.as_mut().ok_or(PsError::NoTasks)?;
        let (handout, completed) = queue.next(worker, done_lease, scored, |w| live.contains(&w));
        if let Handout::Task(t) = &handout {
            debug!(worker, epoch = t.epoch, piece = t.piece_index, skip = t.skip_examples, "task handed out");
        }
        Ok((handout, completed))
    }
}

/// Runs blocking work off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, PsError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| PsError::Internal(format!("blocking task failed: {e}")))
}

/// Runs `f`, which works over `bytes` bytes: here if they are at most `inline` (see
/// `ServerConfig::inline_bytes`), else on the blocking pool.
async fn offload<T: Send + 'static>(
    bytes: u64,
    inline: u64,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, PsError> {
    if bytes <= inline { Ok(f()) } else { blocking(f).await }
}

/// The first way `now` differs from `before`, for the refusal message.
fn plan_difference(before: &TaskPlan, now: &TaskPlan) -> String {
    if before.epochs != now.epochs {
        return format!("epochs {} before, {} now", before.epochs, now.epochs);
    }
    if before.seed != now.seed {
        return format!("seed {} before, {} now", before.seed, now.seed);
    }
    if before.pieces.len() != now.pieces.len() {
        return format!(
            "{} pieces before, {} now (a different task_bytes or data?)",
            before.pieces.len(),
            now.pieces.len()
        );
    }
    match before.pieces.iter().zip(&now.pieces).position(|(a, b)| a != b) {
        Some(i) => format!("piece {i} was {:?}, now {:?}", before.pieces[i], now.pieces[i]),
        None => "no difference".into(),
    }
}
