//! What `gradflow bench` measures and how hard: [`BenchConfig`], its defaults (the issue's
//! sizes, about 95 s on a 2-core machine) and the [`BenchConfig::quick`] preset (a few
//! seconds, for tests and a smoke check).
//!
//! Every field has a default, so a JSON or TOML file only names what it changes; unknown fields
//! are refused. Sizes are in bytes (MiB = 2^20), throughputs in the report in decimal GB/s.

use std::fmt;
use std::str::FromStr;

use gradflow_core::Mode;
use gradflow_proto::Compression;
use serde::{Deserialize, Serialize};

use crate::BenchError;

const MIB: u64 = 1 << 20;

/// One section of the benchmark, as named on the command line (`--only dense,sparse`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// (1) Raw TCP over loopback between two processes, and memory-copy bandwidth.
    Ceiling,
    /// (1b) The compute ceiling: the wide & deep MLP's matrix products alone.
    Compute,
    /// (2) Dense push then pull through in-process servers over loopback gRPC.
    Dense,
    /// (3) Steps per second of a model of many small tensors.
    Small,
    /// (4) Sparse pull and push of random ids in a large table.
    Sparse,
    /// (5) Optimizer updates: the kernel alone and the server's apply of a two-worker step.
    Update,
    /// (6) Wide & deep training through `gradflow launch`'s local backend vs one process.
    Training,
    /// (7) Zipf-distributed raw ids through one server's table, with and without a row cap.
    Embedding,
    /// (8) `gradflow serve` over loopback HTTP against the same forward pass in process.
    Serve,
    /// (9) The data readers, each format local and from S3, against pyarrow.
    Data,
}

impl Scenario {
    /// Every scenario, in the order they run and print.
    pub const ALL: [Scenario; 10] = [
        Scenario::Ceiling,
        Scenario::Compute,
        Scenario::Dense,
        Scenario::Small,
        Scenario::Sparse,
        Scenario::Update,
        Scenario::Training,
        Scenario::Embedding,
        Scenario::Serve,
        Scenario::Data,
    ];

    /// The name used on the command line and in the JSON report.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Ceiling => "ceiling",
            Scenario::Compute => "compute",
            Scenario::Dense => "dense",
            Scenario::Small => "small",
            Scenario::Sparse => "sparse",
            Scenario::Update => "update",
            Scenario::Training => "training",
            Scenario::Embedding => "embedding",
            Scenario::Serve => "serve",
            Scenario::Data => "data",
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scenario {
    type Err = BenchError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scenario::ALL.into_iter().find(|sc| sc.name() == s.trim()).ok_or_else(|| {
            let names: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
            BenchError::Config(format!("unknown scenario `{s}`; expected one of {}", names.join(", ")))
        })
    }
}

/// Everything `gradflow bench` can be told. `BenchConfig::default()` is the full run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BenchConfig {
    /// Scenarios to run; empty (default) runs all. The ceiling is measured whenever a chosen
    /// scenario reports a ratio to it (dense, sparse, update).
    pub only: Vec<Scenario>,
    /// (1) The ceilings.
    pub ceiling: CeilingConfig,
    /// (1b) The compute ceiling (also measured for the training scenario's ratios).
    pub compute: crate::compute::ComputeConfig,
    /// (2) Dense exchange.
    pub dense: DenseConfig,
    /// (3) Small tensors.
    pub small: SmallConfig,
    /// (4) Sparse exchange.
    pub sparse: SparseConfig,
    /// (5) Optimizer updates.
    pub update: UpdateConfig,
    /// (6) Training.
    pub training: TrainingConfig,
    /// (7) Embedding tables at scale.
    pub embedding: EmbeddingConfig,
    /// (8) Serving.
    pub serve: ServeBenchConfig,
    /// (9) Data readers.
    pub data: DataBenchConfig,
}

