//! Checking a push whole before any of it is applied.
//!
//! A push arrives as a stream of messages. [`validate`] resolves every tensor and table name,
//! checks that the slices of each dense piece arrive in order and cover it exactly, that byte
//! lengths agree with the spec, and that sparse ids belong to this shard; [`non_finite`] finds
//! NaN and infinite values, which the server checks for (by default) on each message as it
//! arrives. Only a push that passes all of this is applied, so a refused push changes nothing.

use bytes::Bytes;
use gradflow_core::Placement;
use gradflow_proto::{codec, pb};

use crate::PsError;
use crate::model::ShardModel;

/// A push that passed validation, with names resolved to indices.
pub struct ValidPush {
    pub worker: u32,
    pub step: u64,
    /// (index into `ShardModel::pieces`, slices in element order covering the piece).
    pub dense: Vec<(usize, Vec<Bytes>)>,
    /// (index into `ShardModel::tables`, ids, gradient rows as little-endian bytes).
    pub sparse: Vec<(usize, Vec<u64>, Bytes)>,
    /// Gradient bytes received, for metrics.
    pub bytes: u64,
}

/// Validates the messages of one push stream against the shard's model.
pub fn validate(model: &ShardModel, msgs: Vec<pb::PushRequest>) -> Result<ValidPush, PsError> {
    let first = msgs
        .first()
        .ok_or_else(|| PsError::InvalidArgument("empty push stream: expected at least one message".into()))?;
    let (worker, step) = (first.worker, first.step);
    // Per local piece: (elements covered so far, slices).
    let mut dense: Vec<Option<(usize, Vec<Bytes>)>> = vec![None; model.pieces.len()];
    let mut order = Vec::new();
    let mut sparse = Vec::new();
    let mut bytes = 0u64;
    for msg in msgs {
        if msg.worker != worker || msg.step != step {
            return Err(PsError::InvalidArgument(format!(
                "push stream mixes worker/step: started as worker {worker} step {step}, then worker {} step {}",
                msg.worker, msg.step
            )));
        }
        for s in msg.dense {
            let idx = model.piece(&s.tensor, s.partition)?;
            let piece = &model.pieces[idx];
            let n = codec::f32_len(&s.data).ok_or_else(|| {
                PsError::InvalidArgument(format!(
                    "gradient of `{}` partition {}: {} bytes is not a whole number of f32 values",
                    s.tensor,
                    s.partition,
                    s.data.len()
                ))
            })?;
            let entry = dense[idx].get_or_insert_with(|| {
                order.push(idx);
                (0, Vec::new())
            });
            if s.offset != entry.0 as u64 {
                return Err(PsError::InvalidArgument(format!(
                    "gradient of `{}` partition {}: slice at element {}, expected the next slice at element {}",
                    s.tensor, s.partition, s.offset, entry.0
                )));
            }
            if entry.0 + n > piece.len {
                return Err(PsError::InvalidArgument(format!(
                    "gradient of `{}` partition {}: {} values, expected {}",
                    s.tensor,
                    s.partition,
                    entry.0 + n,
                    piece.len
                )));
            }
            bytes += s.data.len() as u64;
            entry.0 += n;
            entry.1.push(s.data);
        }
        for g in msg.sparse {
            let t = model.table(&g.table)?;
            let table = &model.tables[t];
            let n = codec::u64_len(&g.ids).ok_or_else(|| {
                PsError::InvalidArgument(format!(
                    "ids of `{}`: {} bytes is not a whole number of u64 ids",
                    g.table,
                    g.ids.len()
                ))
            })?;
            let expected = n * table.dim * 4;
            if g.values.len() != expected {
                return Err(PsError::InvalidArgument(format!(
                    "gradient of sparse table `{}`: {} bytes for {n} ids of dim {}, expected {expected}",
                    g.table,
                    g.values.len(),
                    table.dim
                )));
            }
            let ids: Vec<u64> = codec::u64s(&g.ids).collect();
            check_ids_on_shard(model, &g.table, &ids)?;
            bytes += g.values.len() as u64 + g.ids.len() as u64;
            sparse.push((t, ids, g.values));
        }
    }
    let mut out = Vec::with_capacity(order.len());
    for idx in order {
        let (covered, slices) = dense[idx].take().expect("ordered pieces are present");
        let piece = &model.pieces[idx];
        if covered != piece.len {
            return Err(PsError::InvalidArgument(format!(
                "gradient of `{}` partition {}: {covered} values, expected {}",
                piece.tensor, piece.partition, piece.len
            )));
        }
        out.push((idx, slices));
    }
    Ok(ValidPush { worker, step, dense: out, sparse, bytes })
}

/// The name of the first tensor or table in `msg` with a NaN or infinite gradient value.
///
/// The gRPC path calls it on each message as it arrives, while its bytes are still in the
/// cache from being received (checked after the whole push, a large push is read from memory
/// once more); the tensor link checks block by block as it reads
/// ([`crate::link::read_push_payload`]), naming the same tensor or table.
pub fn non_finite(msg: &pb::PushRequest) -> Option<&str> {
    let dense = msg.dense.iter().find(|s| !codec::all_finite(&s.data)).map(|s| s.tensor.as_str());
    dense.or_else(|| msg.sparse.iter().find(|g| !codec::all_finite(&g.values)).map(|g| g.table.as_str()))
}

/// Sparse ids must be sent to the shard that owns them.
pub fn check_ids_on_shard(model: &ShardModel, table: &str, ids: &[u64]) -> Result<(), PsError> {
    let n = model.placement.num_shards;
    if n == 1 {
        return Ok(());
    }
    if let Some(&id) = ids.iter().find(|&&id| Placement::sparse_shard(id, n) != model.shard) {
        return Err(PsError::InvalidArgument(format!(
            "sparse table `{table}`: id {id} belongs to shard {}, not to shard {}",
            Placement::sparse_shard(id, n),
            model.shard
        )));
    }
    Ok(())
}
