//! The server's settings, with their defaults.
//!
//! The settings a job file gives every shard (`[server]`, `[checkpoint]`, `restore`) are
//! gradflow-core's [`ServerSettings`], [`CheckpointConfig`] and [`Restore`], documented and
//! defaulted there once; [`ServerConfig::from_settings`] is the one place they become a
//! shard's settings.

use gradflow_core::Mode;
pub use gradflow_core::embedding::EmbeddingSettings;
pub use gradflow_core::settings::{CheckpointConfig, Restore, ServerSettings, SettingsError};
use gradflow_proto::TransportConfig;
use thiserror::Error;

/// Everything one parameter-server shard needs to know.
#[derive(Debug, Clone, PartialEq)]
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
    /// The job-wide server settings (a job file's `[server]`), documented and defaulted in
    /// [`ServerSettings`].
    pub settings: ServerSettings,
    /// Work on a request's tensors of at most this many bytes (checking and adding a push,
    /// reading a pull) runs on the async runtime's thread; larger work goes to the blocking
    /// pool. Handing work to the pool costs two thread wake-ups, more than small work takes.
    /// Default 1 MiB; 0 sends all of it to the pool.
    pub inline_bytes: u64,
    /// gRPC and tensor-link transport settings.
    pub transport: TransportConfig,
    /// Admission and eviction of sparse table rows (a job file's `[embedding]`). Default: every
    /// pushed id gets a row, kept for good.
    pub embedding: EmbeddingSettings,
    /// Where and when to write checkpoints. Default: none.
    pub checkpoint: Option<CheckpointConfig>,
    /// Start from a checkpoint instead of an empty model (see [`Restore`]). Needs
    /// `checkpoint` unless it is a URL.
    pub restore: Option<Restore>,
    /// The job's token: with one, every call without it is refused (UNAUTHENTICATED). Never
    /// read from or written to a file; the binary takes it from `GRADFLOW_TOKEN`. Default none.
    pub token: Option<gradflow_proto::auth::Token>,
    /// TLS: the server's certificate and key, and for mutual TLS the CAs that must have
    /// signed its clients' certificates (others are refused in the handshake). Comes from
    /// the job file's `[tls]` section. Default: plaintext.
    pub tls: Option<gradflow_proto::tls::ServerTls>,
    /// TLS of shard 0's calls to the other shards (time-based checkpoints): the client side
    /// of the job's `[tls]` section, what a worker uses. Default: from `GRADFLOW_TLS_CA` (and
    /// the variables beside it, see `gradflow_proto::tls`) when it is set, else plaintext.
    pub peer_tls: Option<gradflow_proto::tls::ClientTls>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig::from_settings(&ServerSettings::default())
    }
}

impl ServerConfig {
    /// A shard with the job-wide server settings `settings` (a job file's `[server]`) and
    /// defaults for the rest. The one place where those settings become a shard's.
    pub fn from_settings(settings: &ServerSettings) -> ServerConfig {
        ServerConfig {
            shard: 0,
            num_shards: 1,
            num_workers: 1,
            mode: Mode::Sync,
            max_staleness: None,
            settings: settings.clone(),
            inline_bytes: 1 << 20,
            transport: TransportConfig::default(),
            embedding: EmbeddingSettings::default(),
            checkpoint: None,
            restore: None,
            token: None,
            tls: None,
            peer_tls: None,
        }
    }

    /// The memory budget of the model, from [`ServerConfig::max_memory`]: `None` for no limit.
    pub fn memory_budget(&self) -> Option<u64> {
        match self.settings.max_memory {
            Some(0) => None,
            Some(n) => Some(n),
            None => machine_memory(),
        }
    }

    /// Checks the settings; the message names the field and what was expected.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.num_shards == 0 {
            return Err(ConfigError::NoShards);
        }
        if self.shard >= self.num_shards {
            return Err(ConfigError::Shard { shard: self.shard, num_shards: self.num_shards });
        }
        if self.num_workers == 0 {
            return Err(ConfigError::NoWorkers);
        }
        gradflow_core::settings::check_heartbeat_timeout(self.settings.heartbeat_timeout)?;
        gradflow_core::settings::check_backup_workers(
            self.settings.backup_workers,
            self.mode,
            self.num_workers,
        )?;
        if self.max_staleness.is_some() && self.mode == Mode::Sync {
            return Err(ConfigError::StalenessInSync);
        }
        if let Some(c) = &self.checkpoint {
            c.validate()?;
        }
        self.embedding.validate()?;
        if let Some(r) = &self.restore {
            r.check(self.checkpoint.as_ref())?;
        }
        self.transport.validate().map_err(ConfigError::Transport)
    }
}

/// A [`ServerConfig`] that cannot work; the message names the field.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ConfigError {
    #[error("num_shards is 0; expected at least 1")]
    NoShards,
    #[error("shard is {shard} but num_shards is {num_shards}; expected shard < num_shards")]
    Shard { shard: u32, num_shards: u32 },
    #[error("num_workers is 0; expected at least 1")]
    NoWorkers,
    #[error("max_staleness applies to async mode only; remove it or set mode = \"async\"")]
    StalenessInSync,
    /// A job-wide setting (see [`ServerSettings`], [`CheckpointConfig`], [`Restore`]).
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Transport(#[from] gradflow_proto::TransportError),
    #[error(transparent)]
    Embedding(#[from] gradflow_core::embedding::EmbeddingError),
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
