//! The job record: what the controller remembers about a Kubernetes job, kept as JSON in the
//! job's root ConfigMap (see `controller` for why a record is needed). Plain data: the
//! renderer writes it into the ConfigMap, the controller decides on it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use gradflow_job::{JobConfig, Role};

/// The state of a job, as `gradflow status` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    /// Pods are being created, scheduled or started.
    #[default]
    Pending,
    /// Every server is ready and every unfinished worker is running.
    Running,
    /// A process is being recreated after a failure or a disruption.
    Restarting,
    /// Every worker succeeded.
    Succeeded,
    /// The job cannot go on; `message` says why.
    Failed,
}

impl JobState {
    /// Succeeded or Failed: nothing will be created any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// The controller's memory, kept in the job's root ConfigMap.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobStatus {
    pub state: JobState,
    /// Why the job failed (or how it ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// One record per server shard.
    pub ps: Vec<ProcessRecord>,
    /// One record per worker.
    pub worker: Vec<ProcessRecord>,
}

/// What the controller knows about one process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessRecord {
    /// The latest attempt whose pod was created; `None` before the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// How each attempt that ended, ended.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ended: BTreeMap<u32, Ending>,
}

/// How one attempt of a process ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Ending {
    /// Exit code 0 (workers).
    Succeeded,
    /// A failure that counts against `launcher.max_restarts`.
    Failed {
        /// The main container's exit code, if it got one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<i32>,
        reason: String,
    },
    /// Evicted, preempted or deleted: not the process's fault, not counted.
    Disrupted { reason: String },
}

impl ProcessRecord {
    /// Failures counted against `launcher.max_restarts`.
    pub fn restarts(&self) -> u32 {
        self.ended.values().filter(|e| matches!(e, Ending::Failed { .. })).count() as u32
    }

    /// Recreations that were not counted (evictions, preemptions).
    pub fn disruptions(&self) -> u32 {
        self.ended.values().filter(|e| matches!(e, Ending::Disrupted { .. })).count() as u32
    }
}

impl JobStatus {
    /// The status of a job nothing has been created for.
    pub fn new(job: &JobConfig) -> JobStatus {
        JobStatus {
            state: JobState::Pending,
            message: None,
            ps: vec![ProcessRecord::default(); job.servers as usize],
            worker: vec![ProcessRecord::default(); job.workers as usize],
        }
    }

    /// The records of one role.
    pub fn records(&self, role: Role) -> &[ProcessRecord] {
        match role {
            Role::Ps => &self.ps,
            Role::Worker => &self.worker,
        }
    }

    pub(super) fn records_mut(&mut self, role: Role) -> &mut Vec<ProcessRecord> {
        match role {
            Role::Ps => &mut self.ps,
            Role::Worker => &mut self.worker,
        }
    }

    /// The record as stored in the ConfigMap.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a JobStatus always serializes")
    }

    /// Reads what [`JobStatus::to_json`] wrote.
    pub fn from_json(text: &str) -> Result<JobStatus, serde_json::Error> {
        serde_json::from_str(text)
    }
}
