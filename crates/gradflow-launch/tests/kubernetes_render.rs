//! Rendering a job into Kubernetes objects: golden YAML, round trips through the types, the
//! shared environment contract, and the manifests in `deploy/` staying what the renderer
//! makes.
//!
//! `UPDATE_GOLDEN=1 cargo test -p gradflow-launch --test kubernetes_render` rewrites the
//! golden files (review the diff).

mod kubernetes_support;

use std::path::{Path, PathBuf};

use gradflow_job::contract::Token;
use gradflow_job::{ClusterSpec, JobConfig, Role};
use gradflow_launch::kubernetes::config::{load_job, parse_job};
use gradflow_launch::kubernetes::gang::PodGroup;
use gradflow_launch::kubernetes::render::{Manifest, Renderer, from_yaml, restore_env, to_json, to_yaml};
use gradflow_launch::kubernetes::{
    ANNOTATION_TOKEN, KubernetesConfig, LABEL_ATTEMPT, LABEL_INDEX, LABEL_JOB, LABEL_ROLE, RECORD_JOB_KEY,
};
use k8s_openapi::api::batch::v1::Job as BatchJob;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use kubernetes_support::*;

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
const REDACTED_SPEC: &str =
    "<GRADFLOW_CLUSTER_SPEC: checked by cluster_spec_in_each_pod_is_the_shared_contract>";
const REDACTED_JOB: &str = "<job.json: checked by the_root_records_the_job>";

/// Compares `actual` with a golden file, or writes it with UPDATE_GOLDEN=1.
fn golden(path: &Path, actual: &str) {
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    if expected != actual {
        let line = expected.lines().zip(actual.lines()).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "{} differs from what the renderer produces, first at line {}:\n  golden: {:?}\n  now:    {:?}\n\
             If the change is intended, rewrite it with UPDATE_GOLDEN=1 and review the diff.",
            path.display(),
            line + 1,
            expected.lines().nth(line),
            actual.lines().nth(line)
        );
    }
}

fn golden_path(name: &str) -> PathBuf {
    Path::new(MANIFEST_DIR).join("tests/golden").join(name)
}

