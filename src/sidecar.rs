//! Wires one sidecar together: identity, policy source, listeners, admin,
//! and the orderly stop (stop accepting, finish in-flight, exit).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::admin::{self, AdminState, BoundAddrs, Door};
use crate::config::{Config, IdentitySource, PolicySource};
use crate::discovery::Dns;
use crate::http::listener::Acceptor;
use crate::http::server::HttpServer;
use crate::identity::control::{ControlPlaneIdentity, LastError};
use crate::identity::{self, IdentityStore, tls};
use crate::policy::control::ControlPlaneSource;
use crate::policy::routing::ClusterDns;
use crate::policy::{self, PolicyStore};
use crate::probes::Prober;
use crate::proxy::accept_loop;
use crate::proxy::inbound::{Inbound, InboundOptions};
use crate::proxy::outbound::{Outbound, TransparentConfig};
use crate::telemetry::metrics::{ConnectionGuard, Metrics};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("identity: {}", .0.join("; "))]
    Identity(Vec<String>),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("DNS resolver: {0}")]
    Dns(String),
    #[error("{0}")]
    Config(&'static str),
    #[error("telemetry: {0}")]
    Telemetry(String),
    #[error("{0}")]
    Secrets(String),
}

/// A running sidecar.
pub struct Sidecar {
    pub addrs: BoundAddrs,
    pub policy: Arc<PolicyStore>,
    identity: Arc<IdentityStore>,
    shutdown: watch::Sender<bool>,
    /// The listeners: they end on the shutdown signal, once drained.
    tasks: JoinSet<()>,
    /// The policy source and the admin server: run until aborted, so that
    /// `/ready` keeps answering (503) while a drain is under way.
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl Sidecar {
    /// Binds every listener, loads the identity (or waits for the control
    /// plane to issue it, `/ready` saying so meanwhile), starts the policy
    /// source and begins serving.
    pub async fn start(config: Config) -> Result<Sidecar, StartError> {
        check_secret_files(&config).map_err(StartError::Secrets)?;
        let metrics = Metrics::new();
        let connections = &config.connections;
        // Each listener's HTTP server and accept limits.
        let listener = |name: &'static str, max_connections: u32| {
            let limits = metrics.listener_limits(name);
            (
                HttpServer::new(connections, limits.clone()),
                Acceptor::new(max_connections, connections.tcp_keepalive, limits),
            )
        };
        let admin_door = listener("admin", config.admin.max_connections);
        let probe_door = listener("probe", config.admin.max_connections);
        let bind = |what: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { what, addr, source })
        };
        let admin_l = Arc::new(bind("admin", config.admin.listen).await?);
        let probe_l = Arc::new(bind("probe", config.admin.probe_listen).await?);
        let outbound_l = bind("outbound", config.outbound.listen).await?;
        let inbound_l = bind("inbound", config.inbound.listen).await?;
        let local = |l: &TcpListener, fallback: SocketAddr| l.local_addr().unwrap_or(fallback);
        let addrs = BoundAddrs {
            admin: local(&admin_l, config.admin.listen),
            probe: local(&probe_l, config.admin.probe_listen),
            outbound: local(&outbound_l, config.outbound.listen),
            inbound: local(&inbound_l, config.inbound.listen),
        };
        // Bound: connections queue until the accept loops start, and the
        // admin API answers from here on (not ready until serving).
        tracing::info!(
            "listening admin={} probe={} outbound={} inbound={} app={}",
            addrs.admin,
            addrs.probe,
            addrs.outbound,
            addrs.inbound,
            config.inbound.app
        );

        let mut background = Vec::new();
        let identity_from_cp = matches!(config.identity, IdentitySource::ControlPlane { .. });
        let identity = match &config.identity {
            IdentitySource::Files {
                cert,
                key,
                trust_bundle,
            } => {
                IdentityStore::load_files(cert, key, trust_bundle).map_err(StartError::Identity)?
            }
            IdentitySource::ControlPlane { token_file } => {
                let cp = config
                    .control_plane
                    .clone()
                    .ok_or(StartError::Config("controlPlane: required"))?;
                let source = ControlPlaneIdentity {
                    address: cp.address,
                    ca_file: cp.ca_file,
                    token_file: Some(token_file.clone()),
                    state_dir: config.state_dir.clone(),
                };
                tracing::info!(admin = %addrs.admin, address = %source.address, "waiting for a certificate from the control plane");
                let last_error = LastError::default();
                // The kubelet's probes reach the probe listener meanwhile:
                // alive, not ready.
                let starting = [(&admin_l, &admin_door), (&probe_l, &probe_door)].map(
                    |(l, (server, acceptor))| {
                        tokio::spawn(admin::serve_starting(
                            l.clone(),
                            server.clone(),
                            acceptor.clone(),
                            last_error.clone(),
                        ))
                    },
                );
                let (store, tasks) = identity::control::obtain(source, last_error).await;
                for task in starting {
                    task.abort();
                }
                background.extend(tasks);
                store
            }
        };
        tracing::info!(identity = %identity.spiffe_id(), "identity loaded");
        let server_tls = tls::server_config(&identity)?;

        let (shutdown, _) = watch::channel(false);
        let dns_config = config.dns.clone();
        // Reading the system resolver configuration touches files.
        let dns = tokio::task::spawn_blocking(move || Dns::new(&dns_config))
            .await
            .map_err(|e| StartError::Dns(e.to_string()))?
            .map_err(StartError::Dns)?;
        let source = match (&config.policy, &config.control_plane) {
            (PolicySource::File(path), _) => format!("file:{}", path.display()),
            (PolicySource::ControlPlane, Some(cp)) => format!("controlPlane:{}", cp.address),
            (PolicySource::ControlPlane, None) => "controlPlane".to_string(),
        };
        let cluster = ClusterDns {
            namespace: config.kubernetes.namespace.clone(),
            domain: config.kubernetes.cluster_domain.clone(),
        };
        let policy = PolicyStore::new(
            identity.clone(),
            metrics.clone(),
            Arc::new(dns),
            cluster,
            source,
        );
        let policy_task = match (&config.policy, &config.control_plane) {
            (PolicySource::File(path), _) => tokio::spawn(policy::file::watch(
                path.clone(),
                policy.clone(),
                config.policy_max_bytes,
            )),
            (PolicySource::ControlPlane, cp) => {
                let cp = cp
                    .clone()
                    .ok_or(StartError::Config("controlPlane: required"))?;
                if cp.token_file.is_none() && !identity_from_cp {
                    return Err(StartError::Config("controlPlane.tokenFile: required"));
                }
                let source = ControlPlaneSource {
                    address: cp.address.clone(),
                    ca_file: cp.ca_file.clone(),
                    token_file: cp.token_file.clone(),
                    present_certificate: identity_from_cp,
                    state_dir: config.state_dir.clone(),
                    max_bytes: config.policy_max_bytes,
                };
                tokio::spawn(policy::control::run(
                    source,
                    policy.clone(),
                    identity.clone(),
                ))
            }
        };
        background.push(policy_task);
        let mut tasks = JoinSet::new();

        let state = Arc::new(AdminState {
            addrs,
            policy: policy.clone(),
            identity: identity.clone(),
            listening: Default::default(),
            shutdown: shutdown.clone(),
            prober: Prober::new(config.kubernetes.pod_ip),
            app_probes: config.app_probes.clone(),
            kubernetes: config.kubernetes.clone(),
        });
        for (l, (server, acceptor), door) in [
            (admin_l, admin_door, Door::Admin),
            (probe_l, probe_door, Door::Probe),
        ] {
            background.push(tokio::spawn(admin::serve(
                l,
                state.clone(),
                door,
                server,
                acceptor,
            )));
        }
        if let Some(endpoint) = config
            .telemetry
            .as_ref()
            .and_then(|t| t.otlp_endpoint.clone())
        {
            let service_name = config
                .telemetry
                .as_ref()
                .and_then(|t| t.service_name.clone())
                .unwrap_or_else(|| {
                    crate::telemetry::service_account(&identity.spiffe_id()).to_string()
                });
            background.push(crate::telemetry::export::spawn(
                endpoint,
                service_name,
                config.otlp_metrics_interval,
                policy.metrics().clone(),
                {
                    let (policy, identity) = (policy.clone(), identity.clone());
                    move || policy::refresh_gauges(&policy, &identity)
                },
            ));
        }

        let telemetry = crate::telemetry::Telemetry::start(
            config.telemetry.as_ref(),
            &identity.spiffe_id(),
            &metrics,
        )
        .map_err(StartError::Telemetry)?;
        let own_listeners = vec![addrs.admin, addrs.probe, addrs.outbound, addrs.inbound];
        let (outbound_server, outbound_acceptor) =
            listener("outbound", config.outbound.max_connections);
        let (inbound_server, inbound_acceptor) =
            listener("inbound", config.inbound.max_connections);
        policy
            .inbound_limits()
            .set_default_max_requests(config.inbound.app_max_requests);
        let outbound = Outbound::new(
            policy.clone(),
            config.outbound.retry_buffer_bytes,
            telemetry.clone(),
            TransparentConfig {
                unmatched: config.outbound.unmatched,
                detect_timeout: config.outbound.detect_timeout,
                server_first_ports: config.outbound.server_first_ports.clone(),
                own_listeners,
                local_ips: config.kubernetes.pod_ip.into_iter().collect(),
            },
            outbound_server,
            config.headers_with_underscores,
        );
        let drain = config.drain_timeout;
        let serving = Serving {
            metrics: &metrics,
            shutdown: &shutdown,
            drain,
        };
        serving.spawn(
            &mut tasks,
            outbound_l,
            addrs.outbound,
            "outbound",
            outbound_acceptor,
            move |tcp, peer, drain| outbound.clone().serve(tcp, peer, drain),
        );
        let inbound = Inbound::new(
            server_tls,
            config.inbound.app,
            policy.inbound_limits().clone(),
            telemetry,
            InboundOptions {
                mode: config.inbound.mode,
                own_ports: vec![
                    addrs.admin.port(),
                    addrs.probe.port(),
                    addrs.outbound.port(),
                ],
                detect_timeout: config.outbound.detect_timeout,
                own_identity: identity.spiffe_id(),
                handshake_timeout: config.inbound.handshake_timeout,
                max_concurrent_handshakes: config.inbound.max_concurrent_handshakes,
                app_max_connections: config.inbound.app_max_connections,
                underscores: config.headers_with_underscores,
            },
            inbound_server,
        );
        serving.spawn(
            &mut tasks,
            inbound_l,
            addrs.inbound,
            "inbound",
            inbound_acceptor,
            move |tcp, peer, drain| inbound.clone().serve(tcp, peer, drain),
        );
        state.listening.store(true, Ordering::Release);
        tracing::info!(runtime = %runtime_description(), "serving");
        Ok(Sidecar {
            addrs,
            policy,
            identity,
            shutdown,
            tasks,
            background,
        })
    }

    /// The metrics as `/metrics` serves them (and the OTLP export sends
    /// them): Prometheus text, state gauges refreshed now.
    pub fn scrape(&self) -> String {
        policy::refresh_gauges(&self.policy, &self.identity);
        self.policy.metrics().encode()
    }

    /// Starts draining: listeners close, open connections finish what they
    /// are doing (bounded by `drainTimeout`).
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Resolves when a drain has been requested (signal or `POST /drain`).
    pub async fn draining(&self) {
        crate::proxy::stopped(&mut self.shutdown.subscribe()).await;
    }

    /// Drains and waits for the listeners to finish.
    pub async fn stop(mut self) {
        self.shutdown();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// What every proxy listener shares: connection counting and the drain.
struct Serving<'a> {
    metrics: &'a Metrics,
    shutdown: &'a watch::Sender<bool>,
    drain: Duration,
}

