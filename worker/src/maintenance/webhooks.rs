//! Webhook deliveries: the outbox rows that job outcomes wrote (`shared::webhooks`), sent to
//! their endpoints, signed per the Standard Webhooks spec.
//!
//! Each run claims due deliveries (`FOR UPDATE SKIP LOCKED`), pushing each a lease ahead before
//! anything is sent: a worker killed mid-delivery leaves it to be tried again after the lease.
//! At most `CONVEYOR_WEBHOOK_CONCURRENCY` deliveries are in flight, a tenant's at most three
//! quarters of them (so a quarter is always free for the others while one tenant's receivers
//! hang); each POST has a timeout,
//! follows no redirect and uses no proxy, and its host's addresses are checked (the
//! connections' rules) when it is resolved for this very request. A 2xx answer makes the
//! delivery `delivered`: it is never sent again. Anything else is retried with exponential
//! backoff and jitter until `CONVEYOR_WEBHOOK_RETRY_HOURS` have passed, then the delivery is
//! `failed` and its endpoint marked failing (until a later delivery succeeds).

use chrono::{DateTime, Utc};
use rand::Rng;
use shared::{
    connections::{
        address::{CheckedResolver, RESOLVE_TIMEOUT},
        AllowList, Cipher,
    },
    webhooks::{self, Attempt, Claimed},
    Settings,
};
use sqlx::PgPool;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::{Duty, Schedule};
use crate::Runtime;

/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

pub(crate) struct Webhooks {
    pub schedule: Schedule,
    sender: Arc<Sender>,
    /// One per delivery in flight.
    permits: Arc<Semaphore>,
    /// Deliveries in flight per tenant, each at most `share`.
    in_flight: Arc<Mutex<HashMap<Uuid, usize>>>,
    share: usize,
}

/// A tenant's delivery in flight; it frees its place in `in_flight` when dropped.
struct InFlight {
    tenants: Arc<Mutex<HashMap<Uuid, usize>>>,
    tenant: Uuid,
}

