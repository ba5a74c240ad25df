//! The tensor link's server side: pushes and pulls over plain TCP, beside gRPC.
//!
//! Each connection authenticates once (`LinkHello`, the job token), then carries one request
//! at a time. A push's payload is read from the socket into one buffer and handed, as the
//! same messages a gRPC push would give, to the same [`Service::take_push`]: validation,
//! all-or-nothing and the sync/async rules are gRPC's. A dense pull's reply is written from
//! the pieces' values themselves. A connection that breaks mid-request leaves the model as
//! it was: nothing of a push is taken before all of it has arrived.

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use gradflow_proto::auth::ServerAuth;
use gradflow_proto::link::{self, read_header, read_payload_into, skip_payload, write_frame};
use gradflow_proto::pb;
use tokio::io::{AsyncWrite, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tonic::Status;
use tracing::debug;

use crate::PsError;
use crate::service::Service;

/// Bytes the connection's reader buffers; larger payloads are read straight into place.
const READ_BUFFER: usize = 64 << 10;

/// Accepts connections until `stop` says so.
pub(crate) async fn serve(service: Service, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "tensor link: accept failed");
                    continue;
                }
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let (service, stop) = (service.clone(), stop.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(service, stream, stop).await {
                debug!(%peer, error = %e, "tensor link connection ended");
            }
        });
    }
}

