//! Target databases that imports and patches write to. A tenant registers a connection URL; it
//! is stored encrypted (AES-256-GCM under `CONVEYOR_SECRET_KEY`) and never returned. Jobs
//! that name no connection use `CONVEYOR_TARGET_DATABASE_URL`.

use aes_gcm::{aead::Aead, Aes256Gcm, KeyInit};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{postgres::PgConnectOptions, PgPool};
use std::{collections::HashMap, str::FromStr, sync::Mutex, time::Duration};
use utoipa::ToSchema;
use uuid::Uuid;

const NONCE_LEN: usize = 12;

/// Encrypts and decrypts connection URLs.
#[derive(Clone)]
pub struct Cipher(Aes256Gcm);

impl Cipher {
    /// From 64 hex digits.
    pub fn from_hex(key: &str) -> anyhow::Result<Self> {
        let bytes = hex::decode(key.trim())
            .map_err(|_| anyhow::anyhow!("CONVEYOR_SECRET_KEY must be 64 hex digits"))?;
        let cipher = Aes256Gcm::new_from_slice(&bytes)
            .map_err(|_| anyhow::anyhow!("CONVEYOR_SECRET_KEY must be 32 bytes (64 hex digits)"))?;
        Ok(Self(cipher))
    }

    pub fn encrypt(&self, plain: &str) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let mut sealed = nonce.to_vec();
        sealed.extend(
            self.0
                .encrypt(&nonce.into(), plain.as_bytes())
                .expect("AES-GCM encryption cannot fail for in-memory input"),
        );
        sealed
    }

    pub fn decrypt(&self, sealed: &[u8]) -> anyhow::Result<String> {
        anyhow::ensure!(sealed.len() > NONCE_LEN, "sealed value too short");
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("split at NONCE_LEN");
        let plain = self
            .0
            .decrypt(&nonce.into(), body)
            .map_err(|_| anyhow::anyhow!("cannot decrypt: wrong CONVEYOR_SECRET_KEY?"))?;
        Ok(String::from_utf8(plain)?)
    }
}

#[derive(Clone, Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct Connection {
    pub id: Uuid,
    pub name: String,
    /// `host:port/database`: the credentials are never shown.
    pub display: String,
    pub created_at: DateTime<Utc>,
}

/// `host:port/database` of a PostgreSQL URL, or why it is not one.
pub fn describe(url: &str) -> Result<String, String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("must be a postgres:// URL".into());
    }
    let options = PgConnectOptions::from_str(url).map_err(|e| e.to_string())?;
    Ok(format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("")
    ))
}

