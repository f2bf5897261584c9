//! A backend's request rate limit (`rateLimit` in a BackendTrafficPolicy):
//! a token bucket of `burst` requests refilled at `requestsPerSecond`.
//!
//! The bucket is kept as GCRA (the generic cell rate algorithm) in a single
//! atomic: the *theoretical arrival time* (TAT) is the instant at which the
//! bucket will be full again. Every admitted request moves it one emission
//! interval (1 s / `requestsPerSecond`) later, and a request is admitted
//! only if that leaves the TAT at most `burst` intervals ahead of now. So
//! from idle exactly `burst` requests pass at once, then one per interval.
//!
//! This module only decides. Answering the caller (429 or
//! RESOURCE_EXHAUSTED, with `retry-after` rounded up to whole seconds) is the
//! proxy's job.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pylon_proto::policy::RateLimit;
use tokio::time::Instant;

use super::nanos_since;

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// A lock-free token bucket shared by every request to one backend.
#[derive(Debug)]
pub struct RateLimiter {
    base: Instant,
    /// Theoretical arrival time, in nanoseconds since `base`. Zero (or any
    /// time in the past) means the bucket is full.
    tat: AtomicU64,
    /// `requests_per_second` in the high half, `burst` in the low half: one
    /// load gives a consistent limit even while a reload stores a new one.
    limit: AtomicU64,
}

impl RateLimiter {
    /// A full bucket. Zero rates or bursts (which validated policy never
    /// has) are taken as 1, so the limiter never divides by zero.
    pub fn new(limit: RateLimit) -> Self {
        RateLimiter {
            base: Instant::now(),
            tat: AtomicU64::new(0),
            limit: AtomicU64::new(pack(limit)),
        }
    }

    /// Applies a reloaded limit. The TAT is kept as a point in time: the
    /// bucket is full again at the same instant it would have been under the
    /// old limit, and in between admits what the new limit allows.
    pub fn set_limit(&self, limit: RateLimit) {
        self.limit.store(pack(limit), Ordering::Relaxed);
    }

    /// The limit in force.
    pub fn limit(&self) -> RateLimit {
        unpack(self.limit.load(Ordering::Relaxed))
    }

    /// Admits one request at `now`, or says how long until one more request
    /// would be admitted.
    pub fn try_acquire(&self, now: Instant) -> Result<(), Duration> {
        let limit = self.limit();
        let interval = NANOS_PER_SECOND.div_ceil(u64::from(limit.requests_per_second));
        let capacity = interval.saturating_mul(u64::from(limit.burst));
        let now = nanos_since(self.base, now);
        // Relaxed is enough: the TAT is the whole state, and a single atomic
        // has one modification order that every CAS agrees on.
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now).saturating_add(interval);
            let ahead = next.saturating_sub(now);
            if ahead > capacity {
                return Err(Duration::from_nanos(ahead - capacity));
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }
}

/// Stores the limit with zeros raised to 1. The emission interval is
/// rounded up to whole nanoseconds, so the limiter never admits more than
/// the configured rate.
fn pack(limit: RateLimit) -> u64 {
    let rate = limit.requests_per_second.max(1);
    let burst = limit.burst.max(1);
    (u64::from(rate) << 32) | u64::from(burst)
}

