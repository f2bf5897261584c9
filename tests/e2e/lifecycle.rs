//! The sidecar process from the outside: bootstrap configuration (file,
//! environment, errors) and an orderly stop (POST /drain, SIGTERM).

use std::process::Command;

use bytes::Bytes;
use http_body_util::BodyExt;
use pylon::identity::dev::DevCa;

use crate::common::echo::{echo_client, start_echo};
use crate::common::http::{gated_response, start_http_app};
use crate::common::{
    CLIENT_ID, Mesh, SERVER_ID, SidecarProc, TempDir, admin_get, admin_request, eventually,
    mesh_policy, sidecar_config,
};

fn run_pylon(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(crate::common::PYLON);
    cmd.args(args).env_remove("PYLON_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn an_invalid_config_exits_non_zero_listing_every_problem() {
    let dir = TempDir::new("bad-config");
    let path = dir.path().join("pylon.yaml");
    std::fs::write(
        &path,
        "admin: { listen: \"not-an-address\" }
inbound: { app: \"127.0.0.1:99999\" }
identity: { files: { cert: a.pem } }
outbund: { listen: \"127.0.0.1:1\" }
",
    )
    .unwrap();
    let out = run_pylon(&["proxy", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for want in [
        "admin.listen: \"not-an-address\" is not an ip:port address",
        "inbound.app: \"127.0.0.1:99999\" is not an ip:port address",
        "identity.files.key: required with the other identity.files keys",
        "identity.files.trustBundle: required with the other identity.files keys",
        "policy: required: set policy.file or policy.controlPlane",
        "outbund.listen: unknown key",
    ] {
        assert!(stderr.contains(want), "missing {want:?} in:\n{stderr}");
    }
}

#[test]
fn unreadable_identity_files_are_all_reported() {
    let dir = TempDir::new("bad-identity");
    let path = dir.path().join("pylon.yaml");
    std::fs::write(
        &path,
        "identity: { files: { cert: nope.pem, key: nope.key, trustBundle: nope-bundle.pem } }
policy: { file: policy.yaml }
admin: { listen: \"127.0.0.1:0\", probeListen: \"127.0.0.1:0\" }
outbound: { listen: \"127.0.0.1:0\" }
inbound: { listen: \"127.0.0.1:0\" }
",
    )
    .unwrap();
    let out = run_pylon(&["proxy", "--config", path.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for want in [
        "identity.files.cert",
        "identity.files.key",
        "identity.files.trustBundle",
    ] {
        assert!(stderr.contains(want), "missing {want:?} in:\n{stderr}");
    }
}

#[tokio::test]
async fn the_environment_overrides_the_file_and_can_replace_it() {
    let app = start_echo().await;
    let dir = TempDir::new("env");
    let ca = DevCa::new("pylon test root").unwrap();

    // The file names a dead app; the environment the live one.
    let server_files = ca.write_identity(dir.path(), "server", SERVER_ID).unwrap();
    let empty_policy = dir.path().join("empty.yaml");
    std::fs::write(&empty_policy, "").unwrap();
    let dead: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let server_cfg = dir.path().join("server.yaml");
    std::fs::write(
        &server_cfg,
        sidecar_config(&server_files, &empty_policy, dead),
    )
    .unwrap();
    let app_addr = app.addr.to_string();
    let server = SidecarProc::spawn_with_env(
        crate::common::PYLON,
        &server_cfg,
        &[("PYLON_INBOUND_APP", &app_addr)],
    );

    // The client has no file at all: every key from the environment.
    let client_files = ca.write_identity(dir.path(), "client", CLIENT_ID).unwrap();
    let client_policy = dir.path().join("client-policy.yaml");
    std::fs::write(&client_policy, mesh_policy(server.inbound)).unwrap();
    let env = [
        ("PYLON_ADMIN_LISTEN", "127.0.0.1:0".to_string()),
        ("PYLON_ADMIN_PROBE_LISTEN", "127.0.0.1:0".to_string()),
        ("PYLON_OUTBOUND_LISTEN", "127.0.0.1:0".to_string()),
        ("PYLON_INBOUND_LISTEN", "127.0.0.1:0".to_string()),
        (
            "PYLON_IDENTITY_FILES_CERT",
            client_files.cert.display().to_string(),
        ),
        (
            "PYLON_IDENTITY_FILES_KEY",
            client_files.key.display().to_string(),
        ),
        (
            "PYLON_IDENTITY_FILES_TRUST_BUNDLE",
            client_files.trust_bundle.display().to_string(),
        ),
        ("PYLON_POLICY_FILE", client_policy.display().to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let client = SidecarProc::spawn_without_config(crate::common::PYLON, &env);
    server.wait_ready().await;
    client.wait_ready().await;

    let mut echo = echo_client(client.outbound, "echo.test").await;
    let reply = echo
        .unary(pylon_proto::v1::EchoRequest {
            payload: b"via env".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.payload, b"via env");
}

#[tokio::test]
async fn post_drain_and_sigterm_finish_in_flight_requests_then_exit() {
    let app = start_http_app().await;
    let mut mesh = Mesh::start(app.addr).await;

    // A response in flight: its first chunk arrived, the rest is held.
    let (_conn, body) = gated_response(mesh.client.outbound).await;

    // Drain the client sidecar and terminate the server sidecar.
    let (status, _) = admin_request(mesh.client.admin, "POST", "/drain")
        .await
        .unwrap();
    assert_eq!(status, 202);
    let (status, text) = admin_get(mesh.client.admin, "/ready").await.unwrap();
    assert_eq!(status, 503);
    assert!(text.contains("draining"), "{text}");
    let server_pid = mesh.server.pid();
    assert!(
        Command::new("kill")
            .args(["-TERM", &server_pid.to_string()])
            .status()
            .unwrap()
            .success()
    );

    // New connections are refused once the listener closes...
    eventually("the outbound listener closed", async || {
        tokio::net::TcpStream::connect(mesh.client.outbound)
            .await
            .is_err()
    })
    .await;
    // ...while the request in flight completes.
    app.gate.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, Bytes::from_static(b"second"));

    for sidecar in [&mut mesh.client, &mut mesh.server] {
        let status = sidecar.wait_exit();
        assert!(status.success(), "{status:?}\n{}", sidecar.logs());
    }
}

#[tokio::test]
async fn a_restarted_peer_gets_new_connections_without_failed_calls() {
    let app = start_echo().await;
    let mut mesh = Mesh::start(app.addr).await;
    let mut echo = echo_client(mesh.client.outbound, "echo.test").await;
    echo.unary(pylon_proto::v1::EchoRequest::default())
        .await
        .unwrap();

    // The server sidecar stops (GOAWAY on the pooled connection) and a new
    // one takes over the same address.
    let inbound = mesh.server.inbound;
    let pid = mesh.server.pid().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(mesh.server.wait_exit().success());
    let files = mesh
        .ca
        .write_identity(mesh.dir.path(), "server2", SERVER_ID)
        .unwrap();
    let policy = mesh.dir.path().join("server2-policy.yaml");
    std::fs::write(&policy, "").unwrap();
    let cfg = mesh.dir.path().join("server2.yaml");
    let yaml = sidecar_config(&files, &policy, app.addr).replace(
        "inbound: { listen: \"127.0.0.1:0\"",
        &format!("inbound: {{ listen: \"{inbound}\""),
    );
    std::fs::write(&cfg, yaml).unwrap();
    let restarted = SidecarProc::spawn(crate::common::PYLON, &cfg);
    assert_eq!(restarted.inbound, inbound);
    restarted.wait_ready().await;

    for _ in 0..20 {
        echo.unary(pylon_proto::v1::EchoRequest::default())
            .await
            .unwrap_or_else(|s| {
                panic!(
                    "call after the restart failed: {s:?}\n{}",
                    mesh.client.logs()
                )
            });
    }
}
