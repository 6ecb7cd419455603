use axum::{
    extract::DefaultBodyLimit,
    routing::{get, post},
    Router,
};

use crate::AppState;

pub(crate) mod audit;
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

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/jobs", post(jobs::submit).get(jobs::list))
        .route("/v1/jobs/batch", post(jobs::submit_batch))
        .route("/v1/jobs/cancel", post(bulk::cancel))
        .route("/v1/jobs/retry", post(bulk::retry))
        .route("/v1/jobs/{id}", get(jobs::get_one).delete(jobs::delete))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{id}/retry", post(jobs::retry))
        .route("/v1/jobs/{id}/artifacts/{name}", get(jobs::artifact))
        .route(
            "/v1/datasets",
            // Uploads stream to disk under their own limit (CONVEYOR_DATASET_LIMIT).
            post(datasets::upload)
                .layer(DefaultBodyLimit::disable())
                .get(datasets::list),
        )
        .route(
            "/v1/datasets/{id}",
            get(datasets::get_one).delete(datasets::delete),
        )
        .route("/v1/datasets/{id}/download", get(datasets::download))
        .route("/v1/models", get(models::list))
        .route(
            "/v1/models/{id}",
            get(models::get_one).delete(models::delete),
        )
        .route(
            "/v1/connections",
            post(connections::create).get(connections::list),
        )
        .route(
            "/v1/connections/{id}",
            axum::routing::delete(connections::delete),
        )
        .route(
            "/v1/schedules",
            post(schedules::create).get(schedules::list),
        )
        .route(
            "/v1/schedules/{id}",
            get(schedules::get_one).delete(schedules::delete),
        )
        .route("/v1/schedules/{id}/pause", post(schedules::pause))
        .route("/v1/schedules/{id}/resume", post(schedules::resume))
        .route("/v1/schedules/{id}/jobs", get(schedules::history))
        .route("/v1/webhooks", post(webhooks::create).get(webhooks::list))
        .route(
            "/v1/webhooks/{id}",
            get(webhooks::get_one).delete(webhooks::delete),
        )
        .route("/v1/webhooks/{id}/deliveries", get(webhooks::deliveries))
        .route(
            "/v1/webhooks/{id}/deliveries/{delivery_id}/replay",
            post(webhooks::replay),
        )
        .route(
            "/v1/pipelines",
            post(pipelines::submit).get(pipelines::list),
        )
        .route("/v1/pipelines/{id}", get(pipelines::get_one))
        .route("/v1/pipelines/{id}/cancel", post(pipelines::cancel))
        .route(
            "/v1/pipelines/{id}/steps/{name}/retry",
            post(pipelines::retry_step),
        )
        .route("/v1/tenant", get(tenant::current))
        .route("/v1/usage", get(usage::usage))
        .route("/v1/queues", get(queues::queues))
        .route("/v1/workers", get(queues::workers))
        .route(
            "/v1/session",
            post(session::sign_in)
                .get(session::current)
                .delete(session::sign_out),
        )
        .route("/v1/keys", get(keys::list).post(keys::create))
        .route("/v1/keys/{id}", axum::routing::delete(keys::revoke))
        .route("/v1/audit", get(audit::list))
        .route("/", get(dashboard::index))
        .route("/assets/{name}", get(dashboard::assets))
        .route("/v1/patches/preflight", post(patches::preflight))
        .route(
            "/v1/collections",
            post(collections::create).get(collections::list),
        )
        .route(
            "/v1/collections/{id}",
            get(collections::get_one).delete(collections::delete),
        )
        .route("/v1/collections/{id}/search", post(collections::search))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(crate::openapi::serve))
        .fallback(ops::not_found)
}

/// The SSE streams: long-lived responses written to thousands of times a second in all.
pub fn streams() -> Router<AppState> {
    Router::new()
        .route("/v1/jobs/{id}/events", get(events::job_events))
        .route("/v1/events", get(events::tenant_events))
        .route("/v1/pipelines/{id}/events", get(events::pipeline_events))
}
