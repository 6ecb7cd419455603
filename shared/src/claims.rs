//! How a worker takes jobs: one claim chooses a kind's queued jobs by fair share and marks them
//! running for the worker (the `claim_jobs` function, see [`crate::dispatch`] for the rules);
//! the worker confirms the claim durable before running any of them, and hands back jobs that
//! run under its name but not in its process.

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::store::Moved;

/// A job as its worker claims it: what running an attempt needs, not the whole row (decoding
/// all 27 columns by name was 15 % of a draining worker's instructions).
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Claimed {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub kind: String,
    pub payload: Value,
    /// This attempt's number, from 1.
    pub attempt: i32,
    pub max_attempts: i32,
}

/// Claims up to `wanted` of `kind`'s queued jobs for `worker`, chosen by fair share (one round
/// trip that marks them running and commits); a tenant's `max_running` for the kind, else
/// `default_cap`, bounds its running jobs. A `resume` claim starts each tenant's scan after the
/// last job claimed for it: enough unless a job became queued since the last full claim.
pub async fn claim_jobs(
    db: impl sqlx::PgExecutor<'_>,
    kind: &str,
    worker: &str,
    wanted: usize,
    default_cap: Option<i64>,
    resume: bool,
) -> sqlx::Result<Vec<Claimed>> {
    sqlx::query_as(
        "SELECT id, tenant_id, kind, payload, attempt, max_attempts
         FROM claim_jobs($1, $2, $3, $4, $5)",
    )
    .bind(kind)
    .bind(worker)
    .bind(wanted as i64)
    .bind(default_cap)
    .bind(resume)
    .fetch_all(db)
    .await
}

/// Makes `worker`'s claim of `ids` durable, on the connection that claimed them: claims commit
/// without waiting for their WAL flush (see migration `20261210000001`), and a synchronous
/// commit flushes the WAL up to its own record, past them (its write is the worker's heartbeat,
/// which a claiming worker also proves). On that connection, not a pooled one: a crash before
/// the flush loses the claim, and a connection to the restarted server would confirm nothing.
/// Returns those of `ids` still running under `worker`, each with whether a cancel was asked for
/// meanwhile.
pub async fn confirm_claims(
    conn: &mut sqlx::PgConnection,
    worker: &str,
    ids: &[Uuid],
) -> sqlx::Result<Vec<(Uuid, bool)>> {
    sqlx::query_as(
        "WITH beat AS (
             INSERT INTO workers (name, queues) VALUES ($1, '{}')
             ON CONFLICT (name) DO UPDATE SET heartbeat_at = now()
         )
         SELECT id, cancel_requested FROM jobs
         WHERE id = ANY ($2) AND status = 'running' AND worker = $1",
    )
    .bind(worker)
    .bind(ids)
    .fetch_all(conn)
    .await
}

/// Hands back `worker`'s running jobs other than `known` (those it runs): queued again, the
/// attempt not counted against the budget; cancelled if a cancel was asked for (no worker
/// would see it once queued). Returns them. A job another transaction holds is left for the
/// next round: waiting for it in scan order could deadlock with a bulk change, which locks in
/// id order.
pub async fn hand_back_unknown(
    pool: &PgPool,
    worker: &str,
    known: &[Uuid],
) -> sqlx::Result<Vec<Moved>> {
    sqlx::query_as(&format!(
        "WITH r AS (
         UPDATE jobs SET
             status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'queued' END,
             finished_at = CASE WHEN cancel_requested THEN now() END,
             attempt_budget = coalesce(attempt_budget, max_attempts),
             max_attempts = max_attempts + 1, worker = NULL, progress = 0, updated_at = now()
         WHERE id IN (SELECT id FROM jobs
                      WHERE worker = $1 AND status = 'running' AND id <> ALL ($2)
                      FOR UPDATE SKIP LOCKED)
         RETURNING *
         ), {}
         SELECT id, tenant_id, kind, attempt, status, error FROM r",
        crate::webhooks::outbox_cte("r"),
    ))
    .bind(worker)
    .bind(known)
    .fetch_all(pool)
    .await
}

