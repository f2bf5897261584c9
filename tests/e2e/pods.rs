//! Pods on this machine: network namespaces on a bridge, each meshed pod
//! set up from what `pylon inject` made of its manifest — `pylon
//! init-iptables` with the init container's arguments, `pylon proxy` as
//! UID 1337 with the sidecar container's environment — and unmodified apps
//! (curl, Python HTTP and grpcio) calling each other by pod address.
//!
//! Needs root, `ip`, `iptables`, `setpriv`, `curl` and `python3` with
//! grpcio; without them each test says `SKIPPED` and returns. The harness is
//! `common::pods`.

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::common::pods::{
    ControlPlane, LoadClient, MeshedPod, Node, PodNet, Tools, pod_manifest, prerequisites,
    spiffe_id,
};
use crate::common::policy::{
    Build, Kind, LoadBalancerType, RetryOn, TargetKind, backend, retry, route, target,
    traffic_policy, yaml,
};
use crate::common::{Process, TempDir, backend_yaml, route_yaml};

/// The tools, or `None` after saying why the test is skipped.
fn tools() -> Option<Tools> {
    match prerequisites() {
        Ok(tools) => Some(tools),
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

/// The server pods' containers: `app` (HTTP on 8080, gRPC on 50051) with a
/// readiness probe on a named port, a gRPC liveness probe, and a gRPC
/// startup probe of a service the app does not have; and `worker`, whose
/// probed port nothing listens on.
const SERVER_CONTAINERS: &str = "    - name: app
      image: example.test/app:1
      ports:
        - { name: http, containerPort: 8080 }
        - { name: grpc, containerPort: 50051 }
      readinessProbe:
        httpGet: { path: /healthz, port: http }
        periodSeconds: 5
      livenessProbe:
        grpc: { port: 50051 }
      startupProbe:
        grpc: { port: 50051, service: not.This }
    - name: worker
      image: example.test/worker:1
      readinessProbe:
        httpGet: { path: /healthz, port: 8081 }
";

const CLIENT_CONTAINERS: &str = "    - name: client
      image: example.test/client:1
";

/// Starts the HTTP and gRPC apps of a server pod.
fn start_server_apps(pod: &mut MeshedPod) {
    let name = pod.net.name.clone();
    pod.start_app("http_app.py", &["--pod", &name, "--port", "8080"]);
    pod.start_app("grpc_app.py", &["serve", "--pod", &name, "--port", "50051"]);
}

/// The unmeshed pod: a TCP echo server on 9000 and a TLS echo server on
/// 9443 with a self-signed certificate for its address; returns the app and
/// the certificate's file (the clients' CA).
fn start_external(c: &PodNet, dir: &TempDir) -> (Process, String) {
    let cert = rcgen::generate_simple_self_signed(vec![c.ip.to_string()]).unwrap();
    let cert_file = dir.path().join("external.pem");
    let key_file = dir.path().join("external.key");
    std::fs::write(&cert_file, cert.cert.pem()).unwrap();
    std::fs::write(&key_file, cert.signing_key.serialize_pem()).unwrap();
    let app = c.start_app(
        "external.py",
        &[
            "serve",
            "--cert",
            cert_file.to_str().unwrap(),
            "--key",
            key_file.to_str().unwrap(),
        ],
    );
    (app, cert_file.to_str().unwrap().to_string())
}

#[test]
fn meshed_pods_talk_mtls_and_everything_else_passes_through() {
    let Some(tools) = tools() else { return };
    let node = Node::create(tools, &[]);
    let cp = ControlPlane::start(&node);
    let mut a = MeshedPod::new(
        &node,
        &pod_manifest(
            "a",
            "client",
            &[("pylon.dev/drain-timeout", "5s")],
            CLIENT_CONTAINERS,
        ),
    );
    let mut b = MeshedPod::new(
        &node,
        &pod_manifest(
            "b",
            "server",
            &[
                ("pylon.dev/drain-timeout", "5s"),
                ("pylon.dev/proxy-cpu-limit", "1500m"),
            ],
            SERVER_CONTAINERS,
        ),
    );
    let c = node.pod("c");
    let dir = TempDir::new("pods-external");
    let (external, ca_file) = start_external(&c, &dir);

    // A's routes name B's address and app ports: the authority of a call to
    // B by address, and its original destination.
    let b_id = b.identity();
    let http_target = format!("{}:8080", b.ip());
    let grpc_target = format!("{}:50051", b.ip());
    cp.apply(
        &(backend_yaml("b-http", std::slice::from_ref(&http_target), Some(&b_id))
            + &route_yaml("HTTPRoute", "b-http", &http_target, &[("b-http", 1)])
            + &backend_yaml("b-grpc", std::slice::from_ref(&grpc_target), Some(&b_id))
            + &route_yaml("GRPCRoute", "b-grpc", &grpc_target, &[("b-grpc", 1)])),
    );

    a.init(&cp);
    b.init(&cp);
    start_server_apps(&mut b);
    b.start_sidecar(&node, &[]);
    a.start_sidecar(&node, &[]);
    let logs = |pods: &[&MeshedPod]| -> String {
        let mut text = String::new();
        for p in pods {
            text.push_str(&p.all_logs());
        }
        text + &format!("--- control plane ---\n{}", cp.logs())
    };

    // Each sidecar runs the workers injection gave it for its CPU: A (the
    // default request, 100m) one, on the current-thread scheduler; B (a
    // limit of 1.5 cores) two.
    assert_eq!(a.injected.env_value("pylon", "PYLON_WORKERS"), Some("1"));
    assert_eq!(b.injected.env_value("pylon", "PYLON_WORKERS"), Some("2"));
    for (pod, runtime) in [
        (&a, "runtime=current-thread"),
        (&b, "runtime=multi-thread, 2 workers"),
    ] {
        crate::common::eventually_blocking(format!("{runtime} in {}", pod.net.name), || {
            let logs = crate::common::strip_ansi(&pod.sidecar_logs());
            if logs.contains(runtime) {
                Ok(())
            } else {
                Err(logs)
            }
        });
    }

    // curl in A calls B's address: intercepted on both sides, mTLS between.
    let reply = a.net.curl(&[&format!("http://{http_target}/hello")]);
    assert_eq!(reply.status, 200, "{reply:#?}\n{}", logs(&[&a, &b]));
    let seen = reply.json();
    assert_eq!(seen["pod"], "b");
    assert_eq!(seen["path"], "/hello");
    assert_eq!(
        seen["headers"]["x-pylon-peer-identity"],
        spiffe_id("client"),
        "{seen:#}"
    );

    // A grpcio client in A does the same over gRPC.
    let out = a
        .net
        .run_python("grpc_app.py", &["call", "--target", &grpc_target]);
    assert!(
        out.status.success(),
        "grpc call: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs(&[&a, &b])
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["pod"], "b");
    assert_eq!(
        seen["metadata"]["x-pylon-peer-identity"],
        spiffe_id("client"),
        "{seen:#}"
    );

    // Both sidecars counted the calls: B inbound, A outbound on each route.
    for (status, what) in [("2xx", "HTTP"), ("OK", "gRPC")] {
        let inbound = b.metric(
            &node,
            "pylon_inbound_requests_total",
            &[&format!("status=\"{status}\"")],
        );
        assert!(inbound >= 1.0, "B counted no inbound {what} call");
    }
    for (route, status) in [("HTTPRoute/b-http", "2xx"), ("GRPCRoute/b-grpc", "OK")] {
        let outbound = a.metric(
            &node,
            "pylon_outbound_requests_total",
            &[
                &format!("route=\"{route}\""),
                &format!("status=\"{status}\""),
            ],
        );
        assert!(outbound >= 1.0, "A counted no outbound call on {route}");
    }

    // Not HTTP, to a pod outside the mesh: passed through A's sidecar to the
    // original destination, byte for byte; TLS end to end with C's own
    // certificate.
    let c_ip = c.ip.to_string();
    for (port, ca, message) in [
        ("9000", None, "plain bytes, not HTTP\n"),
        ("9443", Some(ca_file.as_str()), "inside TLS\n"),
    ] {
        let mut args = vec![
            "call",
            "--host",
            &c_ip,
            "--port",
            port,
            "--message",
            message,
        ];
        if let Some(ca) = ca {
            args.extend(["--ca", ca]);
        }
        let out = a.net.run_python("external.py", &args);
        assert!(
            out.status.success(),
            "to {c_ip}:{port}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            logs(&[&a])
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            message,
            "{}",
            external.logs()
        );
    }
    // The sidecar's own connections to C were not redirected back to it.
    let a_logs = a.sidecar_logs();
    let looped: Vec<&str> = a_logs
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.replace("loopback", "").contains("loop")
        })
        .collect();
    assert!(
        looped.is_empty(),
        "A's sidecar saw its own traffic come back: {looped:#?}\n{a_logs}"
    );

    // From outside the mesh, plaintext to B's app port: refused in strict
    // mode...
    let reply = c.curl(&[&format!("http://{http_target}/from-outside")]);
    assert!(
        !(200..300).contains(&reply.status) && !reply.body.contains("\"pod\""),
        "strict mode served plaintext: {reply:#?}"
    );
    eprintln!(
        "strict mode, plaintext from outside the mesh: curl exit {:?}, status {} {}",
        reply.exit,
        reply.status,
        reply.stderr.trim()
    );
    // ...served, with no identity, once B's sidecar is permissive.
    let (status, took, stopped_logs) = b.stop_sidecar();
    assert!(status.success(), "{status} after {took:?}:\n{stopped_logs}");
    b.start_sidecar(&node, &[("PYLON_INBOUND_MODE", "permissive")]);
    let reply = c.curl(&[&format!("http://{http_target}/from-outside")]);
    assert_eq!(reply.status, 200, "{reply:#?}\n{}", logs(&[&b]));
    let seen = reply.json();
    assert_eq!(seen["path"], "/from-outside");
    assert!(
        seen["headers"].get("x-pylon-peer-identity").is_none(),
        "{seen:#}"
    );
    // Mesh callers still arrive with their identity.
    let reply = a.net.curl(&[&format!("http://{http_target}/again")]);
    assert_eq!(reply.status, 200, "{reply:#?}\n{}", logs(&[&a, &b]));
    assert_eq!(
        reply.json()["headers"]["x-pylon-peer-identity"],
        spiffe_id("client")
    );

    // The kubelet's probes, rewritten by injection, reach the app through
    // the probe listener; the worker's port has nothing behind it.
    let reply = node.probe(b.ip(), "/app-health/app/readiness");
    assert_eq!(reply.status, 200, "{reply:#?}\n{}", logs(&[&b]));
    let reply = node.probe(b.ip(), "/app-health/worker/readiness");
    assert!(
        !(200..300).contains(&reply.status),
        "a probe of a port nothing listens on passed: {reply:#?}"
    );
    // The gRPC probes ask the app's grpc.health.v1.Health: SERVING for its
    // own service, NOT_FOUND for another.
    let reply = node.probe(b.ip(), "/app-health/app/liveness");
    assert_eq!(reply.status, 200, "{reply:#?}\n{}", logs(&[&b]));
    let reply = node.probe(b.ip(), "/app-health/app/startup");
    assert!(
        !(200..300).contains(&reply.status),
        "a gRPC probe of an unknown service passed: {reply:#?}"
    );

    // Root in A talks to the outbound listener directly, with an authority
    // no route names: the proxy answers itself at once, it does not pass
    // the connection to itself.
    let reply = a
        .net
        .curl(&["-H", "Host: nothing.invalid", "http://127.0.0.1:15001/"]);
    assert!(
        reply.status != 0 && reply.header("x-pylon-error").is_some(),
        "{reply:#?}\n{}",
        logs(&[&a])
    );
}

