//! Pipelines: named steps, each a job, forming a DAG by their `needs`. A step starts (its job is
//! created and queued, then dispatched by fair share like any submission) once every step it
//! needs has succeeded; its payload may hold `${steps.<name>.outputs.<field>}` references to a
//! needed step's `result.outputs`, resolved then. When a step fails for good, the steps that
//! need it are `cancelled` (policy `cancel_dependents`) or run anyway (`continue`).
//!
//! [`advance`] moves a pipeline on, in a transaction holding its row lock: the worker calls it
//! when a step's job ends, the API after a submit, cancel or retry, and the leading worker's
//! `pipelines` duty for any pipeline left behind (a crash between a job's end and its advance).
//! The lock, and a unique index on `jobs (pipeline_id, pipeline_step)`, make one job per step
//! however many advancers race.

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{FromRow, PgConnection, PgPool};
use std::collections::{HashMap, HashSet};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    model::Job,
    pages::{self, Page},
    quotas::{self, Quotas},
    FieldError,
};

/// Most steps a pipeline may have.
pub const MAX_STEPS: usize = 50;
/// Longest step name.
pub const MAX_NAME: usize = 64;

/// What happens to the steps that need a step that failed for good.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// They are `cancelled`, with the reason.
    #[default]
    CancelDependents,
    /// They start once everything they need has ended, however it ended (a reference to the
    /// failed step's outputs then fails the step).
    Continue,
}

impl OnFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CancelDependents => "cancel_dependents",
            Self::Continue => "continue",
        }
    }
}

impl TryFrom<String> for OnFailure {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "cancel_dependents" => Ok(Self::CancelDependents),
            "continue" => Ok(Self::Continue),
            _ => Err(format!("unknown on_failure {s:?}")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The graph, checked at submit.

/// Checks the steps' names and needs (given in submitted order): names well formed and unique,
/// needs naming other steps of the pipeline, once each, and no cycle. Errors name
/// `steps[i].name` or `steps[i].needs`, at most one each per step, and quote only names short
/// enough to be valid: a megabyte of names and needs must not come back multiplied.
pub fn check_graph(steps: &[(&str, &[String])]) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, (name, _)) in steps.iter().enumerate() {
        if let Err(why) = check_name(name) {
            errors.push(FieldError::new(format!("steps[{i}].name"), why));
        } else if let Some(first) = index.insert(name, i) {
            index.insert(name, first);
            errors.push(FieldError::new(
                format!("steps[{i}].name"),
                format!("step {name:?} is already the name of steps[{first}]"),
            ));
        }
    }
    for (i, (name, needs)) in steps.iter().enumerate() {
        if let Some(why) = needs_fault(name, needs, &index) {
            errors.push(FieldError::new(format!("steps[{i}].needs"), why));
        }
    }
    if !errors.is_empty() {
        return errors;
    }
    // Kahn: what is left once every step whose needs are all placed has been placed is on a
    // cycle, or after one.
    let mut waiting: Vec<usize> = steps.iter().map(|(_, needs)| needs.len()).collect();
    let mut ready: Vec<usize> = (0..steps.len()).filter(|&i| waiting[i] == 0).collect();
    let mut placed = 0;
    while let Some(i) = ready.pop() {
        placed += 1;
        for (j, (_, needs)) in steps.iter().enumerate() {
            if needs.iter().any(|n| n == steps[i].0) {
                waiting[j] -= 1;
                if waiting[j] == 0 {
                    ready.push(j);
                }
            }
        }
    }
    if placed < steps.len() {
        let stuck: Vec<usize> = (0..steps.len()).filter(|&i| waiting[i] > 0).collect();
        let names: Vec<&str> = stuck.iter().map(|&i| steps[i].0).collect();
        errors.push(FieldError::new(
            format!("steps[{}].needs", stuck[0]),
            format!(
                "the needs form a cycle: {} can never start",
                names.join(", ")
            ),
        ));
    }
    errors
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "must be 1-{MAX_NAME} letters, digits, '_' or '-', not {}",
            quoted(name)
        ))
    }
}

/// What is wrong with a step's needs, the first fault found: more needs than a pipeline has
/// steps, itself, a name that is no step, or a step named twice.
fn needs_fault(name: &str, needs: &[String], steps: &HashMap<&str, usize>) -> Option<String> {
    if needs.len() > MAX_STEPS {
        return Some(format!(
            "must name at most {MAX_STEPS} steps, not {}",
            needs.len()
        ));
    }
    let mut seen = HashSet::new();
    for need in needs {
        if need == name {
            return Some("a step cannot need itself".into());
        }
        if !steps.contains_key(need.as_str()) {
            return Some(format!("{} is not a step of this pipeline", quoted(need)));
        }
        if !seen.insert(need) {
            return Some(format!("{} is named twice", quoted(need)));
        }
    }
    None
}

/// A submitted name as errors show it: quoted if it could be a step's name, else only its
/// length (it may be most of the request).
fn quoted(name: &str) -> String {
    if name.len() <= MAX_NAME {
        format!("{name:?}")
    } else {
        format!("a name of {} bytes", name.len())
    }
}

// ---------------------------------------------------------------------------------------------
// References to earlier steps' outputs.

/// A `${steps.<step>.outputs.<field>}` value inside a step's payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// Where it is, as field errors name it: `payload.dataset_id`, `payload.documents[0].x`.
    pub path: String,
    pub step: String,
    pub output: String,
}

/// A string that stands in for each reference while the rest of a payload is validated at
/// submit: it parses as a UUID, as the ids that outputs carry do.
pub const PLACEHOLDER: &str = "00000000-0000-0000-0000-000000000000";

/// Most references one step's payload may hold: each is checked against the step's needs and
/// its payload's errors at submit.
pub const MAX_REFERENCES: usize = 100;

/// The references in `payload`, or the field errors of malformed ones. A string mentioning
/// `${steps.` is a reference, and must be one whole: `${steps.<step>.outputs.<field>}`; at
/// most [`MAX_REFERENCES`] of them.
pub fn references(payload: &Value) -> Result<Vec<Reference>, Vec<FieldError>> {
    let mut found = Vec::new();
    let mut errors = Vec::new();
    walk(payload, "payload".to_owned(), &mut |path, s| {
        if !s.contains("${steps.") {
            return;
        }
        match parse_reference(s) {
            Some((step, output)) => found.push(Reference {
                path: path.to_owned(),
                step: step.to_owned(),
                output: output.to_owned(),
            }),
            None => errors.push(FieldError::new(
                path,
                format!(
                    "{s:?} is not a reference: the whole value must be \
                     ${{steps.<step>.outputs.<field>}}"
                ),
            )),
        }
    });
    if found.len() > MAX_REFERENCES {
        errors.push(FieldError::new(
            "payload",
            format!("holds {} references; at most {MAX_REFERENCES}", found.len()),
        ));
    }
    if errors.is_empty() {
        Ok(found)
    } else {
        Err(errors)
    }
}

