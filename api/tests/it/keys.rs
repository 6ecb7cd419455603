//! API key management: `conveyor-api keys list|revoke|rotate`, `GET/POST/DELETE /v1/keys` for
//! admin keys only and within their tenant, and revocations that reach a second API process
//! (its key cache, its open streams, the sessions opened with the key).

use crate::{
    faults::PrivateRedis,
    harness::{free_port, TestApp},
};
use reqwest::{header, Method, Response, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Generous: the revocation usually arrives within milliseconds (see docs/benchmarks.md).
const WAIT: Duration = Duration::from_secs(10);

async fn call(
    app: &TestApp,
    base: &str,
    method: Method,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = app
        .client
        .request(method, format!("{base}{path}"))
        .bearer_auth(key);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// `POST /v1/keys` with the app's admin key.
async fn post_key(app: &TestApp, body: Value) -> (StatusCode, Value) {
    let base = &app.base;
    call(app, base, Method::POST, "/v1/keys", &app.key, Some(body)).await
}

/// A new key of the app's first tenant, made with its admin key: (id, key).
async fn new_key(app: &TestApp, body: Value) -> (Uuid, String) {
    let (status, created) = post_key(app, body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    (
        created["id"].as_str().unwrap().parse().unwrap(),
        created["key"].as_str().unwrap().to_owned(),
    )
}

/// Revokes the key with the app's admin key, over HTTP.
async fn revoke(app: &TestApp, id: Uuid) {
    let path = format!("/v1/keys/{id}");
    let (status, problem) = call(app, &app.base, Method::DELETE, &path, &app.key, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{problem}");
}

/// A second API process on the same database and Redis: the server and its base URL.
async fn second_process(app: &TestApp) -> (conveyor_api::Server, String) {
    let server = conveyor_api::Server::start(app.settings.clone())
        .await
        .unwrap();
    let base = format!("http://{}", server.addr);
    (server, base)
}

/// Polls `base` with `key` until it answers 401.
async fn refused_within(app: &TestApp, base: &str, key: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let (status, _) = call(app, base, Method::GET, "/v1/jobs", key, None).await;
        if status == StatusCode::UNAUTHORIZED {
            return start.elapsed();
        }
        assert_eq!(status, StatusCode::OK);
        assert!(
            start.elapsed() < within,
            "{base} still accepts the revoked key after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether the response's body ends (rather than staying open) within `within`.
async fn ends_within(response: &mut Response, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, response.chunk()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None) | Err(_)) => return true,
            Err(_) => return false,
        }
    }
}

async fn open_stream(app: &TestApp, base: &str, path: &str, auth: (&str, &str)) -> Response {
    let response = app
        .client
        .get(format!("{base}{path}"))
        .header(auth.0, auth.1)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{path}");
    response
}

async fn conveyor_api(app: &TestApp, args: &[&str]) -> (bool, String, String) {
    app.conveyor_api(args).await
}

/// The rows of `keys list` after its header, split on whitespace.
fn rows(listing: &str) -> Vec<Vec<String>> {
    listing
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().map(str::to_owned).collect())
        .collect()
}

#[tokio::test]
async fn the_cli_creates_lists_rotates_and_revokes_keys() {
    let app = TestApp::spawn().await;
    let (ok, member, stderr) = conveyor_api(
        &app,
        &["keys", "create", "--tenant", "acme", "--name", "ci"],
    )
    .await;
    assert!(ok, "{stderr}");
    let acme = app.tenant_id("acme").await;
    assert!(
        stderr.contains(&format!("for the existing tenant \"acme\" ({acme})")),
        "{stderr}"
    );
    // A name alone never makes a tenant: a mistyped or second "acme" must not go unnoticed
    // into another customer's data. `--new-tenant` makes one, and only a new one.
    let tenants = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM tenants")
            .fetch_one(app.pool())
            .await
            .unwrap()
    };
    let before = tenants().await;
    let (ok, printed, stderr) =
        conveyor_api(&app, &["keys", "create", "--tenant", "initech"]).await;
    assert!(
        !ok && printed.is_empty()
            && stderr.contains("no tenant named \"initech\"; add --new-tenant"),
        "{stderr}"
    );
    let (ok, printed, stderr) = conveyor_api(
        &app,
        &["keys", "create", "--tenant", "acme", "--new-tenant"],
    )
    .await;
    assert!(
        !ok && printed.is_empty()
            && stderr.contains(&format!("a tenant named \"acme\" exists already ({acme})")),
        "{stderr}"
    );
    let (ok, _, stderr) = conveyor_api(
        &app,
        &[
            "keys",
            "create",
            "--tenant",
            "bad\u{1b}]52;c;name",
            "--new-tenant",
        ],
    )
    .await;
    assert!(
        !ok && stderr.contains("tenant name must hold no control"),
        "{stderr}"
    );
    assert_eq!(tenants().await, before);
    let (ok, _, stderr) = conveyor_api(
        &app,
        &["keys", "create", "--tenant", "initech", "--new-tenant"],
    )
    .await;
    let initech = app.tenant_id("initech").await;
    assert!(
        ok && stderr.contains(&format!("for the new tenant \"initech\" ({initech})")),
        "{stderr}"
    );
    let member = member.trim().to_owned();
    let (ok, listing, _) = conveyor_api(&app, &["keys", "list", "--tenant", "acme"]).await;
    assert!(ok);
    let listed = rows(&listing);
    assert_eq!(listed.len(), 2, "{listing}");
    // The tenant's first key (the app's) is its admin key; later ones are write keys.
    assert_eq!(
        (listed[0][1].as_str(), listed[0][2].as_str()),
        (&app.key[..12], "admin")
    );
    assert_eq!(
        (listed[1][1].as_str(), listed[1][2].as_str()),
        (&member[..12], "write")
    );
    assert_eq!(listed[1].last().unwrap(), "ci");
    assert!(!listing.contains(&member) && !listing.contains(&app.key));
    let member_id = listed[1][0].clone();

    let (status, _) = call(&app, &app.base, Method::GET, "/v1/jobs", &member, None).await;
    assert_eq!(status, StatusCode::OK);
    let (ok, rotated, stderr) = conveyor_api(&app, &["keys", "rotate", &member_id]).await;
    assert!(ok, "{stderr}");
    let rotated = rotated.trim().to_owned();
    assert!(rotated.starts_with("cvk_") && rotated != member);
    // The old key stops working at once (no grace period), the new one works.
    refused_within(&app, &app.base, &member, WAIT).await;
    let (status, _) = call(&app, &app.base, Method::GET, "/v1/jobs", &rotated, None).await;
    assert_eq!(status, StatusCode::OK);

    let (_, listing, _) = conveyor_api(&app, &["keys", "list", "--tenant", "acme"]).await;
    let listed = rows(&listing);
    assert_eq!(listed.len(), 3, "{listing}");
    let old = listed.iter().find(|row| row[0] == member_id).unwrap();
    assert_ne!(old[5], "-", "rotated key shows as revoked: {listing}");
    let new = listed.iter().find(|row| row[1] == rotated[..12]).unwrap();
    assert_eq!(
        (new[2].as_str(), new.last().unwrap().as_str()),
        ("write", "ci")
    );

    let (ok, _, _) = conveyor_api(&app, &["keys", "revoke", &new[0]]).await;
    assert!(ok);
    refused_within(&app, &app.base, &rotated, WAIT).await;
    // A revoked key cannot be rotated back to life; unknown ids are errors.
    let (ok, _, stderr) = conveyor_api(&app, &["keys", "rotate", &member_id]).await;
    assert!(!ok && stderr.contains("no live key"), "{stderr}");
    let (ok, _, stderr) =
        conveyor_api(&app, &["keys", "revoke", &Uuid::now_v7().to_string()]).await;
    assert!(!ok && stderr.contains("no key with id"), "{stderr}");
    let (ok, _, stderr) = conveyor_api(&app, &["keys", "list", "--tenant", "nobody"]).await;
    assert!(!ok && stderr.contains("no tenant"), "{stderr}");

    // `--admin` makes an admin key for a tenant that already has one.
    let (ok, admin, _) =
        conveyor_api(&app, &["keys", "create", "--tenant", "acme", "--admin"]).await;
    assert!(ok);
    let (status, _) = call(&app, &app.base, Method::GET, "/v1/keys", admin.trim(), None).await;
    assert_eq!(status, StatusCode::OK);
    // `--role read` a read key; an unknown role is refused.
    let (ok, read, stderr) = conveyor_api(
        &app,
        &["keys", "create", "--tenant", "acme", "--role", "read"],
    )
    .await;
    assert!(ok, "{stderr}");
    let (status, session) = call(
        &app,
        &app.base,
        Method::GET,
        "/v1/session",
        read.trim(),
        None,
    )
    .await;
    assert_eq!((status, &session["role"]), (StatusCode::OK, &json!("read")));
    let (status, _) = call(
        &app,
        &app.base,
        Method::POST,
        "/v1/jobs",
        read.trim(),
        Some(json!({"kind": "canary"})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (ok, _, stderr) = conveyor_api(
        &app,
        &["keys", "create", "--tenant", "acme", "--role", "root"],
    )
    .await;
    assert!(
        !ok && stderr.contains("not admin, write or read"),
        "{stderr}"
    );
    // What the operator did is in the tenant's audit log, with no key.
    let (_, audit) = call(&app, &app.base, Method::GET, "/v1/audit", &app.key, None).await;
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["key_id"].is_null())
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "key.create",
            "key.create",
            "key.revoke",
            "key.rotate",
            "key.create",
            "key.create"
        ],
        "{audit}"
    );
}

