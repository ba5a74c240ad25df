//! The result of a run: [`Report`] serializes to the one JSON object `gradflow bench` prints
//! (and writes with `--json`), and renders as the table it prints ([`Report::table`], Markdown
//! pipe tables, so the same text reads in a terminal and pastes into docs/performance.md).
//!
//! A section that did not run is absent from the JSON and from the table. [`Target`]s compare
//! the ratios the issue set goals for with their thresholds.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::ceiling::CeilingReport;
use crate::dense::DenseReport;
use crate::embedding::{EmbeddingReport, EmbeddingRun};
use crate::small::SmallReport;
use crate::sparse::SparseReport;
use crate::stats::human_bytes;
use crate::training::TrainingReport;
use crate::update::UpdateReport;
use crate::{BenchConfig, Scenario};

/// Version of the JSON layout; bumped when a field changes meaning or goes away.
pub const REPORT_VERSION: u32 = 1;

/// Everything one run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub version: u32,
    pub machine: Machine,
    pub config: BenchConfig,
    /// Wall time of the whole run, seconds.
    pub elapsed_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceiling: Option<CeilingReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute: Option<crate::compute::ComputeReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dense: Option<DenseReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub small: Option<SmallReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparse: Option<SparseReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding: Option<EmbeddingReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serve: Option<crate::serve::ServeReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<crate::data::DataReport>,
    /// The issue's goals that this run has the numbers for.
    pub targets: Vec<Target>,
}

/// The machine the numbers come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub cores: usize,
    /// `model name` of /proc/cpuinfo, when there is one.
    pub cpu: Option<String>,
    /// MemTotal of /proc/meminfo, GiB.
    pub memory_gib: Option<f64>,
    pub os: String,
    pub arch: String,
    /// 1-minute load average when the run started (/proc/loadavg): well above 0, other work
    /// was competing for the cores and the numbers are noisy.
    pub load_average: Option<f64>,
}

impl Machine {
    /// This machine.
    pub fn detect() -> Machine {
        let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        });
        let memory_gib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
            let kib: f64 =
                s.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
            Some((kib / (1 << 20) as f64 * 10.0).round() / 10.0)
        });
        let load_average = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()));
        Machine {
            load_average,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu,
            memory_gib,
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
        }
    }
}

/// One goal of the issue: a ratio that must reach `threshold` (and should reach `aim`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    pub value: f64,
    pub threshold: f64,
    pub aim: Option<f64>,
    pub met: bool,
}

