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

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

mod support;

use support::{SidecarProcess, admin_get};

use std::fmt::Display;
use std::net::{Ipv4Addr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::Path;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::bail;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use pylon::demo::greeter::RunningGreeter;
use pylon::demo::{GREETER_AUTHORITY, Identities, ScratchDir, client_policy};
use pylon::identity::dev::IdentityFiles;
use pylon::loadgen::{Latency, Load, LoadGenerator, Report, Target};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_CONCURRENCY: NonZeroUsize = NonZeroUsize::new(64).expect("64 is not zero");
const DEFAULT_RPS: NonZeroU32 = NonZeroU32::new(2000).expect("2000 is not zero");
const DEFAULT_CONNECTIONS: NonZeroUsize = NonZeroUsize::new(4).expect("4 is not zero");

/// The configurations measured: a label and the sampling ratio (`None`:
/// tracing off).
const CONFIGS: [(&str, Option<f64>); 3] = [("off", None), ("0.01", Some(0.01)), ("1.0", Some(1.0))];

struct Settings {
    /// Rounds over the three configurations, alternating their order
    /// (`PYLON_BENCH_ROUNDS`).
    rounds: usize,
    measure: Duration,
    warmup: Duration,
    concurrency: NonZeroUsize,
    rps: NonZeroU32,
    connections: NonZeroUsize,
}

impl Settings {
    fn from_env() -> anyhow::Result<Settings> {
        Ok(Settings {
            rounds: env_or("PYLON_BENCH_ROUNDS", 2usize)?.max(1),
            measure: Duration::from_secs(env_or("PYLON_BENCH_SECS", 10u64)?),
            warmup: Duration::from_secs(env_or("PYLON_BENCH_WARMUP_SECS", 2u64)?),
            concurrency: env_or("PYLON_BENCH_CONCURRENCY", DEFAULT_CONCURRENCY)?,
            rps: env_or("PYLON_BENCH_RPS", DEFAULT_RPS)?,
            connections: env_or("PYLON_BENCH_CONNECTIONS", DEFAULT_CONNECTIONS)?,
        })
    }
}

fn env_or<T: FromStr>(name: &str, default: T) -> anyhow::Result<T>
where
    T::Err: Display,
{
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|e| anyhow::anyhow!("{name}={v:?}: {e}")),
        Err(std::env::VarError::NotPresent) => Ok(default),
        Err(e) => bail!("{name}: {e}"),
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
    let receiver = runtime.block_on(Receiver::start())?;

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
            pair.server.wait_ready().await?;
            pair.client.wait_ready().await?;
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
                let spans_before = receiver.spans.load(Ordering::Relaxed);
                let measured = measure(&label, pair.client.addrs.outbound, &settings).await?;
                // Let the last batches (500 ms apart at most) reach the receiver.
                tokio::time::sleep(Duration::from_secs(1)).await;
                results[i].received += receiver.spans.load(Ordering::Relaxed) - spans_before;
                results[i].rounds.push(measured);
            }
        }
        for (t, pair) in results.iter_mut().zip(&meshes) {
            for sidecar in [&pair.client, &pair.server] {
                t.dropped += metric(sidecar.addrs.admin, "pylon_trace_spans_dropped_total").await?;
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

fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// An OTLP/gRPC trace receiver that counts spans and keeps nothing.
struct Receiver {
    addr: SocketAddr,
    spans: Arc<AtomicU64>,
}

struct Discard(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Discard {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    async fn start() -> anyhow::Result<Receiver> {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let spans = Arc::new(AtomicU64::new(0));
        let service = TraceServiceServer::new(Discard(spans.clone()));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(async move {
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await
            {
                eprintln!("OTLP receiver: {e}");
            }
        });
        Ok(Receiver { addr, spans })
    }
}

/// A client and a server sidecar, as in the mesh benchmark.
struct Pair {
    client: SidecarProcess,
    server: SidecarProcess,
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
        let server = SidecarProcess::spawn("server", &server_config)?;
        let client_policy_path = dir.join("client-policy.yaml");
        std::fs::write(&client_policy_path, client_policy(&[server.addrs.inbound]))?;
        let no_app = SocketAddr::from((Ipv4Addr::LOCALHOST, 9));
        let client_config = dir.join("client.yaml");
        std::fs::write(
            &client_config,
            sidecar_config(&identities.client, &client_policy_path, no_app) + telemetry,
        )?;
        let client = SidecarProcess::spawn("client", &client_config)?;
        Ok(Pair { client, server })
    }
}

/// A bootstrap config whose listeners all take free loopback ports.
fn sidecar_config(identity: &IdentityFiles, policy: &Path, app: SocketAddr) -> String {
    format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}
outbound: {{ listen: \"127.0.0.1:0\" }}
inbound: {{ listen: \"127.0.0.1:0\", app: \"{app}\" }}
identity:
  files: {{ cert: {:?}, key: {:?}, trustBundle: {:?} }}
policy:
  file: {:?}
",
        identity.cert, identity.key, identity.trust_bundle, policy
    )
}

struct Measured {
    max_throughput: Report,
    fixed_rate: Report,
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

async fn measure(label: &str, addr: SocketAddr, settings: &Settings) -> anyhow::Result<Measured> {
    let target = Target {
        addr,
        authority: GREETER_AUTHORITY.to_string(),
        connections: settings.connections,
        request_timeout: REQUEST_TIMEOUT,
    };
    let generator = LoadGenerator::connect(&target).await?;
    let closed_loop = Load::MaxThroughput {
        concurrency: settings.concurrency,
    };
    eprintln!("{label}: warm-up, {}s", settings.warmup.as_secs());
    run_for(&generator, closed_loop, settings.warmup).await?;
    eprintln!(
        "{label}: max throughput, {} concurrent, {}s",
        settings.concurrency,
        settings.measure.as_secs()
    );
    let max_throughput = run_for(&generator, closed_loop, settings.measure).await?;
    eprintln!("{label}:   {}", one_line(&max_throughput));
    eprintln!(
        "{label}: fixed rate, {} rps, {}s",
        settings.rps,
        settings.measure.as_secs()
    );
    let open_loop = Load::FixedRate {
        rps: settings.rps,
        max_outstanding: settings.rps,
    };
    let fixed_rate = run_for(&generator, open_loop, settings.measure).await?;
    eprintln!("{label}:   {}", one_line(&fixed_rate));
    Ok(Measured {
        max_throughput,
        fixed_rate,
    })
}

async fn run_for(
    generator: &LoadGenerator,
    load: Load,
    length: Duration,
) -> anyhow::Result<Report> {
    let run = generator.start(load);
    tokio::time::sleep(length).await;
    Ok(run.finish().await?)
}

fn one_line(r: &Report) -> String {
    let p = |pick: fn(&Latency) -> Duration| r.latency.as_ref().map_or("-".into(), |l| ms(pick(l)));
    format!(
        "{:.0} rps, {} ok, {} errors, p50 {} ms, p99 {} ms",
        r.rps(),
        r.ok,
        r.error_count(),
        p(|l| l.p50),
        p(|l| l.p99)
    )
}

/// The value of one unlabelled sample of a sidecar's `/metrics`.
async fn metric(admin: SocketAddr, name: &str) -> anyhow::Result<u64> {
    let (_, body) = admin_get(admin, "/metrics").await?;
    Ok(body
        .lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map_or(0, |v| v as u64))
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

fn print_results(settings: &Settings, results: &[Traced]) {
    let cpus = std::thread::available_parallelism().map_or(0, NonZeroUsize::get);
    println!();
    println!(
        "pylon tracing benchmark: helloworld.Greeter/SayHello through the two-sidecar mesh, {cpus} CPUs, {} HTTP/2 connections",
        settings.connections
    );
    println!("  off:  no collector configured (traceparent passed through)");
    println!("  0.01: OTLP export to an in-process receiver, 1 % of new traces sampled");
    println!("  1.0:  OTLP export, every trace sampled (3 spans per call: call, attempt, server)");
    println!();
    println!(
        "max throughput: {} concurrent calls, {}s after a {}s warm-up",
        settings.concurrency,
        settings.measure.as_secs(),
        settings.warmup.as_secs()
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
    print_table(&rows(Traced::best_max));
    println!();
    println!(
        "fixed rate: {} rps for {}s, latency from the intended send time",
        settings.rps,
        settings.measure.as_secs()
    );
    print_table(&rows(Traced::best_fixed));
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
            settings.rps,
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

fn print_table(rows: &[(&str, &Report)]) {
    println!(
        "  {:<5} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "", "rps", "success", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "errors"
    );
    for &(label, r) in rows {
        let success = r
            .success_percent()
            .map_or("-".into(), |p| format!("{p:.2}%"));
        let latency = match &r.latency {
            Some(l) => [l.p50, l.p90, l.p99, l.p999, l.max].map(ms),
            None => std::array::from_fn(|_| "-".to_string()),
        };
        println!(
            "  {:<5} {:>9.1} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            label,
            r.rps(),
            success,
            latency[0],
            latency[1],
            latency[2],
            latency[3],
            latency[4],
            r.error_count()
        );
    }
}
