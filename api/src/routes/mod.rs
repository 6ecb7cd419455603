use axum::{extract::DefaultBodyLimit, routing::get};
use utoipa::OpenApi;
use utoipa_axum::{
    router::{OpenApiRouter, UtoipaMethodRouterExt},
    routes,
};

use shared::Problem;
use uuid::Uuid;

use crate::{
    audit::{Action, Entry},
    auth::Writer,
    AppState,
};
use axum::http::StatusCode;
use futures::future::BoxFuture;
use sqlx::PgConnection;

/// How long a delete waits for the rows it removes: a collection an ingest is writing to is
/// locked for as long, and deletes waiting on it held the API's pool for every tenant.
const DELETE_LOCK_WAIT: &str = "5s";

/// Deletes one of the caller's tenant's resources and records it in the audit log, in one
/// transaction: 204, 404 when the tenant has no such `what`, 409 when another operation holds
/// it past [`DELETE_LOCK_WAIT`].
pub(crate) async fn delete_audited(
    state: &AppState,
    writer: &Writer,
    id: &str,
    what: &str,
    action: Action,
    delete: impl for<'c> FnOnce(&'c mut PgConnection, Uuid, Uuid) -> BoxFuture<'c, sqlx::Result<bool>>,
) -> Result<StatusCode, Problem> {
    let id = parse_id(id, what)?;
    let mut tx = state.pool.begin().await?;
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(DELETE_LOCK_WAIT)
        .execute(&mut *tx)
        .await?;
    if !delete(&mut tx, writer.tenant().0, id).await? {
        return Err(Problem::not_found(what));
    }
    writer
        .audit(&mut *tx, Entry::new(action).target(id))
        .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A resource's id from the path. A malformed id names nothing, so it is answered as an
/// unknown one: 404.
pub(crate) fn parse_id(id: &str, what: &str) -> Result<Uuid, Problem> {
    Uuid::parse_str(id).map_err(|_| Problem::not_found(what))
}

pub(crate) mod audit;
pub(crate) mod buckets;
pub(crate) mod bulk;
pub(crate) mod collections;
pub(crate) mod connections;
pub(crate) mod dashboard;
pub(crate) mod datasets;
pub(crate) mod events;
pub(crate) mod jobs;
pub(crate) mod keys;
pub(crate) mod models;
pub(crate) mod ops;
pub(crate) mod page;
pub(crate) mod patches;
pub(crate) mod pipelines;
pub(crate) mod queues;
pub(crate) mod schedules;
pub(crate) mod session;
pub(crate) mod tenant;
pub(crate) mod usage;
pub(crate) mod webhooks;

/// The API's routes and their OpenAPI document, made from one list: each handler's
/// `#[utoipa::path]` gives its method and path, so a route cannot be missing from
/// `/openapi.json`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(crate::openapi::ApiDoc::openapi())
        .routes(routes!(jobs::submit, jobs::list))
        .routes(routes!(jobs::submit_batch))
        .routes(routes!(bulk::cancel))
        .routes(routes!(bulk::retry))
        .routes(routes!(jobs::get_one, jobs::delete))
        .routes(routes!(jobs::cancel))
        .routes(routes!(jobs::retry))
        .routes(routes!(jobs::artifact))
        // Uploads stream to disk under their own limit (CONVEYOR_DATASET_LIMIT).
        .routes(routes!(datasets::upload).layer(DefaultBodyLimit::disable()))
        .routes(routes!(datasets::list))
        .routes(routes!(datasets::get_one, datasets::delete))
        .routes(routes!(datasets::download))
        .routes(routes!(models::list))
        .routes(routes!(models::get_one, models::delete))
        .routes(routes!(connections::create, connections::list))
        .routes(routes!(connections::delete))
        .routes(routes!(buckets::create, buckets::list))
        .routes(routes!(buckets::delete))
        .routes(routes!(schedules::create, schedules::list))
        .routes(routes!(schedules::get_one, schedules::delete))
        .routes(routes!(schedules::pause))
        .routes(routes!(schedules::resume))
        .routes(routes!(schedules::jobs))
        .routes(routes!(schedules::history))
        .routes(routes!(webhooks::create, webhooks::list))
        .routes(routes!(webhooks::get_one, webhooks::delete))
        .routes(routes!(webhooks::deliveries))
        .routes(routes!(webhooks::replay))
        .routes(routes!(pipelines::submit, pipelines::list))
        .routes(routes!(pipelines::get_one))
        .routes(routes!(pipelines::cancel))
        .routes(routes!(pipelines::retry_step))
        .routes(routes!(tenant::current))
        .routes(routes!(usage::usage))
        .routes(routes!(queues::queues))
        .routes(routes!(queues::history))
        .routes(routes!(queues::workers))
        .routes(routes!(
            session::sign_in,
            session::current,
            session::sign_out
        ))
        .routes(routes!(keys::list, keys::create))
        .routes(routes!(keys::revoke))
        .routes(routes!(audit::list))
        .routes(routes!(patches::preflight))
        .routes(routes!(collections::create, collections::list))
        .routes(routes!(collections::get_one, collections::delete))
        .routes(routes!(collections::search))
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
        // The dashboard's page and files: for browsers, not part of the API's document.
        .route("/", get(dashboard::index))
        .route("/assets/{name}", get(dashboard::assets))
        .fallback(ops::not_found)
}

/// The SSE streams: long-lived responses written to thousands of times a second in all.
pub fn streams() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(events::job_events))
        .routes(routes!(events::tenant_events))
        .routes(routes!(events::pipeline_events))
}
