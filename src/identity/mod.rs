//! Workload identity: this sidecar's certificate and key, the mesh trust
//! bundle, and the rustls configurations built from them.
//!
//! The certificate is held behind an `ArcSwap`, and every rustls config reads
//! it through a resolver, so a new certificate applies to new handshakes
//! without touching open connections. Peer identities are SPIFFE IDs taken
//! from the URI SAN; DNS names play no part (see [`tls`]).
//!
//! Certificates come from files ([`IdentityStore::load_files`]) or from the
//! control plane ([`control`]: CSR issuance, renewal, trust bundle updates).
//! Secrets on disk are private to the sidecar ([`secrets`]).

pub mod control;
pub mod dev;
pub mod secrets;
pub mod tls;

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The crypto provider of every TLS config in the process.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate and its key, ready to present, with the SPIFFE ID it proves.
#[derive(Debug)]
pub struct Credentials {
    pub spiffe_id: String,
    pub key: Arc<CertifiedKey>,
    /// The leaf's serial number, lowercase hex.
    pub serial: String,
    /// The leaf's issuer (distinguished name).
    pub issuer: String,
    /// The leaf's validity, Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

impl Credentials {
    /// Whether the certificate is valid at Unix time `now`.
    pub fn valid_at(&self, now: i64) -> bool {
        self.not_before <= now && now < self.not_after
    }
}

/// The SHA-256 fingerprint of a certificate, lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The current Unix time in seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The sidecar's live identity: its credentials and the trust bundle it
/// verifies peers against. Both can be replaced at run time.
#[derive(Debug)]
pub struct IdentityStore {
    credentials: ArcSwap<Credentials>,
    roots: ArcSwap<RootCertStore>,
    bundle_fingerprints: ArcSwap<Vec<String>>,
    provider: Arc<CryptoProvider>,
}

impl IdentityStore {
    pub fn new(credentials: Credentials, roots: RootCertStore) -> Arc<Self> {
        Arc::new(IdentityStore {
            credentials: ArcSwap::from_pointee(credentials),
            roots: ArcSwap::from_pointee(roots),
            bundle_fingerprints: Default::default(),
            provider: provider(),
        })
    }

    /// Loads `identity.files`: a PEM leaf (+ chain), its PEM key, and a PEM
    /// trust bundle. Every problem found is returned, not just the first.
    pub fn load_files(cert: &Path, key: &Path, bundle: &Path) -> Result<Arc<Self>, Vec<String>> {
        let provider = provider();
        let mut errors = Vec::new();
        let chain = read_certs(cert, "identity.files.cert", &mut errors);
        let key_der = match std::fs::read(key) {
            Ok(bytes) => match PrivateKeyDer::from_pem_slice(&bytes) {
                Ok(k) => Some(k),
                Err(e) => {
                    errors.push(format!(
                        "identity.files.key: {}: no PEM private key ({e})",
                        key.display()
                    ));
                    None
                }
            },
            Err(e) => {
                errors.push(format!("identity.files.key: {}: {e}", key.display()));
                None
            }
        };
        let mut fingerprints = Vec::new();
        let roots = read_certs(bundle, "identity.files.trustBundle", &mut errors).map(|certs| {
            fingerprints = certs.iter().map(|c| fingerprint(c.as_ref())).collect();
            roots_from(certs, bundle, &mut errors)
        });

        let credentials = match (chain, key_der) {
            (Some(chain), Some(key_der)) => match credentials_from(chain, key_der, &provider) {
                Ok(c) => Some(c),
                Err(e) => {
                    errors.push(format!("identity.files.cert: {}: {e}", cert.display()));
                    None
                }
            },
            _ => None,
        };
        match (credentials, roots) {
            (Some(credentials), Some(roots)) if errors.is_empty() => Ok(Arc::new(IdentityStore {
                credentials: ArcSwap::from_pointee(credentials),
                roots: ArcSwap::from_pointee(roots),
                bundle_fingerprints: ArcSwap::from_pointee(fingerprints),
                provider,
            })),
            _ => Err(errors),
        }
    }

    /// This workload's SPIFFE ID.
    pub fn spiffe_id(&self) -> String {
        self.credentials.load().spiffe_id.clone()
    }

