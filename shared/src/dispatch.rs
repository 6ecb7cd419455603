//! Fair dispatch: which queued jobs go onto a kind's Redis queue, and when.
//!
//! A queued job waits in PostgreSQL (held) until a pass of [`Dispatcher`] pushes it and records it
//! in `dispatched_jobs`, where it stays while in flight (pushed or running): a narrow, unlogged
//! row, so dispatching a job never rewrites the job's own row nor waits for a WAL flush (after a
//! crash empties the table, the maintenance `dispatcher` duty records the running jobs again). A
//! pass (the `dispatch_pass` function, one round trip) keeps a kind in flight up to its live
//! workers' slots plus two rounds of them waiting in Redis (at least
//! [`Dispatcher::min_window`]) and fills that across the tenants with held jobs by fair share: the
//! next job goes to the tenant with the fewest jobs in flight per unit of weight, so a tenant
//! arriving behind another's backlog of thousands starts within about two rounds of slots. A
//! tenant's `max_running` for the kind caps its jobs in flight, so it caps its running jobs across
//! all workers. Within a tenant, higher `priority` goes first, then older jobs.
//!
//! A pass after freed slots ([`Pass::Resume`]) starts each tenant's scan after the last job a
//! pass chose for it (`dispatch_cursors`): every held job before that is in flight, so the pass
//! reads only what it takes, however many jobs ran before. A job that becomes queued may lie
//! before a cursor, so every pass asked for then is full ([`Pass::Full`]), as the maintenance
//! duty's are.
//!
//! Passes of one kind are serialized by a transaction-scoped advisory lock, so two API or worker
//! processes never count the same free slot twice. Passes run after submissions, after a
//! worker's finished attempts have freed as many slots as it has ([`Refill::freed`]) and
//! periodically (the maintenance `dispatcher` duty), and [`Refill`] coalesces the requests of
//! a burst into one pass. A pass that pushed wakes the consumers of the kind in this process
//! ([`Dispatcher::pushed`]) and, through Redis Pub/Sub, in every other: the queue is kept only
//! two rounds deep, so a worker that found it empty a moment before must not sit out its idle
//! poll.

use sqlx::PgPool;
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::{model::QueueMessage, queue::Queues};

/// Where a pass looks for held jobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// From each tenant's first queued job: after a job became queued (submitted, promoted,
    /// retried, handed back) it may lie before where the last pass stopped.
    Full,
    /// After the last job a pass chose for each tenant: enough when only slots freed.
    Resume,
}

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

    /// One full pass for `kind`: see [`Dispatcher::pass`].
    pub async fn dispatch(&self, kind: &str) -> anyhow::Result<usize> {
        self.pass(kind, Pass::Full).await
    }

    /// One pass for `kind` (the `dispatch_pass` function: one round trip, which records the
    /// chosen jobs and commits), then pushes them in the order chosen (committed first, so a job
    /// a worker takes at once already counts). A failed push takes the records back, leaving the
    /// jobs held for the next pass (which starts from each tenant's first job); if that fails
    /// too, the stale sweep pushes them later. Returns how many were pushed.
    pub async fn pass(&self, kind: &str, pass: Pass) -> anyhow::Result<usize> {
        let chosen: Vec<QueueMessage> = sqlx::query_as::<_, (Uuid, i32)>(
            "SELECT job_id, generation FROM dispatch_pass($1, $2, $3, $4, $5)",
        )
        .bind(kind)
        .bind(self.live_within.as_secs_f64())
        .bind(self.min_window)
        .bind(self.default_max_running)
        .bind(pass == Pass::Resume)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|(job_id, generation)| QueueMessage { job_id, generation })
        .collect();
        if chosen.is_empty() {
            return Ok(0);
        }
        if let Err(e) = self.queues.push(kind, &chosen).await {
            let ids: Vec<Uuid> = chosen.iter().map(|m| m.job_id).collect();
            sqlx::query(
                "WITH taken_back AS (DELETE FROM dispatched_jobs WHERE job_id = ANY($1))
                 UPDATE dispatch_cursors SET priority = NULL, job_id = NULL WHERE kind = $2",
            )
            .bind(&ids)
            .bind(kind)
            .execute(&self.pool)
            .await?;
            return Err(e);
        }
        self.wake(kind);
        // Other processes' consumers too: one that found the queue empty a moment ago would
        // otherwise sit out its idle poll with slots free.
        if let Err(e) = self.queues.announce_pushed(kind).await {
            tracing::debug!(queue = %kind, error = %e, "push not announced");
        }
        Ok(chosen.len())
    }

    /// Wakes this process's consumers of `kind` (see [`Dispatcher::pushed`]).
    pub fn wake(&self, kind: &str) {
        if let Some(consumers) = self.pushed.lock().expect("pushed lock").get(kind) {
            consumers.notify_one();
        }
    }
}

