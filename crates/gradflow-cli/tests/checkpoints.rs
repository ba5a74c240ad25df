//! Checkpoints through whole jobs: a job killed after a checkpoint and restarted from it ends
//! with the same parameters as a job that was never interrupted.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use gradflow_checkpoint::{CheckpointStore, ShardSnapshot};

fn job_text(name: &str, ckpt: &Path, restore: bool) -> String {
    let tables = format!(
        "[checkpoint]\nurl = \"{}\"\nevery_steps = 20\nkeep = 10\n[train]\nmax_steps = 80\nlog_every_steps = 5\n",
        ckpt.display()
    );
    wide_deep_job(name, 2, "sync", if restore { "restore = \"latest\"" } else { "" })
        .replace("train_rows = 300000", "train_rows = 60000")
        .replace("test_rows = 25000", "test_rows = 1000")
        + &tables
}

/// The whole model of the latest checkpoint, gathered onto one shard.
fn latest(url: &Path) -> ShardSnapshot {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = CheckpointStore::open(url.to_str().unwrap()).unwrap();
        let m = store.resolve("latest").await.unwrap();
        store.load_shard(&m, 0, 1, m.partition_bytes).await.unwrap()
    })
}

fn latest_step(url: &Path) -> Option<u64> {
    let name = std::fs::read_to_string(url.join("latest")).ok()?;
    name.trim().trim_start_matches("ckpt-").parse().ok()
}

fn assert_same_model(a: &ShardSnapshot, b: &ShardSnapshot) {
    assert_eq!(a.version, b.version);
    assert_eq!(a.dense.len(), b.dense.len());
    for (x, y) in a.dense.iter().zip(&b.dense) {
        assert_eq!((&x.tensor, x.partition, x.steps), (&y.tensor, y.partition, y.steps));
        for (i, (u, v)) in x.values.iter().zip(&y.values).enumerate() {
            assert!((u - v).abs() <= 1e-6 * v.abs().max(1.0), "{}[{i}]: {u} vs {v}", x.tensor);
        }
    }
    for (x, y) in a.sparse.iter().zip(&b.sparse) {
        let rows = |t: &gradflow_checkpoint::TableSnapshot| {
            let mut r: Vec<(u64, Vec<f32>)> = t
                .ids
                .iter()
                .enumerate()
                .map(|(k, id)| (*id, t.values[k * t.dim as usize..(k + 1) * t.dim as usize].to_vec()))
                .collect();
            r.sort_by_key(|(id, _)| *id);
            r
        };
        let (rx, ry) = (rows(x), rows(y));
        assert_eq!(rx.len(), ry.len(), "rows of `{}`", x.table);
        for ((ix, vx), (iy, vy)) in rx.iter().zip(&ry) {
            assert_eq!(ix, iy);
            for (u, v) in vx.iter().zip(vy) {
                assert!((u - v).abs() <= 1e-6 * v.abs().max(1.0), "{}[{ix}]: {u} vs {v}", x.table);
            }
        }
    }
}

/// The uninterrupted job every interrupted one is compared with, run once per test binary:
/// its checkpoint directory and final model.
fn straight() -> &'static (PathBuf, ShardSnapshot) {
    static STRAIGHT: OnceLock<(PathBuf, ShardSnapshot)> = OnceLock::new();
    STRAIGHT.get_or_init(|| {
        // Shared by tests that outlive any one of them, so not a TempDir.
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("checkpoints-straight");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ckpt = dir.join("ckpt-straight");
        let job = write(&dir, "straight.toml", &job_text("straight", &ckpt, false));
        let out = launch(&job);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let model = latest(&ckpt);
        assert_eq!(model.version, 80);
        (ckpt, model)
    })
}

/// Pids of the processes of job `job` with role `role` and index `index`.
fn process_of(job: &str, role: &str, index: u32) -> Vec<u32> {
    let want = [format!("GRADFLOW_ROLE={role}"), format!("GRADFLOW_INDEX={index}")];
    processes_of_job(job)
        .into_iter()
        .filter(|pid| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
            want.iter().all(|w| vars.contains(&w.as_bytes()))
        })
        .collect()
}