fn unpack(packed: u64) -> RateLimit {
    RateLimit {
        requests_per_second: (packed >> 32) as u32,
        burst: packed as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(requests_per_second: u32, burst: u32) -> RateLimiter {
        RateLimiter::new(RateLimit {
            requests_per_second,
            burst,
        })
    }

    /// Admits as many requests as the limiter takes at `now`.
    fn drain(limiter: &RateLimiter, now: Instant) -> u32 {
        let mut admitted = 0;
        while limiter.try_acquire(now).is_ok() {
            admitted += 1;
        }
        admitted
    }

    #[tokio::test(start_paused = true)]
    async fn admits_exactly_the_burst_from_idle_then_says_how_long_to_wait() {
        let limiter = limiter(10, 5);
        let t0 = Instant::now();
        assert_eq!(drain(&limiter, t0), 5);
        assert_eq!(limiter.try_acquire(t0), Err(Duration::from_millis(100)));
        let later = t0 + Duration::from_millis(30);
        assert_eq!(limiter.try_acquire(later), Err(Duration::from_millis(70)));
    }

    #[tokio::test(start_paused = true)]
    async fn refills_one_request_per_interval() {
        let limiter = limiter(10, 5);
        let t0 = Instant::now();
        drain(&limiter, t0);
        let just_before = t0 + Duration::from_millis(100) - Duration::from_nanos(1);
        assert_eq!(
            limiter.try_acquire(just_before),
            Err(Duration::from_nanos(1))
        );
        assert_eq!(drain(&limiter, t0 + Duration::from_millis(100)), 1);
        assert_eq!(drain(&limiter, t0 + Duration::from_millis(350)), 2);
        // A long idle spell refills the bucket only up to the burst.
        assert_eq!(drain(&limiter, t0 + Duration::from_secs(60)), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn sustains_exactly_the_rate_after_the_burst() {
        let limiter = limiter(10, 5);
        let t0 = Instant::now();
        let admitted: u32 = (0..=10_000)
            .map(|ms| drain(&limiter, t0 + Duration::from_millis(ms)))
            .sum();
        // The burst at t0, then one every 100 ms through t0 + 10 s.
        assert_eq!(admitted, 5 + 100);
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_it_reports_is_exact() {
        let limiter = limiter(3, 2);
        let t0 = Instant::now();
        drain(&limiter, t0);
        let Err(wait) = limiter.try_acquire(t0) else {
            panic!("a drained bucket admitted a request");
        };
        assert!(
            limiter
                .try_acquire(t0 + wait - Duration::from_nanos(1))
                .is_err()
        );
        assert_eq!(limiter.try_acquire(t0 + wait), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn burst_of_one_spaces_requests_by_the_interval() {
        let limiter = limiter(4, 1);
        let t0 = Instant::now();
        assert_eq!(limiter.try_acquire(t0), Ok(()));
        assert_eq!(limiter.try_acquire(t0), Err(Duration::from_millis(250)));
        assert_eq!(limiter.try_acquire(t0 + Duration::from_millis(250)), Ok(()));
        assert_eq!(
            limiter.try_acquire(t0 + Duration::from_millis(250)),
            Err(Duration::from_millis(250))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn lowering_the_limit_keeps_the_time_the_bucket_is_full_again() {
        let limiter = limiter(10, 5);
        let t0 = Instant::now();
        drain(&limiter, t0); // full again at t0 + 500 ms
        limiter.set_limit(RateLimit {
            requests_per_second: 1,
            burst: 1,
        });
        assert_eq!(limiter.try_acquire(t0), Err(Duration::from_millis(500)));
        assert_eq!(limiter.try_acquire(t0 + Duration::from_millis(500)), Ok(()));
        assert_eq!(
            limiter.try_acquire(t0 + Duration::from_millis(500)),
            Err(Duration::from_secs(1))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn raising_the_limit_admits_what_the_new_bucket_has_room_for() {
        let limiter = limiter(10, 5);
        let t0 = Instant::now();
        drain(&limiter, t0); // 500 ms of the old rate used
        let raised = RateLimit {
            requests_per_second: 100,
            burst: 100,
        };
        limiter.set_limit(raised);
        assert_eq!(limiter.limit(), raised);
        // The new bucket holds 1 s; 500 ms of it is used: 50 requests left.
        assert_eq!(drain(&limiter, t0), 50);
    }

    #[test]
    fn zero_rate_and_burst_are_taken_as_one() {
        let limiter = limiter(0, 0);
        assert_eq!(
            limiter.limit(),
            RateLimit {
                requests_per_second: 1,
                burst: 1
            }
        );
        let now = Instant::now();
        assert_eq!(limiter.try_acquire(now), Ok(()));
        assert_eq!(limiter.try_acquire(now), Err(Duration::from_secs(1)));
    }

    #[test]
    fn concurrent_callers_share_exactly_one_burst() {
        let limiter = limiter(1, 1000);
        let now = Instant::now();
        let admitted: u32 = std::thread::scope(|s| {
            let workers: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        (0..500)
                            .filter(|_| limiter.try_acquire(now).is_ok())
                            .count()
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().map_or(0, |n| n as u32))
                .sum()
        });
        assert_eq!(admitted, 1000);
    }
}
