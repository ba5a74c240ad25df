//! A server with a job token refuses every call without it, or with another one, and a
//! refused call changes nothing; the job's own workers train as usual.

mod common;

use common::*;
use gradflow_core::{DenseSpec, Initializer, Mode, ModelSpec, OptimizerConfig, SparseSpec};
use gradflow_proto::auth::{ClientAuth, Token};
use gradflow_proto::{ParameterServerClient, codec, pb};
use gradflow_ps::ServerConfig;
use gradflow_worker::{Worker, WorkerConfig};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Client = ParameterServerClient<InterceptedService<Channel, ClientAuth>>;

fn spec() -> ModelSpec {
    ModelSpec {
        dense: vec![DenseSpec {
            name: "w".into(),
            shape: vec![4],
            init: Initializer::Uniform { low: -1.0, high: 1.0, seed: 1 },
            optimizer: OptimizerConfig::sgd(0.5),
        }],
        sparse: vec![SparseSpec {
            name: "emb".into(),
            dim: 2,
            init: Initializer::Normal { mean: 0.0, std: 1.0, seed: 2 },
            optimizer: OptimizerConfig::sgd(0.5),
        }],
    }
}

/// Calls every RPC of the service with `client`; returns each one's status code.
async fn every_rpc(c: &mut Client) -> Vec<(&'static str, Code)> {
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    let spec_json = serde_json::to_string(&spec()).unwrap();
    let grad = pb::PushRequest {
        worker: 0,
        step: 0,
        dense: vec![pb::DenseSlice {
            tensor: "w".into(),
            partition: 0,
            offset: 0,
            data: codec::f32s_to_bytes(&[1.0; 4]),
        }],
        sparse: vec![pb::SparseGrad {
            table: "emb".into(),
            ids: codec::u64s_to_bytes(&[7]),
            values: codec::f32s_to_bytes(&[1.0, 1.0]),
        }],
        task: None,
        ..Default::default()
    };
    let ids = pb::SparseIds { table: "emb".into(), ids: codec::u64s_to_bytes(&[7]) };
    vec![
        (
            "DeclareSpec",
            code(
                c.declare_spec(pb::DeclareSpecRequest {
                    worker: 0,
                    spec_json,
                    partition_bytes: gradflow_core::DEFAULT_PARTITION_BYTES,
                    ..Default::default()
                })
                .await
                .map(drop),
            ),
        ),
        ("Heartbeat", code(c.heartbeat(pb::HeartbeatRequest { worker: 0, step: 0 }).await.map(drop))),
        (
            "PullDense",
            code(
                async {
                    let mut stream = c
                        .pull_dense(pb::PullDenseRequest {
                            worker: 0,
                            step: 0,
                            pieces: vec![],
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    while stream.message().await?.is_some() {}
                    Ok(())
                }
                .await,
            ),
        ),
        (
            "PullSparse",
            code(
                c.pull_sparse(pb::PullSparseRequest {
                    worker: 0,
                    step: 0,
                    tables: vec![ids],
                    ..Default::default()
                })
                .await
                .map(drop),
            ),
        ),
        ("Push", code(c.push(futures::stream::iter(vec![grad])).await.map(drop))),
        ("Leave", code(c.leave(pb::LeaveRequest { worker: 0, pause: false }).await.map(drop))),
        ("Status", code(c.status(pb::StatusRequest {}).await.map(drop))),
        ("Checkpoint", code(c.checkpoint(pb::CheckpointRequest { step: 1 }).await.map(drop))),
        (
            "DeclareTasks",
            code(
                c.declare_tasks(pb::DeclareTasksRequest {
                    worker: 0,
                    pieces: vec![pb::TaskPiece { path: "train.csv".into(), start: 0, end: 100 }],
                    epochs: 1,
                    seed: 0,
                })
                .await
                .map(drop),
            ),
        ),
        (
            "NextTask",
            code(
                c.next_task(pb::NextTaskRequest { worker: 0, done_lease: 0, scored_epoch: 0 })
                    .await
                    .map(drop),
            ),
        ),
    ]
}

#[tokio::test]
async fn strangers_are_refused_on_every_rpc_and_change_nothing() {
    let token = Token::generate();
    let servers =
        start_shards(1, |s| ServerConfig { token: Some(token.clone()), ..config(s, 1, 1, Mode::Sync) }).await;
    let addrs = addrs(&servers);

    // The job's worker declares the model and reads it.
    let mut config = WorkerConfig::new(addrs.clone(), 0);
    config.token = Some(token.clone());
    let mut worker = Worker::connect(config).await.unwrap();
    worker.declare(spec()).await.unwrap();
    let mut before = vec![Vec::new()];
    worker.pull_all_dense(&mut before).await.unwrap();
    let mut rows_before = Vec::new();
    worker.pull_sparse("emb", &[7], &mut rows_before).await.unwrap();

    let channel = Channel::from_shared(format!("http://{}", addrs[0])).unwrap().connect().await.unwrap();
    for (who, auth) in [("no token", None), ("a wrong token", Some(Token::generate()))] {
        let mut stranger =
            ParameterServerClient::with_interceptor(channel.clone(), ClientAuth::new(auth.as_ref()));
        let codes = every_rpc(&mut stranger).await;
        assert_eq!(codes.len(), 10, "every RPC of the service");
        for (rpc, code) in codes {
            assert_eq!(code, Code::Unauthenticated, "{rpc} with {who}");
        }
    }

    // Nothing changed: same values, and the worker is still step 0's only member.
    let mut after = vec![Vec::new()];
    worker.pull_all_dense(&mut after).await.unwrap();
    let mut rows_after = Vec::new();
    worker.pull_sparse("emb", &[7], &mut rows_after).await.unwrap();
    assert_eq!((before, rows_before.clone()), (after, rows_after));
    assert_eq!(worker.status().await.unwrap()[0].version, 0);

    // The job's worker trains as usual.
    worker.push_dense("w", &[1.0; 4]).unwrap();
    worker.push_sparse("emb", &[7], &[1.0, 1.0]).unwrap();
    worker.step().await.unwrap();
    let mut rows = Vec::new();
    worker.pull_sparse("emb", &[7], &mut rows).await.unwrap();
    assert!((rows[0] - (rows_before[0] - 0.5)).abs() < 1e-6, "{rows:?} vs {rows_before:?}");

    // A worker with the wrong token learns why at once.
    let mut config = WorkerConfig::new(addrs, 0);
    config.token = Some(Token::generate());
    config.startup_timeout = std::time::Duration::from_secs(5);
    let err = Worker::connect(config).await.err().expect("refused");
    assert!(err.to_string().contains("wrong job token"), "{err}");
}
