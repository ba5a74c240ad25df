//! The Kubernetes backend against a mock API server (kube-rs's `tower-test` pattern): every
//! request the client sends is checked (method, path, query, body) and answered by a small
//! in-memory API server that the tests also play kubelet on. Faults (409, 500) are injected
//! per request.

mod kubernetes_support;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use gradflow_job::Role::{self, Ps, Worker};
use gradflow_launch::kubernetes::client::{LogSelection, RunOutcome};
use gradflow_launch::kubernetes::controller::{JobState, JobStatus};
use gradflow_launch::kubernetes::{JobClient, KubernetesError, RECORD_STATUS_KEY};
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::batch::v1::Job as BatchJob;
use k8s_openapi::api::core::v1::{ConfigMap, Event, ObjectReference, Pod, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kubernetes_support::*;
use serde::Serialize;

const NS: &str = "ml";

/// What the mock API server holds and has seen.
#[derive(Default)]
struct State {
    config_maps: BTreeMap<String, ConfigMap>,
    secrets: BTreeMap<String, Secret>,
    services: BTreeMap<String, Service>,
    pods: BTreeMap<String, Pod>,
    jobs: BTreeMap<String, BatchJob>,
    events: Vec<Event>,
    logs: BTreeMap<String, String>,
    /// One line per request: what was asked, in order.
    requests: Vec<String>,
    /// One-shot faults: the next request whose line starts with the prefix gets the code.
    faults: VecDeque<(String, u16)>,
    /// One-shot races: the next request whose line starts with the prefix is carried out,
    /// but answered 409, as if another controller had done it a moment before.
    races: VecDeque<String>,
    next_uid: u32,
    next_rv: u64,
}

#[derive(Clone)]
struct Fake(Arc<Mutex<State>>);

fn status_body(code: u16, reason: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    }))
    .unwrap()
}

fn json(code: StatusCode, value: &impl Serialize) -> Response<Body> {
    Response::builder().status(code).body(Body::from(serde_json::to_vec(value).unwrap())).unwrap()
}

fn error(code: u16, reason: &str, message: &str) -> Response<Body> {
    Response::builder().status(code).body(Body::from(status_body(code, reason, message))).unwrap()
}

fn query(uri: &http::Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), urlencoding_decode(v)))
        .collect()
}

fn urlencoding_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

fn selected(labels: Option<&BTreeMap<String, String>>, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|kv| {
        let (k, v) = kv.split_once('=').unwrap();
        labels.and_then(|l| l.get(k)).map(String::as_str) == Some(v)
    })
}

impl State {
    fn uid(&mut self) -> String {
        self.next_uid += 1;
        format!("uid-{}", self.next_uid)
    }

    fn rv(&mut self) -> String {
        self.next_rv += 1;
        self.next_rv.to_string()
    }

    /// Answers one request, as the API server would for the few calls gradflow makes.
    fn handle(&mut self, method: &Method, uri: &http::Uri, body: &[u8]) -> Response<Body> {
        let path = uri.path().to_string();
        let q = query(uri);
        let (kind, rest) = if let Some(rest) = path.strip_prefix(&format!("/api/v1/namespaces/{NS}/")) {
            let mut parts = rest.splitn(2, '/');
            (parts.next().unwrap().to_string(), parts.next().map(str::to_string))
        } else if let Some(rest) = path.strip_prefix(&format!("/apis/batch/v1/namespaces/{NS}/")) {
            let mut parts = rest.splitn(2, '/');
            (parts.next().unwrap().to_string(), parts.next().map(str::to_string))
        } else {
            panic!("request outside namespace {NS}: {method} {uri}");
        };
        let line = match (method.as_str(), &rest) {
            ("GET", None) => {
                let sel = q.get("labelSelector").or(q.get("fieldSelector")).cloned().unwrap_or_default();
                format!("LIST {kind} {sel}")
            }
            ("POST", None) => {
                let v: serde_json::Value = serde_json::from_slice(body).expect("a POST has a JSON body");
                format!("POST {kind} {}", v["metadata"]["name"].as_str().unwrap())
            }
            ("DELETE", Some(name)) => {
                let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
                let extra =
                    match (&v["propagationPolicy"], &v["gracePeriodSeconds"], &v["preconditions"]["uid"]) {
                        (serde_json::Value::String(p), _, _) => format!(" propagation={p}"),
                        (_, serde_json::Value::Number(g), _) => format!(" grace={g}"),
                        (_, _, serde_json::Value::String(uid)) => format!(" uid={uid}"),
                        _ => String::new(),
                    };
                format!("DELETE {kind}/{name}{extra}")
            }
            (m, Some(name)) => {
                let extra = q.get("container").map(|c| format!(" container={c}")).unwrap_or_default();
                let follow = if q.get("follow").is_some_and(|f| f == "true") { " follow" } else { "" };
                format!("{m} {kind}/{name}{extra}{follow}")
            }
            (m, None) => panic!("unexpected {m} {uri}"),
        };
        self.requests.push(line.clone());
        if let Some(i) = self.faults.iter().position(|(prefix, _)| line.starts_with(prefix.as_str())) {
            let (_, code) = self.faults.remove(i).unwrap();
            let reason = match code {
                409 => "AlreadyExists",
                500 => "InternalError",
                _ => "Fault",
            };
            return error(code, reason, &format!("injected {code} for {line}"));
        }
        if let Some(i) = self.races.iter().position(|prefix| line.starts_with(prefix.as_str())) {
            self.races.remove(i);
            self.serve(method, &kind, rest.as_deref(), &q, body);
            return error(409, "AlreadyExists", &format!("{line}: created by someone else a moment ago"));
        }
        self.serve(method, &kind, rest.as_deref(), &q, body)
    }

