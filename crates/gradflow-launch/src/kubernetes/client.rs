//! The part that talks to the API server: create a job, run its controller, show its status,
//! read its logs, delete it.
//!
//! `launch` creates, in this order, the job's root ConfigMap, the Secret with its token (when
//! `auth.enabled`), the Secret with the literal values of `kubernetes.env` (when it sets any;
//! the record holds references to it, and `attach` reads it back), its Service, its Volcano
//! PodGroup (with `gang = "volcano"`) and, detached, its controller's Kubernetes Job; every pod comes
//! later, from the controller, so the Secrets and the PodGroup always exist before the first
//! pod that needs them.
//!
//! Everything here is thin on purpose: decisions are made by
//! [`controller::decide`] from what a pass reads, and a pass is a
//! fixed sequence of requests: read the record (GET ConfigMap), list the pods (GET pods with
//! the job's label), then create pods (POST), write the record (PUT, conditional on its
//! `resourceVersion`), delete pods (DELETE). API errors end the pass; the next pass starts
//! again from what is there, so a transient error (a 500, a timeout) costs a pass, not the
//! job.
//!
//! [`Controller::run`] is one loop that owns everything it waits on: a kube-runtime watcher
//! on the job's pods (any event schedules a pass 50 ms later, so a burst makes one pass), the
//! resync timer (a pass at least every 30 s, the safety net if the watch is down), the
//! job's [`lease`](super::lease) (acquired before the first pass, renewed every third of its
//! duration, released on the way out), and the cancel signal. Without the Lease it only
//! looks; after a failed pass, events wait for the backoff.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::{AsyncBufReadExt, Stream, StreamExt};
use k8s_openapi::api::batch::v1::Job as BatchJob;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, LogParams, Patch, PatchParams, PostParams,
    Preconditions,
};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::time::Instant;

use super::controller::{self, Action, Decision, JobStatus, JobSummary, member};
use super::gang::{ANNOTATION_KUEUE_RETRIABLE_IN_GROUP, KUEUE_API_VERSION, LABEL_KUEUE_GROUP, PodGroup};
use super::lease::{Acquire, DEFAULT_LEASE_DURATION, LeaseKeeper, Renewal, default_identity};
use super::render::{
    Renderer, controller_name, env_secret_name, restore_env, token_secret_name, uses_env_secret,
};
use super::{KubernetesError, LABEL_CONTROLLER_OF, LABEL_JOB, RECORD_JOB_KEY, RECORD_STATUS_KEY};
use gradflow_job::{JobConfig, JobError, Role};

type Result<T, E = KubernetesError> = std::result::Result<T, E>;

/// A connection to a cluster, in one namespace.
#[derive(Clone)]
pub struct JobClient {
    client: Client,
    namespace: String,
}

/// Which pods `gradflow logs` reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogSelection {
    /// Only this role; both when `None`.
    pub role: Option<Role>,
    /// Only this index.
    pub index: Option<u32>,
    /// This attempt; the latest of each process when `None`.
    pub attempt: Option<u32>,
    /// The detached controller's pod instead of the job's pods.
    pub controller: bool,
}

/// Lines of several pods' logs as they come: `(pod, line)`.
pub type LogLines = Pin<Box<dyn Stream<Item = (String, std::io::Result<String>)> + Send>>;

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

impl JobClient {
    /// A client for `namespace` on `client`'s cluster (tests pass a client over a mock
    /// service).
    pub fn new(client: Client, namespace: impl Into<String>) -> JobClient {
        JobClient { client, namespace: namespace.into() }
    }

    /// A client from the kubeconfig (`KUBECONFIG`, `~/.kube/config`) or, inside a pod, the
    /// service account, as kube-rs finds them. The namespace is `namespace`, else the
    /// context's (the service account's in a pod), else `default`.
    pub async fn infer(namespace: Option<&str>) -> Result<JobClient> {
        // Other dependencies compile rustls with more than one crypto provider; then none is
        // the default and a TLS client panics. Pick one (an error means one is installed).
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let config = kube::Config::infer().await.map_err(|e| KubernetesError::NoCluster(e.to_string()))?;
        let namespace = namespace.map(str::to_string).unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config).map_err(|e| KubernetesError::NoCluster(e.to_string()))?;
        Ok(JobClient { client, namespace })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn config_maps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn services(&self) -> Api<Service> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn pod_groups(&self) -> Api<PodGroup> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Kueue's Workloads: a custom resource gradflow only deletes, so untyped.
    fn workloads(&self) -> Api<DynamicObject> {
        let (group, version) = KUEUE_API_VERSION.split_once('/').expect("group/version");
        let gvk = kube::api::GroupVersionKind::gvk(group, version, "Workload");
        Api::namespaced_with(self.client.clone(), &self.namespace, &ApiResource::from_gvk(&gvk))
    }

    /// Deletes the Kueue Workload `name`; one that is not there is fine.
    async fn delete_workload(&self, name: &str) -> Result<()> {
        match self.workloads().delete(name, &DeleteParams::background()).await {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(KubernetesError::api(format!("deleting Kueue Workload {name}"))(e)),
        }
    }

