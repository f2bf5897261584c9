//! A caller's request body as every listener hands it on: the body
//! received over HTTP/1 (hyper) or HTTP/2 (`h2_server`), read with a limit
//! on the gap between its frames (`connections.bodyReadTimeout`). A
//! caller that opens a request and then trickles or stalls its body cannot
//! hold a connection, a stream, a bulkhead slot or an upstream connection
//! for longer than that gap.
//!
//! The clock runs only while the proxy is waiting for the caller: from the
//! moment a read finds nothing until the next frame, reset by each frame,
//! stopped once the body has ended. Time the proxy spends not reading
//! (an upstream that applies back-pressure, a call waiting for a slot) is
//! not the caller's fault and is not counted. When the gap is exceeded
//! the body fails with [`BodyReadTimeout`], the listener counts
//! `body_read_timeout`, and the request's [`BodyStall`] (in its
//! extensions) says so, so that whoever sees the upstream call fail can
//! blame the caller rather than the endpoint.
//!
//! Not here: what the caller is answered (`ProxyError::BodyReadTimeout`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::body::BoxError;
use super::h2_client::RecvBody;
use crate::telemetry::metrics::{Limit, ListenerLimits};

/// The caller sent no body data for the body read timeout.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the request body sent nothing for {timeout:?} (connections.bodyReadTimeout)")]
pub struct BodyReadTimeout {
    pub timeout: Duration,
}

/// Whether a request's body timed out, shared by the body and whoever
/// handles the request's failure. Carried in the request's extensions.
#[derive(Debug, Clone)]
pub struct BodyStall(Arc<StallState>);

#[derive(Debug)]
struct StallState {
    expired: AtomicBool,
    timeout: Duration,
}

impl BodyStall {
    fn new(timeout: Duration) -> BodyStall {
        BodyStall(Arc::new(StallState {
            expired: AtomicBool::new(false),
            timeout,
        }))
    }

    /// The timeout, when the body timed out.
    pub fn expired(&self) -> Option<BodyReadTimeout> {
        self.0
            .expired
            .load(Ordering::Acquire)
            .then_some(BodyReadTimeout {
                timeout: self.0.timeout,
            })
    }

    /// The stall of `extensions`' request, when it timed out.
    pub fn of(extensions: &http::Extensions) -> Option<BodyReadTimeout> {
        extensions.get::<BodyStall>().and_then(BodyStall::expired)
    }
}

/// A request body as a caller sent it, over either protocol.
#[derive(Debug)]
pub enum CallerBody {
    Http1(Incoming),
    Http2(RecvBody),
}

impl Body for CallerBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            CallerBody::Http1(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            CallerBody::Http2(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            CallerBody::Http1(b) => b.is_end_stream(),
            CallerBody::Http2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            CallerBody::Http1(b) => b.size_hint(),
            CallerBody::Http2(b) => b.size_hint(),
        }
    }
}

/// A caller's request body under the body read timeout.
#[derive(Debug)]
pub struct RequestBody<B = CallerBody> {
    body: B,
    /// `None` when the timeout is off or the body was empty to begin with.
    watch: Option<Watch>,
}

#[derive(Debug)]
struct Watch {
    stall: BodyStall,
    limits: ListenerLimits,
    /// Made the first time a read finds nothing (many bodies never wait).
    sleep: Option<Pin<Box<Sleep>>>,
    /// The sleep runs: the last read found nothing.
    armed: bool,
    /// The body ended (or failed): no more clock.
    done: bool,
}

