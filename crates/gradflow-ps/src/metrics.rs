//! Prometheus metrics of a shard, served as text on `GET /metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    pub table: String,
}

fn latency_histogram() -> Histogram {
    // 100µs .. ~50s
    Histogram::new(exponential_buckets(1e-4, 2.0, 20))
}

/// The shard's metrics; clones share the same values.
#[derive(Clone)]
pub struct Metrics {
    pub pushes: Family<ResultLabel, Counter>,
    pub pulls: Family<KindLabel, Counter>,
    pub push_seconds: Histogram,
    pub pull_seconds: Family<KindLabel, Histogram>,
    pub bytes_received: Counter,
    pub bytes_sent: Counter,
    pub steps: Counter,
    pub version: Gauge,
    pub live_workers: Gauge,
    pub sparse_rows: Gauge,
    /// Per sparse table (see `table::TableStats`): rows and their bytes, rows created
    /// (admitted) and evicted, and gradient rows dropped because their id was not admitted.
    pub table_rows: Family<TableLabel, Gauge>,
    pub table_bytes: Family<TableLabel, Gauge>,
    pub table_admitted: Family<TableLabel, Counter>,
    pub table_evicted: Family<TableLabel, Counter>,
    pub table_dropped: Family<TableLabel, Counter>,
    /// Tensor-link connections accepted (authenticated).
    pub link_connections: Counter,
    /// Tensor-link connections dropped before they authenticated: a wrong or missing token,
    /// a hello over its bound or one that did not decode, or no hello within the deadline.
    pub link_refused: Counter,
    /// Pushes refused because a gradient held NaN or infinity (`reject_non_finite`).
    pub non_finite_pushes: Counter,
    /// Checkpoints of this run that failed on this shard (see `Checkpointer::failures`).
    pub checkpoint_failures: Counter,
    /// The step of the last checkpoint this shard finished writing.
    pub checkpoint_step: Gauge,
    /// Running sums of push and pull latency, for means between two reads (see
    /// [`Metrics::latency`]); the histograms above keep no sum one can read.
    latency: Arc<[AtomicU64; 4]>,
    registry: Arc<Registry>,
}

/// Pushes and pulls taken so far and the time they took, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Latency {
    pub pushes: u64,
    pub push_seconds: f64,
    pub pulls: u64,
    pub pull_seconds: f64,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("gradflow_ps");
        let m = Metrics {
            pushes: Family::default(),
            pulls: Family::default(),
            push_seconds: latency_histogram(),
            pull_seconds: Family::new_with_constructor(latency_histogram),
            bytes_received: Counter::default(),
            bytes_sent: Counter::default(),
            steps: Counter::default(),
            version: Gauge::default(),
            live_workers: Gauge::default(),
            sparse_rows: Gauge::default(),
            table_rows: Family::default(),
            table_bytes: Family::default(),
            table_admitted: Family::default(),
            table_evicted: Family::default(),
            table_dropped: Family::default(),
            link_connections: Counter::default(),
            link_refused: Counter::default(),
            non_finite_pushes: Counter::default(),
            checkpoint_failures: Counter::default(),
            checkpoint_step: Gauge::default(),
            latency: Arc::new(Default::default()),
            registry: Arc::new(Registry::default()),
        };
        registry.register("pushes", "Gradient pushes, by result (ok or refused)", m.pushes.clone());
        registry.register("pulls", "Parameter pulls, by kind (dense or sparse)", m.pulls.clone());
        registry.register("push_seconds", "Time to receive, check and take a push", m.push_seconds.clone());
        registry.register("pull_seconds", "Time to serve a pull, by kind", m.pull_seconds.clone());
        registry.register("received_bytes", "Gradient bytes received", m.bytes_received.clone());
        registry.register("sent_bytes", "Parameter bytes sent", m.bytes_sent.clone());
        registry.register("steps", "Sync steps applied", m.steps.clone());
        registry.register(
            "model_version",
            "Current model version (sync: steps applied; async: pushes applied)",
            m.version.clone(),
        );
        registry.register("live_workers", "Workers currently counted as alive", m.live_workers.clone());
        registry.register("sparse_rows", "Sparse rows held by this shard", m.sparse_rows.clone());
        registry.register("table_rows", "Rows of each sparse table on this shard", m.table_rows.clone());
        registry.register(
            "table_bytes",
            "Memory of each sparse table's rows (values, optimizer state, id, counts) and admission sketch",
            m.table_bytes.clone(),
        );
        registry.register(
            "table_admitted_rows",
            "Rows created in each sparse table",
            m.table_admitted.clone(),
        );
        registry.register(
            "table_evicted_rows",
            "Rows evicted from each sparse table (evict_after_steps, max_rows)",
            m.table_evicted.clone(),
        );
        registry.register(
            "table_dropped_gradients",
            "Gradient rows dropped because their id was not admitted (admit_min_count, admit_probability, max_rows)",
            m.table_dropped.clone(),
        );
        registry.register(
            "link_connections",
            "Tensor-link connections accepted from workers (pushes and pulls over plain TCP)",
            m.link_connections.clone(),
        );
        registry.register(
            "link_refused",
            "Tensor-link connections dropped before authenticating (bad token, bad or late hello)",
            m.link_refused.clone(),
        );
        registry.register(
            "non_finite_pushes",
            "Pushes refused because a gradient held NaN or infinity (reject_non_finite)",
            m.non_finite_pushes.clone(),
        );
        registry.register(
            "checkpoint_failures",
            "Checkpoints of this run that failed on this shard (the previous one stays the latest)",
            m.checkpoint_failures.clone(),
        );
        registry.register(
            "checkpoint_step",
            "Step of the last checkpoint this shard finished writing",
            m.checkpoint_step.clone(),
        );
        // The results and kinds a dashboard plots are series from the start, at 0.
        for result in ["ok", "refused"] {
            let _ = m.pushes.get_or_create(&ResultLabel { result });
        }
        for kind in ["dense", "sparse"] {
            let _ = m.pulls.get_or_create(&KindLabel { kind });
            let _ = m.pull_seconds.get_or_create(&KindLabel { kind });
        }
        Metrics { registry: Arc::new(registry), ..m }
    }
}

