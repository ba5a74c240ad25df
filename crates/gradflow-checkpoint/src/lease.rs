//! Who owns a folder or a checkpoint root while a job runs: a [`Lease`], so that a second run
//! of the same job cannot write into it at the same time, and [`archive`], which moves a
//! previous run's checkpoints aside for a fresh start.
//!
//! A lease is the object [`LEASE`] at the root, holding its [`Holder`] as JSON:
//!
//! - **A local folder** (a plain path or `file://`): an OS lock (`flock`) on that file. The
//!   kernel drops it when the holding process dies, however it dies, so a lease is never
//!   stale; the file stays behind with the last holder in it.
//! - **An object store** (`s3://`, `gs://`, `az://`, `memory://`): nothing dies with a
//!   process there, so the lease expires. It is created with a conditional create
//!   (`PutMode::Create`), renewed in the background every third of its time to live by a
//!   conditional update on the version it last wrote, and taken over by another run only once
//!   it has expired, again by a conditional update: of two runs that race for it, one wins.
//!   Released, it stays with `released` set, naming the last run.
//!
//! Expiry compares the record's `expires` with this machine's clock: clocks that disagree by
//! more than the time to live ([`LeaseOptions::ttl`], default 60 s) defeat it.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{BEST, CheckpointError, CheckpointStore, LATEST, MANIFEST, parse_checkpoint_dir_name};

/// The lease object's name at the root it guards.
pub const LEASE: &str = "lease.json";
/// The folder under a checkpoint root that [`archive`] moves checkpoints into.
pub const ARCHIVE: &str = "archive";

/// The run that holds (or last held) a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The run's id (`GRADFLOW_RUN_ID`).
    pub run_id: String,
    /// The process that holds it.
    pub pid: u32,
    /// The machine it runs on.
    pub host: String,
    /// When the run took the lease.
    pub since: DateTime<Utc>,
    /// Object stores: when the lease lapses unless renewed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<DateTime<Utc>>,
    /// Object stores: the run gave the lease up; anyone may take it.
    #[serde(default)]
    pub released: bool,
}

impl Holder {
    /// This process, as run `run_id`, from now.
    pub fn this_process(run_id: impl Into<String>, host: impl Into<String>) -> Holder {
        Holder {
            run_id: run_id.into(),
            pid: std::process::id(),
            host: host.into(),
            since: Utc::now(),
            expires: None,
            released: false,
        }
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "run {} (pid {} on {}, since {})",
            self.run_id,
            self.pid,
            self.host,
            self.since.format("%Y-%m-%d %H:%M:%S UTC")
        )
    }
}

/// Why a lease was not taken.
#[derive(Debug, Error)]
pub enum LeaseError {
    /// Another run holds it.
    #[error("`{url}` is in use by {holder}")]
    Held { url: String, holder: Box<Holder> },
    /// Another process holds the lock of a local folder and has not written who it is (yet).
    #[error("`{url}` is in use by another process (its lock file `{}` names no holder)", .lock.display())]
    HeldUnknown { url: String, lock: PathBuf },
    /// The lock file of a local folder could not be made or locked.
    #[error("cannot lock `{}`: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] CheckpointError),
}

/// How long an object-store lease lives unrenewed, and how often it is renewed.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseOptions {
    /// Default 60 s.
    pub ttl: Duration,
    /// Default a third of `ttl`.
    pub renew_every: Duration,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        LeaseOptions { ttl: Duration::from_secs(60), renew_every: Duration::from_secs(20) }
    }
}

/// A lease held by this process; [`Lease::release`] gives it up (dropping it does too, for a
/// local folder at once, for an object store once it expires).
#[derive(Debug)]
pub struct Lease {
    url: String,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    /// The locked file; closing it unlocks.
    Local { _file: std::fs::File },
    Object {
        store: Arc<dyn ObjectStore>,
        path: ObjPath,
        holder: Holder,
        version: Arc<tokio::sync::Mutex<UpdateVersion>>,
        lost: Arc<AtomicBool>,
        renew: tokio::task::JoinHandle<()>,
    },
}

