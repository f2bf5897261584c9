//! Bootstrap configuration: `pylon.yaml`, overridden key by key from the
//! environment, validated once at start.
//!
//! Every key has an environment name made from its path
//! (`identity.files.trustBundle` → `PYLON_IDENTITY_FILES_TRUST_BUNDLE`), so an
//! injected container needs no file. Validation reports every problem at once.
//! Relative paths in the file are resolved against the file's directory,
//! relative paths from the environment against the working directory.
//!
//! Not here: policy (see `policy`), which is data streamed or watched at run
//! time rather than read once.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use pylon_proto::policy::{format_duration, parse_duration};
use serde_json::Value;

use crate::probes::AppProbes;

/// Every key the bootstrap file may hold, and how to read it.
const KEYS: &[(&str, KeyKind)] = &[
    ("admin.listen", KeyKind::Addr),
    ("admin.probeListen", KeyKind::Addr),
    ("admin.maxConnections", KeyKind::Count),
    ("outbound.listen", KeyKind::Addr),
    ("outbound.allowNonLoopback", KeyKind::Bool),
    ("outbound.maxConnections", KeyKind::Count),
    ("outbound.retryBufferBytes", KeyKind::Bytes),
    ("outbound.unmatched", KeyKind::Text),
    ("outbound.detectTimeout", KeyKind::Duration),
    ("outbound.serverFirstPorts", KeyKind::List),
    ("inbound.listen", KeyKind::Addr),
    ("inbound.app", KeyKind::Addr),
    ("inbound.mode", KeyKind::Text),
    ("inbound.maxConnections", KeyKind::Count),
    ("inbound.maxConcurrentHandshakes", KeyKind::Count),
    ("inbound.handshakeTimeout", KeyKind::Duration),
    ("inbound.appMaxConnections", KeyKind::Count),
    ("inbound.appMaxRequests", KeyKind::Count),
    ("connections.firstBytesTimeout", KeyKind::Duration),
    ("connections.headerReadTimeout", KeyKind::Duration),
    ("connections.bodyReadTimeout", KeyKind::Duration),
    ("connections.idleTimeout", KeyKind::Duration),
    ("connections.maxAge", KeyKind::Duration),
    ("connections.maxAgeGrace", KeyKind::Duration),
    ("connections.tcpKeepalive", KeyKind::Duration),
    ("connections.maxConcurrentStreams", KeyKind::Count),
    ("connections.maxPendingAcceptResetStreams", KeyKind::Count),
    ("connections.maxLocalErrorResetStreams", KeyKind::Count),
    ("connections.maxHeaderBytes", KeyKind::Count),
    ("headers.withUnderscores", KeyKind::Text),
    ("appProbes", KeyKind::Json),
    ("drainTimeout", KeyKind::Duration),
    ("workers", KeyKind::Count),
    ("kubernetes.podName", KeyKind::Text),
    ("kubernetes.namespace", KeyKind::Text),
    ("kubernetes.serviceAccount", KeyKind::Text),
    ("kubernetes.podIp", KeyKind::Text),
    ("kubernetes.clusterDomain", KeyKind::Text),
    ("identity.files.cert", KeyKind::Path),
    ("identity.files.key", KeyKind::Path),
    ("identity.files.trustBundle", KeyKind::Path),
    ("identity.controlPlane", KeyKind::Marker),
    ("identity.controlPlane.tokenFile", KeyKind::Path),
    ("policy.file", KeyKind::Path),
    ("policy.controlPlane", KeyKind::Marker),
    ("policy.maxBytes", KeyKind::Bytes),
    ("controlPlane.address", KeyKind::Text),
    ("controlPlane.caFile", KeyKind::Path),
    ("controlPlane.tokenFile", KeyKind::Path),
    ("controlPlane.allowReadableTokenFile", KeyKind::Bool),
    ("telemetry.serviceName", KeyKind::Text),
    ("telemetry.otlp.endpoint", KeyKind::Text),
    ("telemetry.sampling", KeyKind::Ratio),
    ("telemetry.accessLog", KeyKind::Bool),
    ("telemetry.logFormat", KeyKind::Text),
    ("telemetry.externalSampling", KeyKind::Text),
    ("telemetry.otlp.metricsInterval", KeyKind::Duration),
    ("stateDir", KeyKind::Path),
    ("dns.nameservers", KeyKind::List),
    ("dns.searchDomains", KeyKind::List),
    ("dns.minTtl", KeyKind::Duration),
    ("dns.maxTtl", KeyKind::Duration),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Addr,
    Path,
    Text,
    Ratio,
    /// An object whose presence is the setting (`policy.controlPlane: {}`).
    Marker,
    /// A YAML list of strings, or one comma-separated string (the only way
    /// the environment can spell a list).
    List,
    /// `5s`, `1m30s`, `250ms`: the policy duration syntax.
    Duration,
    /// A whole number of bytes.
    Bytes,
    /// A whole number (a count of connections, streams, ...).
    Count,
    /// `true` or `false`.
    Bool,
    /// A structured value: a mapping in the file, JSON text in the
    /// environment (`appProbes`).
    Json,
}

/// The validated bootstrap configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub admin: AdminConfig,
    pub outbound: OutboundConfig,
    pub inbound: InboundConfig,
    pub identity: IdentitySource,
    pub policy: PolicySource,
    /// The largest policy the sidecar accepts, from a file or the control
    /// plane (a larger one is refused: rejected or NACKed).
    pub policy_max_bytes: usize,
    pub telemetry: Option<TelemetryConfig>,
    /// `telemetry.logFormat`: text (default) or json.
    pub log_format: LogFormat,
    /// `telemetry.otlp.metricsInterval`: how often metrics are exported to
    /// `telemetry.otlp.endpoint`.
    pub otlp_metrics_interval: Duration,
    pub control_plane: Option<ControlPlaneConfig>,
    pub state_dir: Option<PathBuf>,
    /// Always present; the defaults when the file has no `dns` section.
    pub dns: DnsConfig,
    /// `drainTimeout`: how long in-flight calls may take to finish once a
    /// drain starts.
    pub drain_timeout: Duration,
    /// `appProbes`: the app's original Kubernetes probes, run by the probe
    /// listener's `/app-health/...`.
    pub app_probes: AppProbes,
    /// Where the pod is, from the downward API (informational: `/config`).
    pub kubernetes: KubernetesInfo,
    /// `connections.*`: how every listener treats the connections it
    /// accepts.
    pub connections: ConnectionSettings,
    /// `headers.withUnderscores`: what a request with an underscore in a
    /// header name gets, on both paths.
    pub headers_with_underscores: UnderscoreAction,
    /// `workers`: the sidecar's worker threads; one runs tokio's
    /// current-thread scheduler. Unset: `TOKIO_WORKER_THREADS`, else the
    /// CPUs the process may use.
    pub workers: Option<usize>,
}

pub use pylon_proto::MAX_WORKERS;

/// `connections.*`: the limits every listener (outbound, inbound, admin,
/// probe) applies to each connection it accepts. A duration of `0s` turns
/// the body read timeout, the idle timeout, the maximum age or TCP
/// keepalive off; the other timeouts must be positive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionSettings {
    /// From accept (after the TLS handshake on inbound) until a complete
    /// HTTP/1 request head or the HTTP/2 preface and its first frame
    /// header; a client that sends less is closed.
    pub first_bytes_timeout: Duration,
    /// How long an HTTP/1 request head may take once the connection waits
    /// for one (hyper's `header_read_timeout`).
    pub header_read_timeout: Duration,
    /// The longest gap between the frames of a request body while the
    /// proxy waits for it (`http::request_body`); a request whose body
    /// stalls longer is cut off. `None` (`0s`) turns it off.
    pub body_read_timeout: Option<Duration>,
    /// A connection with no request in flight this long is closed
    /// gracefully (HTTP/2 GOAWAY).
    pub idle_timeout: Option<Duration>,
    /// A connection this old is told to go away (HTTP/2 GOAWAY, HTTP/1
    /// `connection: close` after the request in flight) ...
    pub max_age: Option<Duration>,
    /// ... and closed this long after that if calls are still open.
    pub max_age_grace: Duration,
    /// TCP keepalive on accepted sockets: idle time before the first probe.
    pub tcp_keepalive: Option<Duration>,
    /// HTTP/2 streams a client may have open on one connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 streams a client may reset before the server accepted them
    /// (rapid reset) before the connection gets GOAWAY ENHANCE_YOUR_CALM.
    pub max_pending_accept_reset_streams: usize,
    /// HTTP/2 streams the server may have to reset for the client's
    /// protocol errors (MadeYouReset) before GOAWAY.
    pub max_local_error_reset_streams: usize,
    /// The largest request head: HTTP/2 `SETTINGS_MAX_HEADER_LIST_SIZE`,
    /// and the HTTP/1 read buffer a request head must fit in.
    pub max_header_bytes: u32,
}

