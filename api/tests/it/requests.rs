//! Authentication, validation, idempotency, batches, listing, and the ops endpoints.

use crate::harness::TestApp;
use reqwest::StatusCode;
use serde_json::{json, Value};

fn assert_problem(status: reqwest::StatusCode, expected: u16, body: &Value) {
    assert_eq!(status.as_u16(), expected, "{body}");
    assert_eq!(body["status"], expected, "{body}");
    assert!(
        body["title"].is_string() && body["detail"].is_string(),
        "{body}"
    );
}

fn field_errors(body: &Value) -> Vec<String> {
    body["errors"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["field"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn requests_without_a_valid_key_are_refused() {
    let app = TestApp::spawn().await;
    let response = app.client.get(app.url("/v1/jobs")).send().await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let response = app
        .client
        .get(app.url("/v1/jobs"))
        .bearer_auth("cvk_nope")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn bad_submissions_get_a_problem_naming_the_field() {
    let app = TestApp::spawn().await;
    let (status, body) = app.post("/v1/jobs", &json!({"kind": "nope"})).await;
    assert_problem(status, 422, &body);
    assert_eq!(field_errors(&body), ["kind"]);

    let (status, body) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "canary", "payload": {"steps": "ten"}}),
        )
        .await;
    assert_problem(status, 422, &body);
    assert_eq!(field_errors(&body), ["payload.steps"]);

    let (status, body) = app
        .post("/v1/jobs", &json!({"kind": "canary", "max_attempts": 0}))
        .await;
    assert_problem(status, 422, &body);
    assert_eq!(field_errors(&body), ["max_attempts"]);

    let (status, body) = app.post("/v1/jobs", &json!({"kind": 5})).await;
    assert_problem(status, 422, &body);
    assert_eq!(field_errors(&body), ["kind"]);

    let (status, body) = app.post("/v1/jobs", &json!({"payload": {}})).await;
    assert_problem(status, 422, &body);
    assert!(body["detail"].as_str().unwrap().contains("kind"), "{body}");

    let response = app
        .client
        .post(app.url("/v1/jobs"))
        .bearer_auth(&app.key)
        .header("content-type", "application/json")
        .body("{\"kind\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );

    let huge = "x".repeat(app.settings.body_limit + 1);
    let (status, body) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "canary", "payload": {"pad": huge}}),
        )
        .await;
    assert_problem(status, 413, &body);

    // A NUL character, which PostgreSQL stores in no text, anywhere: a 422 naming its field
    // (these were 500s, the statement failing), or for a file's name no such file.
    for (path, body, field) in [
        (
            "/v1/jobs",
            json!({"kind": "canary", "payload": {"note": "a\u{0}b"}}),
            "payload.note",
        ),
        ("/v1/collections", json!({"name": "docs\u{0}"}), "name"),
    ] {
        let (status, problem) = app.post(path, &body).await;
        assert_problem(status, 422, &problem);
        assert_eq!(field_errors(&problem), [field]);
    }
    let (status, problem) = app.get("/v1/jobs?kind=%00").await;
    assert_problem(status, 422, &problem);
    assert_eq!(field_errors(&problem), ["kind"]);
    // A kind no job has: it read all of the tenant's jobs to list none.
    let (status, problem) = app.get("/v1/jobs?kind=nope").await;
    assert_problem(status, 422, &problem);
    assert_eq!(field_errors(&problem), ["kind"]);
    let response = app
        .client
        .post(app.url("/v1/datasets?name=a%00.csv"))
        .bearer_auth(&app.key)
        .body("a\n1\n")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let mine = app.submit_canary(json!({"steps": 1})).await;
    let (status, _) = app.get(&format!("/v1/jobs/{mine}/artifacts/a%00b")).await;
    assert_eq!(status, 404);
    // A path that is not UTF-8 once decoded, and a method a route does not take: problems
    // too (axum answered in plain text, and with no body).
    for path in [
        "/v1/jobs/%FF".to_owned(),
        format!("/v1/jobs/{mine}/artifacts/%FF"),
        "/assets/%FF".to_owned(),
    ] {
        let (status, problem) = app.get(&path).await;
        assert_problem(status, 404, &problem);
    }
    let response = app
        .client
        .put(app.url("/v1/jobs"))
        .bearer_auth(&app.key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    assert!(response.headers().contains_key("allow"));
    // A time PostgreSQL cannot store (chrono reads signed years): a 422 naming it, not a 500.
    for run_at in [
        "-5000-01-01T00:00:00Z",
        "1969-12-31T23:59:59Z",
        "10000-01-01T00:00:00Z",
    ] {
        let (status, problem) = app
            .post("/v1/jobs", &json!({"kind": "canary", "run_at": run_at}))
            .await;
        assert_problem(status, 422, &problem);
        assert_eq!(field_errors(&problem), ["run_at"], "{run_at}");
    }
    let (_, collections) = app.get("/v1/collections").await;
    assert_eq!(
        collections["collections"].as_array().unwrap().len(),
        0,
        "{collections}"
    );

    // Nothing else was written by any of these.
    let (_, list) = app.get("/v1/jobs").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
}

