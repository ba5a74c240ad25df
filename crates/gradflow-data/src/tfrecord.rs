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
use std::ops::Range;
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
    decoder: Decoder,
}

impl std::fmt::Debug for TfRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TfRows").field("path", &self.records.path).finish_non_exhaustive()
    }
}

impl TfRows {
    pub(crate) fn open(path: &Path, schema: &CsvSchema, dense: &[String], stores: &Stores) -> Result<TfRows> {
        Ok(TfRows { records: Records::open(path, stores)?, decoder: Decoder::new(schema, dense) })
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
        Ok(Some(self.decoder.fill(data, ex)))
    }
}

/// What a feature is to the model.
#[derive(Debug, Clone, Copy)]
enum Role {
    Label,
    Dense(usize),
    Categorical(usize),
}

/// A feature's list in the record: its kind (the `Feature` oneof's field number: 1 bytes,
/// 2 floats, 3 int64s) and where the list message's bytes are in the record.
#[derive(Debug, Clone, Copy)]
struct List {
    kind: u64,
    start: usize,
    end: usize,
}

/// Why [`Decoder::fast`] hands a record to prost: bytes that do not decode, or an encoding
/// that writers of `tf.Example` do not produce and protobuf gives merge rules for (a message
/// split over several fields, a field of an unexpected wire type, a group).
struct Fallback;

/// Decodes `tf.Example` records straight from their bytes into an [`Example`]: no map of
/// feature names, no message per feature, no allocation per record (decoding into prost's
/// types cost nearly three times as much). Records in any other encoding than the one
/// writers produce, and records that do not decode, go to prost and [`fill`], so the result is
/// always theirs (tested on random and corrupted records).
struct Decoder {
    roles: HashMap<Vec<u8>, Role>,
    schema: CsvSchema,
    dense: Vec<String>,
    /// Per record: the list of each dense and each categorical feature where the record has
    /// one (the last of repeated names, as protobuf maps keep); kept for its capacity.
    lists: Vec<Option<List>>,
}

impl Decoder {
    fn new(schema: &CsvSchema, dense: &[String]) -> Decoder {
        let mut roles = HashMap::new();
        roles.insert(schema.label.as_bytes().to_vec(), Role::Label);
        for (i, d) in dense.iter().enumerate() {
            roles.insert(d.as_bytes().to_vec(), Role::Dense(i));
        }
        for (f, c) in schema.categorical.iter().enumerate() {
            roles.insert(c.as_bytes().to_vec(), Role::Categorical(f));
        }
        Decoder { roles, schema: schema.clone(), dense: dense.to_vec(), lists: Vec::new() }
    }

    fn fill(&mut self, data: &[u8], ex: &mut Example) -> std::result::Result<(), Issue> {
        match self.fast(data, ex) {
            Ok(result) => result,
            Err(Fallback) => match TfExample::decode(data) {
                Ok(e) => fill(&e.features.unwrap_or_default().feature, &self.schema, &self.dense, ex),
                Err(e) => Err(Issue::new("a tf.Example", format!("bytes that do not decode ({e})"))),
            },
        }
    }

    /// The record read in place, or [`Fallback`].
    fn fast(
        &mut self,
        data: &[u8],
        ex: &mut Example,
    ) -> std::result::Result<std::result::Result<(), Issue>, Fallback> {
        self.lists.clear();
        self.lists.resize(self.dense.len() + self.schema.categorical.len(), None);
        let mut label = None;
        let mut seen_features = false;
        let mut example = Wire::new(data);
        while let Some((field, value)) = example.next()? {
            match (field, value) {
                (1, Value::Bytes(at)) if !seen_features => {
                    seen_features = true;
                    let mut features = Wire::sub(data, at);
                    while let Some((field, value)) = features.next()? {
                        match (field, value) {
                            (1, Value::Bytes(entry)) => {
                                let (key, list) = map_entry(data, entry)?;
                                let key = std::str::from_utf8(&data[key]).map_err(|_| Fallback)?;
                                // A list read later is checked as it is read; one that is not
                                // (another feature's, or replaced by a later one of the same
                                // name) is checked here, as prost decodes every list.
                                let slot = match self.roles.get(key.as_bytes()) {
                                    Some(Role::Label) => &mut label,
                                    Some(Role::Dense(i)) => &mut self.lists[*i],
                                    Some(Role::Categorical(f)) => &mut self.lists[self.dense.len() + f],
                                    None => {
                                        if let Some(l) = list {
                                            count(data, l)?;
                                        }
                                        continue;
                                    }
                                };
                                if let Some(replaced) = std::mem::replace(slot, list) {
                                    count(data, replaced)?;
                                }
                            }
                            (1, _) => return Err(Fallback),
                            _ => {}
                        }
                    }
                }
                (1, _) => return Err(Fallback),
                _ => {}
            }
        }
        match self.fill_from(data, label, ex)? {
            Ok(()) => Ok(Ok(())),
            // Refused for what it holds; but a record with a list that does not decode is
            // refused for that first, as prost does.
            Err(issue) => {
                for list in self.lists.iter().chain([&label]).flatten() {
                    count(data, *list)?;
                }
                Ok(Err(issue))
            }
        }
    }

