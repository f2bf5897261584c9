//! The policy-scale benchmark: what a policy of 10 to 10,000 routes costs to
//! install and to route by, in one run.
//!
//! For each size N (routes), a policy of N routes (GRPCRoutes and
//! HTTPRoutes, one hostname each, four rules with method, path and header
//! matches) over max(N/10, 1) Backends (three static endpoints each, mTLS to
//! their own SPIFFE identity), built as model resources and written by the
//! model's writer. One route in ten has a wildcard hostname
//! (`*.tenant-<i>.example.com`).
//!
//! - **install**: `PolicyStore::apply` (parse + compile + swap) into a new
//!   store (first apply: every Backend, TLS config and metric series is new)
//!   and into a store that already holds the same policy (the reload case:
//!   Backends, TLS configs and series reused); and the same two without the
//!   parse — `PolicyStore::install`: compile, the Backend updates and the
//!   swap — on resources parsed beforehand. Medians of
//!   `PYLON_SCALE_ROUNDS` rounds.
//! - **routing**: nanoseconds per `store.load().routes.find(..)` over
//!   random requests: hits on exact hostnames (the rule found after a
//!   scan of the host's rules), hits on wildcard hostnames, and misses (an
//!   authority no route names). Medians of the rounds.
//!
//! It prints a table per part, the 10,000 : 10 ratios and whether the
//! target (compile + swap of 10,000 routes ≤ 50 ms) is met. Settings come
//! from the environment (see `benches/README.md`).

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, Method};
use pylon::config::DnsConfig;
use pylon::discovery::Dns;
use pylon::identity::IdentityStore;
use pylon::identity::dev::DevCa;
use pylon::policy::PolicyStore;
use pylon::policy::routing::{ClusterDns, RequestView};
use pylon::telemetry::metrics::Metrics;
use pylon_proto::policy::{
    BackendRef, Backoff, GrpcCode, GrpcMethodMatch, GrpcRouteMatch, HeaderMatch, HttpRouteMatch,
    Metadata, PathMatch, Resource, Retry, RetryOn, RouteRule, RouteSpec, Spec, Timeouts,
};
use pylon_test_support::policy::{backend, yaml};

/// The sidecar's allocator (ADR 18): compiling a policy is mostly
/// allocation, and glibc's malloc would measure another program.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const TARGET: Duration = Duration::from_millis(50);
const OWN_ID: &str = "spiffe://pylon.local/ns/default/sa/client";

fn env_or<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} does not parse")),
        Err(_) => default,
    }
}

struct Settings {
    sizes: Vec<usize>,
    rounds: usize,
    /// `find` calls per case and round.
    finds: usize,
    /// Measure `PolicyStore::apply` (parse included); off, only compile +
    /// swap and routing are measured (the policy is parsed once).
    apply: bool,
}

impl Settings {
    fn from_env() -> Settings {
        let sizes: String = env_or("PYLON_SCALE_SIZES", "10,100,1000,10000".to_string());
        Settings {
            sizes: sizes
                .split(',')
                .map(|s| {
                    s.trim()
                        .parse()
                        .expect("PYLON_SCALE_SIZES: comma-separated numbers")
                })
                .collect(),
            rounds: env_or("PYLON_SCALE_ROUNDS", 7usize).max(1),
            finds: env_or("PYLON_SCALE_FINDS", 400_000usize).max(1),
            apply: env_or("PYLON_SCALE_APPLY", 1u8) != 0,
        }
    }
}

// ---------------------------------------------------------------- policy

fn backend_count(routes: usize) -> usize {
    (routes / 10).max(1)
}

fn is_wildcard(i: usize) -> bool {
    i % 10 == 9
}

fn is_grpc(i: usize) -> bool {
    i.is_multiple_of(2)
}

/// The route's hostname as written in the policy.
fn hostname(i: usize) -> String {
    if is_wildcard(i) {
        format!("*.tenant-{i}.example.com")
    } else {
        format!("svc-{i}.default.svc.cluster.local")
    }
}

fn backend_ref(b: usize, weight: u32) -> BackendRef {
    BackendRef {
        name: format!("backend-{b}"),
        namespace: None,
        weight,
    }
}

fn rule<M>(matches: Vec<M>, backend_refs: Vec<BackendRef>) -> RouteRule<M> {
    RouteRule {
        matches,
        backend_refs,
        timeouts: None,
        retry: None,
        fault_injection: None,
    }
}

