//! Where Redis is: a plain `redis://` URL, Redis Sentinel, or Redis Cluster, the last two
//! with URL forms of our own:
//!
//! - `redis+sentinel://[user:password@]host:port[,host:port...]/master-name[?db=N]
//!   [&sentinel_username=U][&sentinel_password=P]` (the user and password are the data nodes';
//!   the sentinels' own, if they require one, are the two parameters, percent-encoded);
//! - `redis+cluster://[user:password@]host:port[,host:port...][/]`: any nodes of the cluster,
//!   from which the client learns the rest.
//!
//! With Sentinel, every connection is made to the primary the sentinels name now (and that
//! answers `ROLE` as a master), and a connection that fails or answers `READONLY` (a demoted
//! primary) is dropped so that the next command resolves the primary again. redis-rs'
//! connection manager reconnects to the address it was given, which after a failover is a dead
//! node or a replica.
//!
//! With Cluster, commands go through redis-rs' cluster client, which routes each by its key's
//! slot and follows `MOVED`/`ASK`. The key layout makes that possible: every key a script or a
//! pipeline touches together shares one hash tag (a tenant's streams and rate buckets
//! `{tenant}`).

use redis::{
    aio::{ConnectionLike, ConnectionManager, MultiplexedConnection},
    cluster::{ClusterClient, ClusterClientBuilder},
    cluster_async::ClusterConnection,
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, IntoConnectionInfo, Pipeline,
    RedisConnectionInfo, RedisError, RedisFuture, RedisResult, Value,
};
use std::{
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

pub const SENTINEL_SCHEME: &str = "redis+sentinel://";
pub const CLUSTER_SCHEME: &str = "redis+cluster://";

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
    Cluster(ClusterUrl),
}

/// The sentinels to ask and what to ask them. `username` and `password` are the data nodes';
/// `sentinel_username` and `sentinel_password` the sentinels' own (`requirepass` on a
/// sentinel), if they have one.
#[derive(Clone, PartialEq)]
pub struct SentinelUrl {
    pub sentinels: Vec<(String, u16)>,
    pub master: String,
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<String>,
    pub sentinel_username: Option<String>,
    pub sentinel_password: Option<String>,
}

/// Some nodes of a Redis Cluster (the client discovers the others) and their credentials.
#[derive(Clone, PartialEq)]
pub struct ClusterUrl {
    pub nodes: Vec<(String, u16)>,
    pub username: Option<String>,
    pub password: Option<String>,
}

fn write_userinfo(
    f: &mut fmt::Formatter<'_>,
    username: &Option<String>,
    password: &Option<String>,
) -> fmt::Result {
    if username.is_some() || password.is_some() {
        let password = if password.is_some() { ":***" } else { "" };
        write!(f, "{}{password}@", username.as_deref().unwrap_or(""))?;
    }
    Ok(())
}

fn write_hosts(f: &mut fmt::Formatter<'_>, hosts: &[(String, u16)]) -> fmt::Result {
    for (i, (host, port)) in hosts.iter().enumerate() {
        let comma = if i > 0 { "," } else { "" };
        match host.contains(':') {
            true => write!(f, "{comma}[{host}]:{port}")?,
            false => write!(f, "{comma}{host}:{port}")?,
        }
    }
    Ok(())
}

/// The URL as given, with `***` for each password.
impl fmt::Debug for SentinelUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(SENTINEL_SCHEME)?;
        write_userinfo(f, &self.username, &self.password)?;
        write_hosts(f, &self.sentinels)?;
        write!(f, "/{}?db={}", self.master, self.db)?;
        if let Some(user) = &self.sentinel_username {
            write!(f, "&sentinel_username={user}")?;
        }
        if self.sentinel_password.is_some() {
            f.write_str("&sentinel_password=***")?;
        }
        Ok(())
    }
}

/// The URL as given, with `***` for the password.
impl fmt::Debug for ClusterUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(CLUSTER_SCHEME)?;
        write_userinfo(f, &self.username, &self.password)?;
        write_hosts(f, &self.nodes)?;
        f.write_str("/")
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Direct(url) => f.write_str(&crate::db::redact(url)),
            Self::Sentinel(url) => url.fmt(f),
            Self::Cluster(url) => url.fmt(f),
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

