//! Collections, the `ingest` job and search: documents in, the right chunks out.

use crate::harness::TestApp;
use reqwest::StatusCode;
use serde_json::{json, Value};
use shared::datasets::{Compression, Dataset, Format};
use std::time::Duration;
use uuid::Uuid;

/// A small corpus: (id, topic, text, a paraphrase that shares few of its words).
pub(crate) const CORPUS: &[(&str, &str, &str, &str)] = &[
    ("passwords", "account",
     "To reset your password, open Settings, choose Security and click Forgot password. A reset link is emailed to you and expires after one hour.",
     "I can't remember my login credentials, how do I get new ones?"),
    ("refunds", "orders",
     "Refunds are issued to the original payment method within five business days after we receive the returned item.",
     "How long until I get my money back for a product I sent back?"),
    ("shipping", "orders",
     "Orders over fifty dollars ship free. Standard delivery takes three to seven days; express delivery arrives the next day.",
     "Is postage free, and how fast will my parcel arrive?"),
    ("photosynthesis", "science",
     "Plants convert sunlight, water and carbon dioxide into glucose and oxygen inside their chloroplasts.",
     "How do green plants make food out of light?"),
    ("volcano", "science",
     "A volcano erupts when magma from the mantle rises through cracks in the crust and escapes as lava and ash.",
     "What makes molten rock burst out of a mountain?"),
    ("rust", "software",
     "Rust's ownership model and borrow checker prevent data races and use-after-free bugs at compile time, without a garbage collector.",
     "Which programming language guarantees memory safety with no GC?"),
    ("bread", "cooking",
     "Knead the dough for ten minutes, let it rise for an hour somewhere warm, then bake at 220 degrees until the crust is golden.",
     "Instructions for baking a loaf at home"),
    ("football", "sport",
     "The striker scored twice in the second half, and the home team won the championship final three to one.",
     "Who won the soccer cup match?"),
    ("sleep", "health",
     "Adults need seven to nine hours of sleep a night; a regular bedtime and a dark, cool bedroom improve its quality.",
     "Tips for resting better at night"),
    ("mars", "science",
     "The rover landed in Jezero crater to search Mars for signs of ancient microbial life and to collect rock samples.",
     "A robot exploring the red planet for evidence of life"),
];

/// Stores a dataset of the "acme" tenant as the upload route does: the file where the object
/// store keeps it, then its row.
async fn add_dataset(app: &TestApp, name: &str, format: Format, bytes: &[u8]) -> Uuid {
    let tenant = app.tenant_id("acme").await;
    let id = Uuid::now_v7();
    let objects = shared::objects::ObjectStore::new(&app.settings.data_dir);
    let scratch = objects.scratch_path().await.unwrap();
    std::fs::write(&scratch, bytes).unwrap();
    objects.put_dataset(&scratch, tenant, id).await.unwrap();
    let dataset = Dataset {
        id,
        tenant_id: tenant,
        name: name.into(),
        format,
        compression: Compression::None,
        size_bytes: bytes.len() as i64,
        sha256: String::new(),
        schema: sqlx::types::Json(vec![]),
        preview: sqlx::types::Json(vec![]),
        created_at: chrono::Utc::now(),
    };
    shared::datasets::insert(app.pool(), &dataset)
        .await
        .unwrap();
    id
}

pub(crate) async fn create_collection(app: &TestApp, body: Value) -> Uuid {
    let (status, collection) = app.post("/v1/collections", &body).await;
    assert_eq!(status, StatusCode::CREATED, "{collection}");
    collection["id"].as_str().unwrap().parse().unwrap()
}

/// Ingests `payload`, waits for the job; asserts it succeeded.
pub(crate) async fn ingest(app: &TestApp, payload: Value) -> Value {
    let job = app.run_job("ingest", payload).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    job
}

