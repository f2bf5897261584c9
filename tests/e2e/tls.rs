//! The inbound listener accepts only mTLS with a certificate chained to the
//! mesh trust bundle; the outbound side only talks to peers that prove the
//! Backend's identity with a certificate from that bundle.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use pylon::identity::dev::DevCa;
use pylon::identity::tls::client_config;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;

use crate::common::echo::{echo_client, start_echo};
use crate::common::http::{empty, h2_over, start_http_app, text};
use crate::common::{CLIENT_ID, Mesh, SERVER_ID, TempDir, client_sidecar, server_sidecar};

/// Sends one HTTP/2 request over TLS with `config` to `addr`.
async fn h2_over_tls(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> Result<(StatusCode, String), Box<dyn std::error::Error + Send + Sync>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = TlsConnector::from(config)
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await?;
    let mut sender = h2_over(tls).await?;
    let req = Request::get("https://web.test/headers").body(empty())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    Ok((status, text(resp).await))
}

#[tokio::test]
async fn a_mesh_certificate_gets_through_and_its_identity_reaches_the_app() {
    let app = start_http_app().await;
    let mesh = Mesh::start(app.addr).await;
    let store = mesh.ca.identity_store(CLIENT_ID, &[&mesh.ca]).unwrap();
    let config = client_config(&store, SERVER_ID).unwrap();
    let (status, body) = h2_over_tls(config.clone(), mesh.server.inbound)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.contains(&format!("x-pylon-peer-identity: {CLIENT_ID}")),
        "{body}"
    );
    assert!(body.contains("version: HTTP/2.0"), "{body}");

    // HTTP/1.1 over mTLS reaches the app as HTTP/1.1.
    let mut h1 = (*config).clone();
    h1.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(mesh.server.inbound)
        .await
        .unwrap();
    let tls = TlsConnector::from(Arc::new(h1))
        .connect(ServerName::IpAddress(mesh.server.inbound.ip().into()), tcp)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/headers")
        .header("host", "web.test")
        .body(empty())
        .unwrap();
    let body = text(sender.send_request(req).await.unwrap()).await;
    assert!(body.contains("version: HTTP/1.1"), "{body}");
}

#[tokio::test]
async fn a_plaintext_client_is_refused() {
    let app = start_http_app().await;
    let mesh = Mesh::start(app.addr).await;

    let mut tcp = tokio::net::TcpStream::connect(mesh.server.inbound)
        .await
        .unwrap();
    tcp.write_all(b"GET /headers HTTP/1.1\r\nhost: web.test\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer).await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "a plaintext request got an HTTP answer: {:?}",
        String::from_utf8_lossy(&answer)
    );

    let tcp = tokio::net::TcpStream::connect(mesh.server.inbound)
        .await
        .unwrap();
    let outcome = async {
        let mut sender = h2_over(tcp).await?;
        sender
            .send_request(Request::get("http://web.test/headers").body(empty())?)
            .await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    }
    .await;
    assert!(outcome.is_err(), "h2c on the inbound port must fail");
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let app = start_http_app().await;
    let mesh = Mesh::start(app.addr).await;
    let rogue = DevCa::new("rogue root").unwrap();
    // Same SPIFFE ID, wrong issuer; it trusts the mesh CA so that only the
    // server's verdict on the client certificate matters.
    let store = rogue.identity_store(CLIENT_ID, &[&mesh.ca]).unwrap();
    let config = client_config(&store, SERVER_ID).unwrap();
    let outcome = h2_over_tls(config, mesh.server.inbound).await;
    assert!(
        outcome.is_err(),
        "a foreign client certificate got through: {outcome:?}"
    );
}

/// Accepts any server certificate: for a client that presents no
/// certificate of its own, so the server's refusal is what is tested.
#[derive(Debug)]
pub struct AnyServer(pub Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let app = start_http_app().await;
    let mesh = Mesh::start(app.addr).await;
    let provider = pylon::identity::provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let outcome = h2_over_tls(Arc::new(config), mesh.server.inbound).await;
    assert!(
        outcome.is_err(),
        "a client without a certificate got through: {outcome:?}"
    );
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_fails_the_call() {
    let app = start_echo().await;
    let dir = TempDir::new("rogue-server");
    let mesh_ca = DevCa::new("pylon test root").unwrap();
    let rogue = DevCa::new("rogue root").unwrap();
    // The server claims the right SPIFFE ID, with a certificate of another CA.
    let server = server_sidecar(&rogue, dir.path(), "server", SERVER_ID, app.addr);
    let (client, _) = client_sidecar(
        &mesh_ca,
        dir.path(),
        &crate::common::mesh_policy(server.inbound),
    );
    client.wait_ready().await;
    let mut echo = echo_client(client.outbound, "echo.test").await;
    let status = echo
        .unary(pylon_proto::v1::EchoRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(
        status.metadata().get("x-pylon-error").unwrap(),
        "tls-failed"
    );
}
