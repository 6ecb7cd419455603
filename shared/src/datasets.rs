//! Datasets: files a tenant uploaded, with the schema and preview read from their head.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::owned::Owned;

const DATASETS: Owned = Owned::new("datasets", "*");
const UNPREVIEWED: Owned = Owned::new(
    "datasets",
    "id, tenant_id, name, format, compression, size_bytes, sha256, schema,
     '[]'::jsonb AS preview, created_at",
);
/// What a list shows of each: no schema or preview (up to megabytes each; one dataset's read
/// has them), the number of columns instead.
const SUMMARIES: Owned = Owned::new(
    "datasets",
    "id, tenant_id, name, format, compression, size_bytes, sha256, created_at,
     jsonb_array_length(schema) AS columns",
);

/// Most bytes of a dataset's stored preview (its first rows as JSON): rows past it are left
/// out, so that a wide file's head does not weigh on every read of the dataset.
pub const MAX_PREVIEW_BYTES: usize = 64 << 10;

/// The longest head of `rows` whose JSON fits [`MAX_PREVIEW_BYTES`].
pub fn bounded_preview(rows: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    let mut used = 2; // the brackets
    let mut kept = Vec::new();
    for row in rows {
        used += row.to_string().len() + 1;
        if used > MAX_PREVIEW_BYTES {
            break;
        }
        kept.push(row);
    }
    kept
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::Type)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum Format {
    Csv,
    Tsv,
    Ndjson,
    Parquet,
    /// A document for ingestion (text, Markdown, HTML, JSON, PDF), stored as uploaded with no
    /// schema: `ingest` reads it, imports and syntheses refuse it.
    Document,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::Type)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Format {
    /// Format and compression from a file name such as `orders.csv.gz`.
    pub fn from_file_name(name: &str) -> Option<(Format, Compression)> {
        let lower = name.to_ascii_lowercase();
        let (stem, compression) = if let Some(stem) = lower.strip_suffix(".gz") {
            (stem, Compression::Gzip)
        } else if let Some(stem) = lower.strip_suffix(".zst") {
            (stem, Compression::Zstd)
        } else {
            (lower.as_str(), Compression::None)
        };
        let format = match stem.rsplit_once('.')?.1 {
            "csv" => Format::Csv,
            "tsv" | "tab" => Format::Tsv,
            "ndjson" | "jsonl" => Format::Ndjson,
            "parquet" if compression == Compression::None => Format::Parquet,
            "txt" | "text" | "md" | "markdown" | "html" | "htm" | "json" | "pdf" => {
                Format::Document
            }
            _ => return None,
        };
        Some((format, compression))
    }

    pub fn parse(name: &str) -> Option<Format> {
        Some(match name {
            "csv" => Format::Csv,
            "tsv" => Format::Tsv,
            "ndjson" | "jsonl" => Format::Ndjson,
            "parquet" => Format::Parquet,
            "document" => Format::Document,
            _ => return None,
        })
    }

    /// Rows and columns (what imports and syntheses read), as opposed to a document.
    pub fn is_table(self) -> bool {
        self != Format::Document
    }
}

/// One column as inferred from the file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Column {
    pub name: String,
    /// A PostgreSQL type: `bigint`, `double precision`, `boolean`, `date`, `timestamptz`, `text`...
    #[serde(rename = "type")]
    pub data_type: String,
    pub nullable: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Dataset {
    pub id: Uuid,
    #[serde(skip)]
    pub tenant_id: Uuid,
    pub name: String,
    pub format: Format,
    pub compression: Compression,
    pub size_bytes: i64,
    pub sha256: String,
    #[schema(value_type = Vec<Column>)]
    pub schema: sqlx::types::Json<Vec<Column>>,
    #[schema(value_type = Vec<Object>)]
    pub preview: sqlx::types::Json<Vec<serde_json::Value>>,
    pub created_at: DateTime<Utc>,
}

/// A dataset as a list shows it.
#[derive(Clone, Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct DatasetSummary {
    pub id: Uuid,
    #[serde(skip)]
    pub tenant_id: Uuid,
    pub name: String,
    pub format: Format,
    pub compression: Compression,
    pub size_bytes: i64,
    pub sha256: String,
    /// How many columns its schema has (`GET /v1/datasets/{id}` shows them).
    pub columns: i32,
    pub created_at: DateTime<Utc>,
}

