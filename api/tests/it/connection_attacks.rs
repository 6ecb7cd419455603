//! A tenant's connection URL aimed at the platform itself, at internal addresses or with
//! parameters that redirect the client: each is refused with a reason on `url`, and nothing is
//! stored. Traffic stays on loopback; private ranges are proven by the address check's unit
//! tests.

use reqwest::{StatusCode, Url};
use serde_json::{json, Value};
use shared::connections::AllowList;
use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};
use tokio::net::TcpListener;
use uuid::Uuid;

use crate::harness::TestApp;

async fn connection_count(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM connections")
        .fetch_one(app.pool())
        .await
        .unwrap()
}

/// Registers `url`; asserts a 422 on `url`, that nothing was stored, and returns the reason.
async fn refused(app: &TestApp, url: &str) -> String {
    let before = connection_count(app).await;
    let (status, problem) = app
        .post("/v1/connections", &json!({"name": "evil", "url": url}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {problem}");
    assert_eq!(problem["errors"][0]["field"], "url", "{problem}");
    assert_eq!(connection_count(app).await, before, "{url} was stored");
    problem["errors"][0]["message"].as_str().unwrap().to_owned()
}

/// Registers `url` as `name`; asserts it is accepted.
async fn registered(app: &TestApp, name: &str, url: &str) -> Value {
    let (status, connection) = app
        .post("/v1/connections", &json!({"name": name, "url": url}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{url}: {connection}");
    connection
}

fn with_host(url: &str, host: &str, user: &str) -> String {
    let mut url = Url::parse(url).unwrap();
    url.set_host(Some(host)).unwrap();
    url.set_username(user).unwrap();
    url.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_platforms_databases_are_refused_under_every_name() {
    let app = TestApp::spawn().await;
    let warehouse = app.warehouse().await;
    for host in ["127.0.0.1", "localhost", "127.0.0.2", "[::1]"] {
        // Even with an unprivileged role that may connect there.
        for user in ["postgres", warehouse.name.as_str()] {
            let control = with_host(&app.settings.database_url, host, user);
            let why = refused(&app, &control).await;
            assert_eq!(why, "is the platform's control-plane database", "{control}");
            let target = with_host(&app.settings.target_database_url, host, user);
            let why = refused(&app, &target).await;
            assert_eq!(why, "is the platform's default target database", "{target}");
        }
    }
}

/// Where loopback is not allowed (production's default), the platform's own databases there
/// are refused as any loopback address is: naming them told a tenant probing addresses, ports
/// and database names where the control plane and the default target are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_address_does_not_say_it_is_the_platforms() {
    let app = TestApp::spawn_with(|s| s.connection_allow = AllowList::default()).await;
    for host in ["127.0.0.1", "localhost", "[::1]"] {
        for platform in [
            &app.settings.database_url,
            &app.settings.target_database_url,
        ] {
            let url = with_host(platform, host, "ann");
            let why = refused(&app, &url).await;
            let port = Url::parse(&url).unwrap().port().unwrap();
            let unrelated = refused(&app, &format!("postgres://ann@{host}:{port}/not_ours")).await;
            assert_eq!(why, unrelated, "{url}");
            assert!(!why.contains("platform"), "{why}");
        }
    }
}

/// Forwards loopback connections on a port of its own to `to`: the same server under an
/// address the address check cannot tell from another.
async fn tcp_proxy(to: u16) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    port
}

/// Forwards loopback connections to `to` as [`tcp_proxy`] does until the client sends a
/// message containing `marker`: that message and all after it are held, never answered. A
/// tenant's server that answers some statements and hangs on others, as a hostile one may.
async fn stalling_proxy(to: u16, marker: &'static [u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                continue;
            };
            let (mut client_in, mut client_out) = client.into_split();
            let (mut server_in, mut server_out) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_in, &mut client_out).await;
            });
            tokio::spawn(async move {
                // Untyped messages first (SSL or GSS requests, then the startup message), typed
                // ones after: a type byte, then a length that counts itself.
                let mut typed = false;
                loop {
                    let mut message = vec![0u8; if typed { 5 } else { 4 }];
                    if client_in.read_exact(&mut message).await.is_err() {
                        return;
                    }
                    let at = message.len() - 4;
                    let len = u32::from_be_bytes(message[at..].try_into().unwrap()) as usize;
                    let mut body = vec![0u8; len - 4];
                    if client_in.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let request = !typed && body.len() == 4 && body[0] == 0x04 && body[1] == 0xd2;
                    typed |= !request;
                    if body.windows(marker.len()).any(|w| w == marker) {
                        // Hold the connection open and answer nothing, for ever.
                        let mut rest = Vec::new();
                        let _ = client_in.read_to_end(&mut rest).await;
                        return;
                    }
                    message.extend(body);
                    if server_out.write_all(&message).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_behind_another_port_is_recognised_once_connected() {
    let app = TestApp::spawn().await;
    let warehouse = app.warehouse().await;
    let control = Url::parse(&app.settings.database_url).unwrap();
    let proxy = tcp_proxy(control.port().unwrap()).await;
    let mut disguised = control.clone();
    disguised.set_port(Some(proxy)).unwrap();
    disguised.set_username(&warehouse.name).unwrap();
    let why = refused(&app, disguised.as_str()).await;
    assert_eq!(why, "is the platform's control-plane database");
    // The same way in reaches the tenant's own database.
    let mut own = Url::parse(&warehouse.url).unwrap();
    own.set_port(Some(proxy)).unwrap();
    registered(&app, "own", own.as_str()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_that_redirect_the_client_are_refused() {
    let app = TestApp::spawn().await;
    let warehouse = app.warehouse().await;
    for (parameter, value) in [
        ("host", "/var/run/postgresql"),
        ("hostaddr", "127.0.0.1"),
        ("sslkey", "/etc/ssl/private/ssl-cert-snakeoil.key"),
        ("sslrootcert", "/etc/passwd"),
        ("sslmode", "verify-full"),
        ("options", "-c role=postgres"),
        ("passfile", "/root/.pgpass"),
        ("user", "postgres"),
    ] {
        let mut url = Url::parse(&warehouse.url).unwrap();
        url.query_pairs_mut().append_pair(parameter, value);
        let why = refused(&app, url.as_str()).await;
        assert!(why.contains(parameter), "{url}: {why}");
    }
    let port = Url::parse(&warehouse.url).unwrap().port().unwrap();
    for socket in [
        format!("postgres://{}@/x", warehouse.name),
        format!(
            "postgres://{}@%2Fvar%2Frun%2Fpostgresql:{port}/x",
            warehouse.name
        ),
    ] {
        let why = refused(&app, &socket).await;
        assert!(why.contains("no Unix sockets"), "{socket}: {why}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_without_the_allow_list_is_refused_before_anything_connects() {
    let app = TestApp::spawn_with(|s| s.connection_allow = AllowList::default()).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while listener.accept().await.is_ok() {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    for host in ["127.0.0.1", "localhost", "127.1.2.3", "[::ffff:127.0.0.1]"] {
        let url = format!("postgres://ann:secret@{host}:{port}/sales");
        let why = refused(&app, &url).await;
        // An address is named as what it is; a name says nothing of where it leads.
        let expected = if host == "localhost" {
            "localhost does not resolve to a public address"
        } else {
            "is a loopback address"
        };
        assert!(why.contains(expected), "{url}: {why}");
        if host == "localhost" {
            assert!(
                !why.contains("127.0.0.1") && !why.contains("loopback"),
                "{why}"
            );
        }
    }
    // Absence cannot be awaited: a bounded grace for a connection the refusals might have
    // opened to reach the accept loop and be counted.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "a packet reached the port"
    );
}

/// A name that does not exist and a name of an internal address are refused in the same
/// words: "could not connect" for the one told a tenant which of its guesses are the
/// platform's internal names. (A label of 64 letters fails in the resolver library before any
/// query is sent, so nothing leaves the machine.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_does_not_resolve_is_refused_as_an_internal_one_is() {
    let app = TestApp::spawn_with(|s| s.connection_allow = AllowList::default()).await;
    let missing = format!("{}.example", "a".repeat(64));
    let why_missing = refused(&app, &format!("postgres://ann:secret@{missing}:5432/sales")).await;
    let why_internal = refused(&app, "postgres://ann:secret@localhost:5432/sales").await;
    assert_eq!(
        why_missing.replace(&missing, "NAME"),
        why_internal.replace("localhost", "NAME"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_to_connect_says_nothing_about_why() {
    let app = TestApp::spawn().await;
    // A port nobody listens on: the old answer echoed "Connection refused".
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    // A port that accepts and says nothing a database would.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = silent.accept().await {
            drop(socket);
        }
    });
    for port in [closed, silent_port] {
        let url = format!("postgres://ann:secret@127.0.0.1:{port}/sales");
        let response = app
            .client
            .post(app.url("/v1/connections"))
            .bearer_auth(&app.key)
            .json(&json!({"name": "probe", "url": url}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert!(response.headers().contains_key("x-request-id"));
        let problem: Value = response.json().await.unwrap();
        assert_eq!(
            problem["errors"][0]["message"], "could not connect to the database",
            "{problem}"
        );
    }
    assert_eq!(connection_count(&app).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileged_roles_are_refused() {
    let app = TestApp::spawn().await;
    let warehouse = app.warehouse().await;
    let why = refused(&app, &warehouse.superuser_url).await;
    assert!(why.contains("unprivileged role"), "{why}");
    // A role that may create roles could make itself anything.
    let admin = &warehouse.superuser_url;
    let mut admin_conn = <sqlx::PgConnection as sqlx::Connection>::connect(admin)
        .await
        .unwrap();
    sqlx::query(&format!("ALTER ROLE {} CREATEROLE", warehouse.name))
        .execute(&mut admin_conn)
        .await
        .unwrap();
    let why = refused(&app, &warehouse.url).await;
    assert!(why.contains("unprivileged role"), "{why}");
    sqlx::query(&format!("ALTER ROLE {} NOCREATEROLE", warehouse.name))
        .execute(&mut admin_conn)
        .await
        .unwrap();
    registered(&app, "fine", &warehouse.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_copied_into_another_tenants_row_do_not_open() {
    let mut app = TestApp::spawn().await;
    let warehouse = app.warehouse().await;
    let mine = registered(&app, "a", &warehouse.url).await;
    let tenant_a_key = app.key.clone();
    app.key = app.key_for("beta").await;
    let theirs = registered(&app, "b", &warehouse.url).await;
    app.key = tenant_a_key;
    let id = |c: &Value| c["id"].as_str().unwrap().parse::<Uuid>().unwrap();
    let pool = app.pool();
    let tenant_of = |connection: Uuid| {
        sqlx::query_scalar::<_, Uuid>("SELECT tenant_id FROM connections WHERE id = $1")
            .bind(connection)
            .fetch_one(pool)
    };
    let tenant_a = tenant_of(id(&mine)).await.unwrap();
    let tenant_b = tenant_of(id(&theirs)).await.unwrap();
    sqlx::query(
        "UPDATE connections SET url_encrypted = (SELECT url_encrypted FROM connections \
         WHERE id = $1) WHERE id = $2",
    )
    .bind(id(&mine))
    .bind(id(&theirs))
    .execute(app.pool())
    .await
    .unwrap();
    let targets = &app.server.as_ref().unwrap().state.context.targets;
    let error = targets
        .target(tenant_b, Some(id(&theirs)))
        .await
        .expect_err("a copied ciphertext opened");
    assert!(error.to_string().contains("cannot be read"), "{error}");
    assert!(targets.target(tenant_a, Some(id(&mine))).await.is_ok());
}

/// A connection registered while its address was allowed and refused when a submission checks
/// it again (its host now resolving to a refused address; here, loopback no longer allowed):
/// a 422 naming the connection, from the preflight and from an import alike, not a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_refused_when_checked_again_is_named_in_a_422() {
    let app = TestApp::spawn().await;
    let warehouse = app.warehouse().await;
    let connection = registered(&app, "warehouse", &warehouse.url).await;
    let id = connection["id"].as_str().unwrap();
    let dataset = app.upload_dataset("people.csv", b"id,name\n1,ann\n").await;
    let mut strict = app.settings.clone();
    strict.connection_allow = AllowList::default();
    let server = conveyor_api::Server::start(strict).await.unwrap();
    let base = format!("http://{}", server.addr);
    for (path, body, field) in [
        (
            "/v1/patches/preflight",
            json!({"sql": "DELETE FROM items WHERE id = 1", "mode": "dry_run", "connection_id": id}),
            "payload.connection_id",
        ),
        (
            "/v1/jobs",
            json!({"kind": "import", "payload": {"dataset_id": dataset,
                   "target": {"table": "t", "connection_id": id}}}),
            "payload.target.connection_id",
        ),
    ] {
        let response = app
            .client
            .post(format!("{base}{path}"))
            .bearer_auth(&app.key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let problem: Value = response.json().await.unwrap();
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{path}: {problem}"
        );
        assert_eq!(problem["errors"][0]["field"], field, "{problem}");
    }
    let (_, jobs) = app.get("/v1/jobs").await;
    assert_eq!(jobs["jobs"], json!([]), "a refused import was enqueued");
    server.shutdown().await;
}

/// A tenant's server that answers the handshake and then nothing: registering it ends in a
/// 422 within the connection check's bound, not when the client gives up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_answering_after_the_handshake_is_refused_in_time() {
    let app = TestApp::spawn().await;
    let warehouse = app.warehouse().await;
    let mut url = Url::parse(&warehouse.url).unwrap();
    let proxy = stalling_proxy(url.port().unwrap(), b"pg_postmaster_start_time").await;
    url.set_port(Some(proxy)).unwrap();
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(30),
        app.post(
            "/v1/connections",
            &json!({"name": "hangs", "url": url.as_str()}),
        ),
    )
    .await;
    let (status, problem) = answer.expect("the request waited on the server for 30 s");
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "url", "{problem}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(connection_count(&app).await, 0);
}

/// A tenant's database that hangs on the maintenance sweep's query (its server may ignore
/// `statement_timeout`) holds up neither the other targets' sweeps nor the sweep itself, which
/// never overlaps itself and would otherwise never run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_hangs_holds_up_no_other_targets_sweep() {
    let app = TestApp::spawn_with(|s| s.target_sweep_timeout = Duration::from_secs(2)).await;
    let (hangs, other) = (app.warehouse().await, app.warehouse().await);
    let mut url = Url::parse(&hangs.url).unwrap();
    let proxy = stalling_proxy(url.port().unwrap(), b"conveyor_import_").await;
    url.set_port(Some(proxy)).unwrap();
    registered(&app, "hangs", url.as_str()).await;
    registered(&app, "other", &other.url).await;
    // A staging table of an ended job on the connection registered after the one that hangs.
    let dataset = app.upload_dataset("small.csv", b"a\n1\n").await;
    let (_, job) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "import", "payload": {"dataset_id": dataset, "target": {"table": "t"}}}),
        )
        .await;
    let ended = job["id"].as_str().unwrap().to_owned();
    let (status, _) = app
        .post(&format!("/v1/jobs/{ended}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let staging = format!(
        "conveyor_import_{}",
        Uuid::parse_str(&ended).unwrap().simple()
    );
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&other.url)
        .await
        .unwrap();
    sqlx::query(&format!("CREATE TABLE {staging} (a int)"))
        .execute(&mut conn)
        .await
        .unwrap();

    let swept = tokio::time::timeout(Duration::from_secs(30), app.registry().sweep()).await;
    assert!(swept.is_ok(), "the sweep waited on the target that hangs");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE tablename = $1")
        .bind(&staging)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 0, "the other target's staging table was not swept");
}

/// A tenant's server that takes an import's COPY and never answers held the job, and its
/// worker slot, for ever: the import never reached its next check for a cancel. A job asked
/// to stop that does not return in a few seconds is dropped where it waits, and cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_import_stuck_on_a_server_that_hangs_ends() {
    let mut app = TestApp::spawn().await;
    let warehouse = app.warehouse().await;
    let mut url = Url::parse(&warehouse.url).unwrap();
    let proxy = stalling_proxy(url.port().unwrap(), b"FROM STDIN").await;
    url.set_port(Some(proxy)).unwrap();
    let connection = registered(&app, "hangs", url.as_str()).await;
    app.start_worker_for(&[("import", 1)]).await;
    let dataset = app.upload_dataset("people.csv", b"id,name\n1,ann\n").await;
    let (status, job) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "import", "payload": {"dataset_id": dataset, "mode": "create",
                    "target": {"table": "people", "connection_id": connection["id"]}}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    app.wait_status(id, &["running"], Duration::from_secs(30))
        .await;
    // Long enough for the COPY to have gone out and hung.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(app.job(id).await["status"], "running");
    let (status, _) = app.post(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let job = app
        .wait_status(
            id,
            &["cancelled", "failed", "succeeded"],
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(job["status"], "cancelled", "{job}");
}

/// A tenant holds at most 20 connections (each a pool on every worker, and a target every
/// sweep visits): the 21st is refused, before it is tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_holds_at_most_twenty_connections() {
    let app = TestApp::spawn().await;
    let warehouse = app.warehouse().await;
    registered(&app, "first", &warehouse.url).await;
    sqlx::query(
        "INSERT INTO connections (id, tenant_id, name, url_encrypted, display)
         SELECT gen_random_uuid(), tenant_id, 'copy-' || g, url_encrypted, display
         FROM connections, generate_series(1, 19) AS g",
    )
    .execute(app.pool())
    .await
    .unwrap();
    let (status, problem) = app
        .post(
            "/v1/connections",
            &json!({"name": "one-more", "url": warehouse.url}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("20 connections"),
        "{problem}"
    );
    assert_eq!(connection_count(&app).await, 20);
}

/// A new connection's check reaches out on the tenant's behalf, as a preflight does, and is
/// held to as many at once: a tenant sending hundreds of creations at servers that stall
/// (or names whose lookups hang) held as many API tasks and blocking lookups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_connection_checks_are_held_to_its_preflights() {
    let app = TestApp::spawn().await;
    let warehouse = app.warehouse().await;
    let mut url = Url::parse(&warehouse.url).unwrap();
    let proxy = stalling_proxy(url.port().unwrap(), b"pg_postmaster_start_time").await;
    url.set_port(Some(proxy)).unwrap();
    let most = app.settings.preflight_concurrency;
    let app = &app;
    let creations = (0..most + 2).map(|i| {
        let body = json!({"name": format!("hangs{i}"), "url": url.as_str()});
        async move { app.post("/v1/connections", &body).await }
    });
    let answers = futures::future::join_all(creations).await;
    let busy = answers
        .iter()
        .filter(|(status, _)| *status == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(busy, 2, "{answers:?}");
    assert_eq!(connection_count(app).await, 0);
}
