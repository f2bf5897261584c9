//! The `pylon-control` command line: `serve`, `install`, and kubectl-like
//! commands that call the admin API (`apply`, `get`, `delete`, `status`,
//! `rollback`, `token`, `ca`).

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand, ValueEnum};
use pylon_proto::client::authed;
use pylon_proto::policy::{Kind, parse_documents, to_json};
use pylon_proto::signal::stop_signal;
use pylon_proto::v1 as pb;
use pylon_proto::v1::policy_admin_client::PolicyAdminClient;
use rustls::RootCertStore;
use tonic::transport::Channel;

use crate::ca::OperatorCa;
use crate::inject::{self, InjectOptions, webhook::WebhookConfig};
use crate::k8s_fetch::Discovery;
use crate::k8s_token::{self, KeySource};
use crate::limits::{ListenerLimits, ServeLimits};
use crate::server::{ControlPlane, DEFAULT_HISTORY, ServeConfig};

#[derive(Parser)]
#[command(
    name = "pylon-control",
    version,
    about = "The pylon control plane and its CLI"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the control plane.
    Serve(Box<ServeArgs>),
    /// Print every Kubernetes object of the mesh, for `kubectl apply -f -`.
    Install(crate::install::InstallArgs),
    /// Apply resources from YAML files, a directory of them, or - (stdin).
    Apply {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show resources of a kind, or one resource.
    Get {
        kind: String,
        name: Option<String>,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        #[arg(short, long)]
        output: Option<Output>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete one resource.
    Delete {
        kind: String,
        name: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// The policy version and each connected sidecar's state.
    Status {
        #[command(flatten)]
        conn: Conn,
    },
    /// Make an earlier policy version current again.
    Rollback {
        version: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Bootstrap tokens for workloads.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The mesh CA: its state, and the steps of a rotation.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Subcommand)]
pub enum CaCommand {
    /// Make a new root CA into two files, without a control plane: for
    /// `install --ca-cert/--ca-key` or the kustomize base.
    NewRoot {
        /// Where to write the certificate (PEM); an existing file is kept.
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// Where to write the private key (PEM, mode 0600); an existing
        /// file is kept.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[arg(long, default_value = "pylon.local")]
        trust_domain: String,
    },
    /// The trust bundle's roots, the active issuer and any pending one.
    Status {
        #[command(flatten)]
        conn: Conn,
    },
    /// Rotation step 1: add a root to the trust bundle, with an issuer that
    /// signs nothing until activated. Without --cert, a new root is
    /// generated.
    AddRoot {
        /// The operator's CA certificate (a root, or an intermediate).
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// For an intermediate: the roots above it.
        #[arg(long, requires = "cert")]
        bundle: Option<PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Rotation step 2: the pending issuer signs from now on.
    Activate {
        #[command(flatten)]
        conn: Conn,
    },
    /// Rotation step 3: remove a root (by its SHA-256 fingerprint) from the
    /// trust bundle, once no certificate it anchors is in use.
    RemoveRoot {
        fingerprint: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a token bound to one workload identity; prints it alone.
    Create {
        #[arg(long)]
        identity: String,
        #[arg(long, value_parser = parse_ttl, default_value = "24h")]
        ttl: Duration,
        /// Valid for one certificate issuance only.
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List tokens (never their secrets).
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Revoke a token by id: the token stops working at once, and the
    /// certificates of its identity issued until now can no longer renew
    /// (a workload that still holds a valid token of that identity gets a
    /// new certificate with it). Given a SPIFFE ID instead, revoke that
    /// identity: every token bound to it, and the same for its
    /// certificates.
    Revoke {
        #[arg(value_name = "ID|SPIFFE_ID")]
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    match pylon_proto::policy::parse_duration(s)? {
        Duration::ZERO => Err("the TTL must be longer than zero".into()),
        d => Ok(d),
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Output {
    Yaml,
    Json,
}

#[derive(Args)]
pub struct ServeArgs {
    /// Where the store, the CA and the admin token live.
    #[arg(long, env = "PYLON_CONTROL_DATA_DIR")]
    pub data_dir: PathBuf,
    #[arg(long, env = "PYLON_CONTROL_LISTEN", default_value = "127.0.0.1:15010")]
    pub listen: SocketAddr,
    #[arg(long, env = "PYLON_TRUST_DOMAIN", default_value = "pylon.local")]
    pub trust_domain: String,
    /// A DNS name or IP address the control plane is reached by (repeat):
    /// the serving certificate of --listen and --webhook-listen names it.
    #[arg(long = "name", visible_alias = "dns-name")]
    pub names: Vec<String>,
    /// On first start: the operator's CA certificate instead of a new root.
    #[arg(long, requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    #[arg(long, requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// On first start, with an intermediate `--ca-cert`: the roots above it.
    #[arg(long, requires = "ca_cert")]
    pub ca_bundle: Option<PathBuf>,
    /// Policy versions kept for rollback.
    #[arg(long, default_value_t = DEFAULT_HISTORY)]
    pub history: usize,
    /// The lifetime of the workload certificates it issues.
    #[arg(long, env = "PYLON_CONTROL_CERT_TTL", value_parser = parse_ttl, default_value = "24h")]
    pub cert_ttl: Duration,
    /// Serve Prometheus metrics over plain HTTP at ADDR/metrics (off by
    /// default; e.g. 127.0.0.1:15014).
    #[arg(long, env = "PYLON_CONTROL_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Export metrics and API traces over OTLP/gRPC (e.g.
    /// http://127.0.0.1:4317).
    #[arg(long, env = "PYLON_CONTROL_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Serve the Kubernetes injection webhook (POST /inject, GET /healthz)
    /// over HTTPS at ADDR, with the serving certificate of --listen (off by
    /// default; e.g. 0.0.0.0:15011).
    #[arg(long, env = "PYLON_CONTROL_WEBHOOK_LISTEN", value_name = "ADDR")]
    pub webhook_listen: Option<SocketAddr>,
    /// The image the webhook injects (the pylon-init and pylon containers).
    #[arg(
        long,
        env = "PYLON_CONTROL_SIDECAR_IMAGE",
        value_name = "IMAGE",
        default_value = inject::DEFAULT_IMAGE
    )]
    pub sidecar_image: String,
    /// The control plane's URL as the sidecars the webhook injects reach
    /// it.
    #[arg(
        long,
        env = "PYLON_CONTROL_SIDECAR_CONTROL_PLANE",
        value_name = "URL",
        default_value = inject::DEFAULT_CONTROL_PLANE
    )]
    pub sidecar_control_plane: String,
    /// Accept pods' projected service-account tokens (audience `pylon`)
    /// signed by a key of this JWKS file as bootstrap credentials (read
    /// again when a token names an unknown key id). Their `iss` must be
    /// --kubernetes-issuer (or --kubernetes-token-issuer) when given, else
    /// one of the usual defaults (https://kubernetes.default.svc.cluster.local,
    /// https://kubernetes.default.svc).
    #[arg(long, env = "PYLON_CONTROL_KUBERNETES_JWKS", value_name = "FILE")]
    pub kubernetes_jwks: Option<PathBuf>,
    /// The cluster's service-account issuer: tokens must carry URL as their
    /// `iss`; without --kubernetes-jwks its keys are found by OIDC
    /// discovery at URL/.well-known/openid-configuration (e.g.
    /// https://kubernetes.default.svc.cluster.local).
    #[arg(long, env = "PYLON_CONTROL_KUBERNETES_ISSUER", value_name = "URL")]
    pub kubernetes_issuer: Option<String>,
    /// The `iss` tokens must carry, when it differs from --kubernetes-issuer
    /// (or with --kubernetes-jwks alone).
    #[arg(
        long,
        env = "PYLON_CONTROL_KUBERNETES_TOKEN_ISSUER",
        value_name = "ISS"
    )]
    pub kubernetes_token_issuer: Option<String>,
    /// The roots that verify the issuer's HTTPS certificate.
    #[arg(
        long,
        env = "PYLON_CONTROL_KUBERNETES_ISSUER_CA",
        value_name = "FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    )]
    pub kubernetes_issuer_ca: PathBuf,
    /// A bearer token for discovery (by default the control plane's own
    /// service-account token, when that file exists).
    #[arg(
        long,
        env = "PYLON_CONTROL_KUBERNETES_ISSUER_TOKEN_FILE",
        value_name = "FILE"
    )]
    pub kubernetes_issuer_token_file: Option<PathBuf>,
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// The limits of `serve`'s listeners ([`crate::limits`]); each applies to
/// the gRPC listener and the webhook alike, but for --webhook-max-connections.
#[derive(Args, Clone)]
#[command(next_help_heading = "Limits")]
pub struct LimitArgs {
    /// Connections open at once on --listen (handshaking ones included);
    /// more are closed at once and counted.
    #[arg(long, env = "PYLON_CONTROL_MAX_CONNECTIONS", value_parser = parse_positive, default_value_t = crate::limits::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Connections open at once on --webhook-listen.
    #[arg(long, env = "PYLON_CONTROL_WEBHOOK_MAX_CONNECTIONS", value_parser = parse_positive, default_value_t = crate::limits::DEFAULT_WEBHOOK_MAX_CONNECTIONS)]
    pub webhook_max_connections: usize,
    /// How long a client may take from connecting to the end of the TLS
    /// handshake and its first request bytes.
    #[arg(long, env = "PYLON_CONTROL_HANDSHAKE_TIMEOUT", value_parser = parse_ttl, default_value = "10s")]
    pub handshake_timeout: Duration,
    /// HTTP/2 streams at once per connection; more are refused.
    #[arg(long, env = "PYLON_CONTROL_MAX_CONCURRENT_STREAMS", default_value_t = ListenerLimits::default().max_concurrent_streams)]
    pub max_concurrent_streams: u32,
    /// Streams a client may reset before the server accepts them (rapid
    /// reset) before its connection is closed.
    #[arg(long, env = "PYLON_CONTROL_MAX_PENDING_ACCEPT_RESET_STREAMS", default_value_t = ListenerLimits::default().max_pending_accept_reset_streams)]
    pub max_pending_accept_reset_streams: usize,
    /// Streams the server may reset for a client's errors (MadeYouReset)
    /// before its connection is closed.
    #[arg(long, env = "PYLON_CONTROL_MAX_LOCAL_ERROR_RESET_STREAMS", default_value_t = ListenerLimits::default().max_local_error_reset_streams)]
    pub max_local_error_reset_streams: usize,
    /// The largest request head (decoded header list, bytes).
    #[arg(long, env = "PYLON_CONTROL_MAX_HEADER_LIST_SIZE", default_value_t = ListenerLimits::default().max_header_list_size)]
    pub max_header_list_size: u32,
    /// HTTP/2 PING interval; a client that does not answer within twice
    /// this is disconnected.
    #[arg(long, env = "PYLON_CONTROL_KEEPALIVE_INTERVAL", value_parser = parse_ttl, default_value = "10s")]
    pub keepalive_interval: Duration,
    /// The largest admin API message (bytes): an `apply`'s YAML.
    #[arg(long, env = "PYLON_CONTROL_MAX_ADMIN_MESSAGE_SIZE", default_value_t = crate::limits::DEFAULT_ADMIN_MAX_MESSAGE)]
    pub max_admin_message_size: usize,
    /// How long a connection to --listen lives before the server sends
    /// GOAWAY and the client moves to a new one; 0s: for ever.
    #[arg(long, env = "PYLON_CONTROL_MAX_CONNECTION_AGE", value_parser = pylon_proto::policy::parse_duration, default_value = "1h")]
    pub max_connection_age: Duration,
    /// How long the calls in flight on an aged connection may go on before
    /// it is closed (a sidecar's policy stream is cut then, and resumed).
    #[arg(long, env = "PYLON_CONTROL_MAX_CONNECTION_AGE_GRACE", value_parser = pylon_proto::policy::parse_duration, default_value = "1m")]
    pub max_connection_age_grace: Duration,
}

impl LimitArgs {
    fn limits(&self) -> ServeLimits {
        let grpc = ListenerLimits {
            max_connections: self.max_connections,
            handshake_timeout: self.handshake_timeout,
            max_concurrent_streams: self.max_concurrent_streams,
            max_pending_accept_reset_streams: self.max_pending_accept_reset_streams,
            max_local_error_reset_streams: self.max_local_error_reset_streams,
            max_header_list_size: self.max_header_list_size,
            keepalive_interval: self.keepalive_interval,
        };
        ServeLimits {
            webhook: ListenerLimits {
                max_connections: self.webhook_max_connections,
                ..grpc.clone()
            },
            grpc,
            admin_max_message: self.max_admin_message_size,
            max_connection_age: Some(self.max_connection_age).filter(|age| !age.is_zero()),
            max_connection_age_grace: self.max_connection_age_grace,
        }
    }
}

/// The control plane's own service-account token in a pod.
const POD_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

impl ServeArgs {
    /// The accepted issuers and the key source for service-account
    /// tokens, if enabled.
    fn kubernetes(&self) -> Option<(Vec<String>, KeySource)> {
        let issuers = match (&self.kubernetes_token_issuer, &self.kubernetes_issuer) {
            (Some(iss), _) | (None, Some(iss)) => vec![iss.clone()],
            (None, None) => k8s_token::DEFAULT_ISSUERS
                .iter()
                .map(ToString::to_string)
                .collect(),
        };
        if let Some(jwks) = &self.kubernetes_jwks {
            return Some((issuers, KeySource::File(jwks.clone())));
        }
        let issuer = self.kubernetes_issuer.clone()?;
        let token_file = self.kubernetes_issuer_token_file.clone().or_else(|| {
            let pod = PathBuf::from(POD_TOKEN);
            pod.exists().then_some(pod)
        });
        Some((
            issuers,
            KeySource::Discovery(Discovery {
                issuer,
                ca_file: self.kubernetes_issuer_ca.clone(),
                token_file,
            }),
        ))
    }
}

/// How the CLI reaches the control plane.
#[derive(Args, Clone)]
pub struct Conn {
    #[arg(
        long,
        env = "PYLON_CONTROL_SERVER",
        default_value = "https://127.0.0.1:15010"
    )]
    pub server: String,
    /// The admin token file (`<data dir>/admin.token`).
    #[arg(long, env = "PYLON_CONTROL_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The trust bundle (`<data dir>/ca.pem`).
    #[arg(long, env = "PYLON_CONTROL_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