impl Report {
    /// Which goals this report has numbers for, and whether they are met.
    pub fn compute_targets(&self) -> Vec<Target> {
        let mut out = Vec::new();
        let mut push = |name: String, value: Option<f64>, threshold: f64, aim: Option<f64>| {
            if let Some(value) = value {
                out.push(Target { name, value, threshold, aim, met: value >= threshold });
            }
        };
        if let Some(d) = &self.dense {
            // Issue 19 asks 80% at 64 MiB; 512 MiB keeps the first round's 50% (aim 80%).
            for (bytes, threshold) in [(64u64 << 20, 0.8), (512 << 20, 0.5)] {
                let row = d.rows.iter().find(|r| r.model_bytes == bytes && r.shards == 1 && r.workers == 1);
                push(
                    format!(
                        "dense push+pull {}, 1 shard, 1 worker / raw TCP loopback (in the cache)",
                        human_bytes(bytes)
                    ),
                    row.and_then(|r| r.ratio_to_tcp),
                    threshold,
                    (threshold < 0.8).then_some(0.8),
                );
            }
        }
        if let Some(u) = &self.update {
            for r in &u.rows {
                push(
                    format!("{} server apply / memcpy (all threads)", r.optimizer),
                    r.apply_ratio_to_memcpy,
                    0.5,
                    None,
                );
            }
        }
        if let Some(v) = &self.serve {
            let one = v.rows.iter().find(|r| r.path == "http" && r.batch_rows == 1);
            push(
                "serve p99 at batch 1 over loopback HTTP: 1 ms / p99".into(),
                one.map(|r| 1000.0 / r.p99_us.max(1e-9)),
                1.0,
                None,
            );
        }
        let worker = self.two_worker_sync_run().map(|r| r.per_worker_samples_per_sec);
        if let (Some(d), Some(worker)) = (&self.data, worker) {
            let csv = d.readers.iter().find(|r| r.format == "csv" && r.source == "local");
            push(
                "a wide&deep worker's time not spent reading its CSV (2 workers sync, 1 shard)".into(),
                csv.map(|r| 1.0 - worker / r.rows_per_sec.max(1e-9)),
                2.0 / 3.0,
                None,
            );
        }
        if let Some(t) = &self.training {
            push(
                "wide&deep one process, all threads / compute ceiling (all threads)".into(),
                t.single_process.ratio_to_compute,
                0.6,
                None,
            );
            push(
                "wide&deep 2 workers sync 1 shard / single process, per core".into(),
                self.two_worker_sync_run().map(|r| r.ratio_to_single),
                0.85,
                None,
            );
            push(
                "wide&deep 2 workers async 1 shard / single process, per core".into(),
                self.two_worker_run(gradflow_core::Mode::Async).map(|r| r.ratio_to_single),
                0.9,
                None,
            );
            // The job's training time over its wall time: at least 1 / 1.5 when the whole job
            // (start, read, train, stop) takes at most 1.5 times its training time.
            push(
                "wide&deep 2 workers sync, end-to-end rate / steady rate (job <= 1.5x its training time)"
                    .into(),
                self.two_worker_sync_run()
                    .map(|r| r.end_to_end_samples_per_sec / r.samples_per_sec.max(1e-9)),
                1.0 / 1.5,
                None,
            );
        }
        out
    }

    /// The training run most targets read: 2 sync workers, 1 server, no compression.
    fn two_worker_sync_run(&self) -> Option<&crate::training::TrainingRun> {
        self.two_worker_run(gradflow_core::Mode::Sync)
    }

    /// 2 workers in `mode`, 1 server, no compression.
    fn two_worker_run(&self, mode: gradflow_core::Mode) -> Option<&crate::training::TrainingRun> {
        self.training.as_ref()?.runs.iter().find(|r| {
            r.workers == 2
                && r.servers == 1
                && r.mode == mode
                && r.compression == gradflow_proto::Compression::None
        })
    }

