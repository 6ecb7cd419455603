//! The object store: uploaded datasets and job artifacts. Objects are files under
//! `CONVEYOR_DATA_DIR` by default, or objects in an S3-compatible bucket when
//! `CONVEYOR_OBJECT_STORE_URL` (`s3://bucket/prefix`) is set. The data directory always holds
//! the scratch files that writes start in and, with a bucket, each worker's cache of the
//! datasets it read (named by their checksum: a retried synthesis replaces its output).
//!
//! An object appears under its key only once complete: a local file is renamed into place, an
//! upload is one multipart upload completed at the end.

use bytes::Bytes;
use futures::{stream::BoxStream, StreamExt, TryStreamExt};
use object_store::{aws::AmazonS3Builder, path::Path as Key, ObjectStoreExt, WriteMultipart};
use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};
use tokio::io::AsyncReadExt;
use uuid::Uuid;

use crate::datasets::Dataset;

/// Bytes of an object, streamed.
pub type ObjectStream = BoxStream<'static, std::io::Result<Bytes>>;

/// Where the objects live, and how to reach the bucket.
#[derive(Clone, Default)]
pub struct BucketConfig {
    /// `s3://bucket` or `s3://bucket/prefix`.
    pub url: String,
    /// object_store's S3 settings (`aws_endpoint`, `aws_access_key_id`, `aws_allow_http`, ...);
    /// from the environment's `AWS_*` variables.
    pub options: Vec<(String, String)>,
}

impl fmt::Debug for BucketConfig {
    /// Names the settings, never their values (they hold credentials).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.options.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("BucketConfig")
            .field("url", &self.url)
            .field("options", &names)
            .finish()
    }
}

/// The platform's object store failed: logged whole, told in a few words. Its text names the
/// store's address, the keys' layout and up to kilobytes of the service's answer (a signature
/// mismatch echoes the request it signed), and jobs copy their errors into what a tenant reads.
fn platform_failed(e: object_store::Error) -> anyhow::Error {
    tracing::warn!(error = %e, "the object store failed");
    anyhow::anyhow!(match e {
        object_store::Error::NotFound { .. } => "the object store has no such object",
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => {
            "the object store refused the platform's credentials"
        }
        _ => "the object store failed or did not answer",
    })
}

/// A deletion the store did not finish within its timeout (some objects may be gone).
#[derive(Debug, thiserror::Error)]
#[error("the object store did not finish a deletion within {0:?}")]
pub struct DeleteTimedOut(pub std::time::Duration);

/// A scratch file's path; the file goes when the value does (if it was not moved away).
pub struct ScratchFile(PathBuf);

impl std::ops::Deref for ScratchFile {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        // Synchronous: a drop cannot await, and unlinking one file does not block for long.
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.0.display(), error = %e, "scratch file left behind");
            }
        }
    }
}

#[derive(Clone)]
pub struct ObjectStore {
    root: PathBuf,
    bucket: Option<Bucket>,
    /// Most bytes of downloaded datasets kept in `root/cache`, as [`evict_cache`] keeps them.
    cache_limit: u64,
    /// How long deleting a job's artifacts may take: its row is locked meanwhile.
    delete_timeout: std::time::Duration,
    /// Cached files jobs hold now (see [`DatasetFile`]), with how many hold each.
    pins: Pins,
}

type Pins = Arc<std::sync::Mutex<std::collections::HashMap<PathBuf, usize>>>;

/// A dataset's local file. A cached copy stays while this lives: readers (polars' Parquet
/// slices) open it again by path for as long as the job runs.
#[derive(Debug)]
pub struct DatasetFile {
    path: PathBuf,
    pins: Option<Pins>,
}

impl DatasetFile {
    /// Takes a hold on `path`; the caller holds `pins`' lock.
    fn pinned(
        path: PathBuf,
        pins: &Pins,
        held: &mut std::collections::HashMap<PathBuf, usize>,
    ) -> Self {
        *held.entry(path.clone()).or_default() += 1;
        Self {
            path,
            pins: Some(pins.clone()),
        }
    }
}

