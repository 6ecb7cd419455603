//! `patch_rollback`: restores the before-images a patch job saved, in batches. A row changed
//! since the patch (written by a transaction other than the patch's batch, or deleted or
//! re-inserted) is a conflict: with any conflict the rollback restores nothing unless `force`,
//! and even then never overwrites the conflicting rows.

use async_trait::async_trait;
use contracts::{
    import::TableOutputs,
    patch::{locate, PatchRollback, RollbackOutput, RollbackPayload},
};
use serde_json::json;
use shared::{connections::Target, usage::Meter, JobContext};
use sqlx::Row;
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    job_error,
    run::{limit_time, next_batch_size, transient},
    snapshot::{self, Record, AFTER_XID},
    table::{self, quote, Table},
};
use crate::{Handler, JobError, Services};

const TARGET_BATCH: Duration = Duration::from_millis(200);
const CONFLICT_SAMPLE: i64 = 20;

pub struct PatchRollbackHandler {
    services: Arc<Services>,
}

impl PatchRollbackHandler {
    pub fn new(services: Arc<Services>) -> Self {
        Self { services }
    }
}

#[async_trait]
impl Handler for PatchRollbackHandler {
    type Contract = PatchRollback;

    async fn run(
        &self,
        ctx: &JobContext,
        payload: RollbackPayload,
    ) -> Result<RollbackOutput, JobError> {
        let services = &self.services;
        let (target, record) = locate(
            &services.pool,
            &services.targets,
            ctx.tenant_id(),
            &payload,
            Some(ctx.job_id()),
        )
        .await
        .map_err(|refusal| match refusal.is_transient() {
            true => JobError::Retryable(refusal.to_string()),
            false => JobError::Permanent(refusal.to_string()),
        })?;
        // As the tenant's role, which must still reach the table, in a schema it may write.
        let table = table::describe(&target.pool, &record.table_name)
            .await
            .map_err(|e| JobError::Permanent(e.to_string()))?;
        if let Some(reason) = target.refuse_schema(&table.schema) {
            return Err(JobError::Permanent(reason));
        }
        if table.key_names() != record.key_columns {
            return Err(JobError::Permanent(format!(
                "the key of {} changed since the patch (was {:?})",
                record.table_name, record.key_columns
            )));
        }
        Restore {
            ctx,
            target: &target,
            table: &table,
            record,
            force: payload.force,
        }
        .run()
        .await
    }
}

/// Restores as the tenant's role (`target.pool`: it may read its patch's snapshot); moves the
/// checkpoints as the platform (`target.platform`).
/// Moves the rollback's checkpoint of patch `$1` from `$2` to `$3` (if any row was seen) by
/// `$5` restored rows, for rollback job `$4`, and keeps the snapshot `$6` seconds past now
/// ([`snapshot::PIN`]); no row when another attempt moved it.
const MARK_SQL: &str = "UPDATE conveyor_snapshots.patches
     SET rollback_key = coalesce($3::text[], $2::text[]), rows_restored = rows_restored + $5,
         rollback_job_id = $4,
         expires_at = greatest(expires_at, now() + make_interval(secs => $6))
     WHERE job_id = $1 AND rollback_key IS NOT DISTINCT FROM $2::text[]";

struct Restore<'a> {
    ctx: &'a JobContext,
    target: &'a Target,
    table: &'a Table,
    record: Record,
    force: bool,
}

