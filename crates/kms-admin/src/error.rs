//! The JSON error every `/api/v1` failure answers with, and its HTTP status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::backend::BackendError;

/// Body of every error answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Machine-readable kind: `invalid_input`, `unauthorized`, `too_many_requests`,
    /// `not_found`, `conflict`, `unavailable`, `not_leader` (307, `Location` names the same
    /// path on the leader), `internal`.
    pub error: String,
    pub message: String,
    /// The offending field, query parameter or path segment (400 only), e.g.
    /// `policy.activation_interval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Admin address of the leader when this node is not it (307 and 503).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_admin: Option<String>,
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("unauthorized")]
    Unauthorized,
    #[error("too many failed token checks; retry after {retry_after_secs} s")]
    TooManyRequests { retry_after_secs: u64 },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{message}")]
    Unavailable {
        message: String,
        leader_admin: Option<String>,
    },
    #[error("{0}")]
    Internal(String),
    /// 307 to the same path on the leader's admin API.
    #[error("this node is not the leader; repeat the request on the leader's admin API at {leader_admin}")]
    NotLeader { leader_admin: String },
}

/// Marks a response to be redirected to the leader; the router's redirect layer turns it
/// into a `Location` for the request's own path.
#[derive(Debug, Clone)]
pub struct LeaderRedirect(pub String);

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Invalid { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::NotLeader { .. } => StatusCode::TEMPORARY_REDIRECT,
        }
    }

    pub fn body(&self) -> ErrorBody {
        let (error, field, leader_admin) = match self {
            Self::Invalid { field, .. } => ("invalid_input", Some(field.clone()), None),
            Self::Unauthorized => ("unauthorized", None, None),
            Self::TooManyRequests { .. } => ("too_many_requests", None, None),
            Self::NotFound(_) => ("not_found", None, None),
            Self::Conflict(_) => ("conflict", None, None),
            Self::Unavailable { leader_admin, .. } => ("unavailable", None, leader_admin.clone()),
            Self::Internal(_) => ("internal", None, None),
            Self::NotLeader { leader_admin } => ("not_leader", None, Some(leader_admin.clone())),
        };
        let message = match self {
            Self::Unauthorized => "missing or wrong bearer token".to_owned(),
            // The field is its own member; the message does not repeat it.
            Self::Invalid { message, .. } => message.clone(),
            other => other.to_string(),
        };
        ErrorBody {
            error: error.to_owned(),
            message,
            field,
            leader_admin,
        }
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Invalid { field, message } => Self::Invalid { field, message },
            BackendError::NotFound(what) => Self::NotFound(format!("{what} not found")),
            BackendError::Conflict(m) => Self::Conflict(m),
            BackendError::Unavailable {
                message,
                leader_admin,
            } => Self::Unavailable {
                message,
                leader_admin,
            },
            BackendError::Internal(m) => Self::Internal(m),
            BackendError::NotLeader { leader_admin } => Self::NotLeader { leader_admin },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(self.body())).into_response();
        if let Self::NotLeader { leader_admin } = &self {
            response
                .extensions_mut()
                .insert(LeaderRedirect(leader_admin.clone()));
        }
        if matches!(self, Self::Unauthorized) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"kmsd\""),
            );
        }
        if let Self::TooManyRequests { retry_after_secs } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        response
    }
}

/// Turns a [`LeaderRedirect`] answer into a `307` whose `Location` is the same path and query
/// on the leader's admin API (`scheme` is this admin listener's: every node serves the same).
pub async fn redirect_to_leader(
    axum::extract::State(scheme): axum::extract::State<&'static str>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let mut response = next.run(request).await;
    let leader = response
        .extensions()
        .get::<LeaderRedirect>()
        .map(|l| l.0.clone());
    if let Some(leader) = leader {
        if let Ok(value) = HeaderValue::from_str(&format!("{scheme}://{leader}{path}")) {
            response.headers_mut().insert(header::LOCATION, value);
        }
    }
    response
}
