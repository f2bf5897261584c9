//! The injection webhook: an AdmissionReview body as the API server (or
//! anyone who reaches the port) sends it, answered with a JSON Patch.
//!
//! Input: a whole request body when it starts with `{`; otherwise a pod
//! (JSON) put into a Pod CREATE review, so the fuzzer spends its time in
//! injection rather than in the envelope.
//!
//! Invariants: no panic; the answer is always an `admission.k8s.io/v1`
//! AdmissionReview with `allowed` and the request's `uid`; its patch
//! applies (RFC 6902, as the API server does) to the pod and gives exactly
//! what `inject_pod` gives; injecting the result again changes nothing; the
//! answer stays proportionate to the request. Workloads (`inject`, as
//! `pylon inject` reads them) are held to the same idempotence.
#![no_main]

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use libfuzzer_sys::fuzz_target;
use pylon_control::inject::{InjectOptions, inject, inject_pod, webhook};
use serde_json::{Value, json};

/// RFC 6902 add/remove/replace (what the webhook emits).
fn apply(doc: &Value, ops: &[Value]) -> Value {
    let mut doc = doc.clone();
    for op in ops {
        let path = op["path"].as_str().expect("a patch path");
        if path.is_empty() {
            assert_ne!(op["op"], "remove", "remove of the root");
            doc = op["value"].clone();
            continue;
        }
        let (parent, last) = path.rsplit_once('/').expect("a JSON pointer");
        let key = last.replace("~1", "/").replace("~0", "~");
        let target = doc
            .pointer_mut(parent)
            .unwrap_or_else(|| panic!("no parent {parent:?} for {op}"))
            .as_object_mut()
            .unwrap_or_else(|| panic!("parent {parent:?} is not an object for {op}"));
        match op["op"].as_str().expect("an op") {
            "add" => {
                target.insert(key, op["value"].clone());
            }
            "replace" => {
                assert!(target.contains_key(&key), "replace of a missing {path}");
                target.insert(key, op["value"].clone());
            }
            "remove" => {
                assert!(target.remove(&key).is_some(), "remove of a missing {path}");
            }
            other => panic!("unexpected op {other}"),
        }
    }
    doc
}

fuzz_target!(|data: &[u8]| {
    let options = InjectOptions::default();
    let body: Vec<u8> = if data.first() == Some(&b'{') {
        data.to_vec()
    } else {
        let Ok(pod) = serde_json::from_slice::<Value>(data) else {
            return;
        };
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop",
                "operation": "CREATE",
                "object": pod,
            }
        })
        .to_string()
        .into_bytes()
    };

    let answer = webhook::review(&body, &options);
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    assert!(response["allowed"].is_boolean(), "{answer}");
    assert!(response["uid"].is_string(), "{answer}");
    let size = answer.to_string().len();
    assert!(
        size <= 8 * body.len() + (64 << 10),
        "a {size}-byte answer to {} bytes",
        body.len()
    );

    let Ok(review) = serde_json::from_slice::<Value>(&body) else {
        return;
    };
    let request = &review["request"];
    if let Some(uid) = request.get("uid").and_then(Value::as_str) {
        assert_eq!(response["uid"], uid);
    }
    let pod = &request["object"];
    if let Some(patch) = response["patch"].as_str() {
        assert_eq!(response["patchType"], "JSONPatch");
        assert_eq!(response["allowed"], true);
        let bytes = BASE64.decode(patch).expect("base64");
        let ops: Vec<Value> = serde_json::from_slice(&bytes).expect("a JSON array");
        assert!(!ops.is_empty());
        let patched = apply(pod, &ops);
        let injected = inject_pod(pod, &options).expect("the webhook injected it");
        assert_eq!(patched, injected);
        let twice = inject_pod(&injected, &options).expect("an injected pod injects");
        assert_eq!(twice, injected, "injecting twice changed the pod");
    }
    // The same object as `pylon inject` reads it (any kind, lists too).
    if let Ok(meshed) = inject(pod, &options) {
        let twice = inject(&meshed, &options).expect("a meshed object injects");
        assert_eq!(twice, meshed, "injecting twice changed the object");
    }
});
