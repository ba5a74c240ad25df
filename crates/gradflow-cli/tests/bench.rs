//! `gradflow bench --quick` runs every scenario end to end (a TCP sink process, in-process
//! servers, real training jobs) and reports a sane number for each.

use std::process::Command;
use std::time::{Duration, Instant};

/// Every number under `value` (a section of the report) must be positive and finite.
fn check_numbers(path: &str, value: &serde_json::Value, count: &mut usize) {
    match value {
        serde_json::Value::Number(n) => {
            let x = n.as_f64().unwrap();
            assert!(x.is_finite() && x > 0.0, "{path} is {x}; expected a positive, finite number");
            *count += 1;
        }
        serde_json::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                check_numbers(&format!("{path}[{i}]"), v, count);
            }
        }
        serde_json::Value::Object(fields) => {
            for (k, v) in fields {
                check_numbers(&format!("{path}.{k}"), v, count);
            }
        }
        _ => {}
    }
}

/// The embedding section of a quick run: the capped table stays at its cap and evicts, the
/// uncapped one grows past it, and the rates are real.
fn check_embedding(report: &serde_json::Value) {
    let e = &report["embedding"];
    let u = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("not a count: {v} in {e}"));
    let cap = u(&e["max_rows"]);
    assert_eq!(cap, u(&report["config"]["embedding"]["max_rows"]));
    let (on, off) = (&e["eviction_on"], &e["eviction_off"]);
    assert_eq!(u(&on["max_rows"]), cap);
    assert!(off["max_rows"].is_null(), "{off}");
    assert!(u(&on["rows"]) > 0 && u(&on["rows"]) <= cap, "eviction on: {on}");
    assert!(u(&on["evicted"]) > 0, "eviction on evicted nothing: {on}");
    assert!(u(&off["rows"]) > cap, "eviction off stayed under the cap: {off}");
    assert_eq!(u(&off["evicted"]), 0);
    assert!(u(&e["distinct_ids"]) > cap && u(&e["distinct_ids"]) <= u(&e["ids_drawn"]), "{e}");
    for (run, r) in [("eviction_on", on), ("eviction_off", off)] {
        let mut count = 0;
        for field in ["rows_per_sec", "pull_rows_per_sec", "push_rows_per_sec", "seconds", "table_bytes"] {
            check_numbers(&format!("embedding.{run}.{field}"), &r[field], &mut count);
        }
        check_numbers(&format!("embedding.{run}.step"), &r["step"], &mut count);
        assert_eq!(count, 9, "embedding.{run} lacks a rate: {r}");
    }
    let mut count = 0;
    for field in ["row_bytes", "raw_row_bytes", "row_bytes_ratio", "cap_bytes", "on_vs_off", "rows_per_push"]
    {
        check_numbers(&format!("embedding.{field}"), &e[field], &mut count);
    }
    assert_eq!(count, 6, "{e}");
    if cfg!(target_os = "linux") {
        assert!(e["rss_ratio_to_cap_bytes"].is_number(), "no RSS on Linux: {e}");
    }
}