/// Records a job's output dataset, counted against the tenant's `max_dataset_bytes` as an
/// upload is, under the quota's lock. A retried attempt's output (the same id) replaces the
/// row its earlier attempt recorded: the file was replaced, and the row kept describing the
/// first one (its size, what the quota counts, its hash, schema and preview). Past the quota
/// the earlier row goes too, as its file does.
pub async fn record_output(
    pool: &PgPool,
    dataset: &Dataset,
) -> sqlx::Result<Result<(), crate::quotas::OverQuota>> {
    let tenant = dataset.tenant_id;
    let mut tx = pool.begin().await?;
    let limit = crate::quotas::Quotas::of(&mut tx, tenant)
        .await?
        .max_dataset_bytes;
    DATASETS.delete(&mut *tx, tenant, dataset.id).await?;
    let size = dataset.size_bytes as u64;
    let room = crate::quotas::hold_dataset_room(&mut tx, tenant, limit, size).await?;
    if room.is_ok() {
        insert(&mut *tx, dataset).await?;
        // A retried job's output, stored again under the id an earlier refusal marked.
        crate::object_deletes::unmark(&mut tx, crate::object_deletes::Owner::Dataset, dataset.id)
            .await?;
    }
    tx.commit().await?;
    Ok(room)
}

pub async fn insert(pool: impl sqlx::PgExecutor<'_>, dataset: &Dataset) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO datasets (id, tenant_id, name, format, compression, size_bytes, sha256,
                               schema, preview)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(dataset.id)
    .bind(dataset.tenant_id)
    .bind(&dataset.name)
    .bind(dataset.format)
    .bind(dataset.compression)
    .bind(dataset.size_bytes)
    .bind(&dataset.sha256)
    .bind(crate::store::storable_json(&dataset.schema.0))
    // Bounded here, whoever inspected it: a job's output was inspected without the upload's
    // bound, and 20 rows of megabyte values weighed on every read of the dataset.
    .bind(crate::store::storable_json(&bounded_preview(
        dataset.preview.0.clone(),
    )))
    .execute(pool)
    .await?;
    Ok(())
}

/// The tenant's dataset; another tenant's id reads as missing.
pub async fn get(pool: &PgPool, tenant: Uuid, id: Uuid) -> sqlx::Result<Option<Dataset>> {
    DATASETS.get(pool, tenant, id).await
}

/// The dataset as a submission's checks read it: without its preview (up to 64 KiB, read by
/// no check), which a batch naming one dataset a thousand times read a thousand times.
pub async fn get_unpreviewed(
    pool: &PgPool,
    tenant: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<Dataset>> {
    UNPREVIEWED.get(pool, tenant, id).await
}

/// The names of the tenant's datasets among `ids`, each read once however often it is named.
pub async fn names(
    pool: &PgPool,
    tenant: Uuid,
    ids: &[Uuid],
) -> sqlx::Result<std::collections::HashMap<Uuid, String>> {
    let rows: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, name FROM datasets WHERE tenant_id = $1 AND id = ANY($2)")
            .bind(tenant)
            .bind(ids)
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().collect())
}

/// Newest first, `limit` after `cursor`.
pub async fn list(
    pool: &PgPool,
    tenant: Uuid,
    cursor: Option<Uuid>,
    limit: i64,
    budget: usize,
) -> sqlx::Result<crate::pages::Page<DatasetSummary>> {
    SUMMARIES.page(pool, tenant, cursor, limit, budget).await
}

/// The most live jobs a refusal to delete names.
const USERS_NAMED: usize = 10;

