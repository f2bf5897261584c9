//! The retry decisions of a call, from plain inputs (docs/policy.md,
//! "Retry"): whether an attempt's answer qualifies, whether to read the
//! first body frame for a status in trailers, and whether another try is
//! allowed and after how long. No I/O and no clock of its own: the call
//! (`proxy::stack`) tells it what happened and when, and does what it says.
//!
//! The retry budget is the one input with a side effect (a withdrawal); it
//! is asked last, only when everything else allows the retry.

use std::time::Duration;

use pylon_proto::policy::{GrpcCode, Retry, RetryOn};
use tokio::time::Instant;

use crate::http::error::{grpc_code_for_http, http_status_for_grpc};

/// `grpc-retry-pushback-ms`.
pub const GRPC_RETRY_PUSHBACK: http::HeaderName =
    http::HeaderName::from_static("grpc-retry-pushback-ms");
const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(250);

/// How an attempt ended, as far as retrying goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A failure before the request could reach a server (connect failure
    /// or timeout, TLS, identity mismatch, refused stream).
    NeverSent,
    /// The endpoint failed before a response head (reset, connection lost).
    Failed,
    /// The attempt timeout (`timeouts.backendRequest`) ran out.
    AttemptTimeout,
    /// The call's deadline, `overflow`, `no-endpoint` and the like: the
    /// proxy's own verdicts, never retried.
    Final,
    /// A response head (with the gRPC status of its head or of trailers read
    /// early, when any).
    Response { http: u16, grpc: Option<GrpcCode> },
    /// A response whose first body frame, read early, was a message (or
    /// trailers without a status): it is passed on.
    Streaming,
}

/// What the server said about retrying (`grpc-retry-pushback-ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushback {
    /// Wait this long before retrying.
    After(Duration),
    /// Do not retry (a negative or malformed value).
    Stop,
}

impl Pushback {
    /// `grpc-retry-pushback-ms` of a header block, when present.
    pub fn of(headers: &http::HeaderMap) -> Option<Pushback> {
        let v = headers.get(GRPC_RETRY_PUSHBACK)?;
        Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .and_then(|ms| u64::try_from(ms).ok())
                .map_or(Pushback::Stop, |ms| {
                    Pushback::After(Duration::from_millis(ms))
                }),
        )
    }
}

/// Why an answer is passed on rather than retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deliver {
    /// The outcome does not qualify under the route's `codes`.
    NotRetryable,
    /// All attempts are used up.
    Exhausted,
    /// The server asked not to retry.
    PushbackStop,
    /// The request body outgrew the replay buffer.
    BodyTooLarge,
    /// The wait would end at or after the call's deadline.
    PastDeadline,
    /// The Backend's retry budget is spent.
    BudgetSpent,
}

/// What to do with an attempt's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Discard the answer and try again after `after`, on an endpoint not
    /// tried yet when there is one.
    Retry { after: Duration },
    /// Pass the answer on to the caller.
    Deliver(Deliver),
}

/// What the call knows when an attempt has ended.
#[derive(Debug, Clone, Copy)]
pub struct Answered {
    pub outcome: Outcome,
    pub pushback: Option<Pushback>,
    /// Attempts made so far, this one included (1 after the first try).
    pub attempts: u32,
    /// The request body can still be replayed.
    pub replayable: bool,
    pub now: Instant,
    /// When the call must be over.
    pub deadline: Option<Instant>,
}

/// A route's retry rule, deciding.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy<'a> {
    retry: &'a Retry,
}

impl<'a> RetryPolicy<'a> {
    pub fn new(retry: &'a Retry) -> Self {
        RetryPolicy { retry }
    }

    /// Tries in all: the first and `attempts` retries.
    pub fn max_attempts(&self) -> u32 {
        self.retry.attempts.saturating_add(1)
    }

    /// Whether the route retries an answer that reads as `grpc` to gRPC
    /// callers and `http` to HTTP callers (`UNAVAILABLE` and `503` are the
    /// same failure).
    fn lists(&self, grpc: GrpcCode, http: u16) -> bool {
        self.retry.codes.contains(&RetryOn::Grpc(grpc))
            || self.retry.codes.contains(&RetryOn::Http(http))
    }

