//! Fair dispatch's upkeep: records again the running jobs whose dispatch record a crash took
//! (the table is unlogged, and fair share and caps count it), then drops records of jobs not
//! running (none should be left: a claim records only what it marks running, and whatever ends
//! an attempt deletes its record). Claims themselves are the workers' (see `shared::dispatch`).

use shared::store;
use std::time::Duration;

use super::{Duty, Schedule};
use crate::Runtime;

pub(crate) struct Dispatcher {
    pub schedule: Schedule,
}

impl Default for Dispatcher {
    /// Twice a second: a crash's lost records let tenants past their caps until restored.
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

    /// Returns how many records it restored or dropped.
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
        Ok((restored + stray) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maintenance::test_support::TestDb;
    use shared::store::{Finish, Outcome};
    use uuid::Uuid;

    async fn recorded(test: &TestDb, id: Uuid) -> bool {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM dispatched_jobs WHERE job_id = $1)")
            .bind(id)
            .fetch_one(test.pool())
            .await
            .unwrap()
    }

    /// A claim records its jobs in flight; the record goes with the attempt's end.
    #[tokio::test]
    async fn a_claimed_job_is_recorded_in_flight_until_its_attempt_ends() {
        let test = TestDb::new().await;
        let id = test.held("canary", test.tenant).await;
        assert!(!recorded(&test, id).await);

        let job = store::claim_jobs(test.pool(), "canary", "w1", 4, None, false)
            .await
            .unwrap()
            .remove(0);
        assert_eq!((job.id, job.attempt), (id, 1));
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

    /// A rescued job (held again) and a record a cancel left behind stop counting against the
    /// tenant.
    #[tokio::test]
    async fn records_go_with_rescues_and_the_sweep() {
        let test = TestDb::new().await;
        let orphaned = test.job("canary", "running").await;
        test.set(orphaned, "worker = 'gone'").await;
        // Records of an ended job and of a queued one (as the dispatch passes before claims
        // left them).
        let stray = test.job("canary", "succeeded").await;
        let held = test.job("canary", "queued").await;
        for id in [stray, held] {
            sqlx::query(
                "INSERT INTO dispatched_jobs (job_id, kind, tenant_id) VALUES ($1, 'canary', $2)",
            )
            .bind(id)
            .bind(test.tenant)
            .execute(test.pool())
            .await
            .unwrap();
        }
        assert!(recorded(&test, orphaned).await);

        let rescued = store::rescue_orphans(test.pool(), Duration::from_secs(60), 3, 10)
            .await
            .unwrap();
        assert_eq!(rescued.len(), 1);
        assert_eq!(rescued[0].status, "queued");
        assert!(
            !recorded(&test, orphaned).await,
            "a held job counted in flight"
        );

        assert_eq!(Dispatcher::default().run(&test.runtime).await.unwrap(), 2);
        assert!(!recorded(&test, stray).await && !recorded(&test, held).await);
        // The rescued job is claimed again, recorded afresh.
        assert_eq!(claim(&test, 5).await, [orphaned, held]);
        assert!(recorded(&test, orphaned).await);
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

    /// One full claim of up to `wanted` jobs; the jobs claimed, in the order chosen.
    async fn claim(test: &TestDb, wanted: i64) -> Vec<Uuid> {
        sqlx::query_scalar("SELECT id FROM claim_jobs('canary', 'w1', $1, NULL)")
            .bind(wanted)
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

        let chosen = claim(&test, 9).await;

        let expected = [b[0], b[1], b[2], b[3], a[0], b[4], a[1], b[5], a[2]];
        assert_eq!(chosen, expected);
        // 7 running against 6: the late tenant's turn.
        assert_eq!(claim(&test, 1).await, [b[6]]);
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

        assert_eq!(claim(&test, 5).await, [a[0], b[0], b[1], b[2]]);
    }

    #[tokio::test]
    async fn weight_buys_a_proportional_share() {
        let test = TestDb::new().await;
        let (heavy, light) = (test.tenant, test.other_tenant().await);
        limit(&test, heavy, serde_json::json!({}), 3).await;
        let a = held(&test, heavy, 6).await;
        let b = held(&test, light, 6).await;

        let chosen = claim(&test, 8).await;

        assert_eq!(chosen, [a[0], b[0], a[1], a[2], a[3], b[1], a[4], a[5]]);
    }

    /// A crash empties the unlogged records: the duty counts the running jobs in flight again,
    /// so a tenant at its cap gets nothing more claimed.
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

        assert_eq!(Dispatcher::default().run(&test.runtime).await.unwrap(), 1);

        assert!(recorded(&test, running).await);
        assert!(claim(&test, 5).await.is_empty(), "claimed past the cap");
        assert_eq!(test.status(waiting).await.as_deref(), Some("queued"));
    }

    /// A claim counts the tenant's jobs in flight through the records' index, even in a session
    /// whose plans were made while the records' statistics said the table was empty (as after a
    /// quiet spell: it is unlogged and churns). Reading the whole table at each claim made it
    /// grow with the jobs in flight.
    #[tokio::test]
    async fn a_claim_counts_records_by_key_whatever_the_statistics_said() {
        let test = TestDb::new().await;
        sqlx::query("VACUUM ANALYZE dispatched_jobs")
            .execute(test.pool())
            .await
            .unwrap();
        backlog(&test, 300).await;
        let mut session = test.pool().acquire().await.unwrap();
        let claim = |wanted: i64| {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM claim_jobs('canary', 'w1', $1, NULL)",
            )
            .bind(wanted)
        };
        let first = claim(100).fetch_one(&mut *session).await.unwrap();
        assert_eq!(first, 100, "the first claim (its plans made now)");

        let mut tx = sqlx::Connection::begin(&mut *session).await.unwrap();
        let claimed = claim(10).fetch_one(&mut *tx).await.unwrap();
        let read: (i64, i64) = sqlx::query_as(
            "SELECT seq_tup_read, idx_scan FROM pg_stat_xact_user_tables WHERE relname = 'dispatched_jobs'",
        )
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(claimed, 10);
        assert_eq!(
            read.0, 0,
            "records read by scanning the table (read, probes): {read:?}"
        );
        assert!(read.1 >= 1, "the records counted by their index: {read:?}");
    }

