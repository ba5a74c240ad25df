//! The gRPC service: one handler per RPC of `proto/gradflow.proto`.
//!
//! Handlers stay thin: they check the request, wait on the [`Coordinator`] where the mode says
//! so, and hand the math on the [`ShardModel`] to blocking threads. Errors are [`PsError`]s,
//! turned into statuses in `error.rs`.

use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use futures::Stream;
use gradflow_core::{Mode, ModelSpec};
use gradflow_proto::{codec, pb};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info};

use crate::checkpointing::{Checkpointer, Restored};
use crate::coord::{Coordinator, StepTicket};
use crate::metrics::Metrics;
use crate::model::{ShardModel, SparseAccum};
use crate::push::{self, ValidPush, check_ids_on_shard, validate};
use crate::tasks::{Handout, Piece, SavedTasks, TaskPlan, TaskQueue};
use crate::{PsError, ServerConfig};

/// The state of one shard, shared by all handlers and background tasks.
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
}

impl Shard {
    /// A shard with no model yet (the first worker declares it), or one restored from a
    /// checkpoint.
    pub fn new(config: ServerConfig, restored: Option<Restored>) -> Result<Shard, PsError> {
        let coord = Coordinator::new(
            config.mode,
            config.num_workers,
            config.max_staleness,
            config.heartbeat_timeout,
            config.startup_timeout,
        )
        .with_backup_workers(config.backup_workers);
        let version = restored.as_ref().map_or(0, |r| r.version);
        if let Some(r) = &restored {
            r.model.set_check_finite(config.reject_non_finite);
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
            model: RwLock::new(restored.map(|r| Arc::new(r.model))),
            declare_lock: tokio::sync::Mutex::new(()),
            checkpointer,
            tasks: Mutex::new(None),
            link_port: 0,
        })
    }

    /// The data-task progress to save with a checkpoint (shard 0 with dynamic sharding).
    fn tasks_state(&self) -> Option<SavedTasks> {
        let tasks = self.tasks.lock().unwrap();
        match &*tasks {
            Some(q) => Some(q.save()),
            // Declared by no one yet after a restore: keep what the checkpoint had.
            None => self.restored_tasks.lock().unwrap().clone(),
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
                ck.take(slot, &model, version, shard.tasks_state());
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
                c.take(slot, &model, step + 1, shard.tasks_state());
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

/// The tonic service; cheap to clone.
#[derive(Clone)]
pub struct Service {
    pub shard: Arc<Shard>,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::DenseChunk, Status>> + Send>>;

#[tonic::async_trait]
impl gradflow_proto::ParameterServer for Service {
    async fn declare_spec(
        &self,
        request: Request<pb::DeclareSpecRequest>,
    ) -> Result<Response<pb::DeclareSpecResponse>, Status> {
        let req = request.into_inner();
        let shard = &self.shard;
        let cfg = &shard.config;
        if req.num_shards != cfg.num_shards || req.shard != cfg.shard {
            return Err(PsError::SpecMismatch(format!(
                "the worker believes this is shard {} of {}, but it is shard {} of {}: check the order of server addresses",
                req.shard, req.num_shards, cfg.shard, cfg.num_shards
            ))
            .into());
        }
        if req.partition_bytes < 1024 {
            return Err(PsError::InvalidArgument(format!(
                "partition_bytes is {}; expected at least 1024",
                req.partition_bytes
            ))
            .into());
        }
        let spec: ModelSpec = serde_json::from_str(&req.spec_json).map_err(|e| {
            PsError::InvalidSpec(format!("model spec is not valid JSON for a ModelSpec: {e}"))
        })?;
        spec.validate().map_err(|e| PsError::InvalidSpec(e.to_string()))?;
        shard.touch(req.worker)?;
        if let Some(ck) = &shard.checkpointer {
            ck.set_peers(&req.servers);
        }

        let _guard = shard.declare_lock.lock().await;
        if let Some(existing) = shard.declared() {
            if let Some(diff) = existing.spec.first_difference(&spec) {
                return Err(PsError::SpecMismatch(format!(
                    "model spec differs from the one already declared: {diff}"
                ))
                .into());
            }
            if existing.placement.partition_bytes != req.partition_bytes {
                return Err(PsError::SpecMismatch(format!(
                    "partition_bytes is {} but the model was declared with {}",
                    req.partition_bytes, existing.placement.partition_bytes
                ))
                .into());
            }
            return Ok(Response::new(pb::DeclareSpecResponse {
                created: false,
                version: shard.coord.version(),
            }));
        }
        let (n, s, pb_) = (cfg.num_shards, cfg.shard, req.partition_bytes);
        let max_message = cfg.transport.max_message_bytes as u64;
        ShardModel::check_fits(&spec, n, s, pb_, cfg.memory_budget(), max_message)?;
        let model = blocking(move || ShardModel::new(spec, n, s, pb_)).await?;
        model.set_check_finite(cfg.reject_non_finite);
        info!(
            dense_tensors = model.spec.dense.len(),
            pieces = model.pieces.len(),
            dense_bytes = model.dense_bytes(),
            sparse_tables = model.tables.len(),
            worker = req.worker,
            "model declared"
        );
        *shard.model.write().unwrap() = Some(Arc::new(model));
        Ok(Response::new(pb::DeclareSpecResponse { created: true, version: shard.coord.version() }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = request.into_inner();
        self.shard.touch(req.worker)?;
        Ok(Response::new(pb::HeartbeatResponse {
            version: self.shard.coord.version(),
            live_workers: self.shard.coord.live_workers().len() as u32,
        }))
    }

    type PullDenseStream = ChunkStream;

    async fn pull_dense(
        &self,
        request: Request<pb::PullDenseRequest>,
    ) -> Result<Response<Self::PullDenseStream>, Status> {
        let started = Instant::now();
        let req = request.into_inner();
        let shard = self.shard.clone();
        let (model, pieces, version) = self.dense_pull(&req).await?;
        let bytes: u64 = pieces.iter().map(|&i| model.pieces[i].len as u64 * 4).sum();
        let chunk_elems = shard.config.transport.chunk_bytes / 4;
        let metrics = shard.metrics.clone();
        let done = move |sent: Option<u64>| {
            if let Some(sent) = sent {
                metrics.bytes_sent.inc_by(sent);
                metrics.observe_pull("dense", started.elapsed());
            }
        };
        if bytes <= shard.config.inline_bytes {
            let mut chunks = Vec::new();
            done(read_chunks(&model, &pieces, chunk_elems, version, |c| {
                chunks.push(Ok(c));
                true
            }));
            return Ok(Response::new(Box::pin(tokio_stream::iter(chunks))));
        }
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            done(read_chunks(&model, &pieces, chunk_elems, version, |c| tx.blocking_send(Ok(c)).is_ok()))
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn pull_sparse(
        &self,
        request: Request<pb::PullSparseRequest>,
    ) -> Result<Response<pb::PullSparseResponse>, Status> {
        let (tables, version) = self.sparse_pull(request.into_inner()).await?;
        Ok(Response::new(pb::PullSparseResponse { tables, version }))
    }

    async fn push(
        &self,
        request: Request<Streaming<pb::PushRequest>>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        let started = Instant::now();
        let mut stream = request.into_inner();
        let mut msgs = Vec::new();
        let mut refused = None;
        while let Some(msg) = stream.next().await {
            let msg = msg?;
            // Checked as each message arrives, while its bytes are in the cache.
            if let Some(e) = self.non_finite(&msg) {
                refused = Some(e);
                break;
            }
            msgs.push(msg);
        }
        let result = self.take_push(refused.map_or(Ok(msgs), Err), started).await;
        Ok(Response::new(pb::PushResponse { version: result? }))
    }

    async fn leave(&self, request: Request<pb::LeaveRequest>) -> Result<Response<pb::LeaveResponse>, Status> {
        let req = request.into_inner();
        if let Some(ticket) = self.shard.coord.leave(req.worker, req.pause)? {
            self.shard.complete_step(ticket).await?;
        }
        self.shard.metrics.live_workers.set(self.shard.coord.live_workers().len() as i64);
        Ok(Response::new(pb::LeaveResponse {}))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let shard = &self.shard;
        let model = shard.declared();
        Ok(Response::new(pb::StatusResponse {
            shard: shard.config.shard,
            num_shards: shard.config.num_shards,
            mode: shard.config.mode.to_string(),
            version: shard.coord.version(),
            declared: model.is_some(),
            live_workers: shard.coord.live_workers(),
            dense_bytes: model.as_ref().map_or(0, |m| m.dense_bytes()),
            sparse_rows: model.as_ref().map_or(0, |m| m.sparse_rows()),
            num_workers: shard.coord.num_workers(),
            link_port: u32::from(shard.link_port),
        }))
    }

    async fn checkpoint(
        &self,
        request: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointResponse>, Status> {
        let target = request.into_inner().step;
        let shard = self.shard.clone();
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
            return Err(PsError::CheckpointPassed { requested: target, current: version }.into());
        }
        ck.request(target);
        let version = shard.coord.version();
        if version >= target && shard.coord.between_steps() {
            shard.checkpoint_if_due(version, true).await;
        }
        // Until written; in sync mode the shard may also have passed the step before the
        // request was in (a step completing meanwhile), which the caller must hear about.
        let deadline = tokio::time::Instant::now() + shard.config.wait_timeout;
        loop {
            let written = ck.written();
            if written >= target {
                return Ok(Response::new(pb::CheckpointResponse { step: written }));
            }
            let version = shard.coord.version();
            if shard.config.mode == Mode::Sync && ck.missed(target, version) {
                let reason = format!(
                    "shard {} was at step {version} when step {target} was asked for",
                    shard.config.shard
                );
                ck.give_up(target, &reason, true).await;
                return Err(PsError::CheckpointPassed { requested: target, current: version }.into());
            }
            if ck.stopping() {
                return Err(PsError::ShuttingDown.into());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(PsError::WaitTimeout(shard.config.wait_timeout).into());
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    async fn declare_tasks(
        &self,
        request: Request<pb::DeclareTasksRequest>,
    ) -> Result<Response<pb::DeclareTasksResponse>, Status> {
        let created = self.declare_tasks_inner(request.into_inner())?;
        Ok(Response::new(pb::DeclareTasksResponse { created }))
    }

    async fn next_task(
        &self,
        request: Request<pb::NextTaskRequest>,
    ) -> Result<Response<pb::NextTaskResponse>, Status> {
        Ok(Response::new(self.next_task_inner(request.into_inner())?))
    }
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

impl Service {
    fn declare_tasks_inner(&self, req: pb::DeclareTasksRequest) -> Result<bool, PsError> {
        let shard = &self.shard;
        shard.touch(req.worker)?;
        let plan = TaskPlan {
            pieces: req
                .pieces
                .into_iter()
                .map(|p| Piece { path: p.path, start: p.start, end: p.end })
                .collect(),
            epochs: req.epochs,
            seed: req.seed,
        };
        plan.validate()?;
        let mut tasks = shard.task_queue()?;
        let differs = |have: &TaskPlan, source: &str| {
            PsError::SpecMismatch(format!(
                "the data tasks differ from the ones {source}: {}",
                plan_difference(have, &plan)
            ))
        };
        if let Some(q) = tasks.as_ref() {
            return if q.plan() == &plan { Ok(false) } else { Err(differs(q.plan(), "already declared")) };
        }
        let queue = match shard.restored_tasks.lock().unwrap().take() {
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

    fn next_task_inner(&self, req: pb::NextTaskRequest) -> Result<pb::NextTaskResponse, PsError> {
        let shard = &self.shard;
        shard.touch(req.worker)?;
        // Paused workers are idle, not gone: a scoring they were given stays theirs.
        let live = shard.coord.alive_workers();
        let mut tasks = shard.task_queue()?;
        let queue = tasks.as_mut().ok_or(PsError::NoTasks)?;
        let scored = req.scored_epoch.checked_sub(1);
        let (handout, completed) = queue.next(req.worker, req.done_lease, scored, |w| live.contains(&w));
        let mut resp = pb::NextTaskResponse {
            completed_epoch: completed.map_or(0, |(e, _)| e + 1),
            completed_epoch_examples: completed.map_or(0, |(_, n)| n),
            ..Default::default()
        };
        match handout {
            Handout::Task(t) => {
                debug!(
                    worker = req.worker,
                    epoch = t.epoch,
                    piece = t.piece_index,
                    skip = t.skip_examples,
                    "task handed out"
                );
                resp.state = pb::next_task_response::State::Task as i32;
                resp.lease = t.lease;
                resp.epoch = t.epoch;
                resp.piece_index = t.piece_index;
                resp.piece =
                    Some(pb::TaskPiece { path: t.piece.path, start: t.piece.start, end: t.piece.end });
                resp.skip_examples = t.skip_examples;
            }
            Handout::Wait => resp.state = pb::next_task_response::State::Wait as i32,
            Handout::Finished => resp.state = pb::next_task_response::State::Finished as i32,
        }
        Ok(resp)
    }

    /// A dense pull's pieces (indices into `ShardModel::pieces`) and the model version to
    /// read, once the model has reached the requested step.
    pub(crate) async fn dense_pull(
        &self,
        req: &pb::PullDenseRequest,
    ) -> Result<(Arc<ShardModel>, Vec<usize>, u64), PsError> {
        let shard = &self.shard;
        shard.touch(req.worker)?;
        let model = shard.model()?;
        let pieces: Vec<usize> = if req.pieces.is_empty() {
            (0..model.pieces.len()).collect()
        } else {
            req.pieces.iter().map(|p| model.piece(&p.tensor, p.partition)).collect::<Result<_, _>>()?
        };
        let version = shard.coord.wait_for_step(req.worker, req.step, shard.config.wait_timeout).await?;
        model.healthy()?;
        Ok((model, pieces, version))
    }

    /// A sparse pull's rows, table by table in request order, and the model version they
    /// belong to, once the model has reached the requested step. Records the pull metrics.
    pub(crate) async fn sparse_pull(
        &self,
        req: pb::PullSparseRequest,
    ) -> Result<(Vec<pb::SparseRows>, u64), PsError> {
        let started = Instant::now();
        let shard = self.shard.clone();
        shard.touch(req.worker)?;
        let model = shard.model()?;
        let mut wanted = Vec::with_capacity(req.tables.len());
        for t in &req.tables {
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
        let version = shard.coord.wait_for_step(req.worker, req.step, shard.config.wait_timeout).await?;
        model.healthy()?;
        let bytes: u64 =
            wanted.iter().map(|(idx, ids)| (ids.len() * model.tables[*idx].dim * 4) as u64).sum();
        let tables = offload(bytes, shard.config.inline_bytes, move || {
            wanted
                .into_iter()
                .map(|(idx, ids)| {
                    let table = &model.tables[idx];
                    let mut values = Vec::with_capacity(ids.len() * table.dim * 4);
                    table.pull(&ids, &mut values);
                    pb::SparseRows { table: table.name.clone(), values: values.into() }
                })
                .collect::<Vec<_>>()
        })
        .await?;
        let sent: u64 = tables.iter().map(|t| t.values.len() as u64).sum();
        shard.metrics.bytes_sent.inc_by(sent);
        shard.metrics.observe_pull("sparse", started.elapsed());
        Ok((tables, version))
    }

    /// The refusal of a push message holding NaN or infinity, when this shard refuses them.
    pub(crate) fn non_finite(&self, msg: &pb::PushRequest) -> Option<PsError> {
        let name = self.shard.config.reject_non_finite.then(|| push::non_finite(msg)).flatten()?;
        Some(PsError::NonFinite(name.to_string()))
    }

    /// Takes one received push (or the refusal found while receiving it, see
    /// [`Service::non_finite`]): validates it whole, then adds it to the step (sync) or
    /// applies it (async). Records the push metrics.
    pub(crate) async fn take_push(
        &self,
        received: Result<Vec<pb::PushRequest>, PsError>,
        started: Instant,
    ) -> Result<u64, PsError> {
        let result = match received {
            Ok(msgs) => self.push_inner(msgs).await,
            Err(e) => Err(e),
        };
        self.shard.metrics.observe_push(result.is_ok(), started.elapsed());
        result
    }

    async fn push_inner(&self, msgs: Vec<pb::PushRequest>) -> Result<u64, PsError> {
        let shard = self.shard.clone();
        let model = shard.model()?;
        let worker = msgs.first().map(|m| m.worker).unwrap_or(0);
        if worker == gradflow_proto::OBSERVER {
            return Err(PsError::InvalidArgument("an observer cannot push gradients".into()));
        }
        shard.touch(worker)?;
        let task = msgs.first().and_then(|m| m.task);
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
        let received: u64 = msgs
            .iter()
            .flat_map(|m| {
                let dense = m.dense.iter().map(|d| d.data.len());
                dense.chain(m.sparse.iter().map(|g| g.ids.len() + g.values.len()))
            })
            .map(|n| n as u64)
            .sum();
        let push = offload(received, shard.config.inline_bytes, move || validate(&m, msgs)).await??;
        shard.metrics.bytes_received.inc_by(push.bytes);
        let (worker, step) = (push.worker, push.step);
        shard.coord.wait_for_step(worker, step, shard.config.wait_timeout).await?;
        match shard.config.mode {
            Mode::Sync => {
                // From the reservation of its slot to the end of the step it may complete, a
                // push runs on a task of its own, awaited here: this request may be cancelled
                // (its worker killed, the connection reset), and a push half-counted or a step
                // left applying would stop every worker for good.
                let task = async move {
                    shard.coord.begin_push(worker, step)?;
                    let m = model.clone();
                    let added =
                        offload(push.bytes, shard.config.inline_bytes, move || accumulate(&m, push)).await;
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
                offload(push.bytes, shard.config.inline_bytes, move || apply_now(&model, push)).await??;
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

/// Reads `pieces` of `model` in chunks of at most `chunk_elems` values and hands each to
/// `send`, which says whether the client still listens. The bytes sent, or `None` if the
/// client went away.
fn read_chunks(
    model: &ShardModel,
    pieces: &[usize],
    chunk_elems: usize,
    version: u64,
    mut send: impl FnMut(pb::DenseChunk) -> bool,
) -> Option<u64> {
    let mut sent = 0u64;
    for &idx in pieces {
        let piece = &model.pieces[idx];
        let mut start = 0;
        while start < piece.len {
            let n = chunk_elems.min(piece.len - start);
            let chunk = pb::DenseChunk {
                tensor: piece.tensor.clone(),
                partition: piece.partition,
                offset: start as u64,
                data: piece.read(start, n),
                version,
            };
            sent += n as u64 * 4;
            if !send(chunk) {
                return None;
            }
            start += n;
        }
    }
    Some(sent)
}

/// Sync: adds a validated push into the step's sums.
fn accumulate(model: &ShardModel, push: ValidPush) {
    for (idx, slices) in push.dense {
        model.pieces[idx].accumulate_push(&slices);
    }
    for (t, ids, values) in push.sparse {
        let table = &model.tables[t];
        table.accum.lock().unwrap().add(&ids, &values, table.dim);
    }
}

/// Async: applies a validated push at once.
fn apply_now(model: &ShardModel, push: ValidPush) -> Result<(), PsError> {
    let step = push.step;
    let fail = |tensor: &str, at: String, e| model.fail(tensor, at, step, e);
    let mut grad = Vec::new();
    for (idx, slices) in push.dense {
        let piece = &model.pieces[idx];
        // A piece that arrived whole and aligned is applied from the received bytes.
        if let [whole] = slices.as_slice()
            && let Some(g) = crate::model::as_f32s(whole)
        {
            piece
                .try_apply(g)
                .map_err(|e| fail(&piece.tensor, format!("partition {}", piece.partition), e))?;
            continue;
        }
        grad.clear();
        grad.resize(piece.len, 0.0);
        let mut offset = 0;
        for s in slices {
            let n = s.len() / 4;
            codec::copy_f32s(&mut grad[offset..offset + n], &s);
            offset += n;
        }
        piece
            .try_apply(&grad)
            .map_err(|e| fail(&piece.tensor, format!("partition {}", piece.partition), e))?;
    }
    for (t, ids, values) in push.sparse {
        let table = &model.tables[t];
        let mut acc = SparseAccum::default();
        acc.add(&ids, &values, table.dim);
        table.try_apply(&acc, 1.0).map_err(|(id, e)| fail(&table.name, format!("row {id}"), e))?;
    }
    Ok(())
}
