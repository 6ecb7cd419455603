//! Submit, read, list, cancel and retry jobs.

use crate::extract::Params;
use crate::routes::page;
use crate::routes::parse_id;
use axum::{
    extract::{Path, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use shared::{
    events::{Event, EventType},
    model::{self, SubmitJob},
    problem::MAX_FIELD_ERRORS,
    store::{self, NewJob},
    FieldError, Job, JobStatus, Problem,
};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    audit::{Action, Entry},
    auth::{Tenant, Writer},
    extract::HashedJson,
    routes::pipelines,
    state::Counters,
    AppState,
};
use contracts::{Refusal, Valid};

pub const MAX_BATCH: usize = 1000;

/// Validates one submission; errors are named under `prefix` (empty for a single job).
pub(crate) fn validate(
    state: &AppState,
    job: SubmitJob,
    prefix: &str,
) -> Result<(NewJob, Valid), Vec<FieldError>> {
    let field = |name: &str| format!("{prefix}{name}");
    let mut errors = Vec::new();
    let payload = if job.payload.is_null() {
        json!({})
    } else {
        job.payload
    };
    let valid = match state.contracts.validate(&job.kind, &payload) {
        Ok(valid) => Some(valid),
        Err(kind_errors) => {
            errors.extend(
                kind_errors
                    .into_iter()
                    .map(|e| FieldError::new(field(&e.field), e.message)),
            );
            None
        }
    };
    let max_attempts = job.max_attempts.unwrap_or(model::DEFAULT_MAX_ATTEMPTS);
    if !(1..=model::MAX_ATTEMPTS_LIMIT).contains(&max_attempts) {
        errors.push(FieldError::new(
            field("max_attempts"),
            format!("must be between 1 and {}", model::MAX_ATTEMPTS_LIMIT),
        ));
    }
    if let Some(key) = &job.idempotency_key {
        if key.is_empty() || key.len() > model::IDEMPOTENCY_KEY_MAX {
            errors.push(FieldError::new(
                field("idempotency_key"),
                format!("must be 1-{} characters", model::IDEMPOTENCY_KEY_MAX),
            ));
        }
    }
    if let Some(at) = job.run_at {
        if !(model::RUN_AT_EARLIEST..=model::RUN_AT_LATEST).contains(&at.timestamp()) {
            errors.push(FieldError::new(
                field("run_at"),
                "must be between 1970-01-01 and 9999-12-31",
            ));
        }
    }
    let Some(valid) = valid.filter(|_| errors.is_empty()) else {
        return Err(errors);
    };
    let job = NewJob {
        id: Uuid::now_v7(),
        kind: job.kind,
        // As parsed, not as sent: see `Valid::stored`.
        payload: valid.stored().clone(),
        idempotency_key: job.idempotency_key,
        priority: job.priority.unwrap_or(0),
        max_attempts,
        run_at: job.run_at,
    };
    Ok((job, valid))
}

/// Writes the rows and their audit rows, then announces the new ones (see [`announce_created`]).
async fn accept(
    state: &AppState,
    writer: &Writer,
    jobs: Vec<NewJob>,
    payload_sha256: &str,
    batch: bool,
) -> Result<Vec<store::Inserted>, Problem> {
    let tenant = writer.tenant();
    let submission = store::Submission {
        request_id: writer.0.request_id.as_deref(),
        payload_sha256,
        batch,
    };
    let key = writer.0.key.id;
    let inserted = match state.limits.of(tenant.0).await?.max_queued {
        Some(max_queued) => {
            let kinds: Vec<&str> = jobs.iter().map(|j| j.kind.as_str()).collect();
            let mut tx = state.pool.begin().await?;
            crate::limits::hold_queued_room(&mut tx, tenant.0, max_queued, &kinds).await?;
            let inserted =
                store::insert_jobs(&mut tx, tenant.0, key, &jobs, Some(&submission)).await?;
            tx.commit().await?;
            inserted
        }
        // No count to hold: one statement, no transaction of its own.
        None => {
            let mut conn = state.pool.acquire().await?;
            store::insert_jobs(&mut conn, tenant.0, key, &jobs, Some(&submission)).await?
        }
    };
    let created = inserted.iter().filter(|i| i.created).map(|i| &i.job);
    announce_created(state, tenant.0, created).await;
    Ok(inserted)
}

/// Announces jobs just created (`queued` events), then each kind with new queued jobs to the
/// workers, which claim them by fair share across tenants. A failed announcement loses
/// nothing: the rows are durable and the workers claim at their idle poll.
pub(crate) async fn announce_created<'a>(
    state: &AppState,
    tenant: Uuid,
    created: impl IntoIterator<Item = &'a Job>,
) {
    let created: Vec<&Job> = created.into_iter().collect();
    Counters::add(&state.counters.submitted, created.len() as u64);
    let events: Vec<_> = created.iter().map(|j| (tenant, Event::queued(j))).collect();
    // A worker may claim a job before this append: the append then drops its stale `queued`
    // (see `Event::order`).
    if let Err(e) = state.events.append(&events).await {
        tracing::warn!(error = %e, "queued events not appended");
    }
    let kinds: std::collections::BTreeSet<&str> = created
        .iter()
        .filter(|j| j.status() == JobStatus::Queued)
        .map(|j| j.kind.as_str())
        .collect();
    for kind in kinds {
        state.refill.request(kind);
    }
}

