//! What a job says about its parameter servers, defined once for the job file and the server.
//!
//! The job file's `[server]` section is [`ServerSettings`], its `[checkpoint]` section
//! [`CheckpointConfig`] and its `restore` key [`Restore`]. gradflow-job reads them from the
//! job file; gradflow-ps builds each shard's `ServerConfig` from them. Both crates use these
//! types, their documentation and their defaults, so the two cannot drift apart, and neither
//! depends on the other (the job crate stays free of the server, the server of the job
//! file's other sections).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use crate::Mode;
use crate::partition::DEFAULT_PARTITION_BYTES;

/// The environment variable holding the id of this run of a job, which the launcher gives
/// every process of the run: servers record it in their checkpoints, workers in their
/// results.
pub const ENV_RUN_ID: &str = "GRADFLOW_RUN_ID";

/// The shortest [`ServerSettings::heartbeat_timeout`] a server accepts.
pub const MIN_HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(50);

/// The smallest [`ServerSettings::partition_bytes`] a job accepts.
pub const MIN_PARTITION_BYTES: u64 = 1024;

/// The job file's `[server]` section: how the job's parameter servers treat their workers.
/// Every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// A worker not heard from for this long is dropped from the set a sync step waits for
    /// (and counted again once its next push arrives). At least 50ms. Default "5s".
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    /// How long a worker that has never been heard from is waited for after the server
    /// starts (processes and pods take a while to start). Default "120s".
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// Longest a pull or push waits for the model to reach its step before failing with
    /// DEADLINE_EXCEEDED. Default "600s".
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// Refuse gradients that contain NaN or infinity, and stop the shard (naming the tensor
    /// and the step) when an update would make a parameter or its optimizer state NaN or
    /// infinite. Default true.
    pub reject_non_finite: bool,
    /// Dense tensors larger than this many bytes are split across shards (the workers declare
    /// the model with it; it must agree across the job). At least 1024. Default 4 MiB.
    pub partition_bytes: u64,
    /// Sync only: a step completes once all live workers but this many have pushed, so a
    /// straggler does not hold the job back; later pushes for it are refused as stale. With
    /// dynamic data sharding the late worker trains that batch again, so no example is lost;
    /// with static sharding its batch is skipped. Fewer than the job's workers. Default 0:
    /// every live worker is waited for.
    pub backup_workers: u32,
    /// Port of each server's tensor link (pushes and pulls over plain TCP, see
    /// `transport.tensor_link`) on the gRPC address's interface. Default 0: any free port,
    /// which workers learn from the server's status (on Kubernetes, `kubernetes.link_port`).
    pub link_port: u16,
    /// The most memory, in bytes, a shard's part of the model may need: its dense values,
    /// optimizer state and gradient sums, and one row of each sparse table, worked out from
    /// the spec when a worker declares it; a larger model is refused (RESOURCE_EXHAUSTED,
    /// naming the sizes) before anything is allocated. Default: the machine's memory (the
    /// smaller of its RAM and its cgroup's memory limit). 0: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<u64>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            heartbeat_timeout: Duration::from_secs(5),
            startup_timeout: Duration::from_secs(120),
            wait_timeout: Duration::from_secs(600),
            reject_non_finite: true,
            partition_bytes: DEFAULT_PARTITION_BYTES,
            backup_workers: 0,
            link_port: 0,
            max_memory: None,
        }
    }
}

impl ServerSettings {
    /// Checks the settings of a job with `num_workers` workers in `mode`; the error names the
    /// key.
    pub fn validate(&self, mode: Mode, num_workers: u32) -> Result<(), SettingsError> {
        if self.partition_bytes < MIN_PARTITION_BYTES {
            return Err(SettingsError::PartitionBytes(self.partition_bytes));
        }
        check_heartbeat_timeout(self.heartbeat_timeout)?;
        check_backup_workers(self.backup_workers, mode, num_workers)
    }
}

/// The rule for [`ServerSettings::heartbeat_timeout`]: at least [`MIN_HEARTBEAT_TIMEOUT`].
pub fn check_heartbeat_timeout(timeout: Duration) -> Result<(), SettingsError> {
    if timeout < MIN_HEARTBEAT_TIMEOUT {
        return Err(SettingsError::HeartbeatTimeout(timeout));
    }
    Ok(())
}

