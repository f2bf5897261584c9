//! Child processes whose stderr is drained into a log for their whole life
//! (so they never block on a full pipe, and a failing test can show what
//! they said), optionally started only once a readiness line appears;
//! killed on drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{PATIENCE, eventually, eventually_blocking};

/// A child process and its stderr lines; killed on drop.
pub struct Process {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    /// What it is, for messages.
    pub what: String,
}

impl Process {
    /// Starts `cmd` (stdin and stdout closed), its stderr drained into the
    /// log; waits for nothing.
    pub fn spawn(cmd: Command, what: &str) -> Process {
        Self::start(cmd, what, None)
            .unwrap_or_else(|e| panic!("{e:#}"))
            .0
    }

    /// Starts `cmd` and waits for the first stderr line containing
    /// `marker`: the process and that line. Panics with the log if the line
    /// does not come within [`PATIENCE`].
    pub fn spawn_until(cmd: Command, marker: &str, what: &str) -> (Process, String) {
        match Self::start(cmd, what, Some(marker)) {
            Ok((process, line)) => (process, line.unwrap_or_default()),
            Err(e) => panic!("{e:#}"),
        }
    }

    /// [`Process::spawn_until`] for callers that report errors rather than
    /// panic (the benchmarks).
    pub fn try_spawn_until(
        cmd: Command,
        marker: &str,
        what: &str,
    ) -> anyhow::Result<(Process, String)> {
        let (process, line) = Self::start(cmd, what, Some(marker))?;
        Ok((process, line.unwrap_or_default()))
    }

    fn start(
        mut cmd: Command,
        what: &str,
        marker: Option<&str>,
    ) -> anyhow::Result<(Process, Option<String>)> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {what}"))?;
        let Some(stderr) = child.stderr.take() else {
            bail!("{what} has no stderr pipe");
        };
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (found, found_line) = mpsc::channel();
        let sink = logs.clone();
        let waits = marker.is_some();
        let marker = marker.map(str::to_string);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if marker.as_deref().is_some_and(|m| line.contains(m)) {
                    let _ = found.send(line.clone());
                }
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(line);
            }
        });
        let process = Process {
            child,
            logs,
            what: what.to_string(),
        };
        if !waits {
            return Ok((process, None));
        }
        match found_line.recv_timeout(PATIENCE) {
            Ok(line) => Ok((process, Some(line))),
            // Dropping the process kills it.
            Err(_) => bail!("{what} did not start:\n{}", process.logs()),
        }
    }

    /// Everything it has logged so far.
    pub fn logs(&self) -> String {
        self.logs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .join("\n")
    }

    /// Waits until a log line contains `needle`, colour sequences removed
    /// (lines are read by a thread, so one written just now may not be
    /// there yet).
    pub async fn wait_log(&self, needle: &str) {
        eventually(
            format_args!("a log line of {} with {needle:?}", self.what),
            async || {
                strip_ansi(&self.logs())
                    .contains(needle)
                    .then_some(())
                    .ok_or_else(|| self.logs())
            },
        )
        .await;
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits for it to exit, however long that takes.
    pub fn wait_exit(&mut self) -> ExitStatus {
        self.child.wait().unwrap()
    }

    /// SIGTERM, then waits for the exit, at most [`PATIENCE`]: the status
    /// and how long it took.
    pub fn terminate(&mut self) -> (ExitStatus, Duration) {
        let sent = Instant::now();
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "cannot signal {}", self.what);
        let what = format!("{} exits after SIGTERM", self.what);
        let status = eventually_blocking(what, || self.exited().ok_or_else(|| self.logs()));
        (status, sent.elapsed())
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
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