fn parse_reference(s: &str) -> Option<(&str, &str)> {
    let inner = s.strip_prefix("${steps.")?.strip_suffix('}')?;
    let (step, output) = inner.split_once(".outputs.")?;
    let word = |w: &str| check_name(w).is_ok();
    (word(step) && word(output)).then_some((step, output))
}

/// Calls `visit` with the path and text of every string in `value`.
fn walk(value: &Value, path: String, visit: &mut impl FnMut(&str, &str)) {
    match value {
        Value::String(s) => visit(&path, s),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                walk(item, format!("{path}[{i}]"), visit);
            }
        }
        Value::Object(fields) => {
            for (key, item) in fields {
                walk(item, format!("{path}.{key}"), visit);
            }
        }
        _ => {}
    }
}

/// `payload` with every reference replaced by `with(reference)`; the first error stops it.
fn substitute(
    payload: &Value,
    with: &mut impl FnMut(&str, &str) -> Result<Value, String>,
) -> Result<Value, String> {
    Ok(match payload {
        Value::String(s) => match parse_reference(s) {
            Some((step, output)) => with(step, output)?,
            None => payload.clone(),
        },
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|item| substitute(item, with))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| Ok((k.clone(), substitute(v, with)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

/// `payload` with [`PLACEHOLDER`] for every reference: what submit validates.
pub fn with_placeholders(payload: &Value) -> Value {
    substitute(payload, &mut |_, _| Ok(Value::String(PLACEHOLDER.into())))
        .unwrap_or_else(|_| payload.clone())
}

/// `parsed` (a step's payload validated [`with_placeholders`] and serialized again) with each
/// reference of `sent` put back where it stood; `None` if one has no place there.
pub fn with_references(sent: &Value, mut parsed: Value) -> Option<Value> {
    fn holds_reference(value: &Value) -> bool {
        let mut found = false;
        walk(value, String::new(), &mut |_, s| {
            found |= parse_reference(s).is_some()
        });
        found
    }
    fn put(sent: &Value, into: &mut Value) -> bool {
        match (sent, into) {
            (Value::String(s), into) if parse_reference(s).is_some() => {
                *into = sent.clone();
                true
            }
            (Value::Array(items), Value::Array(out)) if items.len() == out.len() => {
                items.iter().zip(out.iter_mut()).all(|(s, o)| put(s, o))
            }
            (Value::Object(fields), Value::Object(out)) => {
                fields.iter().all(|(key, s)| match out.get_mut(key) {
                    Some(o) => put(s, o),
                    None => !holds_reference(s),
                })
            }
            (sent, _) => !holds_reference(sent),
        }
    }
    put(sent, &mut parsed).then_some(parsed)
}

/// The most JSON one output may be to stand in for a reference. Outputs are ids and names, but
/// some are read back from rows a tenant's own database keeps (a patch's registry, an import's
/// ledger): a 450 KB "table name" referenced 100 times in each of 49 steps made one advance
/// build GBs of payloads.
pub const MAX_REFERENCED_BYTES: usize = 4 << 10;

/// `payload` with every reference replaced by the named output of the needed step (from its
/// job's `result.outputs`, `None` when that step has none); the error says which is missing or
/// past [`MAX_REFERENCED_BYTES`].
pub fn resolve(payload: &Value, outputs: &HashMap<&str, Option<&Value>>) -> Result<Value, String> {
    substitute(payload, &mut |step, output| {
        let value = outputs
            .get(step)
            .copied()
            .flatten()
            .and_then(|o| o.get(output))
            .filter(|v| !v.is_null())
            .ok_or_else(|| {
                format!(
                    "${{steps.{step}.outputs.{output}}}: step {step:?} has no output {output:?}"
                )
            })?;
        let bytes = serde_json::to_vec(value).map_or(usize::MAX, |json| json.len());
        if bytes > MAX_REFERENCED_BYTES {
            return Err(format!(
                "${{steps.{step}.outputs.{output}}}: that output is {bytes} bytes of JSON; \
                 a reference stands for at most {MAX_REFERENCED_BYTES}"
            ));
        }
        Ok(value.clone())
    })
}

// ---------------------------------------------------------------------------------------------
// Rows.

/// A step as stored and as the API shows it.
#[derive(Clone, Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct Step {
    pub name: String,
    pub kind: String,
    pub needs: Vec<String>,
    /// `waiting`, then its job's status (`queued`, `running`, `retrying`, `succeeded`,
    /// `failed`, `cancelled`); or `cancelled`/`failed` with no job (see `reason`).
    pub state: String,
    /// Why it was cancelled or could not start.
    pub reason: Option<String>,
    pub job_id: Option<Uuid>,
    /// As submitted, references unresolved (the job's payload has them resolved).
    #[schema(value_type = Object)]
    pub payload: Value,
    pub priority: i16,
    pub max_attempts: i32,
    #[serde(skip)]
    pub pipeline_id: Uuid,
    #[serde(skip)]
    pub position: i32,
    /// The stored state (`waiting`, `started`, `cancelled`, `failed`).
    #[serde(skip)]
    #[sqlx(rename = "step_state")]
    pub stored: String,
    /// The job's `result.outputs`.
    #[serde(skip)]
    pub outputs: Option<Value>,
    /// The job's status, if it has a job (and the job still exists).
    #[serde(skip)]
    pub job_status: Option<String>,
}

/// How a step ended, if it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    Succeeded,
    Failed,
    Cancelled,
}

impl Step {
    /// Whether [`retry_step`] takes this step: it failed or was cancelled, or its job is gone.
    pub fn is_retryable(&self) -> bool {
        matches!(self.ended(), Some(Ended::Failed | Ended::Cancelled))
    }

    /// Whether it succeeded: the one end a step is never retried from.
    pub fn succeeded(&self) -> bool {
        self.ended() == Some(Ended::Succeeded)
    }

    fn ended(&self) -> Option<Ended> {
        match (self.stored.as_str(), self.job_status.as_deref()) {
            ("cancelled", _) => Some(Ended::Cancelled),
            ("failed", _) => Some(Ended::Failed),
            ("started", Some("succeeded")) => Some(Ended::Succeeded),
            ("started", Some("failed")) => Some(Ended::Failed),
            ("started", Some("cancelled")) => Some(Ended::Cancelled),
            // Its job was deleted (retention): it counts as failed.
            ("started", None) => Some(Ended::Failed),
            _ => None,
        }
    }
}

/// A pipeline as stored and as the API shows it.
#[derive(Clone, Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct Pipeline {
    pub id: Uuid,
    #[serde(skip)]
    pub tenant_id: Uuid,
    #[serde(skip)]
    pub key_id: Option<Uuid>,
    pub name: Option<String>,
    #[sqlx(try_from = "String")]
    pub on_failure: OnFailure,
    /// `running`, then `succeeded` (every step did), `failed` or `cancelled`.
    pub status: String,
    pub cancel_requested: bool,
    /// The schedule whose firing made it, if one did.
    pub schedule_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// In submitted order.
    #[sqlx(skip)]
    pub steps: Vec<Step>,
}

/// A step about to be written (validated).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct NewStep {
    pub name: String,
    pub kind: String,
    #[schema(value_type = Object)]
    pub payload: Value,
    pub priority: i16,
    pub max_attempts: i32,
    pub needs: Vec<String>,
}

