//! `GET /v1/tenant`: the caller's tenant, its limits and what it uses of them.

use axum::{extract::State, Json};
use serde::Serialize;
use shared::Problem;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    auth::Tenant,
    limits::{TenantLimits, TenantUsage},
    AppState,
};

#[derive(Serialize, ToSchema)]
pub struct TenantView {
    pub id: Uuid,
    pub name: String,
    pub limits: TenantLimits,
    pub usage: TenantUsage,
}

#[utoipa::path(get, path = "/v1/tenant", tag = "tenant",
    responses((status = 200, body = TenantView)))]
pub async fn current(
    State(state): State<AppState>,
    tenant: Tenant,
) -> Result<Json<TenantView>, Problem> {
    let name: String = sqlx::query_scalar("SELECT name FROM tenants WHERE id = $1")
        .bind(tenant.0)
        .fetch_one(&state.pool)
        .await?;
    Ok(Json(TenantView {
        id: tenant.0,
        name,
        limits: state.limits.load(tenant.0).await?,
        usage: state.limits.usage(tenant.0).await?,
    }))
}
