//! From a job to Kubernetes objects: a pure function, no cluster needed.
//!
//! A [`Renderer`] holds a job (already read with [`load_job`](super::config::load_job), so
//! its paths are paths inside the pods), the namespace, and, once the job's root ConfigMap
//! exists, the owner reference every other object gets. The same renderer produces what
//! `launch --dry-run` prints and what the controller creates, so the two cannot differ.
//!
//! Names: the root ConfigMap and the headless Service are named after the job; a pod is
//! `<job>-<role>-<index>-<attempt>` with hostname `<job>-<role>-<index>` and subdomain
//! `<job>`, so shard `i` is always reachable at `<job>-ps-<i>.<job>.<namespace>.svc`, before
//! it is ready (`publishNotReadyAddresses`) and after it is recreated.
//!
//! The job's token lives in the Secret `<job>-token`, which the server and worker containers
//! read `GRADFLOW_TOKEN` from. The renderer only sees the token when `launch` hands it to
//! [`Renderer::token_secret`]; what [`Renderer::manifests`] returns (and `--dry-run` prints)
//! has the Secret without its data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gradflow_job::contract::{CLUSTER_SPEC_VERSION, ENV_TOKEN, Token};
use gradflow_job::{ClusterSpec, JobConfig, Role};
use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::{
    Job as BatchJob, JobSpec, PodFailurePolicy, PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    LocalObjectReference, Pod, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, Secret,
    SecretKeySelector, SecurityContext, Service, ServicePort, ServiceSpec, TCPSocketAction,
    TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

use super::config::{EnvValue, KubernetesConfig, PodSettings, SCRATCH_VOLUME, ServerSpread, check_name};
use super::gang::{
    ANNOTATION_KUEUE_GROUP_TOTAL_COUNT, ANNOTATION_VOLCANO_GROUP, Gang, LABEL_KUEUE_GROUP, PodGroup,
    PodGroupSpec, VOLCANO_SCHEDULER, group_name, sum_requests,
};
use super::status::JobStatus;
use super::{
    ANNOTATION_TOKEN, ANNOTATION_VOLCANO_QUEUE, ENV_RESTORE, KubernetesError, LABEL_ATTEMPT,
    LABEL_CONTROLLER_OF, LABEL_INDEX, LABEL_JOB, LABEL_KUEUE_QUEUE, LABEL_ROLE, RECORD_JOB_KEY,
    RECORD_STATUS_KEY, TOKEN_SECRET_KEY,
};
use crate::local::ENV_LOG;

/// Everything a job needs to be turned into objects.
#[derive(Debug, Clone)]
pub struct Renderer {
    job: JobConfig,
    kube: KubernetesConfig,
    namespace: String,
    owner: Option<OwnerReference>,
}

/// One rendered object, as `launch --dry-run` prints it. (`Job` is a Kubernetes batch Job:
/// a detached job's controller.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Manifest {
    ConfigMap(Box<ConfigMap>),
    Secret(Box<Secret>),
    Service(Box<Service>),
    Pod(Box<Pod>),
    Job(Box<BatchJob>),
    /// Volcano's PodGroup (`gang = "volcano"`), a custom resource.
    PodGroup(Box<PodGroup>),
}

impl Manifest {
    /// `ConfigMap`, `Secret`, `Service`, `Pod`, `Job` or `PodGroup`.
    pub fn kind(&self) -> &'static str {
        match self {
            Manifest::ConfigMap(_) => "ConfigMap",
            Manifest::Secret(_) => "Secret",
            Manifest::Service(_) => "Service",
            Manifest::Pod(_) => "Pod",
            Manifest::Job(_) => "Job",
            Manifest::PodGroup(_) => "PodGroup",
        }
    }

    /// Whether the object's kind is a custom resource (not built into Kubernetes), which a
    /// schema validator without its CRD cannot check.
    pub fn is_custom_resource(&self) -> bool {
        matches!(self, Manifest::PodGroup(_))
    }

    /// The object's name.
    pub fn name(&self) -> &str {
        let meta = match self {
            Manifest::ConfigMap(o) => &o.metadata,
            Manifest::Secret(o) => &o.metadata,
            Manifest::Service(o) => &o.metadata,
            Manifest::Pod(o) => &o.metadata,
            Manifest::Job(o) => &o.metadata,
            Manifest::PodGroup(o) => &o.metadata,
        };
        meta.name.as_deref().unwrap_or_default()
    }
}

/// Name of the pod of one attempt of one process.
pub fn pod_name(job: &str, role: Role, index: u32, attempt: u32) -> String {
    format!("{job}-{}-{index}-{attempt}", role.as_str())
}

/// Hostname of every pod of one process: with the job's Service as subdomain, its stable DNS
/// name.
pub fn hostname(job: &str, role: Role, index: u32) -> String {
    format!("{job}-{}-{index}", role.as_str())
}

/// Name of the Secret that holds the job's token (key [`TOKEN_SECRET_KEY`]).
pub fn token_secret_name(job: &str) -> String {
    format!("{job}-token")
}

