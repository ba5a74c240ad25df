//! The job's lifecycle as a pure function: observe, then decide.
//!
//! [`decide`] takes the job (through its [`Renderer`]), the status last recorded in the job's
//! root ConfigMap, and the job's pods as the API server lists them, and returns the new status
//! and the [`Action`]s that move the cluster toward it. It reads no clock (the time of the pass
//! is an input, `now`): the same inputs
//! give the same decision, so a pass can be repeated after a crash or a conflict, and two
//! controllers of one job converge instead of fighting (pod names are deterministic; creating
//! one twice is a 409 that means "done").
//!
//! # Rules
//!
//! - Servers are created first; workers once every server's pod is Running and Ready. With
//!   gang scheduling (`kubernetes.gang`), every pod is created at once instead: the scheduler
//!   admits none of them until all exist, and the workers wait for the servers themselves
//!   (`transport.startup_timeout`).
//! - Each process (server shard or worker) has attempts 0, 1, 2, ...; attempt `a` runs in pod
//!   `<job>-<role>-<index>-<a>`. A new attempt is created only when the previous one ended:
//!   - **disrupted** (the pod has the `DisruptionTarget` condition: preempted, evicted through
//!     the Eviction API, taint manager, node shutdown; the kubelet's `Evicted`; or the pod
//!     vanished before it ended): recreated, not counted;
//!   - **failed**: a worker is recreated if its exit code is in
//!     `kubernetes.retryable_exit_codes` (or the pod failed without one), a server whatever its
//!     code; each counts as a restart, and a process failing more than
//!     `launcher.max_restarts` times fails the job. A non-retryable worker exit fails the job.
//! - A server whose attempt ended (failed, disrupted, or exited) took its part of the model
//!   with it. With a `[checkpoint]` section every process restarts from the latest complete
//!   checkpoint: the other pods are deleted at once (grace 0, recorded as disruptions, not
//!   counted), and once none is left every server is created again with
//!   `GRADFLOW_RESTORE=latest`, then the workers, which skip the batches the checkpoint holds.
//!   Without checkpoints the job fails.
//! - A failed process's next pod waits: `kubernetes.restart_backoff` after its first counted
//!   failure, doubled with each further one, up to `kubernetes.max_restart_backoff`, counted
//!   from when the failed container ended ([`restart_delay`]). The wait is decided from that
//!   time and the `now` the pass is given, so it survives a controller restart; the decision
//!   says when to pass again ([`Decision::retry_after`]).
//! - A pod that ran longer than `kubernetes.active_deadline` (`DeadlineExceeded`) fails the
//!   job.
//! - The job succeeds when every worker has succeeded; the servers are then deleted at once.
//! - On a terminal state (Succeeded, Failed) every pod still running is deleted; pods that
//!   ended (failed ones with their logs) stay until `gradflow delete`. With
//!   `gang = "kueue"`, the job's pods are also marked `kueue.x-k8s.io/retriable-in-group:
//!   "false"`, so that Kueue finishes the group's Workload (its quota is released, its
//!   finalizers leave the pods) instead of waiting for replacements; if a deleted pod was never
//!   scheduled (the group was still queued), only deleting the Workload lets it go.
//! - A pod Kueue stopped (condition `TerminationTarget`: its Workload was preempted or
//!   evicted) was disrupted, like one with `DisruptionTarget`.
//!
//! # Why the record
//!
//! Pods alone cannot say everything: an evicted pod is deleted by the eviction, and a pod
//! someone deletes by hand leaves no trace. The record keeps, per process, the latest attempt
//! created and how each attempt ended, so that a vanished pod is recognized as disrupted and
//! its attempt number is never reused. The record is written after the pods of a pass are
//! created (a pod created but not recorded is adopted on the next pass: attempt = max of both)
//! and before pods are deleted (so a crash cannot make a deleted server look vanished).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;

use super::gang::{
    ANNOTATION_KUEUE_RETRIABLE_IN_GROUP, CONDITION_KUEUE_TERMINATION_TARGET, Gang, group_name,
};
use super::render::{Renderer, pod_name};
pub use super::status::{Ending, JobState, JobStatus, ProcessRecord};
use super::{LABEL_ATTEMPT, LABEL_INDEX, LABEL_JOB, LABEL_ROLE};
use gradflow_job::{JobConfig, Role};

