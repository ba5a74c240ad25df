//! The tensor link's worker side: pushes and pulls to one shard over plain TCP, one of the
//! two transports behind [`Route`](super::Route).
//!
//! A [`Link`] keeps idle connections to its shard and uses one per request, so that a push
//! and a pull can overlap. A connection is returned only after a complete exchange; one
//! that failed, or whose request was dropped half-way, is closed. Connection and I/O
//! failures come back as `UNAVAILABLE` statuses, which the worker retries like gRPC's.
//!
//! The shard's link port is learnt from its status; after a connection is refused (the
//! server restarted, on a new port) it is learnt again before the next try
//! ([`Shard::route`](super::Shard)).
//!
//! Tensor bytes are written straight from the staged gradients and read straight into the
//! caller's buffers: a push's frame is a header naming the pieces, then their bytes
//! ([`push_request`]).

use std::sync::Mutex;

use bytes::Bytes;
use gradflow_proto::auth::Token;
use gradflow_proto::link::{self, read_f32s, read_header, read_payload, write_frame};
use gradflow_proto::{TransportConfig, codec, pb};
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tonic::Status;

use super::{Push, Slot};
use crate::retry::CallError;

/// Bytes a connection's reader buffers; larger values are read straight into place.
const READ_BUFFER: usize = 64 << 10;

/// Where a shard's link is, as far as this worker knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkPort {
    /// At this port.
    At(u16),
    /// Unknown since a connection was refused: ask the shard's status.
    Unknown,
    /// The shard offers none: use gRPC.
    None,
}

struct Conn {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

/// The tensor link to one shard.
pub(crate) struct Link {
    /// The host part of the shard's gRPC address.
    host: String,
    port: Mutex<LinkPort>,
    hello: pb::LinkHello,
    transport: TransportConfig,
    idle: Mutex<Vec<Conn>>,
}

/// The host of a `host:port` address (an `http://` or `https://` prefix allowed).
fn host_of(addr: &str) -> &str {
    let addr = addr.strip_prefix("http://").or_else(|| addr.strip_prefix("https://")).unwrap_or(addr);
    let addr = addr.split('/').next().unwrap_or(addr);
    addr.rsplit_once(':').map_or(addr, |(host, _)| host)
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("tensor link: {what}: {e}"))
}

impl Link {
    pub(crate) fn new(
        addr: &str,
        port: LinkPort,
        worker: u32,
        token: Option<&Token>,
        transport: &TransportConfig,
    ) -> Link {
        Link {
            host: host_of(addr).to_string(),
            port: Mutex::new(port),
            hello: pb::LinkHello { token: token.map(|t| t.expose().to_string()).unwrap_or_default(), worker },
            transport: transport.clone(),
            idle: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn port(&self) -> LinkPort {
        *self.port.lock().unwrap()
    }

    pub(crate) fn set_port(&self, port: LinkPort) {
        *self.port.lock().unwrap() = port;
        self.idle.lock().unwrap().clear();
    }

    async fn connect(&self, port: u16) -> Result<Conn, Status> {
        let target = format!("{}:{port}", self.host);
        let timeout = self.transport.connect_timeout;
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(&target)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                // Refused: the server may have restarted on another port. Learn it again.
                self.set_port(LinkPort::Unknown);
                return Err(unavailable(&format!("cannot connect to {target}"), e));
            }
            Err(_) => {
                self.set_port(LinkPort::Unknown);
                return Err(Status::unavailable(format!(
                    "tensor link: connecting to {target} timed out after {timeout:?}"
                )));
            }
        };
        link::tune(&stream, &self.transport).map_err(|e| unavailable("setting up the socket", e))?;
        let (r, w) = stream.into_split();
        let mut conn = Conn { r: BufReader::with_capacity(READ_BUFFER, r), w };
        // A server that accepts but never answers (stopped, or not a gradflow server).
        let hello = async {
            write_frame(&mut conn.w, &self.hello, &[]).await.map_err(|e| unavailable("sending hello", e))?;
            read_reply(&mut conn).await
        };
        let reply = tokio::time::timeout(timeout, hello).await.map_err(|_| {
            Status::unavailable(format!("tensor link: {target} did not answer the hello within {timeout:?}"))
        })??;
        if let Some(status) = link::status_of(&reply) {
            return Err(status);
        }
        Ok(conn)
    }

    /// An idle connection, or a new one.
    async fn conn(&self, port: u16) -> Result<Conn, Status> {
        let idle = self.idle.lock().unwrap().pop();
        match idle {
            Some(c) => Ok(c),
            None => self.connect(port).await,
        }
    }

    fn put_back(&self, conn: Conn) {
        self.idle.lock().unwrap().push(conn);
    }

    /// Sends one push: `request` names it (its byte fields empty, `payload_bytes` set) and
    /// `payload` holds the bytes in message order (see `LinkRequest`). Returns the version the
    /// server answered.
    pub(crate) async fn push(
        &self,
        port: u16,
        request: &pb::LinkRequest,
        payload: &[&[u8]],
    ) -> Result<u64, Status> {
        let (conn, reply) = self.exchange(port, request, payload).await?;
        self.put_back(conn);
        Ok(reply.version)
    }

