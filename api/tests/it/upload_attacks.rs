//! Uploads and downloads a hostile client could turn against the API: files served as pages,
//! uploads abandoned midway, Parquet metadata that declares more than it holds.

use reqwest::StatusCode;

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