    /// Creates a job: its root ConfigMap (the record), the Secret with its token (with
    /// `auth.enabled`: from `auth.token_file`, else this process's `GRADFLOW_TOKEN`, else
    /// fresh), its Service and, with `detach`, the pod that runs its controller in the
    /// cluster. Returns the controller to run here otherwise. A job of the same name is
    /// [`KubernetesError::AlreadyExists`]. A token that cannot be read fails before anything
    /// is created; a Secret, the Service or the PodGroup that cannot be created removes the
    /// root again.
    pub async fn launch(&self, job: JobConfig, detach: bool) -> Result<Controller> {
        let token = job.auth.token().map_err(|e| {
            KubernetesError::Token(match e {
                JobError::Environment(message) => message,
                JobError::Token(e) => e.to_string(),
                other => other.to_string(),
            })
        })?;
        let renderer = Renderer::new(job, &self.namespace)?;
        let name = renderer.job().name.clone();
        let root = renderer.root(&JobStatus::new(renderer.job()));
        let root = match self.config_maps().create(&PostParams::default(), &root).await {
            Ok(root) => root,
            Err(e) if is_status(&e, 409) => {
                return Err(KubernetesError::AlreadyExists { job: name, namespace: self.namespace.clone() });
            }
            Err(e) => return Err(KubernetesError::api(format!("creating ConfigMap {name}"))(e)),
        };
        let renderer = renderer.with_owner(&root)?;
        // The Secrets exist before any pod that reads them: the token's, and the one with the
        // literal values of `kubernetes.env` (which `attach` needs to render the same pods).
        let secrets = token.iter().map(|t| renderer.token_secret(Some(t))).chain(renderer.env_secret());
        for secret in secrets.collect::<Vec<_>>() {
            if let Err(e) = self.create_owned_secret(&renderer, &secret).await {
                // Nothing else exists yet: without the root, launching again after fixing the
                // cause (a missing permission, a Secret of that name) starts from a clean slate.
                let _ = self.config_maps().delete(&name, &DeleteParams::background()).await;
                return Err(e);
            }
        }
        let created = async {
            self.ensure_service(&renderer).await?;
            self.ensure_pod_group(&renderer).await
        };
        if let Err(e) = created.await {
            // As for the Secrets: the root takes what it owns with it, so launching again after
            // fixing the cause (no Volcano, a PodGroup of that name) starts from a clean slate.
            let _ = self.config_maps().delete(&name, &DeleteParams::background()).await;
            return Err(e);
        }
        if detach {
            let jobs: Api<BatchJob> = Api::namespaced(self.client.clone(), &self.namespace);
            match jobs.create(&PostParams::default(), &renderer.controller_job()).await {
                Ok(_) => {}
                Err(e) if is_status(&e, 409) => {}
                Err(e) => {
                    return Err(KubernetesError::api(format!("creating Job {}", controller_name(&name)))(e));
                }
            }
        }
        Ok(Controller::new(self.clone(), renderer))
    }

    /// The controller of an existing job, to resume driving it (after the launcher that
    /// created it died, or in a detached job's controller pod). The job's token Secret must be
    /// there: pods created without it could not start, and only `launch` knows a token.
    pub async fn attach(&self, name: &str) -> Result<Controller> {
        let (root, mut renderer, _) = self.read_record(name).await?;
        if uses_env_secret(renderer.job()) {
            // The record holds `kubernetes.env` without its literal values; they are in the
            // job's `<job>-env` Secret.
            let secret_name = env_secret_name(name);
            let secret = self
                .secrets()
                .get_opt(&secret_name)
                .await
                .map_err(KubernetesError::api(format!("reading Secret {secret_name}")))?;
            let secret = match secret {
                Some(s) if secret_owner(&s.metadata, &renderer) == SecretOwner::ThisJob => s,
                Some(_) => return Err(self.foreign_secret(&secret_name)),
                None => {
                    return Err(KubernetesError::Record {
                        job: name.into(),
                        message: format!(
                            "Secret {secret_name}, which holds the values of kubernetes.env, is missing in \
                             namespace {}: new pods could not get their environment; remove the job with \
                             `gradflow delete {name}` and launch it again",
                            self.namespace
                        ),
                    });
                }
            };
            let mut job = renderer.job().clone();
            restore_env(&mut job, &secret.data.unwrap_or_default())?;
            renderer = Renderer::new(job, &self.namespace)?.with_owner(&root)?;
        }
        if renderer.job().auth.enabled {
            self.check_token_secret(&renderer).await?;
        }
        self.ensure_service(&renderer).await?;
        self.ensure_pod_group(&renderer).await?;
        Ok(Controller::new(self.clone(), renderer))
    }

    /// Creates one of the job's Secrets (its token's, its env values'), owned by the job's
    /// (new) root.
    ///
    /// A Secret of that name may be there already: one this job owns (an earlier try of this
    /// request) is used as it is; one owned by an earlier job of the same name, whose root is
    /// gone (`kubectl delete configmap` returns before the garbage collector has deleted the
    /// dependents), is deleted and created again; any other one is an error that names it.
    async fn create_owned_secret(&self, renderer: &Renderer, secret: &Secret) -> Result<()> {
        let name = secret.metadata.name.clone().unwrap_or_default();
        let creating = || KubernetesError::api(format!("creating Secret {name}"));
        match self.secrets().create(&PostParams::default(), secret).await {
            Ok(_) => return Ok(()),
            Err(e) if is_status(&e, 409) => {}
            Err(e) => return Err(creating()(e)),
        }
        let existing = self
            .secrets()
            .get_opt(&name)
            .await
            .map_err(KubernetesError::api(format!("reading Secret {name}")))?;
        let Some(existing) = existing else {
            // Deleted in between (by the garbage collector, say): the conflict is over.
            return self
                .secrets()
                .create(&PostParams::default(), secret)
                .await
                .map(|_| ())
                .map_err(creating());
        };
        match secret_owner(&existing.metadata, renderer) {
            SecretOwner::ThisJob => Ok(()),
            SecretOwner::EarlierJob => {
                let dp = DeleteParams::default().preconditions(Preconditions {
                    uid: existing.metadata.uid.clone(),
                    resource_version: None,
                });
                match self.secrets().delete(&name, &dp).await {
                    Ok(_) => {}
                    Err(e) if is_status(&e, 404) => {}
                    Err(e) => {
                        return Err(KubernetesError::api(format!(
                            "deleting Secret {name}, left by an earlier job of this name"
                        ))(e));
                    }
                }
                self.secrets().create(&PostParams::default(), secret).await.map(|_| ()).map_err(creating())
            }
            SecretOwner::Other => Err(self.foreign_secret(&name)),
        }
    }