#[utoipa::path(post, path = "/v1/jobs", request_body = SubmitJob, tag = "jobs",
    responses((status = 202, body = Job, description = "accepted"),
              (status = 200, body = Job, description = "an existing job with the same idempotency key"),
              (status = 413, body = Problem), (status = 422, body = Problem),
              (status = 429, body = Problem, description = "over the tenant's submission rate (Retry-After, RateLimit headers)")))]
pub async fn submit(
    State(state): State<AppState>,
    writer: Writer,
    HashedJson(body, body_sha256): HashedJson<SubmitJob>,
) -> Result<Response, Problem> {
    let tenant = writer.tenant();
    let (job, valid) = validate(&state, body, "").map_err(Problem::validation)?;
    let rate = match state.limits.admit(tenant.0, writer.0.key.id, 1).await {
        Ok(headers) => headers,
        Err(refused) => return Ok(refused),
    };
    state.limits.check_quotas(tenant.0, &[&job.kind]).await?;
    state
        .contracts
        .preflight(&state.context, tenant.0, &valid)
        .await
        .map_err(crate::refusals::problem)?;
    let inserted = accept(&state, &writer, vec![job], &body_sha256, false).await?;
    let row = inserted
        .into_iter()
        .next()
        .ok_or_else(|| Problem::internal("insert returned no row"))?;
    let status = if row.created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let location = format!("/v1/jobs/{}", row.job.id);
    Ok((status, rate, [(header::LOCATION, location)], Json(row.job)).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitBatch {
    /// 1 to 1,000 jobs, accepted or refused together.
    pub jobs: Vec<SubmitJob>,
}

#[derive(Serialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<Job>,
    /// Pass as `cursor` for the next page; null on the last page. A page may hold fewer jobs
    /// than `limit`, or none, and not be the last: a filtered list reads a bounded stretch of
    /// the tenant's jobs a request.
    pub next_cursor: Option<Uuid>,
}

#[utoipa::path(post, path = "/v1/jobs/batch", request_body = SubmitBatch, tag = "jobs",
    responses((status = 202, body = JobList), (status = 413, body = Problem), (status = 422, body = Problem),
              (status = 429, body = Problem, description = "over the tenant's submission rate; each job counts")))]
