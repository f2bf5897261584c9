//! `pylon-control serve`: the admin API and the discovery stream over TLS.
//!
//! Every change to the store is published at once to every connected
//! sidecar (a `watch` channel: a slow sidecar skips to the latest version,
//! it never queues old ones). Each sidecar acknowledges (ACK) or refuses
//! (NACK, with the reason) each snapshot; the latest state of each
//! connection is what `Status` reports.
//!
//! Not here: the store's rules ([`crate::store`]), the CA ([`crate::ca`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::Stream;
use pylon_proto::policy::{Kind, to_yaml};
use pylon_proto::v1::discovery_server::{Discovery, DiscoveryServer};
use pylon_proto::v1::identity_server::IdentityServer;
use pylon_proto::v1::policy_admin_server::{PolicyAdmin, PolicyAdminServer};
use pylon_proto::v1::{self as pb};
use ring::digest::{SHA256, digest};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::ca::unix;
use crate::ca::{CaMaterial, CaState, DataFiles, OperatorCa, admin_token};
use crate::inject::webhook::WebhookConfig;
use crate::k8s_token::{KeySource, TokenVerifier};
use crate::limits::{DISCOVERY_MAX_MESSAGE, IDENTITY_MAX_MESSAGE, ServeLimits};
use crate::state::{Published, SidecarRecord, State, bearer, blocking};
use crate::store::{ApplyOutcome, ResourceKey, Store, StoredResource};
use crate::telemetry::{ControlMetrics, ListenerMetrics, RpcLayer, TelemetryConfig};
use crate::tls::{self, PeerInfo};

/// Policy versions kept for rollback.
pub const DEFAULT_HISTORY: usize = 50;
/// How often metrics are exported over OTLP.
const OTLP_METRICS_INTERVAL: Duration = Duration::from_secs(10);

/// How to run a control plane.
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub trust_domain: String,
    /// Names (DNS or IP) the serving certificate is valid for.
    pub names: Vec<String>,
    pub operator_ca: Option<OperatorCa>,
    pub history: usize,
    /// The lifetime of workload certificates.
    pub cert_ttl: Duration,
    /// Metrics listener and OTLP export (both off by default).
    pub telemetry: TelemetryConfig,
    /// Kubernetes service-account tokens as bootstrap credentials: the
    /// issuers (`iss`) accepted and where the keys are.
    pub kubernetes: Option<(Vec<String>, KeySource)>,
    /// The Kubernetes injection webhook (off by default).
    pub webhook: Option<WebhookConfig>,
}

