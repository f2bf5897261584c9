//! `pylon init-iptables` in a network namespace of its own: the rules it
//! writes, that a second run and `--dry-run` change nothing, and that the
//! redirect really catches an app's connections but not the proxy's.
//!
//! Needs root, `ip` and `iptables` (the traffic half also `python3` and
//! `setpriv`); without them it says so and returns. Only 198.18.0.0/15
//! addresses are used, only inside the namespace.

use std::io::{BufRead, BufReader, Lines};
use std::process::{Child, ChildStdout, Stdio};

use crate::common::netns::{Netns, have, root_and};

use crate::common::PYLON;

const INIT: [&str; 5] = [
    "init-iptables",
    "--skip-inbound-ports",
    "22",
    "--skip-outbound-cidrs",
    "198.18.5.0/24",
];

/// The nat table as `save` prints it in `ns`, without comments and
/// counters.
fn nat(ns: &Netns, save: &str) -> String {
    ns.run(&[save, "-t", "nat"])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.rsplit_once(" [") {
            Some((chain, _)) if l.starts_with(':') => chain,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Connects to `dst` from `ns` (as `uid` when given) and says how it went.
fn connect(ns: &Netns, uid: Option<&str>, dst: &str) -> Result<(), String> {
    let (host, port) = dst.split_once(':').unwrap();
    let script = format!("exec 3<>/dev/tcp/{host}/{port}");
    let ids = uid.map(|uid| [format!("--reuid={uid}"), format!("--regid={uid}")]);
    let mut argv = Vec::new();
    if let Some([reuid, regid]) = &ids {
        argv.extend(["setpriv", reuid, regid, "--clear-groups"]);
    }
    argv.extend(["timeout", "20", "bash", "-c", &script]);
    let out = ns.output(&argv);
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}
/// A listener on the outbound port that prints each connection's original
/// destination (`SO_ORIGINAL_DST`), one line per connection.
struct Listener {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Listener {
    const SCRIPT: &str = r#"
import socket, struct
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 15001))
s.listen(8)
s.settimeout(60)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    raw = c.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
    port, addr = struct.unpack("!2xH4s8x", raw)
    print("got %s:%d" % (socket.inet_ntoa(addr), port), flush=True)
    c.close()
"#;

    fn spawn(ns: &Netns) -> Listener {
        let mut child = ns
            .cmd("python3")
            .args(["-u", "-c", Self::SCRIPT])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut listener = Listener { child, lines };
        assert_eq!(listener.next_line(), "listening");
        listener
    }

    fn next_line(&mut self) -> String {
        self.lines
            .next()
            .and_then(Result::ok)
            .unwrap_or_else(|| "(listener gone)".to_string())
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pylon init-iptables …` with the test's flags and `extra`.
fn with(extra: &[&'static str]) -> Vec<&'static str> {
    std::iter::once(PYLON)
        .chain(INIT)
        .chain(extra.iter().copied())
        .collect()
}

/// The `# ipv4` part of a `--dry-run` output.
fn ipv4_part(dry_run: &str) -> &str {
    let rest = dry_run
        .strip_prefix("# ipv4\n")
        .unwrap_or_else(|| panic!("no ipv4 header:\n{dry_run}"));
    rest.split("# ipv6\n").next().unwrap()
}

#[test]
fn init_iptables_redirects_the_apps_tcp_and_is_idempotent() {
    if let Err(why) = root_and(&["ip", "iptables", "iptables-save"]) {
        eprintln!("SKIPPED: init-iptables {why}");
        return;
    }
    let Some(ns) = Netns::create("ipt") else {
        eprintln!("SKIPPED: cannot create a network namespace here");
        return;
    };
    // 198.18.9.9 and 198.18.5.5 are routed out of a link, not over lo.
    assert!(ns.link_out(&["198.18.9.1/16"]), "no veth in the namespace");

    // A dry run prints the input for both families and changes nothing.
    let empty = nat(&ns, "iptables-save");
    let dry_run = ns.run(&with(&["--dry-run"]));
    assert!(dry_run.contains("\nCOMMIT\n# ipv6\n*nat\n"), "{dry_run}");
    assert_eq!(nat(&ns, "iptables-save"), empty);

    let applied = ns.run(&with(&[]));
    assert!(
        applied.starts_with("pylon init-iptables: applied ipv4"),
        "{applied}"
    );
    let rules = nat(&ns, "iptables-save");
    for expected in [
        ":PYLON_INBOUND -",
        ":PYLON_OUTPUT -",
        "-A PREROUTING -p tcp -j PYLON_INBOUND",
        "-A OUTPUT -p tcp -j PYLON_OUTPUT",
        "-A PYLON_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
        "-A PYLON_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
        "-A PYLON_INBOUND -p tcp -j REDIRECT --to-ports 15006",
        "-A PYLON_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A PYLON_OUTPUT -o lo -j RETURN",
        "-A PYLON_OUTPUT -d 127.0.0.0/8 -j RETURN",
        "-A PYLON_OUTPUT -d 198.18.5.0/24 -j RETURN",
        "-A PYLON_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
    ] {
        assert!(rules.lines().any(|l| l == expected), "{expected}:\n{rules}");
    }
    // The dry run's rules are what was applied, spelled the same way.
    for line in ipv4_part(&dry_run).lines().filter(|l| l.starts_with("-A")) {
        assert!(rules.lines().any(|l| l == line), "{line}:\n{rules}");
    }
    let v6_rules = have("ip6tables-save").then(|| nat(&ns, "ip6tables-save"));
    if let Some(v6) = &v6_rules {
        assert!(
            v6.contains("\n-A PYLON_OUTPUT -d ::1/128 -j RETURN\n"),
            "{v6}"
        );
        assert!(!v6.contains("198.18."), "{v6}");
    }

    // Again: nothing changes, and a dry run now adds no jumps.
    ns.run(&with(&[]));
    assert_eq!(nat(&ns, "iptables-save"), rules);
    if let Some(v6) = &v6_rules {
        assert_eq!(&nat(&ns, "ip6tables-save"), v6);
    }
    let dry_run = ns.run(&with(&["--dry-run"]));
    assert!(!dry_run.contains("-A PREROUTING"), "{dry_run}");
    assert!(!dry_run.contains("-A OUTPUT"), "{dry_run}");
    assert_eq!(nat(&ns, "iptables-save"), rules);

    if !(have("python3") && have("setpriv") && have("timeout")) {
        eprintln!("SKIPPED: the traffic half needs python3, setpriv and timeout");
        return;
    }
    // A connection that is not redirected meets a reset (the filter table
    // comes after nat, and only sees SYNs to 198.18/15 that nat left alone),
    // so "not redirected" is an answer, not a timeout.
    ns.run(&[
        "iptables",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "--syn",
        "-d",
        "198.18.0.0/15",
        "-j",
        "REJECT",
        "--reject-with",
        "tcp-reset",
    ]);
    let mut listener = Listener::spawn(&ns);

    // The app (root here) is redirected, its original destination kept.
    connect(&ns, None, "198.18.9.9:80").unwrap();
    assert_eq!(listener.next_line(), "got 198.18.9.9:80");

    // The proxy's UID and the skipped CIDR are not.
    let refused = connect(&ns, Some("1337"), "198.18.9.9:81").unwrap_err();
    assert!(refused.contains("refused"), "{refused}");
    let refused = connect(&ns, None, "198.18.5.5:82").unwrap_err();
    assert!(refused.contains("refused"), "{refused}");

    // The listener accepts in order: had either arrived, it would come first.
    connect(&ns, None, "198.18.9.9:83").unwrap();
    assert_eq!(listener.next_line(), "got 198.18.9.9:83");
}
