//! The controller's decisions, pass by pass, on an in-memory cluster: no API server, no
//! clock. Each test plays what kubelets and schedulers do between passes.

mod kubernetes_support;

use gradflow_job::Role::{Ps, Worker};
use gradflow_launch::kubernetes::ENV_RESTORE;
use gradflow_launch::kubernetes::controller::{
    Action, Ending, JobState, JobStatus, PodOutcome, changes, observe, restart_delay, summarize,
};
use k8s_openapi::api::core::v1::{Event, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kubernetes_support::*;
use std::time::Duration;

fn env(pod: &Pod, name: &str) -> Option<String> {
    pod.spec.as_ref().unwrap().containers[0]
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

/// Starts a job with `servers` and `workers` and brings it to Running.
fn running_job(servers: u32, workers: u32, max_restarts: u32) -> Sim {
    let mut sim = Sim::new(job(servers, workers, max_restarts));
    sim.step();
    sim.everything_runs();
    sim.step();
    sim.everything_runs();
    let d = sim.step();
    assert_eq!(sim.status.state, JobState::Running, "{:?}", d);
    sim.take_log();
    sim
}

#[test]
fn servers_start_first_and_workers_once_every_server_is_ready() {
    let mut sim = Sim::new(job(2, 3, 3));
    let d = sim.step();
    assert_eq!(sim.take_log(), ["create demo-ps-0-0", "create demo-ps-1-0", "record"]);
    assert_eq!(d.status.state, JobState::Pending);
    assert_eq!(d.status.message.as_deref(), Some("3 worker(s) wait for every server to be ready"));
    assert_eq!(d.status.ps[0].attempt, Some(0));
    assert_eq!(d.status.worker[0].attempt, None);

    // Scheduled and running, but one shard does not accept connections yet.
    sim.set(Ps, 0, 0, |p| running(p, true));
    sim.set(Ps, 1, 0, |p| running(p, false));
    let d = sim.step();
    assert!(d.actions.is_empty(), "{:?}", d.actions);
    assert_eq!(sim.take_log(), Vec::<String>::new());

    sim.set(Ps, 1, 0, |p| running(p, true));
    let d = sim.step();
    assert_eq!(
        sim.take_log(),
        ["create demo-worker-0-0", "create demo-worker-1-0", "create demo-worker-2-0", "record"]
    );
    assert_eq!(d.status.state, JobState::Pending);
    assert_eq!(d.status.message, None);

    sim.everything_runs();
    let d = sim.step();
    assert_eq!(d.status.state, JobState::Running);
    assert_eq!(d.notes, ["job demo: Pending -> Running"]);
    // Level-triggered: nothing changed, nothing to do, nothing to say.
    let d = sim.step();
    assert!(d.actions.is_empty() && d.notes.is_empty());
}

#[test]
fn a_worker_failing_with_a_retryable_code_is_recreated_and_counted() {
    let mut sim = running_job(1, 2, 3);
    sim.set(Worker, 1, 0, |p| failed(p, 137, "OOMKilled"));
    let d = sim.step();
    assert_eq!(sim.take_log(), ["create demo-worker-1-1", "record"]);
    assert_eq!(d.status.state, JobState::Restarting);
    assert_eq!(d.status.worker[1].attempt, Some(1));
    assert_eq!(d.status.worker[1].restarts(), 1);
    assert_eq!(
        d.status.worker[1].ended[&0],
        Ending::Failed { code: Some(137), reason: "exit code 137 (OOMKilled)".into() }
    );
    assert!(d.notes[0].contains("worker-1 attempt 0 failed with exit code 137 (OOMKilled)"), "{:?}", d.notes);
    assert!(d.notes[0].contains("restart 1 of 3"), "{:?}", d.notes);
    // The failed pod stays, with its logs; the new one has the next attempt in its contract.
    assert!(sim.pods.contains_key("demo-worker-1-0"));
    let new = &sim.pods["demo-worker-1-1"];
    assert_eq!(env(new, "GRADFLOW_ATTEMPT").as_deref(), Some("1"));
    assert_eq!(new.spec.as_ref().unwrap().hostname.as_deref(), Some("demo-worker-1"));

    // The same observation again: nothing new is decided or said.
    let d = sim.step();
    assert!(d.actions.is_empty() && d.notes.is_empty(), "{d:?}");

    sim.set(Worker, 1, 1, |p| running(p, false));
    let d = sim.step();
    assert_eq!(d.status.state, JobState::Running);
}

#[test]
fn a_worker_failing_with_a_code_not_listed_fails_the_job_and_stops_the_rest() {
    let mut sim = running_job(2, 2, 3);
    sim.set(Worker, 0, 0, |p| failed(p, 2, "Error"));
    let d = sim.step();
    assert_eq!(d.status.state, JobState::Failed);
    let msg = d.status.message.clone().unwrap();
    assert!(
        msg.contains("worker-0") && msg.contains("exit code 2") && msg.contains("retryable_exit_codes"),
        "{msg}"
    );
    // Record first, then the running pods go; the failed one stays for its logs.
    assert_eq!(
        sim.take_log(),
        ["record", "delete demo-ps-0-0", "delete demo-ps-1-0", "delete demo-worker-1-0"]
    );
    assert!(!d.finished);
    let d = sim.step();
    assert!(d.actions.is_empty(), "terminating pods are not deleted twice: {:?}", d.actions);
    assert!(!d.finished, "pods are still terminating");
    sim.reap();
    let d = sim.step();
    assert!(d.finished);
    assert_eq!(sim.pods.keys().collect::<Vec<_>>(), ["demo-worker-0-0"]);
}

#[test]
fn an_eviction_is_retried_without_counting_whatever_the_limit() {
    let mut sim = running_job(1, 1, 0);
    for attempt in 0..3 {
        sim.set(Worker, 0, attempt, |p| evicted(p, "EvictionByEvictionAPI"));
        let d = sim.step();
        assert_eq!(d.status.state, JobState::Restarting);
        assert_eq!(d.status.worker[0].restarts(), 0);
        assert_eq!(d.status.worker[0].disruptions(), attempt + 1);
        assert!(d.notes.iter().any(|n| n.contains("disrupted (EvictionByEvictionAPI")), "{:?}", d.notes);
        sim.everything_runs();
        sim.step();
    }
    // Preempted by the scheduler and evicted by a kubelet under memory pressure: the same.
    sim.set(Worker, 0, 3, |p| evicted(p, "PreemptionByScheduler"));
    sim.step();
    sim.everything_runs();
    sim.set(Worker, 0, 4, kubelet_evicted);
    let d = sim.step();
    assert_eq!(d.status.worker[0].disruptions(), 5);
    assert_eq!(d.status.state, JobState::Restarting);
}

#[test]
fn a_pod_that_vanishes_is_recreated_with_the_next_attempt() {
    let mut sim = running_job(1, 1, 3);
    // Evicted through the API and deleted: nothing is left to look at.
    sim.remove(Worker, 0, 0);
    let d = sim.step();
    assert_eq!(sim.take_log(), ["create demo-worker-0-1", "record"]);
    assert_eq!(
        d.status.worker[0].ended[&0],
        Ending::Disrupted { reason: "the pod was deleted before it ended".into() }
    );
    assert_eq!(d.status.worker[0].restarts(), 0);
}

#[test]
fn the_restart_limit_fails_the_job() {
    let mut sim = running_job(1, 1, 1);
    sim.set(Worker, 0, 0, |p| failed(p, 1, "Error"));
    sim.step();
    sim.everything_runs();
    sim.step();
    sim.set(Worker, 0, 1, |p| failed(p, 1, "Error"));
    let d = sim.step();
    assert_eq!(d.status.state, JobState::Failed);
    let msg = d.status.message.unwrap();
    assert!(msg.contains("worker-0 failed 2 times, more than launcher.max_restarts = 1"), "{msg}");
}

#[test]
fn a_failed_server_restarts_every_process_from_the_latest_checkpoint() {
    let mut sim = running_job(2, 2, 3);
    sim.set(Ps, 1, 0, |p| failed(p, 137, "OOMKilled"));
    let d = sim.step();
    // Everything else is killed at once; nothing is created while any of it remains.
    assert_eq!(
        sim.take_log(),
        ["record", "delete demo-ps-0-0", "delete demo-worker-0-0", "delete demo-worker-1-0"]
    );
    assert!(d.actions.iter().all(|a| !matches!(a, Action::DeletePod { immediate: false, .. })));
    assert_eq!(d.status.state, JobState::Restarting);
    assert_eq!(
        d.status.message.as_deref(),
        Some("restarting from the latest checkpoint: waiting for 3 pod(s) to stop")
    );
    assert_eq!(d.status.ps[1].restarts(), 1);
    assert!(d.notes.iter().any(|n| n.contains("ps-1 attempt 0 failed")), "{:?}", d.notes);
    assert!(d.notes.iter().any(|n| n.contains("worker-0 attempt 0: stopping it")), "{:?}", d.notes);
    // Still terminating: the next pass waits, and asks for no second deletion.
    let d = sim.step();
    assert_eq!(sim.take_log(), Vec::<String>::new(), "{:?}", d.actions);

    // Gone (killed: a worker's pod may also end as Failed 137 before it goes; the record wins).
    sim.set(Worker, 0, 0, |p| failed(p, 137, "Error"));
    sim.reap();
    let d = sim.step();
    assert_eq!(sim.take_log(), ["create demo-ps-0-1", "create demo-ps-1-1", "record"]);
    for shard in 0..2 {
        let new = &sim.pods[&format!("demo-ps-{shard}-1")];
        assert_eq!(env(new, ENV_RESTORE).as_deref(), Some("latest"), "ps-{shard}");
        assert_eq!(env(new, "GRADFLOW_ATTEMPT").as_deref(), Some("1"));
        // Same DNS name as before.
        assert_eq!(new.spec.as_ref().unwrap().hostname.as_deref(), Some(format!("demo-ps-{shard}").as_str()));
    }
    assert_eq!(d.status.message.as_deref(), Some("2 worker(s) wait for every server to be ready"));
    sim.everything_runs();
    let d = sim.step();
    assert_eq!(sim.take_log(), ["create demo-worker-0-1", "create demo-worker-1-1", "record"]);
    // Only the server's failure counts against launcher.max_restarts.
    assert_eq!((d.status.ps[1].restarts(), d.status.ps[0].restarts()), (1, 0));
    assert_eq!((d.status.worker[0].restarts(), d.status.worker[0].disruptions()), (0, 1));
    sim.everything_runs();
    let d = sim.step();
    assert_eq!(d.status.state, JobState::Running);
}

#[test]
fn a_failed_server_fails_a_job_without_checkpoints() {
    let mut j = job(2, 1, 3);
    j.checkpoint = None;
    let mut sim = Sim::new(j);
    sim.step();
    sim.everything_runs();
    sim.step();
    sim.everything_runs();
    sim.step();
    sim.take_log();
    sim.set(Ps, 0, 0, |p| failed(p, 1, "Error"));
    let d = sim.step();
    assert_eq!(d.status.state, JobState::Failed);
    assert_eq!(
        d.status.message.as_deref(),
        Some("ps-0 ended and the job has no [checkpoint] section to restart it from")
    );
    assert_eq!(sim.take_log(), ["record", "delete demo-ps-1-0", "delete demo-worker-0-0"]);
}

#[test]
fn a_server_that_exits_on_its_own_counts_as_a_failure() {
    let mut sim = running_job(1, 1, 3);
    sim.set(Ps, 0, 0, succeeded);
    let d = sim.step();
    assert_eq!(d.status.ps[0].restarts(), 1);
    assert_eq!(sim.take_log(), ["record", "delete demo-worker-0-0"]);
    sim.reap();
    sim.step();
    assert_eq!(sim.take_log(), ["create demo-ps-0-1", "record"]);
    // Drained: the server is stopped with SIGTERM and exits 0, but the pod says why.
    sim.everything_runs();
    sim.step();
    sim.set(Ps, 0, 1, |p| {
        let mut p = evicted(succeeded(p), "EvictionByEvictionAPI");
        p.status.as_mut().unwrap().phase = Some("Succeeded".into());
        p
    });
    let d = sim.step();
    assert_eq!((d.status.ps[0].restarts(), d.status.ps[0].disruptions()), (1, 1));
}

#[test]
fn success_stops_the_servers_at_once_and_keeps_the_workers_pods() {
    let mut sim = running_job(2, 2, 3);
    sim.set(Worker, 0, 0, succeeded);
    let d = sim.step();
    assert_eq!(d.status.state, JobState::Running, "one worker is still training");
    assert_eq!(d.status.worker[0].ended[&0], Ending::Succeeded);
    assert_eq!(d.notes, ["worker-0 succeeded"]);
    sim.take_log();
    sim.set(Worker, 1, 0, succeeded);
    let d = sim.step();
    assert_eq!(d.status.state, JobState::Succeeded);
    assert_eq!(sim.take_log(), ["record", "delete demo-ps-0-0", "delete demo-ps-1-0"]);
    assert!(d.notes.iter().any(|n| n == "job demo: Running -> Succeeded (all 2 worker(s) succeeded)"));
    sim.reap();
    let d = sim.step();
    assert!(d.finished && d.actions.is_empty());
    assert_eq!(sim.pods.len(), 2, "the workers' pods stay with their logs");
}

#[test]
fn a_worker_that_succeeded_and_was_deleted_is_not_trained_again() {
    let mut sim = running_job(1, 2, 3);
    sim.set(Worker, 0, 0, succeeded);
    sim.step();
    sim.remove(Worker, 0, 0);
    let d = sim.step();
    assert!(d.actions.is_empty(), "{:?}", d.actions);
    assert_eq!(d.status.state, JobState::Running);
}

#[test]
fn stopping_fails_the_job_and_deletes_what_runs() {
    let mut sim = running_job(1, 2, 3);
    sim.set(Worker, 1, 0, |p| failed(p, 137, "OOMKilled"));
    let d = sim.step_with(Some("interrupted"));
    assert_eq!(d.status.state, JobState::Failed);
    assert_eq!(d.status.message.as_deref(), Some("interrupted"));
    assert_eq!(sim.take_log(), ["record", "delete demo-ps-0-0", "delete demo-worker-0-0"]);
    // A terminal state is final: a later stop or failure changes nothing.
    sim.reap();
    let d = sim.step_with(Some("again"));
    assert_eq!(d.status.message.as_deref(), Some("interrupted"));
    assert!(d.finished && d.actions.is_empty());
}

#[test]
fn a_pod_created_but_not_recorded_is_adopted() {
    let mut sim = Sim::new(job(1, 1, 3));
    sim.step();
    // The controller died after creating ps-0 attempt 1 and before recording it.
    sim.set(Ps, 0, 0, |p| failed(p, 1, "Error"));
    let pod = sim.r.pod(Ps, 0, 1);
    sim.pods.insert("demo-ps-0-1".into(), created(&pod));
    let d = sim.step();
    assert!(!d.actions.iter().any(|a| matches!(a, Action::CreatePod(_))), "{:?}", d.actions);
    assert_eq!(d.status.ps[0].attempt, Some(1));
    assert_eq!(d.status.ps[0].restarts(), 1, "attempt 0's failure is still counted from its pod");
}

#[test]
fn pods_of_another_job_with_the_same_name_are_ignored() {
    let mut sim = Sim::new(job(1, 1, 3));
    let mut stranger = created(&sim.r.pod(Ps, 0, 0));
    stranger.metadata.owner_references.as_mut().unwrap()[0].uid = "an-earlier-job".into();
    let stranger = running(stranger, true);
    sim.pods.insert("demo-ps-0-0".into(), stranger);
    let d = sim.decide(None);
    assert!(
        matches!(&d.actions[0], Action::CreatePod(p) if p.metadata.name.as_deref() == Some("demo-ps-0-0"))
    );
}

#[test]
fn an_older_attempt_still_running_is_deleted() {
    let mut sim = running_job(1, 1, 3);
    // Two controllers raced: attempt 1 exists while attempt 0 still runs.
    let newer = created(&sim.r.pod(Worker, 0, 1));
    sim.pods.insert("demo-worker-0-1".into(), newer);
    let d = sim.step();
    assert_eq!(sim.take_log(), ["record", "delete demo-worker-0-0"]);
    assert_eq!(d.status.worker[0].attempt, Some(1));
}

#[test]
fn failures_without_an_exit_code_and_in_init_containers_are_classified() {
    let r = renderer(job(1, 1, 3));
    let pod = created(&r.pod(Worker, 0, 0));
    let mut no_code = pod.clone();
    no_code.status.as_mut().unwrap().phase = Some("Failed".into());
    no_code.status.as_mut().unwrap().reason = Some("UnexpectedAdmissionError".into());
    assert_eq!(
        observe(&no_code, Worker),
        PodOutcome::Failed { code: None, reason: "UnexpectedAdmissionError".into() }
    );

    let mut init = pod.clone();
    let status = init.status.as_mut().unwrap();
    status.phase = Some("Failed".into());
    status.init_container_statuses = Some(vec![k8s_openapi::api::core::v1::ContainerStatus {
        name: "prepare".into(),
        state: Some(k8s_openapi::api::core::v1::ContainerState {
            terminated: Some(k8s_openapi::api::core::v1::ContainerStateTerminated {
                exit_code: 1,
                reason: Some("Error".into()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }]);
    assert_eq!(
        observe(&init, Worker),
        PodOutcome::Failed { code: Some(1), reason: "exit code 1 (Error) in container prepare".into() }
    );
    assert_eq!(observe(&terminating(running(pod.clone(), true)), Worker), PodOutcome::Terminating);
    assert_eq!(observe(&unschedulable(pod), Worker), PodOutcome::Waiting);
}

#[test]
fn a_failure_without_exit_code_is_retried_and_counted() {
    let mut sim = running_job(1, 1, 3);
    sim.set(Worker, 0, 0, |mut p| {
        let s = p.status.as_mut().unwrap();
        s.phase = Some("Failed".into());
        s.reason = Some("UnexpectedAdmissionError".into());
        p
    });
    let d = sim.step();
    assert_eq!(d.status.worker[0].restarts(), 1);
    assert_eq!(sim.take_log(), ["create demo-worker-0-1", "record"]);
}

#[test]
fn the_record_round_trips_and_refuses_unknown_keys() {
    let mut sim = running_job(1, 2, 3);
    sim.set(Worker, 0, 0, |p| failed(p, 137, "OOMKilled"));
    sim.step();
    let json = sim.status.to_json();
    assert_eq!(JobStatus::from_json(&json).unwrap(), sim.status);
    assert!(JobStatus::from_json(&json.replacen("\"state\"", "\"stat\"", 1)).is_err());
}

#[test]
fn the_summary_counts_pods_and_names_the_last_problem() {
    let mut sim = running_job(1, 2, 3);
    sim.set(Worker, 0, 0, |p| failed(p, 137, "OOMKilled"));
    sim.step();
    sim.set(Worker, 0, 1, unschedulable);
    let mut pods = sim.pods();
    let mut puller = created(&sim.r.pod(Worker, 1, 0));
    puller = image_pull_backoff(puller);
    pods.retain(|p| p.metadata.name.as_deref() != Some("demo-worker-1-0"));
    pods.push(puller);

    let s = summarize(&sim.r, &sim.status, &pods, &[]);
    assert_eq!(s.state, JobState::Restarting);
    let worker = s.roles.iter().find(|r| r.role == "worker").unwrap();
    assert_eq!((worker.active, worker.succeeded, worker.failed), (2, 0, 1));
    let names: Vec<&str> = s.pods.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["demo-ps-0-0", "demo-worker-0-0", "demo-worker-0-1", "demo-worker-1-0"]);
    let by = |n: &str| s.pods.iter().find(|p| p.name == n).unwrap();
    assert_eq!(by("demo-worker-0-0").problem.as_deref(), Some("worker: OOMKilled (exit code 137)"));
    assert_eq!(by("demo-worker-0-0").restarts, 1);
    assert!(by("demo-worker-0-1").problem.as_deref().unwrap().starts_with("Unschedulable: 0/3 nodes"));
    assert!(by("demo-worker-1-0").problem.as_deref().unwrap().contains("ImagePullBackOff"));
    // Without events, the problem of the latest pod with one.
    assert!(s.problem.as_deref().unwrap().starts_with("demo-worker-1-0: worker: ImagePullBackOff"));

    // With events: the latest warning about one of the job's pods.
    let event = |pod: &str, reason: &str, at: i64, kind: &str| Event {
        involved_object: ObjectReference {
            name: Some(pod.into()),
            kind: Some("Pod".into()),
            ..Default::default()
        },
        reason: Some(reason.into()),
        message: Some(format!("{reason} happened")),
        type_: Some(kind.into()),
        last_timestamp: Some(Time(Timestamp::from_second(at).unwrap())),
        ..Default::default()
    };
    let events = [
        event("demo-worker-0-1", "FailedScheduling", 2_000, "Warning"),
        event("demo-worker-1-0", "Failed", 1_000, "Warning"),
        event("demo-worker-0-1", "Scheduled", 3_000, "Normal"),
        event("another-job-pod", "BackOff", 4_000, "Warning"),
    ];
    let s = summarize(&sim.r, &sim.status, &pods, &events);
    assert_eq!(s.problem.as_deref(), Some("demo-worker-0-1: FailedScheduling: FailedScheduling happened"));
    let table = s.to_string();
    assert!(table.starts_with("job demo (namespace ml): Restarting"), "{table}");
    assert!(table.contains("last problem: demo-worker-0-1: FailedScheduling"), "{table}");
}

#[test]
fn changes_name_new_and_changed_pods_once() {
    let mut sim = Sim::new(job(1, 1, 3));
    sim.step();
    let a = summarize(&sim.r, &sim.status, &sim.pods(), &[]);
    assert_eq!(changes(None, &a), ["pod demo-ps-0-0 Pending"]);
    sim.set(Ps, 0, 0, |p| running(p, false));
    let b = summarize(&sim.r, &sim.status, &sim.pods(), &[]);
    assert_eq!(changes(Some(&a), &b), ["pod demo-ps-0-0 Running (not ready)"]);
    assert!(changes(Some(&b), &b).is_empty());
    sim.set(Ps, 0, 0, |p| failed(p, 137, "OOMKilled"));
    let c = summarize(&sim.r, &sim.status, &sim.pods(), &[]);
    assert_eq!(changes(Some(&b), &c), ["pod demo-ps-0-0 Failed: ps: OOMKilled (exit code 137)"]);
}

/// The pod failed with `code`, its container ended at `at`.
fn failed_at(pod: Pod, code: i32, at: Timestamp) -> Pod {
    let mut pod = failed(pod, code, "Error");
    let statuses = pod.status.as_mut().unwrap().container_statuses.as_mut().unwrap();
    statuses[0].state.as_mut().unwrap().terminated.as_mut().unwrap().finished_at = Some(Time(at));
    pod
}

#[test]
fn restart_delays_double_up_to_the_maximum() {
    let (base, max) = (Duration::from_secs(10), Duration::from_secs(300));
    let delays: Vec<u64> = (0..8).map(|n| restart_delay(n, base, max).as_secs()).collect();
    assert_eq!(delays, [0, 10, 20, 40, 80, 160, 300, 300]);
    assert_eq!(restart_delay(u32::MAX, base, max), max);
}

#[test]
fn a_failed_worker_is_recreated_after_an_exponential_backoff() {
    let mut sim = running_job(1, 1, 5);
    let t0 = sim.now;
    // First failure: 10 s (the default restart_backoff) after its container ended.
    sim.set(Worker, 0, 0, |p| failed_at(p, 1, t0));
    let d = sim.step();
    assert_eq!(sim.take_log(), ["record"]);
    assert_eq!(d.retry_after, Some(Duration::from_secs(10)));
    assert_eq!(d.status.state, JobState::Restarting);
    assert_eq!(
        d.status.message.as_deref(),
        Some("restart backoff (kubernetes.restart_backoff): worker-0 in 10s")
    );
    sim.now = t0 + Duration::from_secs(4);
    let d = sim.step();
    assert_eq!((sim.take_log(), d.retry_after), (Vec::<String>::new(), Some(Duration::from_secs(6))));
    sim.now = t0 + Duration::from_secs(10);
    let d = sim.step();
    assert_eq!(sim.take_log(), ["create demo-worker-0-1", "record"]);
    assert_eq!(d.retry_after, None);

    // Second failure: 20 s.
    sim.set(Worker, 0, 1, |p| failed_at(p, 137, sim_time(t0, 15)));
    sim.now = sim_time(t0, 15);
    let d = sim.step();
    assert_eq!(d.retry_after, Some(Duration::from_secs(20)));
    assert_eq!(sim.take_log(), ["record"]);
    sim.now = sim_time(t0, 35);
    sim.step();
    assert_eq!(sim.take_log(), ["create demo-worker-0-2", "record"]);

    // An eviction is not the process's fault: replaced at once.
    sim.set(Worker, 0, 2, |p| evicted(p, "EvictionByEvictionAPI"));
    let d = sim.step();
    assert_eq!(sim.take_log(), ["create demo-worker-0-3", "record"]);
    assert_eq!(d.retry_after, None);
}

fn sim_time(t0: Timestamp, seconds: u64) -> Timestamp {
    t0 + Duration::from_secs(seconds)
}

#[test]
fn a_pod_past_its_active_deadline_fails_the_job() {
    let mut sim = running_job(1, 2, 3);
    sim.set(Worker, 1, 0, |p| {
        let mut p = failed(p, 137, "Error");
        let status = p.status.as_mut().unwrap();
        status.reason = Some("DeadlineExceeded".into());
        status.message = Some("Pod was active on the node longer than the specified deadline".into());
        p
    });
    let d = sim.step();
    assert_eq!(d.status.state, JobState::Failed);
    let message = d.status.message.unwrap();
    assert!(
        message.starts_with(
            "worker-1 ran longer than kubernetes.active_deadline (DeadlineExceeded: Pod was active"
        ),
        "{message}"
    );
    assert!(sim.take_log().iter().all(|a| !a.starts_with("create")));
}

#[test]
fn a_gang_creates_every_pod_at_once_and_restarts_them_together() {
    for gang in [VOLCANO, KUEUE] {
        let mut sim = Sim::new(job_with(2, 2, 3, gang));
        let d = sim.step();
        // The scheduler admits none of them until all exist: workers cannot wait for servers.
        assert_eq!(
            sim.take_log(),
            [
                "create demo-ps-0-0",
                "create demo-ps-1-0",
                "create demo-worker-0-0",
                "create demo-worker-1-0",
                "record"
            ],
            "{gang}"
        );
        assert_eq!(d.status.state, JobState::Pending);
        assert_eq!(d.status.message, None, "{gang}");
        sim.everything_runs();
        sim.step();
        assert_eq!(sim.status.state, JobState::Running);
        sim.take_log();

        // A lost server restarts everything from the latest checkpoint; once the old pods are
        // gone, the whole gang is created again in one pass.
        sim.set(Ps, 1, 0, |p| failed(p, 137, "OOMKilled"));
        sim.step();
        sim.reap();
        sim.take_log();
        sim.step();
        assert_eq!(
            sim.take_log(),
            [
                "create demo-ps-0-1",
                "create demo-ps-1-1",
                "create demo-worker-0-1",
                "create demo-worker-1-1",
                "record"
            ],
            "{gang}"
        );
    }
}

#[test]
fn a_pod_kueue_stopped_was_disrupted_and_is_not_counted() {
    let mut sim = Sim::new(job_with(1, 2, 0, KUEUE));
    sim.step();
    sim.everything_runs();
    sim.step();
    sim.take_log();
    let name = sim.name(Worker, 1, 0);
    sim.set(Worker, 1, 0, stopped_by_kueue);
    assert!(matches!(observe(&sim.pods[&name], Worker), PodOutcome::Disrupted { .. }));
    let d = sim.step();
    // max_restarts = 0: a counted failure would have failed the job.
    assert_eq!(sim.take_log(), ["create demo-worker-1-1", "record"]);
    assert_eq!(d.status.worker[1].restarts(), 0);
    assert!(matches!(d.status.worker[1].ended[&0], Ending::Disrupted { .. }));
    // The replacement is in the same Kueue group as the pod it replaces.
    let labels = sim.pods[&sim.name(Worker, 1, 1)].metadata.labels.clone().unwrap();
    assert_eq!(labels["kueue.x-k8s.io/pod-group-name"], "demo");
}

#[test]
fn a_kueue_job_that_is_over_ends_its_pod_group() {
    let mut sim = Sim::new(job_with(1, 2, 3, KUEUE));
    sim.step();
    sim.everything_runs();
    sim.step();
    sim.take_log();
    sim.set(Worker, 0, 0, succeeded);
    sim.set(Worker, 1, 0, succeeded);
    sim.step();
    assert_eq!(sim.status.state, JobState::Succeeded);
    // Every pod of the group is marked, the servers stopped; Kueue then finishes the Workload.
    assert_eq!(
        sim.take_log(),
        [
            "record",
            "delete demo-ps-0-0",
            "end-group demo-ps-0-0",
            "end-group demo-worker-0-0",
            "end-group demo-worker-1-0"
        ]
    );
    // Once marked, nothing more to do but wait for the servers to stop.
    sim.step();
    assert_eq!(sim.take_log(), Vec::<String>::new());
    sim.set(Ps, 0, 0, |p| failed(p, 143, "Error"));
    assert!(sim.step().finished);

    // Without Kueue nothing is marked.
    let mut sim = running_job(1, 1, 3);
    sim.set(Worker, 0, 0, succeeded);
    sim.step();
    assert!(sim.take_log().iter().all(|l| !l.starts_with("end-group")));
}

#[test]
fn a_stopped_kueue_job_still_queued_deletes_its_workload() {
    // Kueue has not admitted the group: the pods are gated, never scheduled. Deleted, they
    // stay (Kueue's finalizer) until the Workload goes.
    let mut sim = Sim::new(job_with(1, 1, 3, KUEUE));
    sim.step();
    sim.take_log();
    let d = sim.step_with(Some("interrupted"));
    assert_eq!(d.status.state, JobState::Failed);
    let log = sim.take_log();
    assert!(log.contains(&"delete demo-ps-0-0".to_string()), "{log:?}");
    // Deleted in this pass: the next pass sees them terminating with no node.
    let d = sim.step();
    assert!(!d.finished);
    assert_eq!(sim.take_log(), ["delete-workload demo"]);
    sim.reap();
    let d = sim.step();
    assert!(d.finished);
    assert_eq!(sim.take_log(), Vec::<String>::new());
}
