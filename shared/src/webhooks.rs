//! Webhooks: a tenant's endpoints told of its jobs' outcomes (`job.succeeded`, `job.failed`,
//! `job.cancelled`) and its pipelines' (`pipeline.finished`, see [`crate::pipelines`]), signed per the Standard Webhooks spec (standardwebhooks.com).
//!
//! Deliveries are a durable outbox: the statement that makes a job terminal (see
//! [`crate::store`]) also inserts one `webhook_deliveries` row per endpoint of the job's
//! tenant that asked for the event, so no outcome is lost between the job's row and its
//! deliveries. The leading worker sends them (`worker/src/maintenance/webhooks.rs`).
//!
//! Target URLs obey the connections' address rules ([`crate::connections::address`]): no
//! loopback, private, link-local or metadata address unless `CONVEYOR_WEBHOOK_ALLOW` names
//! it; checked when the endpoint is created and again at every delivery.

use base64::{engine::general_purpose::STANDARD, Engine};
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::Value;
use sha2::Sha256;
use sqlx::PgPool;
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::connections::{address, AllowList, Cipher};
use crate::owned::Owned;

/// The events an endpoint may ask for.
pub const EVENTS: [&str; 4] = [
    "job.succeeded",
    "job.failed",
    "job.cancelled",
    "pipeline.finished",
];

/// Longest URL accepted.
const MAX_URL: usize = 2048;

/// The `events` of a new endpoint, checked and deduplicated (in [`EVENTS`] order).
pub fn parse_events(events: &[String]) -> Result<Vec<String>, String> {
    if events.is_empty() {
        return Err(format!("must name at least one of {}", EVENTS.join(", ")));
    }
    for event in events {
        if !EVENTS.contains(&event.as_str()) {
            return Err(format!(
                "unknown event {event:?}; one of {}",
                EVENTS.join(", ")
            ));
        }
    }
    Ok(EVENTS
        .iter()
        .filter(|e| events.iter().any(|x| x == *e))
        .map(|e| e.to_string())
        .collect())
}

/// An endpoint URL of the accepted shape: `http` or `https`, a host, no credentials, no
/// fragment.
pub fn parse_url(raw: &str) -> Result<url::Url, String> {
    if raw.len() > MAX_URL {
        return Err(format!("must be at most {MAX_URL} characters"));
    }
    let url = url::Url::parse(raw).map_err(|e| format!("is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must be an http:// or https:// URL".into());
    }
    if url.host().is_none() {
        return Err("must name a host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("may not carry credentials (the signature authenticates deliveries)".into());
    }
    if url.fragment().is_some() {
        return Err("may not have a fragment".into());
    }
    Ok(url)
}

/// The URL without its query (which may carry a token): what logs show of it.
pub fn without_query(url: &url::Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.to_string()
}

/// Why `ip` (reached for `host`) may not be sent to, or `None` when it may.
pub fn refusal(allow: &AllowList, host: &str, ip: IpAddr) -> Option<String> {
    address::refusal(allow, host, ip, "webhooks")
}

/// Resolves the URL's host and checks every address it has; the addresses, all allowed. The
/// error is for the client.
pub async fn check_url(url: &url::Url, allow: &AllowList) -> Result<Vec<SocketAddr>, String> {
    address::check_http_url(url, allow, "webhooks").await
}

/// A new signing secret: `whsec_` and 32 random bytes in base64.
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("whsec_{}", STANDARD.encode(bytes))
}

/// The `webhook-signature` header: `v1,` and the base64 HMAC-SHA256 of
/// `{id}.{timestamp}.{body}` under the secret's decoded bytes.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> anyhow::Result<String> {
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .map_err(|_| anyhow::anyhow!("the signing secret is not base64"))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes a key of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(format!(
        "v1,{}",
        STANDARD.encode(mac.finalize().into_bytes())
    ))
}

/// An endpoint as the API shows it: never its secret.
#[derive(Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct Webhook {
    pub id: Uuid,
    pub url: String,
    /// The events it is sent: `job.succeeded`, `job.failed`, `job.cancelled`,
    /// `pipeline.finished`.
    pub events: Vec<String>,
    /// Since when a delivery ran out of retries (cleared by the next successful delivery).
    pub failing_since: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// `POST /v1/webhooks`' answer: the endpoint and, this once, its signing secret.
#[derive(Clone, Serialize, ToSchema)]
pub struct CreatedWebhook {
    #[serde(flatten)]
    pub webhook: Webhook,
    /// `whsec_<base64>`: verify each delivery's `webhook-signature` with it. Shown once.
    pub secret: String,
}

