//! Finished jobs (succeeded, failed, cancelled) older than their tenant's retention, else
//! `CONVEYOR_JOB_RETENTION_DAYS`: deleted with their artifacts and event streams. Live jobs
//! are never touched.
//!
//! What refers to a job: its artifacts (`artifacts/<job>/` in the object store), its event
//! stream in Redis (which expires by itself after `CONVEYOR_EVENTS_TTL_SECS`), `documents.job_id`
//! (which ingest last wrote the document: a plain column, kept), and in target databases a
//! patch's snapshot, which `patch_rollback` can only use while the patch's row exists: a patch
//! job is kept at least as long as `CONVEYOR_SNAPSHOT_RETENTION_HOURS`. (An import's leftover
//! staging table is dropped by the sweeps only while its job's row says it ended; they run every
//! 5 minutes, so only a target unreachable for the whole retention keeps one.)

use shared::{objects::DeleteTimedOut, store, store::Deleted, Settings};
use std::time::Duration;
use uuid::Uuid;

use super::{Duty, Schedule};
use crate::Runtime;

pub(crate) struct Retention {
    pub schedule: Schedule,
    /// `None`: keep finished jobs forever (unless their tenant's retention says otherwise).
    pub retention: Option<Duration>,
    /// How long a patch's snapshot lives: its job is kept at least this long.
    pub snapshot_retention: Duration,
}

/// How many due jobs a run reads at a time (unlocked): it locks and deletes them a batch at a
/// time.
const PAGE: i64 = 1000;

impl Retention {
    /// Every minute, 16 jobs a transaction: a batch's rows stay locked while their artifacts
    /// are deleted, all at once, within `CONVEYOR_OBJECT_DELETE_TIMEOUT_SECS` (a thousand rows
    /// locked across a slow store's deletions held up whatever else wanted them, for minutes).
    pub fn new(settings: &Settings) -> Self {
        Self {
            schedule: Schedule {
                name: "job retention",
                interval: Duration::from_secs(60),
                batch: 16,
            },
            retention: settings.job_retention,
            snapshot_retention: settings.snapshot_retention,
        }
    }

    /// One batch: the jobs still due among `due` are locked, and deleted in a transaction that
    /// commits only once their artifacts are gone, so a failure leaves rows (deleted again
    /// next run), never unowned objects. A job whose artifacts cannot be deleted (a bucket's
    /// object under a lock, a store that does not answer) is kept and logged; the others go on
    /// without it. Returns how many jobs went, and whether every deletion timed out.
    async fn delete_batch(
        &self,
        runtime: &Runtime,
        due: &[Deleted],
    ) -> anyhow::Result<(usize, bool)> {
        let mut tx = runtime.pool().begin().await?;
        let ids: Vec<Uuid> = due.iter().map(|job| job.id).collect();
        let locked =
            store::lock_past_retention(&mut *tx, self.retention, self.snapshot_retention, &ids)
                .await?;
        let objects = runtime.objects();
        let results =
            futures::future::join_all(locked.iter().map(|job| objects.delete_artifacts(job.id)))
                .await;
        let (mut deleted, mut timed_out) = (Vec::with_capacity(locked.len()), 0);
        for (job, result) in locked.iter().zip(results) {
            match result {
                Ok(()) => deleted.push(job),
                Err(e) => {
                    timed_out += usize::from(e.is::<DeleteTimedOut>());
                    tracing::warn!(
                        job = %job.id, error = %e,
                        "a finished job's artifacts could not be deleted; the job is kept"
                    );
                }
            }
        }
        let ids: Vec<_> = deleted.iter().map(|job| job.id).collect();
        store::delete_jobs(&mut *tx, &ids).await?;
        tx.commit().await?;
        let streams: Vec<_> = deleted.iter().map(|job| (job.tenant_id, job.id)).collect();
        if let Err(e) = runtime.events().forget_jobs(&streams).await {
            // They expire by themselves.
            tracing::debug!(error = %e, "event streams of deleted jobs left to expire");
        }
        Ok((deleted.len(), timed_out > 0 && timed_out == locked.len()))
    }
}

