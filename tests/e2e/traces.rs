//! What one request leaves behind, end to end: its spans (two sidecars and
//! the control plane exporting to an OTLP/gRPC receiver started by the
//! test, an app behind the server sidecar that records the context it was
//! handed), its request ID and its access-log record. Counts over many
//! requests and the processes' own logs are in `metrics.rs`.

use std::net::SocketAddr;
use std::path::Path;

use http::{Request, StatusCode};
use pylon::identity::dev::DevCa;
use pylon_proto::v1::EchoRequest;
use tonic::metadata::MetadataValue;

use crate::common::chaos::ChaosServer;
use crate::common::control::ControlProc;
use crate::common::echo::echo_client;
use crate::common::http::{empty, http1, start_http_app, text};
use crate::common::otlp::{CLIENT, Collector, INTERNAL, SERVER, Span, export_app_span};
use crate::common::policy::{Build, GrpcCode, Kind, RetryOn, backend, retry, route, yaml};
use crate::common::{
    CLIENT_ID, SERVER_ID, SidecarProc, TempDir, eventually, sidecar_config, strip_ansi,
};

/// Two sidecars (client → server, mTLS) in front of `app`, both with the
/// bootstrap `telemetry` section given (a YAML line, or empty).
struct TracedMesh {
    _dir: TempDir,
    client: SidecarProc,
    server: SidecarProc,
}

/// The client's policy: `echo.test` (gRPC, retried on UNAVAILABLE) and
/// `web.test` (HTTP) both go to the app behind the server sidecar.
fn policy(server_inbound: SocketAddr) -> String {
    let ms = std::time::Duration::from_millis;
    yaml(&[
        backend("app", &[server_inbound], Some(SERVER_ID)),
        route(Kind::GrpcRoute, "echo", "echo.test", &[("app", 1)]).retry(retry(
            2,
            &[RetryOn::Grpc(GrpcCode::Unavailable)],
            ms(1),
            ms(5),
        )),
        route(Kind::HttpRoute, "web", "web.test", &[("app", 1)]),
    ])
}

fn tracing_to(endpoint: &str, sampling: f64) -> String {
    format!("telemetry: {{ otlp: {{ endpoint: \"{endpoint}\" }}, sampling: {sampling} }}\n")
}

impl TracedMesh {
    async fn start(app: SocketAddr, telemetry: &str) -> TracedMesh {
        let dir = TempDir::new("telemetry");
        let ca = DevCa::new("pylon test root").unwrap();
        let spawn = |dir: &Path, name: &str, id: &str, app: SocketAddr, policy: &str| {
            let files = ca.write_identity(dir, name, id).unwrap();
            let policy_path = dir.join(format!("{name}-policy.yaml"));
            std::fs::write(&policy_path, policy).unwrap();
            let cfg = dir.join(format!("{name}.yaml"));
            std::fs::write(&cfg, sidecar_config(&files, &policy_path, app) + telemetry).unwrap();
            SidecarProc::spawn(crate::common::PYLON, &cfg)
        };
        let server = spawn(dir.path(), "server", SERVER_ID, app, "");
        let unused_app: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let client = spawn(
            dir.path(),
            "client",
            CLIENT_ID,
            unused_app,
            &policy(server.inbound),
        );
        server.wait_ready().await;
        client.wait_ready().await;
        TracedMesh {
            _dir: dir,
            client,
            server,
        }
    }
}

fn grpc_request(headers: &[(&'static str, &str)]) -> tonic::Request<EchoRequest> {
    let mut r = tonic::Request::new(EchoRequest {
        payload: b"hi".to_vec(),
        ..Default::default()
    });
    for (k, v) in headers {
        r.metadata_mut()
            .insert(*k, MetadataValue::try_from(*v).unwrap());
    }
    r
}

fn get(path: &str, host: &str, headers: &[(&str, &str)]) -> Request<crate::common::http::Body> {
    let mut b = Request::get(path).header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(empty()).unwrap()
}

/// The value of `name` in the `/headers` answer of the HTTP app.
fn header_line<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
}

/// `00-TRACE-SPAN-FLAGS` → (trace, span, flags).
fn split_traceparent(v: &str) -> (String, String, String) {
    let f: Vec<&str> = v.split('-').collect();
    assert_eq!(f.len(), 4, "{v}");
    assert_eq!(f[0], "00", "{v}");
    (f[1].into(), f[2].into(), f[3].into())
}

fn one<'a>(spans: &'a [Span], what: &str, pred: impl Fn(&Span) -> bool) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| pred(s)).collect();
    assert_eq!(found.len(), 1, "{what}: {spans:#?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread")]
