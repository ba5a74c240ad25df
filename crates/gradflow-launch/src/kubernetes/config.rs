//! The `[kubernetes]` section of a job file: everything the pods need that the local backend
//! does not (image, resources, scheduling, queue, volumes), with defaults that run the
//! example jobs on a kind or minikube cluster.
//!
//! Settings under `[kubernetes]` apply to every pod; `[kubernetes.ps]` and
//! `[kubernetes.worker]` override them for one role: single values replace, maps
//! (`node_selector`, `env`) merge key by key with the role winning, lists (`tolerations`,
//! `volumes`, `volume_mounts`) are concatenated.
//!
//! Under both sits one layer of defaults per role, [`PodSettings::defaults`]: server pods ask
//! for [`DEFAULT_PS_CPU`] and [`DEFAULT_PS_MEMORY`] with limits equal to their requests (the
//! Guaranteed QoS class: a lost server restarts the whole job), workers for nothing unless
//! told. GPUs are the workers' only.
//!
//! The job (gradflow-job) keeps the section as written, so that describing a job needs no
//! Kubernetes types; [`KubernetesConfig::of`] and [`KubernetesConfig::from_toml`] type it,
//! which is when an unknown key or a value of the wrong type is found.
//!
//! `tolerations`, `volumes` and `volume_mounts` are written as in a Kubernetes manifest
//! (camelCase keys), so examples from the Kubernetes documentation can be pasted; unknown keys
//! in them are still errors that name the key.
//!
//! # Paths
//!
//! A job file's relative paths are relative to the job file. In a pod the job file "lives" in
//! [`KubernetesConfig::workdir`] (default `/workspace`): `data/train.csv` becomes
//! `/workspace/data/train.csv` inside the pod. Data must get there through `volumes` (a
//! PersistentVolumeClaim, say) or the image; synthetic data (`[data.synth]`) is generated in
//! each worker pod by an init container. `auth.token_file` is the one path the launcher reads
//! on its own machine (relative to the job file there): the pods get the token from a Secret.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    ConfigMapEnvSource, ConfigMapKeySelector, EnvFromSource, EnvVarSource, SecretEnvSource,
    SecretKeySelector, Toleration, Volume, VolumeMount,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

use gradflow_job::{JobConfig, JobError, Role};

use crate::LaunchError;

/// The image `launch` uses when the job file names none: the one `deploy/Dockerfile` builds
/// and tags, for this version.
pub const DEFAULT_IMAGE: &str = concat!("gradflow:", env!("CARGO_PKG_VERSION"));

/// Port servers listen on for gRPC inside their pod.
pub const DEFAULT_PORT: u16 = 7070;
/// The servers' tensor-link port in the pods.
pub const DEFAULT_LINK_PORT: u16 = 7071;
/// Port of a server's Prometheus `/metrics` endpoint inside its pod.
pub const DEFAULT_METRICS_PORT: u16 = 9090;
/// The wait before a failed process's first new pod (`restart_backoff`); it doubles with each
/// further failure.
pub const DEFAULT_RESTART_BACKOFF: Duration = Duration::from_secs(10);
/// The longest wait between a failure and the next pod (`max_restart_backoff`).
pub const DEFAULT_MAX_RESTART_BACKOFF: Duration = Duration::from_secs(300);

/// CPU of a server pod (request and limit) when the job file names none.
pub const DEFAULT_PS_CPU: &str = "1";
/// Memory of a server pod (request and limit) when the job file names none. gradflow has no
/// estimate of a model's size before it runs (embedding tables grow with the data), so this is
/// a fixed default that holds the example jobs with room to spare; set `[kubernetes.ps] memory`
/// for a real model (its parameters and optimizer state, about 3x the parameters for Adam,
/// divided by `servers`, plus headroom).
pub const DEFAULT_PS_MEMORY: &str = "2Gi";

/// The `[kubernetes]` section of a job file. Every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Namespace of the job's objects. Default: `--namespace`, else the kubeconfig context's
    /// namespace (the service account's in a pod), else `default`.
    pub namespace: Option<String>,
    /// Container image with the `gradflow` binary. Default `gradflow:<version>`
    /// ([`DEFAULT_IMAGE`]), what `deploy/Dockerfile` builds.
    pub image: String,
    /// `Always`, `IfNotPresent` (default) or `Never`.
    pub image_pull_policy: String,
    /// Names of Secrets used to pull the image.
    pub image_pull_secrets: Vec<String>,
    /// Service account of the training pods. Default: the namespace's default. The pods get no
    /// API token either way: they never talk to the API server.
    pub service_account: Option<String>,
    /// PriorityClass of every pod.
    pub priority_class: Option<String>,
    /// Scheduler of every pod, e.g. `"volcano"`. Default: the cluster's default scheduler;
    /// `"volcano"` with `gang = "volcano"`, which refuses any other.
    pub scheduler_name: Option<String>,
    /// Queue for batch schedulers. With `gang = "none"`: the `kueue.x-k8s.io/queue-name`
    /// label (Kueue) and the `scheduling.volcano.sh/queue-name` annotation (Volcano) on every
    /// pod, each pod queued on its own. With `gang = "volcano"`: the PodGroup's `spec.queue`
    /// (Volcano's `default` queue without it). With `gang = "kueue"` (required): the Kueue
    /// LocalQueue of the job's pod group.
    pub queue: Option<String>,
    /// Gang scheduling: `"none"` (default), `"volcano"` (a Volcano PodGroup) or `"kueue"`
    /// (a Kueue plain-pod group). See [`Gang`].
    pub gang: Gang,
    /// The directory inside the pods that plays the job file's directory: relative paths of
    /// the job file are resolved against it. Default `/workspace`.
    pub workdir: PathBuf,
    /// Port servers listen on (gRPC). Default 7070.
    pub port: u16,
    /// Port of the servers' `/metrics` (when `output.metrics`). Default 9090.
    pub metrics_port: u16,
    /// Port of the servers' tensor link (when `transport.tensor_link`), unless the job file
    /// sets `server.link_port`. A fixed port, so that network policies can name it. Default
    /// 7071.
    pub link_port: u16,
    /// Exit codes of a worker that are worth a new pod (up to `launcher.max_restarts` per
    /// worker). Default `[1, 137, 143]`: an error (the servers were unreachable too long,
    /// say), SIGKILL (OOM killer), SIGTERM. Evictions and preemptions are always retried and
    /// never counted. Servers are recreated whatever their exit code.
    pub retryable_exit_codes: Vec<i32>,
    /// Service account of a detached job's controller pod (`launch --detach`); it needs the
    /// Role in `deploy/rbac.yaml`. Default `gradflow-launcher`.
    pub controller_service_account: String,
    /// Extra labels on every object of the job.
    pub labels: BTreeMap<String, String>,
    /// Extra annotations on every pod of the job.
    pub annotations: BTreeMap<String, String>,

    /// Program that runs `gradflow` in the image; the role (`ps`, `worker`) is its argument.
    /// Default `["gradflow"]`.
    pub command: Option<Vec<String>>,
    /// CPU request (e.g. `"2"` or `"500m"`). Servers default to [`DEFAULT_PS_CPU`].
    #[serde(deserialize_with = "quantity")]
    pub cpu: Option<String>,
    /// CPU limit. Servers default to their CPU request (requests equal to limits: the
    /// Guaranteed QoS class, last to be evicted); workers have none by default (throttling a
    /// worker only makes it slower). At least `cpu`.
    #[serde(deserialize_with = "quantity")]
    pub cpu_limit: Option<String>,
    /// Memory request and limit (e.g. `"4Gi"`). Servers default to [`DEFAULT_PS_MEMORY`].
    #[serde(deserialize_with = "quantity")]
    pub memory: Option<String>,
    /// `nvidia.com/gpu` request and limit of worker pods (servers use no GPU: under
    /// `[kubernetes]` it applies to workers only, under `[kubernetes.ps]` it is an error).
    pub gpu: Option<u32>,
    /// Node labels a pod's node must have.
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations, as in a pod spec.
    #[serde(deserialize_with = "strict_list")]
    pub tolerations: Vec<Toleration>,
    /// Extra environment variables (names starting with `GRADFLOW_` are reserved): a literal
    /// value, or a reference to a Secret's or ConfigMap's key ([`EnvValue`]). Literal values
    /// are set in the pods' env only: the job record and the cluster spec carry them as
    /// references to the job's `<job>-env` Secret.
    pub env: BTreeMap<String, EnvValue>,
    /// Whole Secrets or ConfigMaps as variables (`envFrom`): `{ secret = "name" }`,
    /// `{ config_map = "name", prefix = "P_" }`, or the Kubernetes shape
    /// (`{ secretRef = { name = "name" } }`). Variables of `env` win over these.
    #[serde(deserialize_with = "env_from_list")]
    pub env_from: Vec<EnvFromSource>,
    /// Extra volumes, as in a pod spec.
    #[serde(deserialize_with = "strict_list")]
    pub volumes: Vec<Volume>,
    /// Where the volumes are mounted in the gradflow container, as in a container spec.
    #[serde(deserialize_with = "strict_list")]
    pub volume_mounts: Vec<VolumeMount>,

    /// Longest time a server or worker pod may run (its `activeDeadlineSeconds`, counted from
    /// the pod's start), e.g. `"24h"`. A pod that runs out of it fails the job: a job that
    /// does not end in time does not get better by starting again. Default: none.
    #[serde(with = "humantime_serde")]
    pub active_deadline: Option<Duration>,
    /// How long a job that ended (Succeeded or Failed) stays, with its failed pods and their
    /// logs, before the controller that drove it to its end deletes it, e.g. `"1h"`; `"0s"`
    /// deletes it at once. A foreground `launch` waits that long before it returns (Ctrl-C
    /// keeps the job); with `--detach` the controller in the cluster waits. Default: none,
    /// the job stays until `gradflow delete`.
    #[serde(with = "humantime_serde")]
    pub ttl_after_finished: Option<Duration>,
    /// How long a failed process waits before its next pod: this, doubled with each further
    /// counted failure of the same process, up to [`max_restart_backoff`](Self::max_restart_backoff),
    /// counted from when the failed pod's container ended. Disruptions (evictions,
    /// preemptions) are replaced at once. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub restart_backoff: Duration,
    /// The longest wait between a failure and the next pod. Default 5 min.
    #[serde(with = "humantime_serde")]
    pub max_restart_backoff: Duration,

    /// How server pods are spread over nodes (a topology spread constraint on
    /// `kubernetes.io/hostname`): `"prefer"` (default), `"require"` or `"none"`.
    pub server_spread: ServerSpread,

    /// Overrides for server pods.
    pub ps: PodSettings,
    /// Overrides for worker pods.
    pub worker: PodSettings,
}

