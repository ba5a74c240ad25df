//! The tensor link adapter: pushes and pulls over plain TCP, beside gRPC, over the shard core.
//!
//! A sibling of the gRPC service (`service.rs`), not a client of it: each request is decoded
//! once into the core's domain types and handed to the [`Shard`] (`shard.rs`), which does
//! what it does for gRPC. Each connection authenticates once (`LinkHello`, the job token),
//! then carries one request at a time. A push's payload is read from the socket into one
//! buffer, and the [`Push`] handed to [`Shard::push`] holds slices of that buffer
//! ([`decode_push`]): validation, all-or-nothing and the sync/async rules are the core's. A
//! dense pull's reply is written from the pieces' values themselves. A connection that breaks
//! mid-request leaves the model as it was: nothing of a push is taken before all of it has
//! arrived. The link counts its own connections (`link_connections`, `link_refused`); the
//! core counts the requests.
//!
//! Until a peer has authenticated, the server holds at most a hello's bound
//! ([`link::MAX_HELLO_BYTES`]) for it, and for at most [`HELLO_TIMEOUT`]. After that, a push's
//! announced lengths are checked against the model before any payload is read.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use gradflow_proto::auth::ServerAuth;
use gradflow_proto::link::{self, read_header, read_hello, read_payload_more, skip_payload, write_frame};
use gradflow_proto::{codec, pb};
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tonic::Status;
use tracing::debug;

use crate::PsError;
use crate::encoding::{encoding_of, widen};
use crate::model::ShardModel;
use crate::push::{DenseGrad, Push, SparseGrad, TaskProgress};
use crate::shard::{Shard, TableIds};

/// Bytes the connection's reader buffers; larger payloads are read straight into place.
const READ_BUFFER: usize = 64 << 10;

/// A push's gradient bytes are checked for NaN in blocks of this many as they arrive, while
/// the block is still in the processor's cache (a multiple of 4: blocks split no `f32`).
const CHECK_BLOCK: usize = 512 << 10;

/// A connection that has not sent a whole hello this long after it was accepted is dropped
/// (whether it sends nothing or trickles bytes).
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// A refused push's payload is read past (keeping the connection in step, so that the worker
/// hears why) only up to this many times the most the shard would take; a peer announcing
/// more is answered at once and disconnected.
const SKIP_FACTOR: u64 = 4;

/// Accepts connections until `stop` says so.
pub(crate) async fn serve(shard: Arc<Shard>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
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
        let (shard, stop) = (shard.clone(), stop.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(shard, stream, stop).await {
                debug!(%peer, error = %e, "tensor link connection ended");
            }
        });
    }
}

