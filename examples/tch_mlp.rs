//! A tch (libtorch) MLP trained by gradflow's parameter servers: the breast cancer data,
//! split across the job's workers, one hidden ReLU layer, the servers' Adam.
//!
//! It is a worker program for `[worker] command` in a job file: the launcher starts it once
//! per worker with the environment contract (`GRADFLOW_CLUSTER_SPEC`), and it reports
//! progress, evaluations and its end with `@gradflow` event lines. Build it, then launch the
//! job (see `docs/tch.md` for libtorch):
//!
//! ```sh
//! cargo build --release -p gradflow-worker --features tch --example tch_mlp
//! cargo run --release -p gradflow-cli -- launch examples/tch_mlp.toml
//! ```
//!
//! Flags (after the program in `command`): `--hidden N` (32), `--lr X` (Adam's learning rate,
//! 0.005), `--device cpu|cuda` (default: a CUDA device when libtorch sees one, else the CPU),
//! `--threads N` (libtorch's CPU threads, 1: a 32-wide layer on 16 examples is far too small
//! to split, and the workers and servers of a local job share the machine's cores).
//! The data, batch size, epochs, seed and logging cadence come from the job file.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use gradflow_core::{Mode, OptimizerConfig};
use gradflow_data::{Batch, Reader, ShardSpec, Standardizer, metrics};
use gradflow_job::{ClusterSpec, Event, JobConfig};
use gradflow_worker::tch::{TchAdapter, device_for_worker};
use gradflow_worker::{StepOutcome, Worker, WorkerConfig};
use tch::nn::{self, Module};
use tch::{Device, Reduction, Tensor};

/// The example's own settings (the job file has no keys for a custom model).
struct Flags {
    hidden: i64,
    lr: f64,
    device: Option<Device>,
    threads: i32,
}

fn flags() -> Result<Flags> {
    let mut f = Flags { hidden: 32, lr: 0.005, device: None, threads: 1 };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--hidden" => f.hidden = value()?.parse().context("--hidden: expected a positive integer")?,
            "--lr" => f.lr = value()?.parse().context("--lr: expected a number")?,
            "--threads" => f.threads = value()?.parse().context("--threads: expected a positive integer")?,
            "--device" => {
                f.device = Some(match value()?.as_str() {
                    "cpu" => Device::Cpu,
                    "cuda" => Device::Cuda(0),
                    other => bail!("--device: expected cpu or cuda, found {other}"),
                })
            }
            other => {
                bail!("unknown flag {other}; expected --hidden N, --lr X, --device cpu|cuda or --threads N")
            }
        }
    }
    if f.hidden < 1 || f.threads < 1 {
        bail!("--hidden and --threads: expected at least 1");
    }
    Ok(f)
}

/// Features and labels of a batch as tensors on `device`.
fn tensors(batch: &Batch, device: Device) -> (Tensor, Tensor) {
    let x = Tensor::from_slice(&batch.dense).view([batch.len() as i64, batch.num_dense as i64]);
    (x.to_device(device), Tensor::from_slice(&batch.labels).to_device(device))
}

/// Scores of the servers' current model on the test data.
async fn evaluate(
    job: &JobConfig,
    model: &mut TchAdapter,
    net: &impl Module,
    worker: &Worker,
    scaler: Option<&Standardizer>,
) -> Result<(f64, f64, f64, u64)> {
    let test = job.test_reader().context("the job has no data.test")?;
    model.pull(worker).await?;
    let mut reader = Reader::open(&test, ShardSpec::new(0, 1)?)?;
    let mut batch = Batch::new(reader.num_dense());
    let (mut labels, mut probs) = (Vec::new(), Vec::new());
    while reader.next_batch(&mut batch, 1024)? > 0 {
        if let Some(s) = scaler {
            s.apply(&mut batch);
        }
        let (x, _) = tensors(&batch, model.device());
        let p = tch::no_grad(|| net.forward(&x).sigmoid().squeeze_dim(1).to_device(Device::Cpu));
        labels.extend_from_slice(&batch.labels);
        probs.extend(Vec::<f32>::try_from(&p)?);
    }
    if labels.is_empty() {
        bail!("the test data has no examples");
    }
    let n = labels.len() as u64;
    Ok((
        metrics::log_loss(&labels, &probs),
        metrics::auc(&labels, &probs),
        metrics::accuracy(&labels, &probs),
        n,
    ))
}

