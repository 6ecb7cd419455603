//! A test deployment: its own database and Redis prefix, the API in-process, workers in-process
//! or as real processes.

use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures::StreamExt;
use reqwest::{Client, StatusCode};
use serde_json::Value;
use shared::Settings;
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};
use uuid::Uuid;

pub struct TestApp {
    pub settings: Settings,
    pub server: Option<conveyor_api::Server>,
    pub workers: Vec<worker::WorkerHandle>,
    pub base: String,
    pub key: String,
    /// The tenant `key` belongs to ("acme").
    pub tenant: Uuid,
    pub client: Client,
    db_name: String,
    admin_url: String,
}

pub use shared::testing::admin_url;

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(configure: impl FnOnce(&mut Settings)) -> Self {
        Self::spawn_on(admin_url(), configure).await
    }

    /// A deployment on the PostgreSQL server behind `admin_url` (a private one, say).
    pub async fn spawn_on(admin_url: String, configure: impl FnOnce(&mut Settings)) -> Self {
        shared::telemetry::init("warn");
        let db_name = format!("conveyor_test_{}", Uuid::new_v4().simple());
        let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url)
            .await
            .expect("connect to the admin database");
        // The control plane and the target database that imports and patches write to.
        for name in [db_name.clone(), format!("{db_name}_target")] {
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut admin)
                .await
                .expect("create test database");
        }
        bootstrap_target(&mut admin, &admin_url, &format!("{db_name}_target")).await;
        let base_url = admin_url.rsplit_once('/').expect("url has a path").0;
        let mut settings = Settings::for_test(
            format!("{base_url}/{db_name}"),
            format!("test:{}", Uuid::new_v4().simple()),
        );
        // In-process workers run in this test binary, which cannot extract documents: the
        // worker binary does (`scripts/test` builds it).
        settings.extractor = Some(binary_path("conveyor-worker"));
        configure(&mut settings);
        let mut app = Self {
            settings: settings.clone(),
            server: None,
            workers: Vec::new(),
            base: String::new(),
            key: String::new(),
            tenant: Uuid::nil(),
            client: Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            db_name,
            admin_url,
        };
        app.start_api().await;
        (app.tenant, app.key) = app.tenant_key("acme").await;
        app
    }

    pub async fn start_api(&mut self) {
        let server = conveyor_api::Server::start(self.settings.clone())
            .await
            .expect("api starts");
        self.base = format!("http://{}", server.addr);
        self.server = Some(server);
    }

    pub fn pool(&self) -> &sqlx::PgPool {
        &self.server.as_ref().expect("api running").state.pool
    }

    /// Whether worker `name`'s row says it stopped.
    /// A worker's own name (host, pid, suffix), from the digest tenants see of it.
    pub async fn own_worker_name(&self, shown: &str) -> String {
        let names: Vec<String> = sqlx::query_scalar("SELECT name FROM workers")
            .fetch_all(self.pool())
            .await
            .unwrap();
        names
            .into_iter()
            .find(|name| shared::leader::public_name(name) == shown)
            .unwrap_or_else(|| panic!("no worker is shown as {shown}"))
    }

    pub async fn worker_stopped(&self, name: &str) -> bool {
        sqlx::query_scalar::<_, Option<chrono::DateTime<chrono::Utc>>>(
            "SELECT stopped_at FROM workers WHERE name = $1",
        )
        .bind(name)
        .fetch_one(self.pool())
        .await
        .unwrap()
        .is_some()
    }

    /// Every job kind, with this deployment's services.
    /// Every job kind, with a worker's services (its bounds on target sessions).
    pub fn registry(&self) -> jobs::Registry {
        let services = jobs::Services::new(
            std::sync::Arc::new(self.settings.clone()),
            self.pool().clone(),
        )
        .expect("worker services");
        jobs::Registry::standard(services)
    }

    /// The default target database as the test's first tenant's jobs see it: its role, its
    /// schema as the search path (so tests name tables unqualified, as tenants do).
    pub fn target_url(&self) -> String {
        tenant_target_url(&self.settings.target_database_url, self.tenant)
    }

    /// The default target database as a superuser sees it (the platform's schemas too).
    pub fn target_admin_url(&self) -> String {
        let base = self.admin_url.rsplit_once('/').expect("url has a path").0;
        format!("{base}/{}_target", self.db_name)
    }

    /// A database of its own owned by an unprivileged role: what a tenant's connection reaches.
    pub async fn warehouse(&self) -> Warehouse {
        let name = format!("{}_wh{}", self.db_name, rand_suffix());
        let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&self.admin_url)
            .await
            .expect("connect to the admin database");
        for statement in [
            format!("CREATE ROLE {name} LOGIN"),
            format!("CREATE DATABASE {name} OWNER {name}"),
        ] {
            sqlx::query(&statement)
                .execute(&mut admin)
                .await
                .expect("create the warehouse");
        }
        let mut url = reqwest::Url::parse(&self.admin_url).expect("admin URL");
        url.set_path(&name);
        let superuser_url = url.to_string();
        url.set_username(&name).expect("URL with a user");
        Warehouse {
            url: url.to_string(),
            superuser_url,
            name,
            admin_url: self.admin_url.clone(),
        }
    }

    /// Stores `bytes` as a dataset of the test's first tenant; returns its id.
    pub async fn upload_dataset(&self, name: &str, bytes: &[u8]) -> Uuid {
        let response = self
            .client
            .post(self.url("/v1/datasets"))
            .query(&[("name", name)])
            .bearer_auth(&self.key)
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(status, StatusCode::CREATED, "upload of {name}: {body}");
        body["id"].as_str().unwrap().parse().unwrap()
    }

    /// The id of the tenant named `name`.
    pub async fn tenant_id(&self, name: &str) -> Uuid {
        sqlx::query_scalar("SELECT id FROM tenants WHERE name = $1")
            .bind(name)
            .fetch_one(self.pool())
            .await
            .unwrap()
    }

    pub async fn key_for(&self, tenant: &str) -> String {
        self.tenant_key(tenant).await.1
    }

    /// A new key of `tenant` (created, with its role and schema on the default target, if new).
    pub async fn tenant_key(&self, tenant: &str) -> (Uuid, String) {
        let created = conveyor_api::keys::create_key(self.pool(), tenant)
            .await
            .unwrap();
        let provision_url = self.settings.target_provision_url.as_deref().unwrap();
        shared::tenancy::provision_pending(self.pool(), provision_url)
            .await
            .expect("tenant provisioned on the default target");
        created
    }

    /// An in-process worker serving `canary` with `concurrency`.
    pub async fn start_worker(&mut self, concurrency: usize) -> String {
        self.start_worker_for(&[("canary", concurrency)]).await
    }

    /// An in-process worker serving the given queues.
    pub async fn start_worker_for(&mut self, queues: &[(&str, usize)]) -> String {
        self.start_worker_with(self.registry(), queues).await
    }

    /// An in-process worker serving the given queues with `registry`'s handlers.
    pub async fn start_worker_with(
        &mut self,
        registry: jobs::Registry,
        queues: &[(&str, usize)],
    ) -> String {
        let spec = worker::QueueSpec(queues.iter().map(|(k, n)| (k.to_string(), *n)).collect());
        let name = worker::unique_name();
        let handle = worker::start(self.settings.clone(), spec, registry, name.clone())
            .await
            .expect("worker starts");
        self.workers.push(handle);
        name
    }

    /// What points a process at this test's deployment: its databases, Redis prefix, data and
    /// model directories, secret key.
    pub fn deployment_env(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        let s = &self.settings;
        vec![
            ("CONVEYOR_DATABASE_URL", s.database_url.clone().into()),
            ("CONVEYOR_REDIS_URL", s.redis_url.clone().into()),
            ("CONVEYOR_REDIS_PREFIX", s.redis_prefix.clone().into()),
            (
                "CONVEYOR_TARGET_DATABASE_URL",
                s.target_database_url.clone().into(),
            ),
            ("CONVEYOR_DATA_DIR", s.data_dir.clone().into()),
            ("CONVEYOR_MODEL_DIR", s.model_dir.clone().into()),
            (
                "CONVEYOR_SECRET_KEY",
                s.secret_key.clone().unwrap_or_default().into(),
            ),
        ]
    }

    /// A `conveyor-worker` process against this test's database and prefix, killed when the
    /// value drops (a failed assertion included).
    pub fn spawn_worker_process(&self, queues: &str) -> KillOnDrop {
        self.spawn_worker_process_with(queues, &[])
    }

    /// A worker process with some settings of its own (`CONVEYOR_...` variables).
    pub fn spawn_worker_process_with(&self, queues: &str, env: &[(&str, &str)]) -> KillOnDrop {
        self.spawn_worker_process_logging(queues, env, Stdio::inherit())
    }

    /// A worker process whose log (its stderr) goes to `log`.
    pub fn spawn_worker_process_logging(
        &self,
        queues: &str,
        env: &[(&str, &str)],
        log: impl Into<Stdio>,
    ) -> KillOnDrop {
        let child = Command::new(binary("conveyor-worker"))
            .envs(self.deployment_env())
            .env("CONVEYOR_HEARTBEAT_SECS", "1")
            .env("CONVEYOR_RESCUE_AFTER_SECS", "3")
            .env("CONVEYOR_SHUTDOWN_GRACE_SECS", "20")
            .env("CONVEYOR_QUEUES", queues)
            .env(
                "CONVEYOR_MAX_DECOMPRESSED_BYTES",
                self.settings.max_decompressed_bytes.to_string(),
            )
            .env(
                "CONVEYOR_MAX_IN_MEMORY_BYTES",
                self.settings.max_in_memory_bytes.to_string(),
            )
            .env(
                "CONVEYOR_MAX_RECORD_BYTES",
                self.settings.max_record_bytes.to_string(),
            )
            .env(
                "CONVEYOR_MAX_DOCUMENT_BYTES",
                self.settings.max_document_bytes.to_string(),
            )
            .env(
                "CONVEYOR_MAX_WORKER_DEATHS",
                self.settings.max_worker_deaths.to_string(),
            )
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("conveyor-worker starts (built by scripts/test)");
        KillOnDrop(child)
    }

    /// A second `conveyor-api` process on this test's database and Redis prefix; returns it
    /// (killed on drop) and its base URL, once it answers `/healthz`.
    pub async fn spawn_api_process(&self) -> (KillOnDrop, String) {
        self.spawn_api_process_logging(&[], Stdio::inherit()).await
    }

    /// An API process with some settings of its own, whose log (its stderr) goes to `log`.
    pub async fn spawn_api_process_logging(
        &self,
        env: &[(&str, &str)],
        log: impl Into<Stdio>,
    ) -> (KillOnDrop, String) {
        let port = free_port();
        let child = Command::new(binary("conveyor-api"))
            .env("CONVEYOR_LISTEN", format!("127.0.0.1:{port}"))
            .envs(self.deployment_env())
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("conveyor-api starts (built by scripts/test)");
        let child = KillOnDrop(child);
        let base = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.client.get(format!("{base}/healthz")).send().await {
                if r.status().is_success() {
                    return (child, base);
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "conveyor-api did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `conveyor-api ARGS` (an admin command) against this test's database and Redis.
    pub async fn conveyor_api(&self, args: &[&str]) -> (bool, String, String) {
        let output = tokio::process::Command::new(binary("conveyor-api"))
            .args(args)
            .env("CONVEYOR_DATABASE_URL", &self.settings.database_url)
            .env("CONVEYOR_REDIS_URL", &self.settings.redis_url)
            .env("CONVEYOR_REDIS_PREFIX", &self.settings.redis_prefix)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .output()
            .await
            .expect("conveyor-api runs (cargo build --bins)");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.post_as(&self.key, path, body).await
    }

    /// A POST with another key (another tenant's, another role's).
    pub async fn post_as(&self, key: &str, path: &str, body: &Value) -> (StatusCode, Value) {
        let response = self
            .client
            .post(self.url(path))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let (status, bytes) = self.get_bytes(path).await;
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// The raw body, for downloads.
    pub async fn get_bytes(&self, path: &str) -> (StatusCode, Vec<u8>) {
        let response = self
            .client
            .get(self.url(path))
            .bearer_auth(&self.key)
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.bytes().await.unwrap().to_vec())
    }

    /// The `/metrics` page, asked for with the metrics token.
    pub async fn metrics(&self) -> String {
        let response = self
            .client
            .get(self.url("/metrics"))
            .bearer_auth(self.settings.metrics_token.as_deref().unwrap_or_default())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.text().await.unwrap()
    }

    /// A DELETE's status and its answer (a problem document when refused; null when empty).
    pub async fn delete_answered(&self, path: &str) -> (StatusCode, Value) {
        let response = self
            .client
            .delete(self.url(path))
            .bearer_auth(&self.key)
            .send()
            .await
            .unwrap();
        (
            response.status(),
            response.json().await.unwrap_or(Value::Null),
        )
    }

    pub async fn delete(&self, path: &str) -> StatusCode {
        self.delete_answered(path).await.0
    }

    /// Submits a canary job; returns its id.
    pub async fn submit_canary(&self, payload: Value) -> Uuid {
        let (status, job) = self
            .post(
                "/v1/jobs",
                &serde_json::json!({"kind": "canary", "payload": payload}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        job["id"].as_str().unwrap().parse().unwrap()
    }

    /// `GET /v1/queues`' entry for `kind`.
    pub async fn queue(&self, kind: &str) -> Value {
        let (status, queues) = self.get("/v1/queues").await;
        assert_eq!(status, StatusCode::OK, "{queues}");
        let queues = queues["queues"].as_array().expect("queues");
        let queue = queues.iter().find(|q| q["kind"] == kind);
        queue.expect("the kind's queue").clone()
    }

    pub async fn job(&self, id: Uuid) -> Value {
        let (status, job) = self.get(&format!("/v1/jobs/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{job}");
        job
    }

    /// Polls until the job's status is one of `statuses`.
    pub async fn wait_status(&self, id: Uuid, statuses: &[&str], within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let job = self.job(id).await;
            if statuses.contains(&job["status"].as_str().unwrap_or("")) {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} not in {statuses:?} within {within:?}: {job}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Submits a job of `kind` (asserting 202) and waits up to two minutes for it to succeed
    /// or fail; returns it.
    pub async fn run_job(&self, kind: &str, payload: Value) -> Value {
        let (status, job) = self
            .post(
                "/v1/jobs",
                &serde_json::json!({"kind": kind, "payload": payload}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        let id = job["id"].as_str().unwrap().parse().unwrap();
        self.wait_status(id, &["succeeded", "failed"], Duration::from_secs(120))
            .await
    }

    /// TOAST blocks of `table` read so far (hits and reads), as the server's statistics have
    /// them: where payloads of a few KB and more live.
    pub async fn toast_blocks(&self, table: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT coalesce(toast_blks_hit, 0) + coalesce(toast_blks_read, 0)
             FROM pg_statio_user_tables WHERE relname = $1",
        )
        .bind(table)
        .fetch_one(self.pool())
        .await
        .unwrap()
    }

    pub async fn sse(&self, path: &str, last_event_id: Option<&str>) -> SseReader {
        let mut request = self.client.get(self.url(path)).bearer_auth(&self.key);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        SseReader::from_response(response)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Synchronous clean-up: a panicking test still leaves nothing behind. Tenant roles are
        // the cluster's: dropped once the databases that hold their grants are gone.
        let drop_roles = Command::new("psql")
            .arg(shared::testing::database_url(&self.admin_url, &self.db_name))
            .args(["-tAqc", "SELECT 'DROP ROLE IF EXISTS conveyor_t_' || replace(id::text, '-', '') || ';' FROM tenants"])
            .stderr(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for name in [self.db_name.clone(), format!("{}_target", self.db_name)] {
            let statement = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
            shared::testing::psql(&self.admin_url, &statement);
        }
        if !drop_roles.trim().is_empty() {
            shared::testing::psql(&self.admin_url, &drop_roles);
        }
        let _ = std::fs::remove_dir_all(&self.settings.data_dir);
        shared::testing::clear_redis_prefix(&self.settings.redis_url, &self.settings.redis_prefix);
    }
}

/// A child process that is killed (SIGKILL) and reaped when the value drops, so that a test
/// that fails half-way leaves no process behind. Derefs to the `Child`.
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Already reaped (a test waited for it): nothing to kill.
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A database and its owner, dropped with the value.
pub struct Warehouse {
    /// As its unprivileged owner.
    pub url: String,
    /// The same database as the admin URL's superuser.
    pub superuser_url: String,
    pub name: String,
    admin_url: String,
}

impl Drop for Warehouse {
    fn drop(&mut self) {
        for statement in [
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            format!("DROP ROLE IF EXISTS {}", self.name),
        ] {
            let _ = Command::new("psql")
                .arg(&self.admin_url)
                .arg("-qc")
                .arg(statement)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn rand_suffix() -> String {
    Uuid::new_v4().simple().to_string()[..6].to_owned()
}

/// A port for a server process a test starts. Taken below the kernel's ephemeral range, so
/// that no outgoing connection of a test running beside this one can be given it between our
/// check and the server's bind: a port from `bind(":0")` can be, and the server then fails.
pub fn free_port() -> u16 {
    let range =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let ephemeral_low: u16 = range
        .split_whitespace()
        .next()
        .and_then(|low| low.parse().ok())
        .unwrap_or(32768);
    let low = 20_000.min(ephemeral_low / 2);
    let below = (0..1_000)
        .map(|_| rand::random_range(low..ephemeral_low))
        .find(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok());
    // A machine whose ephemeral range leaves nothing below it: the kernel's pick, racy as it is.
    below.unwrap_or_else(|| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    })
}

/// The process id in a worker's name (host-pid-random).
pub fn pid_of(worker_name: &str) -> u32 {
    let parts: Vec<&str> = worker_name.rsplitn(3, '-').collect();
    parts[1].parse().expect("pid in worker name")
}

/// Peak resident memory of a process, in MB.
pub fn peak_rss_mb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        / 1024
}

/// Where a binary of the workspace is: next to the test executable's directory.
pub fn binary_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join(name)
}

/// A binary of the workspace, which must be built.
pub fn binary(name: &str) -> PathBuf {
    let path = binary_path(name);
    assert!(
        path.exists(),
        "{} missing: run `cargo build --workspace --bins`",
        path.display()
    );
    path
}

#[derive(Debug, Clone)]
pub struct SseMessage {
    pub id: Option<String>,
    pub event: String,
    pub data: Value,
}

type EventStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<Event, EventStreamError<reqwest::Error>>> + Send>,
>;

/// A response's Server-Sent Events, however its chunks cut lines or characters.
pub struct SseReader {
    events: EventStream,
}

impl SseReader {
    pub fn from_response(response: reqwest::Response) -> Self {
        Self {
            events: Box::pin(response.bytes_stream().eventsource()),
        }
    }

    /// The next event, `None` when the stream ends or nothing comes within `within`.
    /// Keep-alive comments are skipped.
    pub async fn next(&mut self, within: Duration) -> Option<SseMessage> {
        match tokio::time::timeout(within, self.events.next()).await {
            Ok(Some(Ok(event))) => Some(SseMessage {
                id: (!event.id.is_empty()).then_some(event.id),
                event: event.event,
                data: serde_json::from_str(&event.data).expect("event data is JSON"),
            }),
            _ => None,
        }
    }

    /// Events until the stream closes (after a terminal event) or `within` passes.
    pub async fn collect(&mut self, within: Duration) -> Vec<SseMessage> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        while let Some(m) = self
            .next(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            out.push(m);
        }
        out
    }
}

/// `url` (the platform's) with the tenant's role and schema as session defaults.
pub fn tenant_target_url(url: &str, tenant: Uuid) -> String {
    format!(
        "{url}?options=-c%20role%3D{}%20-c%20search_path%3D{}",
        shared::tenancy::role(tenant),
        shared::tenancy::schema(tenant)
    )
}

/// The platform's roles and schemas on a test's target database, as the operator would create
/// them. The roles are the cluster's, shared by concurrent tests: one bootstrap at a time.
async fn bootstrap_target(admin: &mut sqlx::PgConnection, admin_url: &str, target_db: &str) {
    use sqlx::Executor;
    const BOOTSTRAP_LOCK: i64 = 0x636f6e7665796f72; // "conveyor"
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(BOOTSTRAP_LOCK)
        .execute(&mut *admin)
        .await
        .unwrap();
    let base = admin_url.rsplit_once('/').expect("url has a path").0;
    let mut target =
        <sqlx::PgConnection as sqlx::Connection>::connect(&format!("{base}/{target_db}"))
            .await
            .expect("connect to the target database");
    target
        .execute(shared::tenancy::BOOTSTRAP_SQL)
        .await
        .expect("bootstrap the target database");
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(BOOTSTRAP_LOCK)
        .execute(&mut *admin)
        .await
        .unwrap();
}

/// `words` words of text that does not compress (so that PostgreSQL stores it out of line),
/// the same for the same `seed`.
pub fn incompressible_text(words: usize, mut seed: u64) -> String {
    (0..words)
        .map(|_| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            format!("{:x}", seed >> 40)
        })
        .collect::<Vec<_>>()
        .join(" ")
}
