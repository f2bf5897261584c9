//! Policy from a watched file: hot reload, rejection of bad files with every
//! error and its path, in-flight requests finishing on their snapshot, and
//! no lost request across many rewrites under load.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::StreamExt;
use pylon_proto::v1::EchoRequest;
use tonic::Code;

use crate::common::echo::{echo_client, start_echo, start_named_echo};
use crate::common::{
    Mesh, PATIENCE, SERVER_ID, TempDir, admin_get, backend_yaml, client_sidecar, mesh_policy,
    route_yaml, server_sidecar, set_policy, write_atomic,
};

fn backend_only(inbound: std::net::SocketAddr) -> String {
    backend_yaml("app", &[inbound.to_string()], Some(SERVER_ID))
}

#[tokio::test]
async fn reload_reroutes_and_a_bad_file_keeps_the_last_good_policy() {
    let app = start_echo().await;
    let mesh = Mesh::start(app.addr).await;
    let mut client = echo_client(mesh.client.outbound, "echo.test").await;
    client.unary(EchoRequest::default()).await.unwrap();

    // Without the route, the same call has nowhere to go.
    let v2 = backend_only(mesh.server.inbound);
    mesh.set_policy(&v2).await;
    let status = client.unary(EchoRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);

    // A file with several problems is rejected whole, every problem named
    // with its path; the previous policy stays.
    let bad = format!(
        "{v2}---
apiVersion: pylon.dev/v1
kind: GRPCRoute
metadata: {{ name: echo }}
spec:
  hostnames: [\"echo.test\"]
  rules:
    - backendRefs: [{{ name: app }}, {{ name: x }}]
      retry: {{ attempts: 0, codes: [UNAVAILABLE] }}
      timeoutz: 1s
"
    );
    write_atomic(&mesh.policy, &bad);
    let config = mesh
        .client
        .wait_policy_rejected(&pylon::policy::content_version(bad.as_bytes()))
        .await;
    let errors: Vec<String> = config["policy"]["lastError"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_string())
        .collect();
    let expect = [
        "GRPCRoute/echo: spec.rules[0].backendRefs[1].name: no Backend \"x\"",
        "GRPCRoute/echo: spec.rules[0].retry.attempts: must be ≥ 1",
        "GRPCRoute/echo: spec.rules[0].timeoutz: unknown field \"timeoutz\"",
    ];
    for want in expect {
        assert!(
            errors.iter().any(|e| e.starts_with(want)),
            "missing {want:?} in {errors:#?}"
        );
    }
    assert_eq!(
        config["policy"]["version"],
        pylon::policy::content_version(v2.as_bytes())
    );
    let status = client.unary(EchoRequest::default()).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::Unimplemented,
        "the last good policy is still in force"
    );

    // A good file again.
    mesh.set_policy(&mesh_policy(mesh.server.inbound)).await;
    client.unary(EchoRequest::default()).await.unwrap();
}

