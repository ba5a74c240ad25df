//! The fault-injection suite, part 2: the network (`.ci/faults.sh` runs the whole suite).
//!
//! - A worker cut off the network for longer than the heartbeat timeout, then healed: the job
//!   goes on without it and takes it back, and every epoch still puts each training example
//!   into the model exactly once. The partition is made in a network namespace the test
//!   creates itself (`faults_net/netns.rs`); where that is not permitted the test prints
//!   "skipped: ..." and passes.
//! - 64 light workers pushing to 2 servers at once: no error, and the servers' memory does
//!   not grow without bound.
//!
//! Both print the figures docs quote (run with `--nocapture`). They take the machine one at a
//! time, even under a parallel test runner, so that the timings mean something.

mod common;
#[path = "faults_net/netns.rs"]
mod netns;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use common::*;
use gradflow_core::{DenseSpec, Initializer, ModelSpec, OptimizerConfig, SparseSpec};
use gradflow_worker::{Worker, WorkerConfig};

/// One test at a time in this file.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// An `@gradflow` event line, when it was read and from which process.
#[derive(Clone, Debug)]
struct Event {
    at: Instant,
    from: String,
    json: serde_json::Value,
}

impl Event {
    fn is(&self, from: &str, event: &str) -> bool {
        self.from == from && self.json["event"] == event
    }

    fn step(&self) -> u64 {
        self.json["step"].as_u64().unwrap()
    }
}

/// A child process with its standard output read for events and its standard error kept.
/// Killed when dropped; on a panic its last log lines are printed.
struct Proc {
    name: String,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, events: &mpsc::Sender<Event>) -> Proc {
        if !cmd.get_envs().any(|(k, _)| k == "GRADFLOW_LOG") {
            cmd.env("GRADFLOW_LOG", "warn");
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let (tx, from) = (events.clone(), name.to_string());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(json) = line.strip_prefix("@gradflow ").and_then(|j| serde_json::from_str(j).ok())
                {
                    let _ = tx.send(Event { at: Instant::now(), from: from.clone(), json });
                }
            }
        });
        let log = Arc::new(Mutex::new(Vec::new()));
        let keep = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                keep.lock().unwrap().push(line);
            }
        });
        Proc { name: name.to_string(), child, log }
    }

    fn log_contains(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
            let tail = &log[log.len().saturating_sub(30)..];
            eprintln!("--- last lines of {}'s log:\n{}", self.name, tail.join("\n"));
        }
    }
}

/// Every event read so far, and the ones still coming.
struct Events {
    rx: mpsc::Receiver<Event>,
    seen: Vec<Event>,
}

impl Events {
    fn new() -> (mpsc::Sender<Event>, Events) {
        let (tx, rx) = mpsc::channel();
        (tx, Events { rx, seen: Vec::new() })
    }

