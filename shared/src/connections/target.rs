//! A tenant's connection URL, parsed and checked by us before any packet leaves: TCP to a
//! public address (or one the operator allows), never the platform's own databases, never a
//! privileged role. The API checks when the connection is registered; the worker checks again
//! each time it connects, with the same functions.

use super::address::{internal_reason, same_host, AllowList};
use chrono::{DateTime, Utc};
use sqlx::{
    postgres::{PgConnectOptions, PgSslMode},
    ConnectOptions, PgConnection, PgPool,
};
use std::{net::IpAddr, str::FromStr, time::Duration};

/// How long resolving a host or connecting to a tenant's database may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a connection's server sees as the client's name.
const APPLICATION_NAME: &str = "conveyor";

/// Why a connection is refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The URL or what it reaches is not allowed; the reason is for the client.
    #[error("{0}")]
    Invalid(String),
    /// It could not be reached. The detail is for the log only: echoed, it would make the
    /// route a port scanner.
    #[error("could not connect to the database")]
    Unreachable(String),
}

/// A connection URL of the accepted shape: a user, a host, a port, a database and, at most,
/// `sslmode`. Nothing that points the client at a Unix socket, a file or another host.
#[derive(Clone)]
pub struct TargetUrl {
    host: String,
    port: u16,
    user: String,
    password: String,
    database: String,
    ssl_mode: PgSslMode,
}

impl TargetUrl {
    pub fn parse(raw: &str) -> Result<Self, String> {
        const NO_SOCKETS: &str = "must name a host by name or address (no Unix sockets)";
        let url = url::Url::parse(raw).map_err(|e| match e {
            url::ParseError::EmptyHost => NO_SOCKETS.to_owned(),
            e => format!("is not a URL: {e}"),
        })?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err("must be a postgres:// URL".into());
        }
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| "is not valid UTF-8 once decoded".to_owned())
        };
        let host = match url.host() {
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Domain(name)) if is_host_name(name) => name.to_ascii_lowercase(),
            _ => return Err(NO_SOCKETS.into()),
        };
        let user = decode(url.username())?;
        if user.is_empty() {
            return Err("must name a user".into());
        }
        let database = decode(url.path().trim_start_matches('/'))?;
        if database.is_empty() {
            return Err("must name a database".into());
        }
        if url.fragment().is_some() {
            return Err("may not have a fragment".into());
        }
        let mut ssl_mode = PgSslMode::Prefer;
        for (key, value) in url.query_pairs() {
            ssl_mode = match (&*key, &*value) {
                ("sslmode", "disable") => PgSslMode::Disable,
                ("sslmode", "prefer") => PgSslMode::Prefer,
                ("sslmode", "require") => PgSslMode::Require,
                ("sslmode", _) => return Err("sslmode must be disable, prefer or require".into()),
                _ => {
                    return Err(format!(
                        "the {key:?} parameter is not allowed (only sslmode)"
                    ))
                }
            };
        }
        Ok(Self {
            host,
            port: url.port().unwrap_or(5432),
            user,
            password: decode(url.password().unwrap_or_default())?,
            database,
            ssl_mode,
        })
    }

    /// `host:port/database`: what the client sees of it; the credentials are never shown.
    pub fn display(&self) -> String {
        let host = match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("[{ip}]"),
            _ => self.host.clone(),
        };
        format!("{host}:{}/{}", self.port, self.database)
    }

    async fn resolve(&self) -> Result<Vec<IpAddr>, Refusal> {
        let lookup = tokio::net::lookup_host((self.host.as_str(), self.port));
        let addrs = tokio::time::timeout(CONNECT_TIMEOUT, lookup)
            .await
            .map_err(|_| Refusal::Unreachable(format!("resolving {} timed out", self.host)))?
            .map_err(|e| Refusal::Unreachable(format!("resolving {}: {e}", self.host)))?;
        let ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
        if ips.is_empty() {
            return Err(Refusal::Unreachable(format!(
                "{} has no address",
                self.host
            )));
        }
        Ok(ips)
    }
}

