//! The routers: `/api/v1` (token-protected, documented by the OpenAPI document built from
//! the handlers' annotations), health and metrics (open), and the dashboard.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{middleware, Json, Router};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{require_token, AuthLimiter, AuthState, Token};
use crate::backend::{AdminBackend, ClusterStatus, JoinRequest, JoinResponse, Readiness};
use crate::error::{ApiError, ErrorBody};
use crate::events::{ids, EventQuery};
use crate::extract::{ApiJson, QueryParams, MAX_BODY_BYTES};
use crate::views::*;
use crate::{dashboard, metrics, names, service};

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub backend: Arc<dyn AdminBackend>,
    openapi_json: Arc<String>,
}

/// How the admin surface is set up.
#[derive(Clone, Debug, Default)]
pub struct AdminOptions {
    /// Bearer token every `/api/v1` call must carry; `None` = open (loopback only).
    pub token: Option<String>,
    /// Failed token checks per source address and window before 429; 0 = no limit.
    pub auth_failures: u32,
    /// The window of `auth_failures`.
    pub auth_window: std::time::Duration,
    /// The admin API is served over TLS (redirects to the leader use `https`).
    pub tls: bool,
}

impl AdminOptions {
    fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "kms-cluster admin API",
        description = "Operate a kms-cluster KMS host: status (like slmgr /dlv), cluster membership, client inventory, event log, replicated configuration, product catalog. Every call needs `Authorization: Bearer <token>` when the node has an admin token.",
        license(name = "MIT OR Apache-2.0")
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "status", description = "Host status"),
        (name = "cluster", description = "Cluster membership"),
        (name = "clients", description = "Client inventory"),
        (name = "events", description = "Event log"),
        (name = "config", description = "Replicated configuration"),
        (name = "products", description = "Product catalog"),
        (name = "meta", description = "This document")
    )
)]
struct ApiDoc;

fn api_parts() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(get_status))
        .routes(routes!(get_cluster))
        .routes(routes!(join_cluster))
        .routes(routes!(remove_member))
        .routes(routes!(
            crate::tokens::create_token,
            crate::tokens::list_tokens
        ))
        .routes(routes!(crate::tokens::revoke_token))
        .routes(routes!(crate::tokens::rotate_certificate))
        .routes(routes!(get_clients))
        .routes(routes!(get_events))
        .routes(routes!(get_config, put_config))
        .routes(routes!(get_products))
        .routes(routes!(get_catalog, put_catalog))
        .routes(routes!(get_openapi))
        .split_for_parts()
}

/// The OpenAPI document of `/api/v1` (what `/api/v1/openapi.json` serves).
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_parts().1
}

/// The whole admin surface: `/api/v1/*`, `/healthz`, `/readyz`, `/metrics` and the dashboard.
pub fn router(backend: Arc<dyn AdminBackend>, options: &AdminOptions) -> Router {
    let (api, doc) = api_parts();
    let openapi_json = Arc::new(doc.to_pretty_json().unwrap_or_else(|_| "{}".to_owned()));
    let auth = AuthState {
        token: Token::new(options.token.as_deref()),
        limiter: Arc::new(AuthLimiter::new(options.auth_failures, options.auth_window)),
        events: Some(backend.events()),
        now_ms: {
            let backend = backend.clone();
            Arc::new(move || backend.now_ms())
        },
    };
    let state = AppState {
        backend,
        openapi_json,
    };
    let api = api
        .route_layer(middleware::from_fn_with_state(auth, require_token))
        .layer(middleware::from_fn_with_state(
            options.scheme(),
            crate::error::redirect_to_leader,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    Router::new()
        .merge(api)
        .merge(dashboard::routes())
        .merge(ops_routes())
        .fallback(not_found)
        .with_state(state)
}

/// Only `/healthz`, `/readyz` and `/metrics`, for a separate metrics listener.
pub fn ops_router(backend: Arc<dyn AdminBackend>) -> Router {
    Router::new()
        .merge(ops_routes())
        .fallback(not_found)
        .with_state(AppState {
            backend,
            openapi_json: Arc::new(String::new()),
        })
}

fn ops_routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such path".into())
}

async fn healthz() -> Json<HealthResponse> {
    Json(HealthResponse {
        status: "ok".into(),
        reason: None,
    })
}

/// `?for=member` (default: a caught-up member with a known leader) or `?for=kms` (able to
/// answer KMS clients, also without a quorum).
async fn readyz(State(s): State<AppState>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let mut q = QueryParams::parse(raw.as_deref())?;
    let scope = q
        .take("for")
        .map(|v| Readiness::parse(&v).map_err(|e| ApiError::invalid("for", e)))
        .transpose()?
        .unwrap_or_default();
    q.finish()?;
    Ok(match s.backend.readiness(scope) {
        Ok(()) => Json(HealthResponse {
            status: "ready".into(),
            reason: None,
        })
        .into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(HealthResponse {
                status: "not ready".into(),
                reason: Some(reason),
            }),
        )
            .into_response(),
    })
}

