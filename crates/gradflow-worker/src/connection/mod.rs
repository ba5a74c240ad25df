//! One shard's connection: [`Shard`] holds the shard's gRPC client (for every call) and, where
//! the shard offers one, its tensor link (for pushes and pulls).
//!
//! Whether pushes and pulls go over the link or gRPC is decided in one place,
//! [`Shard::route`]: the link when it was chosen at connect (the job does not use TLS, the
//! shard offers a link, `transport.tensor_link` is on) and the shard still offers it, gRPC
//! otherwise. Both transports sit behind one interface, [`Route`] (push, pull dense, pull
//! sparse), as sibling adapters: [`link`] and [`grpc`]. Every call to a shard, whichever its
//! transport, is retried by the one loop in [`crate::retry`], and its final failure becomes a
//! [`WorkerError`] in one place ([`Shard::refused`]).
//!
//! [`connect`] opens every shard's connection: it waits for the servers to come up and checks
//! that each is the shard its position in `servers` says it is.

pub(crate) mod grpc;
pub(crate) mod link;

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use futures::future::try_join_all;
use gradflow_proto::auth::ClientAuth;
use gradflow_proto::tls;
use gradflow_proto::{OBSERVER, ParameterServerClient, pb, refusal};
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tracing::debug;

use crate::config::ConfigError;
use crate::retry::{CallError, Jitter, Retry, transient};
use crate::step::Staged;
use crate::{WorkerConfig, WorkerError};
use link::{Link, LinkPort};

/// A client of one shard that sends the job's token with every call.
pub(crate) type Client = ParameterServerClient<InterceptedService<Channel, ClientAuth>>;

/// One step's push to one shard, whichever transport carries it.
pub(crate) struct Push<'a> {
    pub worker: u32,
    pub step: u64,
    /// The gradients staged for the shard (dense pieces and sparse rows, bytes ready to send).
    pub staged: &'a Staged,
    /// Dynamic data sharding: the task progress this push reports (to shard 0 only).
    pub task: Option<pb::TaskProgress>,
    /// gRPC: the payload bytes of one message, at most about this (`transport.chunk_bytes`).
    pub max_payload: usize,
    /// The encoding the staged values are in (`transport.compression`).
    pub encoding: pb::ValueEncoding,
    /// The push as the link sends it ([`link::push_request`]), built on the first try over
    /// the link and kept for its retries.
    link_form: OnceLock<(pb::LinkRequest, Vec<&'a [u8]>)>,
}

impl<'a> Push<'a> {
    pub(crate) fn new(
        worker: u32,
        step: u64,
        staged: &'a Staged,
        task: Option<pb::TaskProgress>,
        max_payload: usize,
        encoding: pb::ValueEncoding,
    ) -> Push<'a> {
        Push { worker, step, staged, task, max_payload, encoding, link_form: OnceLock::new() }
    }
}

/// Where one pulled piece goes: exactly its values' place in the caller's buffer.
pub(crate) struct Slot<'a> {
    pub tensor: &'a str,
    pub partition: u32,
    pub dst: &'a mut [f32],
    /// Values written so far.
    pub filled: u64,
}

impl<'a> Slot<'a> {
    /// The slot of piece `partition` of `tensor`; a reply naming a piece that was not asked
    /// for is a protocol error.
    pub(crate) fn find<'s>(
        slots: &'s mut [Slot<'a>],
        tensor: &str,
        partition: u32,
    ) -> Result<&'s mut Slot<'a>, CallError> {
        slots.iter_mut().find(|s| s.tensor == tensor && s.partition == partition).ok_or_else(|| {
            CallError::Protocol(format!("unrequested piece `{tensor}` partition {partition} in the reply"))
        })
    }
}

