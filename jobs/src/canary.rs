//! `canary`: a job that only reports progress. Operators smoke-test a deployment with it and
//! the queue benchmark drains thousands of them.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shared::{FieldError, JobContext};
use std::time::{Duration, Instant};
use utoipa::ToSchema;

use crate::{parse_payload, Handler, JobError};

#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CanaryPayload {
    /// Progress steps to report (0–100,000).
    #[serde(default)]
    pub steps: u32,
    /// Milliseconds each step takes (0–60,000).
    #[serde(default)]
    pub step_ms: u64,
    /// The first `fail_first` attempts fail (a retryable error).
    #[serde(default)]
    pub fail_first: u32,
}

pub const MAX_STEPS: u32 = 100_000;
pub const MAX_STEP_MS: u64 = 60_000;

pub struct Canary;

impl CanaryPayload {
    pub(crate) fn check(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        if self.steps > MAX_STEPS {
            errors.push(FieldError::new(
                "payload.steps",
                format!("must be at most {MAX_STEPS}"),
            ));
        }
        if self.step_ms > MAX_STEP_MS {
            errors.push(FieldError::new(
                "payload.step_ms",
                format!("must be at most {MAX_STEP_MS}"),
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

#[async_trait]
impl Handler for Canary {
    fn kind(&self) -> &'static str {
        "canary"
    }

    fn validate(&self, payload: &Value) -> Result<(), Vec<FieldError>> {
        parse_payload::<CanaryPayload>(payload)?.check()
    }

    async fn run(&self, ctx: &JobContext, payload: Value) -> Result<Value, JobError> {
        let payload: CanaryPayload = serde_json::from_value(payload)
            .map_err(|e| JobError::Permanent(format!("invalid payload: {e}")))?;
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
        Ok(json!({
            "steps": payload.steps,
            "attempt": ctx.attempt(),
            "elapsed_ms": started.elapsed().as_millis() as u64,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let errors = Canary.validate(&json!({"steps": "ten"})).unwrap_err();
        assert_eq!(errors[0].field, "payload.steps");
        let errors = Canary
            .validate(&json!({"steps": 1, "bogus": 1}))
            .unwrap_err();
        assert_eq!(errors[0].field, "payload.bogus");
        assert!(errors[0].message.contains("bogus"), "{}", errors[0].message);
        let errors = Canary.validate(&json!({"step_ms": 999_999})).unwrap_err();
        assert_eq!(errors[0].field, "payload.step_ms");
        assert!(Canary.validate(&json!({"steps": 3, "step_ms": 10})).is_ok());
        assert!(Canary.validate(&json!({})).is_ok());
    }
}
