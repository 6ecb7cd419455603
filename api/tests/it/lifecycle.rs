//! Submit → queued → running → progress → succeeded; cancel; retries with backoff.

use crate::harness::TestApp;
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_job_runs_to_success_and_poll_and_sse_agree() {
    let mut app = TestApp::spawn().await;
    app.start_worker(2).await;
    let id = app.submit_canary(json!({"steps": 5, "step_ms": 30})).await;
    let events = app
        .sse(&format!("/v1/jobs/{id}/events"), None)
        .await
        .collect(WAIT)
        .await;
    let types: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(types.first(), Some(&"queued"), "{types:?}");
    assert_eq!(types.get(1), Some(&"started"), "{types:?}");
    assert_eq!(types.last(), Some(&"succeeded"), "{types:?}");
    let progress: Vec<f64> = events
        .iter()
        .filter(|e| e.event == "progress")
        .map(|e| e.data["progress"].as_f64().unwrap())
        .collect();
    assert!(!progress.is_empty(), "{types:?}");
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    assert_eq!(*progress.last().unwrap(), 1.0);
    let ids: Vec<&str> = events.iter().map(|e| e.id.as_deref().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] != w[1]));

    let job = app.job(id).await;
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["progress"], 1.0);
    assert_eq!(job["attempt"], 1);
    assert_eq!(job["result"]["steps"], 5);
    assert_eq!(events.last().unwrap().data["status"], job["status"]);
    assert_eq!(events.last().unwrap().data["data"], job["result"]);
    assert!(job["finished_at"].is_string() && job["started_at"].is_string());
}

