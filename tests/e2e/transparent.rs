//! Transparent mode: iptables REDIRECTs an app's connections to the
//! outbound listener; the sidecar routes by authority, else by the original
//! destination (`SO_ORIGINAL_DST`).
//!
//! Runs in a network namespace of its own, so it needs root, `ip` and
//! `iptables`; without them it says so and returns.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use pylon::identity::dev::DevCa;

use crate::common::{
    CLIENT_ID, PATIENCE, SidecarProc, TempDir, backend_yaml, route_yaml, sidecar_config,
};

/// A network namespace with loopback up; deleted on drop.
struct Netns(String);

impl Netns {
    fn create() -> Option<Netns> {
        let name = format!("pylon-tp-{}-{}", std::process::id(), fastrand::u32(..));
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .ok()?
            .success();
        if !ok {
            return None;
        }
        let ns = Netns(name);
        ns.run(&["ip", "link", "set", "lo", "up"]);
        // An extra local address, so connections to it stay inside.
        ns.run(&["ip", "addr", "add", "198.18.0.7/32", "dev", "lo"]);
        ns.run(&["ip", "addr", "add", "198.18.0.8/32", "dev", "lo"]);
        Some(ns)
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }

    fn run(&self, argv: &[&str]) -> String {
        let out = self.cmd(argv[0]).args(&argv[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{argv:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn have(program: &str) -> bool {
    Command::new("which")
        .arg(program)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test]
async fn redirected_connections_route_by_authority_then_original_destination() {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout == b"0\n");
    if !(root && have("ip") && have("iptables") && have("curl") && have("python3")) {
        eprintln!("SKIPPED: transparent mode needs root, ip, iptables, curl and python3");
        return;
    }
    let Some(ns) = Netns::create() else {
        eprintln!("SKIPPED: cannot create a network namespace here");
        return;
    };
    let dir = TempDir::new("transparent");
    std::fs::write(dir.path().join("hello.txt"), "hello from the app\n").unwrap();

    // The app: a plain HTTP server inside the namespace.
    let mut server = ns
        .cmd("python3")
        .args([
            "-u",
            "-m",
            "http.server",
            "0",
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _server = Killed(server);
    let app_port: u16 = line
        .split_whitespace()
        .skip_while(|w| *w != "port")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));

    let ca = DevCa::new("pylon test root").unwrap();
    let id = ca.write_identity(dir.path(), "client", CLIENT_ID).unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        backend_yaml("web", &[format!("127.0.0.1:{app_port}")], None)
            + &route_yaml("HTTPRoute", "by-authority", "web.test", &[("web", 1)])
            + &route_yaml("HTTPRoute", "by-address", "198.18.0.7:80", &[("web", 1)]),
    )
    .unwrap();
    let cfg = dir.path().join("pylon.yaml");
    std::fs::write(
        &cfg,
        sidecar_config(&id, &policy, "127.0.0.1:9".parse().unwrap()),
    )
    .unwrap();
    let mut cmd = ns.cmd(env!("CARGO_BIN_EXE_pylon"));
    cmd.args(["proxy", "--config"]).arg(&cfg);
    let sidecar = SidecarProc::spawn_command(cmd);
    let outbound_port = sidecar.outbound.port().to_string();

    // Wait for readiness from inside the namespace.
    let ready_url = format!("http://{}/ready", sidecar.admin);
    let deadline = std::time::Instant::now() + PATIENCE;
    while ns
        .cmd("curl")
        .args(["-sf", &ready_url])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "never ready:\n{}",
            sidecar.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // Redirect what the app sends to port 80 of 198.18.0.7 and 198.18.0.8, and
    // to 127.0.0.1:18080, to the outbound listener.
    for (dst, port) in [
        ("198.18.0.7", "80"),
        ("198.18.0.8", "80"),
        ("127.0.0.1", "18080"),
    ] {
        ns.run(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            dst,
            "--dport",
            port,
            "-j",
            "REDIRECT",
            "--to-ports",
            &outbound_port,
        ]);
    }

    let curl = |args: &[&str]| -> (String, String) {
        let out = ns
            .cmd("curl")
            .args(["-s", "-D", "-", "--max-time", "20"])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        (head.to_string(), body.to_string())
    };

    // The authority names a route.
    let (head, body) = curl(&["-H", "Host: web.test", "http://127.0.0.1:18080/hello.txt"]);
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "{head}\n{}",
        sidecar.logs()
    );
    assert_eq!(body, "hello from the app\n");

    // The authority names nothing; the original destination does.
    let (head, body) = curl(&[
        "--resolve",
        "unrouted.test:80:198.18.0.7",
        "http://unrouted.test/hello.txt",
    ]);
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "{head}\n{}",
        sidecar.logs()
    );
    assert_eq!(body, "hello from the app\n");

