//! The environment contract: what every gradflow process is told about its job.
//!
//! A launcher backend (local processes or Kubernetes pods) starts `gradflow ps` and
//! `gradflow worker` with the same environment:
//!
//! | variable | meaning |
//! |---|---|
//! | `GRADFLOW_CLUSTER_SPEC` | the [`ClusterSpec`] as JSON: everything below plus the whole job |
//! | `GRADFLOW_JOB` | job name |
//! | `GRADFLOW_RUN_ID` | this run of the job: `<job name>-<UTC start, YYYYMMDDTHHMMSSZ>-<4 hex>`, the same for every process of the run (see [`ENV_RUN_ID`]) |
//! | `GRADFLOW_ATTEMPT` | 0 for the first start of this process, +1 per restart |
//! | `GRADFLOW_ROLE` | `ps` or `worker` |
//! | `GRADFLOW_INDEX` | shard index or worker index |
//! | `GRADFLOW_SERVERS` | server addresses in shard order, comma-separated |
//! | `GRADFLOW_NUM_WORKERS` | number of workers |
//! | `GRADFLOW_LOG` | log filter of every process (`output.log`) |
//! | `GRADFLOW_RESTORE` | servers only, on a restart: `latest` (see [`ENV_RESTORE`]) |
//! | `GRADFLOW_TOKEN` | the job's secret token; every call carries it, servers refuse calls without it |
//! | `GRADFLOW_TLS_CA` | with a `[tls]` section: the CA file clients check the servers against (`tls.ca`) |
//! | `GRADFLOW_TLS_CLIENT_CERT`, `GRADFLOW_TLS_CLIENT_KEY` | mutual TLS: the certificate and key clients present |
//! | `GRADFLOW_TLS_DOMAIN` | the name clients check the servers' certificates for (`tls.domain`) |
//!
//! The TLS variables let any client of the job's servers (the built-in worker, a trainer of
//! your own that uses the worker library) speak TLS without reading the job; servers take
//! their side (`tls.cert`, `tls.key`, `tls.client_ca`) from the job in the JSON. They carry
//! file paths, not keys.
//!
//! The flat variables are for humans and scripts; processes read the JSON, which is versioned
//! (`version`, currently 1) so that a newer launcher can refuse an older binary clearly.
//!
//! A worker that fails with an error a restart would only repeat (bad data, a model that does
//! not fit its data) exits with [`EXIT_NO_RESTART`]; the launcher then fails the job at once
//! instead of restarting it.
//!
//! Processes report back on standard output with lines that start with [`EVENT_PREFIX`]
//! followed by one JSON [`Event`]; everything else they print is a log line.

use serde::{Deserialize, Serialize};

use crate::{JobConfig, JobError};

pub const ENV_CLUSTER_SPEC: &str = "GRADFLOW_CLUSTER_SPEC";
pub const ENV_JOB: &str = "GRADFLOW_JOB";
pub const ENV_ATTEMPT: &str = "GRADFLOW_ATTEMPT";
pub const ENV_ROLE: &str = "GRADFLOW_ROLE";
pub const ENV_INDEX: &str = "GRADFLOW_INDEX";
pub const ENV_SERVERS: &str = "GRADFLOW_SERVERS";
pub const ENV_NUM_WORKERS: &str = "GRADFLOW_NUM_WORKERS";
/// The job's log filter (`output.log`, tracing's env-filter syntax), for every process.
pub const ENV_LOG: &str = "GRADFLOW_LOG";
/// The id of this run of the job, made by the launcher when it starts ([`new_run_id`]): every
/// process of one run gets the same, a restart of the whole job from a checkpoint keeps it,
/// and the next `gradflow launch` of the same job file gets another. Servers write it into
/// checkpoints, the built-in worker into its results.
pub use gradflow_core::settings::ENV_RUN_ID;

/// The exit code of a worker whose error would come back on a restart (bad data, a model
/// that does not fit its data): the launcher does not restart it and fails the job at once.
pub const EXIT_NO_RESTART: i32 = 3;

/// A new run id for job `job`: `<job>-<UTC time, YYYYMMDDTHHMMSSZ>-<4 hex digits>`, e.g.
/// `ctr-20250101T120000Z-3fa9`. The hex digits keep two runs started in the same second apart.
pub fn new_run_id(job: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
    );
    format!("{job}-{}-{:04x}", chrono::Utc::now().format("%Y%m%dT%H%M%SZ"), h.finish() & 0xffff)
}

pub use gradflow_proto::auth::{ENV_TOKEN, Token};
pub use gradflow_proto::tls::{ENV_TLS_CA, ENV_TLS_CLIENT_CERT, ENV_TLS_CLIENT_KEY, ENV_TLS_DOMAIN};

