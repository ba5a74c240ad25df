//! The read side: a shard's part of a checkpoint under any placement, and the export of the
//! whole model as one safetensors file.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt, stream};
use gradflow_core::Placement;

use crate::CheckpointError;
use crate::format::{self, DenseFile, PodView, SparseFile};
use crate::manifest::{FileContent, FileEntry, Manifest, PieceEntry, check_coverage};
use crate::snapshot::{DensePieceSnapshot, ShardSnapshot, TableSnapshot};
use crate::store::CheckpointStore;

/// Where an old piece is: (old shard, file index within the shard, piece entry).
type PieceRef<'m> = (usize, usize, &'m PieceEntry);

/// A file read for `assemble`: (old shard, file index, its entry, its verified bytes).
type FileRead<'m> = (usize, usize, &'m FileEntry, Bytes);

/// A part of an old piece that a new piece needs: the element range `[start, end)` of the
/// tensor, copied to `dst_piece` (index into the output pieces).
struct Copy {
    key_values: String,
    key_slots: Vec<String>,
    old_offset: u64,
    old_len: u64,
    start: u64,
    end: u64,
    dst_piece: usize,
}

impl CheckpointStore {
    /// The part of checkpoint `manifest` that shard `shard` of `num_shards` owns under
    /// `Placement::new(&manifest.spec, num_shards, partition_bytes)`, with optimizer state.
    ///
    /// Reads the files it needs from every old shard (checking each file's size and CRC-32C
    /// against the manifest: a mismatch is [`CheckpointError::Corrupt`] naming the object),
    /// cuts dense tensors to the new placement's pieces and re-hashes sparse ids with
    /// [`Placement::sparse_shard`], so a checkpoint written by 2 shards restores onto 3 or 1
    /// with identical values.
    ///
    /// The returned snapshot has the checkpoint's mode and spec, the highest version of the old
    /// shards, dense pieces in [`Placement::pieces_on`] order and every table of the spec (rows
    /// sorted by id). A new piece's `steps` is the highest of the old pieces it overlaps (they
    /// are equal when all pieces of a tensor were updated together, as in training).
    ///
    /// Check the spec first with [`Manifest::check_spec`]: this does not know the job's.
    pub async fn load_shard(
        &self,
        manifest: &Manifest,
        shard: u32,
        num_shards: u32,
        partition_bytes: u64,
    ) -> Result<ShardSnapshot, CheckpointError> {
        if num_shards == 0 || shard >= num_shards {
            return Err(CheckpointError::InvalidArgument(format!(
                "load_shard: shard {shard} of {num_shards} does not exist"
            )));
        }
        if partition_bytes < 4 {
            return Err(CheckpointError::InvalidArgument(format!(
                "load_shard: partition_bytes is {partition_bytes}, must be at least 4"
            )));
        }
        let (dense, sparse, version) =
            self.assemble(manifest, shard, num_shards, partition_bytes, true).await?;
        Ok(ShardSnapshot {
            shard,
            num_shards,
            version,
            mode: manifest.mode,
            spec: manifest.spec.clone(),
            partition_bytes,
            dense,
            sparse,
            serving: manifest.serving.clone(),
        })
    }

    /// The whole model of checkpoint `manifest`, without optimizer state, for prediction: one
    /// dense piece per tensor (the whole tensor, flattened) in spec order, and every table's
    /// rows sorted by id, in spec order. Every file read is checked against its size and
    /// CRC-32C like in [`CheckpointStore::load_shard`]; the snapshot's `serving` is the
    /// manifest's.
    pub async fn load_model(&self, manifest: &Manifest) -> Result<ShardSnapshot, CheckpointError> {
        let (dense, sparse, version) = self.assemble(manifest, 0, 1, u64::MAX, false).await?;
        Ok(ShardSnapshot {
            shard: 0,
            num_shards: 1,
            version,
            mode: manifest.mode,
            spec: manifest.spec.clone(),
            partition_bytes: u64::MAX,
            dense,
            sparse,
            serving: manifest.serving.clone(),
        })
    }

