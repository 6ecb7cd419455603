//! Roles on keys (`admin`, `write`, `read`): each role's allowed and refused routes, refusals
//! changing nothing; and the audit log: one row per change with its key, target, request id
//! and body hash, patches with their statement, rows no one can rewrite, tenants apart.

use crate::harness::{TestApp, Warehouse};
use conveyor_api::audit::sha256_hex;
use reqwest::{header, Method, StatusCode};
use serde_json::{json, Value};
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

/// A request as the tests send it: JSON bodies as exact bytes, so their hash is known.
#[derive(Clone, Debug)]
struct Call {
    method: Method,
    path: String,
    body: Option<Vec<u8>>,
    /// `application/json` unless false (an upload).
    json: bool,
}

impl Call {
    fn get(path: impl Into<String>) -> Self {
        Self {
            method: Method::GET,
            path: path.into(),
            body: None,
            json: true,
        }
    }

    fn delete(path: impl Into<String>) -> Self {
        Self {
            method: Method::DELETE,
            ..Self::get(path)
        }
    }

    fn post(path: impl Into<String>, body: Value) -> Self {
        Self {
            method: Method::POST,
            body: Some(serde_json::to_vec(&body).unwrap()),
            ..Self::get(path)
        }
    }

    fn upload(name: &str, bytes: &[u8]) -> Self {
        Self {
            method: Method::POST,
            path: format!("/v1/datasets?name={name}"),
            body: Some(bytes.to_vec()),
            json: false,
        }
    }

    fn sha256(&self) -> String {
        sha256_hex(self.body.as_deref().unwrap_or_default())
    }
}

struct Answer {
    status: StatusCode,
    body: Value,
    content_type: String,
    request_id: String,
}

