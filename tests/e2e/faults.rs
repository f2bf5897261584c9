//! Faults of the world around a sidecar, with real processes: an upstream
//! that dies mid-stream, an endpoint that never answers a SYN, a DNS server
//! that is gone, a state directory that cannot be written (read-only, or
//! full), and a control plane killed while a certificate renewal is in
//! flight. Each test asserts what the caller sees, that nothing hangs, and
//! that the sidecar serves on.
//!
//! Covered elsewhere, not repeated here: connect failures retried on
//! another endpoint and ejection on 5xx (`resilience.rs`), DNS answering
//! SERVFAIL (`resilience.rs`,
//! `dns_endpoints_follow_the_records_and_keep_the_last_good_set`), a
//! snapshot the sidecar cannot compile (`control.rs`), a renewal that comes
//! due while the control plane is already down (`identity.rs`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use pylon::identity::dev::DevCa;
use pylon_proto::v1::EchoRequest;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tonic::Code;

use crate::common::chaos::ChaosServer;
use crate::common::control::{ControlProc, cp_config, cp_policy_config};
use crate::common::echo::{echo_client, echo_service, start_named_echo};
use crate::common::http::{channel_body, empty, http1};
use crate::common::policy::{
    self, Build, Endpoints, Kind, LoadBalancerType, Protocol, TargetKind, outlier_detection,
    target, traffic_policy, yaml,
};
use crate::common::{
    CLIENT_ID, Mesh, PATIENCE, PYLON, PYLON_CONTROL, SERVER_ID, SidecarProc, TempDir, admin_get,
    client_sidecar, eventually, mesh_policy, route_yaml, sidecar_config,
};
use crate::identity::cert_field;

// ------------------------------------------------- an upstream killed mid-stream

/// The app behind a server sidecar, killable: [`KillableApp::kill`] closes
/// its listener and every connection at once, as the kernel closes the
/// sockets of a process that died. gRPC callers get the Echo service; any
/// other request gets `first`, then a body that never ends.
struct KillableApp {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl KillableApp {
    async fn start(addr: SocketAddr) -> KillableApp {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            // Aborting the task drops this set, and every connection in it.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        if let Ok((tcp, _)) = accepted {
                            connections.spawn(serve(tcp));
                        }
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        KillableApp { addr, task }
    }

    /// Starts again where a killed one listened, once its port is free.
    async fn restart(addr: SocketAddr) -> KillableApp {
        eventually(format_args!("{addr} free again"), async || {
            std::net::TcpListener::bind(addr).is_ok()
        })
        .await;
        KillableApp::start(addr).await
    }

    fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for KillableApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(tcp: tokio::net::TcpStream) {
    let (echo, _cancelled) = echo_service("app");
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let mut echo = echo.clone();
        async move {
            let grpc = req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
            if grpc {
                tower::Service::call(&mut echo, req).await
            } else {
                let (tx, body) = channel_body();
                tokio::spawn(async move {
                    let _ = tx.send(Frame::data(Bytes::from_static(b"first"))).await;
                    tx.closed().await;
                });
                Ok::<_, Infallible>(Response::new(tonic::body::Body::new(body)))
            }
        }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(tcp), svc)
        .await;
}

/// Waits for `what` at most [`PATIENCE`]: a call that never ends fails the
/// test instead of hanging it.
async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not end within {PATIENCE:?}"))
}

#[tokio::test]
async fn a_grpc_stream_whose_server_dies_ends_with_unavailable_and_the_next_call_is_served() {
    let app = KillableApp::start("127.0.0.1:0".parse().unwrap()).await;
    let mesh = Mesh::start(app.addr).await;
    let (mut echo, mut stream) = endless_stream(mesh.client.outbound).await;
    // In flight through both sidecars.
    assert_eq!(stream.message().await.unwrap().unwrap().payload, b"tick");

    app.kill();
    let status = status_at_end(&mut stream).await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.metadata().get("x-pylon-error").unwrap(),
        "upstream-failed"
    );

    // The app is back on its port: the next call goes through.
    let _app = KillableApp::restart(app.addr).await;
    let reply = bounded("the next call", echo.unary(EchoRequest::default())).await;
    assert!(reply.is_ok(), "{reply:?}\n{}", mesh.server.logs());
}

