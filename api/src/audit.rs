//! The audit log: one append-only row per change a key makes (who, what, which target, when,
//! the request, a hash of the request's body). A row is written in the same transaction as
//! its change where the change is one transaction, else right after it succeeded; never for
//! a refused request. The table refuses UPDATE, DELETE and TRUNCATE (a trigger), so nothing
//! here, or anywhere, rewrites history. `GET /v1/audit` (admin keys) reads it.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::{PgExecutor, Postgres, QueryBuilder};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Caller;

/// What a change was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    JobSubmit,
    JobCancel,
    JobRetry,
    JobDelete,
    DatasetUpload,
    DatasetDelete,
    ModelDelete,
    ConnectionCreate,
    ConnectionDelete,
    BucketCreate,
    BucketDelete,
    CollectionCreate,
    CollectionDelete,
    KeyCreate,
    KeyRevoke,
    KeyRotate,
    SessionSignIn,
    SessionSignOut,
    ScheduleCreate,
    SchedulePause,
    ScheduleResume,
    ScheduleDelete,
    WebhookCreate,
    WebhookDelete,
    WebhookReplay,
    PipelineSubmit,
    PipelineCancel,
    PipelineRetry,
}

impl Action {
    pub const ALL: [Self; 28] = [
        Self::JobSubmit,
        Self::JobCancel,
        Self::JobRetry,
        Self::JobDelete,
        Self::DatasetUpload,
        Self::DatasetDelete,
        Self::ModelDelete,
        Self::ConnectionCreate,
        Self::ConnectionDelete,
        Self::BucketCreate,
        Self::BucketDelete,
        Self::CollectionCreate,
        Self::CollectionDelete,
        Self::KeyCreate,
        Self::KeyRevoke,
        Self::KeyRotate,
        Self::SessionSignIn,
        Self::SessionSignOut,
        Self::ScheduleCreate,
        Self::SchedulePause,
        Self::ScheduleResume,
        Self::ScheduleDelete,
        Self::WebhookCreate,
        Self::WebhookDelete,
        Self::WebhookReplay,
        Self::PipelineSubmit,
        Self::PipelineCancel,
        Self::PipelineRetry,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::JobSubmit => "job.submit",
            Self::JobCancel => "job.cancel",
            Self::JobRetry => "job.retry",
            Self::JobDelete => "job.delete",
            Self::DatasetUpload => "dataset.upload",
            Self::DatasetDelete => "dataset.delete",
            Self::ModelDelete => "model.delete",
            Self::ConnectionCreate => "connection.create",
            Self::ConnectionDelete => "connection.delete",
            Self::BucketCreate => "bucket.create",
            Self::BucketDelete => "bucket.delete",
            Self::CollectionCreate => "collection.create",
            Self::CollectionDelete => "collection.delete",
            Self::KeyCreate => "key.create",
            Self::KeyRevoke => "key.revoke",
            Self::KeyRotate => "key.rotate",
            Self::SessionSignIn => "session.sign_in",
            Self::SessionSignOut => "session.sign_out",
            Self::ScheduleCreate => "schedule.create",
            Self::SchedulePause => "schedule.pause",
            Self::ScheduleResume => "schedule.resume",
            Self::ScheduleDelete => "schedule.delete",
            Self::WebhookCreate => "webhook.create",
            Self::WebhookDelete => "webhook.delete",
            Self::WebhookReplay => "webhook.replay",
            Self::PipelineSubmit => "pipeline.submit",
            Self::PipelineCancel => "pipeline.cancel",
            Self::PipelineRetry => "pipeline.retry",
        }
    }

    pub fn parse(action: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == action)
    }
}

/// Who made a change: the tenant, its key (none for an operator's command on the server), the
/// request (`x-request-id`).
#[derive(Clone, Debug)]
pub struct Actor {
    pub tenant: Uuid,
    pub key: Option<Uuid>,
    pub request_id: Option<String>,
}

impl From<&Caller> for Actor {
    fn from(caller: &Caller) -> Self {
        Self {
            tenant: caller.key.tenant,
            key: Some(caller.key.id),
            request_id: caller.request_id.clone(),
        }
    }
}

impl Actor {
    /// `conveyor-api` on the server: no key, no request.
    pub fn operator(tenant: Uuid) -> Self {
        Self {
            tenant,
            key: None,
            request_id: None,
        }
    }
}

