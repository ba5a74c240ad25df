//! [`CheckpointStore`]: a checkpoint root on some object store, and the write side (shard
//! files, finalize, pruning), listing and resolving.

use std::collections::HashMap;
use std::fmt;
use std::path::{Component, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt, stream};
use gradflow_core::store::{StoreUrlError, cloud_store};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, ObjectStoreScheme, PutPayload, WriteMultipart};
use url::Url;

use crate::format;
use crate::manifest::{
    Crc32c, FORMAT_VERSION, FileContent, FileEntry, MANIFEST_FORMAT, Manifest, ObjectEntry, Origin,
    SHARD_MANIFEST_FORMAT, ShardEntry, ShardManifest, check_coverage, decode_manifest, encode_manifest,
    escaped,
};
use crate::snapshot::{DensePieceSnapshot, ShardSnapshot};
use crate::{CheckpointError, CheckpointInfo, checkpoint_dir_name, parse_checkpoint_dir_name};

/// Name of the pointer object at the root.
pub const LATEST: &str = "latest";
/// Name of a checkpoint's (and a shard's) manifest.
pub const MANIFEST: &str = "manifest.json";
/// The marker a shard writes into its folder of a checkpoint it gives up
/// ([`CheckpointStore::abandon`]); its content is the reason.
pub const ABANDONED: &str = "ABANDONED";
/// The folder, beside the checkpoints, where a stopping shard says at which step it stopped
/// ([`CheckpointStore::mark_stopped`]).
pub const STOPPED: &str = "stopped";
/// The folder of a checkpoint's extra objects ([`CheckpointStore::put_extra`]).
const EXTRA_DIR: &str = "extra";

/// Tunables of a [`CheckpointStore`]; the defaults suit checkpoints from megabytes to many
/// gigabytes.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreOptions {
    /// Dense pieces (values + optimizer state) are grouped into safetensors files of about this
    /// many bytes (a single larger piece gets a file of its own). Each file is built in memory
    /// before upload. Default 128 MiB.
    pub dense_file_bytes: u64,
    /// Files larger than this are uploaded with a multipart upload. Default 32 MiB.
    pub multipart_threshold: u64,
    /// Size of each part of a multipart upload (S3 needs at least 5 MiB). Default 16 MiB.
    pub part_bytes: usize,
    /// Files moving at once, and parts in flight per multipart upload. Default 4.
    pub max_concurrency: usize,
    /// How often `finalize` looks for missing shard manifests. Default 250 ms.
    pub poll_interval: Duration,
    /// Extra configuration for the cloud store builders, applied after the environment:
    /// object_store keys such as `aws_endpoint`, `aws_allow_http`, `google_service_account`,
    /// `azure_storage_account_name`. Empty by default (the environment alone configures).
    pub storage_options: Vec<(String, String)>,
    /// The run writing checkpoints, recorded in every manifest `write_shard` and `finalize`
    /// write. Default: none.
    pub run_id: Option<String>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            dense_file_bytes: 128 << 20,
            multipart_threshold: 32 << 20,
            part_bytes: 16 << 20,
            max_concurrency: 4,
            poll_interval: Duration::from_millis(250),
            storage_options: Vec::new(),
            run_id: None,
        }
    }
}

/// The process-wide named in-memory stores behind `memory://NAME` URLs.
static MEMORY_STORES: LazyLock<Mutex<HashMap<String, Arc<InMemory>>>> = LazyLock::new(Default::default);

/// A checkpoint root on an object store: a local folder, `s3://`, `gs://`, `az://` or
/// `memory://`. Cheap to clone (the store is shared).
#[derive(Clone)]
pub struct CheckpointStore {
    store: Arc<dyn ObjectStore>,
    /// The root's path inside `store`.
    root: ObjPath,
    /// The root as shown in messages, without a trailing `/`.
    url: String,
    /// For a local folder: the folder (to remove emptied directories when pruning).
    local_dir: Option<PathBuf>,
    options: StoreOptions,
}

impl fmt::Debug for CheckpointStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointStore").field("url", &self.url).finish_non_exhaustive()
    }
}

impl CheckpointStore {
    /// Opens the checkpoint root at `url` with default options.
    ///
    /// - a plain path (`./checkpoints`, `/data/ckpt`) or `file:///...`: a local folder, created
    ///   on first write;
    /// - `s3://bucket/prefix` (also `s3a://`): configured by the usual `AWS_*` variables
    ///   (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT` for MinIO
    ///   and other S3-compatible servers, `AWS_ALLOW_HTTP=true` for a plain-http endpoint, ...);
    /// - `gs://bucket/prefix`: `GOOGLE_*` variables (`GOOGLE_SERVICE_ACCOUNT`, ...);
    /// - `az://container/prefix` (also `azure://`, `abfs(s)://`): `AZURE_*` variables
    ///   (`AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, ...);
    /// - `memory://name/prefix`: an in-memory store shared by every handle to the same `name` in
    ///   this process (for tests).
    ///
    /// Opening does no I/O: a wrong bucket or credentials show up at the first read or write.
    pub fn open(url: &str) -> Result<Self, CheckpointError> {
        Self::open_with(url, StoreOptions::default())
    }

