//! Manifests: the JSON files that say what a checkpoint (and each shard's part of it) holds.
//!
//! A shard's `shard-<s>/manifest.json` ([`ShardManifest`]) lists that shard's files with their
//! sizes and CRC-32C checksums. The checkpoint's `manifest.json` ([`Manifest`]) repeats all of
//! them, so a reader needs only that one file to find and verify everything.
//!
//! The checkpoint's manifest checks itself: its last field, `manifest_crc32c`, is the CRC-32C
//! of every byte of the file before the `,` that precedes it ([`encode_manifest`],
//! [`decode_manifest`]). Shard manifests need no such field: the checkpoint's manifest holds
//! their sizes and checksums.

use std::collections::HashMap;
use std::fmt;

use chrono::{DateTime, Utc};
use gradflow_core::{Mode, ModelSpec};
use serde::{Deserialize, Serialize};

use crate::CheckpointError;

/// `format` of a checkpoint's `manifest.json`.
pub const MANIFEST_FORMAT: &str = "gradflow-checkpoint";
/// `format` of a shard's `manifest.json`.
pub const SHARD_MANIFEST_FORMAT: &str = "gradflow-checkpoint-shard";
/// The version of the layout and file formats this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// A CRC-32C (Castagnoli) checksum, written in JSON as 8 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Crc32c(pub u32);

impl Crc32c {
    /// The checksum of `data`.
    pub fn of(data: &[u8]) -> Crc32c {
        Crc32c(crc32c::crc32c(data))
    }
}

impl fmt::Display for Crc32c {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

impl Serialize for Crc32c {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Crc32c {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        u32::from_str_radix(&s, 16)
            .ok()
            .filter(|_| s.len() == 8)
            .map(Crc32c)
            .ok_or_else(|| serde::de::Error::custom(format!("`{s}` is not a crc32c (8 hex digits)")))
    }
}

/// An object of a checkpoint: where it is (relative to the checkpoint directory), its size and
/// its checksum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectEntry {
    /// Path relative to the checkpoint directory, `/`-separated (e.g. `shard-0/manifest.json`).
    pub path: String,
    pub bytes: u64,
    pub crc32c: Crc32c,
}

/// A data file of a shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the checkpoint directory, `/`-separated
    /// (e.g. `shard-0/dense-0.safetensors`).
    pub path: String,
    pub bytes: u64,
    pub crc32c: Crc32c,
    /// What the file holds.
    #[serde(flatten)]
    pub content: FileContent,
}

/// What a data file holds (in JSON: a `kind` field, `"dense"` or `"sparse"`, beside the rest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FileContent {
    /// A safetensors file of dense pieces with their optimizer state.
    Dense { pieces: Vec<PieceEntry> },
    /// One table's rows in the sparse binary format.
    Sparse { table: String, dim: u32, num_slots: u32, rows: u64 },
}

/// A dense piece in a dense file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PieceEntry {
    pub tensor: String,
    /// The piece's index among the tensor's pieces under the writer's placement.
    pub partition: u32,
    /// First element of the piece in the flattened tensor.
    pub offset: u64,
    /// Number of elements.
    pub len: u64,
    /// Optimizer updates applied to the piece.
    pub steps: u64,
}

/// A shard's part of a checkpoint (`shard-<s>/manifest.json`), written after the shard's files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardManifest {
    /// Always [`SHARD_MANIFEST_FORMAT`].
    pub format: String,
    pub format_version: u32,
    pub step: u64,
    pub shard: u32,
    pub num_shards: u32,
    /// The shard's model version when the snapshot was taken.
    pub version: u64,
    pub mode: Mode,
    pub partition_bytes: u64,
    /// When the shard's files were written.
    pub time: DateTime<Utc>,
    pub spec: ModelSpec,
    pub files: Vec<FileEntry>,
    /// The run that wrote it (`GRADFLOW_RUN_ID`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// What a predictor needs beside the parameters ([`ShardSnapshot::serving`](crate::ShardSnapshot::serving)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<serde_json::Value>,
}

