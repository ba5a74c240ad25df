//! Staging gradients and sending them: [`Worker::push_dense`] and [`Worker::push_sparse`]
//! stage a step's gradients by shard, [`Worker::step`] sends every shard its part (one push
//! each, concurrently, over the shard's connection) and moves the worker to the next step.
//!
//! A dense gradient is cut into the pieces the placement gives each shard, and each piece
//! into chunks of at most `transport.chunk_bytes`, written once into staging buffers that are
//! reused from step to step, in the wire encoding of `[transport] compression`; both
//! transports send those bytes as they are (the link writes them to its socket, gRPC shares
//! them in its messages). A gradient written in place ([`Worker::push_dense_mut`]) is sent
//! from the tensor's own buffer where its values are already the wire's bytes (f32 on a
//! little-endian host): its chunks are slices of that buffer, lent for the step and taken back
//! once sent, so no copy of it is made in user space.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use gradflow_core::{ModelSpec, Placement};
use gradflow_proto::{codec, pb};
use tonic::Code;
use tracing::warn;

use crate::connection::Push;
use crate::{Worker, WorkerError};

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
pub(crate) struct Staged {
    pub dense: Vec<pb::DenseSlice>,
    pub sparse: Vec<pb::SparseGrad>,
}

/// Every shard's staged gradients, and the buffers of the last step's dense gradients, taken
/// back once sent: a fresh buffer of many MiB every step costs a page fault per 4 KiB.
pub(crate) struct Staging {
    by_shard: Vec<Staged>,
    spare: Vec<BytesMut>,
    /// Each dense tensor's buffer for gradients written in place, by tensor index; empty
    /// until first asked for (or while lent to a step that was dropped).
    in_place: Vec<Vec<f32>>,
    /// The tensors whose in-place buffer is staged for this step, in the order first asked.
    in_place_staged: Vec<usize>,
}

impl Staging {
    pub(crate) fn new(shards: usize) -> Staging {
        Staging {
            by_shard: (0..shards).map(|_| Staged::default()).collect(),
            spare: Vec::new(),
            in_place: Vec::new(),
            in_place_staged: Vec::new(),
        }
    }

    /// Moves the gradients written in place into the shards' staged pushes. Where the wire
    /// encoding is f32 and the host little-endian, the values are the wire's bytes: each
    /// buffer is lent to the step whole (returned here, to be taken back by [`Staging::take_back`])
    /// and its chunks are slices of it. Otherwise each is narrowed into staging buffers, as
    /// [`Worker::push_dense`] does, and stays where it is.
    fn stage_in_place(
        &mut self,
        spec: &ModelSpec,
        placement: &Placement,
        chunk: usize,
        encoding: pb::ValueEncoding,
    ) -> Vec<(usize, Arc<Vec<f32>>)> {
        let Staging { by_shard, spare, in_place, in_place_staged } = self;
        let mut lent = Vec::new();
        for t in in_place_staged.drain(..) {
            let name = &spec.dense[t].name;
            if encoding == pb::ValueEncoding::F32 && cfg!(target_endian = "little") {
                let values = Arc::new(std::mem::take(&mut in_place[t]));
                let whole = Bytes::from_owner(F32Bytes(values.clone()));
                stage_chunks(by_shard, placement, t, name, &values, chunk, |start, part| {
                    whole.slice(start * 4..(start + part.len()) * 4)
                });
                lent.push((t, values));
            } else {
                stage_chunks(by_shard, placement, t, name, &in_place[t], chunk, |_, part| {
                    copy_chunk(spare, part, encoding)
                });
            }
        }
        lent
    }

    /// Takes back the buffers [`Staging::stage_in_place`] lent, once nothing holds a slice of
    /// them; one still held (by a transport that kept its bytes) is left to go, and the
    /// tensor gets a new buffer when next asked.
    fn take_back(&mut self, lent: Vec<(usize, Arc<Vec<f32>>)>) {
        for (t, values) in lent {
            if let (Ok(values), Some(slot)) = (Arc::try_unwrap(values), self.in_place.get_mut(t))
                && slot.is_empty()
            {
                *slot = values;
            }
        }
    }
}

/// A gradient buffer seen as its little-endian bytes (little-endian hosts only), so that
/// staged chunks can be slices of it.
struct F32Bytes(Arc<Vec<f32>>);

impl AsRef<[u8]> for F32Bytes {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(self.0.as_slice())
    }
}

/// `part` in `encoding`, in a staging buffer reused from an earlier step where there is one.
fn copy_chunk(spare: &mut Vec<BytesMut>, part: &[f32], encoding: pb::ValueEncoding) -> Bytes {
    let mut buf = spare.pop().unwrap_or_default();
    codec::put_values(&mut buf, part, encoding);
    buf.freeze()
}

