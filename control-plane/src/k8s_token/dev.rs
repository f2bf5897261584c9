//! A stand-in for a cluster's service-account issuer, for tests, the demo
//! and benchmarks: keys that sign projected tokens exactly as the
//! Kubernetes API server does (RS256 or ES256, `kid` in the header), and
//! their JWKS.

#![allow(
    clippy::expect_used,
    reason = "test tooling, used only by tests and benchmarks: a key that cannot be made or sign is a broken test environment, and the panic is its report"
)]

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use serde_json::{Value, json};

/// A signing key and its public JWK.
pub enum TestKey {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

impl TestKey {
    /// A new P-256 key (ES256).
    pub fn es256() -> TestKey {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("P-256 key generation");
        TestKey::Ec(EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("own PKCS#8"))
    }

    /// An RSA key (RS256) from PKCS#8 PEM (ring cannot generate RSA keys).
    pub fn rsa_pkcs8_pem(pem_text: &str) -> Result<TestKey, String> {
        let pem = pem::parse(pem_text).map_err(|e| e.to_string())?;
        RsaKeyPair::from_pkcs8(pem.contents())
            .map(TestKey::Rsa)
            .map_err(|e| e.to_string())
    }

    pub fn alg(&self) -> &'static str {
        match self {
            TestKey::Rsa(_) => "RS256",
            TestKey::Ec(_) => "ES256",
        }
    }

    /// The public key as a JWK with key id `kid`.
    pub fn jwk(&self, kid: &str) -> Value {
        let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
        match self {
            TestKey::Rsa(k) => {
                let c = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(k.public());
                json!({"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig", "n": b64(&c.n), "e": b64(&c.e)})
            }
            TestKey::Ec(k) => {
                let p = k.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
                       "x": b64(&p[1..33]), "y": b64(&p[33..65])})
            }
        }
    }

    /// A JWS of `claims` with `header`, signed by this key.
    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        let h = URL_SAFE_NO_PAD.encode(header.to_string());
        let c = URL_SAFE_NO_PAD.encode(claims.to_string());
        let msg = format!("{h}.{c}");
        let rng = SystemRandom::new();
        let sig = match self {
            TestKey::Rsa(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &rng, msg.as_bytes(), &mut sig)
                    .expect("RSA signing");
                sig
            }
            TestKey::Ec(k) => k
                .sign(&rng, msg.as_bytes())
                .expect("ECDSA signing")
                .as_ref()
                .to_vec(),
        };
        format!("{msg}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    /// A projected service-account token for `ns`/`sa`, audience `pylon`,
    /// valid until `exp`, signed with key id `kid`.
    pub fn token(&self, kid: &str, issuer: &str, ns: &str, sa: &str, exp: u64) -> String {
        self.sign(
            &json!({"alg": self.alg(), "kid": kid}),
            &claims_for(issuer, ns, sa, exp),
        )
    }
}

/// The claims the API server puts in a projected token for a pod of
/// `ns`/`sa`.
pub fn claims_for(issuer: &str, ns: &str, sa: &str, exp: u64) -> Value {
    json!({
        "iss": issuer,
        "aud": ["pylon"],
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "iat": exp.saturating_sub(3600),
        "nbf": exp.saturating_sub(3600),
        "exp": exp,
        "kubernetes.io": {
            "namespace": ns,
            "serviceaccount": {"name": sa, "uid": "0d3b6c2e-1111-2222-3333-444455556666"},
            "pod": {"name": format!("{sa}-7d9f"), "uid": "9a0c9a0c-1111-2222-3333-444455556666"}
        }
    })
}

/// A JWKS of `keys` (with their key ids).
pub fn jwks(keys: &[(&TestKey, &str)]) -> String {
    json!({"keys": keys.iter().map(|(k, kid)| k.jwk(kid)).collect::<Vec<_>>()}).to_string()
}
