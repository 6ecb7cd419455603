//! SQL on the control plane: every state change of a job is one guarded UPDATE, so concurrent
//! writers (API, workers, the rescuer) never move a job backwards.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{types::Json, PgPool, Postgres, QueryBuilder};
use std::{borrow::Cow, sync::Arc};
use uuid::Uuid;

use crate::model::{Job, JobStatus, StatusColumn, MAX_ATTEMPTS_LIMIT};
use crate::pages::{self, Page};

/// A validated job about to be written.
#[derive(Clone, Debug)]
pub struct NewJob {
    pub id: Uuid,
    pub kind: String,
    pub payload: Value,
    pub idempotency_key: Option<String>,
    pub priority: i16,
    pub max_attempts: i32,
    pub run_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
pub struct Inserted {
    #[sqlx(flatten)]
    pub job: Job,
    /// False when an idempotency key matched an existing job.
    pub created: bool,
}

/// The request that submitted jobs, for their audit rows.
pub struct Submission<'a> {
    pub request_id: Option<&'a str>,
    pub payload_sha256: &'a str,
    /// A batch records each job's index in it.
    pub batch: bool,
}

/// Writes a batch of jobs submitted with `key` in one statement, with a `job.submit` audit row
/// for each job it creates (none without `audit`): a job is never written without its row. A
/// job whose idempotency key already exists is not written; the existing job is returned
/// instead. Results come in input order.
pub async fn insert_jobs(
    db: &mut sqlx::PgConnection,
    tenant: Uuid,
    key: Uuid,
    jobs: &[NewJob],
    audit: Option<&Submission<'_>>,
) -> sqlx::Result<Vec<Inserted>> {
    let now = Utc::now();
    let status: Vec<&str> = jobs
        .iter()
        .map(|j| match j.run_at {
            Some(at) if at > now => JobStatus::Scheduled.as_str(),
            _ => JobStatus::Queued.as_str(),
        })
        .collect();
    // Patches' audit rows carry their SQL statement, rollbacks' the statement of the patch
    // they undo (read from its stored payload).
    let mut rows: Vec<Inserted> = sqlx::query_as(&format!(
        "WITH input AS (
             SELECT * FROM unnest($2::uuid[], $3::text[], $4::jsonb[], $5::text[], $6::int2[],
                                  $7::int4[], $8::timestamptz[], $9::text[]) WITH ORDINALITY
                 AS t(id, kind, payload, idempotency_key, priority, max_attempts, run_at, status, n)
         ), ins AS (
             INSERT INTO jobs (id, tenant_id, kind, status, payload, idempotency_key, priority,
                               max_attempts, run_at, key_id)
             SELECT id, $1, kind, status, payload, idempotency_key, priority, max_attempts, run_at,
                    $10
             FROM input
             ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
             RETURNING *
         ), audited AS (
             INSERT INTO audit_log (tenant_id, key_id, action, target_id, request_id,
                                    payload_sha256, statement, detail)
             SELECT $1, $10, 'job.submit', ins.id::text, $12, $13,
                    {statement},
                    jsonb_strip_nulls(jsonb_build_object(
                        'kind', ins.kind, 'index', CASE WHEN $14 THEN input.n - 1 END,
                        'mode', CASE WHEN ins.kind = 'patch' THEN ins.payload->'mode' END))
             FROM ins JOIN input USING (id)
             WHERE $11
             ORDER BY input.n
         )
         SELECT {created}, true AS created FROM ins
         UNION ALL
         SELECT {found}, false AS created FROM jobs j JOIN input i
             ON j.tenant_id = $1 AND j.idempotency_key = i.idempotency_key",
        created = job_columns("ins", false),
        found = job_columns("j", jobs.len() > 1),
        statement = audited_statement("$1", "ins"),
    ))
    .bind(tenant)
    .bind(jobs.iter().map(|j| j.id).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.kind.clone()).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.payload.clone()).collect::<Vec<_>>())
    .bind(
        jobs.iter()
            .map(|j| j.idempotency_key.clone())
            .collect::<Vec<_>>(),
    )
    .bind(jobs.iter().map(|j| j.priority).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.max_attempts).collect::<Vec<_>>())
    .bind(
        jobs.iter()
            .map(|j| j.run_at.unwrap_or(now))
            .collect::<Vec<_>>(),
    )
    .bind(status)
    .bind(key)
    .bind(audit.is_some())
    .bind(audit.and_then(|a| a.request_id))
    .bind(audit.map(|a| a.payload_sha256))
    .bind(audit.is_some_and(|a| a.batch))
    .fetch_all(&mut *db)
    .await?;
    // A key another request wrote while this statement ran: the insert waited for it and
    // skipped, but the statement's snapshot, taken before, does not show its job. A new
    // statement sees it.
    let missing: Vec<&str> = jobs
        .iter()
        .filter_map(|j| j.idempotency_key.as_deref())
        .filter(|key| {
            !rows
                .iter()
                .any(|row| row.job.idempotency_key.as_deref() == Some(key))
        })
        .collect();
    if !missing.is_empty() {
        let found: Vec<Inserted> = sqlx::query_as(&format!(
            "SELECT {found}, false AS created FROM jobs j
             WHERE j.tenant_id = $1 AND j.idempotency_key = ANY($2)",
            found = job_columns("j", jobs.len() > 1),
        ))
        .bind(tenant)
        .bind(&missing)
        .fetch_all(&mut *db)
        .await?;
        rows.extend(found);
    }
    // Back to input order: by id for new rows, by idempotency key for existing ones.
    let position = |row: &Inserted| {
        jobs.iter()
            .position(|j| {
                if row.created {
                    j.id == row.job.id
                } else {
                    j.idempotency_key.is_some() && j.idempotency_key == row.job.idempotency_key
                }
            })
            .unwrap_or(usize::MAX)
    };
    if jobs.len() <= 1 {
        return Ok(rows);
    }
    let mut keyed: Vec<(usize, Inserted)> = rows.drain(..).map(|r| (position(&r), r)).collect();
    keyed.sort_by_key(|(p, _)| *p);
    Ok(keyed.into_iter().map(|(_, r)| r).collect())
}

/// The SQL statement a `job.submit` audit row carries for the job row `job` of tenant
/// `tenant` (SQL expressions): a patch's, or for a rollback the statement of the patch it
/// undoes (read from that patch's stored payload); null for other kinds.
pub fn audited_statement(tenant: &str, job: &str) -> String {
    format!(
        "CASE {job}.kind
             WHEN 'patch' THEN {job}.payload->>'sql'
             WHEN 'patch_rollback' THEN
                 (SELECT p.payload->>'sql' FROM jobs p
                  WHERE p.tenant_id = {tenant} AND p.kind = 'patch'
                    AND p.id::text = {job}.payload->>'patch_job_id')
         END"
    )
}

/// The columns of a [`Job`] from the rows of `from`; `lean`, without the payload and result
/// (`null`) and the attempts' errors (`[]`). A batch's answer is lean for the jobs its keys
/// found: a batch of a thousand keys of jobs of a megabyte each was an answer of a gigabyte,
/// for 80 KB sent.
fn job_columns(from: &str, lean: bool) -> String {
    let (payload, result, attempt_errors) = match lean {
        true => (
            "'null'::jsonb".into(),
            "NULL::jsonb".into(),
            "'[]'::jsonb".into(),
        ),
        false => (
            format!("{from}.payload"),
            format!("{from}.result"),
            format!("{from}.attempt_errors"),
        ),
    };
    format!(
        "{from}.id, {from}.tenant_id, {from}.kind, {from}.status, {payload} AS payload,
         {result} AS result, {from}.error, {attempt_errors} AS attempt_errors, {from}.idempotency_key,
         {from}.priority, {from}.attempt, {from}.max_attempts, {from}.progress, {from}.message,
         {from}.run_at, {from}.cancel_requested, {from}.worker, {from}.created_at,
         {from}.updated_at, {from}.started_at, {from}.finished_at, {from}.schedule_id,
         {from}.schedule_fire_at, {from}.pipeline_id, {from}.pipeline_step"
    )
}

pub async fn get_job(pool: &PgPool, tenant: Uuid, id: Uuid) -> sqlx::Result<Option<Job>> {
    sqlx::query_as("SELECT * FROM jobs WHERE id = $1 AND tenant_id = $2")
        .bind(id)
        .bind(tenant)
        .fetch_optional(pool)
        .await
}