/// (9) The data readers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataBenchConfig {
    /// Rows of every file (synthetic click-through rows, 13 dense and 26 categorical
    /// columns). Default 200,000.
    pub rows: u64,
    /// Rows per batch. Default 256.
    pub batch_size: usize,
    /// Rows per Parquet row group. Default 100,000 (`gradflow data convert`'s).
    pub row_group_rows: usize,
    /// Timed reads of each file, after one warm-up read. Default 3.
    pub reps: usize,
    /// Read the files from `s3s-fs` on loopback too, when it is on `PATH`. Default true.
    pub s3: bool,
    /// The Python that runs pyarrow on the Parquet file; `""` skips it. Default `"python3"`.
    pub python: String,
}

impl Default for DataBenchConfig {
    fn default() -> Self {
        DataBenchConfig {
            rows: 200_000,
            batch_size: 256,
            row_group_rows: 100_000,
            reps: 3,
            s3: true,
            python: "python3".into(),
        }
    }
}

/// (8) `gradflow serve` over loopback HTTP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeBenchConfig {
    /// Rows per sparse table of the served model (random ids below 1M). Default 200,000.
    pub table_rows: u64,
    /// Requests of one row, one after the other (after 10 warm-ups). Default 3000.
    pub requests_batch_1: usize,
    /// Rows per request of the throughput measure. Default 256.
    pub batch_rows: usize,
    /// Requests of `batch_rows` rows. Default 300.
    pub requests_batch: usize,
}

impl Default for ServeBenchConfig {
    fn default() -> Self {
        ServeBenchConfig { table_rows: 200_000, requests_batch_1: 3000, batch_rows: 256, requests_batch: 300 }
    }
}

/// (1) Raw TCP over loopback and memory-copy bandwidth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CeilingConfig {
    /// Bytes sent per timed repetition. Default 1 GiB.
    pub tcp_bytes: u64,
    /// Size of each `write` call. Default 4 MiB (the dense chunk size).
    pub tcp_write_bytes: usize,
    /// The second TCP measure sends from and receives into buffers of this size, going
    /// through them in turn, as a model's tensors are sent from and pulled into memory; the
    /// first sends one `tcp_write_bytes` block again and again into a buffer as large, both of
    /// which stay in the processor's cache. Default 256 MiB (far beyond any cache).
    pub tcp_memory_bytes: usize,
    /// Size of the buffer copied. Default 256 MiB (far beyond any cache).
    pub memcpy_bytes: usize,
    /// Timed repetitions of each measure (after one warm-up); the median is reported.
    /// Default 5.
    pub reps: usize,
}

/// (2) Dense push then pull.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DenseConfig {
    /// Total model sizes, in bytes. Default 4 MiB, 64 MiB and 512 MiB.
    pub model_bytes: Vec<u64>,
    /// Equal tensors the model is made of. Default 4.
    pub tensors: usize,
    /// Server shard counts. Default 1, 2 and 4.
    pub shards: Vec<u32>,
    /// Worker counts. Default 1 and 2.
    pub workers: Vec<u32>,
    /// Timed repetitions per configuration: as many as fit in `rep_budget_seconds` after one
    /// warm-up, clamped to `min_reps..=max_reps`. Defaults 3 and 10.
    pub min_reps: usize,
    pub max_reps: usize,
    /// Time aimed at per configuration. Default 2.5 s.
    pub rep_budget_seconds: f64,
}

/// (3) A model of many small tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmallConfig {
    /// Number of tensors. Default 1000.
    pub tensors: usize,
    /// Smallest and largest tensor, in bytes; sizes are uniform in between. Defaults 1 KiB
    /// and 64 KiB.
    pub min_bytes: u64,
    pub max_bytes: u64,
    /// Server shard counts. Default 1 and 4.
    pub shards: Vec<u32>,
    /// Timed steps per shard count (after 3 warm-up steps); the median step is reported.
    /// Default 30.
    pub steps: usize,
    /// Seed of the tensor sizes. Default 1.
    pub seed: u64,
}