/// The rule for [`ServerSettings::backup_workers`]: sync mode only, and fewer than the workers.
pub fn check_backup_workers(backup_workers: u32, mode: Mode, num_workers: u32) -> Result<(), SettingsError> {
    if backup_workers > 0 && mode == Mode::Async {
        return Err(SettingsError::BackupWorkersAsync);
    }
    if backup_workers >= num_workers {
        return Err(SettingsError::BackupWorkers { backup_workers, num_workers });
    }
    Ok(())
}

/// The job file's `[checkpoint]` section: when and where the servers write checkpoints.
/// Every field has a default; a job without the section writes none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Object-store URL: a local folder (default `./checkpoints`; relative to the job file),
    /// `s3://`, `gs://`, `az://`, or `memory://` (tests).
    pub url: String,
    /// A checkpoint every this many model versions (sync: steps; all shards at the same
    /// step). Default 1000.
    pub every_steps: Option<u64>,
    /// A checkpoint at the first step after this much time since the last one, e.g. "10m".
    /// Default: off.
    #[serde(with = "humantime_serde")]
    pub every: Option<Duration>,
    /// Complete checkpoints kept; older ones are deleted once a newer one is complete.
    /// Default 3.
    pub keep: usize,
    /// Write a last checkpoint when the server is stopped (SIGTERM), if the model changed
    /// since the previous one. Default true.
    pub on_shutdown: bool,
    /// How long shard 0 waits for the other shards' files before giving a checkpoint up.
    /// Default "300s".
    #[serde(with = "humantime_serde")]
    pub finalize_timeout: Duration,
    /// Keep the checkpoint of the best evaluation by this test score beside the newest `keep`
    /// ones, and point `best` at it: `"test_auc"`, `"test_accuracy"` (higher is better) or
    /// `"test_loss"` (lower is better). The built-in trainer checkpoints the model it scores at
    /// every epoch end. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_best: Option<Metric>,
}

/// A test score the job's evaluations report, by which checkpoints are selected
/// (`[checkpoint] keep_best`) and training stops early (`[train] early_stop_patience`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Area under the ROC curve on the test data; higher is better.
    TestAuc,
    /// Mean log loss on the test data; lower is better.
    TestLoss,
    /// Accuracy at 0.5 on the test data; higher is better.
    TestAccuracy,
}

impl Metric {
    /// The name the job file and the results lines use (`test_auc`).
    pub fn name(self) -> &'static str {
        match self {
            Metric::TestAuc => "test_auc",
            Metric::TestLoss => "test_loss",
            Metric::TestAccuracy => "test_accuracy",
        }
    }

    /// Whether a higher score is a better model.
    pub fn higher_is_better(self) -> bool {
        !matches!(self, Metric::TestLoss)
    }

    /// Whether `score` is strictly better than `than` by this metric; a NaN is never better,
    /// and anything is better than a NaN.
    pub fn better(self, score: f64, than: f64) -> bool {
        is_better(self.higher_is_better(), score, than)
    }
}

/// Whether `score` is strictly better than `than` when higher (or lower) is better; a NaN
/// is never better, and anything but a NaN is better than a NaN.
pub fn is_better(higher_is_better: bool, score: f64, than: f64) -> bool {
    if score.is_nan() {
        return false;
    }
    if than.is_nan() {
        return true;
    }
    if higher_is_better { score > than } else { score < than }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Metric {
    type Err = SettingsError;

    fn from_str(s: &str) -> Result<Metric, SettingsError> {
        match s.trim() {
            "test_auc" => Ok(Metric::TestAuc),
            "test_loss" => Ok(Metric::TestLoss),
            "test_accuracy" => Ok(Metric::TestAccuracy),
            other => Err(SettingsError::UnknownMetric(other.to_string())),
        }
    }
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            url: "./checkpoints".into(),
            every_steps: Some(1000),
            every: None,
            keep: 3,
            on_shutdown: true,
            finalize_timeout: Duration::from_secs(300),
            keep_best: None,
        }
    }
}

impl CheckpointConfig {
    /// Checks values that parse but make no sense; the error names the key.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.every_steps == Some(0) {
            return Err(SettingsError::CheckpointEverySteps);
        }
        if self.keep == 0 {
            return Err(SettingsError::CheckpointKeep);
        }
        Ok(())
    }
}