    /// Writes the whole model of checkpoint `manifest` to `out` as one safetensors file.
    ///
    /// - each dense tensor under its own name, `F32`, at its full shape (a scalar has shape `[]`);
    /// - each sparse table `T` as `T.ids`, `U64 [rows]`, and `T.values`, `F32 [rows, dim]`, rows
    ///   sorted by id. Ids are `u64` and may be above `i64::MAX`, so they are written as they
    ///   are: `safetensors.numpy` reads them as `uint64`, and `safetensors.torch` as
    ///   `torch.uint64` (torch 2.3 and later; checked with torch 2.13). Torch has few `uint64`
    ///   kernels (sorting and comparing work; `isin`, `searchsorted` and indexing do not), so
    ///   convert with `ids.to(torch.int64)` for those: same bits, ids from 2^63 up turn negative;
    /// - metadata: `format` (`gradflow-export`), `format_version`, `step`, `mode`, `time`,
    ///   `checkpoint` (its URL), `spec` (the model spec as JSON) and, when the checkpoint has
    ///   one, `serving` (what prediction needs beside the parameters, as JSON; docs/serving.md).
    ///
    /// Optimizer state is not exported. The file is written next to `out` and renamed into
    /// place, so an existing `out` is replaced whole or not at all.
    pub async fn export(&self, manifest: &Manifest, out: &Path) -> Result<(), CheckpointError> {
        let export_err = |reason: String| CheckpointError::Export { path: out.to_path_buf(), reason };
        let mut names = HashSet::new();
        for name in manifest.spec.dense.iter().map(|d| d.name.clone()).chain(
            manifest
                .spec
                .sparse
                .iter()
                .flat_map(|s| [format!("{}.ids", s.name), format!("{}.values", s.name)]),
        ) {
            if !names.insert(name.clone()) {
                return Err(export_err(format!("two tensors would be named `{name}`")));
            }
        }
        let (dense, sparse, _) = self.assemble(manifest, 0, 1, u64::MAX, false).await?;
        let mut tensors: Vec<(String, ExportView)> = Vec::new();
        for (d, piece) in manifest.spec.dense.iter().zip(&dense) {
            debug_assert_eq!(d.name, piece.tensor);
            let shape = d.shape.iter().map(|&x| x as usize).collect();
            tensors.push((d.name.clone(), ExportView::F32(PodView { data: &piece.values, shape })));
        }
        for t in &sparse {
            let n = t.ids.len();
            tensors.push((
                format!("{}.ids", t.table),
                ExportView::U64(PodView { data: &t.ids, shape: vec![n] }),
            ));
            let shape = vec![n, t.dim as usize];
            tensors
                .push((format!("{}.values", t.table), ExportView::F32(PodView { data: &t.values, shape })));
        }
        let mut metadata = HashMap::from([
            ("format".to_string(), "gradflow-export".to_string()),
            ("format_version".to_string(), "1".to_string()),
            ("step".to_string(), manifest.step.to_string()),
            ("mode".to_string(), manifest.mode.to_string()),
            ("time".to_string(), manifest.time.to_rfc3339()),
            ("checkpoint".to_string(), manifest.url()),
            ("spec".to_string(), serde_json::to_string(&manifest.spec).expect("a spec serializes")),
        ]);
        if let Some(serving) = &manifest.serving {
            metadata.insert("serving".to_string(), serving.to_string());
        }
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty())
            && !parent.is_dir()
        {
            return Err(export_err(format!("the folder `{}` does not exist", parent.display())));
        }
        safetensors::serialize_to_file(tensors, Some(metadata), out).map_err(|e| export_err(e.to_string()))
    }

    /// Reads every file of checkpoint `manifest` and checks it: size, CRC-32C, and that it
    /// parses and holds what the manifest says. Returns the bytes read. Keeps only
    /// [`StoreOptions::max_concurrency`](crate::StoreOptions::max_concurrency) files in memory.
    pub async fn verify(&self, manifest: &Manifest) -> Result<u64, CheckpointError> {
        let (store, dir) = self.origin_of(manifest);
        let store = store.as_ref();
        let dir = dir.as_str();
        let mut objects: Vec<(String, u64, crate::Crc32c, Option<&FileEntry>)> = Vec::new();
        for s in &manifest.shards {
            objects.push((s.manifest.path.clone(), s.manifest.bytes, s.manifest.crc32c, None));
            objects.extend(s.files.iter().map(|f| (f.path.clone(), f.bytes, f.crc32c, Some(f))));
        }
        let reads: Vec<BoxFuture<'_, Result<u64, CheckpointError>>> = objects
            .into_iter()
            .map(|(path, bytes, crc, file)| {
                async move {
                    let rel = format!("{dir}/{path}");
                    let data = store.read_verified(&rel, bytes, crc).await?;
                    let corrupt = |reason: String| CheckpointError::Corrupt { object: store.child_url(&rel), reason };
                    match file.map(|f| &f.content) {
                        None => {
                            serde_json::from_slice::<crate::ShardManifest>(&data)
                                .map_err(|e| corrupt(format!("not a shard manifest: {e}")))?;
                        }
                        Some(FileContent::Dense { pieces }) => {
                            let parsed = DenseFile::parse(&data).map_err(corrupt)?;
                            for p in pieces {
                                let t = manifest.spec.dense_index(&p.tensor).ok_or_else(|| {
                                    corrupt(format!("holds tensor `{}`, which the spec lacks", p.tensor))
                                })?;
                                let finite = |key: String| -> Result<(), CheckpointError> {
                                    let bytes = parsed.f32_bytes(&key, p.len).map_err(corrupt)?;
                                    match format::first_non_finite_le(bytes) {
                                        None => Ok(()),
                                        Some(i) => Err(corrupt(format!(
                                            "tensor `{key}` holds a NaN or infinite value at element {i}; a \
                                             checkpoint holds finite values only"
                                        ))),
                                    }
                                };
                                finite(format::values_key(&p.tensor, p.partition))?;
                                for slot in manifest.spec.dense[t].optimizer.slot_names() {
                                    finite(format::slot_key(&p.tensor, p.partition, slot))?;
                                }
                            }
                        }
                        Some(FileContent::Sparse { table, dim, num_slots, rows }) => {
                            let parsed = SparseFile::parse(&data).map_err(corrupt)?;
                            if let Some((row, id)) = parsed.first_non_finite_row() {
                                return Err(corrupt(format!(
                                    "row {row} (id {id}) of table `{table}` holds a NaN or infinite value; a \
                                     checkpoint holds finite values only"
                                )));
                            }
                            let h = parsed.header;
                            if (&h.table, h.dim, h.num_slots, h.rows) != (table, *dim, *num_slots, *rows) {
                                return Err(corrupt(format!(
                                    "holds table `{}` (dim {}, {} slots, {} rows), the manifest says `{table}` \
                                     (dim {dim}, {num_slots} slots, {rows} rows)",
                                    h.table, h.dim, h.num_slots, h.rows
                                )));
                            }
                        }
                    }
                    Ok(bytes)
                }
                .boxed()
            })
            .collect();
        stream::iter(reads)
            .buffer_unordered(self.options().max_concurrency.max(1))
            .try_fold(0, |a, b| async move { Ok(a + b) })
            .await
    }

    /// Checks, before anything is allocated, that `manifest` describes its dense data coherently
    /// and that the dense files are there with the sizes it gives (one HEAD request per file):
    /// every element of every dense tensor in exactly one listed piece, and every dense file
    /// large enough for the values and optimizer state of the pieces it lists. What a load
    /// allocates then comes from objects that exist, so a corrupt manifest (a tensor's shape, a
    /// piece's length, a file's size) cannot make it allocate more than the checkpoint holds.
    async fn check_dense_sizes(
        &self,
        store: &CheckpointStore,
        dir: &str,
        manifest: &Manifest,
        inconsistent: &impl Fn(String) -> CheckpointError,
    ) -> Result<(), CheckpointError> {
        let spec = &manifest.spec;
        let dense_files = || {
            manifest.files().filter_map(|f| match &f.content {
                FileContent::Dense { pieces } => Some((f, pieces)),
                FileContent::Sparse { .. } => None,
            })
        };
        check_coverage(spec, dense_files().flat_map(|(_, pieces)| pieces)).map_err(inconsistent)?;
        for (f, pieces) in dense_files() {
            // Every listed tensor is in the spec: the coverage check says so.
            let need = pieces.iter().try_fold(0u64, |sum, p| {
                let slots = spec.dense[spec.dense_index(&p.tensor)?].optimizer.num_slots() as u64;
                sum.checked_add(p.len.checked_mul(4 * (1 + slots))?)
            });
            if need.is_none_or(|need| need > f.bytes) {
                return Err(inconsistent(format!(
                    "`{}` is {} bytes, too small for the pieces it lists ({})",
                    f.path,
                    f.bytes,
                    need.map_or("more than 2^64 bytes".to_string(), |n| format!("{n} bytes of data"))
                )));
            }
        }
        let heads: Vec<BoxFuture<'_, Result<(), CheckpointError>>> = dense_files()
            .map(|(f, _)| {
                async move {
                    let rel = format!("{dir}/{}", f.path);
                    match store.size_of(&rel).await? {
                        None => Err(CheckpointError::MissingFile { object: store.child_url(&rel) }),
                        Some(size) if size != f.bytes => Err(CheckpointError::Corrupt {
                            object: store.child_url(&rel),
                            reason: format!(
                                "it is {size} bytes, the manifest says {} (truncated or overwritten?)",
                                f.bytes
                            ),
                        }),
                        Some(_) => Ok(()),
                    }
                }
                .boxed()
            })
            .collect();
        stream::iter(heads).buffer_unordered(self.options().max_concurrency.max(1)).try_collect::<()>().await
    }

    /// Builds shard `shard` of `num_shards`'s dense pieces and table rows from the checkpoint
    /// (without optimizer state unless `with_state`); returns them and the highest old version.
    async fn assemble(
        &self,
        manifest: &Manifest,
        shard: u32,
        num_shards: u32,
        partition_bytes: u64,
        with_state: bool,
    ) -> Result<(Vec<DensePieceSnapshot>, Vec<TableSnapshot>, u64), CheckpointError> {
        let (store, dir) = self.origin_of(manifest);
        let store = store.as_ref();
        let dir = dir.as_str();
        let checkpoint = store.child_url(dir);
        let inconsistent =
            |reason: String| CheckpointError::Inconsistent { checkpoint: checkpoint.clone(), reason };
        let spec = &manifest.spec;
        spec.validate().map_err(|e| inconsistent(format!("invalid spec: {e}")))?;
        self.check_dense_sizes(store, dir, manifest, &inconsistent).await?;
        let placement = Placement::new(spec, num_shards, partition_bytes);

        // Old pieces per tensor, by offset.
        let mut old: HashMap<&str, Vec<PieceRef<'_>>> = HashMap::new();
        for (s, entry) in manifest.shards.iter().enumerate() {
            for (f, file) in entry.files.iter().enumerate() {
                if let FileContent::Dense { pieces } = &file.content {
                    for p in pieces {
                        if spec.dense_index(&p.tensor).is_none() {
                            return Err(inconsistent(format!(
                                "`{}` holds unknown tensor `{}`",
                                file.path, p.tensor
                            )));
                        }
                        old.entry(p.tensor.as_str()).or_default().push((s, f, p));
                    }
                }
            }
        }
        old.values_mut().for_each(|v| v.sort_by_key(|(_, _, p)| p.offset));

        // New pieces, and what each needs from which old file.
        let mut dense = Vec::new();
        let mut copies: HashMap<(usize, usize), Vec<Copy>> = HashMap::new();
        for piece in placement.pieces_on(shard) {
            let d = &spec.dense[piece.tensor];
            let slots = d.optimizer.slot_names();
            let (start, end) = (piece.offset, piece.end());
            let pieces = old.get(d.name.as_str()).map(Vec::as_slice).unwrap_or_default();
            let mut next = start;
            let mut steps = 0;
            for &(s, f, p) in pieces.iter().filter(|(_, _, p)| p.offset < end && p.offset + p.len > start) {
                if p.offset > next {
                    break;
                }
                steps = steps.max(p.steps);
                copies.entry((s, f)).or_default().push(Copy {
                    key_values: format::values_key(&p.tensor, p.partition),
                    key_slots: if with_state {
                        slots.iter().map(|n| format::slot_key(&p.tensor, p.partition, n)).collect()
                    } else {
                        Vec::new()
                    },
                    old_offset: p.offset,
                    old_len: p.len,
                    start: next.max(p.offset),
                    end: end.min(p.offset + p.len),
                    dst_piece: dense.len(),
                });
                next = next.max(p.offset + p.len);
            }
            if next < end {
                return Err(inconsistent(format!(
                    "dense tensor `{}`: element {next} (needed by new piece {start}..{end}) is in no file",
                    d.name
                )));
            }
            let len = piece.len as usize;
            dense.push(DensePieceSnapshot {
                tensor: d.name.clone(),
                partition: piece.partition,
                offset: piece.offset,
                values: vec![0.0; len],
                state: if with_state { vec![0.0; len * slots.len()] } else { Vec::new() },
                steps,
            });
        }

        // Old shards whose sparse files can hold rows of the new shard: with the same hash
        // modulo, only those whose index is congruent; otherwise all.
        let old_n = manifest.num_shards;
        let sparse_from = |s: usize| !old_n.is_multiple_of(num_shards) || s as u32 % num_shards == shard;
        let mut tables: Vec<TableSnapshot> = spec
            .sparse
            .iter()
            .map(|s| TableSnapshot {
                table: s.name.clone(),
                dim: s.dim,
                num_slots: s.optimizer.num_slots() as u32,
                ids: Vec::new(),
                values: Vec::new(),
                state: Vec::new(),
                steps: Vec::new(),
                touched: Vec::new(),
                clock: 0,
                sketch: Vec::new(),
            })
            .collect();

        // The files to read.
        let mut needed: Vec<(usize, usize, &FileEntry)> = Vec::new();
        for (s, entry) in manifest.shards.iter().enumerate() {
            for (f, file) in entry.files.iter().enumerate() {
                let want = match &file.content {
                    FileContent::Dense { .. } => copies.contains_key(&(s, f)),
                    FileContent::Sparse { table, .. } => {
                        if spec.sparse_index(table).is_none() {
                            return Err(inconsistent(format!(
                                "`{}` holds unknown table `{table}`",
                                file.path
                            )));
                        }
                        sparse_from(s)
                    }
                };
                if want {
                    needed.push((s, f, file));
                }
            }
        }

        // Built up front (not lazily inside the stream) so that this future is `Send`.
        let reads: Vec<BoxFuture<'_, Result<FileRead<'_>, CheckpointError>>> = needed
            .into_iter()
            .map(|(s, f, file)| {
                async move {
                    let rel = format!("{dir}/{}", file.path);
                    let bytes = store.read_verified(&rel, file.bytes, file.crc32c).await?;
                    Ok((s, f, file, bytes))
                }
                .boxed()
            })
            .collect();
        let mut files = stream::iter(reads).buffer_unordered(self.options().max_concurrency.max(1));
        while let Some((s, f, file, bytes)) = files.try_next().await? {
            let object = store.child_url(&format!("{dir}/{}", file.path));
            let corrupt = |reason: String| CheckpointError::Corrupt { object: object.clone(), reason };
            match &file.content {
                FileContent::Dense { .. } => {
                    let parsed = DenseFile::parse(&bytes).map_err(corrupt)?;
                    for c in copies.get(&(s, f)).map(Vec::as_slice).unwrap_or_default() {
                        let dst = &mut dense[c.dst_piece];
                        let (lo, hi) =
                            ((c.start - c.old_offset) as usize * 4, (c.end - c.old_offset) as usize * 4);
                        let (a, b) = ((c.start - dst.offset) as usize, (c.end - dst.offset) as usize);
                        let src = parsed.f32_bytes(&c.key_values, c.old_len).map_err(corrupt)?;
                        format::f32s_from_le(&src[lo..hi], &mut dst.values[a..b]);
                        let len = dst.values.len();
                        for (slot, key) in c.key_slots.iter().enumerate() {
                            let src = parsed.f32_bytes(key, c.old_len).map_err(corrupt)?;
                            format::f32s_from_le(
                                &src[lo..hi],
                                &mut dst.state[slot * len + a..slot * len + b],
                            );
                        }
                    }
                }
                FileContent::Sparse { table, dim, num_slots, rows } => {
                    let parsed = SparseFile::parse(&bytes).map_err(corrupt)?;
                    let h = &parsed.header;
                    let t = &mut tables[spec.sparse_index(table).expect("checked")];
                    if h.table != *table || h.dim != t.dim || h.num_slots != t.num_slots || h.rows != *rows {
                        return Err(corrupt(format!(
                            "holds table `{}` (dim {}, {} slots, {} rows); expected `{table}` (dim {}, {} slots, {rows} \
                             rows; the manifest says dim {dim}, {num_slots} slots)",
                            h.table, h.dim, h.num_slots, h.rows, t.dim, t.num_slots
                        )));
                    }
                    let dim = t.dim as usize;
                    t.clock = t.clock.max(h.clock);
                    // Counts of ids that other shards held are kept too: a count-min sketch
                    // may count too high, never too low.
                    let sketch = parsed.sketch();
                    if t.sketch.is_empty() {
                        t.sketch = sketch.to_vec();
                    } else if t.sketch.len() == sketch.len() {
                        t.sketch.iter_mut().zip(sketch).for_each(|(a, b)| *a = a.saturating_add(*b));
                    }
                    for row in 0..parsed.rows() {
                        let id = parsed.id(row);
                        if Placement::sparse_shard(id, num_shards) != shard {
                            continue;
                        }
                        t.ids.push(id);
                        t.steps.push(parsed.steps(row));
                        if parsed.header.touched {
                            t.touched.push(parsed.touched(row));
                        }
                        let at = t.values.len();
                        t.values.resize(at + dim, 0.0);
                        format::f32s_from_le(parsed.values(row), &mut t.values[at..]);
                        if with_state {
                            let at = t.state.len();
                            t.state.resize(at + dim * t.num_slots as usize, 0.0);
                            format::f32s_from_le(parsed.state(row), &mut t.state[at..]);
                        }
                    }
                }
            }
        }
        for t in &mut tables {
            if !t.touched.is_empty() && t.touched.len() != t.ids.len() {
                return Err(inconsistent(format!(
                    "sparse table `{}`: some shards' files have the rows' update clocks and some do not",
                    t.table
                )));
            }
            sort_rows(t, with_state).map_err(|id| {
                inconsistent(format!("sparse table `{}`: row {id} is in more than one shard's file", t.table))
            })?;
        }
        let version = manifest.shards.iter().map(|s| s.version).max().unwrap_or(0);
        Ok((dense, tables, version))
    }
}

