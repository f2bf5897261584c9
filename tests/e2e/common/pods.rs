//! Pods on this machine: a "node" made of network namespaces.
//!
//! The node is a namespace of its own holding a bridge (`198.18.0.1/24`);
//! every pod is a namespace joined to it by a veth pair, with one address
//! from `198.18.0.0/24` and a default route through the bridge. Nothing is
//! added to the root namespace: the only addresses used are those, and only
//! inside namespaces made here. Names resolve through
//! `/etc/netns/<namespace>/hosts`, which `ip netns exec` binds over
//! `/etc/hosts`; no DNS query leaves a pod.
//!
//! A meshed pod is run the way a kubelet runs what `pylon inject` made of
//! its manifest: `pylon init-iptables` with the `pylon-init` container's
//! arguments, then `pylon proxy` as UID/GID 1337 with the `pylon`
//! container's environment, its downward-API values filled in and its
//! volume mounts mapped onto directories of the pod's own. The control
//! plane runs in a pod of its own, reached by the name the injected
//! sidecars dial.
//!
//! Not here: the tests' assertions, and anything Kubernetes does beyond
//! starting containers (services, DNS, restarts).
//!
//! Every namespace, `/etc/netns` directory, temporary directory and process
//! made here is removed or killed on drop.

use pylon_control::k8s_token::dev::{TestKey, jwks};
use std::cell::Cell;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::netns::Netns;
use super::{PATIENCE, Process, TempDir, eventually_blocking};
use pylon_test_support::admin::sum_samples;

/// Where the pods' Python apps live.
pub const APPS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/pods");
/// The trust domain of the control plane's identities.
pub const TRUST_DOMAIN: &str = "pylon.local";
/// The name injected sidecars dial the control plane by.
pub const CONTROL_PLANE_NAME: &str = "pylon-control.pylon-system.svc";
/// The sidecar's UID and GID (the injected container's `runAsUser`).
pub const PROXY_UID: u32 = 1337;
/// The sidecar's probe listener: `/ready`, `/metrics`, `/app-health/...`.
pub const PROBE_PORT: u16 = 15020;

/// The bridge's address in the node namespace: where the "kubelet" probes
/// from.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The control plane pod's address.
const CONTROL_PLANE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The first address handed to other pods.
const FIRST_POD_HOST: u8 = 10;

/// The SPIFFE ID of service account `sa` in namespace `default`.
pub fn spiffe_id(sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{sa}")
}

/// What the pod tests need from the machine.
#[derive(Clone, Debug)]
pub struct Tools {
    /// A Python interpreter that imports `grpc`.
    pub python: PathBuf,
}

/// The tools, or why the pod tests cannot run here.
pub fn prerequisites() -> Result<Tools, String> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout == b"0\n");
    if !root {
        return Err("pods need root (network namespaces, iptables)".into());
    }
    let missing: Vec<&str> = ["ip", "iptables", "setpriv", "curl", "python3"]
        .into_iter()
        .filter(|p| {
            !Command::new("which")
                .arg(p)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if !missing.is_empty() {
        return Err(format!("pods need {}", missing.join(", ")));
    }
    // The interpreter's own path: a shim (pyenv) may need an environment
    // the pods' processes do not get.
    let out = Command::new("python3")
        .args(["-c", "import grpc, sys; print(sys.executable)"])
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    if !out.status.success() {
        return Err("pods need python3 with grpcio (pip install grpcio)".into());
    }
    let python = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    Ok(Tools { python })
}

impl Netns {
    /// `curl -s` from inside the namespace, bounded by `--max-time`.
    pub fn curl(&self, args: &[&str]) -> Reply {
        let out = self
            .cmd("curl")
            .args(["-s", "-S", "-D", "-", "--max-time", "10"])
            .args(args)
            .output()
            .unwrap();
        Reply::from_output(&out)
    }
}

/// What a `curl -D -` printed: status (0 when none came), head, body, and
/// curl's exit code (28: timed out; 7: refused; 52: empty reply; 56: reset).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub head: String,
    pub body: String,
    pub exit: Option<i32>,
    pub stderr: String,
}

