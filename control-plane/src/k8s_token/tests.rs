use super::dev::{TestKey, claims_for};
use super::*;
use ring::rand::SystemRandom;
use serde_json::json;

fn rsa_key() -> TestKey {
    TestKey::rsa_pkcs8_pem(include_str!("test-rsa.pem")).unwrap()
}

fn ec_key() -> TestKey {
    TestKey::es256()
}

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const NOW: u64 = 1_800_000_000;

fn claims(ns: &str, sa: &str, exp: u64) -> Value {
    claims_for(ISSUER, ns, sa, exp)
}

fn jwks_of(keys: &[(&TestKey, &str)]) -> String {
    super::dev::jwks(keys)
}

async fn verifier(dir: &std::path::Path, jwks: &str) -> TokenVerifier {
    let path = dir.join("jwks.json");
    std::fs::write(&path, jwks).unwrap();
    TokenVerifier::new(vec![ISSUER.to_string()], KeySource::File(path))
        .await
        .unwrap()
}

/// A directory of the test's own, removed when the test ends (passed or
/// not).
struct TempDir(std::path::PathBuf);

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(label: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!(
        "pylon-k8s-token-{label}-{}-{:x}",
        std::process::id(),
        rand_u64()
    ));
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut b).unwrap();
    u64::from_le_bytes(b)
}

#[tokio::test]
async fn rs256_and_es256_tokens_name_their_service_account() {
    let dir = temp_dir("good");
    let (rsa, ec) = (rsa_key(), ec_key());
    let v = verifier(&dir, &jwks_of(&[(&rsa, "rsa-1"), (&ec, "ec-1")])).await;
    for (key, kid) in [(&rsa, "rsa-1"), (&ec, "ec-1")] {
        let token = key.sign(
            &json!({"alg": key.alg(), "kid": kid, "typ": "JWT"}),
            &claims("shop", "web", NOW + 600),
        );
        assert!(TokenVerifier::looks_like_jwt(&token));
        let w = v.verify(&token, NOW).await.unwrap();
        assert_eq!(
            w,
            Workload {
                namespace: "shop".into(),
                service_account: "web".into(),
                pod: Some("web-7d9f".into()),
            }
        );
        assert_eq!(
            w.spiffe_id("pylon.local"),
            "spiffe://pylon.local/ns/shop/sa/web"
        );
    }
    assert!(!TokenVerifier::looks_like_jwt(
        "pylon_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    ));
}

#[tokio::test]
async fn bad_tokens_are_refused_with_their_reason() {
    let dir = temp_dir("bad");
    let (rsa, ec, foreign) = (rsa_key(), ec_key(), ec_key());
    let v = verifier(&dir, &jwks_of(&[(&rsa, "rsa-1"), (&ec, "ec-1")])).await;
    let header = |kid: &str, alg: &str| json!({"alg": alg, "kid": kid});
    let good = claims("shop", "web", NOW + 600);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = good.clone();
        f(&mut c);
        c
    };
    let unsigned = {
        let h = URL_SAFE_NO_PAD.encode(json!({"alg": "none"}).to_string());
        let c = URL_SAFE_NO_PAD.encode(good.to_string());
        format!("{h}.{c}.")
    };
    let forged = {
        // Claims swapped after signing.
        let t = ec.sign(&header("ec-1", "ES256"), &good);
        let parts: Vec<&str> = t.split('.').collect();
        let other = URL_SAFE_NO_PAD.encode(claims("kube-system", "admin", NOW + 600).to_string());
        format!("{}.{other}.{}", parts[0], parts[2])
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            ec.sign(&header("ec-1", "ES256"), &claims("shop", "web", NOW - 3600)),
            "expired",
        ),
        (
            "not yet valid",
            ec.sign(
                &header("ec-1", "ES256"),
                &with(&|c| c["nbf"] = json!(NOW + 3600)),
            ),
            "not_yet_valid",
        ),
        (
            "wrong audience",
            ec.sign(
                &header("ec-1", "ES256"),
                &with(&|c| c["aud"] = json!(["https://kubernetes.default.svc"])),
            ),
            "audience",
        ),
        (
            "wrong issuer",
            ec.sign(
                &header("ec-1", "ES256"),
                &with(&|c| c["iss"] = json!("https://evil.example")),
            ),
            "issuer",
        ),
        (
            "no exp",
            ec.sign(
                &header("ec-1", "ES256"),
                &with(&|c| {
                    c.as_object_mut().unwrap().remove("exp");
                }),
            ),
            "claims",
        ),
        (
            "no kubernetes.io",
            ec.sign(
                &header("ec-1", "ES256"),
                &with(&|c| {
                    c.as_object_mut().unwrap().remove("kubernetes.io");
                }),
            ),
            "claims",
        ),
        (
            "sub of another account",
            ec.sign(
                &header("ec-1", "ES256"),
                &with(&|c| c["sub"] = json!("system:serviceaccount:kube-system:admin")),
            ),
            "claims",
        ),
        (
            "namespace not a name",
            ec.sign(
                &header("ec-1", "ES256"),
                &with(&|c| {
                    c["kubernetes.io"]["namespace"] = json!("shop/sa/admin");
                    c.as_object_mut().unwrap().remove("sub");
                }),
            ),
            "claims",
        ),
        ("alg none", unsigned, "algorithm"),
        (
            "HS256",
            ec.sign(&header("ec-1", "HS256"), &good),
            "algorithm",
        ),
        (
            "foreign key, known kid",
            foreign.sign(&header("ec-1", "ES256"), &good),
            "signature",
        ),
        (
            "foreign key, unknown kid",
            foreign.sign(&header("ec-9", "ES256"), &good),
            "unknown_key",
        ),
        (
            "alg of the other key type",
            rsa.sign(&header("ec-1", "RS256"), &good),
            "signature",
        ),
        ("claims swapped", forged, "signature"),
        (
            "two parts",
            "eyJhbGciOiJFUzI1NiJ9.e30".to_string(),
            "malformed",
        ),
        ("not base64", "eyJ!.e30.e30".to_string(), "malformed"),
        (
            "not JSON",
            format!("{}.e30.e30", URL_SAFE_NO_PAD.encode("{alg")),
            "malformed",
        ),
        (
            "huge",
            format!("eyJ{}.e30.e30", "A".repeat(20_000)),
            "malformed",
        ),
    ];
    for (what, token, reason) in cases {
        let err = v.verify(&token, NOW).await.unwrap_err();
        assert_eq!(err.reason(), reason, "{what}: {err}");
    }
}

