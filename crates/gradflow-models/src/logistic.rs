//! Logistic regression over sparse and dense features, the classic parameter-server workload.
//!
//! `logit = bias + Σ value·w[bucket(id)] + dense · w_dense`, trained on mean log-loss. The
//! sparse weights are a table of dim 1, so a worker pulls only the weights of the ids a batch
//! touches, however many features the model has.

use gradflow_core::{DenseSpec, Initializer, ModelSpec, OptimizerConfig, SparseSpec};
use gradflow_data::Batch;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::util::{
    ScratchPool, bucket, check_batch, chunk_range, collect_ids, log_loss, num_chunks, sigmoid,
};
use crate::{Grads, Model, ModelError, Params};

/// Name of the sparse weight table (dim 1).
pub const LR_WEIGHTS: &str = "weights";
/// Name of the bias tensor (shape `[1]`).
pub const LR_BIAS: &str = "bias";
/// Name of the dense-feature weight vector (shape `[num_dense]`; absent when `num_dense == 0`).
pub const LR_DENSE_WEIGHTS: &str = "dense_weights";

/// Configuration of [`LogisticRegression`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogisticRegressionConfig {
    /// Feature ids are mapped to rows as `id % hash_buckets`; 0 (the default) uses ids as they
    /// are.
    #[serde(default)]
    pub hash_buckets: u64,
    /// Dense features per example. Default 0.
    #[serde(default)]
    pub num_dense: usize,
    /// Optimizer of the sparse weights. Default Adagrad with lr 0.05.
    #[serde(default = "default_optimizer")]
    pub optimizer: OptimizerConfig,
    /// Optimizer of the bias and dense weights. Default: the same as `optimizer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dense_optimizer: Option<OptimizerConfig>,
}

fn default_optimizer() -> OptimizerConfig {
    OptimizerConfig::adagrad(0.05)
}

impl Default for LogisticRegressionConfig {
    fn default() -> Self {
        LogisticRegressionConfig {
            hash_buckets: 0,
            num_dense: 0,
            optimizer: default_optimizer(),
            dense_optimizer: None,
        }
    }
}

/// Logistic regression; see the module docs.
///
/// Spec: dense `bias` `[1]`, then `dense_weights` `[num_dense]` when `num_dense > 0`, all
/// zero-initialized; sparse table `weights` of dim 1, zero-initialized.
pub struct LogisticRegression {
    config: LogisticRegressionConfig,
    spec: ModelSpec,
    scratch: ScratchPool<Scratch>,
}

/// Per-batch scratch, one entry per chunk of examples.
#[derive(Default)]
struct Scratch {
    chunks: Vec<Chunk>,
}

#[derive(Default)]
struct Chunk {
    /// Row index (into the pulled rows) of each sparse entry of the chunk.
    rows: Vec<u32>,
    /// Logit of each example of the chunk.
    logits: Vec<f32>,
}

/// Below this many multiply-adds a chunk is not worth handing to another thread.
const MIN_CHUNK_WORK: usize = 16 * 1024;

impl LogisticRegression {
    /// Builds the model and its spec; fails when the spec does not validate.
    pub fn new(config: LogisticRegressionConfig) -> Result<Self, ModelError> {
        let dense_optimizer = config.dense_optimizer.clone().unwrap_or_else(|| config.optimizer.clone());
        let mut dense = vec![DenseSpec {
            name: LR_BIAS.into(),
            shape: vec![1],
            init: Initializer::Zeros,
            optimizer: dense_optimizer.clone(),
        }];
        if config.num_dense > 0 {
            dense.push(DenseSpec {
                name: LR_DENSE_WEIGHTS.into(),
                shape: vec![config.num_dense as u64],
                init: Initializer::Zeros,
                optimizer: dense_optimizer,
            });
        }
        let sparse = vec![SparseSpec {
            name: LR_WEIGHTS.into(),
            dim: 1,
            init: Initializer::Zeros,
            optimizer: config.optimizer.clone(),
        }];
        let spec = ModelSpec { dense, sparse };
        spec.validate()?;
        Ok(LogisticRegression { config, spec, scratch: ScratchPool::new() })
    }

    /// The config this model was built from.
    pub fn config(&self) -> &LogisticRegressionConfig {
        &self.config
    }