/// A checked pipeline, about to be written: at a submit, or at each firing of a schedule
/// (which stores it).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct NewPipeline {
    pub name: Option<String>,
    pub on_failure: OnFailure,
    pub steps: Vec<NewStep>,
}

impl NewPipeline {
    /// Its steps' kinds, for the quotas.
    pub fn kinds(&self) -> Vec<&str> {
        self.steps.iter().map(|s| s.kind.as_str()).collect()
    }
}

/// The schedule and firing time a pipeline was made for (one pipeline per firing).
#[derive(Clone, Copy, Debug)]
pub struct Firing {
    pub schedule: Uuid,
    pub at: DateTime<Utc>,
}

/// A step's columns, its job's status and outputs beside them.
const STEP_SELECT: &str = "SELECT s.pipeline_id, s.name, s.kind, s.needs,
        CASE WHEN s.state = 'started' THEN coalesce(j.status, 'deleted') ELSE s.state END AS state,
        s.reason, s.job_id, s.payload, s.priority, s.max_attempts, s.position,
        s.state AS step_state, j.result -> 'outputs' AS outputs, j.status AS job_status
     FROM pipeline_steps s LEFT JOIN jobs j ON j.id = s.job_id";

async fn steps(db: &mut PgConnection, id: Uuid) -> sqlx::Result<Vec<Step>> {
    sqlx::query_as(&format!(
        "{STEP_SELECT} WHERE s.pipeline_id = $1 ORDER BY s.position"
    ))
    .bind(id)
    .fetch_all(db)
    .await
}

/// Writes a pipeline and its steps (all `waiting`); [`advance`] then starts the first ones.
/// `None` when `firing` already made its pipeline.
pub async fn create(
    db: &mut PgConnection,
    tenant: Uuid,
    key: Option<Uuid>,
    new: &NewPipeline,
    firing: Option<Firing>,
) -> sqlx::Result<Option<Uuid>> {
    let id: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO pipelines (id, tenant_id, key_id, name, on_failure, schedule_id,
                                schedule_fire_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (schedule_id, schedule_fire_at) WHERE schedule_id IS NOT NULL DO NOTHING
         RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(tenant)
    .bind(key)
    .bind(&new.name)
    .bind(new.on_failure.as_str())
    .bind(firing.map(|f| f.schedule))
    .bind(firing.map(|f| f.at))
    .fetch_optional(&mut *db)
    .await?;
    let Some(id) = id else {
        return Ok(None);
    };
    let steps = &new.steps;
    sqlx::query(
        "INSERT INTO pipeline_steps (pipeline_id, name, position, kind, payload, priority,
                                     max_attempts, needs)
         SELECT $1, t.name, t.position, t.kind, t.payload, t.priority, t.max_attempts,
                ARRAY(SELECT jsonb_array_elements_text(t.needs))
         FROM unnest($2::text[], $3::int4[], $4::text[], $5::jsonb[], $6::int2[], $7::int4[],
                     $8::jsonb[])
             AS t(name, position, kind, payload, priority, max_attempts, needs)",
    )
    .bind(id)
    .bind(steps.iter().map(|s| s.name.clone()).collect::<Vec<_>>())
    .bind((0..steps.len() as i32).collect::<Vec<_>>())
    .bind(steps.iter().map(|s| s.kind.clone()).collect::<Vec<_>>())
    .bind(steps.iter().map(|s| s.payload.clone()).collect::<Vec<_>>())
    .bind(steps.iter().map(|s| s.priority).collect::<Vec<_>>())
    .bind(steps.iter().map(|s| s.max_attempts).collect::<Vec<_>>())
    .bind(
        steps
            .iter()
            .map(|s| serde_json::json!(s.needs))
            .collect::<Vec<_>>(),
    )
    .execute(&mut *db)
    .await?;
    Ok(Some(id))
}

/// The tenant's pipeline with its steps.
pub async fn get(db: &mut PgConnection, tenant: Uuid, id: Uuid) -> sqlx::Result<Option<Pipeline>> {
    let pipeline: Option<Pipeline> =
        sqlx::query_as("SELECT * FROM pipelines WHERE id = $1 AND tenant_id = $2")
            .bind(id)
            .bind(tenant)
            .fetch_optional(&mut *db)
            .await?;
    let Some(mut pipeline) = pipeline else {
        return Ok(None);
    };
    pipeline.steps = steps(db, id).await?;
    Ok(Some(pipeline))
}

