//! `ingest`: documents → chunks → embeddings → pgvector, searchable by vector, keyword or both.
//!
//! Each document is indexed whole or not at all: its chunks are replaced in one transaction,
//! and a document whose content hash is unchanged is skipped. So a retry after a crash, or a
//! second ingest of the same files, indexes each document exactly once.

pub mod chunk;
pub mod extract;
pub mod isolated;
pub mod watched;

pub use contracts::ingest::{
    collections as store, DocumentSource, Ingest, IngestOutput, IngestPayload, IngestTimings,
    MAX_DOCUMENT_ID_BYTES, MAX_ID_LEN, MAX_SOURCES,
};

use async_trait::async_trait;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use shared::{buckets::OpenError, datasets::Compression, usage::Meter, JobContext};
use std::{collections::HashMap, sync::Arc, time::Instant};

use self::{
    chunk::Chunking,
    extract::{DocFormat, RecordFields},
};
use crate::{
    import,
    limits::{read_capped, CapExceeded, Framing, RecordCapped},
    Handler, JobError, Services,
};

/// Chunks embedded and stored together, in one transaction (a larger document goes alone; a
/// document of no chunks counts as one).
const GROUP_CHUNKS: usize = 256;

/// What a document's chunks hold in memory and in their insert, as an upper bound: each
/// chunk's vector and its copy of the document's metadata, and the chunks' texts. A document
/// goes alone into one embedding and one insert: 64 MiB of text at 16 tokens a chunk made two
/// million chunks, GBs in the worker and an insert past PostgreSQL's 1 GB message.
fn stored_bytes(chunks: &[String], metadata: &Map<String, Value>) -> u64 {
    let metadata = serde_json::to_vec(metadata).map_or(0, |json| json.len());
    let vector = embed::DIMENSIONS * std::mem::size_of::<f32>();
    let texts: usize = chunks.iter().map(String::len).sum();
    (chunks.len() * (vector + metadata) + texts) as u64
}

/// The most a document's chunks may hold: the in-memory bound, and within PostgreSQL's 1 GB
/// message for their insert. At the defaults every document within the 64 MiB document cap
/// passes at the default chunking (3.5 to 8 times its text), with 4 KiB of metadata too.
fn stored_bytes_limit(in_memory: u64) -> u64 {
    in_memory.min(768 << 20)
}

/// One document to index.
struct Document {
    id: String,
    text: String,
    metadata: Map<String, Value>,
}

impl Document {
    /// A document as PostgreSQL stores it: a NUL character in its id, text or metadata (a
    /// tenant's file may hold one) failed its whole group's insert, retried with the group's
    /// embedding redone until the job ran out of attempts; it is U+FFFD instead.
    fn new(id: String, text: String, metadata: Map<String, Value>) -> Self {
        let storable = |s: String| match s.contains('\0') {
            true => shared::store::storable_text(&s),
            false => s,
        };
        let metadata = Value::Object(metadata);
        let replaced = match shared::store::storable_value(&metadata) {
            std::borrow::Cow::Owned(Value::Object(fields)) => Some(fields),
            _ => None,
        };
        let metadata = match (replaced, metadata) {
            (Some(fields), _) | (None, Value::Object(fields)) => fields,
            (None, _) => Map::new(),
        };
        Self {
            id: storable(id),
            text: storable(text),
            metadata,
        }
    }

    /// Text and metadata: what, if unchanged, makes a re-ingest a no-op.
    fn content_hash(&self) -> String {
        let mut hash = Sha256::new();
        hash.update(self.text.as_bytes());
        hash.update([0]);
        hash.update(Value::Object(self.metadata.clone()).to_string().as_bytes());
        hex::encode(hash.finalize())
    }
}

/// What each document (a record, or a whole file) holds besides its text: its map and a copy
/// of its source's metadata. Empty files and records cost that much too. Once per source.
fn record_cost(metadata: &Map<String, Value>) -> u64 {
    RECORD_COST + serde_json::to_string(metadata).map_or(0, |text| text.len() as u64)
}

pub struct IngestHandler {
    services: Arc<Services>,
}

impl IngestHandler {
    pub fn new(services: Arc<Services>) -> Self {
        Self { services }
    }

