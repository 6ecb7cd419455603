//! Webhooks: job outcomes delivered to a real HTTP receiver in the test, which verifies each
//! request's Standard Webhooks signature with the secret `POST /v1/webhooks` showed once;
//! retried after a 500 and after the delivering worker process is killed mid-request, never
//! sent again once acknowledged; URLs to refused addresses, bad events, another tenant's
//! webhook and a read key refused.

use crate::harness::{KillOnDrop, TestApp};
use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode as AxumStatus},
    routing::post,
    Router,
};
use base64::{engine::general_purpose::STANDARD, Engine};
use hmac::{Hmac, Mac};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::Sha256;
use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use uuid::Uuid;

/// How the receiver answers one request.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Reply {
    Status(u16),
    /// Holds the request open, never answering.
    Hang,
}

/// One request the receiver got.
#[derive(Clone, Debug)]
pub(crate) struct Received {
    id: String,
    timestamp: String,
    signature: String,
    content_type: String,
    body: Bytes,
    at: Instant,
}

/// An HTTP server on 127.0.0.1:0 answering with its script (then 204).
#[derive(Clone, Default)]
pub(crate) struct Receiver {
    script: Arc<Mutex<VecDeque<Reply>>>,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    pub(crate) async fn start(script: &[Reply]) -> (Self, String) {
        let receiver = Self {
            script: Arc::new(Mutex::new(script.iter().copied().collect())),
            got: Arc::default(),
        };
        let app = Router::new()
            .route("/hook", post(answer))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (receiver, url)
    }

