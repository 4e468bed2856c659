//! The operations endpoint (feature `http`): health, readiness, status as
//! JSON, Prometheus text, the status page, and the write routes (step-down,
//! drain, resume, transfer), each behind one bearer token. One axum router
//! on one listener, bound at start-up so that a bad address or a port in
//! use fails [`Builder::start`](crate::Builder::start) with one clear line.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::FutureExt;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::{info, warn};

use super::OpsConfig;
use crate::{Builder, Error, Result, RuntimeHandle};

/// The status page: one self-contained file.
const PAGE: &str = include_str!("page.html");
/// The most ids one `POST /holders` asks the backend about.
const MAX_HOLDERS: usize = 500;

impl Builder {
    /// Serves the operations endpoint on `addr` (default:
    /// `HIGHLANDER_HTTP`; not served when neither is set). `addr` is
    /// `IP:PORT` (`127.0.0.1:9400`, `[::1]:9400`, `0.0.0.0:9400`),
    /// `localhost:PORT`, or a port alone, which means loopback. Port 0 lets
    /// the system choose: read it with [`RuntimeHandle::http_addr`]. A
    /// non-loopback address is used only when given explicitly like this.
    /// A bad address or one in use makes [`Builder::start`] fail.
    ///
    /// Routes: `GET /healthz`, `/readyz`, `/status` (JSON of
    /// [`Status`](crate::Status)), `/metrics` (Prometheus text, with the
    /// `metrics` feature), `/` (the status page), `POST /holders`, and the
    /// write routes, which need [`Builder::http_token`]: `POST
    /// /step-down/{id}`, `POST /drain`, `POST /resume` and `POST
    /// /transfer/{id}?to=NODE`. Needs the `http` feature.
    #[cfg_attr(docsrs, doc(cfg(feature = "http")))]
    pub fn http(mut self, addr: impl Into<String>) -> Self {
        self.ops.http = Some(addr.into());
        self
    }

    /// The bearer token that the write routes require, `POST
    /// /step-down/{id}`, `/drain`, `/resume` and `/transfer/{id}` (default:
    /// `HIGHLANDER_HTTP_TOKEN`). Without one, they are disabled (403).
    /// Needs the `http` feature.
    #[cfg_attr(docsrs, doc(cfg(feature = "http")))]
    pub fn http_token(mut self, token: impl Into<String>) -> Self {
        self.ops.http_token = Some(token.into());
        self
    }
}

/// A listener bound at start-up, waiting for the handle.
pub(crate) struct Bound {
    listener: TcpListener,
    token: Option<Arc<str>>,
}

/// Parses an address the way `HIGHLANDER_HTTP` takes it.
pub(crate) fn parse_addr(text: &str) -> std::result::Result<SocketAddr, String> {
    let text = text.trim();
    let loopback = |port: &str| {
        port.parse::<u16>()
            .map(|p| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p))
            .map_err(|_| format!("`{port}` is not a port (0 to 65535)"))
    };
    if let Some(port) = text.strip_prefix(':') {
        return loopback(port);
    }
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return loopback(text);
    }
    if let Some(port) = text.strip_prefix("localhost:") {
        return loopback(port);
    }
    text.parse::<SocketAddr>().map_err(|_| {
        format!(
            "cannot use `{}`: give IP:PORT (127.0.0.1:9400, [::1]:9400), localhost:PORT, or a port alone for loopback",
            text.chars().take(60).collect::<String>()
        )
    })
}

/// Binds the listener when an address is configured (builder, else
/// `HIGHLANDER_HTTP`). With the `metrics` feature, also installs the
/// Prometheus recorder when the application has none, before any metric is
/// registered.
pub(crate) async fn bind(config: &OpsConfig) -> Result<Option<Bound>> {
    let (source, text) = match &config.http {
        Some(addr) => ("Builder::http", addr.clone()),
        None => match std::env::var("HIGHLANDER_HTTP") {
            Ok(addr) if !addr.trim().is_empty() => ("HIGHLANDER_HTTP", addr),
            _ => return Ok(None),
        },
    };
    let addr = parse_addr(&text).map_err(|why| Error::config(format!("{source}: {why}")))?;
    let token = match &config.http_token {
        Some(token) => Some(token.clone()),
        None => std::env::var("HIGHLANDER_HTTP_TOKEN").ok(),
    }
    .filter(|t| !t.is_empty())
    .map(Arc::from);
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        let what = match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                "the address is in use (another process listens there): pick another port, or 0 for any".to_string()
            }
            std::io::ErrorKind::AddrNotAvailable => {
                "no interface of this machine has that address".to_string()
            }
            std::io::ErrorKind::PermissionDenied => {
                "permission denied (ports below 1024 need privileges)".to_string()
            }
            _ => e.to_string(),
        };
        Error::config_with(format!("{source}: cannot listen on {addr}: {what}"), e)
    })?;
    #[cfg(feature = "metrics")]
    let _ = prometheus::handle();
    Ok(Some(Bound { listener, token }))
}