impl Conn {
    async fn client(&self) -> anyhow::Result<(PolicyAdminClient<Channel>, String)> {
        let token_file = self.token_file.as_ref().ok_or_else(|| {
            anyhow::anyhow!(
                "set --token-file or PYLON_CONTROL_TOKEN_FILE (the data directory's admin.token)"
            )
        })?;
        let ca_file = self.ca_file.as_ref().ok_or_else(|| {
            anyhow::anyhow!("set --ca-file or PYLON_CONTROL_CA_FILE (the data directory's ca.pem)")
        })?;
        let token = std::fs::read_to_string(token_file)
            .map_err(|e| anyhow::anyhow!("{}: {e}", token_file.display()))?
            .trim()
            .to_string();
        let roots = roots_from(ca_file)?;
        let tls = pylon_proto::client::client_config(roots, None)?;
        let channel = pylon_proto::client::lazy_channel(&self.server, tls)?;
        Ok((PolicyAdminClient::new(channel), token))
    }
}

/// The certificates of a PEM file as trust anchors.
pub fn roots_from(path: &Path) -> anyhow::Result<RootCertStore> {
    pylon_proto::tls_roots::required_roots_from_file(path).map_err(anyhow::Error::msg)
}

/// A call's error as the user reads it: the server's message, one problem
/// per line.
fn failed(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

/// Reads `-f` arguments into one multi-document YAML string.
fn read_sources(files: &[String]) -> anyhow::Result<String> {
    let mut out = String::new();
    for f in files {
        if f == "-" {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            push_doc(&mut out, &s);
            continue;
        }
        let path = Path::new(f);
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            entries.sort();
            for p in entries {
                let s = std::fs::read_to_string(&p)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                push_doc(&mut out, &s);
            }
        } else {
            let s = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{f}: {e}"))?;
            push_doc(&mut out, &s);
        }
    }
    Ok(out)
}

