//! (1b) The compute ceiling: how many samples per second the wide & deep headline model's
//! matrix products alone run at on this machine, the bound its training cannot pass.
//!
//! The MLP is the one [`WideDeep`] builds from the headline config (26 fields of embeddings
//! of 8 plus 13 dense features: 221 inputs, hidden 64 and 32, one output). One *step* is what
//! training a batch of `batch_size` needs of matrix products, exactly the products
//! [`WideDeep`]'s forward and backward compute: each layer's `x · W` forward, `xᵀ · δ` for its
//! weight gradient, and `δ · Wᵀ` for the gradient of its input (for the first layer only the
//! embedding columns, as the model does). Nothing else: no gather of embeddings, no bias,
//! ReLU, loss, reduction or optimizer.
//!
//! Measured with each [`Kernel`] (`matrixmultiply`, what `ndarray` uses, and the `gemm`
//! crate), on one thread and on every rayon thread (the batch split into one chunk per
//! thread, as the model splits it). The fastest kernel at each thread count is the ceiling.
//!
//! Beside it, the model's own `forward_backward` on a synthetic batch of the same shape, with
//! each kernel: the whole model step without data reading or optimizer, so that the distance
//! from the ceiling to training splits into what the model adds around its products and what
//! training adds around the model. The repetitions of every measure are taken in turn, so
//! load from other work on the machine falls on all of them alike.

use std::hint::black_box;
use std::time::Instant;

use gradflow_data::Batch;
use gradflow_models::matmul::{Mat, matmul};
use gradflow_models::{Grads, Kernel, Model, Params, SparseRows, WideDeep, WideDeepConfig};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::stats::{Timing, sig4};
use crate::{BenchError, Log};

/// (1b) The compute ceiling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ComputeConfig {
    /// Examples per step. Default 256 (the training scenario's batch).
    pub batch_size: usize,
    /// Steps per timed repetition. Default 400.
    pub steps: usize,
    /// Timed repetitions of each measure (after one warm-up); the median is reported.
    /// Default 5.
    pub reps: usize,
}

impl Default for ComputeConfig {
    fn default() -> Self {
        ComputeConfig { batch_size: 256, steps: 400, reps: 5 }
    }
}

impl ComputeConfig {
    /// A few steps: for tests and `--quick`.
    pub fn quick() -> Self {
        ComputeConfig { batch_size: 256, steps: 5, reps: 2 }
    }

    pub(crate) fn validate(&self) -> Result<(), BenchError> {
        if self.batch_size == 0 || self.steps == 0 || self.reps == 0 {
            return Err(BenchError::Config("compute: batch_size, steps and reps must be positive".into()));
        }
        Ok(())
    }
}

/// The ceiling and every measure behind it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComputeReport {
    pub batch_size: usize,
    /// `(inputs, outputs)` of each layer of the MLP.
    pub layers: Vec<(usize, usize)>,
    /// Input columns with parameters behind them (the embeddings): the first layer's input
    /// gradient is computed for these only.
    pub embedding_width: usize,
    /// Floating-point operations of one sample's products (2 per multiply-add).
    pub flops_per_sample: f64,
    /// Rayon threads of the all-threads measures.
    pub threads: usize,
    /// One row per kernel.
    pub kernels: Vec<KernelRow>,
    /// The fastest products on one thread, samples/s, and the kernel that gave them.
    pub ceiling_samples_per_sec: f64,
    pub ceiling_kernel: Kernel,
    /// The fastest products on every thread, samples/s, and the kernel that gave them.
    pub ceiling_all_threads_samples_per_sec: f64,
    pub ceiling_all_threads_kernel: Kernel,
}

/// One kernel's figures, samples/s at the median.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelRow {
    pub kernel: Kernel,
    /// The products alone.
    pub products_samples_per_sec: f64,
    pub products: Timing,
    pub products_all_threads_samples_per_sec: f64,
    pub products_all_threads: Timing,
    /// The model's `forward_backward` (no data reading, no optimizer).
    pub model_samples_per_sec: f64,
    pub model: Timing,
    pub model_all_threads_samples_per_sec: f64,
    pub model_all_threads: Timing,
}

impl ComputeReport {
    /// `(samples/s, kernel)` of the ceiling at one thread or every thread.
    pub fn ceiling(&self, all_threads: bool) -> (f64, Kernel) {
        if all_threads {
            (self.ceiling_all_threads_samples_per_sec, self.ceiling_all_threads_kernel)
        } else {
            (self.ceiling_samples_per_sec, self.ceiling_kernel)
        }
    }
}

/// The headline model's config, as the training scenario's job files give it.
pub fn headline_config() -> WideDeepConfig {
    WideDeepConfig::new(26, 13)
}

/// Below this many examples per chunk the model does not split a batch either.
const MIN_CHUNK: usize = 32;