#[derive(Clone)]
struct App {
    handle: RuntimeHandle,
    token: Option<Arc<str>>,
}

/// Serves until the runtime has stopped.
pub(crate) fn serve(bound: Option<Bound>, handle: &RuntimeHandle) {
    let Some(Bound { listener, token }) = bound else {
        return;
    };
    let addr = match listener.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            warn!(error = %e, "the HTTP listener has no address: not serving");
            return;
        }
    };
    *handle.ops().http.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
    if addr.ip().is_loopback() {
        info!(node = handle.node(), %addr, "HTTP endpoint: http://{addr}/");
    } else {
        warn!(
            node = handle.node(),
            %addr,
            "HTTP endpoint on a non-loopback address: anyone who reaches it reads the status{}",
            if token.is_some() { ", and the token of the write routes travels in clear text unless a TLS proxy fronts it" } else { "" }
        );
    }
    let app = App {
        handle: handle.clone(),
        token,
    };
    let router = Router::new()
        .route("/", get(page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/holders", post(holders))
        .route("/step-down/{*id}", post(step_down))
        .route("/drain", post(drain))
        .route("/resume", post(resume))
        .route("/transfer/{*id}", post(transfer))
        .with_state(app);
    let stopped = handle.clone();
    tokio::spawn(async move {
        let server = axum::serve(listener, router)
            .with_graceful_shutdown(async move { stopped.stopped().await });
        if let Err(e) = server.await {
            warn!(error = %e, "the HTTP endpoint stopped");
        }
    });
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    let mut body = body.into();
    body.push('\n');
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

async fn healthz(State(app): State<App>) -> Response {
    text(
        StatusCode::OK,
        format!("ok: node {} is running", app.handle.node()),
    )
}

async fn readyz(State(app): State<App>) -> Response {
    if app.handle.is_stopping() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the node is shutting down",
        );
    }
    if !app.handle.ops().session_up() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the backend session is down (see /status)",
        );
    }
    text(StatusCode::OK, "ready: the backend session is up")
}

async fn status(State(app): State<App>) -> Response {
    json(&app.handle.status())
}

fn json<T: serde::Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            body,
        )
            .into_response(),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode: {e}"),
        ),
    }
}

/// `POST /holders` with a JSON array of ids: who holds each, as the backend
/// sees it from this node (`null` when nobody or unknown). The status page
/// asks for the rows it shows, to highlight ids that run here while the
/// backend names another holder.
async fn holders(State(app): State<App>, body: Bytes) -> Response {
    let ids: Vec<String> = match serde_json::from_slice(&body) {
        Ok(ids) => ids,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("the body must be a JSON array of ids: {e}"),
            );
        }
    };
    if ids.len() > MAX_HOLDERS {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("at most {MAX_HOLDERS} ids per request"),
        );
    }
    let lookups = ids.iter().map(|id| app.handle.holder(id));
    let answers = futures_util::future::join_all(lookups).await;
    let map: serde_json::Map<String, serde_json::Value> = ids
        .into_iter()
        .zip(answers)
        .map(|(id, answer)| {
            let value = match answer {
                Ok(Some(holder)) => serde_json::to_value(holder).unwrap_or_default(),
                Ok(None) => serde_json::Value::Null,
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            };
            (id, value)
        })
        .collect();
    json(&map)
}

/// The one rule of every write route: disabled (403) without a configured
/// token, refused (401) without the right bearer token. `None` lets the
/// request through.
fn refused(app: &App, headers: &HeaderMap, action: &str) -> Option<Response> {
    let Some(expected) = &app.token else {
        return Some(text(
            StatusCode::FORBIDDEN,
            format!(
                "{action} over HTTP is disabled: set HIGHLANDER_HTTP_TOKEN (or Builder::http_token) to enable it"
            ),
        ));
    };
    if !authorized(headers.get(header::AUTHORIZATION), expected) {
        let mut response = text(
            StatusCode::UNAUTHORIZED,
            "missing or wrong token: send `Authorization: Bearer <HIGHLANDER_HTTP_TOKEN>`",
        );
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return Some(response);
    }
    None
}

