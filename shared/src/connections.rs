//! Target databases that imports and patches write to. A tenant registers a connection URL; it
//! is checked (see [`target`]), stored encrypted (AES-256-GCM under `CONVEYOR_SECRET_KEY`,
//! bound to its tenant and id) and never returned. Jobs that name no connection use
//! `CONVEYOR_TARGET_DATABASE_URL`.

pub mod address;
pub mod target;

pub use address::AllowList;
pub use target::{Guard, Refusal, TargetUrl};

use aes_gcm::{
    aead::{Aead, Payload},
    Aes256Gcm, KeyInit,
};
use chrono::{DateTime, Utc};
use hashlink::LruCache;
use serde::Serialize;
use sqlx::{postgres::PgConnectOptions, PgPool};
use std::{
    collections::{HashMap, HashSet},
    str::FromStr,
    sync::{Arc, Mutex},
    time::Duration,
};
use utoipa::ToSchema;
use uuid::Uuid;

const NONCE_LEN: usize = 12;

/// The first byte of every sealed value: the format (and key) it was sealed with. Version 1:
/// nonce, then ciphertext, with the tenant and connection ids as associated data.
const SEALED_V1: u8 = 1;

/// Encrypts and decrypts connection URLs.
#[derive(Clone)]
pub struct Cipher(Aes256Gcm);

/// The key the example environment files carry, for the deployment files' checks: anyone can
/// read it, so a process refuses to start with it (a backup would open to anyone).
pub const EXAMPLE_SECRET_KEY: &str =
    "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

impl Cipher {
    /// From 64 hex digits, not the examples' key.
    pub fn from_hex(key: &str) -> anyhow::Result<Self> {
        if key.trim().eq_ignore_ascii_case(EXAMPLE_SECRET_KEY) {
            anyhow::bail!(
                "CONVEYOR_SECRET_KEY is the example files' key, which anyone can read: make one \
                 with `openssl rand -hex 32`"
            );
        }
        let bytes = hex::decode(key.trim())
            .map_err(|_| anyhow::anyhow!("CONVEYOR_SECRET_KEY must be 64 hex digits"))?;
        let cipher = Aes256Gcm::new_from_slice(&bytes)
            .map_err(|_| anyhow::anyhow!("CONVEYOR_SECRET_KEY must be 32 bytes (64 hex digits)"))?;
        Ok(Self(cipher))
    }

    /// Seals `plain` for one tenant's connection: copied into another row, it does not open.
    pub fn encrypt(&self, plain: &str, tenant: Uuid, connection: Uuid) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let aad = associated_data(tenant, connection);
        let mut sealed = vec![SEALED_V1];
        sealed.extend(nonce);
        sealed.extend(
            self.0
                .encrypt(
                    &nonce.into(),
                    Payload {
                        msg: plain.as_bytes(),
                        aad: &aad,
                    },
                )
                .expect("AES-GCM encryption cannot fail for in-memory input"),
        );
        sealed
    }

    pub fn decrypt(&self, sealed: &[u8], tenant: Uuid, connection: Uuid) -> anyhow::Result<String> {
        let Some((&SEALED_V1, rest)) = sealed.split_first() else {
            // Rows sealed before version 1 carried no tenant binding: they stay closed.
            anyhow::bail!("sealed in an old format: register the connection again");
        };
        anyhow::ensure!(rest.len() > NONCE_LEN, "sealed value too short");
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("split at NONCE_LEN");
        let aad = associated_data(tenant, connection);
        let plain = self
            .0
            .decrypt(
                &nonce.into(),
                Payload {
                    msg: body,
                    aad: &aad,
                },
            )
            .map_err(|_| {
                anyhow::anyhow!("cannot decrypt: wrong CONVEYOR_SECRET_KEY, or another row's value")
            })?;
        Ok(String::from_utf8(plain)?)
    }
}

fn associated_data(tenant: Uuid, connection: Uuid) -> Vec<u8> {
    [tenant.as_bytes().as_slice(), connection.as_bytes()].concat()
}

#[derive(Clone, Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct Connection {
    pub id: Uuid,
    pub name: String,
    /// `host:port/database`: the credentials are never shown.
    pub display: String,
    pub created_at: DateTime<Utc>,
}

