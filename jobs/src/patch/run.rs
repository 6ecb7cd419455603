//! Running a patch: the dry run, and the batched execute with snapshots and checkpoints.

use serde_json::{json, Map, Value};
use shared::{connections::Target, usage::Meter, JobContext};
use sqlx::{PgPool, Row};
use std::time::{Duration, Instant};

use super::{
    assess, explain, guard::Checked, job_error, load_plan, snapshot, Assessment, AttemptFigures,
    DryRun, Executed, Mode, PatchOutput, PatchOutputs, PatchPayload, Plan, PlanError,
};
use crate::JobError;

/// Rows shown before/after by a dry run.
pub const SAMPLE_ROWS: i64 = 20;
/// Longest value a sample shows whole, in bytes of its JSON: a longer one is cut to as many
/// characters of its text, with the text's length in bytes and its md5 (so a change past the cut still shows). Twenty rows of values of
/// hundreds of megabytes were held, copied and diffed in the worker, and stored whole.
pub const SAMPLE_VALUE_BYTES: i64 = 256;
/// The first adaptive batch; later ones aim at `target_batch_ms`.
const FIRST_BATCH: i64 = 1_000;
const MIN_BATCH: i64 = 10;
const MAX_BATCH: i64 = 500_000;
/// Consecutive lock timeouts, serialization failures or conflicts before the attempt fails.
const MAX_BATCH_RETRIES: u32 = 10;
/// Tries of a batch whose rows the database skipped (a trigger, a rule, a policy, a WHERE
/// clause that answers differently each time), counted apart from the other retries.
const MAX_SKIPPED_RETRIES: u32 = 3;
/// How often an execute reports its batches and longest lock as a `log` event.
const FIGURES_INTERVAL: Duration = Duration::from_secs(1);

pub async fn run(
    ctx: &JobContext,
    payload: &PatchPayload,
    checked: Checked,
    target: &Target,
    retention: Duration,
) -> Result<PatchOutput, JobError> {
    let pool = &target.pool;
    let plan = load_plan(target, checked).await.map_err(|e| match e {
        PlanError::Refused(reason) => JobError::Permanent(reason),
        PlanError::Database(e) => job_error(e),
    })?;
    let explained = explain(pool, &plan.statement()).await.map_err(job_error)?;
    let assessment = assess(payload, &plan, &explained);
    match payload.mode {
        Mode::DryRun => dry_run(pool, payload, &plan, &assessment, explained.plan).await,
        Mode::Execute => {
            Execution {
                ctx,
                payload,
                plan: &plan,
                target,
            }
            .run(retention, &assessment)
            .await
        }
    }
}

