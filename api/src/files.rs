//! Streams a stored object (a dataset or an artifact) to the client.

use axum::{
    body::Body,
    http::header,
    response::{IntoResponse, Response},
};
use shared::{objects::ObjectStream, Problem};

/// The object's bytes as an attachment named `file_name`; 404 when it is not stored.
pub fn serve(stored: Option<(u64, ObjectStream)>, file_name: &str) -> Result<Response, Problem> {
    let (length, stream) = stored.ok_or_else(|| Problem::not_found("file"))?;
    let body = Body::from_stream(stream);
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
            // A tenant's file is never run as a page or a script, whatever its bytes look like.
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
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
