//! Each layer alone, over an inner service that records what reached it.

use std::future::{Ready, ready};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use pylon_proto::policy::{
    AbortStatus, FaultAbort, FaultDelay, FaultInjection, GrpcCode, RateLimit, Timeouts,
};
use tokio::time::Instant;
use tower::{Layer, Service};

use super::*;
use crate::policy::routing::RulePolicy;
use crate::telemetry::metrics::Metrics;

/// An inner service that answers every call with 200 and records the
/// deadline each call carried.
#[derive(Clone, Default)]
struct Recorder {
    calls: Arc<AtomicUsize>,
    deadlines: Arc<Mutex<Vec<Option<Deadline>>>>,
}

impl Service<Call> for Recorder {
    type Response = Called;
    type Error = Infallible;
    type Future = Ready<Result<Called, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.deadlines.lock().unwrap().push(call.ctx.deadline);
        ready(Ok(Called {
            result: Ok(Response::new(ProxyBody::full("ok"))),
            summary: CallSummary::default(),
        }))
    }
}

fn call(grpc_timeout: Option<&str>) -> Call {
    let mut req = Request::new(ProxyBody::Empty);
    if let Some(t) = grpc_timeout {
        req.headers_mut().insert("grpc-timeout", t.parse().unwrap());
    }
    Call {
        req,
        ctx: CallCtx {
            grpc: true,
            authority: None,
            te_trailers: true,
            replay_limit: 1024,
            deadline: None,
            trace: None,
        },
    }
}

fn rule(backend: &Arc<Backend>, policy: RulePolicy) -> Rule {
    Rule::new(
        "GRPCRoute/t".into(),
        0,
        vec![(1, backend.clone())],
        policy,
        &Metrics::new(),
    )
}

async fn run<S: Service<Call, Response = Called, Error = Infallible>>(
    svc: &mut S,
    call: Call,
) -> Called {
    let Ok(called) = svc.call(call).await;
    called
}

#[tokio::test(start_paused = true)]
async fn the_deadline_is_the_earlier_of_the_callers_and_the_routes() {
    let backend = Backend::for_tests("Backend/t");
    let timeouts = Some(Timeouts {
        request: Some(Duration::from_secs(2)),
        backend_request: None,
    });
    let with_route = rule(
        &backend,
        RulePolicy {
            timeouts,
            ..RulePolicy::default()
        },
    );
    let without = rule(&backend, RulePolicy::default());
    let inner = Recorder::default();
    let mut svc = deadline::DeadlineLayer::new(&with_route).layer(inner.clone());
    run(&mut svc, call(Some("1S"))).await;
    run(&mut svc, call(Some("5S"))).await;
    run(&mut svc, call(None)).await;
    let mut svc = deadline::DeadlineLayer::new(&without).layer(inner.clone());
    run(&mut svc, call(None)).await;
    let timeouts: Vec<Option<Duration>> = inner
        .deadlines
        .lock()
        .unwrap()
        .iter()
        .map(|d| d.map(|d| d.timeout))
        .collect();
    let s = |n| Some(Duration::from_secs(n));
    assert_eq!(timeouts, [s(1), s(2), s(2), None]);
}

