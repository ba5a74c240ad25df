//! The local launcher's Prometheus metrics, served as text on `GET /metrics` (plain HTTP) as
//! the servers and workers serve theirs, with the prefix `gradflow_launcher`:
//!
//! - `gradflow_launcher_job_state{state}`: 1 for the job's state (Pending, Running,
//!   Restarting, Succeeded, Failed), 0 for the others;
//! - `gradflow_launcher_restarts_total{role}`: restarts of failed workers (`worker`) and of the
//!   whole job after a lost server (`job`);
//! - `gradflow_launcher_step`, `gradflow_launcher_samples_per_second`: the job's progress.
//!
//! It listens where the job's `output.metrics_listen` says, after the servers' and workers'
//! ports (port 0: a free port), while the job runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::state::{JobState, LocalState};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabel {
    role: &'static str,
}

const STATES: [(JobState, &str); 5] = [
    (JobState::Pending, "Pending"),
    (JobState::Running, "Running"),
    (JobState::Restarting, "Restarting"),
    (JobState::Succeeded, "Succeeded"),
    (JobState::Failed, "Failed"),
];

/// The launcher's metrics; clones share the same values.
#[derive(Clone)]
pub struct LauncherMetrics {
    job_state: Family<StateLabel, Gauge>,
    restarts: Family<RoleLabel, Counter>,
    step: Gauge,
    samples_per_second: Gauge<f64, AtomicU64>,
    registry: Arc<Registry>,
}

impl Default for LauncherMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("gradflow_launcher");
        let m = LauncherMetrics {
            job_state: Family::default(),
            restarts: Family::default(),
            step: Gauge::default(),
            samples_per_second: Gauge::default(),
            registry: Arc::new(Registry::default()),
        };
        registry.register("job_state", "1 for the job's state, 0 for the others", m.job_state.clone());
        registry.register(
            "restarts",
            "Restarts of failed workers (role=worker) and of the whole job after a lost server (role=job)",
            m.restarts.clone(),
        );
        registry.register("step", "The highest step a worker reported", m.step.clone());
        registry.register(
            "samples_per_second",
            "The sum of the running workers' latest examples per second",
            m.samples_per_second.clone(),
        );
        // Every state and role is a series from the start.
        for (_, state) in STATES {
            let _ = m.job_state.get_or_create(&StateLabel { state });
        }
        for role in ["worker", "job"] {
            let _ = m.restarts.get_or_create(&RoleLabel { role });
        }
        LauncherMetrics { registry: Arc::new(registry), ..m }
    }
}

impl LauncherMetrics {
    /// Sets every metric from the job's state record.
    pub fn observe(&self, state: &LocalState) {
        for (s, name) in STATES {
            self.job_state.get_or_create(&StateLabel { state: name }).set(i64::from(state.state == s));
        }
        let worker_restarts: u32 = state.processes.iter().map(|p| p.restarts).sum();
        for (role, now) in [("worker", worker_restarts), ("job", state.job_restarts)] {
            let counter = self.restarts.get_or_create(&RoleLabel { role });
            counter.inc_by(u64::from(now).saturating_sub(counter.get()));
        }
        self.step.set(state.step as i64);
        self.samples_per_second.set(state.samples_per_sec);
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Serves `GET /metrics` on `addr` until `stop` is cancelled; returns the address.
    pub async fn serve(&self, addr: SocketAddr, stop: CancellationToken) -> std::io::Result<SocketAddr> {
        let metrics = self.clone();
        gradflow_proto::metrics_http::spawn(
            addr,
            move || metrics.encode(),
            stop.cancelled_owned(),
            "the launcher's",
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_record_sets_state_restarts_and_progress() {
        let job = gradflow_job::JobConfig::parse(
            "name = \"m\"\nworkers = 2\n[model]\nkind = \"logistic_regression\"\n[data]\ntrain = \"t.libsvm\"\n",
        )
        .unwrap();
        let mut state = LocalState::new(&job, "m-1");
        state.state = JobState::Restarting;
        state.processes[1].restarts = 2;
        state.job_restarts = 1;
        state.step = 120;
        let m = LauncherMetrics::default();
        m.observe(&state);
        state.state = JobState::Running;
        m.observe(&state);
        let text = m.encode();
        for line in [
            "gradflow_launcher_job_state{state=\"Running\"} 1",
            "gradflow_launcher_job_state{state=\"Restarting\"} 0",
            "gradflow_launcher_restarts_total{role=\"worker\"} 2",
            "gradflow_launcher_restarts_total{role=\"job\"} 1",
            "gradflow_launcher_step 120",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
    }
}