    fn serve(
        &mut self,
        method: &Method,
        kind: &str,
        rest: Option<&str>,
        q: &BTreeMap<String, String>,
        body: &[u8],
    ) -> Response<Body> {
        match (method.as_str(), kind, rest) {
            ("POST", "configmaps", None) => {
                let mut cm: ConfigMap = serde_json::from_slice(body).unwrap();
                let name = cm.metadata.name.clone().unwrap();
                if self.config_maps.contains_key(&name) {
                    return error(409, "AlreadyExists", &format!("configmaps \"{name}\" already exists"));
                }
                cm.metadata.uid = Some(self.uid());
                cm.metadata.resource_version = Some(self.rv());
                self.config_maps.insert(name, cm.clone());
                json(StatusCode::CREATED, &cm)
            }
            ("GET", "configmaps", Some(name)) => match self.config_maps.get(name).cloned() {
                Some(cm) if cm.metadata.deletion_timestamp.is_some() => {
                    // The garbage collector finishes a foreground deletion: dependents first.
                    let uid = cm.metadata.uid.clone().unwrap();
                    let owned = |refs: &Option<Vec<_>>| {
                        refs.iter().flatten().any(
                            |o: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference| o.uid == uid,
                        )
                    };
                    self.pods.retain(|_, p| !owned(&p.metadata.owner_references));
                    self.secrets.retain(|_, s| !owned(&s.metadata.owner_references));
                    self.services.retain(|_, s| !owned(&s.metadata.owner_references));
                    self.jobs.retain(|_, j| !owned(&j.metadata.owner_references));
                    self.config_maps.remove(name);
                    json(StatusCode::OK, &cm)
                }
                Some(cm) => json(StatusCode::OK, &cm),
                None => error(404, "NotFound", &format!("configmaps \"{name}\" not found")),
            },
            ("PUT", "configmaps", Some(name)) => {
                let mut cm: ConfigMap = serde_json::from_slice(body).unwrap();
                let Some(current) = self.config_maps.get(name) else {
                    return error(404, "NotFound", "not found");
                };
                if cm.metadata.resource_version != current.metadata.resource_version {
                    return error(
                        409,
                        "Conflict",
                        "the object has been modified; please apply your changes to the latest version and try again",
                    );
                }
                assert_eq!(cm.metadata.uid, current.metadata.uid, "a replace keeps the uid");
                cm.metadata.resource_version = Some(self.rv());
                self.config_maps.insert(name.to_string(), cm.clone());
                json(StatusCode::OK, &cm)
            }
            ("DELETE", "configmaps", Some(name)) => match self.config_maps.get_mut(name) {
                Some(cm) => {
                    cm.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
                    json(StatusCode::OK, &cm.clone())
                }
                None => error(404, "NotFound", &format!("configmaps \"{name}\" not found")),
            },
            ("POST", "secrets", None) => {
                let mut secret: Secret = serde_json::from_slice(body).unwrap();
                let name = secret.metadata.name.clone().unwrap();
                if self.secrets.contains_key(&name) {
                    return error(409, "AlreadyExists", &format!("secrets \"{name}\" already exists"));
                }
                secret.metadata.uid = Some(self.uid());
                self.secrets.insert(name, secret.clone());
                json(StatusCode::CREATED, &secret)
            }
            ("GET", "secrets", Some(name)) => match self.secrets.get(name) {
                Some(s) => json(StatusCode::OK, s),
                None => error(404, "NotFound", &format!("secrets \"{name}\" not found")),
            },
            ("DELETE", "secrets", Some(name)) => {
                let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
                match self.secrets.get(name) {
                    Some(s)
                        if v["preconditions"]["uid"]
                            .as_str()
                            .is_some_and(|u| Some(u) != s.metadata.uid.as_deref()) =>
                    {
                        error(409, "Conflict", "Precondition failed: UID in precondition does not match")
                    }
                    Some(_) => json(StatusCode::OK, &self.secrets.remove(name).unwrap()),
                    None => error(404, "NotFound", &format!("secrets \"{name}\" not found")),
                }
            }
            ("POST", "services", None) => {
                let mut svc: Service = serde_json::from_slice(body).unwrap();
                let name = svc.metadata.name.clone().unwrap();
                if self.services.contains_key(&name) {
                    return error(409, "AlreadyExists", &format!("services \"{name}\" already exists"));
                }
                svc.metadata.uid = Some(self.uid());
                self.services.insert(name, svc.clone());
                json(StatusCode::CREATED, &svc)
            }
            ("GET", "services", Some(name)) => match self.services.get(name) {
                Some(s) => json(StatusCode::OK, s),
                None => error(404, "NotFound", "not found"),
            },
            ("POST", "jobs", None) => {
                let mut job: BatchJob = serde_json::from_slice(body).unwrap();
                job.metadata.uid = Some(self.uid());
                self.jobs.insert(job.metadata.name.clone().unwrap(), job.clone());
                json(StatusCode::CREATED, &job)
            }
            ("POST", "pods", None) => {
                let pod: Pod = serde_json::from_slice(body).unwrap();
                let name = pod.metadata.name.clone().unwrap();
                if self.pods.contains_key(&name) {
                    return error(409, "AlreadyExists", &format!("pods \"{name}\" already exists"));
                }
                let mut pod = created(&pod);
                pod.metadata.resource_version = Some(self.rv());
                self.pods.insert(name, pod.clone());
                json(StatusCode::CREATED, &pod)
            }
            ("GET", "pods", None) => {
                let sel = q.get("labelSelector").cloned().unwrap_or_default();
                let items: Vec<&Pod> =
                    self.pods.values().filter(|p| selected(p.metadata.labels.as_ref(), &sel)).collect();
                json(
                    StatusCode::OK,
                    &serde_json::json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}),
                )
            }
            ("DELETE", "pods", Some(name)) => match self.pods.get_mut(name) {
                Some(p) => {
                    // Graceful: the pod terminates; the test decides when it is gone.
                    p.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
                    json(StatusCode::OK, &p.clone())
                }
                None => error(404, "NotFound", &format!("pods \"{name}\" not found")),
            },
            ("GET", "pods", Some(sub)) if sub.ends_with("/log") => {
                let name = sub.trim_end_matches("/log");
                match self.logs.get(name) {
                    Some(text) => {
                        Response::builder().status(200).body(Body::from(text.clone().into_bytes())).unwrap()
                    }
                    None => error(404, "NotFound", "no logs"),
                }
            }
            ("GET", "events", None) => {
                let sel = q.get("fieldSelector").cloned().unwrap_or_default();
                assert_eq!(sel, "involvedObject.kind=Pod,type=Warning");
                let items: Vec<&Event> = self
                    .events
                    .iter()
                    .filter(|e| {
                        e.type_.as_deref() == Some("Warning")
                            && e.involved_object.kind.as_deref() == Some("Pod")
                    })
                    .collect();
                json(
                    StatusCode::OK,
                    &serde_json::json!({"apiVersion": "v1", "kind": "EventList", "metadata": {}, "items": items}),
                )
            }
            (m, k, r) => panic!("the mock does not serve {m} {k} {r:?}"),
        }
    }
}

