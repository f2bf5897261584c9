//! The mesh certificate authority: its trust bundle, the issuer that signs
//! workload certificates, the steps of a CA rotation, and the control
//! plane's own credentials.
//!
//! The CA's state lives in `ca.json` in the data directory (mode 0600: it
//! holds keys), replaced atomically on every change; `ca.pem` is the trust
//! bundle exported for sidecars and the CLI. A [`CaState`] is immutable: a
//! change builds a new one, persists it, then publishes it.
//!
//! Rotation: [`CaState::add_root`] puts a new root in the bundle with a
//! *pending* issuer under it (it signs nothing yet); once every workload
//! trusts the new root, [`CaState::activate`] makes the pending issuer sign;
//! once every certificate of the old issuer has expired,
//! [`CaState::remove_root`] takes the old root out of the bundle.
//!
//! Workload certificates: [`CaState::sign_csr`] checks the CSR's signature
//! and that its only SAN is the caller's SPIFFE ID, and signs a leaf whose
//! every field the control plane chooses.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

/// How far before its issuance a workload certificate's `notBefore` is set
/// (clock skew between the control plane and sidecars): its issuance time
/// is `notBefore` plus this.
pub const LEAF_BACKDATE_SECS: i64 = 60;

/// Files of the data directory.
#[derive(Debug, Clone)]
pub struct DataFiles {
    /// The trust bundle (PEM), exported for sidecars and the CLI.
    pub bundle: PathBuf,
    /// The CA's state: roots, issuers and their keys (mode 0600).
    pub state: PathBuf,
    /// Where a data directory of an earlier release kept the issuer.
    legacy_cert: PathBuf,
    legacy_key: PathBuf,
    pub admin_token: PathBuf,
}

impl DataFiles {
    pub fn in_dir(dir: &Path) -> DataFiles {
        DataFiles {
            bundle: dir.join("ca.pem"),
            state: dir.join("ca.json"),
            legacy_cert: dir.join("ca-cert.pem"),
            legacy_key: dir.join("ca.key"),
            admin_token: dir.join("admin.token"),
        }
    }

    /// Whether the directory holds the CA of an earlier release (taken
    /// over into `ca.json` on start).
    pub fn has_legacy_ca(&self) -> bool {
        self.legacy_key.exists()
    }
}

/// An operator's CA: a root, or an intermediate with the roots above it.
pub struct OperatorCa {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The roots above an intermediate; absent for a root.
    pub bundle: Option<PathBuf>,
}

/// An operator's CA in memory (PEM).
#[derive(Default)]
pub struct CaMaterial {
    pub cert_pem: String,
    pub key_pem: String,
    /// Empty for a root.
    pub bundle_pem: String,
}

impl OperatorCa {
    pub fn read(&self) -> anyhow::Result<CaMaterial> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| io("cannot read", p, e));
        Ok(CaMaterial {
            cert_pem: read(&self.cert)?,
            key_pem: read(&self.key)?,
            bundle_pem: match &self.bundle {
                Some(b) => read(b)?,
                None => String::new(),
            },
        })
    }
}

/// A CA certificate and what the API shows of it.
#[derive(Debug, Clone)]
pub struct CaCert {
    pub der: Vec<u8>,
    pub pem: String,
    pub subject: String,
    /// SHA-256 of the DER, lowercase hex.
    pub fingerprint: String,
    pub not_before: i64,
    pub not_after: i64,
}

impl CaCert {
    fn from_der(der: Vec<u8>) -> anyhow::Result<CaCert> {
        let (_, parsed) = X509Certificate::from_der(&der)
            .map_err(|e| anyhow::anyhow!("not a valid X.509 certificate: {e}"))?;
        let subject = parsed.subject().to_string();
        let not_before = parsed.validity().not_before.timestamp();
        let not_after = parsed.validity().not_after.timestamp();
        if !parsed.is_ca() {
            anyhow::bail!("{subject} is not a CA certificate (basicConstraints cA is not set)");
        }
        let pem = pem_of(&der);
        Ok(CaCert {
            fingerprint: hex(ring::digest::digest(&ring::digest::SHA256, &der).as_ref()),
            der,
            pem,
            subject,
            not_before,
            not_after,
        })
    }

