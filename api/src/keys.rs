//! Tenants and their API keys: create, list, revoke, rotate. A key is shown once when it is made
//! and stored only as its sha256. An admin key may also manage its tenant's keys; the first key
//! a tenant gets is one.

use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::hash_key;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything a member may do, and manage the tenant's keys.
    Admin,
    /// Jobs, datasets, connections, collections, the dashboard: all but key management.
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Member => "member",
        }
    }

    pub fn parse(role: &str) -> Option<Self> {
        match role {
            "admin" => Some(Self::Admin),
            "member" => Some(Self::Member),
            _ => None,
        }
    }
}

/// `api_keys.role`, a text column.
impl TryFrom<String> for Role {
    type Error = String;

    fn try_from(role: String) -> Result<Self, String> {
        Self::parse(&role).ok_or_else(|| format!("unknown role {role:?}"))
    }
}

/// A key as lists show it: never the key itself.
#[derive(Clone, Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct ApiKey {
    pub id: Uuid,
    /// A label given when the key was made.
    pub name: Option<String>,
    /// The key's first characters (`cvk_` and 8 hex digits), to tell keys apart; absent for
    /// keys made before keys had one.
    pub prefix: Option<String>,
    #[sqlx(try_from = "String")]
    pub role: Role,
    pub created_at: DateTime<Utc>,
    /// Within a minute.
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A key just made: the secret is here this once.
#[derive(Serialize, ToSchema)]
pub struct CreatedKey {
    /// The key. Shown only now; keep it secret.
    pub key: String,
    #[serde(flatten)]
    pub info: ApiKey,
}

const KEY_COLUMNS: &str = "id, name, prefix, role, created_at, last_used_at, revoked_at";

/// A key name: trimmed, 1-100 characters.
pub fn valid_name(name: Option<&str>) -> Result<Option<String>, &'static str> {
    match name.map(str::trim) {
        None => Ok(None),
        Some(name) if name.is_empty() || name.chars().count() > 100 => {
            Err("must be 1-100 characters")
        }
        Some(name) => Ok(Some(name.to_owned())),
    }
}

/// Creates the tenant if needed and a new key for it (an admin key if `admin`, or if it is the
/// tenant's first). The key is returned once, never stored. Returns the tenant's id too.
pub async fn create_for_tenant(
    pool: &PgPool,
    tenant: &str,
    admin: bool,
    name: Option<&str>,
) -> anyhow::Result<(Uuid, CreatedKey)> {
    anyhow::ensure!(
        !tenant.trim().is_empty() && tenant.len() <= 100,
        "tenant name must be 1-100 characters"
    );
    let name = valid_name(name).map_err(|e| anyhow::anyhow!("key name {e}"))?;
    let mut tx = pool.begin().await?;
    // The upsert locks the tenant's row until commit, so two first keys cannot both be first.
    let tenant_id: Uuid = sqlx::query_scalar(
        "INSERT INTO tenants (id, name) VALUES ($1, $2)
         ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(tenant.trim())
    .fetch_one(&mut *tx)
    .await?;
    let first: bool =
        sqlx::query_scalar("SELECT NOT EXISTS (SELECT FROM api_keys WHERE tenant_id = $1)")
            .bind(tenant_id)
            .fetch_one(&mut *tx)
            .await?;
    let role = if admin || first {
        Role::Admin
    } else {
        Role::Member
    };
    let created = insert(&mut tx, tenant_id, role, name.as_deref()).await?;
    tx.commit().await?;
    Ok((tenant_id, created))
}

/// [`create_for_tenant`] with no name, returning the tenant's id and the key.
pub async fn create_key(pool: &PgPool, tenant: &str) -> anyhow::Result<(Uuid, String)> {
    let (tenant_id, created) = create_for_tenant(pool, tenant, false, None).await?;
    Ok((tenant_id, created.key))
}

/// A new key for an existing tenant.
pub async fn create(
    pool: &PgPool,
    tenant_id: Uuid,
    role: Role,
    name: Option<&str>,
) -> Result<CreatedKey, sqlx::Error> {
    insert(&mut *pool.acquire().await?, tenant_id, role, name).await
}

async fn insert(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    role: Role,
    name: Option<&str>,
) -> Result<CreatedKey, sqlx::Error> {
    let mut secret = [0u8; 24];
    rand::rng().fill_bytes(&mut secret);
    let key = format!("cvk_{}", hex::encode(secret));
    let info = sqlx::query_as(&format!(
        "INSERT INTO api_keys (id, tenant_id, key_hash, role, name, prefix)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING {KEY_COLUMNS}"
    ))
    .bind(Uuid::now_v7())
    .bind(tenant_id)
    .bind(hash_key(&key))
    .bind(role.as_str())
    .bind(name)
    .bind(&key[..12])
    .fetch_one(conn)
    .await?;
    Ok(CreatedKey { key, info })
}

/// The tenant's id by name.
pub async fn tenant_id(pool: &PgPool, tenant: &str) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM tenants WHERE name = $1")
        .bind(tenant.trim())
        .fetch_optional(pool)
        .await
}

/// The tenant's keys, revoked ones too, oldest first.
pub async fn list(pool: &PgPool, tenant_id: Uuid) -> Result<Vec<ApiKey>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {KEY_COLUMNS} FROM api_keys WHERE tenant_id = $1 ORDER BY created_at, id"
    ))
    .bind(tenant_id)
    .fetch_all(pool)
    .await
}

/// Revokes the key (only if it is `tenant`'s, when given) and ends the sessions opened with it;
/// revoking a revoked key changes nothing. False if there is no such key. The caller tells the
/// API processes ([`crate::revocation`]).
pub async fn revoke(pool: &PgPool, tenant: Option<Uuid>, id: Uuid) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let found = revoke_in(&mut tx, tenant, id).await?;
    tx.commit().await?;
    Ok(found)
}

async fn revoke_in(
    conn: &mut PgConnection,
    tenant: Option<Uuid>,
    id: Uuid,
) -> Result<bool, sqlx::Error> {
    let found = sqlx::query(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
         WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2)",
    )
    .bind(id)
    .bind(tenant)
    .execute(&mut *conn)
    .await?
    .rows_affected()
        > 0;
    sqlx::query("DELETE FROM sessions WHERE api_key_id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(found)
}

/// Replaces a live key: a new key with its tenant, role and name, and the old one revoked at
/// once (no grace period: rotate when the new key is ready to be put in place). `None` if there
/// is no live key with this id. The caller tells the API processes the old key is revoked.
pub async fn rotate(pool: &PgPool, id: Uuid) -> Result<Option<CreatedKey>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let old: Option<(Uuid, String, Option<String>)> = sqlx::query_as(
        "SELECT tenant_id, role, name FROM api_keys WHERE id = $1 AND revoked_at IS NULL FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((tenant_id, role, name)) = old else {
        return Ok(None);
    };
    let role = Role::parse(&role).unwrap_or(Role::Member);
    let created = insert(&mut tx, tenant_id, role, name.as_deref()).await?;
    revoke_in(&mut tx, None, id).await?;
    tx.commit().await?;
    Ok(Some(created))
}
