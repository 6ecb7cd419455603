//! Maintenance: duties that keep jobs flowing and the tables small, River-style. Every worker
//! process runs them, but only the one holding a PostgreSQL advisory lock acts, so there is one
//! scheduler, one rescuer, ... at a time.
//!
//! Each duty is a file here with its test beside it, and runs in a task of its own on its own
//! interval: a slow one (the sweeps of every target) never holds up another, and a duty never
//! overlaps itself (its next run starts after this one ends).

use sqlx::{pool::PoolConnection, PgPool, Postgres};
use std::{sync::Arc, time::Duration};
use tokio::{sync::Mutex, task::JoinSet, time::MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::Runtime;
use shared::leader::LOCK_KEY;

mod history;
mod object_deletes;
mod pipelines;
mod queue_minutes;
mod rescuer;
mod retention;
mod scheduler;
mod schedules;
mod sweeps;
#[cfg(test)]
pub(crate) mod test_support;
mod webhooks;
mod workers;

/// A duty's name (for the logs), how often it runs, and how much one statement of it does.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Schedule {
    pub name: &'static str,
    /// From the start of one run to the start of the next (longer when a run overruns).
    pub interval: Duration,
    /// Most rows one statement handles (0: the duty works on no rows).
    pub batch: i64,
}

/// One kind of upkeep the leader does now and then.
#[async_trait::async_trait]
pub(crate) trait Duty: Send + Sync + 'static {
    fn schedule(&self) -> Schedule;

    /// Does the work once; returns how many rows it handled.
    async fn run(&self, runtime: &Runtime) -> anyhow::Result<usize>;
}

/// Runs `batch` until one handles fewer than `size` rows (the backlog is gone); returns the
/// rows handled in all.
async fn drain<F, Fut>(size: i64, mut batch: F) -> anyhow::Result<usize>
where
    F: FnMut() -> Fut + Send,
    Fut: std::future::Future<Output = anyhow::Result<usize>> + Send,
{
    let mut total = 0;
    loop {
        let rows = batch().await?;
        total += rows;
        if rows == 0 || (rows as i64) < size {
            return Ok(total);
        }
    }
}

/// The duties of this deployment.
fn duties(runtime: &Runtime) -> Vec<Arc<dyn Duty>> {
    let settings = runtime.settings();
    vec![
        Arc::new(scheduler::Scheduler::default()),
        Arc::new(schedules::Schedules::new(settings)),
        Arc::new(pipelines::Pipelines::default()),
        Arc::new(rescuer::Rescuer::new(settings)),
        Arc::new(sweeps::Sweeps::default()),
        Arc::new(workers::Workers::new(settings)),
        Arc::new(retention::Retention::new(settings)),
        Arc::new(history::History::new(settings)),
        Arc::new(object_deletes::ObjectDeletes::default()),
        Arc::new(webhooks::Webhooks::new(settings)),
        Arc::new(queue_minutes::QueueMinutes::default()),
    ]
}

pub(crate) async fn run(runtime: Arc<Runtime>, stop: CancellationToken) {
    let duties = duties(&runtime);
    run_duties(runtime, duties, stop).await;
}

/// Runs each duty in its own task until `stop`; dropping the future stops them all.
async fn run_duties(runtime: Arc<Runtime>, duties: Vec<Arc<dyn Duty>>, stop: CancellationToken) {
    let leader = Arc::new(Leader::new(runtime.pool().clone(), runtime.name()));
    let mut tasks = JoinSet::new();
    for duty in duties {
        tasks.spawn(keep(duty, runtime.clone(), leader.clone(), stop.clone()));
    }
    while tasks.join_next().await.is_some() {}
    leader.resign().await;
}

async fn keep(
    duty: Arc<dyn Duty>,
    runtime: Arc<Runtime>,
    leader: Arc<Leader>,
    stop: CancellationToken,
) {
    let Schedule {
        name,
        interval,
        batch,
    } = duty.schedule();
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.cancelled() => return,
        }
        if !leader.check().await {
            continue;
        }
        // A panic ends this run, not the duty: its task ended silently while the process
        // kept leading, so no process ran the duty again.
        let run = std::panic::AssertUnwindSafe(duty.run(&runtime));
        match futures::FutureExt::catch_unwind(run).await {
            Ok(Ok(0)) => {}
            Ok(Ok(rows)) => tracing::debug!(duty = name, rows, batch, "maintenance duty ran"),
            Ok(Err(e)) => tracing::warn!(duty = name, error = %e, "maintenance duty failed"),
            Err(panic) => {
                let panic = crate::runtime::panic_text(&panic);
                tracing::error!(
                    duty = name,
                    panic,
                    "maintenance duty panicked; it runs again at its next tick"
                );
            }
        }
    }
}

