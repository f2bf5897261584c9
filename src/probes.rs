//! The app's own Kubernetes probes, run by the sidecar.
//!
//! Injection rewrites the app containers' httpGet, tcpSocket and grpc
//! probes to `GET :15020/app-health/<container>/<kind>` on the sidecar's
//! probe listener, and hands the originals to the sidecar (`appProbes`).
//! The kubelet's probe then works whatever the inbound listener demands
//! (mTLS in strict mode): the sidecar runs the original probe against the
//! app the way the kubelet would have — from inside the pod, to the pod IP
//! (or loopback when the pod IP is unknown), within `timeoutSeconds`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{Method, Request, StatusCode, Uri, Version, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use serde_json::Value;
use tokio::net::TcpStream;

/// A probe's kind, as in `/app-health/<container>/<kind>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProbeKind {
    Startup,
    Readiness,
    Liveness,
}

impl ProbeKind {
    pub fn parse(s: &str) -> Option<ProbeKind> {
        match s {
            "startup" => Some(ProbeKind::Startup),
            "readiness" => Some(ProbeKind::Readiness),
            "liveness" => Some(ProbeKind::Liveness),
            _ => None,
        }
    }
}

/// What one probe does.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Http {
        port: u16,
        path: String,
        host: Option<String>,
        https: bool,
        headers: Vec<(String, String)>,
    },
    Tcp {
        port: u16,
        host: Option<String>,
    },
    Grpc {
        port: u16,
        service: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub action: Action,
    /// `timeoutSeconds` (Kubernetes' default: 1 s).
    pub timeout: Duration,
}

/// Every rewritten probe, by container and kind.
#[derive(Debug, Clone, Default)]
pub struct AppProbes {
    probes: BTreeMap<(String, ProbeKind), Arc<Probe>>,
}

/// The largest body read from an HTTP or gRPC probe answer.
const MAX_PROBE_BODY: usize = 64 * 1024;

impl AppProbes {
    /// Reads `{"<container>": {"readiness": <probe>, ...}}`, the probe
    /// objects as Kubernetes writes them (ports already numbers). Every
    /// problem is reported with its path.
    pub fn from_json(v: &Value) -> Result<AppProbes, Vec<String>> {
        let mut probes = BTreeMap::new();
        let mut problems = Vec::new();
        let Some(containers) = v.as_object() else {
            return Err(vec!["expected an object of containers".to_string()]);
        };
        for (container, kinds) in containers {
            let Some(kinds) = kinds.as_object() else {
                problems.push(format!("{container}: expected an object of probes"));
                continue;
            };
            for (kind_name, probe) in kinds {
                let path = format!("{container}.{kind_name}");
                let Some(kind) = ProbeKind::parse(kind_name) else {
                    problems.push(format!("{path}: expected startup, readiness or liveness"));
                    continue;
                };
                match parse_probe(probe) {
                    Ok(p) => {
                        probes.insert((container.clone(), kind), Arc::new(p));
                    }
                    Err(e) => problems.push(format!("{path}: {e}")),
                }
            }
        }
        if problems.is_empty() {
            Ok(AppProbes { probes })
        } else {
            Err(problems)
        }
    }

    pub fn get(&self, container: &str, kind: ProbeKind) -> Option<Arc<Probe>> {
        self.probes.get(&(container.to_string(), kind)).cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.probes.is_empty()
    }

    /// `<container>/<kind>` of every probe, for `/config`.
    pub fn names(&self) -> Vec<String> {
        self.probes
            .keys()
            .map(|(c, k)| format!("{c}/{}", format!("{k:?}").to_ascii_lowercase()))
            .collect()
    }
}

