//! The contract of each job kind, shared by the API and the workers: its payload type, the
//! checks a payload passes on its own ([`Contract::check`]) and against the world at submit
//! ([`Contract::preflight`]: datasets, connections, tables), and the storage both sides read
//! (collections), and what a job of the kind reports when it succeeds. The API depends on this crate only; the handlers in `jobs` run what it
//! accepted. A payload is parsed once at submit into its type, checked, and preflighted.

use async_trait::async_trait;
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;
use shared::{connections::Targets, FieldError};
use sqlx::PgPool;
use std::{
    any::Any,
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
pub mod patch;
mod refusal;
pub mod sample;
pub mod synthesis;

pub use refusal::Refusal;

/// A file a job published, downloadable from `url`.
#[derive(Clone, Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Artifact {
    pub name: String,
    pub size: u64,
    pub url: String,
}

impl Artifact {
    pub fn of_job(job: Uuid, name: &str, size: u64) -> Self {
        Self {
            name: name.to_owned(),
            size,
            url: format!("/v1/jobs/{job}/artifacts/{name}"),
        }
    }
}

/// One job kind's contract.
#[async_trait]
pub trait Contract: Send + Sync + 'static {
    /// The queue and the `kind` clients submit.
    const KIND: &'static str;
    type Payload: DeserializeOwned + Serialize + Send + Sync + 'static;
    /// What a job of the kind reports when it succeeds (the job's `result`).
    type Output: Serialize + Send + 'static;

    /// Checks a payload on its own; each error names its field under `payload`.
    fn check(&self, payload: &Self::Payload) -> Result<(), Vec<FieldError>>;

    /// Checks the payload against the world before the job is accepted: the datasets,
    /// connections and tables it names: [`Refusal::Unknown`] for what the tenant cannot see,
    /// [`Refusal::Invalid`] for what is wrong with it.
    async fn preflight(
        &self,
        _context: &Context,
        _tenant: Uuid,
        _payload: &Self::Payload,
    ) -> Result<(), Refusal> {
        Ok(())
    }
}

/// What preflights reach: the control plane and the target databases, within bounds.
pub struct Context {
    pub pool: PgPool,
    pub targets: Targets,
    pub preflights: Preflights,
    /// `CONVEYOR_MAX_IN_MEMORY_BYTES`: what a job may hold in memory (synthetic outputs are
    /// refused at submit past it).
    pub max_in_memory_bytes: u64,
}

/// A payload that passed its kind's checks, in its type, for the preflight; and as it is
/// stored.
pub struct Valid {
    kind: &'static str,
    payload: Box<dyn Any + Send + Sync>,
    stored: Value,
}

impl Valid {
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// The payload as a job or a step stores it: its type serialized again, not the JSON sent.
    /// An id then has one spelling (hyphenated lower case, where `uuid` also reads upper case,
    /// braces, `urn:uuid:` and no hyphens), the one the SQL reading payloads compares
    /// (`datasets::in_use`, the rollback guards); defaults are written out.
    pub fn stored(&self) -> &Value {
        &self.stored
    }

    pub fn into_stored(self) -> Value {
        self.stored
    }
}

/// A [`Contract`] behind one type, for the registry.
#[async_trait]
trait AnyContract: Send + Sync {
    fn validate(&self, payload: &Value) -> Result<Valid, Vec<FieldError>>;
    async fn preflight(
        &self,
        context: &Context,
        tenant: Uuid,
        valid: &Valid,
    ) -> Result<(), Refusal>;
}

#[async_trait]
impl<C: Contract> AnyContract for C {
    fn validate(&self, payload: &Value) -> Result<Valid, Vec<FieldError>> {
        let payload: C::Payload = parse_payload(payload)?;
        self.check(&payload)?;
        // Fails only for maps with keys that are not strings, which no payload has.
        let stored = serde_json::to_value(&payload)
            .map_err(|e| vec![FieldError::new("payload", format!("cannot be stored: {e}"))])?;
        Ok(Valid {
            kind: C::KIND,
            payload: Box::new(payload),
            stored,
        })
    }

    async fn preflight(
        &self,
        context: &Context,
        tenant: Uuid,
        valid: &Valid,
    ) -> Result<(), Refusal> {
        let payload = valid
            .payload
            .downcast_ref::<C::Payload>()
            .ok_or_else(|| Refusal::Internal(format!("a {} payload was expected", C::KIND)))?;
        Contract::preflight(self, context, tenant, payload).await
    }
}

/// The job kinds this build knows, by name.
#[derive(Clone)]
pub struct Registry {
    contracts: BTreeMap<&'static str, Arc<dyn AnyContract>>,
}