/// A job's status and when its row last changed, without its payload or result: what an open
/// event stream checks while it waits.
pub async fn job_state(
    pool: &PgPool,
    tenant: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<(JobStatus, DateTime<Utc>)>> {
    let row: Option<(String, DateTime<Utc>)> =
        sqlx::query_as("SELECT status, updated_at FROM jobs WHERE id = $1 AND tenant_id = $2")
            .bind(id)
            .bind(tenant)
            .fetch_optional(pool)
            .await?;
    Ok(row.and_then(|(status, updated_at)| Some((JobStatus::parse(&status)?, updated_at))))
}

/// A page of a tenant's jobs, and the cursor of the next one (`None`: the list ends here).
#[derive(Debug)]
pub struct JobPage {
    pub jobs: Vec<Job>,
    pub next_cursor: Option<Uuid>,
}

/// A tenant's jobs, newest first, after the `cursor` job id: `limit` of them, fewer once their
/// rows pass `bytes`. Filtered by `status` or `kind`, a page also ends once `scan_rows` of the
/// tenant's jobs were read: no index has those columns (each would cost every queue
/// transition), and a rare status or kind read the tenant's whole history for one page. Such a
/// page may hold fewer jobs than `limit`, or none, with a cursor where the reading stopped.
#[allow(clippy::too_many_arguments)]
pub async fn list_jobs(
    pool: &PgPool,
    tenant: Uuid,
    status: Option<JobStatus>,
    kind: Option<&str>,
    cursor: Option<Uuid>,
    limit: i64,
    bytes: usize,
    scan_rows: i64,
) -> sqlx::Result<JobPage> {
    if status.is_none() && kind.is_none() {
        // Every row read is one of the page's.
        let mut q = QueryBuilder::<Postgres>::new("SELECT * FROM jobs WHERE tenant_id = ");
        q.push_bind(tenant);
        if let Some(cursor) = cursor {
            q.push(" AND id < ").push_bind(cursor);
        }
        q.push(" ORDER BY id DESC LIMIT ").push_bind(limit);
        let page: Page<Job> = pages::read(pool, q.build(), bytes).await?;
        return Ok(JobPage {
            next_cursor: page.next_cursor(limit, |j| j.id),
            jobs: page.items,
        });
    }
    let scan = pages::Scan {
        table: "jobs",
        columns: "t.*",
        scan_rows,
        limit,
    };
    let mut q = QueryBuilder::<Postgres>::new("");
    scan.push(
        &mut q,
        |q| {
            q.push("TRUE");
            if let Some(status) = status {
                q.push(" AND status = ").push_bind(status.as_str());
            }
            if let Some(kind) = kind {
                q.push(" AND kind = ").push_bind(kind.to_owned());
            }
        },
        |q| {
            q.push("tenant_id = ").push_bind(tenant);
            if let Some(cursor) = cursor {
                q.push(" AND id < ").push_bind(cursor);
            }
        },
    );
    let page = pages::read(pool, q.build(), bytes).await?;
    let (jobs, next_cursor) = scan.page::<Uuid, Job>(page);
    Ok(JobPage { jobs, next_cursor })
}

/// Gives each requested key its row, once: a duplicate request gets `None`.
fn match_rows<K: Eq + std::hash::Hash, T>(
    keys: impl Iterator<Item = K>,
    rows: Vec<T>,
    key: fn(&T) -> K,
) -> Vec<Option<T>> {
    let mut rows: std::collections::HashMap<K, T> =
        rows.into_iter().map(|row| (key(&row), row)).collect();
    keys.map(|key| rows.remove(&key)).collect()
}

/// Progress of a running attempt; ignored once the attempt is over.
pub async fn record_progress(
    pool: &PgPool,
    id: Uuid,
    attempt: i32,
    progress: f32,
    message: Option<&str>,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE jobs SET progress = $3, message = COALESCE($4, message), updated_at = now()
         WHERE id = $1 AND attempt = $2 AND status = 'running'",
    )
    .bind(id)
    .bind(attempt)
    .bind(progress)
    .bind(message)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records that attempt `attempt` of job `id` enters its commit (`JobContext::committing`):
/// its work may be published from here on, which [`rescue_orphans`] reads. `RowNotFound` when
/// the attempt no longer runs (rescued from a worker that stalled): it must publish nothing.
pub async fn mark_committing(pool: &PgPool, id: Uuid, attempt: i32) -> sqlx::Result<()> {
    let marked = sqlx::query(
        "UPDATE jobs SET committing_attempt = $2
         WHERE id = $1 AND attempt = $2 AND status = 'running'",
    )
    .bind(id)
    .bind(attempt)
    .execute(pool)
    .await?;
    match marked.rows_affected() {
        0 => Err(sqlx::Error::RowNotFound),
        _ => Ok(()),
    }
}

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Succeeded(Value),
    Cancelled,
    /// Failed, to be tried again at `retry_at`.
    Retrying {
        error: String,
        retry_at: DateTime<Utc>,
    },
    Failed(String),
}

/// The longest error an outcome keeps: a tenant's own database may answer a statement with an
/// error of hundreds of MB, which PostgreSQL then refused to store (a jsonb string is at most
/// 256 MB), so the job's finish was refused for ever.
pub const MAX_ERROR_BYTES: usize = 16 << 10;

impl Outcome {
    /// The outcome with its error within [`MAX_ERROR_BYTES`]: the start kept, the length told.
    pub fn bounded(self) -> Self {
        match self {
            Self::Retrying { error, retry_at } => Self::Retrying {
                error: bounded_error(error),
                retry_at,
            },
            Self::Failed(error) => Self::Failed(bounded_error(error)),
            other => other,
        }
    }

    pub fn status(&self) -> JobStatus {
        match self {
            Self::Succeeded(_) => JobStatus::Succeeded,
            Self::Cancelled => JobStatus::Cancelled,
            Self::Retrying { .. } => JobStatus::Retrying,
            Self::Failed(_) => JobStatus::Failed,
        }
    }
}

/// `error` within [`MAX_ERROR_BYTES`]: its start kept, its length told.
pub fn bounded_error(error: String) -> String {
    if error.len() <= MAX_ERROR_BYTES {
        return error;
    }
    let mut cut = MAX_ERROR_BYTES;
    while !error.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}... ({} bytes in all)", &error[..cut], error.len())
}

/// The end of one attempt, to be recorded.
#[derive(Clone, Debug)]
pub struct Finish {
    pub id: Uuid,
    pub attempt: i32,
    /// Shared, not copied, by the retries of its write and the event announcing it.
    pub outcome: Arc<Outcome>,
    /// What the attempt used, added to `usage_sums` with the outcome.
    pub usage: crate::usage::Usage,
}

/// A job's row after an attempt ended: what announcing the end and moving its pipeline on need
/// (the whole row stays in PostgreSQL: a drain no longer ships every payload and result back).
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Ended {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub kind: String,
    #[sqlx(try_from = "String")]
    pub status: crate::model::StatusColumn,
    pub progress: f32,
    pub attempt: i32,
    pub pipeline_id: Option<Uuid>,
}

impl Ended {
    pub fn status(&self) -> JobStatus {
        self.status.0
    }
}

impl From<Job> for Ended {
    fn from(job: Job) -> Self {
        Self {
            id: job.id,
            tenant_id: job.tenant_id,
            kind: job.kind,
            status: job.status,
            progress: job.progress,
            attempt: job.attempt,
            pipeline_id: job.pipeline_id,
        }
    }
}

/// Records the ends of attempts in one statement. Per item: the row after the change, or
/// `None` if the attempt no longer owns the job (the rescuer gave it to another worker).
/// PostgreSQL stores no NUL character (in `text`, nor as `\u0000` in `jsonb`): an outcome
/// holding one (a label read from a tenant's file, say) failed its whole finish batch, which
/// was retried for ever, the job `running` and its batch's neighbours with it. It is stored
/// as U+FFFD.
pub fn storable_text(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

/// `value` as JSON PostgreSQL stores (see [`storable_text`]): a tenant's file may put NUL
/// characters in a dataset's column names and preview, or a model's reports.
pub fn storable_json(value: &impl serde::Serialize) -> Json<Value> {
    let value = serde_json::to_value(value).unwrap_or_default();
    Json(storable_value(&value).into_owned())
}

pub fn storable_value(value: &Value) -> Cow<'_, Value> {
    fn has_nul(value: &Value) -> bool {
        match value {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => items.iter().any(has_nul),
            Value::Object(fields) => fields.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
            _ => false,
        }
    }
    fn replaced(value: &Value) -> Value {
        match value {
            Value::String(s) => Value::String(storable_text(s)),
            Value::Array(items) => Value::Array(items.iter().map(replaced).collect()),
            Value::Object(fields) => fields
                .iter()
                .map(|(k, v)| (storable_text(k), replaced(v)))
                .collect(),
            other => other.clone(),
        }
    }
    if has_nul(value) {
        Cow::Owned(replaced(value))
    } else {
        Cow::Borrowed(value)
    }
}

pub async fn finish_many(
    db: impl sqlx::PgExecutor<'_>,
    items: &[Finish],
) -> sqlx::Result<Vec<Option<Ended>>> {
    let n = items.len();
    // Written in id order, the order bulk changes lock jobs in (`change_matching`): in the
    // outcomes' order, a batch could hold one job a bulk cancel wants while waiting for another
    // the cancel holds.
    let mut ordered: Vec<&Finish> = items.iter().collect();
    ordered.sort_unstable_by_key(|item| item.id);
    let mut status = Vec::with_capacity(n);
    let mut result = Vec::with_capacity(n);
    let mut error = Vec::with_capacity(n);
    let mut retry_at = Vec::with_capacity(n);
    let mut terminal = Vec::with_capacity(n);
    for item in &ordered {
        let (r, e, at) = match &*item.outcome {
            Outcome::Succeeded(value) => (Some(Json(storable_value(value))), None, None),
            Outcome::Cancelled => (None, None, None),
            Outcome::Retrying { error, retry_at } => {
                (None, Some(storable_text(error)), Some(*retry_at))
            }
            Outcome::Failed(error) => (None, Some(storable_text(error)), None),
        };
        status.push(item.outcome.status().as_str());
        terminal.push(item.outcome.status().is_terminal());
        result.push(r);
        error.push(e);
        retry_at.push(at);
    }
    // Usage as one typed array per figure: no JSON to write here or to parse there.
    let seconds = |f: fn(&crate::usage::Usage) -> f64| -> Vec<f64> {
        ordered.iter().map(|i| f(&i.usage)).collect()
    };
    let count = |f: fn(&crate::usage::Usage) -> i64| -> Vec<i64> {
        ordered.iter().map(|i| f(&i.usage)).collect()
    };
    // Each job is found by its key: the plan is made once per session, and a literal
    // `status = 'running'` let it read every running job through their index whenever the
    // statistics said few were running (as after a backlog was submitted), per batch.
    // The attempts' usage goes in with their outcomes, only while each attempt owns its job,
    // summed per tenant, key and kind (one usage row per batch, not per job); so does a
    // terminal outcome's webhook outbox.
    let sql = format!(
        "WITH f AS (
             SELECT * FROM unnest($1::uuid[], $2::int4[], $3::text[], $4::jsonb[], $5::text[],
                                  $6::timestamptz[], $7::bool[], $8::float8[], $9::float8[],
                                  $10::int8[], $11::int8[], $12::int8[], $13::int8[],
                                  $14::int8[], $15::int8[])
                 AS f(id, attempt, status, result, error, retry_at, terminal, wall_seconds,
                      cpu_seconds, rows_read, rows_written, bytes_read, chunks_embedded,
                      tokens_embedded, synthetic_rows)
         ), done AS (
         UPDATE jobs SET
             -- A retry of a job whose cancel was asked for (before its worker heard of it)
             -- is its cancel: queued again, no claim would take it, nor anything end it.
             status = CASE WHEN jobs.cancel_requested AND f.status = 'retrying' THEN 'cancelled'
                           ELSE f.status END,
             result = f.result,
             error = f.error,
             -- The last {MAX_ATTEMPTS_LIMIT} attempts' errors: retries by hand start new
             -- attempts without end.
             attempt_errors = CASE WHEN f.error IS NULL THEN jobs.attempt_errors
                 ELSE (CASE WHEN jsonb_array_length(jobs.attempt_errors) >= {MAX_ATTEMPTS_LIMIT}
                            THEN jobs.attempt_errors - 0 ELSE jobs.attempt_errors END)
                      || jsonb_build_object('attempt', jobs.attempt, 'error', f.error, 'at', now()) END,
             progress = CASE WHEN f.status = 'succeeded' THEN 1 ELSE jobs.progress END,
             run_at = COALESCE(f.retry_at, jobs.run_at),
             worker = NULL,
             finished_at = CASE WHEN f.terminal OR jobs.cancel_requested THEN now() END,
             updated_at = now()
         FROM f
         WHERE jobs.id = f.id AND jobs.attempt = f.attempt
           AND jobs.status = (SELECT 'running'::text)
         -- What the usage, the outbox and the answer read: not the payload, which can be large.
         RETURNING jobs.id, jobs.tenant_id, jobs.key_id, jobs.kind, jobs.status, jobs.progress,
                   jobs.attempt, jobs.pipeline_id, jobs.finished_at, jobs.result, jobs.error
         ), used AS (
             INSERT INTO usage_sums (tenant_id, key_id, kind, attempts, wall_seconds,
                                     cpu_seconds, rows_read, rows_written, bytes_read,
                                     chunks_embedded, tokens_embedded, synthetic_rows)
             SELECT d.tenant_id, d.key_id, d.kind, count(*), sum(f.wall_seconds),
                    sum(f.cpu_seconds), sum(f.rows_read), sum(f.rows_written),
                    sum(f.bytes_read), sum(f.chunks_embedded), sum(f.tokens_embedded),
                    sum(f.synthetic_rows)
             -- By attempt too: a batch may hold a rescued attempt's outcome beside the next's.
             FROM done d JOIN f ON f.id = d.id AND f.attempt = d.attempt
             GROUP BY d.tenant_id, d.key_id, d.kind
         ), {}
         SELECT id, tenant_id, kind, status, progress, attempt, pipeline_id FROM done",
        crate::webhooks::outbox_cte("done"),
    );
    let rows: Vec<Ended> = sqlx::query_as(&sql)
        .bind(ordered.iter().map(|i| i.id).collect::<Vec<_>>())
        .bind(ordered.iter().map(|i| i.attempt).collect::<Vec<_>>())
        .bind(status)
        .bind(result)
        .bind(error)
        .bind(retry_at)
        .bind(terminal)
        .bind(seconds(|u| u.wall_seconds))
        .bind(seconds(|u| u.cpu_seconds))
        .bind(count(|u| u.rows_read))
        .bind(count(|u| u.rows_written))
        .bind(count(|u| u.bytes_read))
        .bind(count(|u| u.chunks_embedded))
        .bind(count(|u| u.tokens_embedded))
        .bind(count(|u| u.synthetic_rows))
        .fetch_all(db)
        .await?;
    Ok(match_rows(
        items.iter().map(|i| (i.id, i.attempt)),
        rows,
        |e| (e.id, e.attempt),
    ))
}

