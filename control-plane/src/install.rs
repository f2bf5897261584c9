//! `pylon-control install`: every Kubernetes object of the mesh, as
//! multi-document YAML for `kubectl apply -f -`.
//!
//! [`objects`] is a pure function of the [`Install`] settings and the mesh
//! CA, so the output is the same every time but for the CA's key material
//! (made anew on every run unless `--ca-cert/--ca-key` give it). The
//! objects are written in the order `kubectl apply` needs them (namespaces
//! first), with keys sorted, by the YAML writer of `pylon inject`.
//!
//! Not here: the control plane itself (`serve`), and the injected pods
//! ([`crate::inject`]); `deploy/kubernetes/base` holds the same objects as
//! a kustomize base.

use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};

use crate::ca::{CaMaterial, OperatorCa};
use crate::inject::{self, yaml::write_documents};

/// The control plane's name: its ServiceAccount, StatefulSet and Service.
pub const NAME: &str = "pylon-control";
/// The Secret that holds the mesh CA (`tls.crt`, `tls.key`).
pub const CA_SECRET: &str = "pylon-ca-key";
/// The ConfigMap that holds the trust bundle (`ca.pem`), in the control
/// plane's namespace and in every meshed one.
pub const TRUST_BUNDLE_CONFIG_MAP: &str = "pylon-ca";
pub const WEBHOOK_CONFIGURATION: &str = "pylon-sidecar-injector";
/// The namespace and pod label that opt into injection.
pub const INJECT_LABEL: &str = "pylon.dev/inject";

const GRPC_PORT: u16 = 15010;
const WEBHOOK_PORT: u16 = 15011;
const METRICS_PORT: u16 = 15014;
const DATA_DIR: &str = "/var/lib/pylon-control";
const CA_DIR: &str = "/etc/pylon/ca";
/// The UID and GID the control plane runs as (the sidecar's too).
const UID: u32 = 1337;

/// `pylon-control install` flags.
#[derive(clap::Args, Debug)]
pub struct InstallArgs {
    /// The control plane's namespace.
    #[arg(long, default_value = "pylon-system")]
    pub namespace: String,
    /// The trust domain of the mesh's SPIFFE IDs.
    #[arg(long, default_value = "pylon.local")]
    pub trust_domain: String,
    /// The image of the control plane and of the sidecars it injects.
    #[arg(long, value_name = "IMAGE", default_value = inject::DEFAULT_IMAGE)]
    pub image: String,
    /// The mesh CA: a self-signed root certificate (PEM). Without it, a new
    /// root is made, and printed with its key.
    #[arg(long, value_name = "FILE", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The mesh CA's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// A namespace to mesh (repeat): it is labelled `pylon.dev/inject:
    /// enabled` and given the trust bundle ConfigMap `pylon-ca`. Leave these
    /// out of the output you pipe to `kubectl delete`: it would delete the
    /// namespaces.
    #[arg(long = "meshed-namespace", value_name = "NS")]
    pub meshed_namespaces: Vec<String>,
    /// The issuer of the cluster's service-account tokens (their `iss`),
    /// whose OIDC discovery gives the keys that verify them.
    #[arg(
        long,
        value_name = "URL",
        default_value = "https://kubernetes.default.svc.cluster.local"
    )]
    pub kubernetes_issuer: String,
}

/// What the objects depend on, but for the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Install {
    pub namespace: String,
    pub trust_domain: String,
    pub image: String,
    pub meshed_namespaces: Vec<String>,
    pub kubernetes_issuer: String,
}

