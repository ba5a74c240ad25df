//! Pushes and pulls over gRPC: the other transport behind [`Route`](super::Route), taken
//! where a shard offers no tensor link (TLS, `transport.tensor_link = false`).
//!
//! A push is a client stream of messages of at most about `transport.chunk_bytes` of payload
//! each, sharing the staged gradients' bytes (not copying them); a dense pull's chunks are
//! copied into their places in the caller's buffers as they arrive.

use futures::stream;
use gradflow_proto::{codec, pb};

use super::{Client, Push, Slot};
use crate::retry::CallError;

/// Sends one push as a client stream; returns the version the shard answered.
pub(crate) async fn push(client: &Client, push: &Push<'_>) -> Result<u64, CallError> {
    let reply = client.clone().push(stream::iter(pack(push))).await?;
    Ok(reply.into_inner().version)
}

/// Packs staged gradients into gRPC push messages of at most about `max_payload` bytes each
/// (the bytes are shared, not copied); the first carries the task progress.
fn pack(push: &Push<'_>) -> Vec<pb::PushRequest> {
    let (worker, step, max) = (push.worker, push.step, push.max_payload);
    let encoding = push.encoding as i32;
    let new = || pb::PushRequest { worker, step, encoding, ..Default::default() };
    let mut msgs = vec![pb::PushRequest { task: push.task, ..new() }];
    let mut size = 0;
    for d in &push.staged.dense {
        if size > 0 && size + d.data.len() > max {
            msgs.push(new());
            size = 0;
        }
        size += d.data.len();
        msgs.last_mut().unwrap().dense.push(d.clone());
    }
    for s in &push.staged.sparse {
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

/// One shard's part of a dense pull: chunks copied into their slots.
pub(crate) async fn pull_dense(
    client: &Client,
    req: pb::PullDenseRequest,
    slots: &mut [Slot<'_>],
) -> Result<(), CallError> {
    let encoding = req.encoding();
    let mut chunks = client.clone().pull_dense(req).await?.into_inner();
    while let Some(chunk) = chunks.message().await? {
        let slot = Slot::find(slots, &chunk.tensor, chunk.partition)?;
        let Some(n) = codec::value_len(&chunk.data, encoding) else {
            return Err(CallError::Protocol(format!(
                "chunk of `{}` is not whole {} values",
                chunk.tensor,
                codec::encoding_name(encoding)
            )));
        };
        if chunk.offset.checked_add(n as u64).is_none_or(|end| end > slot.dst.len() as u64) {
            return Err(CallError::Protocol(format!("chunk of `{}` runs past its partition", chunk.tensor)));
        }
        let start = chunk.offset as usize;
        codec::copy_values(&mut slot.dst[start..start + n], &chunk.data, encoding);
        slot.filled += n as u64;
    }
    Ok(())
}

/// One sparse pull.
pub(crate) async fn pull_sparse(
    client: &Client,
    req: pb::PullSparseRequest,
) -> Result<pb::PullSparseResponse, CallError> {
    Ok(client.clone().pull_sparse(req).await?.into_inner())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::step::Staged;

    #[test]
    fn pushes_are_packed_in_bounded_messages_sharing_the_bytes() {
        let data = Bytes::from(vec![0u8; 600]);
        let slice = |offset| pb::DenseSlice { tensor: "w".into(), partition: 0, offset, data: data.clone() };
        let staged = Staged { dense: vec![slice(0), slice(150), slice(300)], sparse: vec![] };
        let task = Some(pb::TaskProgress { lease: 3, examples: 10 });
        let push = Push::new(1, 7, &staged, task, 1000, pb::ValueEncoding::F32);
        let msgs = pack(&push);
        assert_eq!(msgs.len(), 3, "600 + 600 > 1000: one slice a message");
        assert_eq!(msgs[0].task, task, "the first message carries the task");
        assert!(msgs[1..].iter().all(|m| m.task.is_none() && m.worker == 1 && m.step == 7));
        assert_eq!(msgs[2].dense[0].data.as_ptr(), data.as_ptr(), "shared, not copied");
    }
}