impl Serving<'_> {
    /// Serves `listener` (bound to `addr`) and its IPv6 twin with `serve`
    /// until the drain ends, each connection counted under `direction` and
    /// against `acceptor`'s cap (shared by the twins).
    fn spawn<F, Fut>(
        &self,
        tasks: &mut JoinSet<()>,
        listener: TcpListener,
        addr: SocketAddr,
        direction: &'static str,
        acceptor: Acceptor,
        serve: F,
    ) where
        F: Fn(TcpStream, SocketAddr, watch::Receiver<bool>) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        for listener in std::iter::once(listener).chain(ipv6_companion(addr)) {
            let connections = self.metrics.connections(direction);
            let serve = serve.clone();
            tasks.spawn(accept_loop(
                listener,
                acceptor.clone(),
                self.shutdown.subscribe(),
                self.drain,
                move |tcp, peer, drain| counted(connections.open(), serve(tcp, peer, drain)),
            ));
        }
    }
}

/// The IPv6 twin of a listener on `127.0.0.1:P` (`[::1]:P`) or `0.0.0.0:P`
/// (`[::]:P`, IPv6 only): where `pylon init-iptables`' ip6tables rules
/// redirect a dual-stack pod's IPv6 connections, on the port the listener
/// was bound to. `None` for other addresses and where the host has no
/// IPv6 (or the port is taken there).
fn ipv6_companion(addr: SocketAddr) -> Option<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let v6: std::net::IpAddr = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_loopback() => std::net::Ipv6Addr::LOCALHOST.into(),
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv6Addr::UNSPECIFIED.into(),
        _ => return None,
    };
    let v6 = SocketAddr::new(v6, addr.port());
    let bind = || -> std::io::Result<TcpListener> {
        let socket = Socket::new(Domain::IPV6, Type::STREAM, None)?;
        socket.set_only_v6(true)?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&v6.into())?;
        socket.listen(1024)?;
        TcpListener::from_std(socket.into())
    };
    match bind() {
        Ok(l) => {
            tracing::info!(addr = %v6, "also listening on IPv6");
            Some(l)
        }
        Err(e) => {
            tracing::debug!(addr = %v6, error = %e, "no IPv6 listener");
            None
        }
    }
}

