//! Converting data files to Parquet, for `gradflow data convert`.
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

use arrow_array::builder::{Float32Builder, StringBuilder};
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
        let arrays: Vec<ArrayRef> = columns
            .iter_mut()
            .map(|c| match c {
                Column::Number(b) => Arc::new(b.finish()) as ArrayRef,
                Column::Text(b) => Arc::new(b.finish()) as ArrayRef,
            })
            .collect();
        let batch = RecordBatch::try_new(arrow_schema.clone(), arrays)
            .map_err(|e| DataError::Parquet { path: out.to_path_buf(), cause: e.to_string() })?;
        writer.write(&batch).map_err(write_err)
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