impl Fake {
    /// A client whose every request is answered by the mock.
    fn start() -> (JobClient, Fake) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let fake = Fake(Arc::new(Mutex::new(State::default())));
        let state = fake.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let body = body.collect_bytes().await.unwrap();
                if matches!(parts.method, Method::POST | Method::PUT) {
                    assert_eq!(
                        parts.headers.get(http::header::CONTENT_TYPE).map(|v| v.to_str().unwrap()),
                        Some("application/json"),
                        "{} {}",
                        parts.method,
                        parts.uri
                    );
                }
                let response = state.0.lock().unwrap().handle(&parts.method, &parts.uri, &body);
                send.send_response(response);
            }
        });
        (JobClient::new(kube::Client::new(service, NS), NS), fake)
    }

    fn requests(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap().requests)
    }

    fn fail(&self, prefix: &str, code: u16) {
        self.0.lock().unwrap().faults.push_back((prefix.into(), code));
    }

    fn race(&self, prefix: &str) {
        self.0.lock().unwrap().races.push_back(prefix.into());
    }

    fn pod(&self, name: &str) -> Pod {
        self.0.lock().unwrap().pods.get(name).cloned().unwrap_or_else(|| panic!("no pod {name}"))
    }

    fn set(&self, role: Role, index: u32, attempt: u32, f: impl FnOnce(Pod) -> Pod) {
        let name = format!("demo-{}-{index}-{attempt}", role.as_str());
        let mut state = self.0.lock().unwrap();
        let pod = state.pods.remove(&name).unwrap_or_else(|| panic!("no pod {name}"));
        state.pods.insert(name, f(pod));
    }

    fn everything_runs(&self) {
        let mut state = self.0.lock().unwrap();
        for pod in state.pods.values_mut() {
            if pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending") {
                *pod = running(pod.clone(), true);
            }
        }
    }

    /// Pods being deleted are gone.
    fn reap(&self) {
        self.0.lock().unwrap().pods.retain(|_, p| p.metadata.deletion_timestamp.is_none());
    }

    fn status(&self) -> JobStatus {
        let state = self.0.lock().unwrap();
        JobStatus::from_json(&state.config_maps["demo"].data.as_ref().unwrap()[RECORD_STATUS_KEY]).unwrap()
    }

    fn root_uid(&self) -> String {
        self.0.lock().unwrap().config_maps["demo"].metadata.uid.clone().unwrap()
    }
}

const PASS_READ: [&str; 2] = ["GET configmaps/demo", "LIST pods gradflow.dev/job=demo"];

fn pass(rest: &[&str]) -> Vec<String> {
    PASS_READ.iter().chain(rest).map(|s| s.to_string()).collect()
}

/// Launches `job(servers, workers)` and brings it to Running; requests so far are dropped.
async fn running_job(
    servers: u32,
    workers: u32,
    max_restarts: u32,
) -> (gradflow_launch::kubernetes::Controller, Fake) {
    let (client, fake) = Fake::start();
    let c = client.launch(job(servers, workers, max_restarts), false).await.unwrap();
    c.reconcile(None).await.unwrap();
    fake.everything_runs();
    c.reconcile(None).await.unwrap();
    fake.everything_runs();
    let p = c.reconcile(None).await.unwrap();
    assert_eq!(p.decision.status.state, JobState::Running);
    fake.requests();
    (c, fake)
}

#[tokio::test]
async fn launch_creates_the_root_then_the_service_then_servers_then_workers() {
    let (client, fake) = Fake::start();
    let c = client.launch(job(2, 2, 3), false).await.unwrap();
    assert_eq!(fake.requests(), ["POST configmaps demo", "POST secrets demo-token", "POST services demo"]);
    let uid = fake.root_uid();
    assert_eq!(c.renderer().owner_uid(), Some(uid.as_str()));
    {
        let state = fake.0.lock().unwrap();
        let svc = &state.services["demo"];
        assert_eq!(svc.metadata.owner_references.as_ref().unwrap()[0].uid, uid);
        assert_eq!(svc.spec.as_ref().unwrap().publish_not_ready_addresses, Some(true));
    }

    let p = c.reconcile(None).await.unwrap();
    assert_eq!(
        fake.requests(),
        pass(&["POST pods demo-ps-0-0", "POST pods demo-ps-1-0", "PUT configmaps/demo"])
    );
    assert_eq!(p.decision.status.state, JobState::Pending);
    let ps = fake.pod("demo-ps-0-0");
    assert_eq!(ps.metadata.owner_references.as_ref().unwrap()[0].uid, uid);
    assert_eq!(ps.metadata.namespace.as_deref(), Some(NS));
    assert_eq!(fake.status().ps[1].attempt, Some(0));

    // Nothing to do while the servers start.
    c.reconcile(None).await.unwrap();
    assert_eq!(fake.requests(), pass(&[]));

    fake.everything_runs();
    c.reconcile(None).await.unwrap();
    assert_eq!(
        fake.requests(),
        pass(&["POST pods demo-worker-0-0", "POST pods demo-worker-1-0", "PUT configmaps/demo"])
    );
    fake.everything_runs();
    let p = c.reconcile(None).await.unwrap();
    assert_eq!(fake.requests(), pass(&["PUT configmaps/demo"]));
    assert_eq!(p.decision.status.state, JobState::Running);
    assert_eq!(p.summary.pods.len(), 4);
}