pub async fn submit_batch(
    State(state): State<AppState>,
    writer: Writer,
    HashedJson(body, body_sha256): HashedJson<SubmitBatch>,
) -> Result<Response, Problem> {
    let tenant = writer.tenant();
    if body.jobs.is_empty() || body.jobs.len() > MAX_BATCH {
        return Err(Problem::validation(vec![FieldError::new(
            "jobs",
            format!("must hold 1 to {MAX_BATCH} jobs, not {}", body.jobs.len()),
        )]));
    }
    let mut errors = Vec::new();
    let mut jobs = Vec::with_capacity(body.jobs.len());
    let mut valid = Vec::with_capacity(body.jobs.len());
    let mut keys = std::collections::HashSet::new();
    for (i, job) in body.jobs.into_iter().enumerate() {
        if let Some(key) = &job.idempotency_key {
            if !keys.insert(key.clone()) {
                errors.push(FieldError::new(
                    format!("jobs[{i}].idempotency_key"),
                    "repeats a key used earlier in this batch",
                ));
            }
        }
        match validate(&state, job, &format!("jobs[{i}].")) {
            Ok((job, payload)) => {
                jobs.push(job);
                valid.push(payload);
            }
            Err(e) => errors.extend(e),
        }
    }
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }
    // A batch draws one token per job.
    let rate = match state
        .limits
        .admit(tenant.0, writer.0.key.id, jobs.len())
        .await
    {
        Ok(headers) => headers,
        Err(refused) => return Ok(refused),
    };
    let kinds: Vec<&str> = jobs.iter().map(|j| j.kind.as_str()).collect();
    state.limits.check_quotas(tenant.0, &kinds).await?;
    let indexed: Vec<(usize, &Valid)> = valid.iter().enumerate().collect();
    preflight_batch(&state, tenant, "jobs", &indexed).await?;
    let inserted = accept(&state, &writer, jobs, &body_sha256, true).await?;
    let jobs = inserted.into_iter().map(|i| i.job).collect();
    Ok((
        StatusCode::ACCEPTED,
        rate,
        Json(JobList {
            jobs,
            next_cursor: None,
        }),
    )
        .into_response())
}

/// Preflights every job of a batch (or step of a pipeline), one at a time (each within the
/// tenant's preflight bounds). A refusal names the job's index under `list` (`jobs[2]`); a
/// missing dataset or connection (404), or a preflight that could not run (429, 503), wins
/// over field errors.
pub(crate) async fn preflight_batch(
    state: &AppState,
    tenant: Tenant,
    list: &str,
    jobs: &[(usize, &Valid)],
) -> Result<(), Problem> {
    let mut errors: Vec<FieldError> = Vec::new();
    for &(i, valid) in jobs {
        match state
            .contracts
            .preflight(&state.context, tenant.0, valid)
            .await
        {
            Ok(()) => {}
            // Past what a 422 shows, more are not kept (each job's may be a hundred); the rest
            // are still preflighted for a refusal that wins.
            Err(Refusal::Invalid(refused)) => errors.extend(
                refused
                    .into_iter()
                    .take(MAX_FIELD_ERRORS.saturating_sub(errors.len()))
                    .map(|e| FieldError::new(format!("{list}[{i}].{}", e.field), e.message)),
            ),
            Err(fatal) => {
                let mut problem = crate::refusals::problem(fatal);
                problem.detail = format!("{list}[{i}]: {}", problem.detail);
                return Err(problem);
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Problem::validation(errors))
    }
}

#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = Uuid, Path)),
    responses((status = 200, body = Job), (status = 404, body = Problem)))]
