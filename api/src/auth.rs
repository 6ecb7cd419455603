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
        let tenant: Option<Uuid> = sqlx::query_scalar(
            "SELECT tenant_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        )
        .bind(hash_key(key))
        .fetch_optional(&state.pool)
        .await?;
        tenant
            .map(Tenant)
            .ok_or_else(|| Problem::unauthorized("unknown or revoked API key"))
    }
}
