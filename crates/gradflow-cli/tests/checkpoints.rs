//! Checkpoints through whole jobs: a job killed after a checkpoint and restarted from it ends
//! with the same parameters as a job that was never interrupted.

mod common;

use std::path::Path;
use std::process::Stdio;
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

#[test]
fn a_job_killed_after_a_checkpoint_resumes_to_the_same_parameters() {
    let dir = tempfile::tempdir().unwrap();
    // Uninterrupted.
    let straight_ckpt = dir.path().join("ckpt-straight");
    let job = write(dir.path(), "straight.toml", &job_text("straight", &straight_ckpt, false));
    let out = launch(&job);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = latest(&straight_ckpt);
    assert_eq!(want.version, 80);
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
    assert_same_model(&latest(&ckpt), &want);
}
