//! `gradflow worker`: one worker of a job, training a built-in model.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;

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
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    super::init_logging("info");
    let (job, index, servers) = match super::cluster_from_env()? {
        Some(spec) => (spec.job_config, spec.index, spec.servers),
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
            (job, args.index, args.servers)
        }
    };
    if let Some(tls) = job.client_tls()
        && std::env::var_os(gradflow_launch::contract::ENV_TLS_CA).is_none()
    {
        // The trainer's client takes its TLS settings from the environment, as a trainer of
        // your own does; a launcher sets them, a worker started by hand gets them here.
        for (key, value) in tls.to_env() {
            // SAFETY: no other thread runs yet (the runtime starts below), so nothing reads
            // the environment while it changes.
            unsafe { std::env::set_var(key, value) };
        }
    }
    super::runtime()?.block_on(async move {
        let summary = gradflow_trainer::run_worker(&job, index, servers).await?;
        tracing::info!(steps = summary.steps, samples = summary.samples, "worker finished");
        Ok(ExitCode::SUCCESS)
    })
}