    fn parse_pem(pem: &str) -> anyhow::Result<Vec<CaCert>> {
        let ders = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("bad PEM: {e}"))?;
        if ders.is_empty() {
            anyhow::bail!("no PEM certificate");
        }
        ders.into_iter()
            .map(|d| CaCert::from_der(d.as_ref().to_vec()))
            .collect()
    }

    /// The certificate, parsed again (it parsed when the value was made, so
    /// this does not fail in practice).
    fn parsed(&self) -> anyhow::Result<X509Certificate<'_>> {
        X509Certificate::from_der(&self.der)
            .map(|(_, c)| c)
            .map_err(|e| anyhow::anyhow!("{}: not a valid X.509 certificate: {e}", self.subject))
    }

    fn self_signed(&self) -> bool {
        let Ok(c) = self.parsed() else {
            return false;
        };
        c.subject() == c.issuer() && c.verify_signature(None).is_ok()
    }

    /// Whether `self` signed `child`.
    fn signed(&self, child: &CaCert) -> bool {
        let (Ok(me), Ok(child)) = (self.parsed(), child.parsed()) else {
            return false;
        };
        me.subject() == child.issuer() && child.verify_signature(Some(me.public_key())).is_ok()
    }
}

/// A CA that signs: its certificate, key, and where it chains to.
pub struct Signer {
    pub cert: CaCert,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// Fingerprints of the bundle roots it chains to (itself, for a root).
    pub anchors: Vec<String>,
    /// DER certificates sent after a leaf it signs (its own, for an
    /// intermediate).
    chain_suffix: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("subject", &self.cert.subject)
            .field("fingerprint", &self.cert.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// The same signer, no longer anchored by root `fingerprint`.
    fn without_anchor(&self, fingerprint: &str) -> anyhow::Result<Arc<Signer>> {
        let mut anchors = self.anchors.clone();
        anchors.retain(|a| a != fingerprint);
        let subject = &self.cert.subject;
        // Both parsed when this signer was made.
        let key = KeyPair::from_pem(&self.key_pem)
            .map_err(|e| anyhow::anyhow!("the key of {subject}: {e}"))?;
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(self.cert.der.as_slice()), key)
            .map_err(|e| anyhow::anyhow!("the certificate of {subject}: {e}"))?;
        Ok(Arc::new(Signer {
            cert: self.cert.clone(),
            key_pem: self.key_pem.clone(),
            issuer,
            anchors,
            chain_suffix: self.chain_suffix.clone(),
        }))
    }

    fn new(cert: CaCert, key_pem: String, roots: &[CaCert]) -> anyhow::Result<Signer> {
        let key = KeyPair::from_pem(&key_pem).map_err(|e| anyhow::anyhow!("bad CA key: {e}"))?;
        let spki = cert.parsed()?.public_key().raw.to_vec();
        if key.subject_public_key_info() != spki {
            anyhow::bail!(
                "the key does not belong to the certificate {}",
                cert.subject
            );
        }
        let anchors: Vec<String> = roots
            .iter()
            .filter(|r| r.der == cert.der || r.signed(&cert))
            .map(|r| r.fingerprint.clone())
            .collect();
        if anchors.is_empty() {
            anyhow::bail!(
                "{} is neither a root of the trust bundle nor signed by one (an intermediate must be signed directly by a root)",
                cert.subject
            );
        }
        let is_root = roots.iter().any(|r| r.der == cert.der);
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(cert.der.as_slice()), key)
            .map_err(|e| anyhow::anyhow!("unusable CA certificate {}: {e}", cert.subject))?;
        Ok(Signer {
            chain_suffix: if is_root {
                Vec::new()
            } else {
                vec![cert.der.clone()]
            },
            cert,
            key_pem,
            issuer,
            anchors,
        })
    }
}

/// A certificate chain and its key, PEM.
pub struct IssuedPem {
    pub chain_pem: String,
    pub key_pem: String,
}

