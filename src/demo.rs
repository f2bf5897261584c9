//! `pylon demo`: an mTLS mesh on loopback inside one process, with an
//! embedded control plane, live gRPC traffic, a fault injected and healed, a
//! canary shifted by policy changes applied live, and a running table of
//! what it measures.
//!
//! It starts `pylon-control` in-process (its data in a scratch directory),
//! three instances of the sample [`greeter`] plus a canary (`greeter-v2`),
//! each behind its own server sidecar, a client sidecar and an intruder
//! sidecar. Every sidecar gets its certificate from the control plane (a CSR
//! with its bootstrap token) and its policy too. An AuthorizationPolicy lets
//! only the client call the greeters: the demo shows the intruder refused
//! and the client served before the load starts. The policy routes the authority `greeter` over mTLS with
//! retries, a retry budget and outlier ejection. It sends `SayHello` at a
//! fixed rate through the client sidecar ([`crate::loadgen`]) and prints one
//! row per second: rate, success, latency, retries sent, endpoints ejected
//! and the policy version the client sidecar runs. The scenario: at 5 s the
//! stable greeter that has answered the most calls starts failing (retries
//! mask it, outlier detection ejects it); at 10 s, 15 s and 25 s the canary's weight goes to 10 %, 50 % and
//! 100 % through the admin API, and the table says when every sidecar has
//! acknowledged each version; at 20 s the failing greeter heals. It runs
//! until `--duration` has passed or Ctrl-C; on the way out it stops
//! everything and removes the scratch directory.
//!
//! The pieces the mesh benchmark shares with it (the greeter, file
//! identities from [`DevCa`], the client policy, the scratch directory) are
//! public here.

pub mod greeter;

use std::net::{Ipv4Addr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;

use pylon_control::server::{ControlPlane, DEFAULT_HISTORY, ServeConfig};
use pylon_proto::client::authed;
use pylon_proto::v1 as pb;
use pylon_proto::v1::policy_admin_client::PolicyAdminClient;
use tonic::transport::Channel;

use crate::config::{
    AdminConfig, Config, ControlPlaneConfig, DEFAULT_RETRY_BUFFER_BYTES, DnsConfig, IdentitySource,
    InboundConfig, OutboundConfig, PolicySource, TelemetryConfig,
};
use crate::identity::dev::{DevCa, IdentityFiles};
use crate::loadgen::{Load, LoadGenerator, Progress, Report, Target};
use crate::sidecar::Sidecar;
use greeter::RunningGreeter;

/// The greeter's workload identity.
pub const GREETER_ID: &str = "spiffe://pylon.local/ns/default/sa/greeter";
/// The load generator's workload identity (its sidecar's).
pub const CLIENT_ID: &str = "spiffe://pylon.local/ns/default/sa/client";
/// A workload the greeters' AuthorizationPolicy does not admit.
pub const INTRUDER_ID: &str = "spiffe://pylon.local/ns/default/sa/intruder";
/// The authority the client sidecar routes to the greeter.
pub const GREETER_AUTHORITY: &str = "greeter";

/// HTTP/2 connections from the load generator to the client sidecar.
const CONNECTIONS: NonZeroUsize = NonZeroUsize::new(2).expect("2 is not zero");
/// Calls in flight before the load generator starts skipping requests.
const MAX_OUTSTANDING: NonZeroU32 = NonZeroU32::new(1000).expect("1000 is not zero");
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the sidecars may take to load their policy.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const READY_POLL: Duration = Duration::from_millis(10);
const ROW_INTERVAL: Duration = Duration::from_secs(1);
/// How often the sidecars export metrics with `--otlp`.
const OTLP_METRICS_INTERVAL: Duration = Duration::from_secs(2);
/// The greeter backend's name in metric labels.
const GREETER_BACKEND: &str = "Backend/greeter";
/// The greeter route, as the client sidecar's metrics label it.
const GREETER_ROUTE: &str = "GRPCRoute/greeter";
/// Greeter instances, each behind its own server sidecar.
const GREETERS: usize = 3;
/// The scenario, by elapsed time.
const SCENARIO: [(u64, Step); 5] = [
    (5, Step::Fail),
    (10, Step::Canary(10)),
    (15, Step::Canary(50)),
    (20, Step::Heal),
    (25, Step::Canary(100)),
];

/// How long a policy change waits, polling, for every acknowledgement
/// before the table moves on.
const ACK_WAIT: Duration = Duration::from_millis(500);
const ACK_POLL: Duration = Duration::from_millis(2);

#[derive(Debug, Clone, Copy)]
enum Step {
    /// The stable greeter that has answered the most calls starts failing.
    /// (At the demo's load the least-request balancer favours the fastest
    /// greeters, and one may get only a call a second: its failure would
    /// take seconds to show, and callers would hardly feel it.)
    Fail,
    Heal,
    /// The canary's share, in percent.
    Canary(u32),
}

/// `pylon demo` options.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// How long to send traffic (e.g. 30s, 2m); until Ctrl-C when not given.
    #[arg(long, value_parser = parse_run_duration)]
    pub duration: Option<Duration>,
    /// Requests per second sent through the mesh.
    #[arg(long, default_value = "200")]
    pub rps: NonZeroU32,
    /// Export every sidecar's and the control plane's metrics and traces to
    /// this OTLP/gRPC collector (e.g. http://127.0.0.1:4317).
    #[arg(long, value_name = "ENDPOINT")]
    pub otlp: Option<String>,
}

