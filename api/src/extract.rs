//! Extractors whose every rejection is a problem document naming the field: a JSON body, and
//! a query string.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::{request::Parts, StatusCode},
};
use serde::de::DeserializeOwned;
use shared::{FieldError, Problem};

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

async fn read<T: DeserializeOwned, S: Send + Sync>(
    req: Request,
    state: &S,
) -> Result<(T, Bytes), Problem> {
    let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                "request body exceeds the configured limit (CONVEYOR_BODY_LIMIT)",
            )
        } else {
            Problem::new(rejection.status(), "bad-body", rejection.body_text())
        }
    })?;
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

/// Query parameters; a parameter that does not parse, or one the route does not know, is a 422
/// naming it.
pub struct Params<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        let query = parts.uri.query().unwrap_or_default();
        let pairs = form_urlencoded::parse(query.as_bytes());
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

        let problem = params("/x?colour=red").await.unwrap_err();
        assert_eq!(problem.status, 422);
        assert!(
            problem.errors[0].message.contains("colour"),
            "{:?}",
            problem.errors
        );
    }
}