#[tokio::test]
async fn worker_failures_retryable_then_not() {
    let (c, fake) = running_job(1, 2, 3).await;
    fake.set(Worker, 0, 0, |p| failed(p, 137, "OOMKilled"));
    let p = c.reconcile(None).await.unwrap();
    assert_eq!(fake.requests(), pass(&["POST pods demo-worker-0-1", "PUT configmaps/demo"]));
    assert_eq!(p.decision.status.state, JobState::Restarting);
    assert_eq!(fake.status().worker[0].restarts(), 1);
    let new = fake.pod("demo-worker-0-1");
    assert_eq!(new.metadata.labels.as_ref().unwrap()["gradflow.dev/attempt"], "1");

    fake.everything_runs();
    c.reconcile(None).await.unwrap();
    fake.requests();
    fake.set(Worker, 1, 0, |p| failed(p, 2, "Error"));
    let p = c.reconcile(None).await.unwrap();
    assert_eq!(p.decision.status.state, JobState::Failed);
    // Record first, then the running pods; both failed pods stay.
    assert_eq!(
        fake.requests(),
        pass(&[
            "PUT configmaps/demo",
            "DELETE pods/demo-ps-0-0 grace=30",
            "DELETE pods/demo-worker-0-1 grace=30"
        ])
    );
    assert!(!p.decision.finished);
    fake.reap();
    let p = c.reconcile(None).await.unwrap();
    assert!(p.decision.finished);
    assert_eq!(fake.requests(), pass(&[]));
    let left: Vec<String> = fake.0.lock().unwrap().pods.keys().cloned().collect();
    assert_eq!(left, ["demo-worker-0-0", "demo-worker-1-0"]);
}

#[tokio::test]
async fn an_eviction_is_retried_and_not_counted() {
    let (c, fake) = running_job(1, 1, 0).await;
    fake.set(Worker, 0, 0, |p| evicted(p, "EvictionByEvictionAPI"));
    let p = c.reconcile(None).await.unwrap();
    assert_eq!(fake.requests(), pass(&["POST pods demo-worker-0-1", "PUT configmaps/demo"]));
    assert_eq!(p.decision.status.state, JobState::Restarting);
    let status = fake.status();
    assert_eq!((status.worker[0].restarts(), status.worker[0].disruptions()), (0, 1));
}

#[tokio::test]
async fn a_failed_server_is_recreated_with_restore() {
    let (c, fake) = running_job(2, 1, 3).await;
    fake.set(Ps, 0, 0, |p| failed(p, 139, "Error"));
    let p = c.reconcile(None).await.unwrap();
    // The others are killed at once (grace 0) before anything is recreated.
    assert_eq!(
        fake.requests(),
        pass(&[
            "PUT configmaps/demo",
            "DELETE pods/demo-ps-1-0 grace=0",
            "DELETE pods/demo-worker-0-0 grace=0"
        ])
    );
    assert_eq!(p.decision.status.state, JobState::Restarting);
    fake.reap();
    c.reconcile(None).await.unwrap();
    assert_eq!(
        fake.requests(),
        pass(&["POST pods demo-ps-0-1", "POST pods demo-ps-1-1", "PUT configmaps/demo"])
    );
    for shard in 0..2 {
        let env = fake.pod(&format!("demo-ps-{shard}-1")).spec.unwrap().containers[0].env.clone().unwrap();
        assert!(env.iter().any(|e| e.name == "GRADFLOW_RESTORE" && e.value.as_deref() == Some("latest")));
        assert!(env.iter().any(|e| e.name == "GRADFLOW_ATTEMPT" && e.value.as_deref() == Some("1")));
    }
    fake.everything_runs();
    c.reconcile(None).await.unwrap();
    assert_eq!(fake.requests(), pass(&["POST pods demo-worker-0-1", "PUT configmaps/demo"]));
    fake.everything_runs();
    let p = c.reconcile(None).await.unwrap();
    assert_eq!(p.decision.status.state, JobState::Running);
}

#[tokio::test]
async fn success_stops_the_servers() {
    let (c, fake) = running_job(2, 2, 3).await;
    fake.set(Worker, 0, 0, succeeded);
    fake.set(Worker, 1, 0, succeeded);
    let p = c.reconcile(None).await.unwrap();
    assert_eq!(p.decision.status.state, JobState::Succeeded);
    assert_eq!(
        fake.requests(),
        pass(&[
            "PUT configmaps/demo",
            "DELETE pods/demo-ps-0-0 grace=30",
            "DELETE pods/demo-ps-1-0 grace=30"
        ])
    );
    fake.reap();
    assert!(c.reconcile(None).await.unwrap().decision.finished);
}

#[tokio::test]
async fn conflicts_409() {
    // Launching a job that exists.
    let (client, fake) = Fake::start();
    client.launch(job(1, 1, 3), false).await.unwrap();
    let err = client.launch(job(1, 1, 3), false).await.err().unwrap();
    assert!(matches!(err, KubernetesError::AlreadyExists { .. }), "{err}");
    assert!(err.to_string().contains("gradflow delete demo"), "{err}");
    fake.requests();

    // A pod created by another controller between this pass's read and its create: the
    // pass goes on as if it had created it.
    let c = client.attach("demo").await.unwrap();
    assert_eq!(
        fake.requests(),
        ["GET configmaps/demo", "GET secrets/demo-token", "POST services demo", "GET services/demo"]
    );
    fake.race("POST pods demo-ps-0-0");
    c.reconcile(None).await.unwrap();
    assert_eq!(fake.requests(), pass(&["POST pods demo-ps-0-0", "PUT configmaps/demo"]));
    assert_eq!(fake.status().ps[0].attempt, Some(0));
    assert!(fake.0.lock().unwrap().pods.contains_key("demo-ps-0-0"));

    // The record changed between read and write: the pass ends, the next one re-reads.
    fake.everything_runs();
    fake.fail("PUT configmaps/demo", 409);
    let err = c.reconcile(None).await.err().unwrap();
    assert!(matches!(err, KubernetesError::Conflict), "{err}");
    assert_eq!(fake.requests(), pass(&["POST pods demo-worker-0-0", "PUT configmaps/demo"]));
    c.reconcile(None).await.unwrap();
    // The worker created by the failed pass is adopted, the record written this time.
    assert_eq!(fake.requests(), pass(&["PUT configmaps/demo"]));
    assert_eq!(fake.status().worker[0].attempt, Some(0));

    // A Service of the same name that is not the job's.
    let (client, fake) = Fake::start();
    {
        let mut state = fake.0.lock().unwrap();
        state.services.insert("demo".into(), Service { metadata: Default::default(), ..Default::default() });
    }
    let err = client.launch(job(1, 1, 3), false).await.err().unwrap();
    assert!(err.to_string().contains("does not belong to this job"), "{err}");
}

