//! The dashboard's queues panel: each queue's backlog and recent outcomes, and the live workers.
//! Queues and workers are shared by every tenant, so these counts are queue-wide, as in
//! `/metrics`.
//!
//! A queue's backlog is its `queued` rows in PostgreSQL, where workers claim them: `waiting` and
//! the age of the oldest waiting job are what autoscaling reads.

use axum::{extract::State, Json};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::{FieldError, Problem};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

use crate::{auth::Tenant, extract::Params, AppState};

#[derive(Serialize, ToSchema)]
pub struct QueueStats {
    /// The job kind (one queue per kind).
    pub kind: String,
    /// Jobs waiting to run (`queued`).
    pub waiting: i64,
    /// How long the oldest waiting job has been runnable, in seconds (0 with none waiting).
    pub oldest_waiting_seconds: f64,
    pub running: i64,
    /// Jobs of the queue that succeeded, and that failed for good, in the minutes begun in the
    /// last hour: from the per-minute rollup of `GET /v1/queues/history`, at most 15 s behind.
    pub succeeded_last_hour: i64,
    pub failed_last_hour: i64,
    /// Live workers serving this queue, and their summed concurrency.
    pub workers: i64,
    pub concurrency: i64,
}

#[derive(Serialize, ToSchema)]
pub struct QueueList {
    pub queues: Vec<QueueStats>,
}

#[derive(Serialize, ToSchema, sqlx::FromRow)]
pub struct WorkerInfo {
    /// Unique per process; tenants see a digest of it (`worker-` and 12 hex digits), not the
    /// host and process id it holds (the worker logs both at start).
    pub name: String,
    /// Queue kind → concurrency, e.g. `{"canary": 4}`.
    #[schema(value_type = Object)]
    pub queues: Value,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    /// Jobs this worker is running now.
    pub running: i64,
    /// Whether this worker leads maintenance now (one worker of the deployment at a time).
    pub leads_maintenance: bool,
}

#[derive(Serialize, ToSchema)]
pub struct WorkerList {
    pub workers: Vec<WorkerInfo>,
}

/// Each queue's waiting jobs (`queued` rows) and how long the oldest has been runnable: its
/// `run_at`, the time it was submitted for, or came due, or ended its retry backoff, and not
/// before it was submitted (a tenant's job "due" in 1970 made every queue's age read 56 years).
pub(crate) async fn backlog(state: &AppState) -> Result<BTreeMap<String, (i64, f64)>, Problem> {
    let rows: Vec<(String, i64, f64)> = sqlx::query_as(
        "SELECT kind, count(*),
                greatest(extract(epoch FROM now() - min(greatest(run_at, created_at))), 0)::float8
         FROM jobs WHERE status = 'queued' GROUP BY kind",
    )
    .fetch_all(&state.pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(kind, waiting, oldest)| (kind, (waiting, oldest)))
        .collect())
}

async fn live_workers(state: &AppState) -> Result<Vec<WorkerInfo>, Problem> {
    let leader = shared::leader::current(&state.pool).await?;
    // The running jobs counted once, by worker: counted for each worker, every running job was
    // read again per worker (the running jobs' index has no worker).
    let mut workers: Vec<WorkerInfo> = sqlx::query_as(
        "SELECT w.name, w.queues, w.started_at, w.heartbeat_at,
                coalesce(r.running, 0) AS running,
                w.name IS NOT DISTINCT FROM $2 AS leads_maintenance
         FROM workers w
         LEFT JOIN (SELECT worker, count(*) AS running FROM jobs WHERE status = 'running'
                    GROUP BY worker) AS r ON r.worker = w.name
         WHERE w.stopped_at IS NULL AND w.heartbeat_at > now() - make_interval(secs => $1)
         ORDER BY w.name",
    )
    .bind(state.settings.rescue_after.as_secs_f64())
    .bind(leader)
    .fetch_all(&state.pool)
    .await?;
    for worker in &mut workers {
        worker.name = shared::leader::public_name(&worker.name);
    }
    Ok(workers)
}

#[utoipa::path(get, path = "/v1/queues", tag = "queues",
    responses((status = 200, body = QueueList, description = "every queue this deployment knows")))]