    /// The documents of one source. `budget`: the decompressed bytes the job's datasets may
    /// still take (they are all held in memory), less what this one took.
    async fn read(
        &self,
        ctx: &JobContext,
        source: &DocumentSource,
        budget: &mut u64,
    ) -> Result<Vec<Document>, JobError> {
        let tenant = ctx.tenant_id();
        if let Some(text) = &source.text {
            Meter::add(&ctx.meter().bytes_read, text.len() as i64);
            let id = source.id.clone().unwrap_or_default();
            let text = match source.format {
                Some(DocFormat::Html) => extract::html_to_text(text),
                _ => text.clone(),
            };
            return Ok(vec![Document::new(id, text, source.metadata.clone())]);
        }
        let dataset_id = source.dataset_id.expect("validated: text or dataset_id");
        let pool = &self.services.pool;
        let dataset = shared::datasets::get(pool, tenant, dataset_id)
            .await
            .map_err(|e| JobError::Retryable(e.to_string()))?
            .ok_or_else(|| JobError::Permanent(format!("dataset {dataset_id} no longer exists")))?;
        let format = source
            .format
            .or_else(|| DocFormat::from_name(&dataset.name))
            .ok_or_else(|| {
                JobError::Permanent(format!("cannot tell the format of {}", dataset.name))
            })?;
        let held = self
            .services
            .objects
            .dataset_file(&dataset)
            .await
            .map_err(|e| JobError::Retryable(format!("fetching the dataset: {e}")))?;
        // Records are `prefix:id`: the source's id, else (numbered records) the dataset's.
        let file = SourceFile {
            path: held.to_path_buf(),
            beneath: None,
            compression: dataset.compression,
            format,
            label: format!("dataset {} ({})", dataset.name, dataset_id),
            id: source.id.clone().unwrap_or_else(|| dataset_id.to_string()),
            prefix: source
                .id
                .clone()
                .or_else(|| source.id_field.is_none().then(|| dataset_id.to_string())),
        };
        let per_record = record_cost(&source.metadata);
        let documents = self
            .documents_in(ctx, file, source, &source.metadata, per_record, budget)
            .await;
        drop(held);
        documents
    }

    /// The documents of a watched directory's files, each marked with the directory (see
    /// [`watched`]); and the directory's name.
    async fn read_directory(
        &self,
        ctx: &JobContext,
        source: &DocumentSource,
        directory: &str,
        budget: &mut u64,
    ) -> Result<(String, Vec<Document>), JobError> {
        let root = self.services.settings.watch_root.clone();
        let tenant = ctx.tenant_id();
        let asked = directory.to_owned();
        let (name, files) = ctx
            .blocking(move || watched::list(root.as_deref(), tenant, &asked, MAX_SOURCES))
            .await
            .map_err(JobError::crashed)?
            .map_err(JobError::Permanent)?;
        let mut metadata = source.metadata.clone();
        metadata.insert("watched_directory".into(), Value::String(name.clone()));
        let per_record = record_cost(&metadata);
        let mut documents = Vec::new();
        for file in files {
            let file = SourceFile {
                label: format!("file {}", file.id),
                prefix: Some(file.id.clone()),
                id: file.id,
                path: file.path,
                beneath: Some(file.beneath),
                compression: file.compression,
                format: file.format,
            };
            documents.extend(
                self.documents_in(ctx, file, source, &metadata, per_record, budget)
                    .await?,
            );
        }
        Ok((name, documents))
    }

