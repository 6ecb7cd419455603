//! The registry of executed patches in a target database (`conveyor_snapshots.patches`), as
//! both sides read it: the rollback's preflight and the jobs that write it.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::table::quote;

pub const SCHEMA: &str = "conveyor_snapshots";
/// Column of a snapshot table holding the id of the transaction that wrote the row's
/// after-image (`xid8`; NULL for a delete).
pub const AFTER_XID: &str = "conveyor_after_xid";

/// A patch's row in `conveyor_snapshots.patches`.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Record {
    pub job_id: Uuid,
    pub table_name: String,
    pub key_columns: Vec<String>,
    pub operation: String,
    pub statement: String,
    pub snapshot_table: String,
    pub rows_expected: i64,
    pub rows_done: i64,
    pub batches: i32,
    pub last_key: Option<Vec<String>>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub expires_at: DateTime<Utc>,
    pub dropped_at: Option<DateTime<Utc>>,
    pub rollback_job_id: Option<Uuid>,
    pub rollback_key: Option<Vec<String>>,
    pub rows_restored: i64,
    pub rolled_back_at: Option<DateTime<Utc>>,
}

/// How a snapshot is listed on the job.
#[derive(Debug, Serialize)]
pub struct Listing {
    pub table: String,
    pub rows: i64,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

impl Record {
    pub fn listing(&self) -> Listing {
        Listing {
            table: self.snapshot_table.clone(),
            rows: self.rows_done,
            created_at: self.created_at,
            expires_at: self.expires_at,
        }
    }

    pub fn expired(&self) -> bool {
        self.dropped_at.is_some() || self.expires_at <= Utc::now()
    }
}

/// `"conveyor_snapshots"."patch_<id>"`.
pub fn snapshot_table(job: Uuid) -> String {
    format!(
        "{}.{}",
        quote(SCHEMA),
        quote(&format!("patch_{}", job.simple()))
    )
}

/// The registry row of patch job `job`, if its first batch committed.
pub async fn load(pool: &PgPool, job: Uuid) -> sqlx::Result<Option<Record>> {
    sqlx::query_as("SELECT * FROM conveyor_snapshots.patches WHERE job_id = $1")
        .bind(job)
        .fetch_optional(pool)
        .await
}
