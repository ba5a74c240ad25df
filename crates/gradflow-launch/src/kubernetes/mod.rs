//! The Kubernetes backend: the same job file, run as pods on a cluster.
//!
//! `gradflow launch --backend kubernetes JOB.toml` turns a [`JobConfig`](gradflow_job::JobConfig)
//! into Kubernetes objects and drives them to the end of the job:
//!
//! - [`config`]: the optional `[kubernetes]` section of the job file (image, resources,
//!   scheduling, queue, volumes, ...) and how job-file paths map into the pods.
//! - [`render`]: a pure function from the job to k8s-openapi objects: the root ConfigMap that
//!   records the job, one headless Service, one Pod per server shard and per worker.
//! - [`controller`]: the lifecycle as a pure function from what is observed (the job record,
//!   the pods) to [`Action`]s, plus the summary that `gradflow status` prints.
//! - [`client`]: the thin part that talks to the API server: create, reconcile, follow
//!   (a watch on the job's pods starts each pass), status, logs, delete.
//! - [`lease`]: the job's `coordination.k8s.io` Lease, which one controller at a time holds:
//!   only its holder acts on the job.
//! - [`gang`]: gang scheduling (`kubernetes.gang`): Volcano's PodGroup, Kueue's pod group.
//! - [`serve`]: `gradflow serve` as a Deployment and a Service (rendered, not run by a
//!   controller).
//!
//! # One root object, no CRD
//!
//! Everything a job creates is owned (a controller `ownerReference`) by one ConfigMap named
//! after the job. The ConfigMap holds the job record: the job as JSON and the controller's
//! status (state, and per process the latest attempt and how each earlier attempt ended).
//! Deleting it lets the cluster's garbage collector delete the rest. A custom resource would
//! be the textbook choice, but it needs cluster-admin to install a CRD before the first job
//! can run, and a version skew between the CRD and the binary to manage; a ConfigMap works in
//! any namespace where a user may create pods, which is the permission a training job needs
//! anyway. What is lost: `kubectl get gradflowjobs`, schema validation by the API server, and
//! a status subresource (the record is one object updated with optimistic concurrency).
//!
//! # The job token
//!
//! With `[auth] enabled` (the default), `launch` puts the job's token (`auth.token_file`, else
//! the launcher's `GRADFLOW_TOKEN`, else a fresh random one) in a Secret `<job>-token`, owned
//! by the root like everything else and created before any pod; every server and worker pod
//! reads `GRADFLOW_TOKEN` from it (`secretKeyRef`), so recreated pods get the same token and
//! deleting the job deletes it. Rendered manifests (`--dry-run`) never hold the token: they
//! show the Secret without its data.
//!
//! # Lifecycle
//!
//! State comes from observed pod status, level-triggered: each pass reads the record and the
//! job's pods and decides what to do from those alone, so a pass can be repeated, interrupted
//! or run by another controller (`gradflow attach`) and the result is the same. Pod names
//! carry the attempt (`<job>-<role>-<index>-<attempt>`), so a recreated pod never collides
//! with the failed one, whose logs stay until `gradflow delete`. See [`controller`].
//!
//! Passes are event-driven: a kube-runtime watcher on the job's pods starts a pass when one
//! changes, and a slow resync (30 s) stands behind it. The watch only says when to look; the
//! pass reads everything afresh.
//!
//! # Who runs the controller
//!
//! `gradflow launch --backend kubernetes` runs it in the launching process until the job
//! ends (Ctrl-C stops the job, as with the local backend). `--detach` instead creates a
//! Kubernetes Job, owned by the root like everything else, whose pod runs `gradflow attach`
//! with the service account of `deploy/rbac.yaml`. If a foreground launcher dies without
//! stopping the job, `gradflow attach JOB` takes over where it was.
//!
//! Whichever runs it, a controller acts on the job only while it holds the job's Lease
//! (`<job>-controller`, see [`lease`]); a second controller of the same job waits, saying
//! which controller holds it, and takes over when that one releases the Lease or stops
//! renewing it.

pub mod client;
pub mod config;
pub mod controller;
pub mod gang;
pub mod lease;
pub mod render;
pub mod serve;
pub mod status;

use thiserror::Error;

pub use client::{Controller, JobClient, LogSelection, RunOutcome};
pub use config::{Gang, KubernetesConfig, PodSettings};
pub use controller::{Action, Decision, JobState, JobStatus, JobSummary};
pub use render::{Manifest, Renderer};

/// Label prefix of gradflow's own labels.
pub const LABEL_PREFIX: &str = "gradflow.dev/";
/// Label: the job a pod, Service or ConfigMap belongs to.
pub const LABEL_JOB: &str = "gradflow.dev/job";
/// Label: `ps` or `worker`.
pub const LABEL_ROLE: &str = "gradflow.dev/role";
/// Label: shard index or worker index.
pub const LABEL_INDEX: &str = "gradflow.dev/index";
/// Label: 0 for a process's first pod, +1 for each recreation.
pub const LABEL_ATTEMPT: &str = "gradflow.dev/attempt";
/// Label of a detached job's controller (its Kubernetes Job and pods), instead of
/// [`LABEL_JOB`], so that the job's Service and pod listings never include it.
pub const LABEL_CONTROLLER_OF: &str = "gradflow.dev/controller-of";
/// Label Kueue reads to queue a pod.
pub const LABEL_KUEUE_QUEUE: &str = "kueue.x-k8s.io/queue-name";
/// Annotation Volcano reads to queue a pod that has no PodGroup of its own (`gang = "none"`
/// with `scheduler_name = "volcano"`).
pub const ANNOTATION_VOLCANO_QUEUE: &str = "scheduling.volcano.sh/queue-name";

