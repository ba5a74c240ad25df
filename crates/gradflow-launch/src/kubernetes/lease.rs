//! Who may act on a job: one `coordination.k8s.io/v1` Lease per job, `<job>-controller`.
//!
//! Passes are safe to repeat, but two controllers acting at once (a foreground `launch` and
//! an `attach` started by mistake, or a detached controller's pod rescheduled while the old
//! one still runs) would race on every decision: both create the next attempt of a failed
//! worker, both delete pods, and their record writes conflict on every pass. So a controller
//! acts (creates or deletes pods, writes the record) only while it holds the job's Lease; a
//! second controller of the same job waits and says who holds it.
//!
//! The protocol is the one of client-go's leader election, on the Lease's own fields:
//!
//! - **Acquire**: create the Lease if there is none (`holderIdentity` = this controller,
//!   `leaseDurationSeconds`, `acquireTime` and `renewTime` = now, `leaseTransitions` = 0). A
//!   Lease with no holder (released) is taken at once; one held by someone else only once it
//!   has expired, and taking it counts a transition.
//! - **Renew**: every third of the lease duration, rewrite `renewTime`. A holder that could
//!   not renew for two thirds of the duration stops acting before anyone may take over.
//! - **Release**: at a clean exit, clear `holderIdentity`, so that the next controller takes
//!   over without waiting.
//!
//! Every write is a replace conditional on the `resourceVersion` that was read (a create
//! when there was nothing to read), so of two controllers racing for the same Lease exactly
//! one wins; the other gets `409 Conflict`, reads the Lease again and finds it held.
//!
//! **Expiry** is judged as client-go judges it: by this process's own clock, from when it
//! first saw the Lease's current version, never by comparing `renewTime` with the local wall
//! clock, so clocks that disagree between machines cannot make a live holder look expired. A
//! controller that starts next to a dead holder therefore waits one lease duration (15 s by
//! default) before taking over. `renewTime` is written for people (`kubectl get lease`) and
//! tools.
//!
//! The Lease is owned by the job's root ConfigMap like everything else, so `gradflow delete`
//! deletes it.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::time::Instant;

use super::render::Renderer;
use super::{KubernetesError, LABEL_CONTROLLER_OF};

type Result<T, E = KubernetesError> = std::result::Result<T, E>;

/// The default lease duration: how long a holder that stopped renewing keeps the job.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);

/// Name of a job's Lease.
pub fn lease_name(job: &str) -> String {
    format!("{job}-controller")
}

/// An identity for this process as a lease holder: host name (the pod's name in a pod),
/// process id and a random tag, so that two controllers never share one.
pub fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "unknown-host".into());
    // A hasher with the process's random keys: 32 random bits without a dependency.
    let tag = std::collections::hash_map::RandomState::new().build_hasher().finish() as u32;
    format!("{host}/pid-{}/{tag:08x}", std::process::id())
}

/// How a Lease, as read, stands for the controller `me`.
#[derive(Debug, Clone, PartialEq)]
pub enum Standing {
    /// No holder (never held, or released): anyone may take it.
    Free,
    /// Held by `me`.
    Mine,
    /// Held by someone else; whether it expired depends on how long it stays unchanged.
    Held { holder: String },
}

/// How `lease` stands for `me`.
pub fn standing(lease: &Lease, me: &str) -> Standing {
    match lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) {
        None | Some("") => Standing::Free,
        Some(h) if h == me => Standing::Mine,
        Some(h) => Standing::Held { holder: h.to_string() },
    }
}

/// The duration a Lease declares, else `fallback`; at least one second.
fn declared_duration(lease: &Lease, fallback: Duration) -> Duration {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.lease_duration_seconds)
        .filter(|&s| s > 0)
        .map_or(fallback, |s| Duration::from_secs(s as u64))
        .max(Duration::from_secs(1))
}

