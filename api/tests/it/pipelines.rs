//! Pipelines end to end: steps started as what they need succeeds, references to earlier
//! steps' outputs resolved, failures cancelling dependents and retries resuming, cancel, the
//! event stream ending at the outcome, refusals that write nothing, tenant walls, the CLI.

use crate::harness::{binary, SseMessage, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(90);

/// Polls the pipeline until its status is one of `statuses`.
async fn wait_pipeline(app: &TestApp, id: &str, statuses: &[&str]) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, pipeline) = app.get(&format!("/v1/pipelines/{id}")).await;
        assert_eq!(status, 200, "{pipeline}");
        if statuses.contains(&pipeline["status"].as_str().unwrap_or("")) {
            return pipeline;
        }
        assert!(
            Instant::now() < deadline,
            "pipeline not {statuses:?}: {pipeline}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn step<'a>(pipeline: &'a Value, name: &str) -> &'a Value {
    pipeline["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name}: {pipeline}"))
}

async fn submit(app: &TestApp, body: Value) -> (String, Value) {
    let (status, pipeline) = app.post("/v1/pipelines", &body).await;
    assert_eq!(status, StatusCode::CREATED, "{pipeline}");
    (pipeline["id"].as_str().unwrap().to_owned(), pipeline)
}

/// What a tenant's pipelines left in the control plane: (pipelines, steps, jobs).
async fn written(app: &TestApp) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM pipelines), (SELECT count(*) FROM pipeline_steps),
                (SELECT count(*) FROM jobs)",
    )
    .fetch_one(app.pool())
    .await
    .unwrap()
}

/// The event types of each job in a pipeline's stream, and its last event.
fn by_job(events: &[SseMessage]) -> std::collections::HashMap<String, Vec<String>> {
    let mut jobs: std::collections::HashMap<String, Vec<String>> = Default::default();
    for e in events.iter().filter(|e| e.event != "pipeline.finished") {
        let job = e.data["job_id"].as_str().unwrap().to_owned();
        jobs.entry(job).or_default().push(e.event.clone());
    }
    jobs
}

