//! What a user sees of a job, through the real `gradflow` binary: the example job's
//! TensorBoard scalars (read by our reader and, when the `tensorboard` Python package is
//! installed, by TensorBoard's own), its results line, its log files, its progress lines, and
//! `gradflow status` / `gradflow logs` of a local job with no Kubernetes configuration at all.

mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{gradflow, write};

/// `gradflow status|logs ...` with no Kubernetes configuration to find: no kubeconfig, no
/// home folder holding one, no in-cluster service account variables.
fn local_command(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = gradflow()
        .args(args)
        .current_dir(dir)
        .env("KUBECONFIG", dir.join("no-such-kubeconfig"))
        .env("HOME", dir)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .expect("run gradflow");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `examples/wide_deep.toml` as it is, its data and output moved into `dir`.
fn example_job(dir: &Path) -> PathBuf {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/wide_deep.toml");
    let text = std::fs::read_to_string(&example).unwrap();
    assert!(
        text.contains("\"../runs/data/") && text.contains("dir = \"../runs/wide-deep\""),
        "the example moved its files:\n{text}"
    );
    let text =
        text.replace("\"../runs/data/", "\"data/").replace("dir = \"../runs/wide-deep\"", "dir = \"out\"");
    write(dir, "wide_deep.toml", &text)
}

/// The `(step, total)` of a progress line `epoch 1/1  step S/T (P%) ...`.
fn progress_step(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("epoch 1/1  step ")?;
    let (step, rest) = rest.split_once('/')?;
    let total = rest.split_whitespace().next()?;
    Some((step.parse().ok()?, total.parse().ok()?))
}

#[test]
fn the_example_job_leaves_curves_results_logs_and_a_state_that_status_and_logs_show() {
    let dir = tempfile::tempdir().unwrap();
    let job = example_job(dir.path());
    let job_arg = job.to_str().unwrap();
    let mut launch = gradflow()
        .args(["launch", job_arg])
        .current_dir(dir.path())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start gradflow launch");
    let stderr = launch.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        std::io::BufReader::new(stderr).lines().map_while(Result::ok).collect::<Vec<_>>()
    });

    // Running while it trains: polled, with a deadline generous enough for writing the data
    // and starting four processes on a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(600);
    let running = loop {
        let (ok, out, err) = local_command(dir.path(), &["status", job_arg]);
        if ok && out.contains("): Running\n") {
            break out;
        }
        if ok && out.contains("): Succeeded\n") {
            panic!("the job finished before `gradflow status` saw it Running:\n{out}");
        }
        assert!(launch.try_wait().unwrap().is_none(), "the launcher exited while status said:\n{out}{err}");
        assert!(Instant::now() < deadline, "never Running:\n{out}{err}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(running.starts_with("job wide-deep (local, run wide-deep-"), "{running}");
    assert!(running.contains("\nworker-1 "), "{running}");

    let status = launch.wait().unwrap();
    let lines = reader.join().unwrap();
    let log = lines.join("\n");
    assert!(status.success(), "{log}");
    let run_id = log
        .lines()
        .find_map(|l| l.strip_prefix("[launch] job wide-deep: run "))
        .unwrap_or_else(|| panic!("no run id in\n{log}"))
        .to_string();

    // Succeeded after, with the run's last step and nothing restarted.
    let (ok, after, err) = local_command(dir.path(), &["status", job_arg]);
    assert!(ok, "{err}");
    assert!(after.starts_with(&format!("job wide-deep (local, run {run_id}): Succeeded\n")), "{after}");
    assert!(after.contains("restarts 0"), "{after}");
    let (ok, json, err) = local_command(dir.path(), &["status", job_arg, "--json"]);
    assert!(ok, "{err}");
    let state: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(state["processes"].as_array().unwrap().iter().all(|p| p["phase"] == "Succeeded"), "{json}");
    // The last step, from the workers' reports of being done: about 391 (each worker's share
    // of the bytes is about half the rows).
    assert!(state["step"].as_u64().unwrap() >= 380, "{json}");

    // Off a terminal, a progress line every `log_every_steps` (50) steps of the total, which
    // the launcher counted from the data: 200,000 rows, 2 workers, batches of 256.
    let progress: Vec<&str> =
        lines.iter().map(String::as_str).filter(|l| l.starts_with("epoch 1/1  step ")).collect();
    let steps: Vec<(u64, u64)> =
        progress.iter().map(|l| progress_step(l).unwrap_or_else(|| panic!("{l}"))).collect();
    assert!(steps.len() >= 5, "{log}");
    assert!(steps.iter().all(|&(s, total)| s % 50 == 0 && total == 391), "{steps:?}");
    assert!(steps.windows(2).all(|w| w[0].0 < w[1].0), "{steps:?}");
    assert!(progress.iter().all(|l| l.contains("%)  samples/s ") && l.contains("  loss ")), "{log}");
    assert!(progress[1..].iter().all(|l| l.contains("  ETA ")), "{log}");
    assert_eq!(state["total_steps"], 391, "{json}");

    // The results line: this run, when, and the epoch's mean training loss.
    let out = dir.path().join("out");
    let results = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let line: serde_json::Value = serde_json::from_str(results.lines().last().unwrap()).unwrap();
    assert_eq!(line["run_id"], run_id.as_str(), "{line}");
    let time = line["time"].as_str().unwrap();
    assert!(time.len() == 24 && time.ends_with('Z') && time.starts_with("20"), "{line}");
    let train_loss = line["train_loss"].as_f64().unwrap();
    assert!(train_loss > 0.2 && train_loss < 0.7, "{line}");

    // Every process's log, and the launcher's, in files.
    let logs = out.join("logs").join(&run_id);
    for name in ["launch.log", "ps-0-0.log", "ps-1-0.log", "worker-0-0.log", "worker-1-0.log"] {
        let text = std::fs::read_to_string(logs.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!text.is_empty(), "{name} is empty");
    }
    let (ok, worker0, err) =
        local_command(dir.path(), &["logs", job_arg, "--role", "worker", "--index", "0"]);
    assert!(ok, "{err}");
    assert_eq!(worker0, std::fs::read_to_string(logs.join("worker-0-0.log")).unwrap());
    assert!(worker0.contains("@gradflow {\"event\":\"eval\""), "{worker0}");
    let (ok, all, err) = local_command(dir.path(), &["logs", job_arg]);
    assert!(ok, "{err}");
    for prefix in ["[launch] ", "[ps-0] ", "[ps-1] ", "[worker-0] ", "[worker-1] "] {
        assert!(all.lines().any(|l| l.starts_with(prefix)), "no {prefix:?} line in\n{all}");
    }
    // `-f` of a finished job prints what is there and returns.
    let (ok, followed, err) =
        local_command(dir.path(), &["logs", job_arg, "--role", "ps", "--index", "1", "-f"]);
    assert!(ok && followed == std::fs::read_to_string(logs.join("ps-1-0.log")).unwrap(), "{err}");

    // TensorBoard scalars, one folder per process of the run: read back by our reader...
    let tb = out.join("tensorboard").join(&run_id);
    let worker0_events = event_file(&tb.join("worker-0"));
    let scalars = gradflow_tensorboard::read_scalars(&worker0_events).unwrap();
    let series =
        |tag: &str| scalars.iter().filter(|s| s.tag == tag).map(|s| (s.step, s.value)).collect::<Vec<_>>();
    let loss = series("train/loss");
    assert!(loss.len() >= 5 && loss.iter().all(|&(_, v)| v > 0.0 && v < 1.0), "{loss:?}");
    let auc = series("test/auc");
    assert!(auc.len() == 1 && auc[0].1 > 0.6, "{auc:?}");
    // Asked of the servers at each report; one that answered late is only missing.
    let versions = series("shard-1/model_version");
    assert!(!versions.is_empty() && versions.iter().all(|&(step, v)| v as u64 >= step - 1), "{versions:?}");
    assert!(!gradflow_tensorboard::read_scalars(&event_file(&tb.join("worker-1"))).unwrap().is_empty());
    // Each shard's latency and model version, the last point written as it stopped.
    for shard in ["ps-0", "ps-1"] {
        let scalars = gradflow_tensorboard::read_scalars(&event_file(&tb.join(shard))).unwrap();
        let last = |tag: &str| scalars.iter().rev().find(|s| s.tag == tag).map(|s| (s.step, s.value));
        // About 391 steps: each worker's share of the bytes is about half the rows.
        let (step, version) = last("shard/model_version").unwrap();
        assert!(step >= 380 && version == step as f32, "{shard}: {scalars:?}");
        let (_, push) = last("shard/push_seconds").unwrap();
        let (_, pull) = last("shard/pull_seconds").unwrap();
        assert!(push > 0.0 && pull > 0.0, "{shard}: {scalars:?}");
    }

    // ... and by TensorBoard's own.
    tensorboard_reads(&out, &run_id);
}

/// The one event file in `dir`.
fn event_file(dir: &Path) -> PathBuf {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents."))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.into_iter().next().unwrap()
}

/// Every scalar series TensorBoard's event multiplexer finds under a folder, as
/// `run tag count last_step last_value` lines: what `tensorboard --logdir` would plot.
const TENSORBOARD_READER: &str = r#"
import sys
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
m = EventMultiplexer()
m.AddRunsFromDirectory(sys.argv[1])
m.Reload()
for run, tags in sorted(m.Runs().items()):
    for tag in sorted(tags.get("scalars", [])):
        events = m.Scalars(run, tag)
        print(run, tag, len(events), events[-1].step, events[-1].value)
"#;

fn tensorboard_reads(out: &Path, run_id: &str) {
    let has_tensorboard =
        Command::new("python3").args(["-c", "import tensorboard"]).output().is_ok_and(|o| o.status.success());
    if !has_tensorboard {
        eprintln!(
            "NOTICE: skipping TensorBoard's own reader: python3 with the `tensorboard` package is not installed (pip install tensorboard)"
        );
        return;
    }
    let read = Command::new("python3").args(["-c", TENSORBOARD_READER]).arg(out).output().unwrap();
    let text = String::from_utf8_lossy(&read.stdout).into_owned();
    assert!(read.status.success(), "{text}{}", String::from_utf8_lossy(&read.stderr));
    let series = |tag: &str| -> Vec<(u64, f64)> {
        let run = format!("tensorboard/{run_id}/worker-0");
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                (f.len() == 5 && f[0] == run && f[1] == tag)
                    .then(|| (f[2].parse().unwrap(), f[4].parse().unwrap()))
            })
            .collect()
    };
    let loss = series("train/loss");
    assert!(loss.len() == 1 && loss[0].0 >= 5, "no training-loss series in\n{text}");
    let auc = series("test/auc");
    assert!(auc.len() == 1 && auc[0].0 == 1 && auc[0].1 > 0.6, "no test-AUC series in\n{text}");
}