    /// Checks that the job's token Secret is there and the job's.
    async fn check_token_secret(&self, renderer: &Renderer) -> Result<()> {
        let job = &renderer.job().name;
        let name = token_secret_name(job);
        let existing = self
            .secrets()
            .get_opt(&name)
            .await
            .map_err(KubernetesError::api(format!("reading Secret {name}")))?;
        match existing.map(|s| secret_owner(&s.metadata, renderer)) {
            Some(SecretOwner::ThisJob) => Ok(()),
            Some(_) => Err(self.foreign_secret(&name)),
            None => Err(KubernetesError::Token(format!(
                "Secret {name} of job {job} is missing in namespace {}: pods created from now on could not \
                 start, and the running ones hold a token no one else knows; remove the job with \
                 `gradflow delete {job}` and launch it again",
                self.namespace
            ))),
        }
    }

    fn foreign_secret(&self, name: &str) -> KubernetesError {
        KubernetesError::Foreign(format!(
            "a Secret named {name} already exists in namespace {} and does not belong to this job; \
             gradflow creates the job's Secrets (<job>-token, <job>-env) itself: delete that one (`kubectl delete secret {name} -n {}`) \
             or rename the job (to use a token of your own, set auth.token_file)",
            self.namespace, self.namespace
        ))
    }

