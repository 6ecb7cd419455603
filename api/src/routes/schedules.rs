//! Schedules: a cron expression in a time zone that enqueues a job at each firing (the leading
//! worker's maintenance fires them). Create, list, read, pause, resume, delete, and the jobs a
//! schedule made.

use crate::extract::Params;
use crate::routes::{delete_audited, parse_id};
use axum::{
    extract::{Path, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use shared::{
    model::SubmitJob,
    schedules::{
        self, FiringRecord, Misfire, NewSchedule, Overlap, Schedule, ScheduledJob, Target, Timing,
    },
    store::NewJob,
    FieldError, Problem,
};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    audit::{Action, Entry},
    auth::{Tenant, Writer},
    extract::HashedJson,
    routes::jobs::{self, JobList},
    routes::page::{self, Page},
    routes::pipelines::{self, SubmitPipeline},
    AppState,
};

/// `POST /v1/schedules` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSchedule {
    /// Unique per tenant, 1-100 characters.
    pub name: String,
    /// 5 fields (`minute hour day-of-month month day-of-week`), 6 with seconds first, or an
    /// alias (`@hourly`, `@daily`, ...).
    pub cron: String,
    /// IANA time zone the expression is read in (default `UTC`).
    pub timezone: Option<String>,
    /// The job each firing enqueues, validated as a submission is. Give `job` or `pipeline`.
    pub job: Option<ScheduledJob>,
    /// The pipeline each firing starts: the body of `POST /v1/pipelines`, validated as a
    /// submission is (its name defaults to the schedule's).
    pub pipeline: Option<SubmitPipeline>,
    /// While the previous job is live (or pipeline running): `skip` (default), `queue` or
    /// `allow`.
    pub overlap: Option<Overlap>,
    /// After downtime: `run_once` (default) or `skip`.
    pub misfire: Option<Misfire>,
    /// Created paused (default false).
    pub paused: Option<bool>,
}

#[derive(Serialize, ToSchema)]
pub struct ScheduleList {
    pub schedules: Vec<Schedule>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<Uuid>,
}

fn not_found() -> Problem {
    Problem::not_found("schedule")
}

/// A schedule's job or pipeline, checked as a submission is.
enum Checked {
    Job((NewJob, contracts::Valid)),
    Pipeline(pipelines::Checked),
}

fn check_job(
    state: &AppState,
    job: ScheduledJob,
) -> Result<(NewJob, contracts::Valid), Vec<FieldError>> {
    let submission = SubmitJob {
        kind: job.kind,
        payload: job.payload,
        idempotency_key: None,
        priority: job.priority,
        max_attempts: job.max_attempts,
        run_at: None,
    };
    jobs::validate(state, submission, "job.")
}

#[utoipa::path(post, path = "/v1/schedules", request_body = CreateSchedule, tag = "schedules",
    responses((status = 201, body = Schedule, description = "created; `next_fires` lists the next firings"),
              (status = 409, body = Problem, description = "a schedule of that name exists, or the tenant has the most schedules it may have (100)"),
              (status = 422, body = Problem)))]