#[tokio::test]
async fn a_queued_job_is_cancelled_at_once_and_never_runs() {
    let mut app = TestApp::spawn().await;
    let id = app.submit_canary(json!({"steps": 1})).await;
    let (status, job) = app.post(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["status"], "cancelled");
    app.start_worker(1).await;
    // The queue is first in, first out and the worker takes one job at a time: once a job
    // submitted after it has run, the worker has been handed the cancelled job's message.
    let after = app.submit_canary(json!({"steps": 1})).await;
    let done = app.wait_status(after, &["succeeded", "failed"], WAIT).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let job = app.job(id).await;
    assert_eq!(job["status"], "cancelled");
    assert_eq!(job["attempt"], 0, "a cancelled job must not run");
    let events = app
        .sse(&format!("/v1/jobs/{id}/events"), None)
        .await
        .collect(WAIT)
        .await;
    let types: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(types, ["queued", "cancelled"]);
    // Cancelling again is a conflict, not a silent success.
    let (status, _) = app.post(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(status, 409);
}

#[tokio::test]
async fn a_running_job_stops_at_its_next_checkpoint() {
    let mut app = TestApp::spawn().await;
    app.start_worker(1).await;
    let id = app
        .submit_canary(json!({"steps": 200, "step_ms": 50}))
        .await;
    app.wait_status(id, &["running"], WAIT).await;
    let (status, job) = app.post(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["cancel_requested"], true);
    let job = app
        .wait_status(
            id,
            &["cancelled", "succeeded", "failed"],
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(job["status"], "cancelled", "{job}");
    assert!(job["progress"].as_f64().unwrap() < 1.0);
}

/// The cancel is announced over Redis Pub/Sub: the job stops long before the worker's next
/// heartbeat (20 s here) would have told it.
#[tokio::test]
async fn a_cancel_reaches_the_running_job_before_the_next_heartbeat() {
    let mut app = TestApp::spawn_with(|s| {
        s.heartbeat = Duration::from_secs(20);
        s.rescue_after = Duration::from_secs(120);
    })
    .await;
    app.start_worker(1).await;
    let id = app
        .submit_canary(json!({"steps": 400, "step_ms": 50}))
        .await;
    app.wait_status(id, &["running"], WAIT).await;
    let asked = std::time::Instant::now();
    let (status, job) = app.post(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(status, 200, "{job}");
    let job = app
        .wait_status(id, &["cancelled", "succeeded", "failed"], WAIT)
        .await;
    assert_eq!(job["status"], "cancelled", "{job}");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "stopped after {:?}",
        asked.elapsed()
    );
}

/// A claim that committed but whose answer never reached its worker (the connection dropped)
/// leaves a row `running` under a lease the worker keeps alive, which no rescue takes. The
/// worker's heartbeat hands back what it does not run, and the job runs; a job it does run
/// stays with it.
#[tokio::test]
async fn a_claim_whose_answer_was_lost_still_runs() {
    let mut app = TestApp::spawn().await;
    let worker = app.start_worker(1).await;
    // The worker's one slot stays busy: its consumer claims nothing meanwhile.
    let busy = app.submit_canary(json!({"steps": 5, "step_ms": 400})).await;
    app.wait_status(busy, &["running"], WAIT).await;
    let lost = app.submit_canary(json!({"steps": 1})).await;
    let claimed: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT id FROM claim_jobs('canary', $1, 1, NULL)")
            .bind(&worker)
            .fetch_all(app.pool())
            .await
            .unwrap();
    assert_eq!(claimed, vec![lost], "claimed under the worker's name");

    let job = app.wait_status(lost, &["succeeded", "failed"], WAIT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        job["attempt"], 2,
        "the lost claim's attempt, then its run: {job}"
    );
    assert_eq!(
        job["max_attempts"], 4,
        "the lost attempt is not counted: {job}"
    );
    let busy = app.wait_status(busy, &["succeeded", "failed"], WAIT).await;
    assert_eq!(busy["status"], "succeeded", "{busy}");
    assert_eq!(
        busy["attempt"], 1,
        "the job the worker ran stayed with it: {busy}"
    );
}

/// A slot frees once its handler returns, while the outcome is being written, so that the next
/// claim overlaps the write. Outcomes that cannot be written (PostgreSQL refuses them here)
/// hold, besides the worker's slots, three times as many jobs, and then the worker claims no
/// more; once they can be written, every job ends after one attempt.
#[tokio::test]
async fn outcomes_that_cannot_be_written_stop_the_claims_at_four_times_the_slots() {
    let mut app = TestApp::spawn().await;
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_outcomes() RETURNS trigger LANGUAGE plpgsql
             AS $$ BEGIN RAISE EXCEPTION 'outcomes refused'; END $$;
         CREATE TRIGGER refuse_outcomes BEFORE UPDATE ON jobs FOR EACH ROW
             WHEN (NEW.status = 'succeeded') EXECUTE FUNCTION refuse_outcomes();",
    )
    .execute(app.pool())
    .await
    .unwrap();
    let mut ids = Vec::new();
    for _ in 0..12 {
        ids.push(app.submit_canary(json!({"steps": 1})).await);
    }
    app.start_worker(2).await;
    let counts = || async {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT count(*) FILTER (WHERE status = 'running'),
                    count(*) FILTER (WHERE status = 'queued') FROM jobs",
        )
        .fetch_one(app.pool())
        .await
        .unwrap()
    };
    let deadline = std::time::Instant::now() + WAIT;
    while counts().await.0 < 8 {
        assert!(std::time::Instant::now() < deadline, "{:?}", counts().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        counts().await,
        (8, 4),
        "(running, queued) while no outcome is written"
    );

    sqlx::raw_sql("DROP TRIGGER refuse_outcomes ON jobs")
        .execute(app.pool())
        .await
        .unwrap();
    for id in ids {
        let job = app.wait_status(id, &["succeeded", "failed"], WAIT).await;
        assert_eq!(
            (&job["status"], &job["attempt"]),
            (&json!("succeeded"), &json!(1)),
            "{job}"
        );
    }
}

#[tokio::test]
async fn failed_attempts_back_off_and_retry_until_success() {
    let mut app = TestApp::spawn().await;
    app.start_worker(1).await;
    let (status, job) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "canary", "payload": {"fail_first": 2}, "max_attempts": 3}),
        )
        .await;
    assert_eq!(status, 202);
    let id = job["id"].as_str().unwrap().parse().unwrap();
    let events = app
        .sse(&format!("/v1/jobs/{id}/events"), None)
        .await
        .collect(WAIT)
        .await;
    let types: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        types,
        [
            "queued",
            "started",
            "retrying",
            "queued",
            "started",
            "retrying",
            "queued",
            "started",
            "succeeded"
        ]
    );
    // Backoff: the second retry waits about twice the first (base 200 ms, ±25 % jitter), from
    // the attempt's start to the retry's time; no attempt starts before its retry's time. (Not
    // from the `retrying` event's own time: on a loaded machine it comes well after the
    // failure.)
    let time = |value: &serde_json::Value| {
        chrono::DateTime::parse_from_rfc3339(value.as_str().unwrap()).unwrap()
    };
    let (at, retry_at) = (
        |i: usize| time(&events[i].data["at"]),
        |i: usize| time(&events[i].data["data"]["retry_at"]),
    );
    let first_wait = (retry_at(2) - at(1)).num_milliseconds();
    let second_wait = (retry_at(5) - at(4)).num_milliseconds();
    assert!(first_wait >= 150, "first backoff {first_wait} ms");
    assert!(second_wait >= 300, "second backoff {second_wait} ms");
    assert!(at(4) >= retry_at(2) && at(7) >= retry_at(5), "{events:?}");
    let job = app.job(id).await;
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["attempt"], 3);
    assert_eq!(job["attempt_errors"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn out_of_attempts_fails_and_a_manual_retry_runs_again() {
    let mut app = TestApp::spawn().await;
    app.start_worker(1).await;
    let (_, job) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "canary", "payload": {"fail_first": 2}, "max_attempts": 2}),
        )
        .await;
    let id = job["id"].as_str().unwrap().parse().unwrap();
    let job = app.wait_status(id, &["failed", "succeeded"], WAIT).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["attempt"], 2);
    assert!(
        job["error"].as_str().unwrap().contains("attempt 2"),
        "{job}"
    );

    let (status, retried) = app.post(&format!("/v1/jobs/{id}/retry"), &json!({})).await;
    assert_eq!(status, 202, "{retried}");
    assert_eq!(retried["status"], "queued");
    let job = app.wait_status(id, &["failed", "succeeded"], WAIT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempt"], 3);

    let (status, problem) = app.post(&format!("/v1/jobs/{id}/retry"), &json!({})).await;
    assert_eq!(
        status, 409,
        "only failed or cancelled jobs retry: {problem}"
    );
}