/// Runs the statement in a transaction that is rolled back: the exact row count, the plan,
/// and the first rows (by key) before and after.
async fn dry_run(
    pool: &PgPool,
    payload: &PatchPayload,
    plan: &Plan,
    assessment: &Assessment,
    explain: Value,
) -> Result<PatchOutput, JobError> {
    let t = &plan.table;
    let q = &plan.qualifier;
    let filter = plan
        .checked
        .filter
        .as_ref()
        .map(|f| format!(" WHERE ({f})"))
        .unwrap_or_default();
    let started = Instant::now();
    let key = t.key_names();
    let mut tx = pool.begin().await.map_err(job_error)?;
    let before: Vec<Value> = sqlx::query_scalar(&format!(
        "SELECT {} FROM {}{filter} ORDER BY {} LIMIT {SAMPLE_ROWS}",
        sampled(q, "$1"),
        plan.target,
        t.key_list(q),
    ))
    .bind(&key)
    .fetch_all(&mut *tx)
    .await
    .map_err(job_error)?;
    // As an execute would refuse it, before it writes (and locks) every row in one go.
    if let Some(max) = payload.max_rows {
        let expected: i64 = sqlx::query_scalar(&plan.count())
            .fetch_one(&mut *tx)
            .await
            .map_err(job_error)?;
        if expected as u64 > max {
            return Err(JobError::Permanent(format!(
                "the statement matches {expected} rows, more than max_rows {max}"
            )));
        }
    }
    let rows = sqlx::query(&plan.statement())
        .execute(&mut *tx)
        .await
        .map_err(job_error)?
        .rows_affected();
    // Found again by their keys alone (the other values are cut), read as the key columns'
    // types: a record of the whole table would read the missing columns as nulls, which a
    // NOT NULL domain refuses.
    let keys: Vec<Value> = before.iter().map(|row| key_of(&key, row).into()).collect();
    let key_types: Vec<String> = t
        .key
        .iter()
        .map(|c| format!("{} {}", super::table::quote(&c.name), c.type_name))
        .collect();
    let after: Vec<Value> = sqlx::query_scalar(&format!(
        "SELECT {} FROM {table} a
         JOIN jsonb_to_recordset($1) AS k({types}) ON ({a}) = ({k})",
        sampled("a", "$2"),
        table = t.qualified,
        types = key_types.join(", "),
        a = t.key_list("a"),
        k = t.key_list("k"),
    ))
    .bind(Value::Array(keys))
    .bind(&key)
    .fetch_all(&mut *tx)
    .await
    .map_err(job_error)?;
    tx.rollback().await.map_err(job_error)?;
    Ok(PatchOutput::DryRun(DryRun {
        rows,
        estimated_rows: assessment.estimated_rows,
        explain,
        sample: diff(&key, &before, &after),
        preflight: assessment.clone(),
        elapsed_ms: started.elapsed().as_millis() as u64,
    }))
}