/// Hand-backs that use no attempt: past them, each uses one, so that a job longer than the gap
/// between a deployment's rolling restarts ends (it was handed back at every one).
pub const FREE_HAND_BACKS: i32 = 20;

/// The error of a job whose last attempt was handed back past [`FREE_HAND_BACKS`].
pub const HAND_BACKS_USED_UP: &str = "handed back by stopping workers more than 20 times (the \
    first 20 use no attempt), its last attempt too: the job runs longer than the workers stay up";

/// Hands a running attempt back to the queue (the worker is shutting down): the attempt does
/// not use up the budget, for the first [`FREE_HAND_BACKS`]; cancelled instead if a cancel was
/// asked for (no worker would see it once queued), failed if it was the last attempt past
/// them. Returns the job, whose `attempt` is the generation to push.
/// What the attempt used is added to the usage table, as a finished attempt's is (the CPU it
/// spent, the rows an interrupted import or patch already wrote).
pub async fn requeue(
    pool: &PgPool,
    id: Uuid,
    attempt: i32,
    worker: &str,
    usage: &crate::usage::Usage,
) -> sqlx::Result<Option<Job>> {
    sqlx::query_as(&format!(
        "WITH r AS (
         UPDATE jobs SET status = CASE WHEN cancel_requested THEN 'cancelled'
                                       WHEN {used_up} THEN 'failed' ELSE 'queued' END,
             error = CASE WHEN NOT cancel_requested AND {used_up} THEN $12 ELSE error END,
             finished_at = CASE WHEN cancel_requested OR {used_up} THEN now() END,
             attempt_budget = coalesce(attempt_budget, max_attempts),
             max_attempts = max_attempts + CASE WHEN hand_backs < {FREE_HAND_BACKS}
                 OR committing_attempt = attempt THEN 1 ELSE 0 END,
             hand_backs = hand_backs + 1,
             worker = NULL, progress = 0, updated_at = now()
         WHERE id = $1 AND attempt = $2 AND status = 'running' AND worker = $3
         RETURNING *
         ), used AS (
             INSERT INTO usage_sums (tenant_id, key_id, kind, attempts, wall_seconds,
                                     cpu_seconds, rows_read, rows_written, bytes_read,
                                     chunks_embedded, tokens_embedded, synthetic_rows)
             SELECT tenant_id, key_id, kind, 1, $4, $5, $6, $7, $8, $9, $10, $11 FROM r
         ), {}
         SELECT * FROM r",
        crate::webhooks::outbox_cte("r"),
        // An attempt handed back after entering its commit may have published: queued once
        // more for the kind's ledger to answer, as the rescuer does.
        used_up = format!(
            "(hand_backs >= {FREE_HAND_BACKS} AND attempt >= max_attempts
              AND committing_attempt IS DISTINCT FROM attempt)"
        ),
    ))
    .bind(id)
    .bind(attempt)
    .bind(worker)
    .bind(usage.wall_seconds)
    .bind(usage.cpu_seconds)
    .bind(usage.rows_read)
    .bind(usage.rows_written)
    .bind(usage.bytes_read)
    .bind(usage.chunks_embedded)
    .bind(usage.tokens_embedded)
    .bind(usage.synthetic_rows)
    .bind(HAND_BACKS_USED_UP)
    .fetch_optional(pool)
    .await
}

/// Cancel: a job not yet running ends at once; a running one is asked to stop.
/// Returns the job after the change, or `None` if it does not exist.
pub async fn request_cancel(
    pool: impl sqlx::PgExecutor<'_>,
    tenant: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<Job>> {
    // A job cancelled here (not running) is terminal: its webhook outbox goes in with it.
    let sql = format!(
        "WITH c AS (
         UPDATE jobs SET
             status = CASE WHEN status IN ('scheduled', 'queued', 'retrying') THEN 'cancelled' ELSE status END,
             cancel_requested = (status = 'running'),
             finished_at = CASE WHEN status IN ('scheduled', 'queued', 'retrying') THEN now() ELSE finished_at END,
             updated_at = now()
         WHERE id = $1 AND tenant_id = $2 AND status IN ('scheduled', 'queued', 'retrying', 'running')
         RETURNING *
         ), {}
         SELECT * FROM c",
        crate::webhooks::outbox_cte("c"),
    );
    sqlx::query_as(&sql)
        .bind(id)
        .bind(tenant)
        .fetch_optional(pool)
        .await
}

/// A retry: queued again with its budget of attempts afresh (as submitted: a hand-back raises
/// `max_attempts`, see `attempt_budget`), and a clean slate of worker deaths.
const RETRY: &str = "status = 'queued',
    max_attempts = attempt + coalesce(attempt_budget, max_attempts),
    attempt_budget = coalesce(attempt_budget, max_attempts), worker_deaths = 0, hand_backs = 0,
    cancel_requested = false, result = NULL, error = NULL, progress = 0, message = NULL,
    finished_at = NULL, run_at = now()";

/// Which jobs a retry takes: failed or cancelled ones, but no patch a rollback job waits to
/// restore or is restoring (the patch would run on beside it, changing rows it restores).
const RETRYABLE: &str = concat!(
    "status IN ('failed', 'cancelled') AND NOT (jobs.kind = 'patch' AND EXISTS (
         SELECT 1 FROM jobs r
         WHERE r.tenant_id = jobs.tenant_id AND r.kind = 'patch_rollback' AND ",
    crate::live_jobs!("r"),
    " AND r.payload->>'patch_job_id' = jobs.id::text))"
);

