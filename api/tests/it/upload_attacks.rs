//! Uploads and downloads a hostile client could turn against the API: files served as pages,
//! uploads abandoned midway, Parquet metadata that declares more than it holds.

use reqwest::StatusCode;
use serde_json::Value;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

use crate::harness::TestApp;

#[tokio::test]
async fn downloads_are_attachments_never_sniffed() {
    let app = TestApp::spawn().await;
    let page = b"<html><script>alert(document.cookie)</script></html>\n1\n";
    let dataset = app.upload_dataset("page.csv", page).await;
    let response = app
        .client
        .get(app.url(&format!("/v1/datasets/{dataset}/download")))
        .bearer_auth(&app.key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers();
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(
        headers["content-disposition"],
        "attachment; filename=\"page.csv\""
    );
}

fn scratch_files(app: &TestApp) -> Vec<std::path::PathBuf> {
    match std::fs::read_dir(app.settings.data_dir.join("tmp")) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_abandoned_midway_leaves_no_scratch_file() {
    let app = TestApp::spawn().await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/datasets?name=big.csv HTTP/1.1\r\nHost: {addr}\r\n\
         Authorization: Bearer {}\r\nContent-Length: 100000000\r\n\r\nid,name\n",
        app.key
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let rows = "1,ann\n".repeat(100_000);
    let deadline = Instant::now() + Duration::from_secs(10);
    while scratch_files(&app).is_empty() {
        assert!(Instant::now() < deadline, "the upload never started");
        socket.write_all(rows.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The client hangs up with most of the body unsent.
    drop(socket);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !scratch_files(&app).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left behind: {:?}",
            scratch_files(&app)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client that hung up once its upload's body was read dropped the handler between the
/// stored object and its row: the object stayed, and no row (which the tenant's quota reads)
/// counted it, at each try. Held here where the record waits for the tenant's row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_client_hangs_up_is_stored_and_recorded_or_neither() {
    let app = TestApp::spawn().await;
    // With a quota, the record counts the tenant's datasets with its row locked.
    sqlx::query(
        "INSERT INTO tenant_limits (tenant_id, max_dataset_bytes) VALUES ($1, 1000000000)
         ON CONFLICT (tenant_id) DO UPDATE SET max_dataset_bytes = excluded.max_dataset_bytes",
    )
    .bind(app.tenant)
    .execute(app.pool())
    .await
    .unwrap();
    let mut holder = app.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE")
        .bind(app.tenant)
        .execute(&mut *holder)
        .await
        .unwrap();
    let stored = app
        .settings
        .data_dir
        .join(format!("tenants/{}/datasets", app.tenant));
    let objects = || std::fs::read_dir(&stored).map_or(0, |entries| entries.count());
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let body = "id,name\n1,ann\n";
    let request = format!(
        "POST /v1/datasets?name=a.csv HTTP/1.1\r\nHost: {addr}\r\n\
         Authorization: Bearer {}\r\nContent-Length: {}\r\n\r\n{body}",
        app.key,
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while objects() == 0 {
        assert!(Instant::now() < deadline, "the upload was never stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The object is stored and its record waits: the client hangs up.
    drop(socket);
    tokio::time::sleep(Duration::from_millis(300)).await;
    holder.rollback().await.unwrap();
    let recorded = || async {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM datasets WHERE tenant_id = $1")
            .bind(app.tenant)
            .fetch_one(app.pool())
            .await
            .unwrap();
        rows as usize
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while recorded().await != objects() {
        assert!(
            Instant::now() < deadline,
            "{} objects stored, {} recorded",
            objects(),
            recorded().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Parquet file around `metadata`, with `declared` as the footer's length field.
fn parquet(metadata: &[u8], declared: u32) -> Vec<u8> {
    let mut file = b"PAR1".to_vec();
    file.extend_from_slice(metadata);
    file.extend_from_slice(&declared.to_le_bytes());
    file.extend_from_slice(b"PAR1");
    file
}

async fn upload_problem(app: &TestApp, name: &str, bytes: Vec<u8>) -> (StatusCode, Value) {
    let response = app
        .client
        .post(app.url("/v1/datasets"))
        .query(&[("name", name)])
        .bearer_auth(&app.key)
        .body(bytes)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_metadata_that_declares_more_than_it_holds_is_refused() {
    let app = TestApp::spawn().await;
    // FileMetaData field 2 (the schema), a list of structs declaring 2^31 - 1 elements in
    // five bytes: a reader that trusts it reserves hundreds of GB, and the allocation failure
    // aborts the process.
    let huge_list = [0x29, 0xfc, 0xff, 0xff, 0xff, 0xff, 0x07];
    // A footer length field far past what the API reads (and past the file).
    let cases = [
        (
            "list.parquet",
            parquet(&huge_list, huge_list.len() as u32),
            "declares",
        ),
        ("footer.parquet", parquet(&[0; 64], 0xffff_fff0), "footer"),
    ];
    for (name, file, reason) in cases {
        let (status, problem) = upload_problem(&app, name, file).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
        let message = problem["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains(reason), "{name}: {message}");
    }
    // The API is alive and serves the next upload.
    app.upload_dataset("fine.csv", b"id\n1\n").await;
    assert!(scratch_files(&app).is_empty());
}

/// Uploads are parsed in a child process (`conveyor-worker inspect`), never in the API: a
/// parser that dies (here: out of its memory limit) fails the upload with 422 and the API
/// goes on; an inspector that cannot start is the platform's fault (503). Neither leaves a
/// dataset behind.
#[tokio::test]
async fn a_dying_or_missing_inspector_fails_the_upload_not_the_api() {
    let csv = b"id,name\n1,a\n2,b\n".to_vec();
    let starved = TestApp::spawn_with(|s| s.extract_memory_bytes = 8 << 20).await;
    let missing =
        TestApp::spawn_with(|s| s.extractor = Some("/nonexistent/conveyor-worker".into())).await;
    for (app, status, detail) in [
        (&starved, StatusCode::UNPROCESSABLE_ENTITY, "died"),
        (
            &missing,
            StatusCode::SERVICE_UNAVAILABLE,
            "could not be inspected",
        ),
    ] {
        let response = app
            .client
            .post(app.url("/v1/datasets"))
            .query(&[("name", "t.csv")])
            .bearer_auth(&app.key)
            .body(csv.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status);
        let body: Value = response.json().await.unwrap();
        assert!(body.to_string().contains(detail), "{body}");
        let (status, list) = app.get("/v1/datasets").await;
        assert_eq!(status, StatusCode::OK, "the API still serves");
        assert_eq!(list["datasets"].as_array().map(Vec::len), Some(0), "{list}");
    }
}

/// A wide file's head made a preview of megabytes, stored and sent with every dataset of
/// every list page (500 of them a page): the preview keeps to 64 KiB, and lists show each
/// dataset's column count, not its schema and preview.
#[tokio::test]
async fn previews_are_bounded_and_lists_leave_schemas_and_previews_out() {
    let app = TestApp::spawn().await;
    let columns = 2000;
    let header: Vec<String> = (0..columns).map(|i| format!("column_{i}")).collect();
    let mut csv = header.join(",") + "\n";
    for row in 0..20 {
        let cells: Vec<String> = (0..columns)
            .map(|i| format!("{row}-{i}-{}", "x".repeat(40)))
            .collect();
        csv.push_str(&(cells.join(",") + "\n"));
    }
    let dataset = app.upload_dataset("wide.csv", csv.as_bytes()).await;
    let (status, one) = app.get(&format!("/v1/datasets/{dataset}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["schema"].as_array().unwrap().len(), columns);
    let preview = one["preview"].to_string();
    assert!(
        preview.len() <= 64 << 10,
        "a preview of {} bytes",
        preview.len()
    );
    let (_, list) = app.get("/v1/datasets?limit=500").await;
    let listed = &list["datasets"][0];
    assert_eq!(listed["id"], dataset.to_string(), "{list}");
    assert_eq!(listed["columns"], columns, "{listed}");
    assert!(
        listed.get("preview").is_none() && listed.get("schema").is_none(),
        "{listed}"
    );
}

/// Uploads a tenant may have in flight on one API process are bounded: each holds a connection,
/// scratch space and then an inspector process (fifty at once started fifty inspectors). Past
/// the bound a 429; once one ends, another may start. Another tenant is not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_has_at_most_four_uploads_in_flight() {
    let app = TestApp::spawn().await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut trickling = Vec::new();
    for _ in 0..4 {
        let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /v1/datasets?name=slow.csv HTTP/1.1\r\nHost: {addr}\r\n\
             Authorization: Bearer {}\r\nContent-Length: 1000000\r\n\r\nid,name\n1,ann\n",
            app.key
        );
        socket.write_all(head.as_bytes()).await.unwrap();
        trickling.push(socket);
    }
    // Each upload receiving its body has its scratch file.
    let deadline = Instant::now() + Duration::from_secs(10);
    while scratch_files(&app).len() < 4 {
        assert!(Instant::now() < deadline, "the four uploads never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, problem) = upload_problem(&app, "fifth.csv", b"a\n1\n".to_vec()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("4 uploads in flight"),
        "{problem}"
    );
    let other = app.key_for("another").await;
    let response = app
        .client
        .post(app.url("/v1/datasets?name=theirs.csv"))
        .bearer_auth(&other)
        .body("a\n1\n")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    drop(trickling.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    while upload_problem(&app, "later.csv", b"a\n1\n".to_vec())
        .await
        .0
        != StatusCode::CREATED
    {
        assert!(Instant::now() < deadline, "no room after an upload ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