fn canary() -> Vec<HeaderMatch> {
    vec![HeaderMatch {
        name: "x-canary".into(),
        value: "true".into(),
    }]
}

/// Route `i`: four rules over backends `b` and `b2`, the last a catch-all
/// split 90/10.
fn route(i: usize, backends: usize) -> Resource {
    let (b, b2) = (i % backends, (i + 1) % backends);
    let timeouts = Some(Timeouts {
        request: Some(Duration::from_secs(5)),
        backend_request: Some(Duration::from_secs(1)),
    });
    let retry = Some(Retry {
        attempts: 2,
        codes: vec![RetryOn::Grpc(GrpcCode::Unavailable), RetryOn::Http(503)],
        backoff: Some(Backoff {
            base: Duration::from_millis(25),
            max: Duration::from_millis(250),
        }),
    });
    let split = || vec![backend_ref(b, 90), backend_ref(b2, 10)];
    let hostnames = vec![hostname(i)];
    let spec = if is_grpc(i) {
        let service = format!("bench.v1.Svc{i}");
        let method = |m: Option<&str>, headers| GrpcRouteMatch {
            method: Some(GrpcMethodMatch {
                service: Some(service.clone()),
                method: m.map(Into::into),
            }),
            headers,
        };
        let mut rules = vec![
            rule(
                vec![method(Some("Get"), canary())],
                vec![backend_ref(b2, 1)],
            ),
            rule(vec![method(Some("Get"), vec![])], vec![backend_ref(b, 1)]),
            rule(vec![method(None, vec![])], vec![backend_ref(b, 1)]),
            rule(vec![], split()),
        ];
        rules[1].timeouts = timeouts;
        rules[2].retry = retry;
        Spec::GrpcRoute(RouteSpec {
            parent_refs: vec![],
            hostnames,
            rules,
        })
    } else {
        let http = |path: PathMatch, method: Option<&str>, headers| HttpRouteMatch {
            path: Some(path),
            method: method.map(Into::into),
            headers,
        };
        let mut rules = vec![
            rule(
                vec![http(
                    PathMatch::Exact("/healthz".into()),
                    Some("GET"),
                    vec![],
                )],
                vec![backend_ref(b, 1)],
            ),
            rule(
                vec![http(PathMatch::Prefix("/api/v1".into()), None, canary())],
                vec![backend_ref(b2, 1)],
            ),
            rule(
                vec![http(PathMatch::Prefix("/api".into()), Some("POST"), vec![])],
                vec![backend_ref(b, 1)],
            ),
            rule(vec![], split()),
        ];
        rules[2].timeouts = timeouts;
        rules[3].retry = retry;
        Spec::HttpRoute(RouteSpec {
            parent_refs: vec![],
            hostnames,
            rules,
        })
    };
    Resource {
        metadata: Metadata::new(format!("route-{i:05}")),
        spec,
    }
}

/// The policy of `n` routes as YAML.
fn policy(n: usize) -> String {
    let backends = backend_count(n);
    let mut resources = Vec::with_capacity(n + backends);
    for b in 0..backends {
        let endpoints: Vec<SocketAddr> = (1..=3)
            .map(|k| {
                format!("10.{}.{}.{k}:8080", b / 250, b % 250)
                    .parse()
                    .unwrap()
            })
            .collect();
        let id = format!("spiffe://pylon.local/ns/default/sa/backend-{b}");
        resources.push(backend(&format!("backend-{b}"), &endpoints, Some(&id)));
    }
    resources.extend((0..n).map(|i| route(i, backends)));
    yaml(&resources)
}

// ---------------------------------------------------------------- requests

/// A request to route, and the route that must take it (`None`: a miss).
struct Query {
    authority: String,
    path: String,
    method: Method,
    grpc: bool,
    want: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    /// Exact hostnames, 4096 requests over random routes among N.
    Exact,
    /// Exact hostnames, the 4096 requests over 16 random routes: the same
    /// working set at every N, so only the table's size changes.
    Hot,
    Wildcard,
    Miss,
}

const CASES: [(Case, &str); 4] = [
    (Case::Exact, "hit, exact host"),
    (Case::Hot, "hit, 16 hot hosts"),
    (Case::Wildcard, "hit, wildcard host"),
    (Case::Miss, "miss"),
];

