//! Fair dispatch: which queued jobs go onto a kind's Redis queue, and when.
//!
//! A queued job waits in PostgreSQL (held) until a pass of [`Dispatcher`] pushes it and records
//! it in `dispatched_jobs`, where it stays while in flight (pushed or running): a narrow row,
//! so dispatching a job never rewrites the job's own row. A pass keeps a kind in flight up to
//! its live workers' slots plus about one round of them waiting in Redis (at least
//! [`Dispatcher::min_window`]) and fills that across the tenants with held jobs by fair share:
//! the next job goes to the tenant with the fewest jobs in flight per unit of weight, so a
//! tenant arriving behind another's backlog of thousands starts within about one round of
//! slots. A tenant's `max_running` for the kind caps its jobs in flight, so it caps its running
//! jobs across all workers. Within a tenant, higher `priority` goes first, then older jobs.
//!
//! Passes of one kind are serialized by a transaction-scoped advisory lock, so two API or worker
//! processes never count the same free slot twice. Passes run after submissions, after a
//! worker's finished attempts have freed a quarter of its slots ([`Refill::freed`]) and
//! periodically (the maintenance `dispatcher` duty), and [`Refill`] coalesces the requests of
//! a burst into one pass. A pass that pushed wakes this
//! process's consumers of the kind ([`Dispatcher::pushed`]): the queue is kept only one round
//! deep, so a worker that found it empty a moment before must not sit out its idle poll.

use serde_json::Value;
use sqlx::PgPool;
use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::{model::QueueMessage, queue::Queues};

/// Advisory lock class of dispatch passes (with the kind's hash as the second key).
const LOCK_CLASS: i32 = 0x6469_7370; // "disp"

#[derive(Clone)]
pub struct Dispatcher {
    pool: PgPool,
    queues: Queues,
    /// A worker silent this long no longer counts towards a kind's slots.
    pub live_within: Duration,
    /// Jobs a kind's queue may hold even with no live worker (one starting finds work).
    pub min_window: i64,
    /// Jobs in flight per tenant and kind when the tenant has no `max_running` of its own;
    /// `None`: no cap.
    pub default_max_running: Option<i64>,
    pushed: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
}

/// One tenant's standing in a pass.
struct Share {
    tenant: Uuid,
    in_flight: i64,
    cap: Option<i64>,
    weight: i64,
    held: VecDeque<QueueMessage>,
}

impl Share {
    fn eligible(&self) -> bool {
        !self.held.is_empty() && self.cap.is_none_or(|cap| self.in_flight < cap)
    }
}

impl Dispatcher {
    pub fn new(pool: PgPool, queues: Queues, settings: &crate::Settings) -> Self {
        Self {
            pool,
            queues,
            live_within: settings.rescue_after,
            min_window: settings.dispatch_min_window,
            default_max_running: settings.default_max_running,
            pushed: Default::default(),
        }
    }

    /// Notified (one stored permit, so a burst of passes coalesces) whenever a pass of this
    /// process pushes jobs of `kind`.
    pub fn pushed(&self, kind: &str) -> Arc<Notify> {
        let mut pushed = self.pushed.lock().expect("pushed lock");
        pushed.entry(kind.to_owned()).or_default().clone()
    }

    /// One pass for `kind`: records the chosen jobs as dispatched, commits, then pushes them in
    /// the order chosen (committed first, so a job a worker takes at once already counts). A
    /// failed push takes the records back, leaving the jobs held for the next pass; if that
    /// fails too, the stale sweep pushes them later. Returns how many were pushed.
    pub async fn dispatch(&self, kind: &str) -> anyhow::Result<usize> {
        let mut tx = self.pool.begin().await?;
        let chosen = self.choose(&mut tx, kind).await?;
        if chosen.is_empty() {
            return Ok(0);
        }
        tx.commit().await?;
        if let Err(e) = self.queues.push(kind, &chosen).await {
            let ids: Vec<Uuid> = chosen.iter().map(|m| m.job_id).collect();
            sqlx::query("DELETE FROM dispatched_jobs WHERE job_id = ANY($1)")
                .bind(&ids)
                .execute(&self.pool)
                .await?;
            return Err(e);
        }
        if let Some(consumers) = self.pushed.lock().expect("pushed lock").get(kind) {
            consumers.notify_one();
        }
        Ok(chosen.len())
    }