fn push_doc(out: &mut String, doc: &str) {
    if !out.is_empty() {
        out.push_str("\n---\n");
    }
    out.push_str(doc);
}

/// `backend/greeter`, `grpcroute/other/greeter`.
fn short_name(r: &pb::ResourceRef) -> String {
    let kind = r.kind.to_ascii_lowercase();
    if r.namespace.is_empty() || r.namespace == pylon_proto::policy::DEFAULT_NAMESPACE {
        format!("{kind}/{}", r.name)
    } else {
        format!("{kind}/{}/{}", r.namespace, r.name)
    }
}

fn kind_arg(kind: &str) -> anyhow::Result<Kind> {
    Kind::parse(kind).ok_or_else(|| anyhow::anyhow!("unknown kind {kind:?}"))
}

fn when(unix: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let left = unix - now;
    if left <= 0 {
        "expired".into()
    } else {
        pylon_proto::policy::format_duration(Duration::from_secs(left as u64))
    }
}

/// Runs one command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Install(args) => {
            let yaml = crate::install::run(&args)?;
            std::io::Write::write_all(&mut std::io::stdout().lock(), yaml.as_bytes())?;
            Ok(())
        }
        Command::Apply { files, conn } => {
            let yaml = read_sources(&files)?;
            // Checked here first: the same validation the server runs, so a
            // bad file fails fast with every problem and its path.
            parse_documents(&yaml).map_err(|e| anyhow::anyhow!("{e}"))?;
            let (mut client, token) = conn.client().await?;
            let resp = client
                .apply(authed(pb::ApplyRequest { yaml }, &token)?)
                .await
                .map_err(failed)?
                .into_inner();
            for r in &resp.results {
                if let Some(reference) = &r.r#ref {
                    println!("{} {}", short_name(reference), r.outcome);
                }
            }
            Ok(())
        }
        Command::Get {
            kind,
            name,
            namespace,
            output,
            conn,
        } => {
            let kind = kind_arg(&kind)?;
            let (mut client, token) = conn.client().await?;
            let resources = match name {
                Some(name) => {
                    let reference = pb::ResourceRef {
                        kind: kind.as_str().into(),
                        namespace,
                        name,
                    };
                    let r = client
                        .get(authed(
                            pb::GetRequest {
                                r#ref: Some(reference),
                            },
                            &token,
                        )?)
                        .await
                        .map_err(failed)?
                        .into_inner();
                    r.resource.into_iter().collect::<Vec<_>>()
                }
                None => {
                    client
                        .list(authed(
                            pb::ListRequest {
                                kind: kind.as_str().into(),
                                namespace: String::new(),
                            },
                            &token,
                        )?)
                        .await
                        .map_err(failed)?
                        .into_inner()
                        .resources
                }
            };
            print_resources(&resources, output)
        }
        Command::Delete {
            kind,
            name,
            namespace,
            conn,
        } => {
            let kind = kind_arg(&kind)?;
            let reference = pb::ResourceRef {
                kind: kind.as_str().into(),
                namespace,
                name,
            };
            let (mut client, token) = conn.client().await?;
            client
                .delete(authed(
                    pb::DeleteRequest {
                        r#ref: Some(reference.clone()),
                    },
                    &token,
                )?)
                .await
                .map_err(failed)?;
            println!("{} deleted", short_name(&reference));
            Ok(())
        }
        Command::Status { conn } => {
            let (mut client, token) = conn.client().await?;
            let s = client
                .status(authed(pb::StatusRequest {}, &token)?)
                .await
                .map_err(failed)?
                .into_inner();
            println!("policy version {}", s.version);
            println!();
            println!(
                "{:<48} {:<22} {:>7}  LAST NACK",
                "IDENTITY", "ADDRESS", "ACKED"
            );
            for sc in &s.sidecars {
                let nack = if sc.last_nack_error.is_empty() {
                    "-".to_string()
                } else {
                    format!(
                        "version {}: {}",
                        sc.nacked_version,
                        sc.last_nack_error.replace('\n', "; ")
                    )
                };
                println!(
                    "{:<48} {:<22} {:>7}  {}",
                    sc.identity, sc.address, sc.acked_version, nack
                );
            }
            Ok(())
        }
        Command::Rollback { version, conn } => {
            let (mut client, token) = conn.client().await?;
            let r = client
                .rollback(authed(pb::RollbackRequest { version }, &token)?)
                .await
                .map_err(failed)?
                .into_inner();
            println!(
                "rolled back to version {version}: now version {}",
                r.version
            );
            Ok(())
        }
        Command::Token { command } => token(command).await,
        Command::Ca { command } => ca(command).await,
    }
}

