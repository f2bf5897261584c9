//! Installing the mesh: `pylon-control install` and `deploy/kubernetes`
//! validated against the Kubernetes API schemas, the install output stable
//! but for its key material, the kustomize base the same objects as the
//! install, the webhook's `caBundle` verifying the control plane's serving
//! certificate by the Service's DNS name, and what a test can check of the
//! `Dockerfile` (no container engine runs here).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use pylon_control::inject::yaml::read_documents;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};

use crate::common::PYLON_CONTROL as CONTROL_BIN;
use crate::common::TempDir;
use crate::common::control::ControlProc;
use crate::common::k8s::{kustomize_or_skip, validator_or_skip};

use crate::common::PYLON;
const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// The Service's name as the API server dials the webhook.
const SERVICE_DNS: &str = "pylon-control.pylon-system.svc";

/// `pylon-control ARGS`; panics unless it succeeds.
fn control(args: &[&str]) -> String {
    let out = Command::new(CONTROL_BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "pylon-control {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn install(args: &[&str]) -> String {
    let mut all = vec!["install"];
    all.extend(args);
    control(&all)
}

/// A new root CA in `dir/ca.crt` and `dir/ca.key`.
fn new_root(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    control(&[
        "ca",
        "new-root",
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    (cert, key)
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// Base64 as the API server reads it: line breaks (kustomize folds long
/// values) are ignored.
fn unbase64(value: &Value) -> Vec<u8> {
    let text: String = value
        .as_str()
        .unwrap()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    BASE64.decode(text).unwrap()
}

/// The output with every PEM block and every base64-encoded PEM (what
/// changes with the key material) replaced by a marker.
fn masked(yaml: &str) -> String {
    let mut out = Vec::new();
    let mut in_pem = false;
    for line in yaml.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("-----BEGIN ") {
            in_pem = true;
        }
        if in_pem {
            if trimmed.starts_with("-----END ") {
                in_pem = false;
                out.push("    <PEM>".to_string());
            }
            continue;
        }
        // "LS0tLS1CRUdJTi" is "-----BEGIN" in base64.
        out.push(match line.find("LS0tLS1CRUdJTi") {
            Some(at) => format!("{}<BASE64 PEM>", &line[..at]),
            None => line.to_string(),
        });
    }
    out.join("\n")
}

#[test]
fn install_output_is_valid_kubernetes() {
    let Some(validator) = validator_or_skip("the install output validates") else {
        return;
    };
    for args in [
        &[][..],
        &[
            "--namespace",
            "mesh",
            "--trust-domain",
            "example.org",
            "--image",
            "registry.example/pylon:1",
            "--meshed-namespace",
            "shop",
            "--meshed-namespace",
            "greeter",
        ][..],
    ] {
        validator.validate(&install(args), &format!("pylon-control install {args:?}"));
    }
}

#[test]
fn install_output_is_the_same_every_time_but_for_key_material() {
    let args = ["--meshed-namespace", "greeter"];
    let (first, second) = (install(&args), install(&args));
    assert_ne!(first, second, "each run makes a new CA");
    assert_eq!(masked(&first), masked(&second));
    // Masked are exactly the CA: the Secret, the two trust bundles, the two
    // caBundles.
    assert_eq!(masked(&first).matches("<PEM>").count(), 2);
    assert_eq!(masked(&first).matches("<BASE64 PEM>").count(), 4);

    // With the CA given, nothing changes at all.
    let dir = TempDir::new("install-ca");
    let (cert, key) = new_root(dir.path());
    let with_ca = [
        "--ca-cert",
        cert.to_str().unwrap(),
        "--ca-key",
        key.to_str().unwrap(),
    ];
    let given = install(&with_ca);
    assert_eq!(given, install(&with_ca));
    let objects = read_documents(&given).unwrap();
    let secret = find(&objects, "Secret", "pylon-ca-key");
    let cert_pem = std::fs::read_to_string(&cert).unwrap();
    assert_eq!(unbase64(&secret["data"]["tls.crt"]), cert_pem.as_bytes());
    assert_eq!(
        unbase64(&secret["data"]["tls.key"]),
        std::fs::read(&key).unwrap()
    );
    assert_eq!(
        find(&objects, "ConfigMap", "pylon-ca")["data"]["ca.pem"],
        cert_pem
    );
}

#[test]
fn install_refuses_a_key_that_is_not_the_certificates() {
    let dir = TempDir::new("install-bad-ca");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for d in [&a, &b] {
        std::fs::create_dir_all(d).unwrap();
    }
    let (cert, _) = new_root(&a);
    let (_, other_key) = new_root(&b);
    let out = Command::new(CONTROL_BIN)
        .args(["install", "--ca-cert"])
        .arg(&cert)
        .arg("--ca-key")
        .arg(&other_key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the mesh CA: the key does not belong to the certificate"),
        "{stderr}"
    );
}

#[test]
fn ca_new_root_writes_a_private_key_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("new-root");
    let (cert, key) = new_root(dir.path());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key), 0o600);
    assert!(
        std::fs::read_to_string(&cert)
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    let before = std::fs::read(&key).unwrap();
    let out = Command::new(CONTROL_BIN)
        .args(["ca", "new-root", "--cert"])
        .arg(dir.path().join("other.crt"))
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists: not overwritten"));
    assert_eq!(std::fs::read(&key).unwrap(), before);
    assert!(!dir.path().join("other.crt").exists());
}

/// A copy of `deploy/` (links copied as files) with a new CA in the base,
/// as an operator prepares it.
fn deploy_with_ca(dir: &Path) -> PathBuf {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let path = entry.unwrap().path();
            let target = to.join(path.file_name().unwrap());
            if path.is_dir() {
                copy(&path, &target);
            } else {
                std::fs::copy(&path, &target).unwrap();
            }
        }
    }
    let deploy = dir.join("deploy");
    copy(&Path::new(REPO).join("deploy"), &deploy);
    let base = deploy.join("kubernetes/base");
    for f in ["ca.crt", "ca.key"] {
        let _ = std::fs::remove_file(base.join(f));
    }
    new_root(&base);
    deploy
}

