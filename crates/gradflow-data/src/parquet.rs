//! Parquet files through arrow-rs: columns chosen by name as for CSV, row groups as the units of
//! sharding.
//!
//! The [`CsvSchema`] names the label column and the categorical ones; every other top-level
//! column is a dense feature. Label and dense columns may be any integer, float or boolean
//! type; a null in them makes the row malformed. A categorical column may hold strings or
//! integers: a value becomes the entry `(field, categorical_id(field, text), 1.0)` where `text`
//! is the string, or the integer written in decimal, so a CSV file and the same data in
//! Parquet train the same model. A null is the empty text, as an empty CSV cell is. A
//! categorical column that is a list (of strings or integers) is a multi-id field: one entry
//! per element.
//!
//! A file's units are its row groups: static sharding gives each worker a range of every
//! file's row groups, and a dynamic-sharding task is one row group. Row groups are read with
//! the async reader on object_store (local files through its local store), on this crate's I/O
//! runtime, up to [`RemoteOptions::read_ahead`] record batches ahead of the parser.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type, UInt16Type, UInt32Type,
    UInt64Type,
};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, SchemaRef};
use bytes::Bytes;
use futures::FutureExt;
use futures::StreamExt;
use futures::future::BoxFuture;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::{AsyncFileReader, ParquetRecordBatchStreamBuilder};
use parquet::errors::ParquetError;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};

use crate::csv::{CsvSchema, column_list};
use crate::error::{DataError, Result};
use crate::example::{Example, Issue};
use crate::hash::categorical_id;
use crate::remote::{RemoteFile, RemoteOptions, Stores, fetch, wait};

/// Rows per record batch read from a row group.
const BATCH_ROWS: usize = 4096;

/// What a file's footer says: its columns, and the rows of each row group.
#[derive(Debug, Clone)]
pub struct ParquetInfo {
    /// The columns, as arrow reads them.
    pub schema: SchemaRef,
    /// Rows in each row group.
    pub row_group_rows: Vec<u64>,
}

/// A Parquet file on a store, read by the same retried ranged reads as text files.
struct ObjectReader {
    file: RemoteFile,
    size: u64,
}

impl AsyncFileReader for ObjectReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        fetch(self.file.clone(), range).map(|r| r.map_err(|e| ParquetError::External(Box::new(e)))).boxed()
    }

    /// The column chunks of a row group in one ranged read where they lie within 1 MiB of
    /// each other (they are usually contiguous), the reads in parallel: by default the reader
    /// would fetch them one after the other, a round trip per column.
    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        let file = self.file.clone();
        async move {
            object_store::coalesce_ranges(
                &ranges,
                |range| fetch(file.clone(), range),
                object_store::OBJECT_STORE_COALESCE_DEFAULT,
            )
            .await
            .map_err(|e| ParquetError::External(Box::new(e)))
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move {
            let size = self.size;
            let metadata = ParquetMetaDataReader::new()
                .with_arrow_reader_options(options)
                .load_and_finish(self, size)
                .await?;
            Ok(Arc::new(metadata))
        }
        .boxed()
    }
}

fn parquet_error(file: &RemoteFile, e: parquet::errors::ParquetError) -> DataError {
    DataError::Parquet { path: PathBuf::from(&file.url), cause: e.to_string() }
}

/// Reads the footer of a Parquet file (a local path or a URL).
pub fn info(path: &Path, stores: &Stores) -> Result<ParquetInfo> {
    let file = stores.object(path)?;
    let size = file.size()?;
    let reader = ObjectReader { file: file.clone(), size };
    let built = wait(async move { ParquetRecordBatchStreamBuilder::new(reader).await });
    let builder = built.map_err(|e| parquet_error(&file, e))?;
    let meta = builder.metadata();
    Ok(ParquetInfo {
        schema: builder.schema().clone(),
        row_group_rows: meta.row_groups().iter().map(|g| g.num_rows().max(0) as u64).collect(),
    })
}

