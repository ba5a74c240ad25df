//! The control calls, over gRPC to every shard: declaring the model, leaving, holding a step
//! for scoring, checkpoints, status, and the heartbeats that keep this worker in the job.
//! Dynamic data sharding's calls to shard 0 are in [`crate::tasks`].

use std::sync::Arc;
use std::time::Duration;

use futures::future::try_join_all;
use gradflow_core::{ModelSpec, Placement};
use gradflow_proto::pb;
use tracing::{debug, info};

use crate::connection::Client;
use crate::{Worker, WorkerError};

/// An evaluation's score by the job's selection metric, reported with
/// [`Worker::scored_with`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Selection {
    pub metric: gradflow_core::Metric,
    pub value: f64,
    /// Checkpoint the model scored and keep the best such checkpoint (`[checkpoint] keep_best`).
    pub keep_best: bool,
}

impl Worker {
    /// Declares the model on every shard: creates it on the first call of the job, checks it
    /// on later ones (a different spec is refused with the first difference).
    pub async fn declare(&mut self, spec: ModelSpec) -> Result<(), WorkerError> {
        spec.validate().map_err(|e| WorkerError::InvalidSpec(e.to_string()))?;
        let json = serde_json::to_string(&spec).map_err(|e| WorkerError::InvalidSpec(e.to_string()))?;
        let n = self.shards.len() as u32;
        let me = self.config.worker;
        let pbytes = self.config.partition_bytes;
        let servers = &self.config.servers;
        try_join_all((0..self.shards.len()).map(|shard| {
            let json = json.clone();
            self.call(shard, "DeclareSpec", move |mut c| {
                let req = pb::DeclareSpecRequest {
                    worker: me,
                    spec_json: json.clone(),
                    partition_bytes: pbytes,
                    num_shards: n,
                    shard: shard as u32,
                    servers: servers.clone(),
                };
                async move { c.declare_spec(req).await }
            })
        }))
        .await?;
        let placement = Placement::new(&spec, n, pbytes);
        self.model = Some(Arc::new((spec, placement)));
        Ok(())
    }

    /// Declares what a predictor needs beside the parameters (a JSON object: gradflow-models'
    /// `ServingInfo`) to shard 0, which writes it into every checkpoint from then on. Worker 0
    /// calls it after [`Worker::declare`].
    pub async fn declare_serving(&self, serving_json: &str) -> Result<(), WorkerError> {
        let worker = self.config.worker;
        let json = serving_json.to_string();
        self.call(0, "DeclareServing", move |mut c| {
            let req = pb::DeclareServingRequest { worker, serving_json: json.clone() };
            async move { c.declare_serving(req).await }
        })
        .await?;
        Ok(())
    }

    /// Tells every shard this worker is done, so sync steps stop waiting for it.
    pub async fn leave(self) -> Result<(), WorkerError> {
        let me = self.config.worker;
        try_join_all((0..self.shards.len()).map(|shard| {
            self.call(shard, "Leave", move |mut c| async move {
                c.leave(pb::LeaveRequest { worker: me, pause: false }).await
            })
        }))
        .await?;
        info!(worker = me, step = self.current_step(), "left the job");
        Ok(())
    }

    /// Static data sharding, the scorer: the batch of step `step` ends epoch `epoch`
    /// (0-based). Before that batch is pushed, every shard holds the next step (sync mode):
    /// it does not complete without this worker's push of it (or its leaving), so the model
    /// stays the epoch's end model while it is scored, even if this worker is killed
    /// meanwhile and restarted.
    pub async fn hold_for_scoring(&self, epoch: u64, step: u64) -> Result<(), WorkerError> {
        self.score_call(epoch, step, false, None, false).await.map(|_| ())
    }

    /// Records on every shard that epoch `epoch` is scored (shard 0 counts scored epochs).
    pub async fn scored(&self, epoch: u64, step: u64) -> Result<(), WorkerError> {
        self.score_call(epoch, step, true, None, false).await.map(|_| ())
    }

