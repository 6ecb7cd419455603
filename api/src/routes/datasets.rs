//! Datasets: uploads streamed into the object store (never held in memory), with the schema and
//! a preview read from the file's head.

use crate::extract::Params;
use crate::routes::page::Page;
use crate::routes::parse_id;
use axum::{
    body::Body,
    extract::{Path, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shared::{
    datasets::{self, Compression, Dataset, Format, Inspected, Uninspected},
    object_deletes::{self, Owner},
    FieldError, Problem,
};
use tokio::io::AsyncWriteExt;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    audit::{Action, Entry},
    auth::{Tenant, Writer},
    AppState,
};

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UploadParams {
    /// The file's name; its extension tells the format (`.csv`, `.tsv`, `.ndjson`, `.jsonl`,
    /// `.parquet`, optionally `.gz`/`.zst`). The `X-Filename` header works too.
    name: Option<String>,
    /// Overrides the extension: `csv`, `tsv`, `ndjson` or `parquet`.
    format: Option<String>,
}

#[utoipa::path(post, path = "/v1/datasets", tag = "datasets", params(UploadParams),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the file, as the raw body"),
    responses((status = 201, body = Dataset), (status = 408, body = Problem, description = "the upload sent nothing for CONVEYOR_BODY_IDLE_SECS"),
              (status = 413, body = Problem), (status = 422, body = Problem),
              (status = 429, body = Problem, description = "the tenant has 4 uploads in flight on this API process")))]
pub async fn upload(
    State(state): State<AppState>,
    writer: Writer,
    Params(params): Params<UploadParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let tenant = writer.tenant();
    let name = params
        .name
        .or_else(|| {
            headers
                .get("x-filename")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .ok_or_else(|| invalid("name", "required: pass ?name=file.csv or X-Filename"))?;
    if name.is_empty() || name.len() > 255 || name.contains(['/', '\\']) {
        return Err(invalid("name", "must be a file name of 1-255 characters"));
    }
    let (format, compression) = match params.format.as_deref() {
        Some(format) => {
            let format = Format::parse(format).ok_or_else(|| {
                invalid("format", "must be csv, tsv, ndjson, parquet or document")
            })?;
            let compression = Format::from_file_name(&name).map_or(Compression::None, |f| f.1);
            (format, compression)
        }
        None => Format::from_file_name(&name).ok_or_else(|| {
            invalid(
                "name",
                "cannot tell the format from the extension; name the file .csv, .tsv, .ndjson, \
                 .parquet (tables, optionally .gz or .zst), .txt, .md, .html, .json or .pdf \
                 (documents to ingest), or pass format=",
            )
        })?,
    };

    let uploading = state
        .counters
        .uploads_by_tenant
        .take(tenant.0, MAX_UPLOADS_PER_TENANT)
        .ok_or_else(|| {
            Problem::too_many_requests(format!(
                "the tenant has {MAX_UPLOADS_PER_TENANT} uploads in flight on this server, the \
                 most it may; wait for one to finish"
            ))
        })?;
    let objects = &state.objects;
    // Removed on every way out, a client hanging up mid-upload included.
    let scratch = objects.scratch_file().await.map_err(Problem::internal)?;
    let (size, sha256) = match state.limits.dataset_room(tenant.0).await? {
        Some((room, refusal)) if room < state.settings.dataset_limit => {
            receive(body, &scratch, room).await.map_err(|p| {
                if p.status == 413 {
                    refusal
                } else {
                    p
                }
            })?
        }
        _ => receive(body, &scratch, state.settings.dataset_limit).await?,
    };
    let Inspected { schema, preview } =
        datasets::inspect(&state.isolated, &scratch, format, compression)
            .await
            .map_err(|e| match e {
                Uninspected::Unreadable(reason) => {
                    invalid("body", &format!("not a readable {format:?} file: {reason}"))
                }
                Uninspected::Unavailable => {
                    Problem::unavailable("the upload could not be inspected now; try again")
                }
            })?;
    let dataset = Dataset {
        id: Uuid::now_v7(),
        tenant_id: tenant.0,
        name,
        format,
        compression,
        size_bytes: size as i64,
        sha256,
        schema: sqlx::types::Json(schema),
        preview: sqlx::types::Json(datasets::bounded_preview(preview)),
        created_at: chrono::Utc::now(),
    };
    // In a task of its own, which runs to its end whatever the client does: a client that
    // hung up once its body was read dropped this handler between the object and its row,
    // leaving an object no row counts (a tenant's quota reads the rows), or a bucket's
    // multipart upload half sent, at each try.
    // The upload's slot goes with it: a client that hangs up does not free it early.
    let stored = tokio::spawn(async move {
        let _uploading = uploading;
        store(state, writer, scratch, dataset, size).await
    });
    let dataset = stored.await.map_err(Problem::internal)??;
    let location = format!("/v1/datasets/{}", dataset.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(dataset),
    )
        .into_response())
}

/// Uploads one tenant may have in flight on one API process: each holds a connection, scratch
/// space up to its room and, once received, an inspector process.
const MAX_UPLOADS_PER_TENANT: usize = 4;

/// Streams the body into `path`; returns its size and sha256. Past `limit` bytes: 413.
/// Stores the upload as the dataset's object and records it in its tenant's quota and audit
/// log, or removes the object again.
async fn store(
    state: AppState,
    writer: Writer,
    scratch: shared::objects::ScratchFile,
    dataset: Dataset,
    size: u64,
) -> Result<Dataset, Problem> {
    let (objects, tenant) = (&state.objects, dataset.tenant_id);
    // Marked before it is stored: a process stopped before the record below leaves the file to
    // the object-deletes duty, not to no one.
    object_deletes::hold(&state.pool, tenant, Owner::Dataset, dataset.id).await?;
    objects
        .put_dataset(&scratch, tenant, dataset.id)
        .await
        .map_err(Problem::internal)?;
    let recorded = async {
        let mut tx = state.pool.begin().await?;
        state
            .limits
            .hold_dataset_room(&mut tx, tenant, size)
            .await?;
        datasets::insert(&mut *tx, &dataset).await?;
        object_deletes::unmark(&mut tx, Owner::Dataset, dataset.id).await?;
        let entry = Entry::new(Action::DatasetUpload)
            .target(dataset.id)
            .payload_sha256(&dataset.sha256)
            .detail(serde_json::json!({"name": dataset.name, "size_bytes": dataset.size_bytes}));
        writer.audit(&mut *tx, entry).await?;
        Ok::<_, Problem>(tx.commit().await?)
    };
    if let Err(problem) = recorded.await {
        object_deletes::discard(&state.pool, objects, tenant, Owner::Dataset, dataset.id).await;
        return Err(problem);
    }
    Ok(dataset)
}

async fn receive(body: Body, path: &std::path::Path, limit: u64) -> Result<(u64, String), Problem> {
    let file = tokio::fs::File::create(path)
        .await
        .map_err(Problem::internal)?;
    let mut file = tokio::io::BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut stream = body.into_data_stream();
    // A client trickling nothing is cut off by the body timeout (`CONVEYOR_BODY_IDLE_SECS`).
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            if crate::extract::sent_nothing(&e) {
                crate::extract::body_idle()
            } else {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "bad-body",
                    format!("upload interrupted: {e}"),
                )
            }
        })?;
        size += chunk.len() as u64;
        if size > limit {
            return Err(Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                format!(
                    "the file exceeds the dataset limit of {limit} bytes (CONVEYOR_DATASET_LIMIT)"
                ),
            ));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(Problem::internal)?;
    }
    if size == 0 {
        return Err(invalid("body", "the file is empty"));
    }
    file.flush().await.map_err(Problem::internal)?;
    file.get_ref().sync_all().await.map_err(Problem::internal)?;
    Ok((size, hex::encode(hasher.finalize())))
}