/// Whether live jobs of the tenant, waiting steps of its running pipelines, or its schedules
/// (a job's or a step's payload; paused ones too, which may be resumed) name `id` (a dataset
/// or a model, `what`) in their payload: the conflict to answer a delete with, naming the
/// first ten (a step by its pipeline). The search stops at the eleventh: a tenant's thousands
/// of such jobs were all read and named, in an answer of megabytes, at every try. A waiting
/// step was accepted with the dataset checked, and failed later for its loss; a schedule's
/// every later firing did.
///
/// Read where a payload can name one (an import's or a synthesis's `dataset_id`, an ingest's
/// `documents[].dataset_id`, a sample's `model_id`), from the live jobs of those kinds only,
/// through the indexes of queued and running jobs by kind and tenant: every live job of the
/// tenant, of any kind, was read and its payload printed as text to be searched, at each
/// delete, which found nothing and so read them all.
pub async fn in_use(
    pool: &PgPool,
    tenant: Uuid,
    id: Uuid,
    what: &str,
) -> sqlx::Result<Option<crate::Problem>> {
    let named = serde_json::Value::String(id.to_string());
    // The kinds that can name one, and what a payload naming `id` contains (`@>`).
    let (kinds, shapes): (&[&str], Vec<serde_json::Value>) = match what {
        "dataset" => (
            &["import", "ingest", "synthesis"],
            vec![
                serde_json::json!({ "dataset_id": named }),
                serde_json::json!({ "documents": [{ "dataset_id": named }] }),
            ],
        ),
        "model" => (&["sample"], vec![serde_json::json!({ "model_id": named })]),
        other => unreachable!("no job kind names a {other}"),
    };
    let users: Vec<Uuid> = sqlx::query_scalar(concat!(
        "(SELECT id FROM jobs WHERE kind = ANY($2) AND tenant_id = $1 AND ",
        crate::live_jobs!("jobs"),
        " AND payload @> ANY($3) LIMIT $4)
         UNION ALL
         (SELECT DISTINCT p.id FROM pipelines p JOIN pipeline_steps s ON s.pipeline_id = p.id
          WHERE p.tenant_id = $1 AND p.status = 'running' AND s.state = 'waiting'
            AND s.kind = ANY($2) AND s.payload @> ANY($3) LIMIT $4)
         UNION ALL
         (SELECT s.id FROM schedules s
          WHERE s.tenant_id = $1
            AND ((s.job ->> 'kind' = ANY($2) AND s.job -> 'payload' @> ANY($3))
                 OR EXISTS (SELECT 1 FROM jsonb_array_elements(s.pipeline -> 'steps') AS step
                            WHERE step ->> 'kind' = ANY($2) AND step -> 'payload' @> ANY($3)))
          LIMIT $4)
         LIMIT $4"
    ))
    .bind(tenant)
    .bind(kinds)
    .bind(&shapes)
    .bind(USERS_NAMED as i64 + 1)
    .fetch_all(pool)
    .await?;
    if users.is_empty() {
        return Ok(None);
    }
    let named: Vec<String> = users
        .iter()
        .take(USERS_NAMED)
        .map(Uuid::to_string)
        .collect();
    let more = if users.len() > USERS_NAMED {
        ", and more"
    } else {
        ""
    };
    Ok(Some(crate::Problem::conflict(format!(
        "live jobs, pipelines or schedules use this {what}: {}{more}",
        named.join(", ")
    ))))
}

pub async fn delete(pool: impl sqlx::PgExecutor<'_>, tenant: Uuid, id: Uuid) -> sqlx::Result<bool> {
    DATASETS.delete(pool, tenant, id).await
}

/// What inspection reads from a file's head: its columns and first rows.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Inspected {
    pub schema: Vec<Column>,
    pub preview: Vec<serde_json::Value>,
}

/// The worker's subcommand that inspects one file.
pub const INSPECT_SUBCOMMAND: &str = "inspect";
/// The most an inspection may answer (20 preview rows of wide text are far below it).
const INSPECTED_BYTES: u64 = 16 << 20;

