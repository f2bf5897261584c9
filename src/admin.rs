//! The admin HTTP server (loopback): liveness, readiness, metrics, the
//! config dump, the log filter (`GET`/`PUT /log-level`) and drain; and the
//! probe listener (the pod IP, for the kubelet and Prometheus): `/live`,
//! `/ready`, `/metrics` and `/app-health/<container>/<kind>`, which runs
//! the app's original probe ([`crate::probes`]). Nothing on the probe
//! listener changes state.
//!
//! What changes state (`POST /drain`, `PUT /log-level`) answers only a
//! loopback peer that names a loopback `Host`, and never what a browser
//! sends across origins (an `Origin` header, `Sec-Fetch-Site` other than
//! `none` or `same-origin`, or a form's content type): a web page the
//! operator visits must not drain the sidecar. Both listeners cap their
//! connections (`admin.maxConnections`) and keep the limits of
//! `connections.*`.
//!
//! `/ready` answers 200 once the listeners are bound, the identity is loaded
//! (its certificate valid now) and a policy is installed, and 503 again
//! while draining. Until a control plane issues the first certificate,
//! [`serve_starting`] answers instead. `/config` is
//! JSON describing the policy in force: version, routes, backends and their
//! endpoints.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::UNIX_EPOCH;

use crate::http::request_body::RequestBody;
use crate::resilience::outlier::EndpointState;
use http::{Method, Request, Response, StatusCode, header};
use hyper::service::service_fn;
use pylon_proto::policy::{BackendTls, Protocol};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::KubernetesInfo;
use crate::http::body::ProxyBody;
use crate::http::listener::Acceptor;
use crate::http::server::HttpServer;
use crate::identity::IdentityStore;
use crate::policy::PolicyStore;
use crate::probes::{AppProbes, ProbeKind, Prober};

/// Addresses the sidecar's listeners are bound to.
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    pub admin: SocketAddr,
    pub probe: SocketAddr,
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
}

/// What the admin server reports on and acts upon.
pub struct AdminState {
    pub addrs: BoundAddrs,
    pub policy: Arc<PolicyStore>,
    pub identity: Arc<IdentityStore>,
    pub listening: AtomicBool,
    pub shutdown: watch::Sender<bool>,
    /// The app's own probes, run by `/app-health/...`.
    pub app_probes: AppProbes,
    pub prober: Prober,
    pub kubernetes: KubernetesInfo,
}

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    /// Loopback: everything.
    Admin,
    /// The pod IP: read-only.
    Probe,
}

impl AdminState {
    fn not_ready_reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if *self.shutdown.borrow() {
            reasons.push("draining".to_string());
        }
        if !self.listening.load(Ordering::Acquire) {
            reasons.push("listeners not bound yet".to_string());
        }
        let credentials = self.identity.credentials();
        if !credentials.valid_at(crate::identity::unix_now()) {
            reasons.push(format!(
                "the certificate (serial {}) is not valid now",
                credentials.serial
            ));
        }
        if !self.policy.installed() {
            let why = match self.policy.status().last_error {
                Some(errors) => format!("no policy installed: {}", errors.join("; ")),
                None => "no policy installed yet".to_string(),
            };
            reasons.push(why);
        }
        reasons
    }
}

/// Serves the admin API (or, through `door`, the probe listener) until the
/// task is dropped (it outlives a drain, so that `/ready` can say so).
pub async fn serve(
    listener: Arc<TcpListener>,
    state: Arc<AdminState>,
    door: Door,
    server: HttpServer,
    acceptor: Acceptor,
) {
    loop {
        let (tcp, peer, open) = acceptor.accept(&listener).await;
        let state = state.clone();
        let svc = service_fn(move |req| {
            let state = state.clone();
            async move {
                let path = req.uri().path();
                if door == Door::Probe {
                    return Ok::<_, Infallible>(probe_door(&state, req).await);
                }
                if changes_state(&req)
                    && let Err(why) = may_change_state(peer, &req)
                {
                    tracing::warn!(%peer, path, why, "refused a state-changing admin request");
                    return Ok(text(StatusCode::FORBIDDEN, format!("forbidden: {why}\n")));
                }
                if path == "/log-level" {
                    return Ok::<_, Infallible>(log_level(req).await);
                }
                if path.starts_with(APP_HEALTH) {
                    return Ok::<_, Infallible>(app_health(&state, req).await);
                }
                Ok::<_, Infallible>(handle(&state, req))
            }
        });
        let server = server.clone();
        tokio::spawn(async move {
            let _ = server.serve(tcp, svc, None).await;
            drop(open);
        });
    }
}

