//! The resilience stack against servers that misbehave on command: what the
//! caller sees, what the servers saw (attempts, deadlines) and the metrics.
//!
//! Most tests put one sidecar in front of plaintext chaos servers: the
//! outbound stack is the subject, mTLS is proven elsewhere.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;
use pylon_proto::v1::EchoRequest;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Status};

use crate::common::chaos::ChaosServer;
use crate::common::echo::{echo_client, start_echo};
use crate::common::policy::{
    self, AbortStatus, Build, CircuitBreaker, Endpoints, GrpcCode, Kind, LoadBalancerType,
    Protocol, Resource, Retry, RetryOn, TargetKind, abort, delay, outlier_detection, retry, target,
    timeouts, traffic_policy, yaml,
};
use crate::common::{
    PATIENCE, SidecarProc, TempDir, admin_get, client_sidecar, eventually, eventually_every,
    set_policy,
};

type Client = pylon_proto::v1::echo_client::EchoClient<tonic::transport::Channel>;

/// One sidecar with `policy`, plus its scratch directory.
struct Fixture {
    _dir: TempDir,
    sidecar: SidecarProc,
    policy: PathBuf,
}

impl Fixture {
    async fn start(policy: &str) -> Fixture {
        let dir = TempDir::new("resilience");
        let ca = pylon::identity::dev::DevCa::new("pylon test root").unwrap();
        let (sidecar, policy_path) = client_sidecar(&ca, dir.path(), policy);
        sidecar.wait_ready().await;
        Fixture {
            _dir: dir,
            sidecar,
            policy: policy_path,
        }
    }

    async fn client(&self) -> Client {
        echo_client(self.sidecar.outbound, "svc.test").await
    }

    /// The value of one sample line of `/metrics`, 0 if absent.
    async fn metric(&self, sample: &str) -> u64 {
        self.sidecar.metric(sample).await
    }

    /// A per-backend metric of backend `svc`.
    async fn svc(&self, name: &str) -> u64 {
        self.metric(&format!("{name}{{backend=\"Backend/svc\"}}"))
            .await
    }

    async fn endpoints(&self) -> Vec<serde_json::Value> {
        let config = self.sidecar.config().await;
        config["backends"][0]["endpoints"]
            .as_array()
            .unwrap()
            .clone()
    }
}

/// A plaintext gRPC backend `svc` over `endpoints`.
fn backend(endpoints: &[SocketAddr]) -> Resource {
    policy::backend("svc", endpoints, None).protocol(Protocol::Grpc)
}

/// A GRPCRoute `svc.test` → `svc`, in one rule.
fn route() -> Resource {
    policy::route(Kind::GrpcRoute, "svc", "svc.test", &[("svc", 1)])
}

