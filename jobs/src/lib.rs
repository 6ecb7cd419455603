//! The job kinds. Each module has the same shape: a payload type with its validation, the
//! handler, and tests. The API validates with [`Registry::validate`]; the worker runs with
//! [`Handler::run`].

use serde_json::Value;
use shared::{
    connections::Targets, objects::ObjectStore, FieldError, JobContext, Problem, Settings,
};
use sqlx::PgPool;
use std::{collections::BTreeMap, sync::Arc};
use uuid::Uuid;

pub mod canary;
pub mod import;
pub mod ingest;
pub mod patch;
pub mod synthesis;

/// Why an attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Worth another attempt (a timeout, a lost connection, a flaky dependency).
    #[error("{0}")]
    Retryable(String),
    /// Will fail the same way every time: the job fails at once.
    #[error("{0}")]
    Permanent(String),
    #[error(transparent)]
    Cancelled(#[from] shared::Cancelled),
}

#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// The queue and the `kind` clients submit.
    fn kind(&self) -> &'static str;

    /// Checks a payload before the job is accepted; each error names its field under `payload`.
    fn validate(&self, payload: &Value) -> Result<(), Vec<FieldError>>;

    /// Checks the payload against the world before the job is accepted: the datasets,
    /// connections and tables it names. 404 for what the tenant cannot see, 422 otherwise.
    async fn preflight(&self, _tenant: Uuid, _payload: &Value) -> Result<(), Problem> {
        Ok(())
    }

    /// Called once when a worker starts serving this kind: loads what every job needs (a
    /// model), so that a worker that cannot run them fails at start-up, not mid-job.
    async fn prepare(&self) -> anyhow::Result<()> {
        Ok(())
    }

    /// Runs one attempt. It must be idempotent: delivery is at least once.
    async fn run(&self, ctx: &JobContext, payload: Value) -> Result<Value, JobError>;

    /// Called now and then by the maintenance leader (one worker process at a time): clears
    /// what this kind's jobs left behind that no attempt will clear any more (expired
    /// snapshots, staging tables of jobs that ended while their worker was gone).
    async fn sweep(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// The job kinds this build knows, by name.
#[derive(Clone)]
pub struct Registry {
    handlers: BTreeMap<&'static str, Arc<dyn Handler>>,
}

/// What handlers reach beyond their payload: the control plane, the object store and the
/// target databases. Built once per process.
pub struct Services {
    pub settings: Arc<Settings>,
    pub pool: PgPool,
    pub objects: ObjectStore,
    pub targets: Targets,
    /// The embedding model, loaded on first use.
    pub embedder: ingest::embed::SharedEmbedder,
}

impl Services {
    pub fn new(settings: Arc<Settings>, pool: PgPool) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            objects: ObjectStore::new(&settings.data_dir),
            targets: Targets::new(pool.clone(), &settings)?,
            embedder: ingest::embed::SharedEmbedder::new(&settings.model_dir),
            settings,
            pool,
        }))
    }
}

impl Default for Registry {
    /// Only the `canary` kind, which needs no services.
    fn default() -> Self {
        Self::new(vec![Arc::new(canary::Canary)])
    }
}

impl Registry {
    pub fn new(handlers: Vec<Arc<dyn Handler>>) -> Self {
        Self {
            handlers: handlers.into_iter().map(|h| (h.kind(), h)).collect(),
        }
    }

    /// Every job kind of this build.
    pub fn standard(services: Arc<Services>) -> Self {
        Self::new(vec![
            Arc::new(canary::Canary),
            Arc::new(import::Import::new(services.clone())),
            Arc::new(patch::Patch::new(services.clone())),
            Arc::new(patch::PatchRollback::new(services.clone())),
            Arc::new(synthesis::SynthesisJob::new(services.clone())),
            Arc::new(ingest::Ingest::new(services)),
        ])
    }

    pub fn get(&self, kind: &str) -> Option<&Arc<dyn Handler>> {
        self.handlers.get(kind)
    }

    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.handlers.keys().copied()
    }

    pub fn validate(&self, kind: &str, payload: &Value) -> Result<(), Vec<FieldError>> {
        match self.get(kind) {
            Some(handler) => handler.validate(payload),
            None => Err(vec![FieldError::new(
                "kind",
                format!(
                    "unknown job kind {kind:?}; expected one of: {}",
                    self.kinds().collect::<Vec<_>>().join(", ")
                ),
            )]),
        }
    }
}

impl Registry {
    /// [`Handler::sweep`] of every kind; a failing sweep is logged and tried again next time.
    pub async fn sweep(&self) {
        for (kind, handler) in &self.handlers {
            if let Err(e) = handler.sweep().await {
                tracing::warn!(kind, error = %e, "sweep failed");
            }
        }
    }

    /// [`Handler::preflight`] of the kind; unknown kinds were refused by `validate`.
    pub async fn preflight(
        &self,
        kind: &str,
        tenant: Uuid,
        payload: &Value,
    ) -> Result<(), Problem> {
        match self.get(kind) {
            Some(handler) => handler.preflight(tenant, payload).await,
            None => Ok(()),
        }
    }
}

/// Parses a payload into its type, turning serde's complaint into a field error.
pub fn parse_payload<T: serde::de::DeserializeOwned>(
    payload: &Value,
) -> Result<T, Vec<FieldError>> {
    serde_path_to_error::deserialize(payload).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "payload".to_owned()
        } else {
            format!("payload.{path}")
        };
        vec![FieldError::new(field, e.inner().to_string())]
    })
}
