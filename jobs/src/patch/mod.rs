//! `patch`: one guarded UPDATE or DELETE on a target database. A dry run executes it in a
//! transaction that is rolled back and shows what it would do; an execute walks the table's key
//! in short batches, each copying the before-images of its rows into a snapshot table and
//! recording a checkpoint in the same transaction, so a crash never applies a batch twice and
//! `patch_rollback` can restore the rows.

pub mod guard;
mod rollback;
mod run;
pub mod snapshot;
pub mod table;

pub use rollback::{PatchRollback, RollbackPayload};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::{
    connections::{Target, TargetError},
    FieldError, JobContext, Problem,
};
use sqlx::PgPool;
use std::sync::Arc;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{parse_payload, Handler, JobError, Services};
use guard::{Checked, Operation};
use table::Table;

pub const MAX_TARGET_BATCH_MS: u64 = 10_000;
pub const MAX_PAUSE_MS: u64 = 60_000;
pub const MAX_BATCH_SIZE: u32 = 1_000_000;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Run the statement in a transaction that is rolled back; report what it would do.
    #[default]
    DryRun,
    /// Apply it in batches with snapshots and checkpoints.
    Execute,
}

#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchPayload {
    /// A registered connection; the default target database when absent.
    #[serde(default)]
    pub connection_id: Option<Uuid>,
    /// One UPDATE or DELETE of one table.
    pub sql: String,
    pub mode: Mode,
    /// Rows per batch; adaptive (about `target_batch_ms` a batch) when absent.
    #[serde(default)]
    pub batch_size: Option<u32>,
    /// What an adaptive batch aims to take, in milliseconds (default 200).
    #[serde(default = "default_target_batch_ms")]
    pub target_batch_ms: u64,
    /// The job fails, before the batch that would pass it, if more rows would change.
    #[serde(default)]
    pub max_rows: Option<u64>,
    /// Lets a statement without a (row-dependent) WHERE clause through.
    #[serde(default)]
    pub allow_full_table: bool,
    /// Sleep between batches, in milliseconds, to leave the database room.
    #[serde(default)]
    pub pause_ms: u64,
}

fn default_target_batch_ms() -> u64 {
    200
}

/// How dangerous a patch looks before it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Risk {
    Low,
    Medium,
    High,
}

/// What preflight found: returned by `POST /v1/patches/preflight` and in the job's result.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Assessment {
    pub risk: Risk,
    pub reasons: Vec<String>,
    /// `"schema"."table"`.
    pub table: String,
    /// The key the patch walks.
    pub key: Vec<String>,
    /// `primary key` or `unique index <name>`.
    pub key_source: String,
    #[schema(value_type = String)]
    pub operation: Operation,
    /// The planner's estimate of the rows the statement touches.
    pub estimated_rows: f64,
    /// The planner's estimate of the table's rows.
    pub table_rows: f64,
    /// The statement as it will run.
    pub statement: String,
}

fn sql_error(message: impl Into<String>) -> Vec<FieldError> {
    vec![FieldError::new("payload.sql", message)]
}

impl PatchPayload {
    /// Shape and the static guard; the error names its field.
    pub fn check(&self) -> Result<Checked, Vec<FieldError>> {
        let mut errors = Vec::new();
        if self.target_batch_ms == 0 || self.target_batch_ms > MAX_TARGET_BATCH_MS {
            errors.push(FieldError::new(
                "payload.target_batch_ms",
                format!("must be between 1 and {MAX_TARGET_BATCH_MS}"),
            ));
        }
        if self
            .batch_size
            .is_some_and(|n| n == 0 || n > MAX_BATCH_SIZE)
        {
            errors.push(FieldError::new(
                "payload.batch_size",
                format!("must be between 1 and {MAX_BATCH_SIZE}"),
            ));
        }
        if self.max_rows == Some(0) {
            errors.push(FieldError::new("payload.max_rows", "must be at least 1"));
        }
        if self.pause_ms > MAX_PAUSE_MS {
            errors.push(FieldError::new(
                "payload.pause_ms",
                format!("must be at most {MAX_PAUSE_MS}"),
            ));
        }
        let checked = match guard::check(&self.sql) {
            Ok(checked) => Some(checked),
            Err(reason) => {
                errors.extend(sql_error(reason));
                None
            }
        };
        if let Some(c) = &checked {
            if !self.allow_full_table {
                if c.filter.is_none() {
                    errors.extend(sql_error(
                        "has no WHERE clause and would change every row; set allow_full_table \
                         if that is intended",
                    ));
                } else if c.filter_is_constant {
                    errors.extend(sql_error(
                        "its WHERE clause (or a branch of an OR) does not depend on the row, so \
                         it matches every row (e.g. `WHERE 1=1`); set allow_full_table if that \
                         is intended",
                    ));
                }
            }
        }
        match checked {
            Some(c) if errors.is_empty() => Ok(c),
            _ => Err(errors),
        }
    }
}