/// Letters, digits, hyphens and dots: anything else (`/`, `%2F`, spaces) is not a host name.
fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// A connection URL whose address passed the checks, pinned to that address: a DNS answer
/// that changes between the check and the connection cannot move it.
pub struct CheckedTarget {
    url: TargetUrl,
    ip: IpAddr,
}

impl CheckedTarget {
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// Options for exactly this URL. sqlx has no constructor that ignores the environment
    /// (`new_without_pgpass` still reads `PG*` variables), so every field it takes from there
    /// is set here, the password too (empty is no password); the ones it cannot unset
    /// (`PGSSLCERT`, `PGSSLKEY`, `PGSSLROOTCERT`, `PGOPTIONS`) make it refuse.
    pub fn connect_options(&self) -> Result<PgConnectOptions, Refusal> {
        let unsettable = ["PGSSLCERT", "PGSSLKEY", "PGSSLROOTCERT", "PGOPTIONS"];
        if let Some(name) = unsettable.iter().find(|n| std::env::var_os(n).is_some()) {
            return Err(Refusal::Unreachable(format!(
                "{name} is set in the environment and would apply to tenants' databases: \
                 unset it to use connections"
            )));
        }
        Ok(PgConnectOptions::new_without_pgpass()
            .host(&self.ip.to_string())
            .port(self.url.port)
            .username(&self.url.user)
            .password(&self.url.password)
            .database(&self.url.database)
            .ssl_mode(self.url.ssl_mode)
            .application_name(APPLICATION_NAME)
            // UTC sessions: timestamps without a zone are read the same on every server.
            .options([("TimeZone", "UTC")]))
    }
}

/// A database of the platform itself: no tenant's connection may point at it.
#[derive(Clone, Debug)]
struct PlatformDatabase {
    what: &'static str,
    host: String,
    port: u16,
    database: String,
}

impl PlatformDatabase {
    /// From the operator's URL (read as sqlx reads it, environment included: it is how the
    /// platform itself connects).
    fn from_url(what: &'static str, url: &str) -> anyhow::Result<Self> {
        let options = PgConnectOptions::from_str(url)?;
        // A Unix socket is this machine.
        let host = match options.get_socket() {
            Some(_) => "localhost".to_owned(),
            None if options.get_host().starts_with('/') => "localhost".to_owned(),
            None => options.get_host().to_owned(),
        };
        Ok(Self {
            what,
            host,
            port: options.get_port(),
            database: options
                .get_database()
                .unwrap_or(options.get_username())
                .to_owned(),
        })
    }
}

/// The checks every tenant's connection goes through.
pub struct Guard {
    allow: AllowList,
    platform: Vec<PlatformDatabase>,
    control: PgPool,
}

impl Guard {
    pub fn new(control: PgPool, settings: &crate::Settings) -> anyhow::Result<Self> {
        Ok(Self {
            allow: settings.connection_allow.clone(),
            platform: vec![
                PlatformDatabase::from_url("control-plane", &settings.database_url)?,
                PlatformDatabase::from_url("default target", &settings.target_database_url)?,
            ],
            control,
        })
    }

