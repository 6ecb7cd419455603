//! Datasets and artifacts in an S3-compatible bucket: s3rver (a real S3 server over HTTP,
//! objects on disk; `scripts/browser-deps` installs it under tests/s3) on its own port.

use crate::harness::{KillOnDrop, TestApp};
use serde_json::json;
use shared::objects::BucketConfig;
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};
use uuid::Uuid;

pub(crate) const BUCKET: &str = "conveyor";

pub(crate) struct S3Server {
    pub port: u16,
    dir: PathBuf,
    child: Option<KillOnDrop>,
}

/// s3rver with one more access key (its own is `S3RVER`/`S3RVER`), for tests that look for the
/// secret where it must not be: argv is the module's directory, port, data directory, bucket.
const S3RVER_WITH_KEY: &str = "
const [root, port, directory, bucket] = process.argv.slice(1);
require(root + '/lib/models/account').DUMMY_ACCOUNT.createKeyPair(
    process.env.S3_ACCESS_KEY_ID, process.env.S3_SECRET_ACCESS_KEY);
const S3rver = require(root);
new S3rver({address: '127.0.0.1', port: Number(port), silent: true, directory,
            configureBuckets: [{name: bucket, configs: []}]}).run();
";

impl S3Server {
    pub(crate) fn start() -> Self {
        let (port, dir) = Self::place();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/s3");
        let mut command = Command::new("node");
        command
            .arg(root.join("node_modules/s3rver/bin/s3rver.js"))
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "--silent"])
            .args(["--configure-bucket", BUCKET, "-d"])
            .arg(&dir);
        Self::spawn(command, port, dir)
    }

    /// With the access key `(id, secret)` accepted too.
    pub(crate) fn start_with_key(id: &str, secret: &str) -> Self {
        let (port, dir) = Self::place();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/s3/node_modules/s3rver");
        let mut command = Command::new("node");
        command
            .args(["-e", S3RVER_WITH_KEY])
            .arg(root)
            .arg(port.to_string())
            .arg(&dir)
            .arg(BUCKET)
            .env("S3_ACCESS_KEY_ID", id)
            .env("S3_SECRET_ACCESS_KEY", secret);
        Self::spawn(command, port, dir)
    }

    /// A free port and a fresh data directory.
    fn place() -> (u16, PathBuf) {
        let port = crate::harness::free_port();
        let dir = std::env::temp_dir().join(format!("conveyor-s3-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        (port, dir)
    }

    fn spawn(mut command: Command, port: u16, dir: PathBuf) -> Self {
        let child = command
            .stdout(Stdio::null())
            .spawn()
            .expect("s3rver (scripts/browser-deps installs it)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "s3rver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            port,
            dir,
            child: Some(KillOnDrop(child)),
        }
    }

    fn config(&self) -> BucketConfig {
        let option = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        BucketConfig {
            url: format!("s3://{BUCKET}/deployment"),
            options: vec![
                option("aws_endpoint", &format!("http://127.0.0.1:{}", self.port)),
                option("aws_allow_http", "true"),
                option("aws_region", "us-east-1"),
                option("aws_access_key_id", "S3RVER"),
                option("aws_secret_access_key", "S3RVER"),
            ],
        }
    }

    /// Files s3rver keeps for objects whose key contains `part`.
    fn objects_named(&self, part: &str) -> Vec<PathBuf> {
        files_under(&self.dir)
            .into_iter()
            .filter(|p| p.to_string_lossy().contains(part))
            .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.child.take(); // killed and reaped before its files go
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .flat_map(|e| {
            let path = e.path();
            if path.is_dir() {
                files_under(&path)
            } else {
                vec![path]
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datasets_and_artifacts_live_in_an_s3_bucket() {
    let s3 = S3Server::start();
    let mut app = TestApp::spawn_with(|s| s.object_store = Some(s3.config())).await;
    // About 20 MB: a multipart upload of three parts.
    let mut csv = b"id,amount,name\n".to_vec();
    for i in 0..700_000 {
        csv.extend_from_slice(format!("{i},{}.25,name number {i}\n", i % 1000).as_bytes());
    }
    csv.extend_from_slice(b"oops,not a number,bad row\n");
    let dataset = app.upload_dataset("orders.csv", &csv).await;

    // Stored in the bucket under the deployment's prefix, not in the data directory.
    let id = dataset.to_string();
    assert!(!s3.objects_named(&id).is_empty(), "no object for {id}");
    assert!(
        files_under(&app.settings.data_dir)
            .iter()
            .all(|p| !p.to_string_lossy().contains(&id)),
        "the dataset was kept locally"
    );
    let (status, bytes) = app
        .get_bytes(&format!("/v1/datasets/{dataset}/download"))
        .await;
    assert_eq!(status, 200);
    assert!(
        bytes == csv,
        "downloaded {} of {} bytes",
        bytes.len(),
        csv.len()
    );

    // A worker reads it from the bucket; the rejected rows go back as an artifact.
    app.start_worker_for(&[("import", 1)]).await;
    let (status, job) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "import", "payload": {
                "dataset_id": dataset, "target": {"table": "orders"}, "mode": "create",
                "columns": [{"source": "id", "type": "bigint"}, {"source": "amount", "type": "numeric"},
                            {"source": "name", "type": "text"}],
                "on_error": "skip"}}),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let job_id = job["id"].as_str().unwrap().parse().unwrap();
    let job = app
        .wait_status(job_id, &["succeeded", "failed"], Duration::from_secs(120))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"]["rows_imported"], 700_000, "{job}");
    let (status, rejected) = app
        .get_bytes(&format!("/v1/jobs/{job_id}/artifacts/rejected.csv"))
        .await;
    assert_eq!(status, 200);
    let rejected = String::from_utf8(rejected).unwrap();
    assert!(
        rejected.starts_with("line,column,reason,record\n700002,id,"),
        "{rejected}"
    );
    assert!(!s3.objects_named("rejected.csv").is_empty());

    // Deleting the dataset deletes the object.
    let status = app.delete(&format!("/v1/datasets/{dataset}")).await;
    assert_eq!(status, 204);
    assert!(s3.objects_named(&id).is_empty(), "object left after delete");
    let (status, body) = app
        .get_bytes(&format!("/v1/datasets/{dataset}/download"))
        .await;
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saved_models_live_in_the_bucket_and_go_with_their_delete() {
    let s3 = S3Server::start();
    let local = std::env::temp_dir().join(format!("conveyor-models-{}", uuid::Uuid::new_v4()));
    let store = shared::objects::ObjectStore::with_bucket(&local, Some(&s3.config())).unwrap();
    let (tenant, model) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let bytes = br#"{"format":"conveyor.gaussian_copula.v1"}"#;
    let key = store.put_model(tenant, model, bytes).await.unwrap();
    assert_eq!(key, format!("tenants/{tenant}/models/{model}"));
    assert!(!s3.objects_named(&model.to_string()).is_empty());
    assert!(files_under(&local)
        .iter()
        .all(|p| !p.to_string_lossy().contains(&model.to_string())));
    assert_eq!(
        store.read_model(tenant, model).await.unwrap().unwrap(),
        bytes
    );
    // Another tenant's key holds nothing.
    assert!(store
        .read_model(uuid::Uuid::now_v7(), model)
        .await
        .unwrap()
        .is_none());
    store.delete_model(tenant, model).await.unwrap();
    assert!(s3.objects_named(&model.to_string()).is_empty());
    assert!(store.read_model(tenant, model).await.unwrap().is_none());
    let _ = std::fs::remove_dir_all(&local);
}

/// A worker's cache of downloaded datasets keeps to `CONVEYOR_CACHE_MAX_BYTES`: a download
/// past it removes the least recently used copy that no job holds, so datasets, deleted ones
/// included, do not pile up on a worker's disk for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_dataset_cache_keeps_its_bound() {
    let s3 = S3Server::start();
    let mut app = TestApp::spawn_with(|s| {
        s.object_store = Some(s3.config());
        s.cache_max_bytes = 1;
    })
    .await;
    app.start_worker_for(&[("import", 1)]).await;
    let mut imported = Vec::new();
    for (name, table) in [("first.csv", "first"), ("second.csv", "second")] {
        let dataset = app.upload_dataset(name, b"id\n1\n2\n").await;
        let job = import(&app, dataset, table).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(
            cached_copies(&app, dataset).len(),
            1,
            "{name} was not cached"
        );
        imported.push(dataset);
    }
    assert!(
        cached_copies(&app, imported[0]).is_empty(),
        "the first dataset's copy outlived the cache's bound"
    );
    // The copy the last job held stays until a later download needs its room.
    assert_eq!(cached_copies(&app, imported[1]).len(), 1);
}

/// A dataset replaced under its id (a retried synthesis writes its output again, and a
/// private fit's noise makes it differ): a worker that cached the first bytes reads the new
/// ones, not its copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_dataset_is_not_read_from_the_cached_copy() {
    let s3 = S3Server::start();
    let mut app = TestApp::spawn_with(|s| s.object_store = Some(s3.config())).await;
    app.start_worker_for(&[("import", 1)]).await;
    let dataset = app.upload_dataset("out.csv", b"id\n1\n2\n").await;
    let job = import(&app, dataset, "first").await;
    assert_eq!(job["result"]["rows_imported"], 2, "{job}");
    assert_eq!(cached_copies(&app, dataset).len(), 1);

    // As `record_output` does for a retried attempt: the new bytes, then the new record.
    let bytes = b"id\n1\n2\n3\n";
    let objects = shared::objects::ObjectStore::from_settings(&app.settings).unwrap();
    let scratch = objects.scratch_path().await.unwrap();
    std::fs::write(&scratch, bytes).unwrap();
    objects
        .put_dataset(&scratch, app.tenant, dataset)
        .await
        .unwrap();
    let mut record = shared::datasets::get(app.pool(), app.tenant, dataset)
        .await
        .unwrap()
        .unwrap();
    record.size_bytes = bytes.len() as i64;
    record.sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes));
    shared::datasets::record_output(app.pool(), &record)
        .await
        .unwrap()
        .unwrap();

    let job = import(&app, dataset, "second").await;
    assert_eq!(
        job["result"]["rows_imported"], 3,
        "the first bytes were read from the cache: {job}"
    );
}

/// A bucket that takes connections and never answers: a job's delete answers 503 within the
/// deletion timeout and keeps the job (its row was locked while the store was waited on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_against_a_store_that_never_answers_is_a_503_and_keeps_the_job() {
    let bucket = shared::testing::silent_bucket().await;
    let app = TestApp::spawn_with(|s| {
        s.object_store = Some(bucket);
        s.object_delete_timeout = Duration::from_secs(1);
    })
    .await;
    let job = app.submit_canary(json!({})).await;
    sqlx::query("UPDATE jobs SET status = 'succeeded', finished_at = now() WHERE id = $1")
        .bind(job)
        .execute(app.pool())
        .await
        .unwrap();

    let (status, problem) = tokio::time::timeout(
        Duration::from_secs(20),
        app.delete_answered(&format!("/v1/jobs/{job}")),
    )
    .await
    .expect("the delete answers within the store's timeout");
    assert_eq!(status, 503, "{problem}");
    assert!(
        !problem.to_string().contains("127.0.0.1"),
        "the store's address is not the client's to read: {problem}"
    );
    assert_eq!(app.job(job).await["status"], "succeeded");
}

