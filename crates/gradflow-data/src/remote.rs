//! Data files on object storage: `s3://`, `gs://`, `az://`, `http(s)://` URLs (and `file://`,
//! which is a local path), globs over them, and streaming reads with read-ahead.
//!
//! A path in a reader's config that holds `://` is a URL. The store behind it is built by
//! [`gradflow_core::store::cloud_store`], the builder checkpoints use, so credentials are taken
//! the same way (`AWS_*`, `GOOGLE_*`, `AZURE_*`, then [`ReaderConfig::storage_options`]).
//!
//! Reads are ranged GETs of [`RemoteOptions::chunk_bytes`], with up to
//! [`RemoteOptions::read_ahead`] of them in flight ahead of the parser, so that a worker does
//! not wait on the network when the store is fast enough. They run on a small tokio runtime of
//! this crate's own (two threads), because the reader is synchronous and is called from inside
//! the trainer's runtime; a reader waits for a chunk on a channel, never by entering a runtime.
//! Every in-flight request belongs to one [`RemoteRead`] and is aborted when it is dropped.
//! A transient failure (a connection reset, a 5xx the store's own retries gave up on, a body
//! cut short) is retried [`RETRIES`] times with backoff; a missing bucket or object fails at
//! once with its URL.
//!
//! [`ReaderConfig::storage_options`]: crate::ReaderConfig::storage_options

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufRead, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, mpsc};
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, ObjectStoreScheme};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::error::{DataError, Result};

/// How often a transient failure of one ranged read is retried before the read fails.
pub const RETRIES: u32 = 5;

/// The URL schemes a data path may have.
const SUPPORTED: &str = "a local path, file://, s3://, gs://, az://, http://, https://";

/// How remote files are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RemoteOptions {
    /// Bytes per ranged read. Default 8 MiB.
    pub chunk_bytes: u64,
    /// Ranged reads in flight ahead of the parser, per open file. Default 4.
    pub read_ahead: usize,
}

impl Default for RemoteOptions {
    fn default() -> RemoteOptions {
        RemoteOptions { chunk_bytes: 8 << 20, read_ahead: 4 }
    }
}

/// The runtime that runs this crate's object-store requests.
static IO: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("gradflow-data-io")
        .enable_all()
        .build()
        .expect("building the data I/O runtime")
});

/// Runs `f` on the I/O runtime and waits for it, from any thread (also one of another
/// runtime's: it waits on a channel, not by entering a runtime).
pub(crate) fn wait<T: Send + 'static>(f: impl Future<Output = T> + Send + 'static) -> T {
    let (tx, rx) = mpsc::sync_channel(1);
    IO.spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv().expect("the data I/O runtime dropped a request")
}

/// Runs `f` on the I/O runtime; the caller owns the task (and aborts it when done with it).
pub(crate) fn spawn(f: impl Future<Output = ()> + Send + 'static) -> tokio::task::JoinHandle<()> {
    IO.spawn(f)
}

/// Whether `path` is written as a URL (`scheme://...`) rather than a local path.
pub fn is_url(path: &Path) -> bool {
    path.to_str().is_some_and(|s| s.contains("://"))
}

/// Checks that a path written as a URL parses and has a supported scheme (no I/O, no store
/// built); a local path passes.
pub fn check_url(path: &Path) -> Result<()> {
    if !is_url(path) {
        return Ok(());
    }
    let given = path.to_string_lossy();
    let invalid = |reason: String| DataError::Url { url: given.to_string(), reason };
    let parsed = Url::parse(&given.replace(['*', '?', '[', ']'], "_")).map_err(|e| invalid(e.to_string()))?;
    match parsed.scheme() {
        "file" | "s3" | "s3a" | "gs" | "az" | "azure" | "abfs" | "abfss" | "http" | "https" => Ok(()),
        other => Err(invalid(format!("`{other}://` is not a supported scheme (supported: {SUPPORTED})"))),
    }
}

/// Whether `path` has glob characters (`*`, `?`, `[`).
pub fn has_glob(path: impl AsRef<std::ffi::OsStr>) -> bool {
    path.as_ref().to_string_lossy().contains(['*', '?', '['])
}

/// One object of a store.
#[derive(Clone)]
pub(crate) struct RemoteFile {
    /// The URL, as messages show it.
    pub(crate) url: String,
    store: Arc<dyn ObjectStore>,
    path: ObjPath,
}

impl std::fmt::Debug for RemoteFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

