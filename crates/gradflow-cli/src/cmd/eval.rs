//! `gradflow eval`: score a model on a test file, either the model a job's running servers
//! hold or one saved in a checkpoint (no server needed).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use gradflow_worker::{Worker, WorkerConfig};

/// Score a model on a test file: the model in a checkpoint (`--checkpoint`, no server
/// needed), or the one a job's running parameter servers hold (`--job` and `--servers`).
///
/// Prints test loss, AUC and accuracy, then the same as one JSON line. With `--servers` it
/// connects as an observer (it reads the model; it is not a worker and is never waited for).
#[derive(clap::Args)]
pub struct Args {
    /// A checkpoint root (local folder, s3://, gs://, az://) or the URL of one checkpoint:
    /// score the model saved there, with the columns and scaling it records.
    #[arg(long, conflicts_with_all = ["job", "servers"], required_unless_present = "job")]
    checkpoint: Option<String>,
    /// With --checkpoint: which checkpoint, `latest`, `best` (the best-scoring one, `[checkpoint]
    /// keep_best`), a step, or a directory name.
    #[arg(long, default_value = "latest", requires = "checkpoint")]
    step: String,
    /// The job file the servers run.
    #[arg(long, requires = "servers")]
    job: Option<PathBuf>,
    /// Server addresses in shard order, comma-separated.
    #[arg(long, value_delimiter = ',', requires = "job")]
    servers: Vec<String>,
    /// Test data (with --job, default: the job's `data.test`): a file, directory, glob or URL
    /// of CSV, Parquet or TFRecord.
    #[arg(long)]
    test: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    super::init_logging("warn");
    if let Some(url) = &args.checkpoint {
        let Some(test) = &args.test else { bail!("--checkpoint needs --test FILE: the data to score") };
        let model = super::predict::load(url, &args.step)?;
        let predictions = gradflow_serve::predict_file(&model, test)
            .with_context(|| format!("scoring {}", test.display()))?;
        let Some(s) = predictions.scores() else { bail!("the test data {} has no examples", test.display()) };
        println!(
            "test AUC {:.4}  loss {:.4}  accuracy {:.4}  ({} examples, checkpoint step {})",
            s.auc,
            s.loss,
            s.accuracy,
            s.examples,
            model.step()
        );
        println!(
            "{}",
            serde_json::json!({"test_auc": s.auc, "test_loss": s.loss, "test_accuracy": s.accuracy,
                "test_examples": s.examples, "step": model.step(), "checkpoint": model.checkpoint()})
        );
        return Ok(ExitCode::SUCCESS);
    }
    let job_path = args.job.expect("clap requires --job or --checkpoint");
    let mut job = super::load_job(&job_path)?;
    if let Some(t) = args.test {
        job.data.test = vec![t];
    }
    let Some(test) = job.test_reader() else {
        bail!("no test data: pass --test FILE or set data.test in {}", job_path.display());
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
