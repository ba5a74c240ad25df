//! The gRPC adapter: one handler per RPC of `proto/gradflow.proto`, over the shard core.
//!
//! Each handler decodes its request once into the core's domain types (`shard.rs`,
//! `push.rs`), calls the [`Shard`], and encodes the answer; nothing else happens here. A push
//! stream's messages become one [`Push`], each checked for NaN as it arrives; a dense pull is
//! streamed in chunks of `transport.chunk_bytes` straight from the pieces' values. Errors are
//! [`PsError`]s, turned into statuses in `error.rs`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use gradflow_proto::{codec, pb};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::PsError;
use crate::encoding::{encoding_of, widen};
use crate::push::{DenseGrad, Push, SparseGrad, TaskProgress};
use crate::shard::{Declare, DenseRead, Rows, ScoreCall, Selection, Shard, TableIds};
use crate::tasks::{Handout, Piece, TaskPlan};

/// The tonic service; cheap to clone.
#[derive(Clone)]
pub struct Service {
    pub shard: Arc<Shard>,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::DenseChunk, Status>> + Send>>;

#[tonic::async_trait]
impl gradflow_proto::ParameterServer for Service {
    async fn declare_spec(
        &self,
        request: Request<pb::DeclareSpecRequest>,
    ) -> Result<Response<pb::DeclareSpecResponse>, Status> {
        let req = request.into_inner();
        let declared = self
            .shard
            .declare(Declare {
                worker: req.worker,
                shard: req.shard,
                num_shards: req.num_shards,
                partition_bytes: req.partition_bytes,
                spec_json: req.spec_json,
                servers: req.servers,
            })
            .await?;
        Ok(Response::new(pb::DeclareSpecResponse { created: declared.created, version: declared.version }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let (version, live_workers) = self.shard.heartbeat(request.into_inner().worker)?;
        Ok(Response::new(pb::HeartbeatResponse { version, live_workers }))
    }

    type PullDenseStream = ChunkStream;

    async fn pull_dense(
        &self,
        request: Request<pb::PullDenseRequest>,
    ) -> Result<Response<Self::PullDenseStream>, Status> {
        let req = request.into_inner();
        let encoding = encoding_of(req.encoding)?;
        let pieces = req.pieces.iter().map(|p| (p.tensor.as_str(), p.partition));
        let read = self.shard.pull_dense(req.worker, req.step, pieces).await?;
        let config = &self.shard.config;
        let chunk_elems = config.transport.chunk_bytes / 4;
        if read.bytes() <= config.inline_bytes {
            let mut chunks = Vec::new();
            let sent = read_chunks(&read, chunk_elems, encoding, |c| {
                chunks.push(Ok(c));
                true
            });
            if let Some(sent) = sent {
                read.sent(sent);
            }
            return Ok(Response::new(Box::pin(tokio_stream::iter(chunks))));
        }
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            if let Some(sent) = read_chunks(&read, chunk_elems, encoding, |c| tx.blocking_send(Ok(c)).is_ok())
            {
                read.sent(sent);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn pull_sparse(
        &self,
        request: Request<pb::PullSparseRequest>,
    ) -> Result<Response<pb::PullSparseResponse>, Status> {
        let req = request.into_inner();
        let encoding = encoding_of(req.encoding)?;
        let tables = req.tables.into_iter().map(|t| TableIds { table: t.table, ids: t.ids }).collect();
        let (rows, version) = self.shard.pull_sparse(req.worker, req.step, tables).await?;
        let tables = rows
            .into_iter()
            .map(|Rows { table, values }| pb::SparseRows { table, values: codec::narrow(values, encoding) })
            .collect();
        Ok(Response::new(pb::PullSparseResponse { tables, version }))
    }

    async fn push(
        &self,
        request: Request<Streaming<pb::PushRequest>>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        let started = Instant::now();
        let shard = &self.shard;
        let mut stream = request.into_inner();
        let mut push: Option<Push> = None;
        let mut encoding = None;
        while let Some(msg) = stream.next().await {
            let msg = msg?;
            let enc = match encoding_of(msg.encoding) {
                Ok(e) if encoding.is_none_or(|first| first == e) => *encoding.insert(e),
                Ok(e) => {
                    let e = PsError::InvalidArgument(format!(
                        "push stream mixes value encodings: started in {}, then {}",
                        codec::encoding_name(encoding.unwrap_or_default()),
                        codec::encoding_name(e)
                    ));
                    return Err(shard.refuse_push(e, started).into());
                }
                Err(e) => return Err(shard.refuse_push(e, started).into()),
            };
            let push = match &mut push {
                None => push.insert(Push {
                    worker: msg.worker,
                    step: msg.step,
                    task: msg.task.map(|t| TaskProgress { lease: t.lease, examples: t.examples }),
                    ..Push::default()
                }),
                Some(p) if (p.worker, p.step) != (msg.worker, msg.step) => {
                    let e = PsError::InvalidArgument(format!(
                        "push stream mixes worker/step: started as worker {} step {}, then worker {} step {}",
                        p.worker, p.step, msg.worker, msg.step
                    ));
                    return Err(shard.refuse_push(e, started).into());
                }
                Some(p) => p,
            };
            let (dense, sparse) = (push.dense.len(), push.sparse.len());
            for d in msg.dense {
                let data = match widen(d.data, enc, &d.tensor) {
                    Ok(data) => data,
                    Err(e) => return Err(shard.refuse_push(e, started).into()),
                };
                push.dense.push(DenseGrad {
                    tensor: d.tensor,
                    partition: d.partition,
                    offset: d.offset,
                    data,
                });
            }
            for g in msg.sparse {
                let values = match widen(g.values, enc, &g.table) {
                    Ok(values) => values,
                    Err(e) => return Err(shard.refuse_push(e, started).into()),
                };
                push.sparse.push(SparseGrad { table: g.table, ids: g.ids, values });
            }
            // Checked as each message arrives, while its bytes are in the cache.
            if let Some(e) = shard.refuses_non_finite(&push.dense[dense..], &push.sparse[sparse..]) {
                return Err(shard.refuse_push(e, started).into());
            }
        }
        let Some(push) = push else {
            let e = PsError::InvalidArgument("empty push stream: expected at least one message".into());
            return Err(shard.refuse_push(e, started).into());
        };
        let version = shard.push(push, started).await?;
        Ok(Response::new(pb::PushResponse { version }))
    }

    async fn leave(&self, request: Request<pb::LeaveRequest>) -> Result<Response<pb::LeaveResponse>, Status> {
        let req = request.into_inner();
        self.shard.leave(req.worker, req.pause).await?;
        Ok(Response::new(pb::LeaveResponse {}))
    }

    async fn score(&self, request: Request<pb::ScoreRequest>) -> Result<Response<pb::ScoreResponse>, Status> {
        let req = request.into_inner();
        let selection = match req.selection {
            Some(s) => Some(Selection {
                metric: s
                    .metric
                    .parse()
                    .map_err(|e| PsError::InvalidArgument(format!("selection.metric: {e}")))?,
                value: s.value,
                keep_best: s.keep_best,
            }),
            None => None,
        };
        let call = ScoreCall {
            worker: req.worker,
            epoch: req.epoch,
            step: req.step,
            scored: req.scored,
            selection,
            stop: req.stop,
        };
        let since_best = self.shard.score(call).await?;
        Ok(Response::new(pb::ScoreResponse { since_best }))
    }

    async fn declare_serving(
        &self,
        request: Request<pb::DeclareServingRequest>,
    ) -> Result<Response<pb::DeclareServingResponse>, Status> {
        let req = request.into_inner();
        self.shard.declare_serving(req.worker, &req.serving_json)?;
        Ok(Response::new(pb::DeclareServingResponse {}))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let s = self.shard.status();
        Ok(Response::new(pb::StatusResponse {
            shard: s.shard,
            num_shards: s.num_shards,
            mode: s.mode.to_string(),
            version: s.version,
            declared: s.declared,
            live_workers: s.live_workers,
            dense_bytes: s.dense_bytes,
            sparse_rows: s.sparse_rows,
            num_workers: s.num_workers,
            link_port: u32::from(s.link_port),
            scored_epochs: s.scored_epochs,
        }))
    }

    async fn checkpoint(
        &self,
        request: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointResponse>, Status> {
        let step = self.shard.checkpoint(request.into_inner().step).await?;
        Ok(Response::new(pb::CheckpointResponse { step }))
    }

    async fn declare_tasks(
        &self,
        request: Request<pb::DeclareTasksRequest>,
    ) -> Result<Response<pb::DeclareTasksResponse>, Status> {
        let req = request.into_inner();
        let plan = TaskPlan {
            pieces: req
                .pieces
                .into_iter()
                .map(|p| Piece { path: p.path, start: p.start, end: p.end })
                .collect(),
            epochs: req.epochs,
            seed: req.seed,
        };
        let created = self.shard.declare_tasks(req.worker, plan)?;
        Ok(Response::new(pb::DeclareTasksResponse { created }))
    }

    async fn next_task(
        &self,
        request: Request<pb::NextTaskRequest>,
    ) -> Result<Response<pb::NextTaskResponse>, Status> {
        let req = request.into_inner();
        let scored = req.scored_epoch.checked_sub(1);
        let (handout, completed) = self.shard.next_task(req.worker, req.done_lease, scored)?;
        let mut resp = pb::NextTaskResponse {
            completed_epoch: completed.map_or(0, |(e, _)| e + 1),
            completed_epoch_examples: completed.map_or(0, |(_, n)| n),
            ..Default::default()
        };
        match handout {
            Handout::Task(t) => {
                resp.state = pb::next_task_response::State::Task as i32;
                resp.lease = t.lease;
                resp.epoch = t.epoch;
                resp.piece_index = t.piece_index;
                resp.piece =
                    Some(pb::TaskPiece { path: t.piece.path, start: t.piece.start, end: t.piece.end });
                resp.skip_examples = t.skip_examples;
            }
            Handout::Wait => resp.state = pb::next_task_response::State::Wait as i32,
            Handout::Finished => resp.state = pb::next_task_response::State::Finished as i32,
        }
        Ok(Response::new(resp))
    }
}

/// Reads a dense pull's pieces in chunks of at most `chunk_elems` values, in `encoding`, and
/// hands each to `send`, which says whether the client still listens. The bytes of values sent
/// (as f32), or `None` if the client went away.
fn read_chunks(
    read: &DenseRead,
    chunk_elems: usize,
    encoding: pb::ValueEncoding,
    mut send: impl FnMut(pb::DenseChunk) -> bool,
) -> Option<u64> {
    let mut sent = 0u64;
    for piece in read.pieces() {
        let mut start = 0;
        while start < piece.len() {
            let n = chunk_elems.min(piece.len() - start);
            let chunk = pb::DenseChunk {
                tensor: piece.tensor().to_string(),
                partition: piece.partition(),
                offset: start as u64,
                data: codec::narrow(piece.read(start, n), encoding),
                version: read.version(),
            };
            sent += n as u64 * 4;
            if !send(chunk) {
                return None;
            }
            start += n;
        }
    }
    Some(sent)
}