/// Where a data path points.
#[derive(Debug, Clone)]
pub(crate) enum Location {
    /// A local file or directory.
    Local(PathBuf),
    /// An object (or a prefix, or a glob) in a store.
    Remote(RemoteFile),
}

/// The stores a reader opens, one per bucket (or host), with its storage options.
#[derive(Clone, Default)]
pub struct Stores {
    options: Vec<(String, String)>,
    remote: RemoteOptions,
    opened: Arc<Mutex<HashMap<String, Arc<dyn ObjectStore>>>>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores").field("remote", &self.remote).finish_non_exhaustive()
    }
}

impl Stores {
    /// Stores configured by the environment, then by `options` (object_store keys such as
    /// `aws_endpoint`), read with `remote`.
    pub fn new(options: Vec<(String, String)>, remote: RemoteOptions) -> Stores {
        Stores { options, remote, opened: Arc::default() }
    }

    /// Where `path` points: a local path (also for `file://`), or an object in a store.
    pub(crate) fn locate(&self, path: &Path) -> Result<Location> {
        if !is_url(path) {
            return Ok(Location::Local(path.to_path_buf()));
        }
        let given = path.to_string_lossy().into_owned();
        let invalid = |reason: String| DataError::Url { url: given.clone(), reason };
        // Glob characters are not URL syntax (`[` would be refused): parse without them.
        let parsed =
            Url::parse(&given.replace(['*', '?', '[', ']'], "_")).map_err(|e| invalid(e.to_string()))?;
        if parsed.scheme() == "file" {
            let local = Url::parse(&given)
                .ok()
                .and_then(|u| u.to_file_path().ok())
                .ok_or_else(|| invalid("expected file:///absolute/path".into()))?;
            return Ok(Location::Local(local));
        }
        let (scheme, _) = ObjectStoreScheme::parse(&parsed).map_err(|_| {
            invalid(format!("`{}://` is not a supported scheme (supported: {SUPPORTED})", parsed.scheme()))
        })?;
        let base = match scheme {
            ObjectStoreScheme::AmazonS3
            | ObjectStoreScheme::GoogleCloudStorage
            | ObjectStoreScheme::MicrosoftAzure
            | ObjectStoreScheme::Http => &given[..given.len() - parsed[url::Position::BeforePath..].len()],
            _ => {
                return Err(invalid(format!(
                    "`{}://` is not a supported scheme (supported: {SUPPORTED})",
                    parsed.scheme()
                )));
            }
        };
        let key = given[base.len()..].trim_start_matches('/');
        let store = {
            let mut opened = self.opened.lock().expect("store cache poisoned");
            match opened.get(base) {
                Some(s) => s.clone(),
                None => {
                    let s = gradflow_core::store::cloud_store(base, &self.options)
                        .map_err(|e| DataError::Url { url: given.clone(), reason: e.to_string() })?;
                    opened.insert(base.to_string(), s.clone());
                    s
                }
            }
        };
        // Keys are taken as written: a URL's percent-escapes name the key's characters.
        let decoded = percent_decode(key);
        let path = ObjPath::parse(&decoded).map_err(|e| invalid(e.to_string()))?;
        Ok(Location::Remote(RemoteFile { url: given, store, path }))
    }

    /// `path` as an object of a store: a URL's object, or a local file through object_store's
    /// local store (for the readers that work on stores, such as Parquet's).
    pub(crate) fn object(&self, path: &Path) -> Result<RemoteFile> {
        match self.locate(path)? {
            Location::Remote(r) => Ok(r),
            Location::Local(local) => {
                let absolute = std::path::absolute(&local).map_err(|e| DataError::io(&local, e))?;
                let object = ObjPath::from_absolute_path(&absolute).map_err(|e| DataError::Url {
                    url: local.display().to_string(),
                    reason: e.to_string(),
                })?;
                Ok(RemoteFile {
                    url: local.display().to_string(),
                    store: Arc::new(object_store::local::LocalFileSystem::new()),
                    path: object,
                })
            }
        }
    }