/// Name of the Secret that holds the literal values of the job's `kubernetes.env` (see
/// [`Renderer::env_secret`]).
pub fn env_secret_name(job: &str) -> String {
    format!("{job}-env")
}

/// Calls `f` with every `env` entry of a `[kubernetes]` section (`env`, `ps.env`,
/// `worker.env`), and its key in the job's env Secret (`env.NAME`, `ps.env.NAME`, ...).
fn for_each_env(
    section: &mut serde_json::Map<String, serde_json::Value>,
    mut f: impl FnMut(&str, &mut serde_json::Value),
) {
    let mut visit = |scope: &str, table: Option<&mut serde_json::Value>| {
        if let Some(serde_json::Value::Object(env)) = table {
            for (name, value) in env.iter_mut() {
                f(&format!("{scope}.{name}"), value);
            }
        }
    };
    visit("env", section.get_mut("env"));
    for role in ["ps", "worker"] {
        let table = section.get_mut(role).and_then(|r| r.get_mut("env"));
        visit(&format!("{role}.env"), table);
    }
}

/// Checkpoints that a server restores from must be where every pod finds them, whichever
/// node it runs on: with a `[checkpoint]` section the controller recreates the servers from the
/// latest checkpoint when one is lost, and `restore` reads one at the start. An object store
/// URL is shared; a path is shared only under a volume of the server pods that is mounted
/// writable from a PersistentVolumeClaim or NFS. Anything else (the container's own
/// filesystem, an emptyDir, a hostPath, `memory://`) is refused, naming the fix.
fn check_shared_storage(job: &JobConfig, kube: &KubernetesConfig) -> Result<(), KubernetesError> {
    use gradflow_core::settings::Restore;
    let settings = kube.for_role(Role::Ps);
    let check = |key: &'static str, location: &str| -> Result<(), KubernetesError> {
        let path = match location.split_once("://") {
            None => location.to_string(),
            Some(("file", rest)) => rest.to_string(),
            Some(("memory", _)) => {
                return Err(KubernetesError::PodLocalStorage {
                    key,
                    location: location.into(),
                    why: "memory:// lives in one process".into(),
                    mount: "/workspace/checkpoints".into(),
                });
            }
            Some(_) => return Ok(()),
        };
        let path = super::config::normalize(Path::new(&path));
        let refuse = |why: String| {
            let mount = path.parent().filter(|p| p != &Path::new("/")).unwrap_or(&path);
            KubernetesError::PodLocalStorage {
                key,
                location: path.to_string_lossy().into_owned(),
                why,
                mount: mount.to_string_lossy().into_owned(),
            }
        };
        // The deepest mount that holds the path decides.
        let mount = settings
            .volume_mounts
            .iter()
            .filter(|m| path.starts_with(super::config::normalize(Path::new(&m.mount_path))))
            .max_by_key(|m| m.mount_path.len());
        let Some(mount) = mount else { return Err(refuse("the server pod's own filesystem".into())) };
        let volume = settings.volumes.iter().find(|v| v.name == mount.name);
        let shared = volume.is_some_and(|v| v.persistent_volume_claim.is_some() || v.nfs.is_some());
        if !shared {
            return Err(refuse(format!(
                "volume {:?} is neither a persistentVolumeClaim nor nfs, so it goes with the pod",
                mount.name
            )));
        }
        if mount.read_only == Some(true) && key == "checkpoint.url" {
            return Err(refuse(format!(
                "volume {:?} is mounted readOnly, and servers write there",
                mount.name
            )));
        }
        Ok(())
    };
    if let Some(c) = &job.checkpoint {
        check("checkpoint.url", &c.url)?;
    }
    if let Some(Restore::Url(url)) = &job.restore {
        check("restore", url)?;
    }
    Ok(())
}

/// The job as `launch` had it, from its record ([`Renderer::recorded_job`]) and the data of
/// its `<job>-env` Secret: every reference to a key of that Secret becomes the literal value
/// again. A key the data lacks is an error that names it.
pub fn restore_env(job: &mut JobConfig, data: &BTreeMap<String, ByteString>) -> Result<(), KubernetesError> {
    let secret = env_secret_name(&job.name);
    let Some(section) = &job.kubernetes else { return Ok(()) };
    let mut map = section.as_map().clone();
    let mut missing = None;
    for_each_env(&mut map, |key, value| {
        let ours = value.get("secret").and_then(|s| s.as_str()) == Some(secret.as_str())
            && value.get("key").and_then(|k| k.as_str()) == Some(key);
        if !ours {
            return;
        }
        match data.get(key).map(|b| String::from_utf8_lossy(&b.0).into_owned()) {
            Some(v) => *value = serde_json::Value::String(v),
            None => missing = Some(key.to_string()),
        }
    });
    if let Some(key) = missing {
        return Err(KubernetesError::Record {
            job: job.name.clone(),
            message: format!("Secret {secret} has no key {key}, which kubernetes.env refers to"),
        });
    }
    job.kubernetes = Some(map.into());
    Ok(())
}

