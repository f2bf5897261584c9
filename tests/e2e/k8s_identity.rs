//! Kubernetes service-account tokens as bootstrap credentials, with real
//! processes: an issuer publishing its keys over HTTPS (OIDC discovery),
//! a control plane verifying projected tokens against them, sidecars that
//! hold nothing but such a token, every bad token refused and counted, and
//! a key rotation picked up.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use pylon_control::k8s_token::dev::{TestKey, jwks};
use pylon_proto::v1::{IssueCertificateRequest, WhoAmIRequest};
use rcgen::KeyPair;
use serde_json::json;

use crate::common::control::{ControlProc, cp_config};
use crate::common::echo::{echo_client, start_named_echo};
use crate::common::issuer::Issuer;
use crate::common::{SidecarProc, TempDir, eventually, mesh_policy};
use crate::identity::{certificates_issued, identity_client, with_token};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The control plane's `pylon_control_credentials_refused_total` samples.
async fn refused(metrics: SocketAddr, reason: &str) -> u64 {
    let (_, text) = crate::common::admin_get(metrics, "/metrics").await.unwrap();
    let want = format!(
        "pylon_control_credentials_refused_total{{kind=\"kubernetes\",reason=\"{reason}\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&want))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

// Multi-threaded: the issuer serves while the test blocks on a process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_get_sidecars_their_certificates_and_bad_ones_nothing() {
    let dir = TempDir::new("k8s-identity");
    let issuer = Issuer::start(dir.path()).await;
    let ec = TestKey::es256();
    let rsa = TestKey::rsa_pkcs8_pem(include_str!(
        "../../control-plane/src/k8s_token/test-rsa.pem"
    ))
    .unwrap();
    issuer.publish(jwks(&[(&ec, "ec-2026-11"), (&rsa, "rsa-2026-11")]));
    let ca = issuer.ca_file.to_str().unwrap();
    let cp = ControlProc::spawn_with(
        crate::common::PYLON_CONTROL,
        &dir.path().join("cp-data"),
        "127.0.0.1:0".parse().unwrap(),
        &[
            "--kubernetes-issuer",
            &issuer.url,
            "--kubernetes-issuer-ca",
            ca,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let logs = cp.logs();
    let metrics: SocketAddr = logs
        .split("serving metrics on http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address logged:\n{logs}"));
    assert!(issuer.fetches.load(std::sync::atomic::Ordering::Relaxed) >= 1);

    // Two sidecars with nothing but a projected token each: the server's
    // signed RS256, the client's ES256 (trust domain pylon.test).
    let app = start_named_echo("app").await;
    let exp = now() + 3600;
    let mut sidecars = Vec::new();
    for (name, sa, token, app) in [
        (
            "server",
            "echo",
            rsa.token("rsa-2026-11", &issuer.url, "default", "echo", exp),
            app.addr,
        ),
        (
            "client",
            "client",
            ec.token("ec-2026-11", &issuer.url, "default", "client", exp),
            "127.0.0.1:9".parse().unwrap(),
        ),
    ] {
        let token_file = dir.path().join(format!("{name}.token"));
        crate::common::write_secret(&token_file, &token);
        let cfg = dir.path().join(format!("{name}.yaml"));
        let state = dir.path().join(format!("{name}-state"));
        std::fs::write(&cfg, cp_config(&cp, &token_file, &state, app)).unwrap();
        let sidecar = SidecarProc::spawn(crate::common::PYLON, &cfg);
        sidecars.push((sa, sidecar));
    }
    let (server, client) = (&sidecars[0].1, &sidecars[1].1);
    cp.apply(&mesh_policy(server.inbound));
    // Ready alone could mean an earlier (empty) policy: wait for this one.
    let version = cp.status().0;
    cp.wait_acked(
        &[
            "spiffe://pylon.test/ns/default/sa/echo",
            "spiffe://pylon.test/ns/default/sa/client",
        ],
        version,
    )
    .await;
    server.wait_ready().await;
    client.wait_ready().await;
    for (sa, sidecar) in &sidecars {
        let config = sidecar.config().await;
        assert_eq!(
            config["identity"],
            format!("spiffe://pylon.test/ns/default/sa/{sa}")
        );
    }
    let mut echo = echo_client(client.outbound, "echo.test").await;
    let reply = echo
        .unary(pylon_proto::v1::EchoRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        reply
            .metadata
            .iter()
            .any(|m| m == "x-pylon-peer-identity: spiffe://pylon.test/ns/default/sa/client"),
        "{:?}",
        reply.metadata
    );

    // Every bad token: UNAUTHENTICATED, counted, nothing issued.
    let foreign = TestKey::es256();
    let good_claims =
        pylon_control::k8s_token::dev::claims_for(&issuer.url, "default", "client", exp);
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = good_claims.clone();
        f(&mut c);
        ec.sign(&json!({"alg": "ES256", "kid": "ec-2026-11"}), &c)
    };
    let unsigned = {
        use base64::Engine;
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        format!(
            "{}.{}.",
            b64(json!({"alg": "none"})),
            b64(good_claims.clone())
        )
    };
    let bad = [
        (
            "expired",
            ec.token("ec-2026-11", &issuer.url, "default", "client", now() - 600),
        ),
        (
            "audience",
            with(&|c| c["aud"] = json!(["https://kubernetes.default.svc"])),
        ),
        ("algorithm", unsigned),
        (
            "signature",
            foreign.sign(&json!({"alg": "ES256", "kid": "ec-2026-11"}), &good_claims),
        ),
        (
            "malformed",
            "eyJhbGciOiJFUzI1NiJ9.bm90IGpzb24.AAAA".to_string(),
        ),
    ];
    let issued_before = certificates_issued(&cp);
    let mut ids = identity_client(&cp);
    for (reason, token) in &bad {
        let before = refused(metrics, reason).await;
        let err = ids
            .who_am_i(with_token(WhoAmIRequest {}, token))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::Unauthenticated,
            "{reason}: {err:?}"
        );
        let key = KeyPair::generate().unwrap();
        let err = ids
            .issue_certificate(with_token(
                IssueCertificateRequest {
                    csr_der: crate::identity::csr(
                        &["spiffe://pylon.test/ns/default/sa/client"],
                        &key,
                    ),
                },
                token,
            ))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::Unauthenticated,
            "{reason}: {err:?}"
        );
        assert_eq!(refused(metrics, reason).await, before + 2, "{reason}");
    }
    assert_eq!(
        certificates_issued(&cp),
        issued_before,
        "a bad token got a certificate"
    );

    // The cluster rotates its signing key: a token with the new key id is
    // accepted once the issuer publishes it.
    let next = TestKey::es256();
    let rotated = next.token("ec-2026-12", &issuer.url, "default", "client", exp);
    issuer.publish(jwks(&[(&ec, "ec-2026-11"), (&next, "ec-2026-12")]));
    let who = eventually("the rotated key is accepted", async || {
        identity_client(&cp)
            .who_am_i(with_token(WhoAmIRequest {}, &rotated))
            .await
            .ok()
    })
    .await
    .into_inner();
    assert_eq!(who.identity, "spiffe://pylon.test/ns/default/sa/client");
}
