//! The dashboard's screens in chromium (tests/browser/{patch,import,search,flows}.mjs, run through
//! browser.rs' BrowserScript): patch review against a real table, checked from here after each
//! step; an import's rejected rows; searches from the page against the API's own answers.

use crate::{browser::BrowserScript, harness::TestApp, webhooks::Receiver};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(300);

/// A patch worker and `accounts` (3,000 rows, plan `free`) on the app's target, which is
/// returned. Shared with the CLI's patch test.
pub(crate) async fn patch_fixture(app: &mut TestApp) -> PgPool {
    app.start_worker_for(&[("patch", 1), ("patch_rollback", 1)])
        .await;
    let target = PgPool::connect(&app.target_url()).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE accounts (id bigint PRIMARY KEY, plan text NOT NULL, credits int NOT NULL);
         INSERT INTO accounts SELECT i, 'free', i * 10 FROM generate_series(1, 3000) i;
         ANALYZE accounts;",
    )
    .execute(&target)
    .await
    .unwrap();
    target
}

/// Every row of `accounts`, by key.
pub(crate) async fn accounts(target: &PgPool) -> Vec<(i64, String, i32)> {
    sqlx::query_as("SELECT id, plan, credits FROM accounts ORDER BY id")
        .fetch_all(target)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_patch_screen_previews_dry_runs_executes_and_rolls_back() {
    let mut app = TestApp::spawn().await;
    let target = patch_fixture(&mut app).await;
    let before = accounts(&target).await;
    let warehouse = app.warehouse().await;

    let mut script = BrowserScript::start(&app, "patch.mjs", &[&warehouse.url]);
    while let Some(request) = tokio::time::timeout(LIMIT, script.request())
        .await
        .expect("the browser script asks in time")
    {
        let now = accounts(&target).await;
        match request.as_str() {
            // Preflight and dry runs change nothing; a rollback restores every row.
            "unchanged" | "rolled-back" => assert_eq!(now, before, "after {request}"),
            "executed" => {
                let expected: Vec<_> = before
                    .iter()
                    .map(|(id, plan, credits)| {
                        let plan = if *id <= 2000 { "gold" } else { plan.as_str() };
                        (*id, plan.to_owned(), *credits)
                    })
                    .collect();
                assert_eq!(now, expected, "after execute");
            }
            other => panic!("unexpected request from the browser script: {other}"),
        }
        script.answer("ok").await;
    }
    script.finish(LIMIT).await;
    target.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_import_screen_maps_columns_and_shows_rejected_rows() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("import", 1)]).await;
    let target = PgPool::connect(&app.target_url()).await.unwrap();

    let mut script = BrowserScript::start(&app, "import.mjs", &[]);
    let request = tokio::time::timeout(LIMIT, script.request())
        .await
        .expect("the browser script asks in time");
    assert_eq!(request.as_deref(), Some("imported"));
    // The mapping as the page set it: the hostile column renamed, amount typed numeric, and
    // every row but the three rejected ones.
    let rows: Vec<(i64, String, String)> =
        sqlx::query_as("SELECT id, label, amount::text FROM ledger ORDER BY id")
            .fetch_all(&target)
            .await
            .unwrap();
    let expected: Vec<_> = (1..=12i64)
        .filter(|i| i % 4 != 0)
        .map(|i| (i, format!("<b>label {i}</b>"), format!("{i}.5")))
        .collect();
    assert_eq!(rows, expected);
    let amount_type: String = sqlx::query_scalar(
        "SELECT data_type FROM information_schema.columns
         WHERE table_name = 'ledger' AND column_name = 'amount'",
    )
    .fetch_one(&target)
    .await
    .unwrap();
    assert_eq!(amount_type, "numeric");
    script.answer("ok").await;
    script.finish(LIMIT).await;
    target.close().await;
}

