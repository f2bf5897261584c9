//! The mesh certificate authority and the control plane's own credentials.
//!
//! On first start the data directory gets `ca.pem` (the trust bundle that
//! sidecars and the CLI trust), `ca-cert.pem` and `ca.key` (the issuing CA,
//! key mode 0600) and `admin.token` (mode 0600). The CA is a new self-signed
//! root, or an operator-supplied root or intermediate (with its key, and for
//! an intermediate the bundle of roots above it). Later starts reuse them.
//! The serving certificate is issued at every start, for the names the
//! control plane is reached by and its SPIFFE ID.
//!
//! Not here: signing workload CSRs (identity issuance).

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

/// Files of the data directory.
pub struct DataFiles {
    pub bundle: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub admin_token: PathBuf,
}

impl DataFiles {
    pub fn in_dir(dir: &Path) -> DataFiles {
        DataFiles {
            bundle: dir.join("ca.pem"),
            ca_cert: dir.join("ca-cert.pem"),
            ca_key: dir.join("ca.key"),
            admin_token: dir.join("admin.token"),
        }
    }
}

/// An operator's CA, imported on first start.
pub struct OperatorCa {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The roots above an intermediate; absent for a root.
    pub bundle: Option<PathBuf>,
}

/// The issuing CA.
pub struct MeshCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// The issuing CA's certificate (PEM), appended to issued leaves when it
    /// is an intermediate.
    issuer_pem: String,
    /// Whether `issuer_pem` is itself in the bundle (a root).
    issuer_is_root: bool,
    bundle_pem: String,
}

/// A certificate chain and its key, PEM.
pub struct IssuedPem {
    pub chain_pem: String,
    pub key_pem: String,
}

fn io(what: &str, path: &Path, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{what} {}: {e}", path.display())
}

/// Writes `contents` to `path` readable by the owner only.
pub fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io("cannot write", path, e))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(|e| io("cannot write", path, e))
}

impl MeshCa {
    /// Reuses the CA in `files`, or creates it (from `operator` if given).
    /// Blocking (file I/O, key generation).
    pub fn load_or_create(
        files: &DataFiles,
        trust_domain: &str,
        operator: Option<&OperatorCa>,
    ) -> anyhow::Result<MeshCa> {
        if files.ca_key.exists() {
            if operator.is_some() {
                tracing::warn!(
                    "the data directory already has a CA; the operator CA given is ignored"
                );
            }
            return Self::load(files, trust_domain);
        }
        match operator {
            Some(op) => {
                let cert = std::fs::read_to_string(&op.cert)
                    .map_err(|e| io("cannot read", &op.cert, e))?;
                let key =
                    std::fs::read_to_string(&op.key).map_err(|e| io("cannot read", &op.key, e))?;
                let bundle = match &op.bundle {
                    Some(b) => std::fs::read_to_string(b).map_err(|e| io("cannot read", b, e))?,
                    None => cert.clone(),
                };
                std::fs::write(&files.ca_cert, &cert)
                    .map_err(|e| io("cannot write", &files.ca_cert, e))?;
                write_private(&files.ca_key, key.as_bytes())?;
                std::fs::write(&files.bundle, &bundle)
                    .map_err(|e| io("cannot write", &files.bundle, e))?;
            }
            None => {
                let key = KeyPair::generate()?;
                let mut params = CertificateParams::default();
                params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                params.key_usages = vec![
                    KeyUsagePurpose::KeyCertSign,
                    KeyUsagePurpose::CrlSign,
                    KeyUsagePurpose::DigitalSignature,
                ];
                let mut dn = DistinguishedName::new();
                dn.push(
                    DnType::CommonName,
                    format!("pylon mesh root ({trust_domain})"),
                );
                params.distinguished_name = dn;
                let now = OffsetDateTime::now_utc();
                params.not_before = now - time::Duration::minutes(5);
                params.not_after = now + time::Duration::days(3650);
                let cert = params.self_signed(&key)?;
                std::fs::write(&files.ca_cert, cert.pem())
                    .map_err(|e| io("cannot write", &files.ca_cert, e))?;
                write_private(&files.ca_key, key.serialize_pem().as_bytes())?;
                std::fs::write(&files.bundle, cert.pem())
                    .map_err(|e| io("cannot write", &files.bundle, e))?;
            }
        }
        Self::load(files, trust_domain)
    }

