//! Deterministic initializers for dense tensors and sparse embedding rows.
//!
//! A value depends only on the seed, the tensor or table name, and its position (the flat
//! element index of a dense tensor, or the `(id, column)` of a sparse row). There is no random
//! generator state to carry around: each value is a hash of those inputs (a counter-based
//! generator built on splitmix64). So any shard can initialize any slice of a tensor, or any
//! row of a table the first time it is touched, on its own, and the model starts out the same
//! however it is partitioned and however many shards hold it.
//!
//! The values are not those PyTorch would draw for the same seed; only the distributions match.

use serde::{Deserialize, Serialize};

use crate::CoreError;

/// How the values of a dense tensor or of a new sparse row start out.
///
/// In JSON or TOML the variant is chosen by `kind` (`"zeros"`, `"constant"`, `"uniform"`,
/// `"normal"`, `"xavier_uniform"`, `"xavier_normal"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Initializer {
    /// All zeros.
    Zeros,
    /// Every element is `value`.
    Constant {
        /// The value of every element.
        value: f32,
    },
    /// Uniform on `[low, high)`.
    Uniform {
        /// Inclusive lower bound.
        low: f32,
        /// Exclusive upper bound; must be greater than `low`.
        high: f32,
        /// Seed of the generator. Default 0.
        #[serde(default)]
        seed: u64,
    },
    /// Normal with mean `mean` and standard deviation `std`.
    Normal {
        /// Mean.
        mean: f32,
        /// Standard deviation, >= 0.
        std: f32,
        /// Seed of the generator. Default 0.
        #[serde(default)]
        seed: u64,
    },
    /// Glorot/Xavier uniform, as `torch.nn.init.xavier_uniform_`: uniform on `[-a, a)` with
    /// `a = gain * sqrt(6 / (fan_in + fan_out))`. See [`fans`] for the fans of each shape.
    XavierUniform {
        /// Scale factor. Default 1.
        #[serde(default = "one")]
        gain: f32,
        /// Seed of the generator. Default 0.
        #[serde(default)]
        seed: u64,
    },
    /// Glorot/Xavier normal, as `torch.nn.init.xavier_normal_`: normal with mean 0 and
    /// `std = gain * sqrt(2 / (fan_in + fan_out))`. See [`fans`] for the fans of each shape.
    XavierNormal {
        /// Scale factor. Default 1.
        #[serde(default = "one")]
        gain: f32,
        /// Seed of the generator. Default 0.
        #[serde(default)]
        seed: u64,
    },
}

fn one() -> f32 {
    1.0
}

/// `(fan_in, fan_out)` of a tensor of shape `shape`, as PyTorch computes them:
/// `fan_in = shape[1] * receptive`, `fan_out = shape[0] * receptive` with `receptive` the
/// product of `shape[2..]`.
///
/// PyTorch refuses shapes of fewer than two dimensions; here a 1-D tensor has
/// `fan_in = fan_out = shape[0]` and a scalar has both 1. A sparse row of `dim` floats is
/// treated as a tensor of shape `[1, dim]`: `fan_in = dim`, `fan_out = 1`, which does not
/// depend on the (unbounded) number of rows.
pub fn fans(shape: &[u64]) -> (u64, u64) {
    match shape {
        [] => (1, 1),
        [n] => (*n, *n),
        [out, inp, rest @ ..] => {
            let receptive: u64 = rest.iter().product();
            (inp * receptive, out * receptive)
        }
    }
}

/// The splitmix64 finalizer: a bijective 64-bit mix whose every output bit depends on every
/// input bit.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// splitmix64's increment (2^64 / golden ratio).
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// Keeps the dense and sparse streams of the same name and seed unrelated.
const DENSE_DOMAIN: u64 = 0x6465_6e73_6500_0000;
const SPARSE_DOMAIN: u64 = 0x7370_6172_7365_0000;

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The key of the stream of `name` under `seed`. The seed is mixed before it meets the name
/// hash so that nearby seeds and similar names do not cancel out.
fn stream_key(seed: u64, name: &str, domain: u64) -> u64 {
    mix64(mix64(seed ^ domain).wrapping_add(fnv1a64(name.as_bytes())))
}