    /// The table `gradflow bench` prints: one Markdown section per scenario that ran, then the
    /// targets.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(
            s,
            "gradflow bench: {} cores{}{}, {} {}; {:.0} s{}\n",
            m.cores,
            m.cpu.as_deref().map(|c| format!(", {c}")).unwrap_or_default(),
            m.memory_gib.map(|g| format!(", {g} GiB")).unwrap_or_default(),
            m.os,
            m.arch,
            self.elapsed_s,
            m.load_average.map(|l| format!("; load average {l} at start")).unwrap_or_default()
        );
        if let Some(c) = &self.ceiling {
            let _ = writeln!(s, "## 1. Ceiling\n\n| measure | GB/s |\n|---|---:|");
            let _ = writeln!(
                s,
                "| raw TCP loopback, 2 processes ({} per rep, {} writes), in the cache | {} |",
                human_bytes(c.tcp_bytes),
                human_bytes(c.tcp_write_bytes as u64),
                num(c.tcp_gb_per_s)
            );
            let _ = writeln!(
                s,
                "| raw TCP loopback, 2 processes, memory to memory ({} buffers) | {} |",
                human_bytes(c.tcp_memory_bytes as u64),
                num(c.tcp_memory_gb_per_s)
            );
            let _ = writeln!(
                s,
                "| memcpy, 1 thread ({}) | {} |",
                human_bytes(c.memcpy_bytes as u64),
                num(c.memcpy_gb_per_s)
            );
            let _ =
                writeln!(s, "| memcpy, {} threads | {} |\n", c.threads, num(c.memcpy_all_threads_gb_per_s));
        }
        if let Some(c) = &self.compute {
            let _ = writeln!(
                s,
                "## 1b. Compute ceiling (wide & deep MLP {}, batch {}: forward and backward matrix products, {} flop per sample)\n\n\
                 | kernel | products, 1 thread | products, {t} threads | model forward_backward, 1 thread | model forward_backward, {t} threads |\n\
                 |---|---:|---:|---:|---:|",
                mlp_shape(&c.layers),
                c.batch_size,
                thousands(c.flops_per_sample),
                t = c.threads
            );
            for r in &c.kernels {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} |",
                    r.kernel.name(),
                    num(r.products_samples_per_sec),
                    num(r.products_all_threads_samples_per_sec),
                    num(r.model_samples_per_sec),
                    num(r.model_all_threads_samples_per_sec)
                );
            }
            let _ = writeln!(
                s,
                "\nsamples/s. Ceiling: {} on 1 thread ({}, {:.1} GFLOP/s), {} on {} threads ({}).\n",
                num(c.ceiling_samples_per_sec),
                c.ceiling_kernel.name(),
                c.ceiling_samples_per_sec * c.flops_per_sample / 1e9,
                num(c.ceiling_all_threads_samples_per_sec),
                c.threads,
                c.ceiling_all_threads_kernel.name()
            );
        }
        if let Some(d) = &self.dense {
            let _ = writeln!(
                s,
                "## 2. Dense push + pull (sync, SGD, in-process servers, tensor link over loopback)\n\n\
                 | model | shards | workers | GB/s | vs TCP | vs TCP memory to memory | push GB/s | pull GB/s | step ms |\n\
                 |---|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            for r in &d.rows {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    human_bytes(r.model_bytes),
                    r.shards,
                    r.workers,
                    num(r.gb_per_s),
                    pct(r.ratio_to_tcp),
                    pct(r.ratio_to_tcp_memory),
                    num(r.push_gb_per_s),
                    num(r.pull_gb_per_s),
                    num(r.step.median_s * 1e3)
                );
            }
            s.push('\n');
        }
        if let Some(sm) = &self.small {
            let _ = writeln!(
                s,
                "## 3. Small tensors ({} tensors, {} in all, 1 worker)\n\n\
                 | shards | steps/s | MB/s | step ms |\n|---:|---:|---:|---:|",
                sm.tensors,
                human_bytes(sm.model_bytes)
            );
            for r in &sm.rows {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} |",
                    r.shards,
                    num(r.steps_per_sec),
                    num(r.mb_per_s),
                    num(r.step.median_s * 1e3)
                );
            }
            s.push('\n');
        }
        if let Some(sp) = &self.sparse {
            let _ = writeln!(
                s,
                "## 4. Sparse ({} random ids per call, table of {} rows, Adagrad, 1 worker)\n\n\
                 | dim | shards | pull rows/s | push rows/s | pull ms | push ms |\n|---:|---:|---:|---:|---:|---:|",
                thousands(sp.ids as f64),
                thousands(sp.table_rows as f64)
            );
            for r in &sp.rows {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} |",
                    r.dim,
                    r.shards,
                    num(r.pull_rows_per_sec),
                    num(r.push_rows_per_sec),
                    num(r.pull.median_s * 1e3),
                    num(r.push.median_s * 1e3)
                );
            }
            s.push('\n');
        }
        if let Some(u) = &self.update {
            let threads = self.ceiling.as_ref().map_or("all".to_string(), |c| c.threads.to_string());
            let _ = writeln!(
                s,
                "## 5. Server update ({} parameters, GB/s of parameters)\n\n\
                 | optimizer | kernel, 1 thread | vs memcpy 1 thread | server apply, {threads} threads | vs memcpy {threads} threads | taking 2 pushes, ms |\n\
                 |---|---:|---:|---:|---:|---:|",
                human_bytes(u.params as u64 * 4)
            );
            for r in &u.rows {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} |",
                    r.optimizer,
                    num(r.kernel_gb_per_s),
                    pct(r.kernel_ratio_to_memcpy),
                    num(r.apply_gb_per_s),
                    pct(r.apply_ratio_to_memcpy),
                    num(r.aggregate.median_s * 1e3)
                );
            }
            s.push('\n');
        }
        if let Some(t) = &self.training {
            let _ = writeln!(
                s,
                "## 6. Training (wide & deep, {} rows, batch {}, {} cores shared by all processes)\n\n\
                 | run | samples/s | per worker | vs single process | vs compute ceiling | end to end | wall s | loopback bytes per sample |\n\
                 |---|---:|---:|---:|---:|---:|---:|---:|",
                thousands(t.rows as f64),
                t.batch_size,
                t.cores
            );
            let sp = &t.single_process;
            let _ = writeln!(
                s,
                "| single process, {} threads, no servers | {} | | 100% | {} | | | |",
                sp.threads,
                num(sp.samples_per_sec),
                pct(sp.ratio_to_compute)
            );
            let _ = writeln!(
                s,
                "| single process, 1 thread, no servers | {} | | {} | {} (1 thread) | | | |",
                num(sp.one_thread_samples_per_sec),
                pct(Some(sp.one_thread_samples_per_sec / sp.samples_per_sec)),
                pct(sp.one_thread_ratio_to_compute)
            );
            for r in &t.runs {
                let _ = writeln!(
                    s,
                    "| {} worker(s) {}, {} server(s){} | {} | {} | {} | {} | {} | {} | {} |",
                    r.workers,
                    r.mode,
                    r.servers,
                    match r.compression {
                        gradflow_proto::Compression::None => String::new(),
                        c => format!(", compression {}", c.name()),
                    },
                    num(r.samples_per_sec),
                    num(r.per_worker_samples_per_sec),
                    pct(Some(r.ratio_to_single)),
                    pct(r.ratio_to_compute),
                    num(r.end_to_end_samples_per_sec),
                    num(r.wall_s),
                    r.loopback_bytes_per_sample.map_or("-".to_string(), num)
                );
            }
            s.push('\n');
        }
        if let Some(e) = &self.embedding {
            let _ = writeln!(
                s,
                "## 7. Embedding ({} pushes of {} Zipf({}) raw ids from a vocabulary of {}, dim {}, Adagrad, 1 server)\n\n\
                 {} ids drawn, {} distinct, {} unique ids (rows pulled and pushed) per push on average.\n\n\
                 | run | rows/s (pull+push) | pull rows/s | push rows/s | push ms (median / max) | rows at the end | evicted | table bytes | RSS growth | RSS / table bytes |\n\
                 |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                thousands(e.pushes as f64),
                thousands(e.batch_ids as f64),
                e.zipf_exponent,
                thousands(e.vocabulary as f64),
                e.dim,
                thousands(e.ids_drawn as f64),
                thousands(e.distinct_ids as f64),
                thousands(e.rows_per_push)
            );
            let run_line = |name: String, r: &EmbeddingRun| {
                format!(
                    "| {name} | {} | {} | {} | {} / {} | {} | {} | {} | {} | {} |",
                    num(r.rows_per_sec),
                    num(r.pull_rows_per_sec),
                    num(r.push_rows_per_sec),
                    num(r.step.median_s * 1e3),
                    num(r.step.max_s * 1e3),
                    thousands(r.rows as f64),
                    thousands(r.evicted as f64),
                    human_bytes(r.table_bytes),
                    r.rss_growth_bytes.map(human_bytes).unwrap_or_default(),
                    r.rss_ratio_to_table_bytes.map(|x| format!("{x:.2}x")).unwrap_or_default()
                )
            };
            let _ = writeln!(
                s,
                "{}",
                run_line(format!("eviction on, max_rows {}", thousands(e.max_rows as f64)), &e.eviction_on)
            );
            let _ = writeln!(s, "{}", run_line("eviction off".into(), &e.eviction_off));
            let ratio = |x: Option<f64>| x.map(|x| format!("{x:.2}x")).unwrap_or_else(|| "n/a".into());
            let _ = writeln!(
                s,
                "\n| measure | value | goal |\n|---|---:|---:|\n\
                 | RSS growth (eviction on) / cap's bytes ({} rows x {} B = {}) | {} | at most 1.3x |\n\
                 | row bytes as the table counts them / raw floats ({} B / {} B) | {:.3}x | at most 1.25x |\n\
                 | resident bytes per row (eviction on: RSS growth / rows) / raw floats | {} ({} B) | at most 1.25x |\n\
                 | rows/s eviction on / off | {:.2}x | |\n",
                thousands(e.max_rows as f64),
                e.row_bytes,
                human_bytes(e.cap_bytes),
                ratio(e.rss_ratio_to_cap_bytes),
                e.row_bytes,
                e.raw_row_bytes,
                e.row_bytes_ratio,
                ratio(e.rss_row_ratio_to_raw),
                e.rss_bytes_per_row.map(num).unwrap_or_else(|| "n/a".into()),
                e.on_vs_off
            );
        }
        if let Some(v) = &self.serve {
            let _ = writeln!(
                s,
                "## 8. Serving (wide & deep headline model, {} rows per table; one client, requests one after the other)\n\n\
                 | path | rows per request | requests | p50 us | p99 us | rows/s |\n|---|---:|---:|---:|---:|---:|",
                thousands(v.table_rows as f64)
            );
            for r in &v.rows {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} |",
                    r.path,
                    r.batch_rows,
                    r.requests,
                    num(r.p50_us),
                    num(r.p99_us),
                    num(r.rows_per_sec)
                );
            }
            s.push('\n');
        }
        if let Some(d) = &self.data {
            let worker = self.two_worker_sync_run().map(|r| r.per_worker_samples_per_sec);
            let _ = writeln!(
                s,
                "## 9. Data readers ({} rows of 13 dense and 26 categorical columns, batches of {}, one reader thread)\n\n\
                 | format | from | file | rows/s | rows per CPU second | a worker's time reading it{} |\n|---|---|---:|---:|---:|---:|",
                thousands(d.rows as f64),
                d.batch_size,
                worker.map(|w| format!(" (at {} samples/s)", num(w))).unwrap_or_default()
            );
            for r in &d.readers {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} |",
                    r.format,
                    r.source,
                    human_bytes(r.file_bytes),
                    num(r.rows_per_sec),
                    r.rows_per_cpu_sec.map_or("-".to_string(), num),
                    worker.map_or("-".to_string(), |w| pct(Some(w / r.rows_per_sec.max(1e-9))))
                );
            }
            if let Some(p) = &d.pyarrow {
                let _ = writeln!(
                    s,
                    "| parquet, pyarrow {} `iter_batches`, 1 thread, decode only | local | | {} | {} | |\n\
                     | parquet, pyarrow {} `read_table`, all threads, decode only | local | | {} | | |\n\n\
                     gradflow's Parquet reader / pyarrow's `iter_batches`: {:.2}x in rows/s, {} in rows per CPU second",
                    p.version,
                    num(p.batches_rows_per_sec),
                    num(p.batches_rows_per_cpu_sec),
                    p.version,
                    num(p.table_rows_per_sec),
                    p.gradflow_vs_batches,
                    p.gradflow_vs_batches_cpu.map_or("-".to_string(), |r| format!("{r:.2}x"))
                );
            }
            for why in &d.skipped {
                let _ = writeln!(s, "\nnot measured: {why}");
            }
            s.push('\n');
        }
        if !self.targets.is_empty() {
            let _ =
                writeln!(s, "## Targets\n\n| target | value | needs | aim | met |\n|---|---:|---:|---:|---|");
            for t in &self.targets {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} |",
                    t.name,
                    // One decimal, so that a value just under its threshold does not read
                    // as equal to it.
                    format!("{:.1}%", t.value * 100.0),
                    pct(Some(t.threshold)),
                    pct(t.aim),
                    if t.met { "yes" } else { "no" }
                );
            }
        }
        s
    }

    /// The scenarios this report has sections for.
    pub fn sections(&self) -> Vec<Scenario> {
        let mut out = Vec::new();
        for (present, sc) in [
            (self.ceiling.is_some(), Scenario::Ceiling),
            (self.compute.is_some(), Scenario::Compute),
            (self.dense.is_some(), Scenario::Dense),
            (self.small.is_some(), Scenario::Small),
            (self.sparse.is_some(), Scenario::Sparse),
            (self.update.is_some(), Scenario::Update),
            (self.training.is_some(), Scenario::Training),
            (self.embedding.is_some(), Scenario::Embedding),
            (self.serve.is_some(), Scenario::Serve),
            (self.data.is_some(), Scenario::Data),
        ] {
            if present {
                out.push(sc);
            }
        }
        out
    }
}