/// Which checkpoint the servers start from (the job file's `restore`), read from the same
/// strings as ever: `"latest"`, a step number (`"1200"`), the URL of a checkpoint directory
/// (`"s3://bucket/run1/ckpt-000000001200"`), or its path or name (`"ckpt-000000001200"`).
/// Anything else (an empty string, a negative step, one too large) is refused when the job
/// is read, with a message that says what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Restore {
    /// `"latest"`: the checkpoint `latest` names under `checkpoint.url` (when there is no
    /// `latest`, the newest complete one).
    Latest,
    /// A step number: that step's checkpoint under `checkpoint.url`.
    Step(u64),
    /// A checkpoint directory by URL with a scheme (`s3://`, `gs://`, `az://`, `file://`,
    /// `memory://`), opened on its own: no `[checkpoint]` section needed.
    Url(String),
    /// A checkpoint directory by name under `checkpoint.url` (`ckpt-000000001200`) or by path
    /// (`runs/checkpoints/archive/<run id>/ckpt-000000001200`), read with the `[checkpoint]`
    /// store's settings, so the job needs that section.
    Dir(String),
}

/// What `restore` accepts, for error messages.
const RESTORE_ACCEPTS: &str = "expected \"latest\", a step number, or the URL or path of a checkpoint directory (e.g. \"s3://bucket/run1/ckpt-000000001200\")";

impl Restore {
    /// Whether the checkpoint is found through the job's `[checkpoint]` store: everything
    /// but a [`Restore::Url`].
    pub fn needs_checkpoint_store(&self) -> bool {
        !matches!(self, Restore::Url(_))
    }

    /// Checks that the checkpoint can be found with the job's `checkpoint` section (or its
    /// absence).
    pub fn check(&self, checkpoint: Option<&CheckpointConfig>) -> Result<(), SettingsError> {
        if checkpoint.is_none() && self.needs_checkpoint_store() {
            return Err(SettingsError::RestoreNeedsCheckpoint(self.clone()));
        }
        Ok(())
    }
}

impl FromStr for Restore {
    type Err = SettingsError;

    fn from_str(text: &str) -> Result<Restore, SettingsError> {
        let bad = |why: &str| SettingsError::Restore { given: text.to_string(), why: why.to_string() };
        let s = text.trim();
        if s.is_empty() {
            return Err(bad("it is empty"));
        }
        if s == "latest" {
            return Ok(Restore::Latest);
        }
        let digits = s.strip_prefix('+').unwrap_or(s);
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            return digits
                .parse()
                .map(Restore::Step)
                .map_err(|_| bad("a step number is at most 18446744073709551615"));
        }
        if s.strip_prefix('-').is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())) {
            return Err(bad("a step number is 0 or more"));
        }
        if s.contains("://") {
            return Ok(Restore::Url(s.to_string()));
        }
        Ok(Restore::Dir(s.to_string()))
    }
}

impl fmt::Display for Restore {
    /// The string the job file says, which [`Restore::from_str`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Restore::Latest => f.write_str("latest"),
            Restore::Step(step) => write!(f, "{step}"),
            Restore::Url(s) | Restore::Dir(s) => f.write_str(s),
        }
    }
}

