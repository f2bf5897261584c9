//! A backend's retry budget (`retryBudget` in a BackendTrafficPolicy): how
//! many retries the backend may receive on top of its live traffic.
//!
//! Over a sliding window of the last [`WINDOW_SECS`] seconds, a retry is
//! allowed when
//!
//! ```text
//! retries_in_window + 1 <= minRetriesPerSecond × 10 + ⌊percent / 100 × requests_in_window⌋
//! ```
//!
//! where `requests_in_window` counts original calls (not retries). The
//! floor term is a reserve: from idle, up to `minRetriesPerSecond × 10`
//! retries pass at once, so a quiet backend can still be retried. With no
//! budget configured, every retry is allowed and still counted.
//!
//! The window is ten one-second buckets, each an atomic tagged with the
//! second it counts; a bucket is reused once its second has left the window.
//! "The last 10 seconds" is therefore the current second plus the nine
//! before it. Counting is exact, but a sum over the buckets is not one
//! atomic read: a decision taken while another thread records may see a
//! request or retry more or fewer than an instant later. Two retries racing
//! for the last place in the same second cannot both get it.
//!
//! This module does not retry: the retry loop, its backoff and the deadline
//! live in the proxy, which asks [`RetryBudget::try_withdraw`] before each
//! retry.

use std::sync::atomic::{AtomicU64, Ordering};

use pylon_proto::policy::model;
use tokio::time::Instant;

use super::nanos_since;

/// Length of the sliding window, in one-second buckets.
pub const WINDOW_SECS: u64 = 10;
const BUCKETS: usize = WINDOW_SECS as usize;

/// `percent` is stored in millionths of a percent: integer arithmetic keeps
/// the allowance exact (20 % of 5 requests is exactly 1 retry).
const MICROS_PER_PERCENT: f64 = 1_000_000.0;
const MICROS_PER_WHOLE: u128 = 100 * 1_000_000;
/// The percent field of the packed config when no budget is configured.
const UNLIMITED: u32 = u32::MAX;

/// The retry budget of one backend, shared by every request to it.
#[derive(Debug)]
pub struct RetryBudget {
    base: Instant,
    /// `min_retries_per_second` in the high half, percent in millionths (or
    /// [`UNLIMITED`]) in the low half: one load gives a consistent budget.
    config: AtomicU64,
    /// Per bucket: the second it counts (high half) and the count (low half).
    requests: [AtomicU64; BUCKETS],
    retries: [AtomicU64; BUCKETS],
}

impl RetryBudget {
    /// `None`: no budget configured; every retry is allowed but counted, so
    /// a budget added by a later reload starts from the real traffic.
    pub fn new(budget: Option<model::RetryBudget>) -> Self {
        RetryBudget {
            base: Instant::now(),
            config: AtomicU64::new(pack(budget)),
            requests: Default::default(),
            retries: Default::default(),
        }
    }

    /// Applies a reloaded budget; the counts in the window are kept.
    pub fn set_budget(&self, budget: Option<model::RetryBudget>) {
        self.config.store(pack(budget), Ordering::Relaxed);
    }

    /// Counts one original call (not a retry) to the backend.
    pub fn record_request(&self, now: Instant) {
        let second = self.second(now);
        record(&self.requests[bucket(second)], second);
    }

