//! The fan-out benchmark: how long a policy apply takes to reach **every**
//! subscribed sidecar, from the admin `Apply` call to the last ACK.
//!
//! The control plane is a real `pylon-control serve` process (the binary
//! cargo builds for benches) on a scratch data directory. This process plays
//! the operator and N simulated sidecars:
//!
//! ```text
//! admin client ──TLS──▶ pylon-control ══TLS══▶ N subscribers (one connection,
//!   Apply                 (one process)          one StreamPolicy stream each)
//! ```
//!
//! Each subscriber has its own bootstrap token and identity
//! (`spiffe://pylon.local/ns/bench/sa/sub-<i>`) and its own TLS connection,
//! as real sidecars do. It says hello, then ACKs every snapshot by echoing
//! its version and nonce, without parsing the policy.
//!
//! Once all N have ACKed the initial snapshot, M applies run one after the
//! other, each changing the route's weights and timeout (so each makes a new
//! version). For each: `t0` just before the `Apply` RPC; every subscriber
//! notes when it handed the ACK of the new version to its stream; the next
//! apply starts once all N have done so and the control plane's `Status`
//! shows all N at that version. Settings come from the environment (see
//! `benches/README.md`). The subscribers and the control plane share the
//! machine's cores, so the numbers describe this machine.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

mod support;

use support::{env_or, load_average, ms};

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pylon::demo::ScratchDir;
use pylon_proto::v1::discovery_client::DiscoveryClient;
use pylon_proto::v1::policy_admin_client::PolicyAdminClient;
use pylon_proto::v1::{self as pb, DiscoveryRequest};
use pylon_test_support::control::ControlProc;
use pylon_test_support::policy::{
    self, Build, HttpRouteMatch, HttpRouteRule, Kind, PathMatch, Resource,
};
use rustls::ClientConfig;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::Request;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

/// How long all subscribers may take to ACK one version.
const ACK_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the control plane's `Status` may take to show every ACK.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
const STATUS_POLL: Duration = Duration::from_millis(10);
/// Subscribers connecting (TLS handshake to first ACK) at the same time.
const CONNECTING_AT_ONCE: usize = 64;
/// Concurrent `CreateToken` calls.
const TOKEN_WORKERS: usize = 8;
/// Backends in the policy; one HTTPRoute splits traffic between them.
const BACKENDS: u32 = 10;
/// `/proc/<pid>/stat` counts CPU time in these (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;
/// File descriptors this process needs besides one per subscriber.
const SPARE_FDS: u64 = 256;
/// The goal: every subscriber has the new policy within this, at p99, at
/// [`TARGET_SUBSCRIBERS`].
const TARGET: Duration = Duration::from_secs(1);
const TARGET_SUBSCRIBERS: usize = 1000;
const DEFAULT_SUBSCRIBERS: NonZeroUsize = NonZeroUsize::new(1000).expect("1000 is not zero");
const DEFAULT_APPLIES: NonZeroUsize = NonZeroUsize::new(30).expect("30 is not zero");

/// What to run, from the environment.
struct Settings {
    /// Simulated sidecars (`PYLON_FANOUT_SUBSCRIBERS`).
    subscribers: NonZeroUsize,
    /// Measured applies (`PYLON_FANOUT_APPLIES`).
    applies: NonZeroUsize,
}