/// The transport one try of a push or pull takes: the two adapters behind one interface.
pub(crate) enum Route<'a> {
    /// The tensor link, at this port.
    Link(&'a Link, u16),
    Grpc(&'a Client),
}

impl Route<'_> {
    /// Sends one push; returns the version the shard answered.
    async fn push(&self, push: &Push<'_>) -> Result<u64, CallError> {
        match self {
            Route::Link(link, port) => {
                let (request, payload) = push.link_form.get_or_init(|| link::push_request(push));
                Ok(link.push(*port, request, payload).await?)
            }
            Route::Grpc(client) => grpc::push(client, push).await,
        }
    }

    /// Pulls dense pieces straight into their slots.
    async fn pull_dense(&self, req: pb::PullDenseRequest, slots: &mut [Slot<'_>]) -> Result<(), CallError> {
        match self {
            Route::Link(link, port) => link.pull_dense(*port, req, slots).await,
            Route::Grpc(client) => grpc::pull_dense(client, req, slots).await,
        }
    }

    /// Pulls sparse rows; the reply as gRPC's.
    async fn pull_sparse(&self, req: pb::PullSparseRequest) -> Result<pb::PullSparseResponse, CallError> {
        match self {
            Route::Link(link, port) => Ok(link.pull_sparse(*port, req).await?),
            Route::Grpc(client) => grpc::pull_sparse(client, req).await,
        }
    }
}

/// The connection to one shard.
pub(crate) struct Shard {
    index: usize,
    addr: String,
    client: Client,
    /// The tensor link, when chosen at connect; `None`: pushes and pulls use gRPC.
    link: Option<Link>,
    retry: Retry,
}

impl Shard {
    /// The shard's gRPC client (heartbeats take a clone).
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// The transport of the next try: the link where there is one and the shard still
    /// offers it (asking the shard for its port after a refused connection), else gRPC.
    async fn route(&self) -> Result<Route<'_>, Status> {
        let Some(link) = &self.link else { return Ok(Route::Grpc(&self.client)) };
        let port = match link.port() {
            LinkPort::Unknown => {
                let st = self.client.clone().status(pb::StatusRequest {}).await?.into_inner();
                let port = match u16::try_from(st.link_port) {
                    Ok(p) if p != 0 => LinkPort::At(p),
                    _ => LinkPort::None,
                };
                link.set_port(port);
                port
            }
            port => port,
        };
        Ok(match port {
            LinkPort::At(p) => Route::Link(link, p),
            _ => Route::Grpc(&self.client),
        })
    }

    /// Calls `f` on the shard's gRPC client, retrying transient failures.
    pub(crate) async fn call<T, F, Fut>(&self, rpc: &'static str, f: F) -> Result<T, WorkerError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let result = self
            .retry
            .run(self.index, rpc, || {
                let call = f(self.client.clone());
                async move { Ok(call.await?) }
            })
            .await;
        result.map_err(|e| self.refused(rpc, e))
    }

    /// Sends one step's push over the link or gRPC, retrying transient failures; returns the
    /// version the shard answered.
    pub(crate) async fn push(&self, push: &Push<'_>) -> Result<u64, WorkerError> {
        let result =
            self.retry.run(self.index, "Push", || async move { self.route().await?.push(push).await }).await;
        result.map_err(|e| self.refused("Push", e))
    }

    /// Pulls this shard's dense pieces into `slots` (the step and the pieces named in `req`),
    /// retrying transient failures; every slot is filled, or it is an error.
    pub(crate) async fn pull_dense(
        &self,
        req: pb::PullDenseRequest,
        slots: &mut [Slot<'_>],
    ) -> Result<(), WorkerError> {
        // Each try writes into `slots`, so this drives the retry loop itself.
        let mut tries = self.retry.tries(self.index, "PullDense");
        loop {
            for s in slots.iter_mut() {
                s.filled = 0;
            }
            let result = match self.route().await {
                Ok(route) => route.pull_dense(req.clone(), slots).await,
                Err(status) => Err(status.into()),
            };
            match result {
                Ok(()) => break,
                Err(e) => tries.failed(e).await.map_err(|e| self.refused("PullDense", e))?,
            }
        }
        match slots.iter().find(|s| s.filled != s.dst.len() as u64) {
            Some(s) => Err(WorkerError::Protocol {
                shard: self.index,
                message: format!(
                    "`{}` partition {}: received {} of {} values",
                    s.tensor,
                    s.partition,
                    s.filled,
                    s.dst.len()
                ),
            }),
            None => Ok(()),
        }
    }

    /// Pulls sparse rows, retrying transient failures.
    pub(crate) async fn pull_sparse(
        &self,
        req: &pb::PullSparseRequest,
    ) -> Result<pb::PullSparseResponse, WorkerError> {
        let result =
            self.retry
                .run(self.index, "PullSparse", || async move {
                    self.route().await?.pull_sparse(req.clone()).await
                })
                .await;
        result.map_err(|e| self.refused("PullSparse", e))
    }

    /// The error a call's final failure is: a shard that stopped training for good, a refusal,
    /// or a reply that does not fit the request.
    fn refused(&self, rpc: &'static str, e: CallError) -> WorkerError {
        let (shard, addr) = (self.index, self.addr.clone());
        match e {
            CallError::Protocol(message) => WorkerError::Protocol { shard, message },
            CallError::Status(status) => match refusal::non_finite_step(&status) {
                Some(step) => {
                    WorkerError::ModelNotFinite { shard, addr, step, message: status.message().to_string() }
                }
                None => WorkerError::Server { shard, addr, rpc, status },
            },
        }
    }
}

/// The connection settings of one server; `tls` makes it `https://`.
fn endpoint(
    addr: &str,
    config: &WorkerConfig,
    tls: Option<&ClientTlsConfig>,
) -> Result<Endpoint, ConfigError> {
    let t = &config.transport;
    let url = tls::url(addr, tls.is_some()).map_err(ConfigError::Address)?;
    let mut endpoint = Endpoint::from_shared(url)
        .map_err(|e| ConfigError::BadAddress { addr: addr.to_string(), reason: e.to_string() })?;
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| ConfigError::TlsConfig(format!("TLS settings for `{addr}` do not work: {e}")))?;
    }
    Ok(endpoint
        .connect_timeout(t.connect_timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(t.stream_window_bytes)
        .initial_connection_window_size(t.connection_window_bytes)
        // The largest HTTP/2 frame this client takes: without it, pulled tensors arrive in
        // 16 KiB frames. The servers take 1 MiB frames of pushes.
        .max_frame_size(1 << 20)
        .http2_keep_alive_interval(t.keepalive_interval)
        .keep_alive_timeout(t.keepalive_timeout)
        .keep_alive_while_idle(true))
}

