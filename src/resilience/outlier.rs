//! Outlier ejection (`outlierDetection` in a BackendTrafficPolicy): endpoints
//! that keep failing are taken out of load balancing for a while.
//!
//! # Rules
//!
//! - **What counts.** Each response (or failure to get one) is one outcome
//!   of its endpoint. A *gateway error* is a connect failure, a reset, a
//!   timeout, HTTP 502/503/504 or gRPC UNAVAILABLE. A *server error* is any
//!   gateway error, any other HTTP 5xx, or gRPC UNKNOWN, INTERNAL or
//!   DATA_LOSS. Everything else (2xx, 3xx, 4xx, other gRPC codes) counts as
//!   a success here.
//! - **Consecutive errors.** A success resets both counts. A server error
//!   adds one to the consecutive server errors; a gateway error adds one to
//!   both counts, while a server error that is not a gateway error resets the
//!   consecutive gateway errors.
//! - **Ejection.** An endpoint is ejected when its consecutive server errors
//!   reach `consecutive5xxErrors` or its consecutive gateway errors reach
//!   `consecutiveGatewayErrors` (a detector left unset never fires), if
//!   `maxEjectionPercent` allows it. When it does not, the endpoint stays in
//!   and its counts go on, so its next error tries again.
//! - **How many.** Of a backend's `n` endpoints, at most ⌊n ×
//!   maxEjectionPercent / 100⌋ are ejected at once, but one may always be
//!   ejected when `n ≥ 2`. With `n = 1` the only endpoint is ejected only at
//!   100 %. `maxEjectionPercent: 0` ejects nothing.
//! - **How long.** An ejection lasts `baseEjectionTime × k`, capped at
//!   `maxEjectionTime`, where `k` is the endpoint's ejection multiplier
//!   *after* counting this ejection (1 for the first one).
//! - **Return and probation.** An ejected endpoint returns by itself when its
//!   time is up and is then on probation: its first outcome decides. A
//!   success ends probation; a server or gateway error ejects it again at
//!   once, whatever the consecutive thresholds (the multiplier grows, and
//!   `maxEjectionPercent` still applies: when it forbids the ejection the
//!   endpoint stays on probation). Outcomes that arrive while an endpoint is
//!   ejected (responses to requests sent before) are ignored.
//! - **Decay.** Every `interval` the owner sweeps the backend. At a sweep at
//!   time `now`, an endpoint's multiplier drops by one when it is above
//!   zero, the endpoint is not ejected, and `now − max(end of its last
//!   ejection, its last decay) ≥ interval`: it has been back, without a
//!   decay, for at least one whole interval. Sweeping more often never
//!   decays faster than one step per interval.
//! - **Reload.** A changed `outlierDetection` applies to the next outcome
//!   and the next sweep; counts, multipliers and ejections in progress are
//!   kept. Without `outlierDetection` nothing is counted or ejected (ejections
//!   already in progress run out as scheduled).
//!
//! Not here: classifying a response (the proxy maps it to an [`Outcome`]),
//! the timer that calls [`OutlierDetector::sweep`], and the choice among the
//! endpoints left ([`super::balancer`]).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use pylon_proto::policy::OutlierDetection;
use tokio::time::Instant;

use super::nanos_since;

/// What one request told about its endpoint, as the caller classified it
/// (see the rules at the top of this module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// `gateway_error` implies a server error even if `server_error` is
    /// false; with both false the outcome counts as a success.
    Failure {
        server_error: bool,
        gateway_error: bool,
    },
}

/// An outcome as the consecutive counts see it.
enum Counted {
    Success,
    ServerError,
    GatewayError,
}

impl Outcome {
    fn counted(self) -> Counted {
        match self {
            Outcome::Failure {
                gateway_error: true,
                ..
            } => Counted::GatewayError,
            Outcome::Failure {
                server_error: true, ..
            } => Counted::ServerError,
            Outcome::Success | Outcome::Failure { .. } => Counted::Success,
        }
    }
}

