//! `Worker::push_dense_mut`: a gradient written in place arrives as `push_dense`'s copy of it
//! does, for every compression and over both transports, cut at `chunk_bytes` boundaries
//! and across pieces on two shards; the buffer is the tensor's own from step to step. Real
//! servers on loopback.

mod common;

use common::{addrs, one_worker_sync_shards};
use gradflow_core::{DenseSpec, Initializer, ModelSpec, OptimizerConfig};
use gradflow_proto::Compression;
use gradflow_worker::{Worker, WorkerConfig, WorkerError};

/// Chunks of 256 values, pieces of 512: `a` is 3 whole chunks in 2 pieces (512 + 256), `b`
/// has a short last chunk in each piece (512 + 488), `c` is one short chunk.
const CHUNK_BYTES: usize = 1024;
const PARTITION_BYTES: u64 = 2048;
const SIZES: [(&str, u64); 3] = [("a", 768), ("b", 1000), ("c", 5)];

fn spec() -> ModelSpec {
    ModelSpec {
        dense: SIZES
            .iter()
            .map(|&(name, n)| DenseSpec {
                name: name.into(),
                shape: vec![n],
                init: Initializer::Constant { value: 1.0 },
                optimizer: OptimizerConfig::sgd(1.0),
            })
            .collect(),
        sparse: Vec::new(),
    }
}

/// Step `step`'s gradient of tensor `t`: distinct, inexact in 16 bits, different every step.
fn grad(step: usize, t: usize, n: u64) -> Vec<f32> {
    (0..n).map(|i| ((i as f32) * 0.37 + t as f32 * 0.11 + step as f32 * 0.05).sin() * 0.3).collect()
}

/// How one step's gradients are handed to the worker.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Way {
    /// Every tensor through `push_dense`.
    Copied,
    /// Every tensor through `push_dense_mut` (`a` asked for twice and written in two halves).
    InPlace,
    /// `a` through `push_dense`, the others in place.
    Mixed,
}

/// Two shards, one worker with `compression`, over the link or gRPC only: two steps, each
/// staged `ways[step]`; returns the model pulled after each step.
async fn run(compression: Compression, link: bool, ways: [Way; 2]) -> Vec<Vec<Vec<f32>>> {
    let servers = one_worker_sync_shards(2, link).await;
    let mut cfg = WorkerConfig::new(addrs(&servers), 0);
    cfg.transport.compression = compression;
    cfg.transport.chunk_bytes = CHUNK_BYTES;
    cfg.partition_bytes = PARTITION_BYTES;
    let mut worker = Worker::connect(cfg).await.unwrap();
    worker.declare(spec()).await.unwrap();
    let placement = worker.placement().unwrap();
    assert_eq!(placement.pieces_of(1).len(), 2, "b spans two pieces");
    assert_ne!(placement.pieces_of(1)[0].shard, placement.pieces_of(1)[1].shard, "on both shards");
    let mut pulled = Vec::new();
    let mut buffers = Vec::new();
    for (step, way) in ways.into_iter().enumerate() {
        let mut at = Vec::new();
        for (t, &(name, n)) in SIZES.iter().enumerate() {
            let g = grad(step, t, n);
            let in_place = way == Way::InPlace || (way == Way::Mixed && t != 0);
            if !in_place {
                worker.push_dense(name, &g).unwrap();
                continue;
            }
            if t == 0 {
                let half = g.len() / 2;
                worker.push_dense_mut(name).unwrap()[..half].copy_from_slice(&g[..half]);
                worker.push_dense_mut(name).unwrap()[half..].copy_from_slice(&g[half..]);
            } else {
                worker.push_dense_mut(name).unwrap().copy_from_slice(&g);
            }
            at.push((t, worker.push_dense_mut(name).unwrap().as_ptr()));
        }
        worker.step().await.unwrap();
        let mut dense = vec![Vec::new(); SIZES.len()];
        worker.pull_all_dense(&mut dense).await.unwrap();
        pulled.push(dense);
        buffers.push(at);
    }
    let link_used: u64 = servers.iter().map(|s| s.shard().metrics.link_connections.get()).sum();
    assert_eq!(link_used > 0, link, "the transport asked for carried the steps");
    if link && ways == [Way::InPlace, Way::InPlace] {
        // Sent over the link, each buffer comes back to its tensor: no new one each step.
        assert_eq!(buffers[0], buffers[1], "{compression:?}: the same buffers both steps");
    }
    pulled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gradient_written_in_place_arrives_as_a_copied_one() {
    for compression in [Compression::None, Compression::F16, Compression::Bf16] {
        for link in [true, false] {
            let copied = run(compression, link, [Way::Copied, Way::Copied]).await;
            for ways in [[Way::InPlace, Way::InPlace], [Way::InPlace, Way::Mixed], [Way::Mixed, Way::InPlace]]
            {
                let got = run(compression, link, ways).await;
                assert_eq!(got, copied, "{compression:?}, link {link}, {ways:?}");
            }
            if compression == Compression::None {
                // SGD with rate 1 from 1.0, one worker: 1 - g, then 1 - g0 - g1 (each rounded).
                for (t, &(_, n)) in SIZES.iter().enumerate() {
                    let (g0, g1) = (grad(0, t, n), grad(1, t, n));
                    let one: Vec<f32> = g0.iter().map(|g| 1.0 - g).collect();
                    let two: Vec<f32> = one.iter().zip(&g1).map(|(v, g)| v - g).collect();
                    assert_eq!(copied[0][t], one, "tensor {t} after one step");
                    assert_eq!(copied[1][t], two, "tensor {t} after two steps");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_dense_mut_names_what_it_cannot_stage() {
    let servers = one_worker_sync_shards(1, true).await;
    let mut worker = Worker::connect(WorkerConfig::new(addrs(&servers), 0)).await.unwrap();
    assert!(matches!(worker.push_dense_mut("a"), Err(WorkerError::NotDeclared)));
    worker.declare(spec()).await.unwrap();
    match worker.push_dense_mut("nope") {
        Err(WorkerError::UnknownTensor(name)) => assert_eq!(name, "nope"),
        other => panic!("expected UnknownTensor, got {:?}", other.map(|b| b.len())),
    }
    assert_eq!(worker.push_dense_mut("b").unwrap().len(), 1000, "the tensor's length");
}
