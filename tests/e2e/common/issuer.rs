//! A Kubernetes service-account issuer as a cluster publishes it: OIDC
//! discovery and the JWKS over HTTPS (`/.well-known/openid-configuration`,
//! `/openid/v1/jwks`), with a serving certificate of its own CA.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub struct Issuer {
    /// `https://127.0.0.1:PORT`: the tokens' `iss`.
    pub url: String,
    /// The CA that verifies the issuer's certificate.
    pub ca_file: PathBuf,
    jwks: Arc<Mutex<String>>,
    /// JWKS requests served so far.
    pub fetches: Arc<std::sync::atomic::AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl Issuer {
    pub async fn start(dir: &Path) -> Issuer {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::IpAddress([127, 0, 0, 1].into())];
        let cert = params.self_signed(&key).unwrap();
        let ca_file = dir.join("issuer-ca.pem");
        std::fs::write(&ca_file, cert.pem()).unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let jwks = Arc::new(Mutex::new(String::from(r#"{"keys":[]}"#)));
        let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (served, count, issuer) = (jwks.clone(), fetches.clone(), url.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, served, count, issuer) = (
                    acceptor.clone(),
                    served.clone(),
                    count.clone(),
                    issuer.clone(),
                );
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let body = match req.uri().path() {
                            "/.well-known/openid-configuration" => Some(
                                serde_json::json!({
                                    "issuer": issuer,
                                    "jwks_uri": format!("{issuer}/openid/v1/jwks"),
                                    "response_types_supported": ["id_token"],
                                    "subject_types_supported": ["public"],
                                    "id_token_signing_alg_values_supported": ["RS256", "ES256"],
                                })
                                .to_string(),
                            ),
                            "/openid/v1/jwks" => {
                                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                Some(served.lock().unwrap().clone())
                            }
                            _ => None,
                        };
                        let resp = match body {
                            Some(b) => Response::new(Full::new(Bytes::from(b))),
                            None => {
                                let mut r = Response::new(Full::new(Bytes::new()));
                                *r.status_mut() = StatusCode::NOT_FOUND;
                                r
                            }
                        };
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Issuer {
            url,
            ca_file,
            jwks,
            fetches,
            _task: task,
        }
    }

    /// Publishes `jwks` (the cluster rotated its keys).
    pub fn publish(&self, jwks: String) {
        *self.jwks.lock().unwrap() = jwks;
    }
}
