use clap::Parser;

use super::*;
use crate::cli::{Cli, Command};

fn args(extra: &[&str]) -> InstallArgs {
    let mut argv = vec!["pylon-control", "install"];
    argv.extend(extra);
    match Cli::try_parse_from(argv) {
        Ok(Cli {
            command: Command::Install(args),
        }) => args,
        Ok(_) => panic!("not install"),
        Err(e) => panic!("{e}"),
    }
}

fn install(extra: &[&str]) -> Install {
    Install::from_args(&args(extra)).unwrap()
}

/// Objects with a fixed stand-in CA (the PEM is never parsed here).
fn objects_of(install: &Install) -> Vec<Value> {
    let ca = CaMaterial {
        cert_pem: "CERT".into(),
        key_pem: "KEY".into(),
        bundle_pem: String::new(),
    };
    objects(install, &ca, "BUNDLE")
}

fn find<'a>(objects: &'a [Value], kind: &str, namespace: Option<&str>) -> Vec<&'a Value> {
    objects
        .iter()
        .filter(|o| o["kind"] == kind)
        .filter(|o| namespace.is_none_or(|ns| o["metadata"]["namespace"] == ns))
        .collect()
}

fn container(objects: &[Value]) -> &Value {
    &find(objects, "StatefulSet", None)[0]["spec"]["template"]["spec"]["containers"][0]
}

#[test]
fn the_defaults_make_the_documented_objects_in_apply_order() {
    let objects = objects_of(&install(&[]));
    let kinds: Vec<&str> = objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ServiceAccount",
            "Secret",
            "ConfigMap",
            "Service",
            "StatefulSet",
            "MutatingWebhookConfiguration"
        ]
    );
    // No RBAC: the control plane reads nothing from the API server.
    assert!(
        objects
            .iter()
            .all(|o| !o["kind"].as_str().unwrap().contains("Role"))
    );
    for o in &objects[1..objects.len() - 1] {
        assert_eq!(o["metadata"]["namespace"], "pylon-system", "{o}");
    }
    let secret = &find(&objects, "Secret", None)[0];
    assert_eq!(secret["metadata"]["name"], CA_SECRET);
    assert_eq!(secret["type"], "kubernetes.io/tls");
    assert_eq!(secret["data"]["tls.crt"], BASE64.encode("CERT"));
    assert_eq!(secret["data"]["tls.key"], BASE64.encode("KEY"));
    let bundle = &find(&objects, "ConfigMap", None)[0];
    assert_eq!(bundle["metadata"]["name"], "pylon-ca");
    assert_eq!(bundle["data"], json!({ "ca.pem": "BUNDLE" }));
}

#[test]
fn the_control_plane_is_named_by_its_service_and_hands_that_name_to_sidecars() {
    let install = install(&["--namespace", "mesh", "--image", "registry.test/pylon:7"]);
    let objects = objects_of(&install);
    let c = container(&objects);
    assert_eq!(c["image"], "registry.test/pylon:7");
    assert_eq!(c["command"], json!(["pylon-control"]));
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let joined = args.join(" ");
    for expected in [
        "serve --data-dir /var/lib/pylon-control --listen 0.0.0.0:15010 --webhook-listen 0.0.0.0:15011",
        "--trust-domain pylon.local",
        "--dns-name pylon-control.mesh.svc --dns-name pylon-control.mesh.svc.cluster.local",
        "--ca-cert /etc/pylon/ca/tls.crt --ca-key /etc/pylon/ca/tls.key",
        "--sidecar-image registry.test/pylon:7",
        "--sidecar-control-plane https://pylon-control.mesh.svc:15010",
        "--kubernetes-issuer https://kubernetes.default.svc.cluster.local",
    ] {
        assert!(joined.contains(expected), "{expected:?} not in {joined:?}");
    }
    let service = &find(&objects, "Service", None)[0];
    assert_eq!(service["metadata"]["name"], "pylon-control");
    assert_eq!(service["metadata"]["namespace"], "mesh");
    let ports = service["spec"]["ports"].as_array().unwrap();
    assert_eq!(ports[0]["port"], 15010);
    assert_eq!(ports[0]["name"], "grpc");
    assert_eq!(ports[0]["appProtocol"], "grpc");
    assert_eq!(ports[1]["port"], 15011);
    assert_eq!(ports[1]["name"], "webhook");
    assert_eq!(ports[1]["targetPort"], 15011);
}

#[test]
fn the_pod_runs_the_serve_command_the_cli_accepts() {
    let objects = objects_of(&install(&[]));
    let mut argv = vec!["pylon-control".to_string()];
    argv.extend(
        container(&objects)["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string()),
    );
    let Command::Serve(serve) = Cli::try_parse_from(&argv).unwrap().command else {
        panic!("not serve");
    };
    assert_eq!(serve.data_dir, PathBuf::from("/var/lib/pylon-control"));
    assert_eq!(
        serve.names,
        [
            "pylon-control.pylon-system.svc",
            "pylon-control.pylon-system.svc.cluster.local"
        ]
    );
    assert_eq!(serve.webhook_listen.unwrap().port(), 15011);
    assert_eq!(serve.metrics_listen.unwrap().port(), 15014);
    assert_eq!(
        serve.kubernetes_issuer.as_deref(),
        Some("https://kubernetes.default.svc.cluster.local")
    );
    assert_eq!(
        serve.sidecar_control_plane,
        inject::DEFAULT_CONTROL_PLANE,
        "the default namespace's URL is the injector's default"
    );
}

#[test]
fn the_pod_is_locked_down_and_probed_over_https() {
    let objects = objects_of(&install(&[]));
    let set = &find(&objects, "StatefulSet", None)[0];
    assert_eq!(set["spec"]["replicas"], 1);
    let pod = &set["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["fsGroup"], 1337);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        set["spec"]["template"]["metadata"]["labels"]["pylon.dev/inject"],
        "disabled"
    );
    let c = container(&objects);
    let security = &c["securityContext"];
    assert_eq!(security["runAsUser"], 1337);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"], json!({ "drop": ["ALL"] }));
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(
            c[probe]["httpGet"],
            json!({ "path": "/healthz", "port": "webhook", "scheme": "HTTPS" })
        );
    }
    let claim = &set["spec"]["volumeClaimTemplates"][0];
    assert_eq!(claim["metadata"]["name"], "data");
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "1Gi");
    assert_eq!(
        c["volumeMounts"][0],
        json!({ "name": "data", "mountPath": "/var/lib/pylon-control" })
    );
    assert_eq!(pod["volumes"][0]["secret"]["secretName"], CA_SECRET);
}