#[tokio::test]
async fn admin_keys_manage_their_own_tenants_keys_and_nothing_else() {
    let app = TestApp::spawn().await;
    let (status, list) = call(&app, &app.base, Method::GET, "/v1/keys", &app.key, None).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["keys"].as_array().unwrap().len(), 1);
    assert_eq!(list["keys"][0]["role"], "admin");
    assert_eq!(list["keys"][0]["prefix"], app.key[..12]);
    assert!(list["keys"][0]["last_used_at"].is_string(), "{list}");
    assert!(list["keys"][0].get("key").is_none() && list["keys"][0].get("key_hash").is_none());

    let (member_id, member) = new_key(&app, json!({"name": "ci"})).await;
    let (_, list) = call(&app, &app.base, Method::GET, "/v1/keys", &app.key, None).await;
    assert_eq!(list["keys"][1]["id"], member_id.to_string());
    assert_eq!(
        (&list["keys"][1]["role"], &list["keys"][1]["name"]),
        (&json!("write"), &json!("ci"))
    );
    let (admin_id, admin) = new_key(&app, json!({"role": "admin"})).await;
    for (body, field) in [
        (json!({"role": "root"}), "role"),
        (json!({"name": ""}), "name"),
        (json!({"name": "x".repeat(101)}), "name"),
        (json!({"scopes": []}), "scopes"),
    ] {
        let (status, problem) = post_key(&app, body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
        assert_eq!(problem["errors"][0]["field"], field, "{problem}");
    }

    // A member key manages nothing.
    for (method, path) in [
        (Method::GET, "/v1/keys".to_owned()),
        (Method::POST, "/v1/keys".to_owned()),
        (Method::DELETE, format!("/v1/keys/{admin_id}")),
    ] {
        let (status, problem) =
            call(&app, &app.base, method, &path, &member, Some(json!({}))).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {problem}");
    }

    // Another tenant's admin key sees none of these keys and cannot revoke them: to it they
    // do not exist, nor do the sessions opened with them.
    let member_session = sign_in(&app, &member).await;
    let other = app.key_for("globex").await;
    let (_, list) = call(&app, &app.base, Method::GET, "/v1/keys", &other, None).await;
    assert_eq!(list["keys"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["keys"][0]["prefix"], other[..12]);
    for id in [
        member_id.to_string(),
        admin_id.to_string(),
        "not-an-id".into(),
    ] {
        let (status, problem) = call(
            &app,
            &app.base,
            Method::DELETE,
            &format!("/v1/keys/{id}"),
            &other,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{problem}");
    }
    for key in [&member, &admin] {
        let (status, _) = call(&app, &app.base, Method::GET, "/v1/jobs", key, None).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(
        session_status(&app, &member_session).await,
        StatusCode::OK,
        "a session ended by another tenant's revocation attempt"
    );

    // The tenant's own admin key revokes; again is a no-op.
    for _ in 0..2 {
        let (status, _) = call(
            &app,
            &app.base,
            Method::DELETE,
            &format!("/v1/keys/{member_id}"),
            &admin,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    let (status, _) = call(&app, &app.base, Method::GET, "/v1/jobs", &member, None).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "refused at once by the process that revoked it"
    );
    let (_, list) = call(&app, &app.base, Method::GET, "/v1/keys", &app.key, None).await;
    assert!(list["keys"][1]["revoked_at"].is_string(), "{list}");

    let (_, spec) = app.get("/openapi.json").await;
    for path in ["/v1/keys", "/v1/keys/{id}"] {
        assert!(
            spec["paths"][path].is_object(),
            "{path} in the OpenAPI document"
        );
    }
    let created = spec["components"]["schemas"]["CreatedKey"].to_string();
    assert!(
        created.contains("\"key\"") && created.contains("ApiKey"),
        "{created}"
    );
}

#[tokio::test]
async fn a_revoked_key_is_refused_by_a_second_api_process_and_its_streams_end() {
    let app = TestApp::spawn().await;
    let (second, second_base) = second_process(&app).await;
    let (member_id, member) = new_key(&app, json!({})).await;
    let bearer = format!("Bearer {member}");

    // The second process has the key in its cache, and streams open with it on both.
    let (status, _) = call(&app, &second_base, Method::GET, "/v1/jobs", &member, None).await;
    assert_eq!(status, StatusCode::OK);
    let job = app.submit_canary(json!({"steps": 3})).await; // no worker: it stays queued
    let mut streams = Vec::new();
    for base in [&app.base, &second_base] {
        for path in ["/v1/events".to_owned(), format!("/v1/jobs/{job}/events")] {
            streams.push(open_stream(&app, base, &path, ("authorization", &bearer)).await);
        }
    }
    let mut other = open_stream(
        &app,
        &second_base,
        "/v1/events",
        ("authorization", &format!("Bearer {}", app.key)),
    )
    .await;

    revoke(&app, member_id).await;
    let took = refused_within(&app, &second_base, &member, WAIT).await;
    eprintln!("revoke → 401 on the second process: {took:?}");
    for (i, stream) in streams.iter_mut().enumerate() {
        assert!(ends_within(stream, WAIT).await, "stream {i} still open");
    }
    // A stream of another key goes on.
    assert!(!ends_within(&mut other, Duration::from_secs(1)).await);
    second.shutdown().await;
}

#[tokio::test]
async fn sessions_end_with_their_key_and_on_sign_out_in_every_process() {
    let app = TestApp::spawn().await;
    let (second, second_base) = second_process(&app).await;
    let (member_id, member) = new_key(&app, json!({})).await;
    // Three sessions, each with a stream on the other process: one opened with a key that is
    // then revoked, one that signs out, one that goes on.
    let mut sessions = Vec::new();
    for key in [&member, &app.key, &app.key] {
        let cookie = sign_in(&app, key).await;
        let stream = open_stream(&app, &second_base, "/v1/events", ("cookie", &cookie)).await;
        sessions.push((cookie, stream));
    }
    let Ok(
        [(revoked_cookie, mut revoked_stream), (signed_out_cookie, mut signed_out_stream), (kept_cookie, mut kept_stream)],
    ) = <[_; 3]>::try_from(sessions)
    else {
        unreachable!("three sessions")
    };

    revoke(&app, member_id).await;
    assert_eq!(
        session_status(&app, &revoked_cookie).await,
        StatusCode::UNAUTHORIZED
    );
    assert!(
        ends_within(&mut revoked_stream, WAIT).await,
        "the revoked key's session stream"
    );

    let response = app
        .client
        .delete(app.url("/v1/session"))
        .header("X-Conveyor-CSRF", "1")
        .header(header::COOKIE, &signed_out_cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(
        ends_within(&mut signed_out_stream, WAIT).await,
        "the signed-out session's stream"
    );

    assert_eq!(session_status(&app, &kept_cookie).await, StatusCode::OK);
    assert!(!ends_within(&mut kept_stream, Duration::from_secs(1)).await);
    second.shutdown().await;
}

/// Signing out with a cookie of no session publishes nothing: anyone, signed in or not, could
/// wake every event stream of every tenant in every API process, once a request.
#[tokio::test]
async fn signing_out_of_no_session_tells_no_process() {
    use futures::StreamExt;
    let app = TestApp::spawn().await;
    let client = redis::Client::open(app.settings.redis_url.as_str()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub
        .subscribe(conveyor_api::revocation::channel(
            &app.settings.redis_prefix,
        ))
        .await
        .unwrap();
    let sign_out = |cookie: String| {
        app.client
            .delete(app.url("/v1/session"))
            .header("X-Conveyor-CSRF", "1")
            .header(header::COOKIE, cookie)
            .send()
    };
    let response = sign_out("conveyor_session=deadbeef".into()).await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    // A real session's end is told: the first message heard is its.
    let cookie = sign_in(&app, &app.key).await;
    let response = sign_out(cookie).await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let mut messages = pubsub.on_message();
    let first = tokio::time::timeout(WAIT, messages.next())
        .await
        .expect("a message")
        .unwrap();
    let payload: String = first.get_payload().unwrap();
    let fake = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"deadbeef"));
    assert_ne!(
        payload,
        format!("session:{fake}"),
        "the cookie of no session was told"
    );
    assert!(payload.starts_with("session:"), "{payload}");
}

/// Signs in to the dashboard with `key`; the `Cookie` header value to send back.
/// A loop of sign-ins keeps at most a key's last 20 sessions: the oldest end.
#[tokio::test]
async fn a_key_keeps_at_most_its_last_twenty_sessions() {
    let app = TestApp::spawn().await;
    let first = sign_in(&app, &app.key).await;
    let mut last = String::new();
    for _ in 0..25 {
        last = sign_in(&app, &app.key).await;
    }
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(live, 20);
    assert_eq!(session_status(&app, &first).await, StatusCode::UNAUTHORIZED);
    assert_eq!(session_status(&app, &last).await, StatusCode::OK);
}

async fn sign_in(app: &TestApp, key: &str) -> String {
    let response = app
        .client
        .post(app.url("/v1/session"))
        .header("X-Conveyor-CSRF", "1")
        .json(&json!({"api_key": key}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let cookie = response.headers()[header::SET_COOKIE].to_str().unwrap();
    cookie.split(';').next().unwrap().trim().to_owned()
}

async fn session_status(app: &TestApp, cookie: &str) -> StatusCode {
    app.client
        .get(app.url("/v1/session"))
        .header(header::COOKIE, cookie)
        .send()
        .await
        .unwrap()
        .status()
}

/// Waits until `n` API processes are subscribed to the app's revocation channel.
async fn subscribed(app: &TestApp, n: i64) {
    let channel = conveyor_api::revocation::channel(&app.settings.redis_prefix);
    let deadline = Instant::now() + WAIT;
    loop {
        let count = async {
            let client = redis::Client::open(app.settings.redis_url.as_str())?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            let (_, count): (String, i64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&channel)
                .query_async(&mut conn)
                .await?;
            redis::RedisResult::Ok(count)
        };
        if count.await.is_ok_and(|count| count == n) {
            return;
        }
        assert!(Instant::now() < deadline, "{n} subscribers within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Pub/sub reaches only those subscribed at the time: a process that has lost its subscription
/// must not go on trusting the keys it cached. It looks each one up until it has subscribed
/// again, and then hears revocations again.
#[tokio::test]
async fn a_process_that_lost_its_subscription_does_not_trust_its_cache() {
    let port = free_port();
    let mut redis = PrivateRedis::start(port);
    let app = TestApp::spawn_with(|s| s.redis_url = format!("redis://127.0.0.1:{port}")).await;
    let (second, second_base) = second_process(&app).await;
    subscribed(&app, 2).await;
    let (id, member) = new_key(&app, json!({})).await;
    let (status, _) = call(&app, &second_base, Method::GET, "/v1/jobs", &member, None).await;
    assert_eq!(status, StatusCode::OK, "cached on the second process");

    // Redis goes away; the key is used meanwhile (the processes notice the closed connection at
    // once), and then revoked without any process hearing of it.
    redis.kill();
    // Not observable from outside: a bounded wait for both processes to see the subscription
    // connection close, so the call below is made with Redis gone for them too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, _) = call(&app, &second_base, Method::GET, "/v1/jobs", &member, None).await;
    assert_eq!(status, StatusCode::OK);
    sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE id = $1")
        .bind(id)
        .execute(app.pool())
        .await
        .unwrap();
    refused_within(&app, &second_base, &member, WAIT).await;

    // Back: both processes subscribe again, and revocations reach them as before.
    redis.launch();
    subscribed(&app, 2).await;
    let (id, member) = new_key(&app, json!({})).await;
    let (status, _) = call(&app, &second_base, Method::GET, "/v1/jobs", &member, None).await;
    assert_eq!(status, StatusCode::OK);
    revoke(&app, id).await;
    refused_within(&app, &second_base, &member, WAIT).await;
    second.shutdown().await;
}

/// An admin key made keys without end, and `GET /v1/keys` answered every key the tenant ever
/// had (revoked ones are kept) in one response. A tenant holds at most 100 live keys (a
/// revoked one frees its place), and the list is paged.
#[tokio::test]
async fn a_tenant_holds_at_most_a_hundred_live_keys_and_its_list_is_paged() {
    let app = TestApp::spawn().await;
    // The app's admin key is the first.
    let mut made = Vec::new();
    for _ in 1..conveyor_api::keys::MAX_LIVE_KEYS {
        made.push(new_key(&app, json!({"role": "read"})).await.0);
    }
    let (status, problem) = post_key(&app, json!({"role": "read"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert!(problem["type"].as_str().unwrap().ends_with("too-many-keys"));
    // One place free, five asking at once: one gets it (a count read before the lock was
    // granted let a second one past).
    revoke(&app, made[0]).await;
    let asks = (0..5).map(|_| post_key(&app, json!({"role": "read"})));
    let answers = futures::future::join_all(asks).await;
    let created: Vec<&Value> = answers
        .iter()
        .filter(|(status, _)| *status == StatusCode::CREATED)
        .map(|(_, key)| key)
        .collect();
    assert_eq!(created.len(), 1, "{answers:?}");
    made.push(created[0]["id"].as_str().unwrap().parse().unwrap());

    let mut listed = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = "/v1/keys?limit=30".to_owned();
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let (status, page) = call(&app, &app.base, Method::GET, &path, &app.key, None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let keys = page["keys"].as_array().unwrap();
        assert!(keys.len() <= 30);
        listed.extend(keys.iter().map(|k| k["id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    // The admin key, the 99 made (one revoked) and the one made in its place, oldest first.
    assert_eq!(listed.len(), 101);
    let made: Vec<String> = made.iter().map(Uuid::to_string).collect();
    assert_eq!(listed[1..], made[..]);
}
