//! The tensor link's framing, shared by servers and workers.
//!
//! The tensor link is a plain TCP connection beside gRPC that carries pushes and pulls
//! (see `LinkRequest` in `proto/gradflow.proto`). A frame is a little-endian `u32` header
//! length, a protobuf header, then raw payload bytes whose lengths the header gives. Tensor
//! bytes are written from where they lie and read into where they belong: no HTTP/2 frames
//! to gather, no protobuf buffer to encode into.
//!
//! Errors travel as gRPC statuses ([`reply_of`], [`status_of`]), so that a worker handles a
//! refusal the same way whichever path the request took.

use std::collections::HashMap;
use std::io;

use bytes::BytesMut;
use prost::Message;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tonic::metadata::{KeyAndValueRef, MetadataKey, MetadataValue};
use tonic::{Code, Status};

use crate::pb;

/// Largest header accepted: names, ids of a sparse pull and lengths, never tensor bytes.
pub const MAX_HEADER_BYTES: usize = 64 << 20;

/// Largest hello accepted: a token (at most 1024 characters, see
/// [`Token::new`](crate::auth::Token::new)) and a worker index, with room to spare. A server
/// reads nothing larger from a peer that has not authenticated yet.
pub const MAX_HELLO_BYTES: usize = 4 << 10;

/// Below this many payload bytes, header and payload go out in one write.
const COALESCE_BYTES: usize = 256 << 10;

/// Readies a link socket: no Nagle delay, and TCP keepalive probes and a user timeout from
/// `transport`'s keepalive settings, so that a connection to a peer that vanished (a killed
/// host, a cut network) fails instead of waiting for ever.
pub fn tune(stream: &tokio::net::TcpStream, transport: &crate::TransportConfig) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = socket2::SockRef::from(stream);
    let probes = 3;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(transport.keepalive_interval)
        .with_interval((transport.keepalive_timeout / probes).max(std::time::Duration::from_secs(1)))
        .with_retries(probes);
    sock.set_tcp_keepalive(&keepalive)?;
    #[cfg(target_os = "linux")]
    sock.set_tcp_user_timeout(Some(transport.keepalive_interval + transport.keepalive_timeout))?;
    Ok(())
}

/// Writes one frame: `header`, then each payload slice as it is.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    header: &impl Message,
    payload: &[&[u8]],
) -> io::Result<()> {
    let header_len = header.encoded_len();
    let total: usize = payload.iter().map(|p| p.len()).sum();
    let inline = if total < COALESCE_BYTES { total } else { 0 };
    let mut head = Vec::with_capacity(4 + header_len + inline);
    head.extend_from_slice(&(header_len as u32).to_le_bytes());
    header.encode(&mut head).expect("a Vec grows as needed");
    if inline == total {
        for p in payload {
            head.extend_from_slice(p);
        }
        w.write_all(&head).await?;
    } else {
        w.write_all(&head).await?;
        for p in payload {
            w.write_all(p).await?;
        }
    }
    w.flush().await
}

/// Reads the header of the next frame; `None` when the peer closed the connection cleanly
/// before it.
pub async fn read_header<M: Message + Default, R: AsyncBufRead + Unpin>(r: &mut R) -> io::Result<Option<M>> {
    // A clean close is an end of stream before the first byte of a frame.
    if r.fill_buf().await?.is_empty() {
        return Ok(None);
    }
    let len = r.read_u32_le().await? as usize;
    if len > MAX_HEADER_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("tensor link header of {len} bytes; expected at most {MAX_HEADER_BYTES}"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    M::decode(buf.as_slice()).map(Some).map_err(|e| {
        io::Error::new(io::ErrorKind::InvalidData, format!("tensor link header does not decode: {e}"))
    })
}

/// Reads a connection's hello, the first frame a client sends, straight from the socket: its
/// length is checked against [`MAX_HELLO_BYTES`] before anything is allocated, so that a peer
/// that has not authenticated cannot make the server buffer more than that. `None` when the
/// peer closed the connection before the first byte.
pub async fn read_hello<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<pb::LinkHello>> {
    let mut len = [0u8; 4];
    let first = r.read(&mut len).await?;
    if first == 0 {
        return Ok(None);
    }
    r.read_exact(&mut len[first..]).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_HELLO_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("tensor link hello of {len} bytes; expected at most {MAX_HELLO_BYTES}"),
        ));
    }
    let mut buf = [0u8; MAX_HELLO_BYTES];
    r.read_exact(&mut buf[..len]).await?;
    pb::LinkHello::decode(&buf[..len]).map(Some).map_err(|e| {
        io::Error::new(io::ErrorKind::InvalidData, format!("tensor link hello does not decode: {e}"))
    })
}

