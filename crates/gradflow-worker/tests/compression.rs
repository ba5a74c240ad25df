//! `[transport] compression`: values travel as f16 or bf16 over both transports, the servers
//! widen them once and keep computing in f32, and a compact push that does not add up is
//! refused by name. Real servers on loopback.

mod common;

use common::{addrs, one_worker_sync_shards};
use gradflow_core::{DenseSpec, Initializer, ModelSpec, OptimizerConfig, SparseSpec};
use gradflow_proto::{Compression, ParameterServerClient, codec, pb};
use gradflow_worker::{Code, Worker, WorkerConfig};
use tonic::transport::Channel;

fn spec() -> ModelSpec {
    ModelSpec {
        dense: vec![DenseSpec {
            name: "w".into(),
            shape: vec![6],
            init: Initializer::Constant { value: 1.0 },
            optimizer: OptimizerConfig::sgd(1.0),
        }],
        sparse: vec![SparseSpec {
            name: "emb".into(),
            dim: 3,
            init: Initializer::Constant { value: 0.0 },
            optimizer: OptimizerConfig::sgd(1.0),
        }],
    }
}

/// Two shards (so that both a dense piece and rows live on each), one worker with
/// `compression`, over the link or over gRPC only: pushes `grad` to `w` and to three rows,
/// steps, and returns what it pulls back.
async fn one_step(compression: Compression, link: bool, grad: &[f32; 6]) -> (Vec<f32>, Vec<f32>) {
    let servers = one_worker_sync_shards(2, link).await;
    let mut cfg = WorkerConfig::new(addrs(&servers), 0);
    cfg.transport.compression = compression;
    let mut worker = Worker::connect(cfg).await.unwrap();
    worker.declare(spec()).await.unwrap();
    let ids = [3u64, 10, 7_000_000_001];
    worker.push_dense("w", grad).unwrap();
    let rows: Vec<f32> =
        (0..ids.len()).flat_map(|i| grad[..3].iter().map(move |g| g * (i + 1) as f32)).collect();
    worker.push_sparse("emb", &ids, &rows).unwrap();
    worker.step().await.unwrap();
    let mut dense = vec![Vec::new()];
    worker.pull_all_dense(&mut dense).await.unwrap();
    let mut pulled = Vec::new();
    worker.pull_sparse("emb", &ids, &mut pulled).await.unwrap();
    let link_used: u64 = servers.iter().map(|s| s.shard().metrics.link_connections.get()).sum();
    assert_eq!(link_used > 0, link, "the transport asked for carried the step");
    (dense.remove(0), pulled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_values_train_as_f32_does_over_both_transports() {
    // Values that f16 and bf16 hold exactly: every encoding gives f32's model, bit for bit.
    let exact = [0.5f32, -0.25, 2.0, 0.0, -1.5, 0.125];
    let reference = one_step(Compression::None, true, &exact).await;
    assert_eq!(reference.0, vec![0.5, 1.25, -1.0, 1.0, 2.5, 0.875]);
    for compression in [Compression::F16, Compression::Bf16] {
        for link in [true, false] {
            let got = one_step(compression, link, &exact).await;
            assert_eq!(got, reference, "{compression:?}, link {link}");
        }
    }
    // Values they do not hold: the gradient is rounded on its way in, the model on its way
    // out; the server's own values stay f32 (1 - rounded(0.1) is not a 16-bit number).
    let inexact = [0.1f32, 0.2, 0.3, 1e-3, 3.3, -7.7];
    let f32_model = one_step(Compression::None, true, &inexact).await;
    for (compression, encoding) in
        [(Compression::F16, pb::ValueEncoding::F16), (Compression::Bf16, pb::ValueEncoding::Bf16)]
    {
        let round = |v: &[f32]| {
            let mut b = bytes::BytesMut::new();
            codec::put_values(&mut b, v, encoding);
            let mut out = vec![0f32; v.len()];
            codec::copy_values(&mut out, &b, encoding);
            out
        };
        let server_model: Vec<f32> = round(&inexact).iter().map(|g| 1.0 - g).collect();
        let got = one_step(compression, true, &inexact).await;
        assert_eq!(
            got.0,
            round(&server_model),
            "{compression:?}: the f32 update of the rounded gradient, rounded"
        );
        assert_ne!(got.0, f32_model.0, "{compression:?} changes the bytes, so some value differs");
        let tolerance = if compression == Compression::F16 { 2e-3 } else { 1.6e-2 };
        for (x, y) in got.0.iter().zip(&f32_model.0) {
            assert!((x - y).abs() <= tolerance * y.abs().max(1.0), "{compression:?}: {x} vs {y}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compact_push_that_does_not_add_up_is_refused_by_name() {
    let servers = one_worker_sync_shards(1, false).await;
    let mut worker = Worker::connect(WorkerConfig::new(addrs(&servers), 0)).await.unwrap();
    worker.declare(spec()).await.unwrap();
    let mut client = ParameterServerClient::new(
        Channel::from_shared(format!("http://{}", addrs(&servers)[0])).unwrap().connect_lazy(),
    );
    let slice =
        |data: Vec<u8>| pb::DenseSlice { tensor: "w".into(), partition: 0, offset: 0, data: data.into() };
    let push = |encoding: i32, data: Vec<u8>| pb::PushRequest {
        worker: 0,
        step: 0,
        dense: vec![slice(data)],
        encoding,
        ..Default::default()
    };
    let refused = async |client: &mut ParameterServerClient<Channel>, msgs: Vec<pb::PushRequest>| {
        client.push(futures::stream::iter(msgs)).await.expect_err("refused")
    };
    // An encoding no version of gradflow has.
    let e = refused(&mut client, vec![push(7, vec![0; 12])]).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("unknown value encoding 7"), "{}", e.message());
    // Eleven bytes of f16 values.
    let e = refused(&mut client, vec![push(pb::ValueEncoding::F16 as i32, vec![0; 11])]).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("`w`") && e.message().contains("whole number of f16"), "{}", e.message());
    // A stream that changes encoding half way.
    let mut second = push(pb::ValueEncoding::F32 as i32, vec![0; 12]);
    second.dense[0].offset = 3;
    let e = refused(&mut client, vec![push(pb::ValueEncoding::Bf16 as i32, vec![0; 6]), second]).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("mixes value encodings"), "{}", e.message());
    // A NaN in bf16 is a NaN.
    let mut nan = vec![0u8; 12];
    nan[2..4].copy_from_slice(&0x7fc0u16.to_le_bytes());
    let e = refused(&mut client, vec![push(pb::ValueEncoding::Bf16 as i32, nan)]).await;
    assert!(e.message().contains("non-finite gradient") && e.message().contains("`w`"), "{}", e.message());
    // Nothing of it reached the model.
    let mut dense = vec![Vec::new()];
    worker.pull_all_dense(&mut dense).await.unwrap();
    assert_eq!(dense[0], vec![1.0; 6]);
    // An unknown encoding asked of a pull is refused too.
    let e = client
        .pull_sparse(pb::PullSparseRequest { worker: 0, step: 0, encoding: 9, ..Default::default() })
        .await
        .expect_err("refused");
    assert!(e.message().contains("unknown value encoding 9"), "{}", e.message());
}
