//! Dashboard sign-in: an API key is exchanged for a session cookie, so the browser never keeps
//! the key and EventSource (which cannot send headers) is authenticated too.

use axum::{
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Extension, Json,
};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use shared::Problem;
use tower_http::request_id::RequestId;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    audit::{self, Action, Actor, Entry},
    auth::{self, hash_key, Caller, SESSION_COOKIE},
    extract::JsonBody,
    keys::Role,
    revocation::{self, Invalidation},
    AppState,
};

/// How long a session lasts; signing in again starts a new one.
pub const SESSION_TTL: chrono::TimeDelta = chrono::TimeDelta::hours(12);
/// Most live sessions one key signs in (browsers, tabs); a further sign-in ends its oldest.
pub const MAX_SESSIONS_PER_KEY: i64 = 20;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignIn {
    pub api_key: String,
}

#[derive(Serialize, ToSchema)]
pub struct SessionInfo {
    pub tenant_id: Uuid,
    /// The tenant's name.
    pub tenant: String,
    /// The key the request (or session) uses.
    pub key_id: Uuid,
    /// What that key may do: `admin`, `write` or `read`.
    pub role: Role,
    /// When the session ends (absent when the request used an API key).
    pub expires_at: Option<DateTime<Utc>>,
}

fn request_id(request: Option<&Extension<RequestId>>) -> Option<String> {
    request
        .and_then(|r| r.header_value().to_str().ok())
        .map(str::to_owned)
}

/// The session cookie, `Secure` when the browser reached us over HTTPS: the API speaks plain
/// HTTP behind a TLS-terminating proxy, which says so with `X-Forwarded-Proto: https`.
fn cookie(headers: &HeaderMap, token: String, max_age: chrono::TimeDelta) -> Cookie<'static> {
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"));
    Cookie::build((SESSION_COOKIE, token))
        .http_only(true)
        .same_site(SameSite::Strict)
        .path("/")
        .max_age(time::Duration::seconds(max_age.num_seconds()))
        .secure(https)
        .build()
}

#[utoipa::path(post, path = "/v1/session", request_body = SignIn, tag = "session", security(()),
    params(("X-Conveyor-CSRF" = String, Header, description = "any value; required")),
    responses((status = 201, body = SessionInfo, description = "signed in; the `conveyor_session` cookie is set"),
              (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn sign_in(
    State(state): State<AppState>,
    headers: HeaderMap,
    request: Option<Extension<RequestId>>,
    JsonBody(body): JsonBody<SignIn>,
) -> Result<Response, Problem> {
    // Without it a cross-site form could sign a victim's browser into the attacker's tenant.
    auth::require_csrf_header(&headers)?;
    let key: Option<(Uuid, Uuid, String, String)> = sqlx::query_as(
        "SELECT k.id, k.tenant_id, t.name, k.role FROM api_keys k
         JOIN tenants t ON t.id = k.tenant_id
         WHERE k.key_hash = $1 AND k.revoked_at IS NULL",
    )
    .bind(hash_key(body.api_key.trim()))
    .fetch_optional(&state.pool)
    .await?;
    let (key_id, tenant_id, tenant, role) =
        key.ok_or_else(|| Problem::unauthorized("unknown or revoked API key"))?;
    let role = Role::parse(&role).unwrap_or(Role::Read);
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let token = hex::encode(secret);
    let expires_at = Utc::now() + SESSION_TTL;
    // Ended sessions are swept on the way (the index on expires_at keeps it cheap).
    sqlx::query("DELETE FROM sessions WHERE expires_at < now()")
        .execute(&state.pool)
        .await?;
    let mut tx = state.pool.begin().await?;
    sqlx::query(
        "INSERT INTO sessions (token_hash, tenant_id, api_key_id, expires_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(hash_key(&token))
    .bind(tenant_id)
    .bind(key_id)
    .bind(expires_at)
    .execute(&mut *tx)
    .await?;
    // A key's oldest sessions end past its last MAX_SESSIONS_PER_KEY: a loop of sign-ins
    // would otherwise keep a row each for the whole TTL.
    sqlx::query(
        "DELETE FROM sessions WHERE api_key_id = $1 AND token_hash IN (
             SELECT token_hash FROM sessions WHERE api_key_id = $1
             ORDER BY expires_at DESC OFFSET $2)",
    )
    .bind(key_id)
    .bind(MAX_SESSIONS_PER_KEY)
    .execute(&mut *tx)
    .await?;
    // No hash of the body: it is the key itself.
    let actor = Actor {
        tenant: tenant_id,
        key: Some(key_id),
        request_id: request_id(request.as_ref()),
    };
    audit::record(
        &mut *tx,
        &actor,
        Entry::new(Action::SessionSignIn).target(key_id),
    )
    .await?;
    tx.commit().await?;
    let info = SessionInfo {
        tenant_id,
        tenant,
        key_id,
        role,
        expires_at: Some(expires_at),
    };
    let jar = CookieJar::new().add(cookie(&headers, token, SESSION_TTL));
    Ok((StatusCode::CREATED, jar, Json(info)).into_response())
}

#[utoipa::path(get, path = "/v1/session", tag = "session",
    responses((status = 200, body = SessionInfo, description = "who is signed in"), (status = 401, body = Problem)))]
