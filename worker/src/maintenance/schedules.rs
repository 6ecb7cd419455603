//! Schedules whose firing has come (or whose queued firing may now go): one job per firing,
//! queued with the schedule's key, announced and dispatched like a submission's. Overlap and
//! misfire policies: see `shared::schedules`.

use shared::schedules;
use std::time::Duration;

use super::{Duty, Schedule};
use crate::{runtime::Change, Runtime};

pub(crate) struct Schedules {
    pub schedule: Schedule,
    /// Later than this, a firing is a misfire (`CONVEYOR_SCHEDULE_MISFIRE_GRACE_SECS`).
    pub grace: Duration,
}

impl Schedules {
    /// A firing makes its job within a quarter of a second; 100 schedules a pass, each firing in
    /// a transaction of its own.
    pub fn new(settings: &shared::Settings) -> Self {
        Self {
            schedule: Schedule {
                name: "schedules",
                interval: Duration::from_millis(250),
                batch: 100,
            },
            grace: settings.schedule_misfire_grace,
        }
    }
}

#[async_trait::async_trait]
impl Duty for Schedules {
    fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// Returns how many jobs it made. Goes on while a pass fired a full batch.
    async fn run(&self, runtime: &Runtime) -> anyhow::Result<usize> {
        let mut made = 0;
        loop {
            let fired = schedules::fire_due(
                runtime.pool(),
                runtime.buckets(),
                self.grace,
                self.schedule.batch,
                &runtime.validator(),
            )
            .await?;
            let changes: Vec<Change> = fired
                .jobs
                .iter()
                .map(|job| {
                    let mut change = Change::created(job);
                    // A pipeline's step says its pipeline; the schedule's own job says it was
                    // scheduled.
                    if job.pipeline_id.is_none() {
                        change.event = change.event.message(Some("scheduled".into()));
                    }
                    change
                })
                .collect();
            made += changes.len();
            runtime.dispatch_now(changes).await;
            if (fired.schedules as i64) < self.schedule.batch {
                return Ok(made);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maintenance::test_support::{announced, TestDb};
    use chrono::{DateTime, Utc};
    use serde_json::json;
    use uuid::Uuid;

    impl TestDb {
        /// A schedule of the test's tenant with `cron` and `overlap`/`misfire`, next firing at
        /// the expression's next time.
        async fn schedule(&self, cron: &str, overlap: &str, misfire: &str) -> Uuid {
            let timing = schedules::Timing::parse(cron, "UTC").expect("a valid expression");
            let id = Uuid::now_v7();
            sqlx::query(
                "INSERT INTO schedules (id, tenant_id, name, cron, job, overlap, misfire,
                                        next_fire_at)
                 VALUES ($1, $2, $3, $4, '{\"kind\": \"canary\", \"payload\": {}}', $5, $6, $7)",
            )
            .bind(id)
            .bind(self.tenant)
            .bind(format!("s-{id}"))
            .bind(cron)
            .bind(overlap)
            .bind(misfire)
            .bind(timing.after(Utc::now()))
            .execute(self.pool())
            .await
            .expect("insert a schedule");
            id
        }

        /// A schedule of the test's tenant starting a two-step pipeline (`second` needs
        /// `first`, both canaries), next firing at the expression's next time.
        async fn pipeline_schedule(&self, cron: &str, overlap: &str) -> Uuid {
            let id = self.schedule(cron, overlap, "run_once").await;
            let steps = json!([
                {"name": "first", "kind": "canary", "payload": {}, "priority": 0,
                 "max_attempts": 1, "needs": []},
                {"name": "second", "kind": "canary", "payload": {}, "priority": 0,
                 "max_attempts": 1, "needs": ["first"]},
            ]);
            sqlx::query(
                "UPDATE schedules SET job = NULL,
                        pipeline = jsonb_build_object('name', 'nightly',
                                                      'on_failure', 'cancel_dependents',
                                                      'steps', $2::jsonb)
                 WHERE id = $1",
            )
            .bind(id)
            .bind(steps)
            .execute(self.pool())
            .await
            .expect("make it a pipeline schedule");
            id
        }

        /// The schedule's pipelines: (id, status, firing time), oldest first.
        async fn pipelines_fired(&self, id: Uuid) -> Vec<(Uuid, String, DateTime<Utc>)> {
            sqlx::query_as(
                "SELECT id, status, schedule_fire_at FROM pipelines WHERE schedule_id = $1
                 ORDER BY id",
            )
            .bind(id)
            .fetch_all(self.pool())
            .await
            .expect("read the schedule's pipelines")
        }

        /// Why the schedule's firings were skipped, oldest first.
        async fn skips(&self, id: Uuid) -> Vec<String> {
            sqlx::query_scalar(
                "SELECT reason FROM schedule_skips WHERE schedule_id = $1 ORDER BY id",
            )
            .bind(id)
            .fetch_all(self.pool())
            .await
            .expect("read the skips")
        }

        async fn set_schedule(&self, id: Uuid, assignments: &str) {
            sqlx::query(&format!("UPDATE schedules SET {assignments} WHERE id = $1"))
                .bind(id)
                .execute(self.pool())
                .await
                .expect("update a schedule");
        }

        /// The schedule's jobs: (id, status, firing time), oldest first.
        async fn fired(&self, id: Uuid) -> Vec<(Uuid, String, DateTime<Utc>)> {
            sqlx::query_as(
                "SELECT id, status, schedule_fire_at FROM jobs WHERE schedule_id = $1 ORDER BY id",
            )
            .bind(id)
            .fetch_all(self.pool())
            .await
            .expect("read the schedule's jobs")
        }

        async fn max_queued(&self, most: i64) {
            sqlx::query("INSERT INTO tenant_limits (tenant_id, max_queued) VALUES ($1, $2)")
                .bind(self.tenant)
                .bind(most)
                .execute(self.pool())
                .await
                .expect("set max_queued");
        }

        async fn schedule_row(&self, id: Uuid) -> schedules::Schedule {
            sqlx::query_as("SELECT * FROM schedules WHERE id = $1")
                .bind(id)
                .fetch_one(self.pool())
                .await
                .expect("read a schedule")
        }
    }

    fn duty() -> Schedules {
        Schedules {
            schedule: Schedule {
                name: "schedules",
                interval: Duration::from_millis(250),
                batch: 100,
            },
            grace: Duration::from_secs(10),
        }
    }

    /// Two leaders (two runtimes on one database) running the duty at once, over and over, for
    /// a schedule firing every second: one job per firing, each announced.
    #[tokio::test]
    async fn racing_leaders_make_one_job_per_firing() {
        let test = TestDb::new().await;
        let other = test.another_runtime().await;
        // Taken before the schedule is made: its first firing is the next second after then.
        let started = Utc::now();
        let id = test.schedule("* * * * * *", "allow", "run_once").await;
        let (first, second) = (duty(), duty());
        let end = tokio::time::Instant::now() + Duration::from_millis(4500);
        let race = |runtime: std::sync::Arc<Runtime>, duty: Schedules| async move {
            let mut made = 0;
            while tokio::time::Instant::now() < end {
                made += duty.run(&runtime).await.expect("the duty runs");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            made
        };
        let (a, b) = tokio::join!(
            race(test.runtime.clone(), first),
            race(other.clone(), second)
        );

        let jobs = test.fired(id).await;
        assert_eq!(a + b, jobs.len(), "each made job counted once");
        let mut times: Vec<_> = jobs.iter().map(|(_, _, at)| *at).collect();
        times.dedup();
        assert_eq!(times.len(), jobs.len(), "a firing made two jobs: {jobs:?}");
        // Every second from the first firing to the last, none missed.
        assert!(
            (4..=5).contains(&jobs.len()),
            "{} jobs: {jobs:?}",
            jobs.len()
        );
        for pair in times.windows(2) {
            assert_eq!((pair[1] - pair[0]).num_seconds(), 1, "{times:?}");
        }
        assert!(times[0] > started);
        assert!(a > 0 || b > 0);
        assert!(
            test.announced("canary") || announced(&other, "canary"),
            "not announced"
        );
        for (job, status, _) in &jobs {
            assert_eq!(status, "queued");
            assert_eq!(test.events(*job).await, ["queued"]);
        }
        let row = test.schedule_row(id).await;
        assert_eq!(row.last_fired_at, times.last().copied());
        assert!(row.next_fire_at.unwrap() > *times.last().unwrap());
    }

    /// Overlap `skip`: no second job while the first is live, the skip counted; `queue`: the
    /// firing waits and its job comes once the first ended; `allow`: a job at once.
    #[tokio::test]
    async fn overlap_policies_while_the_previous_job_is_live() {
        let test = TestDb::new().await;
        let mut ids = Vec::new();
        for overlap in ["skip", "queue", "allow"] {
            let id = test.schedule("0 0 * * *", overlap, "run_once").await;
            test.set_schedule(id, "next_fire_at = now() - interval '1 second'")
                .await;
            ids.push(id);
        }
        duty().run(&test.runtime).await.unwrap();
        for id in &ids {
            let jobs = test.fired(*id).await;
            assert_eq!(jobs.len(), 1);
            test.set(jobs[0].0, "status = 'running', attempt = 1").await;
            test.set_schedule(*id, "next_fire_at = now() - interval '1 second'")
                .await;
        }

        // The first jobs are running: another firing of each.
        assert_eq!(duty().run(&test.runtime).await.unwrap(), 1);
        let (skip, queue, allow) = (ids[0], ids[1], ids[2]);
        assert_eq!(test.fired(skip).await.len(), 1, "skip made a second job");
        let skipped = test.schedule_row(skip).await;
        assert_eq!(skipped.skipped, 1);
        assert!(skipped.last_skipped_at.is_some());
        assert_eq!(test.fired(queue).await.len(), 1, "queue made a job early");
        assert_eq!(test.schedule_row(queue).await.pending_fires.len(), 1);
        assert_eq!(test.fired(allow).await.len(), 2);

        // Still running: the waiting firing waits.
        assert_eq!(duty().run(&test.runtime).await.unwrap(), 0);
        assert_eq!(test.fired(queue).await.len(), 1);
        // Once it ended, the waiting firing makes its job (for its own firing time).
        let first = test.fired(queue).await[0].0;
        test.set(first, "status = 'succeeded', finished_at = now()")
            .await;
        assert_eq!(duty().run(&test.runtime).await.unwrap(), 1);
        let jobs = test.fired(queue).await;
        assert_eq!(jobs.len(), 2);
        assert!(jobs[1].2 > jobs[0].2);
        assert!(test.schedule_row(queue).await.pending_fires.is_empty());
        assert!(test.announced("canary"));
    }

    /// Firings draw on the tenant's submission bucket, and on the schedule's key's, as
    /// submissions do: past either, a firing makes nothing and its skip says why.
    #[tokio::test]
    async fn firings_draw_on_the_submission_rate() {
        let test = TestDb::new().await;
        // Three tokens, refilled one every 1,000 seconds.
        sqlx::query(
            "INSERT INTO tenant_limits (tenant_id, rate_per_sec, rate_burst)
             VALUES ($1, 0.001, 3)",
        )
        .bind(test.tenant)
        .execute(test.pool())
        .await
        .unwrap();
        let (first, second) = (
            test.schedule("0 0 * * *", "allow", "run_once").await,
            test.schedule("0 0 * * *", "allow", "run_once").await,
        );
        let pipeline = test.pipeline_schedule("0 0 * * *", "allow").await;
        for (id, ago) in [(first, 3), (second, 2), (pipeline, 1)] {
            test.set_schedule(
                id,
                &format!("next_fire_at = now() - interval '{ago} seconds'"),
            )
            .await;
        }
        assert_eq!(duty().run(&test.runtime).await.unwrap(), 2);
        assert_eq!(test.fired(first).await.len(), 1);
        assert_eq!(test.fired(second).await.len(), 1);
        // Its two steps want two tokens; one is left.
        assert!(test.pipelines_fired(pipeline).await.is_empty());
        assert_eq!(
            test.skips(pipeline).await,
            ["the tenant's submission rate limit of 0.001 jobs/s (burst 3) reached"]
        );

        // A key with a rate of its own: its bucket binds even with the tenant's refilled.
        let key = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, key_hash, rate_per_sec, rate_burst)
             VALUES ($1, $2, $3, 0.001, 1)",
        )
        .bind(key)
        .bind(test.tenant)
        .bind(key.to_string())
        .execute(test.pool())
        .await
        .unwrap();
        sqlx::query("UPDATE tenant_limits SET rate_burst = 100 WHERE tenant_id = $1")
            .bind(test.tenant)
            .execute(test.pool())
            .await
            .unwrap();
        test.set_schedule(
            pipeline,
            &format!("key_id = '{key}', next_fire_at = now() - interval '1 second'"),
        )
        .await;
        assert_eq!(duty().run(&test.runtime).await.unwrap(), 0);
        assert_eq!(
            test.skips(pipeline).await[1],
            "a batch of 2 jobs exceeds the key's submission burst of 1"
        );
    }

    /// After a downtime longer than the grace: `run_once` makes one job (not one per missed
    /// firing), `skip` none; both go on at the next future firing. (Daily: a schedule of every
    /// minute was due again whenever the test crossed a minute.)
    #[tokio::test]
    async fn misfires_after_downtime_follow_the_policy() {
        let test = TestDb::new().await;
        let run_once = test.schedule("0 0 * * *", "allow", "run_once").await;
        let skip = test.schedule("0 0 * * *", "allow", "skip").await;
        for id in [run_once, skip] {
            // Down for three days: three firings missed.
            test.set_schedule(
                id,
                "next_fire_at = date_trunc('day', now()) - interval '3 days'",
            )
            .await;
        }
        let before = Utc::now();
        assert_eq!(duty().run(&test.runtime).await.unwrap(), 1);
        assert_eq!(test.fired(run_once).await.len(), 1);
        assert!(test.fired(skip).await.is_empty());
        for id in [run_once, skip] {
            let row = test.schedule_row(id).await;
            assert!(row.next_fire_at.unwrap() > before, "{id} not in the future");
        }
        assert_eq!(test.schedule_row(skip).await.skipped, 1);
        assert_eq!(test.schedule_row(run_once).await.skipped, 0);
        // Nothing is due now.
        assert_eq!(duty().run(&test.runtime).await.unwrap(), 0);

        // A firing late by less than the grace still makes its job.
        test.set_schedule(skip, "next_fire_at = now() - interval '2 seconds'")
            .await;
        assert_eq!(duty().run(&test.runtime).await.unwrap(), 1);
        assert_eq!(test.fired(skip).await.len(), 1);
    }

    /// A pass fires one schedule after another, and lateness was counted to each firing's
    /// own start: a firing that waited (here for its tenant's row, held by a submission; or
    /// for a rate draw while Redis did not answer) made the next ones late, and a `skip`
    /// schedule due a second before the pass lost its firing as "missed while maintenance was
    /// not running". Lateness is counted to the pass's start.
    #[tokio::test]
    async fn a_firing_that_waits_does_not_make_the_next_ones_late() {
        let test = TestDb::new().await;
        // The first schedule's tenant counts its queue with its row locked.
        test.max_queued(1000).await;
        let waits = test.schedule("* * * * *", "allow", "skip").await;
        let other = Uuid::now_v7();
        sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, 'other')")
            .bind(other)
            .execute(test.pool())
            .await
            .unwrap();
        let next = test.schedule("* * * * *", "allow", "skip").await;
        test.set_schedule(next, &format!("tenant_id = '{other}'"))
            .await;
        test.set_schedule(waits, "next_fire_at = now() - interval '1010 milliseconds'")
            .await;
        test.set_schedule(next, "next_fire_at = now() - interval '1 second'")
            .await;
        let mut holder = test.pool().begin().await.unwrap();
        sqlx::query("SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE")
            .bind(test.tenant)
            .execute(&mut *holder)
            .await
            .unwrap();
        let duty = Schedules {
            grace: Duration::from_secs(2),
            ..duty()
        };
        let runtime = test.runtime.clone();
        let pass = tokio::spawn(async move { duty.run(&runtime).await.unwrap() });
        tokio::time::sleep(Duration::from_secs(3)).await;
        holder.rollback().await.unwrap();
        assert_eq!(pass.await.unwrap(), 2);
        for id in [waits, next] {
            assert_eq!(test.fired(id).await.len(), 1, "{:?}", test.skips(id).await);
        }
    }

