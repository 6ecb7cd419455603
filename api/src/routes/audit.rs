//! `GET /v1/audit`: the tenant's audit log, newest first, for admin keys.

use crate::extract::Params;
use axum::{extract::State, Json};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::{FieldError, Problem};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    audit::{self, Action, AuditEntry, Filter},
    auth::Admin,
    AppState,
};

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    /// Page size, 1-500 (default 50).
    limit: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// One action, e.g. `job.submit` (see `AuditEntry.action`).
    action: Option<String>,
    /// Changes made by this key.
    key_id: Option<String>,
    /// Changes to this job, dataset, connection, collection or key.
    target_id: Option<String>,
    /// RFC 3339; rows at or after it.
    from: Option<String>,
    /// RFC 3339; rows before it.
    to: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct AuditPage {
    /// Newest first.
    pub entries: Vec<AuditEntry>,
    /// Pass as `cursor` for the next (older) page; absent on the last page. With combined
    /// filters a page may be short, or empty, and not the last.
    pub next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/audit", tag = "audit", params(AuditParams),
    responses((status = 200, body = AuditPage), (status = 401, body = Problem),
              (status = 403, body = Problem, description = "not an admin key"),
              (status = 422, body = Problem, description = "a filter refused, named")))]
pub async fn list(
    State(state): State<AppState>,
    Admin(caller): Admin,
    Params(params): Params<AuditParams>,
) -> Result<Json<AuditPage>, Problem> {
    let mut errors = Vec::new();
    let mut refuse = |field: &str, message: &str| errors.push(FieldError::new(field, message));
    let limit = match params.limit.as_deref().map(str::parse::<i64>) {
        None => 50,
        Some(Ok(limit)) if (1..=500).contains(&limit) => limit,
        Some(_) => {
            refuse("limit", "must be between 1 and 500");
            50
        }
    };
    let cursor = match params.cursor.as_deref().map(str::parse::<i64>) {
        None => None,
        Some(Ok(cursor)) if cursor > 0 => Some(cursor),
        Some(_) => {
            refuse("cursor", "not a cursor returned by this endpoint");
            None
        }
    };
    let action = match params.action.as_deref() {
        None => None,
        Some(name) => {
            let action = Action::parse(name);
            if action.is_none() {
                let known: Vec<&str> = Action::ALL.iter().map(|a| a.as_str()).collect();
                refuse(
                    "action",
                    &format!("unknown action {name:?}; one of {}", known.join(", ")),
                );
            }
            action
        }
    };
    let key_id = match params.key_id.as_deref().map(Uuid::parse_str) {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => {
            refuse("key_id", "must be a key id (a UUID)");
            None
        }
    };
    if params
        .target_id
        .as_ref()
        .is_some_and(|t| t.is_empty() || t.len() > 200)
    {
        refuse("target_id", "must be 1-200 characters");
    }
    let mut time = |field: &str, value: Option<&str>| match value.map(DateTime::parse_from_rfc3339)
    {
        None => None,
        Some(Ok(at)) => Some(at.with_timezone(&Utc)),
        Some(Err(_)) => {
            refuse(field, "must be an RFC 3339 time, e.g. 2026-01-31T12:00:00Z");
            None
        }
    };
    let from = time("from", params.from.as_deref());
    let to = time("to", params.to.as_deref());
    if let (Some(from), Some(to)) = (from, to) {
        if from > to {
            errors.push(FieldError::new("to", "must not be before from"));
        }
    }
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }
    let filter = Filter {
        action,
        key_id,
        target_id: params.target_id,
        from,
        to,
        cursor,
    };
    let budget = state.settings.page_max_bytes;
    let scan = shared::pages::SCAN_ROWS;
    let page = audit::list(&state.pool, caller.key.tenant, &filter, limit, budget, scan).await?;
    Ok(Json(AuditPage {
        next_cursor: page.next_cursor.map(|id| id.to_string()),
        entries: page.entries,
    }))
}
