//! A tenant's limits (`tenant_limits`, else the deployment's defaults) and the submission rate
//! limit (`shared::rates`: token buckets in Redis that every API process draws on). Answers
//! carry the IETF httpapi draft's `RateLimit-Policy` and `RateLimit` headers; a refusal is a
//! 429 with `Retry-After`.

use axum::{
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, IntoResponseParts, Response, ResponseParts},
};
use serde::Serialize;
use serde_json::Value;
use shared::redis_conn::RedisConn;
use shared::{
    quotas::{self, OverQuota, Quotas},
    rates::{Buckets, Rates},
    settings::RateLimit,
    Problem, Settings,
};

pub use shared::rates::Rate;
use sqlx::PgPool;
use std::{collections::BTreeMap, sync::Arc, time::Duration};
use utoipa::ToSchema;
use uuid::Uuid;

/// What a tenant may do, its own limits over the deployment's defaults.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct TenantLimits {
    /// Jobs of a kind running at once, per kind (absent: `default_max_running`).
    pub max_running: BTreeMap<String, i64>,
    /// For kinds not in `max_running`; null: no cap.
    pub default_max_running: Option<i64>,
    /// Share of the slots against other tenants with work.
    pub weight: i32,
    /// Submissions: jobs per second and burst; null: no limit.
    pub rate: Option<Rate>,
    pub max_queued: Option<i64>,
    pub max_dataset_bytes: Option<i64>,
    pub max_chunks: Option<i64>,
    pub max_rows_per_day: Option<i64>,
    /// Days finished jobs are kept (0: forever); null: the deployment's setting.
    pub job_retention_days: Option<i32>,
}

#[derive(sqlx::FromRow)]
struct Row {
    max_running: Value,
    weight: i32,
    rate_per_sec: Option<f64>,
    rate_burst: Option<i32>,
    max_queued: Option<i64>,
    max_dataset_bytes: Option<i64>,
    max_chunks: Option<i64>,
    max_rows_per_day: Option<i64>,
    job_retention_days: Option<i32>,
}

/// Reads tenants' limits (cached for a few seconds: a change reaches every API process within
/// that) and keeps their submission buckets.
pub struct Limits {
    pool: PgPool,
    buckets: Buckets,
    defaults: Defaults,
    cache: moka::future::Cache<Uuid, Arc<TenantLimits>>,
    key_rates: moka::future::Cache<Uuid, Option<Rate>>,
}

#[derive(Clone, Copy)]
struct Defaults {
    max_running: Option<i64>,
    rate: Option<RateLimit>,
}

