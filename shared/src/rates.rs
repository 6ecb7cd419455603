//! Submission rates: a token bucket per tenant, and one per key that has a rate of its own,
//! kept in Redis so that every API process and the schedules' leader draw on the same ones.
//!
//! The bucket is GCRA (the generic cell rate algorithm): one Redis key holds the time at which
//! the bucket will be full again, read and moved by one script against Redis' clock, so
//! processes with skewed clocks still agree.

use crate::{redis_conn::RedisConn, settings::RateLimit, Settings};
use serde::Serialize;
use sqlx::PgExecutor;
use utoipa::ToSchema;
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, ToSchema)]
pub struct Rate {
    pub per_sec: f64,
    pub burst: u32,
}

impl Rate {
    /// From a row's `rate_per_sec` and `rate_burst` (burst absent: a second's worth).
    pub fn from_columns(per_sec: Option<f64>, burst: Option<i32>) -> Option<Self> {
        per_sec.map(|per_sec| Self {
            per_sec,
            burst: burst.map_or(per_sec.ceil().max(1.0) as u32, |b| b.max(0) as u32),
        })
    }

    /// The tenant's rate: its own, else the deployment's default.
    pub fn of_tenant(
        per_sec: Option<f64>,
        burst: Option<i32>,
        default: Option<RateLimit>,
    ) -> Option<Self> {
        Self::from_columns(per_sec, burst).or(default.map(|r| Self {
            per_sec: r.per_sec,
            burst: r.burst,
        }))
    }
}

/// The buckets a submission draws on: the tenant's and its key's, where each has a rate.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rates {
    pub tenant: Option<Rate>,
    pub key: Option<(Uuid, Rate)>,
}

impl Rates {
    /// Read from the database: the tenant's rate (else `default`) and the key's own.
    pub async fn read(
        db: impl PgExecutor<'_>,
        tenant: Uuid,
        key: Option<Uuid>,
        default: Option<RateLimit>,
    ) -> sqlx::Result<Self> {
        let (tenant_per_sec, tenant_burst, key_per_sec, key_burst): (
            Option<f64>,
            Option<i32>,
            Option<f64>,
            Option<i32>,
        ) = sqlx::query_as(
            "SELECT t.rate_per_sec, t.rate_burst, k.rate_per_sec, k.rate_burst
             FROM (SELECT) one
             LEFT JOIN tenant_limits t ON t.tenant_id = $1
             LEFT JOIN api_keys k ON k.id = $2 AND k.tenant_id = $1",
        )
        .bind(tenant)
        .bind(key)
        .fetch_one(db)
        .await?;
        Ok(Self {
            tenant: Rate::of_tenant(tenant_per_sec, tenant_burst, default),
            key: key.zip(Rate::from_columns(key_per_sec, key_burst)),
        })
    }

    /// The most tokens one draw may take (`None`: no rate).
    pub fn burst(&self) -> Option<u32> {
        [self.tenant, self.key.map(|(_, rate)| rate)]
            .into_iter()
            .flatten()
            .map(|rate| rate.burst)
            .min()
    }
}

/// What a draw found, of the bucket that bound it: the first that refused, else the one with
/// the fewest tokens left.
#[derive(Clone, Copy, Debug)]
pub struct Drawn {
    /// `tenant` or `key`.
    pub bucket: &'static str,
    pub rate: Rate,
    pub allowed: bool,
    pub remaining: i64,
    /// Until the draw would be allowed.
    pub retry_us: i64,
    /// Until the bucket is full again.
    pub full_us: i64,
}

impl Drawn {
    /// Why `tokens` were refused.
    pub fn refusal(&self, tokens: usize) -> String {
        let (name, rate) = (self.bucket, self.rate);
        if tokens as u64 > u64::from(rate.burst) {
            format!(
                "a batch of {tokens} jobs exceeds the {name}'s submission burst of {}",
                rate.burst
            )
        } else {
            format!(
                "the {name}'s submission rate limit of {} jobs/s (burst {}) reached",
                rate.per_sec, rate.burst
            )
        }
    }
}

/// The buckets in Redis, under a deployment's prefix.
#[derive(Clone)]
pub struct Buckets {
    redis: RedisConn,
    prefix: String,
    /// For tenants without a rate of their own.
    default: Option<RateLimit>,
}

impl Buckets {
    pub fn new(redis: RedisConn, settings: &Settings) -> Self {
        Self {
            redis,
            prefix: settings.redis_prefix.clone(),
            default: settings.default_rate,
        }
    }

    /// The rates of `tenant` and of `key` as the database has them now.
    pub async fn rates(
        &self,
        db: impl PgExecutor<'_>,
        tenant: Uuid,
        key: Option<Uuid>,
    ) -> sqlx::Result<Rates> {
        Rates::read(db, tenant, key, self.default).await
    }

    /// Takes `tokens` from each of `rates`' buckets, all or none. `None` where no rate applies.
    pub async fn draw(
        &self,
        tenant: Uuid,
        rates: &Rates,
        tokens: usize,
    ) -> redis::RedisResult<Option<Drawn>> {
        // Both buckets under the tenant's hash tag: one script takes from both, which on a
        // Redis Cluster must touch one slot (a key belongs to one tenant).
        let buckets: Vec<(&'static str, String, Rate)> = [
            rates
                .tenant
                .map(|r| ("tenant", format!("{}:rate:{{{tenant}}}", self.prefix), r)),
            rates.key.map(|(key, r)| {
                (
                    "key",
                    format!("{}:rate:{{{tenant}}}:key:{key}", self.prefix),
                    r,
                )
            }),
        ]
        .into_iter()
        .flatten()
        .collect();
        if buckets.is_empty() {
            return Ok(None);
        }
        let mut invocation = GCRA.prepare_invoke();
        invocation.arg(tokens);
        for (_, bucket, rate) in &buckets {
            invocation
                .key(bucket)
                .arg((1e6 / rate.per_sec).max(1.0) as i64)
                .arg(rate.burst);
        }
        let mut conn = self.redis.clone();
        let (binding, allowed, remaining, retry_us, full_us): (usize, i64, i64, i64, i64) =
            invocation.invoke_async(&mut conn).await?;
        let (bucket, _, rate) = buckets[binding.clamp(1, buckets.len()) - 1];
        Ok(Some(Drawn {
            bucket,
            rate,
            allowed: allowed == 1,
            remaining: remaining.max(0),
            retry_us,
            full_us,
        }))
    }
}

/// KEYS: the buckets (each the time it is full again, µs). ARGV: tokens, then µs per token
/// and burst for each bucket. Takes the tokens from every bucket or from none. Returns
/// {binding bucket (1-based), allowed, tokens left, µs until allowed, µs until full}: the
/// first bucket that refuses, else the one with the fewest tokens left.
static GCRA: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
local taken = {}
local binding, fewest = 1, nil
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  local new_tat = tat + n * interval
  local allow_at = new_tat - burst * interval
  if allow_at > now then
    return {i, 0, math.floor((now - (tat - burst * interval)) / interval), allow_at - now, tat - now}
  end
  local left = math.floor((now - allow_at) / interval)
  taken[i] = {new_tat, left}
  if fewest == nil or left < fewest then binding, fewest = i, left end
end
for i = 1, #KEYS do
  local new_tat = taken[i][1]
  redis.call('SET', KEYS[i], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
end
return {binding, 1, fewest, 0, taken[binding][1] - now}
",
    )
});
