//! The workload identity from the control plane (`identity.controlPlane`).
//!
//! The sidecar makes its own P-256 key and a CSR carrying only its SPIFFE
//! ID (asked of the control plane with `WhoAmI`), and has it signed with
//! its bootstrap token; the private key never leaves the process (and the
//! state directory, 0700, its files 0600, when there is one). The certificate is
//! renewed at 70 % of its lifetime over mTLS with the current certificate
//! (the token too, when it is still at hand), with backoff on failure; the
//! old certificate stays in use until a new one arrives. The trust bundle
//! follows the control plane's (`WatchTrustBundle`), so that a CA rotation
//! reaches every sidecar before the new issuer signs.
//!
//! Everything goes through [`IdentityStore`]: new handshakes use what it
//! holds now, open connections are left alone.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use pylon_proto::backoff::Backoff;
use pylon_proto::v1::identity_client::IdentityClient;
use pylon_proto::v1::{IssueCertificateRequest, WatchTrustBundleRequest, WhoAmIRequest};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::Request;
use tonic::transport::Channel;

use super::secrets::{PRIVATE_FILE, private_dir, readable_by_others};
use super::{Credentials, IdentityStore, credentials_from, provider, tls, unix_now};

/// Files in the state directory.
const CERT_FILE: &str = "identity.pem";
const KEY_FILE: &str = "identity.key";
const BUNDLE_FILE: &str = "identity-bundle.pem";

/// Renew when this share of the lifetime has passed.
const RENEW_AT: f64 = 0.7;
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Where the control plane is and how to prove who we are to it.
#[derive(Debug, Clone)]
pub struct ControlPlaneIdentity {
    /// `https://host:port`.
    pub address: String,
    /// The roots to verify the control plane with at first; the mesh trust
    /// bundle is added to them once known.
    pub ca_file: Option<PathBuf>,
    /// The bootstrap token; needed for the first certificate.
    pub token_file: Option<PathBuf>,
    /// Where the key, certificate and bundle are kept across restarts.
    pub state_dir: Option<PathBuf>,
}

/// The last problem met while getting a certificate (for `/ready`).
pub type LastError = Arc<Mutex<Option<String>>>;

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("{0}")]
    Setup(String),
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(#[from] tonic::Status),
}

fn code_name(code: tonic::Code) -> String {
    format!("{code:?}")
}

/// A certificate the control plane signed, and its key.
struct Issued {
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
    bundle: Vec<Vec<u8>>,
    /// When it arrived, Unix seconds (renewal counts from here, not from
    /// the certificate's back-dated notBefore).
    received_at: i64,
}

impl ControlPlaneIdentity {
    /// The control plane's trust: `caFile`, plus the mesh bundle `extra`.
    fn roots(&self, extra: Option<&RootCertStore>) -> Result<RootCertStore, IssueError> {
        let mut roots = RootCertStore::empty();
        if let Some(path) = &self.ca_file {
            // A certificate that is no usable anchor is skipped here: the
            // mesh bundle may still verify the control plane.
            let certs = pylon_proto::tls_roots::certs_from_file(path).map_err(IssueError::Setup)?;
            roots.add_parsable_certificates(certs);
        }
        if let Some(extra) = extra {
            roots.roots.extend(extra.roots.iter().cloned());
        }
        if roots.is_empty() {
            return Err(IssueError::Setup(
                "no roots to verify the control plane with (set controlPlane.caFile)".into(),
            ));
        }
        Ok(roots)
    }

