//! Wide & Deep (Cheng et al., 2016): a linear model over the categorical ids plus an MLP over
//! their embeddings and the dense features, summed into one logit.
//!
//! ```text
//! wide  = wide_bias + Σ value · wide[bucket(id)]                    over every sparse entry
//! x     = [ Σ_{entries of field 0} value · emb[bucket(id)], ..., field F-1, dense features ]
//! deep  = W_L · relu(... relu(W_0 · x + b_0) ...) + b_L              hidden widths, then 1
//! p     = sigmoid(wide + deep)
//! ```
//!
//! The batch is split into a few contiguous chunks (one per rayon thread, each big enough to be
//! worth it); each chunk gathers its embeddings into a row-major input matrix and runs the MLP
//! forward and backward as matrix products over all its examples, into scratch buffers that
//! are reused from batch to batch. Only the reduction of the per-chunk dense gradients and the
//! scatter of the sparse gradients into the pulled rows run on one thread; both are small.

use gradflow_core::{DenseSpec, Initializer, ModelSpec, OptimizerConfig, SparseSpec};
use gradflow_data::Batch;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::matmul::{Kernel, Mat, matmul};
use crate::params::IdIndex;
use crate::util::{
    ScratchPool, bucket, check_batch, chunk_range, collect_ids, log_loss, num_chunks, sigmoid,
};
use crate::{Grads, Model, ModelError, Params};

/// Name of the wide part's sparse table (dim 1).
pub const WD_WIDE: &str = "wide";
/// Name of the embedding table (dim `embedding_dim`; absent when `num_fields == 0`).
pub const WD_EMBEDDING: &str = "embedding";
/// Name of the wide part's bias (shape `[1]`).
pub const WD_WIDE_BIAS: &str = "wide_bias";

/// Configuration of [`WideDeep`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WideDeepConfig {
    /// Categorical fields per example, each with one embedding slot in the MLP input (the
    /// embeddings of several ids of one field are summed, weighted by their values). Every
    /// sparse entry's field must be below this. 0 makes a model without embeddings: the sparse
    /// entries (any field) only feed the wide part, and the MLP sees the dense features only.
    /// Required.
    pub num_fields: usize,
    /// Dense features per example, appended to the embeddings as MLP input. Required.
    pub num_dense: usize,
    /// Ids are mapped to rows as `id % hash_buckets` (0: ids as they are). Default 1_000_000.
    #[serde(default = "default_hash_buckets")]
    pub hash_buckets: u64,
    /// Width of an embedding. Default 8.
    #[serde(default = "default_embedding_dim")]
    pub embedding_dim: usize,
    /// Widths of the hidden ReLU layers. Default `[64, 32]`.
    #[serde(default = "default_hidden")]
    pub hidden: Vec<usize>,
    /// Standard deviation of the normal distribution new embedding rows are drawn from.
    /// Default 0.05.
    #[serde(default = "default_embedding_init_std")]
    pub embedding_init_std: f32,
    /// Optimizer of the sparse tables (wide weights and embeddings). Default Adagrad, lr 0.05.
    #[serde(default = "default_optimizer")]
    pub sparse_optimizer: OptimizerConfig,
    /// Optimizer of the dense tensors (MLP and wide bias). Default Adagrad, lr 0.05.
    #[serde(default = "default_optimizer")]
    pub dense_optimizer: OptimizerConfig,
    /// Seed of the initializers. Default 0.
    #[serde(default)]
    pub seed: u64,
}

fn default_hash_buckets() -> u64 {
    1_000_000
}
fn default_embedding_dim() -> usize {
    8
}
fn default_hidden() -> Vec<usize> {
    vec![64, 32]
}
fn default_embedding_init_std() -> f32 {
    0.05
}
fn default_optimizer() -> OptimizerConfig {
    OptimizerConfig::adagrad(0.05)
}

impl WideDeepConfig {
    /// The defaults for data with `num_fields` categorical fields and `num_dense` dense
    /// features (Criteo: 26 and 13).
    pub fn new(num_fields: usize, num_dense: usize) -> Self {
        WideDeepConfig {
            num_fields,
            num_dense,
            hash_buckets: default_hash_buckets(),
            embedding_dim: default_embedding_dim(),
            hidden: default_hidden(),
            embedding_init_std: default_embedding_init_std(),
            sparse_optimizer: default_optimizer(),
            dense_optimizer: default_optimizer(),
            seed: 0,
        }
    }