impl Limits {
    pub fn new(pool: PgPool, redis: RedisConn, settings: &Settings) -> Self {
        Self {
            pool,
            buckets: Buckets::new(redis, settings),
            defaults: Defaults {
                max_running: settings.default_max_running,
                rate: settings.default_rate,
            },
            cache: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(5))
                .build(),
            key_rates: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(5))
                .build(),
        }
    }

    pub async fn of(&self, tenant: Uuid) -> Result<Arc<TenantLimits>, Problem> {
        self.cache
            .try_get_with(tenant, async { self.load(tenant).await.map(Arc::new) })
            .await
            .map_err(|e| (*e).clone())
    }

    /// Straight from the database (after a change, say).
    pub async fn load(&self, tenant: Uuid) -> Result<TenantLimits, Problem> {
        let row: Option<Row> = sqlx::query_as("SELECT * FROM tenant_limits WHERE tenant_id = $1")
            .bind(tenant)
            .fetch_optional(&self.pool)
            .await?;
        let defaults = self.defaults;
        let default_rate = Rate::of_tenant(None, None, defaults.rate);
        let Some(row) = row else {
            return Ok(TenantLimits {
                max_running: BTreeMap::new(),
                default_max_running: defaults.max_running,
                weight: 1,
                rate: default_rate,
                max_queued: None,
                max_dataset_bytes: None,
                max_chunks: None,
                max_rows_per_day: None,
                job_retention_days: None,
            });
        };
        let max_running = row
            .max_running
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_i64()?)))
                    .collect()
            })
            .unwrap_or_default();
        let rate = Rate::of_tenant(row.rate_per_sec, row.rate_burst, defaults.rate);
        Ok(TenantLimits {
            max_running,
            default_max_running: defaults.max_running,
            weight: row.weight,
            rate,
            max_queued: row.max_queued,
            max_dataset_bytes: row.max_dataset_bytes,
            max_chunks: row.max_chunks,
            max_rows_per_day: row.max_rows_per_day,
            job_retention_days: row.job_retention_days,
        })
    }

    /// A key's own submission rate (`conveyor-api keys set-rate`), cached like the tenant's.
    async fn key_rate(&self, key: Uuid) -> Result<Option<Rate>, Problem> {
        self.key_rates
            .try_get_with(key, async {
                let row: Option<(Option<f64>, Option<i32>)> =
                    sqlx::query_as("SELECT rate_per_sec, rate_burst FROM api_keys WHERE id = $1")
                        .bind(key)
                        .fetch_optional(&self.pool)
                        .await?;
                Ok::<_, Problem>(
                    row.and_then(|(per_sec, burst)| Rate::from_columns(per_sec, burst)),
                )
            })
            .await
            .map_err(|e| (*e).clone())
    }

    /// The buckets a submission with `key` draws on.
    async fn rates(&self, tenant: Uuid, key: Uuid) -> Result<Rates, Problem> {
        let limits = self.of(tenant).await?;
        let key_rate = self.key_rate(key).await?;
        Ok(Rates {
            tenant: limits.rate,
            key: key_rate.map(|rate| (key, rate)),
        })
    }

    /// The most tokens one request may draw: the smallest burst of the tenant's bucket and the
    /// key's (`None`: no rate). A request for more is refused whatever it waits.
    pub async fn burst(&self, tenant: Uuid, key: Uuid) -> Result<Option<u32>, Problem> {
        Ok(self.rates(tenant, key).await?.burst())
    }

    /// Takes `jobs` tokens from the tenant's bucket and, if the key has a rate of its own,
    /// from the key's, both or neither: the headers to send with the answer (of the bucket
    /// with the fewest tokens left), or the 429 to send instead. Without a rate limit, no
    /// headers. If Redis cannot answer, the submission goes through (the queue itself needs
    /// Redis; refusing here would add nothing).
    pub async fn admit(
        &self,
        tenant: Uuid,
        key: Uuid,
        jobs: usize,
    ) -> Result<RateHeaders, Response> {
        let rates = self
            .rates(tenant, key)
            .await
            .map_err(IntoResponse::into_response)?;
        let drawn = match self.buckets.draw(tenant, &rates, jobs).await {
            Ok(Some(drawn)) => drawn,
            Ok(None) => return Ok(RateHeaders::default()),
            Err(e) => {
                tracing::warn!(error = %e, "rate limit unavailable; admitting");
                return Ok(RateHeaders::default());
            }
        };
        let headers = RateHeaders::new(drawn.bucket, drawn.rate, drawn.remaining, drawn.full_us);
        if drawn.allowed {
            return Ok(headers);
        }
        let advice = if jobs as u64 > u64::from(drawn.rate.burst) {
            "send smaller batches"
        } else {
            "retry after the time in Retry-After"
        };
        let detail = format!("{}; {advice}", drawn.refusal(jobs));
        let mut response = Problem::too_many_requests(detail).into_response();
        let retry_after = (drawn.retry_us as f64 / 1e6).ceil().max(1.0) as u64;
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from(retry_after));
        headers.write(response.headers_mut());
        Err(response)
    }
}

pub use shared::quotas::TenantUsage;

impl Limits {
    pub async fn usage(&self, tenant: Uuid) -> Result<TenantUsage, Problem> {
        let mut conn = self.pool.acquire().await?;
        Ok(quotas::usage(&mut conn, tenant).await?)
    }

    /// 403 when the jobs of these kinds would take the tenant past a quota (see
    /// [`quotas::check`]), before the work of a submission. Submissions racing each other may
    /// pass it together: [`hold_queued_room`] checks `max_queued` again where the jobs
    /// are written.
    pub async fn check_quotas(&self, tenant: Uuid, kinds: &[&str]) -> Result<(), Problem> {
        self.check(tenant, kinds, true).await
    }