/// 64 random bits at counter `i` of the stream `key`: the `i`-th output of splitmix64 seeded
/// with `key`, computed without stepping through the first `i - 1`.
#[inline]
fn bits(key: u64, i: u64) -> u64 {
    mix64(key.wrapping_add(i.wrapping_add(1).wrapping_mul(GOLDEN)))
}

/// Uniform on `[0, 1)` with 53 random bits.
#[inline]
fn unit_open_high(b: u64) -> f64 {
    (b >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Uniform on `(0, 1]`, safe to take the logarithm of.
#[inline]
fn unit_open_low(b: u64) -> f64 {
    ((b >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A sample of the distribution an initializer draws from, ready to be evaluated at any
/// counter of a stream.
#[derive(Clone, Copy)]
enum Dist {
    Constant(f32),
    Uniform { low: f64, high: f64 },
    Normal { mean: f64, std: f64 },
}

impl Dist {
    /// The value at position `i` of stream `key`. Each position uses counters `2i` and
    /// `2i + 1`, so that Box–Muller gets two independent uniforms without any state.
    #[inline]
    fn sample(self, key: u64, i: u64) -> f32 {
        match self {
            Dist::Constant(v) => v,
            Dist::Uniform { low, high } => {
                let u = unit_open_high(bits(key, i.wrapping_mul(2)));
                let v = (low + (high - low) * u) as f32;
                // Rounding to f32 can land on `high` itself; keep the interval half-open.
                if v >= high as f32 { (high as f32).next_down().max(low as f32) } else { v }
            }
            Dist::Normal { mean, std } => {
                let u1 = unit_open_low(bits(key, i.wrapping_mul(2)));
                let u2 = unit_open_high(bits(key, i.wrapping_mul(2).wrapping_add(1)));
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                (mean + std * z) as f32
            }
        }
    }
}

impl Initializer {
    /// Checks that every value is finite, `low < high` and `std >= 0`, `gain >= 0`; `name`
    /// names the tensor or table in the error.
    pub fn validate(&self, name: &str) -> Result<(), CoreError> {
        let bad = |what: String| Err(CoreError::InvalidSpec(format!("initializer of `{name}`: {what}")));
        let finite = |field: &str, v: f32| {
            if v.is_finite() { Ok(()) } else { bad(format!("`{field}` is {v}, expected a finite number")) }
        };
        match *self {
            Initializer::Zeros => {}
            Initializer::Constant { value } => finite("value", value)?,
            Initializer::Uniform { low, high, .. } => {
                finite("low", low)?;
                finite("high", high)?;
                if low >= high {
                    return bad(format!("uniform `low` {low} is not below `high` {high}"));
                }
            }
            Initializer::Normal { mean, std, .. } => {
                finite("mean", mean)?;
                finite("std", std)?;
                if std < 0.0 {
                    return bad(format!("normal `std` is {std}, expected >= 0"));
                }
            }
            Initializer::XavierUniform { gain, .. } | Initializer::XavierNormal { gain, .. } => {
                finite("gain", gain)?;
                if gain < 0.0 {
                    return bad(format!("xavier `gain` is {gain}, expected >= 0"));
                }
            }
        }
        Ok(())
    }

    /// The distribution and seed for a tensor of shape `shape`.
    fn dist(&self, shape: &[u64]) -> (Dist, u64) {
        let xavier = |gain: f32| {
            let (fan_in, fan_out) = fans(shape);
            f64::from(gain) / ((fan_in + fan_out) as f64).sqrt()
        };
        match *self {
            Initializer::Zeros => (Dist::Constant(0.0), 0),
            Initializer::Constant { value } => (Dist::Constant(value), 0),
            Initializer::Uniform { low, high, seed } => {
                (Dist::Uniform { low: low.into(), high: high.into() }, seed)
            }
            Initializer::Normal { mean, std, seed } => {
                (Dist::Normal { mean: mean.into(), std: std.into() }, seed)
            }
            Initializer::XavierUniform { gain, seed } => {
                let a = xavier(gain) * 6f64.sqrt();
                (Dist::Uniform { low: -a, high: a }, seed)
            }
            Initializer::XavierNormal { gain, seed } => {
                (Dist::Normal { mean: 0.0, std: xavier(gain) * 2f64.sqrt() }, seed)
            }
        }
    }

    /// Fills `out` with elements `[offset, offset + out.len())` of the flattened tensor `name`
    /// of shape `shape`. Values depend only on (seed, name, element index), so filling a tensor
    /// in one call or piece by piece gives the same values.
    ///
    /// # Panics
    /// If the range goes past the end of the tensor (a caller bug).
    pub fn fill_dense(&self, name: &str, shape: &[u64], offset: u64, out: &mut [f32]) {
        let numel: u64 = shape.iter().product();
        assert!(
            offset.checked_add(out.len() as u64).is_some_and(|end| end <= numel),
            "fill_dense of `{name}`: elements {offset}..{} are outside shape {shape:?} ({numel} \
             elements)",
            offset.saturating_add(out.len() as u64)
        );
        let (dist, seed) = self.dist(shape);
        if let Dist::Constant(v) = dist {
            out.fill(v);
            return;
        }
        let key = stream_key(seed, name, DENSE_DOMAIN);
        for (i, x) in (offset..).zip(out.iter_mut()) {
            *x = dist.sample(key, i);
        }
    }

    /// Fills a new row of sparse table `name` for `id` (`out.len()` is the row dim).
    /// Values depend only on (seed, name, id, column).
    ///
    /// Xavier initializers treat the row as a tensor of shape `[1, dim]` (see [`fans`]).
    pub fn fill_row(&self, name: &str, id: u64, out: &mut [f32]) {
        let (dist, seed) = self.dist(&[1, out.len() as u64]);
        if let Dist::Constant(v) = dist {
            out.fill(v);
            return;
        }
        // Each row gets its own stream; ids are often sequential, hence the extra mix.
        let row_key = mix64(stream_key(seed, name, SPARSE_DOMAIN) ^ mix64(id.wrapping_add(GOLDEN)));
        for (c, x) in (0u64..).zip(out.iter_mut()) {
            *x = dist.sample(row_key, c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_random() -> Vec<Initializer> {
        vec![
            Initializer::Uniform { low: -0.5, high: 2.0, seed: 3 },
            Initializer::Normal { mean: 1.0, std: 0.5, seed: 3 },
            Initializer::XavierUniform { gain: 1.0, seed: 3 },
            Initializer::XavierNormal { gain: 2.0, seed: 3 },
        ]
    }

    fn dense(init: &Initializer, name: &str, shape: &[u64]) -> Vec<f32> {
        let mut out = vec![f32::NAN; shape.iter().product::<u64>() as usize];
        init.fill_dense(name, shape, 0, &mut out);
        out
    }

    #[test]
    fn pieces_equal_one_call() {
        let shape = [37, 11, 3];
        for init in
            all_random().into_iter().chain([Initializer::Zeros, Initializer::Constant { value: 0.25 }])
        {
            let whole = dense(&init, "w", &shape);
            for cuts in [vec![0, 1220, 1221], vec![0, 1, 2, 500, 501, 1000, 1221], vec![0, 7, 13, 999, 1221]]
            {
                let mut pieced = vec![f32::NAN; whole.len()];
                for w in cuts.windows(2) {
                    init.fill_dense("w", &shape, w[0], &mut pieced[w[0] as usize..w[1] as usize]);
                }
                assert_eq!(
                    whole.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    pieced.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    "{init:?} {cuts:?}"
                );
            }
        }
    }

    #[test]
    fn deterministic() {
        for init in all_random() {
            assert_eq!(dense(&init, "w", &[20, 30]), dense(&init, "w", &[20, 30]));
            let (mut a, mut b) = (vec![0.0; 16], vec![0.0; 16]);
            init.fill_row("emb", 12345, &mut a);
            init.clone().fill_row("emb", 12345, &mut b);
            assert_eq!(a, b);
        }
    }

    #[test]
    fn values_differ_across_names_seeds_ids_and_columns() {
        for init in all_random() {
            let base = dense(&init, "w", &[20, 30]);
            assert!(base.windows(2).all(|w| w[0] != w[1]), "{init:?}: neighbours repeat");
            assert_ne!(base, dense(&init, "v", &[20, 30]), "{init:?}");
            assert_ne!(base, dense(&init, "w2", &[20, 30]), "{init:?}");
            let reseeded = match init.clone() {
                Initializer::Uniform { low, high, .. } => Initializer::Uniform { low, high, seed: 4 },
                Initializer::Normal { mean, std, .. } => Initializer::Normal { mean, std, seed: 4 },
                Initializer::XavierUniform { gain, .. } => Initializer::XavierUniform { gain, seed: 4 },
                Initializer::XavierNormal { gain, .. } => Initializer::XavierNormal { gain, seed: 4 },
                _ => unreachable!(),
            };
            let other = dense(&reseeded, "w", &[20, 30]);
            let same = base.iter().zip(&other).filter(|(a, b)| a == b).count();
            assert!(same <= 1, "{init:?}: {same} equal values across seeds");

            let mut rows = vec![vec![0.0f32; 8]; 4];
            for (id, row) in rows.iter_mut().enumerate() {
                init.fill_row("emb", id as u64, row);
            }
            for i in 0..4 {
                for j in i + 1..4 {
                    assert_ne!(rows[i], rows[j], "{init:?}: rows {i} and {j}");
                }
                assert!(rows[i].windows(2).all(|w| w[0] != w[1]), "{init:?}: columns repeat");
            }
            let mut other_table = vec![0.0f32; 8];
            init.fill_row("emb2", 0, &mut other_table);
            assert_ne!(rows[0], other_table);
        }
    }

    fn mean_std(xs: &[f32]) -> (f64, f64) {
        let n = xs.len() as f64;
        let mean = xs.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = xs.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    }

    #[test]
    fn normal_has_the_right_moments() {
        let xs = dense(&Initializer::Normal { mean: 1.5, std: 0.2, seed: 9 }, "w", &[200_000]);
        let (m, s) = mean_std(&xs);
        // Standard error of the mean is 0.2 / sqrt(2e5) ~ 4.5e-4.
        assert!((m - 1.5).abs() < 3e-3, "mean {m}");
        assert!((s - 0.2).abs() < 3e-3, "std {s}");
        let within_one = xs.iter().filter(|&&x| (f64::from(x) - 1.5).abs() < 0.2).count();
        let frac = within_one as f64 / xs.len() as f64;
        assert!((frac - 0.6827).abs() < 0.01, "fraction within one std {frac}");

        // Rows drawn from many ids have the same distribution.
        let init = Initializer::Normal { mean: 0.0, std: 1.0, seed: 1 };
        let mut xs = vec![0.0f32; 16 * 10_000];
        for (id, row) in xs.chunks_mut(16).enumerate() {
            init.fill_row("emb", id as u64, row);
        }
        let (m, s) = mean_std(&xs);
        assert!(m.abs() < 0.01 && (s - 1.0).abs() < 0.01, "rows: mean {m} std {s}");
    }

    #[test]
    fn uniform_has_the_right_range_and_moments() {
        let xs = dense(&Initializer::Uniform { low: -2.0, high: 3.0, seed: 5 }, "w", &[200_000]);
        assert!(xs.iter().all(|&x| (-2.0..3.0).contains(&x)));
        let (m, s) = mean_std(&xs);
        assert!((m - 0.5).abs() < 0.02, "mean {m}");
        assert!((s - 5.0 / 12f64.sqrt()).abs() < 0.02, "std {s}");
        let (lo, hi) = xs.iter().fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        assert!(lo < -1.99 && hi > 2.99, "range {lo}..{hi}");
        // A range far narrower than an f32 ulp around `low` still never yields `high`.
        let tight = dense(&Initializer::Uniform { low: 1.0, high: 1.0000001, seed: 0 }, "t", &[1000]);
        assert!(tight.iter().all(|&x| (1.0..1.0000001).contains(&x)));
    }

    #[test]
    fn xavier_scales_with_fans() {
        assert_eq!(fans(&[]), (1, 1));
        assert_eq!(fans(&[7]), (7, 7));
        assert_eq!(fans(&[64, 32]), (32, 64));
        assert_eq!(fans(&[16, 8, 3, 3]), (72, 144));

        let shape = [300, 500];
        let a = (6.0f64 / 800.0).sqrt() as f32;
        let xs = dense(&Initializer::XavierUniform { gain: 1.0, seed: 0 }, "w", &shape);
        assert!(xs.iter().all(|&x| (-a..a).contains(&x)));
        assert!(xs.iter().any(|&x| x > 0.99 * a) && xs.iter().any(|&x| x < -0.99 * a));

        let xs = dense(&Initializer::XavierNormal { gain: 2.0, seed: 0 }, "w", &shape);
        let (m, s) = mean_std(&xs);
        let want = 2.0 * (2.0f64 / 800.0).sqrt();
        assert!(m.abs() < 2e-3 && (s - want).abs() / want < 0.01, "mean {m} std {s} want {want}");

        // A row of dim 15 is a [1, 15] tensor: fan_in 15, fan_out 1.
        let a = (6.0f64 / 16.0).sqrt() as f32;
        let mut row = vec![0.0; 15];
        for id in 0..100 {
            Initializer::XavierUniform { gain: 1.0, seed: 0 }.fill_row("emb", id, &mut row);
            assert!(row.iter().all(|&x| (-a..a).contains(&x)));
        }
    }

    #[test]
    fn constant_and_zeros() {
        assert_eq!(dense(&Initializer::Zeros, "w", &[3, 2]), [0.0; 6]);
        assert_eq!(dense(&Initializer::Constant { value: -1.5 }, "w", &[]), [-1.5]);
        let mut row = [9.0; 4];
        Initializer::Zeros.fill_row("emb", 1, &mut row);
        assert_eq!(row, [0.0; 4]);
    }

    #[test]
    fn validate_refuses_bad_values() {
        for init in all_random().into_iter().chain([Initializer::Zeros, Initializer::Constant { value: 2.0 }])
        {
            init.validate("w").unwrap();
        }
        Initializer::Normal { mean: 0.0, std: 0.0, seed: 0 }.validate("w").unwrap();
        for (init, needle) in [
            (Initializer::Constant { value: f32::NAN }, "`value` is NaN"),
            (Initializer::Uniform { low: 1.0, high: 1.0, seed: 0 }, "`low` 1 is not below `high` 1"),
            (Initializer::Uniform { low: 0.0, high: f32::INFINITY, seed: 0 }, "`high` is inf"),
            (Initializer::Normal { mean: 0.0, std: -1.0, seed: 0 }, "`std` is -1"),
            (Initializer::Normal { mean: f32::NEG_INFINITY, std: 1.0, seed: 0 }, "`mean` is -inf"),
            (Initializer::XavierUniform { gain: -1.0, seed: 0 }, "`gain` is -1"),
            (Initializer::XavierNormal { gain: f32::NAN, seed: 0 }, "`gain` is NaN"),
        ] {
            match init.validate("layer/w") {
                Err(CoreError::InvalidSpec(m)) => {
                    assert!(m.contains("`layer/w`") && m.contains(needle), "{m}")
                }
                other => panic!("{init:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn serde_defaults() {
        let init: Initializer = serde_json::from_str(r#"{"kind": "xavier_uniform"}"#).unwrap();
        assert_eq!(init, Initializer::XavierUniform { gain: 1.0, seed: 0 });
        let init: Initializer =
            serde_json::from_str(r#"{"kind": "normal", "mean": 0, "std": 0.01, "seed": 7}"#).unwrap();
        assert_eq!(init, Initializer::Normal { mean: 0.0, std: 0.01, seed: 7 });
        let typo = r#"{"kind": "uniform", "low": 0, "hihg": 1}"#;
        assert!(serde_json::from_str::<Initializer>(typo).is_err());
        let extra = r#"{"kind": "constant", "value": 1, "seed": 3}"#;
        assert!(serde_json::from_str::<Initializer>(extra).is_err());
    }

    #[test]
    #[should_panic(expected = "outside shape [2, 3]")]
    fn fill_past_the_end_panics() {
        Initializer::Zeros.fill_dense("w", &[2, 3], 4, &mut [0.0; 3]);
    }
}
