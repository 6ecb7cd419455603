//! Runs jobs: claim them, run each handler, record the outcome, announce every change.

use chrono::Utc;
use futures::FutureExt;
use serde_json::{json, Value};
use shared::{
    batch::{BatchError, Batcher},
    claims::{self, Claimed},
    db::Session,
    dispatch::{Dispatcher, Refill, FULL_CLAIM_EVERY},
    events::{Event, EventLog, EventType},
    objects::ObjectStore,
    pipelines,
    queue::Queues,
    rates::Buckets,
    store::{self, Outcome},
    usage::{CpuTimed, Meter, Usage},
    Job, JobContext, JobStatus, Settings,
};
use sqlx::PgPool;
use std::{
    collections::{HashMap, HashSet},
    panic::AssertUnwindSafe,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::QueueSpec;
use jobs::{JobError, Registry};

pub struct Runtime {
    settings: Settings,
    name: String,
    /// How tenants see this worker (`shared::leader::public_name`), in its jobs' events.
    public_name: String,
    pool: PgPool,
    events: EventLog,
    queues: Queues,
    /// The tenants' submission buckets, which schedules' firings draw on.
    buckets: Buckets,
    refill: Refill,
    objects: ObjectStore,
    registry: Registry,
    /// Checks a pipeline step's resolved payload before its job is created.
    contracts: contracts::Registry,
    queue_spec: Value,
    running: Mutex<HashMap<Uuid, RunningJob>>,
    /// Claims on their way: their jobs are not in `running` yet.
    claiming: AtomicUsize,
    /// Held (shared) by each claim until its jobs are registered in `running`, and alone while
    /// the rows running here that `running` does not know are handed back.
    registering: tokio::sync::RwLock<()>,
    idle: tokio::sync::Notify,
    /// When the last heartbeat that arrived was sent: the lease runs from there.
    leased_at: Mutex<tokio::time::Instant>,
    /// Claims and finishes: a session each that plans its statements once.
    queue_pool: PgPool,
    /// Heartbeats alone: behind handlers and maintenance in `pool`, a heartbeat waited for a
    /// connection as long as the lease lasts, and the worker stopped its own jobs.
    lease_pool: PgPool,
    // Outcomes of concurrent jobs share round trips, each batch with its events; other
    // changes' events (hand-backs, queued jobs) share the announcements'.
    finishes: Batcher<store::Finish, Option<store::Ended>>,
    announcements: Batcher<(Uuid, Event), ()>,
}

/// How long the stray hand-back waits for the claims on their way to end (see
/// `Runtime::hand_back_strays`): a busy worker always had one, and its strays were never
/// handed back.
const CLAIMS_OUT_OF_THE_WAY: Duration = Duration::from_secs(1);

/// Most items one batched round trip carries.
const BATCH: usize = 256;

/// How long a claim or a finish under load waits for more of its kind to share its round trip:
/// a statement costs PostgreSQL about as much as twenty more rows (a finish of 16 jobs took
/// 0.47 ms, of 64 jobs 1.25 ms), and a drain's batches were ~14 jobs without it.
const LINGER: Duration = Duration::from_millis(1);

/// Outcomes being written, per slot of a queue, beyond the slots themselves (see `execute`):
/// several slots' worth, so that a fast queue's claims do not wait for its last batches'
/// finishes.
const WRITING_PER_SLOT: usize = 3;

/// How long a handler asked to stop (a cancel, a shutdown's interrupt) has to return before
/// it is dropped where it waits. Handlers stop at their next check; one waiting on a tenant's
/// server that stopped answering (a COPY never acknowledged) would never get there and hold
/// its slot for ever. Shorter than a shutdown's hand-back, so such a job is handed back too.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// How much longer a handler asked to stop may take while it publishes what it made (see
/// `JobContext::committing`): a commit or an upload ends on its own, but a tenant's server may
/// never acknowledge it.
const COMMIT_GRACE: Duration = Duration::from_secs(300);

/// How long a worker whose claim failed (PostgreSQL away) waits before claiming again.
const CLAIM_RETRY: Duration = Duration::from_secs(1);

/// The free slots one claim asks for, handed out one per job claimed; those left over free
/// again when this drops.
struct Slots(Vec<OwnedSemaphorePermit>);

impl Slots {
    /// `first` and every other slot free now; with `linger_for`, first waits up to [`LINGER`]
    /// until that many are free in all.
    async fn gather(
        slots: &Arc<Semaphore>,
        first: OwnedSemaphorePermit,
        linger_for: Option<u32>,
    ) -> Self {
        let mut permits = vec![first];
        if let Some(more) = linger_for.map(|n| n.saturating_sub(1)).filter(|n| *n > 0) {
            let more = slots.clone().acquire_many_owned(more);
            if let Ok(Ok(more)) = tokio::time::timeout(LINGER, more).await {
                permits.push(more);
            }
        }
        while let Ok(permit) = slots.clone().try_acquire_owned() {
            permits.push(permit);
        }
        Self(permits)
    }

    fn len(&self) -> usize {
        self.0.iter().map(OwnedSemaphorePermit::num_permits).sum()
    }

    fn take(&mut self) -> OwnedSemaphorePermit {
        let last = self.0.last_mut().expect("a slot per job claimed");
        match last.num_permits() {
            1 => self.0.pop().expect("a slot per job claimed"),
            _ => last.split(1).expect("more than one slot"),
        }
    }
}

/// Counts a claim as on its way until dropped (see [`Runtime::wait_idle`]).
struct Claiming<'a>(&'a Runtime);

impl<'a> Claiming<'a> {
    fn new(runtime: &'a Runtime) -> Self {
        runtime.claiming.fetch_add(1, Ordering::SeqCst);
        Self(runtime)
    }
}

impl Drop for Claiming<'_> {
    fn drop(&mut self) {
        self.0.claiming.fetch_sub(1, Ordering::SeqCst);
        if self.0.is_idle() {
            self.0.idle.notify_waiters();
        }
    }
}

#[derive(Clone)]
struct RunningJob {
    token: CancellationToken,
    /// Set when the worker itself stops the job (shutdown), as opposed to a user's cancel.
    interrupted: Arc<AtomicBool>,
    /// Cancelled once this attempt's handler has returned (or was dropped).
    ended: CancellationToken,
    /// An earlier attempt of the same job still running here, which this one waits for.
    after: Option<CancellationToken>,
    /// The attempt's open commit sections (its context's, see `JobContext::committing`).
    committing: Arc<AtomicUsize>,
}

