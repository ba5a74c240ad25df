//! A local job's state, as a Kubernetes job has one: what `gradflow status JOB.toml` and
//! `gradflow logs JOB.toml` read.
//!
//! The local launcher keeps `<output dir>/state.json` ([`LocalState`]) up to date while it
//! runs: the job's state (Pending, Running, Restarting, Succeeded, Failed, the states of
//! [`JobState`]), each process's phase, attempt and restarts, the latest step, samples/s and
//! loss, and the last thing that happened. Every write goes to a temporary file renamed over
//! the old one, so a reader sees one whole record or the one before. The record stays after
//! the job ends; the next run of the job replaces it. A record that says the job is going on
//! while its launcher is gone (killed) is read as Failed, saying so.
//!
//! Beside it, in `<output dir>/logs/<run id>/`, the launcher writes each process's output to
//! `<role>-<index>-<attempt>.log` (named as its pod would be, less the job's name) and its
//! own console to `launch.log`: what [`log_files`] selects from.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use gradflow_job::JobConfig;
use serde::{Deserialize, Serialize};

use crate::LaunchError;
pub use crate::kubernetes::status::JobState;

/// What the local launcher records about the job's latest run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalState {
    pub job: String,
    pub run_id: String,
    /// The launcher's process id.
    pub launcher_pid: u32,
    pub state: JobState,
    /// Why the job failed, or how it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the run started and when this record was written (RFC 3339, UTC).
    pub started: String,
    pub updated: String,
    /// The highest step a worker reported.
    pub step: u64,
    /// The steps the run will take, when known (see `local`'s progress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<u64>,
    /// The epoch the workers are in (1-based) and the job's epochs.
    pub epoch: u64,
    pub epochs: u64,
    /// The sum of the running workers' latest samples/s.
    pub samples_per_sec: f64,
    /// The latest training loss a worker reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Restarts of the whole job from a checkpoint after a server died.
    pub job_restarts: u32,
    /// Servers in shard order, then workers.
    pub processes: Vec<ProcessState>,
    /// Where the launcher serves `/metrics` (job state, restarts), while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    /// The launcher's latest message (a restart, an evaluation, a failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event: Option<String>,
}

/// One process of a local job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessState {
    /// `ps-0`, `worker-1`.
    pub name: String,
    pub role: String,
    pub index: u32,
    /// The latest attempt started (0 is the first).
    pub attempt: u32,
    /// Pending, Running, Succeeded or Failed.
    pub phase: String,
    /// Failures of this process that it was restarted after.
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// How its latest attempt ended, when it did not succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// Where its latest attempt serves `/metrics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
}

/// RFC 3339 UTC, to the millisecond: the time now as the record writes it.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl LocalState {
    /// The record of a run that is starting: Pending, every process Pending.
    pub fn new(job: &JobConfig, run_id: &str) -> LocalState {
        let process = |role: &str, index: u32| ProcessState {
            name: format!("{role}-{index}"),
            role: role.into(),
            index,
            attempt: 0,
            phase: "Pending".into(),
            restarts: 0,
            pid: None,
            problem: None,
            metrics: None,
        };
        let started = now();
        LocalState {
            job: job.name.clone(),
            run_id: run_id.into(),
            launcher_pid: std::process::id(),
            state: JobState::Pending,
            message: None,
            updated: started.clone(),
            started,
            step: 0,
            total_steps: None,
            epoch: 1,
            epochs: job.train.epochs,
            samples_per_sec: 0.0,
            loss: None,
            job_restarts: 0,
            processes: (0..job.servers)
                .map(|i| process("ps", i))
                .chain((0..job.workers).map(|i| process("worker", i)))
                .collect(),
            metrics: None,
            last_event: None,
        }
    }

    /// The process named `name` (`worker-1`).
    pub fn process_mut(&mut self, name: &str) -> Option<&mut ProcessState> {
        self.processes.iter_mut().find(|p| p.name == name)
    }

    /// Writes the record to `path` atomically: a temporary file beside it, renamed over it.
    pub fn save(&mut self, path: &Path) -> io::Result<()> {
        self.updated = now();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec_pretty(self).expect("a state always serializes"))?;
        file.sync_data()?;
        drop(file);
        std::fs::rename(&tmp, path)
    }

    /// The record of `job`'s latest local run. A record of a run that is not over whose
    /// launcher is gone is returned Failed, its message saying so.
    pub fn load(job: &JobConfig) -> Result<LocalState, LaunchError> {
        let path = job.state_path();
        let text = std::fs::read_to_string(&path).map_err(|e| {
            LaunchError::State(if e.kind() == io::ErrorKind::NotFound {
                format!(
                    "job {} has not been launched on this machine: there is no {} (`gradflow launch` writes it)",
                    job.name,
                    path.display()
                )
            } else {
                format!("job {}: cannot read {}: {e}", job.name, path.display())
            })
        })?;
        let mut state: LocalState = serde_json::from_str(&text).map_err(|e| {
            LaunchError::State(format!(
                "{}: not a local job's state record ({e}); launch the job again to replace it",
                path.display()
            ))
        })?;
        if !state.state.is_terminal() && !process_alive(state.launcher_pid) {
            state.message = Some(format!(
                "its launcher (pid {}) is gone: it was killed before the job ended (last update {})",
                state.launcher_pid, state.updated
            ));
            state.state = JobState::Failed;
        }
        Ok(state)
    }
}