/// What a log may show of an endpoint's URL: not its query, which may carry a token.
fn shown_url(url: &str) -> String {
    url::Url::parse(url).map_or_else(|_| "(not a URL)".into(), |url| without_query(&url))
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("id", &self.id)
            .field("url", &shown_url(&self.url))
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for CreatedWebhook {
    /// Never the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedWebhook")
            .field("webhook", &self.webhook)
            .finish_non_exhaustive()
    }
}

/// One event for one endpoint, as the API shows it.
#[derive(Clone, Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct Delivery {
    /// Also the `webhook-id` header (the same on every attempt).
    pub id: Uuid,
    pub event: String,
    pub job_id: Option<Uuid>,
    /// `pending`, `delivered` or `failed` (out of retries).
    pub status: String,
    pub attempts: i32,
    /// When a pending delivery is tried next.
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// The endpoint's answer to the last attempt (none: no answer, see `last_error`).
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    /// From sending the request to the answer's headers.
    pub last_latency_ms: Option<i32>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    /// The body sent: `{type, timestamp, data}`.
    #[schema(value_type = Object)]
    pub payload: Value,
}

const WEBHOOK_COLUMNS: &str = "id, url, events, failing_since, created_at";
const WEBHOOKS: Owned = Owned::new("webhooks", WEBHOOK_COLUMNS);

const DELIVERY_COLUMNS: &str = "id, event, job_id, status, attempts,
    CASE WHEN status = 'pending' THEN next_attempt_at END AS next_attempt_at, last_attempt_at,
    last_status_code, last_error, last_latency_ms, created_at, delivered_at, payload";

/// Most webhooks one tenant may have.
pub const MAX_PER_TENANT: i64 = 20;

/// Creates an endpoint with a new secret (sealed for its tenant and id).
pub async fn create(
    db: impl sqlx::PgExecutor<'_>,
    cipher: &Cipher,
    tenant: Uuid,
    key: Uuid,
    url: &str,
    events: &[String],
) -> sqlx::Result<CreatedWebhook> {
    let id = Uuid::now_v7();
    let secret = new_secret();
    let webhook: Webhook = sqlx::query_as(&format!(
        "INSERT INTO webhooks (id, tenant_id, key_id, url, events, secret_encrypted)
         VALUES ($1, $2, $3, $4, $5, $6)
         RETURNING {WEBHOOK_COLUMNS}"
    ))
    .bind(id)
    .bind(tenant)
    .bind(key)
    .bind(url)
    .bind(events)
    .bind(cipher.encrypt(&secret, tenant, id))
    .fetch_one(db)
    .await?;
    Ok(CreatedWebhook { webhook, secret })
}

pub async fn list(pool: &PgPool, tenant: Uuid) -> sqlx::Result<Vec<Webhook>> {
    sqlx::query_as(&format!(
        "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE tenant_id = $1 ORDER BY id"
    ))
    .bind(tenant)
    .fetch_all(pool)
    .await
}

pub async fn get(
    db: impl sqlx::PgExecutor<'_>,
    tenant: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<Webhook>> {
    WEBHOOKS.get(db, tenant, id).await
}

/// Deletes the endpoint and its deliveries (pending ones are not sent).
pub async fn delete(db: impl sqlx::PgExecutor<'_>, tenant: Uuid, id: Uuid) -> sqlx::Result<bool> {
    WEBHOOKS.delete(db, tenant, id).await
}

/// The endpoint's deliveries, newest first, after the `cursor` delivery id.
pub async fn deliveries(
    pool: &PgPool,
    tenant: Uuid,
    webhook: Uuid,
    cursor: Option<Uuid>,
    limit: i64,
    budget: usize,
) -> sqlx::Result<crate::pages::Page<Delivery>> {
    let sql = format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries
         WHERE tenant_id = $1 AND webhook_id = $2 AND ($3::uuid IS NULL OR id < $3)
         ORDER BY id DESC LIMIT $4"
    );
    let query = sqlx::query(&sql)
        .bind(tenant)
        .bind(webhook)
        .bind(cursor)
        .bind(limit);
    crate::pages::read(pool, query, budget).await
}

/// What [`replay`] did.
pub enum Replay {
    /// Due now, with a fresh retry window.
    Queued(Box<Delivery>),
    /// No such delivery of the tenant's endpoint.
    NotFound,
    /// Still pending (maybe in flight): it is sent anyway.
    Pending,
}

