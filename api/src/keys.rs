//! Tenants and their API keys: create, list, revoke, rotate. A key is shown once when it is made
//! and stored only as its sha256. A key is `admin`, `write` or `read` ([`Role`]); an admin key
//! may also manage its tenant's keys, and the first key a tenant gets is one. Every change here
//! is audited in its own transaction.

use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    audit::{self, Action, Actor, Entry},
    auth::hash_key,
};

/// What a key may do. Each role may do everything the roles below it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads: jobs, artifacts, event streams, datasets, collections, search, queues, workers.
    Read,
    /// Reads and changes: submit, cancel, retry, upload, delete, connections, collections.
    /// (`member`, the former name, is accepted when a key is made.)
    #[serde(alias = "member")]
    Write,
    /// Everything, and the tenant's keys and audit log.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Write => "write",
            Self::Read => "read",
        }
    }

    /// A role's name; `member`, its former name, reads as `write`.
    pub fn parse(role: &str) -> Option<Self> {
        match role {
            "admin" => Some(Self::Admin),
            "write" | "member" => Some(Self::Write),
            "read" => Some(Self::Read),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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

/// A key name: trimmed, 1-100 characters, none of them a control character or a bidi
/// override (an operator's `keys list` printed names raw: escape sequences rewrote its
/// earlier rows or set the clipboard).
pub fn valid_name(name: Option<&str>) -> Result<Option<String>, &'static str> {
    match name.map(str::trim) {
        None => Ok(None),
        Some(name) if name.is_empty() || name.chars().count() > 100 => {
            Err("must be 1-100 characters")
        }
        Some(name) if name.contains(unprintable) => {
            Err("must hold no control characters or direction overrides")
        }
        Some(name) => Ok(Some(name.to_owned())),
    }
}

/// A control character or a bidi override: what a terminal acts on instead of showing.
fn unprintable(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A name as a terminal may show it: what it would act on escaped (names stored before
/// [`valid_name`] refused them may hold such characters).
pub fn printable(name: &str) -> String {
    name.chars()
        .map(|c| match unprintable(c) {
            true => c.escape_unicode().to_string(),
            false => c.to_string(),
        })
        .collect()
}

/// Which tenant a key created by the operator is for. A name alone never creates a tenant:
/// onboarding a second customer called "acme" must not hand it the first one's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TenantChoice {
    /// A tenant that exists already.
    Existing,
    /// A tenant made now: refused if the name is taken.
    New,
}

/// A new key for a tenant, created with it when `choice` is [`TenantChoice::New`]: of `role`,
/// else an admin key if it is the tenant's first and a write key if not. The key is returned
/// once, never stored. Returns the tenant's id too. Whether the tenant exists is decided in the
/// transaction that adds the key, so two creates of one new name cannot both make it. An
/// operator's act: audited with no key.
pub async fn create_for_tenant(
    pool: &PgPool,
    tenant: &str,
    choice: TenantChoice,
    role: Option<Role>,
    name: Option<&str>,
) -> anyhow::Result<(Uuid, CreatedKey)> {
    // A new tenant's name is checked as a key's; an existing one is found as it was stored.
    let tenant = match choice {
        TenantChoice::New => valid_name(Some(tenant))
            .map_err(|e| anyhow::anyhow!("tenant name {e}"))?
            .unwrap_or_default(),
        TenantChoice::Existing => tenant.trim().to_owned(),
    };
    let name = valid_name(name).map_err(|e| anyhow::anyhow!("key name {e}"))?;
    let mut tx = pool.begin().await?;
    // Either statement locks the tenant's row until commit, so two first keys cannot both be
    // first, and a tenant is created once.
    let tenant_id: Uuid = match choice {
        TenantChoice::Existing => {
            sqlx::query_scalar("SELECT id FROM tenants WHERE name = $1 FOR UPDATE")
                .bind(&tenant)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| {
                    anyhow::anyhow!("no tenant named {tenant:?}; add --new-tenant to create it")
                })?
        }
        TenantChoice::New => {
            let created: Option<Uuid> = sqlx::query_scalar(
                "INSERT INTO tenants (id, name) VALUES ($1, $2)
                 ON CONFLICT (name) DO NOTHING RETURNING id",
            )
            .bind(Uuid::now_v7())
            .bind(&tenant)
            .fetch_optional(&mut *tx)
            .await?;
            match created {
                Some(id) => id,
                None => {
                    let existing = tenant_id(pool, &tenant).await?.unwrap_or_default();
                    anyhow::bail!(
                        "a tenant named {tenant:?} exists already ({existing}); \
                         drop --new-tenant to add a key to it"
                    );
                }
            }
        }
    };
    let first: bool =
        sqlx::query_scalar("SELECT NOT EXISTS (SELECT FROM api_keys WHERE tenant_id = $1)")
            .bind(tenant_id)
            .fetch_one(&mut *tx)
            .await?;
    let role = role.unwrap_or(if first { Role::Admin } else { Role::Write });
    let created = insert(&mut tx, tenant_id, role, name.as_deref(), None).await?;
    audit::record(
        &mut *tx,
        &Actor::operator(tenant_id),
        created_entry(&created),
    )
    .await?;
    tx.commit().await?;
    Ok((tenant_id, created))
}

/// A key for `tenant`, creating the tenant if there is none of that name (for tests and
/// tools that make their own tenants); returns the tenant's id and the key.
pub async fn create_key(pool: &PgPool, tenant: &str) -> anyhow::Result<(Uuid, String)> {
    let choice = match tenant_id(pool, tenant).await? {
        Some(_) => TenantChoice::Existing,
        None => TenantChoice::New,
    };
    let (tenant_id, created) = create_for_tenant(pool, tenant, choice, None, None).await?;
    Ok((tenant_id, created.key))
}

/// How many live keys a tenant's admin keys may hold (the operator's commands may make more).
pub const MAX_LIVE_KEYS: i64 = 100;

/// A new key of the actor's tenant, made by the actor (audited in the same transaction;
/// `payload_sha256`: of the request's body); `None` if the tenant holds [`MAX_LIVE_KEYS`].
pub async fn create(
    pool: &PgPool,
    by: &Actor,
    role: Role,
    name: Option<&str>,
    payload_sha256: Option<String>,
) -> Result<Option<CreatedKey>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // Counted once the tenant's row is locked, in a statement of its own (one counting in the
    // locking statement reads from before the lock was granted, a key made meanwhile
    // unseen): two creations cannot both take the last place. `NO KEY`: the tenant's
    // submissions, whose rows reference it, do not wait.
    sqlx::query("SELECT 1 FROM tenants WHERE id = $1 FOR NO KEY UPDATE")
        .bind(by.tenant)
        .execute(&mut *tx)
        .await?;
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM api_keys WHERE tenant_id = $1 AND revoked_at IS NULL",
    )
    .bind(by.tenant)
    .fetch_one(&mut *tx)
    .await?;
    if live >= MAX_LIVE_KEYS {
        return Ok(None);
    }
    let created = insert(&mut tx, by.tenant, role, name, None).await?;
    let mut entry = created_entry(&created);
    entry.payload_sha256 = payload_sha256;
    audit::record(&mut *tx, by, entry).await?;
    tx.commit().await?;
    Ok(Some(created))
}