/// 4096 random requests of `case` over a policy of `n` routes. gRPC calls
/// name their port (`:50051`, looked up as `host:port`, then `host`);
/// HTTP requests do not. Each hit is taken by the route's second-to-last
/// (gRPC: service-only) or last (HTTP: catch-all) rule, after the more
/// specific rules of its host were tried.
fn queries(case: Case, n: usize, rng: &mut fastrand::Rng) -> Vec<Query> {
    let pick = |rng: &mut fastrand::Rng| loop {
        let i = rng.usize(0..n);
        let wild = is_wildcard(i);
        if match case {
            Case::Exact | Case::Hot => !wild,
            Case::Wildcard => wild,
            Case::Miss => true,
        } {
            return i;
        }
    };
    let hot: Vec<usize> = (0..16).map(|_| pick(rng)).collect();
    (0..4096)
        .map(|k| {
            let i = if case == Case::Hot {
                hot[k % hot.len()]
            } else {
                pick(rng)
            };
            let grpc = is_grpc(i);
            let host = match case {
                Case::Exact | Case::Hot => hostname(i),
                Case::Wildcard => format!("api.tenant-{i}.example.com"),
                Case::Miss => format!("unknown-{i}.default.svc.cluster.local"),
            };
            let (authority, path, method) = if grpc {
                (
                    format!("{host}:50051"),
                    format!("/bench.v1.Svc{i}/List"),
                    Method::POST,
                )
            } else {
                (host, "/api/v1/items/42".to_string(), Method::GET)
            };
            let kind = if grpc { "GRPCRoute" } else { "HTTPRoute" };
            Query {
                authority,
                path,
                method,
                grpc,
                want: (case != Case::Miss).then(|| format!("{kind}/route-{i:05}")),
            }
        })
        .collect()
}

/// Checks that every query routes where it should (outside the timing).
fn check(current: &PolicyStore, queries: &[Query]) {
    let headers = HeaderMap::new();
    let snapshot = current.load();
    for q in queries {
        let found = snapshot
            .routes
            .find(Some(&q.authority), None, &view(q, &headers))
            .map(|r| r.route.to_string());
        assert_eq!(found, q.want, "{} {}", q.authority, q.path);
    }
}

fn view<'a>(q: &'a Query, headers: &'a HeaderMap) -> RequestView<'a> {
    RequestView {
        method: &q.method,
        path: &q.path,
        headers,
        grpc: q.grpc,
    }
}