impl Reply {
    fn from_output(out: &Output) -> Reply {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Reply {
            status,
            head: head.to_string(),
            body: body.to_string(),
            exit: out.status.code(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// The body as JSON; panics with the reply if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:#?}"))
    }

    /// A response header's value (the first of that name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// The node: a namespace with the bridge every pod is plugged into.
pub struct Node {
    ns: Netns,
    /// Unique per node, so that tests (and test runs) can run side by side.
    tag: String,
    next_host: Cell<u8>,
    links: Cell<u32>,
    hosts: String,
    pub tools: Tools,
}

impl Node {
    /// Creates the node. `hosts` are extra `(address, name)` entries of
    /// every pod's `/etc/hosts`, beside the control plane's name.
    pub fn create(tools: Tools, hosts: &[(Ipv4Addr, &str)]) -> Node {
        let tag = format!("{}-{:06x}", std::process::id(), fastrand::u32(..0xff_ffff));
        let mut entries = format!(
            "127.0.0.1 localhost\n::1 localhost\n{CONTROL_PLANE_IP} {CONTROL_PLANE_NAME}\n"
        );
        for (addr, name) in hosts {
            entries.push_str(&format!("{addr} {name}\n"));
        }
        let ns = Netns::add(format!("pylon-{tag}-node"), &entries);
        ns.ip(&["link", "add", "br0", "type", "bridge"]);
        ns.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "br0"]);
        ns.ip(&["link", "set", "br0", "up"]);
        Node {
            ns,
            tag,
            next_host: Cell::new(FIRST_POD_HOST),
            links: Cell::new(0),
            hosts: entries,
            tools,
        }
    }

    /// A new pod network namespace on the bridge, with the next free
    /// address.
    pub fn pod(&self, name: &str) -> PodNet {
        let host = self.next_host.get();
        self.next_host.set(host + 1);
        self.pod_at(name, Ipv4Addr::new(198, 18, 0, host))
    }

    fn pod_at(&self, name: &str, addr: Ipv4Addr) -> PodNet {
        let ns = Netns::add(format!("pylon-{}-{name}", self.tag), &self.hosts);
        let link = format!("veth{}", self.links.get());
        self.links.set(self.links.get() + 1);
        self.ns.ip(&[
            "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]);
        self.ns.ip(&["link", "set", &link, "master", "br0", "up"]);
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["route", "add", "default", "via", &NODE_IP.to_string()]);
        PodNet {
            ns,
            ip: addr,
            name: name.to_string(),
            python: self.tools.python.clone(),
        }
    }

    /// `curl` from the node, as the kubelet probes a pod.
    pub fn curl(&self, args: &[&str]) -> Reply {
        self.ns.curl(args)
    }

    /// `GET http://<ip>:15020<path>` from the node.
    pub fn probe(&self, ip: Ipv4Addr, path: &str) -> Reply {
        self.curl(&[&format!("http://{ip}:{PROBE_PORT}{path}")])
    }
}

/// A pod's network namespace and address.
pub struct PodNet {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub name: String,
    python: PathBuf,
}

impl PodNet {
    /// `python3 tests/e2e/pods/<script>` inside the pod, as root.
    pub fn python(&self, script: &str) -> Command {
        let mut cmd = self.ns.cmd(&self.python);
        cmd.env("PYTHONUNBUFFERED", "1")
            .arg(Path::new(APPS).join(script));
        cmd
    }

    /// Starts a Python app and waits for it to print `LISTENING`.
    pub fn start_app(&self, script: &str, args: &[&str]) -> Process {
        let mut cmd = self.python(script);
        cmd.args(args);
        Process::spawn_until(cmd, "LISTENING", &format!("{script} in pod {}", self.name)).0
    }

    /// Runs a Python script to its end, bounded by `--timeout` flags of its
    /// own; its output.
    pub fn run_python(&self, script: &str, args: &[&str]) -> Output {
        self.python(script).args(args).output().unwrap()
    }

    pub fn curl(&self, args: &[&str]) -> Reply {
        self.ns.curl(args)
    }
}

/// `pylon-control serve` in a pod of its own at [`CONTROL_PLANE_IP`],
/// serving the name the sidecars dial.
pub struct ControlPlane {
    proc: Process,
    pub net: PodNet,
    data: TempDir,
    /// The cluster's service-account signing key: the control plane trusts
    /// its JWKS (`--kubernetes-jwks`), pods get tokens it signs.
    issuer_key: TestKey,
}

/// The `iss` of the cluster's service-account tokens.
const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const SA_KEY_ID: &str = "node-test-1";

impl ControlPlane {
    pub fn start(node: &Node) -> ControlPlane {
        let net = node.pod_at("control", CONTROL_PLANE_IP);
        let data = TempDir::new("pods-control");
        let issuer_key = TestKey::es256();
        let jwks_file = data.path().join("jwks.json");
        std::fs::write(&jwks_file, jwks(&[(&issuer_key, SA_KEY_ID)])).unwrap();
        let mut cmd = net.ns.cmd(super::PYLON_CONTROL);
        cmd.args(["serve", "--trust-domain", TRUST_DOMAIN, "--data-dir"])
            .arg(data.path())
            .arg("--kubernetes-jwks")
            .arg(&jwks_file)
            .args(["--kubernetes-token-issuer", SA_ISSUER])
            .args(["--listen", "0.0.0.0:15010", "--name", CONTROL_PLANE_NAME])
            .args(["--name", &CONTROL_PLANE_IP.to_string()])
            .env("PYLON_LOG", "info,pylon_control=debug");
        let proc = Process::spawn_until(cmd, "listening address=", "pylon-control").0;
        ControlPlane {
            proc,
            net,
            data,
            issuer_key,
        }
    }

    /// Runs a `pylon-control` CLI command in the control plane's pod,
    /// reaching it by its name.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.net
            .ns
            .cmd(super::PYLON_CONTROL)
            .args(args)
            .args(["--server", &format!("https://{CONTROL_PLANE_NAME}:15010")])
            .arg("--token-file")
            .arg(self.data.path().join("admin.token"))
            .arg("--ca-file")
            .arg(self.ca_file())
            .output()
            .unwrap()
    }

    /// `apply -f` with `yaml`; panics unless it succeeds.
    pub fn apply(&self, yaml: &str) {
        let file = self
            .data
            .path()
            .join(format!("apply-{}.yaml", fastrand::u32(..)));
        std::fs::write(&file, yaml).unwrap();
        let out = self.cli(&["apply", "-f", file.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "apply failed: {}\n{yaml}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
    }

    /// The projected service-account token the kubelet would give a pod
    /// of `namespace`/`service_account` (audience `pylon`, valid an hour).
    pub fn service_account_token(&self, namespace: &str, service_account: &str) -> String {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600;
        self.issuer_key
            .token(SA_KEY_ID, SA_ISSUER, namespace, service_account, exp)
    }

    pub fn ca_file(&self) -> PathBuf {
        self.data.path().join("ca.pem")
    }

    pub fn logs(&self) -> String {
        self.proc.logs()
    }
}

/// What `pylon inject -f <manifest>` made of a Pod manifest.
pub struct Injected {
    pub pod: Value,
}

impl Injected {
    /// Runs `pylon inject` on `manifest` (one Pod) and parses its output.
    pub fn from_manifest(manifest: &str) -> Injected {
        let dir = TempDir::new("pods-manifest");
        let file = dir.path().join("pod.yaml");
        std::fs::write(&file, manifest).unwrap();
        let out = Command::new(super::PYLON)
            .args(["inject", "-f"])
            .arg(&file)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "pylon inject failed ({}): {}\n--- manifest ---\n{manifest}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("pylon inject printed no YAML ({e}):\n{text}"));
        let pod = docs
            .into_iter()
            .find(|d| d["kind"] == "Pod")
            .unwrap_or_else(|| panic!("no Pod in the output of pylon inject:\n{text}"));
        Injected { pod }
    }

    pub fn name(&self) -> &str {
        self.pod["metadata"]["name"].as_str().unwrap()
    }

    pub fn namespace(&self) -> &str {
        self.pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
    }

    pub fn service_account(&self) -> &str {
        self.pod["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("default")
    }

    /// The init container named `name`; panics with the pod if absent.
    pub fn init_container(&self, name: &str) -> &Value {
        self.pod["spec"]["initContainers"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == name))
            .unwrap_or_else(|| panic!("no init container {name:?} in {:#}", self.pod))
    }

    /// The literal value of env `name` of the container named `container`.
    pub fn env_value(&self, container: &str, name: &str) -> Option<&str> {
        self.init_container(container)["env"]
            .as_array()?
            .iter()
            .find(|e| e["name"] == name)?["value"]
            .as_str()
    }

    /// A container's `args`.
    pub fn args(container: &Value) -> Vec<String> {
        container["args"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    }

    /// A container's environment as the kubelet would set it: downward-API
    /// values filled in from the pod, paths under its volume mounts mapped
    /// to the pod's directories in `volumes`.
    pub fn env(&self, container: &Value, ip: Ipv4Addr, volumes: &Path) -> Vec<(String, String)> {
        let mounts: Vec<(String, PathBuf)> = container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                (
                    m["mountPath"]
                        .as_str()
                        .unwrap()
                        .trim_end_matches('/')
                        .to_string(),
                    volumes.join(m["name"].as_str().unwrap()),
                )
            })
            .collect();
        let map_path = |value: &str| -> String {
            mounts
                .iter()
                .filter(|(mount, _)| value == mount || value.starts_with(&format!("{mount}/")))
                .max_by_key(|(mount, _)| mount.len())
                .map_or(value.to_string(), |(mount, dir)| {
                    format!("{}{}", dir.display(), &value[mount.len()..])
                })
        };
        container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                let name = e["name"].as_str().unwrap().to_string();
                let value = if let Some(v) = e["value"].as_str() {
                    map_path(v)
                } else if let Some(field) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    match field {
                        "metadata.name" => self.name().to_string(),
                        "metadata.namespace" => self.namespace().to_string(),
                        "spec.serviceAccountName" => self.service_account().to_string(),
                        "status.podIP" => ip.to_string(),
                        other => panic!("env {name}: fieldRef {other} not filled here"),
                    }
                } else {
                    panic!("env {name}: neither a value nor a fieldRef: {e}")
                };
                (name, value)
            })
            .collect()
    }

    /// Fills `dir` with one directory per volume of the pod, as the kubelet
    /// would: a projected service-account token holds `token`, ConfigMap
    /// `pylon-ca` holds the trust bundle `ca_pem`, an emptyDir is empty.
    /// Everything belongs to the sidecar's UID.
    pub fn make_volumes(&self, dir: &Path, token: &str, ca_pem: &str) {
        for volume in self.pod["spec"]["volumes"].as_array().into_iter().flatten() {
            let path = dir.join(volume["name"].as_str().unwrap());
            std::fs::create_dir_all(&path).unwrap();
            for source in volume["projected"]["sources"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if let Some(file) = source["serviceAccountToken"]["path"].as_str() {
                    std::fs::write(path.join(file), token).unwrap();
                }
            }
            if volume["configMap"]["name"] == "pylon-ca" {
                let keys: Vec<&str> = volume["configMap"]["items"]
                    .as_array()
                    .map(|items| items.iter().filter_map(|i| i["path"].as_str()).collect())
                    .unwrap_or_else(|| vec!["ca.pem"]);
                for key in keys {
                    std::fs::write(path.join(key), ca_pem).unwrap();
                }
            }
        }
        chown_tree(dir, PROXY_UID);
    }
}

