//! The control-plane policy source: a discovery stream to `pylon-control`.
//!
//! Each snapshot the control plane sends goes through the same
//! parse-validate-compile path as a policy file; the sidecar acknowledges it
//! (ACK) or refuses it with the reason (NACK) and keeps its last good
//! policy. Every policy it installs is also written to the state
//! directory (0700), atomically, 0600, with its SHA-256, so that a sidecar
//! restarted while the control plane is down serves that policy at once
//! (and says so in `/ready`) while it keeps trying to connect; a cache
//! whose checksum does not match is refused as if there were none.
//!
//! A snapshot is acknowledged only once it is both installed and kept:
//! when the cache cannot be written (after a few tries), the snapshot stays
//! installed — the newest policy is the one in force, a revoked permission
//! stays revoked — but is NACKed with the reason, and the older cache is
//! removed, so that a restart never silently serves a policy older than
//! the one that was in force (where even that fails, a read-only
//! directory, a warning says the older cache stays). Reconnects back off exponentially with full
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
use crate::identity::secrets::{PRIVATE_FILE, private_dir};

/// The first wait before a reconnect; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The file in the state directory that holds the last acknowledged policy.
pub const CACHE_FILE: &str = "policy-cache.yaml";
const CACHE_HEADER: &str = "# pylon policy cache, version ";
/// Between the version and the checksum of the YAML in the header line.
const CACHE_CHECKSUM: &str = ", sha256 ";
/// Waits between tries to write the cache; then the snapshot is NACKed.
const CACHE_RETRIES: [Duration; 2] = [Duration::from_millis(100), Duration::from_millis(500)];

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

/// Reads the cached policy: (version, YAML); `None` when there is none, or
/// when its checksum does not match (a warning says so).
pub fn read_cache(state_dir: &Path) -> Option<(String, String)> {
    let path = state_dir.join(CACHE_FILE);
    let text = std::fs::read_to_string(&path).ok()?;
    let checked = text.split_once('\n').and_then(|(first, yaml)| {
        let (version, sum) = first
            .strip_prefix(CACHE_HEADER)?
            .rsplit_once(CACHE_CHECKSUM)?;
        (sum.trim() == sha256_hex(yaml)).then(|| (version.trim().to_string(), yaml.to_string()))
    });
    if checked.is_none() {
        tracing::warn!(
            path = %path.display(),
            "the policy cache is damaged or altered (its checksum does not match); not using it"
        );
    }
    checked
}

fn sha256_hex(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes the policy cache atomically (`pylon_proto::fs`), 0600 in a 0700
/// directory, with the checksum of the YAML.
fn write_cache(state_dir: &Path, version: &str, yaml: &str) -> std::io::Result<()> {
    private_dir(state_dir)?;
    let contents = format!(
        "{CACHE_HEADER}{version}{CACHE_CHECKSUM}{}\n{yaml}",
        sha256_hex(yaml)
    );
    pylon_proto::fs::write_atomic(
        &state_dir.join(CACHE_FILE),
        contents.as_bytes(),
        PRIVATE_FILE,
    )
}

/// Writes the cache, trying again after each of [`CACHE_RETRIES`]; when
/// every try fails, removes the older cache and returns the last error.
async fn keep(state_dir: &Path, version: &str, yaml: &str) -> Result<(), String> {
    let mut waits = CACHE_RETRIES.iter();
    loop {
        let (dir, v, y) = (
            state_dir.to_path_buf(),
            version.to_string(),
            yaml.to_string(),
        );
        let written = tokio::task::spawn_blocking(move || write_cache(&dir, &v, &y))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
        let e = match written {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        match waits.next() {
            Some(wait) => {
                tracing::warn!(error = %e, "cannot write the policy cache; trying again");
                tokio::time::sleep(*wait).await;
            }
            None => {
                let stale = state_dir.join(CACHE_FILE);
                let removed = tokio::task::spawn_blocking(move || std::fs::remove_file(stale))
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|r| r);
                if let Err(e) = removed
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    // A read-only directory keeps it: say so, since a restart
                    // while the control plane is unreachable would serve it.
                    tracing::warn!(
                        error = %e,
                        "cannot remove the older policy cache either; it stays, older than the policy in force"
                    );
                }
                return Err(format!(
                    "installed, but not kept in {}: {e} (a restart while the control plane is unreachable would start with no policy)",
                    state_dir.display()
                ));
            }
        }
    }
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
    let outcome = match outcome {
        Ok(()) => {
            tracing::info!(%version, "policy installed from the control plane");
            store.set_source_state(|st| st.from_cache = false);
            match &source.state_dir {
                Some(dir) => keep(dir, &version, &s.yaml).await.map_err(|e| vec![e]),
                None => Ok(()),
            }
        }
        Err(errors) => {
            tracing::error!(%version, count = errors.len(), "policy refused (NACK); keeping the current policy");
            Err(errors)
        }
    };
    match outcome {
        Ok(()) => DiscoveryRequest {
            version: s.version,
            nonce: s.nonce.clone(),
            ..Default::default()
        },
        Err(errors) => {
            for e in &errors {
                tracing::error!(%version, "NACK: {e}");
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

    fn scratch(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "pylon-cache-{tag}-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ))
    }

    #[test]
    fn the_cache_round_trips_and_is_replaced_whole() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("round-trip");
        write_cache(&dir, "7", "kind: X\n").unwrap();
        assert_eq!(read_cache(&dir), Some(("7".into(), "kind: X\n".into())));
        write_cache(&dir, "8", "").unwrap();
        assert_eq!(read_cache(&dir), Some(("8".into(), String::new())));
        assert!(!dir.join(format!("{CACHE_FILE}.tmp")).exists());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(CACHE_FILE)), 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_tampered_cache_is_refused() {
        let dir = scratch("tampered");
        write_cache(&dir, "7", "kind: Backend\nname: a\n").unwrap();
        let path = dir.join(CACHE_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("name: a", "name: b")).unwrap();
        assert_eq!(read_cache(&dir), None);
        // A cache without a checksum (an older sidecar's) is not trusted
        // either.
        std::fs::write(&path, format!("{CACHE_HEADER}7\nkind: X\n")).unwrap();
        assert_eq!(read_cache(&dir), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_cache_that_cannot_be_written_is_reported_and_the_stale_one_removed() {
        let dir = scratch("unwritable");
        write_cache(&dir, "7", "old").unwrap();
        // A directory where the cache file should be: every write fails.
        let blocked = scratch("blocked");
        std::fs::create_dir_all(blocked.join(CACHE_FILE).join("x")).unwrap();
        let e = keep(&blocked, "8", "new").await.unwrap_err();
        assert!(e.contains("installed, but not kept"), "{e}");
        assert!(keep(&dir, "8", "new").await.is_ok());
        assert_eq!(read_cache(&dir), Some(("8".into(), "new".into())));
        std::fs::remove_dir_all(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&blocked);
    }
}