/// One change, about to be recorded.
#[derive(Clone, Debug)]
pub struct Entry {
    pub action: Action,
    pub target_id: Option<String>,
    pub payload_sha256: Option<String>,
    pub statement: Option<String>,
    pub detail: Option<Value>,
}

impl Entry {
    pub fn new(action: Action) -> Self {
        Self {
            action,
            target_id: None,
            payload_sha256: None,
            statement: None,
            detail: None,
        }
    }

    pub fn target(mut self, id: impl ToString) -> Self {
        self.target_id = Some(id.to_string());
        self
    }

    /// The hex sha256 of the request body that made the change.
    pub fn payload_sha256(mut self, sha256: impl Into<String>) -> Self {
        self.payload_sha256 = Some(sha256.into());
        self
    }

    pub fn detail(mut self, detail: Value) -> Self {
        self.detail = Some(detail);
        self
    }
}

/// Hex sha256 of a request body.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Records one change (pass a transaction to make it part of the change's).
pub async fn record(db: impl PgExecutor<'_>, actor: &Actor, entry: Entry) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO audit_log (tenant_id, key_id, action, target_id, request_id, payload_sha256,
                                statement, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(actor.tenant)
    .bind(actor.key)
    .bind(entry.action.as_str())
    .bind(entry.target_id)
    .bind(&actor.request_id)
    .bind(entry.payload_sha256)
    .bind(entry.statement)
    .bind(entry.detail)
    .execute(db)
    .await?;
    Ok(())
}

/// Records the same change to many jobs (a bulk cancel or retry): one row each, `detail`
/// alike on all.
pub async fn jobs_changed(
    db: impl PgExecutor<'_>,
    actor: &Actor,
    action: Action,
    jobs: &[Uuid],
    detail: Value,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO audit_log (tenant_id, key_id, action, target_id, request_id, detail)
         SELECT $1, $2, $3, id::text, $4, $5 FROM unnest($6::uuid[]) AS id",
    )
    .bind(actor.tenant)
    .bind(actor.key)
    .bind(action.as_str())
    .bind(&actor.request_id)
    .bind(detail)
    .bind(jobs)
    .execute(db)
    .await?;
    Ok(())
}

/// A change the API made but could not record: the change stands (it is committed), the
/// failure is logged loudly. Used only where the change is not one transaction with its row.
pub fn lost(action: Action, error: &sqlx::Error) {
    tracing::error!(action = action.as_str(), %error, "audit row not written");
}

/// An audit row as `GET /v1/audit` shows it.
#[derive(Clone, Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct AuditEntry {
    /// Increasing; pass the last one seen as `cursor` for older rows.
    pub id: i64,
    /// The key that made the change; absent for an operator's command on the server.
    pub key_id: Option<Uuid>,
    /// `job.submit`, `job.cancel`, `job.retry`, `dataset.upload`, `dataset.delete`,
    /// `model.delete`, `connection.create`, `connection.delete`, `bucket.create`,
    /// `bucket.delete`, `collection.create`,
    /// `collection.delete`, `key.create`, `key.revoke`, `key.rotate`, `session.sign_in`,
    /// `session.sign_out`, `schedule.create`, `schedule.pause`, `schedule.resume`,
    /// `schedule.delete`, `webhook.create`, `webhook.delete`, `webhook.replay`,
    /// `pipeline.submit`, `pipeline.cancel`, `pipeline.retry`.
    pub action: String,
    /// The job, dataset, connection, collection, key, session (its key), schedule, webhook,
    /// webhook delivery or pipeline changed.
    pub target_id: Option<String>,
    pub at: DateTime<Utc>,
    /// The request's `x-request-id`.
    pub request_id: Option<String>,
    /// Hex sha256 of the request body (an upload: of the file).
    pub payload_sha256: Option<String>,
    /// The SQL of a patch, or of the patch a rollback undoes.
    pub statement: Option<String>,
    /// Per action: a job's `kind`, a key's `role`, a connection's `name`...
    #[schema(value_type = Option<Object>)]
    pub detail: Option<sqlx::types::Json<Value>>,
}

/// What `GET /v1/audit` filters on.
#[derive(Default, Debug)]
pub struct Filter {
    pub action: Option<Action>,
    pub key_id: Option<Uuid>,
    pub target_id: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// Rows older than this id.
    pub cursor: Option<i64>,
}