    /// The first event (already seen or still to come) that `pred` accepts.
    fn wait_for(&mut self, what: &str, timeout: Duration, pred: impl Fn(&Event) -> bool) -> Event {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.seen.iter().find(|e| pred(e)) {
                return e.clone();
            }
            match self.rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(e) => self.seen.push(e),
                Err(_) => panic!("no {what} within {timeout:?}"),
            }
        }
    }

    /// Waits for `proc` to exit, reading events meanwhile; `None` if it is still running after
    /// `timeout`.
    fn wait_exit(&mut self, proc: &mut Proc, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Ok(e) = self.rx.try_recv() {
                self.seen.push(e);
            }
            if let Some(status) = proc.child.try_wait().unwrap() {
                // Its last events may still be in the pipe.
                std::thread::sleep(Duration::from_millis(100));
                while let Ok(e) = self.rx.try_recv() {
                    self.seen.push(e);
                }
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Starts `gradflow ps` for `shard` of `job` listening on `listen`, logging at `log`.
fn start_ps(job: &Path, shard: u32, listen: &str, log: &str, events: &mpsc::Sender<Event>) -> Proc {
    let mut cmd = gradflow();
    cmd.env("GRADFLOW_LOG", log).args(["ps", "--job"]).arg(job).args([
        "--shard",
        &shard.to_string(),
        "--listen",
        listen,
    ]);
    Proc::spawn(&format!("ps{shard}"), cmd, events)
}

/// The servers' addresses, in shard order, once they listen.
fn addresses(events: &mut Events, shards: u32) -> Vec<String> {
    (0..shards)
        .map(|s| {
            let from = format!("ps{s}");
            let e = events.wait_for("listening event", Duration::from_secs(60), |e| e.is(&from, "listening"));
            e.json["addr"].as_str().unwrap().to_string()
        })
        .collect()
}

/// What the servers said at one moment: shard 0's model version and live workers, and
/// every shard's version.
#[derive(Clone, Debug)]
struct Sample {
    at: Instant,
    version: u64,
    live: Vec<u32>,
    versions: Vec<u64>,
}

/// Asks shard 0 for its model version and live workers every 50 ms, as an observer (not
/// counted as a worker), until `stop`.
fn watch_status(servers: Vec<String>, stop: Arc<AtomicBool>) -> Arc<Mutex<Vec<Sample>>> {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let out = samples.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let observer = Worker::connect(WorkerConfig::observer(servers)).await.expect("observer connects");
            while !stop.load(Ordering::Relaxed) {
                if let Ok(status) = observer.status().await {
                    let sample = Sample {
                        at: Instant::now(),
                        version: status[0].version,
                        live: status[0].live_workers.clone(),
                        versions: status.iter().map(|s| s.version).collect(),
                    };
                    out.lock().unwrap().push(sample);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    });
    samples
}

/// The samples where something changed, and the events, in time order from `t0`: what a
/// failure message needs to tell what happened.
fn timeline(t0: Instant, samples: &[Sample], events: &[Event], marks: &[(&str, Instant)]) -> String {
    let mut lines: Vec<(Instant, String)> = Vec::new();
    let mut last: Option<&Sample> = None;
    // Every change of the live workers, and a line every 25 versions in between.
    for s in samples {
        if last.is_none_or(|l| l.live != s.live) || last.is_some_and(|l| s.version / 25 != l.version / 25) {
            lines.push((s.at, format!("servers: versions {:?}, live on shard 0 {:?}", s.versions, s.live)));
        }
        last = Some(s);
    }
    lines.extend(events.iter().map(|e| (e.at, format!("{}: {}", e.from, e.json))));
    lines.extend(marks.iter().map(|(m, at)| (*at, m.to_string())));
    lines.sort_by_key(|(at, _)| *at);
    lines
        .iter()
        .map(|(at, l)| format!("{:7.2}s {l}", at.saturating_duration_since(t0).as_secs_f64()))
        .collect::<Vec<_>>()
        .join("\n")
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Enough rows that worker 0 alone cannot finish the job while worker 1 is cut off, on a
/// machine several times faster than today's (about 80,000 samples/s alone here).
const PARTITION_TRAIN_ROWS: usize = 400_000;
const PARTITION_EPOCHS: u64 = 2;
/// Worker 1 stays cut off at least this long (three heartbeat timeouts)...
const MIN_CUT: Duration = Duration::from_secs(3);
/// ...and until shard 0 has dropped it and completed this many steps without it.
const ALONE_STEPS: u64 = 5;
/// The cut ends here whatever happened (the assertions then say what did not).
const MAX_CUT: Duration = Duration::from_secs(30);

/// The first status sample from `cut_at` until before `until` in which shard 0 no longer counts
/// worker 1 as live.
fn dropped_after(samples: &[Sample], cut_at: Instant, until: Instant) -> Option<usize> {
    let after_cut = samples.iter().position(|s| s.at >= cut_at)?;
    samples[after_cut..].iter().position(|s| s.at < until && !s.live.contains(&1)).map(|i| after_cut + i)
}

/// A 2-worker sync wide & deep job with dynamic data sharding over small tasks and a 1 s
/// heartbeat timeout.
fn partition_job() -> String {
    wide_deep_job("net-partition", 2, "sync", "")
        .replace("train_rows = 300000", &format!("train_rows = {PARTITION_TRAIN_ROWS}"))
        .replace("test_rows = 25000", "test_rows = 5000")
        .replace("[data]\n", "[data]\nsharding = \"dynamic\"\ntask_bytes = 100000\n")
        + &format!("[train]\nepochs = {PARTITION_EPOCHS}\nlog_every_steps = 5\n")
        + "[server]\nheartbeat_timeout = \"1s\"\n"
}

/// Worker 1 of a 2-worker sync job runs in its own network namespace and is cut off once it
/// has trained a few steps, until the job has gone on without it for a few steps, then healed.
/// (The cut ends on what the servers report rather than after a fixed time, so that the job
/// still has work for worker 1 when it is back however fast this machine trains.)
#[test]
fn a_worker_cut_off_the_network_is_dropped_and_taken_back() {
    let _serial = serial();
    let net = match netns::Netns::create() {
        Ok(net) => net,
        Err(why) => {
            eprintln!("skipped: cannot make a network namespace here ({why})");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    synth_train_test(dir.path(), PARTITION_TRAIN_ROWS, 5000);
    let job = write(dir.path(), "job.toml", &partition_job());

    // The servers listen on the host end of the veth pair; worker 0 reaches them from the
    // root namespace (unaffected by the cut), worker 1 through the pair.
    let (tx, mut events) = Events::new();
    let listen = format!("{}:0", net.host_ip);
    let _servers: Vec<Proc> = (0..2).map(|s| start_ps(&job, s, &listen, "info", &tx)).collect();
    let addrs = addresses(&mut events, 2);
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_status(addrs.clone(), stop.clone());
    let worker_args = |index: u32| -> Vec<String> {
        let job = job.display().to_string();
        let index = index.to_string();
        ["worker", "--job", &job, "--index", &index, "--servers", &addrs.join(",")].map(String::from).to_vec()
    };
    let t0 = Instant::now();
    let mut w0 = {
        let mut cmd = gradflow();
        cmd.args(worker_args(0));
        Proc::spawn("w0", cmd, &tx)
    };
    let mut w1 = {
        let mut cmd = net.command(env!("CARGO_BIN_EXE_gradflow"));
        cmd.args(worker_args(1));
        Proc::spawn("w1", cmd, &tx)
    };

    let before =
        events.wait_for("progress of worker 1", Duration::from_secs(120), |e| e.is("w1", "progress"));
    net.cut().unwrap();
    let cut_at = Instant::now();
    let gone_on_without_1 = || {
        let samples = watcher.lock().unwrap();
        dropped_after(&samples, cut_at, Instant::now()).is_some_and(|d| {
            let before = samples[d.saturating_sub(1)].version;
            samples.last().is_some_and(|s| s.version >= before + ALONE_STEPS)
        })
    };
    while cut_at.elapsed() < MAX_CUT && (cut_at.elapsed() < MIN_CUT || !gone_on_without_1()) {
        std::thread::sleep(Duration::from_millis(20));
    }
    net.heal().unwrap();
    let heal_at = Instant::now();

    let exits = [(&mut w0, Duration::from_secs(60)), (&mut w1, Duration::from_secs(30))]
        .map(|(w, timeout)| events.wait_exit(w, timeout));
    stop.store(true, Ordering::Relaxed);
    let samples = std::mem::take(&mut *watcher.lock().unwrap());
    let story = timeline(t0, &samples, &events.seen, &[("CUT", cut_at), ("HEAL", heal_at)]);
    for (w, exit) in exits.iter().enumerate() {
        match exit {
            Some(status) if status.success() => {}
            Some(status) => panic!("worker {w} failed ({status}):\n{story}"),
            None => panic!("worker {w} did not finish:\n{story}"),
        }
    }
    if std::env::var_os("GRADFLOW_FAULTS_VERBOSE").is_some() {
        eprintln!("{story}");
    }

    // (a) The job went on without worker 1: shard 0 dropped it from the quorum during the
    // cut and completed steps with worker 0 alone.
    let dropped = dropped_after(&samples, cut_at, heal_at)
        .unwrap_or_else(|| panic!("worker 1 was never dropped during the cut:\n{story}"));
    let version_before_drop = samples[dropped - 1].version;
    let going_on = samples[dropped..]
        .iter()
        .find(|s| s.at < heal_at && s.version > version_before_drop)
        .unwrap_or_else(|| panic!("no step completed without worker 1 before the heal:\n{story}"));
    let at_heal = samples.iter().rev().find(|s| s.at < heal_at).unwrap();
    let alone = at_heal.version - version_before_drop;
    assert!(alone >= 2, "worker 0 completed only {alone} steps alone during the cut:\n{story}");

    // (b) Worker 1 came back: live again on shard 0, and training (its steps go on).
    let live_again = samples
        .iter()
        .find(|s| s.at >= heal_at && s.live.contains(&1))
        .unwrap_or_else(|| panic!("worker 1 never counted as live after the heal:\n{story}"));
    let trains_again = events
        .seen
        .iter()
        .find(|e| e.at >= heal_at && e.is("w1", "progress") && e.step() > before.step())
        .unwrap_or_else(|| panic!("no progress of worker 1 after the heal:\n{story}"))
        .clone();

    // (d) Nothing lost, nothing trained twice: every epoch put each training example into the
    // model exactly once, and was scored once.
    let evals = results(dir.path(), "net-partition");
    for epoch in 1..=PARTITION_EPOCHS {
        let lines: Vec<_> = evals.iter().filter(|e| e["epoch"].as_u64() == Some(epoch)).collect();
        assert!(!lines.is_empty(), "epoch {epoch} has no eval line: {evals:?}");
        for e in &lines {
            assert_eq!(e["epoch_train_examples"].as_u64(), Some(PARTITION_TRAIN_ROWS as u64), "{e}");
        }
        assert_eq!(lines.len(), 1, "epoch {epoch} was scored {} times: {lines:?}\n{story}", lines.len());
    }
    assert_eq!(evals.len() as u64, PARTITION_EPOCHS, "{evals:?}");

    let lease_lost = w1.log_contains("handed to another worker");
    eprintln!(
        "network partition of worker 1 for {} (server.heartbeat_timeout = 1s, sync, 2 workers):",
        secs(heal_at - cut_at)
    );
    eprintln!("  cut -> worker 1 dropped from the quorum:        {}", secs(samples[dropped].at - cut_at));
    eprintln!("  cut -> job going on without worker 1:          {}", secs(going_on.at - cut_at));
    eprintln!("  steps completed by worker 0 alone during the cut: {alone}");
    eprintln!("  heal -> worker 1 live again on the servers:     {}", secs(live_again.at - heal_at));
    eprintln!("  heal -> worker 1 training again (progress):     {}", secs(trains_again.at - heal_at));
    eprintln!("  worker 1's data task handed to worker 0 (lease lost): {lease_lost}");
    eprintln!(
        "  epoch_train_examples: {:?}",
        evals.iter().map(|e| e["epoch_train_examples"].as_u64().unwrap()).collect::<Vec<_>>()
    );
}

const MANY_WORKERS: u32 = 64;
/// Floats in the dense tensor: 256 KiB.
const DENSE_LEN: usize = 64 * 1024;
/// Pieces of 64 KiB, so the tensor is spread over both servers.
const MANY_PARTITION_BYTES: u64 = 64 * 1024;
const EMB_DIM: usize = 16;
/// Ids per step per worker, drawn from `ID_SPACE`: the table fills within the first seconds,
/// so later memory growth cannot be new rows.
const IDS_PER_STEP: usize = 64;
const ID_SPACE: u64 = 20_000;

fn light_spec() -> ModelSpec {
    ModelSpec {
        dense: vec![DenseSpec {
            name: "w".into(),
            shape: vec![DENSE_LEN as u64],
            init: Initializer::Zeros,
            optimizer: OptimizerConfig::adagrad(0.01),
        }],
        sparse: vec![SparseSpec {
            name: "emb".into(),
            dim: EMB_DIM as u32,
            init: Initializer::Normal { mean: 0.0, std: 0.01, seed: 1 },
            optimizer: OptimizerConfig::adagrad(0.01),
        }],
    }
}

/// xorshift64*: gradients and ids without a dependency.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

fn small(state: &mut u64) -> f32 {
    (next(state) >> 40) as f32 / (1u64 << 24) as f32 * 2e-3 - 1e-3
}

/// Pull, random gradients, push, until `until`; the steps taken.
async fn light_worker(servers: Vec<String>, index: u32, until: Instant) -> Result<u64, String> {
    let fail = |what: &str, e: gradflow_worker::WorkerError| format!("worker {index}: {what}: {e}");
    let mut config = WorkerConfig::new(servers, index);
    config.partition_bytes = MANY_PARTITION_BYTES;
    let mut worker = Worker::connect(config).await.map_err(|e| fail("connect", e))?;
    worker.declare(light_spec()).await.map_err(|e| fail("declare", e))?;
    let mut rng = 0x9E37_79B9_7F4A_7C15 ^ u64::from(index + 1);
    let mut dense = vec![Vec::new()];
    let mut dense_grad = vec![0f32; DENSE_LEN];
    let (mut ids, mut rows) = (vec![0u64; IDS_PER_STEP], Vec::new());
    let mut sparse_grad = vec![0f32; IDS_PER_STEP * EMB_DIM];
    let mut steps = 0;
    while Instant::now() < until {
        worker.pull_all_dense(&mut dense).await.map_err(|e| fail("pull dense", e))?;
        ids.iter_mut().for_each(|id| *id = next(&mut rng) % ID_SPACE);
        worker.pull_sparse("emb", &ids, &mut rows).await.map_err(|e| fail("pull sparse", e))?;
        // A few fresh values per step keep it cheap; the gradient still changes every step.
        let at = (next(&mut rng) % DENSE_LEN as u64) as usize;
        dense_grad[at..(at + 256).min(DENSE_LEN)].iter_mut().for_each(|g| *g = small(&mut rng));
        sparse_grad.iter_mut().for_each(|g| *g = small(&mut rng));
        worker.push_dense("w", &dense_grad).map_err(|e| fail("push dense", e))?;
        worker.push_sparse("emb", &ids, &sparse_grad).map_err(|e| fail("push sparse", e))?;
        worker.step().await.map_err(|e| fail("step", e))?;
        steps += 1;
    }
    worker.leave().await.map_err(|e| fail("leave", e))?;
    Ok(steps)
}

/// `VmRSS` or `VmHWM` of process `pid`, in bytes; 0 once the process is gone (the test then
/// fails on the server having exited).
fn memory(pid: u32, field: &str) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return 0 };
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// 64 in-process workers (the worker library, one runtime) pull and push as fast as they can
/// for `GRADFLOW_FAULT_SECS` (default 20; `.ci/faults.sh` runs 60) against 2 `gradflow ps`
/// processes, async, while the servers' RSS is sampled every second.
#[test]
fn sixty_four_workers_push_to_two_servers_without_error_or_memory_growth() {
    let _serial = serial();
    let duration = Duration::from_secs(
        std::env::var("GRADFLOW_FAULT_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(20),
    );
    let dir = tempfile::tempdir().unwrap();
    // The servers read the job's settings only; the model comes from the workers' declare.
    let job = write(
        dir.path(),
        "job.toml",
        &format!(
            "name = \"many-workers\"\nservers = 2\nworkers = {MANY_WORKERS}\nmode = \"async\"\n\
             [model]\nkind = \"logistic_regression\"\n[data]\ntrain = \"unused.csv\"\n\
             [server]\npartition_bytes = {MANY_PARTITION_BYTES}\n"
        ),
    );
    let (tx, mut events) = Events::new();
    let mut servers: Vec<Proc> = (0..2).map(|s| start_ps(&job, s, "127.0.0.1:0", "warn", &tx)).collect();
    let addrs = addresses(&mut events, 2);
    let pids: Vec<u32> = servers.iter().map(|p| p.child.id()).collect();

    // The servers' resident memory, every second of the run.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, pids) = (stop.clone(), pids.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut samples: Vec<(Duration, Vec<u64>)> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                samples.push((start.elapsed(), pids.iter().map(|p| memory(*p, "VmRSS:")).collect()));
                std::thread::sleep(Duration::from_secs(1));
            }
            samples
        })
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let started = Instant::now();
    let until = started + duration;
    let outcomes: Vec<Result<u64, String>> = rt.block_on(async {
        let tasks: Vec<_> =
            (0..MANY_WORKERS).map(|w| tokio::spawn(light_worker(addrs.clone(), w, until))).collect();
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.unwrap_or_else(|e| Err(format!("worker task: {e}"))));
        }
        outcomes
    });
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().unwrap();
    let peaks: Vec<u64> = pids.iter().map(|p| memory(*p, "VmHWM:")).collect();

    let errors: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(errors.is_empty(), "{} workers failed, first: {}", errors.len(), errors[0]);
    let steps: Vec<u64> = outcomes.into_iter().map(Result::unwrap).collect();
    assert!(steps.iter().all(|s| *s > 0), "a worker took no step: {steps:?}");
    for p in &mut servers {
        assert!(p.child.try_wait().unwrap().is_none(), "{} exited", p.name);
        assert!(!p.log_contains("ERROR"), "{} logged an error", p.name);
    }

    // Memory: the baseline is the highest RSS of the first third (model materialized, every
    // connection open, buffers at working size), the late level the median of the last
    // third. A leak per push or per step grows RSS linearly with time, so the late median
    // would run away from the baseline; the median ignores one-off spikes (a burst of
    // in-flight messages), and the baseline as a maximum absorbs the warm-up. The 8 MiB
    // allowance keeps a small baseline from failing on allocator noise (glibc keeps freed
    // memory in per-thread arenas).
    let total: u64 = steps.iter().sum();
    eprintln!(
        "{MANY_WORKERS} workers -> 2 servers, async, {} (dense {} floats, sparse dim {EMB_DIM}):",
        secs(elapsed),
        DENSE_LEN
    );
    eprintln!(
        "  steps: {total} total, {:.0} steps/s, per worker min {} max {}",
        total as f64 / elapsed.as_secs_f64(),
        steps.iter().min().unwrap(),
        steps.iter().max().unwrap()
    );
    if std::env::var_os("GRADFLOW_FAULTS_VERBOSE").is_some() {
        for (t, rss) in &samples {
            let rss: Vec<String> = rss.iter().map(|r| mib(*r)).collect();
            eprintln!("  {:5.1}s RSS {}", t.as_secs_f64(), rss.join(", "));
        }
    }
    let third = elapsed / 3;
    for (shard, peak) in peaks.iter().enumerate() {
        let first: Vec<u64> = samples.iter().filter(|(t, _)| *t <= third).map(|(_, r)| r[shard]).collect();
        let mut last: Vec<u64> =
            samples.iter().filter(|(t, _)| *t >= elapsed - third).map(|(_, r)| r[shard]).collect();
        assert!(!first.is_empty() && !last.is_empty(), "too few memory samples: {samples:?}");
        last.sort_unstable();
        let base = *first.iter().max().unwrap();
        let late = last[last.len() / 2];
        let ratio = late as f64 / base as f64;
        eprintln!(
            "  server {shard}: peak RSS (VmHWM) {}, end of first third {}, last third median {}, growth ratio {ratio:.3}",
            mib(*peak),
            mib(base),
            mib(late)
        );
        assert!(
            ratio <= 1.25 || late <= base + (8 << 20),
            "server {shard}'s memory grew from {} to {} ({ratio:.2}x): {samples:?}",
            mib(base),
            mib(late)
        );
    }
}