/// A client of `outbound` and a server stream through it that never ends
/// by itself (`tick` after `tick`).
async fn endless_stream(
    outbound: std::net::SocketAddr,
) -> (
    pylon_proto::v1::echo_client::EchoClient<tonic::transport::Channel>,
    tonic::Streaming<pylon_proto::v1::EchoReply>,
) {
    let mut echo = echo_client(outbound, "echo.test").await;
    let stream = echo
        .server_stream(EchoRequest {
            payload: b"tick".to_vec(),
            count: u32::MAX,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (echo, stream)
}

/// Reads `stream` to its end: the status it ends with (a clean end fails
/// the test).
async fn status_at_end(stream: &mut tonic::Streaming<pylon_proto::v1::EchoReply>) -> tonic::Status {
    bounded("the stream", async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the stream ended as if complete after its server died"),
                Err(status) => break status,
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_grpc_stream_whose_peer_sidecar_dies_ends_with_unavailable() {
    let app = start_named_echo("app").await;
    let mesh = Mesh::start(app.addr).await;
    let (_echo, mut stream) = endless_stream(mesh.client.outbound).await;
    assert_eq!(stream.message().await.unwrap().unwrap().payload, b"tick");

    // The server sidecar is killed (SIGKILL): the mTLS connection dies
    // under the stream, and the client sidecar tells its caller.
    let Mesh { server, client, .. } = mesh;
    drop(server);
    let status = status_at_end(&mut stream).await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.metadata().get("x-pylon-error").unwrap(),
        "upstream-failed"
    );
    assert_eq!(admin_get(client.admin, "/ready").await.unwrap().0, 200);
}

#[tokio::test]
async fn an_http_body_whose_server_dies_ends_broken_and_the_next_request_is_served() {
    let app = KillableApp::start("127.0.0.1:0".parse().unwrap()).await;
    let mesh = Mesh::start(app.addr).await;
    let get = || {
        Request::get("/stream")
            .header("host", "web.test")
            .body(empty())
            .unwrap()
    };
    let mut conn = http1(mesh.client.outbound).await;
    let resp = conn.send_request(get()).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, Bytes::from_static(b"first"));

    app.kill();
    let rest = bounded("the body", body.collect()).await;
    assert!(
        rest.is_err(),
        "a truncated body must not end as if complete: {:?}",
        rest.map(http_body_util::Collected::to_bytes)
    );

    let _app = KillableApp::restart(app.addr).await;
    let mut conn = http1(mesh.client.outbound).await;
    let resp = bounded("the next request", conn.send_request(get()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.into_body().frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"first"));
}

// ------------------------------------------------- a black-holed endpoint

/// An address that never answers a SYN: a listener with a backlog of 0
/// whose one queued connection is never accepted, so the kernel drops
/// every further SYN. (A routable non-answering address such as
/// 10.255.255.1 is answered by this sandbox's network.)
struct BlackHole {
    addr: SocketAddr,
    _listener: socket2::Socket,
    _queued: std::net::TcpStream,
}

impl BlackHole {
    fn new() -> BlackHole {
        let listener = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        listener.bind(&any.into()).unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let queued = std::net::TcpStream::connect(addr).unwrap();
        BlackHole {
            addr,
            _listener: listener,
            _queued: queued,
        }
    }
}

#[tokio::test]
async fn a_black_holed_endpoint_times_out_is_ejected_and_the_other_serves() {
    let hole = BlackHole::new();
    let good = ChaosServer::start("good").await;
    let mut outliers = outlier_detection(5, Duration::from_secs(1), Duration::from_secs(300), 50);
    outliers.consecutive_gateway_errors = Some(1);
    // No retry: the caller sees the connect timeout itself.
    let policy = yaml(&[
        policy::backend("svc", &[hole.addr, good.addr], None).protocol(Protocol::Grpc),
        policy::route(Kind::GrpcRoute, "svc", "svc.test", &[("svc", 1)]),
        traffic_policy("svc", target(TargetKind::Backend, "svc"))
            .load_balancer(LoadBalancerType::RoundRobin)
            .outlier_detection(outliers),
    ]);
    let dir = TempDir::new("blackhole");
    let ca = DevCa::new("pylon test root").unwrap();
    let (sidecar, _) = client_sidecar(&ca, dir.path(), &policy);
    sidecar.wait_ready().await;
    let mut client = echo_client(sidecar.outbound, "svc.test").await;

    // Round robin sends one of the first two calls to the black hole.
    let mut timed_out = Vec::new();
    for _ in 0..2 {
        if let Err(status) = bounded("a call", client.unary(EchoRequest::default())).await {
            timed_out.push(status);
        }
    }
    assert_eq!(timed_out.len(), 1, "{timed_out:?}");
    assert_eq!(timed_out[0].code(), Code::Unavailable);
    let code = timed_out[0].metadata().get("x-pylon-error").unwrap();
    assert_eq!(code, "connect-timeout", "{:?}", timed_out[0]);

    let config = sidecar.config().await;
    let endpoints = config["backends"][0]["endpoints"].as_array().unwrap();
    let hole_ep = endpoints
        .iter()
        .find(|e| e["address"] == hole.addr.to_string())
        .unwrap();
    assert_eq!(hole_ep["state"], "ejected", "{endpoints:#?}");
    assert_eq!(
        sidecar
            .metric("pylon_outlier_ejections_total{backend=\"Backend/svc\"}")
            .await,
        1
    );

    // Every later call is served by the other endpoint.
    for _ in 0..20 {
        bounded("a call", client.unary(EchoRequest::default()))
            .await
            .unwrap();
    }
    assert_eq!(good.requests(), 21);
}

// ------------------------------------------------- the DNS server down

#[tokio::test]
async fn with_its_dns_server_gone_a_sidecar_keeps_the_last_endpoints_and_serves() {
    use pylon::discovery::testing::TestDnsServer;
    let dns = TestDnsServer::start().await.unwrap();
    let app = ChaosServer::start("app").await;
    dns.set("svc.mesh.test", vec!["127.0.0.1".parse().unwrap()], 1);

    let dir = TempDir::new("dns-down");
    let ca = DevCa::new("pylon test root").unwrap();
    let files = ca.write_identity(dir.path(), "client", CLIENT_ID).unwrap();
    let policy_path = dir.path().join("policy.yaml");
    std::fs::write(
        &policy_path,
        yaml(&[
            policy::backend("svc", &[], None)
                .protocol(Protocol::Grpc)
                .endpoints(Endpoints::Dns {
                    hostname: "svc.mesh.test".into(),
                    port: app.addr.port(),
                }),
            policy::route(Kind::GrpcRoute, "svc", "svc.test", &[("svc", 1)]),
        ]),
    )
    .unwrap();
    let cfg = dir.path().join("pylon.yaml");
    let bootstrap = sidecar_config(&files, &policy_path, "127.0.0.1:9".parse().unwrap())
        + &format!("dns: {{ nameservers: [\"{}\"], minTtl: 1s }}\n", dns.addr());
    std::fs::write(&cfg, bootstrap).unwrap();
    let sidecar = SidecarProc::spawn(PYLON, &cfg);
    sidecar.wait_ready().await;
    let endpoints = async || -> Vec<String> {
        sidecar.config().await["backends"][0]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["address"].as_str().unwrap().to_string())
            .collect()
    };
    let want = vec![app.addr.to_string()];
    eventually("the resolved endpoint", async || endpoints().await == want).await;
    let mut client = echo_client(sidecar.outbound, "svc.test").await;
    client.unary(EchoRequest::default()).await.unwrap();

    // The name server goes away (its sockets closed): queries go unanswered.
    drop(dns);
    let failures = || {
        strip(&sidecar.logs())
            .matches("DNS resolution failed; keeping the last good endpoints")
            .count()
    };
    eventually("a failed re-resolution", async || failures() >= 1).await;
    assert_eq!(endpoints().await, want);
    client.unary(EchoRequest::default()).await.unwrap();
    // And it keeps trying, and keeping them.
    eventually("another failed re-resolution", async || failures() >= 2).await;
    assert_eq!(endpoints().await, want);
    client.unary(EchoRequest::default()).await.unwrap();
    assert_eq!(app.requests(), 3);
}

fn strip(logs: &str) -> String {
    crate::common::strip_ansi(logs)
}

// ------------------------------------------------- the state directory

/// A sidecar whose policy comes from the control plane and whose
/// `stateDir` is a 64 KiB tmpfs in a mount namespace of its own (root
/// only: the tests run as root, for whom a read-only mode bit is no
/// obstacle). The test reaches the directory through `/proc/<pid>/root`.
fn spawn_with_tmpfs_state(cfg: &Path, state: &Path) -> SidecarProc {
    std::fs::create_dir_all(state).unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "sh",
        "-c",
        "mount -t tmpfs -o size=64k,mode=0700 pylon-state \"$1\" && exec \"$2\" proxy --config \"$3\"",
        "sh",
    ])
    .arg(state)
    .arg(PYLON)
    .arg(cfg);
    SidecarProc::spawn_command(cmd)
}