/// The advisory lock that makes one process the maintenance leader, held on a connection kept
/// out of the pool for as long as it leads.
/// How long the lock's connection has to answer before this process stops leading.
const LOCK_ANSWER: Duration = Duration::from_secs(5);

struct Leader {
    pool: PgPool,
    worker: String,
    held: Mutex<Option<PoolConnection<Postgres>>>,
}

impl Leader {
    fn new(pool: PgPool, worker: &str) -> Self {
        Self {
            pool,
            worker: worker.to_owned(),
            held: Mutex::new(None),
        }
    }

    /// Whether this process leads now: takes the lock if it is free, and checks that the
    /// connection holding it still answers (a lost connection loses the lock with it; another
    /// process may hold it by now). Called before every run of a duty.
    async fn check(&self) -> bool {
        let mut held = self.held.lock().await;
        match held.as_mut() {
            Some(conn) => {
                let answered =
                    tokio::time::timeout(LOCK_ANSWER, sqlx::query("SELECT 1").execute(&mut **conn));
                if matches!(answered.await, Ok(Ok(_))) {
                    return true;
                }
                tracing::warn!(
                    worker = self.worker,
                    "lost the maintenance lock's connection"
                );
                // Closed, not returned to the pool: a connection that does not answer may
                // never (a server behind a lost network).
                if let Some(conn) = held.take() {
                    drop(conn.detach());
                }
                false
            }
            None => {
                *held = self.try_lead().await;
                held.is_some()
            }
        }
    }

    async fn try_lead(&self) -> Option<PoolConnection<Postgres>> {
        let mut conn = self.pool.acquire().await.ok()?;
        // The connection names its worker while it holds the lock (`shared::leader`).
        // The server lets the lock go when this process is gone: at once after a `kill -9`
        // (the socket closes), but behind a lost network or a host that died only once its
        // keepalives give up, two hours by default, while no process leads (the rescuer
        // included). This session's keepalives give up within about half a minute.
        let locked: bool = sqlx::query_scalar(
            "SELECT CASE WHEN pg_try_advisory_lock($1)
                    THEN set_config('application_name', $2, false) IS NOT NULL
                         AND set_config('tcp_keepalives_idle', '10', false) IS NOT NULL
                         AND set_config('tcp_keepalives_interval', '5', false) IS NOT NULL
                         AND set_config('tcp_keepalives_count', '3', false) IS NOT NULL
                         AND set_config('tcp_user_timeout', '20000', false) IS NOT NULL
                    ELSE false END",
        )
        .bind(LOCK_KEY)
        .bind(shared::leader::application_name(&self.worker))
        .fetch_one(&mut *conn)
        .await
        .ok()?;
        if !locked {
            return None;
        }
        tracing::info!(worker = self.worker, "leading maintenance");
        Some(conn)
    }