/// A checked statement bound to the table the catalog resolved: every SQL text the job runs.
#[derive(Clone, Debug)]
pub struct Plan {
    pub checked: Checked,
    pub table: Table,
    /// How the statements refer to the table's rows: the alias, or the table's name.
    pub qualifier: String,
    /// `"schema"."table" [AS alias]`.
    pub target: String,
}

impl Plan {
    /// Checks the statement against the table: the key must not change.
    pub fn new(checked: Checked, table: Table) -> Result<Self, String> {
        let key = table.key_names();
        if let Some(column) = checked.assigned.iter().find(|c| key.contains(c)) {
            return Err(format!(
                "assigns key column {column}; a patch walks the key ({}) in batches, so it \
                 cannot change it",
                key.join(", ")
            ));
        }
        if let Some(column) = checked
            .assigned
            .iter()
            .find(|c| !table.columns.iter().any(|t| &&t.name == c))
        {
            return Err(format!(
                "assigns column {column}, which {} does not have",
                table.qualified
            ));
        }
        let qualifier = checked
            .alias
            .clone()
            .unwrap_or_else(|| table::quote(&table.name));
        let target = match &checked.alias {
            Some(alias) => format!("{} AS {alias}", table.qualified),
            None => table.qualified.clone(),
        };
        Ok(Self {
            checked,
            table,
            qualifier,
            target,
        })
    }

    /// ` WHERE (cond)` or nothing.
    fn where_clause(&self) -> String {
        self.checked
            .filter
            .as_ref()
            .map(|f| format!(" WHERE ({f})"))
            .unwrap_or_default()
    }

    /// The statement as it runs whole (dry run, EXPLAIN): on the resolved table.
    pub fn statement(&self) -> String {
        match self.checked.operation {
            Operation::Update => format!(
                "UPDATE {} SET {}{}",
                self.target,
                self.checked.set,
                self.where_clause()
            ),
            Operation::Delete => format!("DELETE FROM {}{}", self.target, self.where_clause()),
        }
    }

    /// Counts the rows the statement touches.
    pub fn count(&self) -> String {
        format!(
            "SELECT count(*) FROM {}{}",
            self.target,
            self.where_clause()
        )
    }
}

/// The `patch` kind.
pub struct Patch {
    services: Arc<Services>,
}

impl Patch {
    pub fn new(services: Arc<Services>) -> Self {
        Self { services }
    }

    async fn target(&self, tenant: Uuid, connection: Option<Uuid>) -> Result<Target, Problem> {
        self.services
            .targets
            .target(tenant, connection)
            .await
            .map_err(|e| match e {
                TargetError::UnknownConnection(_) => Problem::not_found("connection"),
                TargetError::Other(e) => Problem::internal(e),
            })
    }

    /// Every check before a patch is accepted, and its risk. The payload is parsed and
    /// guarded again, so this also serves `POST /v1/patches/preflight` on its own.
    pub async fn assess(&self, tenant: Uuid, payload: &Value) -> Result<Assessment, Problem> {
        let payload: PatchPayload = parse_payload(payload).map_err(Problem::validation)?;
        let checked = payload.check().map_err(Problem::validation)?;
        let target = self.target(tenant, payload.connection_id).await?;
        let pool = &target.pool;
        // Brief and harmless: catalog look-ups and a plain EXPLAIN, which executes nothing.
        let plan = load_plan(&target, checked).await.map_err(|e| match e {
            PlanError::Refused(reason) => Problem::validation(sql_error(reason)),
            PlanError::Database(e) => unreachable(e),
        })?;
        let explain = explain(pool, &plan.statement())
            .await
            .map_err(|e| match e {
                // Out of time or a lock held elsewhere: the target's state, not the statement's.
                sqlx::Error::Database(ref db)
                    if matches!(db.code().as_deref(), Some("57014" | "55P03")) =>
                {
                    unreachable(e)
                }
                sqlx::Error::Database(e) => Problem::validation(sql_error(format!(
                    "is refused by the database: {}",
                    e.message()
                ))),
                other => unreachable(other),
            })?;
        Ok(assess(&payload, &plan, &explain))
    }
}

