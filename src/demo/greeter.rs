//! The sample service of `pylon demo` and the mesh benchmark:
//! `helloworld.Greeter/SayHello`, answering `Hello, <name>`.
//!
//! It does no work beyond formatting the reply, so what a load generator
//! measures against it is the cost of the path to it (gRPC, HTTP/2, and the
//! mesh when there is one), not of the service. The demo can make it fail on
//! command ([`RunningGreeter::set_failing`]) to show the mesh's resilience.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use pylon_proto::helloworld::greeter_server::{Greeter, GreeterServer};
use pylon_proto::helloworld::{HelloReply, HelloRequest};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// `SayHello` → `Hello, <name>`, or UNAVAILABLE while `failing` is set.
#[derive(Debug, Clone, Default)]
pub struct HelloGreeter {
    failing: Arc<AtomicBool>,
    /// Calls answered, either way.
    calls: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl Greeter for HelloGreeter {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if self.failing.load(Ordering::Relaxed) {
            return Err(Status::unavailable("this greeter is failing on purpose"));
        }
        let name = request.into_inner().name;
        Ok(Response::new(HelloReply {
            message: format!("Hello, {name}"),
        }))
    }
}

/// A [`HelloGreeter`] served over h2c on a background task.
pub struct RunningGreeter {
    pub addr: SocketAddr,
    failing: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    shutdown: oneshot::Sender<()>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningGreeter {
    /// Binds `addr` (port 0 for a free one) and starts serving.
    pub async fn start(addr: SocketAddr) -> std::io::Result<RunningGreeter> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let (shutdown, stop_requested) = oneshot::channel::<()>();
        let greeter = HelloGreeter::default();
        let failing = greeter.failing.clone();
        let calls = greeter.calls.clone();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(GreeterServer::new(greeter))
                .serve_with_incoming_shutdown(incoming, async {
                    // A dropped sender stops the server as well.
                    let _ = stop_requested.await;
                }),
        );
        Ok(RunningGreeter {
            addr,
            failing,
            calls,
            shutdown,
            server,
        })
    }

    /// From now on every call fails with UNAVAILABLE (`true`) or succeeds.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::Relaxed);
    }

    /// Calls answered so far, successfully or not.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Stops accepting, lets open connections finish, and returns how
    /// serving ended.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(());
        self.server.await??;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn says_hello_to_the_caller_by_name() {
        let reply = HelloGreeter::default()
            .say_hello(Request::new(HelloRequest {
                name: "mesh".into(),
            }))
            .await
            .unwrap();
        assert_eq!(reply.into_inner().message, "Hello, mesh");
    }
}
