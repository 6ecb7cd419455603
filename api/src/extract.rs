//! A JSON body extractor whose every rejection is a problem document naming the field.

use axum::{
    body::Bytes,
    extract::{FromRequest, Request},
    http::StatusCode,
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