    /// The documents of a watched bucket prefix's objects, each marked with the prefix
    /// (`watched_prefix`: `s3://<bucket>/<prefix>`); and that mark. Each object is downloaded
    /// to a scratch file, read as a watched file is, and the file removed.
    async fn read_bucket(
        &self,
        ctx: &JobContext,
        source: &DocumentSource,
        bucket_id: uuid::Uuid,
        budget: &mut u64,
    ) -> Result<(String, Vec<Document>), JobError> {
        let services = &self.services;
        let opened = shared::buckets::open(
            &services.pool,
            services.targets.cipher(),
            &services.settings.connection_allow,
            ctx.tenant_id(),
            bucket_id,
        )
        .await
        .map_err(|e| match e {
            OpenError::NotFound(id) => JobError::Permanent(format!("bucket {id} no longer exists")),
            OpenError::Refused(why) => JobError::Permanent(why),
            OpenError::Other(e) => retryable(e),
        })?;
        let prefix = shared::buckets::normalize_prefix(source.prefix.as_deref().unwrap_or(""));
        let name = &opened.bucket.bucket;
        let mark = match prefix {
            "" => format!("s3://{name}"),
            prefix => format!("s3://{name}/{prefix}"),
        };
        // A failed listing (the service down, a timeout) is worth another attempt.
        let listed = tokio::select! {
            listed = opened.list(prefix, MAX_SOURCES) => listed,
            () = ctx.cancellation().cancelled() => return Err(shared::Cancelled.into()),
        }
        .map_err(|e| retryable(format!("listing {mark}: {e:#}")))?;
        let mut metadata = source.metadata.clone();
        metadata.insert("watched_prefix".into(), Value::String(mark.clone()));
        let per_record = record_cost(&metadata);
        let mut documents = Vec::new();
        for object in listed {
            let key = object.location.as_ref().to_owned();
            let Some(format) = DocFormat::from_name(&key) else {
                continue;
            };
            let id = format!("s3://{name}/{key}");
            // Before the download: an id too long fails the job whatever the object holds.
            checked_id(&id)?;
            if object.size > *budget {
                return Err(JobError::Permanent(format!(
                    "{id} is {} bytes, more than the {} this job may still read",
                    object.size, *budget
                )));
            }
            ctx.checkpoint()?;
            let scratch = services.objects.scratch_file().await.map_err(retryable)?;
            opened
                .download(&object.location, &scratch, *budget)
                .await
                .map_err(|e| retryable(format!("downloading {id}: {e:#}")))?;
            let compression = match key.rsplit_once('.').map(|(_, ext)| ext) {
                Some("gz") => Compression::Gzip,
                Some("zst") => Compression::Zstd,
                _ => Compression::None,
            };
            let file = SourceFile {
                path: scratch.to_path_buf(),
                beneath: None,
                compression,
                format,
                label: format!("object {id}"),
                prefix: Some(id.clone()),
                id,
            };
            documents.extend(
                self.documents_in(ctx, file, source, &metadata, per_record, budget)
                    .await?,
            );
        }
        Ok((mark, documents))
    }

