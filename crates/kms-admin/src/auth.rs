//! Bearer-token check for `/api/v1`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
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

/// Rate limit of failed token checks per source address: after `max_failures` failures
/// within `window`, the source is answered 429 (with `Retry-After`) until the window that
/// started with its first failure ends, whatever it sends, so a token cannot be guessed at
/// network speed. A correct token resets the source's count. Sources are IP addresses
/// (IPv6 by /64); the table is bounded (oldest windows dropped first).
#[derive(Debug)]
pub struct AuthLimiter {
    max_failures: u32,
    window: Duration,
    sources: Mutex<HashMap<SourceKey, Failures>>,
}

/// Most sources remembered at once.
const MAX_TRACKED: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SourceKey {
    V4(u32),
    V6(u64),
    Unknown,
}

impl SourceKey {
    fn of(ip: Option<IpAddr>) -> Self {
        match ip {
            Some(IpAddr::V4(v4)) => Self::V4(u32::from(v4)),
            Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(u32::from(v4)),
                None => Self::V6((u128::from(v6) >> 64) as u64),
            },
            None => Self::Unknown,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    since: Instant,
}

/// What the limiter says about a request before its token is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Open,
    /// Throttled; retry after this many seconds.
    Closed {
        retry_after_secs: u64,
    },
}

impl AuthLimiter {
    /// `max_failures` 0 disables the limit.
    pub fn new(max_failures: u32, window: Duration) -> Self {
        Self {
            max_failures,
            window: window.max(Duration::from_secs(1)),
            sources: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `ip` may try a token now.
    pub fn gate(&self, ip: Option<IpAddr>, now: Instant) -> Gate {
        if self.max_failures == 0 {
            return Gate::Open;
        }
        let Ok(sources) = self.sources.lock() else {
            return Gate::Open;
        };
        match sources.get(&SourceKey::of(ip)) {
            Some(f) if f.count >= self.max_failures => {
                let ends = f.since + self.window;
                if now >= ends {
                    Gate::Open
                } else {
                    let left = ends.saturating_duration_since(now);
                    Gate::Closed {
                        retry_after_secs: left.as_secs() + u64::from(left.subsec_nanos() > 0),
                    }
                }
            }
            _ => Gate::Open,
        }
    }

    /// Records a failed check; returns true when this failure closed the gate.
    pub fn failed(&self, ip: Option<IpAddr>, now: Instant) -> bool {
        if self.max_failures == 0 {
            return false;
        }
        let Ok(mut sources) = self.sources.lock() else {
            return false;
        };
        let window = self.window;
        if sources.len() >= MAX_TRACKED {
            sources.retain(|_, f| now.saturating_duration_since(f.since) < window);
            if sources.len() >= MAX_TRACKED {
                // Still full of live windows: forget the oldest.
                if let Some(oldest) = sources.iter().min_by_key(|(_, f)| f.since).map(|(k, _)| *k) {
                    sources.remove(&oldest);
                }
            }
        }
        let f = sources.entry(SourceKey::of(ip)).or_insert(Failures {
            count: 0,
            since: now,
        });
        if now.saturating_duration_since(f.since) >= window {
            *f = Failures {
                count: 0,
                since: now,
            };
        }
        f.count = f.count.saturating_add(1);
        f.count == self.max_failures
    }

    /// A correct token: the source starts again from zero.
    pub fn succeeded(&self, ip: Option<IpAddr>) {
        if self.max_failures == 0 {
            return;
        }
        if let Ok(mut sources) = self.sources.lock() {
            sources.remove(&SourceKey::of(ip));
        }
    }
}

/// What the token middleware needs.
#[derive(Clone)]
pub struct AuthState {
    pub token: Token,
    pub limiter: Arc<AuthLimiter>,
    /// Receives an event when a source gets throttled.
    pub events: Option<Arc<crate::events::EventLog>>,
    pub now_ms: Arc<dyn Fn() -> u64 + Send + Sync>,
}

/// Middleware: 429 for a throttled source, 401 with a JSON error unless the request carries
/// the token.
pub async fn require_token(
    State(auth): State<AuthState>,
    request: Request,
    next: Next,
) -> Response {
    if !auth.token.is_set() {
        return next.run(request).await;
    }
    let ip = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let now = Instant::now();
    if let Gate::Closed { retry_after_secs } = auth.limiter.gate(ip, now) {
        metrics::counter!("kms_admin_auth_refused_total", "reason" => "throttled").increment(1);
        return ApiError::TooManyRequests { retry_after_secs }.into_response();
    }
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if auth.token.accepts(authorization) {
        auth.limiter.succeeded(ip);
        next.run(request).await
    } else {
        metrics::counter!("kms_admin_auth_refused_total", "reason" => "unauthorized").increment(1);
        if auth.limiter.failed(ip, now) {
            let source = ip.map_or_else(|| "unknown".to_owned(), |i| i.to_string());
            tracing::warn!(%source, "admin API: too many failed token checks; source throttled");
            if let Some(events) = &auth.events {
                events.push(
                    (auth.now_ms)(),
                    crate::events::ids::ADMIN_AUTH_THROTTLED,
                    "warning",
                    format!(
                        "Admin API: {source} throttled after {} failed token checks",
                        auth.limiter.max_failures
                    ),
                    serde_json::json!({
                        "source": source,
                        "failures": auth.limiter.max_failures,
                        "window_secs": auth.limiter.window.as_secs(),
                    }),
                );
            }
        }
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
    fn failures_close_the_gate_per_source_for_the_window() {
        let l = AuthLimiter::new(3, Duration::from_secs(60));
        let a: Option<IpAddr> = Some("10.0.0.1".parse().unwrap());
        let b: Option<IpAddr> = Some("10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        assert!(!l.failed(a, t0));
        assert!(!l.failed(a, t0));
        assert_eq!(l.gate(a, t0), Gate::Open);
        assert!(l.failed(a, t0), "the third failure closes the gate");
        assert_eq!(
            l.gate(a, t0 + Duration::from_millis(500)),
            Gate::Closed {
                retry_after_secs: 60
            }
        );
        assert_eq!(l.gate(b, t0), Gate::Open, "another source is not affected");
        assert_eq!(l.gate(a, t0 + Duration::from_secs(60)), Gate::Open);
        // A new window starts from zero.
        assert!(!l.failed(a, t0 + Duration::from_secs(61)));
        assert_eq!(l.gate(a, t0 + Duration::from_secs(61)), Gate::Open);
    }

    #[test]
    fn success_resets_and_zero_disables() {
        let l = AuthLimiter::new(2, Duration::from_secs(60));
        let a: Option<IpAddr> = Some("2001:db8::1".parse().unwrap());
        let t0 = Instant::now();
        l.failed(a, t0);
        l.succeeded(a);
        assert!(!l.failed(a, t0));
        // Same /64 counts as the same source.
        assert!(l.failed(Some("2001:db8::2".parse().unwrap()), t0));
        let off = AuthLimiter::new(0, Duration::from_secs(60));
        for _ in 0..100 {
            assert!(!off.failed(a, t0));
        }
        assert_eq!(off.gate(a, t0), Gate::Open);
    }

    #[test]
    fn no_token_means_open_and_empty_means_none() {
        assert!(Token::new(None).accepts(None));
        assert!(!Token::new(Some("")).is_set());
        assert!(Token::new(Some("")).accepts(Some(b"anything")));
    }
}