    async fn choose(
        &self,
        tx: &mut sqlx::PgConnection,
        kind: &str,
    ) -> sqlx::Result<Vec<QueueMessage>> {
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
            .bind(LOCK_CLASS)
            .bind(kind)
            .execute(&mut *tx)
            .await?;
        let (slots, in_flight): (i64, i64) = sqlx::query_as(
            "SELECT
                 (SELECT coalesce(sum((queues->>$1)::bigint), 0)::bigint FROM workers
                  WHERE stopped_at IS NULL AND heartbeat_at > now() - make_interval(secs => $2)
                    AND jsonb_typeof(queues->$1) = 'number'),
                 (SELECT count(*) FROM dispatched_jobs WHERE kind = $1)",
        )
        .bind(kind)
        .bind(self.live_within.as_secs_f64())
        .fetch_one(&mut *tx)
        .await?;
        // The slots, busy or about to be, and a round of them waiting in Redis.
        let free = slots + slots.max(self.min_window) - in_flight;
        if free <= 0 {
            return Ok(Vec::new());
        }
        // Held: queued with no dispatch record. Each tenant's scan steps over its jobs in
        // flight (at most a round of slots), found through the record's primary key.
        let held: Vec<(Uuid, Uuid, i32)> = sqlx::query_as(
            "WITH RECURSIVE tenants AS (
                 (SELECT j.tenant_id FROM jobs j
                  WHERE j.kind = $1 AND j.status = 'queued'
                    AND NOT EXISTS (SELECT 1 FROM dispatched_jobs d WHERE d.job_id = j.id)
                  ORDER BY j.tenant_id LIMIT 1)
                 UNION ALL
                 SELECT (SELECT j.tenant_id FROM jobs j
                         WHERE j.kind = $1 AND j.status = 'queued' AND j.tenant_id > t.tenant_id
                           AND NOT EXISTS (SELECT 1 FROM dispatched_jobs d WHERE d.job_id = j.id)
                         ORDER BY j.tenant_id LIMIT 1)
                 FROM tenants t WHERE t.tenant_id IS NOT NULL
             )
             SELECT c.tenant_id, c.id, c.attempt FROM tenants t
             CROSS JOIN LATERAL (
                 SELECT j.tenant_id, j.id, j.attempt FROM jobs j
                 WHERE j.kind = $1 AND j.tenant_id = t.tenant_id AND j.status = 'queued'
                   AND NOT EXISTS (SELECT 1 FROM dispatched_jobs d WHERE d.job_id = j.id)
                 ORDER BY j.priority DESC, j.id LIMIT $2) c
             WHERE t.tenant_id IS NOT NULL",
        )
        .bind(kind)
        .bind(free)
        .fetch_all(&mut *tx)
        .await?;
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let mut shares: Vec<Share> = Vec::new();
        for (tenant, id, attempt) in held {
            if shares.last().is_none_or(|s| s.tenant != tenant) {
                shares.push(Share {
                    tenant,
                    in_flight: 0,
                    cap: self.default_max_running,
                    weight: 1,
                    held: VecDeque::new(),
                });
            }
            let share = shares.last_mut().expect("pushed above");
            share.held.push_back(QueueMessage {
                job_id: id,
                generation: attempt,
            });
        }
        let tenants: Vec<Uuid> = shares.iter().map(|s| s.tenant).collect();
        let standings: Vec<(Uuid, i64, Option<Value>, Option<i32>)> = sqlx::query_as(
            "SELECT t.id,
                    (SELECT count(*) FROM dispatched_jobs d
                     WHERE d.kind = $2 AND d.tenant_id = t.id),
                    l.max_running -> $2, l.weight
             FROM unnest($1::uuid[]) AS t(id) LEFT JOIN tenant_limits l ON l.tenant_id = t.id",
        )
        .bind(&tenants)
        .bind(kind)
        .fetch_all(&mut *tx)
        .await?;
        // Matched by tenant: a join returns its rows in whatever order its plan makes.
        let standings: HashMap<Uuid, _> = standings
            .into_iter()
            .map(|(tenant, in_flight, cap, weight)| (tenant, (in_flight, cap, weight)))
            .collect();
        for share in &mut shares {
            let Some((in_flight, cap, weight)) = standings.get(&share.tenant) else {
                continue;
            };
            share.in_flight = *in_flight;
            if let Some(cap) = cap.as_ref().and_then(Value::as_i64) {
                share.cap = Some(cap);
            }
            share.weight = weight.unwrap_or(1).max(1) as i64;
        }
        let chosen = fair_share(&mut shares, free as usize);
        let ids: Vec<Uuid> = chosen.iter().map(|m| m.job_id).collect();
        // Only jobs still queued: one cancelled since the read above is not recorded. (A
        // cancel that commits after this statement removes the record itself.)
        let marked: Vec<Uuid> = sqlx::query_scalar(
            "INSERT INTO dispatched_jobs (job_id, kind, tenant_id)
             SELECT id, kind, tenant_id FROM jobs WHERE id = ANY($1) AND status = 'queued'
             ON CONFLICT (job_id) DO NOTHING
             RETURNING job_id",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        let marked: std::collections::HashSet<Uuid> = marked.into_iter().collect();
        Ok(chosen
            .into_iter()
            .filter(|m| marked.contains(&m.job_id))
            .collect())
    }
}

