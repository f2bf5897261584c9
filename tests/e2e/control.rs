//! The control plane with real processes: applies reach every sidecar,
//! bad policy is refused whole, conflicts, NACKs, crash safety, a sidecar
//! that starts while the control plane is down, and applies under load.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use pylon::identity::dev::DevCa;
use pylon_proto::v1::EchoRequest;

use crate::common::control::{ControlProc, cp_policy_config};
use crate::common::echo::{echo_client, start_named_echo};
use crate::common::{
    CLIENT_ID, SERVER_ID, SidecarProc, TempDir, backend_yaml, eventually, mesh_policy, route_yaml,
};

/// A control plane, a server sidecar in front of `app` and a client
/// sidecar, both fed by the control plane.
struct CpMesh {
    dir: TempDir,
    ca: DevCa,
    cp: ControlProc,
    server: SidecarProc,
    client: SidecarProc,
}

impl CpMesh {
    async fn start(app: SocketAddr, client_extra: &str) -> CpMesh {
        let dir = TempDir::new("cp");
        let cp = ControlProc::spawn(crate::common::PYLON_CONTROL, &dir.path().join("cp-data"));
        let ca = DevCa::new("pylon test root").unwrap();
        let server = spawn_sidecar(&dir, &ca, &cp, "server", SERVER_ID, app, "");
        let client = spawn_sidecar(
            &dir,
            &ca,
            &cp,
            "client",
            CLIENT_ID,
            "127.0.0.1:9".parse().unwrap(),
            client_extra,
        );
        CpMesh {
            dir,
            ca,
            cp,
            server,
            client,
        }
    }
}

pub(crate) fn spawn_sidecar(
    dir: &TempDir,
    ca: &DevCa,
    cp: &ControlProc,
    name: &str,
    identity: &str,
    app: SocketAddr,
    extra: &str,
) -> SidecarProc {
    let files = ca.write_identity(dir.path(), name, identity).unwrap();
    let token = cp.token_file(dir.path(), name, identity);
    let state = dir.path().join(format!("{name}-state"));
    let cfg = dir.path().join(format!("{name}.yaml"));
    std::fs::write(
        &cfg,
        cp_policy_config(&files, cp, &token, &state, app, extra),
    )
    .unwrap();
    SidecarProc::spawn(crate::common::PYLON, &cfg)
}

#[tokio::test]
async fn an_apply_reaches_every_sidecar_which_routes_by_it() {
    let app = start_named_echo("app").await;
    let mesh = CpMesh::start(app.addr, "").await;
    let out = mesh.cp.apply(&mesh_policy(mesh.server.inbound));
    assert_eq!(
        out,
        "backend/app created\ngrpcroute/echo created\nhttproute/web created\n"
    );
    let version = mesh.cp.status().0;
    mesh.cp.wait_acked(&[SERVER_ID, CLIENT_ID], version).await;
    mesh.client.wait_ready().await;
    mesh.server.wait_ready().await;
    let config = mesh.client.config().await;
    assert_eq!(config["policy"]["version"], version.to_string());
    let mut echo = echo_client(mesh.client.outbound, "echo.test").await;
    let reply = echo
        .unary(EchoRequest {
            payload: b"via cp".to_vec(),
            ..Default::default()
        })
        .await;
    assert_eq!(reply.unwrap().into_inner().payload, b"via cp");

    // The same apply again changes nothing.
    let again = mesh.cp.apply(&mesh_policy(mesh.server.inbound));
    assert_eq!(
        again,
        "backend/app unchanged\ngrpcroute/echo unchanged\nhttproute/web unchanged\n"
    );
    assert_eq!(mesh.cp.status().0, version);
}

#[tokio::test]
async fn a_bad_batch_is_refused_whole_with_every_problem() {
    let dir = TempDir::new("cp-bad");
    let cp = ControlProc::spawn(crate::common::PYLON_CONTROL, &dir.path().join("data"));
    cp.apply(&backend_yaml("app", &["10.0.0.1:80".into()], None));
    let before = cp.status().0;
    let bad = backend_yaml("other", &["10.0.0.2:80".into()], None)
        + &route_yaml("GRPCRoute", "echo", "echo.test", &[("missing", 1)])
        + "apiVersion: pylon.dev/v1\nkind: Backend\nmetadata: { name: broken }\nspec: { endpoints: { static: [\"nowhere\"] } }\n";
    let out = cp.cli_with_stdin(&["apply", "-f", "-"], Some(&bad));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Backend/broken: spec.endpoints.static[0]"),
        "{stderr}"
    );
    assert_eq!(cp.status().0, before, "nothing was applied");
    let listed = cp.cli(&["get", "backend"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(!listed.contains("other"), "{listed}");

    // The reference check runs on the server, against what it stores.
    let dangling = route_yaml("GRPCRoute", "echo", "echo.test", &[("missing", 1)]);
    let out = cp.cli_with_stdin(&["apply", "-f", "-"], Some(&dangling));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("InvalidArgument"), "{stderr}");
    assert!(
        stderr
            .contains("GRPCRoute/echo: spec.rules[0].backendRefs[0].name: no Backend \"missing\""),
        "{stderr}"
    );
    assert_eq!(cp.status().0, before);

    // Without the admin token: UNAUTHENTICATED.
    let wrong = dir.path().join("wrong.token");
    std::fs::write(&wrong, "pylon_admin_nope").unwrap();
    let out = std::process::Command::new(crate::common::PYLON_CONTROL)
        .args(["status", "--server", &cp.address(), "--ca-file"])
        .arg(cp.ca_file())
        .arg("--token-file")
        .arg(&wrong)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"));
}

