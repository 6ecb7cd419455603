//! Bulk cancel and retry: every job of the tenant matching the filter, announced and audited,
//! another tenant's untouched.

use crate::harness::TestApp;
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

async fn count(app: &TestApp, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(app.pool()).await.unwrap()
}

#[tokio::test]
async fn bulk_cancel_and_retry_take_the_matching_jobs_of_the_tenant_only() {
    let app = TestApp::spawn().await;
    let other = app.key_for("umbrella").await;
    let canary = json!({"kind": "canary", "payload": {"steps": 1}});
    let later =
        json!({"kind": "canary", "payload": {"steps": 1}, "run_at": "2099-01-01T00:00:00Z"});
    for _ in 0..5 {
        assert_eq!(app.post("/v1/jobs", &canary).await.0, StatusCode::ACCEPTED);
        assert_eq!(
            app.post_as(&other, "/v1/jobs", &canary).await.0,
            StatusCode::ACCEPTED
        );
    }
    for _ in 0..2 {
        assert_eq!(app.post("/v1/jobs", &later).await.0, StatusCode::ACCEPTED);
    }

    // Only the queued ones of this tenant.
    let (status, result) = app
        .post(
            "/v1/jobs/cancel",
            &json!({"status": ["queued"], "kind": "canary"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{result}");
    assert_eq!(result, json!({"count": 5, "more": false}));
    let tenant = app.tenant;
    let mine = |status: &str| {
        format!("SELECT count(*) FROM jobs WHERE tenant_id = '{tenant}' AND status = '{status}'")
    };
    assert_eq!(count(&app, &mine("cancelled")).await, 5);
    assert_eq!(count(&app, &mine("scheduled")).await, 2);
    let theirs =
        format!("SELECT count(*) FROM jobs WHERE tenant_id <> '{tenant}' AND status = 'queued'");
    assert_eq!(
        count(&app, &theirs).await,
        5,
        "the other tenant's jobs are untouched"
    );
    let audited = format!(
        "SELECT count(*) FROM audit_log WHERE tenant_id = '{tenant}' AND action = 'job.cancel'"
    );
    assert_eq!(count(&app, &audited).await, 5, "one audit row per job");

    // Retry takes failed or cancelled jobs only; refusals name the field.
    let (status, problem) = app
        .post("/v1/jobs/retry", &json!({"status": ["running"]}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "status");
    let (status, problem) = app.post("/v1/jobs/cancel", &json!({"kind": "nope"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "kind");
    let (status, result) = app.post("/v1/jobs/retry", &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{result}");
    assert_eq!(result["count"], 5);
    assert_eq!(count(&app, &mine("queued")).await, 5);

    // Without a filter, cancel takes every live job: the scheduled ones too.
    let (_, result) = app.post("/v1/jobs/cancel", &json!({})).await;
    assert_eq!(result["count"], 7);
    assert_eq!(count(&app, &theirs).await, 5);
}

/// `pipeline_id` takes one pipeline's steps only: the waiting dependents are cancelled with
/// them at once, another pipeline runs on, and another tenant's pipeline id is 404.
#[tokio::test]
async fn bulk_cancel_takes_one_pipelines_steps() {
    let app = TestApp::spawn().await;
    let pipeline = json!({"steps": [
        {"name": "a", "kind": "canary", "payload": {"steps": 1}},
        {"name": "b", "kind": "canary", "payload": {"steps": 1}},
        {"name": "after", "kind": "canary", "needs": ["a", "b"], "payload": {}}]});
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (status, created) = app.post("/v1/pipelines", &pipeline).await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        ids.push(created["id"].as_str().unwrap().to_owned());
    }
    let other = app.key_for("umbrella").await;
    let (status, theirs) = app.post_as(&other, "/v1/pipelines", &pipeline).await;
    assert_eq!(status, StatusCode::CREATED, "{theirs}");

    let (status, problem) = app
        .post("/v1/jobs/cancel", &json!({"pipeline_id": theirs["id"]}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{problem}");
    let (status, result) = app
        .post("/v1/jobs/cancel", &json!({"pipeline_id": ids[0]}))
        .await;
    assert_eq!(status, StatusCode::OK, "{result}");
    assert_eq!(result, json!({"count": 2, "more": false}));

    let (_, first) = app.get(&format!("/v1/pipelines/{}", ids[0])).await;
    let states: Vec<&str> = first["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["cancelled"; 3], "{first}");
    let (_, second) = app.get(&format!("/v1/pipelines/{}", ids[1])).await;
    assert_eq!(second["status"], "running", "{second}");
    let live = format!(
        "SELECT count(*) FROM jobs WHERE pipeline_id IN ('{}', '{}') AND status = 'queued'",
        ids[1],
        theirs["id"].as_str().unwrap()
    );
    assert_eq!(
        count(&app, &live).await,
        4,
        "the other pipelines' steps are untouched"
    );
}

/// `DELETE /v1/jobs/{id}`: a finished job goes with its artifacts and is audited; a live one
/// is 409, another tenant's 404, and neither changes.
#[tokio::test]
async fn a_finished_job_is_deleted_with_its_artifacts_and_a_live_one_is_not() {
    let app = TestApp::spawn().await;
    let other = app.key_for("umbrella").await;
    let canary = json!({"kind": "canary", "payload": {"steps": 1}});
    let (_, live) = app.post("/v1/jobs", &canary).await;
    let (_, done) = app.post("/v1/jobs", &canary).await;
    let (live, done) = (live["id"].as_str().unwrap(), done["id"].as_str().unwrap());
    let (status, _) = app
        .post(&format!("/v1/jobs/{done}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let objects = &app.server.as_ref().unwrap().state.objects;
    let done_id: uuid::Uuid = done.parse().unwrap();
    objects
        .put_artifact(done_id, "report.json", b"{}")
        .await
        .unwrap();

    assert_eq!(
        app.delete(&format!("/v1/jobs/{live}")).await,
        StatusCode::CONFLICT
    );
    let foreign = app
        .client
        .delete(app.url(&format!("/v1/jobs/{done}")))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), StatusCode::NOT_FOUND);
    assert_eq!(count(&app, "SELECT count(*) FROM jobs").await, 2);

    assert_eq!(
        app.delete(&format!("/v1/jobs/{done}")).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.get(&format!("/v1/jobs/{done}")).await.0,
        StatusCode::NOT_FOUND
    );
    assert!(objects
        .read_artifact(done_id, "report.json")
        .await
        .unwrap()
        .is_none());
    let audited = format!(
        "SELECT count(*) FROM audit_log WHERE action = 'job.delete' AND target_id = '{done}'"
    );
    assert_eq!(count(&app, &audited).await, 1);
    assert_eq!(
        app.delete(&format!("/v1/jobs/{done}")).await,
        StatusCode::NOT_FOUND
    );
    // Its events are gone from the tenant's stream too (they were replayed from the start);
    // the other job's stay.
    let replayed = app
        .sse("/v1/events", Some("0"))
        .await
        .collect(Duration::from_secs(1))
        .await;
    let of = |id: &str| replayed.iter().filter(|m| m.data["job_id"] == id).count();
    assert_eq!(of(done), 0, "{replayed:?}");
    assert!(of(live) > 0, "{replayed:?}");
}

/// A bulk retry of a pipeline's step takes the pipeline's lock before it changes the step's
/// job, and resumes the pipeline in the same transaction, as every change of a pipeline does.
/// It changed the job first and resumed alone later: a cancel of the pipeline made in between,
/// which saw the retried job and cancelled it, was undone by the resumption (the pipeline
/// running again, its dependents started) after it had answered.
#[tokio::test]
async fn a_bulk_retry_takes_its_pipelines_lock_before_its_jobs() {
    let app = TestApp::spawn().await;
    // `b` keeps the pipeline running once `a` is cancelled (and `after` with it).
    let pipeline = json!({"steps": [
        {"name": "a", "kind": "canary", "payload": {"steps": 1}},
        {"name": "b", "kind": "canary", "payload": {"steps": 1}},
        {"name": "after", "kind": "canary", "needs": ["a"], "payload": {}}]});
    let (status, created) = app.post("/v1/pipelines", &pipeline).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id: uuid::Uuid = created["id"].as_str().unwrap().parse().unwrap();
    let step = created["steps"][0]["job_id"].as_str().unwrap().to_owned();
    let (status, _) = app
        .post(&format!("/v1/jobs/{step}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let step_status =
        format!("SELECT count(*) FROM jobs WHERE id = '{step}' AND status = 'queued'");

    // The pipeline's lock held, as a cancel of it would hold it.
    let mut held = app.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM pipelines WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut *held)
        .await
        .unwrap();
    let retried = tokio::spawn({
        let request = app
            .client
            .post(app.url("/v1/jobs/retry"))
            .bearer_auth(&app.key)
            .json(&json!({"pipeline_id": id}));
        async move { request.send().await.unwrap().status() }
    });
    // Until the retry waits on the pipeline's lock: before or after it changed the job.
    let waiting = "SELECT count(*) FROM pg_stat_activity
                   WHERE datname = current_database() AND wait_event_type = 'Lock'";
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while count(&app, waiting).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the retry never waited"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        count(&app, &step_status).await,
        0,
        "the retry changed the step's job without its pipeline's lock"
    );
    // The cancel of the running pipeline goes first; the retry then runs the step again and
    // resumes the pipeline.
    let (_, running) = app.get(&format!("/v1/pipelines/{id}")).await;
    assert_eq!(running["status"], "running", "{running}");
    let validate = |_: &str, payload: &serde_json::Value| Ok(payload.clone());
    shared::pipelines::cancel(&mut held, app.tenant, id, &validate)
        .await
        .unwrap();
    held.commit().await.unwrap();
    assert_eq!(retried.await.unwrap(), StatusCode::OK);
    assert_eq!(count(&app, &step_status).await, 1);
    let (_, after) = app.get(&format!("/v1/pipelines/{id}")).await;
    assert_eq!(after["status"], "running", "{after}");
}
