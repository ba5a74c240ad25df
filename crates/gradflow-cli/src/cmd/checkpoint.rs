//! `gradflow checkpoint now|ls|inspect` and `gradflow export`: take a checkpoint of a running
//! job, look into a job's checkpoints, and export a model for use outside gradflow.
//!
//! Checkpoint roots are URLs as in the job file's `checkpoint.url`: a folder, `s3://bucket/prefix`
//! (with the usual `AWS_*` variables), `gs://...`, `az://...`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use gradflow_checkpoint::{CheckpointError, CheckpointStore, FileContent, Manifest};
use gradflow_core::OptimizerConfig;

/// Take, list and inspect the checkpoints of a job.
#[derive(clap::Subcommand)]
pub enum Command {
    Now(NowArgs),
    Ls(LsArgs),
    Inspect(InspectArgs),
}

/// Checkpoint a running job now and wait until the checkpoint is complete.
///
/// In sync mode every shard checkpoints the same model version: the next step to complete.
/// The job's file needs a `[checkpoint]` section. A job started by `gradflow launch` on this
/// machine is found through `<output dir>/servers.json` (which also holds its token);
/// otherwise pass `--servers` and set GRADFLOW_TOKEN.
#[derive(clap::Args)]
pub struct NowArgs {
    /// The job file of the running job.
    job: PathBuf,
    /// The servers' addresses in shard order (host:port,...), instead of finding them.
    #[arg(long, value_delimiter = ',')]
    servers: Vec<String>,
}

/// List the complete checkpoints under a root: step, time, size, whether every shard had the
/// same model version, shards. A directory without its manifest is not a checkpoint and is
/// not listed; one whose manifest is unreadable or corrupt is listed apart, with why.
#[derive(clap::Args)]
pub struct LsArgs {
    /// Checkpoint root: a folder, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix.
    url: String,
    /// Print one JSON object per checkpoint instead of a table.
    #[arg(long)]
    json: bool,
}

/// Show what a checkpoint holds: dense tensors with their shapes and optimizers, sparse tables
/// with their row counts, and its files.
#[derive(clap::Args)]
pub struct InspectArgs {
    /// Checkpoint root (see `gradflow checkpoint ls`), or the URL of one checkpoint directory.
    url: String,
    /// `latest`, `best` (the best-scoring checkpoint, `[checkpoint] keep_best`), a step number,
    /// or a checkpoint directory name.
    #[arg(long, default_value = "latest")]
    step: String,
    /// Also read every file and check its size and checksum.
    #[arg(long)]
    verify: bool,
    /// Print the checkpoint's manifest (JSON) instead.
    #[arg(long)]
    json: bool,
}

/// Export a checkpoint's model as one safetensors file.
///
/// Dense tensors keep their names and shapes (f32). A sparse table `T` becomes `T.ids` (u64,
/// sorted) and `T.values` (f32, [rows, dim]). The metadata holds the step and the model spec
/// (JSON). Optimizer state is not exported. Load it with
/// `safetensors.numpy.load_file("model.safetensors")` or `safetensors.torch.load_file(...)`
/// (ids come as torch.uint64; `.to(torch.int64)` for indexing).
#[derive(clap::Args)]
pub struct ExportArgs {
    /// Checkpoint root (see `gradflow checkpoint ls`), or the URL of one checkpoint directory.
    url: String,
    /// `latest`, `best` (the best-scoring checkpoint, `[checkpoint] keep_best`), a step number,
    /// or a checkpoint directory name.
    #[arg(long, default_value = "latest")]
    step: String,
    /// Output file.
    #[arg(long, short)]
    out: PathBuf,
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    super::init_logging("warn");
    super::runtime()?.block_on(async move {
        match command {
            Command::Now(a) => now(a).await,
            Command::Ls(a) => ls(a).await,
            Command::Inspect(a) => inspect(a).await,
        }
    })
}

