//! Dividing files among workers so that each example is read by exactly one worker per epoch.
//!
//! Files are cut into byte ranges, and [`RangeLines`](crate::lines::RangeLines) gives each
//! line to the range holding its first byte. No index of line offsets is needed, so a worker
//! can start on a 100 GB file at once; the price is that ranges hold roughly, not exactly,
//! equal numbers of examples.
//!
//! A [`FilePiece`] (a file and a byte range) is also the unit of work for dynamic sharding:
//! a coordinator can cut files with [`split_ranges`] into many more pieces than workers and
//! hand them out as workers become free, each read with [`Reader::from_pieces`](crate::Reader::from_pieces).

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::reader::Format;
use crate::remote::{Location, Stores};
use crate::source::Compression;

/// Cuts `0..file_len` into `parts` adjacent ranges of nearly equal length (they differ by at
/// most one byte), in order. Some are empty when `file_len < parts`.
///
/// # Panics
/// If `parts` is 0.
pub fn split_ranges(file_len: u64, parts: usize) -> Vec<Range<u64>> {
    assert!(parts > 0, "split_ranges needs at least one part");
    // u128 because `file_len * i` overflows u64 for files over 2^64 / parts bytes.
    let cut = |i: usize| ((file_len as u128 * i as u128) / parts as u128) as u64;
    (0..parts).map(|i| cut(i)..cut(i + 1)).collect()
}

/// A byte range of one file: the lines that start in it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FilePiece {
    /// The file.
    pub path: PathBuf,
    /// Byte range; lines starting in it belong to this piece.
    pub range: Range<u64>,
}

impl FilePiece {
    /// The piece covering all of `path`, whatever its length.
    pub fn whole(path: impl Into<PathBuf>) -> FilePiece {
        FilePiece { path: path.into(), range: 0..u64::MAX }
    }
}

/// Which worker this is among how many: worker `worker_index` reads the
/// `worker_index`-th byte range of every file when each is split into `num_workers` ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardSpec {
    /// 0-based index of this worker.
    pub worker_index: usize,
    /// Number of workers reading the same data.
    pub num_workers: usize,
}

impl Default for ShardSpec {
    /// One worker reading everything.
    fn default() -> ShardSpec {
        ShardSpec { worker_index: 0, num_workers: 1 }
    }
}

impl ShardSpec {
    /// A validated shard spec: `num_workers > 0` and `worker_index < num_workers`.
    pub fn new(worker_index: usize, num_workers: usize) -> Result<ShardSpec> {
        let s = ShardSpec { worker_index, num_workers };
        s.validate()?;
        Ok(s)
    }

    /// Checks `num_workers > 0` and `worker_index < num_workers`.
    pub fn validate(&self) -> Result<()> {
        if self.num_workers == 0 {
            return Err(DataError::Config("num_workers must be at least 1, found 0".into()));
        }
        if self.worker_index >= self.num_workers {
            return Err(DataError::Config(format!(
                "worker_index must be below num_workers ({}), found {}",
                self.num_workers, self.worker_index
            )));
        }
        Ok(())
    }

    /// This worker's pieces of `files`, in the order of `files`.
    ///
    /// Splits every file (rather than dealing whole files out) so that the load is balanced
    /// whatever the number and sizes of files. Files that cannot be cut (compressed ones and TFRecord files, see
    /// [`Compression::splittable`]) are dealt out whole instead: the `k`-th of them goes to
    /// worker `k % num_workers`.
    ///
    /// URLs among `files` are opened with the environment's settings only; see
    /// [`ShardSpec::pieces_in`].
    pub fn pieces(&self, files: &[PathBuf]) -> Result<Vec<FilePiece>> {
        self.pieces_in(files, &Stores::default())
    }

    /// [`ShardSpec::pieces`], with URLs opened in `stores`.
    pub fn pieces_in(&self, files: &[PathBuf], stores: &Stores) -> Result<Vec<FilePiece>> {
        self.pieces_of(files, stores, Format::Auto)
    }