    /// Resolves the URL's host and checks every address it has, before anything connects.
    pub async fn check(&self, url: &TargetUrl) -> Result<CheckedTarget, Refusal> {
        let ips = url.resolve().await?;
        // The address rules first: an address they refuse is refused in their words, whoever
        // listens there (the platform's own servers named would tell a tenant where they are).
        for ip in &ips {
            if self.allow.allows(&url.host, *ip) {
                continue;
            }
            if let Some(why) = internal_reason(*ip) {
                return Err(Refusal::Invalid(super::address::refused_address(
                    &url.host,
                    why,
                    "connections",
                )));
            }
        }
        for platform in &self.platform {
            let platform_ips = TargetUrl::resolve_host(&platform.host, platform.port).await?;
            let same_server = url.port == platform.port
                && ips
                    .iter()
                    .any(|ip| platform_ips.iter().any(|p| same_host(*ip, *p)));
            if same_server && url.database == platform.database {
                return Err(Refusal::Invalid(format!(
                    "is the platform's {} database",
                    platform.what
                )));
            }
            if same_server && !ips.iter().all(|ip| self.allow.allows(&url.host, *ip)) {
                return Err(Refusal::Invalid(format!(
                    "is the platform's {} server",
                    platform.what
                )));
            }
        }
        Ok(CheckedTarget {
            url: url.clone(),
            ip: ips[0],
        })
    }

    /// Checks a fresh session on a tenant's database: an unprivileged role, and not the
    /// control plane's server under another name (same postmaster, a platform database).
    pub async fn verify_session(&self, conn: &mut PgConnection) -> Result<(), Refusal> {
        let unreachable = |e: sqlx::Error| Refusal::Unreachable(e.to_string());
        let (privileged, started, database): (bool, DateTime<Utc>, String) = sqlx::query_as(
            "SELECT EXISTS (
                        SELECT 1 FROM pg_roles g
                        WHERE (g.rolsuper OR g.rolcreaterole OR g.rolreplication
                               OR g.rolbypassrls
                               OR g.rolname IN ('pg_read_server_files', 'pg_write_server_files',
                                                'pg_execute_server_program',
                                                'pg_read_all_data', 'pg_write_all_data'))
                          AND pg_has_role(current_user, g.oid, 'MEMBER')),
                    pg_postmaster_start_time(), current_database()",
        )
        .fetch_one(&mut *conn)
        .await
        .map_err(unreachable)?;
        if privileged {
            return Err(Refusal::Invalid(
                "a connection must use an unprivileged role (not a superuser, nor one that \
                 can create roles, replicate, bypass row security or read server files)"
                    .into(),
            ));
        }
        let control_started: DateTime<Utc> =
            sqlx::query_scalar("SELECT pg_postmaster_start_time()")
                .fetch_one(&self.control)
                .await
                .map_err(unreachable)?;
        if started == control_started {
            if let Some(platform) = self.platform.iter().find(|p| p.database == database) {
                return Err(Refusal::Invalid(format!(
                    "is the platform's {} database",
                    platform.what
                )));
            }
        }
        Ok(())
    }

    /// The API's check of a new connection: every check above, and one session, all within
    /// [`CONNECT_TIMEOUT`]: the server is the tenant's, and one that answers the handshake and
    /// then nothing would hold the request for as long as the client waits.
    pub async fn probe(&self, url: &TargetUrl) -> Result<(), Refusal> {
        // A name that does not resolve is refused as one resolving only to internal addresses
        // is: "could not connect" for the one and a refusal for the other told a tenant which
        // of its guesses are the platform's internal names. (Here only: a job's connection
        // whose lookup fails for a moment is retried, as any unreachable server is.)
        if url.host.parse::<IpAddr>().is_err() {
            let lookup = tokio::net::lookup_host((url.host.as_str(), url.port));
            if let Ok(Err(e)) = tokio::time::timeout(CONNECT_TIMEOUT, lookup).await {
                tracing::debug!(error = %e, "a connection's host did not resolve");
                return Err(Refusal::Invalid(super::address::unresolved(
                    &url.host,
                    "connections",
                )));
            }
        }
        let checked = self.check(url).await?;
        let options = checked.connect_options()?;
        let timed_out = || Refusal::Unreachable(format!("{} did not answer in time", checked.ip));
        tokio::time::timeout(CONNECT_TIMEOUT, async {
            let mut conn = options
                .connect()
                .await
                .map_err(|e| Refusal::Unreachable(format!("connecting to {}: {e}", checked.ip)))?;
            let verdict = self.verify_session(&mut conn).await;
            let _ = sqlx::Connection::close(conn).await;
            verdict
        })
        .await
        .map_err(|_| timed_out())?
    }
}

