//! The admin HTTP endpoint: Prometheus metrics, JSON status, drain and enable, reload, and a
//! liveness probe.
//!
//! The routes, their answers and errors: docs/observability.md, "Admin endpoint".
//!
//! The endpoint stays off the data path: reads load the snapshot and atomics, as connections
//! do, and take no lock a connection takes; actions and reloads are messages to the control
//! task, which stays the only writer of the snapshot.

mod metrics;
mod status;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::config::Token;
use crate::control::Handle;
use crate::control::ReloadError;
use crate::control::{AdminError, Scope};
use crate::state::AdminState;

/// Listen backlog of the admin socket: a scraper and an operator or two, never a crowd.
const BACKLOG: u32 = 64;

/// Admin connections open at once; more are closed as they arrive.
const MAX_CONNECTIONS: usize = 64;

/// How long a connection may take to send a request head, counted from when the connection
/// waits for one: this also closes keep-alive connections idle that long (Prometheus, scraping
/// every 15 s, keeps its connection).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Binds the admin endpoint's socket and returns it with the address it got.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<(TcpListener, SocketAddr)> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // A restarted balancer can bind again while old admin connections are in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(BACKLOG)?;
    let local_addr = listener.local_addr()?;
    Ok((listener, local_addr))
}

/// Serves the admin endpoint on an inherited listening socket; returns it with its address.
pub(crate) fn adopt(socket: std::net::TcpListener) -> io::Result<(TcpListener, SocketAddr)> {
    socket.set_nonblocking(true)?;
    let listener = TcpListener::from_std(socket)?;
    let local_addr = listener.local_addr()?;
    Ok((listener, local_addr))
}

/// What the endpoint serves from.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    /// Live state, actions and reloads.
    pub(crate) handle: Handle,
    /// The bearer token every request but `/healthz` must carry, if one is configured.
    pub(crate) token: Option<Token>,
    /// The file reloads read, shown in `/status`.
    pub(crate) config_path: Option<PathBuf>,
    /// Cancelled when shutdown begins; `/healthz` then answers 503.
    pub(crate) shutting_down: CancellationToken,
    /// When the balancer started running, as `/status` shows it: a client that sees it move
    /// knows the process restarted and its counters began again.
    pub(crate) started: Started,
}

/// A moment kept both ways: monotonic for the uptime, wall-clock to show.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Started {
    at: std::time::Instant,
    wall: std::time::SystemTime,
}

impl Started {
    /// Now.
    pub(crate) fn now() -> Started {
        Started {
            at: std::time::Instant::now(),
            wall: std::time::SystemTime::now(),
        }
    }
}

/// The endpoint and its metrics registry, shared by every request.
#[derive(Debug)]
struct Shared {
    endpoint: Endpoint,
    registry: Registry,
}

type AppState = Arc<Shared>;

/// Serves the admin endpoint on `socket` until `stop` is cancelled, then lets the requests in
/// progress finish.
///
/// Each connection is served by hyper with a timer, so a client that sends no complete request
/// head within [`HEADER_TIMEOUT`] (a slow or silent client, or a keep-alive connection left
/// idle) is closed, and at most [`MAX_CONNECTIONS`] are open at once: the admin port shares the
/// process's descriptors with the data path, and on a non-loopback address the token is only
/// checked once a request has arrived.
pub(crate) async fn serve(socket: TcpListener, endpoint: Endpoint, stop: CancellationToken) {
    let registry = metrics::registry(endpoint.handle.clone());
    let app = router(Arc::new(Shared { endpoint, registry }));
    let open = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = socket.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) if crate::dataplane::accept::is_connection_error(&e) => continue,
            Err(e) => {
                // Out of descriptors, most likely: pause rather than spin.
                error!(error = %e, "admin endpoint: accept failed; pausing 100ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            warn!(
                max = MAX_CONNECTIONS,
                "admin endpoint: too many connections; closing a new one"
            );
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        connections.spawn(async move {
            let _permit = permit;
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            let served = tokio::select! {
                served = conn.as_mut() => served,
                () = stop.cancelled() => {
                    // Finish the request in progress, if any, then close.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = served {
                debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
    drop(socket);
    connections.close();
    connections.wait().await;
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(get_metrics))
        .route("/status", get(get_status))
        .route("/healthz", get(get_healthz))
        .route("/reload", post(post_reload))
        .route(
            "/listeners/{listener}/backends/{addr}/drain",
            post(post_drain),
        )
        .route(
            "/listeners/{listener}/backends/{addr}/enable",
            post(post_enable),
        )
        .route("/pools/{pool}/backends/{addr}/drain", post(post_pool_drain))
        .route(
            "/pools/{pool}/backends/{addr}/enable",
            post(post_pool_enable),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // A layer (not a route layer): unknown paths need the token too, so that a client
        // without it learns nothing about what is served.
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            authorize,
        ))
        .with_state(state)
}

/// An error answer: a status and a one-line message, sent as `{"error": message}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response =
            (self.status, axum::Json(json!({ "error": self.message }))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"weighbridge\""),
            );
        }
        response
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> ApiError {
        let status = match e {
            AdminError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            AdminError::RoutedListener(..) => StatusCode::BAD_REQUEST,
            _ => StatusCode::NOT_FOUND,
        };
        ApiError::new(status, e.to_string())
    }
}

