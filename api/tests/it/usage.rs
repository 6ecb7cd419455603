//! Usage accounting: each job's result carries what it used, `GET /v1/usage` sums the same
//! figures by kind, day and key, `/metrics` has per-tenant totals, and the quotas on what jobs
//! produce (rows imported a day, chunks stored) refuse the next submission.

use crate::harness::TestApp;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(120);

async fn run(app: &TestApp, key: &str, kind: &str, payload: Value) -> Value {
    let (status, job) = app
        .post_as(key, "/v1/jobs", &json!({"kind": kind, "payload": payload}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    let job = app.wait_status(id, &["succeeded", "failed"], WAIT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    job
}

fn more_text(collection: &str) -> Value {
    json!({"collection_id": collection, "documents": [{"id": "c", "text": "more"}]})
}

const MEASURES: [&str; 8] = [
    "wall_seconds",
    "cpu_seconds",
    "rows_read",
    "rows_written",
    "bytes_read",
    "chunks_embedded",
    "tokens_embedded",
    "synthetic_rows",
];

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(1.0)
}

#[tokio::test]
async fn usage_sums_equal_the_jobs_own_figures_and_quotas_on_output_refuse() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("canary", 2), ("import", 1), ("ingest", 1)])
        .await;
    let (_, second_key) = app.tenant_key("acme").await;
    let admin = app.key.clone();

    let csv = "id,name\n".to_owned() + &(0..250).map(|i| format!("{i},n{i}\n")).collect::<String>();
    let dataset = app.upload_dataset("people.csv", csv.as_bytes()).await;
    let import = json!({"dataset_id": dataset, "target": {"table": "people"}});
    let collection = {
        let (status, c) = app.post("/v1/collections", &json!({"name": "notes"})).await;
        assert_eq!(status, StatusCode::CREATED, "{c}");
        c["id"].as_str().unwrap().to_owned()
    };
    let ingest = json!({"collection_id": collection, "documents": [
        {"id": "a", "text": "The rover landed in Jezero crater."},
        {"id": "b", "text": "Synthetic data keeps the statistics and drops the people."}]});

    let jobs = vec![
        run(&app, &admin, "canary", json!({"steps": 3, "step_ms": 20})).await,
        run(&app, &second_key, "canary", json!({"steps": 2})).await,
        run(&app, &admin, "import", import.clone()).await,
        run(&app, &second_key, "ingest", ingest).await,
    ];
    for job in &jobs {
        let usage = &job["result"]["usage"];
        assert!(usage["wall_seconds"].as_f64().unwrap() > 0.0, "{job}");
        assert!(
            usage["cpu_seconds"].as_f64().unwrap() > 0.0,
            "never empty: {job}"
        );
    }
    let import_usage = &jobs[2]["result"]["usage"];
    assert_eq!(import_usage["rows_written"], 250, "{import_usage}");
    assert_eq!(import_usage["rows_read"], 250);
    assert_eq!(import_usage["bytes_read"], csv.len());
    let ingest_usage = &jobs[3]["result"]["usage"];
    assert_eq!(ingest_usage["chunks_embedded"], 2, "{ingest_usage}");
    assert!(
        ingest_usage["tokens_embedded"].as_i64().unwrap() >= 10,
        "{ingest_usage}"
    );

    // The sums, by kind, equal the jobs' own figures.
    let (status, report) = app.get("/v1/usage?group_by=kind").await;
    assert_eq!(status, StatusCode::OK, "{report}");
    let groups = report["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 3, "{report}");
    for group in groups {
        let kind = group["group"].as_str().unwrap();
        let own: Vec<&Value> = jobs.iter().filter(|j| j["kind"] == kind).collect();
        assert_eq!(group["attempts"], own.len(), "{kind}");
        for measure in MEASURES {
            let sum: f64 = own
                .iter()
                .map(|j| j["result"]["usage"][measure].as_f64().unwrap())
                .sum();
            assert!(
                close(group[measure].as_f64().unwrap(), sum),
                "{kind} {measure}: {} vs {sum}",
                group[measure]
            );
        }
    }
    // By key: each key its own jobs; by day: one day; the total: all four.
    let (_, by_key) = app.get("/v1/usage?group_by=key").await;
    let attempts: Vec<i64> = by_key["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["attempts"].as_i64().unwrap())
        .collect();
    assert_eq!(attempts.iter().sum::<i64>(), 4);
    assert_eq!(attempts.len(), 2, "{by_key}");
    let (_, by_day) = app.get("/v1/usage?group_by=day").await;
    assert_eq!(by_day["groups"].as_array().unwrap().len(), 1, "{by_day}");
    let (_, total) = app.get("/v1/usage").await;
    assert_eq!(total["groups"][0]["attempts"], 4, "{total}");
    assert_eq!(total["groups"][0]["rows_written"], 250);
    // Bad parameters name their field; another tenant sees none of it.
    // A period past 366 days would read the tenant's whole history each time.
    let bad = [
        ("group_by=tenant", "group_by"),
        ("from=yesterday", "from"),
        ("from=2000-01-01T00:00:00Z", "from"),
        // A misspelt parameter is named, not ignored (the report of another period).
        ("group=kind", "group"),
        ("form=2026-01-01T00:00:00Z", "form"),
    ];
    for (query, field) in bad {
        let (status, problem) = app.get(&format!("/v1/usage?{query}")).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
        assert_eq!(problem["errors"][0]["field"], field);
    }
    let stranger = app.key_for("umbrella").await;
    let response = app
        .client
        .get(app.url("/v1/usage"))
        .bearer_auth(&stranger)
        .send()
        .await
        .unwrap();
    let theirs: Value = response.json().await.unwrap();
    assert_eq!(theirs["groups"][0]["attempts"], 0, "{theirs}");

    // /metrics: the tenant's totals.
    let metrics = app.metrics().await;
    let cpu_line = metrics
        .lines()
        .find(|l| l.starts_with("conveyor_tenant_cpu_seconds_total{tenant=\"acme\","))
        .unwrap_or_else(|| panic!("no per-tenant CPU series:\n{metrics}"));
    let cpu: f64 = cpu_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(close(
        cpu,
        total["groups"][0]["cpu_seconds"].as_f64().unwrap()
    ));
    assert!(
        metrics.lines().any(|l| l
            .starts_with("conveyor_tenant_rows_written_total{tenant=\"acme\",tenant_id=")
            && l.ends_with("} 250.0")),
        "{metrics}"
    );

    // An import and an ingest cancelled before they ran, for the retries below.
    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let mut cancelled = Vec::new();
    let append = json!({"dataset_id": dataset, "target": {"table": "people"}, "mode": "append"});
    for (kind, payload) in [("import", append), ("ingest", more_text(&collection))] {
        let job = json!({"kind": kind, "payload": payload, "run_at": later});
        let (status, job) = app.post("/v1/jobs", &job).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        let id = job["id"].as_str().unwrap().to_owned();
        let (status, _) = app.post(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
        assert_eq!(status, StatusCode::OK);
        cancelled.push(id);
    }

    // Quotas on what jobs produce: used up, the next submission is refused, nothing written.
    let (ok, _, stderr) = app
        .conveyor_api(&[
            "tenants",
            "set-limits",
            "acme",
            "--max-rows-per-day",
            "250",
            "--max-chunks",
            "2",
        ])
        .await;
    assert!(ok, "{stderr}");
    tokio::time::sleep(Duration::from_secs(6)).await; // the API's limits cache
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(app.pool())
        .await
        .unwrap();
    let (status, problem) = app
        .post("/v1/jobs", &json!({"kind": "import", "payload": import}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "quota.max_rows_per_day");
    let (status, problem) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "ingest", "payload": more_text(&collection)}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "quota.max_chunks");
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(before, after);
    // Retries add what submissions would: refused alike, unless they name another kind.
    for body in [
        json!({"kind": "import"}),
        json!({"kind": "ingest"}),
        json!({}),
    ] {
        let (status, problem) = app.post("/v1/jobs/retry", &body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}: {problem}");
    }
    let (status, retried) = app.post("/v1/jobs/retry", &json!({"kind": "canary"})).await;
    assert_eq!(status, StatusCode::OK, "{retried}");
    // Only jobs the retry matches count: without them, a retry naming no kind goes (it was
    // refused for the imports and ingests it might have retried).
    for id in &cancelled {
        assert_eq!(
            app.delete(&format!("/v1/jobs/{id}")).await,
            StatusCode::NO_CONTENT
        );
    }
    let (status, retried) = app.post("/v1/jobs/retry", &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{retried}");
    // Other kinds still go.
    run(&app, &admin, "canary", json!({"steps": 1})).await;
    let (_, tenant) = app.get("/v1/tenant").await;
    assert_eq!(tenant["usage"]["rows_imported_today"], 250, "{tenant}");
    assert_eq!(tenant["usage"]["chunks"], 2);
}

/// Tenants choose their names: one named `other` keeps its own usage series, apart from the
/// sum of the tenants past the first 100 (it was merged into that sum).
#[tokio::test]
async fn a_tenant_named_other_keeps_its_own_usage_series() {
    let app = TestApp::spawn().await;
    let other: Uuid = sqlx::query_scalar(
        "INSERT INTO tenants (id, name) VALUES (gen_random_uuid(), 'other') RETURNING id",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    // The heaviest user, then 100 light ones: the last of those is summed with the rest.
    sqlx::query(
        "WITH light AS (
             INSERT INTO tenants (id, name)
             SELECT gen_random_uuid(), 'light ' || i FROM generate_series(1, 100) i
             RETURNING id
         )
         INSERT INTO usage_sums (tenant_id, kind, attempts, wall_seconds, cpu_seconds)
         SELECT $1, 'canary', 7, 100, 100
         UNION ALL SELECT id, 'canary', 1, 1, 1 FROM light",
    )
    .bind(other)
    .execute(app.pool())
    .await
    .unwrap();
    let metrics = app.metrics().await;
    let mut attempts: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("conveyor_tenant_attempts_total{tenant=\"other\""))
        .collect();
    attempts.sort_by_key(|l| l.contains("tenant_id=\"other\""));
    assert_eq!(
        attempts,
        [
            format!("conveyor_tenant_attempts_total{{tenant=\"other\",tenant_id=\"{other}\"}} 7.0"),
            "conveyor_tenant_attempts_total{tenant=\"other\",tenant_id=\"other\"} 1.0".to_owned(),
        ],
        "{metrics}"
    );
}

/// The quotas on output count what ended attempts used, and a submission is checked against
/// them once: a batch of imports submitted together all passed, and all ran (a thousand of them
/// past a day's quota a thousand times over). Each attempt checks again as it starts.
#[tokio::test]
async fn imports_queued_together_stop_at_the_daily_row_quota() {
    let mut app = TestApp::spawn().await;
    let (ok, _, stderr) = app
        .conveyor_api(&["tenants", "set-limits", "acme", "--max-rows-per-day", "250"])
        .await;
    assert!(ok, "{stderr}");
    let csv = "id\n".to_owned() + &(0..200).map(|i| format!("{i}\n")).collect::<String>();
    let dataset = app.upload_dataset("ids.csv", csv.as_bytes()).await;
    let jobs: Vec<Value> = (0..3)
        .map(|i| {
            json!({"kind": "import",
                   "payload": {"dataset_id": dataset, "target": {"table": format!("ids{i}")}}})
        })
        .collect();
    let (status, body) = app.post("/v1/jobs/batch", &json!({ "jobs": jobs })).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let ids: Vec<Uuid> = body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().parse().unwrap())
        .collect();
    app.start_worker_for(&[("import", 1)]).await;
    let mut ended = Vec::new();
    for id in ids {
        ended.push(app.wait_status(id, &["succeeded", "failed"], WAIT).await);
    }
    let failed: Vec<&Value> = ended.iter().filter(|j| j["status"] == "failed").collect();
    assert_eq!(failed.len(), 1, "{ended:?}");
    let error = failed[0]["error"].as_str().unwrap();
    assert!(error.contains("max_rows_per_day"), "{error}");
    let (_, tenant) = app.get("/v1/tenant").await;
    assert_eq!(tenant["usage"]["rows_imported_today"], 400, "{tenant}");
}
