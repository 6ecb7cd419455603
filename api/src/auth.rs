//! Who is calling: `Authorization: Bearer <api key>`, or the dashboard's session cookie (a
//! browser's EventSource cannot send headers). Keys and session tokens are stored as sha256
//! hashes.

use axum::{
    extract::FromRequestParts,
    http::{request::Parts, HeaderMap, StatusCode},
};
use sha2::{Digest, Sha256};
use shared::Problem;
use uuid::Uuid;

use crate::AppState;

/// The tenant the request's API key (or session) belongs to.
#[derive(Clone, Copy, Debug)]
pub struct Tenant(pub Uuid);

/// The dashboard's session cookie (HttpOnly, SameSite=Strict, Path=/).
pub const SESSION_COOKIE: &str = "conveyor_session";
/// A request authenticated by the cookie that changes something must carry this header. A
/// cross-site form cannot set it, and a cross-site script cannot send it without a CORS
/// preflight this API never grants: a second wall behind SameSite=Strict.
pub const CSRF_HEADER: &str = "x-conveyor-csrf";

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl FromRequestParts<AppState> for Tenant {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Problem> {
        let Some(header) = parts.headers.get(axum::http::header::AUTHORIZATION) else {
            let token = session_cookie(&parts.headers).ok_or_else(|| {
                Problem::unauthorized(
                    "missing Authorization: Bearer <api key> (or a session cookie)",
                )
            })?;
            if !parts.method.is_safe() {
                require_csrf_header(&parts.headers)?;
            }
            return session_tenant(state, token).await.map(Tenant);
        };
        let header = header
            .to_str()
            .map_err(|_| Problem::unauthorized("Authorization must be `Bearer <api key>`"))?;
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

/// The session cookie's token, if the request carries one.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, value)| *name == SESSION_COOKIE && !value.is_empty())
        .map(|(_, value)| value)
}

pub fn require_csrf_header(headers: &HeaderMap) -> Result<(), Problem> {
    if headers.contains_key(CSRF_HEADER) {
        Ok(())
    } else {
        Err(Problem::new(
            StatusCode::FORBIDDEN,
            "csrf",
            format!("a request signed in by cookie that changes something needs the header {CSRF_HEADER}: 1"),
        ))
    }
}

/// The tenant of a live session. Not cached: signing out must take effect at once, in every
/// API process.
async fn session_tenant(state: &AppState, token: &str) -> Result<Uuid, Problem> {
    let tenant: Option<Uuid> = sqlx::query_scalar(
        "SELECT s.tenant_id FROM sessions s JOIN api_keys k ON k.id = s.api_key_id
         WHERE s.token_hash = $1 AND s.expires_at > now() AND k.revoked_at IS NULL",
    )
    .bind(hash_key(token))
    .fetch_optional(&state.pool)
    .await?;
    tenant.ok_or_else(|| Problem::unauthorized("the session has ended; sign in again"))
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