/// Fires the schedule now (as its time would), and waits for its `n`th job, which succeeds.
pub(crate) async fn sync_now(app: &TestApp, schedule: &str, n: usize) -> Value {
    sqlx::query("UPDATE schedules SET next_fire_at = now() WHERE id = $1::uuid")
        .bind(schedule)
        .execute(app.pool())
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let job: Uuid = loop {
        let (_, page) = app.get(&format!("/v1/schedules/{schedule}/jobs")).await;
        let jobs = page["jobs"].as_array().unwrap();
        if jobs.len() == n {
            break jobs[0]["id"].as_str().unwrap().parse().unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "firing {n}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let job = app
        .wait_status(job, &["succeeded", "failed"], Duration::from_secs(120))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    job
}

pub(crate) async fn search(app: &TestApp, collection: Uuid, body: Value) -> Vec<Value> {
    let (status, found) = app
        .post(&format!("/v1/collections/{collection}/search"), &body)
        .await;
    assert_eq!(status, StatusCode::OK, "{found}");
    found["results"].as_array().unwrap().clone()
}

pub(crate) fn document_ids(results: &[Value]) -> Vec<&str> {
    results
        .iter()
        .map(|r| r["document_id"].as_str().unwrap())
        .collect()
}

/// The corpus through every kind of source: inline text, HTML and Markdown, an NDJSON dataset
/// and a CSV dataset.
async fn ingest_corpus(app: &TestApp, collection: Uuid) -> Value {
    let inline = |i: usize, format: &str, text: String| {
        let (id, topic, _, _) = CORPUS[i];
        json!({"id": id, "text": text, "format": format, "metadata": {"topic": topic, "lang": "en"}})
    };
    let mut documents = vec![
        inline(0, "text", CORPUS[0].2.to_owned()),
        inline(1, "html", format!("<html><body><h1>Refunds</h1><p>{}</p><script>var refund = 1;</script></body></html>", CORPUS[1].2)),
        inline(2, "markdown", format!("# Shipping\n\n{}", CORPUS[2].2)),
    ];
    let ndjson: String = CORPUS[3..7]
        .iter()
        .map(|(id, topic, text, _)| {
            json!({"key": id, "body": text, "topic": topic, "lang": "en"}).to_string() + "\n"
        })
        .collect();
    let records = add_dataset(app, "notes.ndjson", Format::Ndjson, ndjson.as_bytes()).await;
    documents.push(json!({"dataset_id": records, "text_field": "body", "id_field": "key"}));
    let mut csv = "name,topic,text\n".to_owned();
    for (id, topic, text, _) in &CORPUS[7..] {
        csv.push_str(&format!("{id},{topic},\"{text}\"\n"));
    }
    let table = add_dataset(app, "more.csv", Format::Csv, csv.as_bytes()).await;
    documents.push(json!({"dataset_id": table, "id_field": "name", "metadata": {"lang": "en"}}));
    ingest(
        app,
        json!({"collection_id": collection, "documents": documents}),
    )
    .await
}

#[tokio::test]
async fn ingested_documents_are_found_by_paraphrase_keyword_and_both() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("ingest", 1)]).await;
    let collection = create_collection(&app, json!({"name": "help"})).await;
    let job = ingest_corpus(&app, collection).await;
    let result = &job["result"];
    assert_eq!(result["documents"], 10, "{job}");
    assert_eq!(result["indexed"], 10, "{job}");
    assert_eq!(result["chunks"], 10, "one chunk each: {job}");
    // Where the time went: every phase measured, together within the job's elapsed time.
    let phases = ["read", "chunk", "embed", "store"]
        .map(|p| result["timings"][format!("{p}_seconds")].as_f64());
    assert!(phases.iter().all(|p| p.is_some_and(|s| s >= 0.0)), "{job}");
    let spent: f64 = phases.iter().flatten().sum();
    let elapsed = result["elapsed_ms"].as_f64().unwrap() / 1000.0;
    assert!(
        spent > 0.0 && spent <= elapsed + 0.01,
        "{spent} of {elapsed}: {job}"
    );
    assert!(
        phases[2].unwrap() > 0.0,
        "ten chunks take time to embed: {job}"
    );
    assert_eq!(job["progress"], 1.0);
    assert_eq!(job["message"], "10/10 chunks embedded");
    let (_, stats) = app.get(&format!("/v1/collections/{collection}")).await;
    assert_eq!(
        (stats["documents"].as_i64(), stats["chunks"].as_i64()),
        (Some(10), Some(10))
    );

    // Every paraphrase finds its source in the top 3 by meaning alone, and first in hybrid.
    for (id, _, _, paraphrase) in CORPUS {
        let found = search(
            &app,
            collection,
            json!({"query": paraphrase, "k": 3, "mode": "vector"}),
        )
        .await;
        assert!(
            document_ids(&found).contains(id),
            "{paraphrase:?} → {:?}",
            document_ids(&found)
        );
        let scores: Vec<f64> = found.iter().map(|r| r["score"].as_f64().unwrap()).collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    }
    // HTML lost its markup, the script's words included; metadata came from records and payload.
    let html = search(
        &app,
        collection,
        json!({"query": "refund", "mode": "keyword"}),
    )
    .await;
    assert_eq!(document_ids(&html), ["refunds"]);
    assert!(!html[0]["text"].as_str().unwrap().contains('<'));
    assert!(!html[0]["text"].as_str().unwrap().contains("var refund"));
    let found = search(
        &app,
        collection,
        json!({"query": "Jezero crater", "mode": "keyword"}),
    )
    .await;
    assert_eq!(document_ids(&found), ["mars"]);
    assert_eq!(
        found[0]["metadata"],
        json!({"topic": "science", "lang": "en"})
    );

    // Hybrid: a document first in both lists scores 2/(60+1); one in a single list less.
    let found = search(
        &app,
        collection,
        json!({"query": "borrow checker garbage collector", "k": 5}),
    )
    .await;
    assert_eq!(found[0]["document_id"], "rust");
    assert!(
        (found[0]["score"].as_f64().unwrap() - 2.0 / 61.0).abs() < 1e-9,
        "{found:?}"
    );
    assert!(found[1..]
        .iter()
        .all(|r| r["score"].as_f64().unwrap() <= 1.0 / 61.0 + 1e-9));
    // Two topics in one query: keyword finds each by its word, fusion puts both on top.
    let found = search(
        &app,
        collection,
        json!({"query": "magma and dough", "k": 4}),
    )
    .await;
    let mut top: Vec<&str> = document_ids(&found)[..2].to_vec();
    top.sort();
    assert_eq!(top, ["bread", "volcano"], "{found:?}");

    // Filters: equality and `in`, on payload metadata and on record fields.
    let science = search(&app, collection, json!({"query": "life on other planets", "k": 10, "mode": "vector", "filter": {"topic": "science"}})).await;
    let mut ids = document_ids(&science);
    ids.sort();
    assert_eq!(ids, ["mars", "photosynthesis", "volcano"]);
    let orders = search(&app, collection, json!({"query": "money", "k": 10, "filter": {"topic": {"in": ["orders", "sport"]}, "lang": "en"}})).await;
    let mut ids = document_ids(&orders);
    ids.sort();
    assert_eq!(ids, ["football", "refunds", "shipping"]);
    let none = search(
        &app,
        collection,
        json!({"query": "money", "filter": {"lang": "fr"}}),
    )
    .await;
    assert!(none.is_empty());
}