pub use gradflow_job::contract::ENV_RESTORE;

/// The key of the token in the job's Secret (`<job>-token`).
pub const TOKEN_SECRET_KEY: &str = "token";
/// Annotation of the Secret in rendered manifests (`--dry-run`), which carries no token: how
/// to create the real one when applying the manifests by hand.
pub const ANNOTATION_TOKEN: &str = "gradflow.dev/token";

/// The key of the job (JSON) in the root ConfigMap.
pub const RECORD_JOB_KEY: &str = "job.json";
/// The key of the controller's status (JSON) in the root ConfigMap.
pub const RECORD_STATUS_KEY: &str = "status.json";

/// `409 Conflict: the object has been modified` for an API answer, the error itself for the
/// rest (connection refused, TLS, ...).
fn describe(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(s) if !s.message.is_empty() => format!("{} {}: {}", s.code, s.reason, s.message),
        other => {
            // Connection errors say why only deep in their chain ("client error (Connect)":
            // refused? DNS? TLS?).
            let mut text = other.to_string();
            let mut cause = std::error::Error::source(other);
            while let Some(e) = cause {
                let more = e.to_string();
                if !text.contains(&more) {
                    text = format!("{text}: {more}");
                }
                cause = e.source();
            }
            text
        }
    }
}

/// What can go wrong on the Kubernetes backend.
#[derive(Debug, Error)]
pub enum KubernetesError {
    /// The `[kubernetes]` section (or the job as a whole) cannot run on Kubernetes; the
    /// message names the key.
    #[error("kubernetes: {0}")]
    Config(String),
    /// No kubeconfig or in-cluster configuration could be loaded, or no client made from it.
    #[error("no usable Kubernetes configuration (kubeconfig or in-cluster): {0}")]
    NoCluster(String),
    /// A request to the API server failed. (The kube error is not a `source`: its message is
    /// in ours, and its chain repeats itself.)
    #[error("{context}: {}", describe(.error))]
    Api { context: String, error: kube::Error },
    /// Something that must outlive a pod (checkpoints a restarted server restores from) would
    /// be kept on a pod's own filesystem, which goes with the pod.
    #[error(
        "{key} = {location:?} is not on shared storage ({why}): when a server pod is lost, the servers \
         are recreated to restore the latest checkpoint, which would have gone with the old pod, and the job \
         would silently start over. Use storage every pod shares: an object store URL (s3://, gs://, az://), or \
         a path under a volume mounted from a PersistentVolumeClaim (ReadWriteMany) or NFS, e.g. \
         kubernetes.volumes = [{{ name = \"ckpt\", persistentVolumeClaim = {{ claimName = \"ckpt\" }} }}] and \
         kubernetes.volume_mounts = [{{ name = \"ckpt\", mountPath = \"{mount}\" }}]"
    )]
    PodLocalStorage {
        /// The job-file key (`checkpoint.url`, `restore`).
        key: &'static str,
        /// Where it points, inside the pod.
        location: String,
        /// Where it is instead (`the server pod's own filesystem`, `volume "x" is an emptyDir`).
        why: String,
        /// A mount path that would cover it.
        mount: String,
    },
    /// `launch` found a job of the same name.
    #[error(
        "job {job} already exists in namespace {namespace}; see `gradflow status {job}`, remove it with `gradflow delete {job}`"
    )]
    AlreadyExists { job: String, namespace: String },
    /// The job's root ConfigMap is not there (never created, or deleted).
    #[error("no gradflow job {job} in namespace {namespace}")]
    NotFound { job: String, namespace: String },
    /// The job's record (ConfigMap) is not one gradflow wrote.
    #[error("job record {job}: {message}")]
    Record { job: String, message: String },
    /// The job's token could not be read (`auth.token_file`, `GRADFLOW_TOKEN`), or the job's
    /// Secret that holds it is gone.
    #[error("job token: {0}")]
    Token(String),
    /// `gradflow logs` found no pod to read.
    #[error("job {job} has no {what}")]
    NoPods { job: String, what: String },
    /// An object of the job's name exists but belongs to something else.
    #[error("{0}")]
    Foreign(String),
    /// Another writer changed the record between this pass's read and write; the pass is
    /// repeated from a fresh read.
    #[error("the job record changed during the pass (another controller?); will re-read")]
    Conflict,
    /// The API server kept failing; the job is left as it is.
    #[error(
        "gave up after {attempts} failed passes ({last}); the job is still in the cluster: resume with `gradflow attach {job}` or remove it with `gradflow delete {job}`"
    )]
    GaveUp { job: String, attempts: u32, last: String },
    /// Printing manifests failed.
    #[error("serializing manifests: {0}")]
    Serialize(String),
}

impl KubernetesError {
    /// Wraps an API error with what was being done.
    pub(crate) fn api(context: impl Into<String>) -> impl FnOnce(kube::Error) -> KubernetesError {
        let context = context.into();
        move |error| KubernetesError::Api { context, error }
    }

    /// The HTTP status of an API error, if this is one.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            KubernetesError::Api { error: kube::Error::Api(status), .. } => Some(status.code),
            _ => None,
        }
    }
}
