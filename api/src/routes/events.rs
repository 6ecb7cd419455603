//! Server-Sent Events: a job's stream and a tenant's stream, resumable with `Last-Event-ID`
//! (or `?after=`, since a browser's EventSource cannot set headers after a reload).

use crate::extract::Params;
use async_stream::stream;
use axum::{
    body::{Body, Bytes},
    extract::{Path, State},
    http::{header, HeaderMap},
    response::{IntoResponse, Response},
};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use shared::{
    events::{self, Event, EventType},
    store, FieldError, Job, Problem,
};
use std::{convert::Infallible, pin::Pin, time::Duration};
use tokio::{
    sync::broadcast::error::RecvError,
    time::{Instant, Sleep},
};
use utoipa::IntoParams;
use uuid::Uuid;

use crate::{
    auth::Caller,
    hub::{last_id, Batch, EntryId, Subscription},
    revocation::Invalidation,
    routes::parse_id,
    state::Counters,
    AppState,
};

/// How long a stream waits for events before it checks on the job row and sends a keep-alive
/// comment.
const QUIET: Duration = Duration::from_secs(5);
/// Entries per replay read.
const BATCH: usize = 500;
const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct Cursor {
    /// Resume after this event id (the same as the `Last-Event-ID` header).
    after: Option<String>,
}

fn cursor(headers: &HeaderMap, query: &Cursor) -> Result<Option<String>, Problem> {
    let raw = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|c| ("Last-Event-ID", c.to_owned()))
        .or_else(|| query.after.clone().map(|c| ("after", c)))
        .filter(|(_, c)| !c.is_empty());
    match raw {
        Some((field, c)) if !events::valid_cursor(&c) => {
            Err(Problem::validation(vec![FieldError::new(
                field,
                "not an event id from this stream",
            )]))
        }
        other => Ok(other.map(|(_, c)| c)),
    }
}

/// One event standing for the job row, for readers whose stream has expired.
fn snapshot(job: &Job) -> Bytes {
    let event = Event {
        job_id: job.id,
        kind: job.kind.clone(),
        event_type: EventType::Snapshot,
        status: job.status(),
        progress: job.progress,
        message: job.error.clone().or_else(|| job.message.clone()),
        data: job.result.clone(),
        at: job.updated_at,
        attempt: None,
    };
    let data = serde_json::to_string(&event).unwrap_or_default();
    Bytes::from(format!("event: snapshot\ndata: {data}\n\n"))
}

fn sse_response(events: impl Stream<Item = Bytes> + Send + 'static) -> Response {
    // The streams end when the server stops because the hub closes its feeds then (a per-poll
    // check of the stop token cost 9 % of the API's CPU at 2,000 subscribers).
    let events = events.map(Ok::<_, Infallible>);
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            // Proxies must pass each event on at once.
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(events),
    )
        .into_response()
}

/// What a follower has next.
enum Next {
    /// SSE frames to send; `terminal` when the last one ends a job's stream.
    Frames { bytes: Bytes, terminal: bool },
    /// Nothing for a while.
    Quiet,
    /// A key was revoked or a session ended, maybe the stream's.
    Invalidated(Invalidation),
    /// The server is stopping.
    End,
}

/// Follows one stream after a cursor: replays it from Redis, then takes the live entries from
/// the process' shared feed of its tenant's stream (see [`crate::hub`] for why this misses
/// nothing and repeats nothing).
struct Follower {
    state: AppState,
    key: String,
    cursor: EntryId,
    subscription: Subscription,
    replaying: bool,
    stop_at_terminal: bool,
    /// When the stream last sent something, and a timer that fires QUIET after it. The timer
    /// is re-armed only when it fires, not after every batch: thousands of streams each
    /// taking tens of batches a second would otherwise keep the runtime's timer wheel busy.
    active_at: Instant,
    quiet: Pin<Box<Sleep>>,
}

