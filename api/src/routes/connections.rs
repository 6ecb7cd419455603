//! Target databases a tenant registers for imports and patches. The URL is encrypted at rest
//! and never returned.

use crate::routes::delete_audited;
use axum::{
    extract::{Path, State},
    http::StatusCode,
    Extension, Json,
};
use serde::Deserialize;
use shared::{
    connections::{self, Connection, Refusal, TargetUrl},
    FieldError, Problem,
};
use tower_http::request_id::RequestId;
use utoipa::ToSchema;

use crate::{
    audit::{Action, Entry},
    auth::{Tenant, Writer},
    extract::JsonBody,
    AppState,
};

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewConnection {
    /// Unique per tenant, 1-100 characters.
    pub name: String,
    /// `postgres://user:password@host:port/database[?sslmode=disable|prefer|require]`: a public
    /// address (or one `CONVEYOR_CONNECTION_ALLOW` names), an unprivileged role; checked by
    /// connecting once.
    pub url: String,
}

#[utoipa::path(post, path = "/v1/connections", tag = "connections", request_body = NewConnection,
    responses((status = 201, body = Connection), (status = 409, body = Problem), (status = 422, body = Problem),
              (status = 503, body = Problem, description = "CONVEYOR_SECRET_KEY is not configured")))]
pub async fn create(
    State(state): State<AppState>,
    writer: Writer,
    request: Option<Extension<RequestId>>,
    JsonBody(body): JsonBody<NewConnection>,
) -> Result<(StatusCode, Json<Connection>), Problem> {
    let tenant = writer.tenant();
    let invalid =
        |field: &str, message: String| Problem::validation(vec![FieldError::new(field, message)]);
    if body.name.is_empty() || body.name.len() > 100 {
        return Err(invalid("name", "must be 1-100 characters".into()));
    }
    let url = TargetUrl::parse(&body.url).map_err(|why| invalid("url", why))?;
    let targets = &state.context.targets;
    let cipher = targets.cipher().ok_or_else(|| {
        Problem::unavailable("connections need CONVEYOR_SECRET_KEY to encrypt credentials")
    })?;
    // Each is a pool on every worker and a target every sweep visits. Checked before the
    // connection is tried, and again where it is recorded.
    let most = connections::MAX_PER_TENANT;
    let mut conn = state.pool.acquire().await?;
    shared::quotas::seen_room_for_one(&mut conn, tenant.0, "connections", most).await?;
    drop(conn);
    // The check reaches out on the tenant's behalf (a lookup, a connection): as many at once
    // as its preflights.
    let _probing = state
        .context
        .preflights
        .slot(tenant.0)
        .map_err(crate::refusals::problem)?;
    match targets.guard().probe(&url).await {
        Ok(()) => {}
        Err(Refusal::Invalid(why)) => return Err(invalid("url", why)),
        Err(ref refusal @ Refusal::Unreachable(ref detail)) => {
            // The response's x-request-id names this line.
            let request_id = request
                .as_ref()
                .and_then(|r| r.header_value().to_str().ok());
            let detail = shared::telemetry::Untrusted(detail);
            tracing::warn!(tenant = %tenant.0, request_id, %detail, "connection check failed");
            return Err(invalid("url", refusal.to_string()));
        }
    }
    let mut tx = state.pool.begin().await?;
    shared::quotas::room_for_one(&mut tx, tenant.0, "connections", most).await?;
    let created = connections::create(
        &mut *tx,
        cipher,
        tenant.0,
        &body.name,
        &body.url,
        &url.display(),
    )
    .await?
    .ok_or_else(|| Problem::conflict(format!("a connection named {:?} exists", body.name)))?;
    // No hash of the body: it holds the credential, which a hash would let be guessed offline.
    let entry = Entry::new(Action::ConnectionCreate)
        .target(created.id)
        .detail(serde_json::json!({"name": created.name, "url": created.display}));
    writer.audit(&mut *tx, entry).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(created)))
}

#[utoipa::path(get, path = "/v1/connections", tag = "connections",
    responses((status = 200, body = Vec<Connection>)))]
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
) -> Result<Json<Vec<Connection>>, Problem> {
    Ok(Json(connections::list(&state.pool, tenant.0).await?))
}

#[utoipa::path(delete, path = "/v1/connections/{id}", tag = "connections", params(("id" = Uuid, Path)),
    responses((status = 204, description = "deleted"), (status = 404, body = Problem)))]
pub async fn delete(
    State(state): State<AppState>,
    writer: Writer,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    delete_audited(
        &state,
        &writer,
        &id,
        "connection",
        Action::ConnectionDelete,
        |db, tenant, id| Box::pin(connections::delete(db, tenant, id)),
    )
    .await
}
