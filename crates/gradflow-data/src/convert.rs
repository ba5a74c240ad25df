//! Converting data files to Parquet, for `gradflow data convert`: CSV and TFRecord.
//!
//! libsvm is not converted: its ids are used as they are, while Parquet's integer ids are
//! hashed like CSV text, so a converted file would train on different ids.
//!
//! A CSV file becomes a Parquet file with the same column names, in the same order: the label
//! and the dense columns as `float32` (parsed as the reader parses them), the categorical
//! columns as strings, as written. Reading the Parquet file with the same `label` and
//! `categorical` then gives exactly the examples the CSV file gives (see [`crate::parquet`]:
//! a categorical string gets the id its CSV cell gets).

use std::fs::File;
use std::io::BufRead;
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{Float32Builder, Int64Builder, ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression as Codec, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::csv::{CsvSchema, cells, header_names};
use crate::error::{DataError, Result};
use crate::example::{Issue, parse_f32, parse_label, show, utf8};
use crate::remote::Stores;
use crate::source::open_stream;

/// What a conversion wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Converted {
    /// Rows written.
    pub rows: u64,
    /// Row groups written.
    pub row_groups: u64,
}

enum Column {
    Number(Float32Builder),
    Text(StringBuilder),
}

/// Converts the CSV file `input` (a local path or a URL, possibly compressed) to the Parquet
/// file `out`, with `schema` saying which columns are the label and categorical, in row groups
/// of `row_group_rows`, pages compressed with zstd.
pub fn csv_to_parquet(
    input: &Path,
    schema: &CsvSchema,
    out: &Path,
    row_group_rows: usize,
    stores: &Stores,
) -> Result<Converted> {
    let at = |line: u64| {
        move |i: Issue| DataError::Parse {
            path: input.to_path_buf(),
            line,
            expected: i.expected.into_owned(),
            found: i.found,
        }
    };
    let mut stream =
        open_stream(input, 0, u64::MAX, 256 * 1024, stores).map_err(|e| DataError::io(input, e))?;
    let mut line = Vec::new();
    let read = |stream: &mut Box<dyn BufRead + Send>, line: &mut Vec<u8>| -> Result<bool> {
        line.clear();
        let n = stream.read_until(b'\n', line).map_err(|e| DataError::io(input, e))?;
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        Ok(n > 0)
    };
    if !read(&mut stream, &mut line)? {
        return Err(at(1)(Issue::new("a header row", "an empty file")));
    }
    let names = header_names(utf8(&line).map_err(at(1))?).map_err(at(1))?;
    for wanted in std::iter::once(&schema.label).chain(&schema.categorical) {
        if !names.contains(wanted) {
            return Err(at(1)(Issue::new(
                format!("a column named `{wanted}`"),
                format!("columns {}", crate::csv::column_list(&names)),
            )));
        }
    }
    let text = |n: &String| schema.categorical.contains(n);
    let fields: Vec<Field> = names
        .iter()
        .map(|n| Field::new(n, if text(n) { DataType::Utf8 } else { DataType::Float32 }, false))
        .collect();
    let arrow_schema = Arc::new(Schema::new(fields));
    let props = WriterProperties::builder()
        .set_compression(Codec::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(row_group_rows.max(1)))
        .build();
    let file = File::create(out).map_err(|e| DataError::io(out, e))?;
    let write_err = |e: parquet::errors::ParquetError| DataError::Parquet {
        path: out.to_path_buf(),
        cause: e.to_string(),
    };
    let mut writer = ArrowWriter::try_new(file, arrow_schema.clone(), Some(props)).map_err(write_err)?;
    let new_columns = || -> Vec<Column> {
        names
            .iter()
            .map(|n| {
                if text(n) {
                    Column::Text(StringBuilder::new())
                } else {
                    Column::Number(Float32Builder::new())
                }
            })
            .collect()
    };
    let mut columns = new_columns();
    let (mut rows, mut pending, mut line_no) = (0u64, 0usize, 1u64);
    let flush = |columns: &mut Vec<Column>, writer: &mut ArrowWriter<File>| -> Result<()> {
        let arrays = columns
            .iter_mut()
            .map(|c| match c {
                Column::Number(b) => Arc::new(b.finish()) as ArrayRef,
                Column::Text(b) => Arc::new(b.finish()) as ArrayRef,
            })
            .collect();
        write_batch(writer, &arrow_schema, arrays, out)
    };
    while read(&mut stream, &mut line)? {
        line_no += 1;
        let text_line = utf8(&line).map_err(at(line_no))?;
        if text_line.trim().is_empty() {
            continue;
        }
        let row = cells(text_line).map_err(at(line_no))?;
        if row.len() != names.len() {
            return Err(at(line_no)(Issue::new(
                format!("{} cells (as in the header)", names.len()),
                format!("{} cells", row.len()),
            )));
        }
        for ((cell, name), column) in row.iter().zip(&names).zip(&mut columns) {
            match column {
                Column::Text(b) => b.append_value(cell),
                Column::Number(b) if *name == schema.label => {
                    b.append_value(parse_label(cell).map_err(|i| {
                        at(line_no)(Issue::new(format!("a numeric label in column `{name}`"), i.found))
                    })?)
                }
                Column::Number(b) => b.append_value(parse_f32(cell).ok_or_else(|| {
                    at(line_no)(Issue::new(format!("a finite number in column `{name}`"), show(cell)))
                })?),
            }
        }
        rows += 1;
        pending += 1;
        if pending == 8192 {
            flush(&mut columns, &mut writer)?;
            pending = 0;
        }
    }
    if pending > 0 {
        flush(&mut columns, &mut writer)?;
    }
    let meta = writer.close().map_err(write_err)?;
    Ok(Converted { rows, row_groups: meta.num_row_groups() as u64 })
}

