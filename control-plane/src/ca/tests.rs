use super::*;
use rcgen::{BasicConstraints, IsCa};

fn temp_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "pylon-ca-{label}-{}-{}",
        std::process::id(),
        random_hex(4).unwrap()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const ID: &str = "spiffe://pylon.test/ns/default/sa/greeter";

fn csr(sans: &[SanType], key: &KeyPair) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans.to_vec();
    params.serialize_request(key).unwrap().der().to_vec()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

/// Whether `leaf` verifies up to one of `roots` (webpki, as rustls does).
fn verifies(chain: &[Vec<u8>], roots: &[Vec<u8>]) -> bool {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(CertificateDer::from(r.clone())).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(store),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    let end = CertificateDer::from(chain[0].clone());
    let rest: Vec<_> = chain[1..]
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    verifier
        .verify_client_cert(&end, &rest, rustls_pki_types::UnixTime::now())
        .is_ok()
}

#[test]
fn first_start_creates_and_later_starts_reuse() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("reuse");
    let files = DataFiles::in_dir(&dir);
    let ca = CaState::load_or_create(&files, "pylon.test", None).unwrap();
    let bundle = ca.bundle_pem();
    assert_eq!(std::fs::read_to_string(&files.bundle).unwrap(), bundle);
    let token = admin_token(&files).unwrap();
    assert!(token.starts_with("pylon_admin_"));
    for f in [&files.state, &files.admin_token] {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    let again = CaState::load_or_create(&files, "pylon.test", None).unwrap();
    assert_eq!(again.bundle_pem(), bundle);
    assert_eq!(admin_token(&files).unwrap(), token);
    let served = again
        .issue_server(&["127.0.0.1".into(), "localhost".into()])
        .unwrap();
    assert!(served.chain_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    std::fs::remove_dir_all(&dir).unwrap();
}

fn operator_intermediate() -> (CaMaterial, String) {
    let root_key = KeyPair::generate().unwrap();
    let mut root = CertificateParams::default();
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "operator root");
    root.distinguished_name = dn;
    let root_cert = root.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root, root_key);
    let int_key = KeyPair::generate().unwrap();
    let mut int = CertificateParams::default();
    int.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    int.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "operator intermediate");
    int.distinguished_name = dn;
    let int_cert = int.signed_by(&int_key, &root_issuer).unwrap();
    (
        CaMaterial {
            cert_pem: int_cert.pem(),
            key_pem: int_key.serialize_pem(),
            bundle_pem: root_cert.pem(),
        },
        root_cert.pem(),
    )
}

