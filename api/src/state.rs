use shared::redis_conn::{Redis, RedisConn};
use shared::{
    connections::{SessionLimits, Targets},
    dispatch::{Dispatcher, Refill},
    events::EventLog,
    objects::ObjectStore,
    queue::Queues,
    Settings,
};
use sqlx::PgPool;
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub pool: PgPool,
    /// Collection searches' sessions: each statement within `CONVEYOR_SEARCH_TIMEOUT_MS`.
    pub search_pool: PgPool,
    pub redis: RedisConn,
    /// For SSE: a blocking XREAD needs a connection of its own.
    pub redis_client: Redis,
    pub events: EventLog,
    pub queues: Queues,
    /// Announces kinds with newly queued jobs (submissions, retries) to the workers.
    pub refill: Refill,
    /// Tenants' limits and submission buckets.
    pub limits: Arc<crate::limits::Limits>,
    /// The job kinds' contracts: a payload is validated and preflighted at submit.
    pub contracts: contracts::Registry,
    /// What preflights reach: the control plane and the target databases, within bounds.
    pub context: Arc<contracts::Context>,
    pub objects: ObjectStore,
    /// The embedding model, for search queries; loaded on first use.
    pub embedder: Arc<embed::SharedEmbedder>,
    /// Queries embedded at once, one a core: each takes a core for its time, and more at once
    /// only queue inside the model's thread pool, with every tenant's uploads behind them on
    /// the blocking threads.
    pub embedding: Arc<tokio::sync::Semaphore>,
    /// Runs the parsers of uploaded files in limited child processes.
    pub isolated: shared::isolated::Isolated,
    pub counters: Arc<Counters>,
    pub key_cache: Arc<crate::auth::KeyCache>,
    /// Cancelled when the server stops: open SSE streams end, so their connections close
    /// instead of outliving the server.
    pub stopping: tokio_util::sync::CancellationToken,
    /// SSE fan-out: one Redis read per stream for all of this process' subscribers.
    pub hub: Arc<crate::hub::Hub>,
}

/// Process-local counters for `/metrics`.
#[derive(Default)]
pub struct Counters {
    pub submitted: AtomicU64,
    pub sse_open: AtomicU64,
    /// Event streams open per tenant, each at most `CONVEYOR_MAX_STREAMS_PER_TENANT`.
    pub sse_by_tenant: Arc<TenantSlots>,
    /// Uploads being received per tenant, each at most `MAX_UPLOADS_PER_TENANT`.
    pub uploads_by_tenant: Arc<TenantSlots>,
    /// Searches being answered per tenant, each at most `MAX_SEARCHES_PER_TENANT`.
    pub searches_by_tenant: Arc<TenantSlots>,
}

/// How many of something each tenant holds on this process (open streams, uploads in flight),
/// for a bound on them; each [`TenantSlot`] counts until dropped.
#[derive(Default)]
pub struct TenantSlots(std::sync::Mutex<std::collections::HashMap<uuid::Uuid, usize>>);

impl TenantSlots {
    /// One more for `tenant`, unless it holds `most` already.
    pub fn take(self: &Arc<Self>, tenant: uuid::Uuid, most: usize) -> Option<TenantSlot> {
        let mut held = self.0.lock().expect("tenant slots lock");
        let count = held.entry(tenant).or_default();
        if *count >= most {
            return None;
        }
        *count += 1;
        Some(TenantSlot {
            slots: self.clone(),
            tenant,
        })
    }
}

pub struct TenantSlot {
    slots: Arc<TenantSlots>,
    tenant: uuid::Uuid,
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        let mut held = self.slots.0.lock().expect("tenant slots lock");
        if let Some(count) = held.get_mut(&self.tenant) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.tenant);
            }
        }
    }
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl AppState {
    pub async fn connect(settings: Settings) -> anyhow::Result<Self> {
        let pool = shared::db::connect(&settings.database_url, 16).await?;
        shared::db::migrate(&pool).await?;
        let search_pool =
            shared::db::connect_bounded(&settings.database_url, 16, settings.search_timeout)
                .await?;
        let redis_client = Redis::open(&settings.redis_url)?;
        let redis = redis_client.manager().await?;
        let settings = Arc::new(settings);
        // Target databases are reached only to preflight: sessions bounded for that.
        let targets = Targets::new(pool.clone(), &settings, SessionLimits::preflight(&settings))?;
        shared::tenancy::check_default_target(&pool, &targets.default_platform()?).await?;
        let context = Arc::new(contracts::Context {
            pool: pool.clone(),
            targets,
            preflights: contracts::Preflights::new(
                settings.preflight_timeout,
                settings.preflight_concurrency,
            ),
            max_in_memory_bytes: settings.max_in_memory_bytes,
        });
        if let Some(url) = &settings.target_provision_url {
            let provisioned = shared::tenancy::provision_pending(&pool, url).await?;
            if provisioned > 0 {
                tracing::info!(provisioned, "tenants provisioned on the default target");
            }
        }
        let stopping = tokio_util::sync::CancellationToken::new();
        let hub = Arc::new(crate::hub::Hub::new(redis_client.clone(), stopping.clone()));
        let key_cache = Arc::<crate::auth::KeyCache>::default();
        tokio::spawn(crate::revocation::listen(
            redis_client.clone(),
            settings.redis_prefix.clone(),
            key_cache.clone(),
            hub.clone(),
            stopping.clone(),
        ));
        let queues = Queues::new(redis.clone(), &settings.redis_prefix);
        let refill = Refill::new(Dispatcher::new(queues.clone()));
        let limits = Arc::new(crate::limits::Limits::new(
            pool.clone(),
            redis.clone(),
            &settings,
        ));
        Ok(Self {
            hub,
            refill,
            limits,
            events: EventLog::new(
                redis.clone(),
                &settings.redis_prefix,
                settings.tenant_stream_maxlen,
                settings.events_ttl,
            ),
            queues,
            contracts: contracts::Registry::standard(),
            context,
            objects: ObjectStore::from_settings(&settings)?,
            embedder: Arc::new(embed::SharedEmbedder::new(&settings.model_dir)),
            embedding: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, usize::from),
            )),
            // Uploads' clients wait for an inspector: no longer than it may run.
            isolated: shared::isolated::Isolated::new(&settings)?.waiting_no_longer_than_a_run(),
            settings,
            pool,
            search_pool,
            redis,
            redis_client,
            counters: Arc::default(),
            key_cache,
            stopping,
        })
    }
}