/// The detail stays in the log: a raw database error can describe the server to a client.
fn unreachable(e: sqlx::Error) -> Problem {
    tracing::warn!(error = %e, "preflight could not read the target database");
    Problem::unavailable("the target database is unreachable or did not answer in time")
}

pub enum PlanError {
    Refused(String),
    Database(sqlx::Error),
}

/// Resolves the table and binds the statement to it. A schema the target does not allow is
/// refused before the catalog is read (no probing of another tenant's table names), and
/// again once the name is resolved (an unqualified name found outside the tenant's schema).
pub async fn load_plan(target: &Target, checked: Checked) -> Result<Plan, PlanError> {
    if let Some(reason) = checked
        .schema
        .as_deref()
        .and_then(|schema| target.refuse_schema(schema))
    {
        return Err(PlanError::Refused(reason));
    }
    let table = table::describe(&target.pool, &checked.table)
        .await
        .map_err(|e| match e {
            table::Refusal::Database(e) => PlanError::Database(e),
            refusal => PlanError::Refused(refusal.to_string()),
        })?;
    if let Some(reason) = target.refuse_schema(&table.schema) {
        return Err(PlanError::Refused(reason));
    }
    Plan::new(checked, table).map_err(PlanError::Refused)
}

/// What `EXPLAIN (FORMAT JSON)` says of a statement.
#[derive(Clone, Debug, Default)]
pub struct Explain {
    pub rows: f64,
    /// A node scans the whole table.
    pub seq_scan: bool,
    pub plan: Value,
}

pub async fn explain(pool: &PgPool, statement: &str) -> sqlx::Result<Explain> {
    let sql = format!("EXPLAIN (FORMAT JSON) {statement}");
    let plan: Value = sqlx::query_scalar(&sql).fetch_one(pool).await?;
    let top = &plan[0]["Plan"];
    // UPDATE/DELETE plans are a ModifyTable node (0 rows) over the scan that finds the rows.
    let rows = top["Plans"][0]["Plan Rows"]
        .as_f64()
        .or_else(|| top["Plan Rows"].as_f64())
        .unwrap_or(0.0);
    Ok(Explain {
        rows,
        seq_scan: plan.to_string().contains("\"Seq Scan\""),
        plan,
    })
}

/// Risk from what the statement is and what the planner expects it to touch.
pub fn assess(payload: &PatchPayload, plan: &Plan, explain: &Explain) -> Assessment {
    let c = &plan.checked;
    let table_rows = plan.table.estimated_rows.max(0.0);
    let mut reasons: Vec<(Risk, String)> = Vec::new();
    if c.filter.is_none() || c.filter_is_constant {
        reasons.push((Risk::High, "changes every row of the table".into()));
    } else if table_rows >= 1000.0 && explain.rows >= 0.5 * table_rows {
        reasons.push((
            Risk::High,
            format!(
                "touches about {:.0} of {:.0} rows (half the table or more)",
                explain.rows, table_rows
            ),
        ));
    }
    if explain.rows > 1_000_000.0 {
        reasons.push((
            Risk::High,
            format!("touches about {:.0} rows", explain.rows),
        ));
    } else if explain.rows > 10_000.0 {
        reasons.push((
            Risk::Medium,
            format!("touches about {:.0} rows", explain.rows),
        ));
    }
    if c.operation == Operation::Delete {
        reasons.push((
            Risk::Medium,
            "deletes rows (restorable from the snapshot until it expires)".into(),
        ));
    }
    if explain.seq_scan && c.filter.is_some() && table_rows > 10_000.0 {
        reasons.push((
            Risk::Medium,
            "the WHERE clause uses no index: each batch scans the table".into(),
        ));
    }
    if !c.unstable.is_empty() {
        reasons.push((
            Risk::Medium,
            format!(
                "{} differ per batch (each batch is its own transaction)",
                c.unstable.join(", ")
            ),
        ));
    }
    if payload.mode == Mode::Execute && payload.max_rows.is_none() && explain.rows > 10_000.0 {
        reasons.push((Risk::Medium, "no max_rows limit".into()));
    }
    let risk = reasons.iter().map(|(r, _)| *r).max().unwrap_or(Risk::Low);
    let mut reasons: Vec<String> = reasons.into_iter().map(|(_, r)| r).collect();
    if reasons.is_empty() {
        reasons.push(format!(
            "touches about {:.0} of {:.0} rows through the {}",
            explain.rows, table_rows, plan.table.key_source
        ));
    }
    Assessment {
        risk,
        reasons,
        table: plan.table.qualified.clone(),
        key: plan.table.key_names(),
        key_source: plan.table.key_source.clone(),
        operation: c.operation,
        estimated_rows: explain.rows,
        table_rows,
        statement: plan.statement(),
    }
}

