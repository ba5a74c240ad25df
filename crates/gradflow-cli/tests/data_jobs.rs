//! Whole jobs on data where it lives: Parquet files, one day's written by pyarrow (as the
//! users' own pipelines write them) and the other's converted by `gradflow data convert`, read
//! by a wide & deep job from a real S3-protocol server (`s3s-fs`) through a glob, reach the
//! accuracy the same data reaches as local CSV.
//!
//! Skipped, with a notice, when `s3s-fs` is not on `PATH`
//! (`cargo install s3s-fs@0.14.1 --features binary --locked`). Without pyarrow
//! (`python3 -m pip install pyarrow`) every file is converted, with a notice.

mod common;

use std::path::Path;

use common::*;

fn convert(csv: &Path, out: &Path) {
    let mut c = gradflow();
    c.args(["data", "convert"]).arg(csv).arg("--out").arg(out).args(["--row-group-rows", "10000"]);
    for i in 0..26 {
        c.args(["--categorical", &format!("c{i}")]);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Writes `csv` as Parquet with pyarrow, in row groups of 10,000 rows, the columns as pyarrow
/// infers them (the categorical ones become integers or strings); `false` without pyarrow.
fn pyarrow_write(csv: &Path, out: &Path) -> bool {
    let script = "import sys, pyarrow.csv as c, pyarrow.parquet as q\n\
                  q.write_table(c.read_csv(sys.argv[1]), sys.argv[2], row_group_size=10000)";
    match std::process::Command::new("python3").args(["-c", script]).arg(csv).arg(out).output() {
        Ok(o) if o.status.success() => true,
        Ok(o) if String::from_utf8_lossy(&o.stderr).contains("No module named") => {
            eprintln!("NOTICE: pyarrow is missing (python3 -m pip install pyarrow): converting instead");
            false
        }
        Ok(o) => panic!("pyarrow could not write {}: {}", out.display(), String::from_utf8_lossy(&o.stderr)),
        Err(e) => {
            eprintln!("NOTICE: no python3 ({e}): converting instead");
            false
        }
    }
}

#[test]
fn a_job_reads_parquet_row_groups_from_s3_through_a_glob_and_learns_as_from_local_csv() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    synth_train_test(dir.path(), 60_000, 10_000);
    let store = dir.path().join("store");
    for day in ["day=1", "day=2"] {
        std::fs::create_dir_all(store.join("bucket").join(day)).unwrap();
    }
    // The training rows in two days' files, the test rows beside them.
    let train = std::fs::read_to_string(dir.path().join("data/train.csv")).unwrap();
    let (header, rows) = train.split_once('\n').unwrap();
    let rows: Vec<&str> = rows.lines().collect();
    for (k, half) in rows.chunks(rows.len() / 2).enumerate() {
        let part = dir.path().join(format!("data/part-{k}.csv"));
        std::fs::write(&part, format!("{header}\n{}\n", half.join("\n"))).unwrap();
        let out = store.join(format!("bucket/day={}/part-0.parquet", k + 1));
        if k == 0 || !pyarrow_write(&part, &out) {
            convert(&part, &out);
        }
    }
    let test = dir.path().join("data/test.csv");
    if !pyarrow_write(&test, &store.join("bucket/test.parquet")) {
        convert(&test, &store.join("bucket/test.parquet"));
    }

    let Some(server) = S3Server::start(&store, "the S3 job test") else { return };

    let categorical: Vec<String> = (0..26).map(|i| format!("\"c{i}\"")).collect();
    let local = wide_deep_job("local-csv", 2, "sync", "").replace("[data.synth]\n", "[data.unused]\n");
    let local = local[..local.find("[data.unused]").unwrap()].to_string()
        + &format!("categorical = [{}]\n", categorical.join(", "));
    let on_s3 = local
        .replace("name = \"local-csv\"", "name = \"s3-parquet\"")
        .replace("data/train.csv", "s3://bucket/day=*/part-*.parquet")
        .replace("data/test.csv", "s3://bucket/test.parquet");
    let mut aucs = Vec::new();
    for (name, text) in [("local-csv", local), ("s3-parquet", on_s3)] {
        let job = write(dir.path(), &format!("{name}.toml"), &text);
        let out = gradflow().arg("launch").arg(&job).envs(server.env()).output().unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let last = results(dir.path(), name).pop().unwrap();
        assert_eq!(last["test_examples"].as_u64(), Some(10_000), "{name}: every test row scored");
        aucs.push(last["test_auc"].as_f64().unwrap());
    }
    let (csv, parquet) = (aucs[0], aucs[1]);
    eprintln!("test AUC: local CSV {csv:.4}, Parquet on S3 {parquet:.4}");
    assert!(csv > 0.70, "local CSV learns: AUC {csv}");
    // Row groups instead of byte ranges give each worker its examples in another order: the
    // issue allows 0.003 (measured: 0.7347 and 0.7351; before row groups were split across
    // files as one sequence, one worker got a third of the data and the AUC was 0.7192).
    assert!((parquet - csv).abs() < 0.003, "Parquet on S3: AUC {parquet} vs local CSV {csv}");
}