/// The default lifetime of workload certificates.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// A running control plane.
pub struct ControlPlane {
    pub addr: SocketAddr,
    pub files: DataFiles,
    pub admin_token: String,
    pub state: Arc<State>,
    /// Where `GET /metrics` is served, with `--metrics-listen`.
    pub metrics_addr: Option<SocketAddr>,
    /// Where the injection webhook is served, with `--webhook-listen`.
    pub webhook_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    /// The metrics listener and OTLP metrics export.
    telemetry_tasks: Vec<tokio::task::JoinHandle<()>>,
    webhook_task: Option<tokio::task::JoinHandle<()>>,
    tracer: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl ControlPlane {
    /// Opens (or creates) the data directory, binds, and starts serving,
    /// with the default limits.
    pub async fn start(config: ServeConfig) -> anyhow::Result<ControlPlane> {
        Self::start_with_limits(config, ServeLimits::default()).await
    }

    /// [`ControlPlane::start`] with the listeners' and messages' `limits`.
    pub async fn start_with_limits(
        config: ServeConfig,
        limits: ServeLimits,
    ) -> anyhow::Result<ControlPlane> {
        let data_dir = config.data_dir.clone();
        let mut names = config.names.clone();
        for default in ["localhost", "127.0.0.1", "::1"] {
            if !names.iter().any(|n| n == default) {
                names.push(default.to_string());
            }
        }
        let tls_names = names.clone();
        let (ca, tls, files, token, store) = tokio::task::spawn_blocking(move || {
            let files = DataFiles::in_dir(&data_dir);
            crate::data_dir::prepare(&data_dir, &files, config.operator_ca.is_some())?;
            let ca =
                CaState::load_or_create(&files, &config.trust_domain, config.operator_ca.as_ref())?;
            let serving = ca.issue_server(&tls_names)?;
            let tls = tls::server_config(&serving.chain_pem, &serving.key_pem, &ca.roots_der())?;
            let token = admin_token(&files)?;
            let store = Store::open(&data_dir.join(crate::data_dir::STORE_FILE), config.history)
                .map_err(|e| anyhow::anyhow!("cannot open the store: {e}"))?;
            anyhow::Ok((ca, tls, files, token, store))
        })
        .await??;
        let store = Arc::new(store);
        let k8s_tokens = match config.kubernetes.clone() {
            Some((issuer, source)) => Some(
                TokenVerifier::new(issuer, source)
                    .await
                    .map_err(|e| anyhow::anyhow!("Kubernetes token issuer: {e}"))?,
            ),
            None => None,
        };

        let (version, resources, revoked) = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || {
                let (version, resources) = store.snapshot()?;
                Ok::<_, crate::store::StoreError>((version, resources, store.revocations()?))
            })
            .await?
            .map_err(|e| anyhow::anyhow!("cannot read the store: {e}"))?
        };
        let (policy, _) = watch::channel(Arc::new(Published::new(version, resources)));
        let (tls, tls_rx) = watch::channel(tls);
        let state = Arc::new(State {
            store,
            ca: watch::channel(Arc::new(ca)).0,
            ca_changes: tokio::sync::Mutex::new(()),
            tls,
            files: files.clone(),
            names,
            cert_ttl: config.cert_ttl,
            admin_token_hash: digest(&SHA256, token.as_bytes()).as_ref().to_vec(),
            policy,
            sidecars: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            next_nonce: AtomicU64::new(1),
            metrics: ControlMetrics::new(),
            k8s_tokens,
            revoked: Mutex::new(revoked),
            revocations: watch::channel(0).0,
        });

