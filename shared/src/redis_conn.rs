//! Where Redis is: a plain `redis://` URL, or Redis Sentinel with a URL form of our own,
//! `redis+sentinel://[user:password@]host:port[,host:port...]/master-name[?db=N]`.
//!
//! With Sentinel, every connection is made to the primary the sentinels name now (and that
//! answers `ROLE` as a master), and a connection that fails or answers `READONLY` (a demoted
//! primary) is dropped so that the next command resolves the primary again. redis-rs'
//! connection manager reconnects to the address it was given, which after a failover is a dead
//! node or a replica.

use redis::{
    aio::{ConnectionLike, ConnectionManager, MultiplexedConnection},
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, IntoConnectionInfo, Pipeline,
    RedisConnectionInfo, RedisError, RedisFuture, RedisResult, Value,
};
use std::{
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

pub const SENTINEL_SCHEME: &str = "redis+sentinel://";

/// How long one sentinel may take to answer where the primary is.
const SENTINEL_TIMEOUT: Duration = Duration::from_secs(2);

/// After a failed resolution, commands fail at once for this long rather than each asking the
/// sentinels again (many commands wait on one connection during a failover).
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// A parsed `CONVEYOR_REDIS_URL`.
#[derive(Clone, PartialEq)]
pub enum RedisUrl {
    /// Anything redis-rs parses (`redis://`, `rediss://`, `unix://`).
    Direct(String),
    Sentinel(SentinelUrl),
}

/// The sentinels to ask and what to ask them. The user and password are the data nodes'; the
/// sentinels are asked without a password.
#[derive(Clone, PartialEq)]
pub struct SentinelUrl {
    pub sentinels: Vec<(String, u16)>,
    pub master: String,
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// The URL as given, with `***` for a password.
impl fmt::Debug for SentinelUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(SENTINEL_SCHEME)?;
        if self.username.is_some() || self.password.is_some() {
            let password = if self.password.is_some() { ":***" } else { "" };
            write!(f, "{}{password}@", self.username.as_deref().unwrap_or(""))?;
        }
        for (i, (host, port)) in self.sentinels.iter().enumerate() {
            let comma = if i > 0 { "," } else { "" };
            match host.contains(':') {
                true => write!(f, "{comma}[{host}]:{port}")?,
                false => write!(f, "{comma}{host}:{port}")?,
            }
        }
        write!(f, "/{}?db={}", self.master, self.db)
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Direct(url) => f.write_str(&crate::db::redact(url)),
            Self::Sentinel(url) => url.fmt(f),
        }
    }
}

/// `raw` for logs: the password replaced, whatever the form.
pub fn redact(raw: &str) -> String {
    match RedisUrl::parse(raw) {
        Ok(url) => format!("{url:?}"),
        Err(_) => crate::db::redact(raw),
    }
}

/// A Redis URL that cannot be used, and why (never the URL itself: it may hold a password).
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("CONVEYOR_REDIS_URL: {0}")]
pub struct BadRedisUrl(String);

fn bad<T>(why: impl Into<String>) -> Result<T, BadRedisUrl> {
    Err(BadRedisUrl(why.into()))
}

impl RedisUrl {
    pub fn parse(raw: &str) -> Result<Self, BadRedisUrl> {
        let Some(rest) = raw.strip_prefix(SENTINEL_SCHEME) else {
            return match Client::open(raw) {
                Ok(_) => Ok(Self::Direct(raw.to_owned())),
                Err(e) => bad(format!("not a Redis URL ({:?})", e.kind())),
            };
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo), hosts),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(userinfo) => {
                let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                let decode = |part: &str| {
                    percent_encoding::percent_decode_str(part)
                        .decode_utf8()
                        .map(|s| s.into_owned())
                        .or_else(|_| bad("the user or password is not UTF-8 once decoded"))
                };
                let nonempty = |s: String| (!s.is_empty()).then_some(s);
                (nonempty(decode(user)?), nonempty(decode(password)?))
            }
        };
        let mut sentinels = Vec::new();
        for host in hosts.split(',') {
            sentinels.push(parse_host(host)?);
        }
        let master = percent_encoding::percent_decode_str(path)
            .decode_utf8()
            .map_err(|_| BadRedisUrl("the master name is not UTF-8".into()))?
            .into_owned();
        if master.is_empty() || master.contains('/') {
            return bad("the path must be the master's name, as the sentinels know it");
        }
        let mut db = 0;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("db", n)) => match n.parse::<i64>() {
                    Ok(n) if n >= 0 => db = n,
                    _ => return bad(format!("db must be a database number, not {n:?}")),
                },
                _ => {
                    let key = pair.split('=').next().unwrap_or_default();
                    return bad(format!("unknown parameter {key:?} (only db=N is known)"));
                }
            }
        }
        Ok(Self::Sentinel(SentinelUrl {
            sentinels,
            master,
            db,
            username,
            password,
        }))
    }
}