async fn metrics_handler(State(s): State<AppState>) -> Response {
    // The scrape-time families are computed now from the node's own view, so they win over
    // a same-named family the node's recorder may hold (possibly older, or with series of
    // removed followers).
    let ours = metrics::render_state_metrics(s.backend.as_ref()).await;
    let mut text = metrics::without_families_in(&s.backend.render_metrics(), &ours);
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&ours);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Host status: what `slmgr /dlv` shows on a KMS host, plus node and cluster facts.
#[utoipa::path(
    get, path = "/api/v1/status", tag = "status",
    responses(
        (status = 200, description = "Status of this node", body = StatusResponse),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 429, description = "Too many failed token checks from this address; see Retry-After", body = ErrorBody)
    )
)]
async fn get_status(State(s): State<AppState>) -> Json<StatusResponse> {
    Json(service::status(s.backend.as_ref()).await)
}

/// Cluster members, leader and replication progress.
#[utoipa::path(
    get, path = "/api/v1/cluster", tag = "cluster",
    responses(
        (status = 200, description = "Cluster membership", body = ClusterStatus),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 429, description = "Too many failed token checks from this address; see Retry-After", body = ErrorBody),
        (status = 503, description = "No leader known", body = ErrorBody)
    )
)]
async fn get_cluster(State(s): State<AppState>) -> Result<Json<ClusterStatus>, ApiError> {
    Ok(Json(s.backend.cluster().await?))
}

/// Adds a node to the cluster (called by a starting node with `--join`).
#[utoipa::path(
    post, path = "/api/v1/cluster/join", tag = "cluster",
    request_body = JoinRequest,
    responses(
        (status = 200, description = "Joined", body = JoinResponse),
        (status = 400, description = "Invalid request; `field` names the problem", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 429, description = "Too many failed token checks from this address; see Retry-After", body = ErrorBody),
        (status = 409, description = "Conflicts with the membership", body = ErrorBody),
        (status = 503, description = "Not the leader / no quorum; `leader_admin` when known", body = ErrorBody)
    )
)]
async fn join_cluster(
    State(s): State<AppState>,
    ApiJson(request): ApiJson<JoinRequest>,
) -> Result<Json<JoinResponse>, ApiError> {
    if request.node_id == 0 {
        return Err(ApiError::invalid("node_id", "must be >= 1"));
    }
    for (field, addr) in [
        ("raft_addr", &request.raft_addr),
        ("admin_addr", &request.admin_addr),
    ] {
        if addr.trim().is_empty() || addr.len() > 256 {
            return Err(ApiError::invalid(field, "must be a non-empty address"));
        }
    }
    let response = s.backend.join(request.clone()).await?;
    s.backend.events().push(
        s.backend.now_ms(),
        ids::MEMBERSHIP,
        "info",
        format!("node {} joined the cluster", request.node_id),
        serde_json::json!({ "node_id": request.node_id, "raft_addr": request.raft_addr, "admin_addr": request.admin_addr }),
    );
    Ok(Json(response))
}

/// Removes a member from the cluster.
#[utoipa::path(
    delete, path = "/api/v1/cluster/members/{id}", tag = "cluster",
    params(("id" = u64, Path, description = "Node id of the member")),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 429, description = "Too many failed token checks from this address; see Retry-After", body = ErrorBody),
        (status = 404, description = "No such member", body = ErrorBody),
        (status = 409, description = "Cannot remove it (e.g. the last voter)", body = ErrorBody),
        (status = 503, description = "Not the leader / no quorum", body = ErrorBody)
    )
)]
async fn remove_member(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id: u64 = id
        .parse()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| ApiError::invalid("id", format!("{id:?} is not a node id (>= 1)")))?;
    s.backend.remove_member(id).await?;
    s.backend.events().push(
        s.backend.now_ms(),
        ids::MEMBERSHIP,
        "warning",
        format!("node {id} removed from the cluster"),
        serde_json::json!({ "node_id": id }),
    );
    Ok(StatusCode::NO_CONTENT)
}