impl Restore<'_> {
    fn is_delete(&self) -> bool {
        self.record.operation == "delete"
    }

    async fn run(mut self) -> Result<RollbackOutput, JobError> {
        let started = Instant::now();
        // A cancelled or failed patch ended before indexing its snapshot.
        snapshot::index(&self.target.platform, &self.record)
            .await
            .map_err(job_error)?;
        let (total, keys) = self.conflicts().await.map_err(job_error)?;
        let remaining = self.record.rows_done - self.record.rows_restored;
        if total > 0 {
            let detail = json!({"conflicts": total, "keys": keys});
            self.ctx
                .report("rows changed since the patch", detail)
                .await;
            if !self.force {
                return Err(JobError::Permanent(format!(
                    "{total} of the patched rows changed since the patch (first keys: {}); \
                     nothing was restored; submit again with force to restore the other {} \
                     rows and leave these as they are",
                    serde_json::to_string(&keys).unwrap_or_default(),
                    remaining - total,
                )));
            }
        }
        // Kept while this rollback restores (each batch keeps it again): with its retention
        // passing midway, the sweep dropped it between two batches, or refused a retry, and
        // the rows stayed half restored. Not before: a rollback refused for conflicts kept it.
        let expired = format!("its snapshot expired at {}", self.record.expires_at);
        self.record = snapshot::pin(&self.target.platform, self.record.job_id)
            .await
            .map_err(job_error)?
            .ok_or(JobError::Permanent(expired))?;
        let (first, next) = (self.batch_sql(true), self.batch_sql(false));
        let mut size = 1_000;
        let (mut longest, mut retries, mut skipped) = (Duration::ZERO, 0, 0);
        let job = self.record.job_id;
        if self.record.rolled_back_at.is_none() {
            loop {
                self.ctx.checkpoint()?;
                let batch_started = Instant::now();
                let sql = if self.record.rollback_key.is_none() {
                    &first
                } else {
                    &next
                };
                match self.batch(sql, size).await {
                    Ok(Some((seen, restored, key))) => {
                        let elapsed = batch_started.elapsed();
                        longest = longest.max(elapsed);
                        retries = 0;
                        skipped += seen - restored;
                        self.record.rows_restored += restored;
                        Meter::add(&self.ctx.meter().rows_written, restored);
                        self.record.rollback_key = Some(key);
                        size = next_batch_size(size, elapsed, TARGET_BATCH);
                        let done = self.record.rows_restored + skipped;
                        self.ctx
                            .progress(
                                done as f32 / self.record.rows_done.max(1) as f32,
                                format!("{} rows restored", self.record.rows_restored),
                            )
                            .await;
                        continue;
                    }
                    Ok(None) => break,
                    Err(e) if retries < 10 && transient(&e) => {}
                    Err(e) => return Err(job_error(e)),
                }
                retries += 1;
                tokio::time::sleep(Duration::from_millis(50 << retries.min(6))).await;
                self.record = snapshot::load(&self.target.platform, job)
                    .await
                    .map_err(job_error)?
                    .ok_or_else(|| JobError::Permanent("the patch's record vanished".into()))?;
            }
            self.record = sqlx::query_as(
                "UPDATE conveyor_snapshots.patches
                 SET rolled_back_at = now(), rollback_job_id = $2
                 WHERE job_id = $1 RETURNING *",
            )
            .bind(job)
            .bind(self.ctx.job_id())
            .fetch_one(&self.target.platform)
            .await
            .map_err(job_error)?;
        }
        Ok(RollbackOutput {
            patch_job_id: job,
            table: self.record.table_name.clone(),
            snapshot: snapshot::snapshot_table(job),
            rows_restored: self.record.rows_restored,
            // Every snapshot row ends restored or left as a conflict.
            conflicts: self.record.rows_done - self.record.rows_restored,
            conflict_keys: keys,
            elapsed_ms: started.elapsed().as_millis() as u64,
            longest_batch_ms: (longest.as_secs_f64() * 1e4).round() / 10.0,
            outputs: TableOutputs {
                table: self.record.table_name.clone(),
            },
        })
    }

    /// `s."a" > ...` past the rollback's checkpoint, or `true` at the start.
    fn past_checkpoint(&self, param: usize) -> String {
        match self.record.rollback_key {
            Some(_) => format!(
                "({}) > ({})",
                self.table.key_list("s"),
                self.table.key_param(param)
            ),
            None => "true".into(),
        }
    }

    /// Rows not restored yet that changed since the patch: how many, and the first keys.
    async fn conflicts(&self) -> sqlx::Result<(i64, Vec<Vec<String>>)> {
        let t = self.table;
        // `a IS NOT NULL` of a whole row is false if any of its columns is null: a row there
        // again with a null in it went unseen. Its `ctid` says whether the row is there.
        let changed = if self.is_delete() {
            "a.ctid IS NOT NULL".to_owned() // deleted by the patch, there again now
        } else {
            format!("a.ctid IS NULL OR a.xmin <> s.{AFTER_XID}::xid")
        };
        let rows = sqlx::query(&format!(
            "SELECT count(*) OVER () AS total, {keys} AS key
             FROM {snapshot} s LEFT JOIN {table} a ON ({a}) = ({s})
             WHERE {past} AND ({changed})
             ORDER BY {s} LIMIT {CONFLICT_SAMPLE}",
            keys = key_array(t, "s"),
            snapshot = snapshot::snapshot_table(self.record.job_id),
            table = t.qualified,
            a = t.key_list("a"),
            s = t.key_list("s"),
            past = self.past_checkpoint(1),
        ))
        .bind(&self.record.rollback_key)
        .fetch_all(&self.target.pool)
        .await?;
        let total = rows.first().map(|r| r.get("total")).unwrap_or(0);
        Ok((total, rows.iter().map(|r| r.get("key")).collect()))
    }

    /// One batch: the next `$3` snapshot rows after `$2` (from the start if `first`), restored
    /// where the row is still as the patch left it. [`MARK_SQL`] moves the checkpoint after it.
    fn batch_sql(&self, first: bool) -> String {
        let t = self.table;
        let writable: Vec<&str> = t
            .writable()
            .into_iter()
            .filter(|c| !c.identity_always && !t.key.iter().any(|k| k.name == c.name))
            .map(|c| c.name.as_str())
            .collect();
        let restore = if self.is_delete() {
            let columns: Vec<String> = t.writable().iter().map(|c| quote(&c.name)).collect();
            let values: Vec<String> = t
                .writable()
                .iter()
                .map(|c| format!("b.{}", quote(&c.name)))
                .collect();
            format!(
                "INSERT INTO {table} ({columns}) OVERRIDING SYSTEM VALUE
                 SELECT {values} FROM batch b
                 WHERE NOT EXISTS (SELECT 1 FROM {table} x WHERE ({x}) = ({b}))
                 ON CONFLICT DO NOTHING RETURNING 1",
                table = t.qualified,
                columns = columns.join(", "),
                values = values.join(", "),
                x = t.key_list("x"),
                b = t.key_list("b"),
            )
        } else {
            let set: Vec<String> = writable
                .iter()
                .map(|c| format!("{0} = b.{0}", quote(c)))
                .collect();
            format!(
                "UPDATE {table} AS a SET {set} FROM batch b
                 WHERE ({a}) = ({b}) AND a.xmin = b.{AFTER_XID}::xid
                 RETURNING 1",
                table = t.qualified,
                set = set.join(", "),
                a = t.key_list("a"),
                b = t.key_list("b"),
            )
        };
        let bound = match first {
            true => String::new(),
            false => format!("WHERE ({}) > ({})", t.key_list("s"), t.key_param(2)),
        };
        let desc: Vec<String> = t
            .key
            .iter()
            .map(|c| format!("b.{} DESC", quote(&c.name)))
            .collect();
        format!(
            "WITH batch AS (
                 SELECT s.* FROM {snapshot} s {bound}
                 ORDER BY {s} LIMIT $3
             ), restored AS ({restore}
             ), last AS (
                 SELECT {key} AS key FROM batch b ORDER BY {desc} LIMIT 1
             )
             SELECT (SELECT count(*) FROM batch) AS seen,
                    (SELECT count(*) FROM restored) AS restored,
                    (SELECT key FROM last) AS last_key",
            snapshot = snapshot::snapshot_table(self.record.job_id),
            s = t.key_list("s"),
            key = key_array(t, "b"),
            desc = desc.join(", "),
        )
    }

    /// Runs one batch; `None` when the snapshot is exhausted. An Err that is transient means
    /// "reload the checkpoint and go again".
    async fn batch(&self, sql: &str, size: i64) -> sqlx::Result<Option<(i64, i64, Vec<String>)>> {
        let mut tx = self
            .target
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ")
            .await?;
        limit_time(&mut tx, 1_000, 30_000).await?;
        let row = sqlx::query(sql)
            .bind(self.record.job_id)
            .bind(&self.record.rollback_key)
            .bind(size)
            .fetch_one(&mut *tx)
            .await?;
        let seen: i64 = row.get("seen");
        let restored: i64 = row.get("restored");
        let key: Option<Vec<String>> = row.get("last_key");
        shared::tenancy::step_out(&mut tx).await?;
        let marked = sqlx::query(MARK_SQL)
            .bind(self.record.job_id)
            .bind(&self.record.rollback_key)
            .bind(&key)
            .bind(self.ctx.job_id())
            .bind(restored)
            .bind(snapshot::PIN.as_secs_f64())
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        if !marked {
            tx.rollback().await?;
            // Another attempt moved the checkpoint: reload it (as for a serialization failure).
            return Err(sqlx::Error::Io(std::io::Error::other("checkpoint moved")));
        }
        match key.filter(|_| seen > 0) {
            Some(key) => {
                tx.commit().await?;
                Ok(Some((seen, restored, key)))
            }
            None => {
                tx.rollback().await?;
                Ok(None)
            }
        }
    }
}

/// `ARRAY[q."a"::text, ...]`.
fn key_array(t: &Table, qualifier: &str) -> String {
    let parts: Vec<String> = t
        .key
        .iter()
        .map(|c| format!("{qualifier}.{}::text", quote(&c.name)))
        .collect();
    format!("ARRAY[{}]", parts.join(", "))
}