    // Neither does: the request is passed through to its original
    // destination. This sidecar runs as root, whose traffic these rules
    // redirect too, so the pass-through connection comes straight back to
    // the outbound listener: refused as a loop, never recursed.
    let (head, _) = curl(&[
        "--resolve",
        "unrouted.test:80:198.18.0.8",
        "http://unrouted.test/hello.txt",
    ]);
    assert!(head.starts_with("HTTP/1.1 50"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("x-pylon-error:"),
        "{head}"
    );
    sidecar.wait_log("refused a redirect loop").await;
}

#[tokio::test]
async fn ipv6_connections_are_intercepted_by_init_iptables_too() {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout == b"0\n");
    let tools = ["ip", "iptables", "ip6tables", "curl", "python3", "setpriv"];
    if !(root && tools.iter().all(|t| have(t))) {
        eprintln!("SKIPPED: IPv6 interception needs root and {tools:?}");
        return;
    }
    let Some(ns) = Netns::create() else {
        eprintln!("SKIPPED: cannot create a network namespace here");
        return;
    };
    // A link out of the pod (a veth pair, both ends in this namespace)
    // with an address of the IPv6 benchmarking range (RFC 5180): traffic
    // to 2001:2::7 leaves by it, not by loopback, which the rules leave
    // alone.
    let link = [
        "ip link add pv0 type veth peer name pv1",
        "ip link set pv0 up",
        "ip link set pv1 up",
        "ip -6 addr add 2001:2::1/64 dev pv0 nodad",
    ];
    let linked = link.iter().all(|c| {
        let argv: Vec<&str> = c.split(' ').collect();
        ns.cmd(argv[0])
            .args(&argv[1..])
            .status()
            .is_ok_and(|s| s.success())
    });
    if !linked {
        eprintln!("SKIPPED: no IPv6 or veth in this namespace");
        return;
    }
    let dir = TempDir::new("transparent-v6");
    std::fs::write(dir.path().join("hello.txt"), "hello over IPv6\n").unwrap();
    let mut server = ns
        .cmd("python3")
        .args([
            "-u",
            "-m",
            "http.server",
            "0",
            "--bind",
            "::1",
            "--directory",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _server = Killed(server);
    let app_port: u16 = line
        .split_whitespace()
        .skip_while(|w| *w != "port")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));

    let ca = DevCa::new("pylon test root").unwrap();
    let id = ca.write_identity(dir.path(), "client", CLIENT_ID).unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        backend_yaml("web", &[format!("[::1]:{app_port}")], None)
            + &route_yaml("HTTPRoute", "by-authority", "web.test", &[("web", 1)]),
    )
    .unwrap();
    // The ports injection gives a pod's sidecar: this namespace is ours.
    let cfg = dir.path().join("pylon.yaml");
    std::fs::write(
        &cfg,
        sidecar_config(&id, &policy, "127.0.0.1:9".parse().unwrap())
            .replace(
                "admin: { listen: \"127.0.0.1:0\", probeListen: \"127.0.0.1:0\" }",
                "admin: { listen: \"127.0.0.1:15000\", probeListen: \"0.0.0.0:15020\" }",
            )
            .replace(
                "outbound: { listen: \"127.0.0.1:0\" }",
                "outbound: { listen: \"127.0.0.1:15001\" }",
            )
            .replace(
                "inbound: { listen: \"127.0.0.1:0\"",
                "inbound: { listen: \"0.0.0.0:15006\"",
            ),
    )
    .unwrap();
    // The sidecar runs as the proxy UID, whose traffic is not redirected.
    assert!(
        Command::new("chown")
            .args(["-R", "1337:1337"])
            .arg(dir.path())
            .status()
            .unwrap()
            .success()
    );
    let mut cmd = ns.cmd("setpriv");
    cmd.args(["--reuid=1337", "--regid=1337", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_pylon"))
        .args(["proxy", "--config"])
        .arg(&cfg);
    let sidecar = SidecarProc::spawn_command(cmd);
    sidecar
        .wait_log("also listening on IPv6 addr=[::1]:15001")
        .await;
    sidecar
        .wait_log("also listening on IPv6 addr=[::]:15006")
        .await;
    ns.run(&[env!("CARGO_BIN_EXE_pylon"), "init-iptables"]);
    let ready = ns.run(&[
        "curl",
        "-sf",
        "--retry",
        "100",
        "--retry-connrefused",
        "--retry-delay",
        "0",
        "--retry-max-time",
        "30",
        "http://127.0.0.1:15000/ready",
    ]);
    assert!(ready.starts_with("ready"), "{ready}");

    let out = ns
        .cmd("curl")
        .args(["-s", "-D", "-", "--max-time", "20", "-H", "Host: web.test"])
        .arg("http://[2001:2::7]:8080/hello.txt")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{text}\n{}",
        sidecar.logs()
    );
    assert!(text.ends_with("hello over IPv6\n"), "{text}");
}