fn decode(part: &str, what: &str) -> Result<String, BadRedisUrl> {
    percent_encoding::percent_decode_str(part)
        .decode_utf8()
        .map(|s| s.into_owned())
        .or_else(|_| bad(format!("{what} is not UTF-8 once decoded")))
}

fn nonempty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// What follows the scheme of our forms: `[user:password@]host:port[,...]` and the rest.
struct Authority<'a> {
    username: Option<String>,
    password: Option<String>,
    hosts: Vec<(String, u16)>,
    path: &'a str,
    query: &'a str,
}

fn parse_authority<'a>(rest: &'a str, noun: &str) -> Result<Authority<'a>, BadRedisUrl> {
    // The authority ends at the first `/` or `?` after its userinfo: a password may hold a
    // `/` (not a `?`, which ends it). Split at the first `/` before, a password `s3cr/et`
    // became the host `:s3cr`, and the error quoted it.
    let before_query = rest.split('?').next().unwrap_or_default();
    let hosts_at = before_query.rfind('@').map_or(0, |at| at + 1);
    let end = rest[hosts_at..]
        .find(['/', '?'])
        .map_or(rest.len(), |i| hosts_at + i);
    let (authority, tail) = rest.split_at(end);
    let (path, query) = match tail.strip_prefix('/') {
        Some(path) => path.split_once('?').unwrap_or((path, "")),
        None => ("", tail.strip_prefix('?').unwrap_or_default()),
    };
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(userinfo) => {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            (
                nonempty(decode(user, "the user")?),
                nonempty(decode(password, "the password")?),
            )
        }
    };
    let mut parsed = Vec::new();
    for (i, host) in hosts.split(',').enumerate() {
        // With a password in the URL (an `@` anywhere), a host's text may be a piece of it:
        // named by position.
        let shown = match rest.contains('@') {
            true => format!("the {} {noun}", ordinal(i + 1)),
            false => format!("{noun} {host:?}"),
        };
        parsed.push(parse_host(host, &shown)?);
    }
    Ok(Authority {
        username,
        password,
        hosts: parsed,
        path,
        query,
    })
}

impl RedisUrl {
    pub fn parse(raw: &str) -> Result<Self, BadRedisUrl> {
        if let Some(rest) = raw.strip_prefix(CLUSTER_SCHEME) {
            let authority = parse_authority(rest, "node")?;
            if !authority.path.is_empty() {
                return bad("a cluster URL has no path (a cluster has only database 0)");
            }
            if let Some(key) = authority.query.split('&').find(|p| !p.is_empty()) {
                let key = key.split('=').next().unwrap_or_default();
                let key = match rest.contains('@') {
                    true => "after the hosts".to_owned(),
                    false => format!("{key:?}"),
                };
                return bad(format!(
                    "unknown parameter {key} (a cluster URL takes none)"
                ));
            }
            return Ok(Self::Cluster(ClusterUrl {
                nodes: authority.hosts,
                username: authority.username,
                password: authority.password,
            }));
        }
        let Some(rest) = raw.strip_prefix(SENTINEL_SCHEME) else {
            return match Client::open(raw) {
                Ok(_) => Ok(Self::Direct(raw.to_owned())),
                Err(e) => bad(format!("not a Redis URL ({:?})", e.kind())),
            };
        };
        let authority = parse_authority(rest, "sentinel")?;
        let master = percent_encoding::percent_decode_str(authority.path)
            .decode_utf8()
            .map_err(|_| BadRedisUrl("the master name is not UTF-8".into()))?
            .into_owned();
        if master.is_empty() || master.contains('/') {
            return bad("the path must be the master's name, as the sentinels know it");
        }
        let mut db = 0;
        let (mut sentinel_username, mut sentinel_password) = (None, None);
        // A password holding `&`, or a `?` typed for an `&`, leaves part of it in another
        // parameter: nothing of the query is quoted then.
        let secret_near = rest.contains('@') || authority.query.contains("sentinel_password=");
        for pair in authority.query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("db", n)) => match n.parse::<i64>() {
                    Ok(n) if n >= 0 => db = n,
                    _ if secret_near => return bad("db must be a database number"),
                    _ => return bad(format!("db must be a database number, not {n:?}")),
                },
                Some(("sentinel_username", user)) => {
                    sentinel_username = nonempty(decode(user, "sentinel_username")?);
                }
                // Never in the error: it is a password.
                Some(("sentinel_password", password)) => {
                    sentinel_password = nonempty(decode(password, "sentinel_password")?);
                }
                _ => {
                    // A password holding `&` leaves its rest as a "parameter": not quoted then.
                    let key = pair.split('=').next().unwrap_or_default();
                    let key = match secret_near || pair.contains("sentinel_password=") {
                        true => "after sentinel_password".to_owned(),
                        false => format!("{key:?}"),
                    };
                    return bad(format!(
                        "unknown parameter {key} (known: db, sentinel_username, sentinel_password)"
                    ));
                }
            }
        }
        Ok(Self::Sentinel(SentinelUrl {
            sentinels: authority.hosts,
            master,
            db,
            username: authority.username,
            password: authority.password,
            sentinel_username,
            sentinel_password,
        }))
    }
}