    /// Width of the MLP input: one embedding per field, then the dense features. Saturates
    /// at `usize::MAX` where it overflows (never wraps); [`WideDeep::new`] refuses that.
    pub fn input_width(&self) -> usize {
        self.checked_input_width().unwrap_or(usize::MAX)
    }

    /// Width of the MLP input, or `None` when `num_fields * embedding_dim + num_dense`
    /// overflows.
    pub fn checked_input_width(&self) -> Option<usize> {
        self.num_fields.checked_mul(self.embedding_dim)?.checked_add(self.num_dense)
    }
}

/// Wide & Deep; see the module docs.
///
/// Spec, dense: `wide_bias` `[1]` (zeros), then for each layer `l` (the hidden layers, then the
/// output layer of width 1) `deep_w{l}` `[in, out]` (Xavier uniform) and `deep_b{l}` `[out]`
/// (zeros). Sparse: `wide` of dim 1 (zeros), then `embedding` of dim `embedding_dim`
/// (normal, `embedding_init_std`) when `num_fields > 0`. Both tables are keyed by the same
/// bucketed ids.
pub struct WideDeep {
    config: WideDeepConfig,
    spec: ModelSpec,
    /// `(in, out)` of each layer, the output layer last.
    layers: Vec<(usize, usize)>,
    scratch: ScratchPool<Scratch>,
    kernel: Kernel,
}

#[derive(Default)]
struct Scratch {
    chunks: Vec<Chunk>,
    /// Whether both tables were pulled for the same ids, so one row index serves both.
    shared_rows: bool,
    /// Where each pulled id is, for `wide` and (when its ids differ) `embedding`.
    wide_index: IdIndex,
    emb_index: IdIndex,
}

/// Buffers of one chunk of `m` examples; all matrices are row-major with one row per example.
#[derive(Default)]
struct Chunk {
    /// Row index into the pulled `wide` rows of each sparse entry of the chunk.
    wide_rows: Vec<u32>,
    /// Same for `embedding`, when its ids differ from `wide`'s (they do not when both were
    /// pulled for the ids `sparse_ids` returned, and then this stays empty).
    emb_rows: Vec<u32>,
    /// `acts[0]` is the MLP input (m × in_0); `acts[l + 1]` the output of layer `l` after its
    /// ReLU (none on the last layer, whose m × 1 output is the deep logit).
    acts: Vec<Vec<f32>>,
    /// `deltas[l]`: gradient of the mean loss with respect to layer `l`'s pre-activation output.
    deltas: Vec<Vec<f32>>,
    /// Gradient with respect to the embedding part of the input (m × num_fields·dim).
    dx: Vec<f32>,
    /// This chunk's share of each layer's weight and bias gradients.
    dw: Vec<Vec<f32>>,
    db: Vec<Vec<f32>>,
    /// Final logit of each example.
    logits: Vec<f32>,
    /// `d loss / d logit` of each example (the chunk's share of `wide_bias`'s gradient is their sum).
    dlogits: Vec<f32>,
    loss: f64,
}

/// Below this many examples per chunk the thread hand-off costs more than the MLP saves.
const MIN_CHUNK: usize = 32;

