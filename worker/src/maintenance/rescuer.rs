//! Running jobs of workers whose lease lapsed (kill -9, a lost node): queued again and announced,
//! or failed when out of attempts or poison (`CONVEYOR_MAX_WORKER_DEATHS`); announced.

use shared::{store, Settings};
use std::time::Duration;

use super::{drain, Duty, Schedule};
use crate::{runtime::Change, Runtime};

pub(crate) struct Rescuer {
    pub schedule: Schedule,
    /// A worker silent this long has lost its jobs.
    pub rescue_after: Duration,
    pub max_worker_deaths: i32,
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
        }
    }
}

#[async_trait::async_trait]
impl Duty for Rescuer {
    fn schedule(&self) -> Schedule {
        self.schedule
    }

    async fn run(&self, runtime: &Runtime) -> anyhow::Result<usize> {
        drain(self.schedule.batch, || async {
            let orphans = store::rescue_orphans(
                runtime.pool(),
                self.rescue_after,
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
        .await
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
        let mut rescuer = Rescuer::new(test.runtime.settings());
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
        assert_eq!(test.status(safe).await.as_deref(), Some("running"));
        assert!(test.events(safe).await.is_empty());
    }
}
