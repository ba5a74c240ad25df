//! Gang scheduling: what makes a batch scheduler admit a job's pods as one unit
//! (`kubernetes.gang`, see [`Gang`]).
//!
//! A parameter-server job runs only when every server and every worker runs. Scheduled pod by
//! pod, a job that does not fit starts some of its pods, which hold their nodes while they
//! wait for the rest (Kubeflow training-operator #1264); two such jobs can block each other
//! for good. A gang scheduler admits all of a job's pods or none:
//!
//! - **Volcano**: a [`PodGroup`] (`scheduling.volcano.sh/v1beta1`) named after the job, with
//!   `minMember` = servers + workers, which the launcher creates (owned by the job's root,
//!   like everything else) before any pod; every pod names it in the
//!   [`ANNOTATION_VOLCANO_GROUP`] annotation and runs under `schedulerName: volcano`.
//!   Schema: volcano-sh/apis, `pkg/apis/scheduling/v1beta1/types.go` and `labels.go`.
//! - **Kueue**: the plain-pod integration's pod group. Every pod carries the
//!   `kueue.x-k8s.io/queue-name` and [`LABEL_KUEUE_GROUP`] labels and the
//!   [`ANNOTATION_KUEUE_GROUP_TOTAL_COUNT`] annotation; Kueue makes one Workload of the group
//!   (named after it) and ungates its pods when the Workload is admitted. No object to create:
//!   Kueue's webhook and controller do the rest. Names: kubernetes-sigs/kueue,
//!   `pkg/controller/jobs/pod/constants/constants.go`; behaviour: Kueue's "Run Plain Pods"
//!   task page.
//!
//! Both groups are named after the job ([`group_name`]), and neither needs anything from the
//! controller when a pod is replaced: a recreated pod carries the same group metadata, so
//! Volcano schedules it into the running group and Kueue counts it as the replacement of the
//! failed one.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

pub use super::config::{Gang, VOLCANO_SCHEDULER};

/// The API group and version of Volcano's PodGroup.
pub const PODGROUP_API_VERSION: &str = "scheduling.volcano.sh/v1beta1";
/// Pod annotation naming the Volcano PodGroup the pod belongs to (`KubeGroupNameAnnotationKey`).
pub const ANNOTATION_VOLCANO_GROUP: &str = "scheduling.k8s.io/group-name";
/// Pod label naming the Kueue pod group.
pub const LABEL_KUEUE_GROUP: &str = "kueue.x-k8s.io/pod-group-name";
/// Pod annotation: how many pods the Kueue pod group has.
pub const ANNOTATION_KUEUE_GROUP_TOTAL_COUNT: &str = "kueue.x-k8s.io/pod-group-total-count";

/// Pod annotation that, set to `"false"` on a pod of a Kueue pod group, tells Kueue the group
/// will not be retried: once none of its pods runs, Kueue finishes its Workload (releasing
/// its quota) and removes its finalizers from the pods.
pub const ANNOTATION_KUEUE_RETRIABLE_IN_GROUP: &str = "kueue.x-k8s.io/retriable-in-group";
/// The finalizer Kueue puts on the pods it manages; it keeps a deleted pod of a group until
/// Kueue lets it go.
pub const KUEUE_FINALIZER: &str = "kueue.x-k8s.io/managed";
/// The pod condition Kueue sets on the pods it stops (its Workload was preempted or evicted):
/// a disruption, like Kubernetes' own `DisruptionTarget`.
pub const CONDITION_KUEUE_TERMINATION_TARGET: &str = "TerminationTarget";
/// The API group and version of Kueue's Workload.
pub const KUEUE_API_VERSION: &str = "kueue.x-k8s.io/v1beta1";

/// The name of a job's PodGroup (Volcano) or pod group (Kueue, which also names its Workload
/// so): the job's name.
pub fn group_name(job: &str) -> String {
    job.to_string()
}

/// A Volcano PodGroup: only the fields gradflow sets (and, read back, the status it ignores).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodGroup {
    /// Always [`PODGROUP_API_VERSION`].
    pub api_version: String,
    /// Always `PodGroup`.
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: PodGroupSpec,
    /// Written by Volcano; never sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

/// The part of a PodGroup's spec gradflow sets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodGroupSpec {
    /// Pods that must be placeable together before any of them is bound: servers + workers.
    pub min_member: i32,
    /// Volcano queue (`kubernetes.queue`); Volcano's `default` queue when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// `kubernetes.priority_class`: the group's priority in its queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// The sum of every pod's requests, which the queue must have room for before the group
    /// is enqueued; absent when no pod requests anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_resources: Option<BTreeMap<String, Quantity>>,
}

impl PodGroup {
    /// A PodGroup with these metadata and spec.
    pub fn new(metadata: ObjectMeta, spec: PodGroupSpec) -> PodGroup {
        PodGroup {
            api_version: PODGROUP_API_VERSION.into(),
            kind: "PodGroup".into(),
            metadata,
            spec,
            status: None,
        }
    }
}

