//! Why a kind refuses a payload at preflight, in the contracts' own terms: no HTTP here. The API
//! gives each variant its status (`api/src/refusals.rs`); a worker that re-runs a check (a
//! rollback locating its patch) asks [`Refusal::is_transient`] whether to retry.

use shared::{connections::TargetError, FieldError};

#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Something the payload names that the tenant cannot see (a dataset, connection, model):
    /// another tenant's id reads exactly as one that does not exist.
    #[error("{0} not found")]
    Unknown(String),
    /// Fields that are wrong against the world, each named under `payload`.
    #[error("{}", .0.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldError>),
    /// The tenant already has this many preflights in flight.
    #[error("this tenant already has {0} preflights in flight; try again shortly")]
    Busy(usize),
    /// The preflight ran past its bound.
    #[error("the preflight did not finish within {0} ms: the target database is slow or busy")]
    TimedOut(u128),
    /// The target database could not be read (its error stays in the log: it can describe the
    /// server to a client).
    #[error("the target database is unreachable or did not answer in time")]
    Unreachable,
    /// The control plane's database failed (or is restarting).
    #[error("control plane: {0}")]
    Database(#[from] sqlx::Error),
    /// Our own failure.
    #[error("{0}")]
    Internal(String),
}

impl Refusal {
    /// One field refused for one reason.
    pub fn field(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid(vec![FieldError::new(field, reason)])
    }

    /// Whether the same check may pass later without any change to the payload.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Busy(_)
                | Self::TimedOut(_)
                | Self::Unreachable
                | Self::Database(_)
                | Self::Internal(_)
        )
    }
}

impl From<Vec<FieldError>> for Refusal {
    fn from(errors: Vec<FieldError>) -> Self {
        Self::Invalid(errors)
    }
}

impl From<TargetError> for Refusal {
    fn from(e: TargetError) -> Self {
        match e {
            TargetError::UnknownConnection(_) => Self::Unknown("connection".into()),
            TargetError::RefusedConnection(_, reason) => {
                Self::field("payload.connection_id", reason)
            }
            TargetError::UnreachableConnection(_) => Self::Unreachable,
            TargetError::Other(e) => Self::Internal(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_the_world_may_change_is_transient() {
        assert!(Refusal::Unreachable.is_transient());
        assert!(Refusal::Busy(2).is_transient());
        assert!(!Refusal::Unknown("dataset".into()).is_transient());
        assert!(!Refusal::field("payload.x", "no").is_transient());
    }

    #[test]
    fn an_invalid_payload_reads_as_its_fields() {
        let refusal = Refusal::Invalid(vec![
            FieldError::new("payload.a", "too long"),
            FieldError::new("payload.b", "unknown"),
        ]);
        assert_eq!(
            refusal.to_string(),
            "payload.a: too long; payload.b: unknown"
        );
    }
}
