//! Who is calling: `Authorization: Bearer <api key>`, or the dashboard's session cookie (a
//! browser's EventSource cannot send headers). Keys and session tokens are stored as sha256
//! hashes.

use axum::{
    extract::FromRequestParts,
    http::{request::Parts, HeaderMap, StatusCode},
};
use axum_extra::extract::CookieJar;
use sha2::{Digest, Sha256};
use shared::Problem;
use sqlx::PgPool;
use std::{
    future::Future,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};
use tower_http::request_id::RequestId;
use uuid::Uuid;

use crate::{keys::Role, revocation::Invalidation, AppState};

/// The tenant the request's API key (or session) belongs to.
#[derive(Clone, Copy, Debug)]
pub struct Tenant(pub Uuid);

/// The live key behind a request: its own, or the one its session was opened with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: Uuid,
    pub tenant: Uuid,
    pub role: Role,
}

/// What the request signed in with, to check again later (an open event stream does).
#[derive(Clone)]
pub enum Credential {
    /// The sha256 of an API key.
    Key(String),
    /// The sha256 of a session token.
    Session(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Key(_) => "Key(..)",
            Self::Session(_) => "Session(..)",
        })
    }
}

/// The caller: its key and how it signed in.
#[derive(Clone, Debug)]
pub struct Caller {
    pub key: KeyInfo,
    pub credential: Credential,
    /// The request's `x-request-id`, for the audit log.
    pub request_id: Option<String>,
}

impl Caller {
    /// 403 unless the caller's key has `needed` (or a higher role).
    pub fn require(&self, needed: Role) -> Result<(), Problem> {
        if self.key.role >= needed {
            return Ok(());
        }
        let mut problem = Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "needs {} {needed} key; this key is {}",
                if needed == Role::Admin { "an" } else { "a" },
                self.key.role
            ),
        );
        problem.errors = vec![shared::FieldError::new(
            "role",
            format!("{needed} needed, {} given", self.key.role),
        )];
        Err(problem)
    }

    /// Whether `invalidation` ends this caller's access, without asking the database.
    pub fn ended_by(&self, invalidation: &Invalidation) -> bool {
        match (invalidation, &self.credential) {
            (Invalidation::Key { id, .. }, _) => *id == self.key.id,
            (
                Invalidation::Session {
                    token_hash: ended, ..
                },
                Credential::Session(token_hash),
            ) => ended == token_hash,
            _ => false,
        }
    }

    /// Whether the caller's key (and session) is still live.
    pub async fn still_valid(&self, state: &AppState) -> Result<bool, Problem> {
        Ok(match &self.credential {
            Credential::Key(hash) => key_by_hash(state, hash).await?.is_some(),
            Credential::Session(token_hash) => {
                session_key(&state.pool, token_hash).await?.is_some()
            }
        })
    }
}

/// A caller whose key is an admin key (keys and the audit log need one).
pub struct Admin(pub Caller);

/// A caller whose key may change things: a write or admin key (a read key gets 403).
pub struct Writer(pub Caller);

impl Writer {
    pub fn tenant(&self) -> Tenant {
        Tenant(self.0.key.tenant)
    }

    /// Records the change in the audit log, as this caller; in the change's transaction.
    pub async fn audit(
        &self,
        db: impl sqlx::PgExecutor<'_>,
        entry: crate::audit::Entry,
    ) -> sqlx::Result<()> {
        crate::audit::record(db, &crate::audit::Actor::from(&self.0), entry).await
    }
}

/// The dashboard's session cookie (HttpOnly, SameSite=Strict, Path=/).
pub const SESSION_COOKIE: &str = "conveyor_session";
/// A request authenticated by the cookie that changes something must carry this header. A
/// cross-site form cannot set it, and a cross-site script cannot send it without a CORS
/// preflight this API never grants: a second wall behind SameSite=Strict.
pub const CSRF_HEADER: &str = "x-conveyor-csrf";

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Problem> {
        let Some(header) = parts.headers.get(axum::http::header::AUTHORIZATION) else {
            let jar = CookieJar::from_headers(&parts.headers);
            let token = session_token(&jar).ok_or_else(|| {
                Problem::unauthorized(
                    "missing Authorization: Bearer <api key> (or a session cookie)",
                )
            })?;
            if !parts.method.is_safe() {
                require_csrf_header(&parts.headers)?;
            }
            let token_hash = hash_key(token);
            let key = state
                .key_cache
                .bounded(session_key(&state.pool, &token_hash))
                .await?
                .ok_or_else(|| Problem::unauthorized("the session has ended; sign in again"))?;
            return Ok(Self {
                key,
                credential: Credential::Session(token_hash),
                request_id: request_id(parts),
            });
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
        let key = key_by_hash(state, &hash)
            .await?
            .ok_or_else(|| Problem::unauthorized("unknown or revoked API key"))?;
        Ok(Self {
            key,
            credential: Credential::Key(hash),
            request_id: request_id(parts),
        })
    }
}

