//! `GET /openapi.json`: every route and schema, generated from the handlers.

use axum::Json;
use utoipa::{
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    Modify, OpenApi,
};

use crate::routes::{collections, events, jobs, ops};

#[derive(OpenApi)]
#[openapi(
    info(title = "Conveyor", description = "Job queue for heavy data and ML work"),
    paths(jobs::submit, jobs::submit_batch, jobs::get_one, jobs::list, jobs::cancel, jobs::retry,
          events::job_events, events::tenant_events, ops::healthz, ops::readyz, ops::metrics,
          collections::create, collections::list, collections::get_one, collections::delete,
          collections::search),
    components(schemas(shared::Job, shared::JobStatus, shared::model::SubmitJob, shared::Problem,
                        shared::FieldError, shared::events::Event, shared::events::EventType,
                        jobs::SubmitBatch, jobs::JobList, ::jobs::canary::CanaryPayload,
                        ::jobs::ingest::IngestPayload, ::jobs::ingest::DocumentSource,
                        ::jobs::ingest::extract::DocFormat, collections::NewCollection,
                        collections::ChunkingSettings, collections::CollectionList,
                        collections::SearchRequest, collections::SearchResults,
                        ::jobs::ingest::store::Collection, ::jobs::ingest::store::Hit,
                        ::jobs::ingest::store::SearchMode)),
    modifiers(&BearerAuth),
    security(("api_key" = []))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