/// Whether the job's record refers to its `<job>-env` Secret (it set literal env values).
pub fn uses_env_secret(job: &JobConfig) -> bool {
    let secret = env_secret_name(&job.name);
    let Some(section) = &job.kubernetes else { return false };
    let mut map = section.as_map().clone();
    let mut found = false;
    for_each_env(&mut map, |_, value| {
        found |= value.get("secret").and_then(|s| s.as_str()) == Some(secret.as_str());
    });
    found
}

/// Name of a detached job's controller (a Kubernetes Job; its pods get generated names).
pub fn controller_name(job: &str) -> String {
    format!("{job}-controller")
}

impl Renderer {
    /// A renderer for `job` in `namespace`. Fails when the job cannot run on Kubernetes (its
    /// `[kubernetes]` section is invalid, or its name cannot name a Service).
    pub fn new(job: JobConfig, namespace: impl Into<String>) -> Result<Renderer, KubernetesError> {
        let config = |e: gradflow_job::JobError| KubernetesError::Config(e.to_string());
        let kube = KubernetesConfig::of(&job).map_err(config)?;
        kube.validate().map_err(config)?;
        check_name(&job.name).map_err(config)?;
        check_shared_storage(&job, &kube)?;
        Ok(Renderer { job, kube, namespace: namespace.into(), owner: None })
    }

    /// Makes `root` (the job's ConfigMap, as the API server returned it) the controller owner
    /// of every object rendered from now on, so that deleting it deletes them.
    pub fn with_owner(mut self, root: &ConfigMap) -> Result<Renderer, KubernetesError> {
        let uid = root.metadata.uid.clone().ok_or_else(|| KubernetesError::Record {
            job: self.job.name.clone(),
            message: "the ConfigMap has no uid (was it returned by the API server?)".into(),
        })?;
        self.owner = Some(OwnerReference {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            name: self.job.name.clone(),
            uid,
            controller: Some(true),
            block_owner_deletion: Some(true),
        });
        Ok(self)
    }

    pub fn job(&self) -> &JobConfig {
        &self.job
    }

