//! What makes a certificate a mesh root: the rcgen parameters of a
//! self-signed CA that issues workload certificates, shared by the control
//! plane's CA and the throwaway CA of tests and the demo.
//!
//! Not here: validity (each caller sets its own), key generation, signing.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyUsagePurpose,
};

/// Parameters of a root CA named `common_name`: unconstrained CA, allowed
/// to sign certificates and CRLs.
pub fn params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_root() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params("pylon test root").self_signed(&key).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).unwrap();
        assert!(parsed.is_ca());
        assert_eq!(parsed.subject().to_string(), "CN=pylon test root");
        assert_eq!(parsed.subject(), parsed.issuer());
        let usage = parsed.key_usage().unwrap().unwrap().value;
        assert!(usage.key_cert_sign() && usage.crl_sign() && usage.digital_signature());
        let constraints = parsed.basic_constraints().unwrap().unwrap().value;
        assert_eq!(constraints.path_len_constraint, None);
    }
}
