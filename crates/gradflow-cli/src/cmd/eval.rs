//! `gradflow eval`: score the model that a job's servers hold.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use gradflow_worker::{Worker, WorkerConfig};

/// Score the model held by a job's running parameter servers on a test file.
///
/// Connects as an observer (it reads the model; it is not a worker and is never waited for),
/// and prints test loss, AUC and accuracy, then the same as one JSON line.
#[derive(clap::Args)]
pub struct Args {
    /// The job file the servers run.
    #[arg(long)]
    job: PathBuf,
    /// Server addresses in shard order, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    servers: Vec<String>,
    /// Test data (default: the job's `data.test`), in the job's data format.
    #[arg(long)]
    test: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    super::init_logging("warn");
    let mut job = super::load_job(&args.job)?;
    if let Some(t) = args.test {
        job.data.test = vec![t];
    }
    let Some(test) = job.test_reader() else {
        bail!("no test data: pass --test FILE or set data.test in {}", args.job.display());
    };
    let model = gradflow_models::build(job.model()?)?;
    let scaler = gradflow_trainer::standardizer(&job)?;
    super::runtime()?.block_on(async move {
        let mut config = WorkerConfig::observer(args.servers);
        config.partition_bytes = job.server.partition_bytes;
        config.transport = job.transport.clone();
        config.startup_timeout = std::time::Duration::from_secs(10);
        config.tls = job.client_tls();
        let mut observer = Worker::connect(config).await?;
        observer.declare(model.spec().clone()).await.context("the servers hold another model than this job's")?;
        let s = gradflow_trainer::evaluate(&observer, model.as_ref(), &test, scaler.as_ref(), 4096).await?;
        println!(
            "test AUC {:.4}  loss {:.4}  accuracy {:.4}  ({} examples)",
            s.auc, s.loss, s.accuracy, s.examples
        );
        println!(
            "{}",
            serde_json::json!({"test_auc": s.auc, "test_loss": s.loss, "test_accuracy": s.accuracy, "test_examples": s.examples})
        );
        Ok(ExitCode::SUCCESS)
    })
}