/// (4) Sparse pull and push.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SparseConfig {
    /// Rows in the table, created on the server before timing. Default 10,000,000.
    pub table_rows: u64,
    /// Random ids (uniform over the table) per pull and per push. Default 10,000.
    pub ids: usize,
    /// Row widths, in floats. Default 16 and 64.
    pub dims: Vec<u32>,
    /// Server shard counts. Default 1.
    pub shards: Vec<u32>,
    /// Timed pulls and pushes (after 2 warm-ups each); the medians are reported. Default 15.
    pub reps: usize,
    /// Seed of the ids. Default 7.
    pub seed: u64,
}

/// (5) Optimizer updates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpdateConfig {
    /// Parameters updated, in floats. Default 32 Mi (128 MiB of parameters).
    pub params: usize,
    /// Timed repetitions (after one warm-up); the median is reported. Default 5.
    pub reps: usize,
}

/// (6) Training the wide & deep headline model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingConfig {
    /// Synthetic training rows; every run trains one epoch over them. Default 300,000.
    pub rows: u64,
    /// Worker counts. Default 1, 2 and 4.
    pub workers: Vec<u32>,
    /// Modes. Default sync and async.
    pub modes: Vec<Mode>,
    /// Parameter-server shards of every job. Default 1.
    pub servers: u32,
    /// Examples per step per worker. Default 256.
    pub batch_size: usize,
    /// Steps per progress report (and per timing window of the single-process baseline).
    /// The first window of every worker is a warm-up and is not counted. Default 10.
    pub log_every_steps: u64,
    /// `[transport] compression` of each job; every configuration runs once per entry.
    /// Default `["none"]`.
    pub compression: Vec<Compression>,
}

/// (7) Embedding tables at production scale: Zipf-distributed raw ids through one server's
/// table, with eviction (a row cap) and without.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddingConfig {
    /// Distinct ids that can be drawn (Zipf ranks, each scrambled into a raw 64-bit id).
    /// Default 50,000,000.
    pub vocabulary: u64,
    /// Zipf exponent: rank `r` has weight `(r + 1)^-s`. Default 1.05.
    pub zipf_exponent: f64,
    /// Ids drawn per push (duplicates within a push are sent once). Default 8192.
    pub batch_ids: usize,
    /// Pushes of each run (eviction on, then off; the same ids). Default 6000 (about 49
    /// million ids drawn, about 6 million distinct; about 25 s on 2 cores).
    pub pushes: usize,
    /// Row cap of the eviction-on run (`[embedding] max_rows`). Default 2,000,000.
    pub max_rows: u64,
    /// Floats per row. Default 16.
    pub dim: u32,
    /// Seed of the ids and of the rows' initializer. Default 11.
    pub seed: u64,
}

impl Default for EmbeddingConfig {
    fn default() -> Self {
        EmbeddingConfig {
            vocabulary: 50_000_000,
            zipf_exponent: 1.05,
            batch_ids: 8192,
            pushes: 6000,
            max_rows: 2_000_000,
            dim: 16,
            seed: 11,
        }
    }
}

impl EmbeddingConfig {
    /// A vocabulary and cap small enough for tests, still drawing more distinct ids than the
    /// cap so that eviction runs.
    pub fn quick() -> EmbeddingConfig {
        EmbeddingConfig {
            vocabulary: 200_000,
            batch_ids: 1024,
            pushes: 30,
            max_rows: 5000,
            ..EmbeddingConfig::default()
        }
    }
}

impl Default for CeilingConfig {
    fn default() -> Self {
        CeilingConfig {
            tcp_bytes: 1 << 30,
            tcp_write_bytes: 4 << 20,
            tcp_memory_bytes: 256 << 20,
            memcpy_bytes: 256 << 20,
            reps: 5,
        }
    }
}

impl Default for DenseConfig {
    fn default() -> Self {
        DenseConfig {
            model_bytes: vec![4 * MIB, 64 * MIB, 512 * MIB],
            tensors: 4,
            shards: vec![1, 2, 4],
            workers: vec![1, 2],
            min_reps: 3,
            max_reps: 10,
            rep_budget_seconds: 2.5,
        }
    }
}