    /// Whether an outcome qualifies for another try.
    pub fn qualifies(&self, outcome: Outcome) -> bool {
        match outcome {
            Outcome::NeverSent => true,
            Outcome::Failed => self.lists(GrpcCode::Unavailable, 503),
            Outcome::AttemptTimeout => self.lists(GrpcCode::DeadlineExceeded, 504),
            Outcome::Final | Outcome::Streaming => false,
            Outcome::Response {
                grpc: Some(code), ..
            } => self.lists(code, http_status_for_grpc(code).as_u16()),
            Outcome::Response { http: 200, .. } => false,
            Outcome::Response { http, grpc: None } => self.lists(grpc_code_for_http(http), http),
        }
    }

    /// Whether to read the first body frame of a gRPC caller's response
    /// before passing it on: HTTP 200 without `grpc-status` in the head,
    /// another attempt possible, and a gRPC status listed.
    pub fn peeks(&self, grpc_caller: bool, head: Outcome, attempts: u32, replayable: bool) -> bool {
        grpc_caller
            && head
                == (Outcome::Response {
                    http: 200,
                    grpc: None,
                })
            && attempts < self.max_attempts()
            && replayable
            && self
                .retry
                .codes
                .iter()
                .any(|c| matches!(c, RetryOn::Grpc(_)))
    }

    /// The wait before retry `n` (attempts made so far): exponential
    /// backoff with full jitter, a uniform draw from zero to
    /// `min(max, base × 2^(n-1))`.
    pub fn backoff(&self, n: u32) -> Duration {
        let (base, max) = self.backoff_bounds();
        pylon_proto::backoff::Backoff::full_jitter(base, max).delay(n.saturating_sub(1))
    }

    fn backoff_bounds(&self) -> (Duration, Duration) {
        self.retry
            .backoff
            .map_or((DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_MAX), |b| {
                (b.base, b.max)
            })
    }