/// Gives `path` and everything under it to `uid` (same GID).
fn chown_tree(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
    if path.is_dir() {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
        for entry in std::fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path(), uid);
        }
    }
}

/// A meshed pod: its namespace, what injection made of its manifest, its
/// apps and its sidecar.
pub struct MeshedPod {
    pub net: PodNet,
    pub injected: Injected,
    /// The kubelet's directories for this incarnation's volumes.
    volumes: Option<TempDir>,
    pub apps: Vec<Process>,
    pub sidecar: Option<Process>,
}

impl MeshedPod {
    /// Injects `manifest` (one Pod) and makes its network namespace; starts
    /// nothing.
    pub fn new(node: &Node, manifest: &str) -> MeshedPod {
        let injected = Injected::from_manifest(manifest);
        let net = node.pod(injected.name());
        MeshedPod {
            net,
            injected,
            volumes: None,
            apps: Vec::new(),
            sidecar: None,
        }
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.net.ip
    }

    pub fn identity(&self) -> String {
        spiffe_id(self.injected.service_account())
    }

    /// What the kubelet does before the containers start: fresh volumes
    /// (a new service-account token, the trust bundle, empty state) and the
    /// `pylon-init` container, `pylon init-iptables` with its arguments and
    /// environment, as root in the pod.
    pub fn init(&mut self, cp: &ControlPlane) {
        let volumes = TempDir::new(&format!("pods-{}", self.net.name));
        let token =
            cp.service_account_token(self.injected.namespace(), self.injected.service_account());
        let ca = std::fs::read_to_string(cp.ca_file()).unwrap();
        self.injected.make_volumes(volumes.path(), &token, &ca);
        let init = self.injected.init_container("pylon-init");
        let args = Injected::args(init);
        assert_eq!(
            args.first().map(String::as_str),
            Some("init-iptables"),
            "pylon-init args: {args:?}"
        );
        let out = self
            .net
            .ns
            .cmd(super::PYLON)
            .args(&args)
            .envs(self.injected.env(init, self.ip(), volumes.path()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pylon {args:?} in pod {}: {}\n{}",
            self.net.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        self.volumes = Some(volumes);
    }

    /// Starts a Python app in the pod and waits until it listens.
    pub fn start_app(&mut self, script: &str, args: &[&str]) {
        let app = self.net.start_app(script, args);
        self.apps.push(app);
    }

    /// Kills the pod's apps.
    pub fn stop_apps(&mut self) {
        self.apps.clear();
    }

    /// Starts `pylon proxy` as UID/GID 1337 with the injected `pylon`
    /// container's environment (and `extra` after it), and waits until
    /// `/ready` on the probe port answers 200 to the node.
    pub fn start_sidecar(&mut self, node: &Node, extra: &[(&str, &str)]) {
        assert!(self.sidecar.is_none(), "a sidecar runs already");
        let volumes = self.volumes.as_ref().expect("init() first");
        let container = self.injected.init_container("pylon");
        let args = Injected::args(container);
        let env = self.injected.env(container, self.ip(), volumes.path());
        let mut cmd = self.net.ns.cmd("setpriv");
        cmd.args([
            &format!("--reuid={PROXY_UID}"),
            &format!("--regid={PROXY_UID}"),
            "--clear-groups",
            "--",
            super::PYLON,
        ])
        .args(&args)
        .envs(env)
        .envs(extra.iter().copied());
        let mut sidecar = Process::spawn(cmd, &format!("sidecar of pod {}", self.net.name));
        eventually_blocking(format!("{} ready", sidecar.what), || {
            if node.probe(self.ip(), "/ready").status == 200 {
                return Ok(());
            }
            if let Some(status) = sidecar.exited() {
                panic!("{} exited ({status}):\n{}", sidecar.what, sidecar.logs());
            }
            Err(sidecar.logs())
        });
        self.sidecar = Some(sidecar);
    }

    /// SIGTERM to the sidecar; its exit status and how long it took.
    pub fn stop_sidecar(&mut self) -> (ExitStatus, Duration, String) {
        let mut sidecar = self.sidecar.take().expect("no sidecar");
        let (status, took) = sidecar.terminate();
        (status, took, sidecar.logs())
    }

    pub fn sidecar_logs(&self) -> String {
        self.sidecar.as_ref().map(Process::logs).unwrap_or_default()
    }

    /// Everything the pod's processes logged, for a failure message.
    pub fn all_logs(&self) -> String {
        let mut text = format!(
            "--- sidecar of {} ---\n{}\n",
            self.net.name,
            self.sidecar_logs()
        );
        for app in &self.apps {
            text.push_str(&format!("--- {} ---\n{}\n", app.what, app.logs()));
        }
        text
    }

    /// The sum of the samples of `/metrics` (read from the node on the probe
    /// port) named `family` whose labels contain every one of `labels`.
    pub fn metric(&self, node: &Node, family: &str, labels: &[&str]) -> f64 {
        let reply = node.probe(self.ip(), "/metrics");
        assert_eq!(reply.status, 200, "{reply:#?}");
        sum_samples(&reply.body, family, labels)
    }
}

/// A pod manifest: `containers` are YAML list items (already indented for
/// `spec.containers`), `annotations` extra `key: value` lines.
pub fn pod_manifest(
    name: &str,
    sa: &str,
    annotations: &[(&str, &str)],
    containers: &str,
) -> String {
    let mut notes = String::new();
    for (k, v) in annotations {
        notes.push_str(&format!("    {k}: {v:?}\n"));
    }
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
  labels:
    app: {name}
    pylon.dev/inject: enabled
  annotations:
    pylon.dev/log-level: \"info,pylon=debug\"
{notes}spec:
  serviceAccountName: {sa}
  containers:
{containers}"
    )
}

/// A long-running client app: `load_client.py` in a pod, driven over its
/// stdin and stdout.
pub struct LoadClient {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

/// Calls counted by a [`LoadClient`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub ok: u64,
    pub failed: u64,
    /// Successes by the pod that answered.
    pub by_pod: std::collections::BTreeMap<String, u64>,
}

impl Counts {
    /// Successes answered by `pod`.
    pub fn served_by(&self, pod: &str) -> u64 {
        self.by_pod.get(pod).copied().unwrap_or(0)
    }
}

impl LoadClient {
    pub fn start(pod: &PodNet, url: &str) -> LoadClient {
        let mut child = pod
            .python("load_client.py")
            .args(["--url", url])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let (tx, lines) = channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let mut err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            sink.lock().unwrap().push_str(&text);
        });
        LoadClient {
            child,
            stdin,
            lines,
            stderr,
        }
    }

    fn line(&self, prefix: &str) -> String {
        loop {
            let line = self.lines.recv_timeout(PATIENCE).unwrap_or_else(|_| {
                panic!(
                    "the load client said no {prefix}:\n{}",
                    self.stderr.lock().unwrap()
                )
            });
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.to_string();
            }
        }
    }

    fn parse(text: &str) -> Counts {
        let mut words = text.split_whitespace();
        let mut number = || words.next().unwrap().parse().unwrap();
        let (ok, failed) = (number(), number());
        let by_pod = text
            .split_whitespace()
            .skip(2)
            .map(|w| {
                let (pod, n) = w.split_once('=').unwrap();
                (pod.to_string(), n.parse().unwrap())
            })
            .collect();
        Counts { ok, failed, by_pod }
    }

    /// The counts so far.
    pub fn counts(&mut self) -> Counts {
        let stdin = self.stdin.as_mut().expect("stopped");
        stdin.write_all(b"counts\n").unwrap();
        stdin.flush().unwrap();
        Self::parse(&self.line("COUNTS "))
    }

    /// Waits until `done(counts)` holds, at most [`PATIENCE`]; those
    /// counts.
    pub fn wait_until(&mut self, what: &str, done: impl Fn(&Counts) -> bool) -> Counts {
        eventually_blocking(format_args!("{what}"), || {
            let now = self.counts();
            if done(&now) {
                Ok(now)
            } else {
                Err(format!("{now:?}"))
            }
        })
    }

    /// Waits until at least `n` more calls succeeded than in `since`.
    pub fn wait_successes(&mut self, since: &Counts, n: u64) -> Counts {
        let what = format!("{n} more successes than {since:?}");
        self.wait_until(&what, |now| now.ok >= since.ok + n)
    }

    /// Closes its stdin: the final counts and the failures it listed.
    pub fn stop(&mut self) -> (Counts, Vec<String>) {
        drop(self.stdin.take());
        let counts = Self::parse(&self.line("DONE "));
        let mut failures = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            if let Some(f) = line.strip_prefix("FAILURE ") {
                failures.push(f.to_string());
            }
        }
        (counts, failures)
    }
}

impl Drop for LoadClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