impl Serialize for Restore {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Restore {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Restore, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Restore;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a string: \"latest\", a step number, or the URL or path of a checkpoint directory",
                )
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Restore, E> {
                text.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

/// A server setting that parses but cannot work; the message names the key.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SettingsError {
    #[error("server.partition_bytes: expected at least {MIN_PARTITION_BYTES}, found {0}")]
    PartitionBytes(u64),
    #[error("heartbeat_timeout is {0:?}; expected at least 50ms")]
    HeartbeatTimeout(Duration),
    #[error("backup_workers applies to sync mode only; async steps never wait")]
    BackupWorkersAsync,
    #[error(
        "backup_workers is {backup_workers} but the job has {num_workers} workers; expected fewer backups than workers"
    )]
    BackupWorkers { backup_workers: u32, num_workers: u32 },
    #[error("checkpoint.every_steps is 0; expected at least 1 (or leave it out)")]
    CheckpointEverySteps,
    #[error("checkpoint.keep is 0; expected at least 1")]
    CheckpointKeep,
    /// `restore` names no checkpoint: `given` is what was written, `why` what is wrong with it.
    #[error("restore: `{given}` is not a checkpoint: {why}; {RESTORE_ACCEPTS}")]
    Restore { given: String, why: String },
    #[error("restore = \"{0}\" needs checkpoint.url to say where checkpoints are")]
    RestoreNeedsCheckpoint(Restore),
    #[error("`{0}` is not a test score; expected \"test_auc\", \"test_loss\" or \"test_accuracy\"")]
    UnknownMetric(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_read_their_names_and_know_which_way_is_better() {
        for m in [Metric::TestAuc, Metric::TestLoss, Metric::TestAccuracy] {
            assert_eq!(m.name().parse::<Metric>().unwrap(), m);
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(json, format!("\"{}\"", m.name()));
        }
        assert!(Metric::TestAuc.better(0.8, 0.7) && !Metric::TestAuc.better(0.7, 0.7));
        assert!(Metric::TestLoss.better(0.3, 0.4) && !Metric::TestLoss.better(0.5, 0.4));
        assert!(!Metric::TestAuc.better(f64::NAN, 0.1) && Metric::TestLoss.better(9.0, f64::NAN));
        let e = "auc".parse::<Metric>().unwrap_err().to_string();
        assert!(e.contains("`auc`") && e.contains("test_loss"), "{e}");
    }

    #[test]
    fn restore_reads_the_strings_it_always_read_and_writes_them_back() {
        for (text, want) in [
            ("latest", Restore::Latest),
            (" latest ", Restore::Latest),
            ("1200", Restore::Step(1200)),
            ("0", Restore::Step(0)),
            ("s3://bucket/run1/ckpt-000000001200", Restore::Url("s3://bucket/run1/ckpt-000000001200".into())),
            ("memory://jobs/x/ckpt-000000000040", Restore::Url("memory://jobs/x/ckpt-000000000040".into())),
            ("ckpt-000000001200", Restore::Dir("ckpt-000000001200".into())),
            (
                "/runs/ck/archive/r1/ckpt-000000000040",
                Restore::Dir("/runs/ck/archive/r1/ckpt-000000000040".into()),
            ),
        ] {
            let got: Restore = text.parse().unwrap();
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string().parse::<Restore>().unwrap(), got, "{text}");
            let json = serde_json::to_string(&got).unwrap();
            assert_eq!(json, format!("\"{}\"", text.trim()));
            assert_eq!(serde_json::from_str::<Restore>(&json).unwrap(), got);
        }
    }

    #[test]
    fn a_restore_that_names_no_checkpoint_says_what_is_accepted() {
        for (text, why) in
            [("", "empty"), ("  ", "empty"), ("-3", "0 or more"), ("99999999999999999999999", "at most")]
        {
            let err = text.parse::<Restore>().unwrap_err().to_string();
            assert!(err.starts_with("restore: ") && err.contains(why) && err.contains("\"latest\""), "{err}");
        }
        let err = serde_json::from_str::<Restore>("12").unwrap_err().to_string();
        assert!(err.contains("\"latest\", a step number"), "{err}");
    }

    #[test]
    fn only_a_url_finds_its_checkpoint_without_a_checkpoint_section() {
        let url: Restore = "gs://b/ckpt-000000000001".parse().unwrap();
        url.check(None).unwrap();
        for r in [Restore::Latest, Restore::Step(3), Restore::Dir("ckpt-000000000003".into())] {
            let err = r.check(None).unwrap_err().to_string();
            assert!(err.contains("needs checkpoint.url"), "{err}");
            r.check(Some(&CheckpointConfig::default())).unwrap();
        }
    }

    #[test]
    fn settings_are_checked_against_the_job() {
        let ok = ServerSettings::default();
        ok.validate(Mode::Sync, 1).unwrap();
        let short = ServerSettings { heartbeat_timeout: Duration::from_millis(10), ..ok.clone() };
        assert!(short.validate(Mode::Sync, 1).unwrap_err().to_string().contains("heartbeat_timeout"));
        let backups = ServerSettings { backup_workers: 2, ..ok.clone() };
        backups.validate(Mode::Sync, 3).unwrap();
        assert!(backups.validate(Mode::Sync, 2).unwrap_err().to_string().contains("fewer backups"));
        assert!(backups.validate(Mode::Async, 3).unwrap_err().to_string().contains("sync mode only"));
        let small = ServerSettings { partition_bytes: 10, ..ok };
        assert!(small.validate(Mode::Sync, 1).unwrap_err().to_string().starts_with("server.partition_bytes"));
    }
}