/// Nanoseconds per `find` over `finds` calls cycling through `queries`.
fn time_finds(current: &PolicyStore, queries: &[Query], finds: usize) -> f64 {
    let headers = HeaderMap::new();
    let views: Vec<(&str, RequestView<'_>)> = queries
        .iter()
        .map(|q| (q.authority.as_str(), view(q, &headers)))
        .collect();
    let start = Instant::now();
    let mut found = 0usize;
    for k in 0..finds {
        let (authority, v) = &views[k % views.len()];
        let snapshot = current.load();
        if black_box(snapshot.routes.find(Some(black_box(authority)), None, v)).is_some() {
            found += 1;
        }
    }
    let elapsed = start.elapsed();
    black_box(found);
    elapsed.as_nanos() as f64 / finds as f64
}

// ---------------------------------------------------------------- install

struct Env {
    identity: Arc<IdentityStore>,
    dns: Arc<Dns>,
    cluster: ClusterDns,
}

impl Env {
    fn store(&self, metrics: &Arc<Metrics>) -> Arc<PolicyStore> {
        PolicyStore::new(
            self.identity.clone(),
            metrics.clone(),
            self.dns.clone(),
            self.cluster.clone(),
            "bench".into(),
        )
    }
}

/// Compiles `resources` against the snapshot in `store` and installs the
/// result: `PolicyStore::install`, what `PolicyStore::apply` does after
/// parsing (the Backend updates, the swap; the previous snapshot is dropped
/// on a blocking thread, off the timed one).
fn compile_and_swap(store: &PolicyStore, resources: Vec<Resource>, version: String) -> Timed {
    let start = Timed::start();
    store
        .install(resources, version)
        .unwrap_or_else(|e| panic!("the policy does not compile: {e:?}"));
    start.stop()
}

/// This thread's CPU time (`/proc/thread-self/schedstat`; the kernel brings
/// it up to date at each tick, so it may lag by one tick, ≤ 4 ms).
fn cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Wall-clock and CPU milliseconds of one measurement.
#[derive(Clone, Copy)]
struct Timed {
    wall: f64,
    cpu: f64,
}

struct Started(Instant, u64);

impl Timed {
    fn start() -> Started {
        Started(Instant::now(), cpu_ns())
    }
}

impl Started {
    fn stop(self) -> Timed {
        let wall = ms(self.0.elapsed());
        Timed {
            wall,
            cpu: cpu_ns().saturating_sub(self.1) as f64 / 1e6,
        }
    }
}

/// Medians of wall and CPU times (NaN when nothing was measured).
fn medians(xs: &[Timed]) -> Timed {
    if xs.is_empty() {
        return Timed {
            wall: f64::NAN,
            cpu: f64::NAN,
        };
    }
    Timed {
        wall: median(xs.iter().map(|t| t.wall).collect()),
        cpu: median(xs.iter().map(|t| t.cpu).collect()),
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Row {
    n: usize,
    backends: usize,
    yaml_kib: f64,
    entries: usize,
    parse: Timed,
    apply_first: Timed,
    apply_reload: Timed,
    compile_first: Timed,
    compile_reload: Timed,
    /// ns per find, by case.
    find: [f64; CASES.len()],
}

fn measure(env: &Env, n: usize, settings: &Settings) -> Row {
    let text = policy(n);
    let resources = pylon_proto::policy::parse(&text).expect("the policy parses");
    let mut parse = Vec::new();
    let (mut apply_first, mut apply_reload) = (Vec::new(), Vec::new());
    let (mut compile_first, mut compile_reload) = (Vec::new(), Vec::new());
    let mut version = 0u64;
    let mut next = || {
        version += 1;
        version.to_string()
    };
    let mut current = env.store(&Metrics::new());
    for _ in 0..settings.rounds {
        if settings.apply {
            // Parse alone.
            let start = Timed::start();
            black_box(pylon_proto::policy::parse(black_box(&text)).unwrap());
            parse.push(start.stop());

            // The whole apply, into a new store and again into the same one.
            let metrics = Metrics::new();
            let store = env.store(&metrics);
            let start = Timed::start();
            store.apply(&text, next()).unwrap();
            apply_first.push(start.stop());
            let start = Timed::start();
            store.apply(&text, next()).unwrap();
            apply_reload.push(start.stop());
        }

        // Compile + swap alone, on resources parsed beforehand: into an
        // empty snapshot with new metrics, then the same policy again.
        current = env.store(&Metrics::new());
        compile_first.push(compile_and_swap(&current, resources.clone(), next()));
        let again = resources.clone();
        compile_reload.push(compile_and_swap(&current, again, next()));
    }

    // Routing, on the last snapshot compiled.
    let entries = current.load().routes.describe().len();
    let mut rng = fastrand::Rng::with_seed(n as u64);
    let sets: Vec<Vec<Query>> = CASES
        .iter()
        .map(|(case, _)| queries(*case, n, &mut rng))
        .collect();
    for set in &sets {
        check(&current, set);
    }
    let mut find: [Vec<f64>; CASES.len()] = Default::default();
    for _ in 0..settings.rounds {
        for (k, set) in sets.iter().enumerate() {
            find[k].push(time_finds(&current, set, settings.finds));
        }
    }
    Row {
        n,
        backends: backend_count(n),
        yaml_kib: text.len() as f64 / 1024.0,
        entries,
        parse: medians(&parse),
        apply_first: medians(&apply_first),
        apply_reload: medians(&apply_reload),
        compile_first: medians(&compile_first),
        compile_reload: medians(&compile_reload),
        find: find.map(median),
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn main() {
    let settings = Settings::from_env();
    // Backends start their outlier sweeps on the current runtime, as in the
    // sidecar. Its worker runs them, and retires those of dropped Backends
    // (one runtime that nothing drove kept every aborted task queued, and
    // each round ran slower than the last).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let ca = DevCa::new("policy scale bench").unwrap();
    let env = Env {
        identity: ca.identity_store(OWN_ID, &[&ca]).unwrap(),
        // Static endpoints only: never asked.
        dns: Arc::new(
            Dns::new(&DnsConfig {
                nameservers: vec!["127.0.0.1:53".parse().unwrap()],
                ..DnsConfig::default()
            })
            .unwrap(),
        ),
        cluster: ClusterDns {
            namespace: Some("default".into()),
            domain: "cluster.local".into(),
        },
    };

    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    println!("pylon policy-scale benchmark, {cpus} CPUs");
    println!(
        "  sizes {:?} routes; {} rounds (medians); {} finds per case and round",
        settings.sizes, settings.rounds, settings.finds
    );
    println!("  load average (1, 5, 15 min) before: {}", load_average());
    let rows: Vec<Row> = settings
        .sizes
        .iter()
        .map(|&n| {
            let row = measure(&env, n, &settings);
            eprintln!("  measured {n} routes");
            row
        })
        .collect();

    println!();
    println!("install, ms (medians; wall / this thread's CPU)");
    println!(
        "  apply = PolicyStore::apply (parse + compile + swap); compile+swap = the same on parsed resources"
    );
    println!(
        "  first = into an empty store (new Backends, TLS configs, metric series); reload = the same policy again"
    );
    println!(
        "  {:>6} {:>8} {:>8} {:>8} {:>15} {:>15} {:>15} {:>15} {:>15}",
        "routes",
        "backends",
        "YAML KiB",
        "entries",
        "parse",
        "apply first",
        "apply reload",
        "c+s first",
        "c+s reload"
    );
    let pair = |t: Timed| format!("{:.1} / {:.1}", t.wall, t.cpu);
    for r in &rows {
        println!(
            "  {:>6} {:>8} {:>8.0} {:>8} {:>15} {:>15} {:>15} {:>15} {:>15}",
            r.n,
            r.backends,
            r.yaml_kib,
            r.entries,
            pair(r.parse),
            pair(r.apply_first),
            pair(r.apply_reload),
            pair(r.compile_first),
            pair(r.compile_reload)
        );
    }
    println!();
    println!("routing, ns per store.load().routes.find (medians)");
    print!("  {:>6}", "routes");
    for (_, label) in CASES {
        print!(" {label:>19}");
    }
    println!();
    for r in &rows {
        print!("  {:>6}", r.n);
        for f in r.find {
            print!(" {f:>19.1}");
        }
        println!();
    }

    if let (Some(small), Some(large)) = (rows.first(), rows.last())
        && large.n > small.n
    {
        println!();
        println!(
            "{} routes vs {} routes ({}× the routes), wall-clock medians",
            large.n,
            small.n,
            large.n / small.n
        );
        println!(
            "  install  apply first {:.0}×, apply reload {:.0}×, compile+swap first {:.0}×, reload {:.0}×",
            large.apply_first.wall / small.apply_first.wall,
            large.apply_reload.wall / small.apply_reload.wall,
            large.compile_first.wall / small.compile_first.wall,
            large.compile_reload.wall / small.compile_reload.wall,
        );
        for (k, (_, label)) in CASES.iter().enumerate() {
            println!(
                "  find     {label:<20} {:.2}×",
                large.find[k] / small.find[k]
            );
        }
    }

    println!();
    let target = ms(TARGET);
    if let Some(r) = rows.iter().find(|r| r.n == 10_000) {
        let verdict = |t: Timed| {
            let says = |ms: f64| if ms <= target { "met" } else { "missed" };
            if t.wall.is_nan() {
                "not measured".to_string()
            } else {
                format!(
                    "{:.1} ms wall {}, {:.1} ms CPU {}",
                    t.wall,
                    says(t.wall),
                    t.cpu,
                    says(t.cpu)
                )
            }
        };
        println!("target: compile + swap of 10000 routes ≤ {target} ms");
        println!("  first apply   compile+swap {}", verdict(r.compile_first));
        println!("  reload        compile+swap {}", verdict(r.compile_reload));
        println!(
            "  whole apply (parse included): first {}; reload {}",
            verdict(r.apply_first),
            verdict(r.apply_reload)
        );
    } else {
        println!(
            "target: compile + swap of 10000 routes ≤ {target} ms: not measured (10000 not in PYLON_SCALE_SIZES)"
        );
    }
    println!("load average (1, 5, 15 min) after: {}", load_average());
}