/// Per-role pod settings (`[kubernetes.ps]`, `[kubernetes.worker]`); see
/// [`KubernetesConfig`] for each field. After [`KubernetesConfig::for_role`], the merged
/// settings of one role.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PodSettings {
    pub image: Option<String>,
    pub command: Option<Vec<String>>,
    #[serde(deserialize_with = "quantity")]
    pub cpu: Option<String>,
    #[serde(deserialize_with = "quantity")]
    pub cpu_limit: Option<String>,
    #[serde(deserialize_with = "quantity")]
    pub memory: Option<String>,
    pub gpu: Option<u32>,
    pub node_selector: BTreeMap<String, String>,
    #[serde(deserialize_with = "strict_list")]
    pub tolerations: Vec<Toleration>,
    pub env: BTreeMap<String, EnvValue>,
    #[serde(deserialize_with = "env_from_list")]
    pub env_from: Vec<EnvFromSource>,
    #[serde(deserialize_with = "strict_list")]
    pub volumes: Vec<Volume>,
    #[serde(deserialize_with = "strict_list")]
    pub volume_mounts: Vec<VolumeMount>,
}

/// Gang scheduling (`kubernetes.gang`): whether the job's pods are admitted as one unit, so
/// that a job that does not fit waits whole instead of holding nodes half-started (Kubeflow
/// training-operator #1264: a PS job whose workers cannot be placed keeps its servers'
/// nodes while it waits).
///
/// With a gang, every pod of the job is created at once (workers do not wait for the servers
/// to be ready: the scheduler admits no pod until all of them exist), and the pods of a
/// restart from a checkpoint are, again, created together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Gang {
    /// Each pod is scheduled (and, with `queue`, queued) on its own.
    #[default]
    None,
    /// A `scheduling.volcano.sh/v1beta1` PodGroup named after the job, with `minMember` =
    /// servers + workers, in `queue`; every pod has `schedulerName: volcano` and the
    /// `scheduling.k8s.io/group-name` annotation.
    Volcano,
    /// Kueue's plain-pod group: every pod has the `kueue.x-k8s.io/queue-name` and
    /// `kueue.x-k8s.io/pod-group-name` labels and the `kueue.x-k8s.io/pod-group-total-count`
    /// annotation (servers + workers); Kueue admits the group as one Workload.
    Kueue,
}

impl Gang {
    pub fn as_str(self) -> &'static str {
        match self {
            Gang::None => "none",
            Gang::Volcano => "volcano",
            Gang::Kueue => "kueue",
        }
    }
}

/// Volcano's scheduler name, which `gang = "volcano"` sets and requires.
pub const VOLCANO_SCHEDULER: &str = "volcano";

/// Spreading of a job's server pods over nodes (`server_spread`), so that one node going away
/// takes as few shards as possible with it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerSpread {
    /// Spread if the scheduler can (`whenUnsatisfiable: ScheduleAnyway`): a cluster with
    /// fewer nodes than servers still runs the job.
    #[default]
    Prefer,
    /// At most one server more on any node than on another (`DoNotSchedule`): servers wait
    /// for a node rather than share one.
    Require,
    /// No constraint.
    None,
}