impl ConnectionSettings {
    pub const DEFAULT_FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
    pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
    pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(3600);
    pub const DEFAULT_MAX_AGE_GRACE: Duration = Duration::from_secs(300);
    pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(60);
    pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 1024;
    pub const DEFAULT_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 100;
    pub const DEFAULT_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 256;
    pub const DEFAULT_MAX_HEADER_BYTES: u32 = 64 * 1024;
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        ConnectionSettings {
            first_bytes_timeout: Self::DEFAULT_FIRST_BYTES_TIMEOUT,
            header_read_timeout: Self::DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: Some(Self::DEFAULT_BODY_READ_TIMEOUT),
            idle_timeout: Some(Self::DEFAULT_IDLE_TIMEOUT),
            max_age: Some(Self::DEFAULT_MAX_AGE),
            max_age_grace: Self::DEFAULT_MAX_AGE_GRACE,
            tcp_keepalive: Some(Self::DEFAULT_TCP_KEEPALIVE),
            max_concurrent_streams: Self::DEFAULT_MAX_CONCURRENT_STREAMS,
            max_pending_accept_reset_streams: Self::DEFAULT_MAX_PENDING_ACCEPT_RESET_STREAMS,
            max_local_error_reset_streams: Self::DEFAULT_MAX_LOCAL_ERROR_RESET_STREAMS,
            max_header_bytes: Self::DEFAULT_MAX_HEADER_BYTES,
        }
    }
}

/// `headers.withUnderscores`, as Envoy's `headers_with_underscores_action`:
/// CGI, WSGI, Rack and PHP apps read `x_a` and `x-a` as one variable, so a
/// caller could pass a header the sidecar strips under another spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnderscoreAction {
    /// The header is removed; the request goes on.
    #[default]
    Drop,
    /// The request is refused (HTTP 400, gRPC INTERNAL).
    Reject,
}

/// `telemetry.externalSampling`: what a `traceparent`'s sampled flag from
/// a caller outside the mesh (a plaintext caller of the inbound listener)
/// decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExternalSampling {
    /// Only a hint: the sidecar samples the trace by its own ratio.
    #[default]
    Ignore,
    /// Followed, like a mesh peer's.
    Follow,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// The read-only probe listener (the pod IP): `/live`, `/ready`,
    /// `/metrics`, `/app-health/...`.
    pub probe_listen: SocketAddr,
    /// `admin.maxConnections`: open connections on each of the admin and
    /// the probe listener.
    pub max_connections: u32,
}

/// The default of `admin.maxConnections`.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: u32 = 64;
/// The default of `outbound.maxConnections` and `inbound.maxConnections`.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 4096;
/// The default of `inbound.maxConcurrentHandshakes`.
pub const DEFAULT_MAX_CONCURRENT_HANDSHAKES: u32 = 256;
/// The default of `inbound.handshakeTimeout`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The default of `inbound.appMaxConnections`.
pub const DEFAULT_APP_MAX_CONNECTIONS: u32 = 1024;
/// The default of `inbound.appMaxRequests`.
pub const DEFAULT_APP_MAX_REQUESTS: u32 = 1024;
/// The largest value of a count key.
const MAX_COUNT: u64 = 1 << 20;

/// The default of `drainTimeout`.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct OutboundConfig {
    pub listen: SocketAddr,
    /// Request body bytes kept per call for replay by retries; a larger body
    /// is sent once and not retried.
    pub retry_buffer_bytes: usize,
    /// `outbound.unmatched`: what happens to a redirected HTTP request no
    /// route matches.
    pub unmatched: Unmatched,
    /// `outbound.detectTimeout`: how long a redirected connection may stay
    /// silent before it is treated as opaque TCP (a server-first protocol).
    pub detect_timeout: Duration,
    /// `outbound.serverFirstPorts`: original destination ports passed
    /// through as TCP without waiting for the client to speak.
    pub server_first_ports: Vec<u16>,
    /// `outbound.maxConnections`: open connections from the app.
    pub max_connections: u32,
}

/// What a redirected HTTP request with no route gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unmatched {
    /// Sent on, unchanged, to its original destination.
    #[default]
    Passthrough,
    /// Refused with the proxy's `no-route` answer.
    Deny,
}

/// The default of `outbound.detectTimeout`.
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Well-known protocols whose server speaks first (SMTP, submission, MySQL,
/// 4444, PostgreSQL, Redis, Elasticsearch transport, memcached): the
/// default of `outbound.serverFirstPorts`, as Linkerd skips them.
pub const DEFAULT_SERVER_FIRST_PORTS: &[u16] = &[25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

/// `inbound.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InboundMode {
    /// Only mesh mTLS.
    #[default]
    Strict,
    /// Mesh mTLS, and plaintext from outside the mesh (no identity).
    Permissive,
}

/// The pod the sidecar serves, as the downward API tells it, and the
/// cluster it runs in.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<IpAddr>,
    /// The cluster's DNS domain (`cluster.local` unless the cluster was set
    /// up otherwise): Services are `name.namespace.svc.<clusterDomain>`.
    pub cluster_domain: String,
}

/// The default of `kubernetes.clusterDomain`.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

impl Default for KubernetesInfo {
    fn default() -> Self {
        KubernetesInfo {
            pod_name: None,
            namespace: None,
            service_account: None,
            pod_ip: None,
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.to_string(),
        }
    }
}

/// A cluster domain: dot-separated DNS labels, returned lowercase and
/// without a trailing dot.
fn cluster_domain(s: &str) -> Result<String, String> {
    let name = s.trim().strip_suffix('.').unwrap_or(s.trim());
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "{s:?} is not a DNS domain (dot-separated labels of letters, digits and inner hyphens)"
        ));
    }
    Ok(name.to_ascii_lowercase())
}

/// The default of `outbound.retryBufferBytes`.
pub const DEFAULT_RETRY_BUFFER_BYTES: usize = 64 * 1024;
/// The default and largest `policy.maxBytes`.
pub const MAX_POLICY_BYTES: u64 = 16 << 20;
/// The largest `outbound.retryBufferBytes`: every call in flight under a
/// retry policy may hold this much.
const MAX_RETRY_BUFFER_BYTES: u64 = 16 << 20;

#[derive(Debug, Clone)]
pub struct InboundConfig {
    pub listen: SocketAddr,
    /// Where the local application listens (for connections that were not
    /// redirected; a redirected one goes to `127.0.0.1:<original port>`).
    pub app: SocketAddr,
    pub mode: InboundMode,
    /// `inbound.maxConnections`: open connections from callers.
    pub max_connections: u32,
    /// `inbound.maxConcurrentHandshakes`: TLS handshakes under way at once;
    /// more wait (within the handshake timeout) for a turn.
    pub max_concurrent_handshakes: u32,
    /// `inbound.handshakeTimeout`: how long a caller may take to complete
    /// the TLS handshake (including any wait for a turn).
    pub handshake_timeout: Duration,
    /// `inbound.appMaxConnections`: open connections to the local app, per
    /// app port.
    pub app_max_connections: u32,
    /// `inbound.appMaxRequests`: calls in flight to the local app when no
    /// BackendTrafficPolicy sets `maxParallelRequests`.
    pub app_max_requests: u32,
}

#[derive(Debug, Clone)]
pub enum IdentitySource {
    Files {
        cert: PathBuf,
        key: PathBuf,
        trust_bundle: PathBuf,
    },
    /// Issued by the control plane from a CSR (`identity.controlPlane`),
    /// with this bootstrap token (`identity.controlPlane.tokenFile`, else
    /// `controlPlane.tokenFile`).
    ControlPlane { token_file: PathBuf },
}

#[derive(Debug, Clone)]
pub enum PolicySource {
    File(PathBuf),
    /// Streamed from the control plane (see [`ControlPlaneConfig`]).
    ControlPlane,
}

#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub service_name: Option<String>,
    pub otlp_endpoint: Option<String>,
    pub sampling: Option<f64>,
    /// One `pylon::access` log record per request (off by default).
    pub access_log: bool,
    /// `telemetry.externalSampling`.
    pub external_sampling: ExternalSampling,
}

#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    /// `https://host:port`.
    pub address: String,
    pub ca_file: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    /// `controlPlane.allowReadableTokenFile`: start even when a token file
    /// is readable by its group or by others (a Kubernetes projected token
    /// in a volume only the sidecar mounts is 0644 unless every container
    /// of the pod runs as one user).
    pub allow_readable_token_file: bool,
}

/// How backend hostnames are resolved (`dns.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Name servers to ask, port 53 unless given. Empty: the system
    /// configuration (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// Domains appended to names that are not fully qualified (no trailing
    /// dot). Empty: the system's search list when the system configuration
    /// is used, none otherwise.
    pub search_domains: Vec<String>,
    /// Floor of the re-resolution interval, whatever the record TTL says.
    pub min_ttl: Duration,
    /// Ceiling of the re-resolution interval, and of the failure backoff.
    pub max_ttl: Duration,
}

impl DnsConfig {
    pub const DEFAULT_MIN_TTL: Duration = Duration::from_secs(5);
    pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(300);
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            search_domains: Vec::new(),
            min_ttl: Self::DEFAULT_MIN_TTL,
            max_ttl: Self::DEFAULT_MAX_TTL,
        }
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problems):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The environment variable that overrides `key`.
pub fn env_name(key: &str) -> String {
    let mut out = String::from("PYLON");
    for segment in key.split('.') {
        out.push('_');
        for c in segment.chars() {
            if c.is_ascii_uppercase() {
                out.push('_');
            }
            out.push(c.to_ascii_uppercase());
        }
    }
    out
}

/// Where a raw value came from, so relative paths resolve correctly.
#[derive(Debug, Clone)]
enum Origin {
    File,
    Env(String),
}

