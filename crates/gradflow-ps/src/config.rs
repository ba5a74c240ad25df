//! The server's settings, with their defaults.

use std::time::Duration;

use gradflow_core::Mode;
use gradflow_proto::TransportConfig;
use serde::{Deserialize, Serialize};

/// Everything one parameter-server shard needs to know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// This shard's index, `0..num_shards`. Default 0.
    pub shard: u32,
    /// Number of shards in the job. Default 1.
    pub num_shards: u32,
    /// Number of workers in the job; worker indices are `0..num_workers`. Default 1.
    pub num_workers: u32,
    /// `sync` (default) or `async`.
    pub mode: Mode,
    /// Async only: a worker may be at most this many steps ahead of the slowest live worker.
    /// Default: no bound.
    pub max_staleness: Option<u64>,
    /// A worker not heard from for this long is dropped from the set a sync step waits for.
    /// Default 5s.
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    /// Time a worker that has never been heard from is waited for after the server starts.
    /// Default 120s (processes and pods take a while to start).
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// Longest a pull or push waits for the model to reach its step before failing with
    /// DEADLINE_EXCEEDED. Default 600s.
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// Refuse gradients that contain NaN or infinity, and stop the shard when an update would
    /// make a parameter or its optimizer state NaN or infinite. Default true.
    pub reject_non_finite: bool,
    /// Sync only: a step completes once all live workers but this many have pushed; later
    /// pushes for it are refused as stale. Default 0: every live worker is waited for.
    pub backup_workers: u32,
    /// Work on a request's tensors of at most this many bytes (checking and adding a push,
    /// reading a pull) runs on the async runtime's thread; larger work goes to the blocking
    /// pool. Handing work to the pool costs two thread wake-ups, more than small work takes.
    /// Default 1 MiB; 0 sends all of it to the pool.
    pub inline_bytes: u64,
    /// The most memory, in bytes, this shard's part of the model may need: its dense values,
    /// optimizer state and gradient sums, and one row of each sparse table, worked out from
    /// the spec when a worker declares it; a larger model is refused (RESOURCE_EXHAUSTED,
    /// naming the sizes) before anything is allocated. Default: the machine's memory (the
    /// smaller of its RAM and its cgroup's memory limit). 0: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<u64>,
    /// gRPC and tensor-link transport settings.
    pub transport: TransportConfig,
    /// The port of the tensor link (`transport.tensor_link`), on the gRPC address's
    /// interface. Default 0: any free port, which workers learn from the server's status.
    pub link_port: u16,
    /// Where and when to write checkpoints. Default: none.
    pub checkpoint: Option<CheckpointConfig>,
    /// Start from a checkpoint instead of an empty model: `"latest"`, a step number, or the
    /// URL of a checkpoint directory. Needs `checkpoint.url` unless a URL is given.
    pub restore: Option<String>,
    /// The job's token: with one, every call without it is refused (UNAUTHENTICATED). Never
    /// read from or written to a file; the binary takes it from `GRADFLOW_TOKEN`. Default none.
    #[serde(skip)]
    pub token: Option<gradflow_proto::auth::Token>,
    /// TLS: the server's certificate and key, and for mutual TLS the CAs that must have
    /// signed its clients' certificates (others are refused in the handshake). Comes from
    /// the job file's `[tls]` section (`JobConfig::server_config`). Default: plaintext.
    #[serde(skip)]
    pub tls: Option<gradflow_proto::tls::ServerTls>,
}

/// When and where a shard writes checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Object-store URL: a local folder (default `./checkpoints`), `s3://`, `gs://`, `az://`,
    /// or `memory://` (tests).
    pub url: String,
    /// A checkpoint every this many model versions (sync: steps). Default 1000.
    pub every_steps: Option<u64>,
    /// A checkpoint at the first step after this much time since the last one. Default: off.
    #[serde(with = "humantime_serde")]
    pub every: Option<Duration>,
    /// Complete checkpoints kept; older ones are deleted once a newer one is complete. Default 3.
    pub keep: usize,
    /// Write a last checkpoint when the server is stopped (SIGTERM), if the model changed
    /// since the previous one. Default true.
    pub on_shutdown: bool,
    /// How long shard 0 waits for the other shards' files before giving a checkpoint up.
    /// Default 300s.
    #[serde(with = "humantime_serde")]
    pub finalize_timeout: Duration,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            url: "./checkpoints".into(),
            every_steps: Some(1000),
            every: None,
            keep: 3,
            on_shutdown: true,
            finalize_timeout: Duration::from_secs(300),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            shard: 0,
            num_shards: 1,
            num_workers: 1,
            mode: Mode::Sync,
            max_staleness: None,
            heartbeat_timeout: Duration::from_secs(5),
            startup_timeout: Duration::from_secs(120),
            wait_timeout: Duration::from_secs(600),
            reject_non_finite: true,
            transport: TransportConfig::default(),
            checkpoint: None,
            restore: None,
            token: None,
            tls: None,
            backup_workers: 0,
            inline_bytes: 1 << 20,
            link_port: 0,
            max_memory: None,
        }
    }
}

impl ServerConfig {
    /// The memory budget of the model, from [`ServerConfig::max_memory`]: `None` for no limit.
    pub fn memory_budget(&self) -> Option<u64> {
        match self.max_memory {
            Some(0) => None,
            Some(n) => Some(n),
            None => machine_memory(),
        }
    }

    /// Checks the settings; the message names the field and what was expected.
    pub fn validate(&self) -> Result<(), String> {
        if self.num_shards == 0 {
            return Err("num_shards is 0; expected at least 1".into());
        }
        if self.shard >= self.num_shards {
            return Err(format!(
                "shard is {} but num_shards is {}; expected shard < num_shards",
                self.shard, self.num_shards
            ));
        }
        if self.num_workers == 0 {
            return Err("num_workers is 0; expected at least 1".into());
        }
        if self.heartbeat_timeout < Duration::from_millis(50) {
            return Err(format!("heartbeat_timeout is {:?}; expected at least 50ms", self.heartbeat_timeout));
        }
        if self.backup_workers > 0 && self.mode == Mode::Async {
            return Err("backup_workers applies to sync mode only; async steps never wait".into());
        }
        if self.backup_workers >= self.num_workers {
            return Err(format!(
                "backup_workers is {} but the job has {} workers; expected fewer backups than workers",
                self.backup_workers, self.num_workers
            ));
        }
        if self.max_staleness.is_some() && self.mode == Mode::Sync {
            return Err("max_staleness applies to async mode only; remove it or set mode = \"async\"".into());
        }
        if let Some(c) = &self.checkpoint {
            if c.every_steps == Some(0) {
                return Err("checkpoint.every_steps is 0; expected at least 1 (or leave it out)".into());
            }
            if c.keep == 0 {
                return Err("checkpoint.keep is 0; expected at least 1".into());
            }
        }
        if let Some(r) = &self.restore {
            if self.checkpoint.is_none() && !r.contains("://") {
                return Err(format!("restore = \"{r}\" needs checkpoint.url to say where checkpoints are"));
            }
        }
        self.transport.validate()
    }
}

/// This machine's memory in bytes: the smaller of the RAM (`MemTotal` in `/proc/meminfo`) and
/// the cgroup's memory limit, where they can be read (Linux); `None` elsewhere.
pub fn machine_memory() -> Option<u64> {
    let ram = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kib.checked_mul(1024)
    });
    let cgroup = ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok());
    match (ram, cgroup) {
        (Some(r), Some(c)) => Some(r.min(c)),
        (r, c) => r.or(c),
    }
}