/// Documents whose text and metadata carry markup, among ordinary ones.
fn documents() -> Value {
    let hostile = r#"<img src=x onerror="window.__pwned=1">"#;
    json!([
        {"id": "reset", "metadata": {"lang": "en", "note": "<script>window.__pwned=2</script>"},
         "text": format!("To reset your password, open Settings and choose Reset password. {hostile}")},
        {"id": "forgot", "metadata": {"lang": "en"},
         "text": "Forgot your password? The sign-in page sends a reset link by email."},
        {"id": "export", "metadata": {"lang": "en"},
         "text": "Reports can be exported as CSV from the Reports page."},
        {"id": "passwort", "metadata": {"lang": "de"},
         "text": "Passwort vergessen? Auf der Anmeldeseite das Passwort zurücksetzen."},
        {"id": "billing", "metadata": {"lang": "en"},
         "text": "Invoices are sent on the first day of each month."},
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_collections_screen_searches_as_the_api_does() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("ingest", 1)]).await;
    let (status, collection) = app
        .post(
            "/v1/collections",
            &json!({"name": r#"help <img src=x onerror="window.__pwned=3">"#}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{collection}");
    let collection: Uuid = collection["id"].as_str().unwrap().parse().unwrap();
    let (status, job) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "ingest", "payload": {"collection_id": collection, "documents": documents()}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let job = app
        .wait_status(
            job["id"].as_str().unwrap().parse().unwrap(),
            &["succeeded", "failed"],
            Duration::from_secs(180),
        )
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let (_, counts) = app.get(&format!("/v1/collections/{collection}")).await;
    let (documents, chunks) = (
        counts["documents"].to_string(),
        counts["chunks"].to_string(),
    );
    assert_eq!(documents, "5");

    let collection_id = collection.to_string();
    let mut script =
        BrowserScript::start(&app, "search.mjs", &[&collection_id, &documents, &chunks]);
    let mut searched = Vec::new();
    while let Some(request) = tokio::time::timeout(LIMIT, script.request())
        .await
        .expect("the browser script asks in time")
    {
        let asked: Value = serde_json::from_str(
            request
                .strip_prefix("search ")
                .unwrap_or_else(|| panic!("unexpected request: {request}")),
        )
        .unwrap();
        let shown = asked["ids"].clone();
        let body = json!({"query": asked["query"], "mode": asked["mode"], "k": asked["k"], "filter": asked["filter"]});
        let (status, found) = app
            .post(&format!("/v1/collections/{collection}/search"), &body)
            .await;
        assert_eq!(status, StatusCode::OK, "{found}");
        let ids: Vec<Value> = found["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|hit| hit["chunk_id"].clone())
            .collect();
        assert_eq!(shown, Value::Array(ids), "the page's chunks for {body}");
        searched.push(asked["mode"].as_str().unwrap().to_owned());
        script.answer("ok").await;
    }
    script.finish(LIMIT).await;
    assert_eq!(searched, ["keyword", "hybrid", "vector"]);
}

/// The workflow screens (tests/browser/flows.mjs): a two-step pipeline submitted from the page
/// and followed live to success, checked here; a schedule paused from the page, checked in the
/// database; the webhook's delivery of the pipeline's outcome shown, and replayed from the page
/// (the receiver here gets it twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workflow_screens_follow_a_pipeline_pause_a_schedule_and_replay_a_delivery() {
    let mut app = TestApp::spawn().await;
    app.start_worker(4).await;
    let (receiver, url) = Receiver::start(&[]).await;
    let (webhook, _) = crate::webhooks::create(&app, &url, &["pipeline.finished"]).await;
    let (status, schedule) = app
        .post(
            "/v1/schedules",
            &json!({"name": "<img src=x onerror=window.__pwned=4>", "cron": "@daily",
                    "pipeline": {"steps": [{"name": "only", "kind": "canary"}]}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{schedule}");
    let schedule = schedule["id"].as_str().unwrap().to_owned();

    let mut script = BrowserScript::start(&app, "flows.mjs", &[&schedule, &webhook]);
    let mut asked = Vec::new();
    while let Some(request) = tokio::time::timeout(LIMIT, script.request())
        .await
        .expect("the browser script asks in time")
    {
        let (what, id) = request.split_once(' ').unwrap_or((&request, ""));
        match what {
            "pipeline" => {
                let (_, pipeline) = app.get(&format!("/v1/pipelines/{id}")).await;
                assert_eq!(pipeline["status"], "succeeded", "{pipeline}");
                let states: Vec<&str> = pipeline["steps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s["state"].as_str().unwrap())
                    .collect();
                assert_eq!(states, ["succeeded", "succeeded"]);
            }
            "paused" => {
                let paused: bool =
                    sqlx::query_scalar("SELECT paused FROM schedules WHERE id = $1::uuid")
                        .bind(id)
                        .fetch_one(app.pool())
                        .await
                        .unwrap();
                assert!(paused, "the schedule is paused");
            }
            "replayed" => {
                receiver.wait_for(2, Duration::from_secs(30)).await;
            }
            other => panic!("unexpected request from the browser script: {other}"),
        }
        asked.push(what.to_owned());
        script.answer("ok").await;
    }
    script.finish(LIMIT).await;
    assert_eq!(asked, ["pipeline", "paused", "replayed"]);
}

/// The queues screen (tests/browser/queues.mjs): each queue's last hour as charts fed by the
/// workers' per-minute rollup. Canary jobs that succeeded and failed here, and patch jobs left
/// waiting (nothing serves that queue), must show with their numbers beside the bars.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queues_screen_charts_each_queues_last_hour() {
    let mut app = TestApp::spawn().await;
    app.start_worker(2).await;
    let mut ended = Vec::new();
    for _ in 0..4 {
        ended.push(app.submit_canary(json!({"steps": 1})).await);
    }
    for _ in 0..2 {
        let (status, job) = app
            .post(
                "/v1/jobs",
                &json!({"kind": "canary", "payload": {"fail_first": 1}, "max_attempts": 1}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        ended.push(job["id"].as_str().unwrap().parse().unwrap());
    }
    for id in ended {
        app.wait_status(id, &["succeeded", "failed"], Duration::from_secs(60))
            .await;
    }
    sqlx::query(
        "INSERT INTO jobs (id, tenant_id, kind, status, payload)
         SELECT uuidv7(), $1, 'patch', 'queued', '{}' FROM generate_series(1, 3)",
    )
    .bind(app.tenant)
    .execute(app.pool())
    .await
    .unwrap();

    let mut script = BrowserScript::start(&app, "queues.mjs", &["4", "2", "3"]);
    assert_eq!(
        tokio::time::timeout(LIMIT, script.request()).await.unwrap(),
        None
    );
    script.finish(LIMIT).await;
}

/// The jobs page with 10,000 jobs (tests/browser/jobs.mjs): a page of 100 rows at a time through
/// the API's cursor, never another tenant's; the submit form used from the keyboard alone with
/// its focus visible; the dark scheme.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jobs_page_pages_through_ten_thousand_jobs_and_works_from_the_keyboard() {
    let app = TestApp::spawn().await;
    let (other, _) = app.tenant_key("other").await;
    // uuidv7() is monotonic within a session: ids in insertion order. The oldest job failed,
    // past what one filtered request reads (10,000 jobs).
    let failed: Uuid = sqlx::query_scalar(
        "INSERT INTO jobs (id, tenant_id, kind, status, payload, progress, attempt, started_at, finished_at)
         VALUES (uuidv7(), $1, 'canary', 'failed', '{}', 1, 1, now(), now()) RETURNING id",
    )
    .bind(app.tenant)
    .fetch_one(app.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO jobs (id, tenant_id, kind, status, payload, progress, attempt, started_at, finished_at)
         SELECT uuidv7(), $1, 'canary', 'succeeded', '{}', 1, 1, now(), now()
         FROM generate_series(1, 10000)",
    )
    .bind(app.tenant)
    .execute(app.pool())
    .await
    .unwrap();
    let foreign: Uuid = sqlx::query_scalar(
        "INSERT INTO jobs (id, tenant_id, kind, status, payload) VALUES (uuidv7(), $1, 'canary', 'queued', '{}')
         RETURNING id",
    )
    .bind(other)
    .fetch_one(app.pool())
    .await
    .unwrap();
    let newest: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM jobs WHERE tenant_id = $1 ORDER BY id DESC LIMIT 300")
            .bind(app.tenant)
            .fetch_all(app.pool())
            .await
            .unwrap();
    let ids = |range: std::ops::Range<usize>| {
        newest[range]
            .iter()
            .map(Uuid::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let (first, second, third) = (ids(0..100), ids(100..200), ids(200..300));
    let (foreign, failed) = (foreign.to_string(), failed.to_string());
    let mut script = BrowserScript::start(
        &app,
        "jobs.mjs",
        &[&first, &second, &third, &foreign, &failed],
    );
    assert_eq!(
        tokio::time::timeout(LIMIT, script.request()).await.unwrap(),
        None
    );
    script.finish(LIMIT).await;
}

/// The API reference (tests/browser/docs.mjs): Swagger UI renders under a content security
/// policy that allows its inline start-up script by hash alone; the page may not be framed.
/// (It was served with no policy at all.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_reference_renders_under_a_strict_content_security_policy() {
    let app = TestApp::spawn().await;
    let response = app.client.get(app.url("/docs")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-frame-options"], "DENY");
    let policy = response.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
    let mut script = BrowserScript::start(&app, "docs.mjs", &[]);
    assert_eq!(
        tokio::time::timeout(LIMIT, script.request()).await.unwrap(),
        None
    );
    script.finish(LIMIT).await;
}
