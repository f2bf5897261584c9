//! A throwaway certificate authority for `pylon demo`, the tests and the
//! benchmarks: a self-signed root and SPIFFE workload certificates made on
//! the fly with rcgen. Production identities come from files or the control
//! plane, never from here.

use std::path::{Path, PathBuf};

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A self-signed root that issues workload certificates.
pub struct DevCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A workload certificate and its key, PEM encoded.
pub struct WorkloadCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Paths of a workload's identity files, as `identity.files` expects them.
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub trust_bundle: PathBuf,
}

impl DevCa {
    pub fn new(common_name: &str) -> Result<Self, rcgen::Error> {
        let key = KeyPair::generate()?;
        let params = pylon_proto::root_ca::params(common_name);
        let cert = params.self_signed(&key)?;
        Ok(DevCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The root certificate: the trust bundle of everything this CA issues.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a leaf for `spiffe_id`, usable as server and client certificate.
    pub fn issue(&self, spiffe_id: &str) -> Result<WorkloadCert, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.distinguished_name = DistinguishedName::new();
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(WorkloadCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// An in-memory identity for `spiffe_id` issued by this CA, trusting the
    /// roots of `trusted` (pass `&[self]` for the usual case).
    pub fn identity_store(
        &self,
        spiffe_id: &str,
        trusted: &[&DevCa],
    ) -> Result<std::sync::Arc<super::IdentityStore>, String> {
        use rustls_pki_types::PrivateKeyDer;
        use rustls_pki_types::pem::PemObject;
        let leaf = self.issue(spiffe_id).map_err(|e| e.to_string())?;
        let chain = super::certs_from_pem(&leaf.cert_pem)?;
        let key =
            PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).map_err(|e| e.to_string())?;
        let credentials = super::credentials_from(chain, key, &super::provider())?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in trusted {
            let anchors = pylon_proto::tls_roots::roots_from_pem(ca.cert_pem().as_bytes())?;
            roots.roots.extend(anchors.roots);
        }
        Ok(super::IdentityStore::new(credentials, roots))
    }

    /// Issues a leaf for `spiffe_id` and writes it, its key and this CA's
    /// root into `dir` as `<name>.pem`, `<name>.key` and `<name>-bundle.pem`.
    pub fn write_identity(
        &self,
        dir: &Path,
        name: &str,
        spiffe_id: &str,
    ) -> std::io::Result<IdentityFiles> {
        let leaf = self.issue(spiffe_id).map_err(std::io::Error::other)?;
        let files = IdentityFiles {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            trust_bundle: dir.join(format!("{name}-bundle.pem")),
        };
        std::fs::write(&files.cert, leaf.cert_pem)?;
        pylon_proto::fs::write_atomic(&files.key, leaf.key_pem.as_bytes(), 0o600)?;
        std::fs::write(&files.trust_bundle, &self.cert_pem)?;
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_leaf_carries_the_spiffe_id_and_loads() {
        let ca = DevCa::new("test root").unwrap();
        let dir = std::env::temp_dir().join(format!("pylon-dev-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = ca
            .write_identity(&dir, "web", "spiffe://pylon.local/ns/default/sa/web")
            .unwrap();
        let store = crate::identity::IdentityStore::load_files(
            &files.cert,
            &files.key,
            &files.trust_bundle,
        )
        .unwrap();
        assert_eq!(store.spiffe_id(), "spiffe://pylon.local/ns/default/sa/web");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_files_reports_every_problem() {
        let missing = Path::new("/nonexistent/pylon");
        let errors = crate::identity::IdentityStore::load_files(
            &missing.join("a.pem"),
            &missing.join("a.key"),
            &missing.join("b.pem"),
        )
        .unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].starts_with("identity.files.cert: "));
        assert!(errors[1].starts_with("identity.files.key: "));
        assert!(errors[2].starts_with("identity.files.trustBundle: "));
    }
}
