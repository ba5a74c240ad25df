//! `gradflow data`: datasets for trying gradflow out.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use gradflow_data::SynthConfig;

#[derive(clap::Subcommand)]
pub enum Command {
    Synth(SynthArgs),
}

/// Write a deterministic synthetic click-through dataset (CSV).
///
/// Columns: `label`, dense features `d0..`, categorical ids `c0..`. Labels come from a hidden
/// model with interactions and noise, so a good model reaches a known AUC well below 1.0 (the
/// "oracle AUC", printed at the end).
#[derive(clap::Args)]
pub struct SynthArgs {
    /// Output CSV file.
    #[arg(long, short)]
    out: PathBuf,
    /// Number of rows.
    #[arg(long, default_value_t = 100_000)]
    rows: u64,
    /// Seed of the hidden model and the rows.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Dense feature columns.
    #[arg(long, default_value_t = 13)]
    num_dense: usize,
    /// Categorical columns.
    #[arg(long, default_value_t = 26)]
    num_categorical: usize,
    /// Distinct values per categorical column.
    #[arg(long, default_value_t = 10_000)]
    vocab: u32,
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Synth(a) => {
            let config = SynthConfig {
                rows: a.rows,
                seed: a.seed,
                num_dense: a.num_dense,
                num_categorical: a.num_categorical,
                vocab_per_field: a.vocab,
                ..SynthConfig::default()
            };
            if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            let s = gradflow_data::write_synth(&config, &a.out)?;
            println!(
                "wrote {} rows to {} (positive rate {:.3}, oracle AUC {:.4}, oracle log loss {:.4})",
                s.rows,
                a.out.display(),
                s.positive_rate,
                s.oracle_auc,
                s.oracle_log_loss
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
