//! Running the real `gradflow` binary on job files written into temporary directories.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn gradflow() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gradflow"));
    c.env("GRADFLOW_LOG", "warn");
    c
}

/// Writes `text` as `name` in `dir` and returns its path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

pub fn launch(job: &Path) -> Output {
    gradflow().arg("launch").arg(job).output().expect("run gradflow launch")
}

/// The JSON lines of a job's results file.
pub fn results(dir: &Path, job: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("runs").join(job).join("results.jsonl"))
        .unwrap_or_else(|e| panic!("results of {job}: {e}"));
    text.lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("results of {job}: {e} in line {l:?} of\n{text}"))
        })
        .collect()
}

/// A synthetic wide & deep job.
pub fn wide_deep_job(name: &str, workers: u32, mode: &str, extra: &str) -> String {
    format!(
        r#"
name = "{name}"
servers = 2
workers = {workers}
mode = "{mode}"
{extra}
[model]
kind = "wide_deep"
num_fields = 26
num_dense = 13
[data]
train = "data/train.csv"
test = "data/test.csv"
[data.synth]
train_rows = 300000
test_rows = 25000
seed = 5
"#
    )
}

/// Processes (other than zombies) whose environment says they belong to job `job`.
pub fn processes_of_job(job: &str) -> Vec<u32> {
    let needle = format!("GRADFLOW_JOB={job}\0");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(env) = std::fs::read(entry.path().join("environ")) else { continue };
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .map(|s| s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
            .unwrap_or(true);
        if !zombie && env.windows(needle.len()).any(|w| w == needle.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

/// Writes `data/train.csv` (`train_rows` rows) and `data/test.csv` (`test_rows` rows) in
/// `dir` with `gradflow data synth`: the files [`wide_deep_job`] names, for processes started
/// by hand (under `gradflow launch`, the launcher writes them).
pub fn synth_train_test(dir: &Path, train_rows: usize, test_rows: usize) {
    let all = dir.join("data/all.csv");
    let out = gradflow()
        .args(["data", "synth", "--rows", &(train_rows + test_rows).to_string(), "--seed", "5", "--out"])
        .arg(&all)
        .output()
        .expect("run gradflow data synth");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&all).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), train_rows + test_rows);
    let (train, test) = rows.split_at(train_rows);
    std::fs::write(dir.join("data/train.csv"), format!("{header}\n{}\n", train.join("\n"))).unwrap();
    std::fs::write(dir.join("data/test.csv"), format!("{header}\n{}\n", test.join("\n"))).unwrap();
    std::fs::remove_file(all).unwrap();
}

/// Adds to `log` the lines still to come from `rx` once their process has exited: until the
/// reader sees the end of the stream (every copy of the pipe closed), at most 30 s. Lines
/// already written may still be in the pipe when `wait` returns; `try_iter` would miss them.
pub fn rest_of(rx: &std::sync::mpsc::Receiver<String>, log: &mut Vec<String>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
        log.push(line);
    }
}

/// A real S3-protocol server (`s3s-fs`) serving the folders of `root` as buckets, on a free
/// port, with fixed test credentials; killed when dropped.
pub struct S3Server {
    child: std::process::Child,
    port: u16,
}

impl S3Server {
    /// Starts one, or `None` (after a notice naming `what` is skipped) when `s3s-fs` is not on
    /// `PATH` (`cargo install s3s-fs@0.14.1 --features binary --locked`; CI installs it).
    pub fn start(root: &Path, what: &str) -> Option<S3Server> {
        let on_path = std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join("s3s-fs").is_file()));
        if !on_path {
            eprintln!(
                "NOTICE: skipping {what}: `s3s-fs` is not on PATH (cargo install s3s-fs@0.14.1 --features binary --locked)"
            );
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", "gradflow-key", "--secret-key", "gradflow-secret"])
            .arg(root)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting s3s-fs");
        let server = S3Server { child, port };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "s3s-fs did not start listening on port {port}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Some(server)
    }

    /// The `AWS_*` variables that reach it, as a process of a job takes them.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "gradflow-key".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "gradflow-secret".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
