//! Exponential backoff with jitter: how long to wait before the next try
//! of something that failed (a reconnect, a renewal, a DNS resolution, a
//! retried call).
//!
//! The nominal delay starts at `first` and doubles up to `max`; the delay
//! actually waited is drawn under it, so that many sidecars that failed
//! together do not come back together. Two draws:
//! - [`Jitter::Full`], uniform in `[0, nominal]` (AWS's "full jitter"),
//!   which spreads retries the most;
//! - [`Jitter::Equal`], uniform in `[nominal/2, nominal]`, which keeps half
//!   the delay so the retry rate stays bounded.
//!
//! Not here: when to give up, or what to retry — the loops that wait decide.

use std::time::Duration;

/// How the delay is drawn under the nominal one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Uniform in `[0, nominal]`.
    Full,
    /// Uniform in `[nominal/2, nominal]`.
    Equal,
}

impl Jitter {
    /// The delay for a nominal one and a draw uniform in `[0, 1]`.
    pub fn apply(self, nominal: Duration, draw: f64) -> Duration {
        let draw = draw.clamp(0.0, 1.0);
        let share = match self {
            Jitter::Full => draw,
            Jitter::Equal => 0.5 + 0.5 * draw,
        };
        // Never above the nominal delay, and no overflow near Duration::MAX.
        Duration::try_from_secs_f64(nominal.as_secs_f64() * share)
            .map_or(nominal, |d| d.min(nominal))
    }
}

/// The delays before successive tries: `first × 2ⁿ` capped at `max`, with
/// jitter. `reset` after a success starts again from `first`.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    jitter: Jitter,
    /// Delays handed out since the last reset.
    tries: u32,
}

impl Backoff {
    /// Delays drawn from `[0, nominal]`.
    pub fn full_jitter(first: Duration, max: Duration) -> Self {
        Backoff::new(first, max, Jitter::Full)
    }

    /// Delays drawn from `[nominal/2, nominal]`.
    pub fn equal_jitter(first: Duration, max: Duration) -> Self {
        Backoff::new(first, max, Jitter::Equal)
    }

    fn new(first: Duration, max: Duration, jitter: Jitter) -> Self {
        Backoff {
            first,
            max,
            jitter,
            tries: 0,
        }
    }

    /// Back to `first`.
    pub fn reset(&mut self) {
        self.tries = 0;
    }

    /// The nominal delay before try `n` after the first failure (0-based):
    /// `first × 2ⁿ`, capped at `max`.
    pub fn nominal(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n).unwrap_or(u32::MAX);
        self.first.saturating_mul(factor).min(self.max)
    }

    /// A random delay before try `n` (0-based), without changing the state:
    /// for callers that count tries themselves.
    pub fn delay(&self, n: u32) -> Duration {
        self.jitter.apply(self.nominal(n), fastrand::f64())
    }

    /// The next delay, drawn at random; the one after is nominally twice
    /// as long.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(fastrand::f64())
    }

    /// The next delay for a given draw uniform in `[0, 1]` (deterministic,
    /// for tests).
    pub fn next_delay_with(&mut self, draw: f64) -> Duration {
        let nominal = self.nominal(self.tries);
        self.tries = self.tries.saturating_add(1);
        self.jitter.apply(nominal, draw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_jitter_doubles_to_the_cap_and_keeps_half() {
        let secs = Duration::from_secs;
        let mut b = Backoff::equal_jitter(secs(1), secs(10));
        let top: Vec<_> = (0..6).map(|_| b.next_delay_with(1.0)).collect();
        assert_eq!(top, [1, 2, 4, 8, 10, 10].map(secs));
        b.reset();
        let bottom: Vec<_> = (0..3).map(|_| b.next_delay_with(0.0)).collect();
        assert_eq!(bottom, [500, 1000, 2000].map(Duration::from_millis));

        let mut small = Backoff::equal_jitter(secs(1), Duration::from_millis(400));
        assert_eq!(small.next_delay_with(1.0), Duration::from_millis(400));
    }

    #[test]
    fn full_jitter_draws_from_zero_to_the_nominal_delay() {
        let ms = Duration::from_millis;
        let mut b = Backoff::full_jitter(ms(250), ms(1000));
        assert_eq!(b.next_delay_with(0.0), Duration::ZERO);
        assert_eq!(b.next_delay_with(1.0), ms(500));
        assert_eq!(b.next_delay_with(0.5), ms(500));
        assert_eq!(b.next_delay_with(1.0), ms(1000));
        b.reset();
        assert_eq!(b.next_delay_with(1.0), ms(250));
    }

    #[test]
    fn nominal_delays_saturate_at_the_cap() {
        let ms = Duration::from_millis;
        let b = Backoff::full_jitter(ms(10), ms(100));
        let nominal: Vec<_> = [0, 1, 2, 3, 4, 31, 32, 40, u32::MAX]
            .map(|n| b.nominal(n))
            .to_vec();
        assert_eq!(
            nominal,
            [10, 20, 40, 80, 100, 100, 100, 100, 100].map(ms).to_vec()
        );
        let mut long = Backoff::equal_jitter(Duration::MAX, Duration::MAX);
        assert_eq!(long.next_delay_with(1.0), Duration::MAX);
        assert_eq!(long.next_delay_with(1.0), Duration::MAX);
    }

    #[test]
    fn random_delays_stay_under_the_nominal_one() {
        fastrand::seed(11);
        let ms = Duration::from_millis;
        let mut equal = Backoff::equal_jitter(ms(100), ms(100));
        let mut full = Backoff::full_jitter(ms(100), ms(100));
        for _ in 0..1000 {
            let d = equal.next_delay();
            assert!(ms(50) <= d && d <= ms(100), "{d:?}");
            let d = full.next_delay();
            assert!(d <= ms(100), "{d:?}");
            assert!(full.delay(3) <= ms(100));
        }
    }
}