        let mut telemetry_tasks = Vec::new();
        let metrics_addr = match config.telemetry.metrics_listen {
            Some(listen) => {
                let listener = TcpListener::bind(listen).await?;
                let addr = listener.local_addr()?;
                let scraped = state.clone();
                telemetry_tasks.push(tokio::spawn(crate::telemetry::serve_metrics(
                    listener,
                    move || scraped.encode_metrics(),
                )));
                tracing::info!("serving metrics on http://{addr}/metrics");
                Some(addr)
            }
            None => None,
        };
        let tracer = match &config.telemetry.otlp_endpoint {
            Some(endpoint) => {
                let exported = state.clone();
                let failures = state.metrics.otlp_export_failures.clone();
                telemetry_tasks.push(tokio::spawn(pylon_proto::otlp_metrics::run(
                    pylon_proto::otlp_metrics::ExportConfig {
                        endpoint: endpoint.clone(),
                        service_name: "pylon-control".to_string(),
                        interval: OTLP_METRICS_INTERVAL,
                        timeout: Duration::from_secs(5),
                    },
                    move || exported.encode_metrics(),
                    move || {
                        failures.inc();
                    },
                )));
                tracing::info!(%endpoint, "exporting metrics and traces over OTLP");
                Some(crate::telemetry::tracer_provider(endpoint)?)
            }
            None => None,
        };

        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let webhook = match config.webhook {
            Some(webhook) => {
                let listener = TcpListener::bind(webhook.listen).await?;
                Some((listener.local_addr()?, listener, webhook.inject))
            }
            None => None,
        };
        // The admin token is checked (the interceptor) before a message is
        // decoded; the identity and discovery services decode theirs before
        // they authenticate the caller, so theirs are small.
        let admin = {
            let expected = state.admin_token_hash.clone();
            tonic::service::interceptor::InterceptedService::new(
                PolicyAdminServer::new(AdminApi(state.clone()))
                    .max_decoding_message_size(limits.admin_max_message),
                move |req: Request<()>| {
                    check_admin(&req, &expected)?;
                    Ok(req)
                },
            )
        };
        let discovery = DiscoveryServer::new(DiscoveryApi(state.clone()))
            .max_decoding_message_size(DISCOVERY_MAX_MESSAGE);
        let identity = IdentityServer::new(crate::identity::IdentityApi(state.clone()))
            .max_decoding_message_size(IDENTITY_MAX_MESSAGE);
        let (shutdown, mut stop) = watch::channel(false);
        let webhook_limits = limits.webhook.clone();
        let (age, age_grace) = (limits.max_connection_age, limits.max_connection_age_grace);
        let limits = limits.grpc;
        let guard = tls::Guard::new(
            limits.clone(),
            ListenerMetrics::new(state.metrics.clone(), "grpc"),
        )
        .with_lifetime(age.map(|age| age + age_grace));
        let incoming = tls::incoming(listener, tls_rx, guard);
        // tonic's own grace closes an aged connection without a GOAWAY
        // first, so the server only ends it gracefully (GOAWAY, then closed
        // when its calls are done) and the guard closes what outlives the
        // grace.
        let mut builder = tonic::transport::Server::builder();
        if let Some(age) = age {
            builder = builder.max_connection_age(age);
        }
        let task = tokio::spawn(
            builder
                .max_concurrent_streams(limits.max_concurrent_streams)
                .http2_max_pending_accept_reset_streams(Some(
                    limits.max_pending_accept_reset_streams,
                ))
                .http2_max_local_error_reset_streams(Some(limits.max_local_error_reset_streams))
                .http2_max_header_list_size(limits.max_header_list_size)
                .http2_keepalive_interval(Some(limits.keepalive_interval))
                .http2_keepalive_timeout(Some(limits.keepalive_interval * 2))
                .layer(RpcLayer::new(state.metrics.clone(), tracer.as_ref()))
                .layer(crate::limits::TooLargeLayer)
                .add_service(admin)
                .add_service(discovery)
                .add_service(identity)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                }),
        );
        let (webhook_addr, webhook_task) = match webhook {
            Some((webhook_addr, listener, inject)) => {
                let configs = tls::for_https(state.tls.subscribe());
                let guard = tls::Guard::new(
                    webhook_limits,
                    ListenerMetrics::new(state.metrics.clone(), "webhook"),
                );
                let task = tokio::spawn(crate::inject::webhook::serve(
                    listener, configs, guard, inject,
                ));
                tracing::info!(%webhook_addr, "serving the injection webhook");
                (Some(webhook_addr), Some(task))
            }
            None => (None, None),
        };
        tracing::info!(
            %addr,
            version,
            trust_bundle = %files.bundle.display(),
            admin_token = %files.admin_token.display(),
            "control plane serving"
        );
        Ok(ControlPlane {
            addr,
            files,
            admin_token: token,
            state,
            metrics_addr,
            webhook_addr,
            shutdown,
            task,
            telemetry_tasks,
            webhook_task,
            tracer,
        })
    }

    /// The trust bundle PEM.
    pub fn bundle_pem(&self) -> std::io::Result<String> {
        std::fs::read_to_string(&self.files.bundle)
    }

    /// Resolves when the server task ends (an error, or after `stop`).
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.send_replace(true);
        for task in self.telemetry_tasks.iter().chain(&self.webhook_task) {
            task.abort();
        }
        if let Some(tracer) = &self.tracer {
            // Sends what is queued; a missing collector only costs the
            // export timeout.
            let _ = tracer.shutdown();
        }
        self.task.await??;
        Ok(())
    }
}

fn check_admin<T>(req: &Request<T>, expected_hash: &[u8]) -> Result<(), Status> {
    let token = bearer(req).ok_or_else(|| Status::unauthenticated("an admin token is required"))?;
    // Comparing hashes: equal-length inputs, nothing about the token leaks
    // through the comparison's timing.
    if digest(&SHA256, token.as_bytes()).as_ref() == expected_hash {
        Ok(())
    } else {
        Err(Status::unauthenticated("the admin token is not valid"))
    }
}

