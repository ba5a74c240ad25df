//! Training data for gradflow workers.
//!
//! A worker turns a [`ReaderConfig`] and its [`ShardSpec`] into a [`Reader`], then calls
//! [`Reader::next_batch`] to refill one [`Batch`] over and over:
//!
//! ```no_run
//! use gradflow_data::{Batch, Format, Reader, ReaderConfig, ShardSpec};
//! # fn main() -> Result<(), gradflow_data::DataError> {
//! let config = ReaderConfig::new(Format::Csv, vec!["train.csv".into()]);
//! let mut reader = Reader::open(&config, ShardSpec::new(0, 4)?)?;
//! let mut batch = Batch::new(reader.num_dense());
//! while reader.next_batch(&mut batch, 256)? > 0 {
//!     // train on `batch`; `reader.end_of_epoch()` marks the last batch of each epoch
//! }
//! # Ok(())
//! # }
//! ```
//!
//! - [`batch`]: the [`Batch`] every model reads.
//! - [`reader`]: the streaming pipeline (files, shard, parse, shuffle, batch) and its config;
//!   [`read_ahead`]: a reader on its own thread, batches ahead of training.
//! - [`shard`]: byte-range sharding ([`split_ranges`], [`ShardSpec`], [`FilePiece`]).
//! - [`lines`]: reading the lines of one byte range, the building block of sharding.
//! - [`libsvm`], [`csv`], [`parquet`], [`tfrecord`]: the formats; [`hash`]: stable ids for categorical values.
//! - [`source`]: where a file's bytes come from, and gzip/zstd decompression;
//!   [`remote`]: files on object storage (URLs, globs, ranged reads with read-ahead).
//! - [`shuffle`]: the streaming shuffle buffer.
//! - [`synth`]: synthetic click-through data with a known oracle AUC.
//! - [`convert`]: CSV to Parquet (`gradflow data convert`).
//! - [`inspect`]: what a data file holds (`gradflow data inspect`).
//! - [`metrics`]: AUC, log loss, accuracy. [`standardize`]: feature standardization.
//! - The error type, [`DataError`], is in [`error`].

#![forbid(unsafe_code)]

pub mod batch;
pub mod convert;
pub mod csv;
pub mod error;
pub mod example;
pub mod hash;
pub mod inspect;
pub mod libsvm;
pub mod lines;
pub mod metrics;
pub mod parquet;
pub mod read_ahead;
pub mod reader;
pub mod remote;
mod rng;
pub use rng::SplitMix64;
pub mod shard;
pub mod shuffle;
pub mod source;
pub mod standardize;
pub mod synth;
pub mod tfrecord;

pub use batch::Batch;
pub use csv::CsvSchema;
pub use error::DataError;
pub use example::{Example, Labels};
pub use hash::categorical_id;
pub use inspect::{Inspection, inspect};
pub use libsvm::LibsvmOptions;
pub use read_ahead::{Ahead, ReadAhead};
pub use reader::{Epochs, Format, Reader, ReaderConfig, SKIPPED_LINES_KEPT};
pub use remote::{RemoteOptions, Stores, is_url};
pub use shard::{FilePiece, ShardSpec, split_ranges, task_pieces};
pub use shuffle::ShuffleBuffer;
pub use source::Compression;
pub use standardize::Standardizer;
pub use synth::{SynthConfig, SynthSummary, write_synth};