    /// Takes one retry from the budget: true (and counted) when the budget
    /// allows it, false (and not counted) when it is spent.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let second = self.second(now);
        let slot = bucket(second);
        let Some(allowance) = self.allowance(second) else {
            record(&self.retries[slot], second);
            return true;
        };
        let elsewhere = sum_in_window(&self.retries, second, Some(slot));
        // The check and the count are one CAS on this second's bucket, so
        // two retries cannot both take the last place.
        self.retries[slot]
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |packed| {
                let (counted, count) = unpack(packed);
                let here = if counted >= second { count } else { 0 };
                (elsewhere + u64::from(here) < allowance)
                    .then(|| pack_bucket(counted.max(second), here.saturating_add(1)))
            })
            .is_ok()
    }

    /// Original calls counted in the window ending at `now`.
    pub fn requests_in_window(&self, now: Instant) -> u64 {
        sum_in_window(&self.requests, self.second(now), None)
    }

    /// Retries counted in the window ending at `now`.
    pub fn retries_in_window(&self, now: Instant) -> u64 {
        sum_in_window(&self.retries, self.second(now), None)
    }

    /// How many retries the window ending in `second` may hold, or `None`
    /// when no budget is configured.
    fn allowance(&self, second: u32) -> Option<u64> {
        let packed = self.config.load(Ordering::Relaxed);
        let (min_per_second, percent_micros) = ((packed >> 32) as u32, packed as u32);
        if percent_micros == UNLIMITED {
            return None;
        }
        let requests = u128::from(sum_in_window(&self.requests, second, None));
        let share = requests * u128::from(percent_micros) / MICROS_PER_WHOLE;
        let reserve = u64::from(min_per_second) * WINDOW_SECS;
        Some(reserve.saturating_add(u64::try_from(share).unwrap_or(u64::MAX)))
    }

    /// Whole seconds since `base`.
    fn second(&self, now: Instant) -> u32 {
        u32::try_from(nanos_since(self.base, now) / 1_000_000_000).unwrap_or(u32::MAX)
    }
}

fn pack(budget: Option<model::RetryBudget>) -> u64 {
    let (min_per_second, percent_micros) = match budget {
        // `as` saturates and maps NaN to 0; validated policy has 0..=100.
        Some(b) => (
            b.min_retries_per_second,
            (b.percent.clamp(0.0, 100.0) * MICROS_PER_PERCENT).round() as u32,
        ),
        None => (0, UNLIMITED),
    };
    (u64::from(min_per_second) << 32) | u64::from(percent_micros)
}

fn bucket(second: u32) -> usize {
    second as usize % BUCKETS
}

fn pack_bucket(second: u32, count: u32) -> u64 {
    (u64::from(second) << 32) | u64::from(count)
}

fn unpack(packed: u64) -> (u32, u32) {
    ((packed >> 32) as u32, packed as u32)
}

/// Adds one to the bucket of `second`, first resetting it if it still holds
/// a second that has left the window. A bucket already holding a later
/// second (the caller's `now` is more than a window late) takes the count
/// for that later second rather than lose it.
fn record(bucket: &AtomicU64, second: u32) {
    let mut packed = bucket.load(Ordering::Relaxed);
    loop {
        let (counted, count) = unpack(packed);
        let next = if counted >= second {
            pack_bucket(counted, count.saturating_add(1))
        } else {
            pack_bucket(second, 1)
        };
        match bucket.compare_exchange_weak(packed, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(current) => packed = current,
        }
    }
}