    /// The quotas on what jobs of `kinds` add (chunks, rows imported a day), not on how many
    /// are queued (a bulk retry takes only the room `max_queued` leaves).
    pub async fn check_output_quotas(&self, tenant: Uuid, kinds: &[&str]) -> Result<(), Problem> {
        self.check(tenant, kinds, false).await
    }

    async fn check(&self, tenant: Uuid, kinds: &[&str], count_queued: bool) -> Result<(), Problem> {
        let limits = self.of(tenant).await?;
        let quotas = Quotas {
            max_queued: limits.max_queued,
            max_chunks: limits.max_chunks,
            max_rows_per_day: limits.max_rows_per_day,
            max_dataset_bytes: limits.max_dataset_bytes,
        };
        let mut conn = self.pool.acquire().await?;
        quotas::check(&mut conn, tenant, &quotas, kinds, count_queued)
            .await?
            .map_err(|over| over_quota(StatusCode::FORBIDDEN, over))
    }

    /// How many jobs a retry may queue again under `max_queued` (`wanted` if no quota), or the
    /// quota's 403 if none: a retry adds live jobs as a submission does.
    pub async fn requeue_room(&self, tenant: Uuid, wanted: i64) -> Result<i64, Problem> {
        let Some(limit) = self.of(tenant).await?.max_queued else {
            return Ok(wanted);
        };
        let mut conn = self.pool.acquire().await?;
        requeue_room(&mut conn, tenant, limit, wanted, 0).await
    }

    /// [`Self::requeue_room`] again in `tx`, where the retry writes, with the tenant locked
    /// until it commits, and `reopened` steps it sets waiting counted too: retries racing each
    /// other each passed the count made before.
    pub async fn hold_requeue_room(
        &self,
        tx: &mut sqlx::PgConnection,
        tenant: Uuid,
        wanted: i64,
        reopened: usize,
    ) -> Result<i64, Problem> {
        let Some(limit) = self.of(tenant).await?.max_queued else {
            return Ok(wanted);
        };
        quotas::lock_tenant(tx, tenant).await?;
        requeue_room(tx, tenant, limit, wanted, reopened as i64).await
    }

    /// The bytes an upload may still take under `max_dataset_bytes`, with the quota's refusal
    /// for an upload past it; `None`: no quota.
    pub async fn dataset_room(&self, tenant: Uuid) -> Result<Option<(u64, Problem)>, Problem> {
        let Some(limit) = self.of(tenant).await?.max_dataset_bytes else {
            return Ok(None);
        };
        let used = quotas::dataset_bytes(&self.pool, tenant).await?;
        let room = (limit - used).max(0) as u64;
        let refusal = over_quota(
            StatusCode::PAYLOAD_TOO_LARGE,
            OverQuota {
                quota: "max_dataset_bytes",
                limit: format!("{limit} bytes of datasets and models"),
                used: format!("{used} in use, {room} left"),
            },
        );
        Ok(Some((room, refusal)))
    }
}

impl Limits {
    /// Checks again, in the transaction that records an upload of `size` bytes, that it fits
    /// under `max_dataset_bytes`: uploads stream for a while, and several of one tenant could
    /// each pass [`Self::dataset_room`] before any was recorded. The tenant's row stays locked
    /// until the transaction ends, so its uploads are recorded one at a time.
    pub async fn hold_dataset_room(
        &self,
        tx: &mut sqlx::PgConnection,
        tenant: Uuid,
        size: u64,
    ) -> Result<(), Problem> {
        let limit = self.of(tenant).await?.max_dataset_bytes;
        quotas::hold_dataset_room(tx, tenant, limit, size)
            .await?
            .map_err(|over| over_quota(StatusCode::PAYLOAD_TOO_LARGE, over))
    }
}

/// In `tx`, just before jobs of `kinds` are written: the tenant locked and its `max_queued`
/// checked again with them (403 past it), so that submissions racing each other cannot all
/// pass the check each made before.
pub async fn hold_queued_room(
    tx: &mut sqlx::PgConnection,
    tenant: Uuid,
    max_queued: i64,
    kinds: &[&str],
) -> Result<(), Problem> {
    quotas::lock_tenant(tx, tenant).await?;
    let quotas = Quotas {
        max_queued: Some(max_queued),
        ..Quotas::default()
    };
    quotas::check(tx, tenant, &quotas, kinds, true)
        .await?
        .map_err(|over| over_quota(StatusCode::FORBIDDEN, over))
}

