//! Errors users hit, seen from the processes they run: each message printed once and short
//! whatever the data holds, a worker whose error would repeat exits with the code that says
//! so, a job that would train nothing fails, results lines say which run wrote them, and the
//! checkpoint tools list what is good beside what is broken.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

/// The exit code of a worker whose error a restart would repeat (`EXIT_NO_RESTART` of the
/// launcher's contract).
const NO_RESTART: i32 = 3;

/// A logistic regression job on `train` (relative to `dir`), in `format`, with `extra` lines
/// in its `[data]` section.
fn lr_job(dir: &Path, name: &str, train: &str, format: &str, num_dense: usize, extra: &str) -> PathBuf {
    write(
        dir,
        &format!("{name}.toml"),
        &format!(
            "name = \"{name}\"\n[model]\nkind = \"logistic_regression\"\nnum_dense = {num_dense}\n\
             [data]\ntrain = \"{train}\"\nformat = \"{format}\"\n{extra}\n[launcher]\nmax_restarts = 0\n"
        ),
    )
}

/// Runs `gradflow worker` by hand on `job`, against a server address nothing listens on: every
/// error here must come before any server is needed.
fn worker(job: &Path) -> Output {
    gradflow()
        .args(["worker", "--index", "0", "--servers", "127.0.0.1:9"])
        .arg("--job")
        .arg(job)
        .output()
        .expect("run gradflow worker")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// How many times `needle` occurs in `haystack`.
fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn an_empty_data_folder_fails_the_worker_once_with_the_no_restart_code() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    let job = lr_job(dir.path(), "empty", "data", "libsvm", 0, "");
    let out = worker(&job);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(NO_RESTART), "{err}");
    assert_eq!(count(&err, "holds no data files"), 1, "printed once: {err}");
}

#[test]
fn a_missing_file_is_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let job = lr_job(dir.path(), "missing", "nope.csv", "csv", 0, "");
    let out = worker(&job);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(NO_RESTART), "{err}");
    // The operating system's words, once (they were repeated as the error's source).
    assert_eq!(count(&err, "No such file or directory"), 1, "{err}");
}

#[test]
fn a_missing_label_column_and_a_num_dense_mismatch_repeat_so_the_worker_says_so() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "t.csv", "target,x,y\n1,2,3\n");
    let job = lr_job(dir.path(), "nolabel", "t.csv", "csv", 2, "");
    let out = worker(&job);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(NO_RESTART), "{err}");
    assert_eq!(count(&err, "expected a label column named `label`"), 1, "{err}");

    write(dir.path(), "d.csv", "label,x,y\n1,2,3\n");
    let job = lr_job(dir.path(), "dense", "d.csv", "csv", 5, "");
    let out = worker(&job);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(NO_RESTART), "{err}");
    assert_eq!(count(&err, "model.num_dense is 5"), 1, "{err}");
}

#[test]
fn a_huge_bad_line_or_header_is_echoed_cut_with_its_length() {
    let dir = tempfile::tempdir().unwrap();
    // A file whose first line is 10 MB with a bad feature at its end.
    let mut line = String::from("1");
    while line.len() < 10 << 20 {
        line.push_str(" 1:1");
    }
    line.push_str(" oops");
    write(dir.path(), "big.libsvm", &format!("{line}\n0 1:1\n"));
    let job = lr_job(dir.path(), "bigline", "big.libsvm", "libsvm", 0, "");
    let out = worker(&job);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(NO_RESTART), "{}", &err[..err.len().min(2000)]);
    assert!(err.len() < 2000, "{} bytes of stderr for one bad line", err.len());
    assert!(
        err.contains("big.libsvm, line 1") && err.contains(&format!("a line of {} bytes", line.len())),
        "{err}"
    );

    // A header of a million dense columns: 10 MB in a num_dense message.
    let names: Vec<String> = (0..1_000_000).map(|i| format!("column{i}")).collect();
    write(dir.path(), "wide.csv", &format!("label,{}\n", names.join(",")));
    let job = lr_job(dir.path(), "wide", "wide.csv", "csv", 3, "");
    let out = worker(&job);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(NO_RESTART), "{}", &err[..err.len().min(2000)]);
    assert!(err.len() < 2000, "{} bytes of stderr for one header", err.len());
    assert!(err.contains("1000000 dense features") && err.contains("more"), "{err}");
}

#[test]
fn labels_a_binary_model_cannot_learn_are_refused_naming_file_line_and_value() {
    let dir = tempfile::tempdir().unwrap();
    // Found while training: the job fails.
    write(dir.path(), "l.libsvm", "1 1:1\n0 2:1\n-1 3:1\n2 4:1\n");
    let job = lr_job(dir.path(), "labels", "l.libsvm", "libsvm", 0, "");
    let out = launch(&job);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("l.libsvm, line 4") && err.contains("found `2`"), "{err}");
    assert!(processes_of_job("labels").is_empty());

    // Found before any server is needed, when the first example has one.
    write(dir.path(), "l.csv", "label,x\n-5,1\n1,0.5\n");
    let job = lr_job(dir.path(), "labels-csv", "l.csv", "csv", 1, "");
    let out = worker(&job);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(NO_RESTART), "{err}");
    assert!(err.contains("l.csv, line 2") && err.contains("found `-5`"), "{err}");
}

