//! The control plane against hostile and revoked callers, with a real
//! `pylon-control serve`: HTTP/2 limits seen from a raw frame writer over
//! real TLS, a connection cap, decode limits before authentication, a
//! bounded method label, revocation that stops renewals, and the data
//! directory's secrets.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use pylon_proto::v1::IssueCertificateRequest;
use pylon_proto::v1::identity_client::IdentityClient;
use rcgen::KeyPair;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::common::control::ControlProc;
use crate::common::h2raw::{
    self, END_HEADERS, END_STREAM, ENHANCE_YOUR_CALM, GOAWAY, HEADERS, REFUSED_STREAM, RST_STREAM,
    frame, header_block, read_frame,
};
use crate::common::{PYLON_CONTROL, TempDir, eventually};
use crate::identity::{csr, identity_client, with_token};

const ALICE: &str = "spiffe://pylon.test/ns/default/sa/alice";
const BOB: &str = "spiffe://pylon.test/ns/default/sa/bob";

/// A control plane with metrics on, and `extra` serve arguments.
fn control(dir: &TempDir, extra: &[&str]) -> (ControlProc, SocketAddr) {
    let mut args = vec!["--metrics-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let cp = ControlProc::spawn_with(
        PYLON_CONTROL,
        &dir.path().join("data"),
        "127.0.0.1:0".parse().unwrap(),
        &args,
    );
    let logs = cp.logs();
    let metrics = logs
        .split("serving metrics on http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address logged:\n{logs}"));
    (cp, metrics)
}

/// The Prometheus text of the control plane.
async fn scrape(metrics: SocketAddr) -> String {
    let mut tcp = TcpStream::connect(metrics).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    out
}

/// The value of one sample (`name{labels}`), 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// A TLS connection to the gRPC listener (ALPN h2), trusting its CA.
async fn tls(cp: &ControlProc, config: Option<Arc<rustls::ClientConfig>>) -> TlsStream<TcpStream> {
    let config = config.unwrap_or_else(|| {
        let roots = pylon_control::cli::roots_from(&cp.ca_file()).unwrap();
        pylon_proto::client::client_config(roots, None).unwrap()
    });
    let tcp = TcpStream::connect(cp.addr).await.unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap()
}

fn grpc_headers(path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut fields = vec![
        (":method", "POST"),
        (":scheme", "https"),
        (":path", path),
        (":authority", "127.0.0.1"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];
    fields.extend_from_slice(extra);
    header_block(&fields)
}

/// An HTTP/2 connection past the SETTINGS exchange, without a request.
async fn raw_h2(cp: &ControlProc) -> TlsStream<TcpStream> {
    let mut io = tls(cp, None).await;
    // The server's SETTINGS (its limits in force once we ACK them).
    h2raw::handshake(&mut io, &[]).await;
    io
}

/// `pylon-control status` works: the control plane serves others.
fn served(cp: &ControlProc) {
    let out = cp.cli(&["status"]);
    assert!(
        out.status.success(),
        "another client was not served: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cp.logs()
    );
}

#[tokio::test]
async fn streams_beyond_the_limit_are_refused_while_the_connection_and_other_clients_are_served() {
    let dir = TempDir::new("cp-streams");
    let (cp, metrics) = control(&dir, &["--max-concurrent-streams", "4"]);
    let mut io = raw_h2(&cp).await;
    // Ten calls that never send their message: four stay open, waiting.
    let mut burst = Vec::new();
    let streams: Vec<u32> = (0..10).map(|i| 2 * i + 1).collect();
    for &id in &streams {
        burst.extend(frame(
            HEADERS,
            END_HEADERS,
            id,
            &grpc_headers("/pylon.v1.Identity/WhoAmI", &[]),
        ));
    }
    io.write_all(&burst).await.unwrap();
    let mut refused = Vec::new();
    while refused.len() < 6 {
        let f = read_frame(&mut io).await.expect("a frame");
        assert_ne!(f.kind, GOAWAY, "the connection itself was closed");
        if f.kind == RST_STREAM {
            assert_eq!(f.error_code(), REFUSED_STREAM, "stream {}", f.stream);
            refused.push(f.stream);
        }
    }
    refused.sort_unstable();
    assert_eq!(refused, streams[4..], "the streams past the fourth");

    // The attacker's connection is open, and another client is served.
    served(&cp);
    let text = scrape(metrics).await;
    assert_eq!(
        sample(
            &text,
            "pylon_control_http2_resets_sent_total{listener=\"grpc\",code=\"REFUSED_STREAM\"}"
        ),
        6.0,
        "{text}"
    );
    drop(io);
}

#[tokio::test]
async fn streams_the_client_makes_the_server_reset_close_the_connection_past_the_limit() {
    // MadeYouReset: each stream is malformed (END_STREAM, yet a body is
    // announced), so the server resets it; past the limit it goes away.
    let dir = TempDir::new("cp-madeyoureset");
    let (cp, metrics) = control(&dir, &["--max-local-error-reset-streams", "5"]);
    let mut io = raw_h2(&cp).await;
    let mut burst = Vec::new();
    for i in 0..20u32 {
        burst.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            2 * i + 1,
            &grpc_headers("/pylon.v1.Identity/WhoAmI", &[("content-length", "5")]),
        ));
    }
    // The server may close before it has read everything.
    let _ = io.write_all(&burst).await;
    let goaway = loop {
        match read_frame(&mut io).await {
            Ok(f) if f.kind == GOAWAY => break f.error_code(),
            Ok(_) => {}
            Err(e) => panic!("the connection ended without a GOAWAY: {e}"),
        }
    };
    assert_eq!(goaway, ENHANCE_YOUR_CALM);
    served(&cp);
    let text = scrape(metrics).await;
    assert_eq!(
        sample(
            &text,
            "pylon_control_http2_goaways_sent_total{listener=\"grpc\",code=\"ENHANCE_YOUR_CALM\"}"
        ),
        1.0,
        "{text}"
    );
}