impl Follower {
    /// Follows the tenant's stream, or one job's stream if `job` is given (and then stops at
    /// its terminal event); without a cursor, starts at the stream's current end. Live entries
    /// come from the hub's feed of the tenant's stream either way.
    async fn start(
        state: &AppState,
        tenant: Uuid,
        job: Option<Uuid>,
        cursor: Option<&str>,
    ) -> Result<Self, Problem> {
        let keys = state.events.keys();
        let key = match job {
            Some(job) => keys.job(tenant, job),
            None => keys.tenant(tenant),
        };
        let mut subscription = state.hub.subscribe(&keys.tenant(tenant), job);
        tokio::time::timeout(QUIET * 2, subscription.ready())
            .await
            .map_err(|_| Problem::unavailable("event store unreachable"))?;
        let cursor = match cursor {
            Some(c) => c.to_owned(),
            None => last_id(&mut state.redis.clone(), &key)
                .await
                .map_err(|e| Problem::unavailable_after("event store unreachable", e))?,
        };
        Ok(Self {
            state: state.clone(),
            key,
            cursor: EntryId::parse(&cursor).unwrap_or_default(),
            subscription,
            replaying: true,
            stop_at_terminal: job.is_some(),
            active_at: Instant::now(),
            quiet: Box::pin(tokio::time::sleep(QUIET)),
        })
    }

    async fn next(&mut self) -> Next {
        loop {
            let batch = if self.replaying {
                let mut conn = self.state.redis.clone();
                let cursor = self.cursor.to_string();
                match events::read_after(&mut conn, &self.key, &cursor, BATCH).await {
                    Ok(entries) if entries.is_empty() => {
                        self.replaying = false;
                        continue;
                    }
                    Ok(entries) => std::sync::Arc::new(Batch::render(&entries)),
                    Err(e) => {
                        tracing::warn!(error = %e, "event replay failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        return Next::Quiet;
                    }
                }
            } else {
                let received = tokio::select! {
                    biased;
                    received = self.subscription.batches.recv() => Ok(received),
                    () = self.quiet.as_mut() => Err(()),
                };
                match received {
                    Err(()) if self.active_at.elapsed() < QUIET => {
                        self.quiet.as_mut().reset(self.active_at + QUIET);
                        continue;
                    }
                    // Quiet. Before saying so, read Redis once: a feed held up by a slow or
                    // reconnecting Redis must not make a job stream give up on its events.
                    Err(()) => {
                        self.active_at = Instant::now();
                        self.quiet.as_mut().reset(self.active_at + QUIET);
                        let mut conn = self.state.redis.clone();
                        let cursor = self.cursor.to_string();
                        match events::read_after(&mut conn, &self.key, &cursor, BATCH).await {
                            Ok(entries) if !entries.is_empty() => {
                                std::sync::Arc::new(Batch::render(&entries))
                            }
                            _ => return Next::Quiet,
                        }
                    }
                    Ok(Ok(batch)) => match &batch.invalidation {
                        Some(invalidation) => return Next::Invalidated(invalidation.clone()),
                        None => batch,
                    },
                    // Fell behind the shared buffer: catch up from Redis.
                    Ok(Err(RecvError::Lagged(_))) => {
                        self.replaying = true;
                        continue;
                    }
                    // A feed closes only when the server stops (while anyone listens it reads).
                    Ok(Err(RecvError::Closed)) => return Next::End,
                }
            };
            if let Some((bytes, last, terminal)) = batch.after(self.cursor, self.stop_at_terminal) {
                self.cursor = last;
                self.active_at = Instant::now();
                return Next::Frames { bytes, terminal };
            }
        }
    }
}

/// How often an open stream checks that its key (or session) is still live, besides when word
/// of a revocation comes: the backstop for a message lost on the way.
const RECHECK: Duration = Duration::from_secs(5);

/// Ends a stream whose key was revoked or whose session ended.
struct CredentialCheck {
    state: AppState,
    caller: Caller,
    recheck_at: Instant,
}

impl CredentialCheck {
    fn new(state: &AppState, caller: Caller) -> Self {
        Self {
            state: state.clone(),
            caller,
            recheck_at: Instant::now() + RECHECK,
        }
    }

