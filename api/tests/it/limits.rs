//! A tenant's limits, set with `conveyor-api tenants set-limits`: the submission rate shared
//! by every API process, and quotas refused with nothing written.

use crate::harness::TestApp;
use reqwest::{header::HeaderMap, StatusCode};
use serde_json::{json, Value};
use std::time::Instant;

async fn set_limits(app: &TestApp, args: &[&str]) {
    let mut all = vec!["tenants", "set-limits", "acme"];
    all.extend_from_slice(args);
    let (ok, stdout, stderr) = app.conveyor_api(&all).await;
    assert!(ok, "{stderr}");
    serde_json::from_str::<Value>(&stdout).expect("the limits, as JSON");
}

/// Submits a pipeline of one canary step, `a`; returns its id.
async fn one_step_pipeline(app: &TestApp) -> String {
    let (status, pipeline) = app
        .post(
            "/v1/pipelines",
            &json!({"steps": [{"name": "a", "kind": "canary", "payload": {"steps": 1}}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{pipeline}");
    pipeline["id"].as_str().unwrap().to_owned()
}

async fn jobs_written(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(app.pool())
        .await
        .unwrap()
}

async fn post(
    app: &TestApp,
    base: &str,
    path: &str,
    body: &Value,
) -> (StatusCode, HeaderMap, Value) {
    let response = app
        .client
        .post(format!("{base}{path}"))
        .bearer_auth(&app.key)
        .json(body)
        .send()
        .await
        .unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    (
        status,
        headers,
        response.json().await.unwrap_or(Value::Null),
    )
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

/// Two API processes draw on one bucket per tenant: past it, each answers 429 with
/// `Retry-After` and the RateLimit headers, and writes nothing; a batch counts each job.
#[tokio::test]
async fn the_submission_rate_is_shared_by_two_api_processes() {
    let app = TestApp::spawn().await;
    set_limits(&app, &["--rate", "5/s", "--burst", "5"]).await;
    let (_other, other_base) = app.spawn_api_process().await;
    let canary = json!({"kind": "canary", "payload": {"steps": 1}});

    let started = Instant::now();
    let mut accepted = 0;
    let mut refused_by = [0, 0];
    for i in 0..12 {
        let base = if i % 2 == 0 {
            app.url("")
        } else {
            other_base.clone()
        };
        let (status, headers, body) = post(&app, &base, "/v1/jobs", &canary).await;
        match status {
            StatusCode::ACCEPTED => {
                accepted += 1;
                assert_eq!(header(&headers, "ratelimit-policy"), "\"tenant\";q=5;w=1");
                assert!(header(&headers, "ratelimit").starts_with("\"tenant\";r="));
            }
            StatusCode::TOO_MANY_REQUESTS => {
                refused_by[i % 2] += 1;
                assert_eq!(header(&headers, "content-type"), "application/problem+json");
                let retry: u64 = header(&headers, "retry-after").parse().unwrap();
                assert!((1..=2).contains(&retry), "Retry-After {retry}");
                assert_eq!(header(&headers, "ratelimit-policy"), "\"tenant\";q=5;w=1");
                assert!(header(&headers, "ratelimit").starts_with("\"tenant\";r=0;t="));
                assert!(
                    body["detail"].as_str().unwrap().contains("rate limit"),
                    "{body}"
                );
            }
            other => panic!("{other}: {body}"),
        }
    }
    // The burst, plus what refilled while the requests ran.
    let refilled = (started.elapsed().as_secs_f64() * 5.0).ceil() as i64;
    assert!(
        accepted >= 5 && accepted <= 5 + refilled,
        "{accepted} accepted"
    );
    assert!(
        refused_by[0] > 0 && refused_by[1] > 0,
        "both processes refuse: {refused_by:?}"
    );
    assert_eq!(
        jobs_written(&app).await,
        accepted,
        "a refusal writes nothing"
    );

    // A batch draws a token per job: bigger than the burst, it can never pass.
    let batch = json!({"jobs": vec![canary.clone(); 6]});
    let (status, _, body) = post(&app, &other_base, "/v1/jobs/batch", &batch).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("burst of 5"),
        "{body}"
    );
    assert_eq!(jobs_written(&app).await, accepted);

    // Lifted: everything passes again, without RateLimit headers.
    set_limits(&app, &["--rate", "none"]).await;
    tokio::time::sleep(std::time::Duration::from_secs(6)).await; // the limits cache
    let (status, headers, body) = post(&app, &other_base, "/v1/jobs/batch", &batch).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert!(headers.get("ratelimit").is_none());
}

/// A retry queues a job again, as a submission does: it takes a token from the same bucket
/// (a cancel-and-retry loop went past the rate). A retry that finds the job still live takes
/// one too: the job's state is read before the retry's transaction, and one that failed in
/// between was retried without a token.
#[tokio::test]
async fn a_retry_takes_a_rate_token_as_a_submission_does() {
    let app = TestApp::spawn().await;
    set_limits(&app, &["--rate", "1/h", "--burst", "3"]).await;
    let (status, job) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "canary", "payload": {"steps": 1}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let id = job["id"].as_str().unwrap();
    let (status, body) = app.post(&format!("/v1/jobs/{id}/retry"), &json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "still queued: {body}");
    let (status, _) = app.post(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = app.post(&format!("/v1/jobs/{id}/retry"), &json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "the third token: {body}");
    let (status, _) = app.post(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = app.post(&format!("/v1/jobs/{id}/retry"), &json!({})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(app.job(id.parse().unwrap()).await["status"], "cancelled");
}

/// Retrying a pipeline's step queues its job again: past `max_queued` it is refused as a
/// submission is, and the step stays as it was.
#[tokio::test]
async fn a_pipeline_step_retry_is_held_to_the_quotas() {
    let app = TestApp::spawn().await;
    set_limits(&app, &["--max-queued", "1"]).await;
    let id = one_step_pipeline(&app).await;
    let (status, body) = app
        .post(&format!("/v1/pipelines/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let canary = json!({"kind": "canary", "payload": {"steps": 1}});
    let (status, body) = app.post("/v1/jobs", &canary).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");

    let (status, body) = app
        .post(&format!("/v1/pipelines/{id}/steps/a/retry"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["errors"][0]["field"], "quota.max_queued", "{body}");
    let (_, pipeline) = app.get(&format!("/v1/pipelines/{id}")).await;
    assert_eq!(pipeline["steps"][0]["state"], "cancelled", "{pipeline}");
    let (_, tenant) = app.get("/v1/tenant").await;
    assert_eq!(tenant["usage"]["live_jobs"], 1, "{tenant}");
}

/// A step whose job was deleted retries as a failed one does, and takes a rate token as any
/// retry does (it took none: cancel, delete the job, retry, again, queued jobs without end).
#[tokio::test]
async fn a_step_retry_after_its_job_was_deleted_takes_a_rate_token() {
    let app = TestApp::spawn().await;
    set_limits(&app, &["--rate", "1/h", "--burst", "2"]).await;
    let id = one_step_pipeline(&app).await;
    let mut answers = Vec::new();
    for _ in 0..2 {
        let (status, body) = app
            .post(&format!("/v1/pipelines/{id}/cancel"), &json!({}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (_, pipeline) = app.get(&format!("/v1/pipelines/{id}")).await;
        let job = pipeline["steps"][0]["job_id"].as_str().unwrap().to_owned();
        assert_eq!(
            app.delete(&format!("/v1/jobs/{job}")).await,
            StatusCode::NO_CONTENT
        );
        let (status, _) = app
            .post(&format!("/v1/pipelines/{id}/steps/a/retry"), &json!({}))
            .await;
        answers.push(status);
    }
    // The submission took the first token, the first retry the second.
    assert_eq!(
        answers,
        [StatusCode::ACCEPTED, StatusCode::TOO_MANY_REQUESTS]
    );
    let (_, pipeline) = app.get(&format!("/v1/pipelines/{id}")).await;
    assert_eq!(pipeline["steps"][0]["state"], "deleted", "{pipeline}");
}

/// A synthesis's output is a dataset of the tenant: it counts against `max_dataset_bytes` as
/// an upload does (outputs were registered past the quota, a gigabyte a sample), and past it a
/// synthesis is refused at submit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthetic_outputs_are_held_to_the_dataset_bytes_quota() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("synthesis", 1)]).await;
    let mut csv = "x,y\n".to_owned();
    for i in 0..60 {
        csv.push_str(&format!("{}.5,{}\n", i, i % 7));
    }
    let dataset = app.upload_dataset("small.csv", csv.as_bytes()).await;
    let used = csv.len();
    set_limits(&app, &["--max-dataset-bytes", &(used + 2000).to_string()]).await;
    let payload = json!({"dataset_id": dataset, "rows": 20000, "output_format": "csv"});
    let (status, job) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "synthesis", "payload": payload}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let id = job["id"].as_str().unwrap().parse().unwrap();
    let job = app
        .wait_status(
            id,
            &["succeeded", "failed"],
            std::time::Duration::from_secs(120),
        )
        .await;
    assert_eq!(job["status"], "failed", "{job}");
    assert!(
        job["error"].as_str().unwrap().contains("max_dataset_bytes"),
        "{job}"
    );
    let (_, list) = app.get("/v1/datasets").await;
    assert_eq!(list["datasets"].as_array().unwrap().len(), 1, "{list}");
    // Nor is the output it drew left on the worker's disk (it was, every such attempt).
    let tmp = app.settings.data_dir.join("tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .map(|dir| dir.flatten().map(|entry| entry.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "scratch files left: {left:?}");

    // At the quota, a synthesis is refused at submit (once the API's copy of the limits, at
    // most 5 s old, has the new one).
    set_limits(&app, &["--max-dataset-bytes", &used.to_string()]).await;
    tokio::time::sleep(std::time::Duration::from_millis(5500)).await;
    let (status, body) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "synthesis", "payload": payload}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(
        body["errors"][0]["field"], "quota.max_dataset_bytes",
        "{body}"
    );
}

/// Batches racing each other each passed the `max_queued` check made before their jobs were
/// written, and all were written: 6 batches of 10 under a quota of 10. Only one fits.
#[tokio::test]
async fn racing_batches_stay_within_max_queued() {
    let app = TestApp::spawn().await;
    set_limits(&app, &["--max-queued", "10", "--max-running", "canary=0"]).await;
    let batch = json!({"jobs": vec![json!({"kind": "canary", "payload": {"steps": 1}}); 10]});
    let racing = (0..6).map(|_| {
        let request = app
            .client
            .post(app.url("/v1/jobs/batch"))
            .bearer_auth(&app.key)
            .json(&batch);
        async move { request.send().await.unwrap().status() }
    });
    let statuses = futures::future::join_all(racing).await;
    let accepted = statuses
        .iter()
        .filter(|s| **s == StatusCode::ACCEPTED)
        .count();
    assert_eq!(accepted, 1, "{statuses:?}");
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(written, 10);
}

/// A pipeline's waiting steps will be jobs: `max_queued` counts them, so fan-outs submitted one
/// after another cannot each pass (live jobs reached many times the quota once their roots
/// ended).
#[tokio::test]
async fn a_pipelines_waiting_steps_count_against_max_queued() {
    let app = TestApp::spawn().await;
    set_limits(&app, &["--max-queued", "60"]).await;
    let mut steps = vec![json!({"name": "root", "kind": "canary", "payload": {"steps": 1}})];
    for i in 0..49 {
        steps.push(json!({"name": format!("leaf{i}"), "kind": "canary",
                          "payload": {"steps": 1}, "needs": ["root"]}));
    }
    let fan_out = json!({ "steps": steps });
    let (status, body) = app.post("/v1/pipelines", &fan_out).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = app.post("/v1/pipelines", &fan_out).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["errors"][0]["field"], "quota.max_queued", "{body}");
    let (_, tenant) = app.get("/v1/tenant").await;
    assert_eq!(tenant["usage"]["live_jobs"], 1, "{tenant}");
    assert_eq!(tenant["usage"]["waiting_steps"], 49, "{tenant}");
}

/// A step retry that finds the step still live takes a rate token too, as a job retry does:
/// the step's state is read before the retry's transaction, and one that failed in between
/// was retried without a token.
#[tokio::test]
async fn a_step_retry_takes_a_rate_token_while_its_step_is_live() {
    let app = TestApp::spawn().await;
    set_limits(&app, &["--rate", "1/h", "--burst", "3"]).await;
    let id = one_step_pipeline(&app).await;
    let retry = format!("/v1/pipelines/{id}/steps/a/retry");
    let (status, body) = app.post(&retry, &json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "still queued: {body}");
    let mut answers = Vec::new();
    for _ in 0..2 {
        let (status, body) = app
            .post(&format!("/v1/pipelines/{id}/cancel"), &json!({}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        answers.push(app.post(&retry, &json!({})).await.0);
    }
    // The submission, the refused retry and the first retry took the three tokens.
    assert_eq!(
        answers,
        [StatusCode::ACCEPTED, StatusCode::TOO_MANY_REQUESTS]
    );
}

/// A bulk retry queues jobs again as a batch submits them: a token each (it took none, so
/// cancel-all and retry-all queued any number of jobs past the rate). Refused, it changes
/// nothing; a `limit` the bucket covers goes.
#[tokio::test]
async fn a_bulk_retry_takes_a_rate_token_per_job() {
    let app = TestApp::spawn().await;
    set_limits(&app, &["--rate", "1/h", "--burst", "4"]).await;
    let jobs: Vec<Value> = (0..3)
        .map(|_| json!({"kind": "canary", "payload": {"steps": 1}}))
        .collect();
    let (status, body) = app.post("/v1/jobs/batch", &json!({ "jobs": jobs })).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (status, body) = app.post("/v1/jobs/cancel", &json!({})).await;
    assert_eq!((status, body["count"].as_i64()), (StatusCode::OK, Some(3)));
    let (status, body) = app.post("/v1/jobs/retry", &json!({})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let (_, cancelled) = app.get("/v1/jobs?status=cancelled").await;
    assert_eq!(
        cancelled["jobs"].as_array().unwrap().len(),
        3,
        "{cancelled}"
    );
    let (status, body) = app.post("/v1/jobs/retry", &json!({"limit": 1})).await;
    assert_eq!(
        (status, body["count"].as_i64(), body["more"].as_bool()),
        (StatusCode::OK, Some(1), Some(true)),
        "{body}"
    );
    let (status, body) = app.post("/v1/jobs/retry", &json!({"limit": 0})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["errors"][0]["field"], "limit", "{body}");
}

/// A retry resumes its step's pipeline, setting the dependents its cancel cancelled waiting
/// again: they count against `max_queued` as at the submit. A retry (single, of the step, or
/// in bulk) checked room for its own job alone, so cancel, fill the room, retry brought back a
/// pipeline of fifty steps past the quota.
#[tokio::test]
async fn a_retry_counts_the_steps_its_pipeline_sets_waiting_again() {
    let app = TestApp::spawn().await;
    set_limits(&app, &["--max-queued", "5"]).await;
    let step = |name: &str, needs: &[&str]| json!({"name": name, "kind": "canary", "payload": {"steps": 1}, "needs": needs});
    let mut steps = vec![step("root", &[])];
    steps.extend(["a", "b", "c", "d"].map(|name| step(name, &["root"])));
    let (status, pipeline) = app.post("/v1/pipelines", &json!({ "steps": steps })).await;
    assert_eq!(status, StatusCode::CREATED, "{pipeline}");
    let id = pipeline["id"].as_str().unwrap().to_owned();
    let root = pipeline["steps"][0]["job_id"].as_str().unwrap().to_owned();
    let (status, body) = app
        .post(&format!("/v1/pipelines/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The room the cancel freed, taken by four jobs: one more fits, five do not.
    for _ in 0..4 {
        let (status, body) = app
            .post(
                "/v1/jobs",
                &json!({"kind": "canary", "payload": {"steps": 1}}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    for (path, body) in [
        (format!("/v1/jobs/{root}/retry"), json!({})),
        (format!("/v1/pipelines/{id}/steps/root/retry"), json!({})),
        ("/v1/jobs/retry".to_owned(), json!({})),
    ] {
        let (status, problem) = app.post(&path, &body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {problem}");
        assert_eq!(
            problem["errors"][0]["field"], "quota.max_queued",
            "{problem}"
        );
    }
    let (_, tenant) = app.get("/v1/tenant").await;
    assert_eq!(
        (
            &tenant["usage"]["live_jobs"],
            &tenant["usage"]["waiting_steps"]
        ),
        (&json!(4), &json!(0)),
        "{tenant}"
    );
}

/// A bulk retry of more jobs than the rate's burst takes a burst's worth and says `more`: a
/// request for more tokens than the bucket holds can never pass, and was refused for ever.
#[tokio::test]
async fn a_bulk_retry_past_the_burst_retries_a_bursts_worth() {
    let app = TestApp::spawn().await;
    set_limits(&app, &["--rate", "1/h", "--burst", "2"]).await;
    sqlx::query(
        "INSERT INTO jobs (id, tenant_id, kind, status, payload, finished_at)
         SELECT conveyor_uuidv7(), $1, 'canary', 'cancelled', '{\"steps\": 1}', now()
         FROM generate_series(1, 3)",
    )
    .bind(app.tenant)
    .execute(app.pool())
    .await
    .unwrap();
    let (status, body) = app.post("/v1/jobs/retry", &json!({})).await;
    assert_eq!(
        (status, body["count"].as_i64(), body["more"].as_bool()),
        (StatusCode::OK, Some(2), Some(true)),
        "{body}"
    );
}

/// Past `max_queued` a submission (or a batch) is refused whole, naming the quota; past
/// `max_dataset_bytes` an upload is a 413 and leaves no dataset; `GET /v1/tenant` shows both.
#[tokio::test]
async fn quotas_refuse_with_nothing_written() {
    let app = TestApp::spawn().await;
    set_limits(
        &app,
        &[
            "--max-queued",
            "3",
            "--max-dataset-bytes",
            "1000",
            "--max-running",
            "canary=0",
        ],
    )
    .await;
    let canary = json!({"kind": "canary", "payload": {"steps": 1}});
    for _ in 0..2 {
        let (status, body) = app.post("/v1/jobs", &canary).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    let (status, body) = app
        .post("/v1/jobs/batch", &json!({"jobs": [canary, canary]}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["errors"][0]["field"], "quota.max_queued", "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("3 jobs waiting or running allowed; 2 in use"),
        "{body}"
    );
    assert_eq!(jobs_written(&app).await, 2, "the batch wrote nothing");
    let (status, _) = app.post("/v1/jobs", &canary).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, body) = app.post("/v1/jobs", &canary).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(jobs_written(&app).await, 3);

    // A retry queues jobs again, as a submission does: cancelled jobs come back only as far
    // as the quota leaves room.
    let (status, body) = app.post("/v1/jobs/cancel", &json!({})).await;
    assert_eq!(
        (status, body["count"].as_i64()),
        (StatusCode::OK, Some(3)),
        "{body}"
    );
    let (_, first) = app.post("/v1/jobs", &canary).await;
    for _ in 0..2 {
        let (status, body) = app.post("/v1/jobs", &canary).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    let (status, body) = app.post("/v1/jobs/retry", &json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["errors"][0]["field"], "quota.max_queued", "{body}");
    let (_, cancelled) = app.get("/v1/jobs?status=cancelled").await;
    let cancelled = cancelled["jobs"][0]["id"].as_str().unwrap().to_owned();
    let (status, body) = app
        .post(&format!("/v1/jobs/{cancelled}/retry"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let first = first["id"].as_str().unwrap();
    let (status, _) = app
        .post(&format!("/v1/jobs/{first}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = app.post("/v1/jobs/retry", &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["count"].as_i64(), body["more"].as_bool()),
        (Some(1), Some(true)),
        "{body}"
    );
    let (_, tenant) = app.get("/v1/tenant").await;
    assert_eq!(tenant["usage"]["live_jobs"], 3, "{tenant}");

    let row = "id,name\n".to_owned() + &"1,abcdefghij\n".repeat(50);
    assert!(row.len() > 500 && row.len() < 1000);
    // Uploads racing each other: each passed the room check before any was recorded, and
    // all were kept. Only one fits.
    let racing = (0..6).map(|i| {
        let request = app
            .client
            .post(app.url("/v1/datasets"))
            .query(&[("name", format!("first{i}.csv"))])
            .bearer_auth(&app.key)
            .body(row.clone());
        async move { request.send().await.unwrap().status() }
    });
    let statuses = futures::future::join_all(racing).await;
    let created = statuses
        .iter()
        .filter(|s| **s == StatusCode::CREATED)
        .count();
    assert_eq!(created, 1, "{statuses:?}");
    let response = app
        .client
        .post(app.url("/v1/datasets"))
        .query(&[("name", "second.csv")])
        .bearer_auth(&app.key)
        .body(row.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["errors"][0]["field"], "quota.max_dataset_bytes",
        "{body}"
    );
    let datasets: i64 = sqlx::query_scalar("SELECT count(*) FROM datasets")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(datasets, 1, "the refused upload left no dataset");

    let (status, tenant) = app.get("/v1/tenant").await;
    assert_eq!(status, StatusCode::OK, "{tenant}");
    assert_eq!(tenant["name"], "acme");
    assert_eq!(tenant["limits"]["max_queued"], 3);
    assert_eq!(tenant["limits"]["max_dataset_bytes"], 1000);
    assert_eq!(tenant["limits"]["max_running"]["canary"], 0);
    assert_eq!(tenant["usage"]["live_jobs"], 3);
    assert_eq!(tenant["usage"]["dataset_bytes"], row.len());
}

/// A key with a rate of its own is held to it (and named in the headers); another key of the
/// same tenant is not.
#[tokio::test]
async fn a_keys_own_rate_limits_that_key_only() {
    let app = TestApp::spawn().await;
    let (_, slow) = app.tenant_key("acme").await;
    let slow_id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM api_keys WHERE key_hash = $1")
        .bind(conveyor_api::auth::hash_key(&slow))
        .fetch_one(app.pool())
        .await
        .unwrap();
    let (ok, _, stderr) = app
        .conveyor_api(&[
            "keys",
            "set-rate",
            &slow_id.to_string(),
            "--rate",
            "2/s",
            "--burst",
            "2",
        ])
        .await;
    assert!(ok, "{stderr}");
    let statuses = submissions_as(&app, &slow, 4, "\"key\";q=2;w=1").await;
    assert_eq!(&statuses[..2], [StatusCode::ACCEPTED, StatusCode::ACCEPTED]);
    assert!(
        statuses.contains(&StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    let canary = json!({"kind": "canary", "payload": {"steps": 1}});
    for _ in 0..6 {
        let (status, headers, body) = post(&app, &app.url(""), "/v1/jobs", &canary).await;
        assert_eq!(
            status,
            StatusCode::ACCEPTED,
            "the other key is free: {body}"
        );
        assert!(headers.get("ratelimit").is_none());
    }
}

/// A key with a rate of its own makes no keys, and its rate goes with it when it is rotated:
/// a throttled admin key made itself free keys (a copy of its rate would still be a bucket of
/// its own a key), and a rotation dropped the throttle.
#[tokio::test]
async fn a_throttled_key_makes_no_keys_and_keeps_its_rate_when_rotated() {
    let app = TestApp::spawn().await;
    let id: uuid::Uuid = sqlx::query_scalar(
        "UPDATE api_keys SET rate_per_sec = 0.001, rate_burst = 1 WHERE key_hash = $1
         RETURNING id",
    )
    .bind(conveyor_api::auth::hash_key(&app.key))
    .fetch_one(app.pool())
    .await
    .unwrap();
    let keys = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM api_keys")
            .fetch_one(app.pool())
            .await
            .unwrap()
    };
    let before = keys().await;
    let (status, problem) = app.post("/v1/keys", &json!({"role": "write"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{problem}");
    assert_eq!(
        problem["type"], "https://conveyor.dev/problems/throttled-key",
        "{problem}"
    );
    assert_eq!(keys().await, before, "a key was made");

    let (ok, rotated, stderr) = app.conveyor_api(&["keys", "rotate", &id.to_string()]).await;
    assert!(ok, "{stderr}");
    let throttled = [StatusCode::ACCEPTED, StatusCode::TOO_MANY_REQUESTS];
    assert_eq!(
        submissions_as(&app, rotated.trim(), 2, "\"key\";q=1;w=1000").await,
        throttled,
        "its rotation"
    );
}

/// `n` canaries submitted one after another with `key`: their statuses. A refusal must name
/// `policy`.
async fn submissions_as(app: &TestApp, key: &str, n: usize, policy: &str) -> Vec<StatusCode> {
    let mut statuses = Vec::new();
    for _ in 0..n {
        let response = app
            .client
            .post(app.url("/v1/jobs"))
            .bearer_auth(key)
            .json(&json!({"kind": "canary", "payload": {"steps": 1}}))
            .send()
            .await
            .unwrap();
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(header(response.headers(), "ratelimit-policy"), policy);
        }
        statuses.push(response.status());
    }
    statuses
}

/// Submits a canary job and cancels it, `n` times, under `max_queued` 1; returns their ids.
async fn cancelled_jobs(app: &TestApp, n: usize) -> Vec<String> {
    set_limits(app, &["--max-queued", "1"]).await;
    let mut ids = Vec::new();
    for _ in 0..n {
        let job = json!({"kind": "canary", "payload": {"steps": 1}});
        let (status, body) = app.post("/v1/jobs", &job).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let id = body["id"].as_str().unwrap().to_owned();
        let (status, body) = app.post(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        ids.push(id);
    }
    ids
}

async fn jobs_queued(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = 'queued'")
        .fetch_one(app.pool())
        .await
        .unwrap()
}

/// Retries racing each other are counted again where they queue their jobs, as submissions
/// are: each passed the count it made first, and together they went past `max_queued`.
#[tokio::test]
async fn racing_retries_stay_within_max_queued() {
    let app = TestApp::spawn().await;
    let ids = cancelled_jobs(&app, 6).await;
    let racing = ids.iter().map(|id| {
        let request = app
            .client
            .post(app.url(&format!("/v1/jobs/{id}/retry")))
            .bearer_auth(&app.key);
        async move { request.send().await.unwrap().status() }
    });
    let statuses = futures::future::join_all(racing).await;
    let accepted = statuses.iter().filter(|s| **s == StatusCode::ACCEPTED);
    assert_eq!(accepted.count(), 1, "{statuses:?}");
    assert_eq!(jobs_queued(&app).await, 1);

    // Bulk retries take only the room left, counted where they write.
    let (status, body) = app
        .post("/v1/jobs/cancel", &json!({"status": ["queued"]}))
        .await;
    assert_eq!(
        (status, &body["count"]),
        (StatusCode::OK, &json!(1)),
        "{body}"
    );
    let racing = (0..4).map(|_| {
        let request = app
            .client
            .post(app.url("/v1/jobs/retry"))
            .bearer_auth(&app.key)
            .json(&json!({"status": ["cancelled"]}));
        async move { request.send().await.unwrap().status() }
    });
    let statuses = futures::future::join_all(racing).await;
    assert_eq!(jobs_queued(&app).await, 1, "{statuses:?}");
}

/// `set-limits` refuses what would cap nothing or refuse everything, saying why and changing
/// nothing: a mistyped kind, an empty bucket, a bucket deeper than its column, a burst with no
/// rate to apply it to.
#[tokio::test]
async fn set_limits_refuses_settings_that_would_do_nothing_or_refuse_everything() {
    let app = TestApp::spawn().await;
    let limits = || async {
        sqlx::query_scalar::<_, String>("SELECT to_jsonb(t)::text FROM tenant_limits t")
            .fetch_all(app.pool())
            .await
            .unwrap()
    };
    let before = limits().await;
    for (args, reason) in [
        (
            &["--max-running", "imports=2"][..],
            "unknown job kind \"imports\"",
        ),
        (
            &["--rate", "5/s", "--burst", "0"],
            "burst 0: must be 1-1000000",
        ),
        (
            &["--rate", "5/s", "--burst", "4294967295"],
            "must be 1-1000000",
        ),
        (&["--burst", "10"], "--burst sets the depth of a --rate"),
        (
            &["--rate", "none", "--burst", "10"],
            "--burst sets the depth of a --rate",
        ),
    ] {
        let mut all = vec!["tenants", "set-limits", "acme"];
        all.extend_from_slice(args);
        let (ok, _, stderr) = app.conveyor_api(&all).await;
        assert!(!ok && stderr.contains(reason), "{args:?}: {stderr}");
    }
    assert_eq!(limits().await, before);
    set_limits(
        &app,
        &["--max-running", "import=2", "--rate", "5/s", "--burst", "7"],
    )
    .await;
    assert_ne!(limits().await, before);
    // A cap stored under a kind no build knows can still be dropped.
    set_limits(&app, &["--max-running", "imports=default"]).await;
}
