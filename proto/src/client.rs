//! A TLS channel to the control plane's gRPC API, for the CLI and for
//! sidecars.
//!
//! The server is verified with webpki against the given roots, by the host
//! name (or IP address) of the `https://host:port` address. A client may
//! present a certificate (a workload's, through a resolver that follows its
//! rotation). Keepalive pings find a dead control plane. A call proves who
//! makes it with a bearer token ([`authed`], [`insert_bearer`]) when it has
//! no certificate to show.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::ResolvesClientCert;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;
use tonic::Request;
use tonic::metadata::errors::InvalidMetadataValue;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::{Channel, Endpoint, Uri};

/// How long a connect and TLS handshake may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 PING interval on the channel.
pub const KEEPALIVE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0:?} is not an https://host:port address")]
    Address(String),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

/// Splits `https://host:port` (port defaults to 15010).
pub fn host_port(address: &str) -> Result<(String, u16), ClientError> {
    let bad = || ClientError::Address(address.to_string());
    let uri: Uri = address.parse().map_err(|_| bad())?;
    if uri.scheme_str().is_some_and(|s| s != "https") {
        return Err(bad());
    }
    let host = uri.host().ok_or_else(bad)?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok((host, uri.port_u16().unwrap_or(15010)))
}

/// The rustls configuration of a control-plane client.
pub fn client_config(
    roots: RootCertStore,
    client_cert: Option<Arc<dyn ResolvesClientCert>>,
) -> Result<Arc<ClientConfig>, ClientError> {
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
    let mut config = match client_cert {
        Some(resolver) => builder.with_client_cert_resolver(resolver),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A channel to `address` that connects on first use (and reconnects).
pub fn lazy_channel(address: &str, tls: Arc<ClientConfig>) -> Result<Channel, ClientError> {
    let (host, port) = host_port(address)?;
    let server_name = ServerName::try_from(host.clone())
        .map_err(|_| ClientError::Address(address.to_string()))?;
    let endpoint = Endpoint::from_shared(format!("http://{}", authority(&host, port)))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE * 2)
        .keep_alive_while_idle(true);
    let connector = tower::service_fn(move |_: Uri| {
        let (host, tls, server_name) = (host.clone(), tls.clone(), server_name.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(server_name, tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// `msg` as a request carrying `authorization: Bearer <token>`.
pub fn authed<T>(msg: T, token: &str) -> Result<Request<T>, InvalidMetadataValue> {
    let mut req = Request::new(msg);
    insert_bearer(req.metadata_mut(), token)?;
    Ok(req)
}

/// Sets `authorization: Bearer <token>`; an error when the token holds
/// bytes a header value cannot.
pub fn insert_bearer(metadata: &mut MetadataMap, token: &str) -> Result<(), InvalidMetadataValue> {
    metadata.insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}"))?,
    );
    Ok(())
}

fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            host_port("https://127.0.0.1:15010").unwrap(),
            ("127.0.0.1".into(), 15010)
        );
        assert_eq!(
            host_port("https://cp.pylon-system.svc").unwrap(),
            ("cp.pylon-system.svc".into(), 15010)
        );
        assert_eq!(host_port("https://[::1]:99").unwrap(), ("::1".into(), 99));
        assert!(host_port("http://x:1").is_err());
        assert!(host_port("not an address").is_err());
    }

    #[test]
    fn bearer_tokens() {
        let req = authed((), "abc.def").unwrap();
        assert_eq!(
            req.metadata().get("authorization").unwrap(),
            "Bearer abc.def"
        );
        let mut req = authed((), "old").unwrap();
        insert_bearer(req.metadata_mut(), "new").unwrap();
        assert_eq!(req.metadata().get_all("authorization").iter().count(), 1);
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer new");
        assert!(authed((), "line\nbreak").is_err());
    }
}