/// A dataset deleted while its store does not answer: the row goes (204, within the store's
/// timeout) and its file is marked for the worker's object-deletes duty. Before, one try was
/// made and its failure logged: a file no route showed and no quota counted, for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_deleted_while_its_store_fails_leaves_its_file_marked() {
    let bucket = shared::testing::silent_bucket().await;
    let app = TestApp::spawn_with(|s| {
        s.object_store = Some(bucket);
        s.object_delete_timeout = Duration::from_secs(1);
    })
    .await;
    let tenant = app.tenant_id("acme").await;
    let dataset = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO datasets (id, tenant_id, name, format, size_bytes, sha256)
         VALUES ($1, $2, 'people.csv', 'csv', 10, 'x')",
    )
    .bind(dataset)
    .bind(tenant)
    .execute(app.pool())
    .await
    .unwrap();

    let (status, problem) = tokio::time::timeout(
        Duration::from_secs(20),
        app.delete_answered(&format!("/v1/datasets/{dataset}")),
    )
    .await
    .expect("the delete answers within the store's timeout");
    assert_eq!(status, 204, "{problem}");
    let marked: Vec<(String, Uuid)> =
        sqlx::query_as("SELECT kind, tenant_id FROM object_deletes WHERE id = $1")
            .bind(dataset)
            .fetch_all(app.pool())
            .await
            .unwrap();
    assert_eq!(marked, [("dataset".to_owned(), tenant)]);
}