fn parse_run_duration(s: &str) -> Result<Duration, String> {
    match pylon_proto::policy::parse_duration(s)? {
        Duration::ZERO => Err("the duration must be longer than zero".into()),
        d => Ok(d),
    }
}

/// Runs the demo until `--duration` has passed or Ctrl-C.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    // Polled from the start, so that Ctrl-C during set-up also ends the demo
    // through the clean-up below rather than killing the process.
    let ctrl_c = ctrl_c();
    tokio::pin!(ctrl_c);

    let setup = tokio::task::spawn_blocking(|| {
        ScratchDir::create("demo").context("cannot create a scratch directory")
    });
    let scratch = tokio::select! {
        made = setup => made??,
        () = &mut ctrl_c => return Ok(()),
    };
    let mut mesh = tokio::select! {
        mesh = DemoMesh::start(scratch.path(), args.otlp.as_deref()) => mesh?,
        () = &mut ctrl_c => return Ok(()),
    };
    let authz = mesh.authorization_check().await;

    let target = Target {
        addr: mesh.client.addrs.outbound,
        authority: GREETER_AUTHORITY.to_string(),
        connections: CONNECTIONS,
        request_timeout: REQUEST_TIMEOUT,
    };
    let generator = LoadGenerator::connect(&target).await?;
    print_header(&args, &mesh, &target, scratch.path(), &authz);

    let run = generator.start(Load::FixedRate {
        rps: args.rps,
        max_outstanding: MAX_OUTSTANDING,
    });
    let deadline = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut rows = tokio::time::interval_at(Instant::now() + ROW_INTERVAL, ROW_INTERVAL);
    println!(
        "{:>8} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8} {:>8} {:>7}  event",
        "elapsed", "rps", "success", "p50 ms", "p99 ms", "requests", "retries", "ejected", "policy"
    );
    let started = Instant::now();
    let mut steps = SCENARIO.iter().peekable();
    let mut before = SidecarCounts::default();
    let mut row_started = Instant::now();
    // A version applied, and when, until every sidecar acknowledged it.
    let mut awaiting: Option<(u64, Instant)> = None;
    let why = loop {
        tokio::select! {
            // Rows before the deadline, so that the last second is printed
            // when both fall due together.
            biased;
            () = &mut ctrl_c => break "Ctrl-C",
            _ = rows.tick() => {
                let elapsed = started.elapsed();
                let mut events = Vec::new();
                if let Some((version, since)) = awaiting
                    && mesh.all_acked(version).await
                {
                    events.push(format!(
                        "version {version} acknowledged by all {} sidecars (within {} ms)",
                        mesh.sidecar_count(),
                        since.elapsed().as_millis()
                    ));
                    awaiting = None;
                }
                while let Some(&&(at, step)) = steps.peek() {
                    if elapsed < Duration::from_secs(at) {
                        break;
                    }
                    steps.next();
                    events.push(mesh.take(step, &mut awaiting).await);
                }
                let now = mesh.sidecar_counts();
                print_row(
                    &run.progress(),
                    &now,
                    &before,
                    row_started.elapsed(),
                    &mesh.client.policy.load().version,
                    &events.join("; "),
                );
                before = now;
                row_started = Instant::now();
                mesh.note_calls();
            }
            () = &mut deadline => break "duration reached",
        }
    };
    let report = run.finish().await?;
    // Close the load generator's connections so the sidecars drain at once.
    drop(generator);
    println!("\nstopped ({why})");
    print_summary(&report);

    mesh.stop().await?;
    drop(scratch);
    Ok(())
}

