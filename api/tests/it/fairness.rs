//! Tenants share the queues fairly: a tenant arriving behind another's backlog starts at once,
//! and a tenant's `max_running` holds across worker processes.

use crate::harness::TestApp;
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;
use uuid::Uuid;

/// Submits `count` canary jobs as `key`, in batches of 1,000.
async fn submit_many(app: &TestApp, key: &str, count: usize, payload: serde_json::Value) {
    let mut left = count;
    while left > 0 {
        let n = left.min(1000);
        let jobs: Vec<_> = (0..n)
            .map(|_| json!({"kind": "canary", "payload": payload}))
            .collect();
        let (status, body) = app
            .post_as(key, "/v1/jobs/batch", &json!({ "jobs": jobs }))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        left -= n;
    }
}

/// A holds a backlog of 10,000 jobs on a queue of 4 slots; B's 10 jobs, submitted afterwards,
/// start among the next few starts (read from the job rows, not timed), sharing the slots
/// with A, which keeps those B does not use. Before fair dispatch B's jobs sat behind all of
/// A's in the queue.
#[tokio::test]
async fn a_late_tenant_starts_among_the_next_claims_behind_a_backlog() {
    late_tenant_behind_a_backlog(4).await;
}

/// The same with 16 slots, claimed up to half of them at a time.
#[tokio::test]
async fn a_late_tenant_starts_among_the_next_claims_with_16_slots() {
    late_tenant_behind_a_backlog(16).await;
}

async fn late_tenant_behind_a_backlog(slots: usize) {
    let mut app = TestApp::spawn().await;
    let b_key = app.key_for("beta").await;
    let backlog = json!({"steps": 1, "step_ms": 10});
    let a_key = app.key.clone();
    submit_many(&app, &a_key, 10_000, backlog.clone()).await;
    app.start_worker(slots).await;
    // A's backlog drains for a while before B arrives.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
            .fetch_one(app.pool())
            .await
            .unwrap();
        if done >= 40 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "A's backlog is not draining"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    submit_many(&app, &b_key, 10, backlog).await;
    let beta = app.tenant_id("beta").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE tenant_id = $1 AND status = 'succeeded'",
        )
        .bind(beta)
        .fetch_one(app.pool())
        .await
        .unwrap();
        if done == 10 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "B's jobs did not all run"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every start after B's submission, in order: whose was it, and when? One claim's jobs
    // share their start time.
    let starts: Vec<(Uuid, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT tenant_id, started_at FROM jobs
         WHERE started_at >= (SELECT min(created_at) FROM jobs WHERE tenant_id = $1)
         ORDER BY started_at, id",
    )
    .bind(beta)
    .fetch_all(app.pool())
    .await
    .unwrap();
    let b_positions: Vec<usize> = starts
        .iter()
        .enumerate()
        .filter(|(_, (t, _))| *t == beta)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(b_positions.len(), 10);
    // Ahead of B's first: the claims made before the announcement of B's jobs reached the
    // worker (they resume after A's cursor and do not see a new tenant). Then the tenants
    // share the slots evenly: B's ten go out alternating with A's at worst.
    let (first, last) = (b_positions[0], *b_positions.last().unwrap());
    let window = 3 * slots;
    assert!(
        first < window + slots,
        "B's first job started {} starts after B arrived",
        first + 1
    );
    assert!(
        last < window + slots + 2 * 10,
        "B's last job started {} starts after B arrived: {b_positions:?}",
        last + 1
    );
    // A's jobs claimed with B's last count: within one claim the order by id is chance. Fair
    // share may give B every slot freed until B runs as many as A (16 slots: B's ten can all
    // start first), so A counts up to one round of slots past B's last.
    let b_last_start = starts[last].1;
    let round_after = starts
        .get(last + slots)
        .map_or(b_last_start, |(_, at)| (*at).max(b_last_start));
    let a_meanwhile = starts
        .iter()
        .filter(|(t, at)| *t != beta && *at <= round_after)
        .count();
    assert!(a_meanwhile > 0, "A kept the slots B did not use");
}

