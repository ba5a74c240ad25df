//! A push as the shard core takes it ([`Push`]), and checking it whole before any of it is
//! applied.
//!
//! Both transports decode their wire format once into a [`Push`]: the gRPC service from the
//! messages of a push stream, the tensor link from a frame's header and payload. Gradient
//! bytes stay the buffers they were received in. [`validate`] resolves every tensor and table
//! name, checks that the slices of each dense piece arrive in order and cover it exactly, that
//! byte lengths agree with the spec, and that sparse ids belong to this shard; the result is a
//! [`ValidPush`], which the model takes. [`non_finite`] finds NaN and infinite values, which
//! the transports check for (by default) as the bytes arrive. Only a push that passes all of
//! this is applied, so a refused push changes nothing.

use bytes::Bytes;
use gradflow_core::Placement;
use gradflow_proto::codec;

use crate::PsError;
use crate::model::ShardModel;
pub use crate::model::ValidPush;

/// One worker's push to this shard for one step, as received.
#[derive(Debug, Clone, Default)]
pub struct Push {
    pub worker: u32,
    pub step: u64,
    /// Dynamic data sharding (shard 0): the task progress this push brings, recorded only if
    /// the push is taken.
    pub task: Option<TaskProgress>,
    /// Dense gradient slices, in the order they came.
    pub dense: Vec<DenseGrad>,
    /// Sparse gradients, in the order they came.
    pub sparse: Vec<SparseGrad>,
}

/// The data task a push's batch came from, and how far into it the worker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskProgress {
    pub lease: u64,
    pub examples: u64,
}

/// A slice of a dense gradient: elements `offset..` of one piece, little-endian `f32`.
#[derive(Debug, Clone, Default)]
pub struct DenseGrad {
    pub tensor: String,
    pub partition: u32,
    pub offset: u64,
    pub data: Bytes,
}

/// A sparse gradient: little-endian `u64` ids and, per id, one row of little-endian `f32`.
#[derive(Debug, Clone, Default)]
pub struct SparseGrad {
    pub table: String,
    pub ids: Bytes,
    pub values: Bytes,
}

impl Push {
    /// Gradient bytes in this push (dense slices, sparse ids and values).
    pub fn bytes(&self) -> u64 {
        let dense = self.dense.iter().map(|d| d.data.len());
        dense.chain(self.sparse.iter().map(|g| g.ids.len() + g.values.len())).map(|n| n as u64).sum()
    }
}

/// Validates a push against the shard's model.
pub fn validate(model: &ShardModel, push: Push) -> Result<ValidPush, PsError> {
    let Push { worker, step, dense: slices, sparse: grads, task: _ } = push;
    let pieces = model.pieces();
    // Per local piece: (elements covered so far, slices).
    let mut dense: Vec<Option<(usize, Vec<Bytes>)>> = vec![None; pieces.len()];
    let mut order = Vec::new();
    let mut sparse = Vec::new();
    let mut bytes = 0u64;
    for s in slices {
        let idx = model.piece(&s.tensor, s.partition)?;
        let piece = &pieces[idx];
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
        if entry.0 + n > piece.len() {
            return Err(PsError::InvalidArgument(format!(
                "gradient of `{}` partition {}: {} values, expected {}",
                s.tensor,
                s.partition,
                entry.0 + n,
                piece.len()
            )));
        }
        bytes += s.data.len() as u64;
        entry.0 += n;
        entry.1.push(s.data);
    }
    for g in grads {
        let t = model.table(&g.table)?;
        let dim = model.tables()[t].dim();
        let n = codec::u64_len(&g.ids).ok_or_else(|| {
            PsError::InvalidArgument(format!(
                "ids of `{}`: {} bytes is not a whole number of u64 ids",
                g.table,
                g.ids.len()
            ))
        })?;
        let expected = n * dim * 4;
        if g.values.len() != expected {
            return Err(PsError::InvalidArgument(format!(
                "gradient of sparse table `{}`: {} bytes for {n} ids of dim {dim}, expected {expected}",
                g.table,
                g.values.len(),
            )));
        }
        let ids: Vec<u64> = codec::u64s(&g.ids).collect();
        check_ids_on_shard(model, &g.table, &ids)?;
        bytes += g.values.len() as u64 + g.ids.len() as u64;
        sparse.push((t, ids, g.values));
    }
    let mut out = Vec::with_capacity(order.len());
    for idx in order {
        let (covered, slices) = dense[idx].take().expect("ordered pieces are present");
        let piece = &pieces[idx];
        if covered != piece.len() {
            return Err(PsError::InvalidArgument(format!(
                "gradient of `{}` partition {}: {covered} values, expected {}",
                piece.tensor(),
                piece.partition(),
                piece.len()
            )));
        }
        out.push((idx, slices));
    }
    Ok(ValidPush { worker, step, dense: out, sparse, bytes })
}

/// The name of the first tensor or table among `dense` and `sparse` (a push, or the part of
/// one that just arrived) with a NaN or infinite gradient value; dense slices first.
///
/// The gRPC service calls it on each message as it arrives, while its bytes are still in the
/// cache from being received (checked after the whole push, a large push is read from memory
/// once more); the tensor link checks block by block as it reads
/// ([`crate::link::read_push_payload`]), naming the same tensor or table.
pub fn non_finite<'a>(dense: &'a [DenseGrad], sparse: &'a [SparseGrad]) -> Option<&'a str> {
    let bad = dense.iter().find(|s| !codec::all_finite(&s.data)).map(|s| s.tensor.as_str());
    bad.or_else(|| sparse.iter().find(|g| !codec::all_finite(&g.values)).map(|g| g.table.as_str()))
}

/// Sparse ids must be sent to the shard that owns them.
pub fn check_ids_on_shard(model: &ShardModel, table: &str, ids: &[u64]) -> Result<(), PsError> {
    let n = model.placement().num_shards;
    if n == 1 {
        return Ok(());
    }
    if let Some(&id) = ids.iter().find(|&&id| Placement::sparse_shard(id, n) != model.shard()) {
        return Err(PsError::InvalidArgument(format!(
            "sparse table `{table}`: id {id} belongs to shard {}, not to shard {}",
            Placement::sparse_shard(id, n),
            model.shard()
        )));
    }
    Ok(())
}