/// Whether the tenant's pipeline has ended, and its steps' jobs: what a pipeline's event
/// stream checks once a second, without the steps' payloads [`get`] reads (up to a megabyte
/// each, for every open stream). `None` when there is no such pipeline.
pub async fn progress(
    db: &mut PgConnection,
    tenant: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<(bool, Vec<Uuid>)>> {
    sqlx::query_as(
        "SELECT p.finished_at IS NOT NULL,
                coalesce(array_agg(s.job_id) FILTER (WHERE s.job_id IS NOT NULL), '{}')
         FROM pipelines p LEFT JOIN pipeline_steps s ON s.pipeline_id = p.id
         WHERE p.id = $1 AND p.tenant_id = $2
         GROUP BY p.id",
    )
    .bind(id)
    .bind(tenant)
    .fetch_optional(db)
    .await
}

/// The tenant's pipelines (with their steps), newest first, after the `cursor` pipeline id;
/// the page ends before the pipeline whose steps would take it past `budget` bytes (it holds
/// one at least).
pub async fn list(
    pool: &PgPool,
    tenant: Uuid,
    cursor: Option<Uuid>,
    limit: i64,
    budget: usize,
) -> sqlx::Result<Page<Pipeline>> {
    let mut pipelines: Vec<Pipeline> = sqlx::query_as(
        "SELECT * FROM pipelines WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id < $2)
         ORDER BY id DESC LIMIT $3",
    )
    .bind(tenant)
    .bind(cursor)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let ids: Vec<Uuid> = pipelines.iter().map(|p| p.id).collect();
    // The steps in the pipelines' order, so that the budget ends the page between two
    // pipelines (never inside one): before the one whose steps would pass it.
    let query = format!(
        "{STEP_SELECT} WHERE s.pipeline_id = ANY($1) ORDER BY s.pipeline_id DESC, s.position"
    );
    // As `pages::read`: a page cut before its steps end closes its connection.
    let mut connection = pool.acquire().await?;
    let mut by_pipeline: HashMap<Uuid, Vec<Step>> = HashMap::new();
    let mut cut = None;
    {
        let mut rows = std::pin::pin!(sqlx::query(&query).bind(&ids).fetch(&mut *connection));
        let (mut kept, mut reading, mut reading_bytes) = (0, None, 0);
        loop {
            let row = rows.try_next().await?;
            let step = row.as_ref().map(Step::from_row).transpose()?;
            if let Some(last) = reading.filter(|_| step.as_ref().map(|s| s.pipeline_id) != reading)
            {
                // `last`'s steps are all read.
                if kept > 0 && kept + reading_bytes > budget {
                    by_pipeline.remove(&last);
                    cut = Some(last);
                    break;
                }
                kept += reading_bytes;
                reading_bytes = 0;
            }
            let (Some(row), Some(step)) = (row, step) else {
                break;
            };
            reading = Some(step.pipeline_id);
            reading_bytes += pages::row_bytes(&row);
            by_pipeline.entry(step.pipeline_id).or_default().push(step);
        }
    }
    if let Some(first_left) = cut {
        connection.close_on_drop();
        pipelines.retain(|p| p.id > first_left);
    }
    for pipeline in &mut pipelines {
        pipeline.steps = by_pipeline.remove(&pipeline.id).unwrap_or_default();
    }
    Ok(Page {
        items: pipelines,
        cut: cut.is_some(),
    })
}

/// Takes the pipeline's row lock (for the rest of the transaction), so that its steps change
/// one advancer at a time. `None` if it does not exist (or is not `tenant`'s).
pub async fn lock(
    db: &mut PgConnection,
    tenant: Option<Uuid>,
    id: Uuid,
) -> sqlx::Result<Option<Pipeline>> {
    sqlx::query_as(
        "SELECT * FROM pipelines WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2)
         FOR UPDATE",
    )
    .bind(id)
    .bind(tenant)
    .fetch_optional(db)
    .await
}

/// Checks a step's resolved payload as a submission's is checked; the errors name its fields.
pub type Validate<'a> = dyn Fn(&str, &Value) -> Result<Value, Vec<FieldError>> + Send + Sync + 'a;

/// What [`advance`] did.
#[derive(Debug, Default)]
pub struct Advanced {
    /// The steps' jobs it created (queued, not yet announced nor dispatched).
    pub jobs: Vec<Job>,
    /// Steps it started, cancelled or failed.
    pub steps_changed: usize,
    /// The pipeline's outcome, if it ended now.
    pub finished: Option<String>,
}

impl Advanced {
    /// Whether the pipeline moved at all.
    pub fn moved(&self) -> bool {
        self.steps_changed > 0 || self.finished.is_some()
    }
}

/// Moves a running pipeline on, in the caller's transaction: takes its row lock; starts each
/// waiting step whose needs have all succeeded (or ended, under `continue`), resolving its
/// references and checking its payload with `validate`; cancels the steps that need a failed or
/// cancelled step (under `cancel_dependents`), and every waiting step of a cancelled pipeline;
/// ends the pipeline once every step has ended (writing its `pipeline.finished` webhooks).
pub async fn advance(
    db: &mut PgConnection,
    id: Uuid,
    validate: &Validate<'_>,
) -> sqlx::Result<Advanced> {
    let mut done = Advanced::default();
    let Some(pipeline) = lock(db, None, id).await? else {
        return Ok(done);
    };
    if pipeline.status != "running" {
        return Ok(done);
    }
    let mut steps = steps(db, id).await?;
    // Each pass settles the steps whose needs were settled before it; a change may settle more.
    loop {
        let mut changed = false;
        for i in 0..steps.len() {
            if steps[i].stored != "waiting" {
                continue;
            }
            let needs: Vec<&Step> = steps
                .iter()
                .filter(|s| steps[i].needs.contains(&s.name))
                .collect();
            let ended: Vec<Option<Ended>> = needs.iter().map(|s| s.ended()).collect();
            let all_succeeded = ended.iter().all(|e| *e == Some(Ended::Succeeded));
            let all_ended = ended.iter().all(Option::is_some);
            let blocked = needs
                .iter()
                .zip(&ended)
                .find(|(_, e)| matches!(e, Some(Ended::Failed | Ended::Cancelled)))
                .map(|(s, e)| (s.name.clone(), *e));
            let change = if pipeline.cancel_requested {
                Change::Cancel("the pipeline was cancelled".into())
            } else if all_succeeded || (all_ended && pipeline.on_failure == OnFailure::Continue) {
                let outputs: HashMap<&str, Option<&Value>> = needs
                    .iter()
                    .map(|s| (s.name.as_str(), s.outputs.as_ref()))
                    .collect();
                start(db, &pipeline, &steps[i], &outputs, validate).await?
            } else if let (Some((need, how)), OnFailure::CancelDependents) =
                (blocked, pipeline.on_failure)
            {
                let how = if how == Some(Ended::Failed) {
                    "failed"
                } else {
                    "was cancelled"
                };
                Change::Cancel(format!("needs step {need:?}, which {how}"))
            } else {
                continue;
            };
            let step = &mut steps[i];
            match change {
                Change::Started(job) => {
                    let job = *job;
                    step.stored = "started".into();
                    step.job_id = Some(job.id);
                    step.job_status = Some(job.status().as_str().into());
                    step.reason = None;
                    done.jobs.push(job);
                }
                Change::Cancel(reason) => {
                    step.stored = "cancelled".into();
                    step.reason = Some(reason);
                }
                Change::Fail(reason) => {
                    step.stored = "failed".into();
                    // Validators quote what they refuse: kept within a job error's bound.
                    step.reason = Some(crate::store::bounded_error(reason));
                }
            }
            sqlx::query(
                "UPDATE pipeline_steps SET state = $3, reason = $4, job_id = $5, updated_at = now()
                 WHERE pipeline_id = $1 AND name = $2",
            )
            .bind(id)
            .bind(&step.name)
            .bind(&step.stored)
            .bind(&step.reason)
            .bind(step.job_id)
            .execute(&mut *db)
            .await?;
            done.steps_changed += 1;
            changed = true;
        }
        if !changed {
            break;
        }
    }
    let ended: Vec<Option<Ended>> = steps.iter().map(Step::ended).collect();
    if ended.iter().all(Option::is_some) {
        let status = if ended.iter().all(|e| *e == Some(Ended::Succeeded)) {
            "succeeded"
        } else if pipeline.cancel_requested {
            "cancelled"
        } else {
            "failed"
        };
        finish(db, &pipeline, &steps, status).await?;
        done.finished = Some(status.into());
    }
    Ok(done)
}

enum Change {
    Started(Box<Job>),
    Cancel(String),
    Fail(String),
}

/// Creates the step's job (queued, with the pipeline's key), or says why it cannot start.
async fn start(
    db: &mut PgConnection,
    pipeline: &Pipeline,
    step: &Step,
    outputs: &HashMap<&str, Option<&Value>>,
    validate: &Validate<'_>,
) -> sqlx::Result<Change> {
    let payload = match resolve(&step.payload, outputs) {
        Ok(payload) => payload,
        Err(why) => return Ok(Change::Fail(why)),
    };
    let payload = match validate(&step.kind, &payload) {
        Ok(parsed) => parsed,
        Err(errors) => {
            let why: Vec<String> = errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect();
            return Ok(Change::Fail(format!(
                "its resolved payload is refused: {}",
                why.join("; ")
            )));
        }
    };
    // The quotas on what its kind consumes are checked again now: imports and ingests that ran
    // since the submit may have used them up. (`max_queued` counted every step at the submit.)
    let quotas = Quotas::of(db, pipeline.tenant_id).await?;
    if let Err(over) = quotas::check(db, pipeline.tenant_id, &quotas, &[&step.kind], false).await? {
        return Ok(Change::Fail(format!("it could not start: {over}")));
    }
    // Audited as a submission is, with its resolved statement if it is a patch: the pipeline's
    // own row does not carry its steps' SQL.
    let job: Option<Job> = sqlx::query_as(&format!(
        "WITH ins AS (
             INSERT INTO jobs (id, tenant_id, kind, status, payload, priority, max_attempts,
                               run_at, key_id, pipeline_id, pipeline_step)
             VALUES ($1, $2, $3, 'queued', $4, $5, $6, now(), $7, $8, $9)
             ON CONFLICT (pipeline_id, pipeline_step) WHERE pipeline_id IS NOT NULL DO NOTHING
             RETURNING *
         ), audited AS (
             INSERT INTO audit_log (tenant_id, key_id, action, target_id, statement, detail)
             -- The key as the audit log knows it (a key gone since is no key).
             SELECT $2, (SELECT k.id FROM api_keys k WHERE k.id = $7), 'job.submit',
                    ins.id::text, {statement},
                    jsonb_build_object('kind', ins.kind, 'pipeline_id', $8, 'step', $9)
             FROM ins
         )
         SELECT * FROM ins",
        statement = crate::store::audited_statement("$2", "ins"),
    ))
    .bind(Uuid::now_v7())
    .bind(pipeline.tenant_id)
    .bind(&step.kind)
    .bind(&payload)
    .bind(step.priority)
    .bind(step.max_attempts)
    .bind(pipeline.key_id)
    .bind(pipeline.id)
    .bind(&step.name)
    .fetch_optional(&mut *db)
    .await?;
    Ok(match job {
        Some(job) => Change::Started(Box::new(job)),
        // Only a step row out of step with its job gets here: the job exists, adopt it.
        None => Change::Started(Box::new(
            sqlx::query_as("SELECT * FROM jobs WHERE pipeline_id = $1 AND pipeline_step = $2")
                .bind(pipeline.id)
                .bind(&step.name)
                .fetch_one(&mut *db)
                .await?,
        )),
    })
}