/// An attempt that runs past `CONVEYOR_MAX_ATTEMPT_SECS` is stopped and fails, retried as any
/// failure is; a job within it is untouched. (Nothing bounded an attempt: one that never
/// ended held its slot for ever.)
#[tokio::test]
async fn an_attempt_past_the_deadline_is_stopped_and_fails() {
    let mut app = TestApp::spawn_with(|s| s.max_attempt = Duration::from_secs(2)).await;
    app.start_worker(2).await;
    let mut ids = Vec::new();
    for payload in [
        json!({"steps": 200, "step_ms": 100}),
        json!({"steps": 5, "step_ms": 100}),
    ] {
        let body = json!({"kind": "canary", "payload": payload, "max_attempts": 2});
        let (status, job) = app.post("/v1/jobs", &body).await;
        assert_eq!(status, 202, "{job}");
        ids.push(job["id"].as_str().unwrap().parse().unwrap());
    }
    let (slow, quick) = (ids[0], ids[1]);
    let job = app.wait_status(slow, &["failed", "succeeded"], WAIT).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["attempt"], 2, "retried once: {job}");
    let errors = job["attempt_errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "{job}");
    for error in errors {
        assert!(
            error
                .to_string()
                .contains("ran longer than 2 s (CONVEYOR_MAX_ATTEMPT_SECS)"),
            "{job}"
        );
    }
    let job = app.wait_status(quick, &["failed", "succeeded"], WAIT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
}

/// A canary stand-in that publishes for `publish` while ignoring cancels, as a commit on a slow
/// server or an upload does.
struct SlowPublisher {
    publish: Duration,
}

#[async_trait::async_trait]
impl jobs::Runner for SlowPublisher {
    fn kind(&self) -> &'static str {
        "canary"
    }

    async fn prepare(&self) -> anyhow::Result<()> {
        Ok(())
    }

    async fn run(
        &self,
        ctx: &shared::JobContext,
        _: serde_json::Value,
    ) -> Result<serde_json::Value, jobs::JobError> {
        ctx.progress(0.5, "publishing".to_owned()).await;
        let _publishing = ctx.committing().await?;
        tokio::time::sleep(self.publish).await;
        Ok(json!({"published": true}))
    }

    async fn sweep(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// A handler that does not stop when asked is dropped after a few seconds, but not while it
/// publishes what it made: that ends on its own, and the job reports what happened (dropped
/// mid-publish, it said cancelled with its dataset already registered).
#[tokio::test]
async fn a_cancel_does_not_drop_a_job_while_it_publishes() {
    let mut app = TestApp::spawn().await;
    let publisher = SlowPublisher {
        publish: Duration::from_secs(8),
    };
    let registry = jobs::Registry::new(vec![std::sync::Arc::new(publisher)]);
    app.start_worker_with(registry, &[("canary", 1)]).await;
    let id = app.submit_canary(json!({})).await;
    let deadline = std::time::Instant::now() + WAIT;
    while app.job(id).await["progress"].as_f64() != Some(0.5) {
        assert!(std::time::Instant::now() < deadline, "never published");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _) = app.post(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(status, 200);
    let job = app
        .wait_status(id, &["succeeded", "cancelled", "failed"], WAIT)
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"]["published"], true, "{job}");
}

/// Past the grace period a stopping worker waits for a job committing its work and writes its
/// outcome before it says it stopped: it stopped 10 s after the interrupt, leaving the job
/// `running` under a stopped worker for the rescuer to count as a death (failed on its last
/// attempt) while its commit went on, then was cut off.
#[tokio::test]
async fn a_stopping_worker_waits_for_a_job_committing_its_work() {
    let mut app = TestApp::spawn_with(|s| s.shutdown_grace = Duration::from_secs(1)).await;
    // Longer than the grace and the hand-back (1 + 10 s).
    let publisher = SlowPublisher {
        publish: Duration::from_secs(16),
    };
    let registry = jobs::Registry::new(vec![std::sync::Arc::new(publisher)]);
    let name = app.start_worker_with(registry, &[("canary", 1)]).await;
    let id = app.submit_canary(json!({})).await;
    let deadline = std::time::Instant::now() + WAIT;
    while app.job(id).await["progress"].as_f64() != Some(0.5) {
        assert!(std::time::Instant::now() < deadline, "never published");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.workers.pop().expect("the worker").shutdown().await;
    let job = app.job(id).await;
    assert_eq!(
        job["status"], "succeeded",
        "written before the worker stopped: {job}"
    );
    assert_eq!(job["result"]["published"], true, "{job}");
    assert!(
        app.worker_stopped(&name).await,
        "the worker's row says it is alive"
    );
}

/// A backlog of 10,000 jobs queued before any worker runs all succeed (when jobs went through
/// apalis' Redis lists, its push path jammed for good past about 8,000 waiting entries).
#[tokio::test]
async fn a_backlog_of_10000_jobs_drains_completely() {
    let mut app = TestApp::spawn_with(|s| s.body_limit = 1 << 20).await;
    for _ in 0..10 {
        let jobs: Vec<_> = (0..1000)
            .map(|_| json!({"kind": "canary", "payload": {"steps": 0}}))
            .collect();
        let (status, body) = app.post("/v1/jobs/batch", &json!({"jobs": jobs})).await;
        assert_eq!(status, 202, "{body}");
    }
    app.start_worker_for(&[("canary", 32)]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let count = |status: &'static str| {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs WHERE status = $1")
            .bind(status)
            .fetch_one(app.pool())
    };
    loop {
        let succeeded = count("succeeded").await.unwrap();
        if succeeded == 10_000 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{succeeded} of 10,000 succeeded"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(count("failed").await.unwrap(), 0);
}

/// `20261123000007_sessions.sql` was edited after it first landed; a database that ran the
/// first version (no `jobs_finished` index, the first checksum) still migrates, and gets the
/// index (sqlx alone refuses it: "previously applied but has been modified").
#[tokio::test]
async fn a_database_that_ran_the_first_sessions_migration_still_migrates() {
    let app = TestApp::spawn().await;
    let first = "b24e6b01d22a3ab56adcfe97ca684054013f9ee8d359cf56cf527a9b4b441c98\
                 9f3e88e469f78c0f4e27d4184bac7d39";
    sqlx::query("DROP INDEX jobs_finished")
        .execute(app.pool())
        .await
        .unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 20261202000004")
        .execute(app.pool())
        .await
        .unwrap();
    sqlx::query(
        "UPDATE _sqlx_migrations SET checksum = decode($1, 'hex') WHERE version = 20261123000007",
    )
    .bind(first)
    .execute(app.pool())
    .await
    .unwrap();
    shared::db::migrate(app.pool()).await.unwrap();
    let checksum: Vec<u8> =
        sqlx::query_scalar("SELECT checksum FROM _sqlx_migrations WHERE version = 20261123000007")
            .fetch_one(app.pool())
            .await
            .unwrap();
    let current = shared::db::MIGRATOR
        .iter()
        .find(|m| m.version == 20261123000007)
        .unwrap();
    assert_eq!(checksum, current.checksum.to_vec());
    let index: Option<String> = sqlx::query_scalar("SELECT to_regclass('jobs_finished')::text")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(index.as_deref(), Some("jobs_finished"));
}

/// A job submitted to run at a time long past waits from its submission: its `run_at` made
/// every tenant's queue read as waiting for 56 years, the age operators alert and scale on.
#[tokio::test]
async fn a_job_due_long_ago_waits_from_its_submission() {
    let app = TestApp::spawn().await;
    let job = json!({"kind": "canary", "payload": {"steps": 1}, "run_at": "1970-01-01T00:00:01Z"});
    let (status, body) = app.post("/v1/jobs", &job).await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{body}");
    let canary = app.queue("canary").await;
    assert_eq!(canary["waiting"], 1, "{canary}");
    let age = canary["oldest_waiting_seconds"].as_f64().unwrap();
    assert!(age < 60.0, "{canary}");
}

/// `20261220000001_collection_counts.sql` has run in two versions (as it landed, then with a
/// lock of `collections` before its fill-in): a database that ran the second holds its
/// checksum, which sqlx refuses ("previously applied but has been modified"); it still
/// migrates.
#[tokio::test]
async fn a_database_that_ran_the_edited_collection_counts_migration_still_migrates() {
    let app = TestApp::spawn().await;
    let edited = "bac0958cd1b1460469397547f01533024248a37e078a3ea3d810bf3e12ad029f\
                  a3f14c4afe7e8935f2070bd61e74d501";
    sqlx::query(
        "UPDATE _sqlx_migrations SET checksum = decode($1, 'hex') WHERE version = 20261220000001",
    )
    .bind(edited)
    .execute(app.pool())
    .await
    .unwrap();
    shared::db::migrate(app.pool()).await.unwrap();
    let checksum: Vec<u8> =
        sqlx::query_scalar("SELECT checksum FROM _sqlx_migrations WHERE version = 20261220000001")
            .fetch_one(app.pool())
            .await
            .unwrap();
    let landed = shared::db::MIGRATOR
        .iter()
        .find(|m| m.version == 20261220000001)
        .unwrap();
    assert_eq!(checksum, landed.checksum.to_vec());
}