/// Documents uploaded through the API (Markdown, PDF) are ingested and found; they are not
/// tables, so an import refuses them.
/// A NUL character in a document's text, id or metadata (from a tenant's file) is stored as
/// U+FFFD: PostgreSQL stores none, and the group's insert failed on each attempt, its
/// embedding redone each time, until the job failed.
#[tokio::test]
async fn documents_with_nul_characters_are_indexed() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("ingest", 1)]).await;
    let text = app
        .upload_dataset("nul.txt", b"tyre \0 pressure guide")
        .await;
    let records = app
        .upload_dataset(
            "nul.ndjson",
            br#"{"id": "r\u00001", "text": "pump \u0000 valve", "tag": "a\u0000b"}"#,
        )
        .await;
    let collection = create_collection(&app, json!({"name": "nul"})).await;
    let job = ingest(
        &app,
        json!({"collection_id": collection, "documents": [
            {"dataset_id": text, "id": "text"}, {"dataset_id": records, "id": "records"}]}),
    )
    .await;
    assert_eq!(job["result"]["indexed"], 2, "{job}");
    let found = search(
        &app,
        collection,
        json!({"query": "tyre", "mode": "keyword"}),
    )
    .await;
    assert_eq!(document_ids(&found), ["text"]);
    let found = search(
        &app,
        collection,
        json!({"query": "valve", "mode": "keyword"}),
    )
    .await;
    assert_eq!(document_ids(&found), ["records:1"]);
}

/// A document whose chunks, with their vectors and copies of its metadata, would pass what a
/// document may hold fails before it is embedded, naming it: one large document went whole
/// into one embedding and one insert (64 MiB at 16 tokens a chunk: GBs in the worker).
#[tokio::test]
async fn a_document_of_too_many_chunks_fails_before_it_is_embedded() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("ingest", 1)]).await;
    let collection = create_collection(
        &app,
        json!({"name": "tiny", "chunking": {"max_tokens": 16, "overlap": 0}}),
    )
    .await;
    let metadata = json!({"pad": "x".repeat(4000)});
    let huge = app
        .upload_dataset("huge.txt", "a ".repeat(200_000).as_bytes())
        .await;
    let job = app
        .run_job(
            "ingest",
            json!({"collection_id": collection, "documents": [
                {"id": "small", "text": "tyre pressure", "metadata": metadata},
                {"id": "huge", "dataset_id": huge, "metadata": metadata}]}),
        )
        .await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("document \"huge\" makes"), "{error}");
    assert!(error.contains("max_tokens"), "{error}");
    assert_eq!(job["result"]["timings"]["embed_seconds"], Value::Null);
    let chunks: i64 = sqlx::query_scalar("SELECT count(*) FROM chunks")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(chunks, 0, "nothing of the job is stored");
}

/// A delete of a collection another transaction holds (an ingest writing to it) answers 409
/// after a few seconds: deletes waited for ever, each holding one of the API's connections.
#[tokio::test]
async fn a_held_collection_is_not_waited_on_for_ever_by_its_delete() {
    let app = TestApp::spawn().await;
    let collection = create_collection(&app, json!({"name": "held"})).await;
    let mut holder = app.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM collections WHERE id = $1 FOR NO KEY UPDATE")
        .bind(collection)
        .execute(&mut *holder)
        .await
        .unwrap();
    let (status, problem) = tokio::time::timeout(
        Duration::from_secs(20),
        app.delete_answered(&format!("/v1/collections/{collection}")),
    )
    .await
    .expect("the delete answers while the collection is held");
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    holder.rollback().await.unwrap();
    assert_eq!(
        app.delete(&format!("/v1/collections/{collection}")).await,
        StatusCode::NO_CONTENT
    );
}

