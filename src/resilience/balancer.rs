//! Choosing an endpoint of a backend for one attempt (`loadBalancer` in a
//! BackendTrafficPolicy).
//!
//! Only endpoints that are not ejected ([`EndpointHealth::is_available`])
//! are candidates. A retry names the endpoints it already tried (`avoid`);
//! they are chosen only when no other candidate is left, since a retry on
//! the same endpoint is better than none. `None` means every endpoint is
//! ejected (or there are none).
//!
//! - `LeastRequest`: power of two choices. Two distinct candidates are drawn
//!   at random and the one with the lower [`EndpointLoad::cost`] wins: its
//!   peak-EWMA latency times its requests in flight plus one.
//! - `RoundRobin`: the candidates in turn, in slice order. Skipping an
//!   ejected endpoint does not hand its share to its neighbour: the turn
//!   counts over the candidates, not over the slice.
//!
//! A pick allocates nothing; at worst it walks the slice twice.
//!
//! Not here: connections (the proxy's), the retry loop that fills
//! `avoid`, and ejection itself ([`super::outlier`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use pylon_proto::policy::LoadBalancerType;
use tokio::time::Instant;

use super::nanos_since;
use super::outlier::EndpointHealth;

/// The latency assumed for an endpoint that has not answered yet.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// The EWMA's time constant: a sample's weight has fallen to 1/e after this
/// long.
pub const DECAY: Duration = Duration::from_secs(10);

/// An endpoint's load as the balancer sees it: requests in flight and a
/// peak-EWMA latency estimate.
///
/// The estimate takes a sample above it at once (so a slowing endpoint is
/// avoided at once) and otherwise moves toward the sample, the old estimate
/// keeping the weight `exp(-elapsed / DECAY)`. Between samples it decays
/// toward zero with the same weight, so an endpoint penalised by one slow
/// answer is tried again rather than starved; until its first sample it
/// stands at [`DEFAULT_RTT`]. The estimate and its timestamp are separate
/// atomics: concurrent samples race, and the last writer wins.
#[derive(Debug)]
pub struct EndpointLoad {
    base: Instant,
    in_flight: AtomicU32,
    /// `f64` nanoseconds, as bits.
    rtt_estimate: AtomicU64,
    /// When the estimate was set: nanoseconds since `base`, plus one; zero
    /// until the first sample.
    sampled_at: AtomicU64,
}

impl Default for EndpointLoad {
    fn default() -> Self {
        Self::new()
    }
}

impl EndpointLoad {
    pub fn new() -> Self {
        EndpointLoad {
            base: Instant::now(),
            in_flight: AtomicU32::new(0),
            rtt_estimate: AtomicU64::new(0),
            sampled_at: AtomicU64::new(0),
        }
    }

    /// Counts a request in flight until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> LoadGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        LoadGuard { load: self.clone() }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The latency estimate at `now`.
    pub fn rtt_estimate(&self, now: Instant) -> Duration {
        Duration::from_nanos(self.estimate_nanos(now).round() as u64)
    }

    /// What sending one more request here is expected to cost: the latency
    /// estimate times (requests in flight + 1). Lower is better.
    ///
    /// An endpoint that has not answered yet costs nothing while idle and
    /// [`DEFAULT_RTT`] per request in flight: it is probed with one request
    /// at a time until its first answer gives it an estimate. (Pricing it
    /// at the default alone would starve it next to endpoints answering
    /// faster than the default: a new endpoint would never be tried.)
    pub fn cost(&self, now: Instant) -> f64 {
        let in_flight = self.in_flight();
        match self.sample_state(now) {
            None => DEFAULT_RTT.as_nanos() as f64 * f64::from(in_flight),
            Some((estimate, weight)) => estimate * weight * f64::from(in_flight.saturating_add(1)),
        }
    }

    fn estimate_nanos(&self, now: Instant) -> f64 {
        match self.sample_state(now) {
            None => DEFAULT_RTT.as_nanos() as f64,
            Some((estimate, weight)) => estimate * weight,
        }
    }