/// Sends a delivered or failed delivery again (same `webhook-id`, same body).
pub async fn replay(
    db: &mut sqlx::PgConnection,
    tenant: Uuid,
    webhook: Uuid,
    id: Uuid,
) -> sqlx::Result<Replay> {
    let queued: Option<Delivery> = sqlx::query_as(&format!(
        "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = now(),
             retry_started_at = now(), delivered_at = NULL
         WHERE tenant_id = $1 AND webhook_id = $2 AND id = $3 AND status <> 'pending'
         RETURNING {DELIVERY_COLUMNS}"
    ))
    .bind(tenant)
    .bind(webhook)
    .bind(id)
    .fetch_optional(&mut *db)
    .await?;
    if let Some(delivery) = queued {
        return Ok(Replay::Queued(Box::new(delivery)));
    }
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM webhook_deliveries
                        WHERE tenant_id = $1 AND webhook_id = $2 AND id = $3)",
    )
    .bind(tenant)
    .bind(webhook)
    .bind(id)
    .fetch_one(&mut *db)
    .await?;
    Ok(if exists {
        Replay::Pending
    } else {
        Replay::NotFound
    })
}

/// The outbox: a CTE (to follow others in a `WITH`) that inserts one pending delivery per
/// endpoint of the tenant of each terminal job row of `source` whose `events` hold the job's
/// outcome. `source` must have the `jobs` columns `id`, `tenant_id`, `kind`, `status`,
/// `attempt`, `finished_at`, `result` and `error`.
pub(crate) fn outbox_cte(source: &str) -> String {
    format!(
        "webhook_outbox AS (
             INSERT INTO webhook_deliveries (id, webhook_id, tenant_id, event, job_id, payload)
             SELECT conveyor_uuidv7(), w.id, o.tenant_id, 'job.' || o.status, o.id,
                    jsonb_build_object(
                        'type', 'job.' || o.status,
                        'timestamp', to_char(coalesce(o.finished_at, now()) AT TIME ZONE 'UTC',
                                             'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                        'data', jsonb_build_object('job_id', o.id, 'kind', o.kind,
                                                   'status', o.status, 'attempt', o.attempt)
                            || CASE o.status
                                   WHEN 'succeeded' THEN jsonb_build_object('result', o.result)
                                   WHEN 'failed' THEN jsonb_build_object('error', o.error)
                                   ELSE '{{}}'::jsonb END)
             FROM {source} o
             JOIN webhooks w ON w.tenant_id = o.tenant_id AND ('job.' || o.status) = ANY (w.events)
             WHERE o.status IN ('succeeded', 'failed', 'cancelled')
         )"
    )
}

/// A delivery claimed for one attempt, with what sending it needs.
#[derive(Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: Uuid,
    pub webhook_id: Uuid,
    pub tenant_id: Uuid,
    pub event: String,
    pub payload: Value,
    /// This attempt's number (1 for the first).
    pub attempts: i32,
    pub retry_started_at: DateTime<Utc>,
    pub url: String,
    pub secret_encrypted: Vec<u8>,
}

impl std::fmt::Debug for Claimed {
    /// Neither the URL's query nor the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claimed")
            .field("id", &self.id)
            .field("webhook_id", &self.webhook_id)
            .field("tenant_id", &self.tenant_id)
            .field("event", &self.event)
            .field("attempts", &self.attempts)
            .field("url", &shown_url(&self.url))
            .finish_non_exhaustive()
    }
}