/// A batch whose keys find stored jobs answers with those jobs without their payloads: a
/// thousand keys of jobs of a megabyte each made an answer of a gigabyte for 80 KB sent.
#[tokio::test]
async fn a_batch_answers_the_jobs_its_keys_found_without_their_payloads() {
    let app = TestApp::spawn().await;
    let collection = crate::ingest::create_collection(&app, json!({"name": "notes"})).await;
    let bulky = json!({"collection_id": collection,
                       "documents": [{"id": "a", "text": "word ".repeat(6_000)}]});
    let (status, first) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "ingest", "payload": bulky, "idempotency_key": "k0"}),
        )
        .await;
    assert_eq!(status, 202, "{first}");
    let jobs = json!([
        {"kind": "canary", "payload": {"steps": 1}, "idempotency_key": "k0"},
        {"kind": "canary", "payload": {"steps": 2}, "idempotency_key": "k1"},
    ]);
    let (status, answer) = app.post("/v1/jobs/batch", &json!({ "jobs": jobs })).await;
    assert_eq!(status, 202, "{answer}");
    let (found, created) = (&answer["jobs"][0], &answer["jobs"][1]);
    assert_eq!(found["id"], first["id"]);
    assert!(found["payload"].is_null(), "{found}");
    assert_eq!(
        created["payload"],
        json!({"steps": 2, "step_ms": 0, "fail_first": 0})
    );
    assert!(answer.to_string().len() < 5_000);
    // The job itself still has its payload (as parsed: defaults written out).
    let (_, stored) = app
        .get(&format!("/v1/jobs/{}", first["id"].as_str().unwrap()))
        .await;
    let parsed = contracts::Registry::standard().validate("ingest", &bulky);
    assert_eq!(&stored["payload"], parsed.unwrap().stored());
}

#[tokio::test]
async fn an_idempotency_key_returns_the_first_job() {
    let app = TestApp::spawn().await;
    let body = json!({"kind": "canary", "payload": {"steps": 1}, "idempotency_key": "order-42"});
    let (status, first) = app.post("/v1/jobs", &body).await;
    assert_eq!(status, 202);
    let (status, second) = app.post("/v1/jobs", &body).await;
    assert_eq!(status, 200);
    assert_eq!(first["id"], second["id"]);
    // Keys are per tenant.
    let other = app.key_for("globex").await;
    let response = app
        .client
        .post(app.url("/v1/jobs"))
        .bearer_auth(other)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let third: Value = response.json().await.unwrap();
    assert_ne!(third["id"], first["id"]);
}