/// Whether a request asks the admin API to change something.
fn changes_state<B>(req: &Request<B>) -> bool {
    matches!(
        (req.method(), req.uri().path()),
        (&Method::POST, "/drain") | (&Method::PUT, "/log-level")
    )
}

/// Content types a browser sends across origins without asking first (a
/// form, or `fetch` in no-cors mode).
const SIMPLE_CONTENT_TYPES: [&str; 3] = [
    "application/x-www-form-urlencoded",
    "multipart/form-data",
    "text/plain",
];

/// Whether a state-changing request may be served: from a loopback peer,
/// naming a loopback host, and not sent by a browser on behalf of another
/// origin. `Err` says why not.
fn may_change_state<B>(peer: SocketAddr, req: &Request<B>) -> Result<(), &'static str> {
    if !peer.ip().is_loopback() {
        return Err("the peer is not on loopback");
    }
    let host = req
        .uri()
        .host()
        .map(str::to_string)
        .or_else(|| {
            let host = req.headers().get(header::HOST)?.to_str().ok()?;
            http::uri::Authority::try_from(host)
                .ok()
                .map(|a| a.host().to_string())
        })
        .ok_or("no Host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback_host = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback_host {
        return Err("the Host is not a loopback name (DNS rebinding?)");
    }
    let headers = req.headers();
    if headers.contains_key(header::ORIGIN) {
        return Err("a browser sent it (Origin)");
    }
    if let Some(site) = headers.get("sec-fetch-site")
        && !matches!(site.as_bytes(), b"none" | b"same-origin")
    {
        return Err("a browser sent it for another site (Sec-Fetch-Site)");
    }
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let essence = ct
            .to_str()
            .unwrap_or_default()
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if SIMPLE_CONTENT_TYPES.contains(&essence.as_str()) {
            return Err("a form's content type, which a browser sends across origins");
        }
    }
    Ok(())
}

const APP_HEALTH: &str = "/app-health/";

/// The probe listener: reads only.
async fn probe_door(state: &AdminState, req: Request<RequestBody>) -> Response<ProxyBody> {
    let path = req.uri().path();
    if path.starts_with(APP_HEALTH) {
        return app_health(state, req).await;
    }
    match path {
        "/live" | "/ready" | "/metrics" => handle(state, req),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `GET /app-health/<container>/<startup|readiness|liveness>`: runs the
/// app's original probe; 200 when it passes, 503 with the reason when not.
async fn app_health(state: &AdminState, req: Request<RequestBody>) -> Response<ProxyBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    let rest = &req.uri().path()[APP_HEALTH.len()..];
    let probe = rest
        .split_once('/')
        .and_then(|(container, kind)| Some((container, ProbeKind::parse(kind)?)))
        .and_then(|(container, kind)| state.app_probes.get(container, kind));
    let Some(probe) = probe else {
        return text(
            StatusCode::NOT_FOUND,
            format!(
                "no app probe {rest:?} (known: {})\n",
                state.app_probes.names().join(", ")
            ),
        );
    };
    match state.prober.run(&probe).await {
        Ok(what) => text(StatusCode::OK, format!("ok: {what}\n")),
        Err(why) => {
            tracing::debug!(probe = rest, %why, "app probe failed");
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("app probe failed: {why}\n"),
            )
        }
    }
}

