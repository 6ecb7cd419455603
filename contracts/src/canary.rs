//! `canary`: a job that only reports progress. Operators smoke-test a deployment with it and
//! the queue benchmark drains thousands of them.

use serde::{Deserialize, Serialize};
use shared::FieldError;
use utoipa::ToSchema;

use crate::Contract;

pub struct Canary;

impl Contract for Canary {
    const KIND: &'static str = "canary";
    type Payload = CanaryPayload;
    type Output = CanaryOutput;

    fn check(&self, payload: &CanaryPayload) -> Result<(), Vec<FieldError>> {
        payload.check()
    }
}

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

impl CanaryPayload {
    pub fn check(&self) -> Result<(), Vec<FieldError>> {
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
        crate::refused(errors)
    }
}

/// A canary's result.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CanaryOutput {
    pub steps: u32,
    /// The attempt that succeeded (1 unless earlier ones failed).
    pub attempt: i32,
    pub elapsed_ms: u64,
}

#[cfg(test)]
mod tests {
    use crate::Registry;
    use serde_json::json;

    #[test]
    fn validation_names_the_field() {
        let errors = Registry::standard()
            .validate("canary", &json!({"steps": "ten"}))
            .err()
            .unwrap();
        assert_eq!(errors[0].field, "payload.steps");
        let errors = Registry::standard()
            .validate("canary", &json!({"steps": 1, "bogus": 1}))
            .err()
            .unwrap();
        assert_eq!(errors[0].field, "payload.bogus");
        assert!(errors[0].message.contains("bogus"), "{}", errors[0].message);
        let errors = Registry::standard()
            .validate("canary", &json!({"step_ms": 999_999}))
            .err()
            .unwrap();
        assert_eq!(errors[0].field, "payload.step_ms");
        assert!(Registry::standard()
            .validate("canary", &json!({"steps": 3, "step_ms": 10}))
            .is_ok());
        assert!(Registry::standard().validate("canary", &json!({})).is_ok());
    }
}