fn key_of(r: Option<pb::ResourceRef>) -> Result<ResourceKey, Status> {
    let r = r.ok_or_else(|| Status::invalid_argument("a resource reference is required"))?;
    let kind = Kind::parse(&r.kind).ok_or_else(|| {
        Status::invalid_argument(format!(
            "unknown kind {:?} (expected one of: Backend, GRPCRoute, HTTPRoute, BackendTrafficPolicy, AuthorizationPolicy)",
            r.kind
        ))
    })?;
    Ok(ResourceKey {
        kind,
        namespace: if r.namespace.is_empty() {
            pylon_proto::policy::DEFAULT_NAMESPACE.to_string()
        } else {
            r.namespace
        },
        name: r.name,
    })
}

fn ref_of(key: &ResourceKey) -> pb::ResourceRef {
    pb::ResourceRef {
        kind: key.kind.as_str().to_string(),
        namespace: key.namespace.clone(),
        name: key.name.clone(),
    }
}

fn stored(r: &StoredResource) -> pb::StoredResource {
    pb::StoredResource {
        r#ref: Some(ref_of(&r.key)),
        resource_version: r.resource_version,
        yaml: to_yaml(std::slice::from_ref(&r.resource)),
    }
}

struct AdminApi(Arc<State>);

#[tonic::async_trait]
impl PolicyAdmin for AdminApi {
    async fn apply(
        &self,
        req: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let yaml = req.into_inner().yaml;
        let batch = pylon_proto::policy::parse_documents(&yaml)
            .map_err(|errors| Status::invalid_argument(errors.to_string()))?;
        if batch.is_empty() {
            return Err(Status::invalid_argument("no resource to apply"));
        }
        let store = self.0.store.clone();
        let applied = blocking(move || store.apply(batch)).await?;
        self.0.metrics.applies.inc();
        self.0.publish().await?;
        let results = applied
            .results
            .iter()
            .map(|(key, outcome, rv)| pb::ApplyResult {
                r#ref: Some(ref_of(key)),
                outcome: match outcome {
                    ApplyOutcome::Created => "created",
                    ApplyOutcome::Configured => "configured",
                    ApplyOutcome::Unchanged => "unchanged",
                }
                .to_string(),
                resource_version: *rv,
            })
            .collect();
        Ok(Response::new(pb::ApplyResponse {
            version: applied.version,
            results,
        }))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let key = key_of(req.into_inner().r#ref)?;
        let store = self.0.store.clone();
        let lookup = key.clone();
        let found = blocking(move || store.get(&lookup)).await?;
        let found = found.ok_or_else(|| Status::not_found(format!("{key} not found")))?;
        Ok(Response::new(pb::GetResponse {
            resource: Some(stored(&found)),
        }))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let req = req.into_inner();
        let kind = match req.kind.as_str() {
            "" => None,
            k => Some(
                Kind::parse(k)
                    .ok_or_else(|| Status::invalid_argument(format!("unknown kind {k:?}")))?,
            ),
        };
        let namespace = (!req.namespace.is_empty()).then_some(req.namespace);
        let store = self.0.store.clone();
        let (version, found) = blocking(move || {
            let version = store.version()?;
            Ok((version, store.list(kind, namespace.as_deref())?))
        })
        .await?;
        Ok(Response::new(pb::ListResponse {
            version,
            resources: found.iter().map(stored).collect(),
        }))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let key = key_of(req.into_inner().r#ref)?;
        let store = self.0.store.clone();
        let version = blocking(move || store.delete(&key)).await?;
        self.0.publish().await?;
        Ok(Response::new(pb::DeleteResponse { version }))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let store = self.0.store.clone();
        let (version, history) = blocking(move || Ok((store.version()?, store.history()?))).await?;
        let sidecars = self
            .0
            .sidecars()
            .iter()
            .map(|(id, s)| pb::SidecarStatus {
                id: id.to_string(),
                identity: s.identity.clone(),
                address: s.address.to_string(),
                acked_version: s.acked,
                nacked_version: s.nacked,
                last_nack_error: s.last_nack.clone(),
                connected_at_unix: unix(s.connected_at),
            })
            .collect();
        Ok(Response::new(pb::StatusResponse {
            version,
            sidecars,
            history,
        }))
    }

    async fn rollback(
        &self,
        req: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::RollbackResponse>, Status> {
        let target = req.into_inner().version;
        let store = self.0.store.clone();
        let version = blocking(move || store.rollback(target)).await?;
        self.0.publish().await?;
        Ok(Response::new(pb::RollbackResponse { version }))
    }

    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let req = req.into_inner();
        let ttl = match req.ttl_seconds {
            0 => Duration::from_secs(24 * 3600),
            s => Duration::from_secs(s),
        };
        let store = self.0.store.clone();
        let (info, secret) =
            blocking(move || store.create_token(&req.identity, ttl, req.once, SystemTime::now()))
                .await?;
        Ok(Response::new(pb::CreateTokenResponse {
            id: info.id,
            token: secret,
            expires_at_unix: unix(info.expires_at),
        }))
    }

    async fn list_tokens(
        &self,
        _req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let store = self.0.store.clone();
        let tokens = blocking(move || store.list_tokens()).await?;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: tokens
                .into_iter()
                .map(|t| pb::TokenInfo {
                    id: t.id,
                    identity: t.identity,
                    expires_at_unix: unix(t.expires_at),
                    once: t.once,
                    used: t.used,
                    revoked: t.revoked,
                })
                .collect(),
        }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let id = req.into_inner().id;
        let store = self.0.store.clone();
        let lookup = id.clone();
        // A SPIFFE ID instead of a token id revokes the identity: all its
        // tokens, and every certificate of it issued until now.
        if id.starts_with("spiffe://") {
            blocking(move || store.revoke_identity(&lookup, SystemTime::now())).await?;
        } else if blocking(move || store.revoke_token(&lookup, SystemTime::now()))
            .await?
            .is_none()
        {
            return Err(Status::not_found(format!("no token {id:?}")));
        }
        self.0.reload_revocations().await?;
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }

    async fn ca_status(
        &self,
        _req: Request<pb::CaStatusRequest>,
    ) -> Result<Response<pb::CaStatusResponse>, Status> {
        let ca = self.0.ca.borrow().clone();
        Ok(Response::new(ca_status(&ca, self.0.cert_ttl)))
    }

    async fn ca_add_root(
        &self,
        req: Request<pb::CaAddRootRequest>,
    ) -> Result<Response<pb::CaStatusResponse>, Status> {
        let req = req.into_inner();
        let material = CaMaterial {
            cert_pem: req.cert_pem,
            key_pem: req.key_pem,
            bundle_pem: req.bundle_pem,
        };
        if material.cert_pem.trim().is_empty() != material.key_pem.trim().is_empty() {
            return Err(Status::invalid_argument(
                "give both the CA certificate and its key, or neither (a new root is generated)",
            ));
        }
        let ca = self
            .0
            .change_ca(move |ca| {
                ca.add_root(&material)
                    .map_err(|e| Status::failed_precondition(format!("{e:#}")))
            })
            .await?;
        if let Some(p) = &ca.pending {
            tracing::info!(root = %p.cert.subject, fingerprint = %p.cert.fingerprint, "CA root added; its issuer is pending");
        }
        Ok(Response::new(ca_status(&ca, self.0.cert_ttl)))
    }

    async fn ca_activate(
        &self,
        _req: Request<pb::CaActivateRequest>,
    ) -> Result<Response<pb::CaStatusResponse>, Status> {
        let ca = self
            .0
            .change_ca(|ca| {
                ca.activate()
                    .map_err(|e| Status::failed_precondition(format!("{e:#}")))
            })
            .await?;
        tracing::info!(issuer = %ca.active.cert.subject, "CA issuer activated");
        Ok(Response::new(ca_status(&ca, self.0.cert_ttl)))
    }

    async fn ca_remove_root(
        &self,
        req: Request<pb::CaRemoveRootRequest>,
    ) -> Result<Response<pb::CaStatusResponse>, Status> {
        let fingerprint = req.into_inner().fingerprint;
        let ca = self
            .0
            .change_ca(move |ca| {
                ca.remove_root(&fingerprint)
                    .map_err(|e| Status::failed_precondition(format!("{e:#}")))
            })
            .await?;
        tracing::info!(roots = ca.roots.len(), "CA root removed");
        Ok(Response::new(ca_status(&ca, self.0.cert_ttl)))
    }
}

fn ca_cert(c: &crate::ca::CaCert) -> pb::CaCertificate {
    pb::CaCertificate {
        subject: c.subject.clone(),
        fingerprint: c.fingerprint.clone(),
        not_before_unix: c.not_before,
        not_after_unix: c.not_after,
        pem: c.pem.clone(),
    }
}

fn ca_status(ca: &CaState, ttl: Duration) -> pb::CaStatusResponse {
    let issuer = |s: &crate::ca::Signer| pb::CaIssuer {
        certificate: Some(ca_cert(&s.cert)),
        roots: s.anchors.clone(),
    };
    pb::CaStatusResponse {
        roots: ca.roots.iter().map(ca_cert).collect(),
        active: Some(issuer(&ca.active)),
        pending: ca.pending.as_deref().map(issuer),
        activated_at_unix: ca.activated_at.unwrap_or(0),
        previous_certificates_valid_until_unix: ca
            .activated_at
            .map_or(0, |t| t + ttl.as_secs() as i64),
        certificate_ttl_seconds: ttl.as_secs(),
    }
}

struct DiscoveryApi(Arc<State>);

type PolicyStream = Pin<Box<dyn Stream<Item = Result<pb::DiscoveryResponse, Status>> + Send>>;

/// Removes a sidecar from the status table when its stream ends.
struct Registration(Arc<State>, u64);

impl Drop for Registration {
    fn drop(&mut self) {
        self.0.sidecars().remove(&self.1);
    }
}

#[tonic::async_trait]
impl Discovery for DiscoveryApi {
    type StreamPolicyStream = PolicyStream;

