//! Metrics and logs as operators see them: OTLP metric points at a real
//! OTLP/gRPC receiver started here, the same names at `/metrics`, RED
//! metrics on both sides of a call, the log filter changed at run time,
//! JSON logs, the control plane's metrics, and the demo and collector
//! config wiring both pipelines. What one request leaves behind (spans,
//! request IDs, access logs) is in `traces.rs`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use pylon_proto::v1::EchoRequest;
use tonic::Request;

use crate::common::chaos::ChaosServer;
use crate::common::control::ControlProc;
use crate::common::echo::echo_client;
use crate::common::otlp::Collector;
use crate::common::policy::{
    self, Build, GrpcCode, Kind, LoadBalancerType, Protocol, RetryOn, TargetKind,
    outlier_detection, retry, target, traffic_policy, yaml,
};
use crate::common::{
    CLIENT_ID, SidecarProc, TempDir, admin_get, admin_send, eventually, sidecar_config,
};
use pylon_test_support::admin::sample;

fn count(receiver: &Collector, name: &str, with: &[(&str, &str)]) -> u64 {
    receiver.count(name, with)
}

/// A sidecar with identity files in `dir`, `policy`, and extra environment.
fn sidecar(dir: &Path, policy: &str, env: &[(&str, &str)]) -> SidecarProc {
    let ca = pylon::identity::dev::DevCa::new("pylon test root").unwrap();
    let files = ca.write_identity(dir, "client", CLIENT_ID).unwrap();
    let policy_path = dir.join("policy.yaml");
    std::fs::write(&policy_path, policy).unwrap();
    let cfg = dir.join("client.yaml");
    let app: SocketAddr = "127.0.0.1:9".parse().unwrap();
    std::fs::write(&cfg, sidecar_config(&files, &policy_path, app)).unwrap();
    SidecarProc::spawn_with_env(crate::common::PYLON, &cfg, env)
}