    /// [`ShardSpec::pieces_in`] for files in `format`: for Parquet, the ranges are of row
    /// groups rather than bytes, and the row groups of all the Parquet files, counted in file
    /// order, are split among the workers as one sequence (a file of 3 row groups cannot be
    /// cut in two equal halves, but 2 such files can: worker 0 reads the first, worker 1 the
    /// second).
    pub fn pieces_of(&self, files: &[PathBuf], stores: &Stores, format: Format) -> Result<Vec<FilePiece>> {
        self.validate()?;
        let groups: Vec<Option<u64>> = files
            .iter()
            .map(|path| {
                (!whole_file(path, format) && is_parquet(path, format))
                    .then(|| units(path, stores, format))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        let total_groups: u64 = groups.iter().flatten().sum();
        let mine = split_ranges(total_groups, self.num_workers)[self.worker_index].clone();
        let (mut whole, mut first_group) = (0, 0u64);
        let mut pieces = Vec::with_capacity(files.len());
        for (path, groups) in files.iter().zip(groups) {
            if let Some(count) = groups {
                let start = mine.start.clamp(first_group, first_group + count) - first_group;
                let end = mine.end.clamp(first_group, first_group + count) - first_group;
                pieces.push(FilePiece { path: path.clone(), range: start..end });
                first_group += count;
                continue;
            }
            if whole_file(path, format) {
                if whole % self.num_workers == self.worker_index {
                    pieces.push(FilePiece::whole(path));
                }
                whole += 1;
                continue;
            }
            let len = units(path, stores, format)?;
            let range = split_ranges(len, self.num_workers)[self.worker_index].clone();
            pieces.push(FilePiece { path: path.clone(), range });
        }
        Ok(pieces)
    }
}

/// The pieces of about `task_bytes` each that dynamic sharding hands out: every file cut into
/// byte ranges, except files that cannot be cut (compressed, see [`Compression::splittable`], or TFRecord), which are
/// one piece each, and Parquet files (by `format`, or their extension), whose pieces are their
/// row groups, one each.
pub fn task_pieces(
    files: &[PathBuf],
    task_bytes: u64,
    stores: &Stores,
    format: Format,
) -> Result<Vec<FilePiece>> {
    let mut pieces = Vec::new();
    for path in files {
        if whole_file(path, format) {
            pieces.push(FilePiece::whole(path));
            continue;
        }
        if is_parquet(path, format) {
            let groups = units(path, stores, format)?;
            pieces.extend((0..groups).map(|g| FilePiece { path: path.clone(), range: g..g + 1 }));
            continue;
        }
        let len = file_size(path, stores)?;
        let parts = len.div_ceil(task_bytes.max(1)).max(1) as usize;
        pieces.extend(
            split_ranges(len, parts).into_iter().map(|range| FilePiece { path: path.clone(), range }),
        );
    }
    Ok(pieces)
}

/// Whether `path` is read whole by one reader: compressed, or TFRecord (records cannot be found
/// from the middle of a file).
fn whole_file(path: &Path, format: Format) -> bool {
    !Compression::of(path).splittable() || format.resolve(Some(path)) == Format::Tfrecord
}

fn is_parquet(path: &Path, format: Format) -> bool {
    format.resolve(Some(path)) == Format::Parquet
}

/// What a file is cut into for sharding: its row groups (Parquet) or its bytes.
fn units(path: &Path, stores: &Stores, format: Format) -> Result<u64> {
    if is_parquet(path, format) {
        return Ok(crate::parquet::info(path, stores)?.row_group_rows.len() as u64);
    }
    file_size(path, stores)
}

/// Length of a file (a local path or a URL) in bytes.
pub(crate) fn file_size(path: &Path, stores: &Stores) -> Result<u64> {
    match stores.locate(path)? {
        Location::Local(local) => file_len(&local),
        Location::Remote(remote) => remote.size(),
    }
}

/// Length of a local file in bytes.
pub fn file_len(path: &Path) -> Result<u64> {
    std::fs::metadata(path).map(|m| m.len()).map_err(|e| DataError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_tile_the_file() {
        for len in [0u64, 1, 2, 7, 100, 1001] {
            for parts in 1..9 {
                let r = split_ranges(len, parts);
                assert_eq!(r.len(), parts);
                assert_eq!(r[0].start, 0);
                assert_eq!(r[parts - 1].end, len);
                for w in r.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                let sizes: Vec<u64> = r.iter().map(|x| x.end - x.start).collect();
                let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(max - min <= 1);
            }
        }
    }

    #[test]
    fn huge_file_does_not_overflow() {
        let r = split_ranges(u64::MAX, 3);
        assert_eq!(r[2].end, u64::MAX);
    }

    #[test]
    fn invalid_specs() {
        assert!(ShardSpec::new(0, 0).is_err());
        assert!(ShardSpec::new(3, 3).is_err());
        assert!(ShardSpec::new(2, 3).is_ok());
    }
}
