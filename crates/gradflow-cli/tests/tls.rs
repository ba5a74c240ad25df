//! Whole jobs with a `[tls]` section, certificates made in the test: `gradflow launch` runs
//! a mutual-TLS job to the end, `gradflow checkpoint now` reaches its servers, processes
//! started by hand read the section from the job file; a worker that does not trust the
//! servers fails the job and says why; a missing certificate file is named before anything
//! starts.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use gradflow_proto::tls::test_certs::{TestCa, loopback_config};

/// A small synthetic job over mutual TLS, with the certificates in `certs/`.
fn tls_job(name: &str, servers: u32, extra: &str) -> String {
    let tls = "[tls]\ncert = \"certs/server.pem\"\nkey = \"certs/server.key\"\nca = \"certs/ca.pem\"\n\
               client_ca = \"certs/ca.pem\"\nclient_cert = \"certs/client.pem\"\nclient_key = \"certs/client.key\"\n";
    wide_deep_job(name, 2, "sync", "")
        .replace("servers = 2", &format!("servers = {servers}"))
        .replace("train_rows = 300000", "train_rows = 20000")
        .replace("test_rows = 25000", "test_rows = 2000")
        + tls
        + extra
}

fn certs(dir: &Path) {
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    loopback_config(&certs, true);
}

/// Waits for a running job's record of its servers.
fn wait_for_servers(dir: &Path, name: &str, launcher: &mut Child) {
    let record = dir.join(format!("runs/{name}/servers.json"));
    let start = Instant::now();
    while !record.exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "{} never appeared", record.display());
        assert!(launcher.try_wait().unwrap().is_none(), "the job ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_mutual_tls_job_trains_to_the_end_and_its_clients_reach_it() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());

    // The whole job through the launcher.
    let job = write(dir.path(), "job.toml", &tls_job("tls-job", 2, ""));
    let out = gradflow().arg("launch").arg(&job).env("GRADFLOW_LOG", "info").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the job failed:\n{stderr}");
    // Both servers served mutual TLS: the launcher passes their children's log lines on.
    assert_eq!(stderr.matches("tls=\"mutual\"").count(), 2, "{stderr}");
    let last = results(dir.path(), "tls-job").pop().unwrap();
    assert!(last["test_auc"].as_f64().unwrap() > 0.6, "{last}");

    // `gradflow checkpoint now` reaches a running job's servers with the job's certificates.
    let ckpt = dir.path().join("ckpt");
    let extra = format!(
        "[checkpoint]\nurl = \"{}\"\nevery_steps = 1000000\non_shutdown = false\n[train]\nepochs = 50\n",
        ckpt.display()
    );
    let job = write(dir.path(), "long.toml", &tls_job("tls-long", 2, &extra));
    let log = dir.path().join("long.log");
    let mut launcher =
        gradflow().arg("launch").arg(&job).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
    wait_for_servers(dir.path(), "tls-long", &mut launcher);
    std::thread::sleep(Duration::from_millis(300));
    let out = gradflow().args(["checkpoint", "now"]).arg(&job).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let ok = out.status.success();
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    assert!(
        ok && text.starts_with("checkpoint step "),
        "{text}{}\nlauncher:\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&log).unwrap()
    );

    // Processes started by hand take the section from the job file (one shard, the data the
    // launcher wrote).
    let job = write(dir.path(), "by-hand.toml", &tls_job("tls-by-hand", 1, ""));
    let (_server, addr) = start_ps(&job);
    let worker = |job: &Path| {
        gradflow()
            .args(["worker", "--job"])
            .arg(job)
            .args(["--index", "0", "--servers", &addr])
            .output()
            .unwrap()
    };
    // The same job without its client certificate is refused, and says so.
    let no_cert = tls_job("tls-by-hand", 1, "")
        .replace("client_ca = \"certs/ca.pem\"\n", "")
        .replace("client_cert = \"certs/client.pem\"\nclient_key = \"certs/client.key\"\n", "");
    let out = worker(&write(dir.path(), "no-cert.toml", &no_cert));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("refused this client"), "{err}");
    let out = worker(&job);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = gradflow().args(["eval", "--job"]).arg(&job).args(["--servers", &addr]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `gradflow ps --job` for shard 0 and returns it with the address it reports.
fn start_ps(job: &Path) -> (Server, String) {
    let mut child = gradflow()
        .args(["ps", "--job"])
        .arg(job)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let event: serde_json::Value =
        serde_json::from_str(line.strip_prefix("@gradflow ").expect("an event line")).unwrap();
    (Server(child), event["addr"].as_str().unwrap().to_string())
}

#[test]
fn a_worker_that_does_not_trust_the_servers_fails_the_job_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    TestCa::new(&other, "ca");
    let text = tls_job("tls-untrusted", 1, "[launcher]\nmax_restarts = 0\n")
        .replace("ca = \"certs/ca.pem\"\nclient_ca", "ca = \"other/ca.pem\"\nclient_ca");
    assert!(text.contains("ca = \"other/ca.pem\""));
    let job = write(dir.path(), "job.toml", &text);
    let started = Instant::now();
    let out = launch(&job);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("not trusted"), "{stderr}");
    // It failed at once; it did not wait for the servers' startup_timeout (120s).
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
}

#[test]
fn a_missing_certificate_file_is_named_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let text = tls_job("tls-missing", 1, "").replace("certs/server.pem", "certs/nowhere.pem");
    let job = write(dir.path(), "job.toml", &text);
    let out = launch(&job);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("tls.cert") && stderr.contains("nowhere.pem"), "{stderr}");
    assert!(!dir.path().join("runs/tls-missing").exists(), "nothing started");
}
