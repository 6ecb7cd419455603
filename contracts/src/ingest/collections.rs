//! Collections, their documents and chunks in PostgreSQL with pgvector, and the searches.

use chrono::{DateTime, Utc};
use pgvector::Vector;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sqlx::{PgPool, Postgres, QueryBuilder};
use utoipa::ToSchema;
use uuid::Uuid;

#[derive(Clone, Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct Collection {
    pub id: Uuid,
    #[serde(skip)]
    pub tenant_id: Uuid,
    pub name: String,
    /// The embedding model.
    pub model: String,
    /// Largest chunk, in the model's tokens.
    pub max_tokens: i32,
    /// Tokens consecutive chunks of a document share at most.
    pub overlap: i32,
    pub created_at: DateTime<Utc>,
    /// Documents indexed so far.
    pub documents: i64,
    /// Chunks indexed so far.
    pub chunks: i64,
}

/// The counts are the row's own, kept by triggers on `documents` (migration 20261220000001):
/// reading a collection reads no document.
const COLLECTION_COLUMNS: &str = "c.*";

/// A new collection, or `None` when the tenant already has one of that name.
pub async fn create_collection(
    pool: impl sqlx::PgExecutor<'_>,
    tenant: Uuid,
    name: &str,
    model: &str,
    max_tokens: i32,
    overlap: i32,
) -> sqlx::Result<Option<Collection>> {
    sqlx::query_as(
        "INSERT INTO collections (id, tenant_id, name, model, max_tokens, overlap)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (tenant_id, name) DO NOTHING
         RETURNING *",
    )
    .bind(Uuid::now_v7())
    .bind(tenant)
    .bind(name)
    .bind(model)
    .bind(max_tokens)
    .bind(overlap)
    .fetch_optional(pool)
    .await
}