/// Takes up to `free` jobs, one at a time, from the eligible tenant with the fewest jobs in
/// flight per unit of weight; ties go to the tenant whose next job is oldest (UUIDv7 ids).
fn fair_share(shares: &mut [Share], free: usize) -> Vec<QueueMessage> {
    let mut chosen = Vec::with_capacity(free);
    while chosen.len() < free {
        let next = shares.iter_mut().filter(|s| s.eligible()).min_by(|a, b| {
            // a.in_flight / a.weight < b.in_flight / b.weight, without division.
            (a.in_flight * b.weight)
                .cmp(&(b.in_flight * a.weight))
                .then_with(|| a.held[0].job_id.cmp(&b.held[0].job_id))
        });
        let Some(share) = next else { break };
        chosen.push(share.held.pop_front().expect("eligible shares hold jobs"));
        share.in_flight += 1;
    }
    chosen
}

/// When ended attempts ask for a pass: once a quarter of this process's slots for the kind have
/// freed since the last ask (every time for a kind not paced). A draining queue then costs a pass
/// per several jobs instead of one per finish, and no slot idles meanwhile: a pass leaves a
/// round of jobs waiting in Redis.
#[derive(Default)]
struct Paces(HashMap<String, Pace>);

struct Pace {
    freed: usize,
    every: usize,
}

impl Paces {
    fn set(&mut self, kind: &str, slots: usize) {
        let every = (slots / 4).max(1);
        self.0.insert(kind.to_owned(), Pace { freed: 0, every });
    }

    /// Counts one freed slot; true when that asks for a pass.
    fn freed(&mut self, kind: &str) -> bool {
        let Some(pace) = self.0.get_mut(kind) else {
            return true;
        };
        pace.freed += 1;
        if pace.freed < pace.every {
            return false;
        }
        pace.freed = 0;
        true
    }
}

/// Runs dispatch passes in the background, one kind at a time each, coalescing requests: a
/// request made while a pass of its kind runs causes one more pass after it, however many come.
#[derive(Clone)]
pub struct Refill {
    dispatcher: Dispatcher,
    kinds: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
    failures: Arc<AtomicU64>,
    paces: Arc<Mutex<Paces>>,
}

impl Refill {
    pub fn new(dispatcher: Dispatcher) -> Self {
        Self {
            dispatcher,
            kinds: Default::default(),
            failures: Default::default(),
            paces: Default::default(),
        }
    }

