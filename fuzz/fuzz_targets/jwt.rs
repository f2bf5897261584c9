//! Service-account JWTs as `IssueCertificate` verifies them, and the JWKS
//! the keys come from. First byte picks:
//!
//! - `0 mod 3`: the rest is a token, verified as it is (parsing, base64,
//!   header, key lookup, signature).
//! - `1 mod 3`: the rest is `<header JSON>\0<claims JSON>`, signed with the
//!   issuer's real key, so the fuzzer reaches the header and claims checks
//!   behind the signature.
//! - `2 mod 3`: the rest is a JWKS document.
//!
//! Invariants: no panic; only ES256/RS256 and a key of the JWKS verify; an
//! accepted token satisfies every claim rule (issuer, audience `pylon`,
//! expiry with the leeway, Kubernetes names, `sub`) and names a SPIFFE ID
//! with nothing but Kubernetes-name characters in its segments.
#![no_main]

use std::sync::LazyLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use libfuzzer_sys::fuzz_target;
use pylon_control::k8s_token::dev::{TestKey, jwks};
use pylon_control::k8s_token::{Jwks, KeySource, TokenVerifier, Workload};
use serde_json::Value;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const NOW: u64 = 1_800_000_000;

struct Env {
    runtime: tokio::runtime::Runtime,
    key: TestKey,
    verifier: TokenVerifier,
}

static ENV: LazyLock<Env> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let key = TestKey::es256();
    let dir = std::env::temp_dir().join(format!("pylon-fuzz-jwt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let path = dir.join("jwks.json");
    std::fs::write(&path, jwks(&[(&key, "ec-1")])).expect("the JWKS written");
    let verifier = runtime
        .block_on(TokenVerifier::new(
            vec![ISSUER.to_string()],
            KeySource::File(path),
        ))
        .expect("a verifier");
    // The verifier holds the keys it read; nothing is left in the temp
    // directory. A token with an unknown key id now finds the file gone
    // when the verifier reads it again, and is refused as it was before
    // (`keys_unavailable` instead of `unknown_key`).
    std::fs::remove_dir_all(&dir).expect("the temp dir removed");
    Env {
        runtime,
        key,
        verifier,
    }
});

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// What any accepted token must satisfy.
fn check_accepted(token: &str, w: &Workload) {
    assert!(
        is_name(&w.namespace) && is_name(&w.service_account),
        "{w:?}"
    );
    let id = w.spiffe_id("pylon.local");
    assert_eq!(
        id,
        format!(
            "spiffe://pylon.local/ns/{}/sa/{}",
            w.namespace, w.service_account
        )
    );
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    let json = |part: &str| -> Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64")).expect("JSON")
    };
    let (header, claims) = (json(parts[0]), json(parts[1]));
    assert_eq!(header["alg"], "ES256", "{header}");
    assert!(header.get("crit").is_none());
    assert_eq!(claims["iss"], ISSUER);
    let aud_ok = match &claims["aud"] {
        Value::String(a) => a == "pylon",
        Value::Array(a) => a.iter().any(|a| a == "pylon"),
        _ => false,
    };
    assert!(aud_ok, "{claims}");
    let exp = claims["exp"].as_u64().expect("exp");
    assert!(NOW <= exp.saturating_add(60));
    if let Some(nbf) = claims["nbf"].as_u64() {
        assert!(nbf <= NOW + 60);
    }
    let k8s = &claims["kubernetes.io"];
    assert_eq!(k8s["namespace"], w.namespace.as_str());
    assert_eq!(k8s["serviceaccount"]["name"], w.service_account.as_str());
    if let Some(sub) = claims["sub"].as_str() {
        assert_eq!(
            sub,
            format!(
                "system:serviceaccount:{}:{}",
                w.namespace, w.service_account
            )
        );
    }
}

fn sign(key: &TestKey, header: &[u8], claims: &[u8]) -> String {
    let msg = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let TestKey::Ec(pair) = key else {
        unreachable!("the fuzz issuer's key is ES256")
    };
    let sig = pair
        .sign(&ring::rand::SystemRandom::new(), msg.as_bytes())
        .expect("ECDSA signing");
    format!("{msg}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let env = &*ENV;
    match mode % 3 {
        0 => {
            let token = String::from_utf8_lossy(rest);
            let _ = TokenVerifier::looks_like_jwt(&token);
            if let Ok(w) = env.runtime.block_on(env.verifier.verify(&token, NOW)) {
                check_accepted(&token, &w);
            }
        }
        1 => {
            let (header, claims) = match rest.iter().position(|&b| b == 0) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (&br#"{"alg":"ES256","kid":"ec-1"}"#[..], rest),
            };
            let token = sign(&env.key, header, claims);
            let result = env.runtime.block_on(env.verifier.verify(&token, NOW));
            if let Ok(w) = &result {
                check_accepted(&token, w);
            }
            let _ = result.map_err(|e| (e.reason(), e.to_string()));
        }
        _ => {
            if let Ok(j) = Jwks::parse(&String::from_utf8_lossy(rest)) {
                assert!(!j.key_ids().is_empty());
            }
        }
    }
});
