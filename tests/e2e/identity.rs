//! Workload identity from the control plane, with real processes: a mesh
//! that starts from bootstrap tokens alone, what the identity service
//! refuses, certificate rotation and CA rotation under load.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use pylon::identity::{IdentityStore, credentials_from, provider};
use pylon_proto::v1::identity_client::IdentityClient;
use pylon_proto::v1::{EchoRequest, IssueCertificateRequest, WhoAmIRequest};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

use crate::common::control::{ControlProc, cp_config};
use crate::common::echo::{echo_client, start_named_echo};
use crate::common::policy::{allow, authorization, yaml};
use crate::common::{
    CLIENT_ID, SERVER_ID, SidecarProc, TempDir, admin_get, eventually, mesh_policy,
};

fn spawn(
    dir: &TempDir,
    cp: &ControlProc,
    name: &str,
    identity: &str,
    app: SocketAddr,
) -> SidecarProc {
    let token = cp.token_file(dir.path(), name, identity);
    let cfg = dir.path().join(format!("{name}.yaml"));
    let state = dir.path().join(format!("{name}-state"));
    std::fs::write(&cfg, cp_config(cp, &token, &state, app)).unwrap();
    SidecarProc::spawn(crate::common::PYLON, &cfg)
}

/// A control plane and two sidecars that get everything from it.
struct IdMesh {
    dir: TempDir,
    cp: ControlProc,
    server: SidecarProc,
    client: SidecarProc,
}

impl IdMesh {
    async fn start(app: SocketAddr, serve_args: &[&str]) -> IdMesh {
        let dir = TempDir::new("identity");
        let cp = ControlProc::spawn_with(
            crate::common::PYLON_CONTROL,
            &dir.path().join("cp-data"),
            "127.0.0.1:0".parse().unwrap(),
            serve_args,
        );
        let server = spawn(&dir, &cp, "server", SERVER_ID, app);
        let client = spawn(
            &dir,
            &cp,
            "client",
            CLIENT_ID,
            "127.0.0.1:9".parse().unwrap(),
        );
        cp.apply(&mesh_policy(server.inbound));
        server.wait_ready().await;
        client.wait_ready().await;
        IdMesh {
            dir,
            cp,
            server,
            client,
        }
    }
}

/// Calls through the client sidecar until stopped, counting failures.
struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<(u64, Vec<String>)>>,
}

impl Load {
    async fn start(outbound: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for _ in 0..4 {
            let mut echo = echo_client(outbound, "echo.test").await;
            let stop = stop.clone();
            workers.push(tokio::spawn(async move {
                let (mut ok, mut failures) = (0, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    match echo.unary(EchoRequest::default()).await {
                        Ok(_) => ok += 1,
                        Err(s) => failures.push(format!("{:?}: {}", s.code(), s.message())),
                    }
                }
                (ok, failures)
            }));
        }
        Load { stop, workers }
    }

    /// Stops; asserts that nothing failed and that calls ran.
    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let (mut total, mut failures) = (0, Vec::new());
        for w in self.workers {
            let (ok, f) = w.await.unwrap();
            total += ok;
            failures.extend(f);
        }
        assert!(
            failures.is_empty(),
            "{} of {} calls failed: {:?}",
            failures.len(),
            total + failures.len() as u64,
            &failures[..failures.len().min(5)]
        );
        assert!(total > 0, "no call ran");
        total
    }
}