/// A gRPC call over the h2 crate: sends `message` (gRPC framing included)
/// and, unless `end`, keeps the request open; returns the `grpc-status`.
async fn grpc_status(cp: &ControlProc, path: &str, message: &[u8], end: bool) -> String {
    let io = tls(cp, None).await;
    let (client, connection) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("https://127.0.0.1{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut body) = client.send_request(request, false).unwrap();
    body.send_data(Bytes::copy_from_slice(message), end)
        .unwrap();
    let response = response.await.unwrap();
    if let Some(status) = response.headers().get("grpc-status") {
        return status.to_str().unwrap().to_string();
    }
    let mut body = response.into_body();
    while body.data().await.is_some() {}
    let trailers = body.trailers().await.unwrap().unwrap_or_default();
    trailers["grpc-status"].to_str().unwrap().to_string()
}

#[tokio::test]
async fn an_oversized_message_is_refused_from_its_length_before_any_credential_or_byte_of_it() {
    let dir = TempDir::new("cp-decode");
    let (cp, metrics) = control(&dir, &[]);
    // A 1 GiB IssueCertificate announced, not one byte of it sent, and
    // no credential: refused from the length alone.
    let status = grpc_status(
        &cp,
        "/pylon.v1.Identity/IssueCertificate",
        &[0, 0x40, 0, 0, 0],
        false,
    )
    .await;
    assert_eq!(status, "8", "RESOURCE_EXHAUSTED");

    // A whole 64 KiB CSR, through tonic: the same, not UNAUTHENTICATED.
    let err = identity_client(&cp)
        .issue_certificate(IssueCertificateRequest {
            csr_der: vec![0x30; 64 * 1024],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    // A real CSR is well within the limit (refused for want of a token).
    let key = KeyPair::generate().unwrap();
    let err = identity_client(&cp)
        .issue_certificate(IssueCertificateRequest {
            csr_der: csr(&[ALICE], &key),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let text = scrape(metrics).await;
    assert_eq!(
        sample(
            &text,
            "pylon_control_rpc_requests_total{method=\"Identity/IssueCertificate\",code=\"RESOURCE_EXHAUSTED\"}"
        ),
        2.0,
        "{text}"
    );
}

#[tokio::test]
async fn made_up_method_names_add_no_metric_series() {
    let dir = TempDir::new("cp-methods");
    let (cp, metrics) = control(&dir, &[]);
    let paths = [
        "/pylon.v1.Identity/Bogus1",
        "/pylon.v1.Identity/Bogus2",
        "/pylon.v1.PolicyAdmin/Bogus3",
        "/evil.Service/Bogus4",
    ];
    for path in paths {
        let status = grpc_status(&cp, path, &[0, 0, 0, 0, 0], true).await;
        assert_ne!(status, "0", "{path}");
    }
    let text = scrape(metrics).await;
    assert!(!text.contains("Bogus"), "{text}");
    let others: f64 = text
        .lines()
        .filter(|l| l.starts_with("pylon_control_rpc_requests_total{method=\"other\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert_eq!(others, paths.len() as f64, "{text}");
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_and_counted_and_a_freed_slot_serves_again() {
    let dir = TempDir::new("cp-conn-cap");
    let (cp, metrics) = control(&dir, &["--max-connections", "2"]);
    // Two connections that say nothing hold both places.
    let held = [
        TcpStream::connect(cp.addr).await.unwrap(),
        TcpStream::connect(cp.addr).await.unwrap(),
    ];
    eventually("both places taken", async || {
        let text = scrape(metrics).await;
        match sample(&text, "pylon_control_connections_open{listener=\"grpc\"}") {
            2.0 => Ok(()),
            n => Err(format!("{n} open")),
        }
    })
    .await;
    // A third is closed at once, without a byte.
    let mut third = TcpStream::connect(cp.addr).await.unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(third.read(&mut buf).await.unwrap_or(0), 0);
    let text = scrape(metrics).await;
    assert_eq!(
        sample(
            &text,
            "pylon_control_connections_refused_total{listener=\"grpc\",reason=\"limit\"}"
        ),
        1.0,
        "{text}"
    );
    // Closing one frees its place (the server sees the end of its
    // handshake).
    drop(held);
    eventually("a client served once places are free", async || {
        let out = cp.cli(&["status"]);
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    })
    .await;
}

/// The token id `token list` shows for `identity`.
fn token_id(cp: &ControlProc, identity: &str) -> String {
    let out = cp.cli(&["token", "list"]);
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(identity))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no token for {identity}"))
        .to_string()
}

/// The identity service, as a workload presenting `chain` and `key`.
fn mtls_client(
    cp: &ControlProc,
    chain: &[Vec<u8>],
    key: &KeyPair,
) -> IdentityClient<tonic::transport::Channel> {
    let roots = pylon_control::cli::roots_from(&cp.ca_file()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        chain.iter().cloned().map(CertificateDer::from).collect(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    IdentityClient::new(pylon_proto::client::lazy_channel(&cp.address(), Arc::new(config)).unwrap())
}

/// A certificate for `identity` issued with `token`; then renewed once
/// with itself, which must work.
async fn certificate(cp: &ControlProc, token: &str, identity: &str) -> (Vec<Vec<u8>>, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let issued = identity_client(cp)
        .issue_certificate(with_token(
            IssueCertificateRequest {
                csr_der: csr(&[identity], &key),
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner();
    let renewed = renew(cp, &issued.chain_der, &key, identity).await;
    assert!(renewed.is_ok(), "a valid certificate renews: {renewed:?}");
    (issued.chain_der, key)
}

async fn renew(
    cp: &ControlProc,
    chain: &[Vec<u8>],
    key: &KeyPair,
    identity: &str,
) -> Result<(), tonic::Status> {
    let next = KeyPair::generate().unwrap();
    mtls_client(cp, chain, key)
        .issue_certificate(IssueCertificateRequest {
            csr_der: csr(&[identity], &next),
        })
        .await
        .map(|_| ())
}

#[tokio::test]
async fn a_revoked_token_or_identity_stops_the_renewals_of_its_certificates() {
    let dir = TempDir::new("cp-revoke");
    let (cp, _) = control(&dir, &[]);
    let alice_token = std::fs::read_to_string(cp.token_file(dir.path(), "alice", ALICE)).unwrap();
    let bob_token = std::fs::read_to_string(cp.token_file(dir.path(), "bob", BOB)).unwrap();
    let (alice_chain, alice_key) = certificate(&cp, &alice_token, ALICE).await;
    let (bob_chain, bob_key) = certificate(&cp, &bob_token, BOB).await;

    // Alice's token revoked: her certificate no longer renews, Bob's does.
    let out = cp.cli(&["token", "revoke", &token_id(&cp, ALICE)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refused = renew(&cp, &alice_chain, &alice_key, ALICE)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("revoked"), "{refused:?}");
    renew(&cp, &bob_chain, &bob_key, BOB).await.unwrap();

    // Bob's identity revoked directly: the same for his.
    let out = cp.cli(&["token", "revoke", BOB]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("identity {BOB} revoked")
    );
    let refused = renew(&cp, &bob_chain, &bob_key, BOB).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    // And his token with it.
    let key = KeyPair::generate().unwrap();
    let refused = identity_client(&cp)
        .issue_certificate(with_token(
            IssueCertificateRequest {
                csr_der: csr(&[BOB], &key),
            },
            &bob_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");

    // The deny list is in the store: it holds after a restart.
    let data = cp.data_dir.clone();
    drop(cp);
    let cp = ControlProc::spawn(PYLON_CONTROL, &data);
    let refused = renew(&cp, &alice_chain, &alice_key, ALICE)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
}

/// `serve` on `data`, expected to fail: its stderr.
fn serve_fails(data: &Path) -> String {
    let out = std::process::Command::new(PYLON_CONTROL)
        .args([
            "serve",
            "--trust-domain",
            "pylon.test",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "serve started: {stderr}");
    stderr
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn the_data_directory_is_private_and_a_readable_or_missing_ca_state_stops_serve() {
    let dir = TempDir::new("cp-secrets");
    let data = dir.path().join("data");
    drop(ControlProc::spawn(PYLON_CONTROL, &data));
    assert_eq!(mode(&data), 0o700);
    for secret in ["ca.json", "store.redb", "admin.token"] {
        assert_eq!(mode(&data.join(secret)), 0o600, "{secret}");
    }

    // A CA state others may read: refused, with the fix.
    let ca = data.join("ca.json");
    std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o644)).unwrap();
    let stderr = serve_fails(&data);
    assert!(
        stderr.contains("ca.json") && stderr.contains("chmod 600"),
        "{stderr}"
    );
    std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A store without its CA state: refused, not a new CA.
    std::fs::remove_file(&ca).unwrap();
    let stderr = serve_fails(&data);
    assert!(stderr.contains("ca.json is missing"), "{stderr}");
    assert!(!ca.exists(), "no new CA was made");
}

#[tokio::test]
async fn aged_connections_are_replaced_and_a_sidecar_follows_policy_across_them() {
    let dir = TempDir::new("cp-age");
    let (cp, _) = control(
        &dir,
        &[
            "--max-connection-age",
            "1s",
            "--max-connection-age-grace",
            "1s",
        ],
    );
    let app = crate::common::echo::start_named_echo("app").await;
    let ca = pylon::identity::dev::DevCa::new("pylon test root").unwrap();
    let sidecar = crate::control::spawn_sidecar(
        &dir,
        &ca,
        &cp,
        "server",
        crate::common::SERVER_ID,
        app.addr,
        "",
    );
    cp.apply(&crate::common::mesh_policy(sidecar.inbound));
    let first = cp.status().0;
    cp.wait_acked(&[crate::common::SERVER_ID], first).await;

    // The sidecar's connection is aged out: GOAWAY, then its policy stream,
    // which never ends by itself, is cut after the grace. It reconnects,
    // more than once ...
    eventually("the policy stream reopened twice", || async {
        sidecar.logs().matches("policy stream open").count() >= 3
    })
    .await;
    // ... and each time it comes back: a later apply still reaches it.
    cp.apply(&crate::common::backend_yaml(
        "aged",
        &[app.addr.to_string()],
        None,
    ));
    let second = cp.status().0;
    assert!(second > first);
    cp.wait_acked(&[crate::common::SERVER_ID], second).await;
    sidecar.wait_policy_version(&second.to_string()).await;
}
