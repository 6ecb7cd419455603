//! Fair dispatch's safety net: a pass for every kind with held jobs, so jobs still go out when
//! the pass after a submission or a finished attempt failed (Redis or PostgreSQL away), a worker
//! joined (more slots), or a tenant's cap was raised. Before the passes it records running jobs
//! whose dispatch record a crash took (the table is unlogged), then drops records a cancel
//! left behind by racing the pass that wrote them.

use shared::store;
use std::time::Duration;

use super::{Duty, Schedule};
use crate::Runtime;

pub(crate) struct Dispatcher {
    pub schedule: Schedule,
}

impl Default for Dispatcher {
    /// Twice a second: passes after events do the prompt work.
    fn default() -> Self {
        Self {
            schedule: Schedule {
                name: "dispatcher",
                interval: Duration::from_millis(500),
                batch: 0,
            },
        }
    }
}

#[async_trait::async_trait]
impl Duty for Dispatcher {
    fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// Returns how many jobs it pushed.
    async fn run(&self, runtime: &Runtime) -> anyhow::Result<usize> {
        let restored = store::restore_dispatches(runtime.pool()).await?;
        if restored > 0 {
            tracing::info!(restored, "running jobs recorded in flight again");
        }
        let stray = store::drop_stray_dispatches(runtime.pool()).await?;
        if stray > 0 {
            tracing::debug!(
                stray,
                "dispatch records of jobs no longer in flight dropped"
            );
        }
        let mut pushed = 0;
        for kind in store::queued_kinds(runtime.pool()).await? {
            pushed += runtime.refill().dispatcher().dispatch(&kind).await?;
        }
        Ok(pushed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maintenance::test_support::TestDb;
    use shared::{
        model::QueueMessage,
        store::{Finish, Outcome},
    };
    use uuid::Uuid;

    /// With no live worker a kind's queue takes the minimum window; a tenant behind another's
    /// backlog gets its share of it, and the backlog the rest.
    #[tokio::test]
    async fn held_jobs_go_out_by_fair_share_up_to_the_window() {
        let test = TestDb::new().await;
        let mut backlog = Vec::new();
        for _ in 0..20 {
            backlog.push(test.held("canary", test.tenant).await);
        }
        let late = test.other_tenant().await;
        let mut late_jobs = Vec::new();
        for _ in 0..3 {
            late_jobs.push(test.held("canary", late).await);
        }

        let pushed = Dispatcher::default().run(&test.runtime).await.unwrap();

        let window = test.runtime.settings().dispatch_min_window as usize;
        assert_eq!(pushed, window);
        for id in &late_jobs {
            assert!(
                test.in_queue(*id).await,
                "the late tenant's {id} not pushed"
            );
        }
        let backlog_pushed = backlog.len() - {
            let mut held = 0;
            for id in &backlog {
                held += usize::from(!test.in_queue(*id).await);
            }
            held
        };
        assert_eq!(backlog_pushed, window - late_jobs.len());
        assert!(
            test.in_queue(backlog[0]).await && !test.in_queue(backlog[19]).await,
            "a tenant's oldest go first"
        );
        assert_eq!(
            Dispatcher::default().run(&test.runtime).await.unwrap(),
            0,
            "the window is full"
        );
    }

    async fn recorded(test: &TestDb, id: Uuid) -> bool {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM dispatched_jobs WHERE job_id = $1)")
            .bind(id)
            .fetch_one(test.pool())
            .await
            .unwrap()
    }

    /// The row version of a job: a new one for every update of its row.
    async fn version(test: &TestDb, id: Uuid) -> String {
        sqlx::query_scalar("SELECT ctid::text || '/' || xmin::text FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(test.pool())
            .await
            .unwrap()
    }

    /// Dispatching a job writes a narrow record of its own, never a new version of the job's
    /// row; the record lasts while the job is in flight and goes with the attempt's end.
    #[tokio::test]
    async fn a_pass_records_jobs_in_flight_without_rewriting_their_rows() {
        let test = TestDb::new().await;
        let id = test.held("canary", test.tenant).await;
        let before = version(&test, id).await;

        assert_eq!(Dispatcher::default().run(&test.runtime).await.unwrap(), 1);

        assert!(test.in_queue(id).await);
        assert!(recorded(&test, id).await);
        assert_eq!(version(&test, id).await, before, "the pass rewrote the job");
        let message = QueueMessage {
            job_id: id,
            generation: 0,
        };
        let job = store::claim_many(test.pool(), &[message], "w1")
            .await
            .unwrap()[0]
            .clone()
            .expect("claimed");
        assert!(recorded(&test, id).await, "running counts as in flight");
        let finish = Finish {
            id,
            attempt: job.attempt,
            outcome: Outcome::Succeeded(serde_json::json!({})),
            usage: Default::default(),
        };
        store::finish_many(test.pool(), &[finish]).await.unwrap();
        assert!(
            !recorded(&test, id).await,
            "the record outlived the attempt"
        );
    }

    /// A cancelled queued job, a rescued one (held again) and a record a cancel left behind
    /// stop counting against the tenant.
    #[tokio::test]
    async fn records_go_with_cancels_rescues_and_the_sweep() {
        let test = TestDb::new().await;
        let cancelled = test.job("canary", "queued").await;
        let orphaned = test.job("canary", "running").await;
        test.set(orphaned, "worker = 'gone'").await;
        let stray = test.job("canary", "succeeded").await;
        sqlx::query(
            "INSERT INTO dispatched_jobs (job_id, kind, tenant_id) VALUES ($1, 'canary', $2)",
        )
        .bind(stray)
        .bind(test.tenant)
        .execute(test.pool())
        .await
        .unwrap();
        assert!(recorded(&test, cancelled).await && recorded(&test, orphaned).await);

        store::request_cancel(test.pool(), test.tenant, cancelled)
            .await
            .unwrap();
        assert!(!recorded(&test, cancelled).await);
        let rescued = store::rescue_orphans(test.pool(), Duration::from_secs(60), 3, 10)
            .await
            .unwrap();
        assert_eq!(rescued.len(), 1);
        assert_eq!(rescued[0].status, "queued");
        assert!(
            !recorded(&test, orphaned).await,
            "a held job counted in flight"
        );

        Dispatcher::default().run(&test.runtime).await.unwrap();
        assert!(!recorded(&test, stray).await);
        // The rescued job went out again, recorded afresh.
        assert!(recorded(&test, orphaned).await && test.in_queue(orphaned).await);
    }

    /// `n` running jobs of `tenant`, each counted in flight.
    async fn in_flight(test: &TestDb, tenant: Uuid, n: usize) {
        for _ in 0..n {
            let id = test.held("canary", tenant).await;
            test.set(id, "status = 'running', attempt = 1").await;
            sqlx::query(
                "INSERT INTO dispatched_jobs (job_id, kind, tenant_id) VALUES ($1, 'canary', $2)",
            )
            .bind(id)
            .bind(tenant)
            .execute(test.pool())
            .await
            .unwrap();
        }
    }

    async fn held(test: &TestDb, tenant: Uuid, n: usize) -> Vec<Uuid> {
        let mut ids = Vec::new();
        for _ in 0..n {
            ids.push(test.held("canary", tenant).await);
        }
        ids
    }

    /// A backlog of `n` held jobs of the test's tenant, in one statement.
    async fn backlog(test: &TestDb, n: i32) {
        sqlx::query(
            "INSERT INTO jobs (id, tenant_id, kind, status, payload)
             SELECT conveyor_uuidv7(), $1, 'canary', 'queued', '{}' FROM generate_series(1, $2)",
        )
        .bind(test.tenant)
        .bind(n)
        .execute(test.pool())
        .await
        .unwrap();
    }

    /// One pass with no live worker, so the room is `window` less the jobs in flight; the jobs
    /// it chose, in push order.
    async fn pass(test: &TestDb, window: i64) -> Vec<Uuid> {
        sqlx::query_scalar("SELECT job_id FROM dispatch_pass('canary', 0, $1, NULL)")
            .bind(window)
            .fetch_all(test.pool())
            .await
            .unwrap()
    }

    async fn limit(test: &TestDb, tenant: Uuid, max_running: serde_json::Value, weight: i32) {
        sqlx::query(
            "INSERT INTO tenant_limits (tenant_id, max_running, weight) VALUES ($1, $2, $3)",
        )
        .bind(tenant)
        .bind(max_running)
        .bind(weight)
        .execute(test.pool())
        .await
        .unwrap();
    }

    /// A tenant with slots in flight yields to one arriving late until their shares are even;
    /// then they alternate, the older job first.
    #[tokio::test]
    async fn the_fewest_in_flight_goes_next_then_tenants_alternate() {
        let test = TestDb::new().await;
        let (first, late) = (test.tenant, test.other_tenant().await);
        in_flight(&test, first, 4).await;
        let a = held(&test, first, 6).await;
        let b = held(&test, late, 7).await;

        let chosen = pass(&test, 13).await;

        let expected = [b[0], b[1], b[2], b[3], a[0], b[4], a[1], b[5], a[2]];
        assert_eq!(chosen, expected);
        assert!(pass(&test, 13).await.is_empty(), "the room is full");
    }

    #[tokio::test]
    async fn a_cap_stops_a_tenant_and_others_take_its_turns() {
        let test = TestDb::new().await;
        let (capped, other) = (test.tenant, test.other_tenant().await);
        limit(&test, capped, serde_json::json!({ "canary": 2 }), 1).await;
        in_flight(&test, capped, 1).await;
        in_flight(&test, other, 3).await;
        let a = held(&test, capped, 3).await;
        let b = held(&test, other, 3).await;

        assert_eq!(pass(&test, 9).await, [a[0], b[0], b[1], b[2]]);
    }

    #[tokio::test]
    async fn weight_buys_a_proportional_share() {
        let test = TestDb::new().await;
        let (heavy, light) = (test.tenant, test.other_tenant().await);
        limit(&test, heavy, serde_json::json!({}), 3).await;
        let a = held(&test, heavy, 6).await;
        let b = held(&test, light, 6).await;

        let chosen = pass(&test, 8).await;

        assert_eq!(chosen, [a[0], b[0], a[1], a[2], a[3], b[1], a[4], a[5]]);
    }

    /// A crash empties the unlogged records: the duty counts the running jobs in flight again
    /// before its passes, so a tenant at its cap gets nothing more pushed.
    #[tokio::test]
    async fn running_jobs_are_recorded_again_after_a_crash_took_the_records() {
        let test = TestDb::new().await;
        let persistence: String = sqlx::query_scalar(
            "SELECT relpersistence::text FROM pg_class WHERE relname = 'dispatched_jobs'",
        )
        .fetch_one(test.pool())
        .await
        .unwrap();
        assert_eq!(
            persistence, "u",
            "dispatch records are soft state, kept out of the WAL"
        );
        limit(&test, test.tenant, serde_json::json!({ "canary": 1 }), 1).await;
        let running = test.job("canary", "running").await;
        let waiting = test.held("canary", test.tenant).await;
        // What crash recovery does to an unlogged table.
        sqlx::query("TRUNCATE dispatched_jobs")
            .execute(test.pool())
            .await
            .unwrap();

        assert_eq!(Dispatcher::default().run(&test.runtime).await.unwrap(), 0);

        assert!(recorded(&test, running).await);
        assert!(!recorded(&test, waiting).await && !test.in_queue(waiting).await);
    }

    /// A pass steps over the tenant's jobs already in flight by probing their records' key,
    /// even in a session whose plans were made while the records' statistics said the table
    /// was empty (as after a quiet spell: it is unlogged and churns). Reading the whole table
    /// for each job stepped over made a pass grow with the square of the jobs in flight.
    #[tokio::test]
    async fn a_pass_probes_records_by_key_whatever_the_statistics_said() {
        let test = TestDb::new().await;
        sqlx::query("VACUUM ANALYZE dispatched_jobs")
            .execute(test.pool())
            .await
            .unwrap();
        backlog(&test, 300).await;
        let mut session = test.pool().acquire().await.unwrap();
        let pass = "SELECT count(*) FROM dispatch_pass('canary', 30, 100, NULL)";
        let first: i64 = sqlx::query_scalar(pass)
            .fetch_one(&mut *session)
            .await
            .unwrap();
        assert_eq!(
            first, 100,
            "the first pass fills the window (its plans made now)"
        );
        sqlx::query("DELETE FROM dispatched_jobs WHERE job_id IN (SELECT job_id FROM dispatched_jobs LIMIT 10)")
            .execute(test.pool())
            .await
            .unwrap();

        let mut tx = sqlx::Connection::begin(&mut *session).await.unwrap();
        let pushed: i64 = sqlx::query_scalar(pass).fetch_one(&mut *tx).await.unwrap();
        let read: (i64, i64) = sqlx::query_as(
            "SELECT seq_tup_read, idx_scan FROM pg_stat_xact_user_tables WHERE relname = 'dispatched_jobs'",
        )
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(pushed, 10);
        assert_eq!(
            read.0, 0,
            "records read by scanning the table (read, probes): {read:?}"
        );
        assert!(
            read.1 >= 90,
            "the jobs in flight stepped over by their key: {read:?}"
        );
    }

    /// A pass that resumes after each tenant's cursor, as a worker asks once slots freed.
    async fn resume(test: &TestDb, window: i64) -> Vec<Uuid> {
        sqlx::query_scalar("SELECT job_id FROM dispatch_pass('canary', 0, $1, NULL, true)")
            .bind(window)
            .fetch_all(test.pool())
            .await
            .unwrap()
    }

    /// The jobs' attempts end: succeeded, their records gone (as a worker's finish does).
    async fn run(test: &TestDb, ids: &[Uuid]) {
        sqlx::query(
            "WITH done AS (UPDATE jobs SET status = 'succeeded', attempt = 1, finished_at = now()
                           WHERE id = ANY ($1) RETURNING id)
             DELETE FROM dispatched_jobs WHERE job_id IN (SELECT id FROM done)",
        )
        .bind(ids)
        .execute(test.pool())
        .await
        .unwrap();
    }

    /// Resumed passes go on through a tenant's jobs in order; a job queued ahead of where they
    /// stopped (higher priority) goes out at the next full pass, which a submission asks for;
    /// a full pass forgets tenants with nothing queued.
    #[tokio::test]
    async fn resumed_passes_go_on_in_order_and_a_full_one_finds_jobs_queued_ahead() {
        let test = TestDb::new().await;
        let jobs = held(&test, test.tenant, 6).await;
        assert_eq!(pass(&test, 2).await, jobs[..2]);
        run(&test, &jobs[..2]).await;
        assert_eq!(resume(&test, 2).await, jobs[2..4]);
        run(&test, &jobs[2..4]).await;

        let urgent = test.held("canary", test.tenant).await;
        test.set(urgent, "priority = 5").await;
        assert_eq!(pass(&test, 2).await, [urgent, jobs[4]]);
        run(&test, &[urgent, jobs[4]]).await;
        assert_eq!(resume(&test, 2).await, jobs[5..]);
        run(&test, &jobs[5..]).await;

        assert!(pass(&test, 2).await.is_empty());
        let cursors: i64 = sqlx::query_scalar("SELECT count(*) FROM dispatch_cursors")
            .fetch_one(test.pool())
            .await
            .unwrap();
        assert_eq!(cursors, 0, "a drained tenant's cursor stays");
    }

    /// A resumed pass reads the held jobs it takes, not the index entries of the thousands of
    /// jobs that ran before it (dead until the table is vacuumed: a full pass, as every pass
    /// was, steps over each).
    #[tokio::test]
    async fn a_resumed_pass_reads_only_what_it_takes_however_many_jobs_ran_before() {
        let test = TestDb::new().await;
        backlog(&test, 3200).await;
        let mut chosen = pass(&test, 500).await;
        for _ in 0..5 {
            run(&test, &chosen).await;
            chosen = resume(&test, 500).await;
            assert_eq!(chosen.len(), 500);
        }
        run(&test, &chosen).await;
        assert_eq!(resume(&test, 100).await.len(), 100);

        // Entries of jobs_held read in one transaction of a fresh session (a session's statistics for
        // the transaction include counts it has not reported yet).
        let read = |resumed: bool| {
            let url = test.runtime.settings().database_url.clone();
            async move {
                let mut session = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
                    .await
                    .unwrap();
                let mut tx = sqlx::Connection::begin(&mut session).await.unwrap();
                let taken: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM dispatch_pass('canary', 0, 150, NULL, $1)",
                )
                .bind(resumed)
                .fetch_one(&mut *tx)
                .await
                .unwrap();
                let entries: i64 = sqlx::query_scalar(
                    "SELECT pg_stat_get_xact_tuples_returned('jobs_held'::regclass)",
                )
                .fetch_one(&mut *tx)
                .await
                .unwrap();
                tx.commit().await.unwrap();
                (taken, entries)
            }
        };
        let (taken, resumed) = read(true).await;
        assert_eq!(taken, 50);
        let in_flight: Vec<Uuid> = sqlx::query_scalar("SELECT job_id FROM dispatched_jobs")
            .fetch_all(test.pool())
            .await
            .unwrap();
        run(&test, &in_flight).await;
        let (_, full) = read(false).await;
        assert!(
            resumed <= 100,
            "entries of jobs_held a resumed pass read: {resumed} (a full pass: {full})"
        );
        assert!(
            full > 3000,
            "a full pass steps over the jobs that ran: {full} against {resumed}"
        );
    }
}