impl Settings {
    fn from_env() -> anyhow::Result<Settings> {
        Ok(Settings {
            subscribers: env_or("PYLON_FANOUT_SUBSCRIBERS", DEFAULT_SUBSCRIBERS)?,
            applies: env_or("PYLON_FANOUT_APPLIES", DEFAULT_APPLIES)?,
        })
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fanout bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    check_fd_limit(settings.subscribers.get())?;
    let load_before = load_average();

    // Processes and files are set up outside the runtime: this part blocks.
    let scratch = ScratchDir::create("fanout")?;
    let cp = spawn_control(&scratch.path().join("cp-data"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let measured = runtime.block_on(measure(&cp, &settings));
    // Closes every subscriber's connection before the control plane goes.
    drop(runtime);
    let measured =
        measured.map_err(|e| anyhow::anyhow!("{e:#}\npylon-control's log:\n{}", cp.logs()))?;
    drop(cp);
    drop(scratch);

    print_results(&settings, &measured);
    if let (Some(before), Some(after)) = (load_before, load_average()) {
        println!();
        println!("load average (1, 5, 15 min) before: {before}, after: {after}");
    }
    Ok(())
}

/// The soft `RLIMIT_NOFILE` must leave one descriptor per subscriber (the
/// control plane, a child, inherits it and needs as many).
fn check_fd_limit(subscribers: usize) -> anyhow::Result<()> {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return Ok(());
    };
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<u64>().ok());
    let needed = subscribers as u64 + SPARE_FDS;
    match soft {
        Some(soft) if soft < needed => bail!(
            "{subscribers} subscribers need about {needed} open files, the limit is {soft}: \
             raise it (ulimit -n {needed}) or set PYLON_FANOUT_SUBSCRIBERS lower"
        ),
        _ => Ok(()),
    }
}

/// What one run measured.
struct Measured {
    pid: u32,
    /// Size of the policy snapshot (YAML), bytes.
    snapshot_bytes: usize,
    tokens: Duration,
    /// From the first subscriber's connect to the last one's first ACK.
    connect: Duration,
    /// Per apply.
    apply_rpc: Vec<Duration>,
    first_ack: Vec<Duration>,
    last_ack: Vec<Duration>,
    /// Every subscriber's ACK of every apply.
    each_ack: Vec<Duration>,
    /// The slowest `Status` confirmation after the last ACK was sent.
    status_lag: Duration,
    /// Wall time of the applies phase, and the CPU time the control plane
    /// and this process (the subscribers) used during it.
    applies_wall: Duration,
    control_cpu: Option<Duration>,
    bench_cpu: Option<Duration>,
    memory: Vec<(&'static str, Option<Memory>)>,
}

async fn measure(cp: &ControlProc, settings: &Settings) -> anyhow::Result<Measured> {
    let n = settings.subscribers.get();
    let data_dir = &cp.data_dir;
    let roots = pylon_control::cli::roots_from(&data_dir.join("ca.pem"))?;
    let tls = pylon_proto::client::client_config(roots, None)?;
    let address = format!("https://{}", cp.addr);
    let admin_token =
        std::fs::read_to_string(data_dir.join("admin.token")).context("cannot read admin.token")?;
    let admin = Admin::connect(&address, tls.clone(), &admin_token)?;

    let mut version = admin.apply(&backends_yaml()).await?;
    version = version.max(admin.apply(&route_yaml(0)).await?);

    eprintln!("creating {n} bootstrap tokens");
    let started = Instant::now();
    let tokens = admin.create_tokens(n).await?;
    let tokens_took = started.elapsed();
    let mut memory = vec![("before subscribers", Memory::of(cp.pid()))];

    eprintln!("connecting {n} subscribers");
    let (events, mut inbox) = mpsc::unbounded_channel();
    let connecting = Arc::new(Semaphore::new(CONNECTING_AT_ONCE));
    let started = Instant::now();
    for (i, token) in tokens.into_iter().enumerate() {
        let permit = connecting.clone().acquire_owned().await?;
        let subscriber = Subscriber {
            index: i,
            identity: identity(i),
            token,
            address: address.clone(),
            tls: tls.clone(),
        };
        let events = events.clone();
        tokio::spawn(async move {
            let ended = subscriber.run(permit, &events).await;
            let _ = events.send(Event::Ended(subscriber.index, ended));
        });
    }
    drop(events);
    let initial = wait_all_acked(&mut inbox, n, version, started).await?;
    let connect = initial.iter().map(|a| a.acked).max().unwrap_or_default();
    let snapshot_bytes = initial.first().map_or(0, |a| a.bytes);
    admin.wait_recorded(n, version).await?;
    memory.push(("subscribers connected", Memory::of(cp.pid())));
    eprintln!(
        "{n} subscribers at version {version} after {:.3} s; {} applies",
        connect.as_secs_f64(),
        settings.applies
    );

    let mut m = Measured {
        pid: cp.pid(),
        snapshot_bytes,
        tokens: tokens_took,
        connect,
        apply_rpc: Vec::new(),
        first_ack: Vec::new(),
        last_ack: Vec::new(),
        each_ack: Vec::new(),
        status_lag: Duration::ZERO,
        applies_wall: Duration::ZERO,
        control_cpu: None,
        bench_cpu: None,
        memory: Vec::new(),
    };
    let cpu_before = (cpu_time(cp.pid()), cpu_time(std::process::id()));
    let applies_started = Instant::now();
    let steps: Vec<String> = (1..=settings.applies.get())
        .map(|k| route_yaml(k as u32))
        .collect();
    for (k, yaml) in steps.iter().enumerate() {
        let t0 = Instant::now();
        let new_version = admin.apply(yaml).await?;
        let rpc = t0.elapsed();
        if new_version <= version {
            bail!("apply {} did not make a new version ({new_version})", k + 1);
        }
        version = new_version;
        let acks = wait_all_acked(&mut inbox, n, version, t0).await?;
        let all_sent = t0.elapsed();
        admin.wait_recorded(n, version).await?;
        m.status_lag = m.status_lag.max(t0.elapsed().saturating_sub(all_sent));
        let first = acks.iter().map(|a| a.acked).min().unwrap_or_default();
        let last = acks.iter().map(|a| a.acked).max().unwrap_or_default();
        eprintln!(
            "apply {:>3}: version {version}, Apply RPC {} ms, first ACK {} ms, last ACK {} ms",
            k + 1,
            ms(rpc),
            ms(first),
            ms(last)
        );
        m.apply_rpc.push(rpc);
        m.first_ack.push(first);
        m.last_ack.push(last);
        m.each_ack.extend(acks.iter().map(|a| a.acked));
    }
    m.applies_wall = applies_started.elapsed();
    let cpu_after = (cpu_time(cp.pid()), cpu_time(std::process::id()));
    let spent = |a: Option<Duration>, b: Option<Duration>| Some(b?.saturating_sub(a?));
    m.control_cpu = spent(cpu_before.0, cpu_after.0);
    m.bench_cpu = spent(cpu_before.1, cpu_after.1);
    memory.push(("after the applies", Memory::of(cp.pid())));
    m.memory = memory;
    Ok(m)
}

/// The identity of subscriber `i`.
fn identity(i: usize) -> String {
    format!("spiffe://pylon.local/ns/bench/sa/sub-{i}")
}

/// Ten backends of three endpoints each, over mesh mTLS.
fn backends_yaml() -> String {
    let backends: Vec<Resource> = (0..BACKENDS)
        .map(|b| {
            let endpoints: Vec<SocketAddr> = (1..=3)
                .map(|host| format!("10.0.{b}.{host}:8080").parse().unwrap())
                .collect();
            let identity = format!("spiffe://pylon.local/ns/bench/sa/svc-{b}");
            policy::backend(&format!("svc-{b}"), &endpoints, Some(&identity)).in_namespace("bench")
        })
        .collect();
    policy::yaml(&backends)
}

/// The route of step `k`: a prefix rule per backend, plus a default rule
/// splitting traffic between all of them. Weights and the timeout depend on
/// `k`, so each step is a new version.
fn route_yaml(k: u32) -> String {
    let timeout = |d: Duration| Some(policy::timeouts(Some(d), None));
    let mut rules: Vec<HttpRouteRule> = (0..BACKENDS)
        .map(|b| {
            let to_path = HttpRouteMatch {
                path: Some(PathMatch::Prefix(format!("/svc-{b}"))),
                method: None,
                headers: Vec::new(),
            };
            let mut rule = policy::rule(vec![to_path], &[(&format!("svc-{b}"), 1)]);
            rule.timeouts = timeout(Duration::from_millis(u64::from(1000 + k)));
            rule
        })
        .collect();
    let names: Vec<String> = (0..BACKENDS).map(|b| format!("svc-{b}")).collect();
    let weighted: Vec<(&str, u32)> = names
        .iter()
        .zip(0u32..)
        .map(|(name, b)| (name.as_str(), 1 + (k + b) % 100))
        .collect();
    let mut split = policy::rule(Vec::new(), &weighted);
    split.timeouts = timeout(Duration::from_secs(u64::from(1 + k)));
    rules.push(split);
    let route = policy::route(Kind::HttpRoute, "web", "web.bench.svc", &[])
        .in_namespace("bench")
        .http_rules(rules);
    policy::yaml(&[route])
}

/// The admin API, with the admin token.
struct Admin {
    client: PolicyAdminClient<Channel>,
    bearer: MetadataValue<Ascii>,
}

impl Admin {
    fn connect(address: &str, tls: Arc<ClientConfig>, token: &str) -> anyhow::Result<Admin> {
        let channel = pylon_proto::client::lazy_channel(address, tls)?;
        Ok(Admin {
            client: PolicyAdminClient::new(channel),
            bearer: MetadataValue::try_from(format!("Bearer {}", token.trim()))
                .context("admin.token holds no valid token")?,
        })
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut req = Request::new(message);
        req.metadata_mut()
            .insert("authorization", self.bearer.clone());
        req
    }