/// The row `alias` as a JSON object for a sample: the key columns (named in the `text[]`
/// parameter `keys`) whole, any other value past [`SAMPLE_VALUE_BYTES`] cut.
fn sampled(alias: &str, keys: &str) -> String {
    format!(
        "(SELECT jsonb_object_agg(e.key,
             CASE WHEN e.key = ANY({keys}::text[])
                       OR octet_length(e.value::text) <= {SAMPLE_VALUE_BYTES}
                  THEN e.value
                  ELSE to_jsonb(left(e.value #>> '{{}}', {SAMPLE_VALUE_BYTES}) || '… ('
                       || octet_length(e.value #>> '{{}}') || ' bytes, md5 '
                       || md5(e.value #>> '{{}}') || ')') END)
          FROM jsonb_each(to_jsonb({alias})) e)"
    )
}

/// A row's key columns.
fn key_of(key: &[String], row: &Value) -> Map<String, Value> {
    key.iter().map(|k| (k.clone(), row[k].clone())).collect()
}

/// Each sampled row's key and the columns that changed (`{column: {before, after}}`);
/// `deleted` when the row is gone afterwards.
pub fn diff(key: &[String], before: &[Value], after: &[Value]) -> Vec<Value> {
    let key_of = |row: &Value| key_of(key, row);
    before
        .iter()
        .map(|old| {
            let id = key_of(old);
            let new = after.iter().find(|row| key_of(row) == id);
            let changes: Map<String, Value> = match (old.as_object(), new) {
                (Some(columns), Some(new)) => columns
                    .iter()
                    .filter(|(name, value)| new.get(name.as_str()) != Some(value))
                    .map(|(name, value)| {
                        (
                            name.clone(),
                            json!({"before": value, "after": new[name.as_str()]}),
                        )
                    })
                    .collect(),
                _ => Map::new(),
            };
            json!({"key": id, "deleted": new.is_none(), "changes": changes})
        })
        .collect()
}

/// What an attempt of a batch did.
enum Batch {
    /// No row left to change.
    Done,
    Applied {
        rows: i64,
        last_key: Vec<String>,
        elapsed: Duration,
        /// From the change to the commit: how long the batch held its row locks.
        locked: Duration,
    },
    /// Committing it would pass `max_rows`: rolled back.
    OverLimit { rows: i64 },
    /// Another attempt moved the checkpoint: rolled back.
    Moved,
    /// The change left some of the rows found unchanged: rolled back.
    Skipped { found: i64, changed: i64 },
}

/// What this attempt of an execute did, for the result.
struct Attempt {
    rows: i64,
    elapsed: Duration,
    longest: Duration,
    longest_lock: Duration,
    last_size: i64,
}

struct Execution<'a> {
    ctx: &'a JobContext,
    payload: &'a PatchPayload,
    plan: &'a Plan,
    /// The tenant's statements run on `target.pool`, the registry's on `target.platform`.
    target: &'a Target,
}

impl Execution<'_> {
    async fn run(
        &self,
        retention: Duration,
        assessment: &Assessment,
    ) -> Result<PatchOutput, JobError> {
        let (ctx, pool, plan) = (self.ctx, &self.target.platform, self.plan);
        let job = ctx.job_id();
        snapshot::ensure_schema(pool).await.map_err(job_error)?;
        let mut record = self.record(retention).await?;
        let resumed_from = record.rows_done;
        if record.finished_at.is_none() {
            if resumed_from > 0 {
                ctx.log(format!(
                    "resuming after {} rows in {} batches",
                    record.rows_done, record.batches
                ))
                .await;
            }
            let scans = [
                snapshot::scan_sql(plan, true),
                snapshot::scan_sql(plan, false),
            ];
            let change = snapshot::change_sql(plan, &snapshot::snapshot_table(job));
            let target = Duration::from_millis(self.payload.target_batch_ms);
            let mut size = self
                .payload
                .batch_size
                .map(i64::from)
                .unwrap_or(FIRST_BATCH);
            let (mut longest, mut longest_lock) = (Duration::ZERO, Duration::ZERO);
            let started = Instant::now();
            let mut batches = record.batches;
            let mut last_figures: Option<Instant> = None;
            let (mut retries, mut skipped) = (0, 0);
            let mut last_key = record.last_key.clone();
            let mut done = record.rows_done;
            loop {
                // Cancel stops between batches: what is applied stays, checkpointed; a retry
                // resumes and `patch_rollback` restores it.
                ctx.checkpoint()?;
                let scan = &scans[usize::from(last_key.is_some())];
                let room = self.payload.max_rows.map(|m| m as i64 - done);
                match self.batch(scan, &change, &last_key, size, room).await {
                    Ok(Batch::Done) => break,
                    Ok(Batch::Applied {
                        rows,
                        last_key: key,
                        elapsed,
                        locked,
                    }) => {
                        retries = 0;
                        // Counted as committed: an attempt cancelled, failed or handed back
                        // has written these rows too.
                        Meter::add(&ctx.meter().rows_written, rows);
                        done += rows;
                        last_key = Some(key);
                        longest = longest.max(elapsed);
                        longest_lock = longest_lock.max(locked);
                        if self.payload.batch_size.is_none() {
                            size = next_batch_size(size, elapsed, target);
                        }
                        batches += 1;
                        let expected = record.rows_expected.max(done).max(1);
                        ctx.progress(
                            done as f32 / expected as f32,
                            format!("{done} of {expected} rows"),
                        )
                        .await;
                        // The figures a person watches (the dashboard's live panel), as a
                        // `log` event with data, at most once a second.
                        if last_figures.is_none_or(|at| at.elapsed() >= FIGURES_INTERVAL) {
                            last_figures = Some(Instant::now());
                            ctx.report(
                                format!(
                                    "{batches} batches, longest lock {:.1} ms",
                                    longest_lock.as_secs_f64() * 1000.0
                                ),
                                json!({
                                    "rows": done,
                                    "rows_expected": expected,
                                    "batches": batches,
                                    "longest_batch_ms": longest.as_secs_f64() * 1000.0,
                                    "longest_lock_ms": longest_lock.as_secs_f64() * 1000.0,
                                }),
                            )
                            .await;
                        }
                        self.pause().await;
                        continue;
                    }
                    Ok(Batch::OverLimit { rows }) => {
                        return Err(JobError::Permanent(format!(
                            "stopped: the next batch of {rows} rows would take the patch past \
                             max_rows {} ({done} rows changed so far, kept and restorable \
                             with patch_rollback)",
                            self.payload.max_rows.unwrap_or_default()
                        )))
                    }
                    Ok(Batch::Moved) if retries < MAX_BATCH_RETRIES => {}
                    Ok(Batch::Moved) => {
                        return Err(JobError::Retryable(
                            "another attempt kept moving the patch's checkpoint".into(),
                        ))
                    }
                    // Tried again from the checkpoint a few times; a database that keeps
                    // skipping rows would loop for ever.
                    Ok(Batch::Skipped { .. }) if skipped < MAX_SKIPPED_RETRIES => skipped += 1,
                    Ok(Batch::Skipped { found, changed }) => {
                        return Err(JobError::Permanent(format!(
                            "the database changed {changed} of the {found} rows the batch found: \
                             a trigger, rule or row security policy skips them, or the WHERE \
                             clause answers differently each time ({done} rows changed so far, \
                             kept and restorable with patch_rollback)"
                        )))
                    }
                    Err(e) if retries < MAX_BATCH_RETRIES && transient(&e) => {
                        if is_code(&e, "57014") {
                            size = (size / 2).max(MIN_BATCH); // the batch ran out of time
                        }
                    }
                    Err(e) => return Err(job_error(e)),
                }
                // Contention or another attempt: start again from the recorded checkpoint.
                retries += 1;
                tokio::time::sleep(Duration::from_millis(50 << retries.min(6))).await;
                record = snapshot::load(pool, job)
                    .await
                    .map_err(job_error)?
                    .ok_or_else(|| JobError::Permanent("the patch's record vanished".into()))?;
                if record.rollback_job_id.is_some() {
                    return Err(JobError::Permanent(
                        "a rollback of this patch began while it ran; it stopped there".into(),
                    ));
                }
                (done, last_key, batches) =
                    (record.rows_done, record.last_key.clone(), record.batches);
            }
            let rows = done - resumed_from;
            let elapsed = started.elapsed();
            // Every batch is in: lost from here on, the patch is applied and a retry answers
            // from its record.
            let _committing = ctx.committing().await?;
            record = snapshot::finish(pool, &record).await.map_err(job_error)?;
            ctx.report(
                "patch applied",
                json!({
                    "rows": rows,
                    "batches": record.batches,
                    "elapsed_ms": elapsed.as_millis() as u64,
                    "rows_per_sec": rows as f64 / elapsed.as_secs_f64().max(1e-9),
                    "longest_batch_ms": longest.as_secs_f64() * 1000.0,
                    "longest_lock_ms": longest_lock.as_secs_f64() * 1000.0,
                    "last_batch_size": size,
                }),
            )
            .await;
            return Ok(self.result(
                &record,
                assessment,
                resumed_from,
                Some(Attempt {
                    rows,
                    elapsed,
                    longest,
                    longest_lock,
                    last_size: size,
                }),
            ));
        }
        Ok(self.result(&record, assessment, resumed_from, None))
    }

    /// This job's record: the one an earlier attempt left, or a new one with its snapshot.
    async fn record(&self, retention: Duration) -> Result<snapshot::Record, JobError> {
        let job = self.ctx.job_id();
        if let Some(record) = snapshot::load(&self.target.platform, job)
            .await
            .map_err(job_error)?
        {
            if record.rollback_job_id.is_some() {
                return Err(JobError::Permanent(
                    "this patch has been rolled back; submit a new patch job".into(),
                ));
            }
            if record.finished_at.is_none() && record.expired() {
                return Err(JobError::Permanent(
                    "the snapshot of this unfinished patch expired; submit a new patch job".into(),
                ));
            }
            if record.table_name != self.plan.table.qualified
                || record.key_columns != self.plan.table.key_names()
            {
                return Err(JobError::Permanent(format!(
                    "the table changed since the first attempt (was {} keyed by {:?})",
                    record.table_name, record.key_columns
                )));
            }
            return Ok(record);
        }
        // Exact, once: the denominator of progress and the max_rows check before any change.
        let expected: i64 = sqlx::query_scalar(&self.plan.count())
            .fetch_one(&self.target.pool)
            .await
            .map_err(job_error)?;
        if let Some(max) = self.payload.max_rows {
            if expected as u64 > max {
                return Err(JobError::Permanent(format!(
                    "the statement matches {expected} rows, more than max_rows {max}; nothing \
                     was changed"
                )));
            }
        }
        snapshot::create(self.target, job, self.plan, expected, retention)
            .await
            .map_err(job_error)
    }

    /// One batch in its own short transaction, in two phases: find the rows (no lock taken),
    /// then change them, copy their before-images and move the checkpoint (row locks held until
    /// the commit, at most the lock budget: past it the change is cancelled and retried
    /// smaller). Repeatable read: the rows it copies are the rows it changes, or it fails and
    /// is retried.
    async fn batch(
        &self,
        scan: &str,
        change: &str,
        last_key: &Option<Vec<String>>,
        size: i64,
        room: Option<i64>,
    ) -> sqlx::Result<Batch> {
        let target = self.payload.target_batch_ms;
        let started = Instant::now();
        let mut tx = self
            .target
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ")
            .await?;
        limit_time(&mut tx, (2 * target).max(1_000), (20 * target).max(10_000)).await?;
        let row = sqlx::query(scan)
            .bind(last_key)
            .bind(size)
            .fetch_one(&mut *tx)
            .await?;
        let tids: Vec<String> = row.get("tids");
        let key: Option<Vec<String>> = row.get("last_key");
        let Some(key) = key.filter(|_| !tids.is_empty()) else {
            tx.rollback().await?;
            return Ok(Batch::Done);
        };
        let rows = tids.len() as i64;
        if room.is_some_and(|room| rows > room) {
            tx.rollback().await?;
            return Ok(Batch::OverLimit { rows });
        }
        sqlx::query("SELECT set_config('statement_timeout', $1, true)")
            .bind(format!("{}ms", lock_budget_ms(target)))
            .execute(&mut *tx)
            .await?;
        let locked = Instant::now();
        let changed: i64 = sqlx::query_scalar(change)
            .bind(&tids)
            .fetch_one(&mut *tx)
            .await?;
        // The checkpoint is the platform's: out of the tenant's role for it, same transaction.
        shared::tenancy::step_out(&mut tx).await?;
        let marked = sqlx::query(snapshot::MARK_SQL)
            .bind(self.ctx.job_id())
            .bind(changed)
            .bind(last_key)
            .bind(&key)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        if !marked {
            tx.rollback().await?;
            return Ok(Batch::Moved);
        }
        if changed != rows {
            tx.rollback().await?;
            return Ok(Batch::Skipped {
                found: rows,
                changed,
            });
        }
        tx.commit().await?;
        Ok(Batch::Applied {
            rows,
            last_key: key,
            elapsed: started.elapsed(),
            locked: locked.elapsed(),
        })
    }

    async fn pause(&self) {
        if self.payload.pause_ms > 0 {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(self.payload.pause_ms)) => {}
                _ = self.ctx.cancellation().cancelled() => {}
            }
        }
    }

    fn result(
        &self,
        record: &snapshot::Record,
        assessment: &Assessment,
        resumed_from: i64,
        this_attempt: Option<Attempt>,
    ) -> PatchOutput {
        let ms = |d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
        let attempt = this_attempt.map(|attempt| AttemptFigures {
            attempt_rows: attempt.rows,
            elapsed_ms: attempt.elapsed.as_millis() as u64,
            rows_per_sec: (attempt.rows as f64 / attempt.elapsed.as_secs_f64().max(1e-9)).round(),
            longest_batch_ms: ms(attempt.longest),
            longest_lock_ms: ms(attempt.longest_lock),
            last_batch_size: attempt.last_size,
        });
        PatchOutput::Execute(Executed {
            table: record.table_name.clone(),
            operation: record.operation.clone(),
            key: record.key_columns.clone(),
            rows: record.rows_done,
            rows_expected: record.rows_expected,
            batches: record.batches,
            resumed_from_rows: resumed_from,
            snapshots: vec![record.listing()],
            preflight: assessment.clone(),
            attempt,
            outputs: PatchOutputs {
                table: record.table_name.clone(),
                snapshot: record.snapshot_table.clone(),
            },
        })
    }
}