    /// The read-ahead settings.
    pub(crate) fn remote(&self) -> RemoteOptions {
        self.remote
    }
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("k={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

impl RemoteFile {
    /// The object's size; [`DataError::NotFound`] when it (or its bucket) does not exist.
    pub(crate) fn size(&self) -> Result<u64> {
        let (store, path) = (self.store.clone(), self.path.clone());
        match wait(async move { store.head(&path).await }) {
            Ok(meta) => Ok(meta.size),
            Err(e) => Err(store_error(&self.url, e)),
        }
    }

    /// The objects this URL names, sorted by key, with their sizes: the object itself, or, for
    /// a URL ending in `/` or naming no object, every object under it as a folder (hidden
    /// names, starting with `.` or `_`, left out), or, for a glob, the objects matching it
    /// (`*` and `?` within one `/`-separated part, `**` any number of parts).
    pub(crate) fn expand(&self) -> Result<Vec<(RemoteFile, u64)>> {
        let text = self.path.as_ref().to_string();
        if has_glob(&self.url) {
            let key = self.url_key();
            let fixed: Vec<&str> = key.split('/').take_while(|p| !has_glob(p)).collect();
            let pattern: Vec<String> = key.split('/').map(str::to_string).collect();
            let listed = self.list(&fixed.join("/"))?;
            let found: Vec<_> = listed
                .into_iter()
                .filter(|(p, _)| glob_match(&pattern, &p.split('/').collect::<Vec<_>>()))
                .collect();
            if found.is_empty() {
                return Err(DataError::NotFound {
                    url: self.url.clone(),
                    what: "no object matches the pattern",
                });
            }
            return Ok(found.into_iter().map(|(p, size)| (self.child(&p), size)).collect());
        }
        if !self.url.ends_with('/') {
            match self.size() {
                Ok(size) => return Ok(vec![(self.clone(), size)]),
                Err(DataError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let found: Vec<_> = self
            .list(&text)?
            .into_iter()
            .filter(|(p, _)| {
                let name = p.rsplit('/').next().unwrap_or("");
                !name.starts_with('.') && !name.starts_with('_')
            })
            .collect();
        if found.is_empty() {
            return Err(DataError::NotFound {
                url: self.url.clone(),
                what: "no such object, and no objects under it",
            });
        }
        Ok(found.into_iter().map(|(p, size)| (self.child(&p), size)).collect())
    }

    /// The key part of the URL as written (globs included), without a leading `/`.
    fn url_key(&self) -> String {
        let parsed = Url::parse(&self.url.replace(['*', '?', '[', ']'], "_")).expect("parsed when located");
        let base_len = self.url.len() - parsed[url::Position::BeforePath..].len();
        percent_decode(self.url[base_len..].trim_start_matches('/'))
    }

    /// Every object under the folder `prefix`, sorted by key.
    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let store = self.store.clone();
        let prefix = ObjPath::from(prefix);
        let listed = wait(async move {
            let p = if prefix.as_ref().is_empty() { None } else { Some(&prefix) };
            store.list(p).map_ok(|m| (m.location.as_ref().to_string(), m.size)).try_collect::<Vec<_>>().await
        });
        let mut listed = listed.map_err(|e| store_error(&self.url, e))?;
        listed.sort();
        Ok(listed)
    }

    /// The object at `key` of the same store, with its URL.
    fn child(&self, key: &str) -> RemoteFile {
        let parsed = Url::parse(&self.url.replace(['*', '?', '[', ']'], "_")).expect("parsed when located");
        let base = &self.url[..self.url.len() - parsed[url::Position::BeforePath..].len()];
        RemoteFile { url: format!("{base}/{key}"), store: self.store.clone(), path: ObjPath::from(key) }
    }

    /// Streams the object from byte `offset` on, `size` bytes long in all; ranged reads are
    /// made ahead of the reader up to `soft_end`, and one at a time after it.
    pub(crate) fn open(&self, offset: u64, size: u64, soft_end: u64, options: RemoteOptions) -> RemoteRead {
        RemoteRead {
            file: self.clone(),
            size,
            next: offset.min(size),
            soft_end,
            chunk: options.chunk_bytes.max(1),
            ahead: options.read_ahead.max(1),
            inflight: VecDeque::new(),
            current: Bytes::new(),
            pos: 0,
        }
    }
}

/// The error for a failed store request on `url`.
pub(crate) fn store_error(url: &str, e: object_store::Error) -> DataError {
    if missing(&e) {
        return DataError::NotFound { url: url.to_string(), what: "no such object or bucket" };
    }
    DataError::Store { url: url.to_string(), cause: e }
}

/// Whether a request failed because what it names does not exist. object_store says
/// `NotFound` for a missing object, but a listing of a missing bucket comes back as a generic
/// error around the HTTP 404, found here in its description.
fn missing(e: &object_store::Error) -> bool {
    match e {
        object_store::Error::NotFound { .. } => true,
        object_store::Error::Generic { .. } => format!("{e:?}").contains("status: 404"),
        _ => false,
    }
}

/// Whether a failed request may succeed when made again.
fn transient(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::Generic { .. } | object_store::Error::JoinError { .. }) && !missing(e)
}

/// One ranged read of `range`, retried on transient failures.
pub(crate) async fn fetch(file: RemoteFile, range: Range<u64>) -> io::Result<Bytes> {
    let mut delay = Duration::from_millis(50);
    let mut attempt = 0;
    loop {
        match file.store.get_range(&file.path, range.clone()).await {
            Ok(bytes) if bytes.len() as u64 == range.end - range.start => return Ok(bytes),
            Ok(bytes) if attempt >= RETRIES => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("bytes {range:?}: got {} bytes", bytes.len()),
                ));
            }
            Err(e) if attempt >= RETRIES || !transient(&e) => {
                let kind = match e {
                    object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
                    _ => io::ErrorKind::Other,
                };
                return Err(io::Error::new(kind, e.to_string()));
            }
            _ => {}
        }
        attempt += 1;
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// A ranged read in flight: its result arrives on `rx`.
struct Fetch {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    task: tokio::task::JoinHandle<()>,
}

/// The bytes of one object from an offset on, read by ranged reads made ahead of the reader.
pub(crate) struct RemoteRead {
    file: RemoteFile,
    size: u64,
    /// Offset of the next chunk to request.
    next: u64,
    soft_end: u64,
    chunk: u64,
    ahead: usize,
    inflight: VecDeque<Fetch>,
    current: Bytes,
    pos: usize,
}

impl RemoteRead {
    /// Requests chunks until `read_ahead` are in flight (one past `soft_end`).
    fn top_up(&mut self) {
        loop {
            let want = if self.next < self.soft_end { self.ahead } else { 1 };
            if self.inflight.len() >= want || self.next >= self.size {
                return;
            }
            let range = self.next..(self.next + self.chunk).min(self.size);
            self.next = range.end;
            let (tx, rx) = mpsc::sync_channel(1);
            let file = self.file.clone();
            let task = IO.spawn(async move {
                let _ = tx.send(fetch(file, range).await);
            });
            self.inflight.push_back(Fetch { rx, task });
        }
    }
}

impl Drop for RemoteRead {
    fn drop(&mut self) {
        for f in &self.inflight {
            f.task.abort();
        }
    }
}

impl BufRead for RemoteRead {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos >= self.current.len() {
            self.top_up();
            let Some(fetch) = self.inflight.pop_front() else { return Ok(&[]) };
            self.current =
                fetch.rx.recv().map_err(|_| io::Error::other("the data I/O runtime dropped a read"))??;
            self.pos = 0;
            self.top_up();
        }
        Ok(&self.current[self.pos..])
    }

    fn consume(&mut self, amount: usize) {
        self.pos = (self.pos + amount).min(self.current.len());
    }
}

impl Read for RemoteRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// Whether the key parts `key` match the glob parts `pattern`.
fn glob_match(pattern: &[String], key: &[&str]) -> bool {
    match pattern.split_first() {
        None => key.is_empty(),
        Some((p, rest)) if p == "**" => (0..=key.len()).any(|skip| glob_match(rest, &key[skip..])),
        Some((p, rest)) => match key.split_first() {
            Some((k, krest)) => part_match(p.as_bytes(), k.as_bytes()) && glob_match(rest, krest),
            None => false,
        },
    }
}

/// Whether `name` matches the one-part glob `p` (`*`, `?`, `[abc]`, `[a-z]`, `[!a]`).
fn part_match(p: &[u8], name: &[u8]) -> bool {
    match p.first() {
        None => name.is_empty(),
        Some(b'*') => (0..=name.len()).any(|skip| part_match(&p[1..], &name[skip..])),
        Some(b'?') => !name.is_empty() && part_match(&p[1..], &name[1..]),
        Some(b'[') => {
            let Some(close) = p.iter().skip(2).position(|&c| c == b']').map(|i| i + 2) else {
                return name.first() == Some(&b'[') && part_match(&p[1..], &name[1..]);
            };
            let Some(&c) = name.first() else { return false };
            let (negate, set) = match p[1] {
                b'!' | b'^' => (true, &p[2..close]),
                _ => (false, &p[1..close]),
            };
            let mut hit = false;
            let mut i = 0;
            while i < set.len() {
                if i + 2 < set.len() && set[i + 1] == b'-' {
                    hit |= set[i] <= c && c <= set[i + 2];
                    i += 3;
                } else {
                    hit |= set[i] == c;
                    i += 1;
                }
            }
            hit != negate && part_match(&p[close + 1..], &name[1..])
        }
        Some(&c) => name.first() == Some(&c) && part_match(&p[1..], &name[1..]),
    }
}

/// Whether the `/`-separated `key` matches the glob `pattern` (for local globs too).
pub(crate) fn glob_matches(pattern: &str, key: &str) -> bool {
    let pattern: Vec<String> = pattern.split('/').map(str::to_string).collect();
    glob_match(&pattern, &key.split('/').collect::<Vec<_>>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::{
        GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, PutMultipartOptions, PutOptions,
        PutPayload, PutResult,
    };
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn globs() {
        assert!(glob_matches("day=*/part-*.parquet", "day=1/part-0.parquet"));
        assert!(!glob_matches("day=*/part-*.parquet", "day=1/x/part-0.parquet"));
        assert!(glob_matches("**/part-?.csv", "a/b/part-7.csv"));
        assert!(glob_matches("**/part-?.csv", "part-7.csv"));
        assert!(!glob_matches("part-?.csv", "part-17.csv"));
        assert!(glob_matches("p[0-3].csv", "p2.csv"));
        assert!(!glob_matches("p[!0-3].csv", "p2.csv"));
        assert!(glob_matches("*", "anything"));
        assert!(!glob_matches("*", "a/b"));
    }

    /// A store whose first `failures` ranged reads fail as a dropped connection would.
    #[derive(Debug)]
    struct Flaky {
        inner: InMemory,
        failures: AtomicU32,
    }

    impl std::fmt::Display for Flaky {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Flaky")
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Flaky {
        async fn put_opts(
            &self,
            l: &ObjPath,
            p: PutPayload,
            o: PutOptions,
        ) -> object_store::Result<PutResult> {
            self.inner.put_opts(l, p, o).await
        }
        async fn put_multipart_opts(
            &self,
            l: &ObjPath,
            o: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(l, o).await
        }
        async fn get_opts(&self, l: &ObjPath, o: GetOptions) -> object_store::Result<GetResult> {
            if o.range.is_some()
                && self
                    .failures
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                return Err(object_store::Error::Generic {
                    store: "Flaky",
                    source: "connection reset".into(),
                });
            }
            self.inner.get_opts(l, o).await
        }
        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<'static, object_store::Result<ObjPath>>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<ObjPath>> {
            self.inner.delete_stream(locations)
        }
        fn list(
            &self,
            p: Option<&ObjPath>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.inner.list(p)
        }
        async fn list_with_delimiter(&self, p: Option<&ObjPath>) -> object_store::Result<ListResult> {
            self.inner.list_with_delimiter(p).await
        }
        async fn copy_opts(
            &self,
            f: &ObjPath,
            t: &ObjPath,
            o: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(f, t, o).await
        }
    }

    #[test]
    fn ranged_reads_with_read_ahead_give_the_bytes_and_survive_transient_failures() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        for (failures, offset, chunk, ahead) in [(0, 0, 4096, 4), (3, 17, 1000, 2), (0, 99_999, 7, 1)] {
            let store = Arc::new(Flaky { inner: InMemory::new(), failures: AtomicU32::new(0) });
            let path = ObjPath::from("d/x.csv");
            let (s, p, d) = (store.clone(), path.clone(), data.clone());
            wait(async move { s.put(&p, PutPayload::from(d)).await.unwrap() });
            store.failures.store(failures, Ordering::SeqCst);
            let file = RemoteFile { url: "mem://b/d/x.csv".into(), store: store.clone(), path };
            let size = file.size().unwrap();
            let mut read =
                file.open(offset, size, 50_000, RemoteOptions { chunk_bytes: chunk, read_ahead: ahead });
            let mut got = Vec::new();
            read.read_to_end(&mut got).unwrap();
            assert_eq!(got, &data[offset as usize..], "failures {failures}, offset {offset}");
            assert_eq!(store.failures.load(Ordering::SeqCst), 0, "every failure was retried");
        }
        // More failures in a row than retries: the read fails, naming the URL.
        let store = Arc::new(Flaky { inner: InMemory::new(), failures: AtomicU32::new(0) });
        let path = ObjPath::from("x");
        let (s, p) = (store.clone(), path.clone());
        wait(async move { s.put(&p, PutPayload::from(vec![1u8; 10])).await.unwrap() });
        store.failures.store(RETRIES + 1, Ordering::SeqCst);
        let file = RemoteFile { url: "mem://b/x".into(), store, path };
        let err = file.open(0, 10, 10, RemoteOptions::default()).read_to_end(&mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("connection reset"), "{err}");
    }
}
