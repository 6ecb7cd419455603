//! Schedules: a cron expression, read in an IANA time zone, that enqueues one job, or starts one
//! pipeline, at each firing. The API creates, pauses, resumes and deletes them; the leading worker's maintenance
//! fires them ([`fire_due`]).
//!
//! Each firing makes at most one job however many workers race: each schedule's firing runs in
//! a transaction of its own holding the schedule's row lock (`FOR UPDATE SKIP LOCKED`: a racing
//! leader skips it), `next_fire_at` moves by an UPDATE guarded on its old value, and unique indexes on
//! `jobs (schedule_id, schedule_fire_at)` and `pipelines (schedule_id, schedule_fire_at)` refuse
//! a second job or pipeline for the same firing.
//!
//! A firing is checked against the tenant's quotas and draws on its submission rate (the
//! tenant's bucket, and the key's if it has one) as a submission does; one past a quota or the
//! rate makes nothing and is recorded, with why, in the schedule's history (as are the other skips). A
//! schedule belongs to its tenant, not to the key that created it: revoking that key does not
//! stop it (the key only attributes its jobs' usage); pause or delete the schedule for that.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::{
    parser::{CronParser, Seconds, Year},
    Cron,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor, PgPool};
use std::time::Duration;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    model::Job,
    pages::{self, Page},
    pipelines::{self, Firing, NewPipeline, Validate},
    quotas::{self, Quotas},
    rates::Buckets,
    FieldError,
};

/// How long a firing waits for its rate tokens before it goes without them.
const DRAW_TIMEOUT: Duration = Duration::from_secs(1);
/// Most firings an `overlap: queue` schedule keeps waiting; later ones are skipped.
pub const MAX_PENDING: usize = 100;

/// Most schedules one tenant may have: the leader fires every due schedule in order of its
/// time, so a tenant with thousands firing each second would delay everyone else's.
pub const MAX_PER_TENANT: i64 = 100;

/// How many upcoming firings the API shows.
pub const NEXT_FIRES: usize = 5;

/// When a schedule fires: its cron expression read in its time zone.
#[derive(Clone, Debug)]
pub struct Timing {
    cron: Cron,
    tz: Tz,
}

/// The longest cron expression and time zone name a schedule holds (real ones are tens of
/// characters).
pub const MAX_CRON_CHARS: usize = 256;
pub const MAX_TIMEZONE_CHARS: usize = 64;

impl Timing {
    /// A new schedule's timing, its cron and time zone of bounded length: each firing parses
    /// the expression again, on the one leader that fires every tenant's schedules (a MB of
    /// `0,0,0,...` still fires every second). Schedules stored before the bound are read with
    /// [`Timing::parse`], and go on firing.
    pub fn parse_new(cron: &str, timezone: &str) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        if cron.len() > MAX_CRON_CHARS {
            errors.push(FieldError::new(
                "cron",
                format!("must be at most {MAX_CRON_CHARS} characters"),
            ));
        }
        if timezone.len() > MAX_TIMEZONE_CHARS {
            errors.push(FieldError::new(
                "timezone",
                format!("must be at most {MAX_TIMEZONE_CHARS} characters"),
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Self::parse(cron, timezone)
    }

    /// Parses a 5-field (minute granularity) or 6-field (seconds first) expression, or an
    /// alias (`@hourly`, ...), and an IANA time zone; errors name `cron` and `timezone`.
    pub fn parse(cron: &str, timezone: &str) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let fields = cron.split_whitespace().count();
        let parsed = if !cron.trim_start().starts_with('@') && !(5..=6).contains(&fields) {
            errors.push(FieldError::new(
                "cron",
                format!(
                    "needs 5 fields (minute hour day-of-month month day-of-week) or 6 (seconds \
                     first), not {fields}"
                ),
            ));
            None
        } else {
            let parser = CronParser::builder()
                .seconds(Seconds::Optional)
                .year(Year::Disallowed)
                .build();
            match parser.parse(cron) {
                Ok(parsed) => Some(parsed),
                Err(e) => {
                    errors.push(FieldError::new(
                        "cron",
                        format!("not a cron expression: {e}"),
                    ));
                    None
                }
            }
        };
        let tz = match timezone.parse::<Tz>() {
            Ok(tz) => Some(tz),
            Err(_) => {
                errors.push(FieldError::new(
                    "timezone",
                    format!("{timezone:?} is not an IANA time zone (UTC, Europe/Paris, ...)"),
                ));
                None
            }
        };
        let (Some(cron), Some(tz)) = (parsed, tz) else {
            return Err(errors);
        };
        let timing = Self { cron, tz };
        if timing.after(Utc::now()).is_none() {
            return Err(vec![FieldError::new(
                "cron",
                "never matches a time in the future",
            )]);
        }
        Ok(timing)
    }

    /// The first firing strictly after `t`; `None` if the expression never matches again.
    pub fn after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|at| at.with_timezone(&Utc))
    }

    /// `first`, then the firings after it: `n` in all (fewer if the expression ends).
    pub fn upcoming(&self, first: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut times = Vec::with_capacity(n);
        let mut next = Some(first);
        while let Some(at) = next.filter(|_| times.len() < n) {
            times.push(at);
            next = self.after(at);
        }
        times
    }
}