    /// Creates the job's Service, or checks that the one there is the job's.
    async fn ensure_service(&self, renderer: &Renderer) -> Result<()> {
        let name = &renderer.job().name;
        match self.services().create(&PostParams::default(), &renderer.service()).await {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 409) => {
                let existing = self
                    .services()
                    .get(name)
                    .await
                    .map_err(KubernetesError::api(format!("reading Service {name}")))?;
                if owned_by_job(&existing.metadata, renderer) {
                    Ok(())
                } else {
                    Err(KubernetesError::Foreign(format!(
                        "a Service named {name} already exists in namespace {} and does not belong to this job; rename the job or delete the Service",
                        self.namespace
                    )))
                }
            }
            Err(e) => Err(KubernetesError::api(format!("creating Service {name}"))(e)),
        }
    }

    /// With `gang = "volcano"`: creates the job's PodGroup, or checks that the one there is
    /// the job's. Nothing otherwise.
    async fn ensure_pod_group(&self, renderer: &Renderer) -> Result<()> {
        let Some(group) = renderer.pod_group() else { return Ok(()) };
        let name = group.metadata.name.clone().unwrap_or_default();
        match self.pod_groups().create(&PostParams::default(), &group).await {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 409) => {
                let existing = self
                    .pod_groups()
                    .get(&name)
                    .await
                    .map_err(KubernetesError::api(format!("reading PodGroup {name}")))?;
                if owned_by_job(&existing.metadata, renderer) {
                    Ok(())
                } else {
                    Err(KubernetesError::Foreign(format!(
                        "a Volcano PodGroup named {name} already exists in namespace {} and does not belong to this job \
                         (kubernetes.gang = \"volcano\" names the job's PodGroup after the job); rename the job or \
                         delete it (`kubectl delete podgroup.scheduling.volcano.sh {name} -n {}`)",
                        self.namespace, self.namespace
                    )))
                }
            }
            Err(e) if is_status(&e, 404) => Err(KubernetesError::Config(format!(
                "kubernetes.gang = \"volcano\", but the cluster has no PodGroup resource \
                 (scheduling.volcano.sh/v1beta1): is Volcano installed? ({})",
                super::describe(&e)
            ))),
            Err(e) => Err(KubernetesError::api(format!("creating PodGroup {name}"))(e)),
        }
    }

    /// The job's root ConfigMap, a renderer owned by it, and the recorded status.
    async fn read_record(&self, name: &str) -> Result<(ConfigMap, Renderer, JobStatus)> {
        let root = self
            .config_maps()
            .get_opt(name)
            .await
            .map_err(KubernetesError::api(format!("reading ConfigMap {name}")))?
            .ok_or_else(|| KubernetesError::NotFound {
                job: name.into(),
                namespace: self.namespace.clone(),
            })?;
        if root.metadata.deletion_timestamp.is_some() {
            return Err(KubernetesError::NotFound { job: name.into(), namespace: self.namespace.clone() });
        }
        let record = |message: String| KubernetesError::Record { job: name.into(), message };
        let data = root
            .data
            .as_ref()
            .ok_or_else(|| record("the ConfigMap has no data: not a gradflow job".into()))?;
        let job_json = data
            .get(RECORD_JOB_KEY)
            .ok_or_else(|| record(format!("no {RECORD_JOB_KEY}: not a gradflow job")))?;
        let job: JobConfig =
            serde_json::from_str(job_json).map_err(|e| record(format!("{RECORD_JOB_KEY}: {e}")))?;
        let status = match data.get(RECORD_STATUS_KEY) {
            Some(text) => {
                JobStatus::from_json(text).map_err(|e| record(format!("{RECORD_STATUS_KEY}: {e}")))?
            }
            None => JobStatus::new(&job),
        };
        let renderer = Renderer::new(job, &self.namespace)?.with_owner(&root)?;
        Ok((root, renderer, status))
    }

    async fn list_job_pods(&self, name: &str) -> Result<Vec<Pod>> {
        let lp = ListParams::default().labels(&format!("{LABEL_JOB}={name}"));
        Ok(self
            .pods()
            .list(&lp)
            .await
            .map_err(KubernetesError::api(format!("listing the pods of job {name}")))?
            .items)
    }

    /// What `gradflow status` shows: the recorded state, the pods, and the latest warning
    /// event about one of them.
    pub async fn status(&self, name: &str) -> Result<JobSummary> {
        let (_, renderer, status) = self.read_record(name).await?;
        let pods = self.list_job_pods(name).await?;
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.namespace);
        let lp = ListParams::default().fields("involvedObject.kind=Pod,type=Warning");
        let events = events.list(&lp).await.map_err(KubernetesError::api("listing warning events"))?.items;
        Ok(controller::summarize(&renderer, &status, &pods, &events))
    }

    /// The pods (and containers) that `selection` names, in role and index order.
    pub async fn log_targets(&self, name: &str, selection: &LogSelection) -> Result<Vec<(String, String)>> {
        if selection.controller {
            // The newest pod of the controller's Job.
            let lp = ListParams::default().labels(&format!("{LABEL_CONTROLLER_OF}={name}"));
            let mut pods = self
                .pods()
                .list(&lp)
                .await
                .map_err(KubernetesError::api(format!("listing the controller pods of job {name}")))?
                .items;
            pods.sort_by(|a, b| a.metadata.creation_timestamp.cmp(&b.metadata.creation_timestamp));
            return match pods.pop().and_then(|p| p.metadata.name) {
                Some(pod) => Ok(vec![(pod, "controller".into())]),
                None => Err(KubernetesError::NoPods {
                    job: name.into(),
                    what: "controller pod (only `launch --detach` makes one)".into(),
                }),
            };
        }
        let pods = self.list_job_pods(name).await?;
        let targets = select_pods(&pods, selection);
        if targets.is_empty() {
            return Err(KubernetesError::NoPods {
                job: name.into(),
                what: "pod matching the selection".into(),
            });
        }
        Ok(targets)
    }

    /// The logs so far of each selected pod: `(pod, text)`.
    pub async fn logs(&self, name: &str, selection: &LogSelection) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for (pod, container) in self.log_targets(name, selection).await? {
            let lp = LogParams { container: Some(container), ..LogParams::default() };
            let text = self
                .pods()
                .logs(&pod, &lp)
                .await
                .map_err(KubernetesError::api(format!("reading the logs of {pod}")))?;
            out.push((pod, text));
        }
        Ok(out)
    }

    /// The selected pods' logs from the start, then as they are written, merged line by line.
    pub async fn follow_logs(&self, name: &str, selection: &LogSelection) -> Result<LogLines> {
        let mut streams = Vec::new();
        for (pod, container) in self.log_targets(name, selection).await? {
            let lp = LogParams { container: Some(container), follow: true, ..LogParams::default() };
            let reader = self
                .pods()
                .log_stream(&pod, &lp)
                .await
                .map_err(KubernetesError::api(format!("following the logs of {pod}")))?;
            let lines = reader.lines().map(move |line| (pod.clone(), line));
            streams.push(Box::pin(lines) as LogLines);
        }
        Ok(Box::pin(futures::stream::select_all(streams)))
    }

    /// Deletes a job: its root ConfigMap with foreground propagation, so that the garbage
    /// collector deletes every pod (failed ones and their logs included) and the Service
    /// first. With `wait`, returns once all of it is gone (true) or `wait` has passed (false).
    ///
    /// A job in a Kueue pod group (`gang = "kueue"`) loses its Workload first: Kueue keeps
    /// the pods of a group it still runs (its finalizer) until the Workload goes, and would
    /// hold the deletion of the job with them.
    pub async fn delete(&self, name: &str, wait: Option<Duration>) -> Result<bool> {
        let pods = self.list_job_pods(name).await?;
        let groups: std::collections::BTreeSet<&String> =
            pods.iter().filter_map(|p| p.metadata.labels.as_ref()?.get(LABEL_KUEUE_GROUP)).collect();
        for group in groups {
            self.delete_workload(group).await?;
        }
        match self.config_maps().delete(name, &DeleteParams::foreground()).await {
            Ok(_) => {}
            Err(e) if is_status(&e, 404) => {
                return Err(KubernetesError::NotFound {
                    job: name.into(),
                    namespace: self.namespace.clone(),
                });
            }
            Err(e) => return Err(KubernetesError::api(format!("deleting ConfigMap {name}"))(e)),
        }
        let Some(wait) = wait else { return Ok(false) };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let there = self
                .config_maps()
                .get_opt(name)
                .await
                .map_err(KubernetesError::api(format!("reading ConfigMap {name}")))?;
            if there.is_none() {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(500).min(wait)).await;
        }
    }
}

/// Whose an existing Secret of the job's (its token's, its env values') is.
#[derive(Debug, PartialEq)]
enum SecretOwner {
    /// Owned by the job's root.
    ThisJob,
    /// Owned by a root of the same name that is gone (its uid is not the current root's).
    EarlierJob,
    /// Anyone else's, or no one's.
    Other,
}

/// Whether the job's root (the renderer's owner) is among `meta`'s owners.
fn owned_by_job(meta: &ObjectMeta, renderer: &Renderer) -> bool {
    meta.owner_references.iter().flatten().any(|o| Some(o.uid.as_str()) == renderer.owner_uid())
}

