//! (7) Embedding tables at production scale: raw 64-bit ids from a large vocabulary, Zipf
//! distributed, pushed through one server's table with and without a row cap (the job file's
//! `[embedding] max_rows`), in one run.
//!
//! Ids are ranks `0..vocabulary` drawn from a Zipf law of exponent `zipf_exponent` (rank `r`
//! has weight `(r + 1)^-s`; rejection-inversion sampling, so no table of the vocabulary is
//! held), each scrambled by a bijective 64-bit mix into an id that looks raw: large and
//! scattered, as hashed feature values are. Every push draws `batch_ids` ids, keeps each once
//! (a worker sends the unique ids of its batch) and then, timed, does what a server does for
//! that batch: `Table::pull` of the unique ids, then `SparseAccum::add` of their gradients and
//! `Table::apply` (Adagrad): one pull and one push per row. Drawing the ids is not timed.
//!
//! Two runs over the same ids (same seed), through the server's own model
//! (`gradflow_ps::model::ShardModel` with its `[embedding]` settings, one shard, no network,
//! as [`crate::update`] does):
//! - *eviction on*: `max_rows` rows at most; once full, the rows updated longest ago make
//!   room for new ones;
//! - *eviction off*: no cap, so the table holds every id it has seen.
//!
//! Each reports its rate (unique rows pulled and pushed per second, over all pushes), the
//! table's final rows and `Table::stats()` (bytes, admitted, evicted), and the growth of the
//! process's resident memory (VmRSS of /proc/self/status, read before the model is created
//! and after its last push; `None` where there is no /proc). Eviction on runs first, and each
//! model is dropped before the next is created, so that the growth is the table's. RSS
//! counts what the table's bytes do not: the id index (a hash map for raw ids), the arenas'
//! spare capacity and the allocator's slack (memory it keeps after a free, pages rounded
//! up). It is measured best alone (`gradflow bench --only embedding`): after other sections,
//! memory they freed and the allocator kept can be reused without growing RSS.
//!
//! Bytes per row are compared with the raw floats of a row: values and optimizer state,
//! `dim * (1 + slots) * 4` bytes; `Table::row_bytes` adds the id, update count and clock.

use std::time::Instant;

use gradflow_core::embedding::EmbeddingSettings;
use gradflow_core::{DEFAULT_PARTITION_BYTES, Initializer, ModelSpec, OptimizerConfig, SparseSpec};
use gradflow_data::SplitMix64;
use gradflow_ps::model::{ShardModel, SparseAccum};
use serde::{Deserialize, Serialize};

use crate::stats::{Timing, sig4};
use crate::{BenchError, EmbeddingConfig, Log};

const TABLE: &str = "emb";

/// Both runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingReport {
    /// Ids that can be drawn (Zipf ranks).
    pub vocabulary: u64,
    pub zipf_exponent: f64,
    /// Floats per row.
    pub dim: u32,
    /// Ids drawn per push, before duplicates are removed.
    pub batch_ids: usize,
    /// Pushes of each run.
    pub pushes: usize,
    /// The cap of the eviction-on run, in rows.
    pub max_rows: u64,
    /// Ids drawn in all (`pushes * batch_ids`), and how many distinct ones.
    pub ids_drawn: u64,
    pub distinct_ids: u64,
    /// Unique ids per push, on average: the rows each push pulls and pushes.
    pub rows_per_push: f64,
    /// Bytes of a row's values and optimizer state (`dim * (1 + slots) * 4`).
    pub raw_row_bytes: u64,
    /// Bytes of a row as the table counts them (`Table::row_bytes`: raw floats, id, update
    /// count, clock), and their ratio to `raw_row_bytes`.
    pub row_bytes: u64,
    pub row_bytes_ratio: f64,
    /// `max_rows * row_bytes`: what a full table's rows take.
    pub cap_bytes: u64,
    /// RSS growth of the eviction-on run over `cap_bytes`.
    pub rss_ratio_to_cap_bytes: Option<f64>,
    /// Resident bytes per row of the eviction-on run (RSS growth over its final rows), and
    /// their ratio to `raw_row_bytes`.
    pub rss_bytes_per_row: Option<f64>,
    pub rss_row_ratio_to_raw: Option<f64>,
    /// `eviction_on.rows_per_sec / eviction_off.rows_per_sec`.
    pub on_vs_off: f64,
    pub eviction_on: EmbeddingRun,
    pub eviction_off: EmbeddingRun,
}

