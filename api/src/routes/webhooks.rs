//! Webhooks: endpoints of a tenant told of its jobs' outcomes, signed per the Standard
//! Webhooks spec. Create (the secret is shown once), list, read, delete; each endpoint's
//! deliveries (attempts, status codes, latency) and the replay of one.

use crate::extract::Params;
use crate::routes::{delete_audited, parse_id};
use axum::{
    extract::{Path, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::{Deserialize, Serialize};
use shared::{
    webhooks::{self, CreatedWebhook, Delivery, Replay, Webhook},
    FieldError, Problem,
};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    audit::{Action, Entry},
    auth::{Caller, Tenant, Writer},
    extract::HashedJson,
    keys::Role,
    routes::page::Page,
    AppState,
};

/// `POST /v1/webhooks` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWebhook {
    /// `https://` (or `http://`) URL to POST each event to: a public address, or one
    /// `CONVEYOR_WEBHOOK_ALLOW` names (checked now and at every delivery). No credentials,
    /// no fragment; redirects are not followed.
    pub url: String,
    /// Any of `job.succeeded`, `job.failed`, `job.cancelled`, `pipeline.finished`.
    pub events: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct WebhookList {
    pub webhooks: Vec<Webhook>,
}

#[derive(Serialize, ToSchema)]
pub struct DeliveryList {
    pub deliveries: Vec<Delivery>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<Uuid>,
}

fn invalid(field: &str, message: impl Into<String>) -> Problem {
    Problem::validation(vec![FieldError::new(field, message)])
}

fn not_found() -> Problem {
    Problem::not_found("webhook")
}

#[utoipa::path(post, path = "/v1/webhooks", request_body = NewWebhook, tag = "webhooks",
    responses((status = 201, body = CreatedWebhook, description = "created; `secret` is shown this once"),
              (status = 409, body = Problem, description = "the tenant already has the most webhooks it may have (20)"),
              (status = 422, body = Problem, description = "a bad `url` (or one that reaches a refused address) or `events`"),
              (status = 503, body = Problem, description = "CONVEYOR_SECRET_KEY is not configured")))]
pub async fn create(
    State(state): State<AppState>,
    writer: Writer,
    HashedJson(body, body_sha256): HashedJson<NewWebhook>,
) -> Result<Response, Problem> {
    let tenant = writer.tenant();
    let mut errors = Vec::new();
    let url = webhooks::parse_url(&body.url)
        .map_err(|why| errors.push(FieldError::new("url", why)))
        .ok();
    let events = webhooks::parse_events(&body.events)
        .map_err(|why| errors.push(FieldError::new("events", why)))
        .ok();
    let (Some(url), Some(events), true) = (url, events, errors.is_empty()) else {
        return Err(Problem::validation(errors));
    };
    // The check resolves the host on the tenant's behalf: as many at once as its preflights.
    let probing = state
        .context
        .preflights
        .slot(tenant.0)
        .map_err(crate::refusals::problem)?;
    webhooks::check_url(&url, &state.settings.webhook_allow)
        .await
        .map_err(|why| invalid("url", why))?;
    drop(probing);
    let cipher = state.context.targets.cipher().ok_or_else(|| {
        Problem::unavailable("webhooks need CONVEYOR_SECRET_KEY to encrypt their secrets")
    })?;
    let mut tx = state.pool.begin().await?;
    // Every webhook of a finished job is a delivery the workers' shared slots send: a tenant
    // with hundreds would take those slots from everyone else.
    shared::quotas::room_for_one(&mut tx, tenant.0, "webhooks", webhooks::MAX_PER_TENANT).await?;
    let created = webhooks::create(
        &mut *tx,
        cipher,
        tenant.0,
        writer.0.key.id,
        url.as_str(),
        &events,
    )
    .await?;
    let entry = Entry::new(Action::WebhookCreate)
        .target(created.webhook.id)
        .payload_sha256(body_sha256)
        .detail(serde_json::json!({"url": webhooks::without_query(&url), "events": events}));
    writer.audit(&mut *tx, entry).await?;
    tx.commit().await?;
    let location = format!("/v1/webhooks/{}", created.webhook.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(created),
    )
        .into_response())
}

#[utoipa::path(get, path = "/v1/webhooks", tag = "webhooks",
    responses((status = 200, body = WebhookList, description = "the tenant's endpoints, oldest first (never their secrets)")))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<WebhookList>, Problem> {
    let webhooks = webhooks::list(&state.pool, caller.key.tenant).await?;
    let webhooks = webhooks.into_iter().map(|w| shown_to(&caller, w)).collect();
    Ok(Json(WebhookList { webhooks }))
}