/// How many of `wanted` jobs fit under `limit` beside the tenant's live ones and `reopened`.
async fn requeue_room(
    conn: &mut sqlx::PgConnection,
    tenant: Uuid,
    limit: i64,
    wanted: i64,
    reopened: i64,
) -> Result<i64, Problem> {
    let live = quotas::usage_of(conn, tenant, quotas::Measures::QUEUED)
        .await?
        .queued();
    let room = limit - live - reopened;
    if room <= 0 {
        let over = OverQuota::max_queued(limit, format!("{live} in use"));
        return Err(over_quota(StatusCode::FORBIDDEN, over));
    }
    Ok(wanted.min(room))
}

/// A refusal naming the quota, its limit and the use it met.
fn over_quota(status: StatusCode, over: OverQuota) -> Problem {
    let mut problem = Problem::new(status, "quota", over.to_string());
    problem.errors = vec![shared::FieldError::new(
        format!("quota.{}", over.quota),
        format!("{} allowed; {}", over.limit, over.used),
    )];
    problem
}

/// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers): the bucket's
/// size and refill window, what is left and the seconds until it is full again.
#[derive(Default)]
pub struct RateHeaders(Option<(HeaderValue, HeaderValue)>);

impl RateHeaders {
    fn new(name: &str, rate: Rate, remaining: i64, full_us: i64) -> Self {
        let window = (f64::from(rate.burst) / rate.per_sec).ceil().max(1.0) as u64;
        let reset = (full_us as f64 / 1e6).ceil().max(0.0) as u64;
        let policy = format!("\"{name}\";q={};w={window}", rate.burst);
        let state = format!("\"{name}\";r={remaining};t={reset}");
        Self(
            HeaderValue::from_str(&policy)
                .ok()
                .zip(HeaderValue::from_str(&state).ok()),
        )
    }

    fn write(&self, headers: &mut HeaderMap) {
        if let Some((policy, state)) = &self.0 {
            headers.insert(HeaderName::from_static("ratelimit-policy"), policy.clone());
            headers.insert(HeaderName::from_static("ratelimit"), state.clone());
        }
    }
}

impl IntoResponseParts for RateHeaders {
    type Error = std::convert::Infallible;

    fn into_response_parts(self, mut parts: ResponseParts) -> Result<ResponseParts, Self::Error> {
        self.write(parts.headers_mut());
        Ok(parts)
    }
}

/// A change to a tenant's limits (`conveyor-api tenants set-limits`): what is `Some` is set,
/// the rest kept.
#[derive(Clone, Debug, Default)]
pub struct LimitChange {
    /// Per kind; a value of `None` removes the kind's own cap.
    pub max_running: Vec<(String, Option<i64>)>,
    pub weight: Option<i32>,
    pub rate: Option<Option<Rate>>,
    pub max_queued: Option<Option<i64>>,
    pub max_dataset_bytes: Option<Option<i64>>,
    pub max_chunks: Option<Option<i64>>,
    pub max_rows_per_day: Option<Option<i64>>,
    pub job_retention_days: Option<Option<i32>>,
}