/// While the schedule's previous job is live (scheduled, queued, running or retrying), or its
/// previous pipeline running.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// No job for this firing (counted in `skipped`).
    #[default]
    Skip,
    /// The firing waits: its job is created once the previous one has ended.
    Queue,
    /// A job now, alongside the previous one.
    Allow,
}

/// A firing later than the misfire grace (`CONVEYOR_SCHEDULE_MISFIRE_GRACE_SECS`): the workers
/// were down, or paused maintenance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Misfire {
    /// One job now for all the missed firings, then on schedule.
    #[default]
    RunOnce,
    /// No job for the missed firings (counted in `skipped`); next at the next future time.
    Skip,
}

macro_rules! text_enum {
    ($ty:ty, $($variant:ident = $text:literal),+) => {
        impl $ty {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }
        impl TryFrom<String> for $ty {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                match s.as_str() {
                    $($text => Ok(Self::$variant),)+
                    _ => Err(format!("unknown value {s:?}")),
                }
            }
        }
    };
}
text_enum!(Overlap, Skip = "skip", Queue = "queue", Allow = "allow");
text_enum!(Misfire, RunOnce = "run_once", Skip = "skip");

/// The job a schedule makes at each firing.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduledJob {
    /// A job kind (`canary`, `import`, ...).
    pub kind: String,
    /// The kind's payload, validated as a submission's when the schedule is created.
    #[serde(default)]
    pub payload: Value,
    /// Default 0.
    pub priority: Option<i16>,
    /// Default 3.
    pub max_attempts: Option<i32>,
}

/// A schedule as stored and returned by the API.
#[derive(Clone, Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct Schedule {
    pub id: Uuid,
    #[serde(skip)]
    pub tenant_id: Uuid,
    /// The key that created it; its jobs are submitted with it.
    #[serde(skip)]
    pub key_id: Option<Uuid>,
    pub name: String,
    pub cron: String,
    pub timezone: String,
    /// The job each firing enqueues (for a job schedule).
    #[sqlx(json(nullable))]
    pub job: Option<ScheduledJob>,
    /// The pipeline each firing starts (for a pipeline schedule).
    #[sqlx(json(nullable))]
    pub pipeline: Option<NewPipeline>,
    #[sqlx(try_from = "String")]
    pub overlap: Overlap,
    #[sqlx(try_from = "String")]
    pub misfire: Misfire,
    pub paused: bool,
    /// The next firing (it may be a moment in the past until the maintenance fires it).
    pub next_fire_at: Option<DateTime<Utc>>,
    /// The firing time of the last job made.
    pub last_fired_at: Option<DateTime<Utc>>,
    /// Firings that made nothing (overlap or misfire `skip`, too many waiting, over a quota);
    /// the history says why.
    pub skipped: i64,
    pub last_skipped_at: Option<DateTime<Utc>>,
    /// Firings waiting for the previous job to end (overlap `queue`).
    pub pending_fires: Vec<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The next firings (none while paused).
    #[sqlx(skip)]
    pub next_fires: Vec<DateTime<Utc>>,
}

impl Schedule {
    pub fn timing(&self) -> Result<Timing, Vec<FieldError>> {
        Timing::parse(&self.cron, &self.timezone)
    }

    /// Fills `next_fires`.
    pub fn with_next_fires(mut self) -> Self {
        self.next_fires = match (self.paused, self.next_fire_at, self.timing()) {
            (false, Some(first), Ok(timing)) => timing.upcoming(first, NEXT_FIRES),
            _ => Vec::new(),
        };
        self
    }
}