/// A tenant capped at 2 running canary jobs never has more running, though two worker
/// processes offer 8 slots; another tenant takes the rest.
#[tokio::test]
async fn max_running_holds_across_two_worker_processes() {
    let app = TestApp::spawn().await;
    sqlx::query(
        "INSERT INTO tenant_limits (tenant_id, max_running) VALUES ($1, '{\"canary\": 2}')",
    )
    .bind(app.tenant)
    .execute(app.pool())
    .await
    .unwrap();
    let other = app.key_for("other").await;
    let _one = app.spawn_worker_process("canary=4");
    let _two = app.spawn_worker_process("canary=4");
    let job = json!({"steps": 3, "step_ms": 100});
    let key = app.key.clone();
    submit_many(&app, &key, 20, job.clone()).await;
    submit_many(&app, &other, 20, job).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let (mut peak, mut other_peak) = (0, 0);
    loop {
        let (capped, uncapped, left): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'running' AND tenant_id = $1),
                    count(*) FILTER (WHERE status = 'running' AND tenant_id <> $1),
                    count(*) FILTER (WHERE status NOT IN ('succeeded', 'failed', 'cancelled'))
             FROM jobs",
        )
        .bind(app.tenant)
        .fetch_one(app.pool())
        .await
        .unwrap();
        peak = peak.max(capped);
        other_peak = other_peak.max(uncapped);
        assert!(capped <= 2, "{capped} running under a cap of 2");
        if left == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{left} jobs left");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(peak, 2, "the capped tenant used its 2 slots");
    assert!(
        other_peak > 2,
        "the other tenant used the rest: {other_peak}"
    );
    let failed: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status <> 'succeeded'")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(failed, 0);
}

/// Within a tenant, `priority` decides which waiting job goes next: one submitted behind 5,000
/// of the same tenant and kind is among the next starts (before fair dispatch, the queue was
/// FIFO and it waited for all 5,000).
#[tokio::test]
async fn a_high_priority_job_overtakes_its_tenants_backlog() {
    let mut app = TestApp::spawn().await;
    let key = app.key.clone();
    submit_many(&app, &key, 5_000, json!({"steps": 1, "step_ms": 10})).await;
    let (status, job) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "canary", "payload": {"steps": 1}, "priority": 10}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let urgent: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    app.start_worker(4).await;
    let job = app
        .wait_status(urgent, &["succeeded", "failed"], Duration::from_secs(60))
        .await;
    assert_eq!(job["status"], "succeeded");
    let started_before: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE started_at < (SELECT started_at FROM jobs WHERE id = $1)",
    )
    .bind(urgent)
    .fetch_one(app.pool())
    .await
    .unwrap();
    // Queued before the worker started: its first claim takes the urgent job first.
    assert_eq!(
        started_before, 0,
        "{started_before} jobs started before the urgent one"
    );
}

/// A worker claims its next job as soon as a slot frees, not at its idle poll: a backlog of 20
/// drains through one slot in seconds although the idle poll and the heartbeat are seconds
/// long.
#[tokio::test]
async fn a_worker_claims_its_next_job_as_soon_as_a_slot_frees() {
    let mut app = TestApp::spawn_with(|s| {
        s.idle_poll = Duration::from_secs(60);
        s.heartbeat = Duration::from_secs(10);
        s.rescue_after = Duration::from_secs(60);
    })
    .await;
    let key = app.key.clone();
    submit_many(&app, &key, 20, json!({"steps": 1, "step_ms": 1})).await;
    app.start_worker(1).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
            .fetch_one(app.pool())
            .await
            .unwrap();
        if done == 20 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {done} of 20 jobs ran: the worker waited for its idle poll"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A worker idle on an empty queue is woken by another process's announcement (the API's,
/// after a submission) through Redis Pub/Sub, not left to its idle poll (a minute here): each
/// of the jobs submitted one by one runs within seconds.
#[tokio::test]
async fn an_announcement_from_another_process_wakes_an_idle_worker_at_once() {
    let mut app = TestApp::spawn_with(|s| {
        s.idle_poll = Duration::from_secs(60);
        s.heartbeat = Duration::from_secs(10);
        s.rescue_after = Duration::from_secs(60);
    })
    .await;
    app.start_worker(2).await;
    // The worker's first look at its queue (found empty) is behind it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for n in 1..=3 {
        let (status, job) = app
            .post(
                "/v1/jobs",
                &json!({"kind": "canary", "payload": {"steps": 1, "step_ms": 1}}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
        let started = std::time::Instant::now();
        let job = app
            .wait_status(id, &["succeeded", "failed"], Duration::from_secs(30))
            .await;
        assert_eq!(job["status"], "succeeded");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "job {n} waited {:?} for the idle worker to look",
            started.elapsed()
        );
    }
}
