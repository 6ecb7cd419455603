//! The handlers of the job kinds, which the workers run. Each module has the same shape: its
//! [`Handler`] (run, and the sweep of what ended jobs left behind) and tests; the payload,
//! its checks and preflight are the kind's contract in the `contracts` crate.

use contracts::Contract;
use serde_json::Value;
use shared::{
    connections::{SessionLimits, Targets},
    objects::ObjectStore,
    JobContext, Settings,
};
use sqlx::PgPool;
use std::{collections::BTreeMap, sync::Arc};

pub mod canary;
pub mod import;
pub mod ingest;
pub mod limits;
pub mod patch;
pub mod sample;
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

impl JobError {
    /// A task of the attempt that panicked: a reference to the log line that holds its text
    /// (tokio's "task panicked with message ..."), which is the worker's, not the tenant's.
    pub fn crashed(e: tokio::task::JoinError) -> JobError {
        JobError::Permanent(internal_error(&e))
    }
}

/// What the tenant reads of an internal failure (a panic): that it happened and a reference;
/// `detail` goes to the worker's log beside the reference.
pub fn internal_error(detail: &dyn std::fmt::Display) -> String {
    let reference = uuid::Uuid::new_v4();
    tracing::error!(%reference, detail = %detail, "internal error in a job");
    format!(
        "the worker hit an internal error (reference {reference}); operators can find it in \
         the worker's log"
    )
}

/// The start of a commit not recorded (`JobContext::committing`): nothing published yet.
impl From<shared::CommitUnrecorded> for JobError {
    fn from(e: shared::CommitUnrecorded) -> Self {
        JobError::Retryable(e.to_string())
    }
}

/// A target database's error as the tenant reads it in its job: what is about its own data or
/// SQL (the classes that name its rows, columns and statements) as PostgreSQL says it; anything
/// else (the server's files, its resources, the connection) only by its SQLSTATE, the whole
/// text going to the log.
pub fn target_error_text(e: &sqlx::Error) -> String {
    const TENANTS_OWN: [&str; 9] = ["22", "23", "42", "P0", "2F", "39", "40", "55", "57014"];
    if let sqlx::Error::Database(db) = e {
        let code = db.code().unwrap_or_default();
        if TENANTS_OWN.iter().any(|class| code.starts_with(class)) {
            return db.message().to_owned();
        }
        let error = shared::telemetry::Untrusted(e);
        tracing::warn!(%error, "the target database failed");
        return format!("the target database failed (SQLSTATE {code})");
    }
    let error = shared::telemetry::Untrusted(e);
    tracing::warn!(%error, "the target database's answer was not read");
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => "the target database did not answer".to_owned(),
        _ => "the target database's answer could not be read".to_owned(),
    }
}

/// Runs one job kind, whose [`Contract`] the API checked at submit.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    type Contract: Contract;

    /// Called once when a worker starts serving this kind: loads what every job needs (a
    /// model), so that a worker that cannot run them fails at start-up, not mid-job.
    async fn prepare(&self) -> anyhow::Result<()> {
        Ok(())
    }

    /// Runs one attempt. It must be idempotent: delivery is at least once.
    async fn run(&self, ctx: &JobContext, payload: Payload<Self>)
        -> Result<Output<Self>, JobError>;

    /// Called now and then by the maintenance leader (one worker process at a time): clears
    /// what this kind's jobs left behind that no attempt will clear any more (expired
    /// snapshots, staging tables of jobs that ended while their worker was gone).
    async fn sweep(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// The payload type of a handler's kind.
pub type Payload<H> = <<H as Handler>::Contract as Contract>::Payload;
/// What a handler's kind reports when a job succeeds.
pub type Output<H> = <<H as Handler>::Contract as Contract>::Output;

/// A [`Handler`] behind one type, as the worker runs it: the stored payload in, parsed once.
#[async_trait::async_trait]
pub trait Runner: Send + Sync {
    fn kind(&self) -> &'static str;
    async fn prepare(&self) -> anyhow::Result<()>;
    async fn run(&self, ctx: &JobContext, payload: Value) -> Result<Value, JobError>;
    async fn sweep(&self) -> anyhow::Result<()>;
}

#[async_trait::async_trait]
impl<H: Handler> Runner for H {
    fn kind(&self) -> &'static str {
        H::Contract::KIND
    }

    async fn prepare(&self) -> anyhow::Result<()> {
        Handler::prepare(self).await
    }

    async fn run(&self, ctx: &JobContext, payload: Value) -> Result<Value, JobError> {
        // The API accepted it: a payload that no longer parses was stored by another version.
        let payload = serde_json::from_value(payload)
            .map_err(|e| JobError::Permanent(format!("invalid payload: {e}")))?;
        let output = Handler::run(self, ctx, payload).await?;
        serde_json::to_value(output)
            .map_err(|e| JobError::Permanent(format!("the result does not serialize: {e}")))
    }

    async fn sweep(&self) -> anyhow::Result<()> {
        Handler::sweep(self).await
    }
}

/// The job kinds this build runs, by name.
#[derive(Clone)]
pub struct Registry {
    handlers: BTreeMap<&'static str, Arc<dyn Runner>>,
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
    /// Caps on the bytes a job reads from its datasets.
    pub limits: limits::Limits,
    /// Extracts documents' text in a child process.
    pub extractor: ingest::isolated::Extractor,
}

