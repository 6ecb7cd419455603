//! Streams a stored file (a dataset or an artifact) to the client.

use axum::{
    body::Body,
    http::header,
    response::{IntoResponse, Response},
};
use shared::Problem;
use std::path::Path;

pub async fn serve(path: &Path, file_name: &str) -> Result<Response, Problem> {
    let file = match tokio::fs::File::open(path).await {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Problem::not_found("file"));
        }
        Err(e) => return Err(Problem::internal(e)),
    };
    let length = file.metadata().await.map_err(Problem::internal)?.len();
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 16));
    // The name came from a client or a handler: keep it to safe characters in the header.
    let safe_name: String = file_name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' {
                c
            } else {
                '_'
            }
        })
        .collect();
    Ok((
        [
            (header::CONTENT_TYPE, content_type(file_name).to_owned()),
            (header::CONTENT_LENGTH, length.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{safe_name}\""),
            ),
        ],
        body,
    )
        .into_response())
}

fn content_type(name: &str) -> &'static str {
    let lower = name.to_ascii_lowercase();
    match lower.rsplit('.').next().unwrap_or("") {
        "csv" => "text/csv; charset=utf-8",
        "tsv" => "text/tab-separated-values; charset=utf-8",
        "json" => "application/json",
        "ndjson" | "jsonl" => "application/x-ndjson",
        "txt" | "md" => "text/plain; charset=utf-8",
        "gz" => "application/gzip",
        "zst" => "application/zstd",
        _ => "application/octet-stream",
    }
}
