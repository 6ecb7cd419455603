//! Tenant B attacks tenant A and the platform on the default target database. Each attack
//! asserts the refusal and that nothing changed: A's tables, `tenants`, `api_keys` and A's jobs
//! have the same checksums after as before.

use crate::harness::{tenant_target_url, TestApp};
use serde_json::{json, Value};
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

async fn scalar(pool: &PgPool, sql: &str) -> String {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Everything B must not change: A's table (as the superuser reads it), the control plane's
/// tenants and keys, A's jobs.
async fn fingerprint(app: &TestApp, admin: &PgPool) -> Vec<String> {
    let a_schema = shared::tenancy::schema(app.tenant);
    let rows = |table: &str| {
        format!("SELECT coalesce(md5(string_agg(md5(t::text), '' ORDER BY t::text)), '') FROM {table} t")
    };
    vec![
        scalar(admin, &rows(&format!("{a_schema}.orders"))).await,
        scalar(app.pool(), &rows("tenants")).await,
        // Who holds which key, and whether it is revoked (not when it was last used).
        scalar(
            app.pool(),
            "SELECT md5(string_agg(md5((id, tenant_id, key_hash, role, revoked_at)::text), ''
                                   ORDER BY id)) FROM api_keys",
        )
        .await,
        scalar(
            app.pool(),
            &format!(
                "SELECT coalesce(md5(string_agg(md5(j::text), '' ORDER BY j.id)), '')
                 FROM jobs j WHERE tenant_id = '{}'",
                app.tenant
            ),
        )
        .await,
        scalar(admin, &rows("conveyor_snapshots.patches")).await,
        scalar(admin, &rows("conveyor.imports")).await,
    ]
}

/// A with an `orders` table of three rows (made by an import, as a tenant makes it), B with a
/// key of its own, a worker for imports and patches.
async fn two_tenants() -> (TestApp, String, Uuid, PgPool) {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("import", 1), ("patch", 1), ("patch_rollback", 1)])
        .await;
    let dataset = app
        .upload_dataset("orders.csv", b"id,amount\n1,10\n2,20\n3,30\n")
        .await;
    let (status, job) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "import", "payload": {
                "dataset_id": dataset, "target": {"table": "orders"}, "mode": "create"}}),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    let done = app.wait_status(id, &["succeeded", "failed"], WAIT).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    // A patch walks a key: A gives its table one, as its own role.
    let as_a = PgPool::connect(&app.target_url()).await.unwrap();
    sqlx::query("ALTER TABLE orders ADD PRIMARY KEY (id)")
        .execute(&as_a)
        .await
        .unwrap();
    let (b_tenant, b_key) = app.tenant_key("beta").await;
    let admin = PgPool::connect(&app.target_admin_url()).await.unwrap();
    // The registry exists from the start so that its checksum means something.
    let platform = PgPool::connect(&app.settings.target_database_url)
        .await
        .unwrap();
    jobs::patch::snapshot::ensure_schema(&platform)
        .await
        .unwrap();
    (app, b_key, b_tenant, admin)
}

fn field_errors(body: &Value) -> String {
    body["errors"].to_string()
}