fn secret_owner(meta: &ObjectMeta, renderer: &Renderer) -> SecretOwner {
    let Some(owner) = meta.owner_references.iter().flatten().find(|o| o.controller == Some(true)) else {
        return SecretOwner::Other;
    };
    if Some(owner.uid.as_str()) == renderer.owner_uid() {
        SecretOwner::ThisJob
    } else if owner.kind == "ConfigMap" && owner.api_version == "v1" && owner.name == renderer.job().name {
        // There is one ConfigMap of that name, and it is ours: this owner no longer exists.
        SecretOwner::EarlierJob
    } else {
        SecretOwner::Other
    }
}

/// The pods that `selection` names: `(pod, container)`.
pub fn select_pods(pods: &[Pod], selection: &LogSelection) -> Vec<(String, String)> {
    let mut found: Vec<(Role, u32, u32, String)> = pods
        .iter()
        .filter_map(|p| {
            let (role, index, attempt) = member(p)?;
            Some((role, index, attempt, p.metadata.name.clone()?))
        })
        .filter(|(role, index, _, _)| {
            selection.role.is_none_or(|r| r == *role) && selection.index.is_none_or(|i| i == *index)
        })
        .collect();
    found.sort_by_key(|(role, index, attempt, _)| (*role == Role::Worker, *index, *attempt));
    let chosen: Vec<_> = match selection.attempt {
        Some(a) => found.into_iter().filter(|f| f.2 == a).collect(),
        // The latest attempt of each process: the sort puts it last among its process.
        None => {
            let mut latest: Vec<(Role, u32, u32, String)> = Vec::new();
            for f in found {
                match latest.last_mut() {
                    Some(l) if l.0 == f.0 && l.1 == f.1 => *l = f,
                    _ => latest.push(f),
                }
            }
            latest
        }
    };
    chosen.into_iter().map(|(role, _, _, name)| (name, role.as_str().to_string())).collect()
}

/// One pass of a controller: what it decided, and the job as it saw it.
#[derive(Debug, Clone)]
pub struct Pass {
    pub decision: Decision,
    pub summary: JobSummary,
}

/// Drives one job to its end; see [`controller`] for the rules.
///
/// [`run`](Self::run) acts only while it holds the job's Lease (see [`lease`](super::lease))
/// and passes when a watch on the job's pods says something changed, with a slow resync
/// behind it; [`reconcile`](Self::reconcile) is one pass, without either.
pub struct Controller {
    api: JobClient,
    renderer: Renderer,
    resync_interval: Duration,
    max_failed_passes: u32,
    stop_on_cancel: bool,
    identity: String,
    lease_duration: Duration,
}

/// Time from a watch event to the pass it causes, so that a burst of events (a pass creates
/// several pods; a node drains) makes one pass.
const SETTLE: Duration = Duration::from_millis(50);

impl Controller {
    fn new(api: JobClient, renderer: Renderer) -> Controller {
        Controller {
            api,
            renderer,
            resync_interval: Duration::from_secs(30),
            max_failed_passes: 10,
            stop_on_cancel: true,
            identity: default_identity(),
            lease_duration: DEFAULT_LEASE_DURATION,
        }
    }

    /// The job's renderer (owned by the job's root ConfigMap).
    pub fn renderer(&self) -> &Renderer {
        &self.renderer
    }

    /// Time between two passes when no watch event comes: the safety net behind the watch on
    /// the job's pods, which is what drives passes. Default 30 s.
    pub fn resync_interval(mut self, interval: Duration) -> Controller {
        self.resync_interval = interval;
        self
    }

    /// Consecutive failed passes (API errors) before [`run`](Self::run) gives up, leaving the
    /// job as it is. Default 10, with the wait between them doubling up to 30 s.
    pub fn max_failed_passes(mut self, n: u32) -> Controller {
        self.max_failed_passes = n.max(1);
        self
    }

    /// Whether cancelling [`run`](Self::run) stops the job (default) or only detaches from
    /// it.
    pub fn stop_on_cancel(mut self, stop: bool) -> Controller {
        self.stop_on_cancel = stop;
        self
    }

    /// This controller's name as the holder of the job's Lease. Default: host name, process
    /// id and a random tag ([`default_identity`]).
    pub fn identity(mut self, identity: impl Into<String>) -> Controller {
        self.identity = identity.into();
        self
    }

    /// How long the job's Lease stays this controller's after its last renewal (whole
    /// seconds, at least 1). Default 15 s: a controller that dies without releasing the Lease
    /// is replaced that long after its last renewal.
    pub fn lease_duration(mut self, duration: Duration) -> Controller {
        self.lease_duration = duration.max(Duration::from_secs(1));
        self
    }

    /// The job's record, checked to be this controller's job, and its pods.
    async fn read(&self) -> Result<(ConfigMap, JobStatus, Vec<Pod>)> {
        let name = &self.renderer.job().name;
        let (root, _, status) = self.api.read_record(name).await?;
        if root.metadata.uid.as_deref() != self.renderer.owner_uid() {
            // Deleted and launched again under the same name: not the job this controller
            // was started for.
            return Err(KubernetesError::NotFound {
                job: name.clone(),
                namespace: self.api.namespace.clone(),
            });
        }
        let pods = self.api.list_job_pods(name).await?;
        Ok((root, status, pods))
    }

