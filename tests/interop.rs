//! Interop with an independent gRPC implementation: Python `grpcio` plays
//! both applications of a two-sidecar mesh, with mTLS between the sidecars.
//!
//! The cases live in `tests/python/interop.py`; this test provisions a Python
//! with grpcio, starts the Python server behind the server sidecar, runs the
//! Python client through the client sidecar and checks that every case
//! passed. It does not test pylon against itself or against tonic: that is
//! the `e2e` target's job.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "e2e/common/mod.rs"]
mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{CLIENT_ID, Mesh, PATIENCE};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/interop.py");

/// Every case the Python client must report as `PASS`, listed here so that a
/// case the script skips or loses fails the test.
const CASES: &[&str] = &[
    "unary",
    "empty_message",
    "client_streaming",
    "server_streaming",
    "bidi_streaming_interleaved",
    "metadata_both_ways",
    "peer_identity",
    "error_statuses",
    "error_trailers_only",
    "error_after_stream_messages",
    "deadline_exceeded",
    "cancel_server_stream",
    "large_message_each_way",
    "no_route",
];

/// A bound on the whole client run (every call in it has its own deadline).
const CLIENT_RUN_LIMIT: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_client_and_server_through_the_mesh() {
    let python = Python::with_grpcio();
    let app = PyServer::start(&python);
    let mesh = Mesh::start(app.addr).await;

    let target = mesh.client.outbound;
    let client_python = python.clone();
    let run = tokio::task::spawn_blocking(move || run_client(&client_python, target))
        .await
        .unwrap();

    let passed: Vec<&str> = run
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("PASS "))
        .collect();
    let missing: Vec<&str> = CASES
        .iter()
        .copied()
        .filter(|c| !passed.contains(c))
        .collect();
    let failures: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("FAIL "))
        .collect();
    if !run.success || !missing.is_empty() || !failures.is_empty() {
        panic!(
            "python client: {}; cases not passed: {missing:?}\n\
             --- client stdout ---\n{}\n--- client stderr ---\n{}\n\
             --- server app stderr ---\n{}\n\
             --- client sidecar ---\n{}\n--- server sidecar ---\n{}",
            run.status,
            run.stdout,
            run.stderr,
            app.stderr(),
            mesh.client.logs(),
            mesh.server.logs(),
        );
    }
    println!("python client through the mesh:\n{}", run.stdout);
}

/// What a run of the Python client printed and how it ended.
struct ClientRun {
    success: bool,
    status: String,
    stdout: String,
    stderr: String,
}

