//! rustls configurations for the mesh: SPIFFE verification on both sides.
//!
//! A peer is accepted when its chain verifies against the trust bundle and
//! its leaf carries exactly one `spiffe://` URI SAN. The client side also
//! requires that ID to equal the identity the Backend expects; server names
//! play no part. Certificates and trust anchors are read from the
//! [`IdentityStore`] on every handshake, so rotation needs no new config.
//! Between sidecars only TLS 1.3 is spoken, on both sides: a peer that
//! offers nothing newer than 1.2 fails the handshake.

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, ResolvesClientCert, Resumption,
    Tls12ClientSessionValue, Tls13ClientSessionValue, verify_server_cert_signed_by_trust_anchor,
};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, NamedGroup,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{IdentityStore, spiffe_id_of};

/// The protocol versions of every mesh connection.
const MESH_VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// ALPN protocols the inbound listener offers.
const INBOUND_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The peer presented a valid certificate for another identity than expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityMismatch {
    pub expected: String,
    pub actual: String,
}

impl fmt::Display for IdentityMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "peer identity is {}, expected {}",
            self.actual, self.expected
        )
    }
}

impl std::error::Error for IdentityMismatch {}

/// The peer's certificate verified but carries no usable SPIFFE ID.
#[derive(Debug, Clone)]
struct NoSpiffeId(String);

impl fmt::Display for NoSpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NoSpiffeId {}

fn other_cert_error(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Finds an [`IdentityMismatch`] inside an error chain, e.g. an `io::Error`
/// returned by a TLS connect.
pub fn find_identity_mismatch<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a IdentityMismatch> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(Error::InvalidCertificate(CertificateError::Other(OtherError(inner)))) =
            e.downcast_ref::<Error>()
        {
            return inner.downcast_ref::<IdentityMismatch>();
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            cur = Some(inner);
            continue;
        }
        cur = e.source();
    }
    None
}

/// The inbound listener's config: TLS 1.3, client certificates required,
/// ALPN h2 and HTTP/1.1.
pub fn server_config(store: &Arc<IdentityStore>) -> Result<Arc<ServerConfig>, Error> {
    let verifier = Arc::new(SpiffeClientVerifier {
        store: store.clone(),
        cached: Mutex::new(None),
    });
    let mut config = ServerConfig::builder_with_provider(store.crypto_provider().clone())
        .with_protocol_versions(MESH_VERSIONS)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(StoreResolver(store.clone())));
    config.alpn_protocols = INBOUND_ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A client config for mesh connections to peers that must prove
/// `expected_identity`: TLS 1.3, ALPN h2 only.
pub fn client_config(
    store: &Arc<IdentityStore>,
    expected_identity: &str,
) -> Result<Arc<ClientConfig>, Error> {
    let verifier = Arc::new(SpiffeServerVerifier {
        store: store.clone(),
        expected: expected_identity.to_string(),
    });
    let mut config = ClientConfig::builder_with_provider(store.crypto_provider().clone())
        .with_protocol_versions(MESH_VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(StoreResolver(store.clone())));
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.resumption = Resumption::store(Arc::new(LazySessions::default()));
    Ok(Arc::new(config))
}

/// Sessions kept per client config, as rustls's default.
const SESSIONS_PER_CONFIG: usize = 256;

/// rustls's in-memory session cache, allocated when the first session (or
/// key exchange hint) is stored rather than with the config: a policy
/// builds one client config per expected identity — a thousand in a large
/// one — and most connect late or never.
#[derive(Debug, Default)]
struct LazySessions(OnceLock<ClientSessionMemoryCache>);

impl LazySessions {
    fn cache(&self) -> &ClientSessionMemoryCache {
        self.0
            .get_or_init(|| ClientSessionMemoryCache::new(SESSIONS_PER_CONFIG))
    }
}

impl ClientSessionStore for LazySessions {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.cache().set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.0.get()?.kx_hint(server_name)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.cache().set_tls12_session(server_name, value);
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.0.get()?.tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        if let Some(cache) = self.0.get() {
            cache.remove_tls12_session(server_name);
        }
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.cache().insert_tls13_ticket(server_name, value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        self.0.get()?.take_tls13_ticket(server_name)
    }
}

/// Presents the store's current certificate as a client (to the control
/// plane).
pub fn client_cert_resolver(store: &Arc<IdentityStore>) -> Arc<dyn ResolvesClientCert> {
    Arc::new(StoreResolver(store.clone()))
}

/// Presents the store's current certificate, on either side of a handshake.
#[derive(Debug)]
struct StoreResolver(Arc<IdentityStore>);

impl ResolvesServerCert for StoreResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.credentials().key.clone())
    }
}

