//! Pipelines left behind: a step's job ended but its pipeline did not move on (the worker died
//! between the two, or the job ended by a path that does not advance pipelines: the rescuer, a
//! bulk cancel). Advanced here as the worker would have: the steps that can start get their
//! job, announced and dispatched; the blocked ones are cancelled; ended pipelines finish.
//! Also resumed here: ended pipelines with a step queued again but not resumed (a bulk retry
//! of an earlier version resumed them in a transaction of their own, after its jobs').

use shared::pipelines;
use std::time::Duration;

use super::{Duty, Schedule};
use crate::{runtime::Change, Runtime};

pub(crate) struct Pipelines {
    pub schedule: Schedule,
}

impl Default for Pipelines {
    /// Every second; up to 30 stalled and 30 retried pipelines a transaction, each under a
    /// savepoint: past 64 subtransactions that write, every snapshot taken on the server
    /// (standbys' too) reads the overflowed subtransactions while the transaction lasts.
    fn default() -> Self {
        Self {
            schedule: Schedule {
                name: "pipelines",
                interval: Duration::from_secs(1),
                batch: 30,
            },
        }
    }
}

#[async_trait::async_trait]
impl Duty for Pipelines {
    fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// Returns how many pipelines moved. Goes on while a transaction took a full batch. Each
    /// pipeline moves under a savepoint of its own: one whose advance fails (logged, and tried
    /// again next run) rolled back the whole batch, every run, and with it every other
    /// tenant's pipelines left behind.
    async fn run(&self, runtime: &Runtime) -> anyhow::Result<usize> {
        let (mut moved, mut failing) = (0, Vec::new());
        loop {
            let mut tx = runtime.pool().begin().await?;
            // Locked (skipping those an advancer holds) until this transaction ends.
            let stalled = pipelines::stalled(&mut tx, self.schedule.batch, &failing).await?;
            let retried =
                pipelines::retried_but_ended(&mut tx, self.schedule.batch, &failing).await?;
            let mut jobs = Vec::new();
            for pipeline in stalled.iter().chain(&retried) {
                let was_retried = retried.contains(pipeline);
                let mut savepoint = sqlx::Connection::begin(&mut *tx).await?;
                match move_on(&mut savepoint, *pipeline, was_retried, runtime).await {
                    Ok(advanced) => {
                        savepoint.commit().await?;
                        // One an advancer moved meanwhile has nothing left to do.
                        moved += usize::from(advanced.moved() || was_retried);
                        jobs.extend(advanced.jobs);
                    }
                    Err(e) => {
                        savepoint.rollback().await?;
                        tracing::warn!(
                            %pipeline, error = %e,
                            "a pipeline could not move on; it is tried again next run"
                        );
                        failing.push(*pipeline);
                    }
                }
            }
            tx.commit().await?;
            runtime
                .dispatch_now(jobs.iter().map(Change::created).collect())
                .await;
            let full = |found: &Vec<_>| found.len() as i64 >= self.schedule.batch;
            if !full(&stalled) && !full(&retried) {
                return Ok(moved);
            }
        }
    }
}

