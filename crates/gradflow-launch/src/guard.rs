//! One run of a job at a time: what the launcher does before it starts any process, so that
//! two runs never write into the same output folder or checkpoint root, and a new run never
//! writes over an earlier run's checkpoints.
//!
//! - [`RunGuard::acquire`] takes a lease ([`gradflow_checkpoint::lease`]) on the job's output
//!   folder and, with a `[checkpoint]` section, on its checkpoint root, for the run's id
//!   ([`gradflow_job::contract::new_run_id`]). A second launch of a running job is refused, naming the
//!   run that holds it. It also removes a `servers.json` that a killed launcher left behind.
//! - [`RunGuard::check_checkpoint_root`] refuses a run without `restore` into a root that holds
//!   checkpoints, or with `fresh` moves them into `<root>/archive/<earlier run id>/` first.

use gradflow_checkpoint::CheckpointStore;
use gradflow_checkpoint::lease::{ARCHIVE, Holder, Lease, LeaseError, LeaseOptions};

use gradflow_job::JobConfig;

use crate::LaunchError;
use crate::local::RunningJob;

/// The leases of one run; give them back with [`RunGuard::release`] when the run ends.
#[derive(Debug)]
pub struct RunGuard {
    run_id: String,
    output: Lease,
    /// The root, and its lease unless it is the output folder itself (one lease covers both).
    checkpoint: Option<(CheckpointStore, Option<Lease>)>,
    /// The run that held the checkpoint root before this one, read before this run took it.
    previous: Option<Holder>,
    /// Set once the run starts processes; a run refused before leaves the earlier run
    /// recorded as the root's last holder, so that `--fresh` names the archive after the run
    /// that wrote the checkpoints.
    started: bool,
}

/// This machine's name, for the lease records.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

fn in_use(job: &JobConfig, what: &str, e: LeaseError) -> LaunchError {
    match e {
        LeaseError::Held { .. } | LeaseError::HeldUnknown { .. } => LaunchError::InUse(format!(
            "this job is already running: its {what} {e}; wait for that run to end or stop it"
        )),
        other => LaunchError::InUse(format!("cannot claim the {what} of job {}: {other}", job.name)),
    }
}

impl RunGuard {
    /// Takes the output folder's and the checkpoint root's leases for run `run_id`.
    /// Must be called inside a tokio runtime.
    pub async fn acquire(job: &JobConfig, run_id: &str) -> Result<RunGuard, LaunchError> {
        let holder = Holder::this_process(run_id, hostname());
        let dir = job.output_dir();
        let output = Lease::acquire_dir(&dir, &holder).map_err(|e| in_use(job, "output folder", e))?;
        let (checkpoint, previous) = match &job.checkpoint {
            None => (None, None),
            Some(ck) => {
                let store = CheckpointStore::open(&ck.url)
                    .map_err(|e| LaunchError::JobFailed(format!("checkpoint.url: {e}")))?;
                let previous = Lease::last_holder(&store).await.ok().flatten();
                let same_folder = std::fs::canonicalize(&dir).is_ok_and(|d| d.to_str() == Some(store.url()));
                let lease = match same_folder {
                    true => None,
                    false => Some(
                        Lease::acquire(&store, &holder, &LeaseOptions::default())
                            .await
                            .map_err(|e| in_use(job, "checkpoint root", e))?,
                    ),
                };
                (Some((store, lease)), previous)
            }
        };
        Ok(RunGuard { run_id: run_id.to_string(), output, checkpoint, previous, started: false })
    }

    /// The run's id.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Call when the run starts its processes (see [`RunGuard::release`]).
    pub fn mark_started(&mut self) {
        self.started = true;
    }

    /// Removes `servers.json` if a launcher that is gone left it: this run holds the output
    /// folder, so no other launcher of the job runs. Returns a line saying so, if it did.
    pub fn remove_stale_record(&self, job: &JobConfig) -> Option<String> {
        let path = RunningJob::path(job);
        let text = std::fs::read_to_string(&path).ok()?;
        let _ = std::fs::remove_file(&path);
        let from = serde_json::from_str::<RunningJob>(&text)
            .map(|r| format!(" by the launcher with pid {}, which is gone", r.launcher_pid))
            .unwrap_or_default();
        Some(format!("removed {} left{from}", path.display()))
    }

    /// Before a run without `restore`: refuses a checkpoint root that holds checkpoints,
    /// unless `fresh`, which moves them (and `latest`) into `<root>/archive/<earlier run>/`.
    /// Returns a line saying what was moved, if anything was.
    pub async fn check_checkpoint_root(
        &self,
        job: &JobConfig,
        fresh: bool,
    ) -> Result<Option<String>, LaunchError> {
        let Some((store, _)) = &self.checkpoint else {
            return match fresh {
                true => Err(LaunchError::JobFailed(
                    "--fresh: the job has no [checkpoint] section, so there are no checkpoints to move aside"
                        .into(),
                )),
                false => Ok(None),
            };
        };
        if job.restore.is_some() {
            if fresh {
                return Err(LaunchError::JobFailed(format!(
                    "--fresh starts from scratch, but the job restores `{}`: drop one of them",
                    job.restore.as_ref().map(ToString::to_string).unwrap_or_default()
                )));
            }
            return Ok(None);
        }
        let found =
            store.list().await.map_err(|e| LaunchError::JobFailed(format!("checkpoint root: {e}")))?;
        let Some(newest) = found.last() else { return Ok(None) };
        let url = store.url();
        if !fresh {
            return Err(LaunchError::CheckpointRootUsed(format!(
                "checkpoint root `{url}` already holds {} checkpoint(s) of an earlier run (the newest: step {}, {}), \
                 and this job does not restore them. Set `restore = \"latest\"` to go on from them, set another \
                 [checkpoint] url, or run `gradflow launch --fresh` to move them into `{url}/{ARCHIVE}/<earlier run id>/` \
                 and start from scratch",
                found.len(),
                newest.step,
                newest.time.format("%Y-%m-%d %H:%M:%S UTC"),
            )));
        }
        let name = match &self.previous {
            Some(h) if h.run_id != self.run_id => h.run_id.clone(),
            _ => format!("before-{}", self.run_id),
        };
        let moved = gradflow_checkpoint::lease::archive(store, &name)
            .await
            .map_err(|e| LaunchError::JobFailed(format!("--fresh: {e}")))?;
        Ok(Some(format!(
            "--fresh: moved {moved} checkpoint(s) of the earlier run into {url}/{ARCHIVE}/{name}/"
        )))
    }

    /// Gives the leases back, recording this run as the checkpoint root's last holder if it
    /// started ([`RunGuard::mark_started`]), else the run before it. Returns a warning to print
    /// when the checkpoint root's lease was lost while the job ran (another run may have
    /// written into it).
    pub async fn release(self) -> Option<String> {
        let mut warning = None;
        if let Some((store, Some(lease))) = self.checkpoint {
            if lease.is_lost() {
                warning = Some(format!(
                    "the lease on checkpoint root `{}` could not be renewed while the job ran; another run may have written into it",
                    store.url()
                ));
            }
            let released = match self.started {
                true => lease.release().await,
                false => lease.release_restoring(self.previous.as_ref()).await,
            };
            if let Err(e) = released {
                warning.get_or_insert(format!("giving back the lease on `{}`: {e}", store.url()));
            }
        }
        drop(self.output);
        warning
    }
}
