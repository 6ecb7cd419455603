//! `canary`: a job that only reports progress. Operators smoke-test a deployment with it and
//! the queue benchmark drains thousands of them.

use async_trait::async_trait;
use contracts::canary::{Canary, CanaryOutput, CanaryPayload};

use shared::JobContext;
use std::time::{Duration, Instant};

use crate::{Handler, JobError};

pub struct CanaryHandler;

#[async_trait]
impl Handler for CanaryHandler {
    type Contract = Canary;

    async fn run(
        &self,
        ctx: &JobContext,
        payload: CanaryPayload,
    ) -> Result<CanaryOutput, JobError> {
        let started = Instant::now();
        if ctx.attempt() <= payload.fail_first as i32 {
            return Err(JobError::Retryable(format!(
                "canary fails its first {} attempt(s); this was attempt {}",
                payload.fail_first,
                ctx.attempt()
            )));
        }
        for step in 1..=payload.steps {
            if payload.step_ms > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(payload.step_ms)) => {}
                    _ = ctx.cancellation().cancelled() => {}
                }
            }
            ctx.checkpoint()?;
            ctx.progress(
                step as f32 / payload.steps as f32,
                format!("step {step}/{}", payload.steps),
            )
            .await;
        }
        Ok(CanaryOutput {
            steps: payload.steps,
            attempt: ctx.attempt(),
            elapsed_ms: started.elapsed().as_millis() as u64,
        })
    }
}