impl std::ops::Deref for DatasetFile {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl Drop for DatasetFile {
    fn drop(&mut self) {
        let Some(pins) = &self.pins else { return };
        let mut held = pins.lock().expect("pins lock");
        if let Some(count) = held.get_mut(&self.path) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.path);
            }
        }
    }
}

#[derive(Clone)]
struct Bucket {
    store: Arc<dyn object_store::ObjectStore>,
    prefix: String,
}

impl fmt::Debug for ObjectStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectStore")
            .field("root", &self.root)
            .field("bucket", &self.bucket.as_ref().map(|b| b.store.to_string()))
            .finish()
    }
}

/// Parts of a multipart upload, and how many are in flight at once.
const PART_SIZE: usize = 8 << 20;
const PARTS_IN_FLIGHT: usize = 4;

impl ObjectStore {
    /// Objects as files under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            bucket: None,
            cache_limit: u64::MAX,
            delete_timeout: std::time::Duration::from_secs(30),
            pins: Pins::default(),
        }
    }

    /// The deployment's store: its data directory, its bucket if it names one, and its
    /// bound on the cache of downloaded datasets.
    pub fn from_settings(settings: &crate::Settings) -> anyhow::Result<Self> {
        let mut store = Self::with_bucket(&settings.data_dir, settings.object_store.as_ref())?;
        store.cache_limit = settings.cache_max_bytes;
        store.delete_timeout = settings.object_delete_timeout;
        Ok(store)
    }

    /// Objects in the bucket, when one is configured; `root` keeps scratch files and the cache.
    pub fn with_bucket(
        root: impl Into<PathBuf>,
        bucket: Option<&BucketConfig>,
    ) -> anyhow::Result<Self> {
        let mut store = Self::new(root);
        if let Some(config) = bucket {
            let mut builder = AmazonS3Builder::new().with_url(&config.url);
            for (key, value) in &config.options {
                // Every AWS_* variable is offered; ones the store does not know (IRSA's
                // AWS_STS_REGIONAL_ENDPOINTS, a shell's AWS_PROFILE) stopped every process.
                match key.parse() {
                    Ok(known) => builder = builder.with_config(known, value),
                    Err(_) => tracing::warn!(key, "object store option not known; ignored"),
                }
            }
            let prefix = config
                .url
                .split_once("://")
                .and_then(|(_, rest)| rest.split_once('/'))
                .map(|(_, prefix)| prefix.trim_matches('/').to_owned())
                .unwrap_or_default();
            store.bucket = Some(Bucket {
                store: Arc::new(builder.build()?),
                prefix,
            });
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A file name under the store's scratch directory, for a write that is moved into the
    /// store when complete.
    pub async fn scratch_path(&self) -> std::io::Result<PathBuf> {
        let dir = self.root.join("tmp");
        tokio::fs::create_dir_all(&dir).await?;
        Ok(dir.join(Uuid::new_v4().to_string()))
    }

    /// Like [`Self::scratch_path`], removed when the value is dropped: a request cancelled at
    /// any await (a client that hangs up mid-upload) leaves nothing behind.
    pub async fn scratch_file(&self) -> std::io::Result<ScratchFile> {
        Ok(ScratchFile(self.scratch_path().await?))
    }

    /// Moves a complete scratch file into the store as the dataset's bytes.
    pub async fn put_dataset(
        &self,
        scratch: &Path,
        tenant: Uuid,
        dataset: Uuid,
    ) -> anyhow::Result<()> {
        self.put_file(scratch, &dataset_key(tenant, dataset)).await
    }

    /// Moves a complete scratch file into the store as an artifact of `job`, replacing one of
    /// the same name (a retried attempt leaves one copy); returns its size.
    pub async fn put_artifact_file(
        &self,
        scratch: &Path,
        job: Uuid,
        name: &str,
    ) -> anyhow::Result<u64> {
        let size = tokio::fs::metadata(scratch).await?.len();
        self.put_file(scratch, &artifact_key(job, name)).await?;
        Ok(size)
    }

    /// Writes one artifact of `job` atomically; returns its size. Its scratch file goes on
    /// every way out (one whose store failed stayed in `tmp` for good).
    pub async fn put_artifact(&self, job: Uuid, name: &str, bytes: &[u8]) -> anyhow::Result<u64> {
        let scratch = self.scratch_file().await?;
        tokio::fs::write(&*scratch, bytes).await?;
        self.put_artifact_file(&scratch, job, name).await
    }

    /// A local file with the dataset's bytes, for readers that need one (polars seeks in
    /// Parquet files): the stored file itself, or the bucket's object, downloaded once into the
    /// cache and kept there while the returned value lives. The cached copy is named by the
    /// record's checksum too: a retried synthesis replaces its output, and a copy of the first
    /// output must not be read as the second.
    pub async fn dataset_file(&self, dataset: &Dataset) -> anyhow::Result<DatasetFile> {
        let key = dataset_key(dataset.tenant_id, dataset.id);
        let Some(bucket) = &self.bucket else {
            return Ok(DatasetFile {
                path: self.root.join(&key),
                pins: None,
            });
        };
        let cached = self.root.join("cache").join(cached_name(dataset));
        // Found and held under the lock eviction takes for each file it removes.
        if let Some(file) = self.hold_cached(&cached)? {
            return Ok(file);
        }
        let scratch = self.scratch_path().await?;
        let downloaded = async {
            let mut file = tokio::fs::File::create(&scratch).await?;
            let object = bucket.store.get(&bucket.key(&key)).await;
            let mut stream = object.map_err(platform_failed)?.into_stream();
            while let Some(chunk) = stream.try_next().await.map_err(platform_failed)? {
                tokio::io::AsyncWriteExt::write_all(&mut file, &chunk).await?;
            }
            tokio::io::AsyncWriteExt::flush(&mut file).await?;
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = downloaded {
            let _ = tokio::fs::remove_file(&scratch).await;
            return Err(e);
        }
        let file = {
            let mut held = self.pins.lock().expect("pins lock");
            if let Some(parent) = cached.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::rename(&scratch, &cached)?;
            DatasetFile::pinned(cached, &self.pins, &mut held)
        };
        let (cache, limit, pins) = (self.root.join("cache"), self.cache_limit, self.pins.clone());
        let evicted =
            tokio::task::spawn_blocking(move || evict_cache(&cache, limit, &pins)).await?;
        if let Err(e) = evicted {
            tracing::warn!(error = %e, "the dataset cache could not be trimmed");
        }
        Ok(file)
    }

    /// The cached copy at `cached`, held, its time of last use (which eviction goes by) now;
    /// `None` when it is not cached.
    fn hold_cached(&self, cached: &Path) -> std::io::Result<Option<DatasetFile>> {
        let mut held = self.pins.lock().expect("pins lock");
        match std::fs::File::options().append(true).open(cached) {
            Ok(file) => {
                file.set_modified(std::time::SystemTime::now())?;
                Ok(Some(DatasetFile::pinned(
                    cached.to_owned(),
                    &self.pins,
                    &mut held,
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The dataset's bytes and their length; `None` when it is not stored.
    pub async fn read_dataset(
        &self,
        tenant: Uuid,
        dataset: Uuid,
    ) -> anyhow::Result<Option<(u64, ObjectStream)>> {
        self.read(&dataset_key(tenant, dataset)).await
    }

    /// An artifact's bytes and their length; `None` when `name` is not a plain file name or
    /// there is no such artifact.
    pub async fn read_artifact(
        &self,
        job: Uuid,
        name: &str,
    ) -> anyhow::Result<Option<(u64, ObjectStream)>> {
        let plain = !name.is_empty()
            && !name.starts_with('.')
            && !name.contains(['/', '\\', '\0'])
            && name.len() <= 255;
        if !plain {
            return Ok(None);
        }
        self.read(&artifact_key(job, name)).await
    }

    pub async fn delete_dataset(&self, tenant: Uuid, dataset: Uuid) -> anyhow::Result<()> {
        let key = dataset_key(tenant, dataset);
        if let Some(bucket) = &self.bucket {
            // The bucket's object first: a local cache that cannot be read left it for ever.
            match bucket.store.delete(&bucket.key(&key)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(platform_failed(e)),
            }
            return Ok(remove_cached(&self.root.join("cache"), tenant, dataset).await?);
        }
        Ok(remove_if_present(&self.root.join(&key)).await?)
    }

    /// Stores a serialized model of the tenant atomically; returns its key.
    pub async fn put_model(
        &self,
        tenant: Uuid,
        model: Uuid,
        bytes: &[u8],
    ) -> anyhow::Result<String> {
        // Gone on every way out, as `put_artifact`'s.
        let scratch = self.scratch_file().await?;
        tokio::fs::write(&*scratch, bytes).await?;
        let key = model_key(tenant, model);
        self.put_file(&scratch, &key).await?;
        Ok(key)
    }

    /// A serialized model's bytes (models are small: kilobytes to a few megabytes); `None`
    /// when it is not stored.
    pub async fn read_model(&self, tenant: Uuid, model: Uuid) -> anyhow::Result<Option<Vec<u8>>> {
        let Some((size, mut stream)) = self.read(&model_key(tenant, model)).await? else {
            return Ok(None);
        };
        let mut bytes = Vec::with_capacity(size as usize);
        while let Some(chunk) = stream.try_next().await? {
            bytes.extend_from_slice(&chunk);
        }
        Ok(Some(bytes))
    }

    /// How long one deletion may take (`CONVEYOR_OBJECT_DELETE_TIMEOUT_SECS`).
    pub fn delete_timeout(&self) -> std::time::Duration {
        self.delete_timeout
    }

    pub async fn delete_model(&self, tenant: Uuid, model: Uuid) -> anyhow::Result<()> {
        let key = model_key(tenant, model);
        if let Some(bucket) = &self.bucket {
            return match bucket.store.delete(&bucket.key(&key)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(platform_failed(e)),
            };
        }
        Ok(remove_if_present(&self.root.join(&key)).await?)
    }

    /// Deletes every artifact of `job`; none is no error. Callers hold the job's row locked
    /// until it ends, so a store that does not answer fails it past the store's timeout (the
    /// client's own retries alone would take minutes).
    pub async fn delete_artifacts(&self, job: Uuid) -> anyhow::Result<()> {
        tokio::time::timeout(self.delete_timeout, self.delete_artifacts_now(job))
            .await
            .map_err(|_| DeleteTimedOut(self.delete_timeout))?
    }

    async fn delete_artifacts_now(&self, job: Uuid) -> anyhow::Result<()> {
        let dir = artifact_key(job, "");
        let Some(bucket) = &self.bucket else {
            return match tokio::fs::remove_dir_all(self.root.join(&dir)).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            };
        };
        let listed = bucket
            .store
            .list(Some(&bucket.key(dir.trim_end_matches('/'))))
            .map_ok(|object| object.location)
            .boxed();
        let mut deleted = bucket.store.delete_stream(listed);
        while let Some(result) = deleted.next().await {
            match result {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(platform_failed(e)),
            }
        }
        Ok(())
    }

    async fn put_file(&self, scratch: &Path, key: &str) -> anyhow::Result<()> {
        let Some(bucket) = &self.bucket else {
            return Ok(rename_into(scratch, &self.root.join(key)).await?);
        };
        let uploaded = bucket.upload(scratch, key).await;
        let _ = tokio::fs::remove_file(scratch).await;
        uploaded
    }

    async fn read(&self, key: &str) -> anyhow::Result<Option<(u64, ObjectStream)>> {
        if let Some(bucket) = &self.bucket {
            return match bucket.store.get(&bucket.key(key)).await {
                Ok(object) => {
                    let size = object.meta.size;
                    // A failure part-way is told as one at the start is.
                    let failed = |e| std::io::Error::other(platform_failed(e));
                    let stream = object.into_stream().map_err(failed).boxed();
                    Ok(Some((size, stream)))
                }
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(platform_failed(e)),
            };
        }
        let file = match tokio::fs::File::open(self.root.join(key)).await {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let metadata = file.metadata().await?;
        if !metadata.is_file() {
            return Ok(None);
        }
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 16).boxed();
        Ok(Some((metadata.len(), stream)))
    }
}

impl Bucket {
    fn key(&self, key: &str) -> Key {
        match self.prefix.is_empty() {
            true => Key::from(key),
            false => Key::from(format!("{}/{key}", self.prefix)),
        }
    }

    /// Streams the file up as one multipart upload: the object appears only when it completes,
    /// and memory stays at a few parts whatever the file's size.
    async fn upload(&self, file: &Path, key: &str) -> anyhow::Result<()> {
        let upload = self.store.put_multipart(&self.key(key)).await;
        let upload = upload.map_err(platform_failed)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let sent = async {
            let mut file = tokio::fs::File::open(file).await?;
            let mut buffer = vec![0u8; 1 << 20];
            loop {
                let n = file.read(&mut buffer).await?;
                if n == 0 {
                    break;
                }
                let room = writer.wait_for_capacity(PARTS_IN_FLIGHT).await;
                room.map_err(platform_failed)?;
                writer.write(&buffer[..n]);
            }
            anyhow::Ok(())
        }
        .await;
        match sent {
            Ok(()) => writer.finish().await.map(drop).map_err(platform_failed),
            Err(e) => {
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }
}

fn dataset_key(tenant: Uuid, dataset: Uuid) -> String {
    format!("tenants/{tenant}/datasets/{dataset}")
}

/// The cached copy's name: the dataset's key and the checksum of the bytes it holds.
fn cached_name(dataset: &Dataset) -> String {
    let key = dataset_key(dataset.tenant_id, dataset.id);
    let sha256 = &dataset.sha256;
    // Computed by the server; anything else (there is nothing else) is not made a path.
    if sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        format!("{key}.{sha256}")
    } else {
        format!("{key}.unchecked")
    }
}

/// Removes the cached copies of a dataset, of every version.
async fn remove_cached(cache: &Path, tenant: Uuid, dataset: Uuid) -> std::io::Result<()> {
    let dir = cache.join(format!("tenants/{tenant}/datasets"));
    let mut entries = match tokio::fs::read_dir(&dir).await {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        entries => entries?,
    };
    let prefix = format!("{dataset}.");
    while let Some(entry) = entries.next_entry().await? {
        let name = entry.file_name();
        if name.to_str().is_some_and(|name| name.starts_with(&prefix)) {
            remove_if_present(&entry.path()).await?;
        }
    }
    Ok(())
}

fn model_key(tenant: Uuid, model: Uuid) -> String {
    format!("tenants/{tenant}/models/{model}")
}

fn artifact_key(job: Uuid, name: &str) -> String {
    format!("artifacts/{job}/{name}")
}

/// Removes the least recently used files under `cache` until their total is at most `limit`
/// bytes, passing over those jobs hold (`pins`). Datasets never change, so a removed copy is
/// only downloaded again; a dataset its tenant deleted leaves the cache as newer downloads
/// push it out. Returns the bytes removed.
fn evict_cache(cache: &Path, limit: u64, pins: &Pins) -> std::io::Result<u64> {
    type Found = Vec<(std::time::SystemTime, u64, PathBuf)>;
    fn files(dir: &Path, into: &mut Found) -> std::io::Result<()> {
        let entries = match std::fs::read_dir(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            entries => entries?,
        };
        for entry in entries {
            let entry = entry?;
            // Gone since listed (another eviction): nothing to count.
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                files(&entry.path(), into)?;
            } else if meta.is_file() {
                into.push((meta.modified()?, meta.len(), entry.path()));
            }
        }
        Ok(())
    }
    let mut cached = Vec::new();
    files(cache, &mut cached)?;
    let mut total: u64 = cached.iter().map(|(_, len, _)| len).sum();
    cached.sort_by_key(|(used, _, _)| *used);
    let mut removed = 0;
    for (_, len, path) in cached {
        if total <= limit {
            break;
        }
        let held = pins.lock().expect("pins lock");
        if held.contains_key(&path) {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => removed += len,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        drop(held);
        total -= len;
    }
    Ok(removed)
}

async fn rename_into(from: &Path, to: &Path) -> std::io::Result<()> {
    if let Some(parent) = to.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    tokio::fs::rename(from, to).await
}

async fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match tokio::fs::remove_file(path).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn cached(dir: &Path, name: &str, len: usize, used_ago: Duration) -> PathBuf {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, vec![b'x'; len]).unwrap();
        let file = std::fs::File::options().append(true).open(&path).unwrap();
        file.set_modified(SystemTime::now() - used_ago).unwrap();
        path
    }

    /// An artifact or a model whose store failed left its scratch file in `tmp` for good.
    #[tokio::test]
    async fn a_failed_store_leaves_no_scratch_file() {
        let root = std::env::temp_dir().join(format!("conveyor-objects-{}", Uuid::new_v4()));
        let store = ObjectStore::new(&root);
        let (job, tenant, model) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        // Where each would go is a file: storing fails (root or not).
        for blocked in [
            format!("artifacts/{job}"),
            format!("tenants/{tenant}/models"),
        ] {
            let path = root.join(blocked);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, b"not a directory").unwrap();
        }
        assert!(store.put_artifact(job, "report.json", b"{}").await.is_err());
        assert!(store.put_model(tenant, model, b"model").await.is_err());
        let left: Vec<_> = std::fs::read_dir(root.join("tmp")).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        std::fs::remove_dir_all(root).unwrap();
    }

    /// An AWS_* variable the store does not know is ignored, not a failure to start.
    #[test]
    fn an_unknown_bucket_option_is_ignored() {
        let config = BucketConfig {
            url: "s3://bucket".into(),
            options: vec![
                ("aws_region".into(), "us-east-1".into()),
                ("aws_sts_regional_endpoints".into(), "regional".into()),
            ],
        };
        let root = std::env::temp_dir().join(format!("conveyor-objects-{}", Uuid::new_v4()));
        assert!(ObjectStore::with_bucket(&root, Some(&config)).is_ok());
    }

    #[test]
    fn the_cache_keeps_its_bound_by_dropping_the_least_recently_used_not_held() {
        let dir = std::env::temp_dir().join(format!("conveyor-cache-{}", Uuid::new_v4()));
        let hour = Duration::from_secs(3600);
        let held = cached(&dir, "tenants/a/datasets/0", 400, 4 * hour);
        let oldest = cached(&dir, "tenants/a/datasets/1", 400, 3 * hour);
        let older = cached(&dir, "tenants/b/datasets/2", 400, 2 * hour);
        let old = cached(&dir, "tenants/a/datasets/3", 400, hour);
        let recent = cached(&dir, "tenants/b/datasets/4", 400, Duration::ZERO);
        let pins = Pins::default();
        let file = DatasetFile::pinned(held.clone(), &pins, &mut pins.lock().unwrap());

        // 2,000 bytes against 900: the least recently used go, but not one a job holds.
        assert_eq!(evict_cache(&dir, 900, &pins).unwrap(), 1200);
        assert!(held.exists() && !oldest.exists() && !older.exists() && !old.exists());
        assert!(recent.exists());

        // Held files stay even past the bound; let go, they may go.
        assert_eq!(evict_cache(&dir, 0, &pins).unwrap(), 400);
        assert!(held.exists() && !recent.exists());
        drop(file);
        assert!(pins.lock().unwrap().is_empty());
        assert_eq!(evict_cache(&dir, 0, &pins).unwrap(), 400);
        assert_eq!(evict_cache(&dir.join("absent"), 0, &pins).unwrap(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
