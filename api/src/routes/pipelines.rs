//! Pipelines: named steps, each a job, that start once the steps they need have succeeded.
//! Submit (the DAG, every payload and reference checked before anything is written), read,
//! list, cancel, retry a step. Their event stream is in `events.rs`; how a pipeline moves on is
//! `shared::pipelines`.

use crate::extract::Params;
use crate::routes::parse_id;
use axum::{
    extract::{Path, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shared::{
    model::{self, SubmitJob},
    pipelines::{self, Advanced, NewPipeline, NewStep, OnFailure, Pipeline, StepRetry},
    FieldError, Problem,
};
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    audit::{Action, Entry},
    auth::{Tenant, Writer},
    extract::HashedJson,
    routes::jobs::{self, announce_cancel, announce_created, announce_retry},
    routes::page::Page,
    AppState,
};

/// `POST /v1/pipelines` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitPipeline {
    /// A label, 1-100 characters.
    pub name: Option<String>,
    /// When a step fails for good: `cancel_dependents` (default) or `continue`.
    pub on_failure: Option<OnFailure>,
    /// 1 to 50 steps, each a job.
    pub steps: Vec<SubmitStep>,
}

/// One step of a submitted pipeline.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitStep {
    /// Unique in the pipeline: 1-64 letters, digits, `_` or `-`.
    pub name: String,
    /// A job kind (`canary`, `import`, ...).
    pub kind: String,
    /// The kind's payload, validated as a submission's; a value may be a whole
    /// `${steps.<step>.outputs.<field>}` reference to a needed step's output, resolved (and
    /// checked) when this step starts.
    #[serde(default)]
    pub payload: Value,
    /// The steps that must succeed before this one starts.
    #[serde(default)]
    pub needs: Vec<String>,
    /// Default 0.
    pub priority: Option<i16>,
    /// Default 3.
    pub max_attempts: Option<i32>,
}

#[derive(Serialize, ToSchema)]
pub struct PipelineList {
    pub pipelines: Vec<Pipeline>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<Uuid>,
}

fn not_found() -> Problem {
    Problem::not_found("pipeline")
}

/// Checks a step's resolved payload as `POST /v1/jobs` checks one.
fn validator(
    state: &AppState,
) -> impl Fn(&str, &Value) -> Result<Value, Vec<FieldError>> + Send + Sync + '_ {
    |kind, payload| (state.contracts.validate(kind, payload)).map(contracts::Valid::into_stored)
}

/// [`pipelines::advance`] with this deployment's payload checks.
pub(crate) async fn advance(
    state: &AppState,
    tx: &mut PgConnection,
    pipeline: Uuid,
) -> Result<Advanced, Problem> {
    Ok(pipelines::advance(tx, pipeline, &validator(state)).await?)
}

/// A step's job was retried: the pipeline runs again ([`pipelines::reopen`]) and moves on.
pub(crate) async fn resume(
    state: &AppState,
    tx: &mut PgConnection,
    pipeline: Uuid,
) -> Result<Advanced, Problem> {
    pipelines::reopen(tx, pipeline).await?;
    advance(state, tx, pipeline).await
}

/// [`advance`] in a transaction of its own, for steps' jobs cancelled in bulk (the cancel's
/// transaction took their rows' locks, not knowing their pipelines beforehand), announcing the
/// jobs it started. A failure is logged: the maintenance duty moves an ended
/// step's pipeline on.
pub(crate) async fn move_on_alone(state: &AppState, tenant: Uuid, pipeline: Uuid) {
    let resumed = async {
        let mut tx = state.pool.begin().await?;
        pipelines::lock(&mut tx, Some(tenant), pipeline).await?;
        let advanced = advance(state, &mut tx, pipeline).await?;
        tx.commit().await?;
        Ok::<_, Problem>(advanced)
    };
    match resumed.await {
        Ok(advanced) => announce_created(state, tenant, &advanced.jobs).await,
        Err(e) => tracing::warn!(%pipeline, error = %e.detail, "pipeline not resumed"),
    }
}

/// If the tenant's job is a pipeline's step, takes the pipeline's lock first (a pipeline's
/// changes take its lock, then its jobs'), and returns the pipeline.
pub(crate) async fn lock_of_job(
    tx: &mut PgConnection,
    tenant: Uuid,
    job: Uuid,
) -> Result<Option<Uuid>, Problem> {
    let pipeline: Option<Uuid> =
        sqlx::query_scalar("SELECT pipeline_id FROM jobs WHERE id = $1 AND tenant_id = $2")
            .bind(job)
            .bind(tenant)
            .fetch_optional(&mut *tx)
            .await?
            .flatten();
    if let Some(id) = pipeline {
        pipelines::lock(tx, Some(tenant), id).await?;
    }
    Ok(pipeline)
}

