//! The job model: states, the job row, and what a client submits.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

/// The SQL condition for the live jobs (scheduled, queued, running, retrying) of `jobs` under
/// the name given: one `OR` arm per partial index that holds them (`jobs_held`, `jobs_running`,
/// `jobs_waiting`), which the planner reads each for its part. An `IN` list of the four implies
/// none of their predicates: it scans the table.
#[macro_export]
macro_rules! live_jobs {
    ($alias:literal) => {
        concat!(
            "(",
            $alias,
            ".status = 'queued' OR ",
            $alias,
            ".status = 'running' OR ",
            $alias,
            ".status IN ('scheduled', 'retrying'))"
        )
    };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting for its `run_at`.
    Scheduled,
    Queued,
    Running,
    /// Failed an attempt; waiting for its backoff before the next one.
    Retrying,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 7] = [
        Self::Scheduled,
        Self::Queued,
        Self::Running,
        Self::Retrying,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn public_worker<S: serde::Serializer>(worker: &Option<String>, to: S) -> Result<S::Ok, S::Error> {
    worker
        .as_deref()
        .map(crate::leader::public_name)
        .serialize(to)
}

/// A job as stored in PostgreSQL (the source of truth) and returned by the API.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Job {
    pub id: Uuid,
    #[serde(skip)]
    pub tenant_id: Uuid,
    pub kind: String,
    #[sqlx(try_from = "String")]
    #[schema(value_type = JobStatus)]
    pub status: StatusColumn,
    pub payload: Value,
    pub result: Option<Value>,
    pub error: Option<String>,
    /// One entry per failed attempt: `{attempt, error, at}`.
    pub attempt_errors: Value,
    pub idempotency_key: Option<String>,
    pub priority: i16,
    pub attempt: i32,
    pub max_attempts: i32,
    pub progress: f32,
    pub message: Option<String>,
    pub run_at: DateTime<Utc>,
    pub cancel_requested: bool,
    /// The worker running it, as tenants see a worker (`worker-` and 12 hex digits): its own
    /// name holds its host and process id.
    #[serde(serialize_with = "public_worker")]
    pub worker: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The schedule that made the job, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[sqlx(default)]
    pub schedule_id: Option<Uuid>,
    /// The schedule's firing the job was made for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[sqlx(default)]
    pub schedule_fire_at: Option<DateTime<Utc>>,
    /// The pipeline the job is a step of, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[sqlx(default)]
    pub pipeline_id: Option<Uuid>,
    /// Its step's name in that pipeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[sqlx(default)]
    pub pipeline_step: Option<String>,
}

/// `status` as read from its text column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StatusColumn(pub JobStatus);

impl TryFrom<String> for StatusColumn {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        JobStatus::parse(&s)
            .map(StatusColumn)
            .ok_or_else(|| format!("unknown job status {s:?}"))
    }
}

impl Job {
    pub fn status(&self) -> JobStatus {
        self.status.0
    }
}

/// `POST /v1/jobs` body.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitJob {
    /// One of the job kinds this deployment knows (`canary`, …).
    pub kind: String,
    /// Kind-specific parameters, validated before the job is accepted.
    #[serde(default)]
    pub payload: Value,
    /// The same key from the same tenant returns the job it first created.
    pub idempotency_key: Option<String>,
    /// Higher first among a tenant's waiting jobs of a kind (claims order by it, then by age).
    pub priority: Option<i16>,
    /// Attempts before the job is `failed` (1–25, default 3).
    pub max_attempts: Option<i32>,
    /// Run no earlier than this instant (the job is `scheduled` until then).
    pub run_at: Option<DateTime<Utc>>,
}

pub const MAX_ATTEMPTS_LIMIT: i32 = 25;
pub const DEFAULT_MAX_ATTEMPTS: i32 = 3;
pub const IDEMPOTENCY_KEY_MAX: usize = 200;
/// The earliest and latest `run_at` (Unix seconds: 1970-01-01, 9999-12-31T23:59:59Z): chrono
/// reads signed and five-digit years that PostgreSQL cannot store or no job needs.
pub const RUN_AT_EARLIEST: i64 = 0;
pub const RUN_AT_LATEST: i64 = 253_402_300_799;