impl Drop for Kind {
    fn drop(&mut self) {
        if let Kind::Object { renew, .. } = self {
            renew.abort();
        }
    }
}

impl Lease {
    /// Takes the lease of the local folder `dir`, creating it if needed.
    pub fn acquire_dir(dir: &Path, holder: &Holder) -> Result<Lease, LeaseError> {
        let url = dir.display().to_string();
        Ok(Lease { kind: lock_local(dir, &url, holder)?, url })
    }

    /// Takes the lease of checkpoint root `store` (see the module documentation for how,
    /// per kind of store). Must be called inside a tokio runtime: an object-store lease is
    /// renewed by a task on it.
    pub async fn acquire(
        store: &CheckpointStore,
        holder: &Holder,
        options: &LeaseOptions,
    ) -> Result<Lease, LeaseError> {
        let url = store.url().to_string();
        let (object_store, _, local) = store.parts();
        if let Some(dir) = local {
            return Ok(Lease { kind: lock_local(dir, &url, holder)?, url });
        }
        let path = store.path(LEASE);
        let object_url = store.child_url(LEASE);
        let read_err = |cause| CheckpointError::Read { object: object_url.clone(), cause };
        let write_err = |cause| CheckpointError::Write { object: object_url.clone(), cause };
        let mut mine = holder.clone();
        mine.released = false;
        // Two rounds: a conditional write that loses a race reads the winner the second time.
        for _ in 0..2 {
            mine.expires = Some(expiry(options.ttl));
            let (mode, current) = match object_store.get(&path).await {
                Err(object_store::Error::NotFound { .. }) => (PutMode::Create, None),
                Err(cause) => return Err(read_err(cause).into()),
                Ok(found) => {
                    let version = UpdateVersion {
                        e_tag: found.meta.e_tag.clone(),
                        version: found.meta.version.clone(),
                    };
                    let bytes = found.bytes().await.map_err(read_err)?;
                    let current: Option<Holder> = serde_json::from_slice(&bytes).ok();
                    (PutMode::Update(version), current)
                }
            };
            if let Some(current) = &current
                && !current.released
                && current.expires.is_some_and(|e| e > Utc::now())
            {
                return Err(LeaseError::Held { url, holder: Box::new(current.clone()) });
            }
            let payload = PutPayload::from(serde_json::to_vec(&mine).expect("a holder serializes"));
            match object_store.put_opts(&path, payload, PutOptions::from(mode)).await {
                Ok(put) => {
                    let version = Arc::new(tokio::sync::Mutex::new(UpdateVersion::from(put)));
                    let lost = Arc::new(AtomicBool::new(false));
                    let renew = tokio::spawn(renew(
                        object_store.clone(),
                        path.clone(),
                        mine.clone(),
                        options.clone(),
                        version.clone(),
                        lost.clone(),
                    ));
                    let kind = Kind::Object {
                        store: object_store.clone(),
                        path,
                        holder: mine,
                        version,
                        lost,
                        renew,
                    };
                    return Ok(Lease { url, kind });
                }
                Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                }
                Err(cause) => return Err(write_err(cause).into()),
            }
        }
        // Lost both races: whoever won holds it now.
        let found = object_store.get(&path).await.map_err(read_err)?.bytes().await.map_err(read_err)?;
        match serde_json::from_slice::<Holder>(&found) {
            Ok(holder) => Err(LeaseError::Held { url, holder: Box::new(holder) }),
            Err(e) => Err(CheckpointError::Corrupt { object: object_url, reason: e.to_string() }.into()),
        }
    }

    /// True when a live process holds the lease of local folder `dir` (see
    /// [`Lease::acquire_dir`]); false when none does, or the folder has no lease file.
    pub fn is_held_dir(dir: &Path) -> std::io::Result<bool> {
        let file = match std::fs::OpenOptions::new().read(true).write(true).open(dir.join(LEASE)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        match file.try_lock() {
            Ok(()) => Ok(false),
            Err(std::fs::TryLockError::WouldBlock) => Ok(true),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// What the lease guards.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// True when an object-store lease could not be renewed before it expired, or another run
    /// has taken it since; always false for a local folder.
    pub fn is_lost(&self) -> bool {
        match &self.kind {
            Kind::Local { .. } => false,
            Kind::Object { lost, .. } => lost.load(Ordering::Relaxed),
        }
    }

    /// Gives the lease up. An object-store lease is marked released (naming this run as the
    /// last one) unless it was lost meanwhile.
    pub async fn release(self) -> Result<(), LeaseError> {
        self.release_as(None).await
    }

    /// Gives the lease up leaving `last` recorded as the last holder instead of this run (for
    /// a run that was refused before it wrote anything): `Some(previous)` puts the holder
    /// before it back, `None` leaves no holder recorded.
    pub async fn release_restoring(self, last: Option<&Holder>) -> Result<(), LeaseError> {
        self.release_as(Some(last)).await
    }

    async fn release_as(self, last: Option<Option<&Holder>>) -> Result<(), LeaseError> {
        let Lease { url, kind } = self;
        if let (Kind::Local { _file: file }, Some(last)) = (&kind, last) {
            let text =
                last.map(|h| serde_json::to_vec_pretty(h).expect("a holder serializes")).unwrap_or_default();
            let mut file = file;
            file.set_len(0)
                .and_then(|()| file.rewind())
                .and_then(|()| file.write_all(&text))
                .map_err(|source| LeaseError::Io { path: PathBuf::from(&url).join(LEASE), source })?;
        }
        if let Kind::Object { store, path, holder, version, lost, renew } = &kind {
            renew.abort();
            if lost.load(Ordering::Relaxed) {
                return Ok(());
            }
            let mut record = match last {
                Some(Some(previous)) => previous.clone(),
                Some(None) => Holder { run_id: String::new(), ..holder.clone() },
                None => holder.clone(),
            };
            record.released = true;
            record.expires = Some(Utc::now());
            let payload = PutPayload::from(serde_json::to_vec(&record).expect("a holder serializes"));
            let version = version.lock().await.clone();
            store
                .put_opts(path, payload, PutOptions::from(PutMode::Update(version)))
                .await
                .map_err(|cause| CheckpointError::Write { object: path.to_string(), cause })?;
        }
        Ok(())
    }

    /// The last holder recorded at `store`'s root (this run's own record while it holds the
    /// lease), or `None` when no run has taken it yet.
    pub async fn last_holder(store: &CheckpointStore) -> Result<Option<Holder>, CheckpointError> {
        let holder = Self::read_last_holder(store).await?;
        Ok(holder.filter(|h| !h.run_id.is_empty()))
    }

    async fn read_last_holder(store: &CheckpointStore) -> Result<Option<Holder>, CheckpointError> {
        let (object_store, _, local) = store.parts();
        let bytes = match local {
            Some(dir) => match std::fs::read(dir.join(LEASE)) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => {
                    return Err(CheckpointError::InvalidArgument(format!(
                        "reading {}: {e}",
                        dir.join(LEASE).display()
                    )));
                }
            },
            None => match object_store.get(&store.path(LEASE)).await {
                Ok(found) => found
                    .bytes()
                    .await
                    .map_err(|cause| CheckpointError::Read { object: store.child_url(LEASE), cause })?
                    .to_vec(),
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(cause) => return Err(CheckpointError::Read { object: store.child_url(LEASE), cause }),
            },
        };
        Ok(serde_json::from_slice(&bytes).ok())
    }
}

fn expiry(ttl: Duration) -> DateTime<Utc> {
    Utc::now() + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX)
}

