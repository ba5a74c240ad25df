//! Starting and stopping a shard: the gRPC server, the metrics endpoint, and the background
//! task that drops silent workers.
//!
//! Beside gRPC, a shard listens for the tensor link (`link.rs`) unless it speaks TLS or
//! `transport.tensor_link` is off; its port is in the shard's status.
//!
//! The gRPC server speaks TLS when the config has `tls` (mutual TLS with a client CA) and
//! checks the job token on every call either way. The `/metrics` endpoint is plain HTTP on
//! an address of its own, so it can be bound to another interface than the gRPC port (a
//! scrape network) or left off; it only reads counters.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gradflow_proto::ParameterServerServer;
use gradflow_proto::auth::ServerAuth;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tracing::{error, info, warn};

use crate::checkpointing::{Checkpointer, SHUTDOWN_WAIT};
use crate::service::Service;
use crate::shard::Shard;
use crate::{PsError, ServerConfig};

/// A shard that is serving. Dropping it does not stop it; call [`RunningServer::shutdown`].
pub struct RunningServer {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    shard: Arc<Shard>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), PsError>>,
}

impl RunningServer {
    /// The address the gRPC server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address of the `/metrics` endpoint, if one was asked for.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The shard's state (for tests and embedding).
    pub fn shard(&self) -> &Arc<Shard> {
        &self.shard
    }

    /// Stops accepting requests, lets running ones finish, and waits for the server to end.
    pub async fn shutdown(self) -> Result<(), PsError> {
        let _ = self.stop.send(true);
        self.wait().await
    }

    /// Waits until the server ends (after a shutdown).
    pub async fn wait(self) -> Result<(), PsError> {
        self.task.await.map_err(|e| PsError::Internal(format!("server task failed: {e}")))?
    }
}

/// Binds `addr` (port 0 picks a free port) and `metrics_addr`, and starts serving.
pub async fn start(
    config: ServerConfig,
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
) -> Result<RunningServer, PsError> {
    config.validate().map_err(|e| PsError::InvalidArgument(e.to_string()))?;
    // The TLS files are read before anything binds, so a bad [tls] section fails at once. A
    // client that fails the handshake (plaintext, an untrusted certificate, none with mutual
    // TLS) never gets to send a call.
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        let tls = tls.load().map_err(|e| PsError::InvalidArgument(e.to_string()))?;
        builder = builder
            .tls_config(tls)
            .map_err(|e| PsError::InvalidArgument(format!("the TLS settings do not work: {e}")))?;
    }
    let listener =
        TcpListener::bind(addr).await.map_err(|source| PsError::Bind { what: "for gRPC", addr, source })?;
    let addr = listener.local_addr().map_err(|e| PsError::Internal(e.to_string()))?;
    let metrics_listener = match metrics_addr {
        Some(a) => Some(TcpListener::bind(a).await.map_err(|source| PsError::Bind {
            what: "for metrics",
            addr: a,
            source,
        })?),
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    let restored = match config.restore.clone() {
        Some(which) => Some(crate::checkpointing::restore(&config, &which).await?),
        None => None,
    };
    // The tensor link listens on the gRPC address's interface. Not with TLS: it would carry
    // the job's tensors in the clear.
    let link_listener = if config.transport.tensor_link && config.tls.is_none() {
        let a = SocketAddr::new(addr.ip(), config.settings.link_port);
        Some(TcpListener::bind(a).await.map_err(|source| PsError::Bind {
            what: "for the tensor link",
            addr: a,
            source,
        })?)
    } else {
        None
    };
    let mut shard = Shard::new(config, restored)?;
    shard.link_port = link_listener.as_ref().and_then(|l| l.local_addr().ok()).map_or(0, |a| a.port());
    let shard = Arc::new(shard);
    let (stop, asked_rx) = watch::channel(false);
    // Serving stops once pushes have settled after the stop was asked for (see `settle`).
    let (serving_stop, stop_rx) = watch::channel(false);
    tokio::spawn({
        let shard = shard.clone();
        let mut asked = asked_rx;
        async move {
            let _ = asked.wait_for(|s| *s).await;
            settle(&shard).await;
            let _ = serving_stop.send(true);
        }
    });

    let reaper = tokio::spawn(reap_loop(shard.clone(), stop_rx.clone()));
    if let Some(l) = metrics_listener {
        tokio::spawn(serve_metrics(shard.clone(), l, stop_rx.clone()));
    }

    if let Some(l) = link_listener {
        tokio::spawn(crate::link::serve(shard.clone(), l, stop_rx.clone()));
    }

    let t = &shard.config.transport;
    let svc = ParameterServerServer::new(Service { shard: shard.clone() })
        .max_decoding_message_size(t.max_message_bytes)
        .max_encoding_message_size(t.max_message_bytes);
    // The token is checked before a call reaches the service: a refused call changes nothing.
    let svc = InterceptedService::new(svc, ServerAuth::new(shard.config.token.clone()));
    let router = builder
        .initial_stream_window_size(t.stream_window_bytes)
        .initial_connection_window_size(t.connection_window_bytes)
        .max_frame_size(Some(1 << 20))
        .http2_keepalive_interval(Some(t.keepalive_interval))
        .http2_keepalive_timeout(Some(t.keepalive_timeout))
        .tcp_nodelay(true)
        .add_service(svc);
    let tls_mode = match &shard.config.tls {
        None => "off",
        Some(t) if t.mutual() => "mutual",
        Some(_) => "on",
    };
    info!(%addr, link_port = shard.link_port, authenticated = shard.config.token.is_some(), tls = tls_mode, shard = shard.config.shard, num_shards = shard.config.num_shards, mode = %shard.config.mode, workers = shard.config.num_workers, "parameter server listening");
    let s2 = shard.clone();
    // The builder's tcp_nodelay only applies to listeners tonic binds itself; without it,
    // the last frame of every streamed reply waits for a delayed ACK (about 40ms).
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    if let Some(ck) = &shard.checkpointer {
        // A marker of this shard's last stop would make shard 0 give up every checkpoint.
        ck.store.clear_stopped(shard.config.shard).await?;
    }
    let task = tokio::spawn(async move {
        let mut rx = stop_rx;
        let mut drain = rx.clone();
        let checkpointer = s2.checkpointer.clone();
        let serve = router.serve_with_incoming_shutdown(incoming, async move {
            let _ = rx.wait_for(|s| *s).await;
            if let Some(ck) = checkpointer {
                ck.stop();
            }
        });
        // Stopping waits for open connections to finish; one that carries no call (an idle
        // stranger, a client that only sent the HTTP/2 preface) would hold it forever.
        let res = tokio::select! {
            res = serve => res,
            _ = async {
                let _ = drain.wait_for(|s| *s).await;
                tokio::time::sleep(DRAIN_TIMEOUT).await;
            } => {
                warn!(timeout = ?DRAIN_TIMEOUT, "connections still open after stopping; closing them");
                Ok(())
            }
        };
        s2.coord.close();
        reaper.abort();
        let mut result = res.map_err(|e| PsError::Internal(format!("gRPC server failed: {e}")));
        if let Some(ck) = s2.checkpointer.clone() {
            if let Err(e) = last_checkpoint(&s2, &ck).await {
                ck.record_failure(s2.coord.version(), &format!("the last checkpoint: {e}"));
            }
            let failures = ck.failures();
            if result.is_ok() && !failures.is_empty() {
                result = Err(PsError::CheckpointsFailed(failures));
            }
        }
        result
    });
    Ok(RunningServer { addr, metrics_addr, shard, stop, task })
}

