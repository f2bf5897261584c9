//! A `pylon-control serve` process and its CLI; the bootstrap configs of
//! sidecars it feeds.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use pylon::identity::dev::IdentityFiles;

use crate::process::{Process, field};
use crate::sidecar::sidecar_config;
use crate::{eventually, eventually_blocking};

/// A control plane process; killed on drop.
pub struct ControlProc {
    process: Process,
    /// The `pylon-control` binary, for the CLI.
    bin: String,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
}

impl ControlProc {
    /// Starts `bin serve` on a free port with `data_dir`.
    pub fn spawn(bin: &str, data_dir: &Path) -> ControlProc {
        Self::spawn_at(bin, data_dir, "127.0.0.1:0".parse().unwrap())
    }

    /// Starts it on `listen` (to restart one where sidecars expect it).
    pub fn spawn_at(bin: &str, data_dir: &Path, listen: SocketAddr) -> ControlProc {
        Self::spawn_with(bin, data_dir, listen, &[])
    }

    /// Starts it with more `serve` arguments, trust domain `pylon.test`.
    pub fn spawn_with(
        bin: &str,
        data_dir: &Path,
        listen: SocketAddr,
        extra: &[&str],
    ) -> ControlProc {
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--trust-domain", "pylon.test", "--data-dir"])
            .arg(data_dir)
            .arg("--listen")
            .arg(listen.to_string())
            .args(extra)
            .env("PYLON_LOG", "info,pylon_control=debug");
        Self::try_spawn_command(bin, cmd, data_dir).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Starts a prepared `bin serve` command line whose data directory is
    /// `data_dir`, once it logs its address.
    pub fn try_spawn_command(
        bin: &str,
        cmd: Command,
        data_dir: &Path,
    ) -> anyhow::Result<ControlProc> {
        let (process, line) = Process::try_spawn_until(cmd, "listening address=", "pylon-control")?;
        Ok(ControlProc {
            addr: field(&line, "address")?,
            bin: bin.to_string(),
            data_dir: data_dir.to_path_buf(),
            process,
        })
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
        let mut child = Command::new(&self.bin)
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
        crate::write_secret(&path, &out.stdout);
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
        eventually(
            format_args!("version {version} acknowledged by {identities:?}"),
            async || {
                let (_, sidecars) = self.status();
                let all = identities.iter().all(|id| {
                    sidecars
                        .iter()
                        .any(|(i, acked, _)| i == id && *acked == version)
                });
                if all {
                    Ok(())
                } else {
                    Err(format!("{sidecars:?}\n{}", self.logs()))
                }
            },
        )
        .await;
    }

    /// The `webhook=` address of the `listening` line (logged by the time
    /// `spawn_with` returns, but maybe not yet in the captured log).
    pub fn webhook_address(&self) -> String {
        let line = eventually_blocking("the listening line of pylon-control", || {
            let logs = self.logs();
            logs.lines()
                .find(|l| l.contains("listening address="))
                .map(str::to_string)
                .ok_or(logs)
        });
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("webhook="))
            .unwrap_or_else(|| panic!("no webhook address in {line:?}"))
            .to_string()
    }

    pub fn logs(&self) -> String {
        self.process.logs()
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        self.process.kill9();
    }
}

/// A sidecar config whose identity and policy both come from the control
/// plane `cp`, bootstrapped with the token in `token`.
pub fn cp_config(cp: &ControlProc, token: &Path, state: &Path, app: SocketAddr) -> String {
    format!(
        "admin: {{ listen: \"127.0.0.1:0\", probeListen: \"127.0.0.1:0\" }}
outbound: {{ listen: \"127.0.0.1:0\" }}
inbound: {{ listen: \"127.0.0.1:0\", app: \"{app}\" }}
identity:
  controlPlane: {{ tokenFile: {token:?} }}
policy:
  controlPlane: {{}}
controlPlane: {{ address: \"{}\", caFile: {:?} }}
stateDir: {state:?}
",
        cp.address(),
        cp.ca_file()
    )
}

/// A sidecar config whose identity comes from files and whose policy comes
/// from the control plane `cp`; `extra` is appended as is.
pub fn cp_policy_config(
    id: &IdentityFiles,
    cp: &ControlProc,
    token: &Path,
    state_dir: &Path,
    app: SocketAddr,
    extra: &str,
) -> String {
    let unused_policy = Path::new("/nonexistent");
    sidecar_config(id, unused_policy, app).replace(
        &format!("policy:\n  file: {unused_policy:?}\n"),
        "policy:\n  controlPlane: {}\n",
    ) + &format!(
        "controlPlane: {{ address: \"{}\", caFile: {:?}, tokenFile: {:?} }}\nstateDir: {:?}\n{extra}",
        cp.address(),
        cp.ca_file(),
        token,
        state_dir
    )
}