    /// The documents of one file: read (capped), then extracted; each costs `per_record` of the
    /// budget besides its text (see [`record_cost`]).
    async fn documents_in(
        &self,
        ctx: &JobContext,
        file: SourceFile,
        source: &DocumentSource,
        metadata: &Map<String, Value>,
        per_record: u64,
        budget: &mut u64,
    ) -> Result<Vec<Document>, JobError> {
        let SourceFile {
            path,
            beneath,
            compression,
            format,
            label,
            id,
            prefix,
        } = file;
        // Checked before the file is read: an id too long fails every attempt.
        checked_id(&id)?;
        let limits = self.services.limits;
        // A single document stops at the document cap, records each at the record cap; all of
        // the job's datasets together at the in-memory cap.
        let held = limits.held().with_bytes(*budget);
        let cap = match format.is_records() {
            false if limits.document < *budget => limits.document(),
            _ => held,
        };
        let framing = match format {
            DocFormat::Csv => Some(Framing::Csv {
                quote: b'"',
                delimiter: b',',
            }),
            DocFormat::Tsv => Some(Framing::Csv {
                quote: b'"',
                delimiter: b'\t',
            }),
            DocFormat::Ndjson => Some(Framing::Lines),
            _ => None,
        };
        let record = limits.record();
        let bytes = ctx
            .blocking(move || {
                let file = match &beneath {
                    Some(beneath) => watched::WatchedFile::open(&path, beneath)?,
                    None => std::fs::File::open(&path)?,
                };
                let reader = import::source::decompressed(file, compression)?;
                match framing {
                    Some(framing) => read_capped(RecordCapped::new(reader, framing, record), cap),
                    None => read_capped(reader, cap),
                }
            })
            .await
            .map_err(JobError::crashed)?
            .map_err(|e| match CapExceeded::in_io(&e) {
                Some(cap) => JobError::Permanent(format!("{label}: {cap}")),
                None => JobError::Permanent(format!("{label}: {e}")),
            })?;
        *budget -= bytes.len() as u64;
        Meter::add(&ctx.meter().bytes_read, bytes.len() as i64);
        let failed = |e: String| JobError::Permanent(format!("{label}: {e}"));
        if *budget < per_record {
            return Err(failed(format!(
                "the job's documents take more than the {} cap (CONVEYOR_MAX_IN_MEMORY_BYTES)",
                crate::limits::human(limits.in_memory)
            )));
        }
        let extracted = if format == DocFormat::Pdf {
            // A PDF's text is not its bytes (a few kilobytes of compressed streams inflate to
            // the document cap): it is held too, so it comes out of the budget, and a text
            // past what is left stops the job as the bytes would.
            let output = match limits.document < *budget {
                true => limits.document(),
                false => limits.held().with_bytes(*budget),
            };
            let text = self
                .services
                .extractor
                .extract(format, bytes, output)
                .await
                .map_err(failed)?;
            *budget -= (text.len() as u64).min(*budget);
            vec![extract::Extracted {
                id: None,
                text,
                fields: Map::new(),
            }]
        } else {
            let text_field = source.text_field.clone().unwrap_or_else(|| "text".into());
            let id_field = source.id_field.clone();
            let max_records = (*budget / per_record) as usize;
            ctx.blocking(move || {
                let fields = RecordFields {
                    text: &text_field,
                    id: id_field.as_deref(),
                    max_text: usize::try_from(limits.record).unwrap_or(usize::MAX),
                };
                extract::extract(&bytes, format, &fields, max_records)
            })
            .await
            .map_err(JobError::crashed)?
            .map_err(failed)?
        };
        *budget = budget.saturating_sub(extracted.len() as u64 * per_record);
        extracted
            .into_iter()
            .map(|doc| {
                let id = match (doc.id, &prefix) {
                    (None, _) => id.clone(),
                    (Some(record), Some(prefix)) => format!("{prefix}:{record}"),
                    (Some(record), None) => record,
                };
                checked_id(&id)?;
                let mut metadata_of_doc = doc.fields;
                metadata_of_doc.extend(metadata.clone());
                Ok(Document::new(id, doc.text, metadata_of_doc))
            })
            .collect()
    }
}

/// Refuses a document id past [`MAX_DOCUMENT_ID_BYTES`] (a deep watched path, a long object
/// key), naming its start: the file's path or the object's name.
fn checked_id(id: &str) -> Result<(), JobError> {
    if id.len() <= MAX_DOCUMENT_ID_BYTES {
        return Ok(());
    }
    let shown = (0..=64)
        .rev()
        .find(|&end| id.is_char_boundary(end))
        .unwrap_or(0);
    Err(JobError::Permanent(format!(
        "the document id {}... is {} bytes; at most {MAX_DOCUMENT_ID_BYTES}",
        &id[..shown],
        id.len()
    )))
}

/// What one record holds in memory besides its bytes (its map, its document, its id), charged
/// to the job's in-memory budget: a file of tiny records costs many times its size.
const RECORD_COST: u64 = 1024;

/// A file to read documents from: a dataset's, a watched directory's, or a bucket object
/// downloaded.
struct SourceFile {
    path: std::path::PathBuf,
    /// A watched directory's file: opened only if still in this directory (see [`watched`]).
    beneath: Option<std::path::PathBuf>,
    compression: shared::datasets::Compression,
    format: DocFormat,
    /// What errors call it.
    label: String,
    /// The id of its one document.
    id: String,
    /// Its records' ids are `prefix:id` (none: the record's own id).
    prefix: Option<String>,
}

fn retryable(e: impl std::fmt::Display) -> JobError {
    JobError::Retryable(e.to_string())
}

#[async_trait]
impl Handler for IngestHandler {
    type Contract = Ingest;

    /// A worker serving `ingest` loads the model at start-up, or does not start.
    async fn prepare(&self) -> anyhow::Result<()> {
        self.services.embedder.get().await?;
        Ok(())
    }

