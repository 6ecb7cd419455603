//! A collection's `documents` and `chunks`: kept on its row by statement-level triggers on
//! `documents` (migration 20261220000001) through every write (an ingest, a re-ingest, a
//! watched source's deletions, the collection's delete), and read from there alone. On a
//! database of its own; no API process.

use contracts::ingest::collections::{self as store, IndexedDocument};
use serde_json::{json, Value};
use shared::testing::TestDatabase;
use sqlx::PgPool;
use uuid::Uuid;

async fn new_collection(db: &TestDatabase, tenant: Uuid, name: &str) -> Uuid {
    store::create_collection(&db.pool, tenant, name, "all-MiniLM-L6-v2", 200, 32)
        .await
        .unwrap()
        .expect("a new name")
        .id
}

/// A document `id` of `chunks` chunks, its metadata `metadata`, as an ingest stores it.
fn document(id: &str, chunks: usize, metadata: Value) -> IndexedDocument {
    let Value::Object(metadata) = metadata else {
        panic!("metadata is an object");
    };
    let seed = id
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    IndexedDocument {
        id: id.to_owned(),
        content_hash: format!("{id}:{chunks}"),
        metadata,
        chunks: (0..chunks).map(|o| format!("{id} chunk {o}")).collect(),
        vectors: (0..chunks as u64)
            .map(|o| crate::search::unit_vector(seed.wrapping_mul(1_000_003).wrapping_add(o)))
            .collect(),
    }
}

/// The collection's counts as the API reads them equal both `expected` and what its
/// `documents` and `chunks` rows are.
async fn assert_counts(pool: &PgPool, tenant: Uuid, collection: Uuid, expected: (i64, i64)) {
    let read = store::get_collection(pool, tenant, collection)
        .await
        .unwrap()
        .expect("the collection");
    let held: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM documents WHERE collection_id = $1),
                (SELECT count(*) FROM chunks WHERE collection_id = $1)",
    )
    .bind(collection)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(held, expected, "the rows");
    assert_eq!((read.documents, read.chunks), expected, "the counts read");
}

/// The tenant's chunks, as `GET /v1/tenant` and the `max_chunks` quota count them.
async fn tenant_chunks(pool: &PgPool, tenant: Uuid) -> i64 {
    let mut conn = pool.acquire().await.unwrap();
    shared::quotas::usage(&mut conn, tenant)
        .await
        .unwrap()
        .chunks
}

#[tokio::test]
async fn collection_counts_follow_every_write() {
    let db = TestDatabase::new().await;
    let tenant = db.tenant().await;
    let notes = new_collection(&db, tenant, "notes").await;
    let other = new_collection(&db, tenant, "other").await;
    assert_counts(&db.pool, tenant, notes, (0, 0)).await;

    // A first ingest: 40 documents of 25 chunks, 10 of them from a watched directory. The
    // collection's row is updated once (the upsert's insert), not once a document or a chunk.
    let watched = json!({"watched_directory": "inbox"});
    let first: Vec<IndexedDocument> = (0..40)
        .map(|i| {
            let metadata = if i < 10 { watched.clone() } else { json!({}) };
            document(&format!("d{i}"), 25, metadata)
        })
        .collect();
    let one = shared::db::connect(&db.url, 1).await.unwrap();
    let updates = || db.table_stat(&one, "collections", "n_tup_upd");
    let before = updates().await;
    store::replace_documents(&one, notes, Uuid::now_v7(), &first)
        .await
        .unwrap();
    let updated = updates().await - before;
    assert_eq!(
        updated, 1,
        "updates of the collection's row for 40 documents"
    );
    assert_counts(&db.pool, tenant, notes, (40, 1000)).await;
    store::replace_documents(
        &db.pool,
        other,
        Uuid::now_v7(),
        &[document("x", 3, json!({}))],
    )
    .await
    .unwrap();
    assert_counts(&db.pool, tenant, other, (1, 3)).await;
    assert_eq!(tenant_chunks(&db.pool, tenant).await, 1003);

    // A re-ingest, one upsert of updated and new documents: d0 shrinks to 5 chunks, d1 grows
    // to 30, d2 keeps 25, d40 is new with 2, d10 is emptied (a document of no chunks).
    let again = [
        document("d0", 5, watched.clone()),
        document("d1", 30, watched.clone()),
        document("d2", 25, watched.clone()),
        document("d40", 2, json!({})),
        document("d10", 0, json!({})),
    ];
    store::replace_documents(&db.pool, notes, Uuid::now_v7(), &again)
        .await
        .unwrap();
    assert_counts(&db.pool, tenant, notes, (41, 1000 - 20 + 5 + 2 - 25)).await;

    // The watched directory now holds d0 and d1 only: d2..d9 are deleted (their chunks by
    // the cascade from documents).
    let present = vec!["d0".to_owned(), "d1".to_owned()];
    let gone = store::delete_gone(&db.pool, notes, ("watched_directory", "inbox"), &present)
        .await
        .unwrap();
    assert_eq!(gone, 8);
    assert_counts(&db.pool, tenant, notes, (33, 962 - 8 * 25)).await;
    assert_eq!(tenant_chunks(&db.pool, tenant).await, 762 + 3);

    // The collection's delete cascades to its documents and their chunks; the tenant's
    // chunks are the other collection's alone.
    assert!(store::delete_collection(&db.pool, tenant, notes)
        .await
        .unwrap());
    assert!(store::get_collection(&db.pool, tenant, notes)
        .await
        .unwrap()
        .is_none());
    let left: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM documents WHERE collection_id = $1),
                (SELECT count(*) FROM chunks WHERE collection_id = $1)",
    )
    .bind(notes)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(left, (0, 0));
    assert_counts(&db.pool, tenant, other, (1, 3)).await;
    assert_eq!(tenant_chunks(&db.pool, tenant).await, 3);
}