/// `1st`, `2nd`, `3rd`, `4th`...
fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (1, 11) | (2, 12) | (3, 13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// `host:port` or `[v6]:port`; the port is required, since a sentinel's is not Redis'.
fn parse_host(host: &str, shown: &str) -> Result<(String, u16), BadRedisUrl> {
    let (name, port) = if let Some(v6) = host.strip_prefix('[') {
        match v6.split_once("]:") {
            Some((name, port)) => (name, port),
            None => return bad(format!("{shown} is not [address]:port")),
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if !name.contains(':') => (name, port),
            _ => return bad(format!("{shown} is not host:port")),
        }
    };
    if name.is_empty() {
        return bad(format!("{shown} has no host"));
    }
    match port.parse::<u16>() {
        Ok(port) if port > 0 => Ok((name.to_owned(), port)),
        _ => bad(format!("{shown} has no valid port")),
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

/// Timeouts of a connection: to connect, and to wait for each answer (`None`: no limit).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    pub response: Option<Duration>,
}

impl Default for Timeouts {
    /// redis-rs' defaults for a multiplexed connection.
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(1),
            response: Some(Duration::from_millis(500)),
        }
    }
}

impl Timeouts {
    fn config(self) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect))
            .set_response_timeout(self.response)
    }
}

impl Redis {
    pub fn open(url: &str) -> Result<Self, BadRedisUrl> {
        Ok(Self(Arc::new(RedisUrl::parse(url)?)))
    }

    pub fn is_cluster(&self) -> bool {
        matches!(&*self.0, RedisUrl::Cluster(_))
    }

    /// A client for Pub/Sub: of the primary as the sentinels name it now (checked with
    /// `ROLE`), or of the first cluster node that answers (a cluster forwards every `PUBLISH`
    /// to all its nodes). For connections of one use that are opened again when they fail.
    pub async fn client(&self) -> RedisResult<Client> {
        match &*self.0 {
            RedisUrl::Direct(url) => Client::open(url.as_str()),
            RedisUrl::Sentinel(sentinel) => resolve(sentinel).await,
            RedisUrl::Cluster(cluster) => any_node(cluster).await,
        }
    }

    /// A connection of its own (a blocking read, a one-off command): a multiplexed connection
    /// to the current primary, or a cluster connection.
    pub async fn connect(&self, timeouts: Timeouts) -> RedisResult<RedisConn> {
        match &*self.0 {
            RedisUrl::Cluster(cluster) => Ok(RedisConn::Cluster(
                cluster_client(cluster, timeouts)?
                    .get_async_connection()
                    .await?,
            )),
            _ => Ok(RedisConn::Single(self.connect_primary(timeouts).await?)),
        }
    }

    async fn connect_primary(&self, timeouts: Timeouts) -> RedisResult<MultiplexedConnection> {
        self.client()
            .await?
            .get_multiplexed_async_connection_with_config(&timeouts.config())
            .await
    }

    /// The shared connection of a process: redis-rs' connection manager for a plain URL; with
    /// Sentinel one that resolves the primary again when its connection fails; redis-rs'
    /// cluster connection for a cluster (it follows slot moves and failovers by itself).
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
                    node: Mutex::default(),
                    verified_at: Mutex::default(),
                    verifying: Default::default(),
                });
                // Fail at start, as the connection manager does, when nothing answers.
                failover.connection().await?;
                Ok(RedisConn::Failover(failover))
            }
            RedisUrl::Cluster(cluster) => {
                // No command on the shared connection blocks; a node that hangs must not hold
                // its callers forever.
                let timeouts = Timeouts {
                    connect: Duration::from_secs(1),
                    response: Some(Duration::from_secs(5)),
                };
                Ok(RedisConn::Cluster(
                    cluster_client(cluster, timeouts)?
                        .get_async_connection()
                        .await?,
                ))
            }
        }
    }
}