#[async_trait::async_trait]
impl Duty for Retention {
    fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// The due jobs from the oldest on, a page at a time past the last one seen (the rows a
    /// run keeps, a tenant's kept for ever, are read once), deleted a batch at a time. A batch
    /// whose every deletion timed out ends the run (the store is not answering: the next run
    /// tries again, rather than this one waiting out each batch of the backlog).
    async fn run(&self, runtime: &Runtime) -> anyhow::Result<usize> {
        let (mut after, mut deleted) = (store::RETENTION_START, 0);
        loop {
            let page = store::finished_past_retention(
                runtime.pool(),
                self.retention,
                self.snapshot_retention,
                PAGE,
                after,
            )
            .await?;
            let Some(last) = page.last() else {
                return Ok(deleted);
            };
            after = (last.finished_at, last.id);
            for batch in page.chunks(self.schedule.batch as usize) {
                let (gone, store_down) = self.delete_batch(runtime, batch).await?;
                deleted += gone;
                if store_down {
                    tracing::warn!(
                        "the object store is not answering; job retention waits for its next run"
                    );
                    return Ok(deleted);
                }
            }
            if (page.len() as i64) < PAGE {
                return Ok(deleted);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maintenance::test_support::TestDb;
    use shared::{
        events::{Event, EventType},
        JobStatus,
    };
    use uuid::Uuid;

    const DAY: u64 = 86400;

    async fn finished(test: &TestDb, kind: &str, status: &str, days_ago: u32) -> Uuid {
        let id = test.job(kind, status).await;
        test.set(
            id,
            &format!("finished_at = now() - interval '{days_ago} days'"),
        )
        .await;
        id
    }

    /// An artifact and a terminal event, as a job that ran leaves them.
    async fn traces(test: &TestDb, id: Uuid) {
        test.runtime
            .objects()
            .put_artifact(id, "report.json", b"{}")
            .await
            .unwrap();
        let event = Event::new(
            id,
            "canary",
            EventType::Succeeded,
            JobStatus::Succeeded,
            1.0,
        );
        test.runtime
            .events()
            .append(&[(test.tenant, event)])
            .await
            .unwrap();
    }

    async fn has_artifact(test: &TestDb, id: Uuid) -> bool {
        let read = test.runtime.objects().read_artifact(id, "report.json");
        read.await.unwrap().is_some()
    }

    #[tokio::test]
    async fn old_finished_jobs_go_with_their_artifacts_and_streams_live_and_recent_ones_stay() {
        let test = TestDb::with(jobs::Registry::default(), |settings| {
            settings.job_retention = Some(Duration::from_secs(10 * DAY));
            settings.snapshot_retention = Duration::from_secs(20 * DAY);
        })
        .await;
        let old_succeeded = finished(&test, "canary", "succeeded", 40).await;
        traces(&test, old_succeeded).await;
        let old_failed = finished(&test, "import", "failed", 11).await;
        let old_cancelled = finished(&test, "canary", "cancelled", 40).await;
        // Past the job retention but not its snapshot's: a rollback still needs the row.
        let young_patch = finished(&test, "patch", "succeeded", 15).await;
        let old_patch = finished(&test, "patch", "failed", 25).await;
        // Past both, but a rollback of it is under way (and may need a retry).
        let rolling_back = finished(&test, "patch", "succeeded", 25).await;
        let rollback = test.job("patch_rollback", "running").await;
        test.set(
            rollback,
            &format!("payload = jsonb_build_object('patch_job_id', '{rolling_back}')"),
        )
        .await;
        let recent = finished(&test, "canary", "succeeded", 9).await;
        traces(&test, recent).await;
        // Live jobs stay whatever their dates say.
        let running = test.job("canary", "running").await;
        test.set(
            running,
            "created_at = now() - interval '40 days', started_at = now() - interval '40 days'",
        )
        .await;
        let queued = test.job("canary", "queued").await;
        test.set(queued, "finished_at = now() - interval '40 days'")
            .await;
        let retrying = test.job("canary", "retrying").await;
        test.set(retrying, "finished_at = now() - interval '40 days'")
            .await;

        let mut retention = Retention::new(test.runtime.settings());
        retention.schedule.batch = 2;
        let deleted = retention.run(&test.runtime).await.unwrap();

        assert_eq!(deleted, 4);
        for id in [old_succeeded, old_failed, old_cancelled, old_patch] {
            assert_eq!(test.status(id).await, None, "{id} kept");
        }
        assert!(!has_artifact(&test, old_succeeded).await);
        assert!(test.events(old_succeeded).await.is_empty());
        for id in [young_patch, rolling_back, recent, running, queued, retrying] {
            assert!(test.status(id).await.is_some(), "{id} deleted");
        }
        assert!(has_artifact(&test, recent).await);
        assert_eq!(test.events(recent).await, ["succeeded"]);
        // Nothing left to delete.
        assert_eq!(retention.run(&test.runtime).await.unwrap(), 0);
    }

    /// A job whose artifacts cannot be deleted is kept; the rest of its batch goes. A step's
    /// job of a pipeline still running is kept whatever its age.
    #[tokio::test]
    async fn an_undeletable_artifact_keeps_its_job_only_and_running_pipelines_keep_their_steps() {
        let test = TestDb::with(jobs::Registry::default(), |settings| {
            settings.job_retention = Some(Duration::from_secs(10 * DAY));
        })
        .await;
        let stuck = finished(&test, "canary", "succeeded", 40).await;
        // Its artifacts' directory is a file: deleting it fails (root or not).
        let dir = test
            .runtime
            .settings()
            .data_dir
            .join(format!("artifacts/{stuck}"));
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        std::fs::write(&dir, b"not a directory").unwrap();
        let after: Vec<Uuid> =
            futures::future::join_all((0..3).map(|_| finished(&test, "canary", "succeeded", 30)))
                .await;
        let step = finished(&test, "canary", "succeeded", 30).await;
        let pipeline = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO pipelines (id, tenant_id, on_failure) VALUES ($1, $2, 'continue')",
        )
        .bind(pipeline)
        .bind(test.tenant)
        .execute(test.pool())
        .await
        .unwrap();
        test.set(step, &format!("pipeline_id = '{pipeline}'")).await;

        // One job a batch: the job kept must not stop the run at its first batch.
        let mut retention = Retention::new(test.runtime.settings());
        retention.schedule.batch = 1;
        assert_eq!(retention.run(&test.runtime).await.unwrap(), 3);
        assert!(
            test.status(stuck).await.is_some(),
            "kept with its artifacts"
        );
        for id in after {
            assert_eq!(test.status(id).await, None, "{id} kept");
        }
        assert!(
            test.status(step).await.is_some(),
            "a running pipeline's step"
        );
        // An ended pipeline may be resumed (a failed step retried) while its row lasts: a
        // succeeded step's job deleted meanwhile was read as failed, and the steps that needed it
        // were cancelled again at once. Its steps' jobs go once the pipeline has (see `history`).
        sqlx::query("UPDATE pipelines SET status = 'failed', finished_at = now() WHERE id = $1")
            .bind(pipeline)
            .execute(test.pool())
            .await
            .unwrap();
        assert_eq!(retention.run(&test.runtime).await.unwrap(), 0);
        assert!(
            test.status(step).await.is_some(),
            "an ended pipeline's step, while the pipeline lasts"
        );
        sqlx::query("DELETE FROM pipelines WHERE id = $1")
            .bind(pipeline)
            .execute(test.pool())
            .await
            .unwrap();
        assert_eq!(retention.run(&test.runtime).await.unwrap(), 1);
        assert_eq!(test.status(step).await, None);
    }

    /// A tenant's own retention wins over the deployment's, both ways: shorter, longer, and
    /// 0 (forever) while the deployment deletes.
    #[tokio::test]
    async fn a_tenants_own_retention_overrides_the_deployments() {
        let test = TestDb::with(jobs::Registry::default(), |settings| {
            settings.job_retention = Some(Duration::from_secs(10 * DAY));
        })
        .await;
        let (brief, keeper) = (test.other_tenant().await, test.other_tenant().await);
        for (tenant, days) in [(brief, 1), (keeper, 0)] {
            sqlx::query(
                "INSERT INTO tenant_limits (tenant_id, job_retention_days) VALUES ($1, $2)",
            )
            .bind(tenant)
            .bind(days)
            .execute(test.pool())
            .await
            .unwrap();
        }
        let aged = |tenant: Uuid, days: u32| {
            let test = &test;
            async move {
                let id = test.held("canary", tenant).await;
                test.set(
                    id,
                    &format!("status = 'succeeded', finished_at = now() - interval '{days} days'"),
                )
                .await;
                id
            }
        };
        let brief_old = aged(brief, 2).await;
        let brief_new = aged(brief, 0).await;
        let kept_forever = aged(keeper, 400).await;
        let default_young = aged(test.tenant, 5).await;
        let default_old = aged(test.tenant, 11).await;

        let deleted = Retention::new(test.runtime.settings())
            .run(&test.runtime)
            .await
            .unwrap();

        assert_eq!(deleted, 2);
        for id in [brief_old, default_old] {
            assert_eq!(test.status(id).await, None, "{id} kept");
        }
        for id in [brief_new, kept_forever, default_young] {
            assert!(test.status(id).await.is_some(), "{id} deleted");
        }

        // The deployment keeping everything does not stop a tenant's own retention.
        let test_forever = TestDb::with(jobs::Registry::default(), |settings| {
            settings.job_retention = None;
        })
        .await;
        let brief = test_forever.other_tenant().await;
        sqlx::query("INSERT INTO tenant_limits (tenant_id, job_retention_days) VALUES ($1, 1)")
            .bind(brief)
            .execute(test_forever.pool())
            .await
            .unwrap();
        let old = test_forever.held("canary", brief).await;
        test_forever
            .set(
                old,
                "status = 'succeeded', finished_at = now() - interval '3 days'",
            )
            .await;
        let deleted = Retention::new(test_forever.runtime.settings())
            .run(&test_forever.runtime)
            .await
            .unwrap();
        assert_eq!(deleted, 1);
    }

    /// An object store that takes connections and never answers holds a batch's rows, no
    /// more, and for no longer than the deletion timeout; the run ends there (it waited out
    /// each batch of the backlog) and the jobs are kept for the next run.
    #[tokio::test]
    async fn a_store_that_never_answers_holds_one_batchs_rows_for_its_timeout_only() {
        let bucket = shared::testing::silent_bucket().await;
        let test = TestDb::with(jobs::Registry::default(), |settings| {
            settings.job_retention = Some(Duration::from_secs(10 * DAY));
            settings.object_delete_timeout = Duration::from_secs(2);
            settings.object_store = Some(bucket);
        })
        .await;
        let due: Vec<Uuid> =
            futures::future::join_all((0..100).map(|_| finished(&test, "canary", "failed", 40)))
                .await;

        let runtime = test.runtime.clone();
        let run = tokio::spawn(async move {
            let retention = Retention::new(runtime.settings());
            retention.run(&runtime).await
        });
        tokio::time::sleep(Duration::from_millis(1000)).await;
        // The rows no other transaction can lock now: the batch being deleted.
        let free: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT id FROM jobs WHERE id = ANY($1)
                                   FOR UPDATE SKIP LOCKED) free",
        )
        .bind(&due)
        .fetch_one(test.pool())
        .await
        .unwrap();
        assert!(free >= 100 - 16, "only {free} of 100 free");
        assert!(free < 100, "no batch was being deleted");
        let deleted = tokio::time::timeout(Duration::from_secs(6), run)
            .await
            .expect("the run ends after its first batch's timeout")
            .unwrap()
            .unwrap();
        assert_eq!(deleted, 0);
        for id in due {
            assert!(
                test.status(id).await.is_some(),
                "{id} deleted without its artifacts"
            );
        }
    }

    #[tokio::test]
    async fn without_a_retention_finished_jobs_are_kept() {
        let test = TestDb::with(jobs::Registry::default(), |settings| {
            settings.job_retention = None;
        })
        .await;
        let old = finished(&test, "canary", "succeeded", 4000).await;
        let retention = Retention::new(test.runtime.settings());
        assert_eq!(retention.run(&test.runtime).await.unwrap(), 0);
        assert!(test.status(old).await.is_some());
    }
}
