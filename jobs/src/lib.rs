//! The job kinds. Each module has the same shape: a payload type with its validation, the
//! handler, and tests. The API validates with [`Registry::validate`]; the worker runs with
//! [`Handler::run`].

use serde_json::Value;
use shared::{
    connections::{SessionLimits, Targets},
    objects::ObjectStore,
    FieldError, JobContext, Problem, Settings,
};
use sqlx::PgPool;
use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::sync::Semaphore;
use uuid::Uuid;

pub mod canary;
pub mod import;
pub mod ingest;
pub mod limits;
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
    preflights: Arc<Preflights>,
}

/// What handlers reach beyond their payload: the control plane, the object store and the
/// target databases. Built once per process.
pub struct Services {
    pub settings: Arc<Settings>,
    pub pool: PgPool,
    pub objects: ObjectStore,
    pub targets: Targets,
    /// The embedding model, loaded on first use.
    pub embedder: embed::SharedEmbedder,
    /// Bounds the preflights that reach target databases.
    pub preflights: Arc<Preflights>,
    /// Caps on the bytes a job reads from its datasets.
    pub limits: limits::Limits,
    /// Extracts documents' text in a child process.
    pub extractor: ingest::isolated::Extractor,
}

impl Services {
    /// For a worker: sessions on target databases bounded for jobs.
    pub fn new(settings: Arc<Settings>, pool: PgPool) -> anyhow::Result<Arc<Self>> {
        let limits = SessionLimits::jobs(&settings);
        Self::with_limits(settings, pool, limits)
    }

    /// For the API, which reaches target databases only to preflight.
    pub fn for_api(settings: Arc<Settings>, pool: PgPool) -> anyhow::Result<Arc<Self>> {
        let limits = SessionLimits::preflight(&settings);
        Self::with_limits(settings, pool, limits)
    }

    fn with_limits(
        settings: Arc<Settings>,
        pool: PgPool,
        limits: SessionLimits,
    ) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            objects: ObjectStore::with_bucket(&settings.data_dir, settings.object_store.as_ref())?,
            targets: Targets::new(pool.clone(), &settings, limits)?,
            embedder: embed::SharedEmbedder::new(&settings.model_dir),
            preflights: Arc::new(Preflights::new(
                settings.preflight_timeout,
                settings.preflight_concurrency,
            )),
            limits: limits::Limits::new(&settings),
            extractor: ingest::isolated::Extractor::new(&settings)?,
            settings,
            pool,
        }))
    }
}

/// Preflights reach target databases on the submitter's behalf: each has a wall-clock bound,
/// and a tenant has at most `concurrency` in flight, so that a burst of submissions cannot
/// keep a target (or the API's pools) busy.
pub struct Preflights {
    timeout: Duration,
    concurrency: usize,
    per_tenant: Mutex<HashMap<Uuid, Arc<Semaphore>>>,
}

impl Preflights {
    pub fn new(timeout: Duration, concurrency: usize) -> Self {
        Self {
            timeout,
            concurrency: concurrency.max(1),
            per_tenant: Mutex::default(),
        }
    }

    /// Runs one preflight of the tenant's within the bounds: 429 when the tenant already has
    /// `concurrency` in flight, 503 when it runs past the timeout.
    pub async fn run<T>(
        &self,
        tenant: Uuid,
        preflight: impl Future<Output = Result<T, Problem>>,
    ) -> Result<T, Problem> {
        let semaphore = self
            .per_tenant
            .lock()
            .expect("preflights lock")
            .entry(tenant)
            .or_insert_with(|| Arc::new(Semaphore::new(self.concurrency)))
            .clone();
        let _permit = semaphore.try_acquire_owned().map_err(|_| {
            Problem::too_many_requests(format!(
                "this tenant already has {} preflights in flight; try again shortly",
                self.concurrency
            ))
        })?;
        tokio::time::timeout(self.timeout, preflight)
            .await
            .map_err(|_| {
                Problem::unavailable(format!(
                    "the preflight did not finish within {} ms: the target database is slow or \
                     busy",
                    self.timeout.as_millis()
                ))
            })?
    }
}

