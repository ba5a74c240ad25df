//! What users see when something is wrong, and that nothing is left running.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn a_bad_job_file_names_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let job = write(dir.path(), "bad.toml", &wide_deep_job("bad", 2, "sync", "[train]\nbatch_sise = 3\n"));
    let out = launch(&job);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("batch_sise"), "{err}");
}

#[test]
fn a_malformed_data_line_fails_the_job_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = String::from("1 3:1 7:0.5\n0 2:1\n");
    for _ in 0..50 {
        data.push_str("1 1:1 4:2\n");
    }
    data.push_str("1 5:oops\n");
    write(dir.path(), "train.libsvm", &data);
    let job = write(
        dir.path(),
        "lr.toml",
        "name = \"lr\"\n[model]\nkind = \"logistic_regression\"\n[data]\ntrain = \"train.libsvm\"\nformat = \"libsvm\"\n[launcher]\nmax_restarts = 0\n",
    );
    let out = launch(&job);
    assert!(!out.status.success(), "the job must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("train.libsvm, line 53"), "{err}");
    assert!(processes_of_job("lr").is_empty());
}

fn wait_for_line(child: &mut std::process::Child, needle: &str) {
    let stderr = child.stderr.take().unwrap();
    let needle = needle.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(&needle) {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60)).expect("the job started training");
}

fn wait_until_gone(job: &str) -> Vec<u32> {
    let start = Instant::now();
    loop {
        let left = processes_of_job(job);
        if left.is_empty() || start.elapsed() > Duration::from_secs(15) {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn long_job(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    write(
        dir,
        &format!("{name}.toml"),
        &wide_deep_job(name, 2, "sync", "")
            .replace("seed = 5", "seed = 5\n[train]\nepochs = 100\nlog_every_steps = 5"),
    )
}

#[test]
fn killing_the_launcher_leaves_no_process_behind() {
    let dir = tempfile::tempdir().unwrap();
    let job = long_job(dir.path(), "kill9");
    let mut launcher = gradflow().arg("launch").arg(&job).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_line(&mut launcher, "samples/s");
    assert_eq!(processes_of_job("kill9").len(), 4, "2 servers and 2 workers are running");
    launcher.kill().unwrap(); // SIGKILL: no chance to clean up
    launcher.wait().unwrap();
    assert_eq!(wait_until_gone("kill9"), Vec::<u32>::new(), "children outlived the launcher");
}

#[test]
fn sigterm_stops_the_job_with_a_failure_code_and_no_orphans() {
    let dir = tempfile::tempdir().unwrap();
    let job = long_job(dir.path(), "term");
    let mut launcher = gradflow().arg("launch").arg(&job).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_line(&mut launcher, "samples/s");
    send_signal(launcher.id(), 15);
    let status = launcher.wait().unwrap();
    assert!(!status.success(), "a stopped job is not a success");
    assert_eq!(wait_until_gone("term"), Vec::<u32>::new());
}

fn send_signal(pid: u32, signal: i32) {
    let ok = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap();
    assert!(ok.success());
}
