//! The control-plane policy source: a discovery stream to `pylon-control`.
//!
//! Each snapshot the control plane sends goes through the same
//! parse-validate-compile path as a policy file; the sidecar acknowledges it
//! (ACK) or refuses it with the reason (NACK) and keeps its last good
//! policy. Every policy it acknowledges is also written to the state
//! directory, atomically, so that a sidecar restarted while the control
//! plane is down serves that policy at once (and says so in `/ready`) while
//! it keeps trying to connect. Reconnects back off exponentially with full
//! jitter; HTTP/2 keepalives find a dead control plane.
//!
//! Not here: how a snapshot is compiled ([`super::compile`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pylon_proto::backoff::Backoff;
use pylon_proto::v1::discovery_client::DiscoveryClient;
use pylon_proto::v1::{DiscoveryRequest, DiscoveryResponse};
use rustls::RootCertStore;
use tokio::sync::mpsc;
use tonic::Request;

use super::{PolicyStore, SourceState};
use crate::identity::IdentityStore;

/// The first wait before a reconnect; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The file in the state directory that holds the last acknowledged policy.
pub const CACHE_FILE: &str = "policy-cache.yaml";
const CACHE_HEADER: &str = "# pylon policy cache, version ";

/// Where the control plane is and how to prove who we are.
#[derive(Debug, Clone)]
pub struct ControlPlaneSource {
    pub address: String,
    /// The CA to verify the control plane with; the mesh trust bundle when
    /// absent.
    pub ca_file: Option<PathBuf>,
    /// The bootstrap token; optional when the workload certificate is
    /// presented.
    pub token_file: Option<PathBuf>,
    /// Present the workload certificate (one the control plane issued).
    pub present_certificate: bool,
    /// Where the last good policy is kept; no cache when absent.
    pub state_dir: Option<PathBuf>,
    /// The largest policy accepted.
    pub max_bytes: usize,
}

/// Reads the cached policy: (version, YAML).
pub fn read_cache(state_dir: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string(state_dir.join(CACHE_FILE)).ok()?;
    let (first, rest) = text.split_once('\n')?;
    let version = first.strip_prefix(CACHE_HEADER)?.trim().to_string();
    Some((version, rest.to_string()))
}

/// Writes the policy cache atomically (`pylon_proto::fs`), with the mode
/// `File::create` gives (0666 less the umask).
fn write_cache(state_dir: &Path, version: &str, yaml: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let contents = format!("{CACHE_HEADER}{version}\n{yaml}");
    pylon_proto::fs::write_atomic(&state_dir.join(CACHE_FILE), contents.as_bytes(), 0o666)
}