impl Default for SmallConfig {
    fn default() -> Self {
        SmallConfig {
            tensors: 1000,
            min_bytes: 1024,
            max_bytes: 64 * 1024,
            shards: vec![1, 4],
            steps: 30,
            seed: 1,
        }
    }
}

impl Default for SparseConfig {
    fn default() -> Self {
        SparseConfig {
            table_rows: 10_000_000,
            ids: 10_000,
            dims: vec![16, 64],
            shards: vec![1],
            reps: 15,
            seed: 7,
        }
    }
}

impl Default for UpdateConfig {
    fn default() -> Self {
        UpdateConfig { params: 32 << 20, reps: 5 }
    }
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            rows: 300_000,
            workers: vec![1, 2, 4],
            modes: vec![Mode::Sync, Mode::Async],
            servers: 1,
            batch_size: 256,
            log_every_steps: 10,
            compression: vec![Compression::None],
        }
    }
}

impl BenchConfig {
    /// Small sizes and few repetitions: every section in a few seconds, even in a debug build.
    /// The numbers say little; the point is that every path runs.
    pub fn quick() -> BenchConfig {
        BenchConfig {
            only: Vec::new(),
            ceiling: CeilingConfig {
                tcp_bytes: 64 * MIB,
                tcp_write_bytes: 1 << 20,
                tcp_memory_bytes: 16 << 20,
                memcpy_bytes: 16 << 20,
                reps: 3,
            },
            dense: DenseConfig {
                model_bytes: vec![4 * MIB],
                tensors: 4,
                shards: vec![1, 2],
                workers: vec![1, 2],
                min_reps: 2,
                max_reps: 3,
                rep_budget_seconds: 0.3,
            },
            small: SmallConfig { tensors: 100, shards: vec![1], steps: 5, ..SmallConfig::default() },
            sparse: SparseConfig {
                table_rows: 50_000,
                ids: 1000,
                dims: vec![16],
                shards: vec![1],
                reps: 3,
                seed: 7,
            },
            update: UpdateConfig { params: 1 << 20, reps: 3 },
            training: TrainingConfig {
                rows: 6_000,
                workers: vec![2],
                modes: vec![Mode::Sync],
                servers: 1,
                batch_size: 256,
                log_every_steps: 2,
                compression: vec![Compression::None],
            },
            embedding: EmbeddingConfig::quick(),
            compute: crate::compute::ComputeConfig::quick(),
            serve: ServeBenchConfig {
                table_rows: 5000,
                requests_batch_1: 50,
                batch_rows: 64,
                requests_batch: 10,
            },
            data: DataBenchConfig { rows: 3000, row_group_rows: 1000, reps: 1, ..DataBenchConfig::default() },
        }
    }

    /// Whether `scenario` is to run.
    pub fn runs(&self, scenario: Scenario) -> bool {
        self.only.is_empty() || self.only.contains(&scenario)
    }

