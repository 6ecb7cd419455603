//! Saved models: what `synthesis` jobs with `save_model: true` fitted, for `sample` jobs to
//! draw from. List, read, delete.

use axum::{
    extract::{Path, State},
    http::StatusCode,
    Json,
};
use serde::Serialize;
use shared::{
    datasets,
    object_deletes::{self, Owner},
    saved_models::{self, SavedModel},
    Problem,
};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    audit::{Action, Entry},
    auth::{Tenant, Writer},
    extract::Params,
    routes::{page::Page, parse_id},
    AppState,
};

#[derive(Serialize, ToSchema)]
pub struct ModelList {
    pub models: Vec<SavedModel>,
    pub next_cursor: Option<Uuid>,
}

#[utoipa::path(get, path = "/v1/models", tag = "models", params(Page),
    responses((status = 200, body = ModelList, description = "newest first"),
              (status = 422, body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    Params(page): Params<Page>,
) -> Result<Json<ModelList>, Problem> {
    let (limit, cursor) = page.checked()?;
    let budget = state.settings.page_max_bytes;
    let page = saved_models::list(&state.pool, tenant.0, cursor, limit, budget).await?;
    Ok(Json(ModelList {
        next_cursor: page.next_cursor(limit, |m| m.id),
        models: page.items,
    }))
}

async fn find(state: &AppState, tenant: Tenant, id: &str) -> Result<SavedModel, Problem> {
    let id = parse_id(id, "model")?;
    saved_models::get(&state.pool, tenant.0, id)
        .await?
        .ok_or_else(|| Problem::not_found("model"))
}

#[utoipa::path(get, path = "/v1/models/{id}", tag = "models", params(("id" = Uuid, Path)),
    responses((status = 200, body = SavedModel), (status = 404, body = Problem)))]
pub async fn get_one(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<SavedModel>, Problem> {
    find(&state, tenant, &id).await.map(Json)
}

#[utoipa::path(delete, path = "/v1/models/{id}", tag = "models", params(("id" = Uuid, Path)),
    responses((status = 204, description = "deleted, with its stored file"),
              (status = 404, body = Problem),
              (status = 409, body = Problem, description = "a live job samples from the model")))]
pub async fn delete(
    State(state): State<AppState>,
    writer: Writer,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    let tenant = writer.tenant();
    let model = find(&state, tenant, &id).await?;
    if let Some(conflict) = datasets::in_use(&state.pool, tenant.0, model.id, "model").await? {
        return Err(conflict);
    }
    let mut tx = state.pool.begin().await?;
    if saved_models::delete(&mut *tx, tenant.0, model.id).await? {
        object_deletes::mark(&mut tx, tenant.0, Owner::Model, model.id).await?;
        let entry = Entry::new(Action::ModelDelete)
            .target(model.id)
            .detail(serde_json::json!({"name": model.name, "version": model.version}));
        writer.audit(&mut *tx, entry).await?;
    }
    tx.commit().await?;
    // To its end whatever the client does (see `datasets::upload`).
    let (pool, objects) = (state.pool.clone(), state.objects.clone());
    let _ = tokio::spawn(async move {
        object_deletes::delete_marked(&pool, &objects, Owner::Model, model.id).await
    })
    .await;
    Ok(StatusCode::NO_CONTENT)
}
