//! A request body that can be sent again: the caller's body is streamed to
//! the first attempt and recorded on the way, up to a limit; a retry gets a
//! body that replays the record and then goes on reading the caller's body
//! where the previous attempt left off.
//!
//! Only one attempt reads from the caller at a time: each new attempt takes
//! over (`ReplayBody::retry`), and the body of an abandoned attempt fails if
//! polled again, so it can never steal frames from its successor. Once the
//! record would exceed the limit it is dropped and no further attempt may be
//! made (`ReplayBody::replayable`): a large body is sent once. The limit is
//! the bootstrap `outbound.retryBufferBytes` (64 KiB by default).
//!
//! Not here: deciding whether to retry (`proxy::stack`).

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use super::body::{BoxError, ProxyBody};

#[derive(Debug)]
struct Shared<B> {
    /// The caller's body, until read to the end.
    source: Option<B>,
    /// Every data frame read from the caller so far, while not capped.
    recorded: Vec<Bytes>,
    recorded_len: usize,
    /// Data frames read from the caller, by any attempt.
    frames_read: usize,
    trailers: Option<HeaderMap>,
    /// The record outgrew the limit and was dropped.
    capped: bool,
    /// The caller's body failed (it was cut off, or timed out): what was
    /// read is not the whole body, and must never be sent as if it were.
    failed: bool,
    limit: usize,
    /// The attempt allowed to read: older attempts' bodies fail.
    active: u64,
}

/// One attempt's view of the request body.
#[derive(Debug)]
pub struct ReplayBody<B = ProxyBody> {
    shared: Arc<Mutex<Shared<B>>>,
    attempt: u64,
    /// Data frames this attempt has sent so far.
    seen: usize,
    trailers_sent: bool,
}

/// The error of a body whose attempt was superseded, or whose caller body
/// failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("request body superseded by a newer attempt")]
    Superseded,
    #[error("request body too large to replay")]
    Capped,
    #[error("request body failed in an earlier attempt")]
    Failed,
    #[error("request body: {0}")]
    Caller(BoxError),
}