/// A workload certificate.
#[derive(Debug, Clone)]
pub struct IssuedLeaf {
    /// The leaf first, then any intermediate.
    pub chain_der: Vec<Vec<u8>>,
    pub not_before: i64,
    pub not_after: i64,
    /// Lowercase hex.
    pub serial: String,
}

/// Why a CSR was not signed.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    /// Not a CSR, a bad signature, an unsupported key.
    #[error("{0}")]
    Invalid(String),
    /// A well-formed CSR for something the caller may not have.
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    Internal(String),
}

/// The CA at one moment. Immutable; changes make a new one.
#[derive(Debug)]
pub struct CaState {
    pub trust_domain: String,
    /// The trust bundle, in order.
    pub roots: Vec<CaCert>,
    /// Signs what is issued now.
    pub active: Arc<Signer>,
    /// Added by a rotation, not signing yet.
    pub pending: Option<Arc<Signer>>,
    /// When `active` took over; `None` for the first issuer.
    pub activated_at: Option<i64>,
    /// Counts changes within this process (from 1).
    pub version: u64,
}

fn io(what: &str, path: &Path, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{what} {}: {e}", path.display())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn pem_of(der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der), config)
}

fn now_unix() -> i64 {
    unix(SystemTime::now())
}

/// Seconds since the Unix epoch (0 before it).
pub(crate) fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Writes `contents` to `path` readable by the owner only.
pub fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    write_atomic(path, contents, 0o600)
}

/// Replaces `path` with `contents` in one step: a crash leaves the old file
/// or the new one, never a mix.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    pylon_proto::fs::write_atomic(path, contents, mode).map_err(|e| io("cannot write", path, e))
}

impl CaMaterial {
    /// A new self-signed root (also the issuer), as `serve` makes on its
    /// first start when no CA is given.
    pub fn new_root(trust_domain: &str) -> anyhow::Result<CaMaterial> {
        generate_root(trust_domain)
    }

    /// The trust bundle (PEM) this CA gives when `serve` starts with it, once
    /// checked as `serve` checks it: the key belongs to the certificate, and
    /// the certificate is a root or is signed by one of its bundle's roots.
    pub fn trust_bundle(&self) -> anyhow::Result<String> {
        let roots = new_roots(self)?;
        Signer::new(first_cert(&self.cert_pem)?, self.key_pem.clone(), &roots)?;
        Ok(roots.iter().map(|r| r.pem.as_str()).collect())
    }
}

/// A new self-signed root, also the issuer.
fn generate_root(trust_domain: &str) -> anyhow::Result<CaMaterial> {
    let key = KeyPair::generate()?;
    let now = OffsetDateTime::now_utc();
    // Every generated root gets its own name, so that a bundle holding an
    // old and a new one tells them apart by subject too.
    let mut params = pylon_proto::root_ca::params(&format!(
        "pylon mesh root ({trust_domain}) {}-{:02}-{:02} {}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        random_hex(4)?
    ));
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(3650);
    let cert = params.self_signed(&key)?;
    Ok(CaMaterial {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        bundle_pem: String::new(),
    })
}

