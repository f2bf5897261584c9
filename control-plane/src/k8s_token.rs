//! Kubernetes service-account tokens as bootstrap credentials.
//!
//! A pod's projected service-account token (audience `pylon`) is a JWT the
//! cluster's issuer signed. Verified here against the issuer's JWKS — its
//! signature (RS256 or ES256, nothing else: never `none`), `iss`, `aud`,
//! `exp`/`nbf`, and the `kubernetes.io` claims — it names the workload:
//! `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
//!
//! The keys come from a JWKS file (`--kubernetes-jwks`) or from the
//! issuer's OIDC discovery document (`--kubernetes-issuer`); either is read
//! again when a token names a key id the verifier does not know (the
//! cluster rotated its signing key), at most once per
//! [`MIN_REFRESH_INTERVAL`], so that made-up key ids cannot make the
//! control plane fetch on every request.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;

/// The audience a pod's token must be issued for.
pub const AUDIENCE: &str = "pylon";
/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 60;
/// The least time between two reads of the keys for unknown key ids.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(2);
/// The largest token considered (a projected token is about 1 KiB).
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why a token was refused. `reason()` is the bounded label it is counted
/// under.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token algorithm {0:?} is not accepted (RS256 or ES256)")]
    Algorithm(String),
    #[error("token signed by an unknown key {0:?}")]
    UnknownKey(String),
    #[error("token signature does not verify")]
    Signature,
    #[error("token issuer {found:?} is not one of {expected:?}")]
    Issuer {
        found: String,
        expected: Vec<String>,
    },
    #[error("token audience does not include {AUDIENCE:?}")]
    Audience,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("token claims: {0}")]
    Claims(String),
    #[error("the issuer's keys are unavailable: {0}")]
    Keys(String),
}

impl TokenError {
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Malformed(_) => "malformed",
            TokenError::Algorithm(_) => "algorithm",
            TokenError::UnknownKey(_) => "unknown_key",
            TokenError::Signature => "signature",
            TokenError::Issuer { .. } => "issuer",
            TokenError::Audience => "audience",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::Claims(_) => "claims",
            TokenError::Keys(_) => "keys_unavailable",
        }
    }
}

/// What a verified token says about the workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub service_account: String,
    pub pod: Option<String>,
}

impl Workload {
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

/// A verification key.
#[derive(Clone)]
enum Key {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// An uncompressed P-256 point (0x04 ‖ x ‖ y).
    P256(Vec<u8>),
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Rsa { n, .. } => write!(f, "RSA({} bits)", n.len() * 8),
            Key::P256(_) => f.write_str("P-256"),
        }
    }
}

/// The keys of a JWKS by key id (`""` for a key without one).
#[derive(Debug, Clone, Default)]
pub struct Jwks {
    keys: HashMap<String, Key>,
}

impl Jwks {
    /// Reads a JWKS document. Keys of other types or curves are skipped;
    /// a document with no usable key is an error.
    pub fn parse(text: &str) -> Result<Jwks, String> {
        let doc: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("no \"keys\" array")?;
        let mut out = HashMap::new();
        for (i, k) in keys.iter().enumerate() {
            let kid = k
                .get("kid")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let field = |name: &str| -> Result<Vec<u8>, String> {
                let s = k
                    .get(name)
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("keys[{i}].{name}: missing"))?;
                URL_SAFE_NO_PAD
                    .decode(s.trim_end_matches('='))
                    .map_err(|e| format!("keys[{i}].{name}: {e}"))
            };
            let key = match (
                k.get("kty").and_then(Value::as_str),
                k.get("crv").and_then(Value::as_str),
            ) {
                (Some("RSA"), _) => Key::Rsa {
                    n: field("n")?,
                    e: field("e")?,
                },
                (Some("EC"), Some("P-256")) => {
                    let (x, y) = (field("x")?, field("y")?);
                    if x.len() != 32 || y.len() != 32 {
                        return Err(format!("keys[{i}]: a P-256 coordinate is not 32 bytes"));
                    }
                    let mut point = Vec::with_capacity(65);
                    point.push(4);
                    point.extend_from_slice(&x);
                    point.extend_from_slice(&y);
                    Key::P256(point)
                }
                _ => continue,
            };
            out.insert(kid, key);
        }
        if out.is_empty() {
            return Err("no RSA or P-256 key".to_string());
        }
        Ok(Jwks { keys: out })
    }

    pub fn key_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.keys.keys().cloned().collect();
        ids.sort();
        ids
    }
}