    /// Applies `yaml`; the policy version after.
    async fn apply(&self, yaml: &str) -> anyhow::Result<u64> {
        let req = self.request(pb::ApplyRequest {
            yaml: yaml.to_string(),
        });
        let response = self.client.clone().apply(req).await.context("Apply")?;
        Ok(response.into_inner().version)
    }

    /// One bootstrap token per subscriber, in subscriber order.
    async fn create_tokens(&self, n: usize) -> anyhow::Result<Vec<String>> {
        let mut workers = Vec::new();
        for w in 0..TOKEN_WORKERS {
            let (mut client, bearer) = (self.client.clone(), self.bearer.clone());
            workers.push(tokio::spawn(async move {
                let mut made = Vec::new();
                for i in (w..n).step_by(TOKEN_WORKERS) {
                    let mut req = Request::new(pb::CreateTokenRequest {
                        identity: identity(i),
                        ttl_seconds: 0,
                        once: false,
                    });
                    req.metadata_mut().insert("authorization", bearer.clone());
                    let token = client.create_token(req).await.context("CreateToken")?;
                    made.push((i, token.into_inner().token));
                }
                anyhow::Ok(made)
            }));
        }
        let mut tokens = vec![String::new(); n];
        for w in workers {
            for (i, token) in w.await?? {
                tokens[i] = token;
            }
        }
        Ok(tokens)
    }