    fn fill_from(
        &self,
        data: &[u8],
        label: Option<List>,
        ex: &mut Example,
    ) -> std::result::Result<std::result::Result<(), Issue>, Fallback> {
        let number = |name: &str,
                      list: Option<List>|
         -> std::result::Result<std::result::Result<f32, Issue>, Fallback> {
            let expected = || format!("one float or int64 in feature `{name}`");
            let v = match list {
                None => return Ok(Err(Issue::new(expected(), "no such feature"))),
                Some(l) => match (l.kind, count(data, l)?) {
                    (2 | 3, (1, first)) => first,
                    _ => return Ok(Err(Issue::new(expected(), describe_list(data, l)?))),
                },
            };
            if !v.is_finite() {
                return Ok(Err(Issue::new(format!("a finite number in feature `{name}`"), format!("`{v}`"))));
            }
            Ok(Ok(v))
        };
        let label = match number(&self.schema.label, label)? {
            Ok(v) => v,
            Err(issue) => return Ok(Err(issue)),
        };
        ex.label = if label == -1.0 { 0.0 } else { label };
        ex.dense.clear();
        for (i, list) in self.lists[..self.dense.len()].iter().enumerate() {
            match number(&self.dense[i], *list)? {
                Ok(v) => ex.dense.push(v),
                Err(issue) => return Ok(Err(issue)),
            }
        }
        ex.sparse.clear();
        for (f, list) in self.lists[self.dense.len()..].iter().enumerate() {
            let name = &self.schema.categorical[f];
            let f = f as u32;
            match list {
                // A record without the feature has no value for it, as a null list in Parquet.
                None => {}
                Some(l @ List { kind: 1, .. }) => {
                    let mut values = Wire::sub(data, l.start..l.end);
                    while let Some((field, value)) = values.next()? {
                        match (field, value) {
                            (1, Value::Bytes(v)) => ex.sparse.push((f, categorical_id(f, &data[v]), 1.0)),
                            (1, _) => return Err(Fallback),
                            _ => {}
                        }
                    }
                }
                Some(l @ List { kind: 3, .. }) => {
                    let mut values = Int64s::new(data, *l);
                    while let Some(v) = values.next()? {
                        let mut text = [0u8; 20];
                        let n = decimal(v, &mut text);
                        ex.sparse.push((f, categorical_id(f, &text[..n]), 1.0));
                    }
                }
                Some(other) => {
                    let issue = format!("bytes or int64s in feature `{name}`");
                    return Ok(Err(Issue::new(issue, describe_list(data, *other)?)));
                }
            }
        }
        Ok(Ok(()))
    }
}

/// A `Features` map entry: where its key is, and its `Feature`'s list if it has one (not yet
/// checked: see [`count`]).
fn map_entry(
    data: &[u8],
    entry: Range<usize>,
) -> std::result::Result<(Range<usize>, Option<List>), Fallback> {
    let (mut key, mut list, mut seen_value) = (entry.start..entry.start, None, false);
    let mut w = Wire::sub(data, entry);
    while let Some((field, value)) = w.next()? {
        match (field, value) {
            (1, Value::Bytes(k)) => key = k,
            (2, Value::Bytes(feature)) if !seen_value => {
                seen_value = true;
                let mut oneof = Wire::sub(data, feature);
                while let Some((field, value)) = oneof.next()? {
                    match (field, value) {
                        (1..=3, Value::Bytes(at)) if list.is_none() => {
                            list = Some(List { kind: field, start: at.start, end: at.end });
                        }
                        (1..=3, _) => return Err(Fallback),
                        _ => {}
                    }
                }
            }
            (1 | 2, _) => return Err(Fallback),
            _ => {}
        }
    }
    Ok((key, list))
}