async fn send(app: &TestApp, key: &str, call: &Call) -> Answer {
    let mut request = app
        .client
        .request(call.method.clone(), app.url(&call.path))
        .bearer_auth(key);
    if let Some(body) = &call.body {
        if call.json {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        request = request.body(body.clone());
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let header = |name: header::HeaderName| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let content_type = header(header::CONTENT_TYPE);
    let request_id = header(header::HeaderName::from_static("x-request-id"));
    let body = response.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        body,
        content_type,
        request_id,
    }
}

/// A new key of the app's tenant with `role`, made by its admin key: (id, key).
async fn key_with_role(app: &TestApp, role: &str) -> (Uuid, String) {
    let created = send(
        app,
        &app.key,
        &Call::post("/v1/keys", json!({"role": role})),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    (
        created.body["id"].as_str().unwrap().parse().unwrap(),
        created.body["key"].as_str().unwrap().to_owned(),
    )
}

/// What the app's tenant holds, to show a refused request changed nothing.
async fn snapshot(pool: &PgPool) -> Vec<String> {
    let mut state = Vec::new();
    // A key's first use sets its `last_used_at`: not a change it made.
    for (table, row) in [
        ("jobs", "t"),
        ("datasets", "t"),
        ("connections", "t"),
        ("collections", "t"),
        ("api_keys", "(t.id, t.role, t.name, t.revoked_at)"),
        ("audit_log", "t"),
        ("sessions", "t"),
    ] {
        let rows: String = sqlx::query_scalar(&format!(
            "SELECT coalesce(string_agg(md5({row}::text), ',' ORDER BY md5({row}::text)), '')
             FROM {table} t"
        ))
        .fetch_one(pool)
        .await
        .unwrap();
        state.push(format!("{table}: {rows}"));
    }
    state
}

/// What a write route needs to exist.
struct Fixtures {
    job: Uuid,
    dataset: Uuid,
    connection: Uuid,
    collection: Uuid,
    warehouse_url: String,
    /// Dropped (with its database) when the fixtures are.
    _warehouse: Warehouse,
}

async fn fixtures(app: &TestApp, tag: &str) -> Fixtures {
    let job = app.submit_canary(json!({"steps": 1})).await; // no worker: it stays queued
    let dataset = app
        .upload_dataset(&format!("{tag}.csv"), b"id,name\n1,a\n2,b\n")
        .await;
    let warehouse = app.warehouse().await;
    let connection = send(
        app,
        &app.key,
        &Call::post(
            "/v1/connections",
            json!({"name": format!("{tag}-wh"), "url": warehouse.url}),
        ),
    )
    .await;
    assert_eq!(
        connection.status,
        StatusCode::CREATED,
        "{}",
        connection.body
    );
    let collection = send(
        app,
        &app.key,
        &Call::post("/v1/collections", json!({"name": format!("{tag}-docs")})),
    )
    .await;
    assert_eq!(
        collection.status,
        StatusCode::CREATED,
        "{}",
        collection.body
    );
    let id = |v: &Value| v["id"].as_str().unwrap().parse().unwrap();
    Fixtures {
        job,
        dataset,
        connection: id(&connection.body),
        collection: id(&collection.body),
        warehouse_url: warehouse.url.clone(),
        _warehouse: warehouse,
    }
}

/// Every route that changes something, in an order in which each succeeds: (call, status).
fn write_routes(f: &Fixtures, tag: &str) -> Vec<(Call, StatusCode)> {
    vec![
        (
            Call::post(
                "/v1/jobs",
                json!({"kind": "canary", "payload": {"steps": 1}}),
            ),
            StatusCode::ACCEPTED,
        ),
        (
            Call::post(
                "/v1/jobs/batch",
                json!({"jobs": [{"kind": "canary"}, {"kind": "canary", "payload": {"steps": 2}}]}),
            ),
            StatusCode::ACCEPTED,
        ),
        (
            Call::post(format!("/v1/jobs/{}/cancel", f.job), json!({})),
            StatusCode::OK,
        ),
        (
            Call::post(format!("/v1/jobs/{}/retry", f.job), json!({})),
            StatusCode::ACCEPTED,
        ),
        (
            Call::upload(&format!("{tag}-more.csv"), b"id\n1\n"),
            StatusCode::CREATED,
        ),
        (
            Call::delete(format!("/v1/datasets/{}", f.dataset)),
            StatusCode::NO_CONTENT,
        ),
        (
            Call::post(
                "/v1/connections",
                json!({"name": format!("{tag}-second"), "url": f.warehouse_url}),
            ),
            StatusCode::CREATED,
        ),
        (
            Call::delete(format!("/v1/connections/{}", f.connection)),
            StatusCode::NO_CONTENT,
        ),
        (
            Call::post(
                "/v1/collections",
                json!({"name": format!("{tag}-more-docs")}),
            ),
            StatusCode::CREATED,
        ),
        (
            Call::delete(format!("/v1/collections/{}", f.collection)),
            StatusCode::NO_CONTENT,
        ),
        (
            Call::post(
                "/v1/patches/preflight",
                json!({"sql": "UPDATE role_items SET val = 0 WHERE id = 1", "mode": "dry_run"}),
            ),
            StatusCode::OK,
        ),
    ]
}

/// Routes only admin keys may use.
fn admin_routes(some_key: Uuid) -> Vec<Call> {
    vec![
        Call::get("/v1/keys"),
        Call::post("/v1/keys", json!({"role": "read"})),
        Call::delete(format!("/v1/keys/{some_key}")),
        Call::get("/v1/audit"),
    ]
}

/// Every read, each of which a read key may make.
fn read_routes(f: &Fixtures) -> Vec<Call> {
    vec![
        Call::get("/v1/jobs"),
        Call::get(format!("/v1/jobs/{}", f.job)),
        Call::get("/v1/datasets"),
        Call::get(format!("/v1/datasets/{}", f.dataset)),
        Call::get(format!("/v1/datasets/{}/download", f.dataset)),
        Call::get("/v1/connections"),
        Call::get("/v1/collections"),
        Call::get(format!("/v1/collections/{}", f.collection)),
        Call::post(
            format!("/v1/collections/{}/search", f.collection),
            json!({"query": "anything", "mode": "keyword"}),
        ),
        Call::get("/v1/queues"),
        Call::get("/v1/workers"),
        Call::get("/v1/queues/history"),
        Call::get("/v1/session"),
    ]
}

async fn seed_patch_table(app: &TestApp) {
    let target = PgPool::connect(&app.target_url()).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE role_items (id bigint PRIMARY KEY, val int NOT NULL);
         INSERT INTO role_items SELECT i, i FROM generate_series(1, 50) i;",
    )
    .execute(&target)
    .await
    .unwrap();
}

#[tokio::test]
async fn each_role_gets_its_routes_and_a_403_naming_the_role_for_the_rest() {
    let app = TestApp::spawn().await;
    seed_patch_table(&app).await;
    let (read_id, read) = key_with_role(&app, "read").await;
    let (write_id, write) = key_with_role(&app, "write").await;
    // `member`, the former name of write keys, still makes one.
    let member = send(
        &app,
        &app.key,
        &Call::post("/v1/keys", json!({"role": "member"})),
    )
    .await;
    assert_eq!(member.body["role"], "write", "{}", member.body);
    let keys = send(&app, &app.key, &Call::get("/v1/keys")).await;
    let roles: Vec<&str> = keys.body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["admin", "read", "write", "write"]);

    let f = fixtures(&app, "a").await;
    let writes = write_routes(&f, "a");
    let job_before = app.job(f.job).await;

    // A read key: 403 on every change and on the admin routes, and nothing changes.
    let before = snapshot(app.pool()).await;
    for (call, _) in &writes {
        let answer = send(&app, &read, call).await;
        assert_eq!(
            answer.status,
            StatusCode::FORBIDDEN,
            "{call:?}: {}",
            answer.body
        );
        assert_eq!(answer.content_type, "application/problem+json", "{call:?}");
        assert_eq!(
            answer.body["detail"], "needs a write key; this key is read",
            "{call:?}"
        );
        assert_eq!(answer.body["errors"][0]["field"], "role", "{call:?}");
    }
    for call in admin_routes(write_id) {
        let answer = send(&app, &read, &call).await;
        assert_eq!(
            answer.status,
            StatusCode::FORBIDDEN,
            "{call:?}: {}",
            answer.body
        );
        assert_eq!(
            answer.body["detail"], "needs an admin key; this key is read",
            "{call:?}"
        );
    }
    // Refused before the body is read: an invalid body is still a 403, not a 422.
    let invalid = Call::post("/v1/jobs", json!({"kind": "no-such-kind"}));
    assert_eq!(
        send(&app, &read, &invalid).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        snapshot(app.pool()).await,
        before,
        "a refused request changed something"
    );
    assert_eq!(app.job(f.job).await, job_before);

    // ...and every read.
    for call in read_routes(&f) {
        let answer = send(&app, &read, &call).await;
        assert_eq!(answer.status, StatusCode::OK, "{call:?}: {}", answer.body);
    }
    let session = send(&app, &read, &Call::get("/v1/session")).await;
    assert_eq!(
        (&session.body["role"], &session.body["key_id"]),
        (&json!("read"), &json!(read_id.to_string()))
    );
    let stream = app
        .client
        .get(app.url("/v1/events"))
        .bearer_auth(&read)
        .send()
        .await
        .unwrap();
    assert_eq!(
        stream.status(),
        StatusCode::OK,
        "a read key follows the event stream"
    );
    drop(stream);

    // A write key: every change, but not keys or the audit log.
    for (call, status) in &writes {
        let answer = send(&app, &write, call).await;
        assert_eq!(answer.status, *status, "{call:?}: {}", answer.body);
    }
    let before = snapshot(app.pool()).await;
    for call in admin_routes(read_id) {
        let answer = send(&app, &write, &call).await;
        assert_eq!(
            answer.status,
            StatusCode::FORBIDDEN,
            "{call:?}: {}",
            answer.body
        );
        assert_eq!(
            answer.body["detail"], "needs an admin key; this key is write",
            "{call:?}"
        );
    }
    assert_eq!(snapshot(app.pool()).await, before);
    let session = send(&app, &write, &Call::get("/v1/session")).await;
    assert_eq!(session.body["role"], "write");

    // An admin key: everything.
    let f = fixtures(&app, "b").await;
    for call in read_routes(&f) {
        let answer = send(&app, &app.key, &call).await;
        assert_eq!(answer.status, StatusCode::OK, "{call:?}: {}", answer.body);
    }
    for (call, status) in write_routes(&f, "b") {
        let answer = send(&app, &app.key, &call).await;
        assert_eq!(answer.status, status, "{call:?}: {}", answer.body);
    }
    for (call, status) in admin_routes(read_id).into_iter().zip([
        StatusCode::OK,
        StatusCode::CREATED,
        StatusCode::NO_CONTENT,
        StatusCode::OK,
    ]) {
        let answer = send(&app, &app.key, &call).await;
        assert_eq!(answer.status, status, "{call:?}: {}", answer.body);
    }
    // The read key was just revoked by the admin.
    let answer = send(&app, &read, &Call::get("/v1/jobs")).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);

    // No key role the API does not know: refused by name.
    let answer = send(
        &app,
        &app.key,
        &Call::post("/v1/keys", json!({"role": "viewer"})),
    )
    .await;
    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(answer.body["errors"][0]["field"], "role", "{}", answer.body);
}