/// Applies `change` to the tenant's row (made if missing), in one statement.
pub async fn set_limits(pool: &PgPool, tenant: Uuid, change: &LimitChange) -> sqlx::Result<()> {
    let set_running: serde_json::Map<String, Value> = change
        .max_running
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), Value::from((*v)?))))
        .collect();
    let unset_running: Vec<String> = change
        .max_running
        .iter()
        .filter(|(_, v)| v.is_none())
        .map(|(k, _)| k.clone())
        .collect();
    // For each optional column: whether to set it ($n) and the value ($n+1).
    let opt = |v: Option<Option<i64>>| (v.is_some(), v.flatten());
    let (rate_set, rate) = (change.rate.is_some(), change.rate.flatten());
    let (queued_set, queued) = opt(change.max_queued);
    let (bytes_set, bytes) = opt(change.max_dataset_bytes);
    let (chunks_set, chunks) = opt(change.max_chunks);
    let (rows_set, rows) = opt(change.max_rows_per_day);
    let (retention_set, retention) = (
        change.job_retention_days.is_some(),
        change.job_retention_days.flatten(),
    );
    sqlx::query(
        "INSERT INTO tenant_limits AS l (tenant_id) VALUES ($1) ON CONFLICT (tenant_id) DO NOTHING",
    )
    .bind(tenant)
    .execute(pool)
    .await?;
    sqlx::query(
        "UPDATE tenant_limits SET
             max_running = (max_running - $2::text[]) || $3,
             weight = coalesce($4, weight),
             rate_per_sec = CASE WHEN $5 THEN $6 ELSE rate_per_sec END,
             rate_burst = CASE WHEN $5 THEN $7 ELSE rate_burst END,
             max_queued = CASE WHEN $8 THEN $9 ELSE max_queued END,
             max_dataset_bytes = CASE WHEN $10 THEN $11 ELSE max_dataset_bytes END,
             max_chunks = CASE WHEN $12 THEN $13 ELSE max_chunks END,
             max_rows_per_day = CASE WHEN $14 THEN $15 ELSE max_rows_per_day END,
             job_retention_days = CASE WHEN $16 THEN $17 ELSE job_retention_days END,
             updated_at = now()
         WHERE tenant_id = $1",
    )
    .bind(tenant)
    .bind(&unset_running)
    .bind(Value::Object(set_running))
    .bind(change.weight)
    .bind(rate_set)
    .bind(rate.map(|r| r.per_sec))
    .bind(rate.map(|r| r.burst as i32))
    .bind(queued_set)
    .bind(queued)
    .bind(bytes_set)
    .bind(bytes)
    .bind(chunks_set)
    .bind(chunks)
    .bind(rows_set)
    .bind(rows)
    .bind(retention_set)
    .bind(retention)
    .execute(pool)
    .await?;
    Ok(())
}

/// The deepest bucket a rate may have.
pub const MAX_BURST: u32 = 1_000_000;

/// `50/s`, `600/m`, `3600/h` or `50` (per second); `none` for no limit; `burst` is the bucket's
/// depth (default: one second's worth, or the count given).
pub fn parse_rate(raw: &str, burst: Option<u32>) -> Result<Option<Rate>, String> {
    if raw == "none" {
        return Ok(None);
    }
    let (count, per) = raw.split_once('/').unwrap_or((raw, "s"));
    let count: f64 = count
        .parse()
        .map_err(|_| format!("{raw:?}: expected N/s, N/m or N/h"))?;
    let seconds = match per {
        "s" | "sec" => 1.0,
        "m" | "min" => 60.0,
        "h" | "hour" => 3600.0,
        _ => return Err(format!("{raw:?}: the period is s, m or h")),
    };
    if !(count > 0.0 && count.is_finite()) {
        return Err(format!("{raw:?}: the rate must be above 0"));
    }
    let per_sec = count / seconds;
    // A bucket no submission fits refuses every one; the column is an `integer`.
    let burst = burst.unwrap_or(count.ceil().clamp(1.0, MAX_BURST as f64) as u32);
    if !(1..=MAX_BURST).contains(&burst) {
        return Err(format!("burst {burst}: must be 1-{MAX_BURST}"));
    }
    Ok(Some(Rate { per_sec, burst }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_per_second_minute_or_hour() {
        let r = parse_rate("50/s", None).unwrap().unwrap();
        assert_eq!((r.per_sec, r.burst), (50.0, 50));
        let r = parse_rate("600/m", Some(20)).unwrap().unwrap();
        assert_eq!((r.per_sec, r.burst), (10.0, 20));
        assert_eq!(parse_rate("7", None).unwrap().unwrap().per_sec, 7.0);
        assert!(parse_rate("none", None).unwrap().is_none());
        for bad in ["0/s", "-1/s", "x/s", "5/d", "NaN"] {
            assert!(parse_rate(bad, None).is_err(), "{bad}");
        }
        // An empty bucket would refuse every submission; a deep one would wrap the column.
        for burst in [0, MAX_BURST + 1, u32::MAX] {
            assert!(parse_rate("5/s", Some(burst)).is_err(), "{burst}");
        }
        assert_eq!(
            parse_rate("1e12/s", None).unwrap().unwrap().burst,
            MAX_BURST
        );
    }
}