/// `path` as the process `pid` sees it, from this mount namespace.
fn seen_by(pid: u32, path: &Path) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap())
}

/// What breaks the state directory of the sidecar `pid`, whose directory
/// is `state`; the text of the error it must report; whether the older
/// cache can still be removed (a full disk) or stays, said in the log (a
/// read-only one); how to mend it.
struct StateFault {
    break_it: fn(u32, &Path),
    error: &'static str,
    stale_cache_removed: bool,
    mend: fn(u32, &Path),
}

/// Fills the tmpfs with one file, to the last byte.
fn fill(pid: u32, state: &Path) {
    let filler = seen_by(pid, state).join("filler");
    let err = std::fs::write(&filler, vec![0u8; 1 << 20]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(28), "ENOSPC expected: {err}");
}

fn unfill(pid: u32, state: &Path) {
    std::fs::remove_file(seen_by(pid, state).join("filler")).unwrap();
}

fn remount(pid: u32, state: &Path, how: &str) {
    let out = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "--mount", "mount", "-o", how])
        .arg(state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn a_state_dir_fault_is_reported_nacked_and_served_through(fault: StateFault) {
    let namespaces = Command::new("unshare").args(["--mount", "true"]).status();
    if !namespaces.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: cannot make a mount namespace here (needs root)");
        return;
    }
    let app = start_named_echo("app").await;
    let dir = TempDir::new("state-fault");
    let cp = ControlProc::spawn(PYLON_CONTROL, &dir.path().join("cp-data"));
    let ca = DevCa::new("pylon test root").unwrap();
    let config = |name: &str, id: &str, app: SocketAddr, state: &Path| {
        let files = ca.write_identity(dir.path(), name, id).unwrap();
        let token = cp.token_file(dir.path(), name, id);
        let cfg = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&cfg, cp_policy_config(&files, &cp, &token, state, app, "")).unwrap();
        cfg
    };
    let server_cfg = config(
        "server",
        SERVER_ID,
        app.addr,
        &dir.path().join("server-state"),
    );
    let server = SidecarProc::spawn(PYLON, &server_cfg);
    let state = dir.path().join("client-state");
    let client_cfg = config("client", CLIENT_ID, "127.0.0.1:9".parse().unwrap(), &state);
    let client = spawn_with_tmpfs_state(&client_cfg, &state);
    let pid = client.pid();

    let base = mesh_policy(server.inbound);
    cp.apply(&base);
    let kept = cp.status().0;
    cp.wait_acked(&[CLIENT_ID], kept).await;
    let cache = seen_by(pid, &state).join(pylon::policy::control::CACHE_FILE);
    let cached = std::fs::read_to_string(&cache).unwrap();
    assert!(
        cached.starts_with(&format!("# pylon policy cache, version {kept},")),
        "{cached}"
    );

    (fault.break_it)(pid, &state);
    cp.apply(&(base.clone() + &route_yaml("GRPCRoute", "added", "added.test", &[("app", 1)])));
    let unkept = cp.status().0;
    let (acked, nack) = eventually("a NACK of the unkept version", async || {
        let (_, sidecars) = cp.status();
        match sidecars.iter().find(|(id, _, _)| id == CLIENT_ID) {
            Some((_, acked, nack)) if nack.starts_with(&format!("version {unkept}:")) => {
                Ok((*acked, nack.clone()))
            }
            _ => Err(format!("{sidecars:?}")),
        }
    })
    .await;
    assert_eq!(acked, kept, "no ACK for a snapshot that was not kept");
    assert!(nack.contains(fault.error), "{nack}");
    let logs = strip(&client.logs());
    assert!(
        logs.contains("cannot write the policy cache") && logs.contains(fault.error),
        "{logs}"
    );
    // The older cache is not left to be served after a restart as if it
    // were the policy in force; where it cannot be removed, the log says so.
    if fault.stale_cache_removed {
        assert!(!cache.exists(), "the older cache was removed");
    } else {
        assert!(
            logs.contains("cannot remove the older policy cache"),
            "{logs}"
        );
    }
    // It serves on, with the newest policy (installed, only not kept).
    assert_eq!(admin_get(client.admin, "/ready").await.unwrap().0, 200);
    for authority in ["echo.test", "added.test"] {
        let mut echo = echo_client(client.outbound, authority).await;
        echo.unary(EchoRequest::default()).await.unwrap();
    }

    // Mended, the next snapshot is kept and acknowledged.
    (fault.mend)(pid, &state);
    cp.apply(&(base + &route_yaml("GRPCRoute", "mended", "mended.test", &[("app", 1)])));
    let next = cp.status().0;
    cp.wait_acked(&[CLIENT_ID], next).await;
    let cached = std::fs::read_to_string(&cache).unwrap();
    assert!(
        cached.starts_with(&format!("# pylon policy cache, version {next},")),
        "{cached}"
    );
}

