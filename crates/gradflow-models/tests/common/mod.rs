//! Helpers shared by the integration tests: a seeded RNG, random batches and parameters, a
//! finite-difference gradient checker and an AUC.

#![allow(dead_code)]

use gradflow_data::Batch;
use gradflow_models::{Grads, Model, Params, SparseRows};

/// splitmix64: tiny, seeded, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    }
}

/// A random batch: each example has 0..=max_per_field ids in each of `num_fields` fields, ids
/// drawn from `0..id_range` (so small ranges give duplicates within and across fields), values
/// in [0.5, 1.5), and normal dense features.
pub fn random_batch(
    rng: &mut Rng,
    n: usize,
    num_fields: u32,
    num_dense: usize,
    max_per_field: u64,
    id_range: u64,
) -> Batch {
    let mut batch = Batch::new(num_dense);
    for _ in 0..n {
        let label = (rng.uniform() < 0.5) as u32 as f32;
        let dense: Vec<f32> = (0..num_dense).map(|_| rng.normal()).collect();
        let mut sparse = Vec::new();
        for f in 0..num_fields {
            for _ in 0..rng.below(max_per_field + 1) {
                sparse.push((f, rng.below(id_range), 0.5 + rng.uniform()));
            }
        }
        batch.push(label, &dense, sparse);
    }
    batch
}

/// Random parameters (normal, times `scale`) for the rows `model.sparse_ids` asks for.
pub fn random_params(model: &dyn Model, batch: &Batch, rng: &mut Rng, scale: f32) -> Params {
    let mut ids = Vec::new();
    model.sparse_ids(batch, &mut ids);
    let spec = model.spec();
    let dense = spec.dense.iter().map(|d| (0..d.numel()).map(|_| scale * rng.normal()).collect()).collect();
    let sparse = spec
        .sparse
        .iter()
        .zip(ids)
        .map(|(s, ids)| {
            let dim = s.dim as usize;
            let values = (0..ids.len() * dim).map(|_| scale * rng.normal()).collect();
            SparseRows { ids, dim, values }
        })
        .collect();
    Params { dense, sparse }
}

/// Checks every gradient element against a central difference of the loss with step `eps`.
/// Passes when `|analytic - numeric| <= rel * max(|analytic|, |numeric|) + abs`. Returns the
/// number of elements checked.
pub fn check_gradients(
    model: &dyn Model,
    batch: &Batch,
    params: &Params,
    eps: f32,
    rel: f32,
    abs: f32,
) -> usize {
    let mut grads = Grads::default();
    model.forward_backward(batch, params, &mut grads).unwrap();
    let mut scratch = Grads::default();
    let mut p = params.clone();
    let mut checked = 0;
    let mut failures = Vec::new();
    let mut worst = 0.0f64;
    let mut check = |label: String, analytic: f32, p: &mut Params, get: &dyn Fn(&mut Params) -> &mut f32| {
        let x = *get(p);
        *get(p) = x + eps;
        let up = model.forward_backward(batch, p, &mut scratch).unwrap();
        *get(p) = x - eps;
        let down = model.forward_backward(batch, p, &mut scratch).unwrap();
        *get(p) = x;
        let numeric = (up as f64 - down as f64) / (2.0 * eps as f64);
        let diff = (analytic as f64 - numeric).abs();
        let allowed = rel as f64 * (analytic.abs() as f64).max(numeric.abs()) + abs as f64;
        worst = worst.max(diff / allowed);
        if diff > allowed {
            failures.push(format!("{label}: analytic {analytic}, numeric {numeric}"));
        }
        checked += 1;
    };
    for (t, g) in grads.dense.iter().enumerate() {
        for (j, &a) in g.iter().enumerate() {
            let name = &model.spec().dense[t].name;
            check(format!("dense `{name}`[{j}]"), a, &mut p, &|p: &mut Params| &mut p.dense[t][j]);
        }
    }
    for (t, g) in grads.sparse.iter().enumerate() {
        assert_eq!(g.ids, params.sparse[t].ids, "sparse grads are aligned with the pulled ids");
        for (j, &a) in g.values.iter().enumerate() {
            let name = &model.spec().sparse[t].name;
            let id = g.ids[j / g.dim];
            check(format!("sparse `{name}` id {id} col {}", j % g.dim), a, &mut p, &|p: &mut Params| {
                &mut p.sparse[t].values[j]
            });
        }
    }
    assert!(failures.is_empty(), "{} of {checked} gradients off:\n{}", failures.len(), failures.join("\n"));
    eprintln!("{checked} gradients checked, worst error {worst:.3} of the tolerance");
    checked
}