impl InFlight {
    fn new(tenants: &Arc<Mutex<HashMap<Uuid, usize>>>, tenant: Uuid) -> Self {
        *tenants
            .lock()
            .expect("in-flight lock")
            .entry(tenant)
            .or_default() += 1;
        Self {
            tenants: tenants.clone(),
            tenant,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut tenants = self.tenants.lock().expect("in-flight lock");
        if let Some(count) = tenants.get_mut(&self.tenant) {
            *count -= 1;
            if *count == 0 {
                tenants.remove(&self.tenant);
            }
        }
    }
}

/// What sending one delivery needs.
pub(crate) struct Sender {
    client: reqwest::Client,
    allow: AllowList,
    cipher: Option<Cipher>,
    lease: Duration,
    retry_base: Duration,
    retry_window: Duration,
}

impl Webhooks {
    /// Four times a second; a claim takes as many deliveries as there are free slots, a tenant
    /// at most three quarters of the slots: a quarter is always left to the others.
    pub fn new(settings: &Settings) -> Self {
        let slots = settings.webhook_concurrency.max(1);
        Self {
            schedule: Schedule {
                name: "webhooks",
                interval: Duration::from_millis(250),
                batch: settings.webhook_concurrency as i64,
            },
            sender: Arc::new(Sender::new(settings)),
            permits: Arc::new(Semaphore::new(slots)),
            in_flight: Arc::default(),
            share: slots.saturating_sub(slots.div_ceil(4)).max(1),
        }
    }
}

impl Sender {
    fn new(settings: &Settings) -> Self {
        let allow = settings.webhook_allow.clone();
        let client = reqwest::Client::builder()
            .timeout(settings.webhook_timeout)
            .connect_timeout(settings.webhook_timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(concat!("conveyor-webhooks/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(CheckedResolver::new(allow.clone(), "webhooks")))
            .build()
            .expect("the webhook HTTP client (TLS roots) initialises");
        let cipher = settings.secret_key.as_deref().and_then(|key| {
            Cipher::from_hex(key)
                .map_err(|e| tracing::error!(error = %e, "webhooks cannot be signed"))
                .ok()
        });
        Self {
            client,
            allow,
            cipher,
            // Longer than an attempt may take (the address check, then the request), so that
            // one attempt never overlaps another.
            lease: settings
                .webhook_lease
                .max(settings.webhook_timeout + RESOLVE_TIMEOUT + Duration::from_secs(1)),
            retry_base: settings.webhook_retry_base,
            retry_window: settings.webhook_retry_window,
        }
    }

    /// One attempt of `claimed`, recorded.
    pub async fn deliver(&self, pool: &PgPool, claimed: Claimed) -> anyhow::Result<()> {
        let Some(attempt) = self.attempt(pool, &claimed).await? else {
            tracing::debug!(delivery = %claimed.id, "webhook delivery gone before it was sent");
            return Ok(());
        };
        let retry_at = if attempt.succeeded() {
            None
        } else {
            self.retry_at(&claimed, Utc::now())
        };
        match (&attempt.error, retry_at) {
            (None, _) => {}
            (Some(error), Some(at)) => tracing::debug!(
                delivery = %claimed.id, attempt = claimed.attempts, error, retry_at = %at,
                "webhook delivery failed; retrying"
            ),
            (Some(error), None) => tracing::warn!(
                delivery = %claimed.id, webhook = %claimed.webhook_id, error,
                "webhook delivery failed for good; the endpoint is marked failing"
            ),
        }
        if !webhooks::record(pool, &claimed, &attempt, retry_at).await? {
            tracing::warn!(delivery = %claimed.id, "webhook delivery's lease passed before its answer");
        }
        Ok(())
    }

    /// `None` when the delivery went (its webhook deleted) between the claim and the send: a
    /// tenant that deleted an endpoint, say one whose domain changed hands, must not have it
    /// sent the job's result after the 204.
    async fn attempt(&self, pool: &PgPool, claimed: &Claimed) -> anyhow::Result<Option<Attempt>> {
        let started = Instant::now();
        let failed = |error: String| {
            Ok(Some(Attempt {
                status_code: None,
                error: Some(error),
                latency: started.elapsed(),
            }))
        };
        let Some(cipher) = &self.cipher else {
            return failed("CONVEYOR_SECRET_KEY is not set: deliveries cannot be signed".into());
        };
        let secret = match cipher.decrypt(
            &claimed.secret_encrypted,
            claimed.tenant_id,
            claimed.webhook_id,
        ) {
            Ok(secret) => secret,
            Err(e) => return failed(format!("the signing secret: {e}")),
        };
        let url = match webhooks::parse_url(&claimed.url) {
            Ok(url) => url,
            Err(why) => return failed(format!("url {why}")),
        };
        // The address rules, now: a host that resolves elsewhere since the endpoint was made
        // is refused before anything is sent (the resolver checks again at connect time).
        if let Err(why) = webhooks::check_url(&url, &self.allow).await {
            return failed(format!("refused: {why}"));
        }
        let body = serde_json::to_vec(&claimed.payload).unwrap_or_default();
        let id = claimed.id.to_string();
        let timestamp = Utc::now().timestamp();
        let signature = match webhooks::sign(&secret, &id, timestamp, &body) {
            Ok(signature) => signature,
            Err(e) => return failed(e.to_string()),
        };
        if !webhooks::still_claimed(pool, claimed).await? {
            return Ok(None);
        }
        let started = Instant::now();
        let sent = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        let latency = started.elapsed();
        Ok(Some(match sent {
            Ok(response) => {
                let code = response.status().as_u16();
                Attempt {
                    status_code: Some(code),
                    error: (!response.status().is_success()).then(|| format!("answered {code}")),
                    latency,
                }
            }
            Err(e) => Attempt {
                status_code: None,
                error: Some(describe(&e)),
                latency,
            },
        }))
    }

    /// When to try again after the failed attempt `claimed.attempts`: `base * 2^(n-1)` (at
    /// most an hour), jittered down by up to half; `None` past the retry window.
    fn retry_at(&self, claimed: &Claimed, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let delay = backoff(self.retry_base, claimed.attempts);
        let next = now + chrono::Duration::from_std(delay).ok()?;
        let deadline =
            claimed.retry_started_at + chrono::Duration::from_std(self.retry_window).ok()?;
        (next <= deadline).then_some(next)
    }
}

/// The wait after failed attempt `attempt` (1 for the first).
fn backoff(base: Duration, attempt: i32) -> Duration {
    let exponent = attempt.clamp(1, 32) as u32 - 1;
    let full = base
        .saturating_mul(2u32.saturating_pow(exponent))
        .min(MAX_BACKOFF);
    full.mul_f64(rand::rng().random_range(0.5..=1.0))
}

/// A request's error with its causes (`error sending request: ... refused: ...`).
fn describe(error: &reqwest::Error) -> String {
    let mut text = if error.is_timeout() {
        "timed out".to_owned()
    } else {
        // Without the URL reqwest appends: its query may carry the receiver's token, and this
        // text is logged.
        let text = error.to_string();
        match error.url() {
            Some(url) => text.replace(&format!(" for url ({url})"), ""),
            None => text,
        }
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[async_trait::async_trait]
impl Duty for Webhooks {
    fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// Claims as many due deliveries as there are free slots and sends each in a task of its
    /// own (the run does not wait for the answers); returns how many it claimed.
    async fn run(&self, runtime: &Runtime) -> anyhow::Result<usize> {
        let free = self.permits.available_permits();
        if free == 0 {
            return Ok(0);
        }
        let (tenants, held): (Vec<Uuid>, Vec<i64>) = (self.in_flight.lock())
            .expect("in-flight lock")
            .iter()
            .map(|(&tenant, &count)| (tenant, count as i64))
            .unzip();
        let claimed = webhooks::claim_due(
            runtime.pool(),
            self.sender.lease,
            free as i64,
            self.share as i64,
            (&tenants, &held),
        )
        .await?;
        let count = claimed.len();
        for delivery in claimed {
            let permit = self.permits.clone().acquire_owned().await?;
            let in_flight = InFlight::new(&self.in_flight, delivery.tenant_id);
            let (sender, pool) = (self.sender.clone(), runtime.pool().clone());
            tokio::spawn(async move {
                if let Err(e) = sender.deliver(&pool, delivery).await {
                    tracing::warn!(error = %e, "recording a webhook delivery failed");
                }
                drop((permit, in_flight));
            });
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maintenance::test_support::TestDb;
    use axum::{extract::State, http::StatusCode, routing::post, Router};
    use serde_json::Value;
    use std::sync::Mutex;
    use uuid::Uuid;

    /// However the deployment sets them, a lease outlasts an attempt (its address check
    /// included: two attempts of one delivery went at once), and a tenant leaves a quarter of
    /// the slots, rounded up, to the others (with three slots, it took all three).
    #[test]
    fn a_lease_outlasts_an_attempt_and_a_tenant_leaves_slots_to_others() {
        let mut settings =
            Settings::for_test("postgres://127.0.0.1/unused".into(), "test:unused".into());
        settings.webhook_timeout = Duration::from_secs(5);
        settings.webhook_lease = Duration::from_secs(1);
        settings.webhook_concurrency = 3;
        let webhooks = Webhooks::new(&settings);
        assert!(webhooks.sender.lease > Duration::from_secs(5) + RESOLVE_TIMEOUT);
        let shares: Vec<usize> = [1, 2, 3, 4, 8]
            .into_iter()
            .map(|slots| {
                settings.webhook_concurrency = slots;
                Webhooks::new(&settings).share
            })
            .collect();
        assert_eq!(shares, [1, 1, 2, 3, 6]);
    }

    /// A failed attempt's text, which is logged, leaves out the URL and its token.
    #[tokio::test]
    async fn a_failure_is_described_without_the_url() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let url = format!("http://127.0.0.1:{port}/hook?token=s3cret");
        let error = reqwest::Client::new().post(&url).send().await.unwrap_err();
        assert!(error.to_string().contains("s3cret"), "the premise: {error}");
        let text = describe(&error);
        assert!(
            !text.contains("s3cret") && !text.contains("/hook"),
            "{text}"
        );
        assert!(text.contains("error sending request"), "{text}");
    }

    /// A receiver on loopback answering each request with the next status of its script
    /// (then 204); counts what it got.
    #[derive(Clone, Default)]
    struct Receiver {
        script: Arc<Mutex<Vec<u16>>>,
        got: Arc<Mutex<Vec<String>>>,
    }

    impl Receiver {
        async fn start(script: &[u16]) -> (Self, String) {
            let receiver = Self {
                script: Arc::new(Mutex::new(script.iter().rev().copied().collect())),
                got: Arc::default(),
            };
            let app = Router::new()
                .route("/hook", post(Self::answer))
                .with_state(receiver.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/hook", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await });
            (receiver, url)
        }

        async fn answer(
            State(receiver): State<Self>,
            headers: axum::http::HeaderMap,
        ) -> StatusCode {
            let id = headers["webhook-id"].to_str().unwrap().to_owned();
            receiver.got.lock().unwrap().push(id);
            let code = receiver.script.lock().unwrap().pop().unwrap_or(204);
            StatusCode::from_u16(code).unwrap()
        }

        fn count(&self) -> usize {
            self.got.lock().unwrap().len()
        }
    }

    impl TestDb {
        /// An endpoint of the test's tenant for `events` at `url` (not checked: as if the
        /// rules changed since it was made).
        async fn webhook(&self, url: &str, events: &[&str]) -> Uuid {
            self.webhook_of(self.tenant, url, events).await
        }

        /// The same for `tenant`.
        async fn webhook_of(&self, tenant: Uuid, url: &str, events: &[&str]) -> Uuid {
            let cipher =
                Cipher::from_hex(self.runtime.settings().secret_key.as_deref().unwrap()).unwrap();
            let id = Uuid::now_v7();
            sqlx::query(
                "INSERT INTO webhooks (id, tenant_id, url, events, secret_encrypted)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(id)
            .bind(tenant)
            .bind(url)
            .bind(events.iter().map(|e| e.to_string()).collect::<Vec<_>>())
            .bind(cipher.encrypt(&webhooks::new_secret(), tenant, id))
            .execute(self.pool())
            .await
            .unwrap();
            id
        }

        /// A running job of the tenant finished with `outcome` the way a worker records it.
        async fn finish(&self, outcome: shared::store::Outcome) -> Uuid {
            let id = self.job("canary", "running").await;
            shared::store::finish_many(
                self.pool(),
                &[shared::store::Finish {
                    id,
                    attempt: 1,
                    outcome: outcome.into(),
                    usage: Default::default(),
                }],
            )
            .await
            .unwrap();
            id
        }

        /// A running job of `tenant` succeeded, the way a worker records it.
        async fn succeeded_of(&self, tenant: Uuid) {
            let job = Uuid::now_v7();
            sqlx::query(
                "INSERT INTO jobs (id, tenant_id, kind, status, payload, attempt)
                 VALUES ($1, $2, 'canary', 'running', '{}', 1)",
            )
            .bind(job)
            .bind(tenant)
            .execute(self.pool())
            .await
            .unwrap();
            shared::store::finish_many(
                self.pool(),
                &[shared::store::Finish {
                    id: job,
                    attempt: 1,
                    outcome: shared::store::Outcome::Succeeded(serde_json::json!({})).into(),
                    usage: Default::default(),
                }],
            )
            .await
            .unwrap();
        }

        /// (status, attempts, last_status_code, last_error) of each of the webhook's
        /// deliveries.
        async fn deliveries(
            &self,
            webhook: Uuid,
        ) -> Vec<(String, i32, Option<i32>, Option<String>)> {
            sqlx::query_as(
                "SELECT status, attempts, last_status_code, last_error FROM webhook_deliveries
                 WHERE webhook_id = $1 ORDER BY id",
            )
            .bind(webhook)
            .fetch_all(self.pool())
            .await
            .unwrap()
        }
    }

    /// Runs the duty until `done` holds of the webhook's deliveries, at most 10 s.
    async fn run_until(
        test: &TestDb,
        duty: &Webhooks,
        webhook: Uuid,
        what: &str,
        done: impl Fn(&[(String, i32, Option<i32>, Option<String>)]) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            duty.run(&test.runtime).await.unwrap();
            let deliveries = test.deliveries(webhook).await;
            if done(&deliveries) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {deliveries:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The outcome's statement writes the outbox: one delivery per endpoint that asked for
    /// the event; a retried 500 then a 2xx is delivered, and never sent again.
    #[tokio::test]
    async fn outcomes_are_delivered_and_a_500_is_retried() {
        let test = TestDb::new().await;
        let (receiver, url) = Receiver::start(&[500]).await;
        let succeeded = test.webhook(&url, &["job.succeeded"]).await;
        let failures = test.webhook(&url, &["job.failed"]).await;
        test.finish(shared::store::Outcome::Succeeded(
            serde_json::json!({"n": 1}),
        ))
        .await;
        assert_eq!(test.deliveries(failures).await.len(), 0);

        let duty = Webhooks::new(test.runtime.settings());
        run_until(&test, &duty, succeeded, "not delivered", |d| {
            d.len() == 1 && d[0].0 == "delivered"
        })
        .await;
        assert_eq!(
            test.deliveries(succeeded).await,
            [("delivered".to_owned(), 2, Some(204), None)]
        );
        assert_eq!(receiver.count(), 2);
        let got = receiver.got.lock().unwrap().clone();
        assert_eq!(got[0], got[1], "a retry carries the same webhook-id");
        for _ in 0..10 {
            duty.run(&test.runtime).await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert_eq!(receiver.count(), 2, "a delivered delivery was sent again");
    }

    /// A delivery claimed, then its webhook deleted (its deliveries with it) before the send:
    /// nothing is sent. The claim's snapshot was sent the job's result after the 204.
    #[tokio::test]
    async fn a_delivery_whose_webhook_was_deleted_after_its_claim_is_not_sent() {
        let test = TestDb::new().await;
        let (receiver, url) = Receiver::start(&[]).await;
        let webhook = test.webhook(&url, &["job.succeeded"]).await;
        test.finish(shared::store::Outcome::Succeeded(serde_json::json!({})))
            .await;
        let claimed = webhooks::claim_due(test.pool(), Duration::from_secs(60), 10, 10, (&[], &[]))
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1);
        sqlx::query("DELETE FROM webhooks WHERE id = $1")
            .bind(webhook)
            .execute(test.pool())
            .await
            .unwrap();
        let duty = Webhooks::new(test.runtime.settings());
        let claimed = claimed.into_iter().next().unwrap();
        duty.sender.deliver(test.pool(), claimed).await.unwrap();
        assert_eq!(receiver.count(), 0, "sent after its webhook was deleted");
    }

    /// An endpoint whose address the rules refuse (loopback, with no allow list) is never
    /// contacted at delivery time, whatever was checked before; past the retry window the
    /// delivery fails and the endpoint is marked failing, until a later success clears it.
    #[tokio::test]
    async fn refused_addresses_are_not_contacted_and_endpoints_are_marked_failing() {
        let test = TestDb::with(jobs::Registry::default(), |settings| {
            settings.webhook_retry_window = Duration::ZERO;
        })
        .await;
        let (receiver, url) = Receiver::start(&[]).await;
        let webhook = test.webhook(&url, &["job.failed"]).await;
        test.finish(shared::store::Outcome::Failed("boom".into()))
            .await;

        // The connections' list allowing loopback does not open it to webhooks.
        let mut settings = test.runtime.settings().clone();
        settings.webhook_allow = AllowList::default();
        let strict = Webhooks::new(&settings);
        run_until(&test, &strict, webhook, "not failed", |d| {
            d.len() == 1 && d[0].0 == "failed"
        })
        .await;
        let deliveries = test.deliveries(webhook).await;
        assert!(
            deliveries[0].3.as_deref().unwrap().contains("loopback"),
            "{deliveries:?}"
        );
        assert_eq!(receiver.count(), 0, "a refused address was contacted");
        let failing: Option<DateTime<Utc>> =
            sqlx::query_scalar("SELECT failing_since FROM webhooks WHERE id = $1")
                .bind(webhook)
                .fetch_one(test.pool())
                .await
                .unwrap();
        assert!(failing.is_some());

        // Allowed again (the test's allow list): the next outcome is delivered and the
        // endpoint is no longer failing.
        test.finish(shared::store::Outcome::Failed("again".into()))
            .await;
        let duty = Webhooks::new(test.runtime.settings());
        run_until(&test, &duty, webhook, "not delivered", |d| {
            d.len() == 2 && d[1].0 == "delivered"
        })
        .await;
        let failing: Option<DateTime<Utc>> =
            sqlx::query_scalar("SELECT failing_since FROM webhooks WHERE id = $1")
                .bind(webhook)
                .fetch_one(test.pool())
                .await
                .unwrap();
        assert_eq!(failing, None);
        assert_eq!(receiver.count(), 1);
    }

    /// One tenant's receiver that never answers holds at most its share of the slots (three
    /// quarters: one tenant alone still has most of them): another tenant's delivery, due after
    /// all of its deliveries, goes out at once.
    #[tokio::test]
    async fn a_hanging_receiver_holds_only_its_tenants_share_of_the_slots() {
        let test = TestDb::new().await;
        assert_eq!(test.runtime.settings().webhook_concurrency, 8);
        let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hanging_url = format!("http://{}/hook", hanging.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = hanging.accept().await {
                held.push(socket);
            }
        });
        let stuck = test.webhook(&hanging_url, &["job.succeeded"]).await;
        for _ in 0..10 {
            test.finish(shared::store::Outcome::Succeeded(serde_json::json!({})))
                .await;
        }
        let (receiver, url) = Receiver::start(&[]).await;
        let other = test.other_tenant().await;
        let other_hook = test.webhook_of(other, &url, &["job.succeeded"]).await;
        test.succeeded_of(other).await;

        let duty = Webhooks::new(test.runtime.settings());
        let started = Instant::now();
        run_until(&test, &duty, other_hook, "not delivered", |d| {
            d.len() == 1 && d[0].0 == "delivered"
        })
        .await;
        let waited = started.elapsed();
        assert!(
            waited < test.runtime.settings().webhook_timeout,
            "waited {waited:?}"
        );
        assert_eq!(receiver.count(), 1);
        // Its share, once the other tenant's delivery has left its slot.
        for _ in 0..5 {
            duty.run(&test.runtime).await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let tried = test
            .deliveries(stuck)
            .await
            .iter()
            .filter(|d| d.1 > 0)
            .count();
        assert_eq!(
            tried, 6,
            "the hanging tenant's share of 8 slots, however long it runs"
        );
    }

    /// Two tenants whose receivers hang took every slot between them (three quarters, then
    /// the rest, or half each in one claim), and a third tenant's delivery, made after,
    /// waited for their timeouts. Slots go round the tenants, and those past the share are
    /// for tenants that hold none.
    #[tokio::test]
    async fn two_hanging_tenants_leave_slots_to_a_third() {
        let test = TestDb::new().await;
        let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hanging_url = format!("http://{}/hook", hanging.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = hanging.accept().await {
                held.push(socket);
            }
        });
        let (first, second) = (test.tenant, test.other_tenant().await);
        for tenant in [first, second] {
            test.webhook_of(tenant, &hanging_url, &["job.succeeded"])
                .await;
            for _ in 0..10 {
                test.succeeded_of(tenant).await;
            }
        }
        let duty = Webhooks::new(test.runtime.settings());
        // The two take what they may, in one claim.
        assert_eq!(duty.run(&test.runtime).await.unwrap(), 6);
        let (receiver, url) = Receiver::start(&[]).await;
        let third = test.other_tenant().await;
        let third_hook = test.webhook_of(third, &url, &["job.succeeded"]).await;
        test.succeeded_of(third).await;

        let started = Instant::now();
        run_until(&test, &duty, third_hook, "not delivered", |d| {
            d.len() == 1 && d[0].0 == "delivered"
        })
        .await;
        let waited = started.elapsed();
        assert!(
            waited < test.runtime.settings().webhook_timeout,
            "waited {waited:?}"
        );
        assert_eq!(receiver.count(), 1);
    }

    /// Every statement that ends a job writes the outbox rows of its outcome with it: the
    /// worker's finish, the API's cancels of waiting jobs, the rescuer's failures; nothing for
    /// a retry or a cancel only requested.
    #[tokio::test]
    async fn every_terminal_transition_writes_its_outbox_rows() {
        use shared::store::{self, BulkChange, JobFilter, Outcome};
        let test = TestDb::new().await;
        let all = ["job.succeeded", "job.failed", "job.cancelled"];
        let webhook = test.webhook("http://127.0.0.1:9/hook", &all).await;
        let other_tenants = {
            let other = test.other_tenant().await;
            test.webhook_of(other, "http://127.0.0.1:9/other", &all)
                .await
        };

        let succeeded = test.finish(Outcome::Succeeded(serde_json::json!({}))).await;
        test.finish(Outcome::Retrying {
            error: "again".into(),
            retry_at: Utc::now(),
        })
        .await;
        let cancelled = test.job("canary", "queued").await;
        store::request_cancel(test.pool(), test.tenant, cancelled)
            .await
            .unwrap();
        let running = test.job("canary", "running").await;
        store::request_cancel(test.pool(), test.tenant, running)
            .await
            .unwrap();
        let bulk = test.job("canary", "scheduled").await;
        let filter = JobFilter {
            statuses: vec![shared::JobStatus::Scheduled],
            kind: None,
            pipeline_id: None,
        };
        store::change_matching(
            test.pool(),
            test.tenant,
            &filter,
            BulkChange::Cancel,
            10,
            None,
        )
        .await
        .unwrap();
        let orphan = test.job("canary", "running").await;
        test.set(orphan, "worker = 'lost', max_attempts = 1").await;
        store::rescue_orphans(test.pool(), Duration::from_secs(1), None, 3, 10)
            .await
            .unwrap();

        let rows: Vec<(String, Uuid, Value)> = sqlx::query_as(
            "SELECT event, job_id, payload FROM webhook_deliveries WHERE webhook_id = $1
             ORDER BY id",
        )
        .bind(webhook)
        .fetch_all(test.pool())
        .await
        .unwrap();
        let mut got: Vec<(&str, Uuid)> = rows.iter().map(|(e, j, _)| (e.as_str(), *j)).collect();
        got.sort();
        // The running job asked to stop had no live worker: the rescuer cancelled it.
        let mut expected = vec![
            ("job.succeeded", succeeded),
            ("job.cancelled", cancelled),
            ("job.cancelled", bulk),
            ("job.cancelled", running),
            ("job.failed", orphan),
        ];
        expected.sort();
        assert_eq!(got, expected);
        let payload = |job: Uuid| &rows.iter().find(|(_, j, _)| *j == job).unwrap().2;
        assert_eq!(payload(succeeded)["type"], "job.succeeded");
        assert_eq!(payload(succeeded)["data"]["job_id"], succeeded.to_string());
        assert!(payload(succeeded)["data"].get("result").is_some());
        assert_eq!(payload(orphan)["data"]["status"], "failed");
        assert!(payload(orphan)["data"]["error"].as_str().is_some());
        assert_eq!(test.deliveries(other_tenants).await.len(), 0);
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_an_hour() {
        let base = Duration::from_secs(10);
        for (attempt, full) in [(1, 10), (2, 20), (3, 40), (10, 3600), (40, 3600)] {
            let wait = backoff(base, attempt);
            let full = Duration::from_secs(full);
            assert!(wait <= full && wait >= full / 2, "{attempt}: {wait:?}");
        }
    }
}
