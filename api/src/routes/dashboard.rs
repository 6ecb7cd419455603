//! The web dashboard: plain HTML, CSS and JavaScript embedded in the binary, so it needs no
//! build step, no CDN and no network. It uses only the public API, signed in by session cookie.

use axum::{
    extract::Path,
    http::{header, HeaderValue},
    response::{IntoResponse, Response},
};
use shared::Problem;

const INDEX: &str = include_str!("../../dashboard/index.html");
/// Every asset the page loads, by name: the shell, one script per screen, the styles.
const ASSETS: [(&str, &str); 7] = [
    ("app.js", include_str!("../../dashboard/app.js")),
    ("patch.js", include_str!("../../dashboard/patch.js")),
    ("import.js", include_str!("../../dashboard/import.js")),
    (
        "collections.js",
        include_str!("../../dashboard/collections.js"),
    ),
    ("flows.js", include_str!("../../dashboard/flows.js")),
    ("queues.js", include_str!("../../dashboard/queues.js")),
    ("style.css", include_str!("../../dashboard/style.css")),
];

/// Everything the page loads comes from this origin; no inline script can run.
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

fn asset(body: &'static str, name: &str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    let content_type = HeaderValue::try_from(crate::files::content_type(name))
        .expect("a media type is a valid header value");
    headers.insert(header::CONTENT_TYPE, content_type);
    // Assets change with the binary: always revalidate rather than run a stale script.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    response
}

pub async fn index() -> Response {
    let mut response = asset(INDEX, "index.html");
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

pub async fn assets(Path(name): Path<String>) -> Result<Response, Problem> {
    ASSETS
        .iter()
        .find(|(known, _)| *known == name)
        .map(|(_, body)| asset(body, &name))
        .ok_or_else(|| Problem::not_found("asset"))
}