    /// One pass: read the record and the pods, decide, act. With `stop`, a job that is not
    /// over is failed with that message and its running pods deleted.
    ///
    /// This does not look at the job's Lease: [`run`](Self::run) calls it only while it holds
    /// it.
    pub async fn reconcile(&self, stop: Option<&str>) -> Result<Pass> {
        let name = self.renderer.job().name.clone();
        let (root, status, pods) = self.read().await?;
        let decision = controller::decide(&self.renderer, &status, &pods, stop, Timestamp::now());
        let grace = self.renderer.job().launcher.grace_period.as_secs().max(1) as i64;
        for action in &decision.actions {
            match action {
                Action::CreatePod(pod) => {
                    let pod_name = pod.metadata.name.clone().unwrap_or_default();
                    match self.api.pods().create(&PostParams::default(), pod).await {
                        Ok(_) => {}
                        // Created by an earlier pass or another controller: what we wanted.
                        Err(e) if is_status(&e, 409) => {}
                        Err(e) => return Err(KubernetesError::api(format!("creating pod {pod_name}"))(e)),
                    }
                }
                Action::RecordStatus(new) => {
                    let mut record = root.clone();
                    record.data.get_or_insert_default().insert(RECORD_STATUS_KEY.into(), new.to_json());
                    match self.api.config_maps().replace(&name, &PostParams::default(), &record).await {
                        Ok(_) => {}
                        Err(e) if is_status(&e, 409) => return Err(KubernetesError::Conflict),
                        Err(e) => {
                            return Err(KubernetesError::api(format!("writing the record of job {name}"))(e));
                        }
                    }
                }
                Action::DeletePod { name: pod_name, immediate, .. } => {
                    let grace = if *immediate { 0 } else { grace as u32 };
                    let dp = DeleteParams { grace_period_seconds: Some(grace), ..DeleteParams::default() };
                    match self.api.pods().delete(pod_name, &dp).await {
                        Ok(_) => {}
                        Err(e) if is_status(&e, 404) => {}
                        Err(e) => return Err(KubernetesError::api(format!("deleting pod {pod_name}"))(e)),
                    }
                }
                Action::EndPodGroup { pod } => {
                    let patch = serde_json::json!({
                        "metadata": { "annotations": { ANNOTATION_KUEUE_RETRIABLE_IN_GROUP: "false" } }
                    });
                    match self.api.pods().patch(pod, &PatchParams::default(), &Patch::Merge(&patch)).await {
                        Ok(_) => {}
                        Err(e) if is_status(&e, 404) => {}
                        Err(e) => {
                            return Err(KubernetesError::api(format!(
                                "marking pod {pod} {ANNOTATION_KUEUE_RETRIABLE_IN_GROUP}=false"
                            ))(e));
                        }
                    }
                }
                Action::DeleteWorkload { name } => self.api.delete_workload(name).await?,
            }
        }
        let mut summary = controller::summarize(&self.renderer, &decision.status, &pods, &[]);
        // The pods as they are after this pass's deletions were accepted.
        for action in &decision.actions {
            if let Action::DeletePod { name, .. } = action
                && let Some(row) = summary.pods.iter_mut().find(|p| &p.name == name)
            {
                row.phase = "Terminating".into();
            }
        }
        Ok(Pass { decision, summary })
    }

    /// A pass that only looks: what a controller that waits for the Lease sees. Its decision
    /// says whether the job is over; nothing of it is carried out.
    async fn observe(&self) -> Result<Pass> {
        let (_, status, pods) = self.read().await?;
        let decision = controller::decide(&self.renderer, &status, &pods, None, Timestamp::now());
        let summary = controller::summarize(&self.renderer, &status, &pods, &[]);
        Ok(Pass { decision, summary })
    }

    /// Drives the job until it is over and nothing of it runs any more, calling `say` with
    /// each decision's notes, each pod change, and what happens to the job's Lease.
    ///
    /// It first acquires the job's Lease; while another live controller holds it, this one
    /// only watches (it says who holds it, and returns when that controller finishes the
    /// job) and takes over when that Lease expires or is released. While it holds the Lease
    /// it passes whenever the watch on the job's pods reports a change, and at least every
    /// [`resync_interval`](Self::resync_interval); it renews the Lease, stops acting if it
    /// loses it, and releases it when it returns.
    ///
    /// When `cancel` completes: with [`stop_on_cancel`](Self::stop_on_cancel) (the default,
    /// what `launch` does) the job is stopped (Failed, running pods deleted) and this returns
    /// after that pass (unless another controller holds the Lease: then the job is left to
    /// it); without it (`attach`), this returns [`RunOutcome::Detached`] and the job goes on
    /// without a controller until one attaches again. API errors are retried with a growing
    /// wait; after [`max_failed_passes`](Self::max_failed_passes) in a row this gives up with
    /// [`KubernetesError::GaveUp`], leaving the job as it is.
    pub async fn run(
        &self,
        cancel: impl Future<Output = ()>,
        mut say: impl FnMut(&str),
    ) -> Result<RunOutcome> {
        let leases: Api<Lease> = Api::namespaced(self.api.client.clone(), &self.api.namespace);
        let mut lease = LeaseKeeper::new(leases, &self.renderer, &self.identity, self.lease_duration);
        let outcome = self.drive(&mut lease, cancel, &mut say).await;
        if lease.holds()
            && let Err(e) = lease.release().await
        {
            say(&format!("could not release the job's lease ({e}); it expires in {:?}", self.lease_duration));
        }
        outcome
    }