    /// The job's `[kubernetes]` settings (defaults when it has none).
    pub fn settings(&self) -> &KubernetesConfig {
        &self.kube
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The uid of the root ConfigMap, once [`with_owner`](Self::with_owner) was called.
    pub fn owner_uid(&self) -> Option<&str> {
        self.owner.as_ref().map(|o| o.uid.as_str())
    }

    /// Server addresses in shard order: stable DNS names through the headless Service.
    pub fn server_addresses(&self) -> Vec<String> {
        (0..self.job.servers)
            .map(|i| {
                format!(
                    "{}.{}.{}.svc:{}",
                    hostname(&self.job.name, Role::Ps, i),
                    self.job.name,
                    self.namespace,
                    self.kube.port
                )
            })
            .collect()
    }

    /// Whether a process of `role` serves `/metrics` on `kubernetes.metrics_port`: servers,
    /// and workers that run the built-in trainer (a job's own trainer may serve none).
    fn serves_metrics(&self, role: Role) -> bool {
        self.job.output.metrics && (role == Role::Ps || self.job.worker.command.is_none())
    }

    /// What the pod of one attempt of one process is told: the same contract as a local
    /// process, with addresses that work in the cluster.
    pub fn cluster_spec(&self, role: Role, index: u32, attempt: u32) -> ClusterSpec {
        let is_ps = role == Role::Ps;
        ClusterSpec {
            version: CLUSTER_SPEC_VERSION,
            job: self.job.name.clone(),
            attempt,
            role,
            index,
            servers: self.server_addresses(),
            num_workers: self.job.workers,
            listen: is_ps.then(|| format!("0.0.0.0:{}", self.kube.port)),
            metrics_listen: self.serves_metrics(role).then(|| format!("0.0.0.0:{}", self.kube.metrics_port)),
            job_config: self.pod_job_config(),
        }
    }

    /// The job file as the pods see it: the tensor link on `kubernetes.link_port` unless the
    /// job file names a port, and `kubernetes.env` without its values (see
    /// [`recorded_job`](Self::recorded_job)).
    fn pod_job_config(&self) -> JobConfig {
        let mut job = self.recorded_job();
        if job.server.link_port == 0 {
            job.server.link_port = self.kube.link_port;
        }
        job
    }

    /// The job as the record (the root ConfigMap) and the cluster spec carry it: each literal
    /// value of `kubernetes.env` (and of `ps.env`, `worker.env`) is replaced by a reference to
    /// its key in the job's Secret `<job>-env` ([`env_secret`](Self::env_secret)), so that a
    /// value set in the job file appears in the pods' env and in that Secret only. References
    /// to other Secrets stay as written: they hold no value.
    pub fn recorded_job(&self) -> JobConfig {
        let mut job = self.job.clone();
        let secret = env_secret_name(&job.name);
        if let Some(section) = &job.kubernetes {
            let mut map = section.as_map().clone();
            for_each_env(&mut map, |key, value| {
                if value.is_string() {
                    *value = serde_json::json!({ "secret": secret, "key": key });
                }
            });
            job.kubernetes = Some(map.into());
        }
        job
    }

    /// The Secret `<job>-env` with the literal values of `kubernetes.env` (keys `env.NAME`,
    /// `ps.env.NAME`, `worker.env.NAME`), which `launch` creates next to the token's and
    /// `attach` reads to render the same pods as `launch` ([`restore_env`]). `None` when the
    /// job sets no literal value. Never part of [`manifests`](Self::manifests): the pods take
    /// their values from their own spec.
    pub fn env_secret(&self) -> Option<Secret> {
        let mut data = BTreeMap::new();
        if let Some(section) = &self.job.kubernetes {
            let mut map = section.as_map().clone();
            for_each_env(&mut map, |key, value| {
                if let Some(v) = value.as_str() {
                    data.insert(key.to_string(), ByteString(v.as_bytes().to_vec()));
                }
            });
        }
        if data.is_empty() {
            return None;
        }
        Some(Secret {
            metadata: self.meta(env_secret_name(&self.job.name), self.labels("job")),
            type_: Some("Opaque".into()),
            immutable: Some(true),
            data: Some(data),
            ..Secret::default()
        })
    }

    /// The servers' tensor-link port, if they offer the link (not with TLS).
    fn link_port(&self) -> Option<u16> {
        let job = self.pod_job_config();
        (job.transport.tensor_link && job.tls.is_none()).then_some(job.server.link_port)
    }

    /// The servers' spread over nodes (`kubernetes.server_spread`): at most one more server
    /// of this job on any node than on another, so that losing a node loses as few shards
    /// as possible. Pods of every attempt count (the selector leaves the attempt out).
    fn server_spread(&self) -> Option<Vec<TopologySpreadConstraint>> {
        let when = match self.kube.server_spread {
            ServerSpread::None => return None,
            ServerSpread::Prefer => "ScheduleAnyway",
            ServerSpread::Require => "DoNotSchedule",
        };
        Some(vec![TopologySpreadConstraint {
            max_skew: 1,
            topology_key: HOSTNAME_TOPOLOGY.into(),
            when_unsatisfiable: when.into(),
            label_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([
                    (LABEL_JOB.to_string(), self.job.name.clone()),
                    (LABEL_ROLE.to_string(), Role::Ps.as_str().to_string()),
                ])),
                match_expressions: None,
            }),
            ..TopologySpreadConstraint::default()
        }])
    }

    /// Labels every object of the job carries.
    fn labels(&self, component: &str) -> BTreeMap<String, String> {
        let mut labels = self.kube.labels.clone();
        for (k, v) in [
            ("app.kubernetes.io/name", "gradflow"),
            ("app.kubernetes.io/instance", self.job.name.as_str()),
            ("app.kubernetes.io/component", component),
            ("app.kubernetes.io/managed-by", "gradflow"),
            (LABEL_JOB, self.job.name.as_str()),
        ] {
            labels.insert(k.into(), v.into());
        }
        labels
    }

    fn meta(&self, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels),
            owner_references: self.owner.clone().map(|o| vec![o]),
            ..ObjectMeta::default()
        }
    }

    /// The root object: the job record, which owns everything else.
    pub fn root(&self, status: &JobStatus) -> ConfigMap {
        let mut meta = self.meta(self.job.name.clone(), self.labels("job"));
        meta.owner_references = None;
        ConfigMap {
            metadata: meta,
            data: Some(BTreeMap::from([
                (
                    RECORD_JOB_KEY.to_string(),
                    serde_json::to_string_pretty(&self.recorded_job())
                        .expect("a JobConfig always serializes"),
                ),
                (RECORD_STATUS_KEY.to_string(), status.to_json()),
            ])),
            ..ConfigMap::default()
        }
    }

    /// The Secret that holds the job's token, which the server and worker pods read
    /// `GRADFLOW_TOKEN` from. With `None` (what `--dry-run` prints) it has no data, and an
    /// annotation says how to create the real one when the manifests are applied by hand;
    /// `launch` creates it with the token, immutable (a new token is a new job).
    pub fn token_secret(&self, token: Option<&Token>) -> Secret {
        let name = token_secret_name(&self.job.name);
        let mut meta = self.meta(name.clone(), self.labels("job"));
        let data = match token {
            Some(token) => Some(BTreeMap::from([(
                TOKEN_SECRET_KEY.to_string(),
                ByteString(token.expose().as_bytes().to_vec()),
            )])),
            None => {
                meta.annotations = Some(BTreeMap::from([(
                    ANNOTATION_TOKEN.to_string(),
                    format!(
                        "the token is not rendered: `gradflow launch` creates this Secret with the job's token. \
                         To apply these manifests by hand, create it first: kubectl create secret generic {name} \
                         -n {} --from-literal={TOKEN_SECRET_KEY}=$(openssl rand -hex 32)",
                        self.namespace
                    ),
                )]));
                None
            }
        };
        Secret {
            metadata: meta,
            type_: Some("Opaque".into()),
            immutable: token.is_some().then_some(true),
            data,
            ..Secret::default()
        }
    }

    /// The headless Service that gives every pod of the job its DNS name.
    pub fn service(&self) -> Service {
        let mut ports = vec![ServicePort {
            name: Some("grpc".into()),
            port: self.kube.port.into(),
            target_port: Some(IntOrString::Int(self.kube.port.into())),
            protocol: Some("TCP".into()),
            ..ServicePort::default()
        }];
        if self.job.output.metrics {
            ports.push(ServicePort {
                name: Some("metrics".into()),
                port: self.kube.metrics_port.into(),
                target_port: Some(IntOrString::Int(self.kube.metrics_port.into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            });
        }
        if let Some(link_port) = self.link_port() {
            ports.push(ServicePort {
                name: Some("link".into()),
                port: link_port.into(),
                target_port: Some(IntOrString::Int(link_port.into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            });
        }
        Service {
            metadata: self.meta(self.job.name.clone(), self.labels("job")),
            spec: Some(ServiceSpec {
                cluster_ip: Some("None".into()),
                publish_not_ready_addresses: Some(true),
                selector: Some(BTreeMap::from([(LABEL_JOB.to_string(), self.job.name.clone())])),
                ports: Some(ports),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    /// The pod of attempt `attempt` of server shard or worker `index`.
    pub fn pod(&self, role: Role, index: u32, attempt: u32) -> Pod {
        let job = &self.job;
        let settings = self.kube.for_role(role);
        let mut labels = self.labels(role.as_str());
        labels.insert(LABEL_ROLE.into(), role.as_str().into());
        labels.insert(LABEL_INDEX.into(), index.to_string());
        labels.insert(LABEL_ATTEMPT.into(), attempt.to_string());
        let mut annotations = self.kube.annotations.clone();
        let group = group_name(&job.name);
        match (self.kube.gang, &self.kube.queue) {
            (Gang::None, Some(queue)) => {
                labels.insert(LABEL_KUEUE_QUEUE.into(), queue.clone());
                annotations.insert(ANNOTATION_VOLCANO_QUEUE.into(), queue.clone());
            }
            (Gang::None, None) => {}
            // The PodGroup holds the queue.
            (Gang::Volcano, _) => {
                annotations.insert(ANNOTATION_VOLCANO_GROUP.into(), group);
            }
            // Every attempt carries the same group metadata: Kueue takes a recreated pod for
            // the replacement of the one that failed.
            (Gang::Kueue, queue) => {
                let queue = queue.clone().expect("gang = \"kueue\" without a queue is refused by validate");
                labels.insert(LABEL_KUEUE_QUEUE.into(), queue);
                labels.insert(LABEL_KUEUE_GROUP.into(), group);
                annotations.insert(ANNOTATION_KUEUE_GROUP_TOTAL_COUNT.into(), self.group_size().to_string());
            }
        }
        if self.serves_metrics(role) {
            annotations.insert("prometheus.io/scrape".into(), "true".into());
            annotations.insert("prometheus.io/port".into(), self.kube.metrics_port.to_string());
        }
        let mut meta = self.meta(pod_name(&job.name, role, index, attempt), labels);
        meta.annotations = (!annotations.is_empty()).then_some(annotations);

        let mut env: Vec<EnvVar> = self
            .cluster_spec(role, index, attempt)
            .to_env()
            .into_iter()
            .map(|(k, v)| env_var(k, v))
            .collect();
        env.push(env_var(ENV_LOG, &job.output.log));
        if role == Role::Ps && attempt > 0 {
            env.push(env_var(ENV_RESTORE, "latest"));
        }
        // Only the main container talks to the servers; `prepare` (below) gets no token.
        let mut main_env = env.clone();
        if job.auth.enabled {
            main_env.push(EnvVar {
                name: ENV_TOKEN.into(),
                value: None,
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: token_secret_name(&job.name),
                        key: TOKEN_SECRET_KEY.into(),
                        optional: None,
                    }),
                    ..EnvVarSource::default()
                }),
            });
        }
        let user_env: Vec<EnvVar> = settings
            .env
            .iter()
            .map(|(k, v)| match v {
                EnvValue::Value(v) => env_var(k, v),
                EnvValue::From(source) => {
                    EnvVar { name: k.clone(), value: None, value_from: Some(source.clone()) }
                }
            })
            .collect();
        main_env.extend(user_env.iter().cloned());
        env.extend(user_env);
        let env_from = (!settings.env_from.is_empty()).then(|| settings.env_from.clone());

        let (scratch_mounts, scratch_volume) = match role {
            Role::Worker => self.scratch(&settings),
            Role::Ps => (Vec::new(), None),
        };
        let mut mounts = scratch_mounts;
        mounts.extend(settings.volume_mounts.iter().cloned());
        let mut volumes: Vec<Volume> = scratch_volume.into_iter().collect();
        volumes.extend(settings.volumes.iter().cloned());

        // A job that runs its own trainer runs it in the worker pods too, unless
        // `[kubernetes.worker] command` says how the image runs it.
        let (settings, args) = match (&job.worker.command, role) {
            (Some(command), Role::Worker) if settings.command.is_none() => {
                (PodSettings { command: Some(command.clone()), ..settings }, Vec::new())
            }
            (Some(_), Role::Worker) => (settings, Vec::new()),
            _ => (settings, vec![role.as_str().to_string()]),
        };
        let mut main = self.container(role.as_str(), &settings, args);
        main.env = Some(main_env);
        main.env_from = env_from.clone();
        main.volume_mounts = (!mounts.is_empty()).then(|| mounts.clone());
        main.resources = resources(&settings);
        if role == Role::Ps {
            let mut ports = vec![container_port("grpc", self.kube.port)];
            if job.output.metrics {
                ports.push(container_port("metrics", self.kube.metrics_port));
            }
            if let Some(link_port) = self.link_port() {
                ports.push(container_port("link", link_port));
            }
            main.ports = Some(ports);
            // Ready = accepting connections: workers are started only when every shard is.
            main.readiness_probe = Some(Probe {
                tcp_socket: Some(TCPSocketAction { port: IntOrString::String("grpc".into()), host: None }),
                period_seconds: Some(2),
                ..Probe::default()
            });
        } else if self.serves_metrics(role) {
            main.ports = Some(vec![container_port("metrics", self.kube.metrics_port)]);
        }
        // Synthetic data is generated in each worker pod before the worker starts: the
        // generator is deterministic, so every worker sees the same files.
        let init = (role == Role::Worker && job.data.synth.is_some()).then(|| {
            let mut prepare = self.container("prepare", &settings, vec!["prepare".into()]);
            prepare.env = Some(env);
            prepare.env_from = env_from;
            prepare.volume_mounts = main.volume_mounts.clone();
            // CPU and memory like the worker (so the pod asks for no more), but no GPU.
            prepare.resources = resources(&PodSettings { gpu: None, ..settings.clone() });
            vec![prepare]
        });

        let mut spec = self.pod_spec();
        spec.hostname = Some(hostname(&job.name, role, index));
        spec.subdomain = Some(job.name.clone());
        // Restarts are recreations, decided and counted by the controller.
        spec.restart_policy = Some("Never".into());
        // Training pods never talk to the API server.
        spec.automount_service_account_token = Some(false);
        spec.service_account_name = self.kube.service_account.clone();
        spec.priority_class_name = self.kube.priority_class.clone();
        spec.scheduler_name = match self.kube.gang {
            Gang::Volcano => Some(VOLCANO_SCHEDULER.into()),
            _ => self.kube.scheduler_name.clone(),
        };
        spec.node_selector = (!settings.node_selector.is_empty()).then(|| settings.node_selector.clone());
        spec.tolerations = (!settings.tolerations.is_empty()).then(|| settings.tolerations.clone());
        spec.active_deadline_seconds = self.kube.active_deadline.map(|d| d.as_secs() as i64);
        if role == Role::Ps {
            spec.topology_spread_constraints = self.server_spread();
        }
        spec.volumes = (!volumes.is_empty()).then_some(volumes);
        spec.init_containers = init;
        spec.containers = vec![main];
        Pod { metadata: meta, spec: Some(spec), status: None }
    }

    /// How many pods a gang of this job has: every server and every worker.
    pub fn group_size(&self) -> u32 {
        self.job.servers + self.job.workers
    }

    /// Volcano's PodGroup of the job (`gang = "volcano"`; `None` otherwise), which `launch`
    /// creates before any pod: named after the job, `minMember` = servers + workers, the
    /// job's `queue` and `priority_class`, and as `minResources` the sum of every pod's
    /// requests, a limit without a request counting as one (a pod's init container asks for
    /// no more than its main container).
    pub fn pod_group(&self) -> Option<PodGroup> {
        if self.kube.gang != Gang::Volcano {
            return None;
        }
        let requests: Vec<(u32, BTreeMap<String, Quantity>)> =
            [(Role::Ps, self.job.servers), (Role::Worker, self.job.workers)]
                .into_iter()
                .filter_map(|(role, count)| {
                    let r = resources(&self.kube.for_role(role))?;
                    // A limit without a request is the request too: Kubernetes sets it so.
                    let mut requests = r.limits.unwrap_or_default();
                    requests.extend(r.requests.unwrap_or_default());
                    (!requests.is_empty()).then_some((count, requests))
                })
                .collect();
        let min_resources = sum_requests(requests.iter().map(|(count, r)| (*count, r)));
        let spec = PodGroupSpec {
            min_member: self.group_size() as i32,
            queue: self.kube.queue.clone(),
            priority_class_name: self.kube.priority_class.clone(),
            min_resources: (!min_resources.is_empty()).then_some(min_resources),
        };
        Some(PodGroup::new(self.meta(group_name(&self.job.name), self.labels("job")), spec))
    }

    /// The Kubernetes Job that runs a detached job's controller (`gradflow attach`) in the
    /// cluster. A Job rather than a bare pod: if the node goes away or the pod is evicted, the
    /// Job controller starts a new one (evictions are not counted, crashes are, up to 6), and
    /// the new one resumes from the record.
    pub fn controller_job(&self) -> BatchJob {
        let job = &self.job;
        let mut labels = self.labels("controller");
        labels.remove(LABEL_JOB);
        labels.insert(LABEL_CONTROLLER_OF.into(), job.name.clone());
        let settings = PodSettings {
            image: Some(self.kube.image.clone()),
            command: self.kube.command.clone(),
            ..PodSettings::default()
        };
        let mut main = self.container(
            "controller",
            &settings,
            vec!["attach".into(), job.name.clone(), "--namespace".into(), self.namespace.clone()],
        );
        main.env = Some(vec![env_var(ENV_LOG, "info")]);
        main.resources = Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("50m".into())),
                ("memory".to_string(), Quantity("64Mi".into())),
            ])),
            limits: Some(BTreeMap::from([("memory".to_string(), Quantity("128Mi".into()))])),
            ..ResourceRequirements::default()
        });
        let mut spec = self.pod_spec();
        // Required by a pod failure policy; a crashed controller gets a new pod from the Job.
        spec.restart_policy = Some("Never".into());
        spec.service_account_name = Some(self.kube.controller_service_account.clone());
        spec.priority_class_name = self.kube.priority_class.clone();
        spec.containers = vec![main];
        BatchJob {
            metadata: self.meta(controller_name(&job.name), labels.clone()),
            spec: Some(JobSpec {
                backoff_limit: Some(6),
                pod_failure_policy: Some(PodFailurePolicy {
                    rules: vec![PodFailurePolicyRule {
                        action: "Ignore".into(),
                        on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                            type_: "DisruptionTarget".into(),
                            status: "True".into(),
                        }]),
                        on_exit_codes: None,
                    }],
                }),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta { labels: Some(labels), ..ObjectMeta::default() }),
                    spec: Some(spec),
                },
                ..JobSpec::default()
            }),
            status: None,
        }
    }

    /// Every object `launch` creates at the start, in creation order: the root ConfigMap, the
    /// token's Secret (with `auth.enabled`; without the token, see
    /// [`token_secret`](Self::token_secret)), the Service, Volcano's PodGroup (with
    /// `gang = "volcano"`), the server pods, the worker pods (which the controller creates
    /// only once the servers are ready, or with them in a gang), and with `detach` the
    /// controller's Kubernetes Job.
    pub fn manifests(&self, detach: bool) -> Vec<Manifest> {
        let job = &self.job;
        let mut out = vec![Manifest::ConfigMap(Box::new(self.root(&JobStatus::new(job))))];
        if job.auth.enabled {
            out.push(Manifest::Secret(Box::new(self.token_secret(None))));
        }
        out.push(Manifest::Service(Box::new(self.service())));
        out.extend(self.pod_group().map(|g| Manifest::PodGroup(Box::new(g))));
        for i in 0..job.servers {
            out.push(Manifest::Pod(Box::new(self.pod(Role::Ps, i, 0))));
        }
        for i in 0..job.workers {
            out.push(Manifest::Pod(Box::new(self.pod(Role::Worker, i, 0))));
        }
        if detach {
            out.push(Manifest::Job(Box::new(self.controller_job())));
        }
        out
    }

    fn container(&self, name: &str, settings: &PodSettings, args: Vec<String>) -> Container {
        Container {
            name: name.into(),
            image: Some(settings.image.clone().unwrap_or_else(|| self.kube.image.clone())),
            image_pull_policy: Some(self.kube.image_pull_policy.clone()),
            command: Some(settings.command.clone().unwrap_or_else(|| vec!["gradflow".into()])),
            args: Some(args),
            working_dir: Some(self.kube.workdir.to_string_lossy().into_owned()),
            // The restricted Pod Security Standard: the image runs as a non-root user.
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
                run_as_non_root: Some(true),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    localhost_profile: None,
                }),
                ..SecurityContext::default()
            }),
            ..Container::default()
        }
    }

    fn pod_spec(&self) -> PodSpec {
        PodSpec {
            termination_grace_period_seconds: Some(self.job.launcher.grace_period.as_secs().max(1) as i64),
            // Service links would add variables for every Service in the namespace.
            enable_service_links: Some(false),
            image_pull_secrets: (!self.kube.image_pull_secrets.is_empty()).then(|| {
                self.kube
                    .image_pull_secrets
                    .iter()
                    .map(|name| LocalObjectReference { name: name.clone() })
                    .collect()
            }),
            ..PodSpec::default()
        }
    }

    /// Writable directories a worker needs that no volume of the job file provides: the
    /// output directory and the synthetic data's directories, as sub-paths of one emptyDir.
    fn scratch(&self, settings: &PodSettings) -> (Vec<VolumeMount>, Option<Volume>) {
        let job = &self.job;
        let mut dirs: Vec<PathBuf> = vec![job.output_dir()];
        if job.data.synth.is_some() {
            for p in job.data.train.iter().chain(&job.data.test) {
                if let Some(parent) = p.parent() {
                    dirs.push(parent.to_path_buf());
                }
            }
        }
        let user_mounts: Vec<&Path> =
            settings.volume_mounts.iter().map(|m| Path::new(&m.mount_path)).collect();
        dirs.sort();
        dirs.dedup();
        let all = dirs.clone();
        dirs.retain(|d| {
            !user_mounts.iter().any(|m| d.starts_with(m)) && !all.iter().any(|o| o != d && d.starts_with(o))
        });
        if dirs.is_empty() {
            return (Vec::new(), None);
        }
        let mounts = dirs
            .iter()
            .enumerate()
            .map(|(i, d)| VolumeMount {
                name: SCRATCH_VOLUME.into(),
                mount_path: d.to_string_lossy().into_owned(),
                sub_path: Some(format!("dir-{i}")),
                ..VolumeMount::default()
            })
            .collect();
        let volume = Volume {
            name: SCRATCH_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        };
        (mounts, Some(volume))
    }
}