impl Services {
    /// For a worker: sessions on target databases bounded for jobs.
    pub fn new(settings: Arc<Settings>, pool: PgPool) -> anyhow::Result<Arc<Self>> {
        let limits = SessionLimits::jobs(&settings);
        Ok(Arc::new(Self {
            objects: ObjectStore::from_settings(&settings)?,
            targets: Targets::new(pool.clone(), &settings, limits)?,
            embedder: embed::SharedEmbedder::new(&settings.model_dir),
            limits: limits::Limits::new(&settings),
            extractor: ingest::isolated::Extractor::new(&settings)?,
            settings,
            pool,
        }))
    }
}

impl Services {
    /// Runs a job kind's `sweep` on every target database and logs what it dropped, a few
    /// targets at a time and each within `target_sweep_timeout`: a tenant's database that stops
    /// answering (its server is the tenant's, and may ignore `statement_timeout`) holds up no
    /// other target, and no later sweep. A target that fails is skipped until the next sweep;
    /// one whose database does not exist (a default target never used) has nothing to sweep.
    pub(crate) async fn sweep_targets<F, Fut>(
        &self,
        dropped_what: &str,
        sweep: F,
    ) -> anyhow::Result<()>
    where
        F: Fn(PgPool) -> Fut,
        Fut: std::future::Future<Output = sqlx::Result<Vec<String>>>,
    {
        use futures::StreamExt;
        const AT_ONCE: usize = 4;
        let deadline = self.settings.target_sweep_timeout;
        let sweeps = self
            .targets
            .all()
            .await?
            .into_iter()
            .map(|pool| tokio::time::timeout(deadline, sweep(pool)));
        let mut outcomes = futures::stream::iter(sweeps).buffer_unordered(AT_ONCE);
        while let Some(outcome) = outcomes.next().await {
            match outcome {
                Ok(Ok(dropped)) => {
                    for table in dropped {
                        tracing::info!(table, "dropped {dropped_what}");
                    }
                }
                Ok(Err(sqlx::Error::Database(db))) if db.code().as_deref() == Some("3D000") => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %shared::telemetry::Untrusted(&e), "sweep of {dropped_what} skipped a target")
                }
                Err(_) => tracing::warn!(
                    timeout_secs = deadline.as_secs(),
                    "sweep of {dropped_what} skipped a target that did not answer in time"
                ),
            }
        }
        Ok(())
    }
}

impl Default for Registry {
    /// Only the `canary` kind, which needs no services.
    fn default() -> Self {
        Self::new(vec![Arc::new(canary::CanaryHandler)])
    }
}

impl Registry {
    pub fn new(handlers: Vec<Arc<dyn Runner>>) -> Self {
        Self {
            handlers: handlers.into_iter().map(|h| (h.kind(), h)).collect(),
        }
    }

    /// Every job kind of this build.
    pub fn standard(services: Arc<Services>) -> Self {
        Self::new(vec![
            Arc::new(canary::CanaryHandler),
            Arc::new(import::ImportHandler::new(services.clone())),
            Arc::new(patch::PatchHandler::new(services.clone())),
            Arc::new(patch::PatchRollbackHandler::new(services.clone())),
            Arc::new(synthesis::SynthesisHandler::new(services.clone())),
            Arc::new(sample::SampleHandler::new(services.clone())),
            Arc::new(ingest::IngestHandler::new(services)),
        ])
    }

    pub fn get(&self, kind: &str) -> Option<&Arc<dyn Runner>> {
        self.handlers.get(kind)
    }

    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.handlers.keys().copied()
    }

    /// [`Handler::sweep`] of every kind; a failing sweep is logged and tried again next time.
    pub async fn sweep(&self) {
        for (kind, handler) in &self.handlers {
            if let Err(e) = handler.sweep().await {
                tracing::warn!(kind, error = %e, "sweep failed");
            }
        }
    }
}

#[cfg(test)]
mod allocated;
#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection's error names the server's address (and a server's own errors its files):
    /// the job's error, which the tenant reads, names neither.
    #[test]
    fn target_errors_keep_the_servers_details_to_the_log() {
        let refused = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connecting to 10.1.2.3:5432: /var/lib/postgresql/data",
        );
        match patch::job_error(sqlx::Error::Io(refused)) {
            JobError::Retryable(text) => assert_eq!(text, "the target database did not answer"),
            other => panic!("{other:?}"),
        }
    }

    /// The worker runs exactly the kinds the API accepts.
    #[tokio::test]
    async fn every_contract_has_a_handler() {
        let settings = Settings::for_test("postgres://127.0.0.1/unused".into(), "unused".into());
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy(&settings.database_url)
            .unwrap();
        let handlers = Registry::standard(Services::new(Arc::new(settings), pool).unwrap());
        let contracts = contracts::Registry::standard();
        assert_eq!(
            handlers.kinds().collect::<Vec<_>>(),
            contracts.kinds().collect::<Vec<_>>()
        );
    }

    /// A task of an attempt that panics (a reader, an extractor, the synthesizer on the
    /// blocking pool) fails the job with a reference: tokio's error carried the panic's text
    /// ("task 7 panicked with message ..."), which went into the job's error as it was.
    #[tokio::test]
    async fn a_crashed_task_reaches_the_tenant_as_a_reference() {
        let task = tokio::task::spawn_blocking(|| -> () { panic!("at /srv/secret-path.rs:12") });
        let JobError::Permanent(error) = JobError::crashed(task.await.unwrap_err()) else {
            panic!("not permanent");
        };
        assert!(!error.contains("secret-path"), "{error}");
        assert!(error.contains("internal error (reference "), "{error}");
    }
}