pub async fn current(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    jar: CookieJar,
) -> Result<Json<SessionInfo>, Problem> {
    let name: String = sqlx::query_scalar("SELECT name FROM tenants WHERE id = $1")
        .bind(caller.key.tenant)
        .fetch_one(&state.pool)
        .await?;
    let expires_at = match auth::session_token(&jar) {
        Some(token) if !headers.contains_key(header::AUTHORIZATION) => {
            sqlx::query_scalar("SELECT expires_at FROM sessions WHERE token_hash = $1")
                .bind(hash_key(token))
                .fetch_optional(&state.pool)
                .await?
        }
        _ => None,
    };
    Ok(Json(SessionInfo {
        tenant_id: caller.key.tenant,
        tenant: name,
        key_id: caller.key.id,
        role: caller.key.role,
        expires_at,
    }))
}

#[utoipa::path(delete, path = "/v1/session", tag = "session", security(()),
    params(("X-Conveyor-CSRF" = String, Header, description = "any value; required")),
    responses((status = 204, description = "signed out; the cookie is cleared"), (status = 403, body = Problem)))]
pub async fn sign_out(
    State(state): State<AppState>,
    headers: HeaderMap,
    request: Option<Extension<RequestId>>,
    jar: CookieJar,
) -> Result<Response, Problem> {
    auth::require_csrf_header(&headers)?;
    if let Some(token) = auth::session_token(&jar) {
        let token_hash = hash_key(token);
        let mut tx = state.pool.begin().await?;
        let ended: Option<(Uuid, Uuid, bool)> = sqlx::query_as(
            "DELETE FROM sessions WHERE token_hash = $1
             RETURNING tenant_id, api_key_id, expires_at > now()",
        )
        .bind(&token_hash)
        .fetch_optional(&mut *tx)
        .await?;
        // Only a live session's end is a change (an ended one's row may linger until swept).
        if let Some((tenant, key, true)) = ended {
            let actor = Actor {
                tenant,
                key: Some(key),
                request_id: request_id(request.as_ref()),
            };
            let entry = Entry::new(Action::SessionSignOut).target(key);
            audit::record(&mut *tx, &actor, entry).await?;
        }
        tx.commit().await?;
        // The session's open event streams end, in every API process. A cookie of no session
        // tells nobody: the word wakes every stream.
        if let Some((tenant, ..)) = ended {
            let tenant = Some(tenant);
            revocation::invalidate(&state, Invalidation::Session { token_hash, tenant }).await;
        }
    }
    // Cleared whether or not the request carried it (`CookieJar::remove` only answers a cookie
    // the request sent).
    let cleared = cookie(&headers, String::new(), chrono::TimeDelta::zero());
    Ok((StatusCode::NO_CONTENT, CookieJar::new().add(cleared)).into_response())
}
