//! Sidecar injection end to end: `pylon inject` on the example workloads
//! (the results validated against the Kubernetes API schemas by
//! `kubernetes-validate`), and the admission webhook of `pylon-control
//! serve` over real HTTPS, driven as the API server would by
//! `tests/python/admission.py`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use pylon_control::inject::yaml::read_documents;
use serde_json::{Value, json};

use crate::common::TempDir;
use crate::common::control::ControlProc;
use crate::common::k8s::validator_or_skip;

use crate::common::PYLON;
const EXAMPLES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/kubernetes/examples/workloads"
);
const ADMISSION_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/admission.py");

fn examples() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(EXAMPLES)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 9, "examples missing from {EXAMPLES}");
    files
}

/// `pylon inject -f -` with `stdin`.
fn pylon_inject(stdin: &[u8]) -> Output {
    let mut child = Command::new(PYLON)
        .args(["inject", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn injected(stdin: &[u8]) -> String {
    let out = pylon_inject(stdin);
    assert!(
        out.status.success(),
        "pylon inject failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn injected_examples_are_valid_kubernetes_and_injecting_again_changes_nothing() {
    let Some(validator) = validator_or_skip("injected examples validate") else {
        return;
    };
    for example in examples() {
        let name = example.file_name().unwrap().to_string_lossy().to_string();
        let original = std::fs::read_to_string(&example).unwrap();
        validator.validate(&original, &name);
        let meshed = injected(original.as_bytes());
        validator.validate(&meshed, &format!("{name}, injected"));
        assert_eq!(
            injected(meshed.as_bytes()),
            meshed,
            "{name}: injecting the output again changed it"
        );
        if name == "opted-out-pod.yaml" {
            assert_eq!(
                read_documents(&meshed).unwrap(),
                read_documents(&original).unwrap()
            );
        } else {
            assert!(
                meshed.contains("name: pylon-init\n"),
                "{name} was not injected:\n{meshed}"
            );
        }
    }
}

#[test]
fn a_document_that_cannot_be_injected_fails_the_whole_stream_with_every_problem() {
    let pod = std::fs::read_to_string(Path::new(EXAMPLES).join("pod.yaml")).unwrap();
    let bad = "apiVersion: apps/v1
kind: Deployment
metadata: { name: broken }
spec:
  selector: { matchLabels: { app: broken } }
  template:
    metadata:
      labels: { app: broken }
      annotations: { pylon.dev/skip-inbound-ports: abc, pylon.dev/drain-timeout: \"30\" }
    spec:
      containers:
        - name: app
          image: app:1
          readinessProbe: { httpGet: { path: /, port: metrics } }
";
    let out = pylon_inject(format!("{pod}---\n{bad}").as_bytes());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stdout.is_empty(),
        "partial output: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "document 2 (Deployment broken)",
        "spec.template.metadata.annotations[\"pylon.dev/skip-inbound-ports\"]: \"abc\" is not a port",
        "spec.template.metadata.annotations[\"pylon.dev/drain-timeout\"]: \"30\" is not a duration",
        "spec.template.spec.containers[0].readinessProbe.httpGet.port: named port \"metrics\" is not among the container's ports",
    ] {
        assert!(stderr.contains(expected), "{expected:?} not in:\n{stderr}");
    }
}

/// A Pod CREATE as a Deployment's ReplicaSet sends it: a generated name,
/// the namespace only in the request.
fn admission_review(uid: &str, pod: &Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "requestKind": { "group": "", "version": "v1", "kind": "Pod" },
            "requestResource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "groups": ["system:serviceaccounts", "system:authenticated"],
            },
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": { "apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions" },
        },
    })
}

/// The pod template of the storefront Deployment example, as the pod its
/// ReplicaSet creates.
fn replicaset_pod() -> Value {
    let yaml = std::fs::read_to_string(Path::new(EXAMPLES).join("deployment.yaml")).unwrap();
    let deployment = read_documents(&yaml).unwrap().remove(0);
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": deployment["spec"]["template"]["metadata"].clone(),
        "spec": deployment["spec"]["template"]["spec"].clone(),
    });
    let metadata = pod["metadata"].as_object_mut().unwrap();
    metadata.insert("generateName".into(), json!("storefront-7c9f8d6b5-"));
    metadata.insert(
        "ownerReferences".into(),
        json!([{ "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "storefront-7c9f8d6b5",
                 "uid": "0b3c1b7e-5a43-4f0e-9f6a-3d2f1e0c9b8a", "controller": true, "blockOwnerDeletion": true }]),
    );
    pod
}