#[tokio::test]
async fn another_tenants_job_is_not_found() {
    let app = TestApp::spawn().await;
    let id = app.submit_canary(json!({})).await;
    let other = app.key_for("globex").await;
    for path in [format!("/v1/jobs/{id}"), format!("/v1/jobs/{id}/events")] {
        let response = app
            .client
            .get(app.url(&path))
            .bearer_auth(&other)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{path}");
    }
    let response = app
        .client
        .post(app.url(&format!("/v1/jobs/{id}/cancel")))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(app.job(id).await["status"], "queued");
    let (status, _) = app.get("/v1/jobs/not-a-uuid").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_batch_is_accepted_or_refused_whole() {
    let app = TestApp::spawn().await;
    let jobs: Vec<Value> = (0..3)
        .map(|i| json!({"kind": "canary", "payload": {"steps": i}}))
        .collect();
    let (status, body) = app.post("/v1/jobs/batch", &json!({"jobs": jobs})).await;
    assert_eq!(status, 202, "{body}");
    let returned: Vec<u64> = body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["payload"]["steps"].as_u64().unwrap())
        .collect();
    assert_eq!(returned, [0, 1, 2], "results come in input order");

    let bad = json!({"jobs": [{"kind": "canary"}, {"kind": "canary", "payload": {"steps": -1}}]});
    let (status, body) = app.post("/v1/jobs/batch", &bad).await;
    assert_problem(status, 422, &body);
    assert_eq!(field_errors(&body), ["jobs[1].payload.steps"]);

    // 1,001 jobs in a body well under the body limit: the batch size is what is wrong, so a
    // validation problem naming `jobs` (413 is for bodies past the limit, tested above).
    let too_many: Vec<Value> = (0..1001).map(|_| json!({"kind": "canary"})).collect();
    let too_many = json!({"jobs": too_many});
    assert!(serde_json::to_vec(&too_many).unwrap().len() < app.settings.body_limit);
    let (status, body) = app.post("/v1/jobs/batch", &too_many).await;
    assert_problem(status, 422, &body);
    assert_eq!(field_errors(&body), ["jobs"]);

    let (_, list) = app.get("/v1/jobs?limit=100").await;
    assert_eq!(
        list["jobs"].as_array().unwrap().len(),
        3,
        "refused batches write nothing"
    );
}

