//! Client of a node's admin API (`/api/v1`), used by the `kmsctl` admin commands and by tests.

use std::time::Duration;

use kms_admin::ErrorBody;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Why an admin call failed. [`AdminError::exit_code`] maps it to `kmsctl`'s exit codes.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("invalid admin URL {url:?}: {message}")]
    Url { url: String, message: String },
    #[error("cannot reach the admin API at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error(
        "the admin API refused the token (HTTP {status}): {message}; set KMSCTL_TOKEN or --token"
    )]
    Unauthorized { status: u16, message: String },
    #[error("{}", api_message(*.status, .body))]
    Api { status: u16, body: ErrorBody },
    #[error("unexpected answer from the admin API: {0}")]
    Decode(String),
}

fn api_message(status: u16, body: &ErrorBody) -> String {
    match &body.field {
        Some(field) => format!("HTTP {status} {}: {field}: {}", body.error, body.message),
        None => format!("HTTP {status} {}: {}", body.error, body.message),
    }
}

/// `kmsctl`'s exit codes (documented in `kmsctl --help`).
pub mod exit {
    pub const OK: u8 = 0;
    /// An activation was refused or failed verification (activate, bench).
    pub const FAILED: u8 = 1;
    pub const USAGE: u8 = 2;
    /// The KMS host or the admin API could not be reached.
    pub const UNREACHABLE: u8 = 3;
    /// The admin API answered 401/403: missing or wrong token.
    pub const UNAUTHORIZED: u8 = 4;
    /// The admin API answered another error (400 invalid input, 404, 409, 503, 5xx).
    pub const API_ERROR: u8 = 5;
}

impl AdminError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Url { .. } => exit::USAGE,
            Self::Unreachable { .. } => exit::UNREACHABLE,
            Self::Unauthorized { .. } => exit::UNAUTHORIZED,
            Self::Api { .. } | Self::Decode(_) => exit::API_ERROR,
        }
    }
}