    fn got(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until it got `n` requests; returns them.
    pub(crate) async fn wait_for(&self, n: usize, within: Duration) -> Vec<Received> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.got();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{} requests, not {n}, within {within:?}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn answer(State(receiver): State<Receiver>, headers: HeaderMap, body: Bytes) -> AxumStatus {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    receiver.got.lock().unwrap().push(Received {
        id: header("webhook-id"),
        timestamp: header("webhook-timestamp"),
        signature: header("webhook-signature"),
        content_type: header("content-type"),
        body,
        at: Instant::now(),
    });
    let reply = receiver
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Reply::Status(204));
    match reply {
        Reply::Status(code) => AxumStatus::from_u16(code).unwrap(),
        Reply::Hang => std::future::pending().await,
    }
}

/// The receiver's check, per the Standard Webhooks spec: HMAC-SHA256 under the secret's
/// base64-decoded bytes of `{id}.{timestamp}.{body}`, one of the header's `v1,` entries, and a
/// timestamp within five minutes.
fn verify(secret: &str, request: &Received) -> bool {
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").expect("whsec_ prefix"))
        .expect("base64 secret");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.", request.id, request.timestamp).as_bytes());
    mac.update(&request.body);
    let expected = STANDARD.encode(mac.finalize().into_bytes());
    let timestamp: i64 = request.timestamp.parse().expect("unix seconds");
    let now = chrono::Utc::now().timestamp();
    (now - timestamp).abs() < 300
        && request
            .signature
            .split(' ')
            .any(|s| s.strip_prefix("v1,") == Some(expected.as_str()))
}

fn body(request: &Received) -> Value {
    serde_json::from_slice(&request.body).unwrap()
}

async fn call(
    app: &TestApp,
    key: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = app.client.request(method, app.url(path)).bearer_auth(key);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Creates a webhook of the app's tenant; returns (id, secret).
pub(crate) async fn create(app: &TestApp, url: &str, events: &[&str]) -> (String, String) {
    let (status, created) = app
        .post("/v1/webhooks", &json!({"url": url, "events": events}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let secret = created["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"), "{created}");
    (created["id"].as_str().unwrap().to_owned(), secret)
}

async fn deliveries(app: &TestApp, webhook: &str) -> Vec<Value> {
    let (status, page) = app.get(&format!("/v1/webhooks/{webhook}/deliveries")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    page["deliveries"].as_array().unwrap().clone()
}

async fn wait_delivery(app: &TestApp, webhook: &str, status: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all = deliveries(app, webhook).await;
        if all.len() == 1 && all[0]["status"] == status {
            return all[0].clone();
        }
        assert!(Instant::now() < deadline, "not {status}: {all:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_jobs_success_is_delivered_once_and_verifies_with_the_secret_shown_at_create() {
    let mut app = TestApp::spawn().await;
    let (receiver, url) = Receiver::start(&[]).await;
    let (webhook, secret) = create(&app, &url, &["job.succeeded", "job.failed"]).await;
    // Never shown again, and not stored in clear.
    let (_, list) = app.get("/v1/webhooks").await;
    assert_eq!(list["webhooks"].as_array().unwrap().len(), 1, "{list}");
    assert!(!list.to_string().contains(&secret), "{list}");
    let (_, one) = app.get(&format!("/v1/webhooks/{webhook}")).await;
    assert_eq!(one["events"], json!(["job.succeeded", "job.failed"]));
    assert!(one.get("secret").is_none(), "{one}");
    let sealed: Vec<u8> = sqlx::query_scalar("SELECT secret_encrypted FROM webhooks")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert!(!sealed.windows(secret.len()).any(|w| w == secret.as_bytes()));

    app.start_worker(1).await;
    let job = app.submit_canary(json!({"steps": 1})).await;
    app.wait_status(job, &["succeeded"], Duration::from_secs(30))
        .await;
    let got = receiver.wait_for(1, Duration::from_secs(30)).await;
    assert!(
        verify(&secret, &got[0]),
        "signature does not verify: {got:?}"
    );
    assert!(!verify("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", &got[0]));
    assert_eq!(got[0].content_type, "application/json");
    let event = body(&got[0]);
    assert_eq!(event["type"], "job.succeeded", "{event}");
    assert_eq!(event["data"]["job_id"], job.to_string());
    assert_eq!(event["data"]["kind"], "canary");
    assert_eq!(event["data"]["status"], "succeeded");
    assert!(event["data"].get("result").is_some(), "{event}");
    assert!(event["timestamp"].as_str().is_some(), "{event}");

    let delivery = wait_delivery(&app, &webhook, "delivered").await;
    assert_eq!(delivery["id"], got[0].id, "{delivery}");
    assert_eq!(delivery["attempts"], 1, "{delivery}");
    assert_eq!(delivery["last_status_code"], 204, "{delivery}");
    assert!(delivery["last_latency_ms"].as_i64().is_some(), "{delivery}");
    assert_eq!(delivery["event"], "job.succeeded");
    assert_eq!(delivery["job_id"], job.to_string());

    // Acknowledged: never sent again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.got().len(), 1, "sent again after a 2xx");

    // The replay sends it again: same id and body, signed anew.
    let (status, replayed) = app
        .post(
            &format!("/v1/webhooks/{webhook}/deliveries/{}/replay", got[0].id),
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{replayed}");
    let got = receiver.wait_for(2, Duration::from_secs(30)).await;
    assert_eq!(got[1].id, got[0].id);
    assert_eq!(got[1].body, got[0].body);
    assert!(verify(&secret, &got[1]));
    let delivery = wait_delivery(&app, &webhook, "delivered").await;
    assert_eq!(delivery["attempts"], 2, "{delivery}");

    let (_, audit) = app.get("/v1/audit?action=webhook.create").await;
    assert_eq!(
        audit["entries"].as_array().map(Vec::len),
        Some(1),
        "{audit}"
    );
    let (_, audit) = app.get("/v1/audit?action=webhook.replay").await;
    assert_eq!(
        audit["entries"].as_array().map(Vec::len),
        Some(1),
        "{audit}"
    );

    assert_eq!(
        app.delete(&format!("/v1/webhooks/{webhook}")).await,
        StatusCode::NO_CONTENT
    );
    let (status, _) = app.get(&format!("/v1/webhooks/{webhook}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_failed_job_is_retried_after_500s_until_acknowledged() {
    let mut app = TestApp::spawn().await;
    let (receiver, url) = Receiver::start(&[Reply::Status(500), Reply::Status(503)]).await;
    let (webhook, secret) = create(&app, &url, &["job.failed"]).await;
    app.start_worker(1).await;
    let (status, job) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "canary", "payload": {"fail_first": 5}, "max_attempts": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let delivery = wait_delivery(&app, &webhook, "delivered").await;
    let got = receiver.got();
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got.iter().all(|r| r.id == got[0].id), "one webhook-id");
    assert!(got.iter().all(|r| verify(&secret, r)));
    let event = body(&got[2]);
    assert_eq!(event["type"], "job.failed", "{event}");
    assert_eq!(event["data"]["job_id"], job["id"]);
    assert!(event["data"]["error"].as_str().is_some(), "{event}");
    assert_eq!(delivery["attempts"], 3, "{delivery}");
    assert_eq!(delivery["last_status_code"], 204, "{delivery}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.got().len(), 3, "sent again after a 2xx");
}

#[tokio::test]
async fn a_cancel_of_a_waiting_job_is_delivered() {
    let mut app = TestApp::spawn().await;
    let (receiver, url) = Receiver::start(&[]).await;
    let (_, secret) = create(&app, &url, &["job.cancelled"]).await;
    app.start_worker(1).await;
    let run_at = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let (status, job) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "canary", "payload": {}, "run_at": run_at}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let id = job["id"].as_str().unwrap();
    let (status, _) = app.post(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
    assert!(status.is_success(), "{status}");
    let got = receiver.wait_for(1, Duration::from_secs(30)).await;
    assert!(verify(&secret, &got[0]));
    let event = body(&got[0]);
    assert_eq!(event["type"], "job.cancelled", "{event}");
    assert_eq!(event["data"]["job_id"], id);
}

/// The worker process sending a delivery is killed (SIGKILL) while the receiver holds the
/// request open: another worker sends it once the lease has passed, and once that is
/// acknowledged it is never sent again.
#[tokio::test]
async fn a_delivery_whose_worker_is_killed_mid_request_is_sent_by_another_after_the_lease() {
    let app = TestApp::spawn().await;
    let (receiver, url) = Receiver::start(&[Reply::Hang]).await;
    let (webhook, secret) = create(&app, &url, &["job.succeeded"]).await;
    let env = [
        ("CONVEYOR_WEBHOOK_ALLOW", "127.0.0.0/8"),
        ("CONVEYOR_WEBHOOK_TIMEOUT_SECS", "3"),
        ("CONVEYOR_WEBHOOK_LEASE_SECS", "4"),
        ("CONVEYOR_WEBHOOK_RETRY_BASE_MS", "200"),
    ];
    let mut first: KillOnDrop = app.spawn_worker_process_with("canary=1", &env);
    let job = app.submit_canary(json!({})).await;
    app.wait_status(job, &["succeeded"], Duration::from_secs(60))
        .await;
    let got = receiver.wait_for(1, Duration::from_secs(30)).await;
    first.kill().unwrap(); // SIGKILL, mid-request
    first.wait().unwrap();
    let pending = deliveries(&app, &webhook).await;
    assert_eq!(pending[0]["status"], "pending", "{pending:?}");
    assert_eq!(pending[0]["attempts"], 1, "{pending:?}");

    let _second = app.spawn_worker_process_with("canary=1", &env);
    let got_again = receiver.wait_for(2, Duration::from_secs(60)).await;
    assert_eq!(got_again[1].id, got[0].id, "the same delivery");
    assert!(verify(&secret, &got_again[1]));
    assert!(
        got_again[1].at - got[0].at >= Duration::from_secs(3),
        "sent again before the lease passed"
    );
    let delivery = wait_delivery(&app, &webhook, "delivered").await;
    assert_eq!(delivery["attempts"], 2, "{delivery}");
    assert_eq!(delivery["last_status_code"], 204, "{delivery}");
    // Past another lease and more: acknowledged, never sent again.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(receiver.got().len(), 2, "sent again after a 2xx");
}

#[tokio::test]
async fn urls_to_refused_addresses_and_unknown_events_are_422_and_create_nothing() {
    let app = TestApp::spawn().await;
    for (body, field, why) in [
        // Only checked, never contacted.
        (
            json!({"url": "http://10.0.0.1/hook", "events": ["job.succeeded"]}),
            "url",
            "private",
        ),
        (
            json!({"url": "http://169.254.169.254/latest", "events": ["job.succeeded"]}),
            "url",
            "metadata",
        ),
        (
            json!({"url": "http://[::ffff:192.168.0.1]/", "events": ["job.succeeded"]}),
            "url",
            "private",
        ),
        (
            json!({"url": "file:///etc/passwd", "events": ["job.succeeded"]}),
            "url",
            "http",
        ),
        (
            json!({"url": "https://ann:pw@example.com/", "events": ["job.succeeded"]}),
            "url",
            "credentials",
        ),
        (
            json!({"url": "http://127.0.0.1:9/hook", "events": ["pipeline.exploded"]}),
            "events",
            "unknown event",
        ),
        (
            json!({"url": "http://127.0.0.1:9/hook", "events": []}),
            "events",
            "at least one",
        ),
    ] {
        let (status, problem) = app.post("/v1/webhooks", &body).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}: {problem}"
        );
        let error = &problem["errors"][0];
        assert_eq!(error["field"], field, "{body}: {problem}");
        assert!(
            error["message"].as_str().unwrap().contains(why),
            "{body}: {problem}"
        );
    }
    let (_, list) = app.get("/v1/webhooks").await;
    assert_eq!(list["webhooks"], json!([]));
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM webhooks")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(count, 0);
    let (_, audit) = app.get("/v1/audit?action=webhook.create").await;
    assert_eq!(audit["entries"], json!([]), "{audit}");

    // A tenant's webhooks are bounded: each finished job is a delivery per webhook; creates
    // racing past the bound together do not pass it.
    let limit = shared::webhooks::MAX_PER_TENANT;
    for i in 0..limit - 5 {
        create(
            &app,
            &format!("http://127.0.0.1:9/hook{i}"),
            &["job.succeeded"],
        )
        .await;
    }
    let shared_app = &app;
    let racing = (0..20).map(|i| {
        let body =
            json!({"url": format!("http://127.0.0.1:9/race{i}"), "events": ["job.succeeded"]});
        async move { shared_app.post("/v1/webhooks", &body).await.0 }
    });
    let statuses = futures::future::join_all(racing).await;
    let created = statuses
        .iter()
        .filter(|s| **s == StatusCode::CREATED)
        .count();
    assert_eq!(created, 5, "{statuses:?}");
    let body = json!({"url": "http://127.0.0.1:9/one-more", "events": ["job.succeeded"]});
    let (status, problem) = app.post("/v1/webhooks", &body).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    let (_, list) = app.get("/v1/webhooks").await;
    assert_eq!(list["webhooks"].as_array().unwrap().len() as i64, limit);

    // The OpenAPI document has the routes.
    let (_, spec) = app.get("/openapi.json").await;
    for (path, method) in [
        ("/v1/webhooks", "post"),
        ("/v1/webhooks", "get"),
        ("/v1/webhooks/{id}", "delete"),
        ("/v1/webhooks/{id}/deliveries", "get"),
        ("/v1/webhooks/{id}/deliveries/{delivery_id}/replay", "post"),
    ] {
        assert!(spec["paths"][path][method].is_object(), "{method} {path}");
    }
    for schema in ["CreatedWebhook", "Webhook", "Delivery", "NewWebhook"] {
        assert!(
            spec["components"]["schemas"][schema].is_object(),
            "{schema}"
        );
    }
}

/// The connections' allow list opens nothing to webhooks: a network allowed for tenants'
/// databases is not one whose every service a tenant may POST to.
#[tokio::test]
async fn the_connections_allow_list_does_not_open_webhooks() {
    let app = TestApp::spawn_with(|s| {
        s.connection_allow = "127.0.0.0/8, ::1".parse().unwrap();
        s.webhook_allow = Default::default();
    })
    .await;
    let (status, problem) = app
        .post(
            "/v1/webhooks",
            &json!({"url": "http://127.0.0.1:9/hook", "events": ["job.succeeded"]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert!(
        problem["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("loopback"),
        "{problem}"
    );
    let warehouse = app.warehouse().await;
    let (status, connection) = app
        .post(
            "/v1/connections",
            &json!({"name": "warehouse", "url": warehouse.url}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{connection}");
}

#[tokio::test]
async fn another_tenants_webhook_is_not_found_and_a_read_key_cannot_create_one() {
    let app = TestApp::spawn().await;
    let (_, url) = Receiver::start(&[]).await;
    let (webhook, _) = create(&app, &url, &["job.succeeded"]).await;
    let other = app.key_for("globex").await;
    let delivery = Uuid::now_v7();
    for (method, path) in [
        (Method::GET, format!("/v1/webhooks/{webhook}")),
        (Method::GET, format!("/v1/webhooks/{webhook}/deliveries")),
        (Method::DELETE, format!("/v1/webhooks/{webhook}")),
        (
            Method::POST,
            format!("/v1/webhooks/{webhook}/deliveries/{delivery}/replay"),
        ),
    ] {
        let (status, problem) = call(&app, &other, method.clone(), &path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {problem}");
    }
    let (_, list) = call(&app, &other, Method::GET, "/v1/webhooks", None).await;
    assert_eq!(list["webhooks"], json!([]), "{list}");
    // Still the owner's.
    let (status, _) = app.get(&format!("/v1/webhooks/{webhook}")).await;
    assert_eq!(status, StatusCode::OK);

    let (status, read) = app.post("/v1/keys", &json!({"role": "read"})).await;
    assert_eq!(status, StatusCode::CREATED, "{read}");
    let read = read["key"].as_str().unwrap();
    let (status, problem) = call(
        &app,
        read,
        Method::POST,
        "/v1/webhooks",
        Some(json!({"url": url, "events": ["job.succeeded"]})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{problem}");
    let (status, list) = call(&app, read, Method::GET, "/v1/webhooks", None).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["webhooks"].as_array().unwrap().len(), 1);
}

/// Receivers keep their tokens in the URL's path or query: a read key is shown only where it
/// points (the writers who made the endpoint see it whole), in the list or alone.
#[tokio::test]
async fn a_read_key_is_not_shown_a_webhook_urls_path_or_query() {
    let app = TestApp::spawn().await;
    let (_, url) = Receiver::start(&[]).await;
    let with_token = format!("{url}/T0/B0/s3cretpath?token=hunter2");
    let (webhook, _) = create(&app, &with_token, &["job.succeeded"]).await;
    let (status, read) = app.post("/v1/keys", &json!({"role": "read"})).await;
    assert_eq!(status, StatusCode::CREATED, "{read}");
    let read = read["key"].as_str().unwrap();
    let (_, list) = call(&app, read, Method::GET, "/v1/webhooks", None).await;
    let (_, one) = call(
        &app,
        read,
        Method::GET,
        &format!("/v1/webhooks/{webhook}"),
        None,
    )
    .await;
    for shown in [&list["webhooks"][0], &one] {
        let shown = shown["url"].as_str().unwrap();
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cretpath"),
            "{shown}"
        );
        assert!(
            with_token.starts_with(shown.trim_end_matches("/…")),
            "{shown}"
        );
    }
    let (_, one) = app.get(&format!("/v1/webhooks/{webhook}")).await;
    assert!(
        one["url"].as_str().unwrap().contains("token=hunter2"),
        "{one}"
    );
}

/// A replay sends a request on the tenant's behalf as a job does, so it takes a token from the
/// same rate: a replay loop went out at whatever speed the API answered.
#[tokio::test]
async fn a_replay_takes_a_rate_token_and_past_the_rate_sends_nothing() {
    let mut app = TestApp::spawn().await;
    let (ok, _, stderr) = app
        .conveyor_api(&[
            "tenants",
            "set-limits",
            "acme",
            "--rate",
            "1/h",
            "--burst",
            "2",
        ])
        .await;
    assert!(ok, "{stderr}");
    let (receiver, url) = Receiver::start(&[]).await;
    let (webhook, _) = create(&app, &url, &["job.succeeded"]).await;
    app.start_worker(1).await;
    let job = app.submit_canary(json!({"steps": 1})).await; // the first token
    app.wait_status(job, &["succeeded"], Duration::from_secs(30))
        .await;
    let delivery = wait_delivery(&app, &webhook, "delivered").await;
    let replay = format!(
        "/v1/webhooks/{webhook}/deliveries/{}/replay",
        delivery["id"].as_str().unwrap()
    );
    let (status, body) = app.post(&replay, &json!({})).await; // the second
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    receiver.wait_for(2, Duration::from_secs(30)).await;
    let delivered = wait_delivery(&app, &webhook, "delivered").await;
    assert_eq!(delivered["attempts"], 2, "{delivered}");

    let (status, problem) = app.post(&replay, &json!({})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{problem}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.got().len(), 2, "sent past the rate");
    let after = wait_delivery(&app, &webhook, "delivered").await;
    assert_eq!(after["attempts"], 2, "{after}");
}