async fn one_trace_spans_both_sidecars_the_retries_and_the_app() {
    let collector = Collector::start().await;
    let app = ChaosServer::start("app").await;
    let mesh = TracedMesh::start(app.addr, &tracing_to(&collector.endpoint(), 1.0)).await;
    let mut client = echo_client(mesh.client.outbound, "echo.test").await;

    // The client app's own span is the parent of everything the mesh does.
    let trace_id = format!("{:032x}", fastrand::u128(1..));
    let app_client_span = format!("{:016x}", fastrand::u64(1..));
    let traceparent = format!("00-{trace_id}-{app_client_span}-01");
    let reply = client
        .unary(grpc_request(&[
            ("x-chaos", "fail-first=1;key=traced"),
            ("traceparent", &traceparent),
            ("tracestate", "vendor=opaque"),
        ]))
        .await
        .unwrap();
    assert_eq!(reply.into_inner().payload, b"hi");

    let seen = app.seen();
    assert_eq!(seen.len(), 2, "one failed attempt, one retry: {seen:?}");
    let (service, method) = seen[0].path[1..].split_once('/').unwrap();

    let spans = collector.wait_trace(&trace_id, |s| s.len() >= 5).await;
    assert_eq!(spans.len(), 5, "{spans:#?}");

    // Client sidecar: the logical call, continuing the app's context.
    let call = one(&spans, "call span", |s| s.kind == INTERNAL);
    assert_eq!(call.service, "client");
    assert_eq!(call.parent, app_client_span);
    assert_eq!(call.name, format!("{service}/{method}"));
    assert_eq!(call.attr("rpc.system"), Some("grpc"));
    assert_eq!(call.attr("rpc.service"), Some(service));
    assert_eq!(call.attr("rpc.method"), Some(method));
    assert_eq!(call.attr("http.request.method"), Some("POST"));
    assert_eq!(call.attr("server.address"), Some("echo.test"));
    assert_eq!(call.attr("pylon.backend"), Some("Backend/app"));
    assert_eq!(call.attr("pylon.attempts"), Some("2"));
    assert_eq!(call.attr("rpc.grpc.status_code"), Some("0"));
    assert!(!call.error, "{call:#?}");

    // Its attempts: siblings, one per try.
    let mut attempts: Vec<&Span> = spans.iter().filter(|s| s.kind == CLIENT).collect();
    attempts.sort_by_key(|s| s.attr("pylon.attempt").map(str::to_string));
    assert_eq!(attempts.len(), 2, "{spans:#?}");
    let inbound = mesh.server.inbound.to_string();
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(a.service, "client");
        assert_eq!(a.parent, call.span_id, "attempts are children of the call");
        assert_eq!(a.attr("pylon.attempt"), Some((i + 1).to_string().as_str()));
        assert_eq!(a.attr("pylon.endpoint"), Some(inbound.as_str()));
        assert_eq!(a.attr("pylon.backend"), Some("Backend/app"));
        assert_eq!(a.attr("network.peer.address"), Some("127.0.0.1"));
        assert_eq!(a.attr("rpc.system"), Some("grpc"));
        assert_eq!(a.attr("rpc.method"), Some(method));
    }
    assert_eq!(attempts[0].attr("rpc.grpc.status_code"), Some("14"));
    assert!(attempts[0].error, "{:#?}", attempts[0]);
    assert_eq!(attempts[1].attr("rpc.grpc.status_code"), Some("0"));
    assert!(!attempts[1].error, "{:#?}", attempts[1]);

    // Server sidecar: one server span per attempt, child of that attempt;
    // the app got the server span as its parent.
    for (i, a) in attempts.iter().enumerate() {
        let server = one(&spans, "server span", |s| {
            s.kind == SERVER && s.parent == a.span_id
        });
        assert_eq!(server.service, "echo");
        assert_eq!(server.attr("pylon.peer.identity"), Some(CLIENT_ID));
        assert_eq!(server.attr("network.peer.address"), Some("127.0.0.1"));
        assert_eq!(server.attr("rpc.service"), Some(service));
        let code = if i == 0 { "14" } else { "0" };
        assert_eq!(server.attr("rpc.grpc.status_code"), Some(code));
        let (t, parent, flags) = split_traceparent(seen[i].traceparent.as_deref().unwrap());
        assert_eq!((t.as_str(), flags.as_str()), (trace_id.as_str(), "01"));
        assert_eq!(
            parent, server.span_id,
            "the app's parent is the server span"
        );
    }

    // The app's own span joins the same trace.
    export_app_span(
        &collector.endpoint(),
        seen[1].traceparent.as_deref().unwrap(),
        "app work",
    )
    .await;
    let spans = collector.wait_trace(&trace_id, |s| s.len() >= 6).await;
    let app_span = one(&spans, "app span", |s| s.service == "app");
    let (_, parent, _) = split_traceparent(seen[1].traceparent.as_deref().unwrap());
    assert_eq!(app_span.parent, parent);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trace_starts_at_the_client_sidecar_and_proxy_failures_are_marked() {
    let collector = Collector::start().await;
    let app = start_http_app().await;
    let mesh = TracedMesh::start(app.addr, &tracing_to(&collector.endpoint(), 1.0)).await;
    let mut conn = http1(mesh.client.outbound).await;
    conn.ready().await.unwrap();
    let resp = conn
        .send_request(get("/headers", "web.test", &[]))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = text(resp).await;
    let (trace_id, app_parent, flags) =
        split_traceparent(header_line(&body, "traceparent").expect("a traceparent"));
    assert_eq!(flags, "01");
    let request_id = header_line(&body, "x-request-id").expect("an x-request-id");

    let spans = collector.wait_trace(&trace_id, |s| s.len() >= 3).await;
    let call = one(&spans, "call span", |s| s.kind == INTERNAL);
    assert_eq!(call.parent, "", "a new trace: the call is its root");
    assert_eq!(call.name, "GET");
    assert_eq!(call.attr("http.request.method"), Some("GET"));
    assert_eq!(call.attr("http.response.status_code"), Some("200"));
    assert_eq!(call.attr("server.address"), Some("web.test"));
    assert_eq!(call.attr("pylon.request_id"), Some(request_id));
    assert_eq!(call.attr("rpc.system"), None);
    let attempt = one(&spans, "attempt", |s| s.kind == CLIENT);
    assert_eq!(attempt.parent, call.span_id);
    assert_eq!(attempt.attr("pylon.attempt"), Some("1"));
    assert_eq!(attempt.attr("http.response.status_code"), Some("200"));
    let server = one(&spans, "server span", |s| s.kind == SERVER);
    assert_eq!(server.parent, attempt.span_id);
    assert_eq!(server.attr("http.response.status_code"), Some("200"));
    assert_eq!(server.span_id, app_parent);

    // A call the proxy fails itself: the span says why, with status error.
    conn.ready().await.unwrap();
    let resp = conn
        .send_request(get("/x", "nowhere.test", &[]))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let failed = eventually("a span for the failed call", async || {
        collector
            .spans()
            .into_iter()
            .find(|s| s.attr("pylon.request_id") == Some(request_id.as_str()))
    })
    .await;
    assert_eq!(failed.kind, INTERNAL);
    assert_eq!(failed.attr("pylon.error"), Some("no-route"));
    assert_eq!(failed.attr("http.response.status_code"), Some("404"));
    assert!(failed.error, "{failed:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn unsampled_requests_pass_the_decision_on_and_sampled_parents_are_followed() {
    let collector = Collector::start().await;
    let app = start_http_app().await;
    let mesh = TracedMesh::start(app.addr, &tracing_to(&collector.endpoint(), 0.0)).await;
    let mut conn = http1(mesh.client.outbound).await;

    // Not sampled (ratio 0): the app still gets a context, marked unsampled.
    conn.ready().await.unwrap();
    let resp = conn
        .send_request(get("/headers", "web.test", &[]))
        .await
        .unwrap();
    let body = text(resp).await;
    let (unsampled_trace, _, flags) =
        split_traceparent(header_line(&body, "traceparent").expect("a traceparent"));
    assert_eq!(flags, "00");

    // A sampled parent is followed whatever the ratio.
    let trace_id = format!("{:032x}", fastrand::u128(1..));
    let parent = format!("00-{trace_id}-{:016x}-01", fastrand::u64(1..));
    conn.ready().await.unwrap();
    let resp = conn
        .send_request(get("/headers", "web.test", &[("traceparent", &parent)]))
        .await
        .unwrap();
    let body = text(resp).await;
    let (t, _, flags) = split_traceparent(header_line(&body, "traceparent").unwrap());
    assert_eq!((t.as_str(), flags.as_str()), (trace_id.as_str(), "01"));
    collector.wait_trace(&trace_id, |s| s.len() >= 3).await;

    // By now the unsampled request's spans would have been exported too:
    // none were made.
    assert!(
        !collector
            .spans()
            .iter()
            .any(|s| s.trace_id == unsampled_trace),
        "{:#?}",
        collector.spans()
    );
    // An unsampled incoming context passes through unchanged.
    let unsampled = format!(
        "00-{:032x}-{:016x}-00",
        fastrand::u128(1..),
        fastrand::u64(1..)
    );
    conn.ready().await.unwrap();
    let resp = conn
        .send_request(get("/headers", "web.test", &[("traceparent", &unsampled)]))
        .await
        .unwrap();
    let body = text(resp).await;
    assert_eq!(header_line(&body, "traceparent"), Some(unsampled.as_str()));
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_collector_down_calls_succeed_and_dropped_spans_are_counted() {
    // A port nobody listens on: bound (so that no other test can take it)
    // but not listening, so connections are refused.
    let reserved =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    reserved
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let nobody = reserved.local_addr().unwrap().as_socket().unwrap();
    let app = start_http_app().await;
    let mesh = TracedMesh::start(app.addr, &tracing_to(&format!("http://{nobody}"), 1.0)).await;
    let mut conn = http1(mesh.client.outbound).await;
    for _ in 0..5 {
        conn.ready().await.unwrap();
        let resp = conn
            .send_request(get("/headers", "web.test", &[]))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        text(resp).await;
    }
    eventually("the spans of five calls dropped", async || {
        let client = mesh.client.metric("pylon_trace_spans_dropped_total").await;
        let server = mesh.server.metric("pylon_trace_spans_dropped_total").await;
        // Five calls: a call span and an attempt span each on the client,
        // a server span each on the server.
        if client >= 10 && server >= 5 {
            Ok(())
        } else {
            Err(format!("dropped spans: client {client}, server {server}"))
        }
    })
    .await;
    assert_eq!(
        mesh.client.metric("pylon_trace_spans_exported_total").await,
        0
    );
}

#[tokio::test]
async fn request_ids_are_generated_kept_and_named_in_proxy_errors() {
    let app = start_http_app().await;
    let mesh = TracedMesh::start(app.addr, "").await;
    let mut conn = http1(mesh.client.outbound).await;

    conn.ready().await.unwrap();
    let resp = conn
        .send_request(get("/headers", "web.test", &[]))
        .await
        .unwrap();
    let body = text(resp).await;
    let generated = header_line(&body, "x-request-id").expect("a generated x-request-id");
    assert_eq!(generated.len(), 36, "a UUID: {generated}");

    conn.ready().await.unwrap();
    let resp = conn
        .send_request(get("/headers", "web.test", &[("x-request-id", "kept-1")]))
        .await
        .unwrap();
    let body = text(resp).await;
    assert_eq!(header_line(&body, "x-request-id"), Some("kept-1"));

    // The proxy's own errors name it: header and JSON body.
    for given in [None, Some("mine-2")] {
        let headers: Vec<(&str, &str)> = given.map(|g| ("x-request-id", g)).into_iter().collect();
        conn.ready().await.unwrap();
        let resp = conn
            .send_request(get("/x", "nowhere.test", &headers))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(resp.headers()["x-pylon-error"], "no-route");
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
        if let Some(g) = given {
            assert_eq!(id, g);
        }
        let body: serde_json::Value = serde_json::from_str(&text(resp).await).unwrap();
        assert_eq!(body["error"]["requestId"], id.as_str(), "{body}");
    }

    // And a gRPC caller's.
    let mut grpc = echo_client(mesh.client.outbound, "nowhere.test").await;
    let status = grpc
        .unary(grpc_request(&[("x-request-id", "grpc-3")]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    assert_eq!(status.metadata().get("x-request-id").unwrap(), "grpc-3");
}

/// The fields of the `pylon::access` records in `logs`, one map each.
fn access_records(logs: &str) -> Vec<std::collections::BTreeMap<String, String>> {
    logs.lines()
        .map(strip_ansi)
        .filter(|l| l.contains("pylon::access"))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn access_logs_one_record_per_request_when_switched_on() {
    let app = start_http_app().await;
    let mesh = TracedMesh::start(app.addr, "telemetry: { accessLog: true }\n").await;
    let mut conn = http1(mesh.client.outbound).await;
    conn.ready().await.unwrap();
    let resp = conn
        .send_request(get("/headers", "web.test", &[("x-request-id", "acc-1")]))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = text(resp).await;
    conn.ready().await.unwrap();
    let resp = conn
        .send_request(get("/x", "nowhere.test", &[("x-request-id", "acc-2")]))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    text(resp).await;
    mesh.client.wait_log("request_id=acc-2").await;
    mesh.server.wait_log("request_id=acc-1").await;

    let records = access_records(&mesh.client.logs());
    let ok: Vec<_> = records
        .iter()
        .filter(|r| r.get("request_id").map(String::as_str) == Some("acc-1"))
        .collect();
    assert_eq!(ok.len(), 1, "{records:#?}");
    let r = ok[0];
    let inbound = mesh.server.inbound.to_string();
    for (k, v) in [
        ("side", "outbound"),
        ("method", "GET"),
        ("authority", "web.test"),
        ("path", "/headers"),
        ("status", "200"),
        ("backend", "Backend/app"),
        ("endpoint", inbound.as_str()),
        ("attempts", "1"),
        ("bytes", body.len().to_string().as_str()),
    ] {
        assert_eq!(r.get(k).map(String::as_str), Some(v), "{k}: {r:#?}");
    }
    assert!(r.contains_key("duration_ms"), "{r:#?}");
    assert!(!r.contains_key("error"), "{r:#?}");
    let failed: Vec<_> = records
        .iter()
        .filter(|r| r.get("request_id").map(String::as_str) == Some("acc-2"))
        .collect();
    assert_eq!(failed.len(), 1, "{records:#?}");
    assert_eq!(failed[0].get("error").map(String::as_str), Some("no-route"));
    assert_eq!(failed[0].get("status").map(String::as_str), Some("404"));

    let records = access_records(&mesh.server.logs());
    let inbound: Vec<_> = records
        .iter()
        .filter(|r| r.get("request_id").map(String::as_str) == Some("acc-1"))
        .collect();
    assert_eq!(inbound.len(), 1, "{records:#?}");
    assert_eq!(inbound[0].get("side").map(String::as_str), Some("inbound"));
    assert_eq!(inbound[0].get("peer").map(String::as_str), Some(CLIENT_ID));
    assert_eq!(inbound[0].get("status").map(String::as_str), Some("200"));
}

#[tokio::test]
async fn access_logs_are_off_by_default() {
    let app = start_http_app().await;
    let mesh = TracedMesh::start(app.addr, "").await;
    let mut conn = http1(mesh.client.outbound).await;
    conn.ready().await.unwrap();
    let resp = conn
        .send_request(get("/headers", "web.test", &[]))
        .await
        .unwrap();
    text(resp).await;
    // A later failure's debug line shows the first request's end is past.
    conn.ready().await.unwrap();
    let resp = conn
        .send_request(get("/x", "nowhere.test", &[("x-request-id", "off-1")]))
        .await
        .unwrap();
    text(resp).await;
    mesh.client.wait_log("request failed in the proxy").await;
    assert!(access_records(&mesh.client.logs()).is_empty());
    assert!(access_records(&mesh.server.logs()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collector_that_never_answers_loses_spans_not_requests() {
    // Accepts connections and never says a word: every export times out.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            open.push(tcp);
        }
    });
    let app = start_http_app().await;
    let mesh = TracedMesh::start(app.addr, &tracing_to(&endpoint, 1.0)).await;
    let mut conn = http1(mesh.client.outbound).await;
    for _ in 0..20 {
        conn.ready().await.unwrap();
        let resp = conn
            .send_request(get("/headers", "web.test", &[]))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        text(resp).await;
    }
    // The batch in flight when the calls ended times out (5 s) and is
    // dropped with the rest: 20 calls, two client spans each.
    eventually("40 spans dropped", async || {
        let dropped = mesh.client.metric("pylon_trace_spans_dropped_total").await;
        if dropped >= 40 {
            Ok(())
        } else {
            Err(format!("dropped spans: {dropped}"))
        }
    })
    .await;
    assert_eq!(
        mesh.client.metric("pylon_trace_spans_exported_total").await,
        0
    );
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_api_spans_continue_the_callers_trace() {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    let receiver = Collector::start().await;
    let dir = TempDir::new("control-traces");
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let endpoint = receiver.endpoint();
    let control = ControlProc::spawn_with(
        crate::common::PYLON_CONTROL,
        &dir.path().join("data"),
        listen,
        &["--otlp-endpoint", &endpoint],
    );
    let mut roots = rustls::RootCertStore::empty();
    let bundle = std::fs::read_to_string(control.ca_file()).unwrap();
    for cert in pylon::identity::certs_from_pem(&bundle).unwrap() {
        roots.add(cert).unwrap();
    }
    let tls = pylon_proto::client::client_config(roots, None).unwrap();
    let channel = pylon_proto::client::lazy_channel(&control.address(), tls).unwrap();
    let mut admin = pylon_proto::v1::policy_admin_client::PolicyAdminClient::new(channel);
    let token = std::fs::read_to_string(control.data_dir.join("admin.token")).unwrap();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let mut req = tonic::Request::new(pylon_proto::v1::StatusRequest::default());
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token.trim()).parse().unwrap(),
    );
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent_id}-01").parse().unwrap(),
    );
    admin.status(req).await.unwrap();

    // Spans leave in batches (every 5 s by default).
    let span = eventually("a span for Status", async || {
        receiver
            .trace_exports()
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| &ss.spans)
            .find(|s| s.name == "/pylon.v1.PolicyAdmin/Status")
            .cloned()
            .ok_or_else(|| control.logs())
    })
    .await;
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    assert_eq!(hex(&span.trace_id), trace_id);
    assert_eq!(hex(&span.parent_span_id), parent_id);
    let attr = |key: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.clone()?.value)
    };
    assert_eq!(attr("rpc.system"), Some(Value::StringValue("grpc".into())));
    assert_eq!(
        attr("rpc.service"),
        Some(Value::StringValue("pylon.v1.PolicyAdmin".into()))
    );
    assert_eq!(
        attr("rpc.method"),
        Some(Value::StringValue("Status".into()))
    );
    assert_eq!(attr("rpc.grpc.status_code"), Some(Value::IntValue(0)));
}