    fn token(&self) -> Option<String> {
        let path = self.token_file.as_ref()?;
        match std::fs::read_to_string(path) {
            Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "no bootstrap token");
                None
            }
        }
    }

    /// A channel to the control plane, presenting `current`'s certificate
    /// when given.
    fn channel(&self, current: Option<&Arc<IdentityStore>>) -> Result<Channel, IssueError> {
        let roots = self.roots(current.map(|c| c.roots()).as_deref())?;
        let tls = pylon_proto::client::client_config(roots, current.map(tls::client_cert_resolver))
            .map_err(|e| IssueError::Setup(e.to_string()))?;
        pylon_proto::client::lazy_channel(&self.address, tls)
            .map_err(|e| IssueError::Setup(e.to_string()))
    }

    /// Asks for a certificate: with `current`'s certificate (mTLS) when
    /// given, and with the bootstrap token when `with_token`.
    async fn issue(
        &self,
        current: Option<&Arc<IdentityStore>>,
        with_token: bool,
    ) -> Result<Issued, IssueError> {
        let token = if with_token { self.token() } else { None };
        if current.is_none() && token.is_none() {
            return Err(IssueError::Setup(match &self.token_file {
                Some(p) => format!("no bootstrap token in {}", p.display()),
                None => "no bootstrap token (set identity.controlPlane.tokenFile)".into(),
            }));
        }
        let mut client = IdentityClient::new(self.channel(current)?);
        let who = client
            .who_am_i(authed(WhoAmIRequest {}, token.as_deref())?)
            .await?
            .into_inner();
        let identity = who.identity;
        let key = KeyPair::generate().map_err(|e| IssueError::Setup(e.to_string()))?;
        let csr = csr_for(&identity, &key)?;
        let resp = client
            .issue_certificate(authed(
                IssueCertificateRequest { csr_der: csr },
                token.as_deref(),
            )?)
            .await?
            .into_inner();
        let chain: Vec<CertificateDer<'static>> = resp
            .chain_der
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let leaf = chain
            .first()
            .ok_or_else(|| IssueError::Setup("the control plane sent no certificate".into()))?;
        let got = super::spiffe_id_of(leaf).map_err(IssueError::Setup)?;
        if got != identity {
            return Err(IssueError::Setup(format!(
                "the control plane signed {got}, not {identity}"
            )));
        }
        Ok(Issued {
            chain,
            key_der: key.serialize_der(),
            bundle: resp.trust_bundle.map(|b| b.roots_der).unwrap_or_default(),
            received_at: unix_now(),
        })
    }
}

/// A CSR whose only SAN is `identity`, signed by `key`.
fn csr_for(identity: &str, key: &KeyPair) -> Result<Vec<u8>, IssueError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.try_into().map_err(|e| {
        IssueError::Setup(format!(
            "the control plane named an unusable identity {identity}: {e}"
        ))
    })?)];
    let csr = params
        .serialize_request(key)
        .map_err(|e| IssueError::Setup(format!("cannot make a CSR: {e}")))?;
    Ok(csr.der().to_vec())
}

fn authed<T>(msg: T, token: Option<&str>) -> Result<Request<T>, IssueError> {
    match token {
        Some(token) => pylon_proto::client::authed(msg, token)
            .map_err(|_| IssueError::Setup("the token file holds no valid token".into())),
        None => Ok(Request::new(msg)),
    }
}

fn credentials_of(issued: &Issued) -> Result<Credentials, IssueError> {
    credentials_from(
        issued.chain.clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(issued.key_der.clone())),
        &provider(),
    )
    .map_err(IssueError::Setup)
}

