//! Health, readiness and Prometheus metrics.

use axum::{
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::IntoResponse,
    Json,
};
use prometheus_client::{
    encoding::prometheus_text,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Metric, Registry},
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use shared::{Problem, Settings};
use std::sync::atomic::{AtomicU64, Ordering};

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

/// The shortest metrics token served.
const MIN_METRICS_TOKEN: usize = 16;
/// The fewest different characters a metrics token served holds.
const MIN_METRICS_TOKEN_CHARS: usize = 8;
/// The metrics tokens the deployment examples ship with.
const PLACEHOLDER_TOKENS: [&str; 3] = ["change-me", "change-me-metrics", "example-only"];

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
    // A token copied from the deployment examples is known to whoever read them; one of a
    // few characters repeated is guessed as soon.
    let distinct = expected
        .chars()
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    if expected.len() < MIN_METRICS_TOKEN
        || distinct < MIN_METRICS_TOKEN_CHARS
        || PLACEHOLDER_TOKENS.contains(&expected.as_str())
    {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "metrics are off: CONVEYOR_METRICS_TOKEN is an example's placeholder, shorter \
             than 16 characters or made of fewer than 8 different ones",
        ));
    }
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
    (status = 401, body = Problem, description = "without the metrics token"), (status = 404, body = Problem, description = "CONVEYOR_METRICS_TOKEN is not set, shorter than 16 characters, of fewer than 8 different ones, or an example's placeholder")))]
pub async fn metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, Problem> {
    metrics_allowed(&state.settings, &headers)?;
    // Most values are read at scrape time (rows, Redis), so each scrape builds its registry.
    let mut registry = Registry::default();
    let r = &mut registry;
    let c = &state.counters;
    add(
        r,
        "conveyor_jobs_submitted",
        "jobs accepted by this API process",
        Counter::<u64>::default(),
    )
    .inc_by(c.submitted.load(Ordering::Relaxed));
    add(
        r,
        "conveyor_queue_announce_failures",
        "announcements of queued jobs by this API process that failed (workers find the jobs at their idle poll)",
        Counter::<u64>::default(),
    )
    .inc_by(state.refill.failures());
    add(
        r,
        "conveyor_sse_streams",
        "open SSE streams",
        Gauge::<i64>::default(),
    )
    .set(c.sse_open.load(Ordering::Relaxed) as i64);
    add(
        r,
        "conveyor_sse_feeds",
        "Redis streams read for this process' SSE subscribers (one read each, shared)",
        Gauge::<i64>::default(),
    )
    .set(state.hub.feeds() as i64);
    let (batches, entries) = state.hub.broadcast_totals();
    add(
        r,
        "conveyor_sse_batches",
        "batches of events the feeds read and handed to their subscribers",
        Counter::<u64>::default(),
    )
    .inc_by(batches);
    add(
        r,
        "conveyor_sse_batch_events",
        "events in those batches",
        Counter::<u64>::default(),
    )
    .inc_by(entries);

    // Live jobs come from the partial indexes; finishes and durations cover the last hour.
    let live: Vec<(String, String, i64)> = sqlx::query_as(concat!(
        "SELECT kind, status, count(*) FROM jobs WHERE ",
        shared::live_jobs!("jobs"),
        " GROUP BY 1, 2"
    ))
    .fetch_all(&state.pool)
    .await?;
    let family = add(
        r,
        "conveyor_jobs_live",
        "jobs not yet finished, by kind and status",
        Counts::default(),
    );
    for (kind, status, n) in live {
        family
            .get_or_create(&vec![("kind", kind), ("status", status)])
            .set(n);
    }

    // From the per-minute rollup (`queue_minutes`, at most 15 s behind while maintenance
    // runs): counted from `jobs`, each scrape read every job that ended in the hour.
    let finished: Vec<(String, String, i64, f64)> = sqlx::query_as(
        "SELECT m.kind, o.status, sum(o.n)::bigint, sum(o.seconds)::float8
         FROM queue_minutes m,
              LATERAL (VALUES ('succeeded', m.succeeded, m.succeeded_seconds),
                              ('failed', m.failed, m.failed_seconds),
                              ('cancelled', m.cancelled, m.cancelled_seconds)) AS o(status, n, seconds)
         WHERE m.minute > now() - interval '1 hour' AND o.n > 0
         GROUP BY 1, 2",
    )
    .fetch_all(&state.pool)
    .await?;
    let count = add(
        r,
        "conveyor_jobs_finished_last_hour",
        "jobs finished in the last hour, by kind and status",
        Counts::default(),
    );
    let run_time = add(
        r,
        "conveyor_job_run_seconds_last_hour",
        "summed run time of jobs finished in the last hour",
        Amounts::default(),
    );
    for (kind, status, n, seconds) in finished {
        let labels = vec![("kind", kind), ("status", status)];
        count.get_or_create(&labels).set(n);
        run_time.get_or_create(&labels).set(seconds);
    }

    // The backlog where it lives (PostgreSQL), every known queue with a series: what autoscaling
    // and alerts read.
    let backlog = super::queues::backlog(&state).await?;
    let waiting = add(
        r,
        "conveyor_queue_waiting",
        "jobs waiting to run in each queue (queued)",
        Counts::default(),
    );
    let oldest = add(
        r,
        "conveyor_queue_oldest_waiting_seconds",
        "how long the oldest waiting job of each queue has been runnable",
        Amounts::default(),
    );
    for kind in state.contracts.kinds() {
        let (n, age) = backlog.get(kind).copied().unwrap_or_default();
        let labels = vec![("queue", kind.to_owned())];
        waiting.get_or_create(&labels).set(n);
        oldest.get_or_create(&labels).set(age);
    }

    tenant_usage(&state, r).await?;

    let alive: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM workers WHERE stopped_at IS NULL AND heartbeat_at > now() - make_interval(secs => $1)",
    )
    .bind(state.settings.rescue_after.as_secs_f64())
    .fetch_one(&state.pool)
    .await?;
    add(
        r,
        "conveyor_workers_alive",
        "worker processes with a live heartbeat",
        Gauge::<i64>::default(),
    )
    .set(alive);
    let leading = shared::leader::current(&state.pool).await?.is_some();
    add(
        r,
        "conveyor_maintenance_leader",
        "1 while a worker leads maintenance (holds its lock), else 0",
        Gauge::<i64>::default(),
    )
    .set(leading.into());
    let mut out = String::new();
    prometheus_text::encode(&mut out, &registry).map_err(Problem::internal)?;
    Ok(([(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)], out))
}