#[tokio::test]
async fn a_rotated_key_is_picked_up_from_the_file() {
    let dir = temp_dir("rotate");
    let (old, new) = (ec_key(), ec_key());
    let v = verifier(&dir, &jwks_of(&[(&old, "2026-01")])).await;
    let token = new.sign(
        &json!({"alg": "ES256", "kid": "2026-02"}),
        &claims("shop", "web", NOW + 600),
    );
    // Just read: the unknown key id does not trigger another read yet.
    assert_eq!(
        v.verify(&token, NOW).await.unwrap_err().reason(),
        "unknown_key"
    );
    std::fs::write(
        dir.join("jwks.json"),
        jwks_of(&[(&old, "2026-01"), (&new, "2026-02")]),
    )
    .unwrap();
    *v.last_refresh.lock().unwrap() = Some(Instant::now() - MIN_REFRESH_INTERVAL);
    assert_eq!(v.verify(&token, NOW).await.unwrap().service_account, "web");
    // A key id nobody published, right after: refused without a read.
    let stray = new.sign(
        &json!({"alg": "ES256", "kid": "made-up"}),
        &claims("shop", "web", NOW + 600),
    );
    std::fs::write(dir.join("jwks.json"), "not json").unwrap();
    assert_eq!(
        v.verify(&stray, NOW).await.unwrap_err().reason(),
        "unknown_key"
    );
}

#[test]
fn jwks_documents_are_read_strictly() {
    assert!(Jwks::parse("{}").is_err());
    assert!(Jwks::parse(r#"{"keys": []}"#).is_err());
    assert!(Jwks::parse(r#"{"keys": [{"kty": "oct", "k": "AAAA"}]}"#).is_err());
    let ec = ec_key();
    let doc = json!({"keys": [ec.jwk("a"), {"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}]});
    assert_eq!(Jwks::parse(&doc.to_string()).unwrap().key_ids(), vec!["a"]);
    let mut short = ec.jwk("b");
    short["x"] = json!("AAAA");
    assert!(Jwks::parse(&json!({"keys": [short]}).to_string()).is_err());
}

#[tokio::test]
async fn an_unreachable_issuer_delays_keys_but_not_the_start() {
    let dir = temp_dir("unreachable");
    let v = TokenVerifier::new(
        vec!["https://127.0.0.1:1".into()],
        KeySource::Discovery(crate::k8s_fetch::Discovery {
            issuer: "https://127.0.0.1:1".into(),
            ca_file: dir.join("missing-ca.pem"),
            token_file: None,
        }),
    )
    .await
    .unwrap();
    let token = ec_key().sign(
        &json!({"alg": "ES256", "kid": "k"}),
        &claims("shop", "web", NOW + 600),
    );
    assert_eq!(
        v.verify(&token, NOW).await.unwrap_err().reason(),
        "keys_unavailable"
    );
    // A JWKS file that cannot be read is a configuration error at start.
    assert!(
        TokenVerifier::new(
            vec![ISSUER.into()],
            KeySource::File(dir.join("missing.json"))
        )
        .await
        .is_err()
    );
}