fn cluster_client(url: &ClusterUrl, timeouts: Timeouts) -> RedisResult<ClusterClient> {
    let nodes = url
        .nodes
        .iter()
        .map(|(host, port)| ConnectionAddr::Tcp(host.clone(), *port).into_connection_info())
        .collect::<RedisResult<Vec<_>>>()?;
    let mut builder = ClusterClientBuilder::new(nodes).connection_timeout(timeouts.connect);
    if let Some(response) = timeouts.response {
        builder = builder.response_timeout(response);
    }
    if let Some(user) = &url.username {
        builder = builder.username(user);
    }
    if let Some(password) = &url.password {
        builder = builder.password(password);
    }
    builder.build()
}

/// A client of the first node of the URL that answers `PING`.
async fn any_node(url: &ClusterUrl) -> RedisResult<Client> {
    let mut last_error = None;
    for (host, port) in &url.nodes {
        let mut settings = RedisConnectionInfo::default();
        if let Some(user) = &url.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = &url.password {
            settings = settings.set_password(password);
        }
        let info = ConnectionAddr::Tcp(host.clone(), *port)
            .into_connection_info()?
            .set_redis_settings(settings);
        let client = Client::open(info)?;
        let answered = async {
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&Timeouts::default().config())
                .await?;
            redis::cmd("PING").query_async::<()>(&mut conn).await
        };
        match answered.await {
            Ok(()) => return Ok(client),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| io_error("no node in the URL")))
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

/// The primary the first sentinel that answers names now (not checked with `ROLE`).
async fn named_primary(url: &SentinelUrl) -> RedisResult<(String, u16)> {
    let mut last_error = None;
    for (host, port) in &url.sentinels {
        match sentinel_names(url, host, *port).await {
            Ok(addr) => return Ok(addr),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| io_error("no sentinel in the URL")))
}

fn sentinel_config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(SENTINEL_TIMEOUT))
        .set_response_timeout(Some(SENTINEL_TIMEOUT))
}

/// `SENTINEL get-master-addr-by-name` of the sentinel at `host:port`, with the sentinels' own
/// credentials if the URL has them.
async fn sentinel_names(url: &SentinelUrl, host: &str, port: u16) -> RedisResult<(String, u16)> {
    let mut auth = RedisConnectionInfo::default();
    if let Some(user) = &url.sentinel_username {
        auth = auth.set_username(user);
    }
    if let Some(password) = &url.sentinel_password {
        auth = auth.set_password(password);
    }
    let sentinel = Client::open(
        ConnectionAddr::Tcp(host.to_owned(), port)
            .into_connection_info()?
            .set_redis_settings(auth),
    )?;
    let mut conn = sentinel
        .get_multiplexed_async_connection_with_config(&sentinel_config())
        .await?;
    let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(&url.master)
        .query_async(&mut conn)
        .await?;
    addr.ok_or_else(|| io_error("the sentinel does not know the master's name"))
}