pub async fn create(
    State(state): State<AppState>,
    writer: Writer,
    HashedJson(body, body_sha256): HashedJson<CreateSchedule>,
) -> Result<Response, Problem> {
    let tenant = writer.tenant();
    let mut errors = Vec::new();
    if body.name.trim().is_empty() || body.name.len() > 100 {
        errors.push(FieldError::new("name", "must be 1-100 characters"));
    }
    let timezone = body.timezone.unwrap_or_else(|| "UTC".into());
    let timing = Timing::parse_new(&body.cron, &timezone)
        .map_err(|e| errors.extend(e))
        .ok();
    let target = match (body.job, body.pipeline) {
        (Some(_), Some(_)) => {
            errors.push(FieldError::new(
                "pipeline",
                "give `job` or `pipeline`, not both",
            ));
            None
        }
        (Some(job), None) => check_job(&state, job)
            .map_err(|e| errors.extend(e))
            .ok()
            .map(Checked::Job),
        (None, Some(mut pipeline)) => {
            pipeline.name = pipeline.name.or_else(|| Some(body.name.clone()));
            match pipelines::check(&state, pipeline) {
                Ok(checked) => Some(Checked::Pipeline(checked)),
                Err(problem) => {
                    errors.extend(
                        problem
                            .errors
                            .into_iter()
                            .map(|e| FieldError::new(format!("pipeline.{}", e.field), e.message)),
                    );
                    None
                }
            }
        }
        (None, None) => {
            errors.push(FieldError::new(
                "job",
                "required (or `pipeline`): what each firing makes",
            ));
            None
        }
    };
    let (Some(timing), Some(target), true) = (timing, target, errors.is_empty()) else {
        return Err(Problem::validation(errors));
    };
    // What a submission of this job or pipeline would be refused for now (an unknown
    // dataset, ...).
    let target = match target {
        Checked::Job((job, valid)) => {
            if let Err(refusal) = state
                .contracts
                .preflight(&state.context, tenant.0, &valid)
                .await
            {
                let mut problem = crate::refusals::problem(refusal);
                for error in &mut problem.errors {
                    error.field = format!("job.{}", error.field);
                }
                return Err(problem);
            }
            Target::Job(ScheduledJob {
                kind: job.kind,
                payload: job.payload,
                priority: Some(job.priority),
                max_attempts: Some(job.max_attempts),
            })
        }
        Checked::Pipeline(checked) => {
            checked.preflight(&state, tenant, "pipeline.steps").await?;
            Target::Pipeline(checked.pipeline)
        }
    };
    let paused = body.paused.unwrap_or(false);
    let new = NewSchedule {
        name: body.name,
        cron: body.cron,
        timezone,
        target,
        overlap: body.overlap.unwrap_or_default(),
        misfire: body.misfire.unwrap_or_default(),
        paused,
        next_fire_at: timing.after(Utc::now()),
    };
    let mut tx = state.pool.begin().await?;
    shared::quotas::room_for_one(&mut tx, tenant.0, "schedules", schedules::MAX_PER_TENANT).await?;
    let created = schedules::create(&mut *tx, tenant.0, writer.0.key.id, &new)
        .await?
        .ok_or_else(|| Problem::conflict(format!("a schedule named {:?} exists", new.name)))?;
    let entry = Entry::new(Action::ScheduleCreate)
        .target(created.id)
        .payload_sha256(body_sha256)
        .detail(serde_json::json!({
            "name": created.name, "cron": created.cron, "timezone": created.timezone,
            "kind": created.job.as_ref().map(|job| &job.kind),
            "pipeline": created.pipeline.as_ref().map(|p| p.steps.len()),
        }));
    writer.audit(&mut *tx, entry).await?;
    tx.commit().await?;
    let location = format!("/v1/schedules/{}", created.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(created.with_next_fires()),
    )
        .into_response())
}

#[utoipa::path(get, path = "/v1/schedules", tag = "schedules", params(Page),
    responses((status = 200, body = ScheduleList, description = "oldest first; `limit` defaults to 100 here"),
              (status = 422, body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    Params(params): Params<Page>,
) -> Result<Json<ScheduleList>, Problem> {
    // By default every schedule a tenant may have (there are at most 100), as before paging.
    let (limit, cursor) = params.or_limit(100).checked()?;
    let page = schedules::list(
        &state.pool,
        tenant.0,
        cursor,
        limit,
        state.settings.page_max_bytes,
    )
    .await?;
    let next_cursor = page.next_cursor(limit, |s| s.id);
    let schedules = page
        .items
        .into_iter()
        .map(Schedule::with_next_fires)
        .collect();
    Ok(Json(ScheduleList {
        schedules,
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/v1/schedules/{id}", tag = "schedules", params(("id" = Uuid, Path)),
    responses((status = 200, body = Schedule), (status = 404, body = Problem)))]
pub async fn get_one(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<Schedule>, Problem> {
    let id = parse_id(&id, "schedule")?;
    schedules::get(&state.pool, tenant.0, id)
        .await?
        .map(|s| Json(s.with_next_fires()))
        .ok_or_else(not_found)
}

#[utoipa::path(post, path = "/v1/schedules/{id}/pause", tag = "schedules", params(("id" = Uuid, Path)),
    responses((status = 200, body = Schedule, description = "paused (also if it already was)"),
              (status = 404, body = Problem)))]
pub async fn pause(
    State(state): State<AppState>,
    writer: Writer,
    Path(id): Path<String>,
) -> Result<Json<Schedule>, Problem> {
    set_paused(&state, &writer, &id, true).await
}

#[utoipa::path(post, path = "/v1/schedules/{id}/resume", tag = "schedules", params(("id" = Uuid, Path)),
    responses((status = 200, body = Schedule, description = "running again from its next firing after now (the firings missed while paused are not made)"),
              (status = 404, body = Problem)))]