/// Most connections a tenant may hold.
pub const MAX_PER_TENANT: i64 = 20;

pub async fn create(
    pool: impl sqlx::PgExecutor<'_>,
    cipher: &Cipher,
    tenant: Uuid,
    name: &str,
    url: &str,
    display: &str,
) -> sqlx::Result<Option<Connection>> {
    let id = Uuid::now_v7();
    sqlx::query_as(
        "INSERT INTO connections (id, tenant_id, name, url_encrypted, display)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (tenant_id, name) DO NOTHING
         RETURNING id, name, display, created_at",
    )
    .bind(id)
    .bind(tenant)
    .bind(name)
    .bind(cipher.encrypt(url, tenant, id))
    .bind(display)
    .fetch_optional(pool)
    .await
}

pub async fn list(pool: &PgPool, tenant: Uuid) -> sqlx::Result<Vec<Connection>> {
    sqlx::query_as(
        "SELECT id, name, display, created_at FROM connections WHERE tenant_id = $1 ORDER BY name",
    )
    .bind(tenant)
    .fetch_all(pool)
    .await
}

pub async fn delete(pool: impl sqlx::PgExecutor<'_>, tenant: Uuid, id: Uuid) -> sqlx::Result<bool> {
    crate::owned::Owned::new("connections", "id")
        .delete(pool, tenant, id)
        .await
}

/// Resolves target databases to pools: one per role on the default target, for the life of
/// the process, and one per tenant's connection and checked address, of the
/// [`CONNECTION_POOLS`] most recently used connections.
pub struct Targets {
    control: PgPool,
    default_url: String,
    cipher: Option<Cipher>,
    guard: Arc<Guard>,
    limits: SessionLimits,
    pools: Mutex<HashMap<String, PgPool>>,
    connections: Mutex<LruCache<Uuid, (String, PgPool)>>,
}

/// How many tenants' connections keep their pools. Kept for good, a pool per URL and address
/// grew without bound: a connection deleted and made again, or a host resolving to a new
/// address at each use, left one more (with its password and a timer task) at each turn. A
/// pool dropped from here lives on while a job still holds it.
pub const CONNECTION_POOLS: usize = 1024;

/// Bounds every session on a target: long enough for a job's COPY, short for a preflight.
#[derive(Clone, Copy, Debug)]
pub struct SessionLimits {
    pub statement_timeout: Duration,
    pub lock_timeout: Duration,
    pub idle_in_transaction: Duration,
}

impl SessionLimits {
    /// For jobs, from the settings.
    pub fn jobs(settings: &crate::Settings) -> Self {
        Self {
            statement_timeout: settings.target_statement_timeout,
            lock_timeout: settings.target_lock_timeout,
            idle_in_transaction: settings.target_idle_in_transaction,
        }
    }

    /// For preflights: every statement within the preflight's bound.
    pub fn preflight(settings: &crate::Settings) -> Self {
        Self {
            statement_timeout: settings.preflight_timeout,
            lock_timeout: settings.preflight_timeout.min(Duration::from_secs(1)),
            idle_in_transaction: settings.preflight_timeout,
        }
    }

    /// The session settings that carry the bounds (and UTC, so that timestamps without a zone
    /// are read the same on every server).
    fn apply(&self, options: PgConnectOptions) -> PgConnectOptions {
        let millis = |d: Duration| format!("{}ms", d.as_millis());
        options.options([
            ("TimeZone", "UTC".to_owned()),
            ("statement_timeout", millis(self.statement_timeout)),
            ("lock_timeout", millis(self.lock_timeout)),
            (
                "idle_in_transaction_session_timeout",
                millis(self.idle_in_transaction),
            ),
        ])
    }
}

/// A target database as one tenant's job reaches it.
#[derive(Clone, Debug)]
pub struct Target {
    /// Runs what the tenant asked for. On the default target its sessions are the tenant's
    /// role with the tenant's schema as the only search path.
    pub pool: PgPool,
    /// The platform's bookkeeping on the same database (import ledger, patch snapshots and
    /// checkpoints), as the platform's role; the same pool on a registered connection.
    pub platform: PgPool,
    /// On the default target, the tenant's schema, the only one its jobs may name there.
    pub tenant_schema: Option<String>,
    /// On the default target, the tenant's role, which `pool`'s sessions run as.
    pub tenant_role: Option<String>,
}