fn created_entry(created: &CreatedKey) -> Entry {
    Entry::new(Action::KeyCreate)
        .target(created.info.id)
        .detail(serde_json::json!({"role": created.info.role, "name": created.info.name}))
}

/// A new key of the tenant, with the submission rate of `rate_of` (a key of the tenant) if
/// that has one.
async fn insert(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    role: Role,
    name: Option<&str>,
    rate_of: Option<Uuid>,
) -> Result<CreatedKey, sqlx::Error> {
    let mut secret = [0u8; 24];
    rand::rng().fill_bytes(&mut secret);
    let key = format!("cvk_{}", hex::encode(secret));
    let info = sqlx::query_as(&format!(
        "INSERT INTO api_keys (id, tenant_id, key_hash, role, name, prefix, rate_per_sec,
                               rate_burst)
         SELECT $1, $2, $3, $4, $5, $6, r.rate_per_sec, r.rate_burst
         FROM (SELECT) one LEFT JOIN api_keys r ON r.id = $7 AND r.tenant_id = $2
         RETURNING {KEY_COLUMNS}"
    ))
    .bind(Uuid::now_v7())
    .bind(tenant_id)
    .bind(hash_key(&key))
    .bind(role.as_str())
    .bind(name)
    .bind(&key[..12])
    .bind(rate_of)
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

