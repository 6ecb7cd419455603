//! Extractors whose every rejection is a problem document naming the field: a JSON body, and
//! a query string.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::{request::Parts, StatusCode},
};
use serde::de::DeserializeOwned;
use shared::{problem::NUL_REFUSED, FieldError, Problem};

pub struct JsonBody<T>(pub T);

/// A JSON body and the hex sha256 of its bytes as received (for the audit log).
pub struct HashedJson<T>(pub T, pub String);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        let (value, _) = read(req, state).await?;
        Ok(JsonBody(value))
    }
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for HashedJson<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        let (value, bytes) = read(req, state).await?;
        Ok(HashedJson(value, crate::audit::sha256_hex(&bytes)))
    }
}

/// How long a JSON body (at most `CONVEYOR_BODY_LIMIT`) may take to arrive whole: the body
/// timeout bounds only the gaps between its frames, and a client sending a byte a minute
/// would hold its handler for ever. The router sets it to twice `CONVEYOR_BODY_IDLE_SECS`, so
/// that a body that stops sending is answered `body-idle` first.
#[derive(Clone, Copy)]
pub struct BodyDeadline(pub std::time::Duration);

async fn read<T: DeserializeOwned, S: Send + Sync>(
    req: Request,
    state: &S,
) -> Result<(T, Bytes), Problem> {
    let BodyDeadline(deadline) = req
        .extensions()
        .get()
        .copied()
        .unwrap_or(BodyDeadline(std::time::Duration::from_secs(120)));
    let bytes = tokio::time::timeout(deadline, Bytes::from_request(req, state))
        .await
        .map_err(|_| body_too_slow())?;
    let bytes = bytes.map_err(|rejection| {
        if sent_nothing(&rejection) {
            body_idle()
        } else if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                "request body exceeds the configured limit (CONVEYOR_BODY_LIMIT)",
            )
        } else {
            Problem::new(rejection.status(), "bad-body", rejection.body_text())
        }
    })?;
    if let Some(field) = may_hold_nul(&bytes).then(|| nul_field(&bytes)).flatten() {
        return Err(Problem::validation(vec![FieldError::new(
            field,
            NUL_REFUSED,
        )]));
    }
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    match serde_path_to_error::deserialize(&mut de) {
        Ok(value) => Ok((value, bytes)),
        Err(e) if e.inner().is_syntax() || e.inner().is_eof() => {
            let mut problem = Problem::new(
                StatusCode::BAD_REQUEST,
                "malformed-json",
                format!("the body is not valid JSON: {}", e.inner()),
            );
            problem.errors = vec![FieldError::new("body", e.inner().to_string())];
            Err(problem)
        }
        Err(e) => {
            let path = e.path().to_string();
            let field = if path == "." { "body".to_owned() } else { path };
            Err(Problem::validation(vec![FieldError::new(
                field,
                e.inner().to_string(),
            )]))
        }
    }
}

/// Whether `error`, or what caused it, is a request body that sent nothing for
/// `CONVEYOR_BODY_IDLE_SECS` (`tower_http`'s body timeout).
pub fn sent_nothing(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |e| e.source())
        .any(|e| e.is::<tower_http::timeout::TimeoutError>())
}

/// The answer to a request whose body [`sent_nothing`].
pub fn body_idle() -> Problem {
    Problem::new(
        StatusCode::REQUEST_TIMEOUT,
        "body-idle",
        "the request body sent nothing for too long (CONVEYOR_BODY_IDLE_SECS)",
    )
}

/// The answer to a JSON body that did not arrive whole within its [`BodyDeadline`].
fn body_too_slow() -> Problem {
    Problem::new(
        StatusCode::REQUEST_TIMEOUT,
        "body-too-slow",
        "the JSON body did not arrive whole within twice CONVEYOR_BODY_IDLE_SECS",
    )
}

/// Whether a JSON text may hold a NUL (PostgreSQL stores none in text or JSON, so a string
/// holding one is refused naming its field): only its escape `\u0000` can (a raw one is not JSON).
/// A scan of the bytes, so that bodies without one are not parsed twice.
fn may_hold_nul(json: &[u8]) -> bool {
    let mut rest = json;
    while let Some(at) = rest.iter().position(|&b| b == b'\\') {
        if rest[at + 1..].starts_with(b"u0000") {
            return true;
        }
        // The escaped character is skipped: `\\u0000` is a backslash, then text.
        rest = rest.get(at + 2..).unwrap_or_default();
    }
    false
}

/// The path of the first string (a key or a value) holding a NUL, as serde_path_to_error
/// writes paths; `None` if none does or the text is not JSON (its parse says why). The path is
/// kept as a stack and written only for the string found: written at every step, a long key
/// above a long array was copied once per element (gigabytes for one 1 MiB body).
fn nul_field(json: &[u8]) -> Option<String> {
    enum Step<'a> {
        Key(&'a str),
        Index(usize),
    }
    fn written(path: &[Step]) -> String {
        let mut out = String::new();
        for step in path {
            match step {
                Step::Key(key) if out.is_empty() => out.push_str(key),
                Step::Key(key) => {
                    out.push('.');
                    out.push_str(key);
                }
                Step::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        out
    }
    fn find<'a>(value: &'a serde_json::Value, path: &mut Vec<Step<'a>>) -> Option<String> {
        match value {
            serde_json::Value::String(s) if s.contains('\0') => Some(written(path)),
            serde_json::Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
                path.push(Step::Index(i));
                let found = find(item, path);
                path.pop();
                found
            }),
            // A key holding one: the object is the field.
            serde_json::Value::Object(map) => map.iter().find_map(|(key, item)| {
                if key.contains('\0') {
                    return Some(written(path));
                }
                path.push(Step::Key(key));
                let found = find(item, path);
                path.pop();
                found
            }),
            _ => None,
        }
    }
    let value: serde_json::Value = serde_json::from_slice(json).ok()?;
    find(&value, &mut Vec::new()).map(|path| if path.is_empty() { "body".into() } else { path })
}