/// What a schedule makes at each firing.
pub enum Target {
    Job(ScheduledJob),
    Pipeline(NewPipeline),
}

/// A schedule about to be written (validated).
pub struct NewSchedule {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub target: Target,
    pub overlap: Overlap,
    pub misfire: Misfire,
    pub paused: bool,
    pub next_fire_at: Option<DateTime<Utc>>,
}

/// Writes a schedule; `None` when the tenant has one of that name.
pub async fn create(
    db: impl PgExecutor<'_>,
    tenant: Uuid,
    key: Uuid,
    new: &NewSchedule,
) -> sqlx::Result<Option<Schedule>> {
    sqlx::query_as(
        "INSERT INTO schedules (id, tenant_id, key_id, name, cron, timezone, job, pipeline,
                                overlap, misfire, paused, next_fire_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
         ON CONFLICT (tenant_id, name) DO NOTHING
         RETURNING *",
    )
    .bind(Uuid::now_v7())
    .bind(tenant)
    .bind(key)
    .bind(&new.name)
    .bind(&new.cron)
    .bind(&new.timezone)
    .bind(match &new.target {
        Target::Job(job) => Some(sqlx::types::Json(job)),
        Target::Pipeline(_) => None,
    })
    .bind(match &new.target {
        Target::Pipeline(pipeline) => Some(sqlx::types::Json(pipeline)),
        Target::Job(_) => None,
    })
    .bind(new.overlap.as_str())
    .bind(new.misfire.as_str())
    .bind(new.paused)
    .bind(new.next_fire_at)
    .fetch_optional(db)
    .await
}

/// The tenant's schedules, oldest first.
/// The tenant's schedules after `cursor`, oldest first.
pub async fn list(
    pool: &PgPool,
    tenant: Uuid,
    cursor: Option<Uuid>,
    limit: i64,
    budget: usize,
) -> sqlx::Result<Page<Schedule>> {
    let query = sqlx::query(
        "SELECT * FROM schedules WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id > $2)
         ORDER BY id LIMIT $3",
    )
    .bind(tenant)
    .bind(cursor)
    .bind(limit);
    pages::read(pool, query, budget).await
}

pub async fn get(pool: &PgPool, tenant: Uuid, id: Uuid) -> sqlx::Result<Option<Schedule>> {
    sqlx::query_as("SELECT * FROM schedules WHERE id = $1 AND tenant_id = $2")
        .bind(id)
        .bind(tenant)
        .fetch_optional(pool)
        .await
}

