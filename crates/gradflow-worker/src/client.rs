//! [`Worker`]: one training process's connection to every parameter-server shard.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::try_join_all;
use futures::stream;
use gradflow_core::{ModelSpec, Placement};
use gradflow_proto::auth::ClientAuth;
use gradflow_proto::tls::{self, ClientTls};
use gradflow_proto::{OBSERVER, ParameterServerClient, codec, pb};
use tonic::service::interceptor::InterceptedService;

/// A client of one shard that sends the job's token with every call.
type Client = ParameterServerClient<InterceptedService<Channel, ClientAuth>>;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};
use tracing::{debug, info, warn};

use crate::link::{Link, LinkPort, Slot};
use crate::{WorkerConfig, WorkerError};

/// Metadata key a server sets on a stale-step refusal (see gradflow-ps).
const VERSION_METADATA: &str = "x-gradflow-version";
/// The server's `NON_FINITE_METADATA`: the step whose update would have made the model
/// non-finite, on every refusal once that happened.
const NON_FINITE_METADATA: &str = "x-gradflow-non-finite-step";

/// What became of a step's gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    /// The servers took them.
    Applied,
    /// The servers were not at this worker's step: they had moved on without it (it was
    /// dropped as dead and came back), or they were restored from a checkpoint. The gradients
    /// were discarded and the worker now continues at `resumed_at`.
    Stale { resumed_at: u64 },
}

/// Gradients staged for one shard until [`Worker::step`].
#[derive(Default)]
struct Pending {
    dense: Vec<pb::DenseSlice>,
    sparse: Vec<pb::SparseGrad>,
}

/// A worker's connection to the parameter servers.
///
/// The usual loop: [`declare`](Worker::declare) once, then for every batch
/// [`pull_dense`](Worker::pull_dense) / [`pull_sparse`](Worker::pull_sparse), compute
/// gradients, [`push_dense`](Worker::push_dense) / [`push_sparse`](Worker::push_sparse), and
/// [`step`](Worker::step); finally [`leave`](Worker::leave).
pub struct Worker {
    config: WorkerConfig,
    clients: Vec<Client>,
    /// The tensor link to each shard (pushes and pulls; gRPC where a shard has none).
    links: Vec<Link>,
    model: Option<Arc<(ModelSpec, Placement)>>,
    /// Atomic so that a pull (`&self`) can follow a server's rewind.
    step: AtomicU64,
    pending: Vec<Pending>,
    /// Staging buffers of the last step's dense gradients, taken back once sent: a fresh
    /// buffer of many MiB every step costs a page fault per 4 KiB.
    spare: Vec<BytesMut>,
    heartbeat: JoinHandle<()>,
    step_tx: tokio::sync::watch::Sender<u64>,
    /// Dynamic data sharding: the task progress the next push to shard 0 carries.
    pub(crate) task_progress: Option<pb::TaskProgress>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// The connection settings of one server; `tls` makes it `https://`.
fn endpoint(
    addr: &str,
    config: &WorkerConfig,
    tls: Option<&ClientTlsConfig>,
) -> Result<Endpoint, WorkerError> {
    let t = &config.transport;
    let url = gradflow_proto::tls::url(addr, tls.is_some()).map_err(WorkerError::Config)?;
    let mut endpoint = Endpoint::from_shared(url)
        .map_err(|e| WorkerError::Config(format!("server address `{addr}` is not valid: {e}")))?;
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| WorkerError::Config(format!("TLS settings for `{addr}` do not work: {e}")))?;
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

/// Errors worth retrying: the server is not (yet, or for a moment) reachable.
fn transient(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled)
        && !status.message().contains("shutting down")
}

