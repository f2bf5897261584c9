//! Which objects carry a pod, and where: a Pod is one, a workload has a
//! pod template, a `List` has items. Everything else passes through.

use serde_json::Value;

use super::path::FieldPath;
use super::{InjectError, InjectOptions, Problem, pod};

/// `object` meshed: its pod, its pod template, or each item of a `List`.
/// Objects of other kinds come back unchanged.
pub fn inject(object: &Value, options: &InjectOptions) -> Result<Value, InjectError> {
    let mut out = object.clone();
    inject_object(&mut out, &FieldPath::root(), options)
        .map_err(|problems| InjectError { problems })?;
    Ok(out)
}

/// `pod` meshed, whatever its `kind` says (an admission request's object
/// is a pod by its resource).
pub fn inject_pod(pod: &Value, options: &InjectOptions) -> Result<Value, InjectError> {
    let mut out = pod.clone();
    pod::inject(&mut out, &FieldPath::root(), options)
        .map_err(|problems| InjectError { problems })?;
    Ok(out)
}

/// Where a kind keeps its pod: `[]` is the object itself.
fn pod_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Pod" => Some(&[]),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            Some(&["spec", "template"])
        }
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

fn inject_object(
    object: &mut Value,
    at: &FieldPath,
    options: &InjectOptions,
) -> Result<(), Vec<Problem>> {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if kind == "List" {
        return inject_items(object, at, options);
    }
    let Some(path) = pod_path(kind) else {
        return Ok(());
    };
    let kind = kind.to_string();
    let mut pod = object;
    let mut pod_at = at.clone();
    for field in path {
        pod_at = pod_at.field(field);
        pod = match pod.get_mut(*field) {
            Some(next) if next.is_object() => next,
            _ => {
                return Err(vec![Problem::at(
                    &pod_at,
                    format!("missing: a {kind} has a pod template here"),
                )]);
            }
        };
    }
    pod::inject(pod, &pod_at, options)
}