async fn ask_sentinel(url: &SentinelUrl, host: &str, port: u16) -> RedisResult<Client> {
    let (master_host, master_port) = sentinel_names(url, host, port).await?;
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
        .get_multiplexed_async_connection_with_config(&sentinel_config())
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

/// A connection to the primary, shared by clones: redis-rs' connection manager, a multiplexed
/// connection of one use, with Sentinel one that drops its connection on failure and resolves
/// the primary again, or redis-rs' cluster connection.
#[derive(Clone)]
pub enum RedisConn {
    Direct(ConnectionManager),
    Single(MultiplexedConnection),
    Failover(Arc<Failover>),
    Cluster(ClusterConnection),
}

pub struct Failover {
    redis: Redis,
    db: i64,
    /// The connection in use and its generation, so that a failure on an old connection does
    /// not drop a newer one.
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    /// Held while connecting, so that many failing commands resolve the primary once.
    connecting: tokio::sync::Mutex<Connecting>,
    /// The node of the connection of each generation, and when the sentinels were last asked
    /// whether they still name it (see [`Failover::verify_soon`]).
    node: Mutex<Option<(u64, ConnectionAddr)>>,
    verified_at: Mutex<Option<Instant>>,
    verifying: std::sync::atomic::AtomicBool,
}

/// While a connection is in use, the sentinels are asked this often whether the node it is on
/// is still the one they name. After a failover that leaves the old primary up, that node takes
/// writes (lost when it becomes a replica) until the sentinels reconfigure it, seconds later.
const VERIFY_EVERY: Duration = Duration::from_secs(1);

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
        let connected = async {
            let client = self.redis.client().await?;
            let addr = client.get_connection_info().addr().clone();
            let conn = client
                .get_multiplexed_async_connection_with_config(&Timeouts::default().config())
                .await?;
            Ok::<_, RedisError>((addr, conn))
        };
        let (addr, conn) = match connected.await {
            Ok(connected) => connected,
            Err(e) => {
                connecting.failed_at = Some(Instant::now());
                return Err(e);
            }
        };
        connecting.failed_at = None;
        connecting.generation += 1;
        *self.node.lock().expect("redis lock") = Some((connecting.generation, addr));
        *self.verified_at.lock().expect("redis lock") = Some(Instant::now());
        let current = (connecting.generation, conn);
        *self.current.lock().expect("redis lock") = Some(current.clone());
        tracing::info!(generation = current.0, "connected to the Redis primary");
        Ok(current)
    }

    /// At most every [`VERIFY_EVERY`], in the background: asks the sentinels which node is the
    /// primary, and drops the connection of `generation` if they name another one than it is
    /// on (no command waits on this; a sentinel that does not answer changes nothing).
    fn verify_soon(self: &Arc<Self>, generation: u64) {
        {
            let mut at = self.verified_at.lock().expect("redis lock");
            if at.is_some_and(|at| at.elapsed() < VERIFY_EVERY) {
                return;
            }
            *at = Some(Instant::now());
        }
        if self
            .verifying
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let named = match &*this.redis.0 {
                RedisUrl::Sentinel(url) => named_primary(url).await.ok(),
                _ => None,
            };
            this.verifying
                .store(false, std::sync::atomic::Ordering::Release);
            let Some((host, port)) = named else { return };
            let moved = match &*this.node.lock().expect("redis lock") {
                Some((g, ConnectionAddr::Tcp(on_host, on_port))) if *g == generation => {
                    (on_host.as_str(), *on_port) != (host.as_str(), port)
                }
                _ => false,
            };
            if moved {
                let mut current = this.current.lock().expect("redis lock");
                if current.as_ref().is_some_and(|(g, _)| *g == generation) {
                    tracing::warn!("the sentinels name another Redis primary; resolving it again");
                    *current = None;
                }
            }
        });
    }

    /// Drops the connection of `generation` after `result` says the primary is gone or moved.
    fn check<T>(
        &self,
        generation: u64,
        result: RedisResult<T>,
        replies: impl Fn(&T) -> Option<RedisError>,
    ) -> RedisResult<T> {
        let error = match &result {
            Err(e) => primary_lost(e).then(|| e.to_string()),
            Ok(value) => replies(value).filter(primary_lost).map(|e| e.to_string()),
        };
        if let Some(e) = error {
            let mut current = self.current.lock().expect("redis lock");
            if current.as_ref().is_some_and(|(g, _)| *g == generation) {
                tracing::warn!(error = %e, "the Redis primary is lost; resolving it again");
                *current = None;
            }
        }
        result
    }
}

