//! Join tokens of the built-in cluster PKI: `kmsctl cluster token create|list|revoke`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use crate::api::AppState;
use crate::backend::{CertificateView, CreateTokenRequest, CreatedTokenView, JoinTokenView};
use crate::error::{ApiError, ErrorBody};
use crate::events::ids;
use crate::extract::ApiJson;

/// Longest token life: a year (a token is a key to the cluster; make a new one when needed).
pub const MAX_TTL_SECS: u64 = 365 * 86_400;
/// Most nodes one token may admit.
pub const MAX_USES: u32 = 1_000;

/// Creates a join token (on the leader; a follower redirects there).
#[utoipa::path(
    post, path = "/api/v1/cluster/tokens", tag = "cluster",
    request_body = CreateTokenRequest,
    responses(
        (status = 201, description = "Created; `token` is shown only now", body = CreatedTokenView),
        (status = 307, description = "Not the leader; `Location` is the leader's", body = ErrorBody),
        (status = 400, description = "Invalid request; `field` names the problem", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 503, description = "No leader / no quorum", body = ErrorBody)
    )
)]
pub async fn create_token(
    State(s): State<AppState>,
    ApiJson(request): ApiJson<CreateTokenRequest>,
) -> Result<(StatusCode, Json<CreatedTokenView>), ApiError> {
    if request.ttl_secs.is_some_and(|t| t > MAX_TTL_SECS) {
        return Err(ApiError::invalid(
            "ttl_secs",
            format!("at most {MAX_TTL_SECS} (a year); 0 means never expires"),
        ));
    }
    if request.uses.is_some_and(|u| u == 0 || u > MAX_USES) {
        return Err(ApiError::invalid("uses", format!("must be 1..={MAX_USES}")));
    }
    if request
        .description
        .as_deref()
        .is_some_and(|d| d.len() > kms_core::security::MAX_TOKEN_DESCRIPTION)
    {
        return Err(ApiError::invalid(
            "description",
            format!(
                "longer than {} bytes",
                kms_core::security::MAX_TOKEN_DESCRIPTION
            ),
        ));
    }
    let created = s.backend.create_join_token(request).await?;
    s.backend.events().push(
        s.backend.now_ms(),
        ids::MEMBERSHIP,
        "info",
        format!("join token {} created", created.record.id),
        serde_json::json!({ "token_id": created.record.id, "uses": created.record.uses_left, "expires": created.record.expires }),
    );
    Ok((StatusCode::CREATED, Json(created)))
}

/// The cluster's join tokens (secrets are never shown again).
#[utoipa::path(
    get, path = "/api/v1/cluster/tokens", tag = "cluster",
    responses(
        (status = 200, description = "Join tokens", body = [JoinTokenView]),
        (status = 401, description = "Missing or wrong token", body = ErrorBody)
    )
)]
pub async fn list_tokens(State(s): State<AppState>) -> Result<Json<Vec<JoinTokenView>>, ApiError> {
    Ok(Json(s.backend.join_tokens().await?))
}

/// Revokes a join token (on the leader; a follower redirects there).
#[utoipa::path(
    delete, path = "/api/v1/cluster/tokens/{id}", tag = "cluster",
    params(("id" = String, Path, description = "Token id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 307, description = "Not the leader; `Location` is the leader's", body = ErrorBody),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such token", body = ErrorBody)
    )
)]
pub async fn revoke_token(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if id.is_empty()
        || id.len() > kms_core::security::MAX_TOKEN_ID
        || !id.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(ApiError::invalid(
            "id",
            "a token id is 1 to 32 letters or digits",
        ));
    }
    s.backend.revoke_join_token(&id).await?;
    s.backend.events().push(
        s.backend.now_ms(),
        ids::MEMBERSHIP,
        "warning",
        format!("join token {id} revoked"),
        serde_json::json!({ "token_id": id }),
    );
    Ok(StatusCode::NO_CONTENT)
}

/// Has the leader issue this node a new certificate (built-in cluster PKI). The node stores
/// it and presents it from its next start; the cluster keeps the current one valid until the
/// one after is issued, so a node is never cut off by its own rotation.
#[utoipa::path(
    post, path = "/api/v1/cluster/certificate", tag = "cluster",
    responses(
        (status = 200, description = "Issued and stored", body = CertificateView),
        (status = 400, description = "No built-in PKI on this node", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 503, description = "No leader to issue it", body = ErrorBody)
    )
)]
pub async fn rotate_certificate(
    State(s): State<AppState>,
) -> Result<Json<CertificateView>, ApiError> {
    let view = s.backend.rotate_certificate().await?;
    s.backend.events().push(
        s.backend.now_ms(),
        ids::MEMBERSHIP,
        "info",
        "node certificate renewed; presented from the next start".to_owned(),
        serde_json::json!({ "fingerprint": view.fingerprint, "days_left": view.days_left }),
    );
    Ok(Json(view))
}
