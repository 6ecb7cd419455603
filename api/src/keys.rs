//! Tenants and their API keys.

use rand::RngCore;
use sqlx::PgPool;
use uuid::Uuid;

use crate::auth::hash_key;

/// Creates the tenant if needed and a new key for it. The key is returned once, never stored.
pub async fn create_key(pool: &PgPool, tenant: &str) -> anyhow::Result<(Uuid, String)> {
    anyhow::ensure!(
        !tenant.trim().is_empty() && tenant.len() <= 100,
        "tenant name must be 1-100 characters"
    );
    let tenant_id: Uuid = sqlx::query_scalar(
        "INSERT INTO tenants (id, name) VALUES ($1, $2)
         ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(tenant.trim())
    .fetch_one(pool)
    .await?;
    let mut secret = [0u8; 24];
    rand::rng().fill_bytes(&mut secret);
    let key = format!("cvk_{}", hex::encode(secret));
    sqlx::query("INSERT INTO api_keys (id, tenant_id, key_hash) VALUES ($1, $2, $3)")
        .bind(Uuid::now_v7())
        .bind(tenant_id)
        .bind(hash_key(&key))
        .execute(pool)
        .await?;
    Ok((tenant_id, key))
}