    /// Resolves rows and computes every logit, in parallel chunks for large batches.
    fn logits(&self, batch: &Batch, params: &Params, scratch: &mut Scratch) -> Result<(), ModelError> {
        check_batch(batch, self.config.num_dense)?;
        params.check(&self.spec)?;
        let n = batch.len();
        let per_example = batch.sparse_ids.len() / n.max(1) + self.config.num_dense + 1;
        let k = num_chunks(n, MIN_CHUNK_WORK / per_example);
        scratch.chunks.resize_with(k, Chunk::default);
        let run = |c: usize, chunk: &mut Chunk| self.chunk_logits(batch, params, chunk_range(n, k, c), chunk);
        if k == 1 {
            run(0, &mut scratch.chunks[0])
        } else {
            scratch.chunks.par_iter_mut().enumerate().try_for_each(|(c, chunk)| run(c, chunk))
        }
    }

    fn chunk_logits(
        &self,
        batch: &Batch,
        params: &Params,
        range: std::ops::Range<usize>,
        chunk: &mut Chunk,
    ) -> Result<(), ModelError> {
        let weights = &params.sparse[0];
        let bias = params.dense[0][0];
        let dense_w = params.dense.get(1).map(Vec::as_slice).unwrap_or(&[]);
        let entries = batch.sparse_offsets[range.start]..batch.sparse_offsets[range.end];
        chunk.rows.clear();
        for &id in &batch.sparse_ids[entries.clone()] {
            let row = bucket(id, self.config.hash_buckets);
            match weights.position(row) {
                Some(k) => chunk.rows.push(k as u32),
                None => return Err(ModelError::MissingRow { table: LR_WEIGHTS.into(), id: row }),
            }
        }
        chunk.logits.clear();
        for i in range {
            let mut z = bias + dot(batch.dense_row(i), dense_w);
            for e in batch.sparse_range(i) {
                z += batch.sparse_values[e] * weights.values[chunk.rows[e - entries.start] as usize];
            }
            chunk.logits.push(z);
        }
        Ok(())
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl Model for LogisticRegression {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn num_dense(&self) -> usize {
        self.config.num_dense
    }

    fn sparse_ids(&self, batch: &Batch, out: &mut Vec<Vec<u64>>) {
        out.resize_with(1, Vec::new);
        collect_ids(batch, self.config.hash_buckets, &mut out[0]);
    }

    fn forward_backward(&self, batch: &Batch, params: &Params, grads: &mut Grads) -> Result<f32, ModelError> {
        let mut scratch = self.scratch.take();
        let result = self.logits(batch, params, &mut scratch);
        if let Err(e) = result {
            self.scratch.put(scratch);
            return Err(e);
        }
        grads.reset_like(params);
        let n = batch.len();
        let inv_n = 1.0 / n.max(1) as f32;
        let (bias_grad, rest) = grads.dense.split_first_mut().expect("spec has a bias");
        let dense_grad = rest.first_mut().map(Vec::as_mut_slice).unwrap_or(&mut []);
        let weight_grad = &mut grads.sparse[0].values;
        let mut loss = 0.0f64;
        let mut bias_sum = 0.0f64;
        let k = scratch.chunks.len();
        for (c, chunk) in scratch.chunks.iter().enumerate() {
            let range = chunk_range(n, k, c);
            let entry0 = batch.sparse_offsets[range.start];
            for (i, &z) in range.zip(&chunk.logits) {
                let y = batch.labels[i];
                loss += log_loss(z, y) as f64;
                // d(mean loss)/d(logit) for a sigmoid with log-loss.
                let g = (sigmoid(z) - y) * inv_n;
                bias_sum += g as f64;
                for (dw, &x) in dense_grad.iter_mut().zip(batch.dense_row(i)) {
                    *dw += g * x;
                }
                for e in batch.sparse_range(i) {
                    weight_grad[chunk.rows[e - entry0] as usize] += g * batch.sparse_values[e];
                }
            }
        }
        bias_grad[0] = bias_sum as f32;
        self.scratch.put(scratch);
        Ok((loss / n.max(1) as f64) as f32)
    }

    fn predict(&self, batch: &Batch, params: &Params, out: &mut Vec<f32>) -> Result<(), ModelError> {
        let mut scratch = self.scratch.take();
        let result = self.logits(batch, params, &mut scratch);
        if result.is_ok() {
            out.clear();
            out.extend(scratch.chunks.iter().flat_map(|c| c.logits.iter().map(|&z| sigmoid(z))));
        }
        self.scratch.put(scratch);
        result
    }
}