/// Objects by kind, namespace and name, with base64 values unfolded.
fn by_identity(yaml: &str) -> std::collections::BTreeMap<String, Value> {
    read_documents(yaml)
        .unwrap()
        .into_iter()
        .map(|mut o| {
            if o["kind"] == "Secret" {
                for v in o["data"].as_object_mut().unwrap().values_mut() {
                    *v = json!(BASE64.encode(unbase64(v)));
                }
            }
            if let Some(webhooks) = o["webhooks"].as_array_mut() {
                for w in webhooks {
                    let bundle = &mut w["clientConfig"]["caBundle"];
                    *bundle = json!(BASE64.encode(unbase64(bundle)));
                }
            }
            let id = format!(
                "{} {}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["namespace"].as_str().unwrap_or(""),
                o["metadata"]["name"].as_str().unwrap()
            );
            (id, o)
        })
        .collect()
}

#[test]
fn the_kustomize_base_is_the_install_and_its_overlays_validate() {
    let Some(kustomize) = kustomize_or_skip("deploy/kubernetes renders") else {
        return;
    };
    let validator = validator_or_skip("deploy/kubernetes validates");
    let dir = TempDir::new("kustomize");
    let deploy = deploy_with_ca(dir.path());
    let kubernetes = deploy.join("kubernetes");
    let (cert, key) = (
        kubernetes.join("base/ca.crt"),
        kubernetes.join("base/ca.key"),
    );
    let cert_pem = std::fs::read_to_string(&cert).unwrap();

    // The base is exactly what `install` prints with the same CA.
    let base = kustomize.build(&kubernetes.join("base"));
    let installed = install(&[
        "--ca-cert",
        cert.to_str().unwrap(),
        "--ca-key",
        key.to_str().unwrap(),
    ]);
    let (base_objects, install_objects) = (by_identity(&base), by_identity(&installed));
    assert_eq!(
        base_objects.keys().collect::<Vec<_>>(),
        install_objects.keys().collect::<Vec<_>>()
    );
    for (id, object) in &base_objects {
        assert_eq!(
            object, &install_objects[id],
            "{id} differs between the kustomize base and pylon-control install"
        );
    }
    // The caBundle came from the operator's file, by kustomize alone.
    let objects = read_documents(&base).unwrap();
    let webhooks = find(
        &objects,
        "MutatingWebhookConfiguration",
        "pylon-sidecar-injector",
    );
    for w in webhooks["webhooks"].as_array().unwrap() {
        assert_eq!(
            unbase64(&w["clientConfig"]["caBundle"]),
            cert_pem.as_bytes()
        );
    }

    // deploy/kubernetes as committed (the base), then with the collector.
    assert_eq!(by_identity(&kustomize.build(&kubernetes)), base_objects);
    let top = kubernetes.join("kustomization.yaml");
    let text = std::fs::read_to_string(&top).unwrap();
    let with_collector = text.replace("# components:", "components:").replace(
        "#   - components/otel-collector",
        "  - components/otel-collector",
    );
    assert_ne!(text, with_collector, "the component is no longer offered");
    std::fs::write(&top, with_collector).unwrap();
    let full = kustomize.build(&kubernetes);
    let objects = read_documents(&full).unwrap();
    let args = &find(&objects, "StatefulSet", "pylon-control")["spec"]["template"]["spec"]["containers"]
        [0]["args"];
    let args: Vec<&str> = args
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.windows(2).any(|w| w
            == [
                "--otlp-endpoint",
                "http://otel-collector.pylon-system.svc:4317"
            ]),
        "{args:?}"
    );
    let config = objects
        .iter()
        .find(|o| {
            o["kind"] == "ConfigMap"
                && o["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .starts_with("otel-collector")
        })
        .expect("the collector's ConfigMap");
    assert_eq!(
        config["data"]["config.yaml"],
        std::fs::read_to_string(Path::new(REPO).join("deploy/otel-collector.yaml")).unwrap()
    );

    // The greeter example: the mesh, a labelled namespace with the trust
    // bundle, and workloads that inject cleanly.
    let greeter = kustomize.build(&kubernetes.join("examples/greeter"));
    let objects = read_documents(&greeter).unwrap();
    let namespace = find(&objects, "Namespace", "greeter");
    assert_eq!(
        namespace["metadata"]["labels"]["pylon.dev/inject"],
        "enabled"
    );
    let bundles: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "pylon-ca")
        .collect();
    assert_eq!(bundles.len(), 2);
    for b in &bundles {
        assert_eq!(b["data"]["ca.pem"], cert_pem, "{b}");
    }
    let meshed = pylon_inject(&greeter);
    assert_eq!(meshed.matches("name: pylon-init\n").count(), 2, "{meshed}");

    if let Some(validator) = validator {
        validator.validate(&base, "the kustomize base");
        validator.validate(&full, "deploy/kubernetes with the collector");
        validator.validate(&greeter, "the greeter example");
        validator.validate(&meshed, "the greeter example, injected");
    }
}