impl kube::Resource for PodGroup {
    type DynamicType = ();
    type Scope = kube::core::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "PodGroup".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "scheduling.volcano.sh".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1beta1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "podgroups".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The sum of `count` times each of `requests` (resource name to quantity), per resource, as
/// quantities Kubernetes reads back to the same value: whole CPUs or millicores, memory in
/// the unit (binary or decimal) that divides it exactly and leaves the smallest number. `requests` were accepted
/// by the `[kubernetes]` checks.
pub fn sum_requests<'a>(
    requests: impl IntoIterator<Item = (u32, &'a BTreeMap<String, Quantity>)>,
) -> BTreeMap<String, Quantity> {
    let mut total: BTreeMap<String, f64> = BTreeMap::new();
    for (count, map) in requests {
        for (resource, q) in map {
            *total.entry(resource.clone()).or_default() +=
                f64::from(count) * super::config::quantity_value(&q.0);
        }
    }
    total.into_iter().map(|(resource, value)| (resource, Quantity(format_quantity(value)))).collect()
}

/// `value` (in base units) as a quantity: an integer with the suffix that keeps it exact and
/// short, else millis (CPU).
fn format_quantity(value: f64) -> String {
    // Quantities are decimal numbers of at most 3 fractional digits in practice; round off the
    // float's noise at a thousandth of a unit.
    let millis = (value * 1000.0).round() as u128;
    if !millis.is_multiple_of(1000) {
        return format!("{millis}m");
    }
    let whole = millis / 1000;
    if whole == 0 {
        return "0".into();
    }
    const BINARY: [(&str, u128); 6] = [
        ("Ei", 1 << 60),
        ("Pi", 1 << 50),
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    const DECIMAL: [(&str, u128); 6] = [
        ("E", 1_000_000_000_000_000_000),
        ("P", 1_000_000_000_000_000),
        ("T", 1_000_000_000_000),
        ("G", 1_000_000_000),
        ("M", 1_000_000),
        ("k", 1_000),
    ];
    // Small counts (CPUs, GPUs) stay plain numbers; bytes get a unit.
    if whole < 1 << 10 {
        return whole.to_string();
    }
    // The exact unit that leaves the smallest number: 17Gi, 4G, 5632Mi.
    BINARY
        .iter()
        .chain(&DECIMAL)
        .filter(|(_, unit)| whole.is_multiple_of(*unit))
        .min_by_key(|(_, unit)| whole / unit)
        .map_or_else(|| whole.to_string(), |(suffix, unit)| format!("{}{suffix}", whole / unit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests(pairs: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
        pairs.iter().map(|(k, v)| (k.to_string(), Quantity(v.to_string()))).collect()
    }

    #[test]
    fn requests_add_up_per_resource_in_exact_units() {
        let ps = requests(&[("cpu", "1"), ("memory", "2Gi")]);
        let worker = requests(&[("cpu", "500m"), ("memory", "512Mi"), ("nvidia.com/gpu", "1")]);
        let sum = sum_requests([(2, &ps), (3, &worker)]);
        assert_eq!(sum["cpu"].0, "3500m");
        assert_eq!(sum["memory"].0, "5632Mi");
        assert_eq!(sum["nvidia.com/gpu"].0, "3");
        let sum = sum_requests([(4, &requests(&[("cpu", "250m"), ("memory", "1G")]))]);
        assert_eq!((sum["cpu"].0.as_str(), sum["memory"].0.as_str()), ("1", "4G"));
        assert_eq!(sum_requests([(3, &requests(&[("memory", "1000")]))])["memory"].0, "3k");
        assert!(sum_requests([(0, &ps)]).values().all(|q| q.0 == "0"));
    }

    #[test]
    fn a_pod_group_serializes_with_volcanos_field_names() {
        let spec = PodGroupSpec {
            min_member: 5,
            queue: Some("q".into()),
            priority_class_name: None,
            min_resources: Some(requests(&[("cpu", "3")])),
        };
        let pg = PodGroup::new(ObjectMeta { name: Some("demo".into()), ..ObjectMeta::default() }, spec);
        let v = serde_json::to_value(&pg).unwrap();
        assert_eq!(v["apiVersion"], "scheduling.volcano.sh/v1beta1");
        assert_eq!(v["kind"], "PodGroup");
        assert_eq!(
            v["spec"],
            serde_json::json!({ "minMember": 5, "queue": "q", "minResources": { "cpu": "3" } })
        );
        assert!(v.get("status").is_none());
        let back: PodGroup = serde_json::from_value(v).unwrap();
        assert_eq!(back, pg);
        use kube::Resource;
        assert_eq!(
            PodGroup::url_path(&(), Some("ml")),
            "/apis/scheduling.volcano.sh/v1beta1/namespaces/ml/podgroups"
        );
    }
}
