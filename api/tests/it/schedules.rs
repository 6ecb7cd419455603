//! Schedules: create, read, pause, resume and delete them over the API (validation naming
//! fields, another tenant's schedule invisible), and their firings made by the workers: one job
//! per firing with several firers racing, overlap `skip` while a job runs, misfire policies
//! after downtime.

use crate::harness::TestApp;
use chrono::{DateTime, Timelike, Utc};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use uuid::Uuid;

async fn create(app: &TestApp, body: Value) -> Value {
    let (status, schedule) = app.post("/v1/schedules", &body).await;
    assert_eq!(status, StatusCode::CREATED, "{schedule}");
    schedule
}

fn times(value: &Value) -> Vec<DateTime<Utc>> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().parse().unwrap())
        .collect()
}

/// The schedule's firings, newest first: what each made, or why it made nothing.
async fn firings(app: &TestApp, id: &str) -> Vec<Value> {
    let (status, page) = app
        .get(&format!("/v1/schedules/{id}/history?limit=500"))
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    page["firings"].as_array().unwrap().clone()
}

/// A two-step pipeline of canaries, `second` needing `first`; `first` runs `steps` of 100 ms.
fn two_steps(steps: u32) -> Value {
    json!({"steps": [
        {"name": "first", "kind": "canary", "payload": {"steps": steps, "step_ms": 100}},
        {"name": "second", "kind": "canary", "needs": ["first"]},
    ]})
}

/// A 5-second window inside one minute, starting 2 seconds from now: its start, and a cron
/// expression firing every second of it.
async fn five_seconds_soon() -> (DateTime<Utc>, String) {
    let mut now = Utc::now();
    if now.second() > 50 {
        tokio::time::sleep(Duration::from_secs(u64::from(61 - now.second()))).await;
        now = Utc::now();
    }
    let start = now.with_nanosecond(0).unwrap() + chrono::Duration::seconds(2);
    let cron = format!(
        "{}-{} {} {} * * *",
        start.second(),
        start.second() + 4,
        start.minute(),
        start.hour()
    );
    (start, cron)
}

/// Asserts that the firing times (`field` of each of `made`) are the 5 seconds from `start`,
/// one each; returns them.
fn one_per_second(made: &[Value], field: &str, start: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let mut fired: Vec<DateTime<Utc>> = made
        .iter()
        .map(|m| m[field].as_str().unwrap().parse().unwrap())
        .collect();
    fired.sort();
    let expected: Vec<DateTime<Utc>> = (0..5)
        .map(|s| start + chrono::Duration::seconds(s))
        .collect();
    assert_eq!(fired, expected, "one per firing second: {made:#?}");
    expected
}

