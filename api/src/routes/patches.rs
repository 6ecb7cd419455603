//! `POST /v1/patches/preflight`: the checks a `patch` job passes at submit, and its risk,
//! without submitting it.

use axum::{extract::State, Json};
use contracts::patch::{assess_for, Assessment, PatchPayload};
use shared::Problem;

use crate::{auth::Writer, extract::JsonBody, AppState};

#[utoipa::path(post, path = "/v1/patches/preflight", request_body = PatchPayload, tag = "patches",
    responses((status = 200, body = Assessment, description = "the patch would be accepted"),
              (status = 404, body = Problem, description = "unknown connection"),
              (status = 422, body = Problem, description = "refused, with the reason")))]
pub async fn preflight(
    State(state): State<AppState>,
    writer: Writer,
    JsonBody(payload): JsonBody<serde_json::Value>,
) -> Result<Json<Assessment>, Problem> {
    let tenant = writer.tenant();
    let payload: PatchPayload = contracts::parse_payload(&payload).map_err(Problem::validation)?;
    let context = &state.context;
    context
        .preflights
        .run(tenant.0, assess_for(&context.targets, tenant.0, &payload))
        .await
        .map(Json)
        .map_err(crate::refusals::problem)
}