    /// Whether the stream may go on, given what its follower had next.
    async fn still_valid(&mut self, next: &Next) -> bool {
        match next {
            Next::Invalidated(invalidation) if self.caller.ended_by(invalidation) => return false,
            Next::Invalidated(Invalidation::All) => {}
            _ if Instant::now() < self.recheck_at => return true,
            _ => {}
        }
        self.recheck_at = Instant::now() + RECHECK;
        // A check that fails (the database unreachable) leaves the stream open: an outage must
        // not cut off every dashboard at once; the next check decides.
        self.caller.still_valid(&self.state).await.unwrap_or(true)
    }
}

/// Counts an open stream for `/metrics` and per tenant, and logs its opening and closing (the
/// streams are outside the HTTP trace layer; see `crate::router`).
struct OpenStream {
    counters: std::sync::Arc<Counters>,
    _slot: crate::state::TenantSlot,
    stream: String,
    opened: Instant,
}

impl OpenStream {
    /// The stream's place, or a 429 when its tenant holds as many open streams on this process
    /// as it may: each holds memory and a connection, and a pipeline's polls the database.
    fn open(state: &AppState, tenant: Uuid, stream: &str) -> Result<Self, Problem> {
        let most = state.settings.max_streams_per_tenant;
        let slot = state
            .counters
            .sse_by_tenant
            .take(tenant, most)
            .ok_or_else(|| {
                Problem::too_many_requests(format!(
                    "the tenant has {most} event streams open on this server, the most it may \
                     (CONVEYOR_MAX_STREAMS_PER_TENANT); close one first"
                ))
            })?;
        Counters::add(&state.counters.sse_open, 1);
        tracing::debug!(stream, "SSE stream opened");
        Ok(Self {
            counters: state.counters.clone(),
            _slot: slot,
            stream: stream.to_owned(),
            opened: Instant::now(),
        })
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.counters
            .sse_open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(
            stream = self.stream,
            secs = self.opened.elapsed().as_secs_f64(),
            "SSE stream closed"
        );
    }
}

#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "events", params(("id" = uuid::Uuid, Path), Cursor),
    responses((status = 200, content_type = "text/event-stream", description = "the job's events until its terminal one"),
              (status = 429, body = Problem, description = "the tenant holds as many open streams on this server as it may (CONVEYOR_MAX_STREAMS_PER_TENANT)"),
              (status = 404, body = Problem)))]
pub async fn job_events(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Params(query): Params<Cursor>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let id = parse_id(&id, "job")?;
    let tenant = caller.key.tenant;
    let key = state.events.keys().job(tenant, id);
    // Before any read: a stream refused for the tenant's cap costs nothing else.
    let guard = OpenStream::open(&state, tenant, &key)?;
    let job = store::get_job(&state.pool, tenant, id)
        .await?
        .ok_or_else(|| Problem::not_found("job"))?;
    let after = cursor(&headers, &query)?;
    let exists: bool = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut state.redis.clone())
        .await
        .map_err(|e| Problem::unavailable_after("event store unreachable", e))?;
    if !exists && job.status().is_terminal() {
        let events = stream! {
            let _guard = guard;
            yield snapshot(&job);
        };
        return Ok(sse_response(events));
    }
    let mut follower = Follower::start(
        &state,
        tenant,
        Some(id),
        Some(after.as_deref().unwrap_or("0")),
    )
    .await?;
    let pool = state.pool.clone();
    let mut credential_check = CredentialCheck::new(&state, caller);
    let events = stream! {
        let _guard = guard;
        loop {
            let next = follower.next().await;
            if !credential_check.still_valid(&next).await {
                return;
            }
            match next {
                Next::Frames { bytes, terminal } => {
                    yield bytes;
                    if terminal {
                        return;
                    }
                }
                Next::Invalidated(_) => {}
                Next::End => return,
                Next::Quiet => {
                    // If the row is final but its terminal event never came (the event store
                    // was down), end with the row's state. The check reads the status alone:
                    // the row holds a payload of up to a megabyte, and a tenant may hold a
                    // thousand streams open on a job that waits.
                    if let Ok(Some((status, updated_at))) = store::job_state(&pool, tenant, id).await {
                        let settled = chrono::Utc::now() - updated_at
                            > chrono::Duration::from_std(QUIET).unwrap_or_default();
                        if status.is_terminal() && settled {
                            // Ended with the row's state; a read that fails is tried again
                            // at the next quiet spell.
                            match store::get_job(&pool, tenant, id).await {
                                Ok(Some(job)) => {
                                    yield snapshot(&job);
                                    return;
                                }
                                Ok(None) => return,
                                Err(_) => {}
                            }
                        }
                    }
                    yield Bytes::from_static(KEEP_ALIVE);
                }
            }
        }
    };
    Ok(sse_response(events))
}