#[tokio::test]
async fn imports_into_another_tenant_or_the_platform_are_refused() {
    let (app, b_key, _, admin) = two_tenants().await;
    let before = fingerprint(&app, &admin).await;
    let a_schema = shared::tenancy::schema(app.tenant);
    let b_dataset = {
        let response = app
            .client
            .post(app.url("/v1/datasets"))
            .query(&[("name", "evil.csv")])
            .bearer_auth(&b_key)
            .body("id,amount\n1,666\n")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        response.json::<Value>().await.unwrap()["id"].clone()
    };
    for (schema, mode, keys) in [
        (a_schema.as_str(), "replace", json!([])),
        (a_schema.as_str(), "append", json!([])),
        (a_schema.as_str(), "upsert", json!(["id"])),
        ("public", "create", json!([])),
        ("conveyor", "append", json!([])),
        ("conveyor_snapshots", "create", json!([])),
        ("pg_catalog", "create", json!([])),
        ("information_schema", "create", json!([])),
    ] {
        let (status, body) = app
            .post_as(
                &b_key,
                "/v1/jobs",
                &json!({"kind": "import", "payload": {
                "dataset_id": b_dataset, "mode": mode, "key_columns": keys,
                "target": {"schema": schema, "table": "orders"}}}),
            )
            .await;
        assert_eq!(status, 422, "{schema} {mode}: {body}");
        assert!(
            field_errors(&body).contains("payload.target.schema"),
            "{schema} {mode}: {body}"
        );
    }
    // The ledger itself, by name, in any mode.
    let (status, body) = app
        .post_as(
            &b_key,
            "/v1/jobs",
            &json!({"kind": "import", "payload": {
            "dataset_id": b_dataset, "mode": "append",
            "target": {"schema": "conveyor", "table": "imports"}}}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(field_errors(&body).contains("reserved"), "{body}");
    // Without a schema B's import lands in B's own schema, beside A's table of the same name.
    let (status, job) = app
        .post_as(
            &b_key,
            "/v1/jobs",
            &json!({"kind": "import", "payload": {
            "dataset_id": b_dataset, "mode": "create", "target": {"table": "orders"}}}),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    let response = app
        .client
        .get(app.url(&format!("/v1/jobs/{id}")))
        .bearer_auth(&b_key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    for _ in 0..600 {
        let row: (String,) = sqlx::query_as("SELECT status FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(app.pool())
            .await
            .unwrap();
        if row.0 == "succeeded" || row.0 == "failed" {
            assert_eq!(row.0, "succeeded");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ledger_before = before[5].clone();
    let after = fingerprint(&app, &admin).await;
    assert_eq!(
        before[..4],
        after[..4],
        "A's table and the control plane unchanged"
    );
    assert_ne!(after[5], ledger_before, "B's own import is in the ledger");
}

#[tokio::test]
async fn patches_and_dry_runs_cannot_reach_another_tenant_or_probe_its_tables() {
    let (app, b_key, _, admin) = two_tenants().await;
    let before = fingerprint(&app, &admin).await;
    let a_schema = shared::tenancy::schema(app.tenant);
    let missing_schema = shared::tenancy::schema(Uuid::now_v7());
    let mut refusals = Vec::new();
    for schema in [a_schema.as_str(), missing_schema.as_str()] {
        for mode in ["dry_run", "execute"] {
            let payload = json!({"sql": format!("UPDATE {schema}.orders SET amount = 0 WHERE id = 1"),
                                 "mode": mode});
            let (status, body) = app
                .post_as(
                    &b_key,
                    "/v1/jobs",
                    &json!({"kind": "patch", "payload": payload}),
                )
                .await;
            assert_eq!(status, 422, "{schema} {mode}: {body}");
            let (status, preflight) = app.post_as(&b_key, "/v1/patches/preflight", &payload).await;
            assert_eq!(status, 422, "{preflight}");
            refusals.push(preflight["errors"].to_string().replace(schema, "<schema>"));
        }
    }
    // The same answer whether A's schema exists or not: no probing of names.
    assert!(refusals.windows(2).all(|w| w[0] == w[1]), "{refusals:?}");
    assert!(refusals[0].contains("its own schema"), "{refusals:?}");
    // Unqualified, the name resolves in B's own schema, where there is no `orders`.
    let (status, body) = app
        .post_as(
            &b_key,
            "/v1/patches/preflight",
            &json!({"sql": "DELETE FROM orders WHERE id = 1", "mode": "dry_run"}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(field_errors(&body).contains("does not exist"), "{body}");
    // The platform's tables and the system's.
    for table in [
        "conveyor_snapshots.patches",
        "conveyor.imports",
        "pg_catalog.pg_class",
        "information_schema.tables",
    ] {
        let (status, body) = app.post_as(&b_key,
            "/v1/jobs",
            &json!({"kind": "patch", "payload": {
                "sql": format!("DELETE FROM {table} WHERE job_id IS NOT NULL"), "mode": "execute"}}),
        )
        .await;
        assert_eq!(status, 422, "{table}: {body}");
        assert!(field_errors(&body).contains("reserved"), "{table}: {body}");
    }
    assert_eq!(before, fingerprint(&app, &admin).await);
}

#[tokio::test]
async fn postgres_itself_refuses_a_tenant_role_everything_outside_its_schema() {
    let (app, _, b_tenant, admin) = two_tenants().await;
    let before = fingerprint(&app, &admin).await;
    let a_schema = shared::tenancy::schema(app.tenant);
    let as_b = PgPool::connect(&tenant_target_url(
        &app.settings.target_database_url,
        b_tenant,
    ))
    .await
    .unwrap();
    for sql in [
        format!("SELECT * FROM {a_schema}.orders"),
        format!("UPDATE {a_schema}.orders SET amount = 0"),
        format!("DROP TABLE {a_schema}.orders"),
        format!("CREATE TABLE {a_schema}.planted (a int)"),
        "INSERT INTO conveyor.imports (job_id, result) VALUES (gen_random_uuid(), '{}')".into(),
        "DELETE FROM conveyor_snapshots.patches".into(),
        "CREATE TABLE conveyor_snapshots.patch_00000000000000000000000000000000 (a int)".into(),
        "CREATE TABLE public.planted (a int)".into(),
        "CREATE SCHEMA planted".into(),
    ] {
        let refused = match sqlx::raw_sql(&sql).execute(&as_b).await {
            Err(refused) => refused,
            Ok(_) => panic!("{sql} went through"),
        };
        let code = refused
            .as_database_error()
            .and_then(|e| e.code())
            .unwrap_or_default()
            .to_string();
        assert_eq!(code, "42501", "{sql}: {refused}"); // insufficient_privilege
    }
    assert_eq!(before, fingerprint(&app, &admin).await);
}

#[tokio::test]
async fn a_planted_snapshot_registry_row_never_becomes_sql() {
    let (app, _, _, admin) = two_tenants().await;
    let a_schema = shared::tenancy::schema(app.tenant);
    // What a tenant could once write through an import into the shared target: a registry
    // row whose snapshot table "name" is SQL, expired so that the sweep drops it.
    let platform = PgPool::connect(&app.settings.target_database_url)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO conveyor_snapshots.patches (job_id, table_name, key_columns, operation,
             statement, snapshot_table, rows_expected, expires_at)
         VALUES ($1, 'x', '{id}', 'update', 'x', $2, 0, now() - interval '1 day')",
    )
    .bind(Uuid::now_v7())
    .bind(format!("{a_schema}.orders; DROP TABLE {a_schema}.orders"))
    .execute(&admin)
    .await
    .unwrap();
    let before = fingerprint(&app, &admin).await;
    let dropped = jobs::patch::snapshot::sweep(&platform).await.unwrap();
    assert_eq!(dropped.len(), 1);
    assert!(
        dropped[0].starts_with("\"conveyor_snapshots\".\"patch_"),
        "{dropped:?}"
    );
    let after = fingerprint(&app, &admin).await;
    assert_eq!(
        before[..4],
        after[..4],
        "A's table is still there, unchanged"
    );
    assert_eq!(
        scalar(
            &admin,
            &format!("SELECT count(*)::text FROM {a_schema}.orders")
        )
        .await,
        "3"
    );
}

#[tokio::test]
async fn target_sessions_run_as_the_tenant_within_bounds() {
    let app = TestApp::spawn().await;
    let services = jobs::Services::new(
        std::sync::Arc::new(app.settings.clone()),
        app.pool().clone(),
    )
    .unwrap();
    let target = services.targets.target(app.tenant, None).await.unwrap();
    let (user, path, statement, lock, idle): (String, String, String, String, String) =
        sqlx::query_as(
            "SELECT current_user::text, current_setting('search_path'),
                    current_setting('statement_timeout'), current_setting('lock_timeout'),
                    current_setting('idle_in_transaction_session_timeout')",
        )
        .fetch_one(&target.pool)
        .await
        .unwrap();
    assert_eq!(user, shared::tenancy::role(app.tenant));
    assert_eq!(path, shared::tenancy::schema(app.tenant));
    assert_eq!(
        [statement, lock, idle],
        ["10min", "10s", "1min"],
        "Settings::for_test's bounds"
    );
    let platform_user: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&target.platform)
        .await
        .unwrap();
    assert_eq!(platform_user, "conveyor_platform");
}

#[tokio::test]
async fn a_preflight_on_a_locked_table_ends_within_its_bound() {
    let (app, _, _, admin) = two_tenants().await;
    let a_schema = shared::tenancy::schema(app.tenant);
    // Another session holds the table: catalog reads pass, EXPLAIN waits for the lock.
    let mut locker = admin.begin().await.unwrap();
    sqlx::query(&format!(
        "LOCK TABLE {a_schema}.orders IN ACCESS EXCLUSIVE MODE"
    ))
    .execute(&mut *locker)
    .await
    .unwrap();
    let (status, body) = app
        .post(
            "/v1/patches/preflight",
            &json!({"sql": "UPDATE orders SET amount = 1 WHERE id = 1", "mode": "dry_run"}),
        )
        .await;
    locker.rollback().await.unwrap();
    assert_eq!(status, 503, "a bounded refusal, not a hang: {body}");
    assert!(
        !body.to_string().contains("canceling statement"),
        "no raw database error: {body}"
    );
}

#[tokio::test]
async fn the_api_refuses_a_superuser_or_the_control_plane_as_default_target() {
    let app = TestApp::spawn().await;
    let superuser = app.target_admin_url();
    let mut settings = app.settings.clone();
    settings.target_database_url = superuser;
    let refused = conveyor_api::Server::start(settings).await.err().unwrap();
    assert!(
        refused.to_string().contains("unprivileged role"),
        "{refused}"
    );

    let mut settings = app.settings.clone();
    let mut control = url::Url::parse(&app.settings.database_url).unwrap();
    control.set_username("conveyor_platform").unwrap();
    settings.target_database_url = control.to_string();
    let refused = conveyor_api::Server::start(settings).await.err().unwrap();
    assert!(refused.to_string().contains("control-plane"), "{refused}");
}