#[test]
fn an_operator_intermediate_signs_with_its_chain() {
    let (material, root_pem) = operator_intermediate();
    let dir = temp_dir("operator");
    let op = OperatorCa {
        cert: dir.join("int.pem"),
        key: dir.join("int.key"),
        bundle: Some(dir.join("root.pem")),
    };
    std::fs::write(&op.cert, &material.cert_pem).unwrap();
    std::fs::write(&op.key, &material.key_pem).unwrap();
    std::fs::write(op.bundle.as_ref().unwrap(), &material.bundle_pem).unwrap();
    let files = DataFiles::in_dir(&dir);
    let ca = CaState::load_or_create(&files, "pylon.test", Some(&op)).unwrap();
    assert_eq!(ca.bundle_pem(), root_pem);
    let issued = ca.issue_server(&["localhost".into()]).unwrap();
    assert_eq!(
        issued.chain_pem.matches("BEGIN CERTIFICATE").count(),
        2,
        "leaf + intermediate"
    );
    let key = KeyPair::generate().unwrap();
    let leaf = ca
        .sign_csr(&csr(&[uri(ID)], &key), ID, Duration::from_secs(60))
        .unwrap();
    assert_eq!(leaf.chain_der.len(), 2);
    assert!(verifies(&leaf.chain_der, &ca.roots_der()));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_intermediate_without_its_root_is_refused() {
    let (mut material, _) = operator_intermediate();
    material.bundle_pem = generate_root("x").unwrap().cert_pem;
    let dir = temp_dir("unanchored");
    let files = DataFiles::in_dir(&dir);
    let ca = CaState::load_or_create(&files, "pylon.test", None).unwrap();
    let err = ca.add_root(&material).unwrap_err().to_string();
    assert!(err.contains("neither a root"), "{err}");
    // A key of another certificate.
    let (mut other, _) = operator_intermediate();
    other.key_pem = KeyPair::generate().unwrap().serialize_pem();
    let err = ca.add_root(&other).unwrap_err().to_string();
    assert!(err.contains("does not belong"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_csr_is_signed_only_for_the_callers_identity() {
    let dir = temp_dir("csr");
    let ca = CaState::load_or_create(&DataFiles::in_dir(&dir), "pylon.test", None).unwrap();
    let key = KeyPair::generate().unwrap();

    let leaf = ca
        .sign_csr(&csr(&[uri(ID)], &key), ID, Duration::from_secs(3600))
        .unwrap();
    assert_eq!(leaf.chain_der.len(), 1, "a root issuer adds nothing");
    assert!(verifies(&leaf.chain_der, &ca.roots_der()));
    assert!((leaf.not_after - leaf.not_before - 3660).abs() <= 2);
    let (_, cert) = X509Certificate::from_der(&leaf.chain_der[0]).unwrap();
    assert_eq!(cert.public_key().raw, key.subject_public_key_info());
    assert_eq!(
        pylon_proto::spiffe::id_of_certificate(&leaf.chain_der[0]).unwrap(),
        ID
    );
    assert!(!cert.is_ca());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);

    let other = "spiffe://pylon.test/ns/default/sa/admin";
    for (sans, why) in [
        (vec![uri(other)], "another identity"),
        (vec![uri(ID), uri(other)], "two SANs"),
        (
            vec![uri(ID), SanType::DnsName("x.example".try_into().unwrap())],
            "an extra DNS SAN",
        ),
        (vec![], "no SAN"),
    ] {
        match ca.sign_csr(&csr(&sans, &key), ID, Duration::from_secs(60)) {
            Err(CsrError::Denied(_)) => {}
            other => panic!("{why}: {other:?}"),
        }
    }
    // A CSR whose signature does not match its key.
    let mut bad = csr(&[uri(ID)], &key);
    let n = bad.len();
    bad[n - 5] ^= 0x55;
    assert!(matches!(
        ca.sign_csr(&bad, ID, Duration::from_secs(60)),
        Err(CsrError::Invalid(_))
    ));
    assert!(matches!(
        ca.sign_csr(b"garbage", ID, Duration::from_secs(60)),
        Err(CsrError::Invalid(_))
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn rotation_adds_activates_and_removes_and_survives_restarts() {
    let dir = temp_dir("rotation");
    let files = DataFiles::in_dir(&dir);
    let old = CaState::load_or_create(&files, "pylon.test", None).unwrap();
    let old_root = old.roots[0].fingerprint.clone();
    let key = KeyPair::generate().unwrap();
    let old_leaf = old
        .sign_csr(&csr(&[uri(ID)], &key), ID, Duration::from_secs(60))
        .unwrap();

    assert!(old.activate().is_err(), "nothing pending");
    assert!(
        old.remove_root(&old_root).is_err(),
        "anchors the active issuer"
    );

    let added = old.add_root(&CaMaterial::default()).unwrap();
    added.persist(&files).unwrap();
    assert_eq!(added.roots.len(), 2);
    assert!(
        added.add_root(&CaMaterial::default()).is_err(),
        "one at a time"
    );
    let pending = added.pending.clone().unwrap();
    assert_ne!(pending.cert.subject, old.active.cert.subject);
    // Still the old issuer signing.
    let leaf = added
        .sign_csr(&csr(&[uri(ID)], &key), ID, Duration::from_secs(60))
        .unwrap();
    assert!(verifies(&leaf.chain_der, &old.roots_der()));
    let reloaded = CaState::load_or_create(&files, "pylon.test", None).unwrap();
    assert_eq!(
        reloaded.pending.as_ref().unwrap().cert.fingerprint,
        pending.cert.fingerprint
    );

    let active = reloaded.activate().unwrap();
    active.persist(&files).unwrap();
    assert!(active.pending.is_none());
    assert!(active.activated_at.is_some());
    let new_leaf = active
        .sign_csr(&csr(&[uri(ID)], &key), ID, Duration::from_secs(60))
        .unwrap();
    assert!(!verifies(&new_leaf.chain_der, &old.roots_der()));
    assert!(verifies(&new_leaf.chain_der, &active.roots_der()));
    assert!(
        verifies(&old_leaf.chain_der, &active.roots_der()),
        "both trusted"
    );

    let new_root = active.active.anchors[0].clone();
    assert!(active.remove_root(&new_root).is_err());
    let removed = active.remove_root(&old_root).unwrap();
    removed.persist(&files).unwrap();
    assert_eq!(removed.roots.len(), 1);
    assert!(!verifies(&old_leaf.chain_der, &removed.roots_der()));
    let reloaded = CaState::load_or_create(&files, "pylon.test", None).unwrap();
    assert_eq!(reloaded.roots[0].fingerprint, new_root);
    assert_eq!(
        std::fs::read_to_string(&files.bundle).unwrap(),
        reloaded.bundle_pem()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_data_directory_of_the_earlier_layout_is_taken_over() {
    let dir = temp_dir("legacy");
    let files = DataFiles::in_dir(&dir);
    let root = generate_root("pylon.test").unwrap();
    std::fs::write(&files.legacy_cert, &root.cert_pem).unwrap();
    std::fs::write(&files.legacy_key, &root.key_pem).unwrap();
    std::fs::write(&files.bundle, &root.cert_pem).unwrap();
    let ca = CaState::load_or_create(&files, "pylon.test", None).unwrap();
    assert_eq!(ca.bundle_pem(), root.cert_pem);
    assert_eq!(ca.active.cert.pem, root.cert_pem);
    assert!(files.state.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
