//! The audit log: one append-only row per change a key makes (who, what, which target, when,
//! the request, a hash of the request's body). A row is written in the same transaction as
//! its change where the change is one transaction, else right after it succeeded; never for
//! a refused request. The table refuses UPDATE, DELETE and TRUNCATE (a trigger), so nothing
//! here, or anywhere, rewrites history. `GET /v1/audit` (admin keys) reads it.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use shared::pages;
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

const COLUMNS: &str =
    "id, key_id, action, target_id, at, request_id, payload_sha256, statement, detail";

/// A page of the audit log, and the cursor of the next one (`None`: the log ends here).
#[derive(Debug)]
pub struct Listed {
    pub entries: Vec<AuditEntry>,
    pub next_cursor: Option<i64>,
}

/// The tenant's rows, newest first; the page ends early once its rows pass `budget` bytes
/// (a patch's row carries its statement, up to 64 KB). One filter, or a period alone, reads
/// through its index. Combined, no index has them all: the most selective one (target, key,
/// action) leads, and a page reads at most `scan_rows` of its rows for the rest to match (a key's
/// rare action, or its changes of one old day, read the key's whole history for one page).
pub async fn list(
    pool: &sqlx::PgPool,
    tenant: Uuid,
    filter: &Filter,
    limit: i64,
    budget: usize,
    scan_rows: i64,
) -> sqlx::Result<Listed> {
    let equal: [Option<(&str, Equal)>; 3] = [
        filter
            .target_id
            .clone()
            .map(|t| ("target_id", Equal::Text(t))),
        filter.key_id.map(|k| ("key_id", Equal::Id(k))),
        filter
            .action
            .map(|a| ("action", Equal::Text(a.as_str().to_owned()))),
    ];
    let mut equal = equal.into_iter().flatten();
    let leading = equal.next();
    let period = [("at >= ", filter.from), ("at < ", filter.to)];
    let period = period.into_iter().filter_map(|(op, at)| Some((op, at?)));
    let rest: Vec<_> = equal.collect();
    let mut q = QueryBuilder::<Postgres>::new("");
    let tenant_and = |q: &mut QueryBuilder<'_, Postgres>| {
        q.push("tenant_id = ").push_bind(tenant);
        if let Some(cursor) = filter.cursor {
            q.push(" AND id < ").push_bind(cursor);
        }
    };
    if leading.is_some() && (!rest.is_empty() || filter.from.is_some() || filter.to.is_some()) {
        let columns: Vec<String> = COLUMNS.split(", ").map(|c| format!("t.{c}")).collect();
        let columns = columns.join(", ");
        let scan = pages::Scan {
            table: "audit_log",
            columns: &columns,
            scan_rows,
            limit,
        };
        scan.push(
            &mut q,
            |q| {
                q.push("TRUE");
                for (column, value) in rest {
                    q.push(format!(" AND {column} = "));
                    value.bind(q);
                }
                for (op, at) in period {
                    q.push(format!(" AND {op}")).push_bind(at);
                }
            },
            |q| {
                tenant_and(q);
                if let Some((column, value)) = leading {
                    q.push(format!(" AND {column} = "));
                    value.bind(q);
                }
            },
        );
        let page = pages::read(pool, q.build(), budget).await?;
        let (entries, next_cursor) = scan.page::<i64, AuditEntry>(page);
        return Ok(Listed {
            entries,
            next_cursor,
        });
    }
    // Every row its index reads is one of the page's.
    q.push(format!("SELECT {COLUMNS} FROM audit_log WHERE "));
    tenant_and(&mut q);
    if let Some((column, value)) = leading {
        q.push(format!(" AND {column} = "));
        value.bind(&mut q);
    }
    for (op, at) in period {
        q.push(format!(" AND {op}")).push_bind(at);
    }
    q.push(" ORDER BY id DESC LIMIT ").push_bind(limit);
    let page: pages::Page<AuditEntry> = pages::read(pool, q.build(), budget).await?;
    Ok(Listed {
        next_cursor: page.next_cursor(limit, |e| e.id),
        entries: page.items,
    })
}

/// A filter's value, bound as its column's type.
enum Equal {
    Text(String),
    Id(Uuid),
}

impl Equal {
    fn bind(self, q: &mut QueryBuilder<'_, Postgres>) {
        match self {
            Equal::Text(text) => q.push_bind(text),
            Equal::Id(id) => q.push_bind(id),
        };
    }
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

        let one = shared::db::connect(&db.url, 1).await.unwrap();
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
            .map(|f| (f, 1i64))
            .chain(periods.iter().map(|f| (f, 0)))
        {
            let before = db.rows_read(&one, "audit_log").await;
            let page = list(&one, tenant, filter, 50, usize::MAX, pages::SCAN_ROWS)
                .await
                .unwrap()
                .entries;
            let read = db.rows_read(&one, "audit_log").await - before;
            assert_eq!(page.len() as i64, found, "{filter:?}");
            if found == 1 {
                assert_eq!(page[0].target_id.as_deref(), Some("needle"));
            }
            // The rows it shows; the history is 20,001.
            assert!(read <= found, "{filter:?} read {read} rows");
        }
    }

    /// A key's rare action: the key made 1,501 changes, the tenant's other key 15,000 of that
    /// action; both together match only the oldest row, and any index read 1,501 rows or more
    /// for the first page. A page reads `scan_rows` (here 1,000) at most, and following its
    /// cursors still finds the row.
    #[tokio::test]
    async fn combined_filters_read_at_most_their_scan_budget() {
        let db = shared::testing::TestDatabase::new().await;
        let tenant = db.tenant().await;
        let key = |i: u128| Uuid::from_u128(i);
        for k in [1, 2] {
            sqlx::query("INSERT INTO api_keys (id, tenant_id, key_hash) VALUES ($1, $2, $3)")
                .bind(key(k))
                .bind(tenant)
                .bind(format!("h{k}"))
                .execute(&db.pool)
                .await
                .unwrap();
        }
        let one = db
            .seeded(
                tenant,
                "INSERT INTO audit_log (tenant_id, key_id, action, target_id)
                 SELECT $1, '00000000-0000-0000-0000-000000000001', 'key.create', 'needle'
                 UNION ALL
                 SELECT $1, CASE WHEN i % 11 = 0 THEN '00000000-0000-0000-0000-000000000001'
                                 ELSE '00000000-0000-0000-0000-000000000002' END::uuid,
                        CASE WHEN i % 11 = 0 THEN 'job.submit' ELSE 'key.create' END, NULL
                 FROM generate_series(1, 16500) AS i",
            )
            .await;
        let filter = |cursor| Filter {
            key_id: Some(key(1)),
            action: Some(Action::KeyCreate),
            cursor,
            ..Filter::default()
        };
        let before = db.rows_read(&one, "audit_log").await;
        let first = list(&one, tenant, &filter(None), 50, usize::MAX, 1_000)
            .await
            .unwrap();
        let read = db.rows_read(&one, "audit_log").await - before;
        assert!(read <= 1_050, "the first page read {read} rows");
        assert!(first.entries.is_empty() && first.next_cursor.is_some());
        let mut found = first.entries;
        let mut cursor = first.next_cursor;
        while let Some(c) = cursor {
            let page = list(&one, tenant, &filter(Some(c)), 50, usize::MAX, 1_000)
                .await
                .unwrap();
            found.extend(page.entries);
            cursor = page.next_cursor;
        }
        let found: Vec<_> = found.iter().map(|e| e.target_id.as_deref()).collect();
        assert_eq!(found, [Some("needle")]);
    }
}