impl Install {
    /// The settings of `args`, checked: every problem, one a line.
    pub fn from_args(args: &InstallArgs) -> Result<Install, String> {
        let mut problems = Vec::new();
        if let Err(e) = namespace_name(&args.namespace) {
            problems.push(format!("--namespace: {e}"));
        }
        let mut meshed: Vec<String> = Vec::new();
        for ns in &args.meshed_namespaces {
            if let Err(e) = namespace_name(ns) {
                problems.push(format!("--meshed-namespace: {e}"));
            } else if *ns == args.namespace || ns == "kube-system" {
                problems.push(format!(
                    "--meshed-namespace: {ns:?} is never meshed (the webhook leaves the control plane's namespace and kube-system alone)"
                ));
            } else if !meshed.contains(ns) {
                meshed.push(ns.clone());
            }
        }
        if args.trust_domain.is_empty()
            || !args.trust_domain.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
            })
        {
            problems.push(format!(
                "--trust-domain: {:?} is not a trust domain (lowercase letters, digits, '.', '-', '_')",
                args.trust_domain
            ));
        }
        if args.image.trim().is_empty() {
            problems.push("--image: empty".to_string());
        }
        if !args.kubernetes_issuer.starts_with("https://") {
            problems.push(format!(
                "--kubernetes-issuer: {:?} is not an https:// URL",
                args.kubernetes_issuer
            ));
        }
        if !problems.is_empty() {
            return Err(problems.join("\n"));
        }
        Ok(Install {
            namespace: args.namespace.clone(),
            trust_domain: args.trust_domain.clone(),
            image: args.image.clone(),
            meshed_namespaces: meshed,
            kubernetes_issuer: args.kubernetes_issuer.clone(),
        })
    }

    /// The Service's cluster DNS names, which the serving certificate of
    /// the gRPC port and the webhook carries.
    pub fn dns_names(&self) -> [String; 2] {
        let svc = format!("{NAME}.{}.svc", self.namespace);
        [svc.clone(), format!("{svc}.cluster.local")]
    }

    /// Where injected sidecars reach the control plane.
    pub fn control_plane_url(&self) -> String {
        format!("https://{NAME}.{}.svc:{GRPC_PORT}", self.namespace)
    }
}

/// A Kubernetes namespace name: a DNS-1123 label.
fn namespace_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a namespace name (at most 63 lowercase letters, digits and inner '-')"
        ))
    }
}

/// Runs `pylon-control install`: the YAML to print.
pub fn run(args: &InstallArgs) -> anyhow::Result<String> {
    let install = Install::from_args(args).map_err(|e| anyhow::anyhow!("{e}"))?;
    let ca = match (&args.ca_cert, &args.ca_key) {
        (Some(cert), Some(key)) => OperatorCa {
            cert: cert.clone(),
            key: key.clone(),
            bundle: None,
        }
        .read()?,
        _ => CaMaterial::new_root(&install.trust_domain)?,
    };
    // Checked as `serve` will check it on its first start, so that a bad
    // CA fails here rather than in a crash-looping pod.
    let bundle = ca
        .trust_bundle()
        .map_err(|e| anyhow::anyhow!("the mesh CA: {e}"))?;
    let yaml = write_documents(&objects(&install, &ca, &bundle)).map_err(|e| anyhow::anyhow!(e))?;
    Ok(format!("{}{yaml}", header(&install)))
}

/// Comments ahead of the first document: what the output holds and why it
/// has no RBAC.
fn header(install: &Install) -> String {
    let ns = &install.namespace;
    format!(
        "# The pylon mesh, made by `pylon-control install` {version}.
#
#   pylon-control install ... | kubectl apply -f -
#
# The Secret {CA_SECRET} below holds the mesh CA's private key: keep this
# output as secret as the key, or give the CA with --ca-cert/--ca-key. The
# control plane takes the CA from it on its first start only (then its data
# volume keeps it): apply a new CA to a running mesh with `pylon-control ca`,
# never by installing again with another one.
#
# No Role or ClusterRole: the control plane reads nothing from the
# Kubernetes API. Policy comes from `pylon-control apply`; to verify the
# sidecars' service-account tokens it reads the issuer's OIDC discovery
# document and JWKS, which the default ClusterRoleBinding
# system:service-account-issuer-discovery grants to every service account.
#
# Injected pods read the trust bundle from the ConfigMap {TRUST_BUNDLE_CONFIG_MAP} of their own
# namespace: copy it from {ns} into each meshed namespace (or list them
# with --meshed-namespace).
",
        version = env!("CARGO_PKG_VERSION"),
    )
}

fn labels() -> Value {
    json!({
        "app.kubernetes.io/name": NAME,
        "app.kubernetes.io/part-of": "pylon",
    })
}