/// A raw answer (status, content type, body), for callers that check errors themselves.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// Talks to one node's admin API.
#[derive(Debug, Clone)]
pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl AdminClient {
    /// `base_url` is `http(s)://host:port` (a bare `host:port` means http).
    pub fn new(
        base_url: &str,
        token: Option<String>,
        timeout: Duration,
    ) -> Result<Self, AdminError> {
        Self::with_ca(base_url, token, timeout, None)
    }

    /// Like [`AdminClient::new`]; with `ca_pem` (PEM certificates), an `https://` node must
    /// present a certificate signed by one of them, and only by them (the built-in web roots
    /// are not trusted then).
    pub fn with_ca(
        base_url: &str,
        token: Option<String>,
        timeout: Duration,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, AdminError> {
        let trimmed = base_url.trim().trim_end_matches('/');
        let base = if trimmed.contains("://") {
            trimmed.to_owned()
        } else {
            format!("http://{trimmed}")
        };
        let parsed = reqwest::Url::parse(&base).map_err(|e| AdminError::Url {
            url: base_url.to_owned(),
            message: e.to_string(),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(AdminError::Url {
                url: base_url.to_owned(),
                message: "expected http://HOST:PORT or https://HOST:PORT".into(),
            });
        }
        let mut builder = reqwest::Client::builder()
            // A follower answers writes with 307 to the leader's admin API; followed by hand
            // in `raw` so the token goes along (never from https down to http).
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)));
        if let Some(pem) = ca_pem {
            let certs =
                reqwest::Certificate::from_pem_bundle(pem).map_err(|e| AdminError::Url {
                    url: base_url.to_owned(),
                    message: format!("CA certificate: {e}"),
                })?;
            if certs.is_empty() {
                return Err(AdminError::Url {
                    url: base_url.to_owned(),
                    message: "CA certificate file holds no PEM certificate".into(),
                });
            }
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| AdminError::Url {
            url: base_url.to_owned(),
            message: e.to_string(),
        })?;
        Ok(Self {
            base,
            token: token.filter(|t| !t.is_empty()),
            http,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Sends one request and returns whatever came back (no status mapping).
    pub async fn raw(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> Result<RawResponse, AdminError> {
        let mut url = format!("{}{path_and_query}", self.base);
        let mut redirects = 0;
        let response = loop {
            let mut request = self.http.request(method.clone(), &url);
            if let Some(token) = &self.token {
                request = request.bearer_auth(token);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let response = request.send().await.map_err(|e| AdminError::Unreachable {
                url: url.clone(),
                message: error_chain(&e),
            })?;
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            match (response.status().as_u16(), location) {
                (307 | 308, Some(next)) if redirects < 3 => {
                    if url.starts_with("https://") && !next.starts_with("https://") {
                        return Err(AdminError::Url {
                            url: next,
                            message: "refusing a redirect from https to http".into(),
                        });
                    }
                    redirects += 1;
                    url = next;
                }
                _ => break response,
            }
        };
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = response.text().await.map_err(|e| AdminError::Unreachable {
            url,
            message: error_chain(&e),
        })?;
        Ok(RawResponse {
            status,
            content_type,
            body,
        })
    }

    /// Sends one request; a non-2xx answer becomes an [`AdminError`].
    pub async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> Result<RawResponse, AdminError> {
        let response = self.raw(method, path_and_query, body).await?;
        let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::BAD_GATEWAY);
        if status.is_success() {
            return Ok(response);
        }
        let body: ErrorBody = serde_json::from_str(&response.body).unwrap_or_else(|_| ErrorBody {
            error: status
                .canonical_reason()
                .unwrap_or("error")
                .to_lowercase()
                .replace(' ', "_"),
            message: response.body.chars().take(200).collect(),
            field: None,
            leader_admin: None,
        });
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(AdminError::Unauthorized {
                status: response.status,
                message: body.message,
            });
        }
        Err(AdminError::Api {
            status: response.status,
            body,
        })
    }

    /// GET and decode JSON.
    pub async fn get<T: DeserializeOwned>(&self, path_and_query: &str) -> Result<T, AdminError> {
        let response = self.call(Method::GET, path_and_query, None).await?;
        serde_json::from_str(&response.body).map_err(|e| AdminError::Decode(e.to_string()))
    }

    /// Sends `body` with `method` and decodes the JSON answer.
    pub async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &Value,
    ) -> Result<T, AdminError> {
        let response = self.call(method, path, Some(body)).await?;
        serde_json::from_str(&response.body).map_err(|e| AdminError::Decode(e.to_string()))
    }

    pub async fn status(&self) -> Result<kms_admin::views::StatusResponse, AdminError> {
        self.get("/api/v1/status").await
    }

    pub async fn cluster(&self) -> Result<kms_admin::ClusterStatus, AdminError> {
        self.get("/api/v1/cluster").await
    }

    pub async fn remove_member(&self, id: u64) -> Result<(), AdminError> {
        self.call(
            Method::DELETE,
            &format!("/api/v1/cluster/members/{id}"),
            None,
        )
        .await
        .map(|_| ())
    }

    pub async fn config(&self) -> Result<kms_admin::views::ConfigView, AdminError> {
        self.get("/api/v1/config").await
    }

    pub async fn set_config(
        &self,
        update: &Value,
    ) -> Result<kms_admin::views::ConfigView, AdminError> {
        self.send(Method::PUT, "/api/v1/config", update).await
    }
}

/// reqwest's error with its causes ("error sending request: connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

/// Builds a query string from the pairs whose value is present (values are URL-encoded).
pub fn query(pairs: &[(&str, Option<String>)]) -> String {
    let present: Vec<(&str, &str)> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (*k, v)))
        .collect();
    if present.is_empty() {
        return String::new();
    }
    let mut out = String::from("?");
    for (i, (k, v)) in present.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(&percent_encode(v));
    }
    out
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_queries() {
        let c = AdminClient::new("127.0.0.1:8688/", None, Duration::from_secs(1)).unwrap();
        assert_eq!(c.base_url(), "http://127.0.0.1:8688");
        assert!(AdminClient::new("ftp://x", None, Duration::from_secs(1)).is_err());
        assert!(AdminClient::new("http://:80", None, Duration::from_secs(1)).is_err());
        assert_eq!(
            query(&[
                ("a", Some("x y&z".into())),
                ("b", None),
                ("c", Some("1".into()))
            ]),
            "?a=x%20y%26z&c=1"
        );
        assert_eq!(query(&[("a", None)]), "");
    }

    #[test]
    fn exit_codes_by_error() {
        let api = AdminError::Api {
            status: 400,
            body: ErrorBody {
                error: "invalid_input".into(),
                message: "bad".into(),
                field: Some("policy.x".into()),
                leader_admin: None,
            },
        };
        assert_eq!(api.exit_code(), exit::API_ERROR);
        assert_eq!(api.to_string(), "HTTP 400 invalid_input: policy.x: bad");
        let auth = AdminError::Unauthorized {
            status: 401,
            message: "no".into(),
        };
        assert_eq!(auth.exit_code(), exit::UNAUTHORIZED);
        let down = AdminError::Unreachable {
            url: "u".into(),
            message: "refused".into(),
        };
        assert_eq!(down.exit_code(), exit::UNREACHABLE);
    }
}