impl Runtime {
    pub async fn connect(
        settings: Settings,
        registry: Registry,
        name: String,
        queues: &QueueSpec,
    ) -> anyhow::Result<Self> {
        let concurrency: usize = queues.0.iter().map(|(_, n)| n).sum();
        // Control-plane writes are short: a small pool serves many concurrent jobs.
        let pool_size = (concurrency as u32 + 4).min(24);
        let pool = shared::db::connect(&settings.database_url, pool_size).await?;
        shared::db::migrate(&pool).await?;
        // A claim per queue served and the finishes (one round trip of each at a time): none
        // waits for another's connection.
        let claimers = queues.0.len() as u32 + 1;
        let queue_pool = shared::db::connect_queue(&settings.database_url, claimers).await?;
        let lease_pool = shared::db::connect(&settings.database_url, 1).await?;
        let redis = shared::redis_conn::Redis::open(&settings.redis_url)?
            .manager()
            .await?;
        let events = EventLog::new(
            redis.clone(),
            &settings.redis_prefix,
            settings.tenant_stream_maxlen,
            settings.events_ttl,
        );
        let queue_spec = json!(queues.0.iter().cloned().collect::<HashMap<_, _>>());
        // A finish answers once its outcomes' events are appended: a job's stream must hold its
        // outcome before a claim may take the job again or its pipeline move on.
        let finishes = {
            // The batcher runs one batch at a time: the lock is never waited for.
            let session = Arc::new(tokio::sync::Mutex::new(Session::new(queue_pool.clone())));
            let events = events.clone();
            let finish = move |items: Vec<store::Finish>| {
                let (session, events) = (session.clone(), events.clone());
                async move {
                    let mut session = session.lock().await;
                    let finished = match session.conn().await {
                        Ok(conn) => store::finish_many(conn, &items).await,
                        Err(e) => Err(e),
                    };
                    // A statement PostgreSQL refused for one outcome's sake is sent again
                    // outcome by outcome (a finish is one statement, fenced by attempt: safe to
                    // send again); a lost connection is answered to all at once.
                    let rows = finished.map_err(|e| {
                        session.discard();
                        match refused_value(&e) {
                            Some(code) => {
                                tracing::warn!(error = %e, "a finish batch was refused");
                                BatchError::Refused(format!("SQLSTATE {code}"))
                            }
                            None => BatchError::Failed(e.to_string()),
                        }
                    })?;
                    drop(session);
                    let outcomes: Vec<(Uuid, Event)> = rows
                        .iter()
                        .zip(&items)
                        .filter_map(|(row, item)| {
                            let row = row.as_ref()?;
                            Some((row.tenant_id, ended(row, Some(item.outcome.as_ref()))))
                        })
                        .collect();
                    append_announcing(&events, &outcomes).await;
                    Ok(rows)
                }
            };
            Batcher::spawn_lingering(BATCH, LINGER, finish)
        };
        let announcements = {
            let events = events.clone();
            Batcher::spawn(BATCH, move |items: Vec<(Uuid, Event)>| {
                let events = events.clone();
                async move {
                    let n = items.len();
                    let failed = |e: redis::RedisError| BatchError::Failed(e.to_string());
                    events.append(&items).await.map_err(failed)?;
                    Ok(vec![(); n])
                }
            })
        };
        let buckets = Buckets::new(redis.clone(), &settings);
        let queues = Queues::new(redis, &settings.redis_prefix);
        let refill = Refill::new(Dispatcher::new(queues.clone()));
        Ok(Self {
            queue_pool,
            lease_pool,
            finishes,
            announcements,
            queues,
            buckets,
            refill,
            objects: ObjectStore::from_settings(&settings)?,
            settings,
            public_name: shared::leader::public_name(&name),
            name,
            pool,
            events,
            registry,
            contracts: contracts::Registry::standard(),
            queue_spec,
            running: Mutex::new(HashMap::new()),
            claiming: AtomicUsize::new(0),
            registering: tokio::sync::RwLock::new(()),
            idle: tokio::sync::Notify::new(),
            leased_at: Mutex::new(tokio::time::Instant::now()),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    #[cfg(test)]
    pub(crate) fn refill(&self) -> &Refill {
        &self.refill
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    pub(crate) fn events(&self) -> &EventLog {
        &self.events
    }

    pub(crate) fn buckets(&self) -> &Buckets {
        &self.buckets
    }

    pub(crate) fn objects(&self) -> &ObjectStore {
        &self.objects
    }

    /// Serves one queue until `stop`: claims jobs for its free slots and runs each in a task
    /// of its own. Under a backlog a claim waits up to [`LINGER`] for all the slots to be free
    /// (a batch's handlers return together), so that one round trip takes many jobs; otherwise
    /// it takes what a free slot asks for at once. A queue found empty is claimed from again
    /// when jobs of its kind are announced, at the idle poll otherwise.
    pub(crate) async fn serve_queue(
        self: Arc<Self>,
        kind: String,
        concurrency: usize,
        stop: CancellationToken,
    ) {
        let slots = Arc::new(Semaphore::new(concurrency));
        // Outcomes being written after their slot was freed (see `execute`).
        let writing = Arc::new(Semaphore::new(WRITING_PER_SLOT * concurrency));
        let queued = self.refill.dispatcher().queued(&kind);
        let mut full_at: Option<tokio::time::Instant> = None;
        let mut full_next = true;
        let mut backlog = false;
        let mut session = Session::new(self.queue_pool.clone());
        loop {
            let first = tokio::select! {
                biased;
                () = stop.cancelled() => return,
                permit = slots.clone().acquire_owned() => permit.expect("never closed"),
            };
            let mut free =
                Slots::gather(&slots, first, backlog.then_some(concurrency as u32)).await;
            let wanted = free.len();
            // Counted before the stop is looked at: a stopping worker waits for this claim.
            let claiming = Claiming::new(&self);
            if stop.is_cancelled() {
                return;
            }
            // An announcement since the last claim: a job may lie before a cursor.
            let announced = queued.notified().now_or_never().is_some();
            let full =
                full_next || announced || full_at.is_none_or(|at| at.elapsed() >= FULL_CLAIM_EVERY);
            let claimed = self.claim(&mut session, &kind, wanted, full).await;
            drop(claiming);
            let claimed = match claimed {
                Ok(claimed) => claimed,
                Err(e) => {
                    tracing::warn!(queue = %kind, error = %e, "claim failed; claiming again shortly");
                    session.discard();
                    drop(free);
                    full_next = true;
                    tokio::select! {
                        () = tokio::time::sleep(CLAIM_RETRY) => continue,
                        () = stop.cancelled() => return,
                    }
                }
            };
            if full {
                full_at = Some(tokio::time::Instant::now());
            }
            backlog = claimed.len() == wanted;
            full_next = claimed.is_empty() && !full;
            if claimed.is_empty() {
                drop(free);
                if full_next {
                    continue;
                }
                tokio::select! {
                    biased;
                    () = stop.cancelled() => return,
                    () = queued.notified() => full_next = true,
                    () = tokio::time::sleep(self.settings.idle_poll) => full_next = true,
                }
                continue;
            }
            for (job, running) in claimed {
                let slot = free.take();
                let (runtime, writing) = (self.clone(), writing.clone());
                tokio::spawn(async move {
                    runtime.execute(job, running, slot, &writing).await;
                });
            }
        }
    }

    /// Claims up to `wanted` jobs of `kind` (in full, or resuming after the cursors); answers
    /// once each is registered as running here (found by cancels from then on), the claim is
    /// durable and the jobs' `started` events are appended: a job's handler, and its events,
    /// must not run ahead of either. A claim not confirmed durable (PostgreSQL lost meanwhile)
    /// is handed back: its jobs may be running here in the rows, under a live lease.
    async fn claim(
        &self,
        session: &mut Session,
        kind: &str,
        wanted: usize,
        full: bool,
    ) -> anyhow::Result<Vec<(Claimed, RunningJob)>> {
        let _registering = self.registering.read().await;
        let conn = session.conn().await?;
        let jobs = claims::claim_jobs(
            &mut *conn,
            kind,
            &self.name,
            wanted,
            self.settings.default_max_running,
            !full,
        )
        .await?;
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let mut claimed = Vec::with_capacity(jobs.len());
        {
            let mut running = self.running.lock().expect("running lock");
            for job in jobs {
                // The job was rescued from this worker (its heartbeats did not arrive) and
                // claimed here again while its earlier attempt still runs: that attempt is
                // stopped, and this one starts once it has.
                let after = running.get(&job.id).map(|earlier| {
                    tracing::warn!(job = %job.id, "claimed again while an earlier attempt still ran here: that one is stopped");
                    earlier.token.cancel();
                    earlier.ended.clone()
                });
                let entry = RunningJob {
                    token: CancellationToken::new(),
                    interrupted: Arc::new(AtomicBool::new(false)),
                    ended: CancellationToken::new(),
                    after,
                    committing: Arc::default(),
                };
                running.insert(job.id, entry.clone());
                claimed.push((job, entry));
            }
        }
        let ids: Vec<Uuid> = claimed.iter().map(|(job, _)| job.id).collect();
        let confirmed = match claims::confirm_claims(conn, &self.name, &ids).await {
            Ok(confirmed) => confirmed.into_iter().collect::<HashMap<Uuid, bool>>(),
            Err(e) => {
                for (job, running) in &claimed {
                    self.record(job, Attempt::HandBack, Usage::default()).await;
                    self.unregister(job.id, running);
                }
                return Err(e.into());
            }
        };
        // A job not confirmed is no longer this attempt's (rescued meanwhile); one whose cancel
        // was asked for before it was registered stops at once.
        claimed.retain(|(job, running)| match confirmed.get(&job.id) {
            Some(cancel_requested) => {
                if *cancel_requested {
                    running.token.cancel();
                }
                true
            }
            None => {
                self.unregister(job.id, running);
                false
            }
        });
        let started: Vec<(Uuid, Event)> = claimed
            .iter()
            .map(|(job, _)| (job.tenant_id, started(job, &self.public_name)))
            .collect();
        append_announcing(&self.events, &started).await;
        Ok(claimed)
    }

    /// Proves this process is alive, and stops jobs whose cancel was requested.
    pub(crate) async fn heartbeat_once(&self) -> anyhow::Result<()> {
        let sent = tokio::time::Instant::now();
        store::heartbeat(&self.lease_pool, &self.name, &self.queue_spec).await?;
        *self.leased_at.lock().expect("lease lock") = sent;
        for id in store::cancel_requests(&self.lease_pool, &self.name).await? {
            if let Some(job) = self.running.lock().expect("running lock").get(&id) {
                job.token.cancel();
            }
        }
        Ok(())
    }

    /// Hands back strays ([`Self::hand_back_strays`]) every heartbeat interval, in a task of
    /// its own: a slow statement here must not space out the heartbeats (and lose the lease).
    pub(crate) async fn stray_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.settings.heartbeat);
        loop {
            tick.tick().await;
            if let Err(e) = self.hand_back_strays().await {
                tracing::warn!(error = %e, "strays not handed back");
            }
        }
    }

    /// Stops the jobs whose lease this worker lost ([`Self::stop_lost`]), which needs no
    /// claim to be out of the way. Then, a claim that committed but whose answer never arrived
    /// (the connection dropped), or whose hand-back failed, leaves rows `running` under this
    /// worker that no task runs; the lease this process keeps alive would hold them there for
    /// ever. Those rows go back to the queue, without using up an attempt. Only while no claim
    /// is on its way, and none starts meanwhile, so that every job running here is in
    /// `running`: waited for briefly (new claims wait behind the wait), else next time, as a
    /// stalled claim could take long.
    async fn hand_back_strays(&self) -> anyhow::Result<()> {
        let attempts: Vec<(Uuid, CancellationToken)> = {
            let running = self.running.lock().expect("running lock");
            let attempts = running.iter().map(|(id, job)| (*id, job.token.clone()));
            attempts.collect()
        };
        self.stop_lost(&attempts).await?;
        let known = || -> Vec<Uuid> {
            let running = self.running.lock().expect("running lock");
            running.keys().copied().collect()
        };
        let strays = {
            let claims_done = self.registering.write();
            let Ok(_no_claims) = tokio::time::timeout(CLAIMS_OUT_OF_THE_WAY, claims_done).await
            else {
                return Ok(());
            };
            claims::hand_back_unknown(&self.pool, &self.name, &known()).await?
        };
        if !strays.is_empty() {
            tracing::warn!(
                count = strays.len(),
                "jobs running here only in their rows; handed back to the queue"
            );
            self.dispatch(strays.iter().filter_map(Change::moved).collect())
                .await;
        }
        Ok(())
    }

    /// Stops the `attempts` running here whose rows no longer name this worker: the rescuer
    /// took them while its heartbeats did not arrive (a partition, a failover), so another
    /// worker may run them now. Their outcome would not be recorded anyway. By the tokens they
    /// had when they were listed: an attempt of the same job claimed here since is not one of
    /// them.
    async fn stop_lost(&self, attempts: &[(Uuid, CancellationToken)]) -> anyhow::Result<()> {
        if attempts.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = attempts.iter().map(|(id, _)| *id).collect();
        let held: HashSet<Uuid> = claims::held_by(&self.pool, &self.name, &ids)
            .await?
            .into_iter()
            .collect();
        let running = self.running.lock().expect("running lock");
        // One that ended meanwhile is no longer held either: its token stops nothing.
        for (id, token) in attempts.iter().filter(|(id, _)| !held.contains(id)) {
            if running.contains_key(id) && !token.is_cancelled() {
                tracing::warn!(job = %id, "its lease was lost (rescued elsewhere): stopped here");
            }
            token.cancel();
        }
        Ok(())
    }

    /// Stops running jobs as their cancel is announced on Redis Pub/Sub, and wakes this
    /// process's consumers of a kind another process announced; reconnects after a lost
    /// connection (the heartbeat covers the cancels announced meanwhile, the idle poll the pushes).
    pub(crate) async fn announcement_listener(self: Arc<Self>) {
        loop {
            if let Err(e) = self.listen_for_announcements().await {
                tracing::debug!(error = %e, "announcements interrupted");
            }
            tokio::time::sleep(self.settings.heartbeat).await;
        }
    }

    async fn listen_for_announcements(&self) -> anyhow::Result<()> {
        let client = shared::redis_conn::Redis::open(&self.settings.redis_url)?
            .client()
            .await?;
        let mut pubsub = client.get_async_pubsub().await?;
        let (cancels, queued) = (self.queues.cancel_channel(), self.queues.queued_channel());
        pubsub.subscribe(&cancels).await?;
        pubsub.subscribe(&queued).await?;
        let mut messages = pubsub.on_message();
        while let Some(message) = futures::StreamExt::next(&mut messages).await {
            if message.get_channel_name() == queued {
                self.refill
                    .dispatcher()
                    .wake(&message.get_payload::<String>()?);
                continue;
            }
            let Ok(id) = message.get_payload::<String>()?.parse::<Uuid>() else {
                continue;
            };
            if let Some(job) = self.running.lock().expect("running lock").get(&id) {
                job.token.cancel();
            }
        }
        Ok(())
    }

    /// Heart-beats until aborted: also while draining, since running jobs still hold their
    /// lease.
    pub(crate) async fn heartbeat_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.settings.heartbeat);
        loop {
            tick.tick().await;
            if let Err(e) = self.heartbeat_once().await {
                tracing::warn!(error = %e, "heartbeat failed");
            }
        }
    }

