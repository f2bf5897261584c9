//! The control plane's shared state: the store, the CA, the policy every
//! sidecar should run, the connected sidecars and the metrics. The admin
//! API and the discovery stream ([`crate::server`]) and the identity
//! service ([`crate::identity`]) all work on it; it imports neither.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use pylon_proto::policy::{Resource, Spec, TargetKind, to_yaml};
use tokio::sync::watch;
use tonic::{Request, Status};

use crate::ca::{CaState, DataFiles};
use crate::k8s_token::TokenVerifier;
use crate::store::{Store, StoreError};
use crate::telemetry::ControlMetrics;
use crate::tls;

/// The policy every sidecar should run. What a sidecar receives depends
/// on which inbound policies target its service account; each distinct
/// selection is rendered once per version.
#[derive(Debug)]
pub struct Published {
    pub version: u64,
    pub(crate) resources: Vec<Resource>,
    /// By the indices (into `resources`) of the inbound policies selected.
    pub(crate) rendered: Mutex<HashMap<Vec<usize>, Arc<String>>>,
}

impl Published {
    pub(crate) fn new(version: u64, resources: Vec<Resource>) -> Published {
        Published {
            version,
            resources,
            rendered: Mutex::new(HashMap::new()),
        }
    }

    /// The snapshot for the workload `identity`: every Backend, route and
    /// Backend policy of the mesh (its outbound side), and only the
    /// inbound policies (AuthorizationPolicy, BackendTrafficPolicy by
    /// ServiceAccount) that target its own service account in its own
    /// namespace.
    pub fn yaml_for(&self, identity: &str) -> Arc<String> {
        let workload = pylon_proto::spiffe::parse(identity);
        let targets_me = |r: &Resource, refs: &[pylon_proto::policy::TargetRef]| {
            workload.as_ref().is_some_and(|w| {
                r.metadata.namespace == w.namespace
                    && refs.iter().any(|t| {
                        t.kind == TargetKind::ServiceAccount && t.name == w.service_account
                    })
            })
        };
        // Every resource is either for all (None) or inbound-only, and then
        // for this workload or not.
        let selection = |r: &Resource| -> Option<bool> {
            match &r.spec {
                Spec::AuthorizationPolicy(p) => Some(targets_me(r, &p.target_refs)),
                Spec::BackendTrafficPolicy(p)
                    if !p.target_refs.iter().any(|t| t.kind == TargetKind::Backend) =>
                {
                    Some(targets_me(r, &p.target_refs))
                }
                _ => None,
            }
        };
        let mine: Vec<usize> = self
            .resources
            .iter()
            .enumerate()
            .filter(|(_, r)| selection(r) == Some(true))
            .map(|(i, _)| i)
            .collect();
        let mut rendered = self.rendered.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(yaml) = rendered.get(&mine) {
            return yaml.clone();
        }
        let scoped: Vec<Resource> = self
            .resources
            .iter()
            .filter(|r| selection(r) != Some(false))
            .cloned()
            .collect();
        let yaml = Arc::new(to_yaml(&scoped));
        rendered.insert(mine, yaml.clone());
        yaml
    }
}

/// One connected sidecar.
#[derive(Debug, Clone)]
pub(crate) struct SidecarRecord {
    pub(crate) identity: String,
    pub(crate) address: SocketAddr,
    pub(crate) acked: u64,
    pub(crate) nacked: u64,
    pub(crate) last_nack: String,
    pub(crate) connected_at: SystemTime,
}

/// What the services share.
pub struct State {
    pub(crate) store: Arc<Store>,
    /// The mesh CA now; every change is published here.
    pub(crate) ca: watch::Sender<Arc<CaState>>,
    /// Serializes CA changes (each one persisted before it is published).
    pub(crate) ca_changes: tokio::sync::Mutex<()>,
    /// The TLS configuration new connections get.
    pub(crate) tls: watch::Sender<Arc<rustls::ServerConfig>>,
    pub(crate) files: DataFiles,
    pub(crate) names: Vec<String>,
    pub(crate) cert_ttl: Duration,
    pub(crate) admin_token_hash: Vec<u8>,
    pub(crate) policy: watch::Sender<Arc<Published>>,
    pub(crate) sidecars: Mutex<BTreeMap<u64, SidecarRecord>>,
    pub(crate) next_id: AtomicU64,
    pub(crate) next_nonce: AtomicU64,
    pub(crate) metrics: Arc<ControlMetrics>,
    /// Verifies pods' service-account tokens, when configured.
    pub(crate) k8s_tokens: Option<TokenVerifier>,
    /// The deny list as the store holds it: each revoked identity and when
    /// it was last revoked (Unix seconds).
    pub(crate) revoked: Mutex<HashMap<String, i64>>,
    /// Bumped after each revocation, so that open streams check their
    /// caller again.
    pub(crate) revocations: watch::Sender<u64>,
}

