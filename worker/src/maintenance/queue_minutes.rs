//! The per-minute rollup behind the dashboard's queue charts (`GET /v1/queues/history`): per
//! queue and minute, the jobs that succeeded, failed and were cancelled with their summed run
//! time (what `/metrics` reports of the last hour), and the most jobs seen waiting.
//!
//! Each run recounts the ended jobs from the minute before the last one rolled up (so a job
//! that ended as a minute turned is counted, and a leader that was away catches up, at most an
//! hour back) through the `jobs_finished` index, then samples the `queued` rows per kind
//! (`jobs_held`). The counts are set, not added, so a rerun or a second leader never counts a
//! job twice. Rows older than a day are deleted.

use chrono::{DateTime, Utc};
use std::time::Duration;

use super::{Duty, Schedule};
use crate::Runtime;

pub(crate) struct QueueMinutes {
    pub schedule: Schedule,
}

impl Default for QueueMinutes {
    /// Every 15 seconds: a chart's last point is at most that late.
    fn default() -> Self {
        Self {
            schedule: Schedule {
                name: "queue rollup",
                interval: Duration::from_secs(15),
                batch: 0,
            },
        }
    }
}

#[async_trait::async_trait]
impl Duty for QueueMinutes {
    fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// Returns how many (queue, minute) rows it wrote.
    async fn run(&self, runtime: &Runtime) -> anyhow::Result<usize> {
        let pool = runtime.pool();
        let mut tx = pool.begin().await?;
        // Bound as a value, not a subquery: the planner then sees a recent range and walks
        // the `jobs_finished` index.
        let since: DateTime<Utc> = sqlx::query_scalar(
            "SELECT greatest(date_trunc('minute', now()) - interval '1 hour',
                             coalesce(max(minute), '-infinity') - interval '1 minute')
             FROM queue_minutes",
        )
        .fetch_one(&mut *tx)
        .await?;
        let ended = sqlx::query(
            "WITH ended AS (
                 SELECT kind, date_trunc('minute', finished_at) AS minute, status,
                        coalesce(extract(epoch FROM finished_at - started_at), 0)::float8 AS ran
                 FROM jobs
                 WHERE finished_at >= $1 AND status IN ('succeeded', 'failed', 'cancelled'))
             INSERT INTO queue_minutes (kind, minute, succeeded, failed, cancelled,
                                        succeeded_seconds, failed_seconds, cancelled_seconds)
             SELECT kind, minute,
                    count(*) FILTER (WHERE status = 'succeeded'),
                    count(*) FILTER (WHERE status = 'failed'),
                    count(*) FILTER (WHERE status = 'cancelled'),
                    coalesce(sum(ran) FILTER (WHERE status = 'succeeded'), 0),
                    coalesce(sum(ran) FILTER (WHERE status = 'failed'), 0),
                    coalesce(sum(ran) FILTER (WHERE status = 'cancelled'), 0)
             FROM ended
             GROUP BY 1, 2
             ON CONFLICT (kind, minute) DO UPDATE
                 SET succeeded = EXCLUDED.succeeded, failed = EXCLUDED.failed,
                     cancelled = EXCLUDED.cancelled,
                     succeeded_seconds = EXCLUDED.succeeded_seconds,
                     failed_seconds = EXCLUDED.failed_seconds,
                     cancelled_seconds = EXCLUDED.cancelled_seconds",
        )
        .bind(since)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        // Every kind this deployment runs gets a row for this minute, zero included: a gap in
        // a chart then means the rollup was not running, not an idle queue.
        let kinds: Vec<&str> = runtime.registry().kinds().collect();
        let sampled = sqlx::query(
            "WITH waiting AS (SELECT kind, count(*)::int AS n FROM jobs WHERE status = 'queued' GROUP BY kind),
                  kinds AS (SELECT unnest($1::text[]) AS kind UNION SELECT kind FROM waiting)
             INSERT INTO queue_minutes (kind, minute, waiting)
             SELECT kinds.kind, date_trunc('minute', now()), coalesce(waiting.n, 0)
             FROM kinds LEFT JOIN waiting USING (kind)
             ON CONFLICT (kind, minute) DO UPDATE
                 SET waiting = greatest(queue_minutes.waiting, EXCLUDED.waiting)",
        )
        .bind(&kinds)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("DELETE FROM queue_minutes WHERE minute < now() - interval '1 day'")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((ended + sampled) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maintenance::test_support::TestDb;
    use uuid::Uuid;

    /// (kind, minutes ago, succeeded, failed, waiting) of every row, oldest first.
    async fn rows(test: &TestDb) -> Vec<(String, i32, i32, i32, Option<i32>)> {
        sqlx::query_as(
            "SELECT kind,
                    extract(epoch FROM date_trunc('minute', now()) - minute)::int / 60,
                    succeeded, failed, waiting
             FROM queue_minutes ORDER BY minute, kind",
        )
        .fetch_all(test.pool())
        .await
        .unwrap()
    }

    /// A job of `kind` in `status` that ended `ago` (an interval) before now.
    async fn ended(test: &TestDb, kind: &str, status: &str, ago: &str) -> Uuid {
        let id = test.job(kind, status).await;
        test.set(id, &format!("finished_at = now() - interval '{ago}'"))
            .await;
        id
    }

    #[tokio::test]
    async fn minutes_count_ended_and_waiting_jobs_once_however_often_they_run() {
        let test = TestDb::new().await;
        // Timestamps a few seconds into their minute would cross into the next one on a slow
        // run: wait out the end of a minute.
        let second: f64 = sqlx::query_scalar("SELECT extract(second FROM now())::float8")
            .fetch_one(test.pool())
            .await
            .unwrap();
        if second > 50.0 {
            tokio::time::sleep(Duration::from_secs_f64(61.0 - second)).await;
        }
        let now_second: f64 = sqlx::query_scalar("SELECT extract(second FROM now())::float8")
            .fetch_one(test.pool())
            .await
            .unwrap();
        // Ended this minute (at most `now_second` ago), 2 and 3 minutes ago, and 2 hours ago
        // (before the rollup's hour: never counted).
        let this_minute = format!("{} seconds", (now_second / 2.0).floor());
        for (status, ago) in [
            ("succeeded", this_minute.as_str()),
            ("succeeded", this_minute.as_str()),
            ("failed", this_minute.as_str()),
            ("succeeded", "2 minutes"),
            ("failed", "3 minutes"),
            ("succeeded", "2 hours"),
        ] {
            ended(&test, "canary", status, ago).await;
        }
        // Ended in other ways, or not at all: no throughput.
        test.job("canary", "cancelled").await;
        test.job("canary", "running").await;
        for _ in 0..4 {
            test.job("canary", "queued").await;
        }
        test.job("import", "queued").await;

        let duty = QueueMinutes::default();
        duty.run(&test.runtime).await.unwrap();
        let expected = vec![
            ("canary".to_owned(), 3, 0, 1, None),
            ("canary".to_owned(), 2, 1, 0, None),
            ("canary".to_owned(), 0, 2, 1, Some(4)),
            ("import".to_owned(), 0, 0, 0, Some(1)),
        ];
        assert_eq!(rows(&test).await, expected);

        // Runs again: the same counts, not twice them.
        duty.run(&test.runtime).await.unwrap();
        assert_eq!(rows(&test).await, expected);

        // A job ending now and fewer waiting: the minute's count grows, its waiting keeps the
        // most seen.
        ended(&test, "canary", "failed", "0 seconds").await;
        sqlx::query("DELETE FROM jobs WHERE status = 'queued' AND kind = 'canary'")
            .execute(test.pool())
            .await
            .unwrap();
        duty.run(&test.runtime).await.unwrap();
        let now = rows(&test).await;
        assert_eq!(now[2], ("canary".to_owned(), 0, 2, 2, Some(4)), "{now:?}");
    }

    /// Cancelled jobs and each outcome's run time (what `/metrics` reports of the last hour).
    #[tokio::test]
    async fn minutes_sum_each_outcomes_run_time() {
        let test = TestDb::new().await;
        for (status, ran) in [
            ("succeeded", 2),
            ("succeeded", 3),
            ("failed", 7),
            ("cancelled", 11),
        ] {
            let id = ended(&test, "canary", status, "5 minutes").await;
            test.set(
                id,
                &format!("started_at = finished_at - interval '{ran} seconds'"),
            )
            .await;
        }
        // Cancelled while it waited: counted, never ran.
        let waited = ended(&test, "canary", "cancelled", "5 minutes").await;
        test.set(waited, "started_at = NULL").await;

        QueueMinutes::default().run(&test.runtime).await.unwrap();
        let sums: (i32, i32, i32, f64, f64, f64) = sqlx::query_as(
            "SELECT succeeded, failed, cancelled, succeeded_seconds, failed_seconds,
                    cancelled_seconds
             FROM queue_minutes WHERE kind = 'canary' AND succeeded > 0",
        )
        .fetch_one(test.pool())
        .await
        .unwrap();
        assert_eq!(sums, (2, 1, 2, 5.0, 7.0, 11.0));
    }

    #[tokio::test]
    async fn a_returning_leader_catches_up_within_the_hour_and_old_minutes_go() {
        let test = TestDb::new().await;
        // The last run was 40 minutes ago; jobs ended since, and 2 hours ago.
        sqlx::query(
            "INSERT INTO queue_minutes (kind, minute, waiting) VALUES
                 ('canary', date_trunc('minute', now()) - interval '40 minutes', 0),
                 ('canary', date_trunc('minute', now()) - interval '2 days', 0)",
        )
        .execute(test.pool())
        .await
        .unwrap();
        ended(&test, "canary", "succeeded", "30 minutes").await;
        ended(&test, "canary", "succeeded", "50 minutes").await;

        QueueMinutes::default().run(&test.runtime).await.unwrap();
        let minutes: Vec<(i32, i32)> = rows(&test)
            .await
            .into_iter()
            .map(|(_, ago, succeeded, ..)| (ago, succeeded))
            .collect();
        // The minute 30 minutes back is caught up; 50 minutes back was before the last run
        // (counted then, or by no one: the rollup does not rescan its past); 2 days back is
        // deleted.
        assert_eq!(minutes, [(40, 0), (30, 1), (0, 0)]);
    }
}
