//! gradflow's wire protocol.
//!
//! - [`pb`]: the messages, the `ParameterServer` service and `gradflow serve`'s `Predictor`
//!   service generated from
//!   `proto/gradflow.proto` by tonic/prost (bytes fields are `bytes::Bytes`, so payloads are
//!   not copied when a message is decoded).
//! - [`codec`]: turning `f32` and `u64` slices into little-endian bytes and back, and values
//!   into the compact f16 and bf16 wire encodings.
//! - [`transport`]: message limits, HTTP/2 windows, keepalive and retry settings.
//! - [`link`]: the framing of the tensor link, the raw-TCP path for pushes and pulls.
//! - [`auth`]: the job token every call carries and every server checks.
//! - [`tls`]: TLS and mutual TLS from the job file's `[tls]` section, shared by servers and clients.
//! - [`refusal`]: what a refusal carries beside its gRPC code (the metadata keys and the typed
//!   [`refusal::RefusalCode`]), set by servers and read by clients.

#![forbid(unsafe_code)]

pub mod auth;
pub mod codec;
pub mod link;
pub mod metrics_http;
pub mod refusal;
pub mod tls;
pub mod transport;

pub use transport::{Compression, TransportConfig, TransportError};

/// Generated protobuf messages and gRPC stubs.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("gradflow.v1");
}

/// The worker index of an observer: a client that reads the model (to evaluate or inspect
/// it) without taking part in training. Servers do not track it, wait for it, or take its
/// pushes.
pub const OBSERVER: u32 = u32::MAX;

pub use pb::parameter_server_client::ParameterServerClient;
pub use pb::parameter_server_server::{ParameterServer, ParameterServerServer};