/// The data section of a quick run: every format read locally with every row, from `s3s-fs`
/// when it is installed, pyarrow when python3 has it, and the share of a worker's time.
fn check_data(report: &serde_json::Value) {
    let d = &report["data"];
    let readers = d["readers"].as_array().unwrap_or_else(|| panic!("no readers: {d}"));
    let skipped: Vec<&str> = d["skipped"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    let s3 = !skipped.iter().any(|s| s.starts_with("s3:"));
    for format in ["csv", "csv.gz", "csv.zst", "libsvm", "parquet", "tfrecord"] {
        for source in ["local", "s3"] {
            let row = readers.iter().find(|r| r["format"] == format && r["source"] == source);
            if source == "s3" && !s3 {
                assert!(row.is_none(), "an s3 row without s3s-fs: {d}");
                continue;
            }
            let row = row.unwrap_or_else(|| panic!("no {format} {source} row: {d}"));
            let mut count = 0;
            check_numbers(&format!("data.{format}.{source}"), row, &mut count);
            assert!(row["rows_per_sec"].as_f64().unwrap() > 0.0 && row["file_bytes"].as_u64().unwrap() > 0);
        }
    }
    // CI installs both, so that their rows are checked there.
    if std::env::var_os("CI").is_some() {
        assert!(s3, "s3s-fs is installed in CI but was skipped: {skipped:?}");
        assert!(d["pyarrow"].is_object(), "pyarrow is installed in CI but was skipped: {skipped:?}");
    }
    if d["pyarrow"].is_object() {
        let p = &d["pyarrow"];
        let mut count = 0;
        check_numbers("data.pyarrow", p, &mut count);
        for key in
            ["batches_rows_per_sec", "batches_rows_per_cpu_sec", "table_rows_per_sec", "gradflow_vs_batches"]
        {
            assert!(p[key].is_number(), "no {key}: {p}");
        }
        // Per CPU second needs this process's CPU time, counted in 10 ms ticks: a --quick read
        // can take less than one, and then there is no ratio (null), never a wrong one.
        assert!(p["gradflow_vs_batches_cpu"].is_number() || p["gradflow_vs_batches_cpu"].is_null(), "{p}");
    }
    let targets = report["targets"].as_array().unwrap();
    let share = targets.iter().find(|t| t["name"].as_str().unwrap().contains("not spent reading"));
    let share = share.unwrap_or_else(|| panic!("no reading target: {targets:?}"))["value"].as_f64().unwrap();
    assert!(share < 1.0 && share.is_finite(), "share of a worker's time not reading: {share}");
}

#[test]
fn quick_bench_reports_every_section() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("bench.json");
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_gradflow"))
        .args(["bench", "--quick", "--json"])
        .arg(&json_path)
        .env("GRADFLOW_LOG", "warn")
        .output()
        .expect("run gradflow bench");
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "gradflow bench --quick failed:\n{stderr}\n{stdout}");
    assert!(elapsed < Duration::from_secs(120), "--quick took {elapsed:?}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    // The same object is the last line of standard output.
    let printed: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(printed, report);
    assert_eq!(report["version"], 1);
    for section in ["ceiling", "compute", "dense", "small", "sparse", "update", "training", "serve", "data"] {
        let mut count = 0;
        check_numbers(section, &report[section], &mut count);
        assert!(count > 0, "section {section} is missing or has no numbers: {}", report[section]);
    }
    // Ratios that the targets are computed from are there.
    assert!(report["dense"]["rows"][0]["ratio_to_tcp"].is_number());
    assert!(report["dense"]["rows"][0]["ratio_to_tcp_memory"].is_number());
    assert!(report["ceiling"]["tcp_memory_gb_per_s"].as_f64().unwrap() > 0.0);
    assert!(report["update"]["rows"][0]["apply_ratio_to_memcpy"].is_number());
    let training = &report["training"]["runs"][0];
    assert_eq!((training["workers"].as_u64(), training["mode"].as_str()), (Some(2), Some("sync")));
    let targets = report["targets"].as_array().unwrap();
    assert!(targets.iter().any(|t| t["name"].as_str().unwrap().contains("wide&deep")), "{targets:?}");
    assert!(targets.iter().any(|t| t["name"].as_str().unwrap().contains("serve p99")), "{targets:?}");
    let serve = report["serve"]["rows"].as_array().unwrap();
    assert_eq!(serve.len(), 4, "http and in process at two batch sizes: {serve:?}");
    assert!(report["elapsed_s"].as_f64().unwrap() > 0.0);
    check_embedding(&report);
    check_data(&report);

    // The table names every section.
    for heading in [
        "## 1. Ceiling",
        "## 1b. Compute ceiling",
        "## 2. Dense",
        "## 3. Small",
        "## 4. Sparse",
        "## 5. Server update",
        "## 6. Training",
        "## 7. Embedding",
        "## 8. Serving",
        "## 9. Data readers",
    ] {
        assert!(stdout.contains(heading), "no `{heading}` in the table:\n{stdout}");
    }
}

#[test]
fn only_runs_the_named_scenarios_and_refuses_unknown_ones() {
    let out = Command::new(env!("CARGO_BIN_EXE_gradflow"))
        .args(["bench", "--quick", "--only", "small"])
        .output()
        .expect("run gradflow bench");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert!(report["small"].is_object());
    for absent in
        ["ceiling", "compute", "dense", "sparse", "update", "training", "embedding", "serve", "data"]
    {
        assert!(report.get(absent).is_none(), "{absent} ran with --only small");
    }

    let out =
        Command::new(env!("CARGO_BIN_EXE_gradflow")).args(["bench", "--only", "nope"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nope") && stderr.contains("training"), "{stderr}");
}