/// Pauses a schedule (idempotent); `None` if the tenant has no such schedule.
pub async fn pause(
    db: impl PgExecutor<'_>,
    tenant: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<Schedule>> {
    sqlx::query_as(
        "UPDATE schedules SET paused = true, updated_at = now()
         WHERE id = $1 AND tenant_id = $2 RETURNING *",
    )
    .bind(id)
    .bind(tenant)
    .fetch_optional(db)
    .await
}

/// Resumes a paused schedule at its next firing after now (the firings it missed while paused
/// are not made); a running one is left as it is. `None` if the tenant has no such schedule.
pub async fn resume(
    conn: &mut PgConnection,
    tenant: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<Schedule>> {
    let Some(schedule): Option<Schedule> =
        sqlx::query_as("SELECT * FROM schedules WHERE id = $1 AND tenant_id = $2 FOR UPDATE")
            .bind(id)
            .bind(tenant)
            .fetch_optional(&mut *conn)
            .await?
    else {
        return Ok(None);
    };
    if !schedule.paused {
        return Ok(Some(schedule));
    }
    let next = schedule
        .timing()
        .ok()
        .and_then(|timing| timing.after(Utc::now()));
    sqlx::query_as(
        "UPDATE schedules SET paused = false, next_fire_at = $3, updated_at = now()
         WHERE id = $1 AND tenant_id = $2 RETURNING *",
    )
    .bind(id)
    .bind(tenant)
    .bind(next)
    .fetch_optional(&mut *conn)
    .await
}

/// Deletes a schedule; its jobs stay (with their `schedule_id`).
pub async fn delete(db: impl PgExecutor<'_>, tenant: Uuid, id: Uuid) -> sqlx::Result<bool> {
    let deleted = sqlx::query("DELETE FROM schedules WHERE id = $1 AND tenant_id = $2")
        .bind(id)
        .bind(tenant)
        .execute(db)
        .await?;
    Ok(deleted.rows_affected() > 0)
}

/// The jobs a schedule made, newest first, after the `cursor` job id.
pub async fn jobs(
    pool: &PgPool,
    tenant: Uuid,
    id: Uuid,
    cursor: Option<Uuid>,
    limit: i64,
    budget: usize,
) -> sqlx::Result<Page<Job>> {
    let query = sqlx::query(
        "SELECT * FROM jobs WHERE schedule_id = $1 AND tenant_id = $2
                            AND ($3::uuid IS NULL OR id < $3)
         ORDER BY id DESC LIMIT $4",
    )
    .bind(id)
    .bind(tenant)
    .bind(cursor)
    .bind(limit);
    pages::read(pool, query, budget).await
}

/// One firing of a schedule, as its history shows it.
#[derive(Clone, Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct FiringRecord {
    /// The job's, the pipeline's or the skip's id (the history's cursor).
    pub id: Uuid,
    /// The firing time.
    pub fire_at: DateTime<Utc>,
    /// `job`, `pipeline`, or `skipped` (it made nothing).
    pub made: String,
    pub job_id: Option<Uuid>,
    pub pipeline_id: Option<Uuid>,
    /// The job's or pipeline's status now, or `skipped`.
    pub status: String,
    /// Why a firing was skipped.
    pub reason: Option<String>,
}

/// A schedule's firings, newest first, after the `cursor` id: the jobs or pipelines it made
/// and the firings it skipped (the newest [`KEPT_SKIPS`]).
pub async fn history(
    pool: &PgPool,
    tenant: Uuid,
    id: Uuid,
    cursor: Option<Uuid>,
    limit: i64,
) -> sqlx::Result<Vec<FiringRecord>> {
    sqlx::query_as(
        "SELECT * FROM (
             (SELECT id, schedule_fire_at AS fire_at, 'job' AS made, id AS job_id,
                     NULL::uuid AS pipeline_id, status, NULL AS reason
              FROM jobs WHERE schedule_id = $1 AND tenant_id = $2
                          AND ($3::uuid IS NULL OR id < $3)
              ORDER BY id DESC LIMIT $4)
             UNION ALL
             (SELECT id, schedule_fire_at, 'pipeline', NULL, id, status, NULL
              FROM pipelines WHERE schedule_id = $1 AND tenant_id = $2
                               AND ($3::uuid IS NULL OR id < $3)
              ORDER BY id DESC LIMIT $4)
             UNION ALL
             (SELECT k.id, k.fire_at, 'skipped', NULL, NULL, 'skipped', k.reason
              FROM schedule_skips k JOIN schedules s ON s.id = k.schedule_id
              WHERE k.schedule_id = $1 AND s.tenant_id = $2 AND ($3::uuid IS NULL OR k.id < $3)
              ORDER BY k.id DESC LIMIT $4)
         ) firings
         ORDER BY id DESC LIMIT $4",
    )
    .bind(id)
    .bind(tenant)
    .bind(cursor)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Skipped firings kept per schedule, newest first.
pub const KEPT_SKIPS: i64 = 1000;

/// What one pass of [`fire_due`] did.
#[derive(Debug, Default)]
pub struct Fired {
    /// Schedules it looked at (due, or with a firing waiting).
    pub schedules: usize,
    /// The jobs it made, its pipelines' first steps included (queued, not yet announced nor
    /// dispatched).
    pub jobs: Vec<Job>,
    /// The pipelines it started.
    pub pipelines: usize,
}

#[derive(sqlx::FromRow)]
struct Due {
    #[sqlx(flatten)]
    schedule: Schedule,
    now: DateTime<Utc>,
}

/// The schedule's previous job is live, or its previous pipeline running.
const LIVE: &str = "(EXISTS (SELECT 1 FROM jobs j WHERE j.schedule_id = s.id
                             AND j.status IN ('scheduled', 'queued', 'running', 'retrying'))
                     OR EXISTS (SELECT 1 FROM pipelines p WHERE p.schedule_id = s.id
                                AND p.status = 'running'))";

