//! Revocations reach every API process within moments: whoever revokes a key or ends a session
//! publishes it on a Redis pub/sub channel, and each process drops the key from its cache and
//! ends the event streams opened with it.
//!
//! Pub/sub delivers only to those subscribed at the time, so a process trusts its key cache only
//! while its subscription is known to be up: until it has subscribed, and from the moment the
//! connection fails (or stops answering pings), it looks every key up in PostgreSQL; on
//! resubscribing it starts from an empty cache and has its streams check their credentials
//! again. A message lost on a connection still up is covered by the cache's TTL.

use futures::StreamExt;
use redis::aio::ConnectionLike;
use shared::events::StreamKeys;
use std::{sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{auth::KeyCache, hub::Hub, AppState};

/// How often the subscription is checked with a PING, and how long the answer may take: a
/// connection that died without closing is noticed within their sum.
const PING_EVERY: Duration = Duration::from_secs(2);
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between attempts to subscribe again, or (times the attempt) to publish.
const RETRY: Duration = Duration::from_millis(500);
const PUBLISH_ATTEMPTS: u32 = 3;

/// What stopped being valid, and whose event streams it concerns: a tenant's (`None`: every
/// tenant's, as for an operator's revocation or word from an older process).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invalidation {
    /// This key was revoked (so are the sessions opened with it).
    Key { id: Uuid, tenant: Option<Uuid> },
    /// The session with this token hash ended (signed out).
    Session {
        token_hash: String,
        tenant: Option<Uuid>,
    },
    /// Anything may have changed: check everything again.
    All,
}

impl Invalidation {
    /// The tenant whose streams are told; `None`: every tenant's.
    pub fn tenant(&self) -> Option<Uuid> {
        match self {
            Self::Key { tenant, .. } | Self::Session { tenant, .. } => *tenant,
            Self::All => None,
        }
    }

    /// `key:<id>[:<tenant>]`, `session:<hash>[:<tenant>]`, `all`: a process that reads only
    /// the first two parts (an older one) reads the tenant's word as everything.
    fn encode(&self) -> String {
        let tenant = self.tenant().map(|t| format!(":{t}")).unwrap_or_default();
        match self {
            Self::Key { id, .. } => format!("key:{id}{tenant}"),
            Self::Session { token_hash, .. } => format!("session:{token_hash}{tenant}"),
            Self::All => "all".to_owned(),
        }
    }

    /// An unreadable message stands for everything: it cannot make a process trust more.
    fn decode(message: &str) -> Self {
        let mut parts = message.splitn(3, ':');
        let (kind, what) = (parts.next(), parts.next());
        let tenant = match parts.next().map(str::parse) {
            None => None,
            Some(Ok(tenant)) => Some(tenant),
            Some(Err(_)) => return Self::All,
        };
        match (kind, what) {
            (Some("key"), Some(id)) => id.parse().map_or(Self::All, |id| Self::Key { id, tenant }),
            (Some("session"), Some(token_hash)) => Self::Session {
                token_hash: token_hash.to_owned(),
                tenant,
            },
            _ => Self::All,
        }
    }
}

pub fn channel(redis_prefix: &str) -> String {
    format!("{redis_prefix}:auth:invalidations")
}

/// Tells every API process subscribed to `redis_prefix`'s channel.
pub async fn publish<C: ConnectionLike + Send>(
    conn: &mut C,
    redis_prefix: &str,
    invalidation: &Invalidation,
) -> redis::RedisResult<()> {
    redis::cmd("PUBLISH")
        .arg(channel(redis_prefix))
        .arg(invalidation.encode())
        .exec_async(conn)
        .await
}

/// Applies `invalidation` in this process at once, then tells the others. If Redis cannot be
/// reached, the others stop trusting the key when their cache entry expires (or at once if
/// they lost Redis too).
pub async fn invalidate(state: &AppState, invalidation: Invalidation) {
    apply(
        &state.key_cache,
        &state.hub,
        state.events.keys(),
        &invalidation,
    );
    let mut redis = state.redis.clone();
    // After a Redis restart the first command on the shared connection fails, and the
    // connection manager reconnects: try again before giving up.
    for attempt in 1..=PUBLISH_ATTEMPTS {
        match publish(&mut redis, &state.settings.redis_prefix, &invalidation).await {
            Ok(()) => return,
            Err(e) if attempt == PUBLISH_ATTEMPTS => {
                tracing::warn!(error = %e, "could not publish a revocation; other API processes drop the key when its cache entry expires");
            }
            Err(_) => tokio::time::sleep(RETRY * attempt).await,
        }
    }
}

fn apply(cache: &KeyCache, hub: &Hub, keys: &StreamKeys, invalidation: &Invalidation) {
    match invalidation {
        Invalidation::Key { id, .. } => cache.forget(*id),
        Invalidation::Session { .. } => {}
        Invalidation::All => cache.clear(),
    }
    // Only the tenant's own streams wake: a tenant signing in and out in a loop woke every
    // stream of every tenant, each reading Redis again.
    let feed = invalidation.tenant().map(|tenant| keys.tenant(tenant));
    hub.invalidate(invalidation, feed.as_deref());
}