async fn ca(command: CaCommand) -> anyhow::Result<()> {
    let read = |p: Option<PathBuf>| -> anyhow::Result<String> {
        match p {
            Some(p) => {
                std::fs::read_to_string(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
            }
            None => Ok(String::new()),
        }
    };
    let (status, conn_note) = match command {
        CaCommand::NewRoot {
            cert,
            key,
            trust_domain,
        } => return new_root(&cert, &key, &trust_domain),
        CaCommand::Status { conn } => {
            let (mut client, token) = conn.client().await?;
            let r = client
                .ca_status(authed(pb::CaStatusRequest {}, &token)?)
                .await
                .map_err(failed)?;
            (r.into_inner(), None)
        }
        CaCommand::AddRoot {
            cert,
            key,
            bundle,
            conn,
        } => {
            let request = pb::CaAddRootRequest {
                cert_pem: read(cert)?,
                key_pem: read(key)?,
                bundle_pem: read(bundle)?,
            };
            let (mut client, token) = conn.client().await?;
            let r = client
                .ca_add_root(authed(request, &token)?)
                .await
                .map_err(failed)?;
            (
                r.into_inner(),
                Some(
                    "root added; once every sidecar trusts it (its /config lists the fingerprint), run `pylon-control ca activate`",
                ),
            )
        }
        CaCommand::Activate { conn } => {
            let (mut client, token) = conn.client().await?;
            let r = client
                .ca_activate(authed(pb::CaActivateRequest {}, &token)?)
                .await
                .map_err(failed)?;
            (
                r.into_inner(),
                Some(
                    "issuer activated; once every certificate of the previous issuer has expired, remove its root with `pylon-control ca remove-root FINGERPRINT`",
                ),
            )
        }
        CaCommand::RemoveRoot { fingerprint, conn } => {
            let (mut client, token) = conn.client().await?;
            let r = client
                .ca_remove_root(authed(pb::CaRemoveRootRequest { fingerprint }, &token)?)
                .await
                .map_err(failed)?;
            (r.into_inner(), Some("root removed from the trust bundle"))
        }
    };
    print_ca(&status);
    if let Some(note) = conn_note {
        println!();
        println!("{note}");
    }
    Ok(())
}

/// `ca new-root`: the certificate and key of a new root, in files that did
/// not exist (a CA key is never overwritten).
fn new_root(cert: &Path, key: &Path, trust_domain: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    for path in [cert, key] {
        if path.exists() {
            anyhow::bail!("{} exists: not overwritten", path.display());
        }
    }
    let root = crate::ca::CaMaterial::new_root(trust_domain)?;
    for (path, pem, mode) in [(key, &root.key_pem, 0o600), (cert, &root.cert_pem, 0o644)] {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .and_then(|mut f| f.write_all(pem.as_bytes()).and_then(|()| f.sync_all()))
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    println!(
        "wrote {} and {} (keep the key secret)",
        cert.display(),
        key.display()
    );
    Ok(())
}

fn print_ca(s: &pb::CaStatusResponse) {
    println!("trust bundle:");
    println!(
        "  {:<64}  {:>10}  SUBJECT",
        "FINGERPRINT (SHA-256)", "EXPIRES"
    );
    for r in &s.roots {
        println!(
            "  {:<64}  {:>10}  {}",
            r.fingerprint,
            when(r.not_after_unix),
            r.subject
        );
    }
    let issuer = |label: &str, i: &Option<pb::CaIssuer>| {
        if let Some(i) = i
            && let Some(c) = &i.certificate
        {
            println!(
                "{label}: {} ({}), under root {}",
                c.subject,
                c.fingerprint,
                i.roots.join(", ")
            );
        }
    };
    issuer("active issuer", &s.active);
    issuer("pending issuer", &s.pending);
    println!(
        "workload certificate lifetime: {}",
        pylon_proto::policy::format_duration(Duration::from_secs(s.certificate_ttl_seconds))
    );
    if s.previous_certificates_valid_until_unix > 0 {
        println!(
            "certificates of the previous issuer may be in use for: {}",
            when(s.previous_certificates_valid_until_unix)
        );
    }
}

async fn token(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            identity,
            ttl,
            once,
            conn,
        } => {
            let (mut client, token) = conn.client().await?;
            let r = client
                .create_token(authed(
                    pb::CreateTokenRequest {
                        identity,
                        ttl_seconds: ttl.as_secs(),
                        once,
                    },
                    &token,
                )?)
                .await
                .map_err(failed)?
                .into_inner();
            // The token alone, so that scripts can capture it.
            println!("{}", r.token);
            Ok(())
        }
        TokenCommand::List { conn } => {
            let (mut client, token) = conn.client().await?;
            let r = client
                .list_tokens(authed(pb::ListTokensRequest {}, &token)?)
                .await
                .map_err(failed)?
                .into_inner();
            println!("{:<14} {:<48} {:>10}  FLAGS", "ID", "IDENTITY", "EXPIRES");
            for t in r.tokens {
                let mut flags = Vec::new();
                for (set, name) in [(t.once, "once"), (t.used, "used"), (t.revoked, "revoked")] {
                    if set {
                        flags.push(name);
                    }
                }
                println!(
                    "{:<14} {:<48} {:>10}  {}",
                    t.id,
                    t.identity,
                    when(t.expires_at_unix),
                    flags.join(",")
                );
            }
            Ok(())
        }
        TokenCommand::Revoke { id, conn } => {
            let (mut client, token) = conn.client().await?;
            client
                .revoke_token(authed(pb::RevokeTokenRequest { id: id.clone() }, &token)?)
                .await
                .map_err(failed)?;
            if id.starts_with("spiffe://") {
                println!("identity {id} revoked");
            } else {
                println!("token {id} revoked");
            }
            Ok(())
        }
    }
}

