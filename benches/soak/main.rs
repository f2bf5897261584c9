//! The soak: a two-sidecar mTLS mesh under mixed gRPC and HTTP traffic for
//! ten minutes (by default) while everything that changes in production
//! changes at once, then a verdict on leaks and failed calls.
//!
//! ```text
//!                                           ┌─▶ pylon (server A) ──h2c/http1──▶ app A
//! load ──h2c / http1──▶ pylon (client) ══mTLS╡
//!                                           └─▶ pylon (server B) ──h2c/http1──▶ app B  (killed and restarted)
//!                     pylon-control: policy for all three, certificates every minute
//! ```
//!
//! - **Traffic**: `helloworld.Greeter/SayHello` (authority `greeter.soak`)
//!   and HTTP/1.1 `GET /` (authority `web.soak`) at fixed rates through the
//!   client sidecar; each app answers both on one port.
//! - **Policy reloads**: `pylon-control apply` every few seconds (a route
//!   added under a new hostname, the retry backoff changed).
//! - **An endpoint failing and healing**: app B is killed (its listener and
//!   every connection closed at once, as the kernel does for a dead
//!   process) and restarted on the same port, periodically.
//! - **Certificate rotation**: the control plane issues certificates whose
//!   lifetime makes every sidecar renew about once a minute (at 70 %).
//!
//! Failed calls are attributed: one that ends while app B is down, or
//! within a grace period after it returns (ejection and probation settle),
//! is charged to the fault; any other is a soak failure. The RSS and open
//! file descriptors of every sidecar and the control plane are sampled
//! every few seconds; RSS drift compares the warm-up sample (minute 2) with
//! the end of the run. It prints a line per sample and a summary, and exits
//! non-zero when a target is missed.
//!
//! Settings (environment): `PYLON_SOAK_SECS` (600), `PYLON_SOAK_GRPC_RPS`
//! (100), `PYLON_SOAK_HTTP_RPS` (50), `PYLON_SOAK_CERT_TTL_SECS` (85),
//! `PYLON_SOAK_RELOAD_SECS` (3), `PYLON_SOAK_FAULT_EVERY_SECS` (60),
//! `PYLON_SOAK_FAULT_DOWN_SECS` (15), `PYLON_SOAK_SAMPLE_SECS` (5).
//! `cargo bench --bench soak`; see `benches/README.md`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use pylon::demo::greeter::HelloGreeter;
use pylon_proto::helloworld::HelloRequest;
use pylon_proto::helloworld::greeter_client::GreeterClient;
use pylon_proto::helloworld::greeter_server::GreeterServer;
use pylon_test_support::control::{ControlProc, cp_config};
use pylon_test_support::sidecar::SidecarProc;
use pylon_test_support::{TempDir, eventually};
use support::{env_or, load_average};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

const CLIENT_ID: &str = "spiffe://pylon.test/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://pylon.test/ns/default/sa/greeter";
/// A call that takes longer than this is a failure (`hung`).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Failures this long after app B returns are still charged to its fault:
/// the client sidecar may still have it ejected, then on probation.
const FAULT_GRACE: Duration = Duration::from_secs(5);
/// What a sidecar logs: warnings, plus the lines the soak counts.
const SIDECAR_LOG: &str = "warn,pylon::identity=info,pylon::sidecar=info";

struct Settings {
    run: Duration,
    grpc_rps: u32,
    http_rps: u32,
    cert_ttl: Duration,
    reload_every: Duration,
    fault_every: Duration,
    fault_down: Duration,
    sample_every: Duration,
}

impl Settings {
    fn from_env() -> anyhow::Result<Settings> {
        let secs = |name, default| env_or(name, default).map(Duration::from_secs);
        Ok(Settings {
            run: secs("PYLON_SOAK_SECS", 600)?,
            grpc_rps: env_or("PYLON_SOAK_GRPC_RPS", 100)?,
            http_rps: env_or("PYLON_SOAK_HTTP_RPS", 50)?,
            cert_ttl: secs("PYLON_SOAK_CERT_TTL_SECS", 85)?,
            reload_every: secs("PYLON_SOAK_RELOAD_SECS", 3)?,
            fault_every: secs("PYLON_SOAK_FAULT_EVERY_SECS", 60)?,
            fault_down: secs("PYLON_SOAK_FAULT_DOWN_SECS", 15)?,
            sample_every: secs("PYLON_SOAK_SAMPLE_SECS", 5)?,
        })
    }