impl ShardManifest {
    /// Bytes of the shard's data files (at most `u64::MAX`: only a corrupt manifest comes near).
    pub fn data_bytes(&self) -> u64 {
        self.files.iter().fold(0u64, |a, f| a.saturating_add(f.bytes))
    }
}

/// One shard of a complete checkpoint, as the checkpoint's manifest records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub shard: u32,
    /// The shard's model version when its snapshot was taken.
    pub version: u64,
    /// The shard's own manifest.
    pub manifest: ObjectEntry,
    /// The shard's data files.
    pub files: Vec<FileEntry>,
}

/// A complete checkpoint: the content of its `manifest.json`.
///
/// Returned by [`CheckpointStore::finalize`] and [`CheckpointStore::resolve`], which also
/// remember where the checkpoint lives, so that [`CheckpointStore::load_shard`] and
/// [`CheckpointStore::export`] read it from there (even from another root than the store's).
///
/// Unknown fields are refused: every field a manifest holds was written by this type, and a
/// field whose name a flipped bit changed must not pass as one this build does not know.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    pub format_version: u32,
    /// The training step the checkpoint was taken at.
    pub step: u64,
    /// When the checkpoint was completed.
    pub time: DateTime<Utc>,
    pub mode: Mode,
    /// True when every shard's snapshot has the same model version.
    pub consistent: bool,
    pub num_shards: u32,
    /// The writers' placement: `Placement::new(spec, num_shards, partition_bytes)`.
    pub partition_bytes: u64,
    /// Bytes of every file of the checkpoint except this manifest.
    pub total_bytes: u64,
    pub spec: ModelSpec,
    /// Per shard, in shard order.
    pub shards: Vec<ShardEntry>,
    /// The run that wrote it (`GRADFLOW_RUN_ID`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// What a predictor needs beside the parameters, from shard 0's manifest (see
    /// [`ShardSnapshot::serving`](crate::ShardSnapshot::serving)); covered by the manifest's
    /// checksum like every other field. `None` in checkpoints written without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<serde_json::Value>,
    #[serde(skip)]
    pub(crate) origin: Option<Origin>,
}

/// The last field of a checkpoint manifest: the CRC-32C of the bytes before it.
pub const MANIFEST_CHECKSUM_FIELD: &str = "manifest_crc32c";

/// The bytes of a checkpoint's `manifest.json`: `m` as pretty JSON, closed by the field
/// [`MANIFEST_CHECKSUM_FIELD`], the CRC-32C of every byte before its `,`.
pub(crate) fn encode_manifest(m: &Manifest) -> Vec<u8> {
    let mut json = serde_json::to_vec_pretty(m).expect("a manifest serializes");
    // Pretty JSON of an object ends with its closing brace on a line of its own.
    debug_assert!(json.ends_with(b"\n}"));
    json.truncate(json.len() - 2);
    let crc = Crc32c::of(&json);
    json.extend_from_slice(format!(",\n  \"{MANIFEST_CHECKSUM_FIELD}\": \"{crc}\"\n}}\n").as_bytes());
    json
}

