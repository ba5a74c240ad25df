//! The tch adapter against real shards: two sync workers train a tch model (an embedding
//! table trained as a sparse table, and an MLP split across two shards) to the same
//! parameters as one tch process taking the same optimizer steps (torch's own Adam and SGD)
//! on the concatenated batches. Run on the CPU through both transfer paths, and on CUDA where
//! there is a GPU.

#![cfg(feature = "tch")]

mod common;

use std::collections::BTreeSet;
use std::sync::Mutex;

use common::*;
use gradflow_core::{Mode, ModelSpec, OptimizerConfig};
use gradflow_worker::tch::{TchAdapter, Transfer};
use gradflow_worker::{StepOutcome, Worker, WorkerConfig};
use tch::nn::{self, Module, OptimizerConfig as _};
use tch::{Device, Kind, Reduction, Tensor};

const WORKERS: u32 = 2;
const SHARDS: u32 = 2;
const STEPS: u64 = 10;
const BATCH: i64 = 8;
const ROWS: i64 = 30;
const DIM: i64 = 4;
const FEATURES: i64 = 6;
const DENSE_LR: f64 = 0.01;
const TABLE_LR: f64 = 0.5;

/// An embedding of two categorical ids per example, concatenated with dense features, into
/// an MLP whose first weight (40 x 14 floats) is larger than a partition.
struct Net {
    emb: nn::Embedding,
    l1: nn::Linear,
    l2: nn::Linear,
}

impl Net {
    /// `sparse`: libtorch computes the embedding's gradient as a sparse tensor.
    fn new(emb: nn::Path, mlp: nn::Path, sparse: bool) -> Net {
        let config = nn::EmbeddingConfig { sparse, ..Default::default() };
        Net {
            emb: nn::embedding(emb / "emb", ROWS, DIM, config),
            l1: nn::linear(&mlp / "l1", FEATURES + 2 * DIM, 40, Default::default()),
            l2: nn::linear(&mlp / "l2", 40, 1, Default::default()),
        }
    }

    fn loss(&self, ids: &Tensor, x: &Tensor, y: &Tensor) -> Tensor {
        let e = self.emb.forward(ids).flatten(1, -1);
        let h = self.l1.forward(&Tensor::cat(&[x, &e], 1)).relu();
        self.l2.forward(&h).squeeze_dim(1).binary_cross_entropy_with_logits::<Tensor>(
            y,
            None,
            None,
            Reduction::Mean,
        )
    }
}

/// Worker `w`'s batch at step `s`: ids (some shared between workers, one repeated within the
/// batch), features and labels.
fn batch(w: u32, s: u64, device: Device) -> (Tensor, Tensor, Tensor) {
    let ids: Vec<i64> = (0..BATCH * 2)
        .map(|k| if k == 3 { 5 } else { (k * 7 + s as i64 * 3 + w as i64 * 11) % (ROWS - 10) })
        .collect();
    let x: Vec<f32> = (0..BATCH * FEATURES)
        .map(|k| ((k as f32 + 1.0) * 0.37 + s as f32 * 0.71 + w as f32 * 1.3).sin())
        .collect();
    let y: Vec<f32> = (0..BATCH).map(|k| ((k + s as i64 + w as i64) % 3 == 0) as i64 as f32).collect();
    (
        Tensor::from_slice(&ids).view([BATCH, 2]).to_device(device),
        Tensor::from_slice(&x).view([BATCH, FEATURES]).to_device(device),
        Tensor::from_slice(&y).to_device(device),
    )
}

/// tch's generator is global to the process; the workers of these tests share a process.
static SEEDING: Mutex<()> = Mutex::new(());

/// The model as every worker builds it: same seed, so the same values and the same spec.
fn seeded_net(vs: &nn::VarStore, sparse: bool) -> Net {
    let _one_at_a_time = SEEDING.lock().unwrap();
    tch::manual_seed(7);
    Net::new(vs.root(), vs.root() / "mlp", sparse)
}

fn adapter(vs: &nn::VarStore, transfer: Transfer) -> TchAdapter {
    TchAdapter::builder(vs, OptimizerConfig::adam(DENSE_LR))
        .sparse_table("emb.weight")
        .optimizer("emb.weight", OptimizerConfig::sgd(TABLE_LR))
        .seed(11)
        .transfer(transfer)
        .build()
        .unwrap()
}

