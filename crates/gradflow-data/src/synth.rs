//! Synthetic click-through data with a known best achievable AUC.
//!
//! Files look like Criteo's: a 0/1 label, `num_dense` dense columns `d0..` and
//! `num_categorical` categorical columns `c0..` whose values (written as decimal integers)
//! follow a Zipf law, so a few ids are frequent and most are rare. Labels are drawn from a
//! hidden model, `P(click) = sigmoid(logit)`, where the logit sums four parts, each scaled to
//! a fixed share of its variance:
//!
//! | part | share | learnable by |
//! |---|---|---|
//! | linear in the dense features | 30% | logistic regression |
//! | one weight per (field, id) | 35% | logistic regression on one-hot ids |
//! | dense nonlinearity: `z0*z1` and `abs(z2)` | 15% | a deep part (an MLP) |
//! | low-rank crosses of fields `c0×c1`, `c2×c3`, `c4×c5`, and `c6` scaling `z3`'s slope | 20% | embeddings with a deep part or FM |
//!
//! so a wide & deep model has about a third of the signal that plain logistic regression
//! cannot reach. The labels are Bernoulli draws, which is the noise: even the hidden model
//! itself, the Bayes-optimal predictor, reaches only the "oracle" AUC reported by
//! [`write_synth`] and [`oracle`] (about 0.80 with the defaults), and a trained model should
//! be judged against that, not against 1.0.
//!
//! Everything is a pure function of the config: the model comes from `seed`, and row `i` from
//! `(seed, i)`, so files are identical across runs and platforms.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::csv::CsvSchema;
use crate::error::{DataError, Result};
use crate::rng::{SplitMix64, derive_seed};

/// What to generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SynthConfig {
    /// Number of data rows. Default 100 000.
    pub rows: u64,
    /// Dense columns `d0..`. Default 13 (as Criteo).
    pub num_dense: usize,
    /// Categorical columns `c0..`. Default 26 (as Criteo).
    pub num_categorical: usize,
    /// Distinct values per categorical column. Default 10 000.
    pub vocab_per_field: u32,
    /// Zipf exponent of categorical values: value `r` has weight `(r + 1)^-s`. Default 1.1.
    pub zipf_exponent: f64,
    /// Seed of the hidden model and of every row. Default 0.
    pub seed: u64,
    /// Target fraction of positive labels. Default 0.25.
    pub positive_rate: f64,
    /// Standard deviation of the hidden logit, which sets how separable the classes are and
    /// so the oracle AUC. Default 1.4 (oracle AUC about 0.80).
    pub logit_std: f64,
}

impl Default for SynthConfig {
    fn default() -> SynthConfig {
        SynthConfig {
            rows: 100_000,
            num_dense: 13,
            num_categorical: 26,
            vocab_per_field: 10_000,
            zipf_exponent: 1.1,
            seed: 0,
            positive_rate: 0.25,
            logit_std: 1.4,
        }
    }
}

impl SynthConfig {
    /// Checks ranges: at least one feature column, a non-empty vocabulary, a rate in (0, 1).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(DataError::Config(m));
        if self.num_dense + self.num_categorical == 0 {
            return bad("synthetic data needs at least one dense or categorical column".into());
        }
        if self.vocab_per_field == 0 {
            return bad("vocab_per_field must be at least 1, found 0".into());
        }
        if !(self.zipf_exponent.is_finite() && self.zipf_exponent >= 0.0) {
            return bad(format!("zipf_exponent must be >= 0, found {}", self.zipf_exponent));
        }
        if !(self.positive_rate > 0.0 && self.positive_rate < 1.0) {
            return bad(format!("positive_rate must be in (0, 1), found {}", self.positive_rate));
        }
        if !(self.logit_std.is_finite() && self.logit_std >= 0.0) {
            return bad(format!("logit_std must be >= 0, found {}", self.logit_std));
        }
        Ok(())
    }

    /// The [`CsvSchema`] of the generated files.
    pub fn schema(&self) -> CsvSchema {
        schema(self)
    }
}

/// The [`CsvSchema`] of files generated with `config`: label `label`, categorical `c0..`,
/// dense `d0..`.
pub fn schema(config: &SynthConfig) -> CsvSchema {
    CsvSchema::new("label", (0..config.num_categorical).map(|i| format!("c{i}")).collect())
}