#[test]
fn a_job_killed_after_a_checkpoint_resumes_to_the_same_parameters() {
    let dir = tempfile::tempdir().unwrap();
    // Uninterrupted.
    let (straight_ckpt, want) = straight();
    let straight_ckpt = straight_ckpt.clone();
    // What users see of it.
    let out = gradflow().args(["checkpoint", "ls"]).arg(&straight_ckpt).output().unwrap();
    let ls = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && ls.contains("80") && ls.contains("latest"), "{ls}");
    let model = dir.path().join("model.safetensors");
    let out = gradflow().arg("export").arg(&straight_ckpt).arg("--out").arg(&model).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::metadata(&model).unwrap().len() > 1000);

    // Killed (SIGKILL of the launcher: every process dies at once) after the checkpoint at
    // step 20 or 40, then restarted from the latest checkpoint.
    let ckpt = dir.path().join("ckpt-killed");
    let job = write(dir.path(), "killed.toml", &job_text("killed", &ckpt, false));
    let mut launcher = gradflow().arg("launch").arg(&job).stderr(Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    while latest_step(&ckpt).is_none_or(|s| s < 20) {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint written");
        assert!(launcher.try_wait().unwrap().is_none(), "the job ended before it could be killed");
        std::thread::sleep(Duration::from_millis(5));
    }
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    let start = Instant::now();
    while !processes_of_job("killed").is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10), "children outlived the launcher");
        std::thread::sleep(Duration::from_millis(10));
    }
    let killed_at = latest_step(&ckpt).unwrap();
    {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (a, b) = rt.block_on(async {
            let s1 = CheckpointStore::open(straight_ckpt.to_str().unwrap()).unwrap();
            let s2 = CheckpointStore::open(ckpt.to_str().unwrap()).unwrap();
            let m1 = s1.resolve(&killed_at.to_string()).await.unwrap();
            let m2 = s2.resolve(&killed_at.to_string()).await.unwrap();
            (
                s1.load_shard(&m1, 0, 1, m1.partition_bytes).await.unwrap(),
                s2.load_shard(&m2, 0, 1, m2.partition_bytes).await.unwrap(),
            )
        });
        eprintln!("comparing checkpoints at {killed_at}");
        assert_same_model(&b, &a);
    }
    assert!(killed_at < 80, "killed before the end (latest checkpoint {killed_at})");

    let job = write(dir.path(), "resumed.toml", &job_text("killed", &ckpt, true));
    let out = launch(&job);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_same_model(&latest(&ckpt), want);
}

/// A server killed while it writes a checkpoint: the half-written checkpoint does not count,
/// `latest` still names the one before, and the launcher restarts every process from it. The
/// job then ends with the same parameters as if nothing had happened.
#[test]
fn a_server_killed_while_writing_a_checkpoint_is_restarted_from_the_latest_complete_one() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let job = write(dir.path(), "srvkill.toml", &job_text("srvkill", &ckpt, false));
    let log = dir.path().join("launcher.log");
    let mut launcher = gradflow()
        .arg("launch")
        .arg(&job)
        .env(gradflow_ps::ENV_FAULT_STALL_UPLOAD, "40")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Both shards write their files of step 40 and stall before the manifest.
    let stalled = ckpt.join("ckpt-000000000040/shard-1/manifest.json");
    let start = Instant::now();
    while !stalled.exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint at step 40 was started");
        assert!(launcher.try_wait().unwrap().is_none(), "the job ended before it could be killed");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Shard 0 points `latest` at step 20 once it has seen every shard's files of it, which on
    // a fast machine can come after shard 1 has gone on to step 40; it must never name 40.
    let start = Instant::now();
    while latest_step(&ckpt) != Some(20) {
        let latest = latest_step(&ckpt);
        assert!(
            latest.is_none_or(|s| s < 40),
            "`latest` moved to {latest:?} before the manifest was written"
        );
        assert!(start.elapsed() < Duration::from_secs(30), "`latest` never named step 20 (it is {latest:?})");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!ckpt.join("ckpt-000000000040/manifest.json").exists());
    let pids = process_of("srvkill", "ps", 1);
    assert_eq!(pids.len(), 1, "ps-1 of srvkill: {pids:?}");
    let killed = std::process::Command::new("kill").arg("-KILL").arg(pids[0].to_string()).status().unwrap();
    assert!(killed.success());

    // The half-written checkpoint is not one; the one before loads.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = CheckpointStore::open(ckpt.to_str().unwrap()).unwrap();
        assert!(store.resolve("40").await.is_err());
        let m = store.resolve("latest").await.unwrap();
        assert_eq!(m.step, 20);
        store.load_shard(&m, 0, 1, m.partition_bytes).await.unwrap();
    });

    let status = launcher.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{text}");
    assert!(text.contains("ps-1 exited (signal: 9 (SIGKILL))"), "{text}");
    assert!(text.contains("restoring checkpoint step 20"), "{text}");
    assert_same_model(&latest(&ckpt), &straight().1);
}

