//! `deploy/monitoring`: the alert rules pass `promtool check rules` and their own
//! `promtool test rules` cases (each alert fires on the series that should fire it and stays
//! quiet on a healthy job), and every metric the rules and the Grafana dashboard name is one
//! the servers, workers or launcher serve.
//!
//! The promtool part is skipped, with a notice, when `promtool` (Debian package `prometheus`)
//! is not installed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn monitoring() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/monitoring")
}

fn promtool(args: &[&str]) -> Option<(bool, String)> {
    let out = match Command::new("promtool").args(args).current_dir(monitoring()).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("running promtool: {e}"),
    };
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Some((out.status.success(), text))
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_tests() {
    let Some((ok, text)) = promtool(&["check", "rules", "alerts.yaml"]) else {
        eprintln!(
            "NOTICE: skipping the promtool checks of deploy/monitoring/alerts.yaml: promtool is not installed (apt-get install prometheus)"
        );
        return;
    };
    assert!(ok, "promtool check rules alerts.yaml:\n{text}");
    assert!(text.contains("SUCCESS: 4 rules found"), "{text}");
    let (ok, text) = promtool(&["test", "rules", "alerts.test.yaml"]).unwrap();
    assert!(ok, "promtool test rules alerts.test.yaml:\n{text}");
}

/// Every sample name the code's metrics encode to: counters with `_total`, histograms with
/// `_bucket`, `_sum` and `_count`.
fn served_names() -> BTreeSet<String> {
    let texts = [
        gradflow_ps::metrics::Metrics::default().encode(),
        gradflow_trainer::metrics::WorkerMetrics::default().encode(),
        gradflow_launch::metrics::LauncherMetrics::default().encode(),
    ];
    let mut names = BTreeSet::new();
    for text in texts {
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
            let (name, kind) = rest.split_once(' ').unwrap();
            match kind {
                "counter" => names.insert(format!("{name}_total")),
                "histogram" => {
                    ["_bucket", "_sum", "_count"].iter().all(|s| names.insert(format!("{name}{s}")))
                }
                _ => names.insert(name.to_string()),
            };
        }
    }
    names
}

/// The `gradflow_...` names in `text`.
fn named(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("gradflow_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn the_dashboard_and_the_rules_name_only_metrics_that_are_served() {
    let served = served_names();
    assert!(
        served.contains("gradflow_worker_loss") && served.contains("gradflow_ps_push_seconds_bucket"),
        "{served:?}"
    );
    let dashboard = std::fs::read_to_string(monitoring().join("grafana-dashboard.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let exprs: Vec<&str> = parsed["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap())
        .map(|t| t["expr"].as_str().unwrap())
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    for (file, text) in [
        ("grafana-dashboard.json", exprs.join("\n")),
        ("alerts.yaml", std::fs::read_to_string(monitoring().join("alerts.yaml")).unwrap()),
    ] {
        let used = named(&text);
        assert!(!used.is_empty(), "{file} names no metric");
        let unknown: Vec<_> = used.difference(&served).collect();
        assert!(unknown.is_empty(), "{file} names metrics nothing serves: {unknown:?} (served: {served:?})");
    }
}