fn parse_probe(v: &Value) -> Result<Probe, String> {
    let timeout = match v.get("timeoutSeconds") {
        None | Some(Value::Null) => 1,
        Some(t) => t
            .as_u64()
            .filter(|t| *t >= 1)
            .ok_or_else(|| format!("timeoutSeconds: expected a whole number ≥ 1, found {t}"))?,
    };
    let port = |action: &Value, what: &str| -> Result<u16, String> {
        match action.get("port") {
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{what}.port: {n} is not a port")),
            Some(Value::String(s)) => s
                .parse::<u16>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{what}.port: {s:?} is not a port number (named ports are resolved by injection)")),
            _ => Err(format!("{what}.port: required")),
        }
    };
    let string =
        |action: &Value, key: &str| action.get(key).and_then(Value::as_str).map(str::to_string);
    let action = if let Some(h) = v.get("httpGet") {
        let scheme = string(h, "scheme").unwrap_or_else(|| "HTTP".into());
        let https = match scheme.to_ascii_uppercase().as_str() {
            "HTTP" => false,
            "HTTPS" => true,
            _ => {
                return Err(format!(
                    "httpGet.scheme: expected HTTP or HTTPS, found {scheme:?}"
                ));
            }
        };
        let mut path = string(h, "path").unwrap_or_else(|| "/".into());
        if !path.starts_with('/') {
            path.insert(0, '/');
        }
        let headers = h
            .get("httpHeaders")
            .and_then(Value::as_array)
            .map(|hs| {
                hs.iter()
                    .filter_map(|h| {
                        Some((string(h, "name")?, string(h, "value").unwrap_or_default()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Action::Http {
            port: port(h, "httpGet")?,
            path,
            host: string(h, "host"),
            https,
            headers,
        }
    } else if let Some(t) = v.get("tcpSocket") {
        Action::Tcp {
            port: port(t, "tcpSocket")?,
            host: string(t, "host"),
        }
    } else if let Some(g) = v.get("grpc") {
        Action::Grpc {
            port: port(g, "grpc")?,
            service: string(g, "service"),
        }
    } else {
        return Err("expected httpGet, tcpSocket or grpc".to_string());
    };
    Ok(Probe {
        action,
        timeout: Duration::from_secs(timeout),
    })
}

/// Runs probes against the local app.
pub struct Prober {
    /// Where the app is reached: the pod IP, as the kubelet would.
    default_host: IpAddr,
    tls: Arc<rustls::ClientConfig>,
}

impl Prober {
    pub fn new(pod_ip: Option<IpAddr>) -> Prober {
        Prober {
            default_host: pod_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            tls: insecure_tls(),
        }
    }

    /// Runs `probe`: `Ok` with what the app answered, or why it failed.
    pub async fn run(&self, probe: &Probe) -> Result<String, String> {
        match tokio::time::timeout(probe.timeout, self.run_action(&probe.action)).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {}s", probe.timeout.as_secs())),
        }
    }

    async fn connect(&self, host: Option<&str>, port: u16) -> Result<TcpStream, String> {
        let stream = match host {
            None => TcpStream::connect(SocketAddr::new(self.default_host, port)).await,
            Some(h) => TcpStream::connect((h, port)).await,
        };
        stream.map_err(|e| {
            format!(
                "cannot connect to {}:{port}: {e}",
                host.map_or_else(|| self.default_host.to_string(), str::to_string)
            )
        })
    }

    async fn run_action(&self, action: &Action) -> Result<String, String> {
        match action {
            Action::Tcp { port, host } => {
                self.connect(host.as_deref(), *port).await?;
                Ok(format!("tcp port {port} open"))
            }
            Action::Http {
                port,
                path,
                host,
                https,
                headers,
            } => {
                let tcp = self.connect(host.as_deref(), *port).await?;
                let authority = format!(
                    "{}:{port}",
                    host.clone().unwrap_or_else(|| match self.default_host {
                        IpAddr::V6(ip) => format!("[{ip}]"),
                        ip => ip.to_string(),
                    })
                );
                let status = if *https {
                    let name = rustls_pki_types::ServerName::try_from(
                        host.clone()
                            .unwrap_or_else(|| self.default_host.to_string()),
                    )
                    .map_err(|e| format!("bad host: {e}"))?;
                    let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                        .connect(name, tcp)
                        .await
                        .map_err(|e| format!("TLS handshake: {e}"))?;
                    http_get(TokioIo::new(tls), &authority, path, headers).await?
                } else {
                    http_get(TokioIo::new(tcp), &authority, path, headers).await?
                };
                if (200..400).contains(&status.as_u16()) {
                    Ok(format!("http status {}", status.as_u16()))
                } else {
                    Err(format!("http status {}", status.as_u16()))
                }
            }
            Action::Grpc { port, service } => {
                let tcp = self.connect(None, *port).await?;
                grpc_health(tcp, *port, service.as_deref().unwrap_or("")).await
            }
        }
    }
}

async fn http_get<T>(
    io: TokioIo<T>,
    authority: &str,
    path: &str,
    headers: &[(String, String)],
) -> Result<StatusCode, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(io)
        .await
        .map_err(|e| format!("http: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header(header::HOST, authority)
        .header(header::USER_AGENT, "kube-probe (pylon)")
        .header(header::ACCEPT, "*/*")
        .header(header::CONNECTION, "close");
    for (name, value) in headers {
        // A Host header in the probe replaces the default, as the kubelet does.
        if name.eq_ignore_ascii_case("host") {
            if let (Some(h), Ok(v)) = (req.headers_mut(), header::HeaderValue::from_str(value)) {
                h.insert(header::HOST, v);
            }
            continue;
        }
        req = req.header(name.as_str(), value.as_str());
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("http request: {e}"))?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| format!("http: {e}"))?;
    let status = resp.status();
    // Read (a bounded part of) the body so the app sees a complete exchange.
    let _ = Limited::new(resp.into_body(), MAX_PROBE_BODY)
        .collect()
        .await;
    Ok(status)
}

/// `grpc.health.v1.Health/Check` over h2c: healthy when the app answers
/// SERVING.
async fn grpc_health(tcp: TcpStream, port: u16, service: &str) -> Result<String, String> {
    let (mut send, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .map_err(|e| format!("grpc: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let msg = HealthCheckRequest {
        service: service.to_string(),
    }
    .encode_to_vec();
    let mut frame = BytesMut::with_capacity(5 + msg.len());
    frame.put_u8(0);
    frame.put_u32(msg.len() as u32);
    frame.put_slice(&msg);
    let uri: Uri = format!("http://127.0.0.1:{port}/grpc.health.v1.Health/Check")
        .parse()
        .map_err(|e| format!("grpc: {e}"))?;
    let req = Request::builder()
        .method(Method::POST)
        .version(Version::HTTP_2)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .header(header::USER_AGENT, "kube-probe (pylon)")
        .body(Full::new(frame.freeze()))
        .map_err(|e| format!("grpc request: {e}"))?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| format!("grpc: {e}"))?;
    let header_status = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let collected = Limited::new(resp.into_body(), MAX_PROBE_BODY)
        .collect()
        .await
        .map_err(|e| format!("grpc: {e}"))?;
    let trailer_status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let status = trailer_status.or(header_status).unwrap_or_default();
    if status != "0" {
        return Err(format!("grpc-status {status:?}"));
    }
    let body = collected.to_bytes();
    match serving_status(&body) {
        Some(1) => Ok("SERVING".to_string()),
        Some(s) => Err(format!("serving status {s} (not SERVING)")),
        None => Err("malformed HealthCheckResponse".to_string()),
    }
}

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `grpc.health.v1.HealthCheckResponse` (`status` 1 is SERVING).
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

/// The `status` (field 1) of a framed HealthCheckResponse; 0 (UNKNOWN)
/// when absent, as protobuf defaults say.
fn serving_status(body: &[u8]) -> Option<u64> {
    let (&[0], rest) = body.split_first_chunk::<1>()? else {
        return None;
    };
    let (len, msg) = rest.split_first_chunk::<4>()?;
    let msg = msg.get(..u32::from_be_bytes(*len) as usize)?;
    let response = HealthCheckResponse::decode(msg).ok()?;
    u64::try_from(response.status).ok()
}

/// The kubelet does not verify an HTTPS probe's certificate; neither does
/// the sidecar running it in its place.
fn insecure_tls() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth()
        });
    match config {
        Ok(c) => Arc::new(c),
        // The ring provider supports the default versions; unreachable.
        Err(_) => Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        ),
    }
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_every_probe_kind_and_reports_problems_with_paths() {
        let probes = AppProbes::from_json(&json!({
            "app": {
                "readiness": {"httpGet": {"path": "healthz", "port": 8080,
                    "httpHeaders": [{"name": "X-Probe", "value": "1"}]}, "timeoutSeconds": 3},
                "liveness": {"tcpSocket": {"port": "8081"}},
                "startup": {"grpc": {"port": 50051, "service": "greeter"}}
            }
        }))
        .unwrap();
        let r = probes.get("app", ProbeKind::Readiness).unwrap();
        assert_eq!(r.timeout, Duration::from_secs(3));
        assert_eq!(
            r.action,
            Action::Http {
                port: 8080,
                path: "/healthz".into(),
                host: None,
                https: false,
                headers: vec![("X-Probe".into(), "1".into())],
            }
        );
        assert_eq!(
            probes.get("app", ProbeKind::Liveness).unwrap().action,
            Action::Tcp {
                port: 8081,
                host: None
            }
        );
        assert_eq!(
            probes.get("app", ProbeKind::Startup).unwrap().action,
            Action::Grpc {
                port: 50051,
                service: Some("greeter".into())
            }
        );
        assert!(probes.get("other", ProbeKind::Startup).is_none());

        let errors = AppProbes::from_json(&json!({
            "app": {"readiness": {"httpGet": {"port": "http"}},
                    "sometimes": {"tcpSocket": {"port": 1}},
                    "liveness": {"exec": {"command": ["true"]}}}
        }))
        .unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("app.readiness: httpGet.port")),
            "{errors:?}"
        );
        assert!(
            errors.iter().any(|e| e.starts_with("app.sometimes:")),
            "{errors:?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("app.liveness: expected httpGet")),
            "{errors:?}"
        );
    }

    #[test]
    fn health_responses_are_read_from_their_frame() {
        // status: SERVING (1)
        assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 0x01]), Some(1));
        // empty message: UNKNOWN (0)
        assert_eq!(serving_status(&[0, 0, 0, 0, 0]), Some(0));
        // NOT_SERVING after an unknown length-delimited field
        assert_eq!(
            serving_status(&[0, 0, 0, 0, 5, 0x12, 0x01, b'x', 0x08, 0x02]),
            Some(2)
        );
        assert_eq!(serving_status(&[0, 0, 0, 0, 9, 0x08]), None);
        assert_eq!(serving_status(&[1, 0, 0, 0, 0]), None);
    }

    #[tokio::test]
    async fn tcp_and_http_probes_reach_a_real_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 4096];
                    let n = tcp.read(&mut buf).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    let status = if req.starts_with("GET /ok ") {
                        "200 OK"
                    } else {
                        "500 Oops"
                    };
                    let _ = tcp
                        .write_all(
                            format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes(),
                        )
                        .await;
                });
            }
        });
        let prober = Prober::new(None);
        let probe = |action| Probe {
            action,
            timeout: Duration::from_secs(5),
        };
        let http = |path: &str| Action::Http {
            port,
            path: path.into(),
            host: None,
            https: false,
            headers: vec![],
        };
        assert!(
            prober
                .run(&probe(Action::Tcp { port, host: None }))
                .await
                .is_ok()
        );
        assert_eq!(
            prober.run(&probe(http("/ok"))).await,
            Ok("http status 200".into())
        );
        assert_eq!(
            prober.run(&probe(http("/bad"))).await,
            Err("http status 500".into())
        );
        // Nothing listens on a port just released.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        assert!(
            prober
                .run(&probe(Action::Tcp {
                    port: closed,
                    host: None
                }))
                .await
                .is_err()
        );
    }
}