    async fn stream_policy(
        &self,
        req: Request<Streaming<pb::DiscoveryRequest>>,
    ) -> Result<Response<PolicyStream>, Status> {
        let state = self.0.clone();
        let caller = crate::identity::authenticate(&state, &req, false).await?;
        let identity = caller.identity.clone();
        let address = req
            .extensions()
            .get::<PeerInfo>()
            .map_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)), |p| p.addr);
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await
            .map_err(crate::limits::too_large_status)?
            .ok_or_else(|| {
                Status::invalid_argument("the stream ended before the sidecar said who it is")
            })?;
        if !first.identity.is_empty() && first.identity != identity {
            return Err(Status::permission_denied(format!(
                "the credential is for {identity}, not {}",
                first.identity
            )));
        }

        let id = state.next_id.fetch_add(1, Ordering::Relaxed);
        state.sidecars().insert(
            id,
            SidecarRecord {
                identity: identity.clone(),
                address,
                acked: 0,
                nacked: 0,
                last_nack: String::new(),
                connected_at: SystemTime::now(),
            },
        );
        tracing::info!(id, %identity, %address, "sidecar connected");
        let registration = Registration(state.clone(), id);
        let (tx, rx) = mpsc::channel(2);
        let mut updates = state.policy.subscribe();
        let mut revocations = state.revocations.subscribe();
        tokio::spawn(async move {
            let _registration = registration;
            // The first snapshot goes out at once.
            updates.mark_changed();
            loop {
                tokio::select! {
                    changed = updates.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let published = updates.borrow_and_update().clone();
                        let nonce = state.next_nonce.fetch_add(1, Ordering::Relaxed).to_string();
                        let response = pb::DiscoveryResponse {
                            version: published.version,
                            nonce,
                            yaml: published.yaml_for(&identity).to_string(),
                        };
                        if tx.send(Ok(response)).await.is_err() {
                            return;
                        }
                        state.metrics.pushes.inc();
                    }
                    _ = revocations.changed() => if caller.is_revoked(&state) {
                        tracing::info!(id, %identity, "policy stream ended: the identity was revoked");
                        let _ = tx.send(Err(crate::identity::revoked_status(&caller))).await;
                        return;
                    },
                    message = inbound.message() => match message {
                        Ok(Some(m)) => record_reply(&state, id, &m),
                        Err(e) if crate::limits::is_too_large(e.code() as i32, e.message()) => {
                            tracing::info!(id, error = %e, "sidecar disconnected: a message over the limit");
                            let _ = tx.send(Err(crate::limits::too_large_status(e))).await;
                            return;
                        }
                        Ok(None) | Err(_) => {
                            tracing::info!(id, "sidecar disconnected");
                            return;
                        }
                    },
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Records an ACK or NACK.
fn record_reply(state: &State, id: u64, m: &pb::DiscoveryRequest) {
    let mut sidecars = state.sidecars();
    let Some(record) = sidecars.get_mut(&id) else {
        return;
    };
    if m.error.is_empty() {
        record.acked = m.version;
        state.metrics.acks.inc();
        tracing::debug!(id, version = m.version, "ACK");
    } else {
        record.nacked = m.version;
        state.metrics.nacks.inc();
        record.last_nack = m.error.clone();
        tracing::warn!(id, identity = %record.identity, version = m.version, error = %m.error, "NACK");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = "apiVersion: pylon.dev/v1
kind: Backend
metadata: { name: app }
spec: { endpoints: { static: [\"10.0.0.1:80\"] } }
---
apiVersion: pylon.dev/v1
kind: BackendTrafficPolicy
metadata: { name: app-policy }
spec:
  targetRef: { kind: Backend, name: app }
  rateLimit: { requestsPerSecond: 10 }
---
apiVersion: pylon.dev/v1
kind: BackendTrafficPolicy
metadata: { name: greeter-limits }
spec:
  targetRef: { kind: ServiceAccount, name: greeter }
  rateLimit: { requestsPerSecond: 10 }
---
apiVersion: pylon.dev/v1
kind: AuthorizationPolicy
metadata: { name: greeter-authz }
spec:
  targetRef: { kind: ServiceAccount, name: greeter }
  rules: [{}]
---
apiVersion: pylon.dev/v1
kind: AuthorizationPolicy
metadata: { name: other-authz }
spec:
  targetRef: { kind: ServiceAccount, name: other }
  rules: []
";

    #[test]
    fn a_snapshot_carries_the_mesh_and_only_the_workloads_own_inbound_policies() {
        let published = Published::new(1, pylon_proto::policy::parse_documents(MESH).unwrap());
        let names = |yaml: &str| {
            pylon_proto::policy::parse_documents(yaml)
                .unwrap()
                .into_iter()
                .map(|r| r.metadata.name)
                .collect::<Vec<_>>()
        };
        let greeter = published.yaml_for("spiffe://td/ns/default/sa/greeter");
        assert_eq!(
            names(&greeter),
            ["app", "app-policy", "greeter-limits", "greeter-authz"]
        );
        let other = published.yaml_for("spiffe://td/ns/default/sa/other");
        assert_eq!(names(&other), ["app", "app-policy", "other-authz"]);
        // Same name, another namespace: not the same service account.
        let elsewhere = published.yaml_for("spiffe://td/ns/prod/sa/greeter");
        assert_eq!(names(&elsewhere), ["app", "app-policy"]);
        // Workloads with nothing of their own share one rendering.
        let a = published.yaml_for("spiffe://td/ns/default/sa/a");
        let b = published.yaml_for("spiffe://td/ns/default/sa/b");
        assert!(Arc::ptr_eq(&a, &b) && Arc::ptr_eq(&a, &elsewhere));
    }
}
