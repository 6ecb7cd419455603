//! Fair dispatch: which queued jobs a worker takes next, and how workers hear of them.
//!
//! A queued job waits in PostgreSQL until a worker with a free slot claims it: the
//! `claim_jobs` function ([`crate::claims::claim_jobs`], one round trip) chooses a kind's held
//! jobs by fair share and marks them running for that worker (fair share and caps count a
//! tenant's running jobs through the `jobs_running` index). The next job goes to the tenant
//! with the fewest jobs running per unit of weight, decided at the moment a slot is free, so a
//! tenant arriving behind another's backlog of thousands starts as soon as any slot frees. A
//! tenant's `max_running` for the kind caps its running jobs across all workers. Within a
//! tenant, higher `priority` goes first, then older jobs. Claims of one kind are serialized by
//! a transaction-scoped advisory lock, so two workers never count the same share twice.
//!
//! A claim normally resumes each tenant's scan after the last job claimed for it
//! (`dispatch_cursors`): every queued job before that is running, so the claim reads only what
//! it takes, however many jobs ran before. A job that becomes queued (submitted, promoted,
//! retried, handed back, rescued) may lie before a cursor, so whoever queued it announces the
//! kind ([`Refill::request`]): every worker process serving the kind is woken (Redis Pub/Sub,
//! and [`Dispatcher::queued`] within the process) and makes its next claim full. Workers also
//! claim in full after finding nothing and at least every [`FULL_CLAIM_EVERY`], so a lost
//! announcement delays a job, never strands it.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};
use tokio::sync::Notify;

use crate::queue::Queues;

/// The longest a worker claims by resuming before it claims in full again (see the module).
pub const FULL_CLAIM_EVERY: Duration = Duration::from_secs(1);

/// Tells the workers serving a kind that jobs of it became queued.
#[derive(Clone)]
pub struct Dispatcher {
    queues: Queues,
    queued: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
}

impl Dispatcher {
    pub fn new(queues: Queues) -> Self {
        Self {
            queues,
            queued: Default::default(),
        }
    }

    /// Notified (one stored permit, so a burst coalesces) whenever jobs of `kind` are announced
    /// as queued, by this process or, through Redis, another.
    pub fn queued(&self, kind: &str) -> Arc<Notify> {
        let mut queued = self.queued.lock().expect("queued lock");
        queued.entry(kind.to_owned()).or_default().clone()
    }

    /// Wakes this process's consumers of `kind` (see [`Dispatcher::queued`]).
    pub fn wake(&self, kind: &str) {
        if let Some(consumers) = self.queued.lock().expect("queued lock").get(kind) {
            consumers.notify_one();
        }
    }

    /// Announces that jobs of `kind` became queued: to this process's consumers, and through
    /// Redis Pub/Sub to every other's.
    pub async fn announce(&self, kind: &str) -> anyhow::Result<()> {
        self.wake(kind);
        self.queues.announce_queued(kind).await
    }
}

/// A kind's pending announcement.
struct Wanted {
    wake: Notify,
    pending: AtomicBool,
}

/// Announces kinds in the background, coalescing requests: a request made while an
/// announcement of its kind is on its way causes one more after it, however many come.
#[derive(Clone)]
pub struct Refill {
    dispatcher: Dispatcher,
    kinds: Arc<Mutex<HashMap<String, Arc<Wanted>>>>,
    failures: Arc<AtomicU64>,
}

impl Refill {
    pub fn new(dispatcher: Dispatcher) -> Self {
        Self {
            dispatcher,
            kinds: Default::default(),
            failures: Default::default(),
        }
    }

    /// Announcements that failed (Redis away), for `/metrics`.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// Announces soon that jobs of `kind` became queued; never waits. This process's consumers
    /// are woken at once.
    pub fn request(&self, kind: &str) {
        self.dispatcher.wake(kind);
        let mut kinds = self.kinds.lock().expect("refill lock");
        if let Some(wanted) = kinds.get(kind) {
            wanted.pending.store(true, Ordering::SeqCst);
            wanted.wake.notify_one();
            return;
        }
        let wanted = Arc::new(Wanted {
            wake: Notify::new(),
            pending: AtomicBool::new(true),
        });
        wanted.wake.notify_one();
        kinds.insert(kind.to_owned(), wanted.clone());
        let (dispatcher, kind) = (self.dispatcher.clone(), kind.to_owned());
        let failures = self.failures.clone();
        tokio::spawn(async move {
            loop {
                wanted.wake.notified().await;
                if !wanted.pending.swap(false, Ordering::SeqCst) {
                    continue;
                }
                if let Err(e) = dispatcher.queues.announce_queued(&kind).await {
                    failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(queue = %kind, error = %e, "queued jobs not announced; workers find them at their idle poll");
                }
            }
        });
    }
}
