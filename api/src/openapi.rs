//! `GET /openapi.json`: every route and schema, generated from the handlers.

use axum::Json;
use utoipa::{
    openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme},
    Modify, OpenApi,
};

use crate::routes::{
    audit, bulk, collections, connections, datasets, events, jobs, keys, models, ops, patches,
    pipelines, queues, schedules, session, tenant, usage, webhooks,
};

#[derive(OpenApi)]
#[openapi(
    info(title = "Conveyor", description = "Job queue for heavy data and ML work"),
    paths(jobs::submit, jobs::submit_batch, jobs::get_one, jobs::list, jobs::cancel, jobs::retry, jobs::delete,
          jobs::artifact, events::job_events, events::tenant_events,
          datasets::upload, datasets::list, datasets::get_one, datasets::download, datasets::delete,
          models::list, models::get_one, models::delete,
          connections::create, connections::list, connections::delete, patches::preflight,
          collections::create, collections::list, collections::get_one, collections::delete,
          collections::search,
          ops::healthz, ops::readyz, ops::metrics,
          queues::queues, queues::workers, session::sign_in, session::current, session::sign_out,
          keys::list, keys::create, keys::revoke, audit::list, tenant::current,
          usage::usage, bulk::cancel, bulk::retry, schedules::create, schedules::list,
          schedules::get_one, schedules::pause, schedules::resume, schedules::delete,
          schedules::history, webhooks::create, webhooks::list, webhooks::get_one,
          webhooks::delete, webhooks::deliveries, webhooks::replay, pipelines::submit,
          pipelines::list, pipelines::get_one, pipelines::cancel, pipelines::retry_step,
          events::pipeline_events),
    components(schemas(shared::Job, shared::JobStatus, shared::model::SubmitJob, shared::Problem,
                        shared::FieldError, shared::events::Event, shared::events::EventType,
                        jobs::SubmitBatch, jobs::JobList, datasets::DatasetList,
                        shared::datasets::Dataset, shared::datasets::Column,
                        shared::datasets::Format, shared::datasets::Compression,
                        shared::connections::Connection, connections::NewConnection,
                        ::contracts::canary::CanaryPayload, ::contracts::import::ImportPayload,
                        ::contracts::patch::PatchPayload, ::contracts::patch::Mode,
                        ::contracts::patch::RollbackPayload, ::contracts::patch::Assessment,
                        ::contracts::patch::Risk, ::contracts::synthesis::SynthesisPayload,
                        ::contracts::sample::SamplePayload, ::contracts::sample::Conditions,
                        ::contracts::sample::ConditionGroup, models::ModelList,
                        shared::saved_models::SavedModel, shared::saved_models::ModelColumn,
                        ::contracts::ingest::IngestPayload, ::contracts::ingest::DocumentSource,
                        ::contracts::ingest::DocFormat, collections::NewCollection,
                        collections::ChunkingSettings, collections::CollectionList,
                        collections::SearchRequest, collections::SearchResults,
                        ::contracts::ingest::collections::Collection, ::contracts::ingest::collections::Hit,
                        ::contracts::ingest::collections::SearchMode,
                        queues::QueueList, queues::QueueStats, queues::WorkerList, queues::WorkerInfo,
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
                        shared::pipelines::OnFailure)),
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

pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
