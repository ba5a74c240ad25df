//! A finite but huge gradient (3e38) through a real server on loopback port 0: the update that
//! would make a parameter or its optimizer state infinite is stopped, the shard names the
//! tensor, the element and the step and refuses everything afterwards (pulls, pushes, steps),
//! the worker hears a permanent error, the bad update does not count as a step, and no
//! checkpoint of the bad step is written. The bad values are not put back: the refusal is what
//! keeps anyone from seeing them.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{addrs, config, start_shards};
use gradflow_core::{DenseSpec, Initializer, Mode, ModelSpec, OptimizerConfig, SparseSpec};
use gradflow_ps::{CheckpointConfig, PsError, RunningServer, ServerConfig};
use gradflow_worker::{Worker, WorkerConfig, WorkerError};

fn spec(dense: OptimizerConfig, sparse: OptimizerConfig) -> ModelSpec {
    ModelSpec {
        dense: vec![DenseSpec {
            name: "w".into(),
            shape: vec![4],
            init: Initializer::Constant { value: 0.5 },
            optimizer: dense,
        }],
        sparse: vec![SparseSpec {
            name: "emb".into(),
            dim: 2,
            init: Initializer::Constant { value: 0.5 },
            optimizer: sparse,
        }],
    }
}

/// One shard writing a checkpoint after every step (and at shutdown) into `dir`.
async fn server(dir: &Path, mode: Mode) -> Vec<RunningServer> {
    start_shards(1, |s| ServerConfig {
        checkpoint: Some(CheckpointConfig {
            url: dir.display().to_string(),
            every_steps: Some(1),
            ..CheckpointConfig::default()
        }),
        ..config(s, 1, 1, mode)
    })
    .await
}

/// The dense values and optimizer state of `w` and the update count, as the shard holds them.
fn held(servers: &[RunningServer]) -> (Vec<f32>, Vec<f32>, u64) {
    let model = servers[0].shard().declared().expect("declared");
    let p = &model.pieces()[0];
    (p.values(), p.state(), p.steps())
}

/// The steps of the complete checkpoints under `dir` (those with a manifest).
fn checkpoints(dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(dir)
        .map(|d| d.flatten().collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.path().join("manifest.json").exists())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("ckpt-")?.parse().ok())
        .collect();
    steps.sort();
    steps
}