#[tokio::test]
async fn a_500_costs_a_pass_not_the_job() {
    let (client, fake) = Fake::start();
    let c = client.launch(job(1, 1, 3), false).await.unwrap();
    fake.requests();
    fake.fail("POST pods demo-ps-0-0", 500);
    let err = c.reconcile(None).await.err().unwrap();
    assert_eq!(err.http_status(), Some(500), "{err}");
    assert!(err.to_string().contains("creating pod demo-ps-0-0"), "{err}");
    assert_eq!(fake.requests(), pass(&["POST pods demo-ps-0-0"]));
    assert_eq!(fake.status().ps[0].attempt, None, "nothing recorded for a pod that was not created");
    c.reconcile(None).await.unwrap();
    assert_eq!(fake.requests(), pass(&["POST pods demo-ps-0-0", "PUT configmaps/demo"]));

    // A 500 on the read: the same.
    fake.fail("LIST pods", 500);
    assert_eq!(c.reconcile(None).await.err().unwrap().http_status(), Some(500));
    assert_eq!(fake.requests(), pass(&[]));
}

#[tokio::test]
async fn run_follows_the_job_to_its_end_through_errors() {
    let (client, fake) = Fake::start();
    let c = client.launch(job(1, 1, 3), false).await.unwrap().poll_interval(Duration::from_millis(5));
    // A kubelet: runs what is created, fails the first worker once, then lets it succeed.
    let kubelet = {
        let fake = fake.clone();
        tokio::spawn(async move {
            let mut failed_once = false;
            for _ in 0..2000 {
                tokio::time::sleep(Duration::from_millis(2)).await;
                let mut state = fake.0.lock().unwrap();
                let names: Vec<String> = state.pods.keys().cloned().collect();
                for name in names {
                    let pod = state.pods.remove(&name).unwrap();
                    let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
                    let pod = match (name.as_str(), phase.as_str()) {
                        (_, _) if pod.metadata.deletion_timestamp.is_some() => continue,
                        (_, "Pending") => running(pod, true),
                        ("demo-worker-0-0", "Running") if !failed_once => {
                            failed_once = true;
                            failed(pod, 1, "Error")
                        }
                        ("demo-worker-0-1", "Running") => succeeded(pod),
                        _ => pod,
                    };
                    state.pods.insert(name, pod);
                }
            }
        })
    };
    fake.fail("PUT configmaps/demo", 500);
    let mut lines = Vec::new();
    let outcome = c.run(std::future::pending(), |l| lines.push(l.to_string())).await.unwrap();
    kubelet.abort();
    let RunOutcome::Finished(summary) = outcome else { panic!("not finished") };
    assert_eq!(summary.state, JobState::Succeeded, "{lines:#?}");
    let text = lines.join("\n");
    assert!(text.contains("pass failed (writing the record of job demo"), "{text}");
    assert!(
        text.contains("worker-0 attempt 0 failed with exit code 1 (Error); recreating it (restart 1 of 3)"),
        "{text}"
    );
    assert!(text.contains("job demo: Restarting -> Succeeded") || text.contains("-> Succeeded"), "{text}");
    assert!(text.contains("pod demo-worker-0-1 Succeeded"), "{text}");
    assert_eq!(fake.status().state, JobState::Succeeded);
}

#[tokio::test]
async fn run_gives_up_after_repeated_failures_and_stops_on_cancel() {
    let (client, fake) = Fake::start();
    let c = client
        .launch(job(1, 1, 3), false)
        .await
        .unwrap()
        .poll_interval(Duration::from_millis(1))
        .max_failed_passes(3);
    for _ in 0..3 {
        fake.fail("GET configmaps/demo", 500);
    }
    let err = c.run(std::future::pending(), |_| {}).await.err().unwrap();
    assert!(matches!(err, KubernetesError::GaveUp { attempts: 3, .. }), "{err}");
    assert!(err.to_string().contains("gradflow attach demo"), "{err}");

    // Cancelled: the job is failed and what runs is deleted.
    fake.requests();
    let c = c.max_failed_passes(10);
    c.reconcile(None).await.unwrap();
    fake.everything_runs();
    fake.requests();
    let outcome = c.run(async {}, |_| {}).await.unwrap();
    let RunOutcome::Finished(summary) = outcome else { panic!() };
    assert_eq!(summary.state, JobState::Failed);
    assert_eq!(fake.status().message.as_deref(), Some("interrupted: the launcher was stopped"));
    let requests = fake.requests();
    assert!(requests.contains(&"DELETE pods/demo-ps-0-0 grace=30".to_string()), "{requests:?}");

    // Without stopping: detached, nothing deleted.
    let (client, fake) = Fake::start();
    let c = client.launch(job(1, 1, 3), false).await.unwrap().stop_on_cancel(false);
    assert!(matches!(c.run(async {}, |_| {}).await.unwrap(), RunOutcome::Detached));
    assert!(!fake.requests().iter().any(|r| r.starts_with("DELETE")));
}

#[tokio::test]
async fn delete_removes_the_root_and_waits_for_everything() {
    let (_controller, fake) = running_job(1, 1, 3).await;
    // `gradflow delete` is another command: a fresh client on the same cluster.
    let jc = fake_client(&fake);
    let gone = jc.delete("demo", Some(Duration::from_secs(5))).await.unwrap();
    assert!(gone);
    assert_eq!(
        fake.requests(),
        ["DELETE configmaps/demo propagation=Foreground", "GET configmaps/demo", "GET configmaps/demo"]
    );
    {
        let state = fake.0.lock().unwrap();
        assert!(state.pods.is_empty() && state.services.is_empty() && state.config_maps.is_empty());
    }
    let err = jc.delete("demo", None).await.err().unwrap();
    assert!(matches!(err, KubernetesError::NotFound { .. }), "{err}");
}

/// Another client on the mock's state (a second `gradflow` command on the same cluster).
fn fake_client(fake: &Fake) -> JobClient {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let state = fake.clone();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let body = body.collect_bytes().await.unwrap();
            let response = state.0.lock().unwrap().handle(&parts.method, &parts.uri, &body);
            send.send_response(response);
        }
    });
    JobClient::new(kube::Client::new(service, NS), NS)
}