/// Sorts a table's rows by id; `Err(id)` when an id appears twice.
fn sort_rows(t: &mut TableSnapshot, with_state: bool) -> Result<(), u64> {
    if t.ids.is_sorted_by(|a, b| a < b) {
        return Ok(());
    }
    let mut order: Vec<usize> = (0..t.ids.len()).collect();
    order.sort_unstable_by_key(|&i| t.ids[i]);
    if let Some(w) = order.windows(2).find(|w| t.ids[w[0]] == t.ids[w[1]]) {
        return Err(t.ids[w[0]]);
    }
    let (dim, sdim) = (t.dim as usize, t.dim as usize * t.num_slots as usize);
    t.ids = order.iter().map(|&i| t.ids[i]).collect();
    t.steps = order.iter().map(|&i| t.steps[i]).collect();
    if !t.touched.is_empty() {
        t.touched = order.iter().map(|&i| t.touched[i]).collect();
    }
    t.values = order.iter().flat_map(|&i| &t.values[i * dim..(i + 1) * dim]).copied().collect();
    if with_state {
        t.state = order.iter().flat_map(|&i| &t.state[i * sdim..(i + 1) * sdim]).copied().collect();
    }
    Ok(())
}

/// An exported tensor: f32 values or u64 ids.
enum ExportView<'a> {
    F32(PodView<'a, f32>),
    U64(PodView<'a, u64>),
}

impl safetensors::View for ExportView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self {
            ExportView::F32(v) => v.dtype(),
            ExportView::U64(v) => v.dtype(),
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            ExportView::F32(v) => v.shape(),
            ExportView::U64(v) => v.shape(),
        }
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            ExportView::F32(v) => v.data(),
            ExportView::U64(v) => v.data(),
        }
    }
    fn data_len(&self) -> usize {
        match self {
            ExportView::F32(v) => v.data_len(),
            ExportView::U64(v) => v.data_len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A one-shard checkpoint of [`crate::snapshot::tiny`] at step 1.
    async fn tiny(name: &str) -> (CheckpointStore, Manifest) {
        let store = CheckpointStore::open(&format!("memory://load-unit-{name}")).unwrap();
        store.write_shard(1, &crate::snapshot::tiny()).await.unwrap();
        let m = store.finalize(1, 1, 0, Duration::from_secs(5)).await.unwrap();
        (store, m)
    }

    fn dense_pieces(m: &mut Manifest) -> &mut Vec<PieceEntry> {
        match &mut m.shards[0]
            .files
            .iter_mut()
            .find(|f| matches!(f.content, FileContent::Dense { .. }))
            .unwrap()
            .content
        {
            FileContent::Dense { pieces } => pieces,
            FileContent::Sparse { .. } => unreachable!(),
        }
    }

    fn is_inconsistent(r: Result<ShardSnapshot, CheckpointError>, says: &str) {
        match r {
            Err(CheckpointError::Inconsistent { reason, .. }) => assert!(reason.contains(says), "{reason}"),
            other => panic!("expected Inconsistent ({says}), got {other:?}"),
        }
    }

    /// A checkpoint whose dense file holds a NaN with a size and checksum that match (as a
    /// writer without the finite check, or an older gradflow, wrote it) fails verification.
    #[tokio::test]
    async fn a_checkpoint_holding_a_nan_fails_verify_naming_the_element() {
        let store = CheckpointStore::open("memory://load-unit-nan").unwrap();
        store.write_shard(1, &crate::snapshot::tiny()).await.unwrap();
        let mut nan = crate::snapshot::tiny();
        nan.dense[0].values[1] = f32::NAN;
        let slots = nan.spec.dense[0].optimizer.slot_names();
        let (bytes, _) = format::encode_dense(1, 0, &[&nan.dense[0]], |_| slots).unwrap();
        store.put_extra(1, "nan.safetensors", bytes.clone()).await.unwrap();
        let mut m = store.finalize(1, 1, 0, Duration::from_secs(5)).await.unwrap();
        assert!(store.verify(&m).await.unwrap() > 0, "the checkpoint as written verifies");
        let file =
            m.shards[0].files.iter_mut().find(|f| matches!(f.content, FileContent::Dense { .. })).unwrap();
        file.path = "extra/nan.safetensors".into();
        file.bytes = bytes.len() as u64;
        file.crc32c = crate::Crc32c::of(&bytes);
        match store.verify(&m).await {
            Err(CheckpointError::Corrupt { reason, .. }) => {
                assert!(
                    reason.contains("`w:0:values` holds a NaN or infinite value at element 1"),
                    "{reason}"
                )
            }
            other => panic!("expected a corrupt checkpoint, got {other:?}"),
        }
    }

    // Found by the `ckpt_manifest` fuzz target: a manifest's spec with a shape whose element
    // count overflows u64 made the load panic (multiply with overflow) in `Placement::new`.
    #[tokio::test]
    async fn a_shape_too_large_to_count_is_refused() {
        let (store, mut m) = tiny("overflow").await;
        m.spec.dense[0].shape = vec![1 << 32, 1 << 32];
        is_inconsistent(store.load_shard(&m, 0, 1, 1024).await, "too large");
        dense_pieces(&mut m)[0].offset = u64::MAX;
        m.spec.dense[0].shape = vec![4];
        is_inconsistent(store.load_shard(&m, 0, 1, 1024).await, "ends past 2^64");
    }

    // Found by the `ckpt_manifest` fuzz target: a manifest saying a tensor (and its piece) is
    // huge made the load allocate that much before reading any file.
    #[tokio::test]
    async fn a_huge_tensor_the_files_cannot_hold_is_refused_before_allocating() {
        let (store, mut m) = tiny("huge").await;
        m.spec.dense[0].shape = vec![1 << 40];
        dense_pieces(&mut m)[0].len = 1 << 40;
        is_inconsistent(store.load_shard(&m, 0, 1, 1 << 20).await, "too small for the pieces");
        // Even when the manifest also lies about the file's size, the store has the truth.
        let file =
            m.shards[0].files.iter_mut().find(|f| matches!(f.content, FileContent::Dense { .. })).unwrap();
        file.bytes = 1 << 44;
        match store.load_shard(&m, 0, 1, 1 << 20).await {
            Err(CheckpointError::Corrupt { object, reason }) => {
                assert!(object.ends_with(".safetensors") && reason.contains("the manifest says"), "{reason}")
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert!(matches!(
            store.export(&m, Path::new("/nonexistent/x")).await,
            Err(CheckpointError::Corrupt { .. })
        ));
    }

    #[tokio::test]
    async fn pieces_must_cover_each_tensor_once() {
        let (store, m) = tiny("cover").await;
        store.load_shard(&m, 0, 1, 1024).await.unwrap();
        let mut short = m.clone();
        dense_pieces(&mut short)[0].len = 3;
        is_inconsistent(store.load_shard(&short, 0, 1, 1024).await, "elements 3..4 are in no shard");
        let mut long = m.clone();
        dense_pieces(&mut long)[0].len = 5;
        is_inconsistent(store.load_shard(&long, 0, 1, 1024).await, "pieces end at 5");
        let mut unknown = m.clone();
        dense_pieces(&mut unknown)[0].tensor = "v".into();
        is_inconsistent(store.load_shard(&unknown, 0, 1, 1024).await, "elements 0..4 are in no shard");
    }
}
