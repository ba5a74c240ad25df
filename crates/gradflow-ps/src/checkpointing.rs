//! When a shard writes checkpoints, and restoring one at start.
//!
//! A checkpoint is taken between steps: the shard copies its model (a memcpy, on a blocking
//! thread) and training goes on while the copy is written in the background. At most one
//! upload is in flight; a checkpoint that falls due while one is still uploading is skipped
//! (and logged), so memory stays bounded at one copy of the shard. Every shard writes its own
//! files; shard 0 then waits for all of them and writes the manifest and the `latest` pointer
//! (gradflow-checkpoint makes the order safe: a checkpoint without its manifest does not exist).
//!
//! In sync mode all shards checkpoint the same model version (a consistent cut): the trigger
//! is a function of the version. In async mode each shard checkpoints on its own.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use gradflow_checkpoint::{CheckpointStore, ShardSnapshot};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::CheckpointConfig;
use crate::model::ShardModel;
use crate::tasks::SavedTasks;
use crate::{PsError, ServerConfig};

/// The name of the data-task progress ([`SavedTasks`], JSON) among a checkpoint's extras;
/// shard 0 writes it when the job uses dynamic data sharding.
pub const TASKS_EXTRA: &str = "data_tasks.json";

/// Fault injection for tests: a server whose environment sets this to a step, on its first
/// attempt (`GRADFLOW_ATTEMPT` unset or 0), writes its files of that step's checkpoint and then
/// stalls forever before the checkpoint is finalized, so that a test can kill it mid-write.
pub const ENV_FAULT_STALL_UPLOAD: &str = "GRADFLOW_FAULT_STALL_UPLOAD";

fn stall_at_from_env() -> Option<u64> {
    let first_attempt = std::env::var("GRADFLOW_ATTEMPT").map_or(true, |a| a.trim() == "0");
    let step = std::env::var(ENV_FAULT_STALL_UPLOAD).ok()?.trim().parse().ok()?;
    first_attempt.then_some(step)
}

struct State {
    /// Version of the last checkpoint taken (or restored).
    last_version: u64,
    last_time: Instant,
    /// A requested checkpoint: taken when the version reaches this.
    requested: Option<u64>,
    uploading: bool,
}

pub struct Checkpointer {
    pub store: CheckpointStore,
    config: CheckpointConfig,
    shard: u32,
    num_shards: u32,
    state: Mutex<State>,
    /// The version of the last checkpoint this shard finished writing.
    written: watch::Sender<u64>,
    /// Held while an upload runs, so shutdown can wait for it.
    upload_lock: tokio::sync::Mutex<()>,
    /// See [`ENV_FAULT_STALL_UPLOAD`].
    stall_at: Option<u64>,
    mode: gradflow_core::Mode,
}

impl Checkpointer {
    pub fn new(config: &ServerConfig, start_version: u64) -> Result<Option<Checkpointer>, PsError> {
        let Some(c) = &config.checkpoint else { return Ok(None) };
        let store = CheckpointStore::open(&c.url).map_err(|e| PsError::Internal(e.to_string()))?;
        Ok(Some(Checkpointer {
            store,
            config: c.clone(),
            shard: config.shard,
            num_shards: config.num_shards,
            state: Mutex::new(State {
                last_version: start_version,
                last_time: Instant::now(),
                requested: None,
                uploading: false,
            }),
            written: watch::channel(start_version).0,
            mode: config.mode,
            upload_lock: tokio::sync::Mutex::new(()),
            stall_at: stall_at_from_env(),
        }))
    }

    /// Whether a checkpoint of `version` is due.
    pub fn due(&self, version: u64) -> bool {
        let s = self.state.lock().unwrap();
        if version <= s.last_version {
            return false;
        }
        // Sync: a requested checkpoint is of exactly that version, as on every other shard; a
        // shard that passed it without taking it says so to the caller (see `missed`).
        let requested = match (self.mode, s.requested) {
            (gradflow_core::Mode::Sync, Some(r)) => version == r,
            (_, Some(r)) => version >= r,
            (_, None) => false,
        };
        requested
            || self.config.every_steps.is_some_and(|n| version % n == 0)
            || self.config.every.is_some_and(|t| s.last_time.elapsed() >= t)
    }