fn pylon_inject(yaml: &str) -> String {
    let mut child = Command::new(PYLON)
        .args(["inject", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "pylon inject failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_greeter_policy_is_valid_policy() {
    let path = Path::new(REPO).join("deploy/kubernetes/examples/greeter/policy.yaml");
    let resources = pylon_proto::policy::parse_documents(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resources.len(), 3);
}

/// A TLS client that trusts only `bundle_pem`, connecting to `addr` and
/// verifying the server as `name`: the response to `GET /healthz`, or the
/// handshake's error.
fn https_healthz(
    addr: &str,
    name: &str,
    bundle_pem: &[u8],
    alpn: &[u8],
) -> Result<String, std::io::Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    assert!(!roots.is_empty());
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let server_name = ServerName::try_from(name.to_string()).unwrap();
    let connection = rustls::ClientConnection::new(Arc::new(config), server_name).unwrap();
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(crate::common::PATIENCE))?;
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    if alpn != b"http/1.1" {
        return Ok(String::new());
    }
    write!(
        tls,
        "GET /healthz HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    match tls.read_to_string(&mut response) {
        Ok(_) => {}
        // The server may close without close_notify after the response.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(e),
    }
    Ok(response)
}

#[test]
fn a_client_trusting_only_the_webhooks_ca_bundle_reaches_healthz_by_the_service_name() {
    let dir = TempDir::new("install-serve");
    let objects = read_documents(&install(&[])).unwrap();
    let secret = find(&objects, "Secret", "pylon-ca-key");
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, unbase64(&secret["data"]["tls.crt"])).unwrap();
    std::fs::write(&key, unbase64(&secret["data"]["tls.key"])).unwrap();
    let webhooks = find(
        &objects,
        "MutatingWebhookConfiguration",
        "pylon-sidecar-injector",
    );
    let ca_bundle = unbase64(&webhooks["webhooks"][0]["clientConfig"]["caBundle"]);
    assert_eq!(
        webhooks["webhooks"][0]["clientConfig"]["service"],
        json!({ "name": "pylon-control", "namespace": "pylon-system", "path": "/inject", "port": 15011 })
    );

    // `serve` as the StatefulSet runs it, on loopback ports and local files.
    let set = find(&objects, "StatefulSet", "pylon-control");
    let pod_args: Vec<&str> = set["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let dns_names: Vec<&str> = pod_args
        .windows(2)
        .filter(|w| w[0] == "--dns-name")
        .map(|w| w[1])
        .collect();
    assert_eq!(
        dns_names,
        [SERVICE_DNS, "pylon-control.pylon-system.svc.cluster.local"]
    );
    let mut args = vec![
        "--webhook-listen",
        "127.0.0.1:0",
        "--ca-cert",
        cert.to_str().unwrap(),
        "--ca-key",
        key.to_str().unwrap(),
    ];
    for name in &dns_names {
        args.extend(["--dns-name", name]);
    }
    let cp = ControlProc::spawn_with(
        crate::common::PYLON_CONTROL,
        &dir.path().join("data"),
        "127.0.0.1:0".parse().unwrap(),
        &args,
    );
    let webhook = cp.webhook_address();

    for name in &dns_names {
        let response = https_healthz(&webhook, name, &ca_bundle, b"http/1.1")
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", cp.logs()));
        assert!(response.starts_with("HTTP/1.1 200"), "{name}: {response}");
        assert!(response.ends_with("\r\n\r\nok"), "{name}: {response}");
        // The gRPC port has the same certificate: sidecars dial it by name.
        https_healthz(&cp.addr.to_string(), name, &ca_bundle, b"h2")
            .unwrap_or_else(|e| panic!("gRPC port as {name}: {e}"));
    }
    // The name is verified: another namespace's Service name is refused.
    let wrong = https_healthz(&webhook, "pylon-control.other.svc", &ca_bundle, b"http/1.1");
    let e = wrong.expect_err("a name outside the certificate was accepted");
    assert!(e.to_string().contains("not valid for name"), "{e}");
    // And so is a CA that is not the bundle's.
    let other = TempDir::new("install-other-ca");
    let (other_cert, _) = new_root(other.path());
    let e = https_healthz(
        &webhook,
        SERVICE_DNS,
        &std::fs::read(other_cert).unwrap(),
        b"http/1.1",
    )
    .expect_err("a foreign CA was trusted");
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
}