pub fn run(config: &ComputeConfig, log: Log<'_>) -> Result<ComputeReport, BenchError> {
    config.validate()?;
    let model_config = headline_config();
    let model = WideDeep::new(model_config.clone()).map_err(|e| BenchError::Internal(e.to_string()))?;
    let layers = model.layers().to_vec();
    let embedding_width = model_config.num_fields * model_config.embedding_dim;
    let n = config.batch_size;
    let threads = rayon::current_num_threads().max(1);
    let chunks = (n / MIN_CHUNK).clamp(1, threads);

    let weights: Vec<Vec<f32>> =
        layers.iter().map(|&(i, o)| (0..i * o).map(|j| ((j % 13) as f32 - 6.0) * 0.01).collect()).collect();
    let mut one = Products::new(&layers, embedding_width, n);
    let mut all: Vec<Products> = (0..chunks)
        .map(|c| Products::new(&layers, embedding_width, (c + 1) * n / chunks - c * n / chunks))
        .collect();

    let models: Vec<WideDeep> = Kernel::ALL
        .iter()
        .map(|&k| WideDeep::new(model_config.clone()).map(|m| m.with_kernel(k)))
        .collect::<Result<_, _>>()
        .map_err(|e| BenchError::Internal(e.to_string()))?;
    let batch = synthetic_batch(n, &model_config);
    let params = params_for(&models[0], &batch);
    let mut grads = Grads::default();
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(|e| BenchError::Internal(format!("a one-thread pool: {e}")))?;

    // [kernel][measure] seconds per step; measures: products 1, products all, model 1, model all.
    let mut secs = vec![[const { Vec::new() }; 4]; Kernel::ALL.len()];
    let steps = config.steps;
    let time = |f: &mut dyn FnMut()| {
        let started = Instant::now();
        for _ in 0..steps {
            f();
        }
        started.elapsed().as_secs_f64() / steps as f64
    };
    for rep in 0..=config.reps {
        for (ki, &kernel) in Kernel::ALL.iter().enumerate() {
            let model = &models[ki];
            let p1 = time(&mut || one.step(kernel, &weights));
            let pa = time(&mut || all.par_iter_mut().for_each(|p| p.step(kernel, &weights)));
            let mut fb = || model.forward_backward(&batch, &params, &mut grads).map(drop);
            let mut fb_error = Ok(());
            let m1 = one_thread.install(|| time(&mut || fb_error = fb_error.clone().and(fb())));
            let ma = time(&mut || fb_error = fb_error.clone().and(fb()));
            fb_error.map_err(|e| BenchError::Internal(format!("wide & deep forward_backward: {e}")))?;
            let t = [p1, pa, m1, ma];
            if rep > 0 {
                for (s, t) in secs[ki].iter_mut().zip(t) {
                    s.push(t);
                }
            }
        }
    }
    black_box((&one, &all, &grads));

    let rate = |t: &Timing| sig4(t.rate(n as f64));
    let kernels: Vec<KernelRow> = Kernel::ALL
        .iter()
        .zip(&secs)
        .map(|(&kernel, s)| {
            let [p1, pa, m1, ma] = [0, 1, 2, 3].map(|i| Timing::of(&s[i]));
            KernelRow {
                kernel,
                products_samples_per_sec: rate(&p1),
                products: p1,
                products_all_threads_samples_per_sec: rate(&pa),
                products_all_threads: pa,
                model_samples_per_sec: rate(&m1),
                model: m1,
                model_all_threads_samples_per_sec: rate(&ma),
                model_all_threads: ma,
            }
        })
        .collect();
    let best = |f: fn(&KernelRow) -> f64| {
        let row = kernels.iter().max_by(|a, b| f(a).total_cmp(&f(b))).expect("two kernels");
        (f(row), row.kernel)
    };
    let (ceiling_samples_per_sec, ceiling_kernel) = best(|r| r.products_samples_per_sec);
    let (ceiling_all_threads_samples_per_sec, ceiling_all_threads_kernel) =
        best(|r| r.products_all_threads_samples_per_sec);
    let report = ComputeReport {
        batch_size: n,
        flops_per_sample: flops_per_sample(&layers, embedding_width),
        layers,
        embedding_width,
        threads,
        kernels,
        ceiling_samples_per_sec,
        ceiling_kernel,
        ceiling_all_threads_samples_per_sec,
        ceiling_all_threads_kernel,
    };
    for r in &report.kernels {
        log(&format!(
            "compute: {}: products {:.0} samples/s on 1 thread, {:.0} on {threads}; model forward_backward {:.0} and {:.0}",
            r.kernel.name(),
            r.products_samples_per_sec,
            r.products_all_threads_samples_per_sec,
            r.model_samples_per_sec,
            r.model_all_threads_samples_per_sec
        ));
    }
    Ok(report)
}

/// Multiply-adds of one sample's products, times 2.
pub fn flops_per_sample(layers: &[(usize, usize)], embedding_width: usize) -> f64 {
    let mut madds = 0;
    for (l, &(i, o)) in layers.iter().enumerate() {
        let input_grad = if l == 0 { embedding_width } else { i };
        madds += i * o + i * o + input_grad * o;
    }
    2.0 * madds as f64
}