    /// The last estimate and the weight it keeps at `now`, or `None` before
    /// the first sample.
    fn sample_state(&self, now: Instant) -> Option<(f64, f64)> {
        let sampled_at = self.sampled_at.load(Ordering::Relaxed);
        if sampled_at == 0 {
            return None;
        }
        let elapsed = self.stamp(now).saturating_sub(sampled_at) as f64;
        let estimate = f64::from_bits(self.rtt_estimate.load(Ordering::Relaxed));
        Some((estimate, (-elapsed / DECAY.as_nanos() as f64).exp()))
    }

    fn record(&self, rtt: Duration, now: Instant) {
        let sample = rtt.as_nanos() as f64;
        let next = match self.sample_state(now) {
            // The default is a guess, not a sample: the first answer replaces it.
            None => sample,
            Some((estimate, weight)) => {
                let decayed = estimate * weight;
                if sample > decayed {
                    sample
                } else {
                    decayed + sample * (1.0 - weight)
                }
            }
        };
        self.rtt_estimate.store(next.to_bits(), Ordering::Relaxed);
        self.sampled_at.store(self.stamp(now), Ordering::Relaxed);
    }

    fn stamp(&self, now: Instant) -> u64 {
        nanos_since(self.base, now).saturating_add(1)
    }
}

/// One request in flight at an endpoint; dropping it ends the request.
#[derive(Debug)]
pub struct LoadGuard {
    load: Arc<EndpointLoad>,
}

impl LoadGuard {
    /// Feeds the time the endpoint took to answer (until response headers)
    /// into its latency estimate.
    pub fn record_latency(&self, rtt: Duration, now: Instant) {
        self.load.record(rtt, now);
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the balancer needs to know of an endpoint.
pub trait Candidate {
    fn load(&self) -> &EndpointLoad;
    fn health(&self) -> &EndpointHealth;
}

impl<E: Candidate + ?Sized> Candidate for Arc<E> {
    fn load(&self) -> &EndpointLoad {
        (**self).load()
    }

    fn health(&self) -> &EndpointHealth {
        (**self).health()
    }
}

/// Chooses the endpoint for one attempt (see the module doc). `turn` is the
/// backend's round-robin counter; `avoid` says which endpoints this request
/// already tried.
pub fn pick<'a, E: Candidate>(
    lb: LoadBalancerType,
    turn: &AtomicUsize,
    endpoints: &'a [E],
    now: Instant,
    avoid: impl Fn(&E) -> bool,
) -> Option<&'a E> {
    let available = |e: &E| e.health().is_available(now);
    let preferred = |e: &E| available(e) && !avoid(e);
    match lb {
        LoadBalancerType::LeastRequest => two_choices(endpoints, now, preferred)
            .or_else(|| two_choices(endpoints, now, available)),
        LoadBalancerType::RoundRobin => {
            in_turn(endpoints, turn, preferred).or_else(|| in_turn(endpoints, turn, available))
        }
    }
}

/// Power of two choices among the endpoints that are `eligible`.
fn two_choices<E: Candidate>(
    endpoints: &[E],
    now: Instant,
    eligible: impl Fn(&E) -> bool,
) -> Option<&E> {
    // Usually every endpoint is eligible: two random draws over the slice
    // settle it without walking it. Given that both draws are eligible,
    // the pair is uniform among eligible pairs, as in the walk below.
    if let Some((i, j)) = distinct_pair(endpoints.len())
        && let (Some(a), Some(b)) = (endpoints.get(i), endpoints.get(j))
        && eligible(a)
        && eligible(b)
    {
        return Some(cheaper(a, b, now));
    }
    let count = endpoints.iter().filter(|e| eligible(e)).count();
    let Some((i, j)) = distinct_pair(count) else {
        return endpoints.iter().find(|e| eligible(e));
    };
    let (first, second) = (i.min(j), i.max(j));
    let mut walk = endpoints.iter().filter(|e| eligible(e));
    // Eligibility may change between the two walks (an ejection); then take
    // what is found.
    match (walk.nth(first), walk.nth(second - first - 1)) {
        (Some(a), Some(b)) => Some(cheaper(a, b, now)),
        (found, None) | (None, found) => found,
    }
}