/// The tenant's collection; another tenant's id reads as missing.
pub async fn get_collection(
    pool: &PgPool,
    tenant: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<Collection>> {
    sqlx::query_as(&format!(
        "SELECT {COLLECTION_COLUMNS} FROM collections c WHERE c.tenant_id = $1 AND c.id = $2"
    ))
    .bind(tenant)
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Newest first, `limit` after `cursor`.
pub async fn list_collections(
    pool: &PgPool,
    tenant: Uuid,
    cursor: Option<Uuid>,
    limit: i64,
) -> sqlx::Result<Vec<Collection>> {
    sqlx::query_as(&format!(
        "SELECT {COLLECTION_COLUMNS} FROM collections c
         WHERE c.tenant_id = $1 AND ($2::uuid IS NULL OR c.id < $2)
         ORDER BY c.id DESC LIMIT $3"
    ))
    .bind(tenant)
    .bind(cursor)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Deletes the collection with its documents and chunks.
pub async fn delete_collection(
    pool: impl sqlx::PgExecutor<'_>,
    tenant: Uuid,
    id: Uuid,
) -> sqlx::Result<bool> {
    shared::owned::Owned::new("collections", "id")
        .delete(pool, tenant, id)
        .await
}

/// The stored content hash of each of `ids` that the collection holds.
pub async fn document_hashes(
    pool: &PgPool,
    collection: Uuid,
    ids: &[String],
) -> sqlx::Result<Vec<(String, String)>> {
    sqlx::query_as(
        "SELECT id, content_hash FROM documents WHERE collection_id = $1 AND id = ANY($2)",
    )
    .bind(collection)
    .bind(ids)
    .fetch_all(pool)
    .await
}

/// Deletes the collection's documents (and their chunks) that came from a watched source
/// (their metadata's `field` is `source`: `watched_directory`, `watched_prefix`) and are not
/// in `present`; how many.
pub async fn delete_gone(
    pool: &PgPool,
    collection: Uuid,
    (field, source): (&str, &str),
    present: &[String],
) -> sqlx::Result<u64> {
    let mut tx = pool.begin().await?;
    lock_counts(&mut tx, collection).await?;
    let deleted = sqlx::query(
        "DELETE FROM documents WHERE collection_id = $1
           AND metadata ->> $2 = $3 AND NOT (id = ANY($4))",
    )
    .bind(collection)
    .bind(field)
    .bind(source)
    .bind(present)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(deleted.rows_affected())
}

/// Locks the collection's row, whose counts the statement triggers on `documents` update,
/// before any document row: a collection's delete locks in that order (its row, then its
/// documents by the cascade), so a writer locking documents first could deadlock with it.
async fn lock_counts(tx: &mut sqlx::PgConnection, collection: Uuid) -> sqlx::Result<()> {
    sqlx::query("SELECT 1 FROM collections WHERE id = $1 FOR NO KEY UPDATE")
        .bind(collection)
        .execute(tx)
        .await?;
    Ok(())
}

/// A document ready to store: its chunks and their vectors.
pub struct IndexedDocument {
    pub id: String,
    pub content_hash: String,
    pub metadata: Map<String, Value>,
    pub chunks: Vec<String>,
    pub vectors: Vec<Vec<f32>>,
}

/// Replaces the documents' chunks in one transaction: a reader sees each document's old
/// chunks or its new ones, never a mix, and a crash leaves the old ones.
pub async fn replace_documents(
    pool: &PgPool,
    collection: Uuid,
    job: Uuid,
    documents: &[IndexedDocument],
) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    let ids: Vec<&str> = documents.iter().map(|d| d.id.as_str()).collect();
    let hashes: Vec<&str> = documents.iter().map(|d| d.content_hash.as_str()).collect();
    let metadata: Vec<Value> = documents
        .iter()
        .map(|d| Value::Object(d.metadata.clone()))
        .collect();
    let counts: Vec<i32> = documents.iter().map(|d| d.chunks.len() as i32).collect();
    lock_counts(&mut tx, collection).await?;
    // Upserting the document rows first locks them: concurrent ingests of one document queue.
    sqlx::query(
        "INSERT INTO documents (collection_id, id, content_hash, metadata, chunks, job_id)
         SELECT $1, * , $6 FROM unnest($2::text[], $3::text[], $4::jsonb[], $5::int4[])
         ON CONFLICT (collection_id, id) DO UPDATE
         SET content_hash = excluded.content_hash, metadata = excluded.metadata,
             chunks = excluded.chunks, job_id = excluded.job_id, ingested_at = now()",
    )
    .bind(collection)
    .bind(&ids)
    .bind(&hashes)
    .bind(&metadata)
    .bind(&counts)
    .bind(job)
    .execute(&mut *tx)
    .await?;
    let deleted =
        sqlx::query("DELETE FROM chunks WHERE collection_id = $1 AND document_id = ANY($2)")
            .bind(collection)
            .bind(&ids)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    let mut document_ids = Vec::new();
    let mut ordinals = Vec::new();
    let mut texts = Vec::new();
    let mut chunk_metadata = Vec::new();
    let mut vectors = Vec::new();
    for (document, metadata) in documents.iter().zip(&metadata) {
        for (ordinal, (text, vector)) in document.chunks.iter().zip(&document.vectors).enumerate() {
            document_ids.push(document.id.as_str());
            ordinals.push(ordinal as i32);
            texts.push(text.as_str());
            chunk_metadata.push(metadata);
            vectors.push(Vector::from(vector.clone()));
        }
    }
    sqlx::query(
        "INSERT INTO chunks (collection_id, document_id, ordinal, text, metadata, embedding)
         SELECT $1, * FROM unnest($2::text[], $3::int4[], $4::text[], $5::jsonb[], $6::vector[])",
    )
    .bind(collection)
    .bind(&document_ids)
    .bind(&ordinals)
    .bind(&texts)
    .bind(&chunk_metadata)
    .bind(&vectors)
    .execute(&mut *tx)
    .await?;
    let grown = document_ids.len() as i64 - deleted as i64;
    shared::quotas::reserved_chunks_stored(&mut tx, job, grown).await?;
    tx.commit().await
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SearchMode {
    /// Nearest chunks by cosine similarity (HNSW index).
    Vector,
    /// PostgreSQL full-text search, ranked by `ts_rank_cd`.
    Keyword,
    /// Both, fused by reciprocal rank.
    #[default]
    Hybrid,
}

/// Metadata conditions, all of which must hold: `{"key": value}` (equality) or
/// `{"key": {"in": [v1, v2]}}`.
pub type Filter = Map<String, Value>;

#[derive(Clone, Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct Hit {
    pub chunk_id: i64,
    pub document_id: String,
    pub ordinal: i32,
    pub text: String,
    #[schema(value_type = Object)]
    pub metadata: sqlx::types::Json<Value>,
    /// Cosine similarity (vector), `ts_rank_cd` (keyword) or the fused reciprocal-rank score.
    pub score: f64,
}

/// Reciprocal rank fusion's constant (Cormack et al.): damps the weight of the top ranks.
const RRF_K: f64 = 60.0;

/// HNSW's candidate list for k <= 10, and the length of hybrid search's two ranked lists:
/// every control-plane session starts with it and with pgvector's iterative scans on
/// ([`shared::db::session_settings`]), so a search with k <= 10 is one statement in one round
/// trip; a larger k sets a larger list for its own transaction.
pub const DEFAULT_CANDIDATES: i64 = shared::db::HNSW_EF_SEARCH;

/// The expression the HNSW index is built on (migration 20261205000001): half-precision
/// copies of the unit vectors, half the index's size (so it stays in shared buffers far more
/// often), recall@10 within 1.5 points at 100k chunks (scripts/bench/search). Scores are
/// exact: the candidates are re-ranked by the full-precision distance.
const HALF_DISTANCE: &str = "embedding::halfvec(384) <=> ";

pub struct Search<'a> {
    /// The tenant asking: the statement itself checks that the collection is the tenant's.
    pub tenant: Uuid,
    pub collection: Uuid,
    pub query: &'a str,
    /// The query's embedding (vector and hybrid modes).
    pub vector: Option<Vec<f32>>,
    pub k: i64,
    pub mode: SearchMode,
    pub filter: &'a Filter,
}

/// Whether the tenant has the collection (the search route's check: no counts, one index probe).
pub async fn collection_exists(pool: &PgPool, tenant: Uuid, id: Uuid) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM collections WHERE id = $2 AND tenant_id = $1)")
        .bind(tenant)
        .bind(id)
        .fetch_one(pool)
        .await
}