/// Asks shard `shard` for its status until it answers, waiting up to `deadline` for it to
/// come up; a TLS mismatch or an untrusted certificate fails at once.
async fn wait_until_up(
    mut client: Client,
    shard: usize,
    addr: &str,
    deadline: tokio::time::Instant,
    speaks_tls: bool,
    connect_timeout: Duration,
) -> Result<pb::StatusResponse, WorkerError> {
    let unreachable = |message| WorkerError::Unreachable { shard, addr: addr.to_string(), message };
    let mut attempt = 0;
    loop {
        let result = client.status(pb::StatusRequest {}).await;
        // A TLS mismatch or an untrusted certificate does not go away by waiting: say so now
        // instead of retrying until startup_timeout.
        if let Err(s) = &result {
            if let Some((_, message)) = tls::diagnose(s, speaks_tls) {
                return Err(unreachable(message));
            }
            // A TLS server closes a plaintext connection at once; so may a server going away.
            // Ask it which one it is.
            if !speaks_tls
                && tls::could_be_tls_server(s)
                && tls::answers_plaintext_http2(addr, connect_timeout).await == Some(false)
            {
                return Err(unreachable(tls::expects_tls(s)));
            }
        }
        match result {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if transient(&s) && tokio::time::Instant::now() < deadline => {
                attempt += 1;
                debug!(shard, %addr, attempt, "server not up yet: {}", s.message());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => return Err(unreachable(s.message().to_string())),
        }
    }
}

/// Connects to every server in `config.servers`, waiting up to `startup_timeout` for them to
/// come up, checks that each is the shard its position says it is, and chooses each shard's
/// transport for pushes and pulls. `config` has its token and TLS settings resolved.
pub(crate) async fn connect(config: &WorkerConfig) -> Result<Vec<Shard>, WorkerError> {
    // The files are read once, here: a bad path or PEM fails before any connection.
    let tls_config = config.tls.as_ref().map(|t| t.load()).transpose().map_err(ConfigError::from)?;
    let mut clients = Vec::with_capacity(config.servers.len());
    for addr in &config.servers {
        let channel = endpoint(addr, config, tls_config.as_ref())?.connect_lazy();
        clients.push(
            ParameterServerClient::with_interceptor(channel, ClientAuth::new(config.token.as_ref()))
                .max_decoding_message_size(config.transport.max_message_bytes)
                .max_encoding_message_size(config.transport.max_message_bytes),
        );
    }
    let deadline = tokio::time::Instant::now() + config.startup_timeout;
    let n = clients.len() as u32;
    let speaks_tls = tls_config.is_some();
    let statuses = try_join_all(clients.iter().enumerate().map(|(shard, c)| {
        let addr = &config.servers[shard];
        wait_until_up(c.clone(), shard, addr, deadline, speaks_tls, config.transport.connect_timeout)
    }))
    .await?;
    for (shard, st) in statuses.iter().enumerate() {
        if st.num_shards != n || st.shard != shard as u32 {
            return Err(ConfigError::ShardOrder {
                addr: config.servers[shard].clone(),
                shard: st.shard,
                num_shards: st.num_shards,
                position: shard,
                listed: n,
            }
            .into());
        }
        if config.worker != OBSERVER && config.worker >= st.num_workers {
            return Err(
                ConfigError::WorkerOutOfRange { worker: config.worker, num_workers: st.num_workers }.into()
            );
        }
    }
    // The link carries tensors in the clear, so never beside TLS (servers speaking TLS offer
    // none either).
    let use_link = config.transport.tensor_link && !speaks_tls;
    Ok(clients
        .into_iter()
        .zip(statuses)
        .enumerate()
        .map(|(index, (client, st))| {
            let addr = config.servers[index].clone();
            let link = match u16::try_from(st.link_port) {
                Ok(p) if p != 0 && use_link => Some(Link::new(
                    &addr,
                    LinkPort::At(p),
                    config.worker,
                    config.token.as_ref(),
                    &config.transport,
                )),
                _ => None,
            };
            Shard { index, addr, client, link, retry: Retry::new(&config.transport, Jitter::from_entropy()) }
        })
        .collect())
}
