//! Calls from shard 0 to the other shards: asking each for a checkpoint of the step shard 0
//! chose (time-based checkpoints, see `checkpointing`). Addresses come from the workers'
//! declare; TLS settings from the shard's config (`ServerConfig::peer_tls`), else from the
//! same environment a worker reads.

use gradflow_proto::auth::{ClientAuth, Token};
use gradflow_proto::tls::{self, ClientTls};
use gradflow_proto::{ParameterServerClient, pb};
use tonic::Code;

use crate::checkpointing::AskError;
use crate::error::VERSION_METADATA;

/// Asks the shard at `addr` for a checkpoint of `step` and waits until its files are written.
pub async fn ask_checkpoint(
    addr: String,
    token: Option<Token>,
    client_tls: Option<ClientTls>,
    step: u64,
) -> Result<(), AskError> {
    let client_tls = match client_tls {
        Some(tls) => Some(tls),
        None => ClientTls::from_env().map_err(|e| AskError::Failed(e.to_string()))?,
    };
    let url = tls::url(&addr, client_tls.is_some()).map_err(|e| AskError::Failed(e.to_string()))?;
    let mut endpoint = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| AskError::Failed(format!("{addr}: {e}")))?
        .connect_timeout(std::time::Duration::from_secs(10));
    if let Some(t) = &client_tls {
        let config = t.load().map_err(|e| AskError::Failed(e.to_string()))?;
        endpoint = endpoint.tls_config(config).map_err(|e| AskError::Failed(e.to_string()))?;
    }
    let channel = endpoint.connect().await.map_err(|e| AskError::Failed(format!("{addr}: {e}")))?;
    let mut client = ParameterServerClient::with_interceptor(channel, ClientAuth::new(token.as_ref()));
    match client.checkpoint(pb::CheckpointRequest { step }).await {
        Ok(_) => Ok(()),
        Err(status) if status.code() == Code::Aborted => {
            let current = status
                .metadata()
                .get(VERSION_METADATA)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(step + 1);
            Err(AskError::Passed(current))
        }
        Err(status) if status.code() == Code::Unavailable => Err(AskError::Stopping),
        Err(status) => Err(AskError::Failed(format!("{addr}: {}", status.message()))),
    }
}
