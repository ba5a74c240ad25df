//! `gradflow serve`: answer predictions over HTTP from a checkpoint, following `latest`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use gradflow_launch::kubernetes::serve::ServeDeployment;
use gradflow_serve::{ServeConfig, Server};

/// Serve a trained model over HTTP, in the TensorFlow Serving REST shape.
///
/// Loads the checkpoint from its object store (local folder, s3://, gs://, az://) and answers
/// `POST /v1/models/<job name>:predict` with `{"instances": [{column: raw value, ...}]}` by
/// `{"predictions": [p, ...]}`; `GET /v1/models/<job name>` gives its status and step;
/// `GET /metrics` Prometheus metrics. With `--step latest` (the default) it looks at `latest`
/// every `--poll` and swaps in a newer complete checkpoint without dropping a request; one
/// that fails verification is refused and the previous model keeps serving. Stops on SIGTERM
/// or Ctrl-C.
///
/// `--dry-run` prints it as a Kubernetes Deployment and Service instead (no cluster needed);
/// the pods read the checkpoint from the object store.
#[derive(clap::Args)]
pub struct Args {
    /// The checkpoint root (or one checkpoint's URL).
    url: String,
    /// Where to listen (port 0: a free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:8501")]
    listen: String,
    /// Also answer the gRPC `Predictor` service (proto/gradflow.proto) here (port 0: a free
    /// port, printed at start).
    #[arg(long)]
    grpc_listen: Option<String>,
    /// Which checkpoint: `latest` or `best` (the best-scoring one, `[checkpoint] keep_best`),
    /// both followed; a step, or a directory name (served as it is).
    #[arg(long, default_value = "latest")]
    step: String,
    /// How often `latest` is looked at, e.g. `10s`, `500ms`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    poll: Duration,
    /// Most rows in one forward pass: concurrent requests are batched up to this.
    #[arg(long, default_value_t = 1024)]
    max_batch_rows: usize,
    /// Print a Kubernetes Deployment and Service that serve the checkpoint, and exit.
    #[arg(long)]
    dry_run: bool,
    /// With --dry-run: the format (`yaml`).
    #[arg(short = 'o', long = "output", default_value = "yaml", value_parser = ["yaml"], requires = "dry_run")]
    output: String,
    /// With --dry-run: the name of the Deployment and the Service.
    #[arg(long, default_value = "gradflow-serve", requires = "dry_run")]
    name: String,
    /// With --dry-run: the namespace.
    #[arg(long, default_value = "default", requires = "dry_run")]
    namespace: String,
    /// With --dry-run: the image with the gradflow binary.
    #[arg(long, requires = "dry_run")]
    image: Option<String>,
    /// With --dry-run: replicas.
    #[arg(long, default_value_t = 2, requires = "dry_run")]
    replicas: i32,
    /// With --dry-run: a Secret whose keys become the pods' variables (the object store's
    /// credentials, e.g. AWS_ACCESS_KEY_ID); repeat for several.
    #[arg(long = "env-from-secret", requires = "dry_run")]
    env_from_secrets: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.dry_run {
        let mut d = ServeDeployment::new(&args.name, &args.url);
        d.namespace = args.namespace;
        d.step = args.step;
        d.poll = humantime::format_duration(args.poll).to_string();
        d.replicas = args.replicas;
        d.env_from_secrets = args.env_from_secrets;
        if let Some(image) = args.image {
            d.image = image;
        }
        print!("{}", d.to_yaml()?);
        return Ok(ExitCode::SUCCESS);
    }
    super::init_logging("info");
    let mut config = ServeConfig::new(&args.url, &args.step);
    config.poll = args.poll;
    config.max_batch_rows = args.max_batch_rows;
    super::runtime()?.block_on(async move {
        let server = Server::start(config)
            .await
            .with_context(|| format!("loading checkpoint `{}` of {}", args.step, args.url))?;
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        let current = server.current();
        let job = current.model.info().job.clone();
        println!(
            "serving `{job}` (checkpoint step {}, {}) at http://{addr}/v1/models/{job}",
            current.model.step(),
            current.model.checkpoint()
        );
        drop(current);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let grpc = match &args.grpc_listen {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("listening on {addr}"))?;
                println!("gRPC Predictor at {}", listener.local_addr()?);
                let mut stop = stop_rx.clone();
                let shutdown = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                Some(tokio::spawn(gradflow_serve::grpc::serve(listener, server.clone(), shutdown)))
            }
            None => None,
        };
        gradflow_serve::http::serve(listener, server.clone(), super::ps::shutdown_signal()).await?;
        let _ = stop_tx.send(true);
        if let Some(task) = grpc {
            task.await?.context("the gRPC endpoint failed")?;
        }
        server.stop();
        Ok(ExitCode::SUCCESS)
    })
}