fn invalid(field: &str, message: &str) -> Problem {
    Problem::validation(vec![FieldError::new(field, message)])
}

#[derive(Serialize, ToSchema)]
pub struct DatasetList {
    pub datasets: Vec<datasets::DatasetSummary>,
    pub next_cursor: Option<Uuid>,
}

#[utoipa::path(get, path = "/v1/datasets", tag = "datasets", params(Page),
    responses((status = 200, body = DatasetList), (status = 422, body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    Params(page): Params<Page>,
) -> Result<Json<DatasetList>, Problem> {
    let (limit, cursor) = page.checked()?;
    let budget = state.settings.page_max_bytes;
    let page = datasets::list(&state.pool, tenant.0, cursor, limit, budget).await?;
    Ok(Json(DatasetList {
        next_cursor: page.next_cursor(limit, |d| d.id),
        datasets: page.items,
    }))
}

async fn find(state: &AppState, tenant: Tenant, id: &str) -> Result<Dataset, Problem> {
    let id = parse_id(id, "dataset")?;
    datasets::get(&state.pool, tenant.0, id)
        .await?
        .ok_or_else(|| Problem::not_found("dataset"))
}

#[utoipa::path(get, path = "/v1/datasets/{id}", tag = "datasets", params(("id" = Uuid, Path)),
    responses((status = 200, body = Dataset), (status = 404, body = Problem)))]
pub async fn get_one(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<Dataset>, Problem> {
    find(&state, tenant, &id).await.map(Json)
}

#[utoipa::path(get, path = "/v1/datasets/{id}/download", tag = "datasets", params(("id" = Uuid, Path)),
    responses((status = 200, content_type = "application/octet-stream", description = "the file as uploaded"),
              (status = 404, body = Problem)))]
pub async fn download(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let dataset = find(&state, tenant, &id).await?;
    let stored = state
        .objects
        .read_dataset(tenant.0, dataset.id)
        .await
        .map_err(Problem::internal)?;
    crate::files::serve(stored, &dataset.name)
}

#[utoipa::path(delete, path = "/v1/datasets/{id}", tag = "datasets", params(("id" = Uuid, Path)),
    responses((status = 204, description = "deleted"), (status = 404, body = Problem),
              (status = 409, body = Problem, description = "a live job uses the dataset")))]
pub async fn delete(
    State(state): State<AppState>,
    writer: Writer,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    let tenant = writer.tenant();
    let dataset = find(&state, tenant, &id).await?;
    if let Some(conflict) = datasets::in_use(&state.pool, tenant.0, dataset.id, "dataset").await? {
        return Err(conflict);
    }
    let mut tx = state.pool.begin().await?;
    if datasets::delete(&mut *tx, tenant.0, dataset.id).await? {
        object_deletes::mark(&mut tx, tenant.0, Owner::Dataset, dataset.id).await?;
        let entry = Entry::new(Action::DatasetDelete)
            .target(dataset.id)
            .detail(serde_json::json!({"name": dataset.name}));
        writer.audit(&mut *tx, entry).await?;
    }
    tx.commit().await?;
    // To its end whatever the client does (see `upload`): the row is gone, so is the quota.
    let (pool, objects) = (state.pool.clone(), state.objects.clone());
    let _ = tokio::spawn(async move {
        object_deletes::delete_marked(&pool, &objects, Owner::Dataset, dataset.id).await
    })
    .await;
    Ok(StatusCode::NO_CONTENT)
}
