//! `ingest`: documents → chunks → embeddings → pgvector, searchable by vector, keyword or both.

pub mod collections;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use shared::FieldError;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{Context, Contract, Refusal};

pub struct Ingest;

#[async_trait]
impl Contract for Ingest {
    const KIND: &'static str = "ingest";
    type Payload = IngestPayload;
    type Output = IngestOutput;

    fn check(&self, payload: &IngestPayload) -> Result<(), Vec<FieldError>> {
        payload.check()
    }

    async fn preflight(
        &self,
        context: &Context,
        tenant: Uuid,
        payload: &IngestPayload,
    ) -> Result<(), Refusal> {
        let pool = &context.pool;
        collections::get_collection(pool, tenant, payload.collection_id)
            .await?
            .ok_or_else(|| Refusal::Unknown(format!("collection {}", payload.collection_id)))?;
        // One query for each kind of source, however many name it: 10,000 sources read one
        // dataset's whole row 10,000 times.
        let named = |id: fn(&DocumentSource) -> Option<Uuid>| {
            let mut ids: Vec<Uuid> = payload.documents.iter().filter_map(id).collect();
            ids.sort_unstable();
            ids.dedup();
            ids
        };
        let buckets = shared::buckets::existing(pool, tenant, &named(|s| s.bucket_id)).await?;
        let datasets = shared::datasets::names(pool, tenant, &named(|s| s.dataset_id)).await?;
        let mut errors = Vec::new();
        for (i, source) in payload.documents.iter().enumerate() {
            if let Some(bucket) = source.bucket_id.filter(|b| !buckets.contains(b)) {
                return Err(Refusal::Unknown(format!("bucket {bucket}")));
            }
            let Some(id) = source.dataset_id else {
                continue;
            };
            let name = datasets
                .get(&id)
                .ok_or_else(|| Refusal::Unknown(format!("dataset {id}")))?;
            if source.format.is_none() && DocFormat::from_name(name).is_none() {
                errors.push(FieldError::new(
                    format!("payload.documents[{i}].format"),
                    format!("cannot tell the format of {name:?}: give one"),
                ));
            }
        }
        crate::refused(errors).map_err(Refusal::Invalid)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DocFormat {
    Text,
    Markdown,
    Html,
    /// An array of objects (or one object), one document each.
    Json,
    /// One object per line, one document each.
    Ndjson,
    /// A header row, then one document per row.
    Csv,
    Tsv,
    /// The text of every page (no OCR: scanned pages have none).
    Pdf,
}

impl DocFormat {
    /// From a file name's extension.
    pub fn from_name(name: &str) -> Option<Self> {
        let lower = name.to_ascii_lowercase();
        let stem = lower
            .strip_suffix(".gz")
            .or_else(|| lower.strip_suffix(".zst"))
            .unwrap_or(&lower);
        Some(match stem.rsplit_once('.')?.1 {
            "txt" | "text" => Self::Text,
            "md" | "markdown" => Self::Markdown,
            "html" | "htm" => Self::Html,
            "json" => Self::Json,
            "ndjson" | "jsonl" => Self::Ndjson,
            "csv" => Self::Csv,
            "tsv" | "tab" => Self::Tsv,
            "pdf" => Self::Pdf,
            _ => return None,
        })
    }

    /// The name payloads use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Markdown => "markdown",
            Self::Html => "html",
            Self::Json => "json",
            Self::Ndjson => "ndjson",
            Self::Csv => "csv",
            Self::Tsv => "tsv",
            Self::Pdf => "pdf",
        }
    }

    pub fn is_records(self) -> bool {
        matches!(self, Self::Json | Self::Ndjson | Self::Csv | Self::Tsv)
    }
}

pub const MAX_SOURCES: usize = 10_000;

/// Most bytes of a source's `metadata` as JSON: it is copied into every record's and stored
/// with every chunk.
pub const MAX_METADATA_BYTES: usize = 4096;
pub const MAX_ID_LEN: usize = 256;
/// The longest id a stored document may have: a watched file's path or a bucket object's
/// `s3://` name, with a record's `:id` after it. Far past it, PostgreSQL's index on the id
/// refuses the row (about 2.7 kB), which no retry changes.
pub const MAX_DOCUMENT_ID_BYTES: usize = 2048;

#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IngestPayload {
    pub collection_id: Uuid,
    /// 1 to 10,000 sources: inline texts or uploaded datasets.
    pub documents: Vec<DocumentSource>,
}

