//! What the benchmarks share: child processes (`pylon proxy`,
//! `pylon-control serve`) whose stderr is drained for their life, started
//! once they log their readiness line, killed on drop; and a tiny admin
//! client.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use anyhow::{Context, bail};
use pylon::admin::BoundAddrs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// How long a process may take to start and become ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
pub const READY_POLL: Duration = Duration::from_millis(20);
/// Log lines kept per process, shown when it fails.
const LOG_TAIL: usize = 50;

/// A child process with its last log lines; killed on drop.
pub struct Logged {
    pub child: Child,
    log_tail: Arc<Mutex<VecDeque<String>>>,
}

impl Logged {
    /// Starts `cmd` (stderr piped, drained by a thread) and waits for the
    /// first stderr line containing `marker`, which it returns. Blocking.
    pub fn spawn(mut cmd: Command, what: &str, marker: &str) -> anyhow::Result<(Logged, String)> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        let Some(stderr) = child.stderr.take() else {
            bail!("{what} has no stderr pipe");
        };
        let log_tail = Arc::new(Mutex::new(VecDeque::with_capacity(LOG_TAIL)));
        let (found, found_line) = mpsc::channel();
        let tail = log_tail.clone();
        let marker = marker.to_string();
        // Drains stderr for the life of the process, so that it never blocks
        // on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains(&marker) {
                    let _ = found.send(line.clone());
                }
                let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
                if tail.len() == LOG_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        let process = Logged { child, log_tail };
        match found_line.recv_timeout(START_TIMEOUT) {
            Ok(line) => Ok((process, line)),
            Err(_) => bail!(
                "{what} did not log {:?} in time:\n{}",
                process.marker_hint(),
                process.recent_logs()
            ),
        }
    }

    fn marker_hint(&self) -> &'static str {
        "its readiness line"
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its last log lines.
    pub fn recent_logs(&self) -> String {
        let lines = self.log_tail.lock().unwrap_or_else(|e| e.into_inner());
        Vec::from(lines.clone()).join("\n")
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `pylon proxy` process; killed on drop.
pub struct SidecarProcess {
    pub name: &'static str,
    pub addrs: BoundAddrs,
    process: Logged,
}

impl SidecarProcess {
    /// Starts `pylon proxy --config <config>` and waits until it has logged
    /// its bound addresses. Blocking.
    pub fn spawn(name: &'static str, config: &Path) -> anyhow::Result<SidecarProcess> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pylon"));
        cmd.arg("proxy")
            .arg("--config")
            .arg(config)
            // Warnings, plus the line that reports the bound addresses.
            .env("PYLON_LOG", "warn,pylon::sidecar=info");
        let (process, line) =
            Logged::spawn(cmd, &format!("the {name} sidecar"), "listening admin=")?;
        Ok(SidecarProcess {
            name,
            addrs: parse_listening(&line)?,
            process,
        })
    }

    /// Waits until `GET /ready` answers 200.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut poll = tokio::time::interval(READY_POLL);
        loop {
            poll.tick().await;
            if let Ok(200) = admin_status(self.addrs.admin, "/ready").await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the {} sidecar never became ready:\n{}",
                    self.name,
                    self.recent_logs()
                );
            }
        }
    }

    pub fn recent_logs(&self) -> String {
        self.process.recent_logs()
    }
}

/// The addresses in `listening admin=A outbound=B inbound=C app=D`.
fn parse_listening(line: &str) -> anyhow::Result<BoundAddrs> {
    Ok(BoundAddrs {
        admin: field(line, "admin")?,
        outbound: field(line, "outbound")?,
        inbound: field(line, "inbound")?,
    })
}

/// The address after `key=` in a log line.
pub fn field(line: &str, key: &str) -> anyhow::Result<SocketAddr> {
    let start = line
        .find(&format!("{key}="))
        .with_context(|| format!("no {key}= in {line:?}"))?
        + key.len()
        + 1;
    let value = line[start..].split_whitespace().next().unwrap_or_default();
    value
        .parse()
        .with_context(|| format!("{key}={value:?} in {line:?}"))
}

/// `GET path` on an admin address: the status and the body.
pub async fn admin_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut response = Vec::new();
    s.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
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

/// The HTTP status of `GET path` on an admin address.
pub async fn admin_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    Ok(admin_get(addr, path).await?.0)
}