/// The buffers of one chunk of `m` examples: the products of a step, nothing else.
struct Products {
    layers: Vec<(usize, usize)>,
    embedding_width: usize,
    m: usize,
    /// `acts[0]` the input (m x in), `acts[l + 1]` layer `l`'s output.
    acts: Vec<Vec<f32>>,
    deltas: Vec<Vec<f32>>,
    dw: Vec<Vec<f32>>,
    dx: Vec<f32>,
}

impl Products {
    fn new(layers: &[(usize, usize)], embedding_width: usize, m: usize) -> Self {
        let mut acts = vec![(0..m * layers[0].0).map(|j| ((j % 7) as f32 - 3.0) * 0.1).collect::<Vec<_>>()];
        acts.extend(layers.iter().map(|&(_, o)| vec![0.0; m * o]));
        Products {
            layers: layers.to_vec(),
            embedding_width,
            m,
            acts,
            deltas: layers.iter().map(|&(_, o)| vec![0.01; m * o]).collect(),
            dw: layers.iter().map(|&(i, o)| vec![0.0; i * o]).collect(),
            dx: vec![0.0; m * embedding_width],
        }
    }

    fn step(&mut self, kernel: Kernel, weights: &[Vec<f32>]) {
        let m = self.m;
        for (l, &(i, o)) in self.layers.iter().enumerate() {
            let (before, after) = self.acts.split_at_mut(l + 1);
            matmul(kernel, Mat::new(&before[l], m, i), Mat::new(&weights[l], i, o), &mut after[0], true);
        }
        for (l, &(i, o)) in self.layers.iter().enumerate().rev() {
            let (lower, upper) = self.deltas.split_at_mut(l);
            let delta = Mat::new(&upper[0], m, o);
            matmul(kernel, Mat::new(&self.acts[l], m, i).t(), delta, &mut self.dw[l], false);
            if l > 0 {
                matmul(kernel, delta, Mat::new(&weights[l], i, o).t(), &mut lower[l - 1], false);
            } else if self.embedding_width > 0 {
                let w = Mat::new(&weights[0][..self.embedding_width * o], self.embedding_width, o);
                matmul(kernel, delta, w.t(), &mut self.dx, false);
            }
        }
    }
}

/// `n` examples of the headline shape: one id per field (uniform over the buckets), normal-ish
/// dense features, labels alternating.
fn synthetic_batch(n: usize, config: &WideDeepConfig) -> Batch {
    let mut batch = Batch::new(config.num_dense);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut dense = vec![0.0f32; config.num_dense];
    for i in 0..n {
        for d in &mut dense {
            *d = (next() % 2000) as f32 / 1000.0 - 1.0;
        }
        let entries: Vec<(u32, u64, f32)> =
            (0..config.num_fields as u32).map(|f| (f, next() % config.hash_buckets.max(1), 1.0)).collect();
        batch.push((i % 2) as f32, &dense, entries);
    }
    batch
}

/// Small parameters for the rows `model` asks for.
fn params_for(model: &WideDeep, batch: &Batch) -> Params {
    let mut ids = Vec::new();
    model.sparse_ids(batch, &mut ids);
    let value = |j: u64| ((j % 11) as f32 - 5.0) * 0.01;
    let dense = model.spec().dense.iter().map(|d| (0..d.numel()).map(value).collect()).collect();
    let sparse = model
        .spec()
        .sparse
        .iter()
        .zip(ids)
        .map(|(s, ids)| {
            let dim = s.dim as usize;
            SparseRows { values: (0..(ids.len() * dim) as u64).map(value).collect(), ids, dim }
        })
        .collect();
    Params { dense, sparse }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_of_the_headline_mlp() {
        // Forward and weight gradients 2 x (221·64 + 64·32 + 32·1) multiply-adds, input
        // gradients 208·64 + 64·32 + 32·1.
        let layers = [(221, 64), (64, 32), (32, 1)];
        assert_eq!(flops_per_sample(&layers, 208), 2.0 * (2.0 * 16224.0 + 15392.0));
    }

    #[test]
    fn quick_run_reports_both_kernels_and_the_fastest() {
        let r = run(&ComputeConfig::quick(), &|_| {}).unwrap();
        assert_eq!(r.layers, [(221, 64), (64, 32), (32, 1)]);
        assert_eq!(r.embedding_width, 208);
        assert_eq!(r.kernels.len(), 2);
        for k in &r.kernels {
            assert!(k.products_samples_per_sec > 0.0 && k.model_all_threads_samples_per_sec > 0.0);
            assert_eq!(k.products.reps, 2);
        }
        let best = r.kernels.iter().map(|k| k.products_samples_per_sec).fold(0.0, f64::max);
        assert_eq!(r.ceiling(false).0, best);
        assert!(r.kernels.iter().any(|k| k.kernel == r.ceiling_kernel && k.products_samples_per_sec == best));
    }
}