/// Refuses secrets that others can read: the key file of
/// `identity.files`, and the bootstrap token files (unless
/// `controlPlane.allowReadableTokenFile`).
fn check_secret_files(config: &Config) -> Result<(), String> {
    let mut problems = Vec::new();
    if let IdentitySource::Files { key, .. } = &config.identity
        && let Err(e) = identity::secrets::check_private(key, "identity.files.key")
    {
        problems.push(e);
    }
    let allow_readable_token = config
        .control_plane
        .as_ref()
        .is_some_and(|cp| cp.allow_readable_token_file);
    if !allow_readable_token {
        let tokens = [
            match &config.identity {
                IdentitySource::ControlPlane { token_file } => Some(token_file),
                IdentitySource::Files { .. } => None,
            },
            config
                .control_plane
                .as_ref()
                .and_then(|cp| cp.token_file.as_ref()),
        ];
        let mut seen = Vec::new();
        for token in tokens.into_iter().flatten() {
            if seen.contains(&token) {
                continue;
            }
            seen.push(token);
            if let Err(e) = identity::secrets::check_private(token, "the token file") {
                problems.push(format!(
                    "{e} (set controlPlane.allowReadableTokenFile: true for a Kubernetes projected token that only this container mounts)"
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Serves a connection, counted as open until it ends.
async fn counted(guard: ConnectionGuard, serve: impl Future<Output = ()>) {
    serve.await;
    drop(guard);
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        for task in &self.background {
            task.abort();
        }
    }
}

/// The scheduler the sidecar runs on, for its start-up log:
/// `current-thread`, or `multi-thread, N workers`.
fn runtime_description() -> String {
    let rt = tokio::runtime::Handle::current();
    match rt.runtime_flavor() {
        tokio::runtime::RuntimeFlavor::CurrentThread => "current-thread".to_string(),
        _ => format!("multi-thread, {} workers", rt.metrics().num_workers()),
    }
}
