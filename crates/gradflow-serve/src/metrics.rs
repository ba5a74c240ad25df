//! Prometheus metrics of a model server, served as text on `GET /metrics`.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// How a request or a reload ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// Which transport a request came by, and how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabel {
    pub transport: &'static str,
    pub code: u16,
}

/// The server's metrics; clones share the same values.
#[derive(Clone)]
pub struct Metrics {
    /// Seconds from a request's arrival to its answer, per transport.
    pub request_seconds: Family<RequestLabel, Histogram>,
    /// Rows per forward pass (how much batching there is).
    pub batch_rows: Histogram,
    /// Seconds per forward pass.
    pub batch_seconds: Histogram,
    /// Rows predicted.
    pub predictions: Counter,
    /// The step of the checkpoint served.
    pub model_step: Gauge,
    /// Newer checkpoints swapped in (`swapped`) or refused (`refused`).
    pub reloads: Family<ResultLabel, Counter>,
    registry: Arc<Registry>,
}

fn latency() -> Histogram {
    // 25 µs .. ~3 s
    Histogram::new(exponential_buckets(25e-6, 2.0, 18))
}

impl Default for Metrics {
    fn default() -> Self {
        let request_seconds: Family<RequestLabel, Histogram> = Family::new_with_constructor(latency);
        let batch_rows = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        let batch_seconds = latency();
        let predictions = Counter::default();
        let model_step = Gauge::default();
        let reloads = Family::<ResultLabel, Counter>::default();
        let mut r = Registry::with_prefix("gradflow_serve");
        r.register(
            "request_seconds",
            "Seconds from a request's arrival to its answer",
            request_seconds.clone(),
        );
        r.register("batch_rows", "Rows per forward pass", batch_rows.clone());
        r.register("batch_seconds", "Seconds per forward pass", batch_seconds.clone());
        r.register("predictions", "Rows predicted", predictions.clone());
        r.register("model_step", "Step of the checkpoint served", model_step.clone());
        r.register("reloads", "Newer checkpoints swapped in or refused", reloads.clone());
        Metrics {
            request_seconds,
            batch_rows,
            batch_seconds,
            predictions,
            model_step,
            reloads,
            registry: Arc::new(r),
        }
    }
}

impl Metrics {
    /// Records a request answered with HTTP-like status `code` after `seconds`.
    pub fn observe(&self, transport: &'static str, code: u16, seconds: f64) {
        self.request_seconds.get_or_create(&RequestLabel { transport, code }).observe(seconds);
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}