async fn connection(
    shard: Arc<Shard>,
    stream: TcpStream,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    link::tune(&stream, &shard.config.transport)?;
    let (mut r, mut w) = stream.into_split();
    let metrics = &shard.metrics;
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, read_hello(&mut r)).await {
        Ok(Ok(Some(hello))) => hello,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => {
            metrics.link_refused.inc();
            if e.kind() == std::io::ErrorKind::InvalidData {
                let status = Status::invalid_argument(e.to_string());
                write_frame(&mut w, &link::reply_of(&status), &[]).await?;
            }
            return Err(e);
        }
        Err(_) => {
            metrics.link_refused.inc();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no hello within {HELLO_TIMEOUT:?}"),
            ));
        }
    };
    let token = (!hello.token.is_empty()).then_some(hello.token.as_bytes());
    if let Err(status) = ServerAuth::new(shard.config.token.clone()).check(token) {
        metrics.link_refused.inc();
        return write_frame(&mut w, &link::reply_of(&status), &[]).await;
    }
    write_frame(&mut w, &pb::LinkReply::default(), &[]).await?;
    metrics.link_connections.inc();
    let mut r = BufReader::with_capacity(READ_BUFFER, r);
    // The last push's payload, whose buffer the next push reuses if nothing holds a part of
    // it by then (a sync step holds a push's pieces as received until the step is applied).
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
                let reply = match push_payload(&shard, &msg, &lengths).map_err(|e| (e, skip_limit(&shard))) {
                    Ok(total) => {
                        let mut buf: BytesMut =
                            last.take().and_then(|b| b.try_into_mut().ok()).unwrap_or_default();
                        let check = shard.config.settings.reject_non_finite;
                        let bad = read_push_payload(&mut r, &mut buf, &msg, &lengths, total, check).await?;
                        // A compact push's values become f32 here, once (its lengths were checked).
                        let payload = buf.freeze();
                        let result = match bad {
                            None => match decode_push(msg, &lengths, payload.clone()) {
                                Ok(push) => shard.push(push, started).await,
                                Err(e) => Err(shard.refuse_push(e, started)),
                            },
                            Some(name) => Err(shard.refuse_push(PsError::NonFinite(name), started)),
                        };
                        last = Some(payload);
                        match result {
                            Ok(version) => pb::LinkReply { version, ..Default::default() },
                            Err(e) => link::reply_of(&Status::from(e)),
                        }
                    }
                    Err((e, skip_limit)) => {
                        let e = shard.refuse_push(e, started);
                        // Answered before the payload is read: a peer that announced more than
                        // it sends hears why at once.
                        write_frame(&mut w, &link::reply_of(&Status::from(e)), &[]).await?;
                        // Then read past the payload, so that the connection stays in step;
                        // lengths that overflow, or far more than a push could be, are not.
                        match link::payload_total(&lengths).filter(|&t| t <= skip_limit) {
                            Some(total) => skip_payload(&mut r, total).await?,
                            None => return Ok(()),
                        }
                        continue;
                    }
                };
                write_frame(&mut w, &reply, &[]).await?;
            }
            Some(pb::link_request::Request::PullDense(req)) => pull_dense(&shard, req, &mut w).await?,
            Some(pb::link_request::Request::PullSparse(req)) => pull_sparse(&shard, req, &mut w).await?,
            None => {
                let status = Status::invalid_argument("tensor link request names no operation");
                write_frame(&mut w, &link::reply_of(&status), &[]).await?;
            }
        }
    }
}

/// Reads a push's payload of `total` bytes (segments of `lengths`, as [`decode_push`] assigns
/// them to `msg`'s slices and gradients) into `buf`. Where `check`, each gradient segment (a dense slice, a sparse
/// gradient's values; not its ids) is checked for values that are not finite as it arrives,
/// rather than in a second pass over the whole push from memory. Returns the tensor or table
/// of the first such value, dense slices first, as [`crate::push::non_finite`] names it.
///
/// `lengths` must have one entry per segment and add up to `total`, as [`push_lengths`] checks.
pub async fn read_push_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    msg: &pb::PushRequest,
    lengths: &[u64],
    total: usize,
    check: bool,
) -> std::io::Result<Option<String>> {
    buf.clear();
    buf.reserve(total);
    let encoding = msg.encoding();
    let gradients = msg.dense.iter().map(|d| Some(&d.tensor));
    let segments = gradients.chain(msg.sparse.iter().flat_map(|g| [None, Some(&g.table)]));
    let mut bad = None;
    for (&n, name) in lengths.iter().zip(segments) {
        let checked = if check && bad.is_none() { name } else { None };
        let mut left = n as usize;
        while left > 0 {
            let block = if checked.is_some() { left.min(CHECK_BLOCK) } else { left };
            let start = buf.len();
            read_payload_more(r, buf, block).await?;
            left -= block;
            if let Some(name) = checked
                && bad.is_none()
                && !codec::all_finite_values(&buf[start..], encoding)
            {
                bad = Some(name.clone());
            }
        }
    }
    debug_assert_eq!(buf.len(), total, "push_lengths checks the lengths before the payload is read");
    Ok(bad)
}

