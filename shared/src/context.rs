//! What a handler sees of its job: identity, progress, logs, and the cancellation token.

use serde_json::Value;
use sqlx::PgPool;
use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    events::{Event, EventLog, EventType},
    model::JobStatus,
    store,
    usage::Meter,
};

/// At most one progress write per job per interval; the first and the last always go through.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// An open [`JobContext::committing`] section; it ends when dropped.
pub struct Committing(Arc<AtomicUsize>);

impl Drop for Committing {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Returned by [`JobContext::checkpoint`] once the job was asked to stop.
#[derive(Debug, thiserror::Error)]
#[error("the job was cancelled")]
pub struct Cancelled;

/// Returned by [`JobContext::committing`] when the job's row did not record that the attempt
/// enters its commit: nothing is published yet, and the attempt is worth retrying.
#[derive(Debug, thiserror::Error)]
#[error("the start of the job's commit was not recorded")]
pub struct CommitUnrecorded(#[source] sqlx::Error);

#[derive(Clone)]
pub struct JobContext {
    inner: Arc<Inner>,
}

struct Inner {
    job_id: Uuid,
    tenant_id: Uuid,
    kind: String,
    attempt: i32,
    token: CancellationToken,
    pool: PgPool,
    events: EventLog,
    progress: Mutex<ProgressState>,
    /// The sequence number of the last report written. Writes hold it, so a report delayed by
    /// coalescing never lands after a newer one (streams would show progress going back).
    written: tokio::sync::Mutex<u64>,
    meter: Arc<Meter>,
    /// Sections publishing what the attempt made (see [`JobContext::committing`]).
    committing: Arc<AtomicUsize>,
    /// Set once the job's row records that this attempt entered its commit.
    commit_recorded: tokio::sync::OnceCell<()>,
}

#[derive(Default)]
struct ProgressState {
    last_write: Option<Instant>,
    /// Reports so far; numbers them.
    seq: u64,
    /// A report held back by coalescing, written by the next report or by `flush`.
    pending: Option<(u64, f32, Option<String>)>,
    /// Whether a timer is already armed to write `pending`.
    timer_armed: bool,
    current: f32,
}

impl JobContext {
    pub fn new(
        job_id: Uuid,
        tenant_id: Uuid,
        kind: &str,
        attempt: i32,
        token: CancellationToken,
        pool: PgPool,
        events: EventLog,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                job_id,
                tenant_id,
                kind: kind.to_owned(),
                attempt,
                token,
                pool,
                events,
                progress: Mutex::new(ProgressState::default()),
                written: tokio::sync::Mutex::new(0),
                meter: Arc::default(),
                committing: Arc::default(),
                commit_recorded: tokio::sync::OnceCell::new(),
            }),
        }
    }

    /// Counts into `meter` (the worker's, which it reads when the attempt ends).
    pub fn with_meter(mut self, meter: Arc<Meter>) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("a fresh context, not yet shared")
            .meter = meter;
        self
    }

    /// Counts its open [`Self::committing`] sections in `sections` (the worker's, which a
    /// stopping worker waits for).
    pub fn with_commits(mut self, sections: Arc<AtomicUsize>) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("a fresh context, not yet shared")
            .committing = sections;
        self
    }

    /// What this attempt used so far; handlers add their figures (rows, chunks, ...).
    pub fn meter(&self) -> &Arc<Meter> {
        &self.inner.meter
    }

    /// Runs CPU-bound or blocking `work` on tokio's blocking pool, its CPU time counted as the
    /// job's.
    pub async fn blocking<R: Send + 'static>(
        &self,
        work: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, tokio::task::JoinError> {
        let meter = self.inner.meter.clone();
        tokio::task::spawn_blocking(move || meter.timed(work)).await
    }

    pub fn job_id(&self) -> Uuid {
        self.inner.job_id
    }

    pub fn tenant_id(&self) -> Uuid {
        self.inner.tenant_id
    }

    /// 1 for the first attempt.
    pub fn attempt(&self) -> i32 {
        self.inner.attempt
    }

    pub fn cancellation(&self) -> &CancellationToken {
        &self.inner.token
    }

    pub fn is_cancelled(&self) -> bool {
        self.inner.token.is_cancelled()
    }

    /// Err once the job was asked to stop: call between units of work and undo partial work.
    pub fn checkpoint(&self) -> Result<(), Cancelled> {
        if self.is_cancelled() {
            Err(Cancelled)
        } else {
            Ok(())
        }
    }

    /// Marks, while the guard lives, that the attempt publishes what it made (a commit, a
    /// dataset registered with its files): a worker drops a handler that does not stop when
    /// asked, but not in such a section, which ends on its own (within a longer bound), so a
    /// job is never reported cancelled with its work half published.
    ///
    /// The attempt's first section first records in the job's row that the attempt entered
    /// its commit (`jobs.committing_attempt`): a worker lost from then on may have published
    /// the work, so the rescuer queues such a job once more even on its last attempt, for the
    /// kind's ledger (an import's `conveyor.imports`, a dataset's id from the job's) to answer.
    /// Err, with nothing published, when that could not be recorded.
    pub async fn committing(&self) -> Result<Committing, CommitUnrecorded> {
        let inner = &self.inner;
        inner
            .commit_recorded
            .get_or_try_init(|| store::mark_committing(&inner.pool, inner.job_id, inner.attempt))
            .await
            .map_err(CommitUnrecorded)?;
        inner.committing.fetch_add(1, Ordering::SeqCst);
        Ok(Committing(inner.committing.clone()))
    }

    /// Whether a [`Self::committing`] section is open.
    pub fn is_committing(&self) -> bool {
        self.inner.committing.load(Ordering::SeqCst) > 0
    }

    /// The last fraction reported.
    pub fn current_progress(&self) -> f32 {
        self.inner.progress.lock().expect("progress lock").current
    }

    /// Reports progress in `[0, 1]`. Writes are coalesced to about ten a second.
    pub async fn progress(&self, fraction: f32, message: impl Into<Option<String>>) {
        let fraction = fraction.clamp(0.0, 1.0);
        let message = message.into();
        // Decide under the lock, write after it: the guard must not live across an await.
        let (write_now, arm_timer) = {
            let mut state = self.inner.progress.lock().expect("progress lock");
            state.current = fraction;
            state.seq += 1;
            let seq = state.seq;
            let due = state
                .last_write
                .is_none_or(|at| at.elapsed() >= PROGRESS_INTERVAL);
            if due {
                state.last_write = Some(Instant::now());
                state.pending = None;
                (Some((seq, message)), false)
            } else {
                state.pending = Some((seq, fraction, message));
                let arm = !state.timer_armed;
                state.timer_armed = true;
                (None, arm)
            }
        };
        if let Some((seq, message)) = write_now {
            self.write_progress(seq, fraction, message).await;
            return;
        }
        if arm_timer {
            let ctx = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(PROGRESS_INTERVAL).await;
                ctx.inner
                    .progress
                    .lock()
                    .expect("progress lock")
                    .timer_armed = false;
                ctx.flush().await;
            });
        }
    }

    /// Writes a held-back progress report now (the runner calls it before the final event).
    pub async fn flush(&self) {
        let pending = {
            let mut state = self.inner.progress.lock().expect("progress lock");
            let pending = state.pending.take();
            if pending.is_some() {
                state.last_write = Some(Instant::now());
            }
            pending
        };
        if let Some((seq, fraction, message)) = pending {
            self.write_progress(seq, fraction, message).await;
        }
    }

    /// A line for the job's timeline.
    pub async fn log(&self, text: impl Into<String>) {
        let event = self
            .event(EventType::Log, self.current_progress())
            .message(Some(text.into()));
        self.append(event).await;
    }

    /// A structured event carrying `data` (e.g. a training epoch's loss).
    pub async fn report(&self, message: impl Into<String>, data: Value) {
        let event = self
            .event(EventType::Log, self.current_progress())
            .message(Some(message.into()))
            .data(Some(data));
        self.append(event).await;
    }

    async fn write_progress(&self, seq: u64, fraction: f32, message: Option<String>) {
        let inner = &self.inner;
        let mut written = inner.written.lock().await;
        if *written > seq {
            return; // a newer report already went out
        }
        *written = seq;
        if let Err(e) = store::record_progress(
            &inner.pool,
            inner.job_id,
            inner.attempt,
            fraction,
            message.as_deref(),
        )
        .await
        {
            tracing::warn!(job = %inner.job_id, error = %e, "progress not recorded");
        }
        let event = self.event(EventType::Progress, fraction).message(message);
        self.append(event).await;
    }

    fn event(&self, event_type: EventType, progress: f32) -> Event {
        Event::new(
            self.inner.job_id,
            &self.inner.kind,
            event_type,
            JobStatus::Running,
            progress,
        )
        .attempt(self.inner.attempt)
    }

    async fn append(&self, event: Event) {
        // Progress is advisory: a Redis hiccup must not fail the job.
        if let Err(e) = self
            .inner
            .events
            .append(&[(self.inner.tenant_id, event)])
            .await
        {
            tracing::warn!(job = %self.inner.job_id, error = %e, "event not appended");
        }
    }
}