/// Claims up to `limit` due deliveries for one attempt each: each is pushed `lease` ahead
/// (so that, should this worker die mid-attempt, another tries it after the lease) and its
/// attempt counted. Rows another claimer holds are skipped. A tenant holds at most
/// `per_tenant` of the claimer's deliveries, counting the `in_flight` ones (tenants and
/// counts, in step), and one that holds any takes more only while all of them together hold
/// fewer than `per_tenant`: the slots past it are for tenants holding none, one each. Slots
/// go round the tenants, those holding fewest first. Receivers that hang, one tenant's or
/// two's, cannot take every slot from the others.
pub async fn claim_due(
    pool: &PgPool,
    lease: Duration,
    limit: i64,
    per_tenant: i64,
    in_flight: (&[Uuid], &[i64]),
) -> sqlx::Result<Vec<Claimed>> {
    sqlx::query_as(
        "WITH total AS (SELECT coalesce(sum(held), 0) AS held FROM unnest($5::int8[]) held)
         UPDATE webhook_deliveries d SET
             next_attempt_at = now() + make_interval(secs => $1),
             attempts = d.attempts + 1,
             last_attempt_at = now()
         FROM webhooks w
         WHERE w.id = d.webhook_id AND d.id IN (
             -- In turn: a slot while all hold under the share, past it only a tenant's
             -- first, if it holds none.
             SELECT placed.id
             FROM (
                 SELECT ranked.*,
                        row_number() OVER (ORDER BY ranked.held + ranked.n, ranked.due_at)
                            AS place
                 FROM (
                     SELECT due.id, due.next_attempt_at AS due_at,
                            coalesce(f.held, 0) AS held,
                            row_number() OVER (PARTITION BY t.tenant_id
                                               ORDER BY due.next_attempt_at) AS n
                     FROM (SELECT DISTINCT tenant_id FROM webhooks) t
                     LEFT JOIN unnest($4::uuid[], $5::int8[]) AS f(tenant_id, held)
                         ON f.tenant_id = t.tenant_id
                     CROSS JOIN total
                     CROSS JOIN LATERAL (
                         SELECT id, next_attempt_at FROM webhook_deliveries
                         WHERE tenant_id = t.tenant_id AND status = 'pending'
                           AND next_attempt_at <= now()
                         ORDER BY next_attempt_at
                         LIMIT CASE WHEN coalesce(f.held, 0) = 0
                                    THEN greatest(least($3, $3 - total.held), 1)
                                    ELSE greatest(least($3 - f.held, $3 - total.held), 0) END
                         FOR UPDATE SKIP LOCKED) due
                 ) ranked
             ) placed
             CROSS JOIN total
             WHERE total.held + placed.place <= $3 OR (placed.held = 0 AND placed.n = 1)
             ORDER BY placed.place
             LIMIT $2)
         RETURNING d.id, d.webhook_id, d.tenant_id, d.event, d.payload, d.attempts,
                   d.retry_started_at, w.url, w.secret_encrypted",
    )
    .bind(lease.as_secs_f64())
    .bind(limit)
    .bind(per_tenant)
    .bind(in_flight.0)
    .bind(in_flight.1)
    .fetch_all(pool)
    .await
}

/// How an attempt ended.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// The endpoint's status code, if it answered.
    pub status_code: Option<u16>,
    /// Why it did not succeed.
    pub error: Option<String>,
    pub latency: Duration,
}

impl Attempt {
    pub fn succeeded(&self) -> bool {
        self.error.is_none() && self.status_code.is_some_and(|c| (200..300).contains(&c))
    }
}

/// Records an attempt of `claimed`, if it still owns the delivery (the same attempt number,
/// still pending). Success: `delivered`, never sent again, and the endpoint no longer failing.
/// Otherwise: retried at `retry_at`, or `failed` when that is `None` (and the endpoint marked
/// failing). Returns whether the row was updated.
/// Whether the claimed attempt still owns its delivery: not deleted with its webhook since the
/// claim, nor taken by a later attempt.
pub async fn still_claimed(pool: &PgPool, claimed: &Claimed) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM webhook_deliveries
                        WHERE id = $1 AND attempts = $2 AND status = 'pending')",
    )
    .bind(claimed.id)
    .bind(claimed.attempts)
    .fetch_one(pool)
    .await
}

