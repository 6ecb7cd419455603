//! Bulk actions: cancel or retry every job of the tenant matching a filter, up to 10,000 per
//! request (`more` says whether to send it again). A retry draws a submission rate token for
//! each job it queues again.

use axum::{
    extract::State,
    response::{IntoResponse, Response},
    Json,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use shared::{
    events::{Event, EventType},
    store::{self, BulkChange, Changed, JobFilter},
    FieldError, JobStatus, Problem,
};
use std::collections::BTreeSet;
use utoipa::ToSchema;

use crate::{
    audit::{self, Action, Actor},
    auth::Writer,
    extract::JsonBody,
    AppState,
};

/// Most jobs one bulk request changes.
const MAX_BULK: i64 = 10_000;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkFilter {
    /// Statuses to take; default: every status the action applies to.
    #[serde(default)]
    pub status: Vec<JobStatus>,
    pub kind: Option<String>,
    /// Only the steps of this pipeline of the tenant's (404 for any other).
    pub pipeline_id: Option<uuid::Uuid>,
    /// The most jobs to change, oldest first: 1-10,000 (the default).
    pub limit: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct BulkResult {
    /// Jobs changed by this request.
    pub count: usize,
    /// Whether the request changed as many as one request may: send it again for the rest.
    pub more: bool,
}

/// The filter and the request's limit, its statuses limited to those `allowed` (422 naming
/// `status` otherwise), its pipeline the tenant's own (404 otherwise).
async fn filter(
    state: &AppState,
    tenant: uuid::Uuid,
    body: BulkFilter,
    allowed: &[JobStatus],
) -> Result<(JobFilter, i64), Problem> {
    if let Some(pipeline) = body.pipeline_id {
        let mut db = state.pool.acquire().await?;
        shared::pipelines::get(&mut db, tenant, pipeline)
            .await?
            .ok_or_else(|| Problem::not_found("pipeline"))?;
    }
    let mut errors = Vec::new();
    for status in &body.status {
        if !allowed.contains(status) {
            errors.push(FieldError::new(
                "status",
                format!("{status} jobs cannot be taken by this action"),
            ));
        }
    }
    if let Some(kind) = &body.kind {
        if !state.contracts.kinds().any(|k| k == kind) {
            errors.push(FieldError::new("kind", format!("unknown kind {kind:?}")));
        }
    }
    let limit = body.limit.unwrap_or(MAX_BULK);
    if !(1..=MAX_BULK).contains(&limit) {
        errors.push(FieldError::new(
            "limit",
            format!("must be between 1 and {MAX_BULK}"),
        ));
    }
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }
    let filter = JobFilter {
        statuses: if body.status.is_empty() {
            allowed.to_vec()
        } else {
            body.status
        },
        kind: body.kind,
        pipeline_id: body.pipeline_id,
    };
    Ok((filter, limit))
}

#[utoipa::path(post, path = "/v1/jobs/cancel", tag = "jobs", request_body = BulkFilter,
    responses((status = 200, body = BulkResult), (status = 422, body = Problem)))]
pub async fn cancel(
    State(state): State<AppState>,
    writer: Writer,
    JsonBody(body): JsonBody<BulkFilter>,
) -> Result<Json<BulkResult>, Problem> {
    use JobStatus::*;
    let tenant = writer.tenant().0;
    let (filter, limit) = filter(
        &state,
        tenant,
        body,
        &[Scheduled, Queued, Retrying, Running],
    )
    .await?;
    let jobs = apply(&state, &writer, &filter, Apply::Cancel, limit)
        .await?
        .0;
    let (stopped, running): (Vec<&Changed>, Vec<&Changed>) = jobs
        .iter()
        .partition(|j| j.status() == JobStatus::Cancelled);
    let events: Vec<_> = stopped
        .iter()
        .map(|j| {
            let event = Event::new(j.id, &j.kind, EventType::Cancelled, j.status(), j.progress);
            (tenant, event)
        })
        .collect();
    if let Err(e) = state.events.append(&events).await {
        tracing::warn!(error = %e, "cancel events not appended");
    }
    for job in running {
        if let Err(e) = state.queues.announce_cancel(job.id).await {
            // Its worker's next heartbeat still sees the request.
            tracing::warn!(error = %e, "cancel not announced");
            break;
        }
    }
    // Their pipelines move on now (dependents cancelled), not at the duty's next pass.
    let pipelines: BTreeSet<uuid::Uuid> = stopped.iter().filter_map(|j| j.pipeline_id).collect();
    for pipeline in pipelines {
        crate::routes::pipelines::move_on_alone(&state, tenant, pipeline).await;
    }
    Ok(Json(BulkResult {
        count: jobs.len(),
        more: jobs.len() as i64 >= limit,
    }))
}

#[utoipa::path(post, path = "/v1/jobs/retry", tag = "jobs", request_body = BulkFilter,
    responses((status = 200, body = BulkResult), (status = 422, body = Problem),
              (status = 403, body = Problem, description = "a quota of the tenant would be exceeded (`max_queued`, or one on what the matching jobs' kinds add)"),
              (status = 429, body = Problem, description = "the submission rate, a token a job, cannot cover the jobs matched: wait, or pass a smaller `limit`")))]
