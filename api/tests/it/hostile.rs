//! Hostile input: files built to exhaust a worker (a gzip bomb, a record without end, a PDF
//! nested 100,000 deep) fail their own job with the cap or the reason, and the worker goes on
//! serving everybody else. A job that kills its worker again and again fails instead of being
//! handed out forever.

use crate::harness::{peak_rss_mb, pid_of, TestApp};
use flate2::{write::GzEncoder, Compression};
use polars::prelude::{df, ParquetWriter};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::{io::Write, time::Duration};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(120);

/// A `.csv.gz` of about 1 MB that inflates to 1 GiB: one gzip member of 16 MiB of `1` lines,
/// repeated (gzip readers read every member of a file, one after another).
fn gzip_bomb() -> Vec<u8> {
    let mut member = GzEncoder::new(Vec::new(), Compression::best());
    member.write_all(&b"1\n".repeat(8 << 20)).unwrap();
    let member = member.finish().unwrap();
    let mut header = GzEncoder::new(Vec::new(), Compression::best());
    header.write_all(b"text\n").unwrap();
    let mut bomb = header.finish().unwrap();
    for _ in 0..64 {
        bomb.extend_from_slice(&member);
    }
    assert!(bomb.len() < 4 << 20, "{} bytes", bomb.len());
    bomb
}

async fn submit_as(app: &TestApp, key: &str, kind: &str, payload: Value) -> Uuid {
    let response = app
        .client
        .post(app.url("/v1/jobs"))
        .bearer_auth(key)
        .json(&json!({"kind": kind, "payload": payload}))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let job: Value = response.json().await.unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    job["id"].as_str().unwrap().parse().unwrap()
}