#[tokio::test]
async fn a_stale_resource_version_conflicts() {
    let dir = TempDir::new("cp-conflict");
    let cp = ControlProc::spawn(crate::common::PYLON_CONTROL, &dir.path().join("data"));
    cp.apply(&backend_yaml("app", &["10.0.0.1:80".into()], None));
    let got = cp.cli(&["get", "backend", "app", "-o", "yaml"]);
    let yaml = String::from_utf8_lossy(&got.stdout).to_string();
    assert!(yaml.contains("resourceVersion"), "{yaml}");
    // Two writers start from the same read; the second loses.
    let first = yaml.replace("10.0.0.1:80", "10.0.0.2:80");
    let second = yaml.replace("10.0.0.1:80", "10.0.0.3:80");
    cp.apply(&first);
    let out = cp.cli_with_stdin(&["apply", "-f", "-"], Some(&second));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Aborted") && stderr.contains("Backend/app"),
        "{stderr}"
    );
    let now = String::from_utf8_lossy(&cp.cli(&["get", "backend", "app", "-o", "yaml"]).stdout)
        .to_string();
    assert!(now.contains("10.0.0.2:80"), "{now}");
}

#[tokio::test]
async fn a_sidecar_that_cannot_apply_a_snapshot_nacks_it_and_keeps_serving() {
    let app = start_named_echo("app").await;
    let mesh = CpMesh::start(app.addr, "").await;
    let dir = &mesh.dir;
    // A sidecar that refuses policies over 1500 bytes.
    let limited = {
        let files = mesh
            .ca
            .write_identity(
                dir.path(),
                "limited",
                "spiffe://pylon.test/ns/default/sa/limited",
            )
            .unwrap();
        let token = mesh.cp.token_file(
            dir.path(),
            "limited",
            "spiffe://pylon.test/ns/default/sa/limited",
        );
        let cfg = dir.path().join("limited.yaml");
        let yaml = cp_policy_config(
            &files,
            &mesh.cp,
            &token,
            &dir.path().join("limited-state"),
            "127.0.0.1:9".parse().unwrap(),
            "",
        )
        .replace(
            "policy:\n  controlPlane: {}\n",
            "policy:\n  controlPlane: {}\n  maxBytes: 1500\n",
        );
        std::fs::write(&cfg, yaml).unwrap();
        SidecarProc::spawn(crate::common::PYLON, &cfg)
    };
    let limited_id = "spiffe://pylon.test/ns/default/sa/limited";

    mesh.cp.apply(&mesh_policy(mesh.server.inbound));
    let good = mesh.cp.status().0;
    mesh.cp.wait_acked(&[CLIENT_ID, limited_id], good).await;

    // A policy too large for the limited sidecar.
    let mut big = mesh_policy(mesh.server.inbound);
    for i in 0..20 {
        big += &route_yaml(
            "HTTPRoute",
            &format!("extra-{i}"),
            &format!("extra-{i}.test"),
            &[("app", 1)],
        );
    }
    mesh.cp.apply(&big);
    let bigger = mesh.cp.status().0;
    mesh.cp.wait_acked(&[CLIENT_ID], bigger).await;
    let (acked, nack) = eventually("a NACK naming policy.maxBytes", async || {
        let (_, sidecars) = mesh.cp.status();
        let row = sidecars.iter().find(|(id, _, _)| id == limited_id).cloned();
        match row {
            Some((_, acked, nack)) if nack.contains("policy.maxBytes") => Ok((acked, nack)),
            _ => Err(format!("{sidecars:?}")),
        }
    })
    .await;
    assert_eq!(acked, good, "it keeps its last good version");
    assert!(nack.starts_with(&format!("version {bigger}:")), "{nack}");
    let config = limited.config().await;
    assert_eq!(config["policy"]["version"], good.to_string());
    // It still routes by the last good policy.
    let mut echo = echo_client(limited.outbound, "echo.test").await;
    echo.unary(EchoRequest::default()).await.unwrap();
}