impl CaState {
    /// Reuses the CA in `files`, or creates it (from `operator` if given).
    /// Blocking (file I/O, key generation).
    pub fn load_or_create(
        files: &DataFiles,
        trust_domain: &str,
        operator: Option<&OperatorCa>,
    ) -> anyhow::Result<CaState> {
        if files.state.exists() {
            if operator.is_some() {
                tracing::warn!(
                    "the data directory already has a CA; the operator CA given is ignored"
                );
            }
            let state = Self::load(files, trust_domain)?;
            state.export_bundle(files)?;
            return Ok(state);
        }
        let (roots, issuer) = if files.legacy_key.exists() {
            // A data directory of an earlier release: take its CA over.
            let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| io("cannot read", p, e));
            let bundle = read(&files.bundle)?;
            (
                CaCert::parse_pem(&bundle).map_err(|e| io("", &files.bundle, e))?,
                CaMaterial {
                    cert_pem: read(&files.legacy_cert)?,
                    key_pem: read(&files.legacy_key)?,
                    bundle_pem: String::new(),
                },
            )
        } else {
            let material = match operator {
                Some(op) => op.read()?,
                None => generate_root(trust_domain)?,
            };
            let roots = new_roots(&material)?;
            (roots, material)
        };
        let issuer_cert = first_cert(&issuer.cert_pem)?;
        let active = Signer::new(issuer_cert, issuer.key_pem, &roots)?;
        let state = CaState {
            trust_domain: trust_domain.to_string(),
            roots,
            active: Arc::new(active),
            pending: None,
            activated_at: None,
            version: 1,
        };
        state.persist(files)?;
        Ok(state)
    }

    fn load(files: &DataFiles, trust_domain: &str) -> anyhow::Result<CaState> {
        let text = std::fs::read_to_string(&files.state)
            .map_err(|e| io("cannot read", &files.state, e))?;
        let bad = |what: &str| io("bad CA state in", &files.state, what);
        let v: Value = serde_json::from_str(&text).map_err(|e| bad(&e.to_string()))?;
        let mut roots = Vec::new();
        for r in v["roots"].as_array().ok_or_else(|| bad("no roots"))? {
            roots.extend(
                CaCert::parse_pem(r.as_str().unwrap_or_default())
                    .map_err(|e| bad(&e.to_string()))?,
            );
        }
        let signer = |s: &Value| -> anyhow::Result<Signer> {
            let cert = first_cert(s["cert"].as_str().unwrap_or_default())?;
            Signer::new(
                cert,
                s["key"].as_str().unwrap_or_default().to_string(),
                &roots,
            )
        };
        let active = signer(&v["active"]).map_err(|e| bad(&format!("active: {e}")))?;
        let pending = match &v["pending"] {
            Value::Null => None,
            p => Some(Arc::new(
                signer(p).map_err(|e| bad(&format!("pending: {e}")))?,
            )),
        };
        Ok(CaState {
            trust_domain: trust_domain.to_string(),
            active: Arc::new(active),
            pending,
            activated_at: v["activatedAt"].as_i64(),
            roots,
            version: 1,
        })
    }

    /// Writes `ca.json`, then `ca.pem`.
    pub fn persist(&self, files: &DataFiles) -> anyhow::Result<()> {
        let signer = |s: &Signer| json!({ "cert": s.cert.pem, "key": s.key_pem });
        let state = json!({
            "roots": self.roots.iter().map(|r| r.pem.clone()).collect::<Vec<_>>(),
            "active": signer(&self.active),
            "pending": self.pending.as_deref().map(signer),
            "activatedAt": self.activated_at,
        });
        write_private(
            &files.state,
            serde_json::to_string_pretty(&state)?.as_bytes(),
        )?;
        self.export_bundle(files)
    }

    fn export_bundle(&self, files: &DataFiles) -> anyhow::Result<()> {
        let pem = self.bundle_pem();
        if std::fs::read_to_string(&files.bundle).ok().as_deref() != Some(pem.as_str()) {
            write_atomic(&files.bundle, pem.as_bytes(), 0o644)?;
        }
        Ok(())
    }

    /// The trust bundle (PEM).
    pub fn bundle_pem(&self) -> String {
        self.roots.iter().map(|r| r.pem.as_str()).collect()
    }

    pub fn roots_der(&self) -> Vec<Vec<u8>> {
        self.roots.iter().map(|r| r.der.clone()).collect()
    }

    fn next(&self) -> CaState {
        CaState {
            trust_domain: self.trust_domain.clone(),
            roots: self.roots.clone(),
            active: self.active.clone(),
            pending: self.pending.clone(),
            activated_at: self.activated_at,
            version: self.version + 1,
        }
    }

    /// Rotation, step 1: the new root joins the bundle, with a pending
    /// issuer under it (generated when `material` is empty).
    pub fn add_root(&self, material: &CaMaterial) -> anyhow::Result<CaState> {
        if self.pending.is_some() {
            anyhow::bail!(
                "a rotation is already under way: activate the pending issuer (or remove its root) first"
            );
        }
        let generated;
        let material = if material.cert_pem.trim().is_empty() && material.key_pem.trim().is_empty()
        {
            generated = generate_root(&self.trust_domain)?;
            &generated
        } else {
            material
        };
        let mut next = self.next();
        for root in new_roots(material)? {
            if !next.roots.iter().any(|r| r.der == root.der) {
                next.roots.push(root);
            }
        }
        let cert = first_cert(&material.cert_pem)?;
        if cert.der == self.active.cert.der {
            anyhow::bail!("{} is already the active issuer", cert.subject);
        }
        next.pending = Some(Arc::new(Signer::new(
            cert,
            material.key_pem.clone(),
            &next.roots,
        )?));
        Ok(next)
    }

    /// Rotation, step 2: the pending issuer signs from now on.
    pub fn activate(&self) -> anyhow::Result<CaState> {
        let mut next = self.next();
        next.active = next
            .pending
            .take()
            .ok_or_else(|| anyhow::anyhow!("there is no pending issuer: add a root first"))?;
        next.activated_at = Some(now_unix());
        Ok(next)
    }

    /// Rotation, step 3: a root leaves the bundle.
    pub fn remove_root(&self, fingerprint: &str) -> anyhow::Result<CaState> {
        let fingerprint = fingerprint.trim().to_ascii_lowercase();
        let Some(root) = self.roots.iter().find(|r| r.fingerprint == fingerprint) else {
            anyhow::bail!("no root with fingerprint {fingerprint} in the trust bundle");
        };
        let needed_by = |s: &Signer| s.anchors.len() == 1 && s.anchors[0] == fingerprint;
        if needed_by(&self.active) {
            anyhow::bail!(
                "{} anchors the active issuer; activate another issuer first",
                root.subject
            );
        }
        if self.pending.as_deref().is_some_and(needed_by) {
            anyhow::bail!("{} anchors the pending issuer", root.subject);
        }
        let mut next = self.next();
        next.roots.retain(|r| r.fingerprint != fingerprint);
        next.active = self.active.without_anchor(&fingerprint)?;
        next.pending = self
            .pending
            .as_ref()
            .map(|p| p.without_anchor(&fingerprint))
            .transpose()?;
        Ok(next)
    }

    /// The control plane's serving certificate: valid for `names` (DNS
    /// names or IP addresses) and for its SPIFFE ID.
    pub fn issue_server(&self, names: &[String]) -> anyhow::Result<IssuedPem> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut sans = vec![SanType::URI(
            format!(
                "spiffe://{}/ns/pylon-system/sa/pylon-control",
                self.trust_domain
            )
            .as_str()
            .try_into()?,
        )];
        for n in names {
            sans.push(match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.as_str().try_into()?),
            });
        }
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "pylon-control");
        params.distinguished_name = dn;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = (now + time::Duration::days(365)).min(
            OffsetDateTime::from_unix_timestamp(self.active.cert.not_after)
                .unwrap_or(now + time::Duration::days(365)),
        );
        let cert = params.signed_by(&key, &self.active.issuer)?;
        let mut chain_pem = cert.pem();
        for der in &self.active.chain_suffix {
            chain_pem.push_str(&pem_of(der));
        }
        Ok(IssuedPem {
            chain_pem,
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a workload certificate for `identity` from a PKCS#10 CSR. The
    /// CSR contributes its public key only, once its signature verifies and
    /// its one SAN is `identity`; validity (`ttl`, never past the issuer's
    /// own), key usage and EKUs are the control plane's.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        identity: &str,
        ttl: Duration,
    ) -> Result<IssuedLeaf, CsrError> {
        use x509_parser::certification_request::X509CertificationRequest;
        use x509_parser::extensions::{GeneralName, ParsedExtension};
        let (rest, csr) = X509CertificationRequest::from_der(csr_der)
            .map_err(|e| CsrError::Invalid(format!("not a PKCS#10 CSR: {e}")))?;
        if !rest.is_empty() {
            return Err(CsrError::Invalid("trailing bytes after the CSR".into()));
        }
        csr.verify_signature().map_err(|_| {
            CsrError::Invalid("the CSR's signature does not verify with its key".into())
        })?;
        let mut sans = Vec::new();
        for ext in csr.requested_extensions().into_iter().flatten() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                sans.extend(san.general_names.iter());
            }
        }
        match sans.as_slice() {
            [GeneralName::URI(uri)] if *uri == identity => {}
            [GeneralName::URI(uri)] => {
                return Err(CsrError::Denied(format!(
                    "the CSR asks for {uri}, but the credential is for {identity}"
                )));
            }
            _ => {
                return Err(CsrError::Denied(format!(
                    "the CSR must carry exactly one SAN, the URI {identity} (it has {})",
                    sans.len()
                )));
            }
        }
        let spki =
            rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
                .map_err(|e| CsrError::Invalid(format!("unsupported public key: {e}")))?;
        let alg = spki.algorithm();
        if ![
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ]
        .contains(&alg)
        {
            return Err(CsrError::Invalid(
                "unsupported key type: ECDSA P-256, P-384 or Ed25519 only".into(),
            ));
        }

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names =
            vec![SanType::URI(identity.try_into().map_err(|e| {
                CsrError::Denied(format!("bad identity {identity}: {e}"))
            })?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let mut serial = random_bytes(16).map_err(|e| CsrError::Internal(e.to_string()))?;
        serial[0] &= 0x7f;
        serial[0] |= 0x01;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let now = OffsetDateTime::now_utc();
        let ttl = time::Duration::try_from(ttl).unwrap_or(time::Duration::days(1));
        params.not_before = now - time::Duration::seconds(LEAF_BACKDATE_SECS);
        let issuer_end =
            OffsetDateTime::from_unix_timestamp(self.active.cert.not_after).unwrap_or(now + ttl);
        params.not_after = (now + ttl).min(issuer_end);
        let cert = params
            .signed_by(&spki, &self.active.issuer)
            .map_err(|e| CsrError::Internal(format!("signing failed: {e}")))?;
        let mut chain_der = vec![cert.der().to_vec()];
        chain_der.extend(self.active.chain_suffix.iter().cloned());
        Ok(IssuedLeaf {
            chain_der,
            not_before: params.not_before.unix_timestamp(),
            not_after: params.not_after.unix_timestamp(),
            serial: hex(&serial),
        })
    }
}