impl<B: Body> RequestBody<B> {
    /// `body` with `timeout` between frames (none when `None`), counted in
    /// `limits`; the [`BodyStall`] to put in the request's extensions.
    pub fn new(
        body: B,
        timeout: Option<Duration>,
        limits: &ListenerLimits,
    ) -> (RequestBody<B>, Option<BodyStall>) {
        let Some(timeout) = timeout.filter(|_| !body.is_end_stream()) else {
            return (RequestBody { body, watch: None }, None);
        };
        let stall = BodyStall::new(timeout);
        let watch = Watch {
            stall: stall.clone(),
            limits: limits.clone(),
            sleep: None,
            armed: false,
            done: false,
        };
        (
            RequestBody {
                body,
                watch: Some(watch),
            },
            Some(stall),
        )
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(w) = &this.watch
            && let Some(expired) = w.stall.expired()
        {
            return Poll::Ready(Some(Err(expired.into())));
        }
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        let Some(w) = this.watch.as_mut().filter(|w| !w.done) else {
            return polled.map_err(Into::into);
        };
        match polled {
            Poll::Ready(frame) => {
                w.armed = false;
                w.done = !matches!(frame, Some(Ok(_))) || this.body.is_end_stream();
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = w.stall.0.timeout;
                let sleep = w
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if !w.armed {
                    w.armed = true;
                    sleep.as_mut().reset(Instant::now() + timeout);
                }
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                w.done = true;
                w.stall.0.expired.store(true, Ordering::Release);
                w.limits.hit(
                    Limit::BodyReadTimeout,
                    &format_args!(
                        "cut off a request whose body sent nothing for {timeout:?} (connections.bodyReadTimeout)"
                    ),
                );
                Poll::Ready(Some(Err(BodyReadTimeout { timeout }.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;
    use crate::telemetry::metrics::Metrics;

    type Chunks = http_body_util::StreamBody<
        tokio_stream::wrappers::ReceiverStream<Result<Frame<Bytes>, BoxError>>,
    >;

    fn channel() -> (
        tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
        Chunks,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        (
            tx,
            http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
    }

    const GAP: Duration = Duration::from_secs(30);

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_between_frames_fails_after_the_gap_and_is_counted() {
        let metrics = Metrics::new();
        let limits = metrics.listener_limits("inbound");
        let (tx, source) = channel();
        let (mut body, stall) = RequestBody::new(source, Some(GAP), &limits);
        let stall = stall.unwrap();
        // Frames within the gap pass, each restarting the clock.
        for _ in 0..3 {
            tokio::time::sleep(GAP - Duration::from_secs(1)).await;
            tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
                .await
                .unwrap();
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "x");
        }
        assert!(stall.expired().is_none());
        let started = Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(started.elapsed(), GAP);
        assert!(err.downcast_ref::<BodyReadTimeout>().is_some(), "{err}");
        assert_eq!(stall.expired().map(|t| t.timeout), Some(GAP));
        assert!(body.frame().await.unwrap().is_err(), "it stays failed");
        assert!(
            metrics.encode().contains(
                "pylon_connection_limits_total{listener=\"inbound\",limit=\"body_read_timeout\"} 1"
            ),
            "{}",
            metrics.encode()
        );
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn only_time_spent_waiting_for_the_caller_counts() {
        let metrics = Metrics::new();
        let (tx, source) = channel();
        let (mut body, stall) =
            RequestBody::new(source, Some(GAP), &metrics.listener_limits("outbound"));
        tx.send(Ok(Frame::data(Bytes::from_static(b"a"))))
            .await
            .unwrap();
        // Nobody reads for longer than the gap (back-pressure upstream):
        // the next frame, already there, is no stall.
        tokio::time::sleep(GAP * 3).await;
        assert!(body.frame().await.unwrap().is_ok());
        // The end of the body stops the clock for good.
        drop(tx);
        assert!(body.frame().await.is_none());
        tokio::time::sleep(GAP * 3).await;
        assert!(body.frame().await.is_none());
        assert!(stall.unwrap().expired().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn off_when_the_timeout_is_off() {
        let metrics = Metrics::new();
        let (tx, source) = channel();
        let (mut body, stall) =
            RequestBody::new(source, None, &metrics.listener_limits("outbound"));
        assert!(stall.is_none());
        let read = tokio::spawn(async move { body.frame().await.map(|f| f.is_ok()) });
        tokio::time::sleep(GAP * 10).await;
        tx.send(Ok(Frame::data(Bytes::from_static(b"late"))))
            .await
            .unwrap();
        assert_eq!(read.await.unwrap(), Some(true));
    }
}
