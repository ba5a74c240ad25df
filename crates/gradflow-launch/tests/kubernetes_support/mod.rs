//! Shared by the Kubernetes tests: jobs, pods in every state a kubelet reports, and a tiny
//! in-memory cluster that applies the controller's actions.

#![allow(dead_code)]

use std::collections::BTreeMap;

use gradflow_job::{JobConfig, Role};
use gradflow_launch::kubernetes::config::parse_job;
use gradflow_launch::kubernetes::controller::{Action, Decision, JobStatus, decide};
use gradflow_launch::kubernetes::render::{Renderer, pod_name};
use k8s_openapi::api::core::v1::{
    ConfigMap, ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, Pod,
    PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

pub const ROOT_UID: &str = "0f6e2a8c-root";

/// A small job with `servers` and `workers`, up to `max_restarts` restarts, checkpoints on S3,
/// image fixed so that goldens do not follow the crate version.
pub fn job(servers: u32, workers: u32, max_restarts: u32) -> JobConfig {
    job_with(servers, workers, max_restarts, "")
}

/// [`job`] with more lines in its `[kubernetes]` section.
pub fn job_with(servers: u32, workers: u32, max_restarts: u32, kubernetes: &str) -> JobConfig {
    parse_job(&format!(
        "name = \"demo\"\nservers = {servers}\nworkers = {workers}\n\
         [model]\nkind = \"logistic_regression\"\n[data]\ntrain = \"data/train.libsvm\"\nformat = \"libsvm\"\n\
         [launcher]\nmax_restarts = {max_restarts}\ngrace_period = \"30s\"\n\
         [checkpoint]\nurl = \"s3://demo-bucket/checkpoints\"\n\
         [kubernetes]\nimage = \"registry.example.com/gradflow:test\"\n{kubernetes}"
    ))
    .unwrap()
}

/// `[kubernetes]` lines of a job gang-scheduled by Volcano.
pub const VOLCANO: &str = "gang = \"volcano\"\nqueue = \"team-a\"\n";
/// `[kubernetes]` lines of a job gang-scheduled by Kueue.
pub const KUEUE: &str = "gang = \"kueue\"\nqueue = \"team-a\"\n";

/// Kueue stopped the pod (its Workload was preempted or evicted): the kubelet ends it with
/// SIGTERM, and the pod has Kueue's `TerminationTarget` condition.
pub fn stopped_by_kueue(pod: Pod) -> Pod {
    let mut pod = terminated(pod, "Failed", 143, "Error");
    pod.status.as_mut().unwrap().conditions.as_mut().unwrap().push(cond(
        "TerminationTarget",
        "True",
        Some("WorkloadEvictedDueToPreempted"),
        Some("Preempted to accommodate a workload (UID: 1234) due to prioritization in the ClusterQueue"),
    ));
    pod
}

/// The job's root ConfigMap as the API server would return it.
pub fn root(r: &Renderer, uid: &str) -> ConfigMap {
    let mut cm = r.root(&JobStatus::new(r.job()));
    cm.metadata.uid = Some(uid.into());
    cm.metadata.resource_version = Some("1".into());
    cm
}

pub fn renderer(job: JobConfig) -> Renderer {
    let r = Renderer::new(job, "ml").unwrap();
    let cm = root(&r, ROOT_UID);
    r.with_owner(&cm).unwrap()
}

fn set_status(mut pod: Pod, f: impl FnOnce(&mut PodStatus)) -> Pod {
    let mut status = pod.status.take().unwrap_or_default();
    f(&mut status);
    pod.status = Some(status);
    pod
}

fn cond(kind: &str, status: &str, reason: Option<&str>, message: Option<&str>) -> PodCondition {
    PodCondition {
        type_: kind.into(),
        status: status.into(),
        reason: reason.map(Into::into),
        message: message.map(Into::into),
        ..PodCondition::default()
    }
}

/// A pod as the API server returns it right after creation.
pub fn created(pod: &Pod) -> Pod {
    let mut pod = pod.clone();
    pod.metadata.uid = Some(format!("uid-{}", pod.metadata.name.as_deref().unwrap()));
    set_status(pod, |s| s.phase = Some("Pending".into()))
}

pub fn unschedulable(pod: Pod) -> Pod {
    set_status(pod, |s| {
        s.phase = Some("Pending".into());
        s.conditions = Some(vec![cond(
            "PodScheduled",
            "False",
            Some("Unschedulable"),
            Some("0/3 nodes are available: 3 Insufficient nvidia.com/gpu."),
        )]);
    })
}

pub fn image_pull_backoff(pod: Pod) -> Pod {
    let name = main_container(&pod);
    set_status(pod, |s| {
        s.phase = Some("Pending".into());
        s.container_statuses = Some(vec![ContainerStatus {
            name,
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("ImagePullBackOff".into()),
                    message: Some("Back-off pulling image \"nope:1\"".into()),
                }),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        }]);
    })
}

/// Bound to a node and running.
pub fn running(mut pod: Pod, ready: bool) -> Pod {
    pod.spec.get_or_insert_default().node_name.get_or_insert_with(|| "node-1".into());
    set_status(pod, |s| {
        s.phase = Some("Running".into());
        s.conditions = Some(vec![cond("Ready", if ready { "True" } else { "False" }, None, None)]);
    })
}

fn main_container(pod: &Pod) -> String {
    pod.spec.as_ref().unwrap().containers[0].name.clone()
}

