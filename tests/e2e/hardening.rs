//! Hostile callers against real sidecar processes: each limit cuts the
//! attacker off while a well-behaved client on the same listener is
//! served; callers cannot forge what the mesh tells the app; mesh TLS is
//! 1.3 only; the admin API changes state only for local, non-browser
//! requests; secrets others can read stop the sidecar from starting.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use http::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use pylon::identity::dev::DevCa;
use pylon::identity::tls::{client_cert_resolver, client_config};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::common::h2raw;
use crate::common::http::{empty, h2c, http1, start_http_app, text};
use crate::common::{
    CLIENT_ID, PATIENCE, PYLON, Process, SERVER_ID, SidecarProc, TempDir, admin_get, backend_yaml,
    eventually, mesh_policy, route_yaml, sidecar_config,
};
use crate::tls::AnyServer;

/// A sidecar with identity `id` from `ca`, `policy`, in front of `app`,
/// with extra `env` (limits set small for the test).
fn sidecar(
    ca: &DevCa,
    dir: &Path,
    name: &str,
    id: &str,
    policy: &str,
    app: SocketAddr,
    env: &[(&str, &str)],
) -> SidecarProc {
    let files = ca.write_identity(dir, name, id).unwrap();
    let policy_path = dir.join(format!("{name}-policy.yaml"));
    std::fs::write(&policy_path, policy).unwrap();
    let cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(&cfg, sidecar_config(&files, &policy_path, app)).unwrap();
    SidecarProc::spawn_with_env(PYLON, &cfg, env)
}

/// A policy that sends `web.test` straight to the plaintext `app`.
fn direct_policy(app: SocketAddr) -> String {
    backend_yaml("app", &[app.to_string()], None)
        + &route_yaml("HTTPRoute", "web", "web.test", &[("app", 1)])
}

/// A client sidecar that sends `web.test` straight to a new HTTP app, with
/// extra `env`; keep the app and the directory while the sidecar is used.
async fn direct_sidecar(
    name: &str,
    env: &[(&str, &str)],
) -> (crate::common::http::HttpApp, TempDir, SidecarProc) {
    let app = start_http_app().await;
    let dir = TempDir::new(name);
    let ca = DevCa::new("pylon test root").unwrap();
    let proxy = sidecar(
        &ca,
        dir.path(),
        "client",
        CLIENT_ID,
        &direct_policy(app.addr),
        app.addr,
        env,
    );
    (app, dir, proxy)
}