fn page_limit(q: &mut QueryParams) -> Result<usize, ApiError> {
    let limit = q
        .take_parsed::<usize>("limit")?
        .unwrap_or(service::DEFAULT_PAGE);
    if !(1..=service::MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("{limit} is outside 1..={}", service::MAX_PAGE),
        ));
    }
    Ok(limit)
}

/// Registered clients, newest first, filtered and paged; `format=csv` for a CSV export.
#[utoipa::path(
    get, path = "/api/v1/clients", tag = "clients",
    params(ClientsParams),
    responses(
        (status = 200, description = "A page of clients (JSON), or CSV with `format=csv`",
            content((ClientsPage = "application/json"), (String = "text/csv"))),
        (status = 400, description = "Bad filter; `field` names the parameter", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 429, description = "Too many failed token checks from this address; see Retry-After", body = ErrorBody)
    )
)]
async fn get_clients(
    State(s): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let mut q = QueryParams::parse(raw.as_deref())?;
    let application = q
        .take("application")
        .map(|v| names::parse_application(&v).map_err(|e| ApiError::invalid("application", e)))
        .transpose()?;
    let product = q
        .take("product")
        .map(|v| names::parse_product(&v).map_err(|e| ApiError::invalid("product", e)))
        .transpose()?;
    let since = q
        .take("since")
        .map(|v| names::parse_time_ms(&v).map_err(|e| ApiError::invalid("since", e)))
        .transpose()?;
    let search = q.take("search").map(|v| v.trim().to_lowercase());
    let offset = q.take_parsed::<usize>("offset")?.unwrap_or(0);
    let limit = page_limit(&mut q)?;
    let csv = match q.take("format").as_deref() {
        None | Some("json") => false,
        Some("csv") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "format",
                format!("{other:?} is not json or csv"),
            ))
        }
    };
    q.finish()?;
    let filter = service::ClientFilter {
        application,
        product,
        since,
        search,
        offset,
        limit,
    };
    let state_lock = s.backend.state();
    let page = service::query_clients(&*state_lock.read().await, &filter);
    Ok(if csv {
        (
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"kms-clients.csv\"",
                ),
            ],
            service::clients_csv(&page),
        )
            .into_response()
    } else {
        Json(page).into_response()
    })
}

/// The node's event log: activations (12290), DNS publishing (12293 failure, 12294 success),
/// node, membership, configuration and quorum events. Newest first; bounded retention.
#[utoipa::path(
    get, path = "/api/v1/events", tag = "events",
    params(EventsParams),
    responses(
        (status = 200, description = "Events, newest first", body = EventsPage),
        (status = 400, description = "Bad parameter", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 429, description = "Too many failed token checks from this address; see Retry-After", body = ErrorBody)
    )
)]
async fn get_events(
    State(s): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Json<EventsPage>, ApiError> {
    let mut q = QueryParams::parse(raw.as_deref())?;
    let event_id = q.take_parsed::<u32>("event_id")?;
    let after = q.take_parsed::<u64>("after")?;
    let limit = page_limit(&mut q)?;
    q.finish()?;
    let log = s.backend.events();
    Ok(Json(EventsPage {
        events: log.query(&EventQuery {
            event_id,
            after,
            limit: Some(limit),
        }),
        retained: log.len(),
    }))
}

/// The replicated configuration: policy and host identity.
#[utoipa::path(
    get, path = "/api/v1/config", tag = "config",
    responses(
        (status = 200, description = "Current configuration", body = ConfigView),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 429, description = "Too many failed token checks from this address; see Retry-After", body = ErrorBody)
    )
)]
async fn get_config(State(s): State<AppState>) -> Json<ConfigView> {
    let state_lock = s.backend.state();
    let view = service::config_view(&*state_lock.read().await);
    Json(view)
}

