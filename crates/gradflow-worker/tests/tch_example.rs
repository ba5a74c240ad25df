//! `examples/tch_mlp.rs` as the launcher runs it: two worker processes with the environment
//! contract, against servers started here (1 and 2 shards), reporting with `@gradflow` event
//! lines. Worker 0 must reach the test accuracy `docs/tch.md` documents.
//!
//! `cargo test -p gradflow-worker --features tch` builds the example before it runs this test.

#![cfg(feature = "tch")]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use gradflow_job::contract::CLUSTER_SPEC_VERSION;
use gradflow_job::{ClusterSpec, Event, JobConfig, Role};

/// The example's binary, built by `cargo test` next to this test's own binary.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap(); // target/<profile>/deps -> target/<profile>
    let bin = dir.join("examples").join("tch_mlp");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo test -p gradflow-worker --features tch`, which builds the examples",
        bin.display()
    );
    bin
}

/// The example's job file with `servers` shards, writing its results under `out`.
fn job(servers: u32, out: &Path) -> JobConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/tch_mlp.toml");
    let mut job = JobConfig::load(&path).unwrap();
    job.servers = servers;
    job.output.dir = Some(out.to_path_buf());
    job
}

/// Runs the job's workers as processes of the example against `servers` shards; returns each
/// worker's events.
async fn run(job: &JobConfig) -> Vec<Vec<Event>> {
    init_tracing();
    let servers = job.servers;
    let shards = start_shards(servers, |s| gradflow_launch::server_config(job, s)).await;
    let addrs = addrs(&shards);
    let bin = example_binary();
    let workers: Vec<_> = (0..job.workers)
        .map(|index| {
            let spec = ClusterSpec {
                version: CLUSTER_SPEC_VERSION,
                job: job.name.clone(),
                attempt: 0,
                role: Role::Worker,
                index,
                servers: addrs.clone(),
                num_workers: job.workers,
                listen: None,
                metrics_listen: None,
                job_config: job.clone(),
            };
            let (bin, args) = (bin.clone(), job.worker.command.clone().unwrap()[1..].to_vec());
            tokio::task::spawn_blocking(move || {
                let mut child = Command::new(&bin)
                    .args(&args)
                    .args(["--device", "cpu"])
                    .envs(spec.to_env())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                let events: Vec<Event> = BufReader::new(child.stdout.take().unwrap())
                    .lines()
                    .map_while(Result::ok)
                    .filter_map(|l| Event::parse(&l))
                    .collect();
                let status = child.wait().unwrap();
                assert!(status.success(), "worker {index}: {status}");
                events
            })
        })
        .collect();
    let mut events = Vec::new();
    for w in workers {
        events.push(w.await.unwrap());
    }
    for s in shards {
        s.shutdown().await.unwrap();
    }
    events
}

fn check(job: &JobConfig, events: &[Vec<Event>]) {
    let epochs = job.train.epochs;
    for (w, ev) in events.iter().enumerate() {
        let done = ev.iter().filter(|e| matches!(e, Event::Done { .. })).count();
        assert_eq!(done, 1, "worker {w} reports its end once: {ev:?}");
        assert!(ev.iter().any(|e| matches!(e, Event::Progress { .. })), "worker {w} reports progress");
    }
    let evals: Vec<(f64, f64)> = events[0]
        .iter()
        .filter_map(|e| match e {
            Event::Eval { test_accuracy, test_auc, test_examples, .. } => {
                assert_eq!(*test_examples, 114);
                Some((*test_accuracy, *test_auc))
            }
            _ => None,
        })
        .collect();
    assert_eq!(evals.len() as u64, epochs, "worker 0 scores the model after every epoch");
    let (accuracy, auc) = *evals.last().unwrap();
    // The evaluations also went to the results file, where `gradflow launch` points.
    let results = std::fs::read_to_string(job.output_dir().join(&job.output.results)).unwrap();
    let last: serde_json::Value = serde_json::from_str(results.lines().last().unwrap()).unwrap();
    assert_eq!(results.lines().count() as u64, epochs);
    assert_eq!((last["job"].as_str(), last["test_accuracy"].as_f64()), (Some("tch-mlp"), Some(accuracy)));
    // docs/tch.md: 0.974 (111 of 114) and 0.993; one example either way is within float noise.
    assert!(accuracy >= 0.96 && auc >= 0.985, "final test accuracy {accuracy}, AUC {auc}");
    let rate: Vec<f64> = events
        .iter()
        .flatten()
        .filter_map(|e| match e {
            Event::Progress { samples_per_sec, .. } => Some(*samples_per_sec),
            _ => None,
        })
        .collect();
    eprintln!("final test accuracy {accuracy:.4}, AUC {auc:.4}; progress samples/s per worker: {rate:.0?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_trains_to_the_documented_accuracy_on_one_shard() {
    let out = tempfile::tempdir().unwrap();
    let job = job(1, out.path());
    check(&job, &run(&job).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_trains_to_the_documented_accuracy_on_two_shards() {
    let out = tempfile::tempdir().unwrap();
    let job = job(2, out.path());
    check(&job, &run(&job).await);
}
