//! A `pylon-control serve` process and its CLI, for the control-plane tests.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use super::PATIENCE;

pub const CONTROL_BIN: &str = env!("CARGO_BIN_EXE_pylon-control");

/// A control plane process; killed on drop.
pub struct ControlProc {
    child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    logs: Arc<Mutex<Vec<String>>>,
}

impl ControlProc {
    /// Starts `pylon-control serve` on a free port with `data_dir`.
    pub fn spawn(data_dir: &Path) -> ControlProc {
        Self::spawn_at(data_dir, "127.0.0.1:0".parse().unwrap())
    }

    /// Starts it on `listen` (to restart one where sidecars expect it).
    pub fn spawn_at(data_dir: &Path, listen: SocketAddr) -> ControlProc {
        Self::spawn_with(data_dir, listen, &[])
    }

    /// Starts it with more `serve` arguments.
    pub fn spawn_with(data_dir: &Path, listen: SocketAddr, extra: &[&str]) -> ControlProc {
        let mut cmd = Command::new(CONTROL_BIN);
        cmd.args(["serve", "--trust-domain", "pylon.test", "--data-dir"])
            .arg(data_dir)
            .arg("--listen")
            .arg(listen.to_string())
            .args(extra)
            .env("PYLON_LOG", "info,pylon_control=debug");
        let (child, logs, line) = super::spawn_logged(cmd, "listening address=", "pylon-control");
        let start = line.find("address=").unwrap() + "address=".len();
        let addr = line[start..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        ControlProc {
            child,
            addr,
            data_dir: data_dir.to_path_buf(),
            logs,
        }
    }

    pub fn address(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn ca_file(&self) -> PathBuf {
        self.data_dir.join("ca.pem")
    }

    /// Runs a CLI command against this control plane.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_stdin(args, None)
    }

    pub fn cli_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(CONTROL_BIN)
            .args(args)
            .env("PYLON_CONTROL_SERVER", self.address())
            .env(
                "PYLON_CONTROL_TOKEN_FILE",
                self.data_dir.join("admin.token"),
            )
            .env("PYLON_CONTROL_CA_FILE", self.ca_file())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    }

    /// `apply -f -` with `yaml`; panics unless it succeeds.
    pub fn apply(&self, yaml: &str) -> String {
        let out = self.cli_with_stdin(&["apply", "-f", "-"], Some(yaml));
        assert!(
            out.status.success(),
            "apply failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// A bootstrap token for `identity`, written to `dir/<name>.token`.
    pub fn token_file(&self, dir: &Path, name: &str, identity: &str) -> PathBuf {
        let out = self.cli(&["token", "create", "--identity", identity]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = dir.join(format!("{name}.token"));
        std::fs::write(&path, &out.stdout).unwrap();
        path
    }

    /// The policy version and `(identity, acked version, last NACK)` of each
    /// connected sidecar, from `status`.
    pub fn status(&self) -> (u64, Vec<(String, u64, String)>) {
        let out = self.cli(&["status"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut lines = text.lines();
        let version = lines
            .next()
            .and_then(|l| l.strip_prefix("policy version "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no version in {text:?}"));
        let sidecars = lines
            .skip_while(|l| !l.starts_with("IDENTITY"))
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let mut cols = l.split_whitespace();
                let identity = cols.next().unwrap().to_string();
                let _address = cols.next();
                let acked = cols.next().unwrap().parse().unwrap();
                let nack = cols.collect::<Vec<_>>().join(" ");
                (identity, acked, nack)
            })
            .collect();
        (version, sidecars)
    }

    /// Waits until every sidecar in `identities` has acknowledged `version`.
    pub async fn wait_acked(&self, identities: &[&str], version: u64) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let (_, sidecars) = self.status();
            let all = identities.iter().all(|id| {
                sidecars
                    .iter()
                    .any(|(i, acked, _)| i == id && *acked == version)
            });
            if all {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "version {version} not acknowledged by {identities:?}: {sidecars:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }

    /// The `webhook=` address of the `listening` line (logged by the time
    /// `spawn_with` returns, but maybe not yet in the captured log).
    pub fn webhook_address(&self) -> String {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let logs = self.logs();
            if let Some(line) = logs.lines().find(|l| l.contains("listening address=")) {
                return line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("webhook="))
                    .unwrap_or_else(|| panic!("no webhook address in {line:?}"))
                    .to_string();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no listening line:\n{logs}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ControlProc {
    fn drop(&mut self) {
        self.kill9();
    }
}