impl Target {
    /// The schema a job writes to when it names none.
    pub fn default_schema(&self) -> &str {
        self.tenant_schema.as_deref().unwrap_or("public")
    }

    /// Why a job may not name `schema` on this target, if it may not.
    pub fn refuse_schema(&self, schema: &str) -> Option<String> {
        if crate::tenancy::is_reserved_schema(schema) {
            return Some(format!(
                "{schema} is reserved for the platform and the system"
            ));
        }
        match &self.tenant_schema {
            Some(own) if own != schema => Some(format!(
                "on the default target database a tenant writes only to its own schema {own}"
            )),
            _ => None,
        }
    }
}

/// Why a target could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("connection {0} not found")]
    UnknownConnection(Uuid),
    /// The connection's URL, or the address its host resolves to now, is refused; the reason
    /// is for the client.
    #[error("connection {0} is refused: {1}")]
    RefusedConnection(Uuid, String),
    /// The connection's host could not be resolved or reached (the detail is in the log).
    #[error("connection {0} could not be reached")]
    UnreachableConnection(Uuid),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl Targets {
    pub fn new(
        control: PgPool,
        settings: &crate::Settings,
        limits: SessionLimits,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            guard: Arc::new(Guard::new(control.clone(), settings)?),
            control,
            default_url: settings.target_database_url.clone(),
            cipher: settings
                .secret_key
                .as_deref()
                .map(Cipher::from_hex)
                .transpose()?,
            limits,
            pools: Mutex::default(),
            connections: Mutex::new(LruCache::new(CONNECTION_POOLS)),
        })
    }

    pub fn cipher(&self) -> Option<&Cipher> {
        self.cipher.as_ref()
    }

    /// The checks of a new connection URL (the API's, before it stores one).
    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// The default target as the platform sees it.
    pub fn default_platform(&self) -> anyhow::Result<PgPool> {
        self.default_pool(None)
    }

    /// The URL of the tenant's connection.
    async fn connection_url(&self, tenant: Uuid, id: Uuid) -> Result<String, TargetError> {
        let sealed: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT url_encrypted FROM connections WHERE tenant_id = $1 AND id = $2",
        )
        .bind(tenant)
        .bind(id)
        .fetch_optional(&self.control)
        .await
        .map_err(anyhow::Error::from)?;
        let sealed = sealed.ok_or(TargetError::UnknownConnection(id))?;
        let cipher = self
            .cipher
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("CONVEYOR_SECRET_KEY is not set"))?;
        cipher.decrypt(&sealed, tenant, id).map_err(|e| {
            tracing::error!(connection = %id, error = %e, "connection credentials do not open");
            TargetError::Other(anyhow::anyhow!("connection {id} cannot be read: {e}"))
        })
    }

    /// Platform pools on every target database: the default one and each registered
    /// connection, once each. For maintenance sweeps; a connection that cannot be read or is
    /// refused is skipped.
    pub async fn all(&self) -> anyhow::Result<Vec<PgPool>> {
        let registered: Vec<(Uuid, Uuid)> =
            sqlx::query_as("SELECT tenant_id, id FROM connections ORDER BY created_at")
                .fetch_all(&self.control)
                .await?;
        let mut keys = HashSet::new();
        let mut pools = vec![self.default_pool(None)?];
        // Eight lookups at a time: in turn, a tenant whose DNS stops answering held every
        // other target's sweep for its lookups' timeouts.
        use futures::StreamExt;
        let mut looked_up = futures::stream::iter(registered)
            .map(|(tenant, id)| async move { (id, self.connection_pool(tenant, id).await) })
            .buffered(8);
        while let Some((id, looked_up)) = looked_up.next().await {
            match looked_up {
                Ok((key, pool)) => {
                    if keys.insert(key) {
                        pools.push(pool);
                    }
                }
                Err(e) => tracing::warn!(connection = %id, error = %e, "connection skipped"),
            }
        }
        Ok(pools)
    }

    /// The tenant's connection, or the default target as the tenant's role.
    pub async fn target(
        &self,
        tenant: Uuid,
        connection: Option<Uuid>,
    ) -> Result<Target, TargetError> {
        Ok(match connection {
            Some(id) => {
                let pool = self.connection_pool(tenant, id).await?.1;
                Target {
                    pool: pool.clone(),
                    platform: pool,
                    tenant_schema: None,
                    tenant_role: None,
                }
            }
            None => Target {
                pool: self.default_pool(Some(tenant))?,
                platform: self.default_pool(None)?,
                tenant_schema: Some(crate::tenancy::schema(tenant)),
                tenant_role: Some(crate::tenancy::role(tenant)),
            },
        })
    }

    /// The default target as the platform, or with a tenant, as the tenant's role in its schema.
    fn default_pool(&self, tenant: Option<Uuid>) -> anyhow::Result<PgPool> {
        let key = match tenant {
            Some(tenant) => format!("{}#{tenant}", self.default_url),
            None => self.default_url.clone(),
        };
        self.pool_for(key, || {
            // The operator's URL, read as sqlx reads it (environment and passfile included).
            let options = PgConnectOptions::from_str(&self.default_url)
                .map_err(|e| anyhow::anyhow!("bad CONVEYOR_TARGET_DATABASE_URL: {e}"))?;
            let options = self.limits.apply(options);
            Ok(match tenant {
                // Session defaults, so that a RESET returns to them; `SET LOCAL ROLE NONE` is
                // how platform code steps out for its bookkeeping within a transaction.
                Some(tenant) => pool_options(4).connect_lazy_with(options.options([
                    ("role", crate::tenancy::role(tenant)),
                    ("search_path", crate::tenancy::schema(tenant)),
                ])),
                None => pool_options(8).connect_lazy_with(options),
            })
        })
    }

    /// A tenant's connection, checked again as it is resolved now (a host whose address
    /// changed to a refused one since it was registered is refused), pinned to the checked
    /// address, and every session it opens checked as the API checked it.
    async fn connection_pool(
        &self,
        tenant: Uuid,
        id: Uuid,
    ) -> Result<(String, PgPool), TargetError> {
        let raw = self.connection_url(tenant, id).await?;
        let refused = |e: Refusal| match e {
            Refusal::Invalid(reason) => TargetError::RefusedConnection(id, reason),
            Refusal::Unreachable(detail) => {
                let detail = crate::telemetry::Untrusted(detail);
                tracing::warn!(connection = %id, %detail, "connection unreachable");
                TargetError::UnreachableConnection(id)
            }
        };
        let url = TargetUrl::parse(&raw).map_err(|why| refused(Refusal::Invalid(why)))?;
        let checked = self.guard.check(&url).await.map_err(refused)?;
        let options = self
            .limits
            .apply(checked.connect_options().map_err(refused)?);
        let key = format!("{raw}@{}", checked.ip());
        let mut connections = self.connections.lock().expect("connections lock");
        match connections.get(&id) {
            Some((made_for, pool)) if *made_for == key => return Ok((key, pool.clone())),
            // Its address (or URL) changed: a new pool, pinned to the new address.
            _ => {}
        }
        let guard = self.guard.clone();
        let pool = pool_options(8)
            .after_connect(move |conn, _| {
                let guard = guard.clone();
                Box::pin(async move {
                    guard
                        .verify_session(conn)
                        .await
                        .map_err(|e| sqlx::Error::Configuration(e.to_string().into()))
                })
            })
            .connect_lazy_with(options);
        connections.insert(id, (key.clone(), pool.clone()));
        Ok((key, pool))
    }

    /// How many tenants' connections have a pool here.
    pub fn connection_pools(&self) -> usize {
        self.connections.lock().expect("connections lock").len()
    }

    fn pool_for(
        &self,
        key: String,
        create: impl FnOnce() -> anyhow::Result<PgPool>,
    ) -> anyhow::Result<PgPool> {
        let mut pools = self.pools.lock().expect("targets lock");
        if let Some(pool) = pools.get(&key) {
            return Ok(pool.clone());
        }
        let pool = create()?;
        Ok(pools.entry(key).or_insert(pool).clone())
    }
}