/// Keeps an object-store lease alive until it is aborted, or lost.
async fn renew(
    store: Arc<dyn ObjectStore>,
    path: ObjPath,
    holder: Holder,
    options: LeaseOptions,
    version: Arc<tokio::sync::Mutex<UpdateVersion>>,
    lost: Arc<AtomicBool>,
) {
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(options.renew_every).await;
        let mut record = holder.clone();
        record.expires = Some(expiry(options.ttl));
        let payload = PutPayload::from(serde_json::to_vec(&record).expect("a holder serializes"));
        let mut current = version.lock().await;
        match store.put_opts(&path, payload, PutOptions::from(PutMode::Update(current.clone()))).await {
            Ok(put) => {
                *current = UpdateVersion::from(put);
                last_renewed = tokio::time::Instant::now();
            }
            // Someone else wrote it: only a run that found it expired does that.
            Err(object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. }) => {
                lost.store(true, Ordering::Relaxed);
                return;
            }
            // A store that is briefly unreachable: try again, until the lease would have lapsed.
            Err(_) if last_renewed.elapsed() < options.ttl => {}
            Err(_) => {
                lost.store(true, Ordering::Relaxed);
                return;
            }
        }
    }
}

fn lock_local(dir: &Path, url: &str, holder: &Holder) -> Result<Kind, LeaseError> {
    let path = dir.join(LEASE);
    let io_err = |source| LeaseError::Io { path: path.clone(), source };
    std::fs::create_dir_all(dir).map_err(io_err)?;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err)?;
    // A second: [`Lease::is_held_dir`] holds the lock for an instant, and a new holder
    // writes its record right after locking.
    let mut tries = 20;
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) if tries > 0 => {
                tries -= 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let read = file.rewind().and_then(|()| file.read_to_string(&mut text));
                return match read.ok().and_then(|_| serde_json::from_str::<Holder>(&text).ok()) {
                    Some(holder) => Err(LeaseError::Held { url: url.to_string(), holder: Box::new(holder) }),
                    None => Err(LeaseError::HeldUnknown { url: url.to_string(), lock: path }),
                };
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(e)),
        }
    }
    let mut record = holder.clone();
    record.expires = None;
    record.released = false;
    let text = serde_json::to_vec_pretty(&record).expect("a holder serializes");
    file.set_len(0).and_then(|()| file.rewind()).and_then(|()| file.write_all(&text)).map_err(io_err)?;
    Ok(Kind::Local { _file: file })
}