/// Query parameters; a parameter that does not parse, or one the route does not know, is a 422
/// naming it.
pub struct Params<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        let query = parts.uri.query().unwrap_or_default();
        let pairs = form_urlencoded::parse(query.as_bytes());
        if let Some((name, _)) = pairs
            .clone()
            .find(|(name, value)| name.contains('\0') || value.contains('\0'))
        {
            let field = if name.contains('\0') {
                "query".into()
            } else {
                name.into_owned()
            };
            return Err(Problem::validation(vec![FieldError::new(
                field,
                NUL_REFUSED,
            )]));
        }
        serde_path_to_error::deserialize(serde_urlencoded::Deserializer::new(pairs))
            .map(Params)
            .map_err(|e| {
                let path = e.path().to_string();
                let field = if path == "." {
                    "query".to_owned()
                } else {
                    path
                };
                Problem::validation(vec![FieldError::new(field, e.inner().to_string())])
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Listing {
        limit: Option<i64>,
        kind: Option<String>,
    }

    async fn params(uri: &str) -> Result<Listing, Problem> {
        let (mut parts, ()) = Request::get(uri).body(()).unwrap().into_parts();
        Params::<Listing>::from_request_parts(&mut parts, &())
            .await
            .map(|p| p.0)
    }

    #[tokio::test]
    async fn query_parameters_parse_or_name_the_parameter() {
        let listing = params("/x?limit=5&kind=canary%20x").await.unwrap();
        assert_eq!(
            (listing.limit, listing.kind.as_deref()),
            (Some(5), Some("canary x"))
        );
        assert!(params("/x").await.unwrap().limit.is_none());

        let problem = params("/x?limit=many").await.unwrap_err();
        assert_eq!(problem.status, 422);
        assert_eq!(problem.errors[0].field, "limit");

        let problem = params("/x?kind=a%00b").await.unwrap_err();
        assert_eq!(
            (problem.status, problem.errors[0].field.as_str()),
            (422, "kind")
        );

        let problem = params("/x?colour=red").await.unwrap_err();
        assert_eq!(problem.status, 422);
        assert!(
            problem.errors[0].message.contains("colour"),
            "{:?}",
            problem.errors
        );
    }

    #[derive(Debug, Deserialize)]
    struct Named {
        #[allow(dead_code)]
        name: String,
        #[allow(dead_code)]
        tags: Vec<String>,
    }

    async fn body(json: &str) -> Result<Named, Problem> {
        let request = Request::post("/x").body(axum::body::Body::from(json.to_owned()));
        JsonBody::<Named>::from_request(request.unwrap(), &())
            .await
            .map(|b| b.0)
    }

    /// A NUL in any string of a body is a 422 naming that string's field; an escaped
    /// backslash before `u0000` is not one.
    #[tokio::test]
    async fn a_nul_character_is_refused_naming_its_field() {
        for (json, field) in [
            (r#"{"name": "a\u0000b", "tags": []}"#, "name"),
            (r#"{"name": "a", "tags": ["x", "\u0000"]}"#, "tags[1]"),
            (r#"{"name": "a", "tags": [], "n\u0000": 1}"#, "body"),
        ] {
            let problem = body(json).await.unwrap_err();
            assert_eq!(problem.status, 422, "{json}");
            assert_eq!(problem.errors[0].field, field, "{json}");
            assert!(problem.errors[0].message.contains("NUL"), "{json}");
        }
        assert!(body(r#"{"name": "a\\u0000", "tags": []}"#).await.is_ok());
        assert!(!may_hold_nul(br#"{"a": "\\u0000 \\"}"#));
        assert_eq!(
            nul_field(br#"[{"a": [1, {"b": "\u0000"}]}]"#).as_deref(),
            Some("[0].a[1].b")
        );
    }

    /// The search for a NUL's field costs about the body's size: a 1 MiB key above 256K
    /// array elements, with the NUL after them, made it copy the key once per element (256 GB:
    /// 8 s of a core here; a 1 MiB sign-in body, unauthenticated, half that). The bound is
    /// about 15 times what the search takes now.
    #[test]
    fn finding_a_nuls_field_costs_about_the_bodys_size() {
        let key = "k".repeat(1 << 20);
        let items = vec!["0"; 256 << 10].join(",");
        let json = format!(r#"{{"{key}": [{items}], "zz": "\u0000"}}"#);
        let started = std::time::Instant::now();
        assert_eq!(nul_field(json.as_bytes()).as_deref(), Some("zz"));
        let took = started.elapsed();
        assert!(took < std::time::Duration::from_secs(2), "{took:?}");
    }
}