    async fn drive(
        &self,
        lease: &mut LeaseKeeper,
        cancel: impl Future<Output = ()>,
        say: &mut impl FnMut(&str),
    ) -> Result<RunOutcome> {
        let name = self.renderer.job().name.clone();
        let mut cancel = std::pin::pin!(cancel);
        let mut cancelled = false;
        let mut events = pod_events(self.api.pods(), &name);
        let mut watch_failing = false;
        let mut before: Option<JobSummary> = None;
        let mut failed = 0u32;
        let mut stop: Option<String> = None;
        // The holder this controller said it waits for; `Some(None)`: one it could not name.
        let mut waiting_for: Option<Option<String>> = None;
        let now = Instant::now();
        // The next pass (or, without the Lease, the next look), and the next renewal (or
        // attempt to acquire the Lease).
        let mut pass_at = now;
        let mut lease_at = now;
        let mut backing_off = false;
        loop {
            enum Wake {
                Cancel,
                Lease,
                Pass,
                Event(Option<std::result::Result<(), watcher::Error>>),
            }
            let wake = tokio::select! {
                biased;
                () = &mut cancel, if !cancelled && stop.is_none() => Wake::Cancel,
                () = tokio::time::sleep_until(lease_at) => Wake::Lease,
                () = tokio::time::sleep_until(pass_at) => Wake::Pass,
                event = events.next() => Wake::Event(event),
            };
            let now = Instant::now();
            match wake {
                Wake::Cancel => {
                    cancelled = true;
                    if !self.stop_on_cancel {
                        say("detached: the job goes on without a controller until `gradflow attach`");
                        return Ok(RunOutcome::Detached);
                    }
                    if let Some(holder) = waiting_for.as_ref().filter(|_| !lease.holds()) {
                        say(&format!(
                            "interrupted: the job is left to the controller that holds its lease ({})",
                            holder.as_deref().unwrap_or("another controller")
                        ));
                        return Ok(RunOutcome::Detached);
                    }
                    say("interrupted: stopping the job (running pods are deleted, ended ones kept)");
                    stop = Some("interrupted: the launcher was stopped".into());
                    pass_at = now;
                }
                Wake::Event(Some(Ok(()))) => {
                    watch_failing = false;
                    if !backing_off {
                        pass_at = pass_at.min(now + SETTLE);
                    }
                }
                Wake::Event(Some(Err(e))) => {
                    if !watch_failing {
                        say(&format!(
                            "watching the pods of job {name} failed ({}); passes go on every {:?} until the watch works again",
                            describe_watch(&e),
                            self.resync_interval
                        ));
                        watch_failing = true;
                    }
                }
                // A watcher's stream does not end; should it, the resync is left.
                Wake::Event(None) => events = Box::pin(futures::stream::pending()),
                Wake::Lease if lease.holds() => match lease.renew().await {
                    Ok(Renewal::Renewed) => lease_at = now + lease.renew_period(),
                    Ok(Renewal::Lost { holder }) => {
                        say(&format!(
                            "lost lease {} to {}: not acting on job {name} any more",
                            lease.name(),
                            holder.as_deref().unwrap_or("another controller")
                        ));
                        waiting_for = Some(holder);
                        lease_at = now + lease.retry_period();
                    }
                    Err(e) => {
                        if !lease.valid(Instant::now()) {
                            say(&format!(
                                "could not renew lease {} ({e}): not acting on job {name} until it holds the lease again",
                                lease.name()
                            ));
                            lease.forget();
                            waiting_for = Some(None);
                        }
                        lease_at = now + lease.retry_period();
                    }
                },
                Wake::Lease => match lease.acquire().await {
                    Ok(Acquire::Acquired { from }) => {
                        failed = 0;
                        match from {
                            Some(old) => say(&format!(
                                "took over job {name} from {old}, whose lease {} expired; acting as {}",
                                lease.name(),
                                lease.identity()
                            )),
                            None => say(&format!(
                                "holding lease {} of job {name} as {}",
                                lease.name(),
                                lease.identity()
                            )),
                        }
                        waiting_for = None;
                        lease_at = now + lease.renew_period();
                        pass_at = now;
                        backing_off = false;
                    }
                    Ok(Acquire::Waiting { holder, renewed }) => {
                        failed = 0;
                        if stop.is_some() {
                            say(&format!(
                                "interrupted: the job is left to the controller that holds its lease ({})",
                                holder.as_deref().unwrap_or("another controller")
                            ));
                            return Ok(RunOutcome::Detached);
                        }
                        if waiting_for.as_ref() != Some(&holder) {
                            let renewed =
                                renewed.map(|t| format!(", last renewed at {t}")).unwrap_or_default();
                            say(&format!(
                                "job {name} is controlled by {} (lease {}{renewed}); waiting: this controller acts only once that one stops renewing the lease",
                                holder.as_deref().unwrap_or("another controller"),
                                lease.name()
                            ));
                            waiting_for = Some(holder);
                        }
                        lease_at = now + lease.retry_period();
                    }
                    Err(e) => {
                        let text = e.to_string();
                        let wait = self.failed_pass(&mut failed, e)?;
                        say(&format!("acquiring the job's lease failed ({text}); trying again in {wait:?}"));
                        lease_at = now + wait;
                    }
                },
                Wake::Pass if !lease.holds() => {
                    // Waiting for the Lease: look only, and see the job to its end.
                    pass_at = now + self.resync_interval;
                    if waiting_for.is_none() {
                        // The first attempt to acquire the Lease has not been made yet.
                        pass_at = lease_at;
                        continue;
                    }
                    match self.observe().await {
                        Ok(pass) => {
                            for line in controller::changes(before.as_ref(), &pass.summary) {
                                say(&line);
                            }
                            if pass.decision.finished {
                                return Ok(RunOutcome::Finished(pass.summary));
                            }
                            before = Some(pass.summary);
                        }
                        Err(e @ (KubernetesError::NotFound { .. } | KubernetesError::Record { .. })) => {
                            return Err(e);
                        }
                        // The controller that acts retries; looking again later is enough.
                        Err(_) => {}
                    }
                }
                Wake::Pass if !lease.valid(now) => {
                    // Renew before acting (a pass or the machine was slow).
                    lease_at = now;
                }
                Wake::Pass => {
                    backing_off = false;
                    pass_at = now + self.resync_interval;
                    match self.reconcile(stop.as_deref()).await {
                        Ok(pass) => {
                            failed = 0;
                            // What was seen, what was decided, what was done.
                            for line in controller::changes(before.as_ref(), &pass.summary) {
                                say(&line);
                            }
                            for note in &pass.decision.notes {
                                say(note);
                            }
                            for action in &pass.decision.actions {
                                match action {
                                    Action::CreatePod(pod) => {
                                        say(&format!(
                                            "created pod {}",
                                            pod.metadata.name.as_deref().unwrap_or_default()
                                        ));
                                    }
                                    Action::DeletePod { name, reason, .. } => {
                                        say(&format!("deleting pod {name}: {reason}"))
                                    }
                                    Action::EndPodGroup { pod } => say(&format!(
                                        "marking pod {pod} {ANNOTATION_KUEUE_RETRIABLE_IN_GROUP}=false: the job's Kueue pod group is over"
                                    )),
                                    Action::DeleteWorkload { name } => say(&format!(
                                        "deleting Kueue Workload {name}: a pod of the group was never scheduled"
                                    )),
                                    Action::RecordStatus(_) => {}
                                }
                            }
                            if let Some(due) = pass.decision.retry_after {
                                // A restart waits out its backoff: pass again when it is due.
                                pass_at = pass_at.min(now + due + Duration::from_millis(50));
                            }
                            let stopped = stop.is_some() && pass.decision.status.state.is_terminal();
                            if pass.decision.finished || stopped {
                                // A job that ended on its own (not stopped by Ctrl-C) is
                                // cleaned up after its TTL.
                                if let Some(ttl) = self.renderer.settings().ttl_after_finished
                                    && stop.is_none()
                                {
                                    self.delete_after(ttl, lease, cancel.as_mut(), say).await?;
                                }
                                return Ok(RunOutcome::Finished(pass.summary));
                            }
                            before = Some(pass.summary);
                        }
                        Err(KubernetesError::Conflict) => {
                            say("the job record changed during the pass; reading it again");
                            pass_at = now + Duration::from_millis(100).min(self.resync_interval);
                        }
                        Err(e @ (KubernetesError::NotFound { .. } | KubernetesError::Record { .. })) => {
                            return Err(e);
                        }
                        Err(e) => {
                            let text = e.to_string();
                            let wait = self.failed_pass(&mut failed, e)?;
                            say(&format!("pass failed ({text}); trying again in {wait:?}"));
                            pass_at = now + wait;
                            backing_off = true;
                        }
                    }
                }
            }
        }
    }