/// 3 significant digits below 1000, whole numbers with thousands separators above.
fn num(x: f64) -> String {
    if !x.is_finite() {
        return x.to_string();
    }
    if x.abs() >= 1000.0 {
        return thousands(x);
    }
    let digits = if x.abs() >= 100.0 {
        0
    } else if x.abs() >= 10.0 {
        1
    } else if x.abs() >= 1.0 {
        2
    } else {
        3
    };
    format!("{x:.digits$}")
}

/// `221-64-32-1`.
fn mlp_shape(layers: &[(usize, usize)]) -> String {
    let mut widths: Vec<String> = layers.first().map(|l| l.0.to_string()).into_iter().collect();
    widths.extend(layers.iter().map(|l| l.1.to_string()));
    widths.join("-")
}

fn thousands(x: f64) -> String {
    let s = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0.0 { format!("-{out}") } else { out }
}

fn pct(x: Option<f64>) -> String {
    x.map(|v| format!("{:.0}%", v * 100.0)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::training::{SingleProcess, TrainingRun};

    fn run(mode: gradflow_core::Mode, workers: u32, ratio: f64, end_to_end: f64) -> TrainingRun {
        TrainingRun {
            workers,
            servers: 1,
            mode,
            compression: gradflow_proto::Compression::None,
            loopback_bytes_per_sample: None,
            samples_per_sec: 100_000.0,
            per_worker_samples_per_sec: 100_000.0 / f64::from(workers),
            ratio_to_single: ratio,
            ratio_to_compute: None,
            end_to_end_samples_per_sec: end_to_end,
            wall_s: 3.0,
            samples: 300_000,
            reports_used: 10,
        }
    }

    #[test]
    fn the_training_targets_are_issue_19s_and_read_the_two_worker_runs() {
        use gradflow_core::Mode::{Async, Sync};
        let training = TrainingReport {
            rows: 300_000,
            batch_size: 256,
            cores: 2,
            single_process: SingleProcess {
                samples_per_sec: 200_000.0,
                threads: 2,
                one_thread_samples_per_sec: 150_000.0,
                ratio_to_compute: Some(0.61),
                one_thread_ratio_to_compute: None,
            },
            // Runs the targets must not read come first: 4 sync workers, 2 async workers with
            // compression.
            runs: vec![
                run(Sync, 4, 0.99, 99_000.0),
                TrainingRun { compression: gradflow_proto::Compression::F16, ..run(Async, 2, 0.99, 0.0) },
                run(Sync, 2, 0.84, 70_000.0),
                run(Async, 2, 0.91, 60_000.0),
            ],
        };
        let report = Report {
            version: REPORT_VERSION,
            machine: Machine::detect(),
            config: BenchConfig::default(),
            elapsed_s: 1.0,
            ceiling: None,
            compute: None,
            dense: None,
            small: None,
            sparse: None,
            update: None,
            training: Some(training),
            embedding: None,
            serve: None,
            data: None,
            targets: Vec::new(),
        };
        let got: Vec<(f64, f64, bool)> =
            report.compute_targets().iter().map(|t| (t.value, t.threshold, t.met)).collect();
        assert_eq!(
            got,
            vec![(0.61, 0.6, true), (0.84, 0.85, false), (0.91, 0.9, true), (0.7, 1.0 / 1.5, true)]
        );
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(num(1234567.8), "1,234,568");
        assert_eq!(num(4.567), "4.57");
        assert_eq!(num(45.67), "45.7");
        assert_eq!(num(0.01234), "0.012");
        assert_eq!(pct(Some(0.456)), "46%");
        assert_eq!(thousands(10_000_000.0), "10,000,000");
    }
}