/// One step toward the decided state. [`decide`] orders them: creations, then the record,
/// then deletions.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Create this pod; if it exists already (409), the pass goes on.
    CreatePod(Box<Pod>),
    /// Write this status into the job record, conditional on the record being unchanged
    /// since it was read.
    RecordStatus(Box<JobStatus>),
    /// Delete this pod (gracefully, `launcher.grace_period`, or at once with `immediate`); if
    /// it is gone already, fine.
    DeletePod { name: String, reason: String, immediate: bool },
    /// Mark this pod `kueue.x-k8s.io/retriable-in-group: "false"` (a merge patch of its
    /// annotations): the job is over, and its Kueue pod group with it. If the pod is gone,
    /// fine.
    EndPodGroup { pod: String },
    /// Delete the Kueue Workload of the job's pod group (named after it), which makes Kueue
    /// let go of pods that were deleted before they were ever scheduled. If it is gone, fine.
    DeleteWorkload { name: String },
}

/// What one pass decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The status after this pass.
    pub status: JobStatus,
    pub actions: Vec<Action>,
    /// Human-readable lines about what was decided and why, each said once.
    pub notes: Vec<String>,
    /// The job reached a terminal state and no pod of it is running or stopping.
    pub finished: bool,
    /// A pod this pass did not create yet (a restart waiting out its backoff) is due in this
    /// long: pass again then.
    pub retry_after: Option<Duration>,
}

/// The `status.reason` of a pod the kubelet stopped at its `activeDeadlineSeconds`.
pub const DEADLINE_EXCEEDED: &str = "DeadlineExceeded";

/// How long a process waits for its next pod after its `failures`-th counted failure:
/// `base`, doubled for each failure after the first, at most `max`; no wait before any
/// failure.
pub fn restart_delay(failures: u32, base: Duration, max: Duration) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    // Past 2^31 the product overflows any useful maximum anyway.
    let factor = 1u32 << (failures - 1).min(31);
    base.checked_mul(factor).unwrap_or(max).min(max)
}

/// When the pod's main container (else its last init container) ended, if the kubelet said.
fn finished_at(pod: &Pod) -> Option<Timestamp> {
    let status = pod.status.as_ref()?;
    let ended = |statuses: Option<&Vec<k8s_openapi::api::core::v1::ContainerStatus>>| {
        statuses?
            .iter()
            .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.as_ref())
            .map(|t| t.0)
            .max()
    };
    ended(status.container_statuses.as_ref()).or_else(|| ended(status.init_container_statuses.as_ref()))
}

/// What a pod says about its attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum PodOutcome {
    /// Not running yet: being scheduled, admitted, pulled, initialized.
    Waiting,
    /// The main container runs; `ready` for servers means accepting connections.
    Running { ready: bool },
    /// Being deleted but not ended: wait before replacing it (one hostname, one pod).
    Terminating,
    /// Exit code 0.
    Succeeded,
    /// Ended with a failure.
    Failed { code: Option<i32>, reason: String },
    /// Ended because the cluster took it away.
    Disrupted { reason: String },
}

impl PodOutcome {
    fn is_ended(&self) -> bool {
        matches!(self, PodOutcome::Succeeded | PodOutcome::Failed { .. } | PodOutcome::Disrupted { .. })
    }
}

/// Pod reasons (`status.reason`) that mean the cluster ended the pod, on clusters or paths
/// that do not set the `DisruptionTarget` condition.
const DISRUPTION_REASONS: [&str; 5] = ["Evicted", "Preempting", "NodeShutdown", "Shutdown", "Terminated"];

/// Which process and attempt a pod is, from its labels.
pub fn member(pod: &Pod) -> Option<(Role, u32, u32)> {
    let labels = pod.metadata.labels.as_ref()?;
    let role = match labels.get(LABEL_ROLE)?.as_str() {
        "ps" => Role::Ps,
        "worker" => Role::Worker,
        _ => return None,
    };
    Some((role, labels.get(LABEL_INDEX)?.parse().ok()?, labels.get(LABEL_ATTEMPT)?.parse().ok()?))
}

fn condition<'a>(pod: &'a Pod, kind: &str) -> Option<&'a k8s_openapi::api::core::v1::PodCondition> {
    pod.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == kind)
}