/// Reads exactly `n` payload bytes into a buffer of their own, without zeroing it first.
pub async fn read_payload<R: AsyncRead + Unpin>(r: &mut R, n: usize) -> io::Result<BytesMut> {
    let mut buf = BytesMut::new();
    read_payload_into(r, &mut buf, n).await?;
    Ok(buf)
}

/// Reads exactly `n` payload bytes into `buf` (emptied first), reusing its allocation when
/// it is large enough: a fresh buffer of many MiB costs a page fault per 4 KiB.
pub async fn read_payload_into<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    n: usize,
) -> io::Result<()> {
    buf.clear();
    read_payload_more(r, buf, n).await
}

/// Reads exactly `n` more payload bytes onto the end of `buf`, without zeroing them first.
pub async fn read_payload_more<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    n: usize,
) -> io::Result<()> {
    buf.reserve(n);
    let end = buf.len() + n;
    let mut limited = r.take(n as u64);
    while buf.len() < end {
        if limited.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

/// Reads and drops `n` payload bytes (the payload of a request that is refused anyway).
pub async fn skip_payload<R: AsyncRead + Unpin>(r: &mut R, n: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut r.take(n), &mut tokio::io::sink()).await?;
    if copied < n { Err(io::ErrorKind::UnexpectedEof.into()) } else { Ok(()) }
}

/// Reads `dst.len()` little-endian `f32` values straight into `dst`.
pub async fn read_f32s<R: AsyncRead + Unpin>(r: &mut R, dst: &mut [f32]) -> io::Result<()> {
    if cfg!(target_endian = "little") {
        r.read_exact(bytemuck::cast_slice_mut(dst)).await?;
    } else {
        let mut buf = vec![0u8; dst.len() * 4];
        r.read_exact(&mut buf).await?;
        crate::codec::copy_f32s(dst, &buf);
    }
    Ok(())
}

/// The reply that carries `status` (its code, message and ASCII metadata).
pub fn reply_of(status: &Status) -> pb::LinkReply {
    let mut metadata = HashMap::new();
    for kv in status.metadata().iter() {
        if let KeyAndValueRef::Ascii(k, v) = kv
            && let Ok(v) = v.to_str()
        {
            metadata.insert(k.as_str().to_string(), v.to_string());
        }
    }
    pb::LinkReply {
        code: status.code() as i32,
        message: status.message().to_string(),
        metadata,
        ..Default::default()
    }
}

/// The status a reply carries; `None` for success.
pub fn status_of(reply: &pb::LinkReply) -> Option<Status> {
    let code = Code::from_i32(reply.code);
    if code == Code::Ok {
        return None;
    }
    let mut status = Status::new(code, reply.message.clone());
    for (k, v) in &reply.metadata {
        if let (Ok(k), Ok(v)) = (MetadataKey::from_bytes(k.as_bytes()), MetadataValue::try_from(v.as_str())) {
            status.metadata_mut().insert(k, v);
        }
    }
    Some(status)
}

/// Total payload bytes of a request, or `None` if the lengths overflow.
pub fn payload_total(lengths: &[u64]) -> Option<u64> {
    lengths.iter().try_fold(0u64, |sum, &n| sum.checked_add(n))
}

#[cfg(test)]
mod tests {
    use tokio::io::BufReader;

    use super::*;

    #[tokio::test]
    async fn a_frame_reads_back_as_written() {
        for payload_len in [0usize, 100, 1 << 20] {
            let header = pb::LinkPiece { tensor: "w".into(), partition: 3, len: payload_len as u64 };
            let payload: Vec<u8> = (0..payload_len).map(|i| i as u8).collect();
            let (a, b) = payload.split_at(payload_len / 3);
            let mut wire = Vec::new();
            write_frame(&mut wire, &header, &[a, b]).await.unwrap();
            let mut r = BufReader::new(wire.as_slice());
            let got: pb::LinkPiece = read_header(&mut r).await.unwrap().unwrap();
            assert_eq!(got, header);
            let body = read_payload(&mut r, payload_len).await.unwrap();
            assert_eq!(&body[..], &payload[..]);
            assert!(read_header::<pb::LinkPiece, _>(&mut r).await.unwrap().is_none(), "clean end");
        }
    }

    #[tokio::test]
    async fn truncated_and_oversized_frames_are_errors() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &pb::LinkHello { token: "t".into(), worker: 1 }, &[&[1, 2, 3]]).await.unwrap();
        // Cut inside the header.
        let mut r = BufReader::new(&wire[..5]);
        assert!(read_header::<pb::LinkHello, _>(&mut r).await.is_err());
        // Cut inside the payload.
        let mut r = BufReader::new(&wire[..wire.len() - 1]);
        read_header::<pb::LinkHello, _>(&mut r).await.unwrap().unwrap();
        assert_eq!(read_payload(&mut r, 3).await.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        // A header length past the limit is refused before anything is allocated.
        let huge = ((MAX_HEADER_BYTES + 1) as u32).to_le_bytes();
        let mut r = BufReader::new(&huge[..]);
        let e = read_header::<pb::LinkHello, _>(&mut r).await.unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
    }

    #[tokio::test]
    async fn a_hello_is_read_within_its_bound() {
        let hello = pb::LinkHello { token: "t".repeat(1024), worker: u32::MAX };
        let mut wire = Vec::new();
        write_frame(&mut wire, &hello, &[]).await.unwrap();
        assert_eq!(read_hello(&mut wire.as_slice()).await.unwrap(), Some(hello));
        assert_eq!(read_hello(&mut &[][..]).await.unwrap(), None, "a close before the first byte");
        assert!(read_hello(&mut &wire[..3]).await.is_err(), "cut inside the length");
        // A length past the bound is refused from the 4 bytes that announce it.
        let huge = ((MAX_HELLO_BYTES + 1) as u32).to_le_bytes();
        let e = read_hello(&mut &huge[..]).await.unwrap_err();
        assert!(e.to_string().contains("at most 4096"), "{e}");
    }

    #[tokio::test]
    async fn f32s_land_in_place() {
        let values = [1.5f32, -2.0, 3.25];
        let mut wire = Vec::new();
        crate::codec::extend_f32s(&mut wire, &values);
        let mut dst = [0f32; 3];
        read_f32s(&mut wire.as_slice(), &mut dst).await.unwrap();
        assert_eq!(dst, values);
    }

    #[test]
    fn statuses_round_trip_with_metadata() {
        let mut s = Status::failed_precondition("stale");
        s.metadata_mut().insert("x-gradflow-version", 42u64.into());
        let back = status_of(&reply_of(&s)).unwrap();
        assert_eq!(back.code(), Code::FailedPrecondition);
        assert_eq!(back.message(), "stale");
        assert_eq!(back.metadata().get("x-gradflow-version").unwrap(), "42");
        assert!(status_of(&pb::LinkReply::default()).is_none());
        assert_eq!(payload_total(&[u64::MAX, 1]), None);
        assert_eq!(payload_total(&[2, 3]), Some(5));
    }
}