#[cfg(test)]
mod preflight_tests {
    use super::*;

    #[tokio::test]
    async fn a_tenant_has_at_most_its_preflights_in_flight_and_each_is_bounded() {
        let preflights = Preflights::new(Duration::from_millis(200), 2);
        let (tenant, other) = (Uuid::now_v7(), Uuid::now_v7());
        let hang = || async {
            std::future::pending::<()>().await;
            Ok(())
        };
        let quick = || async { Ok(()) };
        let (first, second, third, others) = tokio::join!(
            preflights.run(tenant, hang()),
            preflights.run(tenant, hang()),
            preflights.run(tenant, quick()),
            preflights.run(other, quick()),
        );
        assert_eq!(first.unwrap_err().status, 503);
        assert_eq!(second.unwrap_err().status, 503);
        assert_eq!(
            third.unwrap_err().status,
            429,
            "no room while two are in flight"
        );
        assert!(others.is_ok(), "another tenant has room of its own");
        assert!(
            preflights.run(tenant, quick()).await.is_ok(),
            "room again once they ended"
        );
    }
}

impl Services {
    /// Runs a job kind's `sweep` on every target database and logs what it dropped. A target
    /// that fails is skipped until the next sweep; one whose database does not exist (a
    /// default target never used) has nothing to sweep.
    pub(crate) async fn sweep_targets<F, Fut>(
        &self,
        dropped_what: &str,
        sweep: F,
    ) -> anyhow::Result<()>
    where
        F: Fn(PgPool) -> Fut,
        Fut: std::future::Future<Output = sqlx::Result<Vec<String>>>,
    {
        for pool in self.targets.all().await? {
            match sweep(pool).await {
                Ok(dropped) => {
                    for table in dropped {
                        tracing::info!(table, "dropped {dropped_what}");
                    }
                }
                Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("3D000") => {}
                Err(e) => tracing::warn!(error = %e, "sweep of {dropped_what} skipped a target"),
            }
        }
        Ok(())
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
            preflights: Arc::new(Preflights::new(Duration::from_secs(5), 4)),
        }
    }

    /// Every job kind of this build.
    pub fn standard(services: Arc<Services>) -> Self {
        let preflights = services.preflights.clone();
        let mut registry = Self::new(vec![
            Arc::new(canary::Canary),
            Arc::new(import::Import::new(services.clone())),
            Arc::new(patch::Patch::new(services.clone())),
            Arc::new(patch::PatchRollback::new(services.clone())),
            Arc::new(synthesis::SynthesisJob::new(services.clone())),
            Arc::new(ingest::Ingest::new(services)),
        ]);
        registry.preflights = preflights;
        registry
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
            Some(handler) => {
                self.preflights
                    .run(tenant, handler.preflight(tenant, payload))
                    .await
            }
            None => Ok(()),
        }
    }
}

/// The tenant's dataset that `payload.dataset_id` names, for a job that reads rows: 404 when
/// the tenant has no such dataset, 422 when it is a document (those are for `ingest`).
pub(crate) async fn table_dataset(
    pool: &PgPool,
    tenant: Uuid,
    id: Uuid,
) -> Result<shared::datasets::Dataset, Problem> {
    let dataset = shared::datasets::get(pool, tenant, id)
        .await?
        .ok_or_else(|| Problem::not_found("dataset"))?;
    if !dataset.format.is_table() {
        return Err(Problem::validation(vec![FieldError::new(
            "payload.dataset_id",
            format!(
                "{} is a document, not a table: upload CSV, TSV, NDJSON or Parquet (documents are \
                 for ingest jobs)",
                dataset.name
            ),
        )]));
    }
    Ok(dataset)
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

#[cfg(test)]
mod fuzz;
