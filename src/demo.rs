//! `pylon demo`: an mTLS mesh on loopback inside one process, with live gRPC
//! traffic, a fault injected and healed, and a running table of what it
//! measures.
//!
//! It makes a throwaway CA and SPIFFE identities in a scratch directory,
//! starts three instances of the sample [`greeter`], each behind its own
//! server sidecar, and a client sidecar that routes the authority `greeter`
//! to all three over mTLS with retries, a retry budget and outlier ejection.
//! It sends `SayHello` at a fixed rate through the client sidecar
//! ([`crate::loadgen`]) and prints one row per second: rate, success,
//! latency, retries sent and endpoints ejected. At 5 s the third greeter
//! starts failing: retries mask it and outlier detection ejects it, so
//! success stays at about 100 %. At 20 s it heals and returns after its
//! ejection. It runs until `--duration` has passed or Ctrl-C; on the way out
//! it stops the load, the sidecars and the greeters, and removes the scratch
//! directory.
//!
//! It does not use a control plane: policy comes from files in the scratch
//! directory, identities from [`DevCa`]. The pieces the mesh benchmark
//! shares with it (the greeter, the identities, the client policy, the
//! scratch directory) are public here.

pub mod greeter;

use std::net::{Ipv4Addr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;

use crate::config::{
    AdminConfig, Config, DEFAULT_RETRY_BUFFER_BYTES, DnsConfig, IdentitySource, InboundConfig,
    OutboundConfig, PolicySource,
};
use crate::identity::dev::{DevCa, IdentityFiles};
use crate::loadgen::{Load, LoadGenerator, Progress, Report, Target};
use crate::sidecar::Sidecar;
use greeter::RunningGreeter;

/// The greeter's workload identity.
pub const GREETER_ID: &str = "spiffe://pylon.local/ns/default/sa/greeter";
/// The load generator's workload identity (its sidecar's).
pub const CLIENT_ID: &str = "spiffe://pylon.local/ns/default/sa/client";
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
/// Greeter instances, each behind its own server sidecar.
const GREETERS: usize = 3;
/// When the last greeter starts failing, and when it heals.
const FAULT_AT: Duration = Duration::from_secs(5);
const HEAL_AT: Duration = Duration::from_secs(20);

/// `pylon demo` options.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// How long to send traffic (e.g. 30s, 2m); until Ctrl-C when not given.
    #[arg(long, value_parser = parse_run_duration)]
    pub duration: Option<Duration>,
    /// Requests per second sent through the mesh.
    #[arg(long, default_value = "200")]
    pub rps: NonZeroU32,
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

    let setup = tokio::task::spawn_blocking(|| -> anyhow::Result<(ScratchDir, Identities)> {
        let scratch = ScratchDir::create("demo").context("cannot create a scratch directory")?;
        let identities = Identities::issue(scratch.path())?;
        Ok((scratch, identities))
    });
    let (scratch, identities) = tokio::select! {
        made = setup => made??,
        () = &mut ctrl_c => return Ok(()),
    };
    let mesh = tokio::select! {
        mesh = DemoMesh::start(scratch.path(), &identities) => mesh?,
        () = &mut ctrl_c => return Ok(()),
    };

    let target = Target {
        addr: mesh.client.addrs.outbound,
        authority: GREETER_AUTHORITY.to_string(),
        connections: CONNECTIONS,
        request_timeout: REQUEST_TIMEOUT,
    };
    let generator = LoadGenerator::connect(&target).await?;
    print_header(&args, &mesh, &target, scratch.path());

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
        "{:>8} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8} {:>8}  event",
        "elapsed", "rps", "success", "p50 ms", "p99 ms", "requests", "retries", "ejected"
    );
    let started = Instant::now();
    let faulty = mesh.greeters.last();
    let mut fault = Fault::Pending;
    let mut retries_before = 0;
    let why = loop {
        tokio::select! {
            // Rows before the deadline, so that the last second is printed
            // when both fall due together.
            biased;
            () = &mut ctrl_c => break "Ctrl-C",
            _ = rows.tick() => {
                let elapsed = started.elapsed();
                let event = match (fault, faulty) {
                    (Fault::Pending, Some(g)) if elapsed >= FAULT_AT => {
                        g.set_failing(true);
                        fault = Fault::Failing;
                        format!("greeter {GREETERS} starts failing (UNAVAILABLE)")
                    }
                    (Fault::Failing, Some(g)) if elapsed >= HEAL_AT => {
                        g.set_failing(false);
                        fault = Fault::Healed;
                        format!("greeter {GREETERS} heals")
                    }
                    _ => String::new(),
                };
                let (retries, ejected) = mesh.backend_counts();
                print_row(&run.progress(), retries - retries_before, ejected, &event);
                retries_before = retries;
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

/// Where the demo's fault stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Pending,
    Failing,
    Healed,
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
    client_policy(endpoints)
        + "      timeouts: { request: 2s }
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
"
}

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

/// The greeters, their sidecars and the client sidecar, in this process.
struct DemoMesh {
    greeters: Vec<RunningGreeter>,
    servers: Vec<Sidecar>,
    client: Sidecar,
}

impl DemoMesh {
    /// Starts everything on free loopback ports and waits until every
    /// sidecar has installed its policy.
    async fn start(dir: &Path, identities: &Identities) -> anyhow::Result<DemoMesh> {
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let server_policy = dir.join("server-policy.yaml");
        tokio::fs::write(&server_policy, "").await?;
        let mut greeters = Vec::new();
        let mut servers = Vec::new();
        for i in 0..GREETERS {
            let greeter = RunningGreeter::start(loopback)
                .await
                .with_context(|| format!("cannot start greeter {}", i + 1))?;
            let server = Sidecar::start(sidecar_config(
                &identities.greeter,
                server_policy.clone(),
                greeter.addr,
            ))
            .await
            .with_context(|| format!("cannot start server sidecar {}", i + 1))?;
            greeters.push(greeter);
            servers.push(server);
        }

        let endpoints: Vec<SocketAddr> = servers.iter().map(|s| s.addrs.inbound).collect();
        let client_policy_path = dir.join("client-policy.yaml");
        tokio::fs::write(&client_policy_path, resilient_client_policy(&endpoints)).await?;
        // Nothing calls the client sidecar's inbound side: its app address
        // is never dialled.
        let no_app = SocketAddr::from((Ipv4Addr::LOCALHOST, 9));
        let client = Sidecar::start(sidecar_config(
            &identities.client,
            client_policy_path,
            no_app,
        ))
        .await
        .context("cannot start the client sidecar")?;

        for (i, server) in servers.iter().enumerate() {
            wait_installed(server, &format!("server {}", i + 1)).await?;
        }
        wait_installed(&client, "client").await?;
        Ok(DemoMesh {
            greeters,
            servers,
            client,
        })
    }

    /// What the client sidecar's backend `greeter` reports: retries sent so
    /// far and endpoints ejected now.
    fn backend_counts(&self) -> (u64, usize) {
        let snapshot = self.client.policy.load_full();
        snapshot
            .backends
            .get("default/greeter")
            .map_or((0, 0), |b| {
                (b.metrics.retries.get(), b.ejected(Instant::now()))
            })
    }

    /// Stops the callers before the called: client sidecar, server sidecars,
    /// greeters.
    async fn stop(self) -> anyhow::Result<()> {
        self.client.stop().await;
        for server in self.servers {
            server.stop().await;
        }
        for greeter in self.greeters {
            greeter.stop().await?;
        }
        Ok(())
    }
}

fn sidecar_config(identity: &IdentityFiles, policy: PathBuf, app: SocketAddr) -> Config {
    let free_port = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    Config {
        admin: AdminConfig { listen: free_port },
        outbound: OutboundConfig {
            listen: free_port,
            retry_buffer_bytes: DEFAULT_RETRY_BUFFER_BYTES,
        },
        inbound: InboundConfig {
            listen: free_port,
            app,
        },
        identity: IdentitySource::Files {
            cert: identity.cert.clone(),
            key: identity.key.clone(),
            trust_bundle: identity.trust_bundle.clone(),
        },
        policy: PolicySource::File(policy),
        telemetry: None,
        control_plane: None,
        policy_max_bytes: crate::config::MAX_POLICY_BYTES as usize,
        state_dir: None,
        dns: DnsConfig::default(),
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

fn print_header(args: &DemoArgs, mesh: &DemoMesh, target: &Target, scratch: &Path) {
    let until = match args.duration {
        Some(d) => format!("for {}", pylon_proto::policy::format_duration(d)),
        None => "until Ctrl-C".to_string(),
    };
    println!("pylon demo: an mTLS mesh on loopback, all in this process");
    println!();
    println!(
        "  load generator  {} rps of helloworld.Greeter/SayHello, :authority {}, {} HTTP/2 connections",
        args.rps, target.authority, target.connections
    );
    println!(
        "  client sidecar  {CLIENT_ID}\n                  outbound {}  admin {}",
        mesh.client.addrs.outbound, mesh.client.addrs.admin
    );
    for (i, (server, greeter)) in mesh.servers.iter().zip(&mesh.greeters).enumerate() {
        println!(
            "  greeter {}       {GREETER_ID}\n                  sidecar inbound (mTLS) {}  admin {}  app {} (h2c)",
            i + 1,
            server.addrs.inbound,
            server.addrs.admin,
            greeter.addr
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
        "  scenario        at {}s greeter {GREETERS} starts failing; at {}s it heals",
        FAULT_AT.as_secs(),
        HEAL_AT.as_secs()
    );
    println!(
        "  scratch         {} (CA, certificates, policies; removed at exit)",
        scratch.display()
    );
    println!();
    println!(
        "Sending {until}. Latency is measured from each request's intended send time (open loop)."
    );
    println!();
}

fn millis(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

fn percent(p: Option<f64>) -> String {
    p.map_or_else(|| "-".to_string(), |p| format!("{p:.2}%"))
}

fn print_row(progress: &Progress, retries: u64, ejected: usize, event: &str) {
    let interval = &progress.interval;
    let (p50, p99) = match &interval.latency {
        Some(l) => (millis(l.p50), millis(l.p99)),
        None => ("-".to_string(), "-".to_string()),
    };
    println!(
        "{:>7}s {:>9.1} {:>9} {:>9} {:>9} {:>10} {:>8} {:>8}  {}",
        progress.elapsed.as_secs_f64().round(),
        interval.rps(),
        percent(interval.success_percent()),
        p50,
        p99,
        progress.total.requests,
        retries,
        ejected,
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
