//! What a sidecar in a pod needs beyond the mesh hop, on loopback: the
//! probe listener (read-only; the app's own probes through
//! `/app-health/...`), `drainTimeout` and the second SIGTERM, and
//! `inbound.mode` (strict refuses plaintext, permissive serves it with no
//! identity).

use std::process::Command;

use http::Request;
use http_body_util::BodyExt;
use pylon::identity::dev::DevCa;

use crate::common::http::{empty, gated_response, http1, start_http_app, text};
use crate::common::policy::{allow, authorization, yaml};
use crate::common::{
    CLIENT_ID, Mesh, SERVER_ID, SidecarProc, TempDir, admin_get, admin_request, mesh_policy,
    sidecar_config,
};

fn sigterm(pid: u32) {
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}

/// A server sidecar in front of `app` with extra environment.
fn server_with_env(
    dir: &TempDir,
    ca: &DevCa,
    app: std::net::SocketAddr,
    env: &[(&str, &str)],
) -> SidecarProc {
    let files = ca.write_identity(dir.path(), "server", SERVER_ID).unwrap();
    let policy = dir.path().join("server-policy.yaml");
    std::fs::write(&policy, "").unwrap();
    let cfg = dir.path().join("server.yaml");
    std::fs::write(&cfg, sidecar_config(&files, &policy, app)).unwrap();
    SidecarProc::spawn_with_env(crate::common::PYLON, &cfg, env)
}

#[tokio::test]
async fn the_probe_listener_runs_the_apps_probes_and_changes_nothing() {
    let app = start_http_app().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let probes = serde_json::json!({
        "app": {
            "readiness": {"httpGet": {"path": "/status/204", "port": app.addr.port()}},
            "startup": {"httpGet": {"path": "/status/500", "port": app.addr.port()}},
            "liveness": {"tcpSocket": {"port": closed}, "timeoutSeconds": 2}
        },
        "worker": {"liveness": {"tcpSocket": {"port": app.addr.port()}}}
    })
    .to_string();
    let dir = TempDir::new("probes");
    let ca = DevCa::new("pylon test root").unwrap();
    let sidecar = server_with_env(
        &dir,
        &ca,
        app.addr,
        &[
            ("PYLON_APP_PROBES", &probes),
            ("PYLON_KUBERNETES_POD_IP", "127.0.0.1"),
        ],
    );
    sidecar.wait_ready().await;
    let probe = sidecar.probe;

    for (path, want) in [
        ("/live", 200),
        ("/ready", 200),
        ("/metrics", 200),
        ("/app-health/app/readiness", 200),
        ("/app-health/worker/liveness", 200),
        ("/app-health/app/startup", 503),
        ("/app-health/app/liveness", 503),
        ("/app-health/app/sometimes", 404),
        ("/app-health/nobody/readiness", 404),
        // The admin listener's other endpoints are not on the probe port.
        ("/config", 404),
        ("/log-level", 404),
    ] {
        let (status, body) = admin_get(probe, path).await.unwrap();
        assert_eq!(status, want, "GET {path}: {body}");
    }
    let (_, body) = admin_get(probe, "/app-health/app/startup").await.unwrap();
    assert!(body.contains("http status 500"), "{body}");
    // Nothing that changes state answers on the probe listener.
    for (method, path) in [("POST", "/drain"), ("PUT", "/log-level")] {
        let (status, _) = admin_request(probe, method, path).await.unwrap();
        assert_eq!(status, 404, "{method} {path}");
    }
    let (status, _) = admin_get(sidecar.admin, "/ready").await.unwrap();
    assert_eq!(status, 200, "the sidecar kept serving");
    // The admin listener serves the app probes too, and says where it is.
    let (status, _) = admin_get(sidecar.admin, "/app-health/app/readiness")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let config = sidecar.config().await;
    assert_eq!(config["listeners"]["probe"], probe.to_string());
    assert_eq!(config["kubernetes"]["podIp"], "127.0.0.1");
}

/// A client sidecar (identity [`CLIENT_ID`]) whose routes lead to the
/// server sidecar at `inbound`.
fn client_of(dir: &TempDir, ca: &DevCa, inbound: std::net::SocketAddr) -> SidecarProc {
    let files = ca.write_identity(dir.path(), "client", CLIENT_ID).unwrap();
    let policy = dir.path().join("client-policy.yaml");
    std::fs::write(&policy, mesh_policy(inbound)).unwrap();
    let cfg = dir.path().join("client.yaml");
    let unused_app: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    std::fs::write(&cfg, sidecar_config(&files, &policy, unused_app)).unwrap();
    SidecarProc::spawn(crate::common::PYLON, &cfg)
}