/// Changes the replicated configuration. Absent fields stay; the whole request is validated
/// before anything is changed.
#[utoipa::path(
    put, path = "/api/v1/config", tag = "config",
    request_body = ConfigUpdate,
    responses(
        (status = 200, description = "Configuration after the change", body = ConfigView),
        (status = 400, description = "Invalid JSON, unknown field or out-of-range value; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 409, description = "`expected_version` is not the current configuration version (another change was applied first), or the identity is not initialised; nothing was changed", body = ErrorBody),
        (status = 429, description = "Too many failed token checks from this address; see Retry-After", body = ErrorBody),
        (status = 503, description = "Not the leader / no quorum", body = ErrorBody)
    )
)]
async fn put_config(
    State(s): State<AppState>,
    ApiJson(update): ApiJson<ConfigUpdate>,
) -> Result<Json<ConfigView>, ApiError> {
    Ok(Json(
        service::update_config(s.backend.as_ref(), &update).await?,
    ))
}

/// The product catalog: product groups (KMS ids) with their editions and whether the current
/// policy activates them; the CSVLKs.
#[utoipa::path(
    get, path = "/api/v1/products", tag = "products",
    params(ProductsParams),
    responses(
        (status = 200, description = "Catalog", body = ProductsResponse),
        (status = 400, description = "Bad parameter", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 429, description = "Too many failed token checks from this address; see Retry-After", body = ErrorBody)
    )
)]
async fn get_products(
    State(s): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Json<ProductsResponse>, ApiError> {
    let mut q = QueryParams::parse(raw.as_deref())?;
    let search = q.take("search");
    let activated = q.take_parsed::<bool>("activated")?;
    q.finish()?;
    let state_lock = s.backend.state();
    let response = service::products(&*state_lock.read().await, search.as_deref(), activated);
    Ok(Json(response))
}

/// Largest catalog `PUT /api/v1/catalog` accepts.
pub const MAX_CATALOG_BYTES: usize = 8 * 1024 * 1024;

/// The whole replicated product catalog as JSON: applications, KMS ids, editions (SKUs with
/// GVLKs) and host keys with what each activates and the source of each fact. The format
/// `PUT /api/v1/catalog` takes.
#[utoipa::path(
    get, path = "/api/v1/catalog", tag = "products",
    responses(
        (status = 200, description = "The replicated catalog", content_type = "application/json"),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No catalog replicated yet", body = ErrorBody)
    )
)]
async fn get_catalog(State(s): State<AppState>) -> Result<Response, ApiError> {
    let state_lock = s.backend.state();
    let shared = state_lock.read().await.catalog().shared();
    let Some(catalog) = shared else {
        return Err(ApiError::NotFound("no catalog replicated yet".into()));
    };
    Ok(Json(&*catalog).into_response())
}

/// Replaces the product catalog in the whole cluster. The file is validated whole first: a
/// bad one is refused with 400 naming the field (e.g. `host_keys[3].activates[0]`) and
/// nothing changes.
#[utoipa::path(
    put, path = "/api/v1/catalog", tag = "products",
    request_body(content = String, description = "A catalog in the format of GET /api/v1/catalog", content_type = "application/json"),
    responses(
        (status = 200, description = "Catalog replicated", body = CatalogSummary),
        (status = 400, description = "Invalid catalog; `field` names the problem", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 503, description = "Not the leader / no quorum", body = ErrorBody)
    )
)]
async fn put_catalog(
    State(s): State<AppState>,
    body: axum::body::Body,
) -> Result<Json<CatalogSummary>, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_CATALOG_BYTES)
        .await
        .map_err(|e| {
            ApiError::invalid(
                "body",
                format!("cannot read the body (at most {MAX_CATALOG_BYTES} bytes): {e}"),
            )
        })?;
    let catalog: kms_catalog::CatalogData =
        crate::extract::parse_json_limited(&bytes, MAX_CATALOG_BYTES)?;
    Ok(Json(
        service::import_catalog(s.backend.as_ref(), catalog).await?,
    ))
}

/// This OpenAPI document.
#[utoipa::path(
    get, path = "/api/v1/openapi.json", tag = "meta",
    responses(
        (status = 200, description = "OpenAPI 3.1 document", content_type = "application/json"),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 429, description = "Too many failed token checks from this address; see Retry-After", body = ErrorBody)
    )
)]
async fn get_openapi(State(s): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        s.openapi_json.as_str().to_owned(),
    )
        .into_response()
}