/// Gets the first identity: from the state directory when it holds a
/// certificate still valid, else from the control plane, retrying with
/// backoff until it succeeds. Then keeps it renewed and its trust bundle
/// current, in tasks that run until aborted.
pub async fn obtain(
    config: ControlPlaneIdentity,
    last_error: LastError,
) -> (Arc<IdentityStore>, Vec<tokio::task::JoinHandle<()>>) {
    let cached = match config.state_dir.clone() {
        Some(dir) => tokio::task::spawn_blocking(move || load_state(&dir))
            .await
            .ok()
            .flatten(),
        None => None,
    };
    let (store, renew_at) = match cached {
        Some((credentials, bundle)) => {
            tracing::info!(
                identity = %credentials.spiffe_id,
                serial = %credentials.serial,
                "identity from the state directory; renewing it now"
            );
            let store = IdentityStore::new(credentials, RootCertStore::empty());
            let _ = store.set_roots_der(&bundle);
            (store, unix_now())
        }
        None => {
            let mut backoff = Backoff::equal_jitter(MIN_BACKOFF, MAX_BACKOFF);
            loop {
                match first(&config).await {
                    Ok((store, issued)) => {
                        persist(&config, &issued).await;
                        *last_error.lock().unwrap_or_else(PoisonError::into_inner) = None;
                        break (store.clone(), renewal_time(&store, issued.received_at));
                    }
                    Err(e) => {
                        tracing::warn!(address = %config.address, error = %e, "no certificate from the control plane yet");
                        *last_error.lock().unwrap_or_else(PoisonError::into_inner) =
                            Some(e.to_string());
                    }
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    };
    let tasks = vec![
        tokio::spawn(renew(config.clone(), store.clone(), renew_at)),
        tokio::spawn(watch_bundle(config, store.clone())),
    ];
    (store, tasks)
}

async fn first(config: &ControlPlaneIdentity) -> Result<(Arc<IdentityStore>, Issued), IssueError> {
    let issued = config.issue(None, true).await?;
    let credentials = credentials_of(&issued)?;
    tracing::info!(
        identity = %credentials.spiffe_id,
        serial = %credentials.serial,
        not_after = credentials.not_after,
        "certificate issued by the control plane"
    );
    let store = IdentityStore::new(credentials, RootCertStore::empty());
    store
        .set_roots_der(&issued.bundle)
        .map_err(IssueError::Setup)?;
    Ok((store, issued))
}

/// When to renew: 70 % of the way from receipt to expiry.
fn renewal_time(store: &IdentityStore, received_at: i64) -> i64 {
    let not_after = store.credentials().not_after;
    received_at + ((not_after - received_at).max(0) as f64 * RENEW_AT) as i64
}

/// Sleeps until Unix second `at` (at most a day at a time, in case the
/// wall clock moves).
async fn sleep_until_unix(at: i64) {
    loop {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let target = Duration::from_secs(at.max(0) as u64);
        if target <= now {
            return;
        }
        tokio::time::sleep((target - now).min(Duration::from_secs(86_400))).await;
    }
}

/// Renews the certificate before it expires, forever.
async fn renew(config: ControlPlaneIdentity, store: Arc<IdentityStore>, mut renew_at: i64) {
    loop {
        sleep_until_unix(renew_at).await;
        let mut backoff = Backoff::equal_jitter(MIN_BACKOFF, MAX_BACKOFF);
        let mut attempt = 0u32;
        loop {
            // Alternate: the current certificate (and token), then the token
            // alone, in case the certificate itself is what is refused.
            let current = store.credentials();
            let use_cert = current.valid_at(unix_now()) && attempt.is_multiple_of(2);
            let outcome = config
                .issue(use_cert.then_some(&store), true)
                .await
                .and_then(|issued| credentials_of(&issued).map(|c| (issued, c)));
            match outcome {
                Ok((issued, credentials)) => {
                    tracing::info!(
                        serial = %credentials.serial,
                        previous = %current.serial,
                        not_after = credentials.not_after,
                        "certificate renewed"
                    );
                    store.set_credentials(credentials);
                    if let Err(e) = store.set_roots_der(&issued.bundle) {
                        tracing::warn!(error = %e, "the renewal brought no usable trust bundle");
                    }
                    persist(&config, &issued).await;
                    renew_at = renewal_time(&store, issued.received_at);
                    break;
                }
                Err(e) => {
                    let left = current.not_after - unix_now();
                    tracing::warn!(
                        error = %e,
                        expires_in_seconds = left,
                        "certificate renewal failed; the current certificate stays in use"
                    );
                }
            }
            attempt += 1;
            // Never wait past a good share of what is left.
            let left = Duration::from_secs((current.not_after - unix_now()).max(1) as u64);
            tokio::time::sleep(backoff.next_delay().min(left / 4).max(MIN_BACKOFF / 2)).await;
        }
    }
}

/// Follows the control plane's trust bundle, forever.
async fn watch_bundle(config: ControlPlaneIdentity, store: Arc<IdentityStore>) {
    let mut backoff = Backoff::equal_jitter(MIN_BACKOFF, MAX_BACKOFF);
    loop {
        match follow_bundle(&config, &store).await {
            Ok(()) => backoff.reset(),
            Err(e) => tracing::warn!(error = %e, "no trust bundle stream from the control plane"),
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

async fn follow_bundle(
    config: &ControlPlaneIdentity,
    store: &Arc<IdentityStore>,
) -> Result<(), IssueError> {
    let mut client = IdentityClient::new(config.channel(Some(store))?);
    let token = config.token();
    let mut bundles = client
        .watch_trust_bundle(authed(WatchTrustBundleRequest {}, token.as_deref())?)
        .await?
        .into_inner();
    while let Some(bundle) = bundles.message().await? {
        let fingerprints: Vec<String> = bundle
            .roots_der
            .iter()
            .map(|d| super::fingerprint(d))
            .collect();
        if *store.bundle_fingerprints() == fingerprints {
            continue;
        }
        match store.set_roots_der(&bundle.roots_der) {
            Ok(()) => {
                tracing::info!(
                    version = bundle.version,
                    roots = bundle.roots_der.len(),
                    "trust bundle updated"
                );
                if let Some(dir) = config.state_dir.clone() {
                    let pem = pem_certs(&bundle.roots_der);
                    let _ = tokio::task::spawn_blocking(move || {
                        pylon_proto::fs::write_atomic(
                            &dir.join(BUNDLE_FILE),
                            pem.as_bytes(),
                            PRIVATE_FILE,
                        )
                    })
                    .await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "trust bundle refused"),
        }
    }
    Ok(())
}

fn pem_certs(ders: &[Vec<u8>]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    ders.iter()
        .map(|d| pem::encode_config(&pem::Pem::new("CERTIFICATE", d.clone()), config))
        .collect()
}

/// Keeps the key, certificate and bundle in the state directory (0700),
/// each file 0600.
async fn persist(config: &ControlPlaneIdentity, issued: &Issued) {
    let Some(dir) = config.state_dir.clone() else {
        return;
    };
    let chain: Vec<Vec<u8>> = issued.chain.iter().map(|c| c.as_ref().to_vec()).collect();
    let key_pem = pem::encode_config(
        &pem::Pem::new("PRIVATE KEY", issued.key_der.clone()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    );
    let bundle = pem_certs(&issued.bundle);
    let written = tokio::task::spawn_blocking(move || {
        private_dir(&dir)?;
        // The key first: a crash in between leaves a key without its
        // certificate, which the next start ignores.
        pylon_proto::fs::write_atomic(&dir.join(KEY_FILE), key_pem.as_bytes(), PRIVATE_FILE)?;
        let chain = pem_certs(&chain);
        pylon_proto::fs::write_atomic(&dir.join(CERT_FILE), chain.as_bytes(), PRIVATE_FILE)?;
        pylon_proto::fs::write_atomic(&dir.join(BUNDLE_FILE), bundle.as_bytes(), PRIVATE_FILE)?;
        std::fs::File::open(&dir)?.sync_all()
    })
    .await;
    if let Ok(Err(e)) | Err(e) = written.map_err(std::io::Error::other) {
        tracing::warn!(error = %e, "cannot keep the certificate in the state directory");
    }
}

/// The identity kept in the state directory, if still valid for a while
/// (and its key still private: one others could read is not used).
fn load_state(dir: &Path) -> Option<(Credentials, Vec<Vec<u8>>)> {
    if readable_by_others(&dir.join(KEY_FILE)) {
        tracing::warn!(
            dir = %dir.display(),
            "the key in the state directory is readable by others; not using it"
        );
        return None;
    }
    let chain = CertificateDer::pem_file_iter(dir.join(CERT_FILE))
        .ok()?
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    let key = PrivateKeyDer::from_pem_file(dir.join(KEY_FILE)).ok()?;
    let bundle: Vec<Vec<u8>> = CertificateDer::pem_file_iter(dir.join(BUNDLE_FILE))
        .ok()?
        .filter_map(|c| c.ok().map(|c| c.as_ref().to_vec()))
        .collect();
    if bundle.is_empty() {
        return None;
    }
    let credentials = match credentials_from(chain, key, &provider()) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "the certificate in the state directory is not usable");
            return None;
        }
    };
    // Worth serving with only if it outlives the time a renewal takes.
    (credentials.not_after - unix_now() > 5).then_some((credentials, bundle))
}