    /// Sends `request` (and its payload) on a connection and reads the reply's header. A
    /// refusal comes back as its status, with the connection kept for the next request; on
    /// success the caller reads the reply's payload and then puts the connection back.
    async fn exchange(
        &self,
        port: u16,
        request: &pb::LinkRequest,
        payload: &[&[u8]],
    ) -> Result<(Conn, pb::LinkReply), Status> {
        let mut conn = self.conn(port).await?;
        write_frame(&mut conn.w, request, payload).await.map_err(|e| self.broken("sending a request", e))?;
        let reply = read_reply(&mut conn).await.inspect_err(|_| self.idle.lock().unwrap().clear())?;
        if let Some(status) = link::status_of(&reply) {
            self.put_back(conn);
            return Err(status);
        }
        Ok((conn, reply))
    }

    /// Sends one dense pull and reads each piece of the reply straight into its slot. A reply
    /// that does not fit the slots is a [`CallError::Protocol`].
    pub(crate) async fn pull_dense(
        &self,
        port: u16,
        req: pb::PullDenseRequest,
        slots: &mut [Slot<'_>],
    ) -> Result<(), CallError> {
        let encoding = req.encoding();
        let request = pb::LinkRequest {
            request: Some(pb::link_request::Request::PullDense(req)),
            payload_bytes: vec![],
        };
        let (mut conn, reply) = self.exchange(port, &request, &[]).await?;
        for piece in &reply.pieces {
            // A reply this worker cannot place: the connection is dropped with the rest of it.
            let slot = Slot::find(slots, &piece.tensor, piece.partition)?;
            if piece.len != slot.dst.len() as u64 {
                return Err(CallError::Protocol(format!(
                    "`{}` partition {}: {} values in the reply, the piece has {}",
                    piece.tensor,
                    piece.partition,
                    piece.len,
                    slot.dst.len()
                )));
            }
            if encoding == pb::ValueEncoding::F32 {
                read_f32s(&mut conn.r, slot.dst)
                    .await
                    .map_err(|e| self.broken("reading pulled values", e))?;
            } else {
                let n = slot.dst.len() * codec::value_bytes(encoding);
                let bytes = read_payload(&mut conn.r, n)
                    .await
                    .map_err(|e| self.broken("reading pulled values", e))?;
                codec::copy_values(slot.dst, &bytes, encoding);
            }
            slot.filled = piece.len;
        }
        self.put_back(conn);
        Ok(())
    }

    /// Sends one sparse pull; the reply as gRPC's would be.
    pub(crate) async fn pull_sparse(
        &self,
        port: u16,
        req: pb::PullSparseRequest,
    ) -> Result<pb::PullSparseResponse, Status> {
        let value_bytes = codec::value_bytes(req.encoding());
        let request = pb::LinkRequest {
            request: Some(pb::link_request::Request::PullSparse(req)),
            payload_bytes: vec![],
        };
        let (mut conn, reply) = self.exchange(port, &request, &[]).await?;
        let mut tables = Vec::with_capacity(reply.pieces.len());
        for piece in &reply.pieces {
            let n = usize::try_from(piece.len)
                .ok()
                .and_then(|n| n.checked_mul(value_bytes))
                .filter(|&n| n <= link::MAX_HEADER_BYTES.max(self.transport.max_message_bytes))
                .ok_or_else(|| {
                    self.idle.lock().unwrap().clear();
                    Status::internal(format!(
                        "tensor link: {} values of `{}` is more than a reply may hold",
                        piece.len, piece.tensor
                    ))
                })?;
            let values =
                read_payload(&mut conn.r, n).await.map_err(|e| self.broken("reading pulled rows", e))?;
            tables.push(pb::SparseRows { table: piece.tensor.clone(), values: values.freeze() });
        }
        self.put_back(conn);
        Ok(pb::PullSparseResponse { tables, version: reply.version })
    }

    /// An I/O failure mid-request: the connection is gone, and the idle ones are suspect.
    fn broken(&self, what: &str, e: std::io::Error) -> Status {
        self.idle.lock().unwrap().clear();
        unavailable(what, e)
    }
}

/// A push for the tensor link: one request whose message has its byte fields empty, and their
/// contents in message order (see `LinkRequest`), borrowed from the staged gradients. Built
/// once per step, whatever the retries.
pub(crate) fn push_request<'a>(push: &Push<'a>) -> (pb::LinkRequest, Vec<&'a [u8]>) {
    let staged = push.staged;
    let mut payload = Vec::with_capacity(staged.dense.len() + 2 * staged.sparse.len());
    let dense = staged
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
    let sparse = staged
        .sparse
        .iter()
        .map(|g| {
            payload.push(g.ids.as_ref());
            payload.push(g.values.as_ref());
            pb::SparseGrad { table: g.table.clone(), ids: Bytes::new(), values: Bytes::new() }
        })
        .collect();
    let push = pb::PushRequest {
        worker: push.worker,
        step: push.step,
        dense,
        sparse,
        task: push.task,
        encoding: push.encoding as i32,
    };
    let request = pb::LinkRequest {
        request: Some(pb::link_request::Request::Push(push)),
        payload_bytes: payload.iter().map(|p| p.len() as u64).collect(),
    };
    (request, payload)
}

async fn read_reply(conn: &mut Conn) -> Result<pb::LinkReply, Status> {
    match read_header::<pb::LinkReply, _>(&mut conn.r).await {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(Status::unavailable("tensor link: the server closed the connection")),
        Err(e) => Err(unavailable("reading the reply", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_addresses() {
        assert_eq!(host_of("127.0.0.1:5000"), "127.0.0.1");
        assert_eq!(host_of("http://ps-0.job:5000"), "ps-0.job");
        assert_eq!(host_of("https://ps-0.job:5000/"), "ps-0.job");
        assert_eq!(host_of("[::1]:5000"), "[::1]");
        assert_eq!(host_of("localhost"), "localhost");
    }
}