/// The roots `material` brings: its bundle, or the certificate itself when
/// it is a self-signed root.
fn new_roots(material: &CaMaterial) -> anyhow::Result<Vec<CaCert>> {
    if material.bundle_pem.trim().is_empty() {
        let cert = first_cert(&material.cert_pem)?;
        if !cert.self_signed() {
            anyhow::bail!(
                "{} is not a self-signed root: give the roots above it as its bundle",
                cert.subject
            );
        }
        Ok(vec![cert])
    } else {
        CaCert::parse_pem(&material.bundle_pem).map_err(|e| anyhow::anyhow!("bundle: {e}"))
    }
}

fn first_cert(pem: &str) -> anyhow::Result<CaCert> {
    CaCert::parse_pem(pem)
        .map_err(|e| anyhow::anyhow!("CA certificate: {e}"))?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("CA certificate: none"))
}

/// The admin token: read, or created on first start (mode 0600).
pub fn admin_token(files: &DataFiles) -> anyhow::Result<String> {
    match std::fs::read_to_string(&files.admin_token) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        _ => {
            let token = format!("pylon_admin_{}", random_hex(32)?);
            write_private(&files.admin_token, format!("{token}\n").as_bytes())?;
            Ok(token)
        }
    }
}

fn random_bytes(n: usize) -> anyhow::Result<Vec<u8>> {
    use ring::rand::SecureRandom;
    let mut bytes = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("no randomness available"))?;
    Ok(bytes)
}

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> anyhow::Result<String> {
    Ok(hex(&random_bytes(n)?))
}

#[cfg(test)]
mod tests;