/// How many values `list` holds, and its first as a number (0 when none or bytes); checks
/// every field of the list.
fn count(data: &[u8], list: List) -> std::result::Result<(usize, f32), Fallback> {
    let (mut n, mut first) = (0, 0.0);
    match list.kind {
        1 => {
            let mut w = Wire::sub(data, list.start..list.end);
            while let Some((field, value)) = w.next()? {
                match (field, value) {
                    (1, Value::Bytes(_)) => n += 1,
                    (1, _) => return Err(Fallback),
                    _ => {}
                }
            }
        }
        2 => {
            let mut w = Wire::sub(data, list.start..list.end);
            while let Some((field, value)) = w.next()? {
                match (field, value) {
                    (1, Value::Bytes(packed)) => {
                        if packed.len() % 4 != 0 {
                            return Err(Fallback);
                        }
                        if n == 0 && !packed.is_empty() {
                            first = f32::from_le_bytes(
                                data[packed.start..packed.start + 4].try_into().expect("4 bytes"),
                            );
                        }
                        n += packed.len() / 4;
                    }
                    (1, Value::Fixed32(v)) => {
                        if n == 0 {
                            first = f32::from_bits(v);
                        }
                        n += 1;
                    }
                    (1, _) => return Err(Fallback),
                    _ => {}
                }
            }
        }
        _ => {
            let mut values = Int64s::new(data, list);
            while let Some(v) = values.next()? {
                if n == 0 {
                    first = v as f32;
                }
                n += 1;
            }
        }
    }
    Ok((n, first))
}

/// The values of an `Int64List`, packed or not.
struct Int64s<'a> {
    list: Wire<'a>,
    packed: Wire<'a>,
}