/// Inspects the file at `path` in an isolated child (`conveyor-worker inspect`): the parser
/// (polars) never reads a tenant's file inside the API process, and the API does not link it.
pub async fn inspect(
    isolated: &crate::isolated::Isolated,
    path: &std::path::Path,
    format: Format,
    compression: Compression,
) -> Result<Inspected, Uninspected> {
    use crate::isolated::Failure;
    if format == Format::Document {
        return Ok(Inspected::default());
    }
    let (format, compression) = (json_name(format), json_name(compression));
    let path = path.to_str().ok_or(Uninspected::Unavailable)?;
    let args = [
        INSPECT_SUBCOMMAND,
        "--format",
        &format,
        "--compression",
        &compression,
        path,
    ];
    let answer = isolated
        .run(&args, Vec::new(), INSPECTED_BYTES)
        .await
        .map_err(|failure| match failure {
            Failure::Refused(reason) => Uninspected::Unreadable(reason),
            Failure::TimedOut | Failure::OutOfCpu => {
                Uninspected::Unreadable("it took too long to read".into())
            }
            Failure::Died => {
                Uninspected::Unreadable("the reader died on it (out of memory or stack)".into())
            }
            Failure::TooLarge => {
                Uninspected::Unreadable("its first rows are too large to preview".into())
            }
            Failure::NotStarted | Failure::Lost(_) | Failure::Busy => Uninspected::Unavailable,
        })?;
    serde_json::from_slice(&answer).map_err(|_| Uninspected::Unavailable)
}

/// Why a file has no inspection.
#[derive(Debug, PartialEq, Eq)]
pub enum Uninspected {
    /// The file is not what it claims; the reason is for the client.
    Unreadable(String),
    /// The inspector could not run (a deployment problem, logged where it failed).
    Unavailable,
}

