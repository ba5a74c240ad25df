//! What a data file holds, for `gradflow data inspect`: its format and compression, its size,
//! for Parquet its columns and row groups, and its first rows as written (for TFRecord, each
//! record's features by name).

use std::io::BufRead;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef};
use arrow_schema::DataType;
use prost::Message;

use crate::error::{DataError, Result};
use crate::parquet::{ParquetInfo, first_batch};
use crate::reader::Format;
use crate::remote::{Location, Stores};
use crate::source::{Compression, open_stream};

/// What [`inspect`] found.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// The format (given, or from the extension).
    pub format: Format,
    /// The compression, from the extension.
    pub compression: Compression,
    /// The file's size in bytes (compressed, as stored).
    pub bytes: u64,
    /// For Parquet: the footer.
    pub parquet: Option<ParquetInfo>,
    /// Column names of `first`: the header for CSV, the columns for Parquet; none for libsvm.
    pub columns: Vec<String>,
    /// The first rows: lines as written for text formats, values for Parquet.
    pub first: Vec<Vec<String>>,
}

/// Inspects the file at `path` (a local path or a URL) read as `format`, keeping `rows` rows.
pub fn inspect(path: &Path, format: Format, rows: usize, stores: &Stores) -> Result<Inspection> {
    let format = format.resolve(Some(path));
    let compression = Compression::of(path);
    let bytes = match stores.locate(path)? {
        Location::Local(local) => std::fs::metadata(&local).map_err(|e| DataError::io(path, e))?.len(),
        Location::Remote(remote) => remote.size()?,
    };
    if format == Format::Parquet {
        let info = crate::parquet::info(path, stores)?;
        let columns = info.schema.fields().iter().map(|f| f.name().clone()).collect();
        let mut first = Vec::new();
        if let Some(batch) = first_batch(path, stores, rows)? {
            for row in 0..batch.num_rows().min(rows) {
                first.push(batch.columns().iter().map(|c| cell(c, row)).collect());
            }
        }
        return Ok(Inspection { format, compression, bytes, parquet: Some(info), columns, first });
    }
    if format == Format::Tfrecord {
        let mut records = crate::tfrecord::Records::open(path, stores)?;
        let mut first = Vec::new();
        while first.len() < rows {
            let Some(data) = records.next_record()? else { break };
            let example = crate::tfrecord::TfExample::decode(data).map_err(|e| DataError::Row {
                path: path.to_path_buf(),
                row: records.count(),
                expected: "a tf.Example".into(),
                found: format!("bytes that do not decode ({e})"),
            })?;
            let mut features: Vec<_> = example.features.unwrap_or_default().feature.into_iter().collect();
            features.sort_by(|a, b| a.0.cmp(&b.0));
            first
                .push(features.into_iter().map(|(name, f)| format!("{name}={}", feature_text(&f))).collect());
        }
        return Ok(Inspection { format, compression, bytes, parquet: None, columns: Vec::new(), first });
    }
    let mut stream = open_stream(path, 0, u64::MAX, 64 * 1024, stores).map_err(|e| DataError::io(path, e))?;
    let mut lines = Vec::new();
    let wanted = rows + usize::from(format == Format::Csv);
    let mut line = String::new();
    while lines.len() < wanted {
        line.clear();
        if stream.read_line(&mut line).map_err(|e| DataError::io(path, e))? == 0 {
            break;
        }
        lines.push(line.trim_end_matches(['\n', '\r']).to_string());
    }
    let columns = match format {
        Format::Csv if !lines.is_empty() => lines.remove(0).split(',').map(str::to_string).collect(),
        _ => Vec::new(),
    };
    let first = lines.into_iter().map(|l| vec![l]).collect();
    Ok(Inspection { format, compression, bytes, parquet: None, columns, first })
}

/// One value of an arrow column, as text.
fn cell(col: &ArrayRef, row: usize) -> String {
    if col.is_null(row) {
        return "null".into();
    }
    match col.data_type() {
        DataType::Utf8 => col.as_string::<i32>().value(row).to_string(),
        DataType::LargeUtf8 => col.as_string::<i64>().value(row).to_string(),
        DataType::Utf8View => col.as_string_view().value(row).to_string(),
        DataType::List(_) => list(&col.as_list::<i32>().value(row)),
        DataType::LargeList(_) => list(&col.as_list::<i64>().value(row)),
        _ => crate::parquet::number_text(col, row).unwrap_or_else(|| format!("<{}>", col.data_type())),
    }
}

/// A `tf.Feature`'s values, as text: `[1, 2]`, `[0.5]`, `["a"]`.
fn feature_text(f: &crate::tfrecord::Feature) -> String {
    use crate::tfrecord::Kind;
    let items: Vec<String> = match &f.kind {
        Some(Kind::BytesList(l)) => {
            l.value.iter().map(|v| format!("{:?}", String::from_utf8_lossy(v))).collect()
        }
        Some(Kind::FloatList(l)) => l.value.iter().map(f32::to_string).collect(),
        Some(Kind::Int64List(l)) => l.value.iter().map(i64::to_string).collect(),
        None => Vec::new(),
    };
    format!("[{}]", items.join(", "))
}

fn list(values: &ArrayRef) -> String {
    let items: Vec<String> = (0..values.len()).map(|i| cell(values, i)).collect();
    format!("[{}]", items.join(", "))
}
