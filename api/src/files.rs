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
            (header::CONTENT_TYPE, download_type(file_name)),
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
pub fn inline(mut response: Response, file_name: &str) -> Response {
    let headers = response.headers_mut();
    // Its own type here: the sandbox below keeps a page or a script from running.
    if let Ok(media_type) = HeaderValue::try_from(content_type(file_name)) {
        headers.insert(header::CONTENT_TYPE, media_type);
    }
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

/// The type a tenant's file is downloaded as: a type a browser would run (a script, a page, an
/// SVG image) is sent as plain bytes, so that a `<script src>` or a frame on this origin
/// cannot load a tenant's file as code (`nosniff` stops only mismatched types).
pub fn download_type(name: &str) -> String {
    let media_type = content_type(name);
    let essence = media_type.split(';').next().unwrap_or_default();
    let runnable = essence.contains("javascript")
        || essence.contains("ecmascript")
        || essence.contains("html")
        || essence.ends_with("+xml")
        || essence.ends_with("/xml")
        || essence == "application/wasm";
    if runnable {
        "application/octet-stream".to_owned()
    } else {
        media_type
    }
}

#[cfg(test)]
mod tests {
    use super::{content_type, download_type};

    #[test]
    fn files_a_browser_would_run_are_downloaded_as_bytes() {
        for name in [
            "x.js", "x.mjs", "x.html", "x.htm", "x.svg", "x.xhtml", "x.xml",
        ] {
            assert_eq!(download_type(name), "application/octet-stream", "{name}");
        }
        for (name, expected) in [
            ("orders.csv", "text/csv; charset=utf-8"),
            ("report.json", "application/json"),
            ("notes.txt", "text/plain; charset=utf-8"),
            (
                "sheet.xlsx",
                "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
            ),
        ] {
            assert_eq!(download_type(name), expected, "{name}");
        }
    }

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
