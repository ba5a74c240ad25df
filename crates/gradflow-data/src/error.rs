//! The error type of this crate.
//!
//! Every error about a data file names the file; every error about a line also names its
//! 1-based line number and says what was expected and what was found, so a user can open the
//! file at that line and fix it without rerunning anything under a debugger.

use std::path::PathBuf;

use thiserror::Error;

/// Reading, parsing or generating data failed.
#[derive(Debug, Error)]
pub enum DataError {
    /// Opening, reading or writing a file failed.
    ///
    /// `cause` is written out in the message, so it is not a `#[source]`: a chain printed with
    /// `{:#}` would say it twice.
    #[error("{}: {cause}", .path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// What the operating system said.
        cause: std::io::Error,
    },
    /// A line of a data file is not what its format requires.
    #[error("{}, line {line}: expected {expected}, found {found}", .path.display())]
    Parse {
        /// The file holding the line.
        path: PathBuf,
        /// 1-based line number, counted from the start of the file (not of a shard).
        line: u64,
        /// What the format requires at that point.
        expected: String,
        /// What the line holds there.
        found: String,
    },
    /// A data path written as a URL is not one this crate can read: it does not parse, or its
    /// scheme is not supported.
    #[error("data URL `{url}`: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it, and what was expected.
        reason: String,
    },
    /// A data URL names no object: the object, its bucket, or (for a folder or a glob) any
    /// object under it does not exist. Not retried.
    #[error("{url}: {what}")]
    NotFound {
        /// The URL as given.
        url: String,
        /// What is missing.
        what: &'static str,
    },
    /// A request to the object store failed (after retrying, where the failure was transient).
    #[error("{url}: {cause}")]
    Store {
        /// The URL of the object (or prefix) involved.
        url: String,
        /// What the store said.
        cause: object_store::Error,
    },
    /// A Parquet file could not be read, or its columns are not what the config names.
    #[error("{}: {cause}", .path.display())]
    Parquet {
        /// The file (or URL).
        path: PathBuf,
        /// What was wrong.
        cause: String,
    },
    /// A row of a Parquet file is not what its column roles require.
    #[error("{}, row {row}: expected {expected}, found {found}", .path.display())]
    Row {
        /// The file (or URL).
        path: PathBuf,
        /// 1-based row number, counted from the start of the file.
        row: u64,
        /// What the column roles require.
        expected: String,
        /// What the row holds.
        found: String,
    },
    /// A configuration (reader, shard, synthetic data) is not usable.
    #[error("invalid data config: {0}")]
    Config(String),
}

impl DataError {
    /// Wraps an I/O error with the file it came from.
    pub fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> DataError {
        DataError::Io { path: path.into(), cause }
    }
}

/// `Result` with [`DataError`] as the default error.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
