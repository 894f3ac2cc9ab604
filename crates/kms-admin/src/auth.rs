//! Bearer-token check for `/api/v1`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// The configured admin token (`None` = the API is open, only allowed on loopback).
#[derive(Clone, Default)]
pub struct Token(Option<Arc<[u8]>>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.write_str(if self.0.is_some() {
            "Token(set)"
        } else {
            "Token(none)"
        })
    }
}

impl Token {
    pub fn new(token: Option<&str>) -> Self {
        Self(
            token
                .filter(|t| !t.is_empty())
                .map(|t| Arc::from(t.as_bytes())),
        )
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// Whether an `Authorization` header value carries this token. The comparison takes the
    /// same time wherever the first difference is (lengths may leak, contents do not).
    pub fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        let Some(expected) = &self.0 else {
            return true;
        };
        let Some(value) = authorization else {
            return false;
        };
        let Some(presented) = strip_bearer(value) else {
            return false;
        };
        presented.ct_eq(expected).into()
    }
}

/// The credentials of `Bearer <token>` (scheme case-insensitive, surrounding spaces ignored).
fn strip_bearer(value: &[u8]) -> Option<&[u8]> {
    let scheme = value.get(..7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let rest = value.get(7..)?;
    let start = rest.iter().position(|b| *b != b' ')?;
    let end = rest.iter().rposition(|b| *b != b' ')?;
    rest.get(start..=end)
}

/// Middleware: 401 with a JSON error unless the request carries the token.
pub async fn require_token(State(token): State<Token>, request: Request, next: Next) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if token.accepts(authorization) {
        next.run(request).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_the_exact_bearer_token() {
        let t = Token::new(Some("s3cret"));
        assert!(t.accepts(Some(b"Bearer s3cret")));
        assert!(t.accepts(Some(b"bearer  s3cret ")));
        assert!(!t.accepts(None));
        assert!(!t.accepts(Some(b"Bearer s3cre")));
        assert!(!t.accepts(Some(b"Bearer s3cret2")));
        assert!(!t.accepts(Some(b"Bearer S3CRET")));
        assert!(!t.accepts(Some(b"Basic s3cret")));
        assert!(!t.accepts(Some(b"Bearer ")));
        assert!(!t.accepts(Some(b"s3cret")));
        assert!(!t.accepts(Some(b"")));
        assert_eq!(format!("{t:?}"), "Token(set)");
    }

    #[test]
    fn no_token_means_open_and_empty_means_none() {
        assert!(Token::new(None).accepts(None));
        assert!(!Token::new(Some("")).is_set());
        assert!(Token::new(Some("")).accepts(Some(b"anything")));
    }
}