/// The condition that says the cluster took the pod away: Kubernetes' `DisruptionTarget`, or
/// Kueue's `TerminationTarget` (its Workload was preempted or evicted).
fn disruption(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::PodCondition> {
    [CONDITION_DISRUPTION_TARGET, CONDITION_KUEUE_TERMINATION_TARGET]
        .into_iter()
        .find_map(|kind| condition(pod, kind).filter(|c| c.status == "True"))
}

/// The pod condition Kubernetes sets on a pod it is about to take away.
const CONDITION_DISRUPTION_TARGET: &str = "DisruptionTarget";

fn describe_condition(c: &k8s_openapi::api::core::v1::PodCondition) -> String {
    match (&c.reason, &c.message) {
        (Some(r), Some(m)) => format!("{r}: {m}"),
        (Some(r), None) => r.clone(),
        (None, Some(m)) => m.clone(),
        (None, None) => c.type_.clone(),
    }
}

/// The state of the pod of one attempt of a process with `role`.
pub fn observe(pod: &Pod, role: Role) -> PodOutcome {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    let ended = matches!(phase, "Succeeded" | "Failed");
    if phase == "Failed" && status.and_then(|s| s.reason.as_deref()) == Some(DEADLINE_EXCEEDED) {
        let message =
            status.and_then(|s| s.message.as_deref()).unwrap_or("the pod ran past its active deadline");
        return PodOutcome::Failed { code: None, reason: format!("{DEADLINE_EXCEEDED}: {message}") };
    }
    if !ended {
        if pod.metadata.deletion_timestamp.is_some() {
            return PodOutcome::Terminating;
        }
        return match phase {
            "Running" => {
                PodOutcome::Running { ready: condition(pod, "Ready").is_some_and(|c| c.status == "True") }
            }
            _ => PodOutcome::Waiting,
        };
    }
    // A worker that exited 0 finished its work, whatever happened to the pod afterwards.
    if phase == "Succeeded" && role == Role::Worker {
        return PodOutcome::Succeeded;
    }
    if let Some(c) = disruption(pod) {
        return PodOutcome::Disrupted { reason: describe_condition(c) };
    }
    if let Some(reason) = status.and_then(|s| s.reason.as_deref()).filter(|r| DISRUPTION_REASONS.contains(r))
    {
        let message = status.and_then(|s| s.message.as_deref()).unwrap_or_default();
        return PodOutcome::Disrupted {
            reason: if message.is_empty() { reason.to_string() } else { format!("{reason}: {message}") },
        };
    }
    if phase == "Succeeded" {
        // Servers run until they are stopped: exiting on their own is a failure.
        return PodOutcome::Failed {
            code: Some(0),
            reason: "exited with code 0 before the job ended".into(),
        };
    }
    let main = role.as_str();
    let terminated = |statuses: Option<&Vec<k8s_openapi::api::core::v1::ContainerStatus>>,
                      main_only: bool| {
        statuses?.iter().filter(|c| !main_only || c.name == main).find_map(|c| {
            let t = c.state.as_ref()?.terminated.as_ref()?;
            (t.exit_code != 0 || main_only).then(|| (c.name.clone(), t.exit_code, t.reason.clone()))
        })
    };
    let found = terminated(status.and_then(|s| s.container_statuses.as_ref()), true)
        .or_else(|| terminated(status.and_then(|s| s.init_container_statuses.as_ref()), false));
    match found {
        Some((container, code, reason)) => {
            let why = reason.unwrap_or_else(|| "Error".into());
            let what = if container == main { String::new() } else { format!(" in container {container}") };
            PodOutcome::Failed { code: Some(code), reason: format!("exit code {code} ({why}){what}") }
        }
        None => {
            let reason = status
                .and_then(|s| s.reason.clone().or_else(|| s.message.clone()))
                .unwrap_or_else(|| "failed without an exit code".into());
            PodOutcome::Failed { code: None, reason }
        }
    }
}

/// What a process needs, after looking at its pods and record.
#[derive(Debug, Clone, PartialEq)]
enum Need {
    /// A pod of this attempt must be created.
    Create(u32),
    /// The current attempt's pod exists and has not ended.
    Live { attempt: u32, settled: bool },
    /// Worker done.
    Done,
    /// The job cannot go on.
    Fatal(String),
}

/// The name of a process in notes: `ps-0`, `worker-3`.
fn proc_name(role: Role, index: u32) -> String {
    format!("{}-{index}", role.as_str())
}

/// One pass of the controller at time `now`: see the module documentation for the rules.
/// `stop` ends a job that is not over yet as Failed with that message (the launcher was
/// interrupted).
pub fn decide(
    r: &Renderer,
    status: &JobStatus,
    pods: &[Pod],
    stop: Option<&str>,
    now: Timestamp,
) -> Decision {
    let job = r.job();
    let kube = r.settings();
    let mut new = status.clone();
    new.ps.resize(job.servers as usize, ProcessRecord::default());
    new.worker.resize(job.workers as usize, ProcessRecord::default());
    let mut notes = Vec::new();
    let mut deletes = Vec::new();

    // This job's pods only: a pod of an earlier job of the same name (still terminating
    // after `gradflow delete`) has another owner.
    // Keyed by (is a worker, index): `Role` has no order.
    let mut by_proc: BTreeMap<(bool, u32), BTreeMap<u32, &Pod>> = BTreeMap::new();
    let mut mine: Vec<&Pod> = Vec::new();
    for pod in pods {
        let labels = pod.metadata.labels.as_ref();
        if labels.and_then(|l| l.get(LABEL_JOB)) != Some(&job.name) || !owned_by(pod, r.owner_uid()) {
            continue;
        }
        if let Some((role, index, attempt)) = member(pod) {
            mine.push(pod);
            by_proc.entry((role == Role::Worker, index)).or_default().insert(attempt, pod);
        }
    }

    let ended = |p: &Pod| member(p).is_some_and(|(role, _, _)| observe(p, role).is_ended());
    // Pods not ended and not being deleted yet.
    let active: Vec<&Pod> =
        mine.iter().copied().filter(|p| !ended(p) && p.metadata.deletion_timestamp.is_none()).collect();
    let remaining = mine.iter().filter(|p| !ended(p)).count();
    let delete_active = |why: &str| -> Vec<Action> {
        active
            .iter()
            .map(|p| Action::DeletePod {
                name: p.metadata.name.clone().unwrap_or_default(),
                reason: why.to_string(),
                immediate: false,
            })
            .collect()
    };

    if status.state.is_terminal() {
        // Over: the record is final; only make sure nothing is left running.
        let mut actions = delete_active(&format!("the job {}", status.state.to_string().to_lowercase()));
        actions.extend(end_pod_group(r, &mine));
        let finished = remaining == 0;
        return Decision { status: status.clone(), actions, notes, finished, retry_after: None };
    }

    let mut needs: Vec<(Role, u32, Need)> = Vec::new();
    for (role, count) in [(Role::Ps, job.servers), (Role::Worker, job.workers)] {
        for index in 0..count {
            let empty = BTreeMap::new();
            let attempts = by_proc.get(&(role == Role::Worker, index)).unwrap_or(&empty);
            let recorded = status.records(role).get(index as usize).and_then(|p| p.attempt);
            let rec = &mut new.records_mut(role)[index as usize];
            let current = recorded.max(attempts.keys().next_back().copied());
            rec.attempt = current;
            let name = proc_name(role, index);
            for (&attempt, pod) in attempts.range(..current.unwrap_or(0)) {
                let outcome = observe(pod, role);
                if let Some(ending) = ending_of(&outcome) {
                    rec.ended.entry(attempt).or_insert(ending);
                } else if outcome != PodOutcome::Terminating {
                    // Only a race between two controllers leaves an older attempt running.
                    deletes.push(Action::DeletePod {
                        name: pod_name(&job.name, role, index, attempt),
                        reason: format!("{name}: superseded by attempt {}", current.unwrap_or(0)),
                        immediate: false,
                    });
                }
            }
            let need = match current {
                None => Need::Create(0),
                Some(a) => {
                    // Either the attempt still runs (its need), or how it ended.
                    let now = match attempts.get(&a) {
                        Some(pod) => match observe(pod, role) {
                            PodOutcome::Waiting | PodOutcome::Terminating => {
                                Err(Need::Live { attempt: a, settled: false })
                            }
                            PodOutcome::Running { ready } => {
                                Err(Need::Live { attempt: a, settled: role == Role::Worker || ready })
                            }
                            ended => Ok(ending_of(&ended).expect("an ended outcome has an ending")),
                        },
                        None => Ok(rec.ended.get(&a).cloned().unwrap_or_else(|| {
                            // Recorded as created, gone without ending: deleted or evicted.
                            Ending::Disrupted { reason: "the pod was deleted before it ended".into() }
                        })),
                    };
                    match now {
                        Err(live) => live,
                        Ok(ending) => {
                            // An attempt stopped for a restart of the whole job ended as it was
                            // recorded then, whatever its pod says (killed: exit 137).
                            let ending = match rec.ended.get(&a) {
                                Some(e @ Ending::Disrupted { .. }) => e.clone(),
                                _ => ending,
                            };
                            let first_time = !status
                                .records(role)
                                .get(index as usize)
                                .is_some_and(|p| p.ended.contains_key(&a));
                            rec.ended.insert(a, ending.clone());
                            next_step(
                                role,
                                &name,
                                a,
                                &ending,
                                rec.restarts(),
                                job,
                                kube,
                                first_time,
                                &mut notes,
                            )
                        }
                    }
                }
            };
            needs.push((role, index, need));
        }
    }

    let workers_done = needs.iter().filter(|(r, _, n)| *r == Role::Worker && *n == Need::Done).count();
    let fatal: Vec<String> = needs
        .iter()
        .filter_map(|(_, _, n)| match n {
            Need::Fatal(m) => Some(m.clone()),
            _ => None,
        })
        .collect();
    let mut lost_without_checkpoint: Option<String> = None;

    // A server's attempt ended while the job runs: its part of the model is gone, and a new
    // attempt alone would restore an older step than the others hold. So every process
    // restarts from the latest checkpoint: the live pods are killed at once (a server stopped
    // gracefully would try a last checkpoint that cannot be complete without the lost shard),
    // and nothing is created until the last of them is gone, so that every new server resolves
    // the same `latest`. Stopped attempts are recorded as disruptions: not counted as restarts.
    let server_lost = needs.iter().any(|(r, _, n)| *r == Role::Ps && matches!(n, Need::Create(a) if *a > 0));
    let mut old_pods_left = 0;
    if server_lost && fatal.is_empty() && stop.is_none() && workers_done < job.workers as usize {
        if job.checkpoint.is_none() {
            let lost = needs
                .iter()
                .find(|(r, _, n)| *r == Role::Ps && matches!(n, Need::Create(a) if *a > 0))
                .map(|(_, i, _)| proc_name(Role::Ps, *i))
                .unwrap_or_default();
            lost_without_checkpoint =
                Some(format!("{lost} ended and the job has no [checkpoint] section to restart it from"));
        } else {
            for (role, index, need) in needs.iter_mut() {
                let Need::Live { attempt, .. } = *need else { continue };
                let name = proc_name(*role, *index);
                let rec = &mut new.records_mut(*role)[*index as usize];
                if !rec.ended.contains_key(&attempt) {
                    rec.ended.insert(
                        attempt,
                        Ending::Disrupted {
                            reason: "restarted with the job from the latest checkpoint".into(),
                        },
                    );
                    notes.push(format!(
                        "{name} attempt {attempt}: stopping it to restart every process from the latest checkpoint"
                    ));
                }
                let pod = by_proc.get(&(*role == Role::Worker, *index)).and_then(|a| a.get(&attempt));
                if pod.is_some_and(|p| p.metadata.deletion_timestamp.is_none()) {
                    deletes.push(Action::DeletePod {
                        name: pod_name(&job.name, *role, *index, attempt),
                        reason: format!("{name}: a server was lost; restarting from the latest checkpoint"),
                        immediate: true,
                    });
                }
                *need = Need::Create(attempt + 1);
            }
            old_pods_left = remaining;
        }
    }
    let fatal: Vec<String> = fatal.into_iter().chain(lost_without_checkpoint).collect();

    let mut creates = Vec::new();
    let mut retry_after: Option<Duration> = None;
    let mut backing_off: Vec<String> = Vec::new();
    if workers_done == job.workers as usize {
        new.state = JobState::Succeeded;
        new.message = Some(format!("all {} worker(s) succeeded", job.workers));
        deletes = delete_active("the job succeeded: servers are stopped at once");
    } else if let Some(reason) = stop {
        new.state = JobState::Failed;
        new.message = Some(reason.to_string());
        deletes = delete_active(reason);
    } else if let Some(first) = fatal.first() {
        new.state = JobState::Failed;
        new.message = Some(match fatal.len() {
            1 => first.clone(),
            n => format!("{first} (and {} more)", n - 1),
        });
        deletes = delete_active("the job failed");
    } else {
        let servers_ready = needs
            .iter()
            .filter(|(r, _, _)| *r == Role::Ps)
            .all(|(_, _, n)| matches!(n, Need::Live { settled: true, .. }));
        let mut waiting_for_servers = 0;
        for (role, index, need) in &needs {
            if old_pods_left > 0 {
                break;
            }
            if let Need::Create(attempt) = need {
                if *role == Role::Worker && !servers_ready && kube.gang == Gang::None {
                    waiting_for_servers += 1;
                    continue;
                }
                // After a counted failure, the next pod waits out the backoff.
                let rec = &new.records(*role)[*index as usize];
                let previous = attempt.checked_sub(1);
                let failed_pod = previous
                    .filter(|p| matches!(rec.ended.get(p), Some(Ending::Failed { .. })))
                    .and_then(|p| by_proc.get(&(*role == Role::Worker, *index))?.get(&p));
                if let Some(ended_at) = failed_pod.and_then(|p| finished_at(p)) {
                    let delay = restart_delay(rec.restarts(), kube.restart_backoff, kube.max_restart_backoff);
                    let due = ended_at + delay;
                    if due > now {
                        let left = Duration::try_from(due.duration_since(now)).unwrap_or(delay);
                        retry_after = Some(retry_after.map_or(left, |r| r.min(left)));
                        backing_off.push(format!(
                            "{} in {}",
                            proc_name(*role, *index),
                            humantime_serde::re::humantime::format_duration(delay)
                        ));
                        continue;
                    }
                }
                new.records_mut(*role)[*index as usize].attempt = Some(*attempt);
                let pod = r.pod(*role, *index, *attempt);
                creates.push(Action::CreatePod(Box::new(pod)));
            }
        }
        let restarting = needs.iter().any(|(_, _, n)| match n {
            Need::Create(a) => *a > 0,
            Need::Live { attempt, settled } => *attempt > 0 && !settled,
            _ => false,
        });
        let settled =
            needs.iter().all(|(_, _, n)| matches!(n, Need::Live { settled: true, .. } | Need::Done));
        new.state = if restarting {
            JobState::Restarting
        } else if settled {
            JobState::Running
        } else {
            JobState::Pending
        };
        new.message = if old_pods_left > 0 {
            Some(format!("restarting from the latest checkpoint: waiting for {old_pods_left} pod(s) to stop"))
        } else if !backing_off.is_empty() {
            Some(format!("restart backoff (kubernetes.restart_backoff): {}", backing_off.join(", ")))
        } else {
            (waiting_for_servers > 0)
                .then(|| format!("{waiting_for_servers} worker(s) wait for every server to be ready"))
        };
    }

    if new.state != status.state {
        let why = new.message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default();
        notes.push(format!("job {}: {} -> {}{why}", job.name, status.state, new.state));
    }
    let mut actions = creates;
    if new != *status {
        actions.push(Action::RecordStatus(Box::new(new.clone())));
    }
    actions.extend(deletes);
    if new.state.is_terminal() {
        actions.extend(end_pod_group(r, &mine));
    }
    let finished = new.state.is_terminal()
        && remaining == 0
        && !actions.iter().any(|a| matches!(a, Action::CreatePod(_) | Action::DeletePod { .. }));
    Decision { status: new, actions, notes, finished, retry_after }
}

/// With `gang = "kueue"`, once the job is over: every pod of the job not yet marked
/// `retriable-in-group: "false"` is marked, and if a pod being deleted was never scheduled
/// (the group was still queued; Kueue holds such a pod until its Workload goes), the Workload
/// is deleted. Nothing otherwise.
fn end_pod_group(r: &Renderer, mine: &[&Pod]) -> Vec<Action> {
    if r.settings().gang != Gang::Kueue {
        return Vec::new();
    }
    let mut actions: Vec<Action> = mine
        .iter()
        .filter(|p| {
            p.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_KUEUE_RETRIABLE_IN_GROUP))
                != Some(&"false".to_string())
        })
        .map(|p| Action::EndPodGroup { pod: p.metadata.name.clone().unwrap_or_default() })
        .collect();
    let stuck = mine.iter().any(|p| {
        p.metadata.deletion_timestamp.is_some()
            && p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_none()
            && member(p).is_some_and(|(role, _, _)| !observe(p, role).is_ended())
    });
    if stuck {
        actions.push(Action::DeleteWorkload { name: group_name(&r.job().name) });
    }
    actions
}

