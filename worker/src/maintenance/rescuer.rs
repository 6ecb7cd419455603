//! Running jobs of workers whose lease lapsed (kill -9, a lost node): queued again and announced,
//! or failed when out of attempts or poison (`CONVEYOR_MAX_WORKER_DEATHS`); announced.

use chrono::{DateTime, Utc};
use shared::{store, Settings};
use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use super::{drain, Duty, Schedule};
use crate::{runtime::Change, Runtime};

pub(crate) struct Rescuer {
    pub schedule: Schedule,
    /// A worker silent this long has lost its jobs.
    pub rescue_after: Duration,
    pub max_worker_deaths: i32,
    outage: Mutex<Outage>,
}

/// What the rescuer knows of PostgreSQL's outages: a gap between its runs longer than two
/// intervals is one (it could not lead, or its statements failed), as is its first run (a
/// new leader), and no worker could heartbeat through it either. Silence then counts from when the rescuer ran again: after a
/// restart longer than `rescue_after`, every live worker's jobs were taken from it (failed on
/// their last attempt, run twice meanwhile) whenever the rescuer ran before its heartbeat.
#[derive(Default)]
struct Outage {
    last_ran: Option<Instant>,
    ended_at: Option<DateTime<Utc>>,
}

impl Rescuer {
    /// Every heartbeat interval.
    pub fn new(settings: &Settings) -> Self {
        Self {
            schedule: Schedule {
                name: "rescuer",
                interval: settings.heartbeat,
                batch: 1000,
            },
            rescue_after: settings.rescue_after,
            max_worker_deaths: settings.max_worker_deaths,
            outage: Mutex::default(),
        }
    }

    /// When the last outage seen ended, this run's start if it ends one now.
    async fn outage_ended(&self, runtime: &Runtime) -> anyhow::Result<Option<DateTime<Utc>>> {
        let gap = self.schedule.interval * 2;
        let after_gap = {
            let outage = self.outage.lock().expect("not poisoned");
            // A leader new to the duty (the last one's session died with the outage, say)
            // cannot tell: it waits as after one.
            outage.last_ran.is_none_or(|at| at.elapsed() > gap)
        };
        if after_gap {
            // The database's clock, which heartbeats are stamped with.
            let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
                .fetch_one(runtime.pool())
                .await?;
            tracing::warn!("the rescuer ran again after an outage: workers get time to heartbeat");
            self.outage.lock().expect("not poisoned").ended_at = Some(now);
        }
        Ok(self.outage.lock().expect("not poisoned").ended_at)
    }
}

#[async_trait::async_trait]
impl Duty for Rescuer {
    fn schedule(&self) -> Schedule {
        self.schedule
    }