/// The extended resource of NVIDIA's device plugin.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// Node label a topology spread over nodes keys on.
const HOSTNAME_TOPOLOGY: &str = "kubernetes.io/hostname";

fn env_var(name: impl Into<String>, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), value_from: None }
}

fn container_port(name: &str, port: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port.into(),
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }
}

/// Requests CPU, memory and GPUs; limits memory (an over-committed node then kills the pod
/// that went over, not a neighbour), CPU where `cpu_limit` is set (servers: their request, so
/// that they are Guaranteed), and GPUs (an extended resource: request and limit are equal).
fn resources(s: &PodSettings) -> Option<ResourceRequirements> {
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    if let Some(cpu) = &s.cpu {
        requests.insert("cpu".to_string(), Quantity(cpu.clone()));
    }
    if let Some(cpu) = &s.cpu_limit {
        limits.insert("cpu".to_string(), Quantity(cpu.clone()));
    }
    if let Some(memory) = &s.memory {
        requests.insert("memory".to_string(), Quantity(memory.clone()));
        limits.insert("memory".to_string(), Quantity(memory.clone()));
    }
    if let Some(gpu) = s.gpu.filter(|&g| g > 0) {
        requests.insert(GPU_RESOURCE.to_string(), Quantity(gpu.to_string()));
        limits.insert(GPU_RESOURCE.to_string(), Quantity(gpu.to_string()));
    }
    if requests.is_empty() && limits.is_empty() {
        return None;
    }
    Some(ResourceRequirements {
        requests: (!requests.is_empty()).then_some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..ResourceRequirements::default()
    })
}