/// Reading a collection (`GET /v1/collections/{id}`, every ingest submission's preflight, an
/// ingest job's start) and listing them read the counts from the collection's row: each read
/// counted the collection's documents twice (how many, and the sum of their chunks).
#[tokio::test]
async fn collection_counts_are_read_without_reading_documents() {
    let db = TestDatabase::new().await;
    let tenant = db.tenant().await;
    let collection = new_collection(&db, tenant, "big").await;
    let documents: Vec<IndexedDocument> = (0..500)
        .map(|i| document(&format!("d{i}"), 2, json!({})))
        .collect();
    store::replace_documents(&db.pool, collection, Uuid::now_v7(), &documents)
        .await
        .unwrap();
    sqlx::query("ANALYZE documents")
        .execute(&db.pool)
        .await
        .unwrap();
    let one = shared::db::connect(&db.url, 1).await.unwrap();
    let rows_read = || db.rows_read(&one, "documents");
    let before = rows_read().await;
    let read = store::get_collection(&one, tenant, collection)
        .await
        .unwrap()
        .expect("the collection");
    let listed = store::list_collections(&one, tenant, None, 10)
        .await
        .unwrap();
    let scanned = rows_read().await - before;
    assert_eq!((read.documents, read.chunks), (500, 1000));
    assert_eq!((listed[0].documents, listed[0].chunks), (500, 1000));
    assert_eq!(
        scanned, 0,
        "{scanned} rows of documents read for the counts"
    );
}

/// Migration 20261222000001 counts every collection again, the collection locked before its
/// documents: counts off by whatever (here set by hand) are the documents' own after it, and
/// an empty collection's are zero.
#[tokio::test]
async fn the_recount_migration_sets_every_collections_counts_to_its_documents() {
    let db = TestDatabase::new().await;
    let tenant = db.tenant().await;
    let notes = new_collection(&db, tenant, "notes").await;
    let empty = new_collection(&db, tenant, "empty").await;
    let documents = [document("a", 4, json!({})), document("b", 2, json!({}))];
    store::replace_documents(&db.pool, notes, Uuid::now_v7(), &documents)
        .await
        .unwrap();
    sqlx::query("UPDATE collections SET documents = 99, chunks = -7")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::raw_sql(include_str!(
        "../../../migrations/20261222000001_collection_counts_recounted.sql"
    ))
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_counts(&db.pool, tenant, notes, (2, 6)).await;
    assert_counts(&db.pool, tenant, empty, (0, 0)).await;
}
