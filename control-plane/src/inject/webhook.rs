//! The mutating admission webhook: `POST /inject` answers the API server's
//! AdmissionReview (v1) for a Pod CREATE with the JSON Patch that injects
//! the pod; `GET /healthz` says it is up. HTTPS (HTTP/1.1 and h2) with the
//! control plane's serving certificate.
//!
//! It never answers with a server error, which the API server would turn
//! into a failed pod creation or an unmeshed pod depending on the
//! webhook's `failurePolicy`. A request it cannot read is allowed as it is,
//! with a warning that says why; a pod it cannot inject is refused (400)
//! with every problem, so that the mistake is seen where it was made.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::ServerConfig;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{InjectOptions, inject_pod, patch};
use crate::tls;

/// The largest AdmissionReview read (the API server's own objects are
/// smaller than 1.5 MiB).
pub const MAX_BODY: usize = 4 << 20;
/// How long a client may take to send a request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
const API_VERSION: &str = "admission.k8s.io/v1";

/// Where the webhook listens, and what it injects.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub listen: SocketAddr,
    pub inject: InjectOptions,
}

/// The AdmissionReview that answers the request `body`.
pub fn review(body: &[u8], options: &InjectOptions) -> Value {
    let review: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return unread(None, &format!("the request body is not JSON: {e}")),
    };
    let request = &review["request"];
    let uid = request.get("uid").and_then(Value::as_str);
    if review.get("apiVersion").and_then(Value::as_str) != Some(API_VERSION)
        || review.get("kind").and_then(Value::as_str) != Some("AdmissionReview")
    {
        return unread(
            uid,
            &format!("the request is not an {API_VERSION} AdmissionReview"),
        );
    }
    let Some(uid) = uid else {
        return unread(None, "the AdmissionReview has no request.uid");
    };
    if let Err(why) = is_pod_create(request) {
        return unread(Some(uid), &why);
    }
    let pod = &request["object"];
    if !pod.is_object() {
        return unread(Some(uid), "the request has no pod in request.object");
    }
    let name = pod_name(pod, request.get("namespace").and_then(Value::as_str));
    match inject_pod(pod, options) {
        Ok(injected) => {
            let ops = patch::diff(pod, &injected);
            if ops.is_empty() {
                tracing::debug!(pod = %name, "not injected (opted out, already injected or host network)");
            } else {
                tracing::info!(pod = %name, "injected");
            }
            allowed(uid, &ops)
        }
        Err(e) => {
            let message = format!("pylon cannot inject pod {name}: {}", e.one_line());
            tracing::warn!(pod = %name, problems = %e.one_line(), "injection refused");
            refused(uid, &message)
        }
    }
}

/// Only Pod CREATE requests are injected (the webhook's rules should send
/// no others).
fn is_pod_create(request: &Value) -> Result<(), String> {
    let kind = &request["kind"];
    let is_pod = kind["group"].as_str().unwrap_or_default().is_empty()
        && kind["version"] == "v1"
        && kind["kind"] == "Pod";
    if !is_pod {
        return Err(format!("only pods are injected, not {kind}"));
    }
    if let Some(sub) = request["subResource"].as_str().filter(|s| !s.is_empty()) {
        return Err(format!(
            "only pods are injected, not their {sub:?} subresource"
        ));
    }
    match request["operation"].as_str() {
        Some("CREATE") => Ok(()),
        other => Err(format!(
            "only CREATE is injected, not {}",
            other.unwrap_or("a request without an operation")
        )),
    }
}

/// `default/web-5d8f-*`: the request's namespace when the pod has none
/// yet, a generated name's prefix when it has no name yet.
fn pod_name(pod: &Value, request_namespace: Option<&str>) -> String {
    let metadata = &pod["metadata"];
    let namespace = metadata["namespace"]
        .as_str()
        .filter(|n| !n.is_empty())
        .or(request_namespace)
        .unwrap_or("default");
    match (metadata["name"].as_str(), metadata["generateName"].as_str()) {
        (Some(name), _) if !name.is_empty() => format!("{namespace}/{name}"),
        (_, Some(prefix)) => format!("{namespace}/{prefix}*"),
        _ => format!("{namespace}/(no name)"),
    }
}