#[async_trait]
impl Handler for Patch {
    fn kind(&self) -> &'static str {
        "patch"
    }

    fn validate(&self, payload: &Value) -> Result<(), Vec<FieldError>> {
        parse_payload::<PatchPayload>(payload)?.check().map(drop)
    }

    async fn preflight(&self, tenant: Uuid, payload: &Value) -> Result<(), Problem> {
        self.assess(tenant, payload).await.map(drop)
    }

    async fn run(&self, ctx: &JobContext, payload: Value) -> Result<Value, JobError> {
        let payload: PatchPayload = serde_json::from_value(payload)
            .map_err(|e| JobError::Permanent(format!("invalid payload: {e}")))?;
        let checked = payload.check().map_err(|errors| {
            JobError::Permanent(
                errors
                    .into_iter()
                    .map(|e| format!("{}: {}", e.field, e.message))
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        let target = self
            .services
            .targets
            .target(ctx.tenant_id(), payload.connection_id)
            .await
            .map_err(|e| match e {
                TargetError::UnknownConnection(id) => {
                    JobError::Permanent(format!("connection {id} not found"))
                }
                TargetError::Other(e) => JobError::Retryable(e.to_string()),
            })?;
        let retention = self.services.settings.snapshot_retention;
        run::run(ctx, &payload, checked, &target, retention).await
    }

    /// Snapshots past their retention are dropped even when no patch runs any more.
    async fn sweep(&self) -> anyhow::Result<()> {
        self.services
            .sweep_targets("expired patch snapshots", |pool| async move {
                snapshot::sweep(&pool).await
            })
            .await
    }
}

/// A database error as a job error: bad data or SQL fails for good, the rest is retried.
pub(crate) fn job_error(e: sqlx::Error) -> JobError {
    if let sqlx::Error::Database(db) = &e {
        let code = db.code().unwrap_or_default();
        // 22: data exception, 23: integrity, 42: syntax/access, P0: raised by a trigger.
        if ["22", "23", "42", "P0", "2F", "39"]
            .iter()
            .any(|class| code.starts_with(class))
        {
            return JobError::Permanent(db.message().to_owned());
        }
    }
    JobError::Retryable(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn errors(payload: Value) -> Vec<FieldError> {
        parse_payload::<PatchPayload>(&payload)
            .and_then(|p| p.check().map(drop))
            .unwrap_err()
    }

    #[test]
    fn payload_shape() {
        let e = errors(json!({"sql": "DELETE FROM t WHERE id = 1", "mode": "now"}));
        assert_eq!(e[0].field, "payload.mode");
        let e = errors(
            json!({"sql": "DELETE FROM t WHERE id = 1", "mode": "execute", "batch_size": 0,
                   "target_batch_ms": 0, "max_rows": 0, "pause_ms": 999_999}),
        );
        let fields: Vec<&str> = e.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "payload.target_batch_ms",
                "payload.batch_size",
                "payload.max_rows",
                "payload.pause_ms"
            ]
        );
    }

    #[test]
    fn full_table_needs_consent() {
        let e = errors(json!({"sql": "UPDATE t SET a = 1", "mode": "dry_run"}));
        assert_eq!(e[0].field, "payload.sql");
        assert!(
            e[0].message.contains("allow_full_table"),
            "{}",
            e[0].message
        );
        let e = errors(json!({"sql": "DELETE FROM t WHERE 1=1", "mode": "execute"}));
        assert!(e[0].message.contains("does not depend on the row"));
        let ok: PatchPayload = serde_json::from_value(
            json!({"sql": "UPDATE t SET a = 1", "mode": "execute", "allow_full_table": true}),
        )
        .unwrap();
        assert!(ok.check().is_ok());
        assert_eq!(ok.target_batch_ms, 200);
    }
}