fn print_resources(resources: &[pb::StoredResource], output: Option<Output>) -> anyhow::Result<()> {
    match output {
        Some(Output::Yaml) => {
            let docs: Vec<&str> = resources.iter().map(|r| r.yaml.trim_end()).collect();
            println!("{}", docs.join("\n---\n"));
        }
        Some(Output::Json) => {
            let mut items = Vec::new();
            for r in resources {
                for resource in parse_documents(&r.yaml).map_err(|e| anyhow::anyhow!("{e}"))? {
                    items.push(to_json(&resource));
                }
            }
            let value = match items.len() {
                1 => items.remove(0),
                _ => serde_json::json!({ "items": items }),
            };
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        None => {
            println!("{:<32} {:<16} {:>8}", "NAME", "NAMESPACE", "VERSION");
            for r in resources {
                if let Some(reference) = &r.r#ref {
                    println!(
                        "{:<32} {:<16} {:>8}",
                        reference.name, reference.namespace, r.resource_version
                    );
                }
            }
        }
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let kubernetes = args.kubernetes();
    let limits = args.limits.limits();
    let operator_ca = args.ca_cert.map(|cert| OperatorCa {
        cert,
        key: args.ca_key.unwrap_or_default(),
        bundle: args.ca_bundle,
    });
    let cp = ControlPlane::start_with_limits(
        ServeConfig {
            data_dir: args.data_dir,
            listen: args.listen,
            trust_domain: args.trust_domain,
            names: args.names,
            operator_ca,
            history: args.history,
            cert_ttl: args.cert_ttl,
            telemetry: crate::telemetry::TelemetryConfig {
                metrics_listen: args.metrics_listen,
                otlp_endpoint: args.otlp_endpoint,
            },
            webhook: args.webhook_listen.map(|listen| WebhookConfig {
                listen,
                inject: InjectOptions {
                    image: args.sidecar_image,
                    control_plane: args.sidecar_control_plane,
                },
            }),
            kubernetes,
        },
        limits,
    )
    .await?;
    let webhook = cp
        .webhook_addr
        .map(|addr| format!(" webhook={addr}"))
        .unwrap_or_default();
    tracing::info!(
        "listening address={}{webhook} trust_bundle={} admin_token={}",
        cp.addr,
        cp.files.bundle.display(),
        cp.files.admin_token.display()
    );
    stop_signal().await;
    tracing::info!("stopping");
    cp.stop().await
}
