//! Route matching end to end: gRPC service/method, HTTP path, method and
//! header matches choose among backends; calls to one peer share one HTTP/2
//! connection.

use pylon_proto::v1::EchoRequest;

use crate::common::echo::{echo_client, start_named_echo};
use crate::common::http::{empty, http1, start_http_app, text};
use crate::common::policy::{
    Build, GrpcMethodMatch, GrpcRouteMatch, HeaderMatch, HttpRouteMatch, Kind, PathMatch, backend,
    route, rule, yaml,
};
use crate::common::{TempDir, client_sidecar, server_sidecar};

const ID_A: &str = "spiffe://pylon.test/ns/default/sa/a";
const ID_B: &str = "spiffe://pylon.test/ns/default/sa/b";

#[tokio::test]
async fn matches_pick_the_backend_and_calls_share_one_connection() {
    let echo_a = start_named_echo("a").await;
    let echo_b = start_named_echo("b").await;
    let web = start_http_app().await;
    let dir = TempDir::new("routing");
    let ca = pylon::identity::dev::DevCa::new("pylon test root").unwrap();
    let side_a = server_sidecar(&ca, dir.path(), "a", ID_A, echo_a.addr);
    let side_b = server_sidecar(&ca, dir.path(), "b", ID_B, echo_b.addr);
    let lane_fast = || {
        vec![HeaderMatch {
            name: "x-lane".into(),
            value: "fast".into(),
        }]
    };
    let method = |service: &str, method: Option<&str>| GrpcRouteMatch {
        method: Some(GrpcMethodMatch {
            service: Some(service.into()),
            method: method.map(Into::into),
        }),
        headers: Vec::new(),
    };
    let policy = yaml(&[
        backend("a", &[side_a.inbound], Some(ID_A)),
        backend("b", &[side_b.inbound], Some(ID_B)),
        backend("web", &[web.addr], None),
        route(Kind::GrpcRoute, "echo", "echo.test", &[]).grpc_rules(vec![
            rule(vec![method("pylon.v1.Echo", Some("Unary"))], &[("a", 1)]),
            rule(vec![method("pylon.v1.Echo", None)], &[("b", 1)]),
            rule(
                vec![GrpcRouteMatch {
                    method: None,
                    headers: lane_fast(),
                }],
                &[("b", 1)],
            ),
        ]),
        route(Kind::HttpRoute, "web", "web.test", &[]).http_rules(vec![
            rule(
                vec![HttpRouteMatch {
                    path: Some(PathMatch::Exact("/headers".into())),
                    method: Some("GET".into()),
                    headers: Vec::new(),
                }],
                &[("web", 1)],
            ),
            rule(
                vec![HttpRouteMatch {
                    path: Some(PathMatch::Prefix("/status".into())),
                    method: None,
                    headers: lane_fast(),
                }],
                &[("web", 1)],
            ),
        ]),
    ]);
    let (client, _) = client_sidecar(&ca, dir.path(), &policy);
    for s in [&side_a, &side_b, &client] {
        s.wait_ready().await;
    }

    // gRPC: the method match wins over the service match.
    let mut echo = echo_client(client.outbound, "echo.test").await;
    let served_by = |resp: &tonic::metadata::MetadataMap| {
        resp.get("x-served-by")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string()
    };
    let unary = echo.unary(EchoRequest::default()).await.unwrap();
    assert_eq!(served_by(unary.metadata()), "a");
    let stream = echo
        .server_stream(EchoRequest {
            count: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(served_by(stream.metadata()), "b");
    let mut lane = tonic::Request::new(EchoRequest::default());
    lane.metadata_mut()
        .insert("x-lane", "fast".parse().unwrap());
    let resp = echo.unary(lane).await.unwrap();
    assert_eq!(
        served_by(resp.metadata()),
        "a",
        "a method match outranks a header match"
    );

    // Many concurrent calls to a peer ride one HTTP/2 connection.
    let calls = (0..64).map(|_| {
        let mut echo = echo.clone();
        async move { echo.unary(EchoRequest::default()).await.map(|_| ()) }
    });
    for r in futures_util::future::join_all(calls).await {
        r.unwrap();
    }
    let config = client.config().await;
    let a = config["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "Backend/a")
        .unwrap();
    assert_eq!(a["endpoints"][0]["connections"], 1, "{a:#}");

    // HTTP: exact path plus method; prefix plus header; nothing else.
    let mut conn = http1(client.outbound).await;
    let send = |method: &str, path: &str, lane: Option<&str>| {
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "web.test");
        if let Some(l) = lane {
            req = req.header("x-lane", l);
        }
        req.body(empty()).unwrap()
    };
    let resp = conn
        .send_request(send("GET", "/headers", None))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(text(resp).await.contains("host: web.test"));
    let resp = conn
        .send_request(send("POST", "/headers", None))
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["x-pylon-error"], "no-route");
    let _ = text(resp).await;
    let resp = conn
        .send_request(send("GET", "/status/204", Some("fast")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let resp = conn
        .send_request(send("GET", "/status/204", Some("slow")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["x-pylon-error"], "no-route");
}
