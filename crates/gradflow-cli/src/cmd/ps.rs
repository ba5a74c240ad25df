//! `gradflow ps`: one parameter-server shard.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use gradflow_core::Restore;
use gradflow_job::Event;
use gradflow_job::contract::{ENV_RESTORE, ENV_TOKEN, Token};

/// Run one parameter-server shard of a job.
///
/// Started by `gradflow launch` (or a Kubernetes pod) with GRADFLOW_CLUSTER_SPEC in the
/// environment; the flags are for running a shard by hand. Stops gracefully on SIGTERM or
/// Ctrl-C.
#[derive(clap::Args)]
pub struct Args {
    /// Job file (ignored when GRADFLOW_CLUSTER_SPEC is set).
    #[arg(long)]
    job: Option<PathBuf>,
    /// This shard's index.
    #[arg(long, default_value_t = 0)]
    shard: u32,
    /// Address to listen on; port 0 picks a free port (printed at start).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Address of the Prometheus /metrics endpoint (plain HTTP, apart from the gRPC port);
    /// default: the job's output.metrics_listen if it sets one, else off.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Port of the tensor link (pushes and pulls over plain TCP, beside gRPC) on the listen
    /// address's interface; default: the job's server.link_port, else any free port, which
    /// workers learn from the server. No link when the job uses TLS or sets
    /// transport.tensor_link = false.
    #[arg(long)]
    link_port: Option<u16>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    super::init_logging("info");
    let mut launched = None;
    let (config, listen, metrics) = match super::cluster_from_env()? {
        Some(spec) => {
            launched = Some((spec.job_config.clone(), spec.index));
            let listen: SocketAddr = spec
                .listen
                .as_deref()
                .unwrap_or("0.0.0.0:0")
                .parse()
                .context("GRADFLOW_CLUSTER_SPEC: listen is not an address")?;
            let metrics = match spec.metrics_listen.as_deref() {
                Some(m) => {
                    Some(m.parse().context("GRADFLOW_CLUSTER_SPEC: metrics_listen is not an address")?)
                }
                None => None,
            };
            (gradflow_launch::server_config(&spec.job_config, spec.index), listen, metrics)
        }
        None => {
            let Some(path) = args.job else {
                bail!(
                    "no job: pass --job JOB.toml, or run under `gradflow launch` (which sets GRADFLOW_CLUSTER_SPEC)"
                );
            };
            let job = super::load_job(&path)?;
            if args.shard >= job.servers {
                bail!("--shard {} is out of range: the job has {} servers", args.shard, job.servers);
            }
            let metrics = match args.metrics {
                Some(m) => Some(m),
                None if job.output.metrics_listen.is_some() => match job.metrics_listen(args.shard) {
                    Some(m) => Some(m.parse().context("output.metrics_listen is not an address")?),
                    None => None,
                },
                None => None,
            };
            // The job's [tls] section, if any, is in the server config: the server's side, and
            // the client's for shard 0's calls to the other shards (time-based checkpoints).
            (gradflow_launch::server_config(&job, args.shard), args.listen, metrics)
        }
    };
    super::runtime()?.block_on(async move {
        let mut config = restore_from_env(config).await?;
        if let Some(port) = args.link_port {
            config.settings.link_port = port;
        }
        config.token = Token::from_env().map_err(anyhow::Error::msg)?;
        if config.token.is_none() {
            tracing::warn!("{} is not set: this server takes calls from anyone who can reach it", ENV_TOKEN);
        }
        let server = gradflow_ps::start(config, listen, metrics).await?;
        Event::Listening {
            addr: server.addr().to_string(),
            metrics: server.metrics_addr().map(|a| a.to_string()),
        }
        .emit();
        let (stop_scalars, stopped) = tokio::sync::watch::channel(false);
        let scalars = launched.map(|(job, shard)| {
            tokio::spawn(write_scalars(server.shard().metrics.clone(), job, shard, stopped))
        });
        shutdown_signal().await;
        // The last point of the curves, then the shutdown.
        let _ = stop_scalars.send(true);
        if let Some(task) = scalars {
            let _ = task.await;
        }
        tracing::info!("signal received; shutting down");
        server.shutdown().await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Applies `GRADFLOW_RESTORE` (set by a launcher that restarts a job after losing a server):
/// the latest complete checkpoint, pinned to its step; with none written yet, the job file's
/// own `restore`.
async fn restore_from_env(
    mut config: gradflow_ps::ServerConfig,
) -> anyhow::Result<gradflow_ps::ServerConfig> {
    let Ok(which) = std::env::var(ENV_RESTORE) else { return Ok(config) };
    let Some(checkpoint) = &config.checkpoint else {
        bail!("{ENV_RESTORE}={which}, but the job has no [checkpoint] section");
    };
    let which: Restore = which.parse().with_context(|| format!("{ENV_RESTORE}={which}"))?;
    if which != Restore::Latest {
        config.restore = Some(which);
        return Ok(config);
    }
    match gradflow_launch::prepare::latest_step(&checkpoint.url).await? {
        Some(step) => {
            tracing::info!(step, url = %checkpoint.url, "restarting from the latest checkpoint");
            config.restore = Some(Restore::Step(step));
        }
        None => {
            tracing::warn!(url = %checkpoint.url, restore = ?config.restore, "no checkpoint was written yet; starting as the job file says");
        }
    }
    Ok(config)
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// How often a server adds its scalars to TensorBoard: servers count no steps of their own.
const SCALARS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Writes this shard's TensorBoard scalars under the run's folder (`ps-<shard>`) every
/// [`SCALARS_EVERY`] while the model moves, and once more when `stop` says so, at the model
/// version as the step: the mean push and pull latency since the last write
/// (`shard/push_seconds`, `shard/pull_seconds`) and `shard/model_version`. Never fails the
/// server: a folder it cannot write is logged once.
async fn write_scalars(
    metrics: gradflow_ps::metrics::Metrics,
    job: gradflow_job::JobConfig,
    shard: u32,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let run = std::env::var(gradflow_job::contract::ENV_RUN_ID)
        .unwrap_or_else(|_| gradflow_job::contract::new_run_id(&job.name));
    let dir = job.tensorboard_dir(&run).join(format!("ps-{shard}"));
    let mut events = match gradflow_tensorboard::EventWriter::create(&dir) {
        Ok(w) => w,
        Err(e) => return tracing::warn!("no TensorBoard scalars for this shard: {e}"),
    };
    let (mut last, mut last_version) = (metrics.latency(), None);
    let mut tick = tokio::time::interval(SCALARS_EVERY);
    loop {
        let last_point = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        let (now, version) = (metrics.latency(), metrics.version.get().max(0) as u64);
        if last_version == Some(version) {
            if last_point {
                return;
            }
            continue;
        }
        let mean = |seconds: f64, count: u64| if count > 0 { seconds / count as f64 } else { 0.0 };
        let values = [
            ("shard/push_seconds", mean(now.push_seconds - last.push_seconds, now.pushes - last.pushes)),
            ("shard/pull_seconds", mean(now.pull_seconds - last.pull_seconds, now.pulls - last.pulls)),
            ("shard/model_version", version as f64),
        ];
        if let Err(e) = events.scalars(version, &values).and_then(|()| events.flush()) {
            return tracing::warn!("no more TensorBoard scalars for this shard: {e}");
        }
        (last, last_version) = (now, Some(version));
        if last_point {
            return;
        }
    }
}
