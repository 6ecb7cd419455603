//! Queued rows whose queue message is gone (a failed push, a Redis restart): pushed again.
//! Also drops what apalis keeps of finished tasks.

use shared::{model::QueueMessage, store, Settings};
use std::{collections::BTreeMap, time::Duration};

use super::{Duty, Schedule};
use crate::Runtime;

pub(crate) struct Stale {
    pub schedule: Schedule,
    /// A queued row untouched this long is looked at.
    pub age: Duration,
}

impl Stale {
    /// Every `CONVEYOR_RESCUE_AFTER_SECS`, rows untouched that long.
    pub fn new(settings: &Settings) -> Self {
        Self {
            schedule: Schedule {
                name: "stale re-push",
                interval: settings.rescue_after,
                batch: 1000,
            },
            age: settings.rescue_after,
        }
    }
}

#[async_trait::async_trait]
impl Duty for Stale {
    fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// Returns how many jobs it pushed again.
    async fn run(&self, runtime: &Runtime) -> anyhow::Result<usize> {
        let stale = store::stale_queued(runtime.pool(), self.age, self.schedule.batch).await?;
        let mut by_kind: BTreeMap<&str, Vec<QueueMessage>> = BTreeMap::new();
        for moved in &stale {
            by_kind.entry(&moved.kind).or_default().push(QueueMessage {
                job_id: moved.id,
                generation: moved.attempt,
            });
        }
        let mut lost = Vec::new();
        for (kind, messages) in by_kind {
            let present = runtime.queues().present(kind, &messages).await?;
            lost.extend(
                messages
                    .into_iter()
                    .zip(present)
                    .filter(|(_, present)| !present)
                    .map(|(message, _)| (kind.to_owned(), message)),
            );
        }
        let pushed = lost.len();
        if pushed > 0 {
            tracing::warn!(count = pushed, "re-enqueued jobs missing from Redis");
            runtime.push(lost).await;
        }
        // Looked at: the next scan moves on to others.
        let ids: Vec<_> = stale.iter().map(|m| m.id).collect();
        store::touch(runtime.pool(), &ids).await?;
        for kind in runtime.registry().kinds() {
            runtime.queues().forget_done(kind, 10_000).await?;
        }
        Ok(pushed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maintenance::test_support::TestDb;

    #[tokio::test]
    async fn queued_jobs_missing_from_redis_are_pushed_again() {
        let test = TestDb::new().await;
        let lost = test.job("canary", "queued").await;
        let held = test.job("canary", "queued").await;
        let recent = test.job("canary", "queued").await;
        for id in [lost, held] {
            sqlx::query(
                "UPDATE dispatched_jobs SET pushed_at = now() - interval '1 hour' WHERE job_id = $1",
            )
            .bind(id)
            .execute(test.pool())
            .await
            .unwrap();
        }
        let message = QueueMessage {
            job_id: held,
            generation: 0,
        };
        test.runtime
            .queues()
            .push("canary", &[message])
            .await
            .unwrap();

        let pushed = Stale::new(test.runtime.settings())
            .run(&test.runtime)
            .await
            .unwrap();

        assert_eq!(pushed, 1);
        assert!(test.in_queue(lost).await, "the lost job was not pushed");
        assert!(test.in_queue(held).await);
        // Too recent to be looked at: its push may still be on the way.
        assert!(!test.in_queue(recent).await);
        // Both were looked at, so the next scan finds neither.
        let again = store::stale_queued(test.pool(), Duration::from_secs(60), 10)
            .await
            .unwrap();
        assert!(again.is_empty(), "{again:?}");
    }
}