#[tokio::test]
async fn acknowledged_applies_survive_kill_9_and_sidecars_resync() {
    let app = start_named_echo("app").await;
    let mut mesh = CpMesh::start(app.addr, "").await;
    let address = mesh.cp.addr;
    let data = mesh.cp.data_dir.clone();
    mesh.cp.apply(&mesh_policy(mesh.server.inbound));

    // Applies one after another; the control plane is killed while one is
    // in flight. Every apply the CLI reported done must be there after.
    let stop = Arc::new(AtomicBool::new(false));
    let applier = {
        let stop = stop.clone();
        let inbound = mesh.server.inbound;
        let cli_env = (mesh.cp.address(), data.clone());
        std::thread::spawn(move || {
            let mut acknowledged = Vec::new();
            for i in 0..1000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let yaml = mesh_policy(inbound)
                    + &route_yaml(
                        "HTTPRoute",
                        &format!("r{i}"),
                        &format!("r{i}.test"),
                        &[("app", 1)],
                    );
                let out = std::process::Command::new(crate::common::PYLON_CONTROL)
                    .args(["apply", "-f", "-"])
                    .env("PYLON_CONTROL_SERVER", &cli_env.0)
                    .env("PYLON_CONTROL_TOKEN_FILE", cli_env.1.join("admin.token"))
                    .env("PYLON_CONTROL_CA_FILE", cli_env.1.join("ca.pem"))
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .and_then(|mut c| {
                        use std::io::Write;
                        c.stdin.take().unwrap().write_all(yaml.as_bytes())?;
                        c.wait_with_output()
                    });
                match out {
                    Ok(o) if o.status.success() => acknowledged.push(i),
                    _ => break,
                }
            }
            acknowledged
        })
    };
    // Let a few applies land, then kill -9 mid-stream.
    eventually("six applies", async || mesh.cp.status().0 >= 6).await;
    mesh.cp.kill9();
    stop.store(true, Ordering::Relaxed);
    let acknowledged = applier.join().unwrap();
    let last = *acknowledged.last().expect("some applies were acknowledged");

    mesh.cp = ControlProc::spawn_at(crate::common::PYLON_CONTROL, &data, address);
    let got = mesh.cp.cli(&["get", "httproute", &format!("r{last}")]);
    assert!(
        got.status.success(),
        "acknowledged apply r{last} lost: {}",
        String::from_utf8_lossy(&got.stderr)
    );
    let version = mesh.cp.status().0;
    mesh.cp.wait_acked(&[SERVER_ID, CLIENT_ID], version).await;
}

#[tokio::test]
async fn a_sidecar_restarted_while_the_control_plane_is_down_serves_its_cache() {
    let app = start_named_echo("app").await;
    let mut mesh = CpMesh::start(app.addr, "").await;
    mesh.cp.apply(&mesh_policy(mesh.server.inbound));
    let version = mesh.cp.status().0;
    mesh.cp.wait_acked(&[SERVER_ID, CLIENT_ID], version).await;
    let address = mesh.cp.addr;
    let data = mesh.cp.data_dir.clone();
    mesh.cp.kill9();
    // Its port stays taken until it comes back, by a listener that drops
    // every connection: a control plane of a test running alongside could
    // otherwise be given the freed port and answer in its place.
    let holder = tokio::net::TcpListener::bind(address).await.unwrap();
    let hold = tokio::spawn(async move {
        while let Ok((conn, _)) = holder.accept().await {
            drop(conn);
        }
    });

    // The client sidecar restarts with the control plane gone.
    drop(std::mem::replace(
        &mut mesh.client,
        SidecarProc::spawn(crate::common::PYLON, &mesh.dir.path().join("client.yaml")),
    ));
    mesh.client.wait_ready().await;
    let (_, body) = crate::common::admin_get(mesh.client.admin, "/ready")
        .await
        .unwrap();
    assert!(body.contains("policy from the cache"), "{body}");
    let mut echo = echo_client(mesh.client.outbound, "echo.test").await;
    echo.unary(EchoRequest::default()).await.unwrap();

    // The control plane comes back: the sidecar reconnects on its own.
    hold.abort();
    let _ = hold.await;
    mesh.cp = ControlProc::spawn_at(crate::common::PYLON_CONTROL, &data, address);
    mesh.cp.wait_acked(&[CLIENT_ID], version).await;
    eventually("the client sidecar ready again", async || {
        let (_, body) = crate::common::admin_get(mesh.client.admin, "/ready")
            .await
            .unwrap();
        if body == "ready\n" { Ok(()) } else { Err(body) }
    })
    .await;
}

