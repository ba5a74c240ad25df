//! Every epoch that finished training is scored exactly once, whatever is killed when.
//!
//! Worker 0, the scorer of static data sharding, is stopped while it scores (a fault hook
//! aborts it deterministically: `GRADFLOW_FAULT_ABORT_SCORING`, start k aborts while scoring
//! epoch k + 1), and the hook has the restarted worker wait three heartbeat timeouts before
//! it connects, so the servers drop it first: without the servers holding the epoch's end
//! step, the other worker would move on and the epoch would never be scored.
//!
//! The tests run one at a time: each is a multi-process job, and on a small machine several
//! at once starve each other.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;

const EPOCHS: u64 = 3;

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A small 3-epoch wide & deep job, 2 workers and 2 servers; `sharding` static or dynamic.
fn job_text(name: &str, mode: &str, sharding: &str) -> String {
    let text = wide_deep_job(name, 2, mode, "")
        .replace("num_dense = 13\n", "num_dense = 13\nhash_buckets = 5000\n")
        .replace("train_rows = 300000", "train_rows = 12000")
        .replace("test_rows = 25000", "test_rows = 4000")
        .replace("[data]\n", &format!("[data]\nsharding = \"{sharding}\"\ntask_bytes = 300000\n"))
        + &format!(
            "[train]\nepochs = {EPOCHS}\nbatch_size = 256\nlog_every_steps = 1000\n\
             [server]\nheartbeat_timeout = \"1s\"\n\
             [launcher]\nmax_restarts = 5\n"
        );
    assert!(text.contains("hash_buckets") && text.contains("sharding"), "the base job changed:\n{text}");
    text
}

/// Runs job `name` in `dir`, with the fault hook set to `fault` (if any).
fn run(dir: &Path, name: &str, mode: &str, sharding: &str, fault: Option<&str>) -> Output {
    let job = write(dir, &format!("{name}.toml"), &job_text(name, mode, sharding));
    let mut cmd = gradflow();
    cmd.arg("launch").arg(&job);
    if let Some(f) = fault {
        cmd.env("GRADFLOW_FAULT_ABORT_SCORING", f);
    }
    let out = cmd.output().expect("run gradflow launch");
    assert!(
        out.status.success(),
        "job {name} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The results lines' (epoch, step, AUC), in the order written.
fn scores(dir: &Path, name: &str) -> Vec<(u64, u64, f64)> {
    results(dir, name)
        .iter()
        .map(|r| (r["epoch"].as_u64().unwrap(), r["step"].as_u64().unwrap(), r["test_auc"].as_f64().unwrap()))
        .collect()
}

fn epochs_of(scores: &[(u64, u64, f64)]) -> Vec<u64> {
    scores.iter().map(|s| s.0).collect()
}

fn aborts(out: &Output) -> usize {
    String::from_utf8_lossy(&out.stderr).matches("restarting it").count()
}

#[test]
fn killing_the_scorer_during_each_evaluation_still_scores_every_epoch_once_with_the_undisturbed_auc() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), "calm", "sync", "static", None);
    let calm = scores(dir.path(), "calm");
    assert_eq!(epochs_of(&calm), (1..=EPOCHS).collect::<Vec<_>>());

    let out = run(dir.path(), "killed", "sync", "static", Some("all"));
    assert_eq!(aborts(&out), EPOCHS as usize, "worker 0 should have been stopped once per epoch");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("stopped heartbeating"), "worker 0 should have been dropped while down:\n{log}");
    let killed = scores(dir.path(), "killed");
    // The same epochs, at the same steps, with the model of the same step: the same AUC.
    assert_eq!(killed, calm, "killed while scoring vs undisturbed");
}

#[test]
fn a_scorer_stopped_after_writing_its_line_does_not_score_the_epoch_again() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), "written", "sync", "static", Some("all:written"));
    assert_eq!(aborts(&out), EPOCHS as usize);
    let s = scores(dir.path(), "written");
    assert_eq!(epochs_of(&s), (1..=EPOCHS).collect::<Vec<_>>(), "one line per epoch: {s:?}");
}

#[test]
fn async_and_dynamic_jobs_score_every_epoch_once_when_the_scorer_is_killed() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    for (name, mode, sharding) in [("async-static", "async", "static"), ("sync-dynamic", "sync", "dynamic")] {
        let out = run(dir.path(), name, mode, sharding, Some("all"));
        assert!(aborts(&out) >= 1, "{name}: the hook should have stopped a scorer");
        let mut epochs = epochs_of(&scores(dir.path(), name));
        epochs.sort_unstable();
        assert_eq!(epochs, (1..=EPOCHS).collect::<Vec<_>>(), "{name}: one line per epoch");
    }
}