    /// Paces the passes after ended attempts of `kind` by this process's `slots` for it: see
    /// [`Refill::freed`].
    pub fn pace(&self, kind: &str, slots: usize) {
        self.paces.lock().expect("paces lock").set(kind, slots);
    }

    /// An attempt of `kind` ended here and freed a slot: asks for a pass when [`Paces`] says.
    pub fn freed(&self, kind: &str) {
        if self.paces.lock().expect("paces lock").freed(kind) {
            self.request(kind);
        }
    }

    /// Passes that failed (Redis or PostgreSQL away), for `/metrics`.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// Asks for a pass of `kind` soon; never waits.
    pub fn request(&self, kind: &str) {
        let mut kinds = self.kinds.lock().expect("refill lock");
        if let Some(wake) = kinds.get(kind) {
            wake.notify_one();
            return;
        }
        let wake = Arc::new(Notify::new());
        wake.notify_one();
        kinds.insert(kind.to_owned(), wake.clone());
        let (dispatcher, kind) = (self.dispatcher.clone(), kind.to_owned());
        let failures = self.failures.clone();
        tokio::spawn(async move {
            loop {
                wake.notified().await;
                if let Err(e) = dispatcher.dispatch(&kind).await {
                    failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(queue = %kind, error = %e, "dispatch failed; the next pass retries");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(tenant: u128, in_flight: i64, cap: Option<i64>, weight: i64, jobs: &[u128]) -> Share {
        Share {
            tenant: Uuid::from_u128(tenant),
            in_flight,
            cap,
            weight,
            held: jobs
                .iter()
                .map(|&j| QueueMessage {
                    job_id: Uuid::from_u128(j),
                    generation: 0,
                })
                .collect(),
        }
    }

    fn ids(chosen: &[QueueMessage]) -> Vec<u128> {
        chosen.iter().map(|m| m.job_id.as_u128()).collect()
    }

    /// A tenant with a deep backlog and slots in flight yields to one arriving late, until
    /// their shares are even; then they alternate, the older job first.
    #[test]
    fn a_pass_after_every_quarter_of_the_slots_freed() {
        let mut paces = Paces::default();
        paces.set("import", 16);
        paces.set("patch", 2);
        let asks = |paces: &mut Paces, kind: &str| -> Vec<bool> {
            (0..9).map(|_| paces.freed(kind)).collect()
        };
        let every_fourth = [false, false, false, true].repeat(3);
        assert_eq!(asks(&mut paces, "import"), every_fourth[..9]);
        assert_eq!(asks(&mut paces, "patch"), [true; 9]);
        assert_eq!(asks(&mut paces, "not paced"), [true; 9]);
    }

    #[test]
    fn the_fewest_in_flight_goes_next_then_tenants_alternate() {
        let mut shares = [
            share(1, 4, None, 1, &[10, 11, 12, 13, 14, 15]),
            share(2, 0, None, 1, &[20, 21, 22, 23, 24, 25, 26]),
        ];
        let chosen = fair_share(&mut shares, 9);
        assert_eq!(ids(&chosen), [20, 21, 22, 23, 10, 24, 11, 25, 12]);
    }

    #[test]
    fn a_cap_stops_a_tenant_and_others_take_its_turns() {
        let mut shares = [
            share(1, 1, Some(2), 1, &[10, 11, 12]),
            share(2, 3, None, 1, &[20, 21, 22]),
        ];
        assert_eq!(ids(&fair_share(&mut shares, 5)), [10, 20, 21, 22]);
    }

    #[test]
    fn weight_buys_a_proportional_share() {
        let mut shares = [
            share(1, 0, None, 3, &[10, 11, 12, 13, 14, 15]),
            share(2, 0, None, 1, &[20, 21, 22, 23, 24, 25]),
        ];
        let chosen = ids(&fair_share(&mut shares, 8));
        let first = chosen.iter().filter(|&&j| j < 20).count();
        assert_eq!(first, 6, "{chosen:?}");
    }
}