/// Parses a checkpoint's `manifest.json` and checks its checksum; the error is why the bytes
/// are not a manifest.
///
/// Manifests written before manifests carried a checksum (no [`MANIFEST_CHECKSUM_FIELD`])
/// are read without that check; their data files are still checked against the sizes and
/// checksums they list.
pub(crate) fn decode_manifest(bytes: &[u8]) -> Result<Manifest, String> {
    let text = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let head = format!(",\n  \"{MANIFEST_CHECKSUM_FIELD}\": \"");
    let tail_len = head.len() + 8 + "\"\n}".len();
    if let Some(split) = text.len().checked_sub(tail_len) {
        let (content, tail) = text.split_at(split);
        if tail.starts_with(head.as_bytes()) && tail.ends_with(b"\"\n}") {
            let digits = &tail[head.len()..head.len() + 8];
            // Lowercase only, as written: a flipped case bit is a changed file too.
            let said = std::str::from_utf8(digits)
                .ok()
                .filter(|d| d.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
                .and_then(|d| u32::from_str_radix(d, 16).ok())
                .map(Crc32c)
                .ok_or_else(|| {
                    format!(
                        "its {MANIFEST_CHECKSUM_FIELD} is not 8 lowercase hex digits: {}",
                        escaped(digits, 16)
                    )
                })?;
            let actual = Crc32c::of(content);
            if actual != said {
                return Err(format!(
                    "checksum mismatch: the manifest's content has crc32c {actual}, its \
                     {MANIFEST_CHECKSUM_FIELD} says {said} (changed after it was written)"
                ));
            }
            let mut json = content.to_vec();
            json.extend_from_slice(b"\n}");
            return serde_json::from_slice(&json).map_err(|e| format!("not a manifest: {e}"));
        }
    }
    if text.windows(MANIFEST_CHECKSUM_FIELD.len()).any(|w| w == MANIFEST_CHECKSUM_FIELD.as_bytes()) {
        return Err(format!(
            "its {MANIFEST_CHECKSUM_FIELD} is not its last line, where gradflow writes it (changed after \
             it was written)"
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| format!("not a manifest: {e}"))
}

/// At most `max` bytes of `bytes` for a message, with anything not printable ASCII escaped,
/// and how long the whole was when it is cut: never raw bytes on a terminal.
pub fn escaped(bytes: &[u8], max: usize) -> String {
    let shown: String =
        bytes.iter().take(max).flat_map(|b| std::ascii::escape_default(*b)).map(char::from).collect();
    if bytes.len() > max { format!("\"{shown}...\" ({} bytes)", bytes.len()) } else { format!("\"{shown}\"") }
}

/// Where a resolved manifest lives: the object store and path of its root, the root's URL,
/// and the checkpoint directory's name. A plain handle: a [`CheckpointStore`] is opened on it
/// to read the checkpoint's files.
///
/// [`CheckpointStore`]: crate::CheckpointStore
#[derive(Clone)]
pub(crate) struct Origin {
    pub store: std::sync::Arc<dyn object_store::ObjectStore>,
    pub root: object_store::path::Path,
    /// The root's URL, without a trailing `/`.
    pub url: String,
    pub dir: String,
}

impl fmt::Debug for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Origin").field("url", &self.url).field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Manifest {
    /// `Ok` when the checkpoint holds the model `spec` describes, else
    /// [`CheckpointError::SpecMismatch`] with the first difference ("before" is the checkpoint,
    /// "now" is `spec`).
    pub fn check_spec(&self, spec: &ModelSpec) -> Result<(), CheckpointError> {
        match self.spec.first_difference(spec) {
            None => Ok(()),
            Some(difference) => Err(CheckpointError::SpecMismatch { checkpoint: self.url(), difference }),
        }
    }

    /// The checkpoint directory's name: where it was resolved from, else `ckpt-<step>`.
    pub fn dir_name(&self) -> String {
        match &self.origin {
            Some(o) => o.dir.clone(),
            None => crate::checkpoint_dir_name(self.step),
        }
    }

    /// The URL of the checkpoint directory when known (from `resolve` or `finalize`), else its
    /// name.
    pub fn url(&self) -> String {
        match &self.origin {
            Some(o) => format!("{}/{}", o.url.trim_end_matches('/'), o.dir),
            None => self.dir_name(),
        }
    }

    /// Each shard's model version, in shard order.
    pub fn versions(&self) -> Vec<u64> {
        self.shards.iter().map(|s| s.version).collect()
    }

    /// Rows of sparse table `table` over all shards (0 for an unknown table; at most
    /// `u64::MAX`: only a corrupt manifest comes near).
    pub fn table_rows(&self, table: &str) -> u64 {
        self.files()
            .filter_map(|f| match &f.content {
                FileContent::Sparse { table: t, rows, .. } if t == table => Some(*rows),
                _ => None,
            })
            .fold(0u64, u64::saturating_add)
    }

    /// Every data file of every shard.
    pub fn files(&self) -> impl Iterator<Item = &FileEntry> {
        self.shards.iter().flat_map(|s| &s.files)
    }

    /// A one-line summary for listings.
    pub fn info(&self) -> CheckpointInfo {
        CheckpointInfo {
            run_id: self.run_id.clone(),
            step: self.step,
            dir: self.dir_name(),
            url: self.url(),
            time: self.time,
            mode: self.mode,
            consistent: self.consistent,
            num_shards: self.num_shards,
            total_bytes: self.total_bytes,
        }
    }
}

/// Elements of a tensor of shape `shape`, or `None` when there are more than `u64::MAX` (a
/// spec read from storage may say anything; `DenseSpec::numel` would overflow).
pub(crate) fn numel(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d))
}

