//! `patch`: one guarded UPDATE or DELETE on a target database, and `patch_rollback`, which
//! restores what an executed patch changed. The contracts: payloads, the static guard, the
//! table's key from the catalog, the plan and its risk, and the registry of executed patches.

pub mod growth;
pub mod guard;
pub mod record;
pub mod table;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::{
    connections::{Target, Targets},
    store, FieldError, JobStatus,
};
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{Context, Contract, Refusal};
use guard::{Checked, Operation};
use record::Record;
use table::Table;

pub struct Patch;

#[async_trait]
impl Contract for Patch {
    const KIND: &'static str = "patch";
    type Payload = PatchPayload;
    type Output = PatchOutput;

    fn check(&self, payload: &PatchPayload) -> Result<(), Vec<FieldError>> {
        payload.check().map(drop)
    }

    async fn preflight(
        &self,
        context: &Context,
        tenant: Uuid,
        payload: &PatchPayload,
    ) -> Result<(), Refusal> {
        assess_for(&context.targets, tenant, payload)
            .await
            .map(drop)
    }
}

pub struct PatchRollback;

#[async_trait]
impl Contract for PatchRollback {
    const KIND: &'static str = "patch_rollback";
    type Payload = RollbackPayload;
    type Output = RollbackOutput;

    fn check(&self, _payload: &RollbackPayload) -> Result<(), Vec<FieldError>> {
        Ok(())
    }

    async fn preflight(
        &self,
        context: &Context,
        tenant: Uuid,
        payload: &RollbackPayload,
    ) -> Result<(), Refusal> {
        locate(&context.pool, &context.targets, tenant, payload, None)
            .await
            .map(drop)
    }
}

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
        // A foreign key's action changes rows of another table in the same statement, rows no
        // snapshot keeps: a rollback restored this table's rows and not theirs.
        let acting = table.referenced_by.iter().find_map(|r| {
            let action = match checked.operation {
                Operation::Delete => r.on_delete,
                Operation::Update => r
                    .on_update
                    .filter(|_| r.columns.iter().any(|c| checked.assigned.contains(c))),
            };
            action.map(|action| (r, action))
        });
        if let Some((reference, action)) = acting {
            return Err(format!(
                "{} references this table with ON {} {action}: the change would change its \
                 rows too, which no snapshot keeps (a rollback could not restore them); change \
                 those rows first, or patch without that action",
                reference.child,
                match checked.operation {
                    Operation::Delete => "DELETE",
                    Operation::Update => "UPDATE",
                },
            ));
        }
        // An update may change what a generated key is computed from, moving rows ahead of
        // the checkpoint: the walk met them again, patching them once more, without end.
        let generated = table.key.iter().find(|c| c.generated);
        if let (Some(column), Operation::Update) = (generated, checked.operation) {
            return Err(format!(
                "the table's key column {} is generated from other columns; a patch walks \
                 the key in batches, and an update could move rows ahead of where it stands",
                column.name
            ));
        }
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

/// Every check before a patch is accepted, and its risk (also `POST /v1/patches/preflight`).
pub async fn assess_for(
    targets: &Targets,
    tenant: Uuid,
    payload: &PatchPayload,
) -> Result<Assessment, Refusal> {
    let checked = payload.check()?;
    let target = targets.target(tenant, payload.connection_id).await?;
    let pool = &target.pool;
    // Brief and harmless: catalog look-ups and a plain EXPLAIN, which executes nothing.
    let plan = load_plan(&target, checked).await.map_err(|e| match e {
        PlanError::Refused(reason) => Refusal::Invalid(sql_error(reason)),
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
            // Missing and forbidden read alike: "permission denied for schema" against "does
            // not exist" told a tenant which of another's objects exist.
            sqlx::Error::Database(e)
                if matches!(
                    e.code().as_deref(),
                    Some("42501" | "42704" | "42P01" | "42883" | "3F000")
                ) =>
            {
                Refusal::Invalid(sql_error(
                    "is refused by the database: it names a type, table, function or schema \
                     that does not exist or that the tenant's role cannot use"
                        .to_owned(),
                ))
            }
            sqlx::Error::Database(e) => Refusal::Invalid(sql_error(format!(
                "is refused by the database: {}",
                e.message()
            ))),
            other => unreachable(other),
        })?;
    Ok(assess(payload, &plan, &explain))
}

/// The detail stays in the log: a raw database error can describe the server to a client.
fn unreachable(e: sqlx::Error) -> Refusal {
    tracing::warn!(error = %e, "preflight could not read the target database");
    Refusal::Unreachable
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

#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackPayload {
    /// The `patch` job (mode `execute`) to undo.
    pub patch_job_id: Uuid,
    /// With conflicts (rows changed since the patch), restore the other rows anyway; the
    /// conflicting rows are left as they are.
    #[serde(default)]
    pub force: bool,
}