/// Resolves on Ctrl-C; never if the signal cannot be listened for.
async fn ctrl_c() {
    if let Err(e) = tokio::signal::ctrl_c().await {
        tracing::warn!(error = %e, "cannot listen for Ctrl-C");
        std::future::pending::<()>().await;
    }
}

/// The client sidecar's plain policy: authority `greeter` goes to the
/// server sidecars at `endpoints` over mTLS, which must present
/// [`GREETER_ID`]; no resilience policy (the benchmark's baseline).
pub fn client_policy(endpoints: &[SocketAddr]) -> String {
    let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "apiVersion: pylon.dev/v1
kind: Backend
metadata: {{ name: greeter }}
spec:
  protocol: grpc
  endpoints: {{ static: [{}] }}
  tls: {{ mode: mesh, identity: \"{GREETER_ID}\" }}
---
apiVersion: pylon.dev/v1
kind: GRPCRoute
metadata: {{ name: greeter }}
spec:
  hostnames: [\"{GREETER_AUTHORITY}\"]
  rules:
    - backendRefs: [{{ name: greeter }}]
",
        list.join(", ")
    )
}

/// [`client_policy`] with the resilience stack switched on: a deadline,
/// retries on UNAVAILABLE within a budget, outlier ejection, a bulkhead and
/// least-request balancing.
pub fn resilient_client_policy(endpoints: &[SocketAddr]) -> String {
    client_policy(endpoints) + RESILIENCE
}

/// The demo's policy: [`resilient_client_policy`] over the stable greeters,
/// with `canary_percent` of the calls going to the canary instead.
pub fn canary_policy(stable: &[SocketAddr], canary: SocketAddr, canary_percent: u32) -> String {
    let stable_percent = 100 - canary_percent.min(100);
    client_policy(stable).replace(
        "    - backendRefs: [{ name: greeter }]\n",
        &format!(
            "    - backendRefs: [{{ name: greeter, weight: {stable_percent} }}, {{ name: greeter-v2, weight: {canary_percent} }}]\n"
        ),
    ) + RESILIENCE
        + &format!(
            "---
apiVersion: pylon.dev/v1
kind: Backend
metadata: {{ name: greeter-v2 }}
spec:
  protocol: grpc
  endpoints: {{ static: [\"{canary}\"] }}
  tls: {{ mode: mesh, identity: \"{GREETER_ID}\" }}
"
        )
}

/// Who may call the greeters: the client only.
const GREETER_AUTHORIZATION: &str = "---
apiVersion: pylon.dev/v1
kind: AuthorizationPolicy
metadata: { name: greeter }
spec:
  targetRef: { kind: ServiceAccount, name: greeter }
  rules: [{ from: { principals: [\"spiffe://pylon.local/ns/default/sa/client\"] },
            to: { methods: [\"/helloworld.Greeter/*\"] } }]
";

/// One `SayHello` through a sidecar's outbound listener.
async fn say_hello(outbound: SocketAddr) -> Result<String, tonic::Status> {
    use pylon_proto::helloworld::{HelloRequest, greeter_client::GreeterClient};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{outbound}"))
        .map_err(|e| tonic::Status::internal(e.to_string()))?
        .origin(
            format!("http://{GREETER_AUTHORITY}")
                .parse()
                .map_err(|_| tonic::Status::internal("bad authority"))?,
        )
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let reply = GreeterClient::new(channel)
        .say_hello(HelloRequest {
            name: "demo".into(),
        })
        .await?;
    Ok(reply.into_inner().message)
}

/// The route's deadline and retries, and the greeter's traffic policy.
const RESILIENCE: &str = "      timeouts: { request: 2s }
      retry: { attempts: 2, codes: [UNAVAILABLE], backoff: { base: 5ms, max: 50ms } }
---
apiVersion: pylon.dev/v1
kind: BackendTrafficPolicy
metadata: { name: greeter }
spec:
  targetRefs: [{ kind: Backend, name: greeter }]
  loadBalancer: { type: LeastRequest }
  circuitBreaker: { maxParallelRequests: 1024, maxPendingRequests: 128 }
  outlierDetection: { consecutive5xxErrors: 5, consecutiveGatewayErrors: 3, interval: 1s,
                      baseEjectionTime: 5s, maxEjectionTime: 30s, maxEjectionPercent: 50 }
  retryBudget: { percent: 20, minRetriesPerSecond: 10 }
";

/// The greeter's and the client's identity files, from one throwaway CA.
pub struct Identities {
    pub greeter: IdentityFiles,
    pub client: IdentityFiles,
}

impl Identities {
    /// Makes a CA and writes both identities into `dir`. Blocking (key
    /// generation, file writes).
    pub fn issue(dir: &Path) -> anyhow::Result<Identities> {
        let ca = DevCa::new("pylon demo root").context("cannot make the demo CA")?;
        let issue = |name: &str, id: &str| {
            ca.write_identity(dir, name, id)
                .with_context(|| format!("cannot write the identity {id}"))
        };
        Ok(Identities {
            greeter: issue("greeter", GREETER_ID)?,
            client: issue("client", CLIENT_ID)?,
        })
    }
}

/// A directory under the system temp dir, readable by this user only,
/// removed on drop.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates `pylon-<label>-<pid>-<random>`. Blocking.
    pub fn create(label: &str) -> std::io::Result<ScratchDir> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = std::env::temp_dir().join(format!(
            "pylon-{label}-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(ScratchDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(dir = %self.0.display(), error = %e, "cannot remove the scratch directory");
        }
    }
}

/// The control plane, the greeters, their sidecars and the client sidecar,
/// in this process.
struct DemoMesh {
    control: ControlPlane,
    admin: PolicyAdminClient<Channel>,
    /// Three stable greeters, then the canary.
    greeters: Vec<RunningGreeter>,
    /// The stable greeter made to fail, until it heals.
    failing: Option<usize>,
    /// Each stable greeter's calls at the last row.
    calls_seen: [u64; GREETERS],
    servers: Vec<Sidecar>,
    client: Sidecar,
    /// Routes to the greeters like the client, but is not admitted by them.
    intruder: Sidecar,
}

impl DemoMesh {
    /// Starts everything on free loopback ports, applies the first policy
    /// and waits until every sidecar has installed it.
    async fn start(dir: &Path, otlp: Option<&str>) -> anyhow::Result<DemoMesh> {
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let control = ControlPlane::start(ServeConfig {
            data_dir: dir.join("control"),
            listen: loopback,
            trust_domain: "pylon.local".into(),
            names: Vec::new(),
            operator_ca: None,
            history: DEFAULT_HISTORY,
            cert_ttl: pylon_control::server::DEFAULT_CERT_TTL,
            telemetry: pylon_control::telemetry::TelemetryConfig {
                metrics_listen: None,
                otlp_endpoint: otlp.map(str::to_string),
            },
            webhook: None,
            kubernetes: None,
        })
        .await
        .context("cannot start the control plane")?;
        let roots = pylon_proto::tls_roots::roots_from_pem(control.bundle_pem()?.as_bytes())
            .map_err(anyhow::Error::msg)?;
        let address = format!("https://{}", control.addr);
        let tls = pylon_proto::client::client_config(roots, None)?;
        let admin = PolicyAdminClient::new(pylon_proto::client::lazy_channel(&address, tls)?);
        let mut mesh_admin = Admin {
            client: admin,
            token: control.admin_token.clone(),
        };
        let greeter_token = dir.join("greeter.token");
        let client_token = dir.join("client.token");
        let intruder_token = dir.join("intruder.token");
        for (identity, path) in [
            (GREETER_ID, &greeter_token),
            (CLIENT_ID, &client_token),
            (INTRUDER_ID, &intruder_token),
        ] {
            let token = mesh_admin.create_token(identity).await?;
            // A token readable by others is refused at start.
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                pylon_proto::fs::write_atomic(&path, token.as_bytes(), 0o600)
            })
            .await??;
        }
        let from_control = |token: &Path, name: &str| {
            ControlPlaneConfig {
                address: address.clone(),
                ca_file: Some(control.files.bundle.clone()),
                token_file: Some(token.to_path_buf()),
                allow_readable_token_file: false,
            }
            .with_state(dir.join(format!("{name}-state")))
        };

        // With --otlp, each sidecar exports under its own service name.
        let telemetry = |name: &str| {
            otlp.map(|endpoint| TelemetryConfig {
                service_name: Some(name.to_string()),
                otlp_endpoint: Some(endpoint.to_string()),
                sampling: None,
                access_log: false,
                external_sampling: Default::default(),
            })
        };
        let mut greeters = Vec::new();
        let mut servers = Vec::new();
        for i in 0..=GREETERS {
            let greeter = RunningGreeter::start(loopback)
                .await
                .with_context(|| format!("cannot start greeter {}", i + 1))?;
            let server = Sidecar::start(sidecar_config(
                &greeter_token,
                from_control(&greeter_token, &format!("server-{i}")),
                greeter.addr,
                telemetry(&format!("greeter-{}", i + 1)),
            ))
            .await
            .with_context(|| format!("cannot start server sidecar {}", i + 1))?;
            greeters.push(greeter);
            servers.push(server);
        }
        // Nothing calls the client sidecar's inbound side: its app address
        // is never dialled.
        let no_app = SocketAddr::from((Ipv4Addr::LOCALHOST, 9));
        let client = Sidecar::start(sidecar_config(
            &client_token,
            from_control(&client_token, "client"),
            no_app,
            telemetry("client"),
        ))
        .await
        .context("cannot start the client sidecar")?;
        let intruder = Sidecar::start(sidecar_config(
            &intruder_token,
            from_control(&intruder_token, "intruder"),
            no_app,
            telemetry("intruder"),
        ))
        .await
        .context("cannot start the intruder sidecar")?;

        let mut mesh = DemoMesh {
            control,
            admin: mesh_admin.client,
            greeters,
            failing: None,
            calls_seen: [0; GREETERS],
            servers,
            client,
            intruder,
        };
        mesh.apply(0).await?;
        for (i, server) in mesh.servers.iter().enumerate() {
            wait_installed(server, &format!("server {}", i + 1)).await?;
        }
        wait_installed(&mesh.client, "client").await?;
        wait_installed(&mesh.intruder, "intruder").await?;
        Ok(mesh)
    }

    fn sidecar_count(&self) -> usize {
        self.servers.len() + 2
    }

    /// One call from the client and one from the intruder: what each got.
    async fn authorization_check(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for (name, sidecar) in [("client", &self.client), ("intruder", &self.intruder)] {
            let outcome = match say_hello(sidecar.addrs.outbound).await {
                Ok(reply) => format!("served ({reply:?})"),
                Err(status) => format!(
                    "refused: {:?}, {} (x-pylon-error: {})",
                    status.code(),
                    status.message(),
                    status
                        .metadata()
                        .get("x-pylon-error")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                ),
            };
            lines.push(format!("{name:<8} → {outcome}"));
        }
        lines
    }

    /// Applies the demo policy with the canary at `percent`, through the
    /// admin API; returns the new version.
    async fn apply(&mut self, percent: u32) -> anyhow::Result<u64> {
        let stable: Vec<SocketAddr> = self.servers[..GREETERS]
            .iter()
            .map(|s| s.addrs.inbound)
            .collect();
        let canary = self.servers[GREETERS].addrs.inbound;
        let yaml = canary_policy(&stable, canary, percent) + GREETER_AUTHORIZATION;
        let reply = self
            .admin
            .apply(authed(
                pb::ApplyRequest { yaml },
                &self.control.admin_token,
            )?)
            .await
            .map_err(|s| anyhow::anyhow!("apply: {}", s.message()))?;
        Ok(reply.into_inner().version)
    }

    /// Notes each stable greeter's calls so far, for the next row.
    fn note_calls(&mut self) {
        for (seen, greeter) in self.calls_seen.iter_mut().zip(&self.greeters) {
            *seen = greeter.calls();
        }
    }

    /// Carries out one step of the scenario; returns what to print.
    async fn take(&mut self, step: Step, awaiting: &mut Option<(u64, Instant)>) -> String {
        match step {
            Step::Fail => {
                // Over the last second: where the balancer sends calls now.
                let busiest = (0..GREETERS)
                    .max_by_key(|&i| self.greeters[i].calls() - self.calls_seen[i])
                    .unwrap_or(0);
                self.greeters[busiest].set_failing(true);
                self.failing = Some(busiest);
                format!("greeter {} starts failing (UNAVAILABLE)", busiest + 1)
            }
            Step::Heal => match self.failing.take() {
                Some(i) => {
                    self.greeters[i].set_failing(false);
                    format!("greeter {} heals", i + 1)
                }
                None => String::new(),
            },
            Step::Canary(percent) => {
                let started = Instant::now();
                let version = match self.apply(percent).await {
                    Ok(version) => version,
                    Err(e) => return format!("canary at {percent} % failed: {e}"),
                };
                // Most often every sidecar has it within milliseconds;
                // otherwise a later row says when.
                let soon = started + ACK_WAIT;
                while Instant::now() < soon {
                    if self.all_acked(version).await {
                        return format!(
                            "canary greeter-v2 at {percent} %: version {version} applied, acknowledged by all {} sidecars in {} ms",
                            self.sidecar_count(),
                            started.elapsed().as_millis()
                        );
                    }
                    tokio::time::sleep(ACK_POLL).await;
                }
                *awaiting = Some((version, started));
                format!("canary greeter-v2 at {percent} %: version {version} applied")
            }
        }
    }

    /// Whether every sidecar acknowledged `version` (the control plane's
    /// `Status`).
    async fn all_acked(&mut self, version: u64) -> bool {
        let Ok(req) = authed(pb::StatusRequest {}, &self.control.admin_token) else {
            return false;
        };
        match self.admin.status(req).await {
            Ok(s) => {
                let s = s.into_inner();
                s.sidecars.len() == self.sidecar_count()
                    && s.sidecars.iter().all(|c| c.acked_version >= version)
            }
            Err(_) => false,
        }
    }

    /// What the client sidecar's metrics say of backend `greeter`: retries
    /// sent so far and endpoints ejected now. Read from the same Prometheus
    /// text that `/metrics` serves and the OTLP export sends.
    fn sidecar_counts(&self) -> SidecarCounts {
        SidecarCounts::from_metrics(&self.client.scrape())
    }

    /// Stops the callers before the called: client sidecar, server sidecars,
    /// greeters, control plane.
    async fn stop(self) -> anyhow::Result<()> {
        self.intruder.stop().await;
        self.client.stop().await;
        for server in self.servers {
            server.stop().await;
        }
        for greeter in self.greeters {
            greeter.stop().await?;
        }
        self.control.stop().await
    }
}

/// The admin API with the admin token.
struct Admin {
    client: PolicyAdminClient<Channel>,
    token: String,
}

impl Admin {
    async fn create_token(&mut self, identity: &str) -> anyhow::Result<String> {
        let req = pb::CreateTokenRequest {
            identity: identity.to_string(),
            ttl_seconds: 0,
            once: false,
        };
        let reply = self
            .client
            .create_token(authed(req, &self.token)?)
            .await
            .map_err(|s| anyhow::anyhow!("token for {identity}: {}", s.message()))?;
        Ok(reply.into_inner().token)
    }
}

/// Policy from the control plane, cached in a state directory.
struct FromControl {
    control_plane: ControlPlaneConfig,
    state_dir: PathBuf,
}

impl ControlPlaneConfig {
    fn with_state(self, state_dir: PathBuf) -> FromControl {
        FromControl {
            control_plane: self,
            state_dir,
        }
    }
}

fn sidecar_config(
    token: &Path,
    policy: FromControl,
    app: SocketAddr,
    telemetry: Option<TelemetryConfig>,
) -> Config {
    let free_port = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    Config {
        admin: AdminConfig {
            listen: free_port,
            probe_listen: free_port,
            max_connections: crate::config::DEFAULT_ADMIN_MAX_CONNECTIONS,
        },
        outbound: OutboundConfig {
            listen: free_port,
            retry_buffer_bytes: DEFAULT_RETRY_BUFFER_BYTES,
            unmatched: Default::default(),
            detect_timeout: crate::config::DEFAULT_DETECT_TIMEOUT,
            server_first_ports: crate::config::DEFAULT_SERVER_FIRST_PORTS.to_vec(),
            max_connections: crate::config::DEFAULT_MAX_CONNECTIONS,
        },
        inbound: InboundConfig {
            listen: free_port,
            app,
            mode: Default::default(),
            max_connections: crate::config::DEFAULT_MAX_CONNECTIONS,
            max_concurrent_handshakes: crate::config::DEFAULT_MAX_CONCURRENT_HANDSHAKES,
            handshake_timeout: crate::config::DEFAULT_HANDSHAKE_TIMEOUT,
            app_max_connections: crate::config::DEFAULT_APP_MAX_CONNECTIONS,
            app_max_requests: crate::config::DEFAULT_APP_MAX_REQUESTS,
        },
        identity: IdentitySource::ControlPlane {
            token_file: token.to_path_buf(),
        },
        policy: PolicySource::ControlPlane,
        telemetry,
        log_format: Default::default(),
        otlp_metrics_interval: OTLP_METRICS_INTERVAL,
        control_plane: Some(policy.control_plane),
        policy_max_bytes: crate::config::MAX_POLICY_BYTES as usize,
        state_dir: Some(policy.state_dir),
        dns: DnsConfig::default(),
        drain_timeout: crate::config::DEFAULT_DRAIN_TIMEOUT,
        app_probes: Default::default(),
        kubernetes: Default::default(),
        connections: Default::default(),
        headers_with_underscores: Default::default(),
        // The demo's sidecars share the demo's runtime.
        workers: None,
    }
}

async fn wait_installed(sidecar: &Sidecar, name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut poll = tokio::time::interval(READY_POLL);
    while !sidecar.policy.installed() {
        if Instant::now() > deadline {
            let why = sidecar
                .policy
                .status()
                .last_error
                .map(|errors| errors.join("; "))
                .unwrap_or_else(|| "no policy loaded yet".into());
            anyhow::bail!(
                "the {name} sidecar did not install its policy within {READY_TIMEOUT:?}: {why}"
            );
        }
        poll.tick().await;
    }
    Ok(())
}

fn print_header(
    args: &DemoArgs,
    mesh: &DemoMesh,
    target: &Target,
    scratch: &Path,
    authorization: &[String],
) {
    let until = match args.duration {
        Some(d) => format!("for {}", pylon_proto::policy::format_duration(d)),
        None => "until Ctrl-C".to_string(),
    };
    println!("pylon demo: an mTLS mesh on loopback, all in this process");
    println!();
    println!(
        "  control plane   {} (in process; data in the scratch directory)",
        mesh.control.addr
    );
    println!(
        "  load generator  {} rps of helloworld.Greeter/SayHello, :authority {}, {} HTTP/2 connections",
        args.rps, target.authority, target.connections
    );
    println!(
        "  client sidecar  {CLIENT_ID}\n                  outbound {}  admin {}",
        mesh.client.addrs.outbound, mesh.client.addrs.admin
    );
    for (i, (server, greeter)) in mesh.servers.iter().zip(&mesh.greeters).enumerate() {
        let name = if i == GREETERS {
            "greeter-v2 ".to_string()
        } else {
            format!("greeter {}   ", i + 1)
        };
        println!(
            "  {name}   {GREETER_ID}\n                  sidecar inbound (mTLS) {}  admin {}  app {} (h2c)",
            server.addrs.inbound, server.addrs.admin, greeter.addr
        );
    }
    println!();
    println!(
        "  path            load generator → client sidecar ══ mTLS ══▶ server sidecars → greeters"
    );
    println!(
        "  policy          retries (UNAVAILABLE, 2 more tries, budget 20 %), outlier ejection\n                  (3 gateway errors → out for 5 s, growing), least-request balancing"
    );
    println!(
        "  scenario        5s the busiest greeter starts failing; 10s, 15s, 25s canary greeter-v2 at\n                  10 %, 50 %, 100 % (applied through the control plane); 20s it heals"
    );
    println!(
        "  identities      every sidecar made its key and a CSR; the control plane's CA signed\n                  it for the identity of the sidecar's bootstrap token (24 h, renewed at 70 %)"
    );
    println!("  authorization   AuthorizationPolicy on sa/greeter admits only {CLIENT_ID}:");
    for line in authorization {
        println!("                  {line}");
    }
    println!(
        "  scratch         {} (control-plane data, sidecar state; removed at exit)",
        scratch.display()
    );
    println!();
    println!(
        "Sending {until}. rps, success, requests, retries and ejected are the client sidecar's\nmetrics (pylon_outbound_requests_total, pylon_retries_total, pylon_outlier_ejections_active);\nlatency is the load generator's, from each request's intended send time (open loop)."
    );
    println!();
}

fn millis(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

fn percent(p: Option<f64>) -> String {
    p.map_or_else(|| "-".to_string(), |p| format!("{p:.2}%"))
}

/// What the client sidecar's metrics say (the text `/metrics` serves and
/// the OTLP export sends): its calls on the greeter route, retries, and
/// endpoints ejected now.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct SidecarCounts {
    calls: u64,
    ok: u64,
    retries: u64,
    ejected: u64,
}

impl SidecarCounts {
    fn from_metrics(text: &str) -> SidecarCounts {
        let mut c = SidecarCounts::default();
        for line in text.lines() {
            let Some((sample, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let value = value as u64;
            if sample.starts_with("pylon_outbound_requests_total{")
                && sample.contains(&format!("route=\"{GREETER_ROUTE}\""))
            {
                c.calls += value;
                if sample.contains("status=\"OK\"") {
                    c.ok += value;
                }
            } else if sample == format!("pylon_retries_total{{backend=\"{GREETER_BACKEND}\"}}") {
                c.retries = value;
            } else if sample
                == format!("pylon_outlier_ejections_active{{backend=\"{GREETER_BACKEND}\"}}")
            {
                c.ejected = value;
            }
        }
        c
    }
}

/// One row: calls, success and retries from the client sidecar's metrics
/// over the row's interval; latency from the load generator (measured from
/// each request's intended send time).
fn print_row(
    progress: &Progress,
    now: &SidecarCounts,
    before: &SidecarCounts,
    interval: Duration,
    policy: &str,
    event: &str,
) {
    let (p50, p99) = match &progress.interval.latency {
        Some(l) => (millis(l.p50), millis(l.p99)),
        None => ("-".to_string(), "-".to_string()),
    };
    let calls = now.calls.saturating_sub(before.calls);
    let ok = now.ok.saturating_sub(before.ok);
    let success = (calls > 0).then(|| 100.0 * ok as f64 / calls as f64);
    println!(
        "{:>7}s {:>9.1} {:>9} {:>9} {:>9} {:>10} {:>8} {:>8} {:>7}  {}",
        progress.elapsed.as_secs_f64().round(),
        calls as f64 / interval.as_secs_f64().max(1e-3),
        percent(success),
        p50,
        p99,
        now.calls,
        now.retries.saturating_sub(before.retries),
        now.ejected,
        policy,
        event
    );
}

fn print_summary(report: &Report) {
    println!(
        "{} requests in {:.2}s: {} ok ({}), {} errors, {:.1} rps",
        report.requests,
        report.duration.as_secs_f64(),
        report.ok,
        percent(report.success_percent()),
        report.error_count(),
        report.rps()
    );
    match &report.latency {
        Some(l) => println!(
            "latency ms (successful calls): p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            millis(l.p50),
            millis(l.p90),
            millis(l.p99),
            millis(l.p999),
            millis(l.max)
        ),
        None => println!("latency: no successful calls"),
    }
    if !report.errors.is_empty() {
        let errors: Vec<String> = report
            .errors
            .iter()
            .map(|(kind, n)| format!("{kind} {n}"))
            .collect();
        println!("errors: {}", errors.join(", "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_reads_the_client_sidecars_metrics() {
        let text = "# TYPE pylon_outbound_requests counter
pylon_outbound_requests_total{route=\"GRPCRoute/greeter\",backend=\"Backend/greeter\",status=\"OK\"} 90
pylon_outbound_requests_total{route=\"GRPCRoute/greeter\",backend=\"Backend/greeter-v2\",status=\"OK\"} 8
pylon_outbound_requests_total{route=\"GRPCRoute/greeter\",backend=\"Backend/greeter\",status=\"UNAVAILABLE\"} 2
pylon_outbound_requests_total{route=\"HTTPRoute/other\",backend=\"Backend/x\",status=\"2xx\"} 7
pylon_retries_total{backend=\"Backend/greeter\"} 5
pylon_retries_total{backend=\"Backend/greeter-v2\"} 1
pylon_outlier_ejections_active{backend=\"Backend/greeter\"} 1
";
        assert_eq!(
            SidecarCounts::from_metrics(text),
            SidecarCounts {
                calls: 100,
                ok: 98,
                retries: 5,
                ejected: 1
            }
        );
    }

    #[test]
    fn run_duration_takes_policy_spelling_and_refuses_zero() {
        assert_eq!(parse_run_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_run_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse_run_duration("0s").is_err());
        assert!(parse_run_duration("5").is_err());
    }

    #[test]
    fn the_client_policy_is_valid_and_routes_greeter() {
        let addr: SocketAddr = "127.0.0.1:15006".parse().unwrap();
        let resources = pylon_proto::policy::parse(&client_policy(&[addr])).unwrap();
        assert_eq!(resources.len(), 2);
        let resources =
            pylon_proto::policy::parse(&resilient_client_policy(&[addr, addr])).unwrap();
        assert_eq!(resources.len(), 3);
    }
}
