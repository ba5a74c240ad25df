//! The Kubernetes backend against a mock API server (kube-rs's `tower-test` pattern): every
//! request the client sends is checked (method, path, query, body) and answered by a small
//! in-memory API server that the tests also play kubelet on. Faults (409, 500) are injected
//! per request. The mock serves watches of pods (`?watch=true`: a body that stays open and
//! carries one JSON event a line, as the API server's does) and Leases with
//! `resourceVersion` conflicts, and it knows which client (controller) sent each request,
//! so that tests can check who acted while holding the job's Lease.

mod kubernetes_support;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};

use futures::StreamExt;
use gradflow_job::Role::{self, Ps, Worker};
use gradflow_launch::kubernetes::client::{LogSelection, RunOutcome};
use gradflow_launch::kubernetes::controller::{JobState, JobStatus};
use gradflow_launch::kubernetes::{JobClient, KubernetesError, RECORD_STATUS_KEY};
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::batch::v1::Job as BatchJob;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Event, ObjectReference, Pod, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kubernetes_support::*;
use serde::Serialize;

const NS: &str = "ml";

/// What the mock answers with: a whole body, or a watch's body that stays open.
type MockBody = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Something the test does to the mock just before it serves a request.
type Hook = Box<dyn FnOnce(&mut State) + Send>;

/// One request as the mock saw it: which client sent it, what it was, and who held the
/// job's Lease (`demo-controller`) at that moment.
#[derive(Debug, Clone)]
struct Seen {
    who: String,
    line: String,
    holder: Option<String>,
}

impl Seen {
    /// A request that changes the job: a controller acting.
    fn acts(&self) -> bool {
        self.line.starts_with("POST pods")
            || self.line.starts_with("DELETE pods")
            || self.line.starts_with("PATCH pods")
            || self.line.starts_with("DELETE workloads")
            || self.line.starts_with("PUT configmaps")
    }
}

/// An open watch: the pods it selects and where their events go.
struct Watch {
    selector: String,
    events: futures::channel::mpsc::UnboundedSender<Bytes>,
}

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
    /// One-shot hooks: run just before the next request whose line starts with the prefix
    /// is served (another controller getting there first).
    hooks: Vec<(String, Hook)>,
    leases: BTreeMap<String, Lease>,
    /// Volcano PodGroups (custom resources: kept as JSON).
    pod_groups: BTreeMap<String, serde_json::Value>,
    /// Kueue Workloads (as Kueue creates them for a pod group; tests add them).
    workloads: BTreeMap<String, serde_json::Value>,
    /// Every request, with who sent it; never drained by `requests()`.
    seen: Vec<Seen>,
    /// Open watches of pods.
    watches: Vec<Watch>,
    /// The pods as the last events told them, to find what changed since.
    published: BTreeMap<String, Pod>,
    /// Every pod event sent, by resourceVersion, for watches that start from an older one.
    history: Vec<(u64, String)>,
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

fn whole(bytes: Vec<u8>) -> MockBody {
    Full::new(Bytes::from(bytes)).map_err(|never| match never {}).boxed_unsync()
}

fn json(code: StatusCode, value: &impl Serialize) -> Response<MockBody> {
    Response::builder().status(code).body(whole(serde_json::to_vec(value).unwrap())).unwrap()
}

fn error(code: u16, reason: &str, message: &str) -> Response<MockBody> {
    Response::builder().status(code).body(whole(status_body(code, reason, message))).unwrap()
}

fn conflict() -> Response<MockBody> {
    error(
        409,
        "Conflict",
        "the object has been modified; please apply your changes to the latest version and try again",
    )
}