/// Waits for the job to end; asserts it failed at its first attempt, with `message` in its error.
async fn assert_fails_with(app: &TestApp, id: Uuid, message: &str) -> Value {
    let job = app
        .wait_status(id, &["succeeded", "failed", "cancelled"], WAIT)
        .await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["attempt"], 1, "not retried: {job}");
    let error = job["error"].as_str().unwrap_or_default();
    assert!(error.contains(message), "{error}");
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_bomb_fails_its_jobs_while_the_worker_serves_another_tenant() {
    let app = TestApp::spawn().await;
    assert_eq!(app.settings.max_in_memory_bytes, 64 << 20);
    let bomb = app.upload_dataset("bomb.csv.gz", &gzip_bomb()).await;
    let text_bomb = app.upload_dataset("bomb.txt.gz", &gzip_bomb()).await;
    let (status, collection) = app
        .post("/v1/collections", &json!({"name": "bombed"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{collection}");
    let collection = &collection["id"];

    let mut worker = app.spawn_worker_process("ingest=1,synthesis=1,canary=1");
    let ingest = submit_as(
        &app,
        &app.key,
        "ingest",
        json!({"collection_id": collection, "documents": [{"dataset_id": bomb, "format": "csv"}]}),
    )
    .await;
    let document = submit_as(
        &app,
        &app.key,
        "ingest",
        json!({"collection_id": collection, "documents": [{"dataset_id": text_bomb}]}),
    )
    .await;
    let synthesis = submit_as(
        &app,
        &app.key,
        "synthesis",
        json!({"dataset_id": bomb, "rows": 10}),
    )
    .await;
    let other_tenant = app.key_for("globex").await;
    let canary = submit_as(&app, &other_tenant, "canary", json!({"steps": 5})).await;

    let in_memory = "the dataset is larger than the 64 MiB cap (CONVEYOR_MAX_IN_MEMORY_BYTES)";
    assert_fails_with(&app, ingest, in_memory).await;
    assert_fails_with(&app, synthesis, in_memory).await;
    assert_fails_with(
        &app,
        document,
        "one document is larger than the 4 MiB cap (CONVEYOR_MAX_DOCUMENT_BYTES)",
    )
    .await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let job: Value = app
            .client
            .get(app.url(&format!("/v1/jobs/{canary}")))
            .bearer_auth(&other_tenant)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if job["status"] == "succeeded" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let peak = peak_rss_mb(worker.id());
    assert!(
        worker.try_wait().unwrap().is_none(),
        "the worker is still up"
    );
    assert!(peak < 500, "worker peak RSS {peak} MB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_or_line_past_the_cap_fails_its_import() {
    let mut app = TestApp::spawn().await;
    assert_eq!(app.settings.max_record_bytes, 1 << 20);
    app.start_worker_for(&[("import", 1)]).await;
    let long = "x".repeat(3 << 19);
    let csv = format!("id,name\n1,short\n2,\"{long}\n{long}\"\n3,after\n");
    let ndjson =
        format!("{{\"id\": 1, \"name\": \"short\"}}\n{{\"id\": 2, \"name\": \"{long}\"}}\n");
    let cap = "one record is larger than the 1 MiB cap (CONVEYOR_MAX_RECORD_BYTES)";
    for (name, bytes, on_error) in [
        // COPY straight from the file, and the checked path that parses every row.
        ("wide.csv", csv.as_bytes(), "abort"),
        ("wide.csv", csv.as_bytes(), "skip"),
        ("wide.ndjson", ndjson.as_bytes(), "abort"),
    ] {
        let dataset = app.upload_dataset(name, bytes).await;
        let id = submit_as(
            &app,
            &app.key,
            "import",
            json!({"dataset_id": dataset, "target": {"table": "wide"}, "on_error": on_error}),
        )
        .await;
        assert_fails_with(&app, id, cap).await;
    }
    // A file of many records under the cap imports.
    let fine = format!("id,name\n{}", "1,short\n".repeat(200_000));
    let dataset = app.upload_dataset("fine.csv", fine.as_bytes()).await;
    let id = submit_as(
        &app,
        &app.key,
        "import",
        json!({"dataset_id": dataset, "target": {"table": "fine"}}),
    )
    .await;
    let job = app.wait_status(id, &["succeeded", "failed"], WAIT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
}

/// 28 MB of one-character NDJSON records, under the 64 MiB cap on bytes held: two million
/// records, each of which takes far more memory than its 14 bytes once read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_of_millions_of_tiny_records_fails_before_it_takes_their_memory() {
    let app = TestApp::spawn().await;
    assert_eq!(app.settings.max_in_memory_bytes, 64 << 20);
    let tiny = "{\"text\":\"a\"}\n".repeat(2_000_000);
    let dataset = app.upload_dataset("tiny.ndjson", tiny.as_bytes()).await;
    let (status, collection) = app.post("/v1/collections", &json!({"name": "tiny"})).await;
    assert_eq!(status, StatusCode::CREATED, "{collection}");
    let worker = app.spawn_worker_process("ingest=1");
    let id = submit_as(
        &app,
        &app.key,
        "ingest",
        json!({"collection_id": collection["id"], "documents": [{"dataset_id": dataset}]}),
    )
    .await;
    assert_fails_with(
        &app,
        id,
        "records, the most this job may still hold in memory (CONVEYOR_MAX_IN_MEMORY_BYTES)",
    )
    .await;
    let peak = peak_rss_mb(worker.id());
    assert!(peak < 500, "worker peak RSS {peak} MB");
    let chunks: i64 = sqlx::query_scalar("SELECT count(*) FROM chunks")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(chunks, 0);
}

/// A Parquet file's values as text: long values repeated compress to almost nothing.
fn parquet(name: &[&str]) -> Vec<u8> {
    let ids: Vec<i64> = (0..name.len() as i64).collect();
    let mut frame = df!("id" => ids, "name" => name).unwrap();
    let mut bytes = Vec::new();
    ParquetWriter::new(&mut bytes).finish(&mut frame).unwrap();
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parquet_file_is_held_to_the_record_and_dataset_caps() {
    let mut app = TestApp::spawn_with(|s| s.max_decompressed_bytes = 16 << 20).await;
    assert_eq!(app.settings.max_record_bytes, 1 << 20);
    app.start_worker_for(&[("import", 1)]).await;
    let long = "x".repeat(3 << 20);
    let one_long_value = parquet(&["short", &long, "after"]);
    let value = "y".repeat(64 << 10);
    let many_values = parquet(&vec![value.as_str(); 512]); // 32 MiB of text
    for (table, bytes, cap) in [
        (
            "pq_long",
            one_long_value,
            "one record is larger than the 1 MiB cap (CONVEYOR_MAX_RECORD_BYTES)",
        ),
        (
            "pq_many",
            many_values,
            "the dataset is larger than the 16 MiB cap (CONVEYOR_MAX_DECOMPRESSED_BYTES)",
        ),
    ] {
        assert!(bytes.len() < 64 << 10, "{table}: {} bytes", bytes.len());
        let dataset = app
            .upload_dataset(&format!("{table}.parquet"), &bytes)
            .await;
        let id = submit_as(
            &app,
            &app.key,
            "import",
            json!({"dataset_id": dataset, "target": {"table": table}}),
        )
        .await;
        assert_fails_with(&app, id, cap).await;
    }
    // Nothing of either import is left in the target: no table, no staging table.
    let target = sqlx::PgPool::connect(&app.target_admin_url())
        .await
        .unwrap();
    let left: Vec<String> = sqlx::query_scalar(
        "SELECT relname::text FROM pg_class WHERE relname LIKE 'pq\\_%' OR relname LIKE 'conveyor\\_import\\_%'",
    )
    .fetch_all(&target)
    .await
    .unwrap();
    assert_eq!(left, Vec::<String>::new());
}

/// A first record of 100,000 fields under another delimiter than the upload's inspection read
/// (one column to it): its names became a header and a plan of 100,000 columns, planned in
/// quadratic time (a larger one took the worker's memory). Refused at once, naming the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_wider_than_any_table_fails_before_planning_its_columns() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("import", 1)]).await;
    let wide = format!("{}\n1\n", "a;".repeat(100_000));
    let dataset = app.upload_dataset("wide.csv", wide.as_bytes()).await;
    let id = submit_as(
        &app,
        &app.key,
        "import",
        json!({"dataset_id": dataset, "target": {"table": "wide"}, "csv": {"delimiter": ";"}}),
    )
    .await;
    assert_fails_with(
        &app,
        id,
        "the file has 100001 columns; a PostgreSQL table holds at most 1600",
    )
    .await;
}

/// A float column with `NaN` cells (polars reads them as numbers) spun the copula's fit for
/// ever, uncancellable; they are missing values now. And an output larger than the in-memory
/// cap is refused at submit, for a synthesis and for a sample of its saved model alike (a
/// larger one took the worker down; the worker refuses it too, with its own cap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthesis_learns_past_nan_cells_and_refuses_an_output_past_the_memory_cap() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("synthesis", 1)]).await;
    let mut csv = "x,y,z\n".to_owned();
    for i in 0..60 {
        let x = if i % 7 == 0 {
            "NaN".to_owned()
        } else {
            format!("{}.5", i)
        };
        csv.push_str(&format!("{x},{},{}\n", i * 3, i % 5));
    }
    let dataset = app.upload_dataset("nan.csv", csv.as_bytes()).await;
    let id = submit_as(
        &app,
        &app.key,
        "synthesis",
        json!({"dataset_id": dataset, "rows": 20, "save_model": true}),
    )
    .await;
    let job = app.wait_status(id, &["succeeded", "failed"], WAIT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let model = job["result"]["outputs"]["model_id"].clone();
    assert!(model.is_string(), "{job}");
    let (_, before) = app.get("/v1/jobs").await;
    for (kind, payload) in [
        (
            "synthesis",
            json!({"dataset_id": dataset, "rows": 1_000_000}),
        ),
        ("sample", json!({"model_id": model, "rows": 10_000_000})),
    ] {
        let (status, problem) = app
            .post("/v1/jobs", &json!({"kind": kind, "payload": payload}))
            .await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{kind}: {problem}"
        );
        assert_eq!(problem["errors"][0]["field"], "payload.rows", "{problem}");
        let message = problem["errors"][0]["message"].as_str().unwrap();
        assert!(
            message.ends_with(
                "more than the 64 MiB cap (CONVEYOR_MAX_IN_MEMORY_BYTES); ask for fewer rows"
            ),
            "{message}"
        );
    }
    let (_, after) = app.get("/v1/jobs").await;
    assert_eq!(before["jobs"], after["jobs"], "a refused job was enqueued");
}

/// A PDF whose page holds an array nested `depth` deep.
fn nested_pdf(depth: usize) -> Vec<u8> {
    let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let content = b"BT /F1 12 Tf 72 712 Td (Hello) Tj ET".to_vec();
    pdf(&format!("/Annots {nested}"), content, "")
}

/// A one-page PDF: `page` added to the page's dictionary, `content` its content stream,
/// `filter` the stream's (`/Filter /FlateDecode`, if it is compressed).
fn pdf(page: &str, content: Vec<u8>, filter: &str) -> Vec<u8> {
    let mut stream = format!("<< /Length {} {filter} >>\nstream\n", content.len()).into_bytes();
    stream.extend_from_slice(&content);
    stream.extend_from_slice(b"\nendstream");
    let objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_vec(),
        format!(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R \
             /Resources << /Font << /F1 5 0 R >> >> {page} >>"
        )
        .into_bytes(),
        stream,
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"
            .to_vec(),
    ];
    let mut pdf = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        offsets.push(pdf.len());
        pdf.extend_from_slice(format!("{} 0 obj\n", i + 1).as_bytes());
        pdf.extend_from_slice(object);
        pdf.extend_from_slice(b"\nendobj\n");
    }
    let xref = pdf.len();
    pdf.extend_from_slice(
        format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes(),
    );
    for offset in offsets {
        pdf.extend_from_slice(format!("{offset:010} 00000 n \n").as_bytes());
    }
    pdf.extend_from_slice(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .as_bytes(),
    );
    pdf
}

/// A PDF of a few kilobytes whose compressed page holds 500 KB of text, named by 12 sources:
/// its text counts against the job's in-memory budget (4 MiB here), as bytes read do (only
/// the bytes did, and the job held 6 MB of text, then embedded all of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_text_of_small_pdfs_counts_against_the_memory_budget() {
    let mut app = TestApp::spawn_with(|s| s.max_in_memory_bytes = 4 << 20).await;
    app.start_worker_for(&[("ingest", 1)]).await;
    let text = "pump ".repeat(100_000);
    let content = format!("BT /F1 12 Tf 72 712 Td ({text}) Tj ET");
    let mut deflate = flate2::write::ZlibEncoder::new(Vec::new(), Compression::best());
    deflate.write_all(content.as_bytes()).unwrap();
    let small = pdf("", deflate.finish().unwrap(), "/Filter /FlateDecode");
    assert!(small.len() < 64 << 10, "{} bytes", small.len());
    let dataset = app.upload_dataset("small.pdf", &small).await;
    let (status, collection) = app.post("/v1/collections", &json!({"name": "pdfs"})).await;
    assert_eq!(status, StatusCode::CREATED, "{collection}");
    let sources: Vec<Value> = (0..12)
        .map(|i| json!({"dataset_id": dataset, "id": format!("copy{i}")}))
        .collect();
    let id = submit_as(
        &app,
        &app.key,
        "ingest",
        json!({"collection_id": collection["id"], "documents": sources}),
    )
    .await;
    assert_fails_with(&app, id, "CONVEYOR_MAX_IN_MEMORY_BYTES").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deeply_nested_pdf_fails_its_document_and_the_worker_goes_on() {
    let mut app = TestApp::spawn().await;
    // In-process: a stack overflow in the worker would take this test down with it.
    app.start_worker_for(&[("ingest", 1)]).await;
    let (status, collection) = app
        .post("/v1/collections", &json!({"name": "papers"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{collection}");
    let collection = &collection["id"];
    let nested = app.upload_dataset("nested.pdf", &nested_pdf(100_000)).await;
    let id = submit_as(
        &app,
        &app.key,
        "ingest",
        json!({"collection_id": collection, "documents": [{"dataset_id": nested}]}),
    )
    .await;
    assert_fails_with(&app, id, "unreadable pdf").await;
    let manual = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../jobs/fixtures/ingest/manual.pdf"
    ));
    let manual = app.upload_dataset("manual.pdf", manual).await;
    let next = submit_as(
        &app,
        &app.key,
        "ingest",
        json!({"collection_id": collection, "documents": [
            {"dataset_id": manual},
            {"id": "note", "text": "The next job is served as usual."},
        ]}),
    )
    .await;
    let job = app.wait_status(next, &["succeeded", "failed"], WAIT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"]["documents"], 2, "{job}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_worker_dies_three_times_fails() {
    let mut app = TestApp::spawn().await;
    // The rescuer runs in every worker; this one serves no canary, so it never runs the job.
    app.start_worker_for(&[("import", 1)]).await;
    let (status, job) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "canary", "payload": {"steps": 600, "step_ms": 100}, "max_attempts": 25}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    for death in 1..=3 {
        let mut worker = app.spawn_worker_process("canary=1");
        loop {
            let job = app.wait_status(id, &["running"], WAIT).await;
            if let Some(shown) = job["worker"].as_str() {
                if pid_of(&app.own_worker_name(shown).await) == worker.id() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        worker.kill().unwrap(); // SIGKILL
        worker.wait().unwrap();
        let job = app.wait_status(id, &["queued", "failed"], WAIT).await;
        let expected = if death < 3 { "queued" } else { "failed" };
        assert_eq!(job["status"], expected, "after death {death}: {job}");
    }
    let job = app.job(id).await;
    assert_eq!(
        job["error"], "worker died 3 times while running it",
        "{job}"
    );
    assert_eq!(job["attempt"], 3, "{job}");
}

/// A CSV under the in-memory cap whose cells are empty: polars made a 16-byte view of each
/// (60 MiB of text, 1 GB of frame) before the table's own count refused it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csv_of_empty_cells_under_the_cap_is_refused_before_it_is_parsed() {
    let app = TestApp::spawn().await;
    assert_eq!(app.settings.max_in_memory_bytes, 64 << 20);
    let mut blank = GzEncoder::new(Vec::new(), Compression::best());
    blank.write_all(b"a,b\n").unwrap();
    for _ in 0..30 {
        blank.write_all(&b",\n".repeat(1 << 20)).unwrap();
    }
    let dataset = app
        .upload_dataset("blank.csv.gz", &blank.finish().unwrap())
        .await;
    let mut worker = app.spawn_worker_process("synthesis=1");
    let id = submit_as(
        &app,
        &app.key,
        "synthesis",
        json!({"dataset_id": dataset, "rows": 10}),
    )
    .await;
    assert_fails_with(
        &app,
        id,
        "the dataset is larger than the 64 MiB cap (CONVEYOR_MAX_IN_MEMORY_BYTES)",
    )
    .await;
    let peak = peak_rss_mb(worker.id());
    assert!(
        worker.try_wait().unwrap().is_none(),
        "the worker is still up"
    );
    assert!(peak < 500, "worker peak RSS {peak} MB");
}