/// A gRPC route `svc.test` to backend `svc` over `endpoints`, retrying
/// UNAVAILABLE, with outlier detection.
fn resilient_policy(endpoints: &[SocketAddr]) -> String {
    let ms = Duration::from_millis;
    yaml(&[
        policy::backend("svc", endpoints, None).protocol(Protocol::Grpc),
        policy::route(Kind::GrpcRoute, "svc", "svc.test", &[("svc", 1)]).retry(retry(
            3,
            &[RetryOn::Grpc(GrpcCode::Unavailable)],
            ms(1),
            ms(5),
        )),
        traffic_policy("svc", target(TargetKind::Backend, "svc"))
            .load_balancer(LoadBalancerType::RoundRobin)
            .outlier_detection(outlier_detection(3, ms(100), Duration::from_secs(30), 50)),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_retries_and_ejections_reach_an_otlp_receiver_under_the_names_of_metrics() {
    let receiver = Collector::start().await;
    let bad = ChaosServer::start("bad").await;
    bad.set_mode("status=14");
    let good = ChaosServer::start("good").await;
    let dir = TempDir::new("otlp-metrics");
    let endpoint = receiver.endpoint();
    let sidecar = sidecar(
        dir.path(),
        &resilient_policy(&[bad.addr, good.addr]),
        &[
            ("PYLON_TELEMETRY_OTLP_ENDPOINT", &endpoint),
            ("PYLON_TELEMETRY_OTLP_METRICS_INTERVAL", "200ms"),
            ("PYLON_TELEMETRY_SERVICE_NAME", "obs-client"),
        ],
    );
    sidecar.wait_ready().await;
    let mut client = echo_client(sidecar.outbound, "svc.test").await;
    for _ in 0..20 {
        let req = Request::new(EchoRequest {
            payload: b"x".to_vec(),
            ..Default::default()
        });
        client.unary(req).await.expect("retries keep callers whole");
    }

    let route = [("route", "GRPCRoute/svc"), ("backend", "Backend/svc")];
    let ok = [("status", "OK")];
    let svc = [("backend", "Backend/svc")];
    receiver
        .wait_for("20 OK requests, a retry and an ejection", |r| {
            count(r, "pylon_outbound_requests", &[route[0], route[1], ok[0]]) == 20
                && count(r, "pylon_outbound_request_duration_seconds", &route) == 20
                && count(r, "pylon_retries", &svc) >= 1
                && count(r, "pylon_outlier_ejections", &svc) == 1
                && count(r, "pylon_outlier_ejections_active", &svc) == 1
        })
        .await;
    let resource = {
        let got = receiver.metric_exports();
        got.last().unwrap().resource_metrics[0]
            .resource
            .clone()
            .unwrap()
    };
    assert!(
        format!("{resource:?}").contains("obs-client"),
        "service.name: {resource:?}"
    );

    // The same figures under the same names at /metrics.
    let (status, text) = admin_get(sidecar.admin, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    for name in receiver.names() {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} is exported over OTLP but not served at /metrics:\n{text}"
        );
    }
    let retries = count(&receiver, "pylon_retries", &svc);
    assert!(
        sidecar
            .metric("pylon_retries_total{backend=\"Backend/svc\"}")
            .await
            >= retries
    );
    assert_eq!(
        sidecar
            .metric(
                "pylon_outbound_requests_total{route=\"GRPCRoute/svc\",backend=\"Backend/svc\",status=\"OK\"}"
            )
            .await,
        20
    );
    assert_eq!(
        sidecar
            .metric("pylon_connections_active{direction=\"outbound\"}")
            .await,
        1
    );
}

#[tokio::test]
async fn an_absent_collector_slows_no_call() {
    // Nothing listens on the collector's port: export fails, calls do not.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", unused.local_addr().unwrap());
    drop(unused);
    let good = ChaosServer::start("good").await;
    let dir = TempDir::new("otlp-absent");
    let sidecar = sidecar(
        dir.path(),
        &resilient_policy(&[good.addr]),
        &[
            ("PYLON_TELEMETRY_OTLP_ENDPOINT", &endpoint),
            ("PYLON_TELEMETRY_OTLP_METRICS_INTERVAL", "100ms"),
        ],
    );
    sidecar.wait_ready().await;
    let mut client = echo_client(sidecar.outbound, "svc.test").await;
    let started = tokio::time::Instant::now();
    for _ in 0..20 {
        let req = Request::new(EchoRequest::default());
        client.unary(req).await.unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // Failed exports are counted (and exported with the rest, once a
    // collector answers), and logged once per outage.
    eventually("two failed metrics exports", async || {
        let failures = sidecar
            .metric("pylon_otlp_metrics_export_failures_total")
            .await;
        if failures >= 2 {
            Ok(())
        } else {
            Err(sidecar.logs())
        }
    })
    .await;
    assert_eq!(
        sidecar.logs().matches("OTLP metrics export failed").count()
            + sidecar
                .logs()
                .matches("OTLP metrics export timed out")
                .count(),
        1,
        "{}",
        sidecar.logs()
    );
}

/// An HTTP call through the outbound listener that no route matches: the
/// proxy logs it at debug level.
async fn unrouted_call(sidecar: &SidecarProc) {
    let (status, _) = admin_send(sidecar.outbound, "GET", "/nowhere", "")
        .await
        .unwrap();
    assert_eq!(status, 404);
}

const UNROUTED_LOG: &str = "request failed in the proxy";

#[tokio::test]
async fn the_log_filter_changes_at_run_time_and_a_bad_directive_changes_nothing() {
    let dir = TempDir::new("log-level");
    let sidecar = sidecar(dir.path(), "", &[("PYLON_LOG", "info")]);
    sidecar.wait_ready().await;
    assert_eq!(
        admin_get(sidecar.admin, "/log-level").await.unwrap(),
        (200, "info\n".to_string())
    );

    unrouted_call(&sidecar).await;
    // The response came after the record would have been written.
    assert!(!sidecar.logs().contains(UNROUTED_LOG), "{}", sidecar.logs());

    let (status, body) = admin_send(sidecar.admin, "PUT", "/log-level", "info,pylon=debug")
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "pylon=debug,info\n"));
    sidecar
        .wait_log("log filter changed on the admin API")
        .await;
    unrouted_call(&sidecar).await;
    sidecar.wait_log(UNROUTED_LOG).await;

    let (status, body) = admin_send(sidecar.admin, "PUT", "/log-level", "info,pylon=shouty")
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid filter directive"), "{body}");
    assert_eq!(
        admin_get(sidecar.admin, "/log-level").await.unwrap(),
        (200, "pylon=debug,info\n".to_string())
    );

    let (status, _) = admin_send(sidecar.admin, "PUT", "/log-level", "warn")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        admin_get(sidecar.admin, "/log-level").await.unwrap(),
        (200, "warn\n".to_string())
    );
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let dir = TempDir::new("json-logs");
    let sidecar = sidecar(dir.path(), "", &[("PYLON_TELEMETRY_LOG_FORMAT", "json")]);
    sidecar.wait_ready().await;
    unrouted_call(&sidecar).await;
    sidecar.wait_log(UNROUTED_LOG).await;
    let logs = sidecar.logs();
    let mut messages = Vec::new();
    for line in logs.lines() {
        let record: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(record["timestamp"].is_string(), "{line}");
        assert!(record["level"].is_string(), "{line}");
        messages.push(
            record["fields"]["message"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        );
    }
    assert!(
        messages.iter().any(|m| m.starts_with("listening admin=")),
        "{messages:?}"
    );
    let unrouted = logs
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["fields"]["message"] == UNROUTED_LOG)
        .unwrap();
    assert_eq!(unrouted["level"], "DEBUG");
    assert_eq!(unrouted["fields"]["code"], "no-route");
}

