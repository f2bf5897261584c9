//! The mesh benchmark: `helloworld.Greeter/SayHello` measured **direct**,
//! **through the two-hop mTLS mesh** with bare forwarding, and through the
//! mesh with the **full resilience stack** on (deadline, retries with a
//! budget and body replay, outlier detection, bulkhead, least-request
//! balancing), in one run, with the ratios between them.
//!
//! The greeter and the load generator run in this process; the two sidecars
//! are real `pylon proxy` processes (the binary cargo builds for benches),
//! configured from files in a scratch directory:
//!
//! ```text
//! direct:  load generator ──h2c──▶ greeter
//! mesh:    load generator ──h2c──▶ pylon (client) ══mTLS══▶ pylon (server) ──h2c──▶ greeter
//! mesh+r:  the same through a second client sidecar whose route has the
//!          resilience policy of `pylon demo`
//! ```
//!
//! For each path: a warm-up, a max-throughput run (closed loop, N concurrent
//! calls) and a fixed-rate run (open loop, latency from the intended send
//! time). Settings come from the environment (see `benches/README.md`).
//! Everything shares the machine's cores, so the numbers describe this
//! machine, not the proxy alone.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

mod support;

use support::{
    LoadSettings as Settings, Measured, load_average, measure, print_table, spawn_sidecar,
};

use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use pylon::demo::greeter::RunningGreeter;
use pylon::demo::{
    CLIENT_ID, GREETER_ID, Identities, ScratchDir, client_policy, resilient_client_policy,
};
use pylon::loadgen::Report;
use pylon_test_support::sidecar::{SidecarProc, sidecar_config};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    let load_before = load_average();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let greeter = runtime.block_on(RunningGreeter::start(loopback))?;

    // Processes and files are set up outside the runtime: this part blocks.
    let scratch = ScratchDir::create("bench")?;
    let mesh = ProcessMesh::spawn(scratch.path(), greeter.addr)?;

    let (direct, meshed, resilient) = runtime.block_on(async {
        mesh.wait_ready().await;
        let direct = measure("direct", greeter.addr, &settings).await?;
        let meshed = measure("mesh", mesh.client.outbound, &settings).await?;
        let resilient = measure("mesh+r", mesh.resilient.outbound, &settings).await?;
        anyhow::Ok((direct, meshed, resilient))
    })?;
    drop(mesh);
    runtime.block_on(greeter.stop())?;
    drop(scratch);

    print_results(&settings, &direct, &meshed, &resilient);
    if let (Some(before), Some(after)) = (load_before, load_average()) {
        println!();
        println!("load average (1, 5, 15 min) before: {before}, after: {after}");
    }
    Ok(())
}

/// `pylon proxy` processes: `client` routes `greeter` over mTLS to
/// `server`, which forwards to the greeter; `resilient` does the same with
/// the resilience policy on.
struct ProcessMesh {
    client: SidecarProc,
    resilient: SidecarProc,
    server: SidecarProc,
}

impl ProcessMesh {
    /// Writes identities, policies and configs into `dir` and starts both
    /// processes. Blocking.
    fn spawn(dir: &Path, greeter: SocketAddr) -> anyhow::Result<ProcessMesh> {
        let identities = Identities::issue(dir)?;
        let server_policy = dir.join("server-policy.yaml");
        std::fs::write(&server_policy, "")?;
        let server_config = dir.join("server.yaml");
        std::fs::write(
            &server_config,
            sidecar_config(&identities.greeter, &server_policy, greeter),
        )?;
        let server = spawn_sidecar("server", &server_config)?;

        let client_policy_path = dir.join("client-policy.yaml");
        std::fs::write(&client_policy_path, client_policy(&[server.inbound]))?;
        // Nothing calls the client sidecar's inbound side.
        let no_app = SocketAddr::from((Ipv4Addr::LOCALHOST, 9));
        let client_config = dir.join("client.yaml");
        std::fs::write(
            &client_config,
            sidecar_config(&identities.client, &client_policy_path, no_app),
        )?;
        let client = spawn_sidecar("client", &client_config)?;

        let resilient_policy = dir.join("resilient-policy.yaml");
        std::fs::write(
            &resilient_policy,
            resilient_client_policy(&[server.inbound]),
        )?;
        let resilient_config = dir.join("resilient.yaml");
        std::fs::write(
            &resilient_config,
            sidecar_config(&identities.client, &resilient_policy, no_app),
        )?;
        let resilient = spawn_sidecar("resilient client", &resilient_config)?;
        Ok(ProcessMesh {
            client,
            resilient,
            server,
        })
    }