    /// Whether to try again, and after how long. `budget` is asked (and
    /// withdraws) only when everything else allows the retry.
    pub fn decide(&self, a: &Answered, budget: impl FnOnce() -> bool) -> Decision {
        if !self.qualifies(a.outcome) {
            return Decision::Deliver(Deliver::NotRetryable);
        }
        if a.attempts >= self.max_attempts() {
            return Decision::Deliver(Deliver::Exhausted);
        }
        let after = match a.pushback {
            Some(Pushback::Stop) => return Decision::Deliver(Deliver::PushbackStop),
            // A server cannot park the call longer than the route's own
            // backoff would (the deadline bounds it below too).
            Some(Pushback::After(wait)) => wait.min(self.backoff_bounds().1),
            None => self.backoff(a.attempts),
        };
        if !a.replayable {
            return Decision::Deliver(Deliver::BodyTooLarge);
        }
        if a.deadline.is_some_and(|at| a.now + after >= at) {
            return Decision::Deliver(Deliver::PastDeadline);
        }
        if !budget() {
            return Decision::Deliver(Deliver::BudgetSpent);
        }
        Decision::Retry { after }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pylon_proto::policy::Backoff;

    fn retry(codes: Vec<RetryOn>) -> Retry {
        Retry {
            attempts: 2,
            codes,
            backoff: Some(Backoff {
                base: Duration::from_millis(10),
                max: Duration::from_millis(100),
            }),
        }
    }

    fn answered(outcome: Outcome) -> Answered {
        Answered {
            outcome,
            pushback: None,
            attempts: 1,
            replayable: true,
            now: Instant::now(),
            deadline: None,
        }
    }

    fn response(http: u16, grpc: Option<GrpcCode>) -> Outcome {
        Outcome::Response { http, grpc }
    }

    const UNAVAILABLE: RetryOn = RetryOn::Grpc(GrpcCode::Unavailable);

    #[test]
    fn failures_before_a_server_are_always_retried() {
        let r = retry(vec![RetryOn::Http(429)]);
        let p = RetryPolicy::new(&r);
        assert!(p.qualifies(Outcome::NeverSent));
        assert!(!p.qualifies(Outcome::Failed));
        assert!(!p.qualifies(Outcome::AttemptTimeout));
    }

    #[test]
    fn other_failures_need_unavailable_or_503() {
        for codes in [vec![UNAVAILABLE], vec![RetryOn::Http(503)]] {
            let r = retry(codes);
            assert!(RetryPolicy::new(&r).qualifies(Outcome::Failed));
        }
    }

    #[test]
    fn the_attempt_timeout_needs_deadline_exceeded_or_504() {
        for codes in [
            vec![RetryOn::Grpc(GrpcCode::DeadlineExceeded)],
            vec![RetryOn::Http(504)],
        ] {
            let r = retry(codes);
            assert!(RetryPolicy::new(&r).qualifies(Outcome::AttemptTimeout));
        }
        let r = retry(vec![UNAVAILABLE]);
        assert!(!RetryPolicy::new(&r).qualifies(Outcome::AttemptTimeout));
    }

    #[test]
    fn the_proxys_own_verdicts_are_never_retried() {
        let r = retry(vec![
            UNAVAILABLE,
            RetryOn::Http(503),
            RetryOn::Http(504),
            RetryOn::Grpc(GrpcCode::DeadlineExceeded),
        ]);
        let p = RetryPolicy::new(&r);
        assert!(!p.qualifies(Outcome::Final));
        let ok = retry(vec![RetryOn::Grpc(GrpcCode::Ok)]);
        assert!(
            !RetryPolicy::new(&ok).qualifies(Outcome::Streaming),
            "a message came first"
        );
        assert_eq!(
            p.decide(&answered(Outcome::Final), || true),
            Decision::Deliver(Deliver::NotRetryable)
        );
    }

    #[test]
    fn a_grpc_status_qualifies_by_name_or_by_its_http_status() {
        let by_name = retry(vec![RetryOn::Grpc(GrpcCode::ResourceExhausted)]);
        let by_http = retry(vec![RetryOn::Http(503)]);
        assert!(
            RetryPolicy::new(&by_name).qualifies(response(200, Some(GrpcCode::ResourceExhausted)))
        );
        assert!(!RetryPolicy::new(&by_name).qualifies(response(200, Some(GrpcCode::Unavailable))));
        // UNAVAILABLE maps to 503.
        assert!(RetryPolicy::new(&by_http).qualifies(response(200, Some(GrpcCode::Unavailable))));
        assert!(!RetryPolicy::new(&by_http).qualifies(response(200, Some(GrpcCode::Ok))));
    }

    #[test]
    fn an_http_status_qualifies_by_number_or_by_its_grpc_status() {
        let by_http = retry(vec![RetryOn::Http(502)]);
        let by_name = retry(vec![UNAVAILABLE]);
        assert!(RetryPolicy::new(&by_http).qualifies(response(502, None)));
        assert!(!RetryPolicy::new(&by_http).qualifies(response(503, None)));
        // 503 maps to UNAVAILABLE.
        assert!(RetryPolicy::new(&by_name).qualifies(response(503, None)));
        // 200 without a status is a success, whatever is listed.
        assert!(!RetryPolicy::new(&by_name).qualifies(response(200, None)));
    }

    #[test]
    fn peeking_needs_a_grpc_caller_a_bare_200_another_try_and_a_grpc_code() {
        let r = retry(vec![UNAVAILABLE]);
        let p = RetryPolicy::new(&r);
        let bare = response(200, None);
        assert!(p.peeks(true, bare, 1, true));
        assert!(!p.peeks(false, bare, 1, true), "HTTP caller");
        assert!(
            !p.peeks(true, response(200, Some(GrpcCode::Ok)), 1, true),
            "status in the head"
        );
        assert!(!p.peeks(true, response(503, None), 1, true), "not 200");
        assert!(!p.peeks(true, bare, 3, true), "last attempt");
        assert!(!p.peeks(true, bare, 1, false), "body not replayable");
        let http_only = retry(vec![RetryOn::Http(503)]);
        assert!(
            !RetryPolicy::new(&http_only).peeks(true, bare, 1, true),
            "no gRPC code listed"
        );
    }

    #[test]
    fn attempts_run_out() {
        let r = retry(vec![UNAVAILABLE]);
        let p = RetryPolicy::new(&r);
        assert_eq!(p.max_attempts(), 3);
        let mut a = answered(Outcome::Failed);
        a.attempts = 2;
        assert!(matches!(p.decide(&a, || true), Decision::Retry { .. }));
        a.attempts = 3;
        assert_eq!(p.decide(&a, || true), Decision::Deliver(Deliver::Exhausted));
    }

    #[test]
    fn pushback_sets_the_wait_or_stops_and_is_capped_at_the_backoff_maximum() {
        let r = retry(vec![UNAVAILABLE]);
        let p = RetryPolicy::new(&r);
        let mut a = answered(response(200, Some(GrpcCode::Unavailable)));
        a.pushback = Some(Pushback::After(Duration::from_millis(40)));
        assert_eq!(
            p.decide(&a, || true),
            Decision::Retry {
                after: Duration::from_millis(40)
            }
        );
        a.pushback = Some(Pushback::After(Duration::from_secs(3600)));
        assert_eq!(
            p.decide(&a, || true),
            Decision::Retry {
                after: Duration::from_millis(100)
            }
        );
        a.pushback = Some(Pushback::Stop);
        assert_eq!(
            p.decide(&a, || true),
            Decision::Deliver(Deliver::PushbackStop)
        );
    }

    #[test]
    fn pushback_header_values() {
        let mut h = http::HeaderMap::new();
        assert_eq!(Pushback::of(&h), None);
        h.insert(GRPC_RETRY_PUSHBACK, http::HeaderValue::from_static("250"));
        assert_eq!(
            Pushback::of(&h),
            Some(Pushback::After(Duration::from_millis(250)))
        );
        for stop in ["-1", "soon", "1.5", ""] {
            h.insert(GRPC_RETRY_PUSHBACK, http::HeaderValue::from_static(stop));
            assert_eq!(Pushback::of(&h), Some(Pushback::Stop), "{stop:?}");
        }
    }

    #[test]
    fn a_body_past_the_replay_buffer_stops_retries() {
        let r = retry(vec![UNAVAILABLE]);
        let mut a = answered(Outcome::Failed);
        a.replayable = false;
        assert_eq!(
            RetryPolicy::new(&r).decide(&a, || true),
            Decision::Deliver(Deliver::BodyTooLarge)
        );
    }

    #[test]
    fn a_wait_that_would_reach_the_deadline_stops_retries() {
        let r = retry(vec![UNAVAILABLE]);
        let p = RetryPolicy::new(&r);
        let mut a = answered(response(200, Some(GrpcCode::Unavailable)));
        a.pushback = Some(Pushback::After(Duration::from_millis(50)));
        a.deadline = Some(a.now + Duration::from_millis(50));
        assert_eq!(
            p.decide(&a, || true),
            Decision::Deliver(Deliver::PastDeadline)
        );
        a.deadline = Some(a.now + Duration::from_millis(51));
        assert!(matches!(p.decide(&a, || true), Decision::Retry { .. }));
    }

    #[test]
    fn the_budget_is_asked_last_and_only_when_all_else_allows() {
        let r = retry(vec![UNAVAILABLE]);
        let p = RetryPolicy::new(&r);
        let mut asked = 0;
        let mut a = answered(Outcome::Failed);
        assert_eq!(
            p.decide(&a, || {
                asked += 1;
                false
            }),
            Decision::Deliver(Deliver::BudgetSpent)
        );
        assert_eq!(asked, 1);
        a.replayable = false;
        let _ = p.decide(&a, || {
            asked += 1;
            true
        });
        let _ = p.decide(&answered(response(200, None)), || {
            asked += 1;
            true
        });
        assert_eq!(asked, 1, "asked when the retry was not allowed anyway");
    }

    #[test]
    fn backoff_is_full_jitter_under_an_exponential_capped_ceiling() {
        let r = retry(vec![]);
        let p = RetryPolicy::new(&r);
        fastrand::seed(3);
        for (n, ceiling) in [(1, 10), (2, 20), (3, 40), (4, 80), (5, 100), (40, 100)] {
            let draws: Vec<Duration> = (0..500).map(|_| p.backoff(n)).collect();
            let max = draws.iter().max().unwrap();
            let min = draws.iter().min().unwrap();
            assert!(
                *max <= Duration::from_millis(ceiling),
                "attempt {n}: {max:?}"
            );
            assert!(
                *max > Duration::from_millis(ceiling) * 9 / 10,
                "attempt {n}: {max:?}"
            );
            assert!(
                *min < Duration::from_millis(ceiling) / 10,
                "attempt {n}: {min:?}"
            );
        }
    }

    #[test]
    fn the_default_backoff_is_25ms_doubling_to_250ms() {
        let r = Retry {
            attempts: 1,
            codes: vec![UNAVAILABLE],
            backoff: None,
        };
        let p = RetryPolicy::new(&r);
        fastrand::seed(9);
        let max = (0..500).map(|_| p.backoff(1)).max().unwrap();
        assert!(max <= Duration::from_millis(25) && max > Duration::from_millis(22));
        let max = (0..500).map(|_| p.backoff(10)).max().unwrap();
        assert!(max <= Duration::from_millis(250) && max > Duration::from_millis(225));
    }
}