fn metadata(name: &str, namespace: &str) -> Value {
    json!({ "name": name, "namespace": namespace, "labels": labels() })
}

/// Every object of the mesh, in the order `kubectl apply` takes them.
/// `bundle` is the trust bundle (PEM) of `ca`.
pub fn objects(install: &Install, ca: &CaMaterial, bundle: &str) -> Vec<Value> {
    let ns = install.namespace.as_str();
    let mut objects = vec![json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": ns, "labels": labels() },
    })];
    for meshed in &install.meshed_namespaces {
        objects.push(json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": meshed, "labels": { INJECT_LABEL: "enabled" } },
        }));
    }
    objects.push(json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(NAME, ns),
    }));
    objects.push(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(CA_SECRET, ns),
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": BASE64.encode(&ca.cert_pem),
            "tls.key": BASE64.encode(&ca.key_pem),
        },
    }));
    for namespace in std::iter::once(ns).chain(install.meshed_namespaces.iter().map(String::as_str))
    {
        objects.push(json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": metadata(TRUST_BUNDLE_CONFIG_MAP, namespace),
            "data": { "ca.pem": bundle },
        }));
    }
    objects.push(service(ns));
    objects.push(stateful_set(install));
    objects.push(webhook_configuration(ns, bundle));
    objects
}

fn service(ns: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(NAME, ns),
        "spec": {
            "selector": { "app.kubernetes.io/name": NAME },
            "ports": [
                { "name": "grpc", "port": GRPC_PORT, "targetPort": "grpc",
                  "protocol": "TCP", "appProtocol": "grpc" },
                { "name": "webhook", "port": WEBHOOK_PORT, "targetPort": WEBHOOK_PORT,
                  "protocol": "TCP", "appProtocol": "https" },
                { "name": "http-metrics", "port": METRICS_PORT, "targetPort": "http-metrics",
                  "protocol": "TCP", "appProtocol": "http" },
            ],
        },
    })
}

/// The arguments of `pylon-control serve` in the pod.
fn serve_args(install: &Install) -> Vec<String> {
    let mut args: Vec<String> = [
        "serve",
        "--data-dir",
        DATA_DIR,
        "--listen",
        &format!("0.0.0.0:{GRPC_PORT}"),
        "--webhook-listen",
        &format!("0.0.0.0:{WEBHOOK_PORT}"),
        "--metrics-listen",
        &format!("0.0.0.0:{METRICS_PORT}"),
        "--trust-domain",
        &install.trust_domain,
    ]
    .map(String::from)
    .to_vec();
    for name in install.dns_names() {
        args.extend(["--dns-name".to_string(), name]);
    }
    args.extend(
        [
            "--ca-cert",
            &format!("{CA_DIR}/tls.crt"),
            "--ca-key",
            &format!("{CA_DIR}/tls.key"),
            "--sidecar-image",
            &install.image,
            "--sidecar-control-plane",
            &install.control_plane_url(),
            "--kubernetes-issuer",
            &install.kubernetes_issuer,
        ]
        .map(String::from),
    );
    args
}