impl Config {
    /// Reads `path` (if any), applies the process environment, validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigErrors> {
        let env: BTreeMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("PYLON_"))
            .collect();
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| ConfigErrors(vec![format!("{}: {e}", p.display())]))?;
                let base = p.parent().unwrap_or(Path::new("."));
                Config::from_parts(&text, base, &env)
            }
            None => Config::from_parts("", Path::new("."), &env),
        }
    }

    /// Parses `yaml`, overlays `env`, validates. Relative file paths resolve
    /// against `base`.
    pub fn from_parts(
        yaml: &str,
        base: &Path,
        env: &BTreeMap<String, String>,
    ) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        let mut raw: BTreeMap<String, (Value, Origin)> = BTreeMap::new();

        let doc: Value = if yaml.trim().is_empty() {
            Value::Null
        } else {
            serde_saphyr::from_str(yaml).map_err(|e| ConfigErrors(vec![format!("{e}")]))?
        };
        match doc {
            Value::Null => {}
            Value::Object(map) => flatten("", map, &mut raw),
            other => errors.push(format!(
                "the configuration must be a mapping, found {}",
                type_name(&other)
            )),
        }
        for (key, _) in KEYS {
            if let Some(v) = env.get(&env_name(key)) {
                raw.insert(
                    key.to_string(),
                    (Value::String(v.clone()), Origin::Env(env_name(key))),
                );
            }
        }

        let mut r = Reader {
            raw,
            base,
            errors: &mut errors,
        };
        let admin = AdminConfig {
            listen: r.addr("admin.listen", "127.0.0.1:15000"),
            probe_listen: r.addr("admin.probeListen", "0.0.0.0:15020"),
            max_connections: r.count("admin.maxConnections", DEFAULT_ADMIN_MAX_CONNECTIONS),
        };
        let unmatched = r.choice(
            "outbound.unmatched",
            &[
                ("passthrough", Unmatched::Passthrough),
                ("deny", Unmatched::Deny),
            ],
        );
        let server_first_ports = if r.raw.contains_key("outbound.serverFirstPorts") {
            r.list("outbound.serverFirstPorts", parse_port)
        } else {
            DEFAULT_SERVER_FIRST_PORTS.to_vec()
        };
        let allow_non_loopback = r.flag("outbound.allowNonLoopback");
        let outbound = OutboundConfig {
            listen: r.addr("outbound.listen", "127.0.0.1:15001"),
            max_connections: r.count("outbound.maxConnections", DEFAULT_MAX_CONNECTIONS),
            retry_buffer_bytes: r
                .bytes("outbound.retryBufferBytes", MAX_RETRY_BUFFER_BYTES)
                .unwrap_or(DEFAULT_RETRY_BUFFER_BYTES),
            unmatched,
            detect_timeout: r
                .duration("outbound.detectTimeout", DEFAULT_DETECT_TIMEOUT)
                .unwrap_or(DEFAULT_DETECT_TIMEOUT),
            server_first_ports,
        };
        let mode = r.choice(
            "inbound.mode",
            &[
                ("strict", InboundMode::Strict),
                ("permissive", InboundMode::Permissive),
            ],
        );
        let inbound = InboundConfig {
            listen: r.addr("inbound.listen", "0.0.0.0:15006"),
            app: r.addr("inbound.app", "127.0.0.1:8080"),
            mode,
            max_connections: r.count("inbound.maxConnections", DEFAULT_MAX_CONNECTIONS),
            max_concurrent_handshakes: r.count(
                "inbound.maxConcurrentHandshakes",
                DEFAULT_MAX_CONCURRENT_HANDSHAKES,
            ),
            handshake_timeout: r
                .positive_duration("inbound.handshakeTimeout", DEFAULT_HANDSHAKE_TIMEOUT),
            app_max_connections: r.count("inbound.appMaxConnections", DEFAULT_APP_MAX_CONNECTIONS),
            app_max_requests: r.count("inbound.appMaxRequests", DEFAULT_APP_MAX_REQUESTS),
        };
        if !outbound.listen.ip().is_loopback() && !allow_non_loopback {
            r.errors.push(format!(
                "outbound.listen: {} is not a loopback address: anyone who reaches it could send calls with this workload's identity (an open proxy); set outbound.allowNonLoopback: true if that is meant",
                outbound.listen
            ));
        }
        let connections = r.connections();
        let headers_with_underscores = r.choice(
            "headers.withUnderscores",
            &[
                ("drop", UnderscoreAction::Drop),
                ("reject", UnderscoreAction::Reject),
            ],
        );
        let drain_timeout = r
            .duration("drainTimeout", DEFAULT_DRAIN_TIMEOUT)
            .unwrap_or(DEFAULT_DRAIN_TIMEOUT);
        let workers = r.workers();
        let app_probes = match r.take("appProbes") {
            None => AppProbes::default(),
            Some((v, origin)) => {
                let parsed = match v {
                    Value::String(s) if s.trim().is_empty() => Ok(AppProbes::default()),
                    Value::String(s) => serde_json::from_str::<Value>(&s)
                        .map_err(|e| vec![format!("not JSON: {e}")])
                        .and_then(|v| AppProbes::from_json(&v)),
                    v => AppProbes::from_json(&v),
                };
                parsed.unwrap_or_else(|problems| {
                    for p in problems {
                        r.problem("appProbes", &origin, p);
                    }
                    AppProbes::default()
                })
            }
        };
        let pod_ip = r.string("kubernetes.podIp").and_then(|(s, origin)| {
            s.trim()
                .parse::<IpAddr>()
                .map_err(|_| {
                    r.problem(
                        "kubernetes.podIp",
                        &origin,
                        format!("{s:?} is not an IP address"),
                    );
                })
                .ok()
        });
        let cluster_domain = match r.string("kubernetes.clusterDomain") {
            None => DEFAULT_CLUSTER_DOMAIN.to_string(),
            Some((s, origin)) => cluster_domain(&s).unwrap_or_else(|e| {
                r.problem("kubernetes.clusterDomain", &origin, e);
                DEFAULT_CLUSTER_DOMAIN.to_string()
            }),
        };
        let kubernetes = KubernetesInfo {
            pod_name: r.text("kubernetes.podName"),
            namespace: r.text("kubernetes.namespace"),
            service_account: r.text("kubernetes.serviceAccount"),
            pod_ip,
            cluster_domain,
        };

        let cert = r.path("identity.files.cert");
        let key = r.path("identity.files.key");
        let bundle = r.path("identity.files.trustBundle");
        let cp_token = r.path("identity.controlPlane.tokenFile");
        let cp_marker = r.marker("identity.controlPlane");
        let mut identity = match (cert, key, bundle) {
            (Some(cert), Some(key), Some(trust_bundle)) => Some(IdentitySource::Files {
                cert,
                key,
                trust_bundle,
            }),
            (None, None, None) if cp_token.is_some() || cp_marker => {
                // The token may also sit in controlPlane.tokenFile; checked
                // below, with the rest of controlPlane.
                Some(IdentitySource::ControlPlane {
                    token_file: cp_token.clone().unwrap_or_default(),
                })
            }
            (None, None, None) => {
                r.errors.push(
                    "identity: required: set identity.files (cert, key, trustBundle) or identity.controlPlane".into(),
                );
                None
            }
            (c, k, b) => {
                for (name, v) in [
                    ("cert", c.is_none()),
                    ("key", k.is_none()),
                    ("trustBundle", b.is_none()),
                ] {
                    if v {
                        r.errors.push(format!(
                            "identity.files.{name}: required with the other identity.files keys"
                        ));
                    }
                }
                None
            }
        };

        let policy_file = r.path("policy.file");
        let policy_cp = r.marker("policy.controlPlane");
        let policy_max_bytes = r
            .bytes("policy.maxBytes", MAX_POLICY_BYTES)
            .unwrap_or(MAX_POLICY_BYTES as usize);
        let policy = match (policy_file, policy_cp) {
            (Some(_), true) => {
                r.errors.push(
                    "policy: set one of policy.file and policy.controlPlane, not both".into(),
                );
                None
            }
            (Some(file), false) => Some(PolicySource::File(file)),
            (None, true) => Some(PolicySource::ControlPlane),
            (None, false) => {
                r.errors
                    .push("policy: required: set policy.file or policy.controlPlane".into());
                None
            }
        };

        let control_plane = {
            let address = r.text("controlPlane.address");
            let ca_file = r.path("controlPlane.caFile");
            let token_file = r.path("controlPlane.tokenFile");
            let allow_readable_token_file = r.flag("controlPlane.allowReadableTokenFile");
            if let Some(a) = &address
                && let Err(e) = pylon_proto::client::host_port(a)
            {
                r.errors.push(format!("controlPlane.address: {e}"));
            }
            let identity_cp = matches!(identity, Some(IdentitySource::ControlPlane { .. }));
            if identity_cp {
                if address.is_none() {
                    r.errors
                        .push("controlPlane.address: required with identity.controlPlane".into());
                }
                if ca_file.is_none() {
                    r.errors.push(
                        "controlPlane.caFile: required with identity.controlPlane (the roots to verify the control plane with before the first certificate)".into(),
                    );
                }
                if cp_token.is_none() && token_file.is_none() {
                    r.errors.push(
                        "identity.controlPlane.tokenFile: required (or controlPlane.tokenFile): the workload's bootstrap token".into(),
                    );
                }
            } else if matches!(policy, Some(PolicySource::ControlPlane)) {
                if address.is_none() {
                    r.errors
                        .push("controlPlane.address: required with policy.controlPlane".into());
                }
                if token_file.is_none() {
                    r.errors.push(
                        "controlPlane.tokenFile: required with policy.controlPlane (the workload's bootstrap token)".into(),
                    );
                }
            }
            if identity_cp
                && cp_token.is_none()
                && let Some(t) = &token_file
                && let Some(IdentitySource::ControlPlane { token_file }) = identity.as_mut()
            {
                *token_file = t.clone();
            }
            (address.is_some() || ca_file.is_some() || token_file.is_some()).then_some(
                ControlPlaneConfig {
                    address: address.unwrap_or_default(),
                    ca_file,
                    token_file,
                    allow_readable_token_file,
                },
            )
        };
        let telemetry = {
            let service_name = r.text("telemetry.serviceName");
            let otlp_endpoint = r.text("telemetry.otlp.endpoint");
            let sampling = r.ratio("telemetry.sampling");
            let access_log = r.flag("telemetry.accessLog");
            let external_sampling = r.choice(
                "telemetry.externalSampling",
                &[
                    ("ignore", ExternalSampling::Ignore),
                    ("follow", ExternalSampling::Follow),
                ],
            );
            (service_name.is_some()
                || otlp_endpoint.is_some()
                || sampling.is_some()
                || access_log
                || external_sampling != ExternalSampling::default())
            .then_some(TelemetryConfig {
                service_name,
                otlp_endpoint,
                sampling,
                access_log,
                external_sampling,
            })
        };
        let log_format = r.log_format("telemetry.logFormat");
        let otlp_metrics_interval = r
            .duration("telemetry.otlp.metricsInterval", DEFAULT_METRICS_INTERVAL)
            .unwrap_or(DEFAULT_METRICS_INTERVAL);
        let state_dir = r.path("stateDir");
        let dns = r.dns();

        for key in r.raw.keys() {
            let known = KEYS
                .iter()
                .any(|(k, _)| k == key || k.starts_with(&format!("{key}.")));
            if !known {
                r.errors.push(format!("{key}: unknown key"));
            }
        }

        let listens = [
            ("admin.listen", admin.listen),
            ("admin.probeListen", admin.probe_listen),
            ("outbound.listen", outbound.listen),
            ("inbound.listen", inbound.listen),
        ];
        for (i, (a, addr_a)) in listens.iter().enumerate() {
            for (b, addr_b) in &listens[i + 1..] {
                if addr_a == addr_b && addr_a.port() != 0 {
                    errors.push(format!("{b}: {addr_b} is also {a}"));
                }
            }
        }

        match (identity, policy) {
            (Some(identity), Some(policy)) if errors.is_empty() => Ok(Config {
                admin,
                outbound,
                inbound,
                identity,
                policy,
                policy_max_bytes,
                telemetry,
                log_format,
                otlp_metrics_interval,
                control_plane,
                state_dir,
                dns,
                drain_timeout,
                app_probes,
                kubernetes,
                connections,
                headers_with_underscores,
                workers,
            }),
            _ => Err(ConfigErrors(errors)),
        }
    }
}