#[test]
fn the_webhooks_select_opted_in_pods_fail_open_and_trust_the_mesh_ca() {
    let objects = objects_of(&install(&[]));
    let config = &find(&objects, "MutatingWebhookConfiguration", None)[0];
    assert_eq!(config["metadata"]["name"], "pylon-sidecar-injector");
    let webhooks = config["webhooks"].as_array().unwrap();
    assert_eq!(webhooks.len(), 2);
    let excluded = json!({ "key": "kubernetes.io/metadata.name", "operator": "NotIn",
                           "values": ["pylon-system", "kube-system"] });
    let selectors: Vec<(Value, Value)> = webhooks
        .iter()
        .map(|w| {
            (
                w["namespaceSelector"]["matchExpressions"].clone(),
                w["objectSelector"]["matchExpressions"].clone(),
            )
        })
        .collect();
    assert_eq!(
        selectors,
        [
            (
                json!([{ "key": "pylon.dev/inject", "operator": "In", "values": ["enabled"] }, excluded]),
                json!([{ "key": "pylon.dev/inject", "operator": "NotIn", "values": ["disabled"] }]),
            ),
            (
                json!([{ "key": "pylon.dev/inject", "operator": "NotIn", "values": ["enabled"] }, excluded]),
                json!([{ "key": "pylon.dev/inject", "operator": "In", "values": ["enabled"] }]),
            ),
        ]
    );
    for w in webhooks {
        assert_eq!(w["failurePolicy"], "Ignore");
        assert_eq!(w["sideEffects"], "None");
        assert_eq!(w["timeoutSeconds"], 5);
        assert_eq!(w["reinvocationPolicy"], "IfNeeded");
        assert_eq!(w["admissionReviewVersions"], json!(["v1"]));
        assert_eq!(w["rules"][0]["operations"], json!(["CREATE"]));
        assert_eq!(w["rules"][0]["resources"], json!(["pods"]));
        assert_eq!(
            w["clientConfig"]["service"],
            json!({ "name": "pylon-control", "namespace": "pylon-system", "path": "/inject", "port": 15011 })
        );
        assert_eq!(w["clientConfig"]["caBundle"], BASE64.encode("BUNDLE"));
    }
}

#[test]
fn meshed_namespaces_are_labelled_and_get_the_trust_bundle() {
    let install = install(&[
        "--meshed-namespace",
        "shop",
        "--meshed-namespace",
        "greeter",
        "--meshed-namespace",
        "shop",
    ]);
    assert_eq!(install.meshed_namespaces, ["shop", "greeter"]);
    let objects = objects_of(&install);
    let namespaces: Vec<&Value> = find(&objects, "Namespace", None);
    assert_eq!(namespaces.len(), 3);
    assert_eq!(
        namespaces[1]["metadata"],
        json!({ "name": "shop", "labels": { "pylon.dev/inject": "enabled" } })
    );
    for ns in ["pylon-system", "shop", "greeter"] {
        let bundles = find(&objects, "ConfigMap", Some(ns));
        assert_eq!(bundles.len(), 1, "{ns}");
        assert_eq!(bundles[0]["data"]["ca.pem"], "BUNDLE");
    }
}

#[test]
fn bad_settings_are_refused_with_every_problem() {
    let e = Install::from_args(&args(&[
        "--namespace",
        "Pylon",
        "--meshed-namespace",
        "kube-system",
        "--meshed-namespace",
        "a_b",
        "--trust-domain",
        "Bad Domain",
        "--kubernetes-issuer",
        "http://issuer",
    ]))
    .unwrap_err();
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines.len(), 5, "{e}");
    assert!(lines[0].starts_with("--namespace: \"Pylon\" is not a namespace name"));
    assert!(lines[1].contains("\"kube-system\" is never meshed"));
    assert!(lines[2].starts_with("--meshed-namespace: \"a_b\""));
    assert!(lines[3].starts_with("--trust-domain: \"Bad Domain\""));
    assert!(lines[4].starts_with("--kubernetes-issuer: \"http://issuer\""));

    let e = Install::from_args(&args(&["--meshed-namespace", "pylon-system"])).unwrap_err();
    assert!(e.contains("never meshed"), "{e}");
}

#[test]
fn a_ca_is_checked_as_serve_checks_it() {
    let root = CaMaterial::new_root("pylon.local").unwrap();
    assert_eq!(root.trust_bundle().unwrap(), root.cert_pem);
    let other = CaMaterial::new_root("pylon.local").unwrap();
    let mismatched = CaMaterial {
        cert_pem: root.cert_pem.clone(),
        key_pem: other.key_pem,
        bundle_pem: String::new(),
    };
    let e = mismatched.trust_bundle().unwrap_err().to_string();
    assert!(e.contains("does not belong"), "{e}");
}
