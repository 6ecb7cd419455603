//! Ended pipelines (with their steps) and settled webhook deliveries older than their tenant's
//! retention, else `CONVEYOR_JOB_RETENTION_DAYS`: deleted, as finished jobs are by
//! [`super::retention`]. Each is up to a megabyte of stored payload, and nothing else ever
//! removed them. A pipeline with a live job (a bulk retry ran one again) stays.

use std::time::Duration;

use super::{drain, Duty, Schedule};
use crate::Runtime;

pub(crate) struct History {
    pub schedule: Schedule,
    /// `None`: kept for ever (unless their tenant's retention says otherwise).
    pub retention: Option<Duration>,
}

impl History {
    /// Every 5 minutes.
    pub fn new(settings: &shared::Settings) -> Self {
        Self {
            schedule: Schedule {
                name: "history retention",
                interval: Duration::from_secs(300),
                batch: 1000,
            },
            retention: settings.job_retention,
        }
    }
}

#[async_trait::async_trait]
impl Duty for History {
    fn schedule(&self) -> Schedule {
        self.schedule
    }

    async fn run(&self, runtime: &Runtime) -> anyhow::Result<usize> {
        let retention = self.retention.map(|r| r.as_secs_f64());
        let batch = self.schedule.batch;
        let mut deleted = 0;
        for statement in [PIPELINES, DELIVERIES] {
            deleted += drain(batch, || async {
                let done = sqlx::query(statement)
                    .bind(retention)
                    .bind(batch)
                    .execute(runtime.pool())
                    .await?;
                Ok(done.rows_affected() as usize)
            })
            .await?;
        }
        Ok(deleted)
    }
}

/// Up to `$2` ended pipelines past retention (`$1`, see [`shared::past_retention`]), their steps
/// with them.
const PIPELINES: &str = concat!(
    "DELETE FROM pipelines WHERE id IN (
         SELECT p.id FROM pipelines p
         LEFT JOIN tenant_limits l ON l.tenant_id = p.tenant_id
         WHERE p.status IN ('succeeded', 'failed', 'cancelled')
           AND p.finished_at IS NOT NULL AND ",
    shared::past_retention!("p.finished_at"),
    "
           AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.pipeline_id = p.id AND ",
    shared::live_jobs!("j"),
    ")
         LIMIT $2 FOR UPDATE OF p SKIP LOCKED)"
);

/// Up to `$2` delivered or failed webhook deliveries past retention.
const DELIVERIES: &str = concat!(
    "DELETE FROM webhook_deliveries WHERE id IN (
         SELECT d.id FROM webhook_deliveries d
         LEFT JOIN tenant_limits l ON l.tenant_id = d.tenant_id
         WHERE d.status IN ('delivered', 'failed') AND ",
    shared::past_retention!("coalesce(d.delivered_at, d.last_attempt_at, d.created_at)"),
    "
         LIMIT $2 FOR UPDATE OF d SKIP LOCKED)"
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maintenance::test_support::TestDb;
    use uuid::Uuid;

    const DAY: u64 = 86400;

    async fn pipeline(test: &TestDb, status: &str, days_ago: u32) -> Uuid {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO pipelines (id, tenant_id, on_failure, status, finished_at)
             VALUES ($1, $2, 'continue', $3,
                     CASE WHEN $3 = 'running' THEN NULL
                          ELSE now() - make_interval(days => $4) END)",
        )
        .bind(id)
        .bind(test.tenant)
        .bind(status)
        .bind(days_ago as i32)
        .execute(test.pool())
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO pipeline_steps (pipeline_id, name, position, kind, payload, max_attempts)
             VALUES ($1, 'a', 0, 'canary', '{}', 1)",
        )
        .bind(id)
        .execute(test.pool())
        .await
        .unwrap();
        id
    }

    async fn delivery(test: &TestDb, webhook: Uuid, status: &str, days_ago: u32) -> Uuid {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO webhook_deliveries (id, webhook_id, tenant_id, event, payload, status,
                                             created_at)
             VALUES ($1, $2, $3, 'job.succeeded', '{}', $4, now() - make_interval(days => $5))",
        )
        .bind(id)
        .bind(webhook)
        .bind(test.tenant)
        .bind(status)
        .bind(days_ago as i32)
        .execute(test.pool())
        .await
        .unwrap();
        id
    }

    async fn exists(test: &TestDb, table: &str, id: Uuid) -> bool {
        sqlx::query_scalar(&format!(
            "SELECT EXISTS (SELECT 1 FROM {table} WHERE id = $1)"
        ))
        .bind(id)
        .fetch_one(test.pool())
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn old_ended_pipelines_and_settled_deliveries_go_live_and_recent_ones_stay() {
        let test = TestDb::with(jobs::Registry::default(), |settings| {
            settings.job_retention = Some(Duration::from_secs(10 * DAY));
        })
        .await;
        let old = pipeline(&test, "succeeded", 40).await;
        let old_failed = pipeline(&test, "failed", 11).await;
        let recent = pipeline(&test, "cancelled", 9).await;
        let running = pipeline(&test, "running", 40).await;
        // Ended long ago, but a bulk retry runs one of its jobs again.
        let retried = pipeline(&test, "failed", 40).await;
        let job = test.job("canary", "queued").await;
        test.set(
            job,
            &format!("pipeline_id = '{retried}', pipeline_step = 'a'"),
        )
        .await;

        let webhook = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO webhooks (id, tenant_id, url, events, secret_encrypted)
             VALUES ($1, $2, 'https://example.org/hook', '{job.succeeded}', '\\x00')",
        )
        .bind(webhook)
        .bind(test.tenant)
        .execute(test.pool())
        .await
        .unwrap();
        let delivered = delivery(&test, webhook, "delivered", 40).await;
        let gave_up = delivery(&test, webhook, "failed", 40).await;
        let pending = delivery(&test, webhook, "pending", 40).await;
        let fresh = delivery(&test, webhook, "delivered", 2).await;

        let mut history = History::new(test.runtime.settings());
        history.schedule.batch = 1;
        assert_eq!(history.run(&test.runtime).await.unwrap(), 4);

        for gone in [old, old_failed] {
            assert!(!exists(&test, "pipelines", gone).await, "{gone} kept");
        }
        for kept in [recent, running, retried] {
            assert!(exists(&test, "pipelines", kept).await, "{kept} deleted");
        }
        let steps: i64 = sqlx::query_scalar("SELECT count(*) FROM pipeline_steps")
            .fetch_one(test.pool())
            .await
            .unwrap();
        assert_eq!(steps, 3, "the deleted pipelines' steps went with them");
        for gone in [delivered, gave_up] {
            assert!(!exists(&test, "webhook_deliveries", gone).await);
        }
        for kept in [pending, fresh] {
            assert!(exists(&test, "webhook_deliveries", kept).await);
        }
    }
}