/// `?status=failed` among 30,000 succeeded jobs read the tenant's whole history for one page:
/// no index has `status` or `kind` (none is added: each would cost every queue transition). A
/// filtered page now reads at most 10,000 of the tenant's jobs: it may come back short, or
/// empty, with a cursor where the reading stopped, and the cursors still give every match once.
#[tokio::test]
async fn a_filtered_list_reads_a_bounded_stretch_of_history_a_page() {
    let app = TestApp::spawn().await;
    // 30,001 jobs in id order (uuidv7() is monotonic within a session): the oldest and the
    // 15,000th failed imports, every other one a succeeded canary.
    sqlx::query(
        "INSERT INTO jobs (id, tenant_id, kind, status, payload, progress, attempt, started_at, finished_at)
         SELECT uuidv7(), $1,
                CASE WHEN i IN (1, 15000) THEN 'import' ELSE 'canary' END,
                CASE WHEN i IN (1, 15000) THEN 'failed' ELSE 'succeeded' END,
                '{}', 1, 1, now(), now()
         FROM generate_series(1, 30001) AS i",
    )
    .bind(app.tenant)
    .execute(app.pool())
    .await
    .unwrap();
    let failed: Vec<String> = sqlx::query_scalar(
        "SELECT id::text FROM jobs WHERE tenant_id = $1 AND status = 'failed' ORDER BY id DESC",
    )
    .bind(app.tenant)
    .fetch_all(app.pool())
    .await
    .unwrap();
    // 10,000 jobs read a request, newest first: 30,001..20,002, 20,001..10,002 (the 15,000th),
    // 10,001..2, then the oldest, after which nothing is left.
    for query in ["status=failed", "kind=import", "status=failed&kind=import"] {
        let (lengths, ids) = every_filtered_page(&app, query).await;
        assert_eq!(lengths, [0, 1, 0, 1], "{query}");
        assert_eq!(ids, failed, "{query}");
    }
    let (lengths, ids) = every_filtered_page(&app, "status=failed&kind=canary").await;
    assert_eq!((lengths, ids.len()), (vec![0, 0, 0, 0], 0));
    // A page that fills before its reading runs out ends at its last job, as before.
    let (status, page) = app.get("/v1/jobs?status=succeeded&limit=3").await;
    assert_eq!(status, 200, "{page}");
    let jobs = page["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 3);
    assert_eq!(page["next_cursor"], jobs[2]["id"]);
}

/// Every page of `GET /v1/jobs?{query}`: the pages' lengths, and the jobs' ids in order.
async fn every_filtered_page(app: &TestApp, query: &str) -> (Vec<usize>, Vec<String>) {
    let (mut lengths, mut ids) = (Vec::new(), Vec::new());
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/jobs?{query}&limit=500&cursor={c}"),
            None => format!("/v1/jobs?{query}&limit=500"),
        };
        let (status, page) = app.get(&path).await;
        assert_eq!(status, 200, "{page}");
        let jobs = page["jobs"].as_array().unwrap();
        lengths.push(jobs.len());
        ids.extend(jobs.iter().map(|j| j["id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return (lengths, ids),
        }
    }
}

#[tokio::test]
async fn lists_page_with_a_cursor_and_filter() {
    let mut app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(app.submit_canary(json!({})).await.to_string());
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/jobs?limit=2&cursor={c}"),
            None => "/v1/jobs?limit=2".to_owned(),
        };
        let (status, page) = app.get(&path).await;
        assert_eq!(status, 200, "{page}");
        seen.extend(
            page["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|j| j["id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "newest first, each once");

    app.start_worker(2).await;
    for id in &ids[..2] {
        app.wait_status(
            id.parse().unwrap(),
            &["succeeded"],
            std::time::Duration::from_secs(30),
        )
        .await;
    }
    let (_, queued) = app
        .get("/v1/jobs?status=succeeded&kind=canary&limit=500")
        .await;
    assert!(!queued["jobs"].as_array().unwrap().is_empty());
    assert!(queued["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|j| j["status"] == "succeeded"));
    let (status, body) = app.get("/v1/jobs?status=bogus").await;
    assert_problem(status, 422, &body);
    assert_eq!(field_errors(&body), ["status"]);
}

#[tokio::test]
async fn ops_endpoints_answer() {
    let mut app = TestApp::spawn().await;
    app.start_worker(1).await;
    let health: Value = app
        .client
        .get(app.url("/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    app.submit_canary(json!({})).await;
    let metrics = app.metrics().await;
    for name in [
        "conveyor_jobs_submitted_total 1",
        "conveyor_queue_waiting{queue=\"canary\"}",
        "conveyor_workers_alive 1",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
    let spec: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for path in [
        "/v1/jobs",
        "/v1/jobs/batch",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/cancel",
        "/v1/jobs/{id}/retry",
        "/v1/jobs/{id}/events",
        "/v1/events",
        "/v1/models",
        "/v1/models/{id}",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(
            spec["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(spec["components"]["schemas"]["Job"].is_object());
    assert!(spec["components"]["schemas"]["SavedModel"].is_object());
    assert!(spec["components"]["schemas"]["SamplePayload"].is_object());
    // Each kind's result is a documented type.
    for output in [
        "CanaryOutput",
        "ImportOutput",
        "PatchOutput",
        "RollbackOutput",
        "IngestOutput",
    ] {
        assert!(
            spec["components"]["schemas"][output].is_object(),
            "{output} missing from the OpenAPI document"
        );
    }
}

#[tokio::test]
async fn metrics_need_their_token_and_readiness_keeps_its_reasons() {
    let app = TestApp::spawn().await;
    let metrics = |token: Option<&str>| {
        let mut request = app.client.get(app.url("/metrics"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move { request.send().await.unwrap().status() }
    };
    assert_eq!(metrics(None).await, StatusCode::UNAUTHORIZED);
    // A tenant's key is not the metrics token.
    assert_eq!(metrics(Some(&app.key)).await, StatusCode::UNAUTHORIZED);
    assert_eq!(metrics(Some("test-metrics-token")).await, StatusCode::OK);
    let off = TestApp::spawn_with(|s| s.metrics_token = None).await;
    let status = off
        .client
        .get(off.url("/metrics"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The deployment examples' placeholders (and any short token) serve nothing: a copied
    // example opened every tenant's counts to whoever read the example.
    for placeholder in [
        "change-me",
        "change-me-metrics",
        "example-only",
        "short",
        "aaaaaaaaaaaaaaaaaaaaaaaa",
        "0123012301230123",
    ] {
        let copied = TestApp::spawn_with(|s| s.metrics_token = Some(placeholder.to_owned())).await;
        let status = copied
            .client
            .get(copied.url("/metrics"))
            .bearer_auth(placeholder)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, StatusCode::NOT_FOUND, "{placeholder}");
    }

    app.pool().close().await;
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let problem: Value = ready.json().await.unwrap();
    assert_eq!(problem["detail"], "PostgreSQL does not answer", "{problem}");
}

/// A body with thousands of faults: the answer names the first hundred and counts the rest
/// (each was listed, twice: 330,000 empty documents in 1 MiB made a 70 MB answer), and a
/// list past its bound is one fault, not one per item.
#[tokio::test]
async fn an_answer_names_at_most_a_hundred_faults() {
    let app = TestApp::spawn().await;
    let ingest = |documents: usize| {
        json!({"kind": "ingest", "payload": {
            "collection_id": uuid::Uuid::nil(), "documents": vec![json!({}); documents]}})
    };
    let response = app
        .client
        .post(app.url("/v1/jobs"))
        .bearer_auth(&app.key)
        .json(&ingest(5_000))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body = response.bytes().await.unwrap();
    assert!(body.len() < 64 << 10, "an answer of {} bytes", body.len());
    let problem: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        problem["errors"].as_array().unwrap().len(),
        100,
        "{problem}"
    );
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.ends_with("; and 4990 more"), "{detail}");

    let (status, problem) = app.post("/v1/jobs", &ingest(20_000)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        problem["errors"],
        json!([{"field": "payload.documents", "message": "must hold 1 to 10000 documents"}])
    );
}

/// Every item of a list, page after page: the pages' lengths and the ids in order.
async fn every_page(app: &TestApp, path: &str, field: &str) -> (Vec<usize>, Vec<String>) {
    let (mut lengths, mut ids) = (Vec::new(), Vec::new());
    let mut cursor: Option<String> = None;
    loop {
        let page_path = match &cursor {
            Some(c) => format!("{path}?limit=500&cursor={c}"),
            None => format!("{path}?limit=500"),
        };
        let (status, page) = app.get(&page_path).await;
        assert_eq!(status, 200, "{page}");
        let items = page[field].as_array().unwrap();
        lengths.push(items.len());
        ids.extend(items.iter().map(|i| i["id"].to_string()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return (lengths, ids),
        }
    }
}

/// A page of 500 jobs, pipelines or schedules of a megabyte each was read whole into the API's
/// memory for one request. A page now ends, with a cursor, once its rows pass
/// `page_max_bytes`; following the cursors still gives every item once.
#[tokio::test]
async fn list_pages_end_at_their_byte_bound() {
    let app = TestApp::spawn_with(|s| s.page_max_bytes = 100_000).await;
    let collection = crate::ingest::create_collection(&app, json!({"name": "notes"})).await;
    let text = "word ".repeat(6_000);
    let ingest = |i: usize| {
        json!({"collection_id": collection,
               "documents": [{"id": format!("doc{i}"), "text": text}]})
    };
    for i in 0..6 {
        let (status, body) = app
            .post("/v1/jobs", &json!({"kind": "ingest", "payload": ingest(i)}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    for i in 0..4 {
        let step = json!({"name": "index", "kind": "ingest", "payload": ingest(i)});
        let (status, body) = app.post("/v1/pipelines", &json!({"steps": [step]})).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let schedule = json!({"name": format!("s{i}"), "cron": "0 0 1 1 *", "paused": true,
                              "job": {"kind": "ingest", "payload": ingest(i)}});
        let (status, body) = app.post("/v1/schedules", &schedule).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    // Six jobs and the pipelines' four, 30 KB each; four pipelines and schedules.
    for (path, field, count) in [
        ("/v1/jobs", "jobs", 10),
        ("/v1/pipelines", "pipelines", 4),
        ("/v1/schedules", "schedules", 4),
    ] {
        let (lengths, ids) = every_page(&app, path, field).await;
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!((ids.len(), unique.len()), (count, count), "{path}: {ids:?}");
        assert!(
            lengths.iter().all(|&n| n <= 4) && lengths.len() > 1,
            "{path}: pages of {lengths:?} items under a 100 KB bound"
        );
    }
}

/// The audit log's pages end at the byte bound too (a patch's row carries its statement, up to
/// 64 KB: 500 of them were 32 MB a page): under a bound of one byte each page holds one row,
/// and the cursors still give every row once.
#[tokio::test]
async fn audit_pages_end_at_the_byte_bound() {
    let app = TestApp::spawn_with(|s| s.page_max_bytes = 1).await;
    for _ in 0..3 {
        app.submit_canary(json!({})).await;
    }
    let (lengths, ids) = every_page(&app, "/v1/audit", "entries").await;
    let all: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert!(all >= 3);
    assert_eq!(ids.len() as i64, all, "{ids:?}");
    assert!(lengths.iter().all(|&n| n <= 1), "{lengths:?}");
}

/// A client sending its request head a byte at a time, never ending it, is cut off once the
/// head's deadline passes: it held a connection and a task for ever, without credentials.
#[tokio::test]
async fn a_request_head_that_never_ends_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn().await;
    let addr = app.server.as_ref().unwrap().addr;
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(45),
        tcp.read_to_end(&mut answer),
    )
    .await;
    assert!(read.is_ok(), "still open after 45 s");
    assert!(started.elapsed() >= std::time::Duration::from_secs(5));
}

/// A connection that sends nothing, half an HTTP/2 preface, or the preface and then nothing,
/// is cut off as a head that never ends is: the detection of HTTP/2 read a connection's first
/// bytes with no deadline, and an HTTP/2 connection had none after (each held a descriptor
/// and a task for ever, without credentials).
#[tokio::test]
async fn a_connection_that_never_starts_a_request_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn().await;
    let addr = app.server.as_ref().unwrap().addr;
    let preface: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let openings: [&[u8]; 3] = [b"", b"PRI * HTTP", preface];
    let cut = openings.map(|opening| async move {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(opening).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(45),
            tcp.read_to_end(&mut answer),
        )
        .await;
        (opening, read.is_ok())
    });
    for (opening, closed) in futures::future::join_all(cut).await {
        assert!(closed, "{opening:?}: still open after 45 s");
    }
}

/// A client that pipelines requests and never reads the answers is cut off once a write has
/// waited `CONVEYOR_WRITE_STALL_SECS` for it: hyper has no write timeout, and the connection
/// and its task were held for ever.
#[tokio::test]
async fn a_client_that_never_reads_its_answers_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stall = std::time::Duration::from_secs(5);
    let app = TestApp::spawn_with(|s| s.write_stall = stall).await;
    let addr = app.server.as_ref().unwrap().addr;
    let answer = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let spec = answer.bytes().await.unwrap().len();
    // Far more answers than the sockets' buffers hold (loopback's grow to a few MB).
    let requests = (64 << 20) / spec + 1;
    let (mut read, mut write) = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap()
        .into_split();
    let pipelined = tokio::spawn(async move {
        for _ in 0..requests {
            let request = b"GET /openapi.json HTTP/1.1\r\nhost: conveyor\r\n\r\n";
            if write.write_all(request).await.is_err() {
                break;
            }
        }
        write
    });
    tokio::time::sleep(stall + std::time::Duration::from_secs(5)).await;

    let mut received = 0;
    let mut buffer = vec![0; 1 << 20];
    let ended = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while let Ok(n @ 1..) = read.read(&mut buffer).await {
            received += n;
        }
    })
    .await;
    assert!(ended.is_ok(), "still open after the write stalled");
    assert!(
        received < requests * spec,
        "all {requests} answers were sent ({received} bytes)"
    );
    pipelined.abort();
}

type BodyChunks = tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>;

/// A POST whose body is what the test sends on the returned channel, as it sends it.
fn post_streaming(
    app: &TestApp,
    path: &str,
) -> (
    BodyChunks,
    tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
) {
    let (send, body) = tokio::sync::mpsc::channel(2);
    let body = reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(body));
    let request = app
        .client
        .post(app.url(path))
        .bearer_auth(&app.key)
        .header("content-type", "application/json")
        .body(body)
        .send();
    (send, tokio::spawn(request))
}

/// At shutdown a request in flight is answered before its connection closes: it was cut off
/// (the client could not tell whether its job was accepted).
#[tokio::test]
async fn a_request_in_flight_at_shutdown_is_answered() {
    let mut app = TestApp::spawn().await;
    let (send, answer) = post_streaming(&app, "/v1/jobs");
    send.send(Ok(br#"{"kind": "canary", "#.to_vec()))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let server = app.server.take().unwrap();
    let stopped = tokio::spawn(server.shutdown());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!stopped.is_finished(), "stopped with a request in flight");
    send.send(Ok(br#""payload": {"steps": 1}}"#.to_vec()))
        .await
        .unwrap();
    drop(send);
    let answer = answer.await.unwrap().expect("an answer");
    assert_eq!(answer.status(), StatusCode::ACCEPTED);
    stopped.await.unwrap();
}

/// A request body that stops sending is answered 408 once it has sent nothing for
/// `CONVEYOR_BODY_IDLE_SECS`, a JSON body's as an upload's: a client that sent a head and then
/// nothing held its connection and handler for ever.
#[tokio::test]
async fn a_body_that_stops_sending_is_answered_408() {
    let app = TestApp::spawn_with(|s| s.body_idle = std::time::Duration::from_secs(2)).await;
    for (path, start) in [
        ("/v1/jobs", &br#"{"kind": "canary", "#[..]),
        ("/v1/datasets?name=slow.csv", &b"id,name\n1,a\n"[..]),
    ] {
        let (send, answer) = post_streaming(&app, path);
        send.send(Ok(start.to_vec())).await.unwrap();
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(std::time::Duration::from_secs(20), answer)
            .await
            .unwrap_or_else(|_| panic!("{path}: no answer 20 s after its body stopped"))
            .unwrap()
            .expect("an answer");
        assert!(started.elapsed() >= std::time::Duration::from_secs(1));
        assert_eq!(answer.status(), StatusCode::REQUEST_TIMEOUT, "{path}");
        let problem: Value = answer.json().await.unwrap();
        assert_eq!(
            problem["type"], "https://conveyor.dev/problems/body-idle",
            "{path}: {problem}"
        );
        drop(send);
    }
    let (_, datasets) = app.get("/v1/datasets").await;
    assert_eq!(datasets["datasets"], json!([]), "{datasets}");
}

#[tokio::test]
async fn a_json_body_trickling_past_its_deadline_is_answered_408() {
    let app = TestApp::spawn_with(|s| s.body_idle = std::time::Duration::from_secs(2)).await;
    let (send, answer) = post_streaming(&app, "/v1/jobs");
    // Never idle for as long as the idle bound, so only a deadline on the whole body ends it.
    let trickle = tokio::spawn(async move {
        send.send(Ok(br#"{"kind": "canary", "payload": {"note": ""#.to_vec()))
            .await
            .ok();
        while send.send(Ok(b"a".to_vec())).await.is_ok() {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    });
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(20), answer)
        .await
        .expect("no answer 20 s into a trickling body")
        .unwrap()
        .expect("an answer");
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
    assert_eq!(answer.status(), StatusCode::REQUEST_TIMEOUT);
    let problem: Value = answer.json().await.unwrap();
    assert_eq!(
        problem["type"], "https://conveyor.dev/problems/body-too-slow",
        "{problem}"
    );
    trickle.abort();
    let (_, jobs) = app.get("/v1/jobs").await;
    assert_eq!(jobs["jobs"], json!([]), "{jobs}");
}