/// A job whose dataset's object is missing from the platform's bucket fails saying so in a
/// few words: the store's error named its address, the keys' layout and whatever the service
/// answered, into the job's error a tenant reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failure_reaches_the_tenant_without_the_stores_detail() {
    let s3 = S3Server::start();
    let mut app = TestApp::spawn_with(|s| s.object_store = Some(s3.config())).await;
    app.start_worker_for(&[("import", 1)]).await;
    let dataset = app.upload_dataset("gone.csv", b"id\n1\n").await;
    for object in s3.objects_named(&dataset.to_string()) {
        let _ = std::fs::remove_file(&object);
        let _ = std::fs::remove_dir_all(&object);
    }
    let job = app
        .run_job(
            "import",
            json!({"dataset_id": dataset, "target": {"table": "gone"}, "mode": "create"}),
        )
        .await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(
        error.contains("the object store has no such object"),
        "{error}"
    );
    for detail in ["127.0.0.1", "tenants/", "deployment/"] {
        assert!(!job.to_string().contains(detail), "{detail} in {job}");
    }
}

/// Imports `dataset` into a new table `table`; the job once it ended.
async fn import(app: &TestApp, dataset: Uuid, table: &str) -> serde_json::Value {
    let (status, job) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "import", "payload": {
                "dataset_id": dataset, "target": {"table": table}, "mode": "create"}}),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let job = app
        .wait_status(
            job["id"].as_str().unwrap().parse().unwrap(),
            &["succeeded", "failed"],
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    job
}

/// The worker's cached copies of `dataset` (one per version it read).
fn cached_copies(app: &TestApp, dataset: Uuid) -> Vec<PathBuf> {
    let dir = app
        .settings
        .data_dir
        .join(format!("cache/tenants/{}/datasets", app.tenant));
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(&dataset.to_string()))
        })
        .collect()
}