fn terminated(pod: Pod, phase: &str, code: i32, reason: &str) -> Pod {
    let name = main_container(&pod);
    set_status(pod, |s| {
        s.phase = Some(phase.into());
        s.conditions = Some(vec![cond("Ready", "False", Some("PodCompleted"), None)]);
        s.container_statuses = Some(vec![ContainerStatus {
            name,
            state: Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: code,
                    reason: Some(reason.into()),
                    ..ContainerStateTerminated::default()
                }),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        }]);
    })
}

pub fn succeeded(pod: Pod) -> Pod {
    terminated(pod, "Succeeded", 0, "Completed")
}

pub fn failed(pod: Pod, code: i32, reason: &str) -> Pod {
    terminated(pod, "Failed", code, reason)
}

/// Evicted through the Eviction API (a drain) or preempted: the kubelet stops it with
/// SIGTERM and the pod gets the DisruptionTarget condition.
pub fn evicted(pod: Pod, reason: &str) -> Pod {
    let mut pod = terminated(pod, "Failed", 143, "Error");
    pod.status.as_mut().unwrap().conditions.as_mut().unwrap().push(cond(
        "DisruptionTarget",
        "True",
        Some(reason),
        Some("Eviction API: evicting"),
    ));
    pod
}

/// Evicted by the kubelet for node pressure, on a path without the condition.
pub fn kubelet_evicted(pod: Pod) -> Pod {
    set_status(pod, |s| {
        s.phase = Some("Failed".into());
        s.reason = Some("Evicted".into());
        s.message = Some("The node was low on resource: memory.".into());
    })
}

pub fn terminating(mut pod: Pod) -> Pod {
    pod.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(1_700_000_000).unwrap()));
    pod
}

/// The controller's view of a cluster: a record and pods, changed by actions and by the test.
pub struct Sim {
    pub r: Renderer,
    pub status: JobStatus,
    pub pods: BTreeMap<String, Pod>,
    /// Every action applied, in order.
    pub log: Vec<String>,
    /// The time passes are made at.
    pub now: Timestamp,
}

impl Sim {
    pub fn new(job: JobConfig) -> Sim {
        let r = renderer(job);
        let status = JobStatus::new(r.job());
        Sim {
            r,
            status,
            pods: BTreeMap::new(),
            log: Vec::new(),
            now: Timestamp::from_second(1_700_000_000).unwrap(),
        }
    }

    pub fn pods(&self) -> Vec<Pod> {
        self.pods.values().cloned().collect()
    }

    /// One pass, without applying anything.
    pub fn decide(&self, stop: Option<&str>) -> Decision {
        decide(&self.r, &self.status, &self.pods(), stop, self.now)
    }

    /// One pass, applied: created pods appear Pending, deleted ones become Terminating, the
    /// record is replaced.
    pub fn step(&mut self) -> Decision {
        self.step_with(None)
    }

    pub fn step_with(&mut self, stop: Option<&str>) -> Decision {
        let d = self.decide(stop);
        for a in &d.actions {
            match a {
                Action::CreatePod(p) => {
                    let name = p.metadata.name.clone().unwrap();
                    self.log.push(format!("create {name}"));
                    self.pods.entry(name).or_insert_with(|| created(p));
                }
                Action::RecordStatus(s) => {
                    self.log.push("record".into());
                    self.status = (**s).clone();
                }
                Action::DeletePod { name, .. } => {
                    self.log.push(format!("delete {name}"));
                    if let Some(p) = self.pods.remove(name) {
                        self.pods.insert(name.clone(), terminating(p));
                    }
                }
                Action::EndPodGroup { pod } => {
                    self.log.push(format!("end-group {pod}"));
                    if let Some(p) = self.pods.get_mut(pod) {
                        p.metadata
                            .annotations
                            .get_or_insert_default()
                            .insert("kueue.x-k8s.io/retriable-in-group".into(), "false".into());
                    }
                }
                Action::DeleteWorkload { name } => self.log.push(format!("delete-workload {name}")),
            }
        }
        d
    }

    pub fn name(&self, role: Role, index: u32, attempt: u32) -> String {
        pod_name(&self.r.job().name, role, index, attempt)
    }

    /// Changes one pod as a kubelet would.
    pub fn set(&mut self, role: Role, index: u32, attempt: u32, f: impl FnOnce(Pod) -> Pod) {
        let name = self.name(role, index, attempt);
        let pod = self.pods.remove(&name).unwrap_or_else(|| panic!("no pod {name}"));
        self.pods.insert(name, f(pod));
    }

    /// The pod is gone from the API (deleted, evicted and removed, garbage-collected).
    pub fn remove(&mut self, role: Role, index: u32, attempt: u32) {
        let name = self.name(role, index, attempt);
        self.pods.remove(&name).unwrap_or_else(|| panic!("no pod {name}"));
    }

    /// Pods that are being deleted finish terminating and go away.
    pub fn reap(&mut self) {
        self.pods.retain(|_, p| p.metadata.deletion_timestamp.is_none());
    }

    /// Every server running and ready, and every live worker running: the usual steady state.
    pub fn everything_runs(&mut self) {
        let names: Vec<String> = self.pods.keys().cloned().collect();
        for name in names {
            let pod = self.pods.remove(&name).unwrap();
            let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
            let pod = if phase == "Pending" { running(pod, true) } else { pod };
            self.pods.insert(name, pod);
        }
    }

    /// The log since the last call.
    pub fn take_log(&mut self) -> Vec<String> {
        std::mem::take(&mut self.log)
    }
}
