//! TLS and mutual TLS between real shards and workers, with certificates made in the test:
//! the job's workers train; a client that does not trust the servers, speaks plaintext to a
//! TLS server, or (mutual TLS) has no certificate from the client CA is refused in the
//! handshake and changes nothing; a wrong token is refused over TLS as without it. A worker
//! that cannot connect for a TLS reason says so at once instead of retrying.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use gradflow_core::{DenseSpec, Initializer, Mode, ModelSpec, OptimizerConfig, SparseSpec};
use gradflow_proto::auth::{ClientAuth, Token};
use gradflow_proto::tls::test_certs::{TestCa, loopback_config};
use gradflow_proto::tls::{ClientTls, TlsConfig};
use gradflow_proto::{ParameterServerClient, codec, pb};
use gradflow_ps::{RunningServer, ServerConfig};
use gradflow_worker::{Worker, WorkerConfig};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

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

async fn start(tls: &TlsConfig, token: Option<Token>) -> RunningServer {
    let mut servers = start_shards(1, |s| ServerConfig {
        tls: Some(tls.server()),
        token: token.clone(),
        ..config(s, 1, 1, Mode::Sync)
    })
    .await;
    servers.pop().unwrap()
}

/// A raw gRPC client of `addr`: over TLS with `tls`, else plaintext.
fn client(addr: &str, tls: Option<&ClientTls>, token: Option<&Token>) -> Client {
    let endpoint = match tls {
        Some(t) => Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(t.load().expect("the client's TLS files load"))
            .unwrap(),
        None => Endpoint::from_shared(format!("http://{addr}")).unwrap(),
    };
    let channel = endpoint.connect_timeout(Duration::from_secs(5)).connect_lazy();
    ParameterServerClient::with_interceptor(channel, ClientAuth::new(token))
}

/// Calls every RPC that reads or changes the model; returns each one's status code.
async fn every_rpc(c: &mut Client) -> Vec<(&'static str, Code)> {
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
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
        ..Default::default()
    };
    let declare = pb::DeclareSpecRequest {
        worker: 0,
        spec_json: serde_json::to_string(&spec()).unwrap(),
        partition_bytes: gradflow_core::DEFAULT_PARTITION_BYTES,
        ..Default::default()
    };
    let ids = pb::SparseIds { table: "emb".into(), ids: codec::u64s_to_bytes(&[7]) };
    vec![
        ("DeclareSpec", code(c.declare_spec(declare).await.map(drop))),
        (
            "Heartbeat",
            code(
                c.heartbeat(pb::HeartbeatRequest { worker: 0, step: 0, ..Default::default() })
                    .await
                    .map(drop),
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
        ("Leave", code(c.leave(pb::LeaveRequest { worker: 0, ..Default::default() }).await.map(drop))),
        ("Status", code(c.status(pb::StatusRequest {}).await.map(drop))),
        (
            "Checkpoint",
            code(c.checkpoint(pb::CheckpointRequest { step: 1, ..Default::default() }).await.map(drop)),
        ),
    ]
}

/// Asserts that `who` got no call through.
async fn refused(who: &str, mut c: Client) {
    for (rpc, code) in every_rpc(&mut c).await {
        assert!(
            matches!(code, Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled),
            "{rpc} from {who}: {code:?}, expected a refused connection"
        );
    }
}

fn worker_config(addr: &str, tls: Option<ClientTls>, token: Option<&Token>) -> WorkerConfig {
    let mut config = WorkerConfig::new([addr], 0);
    config.tls = tls;
    config.token = token.cloned();
    config
}

/// The model as the job's worker sees it: dense values, one sparse row, the step.
async fn snapshot(worker: &Worker) -> (Vec<Vec<f32>>, Vec<f32>, u64) {
    let mut dense = vec![Vec::new()];
    worker.pull_all_dense(&mut dense).await.unwrap();
    let mut rows = Vec::new();
    worker.pull_sparse("emb", &[7], &mut rows).await.unwrap();
    (dense, rows, worker.status().await.unwrap()[0].version)
}

/// `Worker::connect` fails, at once, with a message that contains `hint`.
async fn connect_fails(config: WorkerConfig, hint: &str) {
    let mut config = config;
    // Long, so that only a failure recognized as TLS ends quickly.
    config.startup_timeout = Duration::from_secs(60);
    let started = Instant::now();
    let err = Worker::connect(config).await.err().expect("the connection is refused");
    assert!(err.to_string().contains(hint), "expected `{hint}` in: {err}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}: retried instead of failing",
        started.elapsed()
    );
}

/// Pushes one gradient of ones and checks the SGD update (lr 0.5) landed.
async fn train_one_step(worker: &mut Worker) {
    let (dense, rows, step) = snapshot(worker).await;
    worker.push_dense("w", &[1.0; 4]).unwrap();
    worker.push_sparse("emb", &[7], &[1.0, 1.0]).unwrap();
    worker.step().await.unwrap();
    let (dense2, rows2, step2) = snapshot(worker).await;
    assert_eq!(step2, step + 1);
    for (a, b) in dense[0].iter().zip(&dense2[0]).chain(rows.iter().zip(&rows2)) {
        assert!((b - (a - 0.5)).abs() < 1e-6, "{a} -> {b}");
    }
}

#[tokio::test]
async fn tls_workers_train_and_strangers_are_refused_and_change_nothing() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let tls = loopback_config(dir.path(), false);
    let server = start(&tls, None).await;
    let addr = server.addr().to_string();

    // The job's worker: trusts the servers' CA.
    let mut worker = Worker::connect(worker_config(&addr, Some(tls.client()), None)).await.unwrap();
    worker.declare(spec()).await.unwrap();
    let before = snapshot(&worker).await;

    // A client that trusts another CA, and one that speaks plaintext.
    let other = other_ca(dir.path());
    refused("a client trusting another CA", client(&addr, Some(&ClientTls::new(&other.cert)), None)).await;
    refused("a plaintext client", client(&addr, None, None)).await;
    assert_eq!(snapshot(&worker).await, before, "a refused client changed the model");

    // Workers that cannot connect say why, at once.
    connect_fails(worker_config(&addr, Some(ClientTls::new(&other.cert)), None), "not trusted").await;
    connect_fails(worker_config(&addr, None, None), "expect TLS").await;
    // The certificate names 127.0.0.1 and localhost, nothing else.
    connect_fails(
        worker_config(&addr, Some(tls.client().with_domain("ps.example.com")), None),
        "not trusted",
    )
    .await;

    // A TLS worker against a plaintext server.
    let plain = start_shards(1, |s| config(s, 1, 1, Mode::Sync)).await;
    connect_fails(
        worker_config(&plain[0].addr().to_string(), Some(tls.client()), None),
        "does not speak TLS",
    )
    .await;

    // The job's worker trains as usual, and so does a second client with the same CA.
    train_one_step(&mut worker).await;
    let mut observer = client(&addr, Some(&tls.client()), None);
    assert_eq!(observer.status(pb::StatusRequest {}).await.unwrap().into_inner().version, 1);
    worker.leave().await.unwrap();
}

