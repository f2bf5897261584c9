//! A `pylon proxy` process: started once it logs the addresses it bound,
//! with the admin calls tests make of it; and its bootstrap config.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, ExitStatus};

use pylon::identity::dev::IdentityFiles;

use crate::admin::{admin_get, sample};
use crate::process::{Process, field};
use crate::{POLL, poll_until, write_atomic};

/// `PYLON_LOG` unless the command or the caller's environment sets one.
const DEFAULT_LOG: &str = "info,pylon=debug";

/// A `pylon proxy` process; killed on drop.
pub struct SidecarProc {
    process: Process,
    pub admin: SocketAddr,
    /// The read-only probe listener (`admin.probeListen`).
    pub probe: SocketAddr,
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
}

impl SidecarProc {
    /// Starts `bin proxy --config <config>` and waits until its listeners
    /// are bound (the process logs their addresses).
    pub fn spawn(bin: &str, config: &Path) -> SidecarProc {
        Self::spawn_with_env(bin, config, &[])
    }

    pub fn spawn_with_env(bin: &str, config: &Path, env: &[(&str, &str)]) -> SidecarProc {
        let mut cmd = Command::new(bin);
        cmd.arg("proxy").arg("--config").arg(config);
        cmd.envs(env.iter().copied());
        Self::spawn_command(cmd)
    }

    /// Starts `bin proxy` configured by the environment alone.
    pub fn spawn_without_config(bin: &str, env: &[(&str, &str)]) -> SidecarProc {
        let mut cmd = Command::new(bin);
        cmd.arg("proxy").env_remove("PYLON_CONFIG");
        cmd.envs(env.iter().copied());
        Self::spawn_command(cmd)
    }

    /// Starts a prepared command line that runs `pylon proxy`.
    pub fn spawn_command(cmd: Command) -> SidecarProc {
        Self::try_spawn_command(cmd, "sidecar").unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// [`SidecarProc::spawn_command`] for callers that report errors rather
    /// than panic (the benchmarks); `what` names it in messages.
    pub fn try_spawn_command(mut cmd: Command, what: &str) -> anyhow::Result<SidecarProc> {
        if !cmd.get_envs().any(|(k, _)| k == "PYLON_LOG") {
            cmd.env("PYLON_LOG", DEFAULT_LOG);
        }
        let (process, line) = Process::try_spawn_until(cmd, "listening admin=", what)?;
        Ok(SidecarProc {
            admin: field(&line, "admin")?,
            probe: field(&line, "probe")?,
            outbound: field(&line, "outbound")?,
            inbound: field(&line, "inbound")?,
            process,
        })
    }

    /// Waits for `/ready` to answer 200.
    pub async fn wait_ready(&self) {
        let ready = async || matches!(admin_get(self.admin, "/ready").await, Ok((200, _)));
        if let Err(gave_up) = poll_until(POLL, ready).await {
            panic!(
                "{} never became ready{gave_up}:\n{}",
                self.process.what,
                self.logs()
            );
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
        self.wait_config(&format!("policy {version} installed"), |c| {
            c["policy"]["version"] == version
        })
        .await;
    }

    /// Waits until the sidecar has rejected policy version `version`.
    pub async fn wait_policy_rejected(&self, version: &str) -> serde_json::Value {
        self.wait_config(&format!("policy {version} rejected"), |c| {
            c["policy"]["lastRejectedVersion"] == version
        })
        .await
    }

    /// Waits until the `/config` dump satisfies `done`; that dump.
    async fn wait_config(
        &self,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let look = async || {
            let c = self.config().await;
            if done(&c) {
                Ok(c)
            } else {
                Err(format!("config: {c:#}"))
            }
        };
        match poll_until(POLL, look).await {
            Ok(c) => c,
            Err(gave_up) => panic!("never: {what}{gave_up}\n{}", self.logs()),
        }
    }

    /// The value of one sample of `/metrics` (`name` or `name{labels}`), 0
    /// if absent.
    pub async fn metric(&self, name: &str) -> u64 {
        let (status, text) = admin_get(self.admin, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        sample(&text, name)
    }

    pub fn logs(&self) -> String {
        self.process.logs()
    }

    /// Waits until a log line contains `needle`.
    pub async fn wait_log(&self, needle: &str) {
        self.process.wait_log(needle).await;
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn wait_exit(&mut self) -> ExitStatus {
        self.process.wait_exit()
    }
}

/// Rewrites a sidecar's policy file and waits until it is installed.
pub async fn set_policy(sidecar: &SidecarProc, path: &Path, yaml: &str) {
    write_atomic(path, yaml);
    sidecar
        .wait_policy_version(&pylon::policy::content_version(yaml.as_bytes()))
        .await;
}

/// The bootstrap config of a sidecar whose listeners all take free loopback
/// ports, its identity from files and its policy from the file `policy`.
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
