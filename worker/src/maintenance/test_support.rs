//! A fresh control-plane database (from `CONVEYOR_TEST_ADMIN_URL`, migrated) and Redis prefix
//! per test, with a worker runtime on them, dropped with the value.

use shared::{events::StreamKeys, Settings};
use sqlx::PgPool;
use std::sync::Arc;
use uuid::Uuid;

use crate::{QueueSpec, Runtime};

pub(crate) struct TestDb {
    pub runtime: Arc<Runtime>,
    /// A tenant to own the test's jobs.
    pub tenant: Uuid,
    settings: Settings,
    registry: jobs::Registry,
    admin_url: String,
    db_name: String,
}

impl TestDb {
    pub async fn new() -> Self {
        Self::with(jobs::Registry::default(), |_| {}).await
    }

    pub async fn with(registry: jobs::Registry, configure: impl FnOnce(&mut Settings)) -> Self {
        let admin_url = shared::testing::admin_url();
        let db_name = shared::testing::create_database(&admin_url).await;
        let mut settings = Settings::for_test(
            shared::testing::database_url(&admin_url, &db_name),
            format!("test:{}", Uuid::new_v4().simple()),
        );
        configure(&mut settings);
        let runtime = connect(&settings, &registry, "maintenance-test-1").await;
        let test = Self {
            runtime,
            tenant: Uuid::now_v7(),
            settings,
            registry,
            admin_url,
            db_name,
        };
        sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, 'acme')")
            .bind(test.tenant)
            .execute(test.pool())
            .await
            .expect("tenant");
        test
    }

    /// A second worker process's runtime on the same database and Redis prefix.
    pub async fn another_runtime(&self) -> Arc<Runtime> {
        connect(&self.settings, &self.registry, "maintenance-test-2").await
    }

    pub fn pool(&self) -> &PgPool {
        self.runtime.pool()
    }

    /// A job row of the tenant in `status`, finished now if that is terminal, at attempt 1
    /// unless scheduled or queued.
    pub async fn job(&self, kind: &str, status: &str) -> Uuid {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO jobs (id, tenant_id, kind, status, payload, attempt, finished_at)
             VALUES ($1, $2, $3, $4, '{}',
                     CASE WHEN $4 IN ('scheduled', 'queued') THEN 0 ELSE 1 END,
                     CASE WHEN $4 IN ('succeeded', 'failed', 'cancelled') THEN now() END)",
        )
        .bind(id)
        .bind(self.tenant)
        .bind(kind)
        .bind(status)
        .execute(self.pool())
        .await
        .expect("insert a job");
        id
    }

    /// A queued job of `tenant` (waiting in PostgreSQL for its turn).
    pub async fn held(&self, kind: &str, tenant: Uuid) -> Uuid {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO jobs (id, tenant_id, kind, status, payload) VALUES ($1, $2, $3, 'queued', '{}')",
        )
        .bind(id)
        .bind(tenant)
        .bind(kind)
        .execute(self.pool())
        .await
        .expect("insert a held job");
        id
    }

    /// Another tenant.
    pub async fn other_tenant(&self) -> Uuid {
        let id = Uuid::now_v7();
        sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, $2)")
            .bind(id)
            .bind(format!("tenant-{}", id.simple()))
            .execute(self.pool())
            .await
            .expect("tenant");
        id
    }

    /// `UPDATE jobs SET <assignments> WHERE id = $1`.
    pub async fn set(&self, id: Uuid, assignments: &str) {
        sqlx::query(&format!("UPDATE jobs SET {assignments} WHERE id = $1"))
            .bind(id)
            .execute(self.pool())
            .await
            .expect("update a job");
    }

    pub async fn status(&self, id: Uuid) -> Option<String> {
        sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .expect("read a job")
    }

    /// Whether jobs of `kind` were announced as queued by the test's runtime since the last
    /// look (see [`announced`]).
    pub fn announced(&self, kind: &str) -> bool {
        announced(&self.runtime, kind)
    }

    /// The types of the events in the job's stream.
    pub async fn events(&self, id: Uuid) -> Vec<String> {
        let mut conn = redis::Client::open(self.settings.redis_url.as_str())
            .expect("Redis URL")
            .get_multiplexed_async_connection()
            .await
            .expect("Redis");
        let key = StreamKeys::new(&self.settings.redis_prefix).job(self.tenant, id);
        shared::events::read_after(&mut conn, &key, "0", 100)
            .await
            .expect("read the job's stream")
            .into_iter()
            .map(|entry| entry.event.event_type.as_str().to_owned())
            .collect()
    }
}

/// Waits until `done`, at most 10 seconds, else fails with `what`.
pub(crate) async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Whether `runtime` announced jobs of `kind` as queued since the last look (canary's are
/// watched from the runtime's start; another kind's from its first look).
pub(crate) fn announced(runtime: &Runtime, kind: &str) -> bool {
    let queued = runtime.refill().dispatcher().queued(kind);
    futures::FutureExt::now_or_never(queued.notified()).is_some()
}

async fn connect(settings: &Settings, registry: &jobs::Registry, name: &str) -> Arc<Runtime> {
    let queues = QueueSpec(vec![("canary".into(), 1)]);
    let runtime = Runtime::connect(settings.clone(), registry.clone(), name.into(), &queues)
        .await
        .expect("a worker runtime on the test database");
    runtime.refill().dispatcher().queued("canary");
    Arc::new(runtime)
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Synchronous: a panicking test still leaves nothing behind.
        let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db_name);
        shared::testing::psql(&self.admin_url, &statement);
        let _ = std::fs::remove_dir_all(&self.settings.data_dir);
        shared::testing::clear_redis_prefix(&self.settings.redis_url, &self.settings.redis_prefix);
    }
}