/// A submission that passed [`check`].
pub(crate) struct Checked {
    pub pipeline: NewPipeline,
    /// Each step's checked payload, by index, when it holds no reference (one that does is
    /// preflighted by its job's own run, once resolved).
    pub preflights: Vec<(usize, contracts::Valid)>,
}

impl Checked {
    /// What a submission of these steps would be refused for now (an unknown dataset, ...);
    /// errors name `{list}[i].<field>`.
    pub(crate) async fn preflight(
        &self,
        state: &AppState,
        tenant: Tenant,
        list: &str,
    ) -> Result<(), Problem> {
        let preflights: Vec<(usize, &contracts::Valid)> =
            self.preflights.iter().map(|(i, v)| (*i, v)).collect();
        jobs::preflight_batch(state, tenant, list, &preflights).await
    }
}

/// The DAG, each step's payload and references, as a submission's are checked.
pub(crate) fn check(state: &AppState, body: SubmitPipeline) -> Result<Checked, Problem> {
    let mut errors = Vec::new();
    if let Some(name) = &body.name {
        if name.trim().is_empty() || name.len() > 100 {
            errors.push(FieldError::new("name", "must be 1-100 characters"));
        }
    }
    if body.steps.is_empty() || body.steps.len() > pipelines::MAX_STEPS {
        errors.push(FieldError::new(
            "steps",
            format!(
                "must hold 1 to {} steps, not {}",
                pipelines::MAX_STEPS,
                body.steps.len()
            ),
        ));
        return Err(Problem::validation(errors));
    }
    let graph: Vec<(&str, &[String])> = body
        .steps
        .iter()
        .map(|s| (s.name.as_str(), s.needs.as_slice()))
        .collect();
    errors.extend(pipelines::check_graph(&graph));
    let mut steps = Vec::with_capacity(body.steps.len());
    let mut preflights = Vec::new();
    for (i, step) in body.steps.into_iter().enumerate() {
        let prefix = format!("steps[{i}].");
        let references = match pipelines::references(&step.payload) {
            Ok(references) => references,
            Err(bad) => {
                errors.extend(
                    bad.into_iter()
                        .map(|e| FieldError::new(format!("{prefix}{}", e.field), e.message)),
                );
                Vec::new()
            }
        };
        let needs: std::collections::HashSet<&String> = step.needs.iter().collect();
        for r in &references {
            if !needs.contains(&r.step) {
                errors.push(FieldError::new(
                    format!("{prefix}{}", r.path),
                    format!(
                        "refers to step {:?}, which step {:?} does not need (add it to `needs`)",
                        r.step, step.name
                    ),
                ));
            }
        }
        let submission = SubmitJob {
            kind: step.kind.clone(),
            payload: pipelines::with_placeholders(&step.payload),
            idempotency_key: None,
            priority: step.priority,
            max_attempts: step.max_attempts,
            run_at: None,
        };
        // The step's payload as parsed (with placeholders), when it passed.
        let parsed = match jobs::validate(state, submission, &prefix) {
            Ok((job, valid)) => {
                if references.is_empty() {
                    preflights.push((i, valid));
                }
                Some(job.payload)
            }
            // A field holding a reference is checked once resolved, when the step starts.
            Err(refused) => {
                let paths: Vec<String> = references
                    .iter()
                    .map(|r| format!("{prefix}{}", r.path))
                    .collect();
                let under_reference = |field: &str| {
                    paths.iter().any(|path| {
                        field.strip_prefix(path.as_str()).is_some_and(|rest| {
                            rest.is_empty() || rest.starts_with('.') || rest.starts_with('[')
                        })
                    })
                };
                errors.extend(refused.into_iter().filter(|e| !under_reference(&e.field)));
                None
            }
        };
        let sent = if step.payload.is_null() {
            json!({})
        } else {
            step.payload
        };
        steps.push(NewStep {
            name: step.name,
            kind: step.kind,
            // As parsed with its references where they stood: what `datasets::in_use` reads of
            // a waiting step. As sent where a reference stands in place of what is no string
            // (refused with the placeholder; stored as parsed in its job when it starts).
            payload: match parsed {
                Some(parsed) if references.is_empty() => parsed,
                Some(parsed) => pipelines::with_references(&sent, parsed).unwrap_or(sent),
                None => sent,
            },
            priority: step.priority.unwrap_or(0),
            max_attempts: step.max_attempts.unwrap_or(model::DEFAULT_MAX_ATTEMPTS),
            needs: step.needs,
        });
    }
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }
    Ok(Checked {
        pipeline: NewPipeline {
            name: body.name,
            on_failure: body.on_failure.unwrap_or_default(),
            steps,
        },
        preflights,
    })
}