#[utoipa::path(get, path = "/v1/events", tag = "events", params(Cursor),
    responses((status = 200, content_type = "text/event-stream", description = "every event of the tenant's jobs, live"),
              (status = 429, body = Problem, description = "the tenant holds as many open streams on this server as it may (CONVEYOR_MAX_STREAMS_PER_TENANT)")))]
pub async fn tenant_events(
    State(state): State<AppState>,
    caller: Caller,
    Params(query): Params<Cursor>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let after = cursor(&headers, &query)?;
    let tenant = caller.key.tenant;
    let key = state.events.keys().tenant(tenant);
    let guard = OpenStream::open(&state, tenant, &key)?;
    let mut follower = Follower::start(&state, tenant, None, after.as_deref()).await?;
    let mut credential_check = CredentialCheck::new(&state, caller);
    let events = stream! {
        let _guard = guard;
        loop {
            let next = follower.next().await;
            if !credential_check.still_valid(&next).await {
                return;
            }
            match next {
                Next::Frames { bytes, .. } => yield bytes,
                Next::Quiet => yield Bytes::from_static(KEEP_ALIVE),
                Next::Invalidated(_) => {}
                Next::End => return,
            }
        }
    };
    Ok(sse_response(events))
}

/// How often a pipeline's stream looks at the pipeline when no event of its comes.
const PIPELINE_CHECK: Duration = Duration::from_secs(1);
/// How long an ended pipeline's stream waits for its steps' last events before it ends.
const SETTLE: Duration = Duration::from_secs(2);

/// Follows a pipeline's steps: their past events from their own streams ([`Replay`]), then
/// live in their tenant's stream, where a job is known by the pipeline's row or by its
/// `queued` event (which names the pipeline).
struct PipelineFollower {
    state: AppState,
    pipeline: Uuid,
    key: String,
    /// The tenant stream's cursor, once the replay is done.
    cursor: String,
    replay: Option<Replay>,
    jobs: std::collections::HashSet<Uuid>,
    /// The jobs whose terminal event this stream has sent (until they are retried).
    ended: std::collections::HashSet<Uuid>,
}

/// A pipeline's past events, read from its steps' job streams (each holds its job's events
/// under the tenant stream's ids) in the ids' order, up to where the live read begins. The
/// tenant stream holds every other job's events too: a replay from it read up to its whole
/// length for a pipeline's few.
struct Replay {
    sources: Vec<ReplaySource>,
    until: String,
}

struct ReplaySource {
    key: String,
    cursor: String,
    read: std::collections::VecDeque<events::StreamEntry>,
    done: bool,
}

impl Replay {
    /// The next entries in order, at most [`BATCH`]. The steps' streams are read ahead a
    /// share of a batch each, so that a stream holds about a batch however many steps its
    /// pipeline has.
    async fn next(
        &mut self,
        conn: &mut shared::redis_conn::RedisConn,
    ) -> redis::RedisResult<Vec<events::StreamEntry>> {
        let ahead = (BATCH / self.sources.len().max(1)).max(16);
        let mut batch = Vec::new();
        while batch.len() < BATCH {
            for source in &mut self.sources {
                if source.read.is_empty() && !source.done {
                    let read =
                        events::read_between(conn, &source.key, &source.cursor, &self.until, ahead)
                            .await;
                    // What was taken goes out; the error comes again at the next call.
                    let entries = match read {
                        Ok(entries) => entries,
                        Err(_) if !batch.is_empty() => return Ok(batch),
                        Err(e) => return Err(e),
                    };
                    // Done once a read finds nothing: a page short of what was asked may be
                    // one whose entries did not all decode.
                    source.done = entries.is_empty();
                    if let Some(last) = entries.last() {
                        source.cursor = last.id.clone();
                    }
                    source.read.extend(entries);
                }
            }
            let first = self
                .sources
                .iter_mut()
                .filter_map(|s| Some((EntryId::parse(&s.read.front()?.id).unwrap_or_default(), s)))
                .min_by_key(|(id, _)| *id);
            let Some((_, source)) = first else { break };
            batch.extend(source.read.pop_front());
        }
        Ok(batch)
    }