/// The one of `a` and `b` with the lower cost; `a` on a tie.
fn cheaper<'a, E: Candidate>(a: &'a E, b: &'a E, now: Instant) -> &'a E {
    if b.load().cost(now) < a.load().cost(now) {
        b
    } else {
        a
    }
}

/// Two distinct random indices below `n`, or `None` when `n < 2`.
fn distinct_pair(n: usize) -> Option<(usize, usize)> {
    if n < 2 {
        return None;
    }
    let i = fastrand::usize(..n);
    let j = fastrand::usize(..n - 1);
    Some((i, if j >= i { j + 1 } else { j }))
}

/// The next of the `eligible` endpoints in turn.
fn in_turn<'a, E>(
    endpoints: &'a [E],
    turn: &AtomicUsize,
    eligible: impl Fn(&E) -> bool,
) -> Option<&'a E> {
    let count = endpoints.iter().filter(|e| eligible(e)).count();
    if count == 0 {
        return None;
    }
    let rank = turn.fetch_add(1, Ordering::Relaxed) % count;
    // Eligibility may change between the two walks; then take the first.
    endpoints
        .iter()
        .filter(|e| eligible(e))
        .nth(rank)
        .or_else(|| endpoints.iter().find(|e| eligible(e)))
}

#[cfg(test)]
mod tests {
    use pylon_proto::policy::OutlierDetection;

    use super::*;
    use crate::resilience::outlier::{Outcome, OutlierDetector};

    struct Endpoint {
        id: usize,
        load: Arc<EndpointLoad>,
        health: EndpointHealth,
    }

    impl Candidate for Endpoint {
        fn load(&self) -> &EndpointLoad {
            &self.load
        }

        fn health(&self) -> &EndpointHealth {
            &self.health
        }
    }