fn answer(response: Value) -> Value {
    json!({ "apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response })
}

fn allowed(uid: &str, ops: &[Value]) -> Value {
    if ops.is_empty() {
        return answer(json!({ "uid": uid, "allowed": true }));
    }
    let patch = Value::Array(ops.to_vec()).to_string();
    answer(json!({
        "uid": uid,
        "allowed": true,
        "patchType": "JSONPatch",
        "patch": BASE64.encode(patch),
    }))
}

/// Allowed unchanged: the request could not be read as a pod to inject.
fn unread(uid: Option<&str>, why: &str) -> Value {
    tracing::warn!(
        uid = uid.unwrap_or_default(),
        "admission request not injected: {why}"
    );
    answer(json!({
        "uid": uid.unwrap_or_default(),
        "allowed": true,
        "warnings": [format!("pylon did not inject this pod: {why}")],
        "status": { "message": why },
    }))
}

fn refused(uid: &str, message: &str) -> Value {
    answer(json!({
        "uid": uid,
        "allowed": false,
        "status": { "code": 400, "reason": "BadRequest", "message": message },
    }))
}

/// Serves the webhook on `listener` until the task is dropped (its
/// connections with it). Each connection gets the TLS configuration
/// current when it is accepted.
pub async fn serve(
    listener: TcpListener,
    configs: watch::Receiver<Arc<ServerConfig>>,
    guard: tls::Guard,
    options: InjectOptions,
) {
    let options = Arc::new(options);
    let limits = guard.limits.clone();
    let mut incoming = tls::incoming(listener, configs, guard);
    let mut connections = JoinSet::new();
    while let Some(connection) = incoming.next().await {
        let Ok(connection) = connection else {
            continue;
        };
        let options = options.clone();
        let limits = limits.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let options = options.clone();
                async move { Ok::<_, Infallible>(handle(req, &options).await) }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .max_headers(100);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(limits.max_concurrent_streams)
                .max_pending_accept_reset_streams(limits.max_pending_accept_reset_streams)
                .max_local_error_reset_streams(limits.max_local_error_reset_streams)
                .max_header_list_size(limits.max_header_list_size)
                .keep_alive_interval(limits.keepalive_interval)
                .keep_alive_timeout(limits.keepalive_interval * 2);
            if let Err(e) = builder
                .serve_connection(TokioIo::new(connection), service)
                .await
            {
                tracing::debug!(error = %e, "webhook connection ended");
            }
        });
        while connections.try_join_next().is_some() {}
    }
}

async fn handle(req: Request<Incoming>, options: &InjectOptions) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok"),
        (&Method::POST, "/inject") => {
            let review = match read_body(req.into_body()).await {
                Ok(body) => review(&body, options),
                Err(why) => unread(None, &why),
            };
            let mut response = Response::new(Full::new(Bytes::from(review.to_string())));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            response
        }
        (_, "/healthz" | "/inject") => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