impl<'a> Int64s<'a> {
    fn new(data: &'a [u8], list: List) -> Int64s<'a> {
        Int64s { list: Wire::sub(data, list.start..list.end), packed: Wire::sub(data, 0..0) }
    }

    fn next(&mut self) -> std::result::Result<Option<i64>, Fallback> {
        loop {
            if !self.packed.is_empty() {
                return self.packed.varint().map(|v| Some(v as i64));
            }
            match self.list.next()? {
                None => return Ok(None),
                Some((1, Value::Bytes(p))) => self.packed = Wire::sub(self.list.data, p),
                Some((1, Value::Varint(v))) => return Ok(Some(v as i64)),
                Some((1, _)) => return Err(Fallback),
                Some(_) => {}
            }
        }
    }
}

/// What a list holds, for an error: as [`describe`] says it of prost's.
fn describe_list(data: &[u8], list: List) -> std::result::Result<String, Fallback> {
    let n = count(data, list)?.0;
    Ok(match list.kind {
        1 => format!("{n} bytes values"),
        2 => format!("{n} floats"),
        _ => format!("{n} int64s"),
    })
}

/// `v` in decimal into `out`; the number of bytes written.
fn decimal(v: i64, out: &mut [u8; 20]) -> usize {
    use std::io::Write;
    let mut cursor = io::Cursor::new(&mut out[..]);
    write!(cursor, "{v}").expect("an i64 fits in 20 bytes");
    cursor.position() as usize
}

/// A protobuf field's value, by wire type; bytes as where they are in the record.
enum Value {
    Varint(u64),
    Fixed64,
    Bytes(Range<usize>),
    Fixed32(u32),
}

/// The fields of one protobuf message, `data[pos..end]`, read in place.
struct Wire<'a> {
    data: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Wire<'a> {
    fn new(data: &'a [u8]) -> Wire<'a> {
        Wire { data, pos: 0, end: data.len() }
    }

    fn sub(data: &'a [u8], at: Range<usize>) -> Wire<'a> {
        Wire { data, pos: at.start, end: at.end }
    }

    fn is_empty(&self) -> bool {
        self.pos >= self.end
    }

    /// A varint as prost reads one: at most 10 bytes, the 10th at most 1.
    fn varint(&mut self) -> std::result::Result<u64, Fallback> {
        // Most are one byte: field keys, and the lengths of names, values and lists.
        if let Some(&b) = self.data[..self.end].get(self.pos)
            && b < 0x80
        {
            self.pos += 1;
            return Ok(u64::from(b));
        }
        let mut v = 0u64;
        for i in 0..10 {
            if self.pos >= self.end {
                return Err(Fallback);
            }
            let b = self.data[self.pos];
            self.pos += 1;
            if i == 9 && b > 1 {
                return Err(Fallback);
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(Fallback)
    }

    fn take(&mut self, n: u64) -> std::result::Result<Range<usize>, Fallback> {
        if n > (self.end - self.pos) as u64 {
            return Err(Fallback);
        }
        let at = self.pos..self.pos + n as usize;
        self.pos = at.end;
        Ok(at)
    }

    /// The next field number and value; `None` at the end.
    fn next(&mut self) -> std::result::Result<Option<(u64, Value)>, Fallback> {
        if self.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        if key > u64::from(u32::MAX) || key >> 3 == 0 {
            return Err(Fallback);
        }
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let n = self.varint()?;
                Value::Bytes(self.take(n)?)
            }
            5 => {
                let at = self.take(4)?;
                Value::Fixed32(u32::from_le_bytes(self.data[at].try_into().expect("4 bytes")))
            }
            _ => return Err(Fallback),
        };
        Ok(Some((key >> 3, value)))
    }
}

/// A record prost decoded, read: what [`Decoder`] does for records it hands to prost.
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

    /// What the decoder makes of `data`, and what prost's decoding and [`fill`] make of it;
    /// whether the decoder read it in place (rather than handing it to prost).
    fn both(
        decoder: &mut Decoder,
        schema: &CsvSchema,
        dense: &[String],
        data: &[u8],
    ) -> ([std::result::Result<Example, Issue>; 2], bool) {
        let mut ex = Example::default();
        let in_place = decoder.fast(data, &mut ex).ok().map(|r| r.map(|()| ex));
        let mut ex = Example::default();
        let decoded = decoder.fill(data, &mut ex).map(|()| ex);
        let reference = match TfExample::decode(data) {
            Ok(e) => {
                let mut ex = Example::default();
                fill(&e.features.unwrap_or_default().feature, schema, dense, &mut ex).map(|()| ex)
            }
            Err(e) => Err(Issue::new("a tf.Example", format!("bytes that do not decode ({e})"))),
        };
        if let Some(in_place) = &in_place {
            assert_eq!(in_place, &reference, "read in place: {data:?}");
        }
        ([decoded, reference], in_place.is_some())
    }

    #[test]
    fn the_in_place_decoder_agrees_with_prost_on_every_record() {
        let mut state = 7u64;
        let mut next = move |n: u64| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) % n
        };
        let schema = CsvSchema::new("label", vec!["c0".into(), "c1".into(), "c2".into()]);
        let dense: Vec<String> = vec!["d0".into(), "d1".into()];
        let mut decoder = Decoder::new(&schema, &dense);
        let (mut ok, mut refused, mut corrupt_in_place) = (0, 0, 0);
        for _ in 0..20_000 {
            let mut feature = std::collections::HashMap::new();
            let number = |next: &mut dyn FnMut(u64) -> u64| -> Option<Kind> {
                Some(match next(20) {
                    0 => return None,
                    1 => Kind::FloatList(FloatList { value: vec![1.0, 2.0] }),
                    2 => Kind::FloatList(FloatList { value: vec![] }),
                    3 => Kind::FloatList(FloatList { value: vec![f32::NAN] }),
                    4 => Kind::BytesList(BytesList { value: vec![b"x".to_vec()] }),
                    5..=7 => Kind::Int64List(Int64List { value: vec![next(3) as i64 - 1] }),
                    8 => Kind::Int64List(Int64List { value: vec![3, -4] }),
                    _ => Kind::FloatList(FloatList { value: vec![next(1000) as f32 / 7.0 - 50.0] }),
                })
            };
            for name in ["label", "d0", "d1"] {
                if next(40) != 0 {
                    let kind = number(&mut next);
                    feature.insert(name.to_string(), Feature { kind });
                }
            }
            for name in ["c0", "c1", "c2", "other"] {
                let kind = match next(12) {
                    0 => continue,
                    1 => None,
                    2 => Some(Kind::FloatList(FloatList { value: vec![0.5] })),
                    3..=5 => Some(Kind::Int64List(Int64List {
                        value: (0..next(4)).map(|_| next(1 << 40) as i64 - (1 << 39)).collect(),
                    })),
                    _ => Some(Kind::BytesList(BytesList {
                        value: (0..next(4)).map(|_| format!("v{}", next(50)).into_bytes()).collect(),
                    })),
                };
                feature.insert(name.to_string(), Feature { kind });
            }
            let data = TfExample { features: Some(Features { feature }) }.encode_to_vec();
            let ([fast, reference], in_place) = both(&mut decoder, &schema, &dense, &data);
            assert_eq!(fast, reference, "record {data:?}");
            assert!(in_place, "a record as prost writes it is read in place: {data:?}");
            if fast.is_ok() {
                ok += 1
            } else {
                refused += 1
            }
            // Cut short, or with a byte changed: whatever the bytes now say, the same answer.
            let mut bad = data[..next(data.len() as u64 + 1) as usize].to_vec();
            if !bad.is_empty() && next(2) == 0 {
                let i = next(bad.len() as u64) as usize;
                bad[i] = next(256) as u8;
            }
            let ([fast, reference], in_place) = both(&mut decoder, &schema, &dense, &bad);
            assert_eq!(fast, reference, "record changed to {bad:?}");
            corrupt_in_place += usize::from(in_place);
        }
        assert!(corrupt_in_place > 100, "{corrupt_in_place} changed records read in place");
        assert!(ok > 3000 && refused > 3000, "both kinds of record were tried: {ok} read, {refused} refused");