#[utoipa::path(post, path = "/v1/pipelines", request_body = SubmitPipeline, tag = "pipelines",
    responses((status = 201, body = Pipeline, description = "accepted; the steps that need nothing are queued"),
              (status = 413, body = Problem),
              (status = 422, body = Problem, description = "a cycle, an unknown or repeated name, a bad reference, a refused payload: each error names `steps[i].<field>`"),
              (status = 429, body = Problem, description = "over the tenant's submission rate; each step counts")))]
pub async fn submit(
    State(state): State<AppState>,
    writer: Writer,
    HashedJson(body, body_sha256): HashedJson<SubmitPipeline>,
) -> Result<Response, Problem> {
    let tenant = writer.tenant();
    let checked = check(&state, body)?;
    let pipeline = &checked.pipeline;
    // Each step is a job submitted now, for the rate and the quotas.
    let rate = match state
        .limits
        .admit(tenant.0, writer.0.key.id, pipeline.steps.len())
        .await
    {
        Ok(headers) => headers,
        Err(refused) => return Ok(refused),
    };
    state
        .limits
        .check_quotas(tenant.0, &pipeline.kinds())
        .await?;
    checked.preflight(&state, tenant, "steps").await?;
    let mut tx = state.pool.begin().await?;
    if let Some(max_queued) = state.limits.of(tenant.0).await?.max_queued {
        crate::limits::hold_queued_room(&mut tx, tenant.0, max_queued, &pipeline.kinds()).await?;
    }
    let id = pipelines::create(&mut tx, tenant.0, Some(writer.0.key.id), pipeline, None)
        .await?
        .ok_or_else(|| Problem::internal("a pipeline of no firing was refused"))?;
    let advanced = advance(&state, &mut tx, id).await?;
    let entry = Entry::new(Action::PipelineSubmit)
        .target(id)
        .payload_sha256(body_sha256)
        .detail(json!({"name": pipeline.name, "steps": pipeline.steps.len()}));
    writer.audit(&mut *tx, entry).await?;
    let pipeline = pipelines::get(&mut tx, tenant.0, id)
        .await?
        .ok_or_else(|| Problem::internal("the new pipeline is gone"))?;
    tx.commit().await?;
    announce_created(&state, tenant.0, &advanced.jobs).await;
    let location = format!("/v1/pipelines/{id}");
    Ok((
        StatusCode::CREATED,
        rate,
        [(header::LOCATION, location)],
        Json(pipeline),
    )
        .into_response())
}

#[utoipa::path(get, path = "/v1/pipelines/{id}", tag = "pipelines", params(("id" = Uuid, Path)),
    responses((status = 200, body = Pipeline), (status = 404, body = Problem)))]
pub async fn get_one(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<Pipeline>, Problem> {
    let id = parse_id(&id, "pipeline")?;
    let mut conn = state.pool.acquire().await?;
    pipelines::get(&mut conn, tenant.0, id)
        .await?
        .map(Json)
        .ok_or_else(not_found)
}

#[utoipa::path(get, path = "/v1/pipelines", tag = "pipelines", params(Page),
    responses((status = 200, body = PipelineList, description = "newest first"),
              (status = 422, body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    Params(params): Params<Page>,
) -> Result<Json<PipelineList>, Problem> {
    let (limit, cursor) = params.checked()?;
    let page = pipelines::list(
        &state.pool,
        tenant.0,
        cursor,
        limit,
        state.settings.page_max_bytes,
    )
    .await?;
    Ok(Json(PipelineList {
        next_cursor: page.next_cursor(limit, |p| p.id),
        pipelines: page.items,
    }))
}

#[utoipa::path(post, path = "/v1/pipelines/{id}/cancel", tag = "pipelines", params(("id" = Uuid, Path)),
    responses((status = 200, body = Pipeline, description = "its waiting steps cancelled, its live jobs cancelled or asked to stop; `cancelled` once they have"),
              (status = 404, body = Problem), (status = 409, body = Problem, description = "it has already ended")))]
