//! gradflow's launcher: one job file in, a running job out.
//!
//! The job file and the environment contract every process is started with are
//! gradflow-job's ([`gradflow_job::JobConfig`], [`gradflow_job::contract`]); this crate runs
//! them.
//!
//! - [`servers`]: each server shard's settings, built from the job.
//! - [`prepare`]: synthetic data written and data files checked before anything starts.
//! - [`guard`]: one run of a job at a time: the run's leases on its output folder and
//!   checkpoint root, and the check that it does not write over an earlier run's checkpoints.
//! - [`local`]: the default backend: the job's servers and workers as child processes on
//!   this machine.
//! - [`metrics`]: the local launcher's Prometheus `/metrics` (job state, restarts, progress).
//! - [`state`]: a local job's state record and log files, what `gradflow status JOB.toml` and
//!   `gradflow logs JOB.toml` read.
//! - [`kubernetes`]: the second backend: the same job as pods on a Kubernetes cluster.

pub mod error;
pub mod guard;
pub mod kubernetes;
pub mod local;
pub mod metrics;
pub mod prepare;
pub mod servers;
pub mod state;

use std::path::Path;

use gradflow_job::{JobConfig, JobError};

pub use error::LaunchError;
pub use servers::server_config;

/// Reads a job file as the launcher's commands do: [`JobConfig::load`], and its
/// `[kubernetes]` section read as the Kubernetes backend will read it, so that an unknown key
/// or a value of the wrong type there is an error even for a job that runs locally. (The
/// Kubernetes backend's own reading, with paths inside the pods, is
/// [`kubernetes::config::load_job`].)
pub fn load_job(path: &Path) -> Result<JobConfig, LaunchError> {
    let job = JobConfig::load(path)?;
    if job.kubernetes.is_some() {
        let in_file = |error| JobError::File { path: path.to_path_buf(), error: Box::new(error) };
        let text = std::fs::read_to_string(path).map_err(|e| in_file(JobError::Io(e)))?;
        kubernetes::KubernetesConfig::from_toml(&text).map_err(in_file)?;
    }
    Ok(job)
}