/// Checks a push's payload lengths before any of it is read, against the shard's model:
/// the total (see [`push_lengths`]) and each segment against what its tensor or table needs.
fn push_payload(shard: &Shard, msg: &pb::PushRequest, lengths: &[u64]) -> Result<usize, PsError> {
    let model = shard.model()?;
    let total = push_lengths(msg, lengths, push_limit(&shard.config, Some(&model)))?;
    segment_lengths(&model, msg, lengths)?;
    Ok(total)
}

/// The most payload bytes a push to this shard may announce: its dense bytes, which a push
/// covers once, plus the transport's message limit for sparse gradients (only the latter
/// before a model is declared).
fn push_limit(config: &crate::ServerConfig, model: Option<&ShardModel>) -> u64 {
    let dense = model.map_or(0, |m| m.dense_bytes());
    dense.saturating_add(config.transport.max_message_bytes as u64)
}

/// The most payload bytes of a refused push that are read past rather than cut off.
fn skip_limit(shard: &Shard) -> u64 {
    let model = shard.model().ok();
    push_limit(&shard.config, model.as_deref()).saturating_mul(SKIP_FACTOR)
}

/// Checks each announced segment against what it carries: a dense slice at most its piece's
/// bytes and whole `f32`s, a sparse gradient whole `u64` ids and `dim` floats per id.
/// `lengths` has one entry per segment ([`push_lengths`] checked).
pub fn segment_lengths(model: &ShardModel, msg: &pb::PushRequest, lengths: &[u64]) -> Result<(), PsError> {
    let encoding = encoding_of(msg.encoding)?;
    let size = codec::value_bytes(encoding) as u64;
    let (dense, sparse) = lengths.split_at(msg.dense.len());
    for (d, &n) in msg.dense.iter().zip(dense) {
        let piece = &model.pieces()[model.piece(&d.tensor, d.partition)?];
        let room = (piece.len() as u64).saturating_sub(d.offset).saturating_mul(size);
        if n % size != 0 || n > room {
            return Err(PsError::InvalidArgument(format!(
                "tensor link push announces {n} bytes for `{}` partition {} from element {}; \
                 expected a whole number of {} values, at most {room} bytes",
                d.tensor,
                d.partition,
                d.offset,
                codec::encoding_name(encoding)
            )));
        }
    }
    for (g, n) in msg.sparse.iter().zip(sparse.chunks(2)) {
        let dim = model.tables()[model.table(&g.table)?].dim() as u64;
        let (ids, values) = (n[0], n[1]);
        let expected = (ids / 8).checked_mul(dim * size);
        if ids % 8 != 0 || expected != Some(values) {
            return Err(PsError::InvalidArgument(format!(
                "tensor link push announces {ids} bytes of ids and {values} bytes of values for \
                 sparse table `{}` (dim {dim}); expected whole u64 ids and {} value bytes for them",
                g.table,
                expected.map_or("more".to_string(), |e| e.to_string())
            )));
        }
    }
    Ok(())
}