/// Fires up to `limit` schedules that are due (or whose waiting firing may go), each in a
/// transaction of its own: the tenant a firing locks to count `max_queued` stays locked for
/// that firing only, not for the rest of the pass (its submissions waited on other tenants'
/// firings and rate draws, and two leaders could deadlock on two tenants). A firing later than
/// `grace` is a misfire: the schedule's policy says whether it makes a job; either way the next
/// firing is the next one after now. Within the grace every firing makes its job (a schedule a
/// few firings behind catches up over the next passes). A pipeline's steps are checked with
/// `validate` when they start, as a submitted one's. A firing that fails is logged and the pass
/// goes on; one that cannot take a schedule at all ends the pass: the firings committed before
/// it are returned (theirs to announce), the error only if there were none.
pub async fn fire_due(
    pool: &PgPool,
    buckets: &Buckets,
    grace: Duration,
    limit: i64,
    validate: &Validate<'_>,
) -> anyhow::Result<Fired> {
    let grace = chrono::Duration::from_std(grace)?;
    // Lateness is counted to the pass's start: the pass fires one schedule after another, and
    // its own waits (a tenant's row, a rate draw while Redis does not answer) made the later
    // ones late, skipped as "missed while maintenance was not running".
    let pass_started: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
    let mut fired = Fired::default();
    // Each schedule fires at most once a pass; a tenant whose row stayed locked past
    // `FIRING_LOCK_WAIT` is passed over for the rest of it. Those waits do not count toward
    // `limit`: a tenant's 100 schedules failing on its held row filled every pass, and no other
    // tenant's schedule fired while it was held.
    let (mut seen, mut held) = (Vec::new(), Vec::new());
    let mut tried = 0;
    while tried < limit {
        let taken = seen.len();
        let lateness = (pass_started, grace);
        match fire_next(pool, buckets, lateness, validate, &mut seen, &held).await {
            Ok(Some(made)) => {
                tried += 1;
                fired.schedules += 1;
                fired.jobs.extend(made.jobs);
                fired.pipelines += made.pipelines;
            }
            Ok(None) => break,
            // One schedule's failure is its own: the others fire (first in each pass, it stopped
            // every tenant's schedules).
            Err(e) if seen.len() > taken => {
                let (schedule, tenant) = seen[taken];
                if lock_not_available(&e) {
                    held.push(tenant);
                } else {
                    tried += 1;
                }
                tracing::warn!(error = %e, %schedule, "a schedule did not fire; the next pass tries again");
            }
            Err(e) if fired.schedules == 0 => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "schedules did not fire; the next pass tries again");
                break;
            }
        }
    }
    Ok(fired)
}

/// Whether `e` is a lock wait that ran past its `lock_timeout` (SQLSTATE 55P03).
fn lock_not_available(e: &anyhow::Error) -> bool {
    e.downcast_ref::<sqlx::Error>()
        .and_then(|e| e.as_database_error())
        .and_then(|e| e.code())
        .is_some_and(|code| code == "55P03")
}

/// The longest a firing waits for a lock (its tenant's row, a pipeline's).
pub const FIRING_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The next due schedule not in `seen` (added to it, with its tenant) of a tenant not in
/// `held`, fired in a transaction of its own: what it made. `None` if no other is due (or the
/// due ones are another leader's).
async fn fire_next(
    pool: &PgPool,
    buckets: &Buckets,
    lateness: (DateTime<Utc>, chrono::Duration),
    validate: &Validate<'_>,
    seen: &mut Vec<(Uuid, Uuid)>,
    held: &[Uuid],
) -> anyhow::Result<Option<Fired>> {
    let mut tx = pool.begin().await?;
    // A firing waits on its tenant's row (as its submissions take it) only so long: a tenant
    // whose row another transaction holds (a long bulk retry, say) held up every other
    // tenant's firings. The schedule fires at a later pass.
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(format!("{}ms", FIRING_LOCK_WAIT.as_millis()))
        .execute(&mut *tx)
        .await?;
    // Due, or holding a waiting firing whose previous job or pipeline has ended.
    let due: Option<Due> = sqlx::query_as(&format!(
        "SELECT s.*, now() AS now FROM schedules s
         WHERE s.id IN (SELECT id FROM schedules WHERE NOT paused AND next_fire_at <= now()
                        UNION
                        SELECT id FROM schedules
                        WHERE NOT paused AND cardinality(pending_fires) > 0)
           AND NOT s.paused
           AND (s.next_fire_at <= now()
                OR (cardinality(s.pending_fires) > 0 AND NOT {LIVE}))
           AND s.id <> ALL($1) AND s.tenant_id <> ALL($2)
         ORDER BY s.next_fire_at
         LIMIT 1
         FOR UPDATE SKIP LOCKED"
    ))
    .bind(seen.iter().map(|(id, _)| *id).collect::<Vec<_>>())
    .bind(held)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(Due { schedule, now }) = due else {
        return Ok(None);
    };
    seen.push((schedule.id, schedule.tenant_id));
    let mut made = Fired {
        schedules: 1,
        ..Fired::default()
    };
    fire(
        &mut tx, buckets, &schedule, now, lateness, validate, &mut made,
    )
    .await?;
    tx.commit().await?;
    Ok(Some(made))
}