    /// Every step's stream read to its end and sent.
    fn done(&self) -> bool {
        self.sources.iter().all(|s| s.done && s.read.is_empty())
    }
}

impl PipelineFollower {
    /// SSE frames of the pipeline's events after the cursor (none: nothing new), whether one
    /// of them ended a job, and whether more may be read at once. One batch a call, so that
    /// a client that does not read holds the stream back.
    async fn read(&mut self) -> (Option<Bytes>, bool, bool) {
        let mut conn = self.state.redis.clone();
        let (entries, more) = match &mut self.replay {
            Some(replay) => match replay.next(&mut conn).await {
                Ok(entries) => {
                    // Live from the later of where the replay ended and where it was to end
                    // (an empty tenant stream, lost with Redis: it ends at the last entry).
                    if let Some(last) = entries.last().and_then(|e| EntryId::parse(&e.id)) {
                        if EntryId::parse(&self.cursor).is_none_or(|live| last > live) {
                            self.cursor = last.to_string();
                        }
                    }
                    if replay.done() {
                        self.replay = None;
                    }
                    (entries, true)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pipeline event replay failed; retrying");
                    return (None, false, false);
                }
            },
            None => match events::read_after(&mut conn, &self.key, &self.cursor, BATCH).await {
                Ok(entries) => {
                    if let Some(last) = entries.last() {
                        self.cursor = last.id.clone();
                    }
                    let more = entries.len() == BATCH;
                    (entries, more)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pipeline event read failed; retrying");
                    return (None, false, false);
                }
            },
        };
        let mut mine = Vec::new();
        let mut terminal = false;
        for entry in entries {
            let event = &entry.event;
            let names_us = event.event_type == EventType::Queued
                && event
                    .data
                    .as_ref()
                    .and_then(|d| d.get("pipeline_id"))
                    .and_then(|p| p.as_str())
                    == Some(self.pipeline.to_string().as_str());
            if names_us {
                self.jobs.insert(event.job_id);
            }
            if !self.jobs.contains(&event.job_id) {
                continue;
            }
            if event.event_type.is_terminal() {
                self.ended.insert(event.job_id);
                terminal = true;
            } else if event.event_type == EventType::Queued {
                self.ended.remove(&event.job_id);
            }
            mine.push(entry);
        }
        let frames = (!mine.is_empty()).then(|| Batch::render(&mine).bytes);
        (frames, terminal, more)
    }
}

/// The stream's last event: the pipeline, its outcome and steps.
fn pipeline_finished(pipeline: &shared::pipelines::Pipeline) -> Bytes {
    let data = serde_json::to_string(pipeline).unwrap_or_default();
    Bytes::from(format!("event: pipeline.finished\ndata: {data}\n\n"))
}

#[utoipa::path(get, path = "/v1/pipelines/{id}/events", tag = "events",
    params(("id" = uuid::Uuid, Path), Cursor),
    responses((status = 200, content_type = "text/event-stream", description = "every event of the pipeline's steps' jobs since it was submitted (or after the cursor), then one `pipeline.finished` event carrying the pipeline (its `status` and steps) once it has ended"),
              (status = 429, body = Problem, description = "the tenant holds as many open streams on this server as it may (CONVEYOR_MAX_STREAMS_PER_TENANT)"),
              (status = 404, body = Problem)))]