/// The header line (without newline): `label,d0,..,c0,..`.
pub fn header(config: &SynthConfig) -> String {
    let mut cols = vec!["label".to_string()];
    cols.extend((0..config.num_dense).map(|i| format!("d{i}")));
    cols.extend((0..config.num_categorical).map(|i| format!("c{i}")));
    cols.join(",")
}

/// What was generated, and how well the hidden model itself does on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthSummary {
    /// Rows generated.
    pub rows: u64,
    /// Rows labelled 1.
    pub positives: u64,
    /// `positives / rows`.
    pub positive_rate: f64,
    /// AUC of the hidden model's probabilities on the generated labels: what a perfect model
    /// reaches. Computed from a histogram of logits 1/4096 wide, so exact to about 1e-4.
    pub oracle_auc: f64,
    /// Mean log loss of the hidden model's probabilities (the Bayes log loss).
    pub oracle_log_loss: f64,
}

// Stream tags, so the model, the rows and the calibration sample draw independent numbers.
const MODEL_STREAM: u64 = 1;
const ROW_STREAM: u64 = 2;
const CALIBRATION_STREAM: u64 = 3;
const CALIBRATION_ROWS: u64 = 20_000;
/// Rank of the low-rank field crosses.
const RANK: usize = 4;
/// Variance shares of the logit parts, in the order of [`SynthModel::parts`].
const SHARES: [f64; 4] = [0.30, 0.35, 0.15, 0.20];
/// Dense values are written with this many decimals; the model sees the rounded values, so
/// the file holds exactly what the labels were drawn from.
const DENSE_SCALE: f64 = 1000.0;

/// The hidden model: how rows are drawn and how their click probability is computed.
#[derive(Debug, Clone)]
pub struct SynthModel {
    num_dense: usize,
    num_categorical: usize,
    vocab: usize,
    seed: u64,
    /// Written dense value `j` is `dense_mean[j] + dense_scale[j] * z` with `z ~ N(0, 1)`;
    /// unequal scales are deliberate, so that models must standardize.
    dense_mean: Vec<f64>,
    dense_scale: Vec<f64>,
    dense_weight: Vec<f64>,
    /// Weight of value `r` of field `f` at `f * vocab + r`.
    cat_weight: Vec<f32>,
    /// Crossed field pairs with their factor tables (`vocab * RANK` each).
    crosses: Vec<(usize, usize, Vec<f32>, Vec<f32>)>,
    /// Per-value slope on `z3` of field 6 (empty if there are too few columns).
    slope: Vec<f32>,
    /// Cumulative Zipf distribution of value ranks.
    zipf_cdf: Vec<f64>,
    /// Centering and scaling of each part, from a calibration sample.
    part_mean: [f64; 4],
    part_coef: [f64; 4],
    bias: f64,
}

impl SynthModel {
    /// The hidden model of `config`, calibrated to its `positive_rate` and `logit_std`.
    pub fn new(config: &SynthConfig) -> Result<SynthModel> {
        config.validate()?;
        let mut rng = SplitMix64::new(derive_seed(&[config.seed, MODEL_STREAM]));
        let (nd, nc, vocab) = (config.num_dense, config.num_categorical, config.vocab_per_field as usize);
        let dense_mean = (0..nd).map(|_| rng.uniform(0.0, 20.0).round()).collect();
        let dense_scale = (0..nd).map(|_| rng.uniform(0.5f64.ln(), 50f64.ln()).exp()).collect();
        // About a third of the features carry no signal, as in real logs.
        let dense_weight = (0..nd).map(|_| if rng.unit() < 0.3 { 0.0 } else { rng.normal() }).collect();
        let mut cat_weight = Vec::with_capacity(nc * vocab);
        for _ in 0..nc {
            let strength = if rng.unit() < 0.3 { 0.0 } else { rng.uniform(0.2, 1.0) };
            cat_weight.extend((0..vocab).map(|_| (strength * rng.normal()) as f32));
        }
        let table =
            |rng: &mut SplitMix64| -> Vec<f32> { (0..vocab * RANK).map(|_| rng.normal() as f32).collect() };
        let crosses = [(0, 1), (2, 3), (4, 5)]
            .into_iter()
            .filter(|&(_, b)| b < nc)
            .map(|(a, b)| (a, b, table(&mut rng), table(&mut rng)))
            .collect();
        let slope =
            if nc > 6 && nd > 3 { (0..vocab).map(|_| rng.normal() as f32).collect() } else { Vec::new() };
        let mut zipf_cdf: Vec<f64> = Vec::with_capacity(vocab);
        let mut total = 0.0;
        for r in 0..vocab {
            total += ((r + 1) as f64).powf(-config.zipf_exponent);
            zipf_cdf.push(total);
        }
        for c in &mut zipf_cdf {
            *c /= total;
        }
        let mut model = SynthModel {
            num_dense: nd,
            num_categorical: nc,
            vocab,
            seed: config.seed,
            dense_mean,
            dense_scale,
            dense_weight,
            cat_weight,
            crosses,
            slope,
            zipf_cdf,
            part_mean: [0.0; 4],
            part_coef: [0.0; 4],
            bias: 0.0,
        };
        model.calibrate(config);
        Ok(model)
    }