impl WideDeep {
    /// Checks the config and builds the model and its spec.
    pub fn new(config: WideDeepConfig) -> Result<Self, ModelError> {
        let bad = |m: &str| Err(ModelError::InvalidConfig(format!("wide_deep: {m}")));
        if config.num_fields > 0 && config.embedding_dim == 0 {
            return bad("embedding_dim must be positive when num_fields > 0");
        }
        let Some(input_width) = config.checked_input_width() else {
            return bad(&format!(
                "the MLP input, num_fields ({}) x embedding_dim ({}) + num_dense ({}), is too large to count",
                config.num_fields, config.embedding_dim, config.num_dense
            ));
        };
        if input_width == 0 {
            return bad("the MLP has no input: set num_fields or num_dense");
        }
        if config.hidden.contains(&0) {
            return bad("hidden layer widths must be positive");
        }
        if !(config.embedding_init_std.is_finite() && config.embedding_init_std > 0.0) {
            return bad("embedding_init_std must be a positive number");
        }
        let mut layers = Vec::with_capacity(config.hidden.len() + 1);
        let mut width = input_width;
        for &h in config.hidden.iter().chain(&[1]) {
            layers.push((width, h));
            width = h;
        }
        let mut dense = vec![DenseSpec {
            name: WD_WIDE_BIAS.into(),
            shape: vec![1],
            init: Initializer::Zeros,
            optimizer: config.dense_optimizer.clone(),
        }];
        for (l, &(i, o)) in layers.iter().enumerate() {
            dense.push(DenseSpec {
                name: format!("deep_w{l}"),
                shape: vec![i as u64, o as u64],
                init: Initializer::XavierUniform { gain: 1.0, seed: config.seed },
                optimizer: config.dense_optimizer.clone(),
            });
            dense.push(DenseSpec {
                name: format!("deep_b{l}"),
                shape: vec![o as u64],
                init: Initializer::Zeros,
                optimizer: config.dense_optimizer.clone(),
            });
        }
        let mut sparse = vec![SparseSpec {
            name: WD_WIDE.into(),
            dim: 1,
            init: Initializer::Zeros,
            optimizer: config.sparse_optimizer.clone(),
        }];
        if config.num_fields > 0 {
            let dim = u32::try_from(config.embedding_dim)
                .map_err(|_| ModelError::InvalidConfig("wide_deep: embedding_dim is too large".into()))?;
            sparse.push(SparseSpec {
                name: WD_EMBEDDING.into(),
                dim,
                init: Initializer::Normal { mean: 0.0, std: config.embedding_init_std, seed: config.seed },
                optimizer: config.sparse_optimizer.clone(),
            });
        }
        let spec = ModelSpec { dense, sparse };
        spec.validate()?;
        Ok(WideDeep { config, spec, layers, scratch: ScratchPool::new(), kernel: Kernel::DEFAULT })
    }