    async fn run(
        &self,
        ctx: &JobContext,
        payload: IngestPayload,
    ) -> Result<IngestOutput, JobError> {
        let started = Instant::now();
        let mut timings = IngestTimings::default();
        let pool = &self.services.pool;
        let collection = store::get_collection(pool, ctx.tenant_id(), payload.collection_id)
            .await
            .map_err(retryable)?
            .ok_or_else(|| {
                JobError::Permanent(format!(
                    "collection {} no longer exists",
                    payload.collection_id
                ))
            })?;
        let embedder = self
            .services
            .embedder
            .get()
            .await
            .map_err(|e| JobError::Permanent(e.to_string()))?;

        // Every document, the last of each id winning; unchanged ones are skipped.
        let mut documents: Vec<Document> = Vec::new();
        let mut budget = self.services.limits.in_memory;
        // Each watched directory or prefix (its metadata field and mark), with the documents
        // its files gave (the others are deleted).
        let mut watched_now: Vec<((&str, String), Vec<String>)> = Vec::new();
        for source in &payload.documents {
            if let Some(directory) = &source.directory {
                let (name, docs) = self
                    .read_directory(ctx, source, directory, &mut budget)
                    .await?;
                let ids = docs.iter().map(|d| d.id.clone()).collect();
                watched_now.push((("watched_directory", name), ids));
                documents.extend(docs);
            } else if let Some(bucket) = source.bucket_id {
                let (mark, docs) = self.read_bucket(ctx, source, bucket, &mut budget).await?;
                let ids = docs.iter().map(|d| d.id.clone()).collect();
                watched_now.push((("watched_prefix", mark), ids));
                documents.extend(docs);
            } else {
                documents.extend(self.read(ctx, source, &mut budget).await?);
            }
        }
        let mut last = HashMap::new();
        for (i, doc) in documents.iter().enumerate() {
            last.insert(doc.id.clone(), i);
        }
        let total_documents = last.len();
        let mut keep: Vec<bool> = (0..documents.len())
            .map(|i| last[&documents[i].id] == i)
            .collect();
        let mut keep_iter = keep.iter_mut();
        documents.retain(|_| *keep_iter.next().expect("one flag per document"));
        let ids: Vec<String> = documents.iter().map(|d| d.id.clone()).collect();
        let stored: HashMap<String, String> = store::document_hashes(pool, collection.id, &ids)
            .await
            .map_err(retryable)?
            .into_iter()
            .collect();
        let documents: Vec<(Document, String)> = documents
            .into_iter()
            .map(|doc| {
                let hash = doc.content_hash();
                (doc, hash)
            })
            .filter(|(doc, hash)| stored.get(&doc.id) != Some(hash))
            .collect();
        let unchanged = total_documents - documents.len();

        timings.read_seconds = started.elapsed().as_secs_f64();

        // Chunk everything first: the total makes progress meaningful.
        let phase = Instant::now();
        let chunking = Chunking {
            max_tokens: collection.max_tokens as usize,
            overlap: collection.overlap as usize,
        };
        let splitter = embedder.clone();
        let limit = stored_bytes_limit(self.services.limits.in_memory);
        let documents = ctx
            .blocking(move || {
                documents
                    .into_iter()
                    .map(|(doc, hash)| {
                        let chunks = chunk::split(splitter.counter(), &doc.text, chunking)?;
                        let tokens: usize = chunks.iter().map(|c| c.tokens.len()).sum();
                        let chunks: Vec<String> = chunks.into_iter().map(|c| c.text).collect();
                        let bytes = stored_bytes(&chunks, &doc.metadata);
                        if bytes > limit {
                            anyhow::bail!(
                                "document {:?} makes {} chunks holding {bytes} bytes with their \
                                 vectors and metadata, past the {limit} a document may: split \
                                 it, or raise the collection's max_tokens",
                                doc.id,
                                chunks.len()
                            );
                        }
                        Ok((doc, hash, chunks, tokens))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()
            })
            .await
            .map_err(JobError::crashed)?
            .map_err(|e| JobError::Permanent(e.to_string()))?;
        let total_chunks: usize = documents.iter().map(|(_, _, chunks, _)| chunks.len()).sum();
        timings.chunk_seconds = phase.elapsed().as_secs_f64();
        let replacing: Vec<String> = documents.iter().map(|(doc, ..)| doc.id.clone()).collect();
        let watched: Vec<(&str, &str)> = watched_now
            .iter()
            .map(|((field, source), _)| (*field, source.as_str()))
            .collect();
        let present: Vec<String> = watched_now
            .iter()
            .flat_map(|(_, ids)| ids.iter().cloned())
            .collect();
        let change = shared::quotas::IngestChange {
            collection: collection.id,
            replacing: &replacing,
            watched: &watched,
            present: &present,
            adding: total_chunks,
        };
        shared::quotas::check_chunks(pool, ctx.tenant_id(), ctx.job_id(), change)
            .await
            .map_err(retryable)?
            .map_err(|over| JobError::Permanent(format!("it could not go on: {over}")))?;
        ctx.progress(0.0, format!("0/{total_chunks} chunks embedded"))
            .await;

        let mut embedded = 0;
        let mut rest = documents.into_iter().peekable();
        while rest.peek().is_some() {
            ctx.checkpoint()?;
            let mut group = Vec::new();
            let (mut size, mut weight) = (0, 0);
            while let Some((_, _, chunks, _)) = rest.peek() {
                // A document of no chunks still writes its row and metadata: it weighs one
                // (weighing none, any number of them went into one insert).
                let weighs = chunks.len().max(1);
                if !group.is_empty() && weight + weighs > GROUP_CHUNKS {
                    break;
                }
                size += chunks.len();
                weight += weighs;
                group.push(rest.next().expect("peeked"));
            }
            let model = embedder.clone();
            let texts: Vec<String> = group.iter().flat_map(|(_, _, c, _)| c.clone()).collect();
            let tokens: usize = group.iter().map(|(_, _, _, t)| t).sum();
            let phase = Instant::now();
            let mut vectors = ctx
                .blocking(move || {
                    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
                    model.embed(&texts)
                })
                .await
                .map_err(JobError::crashed)?
                .map_err(|e| JobError::Permanent(e.to_string()))?
                .into_iter();
            timings.embed_seconds += phase.elapsed().as_secs_f64();
            let indexed: Vec<store::IndexedDocument> = group
                .into_iter()
                .map(|(doc, hash, chunks, _)| store::IndexedDocument {
                    vectors: vectors.by_ref().take(chunks.len()).collect(),
                    id: doc.id,
                    content_hash: hash,
                    metadata: doc.metadata,
                    chunks,
                })
                .collect();
            // A cancel that arrived while embedding stores nothing more.
            ctx.checkpoint()?;
            let phase = Instant::now();
            let committing = ctx.committing().await?;
            store::replace_documents(pool, collection.id, ctx.job_id(), &indexed)
                .await
                .map_err(retryable)?;
            drop(committing);
            timings.store_seconds += phase.elapsed().as_secs_f64();
            embedded += size;
            Meter::add(&ctx.meter().chunks_embedded, size as i64);
            Meter::add(&ctx.meter().tokens_embedded, tokens as i64);
            ctx.progress(
                embedded as f32 / total_chunks.max(1) as f32,
                format!("{embedded}/{total_chunks} chunks embedded"),
            )
            .await;
        }
        // Only once everything present is indexed: a sync that failed half-way removes nothing.
        let mut deleted = 0;
        let phase = Instant::now();
        for ((field, source), present) in &watched_now {
            ctx.checkpoint()?;
            deleted += store::delete_gone(pool, collection.id, (field, source), present)
                .await
                .map_err(retryable)?;
        }
        timings.store_seconds += phase.elapsed().as_secs_f64();
        let seconds = started.elapsed().as_secs_f64();
        Ok(IngestOutput {
            collection_id: collection.id,
            documents: total_documents,
            indexed: total_documents - unchanged,
            unchanged,
            deleted,
            chunks: total_chunks,
            elapsed_ms: (seconds * 1000.0) as u64,
            chunks_per_second: (total_chunks as f64 / seconds.max(1e-9)).round(),
            timings,
        })
    }
}
