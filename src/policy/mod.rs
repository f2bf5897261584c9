//! The sidecar's live policy: an immutable [`Snapshot`] behind one `ArcSwap`.
//!
//! A new policy is parsed, validated and compiled off the request path, then
//! installed with a single store. Requests in flight keep the `Arc`s they
//! took from the snapshot they started with, so a swap never disturbs them.
//! A policy that fails to parse or compile is logged with all its errors and
//! the previous snapshot stays in force.
//!
//! Sources feed [`PolicyStore::apply`]: today the watched file ([`file`]).

pub mod admission;
pub mod authz;
pub mod backend;
pub mod compile;
pub mod control;
pub mod file;
pub mod inbound;
pub mod routing;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use arc_swap::{ArcSwap, Guard};
use pylon_proto::policy::Resource;

use crate::discovery::Dns;
use crate::identity::IdentityStore;
use crate::telemetry::metrics::Metrics;
use authz::Authorization;
use backend::Backend;
use inbound::InboundLimits;
use routing::{ClusterDns, RouteTable};

/// A compiled policy: what every request reads.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Content hash (file source) of the policy this was compiled from.
    pub version: String,
    pub resources: Vec<Resource>,
    pub routes: RouteTable,
    /// By `namespace/name`.
    pub backends: BTreeMap<String, Arc<Backend>>,
    /// The protection of the local app (the AuthorizationPolicies and the
    /// BackendTrafficPolicy targeting this workload's service account).
    pub inbound: InboundPolicy,
}

/// Who may call the local app, and limits on those calls.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InboundPolicy {
    pub authorization: Arc<Authorization>,
    pub max_parallel_requests: Option<u32>,
    pub rate_limit: Option<pylon_proto::policy::RateLimit>,
}

/// The outcome of the last attempt to install a policy, for `/config` and
/// readiness.
#[derive(Debug, Clone, Default)]
pub struct ApplyStatus {
    pub last_applied: Option<SystemTime>,
    pub last_error: Option<Vec<String>>,
    pub last_rejected_version: Option<String>,
}

/// The state of a streamed policy source, for `/ready` and `/config`.
#[derive(Debug, Clone, Default)]
pub struct SourceState {
    /// A policy stream is open.
    pub connected: bool,
    /// The policy in force came from the on-disk cache.
    pub from_cache: bool,
    /// Why the last attempt to reach the source failed.
    pub last_error: Option<String>,
}

/// The current snapshot and how it got there.
pub struct PolicyStore {
    current: ArcSwap<Snapshot>,
    installed: AtomicBool,
    status: Mutex<ApplyStatus>,
    identity: Arc<IdentityStore>,
    metrics: Arc<Metrics>,
    dns: Arc<Dns>,
    inbound: Arc<InboundLimits>,
    cluster: ClusterDns,
    source: String,
    source_state: Mutex<SourceState>,
}

impl std::fmt::Debug for PolicyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyStore")
            .field("source", &self.source)
            .finish()
    }
}

impl PolicyStore {
    /// An empty store (no route for anything) until a policy is applied.
    /// `cluster` names Kubernetes Services for every policy compiled here.
    pub fn new(
        identity: Arc<IdentityStore>,
        metrics: Arc<Metrics>,
        dns: Arc<Dns>,
        cluster: ClusterDns,
        source: String,
    ) -> Arc<Self> {
        Arc::new(PolicyStore {
            current: ArcSwap::from_pointee(Snapshot::default()),
            installed: AtomicBool::new(false),
            status: Mutex::new(ApplyStatus::default()),
            inbound: Arc::new(InboundLimits::new(&metrics)),
            identity,
            metrics,
            dns,
            cluster,
            source,
            source_state: Mutex::new(SourceState::default()),
        })
    }