/// Ends the pipeline with `status`, and writes a `pipeline.finished` delivery for each of the
/// tenant's endpoints that asked for it (the same outbox as the jobs' webhooks).
async fn finish(
    db: &mut PgConnection,
    pipeline: &Pipeline,
    steps: &[Step],
    status: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE pipelines SET status = $2, finished_at = now(), updated_at = now() WHERE id = $1",
    )
    .bind(pipeline.id)
    .bind(status)
    .execute(&mut *db)
    .await?;
    let steps: Vec<Value> = steps
        .iter()
        .map(|s| {
            let state = match (s.stored.as_str(), &s.job_status) {
                ("started", Some(job)) => job.clone(),
                (state, _) => state.to_owned(),
            };
            serde_json::json!({"name": s.name, "state": state, "job_id": s.job_id, "reason": s.reason})
        })
        .collect();
    let data = serde_json::json!({
        "pipeline_id": pipeline.id, "name": pipeline.name, "status": status, "steps": steps,
    });
    sqlx::query(
        "INSERT INTO webhook_deliveries (id, webhook_id, tenant_id, event, payload)
         SELECT conveyor_uuidv7(), w.id, w.tenant_id, 'pipeline.finished',
                jsonb_build_object(
                    'type', 'pipeline.finished',
                    'timestamp', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                    'data', $2::jsonb)
         FROM webhooks w WHERE w.tenant_id = $1 AND 'pipeline.finished' = ANY (w.events)",
    )
    .bind(pipeline.tenant_id)
    .bind(data)
    .execute(&mut *db)
    .await?;
    Ok(())
}

