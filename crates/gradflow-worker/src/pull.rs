//! Pulling parameters: dense tensors ([`Worker::pull_all_dense`], [`Worker::pull_dense`]) and
//! sparse rows ([`Worker::pull_sparse`], [`Worker::pull_sparse_many`]), from every shard that
//! holds a part, concurrently.
//!
//! A dense pull lands each piece straight in its place in the caller's buffers (a [`Slot`]);
//! sparse rows come back by shard and are put in the order of the ids asked for. A pull that
//! finds the servers restored from a checkpoint follows them to its step and asks again.

use futures::future::try_join_all;
use gradflow_core::Placement;
use gradflow_proto::{codec, pb};

use crate::connection::Slot;
use crate::{Worker, WorkerError};

impl Worker {
    /// Pulls every dense tensor into `out` (one buffer per `ModelSpec::dense`, in spec order,
    /// resized to the tensor's size). In sync mode this waits for the model of the current step.
    pub async fn pull_all_dense(&self, out: &mut [Vec<f32>]) -> Result<(), WorkerError> {
        let spec = self.spec()?;
        if out.len() != spec.dense.len() {
            return Err(WorkerError::Length {
                name: "dense buffers".into(),
                expected: spec.dense.len(),
                got: out.len(),
            });
        }
        for (buf, d) in out.iter_mut().zip(&spec.dense) {
            buf.resize(d.numel() as usize, 0.0);
        }
        let all: Vec<usize> = (0..spec.dense.len()).collect();
        let mut tries = 0;
        loop {
            let mut refs: Vec<&mut [f32]> = out.iter_mut().map(|v| v.as_mut_slice()).collect();
            match self.pull_dense_indices(&all, &mut refs, true).await {
                Err(e) if self.follow_rewind(&e, &mut tries) => continue,
                r => return r,
            }
        }
    }

    /// Pulls the named dense tensors into the caller's buffers (each exactly the tensor's size).
    pub async fn pull_dense(&self, names: &[&str], out: &mut [&mut [f32]]) -> Result<(), WorkerError> {
        let spec = self.spec()?;
        let mut idx = Vec::with_capacity(names.len());
        for (name, buf) in names.iter().zip(out.iter()) {
            let t = spec.dense_index(name).ok_or_else(|| WorkerError::UnknownTensor(name.to_string()))?;
            let expected = spec.dense[t].numel() as usize;
            if buf.len() != expected {
                return Err(WorkerError::Length { name: name.to_string(), expected, got: buf.len() });
            }
            idx.push(t);
        }
        let mut tries = 0;
        loop {
            match self.pull_dense_indices(&idx, out, false).await {
                Err(e) if self.follow_rewind(&e, &mut tries) => continue,
                r => return r,
            }
        }
    }

    async fn pull_dense_indices(
        &self,
        tensors: &[usize],
        out: &mut [&mut [f32]],
        everything: bool,
    ) -> Result<(), WorkerError> {
        let (spec, placement) = {
            let m = self.model.as_ref().ok_or(WorkerError::NotDeclared)?;
            (&m.0, &m.1)
        };
        // Each piece's place in the caller's buffers, by shard: pulled values land there.
        let mut slots: Vec<Vec<Slot<'_>>> = (0..self.shards.len()).map(|_| Vec::new()).collect();
        for (buf, &t) in out.iter_mut().zip(tensors) {
            let mut rest: &mut [f32] = buf;
            for p in placement.pieces_of(t) {
                let (dst, tail) = std::mem::take(&mut rest).split_at_mut(p.len as usize);
                rest = tail;
                let tensor = spec.dense[t].name.as_str();
                slots[p.shard as usize].push(Slot { tensor, partition: p.partition, dst, filled: 0 });
            }
        }
        let (me, step) = (self.config.worker, self.current_step());
        try_join_all(slots.into_iter().zip(&self.shards).filter(|(s, _)| !s.is_empty()).map(
            |(mut slots, shard)| {
                // `everything` asks for all of the shard's pieces in one word.
                let pieces = if everything {
                    Vec::new()
                } else {
                    slots
                        .iter()
                        .map(|s| pb::PieceRef { tensor: s.tensor.to_string(), partition: s.partition })
                        .collect()
                };
                let encoding = self.config.transport.compression.encoding() as i32;
                let req = pb::PullDenseRequest { worker: me, step, pieces, encoding };
                async move { shard.pull_dense(req, &mut slots).await }
            },
        ))
        .await?;
        Ok(())
    }