    /// Waits until `Status` lists exactly `n` sidecars, all having ACKed
    /// `version`.
    async fn wait_recorded(&self, n: usize, version: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + STATUS_TIMEOUT;
        loop {
            let status = self
                .client
                .clone()
                .status(self.request(pb::StatusRequest {}))
                .await
                .context("Status")?
                .into_inner();
            let at_version = status
                .sidecars
                .iter()
                .filter(|s| s.acked_version == version)
                .count();
            if status.sidecars.len() == n && at_version == n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "Status: {} sidecars connected, {at_version} at version {version}, expected {n}",
                    status.sidecars.len()
                );
            }
            tokio::time::sleep(STATUS_POLL).await;
        }
    }
}

/// One subscriber's ACK of one snapshot.
struct Ack {
    index: usize,
    version: u64,
    bytes: usize,
    /// When the ACK was handed to the request stream.
    acked: Instant,
}

enum Event {
    Ack(Ack),
    /// A subscriber's stream ended (it never should during the run).
    Ended(usize, anyhow::Result<()>),
}

/// A simulated sidecar.
struct Subscriber {
    index: usize,
    identity: String,
    token: String,
    address: String,
    tls: Arc<ClientConfig>,
}

impl Subscriber {
    /// Connects on a channel of its own, says hello and ACKs every snapshot
    /// until the stream ends. `connecting` is released at the first ACK.
    async fn run(
        &self,
        connecting: OwnedSemaphorePermit,
        events: &mpsc::UnboundedSender<Event>,
    ) -> anyhow::Result<()> {
        let mut connecting = Some(connecting);
        let channel = pylon_proto::client::lazy_channel(&self.address, self.tls.clone())?;
        let mut client = DiscoveryClient::new(channel);
        let (replies, outgoing) = mpsc::channel(4);
        replies
            .send(DiscoveryRequest {
                identity: self.identity.clone(),
                ..Default::default()
            })
            .await?;
        let mut req = Request::new(tokio_stream::wrappers::ReceiverStream::new(outgoing));
        req.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {}", self.token))?,
        );
        let mut snapshots = client.stream_policy(req).await?.into_inner();
        while let Some(snapshot) = snapshots.message().await? {
            let ack = DiscoveryRequest {
                version: snapshot.version,
                nonce: snapshot.nonce,
                ..Default::default()
            };
            replies.send(ack).await?;
            let acked = Instant::now();
            drop(connecting.take());
            let ack = Ack {
                index: self.index,
                version: snapshot.version,
                bytes: snapshot.yaml.len(),
                acked,
            };
            if events.send(Event::Ack(ack)).is_err() {
                break;
            }
        }
        Ok(())
    }
}