    fn load(files: &DataFiles, trust_domain: &str) -> anyhow::Result<MeshCa> {
        let cert = std::fs::read_to_string(&files.ca_cert)
            .map_err(|e| io("cannot read", &files.ca_cert, e))?;
        let key = std::fs::read_to_string(&files.ca_key)
            .map_err(|e| io("cannot read", &files.ca_key, e))?;
        let bundle = std::fs::read_to_string(&files.bundle)
            .map_err(|e| io("cannot read", &files.bundle, e))?;
        let key = KeyPair::from_pem(&key).map_err(|e| io("bad key in", &files.ca_key, e))?;
        let issuer = Issuer::from_ca_cert_pem(&cert, key)
            .map_err(|e| io("bad CA certificate in", &files.ca_cert, e))?;
        let issuer_is_root = bundle.contains(cert.trim());
        Ok(MeshCa {
            trust_domain: trust_domain.to_string(),
            issuer,
            issuer_pem: cert,
            issuer_is_root,
            bundle_pem: bundle,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust bundle (PEM).
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// The chain to append after a leaf this CA signed.
    fn chain_suffix(&self) -> &str {
        if self.issuer_is_root {
            ""
        } else {
            &self.issuer_pem
        }
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
        params.not_after = now + time::Duration::days(365);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedPem {
            chain_pem: format!("{}{}", cert.pem(), self.chain_suffix()),
            key_pem: key.serialize_pem(),
        })
    }
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

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> anyhow::Result<String> {
    use ring::rand::SecureRandom;
    let mut bytes = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("no randomness available"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "pylon-ca-{label}-{}-{}",
            std::process::id(),
            random_hex(4).unwrap()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn first_start_creates_and_later_starts_reuse() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("reuse");
        let files = DataFiles::in_dir(&dir);
        let ca = MeshCa::load_or_create(&files, "pylon.test", None).unwrap();
        let bundle = ca.bundle_pem().to_string();
        let token = admin_token(&files).unwrap();
        assert!(token.starts_with("pylon_admin_"));
        for f in [&files.ca_key, &files.admin_token] {
            let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", f.display());
        }
        let again = MeshCa::load_or_create(&files, "pylon.test", None).unwrap();
        assert_eq!(again.bundle_pem(), bundle);
        assert_eq!(admin_token(&files).unwrap(), token);
        let served = again
            .issue_server(&["127.0.0.1".into(), "localhost".into()])
            .unwrap();
        assert!(served.chain_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_operator_intermediate_signs_with_its_chain() {
        // The operator's root and an intermediate it signed.
        let root_key = KeyPair::generate().unwrap();
        let mut root = CertificateParams::default();
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let root_cert = root.self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(root, root_key);
        let int_key = KeyPair::generate().unwrap();
        let mut int = CertificateParams::default();
        int.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        int.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let int_cert = int.signed_by(&int_key, &root_issuer).unwrap();

        let dir = temp_dir("operator");
        let op = OperatorCa {
            cert: dir.join("int.pem"),
            key: dir.join("int.key"),
            bundle: Some(dir.join("root.pem")),
        };
        std::fs::write(&op.cert, int_cert.pem()).unwrap();
        std::fs::write(&op.key, int_key.serialize_pem()).unwrap();
        std::fs::write(op.bundle.as_ref().unwrap(), root_cert.pem()).unwrap();
        let files = DataFiles::in_dir(&dir);
        let ca = MeshCa::load_or_create(&files, "pylon.test", Some(&op)).unwrap();
        assert_eq!(ca.bundle_pem(), root_cert.pem());
        let issued = ca.issue_server(&["localhost".into()]).unwrap();
        assert_eq!(
            issued.chain_pem.matches("BEGIN CERTIFICATE").count(),
            2,
            "leaf + intermediate"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