/// `GET /headers` for `web.test` over a new h2c connection to `addr`.
async fn served(addr: SocketAddr) -> String {
    let mut client = h2c(addr).await;
    let resp = client
        .send_request(
            Request::get("http://web.test/headers")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    text(resp).await
}

/// Reads until the peer closes the connection (EOF or reset); panics if
/// it stays open longer than [`PATIENCE`].
async fn closed_by_peer(mut io: impl tokio::io::AsyncRead + Unpin) {
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(PATIENCE, async {
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection was never closed");
}

fn limit_hits(listener: &str, limit: &str) -> String {
    format!("pylon_connection_limits_total{{listener=\"{listener}\",limit=\"{limit}\"}}")
}

/// A mesh client TLS connection to `addr` with `config`.
async fn tls_to(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(config)
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
}

#[tokio::test]
async fn mesh_tls_is_1_3_only() {
    let app = start_http_app().await;
    let dir = TempDir::new("tls13");
    let ca = DevCa::new("pylon test root").unwrap();
    let server = sidecar(&ca, dir.path(), "server", SERVER_ID, "", app.addr, &[]);
    server.wait_ready().await;
    let store = ca.identity_store(CLIENT_ID, &[&ca]).unwrap();

    // A client that offers TLS 1.2 alone, with a valid mesh certificate.
    let provider = pylon::identity::provider();
    let mut tls12 = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_cert_resolver(client_cert_resolver(&store));
    tls12.alpn_protocols = vec![b"h2".to_vec()];
    let refused = tls_to(Arc::new(tls12), server.inbound).await;
    assert!(refused.is_err(), "a TLS 1.2 handshake succeeded");

    // The mesh's own client config speaks 1.3 and is served.
    let tls = tls_to(client_config(&store, SERVER_ID).unwrap(), server.inbound)
        .await
        .unwrap();
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let mut sender = crate::common::http::h2_over(tls).await.unwrap();
    let resp = sender
        .send_request(
            Request::get("https://web.test/headers")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn callers_cannot_forge_what_the_mesh_tells_the_app() {
    let app = start_http_app().await;
    let dir = TempDir::new("forge");
    let ca = DevCa::new("pylon test root").unwrap();
    let server = sidecar(&ca, dir.path(), "server", SERVER_ID, "", app.addr, &[]);
    let unused: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let client = sidecar(
        &ca,
        dir.path(),
        "client",
        CLIENT_ID,
        &mesh_policy(server.inbound),
        unused,
        &[],
    );
    let strict = sidecar(
        &ca,
        dir.path(),
        "strict",
        CLIENT_ID,
        &mesh_policy(server.inbound),
        unused,
        &[("PYLON_HEADERS_WITH_UNDERSCORES", "reject")],
    );
    server.wait_ready().await;
    client.wait_ready().await;
    strict.wait_ready().await;

    let long_id = "r".repeat(200);
    let forged = |uri: &str| {
        Request::get(uri)
            .header("host", "web.test")
            .header(
                "x-pylon-peer-identity",
                "spiffe://pylon.test/ns/default/sa/admin",
            )
            .header(
                "x_pylon_peer_identity",
                "spiffe://pylon.test/ns/default/sa/admin",
            )
            .header("x-pylon-made-up", "1")
            .header(
                "x-forwarded-client-cert",
                "URI=spiffe://pylon.test/ns/default/sa/admin",
            )
            .header("x-request-id", long_id.as_str())
            .header("x-kept", "yes")
            .body(empty())
            .unwrap()
    };
    let mut conn = http1(client.outbound).await;
    let resp = conn.send_request(forged("/headers")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = text(resp).await;
    let lines: Vec<&str> = body.lines().collect();
    let values = |name: &str| -> Vec<&str> {
        lines
            .iter()
            .filter_map(|l| l.strip_prefix(&format!("{name}: ")))
            .collect()
    };
    assert_eq!(values("x-pylon-peer-identity"), [CLIENT_ID], "{body}");
    assert_eq!(
        values("x-forwarded-client-cert"),
        [format!("By={SERVER_ID};URI={CLIENT_ID}").as_str()],
        "{body}"
    );
    assert!(values("x_pylon_peer_identity").is_empty(), "{body}");
    assert!(values("x-pylon-made-up").is_empty(), "{body}");
    assert_eq!(values("x-kept"), ["yes"], "{body}");
    let request_id = values("x-request-id");
    assert_eq!(request_id.len(), 1, "{body}");
    assert_eq!(request_id[0].len(), 36, "replaced by a new ID: {body}");

    // `headers.withUnderscores: reject`: refused, and said why.
    let mut conn = http1(strict.outbound).await;
    let resp = conn.send_request(forged("/headers")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(resp.headers()["x-pylon-error"], "invalid-header");
    let resp = conn
        .send_request(
            Request::get("/headers")
                .header("host", "web.test")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

/// `POST /echo` for `web.test`, the request body left open.
fn open_request(stream: u32) -> Vec<u8> {
    h2raw::headers(
        stream,
        &h2raw::request_block("POST", "http", "web.test", "/echo"),
        false,
    )
}

#[tokio::test]
async fn http2_streams_past_the_limit_are_refused_while_another_client_is_served() {
    let (_app, _dir, proxy) = direct_sidecar(
        "streams",
        &[("PYLON_CONNECTIONS_MAX_CONCURRENT_STREAMS", "2")],
    )
    .await;
    proxy.wait_ready().await;

    let mut tcp = TcpStream::connect(proxy.outbound).await.unwrap();
    // The server's SETTINGS (with its stream limit) first, then ours acked.
    h2raw::handshake(&mut tcp, &[]).await;
    for stream in [1, 3, 5] {
        tcp.write_all(&open_request(stream)).await.unwrap();
    }
    let refusal = h2raw::cut_off(&mut tcp, PATIENCE)
        .await
        .expect("the third stream was neither refused nor the connection closed");
    assert_eq!(refusal, h2raw::Cut::Reset(5, h2raw::REFUSED_STREAM));

    // Another client on the same listener is served meanwhile.
    served(proxy.outbound).await;
}

#[tokio::test]
async fn slow_clients_are_cut_off_while_others_are_served() {
    let app = start_http_app().await;
    let dir = TempDir::new("slowloris");
    let ca = DevCa::new("pylon test root").unwrap();
    let limits = [
        ("PYLON_CONNECTIONS_FIRST_BYTES_TIMEOUT", "300ms"),
        ("PYLON_INBOUND_HANDSHAKE_TIMEOUT", "300ms"),
    ];
    let server = sidecar(&ca, dir.path(), "server", SERVER_ID, "", app.addr, &limits);
    let client = sidecar(
        &ca,
        dir.path(),
        "client",
        CLIENT_ID,
        &(direct_policy(app.addr)
            + &backend_yaml("mesh", &[server.inbound.to_string()], Some(SERVER_ID))
            + &route_yaml("HTTPRoute", "mesh", "mesh.test", &[("mesh", 1)])),
        app.addr,
        &limits,
    );
    server.wait_ready().await;
    client.wait_ready().await;

    // Outbound: part of the HTTP/2 preface, then nothing.
    let mut dribble = TcpStream::connect(client.outbound).await.unwrap();
    dribble.write_all(&h2raw::PREFACE[..10]).await.unwrap();
    // HTTP/1: a request head that never ends.
    let mut slow_head = TcpStream::connect(client.outbound).await.unwrap();
    slow_head
        .write_all(b"GET /headers HTTP/1.1\r\nhost: web.test\r\nx-a: ")
        .await
        .unwrap();
    // Inbound: a TCP connection that never starts the TLS handshake...
    let silent = TcpStream::connect(server.inbound).await.unwrap();
    // ... and one that completes it, then dribbles the preface.
    let store = ca.identity_store(CLIENT_ID, &[&ca]).unwrap();
    let mut after_tls = tls_to(client_config(&store, SERVER_ID).unwrap(), server.inbound)
        .await
        .unwrap();
    after_tls.write_all(&h2raw::PREFACE[..10]).await.unwrap();
    after_tls.flush().await.unwrap();

    // Well-behaved clients are served, directly and through the mesh.
    served(client.outbound).await;
    let mut mesh = http1(client.outbound).await;
    let resp = mesh
        .send_request(
            Request::get("/headers")
                .header("host", "mesh.test")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    closed_by_peer(dribble).await;
    closed_by_peer(slow_head).await;
    closed_by_peer(silent).await;
    closed_by_peer(after_tls).await;
    assert!(
        client
            .metric(&limit_hits("outbound", "first_bytes_timeout"))
            .await
            >= 2
    );
    assert!(
        server
            .metric(&limit_hits("inbound", "first_bytes_timeout"))
            .await
            >= 1
    );
    assert!(
        server
            .metric(&limit_hits("inbound", "handshake_timeout"))
            .await
            >= 1
    );
    // And still served afterwards.
    served(client.outbound).await;
}

#[tokio::test]
async fn connections_past_the_listener_cap_are_closed_at_accept() {
    let (_app, _dir, proxy) = direct_sidecar(
        "max-connections",
        &[("PYLON_OUTBOUND_MAX_CONNECTIONS", "2")],
    )
    .await;
    proxy.wait_ready().await;
    let get = || {
        Request::get("/headers")
            .header("host", "web.test")
            .body(empty())
            .unwrap()
    };
    // Two connections, each served once, hold the listener's two slots.
    let mut first = http1(proxy.outbound).await;
    assert_eq!(first.send_request(get()).await.unwrap().status(), 200);
    let mut second = http1(proxy.outbound).await;
    assert_eq!(second.send_request(get()).await.unwrap().status(), 200);

    let third = TcpStream::connect(proxy.outbound).await.unwrap();
    closed_by_peer(third).await;
    assert_eq!(
        proxy
            .metric(&limit_hits("outbound", "max_connections"))
            .await,
        1
    );
    // The two open ones are still served.
    assert_eq!(first.send_request(get()).await.unwrap().status(), 200);

    // Once one closes, a new connection gets its slot.
    drop(second);
    eventually("a new connection is served", async || {
        let tcp = TcpStream::connect(proxy.outbound)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        match sender.send_request(get()).await {
            Ok(resp) if resp.status() == 200 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// A raw admin request with `headers`; the status.
async fn admin_call(addr: SocketAddr, method: &str, path: &str, headers: &[&str]) -> u16 {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    tcp.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\n{extra}connection: close\r\ncontent-length: 0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn the_admin_api_refuses_state_changes_a_browser_could_send() {
    let app = start_http_app().await;
    let dir = TempDir::new("admin-csrf");
    let ca = DevCa::new("pylon test root").unwrap();
    let proxy = sidecar(&ca, dir.path(), "client", CLIENT_ID, "", app.addr, &[]);
    proxy.wait_ready().await;
    let host = format!("host: {}", proxy.admin);
    for (method, path, headers) in [
        (
            "POST",
            "/drain",
            vec![host.as_str(), "origin: https://evil.example"],
        ),
        ("POST", "/drain", vec![host.as_str(), "origin: null"]),
        (
            "POST",
            "/drain",
            vec![
                host.as_str(),
                "content-type: application/x-www-form-urlencoded",
            ],
        ),
        (
            "POST",
            "/drain",
            vec![host.as_str(), "content-type: text/plain"],
        ),
        ("POST", "/drain", vec!["host: evil.example:15000"]),
        ("POST", "/drain", vec![]),
        (
            "PUT",
            "/log-level",
            vec![host.as_str(), "sec-fetch-site: cross-site"],
        ),
    ] {
        assert_eq!(
            admin_call(proxy.admin, method, path, &headers).await,
            403,
            "{method} {path} {headers:?}"
        );
    }
    // Nothing changed: still ready, not draining.
    assert_eq!(admin_get(proxy.admin, "/ready").await.unwrap().0, 200);
    // Reads need none of this.
    assert_eq!(
        admin_call(
            proxy.admin,
            "GET",
            "/ready",
            &["origin: https://evil.example"]
        )
        .await,
        200
    );
    // The operator's curl drains.
    assert_eq!(
        admin_call(proxy.admin, "POST", "/drain", &[&host]).await,
        202
    );
    proxy.wait_log("drain requested").await;
}

#[tokio::test]
async fn secrets_others_can_read_stop_the_sidecar_from_starting() {
    let dir = TempDir::new("secret-modes");
    let ca = DevCa::new("pylon test root").unwrap();
    let files = ca.write_identity(dir.path(), "web", CLIENT_ID).unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "").unwrap();
    let cfg = dir.path().join("web.yaml");
    let app: SocketAddr = "127.0.0.1:9".parse().unwrap();
    std::fs::write(&cfg, sidecar_config(&files, &policy, app)).unwrap();
    std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = |cmd: std::process::Command, what: &str| {
        let mut p = Process::spawn(cmd, what);
        let status = p.wait_exit();
        assert!(!status.success(), "{what} started:\n{}", p.logs());
        p.logs()
    };
    let mut cmd = std::process::Command::new(PYLON);
    cmd.arg("proxy").arg("--config").arg(&cfg);
    let logs = refused(cmd, "sidecar with a readable key");
    assert!(
        logs.contains(&format!(
            "identity.files.key {} is readable by others (mode 0644)",
            files.key.display()
        )),
        "{logs}"
    );

    // The same key, private: the sidecar starts.
    std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    SidecarProc::spawn(PYLON, &cfg).wait_ready().await;

    // A bootstrap token others can read.
    let token = dir.path().join("token");
    std::fs::write(&token, "pylon_bootstrap_x").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o640)).unwrap();
    let mut cmd = std::process::Command::new(PYLON);
    cmd.arg("proxy").env_remove("PYLON_CONFIG").envs([
        ("PYLON_ADMIN_LISTEN", "127.0.0.1:0"),
        ("PYLON_ADMIN_PROBE_LISTEN", "127.0.0.1:0"),
        ("PYLON_OUTBOUND_LISTEN", "127.0.0.1:0"),
        ("PYLON_INBOUND_LISTEN", "127.0.0.1:0"),
        ("PYLON_IDENTITY_CONTROL_PLANE", "true"),
        ("PYLON_POLICY_CONTROL_PLANE", "true"),
        ("PYLON_CONTROL_PLANE_ADDRESS", "https://127.0.0.1:9"),
        ("PYLON_CONTROL_PLANE_CA_FILE", "/nonexistent/ca.pem"),
    ]);
    cmd.env("PYLON_CONTROL_PLANE_TOKEN_FILE", &token);
    let logs = refused(cmd, "sidecar with a readable token");
    assert!(
        logs.contains("the token file") && logs.contains("is readable by others (mode 0640)"),
        "{logs}"
    );
}

/// The sidecar's open file descriptors.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test]
async fn out_of_file_descriptors_a_listener_backs_off_and_every_listener_recovers() {
    let (_app, _dir, proxy) = direct_sidecar("emfile", &[]).await;
    proxy.wait_ready().await;
    served(proxy.outbound).await;

    // A few descriptors above what is open now (the soft limit, as
    // `ulimit -n` in the pod would set it) ...
    let pid = proxy.pid();
    let limit = open_fds(pid) + 4;
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={limit}:")])
        .status()
        .expect("prlimit (util-linux)");
    assert!(status.success());
    // ... and more connections than that: accept fails with EMFILE while
    // they are open.
    let mut flood = Vec::new();
    for _ in 0..32 {
        flood.push(TcpStream::connect(proxy.outbound).await.unwrap());
    }
    proxy.wait_log("accepting a connection failed").await;
    assert!(proxy.logs().contains("Too many open files"));
    drop(flood);

    // Once they are gone every listener serves again, and the failures
    // were counted on the listener that met them.
    eventually("the outbound listener serves again", || async {
        let Ok(mut client) = crate::common::http::try_h2c(proxy.outbound).await else {
            return false;
        };
        let get = Request::get("http://web.test/headers").body(empty());
        let resp = client.send_request(get.unwrap()).await;
        resp.is_ok_and(|r| r.status() == StatusCode::OK)
    })
    .await;
    proxy.wait_ready().await;
    assert!(proxy.metric(&limit_hits("outbound", "accept_error")).await >= 1);
}