pub fn run_export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    super::init_logging("warn");
    super::runtime()?.block_on(async move {
        let (store, manifest) = resolve(&args.url, &args.step).await?;
        store.export(&manifest, &args.out).await?;
        let size = std::fs::metadata(&args.out).map(|m| m.len()).unwrap_or(0);
        println!(
            "exported step {} ({} dense tensors, {} sparse tables, {}) from {} to {}",
            manifest.step,
            manifest.spec.dense.len(),
            manifest.spec.sparse.len(),
            human_bytes(size),
            manifest.url(),
            args.out.display()
        );
        Ok(ExitCode::SUCCESS)
    })
}

/// Opens `url` and resolves `which` in it; when `url` is itself a checkpoint directory (it has
/// a manifest) and `which` is `latest`, that checkpoint.
async fn resolve(url: &str, which: &str) -> anyhow::Result<(CheckpointStore, Manifest)> {
    let store = CheckpointStore::open(url)?;
    if which == gradflow_checkpoint::LATEST {
        let last = url.trim_end_matches('/').rsplit('/').next().unwrap_or("");
        if gradflow_checkpoint::parse_checkpoint_dir_name(last).is_some() {
            let manifest = store.resolve(url).await?;
            return Ok((store, manifest));
        }
    }
    match store.resolve(which).await {
        Ok(manifest) => Ok((store, manifest)),
        Err(e @ CheckpointError::MissingManifest { .. }) => {
            let steps: Vec<String> =
                store.list().await.unwrap_or_default().iter().map(|c| c.step.to_string()).collect();
            let have = if steps.is_empty() { "none".to_string() } else { steps.join(", ") };
            Err(anyhow::anyhow!("{e} (complete checkpoints under {}: {have})", store.url()))
        }
        Err(e) => Err(e.into()),
    }
}

