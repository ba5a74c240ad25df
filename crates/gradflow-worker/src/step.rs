//! Staging gradients and sending them: [`Worker::push_dense`] and [`Worker::push_sparse`]
//! stage a step's gradients by shard, [`Worker::step`] sends every shard its part (one push
//! each, concurrently, over the shard's connection) and moves the worker to the next step.
//!
//! A dense gradient is cut into the pieces the placement gives each shard, and each piece
//! into chunks of at most `transport.chunk_bytes`, written once into staging buffers that are
//! reused from step to step, in the wire encoding of `[transport] compression`; both
//! transports send those bytes as they are (the link writes them to its socket, gRPC shares
//! them in its messages).

use bytes::{Bytes, BytesMut};
use gradflow_core::Placement;
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
}

impl Staging {
    pub(crate) fn new(shards: usize) -> Staging {
        Staging { by_shard: (0..shards).map(|_| Staged::default()).collect(), spare: Vec::new() }
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
        let staging = &mut self.staging;
        for p in placement.pieces_of(t) {
            let piece = &grad[p.offset as usize..(p.offset + p.len) as usize];
            for (k, part) in piece.chunks(chunk).enumerate() {
                let mut buf = staging.spare.pop().unwrap_or_default();
                codec::put_values(&mut buf, part, encoding);
                staging.by_shard[p.shard as usize].dense.push(pb::DenseSlice {
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
        let staged =
            std::mem::replace(&mut self.staging.by_shard, (0..n).map(|_| Staged::default()).collect());
        let (me, step) = (self.config.worker, self.current_step());
        let max_payload = self.config.transport.chunk_bytes;
        let encoding = self.config.transport.compression.encoding();
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
