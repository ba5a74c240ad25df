//! A trained job's model used after the job: `gradflow eval --checkpoint` reproduces the test
//! AUC the job reported, `gradflow predict` and `gradflow serve` agree on the same rows, and
//! docs/serving.md reimplemented in numpy (`serving_reference.py`) reproduces the predictions
//! from the exported file alone.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};

use common::*;
use serde_json::{Map, Value, json};

/// A small wide & deep job, one worker (its evaluation is of the last step, which the last
/// checkpoint holds), two servers, checkpoints in `ckpt`.
fn job_text() -> String {
    let text = wide_deep_job("serving", 1, "sync", "")
        .replace("num_dense = 13\n", "num_dense = 13\nhash_buckets = 5000\n")
        .replace("train_rows = 300000", "train_rows = 12000")
        .replace("test_rows = 25000", "test_rows = 3000")
        + "[train]\nepochs = 1\nbatch_size = 256\nlog_every_steps = 1000\n[checkpoint]\nurl = \"ckpt\"\nevery_steps = 20\n";
    assert!(
        text.contains("hash_buckets") && text.contains("test_rows = 3000"),
        "the base job changed:\n{text}"
    );
    text
}

/// Kills the server process when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP/1.1 exchange: the status code and the body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text[9..12].parse().unwrap();
    (code, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// The first `n` rows of a CSV file as request instances: dense columns (`d*`) as numbers,
/// categorical ones (`c*`) as strings, the label left out.
fn instances(csv: &Path, n: usize) -> Vec<Value> {
    let text = std::fs::read_to_string(csv).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    lines
        .take(n)
        .map(|line| {
            let mut row = Map::new();
            for (name, cell) in header.iter().zip(line.split(',')) {
                match name.chars().next() {
                    Some('d') => row.insert(name.to_string(), json!(cell.parse::<f64>().unwrap())),
                    Some('c') => row.insert(name.to_string(), json!(cell)),
                    _ => None,
                };
            }
            Value::Object(row)
        })
        .collect()
}

#[test]
fn eval_predict_serve_and_a_numpy_reimplementation_agree_with_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let job = write(dir.path(), "serving.toml", &job_text());
    let out = launch(&job);
    assert!(out.status.success(), "the job failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let reported = results(dir.path(), "serving").pop().expect("an evaluation");
    let (step, auc) = (reported["step"].as_u64().unwrap(), reported["test_auc"].as_f64().unwrap());
    let ckpt = dir.path().join("ckpt");
    let test = dir.path().join("data/test.csv");

    // eval --checkpoint: the job's test AUC, from the checkpoint alone.
    let out = gradflow()
        .args(["eval", "--checkpoint"])
        .arg(&ckpt)
        .args(["--step", &step.to_string(), "--test"])
        .arg(&test)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let got = line["test_auc"].as_f64().unwrap();
    assert!(
        (got - auc).abs() <= 1e-6,
        "eval --checkpoint says AUC {got}, the job reported {auc} at step {step}"
    );
    assert_eq!(line["test_examples"], 3000);

    // predict: one probability per row.
    let probs_path = dir.path().join("probs.txt");
    let out = gradflow()
        .args(["predict", "--checkpoint"])
        .arg(&ckpt)
        .args(["--step", &step.to_string(), "--data"])
        .arg(&test)
        .arg("--out")
        .arg(&probs_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let probs: Vec<f64> =
        std::fs::read_to_string(&probs_path).unwrap().lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(probs.len(), 3000);

    // serve: the same probabilities over HTTP.
    let mut child = gradflow()
        .arg("serve")
        .arg(&ckpt)
        .args(["--listen", "127.0.0.1:0", "--step", &step.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let server = Killed(child);
    let mut first = String::new();
    BufReader::new(stdout).read_line(&mut first).unwrap();
    let addr = first
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .to_string();
    let rows = instances(&test, 100);
    let (code, body) =
        http(&addr, "POST", "/v1/models/serving:predict", &json!({ "instances": rows }).to_string());
    assert_eq!(code, 200, "{body}");
    let served: Vec<f64> = serde_json::from_str::<Value>(&body).unwrap()["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_f64().unwrap())
        .collect();
    assert_eq!(served.len(), 100);
    for (i, (s, p)) in served.iter().zip(&probs).enumerate() {
        assert!((s - p).abs() <= 1e-6, "row {i}: serve says {s}, predict {p}");
    }
    let (code, body) = http(&addr, "GET", "/v1/models/serving", "");
    assert!(code == 200 && body.contains(&format!("\"version\":\"{step}\"")), "{body}");
    drop(server);

    // The export carries the serving info; numpy reproduces the predictions from it.
    let model = dir.path().join("model.safetensors");
    let out = gradflow()
        .arg("export")
        .arg(&ckpt)
        .args(["--step", &step.to_string(), "--out"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serving_reference.py");
    match std::process::Command::new("python3").arg(&script).arg(&model).arg(&test).arg(&probs_path).output()
    {
        Err(e) => eprintln!("skipped the numpy reimplementation: no python3 ({e})"),
        Ok(out) if out.status.code() == Some(77) => {
            eprintln!("skipped the numpy reimplementation: {}", String::from_utf8_lossy(&out.stdout))
        }
        Ok(out) => assert!(
            out.status.success(),
            "the numpy reimplementation disagrees:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}