/// Stages dense tensor `t`'s gradient `grad` (named `name`) by piece, each piece in chunks
/// of at most `chunk` values; `bytes_of(start, part)` gives the wire bytes of the chunk
/// `part` that starts at element `start` of the tensor.
fn stage_chunks(
    by_shard: &mut [Staged],
    placement: &Placement,
    t: usize,
    name: &str,
    grad: &[f32],
    chunk: usize,
    mut bytes_of: impl FnMut(usize, &[f32]) -> Bytes,
) {
    for p in placement.pieces_of(t) {
        let piece = &grad[p.offset as usize..(p.offset + p.len) as usize];
        for (k, part) in piece.chunks(chunk).enumerate() {
            by_shard[p.shard as usize].dense.push(pb::DenseSlice {
                tensor: name.to_string(),
                partition: p.partition,
                offset: (k * chunk) as u64,
                data: bytes_of(p.offset as usize + k * chunk, part),
            });
        }
    }
}

impl Worker {
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
        let encoding = self.config.transport.compression.encoding();
        let Staging { by_shard, spare, .. } = &mut self.staging;
        stage_chunks(by_shard, placement, t, name, grad, chunk, |_, part| copy_chunk(spare, part, encoding));
        Ok(())
    }

    /// Stages dense tensor `name`'s gradient for this step and returns the buffer to write it
    /// into: the buffer [`Worker::step`] sends it from. Where [`push_dense`](Worker::push_dense)
    /// copies a gradient the caller keeps, a model that produces its gradient here saves that
    /// copy: with `[transport] compression = "none"` the buffer's chunks are sent as they lie
    /// (on a little-endian host), with f16 or bf16 they are narrowed as `push_dense` does.
    ///
    /// The buffer is the tensor's own and is reused from step to step; what it holds when
    /// asked for is unspecified (the last gradient written into it, or zeros), so write every
    /// value. Asking again in the same step returns the same buffer, staged once. A tensor's
    /// gradient is pushed once a step: through this or through `push_dense`, not both (the
    /// servers refuse a push that covers a piece twice).
    pub fn push_dense_mut(&mut self, name: &str) -> Result<&mut [f32], WorkerError> {
        let spec = &self.model.as_ref().ok_or(WorkerError::NotDeclared)?.0;
        let t = spec.dense_index(name).ok_or_else(|| WorkerError::UnknownTensor(name.to_string()))?;
        let (tensors, n) = (spec.dense.len(), spec.dense[t].numel() as usize);
        let staging = &mut self.staging;
        if staging.in_place.len() < tensors {
            staging.in_place.resize_with(tensors, Vec::new);
        }
        if !staging.in_place_staged.contains(&t) {
            staging.in_place_staged.push(t);
        }
        let buf = &mut staging.in_place[t];
        if buf.len() != n {
            *buf = vec![0.0; n];
        }
        Ok(buf)
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
        let n = self.shards.len();
        let encoding = self.config.transport.compression.encoding();
        let mut by_shard: Vec<(Vec<u64>, Vec<u8>)> = vec![(Vec::new(), Vec::new()); n];
        for (i, &id) in ids.iter().enumerate() {
            let (sids, svals) = &mut by_shard[Placement::sparse_shard(id, n as u32) as usize];
            sids.push(id);
            codec::extend_values(svals, &grads[i * dim..(i + 1) * dim], encoding);
        }
        for (shard, (sids, svals)) in by_shard.into_iter().enumerate() {
            if !sids.is_empty() {
                self.staging.by_shard[shard].sparse.push(pb::SparseGrad {
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
        let n = self.shards.len();
        let (me, step) = (self.config.worker, self.current_step());
        let max_payload = self.config.transport.chunk_bytes;
        let encoding = self.config.transport.compression.encoding();
        let lent = match self.model.clone() {
            Some(model) => self.staging.stage_in_place(&model.0, &model.1, max_payload / 4, encoding),
            None => Vec::new(),
        };
        let staged =
            std::mem::replace(&mut self.staging.by_shard, (0..n).map(|_| Staged::default()).collect());
        let mut task = self.task_progress.take();
        let this = &*self;
        let sent = futures::future::join_all(staged.into_iter().zip(&this.shards).enumerate().map(
            |(i, (staged, shard))| {
                let task = if i == 0 { task.take() } else { None };
                async move {
                    let push = Push::new(me, step, &staged, task, max_payload, encoding);
                    let result = match shard.push(&push).await {
                        // step() sends once per step, so this can only be a retry of a push
                        // whose first attempt arrived although its answer was lost.
                        Err(e) if e.code() == Some(Code::AlreadyExists) => Ok(()),
                        Err(e) => Err(e),
                        Ok(_) => Ok(()),
                    };
                    (result, staged)
                }
            },
        ))
        .await;
        let mut results = Vec::with_capacity(sent.len());
        for (result, staged) in sent {
            results.push(result);
            // Nothing else holds a sent gradient's bytes now: keep its buffer for the next step.
            self.staging.spare.extend(staged.dense.into_iter().filter_map(|d| d.data.try_into_mut().ok()));
        }
        self.staging.take_back(lent);
        let mut resumed_at = None;
        for r in results {
            match r {
                Ok(()) => {}
                Err(e) => match e.rewind_target() {
                    Some(v) => resumed_at = Some(resumed_at.map_or(v, |r: u64| r.max(v))),
                    None => return Err(e),
                },
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
}