    async fn run(&self, runtime: &Runtime) -> anyhow::Result<usize> {
        let since = self.outage_ended(runtime).await?;
        let rescued = drain(self.schedule.batch, || async {
            let orphans = store::rescue_orphans(
                runtime.pool(),
                self.rescue_after,
                since,
                self.max_worker_deaths,
                self.schedule.batch,
            )
            .await?;
            if !orphans.is_empty() {
                tracing::warn!(count = orphans.len(), "rescued jobs of lost workers");
            }
            runtime
                .dispatch_now(orphans.iter().filter_map(Change::moved).collect())
                .await;
            Ok(orphans.len())
        })
        .await?;
        self.outage.lock().expect("not poisoned").last_ran = Some(Instant::now());
        Ok(rescued)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maintenance::test_support::TestDb;

    async fn worker(test: &TestDb, name: &str, silent_for: &str) {
        sqlx::query(
            "INSERT INTO workers (name, queues, heartbeat_at)
             VALUES ($1, '{}', now() - $2::interval)",
        )
        .bind(name)
        .bind(silent_for)
        .execute(test.pool())
        .await
        .unwrap();
    }

    /// A rescuer that has led for a while: no outage to wait after.
    fn leading(test: &TestDb) -> Rescuer {
        let rescuer = Rescuer::new(test.runtime.settings());
        rescuer.outage.lock().unwrap().last_ran = Some(Instant::now());
        rescuer
    }

    /// What attempt `attempt` of canary `job` runs with.
    fn context(test: &TestDb, job: uuid::Uuid, attempt: i32) -> shared::JobContext {
        shared::JobContext::new(
            job,
            test.tenant,
            "canary",
            attempt,
            tokio_util::sync::CancellationToken::new(),
            test.pool().clone(),
            test.runtime.events().clone(),
        )
    }

    #[tokio::test]
    async fn jobs_of_a_lost_worker_are_requeued_or_failed_and_a_live_workers_are_not() {
        let test = TestDb::new().await;
        worker(&test, "lost", "1 minute").await;
        worker(&test, "alive", "0 seconds").await;
        let orphan = test.job("canary", "running").await;
        test.set(orphan, "worker = 'lost'").await;
        let last_attempt = test.job("canary", "running").await;
        test.set(last_attempt, "worker = 'lost', max_attempts = 1")
            .await;
        let safe = test.job("canary", "running").await;
        test.set(safe, "worker = 'alive'").await;

        test.announced("canary");
        let mut rescuer = leading(&test);
        rescuer.schedule.batch = 1;
        let rescued = rescuer.run(&test.runtime).await.unwrap();

        // Two batches of one, then an empty one.
        assert_eq!(rescued, 2);
        assert_eq!(test.status(orphan).await.as_deref(), Some("queued"));
        assert!(
            test.announced("canary"),
            "the re-queued job was not announced"
        );
        assert_eq!(test.events(orphan).await, ["queued"]);
        assert_eq!(test.status(last_attempt).await.as_deref(), Some("failed"));
        assert_eq!(test.events(last_attempt).await, ["failed"]);
        // Its error names the worker as tenants see workers, not by its own name.
        let error: String = sqlx::query_scalar("SELECT error FROM jobs WHERE id = $1")
            .bind(last_attempt)
            .fetch_one(test.pool())
            .await
            .unwrap();
        let shown = shared::leader::public_name("lost");
        assert_eq!(
            error,
            format!("worker {shown} was lost during the last attempt")
        );
        assert_eq!(test.status(safe).await.as_deref(), Some("running"));
        assert!(test.events(safe).await.is_empty());
    }

    /// An attempt taken from a worker that only stalled may not enter its commit once the
    /// rescuer moved the job on: the marker's write matched no row and was taken as recorded,
    /// so the stalled attempt published beside the next one (or under a failed job).
    #[tokio::test]
    async fn an_attempt_rescued_meanwhile_cannot_enter_its_commit() {
        let test = TestDb::new().await;
        worker(&test, "stalled", "1 minute").await;
        let job = test.job("canary", "running").await;
        test.set(job, "worker = 'stalled'").await;
        let rescuer = leading(&test);
        assert_eq!(rescuer.run(&test.runtime).await.unwrap(), 1);
        assert_eq!(test.status(job).await.as_deref(), Some("queued"));
        // The stalled worker wakes and reaches its commit.
        let ctx = context(&test, job, 1);
        assert!(
            ctx.committing().await.is_err(),
            "a rescued attempt entered its commit"
        );
        assert!(!ctx.is_committing());
    }

    /// A last attempt whose worker was lost inside its commit (`JobContext::committing`) may
    /// have published its work: queued once more, not counted, for the kind's ledger to
    /// answer, not failed with its data in place. Once: the next attempt, lost before a
    /// commit of its own, fails.
    #[tokio::test]
    async fn a_last_attempt_lost_inside_its_commit_is_queued_once_more() {
        let test = TestDb::new().await;
        worker(&test, "lost", "1 minute").await;
        let job = test.job("canary", "running").await;
        test.set(job, "worker = 'lost', max_attempts = 1").await;
        let attempt: i32 = sqlx::query_scalar("SELECT attempt FROM jobs WHERE id = $1")
            .bind(job)
            .fetch_one(test.pool())
            .await
            .unwrap();
        // The attempt enters its commit; its worker dies there.
        let ctx = context(&test, job, attempt);
        drop(ctx.committing().await.expect("the commit's start recorded"));

        test.announced("canary");
        let rescuer = leading(&test);
        assert_eq!(rescuer.run(&test.runtime).await.unwrap(), 1);
        assert_eq!(test.status(job).await.as_deref(), Some("queued"));
        assert!(
            test.announced("canary"),
            "the re-queued job was not announced"
        );
        assert_eq!(test.events(job).await, ["queued"]);
        let budget: (i32, Option<i32>) =
            sqlx::query_as("SELECT max_attempts, attempt_budget FROM jobs WHERE id = $1")
                .bind(job)
                .fetch_one(test.pool())
                .await
                .unwrap();
        assert_eq!(budget, (2, Some(1)), "one more attempt, not counted");

        // The next attempt's worker is lost too, before any commit: the job fails.
        test.set(
            job,
            "status = 'running', attempt = attempt + 1, worker = 'lost'",
        )
        .await;
        assert_eq!(rescuer.run(&test.runtime).await.unwrap(), 1);
        assert_eq!(test.status(job).await.as_deref(), Some("failed"));
        assert_eq!(test.events(job).await, ["queued", "failed"]);
    }

    /// A new leader (the last one's session died with PostgreSQL's restart, say) cannot tell
    /// whether an outage just ended: its first run gives workers time to heartbeat.
    #[tokio::test]
    async fn a_new_leaders_first_run_takes_no_job_of_a_silent_worker() {
        let test = TestDb::new().await;
        worker(&test, "alive", "1 minute").await;
        let kept = test.job("canary", "running").await;
        test.set(kept, "worker = 'alive'").await;
        let rescuer = Rescuer::new(test.runtime.settings());
        assert_eq!(rescuer.run(&test.runtime).await.unwrap(), 0);
        assert_eq!(test.status(kept).await.as_deref(), Some("running"));
    }

    /// After an outage of PostgreSQL longer than `rescue_after`, every worker's heartbeat is
    /// stale: the rescuer running again first gives them `rescue_after` to heartbeat, and
    /// takes the jobs only of those that stay silent.
    #[tokio::test]
    async fn after_an_outage_workers_get_time_to_heartbeat_before_their_jobs_are_taken() {
        let test = TestDb::new().await;
        let rescuer = leading(&test);
        assert_eq!(rescuer.run(&test.runtime).await.unwrap(), 0);
        // The outage: a minute without a run, or a heartbeat.
        worker(&test, "alive", "1 minute").await;
        worker(&test, "lost", "1 minute").await;
        let kept = test.job("canary", "running").await;
        test.set(kept, "worker = 'alive', max_attempts = 1").await;
        let orphan = test.job("canary", "running").await;
        test.set(orphan, "worker = 'lost'").await;
        rescuer.outage.lock().unwrap().last_ran = Some(Instant::now() - Duration::from_secs(60));

        assert_eq!(rescuer.run(&test.runtime).await.unwrap(), 0);
        sqlx::query("UPDATE workers SET heartbeat_at = now() WHERE name = 'alive'")
            .execute(test.pool())
            .await
            .unwrap();
        assert_eq!(rescuer.run(&test.runtime).await.unwrap(), 0);
        // `rescue_after` later, the silent worker's job is taken, the other's kept.
        {
            let mut outage = rescuer.outage.lock().unwrap();
            let ended = outage.ended_at.unwrap();
            let horizon = rescuer.rescue_after + Duration::from_secs(1);
            outage.ended_at = Some(ended - chrono::Duration::from_std(horizon).unwrap());
        }
        assert_eq!(rescuer.run(&test.runtime).await.unwrap(), 1);
        assert_eq!(test.status(orphan).await.as_deref(), Some("queued"));
        assert_eq!(test.status(kept).await.as_deref(), Some("running"));
    }
}
