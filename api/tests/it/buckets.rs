//! Watched buckets: a collection following a prefix of the tenant's own bucket (s3rver on
//! loopback, allowed as the operator's `CONVEYOR_CONNECTION_ALLOW` would), registered with
//! credentials that are never shown, and synced by a schedule. The API and the worker run as
//! processes at `RUST_LOG=debug`, so their whole logs can be searched for the secret.

use crate::{
    harness::TestApp,
    ingest::{create_collection, document_ids, search, sync_now, CORPUS},
    objects::{S3Server, BUCKET},
};
use object_store::{aws::AmazonS3Builder, path::Path as Key, ObjectStore, ObjectStoreExt};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::{fs::File, sync::Arc};
use uuid::Uuid;

const KEY_ID: &str = "AKIDWATCHTEST";

/// The tenant's own client of the bucket, to change its objects between syncs.
fn tenant_client(s3: &S3Server, secret: &str) -> Arc<dyn ObjectStore> {
    Arc::new(
        AmazonS3Builder::new()
            .with_endpoint(format!("http://127.0.0.1:{}", s3.port))
            .with_bucket_name(BUCKET)
            .with_region("us-east-1")
            .with_access_key_id(KEY_ID)
            .with_secret_access_key(secret)
            .with_allow_http(true)
            .build()
            .unwrap(),
    )
}

async fn put(bucket: &Arc<dyn ObjectStore>, key: &str, text: &str) {
    bucket
        .put(&Key::from(key), text.to_owned().into_bytes().into())
        .await
        .unwrap();
}

async fn delete_as(app: &TestApp, key: &str, path: &str) -> StatusCode {
    app.client
        .delete(app.url(path))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .status()
}