    /// A claim that resumes after each tenant's cursor, as a worker's usually are.
    async fn resume(test: &TestDb, wanted: i64) -> Vec<Uuid> {
        sqlx::query_scalar("SELECT id FROM claim_jobs('canary', 'w1', $1, NULL, true)")
            .bind(wanted)
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

    /// Resumed claims go on through a tenant's jobs in order; a job queued ahead of where they
    /// stopped (higher priority) goes out at the next full claim, which a submission's
    /// announcement asks for; a full claim forgets tenants with nothing queued.
    #[tokio::test]
    async fn resumed_claims_go_on_in_order_and_a_full_one_finds_jobs_queued_ahead() {
        let test = TestDb::new().await;
        let jobs = held(&test, test.tenant, 6).await;
        assert_eq!(claim(&test, 2).await, jobs[..2]);
        run(&test, &jobs[..2]).await;
        assert_eq!(resume(&test, 2).await, jobs[2..4]);
        run(&test, &jobs[2..4]).await;

        let urgent = test.held("canary", test.tenant).await;
        test.set(urgent, "priority = 5").await;
        assert_eq!(claim(&test, 2).await, [urgent, jobs[4]]);
        run(&test, &[urgent, jobs[4]]).await;
        assert_eq!(resume(&test, 2).await, jobs[5..]);
        run(&test, &jobs[5..]).await;

        assert!(claim(&test, 2).await.is_empty());
        let cursors: i64 = sqlx::query_scalar("SELECT count(*) FROM dispatch_cursors")
            .fetch_one(test.pool())
            .await
            .unwrap();
        assert_eq!(cursors, 0, "a drained tenant's cursor stays");
    }

    /// A resumed claim reads the held jobs it takes, not the index entries of the thousands of
    /// jobs that ran before it (dead until the table is vacuumed: a full claim steps over each).
    #[tokio::test]
    async fn a_resumed_claim_reads_only_what_it_takes_however_many_jobs_ran_before() {
        let test = TestDb::new().await;
        backlog(&test, 3200).await;
        let mut chosen = claim(&test, 500).await;
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
                    "SELECT count(*) FROM claim_jobs('canary', 'w1', 50, NULL, $1)",
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
