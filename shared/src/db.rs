//! PostgreSQL pool and migrations.

use sqlx::{
    pool::PoolConnection,
    postgres::{PgConnectOptions, PgPoolOptions},
    PgConnection, PgPool, Postgres,
};
use std::{str::FromStr, time::Duration};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// HNSW's candidate list (`hnsw.ef_search`) of every control-plane session: enough for
/// recall@10 >= 0.95 at k <= 10 (pgvector's default, 40, is not; scripts/bench/search).
pub const HNSW_EF_SEARCH: i64 = 100;

/// Startup parameters of every control-plane session, so that a collection search is one
/// statement in one round trip (no transaction, no `set_config` before it): the candidate list,
/// and pgvector 0.8's iterative scans, which go on until a filtered scan has enough matches
/// (`relaxed_order`: nearly sorted; the search re-sorts by exact distance). Startup
/// parameters are the session's defaults, so `RESET` and `DISCARD ALL` return to them.
pub fn session_settings() -> [(&'static str, String); 2] {
    [
        ("hnsw.ef_search", HNSW_EF_SEARCH.to_string()),
        ("hnsw.iterative_scan", "relaxed_order".to_owned()),
    ]
}

pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    connect_with(url, max_connections, &[]).await
}

/// A pool whose every statement ends after `statement_timeout` (a session default, so no
/// round trip sets it): for statements shaped by a client's request, such as searches.
pub async fn connect_bounded(
    url: &str,
    max_connections: u32,
    statement_timeout: Duration,
) -> anyhow::Result<PgPool> {
    let millis = statement_timeout.as_millis().max(1).to_string();
    connect_with(url, max_connections, &[("statement_timeout", &millis)]).await
}

/// A pool for the queue's own statements (claims, finishes): a few statements
/// run thousands of times a second with arrays of ids, which PostgreSQL planned afresh at each
/// execution (a third of a claim's time went to planning it). Here each is planned once per
/// session. Only for those: a generic plan does not see a parameter's value (a recent time
/// range, say) when it chooses an index. Those statements touch a batch of rows by key and
/// never need to read a whole table; with sequential scans off, a plan made while a table's
/// statistics said it was empty (as a fresh database's do) still probes by key.
pub async fn connect_queue(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    connect_with(
        url,
        max_connections,
        &[
            ("plan_cache_mode", "force_generic_plan"),
            ("enable_seqscan", "off"),
        ],
    )
    .await
}

async fn connect_with(
    url: &str,
    max_connections: u32,
    settings: &[(&str, &str)],
) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| unparsed(url, e))?
        .options(session_settings())
        .options(settings.iter().copied());
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to PostgreSQL at {}: {e}", redact(url)))?;
    Ok(pool)
}

/// One connection of a pool, kept between the round trips of a loop that runs thousands a
/// second (a queue's claims, the finishes): the pool tests a connection with a round trip of
/// its own each time it is taken and each time it is given back, two more per use.
/// After an error the connection is dropped ([`Session::discard`]) and the next use takes one
/// afresh, so a connection broken by a restart is not used again.
pub struct Session {
    pool: PgPool,
    conn: Option<PoolConnection<Postgres>>,
}

impl Session {
    pub fn new(pool: PgPool) -> Self {
        Self { pool, conn: None }
    }

    /// The kept connection, taken from the pool if there is none.
    pub async fn conn(&mut self) -> sqlx::Result<&mut PgConnection> {
        if self.conn.is_none() {
            self.conn = Some(self.pool.acquire().await?);
        }
        Ok(self.conn.as_mut().expect("just taken"))
    }

    /// Drops the kept connection (it may be broken): the next [`Session::conn`] takes another.
    pub fn discard(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Not given back: the pool's test of a broken connection would only fail.
            drop(conn.detach());
        }
    }
}

/// A pool that connects on first use (target databases named by jobs).
pub fn connect_lazy(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy(url)
        .map_err(|e| unparsed(url, e))
}

