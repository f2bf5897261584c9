//! Shared test helpers: temporary directories, certificates, sidecar
//! processes, a two-sidecar mesh, and small HTTP clients.
//!
//! Shared by several test crates, each of which uses only part of it.
#![allow(dead_code)]

pub mod chaos;
pub mod control;
pub mod echo;
pub mod http;
pub mod issuer;
pub mod k8s;
pub mod netns;
pub mod otlp;
pub mod pods;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pylon::identity::dev::{DevCa, IdentityFiles};

pub const TRUST_DOMAIN: &str = "pylon.test";
pub const CLIENT_ID: &str = "spiffe://pylon.test/ns/default/sa/client";
pub const SERVER_ID: &str = "spiffe://pylon.test/ns/default/sa/echo";

/// How long a test waits for something that should happen promptly. Only a
/// bound against hanging forever, never a measure of speed.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pylon-e2e-{label}-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `contents` to `path` atomically (write a sibling, then rename), as
/// config management tools do.
pub fn write_atomic(path: &Path, contents: &str) {
    let tmp = path.with_extension(format!("tmp{}", fastrand::u32(..)));
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The bootstrap config of a sidecar whose listeners all take free ports.
pub fn sidecar_config(id: &IdentityFiles, policy: &Path, app: SocketAddr) -> String {
    format!(
        "admin: {{ listen: \"127.0.0.1:0\", probeListen: \"127.0.0.1:0\" }}
outbound: {{ listen: \"127.0.0.1:0\" }}
inbound: {{ listen: \"127.0.0.1:0\", app: \"{app}\" }}
identity:
  files: {{ cert: {:?}, key: {:?}, trustBundle: {:?} }}
policy:
  file: {:?}
",
        id.cert, id.key, id.trust_bundle, policy
    )
}

/// Starts `cmd` with its stderr drained into a log by a thread, and waits
/// for the first line containing `marker`: the child, its log, that line.
/// Panics with the log if the line does not come.
pub fn spawn_logged(
    mut cmd: Command,
    marker: &'static str,
    what: &str,
) -> (Child, Arc<Mutex<Vec<String>>>, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let stderr = child.stderr.take().unwrap();
    let logs = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = logs.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains(marker) {
                let _ = tx.send(line.clone());
            }
            sink.lock().unwrap().push(line);
        }
    });
    match rx.recv_timeout(PATIENCE) {
        Ok(line) => (child, logs, line),
        Err(_) => {
            let _ = child.kill();
            panic!("{what} did not start:\n{}", logs.lock().unwrap().join("\n"));
        }
    }
}

/// `line` without its terminal colour sequences.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A `pylon proxy` process; killed on drop.
pub struct SidecarProc {
    child: Child,
    pub admin: SocketAddr,
    /// The read-only probe listener (`admin.probeListen`).
    pub probe: SocketAddr,
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

impl SidecarProc {
    /// Starts `pylon proxy --config <config>` and waits until its listeners
    /// are bound (the process logs their addresses).
    pub fn spawn(config: &Path) -> SidecarProc {
        Self::spawn_with_env(config, &[])
    }

    pub fn spawn_with_env(config: &Path, env: &[(&str, &str)]) -> SidecarProc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pylon"));
        cmd.arg("proxy").arg("--config").arg(config);
        Self::spawn_cmd(cmd, env)
    }

    /// Starts `pylon proxy` configured by the environment alone.
    pub fn spawn_without_config(env: &[(&str, &str)]) -> SidecarProc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pylon"));
        cmd.arg("proxy").env_remove("PYLON_CONFIG");
        Self::spawn_cmd(cmd, env)
    }

    /// Starts a prepared command line that runs `pylon proxy`.
    pub fn spawn_command(cmd: Command) -> SidecarProc {
        Self::spawn_cmd(cmd, &[])
    }

    fn spawn_cmd(mut cmd: Command, env: &[(&str, &str)]) -> SidecarProc {
        // The test's own environment comes last, so that it may set
        // PYLON_LOG too.
        cmd.env("PYLON_LOG", "info,pylon=debug")
            .envs(env.iter().copied());
        let (child, logs, line) = spawn_logged(cmd, "listening admin=", "sidecar");
        let field = |name: &str| -> SocketAddr {
            let start = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
            line[start..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        SidecarProc {
            admin: field("admin"),
            probe: field("probe"),
            outbound: field("outbound"),
            inbound: field("inbound"),
            child,
            logs,
        }
    }

    /// Waits for `/ready` to answer 200.
    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Ok((200, _)) = admin_get(self.admin, "/ready").await {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("sidecar never became ready:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The `/config` dump.
    pub async fn config(&self) -> serde_json::Value {
        let (status, body) = admin_get(self.admin, "/config").await.unwrap();
        assert_eq!(status, 200);
        serde_json::from_str(&body).unwrap()
    }

    /// Waits until the installed policy version is `version`.
    pub async fn wait_policy_version(&self, version: &str) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let c = self.config().await;
            if c["policy"]["version"] == version {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "policy {version} never installed; config: {c:#}\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the sidecar has rejected policy version `version`.
    pub async fn wait_policy_rejected(&self, version: &str) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let c = self.config().await;
            if c["policy"]["lastRejectedVersion"] == version {
                return c;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "policy {version} never rejected; config: {c:#}\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The value of one sample of `/metrics` (`name` or `name{labels}`), 0
    /// if absent.
    pub async fn metric(&self, sample: &str) -> u64 {
        let (status, text) = admin_get(self.admin, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        text.lines()
            .find_map(|l| {
                l.strip_prefix(sample)
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .map_or(0, |v| v as u64)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Waits until a log line contains `needle` (lines are read by a
    /// thread, so one written just now may not be there yet).
    pub async fn wait_log(&self, needle: &str) {
        let deadline = std::time::Instant::now() + PATIENCE;
        while !strip_ansi(&self.logs()).contains(needle) {
            assert!(
                std::time::Instant::now() < deadline,
                "no log line with {needle:?}:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }
}

impl Drop for SidecarProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` on an admin address; returns status and body.
pub async fn admin_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    admin_request(addr, "GET", path).await
}

pub async fn admin_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("{method} {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\ncontent-length: 0\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A Backend document with static endpoints; mTLS to peers proving
/// `identity` when one is given, plaintext otherwise.
pub fn backend_yaml(name: &str, endpoints: &[String], identity: Option<&str>) -> String {
    let tls = identity.map_or(String::new(), |id| {
        format!("  tls: {{ mode: mesh, identity: \"{id}\" }}\n")
    });
    format!(
        "apiVersion: pylon.dev/v1
kind: Backend
metadata: {{ name: {name} }}
spec:
  endpoints: {{ static: {endpoints:?} }}
{tls}---
"
    )
}

/// A GRPCRoute or HTTPRoute document sending `hostname` to weighted backends.
pub fn route_yaml(kind: &str, name: &str, hostname: &str, backends: &[(&str, u32)]) -> String {
    let refs: Vec<String> = backends
        .iter()
        .map(|(b, w)| format!("{{ name: {b}, weight: {w} }}"))
        .collect();
    format!(
        "apiVersion: pylon.dev/v1
kind: {kind}
metadata: {{ name: {name} }}
spec:
  hostnames: [\"{hostname}\"]
  rules:
    - backendRefs: [{}]
---
",
        refs.join(", ")
    )
}

/// The policy the client sidecar of a [`Mesh`] starts with: `echo.test`
/// (gRPC) and `web.test` (HTTP) both go to the app behind the server
/// sidecar, over mTLS.
pub fn mesh_policy(server_inbound: SocketAddr) -> String {
    backend_yaml("app", &[server_inbound.to_string()], Some(SERVER_ID))
        + &route_yaml("GRPCRoute", "echo", "echo.test", &[("app", 1)])
        + &route_yaml("HTTPRoute", "web", "web.test", &[("app", 1)])
}

/// Starts a sidecar in front of `app` with identity `id` and an empty
/// policy of its own.
pub fn server_sidecar(
    ca: &DevCa,
    dir: &Path,
    name: &str,
    id: &str,
    app: SocketAddr,
) -> SidecarProc {
    let files = ca.write_identity(dir, name, id).unwrap();
    let policy = dir.join(format!("{name}-policy.yaml"));
    std::fs::write(&policy, "").unwrap();
    let cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(&cfg, sidecar_config(&files, &policy, app)).unwrap();
    SidecarProc::spawn(&cfg)
}

/// Starts a client-side sidecar (identity [`CLIENT_ID`]) with `policy`;
/// returns it and its policy file.
pub fn client_sidecar(ca: &DevCa, dir: &Path, policy: &str) -> (SidecarProc, PathBuf) {
    client_sidecar_as(ca, dir, "client", CLIENT_ID, policy)
}

/// Starts a client-side sidecar with identity `id` and `policy`, its files
/// in `dir` named after `name`; returns it and its policy file.
pub fn client_sidecar_as(
    ca: &DevCa,
    dir: &Path,
    name: &str,
    id: &str,
    policy: &str,
) -> (SidecarProc, PathBuf) {
    let files = ca.write_identity(dir, name, id).unwrap();
    let policy_path = dir.join(format!("{name}-policy.yaml"));
    std::fs::write(&policy_path, policy).unwrap();
    let unused_app: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(&cfg, sidecar_config(&files, &policy_path, unused_app)).unwrap();
    (SidecarProc::spawn(&cfg), policy_path)
}

/// Two sidecars with mTLS between them: `client` (outbound side) and
/// `server` (inbound side, in front of `app`).
pub struct Mesh {
    pub dir: TempDir,
    pub ca: DevCa,
    pub client: SidecarProc,
    pub server: SidecarProc,
    /// The client sidecar's policy file.
    pub policy: PathBuf,
}

impl Mesh {
    pub async fn start(app: SocketAddr) -> Mesh {
        Self::start_with(app, mesh_policy).await
    }

    /// Starts the mesh with the client's policy made from the server
    /// sidecar's inbound address.
    pub async fn start_with(app: SocketAddr, policy: impl Fn(SocketAddr) -> String) -> Mesh {
        let dir = TempDir::new("mesh");
        let ca = DevCa::new("pylon test root").unwrap();
        let server = server_sidecar(&ca, dir.path(), "server", SERVER_ID, app);
        let (client, policy) = client_sidecar(&ca, dir.path(), &policy(server.inbound));
        server.wait_ready().await;
        client.wait_ready().await;
        Mesh {
            dir,
            ca,
            client,
            server,
            policy,
        }
    }

    /// Rewrites the client's policy and waits until it is installed.
    pub async fn set_policy(&self, yaml: &str) {
        set_policy(&self.client, &self.policy, yaml).await;
    }
}

/// Rewrites a sidecar's policy file and waits until it is installed.
pub async fn set_policy(sidecar: &SidecarProc, path: &Path, yaml: &str) {
    write_atomic(path, yaml);
    sidecar
        .wait_policy_version(&pylon::policy::content_version(yaml.as_bytes()))
        .await;
}