#[test]
fn a_job_with_no_example_fails_instead_of_training_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // A header and nothing else.
    write(dir.path(), "h.csv", "label,x\n");
    let job = lr_job(dir.path(), "header-only", "h.csv", "csv", 1, "");
    let out = launch(&job);
    let err = stderr(&out);
    assert!(!out.status.success(), "a job that trained nothing succeeded: {err}");
    assert!(err.contains("holds no example") && err.contains("no data lines"), "{err}");
    assert!(processes_of_job("header-only").is_empty());

    // Every line malformed, and skipped: the count and the first few, with file and line.
    let bad: String = (0..8).map(|i| format!("1 {i}:x\n")).collect();
    write(dir.path(), "bad.libsvm", &bad);
    let job = lr_job(dir.path(), "all-skipped", "bad.libsvm", "libsvm", 0, "skip_malformed = true");
    let out = worker(&job);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(NO_RESTART), "{err}");
    assert!(err.contains("every one of its 8 data lines is malformed"), "{err}");
    for line in 1..=5 {
        assert!(err.contains(&format!("bad.libsvm, line {line}:")), "line {line}: {err}");
    }
    assert!(!err.contains("bad.libsvm, line 6:"), "only the first five: {err}");
}

#[test]
fn skipped_lines_are_named_and_results_lines_carry_the_run_and_the_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = String::new();
    for i in 0..400 {
        data.push_str(&format!("{} {}:1\n", i % 2, i % 2 + 1));
        if i % 50 == 7 {
            data.push_str("1 3:nan\n");
        }
    }
    write(dir.path(), "s.libsvm", &data);
    write(dir.path(), "test.libsvm", "1 2:1\n0 1:1\n");
    let job =
        lr_job(dir.path(), "skips", "s.libsvm", "libsvm", 0, "skip_malformed = true\ntest = \"test.libsvm\"");
    let out = gradflow().arg("launch").arg(&job).env("GRADFLOW_RUN_ID", "run-from-test").output().unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("malformed lines were skipped") && err.contains("s.libsvm, line 9:"), "{err}");
    let lines = results(dir.path(), "skips");
    assert!(!lines.is_empty());
    for l in &lines {
        let run = l["run_id"].as_str().expect("results lines carry the run id");
        assert!(!run.is_empty(), "{l}");
        let time = l["time"].as_str().expect("results lines carry a time");
        assert!(
            time.ends_with('Z') && time.len() >= 20 && time.as_bytes()[10] == b'T',
            "RFC 3339 UTC: {time}"
        );
    }
}

#[test]
fn checkpoint_ls_lists_the_good_beside_a_corrupt_one_and_escapes_latest() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ckpt");
    let url = root.to_str().unwrap().to_string();
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
        let options =
            gradflow_checkpoint::StoreOptions { run_id: Some("run-7".into()), ..Default::default() };
        let store = gradflow_checkpoint::CheckpointStore::open_with(&url, options).unwrap();
        for step in [10, 20, 30] {
            store.write_shard(step, &snapshot()).await.unwrap();
            store.finalize(step, 1, 0, std::time::Duration::from_secs(5)).await.unwrap();
        }
    });
    let inspect = gradflow().args(["checkpoint", "inspect", &url]).output().unwrap();
    assert!(inspect.status.success(), "{}", stderr(&inspect));
    assert!(String::from_utf8_lossy(&inspect.stdout).contains("run-7"), "inspect shows the run");

    std::fs::write(root.join("ckpt-000000000020/manifest.json"), b"{\"format\": 3").unwrap();
    let out = gradflow().args(["checkpoint", "ls", &url]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}{text}", stderr(&out));
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("10 ") || l.starts_with("30 ")).collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert!(rows[1].contains("<- latest"), "{text}");
    assert!(text.contains("ckpt-000000000020: ") && text.contains("is corrupt"), "{text}");

    std::fs::write(root.join("latest"), b"\x1b[2J\x1b]0;pwned\x07ckpt").unwrap();
    let out = gradflow().args(["checkpoint", "ls", &url]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !out.stdout.contains(&0x1b) && !out.stderr.contains(&0x1b),
        "raw bytes of `latest` reached the terminal"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("not a checkpoint name") && text.contains("\\x1b[2J"), "{text}");
    let out = gradflow().args(["checkpoint", "inspect", &url]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        !out.stdout.contains(&0x1b) && !out.stderr.contains(&0x1b),
        "raw bytes of `latest` reached the terminal"
    );
    assert!(stderr(&out).contains("not a checkpoint name"), "{}", stderr(&out));
}

/// One shard of one 4-element tensor.
fn snapshot() -> gradflow_checkpoint::ShardSnapshot {
    use gradflow_core::{DenseSpec, Initializer, Mode, ModelSpec, OptimizerConfig};
    gradflow_checkpoint::ShardSnapshot {
        shard: 0,
        num_shards: 1,
        version: 1,
        mode: Mode::Sync,
        spec: ModelSpec {
            dense: vec![DenseSpec {
                name: "w".into(),
                shape: vec![4],
                init: Initializer::Zeros,
                optimizer: OptimizerConfig::sgd(0.1),
            }],
            sparse: vec![],
        },
        partition_bytes: 1024,
        dense: vec![gradflow_checkpoint::DensePieceSnapshot {
            tensor: "w".into(),
            partition: 0,
            offset: 0,
            values: vec![1.0, 2.0, 3.0, 4.0],
            state: vec![],
            steps: 1,
        }],
        sparse: vec![],
        serving: None,
    }
}