impl FromRequestParts<AppState> for Tenant {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Problem> {
        let caller = Caller::from_request_parts(parts, state).await?;
        Ok(Tenant(caller.key.tenant))
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Problem> {
        let caller = Caller::from_request_parts(parts, state).await?;
        caller.require(Role::Admin)?;
        Ok(Admin(caller))
    }
}

impl FromRequestParts<AppState> for Writer {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Problem> {
        let caller = Caller::from_request_parts(parts, state).await?;
        caller.require(Role::Write)?;
        Ok(Writer(caller))
    }
}

/// The request's id (set by the `x-request-id` layer), as text.
pub fn request_id(parts: &Parts) -> Option<String> {
    parts
        .extensions
        .get::<RequestId>()
        .and_then(|id| id.header_value().to_str().ok())
        .map(str::to_owned)
}

/// The session cookie's token, if the request carries one.
pub fn session_token(jar: &CookieJar) -> Option<&str> {
    jar.get(SESSION_COOKIE)
        .map(|cookie| cookie.value())
        .filter(|token| !token.is_empty())
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

type KeyRow = (Uuid, Uuid, String);

fn key_info((id, tenant, role): KeyRow) -> KeyInfo {
    KeyInfo {
        id,
        tenant,
        // A role this build does not know grants the least.
        role: Role::parse(&role).unwrap_or(Role::Read),
    }
}

/// The key of a live session. Not cached: signing out must take effect at once, in every API
/// process.
async fn session_key(pool: &PgPool, token_hash: &str) -> Result<Option<KeyInfo>, sqlx::Error> {
    let row: Option<KeyRow> = sqlx::query_as(
        "SELECT k.id, k.tenant_id, k.role FROM sessions s JOIN api_keys k ON k.id = s.api_key_id
         WHERE s.token_hash = $1 AND s.expires_at > now() AND k.revoked_at IS NULL",
    )
    .bind(token_hash)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(key_info))
}

/// The live key with this hash, from the cache or PostgreSQL.
async fn key_by_hash(state: &AppState, hash: &str) -> Result<Option<KeyInfo>, Problem> {
    // `last_used_at` is written at most once a minute per key, and only on a cache miss.
    let lookup = || async {
        let row: Option<KeyRow> = sqlx::query_as(
            "WITH key AS (SELECT id, tenant_id, role, last_used_at FROM api_keys
                          WHERE key_hash = $1 AND revoked_at IS NULL),
                  touched AS (UPDATE api_keys k SET last_used_at = now() FROM key
                              WHERE k.id = key.id AND (key.last_used_at IS NULL
                                    OR key.last_used_at < now() - interval '1 minute'))
             SELECT id, tenant_id, role FROM key",
        )
        .bind(hash)
        .fetch_optional(&state.pool)
        .await?;
        Ok(row.map(key_info))
    };
    state.key_cache.key(hash, lookup).await
}

/// Known keys for a short while, so a request costs no extra database round trip. A revoked
/// key is dropped when the revocation reaches this process ([`crate::revocation`]); the TTL is
/// the backstop for a message lost on the way. The cache is only trusted while this process is
/// subscribed to revocations: otherwise every request looks its key up. Requests that miss at
/// the same time share one lookup (moka's `try_get_with`): thousands of dashboards and CLIs
/// reconnecting after an API restart cost one query per key, not one each. Unknown keys, failed
/// lookups and lookups that overlapped an invalidation are not remembered.
pub struct KeyCache {
    keys: moka::future::Cache<String, KeyInfo>,
    trusted: AtomicBool,
    /// Moves on at every invalidation: a lookup that began before one of its key (or before a
    /// clear) may have read it just revoked, so its answer is given but not kept.
    generation: AtomicU64,
    invalidations: std::sync::Mutex<Invalidations>,
    /// Lookups of keys not cached, at once: each made-up key (no credential is needed to send
    /// one) is a database round trip on the pool every tenant's requests share.
    lookups: tokio::sync::Semaphore,
}

