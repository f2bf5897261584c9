//! Transparent mode: iptables REDIRECTs an app's connections to the
//! outbound listener; the sidecar routes by authority, else by the original
//! destination (`SO_ORIGINAL_DST`).
//!
//! Runs in a network namespace of its own, so it needs root, `ip` and
//! `iptables`; without them it says so and returns.

use std::process::Command;

use pylon::identity::dev::DevCa;

use crate::common::netns::{Netns, root_and};
use crate::common::{
    CLIENT_ID, SidecarProc, TempDir, backend_yaml, eventually_blocking, route_yaml, sidecar_config,
};

#[tokio::test]
async fn redirected_connections_route_by_authority_then_original_destination() {
    if let Err(why) = root_and(&["ip", "iptables", "curl", "python3"]) {
        eprintln!("SKIPPED: transparent mode {why}");
        return;
    }
    let Some(ns) = Netns::create("tp") else {
        eprintln!("SKIPPED: cannot create a network namespace here");
        return;
    };
    // Extra local addresses, so connections to them stay inside.
    ns.run(&["ip", "addr", "add", "198.18.0.7/32", "dev", "lo"]);
    ns.run(&["ip", "addr", "add", "198.18.0.8/32", "dev", "lo"]);
    let dir = TempDir::new("transparent");
    std::fs::write(dir.path().join("hello.txt"), "hello from the app\n").unwrap();

    // The app: a plain HTTP server inside the namespace.
    let (_server, app_port) = ns.http_server("127.0.0.1", dir.path());

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
    let mut cmd = ns.cmd(crate::common::PYLON);
    cmd.args(["proxy", "--config"]).arg(&cfg);
    let sidecar = SidecarProc::spawn_command(cmd);
    let outbound_port = sidecar.outbound.port().to_string();

    // Wait for readiness from inside the namespace.
    let ready_url = format!("http://{}/ready", sidecar.admin);
    eventually_blocking("ready, seen from inside the namespace", || {
        let ready = ns
            .cmd("curl")
            .args(["-sf", &ready_url])
            .output()
            .is_ok_and(|o| o.status.success());
        if ready { Ok(()) } else { Err(sidecar.logs()) }
    });

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
    let tools = ["ip", "iptables", "ip6tables", "curl", "python3", "setpriv"];
    if let Err(why) = root_and(&tools) {
        eprintln!("SKIPPED: IPv6 interception {why}");
        return;
    }
    let Some(ns) = Netns::create("tp6") else {
        eprintln!("SKIPPED: cannot create a network namespace here");
        return;
    };
    // Traffic to 2001:2::7 leaves by a link, not by loopback (which the
    // rules leave alone).
    if !ns.link_out(&["2001:2::1/64"]) {
        eprintln!("SKIPPED: no IPv6 or veth in this namespace");
        return;
    }
    let dir = TempDir::new("transparent-v6");
    std::fs::write(dir.path().join("hello.txt"), "hello over IPv6\n").unwrap();
    let (_server, app_port) = ns.http_server("::1", dir.path());

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
        .arg(crate::common::PYLON)
        .args(["proxy", "--config"])
        .arg(&cfg);
    let sidecar = SidecarProc::spawn_command(cmd);
    sidecar
        .wait_log("also listening on IPv6 addr=[::1]:15001")
        .await;
    sidecar
        .wait_log("also listening on IPv6 addr=[::]:15006")
        .await;
    ns.run(&[crate::common::PYLON, "init-iptables"]);
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
