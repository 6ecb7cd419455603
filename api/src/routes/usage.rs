//! `GET /v1/usage`: what the tenant's jobs used over a period, summed, optionally by kind, day
//! or key (from `usage_sums`: each batch of ended attempts adds its sums per tenant, key and kind).

use crate::extract::Params;
use axum::{extract::State, Json};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use shared::{FieldError, Problem};
use utoipa::{IntoParams, ToSchema};

use crate::{auth::Tenant, AppState};

/// The longest period one report covers.
const MAX_SPAN_DAYS: i64 = 366;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UsageParams {
    /// Start of the period, RFC 3339 (default: 30 days before `to`; at most 366 days before).
    from: Option<String>,
    /// End of the period, exclusive, RFC 3339 (default: now).
    to: Option<String>,
    /// `kind`, `day` (UTC) or `key`; absent: one total.
    group_by: Option<String>,
}

#[derive(Serialize, ToSchema, sqlx::FromRow)]
pub struct UsageGroup {
    /// The kind, the day (`2026-12-02`) or the key id; null for the total.
    pub group: Option<String>,
    /// Attempts that ended in the period.
    pub attempts: i64,
    /// What they used, summed.
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub usage: shared::usage::Usage,
}

#[derive(Serialize, ToSchema)]
pub struct UsageReport {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub group_by: Option<String>,
    pub groups: Vec<UsageGroup>,
}

#[utoipa::path(get, path = "/v1/usage", tag = "tenant", params(UsageParams),
    responses((status = 200, body = UsageReport), (status = 422, body = Problem)))]
pub async fn usage(
    State(state): State<AppState>,
    tenant: Tenant,
    Params(params): Params<UsageParams>,
) -> Result<Json<UsageReport>, Problem> {
    let mut errors = Vec::new();
    let mut time = |field: &str, raw: Option<&str>| {
        raw.and_then(|raw| match DateTime::parse_from_rfc3339(raw) {
            Ok(t) => Some(t.with_timezone(&Utc)),
            Err(_) => {
                errors.push(FieldError::new(field, "must be an RFC 3339 time"));
                None
            }
        })
    };
    let to = time("to", params.to.as_deref()).unwrap_or_else(Utc::now);
    let from = time("from", params.from.as_deref()).unwrap_or(to - Duration::days(30));
    // Group expressions come from this fixed list, never from the request.
    let group = match params.group_by.as_deref() {
        None => "NULL::text",
        Some("kind") => "kind",
        Some("day") => "to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        Some("key") => "key_id::text",
        Some(other) => {
            errors.push(FieldError::new(
                "group_by",
                format!("{other:?} is not kind, day or key"),
            ));
            "NULL::text"
        }
    };
    // Ungrouped, the total is one row even when nothing was used.
    let grouping = if params.group_by.is_some() {
        "GROUP BY 1 ORDER BY 1"
    } else {
        ""
    };
    if from > to {
        errors.push(FieldError::new("from", "must not be after `to`"));
    } else if to - from > Duration::days(MAX_SPAN_DAYS) {
        // Each report reads its span's rows: an unbounded one read the tenant's whole history.
        let message = format!("must be at most {MAX_SPAN_DAYS} days before `to`");
        errors.push(FieldError::new("from", message));
    }
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }
    let groups = sqlx::query_as(&format!(
        "SELECT {group} AS \"group\", coalesce(sum(attempts), 0)::bigint AS attempts,
                coalesce(sum(wall_seconds), 0) AS wall_seconds,
                coalesce(sum(cpu_seconds), 0) AS cpu_seconds,
                coalesce(sum(rows_read), 0)::bigint AS rows_read,
                coalesce(sum(rows_written), 0)::bigint AS rows_written,
                coalesce(sum(bytes_read), 0)::bigint AS bytes_read,
                coalesce(sum(chunks_embedded), 0)::bigint AS chunks_embedded,
                coalesce(sum(tokens_embedded), 0)::bigint AS tokens_embedded,
                coalesce(sum(synthetic_rows), 0)::bigint AS synthetic_rows
         FROM usage_sums
         WHERE tenant_id = $1 AND finished_at >= $2 AND finished_at < $3
         {grouping}"
    ))
    .bind(tenant.0)
    .bind(from)
    .bind(to)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(UsageReport {
        from,
        to,
        group_by: params.group_by,
        groups,
    }))
}