    /// The same model computing its matrix products with `kernel` ([`Kernel::DEFAULT`] unless
    /// set): for comparing kernels in the model's own shapes.
    pub fn with_kernel(mut self, kernel: Kernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// The kernel of the matrix products.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// `(inputs, outputs)` of each layer of the MLP, the output layer (width 1) last.
    pub fn layers(&self) -> &[(usize, usize)] {
        &self.layers
    }

    /// The config this model was built from.
    pub fn config(&self) -> &WideDeepConfig {
        &self.config
    }

    fn emb_width(&self) -> usize {
        self.config.num_fields * self.config.embedding_dim
    }

    /// Runs the forward pass (and the backward pass when `train`) over every chunk.
    fn run(
        &self,
        batch: &Batch,
        params: &Params,
        scratch: &mut Scratch,
        train: bool,
    ) -> Result<(), ModelError> {
        check_batch(batch, self.config.num_dense)?;
        params.check(&self.spec)?;
        let n = batch.len();
        let k = num_chunks(n, MIN_CHUNK);
        let shared_rows = params.sparse.len() < 2 || params.sparse[0].ids == params.sparse[1].ids;
        scratch.shared_rows = shared_rows;
        scratch.wide_index.build(&params.sparse[0].ids);
        if !shared_rows {
            scratch.emb_index.build(&params.sparse[1].ids);
        }
        scratch.chunks.resize_with(k, Chunk::default);
        let indexes = (&scratch.wide_index, &scratch.emb_index);
        let run = |c: usize, chunk: &mut Chunk| {
            let range = chunk_range(n, k, c);
            self.forward(batch, params, range.clone(), shared_rows, indexes, chunk)?;
            if train {
                self.backward(batch, params, range, chunk);
            }
            Ok(())
        };
        if k == 1 {
            run(0, &mut scratch.chunks[0])
        } else {
            scratch.chunks.par_iter_mut().enumerate().try_for_each(|(c, chunk)| run(c, chunk))
        }
    }

    /// Resolves rows, gathers the MLP input, and computes every logit of the chunk.
    fn forward(
        &self,
        batch: &Batch,
        params: &Params,
        range: std::ops::Range<usize>,
        shared_rows: bool,
        (wide_index, emb_index): (&IdIndex, &IdIndex),
        chunk: &mut Chunk,
    ) -> Result<(), ModelError> {
        let m = range.len();
        let num_fields = self.config.num_fields;
        let dim = self.config.embedding_dim;
        let emb_width = self.emb_width();
        let in0 = self.layers[0].0;
        let wide = &params.sparse[0];
        let emb = params.sparse.get(1);
        let entries = batch.sparse_offsets[range.start]..batch.sparse_offsets[range.end];

        chunk.wide_rows.clear();
        chunk.emb_rows.clear();
        for e in entries.clone() {
            let field = batch.sparse_fields[e];
            if num_fields > 0 && field as usize >= num_fields {
                return Err(ModelError::FieldOutOfRange { field, num_fields });
            }
            let id = bucket(batch.sparse_ids[e], self.config.hash_buckets);
            let missing = |table: &str| ModelError::MissingRow { table: table.into(), id };
            chunk.wide_rows.push(wide_index.position(&wide.ids, id).ok_or_else(|| missing(WD_WIDE))? as u32);
            if let Some(emb) = emb.filter(|_| !shared_rows) {
                let position = emb_index.position(&emb.ids, id);
                chunk.emb_rows.push(position.ok_or_else(|| missing(WD_EMBEDDING))? as u32);
            }
        }
        let emb_rows = if shared_rows { &chunk.wide_rows } else { &chunk.emb_rows };

        chunk.acts.resize_with(self.layers.len() + 1, Vec::new);
        let x = &mut chunk.acts[0];
        x.resize(m * in0, 0.0);
        chunk.logits.clear();
        let wide_bias = params.dense[0][0];
        for (li, i) in range.enumerate() {
            let xrow = &mut x[li * in0..(li + 1) * in0];
            xrow[..emb_width].fill(0.0);
            let mut z = wide_bias;
            for e in batch.sparse_range(i) {
                let k = e - entries.start;
                let v = batch.sparse_values[e];
                z += v * wide.values[chunk.wide_rows[k] as usize];
                if let Some(emb) = emb {
                    let f = batch.sparse_fields[e] as usize;
                    let r = emb_rows[k] as usize;
                    for (xi, &w) in
                        xrow[f * dim..(f + 1) * dim].iter_mut().zip(&emb.values[r * dim..(r + 1) * dim])
                    {
                        *xi += v * w;
                    }
                }
            }
            xrow[emb_width..].copy_from_slice(batch.dense_row(i));
            chunk.logits.push(z);
        }

        let last = self.layers.len() - 1;
        for (l, &(i, o)) in self.layers.iter().enumerate() {
            let (before, after) = chunk.acts.split_at_mut(l + 1);
            let input = Mat::new(&before[l], m, i);
            let out = &mut after[0];
            out.resize(m * o, 0.0);
            let bias = &params.dense[2 + 2 * l];
            for row in out.chunks_exact_mut(o) {
                row.copy_from_slice(bias);
            }
            let weights = Mat::new(&params.dense[1 + 2 * l], i, o);
            matmul(self.kernel, input, weights, out, true);
            if l < last {
                for a in out.iter_mut() {
                    *a = a.max(0.0);
                }
            }
        }
        for (z, &deep) in chunk.logits.iter_mut().zip(&chunk.acts[last + 1]) {
            *z += deep;
        }
        Ok(())
    }

    /// Loss and gradients of the chunk, from the activations `forward` left in it.
    fn backward(&self, batch: &Batch, params: &Params, range: std::ops::Range<usize>, chunk: &mut Chunk) {
        let m = range.len();
        let inv_n = 1.0 / batch.len() as f32;
        chunk.loss = 0.0;
        chunk.dlogits.clear();
        for (&z, &y) in chunk.logits.iter().zip(&batch.labels[range]) {
            chunk.loss += log_loss(z, y) as f64;
            chunk.dlogits.push((sigmoid(z) - y) * inv_n);
        }
        let nl = self.layers.len();
        chunk.deltas.resize_with(nl, Vec::new);
        chunk.dw.resize_with(nl, Vec::new);
        chunk.db.resize_with(nl, Vec::new);
        chunk.deltas[nl - 1].clone_from(&chunk.dlogits);
        for (l, &(i, o)) in self.layers.iter().enumerate().rev() {
            let (lower, upper) = chunk.deltas.split_at_mut(l);
            let delta = Mat::new(&upper[0], m, o);
            let dw = &mut chunk.dw[l];
            dw.resize(i * o, 0.0);
            matmul(self.kernel, Mat::new(&chunk.acts[l], m, i).t(), delta, dw, false);
            let db = &mut chunk.db[l];
            db.clear();
            db.resize(o, 0.0);
            for row in upper[0].chunks_exact(o) {
                for (b, &d) in db.iter_mut().zip(row) {
                    *b += d;
                }
            }
            let weights = &params.dense[1 + 2 * l];
            if l > 0 {
                // The previous layer's output went through a ReLU: its gradient passes only
                // where that output is positive.
                let below = &mut lower[l - 1];
                below.resize(m * i, 0.0);
                matmul(self.kernel, delta, Mat::new(weights, i, o).t(), below, false);
                for (d, &a) in below.iter_mut().zip(&chunk.acts[l]) {
                    if a <= 0.0 {
                        *d = 0.0;
                    }
                }
            } else {
                // Only the embedding columns of the input have parameters behind them; the
                // first `emb_width` rows of W_0 are exactly those columns' weights.
                let emb_width = self.emb_width();
                chunk.dx.resize(m * emb_width, 0.0);
                if emb_width > 0 {
                    let w_emb = Mat::new(&weights[..emb_width * o], emb_width, o);
                    matmul(self.kernel, delta, w_emb.t(), &mut chunk.dx, false);
                }
            }
        }
    }

    /// Sums the chunks' dense gradients and scatters their sparse gradients into `grads`.
    fn reduce(&self, batch: &Batch, params: &Params, scratch: &Scratch, grads: &mut Grads) {
        grads.reset_like(params);
        let n = batch.len();
        let k = scratch.chunks.len();
        let dim = self.config.embedding_dim;
        let emb_width = self.emb_width();
        let mut bias_grad = 0.0f64;
        for (c, chunk) in scratch.chunks.iter().enumerate() {
            bias_grad += chunk.dlogits.iter().map(|&g| g as f64).sum::<f64>();
            for l in 0..self.layers.len() {
                add_into(&mut grads.dense[1 + 2 * l], &chunk.dw[l]);
                add_into(&mut grads.dense[2 + 2 * l], &chunk.db[l]);
            }
            let range = chunk_range(n, k, c);
            let entry0 = batch.sparse_offsets[range.start];
            let emb_rows = if scratch.shared_rows { &chunk.wide_rows } else { &chunk.emb_rows };
            let (wide_grads, emb_grads) = grads.sparse.split_at_mut(1);
            let wide_grads = &mut wide_grads[0].values;
            for (li, i) in range.enumerate() {
                let g = chunk.dlogits[li];
                let dx = &chunk.dx[li * emb_width..(li + 1) * emb_width];
                for e in batch.sparse_range(i) {
                    let kk = e - entry0;
                    let v = batch.sparse_values[e];
                    wide_grads[chunk.wide_rows[kk] as usize] += g * v;
                    if let Some(emb_grads) = emb_grads.first_mut() {
                        let f = batch.sparse_fields[e] as usize;
                        let r = emb_rows[kk] as usize;
                        let row = &mut emb_grads.values[r * dim..(r + 1) * dim];
                        for (gw, &d) in row.iter_mut().zip(&dx[f * dim..(f + 1) * dim]) {
                            *gw += v * d;
                        }
                    }
                }
            }
        }
        grads.dense[0][0] = bias_grad as f32;
    }
}

fn add_into(acc: &mut [f32], x: &[f32]) {
    for (a, &b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}

impl Model for WideDeep {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn num_dense(&self) -> usize {
        self.config.num_dense
    }

    fn sparse_ids(&self, batch: &Batch, out: &mut Vec<Vec<u64>>) {
        let tables = self.spec.sparse.len();
        out.resize_with(tables, Vec::new);
        collect_ids(batch, self.config.hash_buckets, &mut out[0]);
        if tables > 1 {
            let (wide, emb) = out.split_at_mut(1);
            emb[0].clone_from(&wide[0]);
        }
    }

    /// The embedding table is pulled for the wide table's ids.
    fn shared_ids(&self) -> Vec<usize> {
        vec![0; self.spec.sparse.len()]
    }

    fn forward_backward(&self, batch: &Batch, params: &Params, grads: &mut Grads) -> Result<f32, ModelError> {
        let mut scratch = self.scratch.take();
        let result = self.run(batch, params, &mut scratch, true).map(|()| {
            self.reduce(batch, params, &scratch, grads);
            let loss: f64 = scratch.chunks.iter().map(|c| c.loss).sum();
            (loss / batch.len().max(1) as f64) as f32
        });
        self.scratch.put(scratch);
        result
    }

    fn predict(&self, batch: &Batch, params: &Params, out: &mut Vec<f32>) -> Result<(), ModelError> {
        let mut scratch = self.scratch.take();
        let result = self.run(batch, params, &mut scratch, false);
        if result.is_ok() {
            out.clear();
            out.extend(scratch.chunks.iter().flat_map(|c| c.logits.iter().map(|&z| sigmoid(z))));
        }
        self.scratch.put(scratch);
        result
    }
}