/// Checks that `pieces` hold every element of every dense tensor of `spec` exactly once, and
/// nothing else; the reason names the tensor and the elements at fault.
pub(crate) fn check_coverage<'a>(
    spec: &ModelSpec,
    pieces: impl IntoIterator<Item = &'a PieceEntry>,
) -> Result<(), String> {
    let mut ranges: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
    for p in pieces {
        let end = p.offset.checked_add(p.len).ok_or_else(|| {
            format!(
                "dense tensor `{}`: a piece of {} elements at {} ends past 2^64",
                p.tensor, p.len, p.offset
            )
        })?;
        ranges.entry(p.tensor.as_str()).or_default().push((p.offset, end));
    }
    for d in &spec.dense {
        let numel = numel(&d.shape)
            .ok_or_else(|| format!("dense tensor `{}`: shape {:?} is too large", d.name, d.shape))?;
        let mut r = ranges.remove(d.name.as_str()).unwrap_or_default();
        r.sort_unstable();
        let mut next = 0;
        for (a, b) in r {
            if a != next {
                return Err(format!(
                    "dense tensor `{}`: elements {}..{} are {}",
                    d.name,
                    a.min(next),
                    a.max(next),
                    if a > next { "in no shard" } else { "in two shards" }
                ));
            }
            next = b;
        }
        if next != numel {
            return Err(if next < numel {
                format!("dense tensor `{}`: elements {next}..{numel} are in no shard", d.name)
            } else {
                format!("dense tensor `{}` has {numel} elements, but its pieces end at {next}", d.name)
            });
        }
    }
    match ranges.keys().next() {
        Some(t) => Err(format!("dense tensor `{t}` is not in the spec")),
        None => Ok(()),
    }
}

/// A complete checkpoint in a listing ([`CheckpointStore::list`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    pub step: u64,
    /// Directory name, `ckpt-<step>`.
    pub dir: String,
    /// URL of the checkpoint directory.
    pub url: String,
    /// When it was completed.
    pub time: DateTime<Utc>,
    pub mode: Mode,
    /// True when every shard's snapshot has the same model version.
    pub consistent: bool,
    pub num_shards: u32,
    /// Bytes of every file except the top-level manifest.
    pub total_bytes: u64,
    /// The run that wrote it, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use gradflow_core::{DenseSpec, Initializer, OptimizerConfig};

    use super::*;

    fn piece(offset: u64, len: u64) -> PieceEntry {
        PieceEntry { tensor: "w".into(), partition: 0, offset, len, steps: 0 }
    }

    // Found by the fuzz targets: a spec or pieces read from storage overflowed u64 while being
    // checked (`DenseSpec::numel`, `offset + len`), a panic in debug builds.
    #[test]
    fn coverage_counts_without_overflow() {
        let mut spec = ModelSpec {
            dense: vec![DenseSpec {
                name: "w".into(),
                shape: vec![2, 3],
                init: Initializer::Zeros,
                optimizer: OptimizerConfig::sgd(0.1),
            }],
            sparse: vec![],
        };
        assert_eq!(check_coverage(&spec, &[piece(0, 4), piece(4, 2)]), Ok(()));
        assert!(check_coverage(&spec, &[piece(0, 4), piece(3, 3)]).unwrap_err().contains("in two shards"));
        assert!(check_coverage(&spec, &[piece(0, 4), piece(4, u64::MAX)]).unwrap_err().contains("past 2^64"));
        spec.dense[0].shape = vec![u64::MAX, 2];
        assert_eq!(numel(&spec.dense[0].shape), None);
        assert!(check_coverage(&spec, &[piece(0, 4)]).unwrap_err().contains("too large"));
        assert_eq!(numel(&[]), Some(1));
    }
}