/// `current` (the Lease as read, or `None` to create one) as held by `me` from `now`: a
/// transition is counted when the holder changes, `acquireTime` kept when it does not.
pub fn claimed(
    current: Option<&Lease>,
    meta: ObjectMeta,
    me: &str,
    duration: Duration,
    now: Timestamp,
) -> Lease {
    let old = current.and_then(|l| l.spec.clone()).unwrap_or_default();
    let same_holder = old.holder_identity.as_deref() == Some(me);
    let transitions = old.lease_transitions.unwrap_or(0);
    Lease {
        metadata: current.map_or(meta, |l| l.metadata.clone()),
        spec: Some(LeaseSpec {
            holder_identity: Some(me.to_string()),
            lease_duration_seconds: Some(duration.as_secs().max(1) as i32),
            acquire_time: if same_holder { old.acquire_time } else { Some(MicroTime(now)) },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if current.is_none() || same_holder {
                transitions
            } else {
                transitions + 1
            }),
            ..old
        }),
    }
}

/// What an attempt to acquire the Lease found.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Acquire {
    /// This controller holds the Lease now; `from` is the holder whose expired Lease it took
    /// over.
    Acquired { from: Option<String> },
    /// Someone else holds it, or won the race for it (`holder` unknown then): wait.
    Waiting { holder: Option<String>, renewed: Option<Timestamp> },
}

/// What a renewal found.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Renewal {
    Renewed,
    /// Someone else holds the Lease now (`holder`), or it is gone: stop acting.
    Lost {
        holder: Option<String>,
    },
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// One controller's side of the protocol: what it holds, since when, and what it saw.
pub(crate) struct LeaseKeeper {
    api: Api<Lease>,
    name: String,
    meta: ObjectMeta,
    identity: String,
    duration: Duration,
    /// The Lease as this controller last wrote it, while it holds it.
    held: Option<Lease>,
    /// When the request of the last successful write was sent (this process's clock).
    renewed_at: Option<Instant>,
    /// Another holder's Lease version, and when this controller first saw it.
    seen: Option<(String, Instant)>,
}

impl LeaseKeeper {
    pub(crate) fn new(
        api: Api<Lease>,
        renderer: &Renderer,
        identity: &str,
        duration: Duration,
    ) -> LeaseKeeper {
        let job = &renderer.job().name;
        let name = lease_name(job);
        let owner = renderer.owner_uid().map(|uid| OwnerReference {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            name: job.clone(),
            uid: uid.to_string(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        });
        let meta = ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(renderer.namespace().to_string()),
            labels: Some(labels(renderer)),
            owner_references: owner.map(|o| vec![o]),
            ..ObjectMeta::default()
        };
        LeaseKeeper {
            api,
            name,
            meta,
            identity: identity.to_string(),
            duration: duration.max(Duration::from_secs(1)),
            held: None,
            renewed_at: None,
            seen: None,
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn identity(&self) -> &str {
        &self.identity
    }

    /// Whether this controller holds the Lease (it may still have to renew it before acting).
    pub(crate) fn holds(&self) -> bool {
        self.held.is_some()
    }

    /// Whether this controller may act now: it holds the Lease and renewed it less than two
    /// thirds of the duration ago, well before anyone else may take it over.
    pub(crate) fn valid(&self, now: Instant) -> bool {
        self.held.is_some()
            && self.renewed_at.is_some_and(|t| now.saturating_duration_since(t) < self.deadline())
    }

    fn deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// Time between two renewals.
    pub(crate) fn renew_period(&self) -> Duration {
        self.duration / 3
    }

    /// Time between two attempts to acquire a Lease held by someone else.
    pub(crate) fn retry_period(&self) -> Duration {
        (self.duration / 4).min(Duration::from_secs(2))
    }

    /// Stops holding the Lease without writing it (renewals failed past the deadline).
    pub(crate) fn forget(&mut self) {
        self.held = None;
        self.renewed_at = None;
    }

    fn context(&self, what: &str) -> String {
        format!("{what} Lease {}", self.name)
    }

    async fn read(&self) -> Result<Option<Lease>> {
        self.api.get_opt(&self.name).await.map_err(KubernetesError::api(self.context("reading")))
    }

    fn hold(&mut self, lease: Lease, since: Instant) {
        self.held = Some(lease);
        self.renewed_at = Some(since);
        self.seen = None;
    }

    /// Reads the Lease and takes it if it is free, this controller's, or expired.
    pub(crate) async fn acquire(&mut self) -> Result<Acquire> {
        let start = Instant::now();
        let Some(current) = self.read().await? else {
            let lease = claimed(None, self.meta.clone(), &self.identity, self.duration, Timestamp::now());
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(lease) => {
                    self.hold(lease, start);
                    Ok(Acquire::Acquired { from: None })
                }
                // Another controller created it between the read and the create.
                Err(e) if is_status(&e, 409) => self.lost_race().await,
                Err(e) => Err(KubernetesError::api(self.context("creating"))(e)),
            };
        };
        let from = match standing(&current, &self.identity) {
            Standing::Free | Standing::Mine => None,
            Standing::Held { holder } => {
                let version = current.metadata.resource_version.clone().unwrap_or_default();
                let since = match &self.seen {
                    Some((v, t)) if *v == version => *t,
                    _ => {
                        self.seen = Some((version, start));
                        start
                    }
                };
                if start.saturating_duration_since(since) < declared_duration(&current, self.duration) {
                    return Ok(waiting(&current));
                }
                Some(holder)
            }
        };
        let lease =
            claimed(Some(&current), self.meta.clone(), &self.identity, self.duration, Timestamp::now());
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(lease) => {
                self.hold(lease, start);
                Ok(Acquire::Acquired { from })
            }
            // Changed since it was read: renewed by its holder, or taken by a faster controller.
            Err(e) if is_status(&e, 409) => self.lost_race().await,
            Err(e) if is_status(&e, 404) => Ok(Acquire::Waiting { holder: None, renewed: None }),
            Err(e) => Err(KubernetesError::api(self.context("taking over"))(e)),
        }
    }