/// Inline `text` with its `id`, a `dataset_id`, a watched `directory`, or a watched bucket
/// prefix (`bucket_id`, `prefix`).
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DocumentSource {
    /// The document's id in the collection. Required with `text`; for a dataset, the id of its
    /// one document (default: the dataset id), or the prefix of its records' ids.
    pub id: Option<String>,
    pub text: Option<String>,
    pub dataset_id: Option<Uuid>,
    /// A directory the operator maps for the tenant (`CONVEYOR_WATCH_ROOT/<tenant id>/`),
    /// relative to it: each file of a known format (by extension, in subdirectories too) is a
    /// document whose id is its path; files unchanged since the last ingest are skipped, and
    /// documents of files gone from it are removed. Run it on a schedule to keep a collection
    /// in sync.
    pub directory: Option<String>,
    /// A bucket the tenant registered (`POST /v1/buckets`): each object of a known format
    /// under `prefix` is a document whose id is `s3://<bucket>/<key>`; as with a directory,
    /// objects unchanged since the last ingest are skipped and documents of objects gone from
    /// the prefix are removed. Run it on a schedule to keep a collection in sync.
    pub bucket_id: Option<Uuid>,
    /// With `bucket_id`: the key prefix to follow (`/`-separated names, no `.` or `..`, no
    /// leading `/`). Default: the whole bucket.
    pub prefix: Option<String>,
    /// Default: `text` inline, else from the dataset's file name.
    pub format: Option<DocFormat>,
    /// Records: the field (column) that holds the text. Default `text`.
    pub text_field: Option<String>,
    /// Records: the field that holds each record's id. Default: the record's number.
    pub id_field: Option<String>,
    /// Stored with every chunk of the document, for search filters. A record's other scalar
    /// fields are added to it.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub metadata: Map<String, Value>,
}

impl IngestPayload {
    pub fn check(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        if self.documents.is_empty() || self.documents.len() > MAX_SOURCES {
            // Alone: each of 300,000 documents checked would say more of the same.
            return Err(vec![FieldError::new(
                "payload.documents",
                format!("must hold 1 to {MAX_SOURCES} documents"),
            )]);
        }
        // Each place followed once: every source of a place reads all of it again.
        let mut followed = std::collections::HashSet::new();
        for (i, source) in self.documents.iter().enumerate() {
            let field = |name: &str| format!("payload.documents[{i}].{name}");
            let metadata = serde_json::to_vec(&source.metadata).map_or(0, |json| json.len());
            if metadata > MAX_METADATA_BYTES {
                errors.push(FieldError::new(
                    field("metadata"),
                    format!("at most {MAX_METADATA_BYTES} bytes as JSON, not {metadata}"),
                ));
            }
            // A watched source: each file's or object's path is its id, its extension its
            // format, so none of the fields that give those is taken.
            let watched = if let Some(directory) = &source.directory {
                if let Err(why) = check_directory(directory) {
                    errors.push(FieldError::new(field("directory"), why));
                }
                Some("directory")
            } else if source.bucket_id.is_some() {
                if let Some(prefix) = &source.prefix {
                    if let Err(why) = shared::buckets::check_prefix(prefix) {
                        errors.push(FieldError::new(field("prefix"), why));
                    }
                }
                Some("bucket_id")
            } else {
                None
            };
            if let Some(watched) = watched {
                let place = match (&source.directory, source.bucket_id) {
                    (Some(directory), _) => format!("{:?}", directory.trim_matches('/')),
                    (None, bucket) => format!(
                        "{bucket:?} {:?}",
                        shared::buckets::normalize_prefix(source.prefix.as_deref().unwrap_or(""))
                    ),
                };
                if !followed.insert(place) {
                    errors.push(FieldError::new(
                        field(watched),
                        "follows the same place as an earlier source",
                    ));
                }
                for (name, given) in [
                    ("text", source.text.is_some()),
                    ("dataset_id", source.dataset_id.is_some()),
                    (
                        "bucket_id",
                        source.bucket_id.is_some() && watched != "bucket_id",
                    ),
                    ("id", source.id.is_some()),
                    ("format", source.format.is_some()),
                ] {
                    if given {
                        errors.push(FieldError::new(
                            field(name),
                            format!("not with {watched} (each file's path is its id, its extension its format)"),
                        ));
                    }
                }
                continue;
            }
            if source.prefix.is_some() {
                errors.push(FieldError::new(field("prefix"), "only with bucket_id"));
            }
            match (&source.text, source.dataset_id) {
                (Some(_), None) => {
                    if source.id.is_none() {
                        errors.push(FieldError::new(field("id"), "required with text"));
                    }
                    if source.format.is_some_and(DocFormat::is_records) {
                        errors.push(FieldError::new(
                            field("format"),
                            "inline text is text, markdown or html",
                        ));
                    }
                }
                (None, Some(_)) => {}
                _ => errors.push(FieldError::new(
                    format!("payload.documents[{i}]"),
                    "give one of text, dataset_id, directory or bucket_id",
                )),
            }
            if let Some(id) = &source.id {
                if id.is_empty() || id.len() > MAX_ID_LEN {
                    errors.push(FieldError::new(
                        field("id"),
                        format!("must be 1-{MAX_ID_LEN} characters"),
                    ));
                }
            }
            let records = source.format.is_none_or(DocFormat::is_records);
            for (name, value) in [
                ("text_field", &source.text_field),
                ("id_field", &source.id_field),
            ] {
                if value.is_some() && (source.text.is_some() || !records) {
                    errors.push(FieldError::new(
                        field(name),
                        "only for records (json, ndjson, csv, tsv)",
                    ));
                }
            }
        }
        crate::refused(errors)
    }
}