/// One run: every push through one table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingRun {
    /// The cap (`None`: eviction off).
    pub max_rows: Option<u64>,
    /// Unique rows pulled and pushed per second, over all pushes (pull and push time).
    pub rows_per_sec: f64,
    /// The same rows per second of pull time alone and of push time alone.
    pub pull_rows_per_sec: f64,
    pub push_rows_per_sec: f64,
    /// Seconds of one push (pull and push of its rows): the median says the common case, the
    /// maximum what making room costs when it comes.
    pub step: Timing,
    /// Timed seconds in all.
    pub seconds: f64,
    /// Rows the table holds at the end, and `Table::stats()`.
    pub rows: u64,
    pub table_bytes: u64,
    pub admitted: u64,
    pub evicted: u64,
    pub dropped: u64,
    /// Growth of the process's resident memory from before the model was created to after
    /// the last push, bytes (`None` without /proc).
    pub rss_growth_bytes: Option<u64>,
    /// `rss_growth_bytes / table_bytes`.
    pub rss_ratio_to_table_bytes: Option<f64>,
}

fn spec(config: &EmbeddingConfig) -> ModelSpec {
    ModelSpec {
        dense: Vec::new(),
        sparse: vec![SparseSpec {
            name: TABLE.into(),
            dim: config.dim,
            init: Initializer::Uniform { low: -0.01, high: 0.01, seed: config.seed },
            optimizer: OptimizerConfig::adagrad(0.05),
        }],
    }
}

pub fn run(config: &EmbeddingConfig, log: Log<'_>) -> Result<EmbeddingReport, BenchError> {
    // Rayon's threads (the table's large updates run on them) exist before any RSS is read.
    rayon::broadcast(|_| ());
    let mut seen = vec![0u64; config.vocabulary.div_ceil(64) as usize];
    let on = measure(config, Some(config.max_rows), Some(&mut seen))?;
    let distinct_ids: u64 = seen.iter().map(|w| u64::from(w.count_ones())).sum();
    drop(seen);
    log(&format!(
        "embedding: eviction on (max_rows {}): {} rows/s, {} rows at the end, {} evicted, RSS +{}",
        config.max_rows,
        on.run.rows_per_sec,
        on.run.rows,
        on.run.evicted,
        on.run.rss_growth_bytes.map_or("?".into(), crate::stats::human_bytes)
    ));
    let off = measure(config, None, None)?;
    log(&format!(
        "embedding: eviction off: {} rows/s, {} rows at the end, RSS +{}",
        off.run.rows_per_sec,
        off.run.rows,
        off.run.rss_growth_bytes.map_or("?".into(), crate::stats::human_bytes)
    ));
    let slots = OptimizerConfig::adagrad(0.05).num_slots() as u64;
    let raw_row_bytes = u64::from(config.dim) * (1 + slots) * 4;
    let cap_bytes = config.max_rows * on.row_bytes;
    let rss_bytes_per_row =
        on.run.rss_growth_bytes.filter(|_| on.run.rows > 0).map(|b| b as f64 / on.run.rows as f64);
    Ok(EmbeddingReport {
        vocabulary: config.vocabulary,
        zipf_exponent: config.zipf_exponent,
        dim: config.dim,
        batch_ids: config.batch_ids,
        pushes: config.pushes,
        max_rows: config.max_rows,
        ids_drawn: (config.pushes * config.batch_ids) as u64,
        distinct_ids,
        rows_per_push: sig4(on.rows_pushed as f64 / config.pushes as f64),
        raw_row_bytes,
        row_bytes: on.row_bytes,
        row_bytes_ratio: sig4(on.row_bytes as f64 / raw_row_bytes as f64),
        cap_bytes,
        rss_ratio_to_cap_bytes: on.run.rss_growth_bytes.map(|b| sig4(b as f64 / cap_bytes as f64)),
        rss_bytes_per_row: rss_bytes_per_row.map(sig4),
        rss_row_ratio_to_raw: rss_bytes_per_row.map(|b| sig4(b / raw_row_bytes as f64)),
        on_vs_off: sig4(on.run.rows_per_sec / off.run.rows_per_sec),
        eviction_on: on.run,
        eviction_off: off.run,
    })
}

/// One run and what the report needs besides it.
struct Measured {
    run: EmbeddingRun,
    rows_pushed: u64,
    row_bytes: u64,
}

