//! A sync push whose request is cancelled part-way (the worker killed, the connection reset)
//! counts whole or not at all, and never stops the step: the other worker's step completes and
//! the cancelled worker can push again.

mod common;

use std::time::Duration;

use common::*;
use gradflow_core::{DenseSpec, Initializer, Mode, ModelSpec, OptimizerConfig};
use gradflow_worker::{StepOutcome, Worker, WorkerConfig};

/// Large enough that the server spends milliseconds adding one push into the step's sum, the
/// window a cancellation used to fall into.
const N: usize = 8 << 20;
const STEPS: u64 = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_sync_push_never_stops_the_step() {
    init_tracing();
    let servers = start_shards(1, |s| {
        let mut c = config(s, 1, 2, Mode::Sync);
        c.settings.heartbeat_timeout = Duration::from_secs(60);
        c
    })
    .await;
    let spec = ModelSpec {
        dense: vec![DenseSpec {
            name: "w".into(),
            shape: vec![N as u64],
            init: Initializer::Zeros,
            optimizer: OptimizerConfig::sgd(0.5),
        }],
        sparse: vec![],
    };
    let mut w0 = Worker::connect(WorkerConfig::new(addrs(&servers), 0)).await.unwrap();
    let mut w1 = Worker::connect(WorkerConfig::new(addrs(&servers), 1)).await.unwrap();
    w0.declare(spec.clone()).await.unwrap();
    w1.declare(spec).await.unwrap();
    let grad = vec![1.0f32; N];

    let mut cancelled = 0;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for step in 0..STEPS {
        let g = grad.clone();
        let first = tokio::spawn(async move {
            w0.push_dense("w", &g).unwrap();
            let outcome = w0.step().await.unwrap();
            (w0, outcome)
        });
        // Worker 1's push is dropped after 0-40 ms: before it is sent, while it is sent, while
        // the server adds it, or after the step.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let after = Duration::from_micros(rng % 40_000);
        w1.push_dense("w", &grad).unwrap();
        match tokio::time::timeout(after, w1.step()).await {
            Ok(outcome) => assert_eq!(outcome.unwrap(), StepOutcome::Applied, "step {step}"),
            Err(_) => {
                cancelled += 1;
                // Pushed again: taken, a duplicate of a push that counted (fine), or stale if
                // the step completed with the cancelled one.
                w1.push_dense("w", &grad).unwrap();
                let again = w1.step().await.unwrap();
                assert!(
                    matches!(again, StepOutcome::Applied | StepOutcome::Stale { .. }),
                    "step {step}: {again:?}"
                );
            }
        }
        let (w, outcome) = tokio::time::timeout(Duration::from_secs(20), first)
            .await
            .unwrap_or_else(|_| {
                panic!("step {step}: worker 0's step never completed after worker 1's push was cancelled")
            })
            .unwrap();
        assert_eq!(outcome, StepOutcome::Applied, "step {step}");
        w0 = w;
        assert_eq!(w0.current_step(), step + 1);
        assert_eq!(w1.current_step(), step + 1);
    }
    assert!(cancelled > 0, "no push was cancelled; the test did not test anything");
    let version = w0.status().await.unwrap()[0].version;
    assert_eq!(version, STEPS, "every step completed once");
    w0.leave().await.unwrap();
    w1.leave().await.unwrap();
    for s in servers {
        s.shutdown().await.unwrap();
    }
}
