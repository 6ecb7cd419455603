//! Who is calling: `Authorization: Bearer <api key>`, or the dashboard's session cookie (a
//! browser's EventSource cannot send headers). Keys and session tokens are stored as sha256
//! hashes.

use axum::{
    extract::FromRequestParts,
    http::{request::Parts, HeaderMap, StatusCode},
};
use sha2::{Digest, Sha256};
use shared::Problem;
use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::OnceCell;
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
        let lookup = || {
            sqlx::query_scalar(
                "SELECT tenant_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
            )
            .bind(&hash)
            .fetch_optional(&state.pool)
        };
        let tenant = state.key_cache.tenant(&hash, lookup).await?;
        tenant
            .map(Tenant)
            .ok_or_else(|| Problem::unauthorized("unknown or revoked API key"))
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
/// key keeps working until its entry expires (at most [`KeyCache::TTL`]). Requests that miss at
/// the same time share one lookup: thousands of dashboards and CLIs reconnecting after an API
/// restart cost one query per key, not one each. Unknown keys are not remembered.
#[derive(Default)]
pub struct KeyCache {
    entries: std::sync::Mutex<std::collections::HashMap<String, CacheEntry>>,
}

struct CacheEntry {
    tenant: Arc<OnceCell<Option<Uuid>>>,
    since: Instant,
}

impl KeyCache {
    pub const TTL: Duration = Duration::from_secs(30);
    const MAX: usize = 10_000;

    /// The tenant of the key with this hash: cached, or from `lookup`, called only on a miss
    /// and once for all the requests waiting on the same key (another one runs it if it fails).
    pub async fn tenant<E, F: Future<Output = Result<Option<Uuid>, E>>>(
        &self,
        hash: &str,
        lookup: impl FnOnce() -> F,
    ) -> Result<Option<Uuid>, E> {
        let cell = {
            let mut entries = self.entries.lock().expect("key cache lock");
            match entries.get(hash) {
                Some(entry) if entry.since.elapsed() < Self::TTL => entry.tenant.clone(),
                _ => {
                    if entries.len() >= Self::MAX {
                        entries.retain(|_, entry| entry.since.elapsed() < Self::TTL);
                    }
                    let tenant = Arc::new(OnceCell::new());
                    let entry = CacheEntry {
                        tenant: tenant.clone(),
                        since: Instant::now(),
                    };
                    entries.insert(hash.to_owned(), entry);
                    tenant
                }
            }
        };
        let tenant = *cell.get_or_try_init(lookup).await?;
        if tenant.is_none() {
            let mut entries = self.entries.lock().expect("key cache lock");
            if entries
                .get(hash)
                .is_some_and(|entry| Arc::ptr_eq(&entry.tenant, &cell))
            {
                entries.remove(hash);
            }
        }
        Ok(tenant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn requests_missing_together_share_one_lookup_and_unknown_keys_are_not_kept() {
        let cache = Arc::new(KeyCache::default());
        let lookups = Arc::new(AtomicUsize::new(0));
        let tenant = Uuid::now_v7();
        let lookup = |found: Option<Uuid>| {
            let lookups = lookups.clone();
            async move {
                lookups.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<_, ()>(found)
            }
        };
        let waiting: Vec<_> = (0..50)
            .map(|_| {
                let (cache, lookup) = (cache.clone(), lookup(Some(tenant)));
                tokio::spawn(async move { cache.tenant("known", || lookup).await })
            })
            .collect();
        for request in waiting {
            assert_eq!(request.await.unwrap(), Ok(Some(tenant)));
        }
        assert_eq!(lookups.load(Ordering::SeqCst), 1);
        assert_eq!(
            cache.tenant("known", || lookup(None)).await,
            Ok(Some(tenant))
        );
        assert_eq!(lookups.load(Ordering::SeqCst), 1, "a known key is cached");

        // A failed lookup is not cached: the next request looks again.
        let failing = async { Err::<Option<Uuid>, ()>(()) };
        assert_eq!(cache.tenant("flaky", || failing).await, Err(()));
        assert_eq!(
            cache.tenant("flaky", || lookup(Some(tenant))).await,
            Ok(Some(tenant))
        );
        // Neither is an unknown key: a key created a moment later works at once.
        assert_eq!(cache.tenant("new", || lookup(None)).await, Ok(None));
        assert_eq!(
            cache.tenant("new", || lookup(Some(tenant))).await,
            Ok(Some(tenant))
        );
    }
}