pub async fn retry(
    State(state): State<AppState>,
    writer: Writer,
    JsonBody(body): JsonBody<BulkFilter>,
) -> Result<Response, Problem> {
    let tenant = writer.tenant().0;
    let (filter, limit) = filter(
        &state,
        tenant,
        body,
        &[JobStatus::Failed, JobStatus::Cancelled],
    )
    .await?;
    // Jobs retried are queued again, as submitted ones are: no more than the tenant's
    // `max_queued` leaves room for, a rate token each, and the quotas on what their kinds
    // add. Counted before the change, which takes only the jobs counted; no more than the
    // rate's burst (more could never be admitted: send again while `more`).
    let mut room = state.limits.requeue_room(tenant, limit).await?;
    if let Some(burst) = state.limits.burst(tenant, writer.0.key.id).await? {
        room = room.min(i64::from(burst));
    }
    let matching =
        store::count_matching(&state.pool, tenant, &filter, BulkChange::Retry, room).await?;
    let matched: Vec<&str> = matching.iter().map(|m| m.kind.as_str()).collect();
    state.limits.check_output_quotas(tenant, &matched).await?;
    let counted: Vec<uuid::Uuid> = matching.iter().flat_map(|m| m.ids.clone()).collect();
    // Steps of their pipelines that the retry sets waiting again count as submitted ones: the
    // retried jobs and they must all fit under `max_queued`.
    let pipelines: BTreeSet<uuid::Uuid> = matching
        .iter()
        .flat_map(|m| m.pipelines.iter().copied())
        .collect();
    let pipelines: Vec<uuid::Uuid> = pipelines.into_iter().collect();
    let reopened = shared::pipelines::reopened(&state.pool, tenant, &pipelines).await?;
    if !reopened.is_empty() {
        let jobs = matching
            .iter()
            .flat_map(|m| std::iter::repeat_n(m.kind.as_str(), m.ids.len()));
        let all: Vec<&str> = jobs
            .chain(reopened.iter().map(|(_, kind)| kind.as_str()))
            .collect();
        state.limits.check_quotas(tenant, &all).await?;
    }
    if !counted.is_empty() {
        let admitted = state.limits.admit(tenant, writer.0.key.id, counted.len());
        if let Err(refused) = admitted.await {
            return Ok(refused);
        }
    }
    let retry = Apply::Retry {
        only: &counted,
        pipelines: &pipelines,
        reopened: reopened.len(),
    };
    let (jobs, started) = apply(&state, &writer, &filter, retry, room).await?;
    let events: Vec<_> = jobs
        .iter()
        .map(|j| {
            let event = Event::new(j.id, &j.kind, EventType::Queued, JobStatus::Queued, 0.0)
                .message(Some("retried".into()))
                .attempt(j.attempt + 1);
            (tenant, event)
        })
        .collect();
    if let Err(e) = state.events.append(&events).await {
        tracing::warn!(error = %e, "retry events not appended");
    }
    for kind in kinds(&jobs.iter().collect::<Vec<_>>()) {
        state.refill.request(kind);
    }
    crate::routes::jobs::announce_created(&state, tenant, &started).await;
    let result = BulkResult {
        count: jobs.len(),
        more: jobs.len() as i64 >= room,
    };
    Ok(Json(result).into_response())
}

/// What [`apply`] does: a cancel, or a retry of the jobs counted (`only`), whose pipelines
/// (`pipelines`) resume and set `reopened` steps waiting again.
enum Apply<'a> {
    Cancel,
    Retry {
        only: &'a [uuid::Uuid],
        pipelines: &'a [uuid::Uuid],
        reopened: usize,
    },
}

/// Changes up to `limit` of the matching jobs and writes their audit rows in one transaction;
/// returns them, and the jobs their pipelines started. A retry resumes the pipelines of the
/// steps it retried in the same transaction, their locks taken first, as every change of a
/// pipeline takes them: a cancel of one waits for the retry, resumption included, and is not
/// undone by it. Before them, a retry locks the tenant and counts `max_queued` again where the
/// jobs are queued (as submissions do): bulk retries racing each other each took the room
/// counted before.
async fn apply(
    state: &AppState,
    writer: &Writer,
    filter: &JobFilter,
    change: Apply<'_>,
    limit: i64,
) -> Result<(Vec<Changed>, Vec<shared::Job>), Problem> {
    let tenant = writer.tenant().0;
    let mut tx = state.pool.begin().await?;
    let (change, action, limit, only, pipelines) = match change {
        Apply::Cancel => (BulkChange::Cancel, Action::JobCancel, limit, None, &[][..]),
        Apply::Retry { only: [], .. } => return Ok(Default::default()),
        Apply::Retry {
            only,
            pipelines,
            reopened,
        } => {
            let limits = &state.limits;
            let limit = limits
                .hold_requeue_room(&mut tx, tenant, limit, reopened)
                .await?;
            (
                BulkChange::Retry,
                Action::JobRetry,
                limit,
                Some(only),
                pipelines,
            )
        }
    };
    if limit == 0 {
        return Ok(Default::default());
    }
    if !pipelines.is_empty() {
        sqlx::query(
            "SELECT 1 FROM pipelines WHERE tenant_id = $1 AND id = ANY($2) ORDER BY id FOR UPDATE",
        )
        .bind(tenant)
        .bind(pipelines)
        .execute(&mut *tx)
        .await?;
    }
    let jobs = store::change_matching(&mut *tx, tenant, filter, change, limit, only).await?;
    let ids: Vec<_> = jobs.iter().map(|j| j.id).collect();
    let actor = Actor::from(&writer.0);
    audit::jobs_changed(&mut *tx, &actor, action, &ids, json!({"bulk": true})).await?;
    let mut started = Vec::new();
    if matches!(change, BulkChange::Retry) {
        let resumed: BTreeSet<uuid::Uuid> = jobs.iter().filter_map(|j| j.pipeline_id).collect();
        for pipeline in resumed {
            let advanced = crate::routes::pipelines::resume(state, &mut tx, pipeline).await?;
            started.extend(advanced.jobs);
        }
    }
    tx.commit().await?;
    Ok((jobs, started))
}

fn kinds<'a>(jobs: &[&'a Changed]) -> BTreeSet<&'a str> {
    jobs.iter().map(|j| j.kind.as_str()).collect()
}