/// Records that run `run_id` of `job` failed before its launcher started any process (the
/// data did not fit, the checkpoint root was taken, ...), unless the launcher recorded the
/// run itself: `gradflow status` then says Failed and why, not what an earlier run did.
pub fn record_failed_start(job: &JobConfig, run_id: &str, why: &str) -> io::Result<()> {
    let path = job.state_path();
    let recorded = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str::<LocalState>(&t).ok())
        .is_some_and(|s| s.run_id == run_id);
    if recorded {
        return Ok(());
    }
    let mut state = LocalState::new(job, run_id);
    state.state = JobState::Failed;
    state.message = Some(why.to_string());
    state.save(&path)
}

/// Whether a process with this id exists (one of another user counts).
pub fn process_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

impl std::fmt::Display for LocalState {
    /// The table `gradflow status JOB.toml` prints: the layout of a Kubernetes job's, with
    /// processes for pods.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "job {} (local, run {}): {}", self.job, self.run_id, self.state)?;
        if let Some(m) = &self.message {
            writeln!(f, "  {m}")?;
        }
        let total = self.total_steps.map(|t| format!("/{t}")).unwrap_or_default();
        let loss = self.loss.map(|l| format!("  loss {l:.4}")).unwrap_or_default();
        writeln!(
            f,
            "  epoch {}/{}  step {}{total}  samples/s {:.0}{loss}  restarts {}",
            self.epoch,
            self.epochs,
            self.step,
            self.samples_per_sec,
            self.processes.iter().map(|p| p.restarts).sum::<u32>() + self.job_restarts
        )?;
        writeln!(f, "  started {}, updated {}", self.started, self.updated)?;
        writeln!(f)?;
        writeln!(f, "{:<8} {:>7} {:>10} {:>7}", "ROLE", "ACTIVE", "SUCCEEDED", "FAILED")?;
        for role in ["ps", "worker"] {
            let of_role = || self.processes.iter().filter(move |p| p.role == role);
            let count = |phase: &str| of_role().filter(|p| p.phase == phase).count();
            let active = of_role().count() - count("Succeeded") - count("Failed");
            writeln!(f, "{:<8} {:>7} {:>10} {:>7}", role, active, count("Succeeded"), count("Failed"))?;
        }
        writeln!(f)?;
        let width = self.processes.iter().map(|p| p.name.len()).max().unwrap_or(7).max(7);
        writeln!(
            f,
            "{:<width$}  {:<11} {:>7} {:>7} {:>8}  PROBLEM",
            "PROCESS", "PHASE", "PID", "ATTEMPT", "RESTARTS"
        )?;
        for p in &self.processes {
            writeln!(
                f,
                "{:<width$}  {:<11} {:>7} {:>7} {:>8}  {}",
                p.name,
                p.phase,
                p.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                p.attempt,
                p.restarts,
                p.problem.as_deref().unwrap_or("")
            )?;
        }
        if let Some(e) = &self.last_event {
            writeln!(f, "\nlast event: {e}")?;
        }
        Ok(())
    }
}

/// Which logs of a local job to show.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogFilter {
    /// `ps` or `worker`; `None`: every process and the launcher.
    pub role: Option<String>,
    pub index: Option<u32>,
    /// This attempt; `None`: each process's latest.
    pub attempt: Option<u32>,
}

