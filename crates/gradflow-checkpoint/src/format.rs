//! The data file formats: dense pieces as safetensors, sparse tables in a small binary format.
//!
//! Everything is little-endian whatever the host.

use std::borrow::Cow;
use std::collections::HashMap;

use bytes::Bytes;
use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};

use crate::manifest::{FORMAT_VERSION, PieceEntry};
use crate::snapshot::{DensePieceSnapshot, TableSnapshot};

/// First 8 bytes of a sparse table file.
pub const SPARSE_MAGIC: &[u8; 8] = b"GFSPARSE";
/// Key of the gradflow metadata in a dense file's safetensors `__metadata__`.
pub const DENSE_METADATA_KEY: &str = "gradflow";

/// Name, in a dense file, of the values of piece `partition` of `tensor`.
pub fn values_key(tensor: &str, partition: u32) -> String {
    format!("{tensor}:{partition}:values")
}

/// Name, in a dense file, of optimizer slot `slot` of piece `partition` of `tensor`.
pub fn slot_key(tensor: &str, partition: u32, slot: &str) -> String {
    format!("{tensor}:{partition}:{slot}")
}

// ---------------------------------------------------------------------------------------------
// Little-endian byte views of typed slices.

/// Plain numbers that are stored little-endian.
pub(crate) trait Le: bytemuck::Pod {
    const DTYPE: Dtype;
    fn put_le(self, out: &mut Vec<u8>);
}

impl Le for f32 {
    const DTYPE: Dtype = Dtype::F32;
    fn put_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl Le for u32 {
    const DTYPE: Dtype = Dtype::U32;
    fn put_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl Le for u64 {
    const DTYPE: Dtype = Dtype::U64;
    fn put_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

/// The little-endian bytes of `data` (borrowed on little-endian hosts).
pub(crate) fn le_bytes<T: Le>(data: &[T]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(data))
    } else {
        let mut out = Vec::with_capacity(std::mem::size_of_val(data));
        data.iter().for_each(|x| x.put_le(&mut out));
        Cow::Owned(out)
    }
}

/// Fills `dst` from little-endian `src` (`src.len() == 4 * dst.len()`).
pub(crate) fn f32s_from_le(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len() * 4);
    if cfg!(target_endian = "little") {
        bytemuck::cast_slice_mut::<f32, u8>(dst).copy_from_slice(src);
    } else {
        for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
            *d = f32::from_le_bytes(c.try_into().expect("4 bytes"));
        }
    }
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().expect("4 bytes"))
}

/// The index of the first little-endian `f32` in `bytes` that is NaN or infinite. The common
/// case, none, is found by a loop without an early exit, which the compiler vectorizes.
pub(crate) fn first_non_finite_le(bytes: &[u8]) -> Option<usize> {
    let bits = |c: &[u8]| u32::from_le_bytes(c.try_into().expect("4 bytes")) & 0x7f80_0000 == 0x7f80_0000;
    let bad = bytes.chunks_exact(4).fold(false, |bad, c| bad | bits(c));
    if bad { bytes.chunks_exact(4).position(bits) } else { None }
}

/// A typed slice as a safetensors tensor.
pub(crate) struct PodView<'a, T: Le> {
    pub data: &'a [T],
    pub shape: Vec<usize>,
}

impl<T: Le> View for PodView<'_, T> {
    fn dtype(&self) -> Dtype {
        T::DTYPE
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        le_bytes(self.data)
    }
    fn data_len(&self) -> usize {
        std::mem::size_of_val(self.data)
    }
}

// ---------------------------------------------------------------------------------------------
// Dense files.

/// The gradflow metadata of a dense file (also in the manifest; kept in the file so that the
/// file describes itself).
#[derive(Debug, Serialize, Deserialize)]
struct DenseFileMeta {
    format_version: u32,
    step: u64,
    shard: u32,
    pieces: Vec<PieceEntry>,
}