/// `csv`, `gzip`...: the name serde gives a unit variant.
fn json_name(value: impl Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => unreachable!("formats and compressions serialize as strings"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestDatabase;

    /// Whether a dataset or a model is in use is read where a payload can name one, from the
    /// live jobs of the kinds that do: every live job's payload was printed as text and
    /// searched, here 3,000 queued canary jobs of a kilobyte, for a delete none could stop.
    #[tokio::test]
    async fn in_use_reads_only_the_live_jobs_that_can_name_it() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        let (dataset, model) = (Uuid::now_v7(), Uuid::now_v7());
        let insert = "INSERT INTO jobs (id, tenant_id, kind, status, payload)
             SELECT conveyor_uuidv7(), $1, 'canary', 'queued',
                    jsonb_build_object('pad', repeat('x', 1000))
             FROM generate_series(1, 3000)";
        let one = db.seeded(tenant, insert).await;
        let rows_read = || db.rows_read(&one, "jobs");
        let before = rows_read().await;
        assert!(in_use(&one, tenant, dataset, "dataset")
            .await
            .unwrap()
            .is_none());
        let read = rows_read().await - before;
        assert!(
            read < 10,
            "{read} rows of jobs read to find no job using the dataset"
        );

        // A live job of each kind naming one where its payload does refuses the delete; once
        // it has ended, it does not.
        let users = [
            (
                "import",
                "queued",
                serde_json::json!({"dataset_id": dataset, "target": {"table": "t"}}),
                dataset,
                "dataset",
            ),
            (
                "ingest",
                "running",
                serde_json::json!({"collection_id": Uuid::nil(),
                "documents": [{"id": "a", "text": "a"}, {"dataset_id": dataset}]}),
                dataset,
                "dataset",
            ),
            (
                "synthesis",
                "retrying",
                serde_json::json!({"dataset_id": dataset, "rows": 10}),
                dataset,
                "dataset",
            ),
            (
                "sample",
                "scheduled",
                serde_json::json!({"model_id": model}),
                model,
                "model",
            ),
        ];
        for (kind, status, payload, id, what) in users {
            let job = Uuid::now_v7();
            sqlx::query(
                "INSERT INTO jobs (id, tenant_id, kind, status, payload) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(job)
            .bind(tenant)
            .bind(kind)
            .bind(status)
            .bind(&payload)
            .execute(&db.pool)
            .await
            .unwrap();
            let conflict = in_use(&db.pool, tenant, id, what).await.unwrap();
            let conflict = conflict.unwrap_or_else(|| panic!("a {status} {kind} job uses it"));
            assert!(
                conflict.detail.contains(&job.to_string()),
                "{kind}: {}",
                conflict.detail
            );
            sqlx::query("UPDATE jobs SET status = 'succeeded' WHERE id = $1")
                .bind(job)
                .execute(&db.pool)
                .await
                .unwrap();
            assert!(
                in_use(&db.pool, tenant, id, what).await.unwrap().is_none(),
                "{kind} ended"
            );
        }
        // A waiting step of a running pipeline is named by its pipeline.
        let pipeline = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO pipelines (id, tenant_id, on_failure) VALUES ($1, $2, 'continue')",
        )
        .bind(pipeline)
        .bind(tenant)
        .execute(&db.pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO pipeline_steps (pipeline_id, name, position, kind, payload, max_attempts)
             VALUES ($1, 'load', 0, 'import', $2, 1)",
        )
        .bind(pipeline)
        .bind(serde_json::json!({"dataset_id": dataset, "target": {"table": "t"}}))
        .execute(&db.pool)
        .await
        .unwrap();
        let conflict = in_use(&db.pool, tenant, dataset, "dataset")
            .await
            .unwrap()
            .unwrap();
        assert!(
            conflict.detail.contains(&pipeline.to_string()),
            "{}",
            conflict.detail
        );
    }

    fn output(tenant: Uuid, id: Uuid, size: i64, sha256: &str) -> Dataset {
        Dataset {
            id,
            tenant_id: tenant,
            name: "job-synthetic.csv".into(),
            format: Format::Csv,
            compression: Compression::None,
            size_bytes: size,
            sha256: sha256.into(),
            schema: sqlx::types::Json(Vec::new()),
            preview: sqlx::types::Json(Vec::new()),
            created_at: Utc::now(),
        }
    }

    /// A file's column names and preview may hold NUL characters, which `jsonb` refuses: a
    /// synthesis whose output held one failed to register it at every attempt.
    #[tokio::test]
    async fn a_preview_holding_nul_characters_is_recorded() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        let mut dataset = output(tenant, Uuid::new_v4(), 10, "x");
        dataset.preview = sqlx::types::Json(vec![serde_json::json!({"na\u{0}me": "a\u{0}b"})]);
        record_output(&db.pool, &dataset).await.unwrap().unwrap();
        let row = get(&db.pool, tenant, dataset.id).await.unwrap().unwrap();
        assert_eq!(row.preview.0[0]["na\u{FFFD}me"], "a\u{FFFD}b");
    }

    /// A job's output, inspected in the worker, has its preview bounded as an upload's is.
    #[tokio::test]
    async fn an_outputs_preview_is_bounded() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        let mut dataset = output(tenant, Uuid::new_v4(), 10, "x");
        let wide = serde_json::json!({"label": "x".repeat(100_000)});
        dataset.preview = sqlx::types::Json(vec![wide; 20]);
        record_output(&db.pool, &dataset).await.unwrap().unwrap();
        let row = get(&db.pool, tenant, dataset.id).await.unwrap().unwrap();
        let stored = serde_json::to_vec(&row.preview.0).unwrap().len();
        assert!(stored <= MAX_PREVIEW_BYTES, "{stored} bytes");
    }

    /// A retried job's output replaced its file, but the row kept its first attempt's size
    /// (what `max_dataset_bytes` counts), hash, schema and preview. The row is replaced too,
    /// counted once; past the quota neither is left.
    #[tokio::test]
    async fn a_retried_output_replaces_its_record_counted_once() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        sqlx::query("INSERT INTO tenant_limits (tenant_id, max_dataset_bytes) VALUES ($1, 150)")
            .bind(tenant)
            .execute(&db.pool)
            .await
            .unwrap();
        let id = Uuid::new_v4();
        let recorded = |size, sha256: &'static str| {
            let dataset = output(tenant, id, size, sha256);
            let pool = db.pool.clone();
            async move { record_output(&pool, &dataset).await.unwrap() }
        };
        recorded(100, "first").await.unwrap();
        recorded(120, "second").await.unwrap();
        let row = get(&db.pool, tenant, id).await.unwrap().unwrap();
        assert_eq!((row.size_bytes, row.sha256.as_str()), (120, "second"));
        recorded(200, "third").await.unwrap_err();
        assert!(get(&db.pool, tenant, id).await.unwrap().is_none());
    }
}
