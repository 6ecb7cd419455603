//! API keys: `Authorization: Bearer <key>`; keys are stored as sha256 hashes.

use axum::{extract::FromRequestParts, http::request::Parts};
use sha2::{Digest, Sha256};
use shared::Problem;
use uuid::Uuid;

use crate::AppState;

/// The tenant the request's API key belongs to.
#[derive(Clone, Copy, Debug)]
pub struct Tenant(pub Uuid);

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl FromRequestParts<AppState> for Tenant {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Problem> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Problem::unauthorized("missing Authorization: Bearer <api key>"))?;
        let key = header
            .strip_prefix("Bearer ")
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| Problem::unauthorized("Authorization must be `Bearer <api key>`"))?;
        let hash = hash_key(key);
        if let Some(tenant) = state.key_cache.get(&hash) {
            return Ok(Tenant(tenant));
        }
        let tenant: Option<Uuid> = sqlx::query_scalar(
            "SELECT tenant_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        )
        .bind(&hash)
        .fetch_optional(&state.pool)
        .await?;
        let tenant = tenant.ok_or_else(|| Problem::unauthorized("unknown or revoked API key"))?;
        state.key_cache.insert(hash, tenant);
        Ok(Tenant(tenant))
    }
}

/// Known keys for a short while, so a request costs no extra database round trip. A revoked
/// key keeps working until its entry expires (at most [`KeyCache::TTL`]).
#[derive(Default)]
pub struct KeyCache {
    entries: std::sync::Mutex<std::collections::HashMap<String, (Uuid, std::time::Instant)>>,
}

impl KeyCache {
    pub const TTL: std::time::Duration = std::time::Duration::from_secs(30);
    const MAX: usize = 10_000;

    fn get(&self, hash: &str) -> Option<Uuid> {
        let entries = self.entries.lock().expect("key cache lock");
        entries
            .get(hash)
            .filter(|(_, at)| at.elapsed() < Self::TTL)
            .map(|(tenant, _)| *tenant)
    }

    fn insert(&self, hash: String, tenant: Uuid) {
        let mut entries = self.entries.lock().expect("key cache lock");
        if entries.len() >= Self::MAX {
            entries.retain(|_, (_, at)| at.elapsed() < Self::TTL);
        }
        entries.insert(hash, (tenant, std::time::Instant::now()));
    }
}