/// An ACK of the awaited version, as a time since `t0`.
struct AckTime {
    acked: Duration,
    bytes: usize,
}

/// Waits until each of the `n` subscribers has ACKed `version`; their ACK
/// times since `t0`.
async fn wait_all_acked(
    inbox: &mut mpsc::UnboundedReceiver<Event>,
    n: usize,
    version: u64,
    t0: Instant,
) -> anyhow::Result<Vec<AckTime>> {
    let deadline = tokio::time::Instant::now() + ACK_TIMEOUT;
    let mut seen = vec![false; n];
    let mut acks = Vec::with_capacity(n);
    while acks.len() < n {
        let event = match tokio::time::timeout_at(deadline, inbox.recv()).await {
            Ok(Some(e)) => e,
            Ok(None) => bail!("every subscriber is gone"),
            Err(_) => bail!(
                "after {}s only {} of {n} subscribers ACKed version {version}",
                ACK_TIMEOUT.as_secs(),
                acks.len()
            ),
        };
        match event {
            Event::Ack(a) if a.version == version => {
                if std::mem::replace(&mut seen[a.index], true) {
                    bail!("subscriber {} got version {version} twice", a.index);
                }
                acks.push(AckTime {
                    acked: a.acked.saturating_duration_since(t0),
                    bytes: a.bytes,
                });
            }
            Event::Ack(a) => bail!(
                "subscriber {} ACKed version {} while waiting for {version}",
                a.index,
                a.version
            ),
            Event::Ended(i, Ok(())) => bail!("subscriber {i}: the control plane ended the stream"),
            Event::Ended(i, Err(e)) => bail!("subscriber {i}: {e:#}"),
        }
    }
    Ok(acks)
}

/// `VmRSS` and `VmHWM` of a process, KiB.
#[derive(Clone, Copy)]
struct Memory {
    rss: u64,
    hwm: u64,
}

impl Memory {
    fn of(pid: u32) -> Option<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| -> Option<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        };
        Some(Memory {
            rss: field("VmRSS:")?,
            hwm: field("VmHWM:")?,
        })
    }
}

/// User plus system CPU time of a process, all threads.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (in parentheses, which may hold spaces): the
    // state, then fields 4 onward; utime and stime are fields 14 and 15.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_secs_f64((utime + stime) as f64 / USER_HZ))
}

