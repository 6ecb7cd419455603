//! Rows of `workers` whose process stopped heart-beating longer ago than
//! `CONVEYOR_WORKER_RETENTION_HOURS`, and that hold no running job: deleted.

use shared::{store, Settings};
use std::time::Duration;

use super::{drain, Duty, Schedule};
use crate::Runtime;

pub(crate) struct Workers {
    pub schedule: Schedule,
    /// `None`: keep them forever.
    pub retention: Option<Duration>,
}

impl Workers {
    /// Every 10 minutes.
    pub fn new(settings: &Settings) -> Self {
        Self {
            schedule: Schedule {
                name: "worker pruning",
                interval: Duration::from_secs(600),
                batch: 1000,
            },
            retention: settings.worker_retention,
        }
    }
}

#[async_trait::async_trait]
impl Duty for Workers {
    fn schedule(&self) -> Schedule {
        self.schedule
    }

    async fn run(&self, runtime: &Runtime) -> anyhow::Result<usize> {
        let Some(retention) = self.retention else {
            return Ok(0);
        };
        let batch = self.schedule.batch;
        drain(batch, || async {
            Ok(store::prune_workers(runtime.pool(), retention, batch).await? as usize)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maintenance::test_support::TestDb;

    async fn worker(test: &TestDb, name: &str, silent_for: &str, stopped: bool) {
        sqlx::query(
            "INSERT INTO workers (name, queues, heartbeat_at, stopped_at)
             VALUES ($1, '{}', now() - $2::interval,
                     CASE WHEN $3 THEN now() - $2::interval END)",
        )
        .bind(name)
        .bind(silent_for)
        .bind(stopped)
        .execute(test.pool())
        .await
        .unwrap();
    }

    async fn names(test: &TestDb) -> Vec<String> {
        sqlx::query_scalar("SELECT name FROM workers ORDER BY name")
            .fetch_all(test.pool())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn long_silent_workers_without_running_jobs_are_pruned() {
        let test = TestDb::new().await;
        worker(&test, "crashed", "2 days", false).await;
        worker(&test, "stopped", "3 days", true).await;
        worker(&test, "crashed-2", "25 hours", false).await;
        worker(&test, "fresh", "0 seconds", false).await;
        worker(&test, "recently-stopped", "1 hour", true).await;
        // Long silent, but still the owner of a running job: the rescuer's to handle first.
        worker(&test, "holding", "2 days", false).await;
        let job = test.job("canary", "running").await;
        test.set(job, "worker = 'holding'").await;

        let mut workers = Workers::new(test.runtime.settings());
        workers.schedule.batch = 2;
        assert_eq!(workers.retention, Some(Duration::from_secs(24 * 3600)));
        let pruned = workers.run(&test.runtime).await.unwrap();

        assert_eq!(pruned, 3);
        assert_eq!(names(&test).await, ["fresh", "holding", "recently-stopped"]);
    }

    #[tokio::test]
    async fn without_a_retention_no_worker_is_pruned() {
        let test = TestDb::new().await;
        worker(&test, "crashed", "400 days", false).await;
        let workers = Workers {
            retention: None,
            ..Workers::new(test.runtime.settings())
        };
        assert_eq!(workers.run(&test.runtime).await.unwrap(), 0);
        assert_eq!(names(&test).await, ["crashed"]);
    }
}