/// Between two syncs an object is added, one changed and one deleted: the second sync
/// indexes the new and changed ones, skips the unchanged one and removes the deleted one's
/// document; an object outside the prefix is never read. The attacks: a read key cannot
/// register, another tenant cannot see, delete or ingest from the bucket (404), a `..` prefix
/// is a 422, forbidden endpoints are refused naming the reason, and the secret is in no answer,
/// no audit row, no log line, and not in clear in the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_follows_a_bucket_prefix_and_never_shows_its_secret() {
    let secret = format!("sekret-{}", Uuid::now_v7().simple());
    let s3 = S3Server::start_with_key(KEY_ID, &secret);
    let bucket = tenant_client(&s3, &secret);
    let mut app = TestApp::spawn().await;
    let logs = std::env::temp_dir().join(format!("conveyor-bucket-logs-{}", Uuid::now_v7()));
    std::fs::create_dir_all(&logs).unwrap();
    // The operator's allow list (loopback) and a verbose log in both processes.
    let env = [
        ("CONVEYOR_CONNECTION_ALLOW", "127.0.0.0/8"),
        ("RUST_LOG", "debug"),
    ];
    let (_api, base) = app
        .spawn_api_process_logging(&env, File::create(logs.join("api.log")).unwrap())
        .await;
    app.base = base;
    let _worker = app.spawn_worker_process_logging(
        "ingest=1",
        &env,
        File::create(logs.join("worker.log")).unwrap(),
    );

    put(&bucket, "handbook/passwords.md", CORPUS[0].2).await;
    put(&bucket, "handbook/orders/refunds.txt", CORPUS[1].2).await;
    put(&bucket, "handbook/volcano.md", CORPUS[4].2).await;
    put(&bucket, "elsewhere/bread.md", CORPUS[6].2).await;

    let endpoint = format!("http://127.0.0.1:{}", s3.port);
    let registration = |endpoint: &str, secret: &str| {
        json!({"name": "docs", "endpoint": endpoint, "bucket": BUCKET,
               "access_key_id": KEY_ID, "secret_access_key": secret})
    };
    let mut answers: Vec<Value> = Vec::new();

    // Refused: a read key; forbidden addresses (named); a wrong secret; bad fields.
    let (status, read_key) = app.post("/v1/keys", &json!({"role": "read"})).await;
    assert_eq!(status, StatusCode::CREATED, "{read_key}");
    let (status, body) = app
        .post_as(
            read_key["key"].as_str().unwrap(),
            "/v1/buckets",
            &registration(&endpoint, &secret),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    answers.push(body);
    for (endpoint, why) in [
        ("http://10.0.0.1:9000", "private"),
        ("http://169.254.169.254", "cloud metadata"),
        ("http://[::ffff:192.168.1.1]:9000", "private"),
    ] {
        let (status, body) = app
            .post("/v1/buckets", &registration(endpoint, &secret))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(body["errors"][0]["field"], "endpoint", "{body}");
        let message = body["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains(why), "{endpoint}: {message}");
        answers.push(body);
    }
    // A key the service does not know (s3rver checks key ids, not SigV4 signatures).
    let mut unknown_key = registration(&endpoint, &secret);
    unknown_key["access_key_id"] = json!("AKIDUNKNOWN");
    let (status, body) = app.post("/v1/buckets", &unknown_key).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["errors"][0]["field"], "endpoint", "{body}");
    answers.push(body);
    let (status, body) = app
        .post(
            "/v1/buckets",
            &json!({"name": "", "endpoint": "ftp://x", "bucket": "UPPER", "region": "EU",
                    "access_key_id": KEY_ID, "secret_access_key": secret}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["name", "endpoint", "bucket", "region"], "{body}");
    answers.push(body);
    let (_, listed) = app.get("/v1/buckets").await;
    assert_eq!(listed, json!([]), "nothing registered by a refused request");

    // Registered: the answer shows everything but the key.
    let (status, created) = app
        .post("/v1/buckets", &registration(&endpoint, &secret))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["endpoint"], endpoint);
    assert_eq!(created["region"], "us-east-1");
    let bucket_id: Uuid = created["id"].as_str().unwrap().parse().unwrap();
    answers.push(created);
    let sealed: Vec<u8> = sqlx::query_scalar("SELECT credentials_encrypted FROM buckets")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert!(
        !sealed.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "the secret in clear in the database"
    );
    let (status, body) = app
        .post("/v1/buckets", &registration(&endpoint, &secret))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    let collection = create_collection(&app, json!({"name": "handbook"})).await;
    let job = |bucket: Uuid, prefix: &str| {
        json!({"kind": "ingest", "payload": {"collection_id": collection,
               "documents": [{"bucket_id": bucket, "prefix": prefix, "metadata": {"source": "s3"}}]}})
    };

    // Another tenant: no bucket of its own to see, none of ours to delete or read from.
    let other = app.key_for("globex").await;
    let other_collection = {
        let (status, body) = app
            .post_as(&other, "/v1/collections", &json!({"name": "theirs"}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_str().unwrap().to_owned()
    };
    let theirs = json!({"kind": "ingest", "payload": {"collection_id": other_collection,
                        "documents": [{"bucket_id": bucket_id, "prefix": "handbook"}]}});
    let (status, body) = app.post_as(&other, "/v1/jobs", &theirs).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = app
        .post_as(
            &other,
            "/v1/schedules",
            &json!({"name": "steal", "cron": "@daily", "job": theirs}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(
        delete_as(&app, &other, &format!("/v1/buckets/{bucket_id}")).await,
        StatusCode::NOT_FOUND
    );
    let response = app
        .client
        .get(app.url("/v1/buckets"))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(response.json::<Value>().await.unwrap(), json!([]));

    // A prefix out of the bucket's names is refused where the schedule is made.
    for prefix in ["../handbook", "handbook/../elsewhere", "/handbook"] {
        let (status, refused) = app
            .post(
                "/v1/schedules",
                &json!({"name": "escape", "cron": "@daily", "job": job(bucket_id, prefix)}),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
        assert_eq!(
            refused["errors"][0]["field"], "job.payload.documents[0].prefix",
            "{refused}"
        );
    }

    let (status, schedule) = app
        .post(
            "/v1/schedules",
            &json!({"name": "sync", "cron": "@daily", "job": job(bucket_id, "handbook/")}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{schedule}");
    let schedule = schedule["id"].as_str().unwrap().to_owned();
    let sync = async |n: usize| sync_now(&app, &schedule, n).await;
    let stored = async || -> Vec<(String, Value)> {
        sqlx::query_as("SELECT id, metadata FROM documents WHERE collection_id = $1 ORDER BY id")
            .bind(collection)
            .fetch_all(app.pool())
            .await
            .unwrap()
    };
    let counts = |job: &Value| {
        let r = &job["result"];
        [
            &r["documents"],
            &r["indexed"],
            &r["unchanged"],
            &r["deleted"],
        ]
        .map(|v| v.clone())
    };

    let first = sync(1).await;
    assert_eq!(
        counts(&first),
        [json!(3), json!(3), json!(0), json!(0)],
        "{first}"
    );
    let ids: Vec<String> = stored().await.into_iter().map(|(id, _)| id).collect();
    assert_eq!(
        ids,
        [
            "s3://conveyor/handbook/orders/refunds.txt",
            "s3://conveyor/handbook/passwords.md",
            "s3://conveyor/handbook/volcano.md"
        ]
    );
    let metadata = &stored().await[0].1;
    assert_eq!(metadata["source"], "s3");
    assert_eq!(metadata["watched_prefix"], "s3://conveyor/handbook");
    answers.push(first);

    // Between the syncs: one object added, one changed, one deleted, one left as it was.
    put(&bucket, "handbook/shipping.md", CORPUS[2].2).await;
    put(&bucket, "handbook/passwords.md", CORPUS[5].2).await;
    bucket
        .delete(&Key::from("handbook/volcano.md"))
        .await
        .unwrap();
    let second = sync(2).await;
    assert_eq!(
        counts(&second),
        [json!(3), json!(2), json!(1), json!(1)],
        "{second}"
    );
    let ids: Vec<String> = stored().await.into_iter().map(|(id, _)| id).collect();
    assert_eq!(
        ids,
        [
            "s3://conveyor/handbook/orders/refunds.txt",
            "s3://conveyor/handbook/passwords.md",
            "s3://conveyor/handbook/shipping.md"
        ]
    );
    let found = search(
        &app,
        collection,
        json!({"query": "borrow checker memory safety", "mode": "keyword"}),
    )
    .await;
    assert_eq!(
        document_ids(&found),
        ["s3://conveyor/handbook/passwords.md"],
        "changed"
    );
    let gone = search(
        &app,
        collection,
        json!({"query": "magma lava", "mode": "keyword"}),
    )
    .await;
    assert!(gone.is_empty(), "the deleted object's chunks: {gone:?}");
    answers.push(second);

    // Deleted: gone from the list.
    let status = app.delete(&format!("/v1/buckets/{bucket_id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let schedule_path = format!("/v1/schedules/{schedule}");
    for path in ["/v1/buckets", "/v1/audit", schedule_path.as_str()] {
        let (status, body) = app.get(path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        answers.push(body);
    }
    let (_, audit) = app.get("/v1/audit").await;
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .filter(|a| a.starts_with("bucket."))
        .collect();
    assert_eq!(actions, ["bucket.delete", "bucket.create"], "{audit}");

    // The secret: in no answer, no audit row, no log line; sealed in the database.
    for answer in &answers {
        assert!(!answer.to_string().contains(&secret), "{answer}");
    }
    let in_clear: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM audit_log a WHERE strpos(a::text, $1) > 0)
              + (SELECT count(*) FROM jobs j WHERE strpos(j::text, $1) > 0)
              + (SELECT count(*) FROM schedules s WHERE strpos(s::text, $1) > 0)",
    )
    .bind(&secret)
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(in_clear, 0);
    drop((_worker, _api));
    for name in ["api.log", "worker.log"] {
        let log = std::fs::read_to_string(logs.join(name)).unwrap();
        assert!(log.len() > 1000, "{name} logged little: {log}");
        assert!(!log.contains(&secret), "the secret in {name}");
    }
    std::fs::remove_dir_all(&logs).unwrap();
}

/// A tenant holds at most 20 buckets: the 21st is refused, before its endpoint is listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_holds_at_most_twenty_buckets() {
    let s3 = S3Server::start();
    let app = TestApp::spawn().await;
    let endpoint = format!("http://127.0.0.1:{}", s3.port);
    let registration = |name: &str| {
        json!({"name": name, "endpoint": endpoint, "bucket": BUCKET,
               "access_key_id": "S3RVER", "secret_access_key": "S3RVER"})
    };
    let (status, body) = app.post("/v1/buckets", &registration("first")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    sqlx::query(
        "INSERT INTO buckets (id, tenant_id, name, endpoint, bucket, region, credentials_encrypted)
         SELECT gen_random_uuid(), tenant_id, 'copy-' || g, endpoint, bucket, region,
                credentials_encrypted
         FROM buckets, generate_series(1, 19) AS g",
    )
    .execute(app.pool())
    .await
    .unwrap();
    let (status, problem) = app.post("/v1/buckets", &registration("one-more")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert!(
        problem["detail"].as_str().unwrap().contains("20 buckets"),
        "{problem}"
    );
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM buckets")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(held, 20);
}