    /// [`CheckpointStore::open`] with explicit options.
    pub fn open_with(url: &str, options: StoreOptions) -> Result<Self, CheckpointError> {
        let given = url.trim();
        let invalid = |reason: String| CheckpointError::InvalidUrl { url: given.to_string(), reason };
        if given.is_empty() {
            return Err(invalid("empty".into()));
        }
        if !given.contains("://") {
            return Self::open_local(given, PathBuf::from(given), options);
        }
        let parsed = Url::parse(given).map_err(|e| invalid(e.to_string()))?;
        let display = given.trim_end_matches('/').to_string();
        match parsed.scheme() {
            "file" => {
                let dir = parsed.to_file_path().map_err(|()| invalid("not a local absolute path".into()))?;
                Self::open_local(&display, dir, options)
            }
            "memory" => {
                let name = parsed.host_str().unwrap_or("").to_string();
                let root = ObjPath::parse(parsed.path()).map_err(|e| invalid(e.to_string()))?;
                let store = MEMORY_STORES.lock().unwrap().entry(name).or_default().clone();
                Ok(CheckpointStore { store, root, url: display, local_dir: None, options })
            }
            _ => {
                let (scheme, path) = ObjectStoreScheme::parse(&parsed).map_err(|e| {
                    invalid(format!("{e} (supported: a local path, file://, s3://, gs://, az://, memory://)"))
                })?;
                let root = ObjPath::parse(path).map_err(|e| invalid(e.to_string()))?;
                let store: Arc<dyn ObjectStore> = match scheme {
                    ObjectStoreScheme::AmazonS3
                    | ObjectStoreScheme::GoogleCloudStorage
                    | ObjectStoreScheme::MicrosoftAzure => cloud_store(given, &options.storage_options)
                        .map_err(|e| match e {
                            StoreUrlError::Invalid { reason, .. } => invalid(reason),
                            StoreUrlError::UnknownOption { key, .. } => {
                                invalid(format!("unknown storage option `{key}`"))
                            }
                            StoreUrlError::Build { cause, .. } => {
                                CheckpointError::Open { url: display.clone(), cause }
                            }
                        })?,
                    other => {
                        return Err(invalid(format!(
                            "{other:?} stores are not supported (supported: a local path, file://, s3://, \
                             gs://, az://, memory://)"
                        )));
                    }
                };
                Ok(CheckpointStore { store, root, url: display, local_dir: None, options })
            }
        }
    }

    fn open_local(display: &str, dir: PathBuf, options: StoreOptions) -> Result<Self, CheckpointError> {
        let invalid = |reason: String| CheckpointError::InvalidUrl { url: display.to_string(), reason };
        let abs = std::path::absolute(&dir).map_err(|e| invalid(e.to_string()))?;
        // Resolve `.` and `..` by hand: the folder may not exist yet, so canonicalize can't.
        let mut clean = PathBuf::new();
        for c in abs.components() {
            match c {
                Component::CurDir => {}
                Component::ParentDir => {
                    clean.pop();
                }
                other => clean.push(other),
            }
        }
        let clean = std::fs::canonicalize(&clean).unwrap_or(clean);
        let root = ObjPath::from_absolute_path(&clean).map_err(|e| invalid(e.to_string()))?;
        let url = if display.starts_with("file://") {
            display.to_string()
        } else {
            clean.display().to_string().trim_end_matches('/').to_string()
        };
        Ok(CheckpointStore {
            // fsync files and folders before a write returns, as remote stores guarantee: a
            // manifest must never reach the disk before the files it lists.
            store: Arc::new(LocalFileSystem::new().with_fsync(true)),
            root,
            url: if url.is_empty() { "/".into() } else { url },
            local_dir: Some(clean),
            options,
        })
    }

    /// A checkpoint root at `prefix` in any object store (for stores this crate does not build
    /// itself, or wrapped ones); `url` is how messages name the root.
    pub fn from_object_store(
        store: Arc<dyn ObjectStore>,
        prefix: ObjPath,
        url: impl Into<String>,
        options: StoreOptions,
    ) -> Self {
        let url = url.into().trim_end_matches('/').to_string();
        CheckpointStore { store, root: prefix, url, local_dir: None, options }
    }

    /// The store, the root's path in it, and the folder of a local root: what
    /// [`crate::lease`] works on.
    pub(crate) fn parts(&self) -> (&Arc<dyn ObjectStore>, &ObjPath, Option<&std::path::Path>) {
        (&self.store, &self.root, self.local_dir.as_deref())
    }

    /// The root's URL (for a plain local path: the absolute folder).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// The URL of checkpoint `step`'s directory.
    pub fn checkpoint_url(&self, step: u64) -> String {
        self.child_url(&checkpoint_dir_name(step))
    }

    /// Where checkpoint directory `dir` of this root is, for a manifest to remember.
    pub(crate) fn origin(&self, dir: &str) -> Origin {
        Origin {
            store: self.store.clone(),
            root: self.root.clone(),
            url: self.url.clone(),
            dir: dir.to_string(),
        }
    }