impl PodSettings {
    /// The defaults of one role's pods, below `[kubernetes]` and `[kubernetes.<role>]`:
    /// servers ask for [`DEFAULT_PS_CPU`] and [`DEFAULT_PS_MEMORY`] (their CPU limit follows
    /// their request, see [`KubernetesConfig::for_role`]), workers for nothing.
    pub fn defaults(role: Role) -> PodSettings {
        match role {
            Role::Ps => PodSettings {
                cpu: Some(DEFAULT_PS_CPU.into()),
                memory: Some(DEFAULT_PS_MEMORY.into()),
                ..PodSettings::default()
            },
            Role::Worker => PodSettings::default(),
        }
    }
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            namespace: None,
            image: DEFAULT_IMAGE.into(),
            image_pull_policy: "IfNotPresent".into(),
            image_pull_secrets: Vec::new(),
            service_account: None,
            priority_class: None,
            scheduler_name: None,
            queue: None,
            gang: Gang::None,
            workdir: PathBuf::from("/workspace"),
            port: DEFAULT_PORT,
            metrics_port: DEFAULT_METRICS_PORT,
            link_port: DEFAULT_LINK_PORT,
            retryable_exit_codes: vec![1, 137, 143],
            controller_service_account: "gradflow-launcher".into(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            command: None,
            cpu: None,
            cpu_limit: None,
            memory: None,
            gpu: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            env: BTreeMap::new(),
            env_from: Vec::new(),
            volumes: Vec::new(),
            volume_mounts: Vec::new(),
            server_spread: ServerSpread::Prefer,
            active_deadline: None,
            ttl_after_finished: None,
            restart_backoff: DEFAULT_RESTART_BACKOFF,
            max_restart_backoff: DEFAULT_MAX_RESTART_BACKOFF,
            ps: PodSettings::default(),
            worker: PodSettings::default(),
        }
    }
}

impl KubernetesConfig {
    /// The settings of one role's pods: the role's section over the common ones over the
    /// role's [defaults](PodSettings::defaults). A server's CPU limit defaults to its CPU
    /// request (Guaranteed QoS); the common `gpu` is for workers only.
    pub fn for_role(&self, role: Role) -> PodSettings {
        let over = match role {
            Role::Ps => &self.ps,
            Role::Worker => &self.worker,
        };
        fn merge<V: Clone>(a: &BTreeMap<String, V>, b: &BTreeMap<String, V>) -> BTreeMap<String, V> {
            let mut m = a.clone();
            m.extend(b.iter().map(|(k, v)| (k.clone(), v.clone())));
            m
        }
        let defaults = PodSettings::defaults(role);
        let cpu = over.cpu.clone().or_else(|| self.cpu.clone()).or(defaults.cpu);
        let cpu_limit = over.cpu_limit.clone().or_else(|| self.cpu_limit.clone()).or(defaults.cpu_limit);
        let cpu_limit = match role {
            Role::Ps => cpu_limit.or_else(|| cpu.clone()),
            Role::Worker => cpu_limit,
        };
        let gpu = match role {
            Role::Ps => over.gpu,
            Role::Worker => over.gpu.or(self.gpu),
        };
        PodSettings {
            image: over.image.clone().or_else(|| Some(self.image.clone())),
            command: over.command.clone().or_else(|| self.command.clone()),
            cpu,
            cpu_limit,
            memory: over.memory.clone().or_else(|| self.memory.clone()).or(defaults.memory),
            gpu,
            node_selector: merge(&self.node_selector, &over.node_selector),
            tolerations: [&self.tolerations[..], &over.tolerations].concat(),
            env: merge(&self.env, &over.env),
            env_from: [&self.env_from[..], &over.env_from].concat(),
            volumes: [&self.volumes[..], &over.volumes].concat(),
            volume_mounts: [&self.volume_mounts[..], &over.volume_mounts].concat(),
        }
    }

    /// The job's `[kubernetes]` section, typed; the defaults when the job has none. Unknown
    /// keys and values of the wrong type are errors; [`KubernetesConfig::validate`] checks the
    /// values.
    pub fn of(job: &JobConfig) -> Result<KubernetesConfig, JobError> {
        match &job.kubernetes {
            None => Ok(KubernetesConfig::default()),
            Some(section) => {
                serde_json::from_value(section.to_value()).map_err(|e| invalid("kubernetes", e.to_string()))
            }
        }
    }

    /// The `[kubernetes]` section of a job file's text, typed as by [`KubernetesConfig::of`],
    /// with errors that name the line; `None` when the file has none.
    pub fn from_toml(text: &str) -> Result<Option<KubernetesConfig>, JobError> {
        /// The job file with every other section skipped.
        #[derive(Deserialize)]
        struct Section {
            #[serde(default)]
            kubernetes: Option<KubernetesConfig>,
        }
        toml::from_str::<Section>(text).map(|s| s.kubernetes).map_err(JobError::Toml)
    }

    /// Checks values that parse but cannot work on a cluster; the error names the key
    /// (`kubernetes.worker.cpu: ...`).
    pub fn validate(&self) -> Result<(), JobError> {
        let key = |k: &str| format!("kubernetes.{k}");
        if let Some(ns) = &self.namespace {
            dns_label(ns).map_err(|e| invalid(key("namespace"), e))?;
        }
        if self.image.trim().is_empty() {
            return Err(invalid(key("image"), "expected an image reference, found an empty string"));
        }
        if !["Always", "IfNotPresent", "Never"].contains(&self.image_pull_policy.as_str()) {
            return Err(invalid(
                key("image_pull_policy"),
                format!(
                    "expected \"Always\", \"IfNotPresent\" or \"Never\", found {:?}",
                    self.image_pull_policy
                ),
            ));
        }
        for (k, v) in [
            ("service_account", &self.service_account),
            ("priority_class", &self.priority_class),
            ("scheduler_name", &self.scheduler_name),
            ("queue", &self.queue),
        ] {
            if let Some(v) = v {
                dns_subdomain(v).map_err(|e| invalid(key(k), e))?;
            }
        }
        self.check_gang()?;
        dns_subdomain(&self.controller_service_account)
            .map_err(|e| invalid(key("controller_service_account"), e))?;
        for (i, s) in self.image_pull_secrets.iter().enumerate() {
            dns_subdomain(s).map_err(|e| invalid(format!("{}[{i}]", key("image_pull_secrets")), e))?;
        }
        if !self.workdir.is_absolute() {
            return Err(invalid(
                key("workdir"),
                format!("expected an absolute path, found {}", self.workdir.display()),
            ));
        }
        if self.port == 0 || self.metrics_port == 0 || self.port == self.metrics_port {
            return Err(invalid(
                format!("{}/{}", key("port"), key("metrics_port")),
                format!(
                    "expected two different ports from 1 to 65535, found {} and {}",
                    self.port, self.metrics_port
                ),
            ));
        }
        if self.link_port == 0 || self.link_port == self.port || self.link_port == self.metrics_port {
            return Err(invalid(
                key("link_port"),
                format!(
                    "expected a port from 1 to 65535 other than port and metrics_port, found {}",
                    self.link_port
                ),
            ));
        }
        if self.active_deadline.is_some_and(|d| d.as_secs() == 0) {
            return Err(invalid(key("active_deadline"), "expected at least one second, e.g. \"24h\""));
        }
        if self.restart_backoff > self.max_restart_backoff {
            return Err(invalid(
                key("restart_backoff"),
                format!(
                    "{} is longer than kubernetes.max_restart_backoff = {}",
                    humantime_serde::re::humantime::format_duration(self.restart_backoff),
                    humantime_serde::re::humantime::format_duration(self.max_restart_backoff)
                ),
            ));
        }
        if let Some(code) = self.retryable_exit_codes.iter().find(|c| !(1..=255).contains(*c)) {
            return Err(invalid(
                key("retryable_exit_codes"),
                format!("exit codes are 1 to 255 (0 is success), found {code}"),
            ));
        }
        for k in self.labels.keys() {
            if k.starts_with(super::LABEL_PREFIX) || k.starts_with("app.kubernetes.io/") {
                return Err(invalid(key("labels"), format!("{k:?} is set by gradflow; choose another key")));
            }
            label_key(k).map_err(|e| invalid(key("labels"), e))?;
        }
        for v in self.labels.values() {
            label_value(v).map_err(|e| invalid(key("labels"), e))?;
        }
        for k in self.annotations.keys() {
            label_key(k).map_err(|e| invalid(key("annotations"), e))?;
        }
        for role in [Role::Ps, Role::Worker] {
            let section = match role {
                Role::Ps => &self.ps,
                Role::Worker => &self.worker,
            };
            let at = |k: &str| format!("kubernetes.{}.{k}", role.as_str());
            if section.image.as_deref().is_some_and(|i| i.trim().is_empty()) {
                return Err(invalid(at("image"), "expected an image reference, found an empty string"));
            }
            // Each field is checked where it is written, so that the error names that key.
            check_settings(section, &at)?;
            if role == Role::Ps && section.gpu.is_some_and(|g| g > 0) {
                return Err(invalid(
                    at("gpu"),
                    "servers use no GPU; set gpu under [kubernetes.worker] (or [kubernetes], which is for workers)",
                ));
            }
            let merged = self.for_role(role);
            check_mounts(&merged).map_err(|e| invalid(format!("kubernetes ({} pods)", role.as_str()), e))?;
            if let (Some(cpu), Some(limit)) = (&merged.cpu, &merged.cpu_limit)
                && quantity_value(limit) < quantity_value(cpu)
            {
                let key = if section.cpu_limit.is_some() { at("cpu_limit") } else { key("cpu_limit") };
                return Err(invalid(
                    key,
                    format!(
                        "the {} pods' CPU limit {limit:?} is below their CPU request {cpu:?}; a limit must be at least the request",
                        role.as_str()
                    ),
                ));
            }
        }
        let common = PodSettings {
            image: None,
            command: self.command.clone(),
            cpu: self.cpu.clone(),
            cpu_limit: self.cpu_limit.clone(),
            memory: self.memory.clone(),
            gpu: self.gpu,
            node_selector: self.node_selector.clone(),
            tolerations: self.tolerations.clone(),
            env: self.env.clone(),
            env_from: self.env_from.clone(),
            volumes: self.volumes.clone(),
            volume_mounts: self.volume_mounts.clone(),
        };
        check_settings(&common, &key)?;
        Ok(())
    }
}

