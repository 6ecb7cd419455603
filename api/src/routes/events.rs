//! Server-Sent Events: a job's stream and a tenant's stream, resumable with `Last-Event-ID`
//! (or `?after=`, since a browser's EventSource cannot set headers after a reload).

use async_stream::stream;
use axum::{
    extract::{Path, Query, State},
    http::HeaderMap,
    response::sse::{Event as SseEvent, KeepAlive, Sse},
};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use shared::{
    events::{self, Event, EventType, StreamEntry},
    store, FieldError, Job, Problem,
};
use std::{convert::Infallible, time::Duration};
use utoipa::IntoParams;

use crate::{auth::Tenant, routes::jobs::parse_id, state::Counters, AppState};

/// How long one blocking read waits before the stream checks on the job row.
const BLOCK: Duration = Duration::from_secs(5);
const KEEP_ALIVE: Duration = Duration::from_secs(15);
const BATCH: usize = 500;

#[derive(Deserialize, IntoParams)]
pub struct Cursor {
    /// Resume after this event id (the same as the `Last-Event-ID` header).
    after: Option<String>,
}

fn cursor(headers: &HeaderMap, query: &Cursor) -> Result<Option<String>, Problem> {
    let raw = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| query.after.clone())
        .filter(|c| !c.is_empty());
    match raw {
        Some(c) if !events::valid_cursor(&c) => Err(Problem::validation(vec![FieldError::new(
            "Last-Event-ID",
            "not an event id from this stream",
        )])),
        other => Ok(other),
    }
}

fn sse_event(entry: &StreamEntry) -> SseEvent {
    SseEvent::default()
        .id(&entry.id)
        .event(entry.event.event_type.as_str())
        .data(serde_json::to_string(&entry.event).unwrap_or_default())
}

/// One event standing for the job row, for readers whose stream has expired.
fn snapshot(job: &Job) -> SseEvent {
    let event = Event {
        job_id: job.id,
        kind: job.kind.clone(),
        event_type: EventType::Snapshot,
        status: job.status(),
        progress: job.progress,
        message: job.error.clone().or_else(|| job.message.clone()),
        data: job.result.clone(),
        at: job.updated_at,
    };
    SseEvent::default()
        .event("snapshot")
        .data(serde_json::to_string(&event).unwrap_or_default())
}

struct OpenStream(std::sync::Arc<crate::state::Counters>);

impl OpenStream {
    fn new(state: &AppState) -> Self {
        Counters::add(&state.counters.sse_open, 1);
        Self(state.counters.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0
            .sse_open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "events", params(("id" = uuid::Uuid, Path), Cursor),
    responses((status = 200, content_type = "text/event-stream", description = "the job's events until its terminal one"),
              (status = 404, body = Problem)))]
pub async fn job_events(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    Query(query): Query<Cursor>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, Problem> {
    let id = parse_id(&id)?;
    let job = store::get_job(&state.pool, tenant.0, id)
        .await?
        .ok_or_else(|| Problem::not_found("job"))?;
    let after = cursor(&headers, &query)?;
    let key = state.events.keys().job(tenant.0, id);
    let mut conn = state
        .redis_client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| Problem::unavailable(format!("event store unreachable: {e}")))?;
    let exists: bool = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap_or(false);
    let guard = OpenStream::new(&state);
    let events = stream! {
        let _guard = guard;
        if !exists && job.status().is_terminal() {
            yield Ok(snapshot(&job));
            return;
        }
        let mut cursor = after.unwrap_or_else(|| "0".to_owned());
        loop {
            let entries = match events::wait_after(&mut conn, &key, &cursor, BLOCK, BATCH).await {
                Ok(entries) => entries,
                Err(e) => {
                    tracing::warn!(error = %e, "event stream read failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Vec::new()
                }
            };
            if entries.is_empty() {
                // Quiet: if the row is final but its terminal event never came (the event store
                // was down), end with the row's state.
                if let Ok(Some(job)) = store::get_job(&state.pool, tenant.0, id).await {
                    let settled = chrono::Utc::now() - job.updated_at > chrono::Duration::from_std(BLOCK).unwrap_or_default();
                    if job.status().is_terminal() && settled {
                        yield Ok(snapshot(&job));
                        return;
                    }
                }
                continue;
            }
            for entry in entries {
                cursor = entry.id.clone();
                yield Ok(sse_event(&entry));
                if entry.event.event_type.is_terminal() {
                    return;
                }
            }
        }
    };
    let events = events.take_until(state.stopping.clone().cancelled_owned());
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

#[utoipa::path(get, path = "/v1/events", tag = "events", params(Cursor),
    responses((status = 200, content_type = "text/event-stream", description = "every event of the tenant's jobs, live")))]
pub async fn tenant_events(
    State(state): State<AppState>,
    tenant: Tenant,
    Query(query): Query<Cursor>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, Problem> {
    let after = cursor(&headers, &query)?;
    let key = state.events.keys().tenant(tenant.0);
    let mut conn = state
        .redis_client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| Problem::unavailable(format!("event store unreachable: {e}")))?;
    // Without a cursor, start at the stream's current end: read from its last id, so nothing
    // appended between two reads is missed (XREAD with `$` would skip it).
    let start = match after {
        Some(c) => c,
        None => {
            let last: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
                .arg(&key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            last.into_iter()
                .next()
                .map(|(id, _)| id)
                .unwrap_or_else(|| "0".to_owned())
        }
    };
    let guard = OpenStream::new(&state);
    let events = stream! {
        let _guard = guard;
        let mut cursor = start;
        loop {
            match events::wait_after(&mut conn, &key, &cursor, BLOCK, BATCH).await {
                Ok(entries) => for entry in entries {
                    cursor = entry.id.clone();
                    yield Ok(sse_event(&entry));
                },
                Err(e) => {
                    tracing::warn!(error = %e, "tenant stream read failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    };
    let events = events.take_until(state.stopping.clone().cancelled_owned());
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}