/// `host:port` or `[v6]:port`; the port is required, since a sentinel's is not Redis'.
fn parse_host(host: &str) -> Result<(String, u16), BadRedisUrl> {
    let (name, port) = if let Some(v6) = host.strip_prefix('[') {
        match v6.split_once("]:") {
            Some((name, port)) => (name, port),
            None => return bad(format!("sentinel {host:?} is not [address]:port")),
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if !name.contains(':') => (name, port),
            _ => return bad(format!("sentinel {host:?} is not host:port")),
        }
    };
    if name.is_empty() {
        return bad(format!("sentinel {host:?} has no host"));
    }
    match port.parse::<u16>() {
        Ok(port) if port > 0 => Ok((name.to_owned(), port)),
        _ => bad(format!("sentinel {host:?} has no valid port")),
    }
}

/// A way to the current primary: what the binaries hold instead of a `redis::Client`.
#[derive(Clone)]
pub struct Redis(Arc<RedisUrl>);

impl fmt::Debug for Redis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Redis {
    pub fn open(url: &str) -> Result<Self, BadRedisUrl> {
        Ok(Self(Arc::new(RedisUrl::parse(url)?)))
    }

    /// A client of the primary as the sentinels name it now (checked with `ROLE`): for
    /// connections of one use (Pub/Sub, a blocking read) that are opened again when they fail.
    pub async fn client(&self) -> RedisResult<Client> {
        match &*self.0 {
            RedisUrl::Direct(url) => Client::open(url.as_str()),
            RedisUrl::Sentinel(sentinel) => resolve(sentinel).await,
        }
    }

    /// A multiplexed connection to the current primary.
    pub async fn connect(
        &self,
        config: &AsyncConnectionConfig,
    ) -> RedisResult<MultiplexedConnection> {
        self.client()
            .await?
            .get_multiplexed_async_connection_with_config(config)
            .await
    }

    /// The shared connection of a process: redis-rs' connection manager for a plain URL; with
    /// Sentinel one that resolves the primary again when its connection fails.
    pub async fn manager(&self) -> RedisResult<RedisConn> {
        match &*self.0 {
            RedisUrl::Direct(url) => Ok(RedisConn::Direct(
                Client::open(url.as_str())?.get_connection_manager().await?,
            )),
            RedisUrl::Sentinel(sentinel) => {
                let failover = Arc::new(Failover {
                    redis: self.clone(),
                    db: sentinel.db,
                    current: Mutex::default(),
                    connecting: tokio::sync::Mutex::default(),
                });
                // Fail at start, as the connection manager does, when nothing answers.
                failover.connection().await?;
                Ok(RedisConn::Failover(failover))
            }
        }
    }
}