/// Lets a request through when no token is configured, when it asks for `/healthz` (probes
/// rarely carry secrets, and the answer reveals nothing), or when it carries
/// `Authorization: Bearer <token>`.
async fn authorize(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(token) = &state.endpoint.token else {
        return next.run(request).await;
    };
    if request.uri().path() == "/healthz" {
        return next.run(request).await;
    }
    let Some(value) = request.headers().get(header::AUTHORIZATION) else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing bearer token: send `Authorization: Bearer <token>`",
        )
        .into_response();
    };
    if bearer(value.as_bytes()).is_some_and(|presented| token.matches(presented)) {
        next.run(request).await
    } else {
        ApiError::new(StatusCode::UNAUTHORIZED, "invalid bearer token").into_response()
    }
}

/// The credentials of an `Authorization: Bearer ...` header value (the scheme is
/// case-insensitive, RFC 9110 §11.1).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer ";
    let (scheme, rest) = value.split_at_checked(SCHEME.len())?;
    scheme
        .eq_ignore_ascii_case(SCHEME)
        .then(|| rest.trim_ascii())
}

async fn get_metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let mut body = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut body, &state.registry)
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics"))?;
    let content_type = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
    Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

async fn get_status(State(state): State<AppState>) -> Response {
    axum::Json(status::Status::of(&state.endpoint)).into_response()
}

async fn get_healthz(State(state): State<AppState>) -> Response {
    if state.endpoint.shutting_down.is_cancelled() {
        let body = axum::Json(json!({ "status": "shutting_down" }));
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    } else {
        axum::Json(json!({ "status": "ok" })).into_response()
    }
}

async fn post_reload(State(state): State<AppState>) -> Result<Response, ApiError> {
    info!("reload requested through the admin endpoint");
    match state.endpoint.handle.reload().await {
        Ok(summary) => Ok(axum::Json(json!({
            "ok": true,
            "changes": summary.to_string(),
            "needs_restart": summary.needs_restart,
        }))
        .into_response()),
        Err(e) => {
            let status = match e {
                ReloadError::Config(_) | ReloadError::Bind(_) => StatusCode::UNPROCESSABLE_ENTITY,
                ReloadError::NoConfigFile => StatusCode::CONFLICT,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            let body = axum::Json(json!({ "ok": false, "error": e.to_string() }));
            Ok((status, body).into_response())
        }
    }
}

async fn post_drain(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    set_admin_state(&state, path, Scope::Listener, AdminState::Drained).await
}

async fn post_enable(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    set_admin_state(&state, path, Scope::Listener, AdminState::Ready).await
}

async fn post_pool_drain(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    set_admin_state(&state, path, Scope::Pool, AdminState::Drained).await
}

async fn post_pool_enable(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    set_admin_state(&state, path, Scope::Pool, AdminState::Ready).await
}

/// Drains or enables the backend a path names (through a listener or a pool), and answers
/// with its state afterwards.
async fn set_admin_state(
    state: &Shared,
    path: Result<Path<(String, String)>, PathRejection>,
    scope: fn(String) -> Scope,
    admin_state: AdminState,
) -> Result<Response, ApiError> {
    let Path((name, addr)) =
        path.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let addr: SocketAddr = addr.trim().parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "invalid backend address `{addr}`: expected IP:port such as 127.0.0.1:9001 or [::1]:9001"
            ),
        )
    })?;
    let handle = &state.endpoint.handle;
    let scope = scope(name.clone());
    handle
        .set_admin_state_in(scope.clone(), addr, admin_state)
        .await
        .map_err(ApiError::from)?;
    let counters = handle
        .counters_in(&scope, addr)
        .ok_or_else(|| ApiError::from(scope.unknown_backend(addr)))?;
    let kind = match scope {
        Scope::Listener(_) => "listener",
        Scope::Pool(_) => "pool",
    };
    let mut body = json!({
        "backend": addr.to_string(),
        "admin_state": admin_state.as_str(),
        "active_connections": counters.active,
    });
    body[kind] = json!(name);
    Ok(axum::Json(body).into_response())
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {}", request.uri().path()),
    )
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_required() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"abc"), None);
        assert_eq!(bearer(b""), None);
    }
}