/// The verified parts of a token, before the keys are consulted.
struct Parsed<'a> {
    alg: String,
    kid: String,
    signed: &'a [u8],
    signature: Vec<u8>,
    claims: Value,
}

fn parse_token(token: &str) -> Result<Parsed<'_>, TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::Malformed("too long".into()));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed(
            "not three dot-separated parts".into(),
        ));
    };
    let decode = |what: &str, part: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|e| TokenError::Malformed(format!("{what}: {e}")))
    };
    let json = |what: &str, bytes: Vec<u8>| -> Result<Value, TokenError> {
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| TokenError::Malformed(format!("{what}: {e}")))?;
        if v.is_object() {
            Ok(v)
        } else {
            Err(TokenError::Malformed(format!("{what}: not a JSON object")))
        }
    };
    let header = json("header", decode("header", h)?)?;
    let claims = json("claims", decode("claims", p)?)?;
    let signature = decode("signature", s)?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if alg != "RS256" && alg != "ES256" {
        return Err(TokenError::Algorithm(alg));
    }
    if header.get("crit").is_some() {
        return Err(TokenError::Malformed("critical header extensions".into()));
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    Ok(Parsed {
        alg,
        kid,
        signed: &token.as_bytes()[..h.len() + 1 + p.len()],
        signature,
        claims,
    })
}

fn verify_signature(p: &Parsed<'_>, key: &Key) -> Result<(), TokenError> {
    use ring::signature;
    let ok = match (p.alg.as_str(), key) {
        ("RS256", Key::Rsa { n, e }) => signature::RsaPublicKeyComponents { n, e }
            .verify(
                &signature::RSA_PKCS1_2048_8192_SHA256,
                p.signed,
                &p.signature,
            )
            .is_ok(),
        ("ES256", Key::P256(point)) => {
            signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                .verify(p.signed, &p.signature)
                .is_ok()
        }
        // A key of the other type: the token's alg does not match its key.
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(TokenError::Signature)
    }
}

/// Checks the claims of a token whose signature verified.
fn check_claims(claims: &Value, issuers: &[String], now: u64) -> Result<Workload, TokenError> {
    let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
    if !issuers.iter().any(|i| i == iss) {
        return Err(TokenError::Issuer {
            found: iss.to_string(),
            expected: issuers.to_vec(),
        });
    }
    let audience_ok = match claims.get("aud") {
        Some(Value::String(a)) => a == AUDIENCE,
        Some(Value::Array(a)) => a.iter().any(|a| a.as_str() == Some(AUDIENCE)),
        _ => false,
    };
    if !audience_ok {
        return Err(TokenError::Audience);
    }
    let number = |name: &str| claims.get(name).and_then(Value::as_u64);
    let exp = number("exp").ok_or_else(|| TokenError::Claims("exp: required".into()))?;
    if now > exp.saturating_add(LEEWAY_SECS) {
        return Err(TokenError::Expired);
    }
    if let Some(nbf) = number("nbf")
        && nbf > now.saturating_add(LEEWAY_SECS)
    {
        return Err(TokenError::NotYetValid);
    }
    let k8s = claims
        .get("kubernetes.io")
        .ok_or_else(|| TokenError::Claims("kubernetes.io: required".into()))?;
    let text = |v: Option<&Value>, path: &str| -> Result<String, TokenError> {
        v.and_then(Value::as_str)
            .filter(|s| is_dns_label_like(s))
            .map(str::to_string)
            .ok_or_else(|| TokenError::Claims(format!("{path}: missing or not a Kubernetes name")))
    };
    let namespace = text(k8s.get("namespace"), "kubernetes.io.namespace")?;
    let service_account = text(
        k8s.get("serviceaccount").and_then(|s| s.get("name")),
        "kubernetes.io.serviceaccount.name",
    )?;
    let pod = k8s
        .get("pod")
        .and_then(|p| p.get("name"))
        .and_then(Value::as_str)
        .map(str::to_string);
    if let Some(sub) = claims.get("sub").and_then(Value::as_str)
        && sub != format!("system:serviceaccount:{namespace}:{service_account}")
    {
        return Err(TokenError::Claims(format!(
            "sub {sub:?} does not name the token's service account"
        )));
    }
    Ok(Workload {
        namespace,
        service_account,
        pod,
    })
}