/// Set to `latest` in the environment of a server started again after a server of its job
/// was lost: restore the latest complete checkpoint, or start from the job's own `restore`
/// (or from scratch) when none was written yet. Overrides the job file's `restore`.
pub const ENV_RESTORE: &str = "GRADFLOW_RESTORE";

/// The version of [`ClusterSpec`] this build writes and reads.
pub const CLUSTER_SPEC_VERSION: u32 = 1;

/// Prefix of a structured event line on a process's standard output.
pub const EVENT_PREFIX: &str = "@gradflow ";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Ps,
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ps => "ps",
            Role::Worker => "worker",
        }
    }
}

/// What one process of a job is told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    pub version: u32,
    pub job: String,
    pub attempt: u32,
    pub role: Role,
    pub index: u32,
    /// Server addresses in shard order. Empty for a server that picks its own port.
    pub servers: Vec<String>,
    pub num_workers: u32,
    /// Servers: the address to listen on (`host:port`; port 0 picks one and reports it).
    #[serde(default)]
    pub listen: Option<String>,
    /// Servers: the address of the `/metrics` endpoint (port 0 picks one).
    #[serde(default)]
    pub metrics_listen: Option<String>,
    pub job_config: JobConfig,
}

impl ClusterSpec {
    /// The environment variables that carry this spec (the TLS ones only for a job with
    /// a `[tls]` section).
    pub fn to_env(&self) -> Vec<(String, String)> {
        let tls = self.job_config.client_tls().map(|t| t.to_env()).unwrap_or_default();
        let mut env = vec![
            (ENV_CLUSTER_SPEC.into(), serde_json::to_string(self).expect("a ClusterSpec always serializes")),
            (ENV_JOB.into(), self.job.clone()),
            (ENV_ATTEMPT.into(), self.attempt.to_string()),
            (ENV_ROLE.into(), self.role.as_str().into()),
            (ENV_INDEX.into(), self.index.to_string()),
            (ENV_SERVERS.into(), self.servers.join(",")),
            (ENV_NUM_WORKERS.into(), self.num_workers.to_string()),
        ];
        env.extend(tls.into_iter().map(|(k, v)| (k.to_string(), v)));
        env
    }

    /// Reads the spec from `GRADFLOW_CLUSTER_SPEC`.
    pub fn from_env() -> Result<ClusterSpec, JobError> {
        let text = std::env::var(ENV_CLUSTER_SPEC)
            .map_err(|_| JobError::Environment(format!("{ENV_CLUSTER_SPEC} is not set")))?;
        ClusterSpec::from_json(&text)
    }

    pub fn from_json(text: &str) -> Result<ClusterSpec, JobError> {
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let v: Versioned = serde_json::from_str(text).map_err(|e| {
            JobError::Environment(format!("{ENV_CLUSTER_SPEC} is not valid JSON with a version: {e}"))
        })?;
        if v.version != CLUSTER_SPEC_VERSION {
            return Err(JobError::Environment(format!(
                "{ENV_CLUSTER_SPEC} has version {}, this gradflow reads version {CLUSTER_SPEC_VERSION}: use the same gradflow build for launcher and processes",
                v.version
            )));
        }
        let spec: ClusterSpec = serde_json::from_str(text)
            .map_err(|e| JobError::Environment(format!("{ENV_CLUSTER_SPEC}: {e}")))?;
        spec.job_config
            .validate()
            .map_err(|e| JobError::Environment(format!("{ENV_CLUSTER_SPEC}: job: {e}")))?;
        Ok(spec)
    }
}

/// A structured report from a process to its launcher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A server is serving at `addr` (and `/metrics` at `metrics`).
    Listening { addr: String, metrics: Option<String> },
    /// A worker's training progress.
    Progress {
        worker: u32,
        step: u64,
        epoch: u64,
        /// Examples this worker has trained on so far.
        samples: u64,
        /// Mean training loss since the last progress event.
        loss: f64,
        /// This worker's examples per second since the last progress event.
        samples_per_sec: f64,
    },
    /// Scores on the test data.
    Eval {
        worker: u32,
        epoch: u64,
        step: u64,
        test_loss: f64,
        test_auc: f64,
        test_accuracy: f64,
        test_examples: u64,
    },
    /// A worker finished its share of the training.
    Done { worker: u32, step: u64, samples: u64 },
}

impl Event {
    /// The line to print for this event.
    pub fn to_line(&self) -> String {
        format!("{EVENT_PREFIX}{}", serde_json::to_string(self).expect("events always serialize"))
    }

