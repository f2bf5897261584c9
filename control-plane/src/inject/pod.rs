//! One pod (or pod template): whether it gets a sidecar, and what is added
//! to it — the `pylon-init` and `pylon` init containers, in that order
//! before the pod's own, and their volumes after the pod's own.

use serde_json::{Map, Value, json};

use super::path::FieldPath;
use super::probes::{self, PROBE_PORT};
use super::settings::{self, Settings};
use super::{InjectOptions, Problem};

/// The sidecar container; a pod that has it is already injected.
pub const SIDECAR: &str = "pylon";
/// The container that sets up interception.
pub const INIT: &str = "pylon-init";

const TOKEN_VOLUME: &str = "pylon-token";
const CA_VOLUME: &str = "pylon-ca";
const STATE_VOLUME: &str = "pylon-state";
const INIT_TMP_VOLUME: &str = "pylon-init-tmp";
const VOLUMES: [&str; 4] = [TOKEN_VOLUME, CA_VOLUME, STATE_VOLUME, INIT_TMP_VOLUME];

/// The sidecar's user and group, which interception leaves alone.
const PROXY_UID: u32 = 1337;
const TOKEN_DIR: &str = "/var/run/secrets/pylon";
const CA_DIR: &str = "/var/run/pylon/ca";
const STATE_DIR: &str = "/var/lib/pylon";

/// Meshes the pod at `at` in place; a pod that opts out, is already
/// injected or runs in the host's network is left as it is (its iptables
/// rules would be the node's).
pub fn inject(
    pod: &mut Value,
    at: &FieldPath,
    options: &InjectOptions,
) -> Result<(), Vec<Problem>> {
    if !wants_sidecar(pod, at)? {
        return Ok(());
    }
    let settings = settings::read(
        pod.pointer("/metadata/annotations")
            .and_then(Value::as_object),
        &at.field("metadata").field("annotations"),
    );
    let spec_at = at.field("spec");
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
        return Err(vec![Problem::at(&spec_at, "missing: a pod needs a spec")]);
    };
    let app_probes = probes::rewrite(spec, &spec_at);
    let names = reserved_names_unused(spec, &spec_at);
    let (settings, app_probes) = match (settings, app_probes, names) {
        (Ok(settings), Ok(app_probes), Ok(())) => (settings, app_probes),
        (settings, app_probes, names) => {
            let problems = [settings.err(), app_probes.err(), names.err()];
            return Err(problems.into_iter().flatten().flatten().collect());
        }
    };
    let ours = [
        init_container(&settings, options),
        sidecar_container(&settings, app_probes, options),
    ];
    prepend(spec, "initContainers", ours);
    append(spec, "volumes", volumes());
    Ok(())
}

fn wants_sidecar(pod: &Value, at: &FieldPath) -> Result<bool, Vec<Problem>> {
    let spec = pod.get("spec");
    let injected = spec
        .and_then(|s| s.get("initContainers"))
        .and_then(Value::as_array)
        .is_some_and(|list| list.iter().any(|c| name_of(c) == Some(SIDECAR)));
    let host_network = spec.and_then(|s| s.get("hostNetwork")) == Some(&Value::Bool(true));
    if injected || host_network {
        return Ok(false);
    }
    Ok(!settings::opted_out(
        pod.get("metadata"),
        &at.field("metadata"),
    )?)
}

fn name_of(item: &Value) -> Option<&str> {
    item.get("name").and_then(Value::as_str)
}