pub(crate) fn cert_field(config: &serde_json::Value, field: &str) -> String {
    match &config["certificate"][field] {
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

fn bundle_of(config: &serde_json::Value) -> Vec<String> {
    config["trustBundle"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// The identity service, verified with the control plane's CA file.
pub(crate) fn identity_client(cp: &ControlProc) -> IdentityClient<Channel> {
    let roots = pylon_control::cli::roots_from(&cp.ca_file()).unwrap();
    let tls = pylon_proto::client::client_config(roots, None).unwrap();
    IdentityClient::new(pylon_proto::client::lazy_channel(&cp.address(), tls).unwrap())
}

pub(crate) fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token.trim()).parse().unwrap(),
    );
    req
}

pub(crate) fn csr(sans: &[&str], key: &KeyPair) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans
        .iter()
        .map(|s| SanType::URI((*s).try_into().unwrap()))
        .collect();
    params.serialize_request(key).unwrap().der().to_vec()
}

/// A certificate for `identity` from the control plane, by token.
async fn issue(
    cp: &ControlProc,
    token: &str,
    identity: &str,
) -> (Vec<CertificateDer<'static>>, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let resp = identity_client(cp)
        .issue_certificate(with_token(
            IssueCertificateRequest {
                csr_der: csr(&[identity], &key),
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner();
    (
        resp.chain_der
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
        key,
    )
}

pub(crate) fn certificates_issued(cp: &ControlProc) -> usize {
    cp.logs().matches("certificate issued").count()
}

/// Waits until the control plane has logged `n` issued certificates (its
/// log is read by a thread, so a line written just now may still come).
pub(crate) async fn wait_issued(cp: &ControlProc, n: usize) {
    crate::common::eventually(format!("{n} certificates issued"), async || {
        let seen = certificates_issued(cp);
        if seen >= n {
            Ok(())
        } else {
            Err(format!("{seen}"))
        }
    })
    .await;
}

/// Handshakes with a sidecar's inbound listener presenting `chain`/`key`
/// and sends the HTTP/2 preface: `Ok(the server's leaf serial)` when the
/// sidecar answers, `Err` when it refuses the client certificate.
async fn probe_inbound(
    inbound: SocketAddr,
    chain: &[CertificateDer<'static>],
    key: &KeyPair,
    roots_pem: &Path,
) -> Result<String, String> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(roots_pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let credentials = credentials_from(
        chain.to_vec(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        &provider(),
    )
    .unwrap();
    let store = IdentityStore::new(credentials, roots);
    let config = pylon::identity::tls::client_config(&store, SERVER_ID).unwrap();
    let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let serial = {
        let leaf = &tls.get_ref().1.peer_certificates().unwrap()[0];
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
        parsed
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    match tls.read(&mut buf).await {
        Ok(n) if n > 0 => Ok(serial),
        Ok(_) => Err("closed".into()),
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::test]
async fn a_mesh_runs_on_certificates_issued_from_tokens_alone() {
    let app = start_named_echo("app").await;
    let dir = TempDir::new("identity-tokens");
    let cp = ControlProc::spawn(crate::common::PYLON_CONTROL, &dir.path().join("cp-data"));

    // No token yet: alive, not ready, and it says why.
    let token_path = dir.path().join("server.token");
    let cfg = dir.path().join("server.yaml");
    let state = dir.path().join("server-state");
    std::fs::write(&cfg, cp_config(&cp, &token_path, &state, app.addr)).unwrap();
    let server = SidecarProc::spawn(crate::common::PYLON, &cfg);
    assert_eq!(admin_get(server.admin, "/live").await.unwrap().0, 200);
    let (status, body) = admin_get(server.admin, "/ready").await.unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("waiting for the first certificate"), "{body}");
    // The token arrives; the certificate follows.
    let token = cp.token_file(dir.path(), "server-token", SERVER_ID);
    std::fs::copy(&token, &token_path).unwrap();

    let client = spawn(
        &dir,
        &cp,
        "client",
        CLIENT_ID,
        "127.0.0.1:9".parse().unwrap(),
    );
    cp.apply(&mesh_policy(server.inbound));
    server.wait_ready().await;
    client.wait_ready().await;

    let mut echo = echo_client(client.outbound, "echo.test").await;
    let reply = echo
        .unary(EchoRequest {
            payload: b"issued".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().payload, b"issued");

    // Issued by the mesh CA, kept in the state directory, key private.
    let config = server.config().await;
    assert_eq!(config["identity"], SERVER_ID);
    let ca_pem = std::fs::read_to_string(cp.ca_file()).unwrap();
    let ca_der = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(
        bundle_of(&config),
        vec![pylon::identity::fingerprint(&ca_der)]
    );
    let (_, ca) = x509_parser::parse_x509_certificate(ca_der.as_ref()).unwrap();
    assert_eq!(cert_field(&config, "issuer"), ca.subject().to_string());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(state.join("identity.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    cp.wait_acked(&[SERVER_ID, CLIENT_ID], cp.status().0).await;

    // From here on the certificates are the only credentials: both token
    // files are gone and the control plane restarts, so the sidecars' new
    // policy streams (and renewals) authenticate by mTLS alone. (Revoking
    // the tokens instead would revoke the certificates they got too:
    // control_hardening.rs.)
    std::fs::remove_file(&token_path).unwrap();
    std::fs::remove_file(dir.path().join("client.token")).unwrap();
    let (data, address) = (cp.data_dir.clone(), cp.addr);
    let mut cp = cp;
    cp.kill9();
    let cp = ControlProc::spawn_at(crate::common::PYLON_CONTROL, &data, address);
    // Each sidecar gets the mesh's routes, and only its own inbound
    // policies: the server one more resource than the client.
    cp.apply(
        &(mesh_policy(server.inbound)
            + &yaml(&[authorization(
                "echo",
                "echo",
                vec![allow(&[CLIENT_ID], &[], &[])],
            )])),
    );
    let version = cp.status().0;
    cp.wait_acked(&[SERVER_ID, CLIENT_ID], version).await;
    let (s, c) = (server.config().await, client.config().await);
    assert_eq!(s["policy"]["resources"], 4, "{s:#}");
    assert_eq!(c["policy"]["resources"], 3, "{c:#}");
    let reply = echo
        .unary(EchoRequest {
            payload: b"authorized".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().payload, b"authorized");
}

#[tokio::test]
async fn the_control_plane_signs_only_what_the_token_allows() {
    let dir = TempDir::new("identity-refusals");
    let cp = ControlProc::spawn(crate::common::PYLON_CONTROL, &dir.path().join("cp-data"));
    let token = std::fs::read_to_string(cp.token_file(dir.path(), "c", CLIENT_ID)).unwrap();
    let mut ids = identity_client(&cp);

    let who = ids
        .who_am_i(with_token(WhoAmIRequest {}, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(who.identity, CLIENT_ID);
    assert!(!who.trust_bundle.unwrap().roots_der.is_empty());

    let before = certificates_issued(&cp);
    let key = KeyPair::generate().unwrap();
    for (sans, what) in [
        (vec![SERVER_ID], "another identity"),
        (vec![CLIENT_ID, SERVER_ID], "an extra SAN"),
    ] {
        let err = ids
            .issue_certificate(with_token(
                IssueCertificateRequest {
                    csr_der: csr(&sans, &key),
                },
                &token,
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{what}: {err:?}");
    }
    // No credential at all.
    let err = ids
        .issue_certificate(IssueCertificateRequest {
            csr_der: csr(&[CLIENT_ID], &key),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert_eq!(certificates_issued(&cp), before, "nothing was issued");

    // The right CSR: signed, by the CA, for that identity only.
    let (chain, _) = issue(&cp, &token, CLIENT_ID).await;
    assert_eq!(pylon::identity::spiffe_id_of(&chain[0]).unwrap(), CLIENT_ID);
    wait_issued(&cp, before + 1).await;
    assert_eq!(certificates_issued(&cp), before + 1);

    // A revoked token issues nothing.
    let listed = String::from_utf8_lossy(&cp.cli(&["token", "list"]).stdout).to_string();
    let id = listed
        .lines()
        .find(|l| l.contains(CLIENT_ID))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    assert!(cp.cli(&["token", "revoke", &id]).status.success());
    let err = ids
        .issue_certificate(with_token(
            IssueCertificateRequest {
                csr_der: csr(&[CLIENT_ID], &key),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert_eq!(certificates_issued(&cp), before + 1);

    // A once-only token issues once.
    let once = cp.cli(&["token", "create", "--identity", CLIENT_ID, "--once"]);
    let once = String::from_utf8_lossy(&once.stdout).trim().to_string();
    issue(&cp, &once, CLIENT_ID).await;
    let err = ids
        .issue_certificate(with_token(
            IssueCertificateRequest {
                csr_der: csr(&[CLIENT_ID], &key),
            },
            &once,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
}

#[tokio::test]
async fn short_lived_certificates_rotate_under_load_without_a_failed_call() {
    let app = start_named_echo("app").await;
    let mesh = IdMesh::start(app.addr, &["--cert-ttl", "3s"]).await;
    let token =
        std::fs::read_to_string(mesh.cp.token_file(mesh.dir.path(), "probe", CLIENT_ID)).unwrap();
    let load = Load::start(mesh.client.outbound).await;

    // Several renewals of the server's certificate, each seen by a new
    // handshake.
    let mut seen = std::collections::BTreeSet::new();
    let first = cert_field(&mesh.server.config().await, "serial");
    seen.insert(first.clone());
    eventually(
        "three server certificates, each seen by a handshake",
        async || {
            let serial = cert_field(&mesh.server.config().await, "serial");
            let (chain, key) = issue(&mesh.cp, &token, CLIENT_ID).await;
            let handshake = probe_inbound(mesh.server.inbound, &chain, &key, &mesh.cp.ca_file())
                .await
                .expect("the server sidecar accepts a fresh certificate");
            let now = cert_field(&mesh.server.config().await, "serial");
            // Unless a renewal happened in between, the handshake showed the
            // certificate the sidecar reports.
            if serial == now {
                assert_eq!(handshake, now);
                seen.insert(now);
            }
            (seen.len() >= 3).then_some(())
        },
    )
    .await;
    let client_serial = cert_field(&mesh.client.config().await, "serial");
    assert!(!client_serial.is_empty());
    let calls = load.finish().await;
    assert!(calls > 10, "{calls}");
    let renewals = mesh.server.logs().matches("certificate renewed").count();
    assert!(renewals >= 2, "{}", mesh.server.logs());
}

fn ca_status(cp: &ControlProc) -> String {
    let out = cp.cli(&["ca", "status"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The fingerprints listed under "trust bundle:", and the subject of the
/// issuer on line `label`.
fn roots_and_issuer(status: &str, label: &str) -> (Vec<String>, Option<(String, String)>) {
    let roots = status
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.len() == 64 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .map(str::to_string)
        .collect();
    let issuer = status.lines().find_map(|l| {
        let rest = l.strip_prefix(label)?;
        let (subject, rest) = rest.rsplit_once(" (")?;
        let fp = rest.split(')').next()?;
        Some((subject.to_string(), fp.to_string()))
    });
    (roots, issuer)
}

#[tokio::test]
async fn a_ca_rotation_under_load_loses_no_call() {
    let app = start_named_echo("app").await;
    let mesh = IdMesh::start(app.addr, &["--cert-ttl", "4s"]).await;
    let token =
        std::fs::read_to_string(mesh.cp.token_file(mesh.dir.path(), "probe", CLIENT_ID)).unwrap();
    let old_ca_file: PathBuf = mesh.dir.path().join("old-ca.pem");
    std::fs::copy(mesh.cp.ca_file(), &old_ca_file).unwrap();
    let (old_chain, old_key) = issue(&mesh.cp, &token, CLIENT_ID).await;
    let (old_roots, _) = roots_and_issuer(&ca_status(&mesh.cp), "active issuer: ");
    assert_eq!(old_roots.len(), 1);
    let old_root = old_roots[0].clone();
    let load = Load::start(mesh.client.outbound).await;

    // 1. A new root joins the bundle; it signs nothing yet.
    let out = mesh.cp.cli(&["ca", "add-root"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (roots, pending) = roots_and_issuer(&ca_status(&mesh.cp), "pending issuer: ");
    assert_eq!(roots.len(), 2);
    let (new_subject, _) = pending.expect("a pending issuer");
    let new_root = roots.iter().find(|r| **r != old_root).unwrap().clone();
    for sidecar in [&mesh.server, &mesh.client] {
        eventually("both roots trusted", async || {
            (bundle_of(&sidecar.config().await).len() == 2).then_some(())
        })
        .await;
    }

    // 2. The new issuer signs; every sidecar renews onto it.
    let out = mesh.cp.cli(&["ca", "activate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for sidecar in [&mesh.server, &mesh.client] {
        eventually("a certificate from the new issuer", async || {
            (cert_field(&sidecar.config().await, "issuer") == new_subject).then_some(())
        })
        .await;
    }
    // The active root cannot be removed.
    assert!(
        !mesh
            .cp
            .cli(&["ca", "remove-root", &new_root])
            .status
            .success()
    );

    // 3. The old root leaves the bundle.
    let out = mesh.cp.cli(&["ca", "remove-root", &old_root]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for sidecar in [&mesh.server, &mesh.client] {
        eventually("only the new root trusted", async || {
            (bundle_of(&sidecar.config().await) == vec![new_root.clone()]).then_some(())
        })
        .await;
    }
    // A certificate of the old CA is refused now; one of the new is not.
    let refused = probe_inbound(mesh.server.inbound, &old_chain, &old_key, &old_ca_file).await;
    assert!(refused.is_err(), "an old-CA certificate was accepted");
    let (chain, key) = issue(&mesh.cp, &token, CLIENT_ID).await;
    probe_inbound(mesh.server.inbound, &chain, &key, &mesh.cp.ca_file())
        .await
        .expect("a new-CA certificate is accepted");

    // The sidecars still talk to the control plane (its serving certificate
    // moved to the new CA): a new policy version reaches both.
    mesh.cp
        .apply(&(mesh_policy(mesh.server.inbound).replace("name: web", "name: web2")));
    mesh.cp
        .wait_acked(&[SERVER_ID, CLIENT_ID], mesh.cp.status().0)
        .await;
    load.finish().await;
}

#[tokio::test]
async fn a_failed_renewal_keeps_the_current_certificate_until_the_control_plane_returns() {
    let app = start_named_echo("app").await;
    let mut mesh = IdMesh::start(app.addr, &["--cert-ttl", "20s"]).await;
    let serial = cert_field(&mesh.server.config().await, "serial");
    let (data, address) = (mesh.cp.data_dir.clone(), mesh.cp.addr);
    mesh.cp.kill9();

    // Renewal comes due and fails; the sidecar says so and keeps serving
    // with the certificate it has.
    eventually("a failed renewal", async || {
        mesh.server
            .logs()
            .contains("certificate renewal failed")
            .then_some(())
    })
    .await;
    assert_eq!(cert_field(&mesh.server.config().await, "serial"), serial);
    assert_eq!(admin_get(mesh.server.admin, "/ready").await.unwrap().0, 200);
    let load = Load::start(mesh.client.outbound).await;

    // The control plane is back: the next attempt renews.
    mesh.cp = ControlProc::spawn_with(
        crate::common::PYLON_CONTROL,
        &data,
        address,
        &["--cert-ttl", "20s"],
    );
    eventually("a renewed certificate", async || {
        (cert_field(&mesh.server.config().await, "serial") != serial).then_some(())
    })
    .await;
    load.finish().await;
}