/// Encodes `pieces` as one safetensors file; `slot_names(tensor)` gives each tensor's
/// optimizer slot names.
pub(crate) fn encode_dense<'a>(
    step: u64,
    shard: u32,
    pieces: &[&'a DensePieceSnapshot],
    slot_names: impl Fn(&str) -> &'static [&'static str],
) -> Result<(Vec<u8>, Vec<PieceEntry>), String> {
    let mut tensors: Vec<(String, PodView<'a, f32>)> = Vec::new();
    let mut entries = Vec::with_capacity(pieces.len());
    for p in pieces {
        let len = p.values.len();
        tensors.push((values_key(&p.tensor, p.partition), PodView { data: &p.values, shape: vec![len] }));
        for (s, name) in slot_names(&p.tensor).iter().enumerate() {
            let data = &p.state[s * len..(s + 1) * len];
            tensors.push((slot_key(&p.tensor, p.partition, name), PodView { data, shape: vec![len] }));
        }
        entries.push(PieceEntry {
            tensor: p.tensor.clone(),
            partition: p.partition,
            offset: p.offset,
            len: len as u64,
            steps: p.steps,
        });
    }
    let meta = DenseFileMeta { format_version: FORMAT_VERSION, step, shard, pieces: entries };
    let meta_json = serde_json::to_string(&meta).map_err(|e| e.to_string())?;
    let info = HashMap::from([(DENSE_METADATA_KEY.to_string(), meta_json)]);
    let bytes = safetensors::serialize(tensors, Some(info)).map_err(|e| e.to_string())?;
    Ok((bytes, meta.pieces))
}

/// A parsed dense file.
pub(crate) struct DenseFile<'a> {
    st: SafeTensors<'a>,
}

impl<'a> DenseFile<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, String> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| format!("not a valid safetensors file: {e}"))?;
        Ok(DenseFile { st })
    }

    /// The little-endian bytes of 1-D f32 tensor `key`, which must have `len` elements.
    pub fn f32_bytes(&self, key: &str, len: u64) -> Result<&'a [u8], String> {
        let view = self.st.tensor(key).map_err(|_| format!("has no tensor `{key}`"))?;
        if view.dtype() != Dtype::F32 || view.shape() != [len as usize] {
            return Err(format!(
                "tensor `{key}` is {:?} {:?}, expected F32 [{len}]",
                view.dtype(),
                view.shape()
            ));
        }
        Ok(view.data())
    }
}

// ---------------------------------------------------------------------------------------------
// Sparse files.

/// The JSON header of a sparse file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SparseHeader {
    pub table: String,
    pub dim: u32,
    pub num_slots: u32,
    pub slot_names: Vec<String>,
    pub rows: u64,
    /// The table's clock (its applied steps on this shard); 0 in files written before it.
    #[serde(default)]
    pub clock: u32,
    /// Whether a column of each row's last-update clock follows the steps.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub touched: bool,
    /// Bytes of the admission sketch after the state; 0 without one.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sketch_bytes: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Bytes of one row in a sparse file: id, steps, values, state (and the clock column).
fn row_bytes(dim: u32, num_slots: u32) -> u64 {
    8 + 4 + 4 * u64::from(dim) * (1 + u64::from(num_slots))
}

/// The header bytes of a sparse file (magic, version, length, JSON padded so that the ids start
/// at a multiple of 8).
fn sparse_prefix(header: &SparseHeader) -> Vec<u8> {
    let mut json = serde_json::to_vec(header).expect("a header serializes");
    while !(16 + json.len()).is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(16 + json.len());
    out.extend_from_slice(SPARSE_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

/// Encodes a table as a sparse file, in chunks of at most about `chunk_bytes`: returns the
/// total size and the chunks, produced lazily (so that a large table streams to a multipart
/// upload without a second copy in memory).
pub(crate) fn encode_sparse<'a>(
    t: &'a TableSnapshot,
    slot_names: &[&str],
    chunk_bytes: usize,
) -> (u64, impl Iterator<Item = Bytes> + 'a) {
    let touched = !t.touched.is_empty();
    let header = SparseHeader {
        table: t.table.clone(),
        dim: t.dim,
        num_slots: t.num_slots,
        slot_names: slot_names.iter().map(|s| s.to_string()).collect(),
        rows: t.ids.len() as u64,
        clock: t.clock,
        touched,
        sketch_bytes: t.sketch.len() as u64,
    };
    let prefix = sparse_prefix(&header);
    let per_row = row_bytes(t.dim, t.num_slots) + if touched { 4 } else { 0 };
    let total = prefix.len() as u64 + t.ids.len() as u64 * per_row + t.sketch.len() as u64;
    let chunk_bytes = chunk_bytes.max(64);
    let chunks = std::iter::once(Bytes::from(prefix))
        .chain(chunked(&t.ids, chunk_bytes))
        .chain(chunked(&t.steps, chunk_bytes))
        .chain(chunked(&t.touched, chunk_bytes))
        .chain(chunked(&t.values, chunk_bytes))
        .chain(chunked(&t.state, chunk_bytes))
        .chain(t.sketch.chunks(chunk_bytes).map(Bytes::copy_from_slice));
    (total, chunks)
}

fn chunked<T: Le>(data: &[T], chunk_bytes: usize) -> impl Iterator<Item = Bytes> + '_ {
    let per = (chunk_bytes / std::mem::size_of::<T>()).max(1);
    data.chunks(per).map(|c| Bytes::copy_from_slice(&le_bytes(c)))
}