/// One statement, no transaction when the session's HNSW settings fit (k <= 10). The
/// statement checks the tenant itself: another tenant's collection id finds nothing.
pub async fn search(pool: &PgPool, search: Search<'_>) -> sqlx::Result<Vec<Hit>> {
    let Some(mut sql) = search_statement(&search, "") else {
        return Ok(Vec::new());
    };
    let candidates = candidates(search.k);
    if candidates == DEFAULT_CANDIDATES {
        return sql.build_query_as().fetch_all(pool).await;
    }
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('hnsw.ef_search', $1, true)")
        .bind(candidates.to_string())
        .execute(&mut *tx)
        .await?;
    let hits = sql.build_query_as().fetch_all(&mut *tx).await?;
    tx.commit().await?;
    Ok(hits)
}

/// HNSW's candidate list, and the length of hybrid search's two ranked lists, for k results.
fn candidates(k: i64) -> i64 {
    (k * 10).clamp(DEFAULT_CANDIDATES, 1000)
}

/// The search's statement after `prefix` (`EXPLAIN` in tests); `None` when a mode that needs
/// the query's embedding has none. Limits are written as literals (validated integers), so
/// that a cached generic plan knows them as well as a custom one does.
pub fn search_statement<'a>(
    search: &Search<'a>,
    prefix: &str,
) -> Option<QueryBuilder<'a, Postgres>> {
    let candidates = candidates(search.k);
    let mut sql = QueryBuilder::<Postgres>::new(format!("{prefix}WITH "));
    let vector = search.vector.clone().map(Vector::from);
    let keyword = |sql: &mut QueryBuilder<'a, Postgres>, limit: i64| {
        sql.push("keyword AS (SELECT id, row_number() OVER (ORDER BY rank DESC, id) AS r, rank FROM (SELECT id, ts_rank_cd(tsv, q) AS rank FROM chunks, (SELECT ");
        push_any_word(sql, search.query);
        sql.push(" AS q) AS query WHERE tsv @@ q AND ");
        push_scope(sql, search);
        sql.push(format!(" ORDER BY rank DESC, id LIMIT {limit}) AS ranked)"));
    };
    // Materialised so that the index scan is planned on its own; its rows come back nearly
    // sorted (relaxed iterative scan) and are ranked by exact distance.
    let nearest = |sql: &mut QueryBuilder<'a, Postgres>, limit: i64, vector: &Vector| {
        sql.push("nearest AS MATERIALIZED (SELECT id, embedding <=> ");
        sql.push_bind(vector.clone());
        sql.push(" AS distance FROM chunks WHERE ");
        push_scope(sql, search);
        sql.push(" ORDER BY ");
        sql.push(HALF_DISTANCE);
        sql.push_bind(vector.clone());
        sql.push(format!(
            "::halfvec(384) LIMIT {limit}), vector AS (SELECT id, row_number() OVER (ORDER BY distance, id) AS r, 1 - distance AS similarity FROM nearest)"
        ));
    };
    match (search.mode, &vector) {
        (SearchMode::Keyword, _) => {
            keyword(&mut sql, search.k);
            sql.push(" SELECT c.id AS chunk_id, c.document_id, c.ordinal, c.text, c.metadata, s.rank::float8 AS score FROM keyword s JOIN chunks c USING (id) ORDER BY s.r");
        }
        (SearchMode::Vector, Some(vector)) => {
            nearest(&mut sql, search.k, vector);
            sql.push(" SELECT c.id AS chunk_id, c.document_id, c.ordinal, c.text, c.metadata, s.similarity AS score FROM vector s JOIN chunks c USING (id) ORDER BY s.r");
        }
        (SearchMode::Hybrid, Some(vector)) => {
            nearest(&mut sql, candidates, vector);
            sql.push(", ");
            fused_keyword(&mut sql, search, candidates);
            sql.push(" SELECT c.id AS chunk_id, c.document_id, c.ordinal, c.text, c.metadata, fused.score FROM (SELECT id, coalesce(1.0 / (");
            sql.push(RRF_K);
            sql.push(" + v.r), 0)::float8 + coalesce(1.0 / (");
            sql.push(RRF_K);
            sql.push(format!(" + k.r), 0)::float8 AS score FROM vector v FULL JOIN keyword k USING (id)) AS fused JOIN chunks c USING (id) ORDER BY fused.score DESC, c.id LIMIT {}", search.k));
        }
        (_, None) => return None,
    }
    Some(sql)
}