pub async fn pipeline_events(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Params(query): Params<Cursor>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let id = parse_id(&id, "pipeline")?;
    let tenant = caller.key.tenant;
    let key = state.events.keys().tenant(tenant);
    // Before any read: a stream refused for the tenant's cap costs nothing else.
    let guard = OpenStream::open(&state, tenant, &format!("{key}:pipeline:{id}"))?;
    // Where the live read begins, before the steps are read: a step's job made after this
    // read announces itself there with its `queued` event.
    let live_from = last_id(&mut state.redis.clone(), &key)
        .await
        .map_err(|e| Problem::unavailable_after("event store unreachable", e))?;
    let mut conn = state.pool.acquire().await?;
    let pipeline = shared::pipelines::get(&mut conn, tenant, id)
        .await?
        .ok_or_else(|| Problem::not_found("pipeline"))?;
    drop(conn);
    let after = cursor(&headers, &query)?;
    let jobs: std::collections::HashSet<Uuid> =
        pipeline.steps.iter().filter_map(|s| s.job_id).collect();
    let replay = Replay {
        sources: jobs
            .iter()
            .map(|job| ReplaySource {
                key: state.events.keys().job(tenant, *job),
                cursor: after.clone().unwrap_or_else(|| "0".to_owned()),
                read: Default::default(),
                done: false,
            })
            .collect(),
        until: match live_from.as_str() {
            "0-0" => "+".to_owned(),
            last => last.to_owned(),
        },
    };
    let live_from = match after.as_deref().and_then(EntryId::parse) {
        Some(after) if EntryId::parse(&live_from).is_some_and(|from| after > from) => {
            after.to_string()
        }
        _ => live_from,
    };
    let mut subscription = state.hub.subscribe(&key, None);
    tokio::time::timeout(QUIET * 2, subscription.ready())
        .await
        .map_err(|_| Problem::unavailable("event store unreachable"))?;
    let mut follower = PipelineFollower {
        state: state.clone(),
        pipeline: id,
        key,
        cursor: live_from,
        replay: Some(replay),
        jobs,
        ended: Default::default(),
    };
    let mut credential_check = CredentialCheck::new(&state, caller);
    let pool = state.pool.clone();
    let events = stream! {
        let _guard = guard;
        let mut sent_at = Instant::now();
        let mut ended_at: Option<Instant> = None;
        // Whether to read the row: at first, after a terminal event, after a quiet second,
        // and a second after the last read (a step's event may come before its pipeline's
        // row ends, and a busy tenant's stream is never quiet).
        let mut look = true;
        let mut looked_at = Instant::now();
        loop {
            let (frames, terminal, more) = follower.read().await;
            if let Some(bytes) = frames {
                sent_at = Instant::now();
                yield bytes;
            }
            look |= terminal || looked_at.elapsed() >= PIPELINE_CHECK;
            // The row decides the end, once what there was to read is read; a step's last
            // events may trail it for a moment.
            if !more && (look || ended_at.is_some()) {
                look = false;
                looked_at = Instant::now();
                let Ok(mut conn) = pool.acquire().await else { return };
                match shared::pipelines::progress(&mut conn, tenant, id).await {
                    Ok(Some((true, jobs))) => {
                        let since = *ended_at.get_or_insert_with(Instant::now);
                        let settled = jobs.iter().all(|job| follower.ended.contains(job));
                        if settled || since.elapsed() >= SETTLE {
                            if let Ok(Some(pipeline)) =
                                shared::pipelines::get(&mut conn, tenant, id).await
                            {
                                yield pipeline_finished(&pipeline);
                            }
                            return;
                        }
                    }
                    Ok(Some((false, _))) => ended_at = None,
                    _ => {}
                }
            }
            let next = if more {
                Next::Frames { bytes: Bytes::new(), terminal: false }
            } else { tokio::select! {
                biased;
                received = subscription.batches.recv() => match received {
                    Ok(batch) => match &batch.invalidation {
                        Some(invalidation) => Next::Invalidated(invalidation.clone()),
                        None => Next::Frames { bytes: Bytes::new(), terminal: false },
                    },
                    Err(RecvError::Lagged(_)) => Next::Frames { bytes: Bytes::new(), terminal: false },
                    Err(RecvError::Closed) => Next::End,
                },
                () = tokio::time::sleep(PIPELINE_CHECK) => Next::Quiet,
            }};
            if !credential_check.still_valid(&next).await {
                return;
            }
            match next {
                Next::End => return,
                Next::Quiet => look = true,
                _ => {}
            }
            // Other jobs' events wake the stream too, and send nothing of the pipeline's.
            if sent_at.elapsed() >= QUIET {
                sent_at = Instant::now();
                yield Bytes::from_static(KEEP_ALIVE);
            }
        }
    };
    Ok(sse_response(events))
}
