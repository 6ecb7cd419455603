//! Snapshots and checkpoints, kept in the target database itself (schema `conveyor_snapshots`)
//! so that a batch, its before-images and its checkpoint commit in one transaction.
//!
//! - `conveyor_snapshots.patches`: one row per executed patch job: the table, its key, how far
//!   the patch got (`last_key`, `rows_done`), how far a rollback got, when the snapshot expires.
//! - `conveyor_snapshots.patch_<job id>`: the before-image of every changed row (the table's
//!   columns) and the id of the transaction that wrote its after-image: a rollback sees that a
//!   row changed since when its `xmin` is another transaction's (cheaper than hashing every
//!   after-image, and it also catches a write of the same values); uniquely indexed by the
//!   table's key once the patch ends.

use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

use shared::connections::Target;

pub use contracts::patch::record::{load, snapshot_table, Listing, Record, AFTER_XID, SCHEMA};

use super::{guard::Operation, table::quote, Plan};

/// Serialises the creation of the schema by concurrent jobs ("snapshot" in ASCII).
const SETUP_LOCK: i64 = 0x736e617073686f74;

/// Creates the schema and the registry if missing (once per database, under a lock). On the
/// default target the schema comes from the bootstrap (the platform may not create schemas).
pub async fn ensure_schema(pool: &PgPool) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(SETUP_LOCK)
        .execute(&mut *tx)
        .await?;
    let exists: bool =
        sqlx::query_scalar("SELECT to_regnamespace('conveyor_snapshots') IS NOT NULL")
            .fetch_one(&mut *tx)
            .await?;
    if !exists {
        sqlx::query("CREATE SCHEMA conveyor_snapshots")
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS conveyor_snapshots.patches (
             job_id uuid PRIMARY KEY,
             table_name text NOT NULL,
             key_columns text[] NOT NULL,
             operation text NOT NULL,
             statement text NOT NULL,
             snapshot_table text NOT NULL,
             rows_expected bigint NOT NULL,
             rows_done bigint NOT NULL DEFAULT 0,
             batches int NOT NULL DEFAULT 0,
             last_key text[],
             created_at timestamptz NOT NULL DEFAULT now(),
             finished_at timestamptz,
             expires_at timestamptz NOT NULL,
             dropped_at timestamptz,
             rollback_job_id uuid,
             rollback_key text[],
             rows_restored bigint NOT NULL DEFAULT 0,
             rolled_back_at timestamptz
         )",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Drops the snapshot tables whose retention has passed; their rows stay, marked dropped. A
/// rollback may pin a snapshot ([`pin`]) after it was listed here: its drop is undone. A
/// table someone holds (a tenant reading its snapshot through a rollback as its expiry
/// passes) is left for the next sweep after [`DROP_LOCK_WAIT`]: the others go meanwhile.
pub async fn drop_expired(pool: &PgPool) -> sqlx::Result<Vec<String>> {
    // The table's name comes from the job id, never from the registry's text.
    let expired: Vec<Uuid> = sqlx::query_scalar(
        "SELECT job_id FROM conveyor_snapshots.patches
         WHERE expires_at <= now() AND dropped_at IS NULL",
    )
    .fetch_all(pool)
    .await?;
    let mut dropped = Vec::new();
    for job in expired {
        let table = snapshot_table(job);
        match drop_one(pool, job, &table).await {
            Ok(true) => dropped.push(table),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(%table, error = %shared::telemetry::Untrusted(&e), "expired snapshot not dropped; next sweep")
            }
        }
    }
    Ok(dropped)
}

/// How long a sweep waits for a snapshot table someone holds.
const DROP_LOCK_WAIT: &str = "1s";

/// Drops one expired snapshot table; false: pinned meanwhile, kept.
async fn drop_one(pool: &PgPool, job: Uuid, table: &str) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(DROP_LOCK_WAIT)
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
        .execute(&mut *tx)
        .await?;
    // Expired still, checked under the row's lock (taken after the table's, as a
    // rollback's batches take them): a rollback that pinned it meanwhile keeps it.
    let still_expired = sqlx::query(
        "UPDATE conveyor_snapshots.patches SET dropped_at = now()
         WHERE job_id = $1 AND expires_at <= now() AND dropped_at IS NULL",
    )
    .bind(job)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if !still_expired {
        tx.rollback().await?;
        return Ok(false);
    }
    tx.commit().await?;
    Ok(true)
}

/// How long past now a rollback keeps its patch's snapshot, renewed by each of its batches:
/// the sweep leaves it while the rollback runs, and a retry of the rollback still finds it.
pub const PIN: Duration = Duration::from_secs(3600);

/// Keeps the snapshot of patch `job` at least [`PIN`] past now, unless it has expired or been
/// dropped (`None`). Under the registry row's lock, which [`drop_expired`] checks again under:
/// a snapshot is pinned or dropped, never both.
pub async fn pin(pool: &PgPool, job: Uuid) -> sqlx::Result<Option<Record>> {
    sqlx::query_as(
        "UPDATE conveyor_snapshots.patches
         SET expires_at = greatest(expires_at, now() + make_interval(secs => $2))
         WHERE job_id = $1 AND dropped_at IS NULL AND expires_at > now()
         RETURNING *",
    )
    .bind(job)
    .bind(PIN.as_secs_f64())
    .fetch_optional(pool)
    .await
}