fn inject_items(
    list: &mut Value,
    at: &FieldPath,
    options: &InjectOptions,
) -> Result<(), Vec<Problem>> {
    let Some(Value::Array(items)) = list.get_mut("items") else {
        return Ok(());
    };
    let mut problems = Vec::new();
    for (i, item) in items.iter_mut().enumerate() {
        if let Err(p) = inject_object(item, &at.field("items").index(i), options) {
            problems.extend(p);
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn options() -> InjectOptions {
        InjectOptions {
            image: "registry.example/pylon:test".into(),
            control_plane: "https://cp.example:15010".into(),
        }
    }

    fn pod_spec() -> Value {
        json!({
            "metadata": { "labels": { "app": "web" } },
            "spec": {
                "initContainers": [{ "name": "migrate", "image": "web:1" }],
                "containers": [{
                    "name": "web",
                    "image": "web:1",
                    "ports": [{ "name": "http", "containerPort": 8080 }],
                    "readinessProbe": { "httpGet": { "path": "/healthz", "port": "http" } },
                }],
                "volumes": [{ "name": "data", "emptyDir": {} }],
            },
        })
    }

    fn workload(kind: &str) -> Value {
        let template = pod_spec();
        let spec = match kind {
            "Pod" => {
                return json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "web" }, "spec": template["spec"] });
            }
            "CronJob" => {
                json!({ "schedule": "* * * * *", "jobTemplate": { "spec": { "template": template } } })
            }
            _ => json!({ "template": template }),
        };
        json!({ "apiVersion": "apps/v1", "kind": kind, "metadata": { "name": "web" }, "spec": spec })
    }

    fn pod_of<'a>(object: &'a Value, kind: &str) -> &'a Value {
        pod_path(kind)
            .unwrap()
            .iter()
            .fold(object, |v, field| &v[*field])
    }

    /// What the contract says injection adds, checked in full once.
    #[test]
    fn a_pod_gets_the_init_containers_volumes_and_rewritten_probes() {
        let out = inject(&workload("Pod"), &options()).unwrap();
        let spec = &out["spec"];
        let init: Vec<&str> = spec["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(init, ["pylon-init", "pylon", "migrate"]);
        assert_eq!(
            spec["initContainers"][0],
            json!({
                "name": "pylon-init",
                "image": "registry.example/pylon:test",
                "args": ["init-iptables"],
                "env": [{ "name": "XTABLES_LOCKFILE", "value": "/tmp/xtables.lock" }],
                "securityContext": {
                    "runAsUser": 0, "runAsNonRoot": false,
                    "capabilities": { "add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"] },
                    "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                },
                "volumeMounts": [{ "name": "pylon-init-tmp", "mountPath": "/tmp" }],
            })
        );
        let sidecar = &spec["initContainers"][1];
        assert_eq!(sidecar["restartPolicy"], "Always");
        assert_eq!(sidecar["args"], json!(["proxy"]));
        let env: Vec<(&str, &Value)> = sidecar["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap(),
                    e.get("value").unwrap_or(&e["valueFrom"]),
                )
            })
            .collect();
        let field = |f: &str| json!({ "fieldRef": { "apiVersion": "v1", "fieldPath": f } });
        assert_eq!(
            env,
            [
                ("PYLON_ADMIN_LISTEN", &json!("127.0.0.1:15000")),
                ("PYLON_ADMIN_PROBE_LISTEN", &json!("0.0.0.0:15020")),
                ("PYLON_OUTBOUND_LISTEN", &json!("127.0.0.1:15001")),
                ("PYLON_INBOUND_LISTEN", &json!("0.0.0.0:15006")),
                ("PYLON_IDENTITY_CONTROL_PLANE", &json!("true")),
                ("PYLON_POLICY_CONTROL_PLANE", &json!("true")),
                (
                    "PYLON_CONTROL_PLANE_ADDRESS",
                    &json!("https://cp.example:15010")
                ),
                (
                    "PYLON_CONTROL_PLANE_CA_FILE",
                    &json!("/var/run/pylon/ca/ca.pem")
                ),
                (
                    "PYLON_CONTROL_PLANE_TOKEN_FILE",
                    &json!("/var/run/secrets/pylon/token")
                ),
                (
                    "PYLON_CONTROL_PLANE_ALLOW_READABLE_TOKEN_FILE",
                    &json!("true")
                ),
                ("PYLON_STATE_DIR", &json!("/var/lib/pylon")),
                ("PYLON_DRAIN_TIMEOUT", &json!("30s")),
                ("PYLON_WORKERS", &json!("1")),
                ("PYLON_KUBERNETES_POD_NAME", &field("metadata.name")),
                ("PYLON_KUBERNETES_NAMESPACE", &field("metadata.namespace")),
                (
                    "PYLON_KUBERNETES_SERVICE_ACCOUNT",
                    &field("spec.serviceAccountName")
                ),
                ("PYLON_KUBERNETES_POD_IP", &field("status.podIP")),
                (
                    "PYLON_APP_PROBES",
                    &json!(r#"{"web":{"readiness":{"httpGet":{"path":"/healthz","port":8080}}}}"#)
                ),
            ]
        );
        assert_eq!(
            sidecar["securityContext"],
            json!({
                "runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": true,
                "readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
                "capabilities": { "drop": ["ALL"] },
            })
        );
        assert_eq!(
            sidecar["volumeMounts"],
            json!([
                { "name": "pylon-token", "mountPath": "/var/run/secrets/pylon", "readOnly": true },
                { "name": "pylon-ca", "mountPath": "/var/run/pylon/ca", "readOnly": true },
                { "name": "pylon-state", "mountPath": "/var/lib/pylon" },
            ])
        );
        assert_eq!(
            sidecar["ports"],
            json!([{ "containerPort": 15020, "name": "pylon-health", "protocol": "TCP" }])
        );
        assert_eq!(
            sidecar["readinessProbe"],
            json!({ "httpGet": { "path": "/ready", "port": 15020 } })
        );
        assert_eq!(
            sidecar["livenessProbe"],
            json!({ "httpGet": { "path": "/live", "port": 15020 } })
        );
        assert_eq!(
            sidecar["startupProbe"]["httpGet"],
            json!({ "path": "/ready", "port": 15020 })
        );
        assert_eq!(
            sidecar["resources"],
            json!({ "requests": { "cpu": "100m", "memory": "64Mi" }, "limits": { "memory": "256Mi" } })
        );
        assert_eq!(
            spec["volumes"],
            json!([
                { "name": "data", "emptyDir": {} },
                { "name": "pylon-token", "projected": { "sources": [{ "serviceAccountToken": {
                    "audience": "pylon", "expirationSeconds": 3600, "path": "token" } }] } },
                { "name": "pylon-ca", "configMap": { "name": "pylon-ca" } },
                { "name": "pylon-state", "emptyDir": {} },
                { "name": "pylon-init-tmp", "emptyDir": {} },
            ])
        );
        assert_eq!(
            spec["containers"][0]["readinessProbe"],
            json!({ "httpGet": { "path": "/app-health/web/readiness", "port": 15020 } })
        );
    }

    #[test]
    fn every_kind_with_a_pod_template_is_injected_there() {
        let injected_pod = inject(&workload("Pod"), &options()).unwrap();
        for kind in [
            "Deployment",
            "StatefulSet",
            "DaemonSet",
            "ReplicaSet",
            "Job",
            "CronJob",
        ] {
            let object = workload(kind);
            let out = inject(&object, &options()).unwrap();
            assert_eq!(pod_of(&out, kind)["spec"], injected_pod["spec"], "{kind}");
            assert_eq!(out["metadata"], object["metadata"], "{kind}");
        }
    }

    #[test]
    fn a_list_has_each_item_injected() {
        let list = json!({
            "apiVersion": "v1",
            "kind": "List",
            "items": [workload("Deployment"), { "apiVersion": "v1", "kind": "Service", "metadata": { "name": "web" } }],
        });
        let out = inject(&list, &options()).unwrap();
        assert_eq!(
            out["items"][0],
            inject(&workload("Deployment"), &options()).unwrap()
        );
        assert_eq!(out["items"][1], list["items"][1]);
    }

    #[test]
    fn other_kinds_opted_out_and_injected_pods_come_back_unchanged() {
        let service = json!({ "apiVersion": "v1", "kind": "Service", "metadata": { "name": "web" }, "spec": {} });
        let mut opted_out = workload("Deployment");
        opted_out["spec"]["template"]["metadata"]["annotations"] =
            json!({ "pylon.dev/inject": "disabled" });
        let mut host_network = workload("DaemonSet");
        host_network["spec"]["template"]["spec"]["hostNetwork"] = json!(true);
        let injected = inject(&workload("Pod"), &options()).unwrap();
        for object in [service, opted_out, host_network, injected] {
            assert_eq!(inject(&object, &options()).unwrap(), object);
        }
    }

    #[test]
    fn injecting_twice_changes_nothing() {
        for kind in ["Pod", "Deployment", "CronJob"] {
            let once = inject(&workload(kind), &options()).unwrap();
            let twice = inject(&once, &options()).unwrap();
            assert_eq!(
                serde_json::to_string(&once).unwrap(),
                serde_json::to_string(&twice).unwrap()
            );
        }
    }

    #[test]
    fn every_problem_of_a_workload_is_reported_with_its_path() {
        let mut deployment = workload("Deployment");
        let template = &mut deployment["spec"]["template"];
        template["metadata"]["annotations"] = json!({ "pylon.dev/skip-inbound-ports": "abc" });
        template["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = json!("metrics");
        template["spec"]["volumes"][0]["name"] = json!("pylon-state");
        let list = json!({ "kind": "List", "items": [deployment] });
        let err = inject(&list, &options()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "items[0].spec.template.metadata.annotations[\"pylon.dev/skip-inbound-ports\"]: \"abc\" is not a port (1-65535)\n\
             items[0].spec.template.spec.containers[0].readinessProbe.httpGet.port: named port \"metrics\" is not among the container's ports\n\
             items[0].spec.template.spec.volumes[0].name: \"pylon-state\" is the name of the injected volume: rename it"
        );
    }

    #[test]
    fn a_workload_without_a_pod_template_is_an_error() {
        let err = inject(&json!({ "kind": "CronJob", "spec": {} }), &options()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec.jobTemplate: missing: a CronJob has a pod template here"
        );
    }
}