/// A parsed sparse file: the header and the column sections.
pub(crate) struct SparseFile<'a> {
    pub header: SparseHeader,
    ids: &'a [u8],
    steps: &'a [u8],
    touched: &'a [u8],
    values: &'a [u8],
    state: &'a [u8],
    sketch: &'a [u8],
}

impl<'a> SparseFile<'a> {
    pub fn parse(b: &'a [u8]) -> Result<Self, String> {
        if b.len() < 16 || &b[..8] != SPARSE_MAGIC {
            return Err("not a gradflow sparse table file (bad magic)".into());
        }
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(format!("sparse format version {version}; this build reads {FORMAT_VERSION}"));
        }
        let hlen = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")) as usize;
        let json = b.get(16..16 + hlen).ok_or("truncated in its header")?;
        let header: SparseHeader =
            serde_json::from_slice(json).map_err(|e| format!("bad sparse header: {e}"))?;
        let body = &b[16 + hlen..];
        let n = usize::try_from(header.rows).map_err(|_| "absurd row count")?;
        let per_row = row_bytes(header.dim, header.num_slots) + if header.touched { 4 } else { 0 };
        let expected = header
            .rows
            .checked_mul(per_row)
            .and_then(|b| b.checked_add(header.sketch_bytes))
            .ok_or("absurd size")?;
        if body.len() as u64 != expected {
            return Err(format!(
                "{} rows of dim {} with {} slots and {} sketch bytes need {expected} bytes after the header, found {}",
                header.rows,
                header.dim,
                header.num_slots,
                header.sketch_bytes,
                body.len()
            ));
        }
        let (dim, slots) = (header.dim as usize, header.num_slots as usize);
        let (ids, rest) = body.split_at(n * 8);
        let (steps, rest) = rest.split_at(n * 4);
        let (touched, rest) = rest.split_at(if header.touched { n * 4 } else { 0 });
        let (values, rest) = rest.split_at(n * dim * 4);
        let (state, sketch) = rest.split_at(n * slots * dim * 4);
        debug_assert_eq!(sketch.len() as u64, header.sketch_bytes);
        Ok(SparseFile { header, ids, steps, touched, values, state, sketch })
    }

    pub fn rows(&self) -> usize {
        self.steps.len() / 4
    }

    pub fn id(&self, row: usize) -> u64 {
        u64_at(self.ids, row)
    }

    pub fn steps(&self, row: usize) -> u32 {
        u32_at(self.steps, row)
    }

    /// The table's clock when row `row` was last updated (the file's clock in files without
    /// the column).
    pub fn touched(&self, row: usize) -> u32 {
        if self.touched.is_empty() { self.header.clock } else { u32_at(self.touched, row) }
    }

    /// The admission sketch's cells (empty without one).
    pub fn sketch(&self) -> &'a [u8] {
        self.sketch
    }

    /// The first row whose values or state hold a NaN or an infinity, and its id.
    pub fn first_non_finite_row(&self) -> Option<(usize, u64)> {
        let (dim, slots) = (self.header.dim as usize, self.header.num_slots as usize);
        let in_values = first_non_finite_le(self.values).map(|i| i / dim.max(1));
        let in_state = first_non_finite_le(self.state).map(|i| i / (dim * slots).max(1));
        let row = match (in_values, in_state) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some((row, self.id(row)))
    }

    /// Little-endian bytes of row `row`'s values.
    pub fn values(&self, row: usize) -> &'a [u8] {
        let w = self.header.dim as usize * 4;
        &self.values[row * w..(row + 1) * w]
    }

    /// Little-endian bytes of row `row`'s state (slot 0, slot 1, ...).
    pub fn state(&self, row: usize) -> &'a [u8] {
        let w = self.header.dim as usize * self.header.num_slots as usize * 4;
        &self.state[row * w..(row + 1) * w]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> TableSnapshot {
        TableSnapshot {
            table: "emb".into(),
            dim: 3,
            num_slots: 2,
            ids: vec![5, u64::MAX, 0],
            values: (0..9).map(|x| x as f32).collect(),
            state: (0..18).map(|x| -(x as f32)).collect(),
            steps: vec![1, 2, 3],
            touched: vec![],
            clock: 0,
            sketch: vec![],
        }
    }

    #[test]
    fn clocks_and_sketch_round_trip_and_old_files_read_as_untouched() {
        let t = TableSnapshot { touched: vec![7, 9, 11], clock: 12, sketch: (0..=200).collect(), ..table() };
        let (total, chunks) = encode_sparse(&t, &["a", "b"], 7);
        let bytes: Vec<u8> = chunks.flat_map(|c| c.to_vec()).collect();
        assert_eq!(bytes.len() as u64, total);
        let f = SparseFile::parse(&bytes).unwrap();
        assert_eq!((f.touched(0), f.touched(2), f.header.clock), (7, 11, 12));
        assert_eq!(f.sketch(), &t.sketch[..]);
        assert_eq!(f.steps(2), 3);
        let mut row = [0f32; 6];
        f32s_from_le(f.state(2), &mut row);
        assert_eq!(row, [-12.0, -13.0, -14.0, -15.0, -16.0, -17.0]);
        assert!(SparseFile::parse(&bytes[..bytes.len() - 1]).is_err(), "a short sketch is refused");
        // A file written before the clock: every row reads as touched at the file's clock (0).
        let old_table = table();
        let (_, chunks) = encode_sparse(&old_table, &["a", "b"], 7);
        let old: Vec<u8> = chunks.flat_map(|c| c.to_vec()).collect();
        let f = SparseFile::parse(&old).unwrap();
        assert_eq!((f.touched(1), f.sketch().len()), (0, 0));
    }

    #[test]
    fn sparse_round_trip_in_small_chunks() {
        let t = table();
        let (total, chunks) = encode_sparse(&t, &["a", "b"], 5);
        let bytes: Vec<u8> = chunks.flat_map(|c| c.to_vec()).collect();
        assert_eq!(bytes.len() as u64, total);
        let f = SparseFile::parse(&bytes).unwrap();
        assert_eq!(f.rows(), 3);
        assert_eq!((f.id(1), f.steps(2)), (u64::MAX, 3));
        let mut row = [0f32; 3];
        f32s_from_le(f.values(2), &mut row);
        assert_eq!(row, [6.0, 7.0, 8.0]);
        let mut st = [0f32; 6];
        f32s_from_le(f.state(1), &mut st);
        assert_eq!(st, [-6.0, -7.0, -8.0, -9.0, -10.0, -11.0]);
        // the ids start 8-aligned
        let hlen = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
        assert_eq!((16 + hlen) % 8, 0);
    }

    #[test]
    fn non_finite_values_and_state_are_found_with_their_row() {
        let mut t = table();
        let encode = |t: &TableSnapshot| -> Vec<u8> {
            encode_sparse(t, &["a", "b"], 1 << 20).1.flat_map(|c| c.to_vec()).collect()
        };
        assert_eq!(SparseFile::parse(&encode(&t)).unwrap().first_non_finite_row(), None);
        t.state[4 * 2 + 1] = f32::NEG_INFINITY;
        assert_eq!(SparseFile::parse(&encode(&t)).unwrap().first_non_finite_row(), Some((1, u64::MAX)));
        t.values[8] = f32::NAN;
        assert_eq!(SparseFile::parse(&encode(&t)).unwrap().first_non_finite_row(), Some((1, u64::MAX)));
        t.values[0] = f32::INFINITY;
        assert_eq!(SparseFile::parse(&encode(&t)).unwrap().first_non_finite_row(), Some((0, 5)));
        assert_eq!(first_non_finite_le(&[0, 0, 0x80, 0x3f, 0, 0, 0xc0, 0x7f]), Some(1));
    }

    #[test]
    fn truncated_sparse_file_is_refused() {
        let t = table();
        let (_, chunks) = encode_sparse(&t, &["a", "b"], 1 << 20);
        let bytes: Vec<u8> = chunks.flat_map(|c| c.to_vec()).collect();
        let err = SparseFile::parse(&bytes[..bytes.len() - 4]).err().unwrap();
        assert!(err.contains("need"), "{err}");
        assert!(SparseFile::parse(b"GFSPARSX").is_err());
    }
}
