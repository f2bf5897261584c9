//! A network namespace of the test's own, for tests that need iptables or
//! addresses beyond loopback: only 198.18.0.0/15 and 2001:2::/48 (the
//! benchmarking ranges) are used, only inside it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

/// The `PATH` of every process started in a namespace made by
/// [`Netns::add`] (a pod's).
const POD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A network namespace with loopback up; deleted on drop. One made by
/// [`Netns::add`] (a pod's) also has its `/etc/netns/<name>` directory (the
/// files `ip netns exec` binds over `/etc`), removed on drop too, and runs
/// its commands with an environment of their own (only `PATH`).
pub struct Netns {
    pub name: String,
    /// Made by [`Netns::add`].
    pod: bool,
}

impl Netns {
    /// A new namespace named after `label`, or `None` where namespaces
    /// cannot be made.
    pub fn create(label: &str) -> Option<Netns> {
        let name = format!("pylon-{label}-{}-{}", std::process::id(), fastrand::u32(..));
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .ok()?
            .success();
        if !ok {
            return None;
        }
        let ns = Netns { name, pod: false };
        ns.run(&["ip", "link", "set", "lo", "up"]);
        Some(ns)
    }

    /// Adds namespace `name` with loopback up, `hosts` as its `/etc/hosts`
    /// and its own loopback as its DNS server; panics where it cannot.
    pub fn add(name: String, hosts: &str) -> Netns {
        let etc = Path::new("/etc/netns").join(&name);
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("hosts"), hosts).unwrap();
        // A name not in `hosts` fails at once (nothing answers on the
        // pod's loopback) instead of waiting for a server outside.
        std::fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
        let ns = Netns { name, pod: true };
        ip(&["netns", "add", &ns.name]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <this> args...`; panics unless it succeeds.
    pub fn ip(&self, args: &[&str]) {
        let mut argv = vec!["-n", &self.name];
        argv.extend_from_slice(args);
        ip(&argv);
    }

    /// `program` run inside the namespace (a pod's: with only `PATH` in
    /// its environment).
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        if self.pod {
            c.env_clear().env("PATH", POD_PATH);
        }
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    pub fn output(&self, argv: &[&str]) -> Output {
        self.cmd(argv[0]).args(&argv[1..]).output().unwrap()
    }

    /// Runs `argv` inside; panics unless it succeeds; its stdout.
    pub fn run(&self, argv: &[&str]) -> String {
        let out = self.output(argv);
        assert!(
            out.status.success(),
            "{argv:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A link out of the namespace that is not loopback: a veth pair with
    /// both ends inside, `pv0` up with `addrs` (e.g. `198.18.9.1/16`,
    /// `2001:2::1/64`), so traffic to those networks leaves by it. `false`
    /// where the kernel refuses.
    pub fn link_out(&self, addrs: &[&str]) -> bool {
        let mut steps: Vec<Vec<&str>> = vec![
            vec![
                "ip", "link", "add", "pv0", "type", "veth", "peer", "name", "pv1",
            ],
            vec!["ip", "link", "set", "pv0", "up"],
            vec!["ip", "link", "set", "pv1", "up"],
        ];
        for a in addrs {
            let mut step = vec!["ip"];
            if a.contains(':') {
                step.push("-6");
            }
            step.extend(["addr", "add", a, "dev", "pv0"]);
            if a.contains(':') {
                step.push("nodad");
            }
            steps.push(step);
        }
        steps.iter().all(|argv| self.output(argv).status.success())
    }

    /// Python's `http.server` serving `dir` on `bind` inside; killed on
    /// drop. Returns it and its port once it listens.
    pub fn http_server(&self, bind: &str, dir: &Path) -> (Killed, u16) {
        let mut server = self
            .cmd("python3")
            .args([
                "-u",
                "-m",
                "http.server",
                "0",
                "--bind",
                bind,
                "--directory",
            ])
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(server.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .split_whitespace()
            .skip_while(|w| *w != "port")
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        (Killed(server), port)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let mut del = Command::new("ip");
        del.args(["netns", "del", &self.name]);
        if self.pod {
            del.stderr(Stdio::null());
        }
        let _ = del.status();
        if self.pod {
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.name));
        }
    }
}

/// Runs `ip args...`; panics unless it succeeds.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A child process, killed on drop.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether `program` is on the PATH.
pub fn have(program: &str) -> bool {
    Command::new("which")
        .arg(program)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether the tests run as root, and every one of `tools` is there; says
/// what is missing otherwise (the caller prints `SKIPPED: ...`).
pub fn root_and(tools: &[&str]) -> Result<(), String> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout == b"0\n");
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have(t)).collect();
    match (root, missing.is_empty()) {
        (true, true) => Ok(()),
        (false, _) => Err("needs root".to_string()),
        (true, false) => Err(format!("needs {}", missing.join(", "))),
    }
}
