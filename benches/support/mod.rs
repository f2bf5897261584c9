//! What the benchmarks share beyond `pylon-test-support` (which holds the
//! processes, the admin client and the OTLP receivers they start): load
//! settings from the environment, load runs and their tables.
#![allow(dead_code)]

use std::fmt::Display;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::Path;
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use anyhow::bail;
use pylon::demo::GREETER_AUTHORITY;
use pylon::loadgen::{Latency, Load, LoadGenerator, Report, Target};
use pylon_test_support::sidecar::SidecarProc;

/// Starts the bench build's `pylon proxy --config <config>`, logging
/// warnings and the line that reports the bound addresses, and waits until
/// it has logged them. Blocking.
pub fn spawn_sidecar(name: &str, config: &Path) -> anyhow::Result<SidecarProc> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pylon"));
    cmd.arg("proxy")
        .arg("--config")
        .arg(config)
        .env("PYLON_LOG", "warn,pylon::sidecar=info");
    SidecarProc::try_spawn_command(cmd, &format!("the {name} sidecar"))
}

// ---------------------------------------------------------------- load runs

pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_CONCURRENCY: NonZeroUsize = NonZeroUsize::new(64).expect("64 is not zero");
pub const DEFAULT_RPS: NonZeroU32 = NonZeroU32::new(2000).expect("2000 is not zero");
pub const DEFAULT_CONNECTIONS: NonZeroUsize = NonZeroUsize::new(4).expect("4 is not zero");

/// The load of a run, from the environment.
pub struct LoadSettings {
    /// Length of each measured run (`PYLON_BENCH_SECS`).
    pub measure: Duration,
    /// Max-throughput warm-up before each path (`PYLON_BENCH_WARMUP_SECS`).
    pub warmup: Duration,
    /// Concurrent calls of the max-throughput runs (`PYLON_BENCH_CONCURRENCY`).
    pub concurrency: NonZeroUsize,
    /// Rate of the fixed-rate runs (`PYLON_BENCH_RPS`).
    pub rps: NonZeroU32,
    /// HTTP/2 connections from the load generator (`PYLON_BENCH_CONNECTIONS`).
    pub connections: NonZeroUsize,
}

impl LoadSettings {
    pub fn from_env() -> anyhow::Result<LoadSettings> {
        Ok(LoadSettings {
            measure: Duration::from_secs(env_or("PYLON_BENCH_SECS", 10u64)?),
            warmup: Duration::from_secs(env_or("PYLON_BENCH_WARMUP_SECS", 2u64)?),
            concurrency: env_or("PYLON_BENCH_CONCURRENCY", DEFAULT_CONCURRENCY)?,
            rps: env_or("PYLON_BENCH_RPS", DEFAULT_RPS)?,
            connections: env_or("PYLON_BENCH_CONNECTIONS", DEFAULT_CONNECTIONS)?,
        })
    }
}

/// `name` parsed from the environment, or `default` when unset.
pub fn env_or<T: FromStr>(name: &str, default: T) -> anyhow::Result<T>
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

/// The machine's load averages (Linux), to tell whether other work shared
/// the cores during the run.
pub fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// The reports of one path.
pub struct Measured {
    pub max_throughput: Report,
    pub fixed_rate: Report,
}

pub async fn measure(
    label: &str,
    addr: SocketAddr,
    settings: &LoadSettings,
) -> anyhow::Result<Measured> {
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
        // Enough for a second of backlog: beyond that the path is not
        // keeping up and skipping says so.
        max_outstanding: settings.rps,
    };
    let fixed_rate = run_for(&generator, open_loop, settings.measure).await?;
    eprintln!("{label}:   {}", one_line(&fixed_rate));
    Ok(Measured {
        max_throughput,
        fixed_rate,
    })
}

pub async fn run_for(
    generator: &LoadGenerator,
    load: Load,
    length: Duration,
) -> anyhow::Result<Report> {
    let run = generator.start(load);
    tokio::time::sleep(length).await;
    Ok(run.finish().await?)
}

pub fn one_line(r: &Report) -> String {
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

pub fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

pub fn print_table(rows: &[(&str, &Report)], label_width: usize) {
    println!(
        "  {:<w$} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "",
        "rps",
        "success",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "errors",
        w = label_width
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
            "  {:<w$} {:>9.1} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            label,
            r.rps(),
            success,
            latency[0],
            latency[1],
            latency[2],
            latency[3],
            latency[4],
            r.error_count(),
            w = label_width
        );
    }
}