/// Pulls typed values out of the raw key map, consuming each key it reads
/// (what remains afterwards is unknown) and recording every problem.
struct Reader<'a> {
    raw: BTreeMap<String, (Value, Origin)>,
    base: &'a Path,
    errors: &'a mut Vec<String>,
}

impl Reader<'_> {
    fn take(&mut self, key: &str) -> Option<(Value, Origin)> {
        self.raw.remove(key)
    }

    fn problem(&mut self, key: &str, origin: &Origin, msg: impl fmt::Display) {
        match origin {
            Origin::File => self.errors.push(format!("{key}: {msg}")),
            Origin::Env(var) => self.errors.push(format!("{key} (from {var}): {msg}")),
        }
    }

    fn string(&mut self, key: &str) -> Option<(String, Origin)> {
        let (v, origin) = self.take(key)?;
        match v {
            Value::String(s) if !s.trim().is_empty() => Some((s, origin)),
            Value::String(_) => {
                self.problem(key, &origin, "must not be empty");
                None
            }
            other => {
                self.problem(
                    key,
                    &origin,
                    format!("expected a string, found {}", type_name(&other)),
                );
                None
            }
        }
    }

    fn addr(&mut self, key: &str, default: &str) -> SocketAddr {
        let fallback = default
            .parse()
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
        let Some((s, origin)) = self.string(key) else {
            return fallback;
        };
        match s.trim().parse() {
            Ok(a) => a,
            Err(_) => {
                self.problem(key, &origin, format!("{s:?} is not an ip:port address"));
                fallback
            }
        }
    }

    fn path(&mut self, key: &str) -> Option<PathBuf> {
        let (s, origin) = self.string(key)?;
        let p = PathBuf::from(s);
        Some(match origin {
            Origin::File if p.is_relative() => self.base.join(p),
            _ => p,
        })
    }

    fn log_format(&mut self, key: &str) -> LogFormat {
        let Some((s, origin)) = self.string(key) else {
            return LogFormat::default();
        };
        LogFormat::parse(&s).unwrap_or_else(|e| {
            self.problem(key, &origin, e);
            LogFormat::default()
        })
    }

    /// One of `choices` by name; the default when absent or after
    /// reporting a problem.
    fn choice<T: Copy + Default>(&mut self, key: &str, choices: &[(&str, T)]) -> T {
        let Some((s, origin)) = self.string(key) else {
            return T::default();
        };
        if let Some((_, v)) = choices.iter().find(|(name, _)| *name == s.trim()) {
            return *v;
        }
        let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
        self.problem(
            key,
            &origin,
            format!("expected {}, found {s:?}", names.join(" or ")),
        );
        T::default()
    }

    fn text(&mut self, key: &str) -> Option<String> {
        self.string(key).map(|(s, _)| s)
    }

    /// A whole number of bytes from 0 to `max`.
    fn bytes(&mut self, key: &str, max: u64) -> Option<usize> {
        let (v, origin) = self.take(key)?;
        let n = match &v {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        match n
            .filter(|n| *n <= max)
            .and_then(|n| usize::try_from(n).ok())
        {
            Some(n) => Some(n),
            None => {
                self.problem(
                    key,
                    &origin,
                    format!("expected a whole number of bytes from 0 to {max}, found {v}"),
                );
                None
            }
        }
    }

    /// `workers`: a whole number from 1 to [`MAX_WORKERS`], or nothing.
    fn workers(&mut self) -> Option<usize> {
        self.count_up_to("workers", MAX_WORKERS as u64)
    }

    /// A whole number from 1 to [`MAX_COUNT`], `default` when absent or
    /// after reporting a problem.
    fn count<T: TryFrom<u64>>(&mut self, key: &str, default: T) -> T {
        self.count_up_to(key, MAX_COUNT).unwrap_or(default)
    }

    /// A whole number from 1 to `max`; `None` when absent or after
    /// reporting a problem.
    fn count_up_to<T: TryFrom<u64>>(&mut self, key: &str, max: u64) -> Option<T> {
        let (v, origin) = self.take(key)?;
        let n = match &v {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        let n = n
            .filter(|n| (1..=max).contains(n))
            .and_then(|n| T::try_from(n).ok());
        if n.is_none() {
            self.problem(
                key,
                &origin,
                format!("expected a whole number from 1 to {max}, found {v}"),
            );
        }
        n
    }

    /// A duration that must not be zero.
    fn positive_duration(&mut self, key: &str, default: Duration) -> Duration {
        match self.duration(key, default) {
            Some(d) if d.is_zero() => {
                self.errors.push(format!("{key}: must be more than 0s"));
                default
            }
            Some(d) => d,
            None => default,
        }
    }

    /// A duration where `0s` means off.
    fn optional_duration(&mut self, key: &str, default: Duration) -> Option<Duration> {
        let d = self.duration(key, default).unwrap_or(default);
        (!d.is_zero()).then_some(d)
    }

    fn connections(&mut self) -> ConnectionSettings {
        type C = ConnectionSettings;
        ConnectionSettings {
            first_bytes_timeout: self.positive_duration(
                "connections.firstBytesTimeout",
                C::DEFAULT_FIRST_BYTES_TIMEOUT,
            ),
            header_read_timeout: self.positive_duration(
                "connections.headerReadTimeout",
                C::DEFAULT_HEADER_READ_TIMEOUT,
            ),
            body_read_timeout: self
                .optional_duration("connections.bodyReadTimeout", C::DEFAULT_BODY_READ_TIMEOUT),
            idle_timeout: self
                .optional_duration("connections.idleTimeout", C::DEFAULT_IDLE_TIMEOUT),
            max_age: self.optional_duration("connections.maxAge", C::DEFAULT_MAX_AGE),
            max_age_grace: self
                .duration("connections.maxAgeGrace", C::DEFAULT_MAX_AGE_GRACE)
                .unwrap_or(C::DEFAULT_MAX_AGE_GRACE),
            tcp_keepalive: self
                .optional_duration("connections.tcpKeepalive", C::DEFAULT_TCP_KEEPALIVE),
            max_concurrent_streams: self.count(
                "connections.maxConcurrentStreams",
                C::DEFAULT_MAX_CONCURRENT_STREAMS,
            ),
            max_pending_accept_reset_streams: self.count(
                "connections.maxPendingAcceptResetStreams",
                C::DEFAULT_MAX_PENDING_ACCEPT_RESET_STREAMS,
            ),
            max_local_error_reset_streams: self.count(
                "connections.maxLocalErrorResetStreams",
                C::DEFAULT_MAX_LOCAL_ERROR_RESET_STREAMS,
            ),
            max_header_bytes: self.count("connections.maxHeaderBytes", C::DEFAULT_MAX_HEADER_BYTES),
        }
    }

    fn flag(&mut self, key: &str) -> bool {
        let Some((v, origin)) = self.take(key) else {
            return false;
        };
        match &v {
            Value::Bool(b) => *b,
            Value::String(s) if s.trim().eq_ignore_ascii_case("true") => true,
            Value::String(s) if s.trim().eq_ignore_ascii_case("false") => false,
            _ => {
                self.problem(key, &origin, format!("expected true or false, found {v}"));
                false
            }
        }
    }

    fn ratio(&mut self, key: &str) -> Option<f64> {
        let (v, origin) = self.take(key)?;
        let n = match &v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        match n {
            Some(n) if (0.0..=1.0).contains(&n) => Some(n),
            _ => {
                self.problem(
                    key,
                    &origin,
                    format!("expected a number from 0 to 1, found {v}"),
                );
                None
            }
        }
    }

    /// A list of strings, each read with `parse`; problems are reported per
    /// item (`key[1]: ...`). Absent, null or an empty string is an empty list.
    fn list<T>(&mut self, key: &str, parse: impl Fn(&str) -> Result<T, String>) -> Vec<T> {
        let Some((v, origin)) = self.take(key) else {
            return Vec::new();
        };
        let items: Vec<Value> = match v {
            Value::Null => Vec::new(),
            Value::String(s) if s.trim().is_empty() => Vec::new(),
            Value::String(s) => s.split(',').map(|i| Value::String(i.into())).collect(),
            Value::Array(items) => items,
            other => {
                self.problem(
                    key,
                    &origin,
                    format!(
                        "expected a list or a comma-separated string, found {}",
                        type_name(&other)
                    ),
                );
                return Vec::new();
            }
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let item_key = format!("{key}[{i}]");
            match item {
                Value::String(s) if s.trim().is_empty() => {
                    self.problem(&item_key, &origin, "must not be empty");
                }
                Value::String(s) => match parse(s.trim()) {
                    Ok(t) => out.push(t),
                    Err(e) => self.problem(&item_key, &origin, e),
                },
                other => self.problem(
                    &item_key,
                    &origin,
                    format!("expected a string, found {}", type_name(&other)),
                ),
            }
        }
        out
    }

    /// A duration, `default` when absent; `None` after reporting a problem.
    fn duration(&mut self, key: &str, default: Duration) -> Option<Duration> {
        let Some((v, origin)) = self.take(key) else {
            return Some(default);
        };
        match v {
            Value::String(s) => match parse_duration(s.trim()) {
                Ok(d) => Some(d),
                Err(e) => {
                    self.problem(key, &origin, e);
                    None
                }
            },
            other => {
                self.problem(
                    key,
                    &origin,
                    format!(
                        "expected a duration such as 5s, found {}",
                        type_name(&other)
                    ),
                );
                None
            }
        }
    }

    fn dns(&mut self) -> DnsConfig {
        let nameservers = self.list("dns.nameservers", parse_nameserver);
        let search_domains = self.list("dns.searchDomains", parse_domain);
        let min_ttl = self.duration("dns.minTtl", DnsConfig::DEFAULT_MIN_TTL);
        let max_ttl = self.duration("dns.maxTtl", DnsConfig::DEFAULT_MAX_TTL);
        // Record TTLs are whole seconds; a floor below one second would turn
        // a zero TTL into a busy loop of queries.
        let min_ttl = min_ttl.filter(|&d| {
            let ok = d >= Duration::from_secs(1);
            if !ok {
                self.errors
                    .push(format!("dns.minTtl: {} is below 1s", format_duration(d)));
            }
            ok
        });
        if let (Some(min), Some(max)) = (min_ttl, max_ttl)
            && min > max
        {
            self.errors.push(format!(
                "dns.minTtl: {} is greater than dns.maxTtl ({})",
                format_duration(min),
                format_duration(max)
            ));
        }
        DnsConfig {
            nameservers,
            search_domains,
            min_ttl: min_ttl.unwrap_or(DnsConfig::DEFAULT_MIN_TTL),
            max_ttl: max_ttl.unwrap_or(DnsConfig::DEFAULT_MAX_TTL),
        }
    }

    fn marker(&mut self, key: &str) -> bool {
        let Some((v, origin)) = self.take(key) else {
            return false;
        };
        match v {
            Value::Object(m) if m.is_empty() => true,
            Value::Null => true,
            Value::Bool(b) => b,
            Value::String(s) if matches!(s.as_str(), "true" | "1" | "{}") => true,
            Value::String(s) if matches!(s.as_str(), "false" | "0" | "") => false,
            other => {
                self.problem(key, &origin, format!("expected {{}}, found {other}"));
                false
            }
        }
    }
}

fn flatten(
    prefix: &str,
    map: serde_json::Map<String, Value>,
    out: &mut BTreeMap<String, (Value, Origin)>,
) {
    for (k, v) in map {
        let key = if prefix.is_empty() {
            k
        } else {
            format!("{prefix}.{k}")
        };
        // A marker (`identity.controlPlane: {}`) is a leaf only when empty:
        // `identity.controlPlane: { tokenFile: … }` holds keys of its own.
        let is_leaf = KEYS
            .iter()
            .any(|(known, kind)| *known == key && *kind != KeyKind::Marker);
        match v {
            Value::Object(m) if !is_leaf && !m.is_empty() => flatten(&key, m, out),
            v => {
                out.insert(key, (v, Origin::File));
            }
        }
    }
}

/// A TCP port, 1 to 65535.
fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{s:?} is not a port (1-65535)")),
    }
}

