//! A tenant's API keys, managed with an admin key: list, create, revoke. A key never sees or
//! touches another tenant's keys: their ids are as unknown as ids that do not exist.

use axum::{
    extract::{Path, State},
    http::StatusCode,
    Json,
};
use serde::{Deserialize, Serialize};
use shared::{FieldError, Problem};
use utoipa::ToSchema;

use crate::{
    audit::Actor,
    auth::Admin,
    extract::{HashedJson, Params},
    keys::{self, ApiKey, CreatedKey, Role},
    revocation::{self, Invalidation},
    routes::page::Page,
    AppState,
};

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// `admin`, `write` or `read`; `write` unless given (`member`, its former name, is
    /// accepted).
    pub role: Option<Role>,
    /// A label, 1-100 characters.
    pub name: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct KeyList {
    /// Oldest first, revoked ones too.
    pub keys: Vec<ApiKey>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<uuid::Uuid>,
}

#[utoipa::path(get, path = "/v1/keys", tag = "keys", params(Page),
    responses((status = 200, body = KeyList), (status = 401, body = Problem),
              (status = 403, body = Problem, description = "not an admin key"),
              (status = 422, body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    Admin(caller): Admin,
    Params(page): Params<Page>,
) -> Result<Json<KeyList>, Problem> {
    // 500 unless asked: the list answered whole before it was paged.
    let (limit, cursor) = page.or_limit(500).checked()?;
    let budget = state.settings.page_max_bytes;
    let page = keys::list(&state.pool, caller.key.tenant, cursor, limit, budget).await?;
    Ok(Json(KeyList {
        next_cursor: page.next_cursor(limit, |k| k.id),
        keys: page.items,
    }))
}

#[utoipa::path(post, path = "/v1/keys", tag = "keys", request_body = NewKey,
    responses((status = 201, body = CreatedKey, description = "the key, shown this once"),
              (status = 401, body = Problem), (status = 403, body = Problem, description = "not an admin key"),
              (status = 409, body = Problem, description = "the tenant holds its most live keys"),
              (status = 422, body = Problem)))]
pub async fn create(
    State(state): State<AppState>,
    Admin(caller): Admin,
    HashedJson(body, body_sha256): HashedJson<NewKey>,
) -> Result<(StatusCode, Json<CreatedKey>), Problem> {
    let name = keys::valid_name(body.name.as_deref())
        .map_err(|e| Problem::validation(vec![FieldError::new("name", e)]))?;
    let role = body.role.unwrap_or(Role::Write);
    // Each key draws on a bucket of its own: a key held to a rate could make itself more
    // keys, each with a full bucket.
    let throttled: bool =
        sqlx::query_scalar("SELECT rate_per_sec IS NOT NULL FROM api_keys WHERE id = $1")
            .bind(caller.key.id)
            .fetch_one(&state.pool)
            .await?;
    if throttled {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "throttled-key",
            "a key with a submission rate of its own cannot make keys; the operator can",
        ));
    }
    let by = Actor::from(&caller);
    let created = keys::create(&state.pool, &by, role, name.as_deref(), Some(body_sha256))
        .await?
        .ok_or_else(|| {
            Problem::new(
                StatusCode::CONFLICT,
                "too-many-keys",
                format!(
                    "a tenant holds at most {} live keys: revoke one first",
                    keys::MAX_LIVE_KEYS
                ),
            )
        })?;
    tracing::info!(key = %created.info.id, by = %caller.key.id, role = role.as_str(), "API key created");
    Ok((StatusCode::CREATED, Json(created)))
}

#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "keys", params(("id" = uuid::Uuid, Path)),
    responses((status = 204, description = "revoked (or already revoked); every API process refuses it within a second"),
              (status = 401, body = Problem), (status = 403, body = Problem, description = "not an admin key"),
              (status = 404, body = Problem)))]
pub async fn revoke(
    State(state): State<AppState>,
    Admin(caller): Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    // A malformed id names no key: answered as an unknown one.
    let id: uuid::Uuid = id.parse().map_err(|_| Problem::not_found("key"))?;
    if !keys::revoke(&state.pool, Some(&Actor::from(&caller)), id).await? {
        return Err(Problem::not_found("key"));
    }
    tracing::info!(key = %id, by = %caller.key.id, "API key revoked");
    let tenant = Some(caller.key.tenant);
    revocation::invalidate(&state, Invalidation::Key { id, tenant }).await;
    Ok(StatusCode::NO_CONTENT)
}
