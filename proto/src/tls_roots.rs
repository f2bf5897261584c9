//! Certificates and trust anchors read from PEM: the roots a client
//! verifies the control plane with (`caFile`, `ca.pem`), a test CA's root.
//!
//! Errors are messages naming the file. Not here: the mesh trust bundle a
//! sidecar receives as DER (`pylon::identity`), and how a server verifies
//! its clients.

use std::path::Path;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// The certificates of a PEM text, in order; any malformed block is an
/// error. Other PEM sections (a key) are skipped.
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

/// The certificates of a PEM text as trust anchors; each one must be
/// usable as one.
pub fn roots_from_pem(pem: &[u8]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(pem)? {
        roots.add(cert).map_err(|e| e.to_string())?;
    }
    Ok(roots)
}

/// The certificates of a PEM file; errors say `<path>: <problem>`.
pub fn certs_from_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    certs_from_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))
}

/// The certificates of a PEM file as trust anchors, each one usable as
/// one; errors say `<path>: <problem>`. A file without certificates gives
/// an empty store (callers that need one say so).
pub fn roots_from_file(path: &Path) -> Result<RootCertStore, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    roots_from_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))
}

/// [`roots_from_file`], refusing a file without a certificate (a store
/// that trusts nothing): the roots a client verifies one server with.
pub fn required_roots_from_file(path: &Path) -> Result<RootCertStore, String> {
    let roots = roots_from_file(path)?;
    if roots.is_empty() {
        return Err(format!("{}: no certificate", path.display()));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        crate::root_ca::params("test root")
            .self_signed(&key)
            .unwrap()
            .pem()
    }

    #[test]
    fn roots_from_pem_text() {
        let pem = format!("{}{}", root_pem(), root_pem());
        assert_eq!(certs_from_pem(pem.as_bytes()).unwrap().len(), 2);
        assert_eq!(roots_from_pem(pem.as_bytes()).unwrap().len(), 2);
        assert!(roots_from_pem(b"").unwrap().is_empty());
        let broken = "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n";
        assert!(certs_from_pem(broken.as_bytes()).is_err());
        let not_a_cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(certs_from_pem(not_a_cert.as_bytes()).is_ok());
        assert!(roots_from_pem(not_a_cert.as_bytes()).is_err());
    }

    #[test]
    fn errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!(
            "pylon-roots-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("ca.pem");
        std::fs::write(&good, root_pem()).unwrap();
        assert_eq!(roots_from_file(&good).unwrap().len(), 1);
        assert_eq!(certs_from_file(&good).unwrap().len(), 1);
        let missing = dir.join("missing.pem");
        let err = roots_from_file(&missing).unwrap_err();
        assert!(
            err.starts_with(&format!("{}: ", missing.display())),
            "{err}"
        );
        let bad = dir.join("bad.pem");
        std::fs::write(
            &bad,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = roots_from_file(&bad).unwrap_err();
        assert!(err.starts_with(&format!("{}: ", bad.display())), "{err}");
        // A file without a certificate: an empty store, unless one is
        // required.
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert!(roots_from_file(&empty).unwrap().is_empty());
        assert_eq!(
            required_roots_from_file(&empty).unwrap_err(),
            format!("{}: no certificate", empty.display())
        );
        assert_eq!(required_roots_from_file(&good).unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