/// The tenant's audit rows, newest first, read with `key` (all pages, `limit` at a time).
async fn audit_rows(app: &TestApp, key: &str, query: &str, limit: usize) -> Vec<Value> {
    let mut rows = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/audit?limit={limit}{query}");
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let page = send(app, key, &Call::get(path)).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        let entries = page.body["entries"].as_array().unwrap();
        assert!(entries.len() <= limit);
        rows.extend(entries.iter().cloned());
        match page.body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return rows,
        }
    }
}

/// The row for `request_id`, which must be the only one.
fn row_of<'a>(rows: &'a [Value], request_id: &str) -> &'a Value {
    let found: Vec<&Value> = rows
        .iter()
        .filter(|r| r["request_id"] == request_id)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one row for request {request_id}: {rows:#?}"
    );
    found[0]
}

#[tokio::test]
async fn every_change_writes_one_audit_row_with_its_key_target_request_and_body_hash() {
    let app = TestApp::spawn().await;
    seed_patch_table(&app).await;
    let (write_id, write) = key_with_role(&app, "write").await;
    let admin_id: Uuid = sqlx::query_scalar("SELECT id FROM api_keys WHERE role = 'admin'")
        .fetch_one(app.pool())
        .await
        .unwrap();
    let f = fixtures(&app, "a").await;
    let start = audit_rows(&app, &app.key, "", 500).await.len();

    // (call, key, key id, action, target: `Some(None)` = the created id in the answer).
    let mut expected: Vec<(Answer, Call, Uuid, &str, Option<String>)> = Vec::new();
    for (call, status) in write_routes(&f, "a") {
        let answer = send(&app, &write, &call).await;
        assert_eq!(answer.status, status, "{call:?}: {}", answer.body);
        let id = |v: &Value| v["id"].as_str().map(str::to_owned);
        let (action, target) = match (call.method.as_str(), call.path.as_str()) {
            ("POST", "/v1/jobs") => ("job.submit", id(&answer.body)),
            ("POST", "/v1/jobs/batch") => ("job.submit", None),
            ("POST", p) if p.ends_with("/cancel") => ("job.cancel", Some(f.job.to_string())),
            ("POST", p) if p.ends_with("/retry") => ("job.retry", Some(f.job.to_string())),
            ("POST", p) if p.starts_with("/v1/datasets") => ("dataset.upload", id(&answer.body)),
            ("DELETE", p) if p.starts_with("/v1/datasets") => {
                ("dataset.delete", Some(f.dataset.to_string()))
            }
            ("POST", "/v1/connections") => ("connection.create", id(&answer.body)),
            ("DELETE", p) if p.starts_with("/v1/connections") => {
                ("connection.delete", Some(f.connection.to_string()))
            }
            ("POST", "/v1/collections") => ("collection.create", id(&answer.body)),
            ("DELETE", p) if p.starts_with("/v1/collections") => {
                ("collection.delete", Some(f.collection.to_string()))
            }
            ("POST", "/v1/patches/preflight") => continue, // changes nothing
            other => panic!("unexpected route {other:?}"),
        };
        expected.push((answer, call, write_id, action, target));
    }
    let created = send(
        &app,
        &app.key,
        &Call::post("/v1/keys", json!({"role": "read", "name": "ro"})),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let new_key = created.body["id"].as_str().unwrap().to_owned();
    let new_secret = created.body["key"].as_str().unwrap().to_owned();
    let call = Call::post("/v1/keys", json!({"role": "read", "name": "ro"}));
    expected.push((created, call, admin_id, "key.create", Some(new_key.clone())));
    let call = Call::delete(format!("/v1/keys/{new_key}"));
    let revoked = send(&app, &app.key, &call).await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    expected.push((revoked, call, admin_id, "key.revoke", Some(new_key.clone())));
    // Revoking it again changes nothing: no row.
    assert_eq!(
        send(&app, &app.key, &call_again(&new_key)).await.status,
        StatusCode::NO_CONTENT
    );
    drop(new_secret);

    // Sign-in and sign-out of a dashboard session.
    let sign_in = app
        .client
        .post(app.url("/v1/session"))
        .header("X-Conveyor-CSRF", "1")
        .json(&json!({"api_key": write}))
        .send()
        .await
        .unwrap();
    assert_eq!(sign_in.status(), StatusCode::CREATED);
    let sign_in_request = sign_in.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let cookie = sign_in.headers()[header::SET_COOKIE].to_str().unwrap();
    let cookie = cookie.split(';').next().unwrap().to_owned();
    let info: Value = sign_in.json().await.unwrap();
    assert_eq!(info["role"], "write", "{info}");
    let sign_out = app
        .client
        .delete(app.url("/v1/session"))
        .header("X-Conveyor-CSRF", "1")
        .header(header::COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(sign_out.status(), StatusCode::NO_CONTENT);
    let sign_out_request = sign_out.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();

    // Refused requests write nothing: an unknown job, a refused payload, a conflict, a read
    // key, a repeated idempotency key.
    let (_, read) = key_with_role(&app, "read").await;
    let read_key_rows = 1; // the key.create row of that key
    let keyed = Call::post(
        "/v1/jobs",
        json!({"kind": "canary", "idempotency_key": "once"}),
    );
    let first = send(&app, &write, &keyed).await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    let first_id = first.body["id"].as_str().unwrap().to_owned();
    let before_refusals = audit_rows(&app, &app.key, "", 500).await.len();
    for (key, call, status) in [
        (
            &write,
            Call::post(format!("/v1/jobs/{}/cancel", Uuid::now_v7()), json!({})),
            StatusCode::NOT_FOUND,
        ),
        (
            &write,
            Call::post(
                "/v1/jobs",
                json!({"kind": "canary", "payload": {"steps": -1}}),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            &write,
            Call::post(format!("/v1/jobs/{}/retry", f.job), json!({})),
            StatusCode::CONFLICT,
        ),
        (
            &read,
            Call::upload("x.csv", b"id\n1\n"),
            StatusCode::FORBIDDEN,
        ),
        (&write, keyed.clone(), StatusCode::OK),
    ] {
        let answer = send(&app, key, &call).await;
        assert_eq!(answer.status, status, "{call:?}: {}", answer.body);
    }
    let rows = audit_rows(&app, &app.key, "", 500).await;
    assert_eq!(rows.len(), before_refusals, "refused requests wrote rows");

    // The rows, newest first: the refusals' none, then sign-out ... the first submission.
    let ours = &rows[..rows.len() - start];
    let submitted_once = row_of(ours, &first.request_id);
    assert_eq!(submitted_once["target_id"], first_id);
    assert_eq!(
        ours.len(),
        expected.len() + 1 /* batch */ + 2 /* session */ + read_key_rows + 1 /* once */
    );
    for (answer, call, key, action, target) in &expected {
        if call.path == "/v1/jobs/batch" {
            let batch: Vec<&Value> = ours
                .iter()
                .filter(|r| r["request_id"] == answer.request_id)
                .collect();
            let jobs = answer.body["jobs"].as_array().unwrap();
            assert_eq!(batch.len(), 2, "one row per job of the batch");
            for (i, row) in batch.iter().rev().enumerate() {
                assert_eq!(row["action"], "job.submit");
                assert_eq!(row["target_id"], jobs[i]["id"]);
                assert_eq!(row["detail"]["index"], i);
                assert_eq!(row["detail"]["kind"], "canary");
                assert_eq!(row["payload_sha256"], call.sha256());
                assert_eq!(row["key_id"], key.to_string());
            }
            continue;
        }
        let row = row_of(ours, &answer.request_id);
        assert_eq!(row["action"], *action, "{call:?}: {row}");
        assert_eq!(row["key_id"], key.to_string(), "{call:?}: {row}");
        assert_eq!(
            row["target_id"].as_str(),
            target.as_deref(),
            "{call:?}: {row}"
        );
        assert!(row["at"].is_string());
        let hash = &row["payload_sha256"];
        match *action {
            // The file's own hash.
            "job.submit" | "collection.create" | "key.create" | "dataset.upload" => {
                assert_eq!(*hash, call.sha256(), "{call:?}: {row}")
            }
            // The body holds a credential: no hash of it.
            _ => assert!(hash.is_null(), "{call:?}: {row}"),
        }
        assert!(row["statement"].is_null());
    }
    let row = row_of(ours, &sign_in_request);
    assert_eq!(
        (&row["action"], &row["key_id"], &row["target_id"]),
        (
            &json!("session.sign_in"),
            &json!(write_id),
            &json!(write_id)
        )
    );
    let row = row_of(ours, &sign_out_request);
    assert_eq!(
        (&row["action"], &row["key_id"]),
        (&json!("session.sign_out"), &json!(write_id))
    );
    // Newest first, ids decreasing.
    let ids: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "{ids:?}");
    // Pages of 3 give the same rows as one page.
    let paged = audit_rows(&app, &app.key, "", 3).await;
    assert_eq!(paged, rows);

    // Filters.
    let submits = audit_rows(&app, &app.key, "&action=job.submit", 500).await;
    assert_eq!(submits.len(), 1 + 1 + 2 + 1, "{submits:#?}"); // fixture, single, batch, once
    assert!(submits.iter().all(|r| r["action"] == "job.submit"));
    let by_write = audit_rows(&app, &app.key, &format!("&key_id={write_id}"), 500).await;
    assert!(by_write.iter().all(|r| r["key_id"] == write_id.to_string()));
    assert_eq!(by_write.len(), ours.len() - 2 - read_key_rows);
    let on_job = audit_rows(&app, &app.key, &format!("&target_id={}", f.job), 500).await;
    let actions: Vec<&str> = on_job
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["job.retry", "job.cancel", "job.submit"]);
    let newest = &rows[0]["at"].as_str().unwrap();
    let after_all = audit_rows(
        &app,
        &app.key,
        &format!("&from={}", urlencode("2999-01-01T00:00:00Z")),
        500,
    )
    .await;
    assert!(after_all.is_empty());
    let up_to_now = audit_rows(
        &app,
        &app.key,
        &format!(
            "&from=2000-01-01T00:00:00Z&to={}",
            urlencode(&(chrono::Utc::now() + chrono::TimeDelta::minutes(1)).to_rfc3339())
        ),
        500,
    )
    .await;
    assert_eq!(up_to_now.len(), rows.len(), "newest at {newest}");
    for (query, field) in [
        ("action=job.explode", "action"),
        ("key_id=nope", "key_id"),
        ("from=yesterday", "from"),
        ("to=2026-13-01", "to"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("cursor=abc", "cursor"),
        ("from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z", "to"),
        ("tenant=globex", "tenant"),
    ] {
        let answer = send(&app, &app.key, &Call::get(format!("/v1/audit?{query}"))).await;
        assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY, "{query}");
        assert_eq!(answer.content_type, "application/problem+json");
        assert_eq!(
            answer.body["errors"][0]["field"], field,
            "{query}: {}",
            answer.body
        );
    }

    // The OpenAPI document has the route.
    let (_, spec) = app.get("/openapi.json").await;
    assert!(spec["paths"]["/v1/audit"]["get"].is_object());
    assert!(spec["components"]["schemas"]["AuditEntry"].is_object());
}

fn call_again(key: &str) -> Call {
    Call::delete(format!("/v1/keys/{key}"))
}

fn urlencode(text: &str) -> String {
    text.replace('+', "%2B").replace(':', "%3A")
}

/// A client's `x-request-id` is recorded when it is a plain token, and replaced by the
/// server's when not: 8 KiB of it went into the log and into each audit row of the request.
#[tokio::test]
async fn a_client_request_id_is_kept_only_when_plain() {
    let app = TestApp::spawn().await;
    let long = "A".repeat(8192);
    for (sent, kept) in [
        ("trace-42.a_b", true),
        (long.as_str(), false),
        ("a b", false),
    ] {
        let response = app
            .client
            .post(app.url("/v1/jobs"))
            .bearer_auth(&app.key)
            .header("x-request-id", sent)
            .json(&json!({"kind": "canary", "payload": {}}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let answered = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let job: Value = response.json().await.unwrap();
        let recorded: Option<String> = sqlx::query_scalar(
            "SELECT request_id FROM audit_log WHERE action = 'job.submit' AND target_id = $1",
        )
        .bind(job["id"].as_str().unwrap())
        .fetch_one(app.pool())
        .await
        .unwrap();
        assert_eq!(recorded.as_deref(), Some(answered.as_str()));
        if kept {
            assert_eq!(answered, sent);
        } else {
            assert!(
                answered.parse::<Uuid>().is_ok(),
                "{sent:.20}: {answered:.20}"
            );
        }
    }
}

#[tokio::test]
async fn the_audit_log_refuses_updates_and_deletes_even_in_sql_and_keeps_tenants_apart() {
    let app = TestApp::spawn().await;
    let job = app.submit_canary(json!({})).await;
    let rows = audit_rows(&app, &app.key, "", 500).await;
    let row = row_of(&rows, rows[0]["request_id"].as_str().unwrap()).clone();
    assert_eq!(row["target_id"], job.to_string());

    for statement in [
        format!(
            "UPDATE audit_log SET action = 'job.cancel' WHERE id = {}",
            row["id"]
        ),
        format!("DELETE FROM audit_log WHERE id = {}", row["id"]),
        "UPDATE audit_log SET request_id = NULL".to_owned(),
        "DELETE FROM audit_log".to_owned(),
        "TRUNCATE audit_log".to_owned(),
    ] {
        let error = sqlx::query(&statement)
            .execute(app.pool())
            .await
            .expect_err(&statement);
        assert!(
            error.to_string().contains("audit_log is append-only"),
            "{statement}: {error}"
        );
    }
    let after = audit_rows(&app, &app.key, "", 500).await;
    assert_eq!(after, rows, "the rows are as they were");
    // Another tenant's admin key sees its own rows only, and none of these.
    let other = app.key_for("globex").await;
    let theirs = audit_rows(&app, &other, "", 500).await;
    assert_eq!(theirs.len(), 1, "its own key's creation: {theirs:#?}");
    assert_eq!(theirs[0]["action"], "key.create");
    assert!(theirs[0]["key_id"].is_null(), "made by the operator");
    let filtered = audit_rows(&app, &other, &format!("&target_id={job}"), 500).await;
    assert!(filtered.is_empty());
    let mine = audit_rows(&app, &app.key, "", 500).await;
    assert_eq!(mine, rows, "nor does it see the other tenant's");

    // Deleting a tenant (whose keys and sessions would go with it) does not take its history:
    // it is refused while the tenant has audit rows.
    let error = sqlx::query("DELETE FROM tenants WHERE name = 'globex'")
        .execute(app.pool())
        .await
        .expect_err("a tenant with audit rows is not deleted");
    assert!(error.to_string().contains("audit_log"), "{error}");
    assert_eq!(audit_rows(&app, &other, "", 500).await, theirs);
}

#[tokio::test]
async fn patch_and_rollback_submissions_carry_their_statement() {
    let mut app = TestApp::spawn().await;
    seed_patch_table(&app).await;
    app.start_worker_for(&[("patch", 1)]).await;
    let statement = "UPDATE role_items SET val = val + 1 WHERE id <= 10";
    let body = json!({"kind": "patch", "payload": {"sql": statement, "mode": "execute"}});
    let submitted = send(&app, &app.key, &Call::post("/v1/jobs", body.clone())).await;
    assert_eq!(submitted.status, StatusCode::ACCEPTED, "{}", submitted.body);
    let patch: Uuid = submitted.body["id"].as_str().unwrap().parse().unwrap();
    app.wait_status(patch, &["succeeded"], Duration::from_secs(60))
        .await;
    let rollback = send(
        &app,
        &app.key,
        &Call::post(
            "/v1/jobs",
            json!({"kind": "patch_rollback", "payload": {"patch_job_id": patch}}),
        ),
    )
    .await;
    assert_eq!(rollback.status, StatusCode::ACCEPTED, "{}", rollback.body);
    let canary = send(
        &app,
        &app.key,
        &Call::post("/v1/jobs", json!({"kind": "canary"})),
    )
    .await;

    let rows = audit_rows(&app, &app.key, "&action=job.submit", 500).await;
    let row = row_of(&rows, &submitted.request_id);
    assert_eq!(row["target_id"], patch.to_string());
    assert_eq!(row["statement"], statement);
    assert_eq!(row["detail"]["kind"], "patch");
    assert_eq!(row["detail"]["mode"], "execute");
    assert_eq!(
        row["payload_sha256"],
        sha256_hex(&serde_json::to_vec(&body).unwrap())
    );
    let row = row_of(&rows, &rollback.request_id);
    assert_eq!(row["detail"]["kind"], "patch_rollback");
    assert_eq!(row["statement"], statement, "the statement it undoes");
    let row = row_of(&rows, &canary.request_id);
    assert!(row["statement"].is_null());
}

/// A job is never written without its audit row: the two are one statement. With the audit
/// row refused (a trigger standing in for a full disk or a broken table), a single and a batch
/// submission get a 500 problem (no raw database error) and leave no job.
#[tokio::test]
async fn a_submission_whose_audit_row_fails_writes_no_job() {
    let app = TestApp::spawn().await;
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_submits() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.action = 'job.submit' THEN RAISE EXCEPTION 'audit row refused'; END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_submits BEFORE INSERT ON audit_log
             FOR EACH ROW EXECUTE FUNCTION refuse_submits();",
    )
    .execute(app.pool())
    .await
    .unwrap();
    let jobs = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs")
            .fetch_one(app.pool())
            .await
            .unwrap()
    };
    for call in [
        Call::post("/v1/jobs", json!({"kind": "canary"})),
        Call::post(
            "/v1/jobs/batch",
            json!({"jobs": [{"kind": "canary"}, {"kind": "canary"}]}),
        ),
    ] {
        let answer = send(&app, &app.key, &call).await;
        assert_eq!(
            answer.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "{}",
            answer.body
        );
        assert_eq!(answer.content_type, "application/problem+json");
        assert!(
            !answer.body.to_string().contains("audit row refused"),
            "no raw database error: {}",
            answer.body
        );
        assert_eq!(jobs().await, 0, "{}", call.path);
    }

    sqlx::raw_sql("DROP TRIGGER refuse_submits ON audit_log")
        .execute(app.pool())
        .await
        .unwrap();
    let job = app.submit_canary(json!({})).await;
    assert_eq!(jobs().await, 1);
    let rows = audit_rows(&app, &app.key, "&action=job.submit", 500).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["target_id"], job.to_string());
}