/// A BackendTrafficPolicy for `svc` that sets nothing yet.
fn traffic() -> Resource {
    traffic_policy("svc", target(TargetKind::Backend, "svc"))
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A retry of `attempts` on `code`, backoff from 1ms to `max_ms`.
fn retry_on(attempts: u32, code: GrpcCode, max_ms: u64) -> Retry {
    retry(attempts, &[RetryOn::Grpc(code)], ms(1), ms(max_ms))
}

fn chaos(directives: &str, payload: &[u8]) -> Request<EchoRequest> {
    let mut r = Request::new(EchoRequest {
        payload: payload.to_vec(),
        ..Default::default()
    });
    if !directives.is_empty() {
        r.metadata_mut()
            .insert("x-chaos", MetadataValue::try_from(directives).unwrap());
    }
    r
}

fn pylon_error(status: &Status) -> Option<String> {
    status
        .metadata()
        .get("x-pylon-error")
        .map(|v| v.to_str().unwrap().to_string())
}

/// `retry: { attempts: 3, codes: [UNAVAILABLE], backoff: { base: 1ms, max: 5ms } }`
fn retry_unavailable() -> Retry {
    retry_on(3, GrpcCode::Unavailable, 5)
}

#[tokio::test]
async fn retries_mask_failures_and_mark_each_attempt() {
    let server = ChaosServer::start("a").await;
    let f = Fixture::start(&yaml(&[
        backend(&[server.addr]),
        route().retry(retry_unavailable()),
    ]))
    .await;
    let mut client = f.client().await;
    let reply = client
        .unary(chaos("fail-first=2;key=k1", b"hello"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.payload, b"hello");
    let attempts: Vec<Option<String>> = server.seen().iter().map(|s| s.attempt.clone()).collect();
    assert_eq!(
        attempts,
        vec![Some("1".into()), Some("2".into()), Some("3".into())]
    );
    assert_eq!(f.svc("pylon_retries_total").await, 2);
    assert_eq!(f.svc("pylon_backend_requests_total").await, 1);
}

#[tokio::test]
async fn nothing_is_retried_without_a_policy_or_outside_its_codes() {
    let server = ChaosServer::start("a").await;
    let f = Fixture::start(&yaml(&[backend(&[server.addr]), route()])).await;
    let mut client = f.client().await;
    let status = client
        .unary(chaos("fail-first=1;key=k", b""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(pylon_error(&status), None, "the app's own answer");
    assert_eq!(server.requests(), 1);

    set_policy(
        &f.sidecar,
        &f.policy,
        &yaml(&[backend(&[server.addr]), route().retry(retry_unavailable())]),
    )
    .await;
    let status = client.unary(chaos("status=13", b"")).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(server.requests(), 2, "INTERNAL is not in the retry codes");
}

#[tokio::test]
async fn exhausted_retries_return_the_last_answer() {
    let server = ChaosServer::start("a").await;
    server.set_mode("status=14");
    let f = Fixture::start(&yaml(&[
        backend(&[server.addr]),
        route().retry(retry_on(2, GrpcCode::Unavailable, 2)),
    ]))
    .await;
    let status = f.client().await.unary(chaos("", b"")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "chaos");
    assert_eq!(server.requests(), 3);
    assert_eq!(f.svc("pylon_retries_exhausted_total").await, 1);
}

#[tokio::test]
async fn a_status_in_trailers_is_retried_and_pushback_is_honoured() {
    let server = ChaosServer::start("a").await;
    let f = Fixture::start(&yaml(&[
        backend(&[server.addr]),
        route().retry(retry_on(1, GrpcCode::Unavailable, 2)),
    ]))
    .await;
    let mut client = f.client().await;
    let status = client
        .unary(chaos("trailer-status=14", b""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        server.requests(),
        2,
        "headers, then UNAVAILABLE in trailers: retried once"
    );

    let status = client
        .unary(chaos("status=14;pushback=-1", b""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(server.requests(), 3, "negative pushback: no retry");

    let reply = client
        .unary(chaos("fail-first=1;key=p;pushback=20", b"ok"))
        .await;
    assert_eq!(reply.unwrap().into_inner().payload, b"ok");
    assert_eq!(server.requests(), 5);
}

#[tokio::test]
async fn a_servers_pushback_cannot_park_a_call_beyond_the_routes_backoff() {
    let server = ChaosServer::start("a").await;
    let f = Fixture::start(&yaml(&[
        backend(&[server.addr]),
        route().retry(retry_on(1, GrpcCode::Unavailable, 2)),
    ]))
    .await;
    // An hour's pushback within a minute's deadline: taken as asked, the
    // wait would pass the deadline and the call would end UNAVAILABLE with
    // no retry; capped at the backoff maximum, the retry goes out.
    let mut req = chaos("fail-first=1;key=park;pushback=3600000", b"ok");
    req.set_timeout(std::time::Duration::from_secs(60));
    let reply = f.client().await.unary(req).await;
    assert_eq!(reply.unwrap().into_inner().payload, b"ok");
    assert_eq!(server.requests(), 2);
    assert_eq!(f.svc("pylon_retries_total").await, 1);
}

#[tokio::test]
async fn connect_failures_are_retried_on_another_endpoint() {
    let good = ChaosServer::start("good").await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // The codes do not list UNAVAILABLE: a request that never reached a
    // server is always safe to send again.
    let f = Fixture::start(&yaml(&[
        backend(&[closed, good.addr]),
        route().retry(retry_on(1, GrpcCode::ResourceExhausted, 2)),
    ]))
    .await;
    let mut client = f.client().await;
    for i in 0..20 {
        let reply = client.unary(chaos("", format!("{i}").as_bytes())).await;
        assert_eq!(
            reply.unwrap().into_inner().payload,
            format!("{i}").as_bytes()
        );
    }
    assert_eq!(good.requests(), 20);
}

#[tokio::test]
async fn a_retry_prefers_an_endpoint_not_yet_tried() {
    let bad = ChaosServer::start("bad").await;
    bad.set_mode("status=14");
    let good = ChaosServer::start("good").await;
    // Round robin sends every other first try to the bad endpoint; each
    // retry must then go to the other one.
    let f = Fixture::start(&yaml(&[
        backend(&[bad.addr, good.addr]),
        route().retry(retry_on(1, GrpcCode::Unavailable, 2)),
        traffic().load_balancer(LoadBalancerType::RoundRobin),
    ]))
    .await;
    let mut client = f.client().await;
    for _ in 0..30 {
        client.unary(chaos("", b"x")).await.unwrap();
    }
    assert_eq!(good.requests(), 30);
    assert_eq!(bad.requests(), 15);
}

#[tokio::test]
async fn the_retry_budget_caps_retries() {
    let server = ChaosServer::start("a").await;
    server.set_mode("status=14");
    let f = Fixture::start(&yaml(&[
        backend(&[server.addr]),
        route().retry(retry_unavailable()),
        traffic().retry_budget(0.0, 1),
    ]))
    .await;
    let mut client = f.client().await;
    for _ in 0..20 {
        let status = client.unary(chaos("", b"")).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            pylon_error(&status),
            None,
            "the caller gets the last real answer"
        );
    }
    // 1 retry per second over the 10 s window: 10 retries in all.
    assert_eq!(server.requests(), 20 + 10);
    assert_eq!(f.svc("pylon_retries_total").await, 10);
    assert!(f.svc("pylon_retries_budget_denied_total").await >= 10);
}

#[tokio::test]
async fn request_bodies_are_replayed_up_to_the_limit() {
    let server = ChaosServer::start("a").await;
    let f = Fixture::start(&yaml(&[
        backend(&[server.addr]),
        route().retry(retry_unavailable()),
    ]))
    .await;
    let mut client = f.client().await;

    // A small client stream is replayed whole on the retry.
    let parts: Vec<EchoRequest> = (0..10)
        .map(|i| EchoRequest {
            payload: format!("part{i};").into_bytes(),
            ..Default::default()
        })
        .collect();
    let mut req = Request::new(futures_util::stream::iter(parts));
    req.metadata_mut().insert(
        "x-chaos",
        MetadataValue::from_static("fail-first=1;key=small"),
    );
    let reply = client.client_stream(req).await.unwrap().into_inner();
    let seen = server.seen();
    assert_eq!(
        reply.payload, b"part9;",
        "the server echoes the last message"
    );
    assert_eq!(seen.len(), 2);
    // Each message: 5 bytes of framing, 2 of protobuf tag and length, 6 of payload.
    assert_eq!(seen[0].body_len, Some(10 * 13));
    assert_eq!(
        seen[1].body_len,
        Some(10 * 13),
        "the retry got the whole body again"
    );

    // A body over 64 KiB is sent once and not retried.
    let big = vec![7u8; 100 * 1024];
    let status = client
        .unary(chaos("fail-first=1;key=big", &big))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(server.requests(), 3);
}

#[tokio::test]
async fn deadlines_are_enforced_and_the_remaining_time_forwarded() {
    let server = ChaosServer::start("a").await;
    let f = Fixture::start(&yaml(&[backend(&[server.addr]), route()])).await;
    let mut client = f.client().await;

    // The caller's deadline. A raw HTTP/2 call, since a client library
    // that enforced it itself would give up at the same moment as the proxy.
    let mut h2 = crate::common::http::h2c(f.sidecar.outbound).await;
    let req = http::Request::post("http://svc.test/pylon.v1.Echo/Unary")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .header("x-chaos", "hang")
        .body(crate::common::http::full(vec![0u8, 0, 0, 0, 0]))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["grpc-status"], "4");
    assert_eq!(resp.headers()["x-pylon-error"], "deadline-exceeded");
    let seen = server.seen();
    let forwarded = seen[0]
        .grpc_timeout
        .clone()
        .expect("grpc-timeout forwarded");
    let forwarded = pylon::http::deadline::parse_grpc_timeout(&forwarded.parse().unwrap()).unwrap();
    assert!(forwarded <= Duration::from_millis(300), "{forwarded:?}");
    eventually("the upstream call reset", async || server.cancelled() >= 1).await;

    // The route's deadline, when the caller sets none.
    set_policy(
        &f.sidecar,
        &f.policy,
        &yaml(&[
            backend(&[server.addr]),
            route().timeouts(timeouts(Some(ms(200)), None)),
        ]),
    )
    .await;
    let status = client.unary(chaos("hang", b"")).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert_eq!(pylon_error(&status).as_deref(), Some("deadline-exceeded"));
    let forwarded = server.seen()[1]
        .grpc_timeout
        .clone()
        .expect("grpc-timeout set from the route");
    let forwarded = pylon::http::deadline::parse_grpc_timeout(&forwarded.parse().unwrap()).unwrap();
    assert!(forwarded <= Duration::from_millis(200), "{forwarded:?}");
    assert!(
        f.metric("pylon_timeouts_total{backend=\"Backend/svc\",kind=\"request\"}")
            .await
            >= 1
    );
}

#[tokio::test]
async fn an_attempt_timeout_retries_with_the_time_that_remains() {
    let server = ChaosServer::start("a").await;
    let f = Fixture::start(&yaml(&[
        backend(&[server.addr]),
        route()
            .timeouts(timeouts(Some(Duration::from_secs(5)), Some(ms(200))))
            .retry(retry_on(2, GrpcCode::DeadlineExceeded, 2)),
    ]))
    .await;
    let reply = f
        .client()
        .await
        .unary(chaos("hang-first=1;key=t", b"late"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.payload, b"late");
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    let t = |i: usize| {
        pylon::http::deadline::parse_grpc_timeout(
            &seen[i].grpc_timeout.clone().unwrap().parse().unwrap(),
        )
        .unwrap()
    };
    assert!(
        t(1) < t(0),
        "the second attempt gets less time: {:?} then {:?}",
        t(0),
        t(1)
    );
    assert!(t(0) <= Duration::from_secs(5));
    assert_eq!(
        f.metric("pylon_timeouts_total{backend=\"Backend/svc\",kind=\"attempt\"}")
            .await,
        1
    );
}

#[tokio::test]
async fn a_route_deadline_ends_a_stream_that_outlives_it() {
    let mut app = start_echo().await;
    let f = Fixture::start(&yaml(&[
        backend(&[app.addr]),
        route().timeouts(timeouts(Some(ms(300)), None)),
    ]))
    .await;
    let mut client = f.client().await;
    let mut stream = client
        .server_stream(EchoRequest {
            payload: b"tick".to_vec(),
            count: u32::MAX,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut received = 0;
    let status = loop {
        match stream.next().await {
            Some(Ok(_)) => received += 1,
            Some(Err(status)) => break status,
            None => panic!("the stream ended without a status"),
        }
    };
    assert!(received > 0);
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert_eq!(pylon_error(&status).as_deref(), Some("deadline-exceeded"));
    tokio::time::timeout(PATIENCE, app.cancelled.recv())
        .await
        .expect("the app's stream was reset")
        .unwrap();
}

/// Outlier detection, with round robin so that a bad endpoint's share of
/// first tries does not depend on latency estimates.
/// `loadBalancer: { type: RoundRobin }`, `outlierDetection: {
/// consecutive5xxErrors: 3, interval: 100ms, baseEjectionTime: 30s,
/// maxEjectionPercent: 50 }`.
fn eject() -> Resource {
    traffic()
        .load_balancer(LoadBalancerType::RoundRobin)
        .outlier_detection(outlier_detection(3, ms(100), Duration::from_secs(30), 50))
}

#[tokio::test]
async fn a_failing_endpoint_is_ejected_while_retries_keep_callers_whole() {
    let bad = ChaosServer::start("bad").await;
    bad.set_mode("status=14");
    let good1 = ChaosServer::start("good1").await;
    let good2 = ChaosServer::start("good2").await;
    let f = Fixture::start(&yaml(&[
        backend(&[bad.addr, good1.addr, good2.addr]),
        route().retry(retry_unavailable()),
        eject(),
    ]))
    .await;
    let mut client = f.client().await;
    for _ in 0..60 {
        client.unary(chaos("", b"x")).await.unwrap();
    }
    let endpoints = f.endpoints().await;
    let bad_ep = endpoints
        .iter()
        .find(|e| e["address"] == bad.addr.to_string())
        .unwrap();
    assert_eq!(bad_ep["state"], "ejected", "{endpoints:#?}");
    assert_eq!(bad_ep["ejections"], 1);
    assert_eq!(bad.requests(), 3, "three failures, then no more traffic");
    for _ in 0..30 {
        client.unary(chaos("", b"x")).await.unwrap();
    }
    assert_eq!(bad.requests(), 3);
    assert_eq!(f.svc("pylon_outlier_ejections_total").await, 1);
    assert_eq!(f.svc("pylon_outlier_ejections_active").await, 1);
}

#[tokio::test]
async fn when_every_endpoint_is_ejected_calls_fail_fast_until_one_returns() {
    let a = ChaosServer::start("a").await;
    let b = ChaosServer::start("b").await;
    a.set_mode("status=14");
    b.set_mode("status=14");
    let f = Fixture::start(&yaml(&[
        backend(&[a.addr, b.addr]),
        route(),
        traffic().outlier_detection(outlier_detection(1, ms(100), Duration::from_secs(1), 100)),
    ]))
    .await;
    let mut client = f.client().await;
    for _ in 0..2 {
        let _ = client.unary(chaos("", b"")).await;
    }
    let status = client.unary(chaos("", b"")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(pylon_error(&status).as_deref(), Some("no-healthy-endpoint"));
    assert_eq!(a.requests() + b.requests(), 2);

    // Healed, they come back after their ejection time, on probation.
    a.set_mode("ok");
    b.set_mode("ok");
    eventually_every(
        "the endpoints returned",
        Duration::from_millis(50),
        async || client.unary(chaos("", b"back")).await.is_ok(),
    )
    .await;
    let states: Vec<String> = f
        .endpoints()
        .await
        .iter()
        .map(|e| e["state"].as_str().unwrap().to_string())
        .collect();
    assert!(
        states.iter().all(|s| s != "ejected" || states.len() > 1),
        "{states:?}"
    );
}

#[tokio::test]
async fn a_full_bulkhead_fails_fast_with_overflow() {
    let server = ChaosServer::start("a").await;
    server.set_mode("hang");
    let f = Fixture::start(&yaml(&[
        backend(&[server.addr]),
        route(),
        traffic().circuit_breaker(CircuitBreaker {
            max_parallel_requests: Some(2),
            ..CircuitBreaker::default()
        }),
    ]))
    .await;
    let client = f.client().await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = client.clone();
        held.push(tokio::spawn(async move { c.unary(chaos("", b"")).await }));
    }
    eventually("both held calls at the server", async || {
        server.requests() >= 2
    })
    .await;
    let status = client.clone().unary(chaos("", b"")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(pylon_error(&status).as_deref(), Some("overflow"));
    assert_eq!(
        server.requests(),
        2,
        "the refused call never left the sidecar"
    );
    assert_eq!(f.svc("pylon_bulkhead_overflow_total").await, 1);
    for h in held {
        h.abort();
    }
}

#[tokio::test]
async fn the_rate_limit_refuses_with_retry_after() {
    let server = ChaosServer::start("a").await;
    let f = Fixture::start(&yaml(&[
        backend(&[server.addr]),
        route(),
        traffic().rate_limit(1, 2),
    ]))
    .await;
    let mut client = f.client().await;
    client.unary(chaos("", b"")).await.unwrap();
    client.unary(chaos("", b"")).await.unwrap();
    let status = client.unary(chaos("", b"")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(pylon_error(&status).as_deref(), Some("rate-limited"));
    let retry_after: u64 = status
        .metadata()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    assert_eq!(server.requests(), 2);
    assert_eq!(f.svc("pylon_rate_limited_total").await, 1);
}

#[tokio::test]
async fn least_request_favours_the_faster_endpoint_and_round_robin_alternates() {
    let slow = ChaosServer::start("slow").await;
    slow.set_mode("delay=50");
    let fast = ChaosServer::start("fast").await;
    let f = Fixture::start(&yaml(&[backend(&[slow.addr, fast.addr]), route()])).await;
    let mut client = f.client().await;
    for _ in 0..100 {
        client.unary(chaos("", b"")).await.unwrap();
    }
    assert!(
        fast.requests() >= 90,
        "fast {} slow {}",
        fast.requests(),
        slow.requests()
    );

    set_policy(
        &f.sidecar,
        &f.policy,
        &yaml(&[
            backend(&[slow.addr, fast.addr]),
            route(),
            traffic().load_balancer(LoadBalancerType::RoundRobin),
        ]),
    )
    .await;
    let (s0, f0) = (slow.requests(), fast.requests());
    for _ in 0..20 {
        client.unary(chaos("", b"")).await.unwrap();
    }
    assert_eq!((slow.requests() - s0, fast.requests() - f0), (10, 10));
}

#[tokio::test]
async fn faults_are_injected_as_configured() {
    let server = ChaosServer::start("a").await;
    let f = Fixture::start(&yaml(&[
        backend(&[server.addr]),
        route().fault(abort(AbortStatus::Grpc(GrpcCode::Unavailable), 100.0)),
    ]))
    .await;
    let mut client = f.client().await;
    let status = client.unary(chaos("", b"")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(pylon_error(&status).as_deref(), Some("fault-injected"));
    assert_eq!(server.requests(), 0);

    set_policy(
        &f.sidecar,
        &f.policy,
        &yaml(&[
            backend(&[server.addr]),
            route()
                .fault(delay(Duration::from_secs(5), 100.0))
                .timeouts(timeouts(Some(ms(200)), None)),
        ]),
    )
    .await;
    let status = client.unary(chaos("", b"")).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);

    set_policy(
        &f.sidecar,
        &f.policy,
        &yaml(&[
            backend(&[server.addr]),
            route().fault(abort(AbortStatus::Grpc(GrpcCode::Unavailable), 50.0)),
        ]),
    )
    .await;
    let mut aborted = 0;
    for _ in 0..200 {
        if client.unary(chaos("", b"")).await.is_err() {
            aborted += 1;
        }
    }
    assert!(
        (60..140).contains(&aborted),
        "{aborted} of 200 aborted at 50 %"
    );
    assert_eq!(
        f.metric("pylon_faults_injected_total{route=\"GRPCRoute/svc\",fault=\"abort\"}")
            .await,
        1 + aborted
    );
}

#[tokio::test]
async fn ejections_and_permits_survive_a_reload() {
    let bad = ChaosServer::start("bad").await;
    bad.set_mode("status=14");
    let good = ChaosServer::start("good").await;
    let policy = |extra_route: Option<Resource>| {
        let mut resources = vec![
            backend(&[bad.addr, good.addr]),
            route().retry(retry_unavailable()),
            eject().circuit_breaker(CircuitBreaker {
                max_parallel_requests: Some(1),
                ..CircuitBreaker::default()
            }),
        ];
        resources.extend(extra_route);
        yaml(&resources)
    };
    let f = Fixture::start(&policy(None)).await;
    let mut client = f.client().await;
    while bad.requests() < 3 {
        client.unary(chaos("", b"")).await.unwrap();
    }
    // A call holds the single bulkhead slot across the reload.
    let before = good.requests();
    let mut holder = client.clone();
    let held = tokio::spawn(async move { holder.unary(chaos("hang", b"")).await });
    eventually("the held call arrived", async || good.requests() != before).await;

    set_policy(
        &f.sidecar,
        &f.policy,
        &policy(Some(policy::route(
            Kind::HttpRoute,
            "other",
            "other.test",
            &[("svc", 1)],
        ))),
    )
    .await;
    let endpoints = f.endpoints().await;
    let bad_ep = endpoints
        .iter()
        .find(|e| e["address"] == bad.addr.to_string())
        .unwrap();
    assert_eq!(
        bad_ep["state"], "ejected",
        "the ejection survived the reload: {endpoints:#?}"
    );
    let status = client.unary(chaos("", b"")).await.unwrap_err();
    assert_eq!(
        pylon_error(&status).as_deref(),
        Some("overflow"),
        "the slot is still held"
    );

    // A higher limit applies at once; the call in flight carries on.
    set_policy(
        &f.sidecar,
        &f.policy,
        &yaml(&[
            backend(&[bad.addr, good.addr]),
            route().retry(retry_unavailable()),
            eject().circuit_breaker(CircuitBreaker {
                max_parallel_requests: Some(2),
                ..CircuitBreaker::default()
            }),
        ]),
    )
    .await;
    client.unary(chaos("", b"")).await.unwrap();
    assert!(
        !held.is_finished(),
        "the held call was not dropped by the reloads"
    );
    held.abort();
}

/// A plaintext HTTP/1.1 backend `web`, a route `web.test` to it (with
/// `rule`'s settings) and a BackendTrafficPolicy for it (with `traffic`'s).
fn web_policy(
    endpoint: SocketAddr,
    rule: impl FnOnce(Resource) -> Resource,
    traffic: impl FnOnce(Resource) -> Resource,
) -> String {
    yaml(&[
        policy::backend("web", &[endpoint], None).protocol(Protocol::Http1),
        rule(policy::route(
            Kind::HttpRoute,
            "web",
            "web.test",
            &[("web", 1)],
        )),
        traffic(traffic_policy("web", target(TargetKind::Backend, "web"))),
    ])
}

async fn http_get(sidecar: &SidecarProc, chaos: &str) -> http::Response<hyper::body::Incoming> {
    let mut conn = crate::common::http::http1(sidecar.outbound).await;
    let req = http::Request::get("/x")
        .header("host", "web.test")
        .header("x-chaos", chaos)
        .body(crate::common::http::empty())
        .unwrap();
    conn.send_request(req).await.unwrap()
}

#[tokio::test]
async fn http_callers_get_http_statuses_for_timeouts_limits_and_retries() {
    let server = ChaosServer::start("web").await;
    let f = Fixture::start(&web_policy(
        server.addr,
        |r| {
            r.timeouts(timeouts(Some(ms(200)), None)).retry(retry(
                1,
                &[RetryOn::Http(503)],
                ms(1),
                ms(2),
            ))
        },
        |t| t.rate_limit(1, 2),
    ))
    .await;

    let resp = http_get(&f.sidecar, "hang").await;
    assert_eq!(resp.status(), 504);
    assert_eq!(resp.headers()["x-pylon-error"], "deadline-exceeded");

    let resp = http_get(&f.sidecar, "fail-first=1;key=h").await;
    assert_eq!(
        resp.status(),
        200,
        "a 503 is retried when the policy lists it"
    );
    assert_eq!(server.seen().last().unwrap().attempt.as_deref(), Some("2"));

    let resp = http_get(&f.sidecar, "").await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["x-pylon-error"], "rate-limited");
    assert!(resp.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn max_connections_caps_connections_to_a_backend() {
    let server = ChaosServer::start("web").await;
    server.set_mode("hang");
    let f = Fixture::start(&web_policy(
        server.addr,
        |r| r,
        |t| {
            t.circuit_breaker(CircuitBreaker {
                max_connections: Some(1),
                ..CircuitBreaker::default()
            })
        },
    ))
    .await;
    // HTTP/1.1 needs a connection per call in flight: the first holds the
    // only one allowed.
    let sidecar_outbound = f.sidecar.outbound;
    let held = tokio::spawn(async move {
        let mut conn = crate::common::http::http1(sidecar_outbound).await;
        let req = http::Request::get("/x")
            .header("host", "web.test")
            .body(crate::common::http::empty())
            .unwrap();
        conn.send_request(req).await
    });
    eventually("the held request at the server", async || {
        server.requests() >= 1
    })
    .await;
    let resp = http_get(&f.sidecar, "").await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-pylon-error"], "overflow");
    assert_eq!(server.requests(), 1);
    held.abort();
}

#[tokio::test]
async fn the_local_app_is_protected_by_its_service_account_policy() {
    use crate::common::{Mesh, SERVER_ID};
    let app = ChaosServer::start("app").await;
    let mesh = Mesh::start(app.addr).await;
    // The server sidecar's own policy: its service account is `echo`.
    assert!(SERVER_ID.ends_with("/ns/default/sa/echo"));
    let server_policy = mesh.dir.path().join("server-policy.yaml");
    let protect = traffic_policy("protect-echo", target(TargetKind::ServiceAccount, "echo"))
        .circuit_breaker(CircuitBreaker {
            max_parallel_requests: Some(1),
            ..CircuitBreaker::default()
        })
        .rate_limit(1, 2);
    set_policy(&mesh.server, &server_policy, &yaml(&[protect])).await;

    let client = echo_client(mesh.client.outbound, "echo.test").await;
    app.set_mode("hang");
    let mut holder = client.clone();
    let held = tokio::spawn(async move { holder.unary(chaos("", b"")).await });
    eventually("the held call at the app", async || app.requests() >= 1).await;
    let status = client.clone().unary(chaos("", b"")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(pylon_error(&status).as_deref(), Some("overflow"));
    held.abort();

    // The burst of 2 is spent (the held call and the refused one took a
    // token each): the next call is rate limited.
    let status = client.clone().unary(chaos("", b"")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(pylon_error(&status).as_deref(), Some("rate-limited"));
    assert_eq!(app.requests(), 1, "refused calls never reached the app");
    let metrics = admin_get(mesh.server.admin, "/metrics").await.unwrap().1;
    assert!(
        metrics.contains("pylon_rate_limited_total{backend=\"inbound\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pylon_bulkhead_overflow_total{backend=\"inbound\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn dns_endpoints_follow_the_records_and_keep_the_last_good_set() {
    use pylon::discovery::testing::TestDnsServer;
    let dns = TestDnsServer::start().await.unwrap();
    let first = ChaosServer::start("first").await;
    let port = first.addr.port();
    let second =
        ChaosServer::start_on("second", format!("127.0.0.2:{port}").parse().unwrap()).await;
    dns.set("svc.mesh.test", vec!["127.0.0.1".parse().unwrap()], 1);

    let dir = TempDir::new("dns");
    let ca = pylon::identity::dev::DevCa::new("pylon test root").unwrap();
    let files = ca
        .write_identity(dir.path(), "client", crate::common::CLIENT_ID)
        .unwrap();
    let policy_path = dir.path().join("policy.yaml");
    std::fs::write(
        &policy_path,
        yaml(&[
            backend(&[]).endpoints(Endpoints::Dns {
                hostname: "svc.mesh.test".into(),
                port,
            }),
            route(),
        ]),
    )
    .unwrap();
    let cfg = dir.path().join("pylon.yaml");
    let yaml = crate::common::sidecar_config(&files, &policy_path, "127.0.0.1:9".parse().unwrap())
        + &format!("dns: {{ nameservers: [\"{}\"], minTtl: 1s }}\n", dns.addr());
    std::fs::write(&cfg, yaml).unwrap();
    let sidecar = SidecarProc::spawn(crate::common::PYLON, &cfg);
    sidecar.wait_ready().await;
    let endpoints_are = |want: String| {
        let sidecar = &sidecar;
        async move {
            eventually(format_args!("endpoints [{want}]"), async || {
                let c = sidecar.config().await;
                let got: Vec<String> = c["backends"][0]["endpoints"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["address"].as_str().unwrap().to_string())
                    .collect();
                if got == vec![want.clone()] {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                }
            })
            .await;
        }
    };
    endpoints_are(format!("127.0.0.1:{port}")).await;
    let mut client = echo_client(sidecar.outbound, "svc.test").await;
    let served_by = |r: &tonic::Response<pylon_proto::v1::EchoReply>| {
        r.metadata()
            .get("x-served-by")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        served_by(&client.unary(chaos("", b"")).await.unwrap()),
        "first"
    );

    dns.set("svc.mesh.test", vec!["127.0.0.2".parse().unwrap()], 1);
    endpoints_are(format!("127.0.0.2:{port}")).await;
    assert_eq!(
        served_by(&client.unary(chaos("", b"")).await.unwrap()),
        "second"
    );

    // Resolution fails: the last good set stays.
    dns.fail("svc.mesh.test");
    let before = dns.queries("svc.mesh.test");
    eventually("two re-resolution attempts", async || {
        dns.queries("svc.mesh.test") >= before + 2
    })
    .await;
    endpoints_are(format!("127.0.0.2:{port}")).await;
    assert_eq!(
        served_by(&client.unary(chaos("", b"")).await.unwrap()),
        "second"
    );
    let _ = second;
}

#[tokio::test]
async fn a_retry_with_no_endpoint_left_returns_the_last_real_answer() {
    let only = ChaosServer::start("only").await;
    only.set_mode("status=14");
    // The first failure ejects the only endpoint: the retry has nowhere to
    // go, and the caller gets the server's answer, not the mesh's.
    let f = Fixture::start(&yaml(&[
        backend(&[only.addr]),
        route().retry(retry_unavailable()),
        traffic().outlier_detection(outlier_detection(
            1,
            Duration::from_secs(1),
            Duration::from_secs(30),
            100,
        )),
    ]))
    .await;
    let status = f.client().await.unary(chaos("", b"")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "chaos");
    assert_eq!(pylon_error(&status), None);
    assert_eq!(only.requests(), 1);
}
