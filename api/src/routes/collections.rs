//! Collections of embedded documents: create, read, list, delete, and search.

use crate::extract::Params;
use crate::routes::page::{self, Page};
use crate::routes::{delete_audited, parse_id};
use axum::{
    extract::{Path, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use contracts::ingest::collections::{self as store, Collection, Filter, Hit, SearchMode};
use embed::MODEL_NAME;
use serde::{Deserialize, Serialize};
use shared::{FieldError, Problem};
use std::sync::Arc;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    audit::{Action, Entry},
    auth::{Tenant, Writer},
    extract::{HashedJson, JsonBody},
    AppState,
};

/// Largest chunk: the model reads 256 tokens, two of which are its own markers.
pub const MAX_CHUNK_TOKENS: i32 = 254;
pub const MAX_QUERY_CHARS: usize = 2000;
pub const MAX_K: i64 = 100;
/// Searches one tenant may have in flight on one API process.
pub const MAX_SEARCHES_PER_TENANT: usize = 4;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCollection {
    /// Unique among the tenant's collections.
    pub name: String,
    /// The embedding model: `all-MiniLM-L6-v2` (the default and, so far, the only one).
    pub model: Option<String>,
    #[serde(default)]
    pub chunking: ChunkingSettings,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChunkingSettings {
    /// Largest chunk in the model's tokens, 16-254 (default 200).
    #[serde(default = "default_max_tokens")]
    pub max_tokens: i32,
    /// Tokens consecutive chunks share at most, 0 to max_tokens / 2 (default 32).
    #[serde(default = "default_overlap")]
    pub overlap: i32,
}

fn default_max_tokens() -> i32 {
    200
}

fn default_overlap() -> i32 {
    32
}

impl Default for ChunkingSettings {
    fn default() -> Self {
        Self {
            max_tokens: default_max_tokens(),
            overlap: default_overlap(),
        }
    }
}

#[utoipa::path(post, path = "/v1/collections", request_body = NewCollection, tag = "collections",
    responses((status = 201, body = Collection), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn create(
    State(state): State<AppState>,
    writer: Writer,
    HashedJson(body, body_sha256): HashedJson<NewCollection>,
) -> Result<Response, Problem> {
    let tenant = writer.tenant();
    let mut errors = Vec::new();
    if body.name.trim().is_empty() || body.name.len() > 200 {
        errors.push(FieldError::new("name", "must be 1-200 characters"));
    }
    let model = body.model.unwrap_or_else(|| MODEL_NAME.to_owned());
    if model != MODEL_NAME {
        errors.push(FieldError::new(
            "model",
            format!("unknown model {model:?}; available: {MODEL_NAME}"),
        ));
    }
    let ChunkingSettings {
        max_tokens,
        overlap,
    } = body.chunking;
    if !(16..=MAX_CHUNK_TOKENS).contains(&max_tokens) {
        errors.push(FieldError::new(
            "chunking.max_tokens",
            format!("must be between 16 and {MAX_CHUNK_TOKENS}"),
        ));
    }
    if !(0..=max_tokens / 2).contains(&overlap) {
        errors.push(FieldError::new(
            "chunking.overlap",
            "must be between 0 and max_tokens / 2",
        ));
    }
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }
    let mut tx = state.pool.begin().await?;
    let collection =
        store::create_collection(&mut *tx, tenant.0, &body.name, &model, max_tokens, overlap)
            .await?
            .ok_or_else(|| {
                Problem::conflict(format!("a collection named {:?} exists", body.name))
            })?;
    let entry = Entry::new(Action::CollectionCreate)
        .target(collection.id)
        .payload_sha256(body_sha256)
        .detail(serde_json::json!({"name": body.name}));
    writer.audit(&mut *tx, entry).await?;
    tx.commit().await?;
    let location = format!("/v1/collections/{}", collection.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(collection),
    )
        .into_response())
}

#[derive(Serialize, ToSchema)]
pub struct CollectionList {
    pub collections: Vec<Collection>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<Uuid>,
}

#[utoipa::path(get, path = "/v1/collections", tag = "collections", params(Page),
    responses((status = 200, body = CollectionList), (status = 422, body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    Params(page): Params<Page>,
) -> Result<Json<CollectionList>, Problem> {
    let (limit, cursor) = page.checked()?;
    let collections = store::list_collections(&state.pool, tenant.0, cursor, limit).await?;
    let next_cursor = page::next_cursor(&collections, limit, |c| c.id);
    Ok(Json(CollectionList {
        collections,
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/v1/collections/{id}", tag = "collections", params(("id" = Uuid, Path)),
    responses((status = 200, body = Collection), (status = 404, body = Problem)))]
pub async fn get_one(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<Collection>, Problem> {
    store::get_collection(&state.pool, tenant.0, parse_id(&id, "collection")?)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found("collection"))
}

#[utoipa::path(delete, path = "/v1/collections/{id}", tag = "collections", params(("id" = Uuid, Path)),
    responses((status = 204, description = "deleted with its documents and chunks"), (status = 404, body = Problem),
              (status = 409, body = Problem, description = "an ingest holds it; try again later")))]
pub async fn delete(
    State(state): State<AppState>,
    writer: Writer,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    delete_audited(
        &state,
        &writer,
        &id,
        "collection",
        Action::CollectionDelete,
        |db, tenant, id| Box::pin(store::delete_collection(db, tenant, id)),
    )
    .await
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    pub query: String,
    /// Results wanted, 1-100 (default 10).
    #[serde(default = "default_k")]
    pub k: i64,
    #[serde(default)]
    pub mode: SearchMode,
    /// Metadata conditions, all of which must hold: `{"lang": "en"}` (equality) or
    /// `{"tag": {"in": ["a", "b"]}}`.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub filter: Filter,
}

fn default_k() -> i64 {
    10
}

#[derive(Serialize, ToSchema)]
pub struct SearchResults {
    pub results: Vec<Hit>,
}

#[utoipa::path(post, path = "/v1/collections/{id}/search", request_body = SearchRequest,
    tag = "collections", params(("id" = Uuid, Path)),
    responses((status = 200, body = SearchResults), (status = 404, body = Problem),
              (status = 422, body = Problem), (status = 503, body = Problem),
              (status = 429, body = Problem, description = "the tenant has 4 searches in flight on this API process")))]