#[tokio::test]
async fn control_plane_metrics_count_an_apply_and_an_ack() {
    let dir = TempDir::new("control-metrics");
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let control = ControlProc::spawn_with(
        crate::common::PYLON_CONTROL,
        &dir.path().join("data"),
        listen,
        &["--metrics-listen", "127.0.0.1:0"],
    );
    // Logged before the control plane says it listens.
    let logs = control.logs();
    let metrics_addr: SocketAddr = logs
        .split("serving metrics on http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address logged:\n{logs}"));
    let version = control.apply(&yaml(&[policy::backend(
        "svc",
        &["127.0.0.1:9".parse().unwrap()],
        None,
    )
    .protocol(Protocol::Grpc)]));
    let version: u64 = version.trim().parse().unwrap_or(1);

    // A sidecar streams the policy and ACKs it.
    let ca = pylon::identity::dev::DevCa::new("pylon test root").unwrap();
    let files = ca.write_identity(dir.path(), "client", CLIENT_ID).unwrap();
    let token = control.token_file(dir.path(), "client", CLIENT_ID);
    let cfg = dir.path().join("client.yaml");
    std::fs::write(
        &cfg,
        format!(
            "admin: {{ listen: \"127.0.0.1:0\", probeListen: \"127.0.0.1:0\" }}
outbound: {{ listen: \"127.0.0.1:0\" }}
inbound: {{ listen: \"127.0.0.1:0\", app: \"127.0.0.1:9\" }}
identity:
  files: {{ cert: {:?}, key: {:?}, trustBundle: {:?} }}
policy: {{ controlPlane: {{}} }}
controlPlane: {{ address: {:?}, caFile: {:?}, tokenFile: {:?} }}
stateDir: {:?}
",
            files.cert,
            files.key,
            files.trust_bundle,
            control.address(),
            control.ca_file(),
            token,
            dir.path().join("state"),
        ),
    )
    .unwrap();
    let sidecar = SidecarProc::spawn(crate::common::PYLON, &cfg);
    sidecar.wait_ready().await;
    control.wait_acked(&[CLIENT_ID], version).await;

    let text = eventually("an apply and an ACK counted", async || {
        match admin_get(metrics_addr, "/metrics").await {
            Ok((200, text)) => {
                let value = |name: &str| sample(&text, name);
                if value("pylon_control_applies_total") >= 1
                    && value("pylon_control_acks_total") >= 1
                    && value("pylon_control_connected_sidecars") >= 1
                {
                    Ok(text)
                } else {
                    Err(text)
                }
            }
            scraped => Err(format!("no metrics: {scraped:?}\n{}", control.logs())),
        }
    })
    .await;
    assert!(text.contains("pylon_control_pushes_total"), "{text}");
    assert!(text.contains("pylon_control_nacks_total"), "{text}");
    drop(sidecar);
}

#[test]
fn the_collector_config_wires_every_pipeline_to_defined_components() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/otel-collector.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let config: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
    let defined = |section: &str, name: &str| config[section].get(name).is_some();
    let pipelines = config["service"]["pipelines"].as_object().unwrap();
    assert!(pipelines.contains_key("traces") && pipelines.contains_key("metrics"));
    for (pipeline, spec) in pipelines {
        for section in ["receivers", "processors", "exporters"] {
            let names = spec[section].as_array().unwrap();
            assert!(
                !names.is_empty() || section == "processors",
                "{pipeline}.{section}"
            );
            for name in names {
                let name = name.as_str().unwrap();
                assert!(
                    defined(section, name),
                    "pipeline {pipeline} uses {section} {name}, which is not defined"
                );
            }
        }
        let processors = spec["processors"].as_array().unwrap();
        assert_eq!(
            processors[0], "memory_limiter",
            "{pipeline}: memory_limiter first"
        );
        assert_eq!(
            processors.last().unwrap(),
            "batch",
            "{pipeline}: batch last"
        );
    }
    for name in config["service"]["extensions"].as_array().unwrap() {
        assert!(defined("extensions", name.as_str().unwrap()));
    }
    let otlp = &config["receivers"]["otlp"]["protocols"];
    assert_eq!(otlp["grpc"]["endpoint"], "0.0.0.0:4317");
    assert_eq!(otlp["http"]["endpoint"], "0.0.0.0:4318");
    assert_eq!(
        config["exporters"]["prometheus"]["endpoint"],
        "0.0.0.0:8889"
    );
    assert_eq!(pipelines["metrics"]["exporters"][0], "prometheus");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_exports_metrics_and_control_plane_spans_to_a_collector() {
    let receiver = Collector::start().await;
    let endpoint = receiver.endpoint();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(crate::common::PYLON)
            .args(["demo", "--duration", "2s", "--rps", "50", "--otlp"])
            .arg(endpoint)
            .env_remove("PYLON_LOG")
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let services: Vec<String> = receiver
        .metric_exports()
        .iter()
        .flat_map(|r| &r.resource_metrics)
        .map(|rm| format!("{:?}", rm.resource))
        .collect();
    for service in ["\"client\"", "\"greeter-1\"", "\"pylon-control\""] {
        assert!(
            services.iter().any(|s| s.contains(service)),
            "no metrics from {service}: {services:?}"
        );
    }
    // The control plane's API spans are flushed when it stops.
    let spans = format!("{:?}", receiver.trace_exports());
    assert!(spans.contains("pylon-control"), "{spans}");
    assert!(
        spans.contains("/pylon.v1.Identity/IssueCertificate"),
        "{spans}"
    );
    assert!(spans.contains("rpc.system"), "{spans}");
}

#[tokio::test]
async fn red_metrics_on_both_sides_of_a_mesh_call_and_state_gauges() {
    let app = crate::common::echo::start_echo().await;
    let mesh = crate::common::Mesh::start(app.addr).await;
    let mut client = echo_client(mesh.client.outbound, "echo.test").await;
    for _ in 0..3 {
        client
            .unary(Request::new(EchoRequest::default()))
            .await
            .unwrap();
    }
    let mut web = echo_client(mesh.client.outbound, "nowhere.test").await;
    let status = web
        .unary(Request::new(EchoRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);

    let route = "route=\"GRPCRoute/echo\",backend=\"Backend/app\"";
    assert_eq!(
        mesh.client
            .metric(&format!(
                "pylon_outbound_requests_total{{{route},status=\"OK\"}}"
            ))
            .await,
        3
    );
    assert_eq!(
        mesh.client
            .metric(&format!(
                "pylon_outbound_request_duration_seconds_count{{{route}}}"
            ))
            .await,
        3
    );
    // The server side counts when the response body ends: poll.
    eventually("three OK calls counted by the server", async || {
        mesh.server
            .metric("pylon_inbound_requests_total{status=\"OK\"}")
            .await
            == 3
    })
    .await;
    assert_eq!(
        mesh.server
            .metric("pylon_inbound_request_duration_seconds_count")
            .await,
        3
    );
    assert_eq!(
        mesh.server
            .metric("pylon_connections_active{direction=\"inbound\"}")
            .await,
        1,
        "one pooled mTLS connection from the client sidecar"
    );

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expiry = mesh
        .client
        .metric("pylon_certificate_expiry_timestamp_seconds")
        .await;
    // The test CA issues long-lived certificates.
    assert!(expiry > now, "{expiry}");
    assert_eq!(mesh.client.metric("pylon_policy_installed").await, 1);
    assert_eq!(mesh.client.metric("pylon_trust_bundle_roots").await, 1);
    let (_, text) = admin_get(mesh.client.admin, "/metrics").await.unwrap();
    assert!(
        text.contains("\npylon_control_plane_connected 0\n"),
        "a policy file has no control plane:\n{text}"
    );
}