async fn connection(
    service: Service,
    stream: TcpStream,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    link::tune(&stream, &service.shard.config.transport)?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::with_capacity(READ_BUFFER, r);
    let Some(hello) = read_header::<pb::LinkHello, _>(&mut r).await? else { return Ok(()) };
    let token = (!hello.token.is_empty()).then_some(hello.token.as_bytes());
    if let Err(status) = ServerAuth::new(service.shard.config.token.clone()).check(token) {
        return write_frame(&mut w, &link::reply_of(&status), &[]).await;
    }
    write_frame(&mut w, &pb::LinkReply::default(), &[]).await?;
    service.shard.metrics.link_connections.inc();
    // The last push's payload, whose buffer the next push reuses if nothing holds a part of
    // it by then (a sync step keeps a lone push's pieces until the step is applied).
    let mut last: Option<Bytes> = None;
    loop {
        let request = tokio::select! {
            r = read_header::<pb::LinkRequest, _>(&mut r) => r?,
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        let Some(request) = request else { return Ok(()) };
        let started = Instant::now();
        match request.request {
            Some(pb::link_request::Request::Push(msg)) => {
                let lengths = request.payload_bytes;
                let reply = match push_payload(&service, &msg, &lengths) {
                    Ok(total) => {
                        let mut buf: BytesMut =
                            last.take().and_then(|b| b.try_into_mut().ok()).unwrap_or_default();
                        read_payload_into(&mut r, &mut buf, total).await?;
                        let payload = buf.freeze();
                        let msg = fill(msg, &lengths, payload.clone());
                        let received = service.non_finite(&msg).map_or(Ok(vec![msg]), Err);
                        let result = service.take_push(received, started).await;
                        last = Some(payload);
                        match result {
                            Ok(version) => pb::LinkReply { version, ..Default::default() },
                            Err(e) => link::reply_of(&Status::from(e)),
                        }
                    }
                    Err(e) => {
                        service.shard.metrics.observe_push(false, started.elapsed());
                        let reply = link::reply_of(&Status::from(e));
                        // Read past the payload, so that the connection stays in step and the
                        // worker hears why; lengths that overflow cannot be read past.
                        match link::payload_total(&lengths) {
                            Some(total) => skip_payload(&mut r, total).await?,
                            None => return write_frame(&mut w, &reply, &[]).await,
                        }
                        reply
                    }
                };
                write_frame(&mut w, &reply, &[]).await?;
            }
            Some(pb::link_request::Request::PullDense(req)) => {
                pull_dense(&service, req, started, &mut w).await?
            }
            Some(pb::link_request::Request::PullSparse(req)) => pull_sparse(&service, req, &mut w).await?,
            None => {
                let status = Status::invalid_argument("tensor link request names no operation");
                write_frame(&mut w, &link::reply_of(&status), &[]).await?;
            }
        }
    }
}

/// Checks a push's payload lengths before any of it is read, against the shard's model.
fn push_payload(service: &Service, msg: &pb::PushRequest, lengths: &[u64]) -> Result<usize, PsError> {
    let model = service.shard.model()?;
    push_lengths(msg, lengths, model.dense_bytes() + service.shard.config.transport.max_message_bytes as u64)
}

/// Checks a push's payload lengths: one per dense slice and two per sparse gradient, adding
/// up to at most `limit` bytes (a shard's dense bytes, which a push covers once, plus the
/// transport's message limit for sparse gradients). Returns the total.
pub fn push_lengths(msg: &pb::PushRequest, lengths: &[u64], limit: u64) -> Result<usize, PsError> {
    let segments = msg.dense.len() + 2 * msg.sparse.len();
    if lengths.len() != segments {
        return Err(PsError::InvalidArgument(format!(
            "tensor link push lists {} payload lengths for {} dense slices and {} sparse gradients; expected {segments}",
            lengths.len(),
            msg.dense.len(),
            msg.sparse.len()
        )));
    }
    let total = link::payload_total(lengths)
        .ok_or_else(|| PsError::InvalidArgument("tensor link push payload lengths overflow".into()))?;
    if total > limit {
        return Err(PsError::InvalidArgument(format!(
            "tensor link push of {total} bytes; this shard takes at most {limit} (its dense bytes plus transport.max_message_bytes)"
        )));
    }
    usize::try_from(total).map_err(|_| {
        PsError::InvalidArgument(format!("tensor link push of {total} bytes does not fit in memory"))
    })
}

/// Puts the payload's segments into the message's empty byte fields. `lengths` must have
/// passed [`push_lengths`] and `payload` must hold exactly their total.
pub fn fill(mut msg: pb::PushRequest, lengths: &[u64], payload: Bytes) -> pb::PushRequest {
    let mut at = 0usize;
    let mut lengths = lengths.iter();
    let mut next = || {
        let n = *lengths.next().expect("checked: one length per segment") as usize;
        let segment = payload.slice(at..at + n);
        at += n;
        segment
    };
    for d in &mut msg.dense {
        d.data = next();
    }
    for g in &mut msg.sparse {
        g.ids = next();
        g.values = next();
    }
    msg
}

/// Answers a dense pull: the piece list, then every piece's values as they are.
async fn pull_dense<W: AsyncWrite + Unpin>(
    service: &Service,
    req: pb::PullDenseRequest,
    started: Instant,
    w: &mut W,
) -> std::io::Result<()> {
    let (model, pieces, version) = match service.dense_pull(&req).await {
        Ok(p) => p,
        Err(e) => return write_frame(w, &link::reply_of(&Status::from(e)), &[]).await,
    };
    let mut header = pb::LinkReply { version, ..Default::default() };
    let mut values = Vec::with_capacity(pieces.len());
    for &i in &pieces {
        let piece = &model.pieces[i];
        header.pieces.push(pb::LinkPiece {
            tensor: piece.tensor.clone(),
            partition: piece.partition,
            len: piece.len as u64,
        });
        values.push(piece.read(0, piece.len));
    }
    let payload: Vec<&[u8]> = values.iter().map(|v| v.as_ref()).collect();
    write_frame(w, &header, &payload).await?;
    let metrics = &service.shard.metrics;
    metrics.bytes_sent.inc_by(payload.iter().map(|p| p.len() as u64).sum());
    metrics.observe_pull("dense", started.elapsed());
    Ok(())
}

/// Answers a sparse pull: one entry per table, then the tables' rows.
async fn pull_sparse<W: AsyncWrite + Unpin>(
    service: &Service,
    req: pb::PullSparseRequest,
    w: &mut W,
) -> std::io::Result<()> {
    let (tables, version) = match service.sparse_pull(req).await {
        Ok(t) => t,
        Err(e) => return write_frame(w, &link::reply_of(&Status::from(e)), &[]).await,
    };
    let pieces = tables
        .iter()
        .map(|t| pb::LinkPiece { tensor: t.table.clone(), partition: 0, len: t.values.len() as u64 / 4 })
        .collect();
    let payload: Vec<&[u8]> = tables.iter().map(|t| t.values.as_ref()).collect();
    write_frame(w, &pb::LinkReply { version, pieces, ..Default::default() }, &payload).await
}
