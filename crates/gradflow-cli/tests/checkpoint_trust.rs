//! Checkpoints across shards under contention, through whole jobs (issue 17, items 1, 2, 5):
//! checkpoints due faster than they upload, time-based checkpoints, and a stop with strangers
//! connected. Every test reads the checkpoints back and verifies them.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use gradflow_checkpoint::CheckpointStore;

/// A 2-shard, 2-worker sync job on small data with checkpoints in `ckpt`.
fn job_text(name: &str, ckpt: &Path, checkpoint: &str, train: &str) -> String {
    wide_deep_job(name, 2, "sync", "")
        .replace("train_rows = 300000", "train_rows = 6000")
        .replace("test_rows = 25000", "test_rows = 500")
        + &format!(
            "[checkpoint]\nurl = \"{}\"\nkeep = 100\nfinalize_timeout = \"20s\"\n{checkpoint}\n[train]\nlog_every_steps = 5\n{train}\n[launcher]\ngrace_period = \"5s\"\nmax_restarts = 0\n",
            ckpt.display()
        )
}

/// The steps of the complete checkpoints under `url`, each verified, and the step `latest` names.
fn verified_checkpoints(url: &Path, log: &str) -> (Vec<u64>, u64) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = CheckpointStore::open(url.to_str().unwrap()).unwrap();
        let steps: Vec<u64> = store.list().await.unwrap().iter().map(|c| c.step).collect();
        for &step in &steps {
            let m = store.resolve(&step.to_string()).await.unwrap();
            store.verify(&m).await.unwrap_or_else(|e| panic!("checkpoint {step} does not verify: {e}"));
        }
        let latest =
            store.resolve("latest").await.unwrap_or_else(|e| panic!("no latest checkpoint: {e}\n{log}"));
        (steps, latest.step)
    })
}

fn spawn_launcher(job: &Path, log: &Path) -> Child {
    gradflow()
        .env("GRADFLOW_LOG", "info")
        .arg("launch")
        .arg(job)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// What a good stop looks like in the launcher's log: no process killed after its grace
/// period, no checkpoint failed.
fn assert_clean_log(text: &str) {
    assert!(!text.contains("did not exit within"), "a process was killed after its grace period:\n{text}");
    assert!(!text.contains("checkpoint failed"), "a checkpoint failed:\n{text}");
    assert!(!text.contains("checkpoint skipped"), "a checkpoint was skipped:\n{text}");
}

/// Runs job `name` to its end; asserts it succeeded with a clean log. Returns the launcher's
/// log and the verified checkpoints (steps, latest).
fn run_clean(dir: &Path, name: &str, ckpt: &Path, checkpoint: &str, train: &str) -> (String, Vec<u64>, u64) {
    let job = write(dir, &format!("{name}.toml"), &job_text(name, ckpt, checkpoint, train));
    let log = dir.join("launcher.log");
    let status = spawn_launcher(&job, &log).wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{text}");
    assert_clean_log(&text);
    let (steps, latest) = verified_checkpoints(ckpt, &text);
    (text, steps, latest)
}

/// Item 1: checkpoints due every 2 steps, faster than they upload. Before, a shard still
/// uploading skipped a step the other shard wrote, shard 0 waited for it until
/// `finalize_timeout`, missed every later checkpoint and was killed at the end: the final
/// checkpoint was lost and the job still exited 0.
#[test]
fn checkpoints_due_faster_than_they_upload_are_all_written_and_the_last_is_the_final_step() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    // 6,000 rows, 2 workers, batch 256: 11-12 steps per epoch per worker; 20 steps end in
    // the second epoch on both workers, so the model's last version is exactly 20.
    let (text, steps, latest) =
        run_clean(dir.path(), "every2", &ckpt, "every_steps = 2", "epochs = 2\nmax_steps = 20");
    assert_eq!(latest, 20, "`latest` is not the final step; complete checkpoints: {steps:?}\n{text}");
    let expected: Vec<u64> = (1..=10).map(|k| 2 * k).collect();
    assert_eq!(steps, expected, "every checkpoint asked for is complete\n{text}");
    // The manifests name the run that wrote them, as the launcher printed it.
    let run_id = text
        .lines()
        .find_map(|l| l.strip_prefix("[launch] job every2: run "))
        .unwrap_or_else(|| panic!("no run id printed\n{text}"))
        .trim()
        .to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let manifest = rt.block_on(async {
        CheckpointStore::open(ckpt.to_str().unwrap()).unwrap().resolve("latest").await.unwrap()
    });
    assert_eq!(manifest.run_id.as_deref(), Some(run_id.as_str()));
}

/// Item 2: time-based checkpoints in a sync job with 2 shards. Before, each shard fired on its
/// own clock at different steps and shard 0 waited for files that never came.
#[test]
fn time_based_checkpoints_are_one_decision_for_every_shard() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let (text, steps, latest) =
        run_clean(dir.path(), "every300", &ckpt, "every_steps = 1000000\nevery = \"300ms\"", "epochs = 30");
    assert_eq!(Some(&latest), steps.last(), "`latest` is the last complete checkpoint: {steps:?}");
    // The job trains for well over a second on any machine; a single checkpoint would be the
    // shutdown one alone.
    assert!(steps.len() >= 2, "time-based checkpoints were written: {steps:?}\n{text}");
}

/// Item 5: idle connections from strangers (no bytes at all, or only the HTTP/2 preface) to
/// shard 0's gRPC port. Before, they kept the server alive after SIGTERM until the launcher
/// killed it after the grace period, and the final checkpoint was lost.
#[test]
fn idle_strangers_do_not_hold_a_stopping_server_and_the_final_checkpoint_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let job = write(
        dir.path(),
        "strangers.toml",
        &job_text("strangers", &ckpt, "every_steps = 1000000", "epochs = 1000"),
    );
    let log = dir.path().join("launcher.log");
    let mut launcher = spawn_launcher(&job, &log);
    let servers_json = dir.path().join("runs/strangers/servers.json");
    let start = Instant::now();
    // Training has gone on for a while once the second epoch is scored.
    loop {
        assert!(start.elapsed() < Duration::from_secs(180), "the job never started training");
        assert!(launcher.try_wait().unwrap().is_none(), "{}", std::fs::read_to_string(&log).unwrap());
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if servers_json.exists() && text.contains("epoch 2 test AUC") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let running: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&servers_json).unwrap()).unwrap();
    let ps0 = running["servers"][0].as_str().unwrap().to_string();
    let mut strangers = Vec::new();
    for k in 0..3 {
        let mut s = std::net::TcpStream::connect(&ps0).unwrap();
        if k == 1 {
            s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
        }
        strangers.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    let stopped_at = Instant::now();
    let term =
        std::process::Command::new("kill").arg("-TERM").arg(launcher.id().to_string()).status().unwrap();
    assert!(term.success());
    let _ = launcher.wait().unwrap();
    let took = stopped_at.elapsed();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("did not exit within"), "a process was killed after its grace period:\n{text}");
    assert!(took < Duration::from_secs(5), "stopping took {took:?}\n{text}");
    let (_, latest) = verified_checkpoints(&ckpt, &text);
    assert!(latest >= 5, "the final checkpoint is of step {latest}\n{text}");
    drop(strangers);
}
