//! Transport settings shared by servers and workers: message limits, HTTP/2 flow control,
//! keepalive, chunking and retries. Defaults suit a data-center network and models of
//! hundreds of MiB.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How gradflow processes talk gRPC. Every field has a default; a job file overrides any.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportConfig {
    /// Largest gRPC message a process accepts or sends, in bytes. Default 256 MiB.
    pub max_message_bytes: usize,
    /// Dense tensors are streamed in chunks of this many bytes. Default 4 MiB.
    pub chunk_bytes: usize,
    /// HTTP/2 per-stream flow-control window, in bytes. Default 32 MiB.
    pub stream_window_bytes: u32,
    /// HTTP/2 per-connection flow-control window, in bytes. Default 64 MiB.
    pub connection_window_bytes: u32,
    /// Interval of HTTP/2 keepalive pings. Default 30s.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// A connection whose keepalive ping gets no answer within this time is closed. Default 20s.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Time allowed to open a connection. Default 5s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Transient failures (unavailable, connection reset) are retried this many times. Default 8.
    pub max_retries: u32,
    /// Bound of the first retry's delay; the bound doubles with each retry up to
    /// `max_backoff`, and each delay is drawn at random below its bound (full jitter), so
    /// that workers refused together do not come back together. Default 50ms.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Longest retry delay. Default 2s.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Send pushes and pulls over the tensor link, a plain TCP connection beside gRPC
    /// that moves tensor bytes without HTTP/2 framing or protobuf copies (see
    /// `gradflow_proto::link`). A server offers it unless this is false or it speaks TLS; a
    /// worker uses it where offered unless this is false. Default true.
    pub tensor_link: bool,
    /// How workers send gradients and ask for values on the wire: `"none"` (f32), `"f16"` or
    /// `"bf16"` (half the bytes; servers widen to f32 on arrival and keep computing in f32).
    /// Default `"none"`.
    pub compression: Compression,
}

/// `[transport] compression`: the encoding of values on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// f32, 4 bytes per value.
    #[default]
    None,
    /// IEEE 754 half precision, 2 bytes per value: 11 significant bits, finite values up to
    /// 65504 (larger ones are sent as 65504).
    F16,
    /// bfloat16, 2 bytes per value: 8 significant bits, f32's range.
    Bf16,
}

impl Compression {
    /// The name as the job file writes it.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::F16 => "f16",
            Compression::Bf16 => "bf16",
        }
    }

    /// The wire encoding of values under this setting.
    pub fn encoding(self) -> crate::pb::ValueEncoding {
        match self {
            Compression::None => crate::pb::ValueEncoding::F32,
            Compression::F16 => crate::pb::ValueEncoding::F16,
            Compression::Bf16 => crate::pb::ValueEncoding::Bf16,
        }
    }
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            max_message_bytes: 256 << 20,
            chunk_bytes: 4 << 20,
            stream_window_bytes: 32 << 20,
            connection_window_bytes: 64 << 20,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(5),
            max_retries: 8,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            tensor_link: true,
            compression: Compression::None,
        }
    }
}

impl TransportConfig {
    /// The bound of the delay before retry number `attempt` (0-based): `initial_backoff`
    /// doubled `attempt` times, at most `max_backoff`. A worker waits a random time below it
    /// (see `gradflow_worker`'s `retry` module).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX);
        self.initial_backoff.saturating_mul(factor).min(self.max_backoff)
    }

    /// Checks that the settings can work together.
    pub fn validate(&self) -> Result<(), TransportError> {
        if self.chunk_bytes < 1024 || self.chunk_bytes % 8 != 0 {
            return Err(TransportError::ChunkBytes { chunk_bytes: self.chunk_bytes });
        }
        if self.max_message_bytes < self.chunk_bytes + 4096 {
            return Err(TransportError::MaxMessageBytes {
                max_message_bytes: self.max_message_bytes,
                chunk_bytes: self.chunk_bytes,
            });
        }
        Ok(())
    }
}

/// Transport settings that cannot work together; the message names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("transport.chunk_bytes is {chunk_bytes}; expected a multiple of 8 of at least 1024")]
    ChunkBytes { chunk_bytes: usize },
    #[error(
        "transport.max_message_bytes ({max_message_bytes}) must exceed transport.chunk_bytes ({chunk_bytes}) by at least 4096"
    )]
    MaxMessageBytes { max_message_bytes: usize, chunk_bytes: usize },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let t = TransportConfig::default();
        assert_eq!(t.backoff(0), Duration::from_millis(50));
        assert_eq!(t.backoff(1), Duration::from_millis(100));
        assert_eq!(t.backoff(30), Duration::from_secs(2));
    }

    #[test]
    fn defaults_validate_and_bad_chunk_is_named() {
        assert!(TransportConfig::default().validate().is_ok());
        let t = TransportConfig { chunk_bytes: 100, ..Default::default() };
        assert!(t.validate().unwrap_err().to_string().contains("chunk_bytes"));
    }
}