#[tokio::test(start_paused = true)]
async fn an_abort_answers_without_calling_the_inner_service() {
    let backend = Backend::for_tests("Backend/t");
    let fault = FaultInjection {
        delay: None,
        abort: Some(FaultAbort {
            status: AbortStatus::Grpc(GrpcCode::Unavailable),
            percent: 100.0,
        }),
    };
    let r = rule(
        &backend,
        RulePolicy {
            fault_injection: Some(fault),
            ..RulePolicy::default()
        },
    );
    let inner = Recorder::default();
    let mut svc = fault::FaultLayer::new(&r, &backend).layer(inner.clone());
    let called = run(&mut svc, call(None)).await;
    assert!(matches!(called.result, Err(ProxyError::FaultAbort { .. })));
    assert_eq!(inner.calls.load(Ordering::SeqCst), 0);
    assert_eq!(r.faults.as_ref().unwrap().counters.aborts.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_delay_past_the_deadline_ends_the_call_at_the_deadline() {
    let backend = Backend::for_tests("Backend/t");
    let fault = FaultInjection {
        delay: Some(FaultDelay {
            fixed_delay: Duration::from_secs(10),
            percent: 100.0,
        }),
        abort: None,
    };
    let r = rule(
        &backend,
        RulePolicy {
            fault_injection: Some(fault),
            ..RulePolicy::default()
        },
    );
    let inner = Recorder::default();
    let mut svc = fault::FaultLayer::new(&r, &backend).layer(inner.clone());
    let start = Instant::now();
    let mut late = call(None);
    late.ctx.deadline = Some(Deadline {
        at: start + Duration::from_secs(1),
        timeout: Duration::from_secs(1),
    });
    let called = run(&mut svc, late).await;
    assert!(matches!(
        called.result,
        Err(ProxyError::DeadlineExceeded { .. })
    ));
    assert_eq!(Instant::now() - start, Duration::from_secs(1));
    assert_eq!(inner.calls.load(Ordering::SeqCst), 0);
    // Without a deadline the delay is served, then the call goes on.
    let called = run(&mut svc, call(None)).await;
    assert!(called.result.is_ok());
    assert_eq!(Instant::now() - start, Duration::from_secs(11));
    assert_eq!(inner.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn admission_holds_the_slot_until_the_response_ends_and_refuses_beyond_it() {
    let backend = Backend::for_tests("Backend/t");
    backend.admission.configure(None, Some(1), None);
    let inner = Recorder::default();
    let mut svc = admission::AdmissionLayer::new(&backend).layer(inner.clone());
    let first = run(&mut svc, call(None)).await.result.unwrap();
    // The first response is still being read: no slot, no waiting line.
    let second = run(&mut svc, call(None)).await;
    assert!(matches!(second.result, Err(ProxyError::Overflow { .. })));
    assert_eq!(inner.calls.load(Ordering::SeqCst), 1);
    drop(first);
    assert!(run(&mut svc, call(None)).await.result.is_ok());
    assert_eq!(inner.calls.load(Ordering::SeqCst), 2);
    assert_eq!(backend.metrics.requests.get(), 2);
    assert_eq!(backend.metrics.overflow.get(), 1);

    backend.admission.configure(
        Some(RateLimit {
            requests_per_second: 1,
            burst: 1,
        }),
        None,
        None,
    );
    assert!(run(&mut svc, call(None)).await.result.is_ok());
    let limited = run(&mut svc, call(None)).await;
    assert!(matches!(
        limited.result,
        Err(ProxyError::RateLimited { .. })
    ));
}

/// An inner service below the balancer that must not be reached.
#[derive(Clone)]
struct Unreachable;

impl<R> Service<R> for Unreachable {
    type Response = Attempted;
    type Error = Failed;
    type Future = Ready<Result<Attempted, Failed>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Failed>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: R) -> Self::Future {
        panic!("reached the inner service")
    }
}

#[tokio::test(start_paused = true)]
async fn with_no_endpoint_the_balancer_fails_the_attempt_naming_none() {
    let backend = Backend::for_tests("Backend/t");
    let mut svc = balance::BalanceLayer::new(&backend).layer(Unreachable);
    let Call { req, ctx } = call(None);
    let attempt = Attempt {
        req,
        ctx,
        n: 1,
        tried: Vec::new(),
    };
    let Err(failed) = svc.call(attempt).await else {
        panic!("an attempt without endpoints")
    };
    assert!(matches!(failed.error, ProxyError::NoEndpoint { .. }));
    assert!(failed.endpoint.is_none());
}

#[tokio::test(start_paused = true)]
async fn the_app_limit_refuses_beyond_its_cap_until_a_response_ends() {
    let metrics = Metrics::new();
    let limits = InboundLimits::new(&metrics);
    limits.set_default_max_requests(1);
    let inner = AppRecorder::default();
    let mut svc = limit::AppLimitLayer::new(&limits).layer(inner.clone());
    let first = svc.call(to_app()).await.unwrap();
    assert!(matches!(
        svc.call(to_app()).await,
        Err(ProxyError::Overflow { .. })
    ));
    drop(first);
    assert!(svc.call(to_app()).await.is_ok());
    assert_eq!(inner.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn without_a_policy_every_caller_is_authorized() {
    let metrics = Metrics::new();
    let limits = InboundLimits::new(&metrics);
    let inner = AppRecorder::default();
    let mut svc = authorize::AuthorizeLayer::new(&limits).layer(inner.clone());
    assert!(svc.call(to_app()).await.is_ok());
    assert_eq!(inner.calls.load(Ordering::SeqCst), 1);
}

/// An inner service standing in for the local app.
#[derive(Clone, Default)]
struct AppRecorder {
    calls: Arc<AtomicUsize>,
}

impl<'a> Service<ToApp<'a>> for AppRecorder {
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = Ready<Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: ToApp<'a>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        ready(Ok(Response::new(ProxyBody::full("app"))))
    }
}

fn to_app() -> ToApp<'static> {
    ToApp {
        req: Request::new(ProxyBody::Empty),
        grpc: false,
        caller: None,
        authority: None,
        wire: Wire::Http2,
        te_trailers: false,
    }
}

fn endpoint(port: u16) -> Arc<Endpoint> {
    use crate::http::pool::{EndpointPool, Transport};
    use crate::resilience::balancer::EndpointLoad;
    use crate::resilience::bulkhead::ConnectionLimit;
    use crate::resilience::outlier::EndpointHealth;
    Arc::new(Endpoint {
        pool: EndpointPool::new(
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Transport::Plain,
            Arc::new(ConnectionLimit::new(None)),
        ),
        health: EndpointHealth::default(),
        load: Arc::new(EndpointLoad::new()),
    })
}

fn routed(n: u32, deadline: Option<Deadline>) -> Routed {
    let Call { req, mut ctx } = call(None);
    ctx.deadline = deadline;
    Routed {
        req,
        ctx,
        n,
        endpoint: endpoint(9),
    }
}

/// A send that records the request's headers and answers with `status`,
/// or never answers when `status` is `None`.
#[derive(Clone, Default)]
struct FakeSend {
    status: Option<u16>,
    headers: Arc<Mutex<Vec<http::HeaderMap>>>,
    /// Answers as over a connection the request waited for.
    new_connection: bool,
}

impl Service<Routed> for FakeSend {
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send>,
    >;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, routed: Routed) -> Self::Future {
        self.headers
            .lock()
            .unwrap()
            .push(routed.req.headers().clone());
        match self.status {
            Some(status) => {
                let mut resp = Response::new(ProxyBody::Empty);
                *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                if self.new_connection {
                    resp.extensions_mut()
                        .insert(crate::http::pool::NewConnection);
                }
                Box::pin(ready(Ok(resp)))
            }
            None => Box::pin(std::future::pending()),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_attempt_is_marked_and_bounded_by_its_timeout_or_the_deadline() {
    let backend = Backend::for_tests("Backend/t");
    let timeouts = Some(Timeouts {
        request: None,
        backend_request: Some(Duration::from_millis(100)),
    });
    let r = rule(
        &backend,
        RulePolicy {
            timeouts,
            ..RulePolicy::default()
        },
    );
    let send = FakeSend::default();
    let mut svc = attempt::AttemptLayer::new(&r, &backend).layer(send.clone());

    let Err(failed) = svc.call(routed(2, None)).await else {
        panic!("answered")
    };
    assert!(matches!(failed.error, ProxyError::AttemptTimeout { .. }));
    assert!(failed.endpoint.is_some());
    assert_eq!(backend.metrics.attempt_timeouts.get(), 1);

    // A deadline before the attempt timeout: the deadline's error.
    let deadline = Deadline {
        at: Instant::now() + Duration::from_millis(50),
        timeout: Duration::from_millis(50),
    };
    let Err(failed) = svc.call(routed(3, Some(deadline))).await else {
        panic!("answered")
    };
    assert!(matches!(failed.error, ProxyError::DeadlineExceeded { .. }));
    assert_eq!(backend.metrics.attempt_timeouts.get(), 1);

    let headers = send.headers.lock().unwrap();
    assert_eq!(headers[0]["x-pylon-attempt"], "2");
    assert!(headers[0].get("grpc-timeout").is_none());
    assert_eq!(headers[1]["x-pylon-attempt"], "3");
    assert_eq!(headers[1]["grpc-timeout"], "50000000n");
    // New at every call: sent as a never-indexed HPACK literal.
    assert!(headers[1]["grpc-timeout"].is_sensitive());
}

#[tokio::test(start_paused = true)]
async fn an_answer_over_a_new_connection_leaves_the_latency_estimate_alone() {
    use crate::resilience::balancer::DEFAULT_RTT;
    let backend = Backend::for_tests("Backend/t");
    let r = rule(&backend, RulePolicy::default());
    for (new_connection, estimate) in [(true, DEFAULT_RTT), (false, Duration::ZERO)] {
        let send = FakeSend {
            status: Some(200),
            new_connection,
            ..FakeSend::default()
        };
        let mut svc = attempt::AttemptLayer::new(&r, &backend).layer(send);
        let Ok(attempted) = svc.call(routed(1, None)).await else {
            panic!("no answer")
        };
        // Time stands still: a counted answer took no time at all; one
        // left out keeps the default a new endpoint starts from.
        let load = &attempted.endpoint.load;
        assert_eq!(
            load.rtt_estimate(Instant::now()),
            estimate,
            "{new_connection}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn outlier_detection_waits_for_trailers_only_when_the_head_has_no_status() {
    let backend = Backend::for_tests("Backend/t");
    let r = rule(&backend, RulePolicy::default());
    for (status, pending) in [(200, true), (503, false)] {
        let send = FakeSend {
            status: Some(status),
            ..FakeSend::default()
        };
        let mut svc = outlier::OutlierLayer::new(&backend)
            .layer(attempt::AttemptLayer::new(&r, &backend).layer(send));
        let Ok(attempted) = svc.call(routed(1, None)).await else {
            panic!("no answer")
        };
        assert_eq!(attempted.pending_status, pending, "HTTP {status}");
    }
}

/// Attempts answered from a script: `Err` for a failure that never reached
/// a server, `Ok(status)` for a response.
#[derive(Clone)]
struct Script {
    answers: Arc<Mutex<Vec<Result<u16, ()>>>>,
    tried: Arc<Mutex<Vec<Vec<std::net::SocketAddr>>>>,
}

impl Service<Attempt> for Script {
    type Response = Attempted;
    type Error = Failed;
    type Future = Ready<Result<Attempted, Failed>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Failed>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, attempt: Attempt) -> Self::Future {
        self.tried.lock().unwrap().push(attempt.tried.clone());
        let ep = endpoint(9 + u16::try_from(attempt.n).unwrap());
        let answer = self.answers.lock().unwrap().remove(0);
        ready(match answer {
            Ok(status) => {
                let mut resp = Response::new(ProxyBody::Empty);
                *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                Ok(Attempted {
                    resp,
                    load: ep.load.begin(),
                    endpoint: ep,
                    span: None,
                    pending_status: false,
                    stall: None,
                })
            }
            Err(()) => Err(Failed {
                error: ProxyError::ConnectTimeout {
                    backend: "Backend/t".into(),
                    addr: ep.addr(),
                    timeout: Duration::from_secs(1),
                },
                endpoint: Some(ep),
                span: None,
            }),
        })
    }
}

#[tokio::test(start_paused = true)]
async fn retries_follow_the_policy_and_avoid_the_endpoints_tried() {
    use pylon_proto::policy::{Backoff, Retry, RetryOn};
    let backend = Backend::for_tests("Backend/t");
    let retry = Retry {
        attempts: 2,
        codes: vec![RetryOn::Http(503)],
        backoff: Some(Backoff {
            base: Duration::from_millis(1),
            max: Duration::from_millis(2),
        }),
    };
    let with_retry = rule(
        &backend,
        RulePolicy {
            retry: Some(retry),
            ..RulePolicy::default()
        },
    );
    let script = Script {
        answers: Arc::new(Mutex::new(vec![Err(()), Ok(503), Ok(200)])),
        tried: Arc::default(),
    };
    let mut svc = retry::RetryLayer::new(&with_retry, &backend).layer(script.clone());
    let called = run(&mut svc, call(None)).await;
    assert_eq!(called.result.unwrap().status(), 200);
    assert_eq!(called.summary.attempts, 3);
    assert_eq!(backend.metrics.retries.get(), 2);
    {
        let tried = script.tried.lock().unwrap();
        assert_eq!(tried[0], []);
        assert_eq!(tried[2].len(), 2, "the third attempt avoids both tried");
    }

    // Without a retry rule: one attempt, its failure passed on.
    let bare = rule(&backend, RulePolicy::default());
    let script = Script {
        answers: Arc::new(Mutex::new(vec![Err(())])),
        tried: Arc::default(),
    };
    let mut svc = retry::RetryLayer::new(&bare, &backend).layer(script);
    let called = run(&mut svc, call(None)).await;
    assert!(matches!(
        called.result,
        Err(ProxyError::ConnectTimeout { .. })
    ));
    assert_eq!(called.summary.attempts, 1);
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test]
async fn the_endpoint_and_the_app_name_their_failure_to_connect() {
    let backend = Backend::for_tests("Backend/t");
    let mut r = routed(1, None);
    r.endpoint = endpoint(closed_port());
    let err = endpoint::EndpointService::new(&backend)
        .call(r)
        .await
        .unwrap_err();
    assert!(matches!(err, ProxyError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("Backend/t"), "{err}");

    let app = PlainUpstream::new(
        "inbound app",
        std::net::SocketAddr::from(([127, 0, 0, 1], closed_port())),
    );
    let err = app::AppService::new(&app).call(to_app()).await.unwrap_err();
    assert!(matches!(err, ProxyError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("inbound app"), "{err}");
}