/// An endpoint's place in outlier ejection at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointState {
    Active,
    Ejected {
        remaining: Duration,
    },
    /// Back from an ejection; its next outcome decides.
    Probation,
}

/// The low bit of the ejection word: set from an ejection until the first
/// outcome after the endpoint's return.
const PROBATION: u64 = 1;
/// Ejection ends are kept below 2^63 ns (292 years) to leave room for it.
const MAX_UNTIL: u64 = u64::MAX >> 1;

/// The ejection state of one endpoint, updated without a lock on every
/// response.
#[derive(Debug)]
pub struct EndpointHealth {
    base: Instant,
    /// The end of the current or last ejection (ns since `base`) shifted up
    /// one bit, with [`PROBATION`] in the low bit: one word, so an outcome
    /// sees the ejection end and the probation mark of the same ejection.
    ejection: AtomicU64,
    consecutive_server_errors: AtomicU32,
    consecutive_gateway_errors: AtomicU32,
    /// The ejection multiplier. Written only under the detector's lock.
    times_ejected: AtomicU32,
    ejections_total: AtomicU64,
    /// When the multiplier last decayed (ns since `base`). Written only under
    /// the detector's lock.
    last_decay: AtomicU64,
}

impl Default for EndpointHealth {
    fn default() -> Self {
        Self::new()
    }
}

impl EndpointHealth {
    /// A healthy endpoint that was never ejected.
    pub fn new() -> Self {
        EndpointHealth {
            base: Instant::now(),
            ejection: AtomicU64::new(0),
            consecutive_server_errors: AtomicU32::new(0),
            consecutive_gateway_errors: AtomicU32::new(0),
            times_ejected: AtomicU32::new(0),
            ejections_total: AtomicU64::new(0),
            last_decay: AtomicU64::new(0),
        }
    }

    /// Whether the endpoint may take requests: it is not ejected. Its return
    /// happens here, lazily, when the ejection's time is up.
    pub fn is_available(&self, now: Instant) -> bool {
        self.nanos(now) >= self.ejection.load(Ordering::Acquire) >> 1
    }

    pub fn state(&self, now: Instant) -> EndpointState {
        let now = self.nanos(now);
        let ejection = self.ejection.load(Ordering::Acquire);
        let until = ejection >> 1;
        if now < until {
            EndpointState::Ejected {
                remaining: Duration::from_nanos(until - now),
            }
        } else if ejection & PROBATION != 0 {
            EndpointState::Probation
        } else {
            EndpointState::Active
        }
    }

    /// The ejection multiplier: ejections not yet forgiven by decay.
    pub fn times_ejected(&self) -> u32 {
        self.times_ejected.load(Ordering::Relaxed)
    }

    /// Ejections since the endpoint was created.
    pub fn ejections_total(&self) -> u64 {
        self.ejections_total.load(Ordering::Relaxed)
    }

    fn nanos(&self, now: Instant) -> u64 {
        nanos_since(self.base, now).min(MAX_UNTIL)
    }