    /// `kubernetes.ttl_after_finished`: releases the job's Lease (nothing is left to decide),
    /// waits `ttl`, and deletes the job as `gradflow delete --no-wait` does. `cancel` keeps
    /// the job. A job someone deleted meanwhile is fine.
    async fn delete_after(
        &self,
        ttl: Duration,
        lease: &mut LeaseKeeper,
        cancel: std::pin::Pin<&mut impl Future<Output = ()>>,
        say: &mut impl FnMut(&str),
    ) -> Result<()> {
        let name = self.renderer.job().name.clone();
        if let Err(e) = lease.release().await {
            say(&format!("could not release the job's lease ({e}); it expires in {:?}", self.lease_duration));
        }
        if !ttl.is_zero() {
            say(&format!(
                "job {name} ended: deleting it in {} (kubernetes.ttl_after_finished); Ctrl-C keeps it",
                humantime_serde::re::humantime::format_duration(ttl)
            ));
            tokio::select! {
                () = cancel => {
                    say(&format!("interrupted: job {name} is kept; remove it with `gradflow delete {name}`"));
                    return Ok(());
                }
                () = tokio::time::sleep(ttl) => {}
            }
        }
        match self.api.delete(&name, None).await {
            Ok(_) | Err(KubernetesError::NotFound { .. }) => {
                say(&format!("deleted job {name} (kubernetes.ttl_after_finished)"));
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Counts a failed pass (or attempt to acquire the Lease): the wait before the next one,
    /// or [`KubernetesError::GaveUp`] after too many in a row.
    fn failed_pass(&self, failed: &mut u32, e: KubernetesError) -> Result<Duration> {
        *failed += 1;
        if *failed >= self.max_failed_passes {
            return Err(KubernetesError::GaveUp {
                job: self.renderer.job().name.clone(),
                attempts: *failed,
                last: e.to_string(),
            });
        }
        let base = self.resync_interval.min(Duration::from_secs(2));
        Ok((base * 2u32.pow((*failed).min(5))).min(Duration::from_secs(30)))
    }
}

/// Something changed among the job's pods (or the watch failed): a kube-runtime watcher on
/// the job's label, with its backoff between failed attempts. Only the fact of a change is
/// used: a pass reads everything afresh, so the watch cannot make a decision stale.
fn pod_events(
    pods: Api<Pod>,
    job: &str,
) -> Pin<Box<dyn Stream<Item = std::result::Result<(), watcher::Error>> + Send>> {
    let config = watcher::Config::default().labels(&format!("{LABEL_JOB}={job}"));
    Box::pin(watcher::watcher(pods, config).default_backoff().map(|event| event.map(|_| ())))
}

/// A watch error in the words of [`describe`](super::describe).
fn describe_watch(e: &watcher::Error) -> String {
    match e {
        watcher::Error::InitialListFailed(k)
        | watcher::Error::WatchStartFailed(k)
        | watcher::Error::WatchFailed(k) => super::describe(k),
        other => other.to_string(),
    }
}

/// How [`Controller::run`] ended.
#[derive(Debug, Clone)]
pub enum RunOutcome {
    /// The job is over (Succeeded or Failed) and nothing of it runs any more, or it was
    /// stopped on cancel.
    Finished(JobSummary),
    /// Cancelled without stopping the job.
    Detached,
}