fn owned_by(pod: &Pod, uid: Option<&str>) -> bool {
    let Some(uid) = uid else { return true };
    pod.metadata.owner_references.as_ref().is_some_and(|refs| refs.iter().any(|o| o.uid == uid))
}

fn ending_of(outcome: &PodOutcome) -> Option<Ending> {
    match outcome {
        PodOutcome::Succeeded => Some(Ending::Succeeded),
        PodOutcome::Failed { code, reason } => Some(Ending::Failed { code: *code, reason: reason.clone() }),
        PodOutcome::Disrupted { reason } => Some(Ending::Disrupted { reason: reason.clone() }),
        _ => None,
    }
}

/// What follows the end of attempt `a` of a process.
#[allow(clippy::too_many_arguments)]
fn next_step(
    role: Role,
    name: &str,
    a: u32,
    ending: &Ending,
    failures: u32,
    job: &JobConfig,
    kube: &super::KubernetesConfig,
    first_time: bool,
    notes: &mut Vec<String>,
) -> Need {
    let limit = job.launcher.max_restarts;
    let mut note = |text: String| {
        if first_time {
            notes.push(text);
        }
    };
    match ending {
        Ending::Succeeded if role == Role::Worker => {
            note(format!("{name} succeeded"));
            Need::Done
        }
        Ending::Succeeded => Need::Create(a + 1),
        Ending::Disrupted { reason } => {
            note(format!(
                "{name} attempt {a} was disrupted ({reason}); recreating it (not counted as a restart)"
            ));
            Need::Create(a + 1)
        }
        Ending::Failed { code, reason } => {
            let retryable = role == Role::Ps || code.is_none_or(|c| kube.retryable_exit_codes.contains(&c));
            if !retryable {
                let code = code.unwrap_or_default();
                let msg = format!(
                    "{name} failed with {reason}; exit code {code} is not in kubernetes.retryable_exit_codes {:?}",
                    kube.retryable_exit_codes
                );
                note(msg.clone());
                return Need::Fatal(msg);
            }
            if reason.starts_with(DEADLINE_EXCEEDED) {
                let msg = format!("{name} ran longer than kubernetes.active_deadline ({reason})");
                note(msg.clone());
                return Need::Fatal(msg);
            }
            if failures > limit {
                let msg = format!(
                    "{name} failed {failures} times, more than launcher.max_restarts = {limit}; last: {reason}"
                );
                note(msg.clone());
                return Need::Fatal(msg);
            }
            let restore = if role == Role::Ps { " with GRADFLOW_RESTORE=latest" } else { "" };
            note(format!(
                "{name} attempt {a} failed with {reason}; recreating it{restore} (restart {failures} of {limit})"
            ));
            Need::Create(a + 1)
        }
    }
}