/// The first record batch of a file, of at most `rows` rows and every column; `None` for a file
/// without rows.
pub fn first_batch(path: &Path, stores: &Stores, rows: usize) -> Result<Option<RecordBatch>> {
    let file = stores.object(path)?;
    let size = file.size()?;
    let reader = ObjectReader { file: file.clone(), size };
    let read = wait(async move {
        let mut stream =
            ParquetRecordBatchStreamBuilder::new(reader).await?.with_batch_size(rows.max(1)).build()?;
        stream.next().await.transpose()
    });
    read.map_err(|e| parquet_error(&file, e))
}

/// A numeric or boolean value as text; `None` for other types.
pub(crate) fn number_text(col: &ArrayRef, row: usize) -> Option<String> {
    Some(match col.data_type() {
        DataType::Float32 => col.as_primitive::<Float32Type>().value(row).to_string(),
        DataType::Float64 => col.as_primitive::<Float64Type>().value(row).to_string(),
        DataType::Int8 => col.as_primitive::<Int8Type>().value(row).to_string(),
        DataType::Int16 => col.as_primitive::<Int16Type>().value(row).to_string(),
        DataType::Int32 => col.as_primitive::<Int32Type>().value(row).to_string(),
        DataType::Int64 => col.as_primitive::<Int64Type>().value(row).to_string(),
        DataType::UInt8 => col.as_primitive::<UInt8Type>().value(row).to_string(),
        DataType::UInt16 => col.as_primitive::<UInt16Type>().value(row).to_string(),
        DataType::UInt32 => col.as_primitive::<UInt32Type>().value(row).to_string(),
        DataType::UInt64 => col.as_primitive::<UInt64Type>().value(row).to_string(),
        DataType::Boolean => col.as_boolean().value(row).to_string(),
        _ => return None,
    })
}

/// The dense columns of a file: every top-level column but the label and the categorical ones,
/// in file order; the label and categorical columns must be there.
pub(crate) fn dense_columns(schema: &CsvSchema, info: &ParquetInfo, path: &Path) -> Result<Vec<String>> {
    let names: Vec<String> = info.schema.fields().iter().map(|f| f.name().clone()).collect();
    let missing = |what: String| DataError::Parquet {
        path: path.to_path_buf(),
        cause: format!("expected {what}, found {}", column_list(&names)),
    };
    if !names.contains(&schema.label) {
        return Err(missing(format!("a label column named `{}`", schema.label)));
    }
    for c in &schema.categorical {
        if !names.contains(c) {
            return Err(missing(format!("a categorical column named `{c}`")));
        }
    }
    Ok(names.into_iter().filter(|n| *n != schema.label && !schema.categorical.contains(n)).collect())
}

/// The examples of a range of row groups of one file.
pub(crate) struct ParquetRows {
    path: PathBuf,
    schema: CsvSchema,
    dense: Vec<String>,
    batches: mpsc::Receiver<std::result::Result<RecordBatch, String>>,
    task: tokio::task::JoinHandle<()>,
    /// The current batch's columns: label, dense in feature order, categorical in field order.
    columns: Vec<ArrayRef>,
    rows: usize,
    next_row: usize,
    /// File row number (0-based) of the current batch's first row.
    batch_first_row: u64,
}

