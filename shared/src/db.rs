//! PostgreSQL pool and migrations.

use sqlx::{postgres::PgPoolOptions, PgPool};
use std::time::Duration;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to PostgreSQL at {}: {e}", redact(url)))?;
    Ok(pool)
}

/// A pool that connects on first use (target databases named by jobs).
pub fn connect_lazy(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy(url)
        .map_err(|e| anyhow::anyhow!("bad PostgreSQL URL {}: {e}", redact(url)))
}

pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

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
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(key, value)| {
                let secret = key.to_ascii_lowercase().contains("password");
                let value = if secret {
                    "***".into()
                } else {
                    value.into_owned()
                };
                (key.into_owned(), value)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::redact;

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
        ] {
            assert_eq!(redact(url), redacted);
        }
    }
}