/// [`drop_expired`] in a target database where patches ran.
pub async fn sweep(pool: &PgPool) -> sqlx::Result<Vec<String>> {
    let registry: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('conveyor_snapshots.patches')::text")
            .fetch_one(pool)
            .await?;
    match registry {
        Some(_) => drop_expired(pool).await,
        None => Ok(Vec::new()),
    }
}

/// The snapshot table and the registry row, together, as the platform. On the default target
/// the tenant's role may add rows to this one snapshot and read them (its patch's batches and
/// rollback run as that role), nothing more.
pub async fn create(
    target: &Target,
    job: Uuid,
    plan: &Plan,
    rows_expected: i64,
    retention: Duration,
) -> sqlx::Result<Record> {
    let snapshot = snapshot_table(job);
    let mut tx = target.platform.begin().await?;
    sqlx::query(&format!(
        "CREATE TABLE {snapshot} (LIKE {}, {AFTER_XID} xid8)",
        plan.table.qualified
    ))
    .execute(&mut *tx)
    .await?;
    if let Some(role) = &target.tenant_role {
        sqlx::query(&format!(
            "GRANT SELECT, INSERT ON {snapshot} TO {}",
            quote(role)
        ))
        .execute(&mut *tx)
        .await?;
    }
    let record = sqlx::query_as(
        "INSERT INTO conveyor_snapshots.patches
             (job_id, table_name, key_columns, operation, statement, snapshot_table,
              rows_expected, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, now() + make_interval(secs => $8))
         RETURNING *",
    )
    .bind(job)
    .bind(&plan.table.qualified)
    .bind(plan.table.key_names())
    .bind(operation_name(plan.checked.operation))
    .bind(plan.statement())
    .bind(&snapshot)
    .bind(rows_expected)
    .bind(retention.as_secs_f64())
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(record)
}

pub fn operation_name(operation: Operation) -> &'static str {
    match operation {
        Operation::Update => "update",
        Operation::Delete => "delete",
    }
}

/// Indexes the snapshot by the table's key, once its rows are in: cheaper than maintaining the
/// index batch by batch, and a last proof that no row was snapshotted (so changed) twice.
/// Rollback walks this index.
pub async fn index(pool: &PgPool, record: &Record) -> sqlx::Result<()> {
    let name = format!("patch_{}_key", record.job_id.simple());
    let keys: Vec<String> = record.key_columns.iter().map(|k| quote(k)).collect();
    sqlx::query(&format!(
        "CREATE UNIQUE INDEX IF NOT EXISTS {} ON {} ({})",
        quote(&name),
        snapshot_table(record.job_id),
        keys.join(", ")
    ))
    .execute(pool)
    .await
    .map(drop)
}

pub async fn finish(pool: &PgPool, record: &Record) -> sqlx::Result<Record> {
    index(pool, record).await?;
    sqlx::query_as(
        "UPDATE conveyor_snapshots.patches SET finished_at = coalesce(finished_at, now())
         WHERE job_id = $1 RETURNING *",
    )
    .bind(record.job_id)
    .fetch_one(pool)
    .await
}

/// The first phase of a batch, which takes no lock: the addresses of the next `$2` rows after
/// key `$1` that the WHERE clause matches (from the start if `first`), and the last key among
/// them. Scanning past rows the filter skips is the slow part of a sparse patch; doing it
/// before any row is locked keeps the locking phase short.
pub fn scan_sql(plan: &Plan, first: bool) -> String {
    let t = &plan.table;
    let q = &plan.qualifier;
    let mut filter = plan.checked.filter.clone().map(|f| format!("({f})"));
    if !first {
        let bound = format!("({}) > ({})", t.key_list(q), t.key_param(1));
        filter = Some(match filter {
            Some(f) => format!("{f} AND {bound}"),
            None => bound,
        });
    }
    let filter = filter.map(|f| format!(" WHERE {f}")).unwrap_or_default();
    format!(
        "WITH batch AS (
             SELECT {q}.ctid AS conveyor_ctid, {select}
               FROM {target}{filter} ORDER BY {keys} LIMIT $2
         )
         SELECT coalesce((SELECT array_agg(conveyor_ctid::text) FROM batch), '{{}}') AS tids,
                (SELECT {key_text} FROM batch ORDER BY {desc} LIMIT 1) AS last_key",
        select = t.key_select(q),
        target = plan.target,
        keys = t.key_list(q),
        key_text = t.key_text(),
        desc = t.key_desc(),
    )
}