    /// Pulls the rows of `ids` from sparse table `table` into `out` (`ids.len() * dim` values,
    /// in the order of `ids`). Rows are created on first touch.
    pub async fn pull_sparse(&self, table: &str, ids: &[u64], out: &mut Vec<f32>) -> Result<(), WorkerError> {
        self.pull_sparse_many(&[(table, ids)], std::slice::from_mut(out)).await
    }

    /// Pulls rows of several tables at once: one request per shard.
    pub async fn pull_sparse_many(
        &self,
        requests: &[(&str, &[u64])],
        out: &mut [Vec<f32>],
    ) -> Result<(), WorkerError> {
        let mut tries = 0;
        loop {
            match self.pull_sparse_once(requests, out).await {
                Err(e) if self.follow_rewind(&e, &mut tries) => continue,
                r => return r,
            }
        }
    }

    async fn pull_sparse_once(
        &self,
        requests: &[(&str, &[u64])],
        out: &mut [Vec<f32>],
    ) -> Result<(), WorkerError> {
        let spec = self.spec()?;
        let n = self.shards.len();
        let mut dims = Vec::with_capacity(requests.len());
        // For each shard and request: the positions in `ids` that shard serves.
        let mut positions: Vec<Vec<Vec<u32>>> = vec![vec![Vec::new(); requests.len()]; n];
        for (r, (table, ids)) in requests.iter().enumerate() {
            let t = spec.sparse_index(table).ok_or_else(|| WorkerError::UnknownTable(table.to_string()))?;
            dims.push(spec.sparse[t].dim as usize);
            for (i, &id) in ids.iter().enumerate() {
                positions[Placement::sparse_shard(id, n as u32) as usize][r].push(i as u32);
            }
        }
        let (me, step) = (self.config.worker, self.current_step());
        let encoding = self.config.transport.compression.encoding();
        let value_bytes = codec::value_bytes(encoding);
        let replies =
            try_join_all((0..n).filter(|&s| positions[s].iter().any(|p| !p.is_empty())).map(|shard| {
                let tables: Vec<pb::SparseIds> = requests
                    .iter()
                    .enumerate()
                    .filter(|(r, _)| !positions[shard][*r].is_empty())
                    .map(|(r, (table, ids))| {
                        let shard_ids: Vec<u64> =
                            positions[shard][r].iter().map(|&i| ids[i as usize]).collect();
                        pb::SparseIds { table: table.to_string(), ids: codec::u64s_to_bytes(&shard_ids) }
                    })
                    .collect();
                async move {
                    let req = pb::PullSparseRequest { worker: me, step, tables, encoding: encoding as i32 };
                    let reply = self.shards[shard].pull_sparse(&req).await?;
                    Ok::<_, WorkerError>((shard, reply))
                }
            }))
            .await?;
        for (r, (_, ids)) in requests.iter().enumerate() {
            out[r].resize(ids.len() * dims[r], 0.0);
        }
        for (shard, reply) in replies {
            let mut rows = reply.tables.into_iter();
            for r in 0..requests.len() {
                let pos = &positions[shard][r];
                if pos.is_empty() {
                    continue;
                }
                let dim = dims[r];
                let got = rows.next().ok_or_else(|| WorkerError::Protocol {
                    shard,
                    message: format!("no rows for table `{}` in PullSparse reply", requests[r].0),
                })?;
                if got.values.len() != pos.len() * dim * value_bytes {
                    return Err(WorkerError::Protocol {
                        shard,
                        message: format!(
                            "table `{}`: {} bytes for {} rows of dim {dim}",
                            requests[r].0,
                            got.values.len(),
                            pos.len()
                        ),
                    });
                }
                for (k, &i) in pos.iter().enumerate() {
                    let i = i as usize;
                    codec::copy_values(
                        &mut out[r][i * dim..(i + 1) * dim],
                        &got.values[k * dim * value_bytes..(k + 1) * dim * value_bytes],
                        encoding,
                    );
                }
            }
        }
        Ok(())
    }
}