/// An ingest whose documents would take the tenant past `max_chunks` fails once they are
/// counted, before any is embedded or stored: the quota was checked only when the attempt
/// started, against what was stored, and one job passed it by all it made.
#[tokio::test]
async fn an_ingest_past_max_chunks_fails_before_it_stores_any() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("ingest", 1)]).await;
    let tenant = app.tenant_id("acme").await;
    sqlx::query("INSERT INTO tenant_limits (tenant_id, max_chunks) VALUES ($1, 20)")
        .bind(tenant)
        .execute(app.pool())
        .await
        .unwrap();
    let collection = create_collection(
        &app,
        json!({"name": "quota", "chunking": {"max_tokens": 16, "overlap": 0}}),
    )
    .await;
    let job = app
        .run_job(
            "ingest",
            json!({"collection_id": collection,
                   "documents": [{"id": "long", "text": "a ".repeat(800)}]}),
        )
        .await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("max_chunks"), "{error}");
    let chunks: i64 = sqlx::query_scalar("SELECT count(*) FROM chunks")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(chunks, 0);
    // Within the quota, it goes; and a document replaced gives back its chunks (counted with
    // the ones replacing them, they pass the quota).
    let first = ingest(
        &app,
        json!({"collection_id": collection,
               "documents": [{"id": "short", "text": "a ".repeat(100)}]}),
    )
    .await;
    let second = ingest(
        &app,
        json!({"collection_id": collection,
               "documents": [{"id": "short", "text": "b ".repeat(210)}]}),
    )
    .await;
    let chunks = |job: &Value| job["result"]["chunks"].as_i64().unwrap();
    assert!(chunks(&first) + chunks(&second) > 20, "{first} {second}");
}

/// Documents with no text are stored in bounded groups too: weighing no chunks, any number of
/// them (each with its metadata) went into one insert, one transaction.
#[tokio::test]
async fn documents_without_text_are_stored_in_bounded_groups() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("ingest", 1)]).await;
    let records: String = (0..600)
        .map(|i| format!("{{\"id\": \"{i}\", \"text\": \"\"}}\n"))
        .collect();
    let empty = app.upload_dataset("empty.ndjson", records.as_bytes()).await;
    let collection = create_collection(&app, json!({"name": "empty"})).await;
    let job = ingest(
        &app,
        json!({"collection_id": collection, "documents": [{"dataset_id": empty, "id": "e"}]}),
    )
    .await;
    // Each group's transaction stamps its documents with its own `now()`.
    let groups: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT ingested_at) FROM documents WHERE collection_id = $1",
    )
    .bind(collection)
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert!(groups >= 3, "600 documents in {groups} groups: {job}");
}

#[tokio::test]
async fn uploaded_markdown_and_pdf_documents_are_searchable() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("ingest", 1)]).await;
    let pdf = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../jobs/fixtures/ingest/manual.pdf"
    ));
    let manual = app.upload_dataset("manual.pdf", pdf).await;
    let guide = app
        .upload_dataset(
            "guide.md",
            b"# Tyres\n\nInflate the tyres to the pressure printed on the sidewall.\n",
        )
        .await;
    let (_, dataset) = app.get(&format!("/v1/datasets/{manual}")).await;
    assert_eq!(dataset["format"], "document", "{dataset}");
    let collection = create_collection(&app, json!({"name": "garage"})).await;
    let job = ingest(
        &app,
        json!({"collection_id": collection, "documents": [
            {"dataset_id": manual, "id": "manual"}, {"dataset_id": guide, "id": "guide"}]}),
    )
    .await;
    assert_eq!(job["result"]["indexed"], 2, "{job}");
    let found = search(
        &app,
        collection,
        json!({"query": "pilot jet clogged", "mode": "keyword"}),
    )
    .await;
    assert_eq!(document_ids(&found), ["manual"]);
    let found = search(
        &app,
        collection,
        json!({"query": "how hard should I pump up my tires", "k": 1, "mode": "vector"}),
    )
    .await;
    assert_eq!(document_ids(&found), ["guide"]);

    let (status, problem) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "import", "payload": {"dataset_id": guide, "target": {"table": "t"}}}),
        )
        .await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(
        problem["errors"][0]["field"], "payload.dataset_id",
        "{problem}"
    );
}

