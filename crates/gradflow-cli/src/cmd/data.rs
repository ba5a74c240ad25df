//! `gradflow data`: datasets for trying gradflow out (`synth`), and looking at and converting
//! data files, local or on object storage (`inspect`, `convert`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use gradflow_data::{CsvSchema, Format, Stores, SynthConfig};

#[derive(clap::Subcommand)]
pub enum Command {
    Synth(SynthArgs),
    Inspect(InspectArgs),
    Convert(ConvertArgs),
}

/// Show what a data file holds: format, compression, size; for Parquet its columns, rows and
/// row groups; and its first rows.
///
/// FILE_OR_URL is a local path or a URL (`s3://`, `gs://`, `az://`, `http(s)://`, `file://`),
/// with credentials from the environment as for checkpoints (`AWS_ACCESS_KEY_ID`,
/// `AWS_ENDPOINT`, ...).
#[derive(clap::Args)]
pub struct InspectArgs {
    /// The file.
    file_or_url: PathBuf,
    /// Its format (`csv`, `libsvm`, `parquet`, `tfrecord`); default: from the extension.
    #[arg(long, value_parser = parse_format)]
    format: Option<Format>,
    /// How many rows to show.
    #[arg(long, default_value_t = 5)]
    rows: usize,
}

/// Convert a CSV or TFRecord file (local or a URL, possibly `.gz` or `.zst`) to Parquet.
///
/// The label and dense columns become float32, parsed as training parses them; categorical CSV
/// columns stay strings, categorical TFRecord features become lists of strings or int64s.
/// Training on the Parquet file with the same `label` and `categorical` gives the same examples
/// as on the input. libsvm is not converted: its ids are used as they are, Parquet's are hashed.
#[derive(clap::Args)]
pub struct ConvertArgs {
    /// The CSV or TFRecord file.
    input: PathBuf,
    /// Its format (`csv`, `tfrecord`); default: from the extension.
    #[arg(long, value_parser = parse_format)]
    format: Option<Format>,
    /// The Parquet file to write (local).
    #[arg(long, short)]
    out: PathBuf,
    /// The label column.
    #[arg(long, default_value = "label")]
    label: String,
    /// A categorical column (repeat the flag for several); the others are dense.
    #[arg(long)]
    categorical: Vec<String>,
    /// Rows per row group (the unit of sharding: write at least as many as workers).
    #[arg(long, default_value_t = 100_000)]
    row_group_rows: usize,
}

fn parse_format(s: &str) -> Result<Format, String> {
    match s {
        "csv" => Ok(Format::Csv),
        "libsvm" => Ok(Format::Libsvm),
        "parquet" => Ok(Format::Parquet),
        "tfrecord" => Ok(Format::Tfrecord),
        other => Err(format!("`{other}` is not a format; expected csv, libsvm, parquet or tfrecord")),
    }
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
        Command::Inspect(a) => {
            let format = a.format.unwrap_or(Format::Auto);
            let i = gradflow_data::inspect(&a.file_or_url, format, a.rows, &Stores::default())
                .with_context(|| format!("inspecting {}", a.file_or_url.display()))?;
            println!("file: {}", a.file_or_url.display());
            println!("format: {:?}, compression: {:?}, {} bytes", i.format, i.compression, i.bytes);
            if let Some(p) = &i.parquet {
                println!("columns:");
                for f in p.schema.fields() {
                    println!(
                        "  {}: {}{}",
                        f.name(),
                        f.data_type(),
                        if f.is_nullable() { " (nullable)" } else { "" }
                    );
                }
                let rows: u64 = p.row_group_rows.iter().sum();
                println!("rows: {rows}");
                println!("row groups: {} (rows: {:?})", p.row_group_rows.len(), p.row_group_rows);
            } else if !i.columns.is_empty() {
                println!("columns: {}", i.columns.join(", "));
            }
            println!("first rows:");
            if i.parquet.is_some() {
                println!("  {}", i.columns.join(" | "));
            }
            for row in &i.first {
                println!("  {}", row.join(" | "));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Convert(a) => {
            let schema = CsvSchema::new(a.label, a.categorical);
            let stores = Stores::default();
            let convert = match a.format.unwrap_or(Format::Auto).resolve(Some(&a.input)) {
                Format::Tfrecord => gradflow_data::convert::tfrecord_to_parquet,
                Format::Csv => gradflow_data::convert::csv_to_parquet,
                other => anyhow::bail!(
                    "{}: {other:?} files are not converted (CSV and TFRecord are); libsvm ids are used as they are, \
                     while Parquet's are hashed, so a converted file would train on different ids",
                    a.input.display()
                ),
            };
            let done = convert(&a.input, &schema, &a.out, a.row_group_rows, &stores)
                .with_context(|| format!("converting {} to {}", a.input.display(), a.out.display()))?;
            println!("wrote {} rows in {} row groups to {}", done.rows, done.row_groups, a.out.display());
            Ok(ExitCode::SUCCESS)
        }
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