    pub fn credentials(&self) -> Arc<Credentials> {
        self.credentials.load_full()
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.load_full()
    }

    pub fn crypto_provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    /// The signature algorithms peers' certificates are verified with.
    pub fn signature_algorithms(&self) -> &rustls::crypto::WebPkiSupportedAlgorithms {
        &self.provider.signature_verification_algorithms
    }

    /// Replaces the certificate presented in new handshakes.
    pub fn set_credentials(&self, credentials: Credentials) {
        self.credentials.store(Arc::new(credentials));
    }

    /// Replaces the trust bundle used to verify new peers.
    pub fn set_roots(&self, roots: RootCertStore) {
        self.roots.store(Arc::new(roots));
    }

    /// Replaces the trust bundle with DER roots, remembering their
    /// fingerprints (for `/config`). Unusable roots are skipped; an empty
    /// result changes nothing.
    pub fn set_roots_der(&self, ders: &[Vec<u8>]) -> Result<(), String> {
        let mut roots = RootCertStore::empty();
        let (_, rejected) =
            roots.add_parsable_certificates(ders.iter().map(|d| CertificateDer::from(d.clone())));
        if roots.is_empty() {
            return Err(format!(
                "the trust bundle has no usable root ({rejected} rejected)"
            ));
        }
        self.set_roots(roots);
        self.bundle_fingerprints
            .store(Arc::new(ders.iter().map(|d| fingerprint(d)).collect()));
        Ok(())
    }

    /// The SHA-256 fingerprints of the trust bundle's roots, when known.
    pub fn bundle_fingerprints(&self) -> Arc<Vec<String>> {
        self.bundle_fingerprints.load_full()
    }
}

/// Builds credentials from a DER chain (leaf first) and key, checking that
/// the key matches and that the leaf carries a SPIFFE ID.
pub fn credentials_from(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: &CryptoProvider,
) -> Result<Credentials, String> {
    let leaf = chain.first().ok_or("no certificate in the file")?;
    let spiffe_id = spiffe_id_of(leaf)?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
    let serial = parsed
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let issuer = parsed.issuer().to_string();
    let not_before = parsed.validity().not_before.timestamp();
    let not_after = parsed.validity().not_after.timestamp();
    let key = CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| format!("certificate and key do not go together: {e}"))?;
    Ok(Credentials {
        spiffe_id,
        key: Arc::new(key),
        serial,
        issuer,
        not_before,
        not_after,
    })
}

/// The Kubernetes service account a SPIFFE ID names
/// (`spiffe://<trust domain>/ns/<namespace>/sa/<name>`), as (namespace, name).
pub fn service_account(spiffe_id: &str) -> Option<(String, String)> {
    pylon_proto::spiffe::parse_shape(spiffe_id)
        .map(|w| (w.namespace.to_string(), w.service_account.to_string()))
}

/// The single `spiffe://` URI SAN of a certificate.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<String, String> {
    pylon_proto::spiffe::id_of_certificate(cert.as_ref())
}

fn read_certs(
    path: &Path,
    key: &str,
    errors: &mut Vec<String>,
) -> Option<Vec<CertificateDer<'static>>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            errors.push(format!("{key}: {}: {e}", path.display()));
            return None;
        }
    };
    match CertificateDer::pem_slice_iter(&bytes).collect::<Result<Vec<_>, _>>() {
        Ok(certs) if !certs.is_empty() => Some(certs),
        Ok(_) => {
            errors.push(format!("{key}: {}: no PEM certificate", path.display()));
            None
        }
        Err(e) => {
            errors.push(format!("{key}: {}: bad PEM: {e}", path.display()));
            None
        }
    }
}

fn roots_from(
    certs: Vec<CertificateDer<'static>>,
    path: &Path,
    errors: &mut Vec<String>,
) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let (_, rejected) = roots.add_parsable_certificates(certs);
    if rejected > 0 {
        errors.push(format!(
            "identity.files.trustBundle: {}: {rejected} certificate(s) are not usable trust anchors",
            path.display()
        ));
    }
    roots
}

/// Parses PEM certificates from memory (used by the demo and tests).
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    pylon_proto::tls_roots::certs_from_pem(pem.as_bytes())
}