/// What a worker saw at the end: the dense tensors by name, and the rows of `touched`.
struct Trained {
    spec: ModelSpec,
    dense: Vec<(String, Vec<f32>)>,
    rows: Vec<f32>,
    pinned: bool,
}

/// How the workers run.
#[derive(Clone, Copy)]
struct Setup {
    transfer: Transfer,
    device: Device,
    /// Sparse embedding gradients (`EmbeddingConfig::sparse`).
    sparse: bool,
}

async fn tch_worker(servers: Vec<String>, w: u32, setup: Setup, touched: Vec<u64>) -> Trained {
    let Setup { transfer, device, sparse } = setup;
    let vs = nn::VarStore::new(device);
    let net = seeded_net(&vs, sparse);
    let mut model = adapter(&vs, transfer);
    let mut config = WorkerConfig::new(servers, w);
    config.partition_bytes = 1024; // splits mlp.l1.weight (2240 bytes) across both shards
    let mut worker = Worker::connect(config).await.unwrap();
    model.declare(&mut worker).await.unwrap();
    for s in 0..STEPS {
        let (ids, x, y) = batch(w, s, device);
        model.batch_ids("emb.weight", &ids).unwrap();
        model.pull(&worker).await.unwrap();
        net.loss(&ids, &x, &y).backward();
        assert_eq!(model.step(&mut worker).await.unwrap(), StepOutcome::Applied);
    }
    let spec = model.spec().clone();
    let mut dense = vec![Vec::new(); spec.dense.len()];
    worker.pull_all_dense(&mut dense).await.unwrap();
    let mut rows = Vec::new();
    worker.pull_sparse("emb.weight", &touched, &mut rows).await.unwrap();
    worker.leave().await.unwrap();
    Trained {
        spec: spec.clone(),
        dense: spec.dense.iter().map(|d| d.name.clone()).zip(dense).collect(),
        rows,
        pinned: model.buffers_pinned(),
    }
}

/// One tch process: the servers' initial values, the concatenation of both workers' batches,
/// torch's Adam for the MLP and SGD for the embedding.
fn reference(spec: &ModelSpec) -> (nn::VarStore, nn::VarStore) {
    let (vs_emb, vs_mlp) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let net = Net::new(vs_emb.root(), vs_mlp.root() / "mlp", false);
    tch::no_grad(|| {
        for d in &spec.dense {
            let mut v = vec![0f32; d.numel() as usize];
            d.init.fill_dense(&d.name, &d.shape, 0, &mut v);
            let shape: Vec<i64> = d.shape.iter().map(|&n| n as i64).collect();
            vs_mlp.variables()[&d.name].shallow_clone().copy_(&Tensor::from_slice(&v).view(shape.as_slice()));
        }
        let table = &spec.sparse[0];
        let mut v = vec![0f32; (ROWS * DIM) as usize];
        for (id, row) in v.chunks_mut(DIM as usize).enumerate() {
            table.init.fill_row(&table.name, id as u64, row);
        }
        vs_emb.variables()["emb.weight"].shallow_clone().copy_(&Tensor::from_slice(&v).view([ROWS, DIM]));
    });
    let mut adam = nn::Adam::default().build(&vs_mlp, DENSE_LR).unwrap();
    let mut sgd = nn::Sgd::default().build(&vs_emb, TABLE_LR).unwrap();
    for s in 0..STEPS {
        let parts: Vec<_> = (0..WORKERS).map(|w| batch(w, s, Device::Cpu)).collect();
        let cat = |f: fn(&(Tensor, Tensor, Tensor)) -> &Tensor| {
            Tensor::cat(&parts.iter().map(f).collect::<Vec<_>>(), 0)
        };
        let (ids, x, y) = (cat(|p| &p.0), cat(|p| &p.1), cat(|p| &p.2));
        adam.zero_grad();
        sgd.zero_grad();
        net.loss(&ids, &x, &y).backward();
        adam.step();
        sgd.step();
    }
    (vs_emb, vs_mlp)
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_device(Device::Cpu).flatten(0, -1)).unwrap()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * w.abs().max(1.0), "{what}[{i}]: got {g}, want {w}");
    }
}

