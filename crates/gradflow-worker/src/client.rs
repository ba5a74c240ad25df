//! [`Worker`]: one training process's connection to every parameter-server shard.
//!
//! This file holds the struct, [`Worker::connect`] and the step the worker is on. What a
//! worker does is spread by role: `connection/` (one `Shard` per server: its transports and
//! the one place that chooses between them), `retry.rs` (the one retry loop), `step.rs`
//! (staging gradients and sending them), `pull.rs` (pulling parameters), `control.rs`
//! (declare, leave, scoring, checkpoints, status, heartbeats) and [`crate::tasks`] (dynamic
//! data sharding).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use gradflow_core::{ModelSpec, Placement};
use gradflow_proto::tls::ClientTls;
use gradflow_proto::{OBSERVER, pb};
use tokio::task::JoinHandle;
use tonic::Status;
use tracing::{info, warn};

use crate::config::ConfigError;
use crate::connection::{self, Client, Shard};
use crate::step::Staging;
pub use crate::step::StepOutcome;
use crate::{WorkerConfig, WorkerError};

/// A worker's connection to the parameter servers.
///
/// The usual loop: [`declare`](Worker::declare) once, then for every batch
/// [`pull_dense`](Worker::pull_dense) / [`pull_sparse`](Worker::pull_sparse), compute
/// gradients, [`push_dense`](Worker::push_dense) / [`push_sparse`](Worker::push_sparse), and
/// [`step`](Worker::step); finally [`leave`](Worker::leave). A model that can write its dense
/// gradient where it is sent from asks for that buffer with
/// [`push_dense_mut`](Worker::push_dense_mut) instead of `push_dense`, saving a copy.
pub struct Worker {
    pub(crate) config: WorkerConfig,
    /// One connection per shard, in shard order.
    pub(crate) shards: Vec<Shard>,
    pub(crate) model: Option<Arc<(ModelSpec, Placement)>>,
    /// Atomic so that a pull (`&self`) can follow a server's rewind.
    step: AtomicU64,
    pub(crate) staging: Staging,
    heartbeat: JoinHandle<()>,
    step_tx: tokio::sync::watch::Sender<u64>,
    /// Dynamic data sharding: the task progress the next push to shard 0 carries.
    pub(crate) task_progress: Option<pb::TaskProgress>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

impl Worker {
    /// Connects to every server, waiting up to `startup_timeout` for them to come up, and
    /// checks that each is the shard its position in `servers` says it is.
    pub async fn connect(config: WorkerConfig) -> Result<Worker, WorkerError> {
        config.validate()?;
        let mut config = config;
        if config.token.is_none() {
            config.token = gradflow_proto::auth::Token::from_env().map_err(ConfigError::Token)?;
        }
        if config.tls.is_none() {
            config.tls = ClientTls::from_env().map_err(ConfigError::from)?;
        }
        let shards = connection::connect(&config).await?;
        let (step_tx, step_rx) = tokio::sync::watch::channel(0u64);
        let heartbeat = if config.worker == OBSERVER {
            tokio::spawn(async {})
        } else {
            let clients = shards.iter().map(|s| s.client().clone()).collect();
            tokio::spawn(crate::control::heartbeat_loop(
                clients,
                config.worker,
                config.heartbeat_interval,
                step_rx,
            ))
        };
        info!(worker = config.worker, servers = ?config.servers, "connected to parameter servers");
        Ok(Worker {
            staging: Staging::new(shards.len()),
            config,
            shards,
            model: None,
            step: AtomicU64::new(0),
            heartbeat,
            step_tx,
            task_progress: None,
        })
    }

    /// This worker's index.
    pub fn index(&self) -> u32 {
        self.config.worker
    }

    /// Number of server shards.
    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    /// The step this worker is on: pulls wait for the model of this step (sync mode), and
    /// pushes are for it.
    pub fn current_step(&self) -> u64 {
        self.step.load(Ordering::Relaxed)
    }

    /// Sets the step, e.g. when resuming from a checkpoint or joining a running job.
    pub fn set_step(&mut self, step: u64) {
        self.move_to(step);
    }

    fn move_to(&self, step: u64) {
        self.step.store(step, Ordering::Relaxed);
        let _ = self.step_tx.send(step);
    }

    /// After a pull failed with `e`: if the servers were restored from a checkpoint and ask
    /// this worker to continue from its step, moves there and says to try again (a few times).
    pub(crate) fn follow_rewind(&self, e: &WorkerError, tries: &mut u32) -> bool {
        let Some(v) = e.rewind_target() else { return false };
        if *tries >= 3 {
            return false;
        }
        *tries += 1;
        warn!(
            worker = self.config.worker,
            from = self.current_step(),
            to = v,
            "servers were restored from a checkpoint; continuing from its step"
        );
        self.move_to(v);
        true
    }

    /// The declared spec.
    pub fn spec(&self) -> Result<&ModelSpec, WorkerError> {
        self.model.as_ref().map(|m| &m.0).ok_or(WorkerError::NotDeclared)
    }

    /// Where each dense piece lives (a pure function of the spec and the shard count).
    pub fn placement(&self) -> Result<&Placement, WorkerError> {
        self.model.as_ref().map(|m| &m.1).ok_or(WorkerError::NotDeclared)
    }

    /// Calls `f` on shard `shard`'s gRPC client, retrying transient failures.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        shard: usize,
        rpc: &'static str,
        f: F,
    ) -> Result<T, WorkerError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.shards[shard].call(rpc, f).await
    }
}