    /// Records on every shard that epoch `epoch` is scored, with its score by the job's
    /// selection metric: shard 0 compares it with the best so far, and with
    /// [`Selection::keep_best`] every shard checkpoints the model scored (held since
    /// [`Worker::hold_for_scoring`]) and `best` follows the best such checkpoint. Returns the
    /// evaluations since the best one (0: this one is the best).
    pub async fn scored_with(&self, epoch: u64, step: u64, selection: Selection) -> Result<u64, WorkerError> {
        let selection = pb::Selection {
            metric: selection.metric.name().to_string(),
            value: selection.value,
            keep_best: selection.keep_best,
        };
        self.score_call(epoch, step, true, Some(selection), false).await
    }

    /// Early stopping, the scorer: ends training on every shard with the model it scored at the
    /// end of epoch `epoch` (held since [`Worker::hold_for_scoring`] at `step`). The other
    /// workers' pulls and pushes of later steps are refused from then on, which ends their
    /// training ([`WorkerError::finished_at`]); this worker stops pushing and leaves.
    pub async fn stop_training(&self, epoch: u64, step: u64) -> Result<(), WorkerError> {
        self.score_call(epoch, step, true, None, true).await.map(|_| ())
    }

    /// Shard 0's `since_best`.
    async fn score_call(
        &self,
        epoch: u64,
        step: u64,
        scored: bool,
        selection: Option<pb::Selection>,
        stop: bool,
    ) -> Result<u64, WorkerError> {
        let worker = self.config.worker;
        let answers = try_join_all((0..self.shards.len()).map(|shard| {
            let selection = selection.clone();
            self.call(shard, "Score", move |mut c| {
                let req =
                    pb::ScoreRequest { worker, epoch, step, scored, selection: selection.clone(), stop };
                async move { c.score(req).await }
            })
        }))
        .await?;
        Ok(answers.first().map_or(0, |a| a.get_ref().since_best))
    }

    /// Asks every shard for a checkpoint of model version `steps[shard]` (or the first step at
    /// or after it) and waits until each has written it; shard 0 answers once the whole
    /// checkpoint is complete. Returns the version each shard wrote. In sync mode ask every
    /// shard for the same version: that is what makes the checkpoint a consistent cut.
    pub async fn checkpoint(&self, steps: &[u64]) -> Result<Vec<u64>, WorkerError> {
        if steps.len() != self.shards.len() {
            return Err(WorkerError::Length {
                name: "checkpoint steps (one per shard)".into(),
                expected: self.shards.len(),
                got: steps.len(),
            });
        }
        try_join_all(steps.iter().enumerate().map(|(shard, &step)| async move {
            Ok(self
                .call(shard, "Checkpoint", |mut c| async move {
                    c.checkpoint(pb::CheckpointRequest { step }).await
                })
                .await?
                .into_inner()
                .step)
        }))
        .await
    }

    /// The status of every shard.
    pub async fn status(&self) -> Result<Vec<pb::StatusResponse>, WorkerError> {
        try_join_all((0..self.shards.len()).map(|shard| async move {
            Ok(self
                .call(shard, "Status", |mut c| async move { c.status(pb::StatusRequest {}).await })
                .await?
                .into_inner())
        }))
        .await
    }
}

/// Sends every shard a heartbeat with the worker's current step every `interval`, until
/// aborted (the worker is dropped). A failed heartbeat is only logged: the next one follows.
pub(crate) async fn heartbeat_loop(
    clients: Vec<Client>,
    worker: u32,
    interval: Duration,
    step: tokio::sync::watch::Receiver<u64>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let s = *step.borrow();
        for (shard, c) in clients.iter().enumerate() {
            let mut c = c.clone();
            tokio::spawn(async move {
                if let Err(e) = c.heartbeat(pb::HeartbeatRequest { worker, step: s }).await {
                    debug!(shard, "heartbeat failed: {}", e.message());
                }
            });
        }
    }
}
