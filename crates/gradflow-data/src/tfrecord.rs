//! TFRecord files of `tf.Example` protobufs, plain or gzip (`.tfrecord.gz`), with every
//! record's checksums verified.
//!
//! A record is framed as `length: u64 LE`, `masked crc32c(length): u32 LE`, `data`, `masked
//! crc32c(data): u32 LE`; a checksum that does not match is an error naming the file and the
//! record, never skipped (a corrupt length would misframe everything after it). `data` is a
//! `tf.Example`: named features, each a list of bytes, floats or int64s.
//!
//! Features are chosen by name as CSV columns are: the label feature (one float or int64), the
//! categorical features (bytes or int64s; every value is one sparse entry, so a feature with
//! several values is a multi-id field; a value gets the id its text gets in a CSV cell, an
//! integer written in decimal), and every other feature of the first record dense (one float
//! or int64 each, in name order). A TFRecord file cannot be entered in the middle, so it is
//! read whole by one worker, as compressed files are.

use std::collections::HashMap;
use std::io::{self, BufRead, Read};
use std::path::{Path, PathBuf};

use prost::Message;

use crate::csv::CsvSchema;
use crate::error::{DataError, Result};
use crate::example::{Example, Issue};
use crate::hash::categorical_id;
use crate::remote::Stores;
use crate::source::open_stream;

/// `tf.Example`.
#[derive(Clone, PartialEq, Message)]
pub struct TfExample {
    /// Its features.
    #[prost(message, optional, tag = "1")]
    pub features: Option<Features>,
}

/// `tf.Features`: features by name.
#[derive(Clone, PartialEq, Message)]
pub struct Features {
    /// The features.
    #[prost(map = "string, message", tag = "1")]
    pub feature: HashMap<String, Feature>,
}

/// `tf.Feature`: one of three lists.
#[derive(Clone, PartialEq, Message)]
pub struct Feature {
    /// The list.
    #[prost(oneof = "Kind", tags = "1, 2, 3")]
    pub kind: Option<Kind>,
}

/// The lists a `tf.Feature` holds.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Kind {
    /// `bytes_list`.
    #[prost(message, tag = "1")]
    BytesList(BytesList),
    /// `float_list`.
    #[prost(message, tag = "2")]
    FloatList(FloatList),
    /// `int64_list`.
    #[prost(message, tag = "3")]
    Int64List(Int64List),
}

/// `tf.BytesList`.
#[derive(Clone, PartialEq, Message)]
pub struct BytesList {
    /// The values.
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub value: Vec<Vec<u8>>,
}

/// `tf.FloatList`.
#[derive(Clone, PartialEq, Message)]
pub struct FloatList {
    /// The values.
    #[prost(float, repeated, tag = "1")]
    pub value: Vec<f32>,
}

/// `tf.Int64List`.
#[derive(Clone, PartialEq, Message)]
pub struct Int64List {
    /// The values.
    #[prost(int64, repeated, tag = "1")]
    pub value: Vec<i64>,
}