/// Advances `pipeline`; one `retried` is running again first, its steps cancelled for want of
/// the retried ones waiting again.
async fn move_on(
    db: &mut sqlx::PgConnection,
    pipeline: uuid::Uuid,
    retried: bool,
    runtime: &Runtime,
) -> sqlx::Result<pipelines::Advanced> {
    if retried {
        pipelines::reopen(db, pipeline).await?;
    }
    pipelines::advance(db, pipeline, &runtime.validator()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maintenance::test_support::{announced, TestDb};
    use serde_json::{json, Value};
    use shared::pipelines::{NewPipeline, NewStep, OnFailure};
    use uuid::Uuid;

    fn step(name: &str, needs: &[&str], payload: Value) -> NewStep {
        NewStep {
            name: name.into(),
            kind: "canary".into(),
            payload,
            priority: 0,
            max_attempts: 1,
            needs: needs.iter().map(|s| s.to_string()).collect(),
        }
    }

    impl TestDb {
        /// A pipeline of the test's tenant, submitted as the API does (its first steps started).
        async fn pipeline(&self, on_failure: OnFailure, steps: &[NewStep]) -> Uuid {
            let mut tx = self.pool().begin().await.unwrap();
            let new = NewPipeline {
                name: None,
                on_failure,
                steps: steps.to_vec(),
            };
            let id = pipelines::create(&mut tx, self.tenant, Some(Uuid::now_v7()), &new, None)
                .await
                .unwrap()
                .unwrap();
            pipelines::advance(&mut tx, id, &self.runtime.validator())
                .await
                .unwrap();
            tx.commit().await.unwrap();
            id
        }

        /// (state, reason, job id) of each step, in order; and the pipeline's status.
        async fn steps(&self, id: Uuid) -> (Vec<(String, Option<String>, Option<Uuid>)>, String) {
            let mut conn = self.pool().acquire().await.unwrap();
            let pipeline = pipelines::get(&mut conn, self.tenant, id)
                .await
                .unwrap()
                .unwrap();
            let steps = pipeline
                .steps
                .into_iter()
                .map(|s| (s.state, s.reason, s.job_id))
                .collect();
            (steps, pipeline.status)
        }

        /// Ends a step's job as a worker that died before advancing would have left it.
        async fn end_job(&self, job: Uuid, status: &str, result: Value) {
            sqlx::query(
                "UPDATE jobs SET status = $2, result = $3, attempt = 1, finished_at = now()
                 WHERE id = $1",
            )
            .bind(job)
            .bind(status)
            .bind(result)
            .execute(self.pool())
            .await
            .unwrap();
        }
    }

    /// A step whose needed step's job ended with nobody advancing: the duty starts it once,
    /// however many leaders race, with its reference resolved; then ends the pipeline.
    #[tokio::test]
    async fn a_pipeline_left_behind_moves_on_once() {
        let test = TestDb::new().await;
        let id = test
            .pipeline(
                OnFailure::CancelDependents,
                &[
                    step("first", &[], json!({"steps": 1})),
                    step(
                        "second",
                        &["first"],
                        json!({"steps": "${steps.first.outputs.n}"}),
                    ),
                ],
            )
            .await;
        let (steps, _) = test.steps(id).await;
        assert_eq!(steps[0].0, "queued");
        assert_eq!(steps[1].0, "waiting");
        assert_eq!(Pipelines::default().run(&test.runtime).await.unwrap(), 0);

        test.end_job(
            steps[0].2.unwrap(),
            "succeeded",
            json!({"outputs": {"n": 4}}),
        )
        .await;
        test.announced("canary");
        let other = test.another_runtime().await;
        let (first, second) = (Pipelines::default(), Pipelines::default());
        let (a, b) = tokio::join!(first.run(&test.runtime), second.run(&other));
        assert_eq!(a.unwrap() + b.unwrap(), 1, "advanced once");
        assert_eq!(Pipelines::default().run(&test.runtime).await.unwrap(), 0);
        let jobs: Vec<(Uuid, Value)> =
            sqlx::query_as("SELECT id, payload FROM jobs WHERE pipeline_step = 'second'")
                .fetch_all(test.pool())
                .await
                .unwrap();
        assert_eq!(jobs.len(), 1, "one job for the step");
        assert_eq!(
            jobs[0].1,
            json!({"steps": 4, "step_ms": 0, "fail_first": 0}),
            "the reference resolved, the payload stored as parsed"
        );
        let (steps, status) = test.steps(id).await;
        assert_eq!(steps[1].0, "queued");
        assert_eq!(steps[1].2, Some(jobs[0].0));
        assert_eq!(status, "running");
        // By whichever advanced it.
        assert!(
            test.announced("canary") || announced(&other, "canary"),
            "not announced"
        );
        assert_eq!(test.events(jobs[0].0).await, ["queued"]);

        test.end_job(jobs[0].0, "succeeded", json!({})).await;
        assert_eq!(Pipelines::default().run(&test.runtime).await.unwrap(), 1);
        assert_eq!(test.steps(id).await.1, "succeeded");
        assert_eq!(Pipelines::default().run(&test.runtime).await.unwrap(), 0);
    }

    /// A pipeline that cannot move on (here a trigger refuses its steps' changes) holds up no
    /// other: the whole batch was rolled back with it, every run.
    #[tokio::test]
    async fn a_pipeline_that_cannot_move_on_holds_up_no_other() {
        let test = TestDb::new().await;
        let two = || [step("a", &[], json!({})), step("b", &["a"], json!({}))];
        let (poison, fine) = (
            test.pipeline(OnFailure::CancelDependents, &two()).await,
            test.pipeline(OnFailure::CancelDependents, &two()).await,
        );
        for id in [poison, fine] {
            let (steps, _) = test.steps(id).await;
            test.end_job(steps[0].2.unwrap(), "succeeded", json!({}))
                .await;
        }
        sqlx::query(&format!(
            "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.pipeline_id = '{poison}' THEN RAISE EXCEPTION 'refused'; END IF;
                 RETURN NEW;
             END $$"
        ))
        .execute(test.pool())
        .await
        .unwrap();
        sqlx::query(
            "CREATE TRIGGER refuse_poison BEFORE UPDATE ON pipeline_steps
             FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
        )
        .execute(test.pool())
        .await
        .unwrap();

        assert_eq!(Pipelines::default().run(&test.runtime).await.unwrap(), 1);
        assert_eq!(test.steps(fine).await.0[1].0, "queued");
        assert_eq!(test.steps(poison).await.0[1].0, "waiting");
        // Tried again each run, still alone.
        assert_eq!(Pipelines::default().run(&test.runtime).await.unwrap(), 0);
    }

    /// A failed step: its dependents (and theirs) are cancelled with the reason under
    /// `cancel_dependents`; they start under `continue`, where a reference to the failed step's
    /// output fails its step clearly.
    #[tokio::test]
    async fn failures_cancel_dependents_or_let_them_run() {
        let test = TestDb::new().await;
        let chain = |p: &str| {
            vec![
                step("a", &[], json!({})),
                step("b", &["a"], json!({})),
                step(
                    "c",
                    &["a", "b"],
                    json!({"steps": format!("${{steps.a.outputs.{p}}}")}),
                ),
            ]
        };
        let cancel = test
            .pipeline(OnFailure::CancelDependents, &chain("n"))
            .await;
        let go_on = test.pipeline(OnFailure::Continue, &chain("n")).await;
        for id in [cancel, go_on] {
            let job = test.steps(id).await.0[0].2.unwrap();
            test.end_job(job, "failed", Value::Null).await;
        }
        assert_eq!(Pipelines::default().run(&test.runtime).await.unwrap(), 2);

        let (steps, status) = test.steps(cancel).await;
        assert_eq!(status, "failed");
        assert_eq!(steps[1].0, "cancelled");
        assert_eq!(
            steps[1].1.as_deref(),
            Some("needs step \"a\", which failed")
        );
        assert_eq!(steps[2].0, "cancelled");
        assert!(steps[1].2.is_none() && steps[2].2.is_none(), "no job made");

        let (steps, status) = test.steps(go_on).await;
        assert_eq!(status, "running");
        assert_eq!(steps[1].0, "queued", "b runs anyway");
        test.end_job(steps[1].2.unwrap(), "succeeded", json!({}))
            .await;
        assert_eq!(Pipelines::default().run(&test.runtime).await.unwrap(), 1);
        let (steps, status) = test.steps(go_on).await;
        assert_eq!(steps[2].0, "failed");
        let reason = steps[2].1.clone().unwrap();
        assert!(
            reason.contains("step \"a\" has no output \"n\""),
            "{reason}"
        );
        assert_eq!(status, "failed");
    }
    /// A bulk retry commits its jobs, then resumes their pipelines in a transaction of its
    /// own. When its process dies between the two, the duty resumes the pipeline: the retried
    /// step's dependents wait again, and start once it succeeds.
    #[tokio::test]
    async fn a_bulk_retry_whose_resume_was_lost_resumes_its_pipeline() {
        use shared::{
            store::{self, BulkChange, JobFilter},
            JobStatus,
        };
        let test = TestDb::new().await;
        let id = test
            .pipeline(
                OnFailure::CancelDependents,
                &[step("a", &[], json!({})), step("b", &["a"], json!({}))],
            )
            .await;
        let job = test.steps(id).await.0[0].2.unwrap();
        test.end_job(job, "failed", Value::Null).await;
        assert_eq!(Pipelines::default().run(&test.runtime).await.unwrap(), 1);
        let (steps, status) = test.steps(id).await;
        assert_eq!(
            (status.as_str(), steps[1].0.as_str()),
            ("failed", "cancelled")
        );

        // The bulk retry's transaction, committed; its resume never runs.
        let filter = JobFilter {
            statuses: vec![JobStatus::Failed, JobStatus::Cancelled],
            kind: None,
            pipeline_id: Some(id),
        };
        let retried = store::change_matching(
            test.pool(),
            test.tenant,
            &filter,
            BulkChange::Retry,
            100,
            None,
        )
        .await
        .unwrap();
        assert_eq!(retried.len(), 1);
        assert_eq!(test.steps(id).await.1, "failed", "not resumed by the retry");

        let other = test.another_runtime().await;
        let (first, second) = (Pipelines::default(), Pipelines::default());
        let (x, y) = tokio::join!(first.run(&test.runtime), second.run(&other));
        assert_eq!(x.unwrap() + y.unwrap(), 1, "resumed once");
        let (steps, status) = test.steps(id).await;
        assert_eq!(status, "running");
        assert_eq!(steps[0].0, "queued");
        assert_eq!(
            (steps[1].0.as_str(), steps[1].1.as_deref()),
            ("waiting", None)
        );
        assert_eq!(Pipelines::default().run(&test.runtime).await.unwrap(), 0);

        test.end_job(job, "succeeded", json!({})).await;
        assert_eq!(Pipelines::default().run(&test.runtime).await.unwrap(), 1);
        let (steps, _) = test.steps(id).await;
        assert_eq!(steps[1].0, "queued", "the dependent started");
        test.end_job(steps[1].2.unwrap(), "succeeded", json!({}))
            .await;
        assert_eq!(Pipelines::default().run(&test.runtime).await.unwrap(), 1);
        assert_eq!(test.steps(id).await.1, "succeeded");
    }

    /// Quotas are checked again when a later step becomes ready: an import step, accepted at
    /// the submit, fails naming `max_rows_per_day` once the tenant's imports used the day's
    /// rows up; its dependent is cancelled, and the pipeline fails.
    #[tokio::test]
    async fn a_later_step_past_a_quota_fails_naming_it() {
        let test = TestDb::new().await;
        let import = |name: &str, needs: &[&str]| NewStep {
            kind: "import".into(),
            ..step(
                name,
                needs,
                json!({"dataset_id": Uuid::now_v7(), "target": {"table": "t"}}),
            )
        };
        let id = test
            .pipeline(
                OnFailure::CancelDependents,
                &[
                    step("first", &[], json!({})),
                    import("load", &["first"]),
                    step("after", &["load"], json!({})),
                ],
            )
            .await;
        // Since the submit, another import wrote the day's 10 rows.
        sqlx::query("INSERT INTO tenant_limits (tenant_id, max_rows_per_day) VALUES ($1, 10)")
            .bind(test.tenant)
            .execute(test.pool())
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO usage_sums (tenant_id, kind, attempts, wall_seconds, cpu_seconds,
                                     rows_written)
             VALUES ($1, 'import', 1, 1, 1, 10)",
        )
        .bind(test.tenant)
        .execute(test.pool())
        .await
        .unwrap();

        let first = test.steps(id).await.0[0].2.unwrap();
        test.end_job(first, "succeeded", json!({})).await;
        assert_eq!(Pipelines::default().run(&test.runtime).await.unwrap(), 1);
        let (steps, status) = test.steps(id).await;
        assert_eq!(steps[1].0, "failed");
        assert!(steps[1].2.is_none(), "no job made for the refused step");
        let reason = steps[1].1.clone().unwrap();
        assert!(reason.contains("max_rows_per_day"), "{reason}");
        assert_eq!(steps[2].0, "cancelled");
        assert_eq!(
            steps[2].1.as_deref(),
            Some("needs step \"load\", which failed")
        );
        assert_eq!(status, "failed");
    }
}