/// A pod without its resourceVersion: what an event is about.
fn content(pod: &Pod) -> Pod {
    let mut pod = pod.clone();
    pod.metadata.resource_version = None;
    pod
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

    /// Sends an event for every pod that changed since the last events: ADDED, MODIFIED
    /// (with a new resourceVersion, unless the change gave it one) or DELETED. Tests change
    /// pods in place, as a kubelet would; this is how watches hear of it.
    fn publish(&mut self) {
        let mut events = Vec::new();
        let names: Vec<String> = self.pods.keys().cloned().collect();
        for name in names {
            let old = self.published.get(&name);
            let pod = &self.pods[&name];
            if old.is_some_and(|o| content(o) == content(pod)) {
                continue;
            }
            let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
            if pod.metadata.resource_version.is_none()
                || old.is_some_and(|o| o.metadata.resource_version == pod.metadata.resource_version)
            {
                let rv = self.rv();
                self.pods.get_mut(&name).unwrap().metadata.resource_version = Some(rv);
            }
            let pod = self.pods[&name].clone();
            self.published.insert(name, pod.clone());
            events.push((kind, pod));
        }
        let gone: Vec<String> =
            self.published.keys().filter(|n| !self.pods.contains_key(*n)).cloned().collect();
        for name in gone {
            let mut pod = self.published.remove(&name).unwrap();
            pod.metadata.resource_version = Some(self.rv());
            events.push(("DELETED", pod));
        }
        for (kind, pod) in events {
            let rv: u64 = pod.metadata.resource_version.as_deref().unwrap().parse().unwrap();
            let mut line = serde_json::to_vec(&serde_json::json!({"type": kind, "object": pod})).unwrap();
            line.push(b'\n');
            let labels = pod.metadata.labels.clone();
            self.history.push((rv, String::from_utf8(line.clone()).unwrap()));
            self.watches.retain(|w| {
                !selected(labels.as_ref(), &w.selector)
                    || w.events.unbounded_send(Bytes::from(line.clone())).is_ok()
            });
        }
    }

    /// Opens a watch of the pods `selector` selects, from `since` (a resourceVersion).
    fn watch(&mut self, selector: &str, since: u64) -> Response<MockBody> {
        let (events, rx) = futures::channel::mpsc::unbounded::<Bytes>();
        for (rv, line) in &self.history {
            let pod: serde_json::Value =
                serde_json::from_str::<serde_json::Value>(line).unwrap()["object"].clone();
            let labels: Option<BTreeMap<String, String>> =
                serde_json::from_value(pod["metadata"]["labels"].clone()).unwrap();
            if *rv > since && selected(labels.as_ref(), selector) {
                events.unbounded_send(Bytes::from(line.clone())).unwrap();
            }
        }
        self.watches.push(Watch { selector: selector.to_string(), events });
        let body = StreamBody::new(
            rx.map(|b| Ok::<_, Box<dyn std::error::Error + Send + Sync>>(http_body::Frame::data(b))),
        );
        Response::builder().status(200).body(body.boxed_unsync()).unwrap()
    }

    /// The holder of the job's Lease, if any.
    fn holder(&self) -> Option<String> {
        self.leases.get("demo-controller")?.spec.as_ref()?.holder_identity.clone().filter(|h| !h.is_empty())
    }

    /// Answers one request from client `who`, as the API server would for the few calls
    /// gradflow makes.
    fn handle(&mut self, who: &str, method: &Method, uri: &http::Uri, body: &[u8]) -> Response<MockBody> {
        self.publish();
        let response = self.answer(who, method, uri, body);
        self.publish();
        response
    }

    fn answer(&mut self, who: &str, method: &Method, uri: &http::Uri, body: &[u8]) -> Response<MockBody> {
        let path = uri.path().to_string();
        let q = query(uri);
        let (kind, rest) = if let Some(rest) = [
            format!("/api/v1/namespaces/{NS}/"),
            format!("/apis/batch/v1/namespaces/{NS}/"),
            format!("/apis/coordination.k8s.io/v1/namespaces/{NS}/"),
            format!("/apis/scheduling.volcano.sh/v1beta1/namespaces/{NS}/"),
            format!("/apis/kueue.x-k8s.io/v1beta1/namespaces/{NS}/"),
        ]
        .iter()
        .find_map(|prefix| path.strip_prefix(prefix.as_str()))
        {
            let mut parts = rest.splitn(2, '/');
            (parts.next().unwrap().to_string(), parts.next().map(str::to_string))
        } else {
            panic!("request outside namespace {NS}: {method} {uri}");
        };
        let line = match (method.as_str(), &rest) {
            ("GET", None) => {
                let sel = q.get("labelSelector").or(q.get("fieldSelector")).cloned().unwrap_or_default();
                let verb = if q.get("watch").is_some_and(|w| w == "true") { "WATCH" } else { "LIST" };
                format!("{verb} {kind} {sel}")
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
        self.seen.push(Seen { who: who.to_string(), line: line.clone(), holder: self.holder() });
        if let Some(i) = self.hooks.iter().position(|(prefix, _)| line.starts_with(prefix.as_str())) {
            let (_, hook) = self.hooks.remove(i);
            hook(self);
        }
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
    ) -> Response<MockBody> {
        if method == Method::GET && rest.is_none() && q.get("watch").is_some_and(|w| w == "true") {
            assert_eq!(kind, "pods", "the mock watches pods only");
            let since = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
            return self.watch(q.get("labelSelector").map_or("", String::as_str), since);
        }
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
                    self.leases.retain(|_, l| !owned(&l.metadata.owner_references));
                    self.pod_groups.retain(|_, g| {
                        !owned(&serde_json::from_value(g["metadata"]["ownerReferences"].clone()).unwrap())
                    });
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
                    return conflict();
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
                    &serde_json::json!({
                        "apiVersion": "v1", "kind": "PodList",
                        "metadata": {"resourceVersion": self.next_rv.to_string()}, "items": items
                    }),
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
            ("PATCH", "pods", Some(name)) => {
                let patch: serde_json::Value = serde_json::from_slice(body).unwrap();
                let Some(pod) = self.pods.get_mut(name) else {
                    return error(404, "NotFound", &format!("pods \"{name}\" not found"));
                };
                // A JSON merge patch of annotations: all gradflow patches.
                let keys: Vec<&String> = patch.as_object().unwrap().keys().collect();
                assert_eq!(keys, ["metadata"], "{patch}");
                for (k, v) in patch["metadata"]["annotations"].as_object().unwrap() {
                    pod.metadata
                        .annotations
                        .get_or_insert_default()
                        .insert(k.clone(), v.as_str().unwrap().into());
                }
                json(StatusCode::OK, &pod.clone())
            }
            ("POST", "podgroups", None) => {
                let mut group: serde_json::Value = serde_json::from_slice(body).unwrap();
                let name = group["metadata"]["name"].as_str().unwrap().to_string();
                if self.pod_groups.contains_key(&name) {
                    return error(409, "AlreadyExists", &format!("podgroups \"{name}\" already exists"));
                }
                group["metadata"]["uid"] = self.uid().into();
                self.pod_groups.insert(name, group.clone());
                json(StatusCode::CREATED, &group)
            }
            ("GET", "podgroups", Some(name)) => match self.pod_groups.get(name) {
                Some(g) => json(StatusCode::OK, g),
                None => error(404, "NotFound", "not found"),
            },
            ("DELETE", "workloads", Some(name)) => match self.workloads.remove(name) {
                Some(w) => json(StatusCode::OK, &w),
                None => error(404, "NotFound", &format!("workloads.kueue.x-k8s.io \"{name}\" not found")),
            },
            ("GET", "pods", Some(sub)) if sub.ends_with("/log") => {
                let name = sub.trim_end_matches("/log");
                match self.logs.get(name) {
                    Some(text) => {
                        Response::builder().status(200).body(whole(text.clone().into_bytes())).unwrap()
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
            ("POST", "leases", None) => {
                let mut lease: Lease = serde_json::from_slice(body).unwrap();
                let name = lease.metadata.name.clone().unwrap();
                if self.leases.contains_key(&name) {
                    return error(
                        409,
                        "AlreadyExists",
                        &format!("leases.coordination.k8s.io \"{name}\" already exists"),
                    );
                }
                lease.metadata.uid = Some(self.uid());
                lease.metadata.resource_version = Some(self.rv());
                self.leases.insert(name, lease.clone());
                json(StatusCode::CREATED, &lease)
            }
            ("GET", "leases", Some(name)) => match self.leases.get(name) {
                Some(l) => json(StatusCode::OK, l),
                None => error(404, "NotFound", &format!("leases.coordination.k8s.io \"{name}\" not found")),
            },
            ("PUT", "leases", Some(name)) => {
                let mut lease: Lease = serde_json::from_slice(body).unwrap();
                let Some(current) = self.leases.get(name) else {
                    return error(404, "NotFound", "not found");
                };
                if lease.metadata.resource_version != current.metadata.resource_version {
                    return conflict();
                }
                lease.metadata.resource_version = Some(self.rv());
                self.leases.insert(name.to_string(), lease.clone());
                json(StatusCode::OK, &lease)
            }
            (m, k, r) => panic!("the mock does not serve {m} {k} {r:?}"),
        }
    }
}

impl Fake {
    /// A client whose every request is answered by the mock.
    fn start() -> (JobClient, Fake) {
        let fake = Fake(Arc::new(Mutex::new(State::default())));
        (fake_client_as(&fake, "launcher"), fake)
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

    /// Runs `hook` on the mock just before it serves the next request that starts with
    /// `prefix`.
    fn before(&self, prefix: &str, hook: impl FnOnce(&mut State) + Send + 'static) {
        self.0.lock().unwrap().hooks.push((prefix.into(), Box::new(hook)));
    }

    /// Every request so far, with who sent it.
    fn seen(&self) -> Vec<Seen> {
        self.0.lock().unwrap().seen.clone()
    }

    /// Whether some client has sent a request `line`.
    fn has_seen(&self, line: &str) -> bool {
        self.0.lock().unwrap().seen.iter().any(|s| s.line == line)
    }

    fn lease(&self) -> Option<Lease> {
        self.0.lock().unwrap().leases.get("demo-controller").cloned()
    }

    fn holder(&self) -> Option<String> {
        self.0.lock().unwrap().holder()
    }

    /// Open watches.
    fn watching(&self) -> usize {
        let mut state = self.0.lock().unwrap();
        state.watches.retain(|w| !w.events.is_closed());
        state.watches.len()
    }

    fn pod(&self, name: &str) -> Pod {
        self.0.lock().unwrap().pods.get(name).cloned().unwrap_or_else(|| panic!("no pod {name}"))
    }

    fn set(&self, role: Role, index: u32, attempt: u32, f: impl FnOnce(Pod) -> Pod) {
        let name = format!("demo-{}-{index}-{attempt}", role.as_str());
        let mut state = self.0.lock().unwrap();
        let pod = state.pods.remove(&name).unwrap_or_else(|| panic!("no pod {name}"));
        state.pods.insert(name, f(pod));
        state.publish();
    }

    fn everything_runs(&self) {
        let mut state = self.0.lock().unwrap();
        for pod in state.pods.values_mut() {
            if pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending") {
                *pod = running(pod.clone(), true);
            }
        }
        state.publish();
    }

    /// Pods being deleted are gone.
    fn reap(&self) {
        let mut state = self.0.lock().unwrap();
        state.pods.retain(|_, p| p.metadata.deletion_timestamp.is_none());
        state.publish();
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
    let c = client.launch(job(1, 1, 3), false).await.unwrap().resync_interval(Duration::from_millis(5));
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
async fn a_finished_job_is_deleted_after_its_ttl() {
    for ttl in ["0s", "50ms"] {
        let (client, fake) = Fake::start();
        let mut job = job(1, 1, 3);
        let mut section = job.kubernetes.clone().unwrap().as_map().clone();
        section.insert("ttl_after_finished".into(), serde_json::json!(ttl));
        job.kubernetes = Some(section.into());
        let c = client.launch(job, false).await.unwrap().resync_interval(Duration::from_millis(5));
        c.reconcile(None).await.unwrap();
        fake.everything_runs();
        c.reconcile(None).await.unwrap();
        fake.everything_runs();
        fake.set(Role::Worker, 0, 0, succeeded);
        // A kubelet that lets deleted pods go.
        let reaper = {
            let fake = fake.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    fake.reap();
                }
            })
        };
        let mut lines = Vec::new();
        let outcome = c.run(std::future::pending(), |l| lines.push(l.to_string())).await.unwrap();
        reaper.abort();
        let RunOutcome::Finished(summary) = outcome else { panic!("not finished") };
        assert_eq!(summary.state, JobState::Succeeded);
        let text = lines.join("\n");
        assert!(text.contains("deleted job demo (kubernetes.ttl_after_finished)"), "{text}");
        assert_eq!(text.contains("deleting it in 50ms"), ttl == "50ms", "{text}");
        assert!(fake.requests().contains(&"DELETE configmaps/demo propagation=Foreground".to_string()));
    }
}

#[tokio::test]
async fn run_gives_up_after_repeated_failures_and_stops_on_cancel() {
    let (client, fake) = Fake::start();
    let c = client
        .launch(job(1, 1, 3), false)
        .await
        .unwrap()
        .resync_interval(Duration::from_millis(1))
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
        [
            "LIST pods gradflow.dev/job=demo",
            "DELETE configmaps/demo propagation=Foreground",
            "GET configmaps/demo",
            "GET configmaps/demo"
        ]
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
    fake_client_as(fake, "other")
}

/// A client on the mock's state whose requests the mock records as `who`'s.
fn fake_client_as(fake: &Fake, who: &str) -> JobClient {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<MockBody>>();
    let state = fake.clone();
    let who = who.to_string();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let body = body.collect_bytes().await.unwrap();
            if parts.method == Method::PATCH {
                assert_eq!(
                    parts.headers.get(http::header::CONTENT_TYPE).map(|v| v.to_str().unwrap()),
                    Some("application/merge-patch+json"),
                    "{}",
                    parts.uri
                );
            }
            if matches!(parts.method, Method::POST | Method::PUT) {
                assert_eq!(
                    parts.headers.get(http::header::CONTENT_TYPE).map(|v| v.to_str().unwrap()),
                    Some("application/json"),
                    "{} {}",
                    parts.method,
                    parts.uri
                );
            }
            let response = state.0.lock().unwrap().handle(&who, &parts.method, &parts.uri, &body);
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

/// The pod's annotation `key`, if it has it.
fn annotation(pod: &Pod, key: &str) -> Option<String> {
    pod.metadata.annotations.as_ref()?.get(key).cloned()
}

#[tokio::test]
async fn volcano_the_pod_group_comes_before_any_pod_and_goes_with_the_job() {
    let (client, fake) = Fake::start();
    let c = client.launch(job_with(2, 2, 3, VOLCANO), false).await.unwrap();
    assert_eq!(
        fake.requests(),
        ["POST configmaps demo", "POST secrets demo-token", "POST services demo", "POST podgroups demo"]
    );
    let uid = fake.root_uid();
    {
        let state = fake.0.lock().unwrap();
        let group = &state.pod_groups["demo"];
        assert_eq!(group["apiVersion"], "scheduling.volcano.sh/v1beta1");
        assert_eq!(group["kind"], "PodGroup");
        assert_eq!(group["spec"]["minMember"], 4);
        assert_eq!(group["spec"]["queue"], "team-a");
        assert_eq!(group["metadata"]["ownerReferences"][0]["uid"], uid.as_str());
    }

    // Every pod at once, each in the group and under Volcano's scheduler.
    c.reconcile(None).await.unwrap();
    assert_eq!(
        fake.requests(),
        pass(&[
            "POST pods demo-ps-0-0",
            "POST pods demo-ps-1-0",
            "POST pods demo-worker-0-0",
            "POST pods demo-worker-1-0",
            "PUT configmaps/demo"
        ])
    );
    let seen = fake.seen();
    let group_at = seen.iter().position(|s| s.line == "POST podgroups demo").unwrap();
    let first_pod = seen.iter().position(|s| s.line.starts_with("POST pods")).unwrap();
    assert!(group_at < first_pod, "{seen:?}");
    for name in ["demo-ps-0-0", "demo-ps-1-0", "demo-worker-0-0", "demo-worker-1-0"] {
        let pod = fake.pod(name);
        assert_eq!(pod.spec.as_ref().unwrap().scheduler_name.as_deref(), Some("volcano"), "{name}");
        assert_eq!(annotation(&pod, "scheduling.k8s.io/group-name").as_deref(), Some("demo"), "{name}");
        assert!(!pod.metadata.labels.as_ref().unwrap().contains_key("kueue.x-k8s.io/queue-name"), "{name}");
    }

    // A recreated worker joins the same group.
    fake.everything_runs();
    c.reconcile(None).await.unwrap();
    fake.requests();
    fake.set(Worker, 0, 0, |p| failed(p, 137, "OOMKilled"));
    c.reconcile(None).await.unwrap();
    assert_eq!(fake.requests(), pass(&["POST pods demo-worker-0-1", "PUT configmaps/demo"]));
    let pod = fake.pod("demo-worker-0-1");
    assert_eq!(annotation(&pod, "scheduling.k8s.io/group-name").as_deref(), Some("demo"));

    // A controller that attaches finds the job's PodGroup there.
    fake_client(&fake).attach("demo").await.unwrap();
    let requests = fake.requests();
    assert!(
        requests.ends_with(&["POST podgroups demo".to_string(), "GET podgroups/demo".to_string()]),
        "{requests:?}"
    );

    // Deleting the job deletes it with everything else.
    assert!(fake_client(&fake).delete("demo", Some(Duration::from_secs(5))).await.unwrap());
    assert!(fake.0.lock().unwrap().pod_groups.is_empty());
}

#[tokio::test]
async fn volcano_a_pod_group_of_someone_else_or_no_volcano_is_refused() {
    let (client, fake) = Fake::start();
    fake.0.lock().unwrap().pod_groups.insert(
        "demo".into(),
        serde_json::json!({
            "apiVersion": "scheduling.volcano.sh/v1beta1", "kind": "PodGroup",
            "metadata": { "name": "demo", "uid": "someone-elses" }, "spec": { "minMember": 1 }
        }),
    );
    let err = client.launch(job_with(1, 1, 3, VOLCANO), false).await.err().unwrap();
    assert!(matches!(err, KubernetesError::Foreign(_)), "{err}");
    assert!(err.to_string().contains("a Volcano PodGroup named demo already exists"), "{err}");
    let requests = fake.requests();
    assert!(!requests.iter().any(|r| r.starts_with("POST pods")));
    // The job's record goes again, so that launching after the fix is not refused as a
    // job that exists.
    let removed = "DELETE configmaps/demo propagation=Background".to_string();
    assert!(requests.contains(&removed), "{requests:?}");

    // A cluster without Volcano has no such resource.
    let (client, fake) = Fake::start();
    fake.fail("POST podgroups", 404);
    let err = client.launch(job_with(1, 1, 3, VOLCANO), false).await.err().unwrap();
    assert!(
        err.to_string().contains("kubernetes.gang = \"volcano\"")
            && err.to_string().contains("is Volcano installed"),
        "{err}"
    );
    let requests = fake.requests();
    assert!(requests.contains(&removed), "{requests:?}");
}

#[tokio::test]
async fn kueue_pods_form_one_group_that_ends_with_the_job() {
    let (client, fake) = Fake::start();
    let c = client.launch(job_with(1, 2, 3, KUEUE), false).await.unwrap();
    // Kueue needs no object of ours: its webhook reads the pods' labels.
    assert_eq!(fake.requests(), ["POST configmaps demo", "POST secrets demo-token", "POST services demo"]);
    c.reconcile(None).await.unwrap();
    assert_eq!(
        fake.requests(),
        pass(&[
            "POST pods demo-ps-0-0",
            "POST pods demo-worker-0-0",
            "POST pods demo-worker-1-0",
            "PUT configmaps/demo"
        ])
    );
    for name in ["demo-ps-0-0", "demo-worker-0-0", "demo-worker-1-0"] {
        let pod = fake.pod(name);
        let labels = pod.metadata.labels.clone().unwrap();
        assert_eq!(labels["kueue.x-k8s.io/queue-name"], "team-a", "{name}");
        assert_eq!(labels["kueue.x-k8s.io/pod-group-name"], "demo", "{name}");
        assert_eq!(annotation(&pod, "kueue.x-k8s.io/pod-group-total-count").as_deref(), Some("3"), "{name}");
        assert_eq!(pod.spec.as_ref().unwrap().scheduler_name, None, "{name}");
    }
    fake.everything_runs();
    c.reconcile(None).await.unwrap();
    fake.requests();

    fake.set(Worker, 0, 0, succeeded);
    fake.set(Worker, 1, 0, succeeded);
    let p = c.reconcile(None).await.unwrap();
    assert_eq!(p.decision.status.state, JobState::Succeeded);
    assert_eq!(
        fake.requests(),
        pass(&[
            "PUT configmaps/demo",
            "DELETE pods/demo-ps-0-0 grace=30",
            "PATCH pods/demo-ps-0-0",
            "PATCH pods/demo-worker-0-0",
            "PATCH pods/demo-worker-1-0"
        ])
    );
    for name in ["demo-ps-0-0", "demo-worker-0-0", "demo-worker-1-0"] {
        assert_eq!(
            annotation(&fake.pod(name), "kueue.x-k8s.io/retriable-in-group").as_deref(),
            Some("false"),
            "{name}"
        );
    }
    // Marked once; the stopped server ran on a node, so Kueue lets it go without more.
    c.reconcile(None).await.unwrap();
    assert_eq!(fake.requests(), pass(&[]));

    // `gradflow delete` removes the group's Workload (Kueue created it) before the job.
    fake.0.lock().unwrap().workloads.insert(
        "demo".into(),
        serde_json::json!({ "apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload", "metadata": { "name": "demo" } }),
    );
    assert!(fake_client(&fake).delete("demo", Some(Duration::from_secs(5))).await.unwrap());
    let requests = fake.requests();
    assert_eq!(
        requests[..3],
        [
            "LIST pods gradflow.dev/job=demo",
            "DELETE workloads/demo propagation=Background",
            "DELETE configmaps/demo propagation=Foreground"
        ],
        "{requests:?}"
    );
    assert!(fake.0.lock().unwrap().workloads.is_empty());
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
                ("WATCH", _) => "watch",
                ("POST", _) => "create",
                ("GET", _) => "get",
                ("PUT", _) => "update",
                ("PATCH", _) => "patch",
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
    // The controller as `run` drives it: its Lease (read, created, released) and a watch on
    // the job's pods; detached once the watch is open.
    let c = c.stop_on_cancel(false);
    let watched = fake.clone();
    let opened = async move {
        while watched.watching() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let outcome =
        tokio::time::timeout(Duration::from_secs(120), c.run(opened, |_| {})).await.unwrap().unwrap();
    assert!(matches!(outcome, RunOutcome::Detached));
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
    // Gang scheduling: Volcano's PodGroup (created, and read by attach), Kueue's pod group
    // (its pods marked at the end, its Workload deleted with the job).
    client.launch(job_with(1, 1, 3, VOLCANO), false).await.unwrap();
    jc.attach("demo").await.unwrap();
    jc.delete("demo", Some(Duration::from_secs(5))).await.unwrap();
    let c = client.launch(job_with(1, 1, 3, KUEUE), false).await.unwrap();
    c.reconcile(None).await.unwrap();
    c.reconcile(Some("stopped")).await.unwrap();
    fake.0
        .lock()
        .unwrap()
        .workloads
        .insert("demo".into(), serde_json::json!({ "metadata": { "name": "demo" } }));
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

/// `job(1, 1, 3)` with literal env values, common and per role, and a Secret reference.
fn job_with_env() -> gradflow_job::JobConfig {
    let mut job = job(1, 1, 3);
    let section = serde_json::json!({
        "image": "registry.example.com/gradflow:test",
        "env": { "AWS_REGION": "literal-region-7f3a", "AWS_SECRET_ACCESS_KEY": { "secret": "s3", "key": "k" } },
        "worker": { "env": { "ONLY_WORKERS": "literal-worker-91c2" } },
    });
    job.kubernetes = Some(section.as_object().unwrap().clone().into());
    job
}

#[tokio::test]
async fn literal_env_values_live_in_the_jobs_env_secret_and_attach_renders_the_same_pods() {
    let (client, fake) = Fake::start();
    let launched = client.launch(job_with_env(), false).await.unwrap();
    assert_eq!(
        fake.requests(),
        ["POST configmaps demo", "POST secrets demo-token", "POST secrets demo-env", "POST services demo"]
    );
    let uid = fake.root_uid();
    {
        let state = fake.0.lock().unwrap();
        let secret = &state.secrets["demo-env"];
        let data = secret.data.as_ref().unwrap();
        assert_eq!(data["env.AWS_REGION"].0, b"literal-region-7f3a");
        assert_eq!(data["worker.env.ONLY_WORKERS"].0, b"literal-worker-91c2");
        assert_eq!(data.len(), 2, "a Secret reference has no value to keep");
        assert_eq!(secret.metadata.owner_references.as_ref().unwrap()[0].uid, uid);
        let record = serde_json::to_string(&state.config_maps["demo"]).unwrap();
        assert!(!record.contains("literal-region-7f3a") && !record.contains("literal-worker-91c2"));
    }
    let attached = fake_client(&fake).attach("demo").await.unwrap();
    assert_eq!(
        fake.requests(),
        [
            "GET configmaps/demo",
            "GET secrets/demo-env",
            "GET secrets/demo-token",
            "POST services demo",
            "GET services/demo"
        ]
    );
    for (role, index) in [(Ps, 0), (Worker, 0)] {
        assert_eq!(attached.renderer().pod(role, index, 2), launched.renderer().pod(role, index, 2));
    }

    // Without the Secret, attach says what is missing and how to get out.
    fake.0.lock().unwrap().secrets.remove("demo-env");
    let err = fake_client(&fake).attach("demo").await.err().unwrap().to_string();
    assert!(err.contains("Secret demo-env") && err.contains("gradflow delete demo"), "{err}");
}

/// Waits (up to `limit`, generous: the tests run on loaded machines) until `done`; fails the
/// test naming `what` otherwise.
async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "waited {limit:?} for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a controller running in the background said so far.
#[derive(Clone, Default)]
struct Said(Arc<Mutex<Vec<String>>>);

impl Said {
    fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    fn any(&self, part: &str) -> bool {
        self.lines().iter().any(|l| l.contains(part))
    }
}

/// Runs `controller` in the background until the job ends or `cancel` fires (dropping the
/// sender fires it too).
fn spawn_run(
    controller: gradflow_launch::kubernetes::Controller,
) -> (tokio::task::JoinHandle<Result<RunOutcome, KubernetesError>>, Said, tokio::sync::oneshot::Sender<()>) {
    let said = Said::default();
    let (cancel, cancelled) = tokio::sync::oneshot::channel::<()>();
    let lines = said.clone();
    let task = tokio::spawn(async move {
        let cancelled = async move {
            let _ = cancelled.await;
        };
        controller.run(cancelled, move |l| lines.0.lock().unwrap().push(l.to_string())).await
    });
    (task, said, cancel)
}

/// Requests that changed the job (created or deleted pods, wrote the record) by `who`.
fn acts_of(fake: &Fake, who: &str) -> Vec<Seen> {
    fake.seen().into_iter().filter(|s| s.acts() && s.who == who).collect()
}

/// Every request of the controllers `who` that changed the job was sent while its sender
/// held the job's Lease.
fn only_the_holder_acted(fake: &Fake, who: &[&str]) {
    for s in fake.seen().iter().filter(|s| s.acts() && who.contains(&s.who.as_str())) {
        assert_eq!(s.holder.as_deref(), Some(s.who.as_str()), "{s:?} without the lease");
    }
}

fn lease_spec(fake: &Fake) -> LeaseSpec {
    fake.lease().expect("no Lease demo-controller").spec.unwrap()
}

#[tokio::test]
async fn a_pod_failure_is_acted_on_at_once_through_the_watch_not_at_the_next_resync() {
    let (c, fake) = running_job(1, 2, 3).await;
    // No resync in the time of the test: only a watch event can start a pass.
    let (task, said, _cancel) = spawn_run(c.resync_interval(Duration::from_secs(120)));
    wait_for("the watch on the job's pods", Duration::from_secs(60), || fake.watching() > 0).await;
    // Let the passes that starting the watch brings pass (if one is slow, it sees the failure
    // below: a watch event still, not the resync).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(said.any("holding lease demo-controller of job demo"), "{:#?}", said.lines());

    let failed_at = Instant::now();
    fake.set(Worker, 1, 0, |p| failed(p, 137, "OOMKilled"));
    wait_for("the failed worker to be recreated", Duration::from_secs(20), || {
        fake.has_seen("POST pods demo-worker-1-1")
    })
    .await;
    assert!(failed_at.elapsed() < Duration::from_secs(20));
    wait_for("the restart to be recorded", Duration::from_secs(20), || {
        fake.status().worker[1].restarts() == 1
    })
    .await;
    // A pod that vanishes (deleted by hand): the DELETED event, recreated as a disruption.
    {
        let mut state = fake.0.lock().unwrap();
        state.pods.remove("demo-worker-0-0");
        state.publish();
    }
    wait_for("the vanished worker to be recreated", Duration::from_secs(20), || {
        fake.has_seen("POST pods demo-worker-0-1")
    })
    .await;
    assert!(said.any("worker-0 attempt 0 was disrupted"), "{:#?}", said.lines());
    assert!(!task.is_finished());
    task.abort();
}

#[tokio::test]
async fn two_controllers_of_one_job_only_the_lease_holder_acts_and_the_other_takes_over() {
    let (client, fake) = Fake::start();
    client.launch(job(1, 1, 3), false).await.unwrap();
    // Short leases (3 s: renewed every second) so that the takeover comes soon; a long resync so
    // that passes come from watch events.
    let controller = |who: &str| {
        let fake = fake.clone();
        let who = who.to_string();
        async move {
            fake_client_as(&fake, &who)
                .attach("demo")
                .await
                .unwrap()
                .identity(who)
                .stop_on_cancel(false)
                .lease_duration(Duration::from_secs(3))
                .resync_interval(Duration::from_secs(60))
        }
    };
    let (a, said_a, _cancel_a) = spawn_run(controller("a").await);
    wait_for("a to create the server", Duration::from_secs(60), || fake.has_seen("POST pods demo-ps-0-0"))
        .await;
    assert_eq!(fake.holder().as_deref(), Some("a"));

    let (b, said_b, cancel_b) = spawn_run(controller("b").await);
    wait_for("b to wait for a", Duration::from_secs(60), || {
        said_b.any("job demo is controlled by a (lease demo-controller")
    })
    .await;
    // The job moves on while both run: a acts on it, b only watches.
    fake.everything_runs();
    wait_for("a to create the worker", Duration::from_secs(60), || {
        fake.has_seen("POST pods demo-worker-0-0")
    })
    .await;
    fake.everything_runs();
    wait_for("the job to run", Duration::from_secs(60), || fake.status().state == JobState::Running).await;
    assert!(acts_of(&fake, "b").is_empty(), "{:#?}", acts_of(&fake, "b"));
    assert!(!acts_of(&fake, "a").is_empty());
    only_the_holder_acted(&fake, &["a", "b"]);
    assert!(!b.is_finished());

    // a dies without releasing the Lease; a worker fails meanwhile. b takes over once a's
    // Lease has gone unrenewed for its duration, and recreates the worker.
    a.abort();
    let _ = a.await;
    fake.set(Worker, 0, 0, |p| failed(p, 1, "Error"));
    wait_for("b to take over and recreate the worker", Duration::from_secs(60), || {
        fake.has_seen("POST pods demo-worker-0-1")
    })
    .await;
    assert!(
        said_b.any("took over job demo from a, whose lease demo-controller expired"),
        "{:#?}",
        said_b.lines()
    );
    let spec = lease_spec(&fake);
    assert_eq!((spec.holder_identity.as_deref(), spec.lease_transitions), (Some("b"), Some(1)));
    assert!(acts_of(&fake, "b").iter().any(|s| s.line == "POST pods demo-worker-0-1"));
    only_the_holder_acted(&fake, &["a", "b"]);
    assert!(!said_a.any("took over"), "{:#?}", said_a.lines());

    // b detaches (`attach` stopped): it releases the Lease, and the next controller takes
    // it at once, without waiting for it to expire.
    drop(cancel_b);
    let outcome = tokio::time::timeout(Duration::from_secs(60), b).await.unwrap().unwrap().unwrap();
    assert!(matches!(outcome, RunOutcome::Detached));
    assert_eq!(fake.holder(), None);
    let (c, said_c, _cancel_c) = spawn_run(controller("c").await);
    wait_for("c to hold the lease", Duration::from_secs(60), || said_c.any("holding lease demo-controller"))
        .await;
    assert!(!said_c.any("controlled by"), "{:#?}", said_c.lines());
    assert_eq!(lease_spec(&fake).lease_transitions, Some(2));
    c.abort();
}

#[tokio::test]
async fn a_controller_that_loses_its_lease_stops_acting() {
    let (_launcher, fake) = running_job(1, 2, 3).await;
    let c = fake_client_as(&fake, "a")
        .attach("demo")
        .await
        .unwrap()
        .identity("a")
        .lease_duration(Duration::from_secs(3))
        .resync_interval(Duration::from_secs(60));
    let (task, said, _cancel) = spawn_run(c);
    wait_for("a to hold the lease", Duration::from_secs(60), || fake.holder().as_deref() == Some("a")).await;
    // Someone takes the Lease (as a controller would after a's renewals failed for its whole
    // duration): a's next renewal conflicts, and a stops acting.
    {
        let mut state = fake.0.lock().unwrap();
        let rv = state.rv();
        let lease = state.leases.get_mut("demo-controller").unwrap();
        lease.metadata.resource_version = Some(rv);
        let spec = lease.spec.as_mut().unwrap();
        spec.holder_identity = Some("thief".into());
        spec.lease_duration_seconds = Some(3600);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
    }
    wait_for("a to notice", Duration::from_secs(60), || said.any("lost lease demo-controller to thief"))
        .await;
    let acted = acts_of(&fake, "a").len();
    fake.set(Worker, 0, 0, |p| failed(p, 137, "OOMKilled"));
    // Long enough for a watch event and a pass, were a still acting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(acts_of(&fake, "a").len(), acted, "{:#?}", said.lines());
    assert!(!fake.has_seen("POST pods demo-worker-0-1"));
    only_the_holder_acted(&fake, &["a"]);
    assert!(!task.is_finished());
    task.abort();
}

#[tokio::test]
async fn a_lease_conflict_on_acquire_leaves_the_loser_waiting() {
    /// A Lease held by `holder`, renewed just now, that lasts long.
    fn held_by(holder: &str, rv: String, transitions: i32) -> Lease {
        Lease {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("demo-controller".into()),
                namespace: Some(NS.into()),
                resource_version: Some(rv),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(3600),
                renew_time: Some(MicroTime(Timestamp::now())),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        }
    }

    // The create races: a rival creates the Lease between this controller's read (404) and its
    // create, which gets 409 AlreadyExists.
    let (client, fake) = Fake::start();
    client.launch(job(1, 1, 3), false).await.unwrap();
    fake.before("POST leases demo-controller", |state| {
        let rv = state.rv();
        state.leases.insert("demo-controller".into(), held_by("rival", rv, 0));
    });
    let me = fake_client_as(&fake, "me").attach("demo").await.unwrap().identity("me");
    let (task, said, _cancel) = spawn_run(me.lease_duration(Duration::from_secs(3)));
    wait_for("the loser to wait", Duration::from_secs(60), || said.any("job demo is controlled by rival"))
        .await;
    assert!(fake.has_seen("POST leases demo-controller"));
    assert!(acts_of(&fake, "me").is_empty());
    assert_eq!(fake.holder().as_deref(), Some("rival"));
    // The rival releases it: taken at once, and the job is driven.
    {
        let mut state = fake.0.lock().unwrap();
        let rv = state.rv();
        let lease = state.leases.get_mut("demo-controller").unwrap();
        lease.metadata.resource_version = Some(rv);
        lease.spec.as_mut().unwrap().holder_identity = None;
    }
    wait_for("the server pod", Duration::from_secs(60), || fake.has_seen("POST pods demo-ps-0-0")).await;
    assert_eq!(fake.holder().as_deref(), Some("me"));
    only_the_holder_acted(&fake, &["me"]);
    task.abort();

    // The takeover races: the old holder's Lease expired (1 s), but a rival takes it over
    // between this controller's read and its write, which is conditional on the version it
    // read and gets 409 Conflict.
    let (client, fake) = Fake::start();
    client.launch(job(1, 1, 3), false).await.unwrap();
    {
        let mut state = fake.0.lock().unwrap();
        let rv = state.rv();
        let mut old = held_by("old", rv, 4);
        old.spec.as_mut().unwrap().lease_duration_seconds = Some(1);
        state.leases.insert("demo-controller".into(), old);
    }
    fake.before("PUT leases/demo-controller", |state| {
        let rv = state.rv();
        state.leases.insert("demo-controller".into(), held_by("rival", rv, 5));
    });
    let me = fake_client_as(&fake, "me").attach("demo").await.unwrap().identity("me");
    let (task, said, _cancel) = spawn_run(me.lease_duration(Duration::from_secs(3)));
    wait_for("the first wait", Duration::from_secs(60), || said.any("job demo is controlled by old")).await;
    wait_for("the lost race", Duration::from_secs(60), || said.any("job demo is controlled by rival")).await;
    let puts: Vec<Seen> =
        fake.seen().into_iter().filter(|s| s.line == "PUT leases/demo-controller" && s.who == "me").collect();
    assert_eq!(puts.len(), 1, "{puts:?}");
    assert_eq!(puts[0].holder.as_deref(), Some("old"));
    let spec = lease_spec(&fake);
    assert_eq!((spec.holder_identity.as_deref(), spec.lease_transitions), (Some("rival"), Some(5)));
    assert!(acts_of(&fake, "me").is_empty(), "{:#?}", said.lines());
    assert!(!said.any("took over"), "{:#?}", said.lines());
    task.abort();
}
