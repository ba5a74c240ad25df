//! `gradflow predict`: one probability per row of a data file, from a checkpoint.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use gradflow_checkpoint::CheckpointStore;
use gradflow_serve::LoadedModel;

/// Predict every row of a data file with the model saved in a checkpoint (no server needed).
///
/// Writes one probability per input row, in the file's order, one per line. The file is read
/// with the columns the checkpoint records (CSV, Parquet or TFRecord; its label column must be
/// there and is not used); dense values are scaled with the job's statistics, and ids the model
/// never saw get what a new row would hold.
#[derive(clap::Args)]
pub struct Args {
    /// A checkpoint root (local folder, s3://, gs://, az://) or the URL of one checkpoint.
    #[arg(long)]
    checkpoint: String,
    /// Which checkpoint: `latest`, `best` (the best-scoring one, `[checkpoint] keep_best`), a
    /// step, or a directory name.
    #[arg(long, default_value = "latest")]
    step: String,
    /// The rows to predict: a file, directory, glob or URL.
    #[arg(long)]
    data: PathBuf,
    /// Where to write the probabilities (`-` for standard output).
    #[arg(long)]
    out: PathBuf,
}

/// Loads checkpoint `which` of `url` for prediction.
pub fn load(url: &str, which: &str) -> anyhow::Result<LoadedModel> {
    let store = CheckpointStore::open(url)?;
    super::runtime()?
        .block_on(LoadedModel::load(&store, which))
        .with_context(|| format!("loading checkpoint `{which}` of {url}"))
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    super::init_logging("warn");
    let model = load(&args.checkpoint, &args.step)?;
    let predictions = gradflow_serve::predict_file(&model, &args.data)
        .with_context(|| format!("predicting {}", args.data.display()))?;
    let mut text = String::with_capacity(predictions.probs.len() * 12);
    for p in &predictions.probs {
        text.push_str(&p.to_string());
        text.push('\n');
    }
    if args.out.as_os_str() == "-" {
        std::io::stdout().write_all(text.as_bytes())?;
    } else {
        std::fs::write(&args.out, text).with_context(|| format!("writing {}", args.out.display()))?;
        eprintln!(
            "{} predictions written to {} (checkpoint step {})",
            predictions.probs.len(),
            args.out.display(),
            model.step()
        );
    }
    Ok(ExitCode::SUCCESS)
}
