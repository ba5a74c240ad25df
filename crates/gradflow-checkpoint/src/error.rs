//! The error type of this crate. Every variant names the URL of the object, checkpoint or
//! store it is about, so that a message alone tells an operator where to look.

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// Why a checkpoint could not be written, found, read or exported.
///
/// Object-store failures carry the store's own error in `cause` (also written out in the
/// message, which is why it is not a `#[source]`: chains printed with `{:#}` would repeat it).
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// The checkpoint location could not be understood.
    #[error("invalid checkpoint location `{url}`: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// The object store for a location could not be built (bad credentials config, bad bucket
    /// name, ...).
    #[error("cannot open the object store for `{url}`: {cause}")]
    Open { url: String, cause: object_store::Error },
    /// The store refused or failed a write.
    #[error("writing `{object}` failed: {cause}")]
    Write { object: String, cause: object_store::Error },
    /// The store failed a read (other than "not found", which has its own variants).
    #[error("reading `{object}` failed: {cause}")]
    Read { object: String, cause: object_store::Error },
    /// The store failed to list a prefix.
    #[error("listing `{prefix}` failed: {cause}")]
    List { prefix: String, cause: object_store::Error },
    /// The store failed to delete an object while pruning old checkpoints.
    #[error("deleting `{object}` failed: {cause}")]
    Delete { object: String, cause: object_store::Error },
    /// An object is missing, truncated, fails its checksum or cannot be parsed.
    #[error("`{object}` is corrupt: {reason}")]
    Corrupt { object: String, reason: String },
    /// A file that a manifest lists is not in the store.
    #[error("`{object}` is missing (the checkpoint's manifest lists it)")]
    MissingFile { object: String },
    /// The checkpoint's `manifest.json` is not there: the checkpoint does not exist (it may be
    /// still being written, or its writer died before finishing it).
    #[error(
        "checkpoint `{checkpoint}` does not exist: `{manifest}` is missing (a checkpoint without its \
         manifest is incomplete)"
    )]
    MissingManifest { checkpoint: String, manifest: String },
    /// There is no complete checkpoint under a root.
    #[error("no checkpoint under `{root}`")]
    NoCheckpoint { root: String },
    /// `write_shard` was asked to write into a checkpoint that is already complete.
    #[error("checkpoint `{checkpoint}` is already complete; refusing to overwrite its files")]
    AlreadyComplete { checkpoint: String },
    /// `finalize` gave up waiting for some shards' manifests.
    #[error(
        "timed out after {waited:?} waiting for shard(s) {missing:?} of checkpoint `{checkpoint}` \
         (`{first_missing}` is not there)"
    )]
    Timeout { checkpoint: String, missing: Vec<u32>, first_missing: String, waited: Duration },
    /// The shards of a checkpoint disagree, or do not cover the whole model.
    #[error("checkpoint `{checkpoint}` is inconsistent: {reason}")]
    Inconsistent { checkpoint: String, reason: String },
    /// The checkpoint holds another model than the job's (see [`crate::Manifest::check_spec`]).
    #[error("checkpoint `{checkpoint}` holds another model than this job's: {difference}")]
    SpecMismatch { checkpoint: String, difference: String },
    /// A snapshot handed to `write_shard` does not match its own spec.
    #[error("invalid snapshot of shard {shard}: {reason}")]
    InvalidSnapshot { shard: u32, reason: String },
    /// A bad argument (a shard index out of range, an unknown step syntax, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// The exported file could not be written.
    #[error("exporting to `{path}` failed: {reason}")]
    Export { path: PathBuf, reason: String },
    /// A shard gave the checkpoint up (its upload failed, or it went past the step without
    /// taking it): the checkpoint will never be complete.
    #[error("checkpoint `{checkpoint}` was abandoned by shard {shard}: {reason}")]
    Abandoned { checkpoint: String, shard: u32, reason: String },
}

impl CheckpointError {
    /// True for errors that say a checkpoint or object is not there (as opposed to broken or
    /// unreachable).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            CheckpointError::MissingFile { .. }
                | CheckpointError::MissingManifest { .. }
                | CheckpointError::NoCheckpoint { .. }
        )
    }
}