    fn endpoints(n: usize) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|id| {
                Arc::new(Endpoint {
                    id,
                    load: Arc::new(EndpointLoad::new()),
                    health: EndpointHealth::new(),
                })
            })
            .collect()
    }

    /// Ejects endpoint `i` for 30 s.
    fn eject(all: &[Arc<Endpoint>], i: usize, now: Instant) {
        let detector = OutlierDetector::new(Some(OutlierDetection {
            consecutive_5xx_errors: None,
            consecutive_gateway_errors: Some(1),
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 100,
        }));
        let gateway = Outcome::Failure {
            server_error: true,
            gateway_error: true,
        };
        let health = all.iter().map(Candidate::health);
        assert!(detector.observe(&all[i].health, gateway, health, now));
    }

    /// The ids chosen by `picks` picks.
    fn ids(
        lb: LoadBalancerType,
        all: &[Arc<Endpoint>],
        turn: &AtomicUsize,
        picks: usize,
        now: Instant,
        avoid: impl Fn(&Arc<Endpoint>) -> bool,
    ) -> Vec<usize> {
        (0..picks)
            .map(|_| pick(lb, turn, all, now, &avoid).map_or(usize::MAX, |e| e.id))
            .collect()
    }

    fn avoid_none(_: &Arc<Endpoint>) -> bool {
        false
    }

    fn assert_close(actual: Duration, expected_secs: f64) {
        let error = (actual.as_secs_f64() - expected_secs).abs();
        assert!(error < 1e-9, "{actual:?} is not {expected_secs} s");
    }

    #[tokio::test(start_paused = true)]
    async fn the_estimate_starts_at_the_default_and_the_first_sample_replaces_it() {
        let load = Arc::new(EndpointLoad::new());
        let t0 = Instant::now();
        assert_eq!(load.rtt_estimate(t0), DEFAULT_RTT);
        assert_eq!(load.rtt_estimate(t0 + Duration::from_secs(60)), DEFAULT_RTT);
        load.begin().record_latency(Duration::from_millis(5), t0);
        assert_close(load.rtt_estimate(t0), 0.005);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peak_replaces_the_estimate_and_a_lower_sample_blends_in() {
        let load = Arc::new(EndpointLoad::new());
        let t0 = Instant::now();
        let guard = load.begin();
        guard.record_latency(Duration::from_millis(10), t0);
        guard.record_latency(Duration::from_millis(50), t0);
        assert_close(load.rtt_estimate(t0), 0.050);

        // After one time constant the peak keeps 1/e of its weight.
        let t10 = t0 + DECAY;
        let weight = (-1.0f64).exp();
        assert_close(load.rtt_estimate(t10), 0.050 * weight);
        guard.record_latency(Duration::from_millis(10), t10);
        assert_close(
            load.rtt_estimate(t10),
            0.050 * weight + 0.010 * (1.0 - weight),
        );
        // A sample at the same instant as the last one carries no weight.
        guard.record_latency(Duration::from_millis(1), t10);
        assert_close(
            load.rtt_estimate(t10),
            0.050 * weight + 0.010 * (1.0 - weight),
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cost_is_the_estimate_times_in_flight_plus_one() {
        let load = Arc::new(EndpointLoad::new());
        let t0 = Instant::now();
        let default = DEFAULT_RTT.as_nanos() as f64;
        // Not answered yet: free while idle, the default per request out.
        assert_eq!(load.cost(t0), 0.0);
        let guards: Vec<_> = (0..3).map(|_| load.begin()).collect();
        assert_eq!(load.in_flight(), 3);
        assert_eq!(load.cost(t0), default * 3.0);
        drop(guards);
        load.record(Duration::from_millis(2), t0);
        let estimate = Duration::from_millis(2).as_nanos() as f64;
        assert_eq!(load.cost(t0), estimate);
        let guards: Vec<_> = (0..3).map(|_| load.begin()).collect();
        assert_eq!(load.cost(t0), estimate * 4.0);
        drop(guards);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_endpoint_is_probed_next_to_fast_ones_one_request_at_a_time() {
        fastrand::seed(7);
        let all = endpoints(3);
        let t0 = Instant::now();
        // Two endpoints answer in 1 ms, far under the default estimate.
        for e in &all[..2] {
            e.load.record(Duration::from_millis(1), t0);
        }
        let lb = LoadBalancerType::LeastRequest;
        let turn = AtomicUsize::new(0);
        let mut probes = Vec::new();
        for _ in 0..50 {
            let e = pick(lb, &turn, &all, t0, |_| false).unwrap();
            if std::ptr::eq(e, &all[2]) {
                // Held: the probe has not answered yet.
                probes.push(e.load.begin());
            }
        }
        assert_eq!(probes.len(), 1, "one probe while the first is out");
        drop(probes);
        all[2].load.record(Duration::from_millis(1), t0);
        let picked = (0..60)
            .filter(|_| std::ptr::eq(pick(lb, &turn, &all, t0, |_| false).unwrap(), &all[2]))
            .count();
        assert!(picked > 0, "once it answered it takes its share");
    }

    #[tokio::test(start_paused = true)]
    async fn two_choices_with_two_endpoints_always_takes_the_cheaper() {
        fastrand::seed(1);
        let all = endpoints(2);
        let t0 = Instant::now();
        let _busy: Vec<_> = (0..2).map(|_| all[0].load.begin()).collect();
        let lb = LoadBalancerType::LeastRequest;
        let turn = AtomicUsize::new(0);
        assert!(
            ids(lb, &all, &turn, 200, t0, avoid_none)
                .iter()
                .all(|&id| id == 1)
        );

        // Endpoint 1 turns slow: 30 ms × 3 at endpoint 0 beats 200 ms × 1.
        all[1]
            .load
            .begin()
            .record_latency(Duration::from_millis(200), t0);
        assert!(
            ids(lb, &all, &turn, 200, t0, avoid_none)
                .iter()
                .all(|&id| id == 0)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn two_choices_never_takes_the_costliest_and_spreads_over_the_rest() {
        fastrand::seed(2);
        let all = endpoints(5);
        let t0 = Instant::now();
        let _busy = all[3].load.begin();
        let picked = ids(
            LoadBalancerType::LeastRequest,
            &all,
            &AtomicUsize::new(0),
            2000,
            t0,
            avoid_none,
        );
        assert!(!picked.contains(&3));
        for id in [0, 1, 2, 4] {
            assert!(picked.contains(&id), "endpoint {id} never picked");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_endpoints_are_never_picked() {
        fastrand::seed(3);
        let all = endpoints(3);
        let t0 = Instant::now();
        eject(&all, 0, t0);
        eject(&all, 2, t0);
        for lb in [LoadBalancerType::LeastRequest, LoadBalancerType::RoundRobin] {
            let picked = ids(lb, &all, &AtomicUsize::new(0), 50, t0, avoid_none);
            assert!(picked.iter().all(|&id| id == 1), "{lb:?}: {picked:?}");
        }
        eject(&all, 1, t0);
        for lb in [LoadBalancerType::LeastRequest, LoadBalancerType::RoundRobin] {
            assert!(pick(lb, &AtomicUsize::new(0), &all, t0, avoid_none).is_none());
        }
        // They come back when their time is up.
        let back = t0 + Duration::from_secs(30);
        let picked = ids(
            LoadBalancerType::RoundRobin,
            &all,
            &AtomicUsize::new(0),
            3,
            back,
            avoid_none,
        );
        assert_eq!(picked, [0, 1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn round_robin_goes_in_order_and_shares_fairly_around_an_ejection() {
        let all = endpoints(3);
        let t0 = Instant::now();
        let turn = AtomicUsize::new(0);
        let lb = LoadBalancerType::RoundRobin;
        assert_eq!(ids(lb, &all, &turn, 6, t0, avoid_none), [0, 1, 2, 0, 1, 2]);
        eject(&all, 1, t0);
        assert_eq!(ids(lb, &all, &turn, 4, t0, avoid_none), [0, 2, 0, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_avoids_the_endpoints_it_tried_while_others_are_left() {
        fastrand::seed(4);
        let all = endpoints(3);
        let t0 = Instant::now();
        // Endpoint 2 is the costliest, but the only one not tried yet.
        let _busy: Vec<_> = (0..5).map(|_| all[2].load.begin()).collect();
        let tried = |e: &Arc<Endpoint>| e.id != 2;
        for lb in [LoadBalancerType::LeastRequest, LoadBalancerType::RoundRobin] {
            let picked = ids(lb, &all, &AtomicUsize::new(0), 50, t0, tried);
            assert!(picked.iter().all(|&id| id == 2), "{lb:?}: {picked:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_falls_back_to_tried_endpoints_rather_than_fail() {
        fastrand::seed(5);
        let all = endpoints(3);
        let t0 = Instant::now();
        eject(&all, 2, t0);
        let _busy = all[0].load.begin();
        let everything = |_: &Arc<Endpoint>| true;
        let picked = ids(
            LoadBalancerType::LeastRequest,
            &all,
            &AtomicUsize::new(0),
            50,
            t0,
            everything,
        );
        assert!(picked.iter().all(|&id| id == 1), "{picked:?}");
        let picked = ids(
            LoadBalancerType::RoundRobin,
            &all,
            &AtomicUsize::new(0),
            4,
            t0,
            everything,
        );
        assert_eq!(picked, [0, 1, 0, 1]);
        // Only an ejected endpoint was left untried: a tried one is reused.
        let not_two = |e: &Arc<Endpoint>| e.id != 2;
        assert!(
            pick(
                LoadBalancerType::LeastRequest,
                &AtomicUsize::new(0),
                &all,
                t0,
                not_two
            )
            .is_some()
        );
    }

    #[test]
    fn no_endpoints_no_pick() {
        let none: Vec<Arc<Endpoint>> = Vec::new();
        let now = Instant::now();
        for lb in [LoadBalancerType::LeastRequest, LoadBalancerType::RoundRobin] {
            assert!(pick(lb, &AtomicUsize::new(0), &none, now, avoid_none).is_none());
        }
    }
}
