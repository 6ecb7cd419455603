//! `patch`: one guarded UPDATE or DELETE on a target database. A dry run executes it in a
//! transaction that is rolled back and shows what it would do; an execute walks the table's key
//! in short batches, each copying the before-images of its rows into a snapshot table and
//! recording a checkpoint in the same transaction, so a crash never applies a batch twice and
//! `patch_rollback` can restore the rows.

mod rollback;
mod run;
pub mod snapshot;

pub use contracts::patch::{
    assess, explain, guard, load_plan, table, Assessment, AttemptFigures, DryRun, Executed,
    Explain, Mode, Patch, PatchOutput, PatchOutputs, PatchPayload, PatchRollback, Plan, PlanError,
    Risk, RollbackOutput, RollbackPayload,
};
pub use rollback::PatchRollbackHandler;

use async_trait::async_trait;
use shared::{connections::TargetError, JobContext};
use std::sync::Arc;

use crate::{Handler, JobError, Services};

/// Runs `patch` jobs.
pub struct PatchHandler {
    services: Arc<Services>,
}

impl PatchHandler {
    pub fn new(services: Arc<Services>) -> Self {
        Self { services }
    }
}

#[async_trait]
impl Handler for PatchHandler {
    type Contract = Patch;

    async fn run(&self, ctx: &JobContext, payload: PatchPayload) -> Result<PatchOutput, JobError> {
        let checked = payload.check().map_err(|errors| {
            JobError::Permanent(
                errors
                    .into_iter()
                    .map(|e| format!("{}: {}", e.field, e.message))
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        let target = self
            .services
            .targets
            .target(ctx.tenant_id(), payload.connection_id)
            .await
            .map_err(|e| match e {
                TargetError::UnknownConnection(id) => {
                    JobError::Permanent(format!("connection {id} not found"))
                }
                refused @ TargetError::RefusedConnection(..) => {
                    JobError::Permanent(refused.to_string())
                }
                e @ (TargetError::UnreachableConnection(_) | TargetError::Other(_)) => {
                    JobError::Retryable(e.to_string())
                }
            })?;
        let retention = self.services.settings.snapshot_retention;
        run::run(ctx, &payload, checked, &target, retention).await
    }

    /// Snapshots past their retention are dropped even when no patch runs any more.
    async fn sweep(&self) -> anyhow::Result<()> {
        self.services
            .sweep_targets("expired patch snapshots", |pool| async move {
                snapshot::sweep(&pool).await
            })
            .await
    }
}

/// A database error as a job error: bad data or SQL fails for good, the rest is retried.
pub(crate) fn job_error(e: sqlx::Error) -> JobError {
    if let sqlx::Error::Database(db) = &e {
        let code = db.code().unwrap_or_default();
        // 22: data exception, 23: integrity, 42: syntax/access, P0: raised by a trigger.
        if ["22", "23", "42", "P0", "2F", "39"]
            .iter()
            .any(|class| code.starts_with(class))
        {
            return JobError::Permanent(db.message().to_owned());
        }
    }
    JobError::Retryable(crate::target_error_text(&e))
}