pub async fn resume(
    State(state): State<AppState>,
    writer: Writer,
    Path(id): Path<String>,
) -> Result<Json<Schedule>, Problem> {
    set_paused(&state, &writer, &id, false).await
}

async fn set_paused(
    state: &AppState,
    writer: &Writer,
    id: &str,
    pause: bool,
) -> Result<Json<Schedule>, Problem> {
    let id = parse_id(id, "schedule")?;
    let tenant = writer.tenant().0;
    let mut tx = state.pool.begin().await?;
    let (schedule, action) = if pause {
        let paused = schedules::pause(&mut *tx, tenant, id).await?;
        (paused, Action::SchedulePause)
    } else {
        let resumed = schedules::resume(&mut tx, tenant, id).await?;
        (resumed, Action::ScheduleResume)
    };
    let schedule = schedule.ok_or_else(not_found)?;
    writer
        .audit(&mut *tx, Entry::new(action).target(id))
        .await?;
    tx.commit().await?;
    Ok(Json(schedule.with_next_fires()))
}

#[utoipa::path(delete, path = "/v1/schedules/{id}", tag = "schedules", params(("id" = Uuid, Path)),
    responses((status = 204, description = "deleted; the jobs it made stay"),
              (status = 404, body = Problem)))]
pub async fn delete(
    State(state): State<AppState>,
    writer: Writer,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    delete_audited(
        &state,
        &writer,
        &id,
        "schedule",
        Action::ScheduleDelete,
        |db, tenant, id| Box::pin(schedules::delete(db, tenant, id)),
    )
    .await
}

#[utoipa::path(get, path = "/v1/schedules/{id}/jobs", tag = "schedules",
    params(("id" = Uuid, Path), Page),
    responses((status = 200, body = JobList, description = "the jobs the schedule made, newest first"),
              (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn jobs(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    Params(params): Params<Page>,
) -> Result<Json<JobList>, Problem> {
    let id = parse_id(&id, "schedule")?;
    let (limit, cursor) = params.checked()?;
    schedules::get(&state.pool, tenant.0, id)
        .await?
        .ok_or_else(not_found)?;
    let page = schedules::jobs(
        &state.pool,
        tenant.0,
        id,
        cursor,
        limit,
        state.settings.page_max_bytes,
    )
    .await?;
    Ok(Json(JobList {
        next_cursor: page.next_cursor(limit, |j| j.id),
        jobs: page.items,
    }))
}

#[derive(Serialize, ToSchema)]
pub struct FiringList {
    pub firings: Vec<FiringRecord>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<Uuid>,
}

#[utoipa::path(get, path = "/v1/schedules/{id}/history", tag = "schedules",
    params(("id" = Uuid, Path), Page),
    responses((status = 200, body = FiringList, description = "the schedule's firings, newest first: the job or pipeline each made, or why it made nothing"),
              (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn history(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    Params(params): Params<Page>,
) -> Result<Json<FiringList>, Problem> {
    let id = parse_id(&id, "schedule")?;
    let (limit, cursor) = params.checked()?;
    schedules::get(&state.pool, tenant.0, id)
        .await?
        .ok_or_else(not_found)?;
    let firings = schedules::history(&state.pool, tenant.0, id, cursor, limit).await?;
    let next_cursor = page::next_cursor(&firings, limit, |f| f.id);
    Ok(Json(FiringList {
        firings,
        next_cursor,
    }))
}
