use axum::{
    routing::{get, post},
    Router,
};

use crate::AppState;

pub(crate) mod collections;
pub(crate) mod events;
pub(crate) mod jobs;
pub(crate) mod ops;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/jobs", post(jobs::submit).get(jobs::list))
        .route("/v1/jobs/batch", post(jobs::submit_batch))
        .route("/v1/jobs/{id}", get(jobs::get_one))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{id}/retry", post(jobs::retry))
        .route("/v1/jobs/{id}/events", get(events::job_events))
        .route("/v1/events", get(events::tenant_events))
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