impl State {
    /// Prometheus text of the control plane's metrics, gauges set now.
    pub fn encode_metrics(&self) -> String {
        let m = &self.metrics;
        m.connected_sidecars
            .set(i64::try_from(self.sidecars().len()).unwrap_or(i64::MAX));
        m.policy_version
            .set(i64::try_from(self.policy.borrow().version).unwrap_or(i64::MAX));
        let ca = self.ca.borrow().clone();
        m.ca_version
            .set(i64::try_from(ca.version).unwrap_or(i64::MAX));
        m.trust_bundle_roots
            .set(i64::try_from(ca.roots.len()).unwrap_or(i64::MAX));
        m.encode()
    }

    /// Whether a credential of `identity` authorized at `authorized_at`
    /// (Unix seconds) was revoked since: the identity was revoked at or
    /// after that moment.
    pub(crate) fn is_revoked(&self, identity: &str, authorized_at: i64) -> bool {
        self.revoked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(identity)
            .is_some_and(|&at| at >= authorized_at)
    }

    /// Takes the store's deny list after a revocation, and tells open
    /// streams.
    pub(crate) async fn reload_revocations(&self) -> Result<(), Status> {
        let store = self.store.clone();
        let revoked = blocking(move || store.revocations()).await?;
        *self.revoked.lock().unwrap_or_else(PoisonError::into_inner) = revoked;
        self.revocations.send_modify(|n| *n += 1);
        Ok(())
    }

    pub(crate) fn sidecars(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, SidecarRecord>> {
        self.sidecars.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the CA: the new state is persisted, then served (a serving
    /// certificate from the issuer now active, client certificates checked
    /// against the new bundle), then published to every watcher.
    pub(crate) async fn change_ca(
        &self,
        change: impl FnOnce(&CaState) -> Result<CaState, Status> + Send + 'static,
    ) -> Result<Arc<CaState>, Status> {
        let _serialized = self.ca_changes.lock().await;
        let current = self.ca.borrow().clone();
        let files = self.files.clone();
        let names = self.names.clone();
        let (next, tls) = tokio::task::spawn_blocking(move || {
            let next = change(&current)?;
            let internal = |e: anyhow::Error| Status::internal(format!("{e:#}"));
            next.persist(&files).map_err(internal)?;
            let serving = next.issue_server(&names).map_err(internal)?;
            let tls = tls::server_config(&serving.chain_pem, &serving.key_pem, &next.roots_der())
                .map_err(internal)?;
            Ok::<_, Status>((Arc::new(next), tls))
        })
        .await
        .map_err(|e| Status::internal(format!("CA task failed: {e}")))??;
        self.tls.send_replace(tls);
        self.ca.send_replace(next.clone());
        Ok(next)
    }

    /// Publishes the store's current policy to every sidecar.
    pub(crate) async fn publish(&self) -> Result<(), Status> {
        let store = self.store.clone();
        let published = blocking(move || {
            let (version, resources) = store.snapshot()?;
            Ok(Published::new(version, resources))
        })
        .await?;
        self.policy.send_if_modified(|current| {
            if current.version == published.version {
                return false;
            }
            *current = Arc::new(published);
            true
        });
        Ok(())
    }
}

/// Runs a store call off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("store task failed: {e}")))?
        .map_err(status_of)
}

pub(crate) fn status_of(e: StoreError) -> Status {
    match e {
        StoreError::Invalid(errors) => Status::invalid_argument(errors.to_string()),
        e @ StoreError::Conflict { .. } => Status::aborted(e.to_string()),
        e @ (StoreError::NotFound(_) | StoreError::UnknownVersion(_)) => {
            Status::not_found(e.to_string())
        }
        e @ StoreError::BadRequest(_) => Status::invalid_argument(e.to_string()),
        e @ StoreError::Db(_) => Status::internal(e.to_string()),
    }
}

pub(crate) fn bearer<T>(req: &Request<T>) -> Option<&str> {
    req.metadata()
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}