    /// Where `manifest`'s files are: the root it was resolved from (a store opened on its
    /// origin), else this root; and its directory's name.
    pub(crate) fn origin_of(&self, manifest: &Manifest) -> (std::borrow::Cow<'_, CheckpointStore>, String) {
        match &manifest.origin {
            Some(o) => (
                std::borrow::Cow::Owned(CheckpointStore {
                    store: o.store.clone(),
                    root: o.root.clone(),
                    url: o.url.clone(),
                    local_dir: if o.url == self.url { self.local_dir.clone() } else { None },
                    options: self.options.clone(),
                }),
                o.dir.clone(),
            ),
            None => (std::borrow::Cow::Borrowed(self), crate::checkpoint_dir_name(manifest.step)),
        }
    }

    pub(crate) fn child_url(&self, rel: &str) -> String {
        if self.url.ends_with('/') { format!("{}{rel}", self.url) } else { format!("{}/{rel}", self.url) }
    }

    pub(crate) fn path(&self, rel: &str) -> ObjPath {
        rel.split('/').filter(|s| !s.is_empty()).fold(self.root.clone(), |p, s| p.clone().join(s))
    }

    // -----------------------------------------------------------------------------------------
    // Object helpers.

    /// The object's bytes, or `None` when it does not exist.
    pub(crate) async fn get_opt(&self, rel: &str) -> Result<Option<Bytes>, CheckpointError> {
        let read_err = |cause| CheckpointError::Read { object: self.child_url(rel), cause };
        match self.store.get(&self.path(rel)).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(read_err)?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(cause) => Err(read_err(cause)),
        }
    }

    pub(crate) async fn exists(&self, rel: &str) -> Result<bool, CheckpointError> {
        match self.store.head(&self.path(rel)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(cause) => Err(CheckpointError::Read { object: self.child_url(rel), cause }),
        }
    }

    /// The object's size in bytes, or `None` when it does not exist (one HEAD request).
    pub(crate) async fn size_of(&self, rel: &str) -> Result<Option<u64>, CheckpointError> {
        match self.store.head(&self.path(rel)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(cause) => Err(CheckpointError::Read { object: self.child_url(rel), cause }),
        }
    }

    /// Reads a file that a manifest lists and checks its size and checksum.
    pub(crate) async fn read_verified(
        &self,
        rel: &str,
        bytes: u64,
        crc: Crc32c,
    ) -> Result<Bytes, CheckpointError> {
        let object = self.child_url(rel);
        let data = self
            .get_opt(rel)
            .await?
            .ok_or_else(|| CheckpointError::MissingFile { object: object.clone() })?;
        if data.len() as u64 != bytes {
            return Err(CheckpointError::Corrupt {
                object,
                reason: format!(
                    "it is {} bytes, the manifest says {bytes} (truncated or overwritten?)",
                    data.len()
                ),
            });
        }
        let actual = Crc32c::of(&data);
        if actual != crc {
            return Err(CheckpointError::Corrupt {
                object,
                reason: format!("checksum mismatch: crc32c {actual}, the manifest says {crc}"),
            });
        }
        Ok(data)
    }

    /// Writes a small object in one request.
    pub(crate) async fn put_small(&self, rel: &str, data: Bytes) -> Result<(), CheckpointError> {
        self.store
            .put(&self.path(rel), PutPayload::from(data))
            .await
            .map(|_| ())
            .map_err(|cause| CheckpointError::Write { object: self.child_url(rel), cause })
    }

    /// Writes a file of `total` bytes from `chunks`, multipart when it is large; returns its
    /// checksum.
    async fn put_file(
        &self,
        rel: &str,
        total: u64,
        chunks: impl Iterator<Item = Bytes>,
    ) -> Result<Crc32c, CheckpointError> {
        let write_err = |cause| CheckpointError::Write { object: self.child_url(rel), cause };
        let mut crc = 0u32;
        let mut written = 0u64;
        if total <= self.options.multipart_threshold {
            let parts: Vec<Bytes> = chunks
                .inspect(|c| {
                    crc = crc32c::crc32c_append(crc, c);
                    written += c.len() as u64;
                })
                .collect();
            debug_assert_eq!(written, total);
            self.store.put(&self.path(rel), PutPayload::from_iter(parts)).await.map_err(write_err)?;
            return Ok(Crc32c(crc));
        }
        let upload = self.store.put_multipart(&self.path(rel)).await.map_err(write_err)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, self.options.part_bytes.max(1));
        for chunk in chunks {
            if let Err(cause) = writer.wait_for_capacity(self.options.max_concurrency.max(1)).await {
                let _ = writer.abort().await;
                return Err(write_err(cause));
            }
            crc = crc32c::crc32c_append(crc, &chunk);
            written += chunk.len() as u64;
            writer.put(chunk);
        }
        debug_assert_eq!(written, total);
        writer.finish().await.map_err(write_err)?;
        Ok(Crc32c(crc))
    }

    // -----------------------------------------------------------------------------------------
    // Writing.

    /// Writes one shard's part of checkpoint `step`: its dense pieces with their optimizer state
    /// as safetensors files (`shard-<s>/dense-<k>.safetensors`, about
    /// [`StoreOptions::dense_file_bytes`] each), each sparse table in the sparse binary format
    /// (`shard-<s>/sparse-<t>.bin`, `t` the table's index in the spec), large files by multipart
    /// upload, and then, last, the shard's manifest (`shard-<s>/manifest.json`) with every
    /// file's size and CRC-32C.
    ///
    /// Until [`CheckpointStore::finalize`] writes the checkpoint's own manifest, none of this is
    /// visible as a checkpoint. Writing a shard of a checkpoint that is already complete is
    /// refused ([`CheckpointError::AlreadyComplete`]); writing it again before then replaces it.
    pub async fn write_shard(
        &self,
        step: u64,
        snap: &ShardSnapshot,
    ) -> Result<ShardManifest, CheckpointError> {
        snap.validate()?;
        let dir = checkpoint_dir_name(step);
        if self.exists(&format!("{dir}/{MANIFEST}")).await? {
            return Err(CheckpointError::AlreadyComplete { checkpoint: self.child_url(&dir) });
        }
        let shard_dir = format!("{dir}/shard-{}", snap.shard);
        // A manifest left by an earlier attempt at this shard would describe files that are
        // about to be replaced: remove it first, so that `finalize` waits for the new one.
        let shard_manifest = format!("{shard_dir}/{MANIFEST}");
        // So is a marker of an earlier attempt that gave this checkpoint up (a job restored
        // from an older checkpoint reaches the step again).
        for stale in [shard_manifest.clone(), format!("{shard_dir}/{ABANDONED}")] {
            match self.store.delete(&self.path(&stale)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(cause) => return Err(CheckpointError::Write { object: self.child_url(&stale), cause }),
            }
        }
        let spec = &snap.spec;
        let slot_names = |tensor: &str| -> &'static [&'static str] {
            let t = spec.dense_index(tensor).expect("validated");
            spec.dense[t].optimizer.slot_names()
        };

        // Group dense pieces into files of about `dense_file_bytes`.
        let mut groups: Vec<Vec<&DensePieceSnapshot>> = Vec::new();
        let mut group_bytes = 0u64;
        for p in &snap.dense {
            let bytes = 4 * (p.values.len() + p.state.len()) as u64;
            match groups.last_mut() {
                Some(g) if group_bytes + bytes <= self.options.dense_file_bytes => {
                    g.push(p);
                    group_bytes += bytes;
                }
                _ => {
                    groups.push(vec![p]);
                    group_bytes = bytes;
                }
            }
        }

        let dense_jobs = groups.into_iter().enumerate().map(|(k, group)| {
            let path = format!("shard-{}/dense-{k}.safetensors", snap.shard);
            let rel = format!("{dir}/{path}");
            async move {
                let (data, pieces) =
                    format::encode_dense(step, snap.shard, &group, slot_names).map_err(|e| {
                        CheckpointError::InvalidSnapshot {
                            shard: snap.shard,
                            reason: format!("cannot encode `{}`: {e}", self.child_url(&rel)),
                        }
                    })?;
                let total = data.len() as u64;
                let crc = self.put_file(&rel, total, std::iter::once(Bytes::from(data))).await?;
                Ok::<_, CheckpointError>(FileEntry {
                    path,
                    bytes: total,
                    crc32c: crc,
                    content: FileContent::Dense { pieces },
                })
            }
            .boxed()
        });
        let sparse_jobs = snap.sparse.iter().map(|t| {
            let index = spec.sparse_index(&t.table).expect("validated");
            let path = format!("shard-{}/sparse-{index}.bin", snap.shard);
            let rel = format!("{dir}/{path}");
            let slots = spec.sparse[index].optimizer.slot_names();
            async move {
                let chunk = self.options.part_bytes.clamp(1 << 16, 8 << 20);
                let (total, chunks) = format::encode_sparse(t, slots, chunk);
                let crc = self.put_file(&rel, total, chunks).await?;
                Ok::<_, CheckpointError>(FileEntry {
                    path,
                    bytes: total,
                    crc32c: crc,
                    content: FileContent::Sparse {
                        table: t.table.clone(),
                        dim: t.dim,
                        num_slots: t.num_slots,
                        rows: t.ids.len() as u64,
                    },
                })
            }
            .boxed()
        });
        // Built up front (not lazily inside the stream) so that this future is `Send`.
        let jobs: Vec<BoxFuture<'_, Result<FileEntry, CheckpointError>>> =
            dense_jobs.chain(sparse_jobs).collect();
        let files: Vec<FileEntry> =
            stream::iter(jobs).buffered(self.options.max_concurrency.max(1)).try_collect().await?;

        let manifest = ShardManifest {
            format: SHARD_MANIFEST_FORMAT.into(),
            format_version: FORMAT_VERSION,
            step,
            shard: snap.shard,
            num_shards: snap.num_shards,
            version: snap.version,
            mode: snap.mode,
            partition_bytes: snap.partition_bytes,
            time: chrono::Utc::now(),
            spec: snap.spec.clone(),
            files,
            run_id: self.options.run_id.clone(),
            serving: snap.serving.clone(),
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
        self.put_small(&shard_manifest, Bytes::from(json)).await?;
        Ok(manifest)
    }

    /// Completes checkpoint `step` once all `num_shards` shards have written their part.
    ///
    /// Waits (polling every [`StoreOptions::poll_interval`], up to `timeout`) until every
    /// shard's manifest exists; checks that they agree (step, shard count, mode, spec, partition
    /// size) and that their dense pieces cover every tensor exactly once; writes the
    /// checkpoint's `manifest.json` (from then on the checkpoint exists); then points `latest`
    /// at it (unless `latest` already points at a newer checkpoint); then deletes complete
    /// checkpoints beyond the newest `keep` (0 keeps all) and abandoned incomplete ones older
    /// than the oldest kept. Deleting one removes its manifest first, so a reader never sees a
    /// half-deleted checkpoint as complete.
    ///
    /// Call it from one process (e.g. shard 0, after its own `write_shard`).
    pub async fn finalize(
        &self,
        step: u64,
        num_shards: u32,
        keep: usize,
        timeout: Duration,
    ) -> Result<Manifest, CheckpointError> {
        if num_shards == 0 {
            return Err(CheckpointError::InvalidArgument("finalize: num_shards must be at least 1".into()));
        }
        let dir = checkpoint_dir_name(step);
        let checkpoint = self.child_url(&dir);
        let started = Instant::now();
        let mut found: Vec<Option<(ShardManifest, ObjectEntry)>> = vec![None; num_shards as usize];
        loop {
            for s in 0..num_shards {
                if found[s as usize].is_some() {
                    continue;
                }
                let rel = format!("shard-{s}/{MANIFEST}");
                if let Some(bytes) = self.get_opt(&format!("{dir}/{rel}")).await? {
                    let object = self.child_url(&format!("{dir}/{rel}"));
                    let m: ShardManifest = serde_json::from_slice(&bytes).map_err(|e| {
                        CheckpointError::Corrupt { object: object.clone(), reason: e.to_string() }
                    })?;
                    let entry =
                        ObjectEntry { path: rel, bytes: bytes.len() as u64, crc32c: Crc32c::of(&bytes) };
                    found[s as usize] = Some((m, entry));
                }
            }
            let missing: Vec<u32> = (0..num_shards).filter(|&s| found[s as usize].is_none()).collect();
            if missing.is_empty() {
                break;
            }
            for &s in &missing {
                if let Some(reason) = self.get_opt(&format!("{dir}/shard-{s}/{ABANDONED}")).await? {
                    let reason = String::from_utf8_lossy(&reason[..reason.len().min(500)]).into_owned();
                    return Err(CheckpointError::Abandoned { checkpoint, shard: s, reason });
                }
                if let Some(stopped) = self.get_opt(&format!("{STOPPED}/shard-{s}")).await?
                    && let Some(at) =
                        std::str::from_utf8(&stopped).ok().and_then(|t| t.trim().parse::<u64>().ok())
                    && at != step
                {
                    let reason = format!("it stopped at step {at} and will not write step {step}");
                    return Err(CheckpointError::Abandoned { checkpoint, shard: s, reason });
                }
            }
            let waited = started.elapsed();
            if waited >= timeout {
                let first_missing = self.child_url(&format!("{dir}/shard-{}/{MANIFEST}", missing[0]));
                return Err(CheckpointError::Timeout { checkpoint, missing, first_missing, waited });
            }
            tokio::time::sleep(self.options.poll_interval.min(timeout - waited)).await;
        }
        let shards: Vec<(ShardManifest, ObjectEntry)> =
            found.into_iter().map(|f| f.expect("all found")).collect();
        check_shards(&checkpoint, step, num_shards, &shards)?;

        let first = &shards[0].0;
        let consistent = shards.iter().all(|(m, _)| m.version == first.version);
        let total_bytes = shards
            .iter()
            .flat_map(|(m, e)| std::iter::once(e.bytes).chain(m.files.iter().map(|f| f.bytes)))
            .try_fold(0u64, u64::checked_add)
            .ok_or_else(|| CheckpointError::Inconsistent {
                checkpoint: checkpoint.clone(),
                reason: "its files add up to more than 2^64 bytes".into(),
            })?;
        let mut manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            format_version: FORMAT_VERSION,
            step,
            time: chrono::Utc::now(),
            mode: first.mode,
            consistent,
            num_shards,
            partition_bytes: first.partition_bytes,
            total_bytes,
            spec: first.spec.clone(),
            shards: shards
                .iter()
                .map(|(m, e)| ShardEntry {
                    shard: m.shard,
                    version: m.version,
                    manifest: e.clone(),
                    files: m.files.clone(),
                })
                .collect(),
            run_id: self.options.run_id.clone(),
            serving: first.serving.clone(),
            origin: None,
        };
        self.put_small(&format!("{dir}/{MANIFEST}"), Bytes::from(encode_manifest(&manifest))).await?;
        manifest.origin = Some(self.origin(&dir));

        let current = self.get_opt(LATEST).await?;
        let current_step =
            current.as_deref().and_then(|b| parse_checkpoint_dir_name(String::from_utf8_lossy(b).trim()));
        if current_step.is_none_or(|c| c <= step) {
            self.put_small(LATEST, Bytes::from(format!("{dir}\n"))).await?;
        }
        if keep > 0 {
            self.prune(keep).await?;
        }
        Ok(manifest)
    }

    /// Checkpoint directories under the root (complete or not), by step.
    async fn checkpoint_dirs(&self) -> Result<Vec<(u64, String)>, CheckpointError> {
        let prefix = (!self.root.as_ref().is_empty()).then_some(&self.root);
        let listing = self
            .store
            .list_with_delimiter(prefix)
            .await
            .map_err(|cause| CheckpointError::List { prefix: self.url.clone(), cause })?;
        let mut dirs: Vec<(u64, String)> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename())
            .filter_map(|name| parse_checkpoint_dir_name(name).map(|step| (step, name.to_string())))
            .collect();
        dirs.sort();
        Ok(dirs)
    }

    /// Deletes complete checkpoints beyond the newest `keep`, and incomplete ones older than the
    /// oldest kept; never the one the `best` pointer names.
    pub(crate) async fn prune(&self, keep: usize) -> Result<(), CheckpointError> {
        let best = self.best_dir().await?;
        let dirs = self.checkpoint_dirs().await?;
        let mut complete = Vec::new();
        for (step, name) in &dirs {
            if self.exists(&format!("{name}/{MANIFEST}")).await? {
                complete.push((*step, name.clone()));
            }
        }
        if complete.len() <= keep {
            return Ok(());
        }
        let oldest_kept = complete[complete.len() - keep].0;
        for (_, name) in dirs.iter().filter(|(step, name)| *step < oldest_kept && best.as_ref() != Some(name))
        {
            self.delete_checkpoint(name).await?;
        }
        Ok(())
    }

    /// Deletes every object of a checkpoint directory, the manifest first.
    async fn delete_checkpoint(&self, dir: &str) -> Result<(), CheckpointError> {
        let manifest = self.path(&format!("{dir}/{MANIFEST}"));
        match self.store.delete(&manifest).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(cause) => {
                return Err(CheckpointError::Delete {
                    object: self.child_url(&format!("{dir}/{MANIFEST}")),
                    cause,
                });
            }
        }
        let prefix = self.path(dir);
        let objects: Vec<ObjPath> = self
            .store
            .list(Some(&prefix))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|cause| CheckpointError::List { prefix: self.child_url(dir), cause })?;
        let mut deleted = self.store.delete_stream(stream::iter(objects.into_iter().map(Ok)).boxed());
        while let Some(r) = deleted.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(cause) => return Err(CheckpointError::Delete { object: self.child_url(dir), cause }),
            }
        }
        if let Some(local) = &self.local_dir {
            // The folders are empty now (or hold only leftovers of interrupted uploads).
            let _ = std::fs::remove_dir_all(local.join(dir));
        }
        Ok(())
    }

    /// Gives shard `shard`'s part of checkpoint `step` up, saying why: [`CheckpointStore::finalize`]
    /// of that step then fails at once with [`CheckpointError::Abandoned`] instead of waiting
    /// for files that will not come. A later [`CheckpointStore::write_shard`] of the same step
    /// and shard removes the marker.
    pub async fn abandon(&self, step: u64, shard: u32, reason: &str) -> Result<(), CheckpointError> {
        let rel = format!("{}/shard-{shard}/{ABANDONED}", checkpoint_dir_name(step));
        self.put_small(&rel, Bytes::from(reason.to_string())).await
    }

    /// Says that shard `shard` stopped for good at model version `step` (a server shutting
    /// down): a [`CheckpointStore::finalize`] of any other step then fails at once instead of
    /// waiting for that shard's files. Cleared by [`CheckpointStore::clear_stopped`] when the
    /// shard starts again.
    pub async fn mark_stopped(&self, shard: u32, step: u64) -> Result<(), CheckpointError> {
        self.put_small(&format!("{STOPPED}/shard-{shard}"), Bytes::from(step.to_string())).await
    }

    /// Removes shard `shard`'s [`CheckpointStore::mark_stopped`] marker (a shard starting).
    pub async fn clear_stopped(&self, shard: u32) -> Result<(), CheckpointError> {
        let rel = format!("{STOPPED}/shard-{shard}");
        match self.store.delete(&self.path(&rel)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(cause) => Err(CheckpointError::Write { object: self.child_url(&rel), cause }),
        }
    }

    /// Writes `data` as the extra object `name` of checkpoint `step` (for example the job's
    /// data-task progress). Call it before [`CheckpointStore::finalize`]: a checkpoint is
    /// visible only once complete, so an extra is there whenever its checkpoint is. Extras are
    /// deleted with their checkpoint.
    pub async fn put_extra(&self, step: u64, name: &str, data: Vec<u8>) -> Result<(), CheckpointError> {
        let dir = checkpoint_dir_name(step);
        if self.exists(&format!("{dir}/{MANIFEST}")).await? {
            return Err(CheckpointError::AlreadyComplete { checkpoint: self.child_url(&dir) });
        }
        self.put_small(&format!("{dir}/{EXTRA_DIR}/{name}"), data.into()).await
    }

    /// The extra object `name` of the checkpoint `manifest` describes, if it was written.
    pub async fn get_extra(&self, manifest: &Manifest, name: &str) -> Result<Option<Bytes>, CheckpointError> {
        let root = self.origin_of(manifest).0;
        root.get_opt(&format!("{}/{EXTRA_DIR}/{name}", manifest.dir_name())).await
    }

    // -----------------------------------------------------------------------------------------
    // Finding checkpoints.

    /// Every complete checkpoint under the root (a directory without `manifest.json` is not
    /// one), oldest first. A root that does not exist yet has none. A checkpoint whose
    /// manifest cannot be read or is corrupt is an error; [`CheckpointStore::list_all`] lists
    /// the others beside it.
    pub async fn list(&self) -> Result<Vec<CheckpointInfo>, CheckpointError> {
        let listing = self.list_all().await?;
        match listing.unreadable.into_iter().next() {
            Some(bad) => Err(bad.error),
            None => Ok(listing.checkpoints),
        }
    }

    /// Every checkpoint directory under the root that has a `manifest.json`, oldest first:
    /// the complete checkpoints, and apart from them those whose manifest could not be read
    /// or is not valid, each with why. Fails only when the root cannot be listed.
    pub async fn list_all(&self) -> Result<Listing, CheckpointError> {
        let dirs = self.checkpoint_dirs().await?;
        let reads: Vec<BoxFuture<'_, DirRead>> = dirs
            .into_iter()
            .map(|(step, name)| {
                async move {
                    let read = self.read_manifest_opt(self, &name).await;
                    (step, name, read)
                }
                .boxed()
            })
            .collect();
        let read: Vec<_> =
            stream::iter(reads).buffered(self.options.max_concurrency.max(1) * 2).collect().await;
        let mut listing = Listing::default();
        for (step, dir, result) in read {
            match result {
                Ok(Some(m)) => listing.checkpoints.push(m.info()),
                Ok(None) => {}
                Err(error) => listing.unreadable.push(Unreadable { step, dir, error }),
            }
        }
        Ok(listing)
    }

    /// The checkpoint `which` names: `"latest"` (what the `latest` pointer names; when there is
    /// no pointer, the newest complete checkpoint), `"best"` (what the `best` pointer names,
    /// see [`CheckpointStore::offer_best`]), a step number (`"1200"`), a directory name
    /// (`"ckpt-000000001200"`), or the URL or path of a checkpoint directory anywhere
    /// (`"s3://bucket/run1/ckpt-000000001200"`, opened with this store's options).
    pub async fn resolve(&self, which: &str) -> Result<Manifest, CheckpointError> {
        let which = which.trim();
        if which.is_empty() {
            return Err(CheckpointError::InvalidArgument(
                "no checkpoint named: use `latest`, a step number, or the URL of a checkpoint directory"
                    .into(),
            ));
        }
        if which == LATEST {
            return match self.get_opt(LATEST).await? {
                Some(bytes) => {
                    let name = std::str::from_utf8(&bytes).map(str::trim).unwrap_or("");
                    if parse_checkpoint_dir_name(name).is_none() {
                        return Err(CheckpointError::Corrupt {
                            object: self.child_url(LATEST),
                            reason: format!(
                                "it holds {}, which is not a checkpoint name (`ckpt-` and 12 digits)",
                                escaped(&bytes, 64)
                            ),
                        });
                    }
                    self.read_manifest(self, name).await
                }
                None => {
                    let newest = self.list().await?.pop();
                    let newest =
                        newest.ok_or_else(|| CheckpointError::NoCheckpoint { root: self.url.clone() })?;
                    self.read_manifest(self, &newest.dir).await
                }
            };
        }
        if which == crate::BEST {
            let best = self.best().await?.ok_or_else(|| {
                CheckpointError::InvalidArgument(format!(
                    "no `best` pointer under `{}`: it is written for jobs with [checkpoint] keep_best, once a scored checkpoint is complete",
                    self.url
                ))
            })?;
            return self.read_manifest(self, &best.checkpoint).await;
        }
        if let Ok(step) = which.parse::<u64>() {
            return self.read_manifest(self, &checkpoint_dir_name(step)).await;
        }
        if parse_checkpoint_dir_name(which).is_some() {
            return self.read_manifest(self, which).await;
        }
        // A URL or path of a checkpoint directory: open its parent as a root.
        let trimmed = which.trim_end_matches('/');
        let (parent, name) = match trimmed.rsplit_once('/') {
            Some((p, n)) if !n.is_empty() && !p.ends_with(':') && !p.ends_with(":/") => (p, n),
            Some((p, n)) if !n.is_empty() && p.ends_with(":/") => {
                return Err(CheckpointError::InvalidArgument(format!(
                    "`{which}` is a bucket, not a checkpoint directory (`{p}/{n}/ckpt-...`)"
                )));
            }
            _ if !trimmed.contains('/') => (".", trimmed),
            _ => {
                return Err(CheckpointError::InvalidArgument(format!(
                    "`{which}` is not `latest`, a step number, or the URL of a checkpoint directory"
                )));
            }
        };
        let parent = if parent.is_empty() { "/" } else { parent };
        let root = CheckpointStore::open_with(parent, self.options.clone())?;
        self.read_manifest(&root, name).await
    }

    async fn read_manifest(&self, root: &CheckpointStore, dir: &str) -> Result<Manifest, CheckpointError> {
        self.read_manifest_opt(root, dir).await?.ok_or_else(|| CheckpointError::MissingManifest {
            checkpoint: root.child_url(dir),
            manifest: root.child_url(&format!("{dir}/{MANIFEST}")),
        })
    }

    async fn read_manifest_opt(
        &self,
        root: &CheckpointStore,
        dir: &str,
    ) -> Result<Option<Manifest>, CheckpointError> {
        let rel = format!("{dir}/{MANIFEST}");
        let Some(bytes) = root.get_opt(&rel).await? else { return Ok(None) };
        let object = root.child_url(&rel);
        let corrupt = |reason: String| CheckpointError::Corrupt { object: object.clone(), reason };
        let mut m = decode_manifest(&bytes).map_err(corrupt)?;
        if m.format != MANIFEST_FORMAT {
            return Err(corrupt(format!("format is `{}`, expected `{MANIFEST_FORMAT}`", m.format)));
        }
        if m.format_version != FORMAT_VERSION {
            return Err(corrupt(format!(
                "format version {}; this build reads version {FORMAT_VERSION}",
                m.format_version
            )));
        }
        if m.shards.len() != m.num_shards as usize
            || m.shards.iter().enumerate().any(|(i, s)| s.shard as usize != i)
        {
            return Err(corrupt(format!(
                "lists shards {:?} for {} shards",
                m.shards.iter().map(|s| s.shard).collect::<Vec<_>>(),
                m.num_shards
            )));
        }
        if let Some(folder_step) = parse_checkpoint_dir_name(dir)
            && folder_step != m.step
        {
            return Err(corrupt(format!(
                "it is the manifest of step {}, but its folder `{dir}` is step {folder_step}",
                m.step
            )));
        }
        m.origin = Some(root.origin(dir));
        Ok(Some(m))
    }
}