/// Keeps this process subscribed until `stopping`.
pub async fn listen(
    client: shared::redis_conn::Redis,
    redis_prefix: String,
    cache: Arc<KeyCache>,
    hub: Arc<Hub>,
    stopping: CancellationToken,
) {
    let channel = channel(&redis_prefix);
    let keys = StreamKeys::new(&redis_prefix);
    loop {
        let ended = tokio::select! {
            ended = subscribe(&client, &channel, &cache, &hub, &keys) => ended,
            () = stopping.cancelled() => return,
        };
        if cache.set_trusted(false) {
            tracing::warn!(error = %ended, "revocation subscription lost; keys are looked up on every request until it is back");
        } else {
            tracing::debug!(error = %ended, "could not subscribe to revocations; retrying");
        }
        tokio::select! {
            () = tokio::time::sleep(RETRY) => {}
            () = stopping.cancelled() => return,
        }
    }
}

/// One subscription, for as long as it lasts; returns why it ended.
async fn subscribe(
    client: &shared::redis_conn::Redis,
    channel: &str,
    cache: &KeyCache,
    hub: &Hub,
    keys: &StreamKeys,
) -> anyhow::Error {
    let connect = async {
        let pubsub = tokio::time::timeout(PING_TIMEOUT, async {
            client.client().await?.get_async_pubsub().await
        })
        .await??;
        let (mut sink, messages) = pubsub.split();
        sink.subscribe(channel).await?;
        anyhow::Ok((sink, messages))
    };
    let (mut sink, mut messages) = match connect.await {
        Ok(subscribed) => subscribed,
        Err(e) => return e,
    };
    // Whatever was published while unsubscribed is unknown: start afresh.
    cache.set_trusted(true);
    hub.invalidate(&Invalidation::All, None);
    let mut ping = tokio::time::interval(PING_EVERY);
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else {
                    return anyhow::anyhow!("the connection closed");
                };
                let payload: String = message.get_payload().unwrap_or_default();
                apply(cache, hub, keys, &Invalidation::decode(&payload));
            }
            _ = ping.tick() => {
                match tokio::time::timeout(PING_TIMEOUT, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return e.into(),
                    Err(_) => return anyhow::anyhow!("no answer to PING within {PING_TIMEOUT:?}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_unreadable_ones_mean_everything() {
        let (id, tenant) = (Uuid::now_v7(), Some(Uuid::now_v7()));
        for invalidation in [
            Invalidation::Key { id, tenant },
            Invalidation::Key { id, tenant: None },
            Invalidation::Session {
                token_hash: "ab12".into(),
                tenant,
            },
            Invalidation::All,
        ] {
            assert_eq!(Invalidation::decode(&invalidation.encode()), invalidation);
        }
        assert_eq!(Invalidation::decode("key:not-a-uuid"), Invalidation::All);
        assert_eq!(
            Invalidation::decode(&format!("key:{id}:x")),
            Invalidation::All
        );
        assert_eq!(Invalidation::decode("something new"), Invalidation::All);
    }

    /// A session's end wakes its tenant's streams only: any read key could sign in and out
    /// in a loop and wake every stream of every tenant, each reading Redis again.
    #[tokio::test]
    async fn word_of_a_tenants_revocation_reaches_only_its_streams() {
        use tokio::sync::broadcast::error::TryRecvError;
        let url = std::env::var("CONVEYOR_REDIS_URL").unwrap_or("redis://127.0.0.1:6379".into());
        let client = shared::redis_conn::Redis::open(&url).unwrap();
        let stopping = CancellationToken::new();
        let hub = Arc::new(Hub::new(client, stopping.clone()));
        let keys = StreamKeys::new(&format!("test:{}", Uuid::new_v4().simple()));
        let (ours, theirs) = (Uuid::now_v7(), Uuid::now_v7());
        let (job, other_job) = (Uuid::now_v7(), Uuid::now_v7());
        let mut our_streams = [
            hub.subscribe(&keys.tenant(ours), None),
            hub.subscribe(&keys.tenant(ours), Some(job)),
        ];
        let mut their_streams = [
            hub.subscribe(&keys.tenant(theirs), None),
            hub.subscribe(&keys.tenant(theirs), Some(other_job)),
        ];
        let cache = KeyCache::new(KeyCache::TTL);
        let signed_out = Invalidation::Session {
            token_hash: "ab12".into(),
            tenant: Some(ours),
        };
        apply(&cache, &hub, &keys, &signed_out);
        for stream in &mut our_streams {
            let told = stream
                .batches
                .try_recv()
                .expect("word of the session's end");
            assert_eq!(told.invalidation.as_ref(), Some(&signed_out));
        }
        for stream in &mut their_streams {
            assert!(matches!(
                stream.batches.try_recv(),
                Err(TryRecvError::Empty)
            ));
        }
        // Word of unknown origin (an operator's, an older process's) reaches everyone.
        apply(&cache, &hub, &keys, &Invalidation::All);
        for stream in our_streams.iter_mut().chain(&mut their_streams) {
            assert!(stream.batches.try_recv().is_ok());
        }
        stopping.cancel();
    }
}