/// Asks each sentinel in turn where `url.master` is, and checks that it is a primary.
async fn resolve(url: &SentinelUrl) -> RedisResult<Client> {
    let mut last_error = None;
    for (host, port) in &url.sentinels {
        match ask_sentinel(url, host, *port).await {
            Ok(client) => return Ok(client),
            Err(e) => {
                tracing::debug!(sentinel = %host, port, error = %e, "sentinel did not name a primary");
                last_error = Some(e);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| io_error("no sentinel in the URL")))
}

async fn ask_sentinel(url: &SentinelUrl, host: &str, port: u16) -> RedisResult<Client> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(SENTINEL_TIMEOUT))
        .set_response_timeout(Some(SENTINEL_TIMEOUT));
    let sentinel = Client::open(ConnectionAddr::Tcp(host.to_owned(), port))?;
    let mut conn = sentinel
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(&url.master)
        .query_async(&mut conn)
        .await?;
    let Some((master_host, master_port)) = addr else {
        return Err(io_error("the sentinel does not know the master's name"));
    };
    let mut settings = RedisConnectionInfo::default().set_db(url.db);
    if let Some(user) = &url.username {
        settings = settings.set_username(user);
    }
    if let Some(password) = &url.password {
        settings = settings.set_password(password);
    }
    let info = ConnectionAddr::Tcp(master_host, master_port)
        .into_connection_info()?
        .set_redis_settings(settings);
    let client = Client::open(info)?;
    // A sentinel may name a node that is not (or no longer) the primary during a failover.
    let mut node = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut node).await?;
    match role.first() {
        Some(Value::BulkString(role)) if role == b"master" => Ok(client),
        _ => Err(io_error("the node the sentinel named is not a primary")),
    }
}

fn io_error(why: &'static str) -> RedisError {
    RedisError::from(std::io::Error::new(std::io::ErrorKind::NotConnected, why))
}

/// A connection to the primary, shared by clones: redis-rs' connection manager, or with
/// Sentinel one that drops its connection on failure and resolves the primary again.
#[derive(Clone)]
pub enum RedisConn {
    Direct(ConnectionManager),
    Failover(Arc<Failover>),
}

pub struct Failover {
    redis: Redis,
    db: i64,
    /// The connection in use and its generation, so that a failure on an old connection does
    /// not drop a newer one.
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    /// Held while connecting, so that many failing commands resolve the primary once.
    connecting: tokio::sync::Mutex<Connecting>,
}

#[derive(Default)]
struct Connecting {
    generation: u64,
    failed_at: Option<Instant>,
}

impl Failover {
    fn current(&self) -> Option<(u64, MultiplexedConnection)> {
        self.current.lock().expect("redis lock").clone()
    }

    async fn connection(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let mut connecting = self.connecting.lock().await;
        if let Some(current) = self.current() {
            return Ok(current);
        }
        if connecting
            .failed_at
            .is_some_and(|at| at.elapsed() < RETRY_AFTER)
        {
            return Err(io_error("the Redis primary was not found just now"));
        }
        let conn = match self.redis.connect(&AsyncConnectionConfig::new()).await {
            Ok(conn) => conn,
            Err(e) => {
                connecting.failed_at = Some(Instant::now());
                return Err(e);
            }
        };
        connecting.failed_at = None;
        connecting.generation += 1;
        let current = (connecting.generation, conn);
        *self.current.lock().expect("redis lock") = Some(current.clone());
        tracing::info!(generation = current.0, "connected to the Redis primary");
        Ok(current)
    }

    /// Drops the connection of `generation` after `result` says the primary is gone or moved.
    fn check<T>(&self, generation: u64, result: RedisResult<T>) -> RedisResult<T> {
        if let Some(e) = result.as_ref().err().filter(|e| primary_lost(e)) {
            let mut current = self.current.lock().expect("redis lock");
            if current.as_ref().is_some_and(|(g, _)| *g == generation) {
                tracing::warn!(error = %e, "the Redis primary is lost; resolving it again");
                *current = None;
            }
        }
        result
    }
}