/// Puts a failed or cancelled job back in the queue with a fresh attempt budget.
pub async fn retry(
    pool: impl sqlx::PgExecutor<'_>,
    tenant: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<Job>> {
    sqlx::query_as(&format!(
        "UPDATE jobs SET {RETRY}, updated_at = now()
         WHERE id = $1 AND tenant_id = $2 AND {RETRYABLE}
         RETURNING *"
    ))
    .bind(id)
    .bind(tenant)
    .fetch_optional(pool)
    .await
}

/// Deletes one finished job of the tenant; `None` if it does not exist or is not finished.
pub async fn delete_job(
    db: impl sqlx::PgExecutor<'_>,
    tenant: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<Job>> {
    sqlx::query_as(
        "DELETE FROM jobs WHERE id = $1 AND tenant_id = $2
           AND status IN ('succeeded', 'failed', 'cancelled')
         RETURNING *",
    )
    .bind(id)
    .bind(tenant)
    .fetch_optional(db)
    .await
}

/// Which of a tenant's jobs a bulk action takes: by status and kind, oldest first.
#[derive(Clone, Debug, Default)]
pub struct JobFilter {
    pub statuses: Vec<JobStatus>,
    pub kind: Option<String>,
    /// Only the steps of this pipeline.
    pub pipeline_id: Option<Uuid>,
}

/// What a bulk action does to each job it takes.
#[derive(Clone, Copy, Debug)]
pub enum BulkChange {
    /// [`request_cancel`], for live jobs.
    Cancel,
    /// [`retry`], for failed or cancelled jobs.
    Retry,
}

/// A job a bulk change took, with what its events and announcements need: not the whole row,
/// since up to 10,000 jobs' payloads (a megabyte each) would be gigabytes held at once.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Changed {
    pub id: Uuid,
    pub kind: String,
    #[sqlx(try_from = "String")]
    pub status: StatusColumn,
    pub progress: f32,
    pub attempt: i32,
    pub pipeline_id: Option<Uuid>,
}

impl Changed {
    pub fn status(&self) -> JobStatus {
        self.status.0
    }
}

impl BulkChange {
    /// What the change sets, and which jobs it applies to beside the filter's.
    fn sql(self) -> (&'static str, &'static str) {
        match self {
            BulkChange::Cancel => (
                "status = CASE WHEN status IN ('scheduled', 'queued', 'retrying') THEN 'cancelled' ELSE status END,
                 cancel_requested = (status = 'running'),
                 finished_at = CASE WHEN status IN ('scheduled', 'queued', 'retrying') THEN now() ELSE finished_at END",
                concat!(crate::live_jobs!("jobs"), " AND NOT cancel_requested"),
            ),
            BulkChange::Retry => (RETRY, RETRYABLE),
        }
    }
}

/// The tenant's jobs `filter` matches, by its parameters `$1`-`$3` and `$5`.
const MATCHING: &str = "tenant_id = $1 AND status = ANY($2) AND ($3::text IS NULL OR kind = $3)
                        AND ($5::uuid IS NULL OR pipeline_id = $5)";

/// The tenant's jobs `change` would take now (up to `limit`, oldest first), by kind: their
/// ids and the pipelines they are steps of. What a bulk retry charges to the rate and the
/// quotas, then takes ([`change_matching`] with these ids).
pub async fn count_matching(
    db: impl sqlx::PgExecutor<'_>,
    tenant: Uuid,
    filter: &JobFilter,
    change: BulkChange,
    limit: i64,
) -> sqlx::Result<Vec<Matching>> {
    let (_, applies) = change.sql();
    let statuses: Vec<&str> = filter.statuses.iter().map(|s| s.as_str()).collect();
    sqlx::query_as(&format!(
        "SELECT kind, array_agg(id) AS ids,
                array_remove(array_agg(DISTINCT pipeline_id), NULL) AS pipelines FROM (
             SELECT id, kind, pipeline_id FROM jobs WHERE {MATCHING} AND {applies}
             ORDER BY id LIMIT $4
         ) matching
         GROUP BY kind ORDER BY kind"
    ))
    .bind(tenant)
    .bind(statuses)
    .bind(&filter.kind)
    .bind(limit)
    .bind(filter.pipeline_id)
    .fetch_all(db)
    .await
}

/// A kind's jobs a bulk change would take.
#[derive(Debug, sqlx::FromRow)]
pub struct Matching {
    pub kind: String,
    pub ids: Vec<Uuid>,
    /// The pipelines they are steps of.
    pub pipelines: Vec<Uuid>,
}

/// Applies `change` to up to `limit` of the tenant's jobs matching `filter` (and the
/// statuses the change applies to), oldest first, and only to those of `only` if given (what
/// was counted for them). Rows are locked in id order, so two bulk actions never deadlock.
pub async fn change_matching(
    db: impl sqlx::PgExecutor<'_>,
    tenant: Uuid,
    filter: &JobFilter,
    change: BulkChange,
    limit: i64,
    only: Option<&[Uuid]>,
) -> sqlx::Result<Vec<Changed>> {
    let (set, applies) = change.sql();
    let statuses: Vec<&str> = filter.statuses.iter().map(|s| s.as_str()).collect();
    // A job cancelled here (not running) is terminal: its webhook outbox goes in with it.
    sqlx::query_as(&format!(
        "WITH c AS (
         UPDATE jobs SET {set}, updated_at = now()
         WHERE id IN (
             SELECT id FROM jobs WHERE {MATCHING} AND {applies}
               AND ($6::uuid[] IS NULL OR id = ANY ($6))
             ORDER BY id LIMIT $4 FOR UPDATE)
         RETURNING id, tenant_id, kind, status, progress, attempt, pipeline_id, finished_at,
                   result, error
         ), {outbox}
         SELECT id, kind, status, progress, attempt, pipeline_id FROM c",
        outbox = crate::webhooks::outbox_cte("c"),
    ))
    .bind(tenant)
    .bind(statuses)
    .bind(&filter.kind)
    .bind(limit)
    .bind(filter.pipeline_id)
    .bind(only)
    .fetch_all(db)
    .await
}

/// Ids of this worker's running jobs that were asked to stop.
pub async fn cancel_requests(pool: &PgPool, worker: &str) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar(
        "SELECT id FROM jobs WHERE worker = $1 AND status = 'running' AND cancel_requested",
    )
    .bind(worker)
    .fetch_all(pool)
    .await
}

/// A job the maintenance loop moved, and what it must now push or announce.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Moved {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub kind: String,
    pub attempt: i32,
    pub status: String,
    pub error: Option<String>,
}

/// Scheduled and retrying jobs whose time has come become queued, about `limit` of them: each
/// tenant with due jobs its share, oldest first (in `run_at` order alone, one tenant's million
/// jobs due at once went before every other tenant's due job). The tenants are walked one
/// index probe each (`jobs_waiting_by_tenant`), only when some job is due. Returns the jobs
/// moved and whether more may be due (a tenant took its whole share).
pub async fn promote_due(pool: &PgPool, limit: i64) -> sqlx::Result<(Vec<Moved>, bool)> {
    #[derive(sqlx::FromRow)]
    struct Promoted {
        #[sqlx(flatten)]
        moved: Moved,
        filled: bool,
    }
    const WAITING: &str = "status IN ('scheduled', 'retrying')";
    let promoted: Vec<Promoted> = sqlx::query_as(&format!(
        "WITH RECURSIVE waiting (tenant_id, run_at) AS (
             (SELECT tenant_id, run_at FROM jobs
              WHERE {WAITING} AND EXISTS (SELECT 1 FROM jobs WHERE {WAITING} AND run_at <= now())
              ORDER BY tenant_id, run_at LIMIT 1)
             UNION ALL
             SELECT next.tenant_id, next.run_at FROM waiting w, LATERAL (
                 SELECT j.tenant_id, j.run_at FROM jobs j
                 WHERE j.{WAITING} AND j.tenant_id > w.tenant_id
                 ORDER BY j.tenant_id, j.run_at LIMIT 1) next
         ), due AS (
             -- At most a batch of tenants, the longest due first: each takes one job at least.
             SELECT tenant_id FROM waiting WHERE run_at <= now() ORDER BY run_at LIMIT $1
         ), share AS (
             SELECT ceil($1::float8 / greatest(count(*), 1))::int8 AS n FROM due
         ), picked AS (
             SELECT p.id FROM due, share, LATERAL (
                 SELECT j.id FROM jobs j
                 WHERE j.tenant_id = due.tenant_id AND j.{WAITING} AND j.run_at <= now()
                 ORDER BY j.run_at LIMIT share.n FOR UPDATE SKIP LOCKED) p
         ), promoted AS (
             UPDATE jobs SET status = 'queued', updated_at = now()
             FROM picked WHERE jobs.id = picked.id
             RETURNING jobs.id, jobs.tenant_id, jobs.kind, jobs.attempt, jobs.status, jobs.error
         )
         SELECT promoted.*, count(*) OVER (PARTITION BY promoted.tenant_id) >= share.n AS filled
         FROM promoted, share"
    ))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let more = promoted.iter().any(|p| p.filled);
    Ok((promoted.into_iter().map(|p| p.moved).collect(), more))
}

/// Running jobs whose worker stopped heart-beating, at most `limit` of them: re-queued; failed
/// when out of attempts, or when this was the `max_deaths`-th worker to die running it (a
/// poison job). A last attempt lost inside its commit (`committing_attempt`) is re-queued once
/// more, that attempt not counted, for the kind's ledger to answer. A worker's silence counts
/// from its last heartbeat, or from `since` if later: when PostgreSQL came back from an
/// outage, which no worker could heartbeat through.
pub async fn rescue_orphans(
    pool: &PgPool,
    horizon: std::time::Duration,
    since: Option<DateTime<Utc>>,
    max_deaths: i32,
    limit: i64,
) -> sqlx::Result<Vec<Moved>> {
    // In SET, `worker_deaths` is the count before this death (every expression reads the old
    // row). A job failed or cancelled here is terminal: its webhook outbox goes in with it. A
    // last attempt that entered its commit may have published its work: it is queued once
    // more, that attempt not counted (as a hand-back), so the kind's ledger answers rather than
    // the job failing with its data in place. The next attempt has another number: lost
    // before a commit of its own, it fails; a poison job fails first.
    const LAST: &str = "(attempt >= max_attempts AND committing_attempt IS DISTINCT FROM attempt)";
    const ONCE_MORE: &str = "(NOT cancel_requested AND worker_deaths + 1 < $2
         AND attempt >= max_attempts AND committing_attempt = attempt)";
    let sql = format!(
        "WITH r AS (
         UPDATE jobs SET
             worker_deaths = worker_deaths + 1,
             status = CASE WHEN cancel_requested THEN 'cancelled'
                           WHEN worker_deaths + 1 >= $2 OR {LAST} THEN 'failed'
                           ELSE 'queued' END,
             error = CASE WHEN cancel_requested THEN error
                          WHEN worker_deaths + 1 >= $2
                          THEN 'worker died ' || (worker_deaths + 1) || ' times while running it'
                          WHEN {LAST}
                          THEN 'worker ' || coalesce('worker-' || left(encode(sha256(convert_to(worker, 'UTF8')), 'hex'), 12), '?')
                               || ' was lost during the last attempt'
                          ELSE error END,
             finished_at = CASE WHEN cancel_requested OR worker_deaths + 1 >= $2
                                     OR {LAST} THEN now() END,
             attempt_budget = CASE WHEN {ONCE_MORE} THEN coalesce(attempt_budget, max_attempts)
                                   ELSE attempt_budget END,
             max_attempts = CASE WHEN {ONCE_MORE} THEN max_attempts + 1 ELSE max_attempts END,
             worker = NULL,
             updated_at = now()
         WHERE id IN (
             SELECT id FROM jobs
             WHERE status = 'running' AND NOT EXISTS (
                 SELECT 1 FROM workers w WHERE w.name = jobs.worker AND w.stopped_at IS NULL
                     AND greatest(w.heartbeat_at, $4) > now() - make_interval(secs => $1))
             LIMIT $3 FOR UPDATE SKIP LOCKED)
         RETURNING *
         ), {outbox}
         SELECT id, tenant_id, kind, attempt, status, error FROM r",
        outbox = crate::webhooks::outbox_cte("r"),
    );
    sqlx::query_as(&sql)
        .bind(horizon.as_secs_f64())
        .bind(max_deaths)
        .bind(limit)
        .bind(since)
        .fetch_all(pool)
        .await
}