/// Our containers' and volumes' names must not be taken already: the API
/// server refuses duplicates.
fn reserved_names_unused(spec: &Map<String, Value>, at: &FieldPath) -> Result<(), Vec<Problem>> {
    let mut problems = Vec::new();
    for (list, reserved, what) in [
        ("initContainers", &[INIT, SIDECAR][..], "container"),
        ("containers", &[INIT, SIDECAR][..], "container"),
        ("volumes", &VOLUMES[..], "volume"),
    ] {
        let Some(Value::Array(items)) = spec.get(list) else {
            continue;
        };
        for (i, item) in items.iter().enumerate() {
            if let Some(name) = name_of(item).filter(|n| reserved.contains(n)) {
                problems.push(Problem::at(
                    &at.field(list).index(i).field("name"),
                    format!("{name:?} is the name of the injected {what}: rename it"),
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

fn init_container(settings: &Settings, options: &InjectOptions) -> Value {
    let mut args = vec!["init-iptables".to_string()];
    args.extend(settings.init_flags.iter().cloned());
    json!({
        "name": INIT,
        "image": options.image,
        "args": args,
        "env": [env("XTABLES_LOCKFILE", "/tmp/xtables.lock")],
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "capabilities": { "add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"] },
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
        },
        "volumeMounts": [{ "name": INIT_TMP_VOLUME, "mountPath": "/tmp" }],
    })
}

fn sidecar_container(
    settings: &Settings,
    app_probes: Option<String>,
    options: &InjectOptions,
) -> Value {
    let probe = |path: &str| json!({ "httpGet": { "path": path, "port": PROBE_PORT } });
    let mut startup = probe("/ready");
    // Checked often and for long: the app starts once this passes, and the
    // sidecar needs the control plane before it is ready.
    startup["periodSeconds"] = json!(1);
    startup["failureThreshold"] = json!(300);
    json!({
        "name": SIDECAR,
        "image": options.image,
        "restartPolicy": "Always",
        "args": ["proxy"],
        "env": sidecar_env(settings, app_probes, options),
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": { "drop": ["ALL"] },
        },
        "volumeMounts": [
            { "name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true },
            { "name": CA_VOLUME, "mountPath": CA_DIR, "readOnly": true },
            { "name": STATE_VOLUME, "mountPath": STATE_DIR },
        ],
        "ports": [{ "containerPort": PROBE_PORT, "name": "pylon-health", "protocol": "TCP" }],
        "startupProbe": startup,
        "readinessProbe": probe("/ready"),
        "livenessProbe": probe("/live"),
        "resources": settings.resources,
    })
}

fn sidecar_env(
    settings: &Settings,
    app_probes: Option<String>,
    options: &InjectOptions,
) -> Vec<Value> {
    let mut vars = vec![
        env("PYLON_ADMIN_LISTEN", "127.0.0.1:15000"),
        env("PYLON_ADMIN_PROBE_LISTEN", &format!("0.0.0.0:{PROBE_PORT}")),
        env("PYLON_OUTBOUND_LISTEN", "127.0.0.1:15001"),
        env("PYLON_INBOUND_LISTEN", "0.0.0.0:15006"),
        env("PYLON_IDENTITY_CONTROL_PLANE", "true"),
        env("PYLON_POLICY_CONTROL_PLANE", "true"),
        env("PYLON_CONTROL_PLANE_ADDRESS", &options.control_plane),
        env("PYLON_CONTROL_PLANE_CA_FILE", &format!("{CA_DIR}/ca.pem")),
        env(
            "PYLON_CONTROL_PLANE_TOKEN_FILE",
            &format!("{TOKEN_DIR}/token"),
        ),
        // The kubelet writes a projected token 0644 unless every container
        // of the pod runs as one user; only this container mounts it.
        env("PYLON_CONTROL_PLANE_ALLOW_READABLE_TOKEN_FILE", "true"),
        env("PYLON_STATE_DIR", STATE_DIR),
        env("PYLON_DRAIN_TIMEOUT", &settings.drain_timeout),
        env("PYLON_WORKERS", &settings.workers),
    ];
    if let Some(level) = &settings.log_level {
        vars.push(env("PYLON_LOG", level));
    }
    vars.extend([
        field_env("PYLON_KUBERNETES_POD_NAME", "metadata.name"),
        field_env("PYLON_KUBERNETES_NAMESPACE", "metadata.namespace"),
        field_env(
            "PYLON_KUBERNETES_SERVICE_ACCOUNT",
            "spec.serviceAccountName",
        ),
        field_env("PYLON_KUBERNETES_POD_IP", "status.podIP"),
    ]);
    if let Some(probes) = app_probes {
        vars.push(env("PYLON_APP_PROBES", &probes));
    }
    vars
}

fn env(name: &str, value: &str) -> Value {
    json!({ "name": name, "value": value })
}

/// An env var from the downward API.
fn field_env(name: &str, field: &str) -> Value {
    json!({ "name": name, "valueFrom": { "fieldRef": { "apiVersion": "v1", "fieldPath": field } } })
}

fn volumes() -> [Value; 4] {
    [
        json!({
            "name": TOKEN_VOLUME,
            "projected": { "sources": [{ "serviceAccountToken": {
                "audience": "pylon", "expirationSeconds": 3600, "path": "token",
            } }] },
        }),
        json!({ "name": CA_VOLUME, "configMap": { "name": "pylon-ca" } }),
        json!({ "name": STATE_VOLUME, "emptyDir": {} }),
        json!({ "name": INIT_TMP_VOLUME, "emptyDir": {} }),
    ]
}

/// `items` first, then what `spec[field]` had.
fn prepend<const N: usize>(spec: &mut Map<String, Value>, field: &str, items: [Value; N]) {
    let mut list = items.to_vec();
    if let Some(Value::Array(existing)) = spec.remove(field) {
        list.extend(existing);
    }
    spec.insert(field.to_string(), Value::Array(list));
}

/// What `spec[field]` had, then `items`.
fn append<const N: usize>(spec: &mut Map<String, Value>, field: &str, items: [Value; N]) {
    let mut list = match spec.remove(field) {
        Some(Value::Array(existing)) => existing,
        _ => Vec::new(),
    };
    list.extend(items);
    spec.insert(field.to_string(), Value::Array(list));
}
