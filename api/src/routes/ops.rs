//! Health, readiness and Prometheus metrics.

use axum::{
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::IntoResponse,
    Json,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use shared::{Problem, Settings};
use std::{fmt::Write, sync::atomic::Ordering};

use crate::AppState;

#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, description = "the process is alive")))]
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses((status = 200, description = "PostgreSQL and Redis answer"), (status = 503, body = Problem)))]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, Problem> {
    // Anyone may ask: the reason goes to the log, not to them.
    let not_ready = |what: &str, error: &dyn std::fmt::Display| {
        tracing::warn!(%error, "not ready: {what} does not answer");
        Problem::unavailable(format!("{what} does not answer"))
    };
    sqlx::query("SELECT 1")
        .execute(&state.pool)
        .await
        .map_err(|e| not_ready("PostgreSQL", &e))?;
    let mut redis = state.redis.clone();
    redis::cmd("PING")
        .query_async::<String>(&mut redis)
        .await
        .map_err(|e| not_ready("Redis", &e))?;
    Ok(Json(
        json!({"status": "ready", "postgres": "ok", "redis": "ok"}),
    ))
}

/// Only for the holder of `CONVEYOR_METRICS_TOKEN`: the counts are platform-wide, every
/// tenant's together. Without the setting, metrics are off.
fn metrics_allowed(settings: &Settings, headers: &HeaderMap) -> Result<(), Problem> {
    let Some(expected) = &settings.metrics_token else {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "metrics are off: set CONVEYOR_METRICS_TOKEN to serve them",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    // Digests compared, so the time taken says nothing about the token's bytes.
    if Sha256::digest(given) == Sha256::digest(expected) {
        Ok(())
    } else {
        Err(Problem::unauthorized(
            "metrics need CONVEYOR_METRICS_TOKEN as a bearer token",
        ))
    }
}

#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, content_type = "text/plain", description = "Prometheus text format"),
    (status = 401, body = Problem, description = "without the metrics token"), (status = 404, body = Problem, description = "CONVEYOR_METRICS_TOKEN is not set")))]
pub async fn metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, Problem> {
    metrics_allowed(&state.settings, &headers)?;
    let mut out = String::new();
    let c = &state.counters;
    gauge(
        &mut out,
        "conveyor_jobs_submitted_total",
        "counter",
        "jobs accepted by this API process",
        &[("", c.submitted.load(Ordering::Relaxed) as f64)],
    );
    gauge(
        &mut out,
        "conveyor_queue_push_failures_total",
        "counter",
        "dispatch passes of this API process that failed (the workers' dispatcher passes again)",
        &[("", state.refill.failures() as f64)],
    );
    gauge(
        &mut out,
        "conveyor_sse_streams",
        "gauge",
        "open SSE streams",
        &[("", c.sse_open.load(Ordering::Relaxed) as f64)],
    );
    gauge(
        &mut out,
        "conveyor_sse_feeds",
        "gauge",
        "Redis streams read for this process' SSE subscribers (one read each, shared)",
        &[("", state.hub.feeds() as f64)],
    );
    let (batches, entries) = state.hub.broadcast_totals();
    gauge(
        &mut out,
        "conveyor_sse_batches_total",
        "counter",
        "batches of events the feeds read and handed to their subscribers",
        &[("", batches as f64)],
    );
    gauge(
        &mut out,
        "conveyor_sse_batch_events_total",
        "counter",
        "events in those batches",
        &[("", entries as f64)],
    );

    // Live jobs come from the partial index; finishes and durations cover the last hour.
    let live: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT kind, status, count(*) FROM jobs WHERE status IN ('scheduled','queued','running','retrying') GROUP BY 1, 2",
    )
    .fetch_all(&state.pool)
    .await?;
    let rows: Vec<_> = live
        .iter()
        .map(|(k, s, n)| (format!("kind=\"{k}\",status=\"{s}\""), *n as f64))
        .collect();
    labelled(
        &mut out,
        "conveyor_jobs_live",
        "gauge",
        "jobs not yet finished, by kind and status",
        &rows,
    );

    let finished: Vec<(String, String, i64, f64)> = sqlx::query_as(
        "SELECT kind, status, count(*), coalesce(sum(extract(epoch FROM finished_at - started_at)), 0)::float8
         FROM jobs WHERE finished_at > now() - interval '1 hour' GROUP BY 1, 2",
    )
    .fetch_all(&state.pool)
    .await?;
    let rows: Vec<_> = finished
        .iter()
        .map(|(k, s, n, _)| (format!("kind=\"{k}\",status=\"{s}\""), *n as f64))
        .collect();
    labelled(
        &mut out,
        "conveyor_jobs_finished_last_hour",
        "gauge",
        "jobs finished in the last hour, by kind and status",
        &rows,
    );
    let rows: Vec<_> = finished
        .iter()
        .map(|(k, s, _, secs)| (format!("kind=\"{k}\",status=\"{s}\""), *secs))
        .collect();
    labelled(
        &mut out,
        "conveyor_job_run_seconds_last_hour",
        "gauge",
        "summed run time of jobs finished in the last hour",
        &rows,
    );

    let mut depths = Vec::new();
    for kind in state.contracts.kinds() {
        let depth = state
            .queues
            .depth(kind)
            .await
            .map_err(|e| Problem::unavailable(format!("Redis: {e}")))?;
        depths.push((format!("queue=\"{kind}\""), depth as f64));
    }
    labelled(
        &mut out,
        "conveyor_queue_depth",
        "gauge",
        "entries waiting in each Redis queue (the dispatched part of the backlog)",
        &depths,
    );
    // The backlog where it lives (PostgreSQL), every known queue with a series: what autoscaling
    // and alerts read.
    let backlog = super::queues::backlog(&state).await?;
    let waiting: Vec<_> = state
        .contracts
        .kinds()
        .map(|kind| {
            let (n, oldest) = backlog.get(kind).copied().unwrap_or_default();
            (format!("queue=\"{kind}\""), (n as f64, oldest))
        })
        .collect();
    let rows: Vec<_> = waiting.iter().map(|(l, (n, _))| (l.clone(), *n)).collect();
    labelled(
        &mut out,
        "conveyor_queue_waiting",
        "gauge",
        "jobs waiting to run in each queue (queued: dispatched to Redis or held in PostgreSQL)",
        &rows,
    );
    let rows: Vec<_> = waiting
        .iter()
        .map(|(l, (_, age))| (l.clone(), *age))
        .collect();
    labelled(
        &mut out,
        "conveyor_queue_oldest_waiting_seconds",
        "gauge",
        "how long the oldest waiting job of each queue has been runnable",
        &rows,
    );

    tenant_usage(&state, &mut out).await?;

    let alive: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM workers WHERE stopped_at IS NULL AND heartbeat_at > now() - make_interval(secs => $1)",
    )
    .bind(state.settings.rescue_after.as_secs_f64())
    .fetch_one(&state.pool)
    .await?;
    gauge(
        &mut out,
        "conveyor_workers_alive",
        "gauge",
        "worker processes with a live heartbeat",
        &[("", alive as f64)],
    );
    let leading = shared::leader::current(&state.pool).await?.is_some();
    gauge(
        &mut out,
        "conveyor_maintenance_leader",
        "gauge",
        "1 while a worker leads maintenance (holds its lock), else 0",
        &[("", if leading { 1.0 } else { 0.0 })],
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}