#[test]
fn a_failing_job_is_failed_in_status_with_why_and_its_worker_log_kept() {
    let dir = tempfile::tempdir().unwrap();
    let text = common::wide_deep_job("fails", 1, "sync", "[launcher]\nmax_restarts = 1\n[worker]\ncommand = [\"sh\", \"-c\", \"echo training here; echo broken >&2; exit 1\"]\n")
        .replace("train_rows = 300000", "train_rows = 2000")
        .replace("test_rows = 25000", "test_rows = 500");
    let job = write(dir.path(), "fails.toml", &text);
    let job_arg = job.to_str().unwrap();
    let out = gradflow().args(["launch", job_arg]).current_dir(dir.path()).output().unwrap();
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let (ok, status, err) = local_command(dir.path(), &["status", job_arg]);
    assert!(ok, "{err}");
    assert!(status.contains("): Failed\n"), "{status}");
    assert!(status.contains("worker-0 failed (exit status: 1) after 1 restart(s)"), "{status}");
    assert!(status.contains("restarts 1"), "{status}");
    // The latest attempt's log by default, the first one on request.
    for attempt in [None, Some("0")] {
        let mut args = vec!["logs", job_arg, "--role", "worker"];
        if let Some(a) = attempt {
            args.extend(["--attempt", a]);
        }
        let (ok, logs, err) = local_command(dir.path(), &args);
        assert!(ok, "{err}");
        // Standard output and error are read apart: their lines keep no order between them.
        let mut lines: Vec<&str> = logs.lines().collect();
        lines.sort();
        assert_eq!(lines, ["broken", "training here"], "{logs}");
    }
    // A name is a Kubernetes job's; a job file's flags are checked.
    let (ok, _, err) = local_command(dir.path(), &["status", job_arg, "-n", "team"]);
    assert!(!ok && err.contains("--namespace applies to Kubernetes jobs only"), "{err}");
}

#[test]
fn a_job_never_launched_has_no_status_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let job = write(dir.path(), "idle.toml", &common::wide_deep_job("idle", 1, "sync", ""));
    let (ok, _, err) = local_command(dir.path(), &["status", job.to_str().unwrap()]);
    assert!(!ok, "{err}");
    assert!(err.contains("job idle has not been launched on this machine"), "{err}");
    assert!(!err.to_lowercase().contains("kube"), "a local job's status must not need Kubernetes: {err}");
}
