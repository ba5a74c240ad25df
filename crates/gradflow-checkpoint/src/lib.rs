//! Checkpoints of a gradflow model on object storage, and their export.
//!
//! Each parameter-server shard writes its own part of a checkpoint ([`CheckpointStore::write_shard`]);
//! one process then completes it ([`CheckpointStore::finalize`]). A checkpoint restores onto any
//! number of shards ([`CheckpointStore::load_shard`] re-splits dense tensors and re-hashes sparse
//! ids), and exports as a single safetensors file for use outside gradflow
//! ([`CheckpointStore::export`]).
//!
//! # Where checkpoints go
//!
//! Every read and write goes through the [`object_store`] crate; the root URL picks the store
//! ([`CheckpointStore::open`]): a local folder (a plain path such as `./checkpoints`, or
//! `file:///...`), `s3://bucket/prefix` (configured by `AWS_*` variables, so MinIO and other
//! S3-compatible servers work through `AWS_ENDPOINT` and, for plain http, `AWS_ALLOW_HTTP=true`),
//! `gs://bucket/prefix`, `az://container/prefix`, or `memory://name/prefix` (process-wide,
//! shared by every handle to the same name; for tests).
//!
//! # Layout
//!
//! ```text
//! <root>/latest                                   "ckpt-000000001200\n": the newest complete checkpoint
//! <root>/best                                     JSON: the best-scoring complete checkpoint (`keep_best`), its step and score
//! <root>/ckpt-000000001200/                       one checkpoint; the step, zero-padded to 12 digits
//! <root>/ckpt-000000001200/manifest.json          the checkpoint's manifest (written last)
//! <root>/ckpt-000000001200/shard-0/manifest.json  shard 0's manifest (written after its files)
//! <root>/ckpt-000000001200/shard-0/dense-0.safetensors   dense pieces + optimizer state
//! <root>/ckpt-000000001200/shard-0/dense-1.safetensors   (one file per ~128 MiB)
//! <root>/ckpt-000000001200/shard-0/sparse-0.bin   shard 0's rows of sparse table 0 (spec order)
//! <root>/ckpt-000000001200/shard-1/...
//! ```
//!
//! # Commit protocol
//!
//! 1. Each shard writes its data files, then its `shard-<s>/manifest.json` listing them with
//!    their sizes and CRC-32C checksums.
//! 2. `finalize` waits for every shard manifest, checks that they agree and cover the whole
//!    model, and writes the checkpoint's `manifest.json` (every file again, with size and
//!    checksum, plus step, time, mode, whether all shards had the same model version, the spec,
//!    and last `manifest_crc32c`, the CRC-32C of the manifest's own bytes before that field).
//!    **A checkpoint without its `manifest.json` does not exist**: listing skips it and resolving
//!    it is an error.
//! 3. Only then is `latest` moved to it (never backwards), and only then are old checkpoints
//!    beyond the newest `keep` deleted (manifest first), all but the one `best` names (a
//!    scored checkpoint is offered as the best once complete: [`CheckpointStore::offer_best`]).
//!
//! So a writer killed at any point leaves the previous checkpoint and `latest` intact, and a
//! file truncated or altered afterwards is caught by its size or checksum when it is read, with
//! an error naming the object.
//!
//! # Dense files
//!
//! Safetensors files. For piece `P` (the writer's partition index) of tensor `T`, the values are
//! the 1-D `F32` tensor `T:P:values` and each optimizer slot `S` (named by
//! `OptimizerConfig::slot_names`, e.g. `exp_avg`) is `T:P:S`, of the same length. The
//! safetensors metadata key `gradflow` holds JSON: `format_version`, `step`, `shard` and the
//! pieces (`tensor`, `partition`, `offset` (first element in the flattened tensor), `len`,
//! `steps`), the same as in the manifest.
//!
//! # Sparse files
//!
//! One file per table per shard, little-endian:
//!
//! ```text
//! offset  size           content
//! 0       8              magic "GFSPARSE"
//! 8       4              format version (u32) = 1
//! 12      4              header length H (u32)
//! 16      H              JSON header: {"table", "dim", "num_slots", "slot_names", "rows"},
//!                        padded with spaces so that 16 + H is a multiple of 8
//! 16+H    8*n            row ids (u64)
//! ...     4*n            per-row optimizer steps (u32)
//! ...     4*n*dim        row values (f32), row after row
//! ...     4*n*k*dim      optimizer state (f32), row after row; within a row, slot 0 (dim
//!                        floats), then slot 1, ... (k = num_slots)
//! ```
//!
//! The file is exactly `16 + H + n * (12 + 4 * dim * (1 + k))` bytes; `n` is `rows`.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo(snap: gradflow_checkpoint::ShardSnapshot) -> Result<(), gradflow_checkpoint::CheckpointError> {
//! use std::time::Duration;
//! use gradflow_checkpoint::CheckpointStore;
//!
//! let store = CheckpointStore::open("s3://my-bucket/jobs/ctr")?;
//! store.write_shard(1200, &snap).await?;                       // on every shard
//! store.finalize(1200, 2, 3, Duration::from_secs(600)).await?; // on shard 0: keep 3
//!
//! let manifest = store.resolve("latest").await?;
//! manifest.check_spec(&snap.spec)?;
//! let mine = store.load_shard(&manifest, 0, 3, 4 << 20).await?; // restore onto 3 shards
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

mod best;
mod error;
mod format;
pub mod lease;
mod load;
mod manifest;
mod snapshot;
mod store;

pub use best::{BEST, BestPointer, Score};
pub use error::CheckpointError;
pub use format::SPARSE_MAGIC;
pub use manifest::{
    CheckpointInfo, Crc32c, FORMAT_VERSION, FileContent, FileEntry, MANIFEST_CHECKSUM_FIELD, MANIFEST_FORMAT,
    Manifest, ObjectEntry, PieceEntry, SHARD_MANIFEST_FORMAT, ShardEntry, ShardManifest, escaped,
};
pub use snapshot::{DensePieceSnapshot, ShardSnapshot, TableSnapshot};
pub use store::{CheckpointStore, LATEST, Listing, MANIFEST, StoreOptions, Unreadable};

/// The name of checkpoint `step`'s directory: `ckpt-` and the step zero-padded to 12 digits.
pub fn checkpoint_dir_name(step: u64) -> String {
    format!("ckpt-{step:012}")
}

/// The step of a checkpoint directory name (`ckpt-` and at least 12 digits), else `None`.
pub fn parse_checkpoint_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("ckpt-")?;
    if digits.len() < 12 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_names_round_trip() {
        assert_eq!(checkpoint_dir_name(1200), "ckpt-000000001200");
        assert_eq!(parse_checkpoint_dir_name("ckpt-000000001200"), Some(1200));
        assert_eq!(parse_checkpoint_dir_name(&checkpoint_dir_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_checkpoint_dir_name("ckpt-12"), None);
        assert_eq!(parse_checkpoint_dir_name("ckpt-00000000120x"), None);
        assert_eq!(parse_checkpoint_dir_name("other"), None);
    }
}