    fn reset_counts(&self) {
        // Loaded first: nearly every response is a success, and storing an
        // unchanged zero would still pull the cache line from other cores.
        for count in [
            &self.consecutive_server_errors,
            &self.consecutive_gateway_errors,
        ] {
            if count.load(Ordering::Relaxed) != 0 {
                count.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// A backend's outlier detection: its configuration and the decisions that
/// span its endpoints. The per-endpoint state lives in [`EndpointHealth`].
#[derive(Debug)]
pub struct OutlierDetector {
    config: ArcSwapOption<OutlierDetection>,
    /// Serialises ejections and decay, which are rare: counting the ejected
    /// endpoints and ejecting one more must be one step, or two endpoints
    /// failing together could both pass the `maxEjectionPercent` check.
    ejecting: Mutex<()>,
}

impl OutlierDetector {
    /// `None`: detection off; nothing is ever ejected.
    pub fn new(config: Option<OutlierDetection>) -> Self {
        OutlierDetector {
            config: ArcSwapOption::new(config.map(Arc::new)),
            ejecting: Mutex::new(()),
        }
    }

    /// Applies a reloaded configuration; endpoint state is kept.
    pub fn configure(&self, config: Option<OutlierDetection>) {
        self.config.store(config.map(Arc::new));
    }

    /// The configuration in force (its `interval` paces [`Self::sweep`]).
    pub fn config(&self) -> Option<OutlierDetection> {
        self.config.load().as_deref().copied()
    }

    /// Counts one outcome of `endpoint` and ejects it when the rules say so;
    /// true when this call ejected it. `all` is every endpoint of the
    /// backend, `endpoint` included (for `maxEjectionPercent`); it is only
    /// walked when an ejection is considered. Callers holding endpoints
    /// pass `endpoints.iter().map(|e| e.health())`.
    pub fn observe<'a>(
        &self,
        endpoint: &EndpointHealth,
        outcome: Outcome,
        all: impl IntoIterator<Item = &'a EndpointHealth>,
        now: Instant,
    ) -> bool {
        let Some(config) = self.config() else {
            return false;
        };
        let ejection = endpoint.ejection.load(Ordering::Acquire);
        if endpoint.nanos(now) < ejection >> 1 {
            return false;
        }
        // Whoever clears the probation mark holds the deciding outcome.
        let decides_probation = ejection & PROBATION != 0
            && endpoint
                .ejection
                .compare_exchange(
                    ejection,
                    ejection & !PROBATION,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok();
        let (server_errors, gateway_errors) = match outcome.counted() {
            Counted::Success => {
                endpoint.reset_counts();
                return false;
            }
            Counted::ServerError => {
                endpoint
                    .consecutive_gateway_errors
                    .store(0, Ordering::Relaxed);
                (increment(&endpoint.consecutive_server_errors), 0)
            }
            Counted::GatewayError => (
                increment(&endpoint.consecutive_server_errors),
                increment(&endpoint.consecutive_gateway_errors),
            ),
        };
        let tripped = decides_probation
            || config
                .consecutive_5xx_errors
                .is_some_and(|n| server_errors >= n)
            || config
                .consecutive_gateway_errors
                .is_some_and(|n| gateway_errors >= n);
        if !tripped {
            return false;
        }
        let ejected = self.eject(endpoint, &config, all, now);
        if decides_probation && !ejected {
            endpoint.ejection.fetch_or(PROBATION, Ordering::AcqRel);
        }
        ejected
    }

    /// Lowers the multiplier of the endpoints that have been back for a
    /// whole interval (see the decay rule at the top of this module). The
    /// owner calls it every `interval`.
    pub fn sweep<'a>(&self, endpoints: impl IntoIterator<Item = &'a EndpointHealth>, now: Instant) {
        let Some(config) = self.config() else {
            return;
        };
        let interval = duration_nanos(config.interval);
        let _serial = self.ejecting.lock().unwrap_or_else(PoisonError::into_inner);
        for endpoint in endpoints {
            let now = endpoint.nanos(now);
            let until = endpoint.ejection.load(Ordering::Acquire) >> 1;
            let times = endpoint.times_ejected.load(Ordering::Relaxed);
            if times == 0 || now < until {
                continue;
            }
            let quiet_since = until.max(endpoint.last_decay.load(Ordering::Relaxed));
            if now.saturating_sub(quiet_since) >= interval {
                endpoint.times_ejected.store(times - 1, Ordering::Relaxed);
                endpoint.last_decay.store(now, Ordering::Relaxed);
            }
        }
    }

    /// How many of `endpoints` are ejected at `now`.
    pub fn ejected_count<'a>(
        &self,
        endpoints: impl IntoIterator<Item = &'a EndpointHealth>,
        now: Instant,
    ) -> usize {
        endpoints
            .into_iter()
            .filter(|e| !e.is_available(now))
            .count()
    }

    fn eject<'a>(
        &self,
        endpoint: &EndpointHealth,
        config: &OutlierDetection,
        all: impl IntoIterator<Item = &'a EndpointHealth>,
        now: Instant,
    ) -> bool {
        let _serial = self.ejecting.lock().unwrap_or_else(PoisonError::into_inner);
        if !endpoint.is_available(now) {
            // Another response ejected it while we waited for the lock.
            return false;
        }
        let (mut endpoints, mut ejected) = (0, 0);
        for e in all {
            endpoints += 1;
            if !e.is_available(now) {
                ejected += 1;
            }
        }
        if ejected >= max_ejected(endpoints, config.max_ejection_percent) {
            return false;
        }
        let times = endpoint
            .times_ejected
            .load(Ordering::Relaxed)
            .saturating_add(1);
        endpoint.times_ejected.store(times, Ordering::Relaxed);
        let duration = config
            .base_ejection_time
            .checked_mul(times)
            .map_or(config.max_ejection_time, |d| {
                d.min(config.max_ejection_time)
            });
        let until = endpoint
            .nanos(now)
            .saturating_add(duration_nanos(duration))
            .min(MAX_UNTIL);
        endpoint.reset_counts();
        endpoint
            .ejection
            .store((until << 1) | PROBATION, Ordering::Release);
        endpoint.ejections_total.fetch_add(1, Ordering::Relaxed);
        true
    }
}

/// How many of `endpoints` may be ejected at once.
fn max_ejected(endpoints: usize, percent: u32) -> usize {
    if percent == 0 {
        return 0;
    }
    let cap = endpoints.saturating_mul(percent.min(100) as usize) / 100;
    if endpoints >= 2 { cap.max(1) } else { cap }
}

/// Adds one to a consecutive count and returns the new value. Two racing
/// responses may both see the threshold crossed; the ejection re-checks.
fn increment(count: &AtomicU32) -> u32 {
    count.fetch_add(1, Ordering::Relaxed).saturating_add(1)
}

fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: Outcome = Outcome::Failure {
        server_error: true,
        gateway_error: false,
    };
    const GATEWAY: Outcome = Outcome::Failure {
        server_error: true,
        gateway_error: true,
    };
    const CLIENT: Outcome = Outcome::Failure {
        server_error: false,
        gateway_error: false,
    };
    const SECOND: Duration = Duration::from_secs(1);

