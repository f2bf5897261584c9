//! The JSON Patch (RFC 6902) that turns one JSON value into another, for
//! the admission webhook's answer.
//!
//! A plain object diff: objects are compared key by key, anything else
//! (arrays included) is replaced whole when it differs. Not minimal, but
//! exact, and simple enough to trust.

use serde_json::{Map, Value, json};

/// The operations that turn `from` into `to`; none when they are equal.
pub fn diff(from: &Value, to: &Value) -> Vec<Value> {
    let mut ops = Vec::new();
    diff_at("", from, to, &mut ops);
    ops
}

fn diff_at(path: &str, from: &Value, to: &Value, ops: &mut Vec<Value>) {
    match (from, to) {
        (Value::Object(from), Value::Object(to)) => diff_objects(path, from, to, ops),
        _ if from == to => {}
        _ => ops.push(json!({ "op": "replace", "path": path, "value": to })),
    }
}

fn diff_objects(
    path: &str,
    from: &Map<String, Value>,
    to: &Map<String, Value>,
    ops: &mut Vec<Value>,
) {
    for key in from.keys().filter(|k| !to.contains_key(*k)) {
        ops.push(json!({ "op": "remove", "path": child(path, key) }));
    }
    for (key, value) in to {
        match from.get(key) {
            Some(old) => diff_at(&child(path, key), old, value, ops),
            None => ops.push(json!({ "op": "add", "path": child(path, key), "value": value })),
        }
    }
}

/// `path` + `/` + `key` escaped as RFC 6901 says (`~` → `~0`, `/` → `~1`).
fn child(path: &str, key: &str) -> String {
    format!("{path}/{}", key.replace('~', "~0").replace('/', "~1"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A JSON Patch applier for what `diff` emits (add, remove, replace),
    /// written from RFC 6902 to check the diff against.
    fn apply(doc: &Value, ops: &[Value]) -> Value {
        let mut doc = doc.clone();
        for op in ops {
            let path = op["path"].as_str().unwrap();
            if path.is_empty() {
                doc = op["value"].clone();
                continue;
            }
            let (parent, last) = path.rsplit_once('/').unwrap();
            let key = last.replace("~1", "/").replace("~0", "~");
            let target = doc.pointer_mut(parent).unwrap().as_object_mut().unwrap();
            match op["op"].as_str().unwrap() {
                "add" => {
                    target.insert(key, op["value"].clone());
                }
                "replace" => {
                    assert!(target.contains_key(&key), "replace of a missing {path}");
                    target.insert(key, op["value"].clone());
                }
                "remove" => {
                    target.remove(&key).unwrap();
                }
                other => panic!("unexpected op {other}"),
            }
        }
        doc
    }

    #[test]
    fn the_patch_turns_the_original_into_the_result() {
        let from = json!({
            "metadata": { "annotations": { "a/b": "1", "c~d": "x", "gone": "y" }, "name": "p" },
            "spec": { "containers": [{ "name": "app" }], "hostname": "h" },
        });
        let to = json!({
            "metadata": { "annotations": { "a/b": "2", "c~d": "x", "new/one~": "z" }, "name": "p" },
            "spec": { "containers": [{ "name": "app" }, { "name": "more" }], "initContainers": [] },
        });
        let ops = diff(&from, &to);
        assert_eq!(apply(&from, &ops), to);
        assert!(ops.contains(
            &json!({ "op": "replace", "path": "/metadata/annotations/a~1b", "value": "2" })
        ));
        assert!(ops.contains(
            &json!({ "op": "add", "path": "/metadata/annotations/new~1one~0", "value": "z" })
        ));
        assert!(ops.contains(&json!({ "op": "remove", "path": "/spec/hostname" })));
    }

    #[test]
    fn equal_values_need_no_operations_and_a_new_type_replaces_the_root() {
        let v = json!({ "a": [1, 2, { "b": null }] });
        assert!(diff(&v, &v).is_empty());
        let ops = diff(&v, &json!([1]));
        assert_eq!(ops, [json!({ "op": "replace", "path": "", "value": [1] })]);
    }

    #[test]
    fn the_patch_of_an_injection_reproduces_it() {
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "generateName": "web-5d8f-", "annotations": { "pylon.dev/drain-timeout": "10s" } },
            "spec": { "containers": [{ "name": "web", "image": "web:1",
                "livenessProbe": { "tcpSocket": { "port": 8080 }, "periodSeconds": 3 } }] },
        });
        let injected = crate::inject::inject_pod(&pod, &Default::default()).unwrap();
        assert_eq!(apply(&pod, &diff(&pod, &injected)), injected);
    }
}