/// Checks a push's payload lengths: one per dense slice and two per sparse gradient, adding
/// up to at most `limit` bytes (a shard's dense bytes, which a push covers once, plus the
/// transport's message limit for sparse gradients), and its value encoding. Returns the total.
pub fn push_lengths(msg: &pb::PushRequest, lengths: &[u64], limit: u64) -> Result<usize, PsError> {
    encoding_of(msg.encoding)?;
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

/// Decodes a push from its header and payload: each dense slice and sparse gradient gets its
/// segment of `payload` (a slice of the buffer, not a copy; values in a compact encoding are
/// widened to f32, and refused where they are not whole values). `lengths` must have passed
/// [`push_lengths`] and `payload` must hold exactly their total.
pub fn decode_push(msg: pb::PushRequest, lengths: &[u64], payload: Bytes) -> Result<Push, PsError> {
    let encoding = msg.encoding();
    let mut at = 0usize;
    let mut lengths = lengths.iter();
    let mut next = || {
        let n = *lengths.next().expect("checked: one length per segment") as usize;
        let segment = payload.slice(at..at + n);
        at += n;
        segment
    };
    let dense = msg
        .dense
        .into_iter()
        .map(|d| {
            let data = widen(next(), encoding, &d.tensor)?;
            Ok(DenseGrad { tensor: d.tensor, partition: d.partition, offset: d.offset, data })
        })
        .collect::<Result<_, PsError>>()?;
    let sparse = msg
        .sparse
        .into_iter()
        .map(|g| {
            let ids = next();
            let values = widen(next(), encoding, &g.table)?;
            Ok(SparseGrad { table: g.table, ids, values })
        })
        .collect::<Result<_, PsError>>()?;
    Ok(Push {
        worker: msg.worker,
        step: msg.step,
        task: msg.task.map(|t| TaskProgress { lease: t.lease, examples: t.examples }),
        dense,
        sparse,
    })
}

/// Answers a dense pull: the piece list, then every piece's values as they are.
async fn pull_dense<W: AsyncWrite + Unpin>(
    shard: &Shard,
    req: pb::PullDenseRequest,
    w: &mut W,
) -> std::io::Result<()> {
    let pieces = req.pieces.iter().map(|p| (p.tensor.as_str(), p.partition));
    let read = match encoding_of(req.encoding) {
        Ok(_) => shard.pull_dense(req.worker, req.step, pieces).await,
        Err(e) => Err(e),
    };
    let read = match read {
        Ok(r) => r,
        Err(e) => return write_frame(w, &link::reply_of(&Status::from(e)), &[]).await,
    };
    let encoding = req.encoding();
    let mut header = pb::LinkReply { version: read.version(), ..Default::default() };
    let mut values = Vec::with_capacity(read.pieces().len());
    for piece in read.pieces() {
        header.pieces.push(pb::LinkPiece {
            tensor: piece.tensor().to_string(),
            partition: piece.partition(),
            len: piece.len() as u64,
        });
        values.push(codec::narrow(piece.read(0, piece.len()), encoding));
    }
    let payload: Vec<&[u8]> = values.iter().map(|v| v.as_ref()).collect();
    write_frame(w, &header, &payload).await?;
    read.sent(header.pieces.iter().map(|p| p.len * 4).sum());
    Ok(())
}

/// Answers a sparse pull: one entry per table, then the tables' rows.
async fn pull_sparse<W: AsyncWrite + Unpin>(
    shard: &Shard,
    req: pb::PullSparseRequest,
    w: &mut W,
) -> std::io::Result<()> {
    let encoding = req.encoding();
    let tables = req.tables.into_iter().map(|t| TableIds { table: t.table, ids: t.ids }).collect();
    let rows = match encoding_of(req.encoding) {
        Ok(_) => shard.pull_sparse(req.worker, req.step, tables).await,
        Err(e) => Err(e),
    };
    let (rows, version) = match rows {
        Ok(t) => t,
        Err(e) => return write_frame(w, &link::reply_of(&Status::from(e)), &[]).await,
    };
    let pieces = rows
        .iter()
        .map(|t| pb::LinkPiece { tensor: t.table.clone(), partition: 0, len: t.values.len() as u64 / 4 })
        .collect();
    let values: Vec<Bytes> = rows.into_iter().map(|t| codec::narrow(t.values, encoding)).collect();
    let payload: Vec<&[u8]> = values.iter().map(|v| v.as_ref()).collect();
    write_frame(w, &pb::LinkReply { version, pieces, ..Default::default() }, &payload).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A push of dense slices of `sizes` floats then one sparse gradient of 3 ids of dim 2,
    /// with the payload as the worker would send it; values all 1.
    fn push(sizes: &[usize]) -> (pb::PushRequest, Vec<u64>, Vec<u8>) {
        let mut msg = pb::PushRequest::default();
        let (mut lengths, mut payload) = (Vec::new(), Vec::new());
        for (k, &n) in sizes.iter().enumerate() {
            msg.dense.push(pb::DenseSlice { tensor: format!("t{k}"), ..Default::default() });
            lengths.push(n as u64 * 4);
            codec::extend_f32s(&mut payload, &vec![1.0; n]);
        }
        msg.sparse.push(pb::SparseGrad { table: "emb".into(), ..Default::default() });
        lengths.extend([24, 24]);
        payload.extend(codec::u64s_to_bytes(&[1, 2, 3]));
        codec::extend_f32s(&mut payload, &[1.0; 6]);
        (msg, lengths, payload)
    }

    /// A reader that hands over at most `step` bytes per read, as a socket may.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let n = self.step.min(self.data.len()).min(buf.remaining());
            let (head, rest) = self.data.split_at(n);
            buf.put_slice(head);
            self.data = rest;
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// The payload read by `read_push_payload`, in one read and in reads of an odd size that
    /// straddle floats and blocks; both must name what the whole-push check names.
    async fn read(msg: &pb::PushRequest, lengths: &[u64], payload: &[u8], check: bool) -> Option<String> {
        let mut found = Vec::new();
        for step in [usize::MAX, 4093] {
            let mut buf = BytesMut::new();
            let mut r = Trickle { data: payload, step };
            let bad = read_push_payload(&mut r, &mut buf, msg, lengths, payload.len(), check).await.unwrap();
            assert_eq!(&buf[..], payload, "the payload is read whole, bad values or not");
            if check {
                let whole = decode_push(msg.clone(), lengths, Bytes::copy_from_slice(payload)).unwrap();
                assert_eq!(
                    bad.as_deref(),
                    crate::push::non_finite(&whole.dense, &whole.sparse),
                    "as the whole-push check names it"
                );
            }
            found.push(bad);
        }
        assert_eq!(found[0], found[1], "the same however the bytes arrive");
        found.pop().unwrap()
    }

    fn put(payload: &mut [u8], at: usize, v: f32) {
        payload[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    #[tokio::test]
    async fn a_push_payload_is_checked_for_nan_as_it_arrives_and_the_first_bad_gradient_named() {
        // A slice of several check blocks, so that a bad value in a later block is found too.
        let big = 3 * CHECK_BLOCK / 4 + 5;
        let (msg, lengths, clean) = push(&[7, big]);
        assert_eq!(read(&msg, &lengths, &clean, true).await, None);

        let mut p = clean.clone();
        put(&mut p, 28 + 2 * CHECK_BLOCK + 8, f32::NAN);
        assert_eq!(read(&msg, &lengths, &p, true).await.as_deref(), Some("t1"));
        assert_eq!(read(&msg, &lengths, &p, false).await, None, "not checked when not asked");

        // At the edges of the check blocks: the last float of the first block, the first of
        // the second, the last of the short block at the end of the slice.
        for at in [CHECK_BLOCK - 4, CHECK_BLOCK, 3 * CHECK_BLOCK + 16] {
            let mut p = clean.clone();
            put(&mut p, 28 + at, f32::NAN);
            assert_eq!(read(&msg, &lengths, &p, true).await.as_deref(), Some("t1"), "NaN at byte {at} of t1");
        }

        // The first dense slice is named before a later one, and before a sparse table.
        put(&mut p, 4, f32::INFINITY);
        let sparse_values = clean.len() - 24;
        put(&mut p, sparse_values + 4, f32::NEG_INFINITY);
        assert_eq!(read(&msg, &lengths, &p, true).await.as_deref(), Some("t0"));

        // Sparse values are checked, sparse ids are not (an id's bytes are not a float).
        let mut p = clean.clone();
        put(&mut p, sparse_values + 20, f32::NAN);
        assert_eq!(read(&msg, &lengths, &p, true).await.as_deref(), Some("emb"));
        let mut p = clean.clone();
        put(&mut p, sparse_values - 24, f32::NAN);
        assert_eq!(read(&msg, &lengths, &p, true).await, None);

        // A payload cut short is an error, not a push.
        let mut buf = BytesMut::new();
        let mut r = &clean[..clean.len() - 1];
        let err = read_push_payload(&mut r, &mut buf, &msg, &lengths, clean.len(), true).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