/// Hybrid search's keyword list. Ranking every chunk that shares one word with the query
/// costs time linear in the matches (a five-word query matched 4 % of 100,000 chunks: 40 ms
/// of heap reads and ranking), so the list ranks the chunks that hold at least two of the
/// query's lexemes (any pair, ORed: the GIN index answers it), then those of the vector
/// candidates that hold only one. A one-lexeme query ranks every match, as before. Only the
/// list's order counts in the fusion, and `ts_rank` orders matches as `ts_rank_cd` nearly
/// does at a sixth of the cost (cover density is quadratic in the query's words). Pairs are
/// made of the query's first 16 lexemes, in its order (at most 120); its first 32 count in the
/// ranking. The vector
/// candidates are read one by one by id (`OFFSET 0` keeps the planner from scanning every
/// one-word match to join them). Ties in rank go to the older chunk (lower id) before the
/// limit as after it: chunks that repeat a sentence tie by the hundred, and a limit over ties
/// alone would keep whichever the heap held first, so the same query could change its hits.
fn fused_keyword<'a>(sql: &mut QueryBuilder<'a, Postgres>, search: &Search<'a>, limit: i64) {
    sql.push("terms AS (SELECT ");
    push_any_word(sql, search.query);
    // Each lexeme quoted as tsquery input wants it: quotes and backslashes doubled.
    sql.push(
        r#" AS q, (SELECT string_agg(format('(%s & %s)', a, b), ' | ')::tsquery FROM unnest(l) WITH ORDINALITY AS x(a, i) JOIN unnest(l) WITH ORDINALITY AS y(b, j) ON i < j) AS pairs FROM (SELECT array(SELECT '''' || replace(replace(lexeme, '\', '\\'), '''', '''''') || '''' FROM unnest(to_tsvector('english', "#,
    );
    sql.push_bind(search.query.to_owned());
    sql.push(")) ORDER BY positions[1] LIMIT 16) AS l) AS lexemes), matched AS ((SELECT id, true AS strong, ts_rank(tsv, q) AS rank FROM chunks, terms WHERE tsv @@ coalesce(pairs, q) AND ");
    push_scope(sql, search);
    sql.push(format!(
        " ORDER BY rank DESC, id LIMIT {limit}) UNION ALL SELECT id, false, ts_rank(tsv, q) FROM nearest, terms, LATERAL (SELECT tsv FROM chunks WHERE chunks.id = nearest.id OFFSET 0) AS candidate WHERE tsv @@ q AND NOT tsv @@ pairs), \
         keyword AS (SELECT id, r FROM (SELECT id, row_number() OVER (ORDER BY strong DESC, rank DESC, id) AS r FROM matched) AS ranked WHERE r <= {limit})"
    ));
}

