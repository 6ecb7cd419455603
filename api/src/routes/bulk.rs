//! Bulk actions: cancel or retry every job of the tenant matching a filter, up to 10,000 per
//! request (`more` says whether to send it again).

use axum::{extract::State, Json};
use serde::{Deserialize, Serialize};
use serde_json::json;
use shared::{
    events::{Event, EventType},
    store::{self, BulkChange, JobFilter},
    FieldError, Job, JobStatus, Problem,
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
}

#[derive(Serialize, ToSchema)]
pub struct BulkResult {
    /// Jobs changed by this request.
    pub count: usize,
    /// Whether the request changed as many as one request may: send it again for the rest.
    pub more: bool,
}

/// The filter, its statuses limited to those `allowed` (422 naming `status` otherwise), its
/// pipeline the tenant's own (404 otherwise).
async fn filter(
    state: &AppState,
    tenant: uuid::Uuid,
    body: BulkFilter,
    allowed: &[JobStatus],
) -> Result<JobFilter, Problem> {
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
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }
    Ok(JobFilter {
        statuses: if body.status.is_empty() {
            allowed.to_vec()
        } else {
            body.status
        },
        kind: body.kind,
        pipeline_id: body.pipeline_id,
    })
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
    let filter = filter(
        &state,
        tenant,
        body,
        &[Scheduled, Queued, Retrying, Running],
    )
    .await?;
    let (jobs, more) = apply(&state, &writer, &filter, BulkChange::Cancel).await?;
    let (stopped, running): (Vec<&Job>, Vec<&Job>) = jobs
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
        crate::routes::pipelines::move_on_alone(&state, tenant, pipeline, false).await;
    }
    Ok(Json(BulkResult {
        count: jobs.len(),
        more,
    }))
}

#[utoipa::path(post, path = "/v1/jobs/retry", tag = "jobs", request_body = BulkFilter,
    responses((status = 200, body = BulkResult), (status = 422, body = Problem)))]
pub async fn retry(
    State(state): State<AppState>,
    writer: Writer,
    JsonBody(body): JsonBody<BulkFilter>,
) -> Result<Json<BulkResult>, Problem> {
    let tenant = writer.tenant().0;
    let filter = filter(
        &state,
        tenant,
        body,
        &[JobStatus::Failed, JobStatus::Cancelled],
    )
    .await?;
    let (jobs, more) = apply(&state, &writer, &filter, BulkChange::Retry).await?;
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
    // Retried steps resume their pipelines.
    let pipelines: BTreeSet<uuid::Uuid> = jobs.iter().filter_map(|j| j.pipeline_id).collect();
    for pipeline in pipelines {
        crate::routes::pipelines::move_on_alone(&state, tenant, pipeline, true).await;
    }
    Ok(Json(BulkResult {
        count: jobs.len(),
        more,
    }))
}

/// Changes the matching jobs and writes their audit rows in one transaction; returns them,
/// and whether more may be left (a request that changed its limit's worth).
async fn apply(
    state: &AppState,
    writer: &Writer,
    filter: &JobFilter,
    change: BulkChange,
) -> Result<(Vec<Job>, bool), Problem> {
    let action = match change {
        BulkChange::Cancel => Action::JobCancel,
        BulkChange::Retry => Action::JobRetry,
    };
    // Jobs retried are queued again: no more than the tenant's `max_queued` leaves room for.
    let limit = match change {
        BulkChange::Cancel => MAX_BULK,
        BulkChange::Retry => {
            // What the retried imports and ingests add is held to its quotas too: a tenant
            // past one retries other kinds by naming them.
            let kinds = match &filter.kind {
                Some(kind) => vec![kind.as_str()],
                None => vec!["import", "ingest"],
            };
            let tenant = writer.tenant().0;
            state.limits.check_output_quotas(tenant, &kinds).await?;
            state.limits.requeue_room(tenant, MAX_BULK).await?
        }
    };
    let mut tx = state.pool.begin().await?;
    let jobs = store::change_matching(&mut *tx, writer.tenant().0, filter, change, limit).await?;
    let ids: Vec<_> = jobs.iter().map(|j| j.id).collect();
    let actor = Actor::from(&writer.0);
    audit::jobs_changed(&mut *tx, &actor, action, &ids, json!({"bulk": true})).await?;
    tx.commit().await?;
    let more = jobs.len() as i64 >= limit;
    Ok((jobs, more))
}

fn kinds<'a>(jobs: &[&'a Job]) -> BTreeSet<&'a str> {
    jobs.iter().map(|j| j.kind.as_str()).collect()
}
