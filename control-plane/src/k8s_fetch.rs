//! OIDC discovery of a Kubernetes service-account issuer's keys.
//!
//! `GET <issuer>/.well-known/openid-configuration` names `jwks_uri`; `GET`
//! that gives the JWKS. Both over HTTPS, verified against the cluster's CA
//! (`--kubernetes-issuer-ca`, by default the service account's `ca.crt`),
//! with the control plane's own service-account token as a bearer when one
//! is given (the API server serves discovery to service accounts).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri, header};
use http_body_util::{BodyExt, Collected, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde_json::Value;

use crate::k8s_token::Jwks;

/// How long one discovery or JWKS request may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest discovery document or JWKS read.
const MAX_BODY: usize = 1 << 20;

/// Where and how to fetch the issuer's keys.
#[derive(Debug, Clone)]
pub struct Discovery {
    pub issuer: String,
    /// PEM roots for the issuer's serving certificate.
    pub ca_file: PathBuf,
    /// A bearer token to present (the control plane's own service account).
    pub token_file: Option<PathBuf>,
}

impl Discovery {
    /// Fetches the discovery document, then the JWKS it names.
    pub async fn fetch_jwks(&self) -> Result<Jwks, String> {
        let tls = self.tls()?;
        let token = match &self.token_file {
            Some(p) => Some(
                tokio::fs::read_to_string(p)
                    .await
                    .map_err(|e| format!("{}: {e}", p.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        let discovery_url = format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        );
        let doc: Value =
            serde_json::from_slice(&get(&discovery_url, &tls, token.as_deref()).await?)
                .map_err(|e| format!("{discovery_url}: not JSON: {e}"))?;
        if doc.get("issuer").and_then(Value::as_str) != Some(self.issuer.as_str()) {
            return Err(format!(
                "{discovery_url}: the document's issuer is not {:?}",
                self.issuer
            ));
        }
        let jwks_uri = doc
            .get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{discovery_url}: no jwks_uri"))?;
        let body = get(jwks_uri, &tls, token.as_deref()).await?;
        let text =
            String::from_utf8(body.to_vec()).map_err(|_| format!("{jwks_uri}: not UTF-8"))?;
        Jwks::parse(&text).map_err(|e| format!("{jwks_uri}: {e}"))
    }

    fn tls(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        let roots = pylon_proto::tls_roots::required_roots_from_file(&self.ca_file)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

/// `GET url` over HTTPS (HTTP/1.1): the body of a 200.
async fn get(
    url: &str,
    tls: &Arc<rustls::ClientConfig>,
    token: Option<&str>,
) -> Result<Bytes, String> {
    let fetch = async {
        let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!("{url}: only https is accepted"));
        }
        let host = uri.host().ok_or_else(|| format!("{url}: no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(443);
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let name = ServerName::try_from(host.clone()).map_err(|e| format!("{url}: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("{url}: TLS: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut req = Request::get(path)
            .header(
                header::HOST,
                uri.authority().map_or(host.as_str(), |a| a.as_str()),
            )
            .header(header::ACCEPT, "application/json");
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("{url}: {e}"))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if resp.status() != http::StatusCode::OK {
            return Err(format!("{url}: HTTP {}", resp.status()));
        }
        Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map(Collected::to_bytes)
            .map_err(|e| format!("{url}: {e}"))
    };
    tokio::time::timeout(FETCH_TIMEOUT, fetch)
        .await
        .map_err(|_| format!("{url}: timed out after {FETCH_TIMEOUT:?}"))?
}