/// The tsquery matching any of the query's words (OR): a question rarely shares all its words.
fn push_any_word<'a>(sql: &mut QueryBuilder<'a, Postgres>, query: &'a str) {
    // Each lexeme quoted as tsquery input wants it: quotes and backslashes doubled.
    sql.push(
        r#"coalesce((SELECT string_agg('''' || replace(replace(lexeme, '\', '\\'), '''', '''''') || '''', ' | ')::tsquery FROM (SELECT lexeme FROM unnest(to_tsvector('english', "#,
    );
    sql.push_bind(query.to_owned());
    sql.push(format!(
        ")) ORDER BY positions[1] LIMIT {MAX_QUERY_LEXEMES}) AS first), ''::tsquery)"
    ));
}

/// The query's lexemes a keyword search matches and ranks by, the first in the query's order:
/// ranking by cover density costs the square of the query's words on every chunk that matches
/// one, and a query may hold hundreds (2,000 characters of distinct words).
const MAX_QUERY_LEXEMES: usize = 32;

/// `collection_id = ... AND` the metadata filter.
/// The tenant check is a one-time filter of the statement: with another tenant's collection
/// id the scans return nothing.
fn push_scope<'a>(sql: &mut QueryBuilder<'a, Postgres>, search: &Search<'a>) {
    sql.push("collection_id = ");
    sql.push_bind(search.collection);
    sql.push(" AND EXISTS (SELECT 1 FROM collections WHERE id = ");
    sql.push_bind(search.collection);
    sql.push(" AND tenant_id = ");
    sql.push_bind(search.tenant);
    sql.push(")");
    for (key, condition) in search.filter {
        match condition.get("in") {
            Some(Value::Array(values)) => {
                sql.push(" AND metadata -> ");
                sql.push_bind(key.clone());
                sql.push(" IN (SELECT jsonb_array_elements(");
                sql.push_bind(Value::Array(values.clone()));
                sql.push("))");
            }
            _ => {
                let mut equal = Map::new();
                equal.insert(key.clone(), condition.clone());
                sql.push(" AND metadata @> ");
                sql.push_bind(Value::Object(equal));
            }
        }
    }
}

/// Most conditions a filter may hold: each is a clause of the search's statement.
pub const MAX_FILTER_KEYS: usize = 32;

/// Most values one `in` condition may list.
pub const MAX_IN_VALUES: usize = 1000;

/// Why a filter is malformed or too large, or nothing.
pub fn check_filter(filter: &Filter) -> Result<(), String> {
    if filter.len() > MAX_FILTER_KEYS {
        return Err(format!(
            "at most {MAX_FILTER_KEYS} conditions, not {}",
            filter.len()
        ));
    }
    for (key, condition) in filter {
        // An array is matched by containment, each of its values against each of the
        // chunk's: as dear as an `in` of as many.
        let values = json_values(condition);
        if values > MAX_IN_VALUES {
            return Err(format!(
                "{key}: at most {MAX_IN_VALUES} values in a condition, not {values}"
            ));
        }
        if let Value::Object(operator) = condition {
            match operator.get("in") {
                Some(Value::Array(values)) if operator.len() == 1 && !values.is_empty() => {}
                _ => {
                    return Err(format!(
                        "{key}: a condition is a value (equality) or {{\"in\": [values]}}"
                    ))
                }
            }
        }
    }
    Ok(())
}

/// The values a condition holds, nested ones included: a scalar or an empty container is one.
fn json_values(value: &Value) -> usize {
    let held = match value {
        Value::Array(items) => items.iter().map(json_values).sum(),
        Value::Object(fields) => fields.values().map(json_values).sum(),
        _ => 1,
    };
    held.max(1)
}