/// Starts the bench build's `pylon-control serve` on a free loopback port,
/// logging warnings and the line that reports its address, and waits until
/// it has logged it. Blocking.
fn spawn_control(data_dir: &Path) -> anyhow::Result<ControlProc> {
    let bin = env!("CARGO_BIN_EXE_pylon-control");
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen", "127.0.0.1:0"])
        .env("PYLON_LOG", "warn,pylon_control::cli=info");
    ControlProc::try_spawn_command(bin, cmd, data_dir)
}

/// The nearest-rank `p`th percentile of `values` (not empty).
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// p50, p99 and max of `values`.
fn summary(values: &[Duration]) -> [Duration; 3] {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    if sorted.is_empty() {
        return [Duration::ZERO; 3];
    }
    [
        percentile(&sorted, 50.0),
        percentile(&sorted, 99.0),
        sorted[sorted.len() - 1],
    ]
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn print_results(settings: &Settings, m: &Measured) {
    let cpus = std::thread::available_parallelism().map_or(0, NonZeroUsize::get);
    let n = settings.subscribers.get();
    println!();
    println!("pylon fan-out benchmark: policy Apply → every subscriber's ACK, {cpus} CPUs");
    println!(
        "  subscribers N = {n} (one TLS connection and StreamPolicy stream each), applies M = {}",
        settings.applies
    );
    println!(
        "  snapshot {} bytes of YAML ({BACKENDS} Backends, 1 HTTPRoute); control plane pid {}",
        m.snapshot_bytes, m.pid
    );
    println!(
        "  setup: {n} CreateToken calls in {:.3} s; {n} subscribers connected and ACKed in {:.3} s",
        m.tokens.as_secs_f64(),
        m.connect.as_secs_f64()
    );
    println!();
    println!(
        "  {:<32} {:>9} {:>9} {:>9}",
        "per apply (ms)", "p50", "p99", "max"
    );
    let rows: [(String, &[Duration]); 4] = [
        ("Apply RPC".into(), &m.apply_rpc),
        ("apply → first ACK".into(), &m.first_ack),
        ("apply → last ACK".into(), &m.last_ack),
        (
            format!("apply → each ACK ({})", m.each_ack.len()),
            &m.each_ack,
        ),
    ];
    for (label, values) in &rows {
        let [p50, p99, max] = summary(values);
        println!(
            "  {:<32} {:>9} {:>9} {:>9}",
            label,
            ms(p50),
            ms(p99),
            ms(max)
        );
    }
    println!(
        "  Status showed all {n} ACKs of every apply, at most {} ms after the last one was sent",
        ms(m.status_lag)
    );
    let secs = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{:.2} s", d.as_secs_f64()));
    println!(
        "  CPU during the {} applies ({:.2} s wall, Status polls included): pylon-control {}, subscribers {}",
        settings.applies,
        m.applies_wall.as_secs_f64(),
        secs(m.control_cpu),
        secs(m.bench_cpu)
    );
    println!();
    println!(
        "  {:<32} {:>11} {:>11}",
        "pylon-control memory", "VmRSS", "VmHWM"
    );
    for (label, memory) in &m.memory {
        match memory {
            Some(mem) => println!("  {:<32} {:>11} {:>11}", label, mib(mem.rss), mib(mem.hwm)),
            None => println!("  {label:<32} {:>11} {:>11}", "-", "-"),
        }
    }
    println!();
    let [_, p99, _] = summary(&m.last_ack);
    let verdict = if p99 <= TARGET { "MET" } else { "NOT MET" };
    let scope = if n == TARGET_SUBSCRIBERS {
        String::new()
    } else {
        format!(" (this run had {n} subscribers, so it does not settle it)")
    };
    println!(
        "target: apply → last ACK p99 ≤ {} s at {TARGET_SUBSCRIBERS} subscribers: {verdict}, p99 {} ms{scope}",
        TARGET.as_secs(),
        ms(p99)
    );
}