/// A URL sqlx refused, told without sqlx's words for a configuration error: they quote the
/// value refused, which a mistyped separator (`?sslmode=require?password=...`) makes a
/// password.
fn unparsed(url: &str, e: sqlx::Error) -> anyhow::Error {
    match e {
        sqlx::Error::Configuration(_) => anyhow::anyhow!(
            "bad PostgreSQL URL {}: a parameter's value is not valid (parameters are joined by \
             `&`; percent-encode a password)",
            redact(url)
        ),
        e => anyhow::anyhow!("bad PostgreSQL URL {}: {e}", redact(url)),
    }
}

pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    repair_edited_migrations(pool).await?;
    drop_unfinished_indexes(pool).await?;
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Indexes built `CONCURRENTLY` by migrations (one a migration, `IF NOT EXISTS`), read from
/// the migrations themselves (a list kept by hand missed one), with their versions.
fn built_concurrently() -> Vec<(i64, String)> {
    const BUILDS: &str = "CREATE INDEX CONCURRENTLY IF NOT EXISTS ";
    MIGRATOR
        .iter()
        .filter_map(|m| {
            let name = m.sql.split_once(BUILDS)?.1.split_whitespace().next()?;
            Some((m.version, name.to_owned()))
        })
        .collect()
}

/// A build cancelled or failed part way leaves an invalid index and its migration unrecorded,
/// and on the next run `IF NOT EXISTS` would skip it, leaving an index never used but written
/// at every insert. Dropped here, so the migration builds it again.
async fn drop_unfinished_indexes(pool: &PgPool) -> anyhow::Result<()> {
    let names: Vec<String> = built_concurrently().into_iter().map(|(_, n)| n).collect();
    let invalid: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE NOT i.indisvalid AND c.relname = ANY($1)
           AND c.relnamespace = current_schema()::regnamespace",
    )
    .bind(&names)
    .fetch_all(pool)
    .await?;
    for index in invalid {
        tracing::warn!(%index, "dropping an index left unfinished by a migration; it is built again");
        sqlx::query(&format!("DROP INDEX IF EXISTS \"{index}\""))
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// Migrations edited after they landed, with the checksum of the edited file. Databases that
/// ran an edited file hold its checksum, which sqlx would refuse: the landed file's is recorded
/// instead.
/// - `20261123000007_sessions.sql`: an index was appended; it now lives in `20261202000004`,
///   which creates it only if missing.
/// - `20261220000001_collection_counts.sql`: a later version also locked `collections` before
///   its one-time fill-in; the file stands as it landed, without that lock. The schema either
///   leaves is the same: databases that ran the later version are recorded as having run this
///   one. (The recount, for databases that ran either, is `20261222000001`'s.)
const EDITED_MIGRATIONS: [(i64, &str); 2] = [
    (
        20261123000007,
        "0c8bc33142223eb3feec1f5b524b10a304d076539d9923887cca39159e463697\
         d4c9f3805b002ae5e3ce4a9c14107019",
    ),
    (
        20261220000001,
        "bac0958cd1b1460469397547f01533024248a37e078a3ea3d810bf3e12ad029f\
         a3f14c4afe7e8935f2070bd61e74d501",
    ),
];

async fn repair_edited_migrations(pool: &PgPool) -> anyhow::Result<()> {
    let table: Option<String> = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
        .fetch_one(pool)
        .await?;
    if table.is_none() {
        return Ok(());
    }
    for (version, edited) in EDITED_MIGRATIONS {
        let Some(landed) = MIGRATOR.iter().find(|m| m.version == version) else {
            continue;
        };
        sqlx::query(
            "UPDATE _sqlx_migrations SET checksum = $1 WHERE version = $2 AND checksum = $3",
        )
        .bind(&*landed.checksum)
        .bind(version)
        .bind(hex::decode(edited)?)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// The URL parameters of libpq, sqlx and the Redis client that hold no secret: shown by
/// [`redact`] wherever they stand.
const KNOWN_PARAMETERS: &[&str] = &[
    "application_name",
    "application-name",
    "channel_binding",
    "client_encoding",
    "connect_timeout",
    "db",
    "dbname",
    "gssencmode",
    "host",
    "hostaddr",
    "keepalives",
    "keepalives_idle",
    "load_balance_hosts",
    "options",
    "port",
    "protocol",
    "sentinel_username",
    "ssl-ca",
    "ssl-cert",
    "ssl-key",
    "ssl-mode",
    "ssl-root-cert",
    "sslcert",
    "sslkey",
    "sslmode",
    "sslrootcert",
    "statement-cache-capacity",
    "target_session_attrs",
    "user",
];

/// The URL without its password (in the user part or a `password` parameter), for logs,
/// error messages and `Debug`.
pub fn redact(raw: &str) -> String {
    let Ok(mut url) = url::Url::parse(raw) else {
        return "(a URL that does not parse)".into();
    };
    if url.password().is_some() {
        let _ = url.set_password(Some("***"));
    }
    if url.query().is_some() {
        // Past a password's parameter, a "parameter" that is not a setting the drivers know is
        // the rest of the password after an unencoded `&` (`hun&ter2`, `hun&ter=2`): masked whole.
        let mut past_secret = false;
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(key, value)| {
                // A password's parameter (`pass` in a Redis socket URL), or a value holding
                // another parameter after a mistyped `?`.
                let key_lower = key.to_ascii_lowercase();
                let password = key_lower.contains("password") || key_lower == "pass";
                let known = KNOWN_PARAMETERS.contains(&key_lower.as_str())
                    || key_lower.starts_with("options[");
                let fragment = past_secret && !password && !known;
                past_secret |= password;
                let secret = password || fragment || value.contains('?') || value.contains('=');
                let key = if fragment {
                    "***".into()
                } else {
                    key.into_owned()
                };
                let value = if secret {
                    "***".into()
                } else {
                    value.into_owned()
                };
                (key, value)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    // A `#` in an unencoded password starts the fragment.
    if url.fragment().is_some() {
        url.set_fragment(Some("***"));
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::{redact, MIGRATOR};

    /// A landed migration never changes (sqlx refuses a database whose applied checksum
    /// differs): `migrations/checksums*` record each one; a new migration adds its line to the
    /// newest manifest.
    #[test]
    fn landed_migrations_are_unchanged() {
        // One manifest per round: a landed manifest is never edited either.
        let manifest = [
            include_str!("../../migrations/checksums"),
            include_str!("../../migrations/checksums-20261202"),
            include_str!("../../migrations/checksums-20261202b"),
            include_str!("../../migrations/checksums-20261203"),
            include_str!("../../migrations/checksums-20261204"),
            include_str!("../../migrations/checksums-20261205"),
            include_str!("../../migrations/checksums-20261206"),
            include_str!("../../migrations/checksums-20261207"),
            include_str!("../../migrations/checksums-20261208"),
            include_str!("../../migrations/checksums-20261209"),
            include_str!("../../migrations/checksums-20261210"),
            include_str!("../../migrations/checksums-20261211"),
            include_str!("../../migrations/checksums-20261212"),
            include_str!("../../migrations/checksums-20261213"),
            include_str!("../../migrations/checksums-20261214"),
            include_str!("../../migrations/checksums-20261215"),
            include_str!("../../migrations/checksums-20261216"),
            include_str!("../../migrations/checksums-20261217"),
            include_str!("../../migrations/checksums-20261218"),
            include_str!("../../migrations/checksums-20261219"),
            include_str!("../../migrations/checksums-20261220"),
            include_str!("../../migrations/checksums-20261221"),
            include_str!("../../migrations/checksums-20261222"),
            include_str!("../../migrations/checksums-20261223"),
            include_str!("../../migrations/checksums-20261224"),
            include_str!("../../migrations/checksums-20261225"),
            include_str!("../../migrations/checksums-20261226"),
        ]
        .concat();
        let recorded: Vec<(&str, &str)> = manifest
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|l| l.split_once(' ').expect("`version checksum` lines"))
            .collect();
        let actual: Vec<(String, String)> = MIGRATOR
            .iter()
            .map(|m| (m.version.to_string(), hex::encode(&*m.checksum)))
            .collect();
        for (version, checksum) in &actual {
            match recorded.iter().find(|(v, _)| v == version) {
                Some((_, c)) => assert_eq!(
                    c, checksum,
                    "migration {version} changed after it landed: add a new migration instead"
                ),
                None => panic!(
                    "new migration {version}: add `{version} {checksum}` to a new \
                     migrations/checksums-<date> listed above"
                ),
            }
        }
        assert_eq!(recorded.len(), actual.len(), "a recorded migration is gone");
    }

    /// Each index a `CONCURRENTLY` migration builds, left invalid (its build cancelled part
    /// way, the migration unrecorded), is built again by the next migrate, not skipped as
    /// existing.
    #[tokio::test]
    async fn an_unfinished_concurrent_index_is_built_again() {
        let builds = super::built_concurrently();
        assert!(builds.len() >= 4, "{builds:?}");
        let db = crate::testing::TestDatabase::new().await;
        for (version, index) in &builds {
            sqlx::query(&format!(
                "UPDATE pg_index SET indisvalid = false WHERE indexrelid = '{index}'::regclass"
            ))
            .execute(&db.pool)
            .await
            .unwrap();
            sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
                .bind(version)
                .execute(&db.pool)
                .await
                .unwrap();
        }
        super::migrate(&db.pool).await.unwrap();
        for (_, index) in &builds {
            let valid: bool = sqlx::query_scalar(&format!(
                "SELECT indisvalid FROM pg_index WHERE indexrelid = '{index}'::regclass"
            ))
            .fetch_one(&db.pool)
            .await
            .unwrap();
            assert!(valid, "{index} stayed invalid");
        }
    }

    #[test]
    fn passwords_are_hidden_wherever_the_url_has_them() {
        for (url, redacted) in [
            (
                "postgres://ann:s3cret@db:5432/x",
                "postgres://ann:***@db:5432/x",
            ),
            (
                "postgres://ann@db/x?password=s3cret&sslmode=require",
                "postgres://ann@db/x?password=***&sslmode=require",
            ),
            (
                "postgres://db/x?user=ann&PassWord=s3cret&sslpassword=s3cret",
                "postgres://db/x?user=ann&PassWord=***&sslpassword=***",
            ),
            (
                "redis://:s3cret@127.0.0.1:6379",
                "redis://:***@127.0.0.1:6379",
            ),
            ("postgres://ann@db/x", "postgres://ann@db/x"),
            ("not a url s3cret", "(a URL that does not parse)"),
            // A `?` typed for an `&`, and a Redis socket URL's `pass`.
            (
                "postgres://a@h/x?sslmode=require?password=s3cret",
                "postgres://a@h/x?sslmode=***",
            ),
            (
                "unix:///run/redis.sock?pass=s3cret",
                "unix:///run/redis.sock?pass=***",
            ),
            // An unencoded `&` or `#` in the password.
            (
                "postgres://a@h/x?password=hun&ter2",
                "postgres://a@h/x?password=***&***=***",
            ),
            (
                "postgres://a@h/x?password=hun&ter=2&sslmode=require",
                "postgres://a@h/x?password=***&***=***&sslmode=require",
            ),
            (
                "postgres://a@h/x?password=s3cret&application_name=etl&connect_timeout=5&ssl-mode=require&options[search_path]=app",
                "postgres://a@h/x?password=***&application_name=etl&connect_timeout=5&ssl-mode=require&options%5Bsearch_path%5D=app",
            ),
            (
                "postgres://a@h/x?password=hun#ter2",
                "postgres://a@h/x?password=***#***",
            ),
        ] {
            assert_eq!(redact(url), redacted);
        }
        // sqlx's words for a value it refuses quote the value.
        let refused = super::connect_lazy("postgres://a@h/x?sslmode=require?password=s3cret", 1);
        let error = refused.expect_err("an invalid sslmode").to_string();
        assert!(!error.contains("s3cret"), "{error}");
    }
}
