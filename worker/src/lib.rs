//! `conveyor-worker`: runs the handlers of the queues it is told to serve.
//!
//! Per process: a consumer per queue that claims jobs from PostgreSQL for its free slots (its
//! concurrency from `--queues`), a heartbeat that keeps the process' lease and picks up cancel
//! requests, and the maintenance duties (scheduler,
//! rescuer, sweeps, retention, ...: `maintenance/`), which one process of the deployment at a
//! time carries out.

mod maintenance;
mod runtime;

use anyhow::Context as _;
use std::{sync::Arc, time::Duration};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use runtime::Runtime;
use shared::Settings;

/// Which queues to serve, and how many jobs of each at once: `import=4,patch=1`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueSpec(pub Vec<(String, usize)>);

impl QueueSpec {
    pub fn parse(spec: &str, registry: &jobs::Registry) -> anyhow::Result<Self> {
        Self::parse_among(spec, &registry.kinds().collect::<Vec<_>>())
    }

    /// The spec, its queues among the `known` kinds.
    pub fn parse_among(spec: &str, known: &[&str]) -> anyhow::Result<Self> {
        let mut queues = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (kind, concurrency) = match part.split_once('=') {
                Some((kind, n)) => (
                    kind.trim(),
                    n.trim()
                        .parse::<usize>()
                        .ok()
                        .filter(|n| *n > 0)
                        .with_context(|| format!("bad concurrency in {part:?}"))?,
                ),
                None => (part, 1),
            };
            anyhow::ensure!(
                known.contains(&kind),
                "unknown queue {kind:?}; known: {}",
                known.join(", ")
            );
            queues.push((kind.to_owned(), concurrency));
        }
        anyhow::ensure!(!queues.is_empty(), "no queues to serve");
        Ok(Self(queues))
    }

    /// Every known queue, `concurrency` jobs each.
    pub fn all(registry: &jobs::Registry, concurrency: usize) -> Self {
        Self(
            registry
                .kinds()
                .map(|k| (k.to_owned(), concurrency))
                .collect(),
        )
    }
}

/// A unique name per process: a job's row names the worker whose lease it runs under.
pub fn unique_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".to_owned());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// Past the grace period, how long a stopping worker waits for its interrupted jobs to be
/// handed back to the queue, then for its tasks to end.
const HAND_BACK: Duration = Duration::from_secs(10);
const WIND_DOWN: Duration = Duration::from_secs(5);

/// The most a stopping worker takes beyond `CONVEYOR_SHUTDOWN_GRACE_SECS`: a process manager's
/// stop timeout (`terminationGracePeriodSeconds`, compose's `stop_grace_period`) must exceed
/// the grace plus this, or jobs are killed instead of handed back. A job committing its work
/// may hold the worker up to `COMMIT_GRACE` (5 minutes) more; a stop timeout that cuts it
/// short leaves the job to the rescuer.
pub const AFTER_GRACE: Duration = HAND_BACK.saturating_add(WIND_DOWN);

/// A running worker; [`WorkerHandle::shutdown`] drains it.
pub struct WorkerHandle {
    runtime: Arc<Runtime>,
    stop_taking: CancellationToken,
    tasks: JoinSet<()>,
    /// The loops that never end by themselves: the heartbeat, the stray hand-back and the
    /// announcements' listener.
    background: Vec<tokio::task::AbortHandle>,
}

impl WorkerHandle {
    pub fn name(&self) -> &str {
        self.runtime.name()
    }

    /// Graceful stop: take no new jobs, let running ones finish within the grace period, then
    /// hand the rest back to the queue.
    pub async fn shutdown(mut self) {
        tracing::info!(worker = self.runtime.name(), "draining");
        self.stop_taking.cancel();
        let grace = self.runtime.settings().shutdown_grace;
        if !self.runtime.wait_idle(grace).await {
            tracing::warn!("grace period over; handing running jobs back to the queue");
            self.runtime.interrupt_all();
            // Past `STOP_GRACE` only jobs inside their commit still run; heartbeats go on
            // meanwhile, so none is rescued from under this worker.
            if !self.runtime.wait_idle(HAND_BACK).await {
                self.runtime.wait_commits().await;
            }
        }
        // Before the worker says it stopped: a heartbeat after that would mark it alive again
        // (its jobs left to be rescued late, or while a stubborn one still runs here).
        for task in &self.background {
            task.abort();
        }
        let _ = tokio::time::timeout(WIND_DOWN, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.abort_all();
        self.runtime.stopped().await;
        tracing::info!(worker = self.runtime.name(), "stopped");
    }
}

/// Starts a worker serving `queues`.
pub async fn start(
    settings: Settings,
    queues: QueueSpec,
    registry: jobs::Registry,
    name: String,
) -> anyhow::Result<WorkerHandle> {
    for (kind, _) in &queues.0 {
        if let Some(handler) = registry.get(kind) {
            handler
                .prepare()
                .await
                .with_context(|| format!("cannot serve the {kind} queue"))?;
        }
    }
    let runtime = Arc::new(Runtime::connect(settings, registry, name, &queues).await?);
    let stop_taking = CancellationToken::new();
    let mut tasks = JoinSet::new();
    runtime.heartbeat_once().await?;
    let background = vec![
        tasks.spawn(runtime.clone().heartbeat_loop()),
        tasks.spawn(runtime.clone().announcement_listener()),
        tasks.spawn(runtime.clone().stray_loop()),
        tasks.spawn(runtime.clone().lease_watch()),
    ];
    tasks.spawn(maintenance::run(runtime.clone(), stop_taking.clone()));
    for (kind, concurrency) in queues.0 {
        tasks.spawn(
            runtime
                .clone()
                .serve_queue(kind, concurrency, stop_taking.clone()),
        );
    }
    tracing::info!(
        worker = runtime.name(),
        public_name = shared::leader::public_name(runtime.name()),
        "started"
    );
    Ok(WorkerHandle {
        runtime,
        stop_taking,
        tasks,
        background,
    })
}
