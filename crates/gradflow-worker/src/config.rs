//! The worker's settings, with their defaults.

use std::time::Duration;

use gradflow_core::DEFAULT_PARTITION_BYTES;
use gradflow_proto::TransportConfig;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// How a worker finds and talks to the parameter servers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Server addresses (`host:port`), in shard order: shard `i` listens at `servers[i]`.
    pub servers: Vec<String>,
    /// This worker's index, `0..num_workers`.
    pub worker: u32,
    /// Largest dense piece in bytes; tensors larger than this are split across shards.
    /// Must agree across the job. Default 4 MiB.
    pub partition_bytes: u64,
    /// Interval between heartbeats. Keep it well under the servers' heartbeat_timeout.
    /// Default 1s.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How long `connect` waits for every server to answer (they may still be starting).
    /// Default 120s.
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// gRPC transport settings.
    pub transport: TransportConfig,
    /// The job's token, sent with every call. Never read from or written to a file. Default:
    /// `GRADFLOW_TOKEN` from the environment when it is set (what a launcher hands its
    /// processes), else none.
    #[serde(skip)]
    pub token: Option<gradflow_proto::auth::Token>,
    /// TLS: the CAs the servers' certificates must be signed by, and for mutual TLS the
    /// certificate this worker presents. Default: from `GRADFLOW_TLS_CA` (and the variables
    /// beside it, see `gradflow_proto::tls`) when it is set, else plaintext.
    #[serde(skip)]
    pub tls: Option<gradflow_proto::tls::ClientTls>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            servers: Vec::new(),
            worker: 0,
            partition_bytes: DEFAULT_PARTITION_BYTES,
            heartbeat_interval: Duration::from_secs(1),
            startup_timeout: Duration::from_secs(120),
            transport: TransportConfig::default(),
            token: None,
            tls: None,
        }
    }
}

impl WorkerConfig {
    /// A configuration with defaults for `servers` and worker index `worker`.
    pub fn new(servers: impl IntoIterator<Item = impl Into<String>>, worker: u32) -> WorkerConfig {
        WorkerConfig { servers: servers.into_iter().map(Into::into).collect(), worker, ..Default::default() }
    }

    /// A configuration for an observer: a client that reads the model (to evaluate or inspect
    /// it) without being counted as a worker.
    pub fn observer(servers: impl IntoIterator<Item = impl Into<String>>) -> WorkerConfig {
        WorkerConfig::new(servers, gradflow_proto::OBSERVER)
    }

    /// Checks the settings before any connection is made.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.servers.is_empty() {
            return Err(ConfigError::NoServers);
        }
        if self.partition_bytes < 1024 {
            return Err(ConfigError::PartitionBytes(self.partition_bytes));
        }
        self.transport.validate().map_err(ConfigError::Transport)
    }
}

/// Why a worker's settings cannot work, found before or while connecting.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("servers is empty; expected at least one parameter server address")]
    NoServers,
    #[error("partition_bytes is {0}; expected at least 1024")]
    PartitionBytes(u64),
    /// `transport` settings that do not work together (the message names the key).
    #[error(transparent)]
    Transport(#[from] gradflow_proto::TransportError),
    /// The job token in the environment is not a token.
    #[error(transparent)]
    Token(#[from] gradflow_proto::auth::TokenSourceError),
    /// The TLS settings: a missing or unreadable file, a bad PEM, a bad environment variable.
    #[error(transparent)]
    Tls(#[from] gradflow_proto::tls::TlsError),
    /// TLS settings that load but that the connection cannot use.
    #[error("{0}")]
    TlsConfig(String),
    /// A server address that is not `host:port`, or whose scheme disagrees with the TLS
    /// settings.
    #[error(transparent)]
    Address(#[from] gradflow_proto::tls::AddressError),
    /// A server address that is not a valid URI.
    #[error("server address `{addr}` is not valid: {reason}")]
    BadAddress { addr: String, reason: String },
    #[error(
        "server {addr} is shard {shard} of {num_shards}, but it is listed at position {position} of {listed}: list servers in shard order"
    )]
    ShardOrder { addr: String, shard: u32, num_shards: u32, position: usize, listed: u32 },
    #[error("worker index {worker} is out of range: the servers expect {num_workers} workers")]
    WorkerOutOfRange { worker: u32, num_workers: u32 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_typed_and_named() {
        assert!(matches!(WorkerConfig::default().validate(), Err(ConfigError::NoServers)));
        let c = WorkerConfig { partition_bytes: 10, ..WorkerConfig::new(["a:1"], 0) };
        assert!(matches!(c.validate(), Err(ConfigError::PartitionBytes(10))));
        let mut c = WorkerConfig::new(["a:1"], 0);
        c.transport.chunk_bytes = 100;
        let e = c.validate().unwrap_err();
        assert!(matches!(&e, ConfigError::Transport(_)) && e.to_string().contains("chunk_bytes"), "{e}");
        assert!(WorkerConfig::new(["a:1"], 0).validate().is_ok());
    }
}