/// The tenant's rows, newest first; the page ends early once its rows pass `budget` bytes
/// (a patch's row carries its statement, up to 64 KB).
pub async fn list(
    db: impl PgExecutor<'_>,
    tenant: Uuid,
    filter: &Filter,
    limit: i64,
    budget: usize,
) -> sqlx::Result<shared::pages::Page<AuditEntry>> {
    let mut q = QueryBuilder::<Postgres>::new(
        "SELECT id, key_id, action, target_id, at, request_id, payload_sha256, statement, detail
         FROM audit_log WHERE tenant_id = ",
    );
    q.push_bind(tenant);
    if let Some(action) = filter.action {
        q.push(" AND action = ").push_bind(action.as_str());
    }
    if let Some(key) = filter.key_id {
        q.push(" AND key_id = ").push_bind(key);
    }
    if let Some(target) = &filter.target_id {
        q.push(" AND target_id = ").push_bind(target.clone());
    }
    if let Some(from) = filter.from {
        q.push(" AND at >= ").push_bind(from);
    }
    if let Some(to) = filter.to {
        q.push(" AND at < ").push_bind(to);
    }
    if let Some(cursor) = filter.cursor {
        q.push(" AND id < ").push_bind(cursor);
    }
    q.push(" ORDER BY id DESC LIMIT ").push_bind(limit);
    shared::pages::within(q.build().fetch(db), budget).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_read_back_from_their_names() {
        for action in Action::ALL {
            assert_eq!(Action::parse(action.as_str()), Some(action));
        }
        assert_eq!(Action::parse("job.destroy"), None);
    }

    /// A filtered page reads the rows it shows, not the tenant's whole history: the one
    /// matching row is the oldest of 20,000.
    #[tokio::test]
    async fn filters_read_through_their_indexes() {
        let db = shared::testing::TestDatabase::new().await;
        let tenant = db.tenant().await;
        let key = Uuid::now_v7();
        sqlx::query("INSERT INTO api_keys (id, tenant_id, key_hash) VALUES ($1, $2, 'h')")
            .bind(key)
            .bind(tenant)
            .execute(&db.pool)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO audit_log (tenant_id, key_id, action, target_id, request_id)
             SELECT $1, $2, 'key.create', 'needle', NULL
             UNION ALL
             SELECT $1, NULL, 'job.submit', gen_random_uuid()::text, repeat('r', 100)
             FROM generate_series(1, 20000)",
        )
        .bind(tenant)
        .bind(key)
        .execute(&db.pool)
        .await
        .unwrap();
        sqlx::query("ANALYZE audit_log")
            .execute(&db.pool)
            .await
            .unwrap();

        let blocks = "SELECT sum(pg_stat_get_xact_blocks_fetched(oid))::bigint FROM pg_class
             WHERE oid = 'audit_log'::regclass
                OR oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = 'audit_log'::regclass)";
        let filters = [
            Filter {
                target_id: Some("needle".into()),
                ..Filter::default()
            },
            Filter {
                key_id: Some(key),
                ..Filter::default()
            },
            Filter {
                action: Some(Action::KeyCreate),
                ..Filter::default()
            },
        ];
        // Periods with none of the rows in them: they find nothing, as cheaply.
        let a_year = chrono::Duration::days(365);
        let periods = [
            Filter {
                from: Some(Utc::now() + a_year),
                ..Filter::default()
            },
            Filter {
                to: Some(Utc::now() - a_year),
                ..Filter::default()
            },
        ];
        for (filter, found) in filters
            .iter()
            .map(|f| (f, 1))
            .chain(periods.iter().map(|f| (f, 0)))
        {
            let mut tx = db.pool.begin().await.unwrap();
            let before: i64 = sqlx::query_scalar(blocks)
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            let page = list(&mut *tx, tenant, filter, 50, usize::MAX)
                .await
                .unwrap();
            let after: i64 = sqlx::query_scalar(blocks)
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            assert_eq!(page.items.len(), found, "{filter:?}");
            if found == 1 {
                assert_eq!(page.items[0].target_id.as_deref(), Some("needle"));
            }
            // An index's levels and a heap page or two; the history is hundreds of pages.
            let read = after - before;
            assert!(read < 20, "{filter:?} read {read} blocks");
        }
    }
}