impl KubernetesConfig {
    /// `gang` against the settings it depends on: Volcano's PodGroup is only read by Volcano's
    /// scheduler; Kueue's pod group needs a LocalQueue, and a second gang scheduler under it
    /// would wait for a PodGroup no one creates.
    fn check_gang(&self) -> Result<(), JobError> {
        match self.gang {
            Gang::None => Ok(()),
            Gang::Volcano => match self.scheduler_name.as_deref() {
                Some(name) if name != VOLCANO_SCHEDULER => Err(invalid(
                    "kubernetes.scheduler_name",
                    format!(
                        "{name:?} with kubernetes.gang = \"volcano\": only Volcano's scheduler reads its PodGroup; \
                         remove scheduler_name (gang = \"volcano\" sets \"volcano\") or choose another gang"
                    ),
                )),
                _ => Ok(()),
            },
            Gang::Kueue => {
                if self.queue.is_none() {
                    return Err(invalid(
                        "kubernetes.queue",
                        "kubernetes.gang = \"kueue\" needs the name of a Kueue LocalQueue in the job's namespace \
                         (Kueue only admits pods that name one)",
                    ));
                }
                if self.scheduler_name.as_deref() == Some(VOLCANO_SCHEDULER) {
                    return Err(invalid(
                        "kubernetes.gang",
                        "\"kueue\" with kubernetes.scheduler_name = \"volcano\": Volcano would wait for a PodGroup \
                         that Kueue does not create; use gang = \"volcano\", or drop scheduler_name",
                    ));
                }
                Ok(())
            }
        }
    }
}

/// A [`JobError::Invalid`] for `key`.
fn invalid(key: impl Into<String>, message: impl Into<String>) -> JobError {
    JobError::Invalid { key: key.into(), message: message.into() }
}

/// Name of the emptyDir volume gradflow adds for the output and synthetic-data directories.
pub(crate) const SCRATCH_VOLUME: &str = "gradflow-scratch";

fn check_settings(s: &PodSettings, at: &dyn Fn(&str) -> String) -> Result<(), JobError> {
    if let Some(c) = &s.command
        && (c.is_empty() || c[0].trim().is_empty())
    {
        return Err(invalid(at("command"), "expected the program and its arguments, e.g. [\"gradflow\"]"));
    }
    for (k, v) in [("cpu", &s.cpu), ("cpu_limit", &s.cpu_limit), ("memory", &s.memory)] {
        if let Some(v) = v {
            check_quantity(v).map_err(|e| invalid(at(k), e))?;
        }
    }
    for (k, v) in &s.node_selector {
        label_key(k).map_err(|e| invalid(at("node_selector"), e))?;
        label_value(v).map_err(|e| invalid(at("node_selector"), e))?;
    }
    for k in s.env.keys() {
        if k.starts_with("GRADFLOW_") {
            return Err(invalid(
                at("env"),
                format!(
                    "{k} is reserved: gradflow sets the GRADFLOW_ variables (the log filter is output.log)"
                ),
            ));
        }
        let ok = !k.is_empty()
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
        if !ok {
            return Err(invalid(at("env"), format!("{k:?} is not a valid environment variable name")));
        }
    }
    for (k, v) in &s.env {
        if let EnvValue::From(source) = v {
            check_env_source(source).map_err(|e| invalid(format!("{}.{k}", at("env")), e))?;
        }
    }
    for (i, source) in s.env_from.iter().enumerate() {
        check_env_from(source).map_err(|e| invalid(format!("{}[{i}]", at("env_from")), e))?;
    }
    for (i, v) in s.volumes.iter().enumerate() {
        let name = format!("{}[{i}].name", at("volumes"));
        dns_label(&v.name).map_err(|e| invalid(name.clone(), e))?;
        if v.name == SCRATCH_VOLUME {
            return Err(invalid(name, format!("{SCRATCH_VOLUME} is gradflow's own volume")));
        }
    }
    for (i, m) in s.volume_mounts.iter().enumerate() {
        if !m.mount_path.starts_with('/') {
            return Err(invalid(
                format!("{}[{i}].mountPath", at("volume_mounts")),
                format!("expected an absolute path, found {:?}", m.mount_path),
            ));
        }
    }
    Ok(())
}

/// A reference to a key of a Secret or ConfigMap names both; other sources (`fieldRef`,
/// `resourceFieldRef`) are checked by the API server.
fn check_env_source(source: &EnvVarSource) -> Result<(), String> {
    let set = [
        source.secret_key_ref.is_some(),
        source.config_map_key_ref.is_some(),
        source.field_ref.is_some(),
        source.resource_field_ref.is_some(),
    ];
    if set.iter().filter(|s| **s).count() != 1 {
        return Err(
            "expected exactly one of secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef".into()
        );
    }
    let refs = [
        source.secret_key_ref.as_ref().map(|r| (&r.name, &r.key)),
        source.config_map_key_ref.as_ref().map(|r| (&r.name, &r.key)),
    ];
    for (name, key) in refs.into_iter().flatten() {
        dns_subdomain(name)?;
        config_key(key)?;
    }
    Ok(())
}