/// Moves the checkpoint of job `$1` by `$2` rows from key `$3` to `$4`, as the platform, in the
/// batch's transaction. No row when another attempt moved the checkpoint (a job rescued from a
/// worker that was not dead after all), or a rollback of the patch has begun (a retry of the
/// patch while it ran): the caller rolls back and reloads.
pub const MARK_SQL: &str = "UPDATE conveyor_snapshots.patches
     SET rows_done = rows_done + $2, batches = batches + 1, last_key = $4::text[]
     WHERE job_id = $1 AND last_key IS NOT DISTINCT FROM $3::text[]
       AND rollback_job_id IS NULL";

/// The second phase of a batch, in the same repeatable-read transaction, as one statement of
/// the tenant's role: change exactly the rows at addresses `$1` (the scan's rows: a row changed
/// by someone else since fails the transaction, which is retried) and copy their before-images
/// into the snapshot table with the id of the transaction that wrote their after-images.
/// Returns how many. Row locks are held from this statement to the commit; [`MARK_SQL`]
/// follows it.
pub fn change_sql(plan: &Plan, snapshot: &str) -> String {
    let q = &plan.qualifier;
    let (change, after) = match plan.checked.operation {
        Operation::Update => (
            format!(
                "UPDATE {} SET {} FROM batch conveyor_batch",
                plan.target, plan.checked.set
            ),
            "pg_current_xact_id()",
        ),
        Operation::Delete => (
            format!("DELETE FROM {} USING batch conveyor_batch", plan.target),
            "NULL::xid8",
        ),
    };
    // By name: a table replaced between batches with its columns in another order (an
    // import's `replace`) had its before-images copied by position, into the wrong columns,
    // and a rollback restored them swapped.
    let columns: Vec<String> = plan.table.columns.iter().map(|c| quote(&c.name)).collect();
    let before: Vec<String> = columns
        .iter()
        .map(|c| format!("(c.conveyor_before).{c}"))
        .collect();
    format!(
        "WITH batch AS (
             SELECT {q} AS conveyor_before, {q}.ctid AS conveyor_ctid
             FROM {target} WHERE {q}.ctid = ANY($1::text[]::tid[])
         ), changed AS (
             {change} WHERE {q}.ctid = conveyor_batch.conveyor_ctid
             RETURNING conveyor_batch.conveyor_before
         ), saved AS (
             INSERT INTO {snapshot} ({columns}, {AFTER_XID})
             SELECT {before}, {after} FROM changed c
             RETURNING 1
         )
         SELECT count(*) FROM saved",
        target = plan.target,
        columns = columns.join(", "),
        before = before.join(", "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::patch::{guard, table};

    /// The SQL with every run of white space as one space: what it says, not its layout.
    fn words(sql: &str) -> String {
        sql.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn a_batch_statement_reads_as_intended() {
        let checked = guard::check("UPDATE t AS x SET a = x.a + 1 WHERE x.b > 3").unwrap();
        let column = |name: &str| table::Column {
            name: name.into(),
            type_name: "bigint".into(),
            generated: false,
            identity_always: false,
        };
        let table = table::Table {
            schema: "public".into(),
            name: "t".into(),
            qualified: "\"public\".\"t\"".into(),
            key: vec![column("id")],
            key_source: "primary key".into(),
            columns: vec![column("id"), column("a"), column("b")],
            estimated_rows: 10.0,
            referenced_by: Vec::new(),
        };
        let plan = Plan::new(checked, table).unwrap();
        let next = words(&scan_sql(&plan, false));
        assert!(
            next.contains(
                "x.\"id\" AS conveyor_k1 FROM \"public\".\"t\" AS x WHERE (x.b > 3) AND \
                 (x.\"id\") > (($1::text[])[1]::bigint) ORDER BY x.\"id\" LIMIT $2"
            ),
            "{next}"
        );
        let first = scan_sql(&plan, true);
        assert!(!first.contains(") > (($1"), "{first}");
        let change = words(&change_sql(&plan, "\"conveyor_snapshots\".\"patch_1\""));
        assert!(
            change.contains(
                "UPDATE \"public\".\"t\" AS x SET a = x.a + 1 FROM batch conveyor_batch WHERE \
             x.ctid = conveyor_batch.conveyor_ctid"
            ),
            "{change}"
        );
        assert!(change.contains("INSERT INTO \"conveyor_snapshots\".\"patch_1\""));
        assert_eq!(
            plan.statement(),
            "UPDATE \"public\".\"t\" AS x SET a = x.a + 1 WHERE (x.b > 3)"
        );
        let checked = guard::check("UPDATE t SET id = id + 1 WHERE a = 1").unwrap();
        let err = Plan::new(checked, plan.table.clone()).unwrap_err();
        assert!(err.contains("key column id"), "{err}");
        // A generated key may move under an update (`id` computed from `a`); a delete is fine.
        let mut generated = plan.table.clone();
        generated.key[0].generated = true;
        let checked = guard::check("UPDATE t SET a = a + 1").unwrap();
        let err = Plan::new(checked, generated.clone()).unwrap_err();
        assert!(err.contains("generated"), "{err}");
        let checked = guard::check("DELETE FROM t WHERE a = 1").unwrap();
        assert!(Plan::new(checked, generated).is_ok());
    }
}
