//! Helpers shared by the integration tests: writing files and draining readers.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use gradflow_data::{Batch, DataError, Reader, ReaderConfig, ShardSpec};

/// An example with float bits instead of floats, so examples can be sorted and compared as
/// multisets.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Row {
    pub label: u32,
    pub dense: Vec<u32>,
    pub sparse: Vec<(u32, u64, u32)>,
}

impl Row {
    pub fn new(label: f32, dense: &[f32], sparse: &[(u32, u64, f32)]) -> Row {
        Row {
            label: label.to_bits(),
            dense: dense.iter().map(|x| x.to_bits()).collect(),
            sparse: sparse.iter().map(|&(f, i, v)| (f, i, v.to_bits())).collect(),
        }
    }

    pub fn label(&self) -> f32 {
        f32::from_bits(self.label)
    }
}

/// The rows of a batch.
pub fn rows_of(batch: &Batch) -> Vec<Row> {
    (0..batch.len())
        .map(|i| {
            let r = batch.sparse_range(i);
            Row {
                label: batch.labels[i].to_bits(),
                dense: batch.dense_row(i).iter().map(|x| x.to_bits()).collect(),
                sparse: r
                    .map(|k| (batch.sparse_fields[k], batch.sparse_ids[k], batch.sparse_values[k].to_bits()))
                    .collect(),
            }
        })
        .collect()
}

/// Every row a reader yields, in order, with batches of `batch_size`.
pub fn drain(reader: &mut Reader, batch_size: usize) -> Result<Vec<Row>, DataError> {
    let mut batch = Batch::new(0);
    let mut out = Vec::new();
    while reader.next_batch(&mut batch, batch_size)? > 0 {
        out.extend(rows_of(&batch));
    }
    Ok(out)
}

/// Every row worker `worker` of `workers` reads.
pub fn read_shard(config: &ReaderConfig, worker: usize, workers: usize) -> Result<Vec<Row>, DataError> {
    let mut reader = Reader::open(config, ShardSpec::new(worker, workers)?)?;
    drain(&mut reader, 7)
}

/// Writes `content` to `dir/name`.
pub fn write(dir: &Path, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}