    /// A paused schedule does not fire.
    #[tokio::test]
    async fn paused_schedules_do_not_fire() {
        let test = TestDb::new().await;
        let id = test.schedule("* * * * *", "allow", "run_once").await;
        test.set_schedule(
            id,
            "paused = true, next_fire_at = now() - interval '1 second'",
        )
        .await;
        assert_eq!(duty().run(&test.runtime).await.unwrap(), 0);
        assert!(test.fired(id).await.is_empty());
    }
    /// Two leaders racing over a schedule that starts a pipeline every second: one pipeline
    /// per firing, its first step queued and announced, its second waiting.
    #[tokio::test]
    async fn racing_leaders_start_one_pipeline_per_firing() {
        let test = TestDb::new().await;
        let other = test.another_runtime().await;
        let id = test.pipeline_schedule("* * * * * *", "allow").await;
        let end = tokio::time::Instant::now() + Duration::from_millis(4500);
        let race = |runtime: std::sync::Arc<Runtime>| async move {
            let mut made = 0;
            while tokio::time::Instant::now() < end {
                made += duty().run(&runtime).await.expect("the duty runs");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            made
        };
        let (a, b) = tokio::join!(race(test.runtime.clone()), race(other.clone()));

        let pipelines = test.pipelines_fired(id).await;
        let mut times: Vec<_> = pipelines.iter().map(|(_, _, at)| *at).collect();
        times.dedup();
        assert_eq!(
            times.len(),
            pipelines.len(),
            "a firing made two: {pipelines:?}"
        );
        assert!((4..=5).contains(&pipelines.len()), "{pipelines:?}");
        for pair in times.windows(2) {
            assert_eq!((pair[1] - pair[0]).num_seconds(), 1, "{times:?}");
        }
        assert_eq!(a + b, pipelines.len(), "each first step counted once");
        for (pipeline, status, _) in &pipelines {
            assert_eq!(status, "running");
            let steps: Vec<(String, Option<Uuid>)> = sqlx::query_as(
                "SELECT state, job_id FROM pipeline_steps WHERE pipeline_id = $1 ORDER BY position",
            )
            .bind(pipeline)
            .fetch_all(test.pool())
            .await
            .unwrap();
            assert_eq!(steps[0].0, "started");
            assert_eq!(steps[1], ("waiting".into(), None));
            let job = steps[0].1.unwrap();
            assert_eq!(test.events(job).await, ["queued"]);
        }
        assert!(test.fired(id).await.is_empty(), "no job of its own");
    }

    /// Overlap `skip` holds for a pipeline: no second one while the first runs, the skip
    /// recorded with why; once it ended, the next firing starts one.
    #[tokio::test]
    async fn overlap_skip_waits_for_the_previous_pipeline() {
        let test = TestDb::new().await;
        let id = test.pipeline_schedule("0 0 * * *", "skip").await;
        let due = "next_fire_at = now() - interval '1 second'";
        test.set_schedule(id, due).await;
        duty().run(&test.runtime).await.unwrap();
        assert_eq!(test.pipelines_fired(id).await.len(), 1);

        // Its first step ended, the second not yet started: the pipeline still runs.
        let pipeline = test.pipelines_fired(id).await[0].0;
        sqlx::query("UPDATE jobs SET status = 'succeeded' WHERE pipeline_id = $1")
            .bind(pipeline)
            .execute(test.pool())
            .await
            .unwrap();
        test.set_schedule(id, due).await;
        assert_eq!(duty().run(&test.runtime).await.unwrap(), 0);
        assert_eq!(test.pipelines_fired(id).await.len(), 1, "a second pipeline");
        let skips = test.skips(id).await;
        assert_eq!(
            skips,
            ["the previous firing's pipeline had not ended (overlap: skip)"]
        );
        assert_eq!(test.schedule_row(id).await.skipped, 1);

        test.set_schedule(id, due).await;
        sqlx::query("UPDATE pipelines SET status = 'succeeded' WHERE id = $1")
            .bind(pipeline)
            .execute(test.pool())
            .await
            .unwrap();
        assert_eq!(duty().run(&test.runtime).await.unwrap(), 1);
        assert_eq!(test.pipelines_fired(id).await.len(), 2);
    }

    /// A firing that would take the tenant past `max_queued` makes nothing: the skip is
    /// counted and recorded naming the quota.
    #[tokio::test]
    async fn a_firing_past_max_queued_is_skipped_and_recorded() {
        let test = TestDb::new().await;
        test.max_queued(1).await;
        let id = test.schedule("0 0 * * *", "allow", "run_once").await;
        let due = "next_fire_at = now() - interval '1 second'";
        test.set_schedule(id, due).await;
        assert_eq!(duty().run(&test.runtime).await.unwrap(), 1);
        // One job queued: the quota is reached.
        test.set_schedule(id, due).await;
        assert_eq!(duty().run(&test.runtime).await.unwrap(), 0);
        assert_eq!(test.fired(id).await.len(), 1, "enqueued past max_queued");
        let skips = test.skips(id).await;
        assert_eq!(skips.len(), 1);
        assert!(skips[0].contains("quota max_queued"), "{skips:?}");
        let row = test.schedule_row(id).await;
        assert_eq!(row.skipped, 1);
        assert!(row.last_fired_at.is_some());
    }

    /// A firing counts `max_queued` with the tenant locked, as submissions do: one firing
    /// while a submission had written its job but not yet committed counted without it, and
    /// the two went past the quota.
    #[tokio::test]
    async fn a_firing_waits_for_a_submission_in_flight_to_count_it() {
        let test = TestDb::new().await;
        test.max_queued(1).await;
        let id = test.schedule("0 0 * * *", "allow", "run_once").await;
        test.set_schedule(id, "next_fire_at = now() - interval '1 second'")
            .await;
        // A submission in flight: the tenant locked and its job written, not committed.
        let mut submission = test.pool().begin().await.unwrap();
        shared::quotas::lock_tenant(&mut submission, test.tenant)
            .await
            .unwrap();
        let job = shared::store::NewJob {
            id: Uuid::now_v7(),
            kind: "canary".into(),
            payload: json!({}),
            idempotency_key: None,
            priority: 0,
            max_attempts: 1,
            run_at: None,
        };
        let key = Uuid::now_v7();
        shared::store::insert_jobs(&mut submission, test.tenant, key, &[job], None)
            .await
            .unwrap();
        let runtime = test.runtime.clone();
        let firing = tokio::spawn(async move { duty().run(&runtime).await.unwrap() });
        tokio::time::sleep(Duration::from_millis(500)).await;
        submission.commit().await.unwrap();
        assert_eq!(firing.await.unwrap(), 0, "fired past max_queued");
        assert_eq!(test.fired(id).await.len(), 0);
        let skips = test.skips(id).await;
        assert!(skips[0].contains("quota max_queued"), "{skips:?}");
    }

    /// A firing holds its tenant locked for its own firing only: a pass was one transaction,
    /// so a tenant whose schedule fired first stayed locked while a later schedule of another
    /// tenant waited (for that tenant's lock here; for its rate draw as well), and the first
    /// tenant's submissions waited with it.
    #[tokio::test]
    async fn a_firing_locks_its_tenant_for_its_own_firing_only() {
        let test = TestDb::new().await;
        test.max_queued(10).await;
        let other = test.other_tenant().await;
        sqlx::query("INSERT INTO tenant_limits (tenant_id, max_queued) VALUES ($1, 10)")
            .bind(other)
            .execute(test.pool())
            .await
            .unwrap();
        let first = test.schedule("0 0 * * *", "allow", "run_once").await;
        test.set_schedule(first, "next_fire_at = now() - interval '2 seconds'")
            .await;
        let second = test.schedule("0 0 * * *", "allow", "run_once").await;
        test.set_schedule(
            second,
            &format!("tenant_id = '{other}', next_fire_at = now() - interval '1 second'"),
        )
        .await;
        // A submission of the other tenant in flight: its lock held.
        let mut busy = test.pool().begin().await.unwrap();
        shared::quotas::lock_tenant(&mut busy, other).await.unwrap();
        let runtime = test.runtime.clone();
        let firing = tokio::spawn(async move { duty().run(&runtime).await.unwrap() });
        // The first schedule has fired; the second waits for the other tenant's lock.
        let waiting = "SELECT count(*) FROM pg_stat_activity
                       WHERE datname = current_database() AND wait_event_type = 'Lock'";
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while sqlx::query_scalar::<_, i64>(waiting)
            .fetch_one(test.pool())
            .await
            .unwrap()
            == 0
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the firing never waited"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A submission of the first tenant takes its lock at once.
        let mut submission = test.pool().begin().await.unwrap();
        sqlx::query("SET LOCAL lock_timeout = '2s'")
            .execute(&mut *submission)
            .await
            .unwrap();
        let locked = shared::quotas::lock_tenant(&mut submission, test.tenant).await;
        submission.rollback().await.unwrap();
        busy.commit().await.unwrap();
        assert_eq!(firing.await.unwrap(), 2);
        assert!(
            locked.is_ok(),
            "the tenant stayed locked behind another tenant's firing: {locked:?}"
        );
        assert_eq!(test.fired(first).await.len(), 1);
        assert_eq!(test.fired(second).await.len(), 1);
    }

    /// A tenant whose row another transaction holds for long (a bulk retry, say) held up every
    /// other tenant's firings for as long: a firing waits `FIRING_LOCK_WAIT` for it, then the
    /// tenant's schedules are passed over for the pass, and those waits use up none of it (its
    /// many due schedules failing one by one, 5 s each, filled every pass).
    #[tokio::test]
    async fn a_tenant_held_for_long_holds_up_no_other_tenants_firing() {
        let test = TestDb::new().await;
        test.max_queued(10).await;
        let other = test.other_tenant().await;
        let mut held = Vec::new();
        for _ in 0..3 {
            let id = test.schedule("0 0 * * *", "allow", "run_once").await;
            test.set_schedule(id, "next_fire_at = now() - interval '2 seconds'")
                .await;
            held.push(id);
        }
        let theirs = test.schedule("0 0 * * *", "allow", "run_once").await;
        test.set_schedule(
            theirs,
            &format!("tenant_id = '{other}', next_fire_at = now() - interval '1 second'"),
        )
        .await;
        let mut busy = test.pool().begin().await.unwrap();
        shared::quotas::lock_tenant(&mut busy, test.tenant)
            .await
            .unwrap();
        let mut duty = duty();
        duty.schedule.batch = 2;
        let pass = tokio::time::timeout(Duration::from_secs(9), duty.run(&test.runtime)).await;
        assert_eq!(pass.expect("one wait for the held tenant").unwrap(), 1);
        assert_eq!(test.fired(theirs).await.len(), 1);
        busy.commit().await.unwrap();
        assert_eq!(duty.run(&test.runtime).await.unwrap(), 3);
        for id in held {
            assert_eq!(test.fired(id).await.len(), 1);
        }
    }
}