pub async fn cancel(
    State(state): State<AppState>,
    writer: Writer,
    Path(id): Path<String>,
) -> Result<Json<Pipeline>, Problem> {
    let tenant = writer.tenant();
    let id = parse_id(&id, "pipeline")?;
    let mut tx = state.pool.begin().await?;
    let (jobs, advanced) = pipelines::cancel(&mut tx, tenant.0, id, &validator(&state))
        .await?
        .ok_or_else(not_found)?;
    let pipeline = pipelines::get(&mut tx, tenant.0, id)
        .await?
        .ok_or_else(not_found)?;
    if pipeline.finished_at.is_some() && advanced.finished.is_none() {
        return Err(Problem::conflict(format!(
            "the pipeline has already ended: {}",
            pipeline.status
        )));
    }
    let entry = Entry::new(Action::PipelineCancel).target(id);
    writer.audit(&mut *tx, entry).await?;
    tx.commit().await?;
    for job in &jobs {
        announce_cancel(&state, tenant.0, job).await;
    }
    Ok(Json(pipeline))
}

#[utoipa::path(post, path = "/v1/pipelines/{id}/steps/{name}/retry", tag = "pipelines",
    params(("id" = Uuid, Path), ("name" = String, Path)),
    responses((status = 202, body = Pipeline, description = "the step retried (its job, or its start if it could not start) and the pipeline running again: the steps cancelled for want of it wait again"),
              (status = 403, body = Problem, description = "a quota of the tenant would be exceeded (`max_queued`, ...), as for a submission"),
              (status = 429, body = Problem, description = "past the submission rate, which a retry draws from"),
              (status = 404, body = Problem), (status = 409, body = Problem, description = "the step has not failed nor been cancelled")))]
pub async fn retry_step(
    State(state): State<AppState>,
    writer: Writer,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, Problem> {
    let tenant = writer.tenant();
    let id = parse_id(&id, "pipeline")?;
    // A retry queues the step's job again, as a submission would: the same rate and quotas
    // hold. The token is drawn for any step that is or may yet be failed or cancelled: its
    // state is read before the transaction, and one that fails in between is retried.
    let pipeline = pipelines::get(&mut *state.pool.acquire().await?, tenant.0, id).await?;
    let step = pipeline.and_then(|p| p.steps.into_iter().find(|s| s.name == name));
    let mut requeue = None;
    if let Some(step) = step.filter(|s| !s.succeeded()) {
        if let Err(refused) = state.limits.admit(tenant.0, writer.0.key.id, 1).await {
            return Ok(refused);
        }
        // Counted where it writes, as a step that fails meanwhile is retried too.
        requeue = Some(0);
        if step.is_retryable() {
            // With the steps the pipeline's resume sets waiting again, as submitted ones.
            let reopened = pipelines::reopened(&state.pool, tenant.0, &[id]).await?;
            let mut kinds = vec![step.kind.as_str()];
            kinds.extend(
                reopened
                    .iter()
                    .filter(|(name, _)| *name != step.name)
                    .map(|(_, kind)| kind.as_str()),
            );
            state.limits.check_quotas(tenant.0, &kinds).await?;
            requeue = Some(kinds.len() - 1);
        }
    }
    let mut tx = state.pool.begin().await?;
    if let Some(reopened) = requeue {
        let limits = &state.limits;
        limits
            .hold_requeue_room(&mut tx, tenant.0, 1, reopened)
            .await?;
    }
    let (job, advanced) =
        match pipelines::retry_step(&mut tx, tenant.0, id, &name, &validator(&state)).await? {
            StepRetry::Resumed { job, advanced } => (job, advanced),
            StepRetry::NotFound => return Err(Problem::not_found("pipeline step")),
            StepRetry::NotRetryable(state) => {
                return Err(Problem::conflict(format!(
                    "only a failed or cancelled step can be retried; {name:?} is {state}"
                )))
            }
        };
    let entry = Entry::new(Action::PipelineRetry)
        .target(id)
        .detail(json!({"step": name, "job_id": job.as_ref().map(|j| j.id)}));
    writer.audit(&mut *tx, entry).await?;
    let pipeline = pipelines::get(&mut tx, tenant.0, id)
        .await?
        .ok_or_else(not_found)?;
    tx.commit().await?;
    if let Some(job) = &job {
        announce_retry(&state, tenant.0, job).await;
    }
    announce_created(&state, tenant.0, &advanced.jobs).await;
    Ok((StatusCode::ACCEPTED, Json(pipeline)).into_response())
}