pub async fn heartbeat(pool: &PgPool, worker: &str, queues: &Value) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO workers (name, queues) VALUES ($1, $2)
         ON CONFLICT (name) DO UPDATE SET heartbeat_at = now(), queues = $2, stopped_at = NULL",
    )
    .bind(worker)
    .bind(queues)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn worker_stopped(pool: &PgPool, worker: &str) -> sqlx::Result<()> {
    sqlx::query("UPDATE workers SET stopped_at = now() WHERE name = $1")
        .bind(worker)
        .execute(pool)
        .await?;
    Ok(())
}

/// Deletes up to `limit` rows of workers silent for longer than `retention` that hold no
/// running job (the rescuer takes those first); returns how many went.
pub async fn prune_workers(
    pool: &PgPool,
    retention: std::time::Duration,
    limit: i64,
) -> sqlx::Result<u64> {
    let deleted = sqlx::query(
        "DELETE FROM workers WHERE name IN (
             SELECT w.name FROM workers w
             WHERE w.heartbeat_at < now() - make_interval(secs => $1)
               AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.status = 'running' AND j.worker = w.name)
             ORDER BY w.heartbeat_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
    )
    .bind(retention.as_secs_f64())
    .bind(limit)
    .execute(pool)
    .await?;
    Ok(deleted.rows_affected())
}

/// A finished job past its retention: [`finished_past_retention`] finds it,
/// [`lock_past_retention`] takes it and [`delete_jobs`] deletes it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Deleted {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub finished_at: DateTime<Utc>,
}

/// Whether a record of a tenant that ended at `$ended` is past the tenant's retention
/// (`l.job_retention_days`, 0 for ever), else the deployment's (`$1`, seconds; NULL for ever).
/// The query joins `tenant_limits l` on the record's tenant.
#[macro_export]
macro_rules! past_retention {
    ($ended:literal) => {
        concat!(
            "CASE WHEN l.job_retention_days IS NOT NULL
                  THEN l.job_retention_days > 0
                       AND ",
            $ended,
            " < now() - make_interval(days => l.job_retention_days)
                  ELSE $1::float8 IS NOT NULL
                       AND ",
            $ended,
            " < now() - make_interval(secs => $1::float8) END"
        )
    };
}

