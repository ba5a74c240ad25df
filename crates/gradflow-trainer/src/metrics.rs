//! A worker's Prometheus metrics, served as text on `GET /metrics` (plain HTTP) the way the
//! servers serve theirs, with the prefix `gradflow_worker`:
//!
//! - `gradflow_worker_steps_total`, `gradflow_worker_samples_total`: steps and examples trained;
//! - `gradflow_worker_step_phase_seconds_total{phase}`: time spent per phase of a step (`data`:
//!   reading the batch, `pull`, `compute`: forward and backward, `push`: pushing and
//!   completing the step); `rate()` of one over `rate()` of the steps is its mean per step.
//!   The next batch is read while the step waits for the servers, so `data` is also inside
//!   `push`: the phases can add up to more than the step ([`crate::observe::Phases`]);
//! - `gradflow_worker_samples_per_second`, `gradflow_worker_loss`: the latest progress window's;
//! - `gradflow_worker_step`, `gradflow_worker_epoch` (1-based).
//!
//! Updated at every progress report (`train.log_every_steps`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::observe::Phases;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

/// One worker's metrics; clones share the same values.
#[derive(Clone)]
pub struct WorkerMetrics {
    steps: Counter,
    samples: Counter,
    phase_seconds: Family<PhaseLabel, Counter<f64, AtomicU64>>,
    samples_per_second: Gauge<f64, AtomicU64>,
    loss: Gauge<f64, AtomicU64>,
    step: Gauge,
    epoch: Gauge,
    registry: Arc<Registry>,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("gradflow_worker");
        let m = WorkerMetrics {
            steps: Counter::default(),
            samples: Counter::default(),
            phase_seconds: Family::default(),
            samples_per_second: Gauge::default(),
            loss: Gauge::default(),
            step: Gauge::default(),
            epoch: Gauge::default(),
            registry: Arc::new(Registry::default()),
        };
        registry.register("steps", "Steps this worker trained", m.steps.clone());
        registry.register("samples", "Examples this worker trained on", m.samples.clone());
        registry.register(
            "step_phase_seconds",
            "Time spent in each phase of a step: data (reading the batch), pull, compute (forward and backward), push (pushing and completing the step)",
            m.phase_seconds.clone(),
        );
        registry.register(
            "samples_per_second",
            "This worker's examples per second over the latest progress window",
            m.samples_per_second.clone(),
        );
        registry.register("loss", "Mean training loss over the latest progress window", m.loss.clone());
        registry.register("step", "The step this worker is at", m.step.clone());
        registry.register("epoch", "The epoch this worker is in (1-based)", m.epoch.clone());
        // Every phase is a series from the start, at 0 until the first report.
        for phase in ["data", "pull", "compute", "push"] {
            let _ = m.phase_seconds.get_or_create(&PhaseLabel { phase });
        }
        WorkerMetrics { registry: Arc::new(registry), ..m }
    }
}

/// One progress window, as the metrics take it.
pub(crate) struct Window {
    pub steps: u64,
    pub samples: u64,
    pub phases: Phases,
    pub samples_per_second: f64,
    pub loss: f64,
    pub step: u64,
    /// 0-based, as the trainer counts.
    pub epoch: u64,
}

impl WorkerMetrics {
    /// Adds a progress window.
    pub(crate) fn observe(&self, w: &Window) {
        self.steps.inc_by(w.steps);
        self.samples.inc_by(w.samples);
        for (phase, secs) in [
            ("data", w.phases.data),
            ("pull", w.phases.pull),
            ("compute", w.phases.compute),
            ("push", w.phases.push),
        ] {
            self.phase_seconds.get_or_create(&PhaseLabel { phase }).inc_by(secs);
        }
        self.samples_per_second.set(w.samples_per_second);
        if w.loss.is_finite() {
            self.loss.set(w.loss);
        }
        self.step.set(w.step as i64);
        self.epoch.set(w.epoch as i64 + 1);
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Serves `GET /metrics` on `addr` (port 0: a free one) until `stop` is cancelled;
    /// returns the address it listens on.
    pub async fn serve(&self, addr: SocketAddr, stop: CancellationToken) -> std::io::Result<SocketAddr> {
        let metrics = self.clone();
        gradflow_proto::metrics_http::spawn(
            addr,
            move || metrics.encode(),
            stop.cancelled_owned(),
            "the worker's",
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_moves_the_counters_and_sets_the_gauges() {
        let m = WorkerMetrics::default();
        let phases = Phases { data: 0.5, pull: 1.0, compute: 2.0, push: 0.25 };
        let w = Window {
            steps: 10,
            samples: 2560,
            phases,
            samples_per_second: 1000.0,
            loss: 0.5,
            step: 10,
            epoch: 0,
        };
        m.observe(&w);
        m.observe(&Window { step: 20, ..w });
        let text = m.encode();
        for line in [
            "gradflow_worker_steps_total 20",
            "gradflow_worker_samples_total 5120",
            "gradflow_worker_step_phase_seconds_total{phase=\"pull\"} 2.0",
            "gradflow_worker_step_phase_seconds_total{phase=\"push\"} 0.5",
            "gradflow_worker_samples_per_second 1000.0",
            "gradflow_worker_loss 0.5",
            "gradflow_worker_step 20",
            "gradflow_worker_epoch 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
    }
}