/// Moves every checkpoint under `store`'s root, and its `latest` and `best`, into
/// `<root>/archive/<name>/`, where `gradflow checkpoint ls <root>/archive/<name>` and
/// `restore = "<root>/archive/<name>/ckpt-..."` still find them. Returns how many
/// checkpoint folders were moved.
///
/// `latest` and `best` go first and each checkpoint's `manifest.json` before its other files, so an
/// interrupted move leaves no checkpoint half-visible at the root. Only the lease holder
/// should call it.
pub async fn archive(store: &CheckpointStore, name: &str) -> Result<usize, CheckpointError> {
    let (object_store, root, local) = store.parts();
    let to_rel = |rel: &str| format!("{ARCHIVE}/{name}/{rel}");
    if let Some(dir) = local {
        let target = dir.join(ARCHIVE).join(name);
        let fail = |e: std::io::Error, what: &Path| {
            CheckpointError::InvalidArgument(format!(
                "moving {} into {}: {e}",
                what.display(),
                target.display()
            ))
        };
        if target.exists() {
            return Err(CheckpointError::InvalidArgument(format!("{} exists already", target.display())));
        }
        std::fs::create_dir_all(&target).map_err(|e| fail(e, &target))?;
        for pointer in [LATEST, BEST] {
            let from = dir.join(pointer);
            if from.exists() {
                std::fs::rename(&from, target.join(pointer)).map_err(|e| fail(e, &from))?;
            }
        }
        let mut moved = 0;
        let entries = std::fs::read_dir(dir).map_err(|e| fail(e, dir))?;
        for entry in entries {
            let entry = entry.map_err(|e| fail(e, dir))?;
            let file_name = entry.file_name();
            if parse_checkpoint_dir_name(&file_name.to_string_lossy()).is_some() {
                std::fs::rename(entry.path(), target.join(&file_name)).map_err(|e| fail(e, &entry.path()))?;
                moved += 1;
            }
        }
        return Ok(moved);
    }
    let prefix = (!root.as_ref().is_empty()).then_some(root);
    let objects: Vec<ObjPath> = object_store
        .list(prefix)
        .map_ok(|m| m.location)
        .try_collect()
        .await
        .map_err(|cause| CheckpointError::List { prefix: store.url().to_string(), cause })?;
    let rel_of = |p: &ObjPath| -> Option<String> {
        let parts: Vec<String> = p.prefix_match(root)?.map(|part| part.as_ref().to_string()).collect();
        Some(parts.join("/"))
    };
    let mut moves: Vec<(u8, String, String)> = Vec::new();
    let mut dirs = std::collections::BTreeSet::new();
    for object in &objects {
        let Some(rel) = rel_of(object) else { continue };
        let first = rel.split('/').next().unwrap_or("");
        let order = if rel == LATEST || rel == BEST {
            0
        } else if parse_checkpoint_dir_name(first).is_some() {
            dirs.insert(first.to_string());
            if rel == format!("{first}/{MANIFEST}") { 1 } else { 2 }
        } else {
            continue;
        };
        moves.push((order, rel.clone(), to_rel(&rel)));
    }
    moves.sort();
    for (_, from, to) in moves {
        object_store
            .rename(&root.child_path(&from), &root.child_path(&to))
            .await
            .map_err(|cause| CheckpointError::Write { object: store.child_url(&to), cause })?;
    }
    Ok(dirs.len())
}

