//! `gradflow bench`: measure gradflow on this machine and print a table and one JSON object.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use gradflow_bench::{BenchConfig, Scenario};

/// Measure what gradflow achieves on this machine, next to what the machine can do.
///
/// Scenarios, in the order they run (defaults: about 95 s on 2 cores, at most 7 GiB of
/// memory):
///
///   ceiling   raw TCP throughput over loopback between this process and a child (1 GiB in
///             4 MiB writes), the data in the cache and memory to memory (256 MiB buffers),
///             and memcpy bandwidth on 1 thread and on all cores. ~6 s
///
///   compute   the wide & deep MLP's forward and backward matrix products alone (221-64-32-1,
///             batch 256) with matrixmultiply and with gemm, on 1 thread and every thread,
///             beside the model's own pass: the fastest is the compute ceiling the training
///             rows are compared with. Also runs with training. ~5 s
///
///   dense     push then pull of a dense model of 4, 64 and 512 MiB through 1, 2 and 4
///             parameter-server shards, by 1 and 2 workers (sync, SGD): GB/s of gradient
///             and parameter bytes moved, and the ratios to both raw TCP figures. ~50 s
///
///   small     a model of 1000 tensors of 1-64 KiB through 1 and 4 shards: steps per second.
///             ~5 s
///
///   sparse    pull and push of 10,000 random ids, rows of 16 and 64 floats, in a table of
///             10 million rows (Adagrad): rows per second. ~15 s
///
///   update    Adam and Adagrad on 128 MiB of parameters: the kernel on one thread, and the
///             server's apply of a two-worker sync step (each push from its own buffer) on
///             all cores, in GB/s of parameters and as a ratio to memcpy. ~4 s
///
///   training  the wide & deep model (1M hash buckets, embeddings of 8, MLP 64-32, Adagrad,
///             batch 256) on 300,000 synthetic rows: 1, 2 and 4 workers, sync and async, as
///             real `gradflow launch` jobs with 1 server, against the same model trained in
///             this process with no servers (the overhead users pay). ~35 s
///
///   embedding 50M raw ids (Zipf) pushed through one table of 16 floats (Adagrad), with
///             `max_rows = 2000000` and without: pull+push rows per second, rows, bytes per
///             row, and the process memory against the cap's bytes. ~25 s
///
///   serve     `gradflow serve` on the wide & deep headline model (200,000 rows per table)
///             over loopback HTTP, one client: p50/p99 latency at batch 1 and rows/s at batch
///             256, against the same decoding and forward pass in this process. ~10 s
///
///   data      200,000 synthetic rows written as CSV (plain, .gz, .zst), libsvm (field-aware),
///             Parquet and TFRecord, each read whole into batches of 256 on one reader:
///             rows/s and rows per CPU second, from local files and from `s3s-fs` on
///             loopback (when on PATH), against pyarrow reading the same Parquet file (when
///             python3 has it), and as a share of a training worker's time. ~40 s
///
/// The servers of dense, small and sparse run inside this process (each worker on its own
/// thread and runtime, talking to them over loopback: the tensor link for pushes and pulls,
/// gRPC for the rest); ceiling and training cross real process boundaries. Every figure is
/// the median of a few repetitions after a warm-up.
///
/// Progress goes to standard error; the table, then the JSON object (one line), to standard
/// output. The elapsed time is in both.
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Small sizes and few repetitions: every scenario in seconds. Checks that everything
    /// runs; the numbers mean little.
    #[arg(long)]
    quick: bool,
    /// Run only these scenarios (comma-separated): ceiling, compute, dense, small, sparse,
    /// update, training, embedding, serve, data. The ceiling also runs when dense or update is chosen, for their ratios.
    #[arg(long, value_delimiter = ',', value_name = "SCENARIO,...")]
    only: Vec<Scenario>,
    /// Also write the JSON object to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Settings file (JSON) overriding any default: e.g. {"sparse": {"table_rows": 1000000}}.
    /// See gradflow_bench::BenchConfig for every field. Applied on top of --quick.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Internal: serve as the TCP sink of the ceiling scenario.
    #[arg(long, hide = true)]
    tcp_sink: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.tcp_sink {
        gradflow_bench::serve_tcp_sink()?;
        return Ok(ExitCode::SUCCESS);
    }
    super::init_logging("warn");
    let mut config = if args.quick { BenchConfig::quick() } else { BenchConfig::default() };
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut value = serde_json::to_value(&config).context("bench settings")?;
        let patch: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
        merge(&mut value, patch);
        config =
            serde_json::from_value(value).with_context(|| format!("bench settings in {}", path.display()))?;
    }
    if !args.only.is_empty() {
        config.only = args.only;
    }
    let program = std::env::current_exe().context("finding the gradflow executable")?;
    let log = |line: &str| eprintln!("[bench] {line}");
    let report = gradflow_bench::run(&config, &program, &log)?;
    let json = serde_json::to_string(&report).context("serializing the report")?;
    if let Some(path) = &args.json {
        std::fs::write(path, format!("{json}\n")).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{}", report.table());
    println!("{json}");
    eprintln!("[bench] finished in {:.0} s", report.elapsed_s);
    Ok(ExitCode::SUCCESS)
}

/// Overwrites the fields of `base` that `patch` names, recursively for objects.
fn merge(base: &mut serde_json::Value, patch: serde_json::Value) {
    match (base, patch) {
        (serde_json::Value::Object(b), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}
