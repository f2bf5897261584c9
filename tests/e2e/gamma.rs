//! Services as route parents (Gateway API GAMMA) end to end: a client
//! sidecar that knows its Kubernetes namespace routes a GRPCRoute attached
//! to a Service by the Service's cluster DNS names, and reaches the Backend
//! named by the Service shorthand through DNS. The outbound listener is
//! addressed explicitly (no iptables), so the request's authority is what
//! routes.

use std::net::SocketAddr;
use std::path::Path;

use pylon::discovery::testing::TestDnsServer;
use pylon::identity::dev::DevCa;
use pylon_proto::v1::EchoRequest;
use tonic::Code;

use crate::common::echo::{echo_client, start_named_echo};
use crate::common::policy::{
    Build, Endpoints, Kind, Protocol, backend, route, service_parent, yaml,
};
use crate::common::{CLIENT_ID, SidecarProc, TempDir, eventually, server_sidecar, sidecar_config};

const GREETER_ID: &str = "spiffe://pylon.test/ns/shop/sa/greeter";

/// The Service `greeter` of namespace `shop` on port 50051, served through
/// the headless Service `greeter-headless`; and a hostnames route on the
/// Service's full name without a port, to a fallback.
fn policy(greeter_port: u16, fallback: SocketAddr) -> String {
    yaml(&[
        backend("greeter", &[], Some(GREETER_ID))
            .in_namespace("shop")
            .protocol(Protocol::Grpc)
            .endpoints(Endpoints::Service {
                name: "greeter-headless".into(),
                namespace: None,
                port: greeter_port,
            }),
        route(Kind::GrpcRoute, "greeter", "", &[("greeter", 1)])
            .in_namespace("shop")
            .hostnames(&[])
            .parent(service_parent("greeter", Some("shop"), Some(50051))),
        backend("fallback", &[fallback], None),
        route(
            Kind::GrpcRoute,
            "fallback",
            "greeter.shop.svc.cluster.local",
            &[("fallback", 1)],
        ),
    ])
}

/// A client sidecar in Kubernetes namespace `namespace`, resolving names
/// with `dns`.
fn client_in(
    ca: &DevCa,
    dir: &Path,
    namespace: &str,
    policy: &str,
    dns: &TestDnsServer,
) -> SidecarProc {
    let name = format!("client-{namespace}");
    let files = ca.write_identity(dir, &name, CLIENT_ID).unwrap();
    let policy_path = dir.join(format!("{name}-policy.yaml"));
    std::fs::write(&policy_path, policy).unwrap();
    let cfg = dir.join(format!("{name}.yaml"));
    let yaml = sidecar_config(&files, &policy_path, "127.0.0.1:9".parse().unwrap())
        + &format!("dns: {{ nameservers: [\"{}\"], minTtl: 1s }}\n", dns.addr());
    std::fs::write(&cfg, yaml).unwrap();
    SidecarProc::spawn_with_env(
        crate::common::PYLON,
        &cfg,
        &[("PYLON_KUBERNETES_NAMESPACE", namespace)],
    )
}

/// Who answered a call to `authority` through `sidecar`: the echo server's
/// name, or the proxy's `x-pylon-error` with the gRPC code.
async fn call(sidecar: &SidecarProc, authority: &str) -> Result<String, (Code, String)> {
    let mut client = echo_client(sidecar.outbound, authority).await;
    match client.unary(EchoRequest::default()).await {
        Ok(resp) => Ok(resp
            .metadata()
            .get("x-served-by")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string()),
        Err(status) => Err((
            status.code(),
            status
                .metadata()
                .get("x-pylon-error")
                .map_or("", |v| v.to_str().unwrap())
                .to_string(),
        )),
    }
}

/// Waits until the Backend named by the Service shorthand has resolved.
async fn wait_resolved(sidecar: &SidecarProc, want: &str) {
    eventually("greeter resolved", async || {
        let config = sidecar.config().await;
        let greeter = config["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == "Backend/shop/greeter")
            .cloned()
            .unwrap_or_default();
        if greeter["endpoints"][0]["address"] == want {
            Ok(())
        } else {
            Err(format!("{greeter:#}"))
        }
    })
    .await;
}

#[tokio::test]
async fn a_route_attached_to_a_service_matches_its_cluster_dns_names() {
    let greeter = start_named_echo("greeter").await;
    let fallback = start_named_echo("fallback").await;
    let dns = TestDnsServer::start().await.unwrap();
    let dir = TempDir::new("gamma");
    let ca = DevCa::new("pylon test root").unwrap();
    let server = server_sidecar(&ca, dir.path(), "greeter", GREETER_ID, greeter.addr);
    dns.set(
        "greeter-headless.shop.svc.cluster.local",
        vec![server.inbound.ip()],
        1,
    );
    let policy = policy(server.inbound.port(), fallback.addr);
    let shop = client_in(&ca, dir.path(), "shop", &policy, &dns);
    let web = client_in(&ca, dir.path(), "web", &policy, &dns);
    for s in [&server, &shop, &web] {
        s.wait_ready().await;
    }
    let greeter_endpoint = format!("127.0.0.1:{}", server.inbound.port());
    wait_resolved(&shop, &greeter_endpoint).await;
    wait_resolved(&web, &greeter_endpoint).await;
    assert!(
        dns.queries("greeter-headless.shop.svc.cluster.local") > 0,
        "the shorthand resolves the Service's fully qualified name"
    );

    let served = Ok("greeter".to_string());
    let no_route = Err((Code::Unimplemented, "no-route".to_string()));
    // From the Service's own namespace: every DNS form with the port,
    // the bare name included.
    for authority in [
        "greeter:50051",
        "greeter.shop:50051",
        "greeter.shop.svc:50051",
        "greeter.shop.svc.cluster.local:50051",
    ] {
        assert_eq!(call(&shop, authority).await, served, "{authority}");
    }
    // A same-named Service elsewhere, another port, no port (port 80).
    for authority in ["greeter.other:50051", "greeter:8080", "greeter"] {
        assert_eq!(call(&shop, authority).await, no_route, "{authority}");
    }
    // The hostnames route on the full name (no port) is a less specific
    // level than the parent with its port: it gets only the other ports.
    assert_eq!(
        call(&shop, "greeter.shop.svc.cluster.local:8080").await,
        Ok("fallback".to_string())
    );

    // From another namespace the bare name is some other Service.
    assert_eq!(call(&web, "greeter:50051").await, no_route);
    for authority in ["greeter.shop:50051", "greeter.shop.svc.cluster.local:50051"] {
        assert_eq!(call(&web, authority).await, served, "{authority}");
    }

    // The config dump shows the names the route was indexed under.
    let config = shop.config().await;
    let route = config["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "GRPCRoute/shop/greeter")
        .cloned()
        .unwrap();
    for host in ["greeter:50051", "greeter.shop.svc.cluster.local:50051"] {
        assert!(
            route["hostnames"]
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h == host),
            "{host}: {route:#}"
        );
    }
}
