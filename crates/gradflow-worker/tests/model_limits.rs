//! Models too large to count or to hold, declared to a real server on loopback port 0: each is
//! refused at declare, by name and size, before the server allocates anything, and the
//! server stays usable.

mod common;

use common::{addrs, config, start_shards};
use gradflow_core::{DenseSpec, Initializer, Mode, ModelSpec, OptimizerConfig, SparseSpec};
use gradflow_proto::{ParameterServerClient, pb};
use gradflow_worker::{Code, Worker, WorkerConfig, WorkerError};

fn dense(shape: Vec<u64>, optimizer: OptimizerConfig) -> ModelSpec {
    ModelSpec {
        dense: vec![DenseSpec { name: "w".into(), shape, init: Initializer::Zeros, optimizer }],
        sparse: vec![],
    }
}

fn refusal(e: WorkerError) -> (Code, String) {
    match e {
        WorkerError::Server { status, .. } => (status.code(), status.message().to_string()),
        other => panic!("expected a server refusal, got {other}"),
    }
}

/// This process's resident memory in bytes (the server runs in it).
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
}

async fn declare(servers: &[gradflow_ps::RunningServer], spec: ModelSpec) -> Result<(), WorkerError> {
    declare_in_pieces(servers, spec, gradflow_core::DEFAULT_PARTITION_BYTES).await
}

async fn declare_in_pieces(
    servers: &[gradflow_ps::RunningServer],
    spec: ModelSpec,
    partition_bytes: u64,
) -> Result<(), WorkerError> {
    let mut config = WorkerConfig::new(addrs(servers), 0);
    config.partition_bytes = partition_bytes;
    let mut worker = Worker::connect(config).await.unwrap();
    worker.declare(spec).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_too_large_for_the_machine_are_refused_at_declare_naming_the_sizes() {
    // The default budget: this machine's memory.
    let servers = start_shards(1, |s| config(s, 1, 1, Mode::Sync)).await;
    let before = rss();

    // 10^12 elements: 4 TB of values alone.
    let (code, message) = refusal(
        declare(&servers, dense(vec![1_000_000_000_000], OptimizerConfig::sgd(0.1))).await.unwrap_err(),
    );
    assert_eq!(code, Code::ResourceExhausted, "{message}");
    assert!(message.contains("`w` [1000000000000] (1000000000000 elements)"), "{message}");
    assert!(message.contains("8000000000000 bytes") && message.contains("server.max_memory"), "{message}");

    // 2^32 x 2^32 overflows a u64 (it used to wrap to 0 elements in release builds): the
    // worker library refuses it, and so does the server when a client sends it anyway.
    let overflow = dense(vec![4_294_967_296, 4_294_967_296], OptimizerConfig::sgd(0.1));
    match declare(&servers, overflow.clone()).await.unwrap_err() {
        WorkerError::InvalidSpec(m) => assert!(m.contains("`w`") && m.contains("more than 2^64"), "{m}"),
        other => panic!("expected an invalid spec, got {other}"),
    }
    let mut client = ParameterServerClient::connect(format!("http://{}", servers[0].addr())).await.unwrap();
    let request = pb::DeclareSpecRequest {
        worker: 0,
        spec_json: serde_json::to_string(&overflow).unwrap(),
        partition_bytes: 4 << 20,
        num_shards: 1,
        shard: 0,
        servers: vec![],
    };
    let status = client.declare_spec(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("`w`") && status.message().contains("more than 2^64"), "{status:?}");

    // The first weight matrix of wide & deep with `hidden = [4000000000]` (26 fields of dim 8
    // and 13 dense features make 221 inputs); tests/model_limits.rs of gradflow-cli launches
    // that job itself.
    let (code, message) = refusal(
        declare(&servers, dense(vec![221, 4_000_000_000], OptimizerConfig::adagrad(0.1))).await.unwrap_err(),
    );
    assert_eq!(code, Code::ResourceExhausted, "{message}");
    assert!(message.contains("`w` [221, 4000000000] (884000000000 elements)"), "{message}");

    // The embedding table of wide & deep with `embedding_dim = 100000000`: one row is 400 MB,
    // more than any pull could carry.
    let table = SparseSpec {
        name: "embedding".into(),
        dim: 100_000_000,
        init: Initializer::Zeros,
        optimizer: OptimizerConfig::adagrad(0.1),
    };
    let (code, message) =
        refusal(declare(&servers, ModelSpec { dense: vec![], sparse: vec![table] }).await.unwrap_err());
    assert_eq!(code, Code::ResourceExhausted, "{message}");
    assert!(message.contains("`embedding` (dim 100000000) is 400000000 bytes"), "{message}");

    // Nothing of those was allocated, and the server takes a model that fits.
    let grown = rss().saturating_sub(before);
    assert!(grown < 128 << 20, "the server grew by {} MiB refusing models", grown >> 20);
    let small = ModelSpec {
        dense: vec![DenseSpec {
            name: "w".into(),
            shape: vec![4],
            init: Initializer::Zeros,
            optimizer: OptimizerConfig::sgd(0.1),
        }],
        sparse: vec![SparseSpec {
            name: "emb".into(),
            dim: 8,
            init: Initializer::Zeros,
            optimizer: OptimizerConfig::sgd(0.1),
        }],
    };
    declare(&servers, small).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_memory_bounds_what_a_shard_holds_and_zero_turns_it_off() {
    // 1M elements with Adam (2 slots) and a gradient sum: 16 bytes each, 16 MB in all.
    let spec = || dense(vec![1_000_000], OptimizerConfig::adam(0.1));
    let servers = start_shards(1, |s| {
        let mut c = config(s, 1, 1, Mode::Sync);
        c.settings.max_memory = Some(8 << 20);
        c
    })
    .await;
    let (code, message) = refusal(declare(&servers, spec()).await.unwrap_err());
    assert_eq!(code, Code::ResourceExhausted, "{message}");
    assert!(
        message.contains("16000000 bytes") && message.contains("server.max_memory (8388608 bytes)"),
        "{message}"
    );

    // Cut in pieces of 1 MiB over 4 shards, each shard holds a quarter and fits.
    let servers = start_shards(4, |s| {
        let mut c = config(s, 4, 1, Mode::Sync);
        c.settings.max_memory = Some(8 << 20);
        c
    })
    .await;
    declare_in_pieces(&servers, spec(), 1 << 20).await.unwrap();

    let servers = start_shards(1, |s| {
        let mut c = config(s, 1, 1, Mode::Sync);
        c.settings.max_memory = Some(0);
        c
    })
    .await;
    declare(&servers, spec()).await.unwrap();
}