/// When ended attempts ask for a pass: once as many attempts of the kind as this process has
/// slots for it have ended since the last ask (every time for a kind not paced). A draining
/// queue then costs a pass per round of slots instead of one per finish, and no slot idles
/// meanwhile: a pass leaves two rounds of jobs waiting in Redis, so one round has ended before
/// the queue holds less than a round.
#[derive(Default)]
struct Paces(HashMap<String, Pace>);

struct Pace {
    freed: usize,
    every: usize,
}

impl Paces {
    fn set(&mut self, kind: &str, slots: usize) {
        let every = slots.max(1);
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

/// A kind's pending pass: the wake-up of its task, and whether the pass must be full.
struct Wanted {
    wake: Notify,
    full: AtomicBool,
}

/// Runs dispatch passes in the background, one kind at a time each, coalescing requests: a
/// request made while a pass of its kind runs causes one more pass after it, however many come
/// (a full one if any asked for that).
#[derive(Clone)]
pub struct Refill {
    dispatcher: Dispatcher,
    kinds: Arc<Mutex<HashMap<String, Arc<Wanted>>>>,
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

    /// An attempt of `kind` ended here and freed a slot: asks for a pass when [`Paces`] says,
    /// one that resumes where the last stopped (no job became queued).
    pub fn freed(&self, kind: &str) {
        if self.paces.lock().expect("paces lock").freed(kind) {
            self.want(kind, Pass::Resume);
        }
    }

    /// Passes that failed (Redis or PostgreSQL away), for `/metrics`.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// Asks for a full pass of `kind` soon (jobs became queued); never waits.
    pub fn request(&self, kind: &str) {
        self.want(kind, Pass::Full);
    }

    fn want(&self, kind: &str, pass: Pass) {
        let mut kinds = self.kinds.lock().expect("refill lock");
        if let Some(wanted) = kinds.get(kind) {
            if pass == Pass::Full {
                wanted.full.store(true, Ordering::SeqCst);
            }
            wanted.wake.notify_one();
            return;
        }
        // A kind's first pass is full, whoever asks.
        let wanted = Arc::new(Wanted {
            wake: Notify::new(),
            full: AtomicBool::new(true),
        });
        wanted.wake.notify_one();
        kinds.insert(kind.to_owned(), wanted.clone());
        let (dispatcher, kind) = (self.dispatcher.clone(), kind.to_owned());
        let failures = self.failures.clone();
        tokio::spawn(async move {
            loop {
                wanted.wake.notified().await;
                let pass = if wanted.full.swap(false, Ordering::SeqCst) {
                    Pass::Full
                } else {
                    Pass::Resume
                };
                if let Err(e) = dispatcher.pass(&kind, pass).await {
                    failures.fetch_add(1, Ordering::Relaxed);
                    // The jobs a failed pass left may lie before the cursors.
                    wanted.full.store(true, Ordering::SeqCst);
                    tracing::warn!(queue = %kind, error = %e, "dispatch failed; the next pass retries");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_after_every_round_of_slots_freed() {
        let mut paces = Paces::default();
        paces.set("import", 8);
        paces.set("patch", 1);
        let asks = |paces: &mut Paces, kind: &str| -> Vec<bool> {
            (0..9).map(|_| paces.freed(kind)).collect()
        };
        let every_eighth = [false, false, false, false, false, false, false, true, false];
        assert_eq!(asks(&mut paces, "import"), every_eighth);
        assert_eq!(asks(&mut paces, "patch"), [true; 9]);
        assert_eq!(asks(&mut paces, "not paced"), [true; 9]);
    }
}