    /// After a 409: who has the Lease now. Starts its expiry clock afresh.
    async fn lost_race(&mut self) -> Result<Acquire> {
        let now = Instant::now();
        Ok(match self.read().await? {
            Some(lease) => {
                self.seen = Some((lease.metadata.resource_version.clone().unwrap_or_default(), now));
                match standing(&lease, &self.identity) {
                    Standing::Held { .. } => waiting(&lease),
                    // Released again at once, or (cannot be) ours: try again on the next round.
                    _ => Acquire::Waiting { holder: None, renewed: None },
                }
            }
            None => Acquire::Waiting { holder: None, renewed: None },
        })
    }

    /// Rewrites `renewTime` of the held Lease. An API error other than a conflict is returned:
    /// the caller keeps acting until [`valid`](Self::valid) says otherwise.
    pub(crate) async fn renew(&mut self) -> Result<Renewal> {
        for _ in 0..2 {
            let Some(mut lease) = self.held.clone() else { return Ok(Renewal::Lost { holder: None }) };
            let start = Instant::now();
            if let Some(spec) = lease.spec.as_mut() {
                spec.renew_time = Some(MicroTime(Timestamp::now()));
            }
            match self.api.replace(&self.name, &PostParams::default(), &lease).await {
                Ok(lease) => {
                    self.hold(lease, start);
                    return Ok(Renewal::Renewed);
                }
                Err(e) if is_status(&e, 409) => match self.read().await? {
                    // Changed by someone, but still ours (an annotation?): renew that version.
                    Some(l) if standing(&l, &self.identity) == Standing::Mine => self.held = Some(l),
                    other => {
                        self.forget();
                        let holder = other.and_then(|l| match standing(&l, &self.identity) {
                            Standing::Held { holder } => Some(holder),
                            _ => None,
                        });
                        return Ok(Renewal::Lost { holder });
                    }
                },
                Err(e) if is_status(&e, 404) => {
                    self.forget();
                    return Ok(Renewal::Lost { holder: None });
                }
                Err(e) => return Err(KubernetesError::api(self.context("renewing"))(e)),
            }
        }
        self.forget();
        Ok(Renewal::Lost { holder: None })
    }

    /// Clears the holder of the held Lease, so that the next controller need not wait for it
    /// to expire. A Lease changed or deleted meanwhile is left alone.
    pub(crate) async fn release(&mut self) -> Result<()> {
        let Some(mut lease) = self.held.take() else { return Ok(()) };
        self.renewed_at = None;
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.renew_time = Some(MicroTime(Timestamp::now()));
        }
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 409) || is_status(&e, 404) => Ok(()),
            Err(e) => Err(KubernetesError::api(self.context("releasing"))(e)),
        }
    }
}