/// Pushes every batch through a new table capped at `max_rows`; marks the ranks drawn in
/// `seen` (a bitset over the vocabulary) when given.
fn measure(
    config: &EmbeddingConfig,
    max_rows: Option<u64>,
    mut seen: Option<&mut Vec<u64>>,
) -> Result<Measured, BenchError> {
    let dim = config.dim as usize;
    let mut draws = Draws::new(config);
    // Every buffer at its full size before RSS is read.
    let grads = vec![1e-3f32; config.batch_ids * dim];
    let grads: Vec<u8> = grads.iter().flat_map(|g| g.to_le_bytes()).collect();
    let mut pulled: Vec<u8> = Vec::with_capacity(config.batch_ids * dim * 4);
    let mut acc = SparseAccum::default();
    let mut secs = Vec::with_capacity(config.pushes);
    let (mut pull_s, mut push_s, mut rows_pushed) = (0f64, 0f64, 0u64);

    let rss_before = rss_bytes();
    let settings = EmbeddingSettings { max_rows, ..EmbeddingSettings::default() };
    let model = ShardModel::new(spec(config), 1, 0, DEFAULT_PARTITION_BYTES)
        .with_embedding(&settings)
        .map_err(|e| BenchError::Config(format!("embedding: {e}")))?;
    let table = &model.tables()[0];
    for _ in 0..config.pushes {
        let ids = draws.batch(seen.as_deref_mut());
        let started = Instant::now();
        pulled.clear();
        table.pull(ids, &mut pulled);
        let pulled_at = Instant::now();
        acc.clear();
        acc.add(ids, &grads[..ids.len() * dim * 4], dim);
        table.apply(&acc, 1.0);
        let pushed_at = Instant::now();
        std::hint::black_box(&pulled);
        pull_s += (pulled_at - started).as_secs_f64();
        push_s += (pushed_at - pulled_at).as_secs_f64();
        secs.push((pushed_at - started).as_secs_f64());
        rows_pushed += ids.len() as u64;
    }
    let rss_after = rss_bytes();
    let stats = table.stats();
    let row_bytes = table.row_bytes();
    drop(model);

    let rss_growth_bytes = rss_before.zip(rss_after).map(|(b, a)| a.saturating_sub(b));
    let seconds = pull_s + push_s;
    let rows = rows_pushed as f64;
    Ok(Measured {
        run: EmbeddingRun {
            max_rows,
            rows_per_sec: sig4(rows / seconds.max(1e-12)),
            pull_rows_per_sec: sig4(rows / pull_s.max(1e-12)),
            push_rows_per_sec: sig4(rows / push_s.max(1e-12)),
            step: Timing::of(&secs),
            seconds: sig4(seconds),
            rows: stats.rows,
            table_bytes: stats.bytes,
            admitted: stats.admitted,
            evicted: stats.evicted,
            dropped: stats.dropped,
            rss_growth_bytes,
            rss_ratio_to_table_bytes: rss_growth_bytes
                .filter(|_| stats.bytes > 0)
                .map(|g| sig4(g as f64 / stats.bytes as f64)),
        },
        rows_pushed,
        row_bytes,
    })
}

/// The batches of one run: Zipf ranks, each batch's duplicates removed, scrambled into ids.
struct Draws {
    zipf: Zipf,
    rng: SplitMix64,
    seed: u64,
    batch_ids: usize,
    ranks: Vec<u64>,
    ids: Vec<u64>,
}

impl Draws {
    fn new(config: &EmbeddingConfig) -> Draws {
        Draws {
            zipf: Zipf::new(config.vocabulary, config.zipf_exponent),
            rng: SplitMix64::new(config.seed),
            seed: config.seed,
            batch_ids: config.batch_ids,
            ranks: Vec::with_capacity(config.batch_ids),
            ids: Vec::with_capacity(config.batch_ids),
        }
    }

    /// The next batch's unique ids; marks their ranks in `seen`.
    fn batch(&mut self, seen: Option<&mut Vec<u64>>) -> &[u64] {
        self.ranks.clear();
        for _ in 0..self.batch_ids {
            let rank = self.zipf.sample(&mut self.rng) - 1;
            self.ranks.push(rank);
        }
        self.ranks.sort_unstable();
        self.ranks.dedup();
        if let Some(seen) = seen {
            for &r in &self.ranks {
                seen[(r / 64) as usize] |= 1 << (r % 64);
            }
        }
        self.ids.clear();
        self.ids.extend(self.ranks.iter().map(|&r| raw_id(r, self.seed)));
        &self.ids
    }
}

