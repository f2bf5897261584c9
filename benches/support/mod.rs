//! What the benchmarks share: child processes (`pylon proxy`,
//! `pylon-control serve`) whose stderr is drained for their life, started
//! once they log their readiness line, killed on drop; and a tiny admin
//! client.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::fmt::Display;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use anyhow::{Context, bail};
use pylon::admin::BoundAddrs;
use pylon::demo::GREETER_AUTHORITY;
use pylon::identity::dev::IdentityFiles;
use pylon::loadgen::{Latency, Load, LoadGenerator, Report, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// How long a process may take to start and become ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
pub const READY_POLL: Duration = Duration::from_millis(20);
/// Log lines kept per process, shown when it fails.
const LOG_TAIL: usize = 50;

/// A child process with its last log lines; killed on drop.
pub struct Logged {
    pub child: Child,
    log_tail: Arc<Mutex<VecDeque<String>>>,
}

impl Logged {
    /// Starts `cmd` (stderr piped, drained by a thread) and waits for the
    /// first stderr line containing `marker`, which it returns. Blocking.
    pub fn spawn(mut cmd: Command, what: &str, marker: &str) -> anyhow::Result<(Logged, String)> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        let Some(stderr) = child.stderr.take() else {
            bail!("{what} has no stderr pipe");
        };
        let log_tail = Arc::new(Mutex::new(VecDeque::with_capacity(LOG_TAIL)));
        let (found, found_line) = mpsc::channel();
        let tail = log_tail.clone();
        let marker = marker.to_string();
        // Drains stderr for the life of the process, so that it never blocks
        // on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains(&marker) {
                    let _ = found.send(line.clone());
                }
                let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
                if tail.len() == LOG_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        let process = Logged { child, log_tail };
        match found_line.recv_timeout(START_TIMEOUT) {
            Ok(line) => Ok((process, line)),
            Err(_) => bail!(
                "{what} did not log {:?} in time:\n{}",
                process.marker_hint(),
                process.recent_logs()
            ),
        }
    }

    fn marker_hint(&self) -> &'static str {
        "its readiness line"
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its last log lines.
    pub fn recent_logs(&self) -> String {
        let lines = self.log_tail.lock().unwrap_or_else(|e| e.into_inner());
        Vec::from(lines.clone()).join("\n")
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `pylon proxy` process; killed on drop.
pub struct SidecarProcess {
    pub name: &'static str,
    pub addrs: BoundAddrs,
    process: Logged,
}

impl SidecarProcess {
    /// Starts `pylon proxy --config <config>` and waits until it has logged
    /// its bound addresses. Blocking.
    pub fn spawn(name: &'static str, config: &Path) -> anyhow::Result<SidecarProcess> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pylon"));
        cmd.arg("proxy")
            .arg("--config")
            .arg(config)
            // Warnings, plus the line that reports the bound addresses.
            .env("PYLON_LOG", "warn,pylon::sidecar=info");
        let (process, line) =
            Logged::spawn(cmd, &format!("the {name} sidecar"), "listening admin=")?;
        Ok(SidecarProcess {
            name,
            addrs: parse_listening(&line)?,
            process,
        })
    }

    /// Waits until `GET /ready` answers 200.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut poll = tokio::time::interval(READY_POLL);
        loop {
            poll.tick().await;
            if let Ok(200) = admin_status(self.addrs.admin, "/ready").await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the {} sidecar never became ready:\n{}",
                    self.name,
                    self.recent_logs()
                );
            }
        }
    }

    pub fn recent_logs(&self) -> String {
        self.process.recent_logs()
    }
}

/// The addresses in `listening admin=A outbound=B inbound=C app=D`.
fn parse_listening(line: &str) -> anyhow::Result<BoundAddrs> {
    Ok(BoundAddrs {
        admin: field(line, "admin")?,
        probe: field(line, "probe")?,
        outbound: field(line, "outbound")?,
        inbound: field(line, "inbound")?,
    })
}

/// The address after `key=` in a log line.
pub fn field(line: &str, key: &str) -> anyhow::Result<SocketAddr> {
    let start = line
        .find(&format!("{key}="))
        .with_context(|| format!("no {key}= in {line:?}"))?
        + key.len()
        + 1;
    let value = line[start..].split_whitespace().next().unwrap_or_default();
    value
        .parse()
        .with_context(|| format!("{key}={value:?} in {line:?}"))
}

/// `GET path` on an admin address: the status and the body.
pub async fn admin_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut response = Vec::new();
    s.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The HTTP status of `GET path` on an admin address.
pub async fn admin_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    Ok(admin_get(addr, path).await?.0)
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

/// A bootstrap config whose listeners all take free loopback ports.
pub fn sidecar_config(identity: &IdentityFiles, policy: &Path, app: SocketAddr) -> String {
    format!(
        "admin: {{ listen: \"127.0.0.1:0\", probeListen: \"127.0.0.1:0\" }}
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