/// Pods of one role by how they are doing.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RoleCounts {
    pub role: String,
    /// Pods not ended (pending or running).
    pub active: u32,
    pub succeeded: u32,
    /// Pods that failed or were disrupted.
    pub failed: u32,
}

/// One pod, as `gradflow status` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PodSummary {
    pub name: String,
    pub role: String,
    pub index: u32,
    pub attempt: u32,
    /// The pod's phase, or `Terminating`.
    pub phase: String,
    pub ready: bool,
    /// Counted restarts of this pod's process so far.
    pub restarts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// What is wrong, from the pod's status: unschedulable, image pull, OOMKilled, ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// What `gradflow status` shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobSummary {
    pub job: String,
    pub namespace: String,
    pub state: JobState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub roles: Vec<RoleCounts>,
    pub pods: Vec<PodSummary>,
    /// The latest warning event about one of the job's pods, else the latest attempt's
    /// problem from pod status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// What is wrong with a pod, from its status alone.
pub fn pod_problem(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    if let Some(c) = disruption(pod) {
        return Some(describe_condition(c));
    }
    if let Some(reason) = &status.reason {
        return Some(match &status.message {
            Some(m) => format!("{reason}: {m}"),
            None => reason.clone(),
        });
    }
    let containers =
        status.init_container_statuses.iter().flatten().chain(status.container_statuses.iter().flatten());
    for c in containers {
        let Some(state) = &c.state else { continue };
        if let Some(t) = &state.terminated
            && t.exit_code != 0
        {
            let reason = t.reason.clone().unwrap_or_else(|| "Error".into());
            return Some(format!("{}: {reason} (exit code {})", c.name, t.exit_code));
        }
        if let Some(w) = &state.waiting
            && let Some(reason) = &w.reason
            && !matches!(reason.as_str(), "ContainerCreating" | "PodInitializing")
        {
            return Some(match &w.message {
                Some(m) => format!("{}: {reason}: {m}", c.name),
                None => format!("{}: {reason}", c.name),
            });
        }
    }
    if let Some(c) = condition(pod, "PodScheduled").filter(|c| c.status == "False") {
        return Some(describe_condition(c));
    }
    None
}