/// The tenant's keys, revoked ones too, in the order they were made (by id, which is made
/// from the time), after the `cursor` key id: revoked keys are kept, so their number has no
/// bound.
pub async fn list(
    pool: &PgPool,
    tenant_id: Uuid,
    cursor: Option<Uuid>,
    limit: i64,
    budget: usize,
) -> Result<shared::pages::Page<ApiKey>, sqlx::Error> {
    let sql = format!(
        "SELECT {KEY_COLUMNS} FROM api_keys WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id > $2)
         ORDER BY id LIMIT $3"
    );
    let query = sqlx::query(&sql).bind(tenant_id).bind(cursor).bind(limit);
    shared::pages::read(pool, query, budget).await
}

/// Revokes the key and ends the sessions opened with it: by a key (`Some`: only a key of its
/// tenant), or by an operator (`None`: any tenant's). Revoking a revoked key changes nothing
/// (and is not audited). False if there is no such key. The caller tells the API processes
/// ([`crate::revocation`]).
pub async fn revoke(pool: &PgPool, by: Option<&Actor>, id: Uuid) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let found = revoke_in(&mut tx, by.map(|a| a.tenant), id).await?;
    if let Some((tenant, true)) = found {
        let operator = Actor::operator(tenant);
        let entry = Entry::new(Action::KeyRevoke).target(id);
        audit::record(&mut *tx, by.unwrap_or(&operator), entry).await?;
    }
    tx.commit().await?;
    Ok(found.is_some())
}

/// The key's tenant and whether it was live, if there is such a key (of `tenant`, if given).
async fn revoke_in(
    conn: &mut PgConnection,
    tenant: Option<Uuid>,
    id: Uuid,
) -> Result<Option<(Uuid, bool)>, sqlx::Error> {
    let found: Option<(Uuid, bool)> = sqlx::query_as(
        "SELECT tenant_id, revoked_at IS NULL FROM api_keys
         WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2) FOR UPDATE",
    )
    .bind(id)
    .bind(tenant)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((_, live)) = found else {
        // Another tenant's key, or none: its sessions are not this caller's to end.
        return Ok(None);
    };
    if live {
        sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE id = $1")
            .bind(id)
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query("DELETE FROM sessions WHERE api_key_id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(found)
}

/// Replaces a live key: a new key with its tenant, role, name and rate, and the old one revoked at
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
    let role = Role::parse(&role).unwrap_or(Role::Read);
    let created = insert(&mut tx, tenant_id, role, name.as_deref(), Some(id)).await?;
    revoke_in(&mut tx, None, id).await?;
    let entry = Entry::new(Action::KeyRotate)
        .target(id)
        .detail(serde_json::json!({"new_key_id": created.info.id, "role": role}));
    audit::record(&mut *tx, &Actor::operator(tenant_id), entry).await?;
    tx.commit().await?;
    Ok(Some(created))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_holds_nothing_a_terminal_acts_on() {
        assert_eq!(valid_name(Some(" ci ")), Ok(Some("ci".into())));
        assert_eq!(
            valid_name(Some("naïve 名前")),
            Ok(Some("naïve 名前".into()))
        );
        for hostile in [
            "a\u{1b}[2Kb",
            "a\u{7}b",
            "ab\u{202e}cd",
            "a\u{2066}b",
            "a\nb",
        ] {
            assert!(valid_name(Some(hostile)).is_err(), "{hostile:?}");
        }
        assert_eq!(printable("a\u{1b}[2Kb"), "a\\u{1b}[2Kb");
    }
}