/// What a firing made.
enum Made {
    Something,
    /// Nothing: why.
    Skipped(String),
}

/// One schedule's turn: its waiting firing (if the previous job or pipeline ended), then its
/// due one, late if it was due more than `grace` before the pass started.
async fn fire(
    conn: &mut PgConnection,
    buckets: &Buckets,
    s: &Schedule,
    now: DateTime<Utc>,
    (pass_started, grace): (DateTime<Utc>, chrono::Duration),
    validate: &Validate<'_>,
    fired: &mut Fired,
) -> anyhow::Result<()> {
    let mut live: bool =
        sqlx::query_scalar(&format!("SELECT {LIVE} FROM schedules s WHERE s.id = $1"))
            .bind(s.id)
            .fetch_one(&mut *conn)
            .await?;
    let mut pending = s.pending_fires.clone();
    let mut last_fired = None;
    let mut skips: Vec<(DateTime<Utc>, String)> = Vec::new();
    if !live && !pending.is_empty() {
        let at = pending.remove(0);
        match make(&mut *conn, buckets, s, at, validate, fired).await? {
            Made::Something => {
                last_fired = Some(at);
                live = true;
            }
            Made::Skipped(why) => skips.push((at, why)),
        }
    }
    let mut next = s.next_fire_at;
    if let Some(old) = s.next_fire_at.filter(|at| *at <= now) {
        let late = pass_started - old > grace;
        next = match s.timing() {
            Ok(timing) => timing.after(if late { now } else { old }),
            // Stored expressions were valid when written; one this build cannot read stops.
            Err(_) => None,
        };
        let made = if s.pipeline.is_some() {
            "pipeline"
        } else {
            "job"
        };
        let make_one = !late || s.misfire == Misfire::RunOnce;
        match (make_one, live, s.overlap) {
            (false, _, _) => skips.push((
                old,
                "missed while maintenance was not running (misfire: skip)".into(),
            )),
            (true, true, Overlap::Skip) => skips.push((
                old,
                format!("the previous firing's {made} had not ended (overlap: skip)"),
            )),
            (true, true, Overlap::Queue) if pending.len() >= MAX_PENDING => skips.push((
                old,
                format!("{MAX_PENDING} firings were already waiting (overlap: queue)"),
            )),
            (true, true, Overlap::Queue) => pending.push(old),
            (true, false, _) | (true, true, Overlap::Allow) => {
                match make(&mut *conn, buckets, s, old, validate, fired).await? {
                    Made::Something => last_fired = Some(old),
                    Made::Skipped(why) => skips.push((old, why)),
                }
            }
        }
    }
    record_skips(&mut *conn, s.id, &skips).await?;
    let moved = sqlx::query(
        "UPDATE schedules
         SET next_fire_at = $2, pending_fires = $3,
             last_fired_at = COALESCE($4, last_fired_at),
             skipped = skipped + $5,
             last_skipped_at = COALESCE($6, last_skipped_at),
             updated_at = now()
         WHERE id = $1 AND next_fire_at IS NOT DISTINCT FROM $7",
    )
    .bind(s.id)
    .bind(next)
    .bind(&pending)
    .bind(last_fired)
    .bind(skips.len() as i64)
    .bind(skips.iter().map(|(at, _)| *at).max())
    .bind(s.next_fire_at)
    .execute(&mut *conn)
    .await?;
    // The row is locked by this transaction: nobody else can have moved it.
    anyhow::ensure!(
        moved.rows_affected() == 1,
        "schedule {} moved under its lock",
        s.id
    );
    Ok(())
}