/// An `env_from` entry names one Secret or ConfigMap, and its prefix cannot make gradflow's
/// variables.
fn check_env_from(source: &EnvFromSource) -> Result<(), String> {
    let name = match (&source.secret_ref, &source.config_map_ref) {
        (Some(s), None) => &s.name,
        (None, Some(c)) => &c.name,
        _ => return Err("expected exactly one of secret and config_map (secretRef, configMapRef)".into()),
    };
    dns_subdomain(name)?;
    if source.prefix.as_deref().is_some_and(|p| p.starts_with("GRADFLOW_")) {
        return Err(
            "a prefix starting with GRADFLOW_ is reserved: gradflow sets the GRADFLOW_ variables".into()
        );
    }
    Ok(())
}

/// A key of a Secret or ConfigMap: letters, digits, `-`, `_`, `.`.
fn config_key(key: &str) -> Result<(), String> {
    let ok = !key.is_empty()
        && key.len() <= 253
        && key.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok { Ok(()) } else { Err(format!("{key:?} is not a valid Secret or ConfigMap key")) }
}

/// The value of one `env` entry: a literal, or where the pod takes it from.
///
/// In the job file: `NAME = "value"`; `NAME = { secret = "s3", key = "secret-key" }` or
/// `NAME = { config_map = "settings", key = "region" }` (either with `optional = true`); or the
/// Kubernetes shape, `NAME = { valueFrom = { secretKeyRef = { name = "s3", key = "k" } } }`,
/// which also takes `fieldRef` and `resourceFieldRef`.
#[derive(Debug, Clone, PartialEq)]
pub enum EnvValue {
    /// A literal value, set in the pods' env.
    Value(String),
    /// Taken by the kubelet from a Secret, a ConfigMap or the pod itself.
    From(EnvVarSource),
}

impl EnvValue {
    /// A reference to `key` of the Secret `secret`.
    pub fn secret(secret: impl Into<String>, key: impl Into<String>) -> EnvValue {
        EnvValue::From(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector { name: secret.into(), key: key.into(), optional: None }),
            ..EnvVarSource::default()
        })
    }
}

impl Serialize for EnvValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Shape<'a> {
            #[serde(rename = "valueFrom")]
            value_from: &'a EnvVarSource,
        }
        match self {
            EnvValue::Value(v) => s.serialize_str(v),
            EnvValue::From(source) => Shape { value_from: source }.serialize(s),
        }
    }
}

const ENV_SHAPES: &str = "expected a string, { secret = \"name\", key = \"key\" }, \
     { config_map = \"name\", key = \"key\" } or { valueFrom = { secretKeyRef = { name = \"name\", key = \"key\" } } }";

impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        use serde_json::Value;
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Short {
            secret: Option<String>,
            config_map: Option<String>,
            key: String,
            optional: Option<bool>,
        }
        let value = Value::deserialize(d)?;
        let Value::Object(map) = &value else {
            return match value {
                Value::String(s) => Ok(EnvValue::Value(s)),
                _ => Err(D::Error::custom(ENV_SHAPES)),
            };
        };
        if let Some(source) = map.get("valueFrom") {
            if map.len() != 1 {
                return Err(D::Error::custom(format!("{ENV_SHAPES}: valueFrom comes alone")));
            }
            return strict::<EnvVarSource>(source).map(EnvValue::From).map_err(D::Error::custom);
        }
        let short: Short = serde_json::from_value(value.clone())
            .map_err(|e| D::Error::custom(format!("{ENV_SHAPES}: {e}")))?;
        let source = match (short.secret, short.config_map) {
            (Some(name), None) => EnvVarSource {
                secret_key_ref: Some(SecretKeySelector { name, key: short.key, optional: short.optional }),
                ..EnvVarSource::default()
            },
            (None, Some(name)) => EnvVarSource {
                config_map_key_ref: Some(ConfigMapKeySelector {
                    name,
                    key: short.key,
                    optional: short.optional,
                }),
                ..EnvVarSource::default()
            },
            _ => return Err(D::Error::custom(format!("{ENV_SHAPES}: name either secret or config_map"))),
        };
        Ok(EnvValue::From(source))
    }
}

/// `env_from`: a list of `{ secret = "name" }`, `{ config_map = "name" }` (with `prefix` and
/// `optional`), or Kubernetes `envFrom` entries (`{ secretRef = { name = "name" } }`).
fn env_from_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<EnvFromSource>, D::Error> {
    use serde::de::Error;
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Short {
        secret: Option<String>,
        config_map: Option<String>,
        prefix: Option<String>,
        optional: Option<bool>,
    }
    let raw = Vec::<serde_json::Value>::deserialize(d)?;
    raw.into_iter()
        .enumerate()
        .map(|(i, value)| {
            let short_form = value.get("secret").is_some() || value.get("config_map").is_some();
            if !short_form {
                return strict::<EnvFromSource>(&value).map_err(|e| D::Error::custom(format!("[{i}]: {e}")));
            }
            let short: Short =
                serde_json::from_value(value).map_err(|e| D::Error::custom(format!("[{i}]: {e}")))?;
            Ok(EnvFromSource {
                secret_ref: short.secret.map(|name| SecretEnvSource { name, optional: short.optional }),
                config_map_ref: short
                    .config_map
                    .map(|name| ConfigMapEnvSource { name, optional: short.optional }),
                prefix: short.prefix,
            })
        })
        .collect()
}

/// Every mount names a volume of the same pod, and volume names are unique.
fn check_mounts(s: &PodSettings) -> Result<(), String> {
    let mut names = std::collections::BTreeSet::new();
    for v in &s.volumes {
        if !names.insert(v.name.as_str()) {
            return Err(format!("volume {:?} is defined twice", v.name));
        }
    }
    for m in &s.volume_mounts {
        if !names.contains(m.name.as_str()) {
            return Err(format!("volume_mounts: no volume named {:?} in volumes", m.name));
        }
    }
    Ok(())
}

/// Reads a job file for the Kubernetes backend: like [`JobConfig::load`], but relative paths
/// are resolved against [`KubernetesConfig::workdir`], where they will be inside the pods,
/// and the `[kubernetes]` section is checked.
///
/// The exception is `auth.token_file`: the launcher reads it, on its own machine, to put the
/// token in the job's Secret, so it stays relative to the job file.
pub fn load_job(path: &Path) -> Result<JobConfig, LaunchError> {
    let in_file = |error| JobError::File { path: path.to_path_buf(), error: Box::new(error) };
    let text = std::fs::read_to_string(path).map_err(|e| in_file(JobError::Io(e)))?;
    let mut job = parse_job(&text).map_err(in_file)?;
    if let Some(file) = job.auth.token_file.as_mut()
        && file.is_relative()
    {
        *file = path.parent().unwrap_or(Path::new("")).join(&*file);
    }
    Ok(job)
}

