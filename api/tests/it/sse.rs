//! Event streams: resume with Last-Event-ID or ?after=, snapshots of expired streams, the
//! tenant stream.

use crate::harness::TestApp;
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);

/// Starts a worker and a canary job; the path of the job's stream.
async fn a_running_canary(app: &mut TestApp, steps: u32, step_ms: u32) -> String {
    app.start_worker(1).await;
    let id = app
        .submit_canary(json!({"steps": steps, "step_ms": step_ms}))
        .await;
    format!("/v1/jobs/{id}/events")
}

#[tokio::test]
async fn a_client_that_reconnects_gets_every_event_exactly_once_in_order() {
    let mut app = TestApp::spawn().await;
    let path = a_running_canary(&mut app, 12, 120).await;

    let mut first = app.sse(&path, None).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(first.next(WAIT).await.expect("an event"));
    }
    drop(first); // disconnect mid-job
                 // Events happen while the client is away: the job has moved on past what it saw.
    let id: uuid::Uuid = path
        .trim_start_matches("/v1/jobs/")
        .trim_end_matches("/events")
        .parse()
        .unwrap();
    let seen_progress = app.job(id).await["progress"].as_f64().unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while app.job(id).await["progress"].as_f64().unwrap() <= seen_progress {
        assert!(
            std::time::Instant::now() < deadline,
            "the job made no progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cursor = seen.last().unwrap().id.clone().unwrap();
    let rest = app.sse(&path, Some(&cursor)).await.collect(WAIT).await;
    seen.extend(rest);
    assert_eq!(seen.last().unwrap().event, "succeeded");

    // The whole stream, read afresh once the job is over, is exactly what the client assembled.
    let full = app.sse(&path, None).await.collect(WAIT).await;
    let ids = |v: &[crate::harness::SseMessage]| {
        v.iter().map(|m| m.id.clone().unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(ids(&seen), ids(&full));
    assert!(full.len() > 6, "{}", full.len());

    // The cursor as a query parameter (EventSource after a page reload) works the same.
    let middle = full[5].id.clone().unwrap();
    let after = app
        .sse(&format!("{path}?after={middle}"), None)
        .await
        .collect(WAIT)
        .await;
    assert_eq!(ids(&after), ids(&full)[6..].to_vec());
}

#[tokio::test]
async fn an_expired_stream_yields_one_snapshot_of_the_job_row() {
    let mut app = TestApp::spawn().await;
    app.start_worker(1).await;
    let id = app.submit_canary(json!({"steps": 2})).await;
    app.wait_status(id, &["succeeded"], WAIT).await;
    let tenant: uuid::Uuid = sqlx::query_scalar("SELECT tenant_id FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_one(app.pool())
        .await
        .unwrap();
    // Finished streams carry an expiry; jump to the moment it passes.
    let key = shared::events::StreamKeys::new(&app.settings.redis_prefix).job(tenant, id);
    let mut redis = redis::Client::open(app.settings.redis_url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let ttl: i64 = redis::cmd("TTL").arg(&key).query(&mut redis).unwrap();
    assert!(ttl > 0, "a finished job's stream must expire, TTL {ttl}");
    let _: () = redis::cmd("DEL").arg(&key).query(&mut redis).unwrap();

    let events = app
        .sse(&format!("/v1/jobs/{id}/events"), Some("1-0"))
        .await
        .collect(WAIT)
        .await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].event, "snapshot");
    assert_eq!(events[0].data["status"], "succeeded");
    assert_eq!(events[0].data["progress"], 1.0);
}

#[tokio::test]
async fn the_tenant_stream_carries_every_job_and_resumes() {
    let mut app = TestApp::spawn().await;
    let mut live = app.sse("/v1/events", None).await;
    app.start_worker(2).await;
    let a = app.submit_canary(json!({"steps": 2})).await;
    let b = app.submit_canary(json!({"steps": 2})).await;
    let mut done = std::collections::HashSet::new();
    let mut received = Vec::new();
    while done.len() < 2 {
        let event = live.next(WAIT).await.expect("tenant events keep coming");
        if event.event == "succeeded" {
            done.insert(event.data["job_id"].as_str().unwrap().to_owned());
        }
        received.push(event);
    }
    assert!(done.contains(&a.to_string()) && done.contains(&b.to_string()));
    // A start names its worker as tenants see workers, not by its host and process id.
    let started = received.iter().find(|e| e.event == "started").unwrap();
    let worker = started.data["data"]["worker"].as_str().unwrap();
    assert!(
        worker.starts_with("worker-") && !worker.contains(&std::process::id().to_string()),
        "{worker}"
    );

    // Resuming from the third event replays the rest exactly.
    let cursor = received[2].id.clone().unwrap();
    let mut resumed = app.sse("/v1/events", Some(&cursor)).await;
    for expected in &received[3..] {
        let got = resumed.next(WAIT).await.expect("replayed event");
        assert_eq!(got.id, expected.id);
    }

    // A cursor that is not one is named where it came from; a misspelt parameter is named
    // too (it started the stream live, with no replay).
    for (query, field, says) in [
        ("after=nope", "after", "not an event id"),
        ("last_event_id=0", "last_event_id", "unknown field"),
    ] {
        let (status, problem) = app.get(&format!("/v1/events?{query}")).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
        assert_eq!(problem["errors"][0]["field"], field, "{problem}");
        let message = problem["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains(says), "{problem}");
    }

    // Another tenant sees none of it.
    let other = app.key_for("globex").await;
    let response = app
        .client
        .get(app.url("/v1/events?after=0"))
        .bearer_auth(other)
        .send()
        .await
        .unwrap();
    let mut other_stream = crate::harness::SseReader::from_response(response);
    assert!(other_stream
        .next(Duration::from_millis(700))
        .await
        .is_none());
}

#[tokio::test]
async fn a_quiet_stream_sends_a_keep_alive_every_five_seconds_and_events_at_once() {
    let mut app = TestApp::spawn().await;
    let mut response = app
        .client
        .get(app.url("/v1/events"))
        .bearer_auth(&app.key)
        .send()
        .await
        .unwrap();
    let opened = std::time::Instant::now();
    let mut keep_alives = Vec::new();
    while keep_alives.len() < 2 {
        let chunk = tokio::time::timeout(Duration::from_secs(8), response.chunk())
            .await
            .expect("a keep-alive within 8 s")
            .unwrap()
            .expect("the stream stays open");
        assert_eq!(&chunk[..], b": keep-alive\n\n");
        keep_alives.push(opened.elapsed());
    }
    // Each on the five-second schedule, none early. (Not the gap between the two as read
    // here: a first one read late on a busy machine made a short gap of an on-time second.)
    assert!(
        keep_alives[0] >= Duration::from_millis(4900)
            && keep_alives[1] >= Duration::from_millis(9800),
        "{keep_alives:?}"
    );

    // The keep-alive timer does not hold events back.
    app.start_worker(1).await;
    let id = app.submit_canary(json!({"steps": 1})).await;
    let mut live = crate::harness::SseReader::from_response(response);
    let event = live.next(WAIT).await.expect("the job's events");
    assert_eq!(event.data["job_id"], id.to_string());
}

#[tokio::test]
async fn open_streams_end_when_the_server_stops() {
    let mut app = TestApp::spawn().await;
    let mut live = app.sse("/v1/events", None).await;
    let path = a_running_canary(&mut app, 40, 100).await;
    let mut job = app.sse(&path, None).await;
    assert!(live.next(WAIT).await.is_some() && job.next(WAIT).await.is_some());

    let stopped = std::time::Instant::now();
    app.server.take().expect("api running").shutdown().await;
    // Both streams close (not a quiet stream kept open): `None` well before the 5 s keep-alive.
    for stream in [&mut live, &mut job] {
        while stream.next(Duration::from_secs(3)).await.is_some() {}
    }
    assert!(
        stopped.elapsed() < Duration::from_secs(3),
        "{:?}",
        stopped.elapsed()
    );
}

/// A job's stream is its part of the tenant's stream, under the same ids, and the API follows
/// every job of a tenant from that one stream's feed: no Redis read or connection per job.
#[tokio::test]
async fn job_streams_are_their_jobs_part_of_the_tenant_stream_and_share_its_feed() {
    let mut app = TestApp::spawn().await;
    app.start_worker(4).await;
    let mut jobs = Vec::new();
    for _ in 0..5 {
        let id = app.submit_canary(json!({"steps": 5, "step_ms": 100})).await;
        jobs.push((id, app.sse(&format!("/v1/jobs/{id}/events"), None).await));
    }
    let metrics = app.metrics().await;
    assert!(metrics.contains("conveyor_sse_feeds 1\n"), "{metrics}");

    let mut tenant = app.sse("/v1/events?after=0", None).await;
    let mut tenant_ids = std::collections::HashMap::<String, Vec<String>>::new();
    let mut done = 0;
    while done < jobs.len() {
        let event = tenant.next(WAIT).await.expect("tenant events keep coming");
        done += usize::from(event.event == "succeeded");
        let job = event.data["job_id"].as_str().unwrap().to_owned();
        tenant_ids.entry(job).or_default().push(event.id.unwrap());
    }
    for (id, stream) in &mut jobs {
        let events = stream.collect(WAIT).await;
        assert_eq!(events.last().unwrap().event, "succeeded");
        assert!(events.len() >= 7, "{events:?}");
        let ids: Vec<String> = events.into_iter().map(|e| e.id.unwrap()).collect();
        assert_eq!(ids, tenant_ids[&id.to_string()], "job {id}");
    }
}

/// A tenant holds at most `CONVEYOR_MAX_STREAMS_PER_TENANT` streams open on one API process:
/// one more is a 429 (a job's, the tenant's or a pipeline's) before PostgreSQL or Redis is
/// asked anything, another tenant is not held back, and a closed stream frees its place.
#[tokio::test]
async fn a_tenant_past_its_open_streams_gets_429_and_others_do_not() {
    let app = TestApp::spawn_with(|s| s.max_streams_per_tenant = 2).await;
    let job = app.submit_canary(json!({"steps": 1})).await;
    let first = app.sse("/v1/events", None).await;
    let _second = app.sse(&format!("/v1/jobs/{job}/events"), None).await;
    let (status, pipeline) = app
        .post(
            "/v1/pipelines",
            &json!({"steps": [{"name": "a", "kind": "canary", "payload": {"steps": 1}}]}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{pipeline}");
    let pipeline = pipeline["id"].as_str().unwrap();
    // Refused before anything is read: a job or pipeline that does not exist is refused for
    // the cap too (its stream read the row, and Redis, first).
    let unknown = Uuid::now_v7();
    for path in [
        "/v1/events".to_owned(),
        format!("/v1/jobs/{job}/events"),
        format!("/v1/pipelines/{pipeline}/events"),
        format!("/v1/jobs/{unknown}/events"),
        format!("/v1/pipelines/{unknown}/events"),
    ] {
        let (status, problem) = tokio::time::timeout(Duration::from_secs(10), app.get(&path))
            .await
            .unwrap_or_else(|_| panic!("{path} was opened"));
        assert_eq!(status, reqwest::StatusCode::TOO_MANY_REQUESTS, "{path}");
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("CONVEYOR_MAX_STREAMS_PER_TENANT"),
            "{problem}"
        );
    }
    let open_as = async |key: &str| {
        let request = app.client.get(app.url("/v1/events")).bearer_auth(key);
        request.send().await.unwrap().status()
    };
    let other = app.key_for("globex").await;
    assert_eq!(open_as(&other).await, reqwest::StatusCode::OK);
    drop(first);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if open_as(&app.key).await == reqwest::StatusCode::OK {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the place was not freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An open job stream checks at each quiet spell whether its job ended without an event: it
/// read the whole row for that, a payload of up to a megabyte, for each of up to a thousand
/// streams a tenant holds on a job that waits. It reads the status alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_job_stream_reads_no_payload_while_it_waits() {
    let app = TestApp::spawn_with(|s| s.body_limit = 1 << 20).await;
    let collection = crate::ingest::create_collection(&app, json!({"name": "notes"})).await;
    // Text that does not compress, so that the payload is stored out of line.
    let text = crate::harness::incompressible_text(6000, 11);
    let run_at = chrono::Utc::now() + chrono::Duration::hours(1);
    let (status, job) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "ingest", "run_at": run_at,
                "payload": {"collection_id": collection, "documents": [{"id": "a", "text": text}]}}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{job}");
    let mut stream = app
        .sse(
            &format!("/v1/jobs/{}/events", job["id"].as_str().unwrap()),
            None,
        )
        .await;
    // The stream's first read of the job, and the submission's, reach the statistics once
    // their sessions have been idle a while (PostgreSQL flushes them within 10 s).
    tokio::time::sleep(Duration::from_secs(11)).await;
    let before = app.toast_blocks("jobs").await;
    // Six seconds: at least one quiet check (every five); then its statistics are flushed.
    let window = std::time::Instant::now() + Duration::from_secs(6);
    while std::time::Instant::now() < window {
        stream.next(window - std::time::Instant::now()).await;
    }
    tokio::time::sleep(Duration::from_secs(11)).await;
    let read = app.toast_blocks("jobs").await - before;
    assert_eq!(
        read, 0,
        "the stream's checks read {read} blocks of the payload"
    );
    drop(stream);
}