impl Worker {
    /// Connects to every server, waiting up to `startup_timeout` for them to come up, and
    /// checks that each is the shard its position in `servers` says it is.
    pub async fn connect(config: WorkerConfig) -> Result<Worker, WorkerError> {
        config.validate().map_err(WorkerError::Config)?;
        let mut config = config;
        if config.token.is_none() {
            config.token = gradflow_proto::auth::Token::from_env().map_err(WorkerError::Config)?;
        }
        if config.tls.is_none() {
            config.tls = ClientTls::from_env().map_err(|e| WorkerError::Config(e.to_string()))?;
        }
        // The files are read once, here: a bad path or PEM fails before any connection.
        let tls_config = config
            .tls
            .as_ref()
            .map(ClientTls::load)
            .transpose()
            .map_err(|e| WorkerError::Config(e.to_string()))?;
        let mut clients = Vec::with_capacity(config.servers.len());
        for addr in &config.servers {
            let channel = endpoint(addr, &config, tls_config.as_ref())?.connect_lazy();
            clients.push(
                ParameterServerClient::with_interceptor(channel, ClientAuth::new(config.token.as_ref()))
                    .max_decoding_message_size(config.transport.max_message_bytes)
                    .max_encoding_message_size(config.transport.max_message_bytes),
            );
        }
        let deadline = tokio::time::Instant::now() + config.startup_timeout;
        let n = clients.len() as u32;
        let statuses = try_join_all(clients.iter().enumerate().map(|(shard, c)| {
            let mut c = c.clone();
            let addr = config.servers[shard].clone();
            let speaks_tls = tls_config.is_some();
            let connect_timeout = config.transport.connect_timeout;
            async move {
                let mut attempt = 0;
                loop {
                    let result = c.status(pb::StatusRequest {}).await;
                    // A TLS mismatch or an untrusted certificate does not go away by waiting:
                    // say so now instead of retrying until startup_timeout.
                    if let Err(s) = &result {
                        if let Some((_, message)) = tls::diagnose(s, speaks_tls) {
                            return Err(WorkerError::Unreachable { shard, addr, message });
                        }
                        // A TLS server closes a plaintext connection at once; so may a server
                        // going away. Ask it which one it is.
                        if !speaks_tls
                            && tls::could_be_tls_server(s)
                            && tls::answers_plaintext_http2(&addr, connect_timeout).await == Some(false)
                        {
                            return Err(WorkerError::Unreachable {
                                shard,
                                addr,
                                message: tls::expects_tls(s),
                            });
                        }
                    }
                    match result {
                        Ok(r) => return Ok(r.into_inner()),
                        Err(s) if transient(&s) && tokio::time::Instant::now() < deadline => {
                            attempt += 1;
                            debug!(shard, %addr, attempt, "server not up yet: {}", s.message());
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(s) => {
                            return Err(WorkerError::Unreachable {
                                shard,
                                addr,
                                message: s.message().to_string(),
                            });
                        }
                    }
                }
            }
        }))
        .await?;
        for (shard, st) in statuses.iter().enumerate() {
            if st.num_shards != n || st.shard != shard as u32 {
                return Err(WorkerError::Config(format!(
                    "server {} is shard {} of {}, but it is listed at position {shard} of {n}: list servers in shard order",
                    config.servers[shard], st.shard, st.num_shards
                )));
            }
            if config.worker != OBSERVER && config.worker >= st.num_workers {
                return Err(WorkerError::Config(format!(
                    "worker index {} is out of range: the servers expect {} workers",
                    config.worker, st.num_workers
                )));
            }
        }
        // The link carries tensors in the clear, so never beside TLS (servers speaking TLS
        // offer none either).
        let use_link = config.transport.tensor_link && tls_config.is_none();
        let links = statuses
            .iter()
            .enumerate()
            .map(|(shard, st)| {
                let port = match u16::try_from(st.link_port) {
                    Ok(p) if p != 0 && use_link => LinkPort::At(p),
                    _ => LinkPort::None,
                };
                Link::new(
                    &config.servers[shard],
                    port,
                    config.worker,
                    config.token.as_ref(),
                    &config.transport,
                )
            })
            .collect();
        let (step_tx, step_rx) = tokio::sync::watch::channel(0u64);
        let heartbeat = if config.worker == OBSERVER {
            tokio::spawn(async {})
        } else {
            tokio::spawn(heartbeat_loop(clients.clone(), config.worker, config.heartbeat_interval, step_rx))
        };
        info!(worker = config.worker, servers = ?config.servers, "connected to parameter servers");
        Ok(Worker {
            pending: (0..clients.len()).map(|_| Pending::default()).collect(),
            spare: Vec::new(),
            config,
            clients,
            links,
            model: None,
            step: AtomicU64::new(0),
            heartbeat,
            step_tx,
            task_progress: None,
        })
    }

    /// This worker's index.
    pub fn index(&self) -> u32 {
        self.config.worker
    }

    /// Number of server shards.
    pub fn num_shards(&self) -> usize {
        self.clients.len()
    }

    /// The step this worker is on: pulls wait for the model of this step (sync mode), and
    /// pushes are for it.
    pub fn current_step(&self) -> u64 {
        self.step.load(Ordering::Relaxed)
    }

    /// Sets the step, e.g. when resuming from a checkpoint or joining a running job.
    pub fn set_step(&mut self, step: u64) {
        self.move_to(step);
    }

    fn move_to(&self, step: u64) {
        self.step.store(step, Ordering::Relaxed);
        let _ = self.step_tx.send(step);
    }

    /// After a pull failed with `e`: if the servers were restored from a checkpoint and ask
    /// this worker to continue from its step, moves there and says to try again (a few times).
    fn follow_rewind(&self, e: &WorkerError, tries: &mut u32) -> bool {
        let Some(v) = rewind_target(e) else { return false };
        if *tries >= 3 {
            return false;
        }
        *tries += 1;
        warn!(
            worker = self.config.worker,
            from = self.current_step(),
            to = v,
            "servers were restored from a checkpoint; continuing from its step"
        );
        self.move_to(v);
        true
    }

    /// The declared spec.
    pub fn spec(&self) -> Result<&ModelSpec, WorkerError> {
        self.model.as_ref().map(|m| &m.0).ok_or(WorkerError::NotDeclared)
    }

    /// Where each dense piece lives (a pure function of the spec and the shard count).
    pub fn placement(&self) -> Result<&Placement, WorkerError> {
        self.model.as_ref().map(|m| &m.1).ok_or(WorkerError::NotDeclared)
    }

    /// Calls `f` on shard `shard`'s client, retrying transient failures with backoff.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        shard: usize,
        rpc: &'static str,
        f: F,
    ) -> Result<T, WorkerError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.retry(shard, rpc, || f(self.clients[shard].clone())).await
    }

    /// Runs `f` until it succeeds, fails for good, or runs out of retries.
    async fn retry<T, F, Fut>(&self, shard: usize, rpc: &'static str, mut f: F) -> Result<T, WorkerError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut attempt = 0;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(status) => match self.retry_delay(shard, rpc, &mut attempt, &status) {
                    Some(delay) => tokio::time::sleep(delay).await,
                    None => return Err(self.refused(shard, rpc, status)),
                },
            }
        }
    }

    /// How long to wait before trying `rpc` again after `status`; `None`: do not.
    fn retry_delay(
        &self,
        shard: usize,
        rpc: &'static str,
        attempt: &mut u32,
        status: &Status,
    ) -> Option<Duration> {
        let t = &self.config.transport;
        if !transient(status) || *attempt >= t.max_retries {
            return None;
        }
        let delay = t.backoff(*attempt);
        warn!(shard, rpc, attempt = *attempt, ?delay, "transient error, retrying: {}", status.message());
        *attempt += 1;
        Some(delay)
    }

    fn refused(&self, shard: usize, rpc: &'static str, status: Status) -> WorkerError {
        let addr = self.config.servers[shard].clone();
        let step = status.metadata().get(NON_FINITE_METADATA).and_then(|v| v.to_str().ok()?.parse().ok());
        match step {
            Some(step) => {
                WorkerError::ModelNotFinite { shard, addr, step, message: status.message().to_string() }
            }
            None => WorkerError::Server { shard, addr, rpc, status },
        }
    }

    /// The port of shard `shard`'s tensor link, asking the shard when it is not known (after
    /// a refused connection); `None`: use gRPC.
    async fn link_port(&self, shard: usize) -> Result<Option<u16>, Status> {
        let link = &self.links[shard];
        let port = match link.port() {
            LinkPort::Unknown => {
                let st = self.clients[shard].clone().status(pb::StatusRequest {}).await?.into_inner();
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
            LinkPort::At(p) => Some(p),
            _ => None,
        })
    }

    /// Declares the model on every shard: creates it on the first call of the job, checks it
    /// on later ones (a different spec is refused with the first difference).
    pub async fn declare(&mut self, spec: ModelSpec) -> Result<(), WorkerError> {
        spec.validate().map_err(|e| WorkerError::InvalidSpec(e.to_string()))?;
        let json = serde_json::to_string(&spec).map_err(|e| WorkerError::InvalidSpec(e.to_string()))?;
        let n = self.clients.len() as u32;
        let me = self.config.worker;
        let pbytes = self.config.partition_bytes;
        let servers = &self.config.servers;
        try_join_all((0..self.clients.len()).map(|shard| {
            let json = json.clone();
            self.call(shard, "DeclareSpec", move |mut c| {
                let req = pb::DeclareSpecRequest {
                    worker: me,
                    spec_json: json.clone(),
                    partition_bytes: pbytes,
                    num_shards: n,
                    shard: shard as u32,
                    servers: servers.clone(),
                };
                async move { c.declare_spec(req).await }
            })
        }))
        .await?;
        let placement = Placement::new(&spec, n, pbytes);
        self.model = Some(Arc::new((spec, placement)));
        Ok(())
    }

    /// Pulls every dense tensor into `out` (one buffer per `ModelSpec::dense`, in spec order,
    /// resized to the tensor's size). In sync mode this waits for the model of the current step.
    pub async fn pull_all_dense(&self, out: &mut [Vec<f32>]) -> Result<(), WorkerError> {
        let spec = self.spec()?;
        if out.len() != spec.dense.len() {
            return Err(WorkerError::Length {
                name: "dense buffers".into(),
                expected: spec.dense.len(),
                got: out.len(),
            });
        }
        for (buf, d) in out.iter_mut().zip(&spec.dense) {
            buf.resize(d.numel() as usize, 0.0);
        }
        let all: Vec<usize> = (0..spec.dense.len()).collect();
        let mut tries = 0;
        loop {
            let mut refs: Vec<&mut [f32]> = out.iter_mut().map(|v| v.as_mut_slice()).collect();
            match self.pull_dense_indices(&all, &mut refs, true).await {
                Err(e) if self.follow_rewind(&e, &mut tries) => continue,
                r => return r,
            }
        }
    }

    /// Pulls the named dense tensors into the caller's buffers (each exactly the tensor's size).
    pub async fn pull_dense(&self, names: &[&str], out: &mut [&mut [f32]]) -> Result<(), WorkerError> {
        let spec = self.spec()?;
        let mut idx = Vec::with_capacity(names.len());
        for (name, buf) in names.iter().zip(out.iter()) {
            let t = spec.dense_index(name).ok_or_else(|| WorkerError::UnknownTensor(name.to_string()))?;
            let expected = spec.dense[t].numel() as usize;
            if buf.len() != expected {
                return Err(WorkerError::Length { name: name.to_string(), expected, got: buf.len() });
            }
            idx.push(t);
        }
        let mut tries = 0;
        loop {
            match self.pull_dense_indices(&idx, out, false).await {
                Err(e) if self.follow_rewind(&e, &mut tries) => continue,
                r => return r,
            }
        }
    }

    async fn pull_dense_indices(
        &self,
        tensors: &[usize],
        out: &mut [&mut [f32]],
        everything: bool,
    ) -> Result<(), WorkerError> {
        let (spec, placement) = {
            let m = self.model.as_ref().ok_or(WorkerError::NotDeclared)?;
            (&m.0, &m.1)
        };
        // Each piece's place in the caller's buffers, by shard: pulled values land there.
        let mut slots: Vec<Vec<Slot<'_>>> = (0..self.clients.len()).map(|_| Vec::new()).collect();
        for (buf, &t) in out.iter_mut().zip(tensors) {
            let mut rest: &mut [f32] = buf;
            for p in placement.pieces_of(t) {
                let (dst, tail) = std::mem::take(&mut rest).split_at_mut(p.len as usize);
                rest = tail;
                let tensor = spec.dense[t].name.as_str();
                slots[p.shard as usize].push(Slot { tensor, partition: p.partition, dst, filled: 0 });
            }
        }
        let (me, step) = (self.config.worker, self.current_step());
        try_join_all(slots.into_iter().enumerate().filter(|(_, s)| !s.is_empty()).map(
            |(shard, mut slots)| {
                // `everything` asks for all of the shard's pieces in one word.
                let pieces = if everything {
                    Vec::new()
                } else {
                    slots
                        .iter()
                        .map(|s| pb::PieceRef { tensor: s.tensor.to_string(), partition: s.partition })
                        .collect()
                };
                let req = pb::PullDenseRequest { worker: me, step, pieces };
                async move {
                    self.pull_dense_shard(shard, req, &mut slots).await?;
                    match slots.iter().find(|s| s.filled != s.dst.len() as u64) {
                        Some(s) => Err(WorkerError::Protocol {
                            shard,
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
            },
        ))
        .await?;
        Ok(())
    }

    /// One shard's part of a dense pull, over the tensor link or gRPC, retried like `call`.
    async fn pull_dense_shard(
        &self,
        shard: usize,
        req: pb::PullDenseRequest,
        slots: &mut [Slot<'_>],
    ) -> Result<(), WorkerError> {
        let mut attempt = 0;
        loop {
            for s in slots.iter_mut() {
                s.filled = 0;
            }
            let result = match self.link_port(shard).await {
                Ok(Some(port)) => self.links[shard].pull_dense(port, req.clone(), slots).await,
                Ok(None) => pull_dense_grpc(self.clients[shard].clone(), req.clone(), slots).await,
                Err(status) => Err(status),
            };
            match result {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(message)) => return Err(WorkerError::Protocol { shard, message }),
                Err(status) => match self.retry_delay(shard, "PullDense", &mut attempt, &status) {
                    Some(delay) => tokio::time::sleep(delay).await,
                    None => return Err(self.refused(shard, "PullDense", status)),
                },
            }
        }
    }

    /// Pulls the rows of `ids` from sparse table `table` into `out` (`ids.len() * dim` values,
    /// in the order of `ids`). Rows are created on first touch.
    pub async fn pull_sparse(&self, table: &str, ids: &[u64], out: &mut Vec<f32>) -> Result<(), WorkerError> {
        self.pull_sparse_many(&[(table, ids)], std::slice::from_mut(out)).await
    }

    /// Pulls rows of several tables at once: one request per shard.
    pub async fn pull_sparse_many(
        &self,
        requests: &[(&str, &[u64])],
        out: &mut [Vec<f32>],
    ) -> Result<(), WorkerError> {
        let mut tries = 0;
        loop {
            match self.pull_sparse_once(requests, out).await {
                Err(e) if self.follow_rewind(&e, &mut tries) => continue,
                r => return r,
            }
        }
    }

    async fn pull_sparse_once(
        &self,
        requests: &[(&str, &[u64])],
        out: &mut [Vec<f32>],
    ) -> Result<(), WorkerError> {
        let spec = self.spec()?;
        let n = self.clients.len();
        let mut dims = Vec::with_capacity(requests.len());
        // For each shard and request: the positions in `ids` that shard serves.
        let mut positions: Vec<Vec<Vec<u32>>> = vec![vec![Vec::new(); requests.len()]; n];
        for (r, (table, ids)) in requests.iter().enumerate() {
            let t = spec.sparse_index(table).ok_or_else(|| WorkerError::UnknownTable(table.to_string()))?;
            dims.push(spec.sparse[t].dim as usize);
            for (i, &id) in ids.iter().enumerate() {
                positions[Placement::sparse_shard(id, n as u32) as usize][r].push(i as u32);
            }
        }
        let (me, step) = (self.config.worker, self.current_step());
        let replies =
            try_join_all((0..n).filter(|&s| positions[s].iter().any(|p| !p.is_empty())).map(|shard| {
                let tables: Vec<pb::SparseIds> = requests
                    .iter()
                    .enumerate()
                    .filter(|(r, _)| !positions[shard][*r].is_empty())
                    .map(|(r, (table, ids))| {
                        let shard_ids: Vec<u64> =
                            positions[shard][r].iter().map(|&i| ids[i as usize]).collect();
                        pb::SparseIds { table: table.to_string(), ids: codec::u64s_to_bytes(&shard_ids) }
                    })
                    .collect();
                async move {
                    let req = pb::PullSparseRequest { worker: me, step, tables };
                    let req = &req;
                    let reply = self
                        .retry(shard, "PullSparse", || async move {
                            match self.link_port(shard).await? {
                                Some(port) => self.links[shard].pull_sparse(port, req.clone()).await,
                                None => Ok(self.clients[shard]
                                    .clone()
                                    .pull_sparse(req.clone())
                                    .await?
                                    .into_inner()),
                            }
                        })
                        .await?;
                    Ok::<_, WorkerError>((shard, reply))
                }
            }))
            .await?;
        for (r, (_, ids)) in requests.iter().enumerate() {
            out[r].resize(ids.len() * dims[r], 0.0);
        }
        for (shard, reply) in replies {
            let mut rows = reply.tables.into_iter();
            for r in 0..requests.len() {
                let pos = &positions[shard][r];
                if pos.is_empty() {
                    continue;
                }
                let dim = dims[r];
                let got = rows.next().ok_or_else(|| WorkerError::Protocol {
                    shard,
                    message: format!("no rows for table `{}` in PullSparse reply", requests[r].0),
                })?;
                if got.values.len() != pos.len() * dim * 4 {
                    return Err(WorkerError::Protocol {
                        shard,
                        message: format!(
                            "table `{}`: {} bytes for {} rows of dim {dim}",
                            requests[r].0,
                            got.values.len(),
                            pos.len()
                        ),
                    });
                }
                for (k, &i) in pos.iter().enumerate() {
                    let i = i as usize;
                    codec::copy_f32s(
                        &mut out[r][i * dim..(i + 1) * dim],
                        &got.values[k * dim * 4..(k + 1) * dim * 4],
                    );
                }
            }
        }
        Ok(())
    }

    /// Stages the gradient of dense tensor `name` for this step; it is sent by [`Worker::step`].
    pub fn push_dense(&mut self, name: &str, grad: &[f32]) -> Result<(), WorkerError> {
        let model = self.model.clone().ok_or(WorkerError::NotDeclared)?;
        let (spec, placement) = (&model.0, &model.1);
        let t = spec.dense_index(name).ok_or_else(|| WorkerError::UnknownTensor(name.to_string()))?;
        let expected = spec.dense[t].numel() as usize;
        if grad.len() != expected {
            return Err(WorkerError::Length { name: name.to_string(), expected, got: grad.len() });
        }
        let chunk = self.config.transport.chunk_bytes / 4;
        for p in placement.pieces_of(t) {
            let piece = &grad[p.offset as usize..(p.offset + p.len) as usize];
            for (k, part) in piece.chunks(chunk).enumerate() {
                let mut buf = self.spare.pop().unwrap_or_default();
                codec::put_f32s(&mut buf, part);
                self.pending[p.shard as usize].dense.push(pb::DenseSlice {
                    tensor: name.to_string(),
                    partition: p.partition,
                    offset: (k * chunk) as u64,
                    data: buf.freeze(),
                });
            }
        }
        Ok(())
    }

    /// Stages gradients for rows `ids` of sparse table `table` (`ids.len() * dim` values).
    /// Repeated ids are summed by the server.
    pub fn push_sparse(&mut self, table: &str, ids: &[u64], grads: &[f32]) -> Result<(), WorkerError> {
        let spec = self.spec()?;
        let t = spec.sparse_index(table).ok_or_else(|| WorkerError::UnknownTable(table.to_string()))?;
        let dim = spec.sparse[t].dim as usize;
        if grads.len() != ids.len() * dim {
            return Err(WorkerError::Length {
                name: table.to_string(),
                expected: ids.len() * dim,
                got: grads.len(),
            });
        }
        let n = self.clients.len();
        let mut by_shard: Vec<(Vec<u64>, Vec<u8>)> = vec![(Vec::new(), Vec::new()); n];
        for (i, &id) in ids.iter().enumerate() {
            let (sids, svals) = &mut by_shard[Placement::sparse_shard(id, n as u32) as usize];
            sids.push(id);
            codec::extend_f32s(svals, &grads[i * dim..(i + 1) * dim]);
        }
        for (shard, (sids, svals)) in by_shard.into_iter().enumerate() {
            if !sids.is_empty() {
                self.pending[shard].sparse.push(pb::SparseGrad {
                    table: table.to_string(),
                    ids: codec::u64s_to_bytes(&sids),
                    values: Bytes::from(svals),
                });
            }
        }
        Ok(())
    }

    /// Sends this step's staged gradients to every shard (an empty push where nothing is
    /// staged, so sync shards know this worker is done) and moves to the next step.
    pub async fn step(&mut self) -> Result<StepOutcome, WorkerError> {
        let pending = std::mem::take(&mut self.pending);
        self.pending = (0..self.clients.len()).map(|_| Pending::default()).collect();
        let (me, step) = (self.config.worker, self.current_step());
        let max = self.config.transport.chunk_bytes;
        let mut task = self.task_progress.take();
        let this = &*self;
        let sent = futures::future::join_all(pending.into_iter().enumerate().map(|(shard, p)| {
            let task = if shard == 0 { task.take() } else { None };
            async move {
                let result = {
                    let (request, payload) = link_push(me, step, &p, task);
                    let (request, payload, p) = (&request, &payload, &p);
                    this.retry(shard, "Push", || async move {
                        match this.link_port(shard).await? {
                            Some(port) => this.links[shard].push(port, request, payload).await,
                            None => {
                                let msgs = pack(me, step, p, max, task);
                                let reply = this.clients[shard].clone().push(stream::iter(msgs)).await?;
                                Ok(reply.into_inner().version)
                            }
                        }
                    })
                    .await
                };
                let result = match result {
                    // step() sends once per step, so this can only be a retry of a push
                    // whose first attempt arrived although its answer was lost.
                    Err(e) if e.code() == Some(Code::AlreadyExists) => Ok(()),
                    Err(e) => Err(e),
                    Ok(_) => Ok(()),
                };
                (result, p)
            }
        }))
        .await;
        let mut results = Vec::with_capacity(sent.len());
        for (result, p) in sent {
            results.push(result);
            // Nothing else holds a sent gradient's bytes now: keep its buffer for the next step.
            self.spare.extend(p.dense.into_iter().filter_map(|d| d.data.try_into_mut().ok()));
        }
        let mut resumed_at = None;
        for r in results {
            match r {
                Ok(()) => {}
                Err(e) if rewind_target(&e).is_some() => {
                    let v = rewind_target(&e).unwrap();
                    resumed_at = Some(resumed_at.map_or(v, |r: u64| r.max(v)));
                }
                Err(e) => return Err(e),
            }
        }
        match resumed_at {
            None => {
                self.set_step(step + 1);
                Ok(StepOutcome::Applied)
            }
            Some(v) => {
                warn!(
                    worker = me,
                    step,
                    resumed_at = v,
                    "the servers moved on without this worker; its gradients for this step were discarded"
                );
                self.set_step(v);
                Ok(StepOutcome::Stale { resumed_at: v })
            }
        }
    }

    /// Tells every shard this worker is done, so sync steps stop waiting for it.
    pub async fn leave(self) -> Result<(), WorkerError> {
        let me = self.config.worker;
        try_join_all((0..self.clients.len()).map(|shard| {
            self.call(shard, "Leave", move |mut c| async move {
                c.leave(pb::LeaveRequest { worker: me, pause: false }).await
            })
        }))
        .await?;
        info!(worker = me, step = self.current_step(), "left the job");
        Ok(())
    }

    /// Static data sharding, the scorer: the batch of step `step` ends epoch `epoch`
    /// (0-based). Before that batch is pushed, every shard holds the next step (sync mode):
    /// it does not complete without this worker's push of it (or its leaving), so the model
    /// stays the epoch's end model while it is scored, even if this worker is killed
    /// meanwhile and restarted.
    pub async fn hold_for_scoring(&self, epoch: u64, step: u64) -> Result<(), WorkerError> {
        self.score_call(epoch, step, false).await
    }

    /// Records on every shard that epoch `epoch` is scored (shard 0 counts scored epochs).
    pub async fn scored(&self, epoch: u64, step: u64) -> Result<(), WorkerError> {
        self.score_call(epoch, step, true).await
    }

    async fn score_call(&self, epoch: u64, step: u64, scored: bool) -> Result<(), WorkerError> {
        let worker = self.config.worker;
        try_join_all((0..self.clients.len()).map(|shard| {
            self.call(shard, "Score", move |mut c| async move {
                c.score(pb::ScoreRequest { worker, epoch, step, scored }).await
            })
        }))
        .await?;
        Ok(())
    }

    /// Asks every shard for a checkpoint of model version `steps[shard]` (or the first step at
    /// or after it) and waits until each has written it; shard 0 answers once the whole
    /// checkpoint is complete. Returns the version each shard wrote. In sync mode ask every
    /// shard for the same version: that is what makes the checkpoint a consistent cut.
    pub async fn checkpoint(&self, steps: &[u64]) -> Result<Vec<u64>, WorkerError> {
        if steps.len() != self.clients.len() {
            return Err(WorkerError::Length {
                name: "checkpoint steps (one per shard)".into(),
                expected: self.clients.len(),
                got: steps.len(),
            });
        }
        try_join_all(steps.iter().enumerate().map(|(shard, &step)| async move {
            Ok(self
                .call(shard, "Checkpoint", |mut c| async move {
                    c.checkpoint(pb::CheckpointRequest { step }).await
                })
                .await?
                .into_inner()
                .step)
        }))
        .await
    }

    /// The status of every shard.
    pub async fn status(&self) -> Result<Vec<pb::StatusResponse>, WorkerError> {
        try_join_all((0..self.clients.len()).map(|shard| async move {
            Ok(self
                .call(shard, "Status", |mut c| async move { c.status(pb::StatusRequest {}).await })
                .await?
                .into_inner())
        }))
        .await
    }
}

/// The step a server asks this worker to continue from: after it fell behind (the servers
/// moved on without it) or after the servers were restored from a checkpoint.
fn rewind_target(e: &WorkerError) -> Option<u64> {
    let WorkerError::Server { status, .. } = e else { return None };
    if status.code() != Code::FailedPrecondition {
        return None;
    }
    status.metadata().get(VERSION_METADATA)?.to_str().ok()?.parse().ok()
}

/// Packs staged gradients into gRPC push messages of at most about `max` payload bytes each
/// (the bytes are shared, not copied); the first carries `task`.
fn pack(
    worker: u32,
    step: u64,
    p: &Pending,
    max: usize,
    task: Option<pb::TaskProgress>,
) -> Vec<pb::PushRequest> {
    let new = || pb::PushRequest { worker, step, dense: Vec::new(), sparse: Vec::new(), task: None };
    let mut msgs = vec![pb::PushRequest { task, ..new() }];
    let mut size = 0;
    for d in &p.dense {
        if size > 0 && size + d.data.len() > max {
            msgs.push(new());
            size = 0;
        }
        size += d.data.len();
        msgs.last_mut().unwrap().dense.push(d.clone());
    }
    for s in &p.sparse {
        let len = s.ids.len() + s.values.len();
        if size > 0 && size + len > max {
            msgs.push(new());
            size = 0;
        }
        size += len;
        msgs.last_mut().unwrap().sparse.push(s.clone());
    }
    msgs
}

/// A push for the tensor link: one request whose message has its byte fields empty, and their
/// contents in message order (see `LinkRequest`). Built once per step, whatever the retries.
fn link_push(
    worker: u32,
    step: u64,
    p: &Pending,
    task: Option<pb::TaskProgress>,
) -> (pb::LinkRequest, Vec<&[u8]>) {
    let mut payload = Vec::with_capacity(p.dense.len() + 2 * p.sparse.len());
    let dense = p
        .dense
        .iter()
        .map(|d| {
            payload.push(d.data.as_ref());
            pb::DenseSlice {
                tensor: d.tensor.clone(),
                partition: d.partition,
                offset: d.offset,
                data: Bytes::new(),
            }
        })
        .collect();
    let sparse = p
        .sparse
        .iter()
        .map(|g| {
            payload.push(g.ids.as_ref());
            payload.push(g.values.as_ref());
            pb::SparseGrad { table: g.table.clone(), ids: Bytes::new(), values: Bytes::new() }
        })
        .collect();
    let push = pb::PushRequest { worker, step, dense, sparse, task };
    let request = pb::LinkRequest {
        request: Some(pb::link_request::Request::Push(push)),
        payload_bytes: payload.iter().map(|p| p.len() as u64).collect(),
    };
    (request, payload)
}

/// One shard's part of a dense pull over gRPC: chunks copied into their slots.
async fn pull_dense_grpc(
    mut client: Client,
    req: pb::PullDenseRequest,
    slots: &mut [Slot<'_>],
) -> Result<Result<(), String>, Status> {
    let mut chunks = client.pull_dense(req).await?.into_inner();
    while let Some(chunk) = chunks.message().await? {
        let slot = match Slot::find(slots, &chunk.tensor, chunk.partition) {
            Ok(slot) => slot,
            Err(message) => return Ok(Err(message)),
        };
        let Some(n) = codec::f32_len(&chunk.data) else {
            return Ok(Err(format!("chunk of `{}` is not whole f32 values", chunk.tensor)));
        };
        if chunk.offset.checked_add(n as u64).is_none_or(|end| end > slot.dst.len() as u64) {
            return Ok(Err(format!("chunk of `{}` runs past its partition", chunk.tensor)));
        }
        let start = chunk.offset as usize;
        codec::copy_f32s(&mut slot.dst[start..start + n], &chunk.data);
        slot.filled += n as u64;
    }
    Ok(Ok(()))
}

async fn heartbeat_loop(
    clients: Vec<Client>,
    worker: u32,
    interval: Duration,
    step: tokio::sync::watch::Receiver<u64>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let s = *step.borrow();
        for (shard, c) in clients.iter().enumerate() {
            let mut c = c.clone();
            tokio::spawn(async move {
                if let Err(e) = c.heartbeat(pb::HeartbeatRequest { worker, step: s }).await {
                    debug!(shard, "heartbeat failed: {}", e.message());
                }
            });
        }
    }
}