/// Runs every case of the Python client against the client sidecar's
/// outbound listener, killing it if it outlives [`CLIENT_RUN_LIMIT`].
fn run_client(python: &Python, outbound: SocketAddr) -> ClientRun {
    let mut child = python
        .command()
        .arg(SCRIPT)
        .arg("client")
        .args(["--target", &outbound.to_string()])
        .args(["--authority", "echo.test"])
        .args(["--peer-identity", CLIENT_ID])
        .args(["--no-route-authority", "nowhere.test"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the python client");
    let stdout = collect(child.stdout.take().unwrap());
    let stderr = collect(child.stderr.take().unwrap());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > CLIENT_RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    ClientRun {
        success: status.is_some_and(|s| s.success()),
        status: status.map_or_else(
            || format!("killed after {CLIENT_RUN_LIMIT:?}"),
            |s| s.to_string(),
        ),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Reads a pipe to its end on a thread.
fn collect(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// The Python server application; it exits when its stdin closes, and is
/// killed on drop in any case.
struct PyServer {
    child: Child,
    stdin: Option<ChildStdin>,
    addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
}

impl PyServer {
    /// Starts `interop.py server --port 0` and reads its `LISTENING <port>`.
    fn start(python: &Python) -> PyServer {
        let mut child = python
            .command()
            .arg(SCRIPT)
            .args(["server", "--port", "0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the python server");
        let stdin = child.stdin.take();
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let mut pipe = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            let mut line = String::new();
            while pipe.read_line(&mut line).is_ok_and(|n| n > 0) {
                sink.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { break };
                if let Some(port) = line.strip_prefix("LISTENING ") {
                    let _ = tx.send(port.trim().parse::<u16>());
                }
            }
        });
        let mut server = PyServer {
            child,
            stdin,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stderr,
        };
        match rx.recv_timeout(PATIENCE) {
            Ok(Ok(port)) => server.addr.set_port(port),
            other => panic!(
                "python server did not start ({other:?}):\n{}",
                server.stderr()
            ),
        }
        server
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Python interpreter that can `import grpc`, with the `PYTHONPATH` it
/// needs for that.
#[derive(Clone, Debug)]
struct Python {
    exe: PathBuf,
    path: Option<PathBuf>,
}

impl Python {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.exe);
        if let Some(path) = &self.path {
            cmd.env("PYTHONPATH", path);
        }
        cmd
    }

    fn has_grpcio(&self) -> bool {
        self.command()
            .args(["-c", "import grpc"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `python3` if it has grpcio; otherwise a venv under the target
    /// directory with grpcio installed from PyPI (made once, under a lock
    /// file so that concurrent test runs do not race), or, where `venv`
    /// is unavailable (Debian without `python3-venv`), grpcio installed with
    /// `pip --target` beside it.
    fn with_grpcio() -> Python {
        let system = Python {
            exe: "python3".into(),
            path: None,
        };
        if system.has_grpcio() {
            println!("interop: python3 has grpcio; using it");
            return system;
        }
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let venv_dir = dir.join("interop-venv");
        let site_dir = dir.join("interop-site");
        let venv = Python {
            exe: venv_dir.join("bin").join("python"),
            path: None,
        };
        let site = Python {
            exe: "python3".into(),
            path: Some(site_dir.clone()),
        };
        let ready = |why: &str| {
            [&venv, &site]
                .into_iter()
                .find(|p| p.has_grpcio())
                .map(|p| {
                    println!("interop: {why} {}", p.describe());
                    p.clone()
                })
        };
        if let Some(p) = ready("using the provisioned") {
            return p;
        }

        std::fs::create_dir_all(dir).unwrap();
        let lock = File::create(dir.join("interop-venv.lock")).unwrap();
        lock.lock().unwrap();
        // Another run may have provisioned it while we waited for the lock.
        if let Some(p) = ready("another run provisioned") {
            return p;
        }

        println!(
            "interop: python3 lacks grpcio; creating a venv at {} and installing grpcio",
            venv_dir.display()
        );
        let _ = std::fs::remove_dir_all(&venv_dir);
        let mut log = String::new();
        let made = run_logged(
            &mut log,
            Command::new("python3").arg("-m").arg("venv").arg(&venv_dir),
        ) && run_logged(
            &mut log,
            venv.command()
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .arg("grpcio"),
        );
        if made && venv.has_grpcio() {
            println!("interop: installed grpcio; using {}", venv.describe());
            return venv;
        }

        println!(
            "interop: no usable venv; installing grpcio into {} with pip --target",
            site_dir.display()
        );
        let _ = std::fs::remove_dir_all(&venv_dir);
        let _ = std::fs::remove_dir_all(&site_dir);
        let made = run_logged(
            &mut log,
            Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .arg("--target")
                .arg(&site_dir)
                .arg("grpcio"),
        );
        if made && site.has_grpcio() {
            println!("interop: installed grpcio; using {}", site.describe());
            return site;
        }
        panic!(
            "interop: cannot provision a Python with grpcio (needs python3 with venv or pip, \
             and PyPI):\n{log}"
        );
    }

    fn describe(&self) -> String {
        match &self.path {
            Some(path) => format!("{} with PYTHONPATH={}", self.exe.display(), path.display()),
            None => self.exe.display().to_string(),
        }
    }
}

/// Runs `cmd`, appending what it printed to `log`; returns whether it
/// succeeded.
fn run_logged(log: &mut String, cmd: &mut Command) -> bool {
    log.push_str(&format!("$ {cmd:?}\n"));
    match cmd.stdin(Stdio::null()).output() {
        Ok(Output {
            status,
            stdout,
            stderr,
        }) => {
            log.push_str(&String::from_utf8_lossy(&stdout));
            log.push_str(&String::from_utf8_lossy(&stderr));
            log.push_str(&format!("{status}\n"));
            status.success()
        }
        Err(e) => {
            log.push_str(&format!("{e}\n"));
            false
        }
    }
}