pub async fn get_one(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<Job>, Problem> {
    let id = parse_id(&id, "job")?;
    store::get_job(&state.pool, tenant.0, id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found("job"))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Page size, 1-500 (default 50).
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    status: Option<String>,
    kind: Option<String>,
}

#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", params(ListParams),
    responses((status = 200, body = JobList), (status = 422, body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    Params(params): Params<ListParams>,
) -> Result<Json<JobList>, Problem> {
    let mut errors = Vec::new();
    let (limit, cursor) = page::checked(params.limit, params.cursor.as_deref(), &mut errors);
    let status = params.status.as_deref().and_then(|s| {
        let status = JobStatus::parse(s);
        if status.is_none() {
            errors.push(FieldError::new("status", format!("unknown status {s:?}")));
        }
        status
    });
    // A kind no job can have would page through the tenant's whole history to find none.
    if let Some(kind) = params.kind.as_deref() {
        if !state.contracts.kinds().any(|k| k == kind) {
            errors.push(FieldError::new("kind", format!("unknown kind {kind:?}")));
        }
    }
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }
    let page = store::list_jobs(
        &state.pool,
        tenant.0,
        status,
        params.kind.as_deref(),
        cursor,
        limit,
        state.settings.page_max_bytes,
        shared::pages::SCAN_ROWS,
    )
    .await?;
    Ok(Json(JobList {
        next_cursor: page.next_cursor,
        jobs: page.jobs,
    }))
}

#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs", params(("id" = Uuid, Path)),
    responses((status = 200, body = Job, description = "cancelled, or asked to stop if running"),
              (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn cancel(
    State(state): State<AppState>,
    writer: Writer,
    Path(id): Path<String>,
) -> Result<Json<Job>, Problem> {
    let tenant = writer.tenant();
    let id = parse_id(&id, "job")?;
    let mut tx = state.pool.begin().await?;
    let pipeline = pipelines::lock_of_job(&mut tx, tenant.0, id).await?;
    match store::request_cancel(&mut *tx, tenant.0, id).await? {
        Some(job) => {
            let entry = Entry::new(Action::JobCancel).target(job.id);
            writer.audit(&mut *tx, entry).await?;
            // A step's job that ended: its dependents are cancelled (or start, under `continue`).
            let advanced = match pipeline {
                Some(pipeline) if job.status() == JobStatus::Cancelled => {
                    pipelines::advance(&state, &mut tx, pipeline).await?
                }
                _ => Default::default(),
            };
            tx.commit().await?;
            announce_cancel(&state, tenant.0, &job).await;
            announce_created(&state, tenant.0, &advanced.jobs).await;
            Ok(Json(job))
        }
        None => Err(match store::get_job(&state.pool, tenant.0, id).await? {
            Some(job) => Problem::conflict(format!("the job is already {}", job.status())),
            None => Problem::not_found("job"),
        }),
    }
}

/// After a cancel committed: a job cancelled at once is announced; a running one's worker is
/// told to stop it.
pub(crate) async fn announce_cancel(state: &AppState, tenant: Uuid, job: &Job) {
    if job.status() == JobStatus::Cancelled {
        let event = Event::new(
            job.id,
            &job.kind,
            EventType::Cancelled,
            JobStatus::Cancelled,
            job.progress,
        );
        if let Err(e) = state.events.append(&[(tenant, event)]).await {
            tracing::warn!(error = %e, "cancel event not appended");
        }
    } else if let Err(e) = state.queues.announce_cancel(job.id).await {
        // Its worker's next heartbeat still sees the request.
        tracing::warn!(error = %e, "cancel not announced");
    }
}

#[utoipa::path(post, path = "/v1/jobs/{id}/retry", tag = "jobs", params(("id" = Uuid, Path)),
    responses((status = 202, body = Job), (status = 403, body = Problem, description = "a quota would be exceeded"),
              (status = 404, body = Problem), (status = 409, body = Problem),
              (status = 429, body = Problem, description = "past the submission rate, which a retry draws from")))]
pub async fn retry(
    State(state): State<AppState>,
    writer: Writer,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let tenant = writer.tenant();
    let id = parse_id(&id, "job")?;
    // A retry queues the job again, as a submission would: the same rate and quotas hold.
    // The token is drawn for any job that is or may yet be failed or cancelled: its state is
    // read before the transaction, and one that fails in between is retried.
    let mut requeue = None;
    if let Some(job) = store::get_job(&state.pool, tenant.0, id).await? {
        if job.status() != JobStatus::Succeeded {
            if let Err(refused) = state.limits.admit(tenant.0, writer.0.key.id, 1).await {
                return Ok(refused);
            }
            // Counted where it writes, as a job that fails meanwhile is retried too.
            requeue = Some(0);
        }
        if matches!(job.status(), JobStatus::Failed | JobStatus::Cancelled) {
            // A step's job: the steps its pipeline's resume sets waiting again count as
            // submitted ones do.
            let pipelines: Vec<Uuid> = job.pipeline_id.into_iter().collect();
            let reopened = shared::pipelines::reopened(&state.pool, tenant.0, &pipelines).await?;
            let mut kinds = vec![job.kind.as_str()];
            kinds.extend(reopened.iter().map(|(_, kind)| kind.as_str()));
            state.limits.check_quotas(tenant.0, &kinds).await?;
            requeue = Some(reopened.len());
        }
    }
    let mut tx = state.pool.begin().await?;
    if let Some(reopened) = requeue {
        let limits = &state.limits;
        limits
            .hold_requeue_room(&mut tx, tenant.0, 1, reopened)
            .await?;
    }
    let pipeline = pipelines::lock_of_job(&mut tx, tenant.0, id).await?;
    let Some(job) = store::retry(&mut *tx, tenant.0, id).await? else {
        drop(tx);
        return Err(match store::get_job(&state.pool, tenant.0, id).await? {
            Some(job) if matches!(job.status(), JobStatus::Failed | JobStatus::Cancelled) => {
                Problem::conflict("a rollback of this patch is queued or running")
            }
            Some(job) => Problem::conflict(format!(
                "only failed or cancelled jobs can be retried; this one is {}",
                job.status()
            )),
            None => Problem::not_found("job"),
        });
    };
    let entry = Entry::new(Action::JobRetry).target(job.id);
    writer.audit(&mut *tx, entry).await?;
    // A step's job: the pipeline resumes.
    let advanced = match pipeline {
        Some(pipeline) => pipelines::resume(&state, &mut tx, pipeline).await?,
        None => Default::default(),
    };
    tx.commit().await?;
    announce_retry(&state, tenant.0, &job).await;
    announce_created(&state, tenant.0, &advanced.jobs).await;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

/// After a retry committed: the job's `queued` event, and its kind announced to the workers.
pub(crate) async fn announce_retry(state: &AppState, tenant: Uuid, job: &Job) {
    let event = Event::new(job.id, &job.kind, EventType::Queued, JobStatus::Queued, 0.0)
        .message(Some("retried".into()))
        .attempt(job.attempt + 1);
    if let Err(e) = state.events.append(&[(tenant, event)]).await {
        tracing::warn!(error = %e, "retry event not appended");
    }
    state.refill.request(&job.kind);
}

#[utoipa::path(delete, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = Uuid, Path)),
    responses((status = 204, description = "deleted with its artifacts and events"),
              (status = 404, body = Problem), (status = 409, body = Problem),
              (status = 503, body = Problem,
               description = "the object store did not delete the artifacts in time; kept")))]