#[tokio::test]
async fn status_shows_counts_pods_and_the_last_warning() {
    let (c, fake) = running_job(1, 2, 3).await;
    fake.set(Worker, 1, 0, |p| failed(p, 137, "OOMKilled"));
    c.reconcile(None).await.unwrap();
    fake.set(Worker, 1, 1, unschedulable);
    fake.0.lock().unwrap().events.push(Event {
        involved_object: ObjectReference {
            kind: Some("Pod".into()),
            name: Some("demo-worker-1-1".into()),
            ..Default::default()
        },
        reason: Some("FailedScheduling".into()),
        message: Some("0/3 nodes are available: 3 Insufficient memory.".into()),
        type_: Some("Warning".into()),
        last_timestamp: Some(Time(Timestamp::from_second(1_700_000_000).unwrap())),
        ..Default::default()
    });
    fake.requests();
    let s = fake_client(&fake).status("demo").await.unwrap();
    assert_eq!(
        fake.requests(),
        [
            "GET configmaps/demo",
            "LIST pods gradflow.dev/job=demo",
            "LIST events involvedObject.kind=Pod,type=Warning"
        ]
    );
    assert_eq!(s.state, JobState::Restarting);
    let w = s.roles.iter().find(|r| r.role == "worker").unwrap();
    assert_eq!((w.active, w.succeeded, w.failed), (2, 0, 1));
    assert_eq!(
        s.problem.as_deref(),
        Some("demo-worker-1-1: FailedScheduling: 0/3 nodes are available: 3 Insufficient memory.")
    );
    let oom = s.pods.iter().find(|p| p.name == "demo-worker-1-0").unwrap();
    assert_eq!((oom.phase.as_str(), oom.restarts), ("Failed", 1));
    assert_eq!(oom.problem.as_deref(), Some("worker: OOMKilled (exit code 137)"));

    let err = fake_client(&fake).status("nope").await.err().unwrap();
    assert!(matches!(err, KubernetesError::NotFound { .. }), "{err}");
}

#[tokio::test]
async fn logs_of_the_latest_attempt_or_a_chosen_one() {
    let (c, fake) = running_job(1, 1, 3).await;
    fake.set(Worker, 0, 0, |p| failed(p, 1, "Error"));
    c.reconcile(None).await.unwrap();
    {
        let mut state = fake.0.lock().unwrap();
        state.logs.insert("demo-worker-0-0".into(), "first try\nboom\n".into());
        state.logs.insert("demo-worker-0-1".into(), "second try\n".into());
        state.logs.insert("demo-ps-0-0".into(), "serving\n".into());
    }
    fake.requests();
    let jc = fake_client(&fake);
    let latest = LogSelection { role: Some(Worker), index: Some(0), ..Default::default() };
    assert_eq!(
        jc.logs("demo", &latest).await.unwrap(),
        [("demo-worker-0-1".to_string(), "second try\n".to_string())]
    );
    let first = LogSelection { attempt: Some(0), ..latest.clone() };
    assert_eq!(jc.logs("demo", &first).await.unwrap()[0].1, "first try\nboom\n");
    assert_eq!(
        fake.requests(),
        [
            "LIST pods gradflow.dev/job=demo",
            "GET pods/demo-worker-0-1/log container=worker",
            "LIST pods gradflow.dev/job=demo",
            "GET pods/demo-worker-0-0/log container=worker",
        ]
    );
    // Everything, followed: every process's latest pod, merged.
    let mut lines: Vec<(String, String)> = jc
        .follow_logs("demo", &LogSelection::default())
        .await
        .unwrap()
        .map(|(pod, line)| (pod, line.unwrap()))
        .collect()
        .await;
    lines.sort();
    assert_eq!(
        lines,
        [("demo-ps-0-0".to_string(), "serving".to_string()), ("demo-worker-0-1".into(), "second try".into())]
    );
    let requests = fake.requests();
    assert!(requests.contains(&"GET pods/demo-ps-0-0/log container=ps follow".to_string()), "{requests:?}");
}

#[tokio::test]
async fn detach_creates_the_controller_job_and_attach_resumes() {
    let (client, fake) = Fake::start();
    client.launch(job(1, 1, 3), true).await.unwrap();
    assert_eq!(
        fake.requests(),
        [
            "POST configmaps demo",
            "POST secrets demo-token",
            "POST services demo",
            "POST jobs demo-controller"
        ]
    );
    let uid = fake.root_uid();
    {
        let state = fake.0.lock().unwrap();
        let job = &state.jobs["demo-controller"];
        assert_eq!(job.metadata.owner_references.as_ref().unwrap()[0].uid, uid);
        let spec = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert_eq!(spec.service_account_name.as_deref(), Some("gradflow-launcher"));
        assert_eq!(spec.containers[0].args.as_ref().unwrap(), &["attach", "demo", "--namespace", "ml"]);
    }
    // What the controller pod does: attach (which checks that the token's Secret is the job's)
    // and drive.
    let c = fake_client(&fake).attach("demo").await.unwrap();
    assert_eq!(
        fake.requests(),
        ["GET configmaps/demo", "GET secrets/demo-token", "POST services demo", "GET services/demo"]
    );
    assert_eq!(c.renderer().owner_uid(), Some(uid.as_str()));
    c.reconcile(None).await.unwrap();
    assert!(fake.requests().contains(&"POST pods demo-ps-0-0".to_string()));
}

/// The request lines of the mock as (resource, verb), as RBAC names them.
fn verbs(lines: &[String]) -> std::collections::BTreeSet<(String, String)> {
    lines
        .iter()
        .map(|line| {
            let (method, rest) = line.split_once(' ').unwrap();
            let target = rest.split(' ').next().unwrap();
            let resource = match target.split('/').collect::<Vec<_>>().as_slice() {
                [kind] | [kind, _] => kind.to_string(),
                [kind, _, sub] => format!("{kind}/{sub}"),
                _ => panic!("{line}"),
            };
            let verb = match (method, target.contains('/')) {
                ("LIST", _) => "list",
                ("POST", _) => "create",
                ("GET", _) => "get",
                ("PUT", _) => "update",
                ("DELETE", _) => "delete",
                _ => panic!("{line}"),
            };
            (resource, verb.to_string())
        })
        .collect()
}