/// A watched directory: relative to the tenant's root, never out of it (no `..`, no absolute
/// path); `""` or `.` is the root itself.
pub fn check_directory(directory: &str) -> Result<(), String> {
    let path = std::path::Path::new(directory);
    let inside = path.components().all(|c| {
        matches!(
            c,
            std::path::Component::Normal(_) | std::path::Component::CurDir
        )
    });
    if directory.len() > 1024 || directory.contains('\0') || !inside {
        return Err(format!(
            "{directory:?} must be a relative path inside the tenant's watched root (no `..`, no leading `/`)"
        ));
    }
    Ok(())
}

/// An ingest's result.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct IngestOutput {
    pub collection_id: Uuid,
    /// Documents in the payload.
    pub documents: usize,
    /// Documents (re)chunked and embedded.
    pub indexed: usize,
    /// Documents whose content was already indexed.
    pub unchanged: usize,
    /// Documents of watched directories' files and buckets' objects that are gone, removed.
    pub deleted: u64,
    pub chunks: usize,
    pub elapsed_ms: u64,
    pub chunks_per_second: f64,
    pub timings: IngestTimings,
}

/// Where an ingest's time went, in seconds: reading the sources (files, objects, inline text),
/// splitting into chunks, embedding and storing (documents, chunks and deletions of gone
/// sources). Together they make up nearly all of `elapsed_ms`.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct IngestTimings {
    pub read_seconds: f64,
    pub chunk_seconds: f64,
    pub embed_seconds: f64,
    pub store_seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::DocFormat;
    use crate::Registry;
    use serde_json::{json, Value};

    const ID: &str = "0b9ab4e2-6a3c-4c36-9a0c-5d3f2f1b6a11";

    fn refused(documents: Value) -> Vec<String> {
        let payload = json!({"collection_id": ID, "documents": documents});
        match Registry::standard().validate("ingest", &payload) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.into_iter().map(|e| e.field).collect(),
        }
    }

    /// A preflight reads each named dataset (and bucket) once, however many sources name it:
    /// 2,000 sources naming one dataset read its whole row, preview and all, 2,000 times.
    #[tokio::test]
    async fn a_preflight_reads_a_dataset_named_many_times_once() {
        use crate::{Context, Contract, Preflights};
        use shared::connections::{SessionLimits, Targets};
        let db = shared::testing::TestDatabase::new().await;
        let tenant = db.tenant().await;
        let (collection, dataset) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        let seed = format!(
            "WITH c AS (INSERT INTO collections (id, tenant_id, name, model, max_tokens, overlap)
                        VALUES ('{collection}', $1, 'notes', 'all-MiniLM-L6-v2', 200, 32))
             INSERT INTO datasets (id, tenant_id, name, format, size_bytes, sha256, preview)
             VALUES ('{dataset}', $1, 'notes.csv', 'csv', 1, 'x',
                     jsonb_build_array(jsonb_build_object('pad', repeat('x', 60000))))"
        );
        let one = db.seeded(tenant, &seed).await;
        let settings = shared::Settings::for_test("postgres://127.0.0.1/x".into(), "t".into());
        let context = Context {
            targets: Targets::new(one.clone(), &settings, SessionLimits::preflight(&settings))
                .unwrap(),
            pool: one.clone(),
            preflights: Preflights::new(settings.preflight_timeout, 4),
            max_in_memory_bytes: 1 << 30,
        };
        let sources: Vec<Value> = (0..2000)
            .map(|_| json!({"dataset_id": dataset, "text_field": "body"}))
            .collect();
        let payload =
            serde_json::from_value(json!({"collection_id": collection, "documents": sources}))
                .unwrap();
        let before = db.rows_read(&one, "datasets").await;
        let checked = super::Ingest.preflight(&context, tenant, &payload).await;
        assert!(checked.is_ok());
        let read = db.rows_read(&one, "datasets").await - before;
        assert!(read < 10, "{read} rows of datasets read");
    }

    /// Metadata is copied into every record and chunk of its source: a large one is refused.
    #[test]
    fn large_metadata_is_refused() {
        let pad = "x".repeat(super::MAX_METADATA_BYTES);
        assert_eq!(
            refused(json!([{"dataset_id": ID, "metadata": {"pad": pad}}])),
            ["payload.documents[0].metadata"]
        );
        assert!(refused(json!([{"dataset_id": ID, "metadata": {"pad": &pad[..4000]}}])).is_empty());
    }

    /// A place followed twice is read twice (and ten thousand times, ten thousand times).
    #[test]
    fn a_place_is_followed_once() {
        assert_eq!(
            refused(json!([{"directory": "docs"}, {"directory": "docs/"}])),
            ["payload.documents[1].directory"]
        );
        assert_eq!(
            refused(json!([{"bucket_id": ID, "prefix": "a/"}, {"bucket_id": ID, "prefix": "a/"}])),
            ["payload.documents[1].bucket_id"]
        );
        assert!(
            refused(json!([{"directory": "a"}, {"directory": "b"}, {"bucket_id": ID}])).is_empty()
        );
    }

    #[test]
    fn inline_texts_and_datasets_are_valid() {
        assert!(refused(json!([
            {"id": "faq-1", "text": "hello", "format": "markdown", "metadata": {"lang": "en"}},
            {"dataset_id": ID, "format": "ndjson", "text_field": "body", "id_field": "id"},
            {"dataset_id": ID},
            {"directory": "docs/handbook"},
            {"directory": "."},
            {"bucket_id": ID, "prefix": "docs/handbook/"},
            {"bucket_id": ID}
        ]))
        .is_empty());
    }

    #[test]
    fn each_bad_source_is_named() {
        for (documents, field) in [
            (json!([]), "payload.documents"),
            (json!([{"text": "no id"}]), "payload.documents[0].id"),
            (json!([{"id": "", "text": "x"}]), "payload.documents[0].id"),
            (
                json!([{"id": "a".repeat(257), "text": "x"}]),
                "payload.documents[0].id",
            ),
            (
                json!([{"id": "a", "text": "x", "format": "csv"}]),
                "payload.documents[0].format",
            ),
            (json!([{"id": "a"}]), "payload.documents[0]"),
            (
                json!([{"id": "a", "text": "x", "dataset_id": ID}]),
                "payload.documents[0]",
            ),
            (
                json!([{"id": "a", "text": "x", "text_field": "body"}]),
                "payload.documents[0].text_field",
            ),
            (
                json!([{"dataset_id": ID, "format": "pdf", "id_field": "id"}]),
                "payload.documents[0].id_field",
            ),
            (
                json!([{"dataset_id": ID, "format": "docx"}]),
                "payload.documents[0].format",
            ),
            (
                json!([{"dataset_id": "not-a-uuid"}]),
                "payload.documents[0].dataset_id",
            ),
            (
                json!([{"directory": "../other-tenant"}]),
                "payload.documents[0].directory",
            ),
            (
                json!([{"directory": "/etc"}]),
                "payload.documents[0].directory",
            ),
            (
                json!([{"directory": "docs", "dataset_id": ID}]),
                "payload.documents[0].dataset_id",
            ),
            (
                json!([{"bucket_id": ID, "prefix": "docs/../other"}]),
                "payload.documents[0].prefix",
            ),
            (
                json!([{"bucket_id": ID, "prefix": "/docs"}]),
                "payload.documents[0].prefix",
            ),
            (
                json!([{"bucket_id": ID, "id": "x"}]),
                "payload.documents[0].id",
            ),
            (
                json!([{"dataset_id": ID, "prefix": "docs"}]),
                "payload.documents[0].prefix",
            ),
        ] {
            let fields = refused(documents.clone());
            assert!(fields.iter().any(|f| f == field), "{documents}: {fields:?}");
        }
    }

    #[test]
    fn formats_come_from_file_names() {
        assert_eq!(DocFormat::from_name("a.MD"), Some(DocFormat::Markdown));
        assert_eq!(
            DocFormat::from_name("rows.jsonl.gz"),
            Some(DocFormat::Ndjson)
        );
        assert_eq!(DocFormat::from_name("page.htm"), Some(DocFormat::Html));
        assert_eq!(DocFormat::from_name("x.docx"), None);
        assert_eq!(DocFormat::from_name("noext"), None);
        assert!(DocFormat::Csv.is_records() && !DocFormat::Pdf.is_records());
    }
}