/// A stopping server goes on serving until no worker was heard from for this long (at most
/// `SETTLE_MAX`).
pub const SETTLE_QUIET: Duration = Duration::from_millis(300);
pub const SETTLE_MAX: Duration = Duration::from_millis(1500);

/// Waits, before a stopping server stops serving, until its workers have gone quiet: the
/// launcher stops every process at once, and pushes still on their way to this shard must land
/// (or the step they complete on the other shards would be missing here).
async fn settle(shard: &Shard) {
    let started = tokio::time::Instant::now();
    while started.elapsed() < SETTLE_MAX {
        if shard.coord.last_heard().is_none_or(|t| t.elapsed() >= SETTLE_QUIET) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long a stopping server waits for open connections before it closes them.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Writes the checkpoint a stopping shard owes: the open sync step completed with what
/// arrived, then (with `on_shutdown`) a last checkpoint of the model if it changed since the
/// previous one, and everything uploaded and finalized (up to `SHUTDOWN_WAIT`).
async fn last_checkpoint(shard: &Arc<Shard>, ck: &Arc<Checkpointer>) -> Result<(), PsError> {
    if let Some(ticket) = shard.coord.complete_open_step() {
        info!(
            step = ticket.step,
            pushes = ticket.divisor,
            "completing the open step with the pushes that arrived"
        );
        shard.complete_step(ticket).await?;
    }
    let v = shard.coord.version();
    if let Err(e @ PsError::NonFiniteModel { .. }) = shard.model() {
        // No checkpoint of a model that is not finite; the job must not end as a success.
        ck.record_failure(v, &e);
    }
    if shard.model().is_ok() {
        // Shard 0 need not wait for any other step from this shard.
        if let Err(e) = ck.store.mark_stopped(shard.config.shard, v).await {
            ck.record_failure(v, &e);
        }
        if ck.on_shutdown() && ck.stale(v) && shard.coord.between_steps() {
            info!(step = v, "writing a last checkpoint before stopping");
            shard.checkpoint_if_due(v, true).await;
        }
    }
    if !ck.wait_idle(SHUTDOWN_WAIT).await {
        ck.record_failure(
            v,
            &format!("still uploading or finalizing {SHUTDOWN_WAIT:?} after the server stopped"),
        );
    }
    Ok(())
}

/// Serves until `signal` resolves (e.g. SIGTERM or Ctrl-C), then shuts down gracefully.
pub async fn serve_until(
    config: ServerConfig,
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    signal: impl Future<Output = ()>,
) -> Result<(), PsError> {
    let server = start(config, addr, metrics_addr).await?;
    signal.await;
    info!("shutting down");
    server.shutdown().await
}

async fn reap_loop(shard: Arc<Shard>, mut stop: watch::Receiver<bool>) {
    let period = (shard.config.settings.heartbeat_timeout / 4).max(Duration::from_millis(10));
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Err(e) = shard.reap().await {
            error!(error = %e, "applying a step after dropping a worker failed");
        }
    }
}

async fn serve_metrics(shard: Arc<Shard>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    let encode = move || shard.metrics_text();
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    if let Err(e) = gradflow_proto::metrics_http::serve(listener, encode, shutdown).await {
        error!(error = %e, "metrics endpoint failed");
    }
}
