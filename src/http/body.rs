//! The one body type the proxy sends, in both directions: a body streamed
//! from the other side, a small body the proxy made itself, or nothing.
//!
//! An enum rather than a boxed trait object, so forwarding a request costs
//! no allocation for its body.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::end::EndBody;
use super::h2_client::RecvBody;
use super::pool::PooledBody;
use super::replay::ReplayBody;
use super::request_body::RequestBody;

/// Errors of any body the proxy forwards.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug)]
pub enum ProxyBody {
    Empty,
    Full(Option<Bytes>),
    Incoming(Incoming),
    /// A response body from an HTTP/2 upstream.
    H2(RecvBody),
    /// A caller's request body, under the body read timeout.
    Request(RequestBody),
    /// An HTTP/1 response body whose connection goes back to its pool once
    /// the body has been read to the end.
    Pooled(PooledBody),
    /// A request body under a retry policy: recorded for replay.
    Replay(ReplayBody),
    /// A response watched to its end (`http::end`): deadline enforced,
    /// its end told to the call's observers.
    End(Box<EndBody>),
    /// Any body, in unit tests.
    #[cfg(test)]
    Boxed(TestBody),
}

impl ProxyBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ProxyBody::Full(Some(bytes.into()))
    }

    /// Any body, in unit tests.
    #[cfg(test)]
    pub fn boxed(body: impl Body<Data = Bytes, Error = BoxError> + Send + Sync + 'static) -> Self {
        ProxyBody::Boxed(TestBody(Box::pin(body)))
    }
}

/// Any body, in unit tests.
#[cfg(test)]
pub struct TestBody(Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send + Sync>>);

#[cfg(test)]
impl std::fmt::Debug for TestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestBody")
    }
}

impl From<Incoming> for ProxyBody {
    fn from(b: Incoming) -> Self {
        ProxyBody::Incoming(b)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Incoming(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            ProxyBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            ProxyBody::Request(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Pooled(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            ProxyBody::Replay(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            ProxyBody::End(b) => Pin::new(b.as_mut()).poll_frame(cx),
            #[cfg(test)]
            ProxyBody::Boxed(b) => b.0.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Incoming(b) => b.is_end_stream(),
            ProxyBody::H2(b) => b.is_end_stream(),
            ProxyBody::Request(b) => b.is_end_stream(),
            ProxyBody::Pooled(b) => b.is_end_stream(),
            ProxyBody::Replay(b) => b.is_end_stream(),
            ProxyBody::End(b) => b.is_end_stream(),
            #[cfg(test)]
            ProxyBody::Boxed(b) => b.0.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Incoming(b) => b.size_hint(),
            ProxyBody::H2(b) => b.size_hint(),
            ProxyBody::Request(b) => b.size_hint(),
            ProxyBody::Pooled(b) => b.size_hint(),
            ProxyBody::Replay(b) => b.size_hint(),
            ProxyBody::End(b) => b.size_hint(),
            #[cfg(test)]
            ProxyBody::Boxed(b) => b.0.size_hint(),
        }
    }
}
