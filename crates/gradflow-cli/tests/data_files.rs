//! `gradflow data inspect` and `gradflow data convert`, run as a user runs them: local files,
//! and an object on a real S3-protocol server (`s3s-fs`) reached with the `AWS_*` variables,
//! as checkpoints are.
//!
//! The S3 part is skipped, with a notice, when `s3s-fs` is not on `PATH`
//! (`cargo install s3s-fs@0.14.1 --features binary --locked`).

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn gradflow(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gradflow"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn csv(dir: &Path) -> std::path::PathBuf {
    let mut t = String::from("label,d0,color\n");
    for i in 0..30 {
        t.push_str(&format!("{},{}.5,c{}\n", i % 2, i, i % 4));
    }
    let path = dir.join("t.csv");
    std::fs::write(&path, t).unwrap();
    path
}

#[test]
fn convert_then_inspect_locally() {
    let dir = tempfile::tempdir().unwrap();
    let input = csv(dir.path());
    let out = dir.path().join("t.parquet");
    let o = gradflow(
        &[
            "data",
            "convert",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--categorical",
            "color",
            "--row-group-rows",
            "20",
        ],
        &[],
    );
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(stdout.contains("wrote 30 rows in 2 row groups"), "{stdout}");

    let o = gradflow(&["data", "inspect", out.to_str().unwrap(), "--rows", "2"], &[]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    for want in [
        "format: Parquet",
        "label: Float32",
        "color: Utf8",
        "rows: 30",
        "row groups: 2 (rows: [20, 10])",
        "0 | 0.5 | c0",
        "1 | 1.5 | c1",
    ] {
        assert!(stdout.contains(want), "`{want}` missing from:\n{stdout}");
    }
    assert!(!stdout.contains("2.5 | c2"), "only 2 rows asked for:\n{stdout}");

    let o = gradflow(&["data", "inspect", input.to_str().unwrap(), "--rows", "1"], &[]);
    let (stdout, _) = text(&o);
    assert!(
        stdout.contains("format: Csv")
            && stdout.contains("columns: label, d0, color")
            && stdout.contains("  0,0.5,c0"),
        "{stdout}"
    );

    let svm = dir.path().join("t.libsvm");
    std::fs::write(&svm, "1 2:1\n").unwrap();
    let o = gradflow(&["data", "convert", svm.to_str().unwrap(), "--out", out.to_str().unwrap()], &[]);
    let (_, stderr) = text(&o);
    assert!(!o.status.success() && stderr.contains("Libsvm files are not converted"), "{stderr}");

    let o = gradflow(&["data", "inspect", "ftp://host/x.csv"], &[]);
    let (_, stderr) = text(&o);
    assert!(!o.status.success() && stderr.contains("`ftp://` is not a supported scheme"), "{stderr}");
}

#[test]
fn inspect_an_object_on_s3_with_the_aws_variables() {
    let data = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(data.path().join("bucket/day=1")).unwrap();
    std::fs::copy(csv(data.path()), data.path().join("bucket/day=1/t.csv")).unwrap();
    let Some(server) = common::S3Server::start(data.path(), "the S3 test") else { return };
    let env = server.env();
    let o = gradflow(&["data", "inspect", "s3://bucket/day=1/t.csv", "--rows", "1"], &env);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(stdout.contains("format: Csv") && stdout.contains("  0,0.5,c0"), "{stdout}");

    // Wrong credentials are the store's answer, named with the URL; a missing object fails at once.
    let started = Instant::now();
    let o = gradflow(&["data", "inspect", "s3://bucket/day=1/nope.csv"], &env);
    let (_, stderr) = text(&o);
    assert!(
        !o.status.success() && stderr.contains("s3://bucket/day=1/nope.csv: no such object or bucket"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}
