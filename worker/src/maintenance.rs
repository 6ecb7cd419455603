//! The maintenance loop: scheduler, rescuer and sweeps. Every worker process runs it, but only the one
//! holding a PostgreSQL advisory lock acts, so there is one rescuer at a time.

use shared::{model::QueueMessage, store};
use sqlx::{pool::PoolConnection, Postgres};
use std::{collections::BTreeMap, sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;

use crate::{runtime::Change, Runtime};

/// Advisory lock key of the maintenance loop ("conveyor" in ASCII, shortened).
const LOCK_KEY: i64 = 0x636f6e7665796f;
const TICK: Duration = Duration::from_millis(250);
const BATCH: i64 = 1000;
/// How often the leader runs the job kinds' sweeps (expired snapshots, stale staging tables).
const SWEEP_EVERY: Duration = Duration::from_secs(300);

pub(crate) async fn run(runtime: Arc<Runtime>, stop: CancellationToken) {
    let mut leader: Option<PoolConnection<Postgres>> = None;
    let mut ticks: u64 = 0;
    // Sweeps reach every target database: they run beside the ticks, one at a time.
    let mut sweeping: Option<tokio::task::JoinHandle<()>> = None;
    while !stop.is_cancelled() {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.cancelled() => break,
        }
        ticks += 1;
        if leader.is_none() {
            leader = try_lead(&runtime).await;
        }
        let Some(conn) = leader.as_mut() else {
            continue;
        };
        // A lost connection loses the lock with it: check before acting.
        if sqlx::query("SELECT 1").execute(&mut **conn).await.is_err() {
            leader = None;
            continue;
        }
        if let Err(e) = tick(&runtime, ticks).await {
            tracing::warn!(error = %e, "maintenance tick failed");
        }
        let sweep_due = ticks % (SWEEP_EVERY.as_millis() / TICK.as_millis()) as u64 == 1;
        if sweep_due && sweeping.as_ref().is_none_or(|s| s.is_finished()) {
            let registry = runtime.registry().clone();
            sweeping = Some(tokio::spawn(async move { registry.sweep().await }));
        }
    }
}

async fn try_lead(runtime: &Runtime) -> Option<PoolConnection<Postgres>> {
    let mut conn = runtime.pool().acquire().await.ok()?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(LOCK_KEY)
        .fetch_one(&mut *conn)
        .await
        .ok()?;
    if locked {
        tracing::info!(
            worker = runtime.name(),
            "leading maintenance (rescuer, scheduler)"
        );
        // Keep this connection out of the pool for as long as we lead.
        Some(conn)
    } else {
        None
    }
}

async fn tick(runtime: &Runtime, ticks: u64) -> anyhow::Result<()> {
    let settings = runtime.settings();
    // Scheduled and retrying jobs whose time has come.
    let due = store::promote_due(runtime.pool(), BATCH).await?;
    runtime
        .dispatch(due.iter().filter_map(Change::moved).collect())
        .await;

    let every = |period: Duration| {
        ticks.is_multiple_of((period.as_millis() / TICK.as_millis()).max(1) as u64)
    };
    if every(settings.heartbeat) {
        // Running jobs of workers whose lease lapsed (kill -9, node loss).
        let orphans = store::rescue_orphans(
            runtime.pool(),
            settings.rescue_after,
            settings.max_worker_deaths,
        )
        .await?;
        if !orphans.is_empty() {
            tracing::warn!(count = orphans.len(), "rescued jobs of lost workers");
        }
        runtime
            .dispatch(orphans.iter().filter_map(Change::moved).collect())
            .await;
    }
    if every(settings.rescue_after) {
        // Queued rows whose queue entry is gone (a failed push, a Redis restart).
        let stale = store::stale_queued(runtime.pool(), settings.rescue_after, BATCH).await?;
        let mut lost = Vec::new();
        for (kind, group) in by_kind(&stale) {
            let messages: Vec<_> = group.iter().map(|m| message(m)).collect();
            let present = runtime.queues().present(kind, &messages).await?;
            lost.extend(
                group
                    .into_iter()
                    .zip(present)
                    .filter(|(_, p)| !p)
                    .map(|(m, _)| m.clone()),
            );
        }
        if !lost.is_empty() {
            tracing::warn!(count = lost.len(), "re-enqueued jobs missing from Redis");
            runtime
                .push(lost.iter().map(|m| (m.kind.clone(), message(m))).collect())
                .await;
        }
        let ids: Vec<_> = stale.iter().map(|m| m.id).collect();
        store::touch(runtime.pool(), &ids).await?;
        for kind in runtime.registry().kinds() {
            runtime.queues().forget_done(kind, 10_000).await?;
        }
    }
    Ok(())
}

fn message(moved: &store::Moved) -> QueueMessage {
    QueueMessage {
        job_id: moved.id,
        generation: moved.attempt,
    }
}

fn by_kind(moved: &[store::Moved]) -> BTreeMap<&str, Vec<&store::Moved>> {
    let mut groups: BTreeMap<&str, Vec<&store::Moved>> = BTreeMap::new();
    for m in moved {
        groups.entry(m.kind.as_str()).or_default().push(m);
    }
    groups
}
