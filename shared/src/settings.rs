//! Configuration from `CONVEYOR_*` environment variables (12-factor).

use crate::{connections::AllowList, db::redact, objects::BucketConfig};
use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

/// Everything the binaries read from the environment. Tests build it directly.
#[derive(Clone)]
pub struct Settings {
    /// `CONVEYOR_DATABASE_URL`: the control-plane PostgreSQL.
    pub database_url: String,
    /// `CONVEYOR_REDIS_URL`.
    pub redis_url: String,
    /// `CONVEYOR_REDIS_PREFIX`: every Redis key starts with it, so deployments and tests can
    /// share one Redis.
    pub redis_prefix: String,
    /// `CONVEYOR_LISTEN`: the API's address.
    pub listen: SocketAddr,
    /// `CONVEYOR_DATA_DIR`: the local object store (datasets, artifacts); with a bucket, the
    /// scratch files and the workers' cache of datasets.
    pub data_dir: PathBuf,
    /// `CONVEYOR_OBJECT_STORE_URL` (`s3://bucket/prefix`): keep datasets and artifacts in an
    /// S3-compatible bucket instead, reached with the `AWS_*` variables (`AWS_ENDPOINT`,
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ALLOW_HTTP`, ...).
    pub object_store: Option<BucketConfig>,
    /// `CONVEYOR_BODY_LIMIT`: largest JSON request body in bytes.
    pub body_limit: usize,
    /// `CONVEYOR_BODY_IDLE_SECS`: how long a request body (an upload's included) may send
    /// nothing before the request is dropped with 408; a JSON body may take twice it in all.
    pub body_idle: Duration,
    /// `CONVEYOR_WRITE_STALL_SECS`: how long a write to a client may wait for it to read; past
    /// it the connection is cut (a client pipelining requests it never reads the answers of).
    pub write_stall: Duration,
    /// `CONVEYOR_PAGE_MAX_BYTES`: a list page ends early, with a cursor, once its rows pass
    /// this many bytes (it always holds one).
    pub page_max_bytes: usize,
    /// `CONVEYOR_HEARTBEAT_SECS`: how often a worker proves it is alive.
    pub heartbeat: Duration,
    /// `CONVEYOR_RESCUE_AFTER_SECS`: a running job whose worker has not heart-beaten for this
    /// long is re-queued.
    pub rescue_after: Duration,
    /// `CONVEYOR_EVENTS_TTL_SECS`: how long a finished job's event stream is kept in Redis.
    pub events_ttl: Duration,
    /// `CONVEYOR_TENANT_STREAM_MAXLEN`: approximate cap of each tenant's event stream.
    pub tenant_stream_maxlen: usize,
    /// `CONVEYOR_SHUTDOWN_GRACE_SECS`: how long SIGTERM waits for running jobs.
    pub shutdown_grace: Duration,
    /// `CONVEYOR_MAX_ATTEMPT_SECS`: how long one attempt of a job may run; past it the job is
    /// stopped and the attempt fails (retried as any failure is).
    pub max_attempt: Duration,
    /// `CONVEYOR_RETRY_BASE_MS`: the first retry's backoff; it doubles each attempt.
    pub retry_base: Duration,
    /// `CONVEYOR_TARGET_DATABASE_URL`: where imports and patches write when a job names no
    /// connection, logged in as the unprivileged `conveyor_platform` role. Never the
    /// control-plane database, never a superuser (checked at start).
    pub target_database_url: String,
    /// `CONVEYOR_TARGET_PROVISION_URL`: the default target as `conveyor_provisioner`, which
    /// only creates each tenant's role and schema there (`conveyor-api migrate`, key creation).
    pub target_provision_url: Option<String>,
    /// `CONVEYOR_TARGET_STATEMENT_TIMEOUT_SECS`, `CONVEYOR_TARGET_LOCK_TIMEOUT_SECS`,
    /// `CONVEYOR_TARGET_IDLE_IN_TRANSACTION_SECS`: bounds on every session a worker opens on a
    /// target database.
    pub target_statement_timeout: Duration,
    pub target_lock_timeout: Duration,
    pub target_idle_in_transaction: Duration,
    /// `CONVEYOR_TARGET_SWEEP_TIMEOUT_SECS`: the wall-clock bound of one target's maintenance
    /// sweep; a target that does not answer within it is skipped until the next sweep.
    pub target_sweep_timeout: Duration,
    /// `CONVEYOR_PREFLIGHT_TIMEOUT_MS`: the wall-clock bound of one preflight (catalog reads and
    /// `EXPLAIN` on a target), also each of its statements' `statement_timeout`.
    pub preflight_timeout: Duration,
    /// `CONVEYOR_PREFLIGHT_CONCURRENCY`: preflights one tenant may have in flight at once (in
    /// all of its requests together); a batch submit runs its own one at a time.
    pub preflight_concurrency: usize,
    /// `CONVEYOR_SEARCH_TIMEOUT_MS`: the `statement_timeout` of a collection search's statement
    /// (the API's search sessions), so a costly filter or a held lock ends in a 503.
    pub search_timeout: Duration,
    /// `CONVEYOR_SECRET_KEY`: 64 hex digits (32 bytes) that encrypt connection credentials at
    /// rest. Without it, connections cannot be registered.
    pub secret_key: Option<String>,
    /// `CONVEYOR_CONNECTION_ALLOW`: comma-separated hosts and networks (`db.internal`,
    /// `10.1.0.0/16`) that tenants' connections may reach although they are internal
    /// (loopback, private, link-local). Empty: public addresses only.
    pub connection_allow: AllowList,
    /// `CONVEYOR_WEBHOOK_ALLOW`: the same for webhook endpoints, a list of its own: a network
    /// allowed for tenants' databases is not one whose every service a tenant may POST to.
    /// Empty: public addresses only.
    pub webhook_allow: AllowList,
    /// `CONVEYOR_METRICS_TOKEN`: the bearer token `/metrics` asks for (its counts are
    /// platform-wide). Without it, `/metrics` is off.
    pub metrics_token: Option<String>,
    /// `CONVEYOR_DATASET_LIMIT`: largest upload in bytes.
    pub dataset_limit: u64,
    /// `CONVEYOR_CACHE_MAX_BYTES`: most bytes of bucket datasets a worker keeps downloaded; the
    /// least recently used that no running job holds go first.
    pub cache_max_bytes: u64,
    /// `CONVEYOR_OBJECT_DELETE_TIMEOUT_SECS`: how long deleting a job's artifacts may take
    /// (the job's row stays locked meanwhile); past it the deletion fails and is tried later.
    pub object_delete_timeout: Duration,
    /// `CONVEYOR_SNAPSHOT_RETENTION_HOURS`: how long a patch's before-images are kept for
    /// `patch_rollback`; the workers' maintenance sweep drops expired snapshots.
    pub snapshot_retention: Duration,
    /// `CONVEYOR_JOB_RETENTION_DAYS`: how long finished jobs (their rows, artifacts and event
    /// streams) are kept before the workers' maintenance deletes them; `0` (`None`) keeps them
    /// forever. A patch job is kept at least as long as its snapshot
    /// (`snapshot_retention`), which its rollback needs.
    pub job_retention: Option<Duration>,
    /// `CONVEYOR_WORKER_RETENTION_HOURS`: how long the row of a worker that stopped
    /// heart-beating is kept in `workers` (unless it still holds a running job); `0` (`None`)
    /// keeps them forever.
    pub worker_retention: Option<Duration>,
    /// `CONVEYOR_MODEL_DIR`: the embedding model's files (`scripts/model` installs them).
    pub model_dir: PathBuf,
    /// `CONVEYOR_WATCH_ROOT`: the directory the operator maps for watched sources; a tenant's
    /// ingests may follow directories under `<root>/<tenant id>/` only. Unset: none.
    pub watch_root: Option<PathBuf>,
    /// `CONVEYOR_MAX_DECOMPRESSED_BYTES`: most bytes an import reads from one dataset once
    /// decompressed (imports stream, so this bounds time and disk, not memory).
    pub max_decompressed_bytes: u64,
    /// `CONVEYOR_MAX_IN_MEMORY_BYTES`: most decompressed bytes of datasets that a job holding
    /// them in memory (ingest, synthesis) reads.
    pub max_in_memory_bytes: u64,
    /// `CONVEYOR_MAX_RECORD_BYTES`: largest CSV record or NDJSON line.
    pub max_record_bytes: u64,
    /// `CONVEYOR_MAX_DOCUMENT_BYTES`: largest document for ingest, and largest text extracted
    /// from one.
    pub max_document_bytes: u64,
    /// `CONVEYOR_MAX_WORKER_DEATHS`: a job whose workers died this many times while running it
    /// fails instead of going back to the queue.
    pub max_worker_deaths: i32,
    /// `CONVEYOR_EXTRACTOR`: the `conveyor-worker` binary that extracts documents' text in a
    /// child process (default: the running executable, which is it in a worker).
    pub extractor: Option<PathBuf>,
    /// `CONVEYOR_EXTRACT_TIMEOUT_SECS`: wall-clock (and CPU) bound of one extraction.
    pub extract_timeout: Duration,
    /// `CONVEYOR_EXTRACT_MEMORY_BYTES`: address space of the extraction process.
    pub extract_memory_bytes: u64,
    /// `CONVEYOR_IDLE_POLL_MS`: how often a worker claims from a queue it found empty. Jobs
    /// announced as queued (Redis Pub/Sub) wake it at once; this poll covers announcements lost.
    pub idle_poll: Duration,
    /// `CONVEYOR_MAX_RUNNING`: jobs of one kind a tenant may have running at once,
    /// unless its limits say otherwise; `0`: no cap.
    pub default_max_running: Option<i64>,
    /// `CONVEYOR_RATE_PER_SEC` and `CONVEYOR_RATE_BURST`: each tenant's submission rate (jobs
    /// per second) and burst, unless its limits say otherwise; rate `0`: no limit.
    pub default_rate: Option<RateLimit>,
    /// `CONVEYOR_SCHEDULE_MISFIRE_GRACE_SECS`: a schedule's firing later than this (the workers
    /// were down) is a misfire, handled by the schedule's `misfire` policy; a later firing
    /// within it still makes its job.
    pub schedule_misfire_grace: Duration,
    /// `CONVEYOR_WEBHOOK_TIMEOUT_SECS`: how long one webhook delivery attempt may take (connect,
    /// send, response headers).
    pub webhook_timeout: Duration,
    /// `CONVEYOR_WEBHOOK_LEASE_SECS`: how long a claimed delivery is left to its worker before
    /// another may try it (a worker killed mid-delivery); at least the timeout plus a second.
    pub webhook_lease: Duration,
    /// `CONVEYOR_WEBHOOK_RETRY_BASE_MS`: the first retry's backoff; it doubles each attempt (to
    /// at most an hour), with jitter.
    pub webhook_retry_base: Duration,
    /// `CONVEYOR_WEBHOOK_RETRY_HOURS`: how long a delivery is retried before it is `failed` and
    /// its endpoint marked failing.
    pub webhook_retry_window: Duration,
    /// `CONVEYOR_WEBHOOK_CONCURRENCY`: deliveries in flight at once (per leading worker).
    pub webhook_concurrency: usize,
    /// `CONVEYOR_MAX_STREAMS_PER_TENANT`: event streams (SSE) one tenant may hold open on one
    /// API process; past it a new one is a 429.
    pub max_streams_per_tenant: usize,
}

/// A token bucket: `per_sec` tokens a second, at most `burst` saved up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    pub per_sec: f64,
    pub burst: u32,
}

impl fmt::Debug for Settings {
    /// Without the secret key and the URLs' passwords.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured, so a new field is a compile error here until someone decides whether
        // it is secret.
        let Self {
            database_url,
            redis_url,
            redis_prefix,
            listen,
            data_dir,
            object_store,
            body_limit,
            body_idle,
            write_stall,
            page_max_bytes,
            heartbeat,
            rescue_after,
            events_ttl,
            tenant_stream_maxlen,
            shutdown_grace,
            max_attempt,
            retry_base,
            target_database_url,
            target_provision_url,
            target_statement_timeout,
            target_lock_timeout,
            target_idle_in_transaction,
            target_sweep_timeout,
            preflight_timeout,
            preflight_concurrency,
            search_timeout,
            secret_key,
            connection_allow,
            webhook_allow,
            metrics_token,
            dataset_limit,
            cache_max_bytes,
            object_delete_timeout,
            snapshot_retention,
            job_retention,
            worker_retention,
            model_dir,
            watch_root,
            max_decompressed_bytes,
            max_in_memory_bytes,
            max_record_bytes,
            max_document_bytes,
            max_worker_deaths,
            extractor,
            extract_timeout,
            extract_memory_bytes,
            idle_poll,
            default_max_running,
            default_rate,
            schedule_misfire_grace,
            webhook_timeout,
            webhook_lease,
            webhook_retry_base,
            webhook_retry_window,
            webhook_concurrency,
            max_streams_per_tenant,
        } = self;
        f.debug_struct("Settings")
            .field("database_url", &redact(database_url))
            .field("redis_url", &crate::redis_conn::redact(redis_url))
            .field("redis_prefix", redis_prefix)
            .field("listen", listen)
            .field("data_dir", data_dir)
            .field("object_store", object_store)
            .field("body_limit", body_limit)
            .field("body_idle", body_idle)
            .field("write_stall", write_stall)
            .field("page_max_bytes", page_max_bytes)
            .field("heartbeat", heartbeat)
            .field("rescue_after", rescue_after)
            .field("events_ttl", events_ttl)
            .field("tenant_stream_maxlen", tenant_stream_maxlen)
            .field("shutdown_grace", shutdown_grace)
            .field("max_attempt", max_attempt)
            .field("retry_base", retry_base)
            .field("target_database_url", &redact(target_database_url))
            .field(
                "target_provision_url",
                &target_provision_url.as_deref().map(redact),
            )
            .field("target_statement_timeout", target_statement_timeout)
            .field("target_lock_timeout", target_lock_timeout)
            .field("target_idle_in_transaction", target_idle_in_transaction)
            .field("target_sweep_timeout", target_sweep_timeout)
            .field("preflight_timeout", preflight_timeout)
            .field("preflight_concurrency", preflight_concurrency)
            .field("search_timeout", search_timeout)
            .field("secret_key", &secret_key.as_ref().map(|_| "***"))
            .field("connection_allow", connection_allow)
            .field("webhook_allow", webhook_allow)
            .field("metrics_token", &metrics_token.as_ref().map(|_| "***"))
            .field("dataset_limit", dataset_limit)
            .field("cache_max_bytes", cache_max_bytes)
            .field("object_delete_timeout", object_delete_timeout)
            .field("snapshot_retention", snapshot_retention)
            .field("job_retention", job_retention)
            .field("worker_retention", worker_retention)
            .field("model_dir", model_dir)
            .field("watch_root", watch_root)
            .field("max_decompressed_bytes", max_decompressed_bytes)
            .field("max_in_memory_bytes", max_in_memory_bytes)
            .field("max_record_bytes", max_record_bytes)
            .field("max_document_bytes", max_document_bytes)
            .field("max_worker_deaths", max_worker_deaths)
            .field("extractor", extractor)
            .field("extract_timeout", extract_timeout)
            .field("extract_memory_bytes", extract_memory_bytes)
            .field("idle_poll", idle_poll)
            .field("default_max_running", default_max_running)
            .field("default_rate", default_rate)
            .field("schedule_misfire_grace", schedule_misfire_grace)
            .field("webhook_timeout", webhook_timeout)
            .field("webhook_lease", webhook_lease)
            .field("webhook_retry_base", webhook_retry_base)
            .field("webhook_retry_window", webhook_retry_window)
            .field("webhook_concurrency", webhook_concurrency)
            .field("max_streams_per_tenant", max_streams_per_tenant)
            .finish()
    }
}

impl Settings {
    pub fn from_env() -> anyhow::Result<Self> {
        // A variable that is not Unicode counts as unset, as `std::env::var` has it.
        Self::from_vars(&Vars::new(std::env::vars_os().filter_map(
            |(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)),
        )))
    }

    /// The settings from `vars` (the environment, or a deployment file's variables in the
    /// tests that check it).
    pub fn from_vars(vars: &Vars) -> anyhow::Result<Self> {
        let settings = Self::read_vars(vars)?;
        // A live worker's jobs were rescued between its beats (run twice, then failed as a
        // poison job's), and a zero period panicked the heartbeat task while the worker went
        // on claiming.
        let (heartbeat, rescue_after) = (settings.heartbeat, settings.rescue_after);
        if heartbeat.is_zero() || rescue_after < heartbeat * 2 {
            anyhow::bail!(
                "CONVEYOR_HEARTBEAT_SECS ({}) must be at least 1 and CONVEYOR_RESCUE_AFTER_SECS \
                 ({}) at least twice it: a worker silent for RESCUE_AFTER_SECS loses its jobs",
                heartbeat.as_secs(),
                rescue_after.as_secs()
            );
        }
        Ok(settings)
    }

    fn read_vars(vars: &Vars) -> anyhow::Result<Self> {
        Ok(Self {
            database_url: vars.var(
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/conveyor",
            ),
            redis_url: {
                let url = vars.var("REDIS_URL", "redis://127.0.0.1:6379");
                // Refused at start, with the reason and never the URL (it may hold a password).
                crate::redis_conn::RedisUrl::parse(&url)?;
                url
            },
            redis_prefix: {
                let prefix = vars.var("REDIS_PREFIX", "conveyor");
                // Keys carry hash tags of their own after the prefix (`PREFIX:{tenant}:events`):
                // a brace in the prefix would become the tag, one slot for everything.
                if prefix.contains(['{', '}']) {
                    anyhow::bail!("CONVEYOR_REDIS_PREFIX must not contain braces ({{ or }})");
                }
                prefix
            },
            listen: vars.parse("LISTEN", "127.0.0.1:8080")?,
            data_dir: vars.var("DATA_DIR", ".data/objects").into(),
            object_store: {
                let options = vars
                    .prefixed("AWS_")
                    .into_iter()
                    .map(|(key, value)| (key.to_ascii_lowercase(), value))
                    .collect();
                vars.get("OBJECT_STORE_URL")
                    .map(|url| BucketConfig { url, options })
            },
            body_limit: vars.parse("BODY_LIMIT", "1048576")?,
            // 0 would answer every request with a body 408.
            body_idle: Duration::from_secs(
                vars.parse::<std::num::NonZeroU64>("BODY_IDLE_SECS", "60")?
                    .get(),
            ),
            // The socket reads writable again only once a share of its buffer (up to MBs) has
            // drained: a bound a slow but reading client (a few KB/s) passes.
            write_stall: Duration::from_secs(
                vars.parse::<std::num::NonZeroU64>("WRITE_STALL_SECS", "120")?
                    .get(),
            ),
            page_max_bytes: vars.parse("PAGE_MAX_BYTES", "8388608")?,
            heartbeat: Duration::from_secs(vars.parse("HEARTBEAT_SECS", "2")?),
            rescue_after: Duration::from_secs(vars.parse("RESCUE_AFTER_SECS", "10")?),
            events_ttl: Duration::from_secs(vars.parse("EVENTS_TTL_SECS", "86400")?),
            tenant_stream_maxlen: vars.parse("TENANT_STREAM_MAXLEN", "100000")?,
            shutdown_grace: Duration::from_secs(vars.parse("SHUTDOWN_GRACE_SECS", "30")?),
            max_attempt: Duration::from_secs(vars.parse("MAX_ATTEMPT_SECS", "43200")?),
            retry_base: Duration::from_millis(vars.parse("RETRY_BASE_MS", "1000")?),
            target_database_url: vars.var(
                "TARGET_DATABASE_URL",
                "postgres://conveyor_platform@127.0.0.1:5432/conveyor_target",
            ),
            target_provision_url: vars.get("TARGET_PROVISION_URL"),
            target_statement_timeout: Duration::from_secs(
                vars.parse("TARGET_STATEMENT_TIMEOUT_SECS", "3600")?,
            ),
            target_lock_timeout: Duration::from_secs(vars.parse("TARGET_LOCK_TIMEOUT_SECS", "30")?),
            target_idle_in_transaction: Duration::from_secs(
                vars.parse("TARGET_IDLE_IN_TRANSACTION_SECS", "60")?,
            ),
            target_sweep_timeout: Duration::from_secs(
                vars.parse("TARGET_SWEEP_TIMEOUT_SECS", "120")?,
            ),
            preflight_timeout: Duration::from_millis(vars.parse("PREFLIGHT_TIMEOUT_MS", "5000")?),
            preflight_concurrency: vars.parse("PREFLIGHT_CONCURRENCY", "4")?,
            search_timeout: Duration::from_millis(vars.parse("SEARCH_TIMEOUT_MS", "10000")?),
            secret_key: vars.get("SECRET_KEY"),
            connection_allow: vars
                .var("CONNECTION_ALLOW", "")
                .parse()
                .map_err(|e| anyhow::anyhow!("CONVEYOR_CONNECTION_ALLOW is invalid: {e}"))?,
            webhook_allow: vars
                .var("WEBHOOK_ALLOW", "")
                .parse()
                .map_err(|e| anyhow::anyhow!("CONVEYOR_WEBHOOK_ALLOW is invalid: {e}"))?,
            metrics_token: vars.get("METRICS_TOKEN").filter(|t| !t.is_empty()),
            dataset_limit: vars.parse("DATASET_LIMIT", "10737418240")?,
            cache_max_bytes: vars.parse("CACHE_MAX_BYTES", "21474836480")?,
            object_delete_timeout: Duration::from_secs(
                vars.parse::<u64>("OBJECT_DELETE_TIMEOUT_SECS", "30")?
                    .max(1),
            ),
            snapshot_retention: Duration::from_secs(
                vars.parse::<u64>("SNAPSHOT_RETENTION_HOURS", "168")? * 3600,
            ),
            job_retention: retention(vars.parse("JOB_RETENTION_DAYS", "30")?, 86400),
            worker_retention: retention(vars.parse("WORKER_RETENTION_HOURS", "24")?, 3600),
            model_dir: vars
                .var("MODEL_DIR", ".data/models/all-MiniLM-L6-v2")
                .into(),
            watch_root: vars.get("WATCH_ROOT").map(PathBuf::from),
            max_decompressed_bytes: vars.parse("MAX_DECOMPRESSED_BYTES", "17179869184")?,
            max_in_memory_bytes: vars.parse("MAX_IN_MEMORY_BYTES", "1073741824")?,
            max_record_bytes: vars.parse("MAX_RECORD_BYTES", "16777216")?,
            max_document_bytes: vars.parse("MAX_DOCUMENT_BYTES", "67108864")?,
            max_worker_deaths: vars.parse("MAX_WORKER_DEATHS", "3")?,
            extractor: vars.get("EXTRACTOR").map(PathBuf::from),
            extract_timeout: Duration::from_secs(vars.parse("EXTRACT_TIMEOUT_SECS", "60")?),
            extract_memory_bytes: vars.parse("EXTRACT_MEMORY_BYTES", "1073741824")?,
            idle_poll: Duration::from_millis(vars.parse("IDLE_POLL_MS", "100")?),
            default_max_running: Some(vars.parse::<i64>("MAX_RUNNING", "0")?).filter(|&n| n > 0),
            default_rate: {
                let per_sec: f64 = vars.parse("RATE_PER_SEC", "0")?;
                let burst: u32 = vars.parse("RATE_BURST", "0")?;
                (per_sec > 0.0).then(|| RateLimit {
                    per_sec,
                    burst: if burst > 0 {
                        burst
                    } else {
                        per_sec.ceil() as u32
                    },
                })
            },
            schedule_misfire_grace: Duration::from_secs(
                vars.parse("SCHEDULE_MISFIRE_GRACE_SECS", "10")?,
            ),
            webhook_timeout: Duration::from_secs(vars.parse("WEBHOOK_TIMEOUT_SECS", "10")?),
            webhook_lease: Duration::from_secs(vars.parse("WEBHOOK_LEASE_SECS", "60")?),
            webhook_retry_base: Duration::from_millis(
                vars.parse("WEBHOOK_RETRY_BASE_MS", "10000")?,
            ),
            webhook_retry_window: Duration::from_secs(
                vars.parse::<u64>("WEBHOOK_RETRY_HOURS", "24")? * 3600,
            ),
            webhook_concurrency: vars.parse::<usize>("WEBHOOK_CONCURRENCY", "16")?.max(1),
            max_streams_per_tenant: vars
                .parse::<usize>("MAX_STREAMS_PER_TENANT", "1000")?
                .max(1),
        })
    }

    /// Every variable the settings read: `CONVEYOR_*` names, and `AWS_*` for the object store.
    pub fn variables() -> BTreeSet<String> {
        let vars = Vars::new([]);
        Self::from_vars(&vars).expect("the defaults are valid settings");
        vars.read()
    }

    /// Defaults for one test: its own database and Redis prefix, fast heartbeats.
    pub fn for_test(database_url: String, redis_prefix: String) -> Self {
        let target = url::Url::parse(&format!("{database_url}_target")).expect("database URL");
        let as_role = |role: &str| {
            let mut url = target.clone();
            url.set_username(role).expect("URL with a host");
            url.to_string()
        };
        Self {
            target_database_url: as_role("conveyor_platform"),
            target_provision_url: Some(as_role("conveyor_provisioner")),
            target_statement_timeout: Duration::from_secs(600),
            target_lock_timeout: Duration::from_secs(10),
            target_idle_in_transaction: Duration::from_secs(60),
            target_sweep_timeout: Duration::from_secs(120),
            preflight_timeout: Duration::from_secs(5),
            preflight_concurrency: 4,
            search_timeout: Duration::from_secs(10),
            data_dir: std::env::temp_dir()
                .join(format!("conveyor-test-{}", redis_prefix.replace(':', "-"))),
            object_store: None,
            secret_key: Some(
                "7e57c0de7e57c0de7e57c0de7e57c0de7e57c0de7e57c0de7e57c0de7e57c0de".into(),
            ),
            // The tests' databases are all on loopback.
            connection_allow: "127.0.0.0/8, ::1".parse().expect("literal allow list"),
            webhook_allow: "127.0.0.0/8, ::1".parse().expect("literal allow list"),
            metrics_token: Some("test-metrics-token".into()),
            dataset_limit: 4 << 30,
            cache_max_bytes: 20 << 30,
            object_delete_timeout: Duration::from_secs(30),
            snapshot_retention: Duration::from_secs(168 * 3600),
            job_retention: Some(Duration::from_secs(30 * 86400)),
            worker_retention: Some(Duration::from_secs(24 * 3600)),
            // Where `scripts/model` installs it in this checkout, whatever the test's directory.
            model_dir: std::env::var("CONVEYOR_MODEL_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|_| {
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.data/models/all-MiniLM-L6-v2")
                }),
            watch_root: None,
            database_url,
            redis_url: std::env::var("CONVEYOR_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
            redis_prefix,
            listen: "127.0.0.1:0".parse().expect("literal address"),
            body_limit: 64 * 1024,
            body_idle: Duration::from_secs(60),
            write_stall: Duration::from_secs(120),
            page_max_bytes: 8 << 20,
            heartbeat: Duration::from_millis(500),
            rescue_after: Duration::from_secs(3),
            events_ttl: Duration::from_secs(3600),
            tenant_stream_maxlen: 10_000,
            shutdown_grace: Duration::from_secs(10),
            max_attempt: Duration::from_secs(3600),
            retry_base: Duration::from_millis(200),
            max_decompressed_bytes: 4 << 30,
            max_in_memory_bytes: 64 << 20,
            max_record_bytes: 1 << 20,
            max_document_bytes: 4 << 20,
            max_worker_deaths: 3,
            // The test binary is no worker: the harness names the built `conveyor-worker`.
            extractor: None,
            extract_timeout: Duration::from_secs(20),
            extract_memory_bytes: 1 << 30,
            idle_poll: Duration::from_millis(100),
            default_max_running: None,
            default_rate: None,
            schedule_misfire_grace: Duration::from_secs(10),
            webhook_timeout: Duration::from_secs(5),
            webhook_lease: Duration::from_secs(6),
            webhook_retry_base: Duration::from_millis(200),
            webhook_retry_window: Duration::from_secs(24 * 3600),
            webhook_concurrency: 8,
            max_streams_per_tenant: 1000,
        }
    }
}

/// `count` units of `unit` seconds; `0` means forever (`None`).
fn retention(count: u64, unit: u64) -> Option<Duration> {
    (count > 0).then(|| Duration::from_secs(count.saturating_mul(unit)))
}

/// The variables the settings are read from, and a record of each name read, so that the
/// names a deployment file sets can be checked against the ones the binaries read.
pub struct Vars {
    values: BTreeMap<String, String>,
    read: RefCell<BTreeSet<String>>,
}

impl Vars {
    pub fn new(values: impl IntoIterator<Item = (String, String)>) -> Self {
        Self {
            values: values.into_iter().collect(),
            read: RefCell::default(),
        }
    }

    /// Every name read so far (`AWS_*` for a prefix).
    pub fn read(&self) -> BTreeSet<String> {
        self.read.borrow().clone()
    }

    /// `CONVEYOR_{name}`.
    fn get(&self, name: &str) -> Option<String> {
        let name = format!("CONVEYOR_{name}");
        let value = self.values.get(&name).cloned();
        self.read.borrow_mut().insert(name);
        value
    }

    fn var(&self, name: &str, default: &str) -> String {
        self.get(name).unwrap_or_else(|| default.to_owned())
    }

    fn parse<T>(&self, name: &str, default: &str) -> anyhow::Result<T>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
    {
        let raw = self.var(name, default);
        raw.parse()
            .map_err(|e| anyhow::anyhow!("CONVEYOR_{name}={raw:?} is invalid: {e}"))
    }

    /// Every variable whose name starts with `prefix`.
    fn prefixed(&self, prefix: &str) -> Vec<(String, String)> {
        self.read.borrow_mut().insert(format!("{prefix}*"));
        self.values
            .iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::Settings;

    #[test]
    fn debug_shows_no_secret() {
        let mut settings = Settings::for_test(
            "postgres://conveyor:db-secret@127.0.0.1/conveyor".into(),
            "test".into(),
        );
        settings.redis_url =
            "redis+sentinel://:redis-secret@127.0.0.1:26379/jobs?sentinel_password=sentinel-secret"
                .into();
        settings.target_database_url = "postgres://t@db/x?password=target-secret".into();
        let shown = format!("{settings:?}");
        let key = settings.secret_key.clone().unwrap();
        let token = settings.metrics_token.clone().unwrap();
        for secret in [
            "db-secret",
            "redis-secret",
            "sentinel-secret",
            "target-secret",
            &key,
            &token,
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("postgres://conveyor:***@127.0.0.1/conveyor"));
    }

    /// What the deployment files are checked against: the names read, the values parsed.
    #[test]
    fn from_vars_reads_the_given_variables_and_names_each_one_read() {
        let names = Settings::variables();
        for name in [
            "CONVEYOR_DATABASE_URL",
            "CONVEYOR_SHUTDOWN_GRACE_SECS",
            "AWS_*",
        ] {
            assert!(names.contains(name), "{name} not in {names:?}");
        }
        assert!(
            !names.contains("CONVEYOR_QUEUES"),
            "a flag's, not a setting"
        );

        let vars = |pairs: &[(&str, &str)]| {
            super::Vars::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        };
        let settings = Settings::from_vars(&vars(&[
            ("CONVEYOR_SHUTDOWN_GRACE_SECS", "7"),
            ("CONVEYOR_OBJECT_STORE_URL", "s3://bucket/prefix"),
            ("AWS_REGION", "eu-west-1"),
        ]))
        .unwrap();
        assert_eq!(settings.shutdown_grace, std::time::Duration::from_secs(7));
        let bucket = settings.object_store.unwrap();
        assert_eq!(
            bucket.options,
            [("aws_region".to_owned(), "eu-west-1".to_owned())]
        );

        let refused = Settings::from_vars(&vars(&[("CONVEYOR_SHUTDOWN_GRACE_SECS", "soon")]));
        let error = refused.expect_err("an invalid value").to_string();
        assert!(error.contains("CONVEYOR_SHUTDOWN_GRACE_SECS"), "{error}");
        let refused = Settings::from_vars(&vars(&[("CONVEYOR_BODY_IDLE_SECS", "0")]));
        let error = refused.expect_err("no time for a body").to_string();
        assert!(error.contains("CONVEYOR_BODY_IDLE_SECS"), "{error}");
        // A brace would make the prefix every key's hash tag: one cluster slot for all.
        let refused = Settings::from_vars(&vars(&[("CONVEYOR_REDIS_PREFIX", "app{x}")]));
        let error = refused.expect_err("a prefix with braces").to_string();
        assert!(error.contains("CONVEYOR_REDIS_PREFIX"), "{error}");
        // Beats that a rescue could fall between, or none at all.
        for beats in [
            &[("CONVEYOR_HEARTBEAT_SECS", "0")][..],
            &[("CONVEYOR_HEARTBEAT_SECS", "10")],
            &[
                ("CONVEYOR_HEARTBEAT_SECS", "2"),
                ("CONVEYOR_RESCUE_AFTER_SECS", "3"),
            ],
        ] {
            let error = Settings::from_vars(&vars(beats))
                .expect_err("refused")
                .to_string();
            assert!(error.contains("CONVEYOR_RESCUE_AFTER_SECS"), "{error}");
        }
        let harness = [
            ("CONVEYOR_HEARTBEAT_SECS", "1"),
            ("CONVEYOR_RESCUE_AFTER_SECS", "3"),
        ];
        assert!(Settings::from_vars(&vars(&harness)).is_ok());
    }
}