#[tokio::test]
async fn requests_in_flight_finish_on_the_snapshot_they_started_with() {
    let app = start_echo().await;
    let mesh = Mesh::start(app.addr).await;
    let mut client = echo_client(mesh.client.outbound, "echo.test").await;

    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = client
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let say = |s: &str| EchoRequest {
        payload: s.as_bytes().to_vec(),
        ..Default::default()
    };
    tx.send(say("before")).await.unwrap();
    assert_eq!(replies.next().await.unwrap().unwrap().payload, b"before");

    // The route disappears: new calls fail, the open stream carries on.
    mesh.set_policy(&backend_only(mesh.server.inbound)).await;
    let status = client.unary(EchoRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    for i in 0..5 {
        let msg = format!("after {i}");
        tx.send(say(&msg)).await.unwrap();
        let reply = tokio::time::timeout(PATIENCE, replies.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(reply.payload, msg.as_bytes());
    }
    drop(tx);
    assert!(replies.next().await.is_none());
}

/// A client policy that splits `echo.test` between backends `a` and `b`.
fn split_policy(
    a: std::net::SocketAddr,
    b: std::net::SocketAddr,
    wa: u32,
    wb: u32,
    round: u32,
) -> String {
    format!("# round {round}\n")
        + &backend_yaml(
            "a",
            &[a.to_string()],
            Some("spiffe://pylon.test/ns/default/sa/echo-a"),
        )
        + &backend_yaml(
            "b",
            &[b.to_string()],
            Some("spiffe://pylon.test/ns/default/sa/echo-b"),
        )
        + &route_yaml("GRPCRoute", "echo", "echo.test", &[("a", wa), ("b", wb)])
}

#[tokio::test]
async fn fifty_policy_rewrites_under_continuous_load_lose_no_request() {
    let app_a = start_named_echo("a").await;
    let app_b = start_named_echo("b").await;
    let dir = TempDir::new("rewrites");
    let ca = pylon::identity::dev::DevCa::new("pylon test root").unwrap();
    let server_a = server_sidecar(
        &ca,
        dir.path(),
        "a",
        "spiffe://pylon.test/ns/default/sa/echo-a",
        app_a.addr,
    );
    let server_b = server_sidecar(
        &ca,
        dir.path(),
        "b",
        "spiffe://pylon.test/ns/default/sa/echo-b",
        app_b.addr,
    );
    let first = split_policy(server_a.inbound, server_b.inbound, 1, 1, 0);
    let (client, policy_path) = client_sidecar(&ca, dir.path(), &first);
    for s in [&server_a, &server_b, &client] {
        s.wait_ready().await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let mut echo = echo_client(client.outbound, "echo.test").await;
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut served: BTreeMap<String, u64> = BTreeMap::new();
            let mut failures: Vec<String> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match echo.unary(EchoRequest::default()).await {
                    Ok(resp) => {
                        let by = resp
                            .metadata()
                            .get("x-served-by")
                            .unwrap()
                            .to_str()
                            .unwrap()
                            .to_string();
                        *served.entry(by).or_default() += 1;
                    }
                    Err(status) => {
                        failures.push(format!("{:?}: {}", status.code(), status.message()));
                    }
                }
            }
            (served, failures)
        }));
    }

    for round in 1..=50u32 {
        let (wa, wb) = match round % 3 {
            0 => (100, 0),
            1 => (0, 100),
            _ => (50, 50),
        };
        // Written as config tools and Kubernetes do: a new file renamed
        // over the old one. (An in-place rewrite has a moment when the file
        // is empty, itself a valid policy; see the test below.)
        let yaml = split_policy(server_a.inbound, server_b.inbound, wa, wb, round);
        set_policy(&client, &policy_path, &yaml).await;
    }
    stop.store(true, Ordering::Relaxed);

    let mut served: BTreeMap<String, u64> = BTreeMap::new();
    let mut failures = Vec::new();
    for w in workers {
        let (s, f) = w.await.unwrap();
        for (k, v) in s {
            *served.entry(k).or_default() += v;
        }
        failures.extend(f);
    }
    let total: u64 = served.values().sum();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        total + failures.len() as u64,
        &failures[..failures.len().min(5)]
    );
    assert!(
        served.get("a").copied().unwrap_or(0) > 0 && served.get("b").copied().unwrap_or(0) > 0,
        "{served:?}"
    );
    assert!(
        total >= 100,
        "only {total} requests ran during the rewrites"
    );
    let (status, _) = admin_get(client.admin, "/ready").await.unwrap();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn in_place_rewrites_are_installed_once_complete() {
    let app = start_echo().await;
    let mesh = Mesh::start(app.addr).await;
    let mut client = echo_client(mesh.client.outbound, "echo.test").await;
    for round in 0..5 {
        // Truncate, then write, as an editor saving in place does.
        let yaml = format!("# round {round}\n") + &mesh_policy(mesh.server.inbound);
        std::fs::write(&mesh.policy, &yaml).unwrap();
        mesh.client
            .wait_policy_version(&pylon::policy::content_version(yaml.as_bytes()))
            .await;
        client.unary(EchoRequest::default()).await.unwrap();
    }
}

#[tokio::test]
async fn readiness_waits_for_a_policy_and_config_describes_it() {
    let app = start_echo().await;
    let dir = TempDir::new("ready");
    let ca = pylon::identity::dev::DevCa::new("pylon test root").unwrap();
    let server = server_sidecar(&ca, dir.path(), "server", SERVER_ID, app.addr);
    let (client, policy_path) = client_sidecar(&ca, dir.path(), "kind: Nonsense\n");

    assert_eq!(admin_get(client.admin, "/live").await.unwrap().0, 200);
    let (status, body) = admin_get(client.admin, "/ready").await.unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("no policy installed"), "{body}");

    let yaml = mesh_policy(server.inbound);
    set_policy(&client, &policy_path, &yaml).await;
    client.wait_ready().await;

    let config = client.config().await;
    assert_eq!(config["identity"], crate::common::CLIENT_ID);
    assert_eq!(config["policy"]["installed"], true);
    assert_eq!(config["policy"]["resources"], 3);
    let routes = config["routes"].as_array().unwrap();
    let echo = routes
        .iter()
        .find(|r| r["route"] == "GRPCRoute/echo")
        .unwrap();
    assert_eq!(echo["hostnames"], serde_json::json!(["echo.test"]));
    assert_eq!(echo["backends"][0]["backend"], "Backend/app");
    assert_eq!(echo["backends"][0]["weight"], 1);
    let backend = &config["backends"][0];
    assert_eq!(backend["name"], "Backend/app");
    assert_eq!(backend["tls"]["mode"], "mesh");
    assert_eq!(backend["tls"]["identity"], SERVER_ID);
    assert_eq!(
        backend["endpoints"][0]["address"],
        server.inbound.to_string()
    );
}