/// The labels of a detached controller's Job (the user's, gradflow's, and
/// [`LABEL_CONTROLLER_OF`] instead of the job label, which only the job's own objects carry).
fn labels(renderer: &Renderer) -> BTreeMap<String, String> {
    let job = renderer.job().name.as_str();
    let mut labels = renderer.settings().labels.clone();
    for (k, v) in [
        ("app.kubernetes.io/name", "gradflow"),
        ("app.kubernetes.io/instance", job),
        ("app.kubernetes.io/component", "controller"),
        ("app.kubernetes.io/managed-by", "gradflow"),
        (LABEL_CONTROLLER_OF, job),
    ] {
        labels.insert(k.into(), v.into());
    }
    labels
}

fn waiting(lease: &Lease) -> Acquire {
    let spec = lease.spec.as_ref();
    Acquire::Waiting {
        holder: spec.and_then(|s| s.holder_identity.clone()).filter(|h| !h.is_empty()),
        renewed: spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, transitions: i32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("demo-controller".into()),
                resource_version: Some("7".into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(Into::into),
                lease_duration_seconds: Some(15),
                acquire_time: Some(MicroTime(Timestamp::from_second(1_000).unwrap())),
                renew_time: Some(MicroTime(Timestamp::from_second(1_010).unwrap())),
                lease_transitions: Some(transitions),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn standing_of_a_lease() {
        assert_eq!(standing(&lease(None, 0), "me"), Standing::Free);
        assert_eq!(standing(&lease(Some(""), 0), "me"), Standing::Free);
        assert_eq!(standing(&lease(Some("me"), 0), "me"), Standing::Mine);
        assert_eq!(standing(&lease(Some("you"), 0), "me"), Standing::Held { holder: "you".into() });
    }

    #[test]
    fn claiming_counts_transitions_and_keeps_the_version() {
        let now = Timestamp::from_second(2_000).unwrap();
        let meta = ObjectMeta { name: Some("demo-controller".into()), ..ObjectMeta::default() };
        let new = claimed(None, meta, "me", Duration::from_secs(15), now);
        let spec = new.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("me"));
        assert_eq!((spec.lease_duration_seconds, spec.lease_transitions), (Some(15), Some(0)));
        assert_eq!((spec.acquire_time.unwrap().0, spec.renew_time.unwrap().0), (now, now));

        // Taken over: one more transition, acquired now; the version read is kept, so the
        // write is conditional on it.
        let taken =
            claimed(Some(&lease(Some("you"), 2)), ObjectMeta::default(), "me", Duration::from_secs(9), now);
        assert_eq!(taken.metadata.resource_version.as_deref(), Some("7"));
        let spec = taken.spec.unwrap();
        assert_eq!((spec.lease_transitions, spec.lease_duration_seconds), (Some(3), Some(9)));
        assert_eq!(spec.acquire_time.unwrap().0, now);

        // Released (no holder): taking it is a transition too.
        let spec = claimed(Some(&lease(None, 2)), ObjectMeta::default(), "me", Duration::from_secs(15), now)
            .spec
            .unwrap();
        assert_eq!(spec.lease_transitions, Some(3));

        // Already ours: nothing but the renewal changes.
        let spec =
            claimed(Some(&lease(Some("me"), 2)), ObjectMeta::default(), "me", Duration::from_secs(15), now)
                .spec
                .unwrap();
        assert_eq!(spec.lease_transitions, Some(2));
        assert_eq!(spec.acquire_time.unwrap().0, Timestamp::from_second(1_000).unwrap());
        assert_eq!(spec.renew_time.unwrap().0, now);
    }

    #[test]
    fn a_declared_duration_of_zero_or_none_falls_back() {
        let mut l = lease(Some("you"), 0);
        assert_eq!(declared_duration(&l, Duration::from_secs(3)), Duration::from_secs(15));
        l.spec.as_mut().unwrap().lease_duration_seconds = Some(0);
        assert_eq!(declared_duration(&l, Duration::from_secs(3)), Duration::from_secs(3));
        l.spec.as_mut().unwrap().lease_duration_seconds = None;
        assert_eq!(declared_duration(&l, Duration::from_millis(10)), Duration::from_secs(1));
    }

    #[test]
    fn identities_differ_between_keepers_of_one_process() {
        let (a, b) = (default_identity(), default_identity());
        assert_ne!(a, b);
        assert!(a.contains(&format!("/pid-{}/", std::process::id())), "{a}");
    }
}