/// The next adaptive batch size: scaled so a batch takes about `target`, at most doubling or
/// halving at a time.
pub fn next_batch_size(size: i64, elapsed: Duration, target: Duration) -> i64 {
    let took = elapsed.as_secs_f64().max(1e-4);
    let ideal = size as f64 * target.as_secs_f64() / took;
    let bounded = ideal.clamp(size as f64 / 2.0, size as f64 * 2.0);
    (bounded as i64).clamp(MIN_BATCH, MAX_BATCH)
}

/// How long a batch may hold row locks: past it the change is cancelled and the batch retried
/// at half the size (450 ms at the default 200 ms target; the commit follows in milliseconds).
pub fn lock_budget_ms(target_batch_ms: u64) -> u64 {
    (target_batch_ms * 9 / 4).max(100)
}

/// Settings of a batch transaction: its time limits and its plan shape.
pub(crate) async fn limit_time(
    tx: &mut sqlx::PgTransaction<'_>,
    lock_ms: u64,
    statement_ms: u64,
) -> sqlx::Result<()> {
    // A batch touches a few thousand rows by key: index scans and nested loops, never a
    // sequential scan of the whole table per batch (what the planner picks without this).
    sqlx::query(
        "SELECT set_config('lock_timeout', $1, true), set_config('statement_timeout', $2, true),
                set_config('enable_seqscan', 'off', true),
                set_config('enable_hashjoin', 'off', true),
                set_config('enable_mergejoin', 'off', true)",
    )
    .bind(format!("{lock_ms}ms"))
    .bind(format!("{statement_ms}ms"))
    .execute(&mut **tx)
    .await
    .map(drop)
}

