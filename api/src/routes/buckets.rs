//! Object-store buckets a tenant registers, for collections that follow a prefix of them. The
//! credentials are encrypted at rest and never returned (see [`shared::buckets`]).

use axum::{
    extract::{Path, State},
    http::StatusCode,
    Extension, Json,
};
use serde::Deserialize;
use shared::{
    buckets::{self, Bucket, Credentials, StoreError},
    FieldError, Problem,
};
use tower_http::request_id::RequestId;
use utoipa::ToSchema;

use crate::{
    audit::{Action, Entry},
    auth::{Tenant, Writer},
    extract::JsonBody,
    routes::delete_audited,
    AppState,
};

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewBucket {
    /// Unique per tenant, 1-100 characters.
    pub name: String,
    /// `http(s)://host[:port]` of the S3-compatible service: a public address (or one
    /// `CONVEYOR_CONNECTION_ALLOW` names).
    pub endpoint: String,
    /// The bucket's name at the service.
    pub bucket: String,
    /// Default `us-east-1`.
    pub region: Option<String>,
    pub access_key_id: String,
    /// Stored encrypted; never returned.
    pub secret_access_key: String,
}

#[utoipa::path(post, path = "/v1/buckets", tag = "buckets", request_body = NewBucket,
    responses((status = 201, body = Bucket), (status = 409, body = Problem), (status = 422, body = Problem),
              (status = 503, body = Problem, description = "CONVEYOR_SECRET_KEY is not configured")))]
pub async fn create(
    State(state): State<AppState>,
    writer: Writer,
    request: Option<Extension<RequestId>>,
    JsonBody(body): JsonBody<NewBucket>,
) -> Result<(StatusCode, Json<Bucket>), Problem> {
    let tenant = writer.tenant();
    let region = body.region.unwrap_or_else(|| "us-east-1".into());
    let credentials = Credentials {
        access_key_id: body.access_key_id,
        secret_access_key: body.secret_access_key,
    };
    let mut errors: Vec<FieldError> = Vec::new();
    if body.name.is_empty() || body.name.len() > 100 {
        errors.push(FieldError::new("name", "must be 1-100 characters"));
    }
    let endpoint = buckets::parse_endpoint(&body.endpoint)
        .map_err(|why| errors.push(FieldError::new("endpoint", why)))
        .ok();
    if let Err(why) = buckets::check_bucket_name(&body.bucket) {
        errors.push(FieldError::new("bucket", why));
    }
    if let Err(why) = buckets::check_region(&region) {
        errors.push(FieldError::new("region", why));
    }
    for (field, why) in credentials.check() {
        errors.push(FieldError::new(field, why));
    }
    let Some(endpoint) = endpoint.filter(|_| errors.is_empty()) else {
        return Err(Problem::validation(errors));
    };
    let cipher = state.context.targets.cipher().ok_or_else(|| {
        Problem::unavailable("buckets need CONVEYOR_SECRET_KEY to encrypt credentials")
    })?;
    let invalid = |why: String| Problem::validation(vec![FieldError::new("endpoint", why)]);
    // Each is a client the ingests of the tenant's sources open. Checked before the bucket is
    // listed, and again where it is recorded.
    let most = buckets::MAX_PER_TENANT;
    let mut conn = state.pool.acquire().await?;
    shared::quotas::seen_room_for_one(&mut conn, tenant.0, "buckets", most).await?;
    drop(conn);
    // The check reaches out on the tenant's behalf: as many at once as its preflights.
    let _probing = state
        .context
        .preflights
        .slot(tenant.0)
        .map_err(crate::refusals::problem)?;
    // Checked by listing once: the address rules, then the bucket and credentials.
    let allow = &state.settings.connection_allow;
    let store = buckets::store(&endpoint, &body.bucket, &region, credentials.clone(), allow)
        .await
        .map_err(|e| match e {
            StoreError::Refused(why) => invalid(why),
            StoreError::Other(e) => Problem::internal(e),
        })?;
    if let Err(e) = buckets::probe(store.as_ref()).await {
        // The detail is for the log only: echoed, it would make the route a port scanner. The
        // response's x-request-id names this line.
        let request_id = request
            .as_ref()
            .and_then(|r| r.header_value().to_str().ok());
        let error = shared::telemetry::Untrusted(&e);
        tracing::warn!(tenant = %tenant.0, request_id, %error, "bucket check failed");
        return Err(invalid(
            "could not list the bucket at this endpoint with these credentials".into(),
        ));
    }
    let mut tx = state.pool.begin().await?;
    shared::quotas::room_for_one(&mut tx, tenant.0, "buckets", most).await?;
    let created = buckets::create(
        &mut *tx,
        cipher,
        tenant.0,
        &body.name,
        endpoint.as_str().trim_end_matches('/'),
        &body.bucket,
        &region,
        &credentials,
    )
    .await?
    .ok_or_else(|| Problem::conflict(format!("a bucket named {:?} exists", body.name)))?;
    // No hash of the body: it holds the secret, which a hash would let be guessed offline.
    let entry = Entry::new(Action::BucketCreate).target(created.id).detail(
        serde_json::json!({"name": created.name, "endpoint": created.endpoint, "bucket": created.bucket}),
    );
    writer.audit(&mut *tx, entry).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(created)))
}

#[utoipa::path(get, path = "/v1/buckets", tag = "buckets",
    responses((status = 200, body = Vec<Bucket>)))]
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
) -> Result<Json<Vec<Bucket>>, Problem> {
    Ok(Json(buckets::list(&state.pool, tenant.0).await?))
}

#[utoipa::path(delete, path = "/v1/buckets/{id}", tag = "buckets", params(("id" = Uuid, Path)),
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
        "bucket",
        Action::BucketDelete,
        |db, tenant, id| Box::pin(buckets::delete(db, tenant, id)),
    )
    .await
}