/// The log files of `state`'s run that `filter` selects, with the name to show for each
/// (`worker-0`, `launch`): the launcher's first, then servers and workers in order.
pub fn log_files(
    job: &JobConfig,
    state: &LocalState,
    filter: &LogFilter,
) -> Result<Vec<(String, PathBuf)>, LaunchError> {
    let dir = job.logs_dir(&state.run_id);
    let mut out = Vec::new();
    if filter.role.is_none() && filter.index.is_none() && filter.attempt.is_none() {
        out.push(("launch".to_string(), dir.join("launch.log")));
    }
    for p in &state.processes {
        if filter.role.as_ref().is_some_and(|r| *r != p.role) || filter.index.is_some_and(|i| i != p.index) {
            continue;
        }
        let attempt = filter.attempt.unwrap_or(p.attempt);
        let path = dir.join(format!("{}-{attempt}.log", p.name));
        if filter.attempt.is_some() && !path.exists() {
            continue;
        }
        out.push((p.name.clone(), path));
    }
    if out.is_empty() {
        let which = [
            filter.role.as_ref().map(|r| format!("role {r}")),
            filter.index.map(|i| format!("index {i}")),
            filter.attempt.map(|a| format!("attempt {a}")),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ");
        return Err(LaunchError::State(format!(
            "run {} of job {} has no process log for {which} (processes: {})",
            state.run_id,
            job.name,
            state
                .processes
                .iter()
                .map(|p| format!("{} attempt 0..={}", p.name, p.attempt))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(dir: &Path) -> JobConfig {
        let mut job = JobConfig::parse(
            "name = \"s\"\nservers = 1\nworkers = 2\n[model]\nkind = \"logistic_regression\"\n[data]\ntrain = \"t.libsvm\"\n",
        )
        .unwrap();
        job.output.dir = Some(dir.to_path_buf());
        job
    }

    #[test]
    fn a_saved_state_reads_back_and_a_dead_launchers_reads_failed() {
        let dir = tempfile::tempdir().unwrap();
        let job = job(dir.path());
        let mut state = LocalState::new(&job, "s-1");
        state.state = JobState::Running;
        state.save(&job.state_path()).unwrap();
        assert_eq!(LocalState::load(&job).unwrap(), state);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["state.json"], "no temporary file is left");

        // A pid that cannot be a process: above the kernel's pid limit.
        state.launcher_pid = 1 << 30;
        state.save(&job.state_path()).unwrap();
        let read = LocalState::load(&job).unwrap();
        assert_eq!(read.state, JobState::Failed);
        assert!(read.message.as_deref().unwrap().contains("launcher (pid 1073741824) is gone"));
        let shown = read.to_string();
        assert!(shown.starts_with("job s (local, run s-1): Failed\n"), "{shown}");
        assert!(shown.contains("\nworker-1 "), "{shown}");
    }

    #[test]
    fn no_record_says_the_job_was_not_launched() {
        let dir = tempfile::tempdir().unwrap();
        let err = LocalState::load(&job(dir.path())).unwrap_err().to_string();
        assert!(err.contains("job s has not been launched on this machine"), "{err}");
    }

    #[test]
    fn logs_select_by_role_index_and_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let job = job(dir.path());
        let mut state = LocalState::new(&job, "s-1");
        state.process_mut("worker-1").unwrap().attempt = 2;
        let names = |f: &LogFilter| -> Vec<String> {
            log_files(&job, &state, f)
                .unwrap()
                .into_iter()
                .map(|(n, p)| format!("{n}:{}", p.file_name().unwrap().to_string_lossy()))
                .collect()
        };
        assert_eq!(
            names(&LogFilter::default()),
            ["launch:launch.log", "ps-0:ps-0-0.log", "worker-0:worker-0-0.log", "worker-1:worker-1-2.log"]
        );
        let worker1 = LogFilter { role: Some("worker".into()), index: Some(1), attempt: None };
        assert_eq!(names(&worker1), ["worker-1:worker-1-2.log"]);
        let err = log_files(&job, &state, &LogFilter { index: Some(7), ..LogFilter::default() }).unwrap_err();
        assert!(err.to_string().contains("no process log for index 7"), "{err}");
    }
}
