//! The dashboard's server side: sign-in sessions (cookie auth, CSRF header, sign-out), the
//! queues and workers panels, and the embedded assets.

use crate::harness::{SseReader, TestApp};
use reqwest::{header, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// Signs in with the app's key; returns the `Cookie` header value to send back.
async fn sign_in(app: &TestApp) -> String {
    let response = app
        .client
        .post(app.url("/v1/session"))
        .header("X-Conveyor-CSRF", "1")
        .json(&json!({"api_key": app.key}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let set_cookie = response.headers()[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["tenant"], "acme");
    set_cookie.split(';').next().unwrap().trim().to_owned()
}

#[tokio::test]
async fn a_session_cookie_signs_in_reads_streams_and_signs_out() {
    let mut app = TestApp::spawn().await;
    app.start_worker(1).await;

    // Sign-in needs the CSRF header and a real key.
    let no_header = app
        .client
        .post(app.url("/v1/session"))
        .json(&json!({"api_key": app.key}))
        .send()
        .await
        .unwrap();
    assert_eq!(no_header.status(), StatusCode::FORBIDDEN);
    let wrong_key = app
        .client
        .post(app.url("/v1/session"))
        .header("X-Conveyor-CSRF", "1")
        .json(&json!({"api_key": "cvk_nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_key.status(), StatusCode::UNAUTHORIZED);

    let response = app
        .client
        .post(app.url("/v1/session"))
        .header("X-Conveyor-CSRF", "1")
        .json(&json!({"api_key": app.key}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let set_cookie = response.headers()[header::SET_COOKIE].to_str().unwrap();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    let cookie = set_cookie.split(';').next().unwrap().trim().to_owned();
    let token = cookie.strip_prefix("conveyor_session=").unwrap();
    assert!(!token.contains(&app.key) && token.len() >= 64, "{cookie}");
    // Only the token's hash is stored.
    let stored: Vec<String> = sqlx::query_scalar("SELECT token_hash FROM sessions")
        .fetch_all(app.pool())
        .await
        .unwrap();
    assert_eq!(stored, vec![conveyor_api::auth::hash_key(token)]);
    // Plain HTTP here; behind a TLS-terminating proxy the cookie is `Secure`.
    assert!(!set_cookie.contains("Secure"), "{set_cookie}");
    let behind_tls = app
        .client
        .post(app.url("/v1/session"))
        .header("X-Conveyor-CSRF", "1")
        .header("X-Forwarded-Proto", "https")
        .json(&json!({"api_key": app.key}))
        .send()
        .await
        .unwrap();
    let secure = behind_tls.headers()[header::SET_COOKIE].to_str().unwrap();
    assert!(secure.contains("; Secure"), "{secure}");

    // Without any credentials: 401.
    let anonymous = app.client.get(app.url("/v1/jobs")).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);

    // The cookie reads jobs and the session.
    let with_cookie = |method: reqwest::Method, path: &str| {
        app.client
            .request(method, app.url(path))
            .header(header::COOKIE, &cookie)
    };
    let list = with_cookie(reqwest::Method::GET, "/v1/jobs")
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), StatusCode::OK);
    let session: Value = with_cookie(reqwest::Method::GET, "/v1/session")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(session["tenant"], "acme");
    assert!(session["expires_at"].is_string(), "{session}");

    // The tenant stream opens with the cookie and carries a new job's events.
    let events = with_cookie(reqwest::Method::GET, "/v1/events")
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), StatusCode::OK);
    let mut events = SseReader::from_response(events);

    // Changing something by cookie needs the CSRF header.
    let submit = json!({"kind": "canary", "payload": {"steps": 1}});
    let refused = with_cookie(reqwest::Method::POST, "/v1/jobs")
        .json(&submit)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let problem: Value = refused.json().await.unwrap();
    assert!(problem["detail"]
        .as_str()
        .unwrap()
        .contains("x-conveyor-csrf"));
    let accepted = with_cookie(reqwest::Method::POST, "/v1/jobs")
        .header("X-Conveyor-CSRF", "1")
        .json(&submit)
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), StatusCode::ACCEPTED);
    let job: Value = accepted.json().await.unwrap();
    let mut types = Vec::new();
    while types.last().map(String::as_str) != Some("succeeded") {
        let event = events.next(WAIT).await.expect("the job's events arrive");
        assert_eq!(event.data["job_id"], job["id"]);
        types.push(event.event);
    }
    assert_eq!(
        types.first().map(String::as_str),
        Some("queued"),
        "{types:?}"
    );

    // Sign-out needs the header too, clears the cookie and ends the session at once.
    let refused = with_cookie(reqwest::Method::DELETE, "/v1/session")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let signed_out = with_cookie(reqwest::Method::DELETE, "/v1/session")
        .header("X-Conveyor-CSRF", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(signed_out.status(), StatusCode::NO_CONTENT);
    let cleared = signed_out.headers()[header::SET_COOKIE].to_str().unwrap();
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    for path in ["/v1/jobs", "/v1/events"] {
        let after = with_cookie(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap();
        assert_eq!(after.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
}

#[tokio::test]
async fn a_session_ends_with_its_expiry_or_its_key() {
    let app = TestApp::spawn().await;
    let cookie = sign_in(&app).await;
    let read = || {
        app.client
            .get(app.url("/v1/jobs"))
            .header(header::COOKIE, &cookie)
            .send()
    };
    assert_eq!(read().await.unwrap().status(), StatusCode::OK);
    sqlx::query("UPDATE sessions SET expires_at = now() - interval '1 second'")
        .execute(app.pool())
        .await
        .unwrap();
    assert_eq!(read().await.unwrap().status(), StatusCode::UNAUTHORIZED);

    let cookie = sign_in(&app).await;
    let read = || {
        app.client
            .get(app.url("/v1/jobs"))
            .header(header::COOKIE, &cookie)
            .send()
    };
    assert_eq!(read().await.unwrap().status(), StatusCode::OK);
    sqlx::query("UPDATE api_keys SET revoked_at = now()")
        .execute(app.pool())
        .await
        .unwrap();
    assert_eq!(read().await.unwrap().status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn queues_and_workers_report_backlog_outcomes_and_heartbeats() {
    let mut app = TestApp::spawn().await;
    // Nothing serves the queue yet: the jobs wait in PostgreSQL.
    let waiting = [
        app.submit_canary(json!({"steps": 1})).await,
        app.submit_canary(json!({"steps": 1})).await,
    ];
    let canary = |queues: &Value| {
        queues["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["kind"] == "canary")
            .cloned()
            .expect("the canary queue is listed")
    };
    let (status, queues) = app.get("/v1/queues").await;
    assert_eq!(status, StatusCode::OK, "{queues}");
    let before = canary(&queues);
    assert_eq!(before["waiting"], 2, "{before}");
    assert_eq!(before["workers"], 0, "{before}");

    let name = app.start_worker(3).await;
    for id in waiting {
        app.wait_status(id, &["succeeded"], WAIT).await;
    }
    let failing = app
        .post(
            "/v1/jobs",
            &json!({"kind": "canary", "payload": {"fail_first": 1}, "max_attempts": 1}),
        )
        .await
        .1["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    app.wait_status(failing, &["failed"], WAIT).await;
    let running = app
        // Running through the rollup's next pass (every 15 s).
        .submit_canary(json!({"steps": 600, "step_ms": 100}))
        .await;
    let job = app.wait_status(running, &["running"], WAIT).await;
    // A job shows its worker as the workers list does, never its host and process id.
    assert_eq!(
        job["worker"],
        shared::leader::public_name(&name).as_str(),
        "{job}"
    );

    // The hour's outcomes come from the per-minute rollup, at most 15 s behind.
    let deadline = std::time::Instant::now() + WAIT;
    let after = loop {
        let after = canary(&app.get("/v1/queues").await.1);
        if after["succeeded_last_hour"] == 2 && after["failed_last_hour"] == 1 {
            break after;
        }
        assert!(std::time::Instant::now() < deadline, "{after}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(after["waiting"], 0, "{after}");
    assert_eq!(after["running"], 1, "{after}");
    assert_eq!(after["workers"], 1, "{after}");
    assert_eq!(after["concurrency"], 3, "{after}");

    let (status, workers) = app.get("/v1/workers").await;
    assert_eq!(status, StatusCode::OK);
    let workers = workers["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 1, "{workers:?}");
    // Tenants see a digest of the name, not the host and process id it holds.
    assert_eq!(
        workers[0]["name"],
        shared::leader::public_name(&name).as_str()
    );
    let shown = workers[0]["name"].as_str().unwrap();
    assert!(!shown.contains(&std::process::id().to_string()), "{shown}");
    assert!(shown.starts_with("worker-") && shown != name, "{shown}");
    assert_eq!(workers[0]["queues"], json!({"canary": 3}));
    assert_eq!(workers[0]["running"], 1);
    assert!(workers[0]["heartbeat_at"].is_string());

    // Both need a tenant, and both are in the OpenAPI document with the session routes.
    let anonymous = app.client.get(app.url("/v1/queues")).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let spec: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for path in ["/v1/queues", "/v1/workers", "/v1/session"] {
        assert!(spec["paths"][path].is_object(), "{path} missing");
    }
    assert!(spec["components"]["schemas"]["QueueStats"].is_object());
    assert!(spec["components"]["securitySchemes"]["session"].is_object());
}

/// `GET /v1/queues/history` answers from the maintenance rollup (`queue_minutes`), never from
/// the jobs table: every queue, every minute of the window, oldest first, gaps as zero jobs
/// and no sample.
/// `/metrics` reports the last hour's outcomes from the per-minute rollup: counted from `jobs`,
/// each scrape read every job that ended in the hour (millions at the queue's rate).
#[tokio::test]
async fn metrics_read_the_last_hour_from_the_rollup() {
    let app = TestApp::spawn().await;
    // A job that ended which the rollup has not seen: it must not show.
    let id = app.submit_canary(json!({"steps": 1})).await;
    sqlx::query(
        "UPDATE jobs SET status = 'failed', started_at = now() - interval '9 seconds',
                         finished_at = now() WHERE id = $1",
    )
    .bind(id)
    .execute(app.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO queue_minutes (kind, minute, succeeded, failed, cancelled,
                                    succeeded_seconds, failed_seconds, cancelled_seconds) VALUES
             ('canary', date_trunc('minute', now()) - interval '5 minutes', 1234, 0, 3, 99.5, 0, 1.5),
             ('canary', date_trunc('minute', now()) - interval '2 hours', 999, 999, 999, 9, 9, 9)",
    )
    .execute(app.pool())
    .await
    .unwrap();
    let metrics = app.metrics().await;
    let lines: Vec<&str> = metrics
        .lines()
        .filter(|l| l.contains("last_hour{") && l.contains("kind=\"canary\""))
        .collect();
    let value = |name: &str, status: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(name) && l.contains(&format!("status=\"{status}\"")))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
    };
    let finished = "conveyor_jobs_finished_last_hour";
    let seconds = "conveyor_job_run_seconds_last_hour";
    assert_eq!(value(finished, "succeeded"), Some(1234.0), "{lines:?}");
    assert_eq!(value(seconds, "succeeded"), Some(99.5), "{lines:?}");
    assert_eq!(value(finished, "cancelled"), Some(3.0), "{lines:?}");
    assert_eq!(value(seconds, "cancelled"), Some(1.5), "{lines:?}");
    assert_eq!(value(finished, "failed"), None, "{lines:?}");
}

#[tokio::test]
async fn queue_history_reads_the_per_minute_rollup() {
    let app = TestApp::spawn().await;
    // A job row the rollup has not seen: it must not show.
    app.submit_canary(json!({"steps": 1})).await;
    sqlx::query(
        "INSERT INTO queue_minutes (kind, minute, succeeded, failed, waiting) VALUES
             ('canary', date_trunc('minute', now()) - interval '5 minutes', 1234, 56, 7),
             ('canary', date_trunc('minute', now()) - interval '2 hours', 999, 999, 999),
             ('import', date_trunc('minute', now()), 0, 0, 3)",
    )
    .execute(app.pool())
    .await
    .unwrap();

    let (status, history) = app.get("/v1/queues/history").await;
    assert_eq!(status, StatusCode::OK, "{history}");
    let queue = |kind: &str| -> Vec<Value> {
        history["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["kind"] == kind)
            .unwrap_or_else(|| panic!("{kind} is listed: {history}"))["minutes"]
            .as_array()
            .unwrap()
            .clone()
    };
    let canary = queue("canary");
    assert_eq!(canary.len(), 60);
    assert_eq!(canary[59]["minute"], history["to"]);
    assert_eq!(canary[0]["minute"], history["from"]);
    assert_eq!(
        canary[54],
        json!({"minute": canary[54]["minute"], "succeeded": 1234, "failed": 56, "waiting": 7})
    );
    let others: i64 = canary
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 54)
        .map(|(_, m)| m["succeeded"].as_i64().unwrap() + m["failed"].as_i64().unwrap())
        .sum();
    assert_eq!(others, 0, "only the rollup's minutes count: {canary:?}");
    assert!(canary[59]["waiting"].is_null(), "no sample is no number");
    // `GET /v1/queues` reads its hour from the same rollup: the minute five minutes back
    // counts, the one two hours back does not, and the job row above is never read, ended or
    // not.
    sqlx::query("UPDATE jobs SET status = 'succeeded', attempt = 1, finished_at = now()")
        .execute(app.pool())
        .await
        .unwrap();
    let now = app.queue("canary").await;
    assert_eq!(
        (
            now["succeeded_last_hour"].as_i64(),
            now["failed_last_hour"].as_i64()
        ),
        (Some(1234), Some(56)),
        "{now}"
    );
    assert_eq!(queue("import")[59]["waiting"], 3);
    // Every kind of the deployment is listed, sampled or not.
    assert_eq!(queue("patch").len(), 60);

    let (_, wide) = app.get("/v1/queues/history?minutes=180").await;
    let canary = &wide["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["kind"] == "canary")
        .unwrap()["minutes"];
    assert_eq!(canary.as_array().unwrap().len(), 180);
    assert_eq!(canary[59]["succeeded"], 999);

    // Bad windows name the parameter; no key gets nothing.
    for query in ["minutes=0", "minutes=1441", "minutes=many", "hours=1"] {
        let (status, problem) = app.get(&format!("/v1/queues/history?{query}")).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{query}: {problem}"
        );
        let field = query.split('=').next().unwrap();
        assert!(problem.to_string().contains(field), "{query}: {problem}");
    }
    let anonymous = app
        .client
        .get(app.url("/v1/queues/history"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let (_, spec) = app.get("/openapi.json").await;
    assert!(spec["paths"]["/v1/queues/history"]["get"].is_object());
    assert!(spec["components"]["schemas"]["QueueMinute"].is_object());
}

#[tokio::test]
async fn the_dashboard_is_served_from_the_binary() {
    let app = TestApp::spawn().await;
    let page = app.client.get(app.url("/")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.headers()[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let csp = page.headers()[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(html.contains("/assets/app.js") && html.contains("/assets/style.css"));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no external assets"
    );
    // Every asset the page names is served (a screen's script forgotten in dashboard.rs is not).
    let named: Vec<&str> = html
        .split("\"/assets/")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap())
        .collect();
    assert_eq!(
        named,
        [
            "style.css",
            "app.js",
            "patch.js",
            "import.js",
            "collections.js",
            "flows.js",
            "queues.js"
        ]
    );
    for name in named {
        let path = format!("/assets/{name}");
        let content_type = if name.ends_with(".css") {
            "text/css"
        } else {
            "text/javascript"
        };
        let asset = app.client.get(app.url(&path)).send().await.unwrap();
        assert_eq!(asset.status(), StatusCode::OK, "{path}");
        assert!(asset.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with(content_type));
        assert!(asset.text().await.unwrap().len() > 500);
    }
    let missing = app
        .client
        .get(app.url("/assets/nope.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}

/// Many dashboards on one tenant share one Redis read, and each still gets every event once,
/// in order: the same sequence as a reader that replays it from Redis afterwards.
#[tokio::test]
async fn many_subscribers_share_one_feed_and_miss_nothing() {
    let mut app = TestApp::spawn().await;
    let mut readers = Vec::new();
    for _ in 0..20 {
        readers.push(app.sse("/v1/events", None).await);
    }
    let metrics = app.metrics().await;
    assert!(metrics.contains("conveyor_sse_feeds 1\n"), "{metrics}");
    app.start_worker(4).await;
    let mut jobs = std::collections::HashSet::new();
    for _ in 0..10 {
        jobs.insert(
            app.submit_canary(json!({"steps": 5, "step_ms": 20}))
                .await
                .to_string(),
        );
    }
    let mut sequences = Vec::new();
    for reader in &mut readers {
        let mut ids = Vec::new();
        let mut done = 0;
        while done < jobs.len() {
            let event = reader.next(WAIT).await.expect("events keep coming");
            assert!(jobs.contains(event.data["job_id"].as_str().unwrap()));
            if event.event == "succeeded" {
                done += 1;
            }
            ids.push(event.id.unwrap());
        }
        sequences.push(ids);
    }
    assert!(
        sequences.iter().all(|s| s == &sequences[0]),
        "readers disagree"
    );
    let first = &sequences[0];
    assert!(first.len() >= 10 * 4, "{}", first.len());
    let mut replay = app
        .sse(&format!("/v1/events?after={}", first[0]), None)
        .await;
    for expected in &first[1..] {
        assert_eq!(replay.next(WAIT).await.unwrap().id.as_ref(), Some(expected));
    }
}