/// The id of Zipf rank `rank`: a bijection of the 64-bit integers (splitmix64's finalizer over
/// the rank offset by the seed), so distinct ranks give distinct ids that look like raw
/// hashed feature values.
fn raw_id(rank: u64, seed: u64) -> u64 {
    let mut x = rank.wrapping_add(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Zipf's law over ranks `1..=n` (rank `k` has weight `k^-s`), sampled by rejection-inversion
/// (Hörmann and Derflinger, "Rejection-inversion to generate variates from monotone discrete
/// distributions", 1996): constant time and memory whatever `n`.
struct Zipf {
    n: f64,
    s: f64,
    h_integral_x1: f64,
    h_integral_n: f64,
    threshold: f64,
}

impl Zipf {
    fn new(n: u64, s: f64) -> Zipf {
        let mut z = Zipf { n: n as f64, s, h_integral_x1: 0.0, h_integral_n: 0.0, threshold: 0.0 };
        z.h_integral_x1 = z.h_integral(1.5) - 1.0;
        z.h_integral_n = z.h_integral(z.n + 0.5);
        z.threshold = 2.0 - z.h_integral_inverse(z.h_integral(2.5) - z.h(2.0));
        z
    }

    fn sample(&self, rng: &mut SplitMix64) -> u64 {
        loop {
            let unit = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
            let u = self.h_integral_n + unit * (self.h_integral_x1 - self.h_integral_n);
            let x = self.h_integral_inverse(u);
            let k = (x + 0.5).floor().clamp(1.0, self.n);
            if k - x <= self.threshold || u >= self.h_integral(k + 0.5) - self.h(k) {
                return k as u64;
            }
        }
    }

    /// `x^-s`.
    fn h(&self, x: f64) -> f64 {
        (-self.s * x.ln()).exp()
    }

    /// An antiderivative of `h`: `(x^(1-s) - 1) / (1 - s)`, continuous at `s = 1`.
    fn h_integral(&self, x: f64) -> f64 {
        let log_x = x.ln();
        expm1_over_x((1.0 - self.s) * log_x) * log_x
    }

    fn h_integral_inverse(&self, x: f64) -> f64 {
        let t = (x * (1.0 - self.s)).max(-1.0);
        (log1p_over_x(t) * x).exp()
    }
}

/// `ln(1 + x) / x`, 1 at 0.
fn log1p_over_x(x: f64) -> f64 {
    if x.abs() > 1e-8 { x.ln_1p() / x } else { 1.0 - x * (0.5 - x * (1.0 / 3.0 - 0.25 * x)) }
}

/// `(e^x - 1) / x`, 1 at 0.
fn expm1_over_x(x: f64) -> f64 {
    if x.abs() > 1e-8 { x.exp_m1() / x } else { 1.0 + x * 0.5 * (1.0 + x / 3.0 * (1.0 + 0.25 * x)) }
}

/// This process's resident memory (VmRSS), bytes; `None` where /proc/self/status has none.
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 =
        status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_draws_follow_the_law() {
        let (n, s) = (1000u64, 1.05);
        let zipf = Zipf::new(n, s);
        let mut rng = SplitMix64::new(3);
        let draws = 200_000;
        let mut counts = vec![0u64; n as usize + 1];
        for _ in 0..draws {
            let k = zipf.sample(&mut rng);
            assert!((1..=n).contains(&k), "{k}");
            counts[k as usize] += 1;
        }
        let total: f64 = (1..=n).map(|k| (k as f64).powf(-s)).sum();
        for k in [1usize, 2, 10, 100] {
            let expected = (k as f64).powf(-s) / total * draws as f64;
            let got = counts[k] as f64;
            assert!((got - expected).abs() < 5.0 * expected.sqrt() + 1.0, "rank {k}: {got} vs {expected}");
        }
    }

    #[test]
    fn raw_ids_are_distinct_and_scattered() {
        let ids: std::collections::HashSet<u64> = (0..100_000).map(|r| raw_id(r, 7)).collect();
        assert_eq!(ids.len(), 100_000);
        assert!(ids.iter().filter(|&&id| id > 1 << 60).count() > 90_000, "ids look raw");
    }

    #[test]
    fn quick_run_caps_the_table_and_the_uncapped_one_grows() {
        let config = EmbeddingConfig::quick();
        let r = run(&config, &|_| ()).unwrap();
        let (on, off) = (&r.eviction_on, &r.eviction_off);
        assert_eq!(on.max_rows, Some(config.max_rows));
        assert_eq!(off.max_rows, None);
        assert!(on.rows > 0 && on.rows <= config.max_rows, "{} rows, cap {}", on.rows, config.max_rows);
        assert!(on.evicted > 0, "a full table evicted nothing");
        assert!(off.rows > config.max_rows, "{} rows without a cap", off.rows);
        assert_eq!(off.evicted, 0);
        assert_eq!(off.rows, r.distinct_ids, "without a cap every id seen has its row");
        assert_eq!(on.admitted, on.rows + on.evicted);
        assert!(r.distinct_ids <= r.ids_drawn && r.distinct_ids > config.max_rows);
        assert_eq!(on.table_bytes, on.rows * r.row_bytes);
        assert_eq!(r.raw_row_bytes, u64::from(config.dim) * 2 * 4, "Adagrad: values and one slot");
        assert!(r.row_bytes > r.raw_row_bytes);
        for rate in
            [on.rows_per_sec, off.rows_per_sec, on.pull_rows_per_sec, off.push_rows_per_sec, r.on_vs_off]
        {
            assert!(rate.is_finite() && rate > 0.0, "{rate}");
        }
        if cfg!(target_os = "linux") {
            assert!(on.rss_growth_bytes.is_some() && r.rss_ratio_to_cap_bytes.is_some());
        }
    }
}