    /// The protection of the local app, configured by policy.
    pub fn inbound_limits(&self) -> &Arc<InboundLimits> {
        &self.inbound
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The current snapshot. Cheap; hold it only while routing a request.
    pub fn load(&self) -> Guard<Arc<Snapshot>> {
        self.current.load()
    }

    pub fn load_full(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Whether any policy has been installed yet.
    pub fn installed(&self) -> bool {
        self.installed.load(Ordering::Acquire)
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn source_state(&self) -> SourceState {
        self.source_state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn set_source_state(&self, change: impl FnOnce(&mut SourceState)) {
        change(
            &mut self
                .source_state
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
    }

    pub fn status(&self) -> ApplyStatus {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Parses, validates and compiles `yaml`, then installs it. On any
    /// error nothing changes and every problem is returned.
    pub fn apply(&self, yaml: &str, version: String) -> Result<(), Vec<String>> {
        match pylon_proto::policy::parse(yaml) {
            Ok(resources) => self.install(resources, version),
            Err(errors) => {
                let errors: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
                self.rejected(version, errors.clone());
                Err(errors)
            }
        }
    }

    /// Compiles validated `resources` and installs them: the Backends'
    /// new configuration, then the new snapshot. On any error nothing
    /// changes and every problem is returned.
    ///
    /// The previous snapshot is [`retire`]d: dropped off this thread when
    /// a runtime is at hand.
    pub fn install(&self, resources: Vec<Resource>, version: String) -> Result<(), Vec<String>> {
        let ctx = compile::CompileContext {
            identity: &self.identity,
            metrics: &self.metrics,
            service_account: crate::identity::service_account(&self.identity.spiffe_id()),
            cluster: &self.cluster,
        };
        let (snapshot, updates) =
            match compile::compile(resources, version.clone(), &self.current.load(), &ctx) {
                Ok(compiled) => compiled,
                Err(errors) => {
                    self.rejected(version, errors.clone());
                    return Err(errors);
                }
            };
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        // The policy compiled whole: now its backends change.
        for u in updates {
            u.backend.apply(u.config);
            u.backend.set_endpoints(&u.endpoints, &self.dns);
        }
        self.inbound.apply(&snapshot.inbound);
        let previous = self.current.swap(Arc::new(snapshot));
        self.installed.store(true, Ordering::Release);
        *status = ApplyStatus {
            last_applied: Some(SystemTime::now()),
            last_error: None,
            last_rejected_version: None,
        };
        drop(status);
        retire(previous);
        Ok(())
    }

    fn rejected(&self, version: String, errors: Vec<String>) {
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        status.last_error = Some(errors);
        status.last_rejected_version = Some(version);
    }
}

/// Lets go of a snapshot a newer one replaced. Freeing a large one is many
/// small deallocations (about half of a 10,000-route reload's CPU): on a
/// Tokio runtime that is done on its blocking pool, so that neither the
/// apply nor the requests of a one-worker sidecar wait for it. Requests
/// still holding parts of it keep those alive as before.
fn retire(previous: Arc<Snapshot>) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn_blocking(move || drop(previous));
        }
        Err(_) => drop(previous),
    }
}

/// A short stable hash of policy text, used as its version.
pub fn content_version(bytes: &[u8]) -> String {
    // FNV-1a: stable across builds and platforms, unlike std's SipHash keys.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Sets the gauges that describe current state: ejected endpoints per
/// backend, the policy version, the certificate's expiry, the trust bundle
/// and the control-plane connection. Called before every scrape and export.
pub fn refresh_gauges(policy: &PolicyStore, identity: &IdentityStore) {
    let snapshot = policy.load_full();
    let now = tokio::time::Instant::now();
    for backend in snapshot.backends.values() {
        let ejected = i64::try_from(backend.ejected(now)).unwrap_or(i64::MAX);
        backend.metrics.ejections_active.set(ejected);
    }
    let state = &policy.metrics().state;
    state
        .policy_version
        .set(snapshot.version.trim().parse::<i64>().unwrap_or(0));
    state.policy_installed.set(i64::from(policy.installed()));
    state
        .certificate_expiry
        .set(identity.credentials().not_after);
    state
        .trust_bundle_roots
        .set(i64::try_from(identity.bundle_fingerprints().len()).unwrap_or(i64::MAX));
    state
        .control_plane_connected
        .set(i64::from(policy.source_state().connected));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_runtime_a_retired_snapshot_is_dropped_at_once() {
        let snapshot = Arc::new(Snapshot::default());
        let weak = Arc::downgrade(&snapshot);
        retire(snapshot);
        assert!(weak.upgrade().is_none());
    }

    #[tokio::test]
    async fn on_a_runtime_a_retired_snapshot_is_dropped_on_the_blocking_pool() {
        let snapshot = Arc::new(Snapshot::default());
        let weak = Arc::downgrade(&snapshot);
        retire(snapshot);
        for _ in 0..500 {
            if weak.upgrade().is_none() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        panic!("the retired snapshot is still alive");
    }
}
