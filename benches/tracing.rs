//! The tracing benchmark: what traces cost. The two-sidecar mesh of
//! `benches/mesh.rs` measured three times in one run — tracing **off** (no
//! collector configured), tracing on at **sampling 0.01** and at **sampling
//! 1.0** — with the ratios against off.
//!
//! ```text
//! load generator ──h2c──▶ pylon (client) ══mTLS══▶ pylon (server) ──h2c──▶ greeter
//!                              │ OTLP/gRPC               │ OTLP/gRPC
//!                              └────────▶ receiver ◀─────┘   (in this process; accepts and discards)
//! ```
//!
//! Each configuration is its own pair of `pylon proxy` processes (the
//! binary cargo builds for benches). The greeter, the load generator and the
//! OTLP receiver run in this process. For each, in every round: a warm-up,
//! a max-throughput run (closed loop) and a fixed-rate run (open loop,
//! latency from the intended send time). Rounds alternate the order of the
//! configurations, and each configuration reports its best round, so that a
//! build starting on the machine mid-run does not decide the comparison.
//! Settings come from the environment, as for the mesh benchmark (see
//! `benches/README.md`).

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

mod support;

use support::{
    LoadSettings, Measured, env_or, load_average, measure, ms, print_table, spawn_sidecar,
};

use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use pylon::demo::greeter::RunningGreeter;
use pylon::demo::{Identities, ScratchDir, client_policy};
use pylon::loadgen::Report;
use pylon_test_support::otlp::SpanCounter;
use pylon_test_support::sidecar::{SidecarProc, sidecar_config};

/// The configurations measured: a label and the sampling ratio (`None`:
/// tracing off).
const CONFIGS: [(&str, Option<f64>); 3] = [("off", None), ("0.01", Some(0.01)), ("1.0", Some(1.0))];

struct Settings {
    /// Rounds over the three configurations, alternating their order
    /// (`PYLON_BENCH_ROUNDS`).
    rounds: usize,
    load: LoadSettings,
}

