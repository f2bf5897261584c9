//! Plain HTTP through the mesh: HTTP/1.1 and h2c callers, keep-alive,
//! streamed bodies both ways, trailers, hop-by-hop fields, flow control, and
//! the proxy's own errors as JSON.

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Frame;

use crate::common::http::{channel_body, empty, full, h2c, http1, start_http_app, text};
use crate::common::{CLIENT_ID, Mesh, PATIENCE, backend_yaml, route_yaml};

fn get(path: &str, host: &str) -> Request<crate::common::http::Body> {
    Request::get(path)
        .header("host", host)
        .body(empty())
        .unwrap()
}

#[tokio::test]
async fn http1_keep_alive_reaches_the_app_as_http1() {
    let app = start_http_app().await;
    let mesh = Mesh::start(app.addr).await;
    let mut conn = http1(mesh.client.outbound).await;
    for i in 0..3 {
        let resp = conn
            .send_request(get(&format!("/headers?i={i}"), "web.test"))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = text(resp).await;
        assert!(body.contains("version: HTTP/1.1"), "{body}");
        assert!(body.contains("host: web.test"), "{body}");
        assert!(
            body.contains(&format!("x-pylon-peer-identity: {CLIENT_ID}")),
            "{body}"
        );
        assert!(
            !body.contains("x-pylon-orig-proto"),
            "internal header leaked: {body}"
        );
    }
}

#[tokio::test]
async fn h2c_reaches_the_app_as_http2() {
    let app = start_http_app().await;
    let mesh = Mesh::start(app.addr).await;
    let mut conn = h2c(mesh.client.outbound).await;
    let req = Request::get("http://web.test/headers")
        .body(empty())
        .unwrap();
    let resp = conn.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), Version::HTTP_2);
    let body = text(resp).await;
    assert!(body.contains("version: HTTP/2.0"), "{body}");
}

#[tokio::test]
async fn hop_by_hop_fields_stop_at_the_proxy_and_identity_cannot_be_forged() {
    let app = start_http_app().await;
    let mesh = Mesh::start(app.addr).await;
    let mut conn = http1(mesh.client.outbound).await;
    let req = Request::get("/headers")
        .header("host", "web.test")
        .header("connection", "keep-alive, x-private")
        .header("keep-alive", "timeout=5")
        .header("x-private", "secret")
        .header("proxy-connection", "keep-alive")
        .header("upgrade", "websocket")
        .header(
            "x-pylon-peer-identity",
            "spiffe://pylon.test/ns/default/sa/admin",
        )
        .header("x-kept", "yes")
        .body(empty())
        .unwrap();
    let body = text(conn.send_request(req).await.unwrap()).await;
    for gone in [
        "x-private",
        "keep-alive:",
        "proxy-connection",
        "upgrade",
        "sa/admin",
    ] {
        assert!(!body.contains(gone), "{gone} crossed the proxy: {body}");
    }
    assert!(body.contains("x-kept: yes"), "{body}");
    assert_eq!(
        body.matches("x-pylon-peer-identity").count(),
        1,
        "exactly one identity header: {body}"
    );
    assert!(body.contains(&format!("x-pylon-peer-identity: {CLIENT_ID}")));
}

#[tokio::test]
async fn request_and_response_bodies_stream_without_buffering() {
    let app = start_http_app().await;
    let mesh = Mesh::start(app.addr).await;

    // Response streaming: the first chunk arrives while the app still
    // withholds the second, so nothing on the way waits for the whole body.
    let mut conn = http1(mesh.client.outbound).await;
    let resp = conn.send_request(get("/gate", "web.test")).await.unwrap();
    let mut body = resp.into_body();
    let first = tokio::time::timeout(PATIENCE, body.frame())
        .await
        .expect("first chunk before the gate opens")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first");
    app.gate.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "second");

    // Request streaming, chunked, full duplex: each chunk comes back echoed
    // before the next one is sent.
    let mut conn = http1(mesh.client.outbound).await;
    let (tx, req_body) = channel_body();
    let req = Request::post("/echo")
        .header("host", "web.test")
        .body(req_body)
        .unwrap();
    let send = tokio::spawn(async move {
        for i in 0..5 {
            tx.send(Frame::data(Bytes::from(format!("chunk-{i};"))))
                .await
                .unwrap();
        }
        tx
    });
    let resp = conn.send_request(req).await.unwrap();
    let mut body = resp.into_body();
    let mut got = String::new();
    while got.len() < "chunk-0;".len() * 5 {
        let frame = tokio::time::timeout(PATIENCE, body.frame())
            .await
            .expect("echoed chunk while the request is still open")
            .unwrap()
            .unwrap();
        got.push_str(std::str::from_utf8(&frame.into_data().unwrap()).unwrap());
    }
    assert_eq!(got, "chunk-0;chunk-1;chunk-2;chunk-3;chunk-4;");
    drop(send.await.unwrap());
    assert!(body.collect().await.unwrap().to_bytes().is_empty());
}

#[tokio::test]
async fn large_bodies_both_ways() {
    let app = start_http_app().await;
    let mesh = Mesh::start(app.addr).await;
    let size = 48 * 1024 * 1024;

    let mut conn = http1(mesh.client.outbound).await;
    let resp = conn
        .send_request(get(&format!("/big?bytes={size}"), "web.test"))
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-length"], size.to_string().as_str());
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got.len(), size);

    let upload: Bytes = (0..size)
        .map(|i| (i % 253) as u8)
        .collect::<Vec<u8>>()
        .into();
    let mut conn = h2c(mesh.client.outbound).await;
    let req = Request::post("http://web.test/echo")
        .body(full(upload.clone()))
        .unwrap();
    let resp = conn.send_request(req).await.unwrap();
    let echoed = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(echoed == upload, "48 MiB upload changed in transit");
}