/// Cancels the tenant's pipeline, in the caller's transaction: its waiting steps are
/// cancelled, its live jobs cancelled (or asked to stop if running, see
/// [`crate::store::request_cancel`]); it ends `cancelled` once they have. `None` if the tenant
/// has no such pipeline; the jobs it cancelled or asked to stop otherwise (none if it had
/// already ended).
pub async fn cancel(
    db: &mut PgConnection,
    tenant: Uuid,
    id: Uuid,
    validate: &Validate<'_>,
) -> sqlx::Result<Option<(Vec<Job>, Advanced)>> {
    let Some(pipeline) = lock(db, Some(tenant), id).await? else {
        return Ok(None);
    };
    if pipeline.status != "running" {
        return Ok(Some((Vec::new(), Advanced::default())));
    }
    sqlx::query("UPDATE pipelines SET cancel_requested = true, updated_at = now() WHERE id = $1")
        .bind(id)
        .execute(&mut *db)
        .await?;
    let live: Vec<Uuid> = sqlx::query_scalar(
        "SELECT j.id FROM pipeline_steps s JOIN jobs j ON j.id = s.job_id
         WHERE s.pipeline_id = $1
           AND j.status IN ('scheduled', 'queued', 'running', 'retrying')
         ORDER BY j.id",
    )
    .bind(id)
    .fetch_all(&mut *db)
    .await?;
    let mut jobs = Vec::with_capacity(live.len());
    for job in live {
        jobs.extend(crate::store::request_cancel(&mut *db, tenant, job).await?);
    }
    let advanced = advance(db, id, validate).await?;
    Ok(Some((jobs, advanced)))
}

/// A retry of one of its steps resumes a pipeline, in the caller's transaction (holding its
/// lock): running again, not cancelled, and the steps cancelled for want of a failed step are
/// waiting again ([`advance`] cancels those still blocked).
pub async fn reopen(db: &mut PgConnection, id: Uuid) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE pipelines SET status = 'running', cancel_requested = false, finished_at = NULL,
                              updated_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *db)
    .await?;
    sqlx::query(
        "UPDATE pipeline_steps SET state = 'waiting', reason = NULL, updated_at = now()
         WHERE pipeline_id = $1 AND state = 'cancelled' AND job_id IS NULL",
    )
    .bind(id)
    .execute(&mut *db)
    .await?;
    Ok(())
}

/// The steps of the tenant's `pipelines` that a resume ([`reopen`]) sets waiting again, by
/// name and kind: a retry counts them against `max_queued` as a submission counted them.
pub async fn reopened(
    db: impl sqlx::PgExecutor<'_>,
    tenant: Uuid,
    pipelines: &[Uuid],
) -> sqlx::Result<Vec<(String, String)>> {
    sqlx::query_as(
        "SELECT s.name, s.kind FROM pipeline_steps s JOIN pipelines p ON p.id = s.pipeline_id
         WHERE p.tenant_id = $1 AND s.pipeline_id = ANY ($2)
           AND s.state = 'cancelled' AND s.job_id IS NULL",
    )
    .bind(tenant)
    .bind(pipelines)
    .fetch_all(db)
    .await
}

/// What [`retry_step`] did.
pub enum StepRetry {
    /// The pipeline is running again; the step's job, if it had one, is queued again.
    Resumed {
        job: Option<Box<Job>>,
        advanced: Advanced,
    },
    NotFound,
    /// The step has not failed nor been cancelled; its state.
    NotRetryable(String),
}

/// Retries a failed or cancelled step of the tenant's pipeline and resumes the pipeline, in
/// the caller's transaction: a step with a job retries its job; one that could not start
/// (a missing output) waits again, its references resolved anew.
pub async fn retry_step(
    db: &mut PgConnection,
    tenant: Uuid,
    id: Uuid,
    name: &str,
    validate: &Validate<'_>,
) -> sqlx::Result<StepRetry> {
    if lock(db, Some(tenant), id).await?.is_none() {
        return Ok(StepRetry::NotFound);
    }
    let steps = steps(db, id).await?;
    let Some(step) = steps.iter().find(|s| s.name == name) else {
        return Ok(StepRetry::NotFound);
    };
    let job = match (step.ended(), step.job_id) {
        (Some(Ended::Failed | Ended::Cancelled), Some(job)) if step.job_status.is_some() => {
            // None: a patch whose rollback is live, which stays as it is.
            match crate::store::retry(&mut *db, tenant, job).await? {
                Some(job) => Some(Box::new(job)),
                None => {
                    return Ok(StepRetry::NotRetryable(
                        "a patch whose rollback is queued or running".into(),
                    ))
                }
            }
        }
        (Some(Ended::Failed | Ended::Cancelled), _) => {
            sqlx::query(
                "UPDATE pipeline_steps SET state = 'waiting', reason = NULL, job_id = NULL,
                                           updated_at = now()
                 WHERE pipeline_id = $1 AND name = $2",
            )
            .bind(id)
            .bind(name)
            .execute(&mut *db)
            .await?;
            None
        }
        _ => return Ok(StepRetry::NotRetryable(step.state.clone())),
    };
    reopen(db, id).await?;
    let advanced = advance(db, id, validate).await?;
    Ok(StepRetry::Resumed { job, advanced })
}

/// Running pipelines with something to do, at most `limit`, skipping those another advancer
/// holds and those in `skip`: a waiting step whose needs have all ended (or, under
/// `cancel_dependents`, one of which failed or was cancelled), or no step left to wait for.
pub async fn stalled(db: &mut PgConnection, limit: i64, skip: &[Uuid]) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar(STALLED)
        .bind(limit)
        .bind(skip)
        .fetch_all(db)
        .await
}

/// [`stalled`]'s statement. Its steps are read per pipeline through the primary key: as a
/// materialised CTE (referenced thrice), each of its subqueries scanned every running
/// pipeline's steps for each pipeline, every second (a thousand pipelines of fifty steps
/// waiting on a long root: 5 × 10⁷ rows a run, and more for each waiting step).
const STALLED: &str = "WITH step AS NOT MATERIALIZED (
             SELECT s.pipeline_id, s.name, s.needs, s.state,
                    CASE WHEN s.state IN ('cancelled', 'failed') THEN s.state
                         WHEN s.state = 'started' AND j.status IS NULL THEN 'failed'
                         WHEN j.status IN ('succeeded', 'failed', 'cancelled') THEN j.status
                    END AS ended
             FROM pipeline_steps s LEFT JOIN jobs j ON j.id = s.job_id
         )
         SELECT p.id FROM pipelines p
         WHERE p.status = 'running' AND p.id <> ALL ($2)
           AND (NOT EXISTS (SELECT 1 FROM step WHERE step.pipeline_id = p.id AND step.ended IS NULL)
                OR EXISTS (
                    SELECT 1 FROM step w
                    WHERE w.pipeline_id = p.id AND w.state = 'waiting'
                      AND (p.cancel_requested
                           OR NOT EXISTS (SELECT 1 FROM step n
                                          WHERE n.pipeline_id = p.id AND n.name = ANY (w.needs)
                                            AND n.ended IS NULL)
                           OR (p.on_failure = 'cancel_dependents'
                               AND EXISTS (SELECT 1 FROM step n
                                           WHERE n.pipeline_id = p.id AND n.name = ANY (w.needs)
                                             AND n.ended IN ('failed', 'cancelled'))))))
         ORDER BY p.id LIMIT $1
         FOR UPDATE OF p SKIP LOCKED";

