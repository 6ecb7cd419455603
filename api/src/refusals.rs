//! A job kind's [`Refusal`] as HTTP: the contracts say why a payload was refused, the API says
//! which status that is.

use contracts::Refusal;
use shared::Problem;

/// What the tenant cannot see is 404 (another tenant's id reads as a missing one), a wrong
/// payload 422, a tenant over its preflight bound 429, a target that did not answer 503.
pub fn problem(refusal: Refusal) -> Problem {
    match refusal {
        Refusal::Unknown(what) => Problem::not_found(&what),
        Refusal::Invalid(errors) => Problem::validation(errors),
        busy @ Refusal::Busy(_) => Problem::too_many_requests(busy.to_string()),
        slow @ (Refusal::TimedOut(_) | Refusal::Unreachable) => {
            Problem::unavailable(slow.to_string())
        }
        Refusal::Database(e) => Problem::from(e),
        Refusal::Internal(e) => Problem::internal(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::FieldError;

    #[test]
    fn each_refusal_has_its_status_and_hides_internals() {
        let cases = [
            (Refusal::Unknown("connection".into()), 404),
            (Refusal::field("payload.table", "does not exist"), 422),
            (Refusal::Busy(2), 429),
            (Refusal::TimedOut(500), 503),
            (Refusal::Unreachable, 503),
            (Refusal::Database(sqlx::Error::PoolTimedOut), 503),
            (
                Refusal::Internal("password=s3cret in a stored payload".into()),
                500,
            ),
        ];
        for (refusal, status) in cases {
            let problem = problem(refusal);
            assert_eq!(problem.status, status, "{}", problem.detail);
            assert!(!problem.detail.contains("s3cret"), "{}", problem.detail);
        }
        let invalid = problem(Refusal::Invalid(vec![FieldError::new("payload.x", "no")]));
        assert_eq!(invalid.errors[0].field, "payload.x");
    }
}