/// Which finished jobs a retention run may delete (`$1` the deployment's retention in seconds,
/// `$2` a patch's snapshot retention): past their tenant's retention, a patch no rollback still
/// needs, no pipeline of theirs left. Queries join `tenant_limits l` on `j`'s tenant.
const PAST_RETENTION: &str = concat!(
    "j.finished_at IS NOT NULL
     AND j.status IN ('succeeded', 'failed', 'cancelled')
     AND ",
    past_retention!("j.finished_at"),
    "
     AND (j.kind <> 'patch' OR (j.finished_at < now() - make_interval(secs => $2)
          AND NOT EXISTS (SELECT 1 FROM jobs r
                          WHERE r.tenant_id = j.tenant_id AND r.kind = 'patch_rollback'
                            AND r.payload->>'patch_job_id' = j.id::text AND ",
    crate::live_jobs!("r"),
    ")))
     AND NOT EXISTS (SELECT 1 FROM pipelines p WHERE p.id = j.pipeline_id)"
);

/// Where a retention run starts: before any job's end.
pub const RETENTION_START: (DateTime<Utc>, Uuid) = (DateTime::UNIX_EPOCH, Uuid::nil());

/// Up to `limit` finished jobs past their retention, oldest first from after `after` (the
/// last one a run saw, else [`RETENTION_START`]: each row a run keeps is read once in it),
/// unlocked: see [`lock_past_retention`].
pub async fn finished_past_retention(
    executor: impl sqlx::PgExecutor<'_>,
    retention: Option<std::time::Duration>,
    snapshot_retention: std::time::Duration,
    limit: i64,
    (after_at, after_id): (DateTime<Utc>, Uuid),
) -> sqlx::Result<Vec<Deleted>> {
    sqlx::query_as(&format!(
        "SELECT j.id, j.tenant_id, j.finished_at
         FROM jobs j LEFT JOIN tenant_limits l ON l.tenant_id = j.tenant_id
         WHERE {PAST_RETENTION}
           AND j.finished_at >= $4 AND (j.finished_at > $4 OR j.id > $5)
         ORDER BY j.finished_at, j.id LIMIT $3"
    ))
    .bind(retention.map(|r| r.as_secs_f64()))
    .bind(snapshot_retention.as_secs_f64())
    .bind(limit)
    .bind(after_at)
    .bind(after_id)
    .fetch_all(executor)
    .await
}

/// Those of `ids` still past their retention, locked for the transaction (those another holds
/// are skipped): a job retried since it was found is not deleted.
pub async fn lock_past_retention(
    executor: impl sqlx::PgExecutor<'_>,
    retention: Option<std::time::Duration>,
    snapshot_retention: std::time::Duration,
    ids: &[Uuid],
) -> sqlx::Result<Vec<Deleted>> {
    sqlx::query_as(&format!(
        "SELECT j.id, j.tenant_id, j.finished_at
         FROM jobs j LEFT JOIN tenant_limits l ON l.tenant_id = j.tenant_id
         WHERE j.id = ANY($3) AND {PAST_RETENTION}
         ORDER BY j.id FOR UPDATE OF j SKIP LOCKED"
    ))
    .bind(retention.map(|r| r.as_secs_f64()))
    .bind(snapshot_retention.as_secs_f64())
    .bind(ids)
    .fetch_all(executor)
    .await
}

/// Deletes the jobs `ids` (locked by [`lock_past_retention`] in the same transaction).
pub async fn delete_jobs(executor: impl sqlx::PgExecutor<'_>, ids: &[Uuid]) -> sqlx::Result<u64> {
    let deleted = sqlx::query("DELETE FROM jobs WHERE id = ANY($1)")
        .bind(ids)
        .execute(executor)
        .await?;
    Ok(deleted.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claims::{claim_jobs, confirm_claims};
    use crate::testing::TestDatabase;

    fn new_job(kind: &str, idempotency_key: Option<&str>) -> NewJob {
        NewJob {
            id: Uuid::now_v7(),
            kind: kind.into(),
            payload: serde_json::json!({}),
            idempotency_key: idempotency_key.map(str::to_owned),
            priority: 0,
            max_attempts: 3,
            run_at: None,
        }
    }

    /// A new tenant with one queued canary.
    async fn a_canary(db: &TestDatabase) -> (Uuid, Job) {
        let tenant = db.tenant().await;
        let job = submit(db, tenant, &[new_job("canary", None)])
            .await
            .remove(0);
        (tenant, job.job)
    }

    async fn submit(db: &TestDatabase, tenant: Uuid, jobs: &[NewJob]) -> Vec<Inserted> {
        let mut conn = db.pool.acquire().await.unwrap();
        insert_jobs(&mut conn, tenant, Uuid::now_v7(), jobs, None)
            .await
            .unwrap()
    }

    fn finish(job: &crate::claims::Claimed, outcome: Outcome) -> Finish {
        Finish {
            id: job.id,
            attempt: job.attempt,
            outcome: outcome.into(),
            usage: Default::default(),
        }
    }

    /// On the queue's pool a claim is planned once per session; on the default pool
    /// PostgreSQL made a custom plan at every execution.
    #[tokio::test]
    async fn the_queue_pool_plans_a_claim_once() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        let pool = crate::db::connect_queue(&db.url, 1).await.unwrap();
        for size in 1..=8 {
            let jobs: Vec<NewJob> = (0..size).map(|_| new_job("canary", None)).collect();
            submit(&db, tenant, &jobs).await;
            let claimed = claim_jobs(&pool, "canary", "w1", size, None, false)
                .await
                .unwrap();
            assert_eq!(claimed.len(), size);
        }
        let (generic, custom): (i64, i64) = sqlx::query_as(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements
             WHERE statement LIKE '%FROM claim_jobs(%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!((generic, custom), (8, 0));
    }

    /// A key written by another request while this one's statement ran (two senders of one
    /// request, or a client retrying after a timeout): its job is answered, in its place. The
    /// statement's snapshot did not show it: a single submit answered 500, a batch left the
    /// job out and shifted the rest.
    #[tokio::test]
    async fn a_key_written_concurrently_answers_its_job_in_place() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        let mut first = db.pool.begin().await.unwrap();
        let theirs = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO jobs (id, tenant_id, kind, status, payload, idempotency_key)
             VALUES ($1, $2, 'canary', 'queued', '{}', 'k')",
        )
        .bind(theirs)
        .bind(tenant)
        .execute(&mut *first)
        .await
        .unwrap();
        let batch = [
            new_job("canary", None),
            new_job("canary", Some("k")),
            new_job("canary", None),
        ];
        let single = [new_job("canary", Some("k"))];
        let (mut one, mut other) = (
            db.pool.acquire().await.unwrap(),
            db.pool.acquire().await.unwrap(),
        );
        let (batch_answer, single_answer, ()) = tokio::join!(
            insert_jobs(&mut one, tenant, Uuid::now_v7(), &batch, None),
            insert_jobs(&mut other, tenant, Uuid::now_v7(), &single, None),
            async {
                // Both statements wait on the key's row lock before this commits.
                let waiting = "SELECT count(*) FROM pg_stat_activity
                               WHERE datname = current_database() AND wait_event_type = 'Lock'";
                while sqlx::query_scalar::<_, i64>(waiting)
                    .fetch_one(&db.pool)
                    .await
                    .unwrap()
                    < 2
                {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                first.commit().await.unwrap();
            },
        );
        let batch_answer = batch_answer.unwrap();
        assert_eq!(batch_answer.len(), 3);
        assert_eq!(
            batch_answer.iter().map(|r| r.created).collect::<Vec<_>>(),
            [true, false, true]
        );
        assert_eq!(batch_answer[1].job.id, theirs);
        assert_eq!(batch_answer[0].job.id, batch[0].id);
        assert_eq!(batch_answer[2].job.id, batch[2].id);
        let single_answer = single_answer.unwrap();
        assert_eq!(single_answer.len(), 1);
        assert_eq!(single_answer[0].job.id, theirs);
    }

    #[tokio::test]
    async fn a_repeated_idempotency_key_returns_the_first_job_in_input_order() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        let first = submit(&db, tenant, &[new_job("canary", Some("k1"))]).await;
        assert!(first[0].created);

        let batch = [
            new_job("import", None),
            new_job("canary", Some("k1")),
            new_job("patch", Some("k2")),
        ];
        let inserted = submit(&db, tenant, &batch).await;
        let kinds: Vec<(&str, bool)> = inserted
            .iter()
            .map(|i| (i.job.kind.as_str(), i.created))
            .collect();
        assert_eq!(
            kinds,
            [("import", true), ("canary", false), ("patch", true)]
        );
        assert_eq!(inserted[1].job.id, first[0].job.id);

        // Keys are per tenant: another tenant's `k1` is a job of its own.
        let other = db.tenant().await;
        let theirs = submit(&db, other, &[new_job("canary", Some("k1"))]).await;
        assert!(theirs[0].created);
    }

    #[tokio::test]
    async fn a_tenant_reads_and_lists_only_its_own_jobs_page_by_page() {
        let db = TestDatabase::new().await;
        let (tenant, other) = (db.tenant().await, db.tenant().await);
        let jobs: Vec<NewJob> = (0..5)
            .map(|i| new_job(if i % 2 == 0 { "canary" } else { "import" }, None))
            .collect();
        submit(&db, tenant, &jobs).await;
        let foreign = submit(&db, other, &[new_job("canary", None)]).await;

        assert!(get_job(&db.pool, tenant, foreign[0].job.id)
            .await
            .unwrap()
            .is_none());
        let (budget, scan) = (1 << 20, pages::SCAN_ROWS);
        let first = list_jobs(&db.pool, tenant, None, None, None, 3, budget, scan)
            .await
            .unwrap()
            .jobs;
        let rest = list_jobs(
            &db.pool,
            tenant,
            None,
            None,
            Some(first[2].id),
            3,
            budget,
            scan,
        )
        .await
        .unwrap()
        .jobs;
        let ids: Vec<Uuid> = first.iter().chain(&rest).map(|j| j.id).collect();
        let newest_first: Vec<Uuid> = jobs.iter().rev().map(|j| j.id).collect();
        assert_eq!(ids, newest_first);
        let canaries = list_jobs(
            &db.pool,
            tenant,
            Some(JobStatus::Queued),
            Some("canary"),
            None,
            50,
            budget,
            scan,
        )
        .await
        .unwrap();
        assert_eq!((canaries.jobs.len(), canaries.next_cursor), (3, None));
        // A budget smaller than a row still returns one, with a cursor after it; filtered too.
        let one = list_jobs(&db.pool, tenant, None, None, None, 50, 1, scan)
            .await
            .unwrap();
        assert_eq!(one.jobs.len(), 1);
        assert_eq!(one.next_cursor, Some(newest_first[0]));
        let canary = Some("canary");
        let queued = Some(JobStatus::Queued);
        let one = list_jobs(&db.pool, tenant, queued, canary, None, 50, 1, scan)
            .await
            .unwrap();
        assert_eq!(
            (one.jobs.len(), one.next_cursor),
            (1, Some(newest_first[0]))
        );
    }

    /// `?status=failed` among 30,000 succeeded jobs read all of them for its first page: no
    /// index has `status` or `kind`. A filtered page reads `scan_rows` of them at most, and
    /// following its cursors still finds the match.
    #[tokio::test]
    async fn a_filtered_page_reads_at_most_its_scan_budget() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        // uuidv7() is monotonic within a session: the failed job is the oldest.
        let insert = "INSERT INTO jobs (id, tenant_id, kind, status, payload)
             SELECT uuidv7(), $1, 'canary',
                    CASE WHEN i = 1 THEN 'failed' ELSE 'succeeded' END, '{}'
             FROM generate_series(1, 30001) AS i";
        let one = db.seeded(tenant, insert).await;
        let rows_read = || db.rows_read(&one, "jobs");
        let failed = Some(JobStatus::Failed);
        let list = |cursor| list_jobs(&one, tenant, failed, None, cursor, 50, 1 << 20, 10_000);
        let before = rows_read().await;
        let first = list(None).await.unwrap();
        let read = rows_read().await - before;
        assert!(
            read <= 10_050,
            "{read} rows of jobs read for one filtered page"
        );
        assert!(
            first.jobs.is_empty() && first.next_cursor.is_some(),
            "{first:?}"
        );
        let mut lengths = vec![first.jobs.len()];
        let mut cursor = first.next_cursor;
        while let Some(c) = cursor {
            let page = list(Some(c)).await.unwrap();
            lengths.push(page.jobs.len());
            cursor = page.next_cursor;
        }
        assert_eq!(lengths, [0, 0, 0, 1]);
    }

    /// A page the byte budget ends early still had PostgreSQL read and send every row up to
    /// its limit, drained by the connection before its next use: 64 payloads of a megabyte for
    /// a page of two. Counted as the blocks of the jobs' TOAST table read, against a page that
    /// reads them all.
    #[tokio::test]
    async fn a_page_cut_by_its_bytes_stops_the_reading() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        // A megabyte of hex each, which does not compress: stored out of line.
        let insert = "INSERT INTO jobs (id, tenant_id, kind, status, payload)
             SELECT uuidv7(), $1, 'canary', 'succeeded', jsonb_build_object('text',
                    (SELECT string_agg(md5(random()::text || i || j), '')
                     FROM generate_series(1, 32768) AS j))
             FROM generate_series(1, 64) AS i";
        let one = db.seeded(tenant, insert).await;
        let toast_read = || async {
            // The counts of a closed session reach the view as it exits: wait for them to settle.
            let mut last = -1;
            loop {
                sqlx::query("SELECT pg_stat_force_next_flush()")
                    .execute(&one)
                    .await
                    .unwrap();
                let mut reader = db.pool.acquire().await.unwrap();
                sqlx::query("SELECT pg_stat_clear_snapshot()")
                    .execute(&mut *reader)
                    .await
                    .unwrap();
                let now: i64 = sqlx::query_scalar(
                    "SELECT (toast_blks_read + toast_blks_hit)::bigint
                     FROM pg_statio_user_tables WHERE relname = 'jobs'",
                )
                .fetch_one(&mut *reader)
                .await
                .unwrap();
                if now == last {
                    return now;
                }
                last = now;
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
        };
        let mut read = Vec::new();
        for bytes in [usize::MAX, 3 << 20] {
            let before = toast_read().await;
            let page = list_jobs(&one, tenant, None, None, None, 64, bytes, 1)
                .await
                .unwrap();
            read.push((page.jobs.len(), toast_read().await - before));
        }
        let [(all, all_read), (cut, cut_read)] = read[..] else {
            unreachable!()
        };
        assert_eq!((all, cut), (64, 2));
        assert!(
            cut_read * 3 < all_read,
            "a page of {cut} read {cut_read} TOAST blocks, all {all} read {all_read}"
        );
    }

    /// A bulk retry among 30,000 succeeded jobs read all of them, also to find nothing: no
    /// index had failed or cancelled jobs. It reads those alone.
    #[tokio::test]
    async fn a_bulk_retry_reads_only_the_failed_and_cancelled_jobs() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        let insert = "INSERT INTO jobs (id, tenant_id, kind, status, payload)
             SELECT uuidv7(), $1, 'canary',
                    CASE WHEN i = 1 THEN 'failed' ELSE 'succeeded' END, '{}'
             FROM generate_series(1, 30001) AS i";
        let one = db.seeded(tenant, insert).await;
        for (kind, found) in [("patch", 0), ("canary", 1)] {
            let filter = JobFilter {
                statuses: vec![JobStatus::Failed, JobStatus::Cancelled],
                kind: Some(kind.into()),
                pipeline_id: None,
            };
            let before = db.rows_read(&one, "jobs").await;
            let matching = count_matching(&one, tenant, &filter, BulkChange::Retry, 1000)
                .await
                .unwrap();
            let read = db.rows_read(&one, "jobs").await - before;
            let ids: usize = matching.iter().map(|m| m.ids.len()).sum();
            assert_eq!(ids, found, "{kind}");
            assert!(read < 10, "a retry of {kind} jobs read {read} rows");
        }
    }

    /// A bulk change returns what its events need, not the jobs' rows: up to 10,000 payloads
    /// of a megabyte each were read into the API's memory at once. Counted as the blocks of
    /// the jobs' TOAST table (where large payloads live) the change's transaction read.
    #[tokio::test]
    async fn a_bulk_change_reads_no_payloads() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        let mut seed = 7u64;
        let jobs: Vec<NewJob> = (0..20)
            .map(|_| {
                // Text that does not compress, so that each payload is stored out of line.
                let text: Vec<String> = (0..1000)
                    .map(|_| {
                        seed = seed
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        format!("{:x}", seed >> 40)
                    })
                    .collect();
                NewJob {
                    payload: serde_json::json!({ "text": text.join(" ") }),
                    ..new_job("canary", None)
                }
            })
            .collect();
        submit(&db, tenant, &jobs).await;
        let mut tx = db.pool.begin().await.unwrap();
        let filter = JobFilter {
            statuses: vec![JobStatus::Queued],
            ..Default::default()
        };
        let cancelled = change_matching(&mut *tx, tenant, &filter, BulkChange::Cancel, 100, None)
            .await
            .unwrap();
        assert_eq!(cancelled.len(), 20);
        assert!(cancelled.iter().all(|c| c.status() == JobStatus::Cancelled));
        let read: i64 = sqlx::query_scalar(
            "SELECT pg_stat_get_xact_blocks_fetched(reltoastrelid) FROM pg_class
             WHERE relname = 'jobs'",
        )
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        assert_eq!(read, 0, "the bulk change read {read} blocks of payloads");
    }

    /// A retry grants the job's budget of attempts afresh: `attempt + max_attempts` doubled it
    /// at each retry (3 more, then 6, then 12), a hand-back's free attempt included; and the
    /// count of workers it killed starts again.
    #[tokio::test]
    async fn each_retry_grants_the_submitted_budget_of_attempts() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        let id = submit(&db, tenant, &[new_job("canary", None)]).await[0]
            .job
            .id;
        // Claimed and handed back (that attempt is free: 4 allowed now), then failed at its
        // last attempt, having killed two workers.
        claim_jobs(&db.pool, "canary", "w1", 1, None, false)
            .await
            .unwrap();
        requeue(&db.pool, id, 1, "w1", &Default::default())
            .await
            .unwrap()
            .unwrap();
        let fail = |attempt: i32| {
            sqlx::query(
                "UPDATE jobs SET status = 'failed', attempt = $2, worker_deaths = 2 WHERE id = $1",
            )
            .bind(id)
            .bind(attempt)
            .execute(&db.pool)
        };
        let budget = || async {
            let job = get_job(&db.pool, tenant, id).await.unwrap().unwrap();
            let deaths: i32 = sqlx::query_scalar("SELECT worker_deaths FROM jobs WHERE id = $1")
                .bind(id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
            (job.max_attempts - job.attempt, deaths)
        };
        fail(4).await.unwrap();
        retry(&db.pool, tenant, id).await.unwrap().unwrap();
        assert_eq!(budget().await, (3, 0));
        fail(7).await.unwrap();
        let filter = JobFilter {
            statuses: vec![JobStatus::Failed],
            ..Default::default()
        };
        change_matching(&db.pool, tenant, &filter, BulkChange::Retry, 10, None)
            .await
            .unwrap();
        assert_eq!(budget().await, (3, 0));
    }

    /// A bulk retry changes the jobs it counted (and charged to the rate and the quotas), not
    /// the oldest matching when it changes them: a job that failed in between was retried in
    /// the place of one counted.
    #[tokio::test]
    async fn a_bulk_retry_changes_only_the_jobs_it_counted() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        let jobs = [new_job("canary", None), new_job("canary", None)];
        let ids: Vec<Uuid> = submit(&db, tenant, &jobs)
            .await
            .iter()
            .map(|i| i.job.id)
            .collect();
        let (older, newer) = (ids[0], ids[1]);
        let fail = |id: Uuid| {
            sqlx::query("UPDATE jobs SET status = 'failed', finished_at = now() WHERE id = $1")
                .bind(id)
                .execute(&db.pool)
        };
        fail(newer).await.unwrap();
        let filter = JobFilter {
            statuses: vec![JobStatus::Failed],
            ..Default::default()
        };
        let counted = count_matching(&db.pool, tenant, &filter, BulkChange::Retry, 10)
            .await
            .unwrap();
        let counted: Vec<Uuid> = counted.into_iter().flat_map(|m| m.ids).collect();
        assert_eq!(counted, [newer]);
        // The older one fails before the change.
        fail(older).await.unwrap();
        let retry = BulkChange::Retry;
        let changed = change_matching(&db.pool, tenant, &filter, retry, 1, Some(&counted))
            .await
            .unwrap();
        let changed: Vec<Uuid> = changed.iter().map(|c| c.id).collect();
        assert_eq!(changed, [newer]);
    }

    /// An outcome holding a NUL character failed its whole finish batch (PostgreSQL stores
    /// none), retried for ever: the job and its batch's neighbours stayed `running`.
    #[tokio::test]
    async fn outcomes_holding_nul_characters_are_stored_with_their_batch() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        let jobs = [new_job("canary", None), new_job("canary", None)];
        submit(&db, tenant, &jobs).await;
        let claimed = claim_jobs(&db.pool, "canary", "w1", 4, None, false)
            .await
            .unwrap();
        let (a, b) = (&claimed[0], &claimed[1]);
        let result = serde_json::json!({"top": ["a\u{0}b"], "k\u{0}": 1});
        let finishes = [
            finish(a, Outcome::Succeeded(result)),
            finish(b, Outcome::Failed("bad \u{0} label".into())),
        ];
        let ended = finish_many(&db.pool, &finishes).await.unwrap();
        assert!(ended.iter().all(Option::is_some));
        let a = get_job(&db.pool, tenant, a.id).await.unwrap().unwrap();
        assert_eq!(a.status(), JobStatus::Succeeded);
        assert_eq!(a.result.unwrap()["top"][0], "a\u{FFFD}b");
        let b = get_job(&db.pool, tenant, b.id).await.unwrap().unwrap();
        assert_eq!(b.error.as_deref(), Some("bad \u{FFFD} label"));
    }

    #[tokio::test]
    async fn a_job_is_claimed_once_per_generation_and_finished_only_by_its_attempt() {
        let db = TestDatabase::new().await;
        let (tenant, job) = a_canary(&db).await;

        // Claimed once, however many ask, full or resumed.
        let claimed = claim_jobs(&db.pool, "canary", "w1", 4, None, false)
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1);
        let running = claimed[0].clone();
        assert_eq!((running.id, running.attempt), (job.id, 1));
        let row = get_job(&db.pool, tenant, job.id).await.unwrap().unwrap();
        assert_eq!(
            (row.status(), row.attempt, row.worker.as_deref()),
            (JobStatus::Running, 1, Some("w1"))
        );
        for resume in [false, true] {
            let again = claim_jobs(&db.pool, "canary", "w2", 4, None, resume).await;
            assert!(again.unwrap().is_empty());
        }
        // Confirmed only to its worker, with a cancel asked for meanwhile; handed back only by it.
        let mut conn = db.pool.acquire().await.unwrap();
        assert_eq!(
            confirm_claims(&mut conn, "w1", &[job.id]).await.unwrap(),
            [(job.id, false)]
        );
        request_cancel(&db.pool, tenant, job.id).await.unwrap();
        assert_eq!(
            confirm_claims(&mut conn, "w1", &[job.id]).await.unwrap(),
            [(job.id, true)]
        );
        assert!(confirm_claims(&mut conn, "w2", &[job.id])
            .await
            .unwrap()
            .is_empty());
        assert!(
            requeue(&db.pool, job.id, running.attempt, "w2", &Default::default())
                .await
                .unwrap()
                .is_none()
        );
        sqlx::query("UPDATE jobs SET cancel_requested = false WHERE id = $1")
            .bind(job.id)
            .execute(&db.pool)
            .await
            .unwrap();

        // An attempt that no longer owns the job records nothing.
        let mut old = finish(&running, Outcome::Failed("late".into()));
        old.attempt = 0;
        assert!(finish_many(&db.pool, &[old]).await.unwrap()[0].is_none());
        let result = serde_json::json!({"ok": true});
        let done = finish_many(
            &db.pool,
            &[finish(&running, Outcome::Succeeded(result.clone()))],
        )
        .await
        .unwrap()
        .remove(0)
        .unwrap();
        assert_eq!((done.status(), done.progress), (JobStatus::Succeeded, 1.0));
        let row = get_job(&db.pool, tenant, running.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.result, Some(result));
        assert!(row.finished_at.is_some());
        let attempts_used = || {
            sqlx::query_scalar::<_, i64>(
                "SELECT coalesce(sum(attempts), 0)::bigint FROM usage_sums WHERE tenant_id = $1",
            )
            .bind(tenant)
            .fetch_one(&db.pool)
        };
        assert_eq!(attempts_used().await.unwrap(), 1);
        // Finished: a second finish of the same attempt changes nothing, usage included.
        let again = finish(&running, Outcome::Failed("twice".into()));
        assert!(finish_many(&db.pool, &[again]).await.unwrap()[0].is_none());
        assert_eq!(attempts_used().await.unwrap(), 1);
    }

    /// One batch holding a rescued attempt's outcome beside its next attempt's (the worker it
    /// was rescued from claimed it again): only the attempt that owns the job is recorded, and
    /// only its usage. Joined by id alone, both attempts' usage was added, and the row went to
    /// the stale attempt's outcome, leaving the live one unanswered.
    #[tokio::test]
    async fn a_batch_with_two_attempts_of_a_job_records_the_owning_one() {
        let db = TestDatabase::new().await;
        let (tenant, job) = a_canary(&db).await;
        sqlx::query("UPDATE jobs SET status = 'running', attempt = 2 WHERE id = $1")
            .bind(job.id)
            .execute(&db.pool)
            .await
            .unwrap();
        let attempt = |attempt: i32, wall_seconds: f64| Finish {
            id: job.id,
            attempt,
            outcome: Outcome::Succeeded(serde_json::json!({"attempt": attempt})).into(),
            usage: crate::usage::Usage {
                wall_seconds,
                ..Default::default()
            },
        };
        let ended = finish_many(&db.pool, &[attempt(1, 10.0), attempt(2, 1.0)])
            .await
            .unwrap();
        assert!(ended[0].is_none(), "the stale attempt was answered");
        assert_eq!(ended[1].as_ref().map(|e| e.attempt), Some(2));
        let (attempts, wall): (i64, f64) = sqlx::query_as(
            "SELECT sum(attempts)::bigint, sum(wall_seconds) FROM usage_sums WHERE tenant_id = $1",
        )
        .bind(tenant)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!((attempts, wall), (1, 1.0));
    }

    /// An attempt handed back by a worker shutting down adds what it used to the usage table,
    /// as a finished one does: its CPU and the rows it wrote went uncounted.
    #[tokio::test]
    async fn a_hand_back_adds_its_usage() {
        let db = TestDatabase::new().await;
        let (tenant, job) = a_canary(&db).await;
        sqlx::query("UPDATE jobs SET status = 'running', attempt = 1, worker = 'w1' WHERE id = $1")
            .bind(job.id)
            .execute(&db.pool)
            .await
            .unwrap();
        let used = crate::usage::Usage {
            wall_seconds: 2.5,
            rows_written: 7,
            ..Default::default()
        };
        let back = requeue(&db.pool, job.id, 1, "w1", &used).await.unwrap();
        assert_eq!(back.unwrap().status(), JobStatus::Queued);
        let (attempts, wall, rows): (i64, f64, i64) = sqlx::query_as(
            "SELECT sum(attempts)::bigint, sum(wall_seconds), sum(rows_written)::bigint
             FROM usage_sums WHERE tenant_id = $1",
        )
        .bind(tenant)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!((attempts, wall, rows), (1, 2.5, 7));
    }

    /// A job handed back at every rolling restart ends: the first [`FREE_HAND_BACKS`]
    /// hand-backs use no attempt, each later one uses one, and the last attempt's fails the
    /// job. Before, every hand-back was free, and a job longer than the gap between restarts
    /// was queued again for ever. A retry by hand starts the count again.
    #[tokio::test]
    async fn a_job_handed_back_at_every_restart_ends() {
        assert!(HAND_BACKS_USED_UP.contains(&format!("more than {FREE_HAND_BACKS} times")));
        let db = TestDatabase::new().await;
        let (tenant, job) = a_canary(&db).await;
        // Claimed again (a new attempt, `set` besides), then handed back by the stopping worker.
        let claim_and_hand_back = async |set: &str| {
            sqlx::query(&format!(
                "UPDATE jobs SET status = 'running', attempt = attempt + 1, worker = 'w1'{set}
                 WHERE id = $1"
            ))
            .bind(job.id)
            .execute(&db.pool)
            .await
            .unwrap();
            let attempt = get_job(&db.pool, tenant, job.id)
                .await
                .unwrap()
                .unwrap()
                .attempt;
            requeue(&db.pool, job.id, attempt, "w1", &Default::default())
                .await
                .unwrap()
                .unwrap()
        };
        let mut hand_backs = 0;
        let last = loop {
            let back = claim_and_hand_back("").await;
            hand_backs += 1;
            if back.status() != JobStatus::Queued || hand_backs > 1000 {
                break back;
            }
        };
        assert_eq!(last.status(), JobStatus::Failed);
        assert_eq!(last.error.as_deref(), Some(HAND_BACKS_USED_UP));
        assert!(last.finished_at.is_some());
        assert_eq!(hand_backs, FREE_HAND_BACKS + job.max_attempts);
        retry(&db.pool, tenant, job.id).await.unwrap().unwrap();
        let count: i32 = sqlx::query_scalar("SELECT hand_backs FROM jobs WHERE id = $1")
            .bind(job.id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(count, 0);
        // Past the free hand-backs, a last attempt that entered its commit is queued once
        // more, for its ledger to answer (its work may be published).
        let back = claim_and_hand_back(
            ", hand_backs = 30, max_attempts = attempt + 1, committing_attempt = attempt + 1",
        )
        .await;
        assert_eq!(back.status(), JobStatus::Queued);
    }

    /// A cancel asked for while the job runs, before its worker hears of it, then a retry or a
    /// hand-back of that attempt: the job is cancelled, not queued again where no claim would
    /// take it and nothing would end it; the tenant's next job is still claimed.
    #[tokio::test]
    async fn a_retry_or_hand_back_after_a_cancel_request_cancels_the_job() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        let jobs = [
            new_job("canary", None),
            new_job("canary", None),
            new_job("canary", None),
        ];
        submit(&db, tenant, &jobs).await;
        let claimed = claim_jobs(&db.pool, "canary", "w1", 2, None, false)
            .await
            .unwrap();
        assert_eq!(claimed.len(), 2);
        for job in &claimed {
            request_cancel(&db.pool, tenant, job.id).await.unwrap();
        }
        let retry = Outcome::Retrying {
            error: "flaky".into(),
            retry_at: Utc::now(),
        };
        let retried = finish_many(&db.pool, &[finish(&claimed[0], retry)])
            .await
            .unwrap()
            .remove(0)
            .unwrap();
        assert_eq!(retried.status(), JobStatus::Cancelled);
        let handed_back = requeue(
            &db.pool,
            claimed[1].id,
            claimed[1].attempt,
            "w1",
            &Default::default(),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(handed_back.status(), JobStatus::Cancelled);
        for job in &claimed {
            let row = get_job(&db.pool, tenant, job.id).await.unwrap().unwrap();
            assert_eq!(row.status(), JobStatus::Cancelled, "{row:?}");
            assert!(row.finished_at.is_some());
        }
        assert!(promote_due(&db.pool, 10).await.unwrap().0.is_empty());
        let next = claim_jobs(&db.pool, "canary", "w1", 1, None, false)
            .await
            .unwrap();
        assert_eq!(next.len(), 1, "the tenant's third job");
    }

    #[tokio::test]
    async fn cancel_retry_and_delete_move_only_the_jobs_they_apply_to() {
        let db = TestDatabase::new().await;
        let (tenant, other) = (db.tenant().await, db.tenant().await);
        let jobs = submit(
            &db,
            tenant,
            &[new_job("canary", None), new_job("canary", None)],
        )
        .await;
        // The older goes first.
        let running = claim_jobs(&db.pool, "canary", "w1", 1, None, false)
            .await
            .unwrap()
            .remove(0);
        let waiting = jobs[1].job.clone();
        assert_eq!(running.id, jobs[0].job.id);

        // Another tenant can touch neither.
        assert!(request_cancel(&db.pool, other, waiting.id)
            .await
            .unwrap()
            .is_none());
        assert!(retry(&db.pool, other, waiting.id).await.unwrap().is_none());

        // A running job is asked to stop; it is not ended under its worker.
        let asked = request_cancel(&db.pool, tenant, running.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(asked.status(), JobStatus::Running);
        assert!(asked.cancel_requested);
        assert_eq!(cancel_requests(&db.pool, "w1").await.unwrap(), [running.id]);
        // Only a finished job can be deleted.
        assert!(delete_job(&db.pool, tenant, running.id)
            .await
            .unwrap()
            .is_none());

        // A waiting job ends at once, and can then be retried with a fresh budget.
        let cancelled = request_cancel(&db.pool, tenant, waiting.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(cancelled.status(), JobStatus::Cancelled);
        assert!(retry(&db.pool, tenant, running.id).await.unwrap().is_none());
        let retried = retry(&db.pool, tenant, waiting.id).await.unwrap().unwrap();
        assert_eq!(retried.status(), JobStatus::Queued);
        assert_eq!(retried.max_attempts, waiting.max_attempts + retried.attempt);
        assert!(retried.finished_at.is_none());

        assert!(delete_job(&db.pool, other, waiting.id)
            .await
            .unwrap()
            .is_none());
        request_cancel(&db.pool, tenant, waiting.id).await.unwrap();
        assert!(delete_job(&db.pool, tenant, waiting.id)
            .await
            .unwrap()
            .is_some());
        assert!(get_job(&db.pool, tenant, waiting.id)
            .await
            .unwrap()
            .is_none());
    }

    /// A finish reads its batch's jobs by key, not every running job, though its plan is made
    /// while the statistics say none is running (a backlog just submitted) and hundreds run.
    #[tokio::test]
    async fn a_finish_reads_only_its_own_jobs_among_hundreds_running() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        let jobs: Vec<NewJob> = (0..300).map(|_| new_job("canary", None)).collect();
        submit(&db, tenant, &jobs).await;
        sqlx::query("ANALYZE jobs").execute(&db.pool).await.unwrap();
        sqlx::query("UPDATE jobs SET status = 'running', attempt = 1")
            .execute(&db.pool)
            .await
            .unwrap();
        let queue = crate::db::connect_queue(&db.url, 1).await.unwrap();
        let fetched = || db.table_stat(&queue, "jobs", "idx_tup_fetch");
        let finish = |range: std::ops::Range<usize>| -> Vec<Finish> {
            jobs[range]
                .iter()
                .map(|j| Finish {
                    id: j.id,
                    attempt: 1,
                    outcome: Outcome::Succeeded(serde_json::json!({})).into(),
                    usage: Default::default(),
                })
                .collect()
        };
        // The first batch makes the session's plan; the second is measured.
        finish_many(&queue, &finish(0..10)).await.unwrap();
        let before = fetched().await;
        let ended = finish_many(&queue, &finish(10..20)).await.unwrap();
        let read = fetched().await - before;
        assert!(ended.iter().all(Option::is_some));
        assert!(
            read < 50,
            "{read} rows of jobs fetched to finish 10 of 300 running"
        );
    }

    /// A bulk cancel locks the jobs it takes in id order; a finish batch of the same running
    /// jobs must too, whatever order their outcomes arrived in. The test holds the older job so
    /// that the cancel waits for it first, then the finish of both, newest first, as a
    /// worker's outcomes may come. Locking in its items' order, the finish took the newer job
    /// and waited for the older one, which the cancel took next and then waited for the newer
    /// one: PostgreSQL broke the deadlock by failing one of them.
    #[tokio::test]
    async fn a_finish_and_a_bulk_cancel_of_the_same_jobs_do_not_deadlock() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        submit(
            &db,
            tenant,
            &[new_job("canary", None), new_job("canary", None)],
        )
        .await;
        let mut running = claim_jobs(&db.pool, "canary", "w1", 2, None, false)
            .await
            .unwrap();
        running.sort_by_key(|job| job.id);
        let (older, newer) = (running[0].clone(), running[1].clone());
        let waiting = || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap()
        };
        let wait_for = |n: i64| async move {
            for _ in 0..500 {
                if waiting().await >= n {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            panic!("{n} sessions never waited for a lock");
        };

        let mut holder = db.pool.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE")
            .bind(older.id)
            .execute(&mut *holder)
            .await
            .unwrap();
        let cancel = tokio::spawn({
            let pool = db.pool.clone();
            async move {
                let filter = JobFilter {
                    statuses: vec![JobStatus::Running],
                    ..Default::default()
                };
                change_matching(&pool, tenant, &filter, BulkChange::Cancel, 10, None).await
            }
        });
        wait_for(1).await;
        let queue = crate::db::connect_queue(&db.url, 1).await.unwrap();
        let finished = tokio::spawn(async move {
            let outcome = || Outcome::Succeeded(serde_json::json!({}));
            finish_many(
                &queue,
                &[finish(&newer, outcome()), finish(&older, outcome())],
            )
            .await
        });
        wait_for(2).await;
        holder.rollback().await.unwrap();

        let cancelled = cancel.await.unwrap().expect("the bulk cancel");
        let finished = finished.await.unwrap().expect("the finish");
        assert_eq!(cancelled.len(), 2);
        assert!(finished.iter().all(Option::is_some));
    }
}