#[tokio::test]
async fn rollback_restores_an_earlier_version() {
    let dir = TempDir::new("cp-rollback");
    let cp = ControlProc::spawn(crate::common::PYLON_CONTROL, &dir.path().join("data"));
    cp.apply(&backend_yaml("app", &["10.0.0.1:80".into()], None));
    let v1 = cp.status().0;
    cp.apply(
        &(backend_yaml("app", &["10.0.0.2:80".into()], None)
            + &backend_yaml("extra", &["10.0.0.3:80".into()], None)),
    );
    let out = cp.cli(&["rollback", &v1.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let now = cp.status().0;
    assert_eq!(now, v1 + 2);
    let yaml = String::from_utf8_lossy(&cp.cli(&["get", "backend", "app", "-o", "yaml"]).stdout)
        .to_string();
    assert!(yaml.contains("10.0.0.1:80"), "{yaml}");
    assert!(!cp.cli(&["get", "backend", "extra"]).status.success());
    let json = String::from_utf8_lossy(&cp.cli(&["get", "backend", "app", "-o", "json"]).stdout)
        .to_string();
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["kind"], "Backend");
    let deleted = cp.cli(&["delete", "backend", "app"]);
    assert_eq!(
        String::from_utf8_lossy(&deleted.stdout),
        "backend/app deleted\n"
    );
}

// Multi-threaded: the CLI calls block a thread while the load runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_applies_under_load_lose_no_request() {
    let a = start_named_echo("a").await;
    let b = start_named_echo("b").await;
    let dir = TempDir::new("cp-load");
    let cp = ControlProc::spawn(crate::common::PYLON_CONTROL, &dir.path().join("data"));
    let ca = DevCa::new("pylon test root").unwrap();
    let side_a = spawn_sidecar(
        &dir,
        &ca,
        &cp,
        "a",
        "spiffe://pylon.test/ns/default/sa/echo-a",
        a.addr,
        "",
    );
    let side_b = spawn_sidecar(
        &dir,
        &ca,
        &cp,
        "b",
        "spiffe://pylon.test/ns/default/sa/echo-b",
        b.addr,
        "",
    );
    let client = spawn_sidecar(
        &dir,
        &ca,
        &cp,
        "client",
        CLIENT_ID,
        "127.0.0.1:9".parse().unwrap(),
        "",
    );
    let policy = |wa: u32, wb: u32| {
        backend_yaml(
            "a",
            &[side_a.inbound.to_string()],
            Some("spiffe://pylon.test/ns/default/sa/echo-a"),
        ) + &backend_yaml(
            "b",
            &[side_b.inbound.to_string()],
            Some("spiffe://pylon.test/ns/default/sa/echo-b"),
        ) + &route_yaml("GRPCRoute", "echo", "echo.test", &[("a", wa), ("b", wb)])
    };
    cp.apply(&policy(1, 1));
    cp.wait_acked(&[CLIENT_ID], cp.status().0).await;
    client.wait_ready().await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..6 {
        let mut echo = echo_client(client.outbound, "echo.test").await;
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut served: BTreeMap<String, u64> = BTreeMap::new();
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match echo.unary(EchoRequest::default()).await {
                    Ok(r) => {
                        let by = r
                            .metadata()
                            .get("x-served-by")
                            .unwrap()
                            .to_str()
                            .unwrap()
                            .to_string();
                        *served.entry(by).or_default() += 1;
                    }
                    Err(s) => failures.push(format!("{:?}: {}", s.code(), s.message())),
                }
            }
            (served, failures)
        }));
    }
    for round in 0..100u32 {
        let (wa, wb) = match round % 3 {
            0 => (100, 0),
            1 => (0, 100),
            _ => (50, 50),
        };
        cp.apply(&policy(wa, wb));
    }
    cp.wait_acked(&[CLIENT_ID], cp.status().0).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut failures = Vec::new();
    let mut served: BTreeMap<String, u64> = BTreeMap::new();
    for w in workers {
        let (s, f) = w.await.unwrap();
        for (k, v) in s {
            total += v;
            *served.entry(k).or_default() += v;
        }
        failures.extend(f);
    }
    assert!(
        failures.is_empty(),
        "{} failed of {}: {:?}",
        failures.len(),
        total,
        &failures[..failures.len().min(3)]
    );
    assert!(served.len() == 2, "{served:?}");
    assert!(total >= 200, "only {total} calls ran during the applies");
}