/// Tenants with their own usage series; the rest add up under `tenant="other"`, so a
/// deployment of any size exports at most this many series per measure, plus one.
const USAGE_TENANTS: i64 = 100;

/// Each tenant's usage totals since records began (`job_usage`), the heaviest CPU users first.
async fn tenant_usage(state: &AppState, out: &mut String) -> Result<(), Problem> {
    type Row = (String, i64, f64, f64, i64, i64, i64);
    let rows: Vec<Row> = sqlx::query_as(
        "WITH totals AS (
             SELECT tenant_id, count(*) AS attempts, sum(wall_seconds) AS wall,
                    sum(cpu_seconds) AS cpu, sum(rows_written)::bigint AS rows_written,
                    sum(chunks_embedded)::bigint AS chunks, sum(synthetic_rows)::bigint AS synthetic
             FROM job_usage GROUP BY tenant_id
         ), ranked AS (
             SELECT totals.*, row_number() OVER (ORDER BY cpu DESC, tenant_id) AS rank FROM totals
         )
         SELECT CASE WHEN r.rank <= $1 THEN t.name ELSE 'other' END AS tenant,
                sum(r.attempts)::bigint, sum(r.wall)::float8, sum(r.cpu)::float8,
                sum(r.rows_written)::bigint, sum(r.chunks)::bigint, sum(r.synthetic)::bigint
         FROM ranked r JOIN tenants t ON t.id = r.tenant_id
         GROUP BY 1 ORDER BY 1",
    )
    .bind(USAGE_TENANTS)
    .fetch_all(&state.pool)
    .await?;
    let label = |name: &str| {
        format!(
            "tenant=\"{}\"",
            name.replace('\\', "\\\\").replace('"', "\\\"")
        )
    };
    type Series = (&'static str, &'static str, fn(&Row) -> f64);
    let series: [Series; 6] = [
        (
            "conveyor_tenant_attempts_total",
            "job attempts ended",
            |r| r.1 as f64,
        ),
        (
            "conveyor_tenant_wall_seconds_total",
            "wall time of those attempts",
            |r| r.2,
        ),
        (
            "conveyor_tenant_cpu_seconds_total",
            "CPU time of those attempts' own work",
            |r| r.3,
        ),
        (
            "conveyor_tenant_rows_written_total",
            "rows imported, patched or restored",
            |r| r.4 as f64,
        ),
        (
            "conveyor_tenant_chunks_embedded_total",
            "chunks embedded by ingest",
            |r| r.5 as f64,
        ),
        (
            "conveyor_tenant_synthetic_rows_total",
            "synthetic rows generated",
            |r| r.6 as f64,
        ),
    ];
    for (name, help, value) in series {
        let rows: Vec<_> = rows.iter().map(|r| (label(&r.0), value(r))).collect();
        labelled(out, name, "counter", help, &rows);
    }
    Ok(())
}

fn gauge(out: &mut String, name: &str, kind: &str, help: &str, values: &[(&str, f64)]) {
    let rows: Vec<_> = values.iter().map(|(l, v)| (l.to_string(), *v)).collect();
    labelled(out, name, kind, help, &rows);
}

fn labelled(out: &mut String, name: &str, kind: &str, help: &str, rows: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in rows {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

pub async fn not_found() -> Problem {
    Problem::not_found("route")
}