    /// Scales each part to its share of `logit_std²` and finds the bias that gives
    /// `positive_rate`, on a sample of rows from a stream of their own. Doing this by
    /// measurement keeps the targets met whatever the column counts and Zipf exponent.
    fn calibrate(&mut self, config: &SynthConfig) {
        let mut dense = vec![0f32; self.num_dense];
        let mut cats = vec![0u32; self.num_categorical];
        let mut parts = Vec::with_capacity(CALIBRATION_ROWS as usize);
        for i in 0..CALIBRATION_ROWS {
            let mut rng = SplitMix64::new(derive_seed(&[self.seed, CALIBRATION_STREAM, i]));
            self.draw(&mut rng, &mut dense, &mut cats);
            parts.push(self.parts(&dense, &cats));
        }
        let n = parts.len() as f64;
        let mut std = [0.0; 4];
        for k in 0..4 {
            let mean = parts.iter().map(|p| p[k]).sum::<f64>() / n;
            let var = parts.iter().map(|p| (p[k] - mean).powi(2)).sum::<f64>() / n;
            self.part_mean[k] = mean;
            std[k] = var.sqrt();
        }
        // Parts that are absent (too few columns) give their share to the others.
        let present: f64 = (0..4).filter(|&k| std[k] > 1e-9).map(|k| SHARES[k]).sum();
        for k in 0..4 {
            self.part_coef[k] =
                if std[k] > 1e-9 { config.logit_std * (SHARES[k] / present).sqrt() / std[k] } else { 0.0 };
        }
        let centered: Vec<f64> = parts.iter().map(|p| self.centered_logit(p)).collect();
        // The mean probability is increasing in the bias, so bisection finds it.
        let (mut lo, mut hi) = (-30.0, 30.0);
        for _ in 0..100 {
            let mid: f64 = (lo + hi) / 2.0;
            let rate = centered.iter().map(|&l| sigmoid(mid + l)).sum::<f64>() / n;
            if rate < config.positive_rate {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        self.bias = (lo + hi) / 2.0;
    }

    fn centered_logit(&self, parts: &[f64; 4]) -> f64 {
        (0..4).map(|k| self.part_coef[k] * (parts[k] - self.part_mean[k])).sum()
    }

    /// Draws the features of one row: dense values as written (rounded), categorical ranks.
    fn draw(&self, rng: &mut SplitMix64, dense: &mut [f32], cats: &mut [u32]) {
        for (j, x) in dense.iter_mut().enumerate() {
            let v = self.dense_mean[j] + self.dense_scale[j] * rng.normal();
            *x = ((v * DENSE_SCALE).round() / DENSE_SCALE) as f32;
        }
        for c in cats.iter_mut() {
            let u = rng.unit();
            let r = self.zipf_cdf.partition_point(|&p| p <= u);
            *c = r.min(self.vocab - 1) as u32;
        }
    }

    /// The four parts of the logit before scaling: dense linear, categorical weights, dense
    /// nonlinearity, crosses.
    fn parts(&self, dense: &[f32], cats: &[u32]) -> [f64; 4] {
        let z = |j: usize| (dense[j] as f64 - self.dense_mean[j]) / self.dense_scale[j];
        let linear: f64 = (0..self.num_dense).map(|j| self.dense_weight[j] * z(j)).sum();
        let main: f64 =
            cats.iter().enumerate().map(|(f, &r)| self.cat_weight[f * self.vocab + r as usize] as f64).sum();
        let mut nonlinear = 0.0;
        if self.num_dense >= 2 {
            nonlinear += z(0) * z(1);
        }
        if self.num_dense >= 3 {
            // abs(z) has variance 1 - 2/pi; scaled to weigh about as much as z0*z1.
            nonlinear += 1.6 * (z(2).abs() - std::f64::consts::FRAC_2_PI.sqrt());
        }
        let mut cross = 0.0;
        for (a, b, ua, vb) in &self.crosses {
            let (ra, rb) = (cats[*a] as usize * RANK, cats[*b] as usize * RANK);
            let dot: f32 = (0..RANK).map(|k| ua[ra + k] * vb[rb + k]).sum();
            cross += dot as f64 / RANK as f64;
        }
        if !self.slope.is_empty() {
            cross += self.slope[cats[6] as usize] as f64 * z(3);
        }
        [linear, main, nonlinear, cross]
    }

    /// The hidden logit of a row: `dense` as written in the file, `categorical` the values
    /// of `c0..` as integers.
    ///
    /// # Panics
    /// If the lengths differ from the config's column counts or a value is not below
    /// `vocab_per_field`.
    pub fn logit(&self, dense: &[f32], categorical: &[u32]) -> f64 {
        assert_eq!(dense.len(), self.num_dense, "synth logit: dense column count");
        assert_eq!(categorical.len(), self.num_categorical, "synth logit: categorical column count");
        self.bias + self.centered_logit(&self.parts(dense, categorical))
    }

    /// The hidden click probability of a row; see [`logit`](Self::logit).
    pub fn probability(&self, dense: &[f32], categorical: &[u32]) -> f64 {
        sigmoid(self.logit(dense, categorical))
    }

    /// Row `index`: its features, label and logit. Rows are independent, so any range of
    /// them can be generated on its own.
    fn row(&self, index: u64, dense: &mut [f32], cats: &mut [u32]) -> (bool, f64) {
        let mut rng = SplitMix64::new(derive_seed(&[self.seed, ROW_STREAM, index]));
        self.draw(&mut rng, dense, cats);
        let logit = self.bias + self.centered_logit(&self.parts(dense, cats));
        (rng.unit() < sigmoid(logit), logit)
    }
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// Oracle statistics gathered in one pass: a logit histogram per class (for the AUC) and the
/// summed log loss. A histogram rather than stored scores keeps memory constant for any
/// number of rows.
struct OracleStats {
    pos: Vec<u64>,
    neg: Vec<u64>,
    log_loss: f64,
    rows: u64,
}

const HIST_RANGE: f64 = 32.0;
const HIST_BINS: usize = 1 << 18;

impl OracleStats {
    fn new() -> OracleStats {
        OracleStats { pos: vec![0; HIST_BINS], neg: vec![0; HIST_BINS], log_loss: 0.0, rows: 0 }
    }

    fn add(&mut self, label: bool, logit: f64) {
        let x = ((logit + HIST_RANGE / 2.0) / HIST_RANGE * HIST_BINS as f64).floor();
        let bin = x.clamp(0.0, (HIST_BINS - 1) as f64) as usize;
        if label {
            self.pos[bin] += 1;
        } else {
            self.neg[bin] += 1;
        }
        // log(1 + e^-|z|) form: exact for large logits.
        let signed = if label { logit } else { -logit };
        self.log_loss += (-signed).max(0.0) + (-signed.abs()).exp().ln_1p();
        self.rows += 1;
    }

    fn summary(&self) -> SynthSummary {
        let positives: u64 = self.pos.iter().sum();
        let negatives = self.rows - positives;
        // Pairs (positive, negative) with the positive in a higher bin, plus half the pairs
        // sharing a bin.
        let (mut wins, mut neg_below) = (0.0f64, 0.0f64);
        for b in 0..HIST_BINS {
            let (p, n) = (self.pos[b] as f64, self.neg[b] as f64);
            wins += p * (neg_below + n / 2.0);
            neg_below += n;
        }
        let pairs = positives as f64 * negatives as f64;
        SynthSummary {
            rows: self.rows,
            positives,
            positive_rate: positives as f64 / self.rows.max(1) as f64,
            oracle_auc: if pairs > 0.0 { wins / pairs } else { f64::NAN },
            oracle_log_loss: self.log_loss / self.rows.max(1) as f64,
        }
    }
}

/// Writes `config.rows` rows of CSV (with [`header`]) to `path` and returns the summary.
pub fn write_synth(config: &SynthConfig, path: &Path) -> Result<SynthSummary> {
    let model = SynthModel::new(config)?;
    let io = |e| DataError::io(path, e);
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path).map_err(io)?);
    writeln!(out, "{}", header(config)).map_err(io)?;
    let mut stats = OracleStats::new();
    let mut dense = vec![0f32; config.num_dense];
    let mut cats = vec![0u32; config.num_categorical];
    let mut line = Vec::with_capacity(512);
    for i in 0..config.rows {
        let (label, logit) = model.row(i, &mut dense, &mut cats);
        stats.add(label, logit);
        line.clear();
        line.push(if label { b'1' } else { b'0' });
        for &x in &dense {
            line.push(b',');
            write_fixed(&mut line, (x as f64 * DENSE_SCALE).round() as i64);
        }
        for &c in &cats {
            line.push(b',');
            write_uint(&mut line, c as u64);
        }
        line.push(b'\n');
        out.write_all(&line).map_err(io)?;
    }
    out.flush().map_err(io)?;
    Ok(stats.summary())
}

/// The summary [`write_synth`] would return for `config`, without writing anything: the
/// oracle AUC and log loss a perfect model reaches on that data.
pub fn oracle(config: &SynthConfig) -> Result<SynthSummary> {
    let model = SynthModel::new(config)?;
    let mut stats = OracleStats::new();
    let mut dense = vec![0f32; config.num_dense];
    let mut cats = vec![0u32; config.num_categorical];
    for i in 0..config.rows {
        let (label, logit) = model.row(i, &mut dense, &mut cats);
        stats.add(label, logit);
    }
    Ok(stats.summary())
}

/// Appends `v` in decimal.
fn write_uint(out: &mut Vec<u8>, mut v: u64) {
    // Formatting machinery is several times slower than this for the 39 columns of a row.
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Appends `thousandths / 1000` with up to three decimals and no trailing zeros.
fn write_fixed(out: &mut Vec<u8>, thousandths: i64) {
    if thousandths < 0 {
        out.push(b'-');
    }
    let a = thousandths.unsigned_abs();
    write_uint(out, a / 1000);
    let mut frac = a % 1000;
    if frac == 0 {
        return;
    }
    out.push(b'.');
    let mut width = 3;
    while frac.is_multiple_of(10) {
        frac /= 10;
        width -= 1;
    }
    let start = out.len();
    write_uint(out, frac);
    // Restore leading zeros lost by writing the fraction as an integer (0.05 -> "05").
    while out.len() - start < width {
        out.insert(start, b'0');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed(v: i64) -> String {
        let mut b = Vec::new();
        write_fixed(&mut b, v);
        String::from_utf8(b).unwrap()
    }

    #[test]
    fn fixed_point_formatting() {
        assert_eq!(fixed(0), "0");
        assert_eq!(fixed(1500), "1.5");
        assert_eq!(fixed(-1500), "-1.5");
        assert_eq!(fixed(50), "0.05");
        assert_eq!(fixed(-7), "-0.007");
        assert_eq!(fixed(123456), "123.456");
        assert_eq!(fixed(120), "0.12");
        assert_eq!(fixed(-3000), "-3");
        for v in [-123456i64, -1, 1, 999, 1001, 20_000_005] {
            let parsed: f64 = fixed(v).parse().unwrap();
            assert_eq!((parsed * 1000.0).round() as i64, v);
        }
    }

    #[test]
    fn histogram_auc_matches_exact() {
        let mut rng = SplitMix64::new(5);
        let mut stats = OracleStats::new();
        let (mut labels, mut scores) = (Vec::new(), Vec::new());
        for _ in 0..20_000 {
            let z = 2.0 * rng.normal();
            let y = rng.unit() < sigmoid(z);
            stats.add(y, z);
            labels.push(if y { 1.0 } else { 0.0 });
            scores.push(z as f32);
        }
        let exact = crate::metrics::auc(&labels, &scores);
        assert!((stats.summary().oracle_auc - exact).abs() < 1e-4);
    }
}