impl ResolvesClientCert for StoreResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.credentials().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies a server's chain against the trust bundle, then its SPIFFE ID.
#[derive(Debug)]
struct SpiffeServerVerifier {
    store: Arc<IdentityStore>,
    expected: String,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.store.roots(),
            intermediates,
            now,
            self.store.signature_algorithms().all,
        )?;
        let actual = spiffe_id_of(end_entity).map_err(|e| other_cert_error(NoSpiffeId(e)))?;
        if actual != self.expected {
            return Err(other_cert_error(IdentityMismatch {
                expected: self.expected.clone(),
                actual,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, self.store.signature_algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, self.store.signature_algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.store.signature_algorithms().supported_schemes()
    }
}

/// Requires a client certificate chained to the trust bundle and carrying a
/// SPIFFE ID. Which IDs may call what is decided per request, not here.
#[derive(Debug)]
struct SpiffeClientVerifier {
    store: Arc<IdentityStore>,
    /// The webpki verifier for the trust bundle it was built from; rebuilt
    /// when the store's bundle is replaced.
    cached: Mutex<Option<VerifierFor>>,
}

/// A webpki client verifier and the trust bundle it was built from.
type VerifierFor = (Arc<RootCertStore>, Arc<dyn ClientCertVerifier>);

impl SpiffeClientVerifier {
    fn webpki(&self) -> Result<Arc<dyn ClientCertVerifier>, Error> {
        let roots = self.store.roots();
        let mut cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((for_roots, verifier)) = cached.as_ref()
            && Arc::ptr_eq(for_roots, &roots)
        {
            return Ok(verifier.clone());
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            self.store.crypto_provider().clone(),
        )
        .build()
        .map_err(|e| Error::General(format!("trust bundle unusable: {e}")))?;
        *cached = Some((roots, verifier.clone()));
        Ok(verifier)
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a mesh workload has exactly one certificate to offer.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.webpki()?
            .verify_client_cert(end_entity, intermediates, now)?;
        spiffe_id_of(end_entity).map_err(|e| other_cert_error(NoSpiffeId(e)))?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, self.store.signature_algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, self.store.signature_algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.store.signature_algorithms().supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use rustls::{ClientConnection, HandshakeKind, ServerConnection};

    use super::*;
    use crate::identity::dev::DevCa;

    const SERVER_ID: &str = "spiffe://pylon.local/ns/default/sa/server";
    const CLIENT_ID: &str = "spiffe://pylon.local/ns/default/sa/client";

    fn peer() -> ServerName<'static> {
        ServerName::IpAddress(IpAddr::from([10, 0, 0, 1]).into())
    }

    /// Moves TLS records between the two ends until neither has more.
    fn exchange(client: &mut ClientConnection, server: &mut ServerConnection) {
        let mut buf = Vec::new();
        for _ in 0..10 {
            buf.clear();
            client.write_tls(&mut buf).unwrap();
            let mut moved = !buf.is_empty();
            let mut rd = buf.as_slice();
            while !rd.is_empty() {
                server.read_tls(&mut rd).unwrap();
            }
            server.process_new_packets().unwrap();
            buf.clear();
            server.write_tls(&mut buf).unwrap();
            moved |= !buf.is_empty();
            let mut rd = buf.as_slice();
            while !rd.is_empty() {
                client.read_tls(&mut rd).unwrap();
            }
            client.process_new_packets().unwrap();
            if !moved && !client.is_handshaking() && !server.is_handshaking() {
                return;
            }
        }
    }

    #[test]
    fn a_client_configs_session_cache_is_made_at_the_first_stored_session() {
        let sessions = LazySessions::default();
        assert_eq!(sessions.kx_hint(&peer()), None);
        assert!(sessions.tls12_session(&peer()).is_none());
        assert!(sessions.take_tls13_ticket(&peer()).is_none());
        sessions.remove_tls12_session(&peer());
        assert!(sessions.0.get().is_none(), "reading allocates nothing");
        sessions.set_kx_hint(peer(), NamedGroup::X25519);
        assert!(sessions.0.get().is_some());
        assert_eq!(sessions.kx_hint(&peer()), Some(NamedGroup::X25519));
    }

    #[test]
    fn a_mesh_client_config_resumes_its_sessions() {
        let ca = DevCa::new("tls test").unwrap();
        let server = server_config(&ca.identity_store(SERVER_ID, &[&ca]).unwrap()).unwrap();
        let client =
            client_config(&ca.identity_store(CLIENT_ID, &[&ca]).unwrap(), SERVER_ID).unwrap();
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let mut c = ClientConnection::new(client.clone(), peer()).unwrap();
            let mut s = ServerConnection::new(server.clone()).unwrap();
            exchange(&mut c, &mut s);
            assert_eq!(c.alpn_protocol(), Some(&b"h2"[..]));
            kinds.push(c.handshake_kind());
        }
        assert_eq!(
            kinds,
            [Some(HandshakeKind::Full), Some(HandshakeKind::Resumed)]
        );
    }
}