/// Errors after which this connection's node may no longer be the primary.
fn primary_lost(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || e.is_timeout()
        || matches!(e.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"))
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Direct(conn) => conn.req_packed_command(cmd),
            Self::Failover(failover) => Box::pin(async move {
                let (generation, mut conn) = failover.connection().await?;
                let result = conn.req_packed_command(cmd).await;
                failover.check(generation, result)
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Direct(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Failover(failover) => Box::pin(async move {
                let (generation, mut conn) = failover.connection().await?;
                let result = conn.req_packed_commands(pipeline, offset, count).await;
                failover.check(generation, result)
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Direct(conn) => conn.get_db(),
            Self::Failover(failover) => failover.db,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sentinel(raw: &str) -> SentinelUrl {
        match RedisUrl::parse(raw).expect("parses") {
            RedisUrl::Sentinel(url) => url,
            other => panic!("not a sentinel URL: {other:?}"),
        }
    }

    #[test]
    fn the_sentinel_form_parses() {
        let url = sentinel("redis+sentinel://:s%40cret@127.0.0.1:26379,[::1]:26380/jobs?db=3");
        assert_eq!(
            url.sentinels,
            [("127.0.0.1".into(), 26379), ("::1".into(), 26380)]
        );
        assert_eq!(url.master, "jobs");
        assert_eq!(url.db, 3);
        assert_eq!(url.username, None);
        assert_eq!(url.password.as_deref(), Some("s@cret"));
        let url = sentinel("redis+sentinel://app:pw@sentinel-a:26379/mymaster");
        assert_eq!(url.username.as_deref(), Some("app"));
        assert_eq!(url.db, 0);
        assert_eq!(
            RedisUrl::parse("redis://127.0.0.1:6379/2"),
            Ok(RedisUrl::Direct("redis://127.0.0.1:6379/2".into()))
        );
    }

    #[test]
    fn bad_forms_are_refused_with_the_reason() {
        for (raw, reason) in [
            ("redis+sentinel://127.0.0.1:26379", "master's name"),
            ("redis+sentinel://127.0.0.1:26379/", "master's name"),
            ("redis+sentinel://127.0.0.1:26379/a/b", "master's name"),
            ("redis+sentinel://127.0.0.1/m", "not host:port"),
            ("redis+sentinel://127.0.0.1:0/m", "no valid port"),
            ("redis+sentinel://127.0.0.1:99999/m", "no valid port"),
            ("redis+sentinel://a:1,,b:2/m", "not host:port"),
            ("redis+sentinel://:1/m", "has no host"),
            ("redis+sentinel://[::1/m", "not [address]:port"),
            ("redis+sentinel://a:1/m?db=x", "db must be"),
            ("redis+sentinel://a:1/m?db=-1", "db must be"),
            ("redis+sentinel://a:1/m?tls=1", "unknown parameter \"tls\""),
            ("http://127.0.0.1:6379", "not a Redis URL"),
        ] {
            let error = RedisUrl::parse(raw).expect_err(raw).to_string();
            assert!(error.starts_with("CONVEYOR_REDIS_URL: "), "{error}");
            assert!(error.contains(reason), "{raw}: {error}");
        }
    }

    /// What a demoted primary answers to a write, as Redis sends it: the connection is dropped
    /// and the primary found again. An error of the command itself keeps the connection.
    #[test]
    fn a_readonly_answer_means_the_primary_moved() {
        let error = |reply: &[u8]| {
            redis::parse_redis_value(reply)
                .unwrap()
                .extract_error()
                .unwrap_err()
        };
        let readonly = error(b"-READONLY You can't write against a read only replica.\r\n");
        assert!(primary_lost(&readonly));
        assert!(primary_lost(&error(
            b"-LOADING Redis is loading the dataset\r\n"
        )));
        let wrong_type = error(b"-WRONGTYPE Operation against a key holding the wrong kind\r\n");
        assert!(!primary_lost(&wrong_type));
    }

    #[test]
    fn the_password_is_never_shown() {
        for raw in [
            "redis+sentinel://app:hunter2@127.0.0.1:26379/m",
            "redis://:hunter2@127.0.0.1:6379",
        ] {
            let redis = Redis::open(raw).unwrap();
            let shown = format!("{redis:?}");
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains(":***@127.0.0.1:"), "{shown}");
            assert_eq!(redact(raw), shown);
        }
        // Nor in an error about the rest of the URL.
        let error = RedisUrl::parse("redis+sentinel://app:hunter2@127.0.0.1/m").unwrap_err();
        assert!(!error.to_string().contains("hunter2"), "{error}");
    }
}