/// `10.0.0.10`, `10.0.0.10:5353`, `::1`, `[::1]` or `[::1]:5353`; port 53
/// unless given.
fn parse_nameserver(s: &str) -> Result<SocketAddr, String> {
    let bare = s
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or(s);
    let addr = match (s.parse::<SocketAddr>(), bare.parse::<IpAddr>()) {
        (Ok(addr), _) => addr,
        (Err(_), Ok(ip)) => SocketAddr::new(ip, 53),
        (Err(_), Err(_)) => return Err(format!("{s:?} is not an ip or ip:port address")),
    };
    if addr.port() == 0 {
        return Err(format!("{s:?}: port must not be 0"));
    }
    Ok(addr)
}

/// A DNS domain name (letters, digits, `-` and `_`; labels of 1 to 63
/// characters; 253 at most); one trailing dot is allowed and kept.
fn parse_domain(s: &str) -> Result<String, String> {
    let bad = |why: &str| Err(format!("{s:?} is not a domain name: {why}"));
    let name = s.strip_suffix('.').unwrap_or(s);
    if name.len() > 253 {
        return bad("longer than 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return bad("empty label");
        }
        if label.len() > 63 {
            return bad("a label is longer than 63 characters");
        }
        if !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad("only letters, digits, '-' and '_' are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a label must not start or end with '-'");
        }
    }
    Ok(s.to_string())
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// How log records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (the `tracing-subscriber` default format).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields`.
    Json,
}

impl LogFormat {
    pub fn parse(s: &str) -> Result<LogFormat, String> {
        match s.trim() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("expected text or json, found {other:?}")),
        }
    }
}