    /// Stops the jobs running here once the lease may have lapsed: no heartbeat has arrived
    /// for `rescue_after` less one heartbeat interval, so the rescuer may be handing them to
    /// another worker. A worker cut off from PostgreSQL (or stalled) ran them on beside the
    /// attempts that took their place: `stop_lost` needs PostgreSQL to see the lease is gone.
    /// Stopped as at shutdown: handed back, or rescued, with no attempt used.
    pub(crate) async fn lease_watch(self: Arc<Self>) {
        let margin = self
            .settings
            .rescue_after
            .saturating_sub(self.settings.heartbeat);
        let mut tick = tokio::time::interval(self.settings.heartbeat / 4);
        loop {
            tick.tick().await;
            self.stop_if_lease_lapsing(margin);
        }
    }

    /// [`Self::lease_watch`]'s check.
    fn stop_if_lease_lapsing(&self, margin: Duration) {
        let since = self.leased_at.lock().expect("lease lock").elapsed();
        if since < margin {
            return;
        }
        let running = self.running.lock().expect("running lock");
        let live: Vec<&RunningJob> = running
            .values()
            .filter(|j| !j.token.is_cancelled())
            .collect();
        if live.is_empty() {
            return;
        }
        tracing::warn!(
            jobs = live.len(),
            since_heartbeat_ms = since.as_millis() as u64,
            "no heartbeat arrived for most of the lease: the jobs running here are stopped, as \
             the rescuer may give them to another worker"
        );
        for job in live {
            job.interrupted.store(true, Ordering::SeqCst);
            job.token.cancel();
        }
    }