impl Metrics {
    pub fn observe_push(&self, ok: bool, elapsed: Duration) {
        let result = if ok { "ok" } else { "refused" };
        self.pushes.get_or_create(&ResultLabel { result }).inc();
        self.push_seconds.observe(elapsed.as_secs_f64());
        self.latency[0].fetch_add(1, Ordering::Relaxed);
        self.latency[1].fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn observe_pull(&self, kind: &'static str, elapsed: Duration) {
        self.pulls.get_or_create(&KindLabel { kind }).inc();
        self.pull_seconds.get_or_create(&KindLabel { kind }).observe(elapsed.as_secs_f64());
        self.latency[2].fetch_add(1, Ordering::Relaxed);
        self.latency[3].fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Pushes and pulls so far and their total time: the mean latency between two reads is
    /// the difference of the seconds over the difference of the counts.
    pub fn latency(&self) -> Latency {
        let get = |i: usize| self.latency[i].load(Ordering::Relaxed);
        Latency {
            pushes: get(0),
            push_seconds: get(1) as f64 * 1e-9,
            pulls: get(2),
            pull_seconds: get(3) as f64 * 1e-9,
        }
    }

    /// Counts a refused push's reason, where it has a metric of its own.
    pub fn observe_refusal(&self, e: &crate::PsError) {
        if matches!(e, crate::PsError::NonFinite(_)) {
            self.non_finite_pushes.inc();
        }
    }

    /// Sets the per-table metrics of `table` to `stats` (counters move up to its counts).
    pub fn observe_table(&self, table: &str, stats: crate::table::TableStats) {
        let label = TableLabel { table: table.to_string() };
        self.table_rows.get_or_create(&label).set(stats.rows as i64);
        self.table_bytes.get_or_create(&label).set(stats.bytes as i64);
        for (family, now) in [
            (&self.table_admitted, stats.admitted),
            (&self.table_evicted, stats.evicted),
            (&self.table_dropped, stats.dropped),
        ] {
            let counter = family.get_or_create(&label);
            counter.inc_by(now.saturating_sub(counter.get()));
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::TableStats;

    #[test]
    fn table_metrics_follow_the_tables_counts() {
        let m = Metrics::default();
        let stats = TableStats { rows: 7, bytes: 700, admitted: 9, evicted: 2, dropped: 5 };
        m.observe_table("embedding", stats);
        m.observe_table("embedding", TableStats { admitted: 12, ..stats });
        m.observe_refusal(&crate::PsError::NonFinite("w".into()));
        m.observe_refusal(&crate::PsError::InvalidArgument("lengths".into()));
        m.observe_push(true, Duration::from_millis(3));
        m.observe_push(false, Duration::from_millis(1));
        m.observe_pull("dense", Duration::from_millis(5));
        let l = m.latency();
        assert_eq!((l.pushes, l.pulls), (2, 1));
        assert!((l.push_seconds - 0.004).abs() < 1e-9 && (l.pull_seconds - 0.005).abs() < 1e-9, "{l:?}");
        let text = m.encode();
        for line in [
            "gradflow_ps_table_rows{table=\"embedding\"} 7",
            "gradflow_ps_table_bytes{table=\"embedding\"} 700",
            "gradflow_ps_table_admitted_rows_total{table=\"embedding\"} 12",
            "gradflow_ps_table_evicted_rows_total{table=\"embedding\"} 2",
            "gradflow_ps_table_dropped_gradients_total{table=\"embedding\"} 5",
            "gradflow_ps_non_finite_pushes_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
    }
}