/// Another firer, as a second leader would be, racing the one the workers elected for 9
/// seconds: the jobs and pipelines it made.
async fn race_the_leader(app: &TestApp) -> (usize, usize) {
    let end = Instant::now() + Duration::from_secs(9);
    let (mut jobs, mut pipelines) = (0, 0);
    let state = &app.server.as_ref().expect("api running").state;
    let buckets = shared::rates::Buckets::new(state.redis.clone(), &app.settings);
    while Instant::now() < end {
        let fired = shared::schedules::fire_due(
            app.pool(),
            &buckets,
            Duration::from_secs(10),
            100,
            &validate,
        )
        .await
        .expect("fires");
        jobs += fired.jobs.len();
        pipelines += fired.pipelines;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (jobs, pipelines)
}

/// The jobs the schedule made, newest first.
async fn history(app: &TestApp, id: &str) -> Vec<Value> {
    let (status, page) = app.get(&format!("/v1/schedules/{id}/jobs?limit=500")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    page["jobs"].as_array().unwrap().clone()
}

async fn wait_for(what: &str, within: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done().await {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks a pipeline step's resolved payload, as a worker's firer does.
fn validate(kind: &str, payload: &Value) -> Result<Value, Vec<shared::FieldError>> {
    static REGISTRY: std::sync::LazyLock<contracts::Registry> =
        std::sync::LazyLock::new(contracts::Registry::standard);
    REGISTRY
        .validate(kind, payload)
        .map(contracts::Valid::into_stored)
}

fn fields(problem: &Value) -> Vec<&str> {
    problem["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no errors: {problem}"))
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn schedules_are_created_listed_paused_resumed_and_deleted() {
    let app = TestApp::spawn().await;
    let before = Utc::now();
    let schedule = create(
        &app,
        json!({"name": "nightly", "cron": "*/5 * * * *", "timezone": "Europe/Paris",
               "job": {"kind": "canary", "payload": {"steps": 2}, "priority": 3}}),
    )
    .await;
    let id = schedule["id"].as_str().unwrap().to_owned();
    assert_eq!(schedule["overlap"], "skip");
    assert_eq!(schedule["misfire"], "run_once");
    assert_eq!(schedule["paused"], false);
    assert_eq!(schedule["job"]["kind"], "canary");
    assert_eq!(schedule["job"]["priority"], 3);
    assert_eq!(schedule["job"]["max_attempts"], 3);
    let next = times(&schedule["next_fires"]);
    assert_eq!(next.len(), 5);
    assert!(next[0] > before);
    for pair in next.windows(2) {
        assert_eq!((pair[1] - pair[0]).num_minutes(), 5, "{next:?}");
    }
    assert!(next.iter().all(|t| t.minute() % 5 == 0 && t.second() == 0));
    assert_eq!(
        schedule["next_fire_at"]
            .as_str()
            .unwrap()
            .parse::<DateTime<Utc>>()
            .unwrap(),
        next[0]
    );

    // The same name again: 409.
    let (status, _) = app
        .post(
            "/v1/schedules",
            &json!({"name": "nightly", "cron": "@daily", "job": {"kind": "canary"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);

    let (status, list) = app.get("/v1/schedules").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["schedules"].as_array().unwrap().len(), 1);
    assert_eq!(list["schedules"][0]["id"], id.as_str());
    assert_eq!(
        list["schedules"][0]["next_fires"].as_array().unwrap().len(),
        5
    );
    let (status, one) = app.get(&format!("/v1/schedules/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["name"], "nightly");

    let (status, paused) = app
        .post(&format!("/v1/schedules/{id}/pause"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{paused}");
    assert_eq!(paused["paused"], true);
    assert!(paused["next_fires"].as_array().unwrap().is_empty());
    let (status, resumed) = app
        .post(&format!("/v1/schedules/{id}/resume"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{resumed}");
    assert_eq!(resumed["paused"], false);
    assert!(times(&resumed["next_fires"])[0] > before);
    assert!(history(&app, &id).await.is_empty());

    assert_eq!(
        app.delete(&format!("/v1/schedules/{id}")).await,
        StatusCode::NO_CONTENT
    );
    let (status, _) = app.get(&format!("/v1/schedules/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        app.delete(&format!("/v1/schedules/{id}")).await,
        StatusCode::NOT_FOUND
    );

    let (_, spec) = app.get("/openapi.json").await;
    for path in [
        "/v1/schedules",
        "/v1/schedules/{id}",
        "/v1/schedules/{id}/pause",
        "/v1/schedules/{id}/resume",
        "/v1/schedules/{id}/jobs",
    ] {
        assert!(
            spec["paths"][path].is_object(),
            "{path} not in the OpenAPI document"
        );
    }
    assert!(spec["components"]["schemas"]["Schedule"].is_object());

    // Each change is in the audit log, with the key that made it.
    let actions: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE target_id = $1 AND key_id IS NOT NULL ORDER BY id",
    )
    .bind(&id)
    .fetch_all(app.pool())
    .await
    .unwrap();
    assert_eq!(
        actions,
        [
            "schedule.create",
            "schedule.pause",
            "schedule.resume",
            "schedule.delete"
        ]
    );
}

#[tokio::test]
async fn invalid_schedules_are_refused_naming_their_fields() {
    let app = TestApp::spawn().await;
    let refused = async |body: Value| -> Value {
        let (status, problem) = app.post("/v1/schedules", &body).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}: {problem}"
        );
        problem
    };
    let canary = json!({"kind": "canary"});
    let problem = refused(json!({"name": "a", "cron": "* * *", "job": canary})).await;
    assert_eq!(fields(&problem), ["cron"]);
    let problem = refused(json!({"name": "a", "cron": "61 * * * *", "job": canary})).await;
    assert_eq!(fields(&problem), ["cron"]);
    let problem = refused(
        json!({"name": "a", "cron": "* * * * *", "timezone": "Mars/Olympus", "job": canary}),
    )
    .await;
    assert_eq!(fields(&problem), ["timezone"]);
    // Bounded: every firing parses the expression again on the one leader.
    let long = format!("0{} * * * *", ",0".repeat(200));
    let problem = refused(json!({"name": "a", "cron": long, "job": canary})).await;
    assert_eq!(fields(&problem), ["cron"]);
    let zone = format!("Europe/{}", "x".repeat(100));
    let problem =
        refused(json!({"name": "a", "cron": "* * * * *", "timezone": zone, "job": canary})).await;
    assert_eq!(fields(&problem), ["timezone"]);
    // The job is validated as a submission is.
    let problem = refused(json!({"name": "a", "cron": "* * * * *",
        "job": {"kind": "canary", "payload": {"steps": 1_000_000}, "max_attempts": 99}}))
    .await;
    assert_eq!(fields(&problem), ["job.payload.steps", "job.max_attempts"]);
    let problem = refused(json!({"name": "a", "cron": "* * * * *", "job": {"kind": "nope"}})).await;
    assert!(fields(&problem)[0].starts_with("job."), "{problem}");
    let problem = refused(json!({"name": "", "cron": "* * * * *"})).await;
    assert_eq!(fields(&problem), ["name", "job"]);
    // A pipeline is checked as a submitted one is, its errors under `pipeline.`.
    let step = |name: &str, needs: Value, payload: Value| json!({"name": name, "kind": "canary", "needs": needs, "payload": payload});
    let problem = refused(
        json!({"name": "a", "cron": "* * * * *", "pipeline": {"steps": [
            step("a", json!(["b"]), json!({})),
            step("b", json!(["a"]), json!({"steps": 1_000_000})),
        ]}}),
    )
    .await;
    assert_eq!(
        fields(&problem),
        ["pipeline.steps[0].needs", "pipeline.steps[1].payload.steps"],
        "{problem}"
    );
    let problem = refused(
        json!({"name": "a", "cron": "* * * * *", "pipeline": {"steps": [
            step("a", json!([]), json!({"steps": "${steps.nope.outputs.n}"})),
        ]}}),
    )
    .await;
    assert_eq!(fields(&problem), ["pipeline.steps[0].payload.steps"]);
    let problem =
        refused(json!({"name": "a", "cron": "* * * * *", "pipeline": {"steps": []}})).await;
    assert_eq!(fields(&problem), ["pipeline.steps"]);
    let problem = refused(json!({"name": "a", "cron": "* * * * *", "job": canary,
        "pipeline": {"steps": [step("a", json!([]), json!({}))]}}))
    .await;
    assert_eq!(fields(&problem), ["pipeline"]);
    // An import of a dataset the tenant does not have: refused as its submission would be.
    let (status, problem) = app
        .post(
            "/v1/schedules",
            &json!({"name": "a", "cron": "* * * * *", "pipeline": {"steps": [
                {"name": "load", "kind": "import",
                 "payload": {"dataset_id": Uuid::now_v7(), "target": {"table": "t"}}},
            ]}}),
        )
        .await;
    assert!(status.is_client_error(), "{status} {problem}");
    assert!(
        problem.to_string().contains("pipeline.steps[0]"),
        "{problem}"
    );
    let (status, _) = app
        .post(
            "/v1/schedules",
            &json!({"name": "a", "cron": "* * * * *", "job": canary, "overlap": "sometimes"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    let (_, list) = app.get("/v1/schedules").await;
    assert!(list["schedules"].as_array().unwrap().is_empty());

    // A tenant's schedules are bounded: the leader fires every due one in time order.
    let limit = shared::schedules::MAX_PER_TENANT;
    for i in 0..limit {
        create(
            &app,
            json!({"name": format!("s{i}"), "cron": "* * * * * *", "job": canary, "paused": true}),
        )
        .await;
    }
    let (status, problem) = app
        .post(
            "/v1/schedules",
            &json!({"name": "one more", "cron": "* * * * * *", "job": canary}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    let (_, list) = app.get("/v1/schedules").await;
    assert_eq!(list["schedules"].as_array().unwrap().len() as i64, limit);
    // Another tenant's schedules do not count against this one's.
    let other = app.key_for("globex").await;
    let (status, problem) = app
        .post_as(
            &other,
            "/v1/schedules",
            &json!({"name": "one more", "cron": "* * * * * *", "job": canary, "paused": true}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{problem}");
}

#[tokio::test]
async fn another_tenants_schedule_is_not_found_and_a_read_key_cannot_change_one() {
    let app = TestApp::spawn().await;
    let schedule = create(
        &app,
        json!({"name": "mine", "cron": "@hourly", "job": {"kind": "canary"}}),
    )
    .await;
    let id = schedule["id"].as_str().unwrap();
    let other = app.key_for("globex").await;
    let get_as = async |key: &str, path: &str| -> StatusCode {
        app.client
            .get(app.url(path))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(
        get_as(&other, &format!("/v1/schedules/{id}")).await,
        StatusCode::NOT_FOUND
    );
    for list in ["jobs", "history"] {
        assert_eq!(
            get_as(&other, &format!("/v1/schedules/{id}/{list}")).await,
            StatusCode::NOT_FOUND
        );
    }
    // A pipeline schedule is as invisible.
    let pipeline = create(
        &app,
        json!({"name": "flow", "cron": "@hourly", "pipeline": two_steps(1)}),
    )
    .await;
    let flow = pipeline["id"].as_str().unwrap();
    for path in ["", "/history"] {
        assert_eq!(
            get_as(&other, &format!("/v1/schedules/{flow}{path}")).await,
            StatusCode::NOT_FOUND
        );
    }
    for action in ["pause", "resume"] {
        let (status, _) = app
            .post_as(&other, &format!("/v1/schedules/{id}/{action}"), &json!({}))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{action}");
    }
    let status = app
        .client
        .delete(app.url(&format!("/v1/schedules/{id}")))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::NOT_FOUND);
    let response = app
        .client
        .get(app.url("/v1/schedules"))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    let list: Value = response.json().await.unwrap();
    assert!(list["schedules"].as_array().unwrap().is_empty());

    // A read key lists and reads, and changes nothing.
    let (status, created) = app.post("/v1/keys", &json!({"role": "read"})).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let read = created["key"].as_str().unwrap();
    assert_eq!(
        get_as(read, &format!("/v1/schedules/{id}")).await,
        StatusCode::OK
    );
    let (status, _) = app
        .post_as(read, &format!("/v1/schedules/{id}/pause"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = app
        .post_as(
            read,
            "/v1/schedules",
            &json!({"name": "theirs", "cron": "@hourly", "job": {"kind": "canary"}}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (_, one) = app.get(&format!("/v1/schedules/{id}")).await;
    assert_eq!(one["paused"], false);
}

/// A schedule that fires every second for 5 seconds, with two workers (each running the
/// maintenance, one leading) and a second firer racing the leader: exactly 5 jobs, one per
/// firing second, each run to success.
#[tokio::test]
async fn a_schedule_firing_every_second_for_five_seconds_makes_exactly_five_jobs() {
    let mut app = TestApp::spawn().await;
    app.start_worker(4).await;
    app.start_worker(4).await;
    let (start, cron) = five_seconds_soon().await;
    let schedule = create(
        &app,
        json!({"name": "every-second", "cron": cron, "overlap": "allow",
               "job": {"kind": "canary", "payload": {}}}),
    )
    .await;
    let id = schedule["id"].as_str().unwrap().to_owned();
    assert_eq!(times(&schedule["next_fires"])[0], start);

    // Another firer, as a second leader would be, racing the one the workers elected.
    let (racer_made, _) = race_the_leader(&app).await;

    let jobs = history(&app, &id).await;
    let expected = one_per_second(&jobs, "schedule_fire_at", start);
    assert!(racer_made <= 5);
    for job in &jobs {
        assert_eq!(job["schedule_id"], id.as_str());
        let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
        app.wait_status(id, &["succeeded"], Duration::from_secs(30))
            .await;
    }
    let (_, schedule) = app.get(&format!("/v1/schedules/{id}")).await;
    assert_eq!(
        schedule["last_fired_at"]
            .as_str()
            .unwrap()
            .parse::<DateTime<Utc>>()
            .unwrap(),
        expected[4]
    );
}

/// Overlap `skip`: a schedule firing every second whose job runs for seconds makes no second
/// job while it runs, and counts the skipped firings.
#[tokio::test]
async fn overlap_skip_makes_no_second_job_while_one_runs() {
    let mut app = TestApp::spawn().await;
    app.start_worker(4).await;
    let schedule = create(
        &app,
        json!({"name": "slow", "cron": "* * * * * *",
               "job": {"kind": "canary", "payload": {"steps": 100, "step_ms": 100}}}),
    )
    .await;
    let id = schedule["id"].as_str().unwrap().to_owned();
    wait_for("a first job", Duration::from_secs(10), async || {
        !history(&app, &id).await.is_empty()
    })
    .await;
    let first: Uuid = history(&app, &id).await[0]["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    app.wait_status(first, &["running"], Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let jobs = history(&app, &id).await;
    assert_eq!(jobs.len(), 1, "a second job while the first ran: {jobs:#?}");
    let (_, schedule) = app.get(&format!("/v1/schedules/{id}")).await;
    assert!(schedule["skipped"].as_i64().unwrap() >= 2, "{schedule}");
    assert_eq!(app.job(first).await["status"], "running");

    // Once it ended, the next firing makes a job again.
    let (status, _) = app
        .post(&format!("/v1/jobs/{first}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    wait_for(
        "a job after the first ended",
        Duration::from_secs(15),
        async || history(&app, &id).await.len() >= 2,
    )
    .await;
    let (status, _) = app
        .post(&format!("/v1/schedules/{id}/pause"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
}

/// After a downtime of an hour (the schedules' `next_fire_at` an hour back): `run_once` makes
/// one job, `skip` none; both next fire in the future.
#[tokio::test]
async fn misfires_after_downtime_run_once_or_skip() {
    let mut app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for misfire in ["run_once", "skip"] {
        let schedule = create(
            &app,
            json!({"name": misfire, "cron": "0 * * * *", "misfire": misfire, "paused": true,
                   "job": {"kind": "canary"}}),
        )
        .await;
        ids.push(schedule["id"].as_str().unwrap().to_owned());
    }
    // The workers were down for the last hour's firings.
    sqlx::query(
        "UPDATE schedules SET paused = false,
                next_fire_at = date_trunc('hour', now()) - interval '1 hour'",
    )
    .execute(app.pool())
    .await
    .unwrap();
    let before = Utc::now();
    app.start_worker(2).await;
    let (run_once, skip) = (&ids[0], &ids[1]);
    wait_for("the run_once job", Duration::from_secs(10), async || {
        history(&app, run_once).await.len() == 1
    })
    .await;
    wait_for(
        "the skip schedule moved on",
        Duration::from_secs(10),
        async || app.get(&format!("/v1/schedules/{skip}")).await.1["skipped"] == 1,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    assert_eq!(
        history(&app, run_once).await.len(),
        1,
        "one job, not one per missed firing"
    );
    assert!(history(&app, skip).await.is_empty());
    for id in &ids {
        let (_, schedule) = app.get(&format!("/v1/schedules/{id}")).await;
        let next: DateTime<Utc> = schedule["next_fire_at"].as_str().unwrap().parse().unwrap();
        assert!(next > before, "{schedule}");
    }
    let job: Uuid = history(&app, run_once).await[0]["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    app.wait_status(job, &["succeeded"], Duration::from_secs(30))
        .await;
}

/// A schedule starting a two-step pipeline every second for 5 seconds, with two workers and a
/// second firer racing the leader: exactly 5 pipelines, one per firing second, each run to
/// success; the history lists them.
#[tokio::test]
async fn a_pipeline_schedule_with_racing_leaders_starts_one_pipeline_per_firing() {
    let mut app = TestApp::spawn().await;
    app.start_worker(4).await;
    app.start_worker(4).await;
    let (start, cron) = five_seconds_soon().await;
    let schedule = create(
        &app,
        json!({"name": "flow", "cron": cron, "overlap": "allow", "pipeline": two_steps(1)}),
    )
    .await;
    let id = schedule["id"].as_str().unwrap().to_owned();
    assert!(schedule["job"].is_null());
    assert_eq!(
        schedule["pipeline"]["name"], "flow",
        "named after the schedule"
    );
    assert_eq!(schedule["pipeline"]["steps"][1]["needs"], json!(["first"]));

    let (_, racer_made) = race_the_leader(&app).await;

    let made = firings(&app, &id).await;
    assert!(made.iter().all(|f| f["made"] == "pipeline"), "{made:#?}");
    one_per_second(&made, "fire_at", start);
    assert!(racer_made <= 5);
    assert!(
        history(&app, &id).await.is_empty(),
        "no job of the schedule's own"
    );
    for firing in &made {
        let pipeline = firing["pipeline_id"].as_str().unwrap();
        wait_for(
            "the pipeline's success",
            Duration::from_secs(30),
            async || app.get(&format!("/v1/pipelines/{pipeline}")).await.1["status"] == "succeeded",
        )
        .await;
        let (_, pipeline) = app.get(&format!("/v1/pipelines/{pipeline}")).await;
        assert_eq!(pipeline["schedule_id"], id.as_str());
        assert_eq!(pipeline["steps"].as_array().unwrap().len(), 2);
    }
}

/// Overlap `skip` for a pipeline: while its pipeline runs (a 5-second first step), the
/// schedule's firings make nothing, and its history says why.
#[tokio::test]
async fn a_pipeline_schedule_skips_while_its_pipeline_runs() {
    let mut app = TestApp::spawn().await;
    app.start_worker(4).await;
    let schedule = create(
        &app,
        json!({"name": "slow-flow", "cron": "* * * * * *", "pipeline": two_steps(50)}),
    )
    .await;
    let id = schedule["id"].as_str().unwrap().to_owned();
    wait_for("two skipped firings", Duration::from_secs(15), async || {
        firings(&app, &id)
            .await
            .iter()
            .filter(|f| f["made"] == "skipped")
            .count()
            >= 2
    })
    .await;
    let (status, _) = app
        .post(&format!("/v1/schedules/{id}/pause"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);

    let made = firings(&app, &id).await;
    let pipelines: Vec<&Value> = made.iter().filter(|f| f["made"] == "pipeline").collect();
    assert_eq!(
        pipelines.len(),
        1,
        "a second pipeline while one ran: {made:#?}"
    );
    assert_eq!(pipelines[0]["status"], "running");
    for skipped in made.iter().filter(|f| f["made"] == "skipped") {
        assert_eq!(skipped["status"], "skipped");
        assert_eq!(
            skipped["reason"],
            "the previous firing's pipeline had not ended (overlap: skip)"
        );
        assert!(skipped["pipeline_id"].is_null());
    }
    let (_, schedule) = app.get(&format!("/v1/schedules/{id}")).await;
    assert_eq!(
        schedule["skipped"].as_u64().unwrap() as usize,
        made.len() - 1
    );
}

/// A schedule naming a dataset, in its job or in a step of its pipeline, paused or not, holds
/// it as a live job does: the dataset was deleted under it, and every later firing failed.
#[tokio::test]
async fn a_dataset_a_schedule_names_is_not_deleted() {
    let app = TestApp::spawn().await;
    let dataset = app.upload_dataset("nightly.csv", b"id\n1\n").await;
    let path = format!("/v1/datasets/{dataset}");
    let import = json!({"dataset_id": dataset, "target": {"table": "nightly"}});
    let bodies = [
        json!({"name": "job", "cron": "@daily", "job": {"kind": "import", "payload": import}}),
        json!({"name": "flow", "cron": "@daily", "pipeline": {"steps": [
            {"name": "first", "kind": "canary", "payload": {"steps": 1}},
            {"name": "load", "kind": "import", "needs": ["first"], "payload": import}]}}),
    ];
    for body in bodies {
        let id = create(&app, body).await["id"].as_str().unwrap().to_owned();
        let (status, _) = app
            .post(&format!("/v1/schedules/{id}/pause"), &json!({}))
            .await;
        assert_eq!(status, StatusCode::OK);
        let (status, problem) = app.delete_answered(&path).await;
        assert_eq!(status, StatusCode::CONFLICT);
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains(&id), "the schedule is named: {detail}");
        assert_eq!(
            app.delete(&format!("/v1/schedules/{id}")).await,
            StatusCode::NO_CONTENT
        );
    }
    assert_eq!(app.delete(&path).await, StatusCode::NO_CONTENT);
}

/// A schedule stored before payloads were stored as parsed keeps its id in the spelling it was
/// sent in: `in_use` compares text, so the dataset it imports nightly could be deleted under
/// it. Migration 20261221000001 writes such ids as they parse, and nothing else.
#[tokio::test]
async fn a_schedule_stored_in_another_spelling_holds_its_dataset_once_migrated() {
    let app = TestApp::spawn().await;
    let dataset = app
        .upload_dataset("nightly.csv", b"id\n1\n")
        .await
        .to_string();
    let import = json!({"dataset_id": dataset, "target": {"table": "nightly"}});
    let job =
        json!({"name": "job", "cron": "@daily", "job": {"kind": "import", "payload": import}});
    let (status, collection) = app
        .post("/v1/collections", &json!({"name": "nightly"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{collection}");
    let flow = json!({"name": "flow", "cron": "@daily", "pipeline": {"steps": [
        {"name": "synth", "kind": "synthesis", "payload": {"dataset_id": dataset, "rows": 10}},
        {"name": "index", "kind": "ingest", "needs": ["synth"], "payload": {
            "collection_id": collection["id"],
            "documents": [
                {"dataset_id": dataset, "metadata": {"customer_id": "X"}},
                {"dataset_id": "${steps.synth.outputs.dataset_id}"}]}}]}});
    let mut schedules = Vec::new();
    for body in [job, flow] {
        schedules.push(create(&app, body).await["id"].as_str().unwrap().to_owned());
    }
    // As rows stored before 2426c7b: upper case, braces, urn; a tenant's own field too.
    let upper = dataset.to_uppercase();
    let braced = format!("{{{dataset}}}");
    let urn = format!("urn:uuid:{dataset}");
    let own = "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11";
    sqlx::query(
        "UPDATE schedules SET
           job = jsonb_set(job, '{payload,dataset_id}', to_jsonb($2::text)),
           pipeline = jsonb_set(jsonb_set(jsonb_set(pipeline,
               '{steps,0,payload,dataset_id}', to_jsonb($3::text)),
               '{steps,1,payload,documents,0,dataset_id}', to_jsonb($4::text)),
               '{steps,1,payload,documents,0,metadata,customer_id}', to_jsonb($5::text))
         WHERE tenant_id = $1",
    )
    .bind(app.tenant)
    .bind(&upper)
    .bind(&braced)
    .bind(&urn)
    .bind(own)
    .execute(app.pool())
    .await
    .unwrap();
    let path = format!("/v1/datasets/{dataset}");

    let migration = include_str!("../../../migrations/20261221000001_canonical_payload_ids.sql");
    sqlx::raw_sql(migration).execute(app.pool()).await.unwrap();

    let stored: Vec<(Option<Value>, Option<Value>)> = sqlx::query_as(
        "SELECT job, pipeline FROM schedules WHERE tenant_id = $1 ORDER BY name DESC",
    )
    .bind(app.tenant)
    .fetch_all(app.pool())
    .await
    .unwrap();
    let (job, pipeline) = (stored[0].0.as_ref().unwrap(), stored[1].1.as_ref().unwrap());
    assert_eq!(job["payload"]["dataset_id"], dataset);
    let steps = &pipeline["steps"];
    assert_eq!(steps[0]["payload"]["dataset_id"], dataset);
    let document = &steps[1]["payload"]["documents"][0];
    assert_eq!(document["dataset_id"], dataset);
    assert_eq!(
        document["metadata"]["customer_id"], own,
        "a tenant's field is its own"
    );
    assert_eq!(
        steps[1]["payload"]["documents"][1]["dataset_id"], "${steps.synth.outputs.dataset_id}",
        "a reference stays"
    );
    for id in &schedules {
        let (status, problem) = app.delete_answered(&path).await;
        assert_eq!(status, StatusCode::CONFLICT, "{problem}");
        let detail = problem["detail"].as_str().unwrap();
        assert!(
            detail.contains(id.as_str()),
            "the schedule is named: {detail}"
        );
        assert_eq!(
            app.delete(&format!("/v1/schedules/{id}")).await,
            StatusCode::NO_CONTENT
        );
    }
    assert_eq!(app.delete(&path).await, StatusCode::NO_CONTENT);
}