    async fn wait_ready(&self) {
        self.server.wait_ready().await;
        self.client.wait_ready().await;
        self.resilient.wait_ready().await;
    }
}

fn print_results(settings: &Settings, direct: &Measured, mesh: &Measured, resilient: &Measured) {
    let cpus = std::thread::available_parallelism().map_or(0, NonZeroUsize::get);
    println!();
    println!(
        "pylon mesh benchmark: helloworld.Greeter/SayHello, {cpus} CPUs, {} HTTP/2 connections from the load generator",
        settings.connections
    );
    println!("  direct: load generator → greeter");
    println!(
        "  mesh:   load generator → pylon proxy (client) ══mTLS══▶ pylon proxy (server) → greeter"
    );
    println!(
        "  mesh+r: the same, the client's route with deadline, retries + budget, outlier detection,"
    );
    println!("          bulkhead and least-request balancing");
    println!("          (sidecar identities {CLIENT_ID} and {GREETER_ID})");
    println!();
    println!(
        "max throughput: {} concurrent calls, {}s after a {}s warm-up",
        settings.concurrency,
        settings.measure.as_secs(),
        settings.warmup.as_secs()
    );
    print_table(
        &[
            ("direct", &direct.max_throughput),
            ("mesh", &mesh.max_throughput),
            ("mesh+r", &resilient.max_throughput),
        ],
        7,
    );
    println!();
    println!(
        "fixed rate: {} rps for {}s, latency from the intended send time",
        settings.rps,
        settings.measure.as_secs()
    );
    print_table(
        &[
            ("direct", &direct.fixed_rate),
            ("mesh", &mesh.fixed_rate),
            ("mesh+r", &resilient.fixed_rate),
        ],
        7,
    );
    println!();
    println!("mesh vs direct");
    println!(
        "  throughput (max)             {:.2}× direct",
        mesh.max_throughput.rps() / direct.max_throughput.rps()
    );
    println!(
        "  added latency at {:>5} rps   {}",
        settings.rps,
        added(&direct.fixed_rate, &mesh.fixed_rate)
    );
    println!(
        "  added latency at max load    {}",
        added(&direct.max_throughput, &mesh.max_throughput)
    );
    println!();
    println!("resilience stack vs bare forwarding (mesh+r vs mesh)");
    let ratio = resilient.max_throughput.rps() / mesh.max_throughput.rps();
    println!(
        "  throughput (max)             {ratio:.3}× bare ({:+.1} %; target: no more than 10 % lost)",
        (ratio - 1.0) * 100.0
    );
    println!(
        "  added latency at {:>5} rps   {}",
        settings.rps,
        added(&mesh.fixed_rate, &resilient.fixed_rate)
    );
    println!(
        "  added latency at max load    {}",
        added(&mesh.max_throughput, &resilient.max_throughput)
    );
    for (label, r) in [
        ("direct", &direct.fixed_rate),
        ("mesh", &mesh.fixed_rate),
        ("mesh+r", &resilient.fixed_rate),
    ] {
        let achieved = r.rps() / f64::from(settings.rps.get());
        if r.error_count() > 0 || achieved < 0.95 {
            println!(
                "  note: {label} did not sustain {} rps ({:.0} achieved, {} errors): its fixed-rate latency includes queueing",
                settings.rps,
                r.rps(),
                r.error_count()
            );
        }
    }
}

/// How much later the mesh answered than the direct path, at p50 and p99.
fn added(direct: &Report, mesh: &Report) -> String {
    match (&direct.latency, &mesh.latency) {
        (Some(d), Some(m)) => {
            let delta = |a: Duration, b: Duration| (b.as_secs_f64() - a.as_secs_f64()) * 1000.0;
            format!(
                "p50 {:+.3} ms, p99 {:+.3} ms",
                delta(d.p50, m.p50),
                delta(d.p99, m.p99)
            )
        }
        _ => "- (no successful calls)".to_string(),
    }
}