/// `ObjPath::child` for a relative path of several parts.
trait ChildPath {
    fn child_path(&self, rel: &str) -> ObjPath;
}

impl ChildPath for ObjPath {
    fn child_path(&self, rel: &str) -> ObjPath {
        rel.split('/').fold(self.clone(), |p, part| p.join(part))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(run: &str) -> Holder {
        Holder::this_process(run, "test-host")
    }

    #[tokio::test]
    async fn a_local_folder_is_held_by_one_lease_at_a_time_and_freed_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = Lease::acquire_dir(dir.path(), &holder("a-1")).unwrap();
        // flock locks belong to the open file, so a second open in this process conflicts too.
        let err = Lease::acquire_dir(dir.path(), &holder("a-2")).unwrap_err();
        match &err {
            LeaseError::Held { holder, .. } => assert_eq!(holder.run_id, "a-1"),
            other => panic!("{other}"),
        }
        let text = err.to_string();
        assert!(text.contains("run a-1") && text.contains("test-host") && text.contains("pid"), "{text}");
        assert!(Lease::is_held_dir(dir.path()).unwrap());
        drop(first);
        assert!(!Lease::is_held_dir(dir.path()).unwrap());
        let second = Lease::acquire_dir(dir.path(), &holder("a-2")).unwrap();
        assert!(Lease::is_held_dir(dir.path()).unwrap());
        drop(second);
        assert!(!Lease::is_held_dir(tempfile::tempdir().unwrap().path()).unwrap(), "no lease file");
        let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
        let last = |store: CheckpointStore| async move {
            Lease::last_holder(&store).await.unwrap().map(|h| h.run_id)
        };
        assert_eq!(last(store.clone()).await.as_deref(), Some("a-2"));
        // A refused run puts the record of the one before back.
        let third = Lease::acquire(&store, &holder("a-3"), &LeaseOptions::default()).await.unwrap();
        assert_eq!(last(store.clone()).await.as_deref(), Some("a-3"));
        third.release_restoring(Some(&holder("a-2"))).await.unwrap();
        assert_eq!(last(store.clone()).await.as_deref(), Some("a-2"));
        let fourth = Lease::acquire(&store, &holder("a-4"), &LeaseOptions::default()).await.unwrap();
        fourth.release_restoring(None).await.unwrap();
        assert_eq!(last(store.clone()).await, None);
    }

