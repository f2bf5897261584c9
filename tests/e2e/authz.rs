//! AuthorizationPolicy on the inbound path: two client sidecars with their
//! own SPIFFE identities call one app through a server sidecar, whose own
//! policy says who may call what. What the callers get, what the app saw,
//! the metrics, and a policy rewritten at run time.

use std::path::PathBuf;

use http::{HeaderMap, Method, Request, StatusCode};
use pylon::identity::dev::DevCa;
use pylon_proto::helloworld::greeter_client::GreeterClient;
use pylon_proto::helloworld::{HelloReply, HelloRequest};
use tonic::Code;
use tonic::transport::Channel;

use crate::common::chaos::ChaosServer;
use crate::common::echo::echo_client;
use crate::common::http::{empty, http1, text};
use crate::common::policy::{
    self, AuthorizationRule, Build, TargetKind, allow, target, traffic_policy, yaml,
};
use crate::common::{
    SERVER_ID, SidecarProc, TempDir, backend_yaml, client_sidecar_as, route_yaml, server_sidecar,
    set_policy,
};

const CLIENT_A: &str = "spiffe://pylon.test/ns/default/sa/client-a";
const CLIENT_B: &str = "spiffe://pylon.test/ns/default/sa/client-b";
const DENIED: &str = "pylon_inbound_authorization_denied_total";
const ALLOWED: &str = "pylon_inbound_authorization_allowed_total";

/// An app behind a server sidecar (service account `echo`), and two client
/// sidecars, `a` ([`CLIENT_A`]) and `b` ([`CLIENT_B`]), that route
/// `greeter.test` (gRPC) and `web.test` (HTTP) to it over mTLS.
struct Fixture {
    _dir: TempDir,
    /// Answers every gRPC call by echoing its message (a `HelloRequest`
    /// reads back as a `HelloReply`), and every HTTP request with 200;
    /// records what it saw.
    app: ChaosServer,
    server: SidecarProc,
    server_policy: PathBuf,
    a: SidecarProc,
    b: SidecarProc,
}

impl Fixture {
    async fn start() -> Fixture {
        let dir = TempDir::new("authz");
        let ca = DevCa::new("pylon test root").unwrap();
        let app = ChaosServer::start("app").await;
        let server = server_sidecar(&ca, dir.path(), "server", SERVER_ID, app.addr);
        let routes = backend_yaml("app", &[server.inbound.to_string()], Some(SERVER_ID))
            + &route_yaml("GRPCRoute", "greeter", "greeter.test", &[("app", 1)])
            + &route_yaml("HTTPRoute", "web", "web.test", &[("app", 1)]);
        let (a, _) = client_sidecar_as(&ca, dir.path(), "client-a", CLIENT_A, &routes);
        let (b, _) = client_sidecar_as(&ca, dir.path(), "client-b", CLIENT_B, &routes);
        for sidecar in [&server, &a, &b] {
            sidecar.wait_ready().await;
        }
        Fixture {
            server_policy: dir.path().join("server-policy.yaml"),
            _dir: dir,
            app,
            server,
            a,
            b,
        }
    }

    /// Rewrites the server sidecar's own policy file and waits until the
    /// sidecar has installed it.
    async fn set_server_policy(&self, yaml: &str) {
        set_policy(&self.server, &self.server_policy, yaml).await;
    }
}

/// One HTTP/1.1 request from `client`'s app to `web.test`: the status, the
/// headers and the body of the answer.
async fn http(client: &SidecarProc, method: Method, path: &str) -> (StatusCode, HeaderMap, String) {
    let mut sender = http1(client.outbound).await;
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "web.test")
        .body(empty())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    (status, headers, text(resp).await)
}

/// A gRPC Greeter client through `client`'s outbound listener.
async fn greeter(client: &SidecarProc) -> GreeterClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", client.outbound))
        .unwrap()
        .origin("http://greeter.test".parse().unwrap())
        .connect()
        .await
        .unwrap();
    GreeterClient::new(channel)
}

async fn say_hello(client: &mut GreeterClient<Channel>) -> Result<HelloReply, tonic::Status> {
    let req = HelloRequest {
        name: "pylon".into(),
    };
    client.say_hello(req).await.map(tonic::Response::into_inner)
}

/// Asserts that `result` is the proxy's PERMISSION_DENIED for `caller`.
fn assert_denied(result: Result<HelloReply, tonic::Status>, caller: &str, call: &str) {
    let status = result.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(
        status.metadata().get("x-pylon-error").unwrap(),
        "unauthorized"
    );
    assert_eq!(
        status.message(),
        format!("pylon: caller {caller} is not allowed to call {call}")
    );
}

/// An AuthorizationPolicy for the server sidecar's service account.
fn authorization(name: &str, rules: Vec<AuthorizationRule>) -> String {
    yaml(&[policy::authorization(name, "echo", rules)])
}

const SAY_HELLO: &str = "/helloworld.Greeter/SayHello";

