//! The initializer a variable is declared with, read from the values a framework (tch, or
//! PyTorch through the Python package) gave it.
//!
//! The parameter servers initialize the model themselves, deterministically (see
//! [`gradflow_core::init`]), so that any number of shards start from the same model and a
//! sparse row can be created on first touch. The exact values tch drew cannot travel in a
//! spec; what can is their distribution. [`infer_initializer`] recognizes the ones tch's
//! layers use: constants (biases of zeros, layer-norm weights of ones), uniform on `[lo, hi)`
//! (`nn::linear` and `nn::conv`, Kaiming-uniform) and normal (`nn::embedding`). After
//! a declare and the first pull every worker trains
//! the servers' values, so all workers start from one model.
//!
//! Set an initializer explicitly (the tch adapter's `.init`, the Python package's `init=`)
//! when the guess is not what you want.

use gradflow_core::Initializer;

/// The initializer whose distribution matches `values`: a constant when they are all equal,
/// else uniform or normal, whichever their kurtosis is closer to.
///
/// Uniform bounds are the unbiased estimates from the sample's minimum and maximum; a normal
/// gets the sample's mean and standard deviation. `seed` seeds the servers' generator.
pub fn infer_initializer(values: &[f32], seed: u64) -> Initializer {
    let Some(&first) = values.first() else { return Initializer::Zeros };
    let (mut lo, mut hi) = (first, first);
    let mut sum = 0f64;
    for &v in values {
        lo = lo.min(v);
        hi = hi.max(v);
        sum += v as f64;
    }
    if lo == hi {
        return if first == 0.0 { Initializer::Zeros } else { Initializer::Constant { value: first } };
    }
    let n = values.len() as f64;
    let mean = sum / n;
    let (mut m2, mut m4) = (0f64, 0f64);
    for &v in values {
        let d = (v as f64 - mean) * (v as f64 - mean);
        m2 += d;
        m4 += d * d;
    }
    let var = m2 / n;
    // Kurtosis: 1.8 for a uniform distribution, 3 for a normal one. Below 8 values it says
    // little; tch's small tensors (biases) are uniform.
    let kurtosis = (m4 / n) / (var * var);
    if values.len() < 8 || kurtosis < 2.4 {
        // The minimum and maximum of n uniform samples fall short of the bounds by about
        // (hi - lo) / (n - 1) each.
        let pad = (hi - lo) as f64 / (n - 1.0).max(1.0);
        Initializer::Uniform { low: (lo as f64 - pad) as f32, high: (hi as f64 + pad) as f32, seed }
    } else {
        let std = (m2 / (n - 1.0)).sqrt();
        Initializer::Normal { mean: mean as f32, std: std as f32, seed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gradflow_core::Initializer as I;

    fn sample(init: &I, n: usize) -> Vec<f32> {
        let mut v = vec![0.0; n];
        init.fill_dense("t", &[n as u64], 0, &mut v);
        v
    }

    #[test]
    fn constants_are_recognized_exactly() {
        assert_eq!(infer_initializer(&[0.0; 5], 1), I::Zeros);
        assert_eq!(infer_initializer(&[1.5; 3], 1), I::Constant { value: 1.5 });
        assert_eq!(infer_initializer(&[], 1), I::Zeros);
    }

    #[test]
    fn uniform_values_give_uniform_bounds_close_to_the_true_ones() {
        let v = sample(&I::Uniform { low: -0.25, high: 0.25, seed: 3 }, 4000);
        match infer_initializer(&v, 9) {
            I::Uniform { low, high, seed } => {
                assert!((low + 0.25).abs() < 0.002 && (high - 0.25).abs() < 0.002, "{low} {high}");
                assert_eq!(seed, 9);
            }
            other => panic!("expected uniform, got {other:?}"),
        }
    }

    #[test]
    fn normal_values_give_their_mean_and_std() {
        let v = sample(&I::Normal { mean: 0.5, std: 2.0, seed: 4 }, 4000);
        match infer_initializer(&v, 0) {
            I::Normal { mean, std, .. } => {
                assert!((mean - 0.5).abs() < 0.1 && (std - 2.0).abs() < 0.1, "{mean} {std}");
            }
            other => panic!("expected normal, got {other:?}"),
        }
    }

    #[test]
    fn a_few_distinct_values_are_taken_as_uniform_around_them() {
        match infer_initializer(&[-0.1, 0.3], 0) {
            I::Uniform { low, high, .. } => assert!(low <= -0.1 && high >= 0.3, "{low} {high}"),
            other => panic!("expected uniform, got {other:?}"),
        }
    }
}
