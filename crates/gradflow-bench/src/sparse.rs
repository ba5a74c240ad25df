//! (4) Sparse exchange: pull and push of `ids` random ids with rows of 16 or 64 floats in a
//! table of `table_rows` rows (Adagrad, the wide & deep default), one worker, through
//! in-process shards (see [`crate::cluster`]).
//!
//! Before timing, every row of the table is created on its shard directly through the
//! shard's model (no network; the time is reported as `fill_s`), so that the timed pulls and
//! pushes hit a table of the full size, with its cache misses, instead of creating rows.
//! Rows start at zero: the initializer's cost belongs to row creation, not to this measure.
//! Ids are uniform over the table and drawn before timing. A pull is `pull_sparse`; a push is
//! `push_sparse` plus `step` (sync mode: the server sums and applies Adagrad to every row
//! before it answers).

use std::time::Instant;

use gradflow_core::{Initializer, Mode, ModelSpec, OptimizerConfig, Placement, SparseSpec};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use gradflow_ps::model::SparseAccum;

use crate::cluster::{self, Servers};
use crate::stats::{Timing, sig4};
use crate::{BenchError, Log, SparseConfig};
use gradflow_data::SplitMix64;

const TABLE: &str = "emb";
const WARMUP: usize = 2;
/// Ids per call when filling the table.
const FILL_CHUNK: u64 = 1 << 16;

/// All row widths and shard counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SparseReport {
    pub table_rows: u64,
    pub ids: usize,
    pub rows: Vec<SparseRow>,
}

/// One row width and shard count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SparseRow {
    pub dim: u32,
    pub shards: u32,
    pub pull: Timing,
    pub pull_rows_per_sec: f64,
    pub push: Timing,
    pub push_rows_per_sec: f64,
    /// Seconds spent creating the table's rows before timing (not part of the rates).
    pub fill_s: f64,
}

fn spec(dim: u32) -> ModelSpec {
    ModelSpec {
        dense: Vec::new(),
        sparse: vec![SparseSpec {
            name: TABLE.into(),
            dim,
            init: Initializer::Zeros,
            optimizer: OptimizerConfig::adagrad(0.05),
        }],
    }
}

pub fn run(config: &SparseConfig, log: Log<'_>) -> Result<SparseReport, BenchError> {
    let mut rows = Vec::new();
    for &dim in &config.dims {
        for &shards in &config.shards {
            let row = measure(config, dim, shards)?;
            log(&format!(
                "sparse: {} ids of dim {dim} in {} rows, {shards} shard(s): pull {} rows/s, push {} rows/s (table filled in {:.1} s)",
                config.ids, config.table_rows, row.pull_rows_per_sec, row.push_rows_per_sec, row.fill_s
            ));
            rows.push(row);
        }
    }
    Ok(SparseReport { table_rows: config.table_rows, ids: config.ids, rows })
}

fn measure(config: &SparseConfig, dim: u32, shards: u32) -> Result<SparseRow, BenchError> {
    let servers = Servers::start(shards, 1, Mode::Sync)?;
    let addrs = servers.addrs();
    let spec = spec(dim);
    let mut rng = SplitMix64::new(config.seed);
    let batches: Vec<Vec<u64>> = (0..WARMUP + config.reps)
        .map(|_| (0..config.ids).map(|_| rng.below(config.table_rows)).collect())
        .collect();
    let grads = vec![1e-3f32; config.ids * dim as usize];

    // Declared by the worker first (the model exists once a worker declares it), then
    // filled, then timed; a channel would be more ceremony than two phases on one thread.
    let mut results = cluster::on_worker_threads(1, |w| {
        let (spec, addrs, servers, batches, grads) = (spec.clone(), &addrs, &servers, &batches, &grads);
        async move {
            let mut worker = cluster::connect(addrs, w).await?;
            worker.declare(spec).await?;
            let fill_s = tokio::task::block_in_place(|| fill(servers, shards, config.table_rows))?;
            let mut out = Vec::with_capacity(config.ids * dim as usize);
            let mut pull = Vec::with_capacity(config.reps);
            for (k, ids) in batches.iter().enumerate() {
                let started = Instant::now();
                worker.pull_sparse(TABLE, ids, &mut out).await?;
                if k >= WARMUP {
                    pull.push(started.elapsed().as_secs_f64());
                }
            }
            let mut push = Vec::with_capacity(config.reps);
            for (k, ids) in batches.iter().enumerate() {
                let started = Instant::now();
                worker.push_sparse(TABLE, ids, grads)?;
                worker.step().await?;
                if k >= WARMUP {
                    push.push(started.elapsed().as_secs_f64());
                }
            }
            worker.leave().await?;
            Ok((Timing::of(&pull), Timing::of(&push), fill_s))
        }
    })?;
    servers.stop()?;
    let (pull, push, fill_s) = results.pop().expect("one worker");
    let ids = config.ids as f64;
    Ok(SparseRow {
        dim,
        shards,
        pull_rows_per_sec: sig4(pull.rate(ids)),
        push_rows_per_sec: sig4(push.rate(ids)),
        pull,
        push,
        fill_s: sig4(fill_s),
    })
}

/// Creates rows `0..rows` on their shards, on every core, as pushes of zero gradients do
/// (pulls create no rows); returns the seconds it took.
fn fill(servers: &Servers, shards: u32, rows: u64) -> Result<f64, BenchError> {
    let started = Instant::now();
    for s in 0..shards {
        let model = servers.shard(s as usize).model()?;
        let table = &model.tables()[0];
        let dim = table.dim();
        (0..rows.div_ceil(FILL_CHUNK)).into_par_iter().for_each_init(
            || (Vec::with_capacity(FILL_CHUNK as usize), Vec::new()),
            |(ids, zeros): &mut (Vec<u64>, Vec<u8>), chunk| {
                ids.clear();
                let end = ((chunk + 1) * FILL_CHUNK).min(rows);
                ids.extend((chunk * FILL_CHUNK..end).filter(|&id| Placement::sparse_shard(id, shards) == s));
                zeros.resize(ids.len() * dim * 4, 0);
                let mut acc = SparseAccum::default();
                acc.add(ids, zeros, dim);
                table.apply(&acc, 1.0);
            },
        );
    }
    Ok(started.elapsed().as_secs_f64())
}