/// An endpoint as `caller` may see it: a read key is shown where it points (scheme, host and
/// port), not its path or query, where receivers keep their tokens (`/services/T…/B…/<token>`,
/// `?token=`).
fn shown_to(caller: &Caller, mut webhook: Webhook) -> Webhook {
    if caller.key.role < Role::Write {
        webhook.url = match webhooks::parse_url(&webhook.url) {
            Ok(url) => format!("{}/…", url.origin().ascii_serialization()),
            Err(_) => "(hidden)".into(),
        };
    }
    webhook
}

#[utoipa::path(get, path = "/v1/webhooks/{id}", tag = "webhooks", params(("id" = Uuid, Path)),
    responses((status = 200, body = Webhook), (status = 404, body = Problem)))]
pub async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Webhook>, Problem> {
    let id = parse_id(&id, "webhook")?;
    webhooks::get(&state.pool, caller.key.tenant, id)
        .await?
        .map(|webhook| Json(shown_to(&caller, webhook)))
        .ok_or_else(not_found)
}

#[utoipa::path(delete, path = "/v1/webhooks/{id}", tag = "webhooks", params(("id" = Uuid, Path)),
    responses((status = 204, description = "deleted, with its deliveries (pending ones are not sent)"),
              (status = 404, body = Problem)))]
pub async fn delete(
    State(state): State<AppState>,
    writer: Writer,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    delete_audited(
        &state,
        &writer,
        &id,
        "webhook",
        Action::WebhookDelete,
        |db, tenant, id| Box::pin(webhooks::delete(db, tenant, id)),
    )
    .await
}

#[utoipa::path(get, path = "/v1/webhooks/{id}/deliveries", tag = "webhooks",
    params(("id" = Uuid, Path), Page),
    responses((status = 200, body = DeliveryList, description = "the endpoint's deliveries, newest first"),
              (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn deliveries(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    Params(params): Params<Page>,
) -> Result<Json<DeliveryList>, Problem> {
    let id = parse_id(&id, "webhook")?;
    let (limit, cursor) = params.checked()?;
    webhooks::get(&state.pool, tenant.0, id)
        .await?
        .ok_or_else(not_found)?;
    let budget = state.settings.page_max_bytes;
    let page = webhooks::deliveries(&state.pool, tenant.0, id, cursor, limit, budget).await?;
    Ok(Json(DeliveryList {
        next_cursor: page.next_cursor(limit, |d| d.id),
        deliveries: page.items,
    }))
}

#[utoipa::path(post, path = "/v1/webhooks/{id}/deliveries/{delivery_id}/replay", tag = "webhooks",
    params(("id" = Uuid, Path), ("delivery_id" = Uuid, Path)),
    responses((status = 202, body = Delivery, description = "queued: sent again (same `webhook-id` and body, a new signature), with a fresh retry window"),
              (status = 404, body = Problem),
              (status = 409, body = Problem, description = "the delivery is still pending"),
              (status = 429, body = Problem, description = "the tenant's or the key's rate is spent")))]
pub async fn replay(
    State(state): State<AppState>,
    writer: Writer,
    Path((id, delivery_id)): Path<(String, String)>,
) -> Result<Response, Problem> {
    let id = parse_id(&id, "webhook")?;
    let delivery_id = parse_id(&delivery_id, "delivery")?;
    // A replay sends a request on the tenant's behalf as a job does: it draws on the same rate.
    let rate = match state
        .limits
        .admit(writer.tenant().0, writer.0.key.id, 1)
        .await
    {
        Ok(rate) => rate,
        Err(refused) => return Ok(refused),
    };
    let mut tx = state.pool.begin().await?;
    let delivery = match webhooks::replay(&mut tx, writer.tenant().0, id, delivery_id).await? {
        Replay::Queued(delivery) => delivery,
        Replay::NotFound => return Err(Problem::not_found("delivery")),
        Replay::Pending => {
            return Err(Problem::conflict(
                "the delivery is still pending: it is being sent",
            ))
        }
    };
    let entry = Entry::new(Action::WebhookReplay)
        .target(delivery_id)
        .detail(serde_json::json!({"webhook_id": id, "event": delivery.event}));
    writer.audit(&mut *tx, entry).await?;
    tx.commit().await?;
    Ok((StatusCode::ACCEPTED, rate, Json(*delivery)).into_response())
}