/// The answer of a write route once the node has begun shutting down.
fn shutting_down(action: &str) -> Response {
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("cannot {action}: the node is shutting down"),
    )
}

async fn step_down(State(app): State<App>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Some(refusal) = refused(&app, &headers, "step-down") {
        return refusal;
    }
    let running = app.handle.status().is_running(&id);
    match app.handle.step_down(&id) {
        Err(_) => text(
            StatusCode::NOT_FOUND,
            format!("no singleton `{id}` is configured on this node"),
        ),
        Ok(()) if running => {
            info!(node = app.handle.node(), id = %id, "step-down asked over HTTP");
            text(StatusCode::OK, format!("stepping down `{id}`"))
        }
        Ok(()) => text(
            StatusCode::CONFLICT,
            format!("`{id}` does not run on this node: nothing to step down"),
        ),
    }
}

/// How many ids this node holds now (running or finished).
fn held(handle: &RuntimeHandle) -> usize {
    handle
        .status()
        .singletons
        .iter()
        .filter(|s| s.token().is_some())
        .count()
}

/// `POST /drain`: begins a drain (or joins the one under way) and answers
/// at once with how many ids this node still holds; asking again reads the
/// count, which is 0 once every id is handed over.
async fn drain(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Some(refusal) = refused(&app, &headers, "drain") {
        return refusal;
    }
    if app.handle.is_stopping() {
        return shutting_down("drain");
    }
    let was_draining = app.handle.is_draining();
    // The drain begins at the call; the future only waits for its end, and
    // dropping it does not call the drain off.
    if let Some(Err(crate::Error::Stopped)) = app.handle.drain().now_or_never() {
        return shutting_down("drain");
    }
    if !was_draining {
        info!(node = app.handle.node(), "drain asked over HTTP");
    }
    json(&json!({
        "node": app.handle.node(),
        "draining": true,
        "started": !was_draining,
        "held": held(&app.handle),
    }))
}

/// `POST /resume`: calls a drain off; answers whether there was one.
async fn resume(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Some(refusal) = refused(&app, &headers, "resume") {
        return refusal;
    }
    if app.handle.is_stopping() {
        return shutting_down("resume");
    }
    let was_draining = app.handle.is_draining();
    app.handle.resume();
    if was_draining {
        info!(node = app.handle.node(), "resume asked over HTTP");
    }
    json(&json!({
        "node": app.handle.node(),
        "draining": false,
        "resumed": was_draining,
        "held": held(&app.handle),
    }))
}

/// The target node of `POST /transfer/{id}?to=NODE`, percent-decoded.
fn target(query: Option<&str>) -> std::result::Result<String, String> {
    const HOW: &str = "name the node to hand the id to: POST /transfer/{id}?to=NODE";
    let query = query.unwrap_or_default();
    let mut to = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key != "to" {
            return Err(format!(
                "unknown parameter `{}`: {HOW}",
                key.chars().take(40).collect::<String>()
            ));
        }
        if to.is_some() {
            return Err(format!("`to` is given twice: {HOW}"));
        }
        let value = crate::backend::kit::url::percent_decode(value)
            .map_err(|why| format!("`to`: {why}"))?;
        to = Some(value);
    }
    match to {
        Some(to) if !to.is_empty() => Ok(to),
        _ => Err(HOW.to_string()),
    }
}

