//! Running a job's processes by hand (`gradflow ps`, `gradflow worker`) and scoring the model
//! the servers hold with `gradflow eval`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};

use common::*;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `gradflow ps` for `shard` and returns it with the address it reports.
fn start_ps(job: &std::path::Path, shard: u32) -> (Server, String) {
    let mut child = gradflow()
        .args(["ps", "--job"])
        .arg(job)
        .args(["--shard", &shard.to_string(), "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let event: serde_json::Value =
        serde_json::from_str(line.strip_prefix("@gradflow ").expect("an event line")).unwrap();
    assert_eq!(event["event"], "listening");
    (Server(child), event["addr"].as_str().unwrap().to_string())
}

#[test]
fn processes_started_by_hand_train_and_eval_scores_the_servers_model() {
    let dir = tempfile::tempdir().unwrap();
    let text = wide_deep_job("by-hand", 1, "sync", "")
        .replace("train_rows = 300000", "train_rows = 20000")
        .replace("test_rows = 25000", "test_rows = 5000");
    let job = write(dir.path(), "job.toml", &text);
    // The launcher would write the synthetic data; by hand, `gradflow data synth` does.
    let out = gradflow()
        .args(["data", "synth", "--rows", "25000", "--seed", "5", "--out"])
        .arg(dir.path().join("data/all.csv"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("oracle AUC"));
    let all = std::fs::read_to_string(dir.path().join("data/all.csv")).unwrap();
    let mut lines = all.lines();
    let header = lines.next().unwrap();
    let rows: Vec<&str> = lines.collect();
    std::fs::write(dir.path().join("data/train.csv"), format!("{header}\n{}\n", rows[..20000].join("\n")))
        .unwrap();
    std::fs::write(dir.path().join("data/test.csv"), format!("{header}\n{}\n", rows[20000..].join("\n")))
        .unwrap();

    let (_s0, a0) = start_ps(&job, 0);
    let (_s1, a1) = start_ps(&job, 1);
    let servers = format!("{a0},{a1}");
    let out = gradflow()
        .args(["worker", "--job"])
        .arg(&job)
        .args(["--index", "0", "--servers", &servers])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let trained = results(dir.path(), "by-hand").pop().unwrap();

    let out = gradflow().args(["eval", "--job"]).arg(&job).args(["--servers", &servers]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let scores: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    // The worker scored the same model at the end of its epoch.
    let (a, b) = (scores["test_auc"].as_f64().unwrap(), trained["test_auc"].as_f64().unwrap());
    assert!((a - b).abs() < 1e-9, "eval AUC {a} vs the worker's {b}");
    assert_eq!(scores["test_examples"].as_u64(), Some(5000));

    // Wrong flags get clear errors.
    let out = gradflow()
        .args(["worker", "--job"])
        .arg(&job)
        .args(["--index", "3", "--servers", &servers])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--index 3 is out of range"));
    let out = gradflow().args(["eval", "--job"]).arg(&job).args(["--servers", &a1]).output().unwrap();
    assert!(!out.status.success(), "one address for a two-shard job must fail");
}