/// [`load_job`] for a job file's text (`auth.token_file` stays as written: relative to the
/// current directory).
pub fn parse_job(text: &str) -> Result<JobConfig, JobError> {
    let mut job = JobConfig::parse(text)?;
    let kube = KubernetesConfig::from_toml(text)?.unwrap_or_default();
    kube.validate()?;
    check_name(&job.name)?;
    let token_file = job.auth.token_file.take();
    job.resolve_paths(&kube.workdir);
    job.auth.token_file = token_file;
    let fix = |p: &mut PathBuf| *p = normalize(p);
    job.data.train.iter_mut().for_each(fix);
    job.data.test.iter_mut().for_each(fix);
    if let Some(dir) = job.output.dir.as_mut() {
        fix(dir);
    }
    Ok(job)
}

/// Kubernetes names a job's Service after it: a DNS-1035 label, which must start with a
/// letter (job names may start with a digit).
pub(crate) fn check_name(name: &str) -> Result<(), JobError> {
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(invalid(
            "name",
            format!("`{name}` must start with a letter to run on Kubernetes (it names the job's Service)"),
        ));
    }
    Ok(())
}

/// `/workspace/../runs/x` -> `/runs/x`, without touching the file system (the path is one
/// inside a pod). `..` above the root stays at the root.
pub(crate) fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                let can_pop =
                    out.has_root() || matches!(out.components().next_back(), Some(Component::Normal(_)));
                if can_pop {
                    // Popping the root leaves the root.
                    out.pop();
                } else {
                    out.push("..");
                }
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

fn dns_label(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok { Ok(()) } else { Err(format!("{s:?} is not a valid name (lowercase letters, digits, '-')")) }
}

fn dns_subdomain(s: &str) -> Result<(), String> {
    let ok = !s.is_empty() && s.len() <= 253 && s.split('.').all(|part| dns_label(part).is_ok());
    if ok { Ok(()) } else { Err(format!("{s:?} is not a valid name (lowercase letters, digits, '-', '.')")) }
}

fn label_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        dns_subdomain(p).map_err(|_| format!("{k:?}: the prefix before '/' must be a DNS subdomain"))?;
    }
    label_value(name).map_err(|_| format!("{k:?} is not a valid label key"))?;
    if name.is_empty() {
        return Err(format!("{k:?} is not a valid label key"));
    }
    Ok(())
}

fn label_value(v: &str) -> Result<(), String> {
    let ok = v.len() <= 63
        && v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && (v.is_empty()
            || (v.starts_with(|c: char| c.is_ascii_alphanumeric())
                && v.ends_with(|c: char| c.is_ascii_alphanumeric())));
    if ok { Ok(()) } else { Err(format!("{v:?} is not a valid label value")) }
}

/// A Kubernetes quantity: a decimal number with an optional suffix (`500m`, `2`, `1.5`,
/// `4Gi`, `1e3`).
fn check_quantity(q: &str) -> Result<(), String> {
    const SUFFIXES: [&str; 15] =
        ["", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "n"];
    let digits_end = q.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(q.len());
    let (number, suffix) = q.split_at(digits_end);
    let number_ok = !number.is_empty() && number.matches('.').count() <= 1 && number != ".";
    let suffix_ok = SUFFIXES.contains(&suffix)
        || suffix.strip_prefix(['e', 'E']).is_some_and(|e| !e.is_empty() && e.parse::<i32>().is_ok());
    if number_ok && suffix_ok {
        Ok(())
    } else {
        Err(format!("{q:?} is not a Kubernetes quantity (e.g. \"2\", \"500m\", \"4Gi\")"))
    }
}

/// The value of a quantity that [`check_quantity`] accepted, in base units (`500m` is 0.5,
/// `1Ki` is 1024), for comparing two of them.
pub(crate) fn quantity_value(q: &str) -> f64 {
    let digits_end = q.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(q.len());
    let (number, suffix) = q.split_at(digits_end);
    let number: f64 = number.parse().unwrap_or(0.0);
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e => 10f64.powi(e[1..].parse().unwrap_or(0)),
    };
    number * factor
}

/// `cpu = 2` and `cpu = "2"` both mean two CPUs.
fn quantity<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Q {
        Text(String),
        Int(i64),
        Float(f64),
    }
    Ok(Option::<Q>::deserialize(d)?.map(|q| match q {
        Q::Text(s) => s,
        Q::Int(i) => i.to_string(),
        Q::Float(f) => f.to_string(),
    }))
}

/// A list of Kubernetes objects whose keys are checked: k8s-openapi ignores unknown fields,
/// which would let a misspelled `mountpath` pass silently.
fn strict_list<'de, D: Deserializer<'de>, T: DeserializeOwned + Serialize>(d: D) -> Result<Vec<T>, D::Error> {
    let raw = Vec::<serde_json::Value>::deserialize(d)?;
    raw.into_iter()
        .enumerate()
        .map(|(i, value)| strict(&value).map_err(|e| serde::de::Error::custom(format!("[{i}]: {e}"))))
        .collect()
}

/// One Kubernetes object whose keys are checked (see [`strict_list`]).
fn strict<T: DeserializeOwned + Serialize>(value: &serde_json::Value) -> Result<T, String> {
    let typed: T = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    if let Some(path) = unknown_key(value, &back, String::new()) {
        return Err(format!("unknown field `{path}`"));
    }
    Ok(typed)
}

