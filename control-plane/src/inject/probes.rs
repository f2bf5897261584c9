//! The app's probes, through the sidecar.
//!
//! Once `pylon-init` has run, the kubelet's probes to the app's ports would
//! be redirected to the sidecar's mTLS listener and fail. So each
//! httpGet/tcpSocket/grpc probe becomes an httpGet to the sidecar's probe
//! listener (`/app-health/<container>/<kind>` on 15020, which the iptables
//! rules leave alone), and the original, its named port resolved, goes to
//! the sidecar in `PYLON_APP_PROBES` so it can run it against the app.
//! Exec probes run inside the container and stay as they are.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::Problem;
use super::path::FieldPath;

/// The sidecar's probe listener port.
pub const PROBE_PORT: u16 = 15020;

/// The probe fields of a container, and what `/app-health/` calls them.
const KINDS: [(&str, &str); 3] = [
    ("startupProbe", "startup"),
    ("readinessProbe", "readiness"),
    ("livenessProbe", "liveness"),
];
/// The handlers that reach the app over the network.
const NETWORK_HANDLERS: [&str; 3] = ["httpGet", "tcpSocket", "grpc"];

/// The original probes, by container name, then kind.
type AppProbes = BTreeMap<String, Map<String, Value>>;

/// Rewrites the probes of the pod's app containers and of its restartable
/// (sidecar) init containers, whose ports are intercepted just the same.
/// `at` is the pod spec's path. Returns the `PYLON_APP_PROBES` text when a
/// probe was rewritten.
pub fn rewrite(
    spec: &mut Map<String, Value>,
    at: &FieldPath,
) -> Result<Option<String>, Vec<Problem>> {
    let mut originals = AppProbes::new();
    let mut problems = Vec::new();
    for list in ["initContainers", "containers"] {
        let Some(Value::Array(containers)) = spec.get_mut(list) else {
            continue;
        };
        for (i, container) in containers.iter_mut().enumerate() {
            let Some(container) = container.as_object_mut() else {
                continue;
            };
            if list == "initContainers" && !is_restartable(container) {
                continue;
            }
            let at = at.field(list).index(i);
            if let Err(p) = rewrite_container(container, &at, &mut originals) {
                problems.extend(p);
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    if originals.is_empty() {
        return Ok(None);
    }
    serde_json::to_string(&originals).map(Some).map_err(|e| {
        vec![Problem::at(
            at,
            format!("cannot encode the app probes: {e}"),
        )]
    })
}

fn is_restartable(container: &Map<String, Value>) -> bool {
    container.get("restartPolicy").and_then(Value::as_str) == Some("Always")
}

fn rewrite_container(
    container: &mut Map<String, Value>,
    at: &FieldPath,
    originals: &mut AppProbes,
) -> Result<(), Vec<Problem>> {
    let has_network_probe = KINDS
        .iter()
        .any(|(field, _)| handler_of(container.get(*field)).is_some());
    if !has_network_probe {
        return Ok(());
    }
    let Some(name) = container
        .get("name")
        .and_then(Value::as_str)
        .map(str::to_string)
    else {
        return Err(vec![Problem::at(
            &at.field("name"),
            "missing (a container with probes needs a name)",
        )]);
    };
    let ports = named_ports(container);
    let mut problems = Vec::new();
    for (field, kind) in KINDS {
        let Some(handler) = handler_of(container.get(field)) else {
            continue;
        };
        let Some(Value::Object(probe)) = container.get_mut(field) else {
            continue;
        };
        match resolved(probe, handler, &ports, &at.field(field)) {
            Ok(original) => {
                originals
                    .entry(name.clone())
                    .or_default()
                    .insert(kind.to_string(), Value::Object(original));
                through_sidecar(probe, &name, kind);
            }
            Err(p) => problems.push(p),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// The probe's network handler, if it has one.
fn handler_of(probe: Option<&Value>) -> Option<&'static str> {
    let probe = probe?.as_object()?;
    NETWORK_HANDLERS
        .into_iter()
        .find(|h| probe.contains_key(*h))
}

/// The container's named ports and their numbers.
fn named_ports(container: &Map<String, Value>) -> BTreeMap<String, Value> {
    let Some(Value::Array(ports)) = container.get("ports") else {
        return BTreeMap::new();
    };
    ports
        .iter()
        .filter_map(|p| {
            let name = p.get("name")?.as_str()?;
            let number = p.get("containerPort")?;
            number.is_u64().then(|| (name.to_string(), number.clone()))
        })
        .collect()
}

/// The original probe with its port as a number.
fn resolved(
    probe: &Map<String, Value>,
    handler: &str,
    ports: &BTreeMap<String, Value>,
    at: &FieldPath,
) -> Result<Map<String, Value>, Problem> {
    let mut original = probe.clone();
    let Some(Value::Object(action)) = original.get_mut(handler) else {
        return Err(Problem::at(&at.field(handler), "must be an object"));
    };
    let at = at.field(handler).field("port");
    let number = match action.get("port") {
        Some(Value::Number(n)) if n.is_u64() => return Ok(original),
        Some(Value::String(name)) => ports.get(name).cloned().ok_or_else(|| {
            Problem::at(
                &at,
                format!("named port {name:?} is not among the container's ports"),
            )
        })?,
        Some(other) => return Err(Problem::at(&at, format!("{other} is not a port"))),
        None => return Err(Problem::at(&at, "missing")),
    };
    action.insert("port".into(), number);
    Ok(original)
}

/// The probe asks the sidecar instead; its timing and thresholds stay.
fn through_sidecar(probe: &mut Map<String, Value>, container: &str, kind: &str) {
    for handler in NETWORK_HANDLERS {
        probe.remove(handler);
    }
    probe.insert(
        "httpGet".into(),
        json!({ "path": format!("/app-health/{container}/{kind}"), "port": PROBE_PORT }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn at() -> FieldPath {
        FieldPath::root().field("spec")
    }

    #[test]
    fn each_network_probe_goes_through_the_sidecar_and_exec_stays() {
        let mut s = spec(json!({
            "containers": [{
                "name": "app",
                "ports": [{"name": "http", "containerPort": 8080}, {"name": "grpc", "containerPort": 9090}],
                "startupProbe": {"tcpSocket": {"port": "http"}, "failureThreshold": 30, "periodSeconds": 2},
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http", "scheme": "HTTP",
                    "httpHeaders": [{"name": "X-Probe", "value": "1"}]}, "timeoutSeconds": 2},
                "livenessProbe": {"grpc": {"port": 9090, "service": "health"}, "periodSeconds": 10},
            }, {
                "name": "worker",
                "livenessProbe": {"exec": {"command": ["true"]}},
            }],
        }));
        let probes = rewrite(&mut s, &at()).unwrap().unwrap();
        let app = &s["containers"][0];
        assert_eq!(
            app["startupProbe"],
            json!({"httpGet": {"path": "/app-health/app/startup", "port": 15020}, "failureThreshold": 30, "periodSeconds": 2})
        );
        assert_eq!(
            app["readinessProbe"],
            json!({"httpGet": {"path": "/app-health/app/readiness", "port": 15020}, "timeoutSeconds": 2})
        );
        assert_eq!(
            app["livenessProbe"],
            json!({"httpGet": {"path": "/app-health/app/liveness", "port": 15020}, "periodSeconds": 10})
        );
        assert_eq!(
            s["containers"][1]["livenessProbe"],
            json!({"exec": {"command": ["true"]}})
        );
        let probes: Value = serde_json::from_str(&probes).unwrap();
        assert_eq!(
            probes,
            json!({"app": {
                "startup": {"tcpSocket": {"port": 8080}, "failureThreshold": 30, "periodSeconds": 2},
                "readiness": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP",
                    "httpHeaders": [{"name": "X-Probe", "value": "1"}]}, "timeoutSeconds": 2},
                "liveness": {"grpc": {"port": 9090, "service": "health"}, "periodSeconds": 10},
            }})
        );
    }

    #[test]
    fn restartable_init_containers_are_probed_through_the_sidecar_too() {
        let mut s = spec(json!({
            "initContainers": [
                {"name": "setup", "image": "busybox"},
                {"name": "log-shipper", "restartPolicy": "Always",
                 "readinessProbe": {"httpGet": {"path": "/", "port": 2020}}},
            ],
            "containers": [{"name": "app"}],
        }));
        let probes = rewrite(&mut s, &at()).unwrap().unwrap();
        assert_eq!(
            s["initContainers"][1]["readinessProbe"]["httpGet"]["path"],
            "/app-health/log-shipper/readiness"
        );
        assert_eq!(
            probes,
            r#"{"log-shipper":{"readiness":{"httpGet":{"path":"/","port":2020}}}}"#
        );
    }

    #[test]
    fn no_network_probe_no_app_probes() {
        let mut s = spec(json!({"containers": [{"name": "app", "image": "app"}]}));
        let before = s.clone();
        assert_eq!(rewrite(&mut s, &at()).unwrap(), None);
        assert_eq!(s, before);
    }

    #[test]
    fn an_unknown_named_port_is_an_error_with_its_path() {
        let mut s = spec(json!({"containers": [
            {"name": "ok", "readinessProbe": {"httpGet": {"path": "/", "port": 80}}},
            {"name": "app", "ports": [{"name": "http", "containerPort": 8080}],
             "readinessProbe": {"httpGet": {"path": "/", "port": "metrics"}},
             "livenessProbe": {"tcpSocket": {"port": "admin"}}},
        ]}));
        let problems: Vec<String> = rewrite(&mut s, &at())
            .unwrap_err()
            .iter()
            .map(Problem::to_string)
            .collect();
        assert_eq!(
            problems,
            [
                "spec.containers[1].readinessProbe.httpGet.port: named port \"metrics\" is not among the container's ports",
                "spec.containers[1].livenessProbe.tcpSocket.port: named port \"admin\" is not among the container's ports",
            ]
        );
    }
}