/// Lazy pools whose idle sessions close after a minute: a tenant's pool costs nothing while
/// the tenant is quiet.
fn pool_options(max: u32) -> sqlx::postgres::PgPoolOptions {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max)
        .min_connections(0)
        .idle_timeout(Duration::from_secs(60))
        .acquire_timeout(Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_url_opens_only_in_its_own_row() {
        let cipher = Cipher::from_hex(&"ab".repeat(32)).unwrap();
        let (tenant, other_tenant, id) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let sealed = cipher.encrypt("postgres://ann:secret@db/x", tenant, id);
        assert_eq!(sealed[0], SEALED_V1);
        assert_eq!(
            cipher.decrypt(&sealed, tenant, id).unwrap(),
            "postgres://ann:secret@db/x"
        );
        assert!(cipher.decrypt(&sealed, other_tenant, id).is_err());
        assert!(cipher.decrypt(&sealed, tenant, Uuid::now_v7()).is_err());
        // The old format (nonce first, no binding) fails closed.
        assert!(cipher.decrypt(&sealed[1..], tenant, id).is_err());
    }

    #[test]
    fn a_tampered_or_foreign_sealed_value_does_not_open() {
        let cipher = Cipher::from_hex(&"ab".repeat(32)).unwrap();
        let (tenant, id) = (Uuid::now_v7(), Uuid::now_v7());
        let url = "postgres://ann:secret@db/x";
        let sealed = cipher.encrypt(url, tenant, id);
        // A fresh nonce each time: the same URL never seals to the same bytes.
        assert_ne!(sealed, cipher.encrypt(url, tenant, id));
        // Any flipped bit (nonce, ciphertext or tag) is refused, never decrypted to garbage.
        for i in 1..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[i] ^= 0x01;
            assert!(cipher.decrypt(&tampered, tenant, id).is_err(), "byte {i}");
        }
        assert!(cipher
            .decrypt(&sealed[..sealed.len() - 1], tenant, id)
            .is_err());
        assert!(cipher.decrypt(&sealed[..NONCE_LEN], tenant, id).is_err());
        assert!(cipher.decrypt(&[], tenant, id).is_err());
        // Another key does not open it.
        let other = Cipher::from_hex(&"cd".repeat(32)).unwrap();
        assert!(other.decrypt(&sealed, tenant, id).is_err());
        assert_eq!(cipher.decrypt(&sealed, tenant, id).unwrap(), url);
    }

    #[test]
    fn a_key_must_be_64_hex_digits() {
        assert!(Cipher::from_hex(&format!(" {} ", "0f".repeat(32))).is_ok());
        assert!(Cipher::from_hex(&"ab".repeat(16)).is_err(), "16 bytes");
        assert!(Cipher::from_hex(&"zz".repeat(32)).is_err(), "not hex");
        assert!(Cipher::from_hex("").is_err());
        // The example files' key: valid hex, and public.
        assert!(Cipher::from_hex(EXAMPLE_SECRET_KEY).is_err());
        assert!(Cipher::from_hex(&EXAMPLE_SECRET_KEY.to_uppercase()).is_err());
    }

    /// Pools of tenants' connections were kept for good, one per URL and address: a
    /// connection deleted and made again, or a host resolving to another address at each use,
    /// left one more at each turn. The most recently used [`CONNECTION_POOLS`] keep theirs.
    #[tokio::test]
    async fn connection_pools_are_bounded() {
        let db = crate::testing::TestDatabase::new().await;
        let tenant = db.tenant().await;
        let settings = crate::Settings::for_test(db.url.clone(), "pools".into());
        let limits = SessionLimits::jobs(&settings);
        let targets = Targets::new(db.pool.clone(), &settings, limits).unwrap();
        let cipher = targets.cipher().unwrap();
        let mut ids = Vec::new();
        for i in 0..CONNECTION_POOLS + 10 {
            // Never connected to: pools are lazy.
            let url = format!("postgres://u{i}:p@127.0.0.1:5999/elsewhere");
            let display = "127.0.0.1:5999/elsewhere";
            let made = create(&db.pool, cipher, tenant, &format!("c{i}"), &url, display)
                .await
                .unwrap()
                .unwrap();
            ids.push(made.id);
        }
        // A connection used again keeps the pool it has.
        for _ in 0..2 {
            targets.target(tenant, Some(ids[0])).await.unwrap();
            assert_eq!(targets.connection_pools(), 1);
        }
        for id in &ids {
            targets.target(tenant, Some(*id)).await.unwrap();
        }
        assert_eq!(targets.connection_pools(), CONNECTION_POOLS);
    }
}