fn handle(state: &AdminState, req: Request<RequestBody>) -> Response<ProxyBody> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => {
            let reasons = state.not_ready_reasons();
            if reasons.is_empty() {
                match state.policy.source_state().note() {
                    Some(note) => text(StatusCode::OK, format!("ready ({note})\n")),
                    None => text(StatusCode::OK, "ready\n"),
                }
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {}\n", reasons.join(", ")),
                )
            }
        }
        (&Method::GET, "/metrics") => {
            crate::policy::refresh_gauges(&state.policy, &state.identity);
            let mut resp = Response::new(ProxyBody::full(state.policy.metrics().encode()));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        (&Method::GET, "/config") => {
            let mut resp = Response::new(ProxyBody::full(config_dump(state).to_string()));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            resp
        }
        (&Method::POST, "/drain") => {
            tracing::info!("drain requested on the admin API");
            state.shutdown.send_replace(true);
            text(StatusCode::ACCEPTED, "draining\n")
        }
        (_, "/live" | "/ready" | "/config" | "/metrics" | "/drain") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The admin API while the sidecar waits for its first certificate: alive,
/// not ready, nothing else yet. Each answer closes its connection, so that
/// no client stays on this server once the real one takes the listener.
pub async fn serve_starting(
    listener: Arc<TcpListener>,
    server: HttpServer,
    acceptor: Acceptor,
    last_error: crate::identity::control::LastError,
) {
    loop {
        let (tcp, _, open) = acceptor.accept(&listener).await;
        let last_error = last_error.clone();
        let svc = service_fn(move |req: Request<RequestBody>| {
            let mut resp = match (req.method(), req.uri().path()) {
                (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
                _ => {
                    let why = last_error
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone();
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        match why {
                            Some(e) => format!(
                                "not ready: waiting for the first certificate from the control plane (last error: {e})\n"
                            ),
                            None => "not ready: waiting for the first certificate from the control plane\n".to_string(),
                        },
                    )
                }
            };
            resp.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            async move { Ok::<_, Infallible>(resp) }
        });
        let server = server.clone();
        tokio::spawn(async move {
            let _ = server.serve(tcp, svc, None).await;
            drop(open);
        });
    }
}

/// The largest `PUT /log-level` body.
const MAX_LOG_LEVEL_BODY: usize = 4096;

/// `GET /log-level`: the filter in force; `PUT /log-level`: replace it with
/// the body (`debug`, `info,pylon::proxy=debug`). A directive that does not
/// parse is refused (400) and changes nothing.
async fn log_level(req: Request<RequestBody>) -> Response<ProxyBody> {
    use crate::telemetry::logging::{self, LevelError};
    let answer = |r: Result<String, LevelError>| match r {
        Ok(filter) => text(StatusCode::OK, format!("{filter}\n")),
        Err(e @ LevelError::Invalid(_)) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        Err(e @ LevelError::Unavailable) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    };
    match *req.method() {
        Method::GET => answer(logging::current_filter()),
        Method::PUT => {
            let body = http_body_util::Limited::new(req.into_body(), MAX_LOG_LEVEL_BODY);
            let bytes = match http_body_util::BodyExt::collect(body).await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("cannot read the body: {e}\n"),
                    );
                }
            };
            let Ok(directive) = std::str::from_utf8(&bytes) else {
                return text(StatusCode::BAD_REQUEST, "the body is not UTF-8\n");
            };
            let result = logging::set_filter(directive);
            if let Ok(filter) = &result {
                tracing::info!(%filter, "log filter changed on the admin API");
            }
            answer(result)
        }
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The JSON served at `/config`.
pub fn config_dump(state: &AdminState) -> Value {
    let snapshot = state.policy.load_full();
    let status = state.policy.status();
    let source = state.policy.source_state();
    let mut routes: Vec<Value> = Vec::new();
    for (host, rule) in snapshot.routes.describe() {
        let existing = routes.iter_mut().find(|r| {
            r["route"].as_str() == Some(&rule.route)
                && r["rule"].as_u64() == Some(rule.index as u64)
        });
        if let Some(r) = existing {
            if let Some(hosts) = r["hostnames"].as_array_mut() {
                hosts.push(json!(host));
            }
            continue;
        }
        let backends: Vec<Value> = rule
            .weighted_backends()
            .map(|(w, b)| json!({ "backend": &*b.name, "weight": w }))
            .collect();
        routes.push(json!({
            "route": &*rule.route,
            "rule": rule.index,
            "hostnames": [host],
            "backends": backends,
        }));
    }
    let now = tokio::time::Instant::now();
    let backends: Vec<Value> = snapshot
        .backends
        .values()
        .map(|b| {
            let config = b.config();
            let endpoints: Vec<Value> = b
                .endpoints()
                .iter()
                .map(|e| {
                    let (state, ejected_for_ms) = match e.health.state(now) {
                        EndpointState::Active => ("active", None),
                        EndpointState::Probation => ("probation", None),
                        EndpointState::Ejected { remaining } => {
                            ("ejected", Some(remaining.as_millis() as u64))
                        }
                    };
                    json!({
                        "address": e.addr().to_string(),
                        "state": state,
                        "ejectedForMs": ejected_for_ms,
                        "ejections": e.health.ejections_total(),
                        "inFlight": e.load.in_flight(),
                        "connections": e.pool.open_connections(),
                    })
                })
                .collect();
            json!({
                "name": &*b.name,
                "protocol": config.protocol.map(Protocol::as_str),
                "loadBalancer": config.load_balancer.as_str(),
                "tls": match &config.tls {
                    BackendTls::Mesh { identity } => json!({ "mode": "mesh", "identity": identity }),
                    BackendTls::Disabled => json!({ "mode": "disabled" }),
                },
                "endpoints": endpoints,
            })
        })
        .collect();
    let credentials = state.identity.credentials();
    json!({
        "identity": credentials.spiffe_id,
        "certificate": {
            "serial": credentials.serial,
            "issuer": credentials.issuer,
            "notBefore": credentials.not_before,
            "notAfter": credentials.not_after,
        },
        "trustBundle": &*state.identity.bundle_fingerprints(),
        "kubernetes": &state.kubernetes,
        "appProbes": state.app_probes.names(),
        "listeners": {
            "admin": state.addrs.admin.to_string(),
            "probe": state.addrs.probe.to_string(),
            "outbound": state.addrs.outbound.to_string(),
            "inbound": state.addrs.inbound.to_string(),
        },
        "policy": {
            "source": state.policy.source(),
            "sourceState": {
                "connected": source.connected,
                "fromCache": source.from_cache,
                "lastError": source.last_error,
            },
            "installed": state.policy.installed(),
            "version": snapshot.version,
            "resources": snapshot.resources.len(),
            "appliedAt": status.last_applied.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs()),
            "lastError": status.last_error,
            "lastRejectedVersion": status.last_rejected_version,
        },
        "routes": routes,
        "backends": backends,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn only_a_local_non_browser_request_changes_state() {
        let local: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let remote: SocketAddr = "10.0.0.7:40000".parse().unwrap();
        let ok = |peer, r: &Request<()>| may_change_state(peer, r).is_ok();
        let drain = |h: &[(&str, &str)]| req(Method::POST, "/drain", h);

        assert!(ok(local, &drain(&[("host", "127.0.0.1:15000")])));
        assert!(ok(local, &drain(&[("host", "localhost:15000")])));
        assert!(ok(local, &drain(&[("host", "[::1]:15000")])));
        assert!(ok(
            local,
            &drain(&[("host", "localhost"), ("sec-fetch-site", "same-origin")])
        ));
        assert!(ok(
            local,
            &req(
                Method::PUT,
                "/log-level",
                &[
                    ("host", "localhost"),
                    ("content-type", "application/octet-stream")
                ]
            )
        ));

        assert!(!ok(remote, &drain(&[("host", "127.0.0.1:15000")])));
        assert!(!ok(local, &drain(&[])), "no Host");
        assert!(!ok(local, &drain(&[("host", "evil.example:15000")])));
        assert!(!ok(
            local,
            &drain(&[("host", "localhost"), ("origin", "https://evil.example")])
        ));
        assert!(!ok(
            local,
            &drain(&[("host", "localhost"), ("origin", "null")])
        ));
        assert!(!ok(
            local,
            &drain(&[("host", "localhost"), ("sec-fetch-site", "cross-site")])
        ));
        for ct in [
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "Text/Plain;charset=utf-8",
        ] {
            assert!(
                !ok(
                    local,
                    &drain(&[("host", "localhost"), ("content-type", ct)])
                ),
                "{ct}"
            );
        }
    }

    #[test]
    fn drain_and_log_level_writes_change_state() {
        assert!(changes_state(&req(Method::POST, "/drain", &[])));
        assert!(changes_state(&req(Method::PUT, "/log-level", &[])));
        assert!(!changes_state(&req(Method::GET, "/log-level", &[])));
        assert!(!changes_state(&req(Method::GET, "/ready", &[])));
    }
}