/// Kubernetes names: lowercase alphanumerics, `-` and `.`, 1–253 bytes.
/// (Keeps anything else out of the SPIFFE ID the token maps to.)
fn is_dns_label_like(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// Where the issuer's keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A JWKS document on disk (re-read on an unknown key id).
    File(PathBuf),
    /// OIDC discovery at `<issuer>/.well-known/openid-configuration`.
    Discovery(crate::k8s_fetch::Discovery),
}

/// The `iss` of service-account tokens on most clusters (kubeadm, kind,
/// k3s: `--service-account-issuer` defaults), accepted with a JWKS file
/// when no issuer is named.
pub const DEFAULT_ISSUERS: &[&str] = &[
    "https://kubernetes.default.svc.cluster.local",
    "https://kubernetes.default.svc",
];

/// Verifies service-account tokens for one trust domain.
pub struct TokenVerifier {
    /// The `iss` values accepted.
    issuers: Vec<String>,
    source: KeySource,
    keys: Mutex<Arc<Jwks>>,
    last_refresh: Mutex<Option<Instant>>,
    /// One refresh at a time.
    refreshing: tokio::sync::Mutex<()>,
}

impl TokenVerifier {
    /// Reads the keys once. An unreadable file is an error at start; an
    /// issuer that cannot be reached yet (the API server restarting) is
    /// not: the control plane starts without keys and reads them at the
    /// first token.
    pub async fn new(issuers: Vec<String>, source: KeySource) -> Result<TokenVerifier, String> {
        let (jwks, last_refresh) = match (load(&source).await, &source) {
            (Ok(jwks), _) => (jwks, Some(Instant::now())),
            (Err(e), KeySource::Discovery(_)) => {
                tracing::warn!(?issuers, error = %e, "the issuer's keys are not available yet; they are read again at the first token");
                (Jwks::default(), None)
            }
            (Err(e), KeySource::File(_)) => return Err(e),
        };
        tracing::info!(?issuers, keys = ?jwks.key_ids(), "verifying Kubernetes service-account tokens");
        Ok(TokenVerifier {
            issuers,
            source,
            keys: Mutex::new(Arc::new(jwks)),
            last_refresh: Mutex::new(last_refresh),
            refreshing: tokio::sync::Mutex::new(()),
        })
    }

    /// Whether a bearer credential is a JWT (rather than a bootstrap token).
    pub fn looks_like_jwt(token: &str) -> bool {
        token.starts_with("eyJ") && token.bytes().filter(|b| *b == b'.').count() == 2
    }

    /// Verifies `token` at `now` (Unix seconds).
    pub async fn verify(&self, token: &str, now: u64) -> Result<Workload, TokenError> {
        let parsed = parse_token(token)?;
        let key = match self.key(&parsed) {
            Some(k) => k,
            None => {
                self.refresh().await?;
                self.key(&parsed)
                    .ok_or_else(|| TokenError::UnknownKey(parsed.kid.clone()))?
            }
        };
        verify_signature(&parsed, &key)?;
        check_claims(&parsed.claims, &self.issuers, now)
    }

    fn key(&self, p: &Parsed<'_>) -> Option<Key> {
        let keys = self
            .keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(k) = keys.keys.get(&p.kid) {
            return Some(k.clone());
        }
        // A token without a key id: the issuer's only key.
        if p.kid.is_empty() && keys.keys.len() == 1 {
            return keys.keys.values().next().cloned();
        }
        None
    }

    /// Reads the keys again, unless that was done a moment ago.
    async fn refresh(&self) -> Result<(), TokenError> {
        let _one = self.refreshing.lock().await;
        {
            let last = self
                .last_refresh
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < MIN_REFRESH_INTERVAL) {
                return Ok(());
            }
        }
        *self
            .last_refresh
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        let jwks = load(&self.source).await.map_err(TokenError::Keys)?;
        tracing::info!(keys = ?jwks.key_ids(), "the issuer's keys were read again");
        *self.keys.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(jwks);
        Ok(())
    }
}

async fn load(source: &KeySource) -> Result<Jwks, String> {
    match source {
        KeySource::File(path) => {
            let text = tokio::fs::read_to_string(path)
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?;
            Jwks::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
        }
        KeySource::Discovery(d) => d.fetch_jwks().await,
    }
}

pub mod dev;

#[cfg(test)]
mod tests;
