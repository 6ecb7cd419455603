//! Runs jobs: claim the row, run the handler, record the outcome, announce every change.

use apalis::prelude::{
    BackendExt, BoxDynError, Data, PollSnapshot, PollStrategy, Strategy, WorkerBuilder,
    WorkerBuilderExt,
};
use chrono::Utc;
use futures::FutureExt;
use serde_json::{json, Value};
use shared::{
    batch::Batcher,
    dispatch::{Dispatcher, Refill},
    events::{Event, EventLog, EventType},
    model::QueueMessage,
    objects::ObjectStore,
    pipelines,
    queue::Queues,
    store::{self, Outcome},
    usage::{CpuTimed, Meter, Usage},
    Job, JobContext, JobStatus, Settings,
};
use sqlx::PgPool;
use std::{
    collections::{BTreeMap, HashMap},
    panic::AssertUnwindSafe,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::QueueSpec;
use jobs::{JobError, Registry};

pub struct Runtime {
    settings: Settings,
    name: String,
    pool: PgPool,
    events: EventLog,
    queues: Queues,
    refill: Refill,
    objects: ObjectStore,
    registry: Registry,
    /// Checks a pipeline step's resolved payload before its job is created.
    contracts: contracts::Registry,
    queue_spec: Value,
    running: Mutex<HashMap<Uuid, RunningJob>>,
    idle: tokio::sync::Notify,
    // Claims and outcomes of concurrent jobs share round trips, each batch with its events;
    // other changes' events (hand-backs, dispatched jobs) share the announcements'.
    claims: Batcher<QueueMessage, Option<Job>>,
    finishes: Batcher<store::Finish, Option<store::Ended>>,
    announcements: Batcher<(Uuid, Event), ()>,
}

/// Wakes a queue's fetch when this process pushed to the queue (see [`Dispatcher::pushed`]),
/// and every `idle_poll`; notes each time apalis asks (the queue's [`Liveness`]).
struct Pushed {
    // Only ever polled through `&mut self`: the wrapper makes the boxed stream `Sync`, as apalis
    // asks of a strategy.
    next: sync_wrapper::SyncWrapper<futures::stream::BoxStream<'static, ()>>,
    liveness: Liveness,
}

impl Pushed {
    /// Ready when this process pushed, and every `idle_poll` on tokio's clock: apalis' own
    /// interval (a `futures-timer` thread) was seen to go quiet under load while a message sat
    /// in the queue pushed by another process.
    fn new(pushed: Arc<tokio::sync::Notify>, idle_poll: Duration, liveness: Liveness) -> Self {
        let stream = futures::stream::unfold(pushed, move |pushed| async move {
            tokio::select! {
                _ = pushed.notified() => {}
                _ = tokio::time::sleep(idle_poll) => {}
            }
            Some(((), pushed))
        });
        Self {
            next: sync_wrapper::SyncWrapper::new(Box::pin(stream)),
            liveness,
        }
    }
}

impl PollStrategy for Pushed {
    /// Polls until pending, so a wake-up is always armed: apalis drops what this returns, and
    /// when its fetch comes back empty in the same poll that saw this ready, it parks with
    /// nothing else to wake it but its heartbeat timer.
    fn poll_drive(
        &mut self,
        cx: &mut std::task::Context<'_>,
        _: &PollSnapshot,
    ) -> std::task::Poll<Option<()>> {
        self.liveness.asked();
        let mut woke = false;
        while let std::task::Poll::Ready(Some(())) =
            futures::StreamExt::poll_next_unpin(self.next.get_mut(), cx)
        {
            woke = true;
        }
        if woke {
            std::task::Poll::Ready(Some(()))
        } else {
            std::task::Poll::Pending
        }
    }
}

/// Whether a queue's apalis worker still asks for work: when it last did, and how many of the
/// queue's jobs it runs. Under load a worker was seen to stop fetching for good with slots
/// free while its queue held messages; [`Runtime::serve_queue`] restarts such a worker.
#[derive(Clone)]
struct Liveness {
    asked: Arc<Mutex<tokio::time::Instant>>,
    running: Arc<AtomicUsize>,
}

impl Liveness {
    fn new() -> Self {
        Self {
            asked: Arc::new(Mutex::new(tokio::time::Instant::now())),
            running: Arc::default(),
        }
    }

    fn asked(&self) {
        *self.asked.lock().expect("liveness lock") = tokio::time::Instant::now();
    }

    /// Counts a job of the queue as running until the guard drops.
    fn running(&self) -> RunningGuard {
        self.running.fetch_add(1, Ordering::SeqCst);
        RunningGuard(self.running.clone())
    }

    /// Resolves once the worker has not asked for work for `after` while it had a slot free
    /// (never while it drains for `stop`: then it asks for nothing).
    async fn stalled(&self, concurrency: usize, after: Duration, stop: &CancellationToken) {
        loop {
            tokio::time::sleep(after / 4).await;
            let quiet = self.asked.lock().expect("liveness lock").elapsed();
            let free = self.running.load(Ordering::SeqCst) < concurrency;
            if quiet >= after && free && !stop.is_cancelled() {
                return;
            }
        }
    }
}

struct RunningGuard(Arc<AtomicUsize>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Most items one batched round trip carries.
const BATCH: usize = 256;

/// How long a claim or a finish under load waits for more of its kind to share its round trip:
/// a statement costs PostgreSQL about as much as twenty more rows (a finish of 16 jobs took
/// 0.47 ms, of 64 jobs 1.25 ms), and a drain's batches were ~14 jobs without it.
const LINGER: Duration = Duration::from_millis(1);

#[derive(Clone)]
struct RunningJob {
    token: CancellationToken,
    /// Set when the worker itself stops the job (shutdown), as opposed to a user's cancel.
    interrupted: Arc<AtomicBool>,
}

impl Runtime {
    pub async fn connect(
        settings: Settings,
        registry: Registry,
        name: String,
        queues: &QueueSpec,
    ) -> anyhow::Result<Self> {
        let concurrency: usize = queues.0.iter().map(|(_, n)| n).sum();
        let slots = queues.0.clone();
        // Control-plane writes are short: a small pool serves many concurrent jobs.
        let pool_size = (concurrency as u32 + 4).min(24);
        let pool = shared::db::connect(&settings.database_url, pool_size).await?;
        shared::db::migrate(&pool).await?;
        // Claims and finishes (one round trip of each at a time), a dispatch pass per kind (a
        // pipeline's next step may be of a kind not served here) and the dispatcher duty's:
        // none waits for another's connection.
        let passes = registry.kinds().count() as u32;
        let queue_pool = shared::db::connect_queue(&settings.database_url, passes + 3).await?;
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
        // A claim answers once its jobs' `started` events are appended, in the claim's own
        // round trip: a job's handler (and its events) must not run ahead of `started`.
        let claims = {
            let (pool, name, events) = (queue_pool.clone(), name.clone(), events.clone());
            Batcher::spawn_lingering(BATCH, LINGER, move |messages: Vec<QueueMessage>| {
                let (pool, name, events) = (pool.clone(), name.clone(), events.clone());
                async move {
                    let jobs = store::claim_many(&pool, &messages, &name)
                        .await
                        .map_err(|e| e.to_string())?;
                    let started: Vec<(Uuid, Event)> = jobs
                        .iter()
                        .flatten()
                        .map(|job| (job.tenant_id, started(job, &name)))
                        .collect();
                    append_announcing(&events, &started).await;
                    Ok(jobs)
                }
            })
        };
        // Likewise a finish answers once its outcomes' events are appended: a job's stream
        // must hold its outcome before a pass may push the job again or its pipeline move on.
        let finishes = {
            let (pool, events) = (queue_pool.clone(), events.clone());
            Batcher::spawn_lingering(BATCH, LINGER, move |items: Vec<store::Finish>| {
                let (pool, events) = (pool.clone(), events.clone());
                async move {
                    let rows = store::finish_many(&pool, &items)
                        .await
                        .map_err(|e| e.to_string())?;
                    let outcomes: Vec<(Uuid, Event)> = rows
                        .iter()
                        .zip(&items)
                        .filter_map(|(row, item)| {
                            let row = row.as_ref()?;
                            Some((row.tenant_id, ended(row, Some(&item.outcome))))
                        })
                        .collect();
                    append_announcing(&events, &outcomes).await;
                    Ok(rows)
                }
            })
        };
        let announcements = {
            let events = events.clone();
            Batcher::spawn(BATCH, move |items: Vec<(Uuid, Event)>| {
                let events = events.clone();
                async move {
                    let n = items.len();
                    events.append(&items).await.map_err(|e| e.to_string())?;
                    Ok(vec![(); n])
                }
            })
        };
        let queues = Queues::new(redis, &settings.redis_prefix, settings.heartbeat);
        let refill = Refill::new(Dispatcher::new(queue_pool, queues.clone(), &settings));
        for (kind, slots) in &slots {
            refill.pace(kind, *slots);
        }
        Ok(Self {
            claims,
            finishes,
            announcements,
            queues,
            refill,
            objects: ObjectStore::with_bucket(&settings.data_dir, settings.object_store.as_ref())?,
            settings,
            name,
            pool,
            events,
            registry,
            contracts: contracts::Registry::standard(),
            queue_spec,
            running: Mutex::new(HashMap::new()),
            idle: tokio::sync::Notify::new(),
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

    pub(crate) fn queues(&self) -> &Queues {
        &self.queues
    }

    pub(crate) fn refill(&self) -> &Refill {
        &self.refill
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    pub(crate) fn events(&self) -> &EventLog {
        &self.events
    }

    pub(crate) fn objects(&self) -> &ObjectStore {
        &self.objects
    }

    /// Serves one queue until `stop`; a backend error (Redis restarting) restarts the apalis
    /// worker instead of leaving it stuck.
    pub(crate) async fn serve_queue(
        self: Arc<Self>,
        kind: String,
        concurrency: usize,
        stop: CancellationToken,
    ) {
        // A fresh apalis name per restart: apalis refuses to register a name whose previous
        // registration still looks alive.
        let mut generation = 0;
        let stall = (self.settings.heartbeat * 4).max(Duration::from_secs(5));
        while !stop.is_cancelled() {
            generation += 1;
            // A queue found empty is looked at again when a pass of this process pushes to it,
            // else at the idle poll. Without the poll apalis only looks again at its next
            // heartbeat (and backs off): a job pushed to an idle queue waited seconds to start.
            let liveness = Liveness::new();
            let wake = Strategy::new().apply(Pushed::new(
                self.refill.dispatcher().pushed(&kind),
                self.settings.idle_poll,
                liveness.clone(),
            ));
            // Half the slots per fetch: apalis fetches again only once its buffer is empty and
            // a slot is free, so with a whole round per fetch the slots ran in one wave and sat
            // idle through each wave's ack and fetch; two half-waves overlap them.
            let worker = WorkerBuilder::new(format!("{}/{kind}/{generation}", self.name))
                .backend(
                    self.queues
                        .storage(&kind, concurrency.div_ceil(2))
                        .poll_with_strategy(wake),
                )
                .concurrency(concurrency)
                .data(self.clone())
                .data(liveness.clone())
                .build(handle_message);
            let signal = stop.clone();
            let run = worker.run_until(async move {
                signal.cancelled().await;
                Ok::<(), std::io::Error>(())
            });
            // Dropping a stalled worker abandons no job: each attempt runs in a task of its own
            // (see `handle_message`), and the stale sweep pushes again what it had fetched.
            let error = tokio::select! {
                result = run => result.err().map(|e| e.to_string()),
                () = liveness.stalled(concurrency, stall, &stop) => Some(format!(
                    "no fetch for {}s with a slot free", stall.as_secs()
                )),
            };
            if let Some(error) = error {
                if stop.is_cancelled() {
                    break;
                }
                tracing::warn!(queue = %kind, %error, "queue worker stopped; restarting");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }

    /// Proves this process is alive, and stops jobs whose cancel was requested.
    pub(crate) async fn heartbeat_once(&self) -> anyhow::Result<()> {
        store::heartbeat(&self.pool, &self.name, &self.queue_spec).await?;
        for id in store::cancel_requests(&self.pool, &self.name).await? {
            if let Some(job) = self.running.lock().expect("running lock").get(&id) {
                job.token.cancel();
            }
        }
        Ok(())
    }

    /// Stops running jobs as their cancel is announced on Redis Pub/Sub, and wakes this
    /// process's consumers of a kind another process pushed to; reconnects after a lost
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
        let (cancels, pushes) = (self.queues.cancel_channel(), self.queues.pushed_channel());
        pubsub.subscribe(&cancels).await?;
        pubsub.subscribe(&pushes).await?;
        let mut messages = pubsub.on_message();
        while let Some(message) = futures::StreamExt::next(&mut messages).await {
            if message.get_channel_name() == pushes {
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

    pub(crate) async fn heartbeat_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.settings.heartbeat);
        // Keep heart-beating while draining: running jobs still hold their lease.
        let _ = stop;
        loop {
            tick.tick().await;
            if let Err(e) = self.heartbeat_once().await {
                tracing::warn!(error = %e, "heartbeat failed");
            }
        }
    }

    /// Waits until no job runs, at most `timeout`; true if idle.
    pub(crate) async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.idle.notified();
            if self.running.lock().expect("running lock").is_empty() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.running.lock().expect("running lock").is_empty();
            }
        }
    }

    /// Stops every running job so it goes back to the queue.
    pub(crate) fn interrupt_all(&self) {
        for job in self.running.lock().expect("running lock").values() {
            job.interrupted.store(true, Ordering::SeqCst);
            job.token.cancel();
        }
    }

    pub(crate) async fn stopped(&self) {
        if let Err(e) = store::worker_stopped(&self.pool, &self.name).await {
            tracing::warn!(error = %e, "could not mark the worker stopped");
        }
    }

    /// Row → announce → dispatch, for jobs whose row has already changed (an attempt's end, a
    /// promotion, a rescue): appends each job's event, then asks for a dispatch pass of each
    /// kind involved (a queued job waits for one; an ended attempt freed a slot). Announcing
    /// first keeps a job's stream in order: once pushed, a worker may start the job and announce
    /// `started`. Neither failure loses the job: the row is the truth, the maintenance
    /// `dispatcher` passes again, and the stale scan pushes dispatched rows missing from Redis.
    pub(crate) async fn dispatch(&self, changes: Vec<Change>) {
        for kind in self.announce(changes).await {
            self.refill.request(&kind);
        }
    }

    /// [`Self::dispatch`], waiting for the passes (maintenance reports what it pushed).
    pub(crate) async fn dispatch_now(&self, changes: Vec<Change>) {
        for kind in self.announce(changes).await {
            if let Err(e) = self.refill.dispatcher().dispatch(&kind).await {
                tracing::warn!(queue = %kind, error = %e, "dispatch failed; the next pass retries");
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
        let failed: Vec<String> = futures::future::join_all(appends)
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect();
        if let Some(error) = failed.first() {
            tracing::warn!(count = failed.len(), %error, "events not appended");
        }
        kinds
    }

    /// Pushes messages onto their kinds' queues, one round trip per kind. A failed push is
    /// logged: the rows stay queued and the stale scan pushes them later.
    pub(crate) async fn push(&self, messages: Vec<(String, QueueMessage)>) {
        let mut by_kind: BTreeMap<String, Vec<QueueMessage>> = BTreeMap::new();
        for (kind, message) in messages {
            by_kind.entry(kind).or_default().push(message);
        }
        for (kind, messages) in by_kind {
            if let Err(e) = self.queues.push(&kind, &messages).await {
                tracing::warn!(queue = kind, count = messages.len(), error = %e, "push failed");
            }
        }
    }

    async fn execute(&self, message: QueueMessage) -> Result<(), BoxDynError> {
        // Found by cancels from before the claim on: once the claim commits, the row says
        // `running` (and a cancel may be announced) while the claim still appends `started`.
        let id = message.job_id;
        let running = RunningJob {
            token: CancellationToken::new(),
            interrupted: Arc::new(AtomicBool::new(false)),
        };
        self.running
            .lock()
            .expect("running lock")
            .entry(id)
            .or_insert_with(|| running.clone());
        // A stale or duplicate message claims nothing and is simply acknowledged.
        let job = match self.claims.call(message).await {
            Ok(Some(job)) => job,
            other => {
                self.unregister(id, &running);
                return other.map(|_| ()).map_err(Into::into);
            }
        };
        // A duplicate message of this job may have held the entry: this attempt's is the one.
        self.running
            .lock()
            .expect("running lock")
            .insert(id, running.clone());
        let (outcome, usage) = self.run_attempt(&job, &running).await;
        self.record(&job, outcome, usage).await;
        self.unregister(id, &running);
        Ok(())
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
        if map.is_empty() {
            self.idle.notify_waiters();
        }
    }

    /// Runs the handler; returns how the attempt ended and what it used.
    async fn run_attempt(&self, job: &Job, running: &RunningJob) -> (Attempt, Usage) {
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
    async fn attempt(&self, job: &Job, running: &RunningJob, meter: &Arc<Meter>) -> Attempt {
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
        .with_meter(meter.clone());
        let run = AssertUnwindSafe(handler.run(&ctx, job.payload.clone())).catch_unwind();
        let result = CpuTimed::new(run, meter.clone()).await;
        ctx.flush().await;
        let stopped = running.token.is_cancelled();
        if stopped && running.interrupted.load(Ordering::SeqCst) && !matches!(result, Ok(Ok(_))) {
            return Attempt::HandBack;
        }
        let outcome = match result {
            Ok(Ok(value)) => Outcome::Succeeded(value),
            Ok(Err(JobError::Cancelled(_))) => Outcome::Cancelled,
            Ok(Err(_)) if stopped => Outcome::Cancelled,
            Ok(Err(JobError::Permanent(error))) => Outcome::Failed(error),
            Ok(Err(JobError::Retryable(error))) => self.retry_or_fail(job, error),
            Err(panic) => {
                self.retry_or_fail(job, format!("handler panicked: {}", panic_text(&panic)))
            }
        };
        Attempt::Done(outcome)
    }

    fn retry_or_fail(&self, job: &Job, error: String) -> Outcome {
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
    /// `running` behind a live worker's lease.
    async fn record(&self, job: &Job, attempt: Attempt, usage: Usage) {
        let mut delay = Duration::from_millis(100);
        loop {
            let written = match &attempt {
                Attempt::Done(outcome) => {
                    let finish = store::Finish {
                        id: job.id,
                        attempt: job.attempt,
                        outcome: outcome.clone(),
                        usage: usage.clone(),
                    };
                    self.finishes.call(finish).await
                }
                Attempt::HandBack => store::requeue(&self.pool, job.id, job.attempt)
                    .await
                    .map(|row| row.map(store::Ended::from))
                    .map_err(|e| e.to_string()),
            };
            match written {
                Ok(Some(row)) => {
                    self.announce_outcome(&row, &attempt).await;
                    // After the outcome's event: a pipeline's stream ends once it has both.
                    if let Some(pipeline) = row.pipeline_id.filter(|_| row.status().is_terminal()) {
                        self.advance_pipeline(pipeline).await;
                    }
                    return;
                }
                // Another owner took over (rescued after a lost lease): nothing of ours to write.
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(job = %job.id, error = %e, "outcome not recorded yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Announces a hand-back (an ended attempt's event went out with its finish batch), then
    /// asks for the pass the change calls for.
    async fn announce_outcome(&self, row: &store::Ended, attempt: &Attempt) {
        let outcome = match attempt {
            Attempt::Done(outcome) => outcome,
            Attempt::HandBack => {
                let change = Change {
                    tenant: row.tenant_id,
                    event: ended(row, None),
                };
                self.announce(vec![change]).await;
                return self.refill.request(&row.kind);
            }
        };
        match outcome {
            // An ended attempt freed a slot: passes after those are paced.
            Outcome::Succeeded(_) | Outcome::Failed(_) | Outcome::Cancelled => {
                self.refill.freed(&row.kind)
            }
            // The job is queued again, maybe at once: a pass as for a new job.
            Outcome::Retrying { .. } => self.refill.request(&row.kind),
        }
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
    ) -> impl Fn(&str, &Value) -> Result<(), Vec<shared::FieldError>> + Send + Sync + '_ {
        |kind, payload| self.contracts.validate(kind, payload).map(|_| ())
    }
}

/// The event of an attempt that `worker` has just claimed.
fn started(job: &Job, worker: &str) -> Event {
    Event::new(
        job.id,
        &job.kind,
        EventType::Started,
        JobStatus::Running,
        0.0,
    )
    .data(Some(json!({ "attempt": job.attempt, "worker": worker })))
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
    match outcome {
        Some(Outcome::Succeeded(result)) => event.data(Some(result.clone())),
        Some(Outcome::Retrying { error, retry_at }) => event.message(Some(error.clone())).data(
            Some(json!({ "attempt": row.attempt, "retry_at": retry_at })),
        ),
        Some(Outcome::Failed(error)) => event.message(Some(error.clone())),
        Some(Outcome::Cancelled) => event,
        None => event.message(Some("worker shutting down; back in the queue".into())),
    }
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
        Some(Self {
            tenant: moved.tenant_id,
            event,
        })
    }
}

enum Attempt {
    Done(Outcome),
    /// Interrupted by shutdown: back to the queue.
    HandBack,
}

async fn handle_message(
    message: QueueMessage,
    runtime: Data<Arc<Runtime>>,
    liveness: Data<Liveness>,
) -> Result<(), BoxDynError> {
    // The attempt runs in a task of its own: if apalis' worker stops under us (it does, under
    // heavy load: "worker not registered") and drops this future, the job still finishes and
    // records its outcome instead of staying `running` under a live lease forever.
    let runtime: Arc<Runtime> = (*runtime).clone();
    let _running = liveness.running();
    tokio::spawn(async move { runtime.execute(message).await })
        .await
        .map_err(|e| Box::new(e) as BoxDynError)?
}

/// Exponential backoff with ±25 % jitter, capped at an hour.
pub fn backoff(base: Duration, attempt: i32) -> Duration {
    let exp = base.saturating_mul(1u32 << (attempt - 1).clamp(0, 20));
    let capped = exp.min(Duration::from_secs(3600));
    capped.mul_f64(0.75 + rand::random::<f64>() * 0.5)
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts wake-ups, as apalis' worker task would be woken.
    struct Wakes(AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_wake_up_is_armed_again_after_the_strategy_fired() {
        let wakes = Arc::new(Wakes(Default::default()));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        let pushed = Arc::new(tokio::sync::Notify::new());
        let mut strategy = Pushed::new(pushed.clone(), Duration::from_millis(20), Liveness::new());
        let snapshot = PollSnapshot::default();
        assert!(strategy.poll_drive(&mut cx, &snapshot).is_pending());
        pushed.notify_one();
        assert!(strategy.poll_drive(&mut cx, &snapshot).is_ready());
        // apalis drops that readiness and may park without polling again: the idle poll must
        // still wake it.
        let before = wakes.0.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(wakes.0.load(Ordering::SeqCst) > before, "nothing armed");
    }

    #[tokio::test]
    async fn a_worker_quiet_with_a_slot_free_is_found_stalled() {
        let stop = CancellationToken::new();
        let after = Duration::from_millis(200);
        let liveness = Liveness::new();
        let stalled = |liveness: Liveness, stop: CancellationToken| async move {
            tokio::time::timeout(Duration::from_secs(1), liveness.stalled(2, after, &stop))
                .await
                .is_ok()
        };
        // Asking every 20 ms is alive.
        let asking = {
            let liveness = liveness.clone();
            tokio::spawn(async move {
                loop {
                    liveness.asked();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        assert!(!stalled(liveness.clone(), stop.clone()).await);
        asking.abort();
        // Quiet with every slot taken is busy, not stalled.
        let (first, second) = (liveness.running(), liveness.running());
        assert!(!stalled(liveness.clone(), stop.clone()).await);
        drop(second);
        assert!(stalled(liveness.clone(), stop.clone()).await);
        // Draining for a stop asks for nothing: not a stall.
        stop.cancel();
        assert!(!stalled(liveness, stop).await);
        drop(first);
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
