//! Predicting and scoring whole data files with a [`LoadedModel`] (`gradflow predict`,
//! `gradflow eval --checkpoint`).
//!
//! A file is read by gradflow-data's reader, in file order, with the columns the model's
//! serving info names: any format the job could train on that names its columns (CSV,
//! Parquet, TFRecord), locally or on object storage. Its dense columns may come in another
//! order than the training file's; they are put in the model's order. The label column must
//! be there (the readers need one); `predict` does not use it.

use std::path::Path;

use gradflow_data::{Batch, CsvSchema, Format, Reader, ReaderConfig, ShardSpec, metrics};

use crate::{LoadedModel, ServeError};

/// Examples read and predicted at a time.
const BATCH_ROWS: usize = 4096;

/// The labels and predicted probabilities of every example of a file, in file order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Predictions {
    pub labels: Vec<f32>,
    pub probs: Vec<f32>,
}

/// Test loss, AUC and accuracy of a model on a file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    pub loss: f64,
    pub auc: f64,
    pub accuracy: f64,
    pub examples: u64,
}

impl Predictions {
    /// The scores of these predictions against their labels; `None` without examples.
    pub fn scores(&self) -> Option<Scores> {
        if self.labels.is_empty() {
            return None;
        }
        Some(Scores {
            loss: metrics::log_loss(&self.labels, &self.probs),
            auc: metrics::auc(&self.labels, &self.probs),
            accuracy: metrics::accuracy(&self.labels, &self.probs),
            examples: self.labels.len() as u64,
        })
    }
}

/// Predicts every example of `path` (a file, directory, glob or URL, as a job's `data.test`).
pub fn predict_file(model: &LoadedModel, path: &Path) -> Result<Predictions, ServeError> {
    let input = &model.info().input;
    let mut config = ReaderConfig::new(Format::Auto, vec![path.to_path_buf()]);
    config.csv = CsvSchema::new(input.label.clone(), input.categorical.clone());
    let mut reader = Reader::open(&config, ShardSpec::new(0, 1)?)?;
    let order = dense_order(&input.dense, reader.dense_names(), path)?;
    let mut batch = Batch::new(reader.num_dense());
    let mut ordered = Batch::new(input.dense.len());
    let (mut out, mut all) = (Vec::new(), Predictions::default());
    loop {
        let n = reader.next_batch(&mut batch, BATCH_ROWS)?;
        if n == 0 {
            break;
        }
        let batch = match &order {
            None => &mut batch,
            Some(order) => {
                ordered.clone_from(&batch);
                ordered.num_dense = order.len();
                for (dst, src) in
                    ordered.dense.chunks_exact_mut(order.len()).zip(batch.dense.chunks_exact(order.len()))
                {
                    for (d, &o) in dst.iter_mut().zip(order) {
                        *d = src[o];
                    }
                }
                &mut ordered
            }
        };
        model.predict(batch, &mut out)?;
        all.labels.extend_from_slice(&batch.labels);
        all.probs.extend_from_slice(&out);
    }
    Ok(all)
}

/// Where each of the model's dense columns is among the file's: `None` when in the same
/// order; an error naming the first column the model has and the file lacks, or the reverse.
fn dense_order(model: &[String], file: &[String], path: &Path) -> Result<Option<Vec<usize>>, ServeError> {
    if model == file {
        return Ok(None);
    }
    let config = |m: String| ServeError::Data(gradflow_data::DataError::Config(m));
    let mut order = Vec::with_capacity(model.len());
    for name in model {
        let i = file.iter().position(|f| f == name).ok_or_else(|| {
            config(format!("{}: the model's dense column `{name}` is not in the file", path.display()))
        })?;
        order.push(i);
    }
    if let Some(extra) = file.iter().find(|f| !model.contains(f)) {
        return Err(config(format!(
            "{}: column `{extra}` is not one of the model's columns (dense {}; the label and categorical columns are named in the checkpoint)",
            path.display(),
            gradflow_data::csv::column_list(model)
        )));
    }
    Ok(Some(order))
}