pub async fn record(
    pool: &PgPool,
    claimed: &Claimed,
    attempt: &Attempt,
    retry_at: Option<DateTime<Utc>>,
) -> sqlx::Result<bool> {
    let succeeded = attempt.succeeded();
    let status = match (succeeded, retry_at) {
        (true, _) => "delivered",
        (false, Some(_)) => "pending",
        (false, None) => "failed",
    };
    let updated: i64 = sqlx::query_scalar(
        "WITH d AS (
             UPDATE webhook_deliveries SET
                 status = $3,
                 next_attempt_at = COALESCE($4, next_attempt_at),
                 last_status_code = $5,
                 last_error = $6,
                 last_latency_ms = $7,
                 delivered_at = CASE WHEN $3 = 'delivered' THEN now() END
             WHERE id = $1 AND attempts = $2 AND status = 'pending'
             RETURNING webhook_id, status
         ), endpoint AS (
             UPDATE webhooks w SET failing_since = CASE
                     WHEN d.status = 'delivered' THEN NULL
                     ELSE COALESCE(w.failing_since, now()) END
             FROM d WHERE w.id = d.webhook_id AND d.status IN ('delivered', 'failed')
         )
         SELECT count(*) FROM d",
    )
    .bind(claimed.id)
    .bind(claimed.attempts)
    .bind(status)
    .bind(retry_at)
    .bind(attempt.status_code.map(i32::from))
    .bind(&attempt.error)
    .bind(i32::try_from(attempt.latency.as_millis()).unwrap_or(i32::MAX))
    .fetch_one(pool)
    .await?;
    Ok(updated == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log line formatting an endpoint shows neither its secret nor its URL's query.
    #[test]
    fn debug_shows_no_secret_and_no_query() {
        let webhook = Webhook {
            id: Uuid::now_v7(),
            url: "https://hooks.example/in?token=s3cr3t-token".into(),
            events: vec!["job.failed".into()],
            failing_since: None,
            created_at: Utc::now(),
        };
        let secret = new_secret();
        let created = CreatedWebhook {
            webhook: webhook.clone(),
            secret: secret.clone(),
        };
        let claimed = Claimed {
            id: Uuid::now_v7(),
            webhook_id: webhook.id,
            tenant_id: Uuid::now_v7(),
            event: "job.failed".into(),
            payload: Value::Null,
            attempts: 1,
            retry_started_at: Utc::now(),
            url: webhook.url.clone(),
            secret_encrypted: secret.clone().into_bytes(),
        };
        for shown in [
            format!("{webhook:?}"),
            format!("{created:?}"),
            format!("{claimed:?}"),
        ] {
            assert!(shown.contains("hooks.example/in"), "{shown}");
            assert!(!shown.contains("s3cr3t-token"), "{shown}");
            assert!(!shown.contains(&secret["whsec_".len()..]), "{shown}");
        }
    }

    /// The example of the Standard Webhooks spec (and its reference libraries' tests).
    #[test]
    fn signatures_match_the_specs_example() {
        let signature = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        )
        .unwrap();
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn events_are_checked() {
        let events =
            |e: &[&str]| parse_events(&e.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            events(&["job.failed", "job.succeeded", "job.failed"]).unwrap(),
            ["job.succeeded", "job.failed"]
        );
        assert!(events(&[]).is_err());
        assert_eq!(
            events(&["pipeline.finished", "job.failed"]).unwrap(),
            ["job.failed", "pipeline.finished"]
        );
        assert!(events(&["job.exploded"]).unwrap_err().contains("unknown"));
    }

    #[test]
    fn only_plain_http_urls_parse() {
        assert!(parse_url("https://hooks.example.com/conveyor?x=1").is_ok());
        assert!(parse_url("http://203.0.113.7:8080/hook").is_ok());
        for (raw, why) in [
            ("ftp://example.com/x", "http"),
            ("https://ann:pw@example.com/x", "credentials"),
            ("https://example.com/x#y", "fragment"),
            ("not a url", "not a URL"),
            ("unix:/var/run/socket", "http"),
        ] {
            let error = parse_url(raw).unwrap_err();
            assert!(error.contains(why), "{raw}: {error}");
        }
    }

    #[tokio::test]
    async fn internal_addresses_are_refused_unless_allowed() {
        let none = AllowList::default();
        let url = |s: &str| parse_url(s).unwrap();
        for raw in [
            "http://10.0.0.1/hook",
            "http://127.0.0.1:9/hook",
            "http://[::1]/hook",
            "http://169.254.169.254/latest",
            "http://[::ffff:192.168.1.1]/hook",
            "http://localhost/hook",
        ] {
            let error = check_url(&url(raw), &none).await.unwrap_err();
            assert!(error.contains("webhooks may not reach"), "{raw}: {error}");
        }
        // A name says nothing of where it leads: neither the address nor its kind.
        let error = check_url(&url("http://localhost:9/hook"), &none)
            .await
            .unwrap_err();
        assert_eq!(
            error,
            "localhost does not resolve to a public address: webhooks may not reach others \
             (an operator can allow them with CONVEYOR_WEBHOOK_ALLOW)"
        );
        let loopback: AllowList = "127.0.0.0/8".parse().unwrap();
        assert!(check_url(&url("http://127.0.0.1:9/hook"), &loopback)
            .await
            .is_ok());
        assert!(check_url(&url("http://10.0.0.1/hook"), &loopback)
            .await
            .is_err());
        assert!(check_url(&url("http://203.0.113.7/hook"), &none)
            .await
            .is_ok());
    }
}