#[tokio::test]
async fn deploy_rbac_grants_exactly_the_verbs_gradflow_uses() {
    // Every command, through the mock: launch (detached, over a token Secret an earlier job of
    // the same name left) and drive, attach, status, logs, follow, a Service conflict, delete.
    let (client, fake) = Fake::start();
    fake.0.lock().unwrap().secrets.insert("demo-token".into(), earlier_jobs_secret());
    let c = client.launch(job(1, 1, 3), true).await.unwrap();
    c.reconcile(None).await.unwrap();
    fake.everything_runs();
    c.reconcile(None).await.unwrap();
    fake.set(Worker, 0, 0, succeeded);
    c.reconcile(None).await.unwrap();
    fake.0.lock().unwrap().logs.insert("demo-worker-0-0".into(), "done\n".into());
    let jc = fake_client(&fake);
    jc.attach("demo").await.unwrap();
    jc.status("demo").await.unwrap();
    let workers = LogSelection { role: Some(Worker), ..LogSelection::default() };
    jc.logs("demo", &workers).await.unwrap();
    let _ = jc.follow_logs("demo", &workers).await.unwrap().collect::<Vec<_>>().await;
    jc.delete("demo", Some(Duration::from_secs(5))).await.unwrap();
    let used = verbs(&fake.requests());

    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/rbac.yaml")).unwrap();
    let mut granted = std::collections::BTreeSet::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(doc).unwrap();
        if v["kind"] != "Role" {
            continue;
        }
        for rule in v["rules"].as_sequence().unwrap() {
            for resource in rule["resources"].as_sequence().unwrap() {
                for verb in rule["verbs"].as_sequence().unwrap() {
                    granted
                        .insert((resource.as_str().unwrap().to_string(), verb.as_str().unwrap().to_string()));
                }
            }
        }
    }
    // Not a request gradflow makes, but what setting blockOwnerDeletion can be checked against.
    granted.remove(&("configmaps/finalizers".to_string(), "update".to_string()));
    assert_eq!(used, granted);
}

/// The Secret of job `demo` in the mock.
fn token_secret(fake: &Fake) -> Secret {
    fake.0.lock().unwrap().secrets.get("demo-token").cloned().expect("no Secret demo-token")
}

/// The token a Secret holds.
fn token_in(secret: &Secret) -> String {
    String::from_utf8(secret.data.as_ref().unwrap()["token"].0.clone()).unwrap()
}

/// Where each container of a pod gets `GRADFLOW_TOKEN`: `(container, secret, key)`; a
/// variable with a literal value fails the test.
fn token_refs(pod: &Pod) -> Vec<(String, String, String)> {
    let spec = pod.spec.as_ref().unwrap();
    let mut out = Vec::new();
    for c in spec.init_containers.iter().flatten().chain(&spec.containers) {
        for e in c.env.iter().flatten().filter(|e| e.name == "GRADFLOW_TOKEN") {
            assert_eq!(e.value, None, "{}: GRADFLOW_TOKEN has a literal value", c.name);
            let r = e.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
            out.push((c.name.clone(), r.name.clone(), r.key.clone()));
        }
    }
    out
}

/// A token Secret that an earlier job named `demo` left: its owner (that job's root) is gone.
fn earlier_jobs_secret() -> Secret {
    let mut secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": "demo-token", "namespace": NS, "uid": "uid-secret-earlier",
            "labels": { "gradflow.dev/job": "demo" },
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "ConfigMap", "name": "demo", "uid": "uid-root-earlier",
                "controller": true, "blockOwnerDeletion": true
            }]
        },
        "type": "Opaque",
    }))
    .unwrap();
    secret.data = Some(BTreeMap::from([(
        "token".to_string(),
        k8s_openapi::ByteString(b"the-earlier-jobs-token-0123".to_vec()),
    )]));
    secret
}

#[tokio::test]
async fn the_token_secret_comes_before_any_pod_is_owned_by_the_root_and_holds_the_jobs_token() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "k8s-test-token-0123456789abcdef\n").unwrap();
    let mut j = job(1, 2, 3);
    j.auth.token_file = Some(file);
    let expected = j.auth.token().unwrap().unwrap();
    assert_eq!(expected.expose(), "k8s-test-token-0123456789abcdef");

    let (client, fake) = Fake::start();
    let c = client.launch(j, false).await.unwrap();
    c.reconcile(None).await.unwrap();
    fake.everything_runs();
    c.reconcile(None).await.unwrap();
    fake.everything_runs();
    c.reconcile(None).await.unwrap();
    // A recreated worker reads the same Secret; nothing creates another.
    fake.set(Worker, 0, 0, |p| failed(p, 137, "OOMKilled"));
    c.reconcile(None).await.unwrap();
    let requests = fake.requests();
    let secret_at = requests.iter().position(|r| r == "POST secrets demo-token").unwrap();
    let first_pod = requests.iter().position(|r| r.starts_with("POST pods")).unwrap();
    assert!(secret_at < first_pod, "{requests:?}");
    assert_eq!(requests.iter().filter(|r| r.starts_with("POST secrets")).count(), 1, "{requests:?}");
    assert!(requests.contains(&"POST pods demo-worker-0-1".to_string()), "{requests:?}");

    let secret = token_secret(&fake);
    assert_eq!(token_in(&secret), expected.expose());
    assert_eq!((secret.type_.as_deref(), secret.immutable), (Some("Opaque"), Some(true)));
    assert_eq!(secret.metadata.annotations, None, "the dry-run note is not on the real Secret");
    let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
        ("ConfigMap", "demo", fake.root_uid().as_str())
    );
    assert_eq!((owner.controller, owner.block_owner_deletion), (Some(true), Some(true)));

    for (pod, container) in [
        ("demo-ps-0-0", "ps"),
        ("demo-worker-0-0", "worker"),
        ("demo-worker-0-1", "worker"),
        ("demo-worker-1-0", "worker"),
    ] {
        assert_eq!(
            token_refs(&fake.pod(pod)),
            [(container.to_string(), "demo-token".to_string(), "token".to_string())],
            "{pod}"
        );
    }
    // Only the Secret holds the token.
    let state = fake.0.lock().unwrap();
    let elsewhere = serde_json::to_string(&(&state.config_maps, &state.services, &state.pods)).unwrap();
    assert!(!elsewhere.contains(expected.expose()));
}