impl Settings {
    fn from_env() -> anyhow::Result<Settings> {
        Ok(Settings {
            rounds: env_or("PYLON_BENCH_ROUNDS", 2usize)?.max(1),
            load: LoadSettings::from_env()?,
        })
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tracing bench: {e:#}");
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
    let receiver = runtime.block_on(SpanCounter::start())?;

    let scratch = ScratchDir::create("bench-tracing")?;
    let identities = Identities::issue(scratch.path())?;
    let mut meshes = Vec::new();
    for (label, sampling) in CONFIGS {
        let telemetry = sampling.map(|s| {
            format!(
                "telemetry: {{ otlp: {{ endpoint: \"http://{}\" }}, sampling: {s} }}\n",
                receiver.addr
            )
        });
        let dir = scratch.path().join(label);
        std::fs::create_dir_all(&dir)?;
        meshes.push(Pair::spawn(
            &dir,
            &identities,
            greeter.addr,
            telemetry.as_deref().unwrap_or(""),
        )?);
    }

    let results = runtime.block_on(async {
        for pair in &meshes {
            pair.server.wait_ready().await;
            pair.client.wait_ready().await;
        }
        let mut results: Vec<Traced> = CONFIGS.iter().map(|_| Traced::default()).collect();
        // Whatever runs first meets a colder machine: odd rounds go the
        // other way round.
        for round in 0..settings.rounds {
            let mut order: Vec<usize> = (0..CONFIGS.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let label = format!("{} (round {})", CONFIGS[i].0, round + 1);
                let pair = &meshes[i];
                let spans_before = receiver.spans();
                let measured = measure(&label, pair.client.outbound, &settings.load).await?;
                // Let the last batches (500 ms apart at most) reach the receiver.
                tokio::time::sleep(Duration::from_secs(1)).await;
                results[i].received += receiver.spans() - spans_before;
                results[i].rounds.push(measured);
            }
        }
        for (t, pair) in results.iter_mut().zip(&meshes) {
            for sidecar in [&pair.client, &pair.server] {
                t.dropped += sidecar.metric("pylon_trace_spans_dropped_total").await;
            }
        }
        anyhow::Ok(results)
    })?;
    drop(meshes);
    runtime.block_on(greeter.stop())?;
    drop(scratch);

    print_results(&settings, &results);
    if let (Some(before), Some(after)) = (load_before, load_average()) {
        println!();
        println!("load average (1, 5, 15 min) before: {before}, after: {after}");
    }
    Ok(())
}

/// A client and a server sidecar, as in the mesh benchmark.
struct Pair {
    client: SidecarProc,
    server: SidecarProc,
}

impl Pair {
    /// Writes policies and configs into `dir` and starts both processes,
    /// each with the bootstrap `telemetry` section given. Blocking.
    fn spawn(
        dir: &Path,
        identities: &Identities,
        greeter: SocketAddr,
        telemetry: &str,
    ) -> anyhow::Result<Pair> {
        let server_policy = dir.join("server-policy.yaml");
        std::fs::write(&server_policy, "")?;
        let server_config = dir.join("server.yaml");
        std::fs::write(
            &server_config,
            sidecar_config(&identities.greeter, &server_policy, greeter) + telemetry,
        )?;
        let server = spawn_sidecar("server", &server_config)?;
        let client_policy_path = dir.join("client-policy.yaml");
        std::fs::write(&client_policy_path, client_policy(&[server.inbound]))?;
        let no_app = SocketAddr::from((Ipv4Addr::LOCALHOST, 9));
        let client_config = dir.join("client.yaml");
        std::fs::write(
            &client_config,
            sidecar_config(&identities.client, &client_policy_path, no_app) + telemetry,
        )?;
        let client = spawn_sidecar("client", &client_config)?;
        Ok(Pair { client, server })
    }
}

/// One configuration's reports, a pair per round, and what became of its
/// spans.
#[derive(Default)]
struct Traced {
    rounds: Vec<Measured>,
    /// Spans the receiver got during the runs.
    received: u64,
    /// `pylon_trace_spans_dropped_total` of both sidecars at the end.
    dropped: u64,
}

impl Traced {
    /// The round with the highest max throughput: the one least disturbed
    /// by whatever else shared the machine.
    fn best_max(&self) -> &Report {
        self.rounds
            .iter()
            .map(|m| &m.max_throughput)
            .max_by(|a, b| a.rps().total_cmp(&b.rps()))
            .expect("at least one round")
    }

    /// The fixed-rate round with the lowest p99.
    fn best_fixed(&self) -> &Report {
        self.rounds
            .iter()
            .map(|m| &m.fixed_rate)
            .min_by_key(|r| r.latency.as_ref().map_or(Duration::MAX, |l| l.p99))
            .expect("at least one round")
    }
}

fn print_results(settings: &Settings, results: &[Traced]) {
    let cpus = std::thread::available_parallelism().map_or(0, NonZeroUsize::get);
    println!();
    println!(
        "pylon tracing benchmark: helloworld.Greeter/SayHello through the two-sidecar mesh, {cpus} CPUs, {} HTTP/2 connections",
        settings.load.connections
    );
    println!("  off:  no collector configured (traceparent passed through)");
    println!("  0.01: OTLP export to an in-process receiver, 1 % of new traces sampled");
    println!("  1.0:  OTLP export, every trace sampled (3 spans per call: call, attempt, server)");
    println!();
    println!(
        "max throughput: {} concurrent calls, {}s after a {}s warm-up",
        settings.load.concurrency,
        settings.load.measure.as_secs(),
        settings.load.warmup.as_secs()
    );
    println!(
        "{} rounds, order alternating; each row is the configuration's best round (highest rps; lowest p99 at fixed rate)",
        settings.rounds
    );
    let rows = |pick: fn(&Traced) -> &Report| -> Vec<(&str, &Report)> {
        CONFIGS
            .iter()
            .zip(results)
            .map(|((label, _), t)| (*label, pick(t)))
            .collect()
    };
    print_table(&rows(Traced::best_max), 5);
    println!();
    println!(
        "fixed rate: {} rps for {}s, latency from the intended send time",
        settings.load.rps,
        settings.load.measure.as_secs()
    );
    print_table(&rows(Traced::best_fixed), 5);
    println!();
    println!("every round (max-throughput rps, fixed-rate p99 ms)");
    for ((label, _), t) in CONFIGS.iter().zip(results) {
        let rounds: Vec<String> = t
            .rounds
            .iter()
            .map(|m| {
                let p99 = m
                    .fixed_rate
                    .latency
                    .as_ref()
                    .map_or("-".into(), |l| ms(l.p99));
                format!("{:.0} rps / {p99}", m.max_throughput.rps())
            })
            .collect();
        println!("  {label:<5} {}", rounds.join(", "));
    }
    println!();
    println!("vs tracing off (best rounds)");
    let off = &results[0];
    for ((label, _), t) in CONFIGS.iter().zip(results).skip(1) {
        println!(
            "  {label:<5} throughput (max) {:.3}× off; p50/p99 at max load {}; at {} rps {}",
            t.best_max().rps() / off.best_max().rps(),
            ratio(off.best_max(), t.best_max()),
            settings.load.rps,
            ratio(off.best_fixed(), t.best_fixed()),
        );
    }
    println!();
    println!("spans (both sidecars, all runs incl. warm-ups)");
    for ((label, _), t) in CONFIGS.iter().zip(results) {
        println!(
            "  {label:<5} received by the collector {:>9}, dropped {:>7}",
            t.received, t.dropped
        );
    }
}

/// p50 and p99 of `b` as multiples of `a`'s.
fn ratio(a: &Report, b: &Report) -> String {
    match (&a.latency, &b.latency) {
        (Some(a), Some(b)) => format!(
            "{:.2}× / {:.2}×",
            b.p50.as_secs_f64() / a.p50.as_secs_f64(),
            b.p99.as_secs_f64() / a.p99.as_secs_f64()
        ),
        _ => "- (no successful calls)".to_string(),
    }
}
