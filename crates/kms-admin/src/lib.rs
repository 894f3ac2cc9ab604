//! The admin surface of a node: `/api/v1` JSON API (bearer-token auth), OpenAPI document,
//! `/healthz`, `/readyz`, `/metrics` and the operator dashboard at `/`.
//!
//! The crate knows nothing of Raft or sockets: the daemon implements [`AdminBackend`] and
//! serves [`router`] (and optionally [`ops_router`] on a separate metrics listener).

pub mod api;
pub mod auth;
pub mod backend;
mod dashboard;
pub mod error;
pub mod events;
pub mod extract;
pub mod metrics;
pub mod names;
pub mod service;
pub mod tokens;
pub mod views;

pub use api::{openapi, ops_router, router, AdminOptions};
pub use backend::{
    AdminBackend, BackendError, CertificateView, ClusterStatus, CreateTokenRequest,
    CreatedTokenView, DnsAdvert, DnsDomainStatus, DnsStatus, JoinRequest, JoinResponse,
    JoinTokenView, MemberStatus, NodeStatus, Readiness, Role,
};
pub use error::{ApiError, ErrorBody};
pub use events::{Event, EventLog, EventQuery};
