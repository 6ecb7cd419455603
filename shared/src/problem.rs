//! RFC 9457 problem details: every API error, with the fields at fault.

use axum::{
    http::{header, StatusCode},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FieldError {
    /// JSON path of the field, e.g. `payload.steps`.
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// Most field errors one problem lists.
pub const MAX_FIELD_ERRORS: usize = 100;

impl Problem {
    pub fn new(status: StatusCode, slug: &str, detail: impl Into<String>) -> Self {
        Self {
            kind: format!("https://conveyor.dev/problems/{slug}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    /// A 422 naming each field and why: the first [`MAX_FIELD_ERRORS`] of them (a body can hold
    /// a hundred thousand faults, and an answer of each, twice, ran to tens of megabytes), the
    /// detail the first ten and how many there were.
    pub fn validation(mut errors: Vec<FieldError>) -> Self {
        let all = errors.len();
        errors.truncate(MAX_FIELD_ERRORS);
        let mut detail = errors
            .iter()
            .take(10)
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect::<Vec<_>>()
            .join("; ");
        if all > 10 {
            detail.push_str(&format!("; and {} more", all - 10));
        }
        Self {
            errors,
            ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, "validation", detail)
        }
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("{what} not found"),
        )
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", detail)
    }

    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }

    pub fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server logs",
        )
    }

    pub fn too_many_requests(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "too-many-requests", detail)
    }

    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
    }

    /// Unavailable because of `cause`, which goes to the log: its text (addresses, paths, a
    /// server's own words) is not the client's to read.
    pub fn unavailable_after(detail: &str, cause: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %cause, "{detail}");
        Self::unavailable(detail)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        (
            status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body,
        )
            .into_response()
    }
}

/// Why a text holding a NUL character is refused: PostgreSQL stores none in text or JSON.
pub const NUL_REFUSED: &str = "must not contain the NUL character (\\u0000)";

impl From<sqlx::Error> for Problem {
    fn from(e: sqlx::Error) -> Self {
        if database_unreachable(&e) {
            // A restart or a failover: nothing was accepted, and the client may try again.
            return Problem::unavailable_after("PostgreSQL is unreachable; try again", e);
        }
        let code = e
            .as_database_error()
            .and_then(|db| db.code())
            .map(|code| code.into_owned());
        if code.as_deref() == Some("57014") {
            // A session's statement_timeout (searches' sessions have one): the request asked
            // more than the server gives one statement.
            return Problem::unavailable_after(
                "the request's query ran past the server's time limit; narrow it or try again",
                e,
            );
        }
        if code.as_deref() == Some("55P03") {
            // A lock_timeout (deletes have one): another operation holds what it changes.
            return Problem::conflict(
                "another operation holds it (a job writing to it, say); try again later",
            );
        }
        let refused = match code.as_deref() {
            // A NUL the extractors did not see (a path segment, say): PostgreSQL stores none.
            Some("22021") => format!("a text of the request {NUL_REFUSED}"),
            // A time past PostgreSQL's range that a check did not see (a query's bound, say).
            Some("22008") => "a time of the request is out of range".to_owned(),
            _ => return Problem::internal(e),
        };
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "validation", refused)
    }
}

/// The database is down or restarting (no connection, or it is shutting down or starting).
fn database_unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
        _ => false,
    }
}

impl From<anyhow::Error> for Problem {
    fn from(e: anyhow::Error) -> Self {
        Problem::internal(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    async fn respond(problem: Problem) -> (StatusCode, String, Value) {
        let response = problem.into_response();
        let status = response.status();
        let content_type = response.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, content_type, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn a_problem_is_sent_with_its_status_as_problem_json() {
        let (status, content_type, body) = respond(Problem::conflict("already cancelled")).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(content_type, "application/problem+json");
        assert_eq!(
            body,
            json!({
                "type": "https://conveyor.dev/problems/conflict",
                "title": "Conflict",
                "status": 409,
                "detail": "already cancelled",
            }),
            "no `errors` member when there are none"
        );
        for (problem, expected) in [
            (Problem::not_found("job"), StatusCode::NOT_FOUND),
            (Problem::unauthorized("no key"), StatusCode::UNAUTHORIZED),
            (
                Problem::too_many_requests("slow down"),
                StatusCode::TOO_MANY_REQUESTS,
            ),
            (
                Problem::unavailable("later"),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (Problem::internal("boom"), StatusCode::INTERNAL_SERVER_ERROR),
        ] {
            let (status, _, body) = respond(problem).await;
            assert_eq!(status, expected);
            assert_eq!(body["status"], expected.as_u16());
            assert_eq!(body["title"], expected.canonical_reason().unwrap());
        }
        // The internal error's text stays in the log, not in the response; so does an
        // unreachable database's.
        let (_, _, body) = respond(Problem::internal("password=hunter2")).await;
        assert!(!body.to_string().contains("hunter2"), "{body}");
        let refused = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connecting to 10.1.2.3:5432 as conveyor_platform",
        );
        let (status, _, body) = respond(Problem::from(sqlx::Error::Io(refused))).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(!body.to_string().contains("10.1.2.3"), "{body}");
    }

    #[tokio::test]
    async fn a_validation_problem_lists_each_field_and_says_them_in_the_detail() {
        let problem = Problem::validation(vec![
            FieldError::new("payload.steps", "must be at least 0"),
            FieldError::new("kind", "unknown kind"),
        ]);
        let (status, content_type, body) = respond(problem).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(content_type, "application/problem+json");
        assert_eq!(body["type"], "https://conveyor.dev/problems/validation");
        assert_eq!(body["status"], 422);
        assert_eq!(
            body["detail"],
            "payload.steps: must be at least 0; kind: unknown kind"
        );
        assert_eq!(
            body["errors"],
            json!([
                {"field": "payload.steps", "message": "must be at least 0"},
                {"field": "kind", "message": "unknown kind"},
            ])
        );
        // And it reads back as what was sent.
        let read: Problem = serde_json::from_value(body).unwrap();
        assert_eq!(read.errors[1], FieldError::new("kind", "unknown kind"));
    }

    /// A NUL that reached a statement (from a path segment, say) is the request's fault.
    #[tokio::test]
    async fn a_nul_the_database_cannot_store_is_a_422() {
        let db = crate::testing::TestDatabase::new().await;
        let refused = sqlx::query("SELECT $1::text")
            .bind("a\0b")
            .execute(&db.pool)
            .await
            .unwrap_err();
        let (status, _, body) = respond(Problem::from(refused)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert!(body["detail"].as_str().unwrap().contains("NUL"), "{body}");
    }
}