/// An error answer inside `value` (a reply, or a pipeline's replies), as an error: redis-rs
/// hands error replies up as values (`Value::ServerError`), made errors only when read.
fn error_in(value: &Value) -> Option<RedisError> {
    match value {
        Value::ServerError(e) => Some(e.clone().into()),
        _ => None,
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

impl RedisConn {
    /// Whether commands go to a Redis Cluster, where the keys of one script or pipeline must
    /// share a slot.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Direct(conn) => conn.req_packed_command(cmd),
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
            Self::Failover(failover) => Box::pin(async move {
                let (generation, mut conn) = failover.connection().await?;
                failover.verify_soon(generation);
                let result = conn.req_packed_command(cmd).await;
                failover.check(generation, result, error_in)
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
            Self::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Failover(failover) => Box::pin(async move {
                let (generation, mut conn) = failover.connection().await?;
                failover.verify_soon(generation);
                let result = conn.req_packed_commands(pipeline, offset, count).await;
                failover.check(generation, result, |values| {
                    values.iter().find_map(error_in)
                })
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Direct(conn) => conn.get_db(),
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
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
        assert_eq!((url.sentinel_username, url.sentinel_password), (None, None));
        let url = sentinel("redis+sentinel://app:pw@sentinel-a:26379/mymaster");
        assert_eq!(url.username.as_deref(), Some("app"));
        assert_eq!(url.db, 0);
        // The sentinels' own credentials, apart from the data nodes'.
        let url = sentinel(
            "redis+sentinel://:data@s:26379/m?sentinel_password=s%26nt%3Dpw&db=2&sentinel_username=watch",
        );
        assert_eq!(url.password.as_deref(), Some("data"));
        assert_eq!(url.sentinel_password.as_deref(), Some("s&nt=pw"));
        assert_eq!(url.sentinel_username.as_deref(), Some("watch"));
        assert_eq!(url.db, 2);
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
            ("redis+sentinel://a:1/m?sentinel_password=%FF", "not UTF-8"),
            (
                "redis+cluster://127.0.0.1",
                "node \"127.0.0.1\" is not host:port",
            ),
            ("redis+cluster://a:1,b/", "node \"b\" is not host:port"),
            ("redis+cluster://a:1/0", "no path"),
            ("redis+cluster://a:1/?db=1", "unknown parameter \"db\""),
            ("redis+cluster://a:1?tls=1", "unknown parameter \"tls\""),
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
    fn the_cluster_form_parses() {
        let url = match RedisUrl::parse("redis+cluster://:s%40cret@10.0.0.1:7000,[::1]:7001/") {
            Ok(RedisUrl::Cluster(url)) => url,
            other => panic!("not a cluster URL: {other:?}"),
        };
        assert_eq!(url.nodes, [("10.0.0.1".into(), 7000), ("::1".into(), 7001)]);
        assert_eq!(url.password.as_deref(), Some("s@cret"));
        assert_eq!(url.username, None);
        assert!(Redis::open("redis+cluster://a:7000").unwrap().is_cluster());
        assert!(!Redis::open("redis://a:7000").unwrap().is_cluster());
    }

    #[test]
    fn the_password_is_never_shown() {
        for raw in [
            "redis+sentinel://app:hunter2@127.0.0.1:26379/m",
            "redis://:hunter2@127.0.0.1:6379",
            "redis+cluster://app:hunter2@127.0.0.1:7000,127.0.0.1:7001",
        ] {
            let redis = Redis::open(raw).unwrap();
            let shown = format!("{redis:?}");
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains(":***@127.0.0.1:"), "{shown}");
            assert_eq!(redact(raw), shown);
        }
        // Nor the sentinels' own password.
        let raw = "redis+sentinel://:hunter2@127.0.0.1:26379/m?sentinel_password=hunter3";
        let shown = format!("{:?}", Redis::open(raw).unwrap());
        assert!(!shown.contains("hunter"), "{shown}");
        assert!(shown.ends_with("/m?db=0&sentinel_password=***"), "{shown}");
        assert_eq!(redact(raw), shown);
        // Nor in an error about the rest of the URL.
        let error = RedisUrl::parse("redis+sentinel://app:hunter2@127.0.0.1/m").unwrap_err();
        assert!(!error.to_string().contains("hunter2"), "{error}");
        // A password with a `/` is a password, not a host to quote; pieces of one cut by an
        // unencoded `?` or `&` are not quoted either.
        let url = RedisUrl::parse("redis+cluster://:hun/ter2@127.0.0.1:7000").unwrap();
        assert!(matches!(url, RedisUrl::Cluster(c) if c.password.as_deref() == Some("hun/ter2")));
        for raw in [
            "redis+cluster://:hun?ter2@node:6379",
            "redis+sentinel://:hun?ter2@127.0.0.1:26379/m",
            "redis+sentinel://127.0.0.1:26379/m?sentinel_password=hun&ter2",
            // A `?` typed for the `&` before it.
            "redis+sentinel://127.0.0.1:26379/m?db=0?sentinel_password=hunter3",
        ] {
            let error = RedisUrl::parse(raw).unwrap_err().to_string();
            assert!(
                !error.contains("ter2") && !error.contains("hun"),
                "{raw}: {error}"
            );
        }
    }
}