/// TFRecord's masked crc32c.
pub fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Writes `data` to `out` as one TFRecord record (length, its masked crc32c, the data, its
/// masked crc32c), in one `write_all`: the framing [`Records`] reads, and TensorBoard's event
/// files use.
pub fn write_record(out: &mut impl io::Write, data: &[u8]) -> io::Result<()> {
    let mut record = Vec::with_capacity(data.len() + 16);
    let len = (data.len() as u64).to_le_bytes();
    record.extend_from_slice(&len);
    record.extend_from_slice(&masked_crc(&len).to_le_bytes());
    record.extend_from_slice(data);
    record.extend_from_slice(&masked_crc(data).to_le_bytes());
    out.write_all(&record)
}

/// Reads the records of a TFRecord stream, checking both checksums of each.
pub struct Records {
    stream: Box<dyn BufRead + Send>,
    path: PathBuf,
    /// Records read so far.
    count: u64,
    data: Vec<u8>,
}

impl Records {
    /// The records of `path` (a local path or a URL; `.gz` is decompressed).
    pub fn open(path: &Path, stores: &Stores) -> Result<Records> {
        let stream =
            open_stream(path, 0, u64::MAX, 256 * 1024, stores).map_err(|e| DataError::io(path, e))?;
        Ok(Records { stream, path: path.to_path_buf(), count: 0, data: Vec::new() })
    }

    fn corrupt(&self, what: String) -> DataError {
        DataError::Row {
            path: self.path.clone(),
            row: self.count + 1,
            expected: "a TFRecord record (length, crc32c, data, crc32c)".into(),
            found: what,
        }
    }

    /// The next record's bytes, or `None` at the end of the file.
    pub fn next_record(&mut self) -> Result<Option<&[u8]>> {
        let mut header = [0u8; 12];
        let mut got = 0;
        while got < header.len() {
            match self.stream.read(&mut header[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => {
                    return Err(
                        self.corrupt(format!("the file ends inside a record header ({got} of 12 bytes)"))
                    );
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(DataError::io(&self.path, e)),
            }
        }
        let len = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
        let crc = u32::from_le_bytes(header[8..].try_into().expect("4 bytes"));
        if masked_crc(&header[..8]) != crc {
            return Err(self.corrupt(format!("a length whose checksum does not match (length {len})")));
        }
        self.data.clear();
        let read = (&mut self.stream)
            .take(len)
            .read_to_end(&mut self.data)
            .map_err(|e| DataError::io(&self.path, e))?;
        let mut footer = [0u8; 4];
        if (read as u64) < len || self.stream.read_exact(&mut footer).is_err() {
            return Err(self.corrupt(format!("the file ends inside a record of {len} bytes")));
        }
        if masked_crc(&self.data) != u32::from_le_bytes(footer) {
            return Err(self.corrupt("data whose checksum does not match".into()));
        }
        self.count += 1;
        Ok(Some(&self.data))
    }

    /// Records read so far (the 1-based number of the last one).
    pub fn count(&self) -> u64 {
        self.count
    }
}

/// The dense features of a TFRecord file: the first record's features other than the label
/// and the categorical ones, sorted by name. The label and categorical features must be there.
pub(crate) fn dense_features(schema: &CsvSchema, path: &Path, stores: &Stores) -> Result<Vec<String>> {
    let mut records = Records::open(path, stores)?;
    let Some(data) = records.next_record()? else {
        return Ok(Vec::new());
    };
    let example = TfExample::decode(data).map_err(|e| records.corrupt(format!("no tf.Example ({e})")))?;
    let features = example.features.unwrap_or_default().feature;
    let mut names: Vec<String> = features.keys().cloned().collect();
    names.sort();
    for wanted in std::iter::once(&schema.label).chain(&schema.categorical) {
        if !features.contains_key(wanted) {
            return Err(DataError::Row {
                path: path.to_path_buf(),
                row: 1,
                expected: format!("a feature named `{wanted}`"),
                found: format!("features {}", crate::csv::column_list(&names)),
            });
        }
    }
    Ok(names.into_iter().filter(|n| *n != schema.label && !schema.categorical.contains(n)).collect())
}

/// The examples of one TFRecord file.
pub(crate) struct TfRows {
    records: Records,
    schema: CsvSchema,
    dense: Vec<String>,
}

impl std::fmt::Debug for TfRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TfRows").field("path", &self.records.path).finish_non_exhaustive()
    }
}

impl TfRows {
    pub(crate) fn open(path: &Path, schema: &CsvSchema, dense: &[String], stores: &Stores) -> Result<TfRows> {
        Ok(TfRows { records: Records::open(path, stores)?, schema: schema.clone(), dense: dense.to_vec() })
    }

    /// The 1-based number of the record `next_example` read last.
    pub(crate) fn row_number(&self) -> u64 {
        self.records.count()
    }

    /// Reads the next record into `ex`: `None` at the end, `Some(Err)` for a malformed one. A
    /// framing or checksum error is an `Err`, whatever `skip_malformed` says.
    pub(crate) fn next_example(
        &mut self,
        ex: &mut Example,
    ) -> Result<Option<std::result::Result<(), Issue>>> {
        let Some(data) = self.records.next_record()? else { return Ok(None) };
        let example = match TfExample::decode(data) {
            Ok(e) => e,
            Err(e) => {
                return Ok(Some(Err(Issue::new("a tf.Example", format!("bytes that do not decode ({e})")))));
            }
        };
        let features = example.features.unwrap_or_default().feature;
        Ok(Some(fill(&features, &self.schema, &self.dense, ex)))
    }
}

fn fill(
    features: &HashMap<String, Feature>,
    schema: &CsvSchema,
    dense: &[String],
    ex: &mut Example,
) -> std::result::Result<(), Issue> {
    let number = |name: &String| -> std::result::Result<f32, Issue> {
        let expected = || format!("one float or int64 in feature `{name}`");
        let v = match features.get(name).and_then(|f| f.kind.as_ref()) {
            Some(Kind::FloatList(l)) if l.value.len() == 1 => l.value[0],
            Some(Kind::Int64List(l)) if l.value.len() == 1 => l.value[0] as f32,
            None => return Err(Issue::new(expected(), "no such feature")),
            Some(other) => return Err(Issue::new(expected(), describe(other))),
        };
        if !v.is_finite() {
            return Err(Issue::new(format!("a finite number in feature `{name}`"), format!("`{v}`")));
        }
        Ok(v)
    };
    let label = number(&schema.label)?;
    ex.label = if label == -1.0 { 0.0 } else { label };
    ex.dense.clear();
    for d in dense {
        ex.dense.push(number(d)?);
    }
    ex.sparse.clear();
    for (f, name) in schema.categorical.iter().enumerate() {
        let f = f as u32;
        match features.get(name).and_then(|x| x.kind.as_ref()) {
            Some(Kind::BytesList(l)) => {
                ex.sparse.extend(l.value.iter().map(|v| (f, categorical_id(f, v), 1.0)))
            }
            Some(Kind::Int64List(l)) => ex
                .sparse
                .extend(l.value.iter().map(|v| (f, categorical_id(f, v.to_string().as_bytes()), 1.0))),
            // A record without the feature has no value for it, as a null list in Parquet.
            None => {}
            Some(other) => {
                return Err(Issue::new(format!("bytes or int64s in feature `{name}`"), describe(other)));
            }
        }
    }
    Ok(())
}

fn describe(kind: &Kind) -> String {
    match kind {
        Kind::BytesList(l) => format!("{} bytes values", l.value.len()),
        Kind::FloatList(l) => format!("{} floats", l.value.len()),
        Kind::Int64List(l) => format!("{} int64s", l.value.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // TensorFlow's crc32c test vector: crc32c("123456789") = 0xe3069283.
        // Masked as TensorFlow's crc32c::Mask does, computed apart (in Python).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
    }

    #[test]
    fn written_records_read_back_and_a_flipped_byte_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.tfrecord");
        let mut bytes = Vec::new();
        for data in [&b"first"[..], b"", b"third record"] {
            write_record(&mut bytes, data).unwrap();
        }
        std::fs::write(&path, &bytes).unwrap();
        let mut records = Records::open(&path, &Stores::default()).unwrap();
        for want in [&b"first"[..], b"", b"third record"] {
            assert_eq!(records.next_record().unwrap(), Some(want));
        }
        assert_eq!(records.next_record().unwrap(), None);

        bytes[14] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let mut records = Records::open(&path, &Stores::default()).unwrap();
        let err = records.next_record().unwrap_err().to_string();
        assert!(err.contains("checksum does not match"), "{err}");
    }
}