/// The manifests as a multi-document YAML stream, as `kubectl apply -f` reads it. A Secret
/// without data (the token's, as rendered) is preceded by a comment that says how to create it.
pub fn to_yaml(manifests: &[Manifest]) -> Result<String, KubernetesError> {
    let mut out = String::new();
    for m in manifests {
        out.push_str("---\n");
        if let Manifest::Secret(secret) = m
            && secret.data.is_none()
            && secret.string_data.is_none()
        {
            let name = m.name();
            let namespace = secret.metadata.namespace.as_deref().unwrap_or("default");
            out.push_str(&format!(
                "# The job's token is not in this file: `gradflow launch` creates Secret {name} itself,\n\
                 # owned by the job, with a fresh token (or the job's auth.token_file). To apply this file\n\
                 # by hand, create the Secret first, with a new token per job:\n\
                 #   kubectl create secret generic {name} -n {namespace} --from-literal={TOKEN_SECRET_KEY}=$(openssl rand -hex 32)\n"
            ));
        }
        out.push_str(&serde_yaml_ng::to_string(m).map_err(|e| KubernetesError::Serialize(e.to_string()))?);
    }
    Ok(out)
}

/// The manifests as one JSON `v1/List`, as `kubectl apply -f` reads it.
pub fn to_json(manifests: &[Manifest]) -> Result<String, KubernetesError> {
    let list = serde_json::json!({ "apiVersion": "v1", "kind": "List", "items": manifests });
    serde_json::to_string_pretty(&list)
        .map(|s| s + "\n")
        .map_err(|e| KubernetesError::Serialize(e.to_string()))
}

/// Parses what [`to_yaml`] wrote back into typed objects (by `kind`).
pub fn from_yaml(text: &str) -> Result<Vec<Manifest>, KubernetesError> {
    let err = |e: serde_yaml_ng::Error| KubernetesError::Serialize(e.to_string());
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let value = serde_yaml_ng::Value::deserialize(doc).map_err(err)?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_string();
        out.push(match kind.as_str() {
            "ConfigMap" => Manifest::ConfigMap(Box::new(serde_yaml_ng::from_value(value).map_err(err)?)),
            "Secret" => Manifest::Secret(Box::new(serde_yaml_ng::from_value(value).map_err(err)?)),
            "Service" => Manifest::Service(Box::new(serde_yaml_ng::from_value(value).map_err(err)?)),
            "Pod" => Manifest::Pod(Box::new(serde_yaml_ng::from_value(value).map_err(err)?)),
            "Job" => Manifest::Job(Box::new(serde_yaml_ng::from_value(value).map_err(err)?)),
            "PodGroup" => Manifest::PodGroup(Box::new(serde_yaml_ng::from_value(value).map_err(err)?)),
            other => return Err(KubernetesError::Serialize(format!("unexpected kind {other:?}"))),
        });
    }
    Ok(out)
}
