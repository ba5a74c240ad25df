//! Every kind of bad input gets a clear status and leaves the parameters as they were.

mod common;

use bytes::Bytes;
use common::*;
use gradflow_core::{DenseSpec, Initializer, Mode, ModelSpec, OptimizerConfig, SparseSpec};
use gradflow_proto::{ParameterServerClient, codec, pb};
use gradflow_worker::{Worker, WorkerConfig};
use tonic::Code;
use tonic::transport::Channel;

fn spec() -> ModelSpec {
    ModelSpec {
        dense: vec![DenseSpec {
            name: "w".into(),
            shape: vec![4, 2],
            init: Initializer::Uniform { low: -1.0, high: 1.0, seed: 1 },
            optimizer: OptimizerConfig::adam(0.1),
        }],
        sparse: vec![SparseSpec {
            name: "emb".into(),
            dim: 3,
            init: Initializer::Normal { mean: 0.0, std: 1.0, seed: 2 },
            optimizer: OptimizerConfig::adagrad(0.1),
        }],
    }
}

fn dense(tensor: &str, partition: u32, offset: u64, values: &[f32]) -> pb::DenseSlice {
    pb::DenseSlice { tensor: tensor.into(), partition, offset, data: codec::f32s_to_bytes(values) }
}

fn sparse(table: &str, ids: &[u64], values: &[f32]) -> pb::SparseGrad {
    pb::SparseGrad {
        table: table.into(),
        ids: codec::u64s_to_bytes(ids),
        values: codec::f32s_to_bytes(values),
    }
}

fn push(worker: u32, step: u64, d: Vec<pb::DenseSlice>, s: Vec<pb::SparseGrad>) -> pb::PushRequest {
    pb::PushRequest { worker, step, dense: d, sparse: s, task: None, ..Default::default() }
}

async fn send(
    c: &mut ParameterServerClient<Channel>,
    msgs: Vec<pb::PushRequest>,
) -> Result<u64, tonic::Status> {
    c.push(futures::stream::iter(msgs)).await.map(|r| r.into_inner().version)
}