/// The firing's job or pipeline, unless it would take the tenant past a quota or its
/// submission rate (both as a submission's, the rate with the schedule's key). A firing that
/// already made its job or pipeline makes nothing more.
async fn make(
    conn: &mut PgConnection,
    buckets: &Buckets,
    s: &Schedule,
    at: DateTime<Utc>,
    validate: &Validate<'_>,
    fired: &mut Fired,
) -> anyhow::Result<Made> {
    let kinds: Vec<&str> = match (&s.job, &s.pipeline) {
        (Some(job), _) => vec![job.kind.as_str()],
        (None, Some(pipeline)) => pipeline.kinds(),
        (None, None) => anyhow::bail!("schedule {} has neither job nor pipeline", s.id),
    };
    let quotas = Quotas::of(&mut *conn, s.tenant_id).await?;
    if quotas.max_queued.is_some() {
        // Counted with the tenant locked, as a submission counts where it writes: one in
        // flight has either committed its jobs or waits for this firing's.
        quotas::lock_tenant(&mut *conn, s.tenant_id).await?;
    }
    if let Err(over) = quotas::check(&mut *conn, s.tenant_id, &quotas, &kinds, true).await? {
        return Ok(Made::Skipped(over.to_string()));
    }
    // One token a job, as the submission of the same job or pipeline draws.
    let tokens = kinds.len();
    let rates = buckets.rates(&mut *conn, s.tenant_id, s.key_id).await?;
    // Briefly: the firing holds its schedule's row lock meanwhile (and, under `max_queued`,
    // its tenant's).
    let drawn = tokio::time::timeout(DRAW_TIMEOUT, buckets.draw(s.tenant_id, &rates, tokens));
    match drawn.await {
        Ok(Ok(Some(drawn))) if !drawn.allowed => return Ok(Made::Skipped(drawn.refusal(tokens))),
        Ok(Ok(_)) => {}
        // As the API admits a submission when Redis cannot answer.
        Ok(Err(e)) => {
            tracing::warn!(error = %e, schedule = %s.id, "rate limit unavailable; firing")
        }
        Err(_) => tracing::warn!(schedule = %s.id, "rate limit did not answer; firing"),
    }
    match (&s.job, &s.pipeline) {
        (Some(job), _) => fired.jobs.extend(insert_job(&mut *conn, s, job, at).await?),
        (None, Some(pipeline)) => {
            let firing = Firing { schedule: s.id, at };
            let created =
                pipelines::create(&mut *conn, s.tenant_id, s.key_id, pipeline, Some(firing))
                    .await?;
            if let Some(id) = created {
                let advanced = pipelines::advance(&mut *conn, id, validate).await?;
                fired.jobs.extend(advanced.jobs);
                fired.pipelines += 1;
            }
        }
        (None, None) => {}
    }
    Ok(Made::Something)
}

/// Writes the firings that made nothing, and keeps the newest [`KEPT_SKIPS`].
async fn record_skips(
    conn: &mut PgConnection,
    schedule: Uuid,
    skips: &[(DateTime<Utc>, String)],
) -> sqlx::Result<()> {
    if skips.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = skips.iter().map(|_| Uuid::now_v7()).collect();
    let times: Vec<DateTime<Utc>> = skips.iter().map(|(at, _)| *at).collect();
    let reasons: Vec<&str> = skips.iter().map(|(_, why)| why.as_str()).collect();
    sqlx::query(
        "INSERT INTO schedule_skips (id, schedule_id, fire_at, reason)
         SELECT t.id, $2, t.fire_at, t.reason
         FROM unnest($1::uuid[], $3::timestamptz[], $4::text[]) AS t(id, fire_at, reason)",
    )
    .bind(&ids)
    .bind(schedule)
    .bind(&times)
    .bind(&reasons)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "DELETE FROM schedule_skips WHERE schedule_id = $1
           AND id < (SELECT id FROM schedule_skips WHERE schedule_id = $1
                     ORDER BY id DESC OFFSET $2 LIMIT 1)",
    )
    .bind(schedule)
    .bind(KEPT_SKIPS - 1)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The firing's job, queued with the schedule's key; `None` if that firing already made one.