/// The patch job's payload and its record in the target database, or why there is
/// nothing to roll back. `rolling_back` is the rollback job itself, which may resume.
pub async fn locate(
    pool: &PgPool,
    targets: &Targets,
    tenant: Uuid,
    payload: &RollbackPayload,
    rolling_back: Option<Uuid>,
) -> Result<(Target, Record), Refusal> {
    let refuse = |reason: String| Refusal::field("payload.patch_job_id", reason);
    let job = store::get_job(pool, tenant, payload.patch_job_id)
        .await?
        .ok_or_else(|| Refusal::Unknown("patch job".into()))?;
    if job.kind != "patch" {
        return Err(refuse(format!("is a {} job, not a patch", job.kind)));
    }
    let patch: PatchPayload = serde_json::from_value(job.payload.clone())
        .map_err(|e| Refusal::Internal(format!("stored patch payload: {e}")))?;
    if patch.mode != Mode::Execute {
        return Err(refuse("was a dry run: it changed nothing".into()));
    }
    if !job.status().is_terminal() && job.status() != JobStatus::Retrying {
        return Err(refuse(format!(
            "is still {}; wait for it to finish or cancel it first",
            job.status()
        )));
    }
    if job.status() == JobStatus::Retrying {
        return Err(refuse(
            "is waiting for another attempt; cancel it first".into(),
        ));
    }
    let target = targets.target(tenant, patch.connection_id).await?;
    let registered: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('conveyor_snapshots.patches')::text")
            .fetch_one(&target.platform)
            .await?;
    let record = match registered {
        Some(_) => record::load(&target.platform, job.id).await?,
        None => None,
    };
    let Some(record) = record else {
        return Err(refuse(
            "applied no batch, so there is nothing to restore".into(),
        ));
    };
    if record.expired() {
        return Err(refuse(format!(
            "its snapshot expired at {}",
            record.expires_at
        )));
    }
    if record.rolled_back_at.is_some() && record.rollback_job_id != rolling_back {
        return Err(refuse(format!(
            "was already rolled back by job {}",
            record.rollback_job_id.unwrap_or_default()
        )));
    }
    Ok((target, record))
}

/// A patch's result: a dry run's preview, or what an execute changed.
#[derive(Debug, Serialize, ToSchema)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum PatchOutput {
    DryRun(DryRun),
    Execute(Executed),
}

/// The statement run in a transaction that was rolled back.
#[derive(Debug, Serialize, ToSchema)]
pub struct DryRun {
    /// The exact number of rows the statement changes.
    pub rows: u64,
    pub estimated_rows: f64,
    /// `EXPLAIN (FORMAT JSON)` of the statement.
    pub explain: Value,
    /// The first rows by key: `{key, deleted, changes: {column: {before, after}}}`.
    pub sample: Vec<Value>,
    pub preflight: Assessment,
    pub elapsed_ms: u64,
}

/// An execute: its progress in the registry, and what this attempt did.
#[derive(Debug, Serialize, ToSchema)]
pub struct Executed {
    pub table: String,
    pub operation: String,
    pub key: Vec<String>,
    pub rows: i64,
    pub rows_expected: i64,
    pub batches: i32,
    /// Rows done by earlier attempts when this one started.
    pub resumed_from_rows: i64,
    #[schema(value_type = Vec<Object>)]
    pub snapshots: Vec<record::Listing>,
    pub preflight: Assessment,
    /// Absent when an earlier attempt had already finished the patch.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<AttemptFigures>,
    pub outputs: PatchOutputs,
}

/// What one attempt of an execute did.
#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptFigures {
    pub attempt_rows: i64,
    pub elapsed_ms: u64,
    pub rows_per_sec: f64,
    pub longest_batch_ms: f64,
    pub longest_lock_ms: f64,
    pub last_batch_size: i64,
}

/// The table a patch changed, and the snapshot a rollback restores from.
#[derive(Debug, Serialize, ToSchema)]
pub struct PatchOutputs {
    pub table: String,
    pub snapshot: String,
}

/// A rollback's result.
#[derive(Debug, Serialize, ToSchema)]
pub struct RollbackOutput {
    pub patch_job_id: Uuid,
    pub table: String,
    /// The snapshot table it restored from.
    pub snapshot: String,
    pub rows_restored: i64,
    /// Snapshot rows left as they were: changed again after the patch.
    pub conflicts: i64,
    /// Some of the conflicting rows' keys.
    pub conflict_keys: Vec<Vec<String>>,
    pub elapsed_ms: u64,
    pub longest_batch_ms: f64,
    pub outputs: crate::import::TableOutputs,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_payload;
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