impl<B> ReplayBody<B> {
    /// Wraps the caller's body for the first attempt.
    pub fn new(source: B, limit: usize) -> Self {
        ReplayBody {
            shared: Arc::new(Mutex::new(Shared {
                source: Some(source),
                recorded: Vec::new(),
                recorded_len: 0,
                frames_read: 0,
                trailers: None,
                capped: false,
                failed: false,
                limit,
                active: 0,
            })),
            attempt: 0,
            seen: 0,
            trailers_sent: false,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared<B>> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a new attempt could send the whole body again.
    pub fn replayable(&self) -> bool {
        let shared = self.lock();
        !shared.capped && !shared.failed
    }

    /// A body for the next attempt; this one (and every older one) stops.
    pub fn retry(&self) -> ReplayBody<B> {
        let mut shared = self.lock();
        shared.active += 1;
        ReplayBody {
            shared: self.shared.clone(),
            attempt: shared.active,
            seen: 0,
            trailers_sent: false,
        }
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = ReplayError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ReplayError>>> {
        let this = self.get_mut();
        let mut shared = this.shared.lock().unwrap_or_else(PoisonError::into_inner);
        if shared.active != this.attempt {
            return Poll::Ready(Some(Err(ReplayError::Superseded)));
        }
        if this.seen < shared.frames_read {
            // Frames an earlier attempt read: replay them, if still kept.
            let Some(chunk) = shared.recorded.get(this.seen).cloned() else {
                return Poll::Ready(Some(Err(ReplayError::Capped)));
            };
            this.seen += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        let Some(source) = shared.source.as_mut() else {
            if shared.failed {
                return Poll::Ready(Some(Err(ReplayError::Failed)));
            }
            // The caller's body is done: trailers, if any, then the end.
            if !this.trailers_sent
                && let Some(t) = shared.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            return Poll::Ready(None);
        };
        match Pin::new(source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                shared.source = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                shared.source = None;
                shared.failed = true;
                Poll::Ready(Some(Err(ReplayError::Caller(e.into()))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        shared.frames_read += 1;
                        this.seen += 1;
                        if !shared.capped {
                            if shared.recorded_len + data.len() <= shared.limit {
                                shared.recorded_len += data.len();
                                shared.recorded.push(data.clone());
                            } else {
                                shared.capped = true;
                                shared.recorded = Vec::new();
                                shared.recorded_len = 0;
                            }
                        }
                        Frame::data(data)
                    }
                    Err(frame) => {
                        if let Some(t) = frame.trailers_ref() {
                            shared.trailers = Some(t.clone());
                            this.trailers_sent = true;
                        }
                        frame
                    }
                };
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let shared = self.lock();
        shared.active == self.attempt
            && self.seen >= shared.frames_read
            && shared
                .source
                .as_ref()
                .is_none_or(http_body::Body::is_end_stream)
            && (self.trailers_sent || shared.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let shared = self.lock();
        let pending: u64 = shared.recorded[self.seen.min(shared.recorded.len())..]
            .iter()
            .map(|b| b.len() as u64)
            .sum();
        match &shared.source {
            None => SizeHint::with_exact(pending),
            Some(s) => {
                let h = s.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(h.lower() + pending);
                if let Some(upper) = h.upper() {
                    out.set_upper(upper + pending);
                }
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    type TestBody = StreamBody<
        futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>,
    >;

    fn frames(frames: Vec<Frame<Bytes>>) -> TestBody {
        StreamBody::new(futures_util::stream::iter(
            frames.into_iter().map(Ok).collect::<Vec<_>>(),
        ))
    }

    fn body(chunks: &[&'static str]) -> TestBody {
        frames(
            chunks
                .iter()
                .map(|c| Frame::data(Bytes::from_static(c.as_bytes())))
                .collect(),
        )
    }

    async fn read(b: ReplayBody<TestBody>) -> Result<(String, Option<HeaderMap>), ReplayError> {
        let collected = b.collect().await?;
        let trailers = collected.trailers().cloned();
        Ok((
            String::from_utf8(collected.to_bytes().to_vec()).unwrap(),
            trailers,
        ))
    }

    #[tokio::test]
    async fn a_retry_replays_what_the_first_attempt_read() {
        let first = ReplayBody::new(body(&["a", "b", "c"]), 1024);
        let retry = first.retry();
        // The first attempt is superseded before reading anything; the
        // retry reads the caller's body itself.
        assert!(matches!(read(first).await, Err(ReplayError::Superseded)));
        assert_eq!(read(retry).await.unwrap().0, "abc");

        let mut first = ReplayBody::new(body(&["a", "b", "c"]), 1024);
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "a");
        let second = first.retry();
        assert!(second.replayable());
        assert_eq!(
            read(second).await.unwrap().0,
            "abc",
            "replayed a, then read b and c"
        );
    }

    #[tokio::test]
    async fn trailers_are_replayed_too() {
        let mut t = HeaderMap::new();
        t.insert("x-sum", "1".parse().unwrap());
        let source = frames(vec![
            Frame::data(Bytes::from_static(b"data")),
            Frame::trailers(t.clone()),
        ]);
        let first = ReplayBody::new(source, 1024);
        let retry_later = first.retry();
        let (text, trailers) = read(retry_later).await.unwrap();
        assert_eq!((text.as_str(), trailers), ("data", Some(t.clone())));
        let third = ReplayBody {
            shared: first.shared.clone(),
            attempt: 0,
            seen: 0,
            trailers_sent: false,
        }
        .retry();
        assert_eq!(read(third).await.unwrap(), ("data".to_string(), Some(t)));
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_sent_once_and_not_replayable() {
        let first = ReplayBody::new(body(&["12345", "67890", "x"]), 8);
        let retry = first.retry();
        let (text, _) = read(retry).await.unwrap();
        assert_eq!(
            text, "1234567890x",
            "the attempt itself still gets everything"
        );
        let shared = first.shared.clone();
        let attempt = ReplayBody {
            shared,
            attempt: 1,
            seen: 0,
            trailers_sent: false,
        };
        assert!(!attempt.replayable());
        assert!(matches!(
            read(attempt.retry()).await,
            Err(ReplayError::Capped)
        ));
    }

    #[tokio::test]
    async fn a_caller_body_that_failed_is_never_replayed_as_if_whole() {
        let source = StreamBody::new(futures_util::stream::iter(vec![
            Ok(Frame::data(Bytes::from_static(b"part"))),
            Err(BoxError::from("the caller stalled")),
        ]));
        let mut first = ReplayBody::new(source, 1024);
        assert_eq!(
            first.frame().await.unwrap().unwrap().into_data().unwrap(),
            "part"
        );
        assert!(matches!(
            first.frame().await,
            Some(Err(ReplayError::Caller(_)))
        ));
        assert!(!first.replayable(), "a retry would send a truncated body");
        let mut retry = first.retry();
        assert_eq!(
            retry.frame().await.unwrap().unwrap().into_data().unwrap(),
            "part"
        );
        assert!(
            matches!(retry.frame().await, Some(Err(ReplayError::Failed))),
            "the replay fails where the caller's body did, it does not end"
        );
    }
}