    fn config(consecutive_5xx: Option<u32>, consecutive_gateway: Option<u32>) -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx_errors: consecutive_5xx,
            consecutive_gateway_errors: consecutive_gateway,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 100,
        }
    }

    fn with_percent(percent: u32) -> OutlierDetection {
        OutlierDetection {
            max_ejection_percent: percent,
            ..config(Some(1), None)
        }
    }

    fn endpoints(n: usize) -> Vec<EndpointHealth> {
        (0..n).map(|_| EndpointHealth::new()).collect()
    }

    /// Feeds `outcome` to endpoint `i` `times` times; true when the last one
    /// ejected it.
    fn feed(
        detector: &OutlierDetector,
        all: &[EndpointHealth],
        i: usize,
        outcome: Outcome,
        times: u32,
        now: Instant,
    ) -> bool {
        let mut ejected = false;
        for _ in 0..times {
            ejected = detector.observe(&all[i], outcome, all, now);
        }
        ejected
    }

    /// How many endpoints end up ejected when each in turn fails once.
    fn ejected_when_all_fail(n: usize, percent: u32) -> usize {
        let detector = OutlierDetector::new(Some(with_percent(percent)));
        let all = endpoints(n);
        let now = Instant::now();
        for i in 0..n {
            feed(&detector, &all, i, SERVER, 1, now);
        }
        detector.ejected_count(&all, now)
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_server_errors_eject_at_the_threshold() {
        let detector = OutlierDetector::new(Some(config(Some(3), None)));
        let all = endpoints(2);
        let t0 = Instant::now();
        assert!(!feed(&detector, &all, 0, SERVER, 2, t0));
        assert_eq!(all[0].state(t0), EndpointState::Active);
        assert!(feed(&detector, &all, 0, SERVER, 1, t0));
        assert!(!all[0].is_available(t0));
        assert_eq!(
            all[0].state(t0 + SECOND),
            EndpointState::Ejected {
                remaining: Duration::from_secs(29)
            }
        );
        assert_eq!(all[0].times_ejected(), 1);
        assert_eq!(all[0].ejections_total(), 1);
        assert!(all[1].is_available(t0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_or_a_client_error_resets_the_counts() {
        let detector = OutlierDetector::new(Some(config(Some(3), None)));
        let all = endpoints(2);
        let t0 = Instant::now();
        for reset in [Outcome::Success, CLIENT] {
            feed(&detector, &all, 0, SERVER, 2, t0);
            assert!(!feed(&detector, &all, 0, reset, 1, t0));
        }
        assert!(!feed(&detector, &all, 0, SERVER, 2, t0));
        assert!(feed(&detector, &all, 0, SERVER, 1, t0));
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_gateway_errors_are_broken_by_other_server_errors() {
        let detector = OutlierDetector::new(Some(config(None, Some(2))));
        let all = endpoints(2);
        let t0 = Instant::now();
        feed(&detector, &all, 0, GATEWAY, 1, t0);
        feed(&detector, &all, 0, SERVER, 1, t0);
        assert!(!feed(&detector, &all, 0, GATEWAY, 1, t0));
        assert!(feed(&detector, &all, 0, GATEWAY, 1, t0));
    }

    #[tokio::test(start_paused = true)]
    async fn gateway_errors_are_server_errors_too() {
        let detector = OutlierDetector::new(Some(config(Some(3), None)));
        let all = endpoints(2);
        let t0 = Instant::now();
        feed(&detector, &all, 0, GATEWAY, 1, t0);
        feed(&detector, &all, 0, SERVER, 1, t0);
        let gateway_only = Outcome::Failure {
            server_error: false,
            gateway_error: true,
        };
        assert!(feed(&detector, &all, 0, gateway_only, 1, t0));
    }

    #[test]
    fn max_ejection_percent_for_one_two_three_and_ten_endpoints() {
        assert_eq!(ejected_when_all_fail(1, 10), 0);
        assert_eq!(ejected_when_all_fail(1, 99), 0);
        assert_eq!(ejected_when_all_fail(1, 100), 1);
        assert_eq!(ejected_when_all_fail(2, 10), 1);
        assert_eq!(ejected_when_all_fail(2, 50), 1);
        assert_eq!(ejected_when_all_fail(2, 100), 2);
        assert_eq!(ejected_when_all_fail(3, 10), 1);
        assert_eq!(ejected_when_all_fail(3, 66), 1);
        assert_eq!(ejected_when_all_fail(3, 67), 2);
        assert_eq!(ejected_when_all_fail(10, 10), 1);
        assert_eq!(ejected_when_all_fail(10, 29), 2);
        assert_eq!(ejected_when_all_fail(10, 30), 3);
        assert_eq!(ejected_when_all_fail(10, 100), 10);
        for n in [1, 2, 3, 10] {
            assert_eq!(ejected_when_all_fail(n, 0), 0);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_refused_by_the_cap_is_ejected_once_there_is_room() {
        let detector = OutlierDetector::new(Some(with_percent(10)));
        let all = endpoints(2);
        let t0 = Instant::now();
        assert!(feed(&detector, &all, 0, SERVER, 1, t0));
        assert!(!feed(&detector, &all, 1, SERVER, 5, t0));
        assert_eq!(all[1].times_ejected(), 0);
        let back = t0 + Duration::from_secs(30);
        assert!(all[0].is_available(back));
        assert!(feed(&detector, &all, 1, SERVER, 1, back));
        assert_eq!(detector.ejected_count(&all, back), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_time_grows_with_the_multiplier_up_to_the_cap() {
        let detector = OutlierDetector::new(Some(OutlierDetection {
            max_ejection_time: Duration::from_secs(100),
            ..config(Some(1), None)
        }));
        let all = endpoints(2);
        let mut now = Instant::now();
        for (times, secs) in [(1, 30), (2, 60), (3, 90), (4, 100), (5, 100)] {
            assert!(feed(&detector, &all, 0, SERVER, 1, now));
            assert_eq!(all[0].times_ejected(), times);
            assert_eq!(
                all[0].state(now),
                EndpointState::Ejected {
                    remaining: Duration::from_secs(secs)
                }
            );
            now += Duration::from_secs(secs);
            assert_eq!(all[0].state(now), EndpointState::Probation);
        }
        assert_eq!(all[0].ejections_total(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_on_probation_ejects_again_at_once() {
        let detector = OutlierDetector::new(Some(config(Some(5), None)));
        let all = endpoints(2);
        let t0 = Instant::now();
        assert!(feed(&detector, &all, 0, SERVER, 5, t0));
        let back = t0 + Duration::from_secs(30);
        assert_eq!(all[0].state(back), EndpointState::Probation);
        assert!(all[0].is_available(back));
        assert!(feed(&detector, &all, 0, GATEWAY, 1, back));
        assert_eq!(
            all[0].state(back),
            EndpointState::Ejected {
                remaining: Duration::from_secs(60)
            }
        );
        assert_eq!(all[0].times_ejected(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_on_probation_ends_it() {
        let detector = OutlierDetector::new(Some(config(Some(3), None)));
        let all = endpoints(2);
        let t0 = Instant::now();
        feed(&detector, &all, 0, SERVER, 3, t0);
        let back = t0 + Duration::from_secs(30);
        assert!(!feed(&detector, &all, 0, CLIENT, 1, back));
        assert_eq!(all[0].state(back), EndpointState::Active);
        // Back to the consecutive rule, counted from zero.
        assert!(!feed(&detector, &all, 0, SERVER, 2, back));
        assert!(feed(&detector, &all, 0, SERVER, 1, back));
        assert_eq!(all[0].times_ejected(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn probation_outlives_a_re_ejection_refused_by_the_cap() {
        let detector = OutlierDetector::new(Some(OutlierDetection {
            max_ejection_percent: 10,
            ..config(Some(3), None)
        }));
        let all = endpoints(2);
        let t0 = Instant::now();
        feed(&detector, &all, 0, SERVER, 3, t0);
        let back = t0 + Duration::from_secs(30);
        assert!(feed(&detector, &all, 1, SERVER, 3, back));
        assert!(!feed(&detector, &all, 0, SERVER, 1, back));
        assert_eq!(all[0].state(back), EndpointState::Probation);
        // Endpoint 1 returns; endpoint 0's next failure still decides.
        let later = back + Duration::from_secs(30);
        assert!(feed(&detector, &all, 0, SERVER, 1, later));
        assert_eq!(all[0].times_ejected(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_while_ejected_are_ignored() {
        let detector = OutlierDetector::new(Some(config(Some(2), None)));
        let all = endpoints(2);
        let t0 = Instant::now();
        feed(&detector, &all, 0, SERVER, 2, t0);
        assert!(!feed(&detector, &all, 0, SERVER, 10, t0 + SECOND));
        assert!(!feed(&detector, &all, 0, Outcome::Success, 1, t0 + SECOND));
        assert_eq!(all[0].ejections_total(), 1);
        assert_eq!(
            all[0].state(t0 + SECOND),
            EndpointState::Ejected {
                remaining: Duration::from_secs(29)
            }
        );
        assert_eq!(
            all[0].state(t0 + Duration::from_secs(30)),
            EndpointState::Probation
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_multiplier_decays_one_step_per_quiet_interval() {
        let detector = OutlierDetector::new(Some(config(Some(1), None)));
        let all = endpoints(2);
        let mut now = Instant::now();
        for secs in [30, 60, 90] {
            feed(&detector, &all, 0, SERVER, 1, now);
            now += Duration::from_secs(secs);
        }
        assert_eq!(all[0].times_ejected(), 3);
        let returned = now;

        // No decay while ejected.
        feed(&detector, &all, 0, Outcome::Success, 1, now);
        detector.sweep(&all, returned - SECOND);
        assert_eq!(all[0].times_ejected(), 3);
        // Sweeping every second decays once per ten seconds back.
        for s in 1..=35 {
            detector.sweep(&all, returned + Duration::from_secs(s));
            let expected = 3 - (s / 10).min(3) as u32;
            assert_eq!(all[0].times_ejected(), expected, "{s} s after return");
        }
        // A new ejection starts from the decayed multiplier.
        assert!(feed(
            &detector,
            &all,
            0,
            SERVER,
            1,
            returned + Duration::from_secs(40)
        ));
        assert_eq!(all[0].times_ejected(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejection_within_the_interval_holds_off_decay() {
        let detector = OutlierDetector::new(Some(OutlierDetection {
            base_ejection_time: Duration::from_secs(5),
            ..config(Some(1), None)
        }));
        let all = endpoints(2);
        let t0 = Instant::now();
        feed(&detector, &all, 0, SERVER, 1, t0);
        // Back at 5 s, probation passed at 6 s.
        feed(
            &detector,
            &all,
            0,
            Outcome::Success,
            1,
            t0 + Duration::from_secs(6),
        );
        detector.sweep(&all, t0 + Duration::from_secs(10));
        assert_eq!(all[0].times_ejected(), 1);
        detector.sweep(&all, t0 + Duration::from_secs(15));
        assert_eq!(all[0].times_ejected(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn without_configuration_nothing_is_ejected() {
        let detector = OutlierDetector::new(None);
        let all = endpoints(1);
        let t0 = Instant::now();
        assert!(!feed(&detector, &all, 0, GATEWAY, 1000, t0));
        assert_eq!(all[0].state(t0), EndpointState::Active);
        assert_eq!(detector.config(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_keeps_ejections_and_multipliers() {
        let detector = OutlierDetector::new(Some(config(Some(1), None)));
        let all = endpoints(2);
        let t0 = Instant::now();
        feed(&detector, &all, 0, SERVER, 1, t0);

        let reloaded = OutlierDetection {
            base_ejection_time: Duration::from_secs(10),
            ..config(Some(2), None)
        };
        detector.configure(Some(reloaded));
        assert_eq!(detector.config(), Some(reloaded));
        assert_eq!(
            all[0].state(t0),
            EndpointState::Ejected {
                remaining: Duration::from_secs(30)
            }
        );
        // Endpoint 1 needs two errors now; endpoint 0 re-ejects on probation
        // with the new base and its kept multiplier.
        assert!(!feed(&detector, &all, 1, SERVER, 1, t0));
        let back = t0 + Duration::from_secs(30);
        assert!(feed(&detector, &all, 0, SERVER, 1, back));
        assert_eq!(
            all[0].state(back),
            EndpointState::Ejected {
                remaining: Duration::from_secs(20)
            }
        );

        detector.configure(None);
        assert!(!feed(&detector, &all, 1, SERVER, 10, back));
        assert!(!all[0].is_available(back));
        assert!(all[0].is_available(back + Duration::from_secs(20)));
    }
}
