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
    /// `not_found`, `conflict`, `unavailable`, `internal`.
    pub error: String,
    pub message: String,
    /// The offending field, query parameter or path segment (400 only), e.g.
    /// `policy.activation_interval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Admin URL of the leader when this node is not it (503 only).
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
}

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
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(self.body())).into_response();
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