/// The `Dockerfile`'s instructions, continuation lines joined.
fn dockerfile() -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(REPO).join("Dockerfile")).unwrap();
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    lines
}

#[test]
fn the_dockerfile_builds_as_ci_does_copies_what_cargo_builds_and_runs_as_1337() {
    let lines = dockerfile();
    let stages: Vec<&String> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(
        stages.len(),
        2,
        "a build stage and a runtime stage: {stages:?}"
    );
    assert!(stages[0].starts_with("FROM rust:") && stages[0].ends_with(" AS build"));
    assert_eq!(stages[1], "FROM debian:bookworm-slim");

    // The build commands are CI's, word for word: the sidecar without the
    // default feature (no demo, no control plane linked in), then the
    // control plane.
    let build: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("RUN cargo "))
        .collect();
    assert_eq!(
        build,
        [
            "build --profile dist --locked --no-default-features --bin pylon",
            "build --profile dist --locked --bin pylon-control"
        ]
    );
    let ci = std::fs::read_to_string(Path::new(REPO).join(".ci/run")).unwrap();
    for command in build {
        let command = format!("cargo {command}");
        assert!(
            ci.lines().any(|l| l.trim() == command),
            ".ci/run does not run {command:?}"
        );
    }

    // What it copies is what that command builds: the workspace's binaries.
    // (That Cargo.lock is current, as --locked needs, CI's own run of the
    // command proves.)
    let metadata = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(REPO)
        .output()
        .unwrap();
    assert!(
        metadata.status.success(),
        "{}",
        String::from_utf8_lossy(&metadata.stderr)
    );
    let metadata: Value = serde_json::from_slice(&metadata.stdout).unwrap();
    let members = metadata["workspace_members"].as_array().unwrap();
    let mut bins: Vec<String> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| members.contains(&p["id"]))
        .flat_map(|p| p["targets"].as_array().unwrap())
        .filter(|t| t["kind"] == json!(["bin"]))
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    bins.sort();
    assert_eq!(bins, ["pylon", "pylon-control"]);
    let mut copied: Vec<(String, String)> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("COPY --from=build "))
        .map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(parts.len(), 2, "{l}");
            (parts[0].to_string(), parts[1].to_string())
        })
        .collect();
    copied.sort();
    let expected: Vec<(String, String)> = bins
        .iter()
        .map(|b| {
            (
                format!("/src/target/dist/{b}"),
                format!("/usr/local/bin/{b}"),
            )
        })
        .collect();
    assert_eq!(copied, expected);
    assert!(lines.iter().any(|l| l == "WORKDIR /src"));

    // The runtime: iptables for pylon-init, the sidecar's UID, pylon first.
    let runtime = &lines[lines.iter().position(|l| l == stages[1]).unwrap()..];
    assert!(runtime.iter().any(|l| {
        l.contains("apt-get install -y --no-install-recommends iptables ca-certificates")
    }));
    let users: Vec<&String> = runtime.iter().filter(|l| l.starts_with("USER ")).collect();
    assert_eq!(users, ["USER 1337:1337"]);
    assert_eq!(
        runtime.last().unwrap(),
        "ENTRYPOINT [\"/usr/local/bin/pylon\"]"
    );

    let ignored = std::fs::read_to_string(Path::new(REPO).join(".dockerignore")).unwrap();
    for entry in ["target", ".git", "deploy/kubernetes/base/ca.key"] {
        assert!(
            ignored.lines().any(|l| l.trim() == entry),
            ".dockerignore lacks {entry}"
        );
    }
}