/// `POST /transfer/{id}?to=NODE`: hands `id`, held here, over to `NODE`.
async fn transfer(
    State(app): State<App>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Some(refusal) = refused(&app, &headers, "transfer") {
        return refusal;
    }
    if app.handle.is_stopping() {
        return shutting_down("transfer");
    }
    let to = match target(query.as_deref()) {
        Ok(to) => to,
        Err(why) => return text(StatusCode::BAD_REQUEST, why),
    };
    let token = match held_token(&app.handle, &id) {
        Ok(token) => token,
        Err((code, why)) => return text(code, why),
    };
    match app.handle.transfer(&id, &to) {
        Ok(()) => {
            info!(node = app.handle.node(), id = %id, to = %to, "transfer asked over HTTP");
            json(&json!({
                "id": id,
                "from": app.handle.node(),
                "to": to,
                "token": token,
            }))
        }
        Err(crate::Error::Stopped) => shutting_down("transfer"),
        // The id may have gone or moved since the check above.
        Err(e) => match held_token(&app.handle, &id) {
            Ok(_) => text(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
            Err((code, why)) => text(code, why),
        },
    }
}

/// The token of this node's tenure of `id`; else the status and line that
/// say why there is none: 404 for an id not configured here, 409 for one
/// not held here.
fn held_token(handle: &RuntimeHandle, id: &str) -> std::result::Result<u64, (StatusCode, String)> {
    let status = handle.status();
    match status.singletons.iter().find(|s| s.id == id) {
        None => Err((
            StatusCode::NOT_FOUND,
            format!("no singleton `{id}` is configured on this node"),
        )),
        Some(s) => s.token().ok_or_else(|| {
            (
                StatusCode::CONFLICT,
                format!(
                    "`{id}` does not run on this node: ask the node that holds it (GET /status names it)"
                ),
            )
        }),
    }
}

/// Compares the bearer token in constant time (for tokens of equal length).
fn authorized(header: Option<&HeaderValue>, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    let Some(given) = header
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
    else {
        return false;
    };
    given.trim().as_bytes().ct_eq(expected.as_bytes()).into()
}

async fn metrics() -> Response {
    #[cfg(feature = "metrics")]
    {
        match prometheus::handle() {
            Some(handle) => (
                [(
                    header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                handle.render(),
            )
                .into_response(),
            None => text(
                StatusCode::NOT_FOUND,
                "the application installed its own metrics recorder: scrape the exporter it chose (highlander records into it)",
            ),
        }
    }
    #[cfg(not(feature = "metrics"))]
    text(
        StatusCode::NOT_FOUND,
        "metrics are off: build highlander with the `metrics` feature",
    )
}

#[cfg(feature = "metrics")]
mod prometheus {
    use std::sync::OnceLock;

    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

    /// Buckets of `highlander_claim_latency_seconds`.
    const LATENCY_BUCKETS: &[f64] = &[
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];

    /// The Prometheus recorder highlander installed, once per process; `None`
    /// when the application had installed a recorder of its own first.
    pub(super) fn handle() -> Option<PrometheusHandle> {
        static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
        HANDLE
            .get_or_init(|| {
                let builder = PrometheusBuilder::new();
                let builder = builder
                    .set_buckets_for_metric(
                        Matcher::Full(crate::ops::metrics::CLAIM_LATENCY.to_string()),
                        LATENCY_BUCKETS,
                    )
                    .unwrap_or_else(|_| PrometheusBuilder::new());
                let recorder = builder.build_recorder();
                let handle = recorder.handle();
                match metrics::set_global_recorder(recorder) {
                    Ok(()) => {
                        tracing::info!("installed the Prometheus recorder: GET /metrics renders it");
                        Some(handle)
                    }
                    Err(_) => {
                        tracing::info!(
                            "the application installed its own metrics recorder: highlander records into it, and GET /metrics answers 404"
                        );
                        None
                    }
                }
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(parse_addr("9400").unwrap().to_string(), "127.0.0.1:9400");
        assert_eq!(parse_addr(":0").unwrap().to_string(), "127.0.0.1:0");
        assert_eq!(
            parse_addr("localhost:81").unwrap().to_string(),
            "127.0.0.1:81"
        );
        assert_eq!(parse_addr("[::1]:9").unwrap().to_string(), "[::1]:9");
        assert_eq!(
            parse_addr("0.0.0.0:9400").unwrap().to_string(),
            "0.0.0.0:9400"
        );
        for bad in ["", "99999", "example.com:80", "127.0.0.1", "x:y"] {
            let e = parse_addr(bad).unwrap_err();
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn transfer_targets() {
        assert_eq!(target(Some("to=node-b")).unwrap(), "node-b");
        assert_eq!(target(Some("to=a%26b%3D1")).unwrap(), "a&b=1");
        assert_eq!(target(Some("&to=b&")).unwrap(), "b");
        for bad in [
            None,
            Some(""),
            Some("to="),
            Some("to"),
            Some("node=b"),
            Some("to=a&to=b"),
            Some("to=%4"),
            Some("to=%zz"),
        ] {
            let e = target(bad).unwrap_err();
            assert!(!e.contains('\n'), "{e}");
            assert!(
                e.contains("to=") || e.contains('%') || e.contains("twice"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn bearer_tokens() {
        let ok = HeaderValue::from_static("Bearer s3cret");
        assert!(authorized(Some(&ok), "s3cret"));
        for bad in [
            "Bearer s3cre",
            "Bearer s3cretx",
            "Basic s3cret",
            "s3cret",
            "Bearer ",
        ] {
            assert!(
                !authorized(Some(&HeaderValue::from_static(bad)), "s3cret"),
                "{bad}"
            );
        }
        assert!(!authorized(None, "s3cret"));
    }
}