/// The default of `telemetry.otlp.metricsInterval`.
pub const DEFAULT_METRICS_INTERVAL: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const GOOD: &str = "
admin: { listen: \"127.0.0.1:25000\" }
outbound: { listen: \"127.0.0.1:25001\" }
inbound: { listen: \"0.0.0.0:25006\", app: \"127.0.0.1:9090\" }
identity:
  files: { cert: id.pem, key: id.key, trustBundle: /etc/pylon/bundle.pem }
policy:
  file: policy.yaml
stateDir: /var/lib/pylon
";

    #[test]
    fn env_names_follow_the_key_path() {
        assert_eq!(env_name("admin.listen"), "PYLON_ADMIN_LISTEN");
        assert_eq!(env_name("inbound.app"), "PYLON_INBOUND_APP");
        assert_eq!(
            env_name("identity.files.trustBundle"),
            "PYLON_IDENTITY_FILES_TRUST_BUNDLE"
        );
        assert_eq!(env_name("stateDir"), "PYLON_STATE_DIR");
        assert_eq!(env_name("dns.searchDomains"), "PYLON_DNS_SEARCH_DOMAINS");
        assert_eq!(env_name("dns.minTtl"), "PYLON_DNS_MIN_TTL");
    }

    #[test]
    fn reads_every_key_and_resolves_relative_paths_against_the_file() {
        let c = Config::from_parts(GOOD, Path::new("/etc/pylon"), &env(&[])).unwrap();
        assert_eq!(c.admin.listen, "127.0.0.1:25000".parse().unwrap());
        assert_eq!(c.inbound.app, "127.0.0.1:9090".parse().unwrap());
        let IdentitySource::Files {
            cert, trust_bundle, ..
        } = &c.identity
        else {
            panic!("identity files")
        };
        assert_eq!(cert, Path::new("/etc/pylon/id.pem"));
        assert_eq!(trust_bundle, Path::new("/etc/pylon/bundle.pem"));
        let PolicySource::File(p) = &c.policy else {
            panic!("a policy file")
        };
        assert_eq!(p, Path::new("/etc/pylon/policy.yaml"));
        assert_eq!(c.state_dir.as_deref(), Some(Path::new("/var/lib/pylon")));
    }

    #[test]
    fn environment_overrides_the_file_and_needs_no_file() {
        let e = env(&[
            ("PYLON_INBOUND_APP", "127.0.0.1:7000"),
            ("PYLON_ADMIN_LISTEN", "127.0.0.1:7001"),
        ]);
        let c = Config::from_parts(GOOD, Path::new("/x"), &e).unwrap();
        assert_eq!(c.inbound.app, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(c.admin.listen, "127.0.0.1:7001".parse().unwrap());

        let e = env(&[
            ("PYLON_IDENTITY_FILES_CERT", "a.pem"),
            ("PYLON_IDENTITY_FILES_KEY", "a.key"),
            ("PYLON_IDENTITY_FILES_TRUST_BUNDLE", "b.pem"),
            ("PYLON_POLICY_FILE", "p.yaml"),
        ]);
        let c = Config::from_parts("", Path::new("/x"), &e).unwrap();
        assert_eq!(c.outbound.listen, "127.0.0.1:15001".parse().unwrap());
        assert_eq!(c.inbound.listen, "0.0.0.0:15006".parse().unwrap());
        let PolicySource::File(p) = &c.policy else {
            panic!("a policy file")
        };
        assert_eq!(p, Path::new("p.yaml"), "env paths stay relative to the cwd");
    }

    #[test]
    fn log_format_is_text_or_json_from_the_file_or_the_environment() {
        let c = Config::from_parts(GOOD, Path::new("/x"), &env(&[])).unwrap();
        assert_eq!(c.log_format, LogFormat::Text);
        let yaml = format!("{GOOD}telemetry: {{ logFormat: json }}\n");
        let c = Config::from_parts(&yaml, Path::new("/x"), &env(&[])).unwrap();
        assert_eq!(c.log_format, LogFormat::Json);
        let e = env(&[("PYLON_TELEMETRY_LOG_FORMAT", "text")]);
        let c = Config::from_parts(&yaml, Path::new("/x"), &e).unwrap();
        assert_eq!(c.log_format, LogFormat::Text);
        let e = env(&[("PYLON_TELEMETRY_LOG_FORMAT", "xml")]);
        let errors = Config::from_parts(GOOD, Path::new("/x"), &e).unwrap_err();
        assert_eq!(
            errors.0,
            vec![
                "telemetry.logFormat (from PYLON_TELEMETRY_LOG_FORMAT): expected text or json, found \"xml\""
                    .to_string()
            ]
        );
    }

    #[test]
    fn reports_every_problem_at_once() {
        let yaml = "
admin: { listen: nowhere }
outbound: { listen: 5 }
inbound: { app: \"127.0.0.1:99999\" }
identity:
  files: { cert: id.pem }
polcy: { file: x }
telemetry: { sampling: 2 }
";
        let e = env(&[("PYLON_ADMIN_LISTEN", "also-bad")]);
        let errs = Config::from_parts(yaml, Path::new("/x"), &e).unwrap_err().0;
        let expected = [
            "admin.listen (from PYLON_ADMIN_LISTEN): \"also-bad\" is not an ip:port address",
            "outbound.listen: expected a string, found a number",
            "inbound.app: \"127.0.0.1:99999\" is not an ip:port address",
            "identity.files.key: required with the other identity.files keys",
            "identity.files.trustBundle: required with the other identity.files keys",
            "policy: required: set policy.file or policy.controlPlane",
            "telemetry.sampling: expected a number from 0 to 1, found 2",
            "polcy.file: unknown key",
        ];
        for want in expected {
            assert!(
                errs.iter().any(|e| e == want),
                "missing {want:?} in {errs:#?}"
            );
        }
        assert_eq!(errs.len(), expected.len(), "{errs:#?}");
    }

    #[test]
    fn identity_from_the_control_plane_needs_its_address_roots_and_a_token() {
        let yaml = "
identity: { controlPlane: {} }
policy: { file: p.yaml }
";
        let errs = Config::from_parts(yaml, Path::new("/x"), &env(&[]))
            .unwrap_err()
            .0;
        assert_eq!(
            errs,
            vec![
                "controlPlane.address: required with identity.controlPlane",
                "controlPlane.caFile: required with identity.controlPlane (the roots to verify the control plane with before the first certificate)",
                "identity.controlPlane.tokenFile: required (or controlPlane.tokenFile): the workload's bootstrap token",
            ]
        );
        // The token from controlPlane.tokenFile.
        let yaml = "
identity: { controlPlane: {} }
policy: { controlPlane: {} }
controlPlane: { address: \"https://127.0.0.1:15010\", caFile: ca.pem, tokenFile: /run/t }
";
        let c = Config::from_parts(yaml, Path::new("/x"), &env(&[])).unwrap();
        let IdentitySource::ControlPlane { token_file } = &c.identity else {
            panic!("{:?}", c.identity)
        };
        assert_eq!(token_file, Path::new("/run/t"));
        // Its own tokenFile wins.
        let yaml = "
identity: { controlPlane: { tokenFile: /run/id } }
policy: { file: p.yaml }
controlPlane: { address: \"https://127.0.0.1:15010\", caFile: ca.pem, tokenFile: /run/t }
";
        let c = Config::from_parts(yaml, Path::new("/x"), &env(&[])).unwrap();
        let IdentitySource::ControlPlane { token_file } = &c.identity else {
            panic!("{:?}", c.identity)
        };
        assert_eq!(token_file, Path::new("/run/id"));
        // The environment alone.
        let e = env(&[
            ("PYLON_IDENTITY_CONTROL_PLANE", "true"),
            ("PYLON_POLICY_CONTROL_PLANE", "true"),
            ("PYLON_CONTROL_PLANE_ADDRESS", "https://127.0.0.1:15010"),
            ("PYLON_CONTROL_PLANE_CA_FILE", "/run/ca.pem"),
            ("PYLON_CONTROL_PLANE_TOKEN_FILE", "/run/t"),
        ]);
        let c = Config::from_parts("", Path::new("/x"), &e).unwrap();
        let IdentitySource::ControlPlane { token_file } = &c.identity else {
            panic!("{:?}", c.identity)
        };
        assert_eq!(token_file, Path::new("/run/t"));
    }

    #[test]
    fn policy_from_the_control_plane_needs_its_address_and_token() {
        let yaml = GOOD.replace("  file: policy.yaml", "  controlPlane: {}");
        let errs = Config::from_parts(&yaml, Path::new("/x"), &env(&[]))
            .unwrap_err()
            .0;
        assert_eq!(
            errs,
            vec![
                "controlPlane.address: required with policy.controlPlane",
                "controlPlane.tokenFile: required with policy.controlPlane (the workload's bootstrap token)",
            ]
        );
        let e = env(&[
            ("PYLON_CONTROL_PLANE_ADDRESS", "https://127.0.0.1:15010"),
            ("PYLON_CONTROL_PLANE_TOKEN_FILE", "/run/token"),
        ]);
        let c = Config::from_parts(&yaml, Path::new("/x"), &e).unwrap();
        assert!(matches!(c.policy, PolicySource::ControlPlane));
        let cp = c.control_plane.unwrap();
        assert_eq!(cp.address, "https://127.0.0.1:15010");
        assert_eq!(cp.token_file.as_deref(), Some(Path::new("/run/token")));
        let e = env(&[("PYLON_CONTROL_PLANE_ADDRESS", "ftp://x")]);
        let errs = Config::from_parts(GOOD, Path::new("/x"), &e).unwrap_err().0;
        assert_eq!(
            errs,
            vec!["controlPlane.address: \"ftp://x\" is not an https://host:port address"]
        );
    }

    #[test]
    fn the_retry_buffer_is_a_bounded_byte_count() {
        let c = Config::from_parts(GOOD, Path::new("/x"), &env(&[])).unwrap();
        assert_eq!(c.outbound.retry_buffer_bytes, DEFAULT_RETRY_BUFFER_BYTES);
        let yaml = GOOD.replace(
            "outbound: { listen: \"127.0.0.1:25001\" }",
            "outbound: { listen: \"127.0.0.1:25001\", retryBufferBytes: 1024 }",
        );
        let c = Config::from_parts(&yaml, Path::new("/x"), &env(&[])).unwrap();
        assert_eq!(c.outbound.retry_buffer_bytes, 1024);
        let e = env(&[("PYLON_OUTBOUND_RETRY_BUFFER_BYTES", "0")]);
        let c = Config::from_parts(GOOD, Path::new("/x"), &e).unwrap();
        assert_eq!(
            c.outbound.retry_buffer_bytes, 0,
            "0: no body is ever replayed"
        );
        let e = env(&[("PYLON_OUTBOUND_RETRY_BUFFER_BYTES", "lots")]);
        let errs = Config::from_parts(GOOD, Path::new("/x"), &e).unwrap_err().0;
        assert_eq!(
            errs,
            vec![
                "outbound.retryBufferBytes (from PYLON_OUTBOUND_RETRY_BUFFER_BYTES): expected a whole number of bytes from 0 to 16777216, found \"lots\""
            ]
        );
    }

    #[test]
    fn access_logs_are_off_unless_switched_on() {
        let c = Config::from_parts(GOOD, Path::new("/x"), &env(&[])).unwrap();
        assert!(c.telemetry.is_none_or(|t| !t.access_log));
        let yaml = format!("{GOOD}telemetry: {{ accessLog: true }}\n");
        let c = Config::from_parts(&yaml, Path::new("/x"), &env(&[])).unwrap();
        assert!(c.telemetry.unwrap().access_log);
        let e = env(&[("PYLON_TELEMETRY_ACCESS_LOG", "false")]);
        let c = Config::from_parts(&yaml, Path::new("/x"), &e).unwrap();
        assert!(c.telemetry.is_none_or(|t| !t.access_log));
        let e = env(&[("PYLON_TELEMETRY_ACCESS_LOG", "yes")]);
        let errs = Config::from_parts(GOOD, Path::new("/x"), &e).unwrap_err().0;
        assert_eq!(
            errs,
            [
                "telemetry.accessLog (from PYLON_TELEMETRY_ACCESS_LOG): expected true or false, found \"yes\""
            ]
        );
    }

    #[test]
    fn pod_keys_have_production_defaults() {
        let c = Config::from_parts(GOOD, Path::new("/x"), &env(&[])).unwrap();
        assert_eq!(c.admin.probe_listen, "0.0.0.0:15020".parse().unwrap());
        assert_eq!(c.inbound.mode, InboundMode::Strict);
        assert_eq!(c.outbound.unmatched, Unmatched::Passthrough);
        assert_eq!(c.outbound.detect_timeout, DEFAULT_DETECT_TIMEOUT);
        assert_eq!(c.outbound.server_first_ports, DEFAULT_SERVER_FIRST_PORTS);
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.workers, None);
        assert!(c.app_probes.is_empty());
        assert!(c.kubernetes.pod_ip.is_none());
        assert!(c.kubernetes.namespace.is_none());
        assert_eq!(c.kubernetes.cluster_domain, "cluster.local");
    }

    #[test]
    fn pod_keys_come_from_the_environment_as_injection_sets_them() {
        let e = env(&[
            ("PYLON_ADMIN_PROBE_LISTEN", "0.0.0.0:25020"),
            ("PYLON_INBOUND_MODE", "permissive"),
            ("PYLON_OUTBOUND_UNMATCHED", "deny"),
            ("PYLON_OUTBOUND_DETECT_TIMEOUT", "250ms"),
            ("PYLON_OUTBOUND_SERVER_FIRST_PORTS", "5432, 6379"),
            ("PYLON_DRAIN_TIMEOUT", "5s"),
            ("PYLON_WORKERS", "2"),
            (
                "PYLON_APP_PROBES",
                r#"{"app":{"readiness":{"httpGet":{"path":"/ready","port":8080}}}}"#,
            ),
            ("PYLON_KUBERNETES_POD_NAME", "web-7d9f"),
            ("PYLON_KUBERNETES_NAMESPACE", "shop"),
            ("PYLON_KUBERNETES_SERVICE_ACCOUNT", "web"),
            ("PYLON_KUBERNETES_POD_IP", "198.18.0.10"),
            ("PYLON_KUBERNETES_CLUSTER_DOMAIN", "Corp.Example."),
        ]);
        let c = Config::from_parts(GOOD, Path::new("/x"), &e).unwrap();
        assert_eq!(c.admin.probe_listen.port(), 25020);
        assert_eq!(c.inbound.mode, InboundMode::Permissive);
        assert_eq!(c.outbound.unmatched, Unmatched::Deny);
        assert_eq!(c.outbound.detect_timeout, Duration::from_millis(250));
        assert_eq!(c.outbound.server_first_ports, vec![5432, 6379]);
        assert_eq!(c.drain_timeout, Duration::from_secs(5));
        assert_eq!(c.workers, Some(2));
        assert!(
            c.app_probes
                .get("app", crate::probes::ProbeKind::Readiness)
                .is_some()
        );
        assert_eq!(c.kubernetes.namespace.as_deref(), Some("shop"));
        assert_eq!(c.kubernetes.pod_ip, Some("198.18.0.10".parse().unwrap()));
        assert_eq!(c.kubernetes.cluster_domain, "corp.example");
    }

    #[test]
    fn workers_come_from_the_file_within_bounds() {
        let c =
            Config::from_parts(&format!("{GOOD}workers: 3\n"), Path::new("/x"), &env(&[])).unwrap();
        assert_eq!(c.workers, Some(3));
        let errs = Config::from_parts(
            &format!("{GOOD}workers: 4096\n"),
            Path::new("/x"),
            &env(&[]),
        )
        .unwrap_err()
        .0;
        assert_eq!(
            errs,
            ["workers: expected a whole number from 1 to 1024, found 4096"]
        );
    }

    #[test]
    fn pod_keys_report_every_problem() {
        let e = env(&[
            ("PYLON_INBOUND_MODE", "lenient"),
            ("PYLON_OUTBOUND_UNMATCHED", "drop"),
            ("PYLON_OUTBOUND_SERVER_FIRST_PORTS", "5432,0,http"),
            ("PYLON_DRAIN_TIMEOUT", "soon"),
            ("PYLON_WORKERS", "0"),
            ("PYLON_APP_PROBES", "{not json"),
            ("PYLON_KUBERNETES_POD_IP", "pod"),
            ("PYLON_KUBERNETES_CLUSTER_DOMAIN", "cluster..local"),
        ]);
        let errs = Config::from_parts(GOOD, Path::new("/x"), &e).unwrap_err().0;
        for want in [
            "inbound.mode (from PYLON_INBOUND_MODE): expected strict or permissive",
            "outbound.unmatched (from PYLON_OUTBOUND_UNMATCHED): expected passthrough or deny",
            "outbound.serverFirstPorts[1] (from PYLON_OUTBOUND_SERVER_FIRST_PORTS)",
            "outbound.serverFirstPorts[2] (from PYLON_OUTBOUND_SERVER_FIRST_PORTS)",
            "drainTimeout (from PYLON_DRAIN_TIMEOUT)",
            "workers (from PYLON_WORKERS): expected a whole number from 1 to 1024, found \"0\"",
            "appProbes (from PYLON_APP_PROBES): not JSON",
            "kubernetes.podIp (from PYLON_KUBERNETES_POD_IP)",
            "kubernetes.clusterDomain (from PYLON_KUBERNETES_CLUSTER_DOMAIN): \"cluster..local\" is not a DNS domain",
        ] {
            assert!(
                errs.iter().any(|e| e.starts_with(want)),
                "{want}: {errs:#?}"
            );
        }
        assert_eq!(errs.len(), 9, "{errs:#?}");
    }

    #[test]
    fn limits_have_production_defaults() {
        let c = Config::from_parts(GOOD, Path::new("/x"), &env(&[])).unwrap();
        assert_eq!(c.connections, ConnectionSettings::default());
        assert_eq!(c.connections.first_bytes_timeout, Duration::from_secs(10));
        assert_eq!(c.connections.max_pending_accept_reset_streams, 100);
        assert_eq!(
            c.connections.body_read_timeout,
            Some(Duration::from_secs(30))
        );
        assert_eq!(c.admin.max_connections, 64);
        assert_eq!(c.outbound.max_connections, 4096);
        assert_eq!(c.inbound.max_connections, 4096);
        assert_eq!(c.inbound.max_concurrent_handshakes, 256);
        assert_eq!(c.inbound.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.inbound.app_max_connections, 1024);
        assert_eq!(c.inbound.app_max_requests, 1024);
        assert_eq!(c.headers_with_underscores, UnderscoreAction::Drop);
        assert!(c.telemetry.is_none());
    }

    #[test]
    fn limits_come_from_the_file_and_the_environment() {
        let yaml = format!(
            "{GOOD}connections: {{ firstBytesTimeout: 250ms, idleTimeout: 0s, maxConcurrentStreams: 8 }}
headers: {{ withUnderscores: reject }}
"
        );
        let e = env(&[
            ("PYLON_CONNECTIONS_MAX_AGE", "0s"),
            ("PYLON_CONNECTIONS_BODY_READ_TIMEOUT", "1500ms"),
            ("PYLON_CONNECTIONS_MAX_HEADER_BYTES", "16384"),
            ("PYLON_INBOUND_MAX_CONCURRENT_HANDSHAKES", "4"),
            ("PYLON_OUTBOUND_MAX_CONNECTIONS", "2"),
            ("PYLON_ADMIN_MAX_CONNECTIONS", "3"),
            ("PYLON_INBOUND_APP_MAX_REQUESTS", "5"),
            ("PYLON_TELEMETRY_EXTERNAL_SAMPLING", "follow"),
            ("PYLON_CONTROL_PLANE_ALLOW_READABLE_TOKEN_FILE", "true"),
            ("PYLON_CONTROL_PLANE_ADDRESS", "https://127.0.0.1:15010"),
        ]);
        let c = Config::from_parts(&yaml, Path::new("/x"), &e).unwrap();
        assert_eq!(
            c.connections.first_bytes_timeout,
            Duration::from_millis(250)
        );
        assert_eq!(c.connections.idle_timeout, None, "0s turns it off");
        assert_eq!(c.connections.max_age, None);
        assert_eq!(
            c.connections.body_read_timeout,
            Some(Duration::from_millis(1500))
        );
        assert_eq!(c.connections.max_concurrent_streams, 8);
        assert_eq!(c.connections.max_header_bytes, 16384);
        assert_eq!(c.inbound.max_concurrent_handshakes, 4);
        assert_eq!(c.outbound.max_connections, 2);
        assert_eq!(c.admin.max_connections, 3);
        assert_eq!(c.inbound.app_max_requests, 5);
        assert_eq!(c.headers_with_underscores, UnderscoreAction::Reject);
        assert_eq!(
            c.telemetry.unwrap().external_sampling,
            ExternalSampling::Follow
        );
        assert!(c.control_plane.unwrap().allow_readable_token_file);
    }

    #[test]
    fn limits_report_every_problem() {
        let e = env(&[
            ("PYLON_CONNECTIONS_FIRST_BYTES_TIMEOUT", "0s"),
            ("PYLON_CONNECTIONS_MAX_CONCURRENT_STREAMS", "0"),
            ("PYLON_INBOUND_MAX_CONNECTIONS", "many"),
            ("PYLON_HEADERS_WITH_UNDERSCORES", "allow"),
            ("PYLON_TELEMETRY_EXTERNAL_SAMPLING", "always"),
        ]);
        let errs = Config::from_parts(GOOD, Path::new("/x"), &e).unwrap_err().0;
        for want in [
            "connections.firstBytesTimeout: must be more than 0s",
            "connections.maxConcurrentStreams (from PYLON_CONNECTIONS_MAX_CONCURRENT_STREAMS): expected a whole number from 1 to 1048576",
            "inbound.maxConnections (from PYLON_INBOUND_MAX_CONNECTIONS): expected a whole number",
            "headers.withUnderscores (from PYLON_HEADERS_WITH_UNDERSCORES): expected drop or reject",
            "telemetry.externalSampling (from PYLON_TELEMETRY_EXTERNAL_SAMPLING): expected ignore or follow",
        ] {
            assert!(
                errs.iter().any(|e| e.starts_with(want)),
                "{want}: {errs:#?}"
            );
        }
        assert_eq!(errs.len(), 5, "{errs:#?}");
    }

    #[test]
    fn the_outbound_listener_stays_on_loopback_unless_allowed() {
        let yaml = GOOD.replace("127.0.0.1:25001", "0.0.0.0:25001");
        let errs = Config::from_parts(&yaml, Path::new("/x"), &env(&[]))
            .unwrap_err()
            .0;
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(
            errs[0].starts_with(
                "outbound.listen: 0.0.0.0:25001 is not a loopback address: anyone who reaches it could send calls with this workload's identity"
            ),
            "{errs:#?}"
        );
        let e = env(&[("PYLON_OUTBOUND_ALLOW_NON_LOOPBACK", "true")]);
        let c = Config::from_parts(&yaml, Path::new("/x"), &e).unwrap();
        assert_eq!(c.outbound.listen, "0.0.0.0:25001".parse().unwrap());
        let e = env(&[("PYLON_OUTBOUND_LISTEN", "[::1]:15001")]);
        assert!(Config::from_parts(GOOD, Path::new("/x"), &e).is_ok());
    }

    #[test]
    fn listeners_must_not_collide() {
        let yaml = GOOD.replace("25001", "25000");
        let errs = Config::from_parts(&yaml, Path::new("/x"), &env(&[]))
            .unwrap_err()
            .0;
        assert_eq!(
            errs,
            vec!["outbound.listen: 127.0.0.1:25000 is also admin.listen"]
        );
    }

    #[test]
    fn dns_defaults_when_the_section_is_absent() {
        let c = Config::from_parts(GOOD, Path::new("/x"), &env(&[])).unwrap();
        assert_eq!(c.dns, DnsConfig::default());
        assert!(
            c.dns.nameservers.is_empty(),
            "empty means the system resolver"
        );
        assert_eq!(c.dns.min_ttl, Duration::from_secs(5));
        assert_eq!(c.dns.max_ttl, Duration::from_secs(300));
    }

    #[test]
    fn dns_section_reads_lists_and_durations() {
        let yaml = format!(
            "{GOOD}
dns:
  nameservers: [\"10.0.0.10\", \"127.0.0.1:5353\", \"::1\", \"[fd00::1]:5300\", \"[fd00::2]\"]
  searchDomains: [default.svc.cluster.local, svc.cluster.local.]
  minTtl: 1s
  maxTtl: 1m30s
"
        );
        let c = Config::from_parts(&yaml, Path::new("/x"), &env(&[])).unwrap();
        let want: Vec<SocketAddr> = [
            "10.0.0.10:53",
            "127.0.0.1:5353",
            "[::1]:53",
            "[fd00::1]:5300",
            "[fd00::2]:53",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        assert_eq!(c.dns.nameservers, want);
        assert_eq!(
            c.dns.search_domains,
            ["default.svc.cluster.local", "svc.cluster.local."]
        );
        assert_eq!(c.dns.min_ttl, Duration::from_secs(1));
        assert_eq!(c.dns.max_ttl, Duration::from_secs(90));

        // A comma-separated string is a list in the file too.
        let yaml = format!("{GOOD}\ndns: {{ searchDomains: \"a.example, b.example\" }}\n");
        let c = Config::from_parts(&yaml, Path::new("/x"), &env(&[])).unwrap();
        assert_eq!(c.dns.search_domains, ["a.example", "b.example"]);
    }

    #[test]
    fn dns_lists_come_from_the_environment_comma_separated() {
        let yaml = format!("{GOOD}\ndns: {{ nameservers: [\"10.9.9.9\"], maxTtl: 60s }}\n");
        let e = env(&[
            ("PYLON_DNS_NAMESERVERS", "127.0.0.1:5353, 10.0.0.10"),
            (
                "PYLON_DNS_SEARCH_DOMAINS",
                "svc.cluster.local,cluster.local",
            ),
            ("PYLON_DNS_MIN_TTL", "2s"),
        ]);
        let c = Config::from_parts(&yaml, Path::new("/x"), &e).unwrap();
        assert_eq!(
            c.dns.nameservers,
            [
                "127.0.0.1:5353".parse::<SocketAddr>().unwrap(),
                "10.0.0.10:53".parse().unwrap()
            ],
            "the environment replaces the file's list"
        );
        assert_eq!(c.dns.search_domains, ["svc.cluster.local", "cluster.local"]);
        assert_eq!(c.dns.min_ttl, Duration::from_secs(2));
        assert_eq!(c.dns.max_ttl, Duration::from_secs(60));

        // An empty variable clears the file's list: back to the system resolver.
        let c = Config::from_parts(
            &yaml,
            Path::new("/x"),
            &env(&[("PYLON_DNS_NAMESERVERS", "")]),
        )
        .unwrap();
        assert!(c.dns.nameservers.is_empty());
    }

    #[test]
    fn dns_reports_every_problem_at_once() {
        let yaml = format!(
            "{GOOD}
dns:
  nameservers: [nowhere, 5, \"10.0.0.1:0\", \"\", \"10.0.0.2\"]
  searchDomains: \"ok.example,bad..name,-x.example\"
  minTtl: 500ms
  maxTtl: 5
  retries: 3
"
        );
        let e = env(&[("PYLON_DNS_SEARCH_DOMAINS", "fine.example,sp ace")]);
        let errs = Config::from_parts(&yaml, Path::new("/x"), &env(&[]))
            .unwrap_err()
            .0;
        let expected = [
            "dns.nameservers[0]: \"nowhere\" is not an ip or ip:port address",
            "dns.nameservers[1]: expected a string, found a number",
            "dns.nameservers[2]: \"10.0.0.1:0\": port must not be 0",
            "dns.nameservers[3]: must not be empty",
            "dns.searchDomains[1]: \"bad..name\" is not a domain name: empty label",
            "dns.searchDomains[2]: \"-x.example\" is not a domain name: a label must not start or end with '-'",
            "dns.minTtl: 500ms is below 1s",
            "dns.maxTtl: expected a duration such as 5s, found a number",
            "dns.retries: unknown key",
        ];
        for want in expected {
            assert!(
                errs.iter().any(|e| e == want),
                "missing {want:?} in {errs:#?}"
            );
        }
        assert_eq!(errs.len(), expected.len(), "{errs:#?}");

        let errs = Config::from_parts(&yaml, Path::new("/x"), &e)
            .unwrap_err()
            .0;
        assert!(
            errs.iter().any(|e| e
                == "dns.searchDomains[1] (from PYLON_DNS_SEARCH_DOMAINS): \"sp ace\" is not a domain name: only letters, digits, '-' and '_' are allowed"),
            "{errs:#?}"
        );

        let e = env(&[("PYLON_DNS_MIN_TTL", "10m"), ("PYLON_DNS_MAX_TTL", "2x")]);
        let errs = Config::from_parts(GOOD, Path::new("/x"), &e).unwrap_err().0;
        assert_eq!(
            errs,
            [format!(
                "dns.maxTtl (from PYLON_DNS_MAX_TTL): {}",
                parse_duration("2x").unwrap_err()
            )]
        );
        let e = env(&[("PYLON_DNS_MIN_TTL", "10m")]);
        let errs = Config::from_parts(GOOD, Path::new("/x"), &e).unwrap_err().0;
        assert_eq!(errs, ["dns.minTtl: 10m is greater than dns.maxTtl (5m)"]);
    }
}