fn python_with_jsonpatch() -> bool {
    Command::new("python3")
        .args(["-c", "import jsonpatch"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn the_webhook_patches_pods_over_https_exactly_as_pylon_inject_does() {
    if !python_with_jsonpatch() {
        eprintln!("SKIPPED: the webhook test needs python3 with jsonpatch (pip install jsonpatch)");
        return;
    }
    let dir = TempDir::new("webhook");
    let cp = ControlProc::spawn_with(
        crate::common::PYLON_CONTROL,
        &dir.path().join("control"),
        "127.0.0.1:0".parse().unwrap(),
        &["--webhook-listen", "127.0.0.1:0"],
    );
    let webhook = cp.webhook_address();

    let pod = replicaset_pod();
    let mut opted_out = pod.clone();
    opted_out["metadata"]["labels"]["pylon.dev/inject"] = json!("disabled");
    let mut refused = pod.clone();
    refused["metadata"]["annotations"]["pylon.dev/proxy-memory"] = json!("lots");
    let reviews = [
        (
            "create.json",
            admission_review("uid-create", &pod).to_string(),
        ),
        (
            "opted-out.json",
            admission_review("uid-opted-out", &opted_out).to_string(),
        ),
        (
            "malformed.json",
            r#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionRev"#.to_string(),
        ),
        (
            "refused.json",
            admission_review("uid-refused", &refused).to_string(),
        ),
    ];
    let mut args = vec![webhook.clone(), cp.ca_file().to_string_lossy().to_string()];
    for (name, body) in &reviews {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        args.push(path.to_string_lossy().to_string());
    }
    let out = Command::new("python3")
        .arg(ADMISSION_PY)
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "admission.py failed: {}\ncontrol plane:\n{}",
        String::from_utf8_lossy(&out.stderr),
        cp.logs()
    );
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let [health, create, opted_out, malformed, refused] = &lines[..] else {
        panic!("unexpected output: {lines:?}");
    };

    assert_eq!(health["status"], 200);
    assert_eq!(health["body"], "ok");
    assert_eq!(health["alpn"], "http/1.1");

    // The created pod: patched into what `pylon inject` makes of it, and
    // valid; the namespace stays the API server's to fill in.
    assert_eq!(create["status"], 200);
    let response = &create["review"]["response"];
    assert_eq!(create["review"]["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(create["review"]["kind"], "AdmissionReview");
    assert_eq!(response["uid"], "uid-create");
    assert_eq!(response["allowed"], true);
    let patched = &create["patched"];
    let by_cli = read_documents(&injected(pod.to_string().as_bytes()))
        .unwrap()
        .remove(0);
    assert_eq!(patched, &by_cli);
    assert!(patched["metadata"].get("namespace").is_none());
    if let Some(validator) = validator_or_skip("the patched pod validates") {
        validator.validate(&patched.to_string(), "the webhook's patched pod");
    }

    assert_eq!(opted_out["status"], 200);
    assert_eq!(
        opted_out["review"]["response"],
        json!({ "uid": "uid-opted-out", "allowed": true })
    );
    assert!(opted_out["patched"].is_null());

    assert_eq!(malformed["status"], 200);
    let response = &malformed["review"]["response"];
    assert_eq!(response["allowed"], true);
    assert!(response.get("patch").is_none());
    let message = response["status"]["message"].as_str().unwrap();
    assert!(message.contains("not JSON"), "{message}");
    assert!(response["warnings"][0].as_str().unwrap().contains(message));

    assert_eq!(refused["status"], 200);
    let response = &refused["review"]["response"];
    assert_eq!(response["uid"], "uid-refused");
    assert_eq!(response["allowed"], false);
    assert_eq!(response["status"]["code"], 400);
    assert_eq!(response["status"]["reason"], "BadRequest");
    assert_eq!(
        response["status"]["message"],
        "pylon cannot inject pod shop/storefront-7c9f8d6b5-*: \
         metadata.annotations[\"pylon.dev/proxy-memory\"]: \"lots\" is not a Kubernetes quantity (e.g. 100m, 0.5, 64Mi, 1Gi)"
    );
}