/// How one TFRecord feature becomes a Parquet column.
enum TfColumn {
    Number(Float32Builder),
    Texts(ListBuilder<StringBuilder>),
    Ints(ListBuilder<Int64Builder>),
}

/// Converts the TFRecord file `input` (plain or `.gz`, a local path or a URL) to the Parquet
/// file `out`: the label and the dense features (the first record's other features) as
/// `float32`, each categorical feature as a list of strings (bytes values) or of int64s, as its
/// first record holds it. Reading the Parquet file with the same `label` and `categorical` gives
/// the examples the TFRecord file gives.
pub fn tfrecord_to_parquet(
    input: &Path,
    schema: &CsvSchema,
    out: &Path,
    row_group_rows: usize,
    stores: &Stores,
) -> Result<Converted> {
    use crate::tfrecord::{Kind, Records, TfExample};
    use prost::Message;

    let dense = crate::tfrecord::dense_features(schema, input, stores)?;
    let mut records = Records::open(input, stores)?;
    let row_error = |row: u64, expected: String, found: String| DataError::Row {
        path: input.to_path_buf(),
        row,
        expected,
        found,
    };
    let decode = |data: &[u8], row: u64| {
        TfExample::decode(data)
            .map(|e| e.features.unwrap_or_default().feature)
            .map_err(|e| row_error(row, "a tf.Example".into(), format!("bytes that do not decode ({e})")))
    };
    let mut first = None;
    if let Some(data) = records.next_record()? {
        first = Some(decode(data, 1)?);
    }
    let Some(first) = first else {
        return Err(row_error(1, "at least one record".into(), "an empty file".into()));
    };
    let mut names = vec![schema.label.clone()];
    names.extend(dense.iter().cloned());
    names.extend(schema.categorical.iter().cloned());
    let mut fields = Vec::new();
    let mut new_columns: Vec<Box<dyn Fn() -> TfColumn>> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        if i <= dense.len() {
            fields.push(Field::new(name, DataType::Float32, false));
            new_columns.push(Box::new(|| TfColumn::Number(Float32Builder::new())));
            continue;
        }
        let ints = matches!(first.get(name).and_then(|f| f.kind.as_ref()), Some(Kind::Int64List(_)));
        let item = if ints { DataType::Int64 } else { DataType::Utf8 };
        fields.push(Field::new(name, DataType::List(Arc::new(Field::new("item", item, true))), true));
        new_columns.push(if ints {
            Box::new(|| TfColumn::Ints(ListBuilder::new(Int64Builder::new())))
        } else {
            Box::new(|| TfColumn::Texts(ListBuilder::new(StringBuilder::new())))
        });
    }
    let arrow_schema = Arc::new(Schema::new(fields));
    let props = WriterProperties::builder()
        .set_compression(Codec::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(row_group_rows.max(1)))
        .build();
    let write_err = |e: parquet::errors::ParquetError| DataError::Parquet {
        path: out.to_path_buf(),
        cause: e.to_string(),
    };
    let file = File::create(out).map_err(|e| DataError::io(out, e))?;
    let mut writer = ArrowWriter::try_new(file, arrow_schema.clone(), Some(props)).map_err(write_err)?;
    let mut columns: Vec<TfColumn> = new_columns.iter().map(|f| f()).collect();
    let flush = |columns: &mut Vec<TfColumn>, writer: &mut ArrowWriter<File>| -> Result<()> {
        let arrays = columns
            .iter_mut()
            .map(|c| match c {
                TfColumn::Number(b) => Arc::new(b.finish()) as ArrayRef,
                TfColumn::Texts(b) => Arc::new(b.finish()) as ArrayRef,
                TfColumn::Ints(b) => Arc::new(b.finish()) as ArrayRef,
            })
            .collect();
        write_batch(writer, &arrow_schema, arrays, out)
    };
    let (mut rows, mut pending) = (0u64, 0usize);
    let mut features = first;
    loop {
        rows += 1;
        for (name, column) in names.iter().zip(&mut columns) {
            let kind = features.get(name).and_then(|f| f.kind.as_ref());
            let bad = |expected: &str| {
                row_error(rows, format!("{expected} in feature `{name}`"), format!("{kind:?}"))
            };
            match (column, kind) {
                (TfColumn::Number(b), Some(Kind::FloatList(l))) if l.value.len() == 1 => {
                    b.append_value(l.value[0])
                }
                (TfColumn::Number(b), Some(Kind::Int64List(l))) if l.value.len() == 1 => {
                    b.append_value(l.value[0] as f32)
                }
                (TfColumn::Number(_), _) => return Err(bad("one float or int64")),
                (TfColumn::Texts(b), Some(Kind::BytesList(l))) => {
                    for v in &l.value {
                        let text = std::str::from_utf8(v).map_err(|_| bad("UTF-8 text"))?;
                        b.values().append_value(text);
                    }
                    b.append(true);
                }
                (TfColumn::Ints(b), Some(Kind::Int64List(l))) => {
                    b.values().append_slice(&l.value);
                    b.append(true);
                }
                (TfColumn::Texts(b), None) => b.append(false),
                (TfColumn::Ints(b), None) => b.append(false),
                (TfColumn::Texts(_), _) => return Err(bad("bytes values (as in the first record)")),
                (TfColumn::Ints(_), _) => return Err(bad("int64 values (as in the first record)")),
            }
        }
        pending += 1;
        if pending == 8192 {
            flush(&mut columns, &mut writer)?;
            pending = 0;
        }
        let Some(data) = records.next_record()? else { break };
        features = decode(data, rows + 1)?;
    }
    if pending > 0 {
        flush(&mut columns, &mut writer)?;
    }
    let meta = writer.close().map_err(write_err)?;
    Ok(Converted { rows, row_groups: meta.num_row_groups() as u64 })
}

/// Writes one record batch of `arrays` (one per column of `schema`) to the Parquet file `out`.
fn write_batch(
    writer: &mut ArrowWriter<File>,
    schema: &arrow_schema::SchemaRef,
    arrays: Vec<ArrayRef>,
    out: &Path,
) -> Result<()> {
    let parquet = |e: String| DataError::Parquet { path: out.to_path_buf(), cause: e };
    let batch = RecordBatch::try_new(schema.clone(), arrays).map_err(|e| parquet(e.to_string()))?;
    writer.write(&batch).map_err(|e| parquet(e.to_string()))
}
