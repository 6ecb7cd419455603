//! `/docs`: the OpenAPI document rendered by Swagger UI, whose files ship inside the binary
//! (no CDN): the same reference as `/openapi.json`, readable in a browser.
//!
//! Served under a content security policy as the dashboard is: the page runs only this
//! origin's scripts and its own inline start-up script (allowed by its hash, computed from the
//! page as served, so a new Swagger UI release cannot drift from it), may not be framed, and
//! sends no referrer.

use axum::{
    body::{to_bytes, Body},
    http::{header, HeaderValue},
    response::Response,
    Router,
};
use base64::Engine;
use sha2::{Digest, Sha256};

/// The page is a few hundred bytes; anything larger is not the page and is passed on unread.
const MOST_PAGE_BYTES: usize = 64 << 10;

pub fn router() -> Router {
    swagger_ui_dist::generate_routes(swagger_ui_dist::ApiDefinition {
        uri_prefix: "/docs",
        api_definition: swagger_ui_dist::OpenApiSource::Uri("/openapi.json"),
        title: Some("Conveyor API"),
    })
    .layer(axum::middleware::map_response(secure))
}

async fn secure(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let headers = &mut parts.headers;
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    let html = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    if !html {
        return Response::from_parts(parts, body);
    }
    let Ok(page) = to_bytes(body, MOST_PAGE_BYTES).await else {
        return Response::from_parts(parts, Body::empty());
    };
    let policy = policy(&String::from_utf8_lossy(&page));
    if let Ok(value) = HeaderValue::try_from(policy) {
        parts.headers.insert(header::CONTENT_SECURITY_POLICY, value);
    }
    Response::from_parts(parts, Body::from(page))
}

/// The policy for `page`: its inline scripts by their hashes, nothing else inline but styles
/// (Swagger UI sets them on its elements).
fn policy(page: &str) -> String {
    let hashes: String = inline_scripts(page)
        .map(|script| {
            let digest = Sha256::digest(script.as_bytes());
            let hash = base64::engine::general_purpose::STANDARD.encode(digest);
            format!(" 'sha256-{hash}'")
        })
        .collect();
    format!(
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
         script-src 'self'{hashes}; connect-src 'self'; frame-ancestors 'none'; \
         base-uri 'none'; form-action 'self'; object-src 'none'"
    )
}

/// The text of each `<script>` without a `src`, as the browser hashes it.
fn inline_scripts(page: &str) -> impl Iterator<Item = &str> {
    page.split("<script").skip(1).filter_map(|rest| {
        let (attributes, rest) = rest.split_once('>')?;
        let (text, _) = rest.split_once("</script>")?;
        (!attributes.contains("src=")).then_some(text)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_scripts_are_allowed_by_their_hash_and_nothing_else_inline() {
        let page = "<script src=\"/docs/a.js\"></script>\n<script>\n  go();\n</script>";
        let policy = policy(page);
        let hash = base64::engine::general_purpose::STANDARD
            .encode(Sha256::digest("\n  go();\n".as_bytes()));
        assert!(
            policy.contains(&format!("script-src 'self' 'sha256-{hash}';")),
            "{policy}"
        );
        assert!(!policy.contains("script-src 'self' 'unsafe-inline'"));
        assert_eq!(inline_scripts(page).count(), 1);
    }
}