pub async fn create(
    pool: &PgPool,
    cipher: &Cipher,
    tenant: Uuid,
    name: &str,
    url: &str,
    display: &str,
) -> sqlx::Result<Option<Connection>> {
    sqlx::query_as(
        "INSERT INTO connections (id, tenant_id, name, url_encrypted, display)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (tenant_id, name) DO NOTHING
         RETURNING id, name, display, created_at",
    )
    .bind(Uuid::now_v7())
    .bind(tenant)
    .bind(name)
    .bind(cipher.encrypt(url))
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

pub async fn delete(pool: &PgPool, tenant: Uuid, id: Uuid) -> sqlx::Result<bool> {
    let deleted = sqlx::query("DELETE FROM connections WHERE tenant_id = $1 AND id = $2")
        .bind(tenant)
        .bind(id)
        .execute(pool)
        .await?;
    Ok(deleted.rows_affected() == 1)
}

/// Resolves target databases to pools, one pool per URL and role for the life of the process.
pub struct Targets {
    control: PgPool,
    default_url: String,
    cipher: Option<Cipher>,
    limits: SessionLimits,
    pools: Mutex<HashMap<(String, Option<Uuid>), PgPool>>,
}

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
            control,
            default_url: settings.target_database_url.clone(),
            cipher: settings
                .secret_key
                .as_deref()
                .map(Cipher::from_hex)
                .transpose()?,
            limits,
            pools: Mutex::default(),
        })
    }

    pub fn cipher(&self) -> Option<&Cipher> {
        self.cipher.as_ref()
    }

    /// The default target as the platform sees it.
    pub fn default_platform(&self) -> anyhow::Result<PgPool> {
        self.pool_for(self.default_url.clone(), None)
    }

    /// The URL of the tenant's connection, or the default target.
    pub async fn url(&self, tenant: Uuid, connection: Option<Uuid>) -> Result<String, TargetError> {
        let Some(id) = connection else {
            return Ok(self.default_url.clone());
        };
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
        Ok(cipher.decrypt(&sealed)?)
    }

    /// Platform pools on every target database: the default one and each registered
    /// connection, once per URL. For maintenance sweeps; a connection that cannot be read is
    /// skipped.
    pub async fn all(&self) -> anyhow::Result<Vec<PgPool>> {
        let registered: Vec<(Uuid, Uuid)> =
            sqlx::query_as("SELECT tenant_id, id FROM connections ORDER BY created_at")
                .fetch_all(&self.control)
                .await?;
        let mut urls = vec![self.default_url.clone()];
        for (tenant, id) in registered {
            match self.url(tenant, Some(id)).await {
                Ok(url) if !urls.contains(&url) => urls.push(url),
                Ok(_) => {}
                Err(e) => tracing::warn!(connection = %id, error = %e, "connection skipped"),
            }
        }
        urls.into_iter()
            .map(|url| self.pool_for(url, None))
            .collect()
    }

    /// The tenant's connection, or the default target as the tenant's role.
    pub async fn target(
        &self,
        tenant: Uuid,
        connection: Option<Uuid>,
    ) -> Result<Target, TargetError> {
        let url = self.url(tenant, connection).await?;
        let platform = self.pool_for(url.clone(), None)?;
        Ok(match connection {
            Some(_) => Target {
                pool: platform.clone(),
                platform,
                tenant_schema: None,
                tenant_role: None,
            },
            None => Target {
                pool: self.pool_for(url, Some(tenant))?,
                platform,
                tenant_schema: Some(crate::tenancy::schema(tenant)),
                tenant_role: Some(crate::tenancy::role(tenant)),
            },
        })
    }

    /// A pool on `url`; with a tenant, every session runs as the tenant's role in its schema.
    fn pool_for(&self, url: String, tenant: Option<Uuid>) -> anyhow::Result<PgPool> {
        let key = (url, tenant);
        if let Some(pool) = self.pools.lock().expect("targets lock").get(&key) {
            return Ok(pool.clone());
        }
        let millis = |d: Duration| format!("{}ms", d.as_millis());
        // UTC sessions: timestamps without a zone are read the same on every server.
        let mut options = PgConnectOptions::from_str(&key.0)
            .map_err(|e| anyhow::anyhow!("bad connection URL: {e}"))?
            .options([
                ("TimeZone", "UTC".to_owned()),
                ("statement_timeout", millis(self.limits.statement_timeout)),
                ("lock_timeout", millis(self.limits.lock_timeout)),
                (
                    "idle_in_transaction_session_timeout",
                    millis(self.limits.idle_in_transaction),
                ),
            ]);
        let mut max = 8;
        if let Some(tenant) = tenant {
            // Session defaults, so that a RESET returns to them; `SET LOCAL ROLE NONE` is how
            // platform code steps out for its bookkeeping within a transaction.
            options = options.options([
                ("role", crate::tenancy::role(tenant)),
                ("search_path", crate::tenancy::schema(tenant)),
            ]);
            max = 4;
        }
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(max)
            .min_connections(0)
            .idle_timeout(Duration::from_secs(60))
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(options);
        Ok(self
            .pools
            .lock()
            .expect("targets lock")
            .entry(key)
            .or_insert(pool)
            .clone())
    }
}
