//! Prometheus metrics of a shard, served as text on `GET /metrics`.

use std::sync::Arc;
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
    registry: Arc<Registry>,
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
        Metrics { registry: Arc::new(registry), ..m }
    }
}

impl Metrics {
    pub fn observe_push(&self, ok: bool, elapsed: Duration) {
        let result = if ok { "ok" } else { "refused" };
        self.pushes.get_or_create(&ResultLabel { result }).inc();
        self.push_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn observe_pull(&self, kind: &'static str, elapsed: Duration) {
        self.pulls.get_or_create(&KindLabel { kind }).inc();
        self.pull_seconds.get_or_create(&KindLabel { kind }).observe(elapsed.as_secs_f64());
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
        let text = m.encode();
        for line in [
            "gradflow_ps_table_rows{table=\"embedding\"} 7",
            "gradflow_ps_table_bytes{table=\"embedding\"} 700",
            "gradflow_ps_table_admitted_rows_total{table=\"embedding\"} 12",
            "gradflow_ps_table_evicted_rows_total{table=\"embedding\"} 2",
            "gradflow_ps_table_dropped_gradients_total{table=\"embedding\"} 5",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
    }
}