#[tokio::test]
async fn reingesting_skips_unchanged_documents_and_replaces_changed_ones() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("ingest", 1)]).await;
    let collection = create_collection(
        &app,
        json!({"name": "small chunks", "chunking": {"max_tokens": 16, "overlap": 4}}),
    )
    .await;
    let text = CORPUS.iter().map(|c| c.2).collect::<Vec<_>>().join("\n\n");
    let payload = |text: &str| {
        json!({"collection_id": collection, "documents": [
            {"id": "all", "text": text},
            {"id": "short", "text": "Just one line.", "metadata": {"n": 1}},
        ]})
    };
    let first = ingest(&app, payload(&text)).await;
    let chunks = first["result"]["chunks"].as_i64().unwrap();
    assert!(chunks > 20, "{first}");
    let stored = |app: &TestApp| {
        let pool = app.pool().clone();
        async move {
            sqlx::query_as::<_, (String, i64)>(
                "SELECT document_id, count(*) FROM chunks WHERE collection_id = $1
                 GROUP BY document_id ORDER BY document_id",
            )
            .bind(collection)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(
        stored(&app).await,
        [("all".into(), chunks - 1), ("short".into(), 1)]
    );

    let again = ingest(&app, payload(&text)).await;
    assert_eq!(
        (
            again["result"]["indexed"].as_i64(),
            again["result"]["unchanged"].as_i64()
        ),
        (Some(0), Some(2)),
        "{again}"
    );
    assert_eq!(
        stored(&app).await,
        [("all".into(), chunks - 1), ("short".into(), 1)]
    );

    let changed = ingest(&app, payload("A completely different, much shorter text.")).await;
    assert_eq!(changed["result"]["indexed"], 1, "{changed}");
    assert_eq!(stored(&app).await, [("all".into(), 1), ("short".into(), 1)]);
    let old = search(
        &app,
        collection,
        json!({"query": "Jezero crater", "mode": "keyword"}),
    )
    .await;
    assert!(old.is_empty(), "old chunks are gone: {old:?}");
}

#[tokio::test]
async fn a_killed_ingest_is_retried_and_indexes_each_document_once() {
    let app = TestApp::spawn().await;
    let collection = create_collection(
        &app,
        json!({"name": "big", "chunking": {"max_tokens": 32, "overlap": 8}}),
    )
    .await;
    // Enough documents for several transactions of chunks.
    let records: String = (0..300)
        .map(|i| {
            let (_, topic, text, _) = CORPUS[i % CORPUS.len()];
            let text = format!("Document {i}. {text} {text}");
            json!({"id": format!("doc-{i}"), "text": text, "topic": topic}).to_string() + "\n"
        })
        .collect();
    let dataset = add_dataset(&app, "docs.ndjson", Format::Ndjson, records.as_bytes()).await;
    let mut victim = app.spawn_worker_process("ingest=1");
    let payload = json!({"collection_id": collection,
                         "documents": [{"dataset_id": dataset, "id_field": "id"}]});
    let (status, job) = app
        .post("/v1/jobs", &json!({"kind": "ingest", "payload": payload}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    // Kill it once some, not all, documents are stored.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let progress = app.job(id).await["progress"].as_f64().unwrap();
        if progress > 0.0 {
            assert!(
                progress < 1.0,
                "finished before the kill: make the job bigger"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    victim.kill().unwrap();
    victim.wait().unwrap();
    let partial: i64 =
        sqlx::query_scalar("SELECT count(*) FROM documents WHERE collection_id = $1")
            .bind(collection)
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert!(partial < 300, "{partial}");

    let _rescuer = app.spawn_worker_process("ingest=1");
    let job = app
        .wait_status(id, &["succeeded", "failed"], Duration::from_secs(120))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempt"], 2, "{job}");
    assert_eq!(
        job["result"]["unchanged"], partial,
        "stored documents were skipped: {job}"
    );
    // Every document once, with exactly the chunks its row counts, numbered without gaps.
    let (documents, mismatched): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE d.chunks <> c.n OR c.max_ordinal <> c.n - 1)
         FROM documents d
         JOIN (SELECT document_id, count(*) AS n, max(ordinal) AS max_ordinal FROM chunks
               WHERE collection_id = $1 GROUP BY document_id) c ON c.document_id = d.id
         WHERE d.collection_id = $1",
    )
    .bind(collection)
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!((documents, mismatched), (300, 0));
}

#[tokio::test]
async fn collections_belong_to_their_tenant() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("ingest", 1)]).await;
    let ours = create_collection(&app, json!({"name": "ours"})).await;
    ingest(
        &app,
        json!({"collection_id": ours, "documents": [{"id": "a", "text": CORPUS[0].2}]}),
    )
    .await;
    let (status, _) = app.post("/v1/collections", &json!({"name": "ours"})).await;
    assert_eq!(status, StatusCode::CONFLICT);

    let other = app.key_for("globex").await;
    let as_other = |method: reqwest::Method, path: String, body: Option<Value>| {
        let mut request = app
            .client
            .request(method, app.url(&path))
            .bearer_auth(&other);
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move { request.send().await.unwrap() }
    };
    let response = as_other(
        reqwest::Method::GET,
        format!("/v1/collections/{ours}"),
        None,
    )
    .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = as_other(
        reqwest::Method::POST,
        format!("/v1/collections/{ours}/search"),
        Some(json!({"query": "password"})),
    )
    .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = as_other(
        reqwest::Method::DELETE,
        format!("/v1/collections/{ours}"),
        None,
    )
    .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = as_other(reqwest::Method::POST, "/v1/jobs".into(), Some(json!({"kind": "ingest", "payload": {"collection_id": ours, "documents": [{"id": "x", "text": "x"}]}}))).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    // The other tenant's own collection of the same name is theirs alone.
    let response = as_other(
        reqwest::Method::POST,
        "/v1/collections".into(),
        Some(json!({"name": "ours"})),
    )
    .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let list: Value = as_other(reqwest::Method::GET, "/v1/collections".into(), None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["collections"].as_array().unwrap().len(), 1);
    assert_eq!(list["collections"][0]["documents"], 0);

    let (_, list) = app.get("/v1/collections").await;
    assert_eq!(list["collections"][0]["id"], ours.to_string());
    assert_eq!(list["collections"][0]["chunks"], 1);
    let status = app.delete(&format!("/v1/collections/{ours}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = app.get(&format!("/v1/collections/{ours}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM chunks WHERE collection_id = $1")
        .bind(ours)
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn bad_requests_name_their_fault() {
    let app = TestApp::spawn().await;
    let collection = create_collection(&app, json!({"name": "c"})).await;
    let fields = |problem: &Value| -> Vec<String> {
        problem["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap().to_owned())
            .collect()
    };
    let (status, problem) = app
        .post(
            "/v1/collections",
            &json!({"name": "", "model": "gpt", "chunking": {"max_tokens": 300, "overlap": 10}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(fields(&problem), ["name", "model", "chunking.max_tokens"]);
    let (_, problem) = app
        .post(
            "/v1/collections",
            &json!({"name": "d", "chunking": {"max_tokens": 100, "overlap": 60}}),
        )
        .await;
    assert_eq!(fields(&problem), ["chunking.overlap"]);

    let app = &app;
    let submit = |payload: Value| async move {
        app.post("/v1/jobs", &json!({"kind": "ingest", "payload": payload}))
            .await
    };
    let (status, problem) = submit(json!({"collection_id": collection, "documents": [
        {"text": "no id"},
        {"id": "both", "text": "x", "dataset_id": Uuid::now_v7()},
        {"id": "x", "text": "x", "format": "csv"},
        {"id": "x", "text": "x", "text_field": "body"},
    ]}))
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert_eq!(
        fields(&problem),
        [
            "payload.documents[0].id",
            "payload.documents[1]",
            "payload.documents[2].format",
            "payload.documents[3].text_field",
        ]
    );
    let (status, problem) = submit(json!({"collection_id": collection, "documents": []})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(fields(&problem), ["payload.documents"]);
    let (status, problem) = submit(
        json!({"collection_id": collection, "documents": [{"id": "a", "text": "a", "colour": 1}]}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        fields(&problem)[0].starts_with("payload.documents[0]"),
        "{problem}"
    );
    let (status, problem) =
        submit(json!({"collection_id": Uuid::now_v7(), "documents": [{"id": "a", "text": "a"}]}))
            .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("collection"));
    let (status, problem) =
        submit(json!({"collection_id": collection, "documents": [{"dataset_id": Uuid::now_v7()}]}))
            .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("dataset"));
    let unknown = add_dataset(app, "blob.bin", Format::Csv, b"a\n1\n").await;
    let (status, problem) =
        submit(json!({"collection_id": collection, "documents": [{"dataset_id": unknown}]})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(fields(&problem), ["payload.documents[0].format"]);

    let path = format!("/v1/collections/{collection}/search");
    let (status, problem) = app
        .post(
            &path,
            &json!({"query": " ", "k": 0, "filter": {"tag": {"like": "x"}}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(fields(&problem), ["query", "k", "filter"]);
    // A filter of thousands of conditions, or one listing thousands of values, is refused
    // before it becomes a statement of as many clauses.
    let many: serde_json::Map<String, Value> =
        (0..3000).map(|i| (format!("k{i}"), json!(0))).collect();
    let values: Vec<i32> = (0..3000).collect();
    // An equality with an array is a containment, as dear a value as an `in` is.
    let nested = json!({"k": [[values.clone()]]});
    for filter in [
        json!(many),
        json!({"k": {"in": values}}),
        json!({"k": values}),
        nested,
    ] {
        let (status, problem) = app
            .post(
                &path,
                &json!({"query": "x", "mode": "keyword", "filter": filter}),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
        assert_eq!(fields(&problem), ["filter"]);
        assert!(
            problem["detail"].as_str().unwrap().contains("at most"),
            "{problem}"
        );
    }
    let (status, _) = app
        .post(&path, &json!({"query": "x", "mode": "fuzzy"}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = app
        .post(
            &format!("/v1/collections/{}/search", Uuid::now_v7()),
            &json!({"query": "x"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app
        .post("/v1/collections/not-a-uuid/search", &json!({"query": "x"}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_worker_without_the_model_refuses_to_start() {
    let mut app = TestApp::spawn().await;
    app.settings.model_dir = "/nonexistent/all-MiniLM-L6-v2".into();
    let spec = worker::QueueSpec(vec![("ingest".into(), 1)]);
    // Its own services, reading the settings with the missing model.
    let services = jobs::Services::new(
        std::sync::Arc::new(app.settings.clone()),
        app.pool().clone(),
    )
    .unwrap();
    let error = worker::start(
        app.settings.clone(),
        spec,
        jobs::Registry::standard(services),
        worker::unique_name(),
    )
    .await
    .err()
    .expect("no model, no worker");
    let message = format!("{error:#}");
    assert!(
        message.contains("cannot serve the ingest queue"),
        "{message}"
    );
    assert!(
        message.contains("/nonexistent/all-MiniLM-L6-v2 (CONVEYOR_MODEL_DIR)"),
        "{message}"
    );
    assert!(message.contains("scripts/model"), "{message}");

    // The binary exits at once, before taking a job.
    let mut process = app.spawn_worker_process("ingest=1");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = process.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker kept running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success());
    // A canary-only worker needs no model.
    let mut canary = app.spawn_worker_process("canary=1");
    let id = app.submit_canary(json!({"steps": 1})).await;
    let job = app
        .wait_status(id, &["succeeded", "failed"], Duration::from_secs(30))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(
        canary.try_wait().unwrap().is_none(),
        "a canary worker runs without the model"
    );
}

/// A watched file's path is its document's id: one nested past what PostgreSQL's index takes
/// (about 2.7 kB; random names, which do not compress) failed every attempt, retried, at the
/// insert. It fails the job at once, naming the id's start, with nothing stored.
#[tokio::test]
async fn a_watched_file_whose_path_is_too_long_an_id_fails_the_job_storing_nothing() {
    let root = std::env::temp_dir().join(format!("conveyor-watch-{}", Uuid::now_v7()));
    let mut app = TestApp::spawn_with(|s| s.watch_root = Some(root.clone())).await;
    app.start_worker_for(&[("ingest", 1)]).await;
    let tenant = app.tenant_id("acme").await;
    let mut deep = root.join(tenant.to_string()).join("deep");
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("short.md"), CORPUS[0].2).unwrap();
    for _ in 0..15 {
        let name: String = (0..7)
            .map(|_| Uuid::new_v4().simple().to_string())
            .collect();
        deep = deep.join(&name[..200]);
    }
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("long.md"), CORPUS[1].2).unwrap();
    let collection = create_collection(&app, json!({"name": "deep"})).await;

    let job = app
        .run_job(
            "ingest",
            json!({"collection_id": collection, "documents": [{"directory": "deep"}]}),
        )
        .await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["attempt"], 1, "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(
        error.contains("the document id deep/") && error.contains("bytes; at most 2048"),
        "{error}"
    );
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM documents WHERE collection_id = $1")
        .bind(collection)
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(stored, 0);
    std::fs::remove_dir_all(&root).unwrap();
}

/// A collection following a watched directory on a schedule: each firing is an ingest job of
/// the directory; between two syncs a file is added, one changed and one deleted: the second
/// sync indexes the new and changed ones, skips the unchanged one and removes the deleted
/// one's document. A path out of the tenant's directory is refused at create.
#[tokio::test]
async fn a_watched_directory_syncs_added_changed_and_deleted_files_on_a_schedule() {
    let root = std::env::temp_dir().join(format!("conveyor-watch-{}", Uuid::now_v7()));
    let mut app = TestApp::spawn_with(|s| s.watch_root = Some(root.clone())).await;
    app.start_worker_for(&[("ingest", 1)]).await;
    let tenant = app.tenant_id("acme").await;
    let docs = root.join(tenant.to_string()).join("handbook");
    std::fs::create_dir_all(docs.join("orders")).unwrap();
    let write = |name: &str, corpus: usize| {
        std::fs::write(docs.join(name), CORPUS[corpus].2).unwrap();
    };
    write("passwords.md", 0);
    write("orders/refunds.txt", 1);
    write("volcano.md", 4);
    let collection = create_collection(&app, json!({"name": "handbook"})).await;
    let job = json!({"kind": "ingest", "payload": {"collection_id": collection,
                     "documents": [{"directory": "handbook", "metadata": {"source": "wiki"}}]}});

    let (status, refused) = app
        .post(
            "/v1/schedules",
            &json!({"name": "escape", "cron": "@daily", "job": {"kind": "ingest", "payload":
                    {"collection_id": collection, "documents": [{"directory": "../"}]}}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    assert_eq!(
        refused["errors"][0]["field"],
        "job.payload.documents[0].directory"
    );
    let (status, schedule) = app
        .post(
            "/v1/schedules",
            &json!({"name": "sync", "cron": "@daily", "job": job}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{schedule}");
    let schedule = schedule["id"].as_str().unwrap().to_owned();
    let sync = async |n: usize| sync_now(&app, &schedule, n).await["result"].clone();
    let stored = async || -> Vec<(String, Value)> {
        sqlx::query_as("SELECT id, metadata FROM documents WHERE collection_id = $1 ORDER BY id")
            .bind(collection)
            .fetch_all(app.pool())
            .await
            .unwrap()
    };

    let first = sync(1).await;
    assert_eq!(
        (
            first["documents"].clone(),
            first["indexed"].clone(),
            first["deleted"].clone()
        ),
        (json!(3), json!(3), json!(0)),
        "{first}"
    );
    let ids: Vec<String> = stored().await.into_iter().map(|(id, _)| id).collect();
    assert_eq!(
        ids,
        [
            "handbook/orders/refunds.txt",
            "handbook/passwords.md",
            "handbook/volcano.md"
        ]
    );
    assert_eq!(stored().await[0].1["source"], "wiki");

    // Between the syncs: one file added, one changed, one deleted, one left as it was.
    write("shipping.md", 2);
    write("passwords.md", 5);
    std::fs::remove_file(docs.join("volcano.md")).unwrap();
    let second = sync(2).await;
    assert_eq!(
        (
            second["documents"].clone(),
            second["indexed"].clone(),
            second["unchanged"].clone(),
            second["deleted"].clone()
        ),
        (json!(3), json!(2), json!(1), json!(1)),
        "{second}"
    );
    let ids: Vec<String> = stored().await.into_iter().map(|(id, _)| id).collect();
    assert_eq!(
        ids,
        [
            "handbook/orders/refunds.txt",
            "handbook/passwords.md",
            "handbook/shipping.md"
        ]
    );
    let found = search(
        &app,
        collection,
        json!({"query": "borrow checker memory safety", "mode": "keyword"}),
    )
    .await;
    assert_eq!(document_ids(&found), ["handbook/passwords.md"], "changed");
    let gone = search(
        &app,
        collection,
        json!({"query": "magma lava", "mode": "keyword"}),
    )
    .await;
    assert!(gone.is_empty(), "the deleted file's chunks: {gone:?}");
    std::fs::remove_dir_all(&root).unwrap();
}

/// A tenant's searches in flight on one API process are bounded (each embeds its query on a
/// core of the API's): hundreds at once took every core from every tenant. Past the bound a
/// search is a 429; another tenant's still goes, and the tenant's own once one ends. The
/// tenant's slots are held here as its searches in flight would hold them.
#[tokio::test]
async fn a_tenants_searches_in_flight_are_bounded_and_others_still_search() {
    let app = TestApp::spawn().await;
    let ours = create_collection(&app, json!({"name": "notes"})).await;
    let query = json!({"query": "rover", "mode": "keyword"});
    let path = format!("/v1/collections/{ours}/search");
    let searches = &app
        .server
        .as_ref()
        .unwrap()
        .state
        .counters
        .searches_by_tenant;
    // MAX_SEARCHES_PER_TENANT of them.
    let held: Vec<_> = (0..4)
        .map(|_| searches.take(app.tenant, usize::MAX).unwrap())
        .collect();
    let (status, problem) = app.post(&path, &query).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{problem}");
    let other = app.key_for("globex").await;
    let theirs = {
        let (status, c) = app
            .post_as(&other, "/v1/collections", &json!({"name": "notes"}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{c}");
        c["id"].as_str().unwrap().to_owned()
    };
    let (status, body) = app
        .post_as(&other, &format!("/v1/collections/{theirs}/search"), &query)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    drop(held);
    let (status, body) = app.post(&path, &query).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// A search's statement ends at `CONVEYOR_SEARCH_TIMEOUT_MS`: here it waits on a lock another
/// session holds on the chunks, and without a bound it waited as long as the lock was held,
/// holding one of the API's connections all the while.
#[tokio::test]
async fn a_search_past_its_time_limit_is_a_503_and_the_next_one_answers() {
    let app = TestApp::spawn_with(|s| s.search_timeout = Duration::from_millis(300)).await;
    let collection = create_collection(&app, json!({"name": "notes"})).await;
    let path = format!("/v1/collections/{collection}/search");
    let query = json!({"query": "rover", "mode": "keyword"});
    let (status, body) = app.post(&path, &query).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let mut holder = app.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE chunks IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let (status, problem) = tokio::time::timeout(Duration::from_secs(10), app.post(&path, &query))
        .await
        .expect("the search ends at its time limit, not when the lock is released");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("time limit"), "{detail}");
    assert!(
        !detail.contains("canceling"),
        "no raw database text: {detail}"
    );
    holder.rollback().await.unwrap();

    let (status, body) = app.post(&path, &query).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