pub async fn delete(
    State(state): State<AppState>,
    writer: Writer,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    let tenant = writer.tenant();
    let id = parse_id(&id, "job")?;
    let mut tx = state.pool.begin().await?;
    let Some(job) = store::delete_job(&mut *tx, tenant.0, id).await? else {
        drop(tx);
        return Err(match store::get_job(&state.pool, tenant.0, id).await? {
            Some(job) => Problem::conflict(format!(
                "only finished jobs can be deleted; this one is {} (cancel it first)",
                job.status()
            )),
            None => Problem::not_found("job"),
        });
    };
    let entry = Entry::new(Action::JobDelete).target(job.id);
    writer.audit(&mut *tx, entry).await?;
    // The row goes only once its artifacts are gone: never objects without an owner.
    state.objects.delete_artifacts(job.id).await.map_err(|e| {
        if e.is::<shared::objects::DeleteTimedOut>() {
            Problem::unavailable_after(
                "the object store did not answer in time; the job is kept (some of its \
                 artifacts may be gone), try again",
                e,
            )
        } else {
            Problem::internal(e)
        }
    })?;
    tx.commit().await?;
    if let Err(e) = state.events.forget_jobs(&[(tenant.0, job.id)]).await {
        tracing::debug!(error = %e, "the deleted job's event stream is left to expire");
    }
    Ok(StatusCode::NO_CONTENT)
}

/// How an artifact is served: downloaded (the default), or shown in the dashboard's frame.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ArtifactParams {
    /// `inline` to view it in place (sandboxed: no script, an origin of its own).
    view: Option<ArtifactView>,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
enum ArtifactView {
    Inline,
    Download,
}

#[utoipa::path(get, path = "/v1/jobs/{id}/artifacts/{name}", tag = "jobs",
    params(("id" = Uuid, Path), ("name" = String, Path), ArtifactParams),
    responses((status = 200, content_type = "application/octet-stream", description = "the file"),
              (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn artifact(
    State(state): State<AppState>,
    tenant: Tenant,
    Path((id, name)): Path<(String, String)>,
    Params(params): Params<ArtifactParams>,
) -> Result<Response, Problem> {
    let id = parse_id(&id, "job")?;
    store::get_job(&state.pool, tenant.0, id)
        .await?
        .ok_or_else(|| Problem::not_found("job"))?;
    let stored = state
        .objects
        .read_artifact(id, &name)
        .await
        .map_err(Problem::internal)?
        .ok_or_else(|| Problem::not_found("artifact"))?;
    let response = crate::files::serve(Some(stored), &name)?;
    Ok(match params.view {
        Some(ArtifactView::Inline) => crate::files::inline(response, &name),
        _ => response,
    })
}