/// The summary of a job from its record, its pods and the namespace's warning events.
pub fn summarize(r: &Renderer, status: &JobStatus, pods: &[Pod], events: &[Event]) -> JobSummary {
    let job = r.job();
    let mut rows: Vec<PodSummary> = pods
        .iter()
        .filter(|p| {
            p.metadata.labels.as_ref().and_then(|l| l.get(LABEL_JOB)) == Some(&job.name)
                && owned_by(p, r.owner_uid())
        })
        .filter_map(|pod| {
            let (role, index, attempt) = member(pod)?;
            let phase = if pod.metadata.deletion_timestamp.is_some() && !observe(pod, role).is_ended() {
                "Terminating".to_string()
            } else {
                pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_else(|| "Pending".into())
            };
            Some(PodSummary {
                name: pod.metadata.name.clone().unwrap_or_default(),
                role: role.as_str().into(),
                index,
                attempt,
                phase,
                ready: condition(pod, "Ready").is_some_and(|c| c.status == "True"),
                restarts: status.records(role).get(index as usize).map_or(0, ProcessRecord::restarts),
                node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                problem: pod_problem(pod),
            })
        })
        .collect();
    rows.sort_by_key(|p| (p.role != "ps", p.index, p.attempt));
    let roles = ["ps", "worker"]
        .into_iter()
        .map(|role| {
            let mut c = RoleCounts { role: role.into(), ..RoleCounts::default() };
            for p in rows.iter().filter(|p| p.role == role) {
                match p.phase.as_str() {
                    "Succeeded" => c.succeeded += 1,
                    "Failed" => c.failed += 1,
                    _ => c.active += 1,
                }
            }
            c
        })
        .collect();
    let names: Vec<&str> = rows.iter().map(|p| p.name.as_str()).collect();
    let time = |e: &Event| {
        e.last_timestamp
            .as_ref()
            .map(|t| t.0)
            .or_else(|| e.event_time.as_ref().map(|t| t.0))
            .or_else(|| e.first_timestamp.as_ref().map(|t| t.0))
            .or_else(|| e.metadata.creation_timestamp.as_ref().map(|t| t.0))
    };
    let event = events
        .iter()
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .filter(|e| e.involved_object.name.as_deref().is_some_and(|n| names.contains(&n)))
        .max_by_key(|e| time(e))
        .map(|e| {
            format!(
                "{}: {}: {}",
                e.involved_object.name.as_deref().unwrap_or_default(),
                e.reason.as_deref().unwrap_or("Warning"),
                e.message.as_deref().unwrap_or_default().trim()
            )
        });
    let latest_problem =
        rows.iter().rev().find_map(|p| p.problem.as_ref().map(|q| format!("{}: {q}", p.name)));
    JobSummary {
        job: job.name.clone(),
        namespace: r.namespace().to_string(),
        state: status.state,
        message: status.message.clone(),
        roles,
        pods: rows,
        problem: event.or(latest_problem),
    }
}