/// `gradflow checkpoint now JOB.toml` checkpoints a running job on demand, in both modes, and
/// returns once the checkpoint is complete.
#[test]
fn checkpoint_now_writes_a_complete_checkpoint_of_a_running_job() {
    let dir = tempfile::tempdir().unwrap();
    for mode in ["sync", "async"] {
        let name = format!("now-{mode}");
        let ckpt = dir.path().join(format!("ckpt-{mode}"));
        let text = wide_deep_job(&name, 2, mode, "")
            + &format!(
                "[checkpoint]\nurl = \"{}\"\nevery_steps = 1000000\non_shutdown = false\n[train]\nepochs = 50\n",
                ckpt.display()
            );
        let job = write(dir.path(), &format!("{name}.toml"), &text);
        let log = dir.path().join(format!("{name}.log"));
        let mut launcher =
            gradflow().arg("launch").arg(&job).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
        let record = dir.path().join(format!("runs/{name}/servers.json"));
        let start = Instant::now();
        while !record.exists() {
            assert!(start.elapsed() < Duration::from_secs(60), "{} never appeared", record.display());
            assert!(launcher.try_wait().unwrap().is_none(), "the job ended early");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Long enough for training to be under way; the job runs far longer (50 epochs).
        std::thread::sleep(Duration::from_millis(300));
        let out = gradflow().args(["checkpoint", "now"]).arg(&job).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{mode}: {text}{}\nlauncher:\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap()
        );
        let step: u64 = text
            .strip_prefix("checkpoint step ")
            .and_then(|t| t.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{mode}: unexpected output {text:?}"));
        assert!(step > 0, "{mode}: {text}");
        assert_eq!(latest_step(&ckpt), Some(step), "{mode}: `latest` names the new checkpoint");
        let model = latest(&ckpt);
        assert_eq!(model.version, step, "{mode}");
        launcher.kill().unwrap();
        launcher.wait().unwrap();
    }
    // A job that does not run is named as such.
    let job = dir.path().join("now-sync.toml");
    let out = gradflow().args(["checkpoint", "now"]).arg(&job).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not running"), "{err}");
}

/// A server started with `GRADFLOW_RESTORE=latest` (what a launcher sets after losing a
/// server) restores the latest checkpoint, or starts fresh when none was written yet.
#[test]
fn a_restarted_server_restores_the_latest_checkpoint_from_the_environment() {
    let (straight_ckpt, _) = straight();
    let dir = tempfile::tempdir().unwrap();
    for (ckpt, want) in [
        (straight_ckpt.clone(), "restarting from the latest checkpoint step=80"),
        (dir.path().join("empty"), "no checkpoint was written yet"),
    ] {
        let job = write(dir.path(), "restore.toml", &job_text("restore", &ckpt, false));
        let mut ps = gradflow()
            .args(["ps", "--shard", "1", "--job"])
            .arg(&job)
            .env("GRADFLOW_RESTORE", "latest")
            .env("GRADFLOW_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The listening event comes once the restore is done.
        let mut out = std::io::BufReader::new(ps.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert!(line.contains("listening"), "{line}");
        ps.kill().unwrap();
        let output = ps.wait_with_output().unwrap();
        let log = String::from_utf8_lossy(&output.stderr);
        assert!(log.contains(want), "{}: {log}", ckpt.display());
    }
}
