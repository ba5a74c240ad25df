//! `gradflow worker`: one worker of a job, training a built-in model.
//!
//! Its exit code tells a launcher whether starting it again could help: 0 done, 3 for an
//! error that would repeat (the data, the job's configuration, the model and the data
//! disagreeing), 1 for others (a server gone, the network).

use std::path::PathBuf;
use std::process::ExitCode;

use std::net::SocketAddr;

use anyhow::{Context, bail};

/// Exit code of a worker that failed in a way a restart would repeat: the launcher does not
/// restart it.
const EXIT_NO_RESTART: u8 = gradflow_job::contract::EXIT_NO_RESTART as u8;

/// Run one worker of a job: read its share of the data, train, report progress.
///
/// Started by `gradflow launch` (or a Kubernetes pod) with GRADFLOW_CLUSTER_SPEC in the
/// environment; the flags are for running a worker by hand against running servers.
#[derive(clap::Args)]
pub struct Args {
    /// Job file (ignored when GRADFLOW_CLUSTER_SPEC is set).
    #[arg(long)]
    job: Option<PathBuf>,
    /// This worker's index.
    #[arg(long, default_value_t = 0)]
    index: u32,
    /// Server addresses in shard order, comma-separated.
    #[arg(long, value_delimiter = ',')]
    servers: Vec<String>,
    /// Serve Prometheus metrics on this address (plain HTTP `/metrics`; port 0 picks a free
    /// one). Under a launcher the cluster spec says where.
    #[arg(long)]
    metrics: Option<SocketAddr>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    super::init_logging("info");
    let (job, index, servers, metrics) = match setup(args) {
        Ok(found) => found,
        Err(e) => {
            // A job that cannot be read or does not fit its environment stays that way.
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(EXIT_NO_RESTART));
        }
    };
    let trained = super::runtime()?.block_on(gradflow_trainer::run_worker(&job, index, servers, metrics));
    match trained {
        Ok(summary) => {
            tracing::info!(steps = summary.steps, samples = summary.samples, "worker finished");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(if e.will_repeat() { ExitCode::from(EXIT_NO_RESTART) } else { ExitCode::FAILURE })
        }
    }
}

/// The job, this worker's index, the servers and where to serve `/metrics`: from the
/// launcher's environment, else from the flags.
#[allow(clippy::type_complexity)]
fn setup(args: Args) -> anyhow::Result<(gradflow_job::JobConfig, u32, Vec<String>, Option<SocketAddr>)> {
    let metrics_flag = args.metrics;
    let (job, index, servers, metrics) = match super::cluster_from_env()? {
        Some(spec) => {
            let metrics = match spec.metrics_listen.as_deref() {
                Some(m) => {
                    Some(m.parse().context("GRADFLOW_CLUSTER_SPEC: metrics_listen is not an address")?)
                }
                None => None,
            };
            (spec.job_config, spec.index, spec.servers, metrics)
        }
        None => {
            let Some(path) = args.job else {
                bail!("no job: pass --job JOB.toml --servers ADDR,..., or run under `gradflow launch`");
            };
            let job = super::load_job(&path)?;
            if args.index >= job.workers {
                bail!("--index {} is out of range: the job has {} workers", args.index, job.workers);
            }
            if args.servers.len() != job.servers as usize {
                bail!(
                    "--servers lists {} addresses; the job has {} servers",
                    args.servers.len(),
                    job.servers
                );
            }
            (job, args.index, args.servers, metrics_flag)
        }
    };
    // The job's [tls] section, if any, reaches the trainer's client with the job
    // (`WorkerConfig::tls`).
    Ok((job, index, servers, metrics))
}