impl TargetUrl {
    async fn resolve_host(host: &str, port: u16) -> Result<Vec<IpAddr>, Refusal> {
        Self {
            host: host.to_owned(),
            port,
            user: String::new(),
            password: String::new(),
            database: String::new(),
            ssl_mode: PgSslMode::Prefer,
        }
        .resolve()
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_tcp_urls_parse() {
        let url =
            TargetUrl::parse("postgresql://ann:p%40ss@DB.example.com:6543/sales?sslmode=require")
                .unwrap();
        assert_eq!(url.display(), "db.example.com:6543/sales");
        assert_eq!(url.password, "p@ss");
        assert!(matches!(url.ssl_mode, PgSslMode::Require));
        assert_eq!(
            TargetUrl::parse("postgres://ann@[::1]/sales")
                .unwrap()
                .display(),
            "[::1]:5432/sales"
        );
        for (raw, why) in [
            ("mysql://ann@db/x", "postgres://"),
            ("postgres://ann@/x", "host"),
            ("postgres:///x?host=/var/run/postgresql", "host"),
            ("postgres://ann@%2Fvar%2Frun%2Fpostgresql/x", "host"),
            ("postgres://ann@db/x?host=/tmp", "\"host\""),
            ("postgres://ann@db/x?hostaddr=127.0.0.1", "\"hostaddr\""),
            (
                "postgres://ann@db/x?sslkey=/etc/ssl/private/key.pem",
                "\"sslkey\"",
            ),
            (
                "postgres://ann@db/x?sslrootcert=/etc/passwd",
                "\"sslrootcert\"",
            ),
            ("postgres://ann@db/x?sslmode=verify-full", "sslmode"),
            (
                "postgres://ann@db/x?options=-c%20role%3Dpostgres",
                "\"options\"",
            ),
            ("postgres://ann@db/x?passfile=/root/.pgpass", "\"passfile\""),
            ("postgres://ann@db/x?user=postgres", "\"user\""),
            ("postgres://db/x", "user"),
            ("postgres://ann@db", "database"),
            ("postgres://ann@db/", "database"),
        ] {
            let error = TargetUrl::parse(raw)
                .err()
                .unwrap_or_else(|| panic!("{raw} parsed"));
            assert!(error.contains(why), "{raw}: {error}");
        }
    }

    /// One test, since the environment is the process's.
    #[test]
    fn options_ignore_the_environment() {
        let checked = CheckedTarget {
            url: TargetUrl::parse("postgres://ann@db.example.com:6543/sales").unwrap(),
            ip: "203.0.113.7".parse().unwrap(),
        };
        std::env::set_var("PGPASSWORD", "operator-secret");
        std::env::set_var("PGAPPNAME", "operator");
        std::env::set_var("PGSSLMODE", "verify-full");
        let options = checked.connect_options().unwrap();
        std::env::remove_var("PGPASSWORD");
        std::env::remove_var("PGAPPNAME");
        std::env::remove_var("PGSSLMODE");
        assert_eq!(options.get_host(), "203.0.113.7");
        assert_eq!(options.get_port(), 6543);
        assert_eq!(options.get_username(), "ann");
        assert_eq!(options.get_database(), Some("sales"));
        assert_eq!(options.get_application_name(), Some("conveyor"));
        assert!(matches!(options.get_ssl_mode(), PgSslMode::Prefer));
        assert!(!format!("{options:?}").contains("operator-secret"));

        std::env::set_var("PGSSLKEY", "/etc/ssl/private/operator.key");
        let refused = checked.connect_options();
        std::env::remove_var("PGSSLKEY");
        assert!(matches!(refused, Err(Refusal::Unreachable(why)) if why.contains("PGSSLKEY")));
    }
}