async fn read_body(body: Incoming) -> Result<Bytes, String> {
    match tokio::time::timeout(READ_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(format!(
            "the request body is larger than {} MiB",
            MAX_BODY >> 20
        )),
        Ok(Err(e)) => Err(format!("cannot read the request body: {e}")),
        Err(_) => Err(format!(
            "the request body did not arrive within {}s",
            READ_TIMEOUT.as_secs()
        )),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(pod: Value) -> Vec<u8> {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": { "group": "", "version": "v1", "kind": "Pod" },
                "resource": { "group": "", "version": "v1", "resource": "pods" },
                "namespace": "shop",
                "operation": "CREATE",
                "object": pod,
            },
        })
        .to_string()
        .into_bytes()
    }

    fn replica_pod() -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "generateName": "web-5d8f9c7b6-", "labels": { "app": "web" } },
            "spec": { "containers": [{ "name": "web", "image": "web:1",
                "readinessProbe": { "httpGet": { "path": "/", "port": 8080 } } }] },
        })
    }

    fn patch_of(response: &Value) -> Vec<Value> {
        let patch = BASE64
            .decode(response["response"]["patch"].as_str().unwrap())
            .unwrap();
        serde_json::from_slice(&patch).unwrap()
    }

    #[test]
    fn a_pod_create_is_answered_with_the_patch_of_its_injection() {
        let options = InjectOptions::default();
        let out = review(&admission(replica_pod()), &options);
        assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(out["kind"], "AdmissionReview");
        let response = &out["response"];
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        let expected = patch::diff(
            &replica_pod(),
            &inject_pod(&replica_pod(), &options).unwrap(),
        );
        assert_eq!(patch_of(&out), expected);
        // The namespace stays the API server's to set.
        assert!(
            expected
                .iter()
                .all(|op| op["path"] != "/metadata/namespace")
        );
    }

    #[test]
    fn an_opted_out_pod_is_allowed_without_a_patch() {
        let mut pod = replica_pod();
        pod["metadata"]["labels"]["pylon.dev/inject"] = json!("disabled");
        let out = review(&admission(pod), &InjectOptions::default());
        assert_eq!(
            out["response"],
            json!({ "uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": true })
        );
    }

    #[test]
    fn a_pod_that_cannot_be_injected_is_refused_with_every_problem() {
        let mut pod = replica_pod();
        pod["metadata"]["annotations"] =
            json!({ "pylon.dev/proxy-cpu": "lots", "pylon.dev/drain-timeout": "soon" });
        let out = review(&admission(pod), &InjectOptions::default());
        let response = &out["response"];
        assert_eq!(response["allowed"], false);
        assert_eq!(response["status"]["code"], 400);
        assert_eq!(response["status"]["reason"], "BadRequest");
        assert_eq!(
            response["status"]["message"],
            "pylon cannot inject pod shop/web-5d8f9c7b6-*: \
             metadata.annotations[\"pylon.dev/proxy-cpu\"]: \"lots\" is not a Kubernetes quantity (e.g. 100m, 0.5, 64Mi, 1Gi); \
             metadata.annotations[\"pylon.dev/drain-timeout\"]: \"soon\" is not a duration (e.g. 30s, 1m30s)"
        );
    }

    #[test]
    fn what_cannot_be_read_is_allowed_unchanged_with_a_warning() {
        let options = InjectOptions::default();
        let not_json = review(b"{nope", &options);
        let mut deployment = serde_json::from_slice::<Value>(&admission(replica_pod())).unwrap();
        deployment["request"]["kind"]["kind"] = json!("Deployment");
        deployment["request"]["kind"]["group"] = json!("apps");
        let mut update = serde_json::from_slice::<Value>(&admission(replica_pod())).unwrap();
        update["request"]["operation"] = json!("UPDATE");
        let v1beta1 = json!({ "apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": { "uid": "u1" } });
        for (out, uid) in [
            (not_json, ""),
            (
                review(deployment.to_string().as_bytes(), &options),
                "705ab4f5-6393-11e8-b7cc-42010a800002",
            ),
            (
                review(update.to_string().as_bytes(), &options),
                "705ab4f5-6393-11e8-b7cc-42010a800002",
            ),
            (review(v1beta1.to_string().as_bytes(), &options), "u1"),
        ] {
            let response = &out["response"];
            assert_eq!(response["uid"], uid, "{out}");
            assert_eq!(response["allowed"], true, "{out}");
            assert!(response.get("patch").is_none(), "{out}");
            let message = response["status"]["message"].as_str().unwrap();
            assert!(!message.is_empty());
            assert_eq!(
                response["warnings"][0],
                format!("pylon did not inject this pod: {message}")
            );
        }
    }
}