impl std::fmt::Debug for ParquetRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParquetRows").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Drop for ParquetRows {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ParquetRows {
    /// Streams row groups `groups` of `path`; `dense` are the dense columns in feature order.
    pub(crate) fn open(
        path: &Path,
        groups: Range<u64>,
        schema: &CsvSchema,
        dense: &[String],
        stores: &Stores,
        options: RemoteOptions,
    ) -> Result<ParquetRows> {
        let info = info(path, stores)?;
        let found = dense_columns(schema, &info, path)?;
        if found.len() != dense.len() || dense.iter().any(|d| !found.contains(d)) {
            return Err(DataError::Parquet {
                path: path.to_path_buf(),
                cause: format!(
                    "expected the dense columns {} (as in the first file), found {}",
                    column_list(dense),
                    column_list(&found)
                ),
            });
        }
        let total = info.row_group_rows.len() as u64;
        let groups = groups.start.min(total)..groups.end.min(total);
        let first_row: u64 = info.row_group_rows[..groups.start as usize].iter().sum();
        let file = stores.object(path)?;
        let size = file.size()?;
        let (tx, rx) = mpsc::sync_channel(options.read_ahead.max(1));
        let wanted: Vec<String> = std::iter::once(schema.label.clone())
            .chain(dense.iter().cloned())
            .chain(schema.categorical.iter().cloned())
            .collect();
        let group_list: Vec<usize> = (groups.start as usize..groups.end as usize).collect();
        let reader = ObjectReader { file, size };
        let task = crate::remote::spawn(async move {
            let send_err = |e: parquet::errors::ParquetError| {
                let _ = tx.send(Err(e.to_string()));
            };
            if group_list.is_empty() {
                return;
            }
            let builder = match ParquetRecordBatchStreamBuilder::new(reader).await {
                Ok(b) => b,
                Err(e) => return send_err(e),
            };
            let roots: Vec<usize> = builder
                .schema()
                .fields()
                .iter()
                .enumerate()
                .filter(|(_, f)| wanted.contains(f.name()))
                .map(|(i, _)| i)
                .collect();
            let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
            let stream =
                builder.with_row_groups(group_list).with_projection(mask).with_batch_size(BATCH_ROWS).build();
            let mut stream = match stream {
                Ok(s) => s,
                Err(e) => return send_err(e),
            };
            while let Some(batch) = stream.next().await {
                let stop = batch.is_err();
                if tx.send(batch.map_err(|e| e.to_string())).is_err() || stop {
                    return;
                }
            }
        });
        Ok(ParquetRows {
            path: path.to_path_buf(),
            schema: schema.clone(),
            dense: dense.to_vec(),
            batches: rx,
            task,
            columns: Vec::new(),
            rows: 0,
            next_row: 0,
            batch_first_row: first_row,
        })
    }

    /// The 1-based file row number of the row `next_example` returned last.
    pub(crate) fn row_number(&self) -> u64 {
        self.batch_first_row + self.next_row as u64
    }

    /// Reads the next row into `ex`: `None` at the end, `Some(Err)` for a malformed row.
    pub(crate) fn next_example(
        &mut self,
        ex: &mut Example,
    ) -> Result<Option<std::result::Result<(), Issue>>> {
        while self.next_row >= self.rows {
            let Ok(batch) = self.batches.recv() else { return Ok(None) };
            let batch = batch.map_err(|cause| DataError::Parquet { path: self.path.clone(), cause })?;
            self.batch_first_row += self.rows as u64;
            let column = |name: &String| {
                batch.column_by_name(name).cloned().ok_or_else(|| DataError::Parquet {
                    path: self.path.clone(),
                    cause: format!("column `{name}` is missing from a record batch"),
                })
            };
            let mut columns = vec![column(&self.schema.label)?];
            for d in &self.dense {
                columns.push(column(d)?);
            }
            for c in &self.schema.categorical {
                columns.push(column(c)?);
            }
            self.columns = columns;
            self.rows = batch.num_rows();
            self.next_row = 0;
        }
        let row = self.next_row;
        self.next_row += 1;
        Ok(Some(self.fill(row, ex)))
    }

    fn fill(&self, row: usize, ex: &mut Example) -> std::result::Result<(), Issue> {
        let names = std::iter::once(&self.schema.label).chain(&self.dense).chain(&self.schema.categorical);
        let mut columns = self.columns.iter().zip(names);
        let (label, name) = columns.next().expect("the label column");
        let v = number(label, row, name)?;
        ex.label = if v == -1.0 { 0.0 } else { v };
        ex.dense.clear();
        for _ in 0..self.dense.len() {
            let (col, name) = columns.next().expect("a dense column");
            ex.dense.push(number(col, row, name)?);
        }
        ex.sparse.clear();
        for (field, (col, name)) in columns.enumerate() {
            categorical(col, row, field as u32, name, &mut ex.sparse)?;
        }
        Ok(())
    }
}