/// Everything the shard holds that a refused request must not change.
async fn snapshot(worker: &Worker) -> (Vec<f32>, Vec<f32>) {
    let mut d = vec![Vec::new()];
    worker.pull_all_dense(&mut d).await.unwrap();
    let mut rows = Vec::new();
    worker.pull_sparse("emb", &[1, 2, 3], &mut rows).await.unwrap();
    (d.remove(0), rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_its_status_and_changes_nothing() {
    init_tracing();
    let servers = start_shards(1, |s| {
        let mut c = config(s, 1, 1, Mode::Sync);
        c.transport.max_message_bytes = 64 << 10;
        c.transport.chunk_bytes = 16 << 10;
        c
    })
    .await;
    let addr = servers[0].addr().to_string();
    let mut worker = Worker::connect(WorkerConfig::new([addr.clone()], 0)).await.unwrap();
    worker.declare(spec()).await.unwrap();
    let before = snapshot(&worker).await;
    let mut raw =
        ParameterServerClient::new(Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy())
            .max_encoding_message_size(16 << 20);
    let ok_w = || dense("w", 0, 0, &[0.5; 8]);

    let cases: Vec<(&str, Vec<pb::PushRequest>, Code, &str)> = vec![
        (
            "unknown tensor",
            vec![push(0, 0, vec![dense("nope", 0, 0, &[1.0])], vec![])],
            Code::NotFound,
            "`nope`",
        ),
        (
            "unknown table",
            vec![push(0, 0, vec![], vec![sparse("tbl", &[1], &[1.0; 3])])],
            Code::NotFound,
            "`tbl`",
        ),
        (
            "short gradient",
            vec![push(0, 0, vec![dense("w", 0, 0, &[1.0; 5])], vec![])],
            Code::InvalidArgument,
            "expected 8",
        ),
        (
            "long gradient",
            vec![push(0, 0, vec![dense("w", 0, 0, &[1.0; 9])], vec![])],
            Code::InvalidArgument,
            "expected 8",
        ),
        (
            "ragged bytes",
            vec![push(
                0,
                0,
                vec![pb::DenseSlice {
                    tensor: "w".into(),
                    partition: 0,
                    offset: 0,
                    data: Bytes::from_static(&[0; 7]),
                }],
                vec![],
            )],
            Code::InvalidArgument,
            "whole number",
        ),
        (
            "no such partition",
            vec![push(0, 0, vec![dense("w", 3, 0, &[1.0; 8])], vec![])],
            Code::InvalidArgument,
            "partition 3",
        ),
        (
            "sparse row length",
            vec![push(0, 0, vec![], vec![sparse("emb", &[1, 2], &[1.0; 5])])],
            Code::InvalidArgument,
            "expected 24",
        ),
        (
            "NaN",
            vec![push(0, 0, vec![dense("w", 0, 0, &[f32::NAN; 8])], vec![])],
            Code::InvalidArgument,
            "non-finite",
        ),
        (
            "infinity in sparse",
            vec![push(0, 0, vec![], vec![sparse("emb", &[1], &[0.0, f32::INFINITY, 0.0])])],
            Code::InvalidArgument,
            "non-finite",
        ),
        // A good dense gradient next to a bad sparse one: nothing of the push is applied.
        (
            "all or nothing",
            vec![push(0, 0, vec![ok_w()], vec![sparse("missing", &[1], &[1.0; 3])])],
            Code::NotFound,
            "`missing`",
        ),
        (
            "all or nothing across messages",
            vec![push(0, 0, vec![ok_w()], vec![]), push(0, 0, vec![dense("w", 0, 8, &[1.0])], vec![])],
            Code::InvalidArgument,
            "",
        ),
        // Each message is checked for NaN as it arrives; one in the second message refuses the
        // first one's good gradient too.
        (
            "NaN in a later message",
            vec![
                push(0, 0, vec![ok_w()], vec![]),
                push(0, 0, vec![], vec![sparse("emb", &[1], &[f32::NAN, 0.0, 0.0])]),
            ],
            Code::InvalidArgument,
            "non-finite",
        ),
        ("unknown worker", vec![push(9, 0, vec![ok_w()], vec![])], Code::InvalidArgument, "worker 9"),
        ("empty stream", vec![], Code::InvalidArgument, "empty push"),
        (
            "oversized message",
            vec![push(0, 0, vec![dense("w", 0, 0, &vec![1.0; 40_000])], vec![])],
            Code::OutOfRange,
            "too large",
        ),
    ];
    for (what, msgs, code, needle) in cases {
        let status = send(&mut raw, msgs).await.expect_err(what);
        let code_ok = status.code() == code
            || (what == "oversized message" && status.code() == Code::ResourceExhausted);
        assert!(code_ok, "{what}: expected {code:?}, got {:?}: {}", status.code(), status.message());
        assert!(status.message().contains(needle), "{what}: message `{}` lacks `{needle}`", status.message());
        assert_eq!(snapshot(&worker).await, before, "{what} changed the model");
        assert_eq!(servers[0].shard().coord.version(), 0, "{what} advanced the model");
    }

    // Pulls of unknown things.
    let err = raw
        .pull_sparse(pb::PullSparseRequest {
            worker: 0,
            step: 0,
            tables: vec![pb::SparseIds { table: "zzz".into(), ids: codec::u64s_to_bytes(&[1]) }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("`zzz`"));
    let err = raw
        .pull_dense(pb::PullDenseRequest {
            worker: 0,
            step: 0,
            pieces: vec![pb::PieceRef { tensor: "ghost".into(), partition: 0 }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // A spec that is not a spec.
    let err = raw
        .declare_spec(pb::DeclareSpecRequest {
            worker: 0,
            spec_json: "{\"dense\": 3}".into(),
            partition_bytes: 4 << 20,
            num_shards: 1,
            shard: 0,
            servers: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // The wrong shard count.
    let err = raw
        .declare_spec(pb::DeclareSpecRequest {
            worker: 0,
            spec_json: serde_json::to_string(&spec()).unwrap(),
            partition_bytes: 4 << 20,
            num_shards: 2,
            shard: 1,
            servers: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("shard 1 of 2"), "{}", err.message());

    // A good push completes step 0; the same step again is refused as old.
    assert_eq!(send(&mut raw, vec![push(0, 0, vec![ok_w()], vec![])]).await.unwrap(), 0);
    let mut d = vec![Vec::new()];
    worker.set_step(1);
    worker.pull_all_dense(&mut d).await.unwrap();
    assert_ne!(d[0], before.0, "the good push was applied");
    let after_step = snapshot(&worker).await;
    let status = send(&mut raw, vec![push(0, 0, vec![ok_w()], vec![])]).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("step 0") && status.message().contains("step 1"),
        "{}",
        status.message()
    );
    assert_eq!(snapshot(&worker).await, after_step);

    drop(servers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_ids_sent_to_the_wrong_shard_are_refused() {
    init_tracing();
    let servers = start_shards(2, |s| config(s, 2, 1, Mode::Sync)).await;
    let addrs = addrs(&servers);
    let mut worker = Worker::connect(WorkerConfig::new(addrs.clone(), 0)).await.unwrap();
    worker.declare(spec()).await.unwrap();
    let id = (0..100).find(|id| gradflow_core::Placement::sparse_shard(*id, 2) == 1).unwrap();
    let mut raw = ParameterServerClient::new(
        Channel::from_shared(format!("http://{}", addrs[0])).unwrap().connect_lazy(),
    );
    let status =
        send(&mut raw, vec![push(0, 0, vec![], vec![sparse("emb", &[id], &[1.0; 3])])]).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("belongs to shard 1"), "{}", status.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_finite_gradients_can_be_allowed() {
    let servers = start_shards(1, |s| {
        let mut c = config(s, 1, 1, Mode::Async);
        c.settings.reject_non_finite = false;
        c
    })
    .await;
    let addr = servers[0].addr().to_string();
    let mut worker = Worker::connect(WorkerConfig::new([addr], 0)).await.unwrap();
    worker.declare(spec()).await.unwrap();
    worker.push_dense("w", &[f32::NAN; 8]).unwrap();
    worker.step().await.unwrap();
    let mut d = vec![Vec::new()];
    worker.pull_all_dense(&mut d).await.unwrap();
    assert!(d[0].iter().all(|v| v.is_nan()));
}
