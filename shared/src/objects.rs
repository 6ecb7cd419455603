//! The object store: uploaded datasets and job artifacts, as files under `CONVEYOR_DATA_DIR`.
//! Workers read datasets by path; a file appears under its final name only once complete.

use std::path::{Path, PathBuf};
use uuid::Uuid;

#[derive(Clone, Debug)]
pub struct ObjectStore {
    root: PathBuf,
}

impl ObjectStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn dataset_path(&self, tenant: Uuid, dataset: Uuid) -> PathBuf {
        self.root
            .join("tenants")
            .join(tenant.to_string())
            .join("datasets")
            .join(dataset.to_string())
    }

    /// Where a job's artifacts live (`rejected.csv`, `report.json`, ...).
    pub fn artifact_dir(&self, job: Uuid) -> PathBuf {
        self.root.join("artifacts").join(job.to_string())
    }

    /// A file name under the store's scratch directory, for a write that is renamed into
    /// place when complete.
    pub async fn scratch_path(&self) -> std::io::Result<PathBuf> {
        let dir = self.root.join("tmp");
        tokio::fs::create_dir_all(&dir).await?;
        Ok(dir.join(Uuid::new_v4().to_string()))
    }

    /// Moves a complete scratch file to its final place.
    pub async fn publish(&self, scratch: &Path, destination: &Path) -> std::io::Result<()> {
        if let Some(parent) = destination.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        tokio::fs::rename(scratch, destination).await
    }

    /// Writes one artifact of `job` atomically; returns its size.
    pub async fn put_artifact(&self, job: Uuid, name: &str, bytes: &[u8]) -> std::io::Result<u64> {
        let scratch = self.scratch_path().await?;
        tokio::fs::write(&scratch, bytes).await?;
        self.publish(&scratch, &self.artifact_dir(job).join(name))
            .await?;
        Ok(bytes.len() as u64)
    }

    /// The artifact's path, if `name` is a plain file name and the file exists.
    pub fn artifact_path(&self, job: Uuid, name: &str) -> Option<PathBuf> {
        let plain = !name.is_empty()
            && !name.starts_with('.')
            && !name.contains(['/', '\\'])
            && name.len() <= 255;
        let path = self.artifact_dir(job).join(name);
        (plain && path.is_file()).then_some(path)
    }
}
