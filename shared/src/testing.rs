//! Test support for every crate's tests: the PostgreSQL to create test databases on, a fresh
//! migrated control-plane database per test, and clean-up that runs even when a test panics.

use sqlx::{Connection, PgConnection, PgPool};
use std::process::{Command, Stdio};
use uuid::Uuid;

/// `CONVEYOR_TEST_ADMIN_URL`, else the PostgreSQL (with pgvector) that `scripts/services`
/// last answered with in this checkout, else the default port.
pub fn admin_url() -> String {
    std::env::var("CONVEYOR_TEST_ADMIN_URL").unwrap_or_else(|_| {
        let recorded = concat!(env!("CARGO_MANIFEST_DIR"), "/../.data/postgres-url");
        match std::fs::read_to_string(recorded) {
            Ok(url) => format!("{}/postgres", url.trim()),
            Err(_) => "postgres://postgres@127.0.0.1:5432/postgres".into(),
        }
    })
}

/// The URL of database `name` on the admin URL's server.
pub fn database_url(admin_url: &str, name: &str) -> String {
    let base = admin_url.rsplit_once('/').expect("the URL has a path").0;
    format!("{base}/{name}")
}

/// Runs one statement with psql as the admin, synchronously (usable from `Drop`), ignoring
/// its outcome: clean-up must not panic in a test that is already failing.
pub fn psql(url: &str, statement: &str) {
    let _ = Command::new("psql")
        .arg(url)
        .arg("-qc")
        .arg(statement)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Deletes every Redis key under `prefix`, synchronously.
pub fn clear_redis_prefix(redis_url: &str, prefix: &str) {
    let Ok(mut conn) = redis::Client::open(redis_url).and_then(|c| c.get_connection()) else {
        return;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query(&mut conn)
        .unwrap_or_default();
    for chunk in keys.chunks(500) {
        let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query(&mut conn);
    }
}

/// Creates an empty database of a new name on the admin URL's server; returns the name.
pub async fn create_database(admin_url: &str) -> String {
    let name = format!("conveyor_test_{}", Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(admin_url)
        .await
        .expect("connect to the admin database (CONVEYOR_TEST_ADMIN_URL)");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create the test database");
    name
}

/// A fresh control-plane database, migrated, dropped with the value.
pub struct TestDatabase {
    pub pool: PgPool,
    pub url: String,
    admin_url: String,
    name: String,
}

impl TestDatabase {
    pub async fn new() -> Self {
        let admin_url = admin_url();
        let name = create_database(&admin_url).await;
        let url = database_url(&admin_url, &name);
        let test = Self {
            pool: crate::db::connect(&url, 4).await.expect("connect"),
            url,
            admin_url,
            name,
        };
        crate::db::migrate(&test.pool).await.expect("migrate");
        test
    }

    /// Runs `insert` (its `$1`: `tenant`), analyzes the tables, and returns a pool of one
    /// connection, whose reads [`Self::rows_read`] then counts.
    pub async fn seeded(&self, tenant: uuid::Uuid, insert: &str) -> PgPool {
        sqlx::query(insert)
            .bind(tenant)
            .execute(&self.pool)
            .await
            .expect("seed rows");
        // Every table: a fresh database's are small, and the seeded one is planned from its rows.
        sqlx::query("ANALYZE")
            .execute(&self.pool)
            .await
            .expect("analyze");
        crate::db::connect(&self.url, 1).await.expect("connect")
    }

    /// The rows of `table` the `measured` session read, by any scan (see [`Self::table_stat`]).
    pub async fn rows_read(&self, measured: &PgPool, table: &str) -> i64 {
        (self.table_stat(measured, table, "seq_tup_read + coalesce(idx_tup_fetch, 0)")).await
    }

    /// `figure` (an expression over `pg_stat_user_tables`' columns) of `table`, once the
    /// `measured` session's counts reached the shared view (at its next transaction's end,
    /// forced here). Tuple counts, unlike block counts, are not moved by autovacuum.
    pub async fn table_stat(&self, measured: &PgPool, table: &str, figure: &str) -> i64 {
        sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(measured)
            .await
            .expect("flush the session's counts");
        let mut reader = self.pool.acquire().await.expect("a connection");
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(&mut *reader)
            .await
            .expect("a fresh snapshot of the counts");
        sqlx::query_scalar(&format!(
            "SELECT ({figure})::bigint FROM pg_stat_user_tables WHERE relname = $1"
        ))
        .bind(table)
        .fetch_one(&mut *reader)
        .await
        .expect("the table's counts")
    }

    /// A new tenant.
    pub async fn tenant(&self) -> Uuid {
        let id = Uuid::now_v7();
        sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, $2)")
            .bind(id)
            .bind(format!("tenant-{}", id.simple()))
            .execute(&self.pool)
            .await
            .expect("insert a tenant");
        id
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        psql(&self.admin_url, &statement);
    }
}

/// A bucket whose S3 endpoint, on loopback, takes connections and never answers: a store
/// that hangs.
pub async fn silent_bucket() -> crate::objects::BucketConfig {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let endpoint = format!("http://{}", listener.local_addr().expect("its address"));
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    crate::objects::BucketConfig {
        url: "s3://artifacts".into(),
        options: [
            ("aws_endpoint", endpoint.as_str()),
            ("aws_allow_http", "true"),
            ("aws_region", "us-east-1"),
            ("aws_access_key_id", "test"),
            ("aws_secret_access_key", "test"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .into(),
    }
}