    /// Lets another process lead at once (on shutdown) rather than when this one's connection
    /// closes.
    async fn resign(&self) {
        if let Some(mut conn) = self.held.lock().await.take() {
            let _ = sqlx::query(
                "SELECT pg_advisory_unlock($1), set_config('application_name', '', false)",
            )
            .bind(LOCK_KEY)
            .execute(&mut *conn)
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use test_support::{until, TestDb};
    use tokio::sync::Semaphore;

    /// Counts its runs and how many overlap; a run waits for a permit of the gate, if any; every
    /// other run fails.
    struct Probe {
        schedule: Schedule,
        gate: Option<Arc<Semaphore>>,
        runs: AtomicUsize,
        active: AtomicUsize,
        most_active: AtomicUsize,
        /// Runs to panic in before any other.
        panics: std::sync::atomic::AtomicIsize,
    }

    impl Probe {
        fn new(gate: Option<Arc<Semaphore>>) -> Arc<Self> {
            Arc::new(Self {
                schedule: Schedule {
                    name: "probe",
                    interval: Duration::from_millis(20),
                    batch: 0,
                },
                gate,
                runs: AtomicUsize::new(0),
                active: AtomicUsize::new(0),
                most_active: AtomicUsize::new(0),
                panics: Default::default(),
            })
        }

        fn runs(&self) -> usize {
            self.runs.load(Ordering::SeqCst)
        }
    }

    #[async_trait::async_trait]
    impl Duty for Probe {
        fn schedule(&self) -> Schedule {
            self.schedule
        }

        async fn run(&self, _: &Runtime) -> anyhow::Result<usize> {
            if self.panics.fetch_sub(1, Ordering::SeqCst) > 0 {
                self.runs.fetch_add(1, Ordering::SeqCst);
                panic!("the probe panics");
            }
            let active = self.active.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_active.fetch_max(active, Ordering::SeqCst);
            if let Some(gate) = &self.gate {
                gate.acquire().await?.forget();
            }
            self.active.fetch_sub(1, Ordering::SeqCst);
            let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
            anyhow::ensure!(run.is_multiple_of(2), "run {run} fails");
            Ok(run)
        }
    }

    /// A duty whose run panics runs again at its next tick: its task ended, while the process
    /// kept leading (its other duties kept the lock), so the duty stopped for the whole
    /// deployment, logged nowhere.
    #[tokio::test]
    async fn a_duty_that_panics_runs_again() {
        let test = TestDb::new().await;
        let probe = Probe::new(None);
        probe.panics.store(2, Ordering::SeqCst);
        let stop = CancellationToken::new();
        let running = tokio::spawn(run_duties(
            test.runtime.clone(),
            vec![probe.clone() as Arc<dyn Duty>],
            stop.clone(),
        ));
        until("the duty ran after its panics", || probe.runs() >= 4).await;
        stop.cancel();
        running.await.unwrap();
    }

    /// A leader whose host died or lost the network keeps its lock until the server's
    /// keepalives give up on its session: two hours by default, while no process leads. The
    /// lock's session gives up within about half a minute. (Only the settings are read here:
    /// a network that drops packets is not made in this test.)
    #[tokio::test]
    async fn the_lock_gives_up_on_a_lost_leader_within_a_minute() {
        let test = TestDb::new().await;
        let leader = Leader::new(test.pool().clone(), "keepalives");
        assert!(leader.check().await);
        let mut held = leader.held.lock().await;
        let conn = held.as_mut().unwrap();
        let settings: (String, String, String, String) = sqlx::query_as(
            "SELECT current_setting('tcp_keepalives_idle'),
                    current_setting('tcp_keepalives_interval'),
                    current_setting('tcp_keepalives_count'),
                    current_setting('tcp_user_timeout')",
        )
        .fetch_one(&mut **conn)
        .await
        .unwrap();
        assert_eq!(
            settings,
            ("10".into(), "5".into(), "3".into(), "20000".into())
        );
    }

    /// Each duty on its own interval: a slow one neither overlaps itself nor holds up a fast
    /// one, and a failing run does not stop its duty.
    #[tokio::test]
    async fn duties_run_on_their_own_intervals_one_run_at_a_time() {
        let test = TestDb::new().await;
        let gate = Arc::new(Semaphore::new(0));
        let slow = Probe::new(Some(gate.clone()));
        let fast = Probe::new(None);
        let stop = CancellationToken::new();
        let running = tokio::spawn(run_duties(
            test.runtime.clone(),
            vec![slow.clone() as Arc<dyn Duty>, fast.clone()],
            stop.clone(),
        ));
        // The slow one's first run hangs for 10 of the fast one's intervals and more.
        until("the fast duty waited for the slow one", || {
            fast.runs() >= 10
        })
        .await;
        assert_eq!(slow.runs(), 0);
        assert_eq!(slow.active.load(Ordering::SeqCst), 1);
        // Its intervals passed meanwhile: still one run at a time, and its first (failed) run
        // did not stop it.
        gate.add_permits(3);
        until("the slow duty stopped", || slow.runs() == 3).await;
        assert_eq!(slow.most_active.load(Ordering::SeqCst), 1);

        gate.add_permits(1000);
        stop.cancel();
        running.await.unwrap();
    }

    /// Two processes on one database: only the lock holder runs duties; when it stops, the
    /// other takes over.
    #[tokio::test]
    async fn only_the_leader_runs_duties_and_another_takes_over() {
        let test = TestDb::new().await;
        let (first, second) = (Probe::new(None), Probe::new(None));
        let first_stop = CancellationToken::new();
        let first_task = tokio::spawn(run_duties(
            test.runtime.clone(),
            vec![first.clone() as Arc<dyn Duty>],
            first_stop.clone(),
        ));
        until("the first process did not lead", || first.runs() > 0).await;
        let second_stop = CancellationToken::new();
        let second_task = tokio::spawn(run_duties(
            test.another_runtime().await,
            vec![second.clone() as Arc<dyn Duty>],
            second_stop.clone(),
        ));
        // Ten more runs of the leader, each interval one in which the other could have run.
        let seen = first.runs();
        until("the leader stopped", || first.runs() >= seen + 10).await;
        assert_eq!(second.runs(), 0, "the second process ran a duty");
        let leader = shared::leader::current(test.pool()).await.unwrap();
        assert_eq!(leader.as_deref(), Some("maintenance-test-1"));

        first_stop.cancel();
        first_task.await.unwrap();
        until("nobody took over", || second.runs() > 0).await;
        let leader = shared::leader::current(test.pool()).await.unwrap();
        assert_eq!(leader.as_deref(), Some("maintenance-test-2"));
        second_stop.cancel();
        second_task.await.unwrap();
    }
}
