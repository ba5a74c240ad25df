//! [`LoadedModel`]: one checkpoint's model in memory, ready to predict.
//!
//! Loading resolves a checkpoint on any object store, reads every file it needs (each checked
//! against the size and CRC-32C its manifest records), checks the serving info against the
//! parameters, and keeps the dense tensors whole and each sparse table as an id index over its
//! rows. Predicting scales the dense features with the job's statistics, gathers the rows of
//! the batch's ids and runs the model's forward pass. An id the checkpoint has no row for gets
//! the values its table's initializer gives a new row, exactly what a parameter server answers
//! for it, and nothing is stored.

use std::collections::HashMap;

use gradflow_checkpoint::{CheckpointStore, Manifest};
use gradflow_core::{Initializer, ModelSpec};
use gradflow_data::Batch;
use gradflow_models::{Model, Params, ServingInfo, SparseRows};

use crate::ServeError;

/// One sparse table's rows, found by id.
struct Table {
    name: String,
    dim: usize,
    init: Initializer,
    rows: HashMap<u64, u32>,
    values: Vec<f32>,
}

impl Table {
    /// The rows of `ids` (sorted, unique), new-row values for ids without one.
    fn gather(&self, ids: &[u64]) -> SparseRows {
        let mut values = vec![0.0; ids.len() * self.dim];
        for (&id, out) in ids.iter().zip(values.chunks_exact_mut(self.dim)) {
            match self.rows.get(&id) {
                Some(&r) => {
                    let r = r as usize * self.dim;
                    out.copy_from_slice(&self.values[r..r + self.dim]);
                }
                None => self.init.fill_row(&self.name, id, out),
            }
        }
        SparseRows { ids: ids.to_vec(), dim: self.dim, values }
    }
}

/// A trained model loaded from a checkpoint; see the module docs. Shared by any number of
/// threads.
pub struct LoadedModel {
    info: ServingInfo,
    model: Box<dyn Model>,
    dense: Vec<Vec<f32>>,
    tables: Vec<Table>,
    step: u64,
    checkpoint: String,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("job", &self.info.job)
            .field("step", &self.step)
            .field("checkpoint", &self.checkpoint)
            .finish_non_exhaustive()
    }
}

impl LoadedModel {
    /// Loads checkpoint `which` (`latest`, `best`, a step, a directory name or a checkpoint's URL) of
    /// the root `store`.
    pub async fn load(store: &CheckpointStore, which: &str) -> Result<LoadedModel, ServeError> {
        let manifest = store.resolve(which).await?;
        LoadedModel::from_manifest(store, &manifest).await
    }

    /// Loads the checkpoint `manifest` describes.
    pub async fn from_manifest(
        store: &CheckpointStore,
        manifest: &Manifest,
    ) -> Result<LoadedModel, ServeError> {
        let checkpoint = manifest.url();
        let bad = |reason: String| ServeError::BadServingInfo { checkpoint: checkpoint.clone(), reason };
        let json = manifest
            .serving
            .clone()
            .ok_or_else(|| ServeError::NoServingInfo { checkpoint: checkpoint.clone() })?;
        let info: ServingInfo =
            serde_json::from_value(json).map_err(|e| bad(format!("its serving info does not parse: {e}")))?;
        let model = info.check().map_err(|e| bad(e.to_string()))?;
        if let Some(diff) = model.spec().first_difference(&manifest.spec) {
            return Err(bad(format!("the serving info's model differs from the checkpoint's spec: {diff}")));
        }
        let snap = store.load_model(manifest).await?;
        let spec: &ModelSpec = model.spec();
        let mut dense = Vec::with_capacity(spec.dense.len());
        for (d, piece) in spec.dense.iter().zip(snap.dense) {
            if piece.tensor != d.name || piece.values.len() as u64 != d.numel() {
                return Err(bad(format!("dense tensor `{}` did not load whole", d.name)));
            }
            dense.push(piece.values);
        }
        let mut tables = Vec::with_capacity(spec.sparse.len());
        for (s, t) in spec.sparse.iter().zip(snap.sparse) {
            let rows = t.ids.iter().enumerate().map(|(r, &id)| (id, r as u32)).collect();
            tables.push(Table {
                name: s.name.clone(),
                dim: s.dim as usize,
                init: s.init.clone(),
                rows,
                values: t.values,
            });
        }
        Ok(LoadedModel { info, model, dense, tables, step: manifest.step, checkpoint })
    }

    /// What the checkpoint says about the model's input and scaling.
    pub fn info(&self) -> &ServingInfo {
        &self.info
    }

    /// The step the checkpoint was taken at.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The checkpoint's URL.
    pub fn checkpoint(&self) -> &str {
        &self.checkpoint
    }

    /// Rows held per sparse table, in spec order.
    pub fn table_rows(&self) -> Vec<(String, usize)> {
        self.tables.iter().map(|t| (t.name.clone(), t.rows.len())).collect()
    }

    /// The probability of each example of `batch`, raw as read or decoded: its dense features
    /// are scaled here, in place, with the job's statistics. Writes one probability per
    /// example into `out`.
    pub fn predict(&self, batch: &mut Batch, out: &mut Vec<f32>) -> Result<(), ServeError> {
        if let Some(s) = &self.info.standardize {
            gradflow_data::standardize::scale(&mut batch.dense, &s.mean, &s.std);
        }
        self.predict_scaled(batch, out)
    }

    /// [`LoadedModel::predict`] of a batch whose dense features are scaled already.
    pub fn predict_scaled(&self, batch: &Batch, out: &mut Vec<f32>) -> Result<(), ServeError> {
        let mut ids = Vec::new();
        self.model.sparse_ids(batch, &mut ids);
        let params = Params {
            dense: self.dense.clone(),
            sparse: self.tables.iter().zip(&ids).map(|(t, ids)| t.gather(ids)).collect(),
        };
        self.model.predict(batch, &params, out)?;
        Ok(())
    }
}