#[tokio::test]
async fn without_a_policy_every_mesh_identity_is_served() {
    let f = Fixture::start().await;
    for client in [&f.a, &f.b] {
        let reply = say_hello(&mut greeter(client).await).await.unwrap();
        assert_eq!(reply.message, "pylon");
    }
    // A policy for another service account does not apply here.
    let elsewhere = yaml(&[policy::authorization(
        "someone-else",
        "someone-else",
        Vec::new(),
    )]);
    f.set_server_policy(&elsewhere).await;
    for client in [&f.a, &f.b] {
        say_hello(&mut greeter(client).await).await.unwrap();
        let (status, _, body) = http(client, Method::DELETE, "/anything").await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(f.app.requests(), 6);
    assert_eq!(f.server.metric(DENIED).await, 0);
    assert_eq!(f.server.metric(ALLOWED).await, 0, "no policy, no decision");
}

#[tokio::test]
async fn only_the_allowed_principal_reaches_the_app_and_only_for_allowed_methods() {
    let f = Fixture::start().await;
    // A rate limit of one call: a denied call must not spend it.
    let policy = authorization(
        "greeter-callers",
        vec![allow(&[CLIENT_A], &["/helloworld.Greeter/*"], &[])],
    ) + &yaml(&[traffic_policy(
        "protect-echo",
        target(TargetKind::ServiceAccount, "echo"),
    )
    .rate_limit(1, 1)]);
    f.set_server_policy(&policy).await;

    assert_denied(
        say_hello(&mut greeter(&f.b).await).await,
        CLIENT_B,
        SAY_HELLO,
    );
    // client-a, but a method outside `/helloworld.Greeter/*`.
    let status = echo_client(f.a.outbound, "greeter.test")
        .await
        .unary(pylon_proto::v1::EchoRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(
        status.metadata().get("x-pylon-error").unwrap(),
        "unauthorized"
    );
    assert_eq!(f.app.requests(), 0, "denied calls never reach the app");

    let reply = say_hello(&mut greeter(&f.a).await).await.unwrap();
    assert_eq!(reply.message, "pylon");
    let seen: Vec<String> = f.app.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(seen, [SAY_HELLO]);

    assert_eq!(f.server.metric(DENIED).await, 2);
    assert_eq!(f.server.metric(ALLOWED).await, 1);
    assert_eq!(
        f.server
            .metric("pylon_rate_limited_total{backend=\"inbound\"}")
            .await,
        0
    );
}

#[tokio::test]
async fn an_http_caller_is_refused_with_403_and_a_json_body() {
    let f = Fixture::start().await;
    let policy = authorization(
        "web",
        vec![
            allow(&["*/sa/client-a"], &[], &[]),
            allow(&[], &["GET", "HEAD"], &["/public/*"]),
        ],
    );
    f.set_server_policy(&policy).await;

    let (status, _, body) = http(&f.b, Method::GET, "/public/page?x=1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, "ok from app");

    let (status, headers, body) = http(&f.b, Method::GET, "/private").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers["x-pylon-error"], "unauthorized");
    assert_eq!(headers["content-type"], "application/json");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    assert_eq!(
        body["error"]["message"],
        format!("pylon: caller {CLIENT_B} is not allowed to call GET /private")
    );
    for (method, path) in [
        (Method::POST, "/public/page"),
        // Dot segments could take the app outside `/public/`.
        (Method::GET, "/public/../private"),
    ] {
        let (status, _, _) = http(&f.b, method.clone(), path).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}");
    }

    let (status, _, body) = http(&f.a, Method::POST, "/private").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let seen: Vec<String> = f.app.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(seen, ["/public/page", "/private"]);
    assert_eq!(f.server.metric(DENIED).await, 3);
}

#[tokio::test]
async fn a_policy_rewritten_at_run_time_flips_allow_and_deny() {
    let f = Fixture::start().await;
    // Clients and their connections live across every change: decisions
    // are per call, never cached per connection.
    let mut a = greeter(&f.a).await;
    let mut b = greeter(&f.b).await;
    let only =
        |principal: &str| authorization("greeter-callers", vec![allow(&[principal], &[], &[])]);

    f.set_server_policy(&only(CLIENT_A)).await;
    say_hello(&mut a).await.unwrap();
    assert_denied(say_hello(&mut b).await, CLIENT_B, SAY_HELLO);

    f.set_server_policy(&only(CLIENT_B)).await;
    assert_denied(say_hello(&mut a).await, CLIENT_A, SAY_HELLO);
    say_hello(&mut b).await.unwrap();

    f.set_server_policy(&authorization("nobody", Vec::new()))
        .await;
    assert_denied(say_hello(&mut a).await, CLIENT_A, SAY_HELLO);
    assert_denied(say_hello(&mut b).await, CLIENT_B, SAY_HELLO);

    // No policy left: everyone is served again.
    f.set_server_policy("").await;
    say_hello(&mut a).await.unwrap();
    say_hello(&mut b).await.unwrap();

    assert_eq!(f.app.requests(), 4);
    assert_eq!(f.server.metric(DENIED).await, 4);
    assert_eq!(f.server.metric(ALLOWED).await, 2);
}
