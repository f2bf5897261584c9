//! Every gRPC call shape crosses the two-hop mTLS mesh unchanged, and the
//! proxy's own failures come back as gRPC statuses with `x-pylon-error`.

use std::time::Duration;

use futures_util::StreamExt;
use pylon_proto::v1::EchoRequest;
use tonic::metadata::{BinaryMetadataValue, MetadataValue};
use tonic::{Code, Request};

use crate::common::echo::{echo_client, start_echo};
use crate::common::{CLIENT_ID, Mesh, PATIENCE, SERVER_ID, backend_yaml, route_yaml};

fn req(payload: &[u8]) -> EchoRequest {
    EchoRequest {
        payload: payload.to_vec(),
        ..Default::default()
    }
}

#[tokio::test]
async fn unary_carries_payload_metadata_and_binary_headers_both_ways() {
    let app = start_echo().await;
    let mesh = Mesh::start(app.addr).await;
    let mut client = echo_client(mesh.client.outbound, "echo.test").await;

    let mut r = Request::new(req(b"hello"));
    r.metadata_mut()
        .insert("x-custom", MetadataValue::from_static("value 1"));
    r.metadata_mut().insert_bin(
        "x-data-bin",
        BinaryMetadataValue::from_bytes(&[0, 1, 2, 254, 255]),
    );
    r.metadata_mut().insert(
        "x-pylon-peer-identity",
        MetadataValue::from_static("spiffe://evil/forged"),
    );
    let resp = client.unary(r).await.unwrap();

    let headers = resp.metadata().clone();
    let reply = resp.into_inner();
    assert_eq!(reply.payload, b"hello");
    assert!(
        reply.metadata.contains(&"x-custom: value 1".to_string()),
        "{:?}",
        reply.metadata
    );
    assert!(
        reply
            .metadata
            .contains(&"x-data-bin: [0, 1, 2, 254, 255]".to_string()),
        "{:?}",
        reply.metadata
    );
    let identities: Vec<_> = reply
        .metadata
        .iter()
        .filter(|l| l.starts_with("x-pylon-peer-identity"))
        .collect();
    assert_eq!(
        identities,
        vec![&format!("x-pylon-peer-identity: {CLIENT_ID}")]
    );
    assert_eq!(headers.get("echo-x-custom").unwrap(), "value 1");
    assert_eq!(
        headers
            .get_bin("echo-x-data-bin")
            .unwrap()
            .to_bytes()
            .unwrap()
            .as_ref(),
        &[0, 1, 2, 254, 255]
    );
    assert!(headers.get("x-pylon-error").is_none());
}

