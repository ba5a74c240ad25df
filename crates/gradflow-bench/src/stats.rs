//! Timing helpers: repetitions summarized by their median, and unit conversions.
//!
//! Every scenario times a warm-up first (not recorded) and then a few repetitions; the
//! median is what the report shows, the minimum and maximum say how noisy it was.

use serde::{Deserialize, Serialize};

/// Decimal gigabyte: throughputs are reported in GB/s = 1e9 bytes per second.
pub const GB: f64 = 1e9;

/// Seconds of a set of repetitions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// Median, in seconds.
    pub median_s: f64,
    /// Fastest repetition, in seconds.
    pub min_s: f64,
    /// Slowest repetition, in seconds.
    pub max_s: f64,
    /// Number of repetitions.
    pub reps: usize,
}

impl Timing {
    /// Summarizes `secs` (at least one value).
    ///
    /// # Panics
    /// If `secs` is empty.
    pub fn of(secs: &[f64]) -> Timing {
        assert!(!secs.is_empty(), "Timing::of needs at least one repetition");
        Timing { median_s: median(secs), min_s: min(secs), max_s: max(secs), reps: secs.len() }
    }

    /// `amount` per second at the median.
    pub fn rate(&self, amount: f64) -> f64 {
        amount / self.median_s.max(1e-12)
    }
}

/// The median (the mean of the middle two for an even count).
///
/// # Panics
/// If `values` is empty.
pub fn median(values: &[f64]) -> f64 {
    assert!(!values.is_empty(), "median of nothing");
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// Rounds to 4 significant digits, so the JSON report does not pretend to more precision than
/// a benchmark has.
pub fn sig4(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let scale = 10f64.powi(3 - x.abs().log10().floor() as i32);
    (x * scale).round() / scale
}

/// `bytes` as `4 MiB`, `512 MiB`, `1 GiB` or `37 KiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (size, unit) in UNITS {
        if bytes >= size {
            let v = bytes as f64 / size as f64;
            return if v.fract() == 0.0 { format!("{v:.0} {unit}") } else { format!("{v:.1} {unit}") };
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let t = Timing::of(&[2.0, 1.0, 4.0]);
        assert_eq!((t.median_s, t.min_s, t.max_s, t.reps), (2.0, 1.0, 4.0, 3));
        assert_eq!(t.rate(10.0), 5.0);
    }

    #[test]
    fn rounding_and_units() {
        assert_eq!(sig4(1234.5678), 1235.0);
        assert_eq!(sig4(0.000123456), 0.0001235);
        assert_eq!(human_bytes(4 << 20), "4 MiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(1 << 30), "1 GiB");
    }
}