/// Which of `ids` run under `worker` still: a job rescued from it (its heartbeats late) is
/// another worker's, or waiting for one.
pub async fn held_by(pool: &PgPool, worker: &str, ids: &[Uuid]) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar(
        "SELECT id FROM jobs WHERE id = ANY($1) AND worker = $2 AND status = 'running'",
    )
    .bind(ids)
    .bind(worker)
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{model::JobStatus, store, testing::TestDatabase};

    /// `n` jobs of `tenant` in `status` (attempt 1 if running), oldest first.
    async fn jobs(db: &TestDatabase, tenant: Uuid, status: &str, n: usize) -> Vec<Uuid> {
        let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
        sqlx::query(
            "INSERT INTO jobs (id, tenant_id, kind, status, payload, attempt)
             SELECT id, $2, 'canary', $3, '{}', CASE WHEN $3 = 'running' THEN 1 ELSE 0 END
             FROM unnest($1::uuid[]) AS id",
        )
        .bind(&ids)
        .bind(tenant)
        .bind(status)
        .execute(&db.pool)
        .await
        .unwrap();
        ids
    }

    async fn queued(db: &TestDatabase, tenant: Uuid, n: usize) -> Vec<Uuid> {
        jobs(db, tenant, "queued", n).await
    }

    /// One claim of up to `wanted` jobs for worker `w1`, full or resumed; the jobs claimed, in
    /// the order chosen.
    async fn claim_as(db: &TestDatabase, wanted: i64, resume: bool) -> Vec<Uuid> {
        sqlx::query_scalar("SELECT id FROM claim_jobs('canary', 'w1', $1, NULL, $2)")
            .bind(wanted)
            .bind(resume)
            .fetch_all(&db.pool)
            .await
            .unwrap()
    }

    async fn claim(db: &TestDatabase, wanted: i64) -> Vec<Uuid> {
        claim_as(db, wanted, false).await
    }

    async fn resume(db: &TestDatabase, wanted: i64) -> Vec<Uuid> {
        claim_as(db, wanted, true).await
    }

    /// The jobs' attempts end: succeeded.
    async fn run(db: &TestDatabase, ids: &[Uuid]) {
        sqlx::query(
            "UPDATE jobs SET status = 'succeeded', attempt = 1, finished_at = now()
             WHERE id = ANY ($1)",
        )
        .bind(ids)
        .execute(&db.pool)
        .await
        .unwrap();
    }

    async fn limit(db: &TestDatabase, tenant: Uuid, max_running: serde_json::Value, weight: i32) {
        sqlx::query(
            "INSERT INTO tenant_limits (tenant_id, max_running, weight) VALUES ($1, $2, $3)",
        )
        .bind(tenant)
        .bind(max_running)
        .bind(weight)
        .execute(&db.pool)
        .await
        .unwrap();
    }

    /// A tenant with jobs running yields to one arriving late until their shares are even;
    /// then they alternate, the older job first.
    #[tokio::test]
    async fn the_fewest_running_goes_next_then_tenants_alternate() {
        let db = TestDatabase::new().await;
        let (first, late) = (db.tenant().await, db.tenant().await);
        jobs(&db, first, "running", 4).await;
        let a = queued(&db, first, 6).await;
        let b = queued(&db, late, 7).await;

        let chosen = claim(&db, 9).await;

        let expected = [b[0], b[1], b[2], b[3], a[0], b[4], a[1], b[5], a[2]];
        assert_eq!(chosen, expected);
        // 7 running against 6: the late tenant's turn.
        assert_eq!(claim(&db, 1).await, [b[6]]);
    }

    #[tokio::test]
    async fn a_cap_stops_a_tenant_and_others_take_its_turns() {
        let db = TestDatabase::new().await;
        let (capped, other) = (db.tenant().await, db.tenant().await);
        limit(&db, capped, serde_json::json!({ "canary": 2 }), 1).await;
        jobs(&db, capped, "running", 1).await;
        jobs(&db, other, "running", 3).await;
        let a = queued(&db, capped, 3).await;
        let b = queued(&db, other, 3).await;

        assert_eq!(claim(&db, 5).await, [a[0], b[0], b[1], b[2]]);
    }

    #[tokio::test]
    async fn weight_buys_a_proportional_share() {
        let db = TestDatabase::new().await;
        let (heavy, light) = (db.tenant().await, db.tenant().await);
        limit(&db, heavy, serde_json::json!({}), 3).await;
        let a = queued(&db, heavy, 6).await;
        let b = queued(&db, light, 6).await;

        let chosen = claim(&db, 8).await;

        assert_eq!(chosen, [a[0], b[0], a[1], a[2], a[3], b[1], a[4], a[5]]);
    }

    /// A job counts against its tenant's cap from its claim until its attempt ends, is handed
    /// back or is rescued, whoever ends it.
    #[tokio::test]
    async fn a_job_counts_against_the_cap_only_while_it_runs() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        limit(&db, tenant, serde_json::json!({ "canary": 1 }), 1).await;
        let ids = queued(&db, tenant, 4).await;

        assert_eq!(claim(&db, 4).await, [ids[0]], "one at a time");
        assert!(claim(&db, 4).await.is_empty(), "claimed past the cap");
        let finish = store::Finish {
            id: ids[0],
            attempt: 1,
            outcome: store::Outcome::Succeeded(serde_json::json!({})).into(),
            usage: Default::default(),
        };
        store::finish_many(&db.pool, &[finish]).await.unwrap();

        assert_eq!(claim(&db, 4).await, [ids[1]], "after a finish");
        assert!(
            store::requeue(&db.pool, ids[1], 1, "w1", &Default::default())
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(claim(&db, 4).await, [ids[1]], "after a hand-back");
        sqlx::query("UPDATE jobs SET worker = 'gone' WHERE id = $1")
            .bind(ids[1])
            .execute(&db.pool)
            .await
            .unwrap();
        let rescued =
            store::rescue_orphans(&db.pool, std::time::Duration::from_secs(60), None, 3, 10)
                .await
                .unwrap();
        assert_eq!(rescued.len(), 1);
        assert_eq!(claim(&db, 4).await, [ids[1]], "after a rescue");
    }

    /// A claim counts a tenant's running jobs through `jobs_running`, even in a session whose
    /// plans were made while the statistics said no job ran; it never scans `jobs`.
    #[tokio::test]
    async fn a_claim_counts_running_jobs_by_their_index() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        sqlx::query("VACUUM ANALYZE jobs")
            .execute(&db.pool)
            .await
            .unwrap();
        queued(&db, tenant, 300).await;
        let mut session = db.pool.acquire().await.unwrap();
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
            "SELECT (SELECT seq_tup_read FROM pg_stat_xact_user_tables WHERE relname = 'jobs'),
                    pg_stat_get_xact_numscans('jobs_running'::regclass)",
        )
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(claimed, 10);
        assert_eq!(read.0, 0, "jobs read by scanning the table: {read:?}");
        assert!(read.1 >= 1, "running jobs counted by their index: {read:?}");
    }

    /// Resumed claims go on through a tenant's jobs in order; a job queued ahead of where they
    /// stopped (higher priority) goes out at the next full claim, which a submission's
    /// announcement asks for; a full claim forgets tenants with nothing queued.
    #[tokio::test]
    async fn resumed_claims_go_on_in_order_and_a_full_one_finds_jobs_queued_ahead() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        let ids = queued(&db, tenant, 6).await;
        assert_eq!(claim(&db, 2).await, ids[..2]);
        run(&db, &ids[..2]).await;
        assert_eq!(resume(&db, 2).await, ids[2..4]);
        run(&db, &ids[2..4]).await;

        let urgent = queued(&db, tenant, 1).await[0];
        sqlx::query("UPDATE jobs SET priority = 5 WHERE id = $1")
            .bind(urgent)
            .execute(&db.pool)
            .await
            .unwrap();
        assert_eq!(claim(&db, 2).await, [urgent, ids[4]]);
        run(&db, &[urgent, ids[4]]).await;
        assert_eq!(resume(&db, 2).await, ids[5..]);
        run(&db, &ids[5..]).await;

        assert!(claim(&db, 2).await.is_empty());
        let cursors: i64 = sqlx::query_scalar("SELECT count(*) FROM dispatch_cursors")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(cursors, 0, "a drained tenant's cursor stays");
    }

    /// A resumed claim reads the queued jobs it takes, not the index entries of the thousands of
    /// jobs that ran before it (dead until the table is vacuumed: a full claim steps over each).
    #[tokio::test]
    async fn a_resumed_claim_reads_only_what_it_takes_however_many_jobs_ran_before() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        queued(&db, tenant, 3200).await;
        let mut chosen = claim(&db, 500).await;
        for _ in 0..5 {
            run(&db, &chosen).await;
            chosen = resume(&db, 500).await;
            assert_eq!(chosen.len(), 500);
        }
        run(&db, &chosen).await;
        assert_eq!(resume(&db, 100).await.len(), 100);

        // Entries of jobs_held read in one transaction of a fresh session (a session's
        // statistics for the transaction include counts it has not reported yet).
        let read = |resumed: bool| {
            let url = db.url.clone();
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
        let running: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM jobs WHERE status = 'running'")
            .fetch_all(&db.pool)
            .await
            .unwrap();
        run(&db, &running).await;
        let (_, full) = read(false).await;
        assert!(
            resumed <= 100,
            "entries of jobs_held a resumed claim read: {resumed} (a full claim: {full})"
        );
        assert!(
            full > 3000,
            "a full claim steps over the jobs that ran: {full} against {resumed}"
        );
    }

    /// A worker hands back only its own running jobs that it does not run: queued again with
    /// the attempt not counted, or cancelled if a cancel was asked for.
    #[tokio::test]
    async fn a_worker_hands_back_only_its_own_jobs_it_does_not_run() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        queued(&db, tenant, 4).await;
        let mine = claim_jobs(&db.pool, "canary", "w1", 3, None, false)
            .await
            .unwrap();
        let theirs = claim_jobs(&db.pool, "canary", "w2", 1, None, false)
            .await
            .unwrap();
        let (known, lost, cancelled) = (&mine[0], &mine[1], &mine[2]);
        store::request_cancel(&db.pool, tenant, cancelled.id)
            .await
            .unwrap();

        let mut moved = hand_back_unknown(&db.pool, "w1", &[known.id])
            .await
            .unwrap();
        moved.sort_by_key(|m| m.status.clone());
        let moved: Vec<(Uuid, &str)> = moved.iter().map(|m| (m.id, m.status.as_str())).collect();
        assert_eq!(moved, [(cancelled.id, "cancelled"), (lost.id, "queued")]);
        let row = |id| store::get_job(&db.pool, tenant, id);
        let lost_row = row(lost.id).await.unwrap().unwrap();
        assert_eq!(
            (lost_row.worker, lost_row.max_attempts),
            (None, lost.max_attempts + 1)
        );
        assert!(row(cancelled.id)
            .await
            .unwrap()
            .unwrap()
            .finished_at
            .is_some());
        for (id, worker) in [(known.id, "w1"), (theirs[0].id, "w2")] {
            let job = row(id).await.unwrap().unwrap();
            assert_eq!(
                (job.status.0, job.worker.as_deref()),
                (JobStatus::Running, Some(worker))
            );
        }
    }

    /// A claim is planned once per session from the statistics of the moment. Planned while
    /// they say no job is queued (every sampled job had ended), it still walks `jobs_held` as
    /// far as it takes, rather than reading every queued job to sort them.
    #[tokio::test]
    async fn a_claim_planned_while_nothing_was_queued_walks_the_held_jobs_in_order() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        let ended = jobs(&db, tenant, "running", 200).await;
        run(&db, &ended).await;
        sqlx::query("ANALYZE jobs").execute(&db.pool).await.unwrap();
        queued(&db, tenant, 500).await;

        let queue = crate::db::connect_queue(&db.url, 1).await.unwrap();
        let mut tx = queue.begin().await.unwrap();
        let claimed = claim_jobs(&mut *tx, "canary", "w1", 8, None, false)
            .await
            .unwrap();
        // Every index a queued job can be found through (the count of running jobs reads
        // `jobs_running`, with the ended jobs' entries not yet vacuumed away).
        let (held, read): (i64, i64) = sqlx::query_as(
            "SELECT pg_stat_get_xact_numscans('jobs_held'::regclass),
                    sum(pg_stat_get_xact_tuples_returned(i))::int8
             FROM unnest('{jobs_held,jobs_pkey,jobs_tenant_page}'::regclass[]) AS i",
        )
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(claimed.len(), 8);
        assert!(held >= 1, "the held jobs walked: {held}");
        assert!(
            read < 100,
            "index entries read for 8 of 500 queued jobs: {read}"
        );
    }

    #[tokio::test]
    async fn a_hand_back_skips_a_stray_another_transaction_holds() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        queued(&db, tenant, 2).await;
        let strays = claim_jobs(&db.pool, "canary", "w1", 2, None, false)
            .await
            .unwrap();
        let (held, free) = (strays[0].id, strays[1].id);
        let mut holder = db.pool.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE")
            .bind(held)
            .execute(&mut *holder)
            .await
            .unwrap();

        let now = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            hand_back_unknown(&db.pool, "w1", &[]),
        )
        .await
        .expect("the hand-back waited for the held job")
        .unwrap();
        assert_eq!(now.iter().map(|m| m.id).collect::<Vec<_>>(), [free]);
        holder.rollback().await.unwrap();
        let next = hand_back_unknown(&db.pool, "w1", &[]).await.unwrap();
        assert_eq!(next.iter().map(|m| m.id).collect::<Vec<_>>(), [held]);
    }
}
