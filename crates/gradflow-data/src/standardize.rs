//! Standardizing dense features to zero mean and unit variance.
//!
//! Gradient descent on unscaled features (the breast cancer data mixes areas near 1000 with
//! smoothness near 0.1) needs a learning rate small enough for the largest feature, which
//! stalls the smallest. A [`Standardizer`] is fitted on a pass over the training batches and
//! then applied in place to every batch, training and evaluation alike.

use serde::{Deserialize, Serialize};

use crate::batch::Batch;

/// Running mean and variance of each dense feature (Welford's algorithm, in `f64` so a long
/// stream does not drift), and the map `x -> (x - mean) / std`.
///
/// Serializable so it can be saved with a model: evaluation must use the training statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standardizer {
    count: u64,
    mean: Vec<f64>,
    /// Sum of squared deviations from the mean.
    m2: Vec<f64>,
}

impl Standardizer {
    /// Nothing observed yet; `apply` is then the identity.
    pub fn new(num_dense: usize) -> Standardizer {
        Standardizer { count: 0, mean: vec![0.0; num_dense], m2: vec![0.0; num_dense] }
    }

    /// Fits on every batch of `batches`.
    ///
    /// # Panics
    /// If the batches do not all have `num_dense` dense features.
    pub fn fit<'a>(num_dense: usize, batches: impl IntoIterator<Item = &'a Batch>) -> Standardizer {
        let mut s = Standardizer::new(num_dense);
        for b in batches {
            s.observe(b);
        }
        s
    }

    /// Adds the dense features of `batch` to the statistics.
    ///
    /// # Panics
    /// If `batch.num_dense` differs from this standardizer's.
    pub fn observe(&mut self, batch: &Batch) {
        assert_eq!(batch.num_dense, self.mean.len(), "standardizer: dense feature count");
        for i in 0..batch.len() {
            self.count += 1;
            let n = self.count as f64;
            for (j, &x) in batch.dense_row(i).iter().enumerate() {
                let x = x as f64;
                let delta = x - self.mean[j];
                self.mean[j] += delta / n;
                self.m2[j] += delta * (x - self.mean[j]);
            }
        }
    }

    /// Combines statistics gathered elsewhere (another worker's shard) into these
    /// (Chan et al.'s parallel update), as if all examples had been observed here.
    ///
    /// # Panics
    /// If the two differ in dense feature count.
    pub fn merge(&mut self, other: &Standardizer) {
        assert_eq!(self.mean.len(), other.mean.len(), "standardizer: dense feature count");
        if other.count == 0 {
            return;
        }
        let (na, nb) = (self.count as f64, other.count as f64);
        let n = na + nb;
        for j in 0..self.mean.len() {
            let delta = other.mean[j] - self.mean[j];
            self.mean[j] += delta * nb / n;
            self.m2[j] += other.m2[j] + delta * delta * na * nb / n;
        }
        self.count += other.count;
    }

    /// Number of examples observed.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Number of dense features.
    pub fn num_dense(&self) -> usize {
        self.mean.len()
    }

    /// Mean of each feature.
    pub fn mean(&self) -> &[f64] {
        &self.mean
    }

    /// Standard deviation (population) of each feature used for scaling: 1 where the feature
    /// is constant or unseen, so such a feature maps to 0 rather than to NaN.
    pub fn std(&self) -> Vec<f64> {
        (0..self.mean.len()).map(|j| self.std_of(j)).collect()
    }

    fn std_of(&self, j: usize) -> f64 {
        if self.count == 0 {
            return 1.0;
        }
        let s = (self.m2[j] / self.count as f64).sqrt();
        if s > 1e-12 && s.is_finite() { s } else { 1.0 }
    }

    /// Standardizes the dense features of `batch` in place.
    ///
    /// # Panics
    /// If `batch.num_dense` differs from this standardizer's.
    pub fn apply(&self, batch: &mut Batch) {
        let d = self.mean.len();
        assert_eq!(batch.num_dense, d, "standardizer: dense feature count");
        if d == 0 || self.count == 0 {
            return;
        }
        scale(&mut batch.dense, &self.mean, &self.std());
    }
}

/// Scales rows of dense features in place: feature `j` of every row (`dense` is row-major,
/// `mean.len()` features per row) becomes `(x - mean[j]) * (1 / std[j])`, computed in `f64`
/// and rounded to `f32`. What [`Standardizer::apply`] does, and what a predictor does with the
/// statistics a checkpoint carries.
///
/// # Panics
/// If `std` and `mean` differ in length, or `dense` is not a whole number of rows.
pub fn scale(dense: &mut [f32], mean: &[f64], std: &[f64]) {
    let d = mean.len();
    assert_eq!(std.len(), d, "standardize: as many stds as means");
    if d == 0 {
        return;
    }
    assert_eq!(dense.len() % d, 0, "standardize: whole rows");
    // Precomputed per call: a division per value would cost more than the batch copy.
    let inv: Vec<f64> = std.iter().map(|s| 1.0 / s).collect();
    for row in dense.chunks_exact_mut(d) {
        for ((x, &m), &s) in row.iter_mut().zip(mean).zip(&inv) {
            *x = ((*x as f64 - m) * s) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(rows: &[[f32; 2]]) -> Batch {
        let mut b = Batch::new(2);
        for r in rows {
            b.push(0.0, r, []);
        }
        b
    }

    #[test]
    fn fit_apply_merge() {
        let a = batch(&[[1.0, 5.0], [3.0, 5.0]]);
        let b = batch(&[[5.0, 5.0], [7.0, 5.0]]);
        let s = Standardizer::fit(2, [&a, &b]);
        assert_eq!(s.count(), 4);
        assert_eq!(s.mean(), &[4.0, 5.0]);
        assert!((s.std()[0] - 5f64.sqrt()).abs() < 1e-12);
        assert_eq!(s.std()[1], 1.0);
        let mut sa = Standardizer::fit(2, [&a]);
        sa.merge(&Standardizer::fit(2, [&b]));
        assert!((sa.mean()[0] - 4.0).abs() < 1e-12);
        assert!((sa.std()[0] - s.std()[0]).abs() < 1e-12);
        let mut c = a.clone();
        s.apply(&mut c);
        assert!((c.dense[0] - (-3.0 / 5f32.sqrt())).abs() < 1e-6);
        assert_eq!(c.dense[1], 0.0);
    }
}