/// The first key of `given` that `understood` (the same value after a round trip through its
/// type) does not have.
fn unknown_key(given: &serde_json::Value, understood: &serde_json::Value, at: String) -> Option<String> {
    use serde_json::Value;
    match (given, understood) {
        (Value::Object(g), Value::Object(u)) => g.iter().find_map(|(k, v)| {
            let path = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
            match u.get(k) {
                None => Some(path),
                Some(w) => unknown_key(v, w, path),
            }
        }),
        (Value::Array(g), Value::Array(u)) => {
            g.iter().zip(u).enumerate().find_map(|(i, (v, w))| unknown_key(v, w, format!("{at}[{i}]")))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "name = \"demo\"\n[model]\nkind = \"logistic_regression\"\n[data]\ntrain = \"data/train.libsvm\"\nformat = \"libsvm\"\n";

    fn parse(extra: &str) -> Result<JobConfig, String> {
        parse_job(&format!("{MIN}{extra}")).map_err(|e| e.to_string())
    }

    #[test]
    fn no_section_means_defaults_and_paths_move_into_the_workdir() {
        let job = parse("").unwrap();
        assert_eq!(job.kubernetes, None);
        assert_eq!(job.data.train, vec![PathBuf::from("/workspace/data/train.libsvm")]);
        assert_eq!(job.output_dir(), PathBuf::from("/workspace/runs/demo"));
    }

    #[test]
    fn the_token_file_is_read_by_the_launcher_so_it_stays_next_to_the_job_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.toml");
        std::fs::write(&path, format!("{MIN}[auth]\ntoken_file = \"secrets/token\"\n")).unwrap();
        let job = load_job(&path).unwrap();
        assert_eq!(job.auth.token_file, Some(dir.path().join("secrets/token")));
        assert_eq!(job.data.train, vec![PathBuf::from("/workspace/data/train.libsvm")]);
        let job = parse("[auth]\ntoken_file = \"/etc/gradflow/token\"\n").unwrap();
        assert_eq!(job.auth.token_file, Some(PathBuf::from("/etc/gradflow/token")));
    }

    #[test]
    fn dot_dot_paths_are_normalized() {
        let job = parse_job(&MIN.replace("data/train.libsvm", "../runs/data/t.libsvm")).unwrap();
        assert_eq!(job.data.train, vec![PathBuf::from("/runs/data/t.libsvm")]);
        assert_eq!(normalize(Path::new("/a/../../b/./c")), PathBuf::from("/b/c"));
        assert_eq!(normalize(Path::new("../a/../b")), PathBuf::from("../b"));
    }

    #[test]
    fn role_settings_override_common_ones() {
        let job = parse(
            "[kubernetes]\ncpu = 1\nmemory = \"1Gi\"\nnode_selector = { pool = \"a\", zone = \"z\" }\n\
             tolerations = [{ key = \"k\", operator = \"Exists\" }]\nenv = { A = \"1\" }\n\
             [kubernetes.worker]\ncpu = \"500m\"\ngpu = 1\nnode_selector = { pool = \"gpu\" }\n\
             tolerations = [{ key = \"nvidia.com/gpu\", operator = \"Exists\", effect = \"NoSchedule\" }]\nenv = { B = \"2\" }\n",
        )
        .unwrap();
        let k = KubernetesConfig::of(&job).unwrap();
        let w = k.for_role(Role::Worker);
        assert_eq!(w.cpu.as_deref(), Some("500m"));
        assert_eq!(w.memory.as_deref(), Some("1Gi"));
        assert_eq!(w.gpu, Some(1));
        assert_eq!(w.node_selector["pool"], "gpu");
        assert_eq!(w.node_selector["zone"], "z");
        assert_eq!(w.tolerations.len(), 2);
        assert_eq!(w.env.len(), 2);
        let p = k.for_role(Role::Ps);
        assert_eq!((p.cpu.as_deref(), p.gpu), (Some("1"), None));
        assert_eq!(p.image.as_deref(), Some(DEFAULT_IMAGE));
    }

    #[test]
    fn bad_values_name_the_key() {
        for (extra, key) in [
            ("[kubernetes]\nimage_pull_policy = \"Sometimes\"", "kubernetes.image_pull_policy"),
            ("[kubernetes]\ncpu = \"two\"", "kubernetes.cpu"),
            ("[kubernetes.worker]\nmemory = \"4 GB\"", "kubernetes.worker.memory"),
            ("[kubernetes]\nretryable_exit_codes = [0]", "kubernetes.retryable_exit_codes"),
            ("[kubernetes]\nworkdir = \"rel\"", "kubernetes.workdir"),
            ("[kubernetes]\nport = 9090", "kubernetes.port"),
            ("[kubernetes.ps]\nenv = { GRADFLOW_LOG = \"debug\" }", "kubernetes.ps.env"),
            ("[kubernetes]\nlabels = { \"gradflow.dev/job\" = \"x\" }", "kubernetes.labels"),
            ("[kubernetes]\nqueue = \"Team A\"", "kubernetes.queue"),
            ("[kubernetes]\nnamespace = \"ML\"", "kubernetes.namespace"),
            ("[kubernetes]\nimagee = \"x\"", "imagee"),
            ("[kubernetes.worker]\ngpus = 1", "gpus"),
        ] {
            let err = parse(extra).unwrap_err();
            assert!(err.contains(key), "{extra}: {err}");
        }
    }

    #[test]
    fn gang_defaults_to_none_and_reads_each_mode() {
        assert_eq!(KubernetesConfig::default().gang, Gang::None);
        for (text, gang) in [
            ("[kubernetes]\ngang = \"volcano\"\n", Gang::Volcano),
            (
                "[kubernetes]\ngang = \"volcano\"\nscheduler_name = \"volcano\"\nqueue = \"q\"\n",
                Gang::Volcano,
            ),
            ("[kubernetes]\ngang = \"kueue\"\nqueue = \"team-a\"\n", Gang::Kueue),
            ("[kubernetes]\ngang = \"none\"\nscheduler_name = \"volcano\"\n", Gang::None),
        ] {
            let k = KubernetesConfig::of(&parse(text).unwrap()).unwrap();
            assert_eq!(k.gang, gang, "{text}");
        }
    }

    #[test]
    fn contradictory_gang_settings_are_refused_naming_the_key() {
        for (extra, key, says) in [
            (
                "[kubernetes]\ngang = \"volcano\"\nscheduler_name = \"default-scheduler\"",
                "kubernetes.scheduler_name",
                "only Volcano's scheduler reads its PodGroup",
            ),
            ("[kubernetes]\ngang = \"kueue\"", "kubernetes.queue", "LocalQueue"),
            (
                "[kubernetes]\ngang = \"kueue\"\nqueue = \"q\"\nscheduler_name = \"volcano\"",
                "kubernetes.gang",
                "PodGroup",
            ),
            ("[kubernetes]\ngang = \"yunikorn\"", "gang", "volcano"),
            ("[kubernetes]\ngang = true", "gang", ""),
        ] {
            let err = parse(extra).unwrap_err();
            assert!(err.contains(key) && err.contains(says), "{extra}: {err}");
        }
    }

    #[test]
    fn kubernetes_objects_in_the_job_file_are_checked_strictly() {
        let ok = parse(
            "[kubernetes]\nvolumes = [{ name = \"data\", persistentVolumeClaim = { claimName = \"train-data\" } }]\n\
             volume_mounts = [{ name = \"data\", mountPath = \"/workspace/data\", readOnly = true }]\n",
        )
        .unwrap();
        let k = KubernetesConfig::of(&ok).unwrap();
        assert_eq!(k.volumes[0].persistent_volume_claim.as_ref().unwrap().claim_name, "train-data");
        assert_eq!(k.volume_mounts[0].read_only, Some(true));

        let err = parse(
            "[kubernetes]\nvolumes = [{ name = \"data\", persistentVolumeClaim = { claimname = \"x\" } }]\n",
        )
        .unwrap_err();
        assert!(err.contains("persistentVolumeClaim.claimname"), "{err}");
        let err =
            parse("[kubernetes]\nvolume_mounts = [{ name = \"nope\", mountPath = \"/x\" }]\n").unwrap_err();
        assert!(err.contains("no volume named \"nope\""), "{err}");
        let err = parse("[kubernetes]\ntolerations = [{ keys = \"x\" }]\n").unwrap_err();
        assert!(err.contains("keys"), "{err}");
    }

    #[test]
    fn env_takes_literals_and_references_in_two_shapes() {
        let job = parse(
            "[kubernetes]\nenv = { A = \"1\", B = { secret = \"s3\", key = \"secret-key\" }, \
             C = { config_map = \"settings\", key = \"region\", optional = true }, \
             D = { valueFrom = { secretKeyRef = { name = \"s3\", key = \"id\" } } } }\n\
             env_from = [{ secret = \"team\" }, { configMapRef = { name = \"proxy\" }, prefix = \"P_\" }]\n\
             [kubernetes.worker]\nenv_from = [{ config_map = \"worker-settings\", optional = true }]\n",
        )
        .unwrap();
        let k = KubernetesConfig::of(&job).unwrap();
        let w = k.for_role(Role::Worker);
        assert_eq!(w.env["A"], EnvValue::Value("1".into()));
        assert_eq!(w.env["B"], EnvValue::secret("s3", "secret-key"));
        let EnvValue::From(c) = &w.env["C"] else { panic!() };
        let c = c.config_map_key_ref.as_ref().unwrap();
        assert_eq!((c.name.as_str(), c.key.as_str(), c.optional), ("settings", "region", Some(true)));
        assert_eq!(w.env["D"], EnvValue::secret("s3", "id"));
        assert_eq!(w.env_from.len(), 3);
        assert_eq!(w.env_from[0].secret_ref.as_ref().unwrap().name, "team");
        assert_eq!(w.env_from[1].prefix.as_deref(), Some("P_"));
        assert_eq!(w.env_from[2].config_map_ref.as_ref().unwrap().optional, Some(true));
        assert_eq!(k.for_role(Role::Ps).env_from.len(), 2);
        // What is written is what is read back.
        let back: KubernetesConfig = serde_json::from_value(serde_json::to_value(&k).unwrap()).unwrap();
        assert_eq!(back, k);
    }

    #[test]
    fn bad_env_references_name_the_key() {
        for (extra, key) in [
            ("[kubernetes]\nenv = { A = { secret = \"S3\", key = \"k\" } }", "kubernetes.env.A"),
            ("[kubernetes]\nenv = { A = { secret = \"s\", key = \"a/b\" } }", "kubernetes.env.A"),
            ("[kubernetes]\nenv = { A = { secret = \"s\", keys = \"k\" } }", "keys"),
            (
                "[kubernetes]\nenv = { A = { secret = \"s\", config_map = \"c\", key = \"k\" } }",
                "either secret or config_map",
            ),
            ("[kubernetes]\nenv = { A = 1 }", "expected a string"),
            ("[kubernetes.worker]\nenv = { A = { valueFrom = {} } }", "kubernetes.worker.env.A"),
            (
                "[kubernetes]\nenv = { A = { valueFrom = { secretKeyRef = { name = \"s\", kee = \"k\" } } } }",
                "kee",
            ),
            ("[kubernetes]\nenv_from = [{ secret = \"s\", config_map = \"c\" }]", "kubernetes.env_from[0]"),
            (
                "[kubernetes.ps]\nenv_from = [{ secretRef = { name = \"s\" }, prefix = \"GRADFLOW_\" }]",
                "kubernetes.ps.env_from[0]",
            ),
            ("[kubernetes]\nenv_from = [{ secretref = { name = \"s\" } }]", "secretref"),
        ] {
            let err = parse(extra).unwrap_err();
            assert!(err.contains(key), "{extra}: {err}");
        }
    }

    #[test]
    fn a_job_name_starting_with_a_digit_cannot_name_a_service() {
        let err = parse_job(&MIN.replace("\"demo\"", "\"1demo\"")).unwrap_err().to_string();
        assert!(err.starts_with("name:"), "{err}");
    }

    #[test]
    fn servers_default_to_guaranteed_resources_and_gpus_go_to_workers() {
        let k = KubernetesConfig::default();
        let p = k.for_role(Role::Ps);
        assert_eq!(
            (p.cpu.as_deref(), p.cpu_limit.as_deref(), p.memory.as_deref()),
            (Some(DEFAULT_PS_CPU), Some(DEFAULT_PS_CPU), Some(DEFAULT_PS_MEMORY))
        );
        let w = k.for_role(Role::Worker);
        assert_eq!((w.cpu, w.cpu_limit, w.memory, w.gpu), (None, None, None, None));
        assert_eq!(k.server_spread, ServerSpread::Prefer);

        // Overridden: the limit follows the request; the common gpu is the workers'.
        let job = parse(
            "[kubernetes]\ngpu = 2\nserver_spread = \"require\"\n[kubernetes.ps]\ncpu = 4\nmemory = \"16Gi\"\n\
             [kubernetes.worker]\ncpu = 8\ncpu_limit = \"12\"\n",
        )
        .unwrap();
        let k = KubernetesConfig::of(&job).unwrap();
        let p = k.for_role(Role::Ps);
        assert_eq!(
            (p.cpu.as_deref(), p.cpu_limit.as_deref(), p.memory.as_deref(), p.gpu),
            (Some("4"), Some("4"), Some("16Gi"), None)
        );
        let w = k.for_role(Role::Worker);
        assert_eq!((w.cpu.as_deref(), w.cpu_limit.as_deref(), w.gpu), (Some("8"), Some("12"), Some(2)));
        assert_eq!(k.server_spread, ServerSpread::Require);
    }

    #[test]
    fn bad_resources_name_the_key() {
        for (extra, key, says) in [
            ("[kubernetes.ps]\ngpu = 1", "kubernetes.ps.gpu", "servers use no GPU"),
            (
                "[kubernetes.ps]\ncpu = 4\ncpu_limit = \"2\"",
                "kubernetes.ps.cpu_limit",
                "below their CPU request",
            ),
            ("[kubernetes]\ncpu = 2\ncpu_limit = \"1500m\"", "kubernetes.cpu_limit", "below"),
            ("[kubernetes.ps]\ncpu = 3", "", ""),
            ("[kubernetes.worker]\ncpu_limit = \"lots\"", "kubernetes.worker.cpu_limit", "quantity"),
            ("[kubernetes]\nserver_spread = \"always\"", "server_spread", "prefer"),
        ] {
            let result = parse(extra);
            if key.is_empty() {
                result.unwrap();
                continue;
            }
            let err = result.unwrap_err();
            assert!(err.contains(key) && err.contains(says), "{extra}: {err}");
        }
        assert_eq!(quantity_value("500m"), 0.5);
        assert_eq!(quantity_value("2Ki"), 2048.0);
        assert_eq!(quantity_value("1e3"), 1000.0);
    }

    #[test]
    fn deadline_and_backoff() {
        let k = KubernetesConfig::default();
        assert_eq!(
            (k.active_deadline, k.restart_backoff, k.max_restart_backoff),
            (None, DEFAULT_RESTART_BACKOFF, DEFAULT_MAX_RESTART_BACKOFF)
        );
        assert_eq!(k.ttl_after_finished, None);
        let job = parse("[kubernetes]\nttl_after_finished = \"1h\"\nactive_deadline = \"2h 30m\"\nrestart_backoff = \"1s\"\nmax_restart_backoff = \"1m\"\n").unwrap();
        let k = KubernetesConfig::of(&job).unwrap();
        assert_eq!(k.active_deadline, Some(Duration::from_secs(9000)));
        assert_eq!(k.ttl_after_finished, Some(Duration::from_secs(3600)));
        assert_eq!(
            (k.restart_backoff, k.max_restart_backoff),
            (Duration::from_secs(1), Duration::from_secs(60))
        );
        let back: KubernetesConfig = serde_json::from_value(serde_json::to_value(&k).unwrap()).unwrap();
        assert_eq!(back, k);
        for (extra, key) in [
            ("[kubernetes]\nactive_deadline = \"0s\"", "kubernetes.active_deadline"),
            ("[kubernetes]\nactive_deadline = \"soon\"", "active_deadline"),
            ("[kubernetes]\nrestart_backoff = \"10m\"", "kubernetes.restart_backoff"),
        ] {
            let err = parse(extra).unwrap_err();
            assert!(err.contains(key), "{extra}: {err}");
        }
    }

    #[test]
    fn quantities() {
        for ok in ["1", "500m", "1.5", "4Gi", "100M", "1e3", "0.5"] {
            assert!(check_quantity(ok).is_ok(), "{ok}");
        }
        for bad in ["", "two", "4 Gi", "1.2.3", "Gi", "4GB", "."] {
            assert!(check_quantity(bad).is_err(), "{bad}");
        }
    }
}