#[tokio::test]
async fn drain_timeout_bounds_a_stream_that_never_ends() {
    let app = start_http_app().await;
    let dir = TempDir::new("drain-timeout");
    let ca = DevCa::new("pylon test root").unwrap();
    let mut server = server_with_env(&dir, &ca, app.addr, &[("PYLON_DRAIN_TIMEOUT", "1s")]);
    let client = client_of(&dir, &ca, server.inbound);
    server.wait_ready().await;
    client.wait_ready().await;

    // A response that never finishes (the gate is never opened).
    let (_conn, body) = gated_response(client.outbound).await;

    sigterm(server.pid());
    // The server sidecar gives up on the stream after its drain timeout
    // and exits cleanly; the caller sees the stream cut, not completed.
    let status = server.wait_exit();
    assert!(status.success(), "{status:?}\n{}", server.logs());
    server.wait_log("still open after the drain timeout").await;
    assert!(body.collect().await.is_err(), "the stream was cut");
}

#[tokio::test]
async fn a_second_sigterm_exits_without_waiting_for_open_calls() {
    let app = start_http_app().await;
    let mut mesh = Mesh::start(app.addr).await;
    let (_conn, body) = gated_response(mesh.client.outbound).await;

    // The default drain timeout is 30 s; the first signal starts it.
    sigterm(mesh.server.pid());
    mesh.server.wait_log("stop signal received; draining").await;
    let (status, _) = admin_get(mesh.server.probe, "/ready").await.unwrap();
    assert_eq!(status, 503, "not ready while draining");
    // The second ends the wait: the call is still open (its gate shut).
    sigterm(mesh.server.pid());
    let status = mesh.server.wait_exit();
    assert!(status.success(), "{status:?}");
    mesh.server.wait_log("second stop signal").await;
    assert!(body.collect().await.is_err(), "the open call was cut");
}

/// A plaintext HTTP/1.1 request straight to a sidecar's inbound listener,
/// claiming an identity it does not have.
async fn plaintext_get(inbound: std::net::SocketAddr) -> Result<String, String> {
    let tcp = tokio::net::TcpStream::connect(inbound)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::get("/headers")
                .header("host", "web.test")
                .header(
                    "x-pylon-peer-identity",
                    "spiffe://pylon.local/ns/default/sa/admin",
                )
                .body(empty())
                .unwrap(),
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(text(resp).await)
}

#[tokio::test]
async fn strict_inbound_refuses_plaintext_and_permissive_serves_it_without_identity() {
    let app = start_http_app().await;
    let dir = TempDir::new("inbound-mode");
    let ca = DevCa::new("pylon test root").unwrap();

    let strict = server_with_env(&dir, &ca, app.addr, &[]);
    strict.wait_ready().await;
    let refused = plaintext_get(strict.inbound).await;
    assert!(
        refused.is_err(),
        "strict mode served plaintext: {refused:?}"
    );
    drop(strict);

    let permissive = server_with_env(&dir, &ca, app.addr, &[("PYLON_INBOUND_MODE", "permissive")]);
    permissive.wait_ready().await;
    let headers = plaintext_get(permissive.inbound).await.unwrap();
    assert!(headers.starts_with("version: HTTP/1.1"), "{headers}");
    assert!(
        !headers.contains("x-pylon-peer-identity"),
        "a plaintext caller's claimed identity reached the app:\n{headers}"
    );

    // Mesh callers keep their identity in permissive mode.
    let client = client_of(&dir, &ca, permissive.inbound);
    client.wait_ready().await;
    let mut conn = http1(client.outbound).await;
    let resp = conn
        .send_request(
            Request::get("/headers")
                .header("host", "web.test")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let headers = text(resp).await;
    assert!(
        headers.contains(&format!("x-pylon-peer-identity: {CLIENT_ID}")),
        "{headers}"
    );

    // An AuthorizationPolicy naming principals admits no plaintext caller,
    // not even with `*`.
    let policy_path = dir.path().join("server-policy.yaml");
    let authz = yaml(&[authorization(
        "any-mesh",
        "echo",
        vec![allow(&["*"], &[], &[])],
    )]);
    crate::common::set_policy(&permissive, &policy_path, &authz).await;
    let denied = plaintext_get(permissive.inbound).await.unwrap();
    assert!(denied.contains("unauthorized"), "{denied}");
}