    /// Asks for a checkpoint when the model reaches `version`, replacing an earlier request
    /// (a caller that found one shard past its first choice asks all of them again).
    pub fn request(&self, version: u64) {
        self.state.lock().unwrap().requested = Some(version);
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

    /// Waits until this shard has written a checkpoint of at least `version`.
    pub async fn wait_written(&self, version: u64, timeout: std::time::Duration) -> Result<u64, PsError> {
        let mut rx = self.written.subscribe();
        match tokio::time::timeout(timeout, rx.wait_for(|v| *v >= version)).await {
            Ok(Ok(v)) => Ok(*v),
            Ok(Err(_)) => Err(PsError::ShuttingDown),
            Err(_) => Err(PsError::WaitTimeout(timeout)),
        }
    }

    /// Waits until no upload is running.
    pub async fn wait_idle(&self) {
        let _ = self.upload_lock.lock().await;
    }

    /// The model changed since the last checkpoint.
    pub fn stale(&self, version: u64) -> bool {
        version > self.state.lock().unwrap().last_version
    }

    pub fn on_shutdown(&self) -> bool {
        self.config.on_shutdown
    }

    /// Copies `model` at `version` if no upload is in flight; the caller is on a blocking
    /// thread between steps.
    pub fn take(&self, model: &ShardModel, version: u64, mode: gradflow_core::Mode) -> Option<ShardSnapshot> {
        let mut s = self.state.lock().unwrap();
        if s.uploading {
            warn!(version, "checkpoint skipped: the previous one is still uploading");
            return None;
        }
        // Async shards reach a due version at different moments, and one may pass it while
        // an upload is in flight: name the checkpoint after the version that was due, so that
        // every shard writes into the same checkpoint. (Sync shards snapshot exactly there.)
        let name = match (mode, s.requested, self.config.every_steps) {
            (gradflow_core::Mode::Async, Some(r), _) if version >= r && r > s.last_version => r,
            (gradflow_core::Mode::Async, _, Some(n)) if version - version % n > s.last_version => {
                version - version % n
            }
            _ => version,
        };
        s.uploading = true;
        s.last_version = version;
        s.last_time = Instant::now();
        if s.requested.is_some_and(|r| version >= r) {
            s.requested = None;
        }
        drop(s);
        Some(model.snapshot(name, mode))
    }

    /// Writes a snapshot taken by [`Checkpointer::take`], and with it `tasks`, the data-task
    /// progress at the same model version (shard 0 of a job with dynamic data sharding);
    /// shard 0 also finalizes the checkpoint.
    pub async fn upload(
        self: &Arc<Self>,
        snap: ShardSnapshot,
        tasks: Option<SavedTasks>,
    ) -> Result<(), PsError> {
        let version = snap.version;
        let started = Instant::now();
        let _uploading = self.upload_lock.lock().await;
        let result = async {
            self.store.write_shard(version, &snap).await.map_err(|e| PsError::Internal(e.to_string()))?;
            drop(snap);
            if let Some(tasks) = tasks {
                let json = serde_json::to_vec(&tasks).expect("task state serializes");
                self.store
                    .put_extra(version, TASKS_EXTRA, json)
                    .await
                    .map_err(|e| PsError::Internal(e.to_string()))?;
            }
            if self.stall_at == Some(version) {
                warn!(step = version, "{ENV_FAULT_STALL_UPLOAD}: stalling this checkpoint's upload forever");
                std::future::pending::<()>().await;
            }
            if self.shard == 0 {
                self.store
                    .finalize(version, self.num_shards, self.config.keep, self.config.finalize_timeout)
                    .await
                    .map_err(|e| PsError::Internal(e.to_string()))?;
            }
            Ok::<_, PsError>(())
        }
        .await;
        self.state.lock().unwrap().uploading = false;
        match &result {
            Ok(()) => {
                info!(step = version, elapsed = ?started.elapsed(), "checkpoint written");
                self.written.send_modify(|v| *v = (*v).max(version));
            }
            Err(e) => {
                error!(step = version, error = %e, "checkpoint failed; the previous one stays the latest")
            }
        }
        result
    }
}

/// What a shard starts from when it restores a checkpoint.
pub struct Restored {
    pub model: ShardModel,
    pub version: u64,
    /// Shard 0 of a job with dynamic data sharding: the data tasks done at that version.
    pub tasks: Option<SavedTasks>,
}

/// Loads the checkpoint `which` (latest, a step, or a URL) for this shard.
pub async fn restore(config: &ServerConfig, which: &str) -> Result<Restored, PsError> {
    let (store, which) = match &config.checkpoint {
        Some(c) if !which.contains("://") => (CheckpointStore::open(&c.url), which.to_string()),
        _ => (CheckpointStore::open(which), which.to_string()),
    };
    let store = store.map_err(|e| PsError::Internal(e.to_string()))?;
    let manifest = store.resolve(&which).await.map_err(|e| PsError::Internal(e.to_string()))?;
    let snap = store
        .load_shard(&manifest, config.shard, config.num_shards, manifest.partition_bytes)
        .await
        .map_err(|e| PsError::Internal(e.to_string()))?;
    let version = snap.version;
    let model = tokio::task::spawn_blocking(move || ShardModel::from_snapshot(snap))
        .await
        .map_err(|e| PsError::Internal(e.to_string()))??;
    let tasks = match config.shard {
        0 => match store
            .get_extra(&manifest, TASKS_EXTRA)
            .await
            .map_err(|e| PsError::Internal(e.to_string()))?
        {
            Some(json) => Some(serde_json::from_slice(&json).map_err(|e| {
                PsError::Internal(format!("{TASKS_EXTRA} of checkpoint {}: {e}", manifest.url()))
            })?),
            None => None,
        },
        _ => None,
    };
    info!(step = version, checkpoint = which, "model restored from checkpoint");
    Ok(Restored { model, version, tasks })
}
