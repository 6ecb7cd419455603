//! Scheduled and retrying jobs whose `run_at` has come: queued and announced.

use shared::store;
use std::time::Duration;

use super::{Duty, Schedule};
use crate::{runtime::Change, Runtime};

pub(crate) struct Scheduler {
    pub schedule: Schedule,
}

impl Default for Scheduler {
    /// A scheduled job starts within a quarter of a second of its time; 1,000 per run.
    fn default() -> Self {
        Self {
            schedule: Schedule {
                name: "scheduler",
                interval: Duration::from_millis(250),
                batch: 1000,
            },
        }
    }
}

#[async_trait::async_trait]
impl Duty for Scheduler {
    fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// Batch after batch until the due jobs are all queued: one batch a tick let a tenant's
    /// million jobs due at once hold every other tenant's retries and scheduled jobs back by
    /// minutes (4,000 a second). Each batch gives every tenant with due jobs its share, so
    /// another tenant's due job waits one batch, not the backlog. Once queued, claims share
    /// them fairly.
    async fn run(&self, runtime: &Runtime) -> anyhow::Result<usize> {
        let mut promoted = 0;
        loop {
            let (due, more) = store::promote_due(runtime.pool(), self.schedule.batch).await?;
            promoted += due.len();
            runtime
                .dispatch_now(due.iter().filter_map(Change::moved).collect())
                .await;
            if !more {
                return Ok(promoted);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maintenance::test_support::TestDb;

    #[tokio::test]
    async fn due_scheduled_and_retrying_jobs_are_queued_and_announced() {
        let test = TestDb::new().await;
        let scheduled = test.job("canary", "scheduled").await;
        test.set(scheduled, "run_at = now() - interval '1 second'")
            .await;
        let retrying = test.job("canary", "retrying").await;
        test.set(retrying, "run_at = now() - interval '1 second'")
            .await;
        let later = test.job("canary", "scheduled").await;
        test.set(later, "run_at = now() + interval '1 hour'").await;
        let running = test.job("canary", "running").await;

        let promoted = Scheduler::default().run(&test.runtime).await.unwrap();

        assert_eq!(promoted, 2);
        assert!(test.announced("canary"), "not announced");
        for id in [scheduled, retrying] {
            assert_eq!(test.status(id).await.as_deref(), Some("queued"));
            assert_eq!(test.events(id).await, ["queued"]);
        }
        assert_eq!(test.status(later).await.as_deref(), Some("scheduled"));
        assert!(test.events(later).await.is_empty());
        assert_eq!(test.status(running).await.as_deref(), Some("running"));
    }

    /// A scheduled job of another tenant, due a second ago.
    async fn another_tenants_due_job(test: &TestDb) -> uuid::Uuid {
        let other = test.other_tenant().await;
        let theirs = test.job("canary", "scheduled").await;
        test.set(
            theirs,
            &format!("tenant_id = '{other}', run_at = now() - interval '1 second'"),
        )
        .await;
        theirs
    }

    /// Each batch gives every tenant with due jobs its share: another tenant's job, due after
    /// all of one tenant's backlog, goes in the first batch.
    #[tokio::test]
    async fn a_batch_promotes_each_tenants_share_of_the_due_jobs() {
        let test = TestDb::new().await;
        sqlx::query(
            "INSERT INTO jobs (id, tenant_id, kind, status, payload, run_at)
             SELECT gen_random_uuid(), $1, 'canary', 'scheduled', '{}',
                    now() - interval '1 hour' + i * interval '1 ms'
             FROM generate_series(1, 3000) i",
        )
        .bind(test.tenant)
        .execute(test.pool())
        .await
        .unwrap();
        let theirs = another_tenants_due_job(&test).await;

        let (first, more) = store::promote_due(test.pool(), 1000).await.unwrap();

        assert!(more, "the backlog is not all queued yet");
        assert!(
            first.iter().any(|job| job.id == theirs),
            "the other tenant's due job waited behind the backlog"
        );
        assert!(first.len() <= 1001, "{} in a batch of 1,000", first.len());
        // The backlog's share is its oldest jobs.
        let oldest_left: bool = sqlx::query_scalar(
            "SELECT max(run_at) FILTER (WHERE status = 'queued')
                    < min(run_at) FILTER (WHERE status = 'scheduled')
             FROM jobs WHERE tenant_id = $1",
        )
        .bind(test.tenant)
        .fetch_one(test.pool())
        .await
        .unwrap();
        assert!(oldest_left);
        assert_eq!(
            Scheduler::default().run(&test.runtime).await.unwrap(),
            3001 - first.len()
        );
    }

    /// More tenants due than a batch's size: the batch takes one job each of the longest due
    /// (every due tenant took one, so a batch of 1,000 could promote 50,000 jobs).
    #[tokio::test]
    async fn a_batch_takes_no_more_tenants_than_its_size() {
        let test = TestDb::new().await;
        let mut due = Vec::new();
        for seconds in [3, 2, 1] {
            let tenant = test.other_tenant().await;
            let id = test.job("canary", "scheduled").await;
            test.set(
                id,
                &format!("tenant_id = '{tenant}', run_at = now() - interval '{seconds} seconds'"),
            )
            .await;
            due.push(id);
        }
        let (first, more) = store::promote_due(test.pool(), 2).await.unwrap();
        let mut promoted: Vec<_> = first.iter().map(|job| job.id).collect();
        promoted.sort();
        assert_eq!(promoted, due[..2]);
        assert!(more);
        let (second, _) = store::promote_due(test.pool(), 2).await.unwrap();
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].id, due[2]);
    }

    /// A run promotes batch after batch until nothing is due: another tenant's job due just
    /// after one tenant's backlog waited a tick per batch of it.
    #[tokio::test]
    async fn a_run_promotes_every_due_job_in_batches() {
        let test = TestDb::new().await;
        for _ in 0..5 {
            let id = test.job("canary", "scheduled").await;
            test.set(id, "run_at = now() - interval '2 seconds'").await;
        }
        let theirs = another_tenants_due_job(&test).await;
        let mut scheduler = Scheduler::default();
        scheduler.schedule.batch = 2;
        assert_eq!(scheduler.run(&test.runtime).await.unwrap(), 6);
        assert_eq!(test.status(theirs).await.as_deref(), Some("queued"));
        assert_eq!(scheduler.run(&test.runtime).await.unwrap(), 0);
    }
}