fn is_code(e: &sqlx::Error, code: &str) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some(code))
}

/// Worth retrying the batch: serialization failure, deadlock, lock or statement timeout, a
/// lost connection.
pub(crate) fn transient(e: &sqlx::Error) -> bool {
    ["40001", "40P01", "55P03", "57014"]
        .iter()
        .any(|code| is_code(e, code))
        || matches!(e, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_aim_at_the_target_time() {
        let target = Duration::from_millis(200);
        assert_eq!(
            next_batch_size(1000, Duration::from_millis(100), target),
            2000
        );
        assert_eq!(
            next_batch_size(1000, Duration::from_millis(10), target),
            2000
        );
        assert_eq!(
            next_batch_size(1000, Duration::from_millis(250), target),
            800
        );
        assert_eq!(next_batch_size(1000, Duration::from_secs(5), target), 500);
        assert_eq!(
            next_batch_size(12, Duration::from_secs(5), target),
            MIN_BATCH
        );
        assert_eq!(
            next_batch_size(MAX_BATCH, Duration::ZERO, target),
            MAX_BATCH
        );
    }

    #[test]
    fn diff_names_changed_columns() {
        let key = vec!["id".to_string()];
        let before = vec![
            json!({"id": 1, "a": 1, "b": "x"}),
            json!({"id": 2, "a": 2, "b": "y"}),
        ];
        let after = vec![json!({"id": 1, "a": 10, "b": "x"})];
        let d = diff(&key, &before, &after);
        assert_eq!(
            d[0],
            json!({"key": {"id": 1}, "deleted": false, "changes": {"a": {"before": 1, "after": 10}}})
        );
        assert_eq!(
            d[1],
            json!({"key": {"id": 2}, "deleted": true, "changes": {}})
        );
    }
}