    /// The warm-up sample RSS drift is measured from: minute 2, or a fifth
    /// of a shorter run.
    fn warm(&self) -> Duration {
        Duration::from_secs(120).min(self.run / 5)
    }
}

fn main() -> ExitCode {
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("soak: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(soak(settings)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("soak: {e:#}");
            ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------- the apps

/// A sample app on one port: `SayHello` for gRPC callers, `200 ok` for
/// every other request. [`App::kill`] closes the listener and every
/// connection at once.
struct App {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl App {
    async fn start(addr: SocketAddr) -> anyhow::Result<App> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind {addr}"))?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            // Dropping this set (the task aborted) drops every connection.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        if let Ok((tcp, _)) = accepted {
                            let _ = tcp.set_nodelay(true);
                            connections.spawn(serve_app(tcp));
                        }
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Ok(App { addr, task })
    }

    fn kill(self) {
        self.task.abort();
    }
}

async fn serve_app(tcp: TcpStream) {
    let greeter = GreeterServer::new(HelloGreeter::default());
    let svc = service_fn(move |req: hyper::Request<Incoming>| {
        let mut greeter = greeter.clone();
        async move {
            let grpc = req
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
            if grpc {
                tower::Service::call(&mut greeter, req).await
            } else {
                Ok::<_, Infallible>(hyper::Response::new(tonic::body::Body::new(Full::new(
                    Bytes::from_static(b"ok\n"),
                ))))
            }
        }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(tcp), svc)
        .await;
}

// ---------------------------------------------------------------- the mesh

fn spawn_sidecar(
    dir: &Path,
    cp: &ControlProc,
    name: &str,
    identity: &str,
    app: SocketAddr,
) -> anyhow::Result<SidecarProc> {
    let token = cp.token_file(dir, name, identity);
    let cfg = dir.join(format!("{name}.yaml"));
    let state = dir.join(format!("{name}-state"));
    std::fs::write(&cfg, cp_config(cp, &token, &state, app))?;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pylon"));
    cmd.arg("proxy")
        .arg("--config")
        .arg(&cfg)
        .env("PYLON_LOG", SIDECAR_LOG);
    SidecarProc::try_spawn_command(cmd, &format!("the {name} sidecar"))
}

/// The mesh's policy; `n` (the reload number) names an extra route and
/// varies the retry backoff, so that every apply is a new version.
fn policy(a: SocketAddr, b: SocketAddr, n: u64) -> String {
    let backoff_max = 100 + (n % 2) * 50;
    format!(
        "apiVersion: pylon.dev/v1
kind: Backend
metadata: {{ name: greeter }}
spec:
  endpoints: {{ static: [\"{a}\", \"{b}\"] }}
  tls: {{ mode: mesh, identity: \"{SERVER_ID}\" }}
---
apiVersion: pylon.dev/v1
kind: BackendTrafficPolicy
metadata: {{ name: greeter }}
spec:
  targetRefs: [{{ kind: Backend, name: greeter }}]
  outlierDetection: {{ consecutive5xxErrors: 3, consecutiveGatewayErrors: 2, interval: 1s,
                      baseEjectionTime: 5s, maxEjectionTime: 30s, maxEjectionPercent: 50 }}
  retryBudget: {{ percent: 100, minRetriesPerSecond: 100 }}
---
apiVersion: pylon.dev/v1
kind: GRPCRoute
metadata: {{ name: greeter }}
spec:
  hostnames: [\"greeter.soak\"]
  rules:
    - backendRefs: [{{ name: greeter, weight: 1 }}]
      retry: {{ attempts: 3, codes: [UNAVAILABLE], backoff: {{ base: 10ms, max: {backoff_max}ms }} }}
---
apiVersion: pylon.dev/v1
kind: HTTPRoute
metadata: {{ name: web }}
spec:
  hostnames: [\"web.soak\"]
  rules:
    - backendRefs: [{{ name: greeter, weight: 1 }}]
      retry: {{ attempts: 3, codes: [503], backoff: {{ base: 10ms, max: {backoff_max}ms }} }}
---
apiVersion: pylon.dev/v1
kind: HTTPRoute
metadata: {{ name: reload }}
spec:
  hostnames: [\"reload-{n}.soak\"]
  rules:
    - backendRefs: [{{ name: greeter, weight: 1 }}]
"
    )
}

// ---------------------------------------------------------------- outcomes

#[derive(Default)]
struct Outcomes {
    /// Successful calls: (gRPC, HTTP).
    ok: (u64, u64),
    /// Failed calls: when they ended (since the start) and how.
    failed: Vec<(Duration, String)>,
    /// When app B was down: (killed, restarted).
    faults: Vec<(Duration, Option<Duration>)>,
}

impl Outcomes {
    fn fault_caused(&self, at: Duration) -> bool {
        self.faults
            .iter()
            .any(|(down, up)| at >= *down && up.is_none_or(|up| at <= up + FAULT_GRACE))
    }
}

type Shared = Arc<Mutex<Outcomes>>;

fn record(outcomes: &Shared, start: Instant, grpc: bool, failure: Option<String>) {
    let mut o = outcomes.lock().unwrap();
    match failure {
        None if grpc => o.ok.0 += 1,
        None => o.ok.1 += 1,
        Some(f) => o.failed.push((start.elapsed(), f)),
    }
}

fn period(rps: u32, workers: u32) -> Duration {
    Duration::from_secs_f64(f64::from(workers) / f64::from(rps.max(1)))
}

async fn grpc_worker(
    outbound: SocketAddr,
    every: Duration,
    start: Instant,
    end: Instant,
    out: Shared,
) {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{outbound}"))
        .expect("an endpoint")
        .origin("http://greeter.soak".parse().expect("a URI"))
        .connect_lazy();
    let mut client = GreeterClient::new(channel);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < end {
        tick.tick().await;
        let mut req = tonic::Request::new(HelloRequest {
            name: "soak".into(),
        });
        req.set_timeout(CALL_TIMEOUT);
        let failure = match tokio::time::timeout(CALL_TIMEOUT * 2, client.say_hello(req)).await {
            Ok(Ok(_)) => None,
            Ok(Err(s)) => Some(format!(
                "grpc {:?}{}",
                s.code(),
                s.metadata()
                    .get("x-pylon-error")
                    .and_then(|v| v.to_str().ok())
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            )),
            Err(_) => Some("grpc hung".into()),
        };
        record(&out, start, true, failure);
    }
}

async fn http_call(
    conn: &mut Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>,
    outbound: SocketAddr,
) -> Result<(), String> {
    if conn
        .as_ref()
        .is_none_or(hyper::client::conn::http1::SendRequest::is_closed)
    {
        let tcp = TcpStream::connect(outbound)
            .await
            .map_err(|e| format!("http connect: {e}"))?;
        let (sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("http handshake: {e}"))?;
        tokio::spawn(driver);
        *conn = Some(sender);
    }
    let sender = conn.as_mut().expect("connected above");
    sender.ready().await.map_err(|e| format!("http: {e}"))?;
    let req = hyper::Request::get("/")
        .header(hyper::header::HOST, "web.soak")
        .body(Empty::new())
        .expect("a request");
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("http: {e}"))?;
    let status = resp.status();
    let error = resp
        .headers()
        .get("x-pylon-error")
        .and_then(|v| v.to_str().ok())
        .map(|e| format!(" ({e})"))
        .unwrap_or_default();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("http body: {e}"))?
        .to_bytes();
    if status == 200 && body.as_ref() == b"ok\n" {
        Ok(())
    } else {
        Err(format!("http {}{error}", status.as_u16()))
    }
}

async fn http_worker(
    outbound: SocketAddr,
    every: Duration,
    start: Instant,
    end: Instant,
    out: Shared,
) {
    let mut conn = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < end {
        tick.tick().await;
        let failure = match tokio::time::timeout(CALL_TIMEOUT, http_call(&mut conn, outbound)).await
        {
            Ok(Ok(())) => None,
            Ok(Err(e)) => {
                conn = None;
                Some(e)
            }
            Err(_) => {
                conn = None;
                Some("http hung".into())
            }
        };
        record(&out, start, false, failure);
    }
}

// ---------------------------------------------------------------- samples

/// Resident set size (kB) and open file descriptors of a process.
fn usage(pid: u32) -> Option<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((rss, fds))
}

struct Sample {
    at: Duration,
    /// (RSS kB, fds) per process, in [`PROCESSES`] order.
    usage: Vec<(u64, usize)>,
}

const PROCESSES: [&str; 4] = ["client", "server-a", "server-b", "control"];

// ---------------------------------------------------------------- the run

async fn soak(s: Settings) -> anyhow::Result<bool> {
    let dir = TempDir::new("soak");
    let cert_ttl = format!("{}s", s.cert_ttl.as_secs());
    let cp = ControlProc::try_spawn_command(
        env!("CARGO_BIN_EXE_pylon-control"),
        {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pylon-control"));
            cmd.args(["serve", "--trust-domain", "pylon.test", "--data-dir"])
                .arg(dir.path().join("cp-data"))
                .args(["--listen", "127.0.0.1:0", "--cert-ttl", &cert_ttl])
                .env("PYLON_LOG", "warn,pylon_control=info");
            cmd
        },
        &dir.path().join("cp-data"),
    )?;
    let app_a = App::start("127.0.0.1:0".parse()?).await?;
    let mut app_b = Some(App::start("127.0.0.1:0".parse()?).await?);
    let b_addr = app_b.as_ref().expect("started").addr;
    let server_a = spawn_sidecar(dir.path(), &cp, "server-a", SERVER_ID, app_a.addr)?;
    let server_b = spawn_sidecar(dir.path(), &cp, "server-b", SERVER_ID, b_addr)?;
    let client = spawn_sidecar(dir.path(), &cp, "client", CLIENT_ID, "127.0.0.1:9".parse()?)?;
    let (ea, eb) = (server_a.inbound, server_b.inbound);
    let mut reloads = 0u64;
    cp.apply(&policy(ea, eb, reloads));
    for sidecar in [&server_a, &server_b, &client] {
        sidecar.wait_ready().await;
    }
    let pids = [client.pid(), server_a.pid(), server_b.pid(), cp.pid()];
    println!(
        "soak: {}s, {} gRPC + {} HTTP calls/s, policy apply every {}s, app B down {}s of every {}s, certificates of {}s (renewed at 70 %)",
        s.run.as_secs(),
        s.grpc_rps,
        s.http_rps,
        s.reload_every.as_secs(),
        s.fault_down.as_secs(),
        s.fault_every.as_secs(),
        s.cert_ttl.as_secs()
    );
    println!(
        "load average before: {}",
        load_average().unwrap_or_default()
    );

    let out: Shared = Arc::default();
    let start = Instant::now();
    let end = start + s.run;
    let mut load = JoinSet::new();
    let (grpc_workers, http_workers) = (8, 4);
    for _ in 0..grpc_workers {
        let every = period(s.grpc_rps, grpc_workers);
        load.spawn(grpc_worker(client.outbound, every, start, end, out.clone()));
    }
    for _ in 0..http_workers {
        let every = period(s.http_rps, http_workers);
        load.spawn(http_worker(client.outbound, every, start, end, out.clone()));
    }

    println!(
        "{:>6} {:>8} {:>8} {:>6}   {:>9} {:>9} {:>9} {:>9}   {:>4} {:>4} {:>4} {:>4}",
        "t(s)",
        "grpc ok",
        "http ok",
        "failed",
        "rss cli",
        "rss A",
        "rss B",
        "rss cp",
        "fd c",
        "fd A",
        "fd B",
        "fd cp"
    );
    let mut samples: Vec<Sample> = Vec::new();
    let mut next_sample = start + s.sample_every;
    let mut next_reload = start + s.reload_every;
    let mut next_fault = start + s.fault_every;
    let mut heal_at: Option<Instant> = None;
    let mut apply_errors = Vec::new();
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if now >= next_sample {
            next_sample += s.sample_every;
            let usage: Vec<(u64, usize)> =
                pids.iter().map(|p| usage(*p).unwrap_or_default()).collect();
            let (ok, failed) = {
                let o = out.lock().unwrap();
                (o.ok, o.failed.len())
            };
            println!(
                "{:>6} {:>8} {:>8} {:>6}   {:>9} {:>9} {:>9} {:>9}   {:>4} {:>4} {:>4} {:>4}",
                start.elapsed().as_secs(),
                ok.0,
                ok.1,
                failed,
                usage[0].0,
                usage[1].0,
                usage[2].0,
                usage[3].0,
                usage[0].1,
                usage[1].1,
                usage[2].1,
                usage[3].1
            );
            samples.push(Sample {
                at: start.elapsed(),
                usage,
            });
        }
        if now >= next_reload {
            next_reload += s.reload_every;
            reloads += 1;
            let yaml = policy(ea, eb, reloads);
            // The CLI runs to completion; other tasks keep the runtime's
            // other worker.
            let cli = tokio::task::block_in_place(|| {
                cp.cli_with_stdin(&["apply", "-f", "-"], Some(&yaml))
            });
            if !cli.status.success() {
                apply_errors.push(String::from_utf8_lossy(&cli.stderr).to_string());
            }
        }
        if heal_at.is_none() && now >= next_fault && now + s.fault_down < end {
            next_fault += s.fault_every;
            if let Some(app) = app_b.take() {
                app.kill();
            }
            out.lock().unwrap().faults.push((start.elapsed(), None));
            println!("{:>6} app B killed", start.elapsed().as_secs());
            heal_at = Some(now + s.fault_down);
        }
        if let Some(at) = heal_at
            && now >= at
        {
            // The aborted task releases the port when it is dropped.
            let app = eventually("app B restarted on its port", async || {
                App::start(b_addr).await
            })
            .await;
            app_b = Some(app);
            heal_at = None;
            if let Some(f) = out.lock().unwrap().faults.last_mut() {
                f.1 = Some(start.elapsed());
            }
            println!("{:>6} app B back", start.elapsed().as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while load.join_next().await.is_some() {}
    let after = load_average().unwrap_or_default();

    // The verdict.
    let (status_version, acked) = cp.status();
    let ejections = client
        .metric("pylon_outlier_ejections_total{backend=\"Backend/greeter\"}")
        .await;
    let o = out.lock().unwrap();
    let mut by_outcome: BTreeMap<(bool, String), u64> = BTreeMap::new();
    for (at, f) in &o.failed {
        *by_outcome
            .entry((o.fault_caused(*at), f.clone()))
            .or_default() += 1;
    }
    let unattributed: u64 = by_outcome
        .iter()
        .filter(|((fault, _), _)| !fault)
        .map(|(_, n)| n)
        .sum();
    let attributed = o.failed.len() as u64 - unattributed;
    let total = o.ok.0 + o.ok.1 + o.failed.len() as u64;
    println!("\nload average after: {after}");
    println!("\ncalls by outcome ({total} in all)");
    println!("  {:<54} {:>9}", "gRPC OK", o.ok.0);
    println!("  {:<54} {:>9}", "HTTP 200", o.ok.1);
    for ((fault, what), n) in &by_outcome {
        let whose = if *fault { "fault" } else { "SOAK FAILURE" };
        println!("  {:<54} {:>9}", format!("{what} [{whose}]"), n);
    }
    println!(
        "  failed calls: {attributed} during app B's faults (+{}s grace), {unattributed} otherwise",
        FAULT_GRACE.as_secs()
    );
    println!(
        "  app B killed {} times; {reloads} policy applies ({} refused); control plane at version {status_version}",
        o.faults.len(),
        apply_errors.len()
    );
    for (identity, version, nack) in &acked {
        println!("    acked by {identity}: {version} {nack}");
    }
    let renewals =
        [&client, &server_a, &server_b].map(|sc| sc.logs().matches("certificate renewed").count());
    println!(
        "  certificate renewals: client {}, server A {}, server B {}",
        renewals[0], renewals[1], renewals[2]
    );
    println!("  ejections of app B's endpoint by the client sidecar: {ejections}");

    let warm = s.warm();
    let warm_sample = samples
        .iter()
        .find(|x| x.at >= warm)
        .context("no sample after the warm-up")?;
    let last = samples.last().context("no sample")?;
    println!(
        "\nmemory and descriptors (warm-up sample at {}s, last at {}s)",
        warm_sample.at.as_secs(),
        last.at.as_secs()
    );
    println!(
        "  {:<9} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "process", "rss warm", "rss end", "drift", "fd warm", "fd min", "fd max", "fd end"
    );
    let mut pass = unattributed == 0 && apply_errors.is_empty();
    for (i, name) in PROCESSES.iter().enumerate() {
        let (rss_warm, fd_warm) = warm_sample.usage[i];
        let (rss_end, fd_end) = last.usage[i];
        let drift = (rss_end as f64 - rss_warm as f64) / rss_warm.max(1) as f64 * 100.0;
        let after_warm = samples.iter().filter(|x| x.at >= warm);
        let fds = after_warm.map(|x| x.usage[i].1);
        let (fd_min, fd_max) = fds.fold((usize::MAX, 0), |(lo, hi), f| (lo.min(f), hi.max(f)));
        println!(
            "  {name:<9} {rss_warm:>7} kB {rss_end:>7} kB {drift:>7.1}% {fd_warm:>8} {fd_min:>8} {fd_max:>8} {fd_end:>8}"
        );
        // The sidecars are the subject; the control plane is shown only.
        if i < 3 && (drift > 5.0 || fd_end > fd_warm + 4) {
            pass = false;
        }
    }
    for e in apply_errors.iter().take(3) {
        println!("apply refused: {e}");
    }
    println!(
        "\n{}",
        if pass {
            "PASS: no failed call beyond the faults, sidecar RSS drift ≤ 5 %, descriptors flat"
        } else {
            "FAIL: see above"
        }
    );
    drop(app_a);
    Ok(pass)
}
