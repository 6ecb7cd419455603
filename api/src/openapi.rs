//! `GET /openapi.json`: the API's description and the schemas no route names; the paths come
//! from the routes themselves (`routes::router`).

use axum::{
    body::Bytes,
    http::header,
    routing::{get, MethodRouter},
};
use utoipa::{
    openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme},
    Modify, OpenApi,
};

use crate::routes::{
    audit, buckets, bulk, collections, connections, datasets, jobs, keys, pipelines, queues,
    schedules, session, tenant, usage, webhooks,
};

#[derive(OpenApi)]
#[openapi(
    info(title = "Conveyor", description = "Job queue for heavy data and ML work"),
    components(schemas(shared::Job, shared::JobStatus, shared::model::SubmitJob, shared::Problem,
                        shared::FieldError, shared::events::Event, shared::events::EventType,
                        jobs::SubmitBatch, jobs::JobList, datasets::DatasetList,
                        shared::datasets::Dataset, shared::datasets::DatasetSummary, shared::datasets::Column,
                        shared::datasets::Format, shared::datasets::Compression,
                        shared::connections::Connection, connections::NewConnection,
                        shared::buckets::Bucket, buckets::NewBucket,
                        ::contracts::canary::CanaryPayload, ::contracts::import::ImportPayload,
                        ::contracts::canary::CanaryOutput, ::contracts::import::ImportOutput,
                        ::contracts::patch::PatchOutput, ::contracts::patch::RollbackOutput,
                        ::contracts::ingest::IngestOutput, ::contracts::Artifact,
                        ::contracts::synthesis::SynthesisOutput, ::contracts::sample::SampleOutput,
                        ::contracts::patch::PatchPayload, ::contracts::patch::Mode,
                        ::contracts::patch::RollbackPayload, ::contracts::patch::Assessment,
                        ::contracts::patch::Risk, ::contracts::synthesis::SynthesisPayload,
                        ::contracts::sample::SamplePayload, ::contracts::sample::Conditions,
                        ::contracts::sample::ConditionGroup, crate::routes::models::ModelList,
                        shared::saved_models::SavedModel, shared::saved_models::ModelColumn,
                        ::contracts::ingest::IngestPayload, ::contracts::ingest::DocumentSource,
                        ::contracts::ingest::DocFormat, collections::NewCollection,
                        collections::ChunkingSettings, collections::CollectionList,
                        collections::SearchRequest, collections::SearchResults,
                        ::contracts::ingest::collections::Collection, ::contracts::ingest::collections::Hit,
                        ::contracts::ingest::collections::SearchMode,
                        queues::QueueList, queues::QueueStats, queues::WorkerList, queues::WorkerInfo,
                        queues::QueueHistoryList, queues::QueueHistory, queues::QueueMinute,
                        session::SignIn, session::SessionInfo, keys::NewKey, keys::KeyList,
                        crate::keys::ApiKey, crate::keys::CreatedKey, crate::keys::Role,
                        audit::AuditPage, crate::audit::AuditEntry,
                        tenant::TenantView, crate::limits::TenantLimits, crate::limits::Rate,
                        crate::limits::TenantUsage, usage::UsageReport, usage::UsageGroup,
                        shared::usage::Usage, bulk::BulkFilter, bulk::BulkResult,
                        schedules::CreateSchedule, schedules::ScheduleList,
                        shared::schedules::Schedule, shared::schedules::ScheduledJob,
                        shared::schedules::Overlap, shared::schedules::Misfire,
                        webhooks::NewWebhook, webhooks::WebhookList, webhooks::DeliveryList,
                        shared::webhooks::Webhook, shared::webhooks::CreatedWebhook,
                        shared::webhooks::Delivery, pipelines::SubmitPipeline,
                        pipelines::SubmitStep, pipelines::PipelineList,
                        shared::pipelines::Pipeline, shared::pipelines::Step,
                        shared::pipelines::OnFailure, shared::pipelines::NewPipeline,
                        shared::pipelines::NewStep, schedules::FiringList,
                        shared::schedules::FiringRecord)),
    modifiers(&BearerAuth),
    security(("api_key" = []), ("session" = []))
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
        // The dashboard's cookie from `POST /v1/session`; requests that change something also
        // need the `X-Conveyor-CSRF` header.
        components.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(
                crate::auth::SESSION_COOKIE,
            ))),
        );
    }
}

/// `GET /openapi.json`: the document, serialized once.
pub fn serve<S: Clone + Send + Sync + 'static>(
    document: &utoipa::openapi::OpenApi,
) -> MethodRouter<S> {
    let json = Bytes::from(serde_json::to_vec(document).expect("the OpenAPI document serializes"));
    get(move || async move { ([(header::CONTENT_TYPE, "application/json")], json) })
}