/// Serves the cached policy (if any), then follows the control plane until
/// the task is dropped.
pub async fn run(
    source: ControlPlaneSource,
    store: Arc<PolicyStore>,
    identity: Arc<IdentityStore>,
) {
    if let Some(dir) = source.state_dir.clone() {
        let cached = tokio::task::spawn_blocking(move || read_cache(&dir))
            .await
            .ok()
            .flatten();
        if let Some((version, yaml)) = cached {
            match store.apply(&yaml, version.clone()) {
                Ok(()) => {
                    tracing::info!(%version, "serving the cached policy until the control plane answers");
                    store.set_source_state(|s| s.from_cache = true);
                }
                Err(errors) => tracing::warn!(?errors, "the cached policy is not usable"),
            }
        }
    }
    let mut backoff = Backoff::full_jitter(MIN_BACKOFF, MAX_BACKOFF);
    loop {
        match follow(&source, &store, &identity).await {
            Ok(()) => {
                backoff.reset();
                tracing::warn!(address = %source.address, "the control plane closed the policy stream");
            }
            Err(e) => {
                tracing::warn!(address = %source.address, error = %e, "no policy stream from the control plane");
                store.set_source_state(|s| s.last_error = Some(e.to_string()));
            }
        }
        store.set_source_state(|s| s.connected = false);
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Status(#[from] tonic::Status),
}

/// One policy stream: connects, subscribes, applies and answers snapshots
/// until the stream ends. `Ok` once a stream was established and ended.
async fn follow(
    source: &ControlPlaneSource,
    store: &PolicyStore,
    identity: &Arc<IdentityStore>,
) -> Result<(), StreamError> {
    let token = match &source.token_file {
        Some(path) => match tokio::fs::read_to_string(path).await {
            Ok(t) => Some(t),
            // With a certificate to show, the token is a fallback only.
            Err(_) if source.present_certificate => None,
            Err(e) => return Err(StreamError::Setup(format!("{}: {e}", path.display()))),
        },
        None => None,
    };
    // The control plane's serving certificate follows the mesh CA through a
    // rotation: trust the configured roots and the live mesh bundle.
    let mut roots = match &source.ca_file {
        Some(path) => pylon_proto::tls_roots::roots_from_file(path).map_err(StreamError::Setup)?,
        None => RootCertStore::empty(),
    };
    roots.roots.extend(identity.roots().roots.iter().cloned());
    let client_cert = source
        .present_certificate
        .then(|| crate::identity::tls::client_cert_resolver(identity));
    let tls = pylon_proto::client::client_config(roots, client_cert)
        .map_err(|e| StreamError::Setup(e.to_string()))?;
    let channel = pylon_proto::client::lazy_channel(&source.address, tls)
        .map_err(|e| StreamError::Setup(e.to_string()))?;
    let mut client =
        DiscoveryClient::new(channel).max_decoding_message_size(source.max_bytes + 4096);

    let (replies, outgoing) = mpsc::channel(4);
    let hello = DiscoveryRequest {
        identity: identity.spiffe_id(),
        ..Default::default()
    };
    replies
        .send(hello)
        .await
        .map_err(|_| StreamError::Setup("the request stream closed".into()))?;
    let mut req = Request::new(tokio_stream::wrappers::ReceiverStream::new(outgoing));
    if let Some(token) = token {
        pylon_proto::client::insert_bearer(req.metadata_mut(), token.trim())
            .map_err(|_| StreamError::Setup("the token file holds no valid token".into()))?;
    }
    let mut snapshots = client.stream_policy(req).await?.into_inner();
    store.set_source_state(|s| {
        s.connected = true;
        s.last_error = None;
    });
    tracing::info!(address = %source.address, "policy stream open");
    while let Some(snapshot) = snapshots.message().await? {
        let reply = apply(source, store, &snapshot).await;
        if replies.send(reply).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Applies one snapshot; the answer is its ACK or NACK.
async fn apply(
    source: &ControlPlaneSource,
    store: &PolicyStore,
    s: &DiscoveryResponse,
) -> DiscoveryRequest {
    let version = s.version.to_string();
    let outcome = if s.yaml.len() > source.max_bytes {
        Err(vec![format!(
            "the policy is {} bytes, more than policy.maxBytes ({})",
            s.yaml.len(),
            source.max_bytes
        )])
    } else {
        store.apply(&s.yaml, version.clone())
    };
    match outcome {
        Ok(()) => {
            tracing::info!(%version, "policy installed from the control plane");
            store.set_source_state(|st| st.from_cache = false);
            if let Some(dir) = source.state_dir.clone() {
                let yaml = s.yaml.clone();
                let v = version.clone();
                let written =
                    tokio::task::spawn_blocking(move || write_cache(&dir, &v, &yaml)).await;
                if let Ok(Err(e)) | Err(e) = written.map_err(std::io::Error::other) {
                    tracing::warn!(error = %e, "cannot write the policy cache");
                }
            }
            DiscoveryRequest {
                version: s.version,
                nonce: s.nonce.clone(),
                ..Default::default()
            }
        }
        Err(errors) => {
            tracing::error!(%version, count = errors.len(), "policy refused (NACK); keeping the current policy");
            for e in &errors {
                tracing::error!("  {e}");
            }
            DiscoveryRequest {
                version: s.version,
                nonce: s.nonce.clone(),
                error: errors.join("\n"),
                ..Default::default()
            }
        }
    }
}

impl SourceState {
    /// How `/ready` describes the policy's origin, when it is worth saying.
    pub fn note(&self) -> Option<&'static str> {
        (self.from_cache && !self.connected)
            .then_some("policy from the cache; control plane unreachable")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_round_trips_and_is_replaced_whole() {
        let dir = std::env::temp_dir().join(format!(
            "pylon-cache-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        write_cache(&dir, "7", "kind: X\n").unwrap();
        assert_eq!(read_cache(&dir), Some(("7".into(), "kind: X\n".into())));
        write_cache(&dir, "8", "").unwrap();
        assert_eq!(read_cache(&dir), Some(("8".into(), String::new())));
        assert!(!dir.join(format!("{CACHE_FILE}.tmp")).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