pub async fn search(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<SearchRequest>,
) -> Result<Json<SearchResults>, Problem> {
    let mut errors = Vec::new();
    if body.query.trim().is_empty() || body.query.chars().count() > MAX_QUERY_CHARS {
        errors.push(FieldError::new(
            "query",
            format!("must be 1-{MAX_QUERY_CHARS} characters"),
        ));
    }
    if !(1..=MAX_K).contains(&body.k) {
        errors.push(FieldError::new(
            "k",
            format!("must be between 1 and {MAX_K}"),
        ));
    }
    if let Err(e) = store::check_filter(&body.filter) {
        errors.push(FieldError::new("filter", e));
    }
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }
    let collection = parse_id(&id, "collection")?;
    // A tenant's searches hold at most a few of this process' embedding permits and database
    // connections: hundreds at once took every core from every tenant.
    // The embedding holds the slot and its core until it ends, even when the client has
    // gone and the handler with it.
    let searching = state
        .counters
        .searches_by_tenant
        .take(tenant.0, MAX_SEARCHES_PER_TENANT)
        .map(Arc::new)
        .ok_or_else(|| {
            Problem::too_many_requests(format!(
                "the tenant has {MAX_SEARCHES_PER_TENANT} searches in flight on this server, \
                 the most it may; wait for one to finish"
            ))
        })?;
    // The one piece of model work the API does: one short query, on a blocking thread, while
    // the collection is looked up (an index probe).
    let embedding = async {
        if body.mode == SearchMode::Keyword {
            return Ok(None);
        }
        let model = state.embedder.get().await.map_err(|e| {
            Problem::unavailable_after("the embedding model is not available on this server", e)
        })?;
        let query = body.query.clone();
        let core = state.embedding.clone().acquire_owned().await;
        let core = core.map_err(Problem::internal)?;
        let held = searching.clone();
        let mut vectors = tokio::task::spawn_blocking(move || {
            let _held = (held, core);
            model.embed(&[&query])
        })
        .await
        .map_err(Problem::internal)??;
        Ok::<_, Problem>(vectors.pop())
    };
    let (exists, vector) = tokio::join!(
        store::collection_exists(&state.pool, tenant.0, collection),
        embedding
    );
    if !exists? {
        return Err(Problem::not_found("collection"));
    }
    let vector = vector?;
    let results = store::search(
        &state.search_pool,
        store::Search {
            tenant: tenant.0,
            collection,
            query: &body.query,
            vector,
            k: body.k,
            mode: body.mode,
            filter: &body.filter,
        },
    )
    .await?;
    Ok(Json(SearchResults { results }))
}