    #[tokio::test]
    async fn an_object_store_lease_is_refused_while_live_and_taken_over_once_expired() {
        let store = CheckpointStore::open("memory://lease-test/root").unwrap();
        // Long enough that a loaded machine does not let it lapse between two lines.
        let short = LeaseOptions { ttl: Duration::from_millis(1500), renew_every: Duration::from_secs(3600) };
        let first = Lease::acquire(&store, &holder("b-1"), &short).await.unwrap();
        let err = Lease::acquire(&store, &holder("b-2"), &short).await.unwrap_err();
        assert!(matches!(&err, LeaseError::Held { holder, .. } if holder.run_id == "b-1"), "{err}");
        // Not renewed (renew_every is an hour): it lapses, and another run takes it over.
        tokio::time::sleep(Duration::from_millis(2000)).await;
        let second = Lease::acquire(&store, &holder("b-2"), &short).await.unwrap();
        // The first one's holder cannot give back what it no longer has.
        assert!(first.release().await.is_err(), "a lost lease's release is a precondition failure");
        let err = Lease::acquire(&store, &holder("b-3"), &short).await.unwrap_err();
        assert!(matches!(&err, LeaseError::Held { holder, .. } if holder.run_id == "b-2"), "{err}");
        second.release().await.unwrap();
        let last = Lease::last_holder(&store).await.unwrap().unwrap();
        assert!(last.released && last.run_id == "b-2", "{last:?}");
        let refused = Lease::acquire(&store, &holder("b-9"), &short).await.unwrap();
        refused.release_restoring(Some(&last)).await.unwrap();
        assert_eq!(Lease::last_holder(&store).await.unwrap().unwrap().run_id, "b-2");
        Lease::acquire(&store, &holder("b-3"), &short).await.unwrap().release().await.unwrap();
    }

    #[tokio::test]
    async fn a_renewed_lease_outlives_its_ttl() {
        let store = CheckpointStore::open("memory://lease-test/renewed").unwrap();
        let options =
            LeaseOptions { ttl: Duration::from_millis(1500), renew_every: Duration::from_millis(100) };
        let lease = Lease::acquire(&store, &holder("c-1"), &options).await.unwrap();
        tokio::time::sleep(Duration::from_millis(4000)).await;
        let err = Lease::acquire(&store, &holder("c-2"), &options).await.unwrap_err();
        assert!(matches!(&err, LeaseError::Held { holder, .. } if holder.run_id == "c-1"), "{err}");
        assert!(!lease.is_lost());
        lease.release().await.unwrap();
    }

    #[tokio::test]
    async fn racing_runs_get_one_lease() {
        let store = CheckpointStore::open("memory://lease-test/race").unwrap();
        let options = LeaseOptions::default();
        let tries = (0..8).map(|i| {
            let store = store.clone();
            let options = options.clone();
            tokio::spawn(async move { Lease::acquire(&store, &holder(&format!("r-{i}")), &options).await })
        });
        let results = futures::future::join_all(tries).await;
        let won = results.iter().filter(|r| r.as_ref().unwrap().is_ok()).count();
        assert_eq!(won, 1);
    }

    #[tokio::test]
    async fn archive_moves_checkpoints_and_latest_aside() {
        for url in ["memory://lease-test/archive", ""] {
            let dir = tempfile::tempdir().unwrap();
            let url = if url.is_empty() { dir.path().to_str().unwrap().to_string() } else { url.to_string() };
            let store = CheckpointStore::open(&url).unwrap();
            let (object_store, root, _) = store.parts();
            for rel in
                ["latest", "ckpt-000000000010/manifest.json", "ckpt-000000000010/shard-0/a.bin", "other.txt"]
            {
                object_store.put(&root.child_path(rel), PutPayload::from(b"x".to_vec())).await.unwrap();
            }
            assert_eq!(archive(&store, "run-1").await.unwrap(), 1, "{url}");
            let (object_store, root, _) = store.parts();
            let left: Vec<String> =
                object_store.list(Some(root)).map_ok(|m| m.location.to_string()).try_collect().await.unwrap();
            let root_s = root.to_string();
            let rel: Vec<&str> =
                left.iter().map(|l| l.strip_prefix(&root_s).unwrap().trim_start_matches('/')).collect();
            for want in [
                "archive/run-1/latest",
                "archive/run-1/ckpt-000000000010/manifest.json",
                "archive/run-1/ckpt-000000000010/shard-0/a.bin",
                "other.txt",
            ] {
                assert!(rel.contains(&want), "{url}: {want} in {rel:?}");
            }
            assert_eq!(rel.len(), 4, "{url}: {rel:?}");
        }
    }
}