#[tokio::test]
async fn a_full_state_dir_is_reported_nacked_and_served_through() {
    a_state_dir_fault_is_reported_nacked_and_served_through(StateFault {
        break_it: fill,
        error: "No space left on device",
        stale_cache_removed: true,
        mend: unfill,
    })
    .await;
}

#[tokio::test]
async fn a_read_only_state_dir_is_reported_nacked_and_served_through() {
    a_state_dir_fault_is_reported_nacked_and_served_through(StateFault {
        break_it: |pid, state| remount(pid, state, "remount,ro"),
        error: "Read-only file system",
        stale_cache_removed: false,
        mend: |pid, state| remount(pid, state, "remount,rw"),
    })
    .await;
}

// ------------------------------------------------- the control plane killed mid-renewal

/// A TCP relay to `upstream`. While it holds, a connection it accepts is
/// not passed on until the test releases it: the caller has connected and
/// sent its first bytes, and waits.
struct Relay {
    addr: SocketAddr,
    holding: Arc<Mutex<bool>>,
    held: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let holding = Arc::new(Mutex::new(false));
        let (held_tx, held) = mpsc::unbounded_channel();
        let h = holding.clone();
        let task = tokio::spawn(async move {
            let mut pipes = JoinSet::new();
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    continue;
                };
                let release = if *h.lock().unwrap() {
                    let (tx, rx) = oneshot::channel::<()>();
                    let _ = held_tx.send(tx);
                    Some(rx)
                } else {
                    None
                };
                pipes.spawn(async move {
                    if let Some(release) = release {
                        let _ = release.await;
                    }
                    if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
            }
        });
        Relay {
            addr,
            holding,
            held,
            task,
        }
    }

    fn hold(&self, on: bool) {
        *self.holding.lock().unwrap() = on;
    }

    /// The release of the next connection held.
    async fn next_held(&mut self) -> oneshot::Sender<()> {
        bounded("a held connection", self.held.recv())
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn a_control_plane_killed_during_a_renewal_leaves_the_certificate_in_use_until_it_returns() {
    let app = start_named_echo("app").await;
    let dir = TempDir::new("renewal-kill");
    let serve_args = ["--cert-ttl", "20s"];
    let data = dir.path().join("cp-data");
    let mut cp = ControlProc::spawn_with(
        PYLON_CONTROL,
        &data,
        "127.0.0.1:0".parse().unwrap(),
        &serve_args,
    );
    let mut relay = Relay::start(cp.addr).await;
    let spawn = |name: &str, id: &str, app: SocketAddr, address: &str| {
        let token = cp.token_file(dir.path(), name, id);
        let cfg = dir.path().join(format!("{name}.yaml"));
        let state = dir.path().join(format!("{name}-state"));
        let yaml = cp_config(&cp, &token, &state, app).replace(&cp.address(), address);
        std::fs::write(&cfg, yaml).unwrap();
        SidecarProc::spawn(PYLON, &cfg)
    };
    // The server sidecar reaches the control plane through the relay.
    let server = spawn(
        "server",
        SERVER_ID,
        app.addr,
        &format!("https://{}", relay.addr),
    );
    let client = spawn(
        "client",
        CLIENT_ID,
        "127.0.0.1:9".parse().unwrap(),
        &cp.address(),
    );
    cp.apply(&mesh_policy(server.inbound));
    server.wait_ready().await;
    client.wait_ready().await;
    let serial = cert_field(&server.config().await, "serial");
    let mut echo = echo_client(client.outbound, "echo.test").await;
    echo.unary(EchoRequest::default()).await.unwrap();

    // Its policy and bundle streams are open: the next connection it makes
    // is the renewal's. Hold it, kill the control plane, let it go on.
    relay.hold(true);
    let release = relay.next_held().await;
    cp.kill9();
    relay.hold(false);
    let _ = release.send(());

    server.wait_log("certificate renewal failed").await;
    assert_eq!(cert_field(&server.config().await, "serial"), serial);
    assert_eq!(admin_get(server.admin, "/ready").await.unwrap().0, 200);
    echo.unary(EchoRequest::default()).await.unwrap();

    // Back: the next attempt renews.
    let _back = ControlProc::spawn_with(PYLON_CONTROL, &data, cp.addr, &serve_args);
    eventually("a renewed certificate", async || {
        cert_field(&server.config().await, "serial") != serial
    })
    .await;
    echo.unary(EchoRequest::default()).await.unwrap();
}
