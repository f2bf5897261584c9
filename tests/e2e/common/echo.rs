//! The test application: `pylon.v1.Echo`, every gRPC call shape.
//!
//! Replies carry the request metadata the server saw (so tests can check
//! what crossed the mesh), custom response headers and, on failure, custom
//! trailers. A server stream with `count == u32::MAX` runs until the caller
//! cancels; the server reports the cancellation on `cancelled`.

use std::net::SocketAddr;
use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use pylon_proto::v1::echo_server::{Echo, EchoServer};
use pylon_proto::v1::{EchoReply, EchoRequest};
use tokio::sync::mpsc;
use tonic::metadata::{KeyAndValueRef, MetadataMap, MetadataValue};
use tonic::{Request, Response, Status, Streaming};

pub const MAX_MESSAGE: usize = 64 << 20;

#[derive(Clone)]
pub struct EchoService {
    /// Sent back in the `x-served-by` response header.
    name: &'static str,
    cancelled: mpsc::UnboundedSender<()>,
}

/// Renders metadata as sorted `name: value` lines (binary values base64, as
/// they travel).
fn describe(md: &MetadataMap) -> Vec<String> {
    let mut lines: Vec<String> = md
        .iter()
        .map(|kv| match kv {
            KeyAndValueRef::Ascii(k, v) => {
                format!("{}: {}", k, v.to_str().unwrap_or("<non-ascii>"))
            }
            KeyAndValueRef::Binary(k, v) => {
                let bytes = v.to_bytes().map(|b| b.to_vec()).unwrap_or_default();
                format!("{k}: {bytes:?}")
            }
        })
        .collect();
    lines.sort();
    lines
}

fn fail(req: &EchoRequest) -> Option<Status> {
    (req.status != 0).then(|| {
        let mut md = MetadataMap::new();
        md.insert("x-trailer", MetadataValue::from_static("trailer-value"));
        md.insert_bin("x-trailer-bin", MetadataValue::from_bytes(&[0, 1, 2, 255]));
        Status::with_metadata(
            tonic::Code::from_i32(req.status as i32),
            req.message.clone(),
            md,
        )
    })
}

fn with_echoed_headers<T>(name: &'static str, md: &MetadataMap, body: T) -> Response<T> {
    let mut resp = Response::new(body);
    resp.metadata_mut()
        .insert("x-served-by", MetadataValue::from_static(name));
    for kv in md.iter() {
        match kv {
            KeyAndValueRef::Ascii(k, v) if k.as_str().starts_with("x-") => {
                if let Ok(k) =
                    format!("echo-{}", k.as_str()).parse::<tonic::metadata::AsciiMetadataKey>()
                {
                    resp.metadata_mut().insert(k, v.clone());
                }
            }
            KeyAndValueRef::Binary(k, v) if k.as_str().starts_with("x-") => {
                if let Ok(k) =
                    format!("echo-{}", k.as_str()).parse::<tonic::metadata::BinaryMetadataKey>()
                {
                    resp.metadata_mut().insert_bin(k, v.clone());
                }
            }
            _ => {}
        }
    }
    resp
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let md = req.metadata().clone();
        let req = req.into_inner();
        if let Some(status) = fail(&req) {
            return Err(status);
        }
        Ok(with_echoed_headers(
            self.name,
            &md,
            EchoReply {
                payload: req.payload,
                metadata: describe(&md),
            },
        ))
    }

    async fn client_stream(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        let md = req.metadata().clone();
        let mut stream = req.into_inner();
        let mut payload = Vec::new();
        while let Some(msg) = stream.next().await {
            let msg = msg?;
            if let Some(status) = fail(&msg) {
                return Err(status);
            }
            payload.extend_from_slice(&msg.payload);
        }
        Ok(with_echoed_headers(
            self.name,
            &md,
            EchoReply {
                payload,
                metadata: describe(&md),
            },
        ))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        req: Request<EchoRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        let md = req.metadata().clone();
        let req = req.into_inner();
        let metadata = describe(&md);
        let (tx, rx) = mpsc::channel(4);
        let cancelled = self.cancelled.clone();
        tokio::spawn(async move {
            let mut sent = 0u32;
            while sent < req.count {
                let reply = EchoReply {
                    payload: req.payload.clone(),
                    metadata: metadata.clone(),
                };
                if tx.send(Ok(reply)).await.is_err() {
                    // The response stream was dropped: the caller went away.
                    let _ = cancelled.send(());
                    return;
                }
                sent = sent.saturating_add(1);
            }
            if let Some(status) = fail(&req) {
                let _ = tx.send(Err(status)).await;
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(with_echoed_headers(
            self.name,
            &md,
            Box::pin(stream) as ReplyStream,
        ))
    }

    type BidiStream = ReplyStream;

    async fn bidi(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let md = req.metadata().clone();
        let metadata = describe(&md);
        let stream = req.into_inner().map(move |msg| {
            let msg = msg?;
            if let Some(status) = fail(&msg) {
                return Err(status);
            }
            Ok(EchoReply {
                payload: msg.payload,
                metadata: metadata.clone(),
            })
        });
        Ok(with_echoed_headers(
            self.name,
            &md,
            Box::pin(stream) as ReplyStream,
        ))
    }
}

/// A running Echo server.
pub struct EchoApp {
    pub addr: SocketAddr,
    pub cancelled: mpsc::UnboundedReceiver<()>,
    _task: tokio::task::JoinHandle<()>,
}

pub async fn start_echo() -> EchoApp {
    start_named_echo("echo").await
}

/// The Echo service naming itself `name`, to serve however a test likes,
/// and the receiver of its stream cancellations.
pub fn echo_service(name: &'static str) -> (EchoServer<EchoService>, mpsc::UnboundedReceiver<()>) {
    let (tx, cancelled) = mpsc::unbounded_channel();
    let svc = EchoServer::new(EchoService {
        name,
        cancelled: tx,
    })
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE);
    (svc, cancelled)
}

/// An Echo server that names itself `name` in `x-served-by`.
pub async fn start_named_echo(name: &'static str) -> EchoApp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (svc, cancelled) = echo_service(name);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
    EchoApp {
        addr,
        cancelled,
        _task: task,
    }
}

/// A client of the Echo service through `proxy`, naming `authority`.
pub async fn echo_client(
    proxy: SocketAddr,
    authority: &str,
) -> pylon_proto::v1::echo_client::EchoClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{proxy}"))
        .unwrap()
        .origin(format!("http://{authority}").parse().unwrap())
        .connect()
        .await
        .unwrap();
    pylon_proto::v1::echo_client::EchoClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}