pub async fn queues(State(state): State<AppState>, _: Tenant) -> Result<Json<QueueList>, Problem> {
    // Running from the running jobs' index (as many as the workers' slots); the hour's outcomes
    // from the per-minute rollup, 60 rows a queue: counted from `jobs`, every job that ended in
    // the last hour was read, millions at the queue's rate, for each dashboard every 3 s.
    let counts: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT kind, sum(running)::bigint, sum(succeeded)::bigint, sum(failed)::bigint
         FROM (SELECT kind, count(*) AS running, 0 AS succeeded, 0 AS failed
               FROM jobs WHERE status = 'running' GROUP BY kind
               UNION ALL
               SELECT kind, 0, succeeded, failed FROM queue_minutes
               WHERE minute > now() - interval '1 hour') AS c
         GROUP BY kind",
    )
    .fetch_all(&state.pool)
    .await?;
    let counts: BTreeMap<_, _> = counts
        .into_iter()
        .map(|(kind, running, ok, failed)| (kind, (running, ok, failed)))
        .collect();
    let backlog = backlog(&state).await?;
    let workers = live_workers(&state).await?;
    let mut queues = Vec::new();
    for kind in state.contracts.kinds() {
        let (running, succeeded_last_hour, failed_last_hour) =
            counts.get(kind).copied().unwrap_or_default();
        let (waiting, oldest_waiting_seconds) = backlog.get(kind).copied().unwrap_or_default();
        let serving: Vec<i64> = workers
            .iter()
            .filter_map(|w| w.queues.get(kind).and_then(Value::as_i64))
            .collect();
        queues.push(QueueStats {
            kind: kind.to_owned(),
            waiting,
            oldest_waiting_seconds,
            running,
            succeeded_last_hour,
            failed_last_hour,
            workers: serving.len() as i64,
            concurrency: serving.iter().sum(),
        });
    }
    Ok(Json(QueueList { queues }))
}

#[utoipa::path(get, path = "/v1/workers", tag = "queues",
    responses((status = 200, body = WorkerList, description = "workers with a live heartbeat")))]
pub async fn workers(
    State(state): State<AppState>,
    _: Tenant,
) -> Result<Json<WorkerList>, Problem> {
    Ok(Json(WorkerList {
        workers: live_workers(&state).await?,
    }))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct HistoryParams {
    /// How many minutes back, the current one included: 1-1440 (default 60).
    minutes: Option<i64>,
}

/// One queue's minute, from the maintenance rollup (`queue_minutes`).
#[derive(Serialize, ToSchema, sqlx::FromRow)]
pub struct QueueMinute {
    /// The minute's start.
    pub minute: DateTime<Utc>,
    /// Jobs of the queue that succeeded, and that failed for good, in the minute.
    pub succeeded: i32,
    pub failed: i32,
    /// The most jobs seen waiting (`queued`) in the minute; null where the rollup took no
    /// sample (it was not running).
    pub waiting: Option<i32>,
}

#[derive(sqlx::FromRow)]
struct KindMinute {
    kind: String,
    #[sqlx(flatten)]
    minute: QueueMinute,
}

#[derive(Serialize, ToSchema)]
pub struct QueueHistory {
    pub kind: String,
    /// Every minute from `from` to `to`, oldest first.
    pub minutes: Vec<QueueMinute>,
}

#[derive(Serialize, ToSchema)]
pub struct QueueHistoryList {
    /// The first minute and the current one.
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub queues: Vec<QueueHistory>,
}

/// Each queue's throughput and backlog per minute, queue-wide like `GET /v1/queues`. Read from
/// the per-minute rollup the workers' maintenance keeps (at most 15 s behind), never from the
/// jobs table.
#[utoipa::path(get, path = "/v1/queues/history", tag = "queues", params(HistoryParams),
    responses((status = 200, body = QueueHistoryList, description = "every queue, minute by minute"),
              (status = 422, body = Problem)))]
pub async fn history(
    State(state): State<AppState>,
    _: Tenant,
    Params(params): Params<HistoryParams>,
) -> Result<Json<QueueHistoryList>, Problem> {
    let minutes = params.minutes.unwrap_or(60);
    if !(1..=1440).contains(&minutes) {
        return Err(Problem::validation(vec![FieldError::new(
            "minutes",
            "must be between 1 and 1440",
        )]));
    }
    // Every (queue, minute) of the window, from the database's clock (the one the rollup
    // keeps its minutes by), the rollup's row where there is one.
    let kinds: Vec<&str> = state.contracts.kinds().collect();
    let rows: Vec<KindMinute> = sqlx::query_as(
        "SELECT k.kind, m.minute, coalesce(q.succeeded, 0) AS succeeded,
                coalesce(q.failed, 0) AS failed, q.waiting
         FROM unnest($1::text[]) WITH ORDINALITY AS k (kind, position)
         CROSS JOIN generate_series(date_trunc('minute', now()) - make_interval(mins => $2 - 1),
                                    date_trunc('minute', now()), interval '1 minute') AS m (minute)
         LEFT JOIN queue_minutes q ON q.kind = k.kind AND q.minute = m.minute
         ORDER BY k.position, m.minute",
    )
    .bind(&kinds)
    .bind(minutes as i32)
    .fetch_all(&state.pool)
    .await?;
    let mut queues: Vec<QueueHistory> = Vec::with_capacity(kinds.len());
    for KindMinute { kind, minute } in rows {
        if queues.last().is_none_or(|q| q.kind != kind) {
            queues.push(QueueHistory {
                kind,
                minutes: Vec::with_capacity(minutes as usize),
            });
        }
        queues
            .last_mut()
            .expect("pushed above")
            .minutes
            .push(minute);
    }
    let window = queues
        .first()
        .map(|q| q.minutes.as_slice())
        .unwrap_or_default();
    let minute = |m: Option<&QueueMinute>| m.map(|m| m.minute).unwrap_or_default();
    let (from, to) = (minute(window.first()), minute(window.last()));
    Ok(Json(QueueHistoryList { from, to, queues }))
}