impl Registry {
    /// Every job kind.
    pub fn standard() -> Self {
        let mut contracts: BTreeMap<&'static str, Arc<dyn AnyContract>> = BTreeMap::new();
        contracts.insert(canary::Canary::KIND, Arc::new(canary::Canary));
        contracts.insert(import::Import::KIND, Arc::new(import::Import));
        contracts.insert(ingest::Ingest::KIND, Arc::new(ingest::Ingest));
        contracts.insert(patch::Patch::KIND, Arc::new(patch::Patch));
        contracts.insert(patch::PatchRollback::KIND, Arc::new(patch::PatchRollback));
        contracts.insert(sample::Sample::KIND, Arc::new(sample::Sample));
        contracts.insert(synthesis::Synthesis::KIND, Arc::new(synthesis::Synthesis));
        Self { contracts }
    }

    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.contracts.keys().copied()
    }

    /// Parses and checks a payload of `kind`.
    pub fn validate(&self, kind: &str, payload: &Value) -> Result<Valid, Vec<FieldError>> {
        match self.contracts.get(kind) {
            Some(contract) => contract.validate(payload),
            None => Err(vec![FieldError::new(
                "kind",
                format!(
                    "unknown job kind {kind:?}; expected one of: {}",
                    self.kinds().collect::<Vec<_>>().join(", ")
                ),
            )]),
        }
    }

    /// Preflights a validated payload within the tenant's preflight bounds.
    pub async fn preflight(
        &self,
        context: &Context,
        tenant: Uuid,
        valid: &Valid,
    ) -> Result<(), Refusal> {
        let contract = self
            .contracts
            .get(valid.kind)
            .ok_or_else(|| Refusal::Internal("a payload of an unknown kind".into()))?;
        context
            .preflights
            .run(tenant, contract.preflight(context, tenant, valid))
            .await
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

    /// Runs one preflight of the tenant's within the bounds: [`Refusal::Busy`] when the tenant
    /// already has `concurrency` in flight, [`Refusal::TimedOut`] past the timeout.
    pub async fn run<T>(
        &self,
        tenant: Uuid,
        preflight: impl Future<Output = Result<T, Refusal>>,
    ) -> Result<T, Refusal> {
        let _slot = self.slot(tenant)?;
        tokio::time::timeout(self.timeout, preflight)
            .await
            .map_err(|_| Refusal::TimedOut(self.timeout.as_millis()))?
    }

    /// One of the tenant's slots, held until dropped, for a check of its own bounds that
    /// reaches out on the tenant's behalf (a new connection's, bucket's or webhook's):
    /// [`Refusal::Busy`] when the tenant has `concurrency` in flight.
    pub fn slot(&self, tenant: Uuid) -> Result<tokio::sync::OwnedSemaphorePermit, Refusal> {
        let semaphore = self
            .per_tenant
            .lock()
            .expect("preflights lock")
            .entry(tenant)
            .or_insert_with(|| Arc::new(Semaphore::new(self.concurrency)))
            .clone();
        semaphore
            .try_acquire_owned()
            .map_err(|_| Refusal::Busy(self.concurrency))
    }
}

/// The tenant's dataset that `payload.dataset_id` names, for a job that reads rows: unknown
/// when the tenant has no such dataset, invalid when it is a document (those are for `ingest`).
pub(crate) async fn table_dataset(
    pool: &PgPool,
    tenant: Uuid,
    id: Uuid,
) -> Result<shared::datasets::Dataset, Refusal> {
    let dataset = shared::datasets::get_unpreviewed(pool, tenant, id)
        .await?
        .ok_or_else(|| Refusal::Unknown("dataset".into()))?;
    if !dataset.format.is_table() {
        return Err(Refusal::field(
            "payload.dataset_id",
            format!(
                "{} is a document, not a table: upload CSV, TSV, NDJSON or Parquet (documents are \
                 for ingest jobs)",
                dataset.name
            ),
        ));
    }
    Ok(dataset)
}

/// `Ok` when nothing was refused, else every refusal.
pub(crate) fn refused(errors: Vec<FieldError>) -> Result<(), Vec<FieldError>> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
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
        assert!(matches!(first, Err(Refusal::TimedOut(200))));
        assert!(matches!(second, Err(Refusal::TimedOut(200))));
        assert!(
            matches!(third, Err(Refusal::Busy(2))),
            "no room while two are in flight"
        );
        assert!(others.is_ok(), "another tenant has room of its own");
        assert!(
            preflights.run(tenant, quick()).await.is_ok(),
            "room again once they ended"
        );
    }
}

#[cfg(test)]
mod stored_tests {
    use super::*;
    use serde_json::json;

    /// A payload is stored as parsed: an id in any spelling `uuid` reads is stored in the one
    /// SQL compares, and stored again it is the same.
    #[test]
    fn a_payload_is_stored_as_parsed_with_its_ids_in_one_spelling() {
        let registry = Registry::standard();
        let id = Uuid::now_v7();
        for spelling in [
            id.hyphenated().to_string().to_uppercase(),
            id.braced().to_string(),
            id.urn().to_string().to_uppercase(),
            id.simple().to_string(),
        ] {
            for (kind, payload, at) in [
                (
                    "patch_rollback",
                    json!({"patch_job_id": spelling}),
                    "/patch_job_id",
                ),
                (
                    "import",
                    json!({"dataset_id": spelling, "target": {"table": "t"}}),
                    "/dataset_id",
                ),
                (
                    "synthesis",
                    json!({"dataset_id": spelling, "rows": 10}),
                    "/dataset_id",
                ),
                (
                    "sample",
                    json!({"model_id": spelling, "rows": 10}),
                    "/model_id",
                ),
            ] {
                let valid =
                    (registry.validate(kind, &payload)).unwrap_or_else(|e| panic!("{kind}: {e:?}"));
                let expected = json!(id.to_string());
                assert_eq!(
                    valid.stored().pointer(at),
                    Some(&expected),
                    "{kind}: {spelling}"
                );
                let again = registry.validate(kind, valid.stored()).unwrap();
                assert_eq!(again.stored(), valid.stored(), "{kind}");
            }
        }
        let canary = registry.validate("canary", &json!({"steps": 2})).unwrap();
        let expected = json!({"steps": 2, "step_ms": 0, "fail_first": 0});
        assert_eq!(canary.stored(), &expected);
    }
}