    /// Parses a line printed by [`Event::to_line`]; `None` for ordinary log lines.
    pub fn parse(line: &str) -> Option<Event> {
        serde_json::from_str(line.strip_prefix(EVENT_PREFIX)?).ok()
    }

    /// Prints the event on standard output, where the launcher reads it.
    pub fn emit(&self) {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", self.to_line());
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ClusterSpec {
        let job = JobConfig::parse(
            "name = \"t\"\n[model]\nkind = \"logistic_regression\"\n[data]\ntrain = \"x\"\nformat = \"libsvm\"\n",
        )
        .unwrap();
        ClusterSpec {
            version: CLUSTER_SPEC_VERSION,
            job: "t".into(),
            attempt: 2,
            role: Role::Worker,
            index: 1,
            servers: vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
            num_workers: 3,
            listen: None,
            metrics_listen: None,
            job_config: job,
        }
    }

    #[test]
    fn spec_round_trips_through_the_environment_form() {
        let env = spec().to_env();
        let json = &env.iter().find(|(k, _)| k == ENV_CLUSTER_SPEC).unwrap().1;
        assert_eq!(ClusterSpec::from_json(json).unwrap(), spec());
        assert!(env.contains(&(ENV_SERVERS.into(), "127.0.0.1:1,127.0.0.1:2".into())));
        assert!(env.contains(&(ENV_ROLE.into(), "worker".into())));
    }

    #[test]
    fn tls_settings_reach_clients_through_the_environment() {
        assert!(
            !spec().to_env().iter().any(|(k, _)| k.starts_with("GRADFLOW_TLS")),
            "no [tls], no TLS variables"
        );
        let mut s = spec();
        s.job_config = JobConfig::parse(
            "name = \"t\"\n[model]\nkind = \"logistic_regression\"\n[data]\ntrain = \"x\"\nformat = \"libsvm\"\n\
             [tls]\ncert = \"s.pem\"\nkey = \"s.key\"\nca = \"ca.pem\"\nclient_ca = \"ca.pem\"\n\
             client_cert = \"c.pem\"\nclient_key = \"c.key\"\ndomain = \"ps.internal\"\n",
        )
        .unwrap();
        s.job_config.resolve_paths(std::path::Path::new("/jobs"));
        let env = s.to_env();
        for (k, v) in [
            (ENV_TLS_CA, "/jobs/ca.pem"),
            (ENV_TLS_CLIENT_CERT, "/jobs/c.pem"),
            (ENV_TLS_CLIENT_KEY, "/jobs/c.key"),
            (ENV_TLS_DOMAIN, "ps.internal"),
        ] {
            assert!(env.contains(&(k.to_string(), v.to_string())), "{k} in {env:?}");
        }
        // The servers' own key stays in the job, not in the environment.
        assert!(!env.iter().any(|(k, v)| k != ENV_CLUSTER_SPEC && v.contains("s.key")));
        let json = &env.iter().find(|(k, _)| k == ENV_CLUSTER_SPEC).unwrap().1;
        assert_eq!(ClusterSpec::from_json(json).unwrap(), s);
    }

    #[test]
    fn run_ids_name_the_job_and_the_time_and_differ() {
        let (a, b) = (new_run_id("ctr"), new_run_id("ctr"));
        let parts: Vec<&str> = a.rsplitn(3, '-').collect();
        assert_eq!(parts.len(), 3, "{a}");
        assert_eq!(parts[2], "ctr", "{a}");
        assert!(parts[1].len() == 16 && parts[1].ends_with('Z') && parts[1].contains('T'), "{a}");
        assert!(parts[0].len() == 4 && parts[0].chars().all(|c| c.is_ascii_hexdigit()), "{a}");
        // The same second, so only the random part tells them apart (1 in 65536 to collide).
        assert!(a != b || new_run_id("ctr") != a, "{a} {b}");
    }

    #[test]
    fn another_version_is_refused_clearly() {
        let mut v: serde_json::Value = serde_json::to_value(spec()).unwrap();
        v["version"] = 2.into();
        let err = ClusterSpec::from_json(&v.to_string()).unwrap_err().to_string();
        assert!(err.contains("version 2"), "{err}");
    }

    #[test]
    fn events_round_trip_and_log_lines_are_not_events() {
        let e = Event::Progress {
            worker: 1,
            step: 5,
            epoch: 0,
            samples: 1280,
            loss: 0.5,
            samples_per_sec: 100.0,
        };
        assert_eq!(Event::parse(&e.to_line()), Some(e));
        assert_eq!(Event::parse("INFO something happened"), None);
    }
}