/// A checkpoint directory's step and name, and what reading its manifest gave.
type DirRead = (u64, String, Result<Option<Manifest>, CheckpointError>);

/// What [`CheckpointStore::list_all`] found under a root.
#[derive(Debug, Default)]
pub struct Listing {
    /// The complete checkpoints, oldest first.
    pub checkpoints: Vec<CheckpointInfo>,
    /// Checkpoint directories whose manifest is there but could not be read or is not valid.
    pub unreadable: Vec<Unreadable>,
}

/// A checkpoint directory whose manifest could not be read or is not valid.
#[derive(Debug)]
pub struct Unreadable {
    /// The step its folder's name says.
    pub step: u64,
    /// Its folder's name.
    pub dir: String,
    /// Why it is not listed as a checkpoint.
    pub error: CheckpointError,
}

/// Checks that the shard manifests of one checkpoint agree and cover every dense tensor.
fn check_shards(
    checkpoint: &str,
    step: u64,
    num_shards: u32,
    shards: &[(ShardManifest, ObjectEntry)],
) -> Result<(), CheckpointError> {
    let bad = |reason: String| CheckpointError::Inconsistent { checkpoint: checkpoint.to_string(), reason };
    let first = &shards[0].0;
    for (s, (m, e)) in shards.iter().enumerate() {
        let name = format!("{checkpoint}/{}", e.path);
        if m.format != SHARD_MANIFEST_FORMAT || m.format_version != FORMAT_VERSION {
            return Err(bad(format!("`{name}` is format `{}` version {}", m.format, m.format_version)));
        }
        if m.step != step || m.shard as usize != s || m.num_shards != num_shards {
            return Err(bad(format!(
                "`{name}` is shard {} of {} at step {}, expected shard {s} of {num_shards} at step {step}",
                m.shard, m.num_shards, m.step
            )));
        }
        if m.mode != first.mode || m.partition_bytes != first.partition_bytes {
            return Err(bad(format!(
                "shard {s} ran {} with partition_bytes {}, shard 0 {} with {}",
                m.mode, m.partition_bytes, first.mode, first.partition_bytes
            )));
        }
        if let Some(d) = first.spec.first_difference(&m.spec) {
            return Err(bad(format!("shard {s}'s spec differs from shard 0's: {d}")));
        }
    }
    // Every element of every dense tensor in exactly one piece.
    let pieces = shards.iter().flat_map(|(m, _)| &m.files).flat_map(|f| match &f.content {
        FileContent::Dense { pieces } => pieces.as_slice(),
        FileContent::Sparse { .. } => &[],
    });
    check_coverage(&first.spec, pieces).map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Found by the `ckpt_shard_manifest` fuzz target: a shard manifest whose piece ends past
    // u64::MAX, or whose file sizes add up past it, made `finalize` panic (add with overflow).
    #[tokio::test]
    async fn finalize_refuses_shard_manifests_whose_numbers_overflow() {
        let store = CheckpointStore::open("memory://store-unit-overflow").unwrap();
        let written = store.write_shard(1, &crate::snapshot::tiny()).await.unwrap();
        let tampered = |f: &dyn Fn(&mut ShardManifest)| {
            let mut m = written.clone();
            f(&mut m);
            Bytes::from(serde_json::to_vec(&m).unwrap())
        };
        let offset = tampered(&|m| match &mut m.files[0].content {
            FileContent::Dense { pieces } => pieces[0].offset = u64::MAX,
            FileContent::Sparse { .. } => unreachable!(),
        });
        let bytes = tampered(&|m| m.files[0].bytes = u64::MAX);
        for (data, says) in [(offset, "ends past 2^64"), (bytes, "more than 2^64 bytes")] {
            store.put_small("ckpt-000000000001/shard-0/manifest.json", data).await.unwrap();
            match store.finalize(1, 1, 0, Duration::ZERO).await {
                Err(CheckpointError::Inconsistent { reason, .. }) => {
                    assert!(reason.contains(says), "{reason}")
                }
                other => panic!("expected Inconsistent ({says}), got {other:?}"),
            }
        }
    }
}