        // Floats and int64s not packed (older writers): field 1 repeated, one value each.
        let list = |kind_field: u8, list: &[u8]| {
            let mut feature = vec![kind_field << 3 | 2, list.len() as u8];
            feature.extend_from_slice(list);
            feature
        };
        let entry = |name: &str, feature: Vec<u8>| {
            let mut e = vec![0x0a, name.len() as u8];
            e.extend_from_slice(name.as_bytes());
            e.extend_from_slice(&[0x12, feature.len() as u8]);
            e.extend(feature);
            e
        };
        // A tf.Example of these map entries.
        let example = |entries: Vec<Vec<u8>>| {
            let mut features = Vec::new();
            for e in entries {
                features.extend([0x0a, e.len() as u8]);
                features.extend(e);
            }
            let mut data = vec![0x0a, features.len() as u8];
            data.extend(features);
            data
        };
        let data = example(vec![
            entry("label", list(2, &[0x0d, 0, 0, 0x80, 0x3f])),
            entry("d0", list(3, &[0x08, 5])),
            entry("d1", list(2, &[0x0d, 0, 0, 0, 0x40])),
            entry("c0", list(3, &[0x08, 7, 0x08, 9])),
        ]);
        let ([fast, reference], in_place) = both(&mut decoder, &schema, &dense, &data);
        assert_eq!(fast, reference);
        assert!(in_place);
        let ex = fast.unwrap();
        // A list split over two fields of one Feature is merged by protobuf's rules: prost's.
        let mut twice = list(3, &[0x08, 7]);
        twice.extend(list(3, &[0x08, 9]));
        let merged = example(vec![
            entry("label", list(2, &[0x0d, 0, 0, 0x80, 0x3f])),
            entry("d0", list(3, &[0x08, 5])),
            entry("d1", list(3, &[0x08, 5])),
            entry("c1", twice),
        ]);
        let ([fast, reference], in_place) = both(&mut decoder, &schema, &dense, &merged);
        assert_eq!(fast, reference);
        assert!(!in_place, "a split list goes to prost");
        assert_eq!(fast.unwrap().sparse.len(), 2, "both values of the split list");
        assert_eq!((ex.label, ex.dense.as_slice()), (1.0, &[5.0, 2.0][..]));
        assert_eq!(ex.sparse, [(0, categorical_id(0, b"7"), 1.0), (0, categorical_id(0, b"9"), 1.0)]);
    }
}