/// Appends an evaluation to the job's results file (`output.dir`/`output.results`), one JSON
/// line as the built-in trainer writes it, where `gradflow launch` says the results are.
fn append_result(job: &JobConfig, event: &Event) -> Result<()> {
    use std::io::Write;
    let path = job.output_dir().join(&job.output.results);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut line = serde_json::to_value(event)?;
    line["job"] = job.name.clone().into();
    line["mode"] = job.mode.to_string().into();
    line["workers"] = job.workers.into();
    line["servers"] = job.servers.into();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{line}").with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(std::env::var("GRADFLOW_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    let flags = flags()?;
    tch::set_num_threads(flags.threads);
    let cluster = ClusterSpec::from_env()
        .context("tch_mlp is a gradflow worker: run it through `gradflow launch examples/tch_mlp.toml`")?;
    let job = &cluster.job_config;
    let index = cluster.index;
    if job.data.sharding == gradflow_job::Sharding::Dynamic {
        bail!("tch_mlp reads its data itself, statically: set data.sharding = \"static\" (or remove it)");
    }

    // Every worker seeds tch alike, so they build the same model and declare the same spec.
    tch::manual_seed(job.train.seed as i64);
    let device = flags.device.unwrap_or_else(|| device_for_worker(index));
    let mut reader =
        Reader::open(&job.train_reader(), ShardSpec::new(index as usize, cluster.num_workers as usize)?)?;
    // The same scaling on every worker, measured as the built-in trainer does.
    let scaler = gradflow_trainer::standardizer(job)?;
    let features = reader.num_dense() as i64;

    let vs = nn::VarStore::new(device);
    let net = nn::seq()
        .add(nn::linear(vs.root() / "hidden", features, flags.hidden, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(vs.root() / "out", flags.hidden, 1, Default::default()));
    let mut model = TchAdapter::builder(&vs, OptimizerConfig::adam(flags.lr)).seed(job.train.seed).build()?;

    let mut config = WorkerConfig::new(cluster.servers.clone(), index);
    config.partition_bytes = job.server.partition_bytes;
    config.transport = job.transport.clone();
    config.heartbeat_interval = (job.server.heartbeat_timeout / 5).max(std::time::Duration::from_millis(20));
    config.startup_timeout = job.server.startup_timeout;
    let mut worker = Worker::connect(config).await?;
    model.declare(&mut worker).await?;
    if job.mode == Mode::Sync {
        // A restarted worker joins the step the servers are on, after the batches trained.
        let version = worker.status().await?.iter().map(|s| s.version).max().unwrap_or(0);
        worker.set_step(version);
    }
    let mut batch = Batch::new(reader.num_dense());
    for _ in 0..worker.current_step() {
        if reader.next_batch(&mut batch, job.train.batch_size)? == 0 {
            break;
        }
    }

    let (mut samples, mut steps) = (0u64, 0u64);
    let (mut window_loss, mut window_steps, mut window_samples) = (0f64, 0u64, 0u64);
    let (started, mut window_start) = (Instant::now(), Instant::now());
    loop {
        if job.train.max_steps.is_some_and(|m| worker.current_step() >= m) {
            break;
        }
        let n = reader.next_batch(&mut batch, job.train.batch_size)?;
        if n == 0 {
            break;
        }
        if let Some(s) = &scaler {
            s.apply(&mut batch);
        }
        let (x, y) = tensors(&batch, device);
        model.pull(&worker).await?;
        let loss = tokio::task::block_in_place(|| {
            let loss = net.forward(&x).squeeze_dim(1).binary_cross_entropy_with_logits::<Tensor>(
                &y,
                None,
                None,
                Reduction::Mean,
            );
            loss.backward();
            loss.double_value(&[])
        });
        if let StepOutcome::Stale { resumed_at } = model.step(&mut worker).await? {
            tracing::warn!(
                worker = index,
                resumed_at,
                "this batch's gradients were discarded: the servers had moved on"
            );
        }
        (steps, samples) = (steps + 1, samples + n as u64);
        (window_loss, window_steps, window_samples) =
            (window_loss + loss, window_steps + 1, window_samples + n as u64);
        if steps % job.train.log_every_steps == 0 {
            Event::Progress {
                worker: index,
                step: worker.current_step(),
                epoch: reader.epoch(),
                samples,
                loss: window_loss / window_steps as f64,
                samples_per_sec: window_samples as f64 / window_start.elapsed().as_secs_f64().max(1e-9),
            }
            .emit();
            (window_loss, window_steps, window_samples, window_start) = (0.0, 0, 0, Instant::now());
        }
        if reader.end_of_epoch() && index == 0 && !job.data.test.is_empty() {
            let (test_loss, test_auc, test_accuracy, test_examples) =
                evaluate(job, &mut model, &net, &worker, scaler.as_ref()).await?;
            let event = Event::Eval {
                worker: index,
                epoch: reader.epoch() + 1,
                step: worker.current_step(),
                test_loss,
                test_auc,
                test_accuracy,
                test_examples,
            };
            event.emit();
            append_result(job, &event)?;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "tch_mlp worker {index} on {device:?}: {steps} steps, {samples} examples in {secs:.2}s ({:.0} samples/s)",
        samples as f64 / secs.max(1e-9)
    );
    Event::Done { worker: index, step: worker.current_step(), samples }.emit();
    worker.leave().await?;
    Ok(())
}