/// Lines describing what changed between two summaries of a job: pods that appeared or
/// changed phase or problem. What `launch` prints while it follows a job.
pub fn changes(before: Option<&JobSummary>, after: &JobSummary) -> Vec<String> {
    let mut out = Vec::new();
    for pod in &after.pods {
        let old = before.and_then(|b| b.pods.iter().find(|p| p.name == pod.name));
        let show = |p: &PodSummary| (p.phase.clone(), p.ready, p.problem.clone());
        if old.map(show) == Some(show(pod)) {
            continue;
        }
        let ready = if pod.phase == "Running" && pod.role == "ps" {
            if pod.ready { " (ready)" } else { " (not ready)" }
        } else {
            ""
        };
        let problem = pod.problem.as_ref().map(|p| format!(": {p}")).unwrap_or_default();
        out.push(format!("pod {} {}{ready}{problem}", pod.name, pod.phase));
    }
    out
}

impl std::fmt::Display for JobSummary {
    /// The table `gradflow status` prints.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "job {} (namespace {}): {}", self.job, self.namespace, self.state)?;
        if let Some(m) = &self.message {
            writeln!(f, "  {m}")?;
        }
        writeln!(f)?;
        writeln!(f, "{:<8} {:>7} {:>10} {:>7}", "ROLE", "ACTIVE", "SUCCEEDED", "FAILED")?;
        for r in &self.roles {
            writeln!(f, "{:<8} {:>7} {:>10} {:>7}", r.role, r.active, r.succeeded, r.failed)?;
        }
        writeln!(f)?;
        let width = self.pods.iter().map(|p| p.name.len()).max().unwrap_or(3).max(3);
        writeln!(
            f,
            "{:<width$}  {:<11} {:>5} {:>7} {:>8}  PROBLEM",
            "POD", "PHASE", "READY", "ATTEMPT", "RESTARTS"
        )?;
        for p in &self.pods {
            writeln!(
                f,
                "{:<width$}  {:<11} {:>5} {:>7} {:>8}  {}",
                p.name,
                p.phase,
                if p.ready { "yes" } else { "no" },
                p.attempt,
                p.restarts,
                p.problem.as_deref().unwrap_or("")
            )?;
        }
        if let Some(p) = &self.problem {
            writeln!(f, "\nlast problem: {p}")?;
        }
        Ok(())
    }
}
