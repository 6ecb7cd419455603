//! Uploads and downloads a hostile client could turn against the API: files served as pages,
//! uploads abandoned midway, Parquet metadata that declares more than it holds.

use reqwest::StatusCode;
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