/// The manifests with the two JSON blobs (the whole job, which other features change often)
/// replaced by markers; they have their own tests.
fn redacted(manifests: &[Manifest]) -> Vec<Manifest> {
    let mut out = manifests.to_vec();
    for m in &mut out {
        match m {
            Manifest::ConfigMap(cm) => {
                cm.data.as_mut().unwrap().insert(RECORD_JOB_KEY.into(), REDACTED_JOB.into());
            }
            Manifest::Pod(pod) => {
                let spec = pod.spec.as_mut().unwrap();
                for c in spec.containers.iter_mut().chain(spec.init_containers.iter_mut().flatten()) {
                    for e in c.env.iter_mut().flatten() {
                        if e.name == "GRADFLOW_CLUSTER_SPEC" {
                            e.value = Some(REDACTED_SPEC.into());
                        }
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// A job that sets every Kubernetes option.
fn full_job() -> JobConfig {
    parse_job(
        r#"
name = "ctr"
servers = 2
workers = 2

[model]
kind = "logistic_regression"
num_dense = 13

[data]
train = "data/train.csv"
test = "data/test.csv"
[data.synth]
train_rows = 1000
test_rows = 100

[launcher]
max_restarts = 5
grace_period = "45s"

[kubernetes]
namespace = "team-a"
image = "registry.example.com/ml/gradflow:0.1.0"
image_pull_policy = "Always"
image_pull_secrets = ["regcred"]
service_account = "trainer"
priority_class = "batch-high"
scheduler_name = "volcano"
queue = "team-a-queue"
retryable_exit_codes = [1, 137]
active_deadline = "24h"
labels = { team = "ads" }
annotations = { "example.com/owner" = "ads-ml" }
cpu = "1"
memory = "2Gi"
node_selector = { "cloud.example.com/pool" = "training" }
env = { RUST_BACKTRACE = "1" }
volumes = [{ name = "shared", persistentVolumeClaim = { claimName = "ads-shared" } }]
volume_mounts = [{ name = "shared", mountPath = "/shared", readOnly = true }]

[kubernetes.ps]
cpu = 4
memory = "16Gi"

[kubernetes.worker]
command = ["/usr/local/bin/gradflow"]
gpu = 1
node_selector = { "cloud.example.com/pool" = "gpu" }
tolerations = [{ key = "nvidia.com/gpu", operator = "Exists", effect = "NoSchedule" }]
env = { NCCL_DEBUG = "WARN" }
"#,
    )
    .unwrap()
}

#[test]
fn golden_minimal_job() {
    let r = Renderer::new(job(2, 2, 3), "ml").unwrap();
    golden(&golden_path("minimal.yaml"), &to_yaml(&redacted(&r.manifests(false))).unwrap());
}

#[test]
fn golden_job_with_every_kubernetes_option_detached() {
    let job = full_job();
    let ns = KubernetesConfig::of(&job).unwrap().namespace.unwrap();
    let r = Renderer::new(job, ns).unwrap();
    golden(&golden_path("full-detached.yaml"), &to_yaml(&redacted(&r.manifests(true))).unwrap());
}

/// A job gang-scheduled by `gang` ("volcano" or "kueue"), with requests on every pod, a
/// priority class and GPU workers: what a PodGroup's `minResources` sums.
fn gang_job(gang: &str) -> JobConfig {
    parse_job(&format!(
        r#"
name = "ctr"
servers = 2
workers = 3

[model]
kind = "logistic_regression"

[data]
train = "data/train.csv"

[kubernetes]
image = "registry.example.com/ml/gradflow:0.1.0"
gang = "{gang}"
queue = "team-a"
priority_class = "batch-high"

[kubernetes.ps]
cpu = 2
memory = "4Gi"

[kubernetes.worker]
cpu = "1500m"
memory = "3Gi"
gpu = 1
"#
    ))
    .unwrap()
}

#[test]
fn golden_volcano_gang() {
    let r = Renderer::new(gang_job("volcano"), "ml").unwrap();
    golden(&golden_path("gang-volcano.yaml"), &to_yaml(&redacted(&r.manifests(false))).unwrap());
}

#[test]
fn golden_kueue_gang() {
    let r = Renderer::new(gang_job("kueue"), "ml").unwrap();
    golden(&golden_path("gang-kueue.yaml"), &to_yaml(&redacted(&r.manifests(false))).unwrap());
}

#[test]
fn volcano_gang_renders_one_pod_group_that_every_pod_names() {
    let r = Renderer::new(gang_job("volcano"), "ml").unwrap();
    let manifests = r.manifests(false);
    let kinds: Vec<&str> = manifests.iter().map(Manifest::kind).collect();
    // Before any pod, as `launch` creates them.
    assert_eq!(kinds, ["ConfigMap", "Secret", "Service", "PodGroup", "Pod", "Pod", "Pod", "Pod", "Pod"]);
    let Manifest::PodGroup(group) = &manifests[3] else { unreachable!() };
    check_pod_group(&serde_json::to_value(group).unwrap());
    assert_eq!(group.metadata.name.as_deref(), Some("ctr"));
    assert_eq!(group.metadata.namespace.as_deref(), Some("ml"));
    assert_eq!(group.spec.min_member, 5);
    assert_eq!(group.spec.queue.as_deref(), Some("team-a"));
    assert_eq!(group.spec.priority_class_name.as_deref(), Some("batch-high"));
    // 2 x (2 CPUs, 4Gi) + 3 x (1.5 CPUs, 3Gi, 1 GPU): the sum of the pods' requests.
    let min = group.spec.min_resources.as_ref().unwrap();
    let min: Vec<(&str, &str)> = min.iter().map(|(k, v)| (k.as_str(), v.0.as_str())).collect();
    assert_eq!(min, [("cpu", "8500m"), ("memory", "17Gi"), ("nvidia.com/gpu", "3")]);
    // Pods of every attempt are in the group, under Volcano's scheduler.
    for pod in [r.pod(Role::Ps, 1, 0), r.pod(Role::Worker, 2, 0), r.pod(Role::Worker, 0, 4)] {
        let annotations = pod.metadata.annotations.clone().unwrap();
        assert_eq!(annotations["scheduling.k8s.io/group-name"], "ctr");
        // The PodGroup holds the queue; a pod's own queue would be for a group of one.
        assert!(!annotations.contains_key("scheduling.volcano.sh/queue-name"));
        assert!(!pod.metadata.labels.clone().unwrap().contains_key("kueue.x-k8s.io/queue-name"));
        assert_eq!(pod.spec.unwrap().scheduler_name.as_deref(), Some("volcano"));
    }
    // Without requests (the servers' defaults are there anyway) and without a queue.
    let job = parse_job(
        "name = \"ctr\"\n[model]\nkind = \"logistic_regression\"\n[data]\ntrain = \"t.csv\"\n[kubernetes]\ngang = \"volcano\"\n",
    )
    .unwrap();
    let group = Renderer::new(job, "ml").unwrap().pod_group().unwrap();
    assert_eq!((group.spec.min_member, group.spec.queue.as_deref()), (2, None));
    let min = group.spec.min_resources.unwrap();
    assert_eq!((min["cpu"].0.as_str(), min["memory"].0.as_str()), ("1", "2Gi"));
    // A worker's CPU limit without a request: Kubernetes makes it the request, so it is summed.
    let job = parse_job(
        "name = \"ctr\"\n[model]\nkind = \"logistic_regression\"\n[data]\ntrain = \"t.csv\"\n[kubernetes]\ngang = \"volcano\"\n[kubernetes.worker]\ncpu_limit = \"2\"\n",
    )
    .unwrap();
    let min = Renderer::new(job, "ml").unwrap().pod_group().unwrap().spec.min_resources.unwrap();
    assert_eq!(min["cpu"].0.as_str(), "3", "{min:?}");
    // No gang, no PodGroup.
    assert!(Renderer::new(full_job(), "team-a").unwrap().pod_group().is_none());
}

#[test]
fn kueue_gang_labels_every_attempt_of_every_pod_into_one_group() {
    let r = Renderer::new(gang_job("kueue"), "ml").unwrap();
    assert!(r.pod_group().is_none());
    assert!(r.manifests(true).iter().all(|m| m.kind() != "PodGroup"));
    for pod in
        [r.pod(Role::Ps, 0, 0), r.pod(Role::Ps, 1, 3), r.pod(Role::Worker, 2, 0), r.pod(Role::Worker, 1, 7)]
    {
        let labels = pod.metadata.labels.clone().unwrap();
        assert_eq!(labels["kueue.x-k8s.io/queue-name"], "team-a");
        assert_eq!(labels["kueue.x-k8s.io/pod-group-name"], "ctr");
        let annotations = pod.metadata.annotations.clone().unwrap();
        assert_eq!(annotations["kueue.x-k8s.io/pod-group-total-count"], "5");
        assert!(!annotations.contains_key("scheduling.volcano.sh/queue-name"));
        assert!(!annotations.contains_key("scheduling.k8s.io/group-name"));
        assert_eq!(pod.spec.unwrap().scheduler_name, None);
    }
}

/// Checks a rendered PodGroup against Volcano's `scheduling.volcano.sh/v1beta1` schema
/// (volcano-sh/apis `pkg/apis/scheduling/v1beta1/types.go`), which `kubernetes-validate`
/// does not have: the kind and version, a namespaced name, `spec.minMember` a positive int32,
/// only spec fields the CRD knows, quantities in `minResources`.
fn check_pod_group(v: &serde_json::Value) {
    assert_eq!(v["apiVersion"], "scheduling.volcano.sh/v1beta1", "{v}");
    assert_eq!(v["kind"], "PodGroup", "{v}");
    let meta = v["metadata"].as_object().unwrap();
    assert!(meta["name"].as_str().is_some_and(|n| !n.is_empty() && n.len() <= 253), "{v}");
    assert!(meta["namespace"].as_str().is_some(), "{v}");
    let spec = v["spec"].as_object().unwrap();
    const KNOWN: [&str; 6] =
        ["minMember", "minTaskMember", "queue", "priorityClassName", "minResources", "networkTopology"];
    for key in spec.keys() {
        assert!(KNOWN.contains(&key.as_str()), "spec.{key} is not a PodGroup field: {v}");
    }
    let min_member = spec["minMember"].as_i64().unwrap();
    assert!((1..=i64::from(i32::MAX)).contains(&min_member), "{v}");
    for key in ["queue", "priorityClassName"] {
        if let Some(value) = spec.get(key) {
            assert!(value.as_str().is_some_and(|s| !s.is_empty()), "{key}: {v}");
        }
    }
    if let Some(resources) = spec.get("minResources") {
        for (name, q) in resources.as_object().unwrap() {
            let q = q.as_str().unwrap_or_else(|| panic!("minResources.{name} is not a quantity string: {v}"));
            let digits = q.trim_end_matches(|c: char| c.is_ascii_alphabetic());
            let suffix = &q[digits.len()..];
            assert!(
                !digits.is_empty()
                    && digits.parse::<u64>().is_ok()
                    && ["", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
                        .contains(&suffix),
                "minResources.{name} = {q:?}: {v}"
            );
        }
    }
    assert!(v.get("status").is_none(), "{v}");
}

#[test]
fn golden_recreated_pods_are_owned_by_the_root() {
    let r = renderer(job(2, 2, 3));
    let pods = vec![
        Manifest::Service(Box::new(r.service())),
        Manifest::Pod(Box::new(r.pod(Role::Ps, 1, 1))),
        Manifest::Pod(Box::new(r.pod(Role::Worker, 0, 2))),
    ];
    golden(&golden_path("owned-restarts.yaml"), &to_yaml(&redacted(&pods)).unwrap());
}

#[test]
fn every_rendered_object_deserializes_back_into_its_type() {
    for (r, detach) in [
        (Renderer::new(job(2, 3, 3), "ml").unwrap(), false),
        (Renderer::new(full_job(), "team-a").unwrap(), true),
        (renderer(job(1, 1, 0)), true),
        (Renderer::new(gang_job("volcano"), "ml").unwrap(), true),
        (Renderer::new(gang_job("kueue"), "ml").unwrap(), false),
    ] {
        let manifests = r.manifests(detach);
        // YAML, document by document, into the type its `kind` names.
        let yaml = to_yaml(&manifests).unwrap();
        assert_eq!(from_yaml(&yaml).unwrap(), manifests);
        // JSON, item by item, into each concrete type.
        let list: serde_json::Value = serde_json::from_str(&to_json(&manifests).unwrap()).unwrap();
        assert_eq!(list["kind"], "List");
        let items = list["items"].as_array().unwrap();
        assert_eq!(items.len(), manifests.len());
        for (item, m) in items.iter().zip(&manifests) {
            let back = match item["kind"].as_str().unwrap() {
                "ConfigMap" => {
                    Manifest::ConfigMap(Box::new(serde_json::from_value::<ConfigMap>(item.clone()).unwrap()))
                }
                "Secret" => {
                    Manifest::Secret(Box::new(serde_json::from_value::<Secret>(item.clone()).unwrap()))
                }
                "Service" => {
                    Manifest::Service(Box::new(serde_json::from_value::<Service>(item.clone()).unwrap()))
                }
                "Pod" => Manifest::Pod(Box::new(serde_json::from_value::<Pod>(item.clone()).unwrap())),
                "Job" => Manifest::Job(Box::new(serde_json::from_value::<BatchJob>(item.clone()).unwrap())),
                "PodGroup" => {
                    Manifest::PodGroup(Box::new(serde_json::from_value::<PodGroup>(item.clone()).unwrap()))
                }
                other => panic!("unexpected kind {other}"),
            };
            assert_eq!(&back, m);
        }
    }
}

#[test]
fn cluster_spec_in_each_pod_is_the_shared_contract() {
    let r = Renderer::new(job(2, 3, 3), "ml").unwrap();
    for (role, index, attempt) in [(Role::Ps, 0, 0), (Role::Ps, 1, 4), (Role::Worker, 2, 1)] {
        let pod = r.pod(role, index, attempt);
        // (`GRADFLOW_TOKEN` has no value: it comes from the job's Secret.)
        let env: Vec<(String, String)> = pod.spec.unwrap().containers[0]
            .env
            .clone()
            .unwrap()
            .into_iter()
            .filter_map(|e| Some((e.name, e.value?)))
            .collect();
        let spec = r.cluster_spec(role, index, attempt);
        // The contract's own variables, in its order, then the launcher's.
        assert_eq!(env[..7], spec.to_env()[..]);
        let parsed = ClusterSpec::from_json(&env[0].1).unwrap();
        assert_eq!(parsed, spec);
        assert_eq!((parsed.role, parsed.index, parsed.attempt), (role, index, attempt));
        assert_eq!(parsed.servers, ["demo-ps-0.demo.ml.svc:7070", "demo-ps-1.demo.ml.svc:7070"]);
        assert_eq!(parsed.num_workers, 3);
        // The job file, with the servers' tensor link on the pods' fixed port.
        let mut job = r.job().clone();
        job.server.link_port = 7071;
        assert_eq!(parsed.job_config, job);
        assert_eq!(gradflow_launch::server_config(&parsed.job_config, 0).settings.link_port, 7071);
        if role == Role::Ps {
            assert_eq!(parsed.listen.as_deref(), Some("0.0.0.0:7070"));
            assert_eq!(parsed.metrics_listen.as_deref(), Some("0.0.0.0:9090"));
        } else {
            assert_eq!(parsed.listen, None);
            // The built-in trainer serves its metrics on the same port.
            assert_eq!(parsed.metrics_listen.as_deref(), Some("0.0.0.0:9090"));
        }
        assert!(env.contains(&("GRADFLOW_LOG".into(), "info".into())));
        assert_eq!(env.iter().any(|(k, _)| k == "GRADFLOW_RESTORE"), role == Role::Ps && attempt > 0);
    }
}

#[test]
fn the_root_records_the_job() {
    let r = Renderer::new(full_job(), "team-a").unwrap();
    let root = r.root(&gradflow_launch::kubernetes::JobStatus::new(r.job()));
    let mut job: JobConfig = serde_json::from_str(&root.data.unwrap()[RECORD_JOB_KEY]).unwrap();
    // The record has the job without the env values, which the job's env Secret holds.
    assert_eq!(job, r.recorded_job());
    assert_ne!(job, *r.job());
    let secret = r.env_secret().unwrap();
    restore_env(&mut job, secret.data.as_ref().unwrap()).unwrap();
    assert_eq!(job, *r.job());
    // The same renderer from the record renders the same pods: `attach` and `launch` agree.
    let again = Renderer::new(job, "team-a").unwrap();
    assert_eq!(again.pod(Role::Worker, 1, 3), r.pod(Role::Worker, 1, 3));
}

/// A job configured the way a platform team would: S3 checkpoints, credentials from a Secret,
/// literal settings, and whole Secrets as variables.
fn job_with_credentials() -> JobConfig {
    parse_job(
        r#"
name = "ctr"
servers = 2
workers = 2
[model]
kind = "logistic_regression"
num_dense = 13
[data]
train = "data/train.csv"
[data.synth]
train_rows = 1000
[checkpoint]
url = "s3://ml-checkpoints/ctr"

[kubernetes]
env = { AWS_REGION = "literal-region-7f3a", AWS_SECRET_ACCESS_KEY = { secret = "s3-credentials", key = "secret-access-key" }, AWS_ACCESS_KEY_ID = { valueFrom = { secretKeyRef = { name = "s3-credentials", key = "access-key-id" } } }, HOST_IP = { valueFrom = { fieldRef = { fieldPath = "status.hostIP" } } } }
env_from = [{ secret = "team-settings", prefix = "TEAM_" }, { configMapRef = { name = "proxy" } }]
[kubernetes.worker]
env = { ONLY_WORKERS = "literal-worker-91c2" }
"#,
    )
    .unwrap()
}

/// The containers of a rendered pod, init containers included.
fn containers(pod: &Pod) -> Vec<&k8s_openapi::api::core::v1::Container> {
    let spec = pod.spec.as_ref().unwrap();
    spec.init_containers.iter().flatten().chain(&spec.containers).collect()
}

#[test]
fn env_values_appear_only_in_the_pod_env_they_were_set_for() {
    let r = Renderer::new(job_with_credentials(), "ml").unwrap();
    let manifests = r.manifests(true);
    for m in &manifests {
        let text = serde_json::to_string(m).unwrap();
        let Manifest::Pod(pod) = m else {
            assert!(!text.contains("literal-"), "{} {} holds an env value", m.kind(), m.name());
            continue;
        };
        let role = pod.metadata.labels.as_ref().unwrap()[LABEL_ROLE].clone();
        for c in containers(pod) {
            let env = c.env.as_ref().unwrap();
            let value = |name: &str| env.iter().find(|e| e.name == name).and_then(|e| e.value.clone());
            let source = |name: &str| env.iter().find(|e| e.name == name).and_then(|e| e.value_from.clone());
            assert_eq!(value("AWS_REGION").as_deref(), Some("literal-region-7f3a"));
            assert_eq!(value("ONLY_WORKERS").is_some(), role == "worker", "{}", c.name);
            // A Secret's value is the kubelet's business: the pod names the key, nothing more.
            assert_eq!(value("AWS_SECRET_ACCESS_KEY"), None);
            let key = source("AWS_SECRET_ACCESS_KEY").unwrap().secret_key_ref.unwrap();
            assert_eq!((key.name.as_str(), key.key.as_str()), ("s3-credentials", "secret-access-key"));
            let key = source("AWS_ACCESS_KEY_ID").unwrap().secret_key_ref.unwrap();
            assert_eq!((key.name.as_str(), key.key.as_str()), ("s3-credentials", "access-key-id"));
            assert_eq!(source("HOST_IP").unwrap().field_ref.unwrap().field_path, "status.hostIP");
            let from = c.env_from.as_ref().unwrap();
            assert_eq!(from[0].secret_ref.as_ref().unwrap().name, "team-settings");
            assert_eq!(from[0].prefix.as_deref(), Some("TEAM_"));
            assert_eq!(from[1].config_map_ref.as_ref().unwrap().name, "proxy");
            // The cluster spec carries the job without the values.
            let spec = value("GRADFLOW_CLUSTER_SPEC").unwrap();
            assert!(!spec.contains("literal-"), "{spec}");
            let parsed = ClusterSpec::from_json(&spec).unwrap();
            assert_eq!(parsed.job_config.kubernetes, r.recorded_job().kubernetes);
            // Besides its own variable, a literal is in no other place of the pod.
            let others = serde_json::to_string(
                &env.iter()
                    .filter(|e| !["AWS_REGION", "ONLY_WORKERS"].contains(&e.name.as_str()))
                    .collect::<Vec<_>>(),
            )
            .unwrap();
            assert!(!others.contains("literal-"), "{others}");
        }
    }
    // The printed forms agree.
    let yaml = to_yaml(&manifests).unwrap();
    assert_eq!(
        yaml.matches("literal-region-7f3a").count(),
        2 + 2 * 2,
        "servers, workers and their init containers"
    );
    assert_eq!(yaml.matches("literal-worker-91c2").count(), 2 * 2);
    // The record names where each value is; only `launch` creates that Secret.
    let recorded = r.recorded_job();
    let env = &recorded.kubernetes.as_ref().unwrap().as_map()["env"];
    assert_eq!(env["AWS_REGION"], serde_json::json!({ "secret": "ctr-env", "key": "env.AWS_REGION" }));
    assert_eq!(
        env["AWS_SECRET_ACCESS_KEY"],
        serde_json::json!({ "secret": "s3-credentials", "key": "secret-access-key" })
    );
    assert!(manifests.iter().all(|m| m.name() != "ctr-env"));
    let secret = r.env_secret().unwrap();
    let keys: Vec<&String> = secret.data.as_ref().unwrap().keys().collect();
    assert_eq!(keys, ["env.AWS_REGION", "worker.env.ONLY_WORKERS"]);
    assert_eq!(secret.immutable, Some(true));
}

#[test]
fn a_job_without_literal_env_values_needs_no_env_secret() {
    let r = Renderer::new(job(1, 1, 0), "ml").unwrap();
    assert_eq!(r.env_secret(), None);
    assert_eq!(r.recorded_job(), *r.job());
}

#[test]
fn labels_and_owner_references_tie_everything_to_the_root() {
    let r = renderer(job(2, 2, 3));
    // And the PodGroup of the same job gang-scheduled by Volcano.
    let group = renderer(job_with(2, 2, 3, VOLCANO)).pod_group().unwrap();
    let manifests: Vec<Manifest> =
        r.manifests(true).into_iter().chain([Manifest::PodGroup(Box::new(group))]).collect();
    for m in &manifests {
        let meta = match m {
            Manifest::ConfigMap(o) => &o.metadata,
            Manifest::Secret(o) => &o.metadata,
            Manifest::Service(o) => &o.metadata,
            Manifest::Pod(o) => &o.metadata,
            Manifest::Job(o) => &o.metadata,
            Manifest::PodGroup(o) => &o.metadata,
        };
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(labels["app.kubernetes.io/name"], "gradflow");
        assert_eq!(labels["app.kubernetes.io/instance"], "demo");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "gradflow");
        assert_eq!(meta.namespace.as_deref(), Some("ml"));
        if let Manifest::ConfigMap(_) = m {
            assert_eq!(meta.owner_references, None, "the root owns, it is not owned");
            continue;
        }
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("ConfigMap", "demo", ROOT_UID)
        );
        assert_eq!((owner.controller, owner.block_owner_deletion), (Some(true), Some(true)));
        if let Manifest::Pod(pod) = m {
            let (role, index) = (&labels[LABEL_ROLE], &labels[LABEL_INDEX]);
            assert_eq!(labels[LABEL_JOB], "demo");
            assert_eq!(labels[LABEL_ATTEMPT], "0");
            assert_eq!(labels["app.kubernetes.io/component"], *role);
            let spec = pod.spec.as_ref().unwrap();
            assert_eq!(spec.hostname.as_deref(), Some(format!("demo-{role}-{index}").as_str()));
            assert_eq!(spec.subdomain.as_deref(), Some("demo"));
            assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        }
    }
    // The Service selects the job's pods, and publishes them before they are ready.
    let svc = r.service();
    let spec = svc.spec.unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.publish_not_ready_addresses, Some(true));
    assert_eq!(spec.selector.unwrap()[LABEL_JOB], "demo");
    // The controller's Job is not selected by it.
    let controller = r.controller_job();
    let template_labels = controller.spec.unwrap().template.metadata.unwrap().labels.unwrap();
    assert!(!template_labels.contains_key(LABEL_JOB));
}

/// Where each container of a pod gets `GRADFLOW_TOKEN`: `(container, secret, key)`.
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

#[test]
fn pods_read_the_token_from_the_jobs_secret_and_no_manifest_holds_it() {
    // A job whose token is known (a token file), with synthetic data (an init container).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "rendered-never-0123456789abcdef").unwrap();
    let mut job = full_job();
    job.auth.token_file = Some(file);
    let token = job.auth.token().unwrap().unwrap();
    let r = Renderer::new(job, "team-a").unwrap();
    let manifests = r.manifests(true);

    // The Secret comes right after the root, before anything that reads it, and has no data.
    let kinds: Vec<&str> = manifests.iter().map(Manifest::kind).collect();
    assert_eq!(kinds[..3], ["ConfigMap", "Secret", "Service"]);
    let Manifest::Secret(secret) = &manifests[1] else { unreachable!() };
    assert_eq!(secret.metadata.name.as_deref(), Some("ctr-token"));
    assert_eq!(secret.type_.as_deref(), Some("Opaque"));
    assert_eq!((&secret.data, &secret.string_data, secret.immutable), (&None, &None, None));
    let note = &secret.metadata.annotations.as_ref().unwrap()[ANNOTATION_TOKEN];
    assert!(
        note.contains(
            "kubectl create secret generic ctr-token -n team-a --from-literal=token=$(openssl rand -hex 32)"
        ),
        "{note}"
    );

    // Servers and workers read it; the init container that writes synthetic data does not.
    let pods: Vec<&Pod> = manifests
        .iter()
        .filter_map(|m| match m {
            Manifest::Pod(p) => Some(&**p),
            _ => None,
        })
        .collect();
    assert_eq!(pods.len(), 4);
    for pod in pods {
        let role = &pod.metadata.labels.as_ref().unwrap()[LABEL_ROLE];
        assert_eq!(token_refs(pod), [(role.clone(), "ctr-token".to_string(), "token".to_string())]);
    }

    // Neither printed form holds the token; the YAML says how to create the Secret.
    let yaml = to_yaml(&manifests).unwrap();
    let json = to_json(&manifests).unwrap();
    assert!(!yaml.contains(token.expose()) && !json.contains(token.expose()));
    assert!(
        yaml.contains("#   kubectl create secret generic ctr-token -n team-a --from-literal=token=$(openssl rand -hex 32)\n"),
        "{yaml}"
    );
    assert_eq!(from_yaml(&yaml).unwrap(), manifests);

    // What `launch` creates holds it, as the API wants it (base64 in `data`).
    let real = r.token_secret(Some(&token));
    assert_eq!(real.data.as_ref().unwrap()["token"].0, token.expose().as_bytes());
    assert_eq!((real.immutable, &real.metadata.annotations), (Some(true), &None));
    let as_json = serde_json::to_value(&real).unwrap();
    assert_eq!(as_json["data"]["token"], "cmVuZGVyZWQtbmV2ZXItMDEyMzQ1Njc4OWFiY2RlZg==");
    let other = Token::new("another-token-0123456789").unwrap();
    assert_ne!(r.token_secret(Some(&other)).data, real.data);
}

#[test]
fn auth_disabled_renders_no_secret_and_no_token_variable() {
    let mut job = full_job();
    job.auth.enabled = false;
    let r = Renderer::new(job, "team-a").unwrap();
    for m in r.manifests(true) {
        assert_ne!(m.kind(), "Secret");
        if let Manifest::Pod(pod) = &m {
            assert_eq!(token_refs(pod), [], "{}", m.name());
        }
    }
    assert!(!to_yaml(&r.manifests(false)).unwrap().contains("GRADFLOW_TOKEN"));
}

#[test]
fn a_queue_sets_what_kueue_and_volcano_read() {
    let r = Renderer::new(full_job(), "team-a").unwrap();
    let pod = r.pod(Role::Worker, 0, 0);
    assert_eq!(pod.metadata.labels.unwrap()["kueue.x-k8s.io/queue-name"], "team-a-queue");
    assert_eq!(pod.metadata.annotations.unwrap()["scheduling.volcano.sh/queue-name"], "team-a-queue");
    assert_eq!(pod.spec.unwrap().scheduler_name.as_deref(), Some("volcano"));
}

/// The QoS class Kubernetes gives a pod: Guaranteed when every container requests and limits
/// the same CPU and memory, BestEffort when none asks for anything, else Burstable.
fn qos_class(pod: &Pod) -> &'static str {
    let spec = pod.spec.as_ref().unwrap();
    let all: Vec<_> = spec.init_containers.iter().flatten().chain(&spec.containers).collect();
    let guaranteed = all.iter().all(|c| {
        let Some(r) = &c.resources else { return false };
        ["cpu", "memory"].iter().all(|k| {
            let limit = r.limits.as_ref().and_then(|l| l.get(*k));
            limit.is_some() && r.requests.as_ref().and_then(|q| q.get(*k)).is_none_or(|q| Some(q) == limit)
        })
    });
    let none = all.iter().all(|c| c.resources.is_none());
    if guaranteed {
        "Guaranteed"
    } else if none {
        "BestEffort"
    } else {
        "Burstable"
    }
}

#[test]
fn servers_are_guaranteed_spread_over_nodes_and_gpus_go_to_workers() {
    // Defaults: servers Guaranteed, workers as the job file says (nothing: BestEffort).
    let r = Renderer::new(job(2, 2, 3), "ml").unwrap();
    let ps = r.pod(Role::Ps, 1, 2);
    assert_eq!(qos_class(&ps), "Guaranteed");
    let res = ps.spec.as_ref().unwrap().containers[0].resources.clone().unwrap();
    assert_eq!(res.limits.as_ref().unwrap()["cpu"].0, "1");
    assert_eq!(res.limits.as_ref().unwrap()["memory"].0, "2Gi");
    assert_eq!(qos_class(&r.pod(Role::Worker, 0, 0)), "BestEffort");
    let spread = ps.spec.as_ref().unwrap().topology_spread_constraints.clone().unwrap();
    assert_eq!(spread.len(), 1);
    assert_eq!((spread[0].max_skew, spread[0].topology_key.as_str()), (1, "kubernetes.io/hostname"));
    assert_eq!(spread[0].when_unsatisfiable, "ScheduleAnyway");
    let selector = spread[0].label_selector.as_ref().unwrap().match_labels.clone().unwrap();
    assert_eq!(selector.len(), 2);
    assert_eq!((selector[LABEL_JOB].as_str(), selector[LABEL_ROLE].as_str()), ("demo", "ps"));
    // The selector matches the server pods of every attempt, and no worker.
    for pod in [r.pod(Role::Ps, 0, 0), ps.clone()] {
        let labels = pod.metadata.labels.unwrap();
        assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
    }
    let worker_labels = r.pod(Role::Worker, 0, 0).metadata.labels.unwrap();
    assert!(!selector.iter().all(|(k, v)| worker_labels.get(k) == Some(v)));
    assert_eq!(r.pod(Role::Worker, 0, 0).spec.unwrap().topology_spread_constraints, None);

    // The full job: servers stay Guaranteed with their own sizes; the GPU is the workers'
    // request and limit, and not their init container's.
    let r = Renderer::new(full_job(), "team-a").unwrap();
    let ps = r.pod(Role::Ps, 0, 0);
    assert_eq!(qos_class(&ps), "Guaranteed");
    // `active_deadline`, on every pod of the job.
    assert_eq!(ps.spec.as_ref().unwrap().active_deadline_seconds, Some(24 * 3600));
    assert_eq!(r.pod(Role::Worker, 1, 2).spec.unwrap().active_deadline_seconds, Some(24 * 3600));
    let res = ps.spec.as_ref().unwrap().containers[0].resources.clone().unwrap();
    assert_eq!(
        (res.requests.as_ref().unwrap()["cpu"].0.as_str(), res.limits.as_ref().unwrap()["cpu"].0.as_str()),
        ("4", "4")
    );
    assert_eq!(res.limits.as_ref().unwrap()["memory"].0, "16Gi");
    assert!(!res.limits.unwrap().contains_key("nvidia.com/gpu"));
    let worker = r.pod(Role::Worker, 0, 0);
    let spec = worker.spec.as_ref().unwrap();
    let res = spec.containers[0].resources.clone().unwrap();
    assert_eq!(res.requests.as_ref().unwrap()["nvidia.com/gpu"].0, "1");
    assert_eq!(res.limits.as_ref().unwrap()["nvidia.com/gpu"].0, "1");
    assert!(!res.limits.unwrap().contains_key("cpu"), "no CPU limit on workers unless asked");
    let init = spec.init_containers.as_ref().unwrap()[0].resources.clone().unwrap();
    assert!(!init.requests.unwrap().contains_key("nvidia.com/gpu"));
    assert_eq!(qos_class(&worker), "Burstable");

    // `server_spread`: required, or none.
    let with = |extra: &str| {
        let job = parse_job(&format!(
            "name = \"ctr\"\nservers = 3\n[model]\nkind = \"logistic_regression\"\n[data]\ntrain = \"t.csv\"\n{extra}"
        ))
        .unwrap();
        Renderer::new(job, "ml").unwrap().pod(Role::Ps, 0, 0).spec.unwrap().topology_spread_constraints
    };
    assert_eq!(
        with("[kubernetes]\nserver_spread = \"require\"").unwrap()[0].when_unsatisfiable,
        "DoNotSchedule"
    );
    assert_eq!(with("[kubernetes]\nserver_spread = \"none\""), None);
    // A CPU limit above the request makes servers Burstable, as asked.
    let job = parse_job(
        "name = \"ctr\"\n[model]\nkind = \"logistic_regression\"\n[data]\ntrain = \"t.csv\"\n[kubernetes.ps]\ncpu = 2\ncpu_limit = 4\n",
    )
    .unwrap();
    assert_eq!(qos_class(&Renderer::new(job, "ml").unwrap().pod(Role::Ps, 0, 0)), "Burstable");
}

#[test]
fn deploy_manifests_of_the_wide_deep_example_match_the_renderer() {
    // What `gradflow launch --backend kubernetes --dry-run -o yaml examples/wide_deep.toml`
    // prints (no namespace given: "default").
    let root = Path::new(MANIFEST_DIR).join("../..");
    let job = load_job(&root.join("examples/wide_deep.toml")).unwrap();
    let r = Renderer::new(job, "default").unwrap();
    let yaml = to_yaml(&r.manifests(false)).unwrap();
    let path = root.join("deploy/manifests/wide-deep.yaml");
    if std::env::var_os("UPDATE_GOLDEN").is_none() {
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == yaml,
            "deploy/manifests/wide-deep.yaml is not what the renderer produces; regenerate it with\n  \
             cargo run -p gradflow-cli -- launch --backend kubernetes --dry-run -o yaml examples/wide_deep.toml > deploy/manifests/wide-deep.yaml"
        );
    } else {
        golden(&path, &yaml);
    }
    // And it reads back.
    assert_eq!(from_yaml(&yaml).unwrap(), r.manifests(false));
}

/// A job with `[checkpoint] url = <url>` (and whatever else `extra` adds to the file).
fn checkpointed(url: &str, extra: &str) -> Result<Renderer, String> {
    let job = parse_job(&format!(
        "name = \"ctr\"\nservers = 2\n[model]\nkind = \"logistic_regression\"\n[data]\ntrain = \"data/train.csv\"\n\
         [checkpoint]\nurl = \"{url}\"\n{extra}"
    ))
    .map_err(|e| e.to_string())?;
    Renderer::new(job, "ml").map_err(|e| e.to_string())
}

#[test]
fn checkpoints_on_a_pods_own_filesystem_are_refused_with_the_fix() {
    let err = checkpointed("./ckpt", "").err().unwrap();
    assert!(err.starts_with("checkpoint.url = \"/workspace/ckpt\" is not on shared storage"), "{err}");
    assert!(err.contains("the server pod's own filesystem"), "{err}");
    assert!(err.contains("s3://") && err.contains("PersistentVolumeClaim"), "{err}");
    assert!(err.contains("mountPath = \"/workspace\""), "{err}");
    // A volume that goes with the pod is no better; nor is one the servers cannot write.
    let scratch = "[kubernetes]\nvolumes = [{ name = \"ckpt\", emptyDir = {} }]\n\
                   volume_mounts = [{ name = \"ckpt\", mountPath = \"/workspace/ckpt\" }]\n";
    let err = checkpointed("./ckpt", scratch).err().unwrap();
    assert!(err.contains("volume \"ckpt\" is neither a persistentVolumeClaim nor nfs"), "{err}");
    let read_only = "[kubernetes]\nvolumes = [{ name = \"ckpt\", persistentVolumeClaim = { claimName = \"ckpt\" } }]\n\
                     volume_mounts = [{ name = \"ckpt\", mountPath = \"/workspace/ckpt\", readOnly = true }]\n";
    assert!(checkpointed("./ckpt", read_only).err().unwrap().contains("readOnly"));
    // Mounted on the workers only: the servers, who write checkpoints, do not see it.
    let workers_only = "[kubernetes.worker]\nvolumes = [{ name = \"ckpt\", persistentVolumeClaim = { claimName = \"ckpt\" } }]\n\
                        volume_mounts = [{ name = \"ckpt\", mountPath = \"/workspace/ckpt\" }]\n";
    assert!(checkpointed("./ckpt", workers_only).err().unwrap().contains("own filesystem"));
    assert!(checkpointed("memory://ckpt", "").err().unwrap().contains("memory:// lives in one process"));
    // `restore` from a path is held to the same rule.
    let job = parse_job(
        "name = \"ctr\"\nrestore = \"file:///workspace/archive/ckpt-000000001200\"\n[model]\nkind = \"logistic_regression\"\n\
         [data]\ntrain = \"data/train.csv\"\n",
    )
    .unwrap();
    let err = Renderer::new(job, "ml").err().unwrap().to_string();
    assert!(
        err.starts_with("restore = \"/workspace/archive/ckpt-000000001200\" is not on shared storage"),
        "{err}"
    );
}

#[test]
fn checkpoints_in_an_object_store_or_on_a_shared_volume_render() {
    for url in ["s3://ml-checkpoints/ctr", "gs://b/ctr", "az://c/ctr"] {
        checkpointed(url, "").unwrap();
    }
    for volume in [
        "persistentVolumeClaim = { claimName = \"ckpt\" }",
        "nfs = { server = \"nfs.example.com\", path = \"/exports/ckpt\" }",
    ] {
        let mounted = format!(
            "[kubernetes]\nvolumes = [{{ name = \"ckpt\", {volume} }}]\n\
             volume_mounts = [{{ name = \"ckpt\", mountPath = \"/workspace/shared\" }}]\n"
        );
        let r = checkpointed("./shared/ckpt", &mounted).unwrap();
        let pod = r.pod(Role::Ps, 1, 1);
        let mounts = pod.spec.unwrap().containers[0].volume_mounts.clone().unwrap();
        assert!(mounts.iter().any(|m| m.mount_path == "/workspace/shared"));
    }
    // Without a [checkpoint] section nothing is restored, and nothing needs to be shared.
    let job = parse_job(
        "name = \"ctr\"\n[model]\nkind = \"logistic_regression\"\n[data]\ntrain = \"data/train.csv\"\n",
    )
    .unwrap();
    Renderer::new(job, "ml").unwrap();
}

/// Kubernetes versions the rendered objects are validated against: the two newest that
/// `kubernetes-validate` 1.37.0 (pinned in `.ci/run`) knows, and one a year older.
const SCHEMA_VERSIONS: [&str; 3] = ["1.37.0", "1.36.0", "1.34.0"];

#[test]
fn every_render_passes_strict_schema_validation() {
    let installed = std::process::Command::new("kubernetes-validate").arg("--version").output();
    if !installed.is_ok_and(|o| o.status.success()) {
        eprintln!(
            "SKIPPED every_render_passes_strict_schema_validation: kubernetes-validate is not installed \
             (python3 -m pip install kubernetes-validate==1.37.0; CI installs it in .ci/run)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let token = Token::new("validate-only-0123456789abcdef").unwrap();
    let pvc = "[kubernetes]\nvolumes = [{ name = \"shared\", persistentVolumeClaim = { claimName = \"ctr-shared\" } }]\n\
               volume_mounts = [{ name = \"shared\", mountPath = \"/workspace/shared\" }]\n";
    let renderers = [
        ("minimal", Renderer::new(job(2, 2, 3), "ml").unwrap()),
        ("owned", renderer(job(2, 3, 3))),
        ("full", Renderer::new(full_job(), "team-a").unwrap()),
        ("credentials", Renderer::new(job_with_credentials(), "ml").unwrap()),
        ("pvc-checkpoints", checkpointed("./shared/ckpt", pvc).unwrap()),
        ("gang-volcano", Renderer::new(gang_job("volcano"), "ml").unwrap()),
        ("gang-kueue", Renderer::new(gang_job("kueue"), "ml").unwrap()),
    ];
    let mut pod_groups = 0;
    let mut files = Vec::new();
    for (name, r) in &renderers {
        // What `--dry-run` prints, detached, plus what only `launch` creates (the Secrets with
        // data) and pods of later attempts.
        let mut manifests = r.manifests(true);
        manifests.push(Manifest::Secret(Box::new(r.token_secret(Some(&token)))));
        manifests.extend(r.env_secret().map(|s| Manifest::Secret(Box::new(s))));
        manifests.push(Manifest::Pod(Box::new(r.pod(Role::Ps, 0, 2))));
        manifests.push(Manifest::Pod(Box::new(r.pod(Role::Worker, 0, 1))));
        // kubernetes-validate knows the built-in kinds only (a custom resource is an error
        // under --strict): Volcano's PodGroup is checked against its CRD's fields here.
        for m in manifests.iter().filter(|m| m.is_custom_resource()) {
            check_pod_group(&serde_json::to_value(m).unwrap());
            pod_groups += 1;
        }
        manifests.retain(|m| !m.is_custom_resource());
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, to_yaml(&manifests).unwrap()).unwrap();
        files.push(path);
    }
    assert_eq!(pod_groups, 1, "the gang-volcano render has its PodGroup");
    files.push(Path::new(MANIFEST_DIR).join("../../deploy/manifests/wide-deep.yaml"));
    files.push(Path::new(MANIFEST_DIR).join("../../deploy/rbac.yaml"));
    for version in SCHEMA_VERSIONS {
        let out = std::process::Command::new("kubernetes-validate")
            .args(["--strict", "--quiet", "-k", version])
            .args(&files)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubernetes-validate --strict -k {version} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