fn other_ca(dir: &Path) -> TestCa {
    let sub = dir.join("other");
    std::fs::create_dir_all(&sub).unwrap();
    TestCa::new(&sub, "other-ca")
}

#[tokio::test]
async fn mutual_tls_takes_only_clients_with_a_certificate_from_the_client_ca() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let tls = loopback_config(dir.path(), true);
    assert!(tls.server().mutual());
    let server = start(&tls, None).await;
    let addr = server.addr().to_string();

    let mut worker = Worker::connect(worker_config(&addr, Some(tls.client()), None)).await.unwrap();
    worker.declare(spec()).await.unwrap();
    let before = snapshot(&worker).await;

    // Trusts the server, but presents no certificate.
    let anonymous = ClientTls::new(&tls.ca);
    refused("a client without a certificate", client(&addr, Some(&anonymous), None)).await;
    // Presents a certificate another CA signed.
    let other = other_ca(dir.path());
    let stranger = other.client(&dir.path().join("other"), "stranger");
    let impostor = ClientTls::new(&tls.ca).with_identity(&stranger.cert, &stranger.key);
    refused("a client with another CA's certificate", client(&addr, Some(&impostor), None)).await;
    assert_eq!(snapshot(&worker).await, before, "a refused client changed the model");

    connect_fails(worker_config(&addr, Some(anonymous), None), "refused this client").await;
    connect_fails(worker_config(&addr, Some(impostor), None), "refused this client").await;

    // A second client with a certificate from the client CA is taken.
    let mut observer = client(&addr, Some(&tls.client()), None);
    assert_eq!(observer.status(pb::StatusRequest {}).await.unwrap().into_inner().version, 0);
    train_one_step(&mut worker).await;
    worker.leave().await.unwrap();
}

#[tokio::test]
async fn over_tls_a_wrong_token_is_still_unauthenticated() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let tls = loopback_config(dir.path(), true);
    let token = Token::generate();
    let server = start(&tls, Some(token.clone())).await;
    let addr = server.addr().to_string();

    let mut worker = Worker::connect(worker_config(&addr, Some(tls.client()), Some(&token))).await.unwrap();
    worker.declare(spec()).await.unwrap();
    let before = snapshot(&worker).await;

    // The right certificate gets through the handshake; the token decides.
    for (who, wrong) in [("no token", None), ("a wrong token", Some(Token::generate()))] {
        let mut c = client(&addr, Some(&tls.client()), wrong.as_ref());
        for (rpc, code) in every_rpc(&mut c).await {
            assert_eq!(code, Code::Unauthenticated, "{rpc} with the right certificate and {who}");
        }
    }
    assert_eq!(snapshot(&worker).await, before, "a refused call changed the model");
    connect_fails(worker_config(&addr, Some(tls.client()), Some(&Token::generate())), "wrong job token")
        .await;

    train_one_step(&mut worker).await;
    worker.leave().await.unwrap();
}
