//! One module per subcommand, plus what they share.

pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod eval;
pub mod kube;
pub mod launch;
pub mod predict;
pub mod ps;
pub mod serve;
pub mod worker;

use std::path::Path;

use anyhow::Context;
use gradflow_job::{ClusterSpec, JobConfig};

/// Logs go to stderr; the filter comes from `GRADFLOW_LOG` (set by the launcher from the job
/// file), else `RUST_LOG`, else `default`.
pub fn init_logging(default: &str) {
    let filter = std::env::var(gradflow_job::contract::ENV_LOG)
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or(default.into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// The cluster spec from the environment, if a launcher set one.
pub fn cluster_from_env() -> anyhow::Result<Option<ClusterSpec>> {
    if std::env::var_os(gradflow_job::contract::ENV_CLUSTER_SPEC).is_none() {
        return Ok(None);
    }
    Ok(Some(ClusterSpec::from_env()?))
}

/// A job file, read as every command reads one (see [`gradflow_launch::load_job`]).
pub fn load_job(path: &Path) -> anyhow::Result<JobConfig> {
    Ok(gradflow_launch::load_job(path)?)
}

/// A multi-threaded runtime sized to the machine; compute runs on rayon next to it.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}