    /// Waits until no job runs, at most `timeout`; true if idle.
    pub(crate) async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.idle.notified();
            if self.is_idle() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.is_idle();
            }
        }
    }

    /// No job runs and no claim is on its way.
    fn is_idle(&self) -> bool {
        self.claiming.load(Ordering::SeqCst) == 0
            && self.running.lock().expect("running lock").is_empty()
    }

    /// Stops every running job so it goes back to the queue.
    pub(crate) fn interrupt_all(&self) {
        for job in self.running.lock().expect("running lock").values() {
            job.interrupted.store(true, Ordering::SeqCst);
            job.token.cancel();
        }
    }

    /// Waits, at most [`COMMIT_GRACE`], for attempts still inside their commit (see
    /// `JobContext::committing`): a stopping worker left them to the rescuer, as if it had
    /// died, while their commit went on. Each ends on its own, or is dropped at `STOP_GRACE +
    /// COMMIT_GRACE` after the interrupt and handed back: its outcome is written either way.
    pub(crate) async fn wait_commits(&self) {
        let committing = self
            .running
            .lock()
            .expect("running lock")
            .values()
            .any(|job| job.committing.load(Ordering::SeqCst) > 0);
        if committing {
            tracing::warn!("waiting for jobs committing their work");
            self.wait_idle(COMMIT_GRACE).await;
        }
    }

    pub(crate) async fn stopped(&self) {
        if let Err(e) = store::worker_stopped(&self.pool, &self.name).await {
            tracing::warn!(error = %e, "could not mark the worker stopped");
        }
    }

    /// Row → event → announcement, for jobs whose row has already changed (an attempt's end, a
    /// promotion, a rescue): appends each job's event, then announces each kind with jobs that
    /// became queued, so that workers claim them now. Neither failure loses the job: the row is
    /// the truth, and workers claim in full at their idle poll.
    pub(crate) async fn dispatch(&self, changes: Vec<Change>) {
        for kind in self.announce(changes).await {
            self.refill.request(&kind);
        }
    }

    /// [`Self::dispatch`], waiting for the announcements.
    pub(crate) async fn dispatch_now(&self, changes: Vec<Change>) {
        for kind in self.announce(changes).await {
            if let Err(e) = self.refill.dispatcher().announce(&kind).await {
                tracing::warn!(queue = %kind, error = %e, "queued jobs not announced; workers find them at their idle poll");
            }
        }
    }

    /// Appends each change's event; returns the kinds involved.
    async fn announce(&self, changes: Vec<Change>) -> std::collections::BTreeSet<String> {
        let mut kinds = std::collections::BTreeSet::new();
        let mut appends = Vec::with_capacity(changes.len());
        for change in changes {
            kinds.insert(change.event.kind.clone());
            appends.push(self.announcements.call((change.tenant, change.event)));
        }
        let failed: Vec<BatchError> = futures::future::join_all(appends)
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect();
        if let Some(error) = failed.first() {
            tracing::warn!(count = failed.len(), %error, "events not appended");
        }
        kinds
    }

    /// Runs a claimed job's attempt in `slot` and records its outcome. The slot frees as soon
    /// as the handler returns (unless the job adds to a quota on output, whose next attempt's
    /// check reads this one's usage), so that the next claim overlaps this outcome's write; a
    /// permit of `writing` ([`WRITING_PER_SLOT`] per slot) takes its place. Without one the slot is
    /// kept: outcomes that cannot be written hold at most that many slots' worth and the slots,
    /// and then the queue stops claiming.
    async fn execute(
        &self,
        job: Claimed,
        running: RunningJob,
        slot: OwnedSemaphorePermit,
        writing: &Arc<Semaphore>,
    ) {
        let (outcome, usage) = {
            let _ended = running.ended.clone().drop_guard();
            if let Some(earlier) = &running.after {
                earlier.cancelled().await;
            }
            self.run_attempt(&job, &running).await
        };
        // A job adding to a quota on output keeps its slot until its usage is written: the
        // next attempt's check of the quota reads it.
        let overlap = !shared::quotas::counts_output(&job.kind);
        let _held = match writing.clone().try_acquire_owned() {
            Ok(permit) if overlap => {
                drop(slot);
                permit
            }
            _ => slot,
        };
        self.record(&job, outcome, usage).await;
        self.unregister(job.id, &running);
    }

    /// Forgets `running` (only if it is still the job's entry), and wakes `wait_idle`.
    fn unregister(&self, id: Uuid, running: &RunningJob) {
        let mut map = self.running.lock().expect("running lock");
        if map
            .get(&id)
            .is_some_and(|entry| Arc::ptr_eq(&entry.interrupted, &running.interrupted))
        {
            map.remove(&id);
        }
        drop(map);
        if self.is_idle() {
            self.idle.notify_waiters();
        }
    }

    /// Runs the handler; returns how the attempt ended and what it used.
    async fn run_attempt(&self, job: &Claimed, running: &RunningJob) -> (Attempt, Usage) {
        let wall = std::time::Instant::now();
        let meter = Arc::new(Meter::default());
        let attempt = self.attempt(job, running, &meter).await;
        let usage = meter.usage(wall.elapsed());
        let attempt = match attempt {
            // Results carry their usage, as the usage table does.
            Attempt::Done(Outcome::Succeeded(Value::Object(mut result))) => {
                let used = serde_json::to_value(&usage).unwrap_or_default();
                result.insert("usage".into(), used);
                Attempt::Done(Outcome::Succeeded(Value::Object(result)))
            }
            other => other,
        };
        (attempt, usage)
    }

    /// Runs a claimed job's handler (its `started` event went out with the claim).
    async fn attempt(&self, job: &Claimed, running: &RunningJob, meter: &Arc<Meter>) -> Attempt {
        let quotas = shared::quotas::check_output(&self.pool, job.tenant_id, job.id, &job.kind);
        match quotas.await {
            Ok(Err(over)) => {
                return Attempt::Done(Outcome::Failed(format!("it could not start: {over}")))
            }
            Ok(Ok(())) => {}
            // The handler reads the same database: it fails or goes on as it will.
            Err(e) => tracing::warn!(job = %job.id, error = %e, "quotas not read"),
        }
        let Some(handler) = self.registry.get(&job.kind).cloned() else {
            return Attempt::Done(Outcome::Failed(format!(
                "this worker has no handler for {:?}",
                job.kind
            )));
        };
        let ctx = JobContext::new(
            job.id,
            job.tenant_id,
            &job.kind,
            job.attempt,
            running.token.clone(),
            self.pool.clone(),
            self.events.clone(),
        )
        .with_meter(meter.clone())
        .with_commits(running.committing.clone());
        let run = AssertUnwindSafe(handler.run(&ctx, job.payload.clone())).catch_unwind();
        let run = CpuTimed::new(run, meter.clone());
        // Asked to stop by a cancel, a shutdown or the attempt's deadline.
        let max_attempt = self.settings.max_attempt;
        let timed_out = AtomicBool::new(false);
        let overdue = async {
            tokio::select! {
                () = running.token.cancelled() => {}
                () = tokio::time::sleep(max_attempt) => {
                    timed_out.store(true, Ordering::SeqCst);
                    running.token.cancel();
                }
            }
            tokio::time::sleep(STOP_GRACE).await;
            let publishing = tokio::time::Instant::now() + COMMIT_GRACE;
            while ctx.is_committing() && tokio::time::Instant::now() < publishing {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let result = tokio::select! {
            result = run => result,
            () = overdue => {
                tracing::warn!(job = %job.id, kind = job.kind, "handler did not stop when asked; dropped");
                Ok(Err(JobError::Cancelled(shared::Cancelled)))
            }
        };
        ctx.flush().await;
        let interrupted = running.interrupted.load(Ordering::SeqCst);
        if timed_out.load(Ordering::SeqCst) && !interrupted && !matches!(result, Ok(Ok(_))) {
            let error = format!(
                "ran longer than {} s (CONVEYOR_MAX_ATTEMPT_SECS)",
                max_attempt.as_secs()
            );
            return Attempt::Done(self.retry_or_fail(job, error));
        }
        let stopped = running.token.is_cancelled();
        if stopped && interrupted && !matches!(result, Ok(Ok(_))) {
            return Attempt::HandBack;
        }
        let outcome = match result {
            Ok(Ok(value)) => Outcome::Succeeded(bounded_result(value)),
            Ok(Err(JobError::Cancelled(_))) => Outcome::Cancelled,
            Ok(Err(_)) if stopped => Outcome::Cancelled,
            Ok(Err(JobError::Permanent(error))) => Outcome::Failed(error),
            Ok(Err(JobError::Retryable(error))) => self.retry_or_fail(job, error),
            Err(panic) => self.retry_or_fail(job, panicked(job, &panic)),
        };
        Attempt::Done(outcome)
    }

    fn retry_or_fail(&self, job: &Claimed, error: String) -> Outcome {
        if job.attempt < job.max_attempts {
            let delay = backoff(self.settings.retry_base, job.attempt);
            Outcome::Retrying {
                error,
                retry_at: Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default(),
            }
        } else {
            Outcome::Failed(error)
        }
    }

    /// Writes the outcome, retrying while PostgreSQL is unreachable: the row must not stay
    /// `running` behind a live worker's lease. An outcome PostgreSQL refuses for a value it
    /// holds is refused again however often it is sent: the attempt fails with that said.
    async fn record(&self, job: &Claimed, attempt: Attempt, mut usage: Usage) {
        let mut delay = Duration::from_millis(100);
        // One outcome shared by every try, not a copy of its result each.
        let mut outcome = match attempt {
            Attempt::Done(outcome) => Some(Arc::new(outcome.bounded())),
            Attempt::HandBack => None,
        };
        loop {
            let written = match &outcome {
                Some(outcome) => {
                    let finish = store::Finish {
                        id: job.id,
                        attempt: job.attempt,
                        outcome: outcome.clone(),
                        usage: usage.clone(),
                    };
                    self.finishes.call(finish).await
                }
                None => store::requeue(&self.pool, job.id, job.attempt, &self.name, &usage)
                    .await
                    .map(|row| row.map(store::Ended::from))
                    .map_err(|e| BatchError::Failed(e.to_string())),
            };
            match written {
                Ok(Some(row)) => {
                    if outcome.is_none() {
                        self.announce_hand_back(&row).await;
                    }
                    // After the outcome's event: a pipeline's stream ends once it has both.
                    if let Some(pipeline) = row.pipeline_id.filter(|_| row.status().is_terminal()) {
                        self.advance_pipeline(pipeline).await;
                    }
                    return;
                }
                // Another owner took over (rescued after a lost lease): nothing of ours to write.
                Ok(None) => return,
                Err(BatchError::Refused(why)) if outcome.is_some() => {
                    tracing::error!(job = %job.id, why, "outcome refused; failing the attempt");
                    let failed = format!(
                        "the attempt's outcome could not be stored: PostgreSQL refused a value \
                         of it ({why})"
                    );
                    let failed = Some(Arc::new(Outcome::Failed(failed)));
                    if outcome == failed {
                        // The plain failure refused too: its usage is what is refused.
                        usage = Usage::default();
                    }
                    outcome = failed;
                    tokio::time::sleep(delay).await;
                }
                Err(e) => {
                    tracing::warn!(job = %job.id, error = %e, "outcome not recorded yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Announces a hand-back, queued again (an ended attempt's event went out with its finish
    /// batch; a retry is announced when the scheduler promotes it).
    async fn announce_hand_back(&self, row: &store::Ended) {
        let change = Change {
            tenant: row.tenant_id,
            event: ended(row, None),
        };
        self.dispatch(vec![change]).await;
    }
}

impl Runtime {
    /// Moves a pipeline on after one of its steps' jobs ended: starts the steps that can, and
    /// announces and dispatches their jobs. A failure is logged: the `pipelines` maintenance
    /// duty advances any pipeline left behind.
    pub(crate) async fn advance_pipeline(&self, pipeline: Uuid) {
        match self.advance_in_transaction(pipeline).await {
            Ok(jobs) => {
                self.dispatch(jobs.iter().map(Change::created).collect())
                    .await
            }
            Err(e) => {
                tracing::warn!(%pipeline, error = %e, "pipeline not advanced; maintenance will")
            }
        }
    }

    /// [`pipelines::advance`] in a transaction of its own; the jobs it created.
    pub(crate) async fn advance_in_transaction(&self, pipeline: Uuid) -> sqlx::Result<Vec<Job>> {
        let mut tx = self.pool.begin().await?;
        let advanced = pipelines::advance(&mut tx, pipeline, &self.validator()).await?;
        tx.commit().await?;
        Ok(advanced.jobs)
    }

    /// Checks a step's resolved payload as the API checks a submission's.
    pub(crate) fn validator(
        &self,
    ) -> impl Fn(&str, &Value) -> Result<Value, Vec<shared::FieldError>> + Send + Sync + '_ {
        |kind, payload| (self.contracts.validate(kind, payload)).map(contracts::Valid::into_stored)
    }
}

/// The event of an attempt that `worker` (its public name) has just claimed.
fn started(job: &Claimed, worker: &str) -> Event {
    Event::new(
        job.id,
        &job.kind,
        EventType::Started,
        JobStatus::Running,
        0.0,
    )
    .data(Some(json!({ "attempt": job.attempt, "worker": worker })))
    .attempt(job.attempt)
}

/// The event of an attempt that ended with `outcome`, or was handed back (`None`).
fn ended(row: &store::Ended, outcome: Option<&Outcome>) -> Event {
    let status = row.status();
    let event = Event::new(
        row.id,
        &row.kind,
        EventType::entering(status),
        status,
        row.progress,
    );
    let event = match outcome {
        // A retry or hand-back that was the job's cancel (asked for meanwhile).
        _ if status == JobStatus::Cancelled => event,
        Some(Outcome::Succeeded(result)) => event.data(Some(result.clone())),
        Some(Outcome::Retrying { error, retry_at }) => event.message(Some(error.clone())).data(
            Some(json!({ "attempt": row.attempt, "retry_at": retry_at })),
        ),
        Some(Outcome::Failed(error)) => event.message(Some(error.clone())),
        Some(Outcome::Cancelled) => event,
        // A last attempt handed back past the free hand-backs.
        None if status == JobStatus::Failed => {
            event.message(Some(store::HAND_BACKS_USED_UP.into()))
        }
        None => {
            let message = "worker shutting down; back in the queue";
            return event.message(Some(message.into())).attempt(row.attempt + 1);
        }
    };
    event.attempt(row.attempt)
}

/// Appends events that announce rows already written; a Redis hiccup must not fail the
/// writes (the rows are the truth).
async fn append_announcing(events: &EventLog, announced: &[(Uuid, Event)]) {
    if let Err(e) = events.append(announced).await {
        tracing::warn!(count = announced.len(), error = %e, "events not appended");
    }
}

/// A job whose row changed, and the event that announces it.
pub(crate) struct Change {
    pub tenant: Uuid,
    pub event: Event,
}

impl Change {
    /// A job just created (a pipeline's step): its `queued` event.
    pub(crate) fn created(job: &Job) -> Self {
        Self {
            tenant: job.tenant_id,
            event: Event::queued(job),
        }
    }

    /// A job the maintenance moved (promoted, rescued): announced as entering its new status,
    /// dispatched by fair share if that is `queued`. `None` for a status this build does not know.
    pub(crate) fn moved(moved: &store::Moved) -> Option<Self> {
        let status = JobStatus::parse(&moved.status)?;
        let event = Event::new(
            moved.id,
            &moved.kind,
            EventType::entering(status),
            status,
            0.0,
        )
        .message(moved.error.clone());
        // Queued again: for the next attempt.
        let attempt = match status {
            JobStatus::Queued => moved.attempt + 1,
            _ => moved.attempt,
        };
        Some(Self {
            tenant: moved.tenant_id,
            event: event.attempt(attempt),
        })
    }
}

enum Attempt {
    Done(Outcome),
    /// Interrupted by shutdown: back to the queue.
    HandBack,
}

/// Exponential backoff with ±25 % jitter, capped at an hour.
pub fn backoff(base: Duration, attempt: i32) -> Duration {
    let exp = base.saturating_mul(1u32 << (attempt - 1).clamp(0, 20));
    let capped = exp.min(Duration::from_secs(3600));
    capped.mul_f64(0.75 + rand::random::<f64>() * 0.5)
}

/// What the tenant reads of a handler's panic: that it happened, and a reference to the log
/// line that holds its text. The text is the worker's own (a library's assertion, a path, a
/// value of another job's state), not the tenant's to read.
fn panicked(job: &Claimed, panic: &Box<dyn std::any::Any + Send>) -> String {
    let text = panic_text(panic);
    jobs::internal_error(&format_args!(
        "handler of {} job {} panicked: {text}",
        job.kind, job.id
    ))
}

pub(crate) fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// The most bytes of JSON a job's result keeps: it is stored in the job's row, sent in its
/// `succeeded` event and copied into each webhook delivery. A synthesis of 500 columns with
/// long names reported 400 MB of pair scores, past what `jsonb` holds: its finish batch
/// failed, with the other jobs in it, and was retried for ever.
const MAX_RESULT_BYTES: usize = 1 << 20;

/// `value` if it fits [`MAX_RESULT_BYTES`]; else its top-level fields that fit, the largest
/// dropped first and named in `dropped_fields` (a result's ids, counts and outputs are small;
/// the large parts are in its artifacts too).
/// The SQLSTATE of an error PostgreSQL raised for a value the statement carries (a data
/// exception, or past one of its limits, as a jsonb string's): sending the same again is refused
/// again. Others (a lost connection, a deadlock, a failover) may pass on the next try.
fn refused_value(e: &sqlx::Error) -> Option<String> {
    let code = e.as_database_error()?.code()?;
    (code.starts_with("22") || code.starts_with("54")).then(|| code.into_owned())
}

fn bounded_result(value: Value) -> Value {
    let size = |v: &Value| {
        let mut counter = ByteCounter(0);
        let _ = serde_json::to_writer(&mut counter, v);
        counter.0
    };
    let total = size(&value);
    let Value::Object(mut fields) = value else {
        return match total <= MAX_RESULT_BYTES {
            true => value,
            false => serde_json::json!({"dropped_fields": ["result"], "result_bytes": total}),
        };
    };
    if total <= MAX_RESULT_BYTES {
        return Value::Object(fields);
    }
    let mut by_size: Vec<(usize, String)> =
        fields.iter().map(|(k, v)| (size(v), k.clone())).collect();
    by_size.sort_unstable_by(|a, b| b.cmp(a));
    let mut left = total;
    let mut dropped = Vec::new();
    for (bytes, key) in by_size {
        if left <= MAX_RESULT_BYTES / 2 {
            break;
        }
        fields.remove(&key);
        left -= bytes.min(left);
        dropped.push(Value::String(key));
    }
    fields.insert("dropped_fields".into(), Value::Array(dropped));
    fields.insert("result_bytes".into(), total.into());
    Value::Object(fields)
}

/// Counts what is written to it.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0 += bytes.len();
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A result past the bound keeps its small fields (ids, counts, a pipeline's outputs) and
    /// names those it dropped; one within the bound is kept whole.
    #[test]
    fn a_result_past_the_bound_keeps_its_small_fields() {
        let small = serde_json::json!({"dataset_id": "d", "rows": 20});
        assert_eq!(bounded_result(small.clone()), small);
        let pairs: Vec<Value> = (0..40_000)
            .map(|i| serde_json::json!({"columns": [format!("a{i}"), "b"], "score": 0.5}))
            .collect();
        let large = serde_json::json!({"dataset_id": "d", "rows": 20, "quality": {"pairs": pairs}});
        let bounded = bounded_result(large);
        assert!(serde_json::to_vec(&bounded).unwrap().len() <= MAX_RESULT_BYTES);
        assert_eq!(bounded["dataset_id"], "d");
        assert_eq!(bounded["rows"], 20);
        assert_eq!(bounded["dropped_fields"], serde_json::json!(["quality"]));
        assert!(bounded["result_bytes"].as_u64().unwrap() > MAX_RESULT_BYTES as u64);
    }

    /// A handler that panics, with text only the worker should read.
    struct Panicky;

    #[async_trait::async_trait]
    impl jobs::Runner for Panicky {
        fn kind(&self) -> &'static str {
            "panicky"
        }
        async fn prepare(&self) -> anyhow::Result<()> {
            Ok(())
        }
        async fn run(&self, _: &JobContext, _: Value) -> Result<Value, JobError> {
            panic!("index out of bounds at /srv/conveyor/secret-path.rs for tenant 1234");
        }
        async fn sweep(&self) -> anyhow::Result<()> {
            Ok(())
        }
    }

    /// A handler's panic is retried (then failed) with a reference to the log, not its text:
    /// the text is the worker's (paths, assertions on its state), and it went to the tenant in
    /// the job's error, its event and its webhooks.
    #[tokio::test]
    async fn a_panic_reaches_the_tenant_as_a_reference_not_its_text() {
        let registry = jobs::Registry::new(vec![Arc::new(Panicky)]);
        let test = crate::maintenance::test_support::TestDb::with(registry, |_| {}).await;
        let id = test.job("panicky", "running").await;
        let claimed = Claimed {
            kind: "panicky".into(),
            ..claimed(&test, id)
        };
        let running = running(CancellationToken::new());
        let attempt = test
            .runtime
            .attempt(&claimed, &running, &Arc::default())
            .await;
        let Attempt::Done(Outcome::Failed(error)) = attempt else {
            panic!("the attempt did not fail");
        };
        assert!(!error.contains("secret-path"), "{error}");
        assert!(!error.contains("out of bounds"), "{error}");
        assert!(error.contains("internal error (reference "), "{error}");
    }

    /// A worker stopped an attempt whose lease it lost only when no claim was on its way: a
    /// busy worker (or one whose claims wait on a slow Redis) ran it on beside the attempt
    /// that took its place.
    #[tokio::test]
    async fn a_lost_attempt_is_stopped_while_a_claim_is_on_its_way() {
        let test = crate::maintenance::test_support::TestDb::new().await;
        let id = test.job("canary", "running").await;
        // As a rescue and another worker's claim leave the row.
        test.set(id, "worker = 'elsewhere', attempt = 2").await;
        let runtime = &test.runtime;
        let token = CancellationToken::new();
        let attempt = running(token.clone());
        runtime.running.lock().unwrap().insert(id, attempt);
        let _claim_on_its_way = runtime.registering.read().await;
        runtime.hand_back_strays().await.unwrap();
        assert!(token.is_cancelled());
    }

    /// A worker whose handlers hold every connection of its pool still heartbeats: the
    /// heartbeat waited behind them for a connection (up to the pool's 10 s timeout, the
    /// default lease) and the lease watch then stopped the jobs the handlers were running.
    #[tokio::test]
    async fn heartbeats_go_out_while_handlers_hold_every_connection() {
        let test = crate::maintenance::test_support::TestDb::new().await;
        let pool = test.runtime.pool();
        let mut held = Vec::new();
        for _ in 0..pool.options().get_max_connections() {
            held.push(pool.acquire().await.unwrap());
        }
        let heartbeat = tokio::time::timeout(Duration::from_secs(3), test.runtime.heartbeat_once());
        heartbeat
            .await
            .expect("the heartbeat waited for a handler's connection")
            .unwrap();
        drop(held);
    }

    /// A worker whose heartbeats stop arriving (PostgreSQL out of reach, or the process
    /// stalled) stops its jobs before the rescuer may hand them to another worker: it ran them
    /// on beside the attempts that took their place, since seeing the lease gone needs
    /// PostgreSQL. Heartbeats fail here through a trigger on `workers`.
    #[tokio::test]
    async fn jobs_stop_once_heartbeats_stop_arriving_for_most_of_the_lease() {
        let test = crate::maintenance::test_support::TestDb::new().await;
        let runtime = test.runtime.clone();
        runtime.heartbeat_once().await.unwrap();
        let id = test.job("canary", "running").await;
        let attempt = running(CancellationToken::new());
        runtime.running.lock().unwrap().insert(id, attempt.clone());
        for sql in [
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN RAISE EXCEPTION 'no heartbeats'; END $$",
            "CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON workers
             FOR EACH ROW EXECUTE FUNCTION refuse()",
        ] {
            sqlx::query(sql).execute(test.pool()).await.unwrap();
        }
        let (heartbeats, watch) = (
            tokio::spawn(runtime.clone().heartbeat_loop()),
            tokio::spawn(runtime.clone().lease_watch()),
        );
        // Before the rescuer may take the job.
        let deadline = runtime.settings().rescue_after;
        let stopped = tokio::time::timeout(deadline, attempt.token.cancelled()).await;
        heartbeats.abort();
        watch.abort();
        assert!(
            stopped.is_ok(),
            "still running {deadline:?} after the last heartbeat"
        );
        assert!(attempt.interrupted.load(Ordering::SeqCst));
    }

    /// An attempt's entry in `running`, stopped through `token`.
    fn running(token: CancellationToken) -> RunningJob {
        RunningJob {
            token,
            interrupted: Arc::default(),
            ended: CancellationToken::new(),
            after: None,
            committing: Arc::default(),
        }
    }

    fn claimed(test: &crate::maintenance::test_support::TestDb, id: Uuid) -> Claimed {
        Claimed {
            id,
            tenant_id: test.tenant,
            kind: "canary".into(),
            payload: Value::Null,
            attempt: 1,
            max_attempts: 1,
        }
    }

    /// An outcome PostgreSQL refused for a value it holds was sent again for ever: the job
    /// stayed `running` behind its live worker, and its slot with it. The attempt fails,
    /// saying so.
    #[tokio::test]
    async fn an_outcome_postgresql_refuses_fails_the_attempt() {
        let test = crate::maintenance::test_support::TestDb::new().await;
        let id = test.job("canary", "running").await;
        for statement in [
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                 IF NEW.error = 'poison' THEN
                     RAISE EXCEPTION 'refused' USING ERRCODE = '22023';
                 END IF;
                 RETURN NEW;
             END $$",
            "CREATE TRIGGER refuse BEFORE UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION refuse()",
        ] {
            sqlx::query(statement).execute(test.pool()).await.unwrap();
        }
        let poison = Attempt::Done(Outcome::Failed("poison".into()));
        let job = claimed(&test, id);
        let recorded = test.runtime.record(&job, poison, Usage::default());
        tokio::time::timeout(Duration::from_secs(20), recorded)
            .await
            .expect("the outcome is recorded, not retried for ever");
        let (status, error): (String, String) =
            sqlx::query_as("SELECT status, error FROM jobs WHERE id = $1")
                .bind(id)
                .fetch_one(test.pool())
                .await
                .unwrap();
        assert_eq!(status, "failed");
        assert!(error.contains("could not be stored"), "{error}");
        assert!(error.contains("22023"), "{error}");
    }

    /// A tenant's database may answer with an error of hundreds of MB, and retries by hand
    /// start new attempts without end: what a job keeps of its errors is bounded.
    #[tokio::test]
    async fn a_jobs_errors_are_kept_within_their_bounds() {
        let test = crate::maintenance::test_support::TestDb::new().await;
        let id = test.job("canary", "running").await;
        test.set(
            id,
            "attempt_errors = (SELECT jsonb_agg(jsonb_build_object('attempt', 0, 'error', 'old'))
                               FROM generate_series(1, 25))",
        )
        .await;
        let long = Attempt::Done(Outcome::Failed("é".repeat(1 << 20)));
        test.runtime
            .record(&claimed(&test, id), long, Usage::default())
            .await;
        let (error, kept, last): (String, i32, Value) = sqlx::query_as(
            "SELECT error, jsonb_array_length(attempt_errors), attempt_errors -> -1
             FROM jobs WHERE id = $1",
        )
        .bind(id)
        .fetch_one(test.pool())
        .await
        .unwrap();
        assert!(
            error.len() <= store::MAX_ERROR_BYTES + 64,
            "{}",
            error.len()
        );
        assert!(
            error.ends_with("(2097152 bytes in all)"),
            "{}",
            &error[16000..]
        );
        assert_eq!(kept, 25);
        assert_eq!(last["attempt"], 1, "the newest kept, the oldest dropped");
    }

    /// Past a quota on output an attempt does not start, a retry's as a first's (a tenant
    /// could fail its first attempts on purpose); one whose earlier attempt entered its commit
    /// does, since that attempt's work may be published.
    #[tokio::test]
    async fn an_attempt_past_a_quota_on_output_starts_only_after_an_earlier_commit() {
        let test = crate::maintenance::test_support::TestDb::new().await;
        sqlx::query("INSERT INTO tenant_limits (tenant_id, max_rows_per_day) VALUES ($1, 0)")
            .bind(test.tenant)
            .execute(test.pool())
            .await
            .unwrap();
        let id = test.job("import", "running").await;
        let test = &test;
        let error_of = |attempt| async move {
            let job = Claimed {
                kind: "import".into(),
                attempt,
                ..claimed(test, id)
            };
            let running = running(CancellationToken::new());
            let meter = Arc::new(Meter::default());
            match test.runtime.attempt(&job, &running, &meter).await {
                Attempt::Done(Outcome::Failed(error)) => error,
                Attempt::Done(Outcome::Retrying { error, .. }) => error,
                _ => String::new(),
            }
        };
        for attempt in [1, 2] {
            let error = error_of(attempt).await;
            assert!(
                error.contains("could not start") && error.contains("max_rows_per_day"),
                "{attempt}: {error}"
            );
        }
        test.set(id, "committing_attempt = 1").await;
        // Past the check, to the handler (this test's worker has none for imports).
        let after_a_commit = error_of(2).await;
        assert!(after_a_commit.contains("no handler"), "{after_a_commit}");
    }

    #[test]
    fn backoff_doubles_with_jitter() {
        let base = Duration::from_millis(1000);
        for attempt in 1..6 {
            let expected = 1000.0 * 2f64.powi(attempt - 1);
            let got = backoff(base, attempt).as_millis() as f64;
            assert!(
                got >= expected * 0.75 && got <= expected * 1.25,
                "{attempt}: {got}"
            );
        }
        assert!(backoff(base, 40) <= Duration::from_secs(4500));
    }
}