#[tokio::test]
async fn empty_and_large_messages_in_every_call_shape() {
    let app = start_echo().await;
    let mesh = Mesh::start(app.addr).await;
    let mut client = echo_client(mesh.client.outbound, "echo.test").await;

    let empty = client.unary(req(b"")).await.unwrap().into_inner();
    assert!(empty.payload.is_empty());

    let big: Vec<u8> = (0..9 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let reply = client.unary(req(&big)).await.unwrap().into_inner();
    assert!(
        reply.payload == big,
        "9 MiB unary payload changed in transit"
    );

    // Client streaming: 3 x 3 MiB, concatenated by the server.
    let parts: Vec<EchoRequest> = big.chunks(3 * 1024 * 1024).map(req).collect();
    let reply = client
        .client_stream(futures_util::stream::iter(parts))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.payload == big, "client stream changed in transit");

    // Server streaming: 4 x 9 MiB.
    let mut stream = client
        .server_stream(EchoRequest {
            payload: big.clone(),
            count: 4,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(msg) = stream.next().await {
        assert!(msg.unwrap().payload == big);
        n += 1;
    }
    assert_eq!(n, 4);
}

#[tokio::test]
async fn client_server_and_bidi_streams_interleave() {
    let app = start_echo().await;
    let mesh = Mesh::start(app.addr).await;
    let mut client = echo_client(mesh.client.outbound, "echo.test").await;

    let reply = client
        .client_stream(futures_util::stream::iter(
            (0..50).map(|i| req(format!("{i},").as_bytes())),
        ))
        .await
        .unwrap()
        .into_inner();
    let expected: String = (0..50).map(|i| format!("{i},")).collect();
    assert_eq!(reply.payload, expected.as_bytes());

    let mut stream = client
        .server_stream(EchoRequest {
            payload: b"tick".to_vec(),
            count: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(msg) = stream.next().await {
        assert_eq!(msg.unwrap().payload, b"tick");
        n += 1;
    }
    assert_eq!(n, 100);

    // Bidi: each reply is received before the next request is sent, so
    // nothing along the way may wait for the end of the request stream.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = client
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..20 {
        let payload = format!("message {i}");
        tx.send(req(payload.as_bytes())).await.unwrap();
        let reply = tokio::time::timeout(PATIENCE, replies.next())
            .await
            .expect("reply while the request stream is still open")
            .unwrap()
            .unwrap();
        assert_eq!(reply.payload, payload.as_bytes());
    }
    drop(tx);
    assert!(replies.next().await.is_none());
}

#[tokio::test]
async fn error_statuses_messages_and_trailers_pass_unchanged() {
    let app = start_echo().await;
    let mesh = Mesh::start(app.addr).await;
    let mut client = echo_client(mesh.client.outbound, "echo.test").await;
    let message = "héllo wörld ✓ \t tab,  two  spaces, 100% done\nnext line ";

    // Trailers-only error response.
    let status = client
        .unary(EchoRequest {
            status: Code::NotFound as u32,
            message: message.to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), message);
    assert_eq!(status.metadata().get("x-trailer").unwrap(), "trailer-value");
    assert_eq!(
        status
            .metadata()
            .get_bin("x-trailer-bin")
            .unwrap()
            .to_bytes()
            .unwrap()
            .as_ref(),
        &[0, 1, 2, 255]
    );
    assert!(
        status.metadata().get("x-pylon-error").is_none(),
        "an application error is not the mesh's"
    );

    // Messages, then an error in the trailers.
    let mut stream = client
        .server_stream(EchoRequest {
            payload: b"x".to_vec(),
            count: 3,
            status: Code::ResourceExhausted as u32,
            message: message.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        assert_eq!(stream.next().await.unwrap().unwrap().payload, b"x");
    }
    let status = stream.next().await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(status.message(), message);
    assert_eq!(status.metadata().get("x-trailer").unwrap(), "trailer-value");
}

#[tokio::test]
async fn grpc_timeout_is_forwarded() {
    let app = start_echo().await;
    let mesh = Mesh::start(app.addr).await;
    let mut client = echo_client(mesh.client.outbound, "echo.test").await;
    let mut r = Request::new(req(b"t"));
    r.set_timeout(Duration::from_secs(7));
    let reply = client.unary(r).await.unwrap().into_inner();
    let timeout = reply
        .metadata
        .iter()
        .find_map(|l| l.strip_prefix("grpc-timeout: "))
        .unwrap_or_else(|| panic!("no grpc-timeout reached the app: {:?}", reply.metadata));
    let (digits, unit) = timeout.split_at(timeout.len() - 1);
    let value: u64 = digits.parse().unwrap();
    let nanos = match unit {
        "H" => value * 3_600_000_000_000,
        "M" => value * 60_000_000_000,
        "S" => value * 1_000_000_000,
        "m" => value * 1_000_000,
        "u" => value * 1_000,
        "n" => value,
        _ => panic!("bad unit in {timeout}"),
    };
    assert!(nanos > 0 && nanos <= 7_000_000_000, "{timeout}");
}

#[tokio::test]
async fn cancelling_a_call_resets_the_upstream_stream() {
    let mut app = start_echo().await;
    let mesh = Mesh::start(app.addr).await;
    let mut client = echo_client(mesh.client.outbound, "echo.test").await;

    let mut stream = client
        .server_stream(EchoRequest {
            payload: b"forever".to_vec(),
            count: u32::MAX,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.next().await.unwrap().unwrap().payload, b"forever");
    drop(stream);
    tokio::time::timeout(PATIENCE, app.cancelled.recv())
        .await
        .expect("the app saw the cancellation")
        .unwrap();
}

#[tokio::test]
async fn no_route_is_unimplemented_with_x_pylon_error() {
    let app = start_echo().await;
    let mesh = Mesh::start(app.addr).await;
    let mut client = echo_client(mesh.client.outbound, "nowhere.test").await;
    let status = client.unary(req(b"x")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    assert_eq!(status.metadata().get("x-pylon-error").unwrap(), "no-route");
    assert!(
        status.message().contains("no route for nowhere.test"),
        "{}",
        status.message()
    );
}

fn backend_policy(endpoint: &str, identity: &str) -> String {
    backend_yaml("app", &[endpoint.to_string()], Some(identity))
        + &route_yaml("GRPCRoute", "echo", "echo.test", &[("app", 1)])
}

#[tokio::test]
async fn identity_mismatch_is_unavailable_with_x_pylon_error() {
    let app = start_echo().await;
    let mesh = Mesh::start_with(app.addr, |inbound| {
        backend_policy(
            &inbound.to_string(),
            "spiffe://pylon.test/ns/default/sa/someone-else",
        )
    })
    .await;
    let mut client = echo_client(mesh.client.outbound, "echo.test").await;
    let status = client.unary(req(b"x")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        status.metadata().get("x-pylon-error").unwrap(),
        "identity-mismatch"
    );
    assert!(
        status.message().contains(SERVER_ID) && status.message().contains("someone-else"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn connect_failure_is_unavailable_with_x_pylon_error() {
    let app = start_echo().await;
    // A port that was free a moment ago: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mesh = Mesh::start_with(app.addr, |_| backend_policy(&closed.to_string(), SERVER_ID)).await;
    let mut client = echo_client(mesh.client.outbound, "echo.test").await;
    let status = client.unary(req(b"x")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        status.metadata().get("x-pylon-error").unwrap(),
        "connect-failed"
    );
    assert!(
        status.message().contains(&closed.to_string()),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn app_down_behind_the_inbound_sidecar_is_unavailable() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mesh = Mesh::start(closed).await;
    let mut client = echo_client(mesh.client.outbound, "echo.test").await;
    let status = client.unary(req(b"x")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        status.metadata().get("x-pylon-error").unwrap(),
        "connect-failed"
    );
}