fn touched_ids() -> Vec<u64> {
    let mut all = BTreeSet::new();
    for w in 0..WORKERS {
        for s in 0..STEPS {
            all.extend(
                values(&batch(w, s, Device::Cpu).0.to_kind(Kind::Float)).into_iter().map(|v| v as u64),
            );
        }
    }
    all.into_iter().collect()
}

/// Trains with 2 sync workers on `device` and checks the result against the CPU reference,
/// to relative tolerance `tol`.
async fn sync_workers_equal_one_process(setup: Setup, tol: f32) -> Vec<Trained> {
    init_tracing();
    let servers = start_shards(SHARDS, |s| config(s, SHARDS, WORKERS, Mode::Sync)).await;
    let addrs = addrs(&servers);
    let touched = touched_ids();
    assert!((touched.len() as i64) < ROWS - 5, "some rows stay untouched");
    let handles: Vec<_> =
        (0..WORKERS).map(|w| tokio::spawn(tch_worker(addrs.clone(), w, setup, touched.clone()))).collect();
    let mut results = Vec::new();
    for h in handles {
        results.push(h.await.unwrap());
    }
    // Only the rows the batches touched ever reached the servers.
    let rows: u64 = servers.iter().map(|s| s.shard().model().unwrap().sparse_rows()).sum();
    assert_eq!(rows, touched.len() as u64);
    for (s, server) in servers.iter().enumerate() {
        assert!(!server.shard().model().unwrap().pieces().is_empty(), "shard {s} holds dense pieces");
        assert_eq!(server.shard().coord.version(), STEPS);
    }

    // Every worker read the same spec from its store; the reference starts from its values.
    let spec = &results[0].spec;
    assert!(results.iter().all(|r| &r.spec == spec));
    assert_eq!(spec.sparse.len(), 1);
    let (vs_emb, vs_mlp) = reference(spec);
    let want_mlp = vs_mlp.variables();
    let want_emb = values(&vs_emb.variables()["emb.weight"]);
    let untouched_moved = (0..ROWS as u64).filter(|id| !touched.contains(id)).any(|id| {
        let mut init = vec![0f32; DIM as usize];
        spec.sparse[0].init.fill_row("emb.weight", id, &mut init);
        init != want_emb[(id * DIM as u64) as usize..][..DIM as usize]
    });
    assert!(!untouched_moved, "the reference leaves untouched rows alone, as the sparse table does");
    for r in &results {
        assert_eq!(r.dense.len(), 4);
        for (name, got) in &r.dense {
            assert_close(name, got, &values(&want_mlp[name]), tol);
        }
        for (k, id) in touched.iter().enumerate() {
            let d = DIM as usize;
            assert_close(
                &format!("emb[{id}]"),
                &r.rows[k * d..][..d],
                &want_emb[*id as usize * d..][..d],
                tol,
            );
        }
    }
    for s in servers {
        s.shutdown().await.unwrap();
    }
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_sync_workers_train_like_one_process_on_the_concatenated_batches() {
    let setup = Setup { transfer: Transfer::Direct, device: Device::Cpu, sparse: false };
    let results = sync_workers_equal_one_process(setup, 2e-5).await;
    assert!(results.iter().all(|r| !r.pinned));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sparse_embedding_gradients_train_the_same() {
    let setup = Setup { transfer: Transfer::Direct, device: Device::Cpu, sparse: true };
    let results = sync_workers_equal_one_process(setup, 2e-5).await;
    assert_eq!(results.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_staged_transfer_path_trains_the_same_on_the_cpu() {
    let setup = Setup { transfer: Transfer::Staged, device: Device::Cpu, sparse: false };
    let results = sync_workers_equal_one_process(setup, 2e-5).await;
    assert!(results.iter().all(|r| !r.pinned), "CPU host buffers are not pinned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_cuda_the_workers_train_through_pinned_buffers() {
    if !tch::Cuda::is_available() {
        eprintln!("skipped: libtorch sees no CUDA device on this machine");
        return;
    }
    for sparse in [false, true] {
        let setup = Setup { transfer: Transfer::Staged, device: Device::Cuda(0), sparse };
        let results = sync_workers_equal_one_process(setup, 1e-4).await;
        assert!(results.iter().all(|r| r.pinned), "CUDA host buffers are pinned");
    }
}