/// Waits until the complete checkpoints under `dir` are `want` (uploads run in the background).
async fn wait_for_checkpoints(dir: &Path, want: &[u64]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while checkpoints(dir) != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "checkpoints {:?}, expected {want:?}",
            checkpoints(dir)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_stopped(e: &WorkerError, tensor: &str, step: u64) {
    match e {
        WorkerError::ModelNotFinite { step: s, message, .. } => {
            assert_eq!(*s, step, "{message}");
            assert!(
                message.contains(&format!("step {step}")) && message.contains(&format!("`{tensor}`")),
                "{message}"
            );
            assert!(message.contains("refuses every push and pull"), "{message}");
        }
        other => panic!("expected the model-not-finite error, got {other}"),
    }
    assert!(e.is_permanent(), "{e}");
}

/// Shuts the shards down: the last checkpoint of a shard stopped by a non-finite update of
/// `tensor` is refused, and shutdown reports it as a failed checkpoint.
async fn shut_down_refusing_the_last_checkpoint(servers: Vec<RunningServer>, tensor: &str) {
    for s in servers {
        match s.shutdown().await {
            Err(PsError::CheckpointsFailed(failures)) => assert!(
                failures.iter().all(|f| f.contains(&format!("`{tensor}`")) && f.contains("non-finite")),
                "{failures:?}"
            ),
            other => panic!("expected the last checkpoint refused, got {other:?}"),
        }
    }
}

/// Every further request of `worker` is refused with the same error.
async fn everything_refused(worker: &mut Worker, tensor: &str, step: u64) {
    let mut d = vec![Vec::new()];
    assert_stopped(&worker.pull_all_dense(&mut d).await.unwrap_err(), tensor, step);
    let mut rows = Vec::new();
    assert_stopped(&worker.pull_sparse("emb", &[1], &mut rows).await.unwrap_err(), tensor, step);
    worker.push_dense("w", &[1.0; 4]).unwrap();
    assert_stopped(&worker.step().await.unwrap_err(), tensor, step);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sgd_driven_to_infinity_stops_the_job_with_the_tensor_and_step_named() {
    for mode in [Mode::Sync, Mode::Async] {
        let dir = tempfile::tempdir().unwrap();
        let servers = server(dir.path(), mode).await;
        let mut worker = Worker::connect(WorkerConfig::new(addrs(&servers), 0)).await.unwrap();
        worker.declare(spec(OptimizerConfig::sgd(1.0), OptimizerConfig::sgd(1.0))).await.unwrap();

        // 0.5 - 3e38 is finite; one more such step is -inf.
        worker.push_dense("w", &[3e38; 4]).unwrap();
        worker.step().await.unwrap();
        wait_for_checkpoints(dir.path(), &[1]).await;
        let good = held(&servers);
        assert_eq!(good, (vec![0.5 - 3e38; 4], vec![], 1), "{mode:?}");

        worker.push_dense("w", &[3e38; 4]).unwrap();
        let e = worker.step().await.unwrap_err();
        assert_stopped(&e, "w", 1);
        assert!(e.to_string().contains("element 0 would become -inf"), "{mode:?}: {e}");
        everything_refused(&mut worker, "w", 1).await;
        assert_eq!(held(&servers).2, 1, "{mode:?}: the bad update is not counted as a step");

        // No checkpoint of the bad step, none at shutdown either.
        shut_down_refusing_the_last_checkpoint(servers, "w").await;
        assert_eq!(checkpoints(dir.path()), vec![1], "{mode:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adagrad_whose_accumulator_would_overflow_stops_the_job_before_any_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let servers = server(dir.path(), Mode::Sync).await;
    let mut worker = Worker::connect(WorkerConfig::new(addrs(&servers), 0)).await.unwrap();
    worker.declare(spec(OptimizerConfig::adagrad(0.05), OptimizerConfig::adagrad(0.05))).await.unwrap();

    // (3e38)^2 is infinite in f32: the accumulator would be, on the very first step.
    worker.push_dense("w", &[3e38, 1.0, 1.0, 1.0]).unwrap();
    let e = worker.step().await.unwrap_err();
    assert_stopped(&e, "w", 0);
    assert!(e.to_string().contains("`sum` of element 0 would become inf"), "{e}");
    everything_refused(&mut worker, "w", 0).await;
    assert_eq!(held(&servers).2, 0, "the bad update is not counted as a step");
    shut_down_refusing_the_last_checkpoint(servers, "w").await;
    assert_eq!(checkpoints(dir.path()), Vec::<u64>::new(), "no checkpoint written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sparse_row_that_would_overflow_is_named_by_table_and_id() {
    let dir = tempfile::tempdir().unwrap();
    let servers = server(dir.path(), Mode::Sync).await;
    let mut worker = Worker::connect(WorkerConfig::new(addrs(&servers), 0)).await.unwrap();
    worker.declare(spec(OptimizerConfig::sgd(0.1), OptimizerConfig::adagrad(0.05))).await.unwrap();
    let mut rows = Vec::new();
    worker.pull_sparse("emb", &[7, 9], &mut rows).await.unwrap();
    worker.push_dense("w", &[1.0; 4]).unwrap();
    worker.push_sparse("emb", &[7, 9], &[1.0, 1.0, 3e38, 1.0]).unwrap();
    let e = worker.step().await.unwrap_err();
    assert_stopped(&e, "emb", 0);
    assert!(e.to_string().contains("(row 9)"), "{e}");
    assert!(e.to_string().contains("`sum` of element 0 would become inf"), "{e}");
    everything_refused(&mut worker, "emb", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clip_norm_keeps_a_huge_gradient_finite_and_training_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let servers = server(dir.path(), Mode::Sync).await;
    let mut worker = Worker::connect(WorkerConfig::new(addrs(&servers), 0)).await.unwrap();
    let clipped: OptimizerConfig =
        serde_json::from_str(r#"{"kind": "adagrad", "lr": 0.05, "clip_norm": 1.0}"#).unwrap();
    worker.declare(spec(clipped.clone(), clipped)).await.unwrap();
    for _ in 0..3 {
        worker.push_dense("w", &[3e38; 4]).unwrap();
        worker.step().await.unwrap();
    }
    // Reference: the clipped gradient is 0.5 per element (norm 1 over 4 equal elements);
    // Adagrad's sum after t steps is 0.25 t, its step 0.05 * 0.5 / sqrt(0.25 t).
    let mut want = 0.5f64;
    for t in 1..=3 {
        want -= 0.05 * 0.5 / (0.25 * t as f64).sqrt();
    }
    let (values, state, steps) = held(&servers);
    assert_eq!(steps, 3);
    assert!(values.iter().all(|&v| (f64::from(v) - want).abs() < 1e-5), "{values:?} vs {want}");
    assert!(state.iter().all(|&s| (s - 0.75).abs() < 1e-5), "{state:?}");
}