/// An uploaded CSV, synthesized, the synthetic table (a dataset: `outputs.dataset_id`) imported
/// into the tenant's target: one pipeline, its stream carrying both jobs' events and ending with
/// the outcome, a `pipeline.finished` webhook written.
#[tokio::test]
async fn synthesis_then_import_of_its_dataset_runs_as_one_pipeline() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("synthesis", 1), ("import", 1)])
        .await;
    let mut csv = String::from("id,region,amount\n");
    for i in 0..300 {
        csv.push_str(&format!("{i},{},{}.5\n", ["north", "south"][i % 2], i % 97));
    }
    let source = app.upload_dataset("orders.csv", csv.as_bytes()).await;
    let (status, hook) = app
        .post(
            "/v1/webhooks",
            &json!({"url": "http://203.0.113.7/hook", "events": ["pipeline.finished"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{hook}");

    let (id, submitted) = submit(
        &app,
        json!({
            "name": "orders, synthetic",
            "steps": [
                {"name": "synth", "kind": "synthesis",
                 "payload": {"dataset_id": source, "rows": 200, "seed": 3, "output_format": "csv"}},
                {"name": "load", "kind": "import", "needs": ["synth"],
                 "payload": {"dataset_id": "${steps.synth.outputs.dataset_id}",
                             "target": {"table": "synthetic_orders"}}},
            ],
        }),
    )
    .await;
    assert_eq!(submitted["status"], "running");
    assert_eq!(step(&submitted, "synth")["state"], "queued");
    assert_eq!(step(&submitted, "load")["state"], "waiting");
    assert!(step(&submitted, "load")["job_id"].is_null());
    let mut stream = app.sse(&format!("/v1/pipelines/{id}/events"), None).await;
    let events = stream.collect(WAIT).await;

    let last = events.last().expect("events");
    assert_eq!(last.event, "pipeline.finished", "{events:?}");
    assert_eq!(last.data["status"], "succeeded", "{}", last.data);
    let pipeline = wait_pipeline(&app, &id, &["succeeded"]).await;
    let (synth, load) = (step(&pipeline, "synth"), step(&pipeline, "load"));
    assert_eq!(synth["state"], "succeeded");
    assert_eq!(load["state"], "succeeded");
    let jobs = by_job(&events);
    for job in [
        synth["job_id"].as_str().unwrap(),
        load["job_id"].as_str().unwrap(),
    ] {
        let types = &jobs[job];
        assert_eq!(
            types.first().map(String::as_str),
            Some("queued"),
            "{types:?}"
        );
        assert!(types.contains(&"started".into()), "{types:?}");
        assert_eq!(
            types.last().map(String::as_str),
            Some("succeeded"),
            "{types:?}"
        );
    }
    assert_eq!(jobs.len(), 2, "only the pipeline's jobs: {jobs:?}");

    // The import read the synthetic dataset, named by the synthesis' output.
    let synth_job = app
        .job(synth["job_id"].as_str().unwrap().parse().unwrap())
        .await;
    let load_job = app
        .job(load["job_id"].as_str().unwrap().parse().unwrap())
        .await;
    let dataset = &synth_job["result"]["outputs"]["dataset_id"];
    assert!(dataset.is_string(), "{synth_job}");
    assert_eq!(&load_job["payload"]["dataset_id"], dataset);
    assert_eq!(load_job["pipeline_id"], id.as_str());
    assert_eq!(load_job["pipeline_step"], "load");
    let admin = sqlx::PgPool::connect(&app.target_admin_url())
        .await
        .unwrap();
    let schema = shared::tenancy::schema(app.tenant);
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {schema}.synthetic_orders"))
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(rows, 200);

    let (_, list) = app.get("/v1/pipelines").await;
    assert_eq!(list["pipelines"][0]["id"], id.as_str(), "{list}");
    let finished: Vec<Value> = sqlx::query_scalar(
        "SELECT payload FROM webhook_deliveries WHERE event = 'pipeline.finished'",
    )
    .fetch_all(app.pool())
    .await
    .unwrap();
    assert_eq!(finished.len(), 1, "{finished:?}");
    assert_eq!(finished[0]["data"]["pipeline_id"], id.as_str());
    assert_eq!(finished[0]["data"]["status"], "succeeded");
}

/// A step failing for good cancels the steps after it (with the reason), and the pipeline
/// fails; retrying the step's job resumes it: its dependents wait again, run, and the pipeline
/// succeeds. A step that could not start (an output its need lacks) fails clearly and can be
/// retried through the pipeline.
#[tokio::test]
async fn a_failed_step_cancels_its_dependents_and_a_retry_resumes_the_pipeline() {
    let mut app = TestApp::spawn().await;
    app.start_worker(2).await;
    let (id, _) = submit(
        &app,
        json!({
            "steps": [
                {"name": "first", "kind": "canary", "payload": {"steps": 1}},
                {"name": "middle", "kind": "canary", "needs": ["first"], "max_attempts": 1,
                 "payload": {"steps": 1, "fail_first": 1}},
                {"name": "after", "kind": "canary", "needs": ["middle"], "payload": {"steps": 1}},
                {"name": "last", "kind": "canary", "needs": ["after", "first"],
                 "payload": {"steps": 1}},
            ],
        }),
    )
    .await;
    let failed = wait_pipeline(&app, &id, &["failed", "succeeded"]).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(step(&failed, "first")["state"], "succeeded");
    let middle = step(&failed, "middle");
    assert_eq!(middle["state"], "failed");
    for name in ["after", "last"] {
        let s = step(&failed, name);
        assert_eq!(s["state"], "cancelled", "{failed}");
        assert!(s["job_id"].is_null(), "{failed}");
    }
    assert_eq!(
        step(&failed, "after")["reason"],
        "needs step \"middle\", which failed"
    );
    assert_eq!(
        step(&failed, "last")["reason"],
        "needs step \"after\", which was cancelled"
    );

    // Retrying the failed job resumes the pipeline (its second attempt succeeds).
    let job = middle["job_id"].as_str().unwrap();
    let (status, retried) = app.post(&format!("/v1/jobs/{job}/retry"), &json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{retried}");
    let (_, resumed) = app.get(&format!("/v1/pipelines/{id}")).await;
    assert_eq!(resumed["status"], "running", "{resumed}");
    assert_ne!(step(&resumed, "after")["state"], "cancelled", "{resumed}");
    let done = wait_pipeline(&app, &id, &["succeeded", "failed"]).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    for name in ["first", "middle", "after", "last"] {
        assert_eq!(step(&done, name)["state"], "succeeded", "{done}");
    }
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE pipeline_id = $1")
        .bind(id.parse::<Uuid>().unwrap())
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(jobs, 4, "one job per step");
    let (status, _) = app
        .post(&format!("/v1/pipelines/{id}/steps/first/retry"), &json!({}))
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a succeeded step is not retried"
    );

    // A reference to an output the needed step does not report: that step fails, clearly.
    let (id, _) = submit(
        &app,
        json!({
            "steps": [
                {"name": "make", "kind": "canary", "payload": {"steps": 1}},
                {"name": "use", "kind": "canary", "needs": ["make"],
                 "payload": {"steps": "${steps.make.outputs.count}"}},
            ],
        }),
    )
    .await;
    let failed = wait_pipeline(&app, &id, &["failed", "succeeded"]).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let used = step(&failed, "use");
    assert_eq!(used["state"], "failed");
    assert!(used["job_id"].is_null());
    let reason = used["reason"].as_str().unwrap();
    assert!(
        reason.contains("step \"make\" has no output \"count\""),
        "{reason}"
    );
    let (status, again) = app
        .post(&format!("/v1/pipelines/{id}/steps/use/retry"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    let failed = wait_pipeline(&app, &id, &["failed"]).await;
    assert!(step(&failed, "use")["reason"]
        .as_str()
        .unwrap()
        .contains("has no output"));

    // The tenant's two pipelines, a page at a time, newest first.
    let (_, first) = app.get("/v1/pipelines?limit=1").await;
    assert_eq!(first["pipelines"][0]["id"], id.as_str(), "{first}");
    let cursor = first["next_cursor"].as_str().unwrap();
    let (_, second) = app
        .get(&format!("/v1/pipelines?limit=1&cursor={cursor}"))
        .await;
    assert_eq!(second["pipelines"].as_array().unwrap().len(), 1, "{second}");
    assert_ne!(second["pipelines"][0]["id"], id.as_str());
    let (status, problem) = app.get("/v1/pipelines?limit=0").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem["errors"][0]["field"], "limit");
}

/// Retrying failed jobs in bulk resumes their pipelines too.
#[tokio::test]
async fn a_bulk_retry_resumes_the_pipelines_of_the_jobs_it_retries() {
    let mut app = TestApp::spawn().await;
    app.start_worker(2).await;
    let (id, _) = submit(
        &app,
        json!({
            "steps": [
                {"name": "flaky", "kind": "canary", "max_attempts": 1,
                 "payload": {"steps": 1, "fail_first": 1}},
                {"name": "then", "kind": "canary", "needs": ["flaky"], "payload": {"steps": 1}},
            ],
        }),
    )
    .await;
    let failed = wait_pipeline(&app, &id, &["failed", "succeeded"]).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(step(&failed, "then")["state"], "cancelled");
    let (status, retried) = app
        .post("/v1/jobs/retry", &json!({"status": ["failed"]}))
        .await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(retried["count"], 1);
    let done = wait_pipeline(&app, &id, &["succeeded"]).await;
    assert_eq!(step(&done, "then")["state"], "succeeded", "{done}");
}

/// Cancelling a pipeline stops its running step and cancels the waiting ones; its stream ends
/// with the outcome (and resumes after an event id); a second cancel is a conflict.
#[tokio::test]
async fn cancel_stops_the_unfinished_steps_and_the_stream_ends_with_the_outcome() {
    let mut app = TestApp::spawn().await;
    app.start_worker(1).await;
    let (id, submitted) = submit(
        &app,
        json!({
            "steps": [
                {"name": "long", "kind": "canary", "payload": {"steps": 200, "step_ms": 100}},
                {"name": "next", "kind": "canary", "needs": ["long"], "payload": {}},
            ],
        }),
    )
    .await;
    let job: Uuid = step(&submitted, "long")["job_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    app.wait_status(job, &["running"], WAIT).await;
    let mut stream = app.sse(&format!("/v1/pipelines/{id}/events"), None).await;

    let (status, cancelled) = app
        .post(&format!("/v1/pipelines/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 200, "{cancelled}");
    assert!(cancelled["cancel_requested"].as_bool().unwrap());
    let events = stream.collect(WAIT).await;
    let last = events.last().expect("events");
    assert_eq!(last.event, "pipeline.finished", "{events:?}");
    assert_eq!(last.data["status"], "cancelled");
    assert!(
        events
            .iter()
            .any(|e| e.event == "cancelled" && e.data["job_id"] == job.to_string()),
        "{events:?}"
    );
    // Resumed after its first event: the rest again, and the outcome.
    let first = events[0].id.clone().unwrap();
    let mut resumed = app
        .sse(&format!("/v1/pipelines/{id}/events"), Some(&first))
        .await;
    let replayed = resumed.collect(WAIT).await;
    let ids = |events: &[SseMessage]| -> Vec<Option<String>> {
        events.iter().map(|e| e.id.clone()).collect()
    };
    assert_eq!(ids(&replayed), ids(&events[1..]), "{replayed:?}");
    assert_eq!(replayed.last().unwrap().event, "pipeline.finished");

    let done = wait_pipeline(&app, &id, &["cancelled"]).await;
    assert_eq!(step(&done, "long")["state"], "cancelled");
    assert_eq!(step(&done, "next")["state"], "cancelled");
    assert_eq!(step(&done, "next")["reason"], "the pipeline was cancelled");
    assert!(step(&done, "next")["job_id"].is_null());
    let (status, _) = app
        .post(&format!("/v1/pipelines/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
}

/// Cycles, unknown or repeated names, references that are malformed or to a step not needed,
/// payloads their kind refuses, too many steps: 422 naming the step and field, nothing written.
#[tokio::test]
async fn invalid_pipelines_are_refused_and_write_nothing() {
    let app = TestApp::spawn().await;
    let canary =
        |name: &str, needs: &[&str]| json!({"name": name, "kind": "canary", "needs": needs});
    let too_many: Vec<Value> = (0..51).map(|i| canary(&format!("s{i}"), &[])).collect();
    let before = written(&app).await;
    for (steps, field, why) in [
        (
            json!([
                canary("a", &["c"]),
                canary("b", &["a"]),
                canary("c", &["b"])
            ]),
            "steps[0].needs",
            "cycle",
        ),
        (
            json!([canary("a", &["nope"])]),
            "steps[0].needs",
            "not a step",
        ),
        (
            json!([canary("a", &[]), canary("a", &[])]),
            "steps[1].name",
            "already",
        ),
        (json!([canary("a b", &[])]), "steps[0].name", "letters"),
        (json!(too_many), "steps", "1 to 50"),
        (json!([]), "steps", "1 to 50"),
        (
            json!([canary("a", &[]), {"name": "b", "kind": "canary", "needs": ["a"],
                   "payload": {"steps": "x ${steps.a.outputs.n}"}}]),
            "steps[1].payload.steps",
            "whole value",
        ),
        (
            json!([canary("a", &[]), {"name": "b", "kind": "canary",
                   "payload": {"steps": "${steps.a.outputs.n}"}}]),
            "steps[1].payload.steps",
            "does not need",
        ),
        (
            json!([canary("a", &[]), {"name": "b", "kind": "canary", "needs": ["a"],
                   "payload": {"steps": "many"}}]),
            "steps[1].payload.steps",
            "",
        ),
        (
            json!([{"name": "a", "kind": "nope"}]),
            "steps[0].kind",
            "unknown job kind",
        ),
        (
            json!([{"name": "a", "kind": "canary", "max_attempts": 99}]),
            "steps[0].max_attempts",
            "between",
        ),
    ] {
        let (status, problem) = app.post("/v1/pipelines", &json!({"steps": steps})).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{steps}: {problem}"
        );
        let errors = problem["errors"].as_array().unwrap();
        assert!(
            errors
                .iter()
                .any(|e| e["field"] == field && e["message"].as_str().unwrap().contains(why)),
            "{field} / {why}: {problem}"
        );
    }
    let (status, _) = app
        .post(
            "/v1/pipelines",
            &json!({"steps": [canary("a", &[])], "on_failure": "shrug"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // A long name with many needs, under the tests' body limit (64 KiB): the refusal stays
    // small (each need's error used to quote the name, the errors growing as name × needs).
    let needs: Vec<String> = (0..40).map(|i| format!("{}{i}", "m".repeat(500))).collect();
    let (status, problem) = app
        .post(
            "/v1/pipelines",
            &json!({"steps": [{"name": "n".repeat(20_000), "kind": "canary", "needs": needs}]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    let size = problem.to_string().len();
    assert!(size < 2_000, "a refusal of {size} bytes");
    // A step's references are bounded: each is checked against its needs and its payload's
    // errors (many of both took seconds of the API's CPU).
    let references: Vec<String> = (0..101)
        .map(|_| "${steps.a.outputs.n}".to_owned())
        .collect();
    let (status, problem) = app
        .post(
            "/v1/pipelines",
            &json!({"steps": [
                {"name": "a", "kind": "canary"},
                {"name": "b", "kind": "canary", "needs": ["a"], "payload": {"many": references}},
            ]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert_eq!(
        problem["errors"][0]["field"], "steps[1].payload",
        "{problem}"
    );
    assert!(
        problem["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("at most 100"),
        "{problem}"
    );
    assert_eq!(
        written(&app).await,
        before,
        "a refused pipeline wrote something"
    );

    let (_, spec) = app.get("/openapi.json").await;
    for path in [
        "/v1/pipelines",
        "/v1/pipelines/{id}",
        "/v1/pipelines/{id}/cancel",
        "/v1/pipelines/{id}/steps/{name}/retry",
        "/v1/pipelines/{id}/events",
    ] {
        assert!(spec["paths"][path].is_object(), "{path} not documented");
    }
}

/// Another tenant's pipeline is not found by any route; a read key reads but cannot submit,
/// cancel or retry; nothing changes.
#[tokio::test]
async fn other_tenants_and_read_keys_are_walled_off() {
    let app = TestApp::spawn().await;
    let (id, _) = submit(
        &app,
        json!({"steps": [{"name": "a", "kind": "canary", "payload": {"steps": 1}}]}),
    )
    .await;
    let other = app.key_for("globex").await;
    for (path, post) in [
        (format!("/v1/pipelines/{id}"), false),
        (format!("/v1/pipelines/{id}/events"), false),
        (format!("/v1/pipelines/{id}/cancel"), true),
        (format!("/v1/pipelines/{id}/steps/a/retry"), true),
    ] {
        let request = if post {
            app.client.post(app.url(&path)).json(&json!({}))
        } else {
            app.client.get(app.url(&path))
        };
        let response = request.bearer_auth(&other).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
    }
    let (status, list) = app
        .post_as(
            &other,
            "/v1/pipelines",
            &json!({"steps": [
        {"name": "b", "kind": "canary", "payload": {"steps": 1}}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{list}");
    let listed = app
        .client
        .get(app.url("/v1/pipelines"))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let ids: Vec<&str> = listed["pipelines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [list["id"].as_str().unwrap()], "only its own");

    let (status, created) = app.post("/v1/keys", &json!({"role": "read"})).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let read = created["key"].as_str().unwrap();
    let before = written(&app).await;
    for path in [
        "/v1/pipelines".to_owned(),
        format!("/v1/pipelines/{id}/cancel"),
        format!("/v1/pipelines/{id}/steps/a/retry"),
    ] {
        let body = json!({"steps": [{"name": "x", "kind": "canary"}]});
        let (status, problem) = app.post_as(read, &path, &body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {problem}");
    }
    assert_eq!(written(&app).await, before);
    let response = app
        .client
        .get(app.url(&format!("/v1/pipelines/{id}")))
        .bearer_auth(read)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (_, pipeline) = app.get(&format!("/v1/pipelines/{id}")).await;
    assert_eq!(pipeline["cancel_requested"], false);
}

/// `conveyor pipelines submit FILE.yaml --wait` follows the steps to the end: exit 0 and the
/// pipeline printed when it succeeds, 1 when it fails.
#[tokio::test]
async fn the_cli_submits_a_yaml_pipeline_and_waits_for_its_outcome() {
    let mut app = TestApp::spawn().await;
    app.start_worker(2).await;
    let dir = std::env::temp_dir().join(format!("conveyor-pipeline-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |file: &str, yaml: &str| {
        let path = dir.join(file);
        std::fs::write(&path, yaml).unwrap();
        let mut command = tokio::process::Command::new(binary("conveyor"));
        command
            .args(["pipelines", "submit", path.to_str().unwrap(), "--wait"])
            .env("CONVEYOR_URL", &app.base)
            .env("CONVEYOR_API_KEY", &app.key)
            .kill_on_drop(true);
        async move {
            let output = tokio::time::timeout(WAIT, command.output())
                .await
                .expect("conveyor finishes")
                .expect("conveyor runs (cargo build --workspace --bins)");
            (
                output.status.code(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        }
    };
    let (code, stdout, stderr) = run(
        "ok.yaml",
        "name: two canaries\nsteps:\n  - name: one\n    kind: canary\n    payload: {steps: 2}\n  \
         - name: two\n    kind: canary\n    needs: [one]\n    payload:\n      steps: 1\n",
    )
    .await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("status    succeeded"), "{stdout}");
    assert!(stdout.contains("two "), "{stdout}");
    assert!(stderr.contains("succeeded"), "{stderr}");

    let (code, stdout, stderr) = run(
        "bad.yaml",
        "steps:\n  - name: one\n    kind: canary\n    max_attempts: 1\n    payload: {fail_first: 1}\n",
    )
    .await;
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("status    failed"), "{stdout}");

    let (code, _, stderr) = run(
        "cycle.yaml",
        "steps:\n  - {name: a, kind: canary, needs: [a]}\n",
    )
    .await;
    assert_eq!(code, Some(2));
    assert!(stderr.contains("steps[0].needs"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

/// An open pipeline stream checks once a second whether its pipeline ended: it read the whole
/// pipeline for that, every step's payload (up to a megabyte each), for each of up to a
/// thousand streams a tenant. It reads the status and the steps' jobs alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_pipeline_stream_reads_no_step_payloads_while_it_waits() {
    let app = TestApp::spawn_with(|s| s.body_limit = 1 << 20).await;
    let collection = crate::ingest::create_collection(&app, json!({"name": "notes"})).await;
    let mut steps = vec![json!({"name": "root", "kind": "canary", "payload": {"steps": 1}})];
    // Six steps of 8 KB each.
    for i in 0..6 {
        // Text that does not compress, so that each payload is stored out of line.
        let text = crate::harness::incompressible_text(1200, 7 + i);
        let document = json!({"id": format!("doc{i}"), "text": text});
        steps.push(
            json!({"name": format!("ingest{i}"), "kind": "ingest", "needs": ["root"],
            "payload": {"collection_id": collection, "documents": [document]}}),
        );
    }
    let (id, _) = submit(&app, json!({ "steps": steps })).await;
    let mut stream = app.sse(&format!("/v1/pipelines/{id}/events"), None).await;
    // The stream's first read of the pipeline, and the submission's, reach the statistics
    // once their sessions have been idle a while (PostgreSQL flushes them within 10 s).
    tokio::time::sleep(Duration::from_secs(11)).await;
    let before = app.toast_blocks("pipeline_steps").await;
    // Four seconds of checks (and of the root's events, if any come); then their statistics
    // are flushed too.
    let window = Instant::now() + Duration::from_secs(4);
    while Instant::now() < window {
        stream.next(window - Instant::now()).await;
    }
    tokio::time::sleep(Duration::from_secs(11)).await;
    let read = app.toast_blocks("pipeline_steps").await - before;
    assert_eq!(
        read, 0,
        "the stream's checks read {read} blocks of step payloads"
    );
    drop(stream);
}

/// A dataset a waiting step names cannot be deleted: the pipeline was accepted with it
/// checked, and the step failed later for its loss. Deleted once the pipeline ended.
#[tokio::test]
async fn a_dataset_a_waiting_step_names_is_not_deleted() {
    let app = TestApp::spawn().await;
    let dataset = app.upload_dataset("later.csv", b"id\n1\n").await;
    let (id, _) = submit(
        &app,
        json!({"steps": [
            {"name": "first", "kind": "canary", "payload": {"steps": 1}},
            {"name": "load", "kind": "import", "needs": ["first"],
             "payload": {"dataset_id": dataset, "target": {"table": "later"}, "mode": "create"}}]}),
    )
    .await;
    let status = app.delete(&format!("/v1/datasets/{dataset}")).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "deleted while a waiting step names it"
    );
    let (status, _) = app
        .post(&format!("/v1/pipelines/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    wait_pipeline(&app, &id, &["cancelled"]).await;
    let status = app.delete(&format!("/v1/datasets/{dataset}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

/// A job or a waiting step naming a dataset in another spelling of its id (upper case, braces,
/// `urn:uuid:`, no hyphens: `uuid` reads them all) holds it as the usual spelling does: the
/// payload was stored as sent, `in_use`'s `payload @>` missed it, and the dataset was deleted
/// under the job.
#[tokio::test]
async fn a_dataset_named_in_another_spelling_of_its_id_is_not_deleted() {
    let app = TestApp::spawn().await;
    let dataset = app.upload_dataset("spelled.csv", b"id\n1\n").await;
    let path = format!("/v1/datasets/{dataset}");
    let spellings = [
        dataset.hyphenated().to_string().to_uppercase(),
        dataset.braced().to_string(),
        dataset.urn().to_string(),
        dataset.simple().to_string().to_uppercase(),
    ];
    for spelling in &spellings {
        let import = json!({"dataset_id": spelling, "target": {"table": "spelled"}});
        let (status, job) = app
            .post("/v1/jobs", &json!({"kind": "import", "payload": import}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        let status = app.delete(&path).await;
        assert_eq!(
            status,
            StatusCode::CONFLICT,
            "deleted under a job naming it {spelling}"
        );
        assert_eq!(
            job["payload"]["dataset_id"],
            dataset.to_string(),
            "stored as parsed"
        );
        let cancel = format!("/v1/jobs/{}/cancel", job["id"].as_str().unwrap());
        assert_eq!(app.post(&cancel, &json!({})).await.0, StatusCode::OK);
    }
    // A waiting step, alone and with a reference beside the id (kept where it stood).
    for reference in [None, Some("${steps.first.outputs.connection_id}")] {
        let mut target = json!({"table": "spelled"});
        if let Some(reference) = reference {
            target["connection_id"] = json!(reference);
        }
        let (id, pipeline) = submit(
            &app,
            json!({"steps": [
                {"name": "first", "kind": "canary", "payload": {"steps": 1}},
                {"name": "load", "kind": "import", "needs": ["first"],
                 "payload": {"dataset_id": spellings[0], "target": target}}]}),
        )
        .await;
        let status = app.delete(&path).await;
        assert_eq!(status, StatusCode::CONFLICT, "deleted under a waiting step");
        let load = step(&pipeline, "load");
        assert_eq!(load["payload"]["dataset_id"], dataset.to_string(), "{load}");
        if let Some(reference) = reference {
            assert_eq!(
                load["payload"]["target"]["connection_id"], reference,
                "{load}"
            );
        }
        let (status, _) = app
            .post(&format!("/v1/pipelines/{id}/cancel"), &json!({}))
            .await;
        assert_eq!(status, StatusCode::OK);
        wait_pipeline(&app, &id, &["cancelled"]).await;
    }
    assert_eq!(app.delete(&path).await, StatusCode::NO_CONTENT);
}

/// A pipeline's past events are replayed from its steps' own streams, in order: a replay from
/// the tenant stream read every job's events (up to its 100,000) for a pipeline's few, all in
/// one chunk before anything was sent, and lost what the tenant stream's length cap dropped.
#[tokio::test]
async fn a_pipeline_stream_replays_from_its_steps_streams() {
    use shared::{
        events::{Event, EventType},
        model::JobStatus,
    };
    let app = TestApp::spawn().await;
    let (id, _) = submit(
        &app,
        json!({"steps": [{"name": "a", "kind": "canary", "payload": {"steps": 1}},
                         {"name": "b", "kind": "canary", "payload": {"steps": 1}}]}),
    )
    .await;
    let (_, pipeline) = app.get(&format!("/v1/pipelines/{id}")).await;
    let jobs: Vec<Uuid> = ["a", "b"]
        .iter()
        .map(|name| {
            step(&pipeline, name)["job_id"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    // 1,200 progress events of the two steps, between events of another job.
    let other = Uuid::now_v7();
    let progress = |job: Uuid, at: f32| {
        let event = Event::new(job, "canary", EventType::Progress, JobStatus::Running, at);
        (app.tenant, event.attempt(1))
    };
    let appended: Vec<_> = (0..1200)
        .flat_map(|i| {
            [
                progress(jobs[i % 2], i as f32 / 1200.0),
                progress(other, 0.5),
            ]
        })
        .collect();
    let log = &app.server.as_ref().unwrap().state.events;
    log.append(&appended).await.unwrap();
    // The tenant stream's cap drops them there (a busy tenant's, in an hour): all but the
    // last, another job's.
    let mut redis = redis::Client::open(app.settings.redis_url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("XTRIM")
        .arg(log.keys().tenant(app.tenant))
        .arg("MAXLEN")
        .arg(1)
        .query(&mut redis)
        .unwrap();

    let mut stream = app.sse(&format!("/v1/pipelines/{id}/events"), None).await;
    let mut seen = Vec::new();
    while let Some(message) = stream.next(Duration::from_secs(5)).await {
        seen.push(message);
        if seen.iter().filter(|m| m.event == "progress").count() == 1200 {
            break;
        }
    }
    let progress: Vec<_> = seen.iter().filter(|m| m.event == "progress").collect();
    assert_eq!(
        progress.len(),
        1200,
        "replayed {} progress events",
        progress.len()
    );
    assert!(progress
        .iter()
        .all(|m| m.data["job_id"] != other.to_string()));
    let ids: Vec<_> = seen
        .iter()
        .map(|m| {
            let (ms, seq) = m.id.as_deref().unwrap().split_once('-').unwrap();
            (ms.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap())
        })
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "replayed out of order");
    // Resumed after the 600th, it replays the rest.
    let resume = progress[599].id.clone().unwrap();
    let mut stream = app
        .sse(&format!("/v1/pipelines/{id}/events"), Some(&resume))
        .await;
    let rest = stream.collect(Duration::from_secs(3)).await;
    assert_eq!(rest.iter().filter(|m| m.event == "progress").count(), 600);
}

/// A finished pipeline's stream ends with `pipeline.finished` though the tenant's other jobs
/// keep writing: the replay cleared the stream's first look at the row, and its next came
/// only after a quiet second, which a busy tenant never has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_pipelines_stream_ends_while_other_jobs_write() {
    let mut app = TestApp::spawn().await;
    app.start_worker(1).await;
    let (id, _) = submit(
        &app,
        json!({"steps": [{"name": "a", "kind": "canary", "payload": {"steps": 1}}]}),
    )
    .await;
    wait_pipeline(&app, &id, &["succeeded"]).await;
    let busy = another_job_writing(&app);
    let mut stream = app.sse(&format!("/v1/pipelines/{id}/events"), None).await;
    let events = stream.collect(Duration::from_secs(10)).await;
    busy.abort();
    let last = events.last().expect("events");
    assert_eq!(last.event, "pipeline.finished", "{events:?}");
}

/// A step's terminal event may come before its pipeline's row ends (the row is advanced
/// after, or by maintenance later): a stream that read the row in between looked again only
/// after a quiet second, which a busy tenant never has. It looks a second after its last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_that_ends_after_its_steps_last_event_ends_its_stream() {
    use shared::{
        events::{Event, EventType},
        model::JobStatus,
    };
    let app = TestApp::spawn().await;
    let (id, _) = submit(
        &app,
        json!({"steps": [{"name": "a", "kind": "canary", "payload": {"steps": 1}}]}),
    )
    .await;
    let (_, pipeline) = app.get(&format!("/v1/pipelines/{id}")).await;
    let job: Uuid = step(&pipeline, "a")["job_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let log = app.server.as_ref().unwrap().state.events.clone();
    let tenant = app.tenant;
    let busy = another_job_writing(&app);
    let mut stream = app.sse(&format!("/v1/pipelines/{id}/events"), None).await;
    // The step's end, then (the stream has read the row meanwhile) the pipeline's.
    let succeeded = Event::new(
        job,
        "canary",
        EventType::Succeeded,
        JobStatus::Succeeded,
        1.0,
    );
    log.append(&[(tenant, succeeded.attempt(1))]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    sqlx::query("UPDATE pipelines SET status = 'succeeded', finished_at = now() WHERE id = $1")
        .bind(Uuid::parse_str(&id).unwrap())
        .execute(app.pool())
        .await
        .unwrap();
    let events = stream.collect(Duration::from_secs(8)).await;
    busy.abort();
    let last = events.last().expect("events");
    assert_eq!(last.event, "pipeline.finished", "{events:?}");
}

/// Another job of the app's tenant writing progress ten times a second, until aborted: a busy
/// tenant's stream, never quiet.
fn another_job_writing(app: &TestApp) -> tokio::task::JoinHandle<()> {
    use shared::{
        events::{Event, EventType},
        model::JobStatus,
    };
    let log = app.server.as_ref().unwrap().state.events.clone();
    let tenant = app.tenant;
    tokio::spawn(async move {
        let other = Uuid::now_v7();
        loop {
            let event = Event::new(
                other,
                "canary",
                EventType::Progress,
                JobStatus::Running,
                0.5,
            );
            let _ = log.append(&[(tenant, event.attempt(1))]).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}