/// The latest invalidations, by generation: what a lookup that began at an earlier one
/// missed. Bounded; a lookup older than what is kept counts as having missed its key's.
#[derive(Default)]
struct Invalidations {
    /// (generation, the key forgotten; `None`: all of them).
    recent: std::collections::VecDeque<(u64, Option<Uuid>)>,
    /// The newest generation dropped from `recent`.
    dropped: u64,
}

impl Invalidations {
    const KEPT: usize = 1024;

    fn push(&mut self, generation: u64, key: Option<Uuid>) {
        if self.recent.len() == Self::KEPT {
            if let Some((oldest, _)) = self.recent.pop_front() {
                self.dropped = oldest;
            }
        }
        self.recent.push_back((generation, key));
    }

    /// Whether `key`, looked up from generation `since`, may have been revoked meanwhile.
    fn missed(&self, since: u64, key: Uuid) -> bool {
        self.dropped > since
            || self
                .recent
                .iter()
                .rev()
                .take_while(|(generation, _)| *generation > since)
                .any(|(_, forgotten)| forgotten.is_none_or(|id| id == key))
    }
}

/// Why a lookup's answer is not kept (shared by every request waiting on it).
enum Uncached<E> {
    Unknown,
    Stale(KeyInfo),
    Failed(E),
}

impl Default for KeyCache {
    fn default() -> Self {
        Self::new(Self::TTL)
    }
}

impl KeyCache {
    pub const TTL: Duration = Duration::from_secs(30);
    const MAX: u64 = 10_000;
    /// Uncached lookups at once: half the API's database pool.
    const LOOKUPS: usize = 8;

    pub fn new(ttl: Duration) -> Self {
        Self {
            keys: moka::future::Cache::builder()
                .max_capacity(Self::MAX)
                .time_to_live(ttl)
                .support_invalidation_closures()
                .build(),
            trusted: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            invalidations: Default::default(),
            lookups: tokio::sync::Semaphore::new(Self::LOOKUPS),
        }
    }

    /// `lookup`, once one of the [`Self::LOOKUPS`] permits is free (sessions' lookups too).
    pub(crate) async fn bounded<T>(&self, lookup: impl Future<Output = T>) -> T {
        let _permit = self
            .lookups
            .acquire()
            .await
            .expect("the semaphore is never closed");
        lookup.await
    }

    /// The live key with this hash: cached, or from `lookup`, called only on a miss and once
    /// for all the requests waiting on the same key (they all get its answer, or its error).
    pub async fn key<E, F>(
        &self,
        hash: &str,
        lookup: impl FnOnce() -> F,
    ) -> Result<Option<KeyInfo>, E>
    where
        E: Clone + Send + Sync + 'static,
        F: Future<Output = Result<Option<KeyInfo>, E>>,
    {
        if !self.trusted.load(Ordering::Acquire) {
            return self.bounded(lookup()).await;
        }
        let generation = self.generation.load(Ordering::Acquire);
        let load = async {
            match self.bounded(lookup()).await {
                Ok(Some(key)) if !self.missed(generation, key.id) => Ok(key),
                Ok(Some(key)) => Err(Uncached::Stale(key)),
                Ok(None) => Err(Uncached::Unknown),
                Err(e) => Err(Uncached::Failed(e)),
            }
        };
        match self.keys.try_get_with_by_ref(hash, load).await {
            Ok(key) => {
                // An invalidation between the check above and the insertion: what was kept
                // may be stale.
                if self.missed(generation, key.id) {
                    self.keys.invalidate(hash).await;
                }
                Ok(Some(key))
            }
            Err(uncached) => match &*uncached {
                Uncached::Unknown => Ok(None),
                Uncached::Stale(key) => Ok(Some(*key)),
                Uncached::Failed(e) => Err(e.clone()),
            },
        }
    }

    /// Drops the key with this id, and the lookups of it still running: one may have read the
    /// key before it was revoked. (Those requests still get their answer; it is just not kept.)
    /// Lookups of other keys are kept: a tenant revoking keys in a loop must not stop every
    /// tenant's keys from being cached.
    pub fn forget(&self, id: Uuid) {
        self.invalidated(Some(id));
        self.keys
            .invalidate_entries_if(move |_, key| key.id == id)
            .expect("the key cache supports invalidation closures");
    }

    pub fn clear(&self) {
        self.invalidated(None);
        self.keys.invalidate_all();
    }