#[tokio::test]
async fn without_a_token_file_each_job_gets_a_fresh_token() {
    if std::env::var_os("GRADFLOW_TOKEN").is_some() {
        // The launcher's own GRADFLOW_TOKEN would be every job's token.
        return;
    }
    let (client, fake) = Fake::start();
    client.launch(job(1, 1, 3), false).await.unwrap();
    let mut other = job(1, 1, 3);
    other.name = "other".into();
    client.launch(other, false).await.unwrap();
    let state = fake.0.lock().unwrap();
    let tokens: Vec<String> =
        ["demo-token", "other-token"].iter().map(|n| token_in(&state.secrets[*n])).collect();
    assert_ne!(tokens[0], tokens[1]);
    for t in &tokens {
        assert_eq!(t.len(), 64, "{t}");
        assert!(t.bytes().all(|b| b.is_ascii_hexdigit()), "{t}");
    }
}

#[tokio::test]
async fn auth_disabled_means_no_secret_and_no_token_variable() {
    let mut j = job(1, 1, 3);
    j.auth.enabled = false;
    let (client, fake) = Fake::start();
    let c = client.launch(j, false).await.unwrap();
    assert_eq!(fake.requests(), ["POST configmaps demo", "POST services demo"]);
    c.reconcile(None).await.unwrap();
    fake.everything_runs();
    c.reconcile(None).await.unwrap();
    for pod in ["demo-ps-0-0", "demo-worker-0-0"] {
        assert_eq!(token_refs(&fake.pod(pod)), [], "{pod}");
    }
    assert!(fake.0.lock().unwrap().secrets.is_empty());
    // And attach does not look for one.
    fake.requests();
    fake_client(&fake).attach("demo").await.unwrap();
    assert!(!fake.requests().iter().any(|r| r.contains("secrets")));
}

#[tokio::test]
async fn an_existing_token_secret_is_reused_replaced_or_refused() {
    // The job's own (created by an earlier try of the same request): used as it is.
    let (client, fake) = Fake::start();
    fake.race("POST secrets demo-token");
    client.launch(job(1, 1, 3), false).await.unwrap();
    assert_eq!(
        fake.requests(),
        ["POST configmaps demo", "POST secrets demo-token", "GET secrets/demo-token", "POST services demo"]
    );
    assert_eq!(token_secret(&fake).metadata.owner_references.unwrap()[0].uid, fake.root_uid());

    // Left by an earlier job of the same name, whose root is gone: replaced.
    let (client, fake) = Fake::start();
    fake.0.lock().unwrap().secrets.insert("demo-token".into(), earlier_jobs_secret());
    client.launch(job(1, 1, 3), false).await.unwrap();
    assert_eq!(
        fake.requests(),
        [
            "POST configmaps demo",
            "POST secrets demo-token",
            "GET secrets/demo-token",
            "DELETE secrets/demo-token uid=uid-secret-earlier",
            "POST secrets demo-token",
            "POST services demo"
        ]
    );
    let secret = token_secret(&fake);
    assert_eq!(secret.metadata.owner_references.as_ref().unwrap()[0].uid, fake.root_uid());
    assert_ne!(token_in(&secret), "the-earlier-jobs-token-0123");

    // Someone else's: an error that names it; the user's Secret stays, the new root goes.
    let (client, fake) = Fake::start();
    let mut theirs = earlier_jobs_secret();
    theirs.metadata.owner_references = None;
    fake.0.lock().unwrap().secrets.insert("demo-token".into(), theirs.clone());
    let err = client.launch(job(1, 1, 3), false).await.err().unwrap();
    assert!(matches!(err, KubernetesError::Foreign(_)), "{err}");
    let text = err.to_string();
    assert!(text.contains("a Secret named demo-token already exists in namespace ml"), "{text}");
    assert!(text.contains("kubectl delete secret demo-token -n ml"), "{text}");
    assert_eq!(
        fake.requests(),
        [
            "POST configmaps demo",
            "POST secrets demo-token",
            "GET secrets/demo-token",
            "DELETE configmaps/demo propagation=Background"
        ]
    );
    assert_eq!(token_secret(&fake), theirs);

    // No permission on Secrets (a Role from before job tokens): the same clean slate.
    let (client, fake) = Fake::start();
    fake.fail("POST secrets", 403);
    let err = client.launch(job(1, 1, 3), false).await.err().unwrap();
    assert_eq!(err.http_status(), Some(403), "{err}");
    assert!(err.to_string().contains("creating Secret demo-token"), "{err}");
    assert_eq!(
        fake.requests(),
        ["POST configmaps demo", "POST secrets demo-token", "DELETE configmaps/demo propagation=Background"]
    );
}

#[tokio::test]
async fn a_token_that_cannot_be_read_fails_before_anything_is_created() {
    let mut j = job(1, 1, 3);
    j.auth.token_file = Some("/nonexistent/gradflow/token".into());
    let (client, fake) = Fake::start();
    let err = client.launch(j, false).await.err().unwrap();
    assert!(matches!(err, KubernetesError::Token(_)), "{err}");
    assert!(err.to_string().starts_with("job token: token file /nonexistent/gradflow/token"), "{err}");
    assert_eq!(fake.requests(), Vec::<String>::new());
}

#[tokio::test]
async fn attach_refuses_a_job_whose_token_secret_is_gone() {
    let (client, fake) = Fake::start();
    client.launch(job(1, 1, 3), false).await.unwrap();
    fake.0.lock().unwrap().secrets.clear();
    fake.requests();
    let err = fake_client(&fake).attach("demo").await.err().unwrap();
    assert!(matches!(err, KubernetesError::Token(_)), "{err}");
    let text = err.to_string();
    assert!(text.contains("Secret demo-token of job demo is missing"), "{text}");
    assert!(text.contains("gradflow delete demo"), "{text}");
    assert_eq!(fake.requests(), ["GET configmaps/demo", "GET secrets/demo-token"]);
}
