//! Starting real parameter-server shards on loopback port 0 for the tests.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use gradflow_core::Mode;
use gradflow_ps::{RunningServer, ServerConfig, ServerSettings};

pub fn config(shard: u32, num_shards: u32, num_workers: u32, mode: Mode) -> ServerConfig {
    ServerConfig {
        shard,
        num_shards,
        num_workers,
        mode,
        settings: ServerSettings {
            heartbeat_timeout: Duration::from_secs(2),
            startup_timeout: Duration::from_secs(60),
            wait_timeout: Duration::from_secs(60),
            ..ServerSettings::default()
        },
        ..ServerConfig::default()
    }
}

/// Starts `num_shards` shards with settings from `make(shard)`.
pub async fn start_shards(num_shards: u32, make: impl Fn(u32) -> ServerConfig) -> Vec<RunningServer> {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut out = Vec::new();
    for s in 0..num_shards {
        out.push(gradflow_ps::start(make(s), any, Some(any)).await.expect("server starts"));
    }
    out
}

/// Starts `num_shards` sync shards for one worker; `link`: whether they offer the tensor link
/// (without it every push and pull goes over gRPC).
pub async fn one_worker_sync_shards(num_shards: u32, link: bool) -> Vec<RunningServer> {
    start_shards(num_shards, |s| {
        let mut c = config(s, num_shards, 1, Mode::Sync);
        c.transport.tensor_link = link;
        c
    })
    .await
}

pub fn addrs(servers: &[RunningServer]) -> Vec<String> {
    servers.iter().map(|s| s.addr().to_string()).collect()
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("warn").try_init();
}

/// A plain HTTP/1.1 GET, enough to scrape `/metrics`.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// A dense tensor `w` (4 values, 1.0) and a sparse table `emb` (dim 2, 0.0), both SGD 0.5: the
/// model of the tensor-link tests.
pub fn link_spec() -> gradflow_core::ModelSpec {
    use gradflow_core::{DenseSpec, Initializer, ModelSpec, OptimizerConfig, SparseSpec};
    ModelSpec {
        dense: vec![DenseSpec {
            name: "w".into(),
            shape: vec![4],
            init: Initializer::Constant { value: 1.0 },
            optimizer: OptimizerConfig::sgd(0.5),
        }],
        sparse: vec![SparseSpec {
            name: "emb".into(),
            dim: 2,
            init: Initializer::Constant { value: 0.0 },
            optimizer: OptimizerConfig::sgd(0.5),
        }],
    }
}