#[test]
fn pods_replaced_under_load_fail_no_call() {
    let Some(tools) = tools() else { return };
    // The client calls the service by a name whose address nobody has: only
    // the interception takes it anywhere (a ClusterIP, in Kubernetes terms).
    let service_ip = Ipv4Addr::new(198, 18, 1, 1);
    let node = Node::create(tools, &[(service_ip, "web.default.svc")]);
    let cp = ControlPlane::start(&node);
    let drain = [("pylon.dev/drain-timeout", "5s")];
    let drain_timeout = Duration::from_secs(5);
    let mut a = MeshedPod::new(
        &node,
        &pod_manifest("a", "client", &drain, CLIENT_CONTAINERS),
    );
    let mut servers = [
        MeshedPod::new(&node, &pod_manifest("b1", "web", &drain, SERVER_CONTAINERS)),
        MeshedPod::new(&node, &pod_manifest("b2", "web", &drain, SERVER_CONTAINERS)),
    ];

    // Both pods behind one Backend, taking turns; a call that cannot reach
    // one (connect failure, refused stream, 503) is retried on the other.
    let endpoints: Vec<std::net::SocketAddr> =
        servers.iter().map(|s| (s.ip(), 8080).into()).collect();
    let ms = Duration::from_millis;
    cp.apply(&yaml(&[
        backend("web", &endpoints, Some(&spiffe_id("web"))),
        route(Kind::HttpRoute, "web", "web.default.svc", &[("web", 1)])
            .hostnames(&["web.default.svc", "web.default.svc:8080"])
            .retry(retry(3, &[RetryOn::Http(503)], ms(10), ms(50))),
        traffic_policy("web", target(TargetKind::Backend, "web"))
            .load_balancer(LoadBalancerType::RoundRobin),
    ]));

    // The drain timeout the test holds the sidecars to is the one injection
    // gave them, from the annotation.
    for s in &servers {
        assert_eq!(
            s.injected.env_value("pylon", "PYLON_DRAIN_TIMEOUT"),
            Some("5s")
        );
    }
    a.init(&cp);
    a.start_sidecar(&node, &[]);
    for s in &mut servers {
        s.init(&cp);
        start_server_apps(s);
        s.start_sidecar(&node, &[]);
    }

    let mut client = LoadClient::start(&a.net, "http://web.default.svc:8080/");
    let names: Vec<String> = servers.iter().map(|s| s.net.name.clone()).collect();
    client.wait_until("served by both pods", |c| {
        names.iter().all(|n| c.served_by(n) >= 10)
    });
    let mut windows = Vec::new();
    for s in &mut servers {
        let name = s.net.name.clone();
        let before = client.counts();
        let (status, took, logs) = s.stop_sidecar();
        assert!(
            status.success(),
            "sidecar of {name}: {status} after {took:?}\n{logs}"
        );
        // Within its drain timeout; the second on top is for the signal's
        // delivery and the process's exit on a busy machine.
        assert!(
            took <= drain_timeout + Duration::from_secs(1),
            "sidecar of {name} took {took:?} to drain (drain timeout {drain_timeout:?})\n{logs}"
        );
        s.stop_apps();
        // While the pod is gone, the calls keep succeeding on the other.
        let gone = client.counts();
        let down = client.wait_successes(&gone, 20);
        s.init(&cp);
        start_server_apps(s);
        s.start_sidecar(&node, &[]);
        // The new incarnation takes its share before the next pod goes.
        let after = client.wait_until(&format!("served by the new {name}"), |c| {
            c.served_by(&name) >= down.served_by(&name) + 10
        });
        windows.push((name, took, down.ok - gone.ok, after.ok - before.ok));
    }
    let (counts, failures) = client.stop();
    let logs = || {
        let mut text = a.all_logs();
        for s in &servers {
            text.push_str(&s.all_logs());
        }
        text
    };
    assert_eq!(
        counts.failed,
        0,
        "{counts:?}; failures:\n{}\n{}",
        failures.join("\n"),
        logs()
    );
    for (name, took, down, all) in &windows {
        eprintln!(
            "replacing {name}: drained in {took:?}; {all} calls served during the replacement, \
             {down} of them while it was gone"
        );
    }
    // Calls did go to the pod that was gone: they were retried on the other.
    let retries = a.metric(&node, "pylon_retries_total", &["backend=\"Backend/web\""]);
    eprintln!("{counts:?} in all, {retries} retries");
    assert!(retries > 0.0, "no call was retried:\n{}", logs());
}