/// Ended pipelines (`failed` or `cancelled`) with a step whose job is live again, at most
/// `limit`, skipping those another advancer holds and those in `skip`. Retries resume their pipelines in their
/// own transaction; a bulk retry of an earlier version committed its jobs, then resumed their
/// pipelines in a transaction of their own, and a process dying between the two left this.
/// Kept for those, and as a net: an ended pipeline has no other way to a live step.
pub async fn retried_but_ended(
    db: &mut PgConnection,
    limit: i64,
    skip: &[Uuid],
) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar(concat!(
        "SELECT p.id FROM pipelines p
         WHERE p.status IN ('failed', 'cancelled') AND p.id <> ALL ($2)
           AND p.id IN (SELECT s.pipeline_id FROM jobs j
                        JOIN pipeline_steps s ON s.job_id = j.id AND s.state = 'started'
                        WHERE j.pipeline_id IS NOT NULL AND ",
        crate::live_jobs!("j"),
        ")
         ORDER BY p.id LIMIT $1
         FOR UPDATE OF p SKIP LOCKED"
    ))
    .bind(limit)
    .bind(skip)
    .fetch_all(db)
    .await
}

/// The steps' jobs of a pipeline, by id (for its event stream).
pub async fn job_ids(pool: &PgPool, id: Uuid) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar("SELECT id FROM jobs WHERE pipeline_id = $1")
        .bind(id)
        .fetch_all(pool)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// 200 running pipelines of a root step that runs and 30 steps waiting on it: finding the
    /// stalled ones reads each pipeline's own steps, never all of them again per pipeline.
    #[tokio::test]
    async fn finding_stalled_pipelines_reads_each_pipelines_own_steps() {
        let db = crate::testing::TestDatabase::new().await;
        let tenant = db.tenant().await;
        sqlx::query(
            "WITH p AS (
                 INSERT INTO pipelines (id, tenant_id, on_failure)
                 SELECT gen_random_uuid(), $1, 'cancel_dependents' FROM generate_series(1, 200)
                 RETURNING id
             ), root AS (
                 INSERT INTO jobs (id, tenant_id, kind, status, payload, attempt)
                 SELECT gen_random_uuid(), $1, 'canary', 'running', '{}', 1 FROM p
                 RETURNING id
             ), pairs AS (
                 SELECT p.id AS pipeline_id, r.id AS job_id
                 FROM (SELECT id, row_number() OVER () AS n FROM p) p
                 JOIN (SELECT id, row_number() OVER () AS n FROM root) r USING (n)
             ), roots AS (
                 INSERT INTO pipeline_steps (pipeline_id, name, position, kind, payload,
                                             max_attempts, state, job_id)
                 SELECT pipeline_id, 'root', 0, 'canary', '{}', 1, 'started', job_id FROM pairs
             )
             INSERT INTO pipeline_steps (pipeline_id, name, position, kind, payload, max_attempts,
                                         needs)
             SELECT pipeline_id, 'step' || i, i, 'canary', '{}', 1, '{root}'
             FROM pairs, generate_series(1, 30) i",
        )
        .bind(tenant)
        .execute(&db.pool)
        .await
        .unwrap();
        sqlx::query("ANALYZE pipelines, pipeline_steps, jobs")
            .execute(&db.pool)
            .await
            .unwrap();
        let mut conn = db.pool.acquire().await.unwrap();
        assert!(stalled(&mut conn, 100, &[]).await.unwrap().is_empty());
        let plan: serde_json::Value =
            sqlx::query_scalar(&format!("EXPLAIN (ANALYZE, FORMAT JSON) {STALLED}"))
                .bind(100i64)
                .bind(Vec::<Uuid>::new())
                .fetch_one(&mut *conn)
                .await
                .unwrap();
        // Every row each node produced, over all its loops.
        fn rows(node: &serde_json::Value) -> f64 {
            let own = node["Actual Rows"].as_f64().unwrap_or(0.0)
                * node["Actual Loops"].as_f64().unwrap_or(1.0)
                + node["Rows Removed by Filter"].as_f64().unwrap_or(0.0)
                    * node["Actual Loops"].as_f64().unwrap_or(1.0);
            own + node["Plans"]
                .as_array()
                .map_or(0.0, |plans| plans.iter().map(rows).sum())
        }
        let read = rows(&plan[0]["Plan"]);
        // 6,200 steps and 200 jobs: a few passes over them, not one per pipeline.
        fn outline(node: &serde_json::Value, depth: usize, out: &mut String) {
            out.push_str(&format!(
                "\n{}{} {} rows={} loops={} removed={}",
                "  ".repeat(depth),
                node["Node Type"].as_str().unwrap_or(""),
                node["Relation Name"]
                    .as_str()
                    .or(node["Index Name"].as_str())
                    .unwrap_or(""),
                node["Actual Rows"],
                node["Actual Loops"],
                node["Rows Removed by Filter"],
            ));
            for child in node["Plans"].as_array().into_iter().flatten() {
                outline(child, depth + 1, out);
            }
        }
        let mut shape = String::new();
        outline(&plan[0]["Plan"], 0, &mut shape);
        assert!(read < 200_000.0, "{read} rows: {shape}");
    }

    fn graph(steps: &[(&str, &[&str])]) -> Vec<String> {
        let owned: Vec<(&str, Vec<String>)> = steps
            .iter()
            .map(|(n, needs)| (*n, needs.iter().map(|s| s.to_string()).collect()))
            .collect();
        let borrowed: Vec<(&str, &[String])> = owned
            .iter()
            .map(|(n, needs)| (*n, needs.as_slice()))
            .collect();
        check_graph(&borrowed)
            .into_iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect()
    }

    #[test]
    fn a_dag_passes_and_cycles_unknown_and_duplicate_names_are_refused() {
        assert!(graph(&[("a", &[]), ("b", &["a"]), ("c", &["a", "b"])]).is_empty());
        let cycle = graph(&[("a", &["c"]), ("b", &["a"]), ("c", &["b"]), ("d", &[])]);
        assert_eq!(cycle.len(), 1, "{cycle:?}");
        assert!(
            cycle[0].starts_with("steps[0].needs: the needs form a cycle: a, b, c"),
            "{cycle:?}"
        );
        let unknown = graph(&[("a", &["nope"])]);
        assert!(unknown[0].contains("\"nope\" is not a step"), "{unknown:?}");
        assert!(graph(&[("a", &["a"])])[0].contains("cannot need itself"));
        let twice = graph(&[("a", &[]), ("a", &[])]);
        assert!(twice[0].starts_with("steps[1].name"), "{twice:?}");
        assert!(graph(&[("a b", &[])])[0].starts_with("steps[0].name"));
        assert!(graph(&[("a", &[]), ("b", &["a", "a"])])[0].contains("twice"));
    }

    /// A long name with many needs: one error each for the name and the needs, neither
    /// quoting the name (each need's error used to, so the errors grew as name × needs).
    #[test]
    fn errors_stay_small_however_long_the_names_and_many_the_needs() {
        let long = "n".repeat(10_000);
        let needs: Vec<String> = (0..1_000).map(|i| format!("{long}{i}")).collect();
        let errors = check_graph(&[(long.as_str(), needs.as_slice())]);
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["steps[0].name", "steps[0].needs"]);
        let size: usize = errors.iter().map(|e| e.message.len()).sum();
        assert!(size < 500, "{size} bytes of messages: {errors:?}");

        let many: Vec<String> = (0..=MAX_STEPS).map(|i| format!("s{i}")).collect();
        let errors = graph(&[("a", &many.iter().map(String::as_str).collect::<Vec<_>>())]);
        assert_eq!(
            errors,
            ["steps[0].needs: must name at most 50 steps, not 51"]
        );
    }

    #[test]
    fn a_parsed_payload_keeps_the_references_where_they_stood() {
        let sent = json!({"dataset_id": "${steps.synth.outputs.dataset_id}",
            "target": {"table": "t", "connection_id": "0B9AB4E2-6A3C-4C36-9A0C-5D3F2F1B6A11"},
            "documents": [{"metadata": {"k": "${steps.up.outputs.id}"}}]});
        let parsed = json!({"dataset_id": PLACEHOLDER, "mode": "create",
            "target": {"table": "t", "connection_id": "0b9ab4e2-6a3c-4c36-9a0c-5d3f2f1b6a11", "schema": null},
            "documents": [{"metadata": {"k": PLACEHOLDER}, "text": null}]});
        let kept = with_references(&sent, parsed).unwrap();
        assert_eq!(kept["dataset_id"], "${steps.synth.outputs.dataset_id}");
        assert_eq!(
            kept["documents"][0]["metadata"]["k"],
            "${steps.up.outputs.id}"
        );
        assert_eq!(
            kept["target"]["connection_id"],
            "0b9ab4e2-6a3c-4c36-9a0c-5d3f2f1b6a11"
        );
        assert_eq!(references(&kept).unwrap().len(), 2);
        // A reference with no place in what was parsed: none (never lost).
        let nowhere = json!({"x": {"y": "${steps.a.outputs.b}"}});
        assert_eq!(with_references(&nowhere, json!({"x": 1})), None);
        let dropped = json!({"x": ["${steps.a.outputs.b}"]});
        assert_eq!(with_references(&dropped, json!({})), None);
    }

    #[test]
    fn references_are_found_checked_and_resolved() {
        let payload = json!({
            "dataset_id": "${steps.synth.outputs.dataset_id}",
            "target": {"table": "t"},
            "documents": [{"text": "plain ${HOME}"}, {"dataset_id": "${steps.up.outputs.id}"}],
        });
        let refs = references(&payload).unwrap();
        let paths: Vec<(&str, &str, &str)> = refs
            .iter()
            .map(|r| (r.path.as_str(), r.step.as_str(), r.output.as_str()))
            .collect();
        assert_eq!(
            paths,
            [
                ("payload.dataset_id", "synth", "dataset_id"),
                ("payload.documents[1].dataset_id", "up", "id")
            ]
        );
        let bad = references(&json!({"x": "id-${steps.a.outputs.b}"})).unwrap_err();
        assert_eq!(bad[0].field, "payload.x");
        assert!(references(&json!({"x": "${steps.a.output.b}"})).is_err());

        let placeheld = with_placeholders(&payload);
        assert_eq!(placeheld["dataset_id"], PLACEHOLDER);
        assert_eq!(placeheld["documents"][0]["text"], "plain ${HOME}");

        let synth = json!({"dataset_id": "d-1"});
        let up = json!({"id": 7});
        let outputs = HashMap::from([("synth", Some(&synth)), ("up", Some(&up))]);
        let resolved = resolve(&payload, &outputs).unwrap();
        assert_eq!(resolved["dataset_id"], "d-1");
        assert_eq!(resolved["documents"][1]["dataset_id"], 7);
        let missing = HashMap::from([("synth", Some(&up)), ("up", None)]);
        let why = resolve(&payload, &missing).unwrap_err();
        assert!(why.contains("has no output \"dataset_id\""), "{why}");
    }

    /// An output past a reference's bound fails the step before any copy is made of it: one a
    /// tenant's database wrote, referenced 100 times, made a payload of 45 MB per step.
    #[test]
    fn a_reference_stands_for_a_bounded_output_only() {
        let documents: Vec<Value> = (0..100)
            .map(|i| json!({"id": format!("d{i}"), "text": "${steps.p.outputs.table}"}))
            .collect();
        let payload = json!({"collection_id": PLACEHOLDER, "documents": documents});
        let huge = json!({"table": "x".repeat(450_000)});
        let why = resolve(&payload, &HashMap::from([("p", Some(&huge))])).unwrap_err();
        assert!(why.contains("a reference stands for at most 4096"), "{why}");
        assert!(why.len() < 200, "{why}");
        let named = json!({"table": "x".repeat(MAX_REFERENCED_BYTES - 2)});
        let resolved = resolve(&payload, &HashMap::from([("p", Some(&named))])).unwrap();
        assert_eq!(resolved["documents"][99]["text"], named["table"]);
    }
}
