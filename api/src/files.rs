//! Streams a stored object (a dataset or an artifact) to the client.

use axum::{
    body::Body,
    http::{header, HeaderValue},
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
            (header::CONTENT_TYPE, content_type(file_name)),
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

/// A served file shown in place rather than downloaded, in a sandbox: its page runs no
/// script, gets an origin of its own (no cookie, no API), loads nothing from the network and
/// can be framed by the dashboard only.
pub fn inline(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("inline"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:; \
             frame-ancestors 'self'",
        ),
    );
    response
}

/// The media type of a file by its name's extension, `charset=utf-8` on text (what Conveyor
/// stores and serves as text is UTF-8); `application/octet-stream` for an unknown extension.
pub fn content_type(name: &str) -> String {
    let media_type = mime_guess::from_path(name).first_or_octet_stream();
    if media_type.type_() == mime_guess::mime::TEXT {
        format!("{media_type}; charset=utf-8")
    } else {
        media_type.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::content_type;

    #[test]
    fn content_types_follow_the_extension_and_text_is_utf8() {
        for (name, expected) in [
            ("orders.csv", "text/csv; charset=utf-8"),
            ("Orders.TSV", "text/tab-separated-values; charset=utf-8"),
            ("notes.md", "text/markdown; charset=utf-8"),
            ("app.js", "text/javascript; charset=utf-8"),
            ("report.json", "application/json"),
            ("orders.csv.gz", "application/gzip"),
            ("orders.parquet", "application/vnd.apache.parquet"),
            ("no-extension", "application/octet-stream"),
        ] {
            assert_eq!(content_type(name), expected, "{name}");
        }
    }
}