fn stateful_set(install: &Install) -> Value {
    let probe = |period: u32, failures: u32| {
        json!({
            "httpGet": { "path": "/healthz", "port": "webhook", "scheme": "HTTPS" },
            "periodSeconds": period,
            "timeoutSeconds": 2,
            "failureThreshold": failures,
        })
    };
    let non_root = json!({
        "runAsNonRoot": true,
        "runAsUser": UID,
        "runAsGroup": UID,
        "seccompProfile": { "type": "RuntimeDefault" },
    });
    let mut container_security = non_root.clone();
    if let Some(fields) = container_security.as_object_mut() {
        fields.insert("readOnlyRootFilesystem".into(), json!(true));
        fields.insert("allowPrivilegeEscalation".into(), json!(false));
        fields.insert("capabilities".into(), json!({ "drop": ["ALL"] }));
    }
    let mut pod_security = non_root;
    if let Some(fields) = pod_security.as_object_mut() {
        // The data volume is made writable for the group, once: without
        // OnRootMismatch the kubelet would make every file in it
        // group-readable again at each mount, and the control plane refuses
        // to start with its CA keys readable by anyone but itself.
        fields.insert("fsGroup".into(), json!(UID));
        fields.insert("fsGroupChangePolicy".into(), json!("OnRootMismatch"));
    }
    let mut pod_labels = labels();
    if let Some(l) = pod_labels.as_object_mut() {
        // Never inject the injector.
        l.insert(INJECT_LABEL.into(), json!("disabled"));
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(NAME, &install.namespace),
        "spec": {
            "replicas": 1,
            "serviceName": NAME,
            "selector": { "matchLabels": { "app.kubernetes.io/name": NAME } },
            "template": {
                "metadata": { "labels": pod_labels },
                "spec": {
                    "serviceAccountName": NAME,
                    // Its own token authenticates the OIDC discovery of the
                    // service-account issuer.
                    "automountServiceAccountToken": true,
                    "securityContext": pod_security,
                    "terminationGracePeriodSeconds": 30,
                    "containers": [{
                        "name": NAME,
                        "image": install.image,
                        "imagePullPolicy": "IfNotPresent",
                        "command": [NAME],
                        "args": serve_args(install),
                        "ports": [
                            { "name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP" },
                            { "name": "webhook", "containerPort": WEBHOOK_PORT, "protocol": "TCP" },
                            { "name": "http-metrics", "containerPort": METRICS_PORT, "protocol": "TCP" },
                        ],
                        "securityContext": container_security,
                        "resources": {
                            "requests": { "cpu": "100m", "memory": "128Mi" },
                            "limits": { "memory": "512Mi" },
                        },
                        // The first start makes keys and the store: up to 2 minutes.
                        "startupProbe": probe(2, 60),
                        "readinessProbe": probe(5, 3),
                        "livenessProbe": probe(10, 3),
                        "volumeMounts": [
                            { "name": "data", "mountPath": DATA_DIR },
                            { "name": "ca", "mountPath": CA_DIR, "readOnly": true },
                        ],
                    }],
                    "volumes": [{
                        "name": "ca",
                        // 0440: readable by the fsGroup, not by others.
                        "secret": { "secretName": CA_SECRET, "defaultMode": 0o440 },
                    }],
                },
            },
            "volumeClaimTemplates": [{
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": { "name": "data", "labels": labels() },
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": { "requests": { "storage": "1Gi" } },
                },
            }],
        },
    })
}

/// Two webhooks: pods of labelled namespaces (unless the pod opts out), and
/// labelled pods of the other namespaces. Neither sees the control plane's
/// namespace or kube-system.
fn webhook_configuration(ns: &str, bundle: &str) -> Value {
    let excluded = json!({
        "key": "kubernetes.io/metadata.name",
        "operator": "NotIn",
        "values": [ns, "kube-system"],
    });
    let label = |operator: &str| json!({ "key": INJECT_LABEL, "operator": operator, "values": ["enabled"] });
    let webhook = |name: &str, namespaces: Value, pods: Value| {
        json!({
            "name": name,
            "admissionReviewVersions": ["v1"],
            "clientConfig": {
                "service": { "name": NAME, "namespace": ns, "path": "/inject", "port": WEBHOOK_PORT },
                "caBundle": BASE64.encode(bundle),
            },
            // A mesh outage must not stop a cluster's deployments: pods
            // created while the webhook is unreachable start unmeshed.
            "failurePolicy": "Ignore",
            "matchPolicy": "Equivalent",
            "namespaceSelector": { "matchExpressions": [namespaces, excluded.clone()] },
            "objectSelector": { "matchExpressions": [pods] },
            "reinvocationPolicy": "IfNeeded",
            "rules": [{
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "operations": ["CREATE"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }],
            "sideEffects": "None",
            "timeoutSeconds": 5,
        })
    };
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": WEBHOOK_CONFIGURATION, "labels": labels() },
        "webhooks": [
            webhook(
                "namespace.sidecar-injector.pylon.dev",
                label("In"),
                json!({ "key": INJECT_LABEL, "operator": "NotIn", "values": ["disabled"] }),
            ),
            webhook("pod.sidecar-injector.pylon.dev", label("NotIn"), label("In")),
        ],
    })
}

#[cfg(test)]
mod tests;