async fn insert_job(
    conn: &mut PgConnection,
    s: &Schedule,
    job: &ScheduledJob,
    fire_at: DateTime<Utc>,
) -> sqlx::Result<Option<Job>> {
    sqlx::query_as(
        "INSERT INTO jobs (id, tenant_id, kind, status, payload, priority, max_attempts, run_at,
                           key_id, schedule_id, schedule_fire_at)
         VALUES ($1, $2, $3, 'queued', $4, $5, $6, now(), $7, $8, $9)
         ON CONFLICT (schedule_id, schedule_fire_at) WHERE schedule_id IS NOT NULL DO NOTHING
         RETURNING *",
    )
    .bind(Uuid::now_v7())
    .bind(s.tenant_id)
    .bind(&job.kind)
    .bind(&job.payload)
    .bind(job.priority.unwrap_or(0))
    .bind(
        job.max_attempts
            .unwrap_or(crate::model::DEFAULT_MAX_ATTEMPTS),
    )
    .bind(s.key_id)
    .bind(s.id)
    .bind(fire_at)
    .fetch_optional(&mut *conn)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn five_and_six_field_expressions_in_a_time_zone() {
        let every_second = Timing::parse("* * * * * *", "UTC").unwrap();
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(
            every_second.after(t),
            Some(t + chrono::Duration::seconds(1))
        );

        // 09:00 in Paris is 08:00 UTC in winter, 07:00 in summer.
        let paris = Timing::parse("0 9 * * *", "Europe/Paris").unwrap();
        assert_eq!(
            paris.after(t),
            Some(Utc.with_ymd_and_hms(2026, 1, 1, 8, 0, 0).unwrap())
        );
        let july = Utc.with_ymd_and_hms(2026, 7, 1, 0, 0, 0).unwrap();
        assert_eq!(
            paris.after(july),
            Some(Utc.with_ymd_and_hms(2026, 7, 1, 7, 0, 0).unwrap())
        );
        let fires = paris.upcoming(paris.after(t).unwrap(), 5);
        assert_eq!(fires.len(), 5);
        assert!(fires
            .windows(2)
            .all(|w| w[1] - w[0] == chrono::Duration::days(1)));
    }

    #[test]
    fn invalid_expressions_and_zones_name_their_field() {
        let fields = |cron: &str, tz: &str| -> Vec<String> {
            Timing::parse(cron, tz)
                .unwrap_err()
                .into_iter()
                .map(|e| e.field)
                .collect()
        };
        assert_eq!(fields("* * *", "UTC"), ["cron"]);
        assert_eq!(fields("61 * * * *", "UTC"), ["cron"]);
        assert_eq!(fields("* * * * * * 2030", "UTC"), ["cron"]);
        assert_eq!(fields("0 0 31 2 *", "UTC"), ["cron"]);
        assert_eq!(fields("*/5 * * * *", "Mars/Olympus"), ["timezone"]);
        assert_eq!(fields("nope", "nowhere"), ["cron", "timezone"]);
        assert!(Timing::parse("@hourly", "UTC").is_ok());
    }

    /// Whether a schedule's previous job or pipeline is live is read from the live ones only:
    /// through the schedule's whole history, a schedule of many ended jobs read every one of
    /// them whenever none was live, at each pass.
    #[tokio::test]
    async fn the_live_check_reads_no_ended_job() {
        let db = crate::testing::TestDatabase::new().await;
        let tenant = db.tenant().await;
        let schedule = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO schedules (id, tenant_id, name, cron, job)
             VALUES ($1, $2, 'nightly', '@daily', '{}')",
        )
        .bind(schedule)
        .bind(tenant)
        .execute(&db.pool)
        .await
        .unwrap();
        for table in ["jobs", "pipelines"] {
            let columns = match table {
                "jobs" => "tenant_id, kind, status, payload, attempt",
                _ => "tenant_id, status, on_failure",
            };
            let values = match table {
                "jobs" => "$1, 'canary', 'succeeded', '{}', 1",
                _ => "$1, 'succeeded', 'continue'",
            };
            sqlx::query(&format!(
                "INSERT INTO {table} (id, {columns}, finished_at, schedule_id, schedule_fire_at)
                 SELECT conveyor_uuidv7(), {values}, now(), $2, now() - n * interval '1 day'
                 FROM generate_series(1, 3000) AS n"
            ))
            .bind(tenant)
            .bind(schedule)
            .execute(&db.pool)
            .await
            .unwrap();
        }
        sqlx::query("ANALYZE jobs, pipelines")
            .execute(&db.pool)
            .await
            .unwrap();
        let blocks = "SELECT sum(pg_stat_get_xact_blocks_fetched(oid))::bigint FROM pg_class
                      WHERE relname IN ('jobs', 'pipelines')";
        let mut tx = db.pool.begin().await.unwrap();
        let before: i64 = sqlx::query_scalar(blocks)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        let live: bool =
            sqlx::query_scalar(&format!("SELECT {LIVE} FROM schedules s WHERE s.id = $1"))
                .bind(schedule)
                .fetch_one(&mut *tx)
                .await
                .unwrap();
        let after: i64 = sqlx::query_scalar(blocks)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert!(!live);
        assert_eq!(after - before, 0, "ended jobs and pipelines were read");
    }
}