/// Row `row` of a numeric (or boolean) column, as a finite `f32`.
fn number(col: &ArrayRef, row: usize, name: &str) -> std::result::Result<f32, Issue> {
    if col.is_null(row) {
        return Err(Issue::new(format!("a number in column `{name}`"), "null"));
    }
    let v = match col.data_type() {
        DataType::Float32 => col.as_primitive::<Float32Type>().value(row),
        DataType::Float64 => col.as_primitive::<Float64Type>().value(row) as f32,
        DataType::Int8 => col.as_primitive::<Int8Type>().value(row) as f32,
        DataType::Int16 => col.as_primitive::<Int16Type>().value(row) as f32,
        DataType::Int32 => col.as_primitive::<Int32Type>().value(row) as f32,
        DataType::Int64 => col.as_primitive::<Int64Type>().value(row) as f32,
        DataType::UInt8 => col.as_primitive::<UInt8Type>().value(row) as f32,
        DataType::UInt16 => col.as_primitive::<UInt16Type>().value(row) as f32,
        DataType::UInt32 => col.as_primitive::<UInt32Type>().value(row) as f32,
        DataType::UInt64 => col.as_primitive::<UInt64Type>().value(row) as f32,
        DataType::Boolean => f32::from(u8::from(col.as_boolean().value(row))),
        other => {
            return Err(Issue::new(
                format!("column `{name}` to be numeric (dense features and the label are)"),
                format!("type {other}"),
            ));
        }
    };
    if !v.is_finite() {
        return Err(Issue::new(format!("a finite number in column `{name}`"), format!("`{v}`")));
    }
    Ok(v)
}

/// The sparse entries of row `row` of categorical column `col` (field `field`).
fn categorical(
    col: &ArrayRef,
    row: usize,
    field: u32,
    name: &str,
    out: &mut Vec<(u32, u64, f32)>,
) -> std::result::Result<(), Issue> {
    let list = match col.data_type() {
        DataType::List(_) => Some(col.as_list::<i32>().value(row)),
        DataType::LargeList(_) => Some(col.as_list::<i64>().value(row)),
        _ => None,
    };
    match list {
        Some(values) if !col.is_null(row) => {
            for i in 0..values.len() {
                out.push((field, scalar_id(&values, i, field, name)?, 1.0));
            }
        }
        Some(_) => {}
        None => out.push((field, scalar_id(col, row, field, name)?, 1.0)),
    }
    Ok(())
}

/// The id of one string or integer value: hashed like the same text in a CSV cell.
fn scalar_id(col: &ArrayRef, row: usize, field: u32, name: &str) -> std::result::Result<u64, Issue> {
    if col.is_null(row) {
        return Ok(categorical_id(field, b""));
    }
    let int = |v: i128| categorical_id(field, v.to_string().as_bytes());
    Ok(match col.data_type() {
        DataType::Utf8 => categorical_id(field, col.as_string::<i32>().value(row).as_bytes()),
        DataType::LargeUtf8 => categorical_id(field, col.as_string::<i64>().value(row).as_bytes()),
        DataType::Utf8View => categorical_id(field, col.as_string_view().value(row).as_bytes()),
        DataType::Binary => categorical_id(field, col.as_binary::<i32>().value(row)),
        DataType::LargeBinary => categorical_id(field, col.as_binary::<i64>().value(row)),
        DataType::Int8 => int(col.as_primitive::<Int8Type>().value(row).into()),
        DataType::Int16 => int(col.as_primitive::<Int16Type>().value(row).into()),
        DataType::Int32 => int(col.as_primitive::<Int32Type>().value(row).into()),
        DataType::Int64 => int(col.as_primitive::<Int64Type>().value(row).into()),
        DataType::UInt8 => int(col.as_primitive::<UInt8Type>().value(row).into()),
        DataType::UInt16 => int(col.as_primitive::<UInt16Type>().value(row).into()),
        DataType::UInt32 => int(col.as_primitive::<UInt32Type>().value(row).into()),
        DataType::UInt64 => int(col.as_primitive::<UInt64Type>().value(row).into()),
        DataType::Dictionary(_, _) => {
            return Err(Issue::new(
                format!("column `{name}` of strings or integers (or lists of them)"),
                "a dictionary column (write it without dictionary encoding in the arrow schema)",
            ));
        }
        other => {
            return Err(Issue::new(
                format!("column `{name}` of strings or integers (or lists of them)"),
                format!("type {other}"),
            ));
        }
    })
}
