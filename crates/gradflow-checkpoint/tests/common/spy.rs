//! An in-memory object store that counts multipart uploads and can refuse every write, like
//! a bucket whose credentials lost write access.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

#[derive(Debug, Default)]
pub struct SpyStore {
    pub inner: InMemory,
    pub refuse_writes: AtomicBool,
    pub multipart_uploads: AtomicUsize,
    pub puts: AtomicUsize,
}

impl SpyStore {
    pub fn new() -> Arc<SpyStore> {
        Arc::new(SpyStore::default())
    }

    fn check(&self, location: &Path) -> Result<()> {
        if self.refuse_writes.load(Ordering::SeqCst) {
            return Err(object_store::Error::PermissionDenied {
                path: location.to_string(),
                source: "this test store refuses writes (403 AccessDenied)".into(),
            });
        }
        Ok(())
    }
}

impl fmt::Display for SpyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpyStore")
    }
}

#[async_trait::async_trait]
impl ObjectStore for SpyStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        self.check(location)?;
        self.puts.fetch_add(1, Ordering::SeqCst);
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.check(location)?;
        self.multipart_uploads.fetch_add(1, Ordering::SeqCst);
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.check(to)?;
        self.inner.copy_opts(from, to, options).await
    }
}