async fn now(args: NowArgs) -> anyhow::Result<ExitCode> {
    let job = super::load_job(&args.job)?;
    let Some(checkpoint) = &job.checkpoint else {
        anyhow::bail!(
            "{}: the job has no [checkpoint] section, so its servers write no checkpoints",
            args.job.display()
        );
    };
    let (servers, token) = if args.servers.is_empty() {
        let record = gradflow_launch::local::RunningJob::read(&job)?;
        (record.servers, record.token)
    } else {
        (args.servers, None)
    };
    if servers.len() != job.servers as usize {
        anyhow::bail!(
            "expected {} server addresses (servers = {} in the job file), found {}",
            job.servers,
            job.servers,
            servers.len()
        );
    }
    let mut config = gradflow_worker::WorkerConfig::observer(servers);
    config.partition_bytes = job.server.partition_bytes;
    config.transport = job.transport.clone();
    config.startup_timeout = std::time::Duration::from_secs(10);
    // The job's [tls] section; without one, GRADFLOW_TLS_CA if set (read by `connect`).
    config.tls = job.client_tls();
    // Else GRADFLOW_TOKEN, which `connect` reads.
    if let Some(t) = token {
        config.token = Some(gradflow_job::contract::Token::new(t).map_err(anyhow::Error::msg)?);
    }
    let observer = gradflow_worker::Worker::connect(config).await?;
    // Sync: a step every shard has still ahead of it, the same everywhere. It is chosen about
    // a second of training ahead (the pace measured over a quarter second), so that no shard
    // gets there before every shard has been asked; one that did refuses (ABORTED), and every
    // shard is asked again for a later step. Async: the highest shard version, which every
    // shard writes when it gets there (under that name).
    let first = observer.status().await?.iter().map(|s| s.version).max().unwrap_or(0);
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    let second = observer.status().await?.iter().map(|s| s.version).max().unwrap_or(0);
    let mut margin = 2 + 4 * second.saturating_sub(first);
    let written = loop {
        let versions: Vec<u64> = observer.status().await?.iter().map(|s| s.version).collect();
        let max = versions.iter().max().copied().unwrap_or(0);
        let step = match job.mode {
            gradflow_core::Mode::Sync => max + margin,
            gradflow_core::Mode::Async => max,
        };
        let steps = vec![step; versions.len()];
        match observer.checkpoint(&steps).await {
            Ok(written) => break written,
            Err(e) if e.code() == Some(gradflow_worker::Code::Aborted) && margin < 100_000 => {
                tracing::info!("{e}; asking for a later step");
                margin *= 4;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let step = written[0];
    let store = CheckpointStore::open(&checkpoint.url)?;
    let manifest = store.resolve(&step.to_string()).await?;
    println!("checkpoint step {step} written: {}", manifest.url());
    Ok(ExitCode::SUCCESS)
}

async fn ls(args: LsArgs) -> anyhow::Result<ExitCode> {
    let store = CheckpointStore::open(&args.url)?;
    let listing = store.list_all().await?;
    let (list, bad) = (&listing.checkpoints, &listing.unreadable);
    if args.json {
        for c in list {
            println!("{}", serde_json::to_string(c)?);
        }
        for b in bad {
            println!(
                "{}",
                serde_json::json!({"step": b.step, "dir": b.dir, "unreadable": b.error.to_string()})
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if list.is_empty() && bad.is_empty() {
        println!("no checkpoints under {}", store.url());
        return Ok(ExitCode::SUCCESS);
    }
    let latest = store.resolve(gradflow_checkpoint::LATEST).await;
    let latest_step = latest.as_ref().ok().map(|m| m.step);
    if list.is_empty() {
        println!("no readable checkpoints under {}", store.url());
    } else {
        let mut rows = vec![
            ["STEP", "TIME (UTC)", "SIZE", "CONSISTENT", "SHARDS", "MODE", ""].map(String::from).to_vec(),
        ];
        for c in list {
            rows.push(vec![
                c.step.to_string(),
                c.time.format("%Y-%m-%d %H:%M:%S").to_string(),
                human_bytes(c.total_bytes),
                if c.consistent { "yes" } else { "no" }.to_string(),
                c.num_shards.to_string(),
                c.mode.to_string(),
                if latest_step == Some(c.step) { "<- latest" } else { "" }.to_string(),
            ]);
        }
        println!("checkpoints under {}:", store.url());
        print_table(&rows);
    }
    if !bad.is_empty() {
        println!();
        println!("unreadable, not checkpoints until repaired or removed:");
        for b in bad {
            println!("  {}: {}", b.dir, b.error);
        }
    }
    // A broken pointer (one naming an unreadable checkpoint is listed above already).
    if let Err(e @ CheckpointError::Corrupt { object, .. }) = &latest
        && object.ends_with(&format!("/{}", gradflow_checkpoint::LATEST))
    {
        println!("\n{e}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let (store, m) = resolve(&args.url, &args.step).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        print_manifest(&m);
    }
    if args.verify {
        let bytes = store.verify(&m).await.context("verifying the checkpoint")?;
        println!();
        println!(
            "verified: {} files, {} read, every size and checksum as the manifest says",
            file_count(&m),
            human_bytes(bytes)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn file_count(m: &Manifest) -> usize {
    m.shards.iter().map(|s| s.files.len() + 1).sum()
}

fn print_manifest(m: &Manifest) {
    let versions = m.versions();
    let same = versions.windows(2).all(|w| w[0] == w[1]);
    println!("checkpoint   {}", m.url());
    println!("step         {}", m.step);
    println!("written      {} UTC", m.time.format("%Y-%m-%d %H:%M:%S"));
    println!("mode         {}", m.mode);
    if let Some(run) = &m.run_id {
        println!("run          {run}");
    }
    println!(
        "consistent   {}",
        if m.consistent {
            "yes (every shard at the same model version)".to_string()
        } else {
            format!("no (shard versions {versions:?})")
        }
    );
    if same && !versions.is_empty() {
        println!("version      {}", versions[0]);
    }
    println!("shards       {} (pieces of at most {} bytes)", m.num_shards, m.partition_bytes);
    println!("size         {} in {} files", human_bytes(m.total_bytes), file_count(m));

    let mut steps: std::collections::HashMap<&str, (u64, usize)> = Default::default();
    for f in m.files() {
        if let FileContent::Dense { pieces } = &f.content {
            for p in pieces {
                let e = steps.entry(p.tensor.as_str()).or_default();
                e.0 = e.0.max(p.steps);
                e.1 += 1;
            }
        }
    }
    println!();
    let params: u64 = m.spec.dense.iter().map(|d| d.numel()).sum();
    println!("dense tensors: {} ({params} parameters)", m.spec.dense.len());
    if !m.spec.dense.is_empty() {
        let mut rows = vec![
            ["  NAME", "SHAPE", "PARAMS", "OPTIMIZER", "STATE", "STEPS", "PIECES"].map(String::from).to_vec(),
        ];
        for d in &m.spec.dense {
            let (s, pieces) = steps.get(d.name.as_str()).copied().unwrap_or_default();
            rows.push(vec![
                format!("  {}", d.name),
                format!("{:?}", d.shape),
                d.numel().to_string(),
                optimizer(&d.optimizer),
                slots(&d.optimizer),
                s.to_string(),
                pieces.to_string(),
            ]);
        }
        print_table(&rows);
    }
    println!();
    println!("sparse tables: {}", m.spec.sparse.len());
    if !m.spec.sparse.is_empty() {
        let mut rows = vec![
            ["  NAME", "DIM", "ROWS", "MOST ON A SHARD", "BYTES", "OPTIMIZER", "STATE"]
                .map(String::from)
                .to_vec(),
        ];
        for s in &m.spec.sparse {
            // Rows and bytes of the table's file on each shard.
            let per_shard: Vec<(u64, u64)> = m
                .shards
                .iter()
                .flat_map(|shard| &shard.files)
                .filter_map(|f| match &f.content {
                    FileContent::Sparse { table, rows, .. } if *table == s.name => Some((*rows, f.bytes)),
                    _ => None,
                })
                .collect();
            rows.push(vec![
                format!("  {}", s.name),
                s.dim.to_string(),
                m.table_rows(&s.name).to_string(),
                per_shard.iter().map(|(r, _)| *r).max().unwrap_or(0).to_string(),
                human_bytes(per_shard.iter().map(|(_, b)| *b).sum()),
                optimizer(&s.optimizer),
                slots(&s.optimizer),
            ]);
        }
        print_table(&rows);
    }
}

/// `adam lr=0.01`: the kind, the learning rate and every hyperparameter that differs from its
/// default.
fn optimizer(o: &OptimizerConfig) -> String {
    let Ok(serde_json::Value::Object(map)) = serde_json::to_value(o) else { return o.kind().to_string() };
    let lr = map.get("lr").and_then(|v| v.as_f64()).unwrap_or(0.0);
    let default = match o.kind() {
        "sgd" => OptimizerConfig::sgd(lr),
        "adagrad" => OptimizerConfig::adagrad(lr),
        "adam" => OptimizerConfig::adam(lr),
        "adamw" => OptimizerConfig::adamw(lr),
        _ => OptimizerConfig::ftrl(lr),
    };
    let default = serde_json::to_value(default).unwrap_or_default();
    let mut out = format!("{} lr={lr}", o.kind());
    for (k, v) in
        map.iter().filter(|(k, v)| !matches!(k.as_str(), "kind" | "lr") && default.get(k) != Some(*v))
    {
        out.push_str(&format!(" {k}={v}"));
    }
    out
}

fn slots(o: &OptimizerConfig) -> String {
    let names = o.slot_names();
    if names.is_empty() { "-".into() } else { names.join(",") }
}

fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(s, w)| format!("{s:<w$}")).collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{x:.1} {}", UNITS[u]) }
}