#[tokio::test]
async fn trailers_cross_the_mesh() {
    let app = start_http_app().await;
    let mesh = Mesh::start(app.addr).await;
    let mut conn = h2c(mesh.client.outbound).await;
    let req = Request::get("http://web.test/trailers")
        .header("te", "trailers")
        .body(empty())
        .unwrap();
    let resp = conn.send_request(req).await.unwrap();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers["x-checksum"], "abc");
    assert_eq!(collected.to_bytes(), "payload");
}

#[tokio::test]
async fn http2_flow_control_bounds_what_is_in_flight() {
    let app = start_http_app().await;
    let mesh = Mesh::start(app.addr).await;
    let total = 512 * 1024 * 1024;
    let mut conn = h2c(mesh.client.outbound).await;
    let req = Request::get(format!("http://web.test/big?bytes={total}"))
        .body(empty())
        .unwrap();
    let resp = conn.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // Read nothing; wait until the app can hand over no more (every window
    // and buffer on the way is full), then check how much it produced.
    let mut last = usize::MAX;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        let now = app.produced.load(std::sync::atomic::Ordering::Relaxed);
        if now == last || tokio::time::Instant::now() > deadline {
            break;
        }
        last = now;
    }
    let stalled_at = app.produced.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        stalled_at < total / 4,
        "the app produced {stalled_at} of {total} bytes with nobody reading"
    );
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got.len(), total);
}

#[tokio::test]
async fn proxy_errors_are_json_with_x_pylon_error() {
    let app = start_http_app().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mesh = Mesh::start_with(app.addr, |_| {
        backend_yaml("down", &[closed.to_string()], None)
            + &route_yaml("HTTPRoute", "down", "down.test", &[("down", 1)])
    })
    .await;
    let mut conn = http1(mesh.client.outbound).await;

    let resp = conn.send_request(get("/x", "nowhere.test")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(resp.headers()["x-pylon-error"], "no-route");
    assert_eq!(resp.headers()["content-type"], "application/json");
    let json: serde_json::Value = serde_json::from_str(&text(resp).await).unwrap();
    assert_eq!(json["error"]["code"], "no-route");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nowhere.test/x")
    );

    let resp = conn.send_request(get("/x", "down.test")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["x-pylon-error"], "connect-failed");
    let json: serde_json::Value = serde_json::from_str(&text(resp).await).unwrap();
    assert_eq!(json["error"]["code"], "connect-failed");
}

#[tokio::test]
async fn application_statuses_are_not_the_meshs() {
    let app = start_http_app().await;
    let mesh = Mesh::start(app.addr).await;
    let mut conn = http1(mesh.client.outbound).await;
    for code in [404u16, 418, 503] {
        let resp = conn
            .send_request(get(&format!("/status/{code}"), "web.test"))
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), code);
        assert!(resp.headers().get("x-pylon-error").is_none());
    }
}

/// With one worker a sidecar runs tokio's current-thread scheduler; with
/// more, the multi-thread one. `PYLON_WORKERS` (what injection sets) wins
/// over `TOKIO_WORKER_THREADS`, which still counts without it. A mesh of one
/// of each serves concurrent h2c streams and HTTP/1.1 connections, each
/// answered with its own request.
#[tokio::test]
async fn a_one_worker_sidecar_runs_on_the_current_thread_scheduler_and_serves_concurrent_calls() {
    let app = start_http_app().await;
    let mesh = Mesh::start_with_env(
        app.addr,
        crate::common::mesh_policy,
        &[("PYLON_WORKERS", "1"), ("TOKIO_WORKER_THREADS", "2")],
        &[("TOKIO_WORKER_THREADS", "2")],
    )
    .await;
    let (client, server) = (&mesh.client, &mesh.server);
    client.wait_log("runtime=current-thread").await;
    server.wait_log("runtime=multi-thread, 2 workers").await;

    let h2 = h2c(client.outbound).await;
    let streams = (0..64).map(|i| {
        let mut h2 = h2.clone();
        tokio::spawn(async move {
            let req = Request::get("http://web.test/headers")
                .header("x-call", format!("stream-{i}"))
                .body(empty())
                .unwrap();
            let resp = h2.send_request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            (i, text(resp).await)
        })
    });
    let connections = (0..8).map(|i| {
        let outbound = client.outbound;
        tokio::spawn(async move {
            let mut conn = http1(outbound).await;
            let mut req = get("/headers", "web.test");
            req.headers_mut()
                .insert("x-call", format!("connection-{i}").parse().unwrap());
            let resp = conn.send_request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            (i + 1000, text(resp).await)
        })
    });
    let tasks: Vec<_> = streams.chain(connections).collect();
    assert_eq!(tasks.len(), 72);
    for task in tasks {
        let (i, body) = tokio::time::timeout(PATIENCE, task).await.unwrap().unwrap();
        let own = if i < 1000 {
            format!("x-call: stream-{i}")
        } else {
            format!("x-call: connection-{}", i - 1000)
        };
        assert!(
            body.lines().any(|l| l == own),
            "call {i} got another's answer: {body}"
        );
    }
}