/// The counts of the buckets whose second lies in the window ending in
/// `second`, leaving out bucket `except`.
fn sum_in_window(buckets: &[AtomicU64; BUCKETS], second: u32, except: Option<usize>) -> u64 {
    buckets
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != except)
        .map(|(_, b)| unpack(b.load(Ordering::Relaxed)))
        .filter(|(counted, _)| *counted <= second && u64::from(second - counted) < WINDOW_SECS)
        .map(|(_, count)| u64::from(count))
        .sum()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn budget(percent: f64, min_retries_per_second: u32) -> RetryBudget {
        RetryBudget::new(Some(model::RetryBudget {
            percent,
            min_retries_per_second,
        }))
    }

    fn withdraw_all(budget: &RetryBudget, now: Instant) -> u32 {
        let mut allowed = 0;
        while budget.try_withdraw(now) {
            allowed += 1;
        }
        allowed
    }

    fn requests(budget: &RetryBudget, n: u32, now: Instant) {
        for _ in 0..n {
            budget.record_request(now);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_reserve_allows_min_per_second_times_the_window_from_idle() {
        let budget = budget(0.0, 10);
        let t0 = Instant::now();
        assert_eq!(withdraw_all(&budget, t0), 100);
        assert_eq!(budget.retries_in_window(t0), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn percent_of_requests_is_exact_and_rounds_down() {
        let t0 = Instant::now();
        let exact = budget(20.0, 0);
        requests(&exact, 50, t0);
        assert_eq!(withdraw_all(&exact, t0), 10);

        let fractional = budget(12.5, 0);
        requests(&fractional, 7, t0);
        assert_eq!(withdraw_all(&fractional, t0), 0);
        fractional.record_request(t0);
        assert_eq!(withdraw_all(&fractional, t0), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn reserve_and_percent_add_up() {
        let budget = budget(10.0, 1);
        let t0 = Instant::now();
        requests(&budget, 30, t0);
        assert_eq!(withdraw_all(&budget, t0), 10 + 3);
    }

    #[tokio::test(start_paused = true)]
    async fn counts_leave_the_window_after_ten_seconds() {
        let budget = budget(100.0, 0);
        let t0 = Instant::now();
        requests(&budget, 10, t0);
        assert_eq!(withdraw_all(&budget, t0), 10);
        let last_moment = t0 + Duration::from_millis(9_999);
        assert_eq!(budget.requests_in_window(last_moment), 10);
        assert!(!budget.try_withdraw(last_moment));

        let t10 = t0 + Duration::from_secs(10);
        assert_eq!(budget.requests_in_window(t10), 0);
        assert_eq!(budget.retries_in_window(t10), 0);
        assert!(!budget.try_withdraw(t10));
        requests(&budget, 5, t10);
        assert_eq!(withdraw_all(&budget, t10), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_slides_second_by_second() {
        let budget = budget(50.0, 0);
        let t0 = Instant::now();
        for s in 0..16 {
            requests(&budget, 10, t0 + Duration::from_secs(s));
        }
        let t15 = t0 + Duration::from_secs(15);
        // Seconds 6 to 15.
        assert_eq!(budget.requests_in_window(t15), 100);
        assert_eq!(withdraw_all(&budget, t15), 50);
        // Retries taken at second 15 still count at second 24, not at 25.
        let t24 = t0 + Duration::from_secs(24);
        requests(&budget, 90, t24);
        assert_eq!(budget.requests_in_window(t24), 10 + 90);
        assert_eq!(budget.retries_in_window(t24), 50);
        assert_eq!(withdraw_all(&budget, t24), 0);
        let t25 = t24 + Duration::from_secs(1);
        assert_eq!(budget.retries_in_window(t25), 0);
        assert_eq!(withdraw_all(&budget, t25), 45);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_budget_every_retry_passes_and_is_counted() {
        let budget = RetryBudget::new(None);
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert!(budget.try_withdraw(t0));
        }
        assert_eq!(budget.retries_in_window(t0), 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_keeps_the_counts() {
        let budget = budget(10.0, 0);
        let t0 = Instant::now();
        requests(&budget, 100, t0);
        assert_eq!(withdraw_all(&budget, t0), 10);

        budget.set_budget(Some(model::RetryBudget {
            percent: 20.0,
            min_retries_per_second: 0,
        }));
        assert_eq!(withdraw_all(&budget, t0), 10);

        budget.set_budget(None);
        for _ in 0..5 {
            assert!(budget.try_withdraw(t0));
        }
        assert_eq!(budget.retries_in_window(t0), 25);

        budget.set_budget(Some(model::RetryBudget {
            percent: 30.0,
            min_retries_per_second: 0,
        }));
        assert_eq!(withdraw_all(&budget, t0), 5);
    }

    #[test]
    fn concurrent_retries_never_overdraw() {
        let budget = budget(0.0, 50);
        let now = Instant::now();
        let allowed: usize = std::thread::scope(|s| {
            let workers: Vec<_> = (0..8)
                .map(|_| s.spawn(|| (0..200).filter(|_| budget.try_withdraw(now)).count()))
                .collect();
            workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
        });
        assert_eq!(allowed, 500);
    }
}