    fn invalidated(&self, key: Option<Uuid>) {
        let mut invalidations = self.invalidations.lock().expect("invalidations lock");
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        invalidations.push(generation, key);
    }

    /// Whether a lookup of `key` that began at generation `since` overlapped its revocation.
    fn missed(&self, since: u64, key: Uuid) -> bool {
        self.generation.load(Ordering::Acquire) != since
            && self
                .invalidations
                .lock()
                .expect("invalidations lock")
                .missed(since, key)
    }

    /// Whether revocations reach this process, so that cached keys may be trusted. Either way
    /// the cache starts empty: what it held may have been revoked meanwhile. Returns whether
    /// it was trusted before.
    pub fn set_trusted(&self, trusted: bool) -> bool {
        let was = self.trusted.swap(trusted, Ordering::AcqRel);
        self.clear();
        was
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{atomic::AtomicUsize, Arc};

    fn key() -> KeyInfo {
        KeyInfo {
            id: Uuid::now_v7(),
            tenant: Uuid::now_v7(),
            role: Role::Write,
        }
    }

    fn trusted() -> Arc<KeyCache> {
        let cache = Arc::new(KeyCache::default());
        cache.set_trusted(true);
        cache
    }

    #[tokio::test]
    async fn requests_missing_together_share_one_lookup_and_unknown_keys_are_not_kept() {
        let cache = trusted();
        let lookups = Arc::new(AtomicUsize::new(0));
        let known = key();
        let lookup = |found: Option<KeyInfo>| {
            let lookups = lookups.clone();
            async move {
                lookups.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<_, ()>(found)
            }
        };
        let waiting: Vec<_> = (0..50)
            .map(|_| {
                let (cache, lookup) = (cache.clone(), lookup(Some(known)));
                tokio::spawn(async move { cache.key("known", || lookup).await })
            })
            .collect();
        for request in waiting {
            assert_eq!(request.await.unwrap(), Ok(Some(known)));
        }
        assert_eq!(lookups.load(Ordering::SeqCst), 1);
        assert_eq!(cache.key("known", || lookup(None)).await, Ok(Some(known)));
        assert_eq!(lookups.load(Ordering::SeqCst), 1, "a known key is cached");

        // A failed lookup is not cached: the next request looks again.
        let failing = async { Err::<Option<KeyInfo>, ()>(()) };
        assert_eq!(cache.key("flaky", || failing).await, Err(()));
        assert_eq!(
            cache.key("flaky", || lookup(Some(known))).await,
            Ok(Some(known))
        );
        // Neither is an unknown key: a key created a moment later works at once.
        assert_eq!(cache.key("new", || lookup(None)).await, Ok(None));
        assert_eq!(
            cache.key("new", || lookup(Some(known))).await,
            Ok(Some(known))
        );
    }

    /// A cold key requested by many callers at once, on several threads, costs one lookup.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_requests_for_a_cold_key_cause_one_lookup() {
        const REQUESTS: usize = 200;
        let cache = trusted();
        let lookups = Arc::new(AtomicUsize::new(0));
        let known = key();
        let start = Arc::new(tokio::sync::Barrier::new(REQUESTS));
        let requests: Vec<_> = (0..REQUESTS)
            .map(|_| {
                let (cache, lookups, start) = (cache.clone(), lookups.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    cache
                        .key("cold", || async move {
                            lookups.fetch_add(1, Ordering::SeqCst);
                            // As long as a database round trip under load.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            Ok::<_, ()>(Some(known))
                        })
                        .await
                })
            })
            .collect();
        for request in requests {
            assert_eq!(request.await.unwrap(), Ok(Some(known)));
        }
        assert_eq!(lookups.load(Ordering::SeqCst), 1);
    }

    /// Made-up keys (anyone can send one) are looked up a bounded number at a time: each was
    /// a database round trip on the pool every tenant shares, as many at once as requests.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn lookups_of_uncached_keys_run_a_bounded_number_at_once() {
        for cache in [trusted(), Arc::new(KeyCache::default())] {
            let (active, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
            let requests: Vec<_> = (0..64)
                .map(|i| {
                    let (cache, active, most) = (cache.clone(), active.clone(), most.clone());
                    tokio::spawn(async move {
                        cache
                            .key(&format!("made-up-{i}"), || async move {
                                let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                                most.fetch_max(now, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                active.fetch_sub(1, Ordering::SeqCst);
                                Ok::<_, ()>(None)
                            })
                            .await
                    })
                })
                .collect();
            for request in requests {
                assert_eq!(request.await.unwrap(), Ok(None));
            }
            let most = most.load(Ordering::SeqCst);
            assert!(most <= KeyCache::LOOKUPS, "{most} lookups at once");
        }
    }

    #[tokio::test]
    async fn a_cached_key_is_looked_up_again_after_its_ttl() {
        let cache = Arc::new(KeyCache::new(Duration::from_millis(300)));
        cache.set_trusted(true);
        let lookups = Arc::new(AtomicUsize::new(0));
        let known = key();
        let lookup = || {
            let lookups = lookups.clone();
            async move {
                lookups.fetch_add(1, Ordering::SeqCst);
                Ok::<_, ()>(Some(known))
            }
        };
        assert_eq!(cache.key("k", lookup).await, Ok(Some(known)));
        assert_eq!(cache.key("k", lookup).await, Ok(Some(known)));
        assert_eq!(lookups.load(Ordering::SeqCst), 1, "cached within the TTL");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(cache.key("k", lookup).await, Ok(Some(known)));
        assert_eq!(
            lookups.load(Ordering::SeqCst),
            2,
            "looked up again after it"
        );
    }

    #[tokio::test]
    async fn a_forgotten_key_is_looked_up_again_and_an_untrusted_cache_keeps_nothing() {
        let cache = trusted();
        let (revoked, other) = (key(), key());
        let found = |key: Option<KeyInfo>| move || async move { Ok::<_, ()>(key) };
        assert_eq!(
            cache.key("a", found(Some(revoked))).await,
            Ok(Some(revoked))
        );
        assert_eq!(cache.key("b", found(Some(other))).await, Ok(Some(other)));
        cache.forget(revoked.id);
        assert_eq!(cache.key("a", found(None)).await, Ok(None));
        assert_eq!(cache.key("b", found(None)).await, Ok(Some(other)), "kept");

        // A lookup that began before the revocation answers its requests but is not kept.
        let answer = lookup_during(&cache, "c", revoked, || cache.forget(revoked.id)).await;
        assert_eq!(answer, Ok(Some(revoked)));
        assert_eq!(cache.key("c", found(None)).await, Ok(None));

        // Without a subscription every request looks its key up.
        cache.set_trusted(false);
        assert_eq!(cache.key("b", found(None)).await, Ok(None));
        assert_eq!(cache.key("b", found(Some(other))).await, Ok(Some(other)));
        assert_eq!(cache.key("b", found(None)).await, Ok(None));
    }

    /// A revocation of one key leaves a lookup of another kept: a tenant revoking keys in a
    /// loop made every key of every tenant a database round trip. Past the invalidations the
    /// cache remembers, a lookup is not kept.
    #[tokio::test]
    async fn a_revocation_leaves_lookups_of_other_keys_kept() {
        let cache = trusted();
        let kept = key();
        let found = |key: Option<KeyInfo>| move || async move { Ok::<_, ()>(key) };
        let revocations = |n: usize| {
            let cache = cache.clone();
            move || {
                for _ in 0..n {
                    cache.forget(Uuid::now_v7());
                }
            }
        };
        let answer = lookup_during(&cache, "a", kept, revocations(3)).await;
        assert_eq!(answer, Ok(Some(kept)));
        assert_eq!(cache.key("a", found(None)).await, Ok(Some(kept)), "kept");
        let answer = lookup_during(&cache, "b", kept, revocations(Invalidations::KEPT + 1)).await;
        assert_eq!(answer, Ok(Some(kept)));
        assert_eq!(cache.key("b", found(None)).await, Ok(None), "not kept");
    }

    /// Looks `hash` up (finding `found`) and runs `meanwhile` while the lookup is in flight:
    /// the answer.
    async fn lookup_during(
        cache: &Arc<KeyCache>,
        hash: &'static str,
        found: KeyInfo,
        meanwhile: impl FnOnce(),
    ) -> Result<Option<KeyInfo>, ()> {
        let (started, finish) = (
            Arc::new(tokio::sync::Notify::new()),
            Arc::new(tokio::sync::Notify::new()),
        );
        let pending = {
            let (cache, started, finish) = (cache.clone(), started.clone(), finish.clone());
            tokio::spawn(async move {
                cache
                    .key(hash, || async move {
                        started.notify_one();
                        finish.notified().await;
                        Ok::<_, ()>(Some(found))
                    })
                    .await
            })
        };
        started.notified().await;
        meanwhile();
        finish.notify_one();
        pending.await.unwrap()
    }
}