    /// Checks the settings; the message names the field.
    pub fn validate(&self) -> Result<(), BenchError> {
        let bad = |m: String| Err(BenchError::Config(m));
        let c = &self.ceiling;
        if c.reps == 0 || c.tcp_bytes == 0 || c.tcp_write_bytes == 0 || c.memcpy_bytes < 1024 {
            return bad(
                "ceiling: reps, tcp_bytes and tcp_write_bytes must be positive, memcpy_bytes at least 1024"
                    .into(),
            );
        }
        if c.tcp_memory_bytes < c.tcp_write_bytes {
            return bad(format!(
                "ceiling: tcp_memory_bytes ({}) must be at least tcp_write_bytes ({})",
                c.tcp_memory_bytes, c.tcp_write_bytes
            ));
        }
        self.compute.validate()?;
        let d = &self.dense;
        if d.tensors == 0 || d.min_reps == 0 || d.max_reps < d.min_reps {
            return bad("dense: tensors and min_reps must be positive and max_reps >= min_reps".into());
        }
        if let Some(b) = d.model_bytes.iter().find(|&&b| b < 4 * d.tensors as u64) {
            return bad(format!("dense.model_bytes: {b} is less than one float per tensor"));
        }
        let s = &self.small;
        if s.tensors == 0 || s.steps == 0 || s.min_bytes < 4 || s.max_bytes < s.min_bytes {
            return bad("small: tensors and steps must be positive, 4 <= min_bytes <= max_bytes".into());
        }
        let sp = &self.sparse;
        if sp.table_rows == 0 || sp.ids == 0 || sp.reps == 0 || sp.dims.contains(&0) {
            return bad("sparse: table_rows, ids, reps and every dim must be positive".into());
        }
        if self.update.params == 0 || self.update.reps == 0 {
            return bad("update: params and reps must be positive".into());
        }
        let t = &self.training;
        if t.rows == 0 || t.servers == 0 || t.batch_size == 0 || t.log_every_steps == 0 {
            return bad("training: rows, servers, batch_size and log_every_steps must be positive".into());
        }
        if t.compression.is_empty() {
            return bad("training.compression: give at least one (\"none\", \"f16\", \"bf16\")".into());
        }
        let da = &self.data;
        if da.rows == 0 || da.batch_size == 0 || da.row_group_rows == 0 || da.reps == 0 {
            return bad("data: rows, batch_size, row_group_rows and reps must be positive".into());
        }
        let e = &self.embedding;
        if e.vocabulary == 0 || e.batch_ids == 0 || e.pushes == 0 || e.dim == 0 {
            return bad("embedding: vocabulary, batch_ids, pushes and dim must be positive".into());
        }
        if !(e.zipf_exponent.is_finite() && e.zipf_exponent > 0.0) {
            return bad(format!("embedding.zipf_exponent: {} must be above 0", e.zipf_exponent));
        }
        if e.max_rows < 32 {
            return bad(format!(
                "embedding.max_rows: {} must be at least 32 (one row per stripe)",
                e.max_rows
            ));
        }
        let sv = &self.serve;
        if sv.table_rows == 0 || sv.requests_batch_1 == 0 || sv.batch_rows == 0 || sv.requests_batch == 0 {
            return bad(
                "serve: table_rows, requests_batch_1, batch_rows and requests_batch must be positive".into(),
            );
        }
        for (name, counts) in [
            ("dense.shards", &d.shards),
            ("dense.workers", &d.workers),
            ("small.shards", &s.shards),
            ("sparse.shards", &sp.shards),
            ("training.workers", &t.workers),
        ] {
            if counts.contains(&0) {
                return bad(format!("{name}: counts must be at least 1"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_parse_by_name() {
        assert_eq!("sparse".parse::<Scenario>().unwrap(), Scenario::Sparse);
        assert_eq!("embedding".parse::<Scenario>().unwrap(), Scenario::Embedding);
        let e = "nope".parse::<Scenario>().unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("ceiling"), "{e}");
    }

    #[test]
    fn defaults_and_quick_validate_and_round_trip() {
        for c in [BenchConfig::default(), BenchConfig::quick()] {
            c.validate().unwrap();
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<BenchConfig>(&json).unwrap(), c);
        }
        let partial: BenchConfig = serde_json::from_str(r#"{"sparse": {"ids": 5}}"#).unwrap();
        assert_eq!(partial.sparse.ids, 5);
        assert_eq!(partial.sparse.table_rows, 10_000_000);
        assert!(serde_json::from_str::<BenchConfig>(r#"{"sparse": {"idz": 5}}"#).is_err());
        let bad = BenchConfig {
            embedding: EmbeddingConfig { max_rows: 31, ..EmbeddingConfig::quick() },
            ..BenchConfig::quick()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("embedding.max_rows"));
    }

    #[test]
    fn only_selects() {
        let c = BenchConfig { only: vec![Scenario::Dense], ..BenchConfig::quick() };
        assert!(c.runs(Scenario::Dense) && !c.runs(Scenario::Sparse));
        assert!(BenchConfig::quick().runs(Scenario::Training));
    }
}