type Labels = Vec<(&'static str, String)>;
/// Whole-number series by label.
type Counts = Family<Labels, Gauge>;
/// Measured series (seconds) by label.
type Amounts = Family<Labels, Gauge<f64, AtomicU64>>;

/// Registers `metric` under `name` and hands it back to be set.
fn add<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// Tenants with their own usage series; the rest add up under `tenant_id="other"`, so a
/// deployment of any size exports at most this many series per measure, plus one. Each
/// series carries the tenant's id beside its name: names are the tenants' to choose, and one
/// named `other` must not merge with the rest.
const USAGE_TENANTS: i64 = 100;

/// Each tenant's usage totals since records began (`usage_sums`), the heaviest CPU users first.
async fn tenant_usage(state: &AppState, registry: &mut Registry) -> Result<(), Problem> {
    type Row = (String, String, i64, f64, f64, i64, i64, i64);
    let rows: Vec<Row> = sqlx::query_as(
        "WITH totals AS (
             SELECT tenant_id, sum(attempts) AS attempts, sum(wall_seconds) AS wall,
                    sum(cpu_seconds) AS cpu, sum(rows_written)::bigint AS rows_written,
                    sum(chunks_embedded)::bigint AS chunks, sum(synthetic_rows)::bigint AS synthetic
             FROM usage_sums GROUP BY tenant_id
         ), ranked AS (
             SELECT totals.*, row_number() OVER (ORDER BY cpu DESC, tenant_id) AS rank FROM totals
         )
         SELECT CASE WHEN r.rank <= $1 THEN t.name ELSE 'other' END AS tenant,
                CASE WHEN r.rank <= $1 THEN t.id::text ELSE 'other' END AS tenant_id,
                sum(r.attempts)::bigint, sum(r.wall)::float8, sum(r.cpu)::float8,
                sum(r.rows_written)::bigint, sum(r.chunks)::bigint, sum(r.synthetic)::bigint
         FROM ranked r JOIN tenants t ON t.id = r.tenant_id
         GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .bind(USAGE_TENANTS)
    .fetch_all(&state.pool)
    .await?;
    type Totals = Family<Labels, Counter<f64, AtomicU64>>;
    type Series = (&'static str, &'static str, fn(&Row) -> f64);
    let series: [Series; 6] = [
        ("conveyor_tenant_attempts", "job attempts ended", |r| {
            r.2 as f64
        }),
        (
            "conveyor_tenant_wall_seconds",
            "wall time of those attempts",
            |r| r.3,
        ),
        (
            "conveyor_tenant_cpu_seconds",
            "CPU time of those attempts' own work",
            |r| r.4,
        ),
        (
            "conveyor_tenant_rows_written",
            "rows imported, patched or restored",
            |r| r.5 as f64,
        ),
        (
            "conveyor_tenant_chunks_embedded",
            "chunks embedded by ingest",
            |r| r.6 as f64,
        ),
        (
            "conveyor_tenant_synthetic_rows",
            "synthetic rows generated",
            |r| r.7 as f64,
        ),
    ];
    for (name, help, value) in series {
        let family = add(registry, name, help, Totals::default());
        for row in &rows {
            family
                .get_or_create(&vec![
                    ("tenant", row.0.clone()),
                    ("tenant_id", row.1.clone()),
                ])
                .inc_by(value(row));
        }
    }
    Ok(())
}

pub async fn not_found() -> Problem {
    Problem::not_found("route")
}

/// A route that takes other methods (axum's own 405 has no body).
pub async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "this route does not take that method; its Allow header lists those it takes",
    )
}

/// A path that does not decode to UTF-8 names no route nor object: a 404 problem, where the
/// path extractors would answer in plain text.
pub async fn refuse_undecodable_paths(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let path = percent_encoding::percent_decode_str(request.uri().path());
    if path.decode_utf8().is_err() {
        return Problem::not_found("route").into_response();
    }
    next.run(request).await
}

/// A client's `x-request-id` is kept only when it is a plain token (at most 64 of `A-Z a-z 0-9
/// . _ -`); otherwise the request gets one of the server's. The id goes into the logs and into
/// every audit row of the request: 10,000 of them for a bulk change.
pub async fn keep_plain_request_ids(mut request: axum::extract::Request) -> axum::extract::Request {
    let plain = |id: &[u8]| {
        !id.is_empty()
            && id.len() <= 64
            && id
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b".-_".contains(b))
    };
    let headers = request.headers_mut();
    if headers
        .get("x-request-id")
        .is_some_and(|id| !plain(id.as_bytes()))
    {
        headers.remove("x-request-id");
    }
    request
}
