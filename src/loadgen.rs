//! A gRPC load generator for `helloworld.Greeter/SayHello`, used by
//! `pylon demo` and the mesh benchmark.
//!
//! It dials one address (the service itself or a sidecar's outbound
//! listener) over a few HTTP/2 connections, names a configurable
//! `:authority` (what a sidecar routes on), and runs one of two loads:
//!
//! - [`Load::FixedRate`], open loop: request `i` is due at `start + i / rps`
//!   whatever happened to the previous ones. Latency is measured from the
//!   *intended* send time, so a stall in the target (or in the generator)
//!   shows up in the percentiles instead of silently lowering the rate
//!   (coordinated omission). Outstanding calls are bounded; a request due
//!   while the bound is reached is not sent and counts as an error
//!   ([`ErrorKind::Skipped`]).
//! - [`Load::MaxThroughput`], closed loop: N workers, each sending its next
//!   call as soon as the previous one returns.
//!
//! Each worker records into its own shard (a histogram of microseconds and
//! counters behind an uncontended mutex); [`Run::progress`] merges the shards
//! into per-interval and cumulative [`Report`]s, so a caller can print live
//! figures without the hot path sharing a lock.
//!
//! Latency percentiles cover successful calls only; failed calls are counted
//! by gRPC code. Not here: other methods or payload sizes, and any notion of
//! which hop added the latency.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;
use pylon_proto::helloworld::HelloRequest;
use pylon_proto::helloworld::greeter_client::GreeterClient;
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

/// Tokio's timer has millisecond resolution: the fixed-rate scheduler wakes
/// up to this much before a request is due and sends everything due within
/// that window. Each call is measured from its actual send time, but never
/// from later than one lead past its intended time: timer granularity is not
/// counted as latency, while a stall (in the target or the generator) is.
const SCHEDULE_LEAD: Duration = Duration::from_millis(1);

/// Latencies are recorded in microseconds between these bounds (larger
/// values are recorded as the upper bound).
const LOWEST_MICROS: u64 = 1;
const HIGHEST_MICROS: u64 = 3_600_000_000;
const SIGNIFICANT_DIGITS: u8 = 3;

/// The name every `SayHello` carries.
const CALLER_NAME: &str = "pylon";

/// Where the load goes and how it gets there.
#[derive(Debug, Clone)]
pub struct Target {
    /// The address to dial: the service itself or a sidecar's outbound
    /// listener.
    pub addr: SocketAddr,
    /// The `:authority` of every request.
    pub authority: String,
    /// HTTP/2 connections to open; calls are spread over them round-robin.
    pub connections: NonZeroUsize,
    /// A call still running after this long fails with DEADLINE_EXCEEDED.
    pub request_timeout: Duration,
}

/// The shape of the load.
#[derive(Debug, Clone, Copy)]
pub enum Load {
    /// Open loop at `rps` requests per second, at most `max_outstanding`
    /// calls in flight.
    FixedRate {
        rps: NonZeroU32,
        max_outstanding: NonZeroU32,
    },
    /// Closed loop: `concurrency` workers, each with one call in flight.
    MaxThroughput { concurrency: NonZeroUsize },
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{authority:?} is not a valid :authority: {source}")]
    Authority {
        authority: String,
        source: http::uri::InvalidUri,
    },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: tonic::transport::Error,
    },
}

/// Open connections to a [`Target`], ready to [`start`](Self::start) runs.
pub struct LoadGenerator {
    clients: Vec<GreeterClient<Channel>>,
}

impl LoadGenerator {
    /// Opens `target.connections` HTTP/2 connections.
    pub async fn connect(target: &Target) -> Result<LoadGenerator, ConnectError> {
        let origin = format!("http://{}", target.authority)
            .parse::<http::Uri>()
            .map_err(|source| ConnectError::Authority {
                authority: target.authority.clone(),
                source,
            })?;
        let connect_error = |source| ConnectError::Connect {
            addr: target.addr,
            source,
        };
        let endpoint = Endpoint::from_shared(format!("http://{}", target.addr))
            .map_err(connect_error)?
            .origin(origin)
            .tcp_nodelay(true)
            .timeout(target.request_timeout);
        let mut clients = Vec::with_capacity(target.connections.get());
        for _ in 0..target.connections.get() {
            // One `connect` per channel: each is its own HTTP/2 connection.
            let channel = endpoint.connect().await.map_err(connect_error)?;
            clients.push(GreeterClient::new(channel));
        }
        Ok(LoadGenerator { clients })
    }

    /// Starts `load` on background tasks; it runs until [`Run::finish`] (or
    /// until the [`Run`] is dropped). Must be called within a tokio runtime.
    pub fn start(&self, load: Load) -> Run {
        let (stop, stop_requested) = watch::channel(false);
        let clients = self.clients.clone();
        let (stats, driver) = match load {
            Load::FixedRate {
                rps,
                max_outstanding,
            } => {
                let stats = Arc::new(Stats::new(clients.len()));
                let driver = tokio::spawn(drive_fixed_rate(
                    clients,
                    Schedule { rps },
                    max_outstanding,
                    stats.clone(),
                    stop_requested,
                ));
                (stats, driver)
            }
            Load::MaxThroughput { concurrency } => {
                let stats = Arc::new(Stats::new(concurrency.get()));
                let driver = tokio::spawn(drive_max_throughput(
                    clients,
                    concurrency,
                    stats.clone(),
                    stop_requested,
                ));
                (stats, driver)
            }
        };
        Run {
            stats,
            stop,
            driver,
        }
    }
}

/// A load in progress.
pub struct Run {
    stats: Arc<Stats>,
    /// Dropping it stops the run as well.
    stop: watch::Sender<bool>,
    driver: tokio::task::JoinHandle<()>,
}

impl Run {
    /// What happened since the previous call (or the start), and since the
    /// start. Meant for one observer: each call starts a new interval.
    pub fn progress(&self) -> Progress {
        self.stats.progress()
    }

    /// Stops sending, waits for the calls in flight, and reports the whole
    /// run. Fails only if a load task panicked.
    pub async fn finish(self) -> Result<Report, JoinError> {
        self.stop.send_replace(true);
        self.driver.await?;
        Ok(self.stats.progress().total)
    }
}

/// Figures for the last interval and for the run so far.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Time since the run started.
    pub elapsed: Duration,
    pub interval: Report,
    pub total: Report,
}

/// What a span of a run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub duration: Duration,
    /// Every request that was due: `ok` plus every error, skipped ones
    /// included.
    pub requests: u64,
    pub ok: u64,
    /// Failed requests by kind, in code order; kinds that did not occur are
    /// left out.
    pub errors: Vec<(ErrorKind, u64)>,
    /// Latency of the successful calls; `None` when there were none.
    pub latency: Option<Latency>,
}

impl Report {
    pub fn error_count(&self) -> u64 {
        self.errors.iter().map(|(_, n)| n).sum()
    }

    /// Calls actually sent (skipped requests left out).
    pub fn sent(&self) -> u64 {
        let skipped = self
            .errors
            .iter()
            .filter(|(kind, _)| *kind == ErrorKind::Skipped)
            .map(|(_, n)| n)
            .sum::<u64>();
        self.requests - skipped
    }

    /// Achieved throughput: calls sent and answered, per second.
    pub fn rps(&self) -> f64 {
        let secs = self.duration.as_secs_f64();
        if secs > 0.0 {
            self.sent() as f64 / secs
        } else {
            0.0
        }
    }

    /// Share of requests that succeeded, 0–100; `None` without requests.
    pub fn success_percent(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.ok as f64 * 100.0 / self.requests as f64)
    }
}

/// Latency percentiles (HDR histogram, 3 significant digits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latency {
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub p999: Duration,
    pub max: Duration,
}

/// Why a request did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The call ended with this gRPC status.
    Status(Code),
    /// Not sent: it fell due while the bound on outstanding calls was
    /// reached.
    Skipped,
}

impl ErrorKind {
    /// Counter slots: one per gRPC code (0–16), then skipped.
    const SLOTS: usize = 18;

    fn slot(self) -> usize {
        match self {
            // gRPC codes are 0–16.
            ErrorKind::Status(code) => i32::from(code) as usize,
            ErrorKind::Skipped => Self::SLOTS - 1,
        }
    }

    fn from_slot(slot: usize) -> ErrorKind {
        if slot == Self::SLOTS - 1 {
            ErrorKind::Skipped
        } else {
            ErrorKind::Status(Code::from(slot as i32))
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            ErrorKind::Skipped => "SKIPPED",
            ErrorKind::Status(code) => match code {
                Code::Ok => "OK",
                Code::Cancelled => "CANCELLED",
                Code::Unknown => "UNKNOWN",
                Code::InvalidArgument => "INVALID_ARGUMENT",
                Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
                Code::NotFound => "NOT_FOUND",
                Code::AlreadyExists => "ALREADY_EXISTS",
                Code::PermissionDenied => "PERMISSION_DENIED",
                Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
                Code::FailedPrecondition => "FAILED_PRECONDITION",
                Code::Aborted => "ABORTED",
                Code::OutOfRange => "OUT_OF_RANGE",
                Code::Unimplemented => "UNIMPLEMENTED",
                Code::Internal => "INTERNAL",
                Code::Unavailable => "UNAVAILABLE",
                Code::DataLoss => "DATA_LOSS",
                Code::Unauthenticated => "UNAUTHENTICATED",
            },
        };
        f.write_str(name)
    }
}

/// The open-loop schedule: request `i` is due `i / rps` after the start,
/// computed from `i` each time so that it never drifts.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    rps: NonZeroU32,
}

impl Schedule {
    /// When request `i` is due, from the start.
    fn offset(self, i: u64) -> Duration {
        let rps = u64::from(self.rps.get());
        // `i % rps < 2^32`, so the product stays below 2^62.
        Duration::from_secs(i / rps) + Duration::from_nanos((i % rps) * 1_000_000_000 / rps)
    }

    /// The requests from `next` on that are due by `horizon`.
    fn due(self, next: u64, horizon: Duration) -> Range<u64> {
        let mut end = next;
        while self.offset(end) <= horizon {
            end += 1;
        }
        next..end
    }

    /// When to wake up to send request `next`.
    fn wake(self, next: u64) -> Duration {
        self.offset(next).saturating_sub(SCHEDULE_LEAD)
    }
}

async fn say_hello(client: &mut GreeterClient<Channel>) -> Result<(), Code> {
    let request = HelloRequest {
        name: CALLER_NAME.to_string(),
    };
    match client.say_hello(request).await {
        Ok(_) => Ok(()),
        Err(status) => Err(status.code()),
    }
}

async fn drive_fixed_rate(
    clients: Vec<GreeterClient<Channel>>,
    schedule: Schedule,
    max_outstanding: NonZeroU32,
    stats: Arc<Stats>,
    mut stop_requested: watch::Receiver<bool>,
) {
    let outstanding = Arc::new(Semaphore::new(max_outstanding.get() as usize));
    let start = Instant::now();
    let mut next = 0u64;
    loop {
        let due = schedule.due(next, start.elapsed() + SCHEDULE_LEAD);
        for i in due.clone() {
            let slot = (i % clients.len() as u64) as usize;
            let Ok(permit) = outstanding.clone().try_acquire_owned() else {
                stats.record_error(slot, ErrorKind::Skipped);
                continue;
            };
            let measured_from = Instant::now().min(start + schedule.offset(i) + SCHEDULE_LEAD);
            let mut client = clients[slot].clone();
            let stats = stats.clone();
            tokio::spawn(async move {
                let outcome = say_hello(&mut client).await;
                stats.record(slot, measured_from.elapsed(), outcome);
                drop(permit);
            });
        }
        next = due.end;
        tokio::select! {
            biased;
            // A dropped sender means the `Run` is gone: stop as well.
            _ = stop_requested.wait_for(|stop| *stop) => break,
            () = tokio::time::sleep_until(start + schedule.wake(next)) => {}
        }
    }
    // Every permit back means every call in flight has been recorded.
    let _all_returned = outstanding.acquire_many(max_outstanding.get()).await;
}

async fn drive_max_throughput(
    clients: Vec<GreeterClient<Channel>>,
    concurrency: NonZeroUsize,
    stats: Arc<Stats>,
    mut stop_requested: watch::Receiver<bool>,
) {
    let stopping = Arc::new(AtomicBool::new(false));
    let mut workers = JoinSet::new();
    for worker in 0..concurrency.get() {
        let mut client = clients[worker % clients.len()].clone();
        let stats = stats.clone();
        let stopping = stopping.clone();
        workers.spawn(async move {
            while !stopping.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let outcome = say_hello(&mut client).await;
                stats.record(worker, sent.elapsed(), outcome);
            }
        });
    }
    let _ = stop_requested.wait_for(|stop| *stop).await;
    stopping.store(true, Ordering::Relaxed);
    while let Some(joined) = workers.join_next().await {
        if let Err(e) = joined
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

/// The shared recording state of one run.
struct Stats {
    started: Instant,
    /// One per worker (max throughput) or per connection (fixed rate).
    shards: Vec<Mutex<Tally>>,
    observed: Mutex<Observed>,
}

/// What [`Stats::progress`] has collected so far.
struct Observed {
    last: Instant,
    total: Tally,
}

impl Stats {
    fn new(shards: usize) -> Stats {
        let started = Instant::now();
        Stats {
            started,
            shards: (0..shards.max(1))
                .map(|_| Mutex::new(Tally::new()))
                .collect(),
            observed: Mutex::new(Observed {
                last: started,
                total: Tally::new(),
            }),
        }
    }

    fn shard(&self, slot: usize) -> MutexGuard<'_, Tally> {
        lock(&self.shards[slot % self.shards.len()])
    }

    fn record(&self, slot: usize, latency: Duration, outcome: Result<(), Code>) {
        match outcome {
            Ok(()) => self.shard(slot).record_ok(latency),
            Err(code) => self.record_error(slot, ErrorKind::Status(code)),
        }
    }

    fn record_error(&self, slot: usize, kind: ErrorKind) {
        self.shard(slot).record_error(kind);
    }

    fn progress(&self) -> Progress {
        let mut observed = lock(&self.observed);
        let mut interval = Tally::new();
        for shard in &self.shards {
            let mut shard = lock(shard);
            interval.absorb(&shard);
            shard.clear();
        }
        observed.total.absorb(&interval);
        let now = Instant::now();
        let progress = Progress {
            elapsed: now - self.started,
            interval: interval.report(now - observed.last),
            total: observed.total.report(now - self.started),
        };
        observed.last = now;
        progress
    }
}

/// Recording goes on if a recorder panicked: counters stay meaningful.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts and latencies of some calls.
struct Tally {
    /// Microseconds, successful calls only.
    latency: Histogram<u64>,
    ok: u64,
    errors: [u64; ErrorKind::SLOTS],
}

impl Tally {
    #[allow(
        clippy::expect_used,
        reason = "the bounds are constants that hdrhistogram accepts (low >= 1, high >= 2 * low, 0..=5 digits)"
    )]
    fn new() -> Tally {
        Tally {
            latency: Histogram::new_with_bounds(LOWEST_MICROS, HIGHEST_MICROS, SIGNIFICANT_DIGITS)
                .expect("the latency histogram bounds are valid constants"),
            ok: 0,
            errors: [0; ErrorKind::SLOTS],
        }
    }

    fn record_ok(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency.saturating_record(micros.max(LOWEST_MICROS));
        self.ok += 1;
    }

    fn record_error(&mut self, kind: ErrorKind) {
        self.errors[kind.slot()] += 1;
    }

    fn absorb(&mut self, other: &Tally) {
        // Value by value rather than `Histogram::add`: both sides share the
        // bounds, and this way there is no error case to handle.
        for v in other.latency.iter_recorded() {
            self.latency
                .saturating_record_n(v.value_iterated_to(), v.count_at_value());
        }
        self.ok += other.ok;
        for (mine, theirs) in self.errors.iter_mut().zip(other.errors) {
            *mine += theirs;
        }
    }

    fn clear(&mut self) {
        self.latency.reset();
        self.ok = 0;
        self.errors = [0; ErrorKind::SLOTS];
    }

    fn report(&self, duration: Duration) -> Report {
        let errors: Vec<(ErrorKind, u64)> = self
            .errors
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(slot, n)| (ErrorKind::from_slot(slot), *n))
            .collect();
        let at = |q: f64| Duration::from_micros(self.latency.value_at_quantile(q));
        let latency = (!self.latency.is_empty()).then(|| Latency {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: Duration::from_micros(self.latency.max()),
        });
        Report {
            duration,
            requests: self.ok + errors.iter().map(|(_, n)| n).sum::<u64>(),
            ok: self.ok,
            errors,
            latency,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(rps: u32) -> Schedule {
        Schedule {
            rps: NonZeroU32::new(rps).unwrap(),
        }
    }

    #[test]
    fn requests_are_due_at_i_over_rps_without_drift() {
        let s = schedule(200);
        assert_eq!(s.offset(0), Duration::ZERO);
        assert_eq!(s.offset(1), Duration::from_millis(5));
        assert_eq!(s.offset(200), Duration::from_secs(1));
        let s = schedule(3);
        assert_eq!(s.offset(1), Duration::from_nanos(333_333_333));
        // Far into a run the offset is still exact, not a sum of rounded steps.
        assert_eq!(
            s.offset(3_000_000_001),
            Duration::from_secs(1_000_000_000) + Duration::from_nanos(333_333_333)
        );
        let s = schedule(u32::MAX);
        assert!(s.offset(u64::MAX) > Duration::from_secs(4_294_967_295));
    }

    #[test]
    fn due_takes_every_request_up_to_the_horizon_once() {
        let s = schedule(1000);
        assert_eq!(s.due(0, Duration::ZERO), 0..1);
        assert_eq!(s.due(1, Duration::from_micros(10_900)), 1..11);
        assert_eq!(s.due(11, Duration::from_micros(10_950)), 11..11);
        assert_eq!(s.due(11, Duration::from_millis(11)), 11..12);
        // A scheduler that wakes late catches up in one batch.
        assert_eq!(s.due(12, Duration::from_millis(500)), 12..501);
        // Over one second, at one wake per millisecond, exactly rps + 1
        // requests (both ends included) go out.
        let mut next = 0;
        for ms in 0..=1000 {
            next = s.due(next, Duration::from_millis(ms)).end;
        }
        assert_eq!(next, 1001);
    }

    #[test]
    fn the_scheduler_wakes_one_lead_early_but_never_before_the_start() {
        let s = schedule(100);
        assert_eq!(s.wake(0), Duration::ZERO);
        assert_eq!(s.wake(1), Duration::from_millis(9));
        assert_eq!(s.wake(100), Duration::from_millis(999));
        assert_eq!(schedule(2000).wake(1), Duration::ZERO);
    }

    #[test]
    fn a_report_counts_rates_and_percentiles() {
        let mut t = Tally::new();
        for ms in 1..=100 {
            t.record_ok(Duration::from_millis(ms));
        }
        t.record_error(ErrorKind::Status(Code::Unavailable));
        t.record_error(ErrorKind::Status(Code::Unavailable));
        t.record_error(ErrorKind::Skipped);
        t.record_error(ErrorKind::Status(Code::DeadlineExceeded));
        let r = t.report(Duration::from_secs(2));
        assert_eq!(r.requests, 104);
        assert_eq!(r.ok, 100);
        assert_eq!(
            r.errors,
            vec![
                (ErrorKind::Status(Code::DeadlineExceeded), 1),
                (ErrorKind::Status(Code::Unavailable), 2),
                (ErrorKind::Skipped, 1),
            ]
        );
        assert_eq!(r.error_count(), 4);
        assert_eq!(r.sent(), 103);
        assert_eq!(r.rps(), 51.5);
        assert_eq!(r.success_percent(), Some(100.0 * 100.0 / 104.0));
        let l = r.latency.unwrap();
        // Three significant digits: within 0.1 % of the exact value.
        let near = |d: Duration, ms: u64| {
            let (got, want) = (d.as_micros() as f64, (ms * 1000) as f64);
            (got - want).abs() <= want / 1000.0
        };
        assert!(near(l.p50, 50), "{l:?}");
        assert!(near(l.p90, 90), "{l:?}");
        assert!(near(l.p99, 99), "{l:?}");
        assert!(near(l.p999, 100), "{l:?}");
        assert!(near(l.max, 100), "{l:?}");
    }

    #[test]
    fn an_empty_report_divides_by_nothing() {
        let r = Tally::new().report(Duration::ZERO);
        assert_eq!(r.requests, 0);
        assert_eq!(r.rps(), 0.0);
        assert_eq!(r.success_percent(), None);
        assert_eq!(r.latency, None);
        let mut t = Tally::new();
        t.record_error(ErrorKind::Skipped);
        let r = t.report(Duration::from_secs(1));
        assert_eq!(r.success_percent(), Some(0.0));
        assert_eq!(r.rps(), 0.0, "skipped requests are not throughput");
    }

    #[test]
    fn progress_splits_intervals_and_keeps_the_total() {
        let stats = Stats::new(3);
        stats.record(0, Duration::from_millis(1), Ok(()));
        stats.record(4, Duration::from_millis(3), Ok(()));
        stats.record(2, Duration::from_millis(2), Err(Code::Internal));
        let first = stats.progress();
        assert_eq!((first.interval.requests, first.interval.ok), (3, 2));
        assert_eq!(
            first.interval,
            Report {
                duration: first.interval.duration,
                ..first.total.clone()
            }
        );

        stats.record(1, Duration::from_millis(7), Ok(()));
        let second = stats.progress();
        assert_eq!((second.interval.requests, second.interval.ok), (1, 1));
        assert!(second.interval.errors.is_empty());
        assert_eq!((second.total.requests, second.total.ok), (4, 3));
        assert_eq!(second.total.error_count(), 1);
        let max = second.total.latency.unwrap().max;
        assert!(max >= Duration::from_millis(7) && max < Duration::from_micros(7010));
        assert!(second.total.duration >= second.interval.duration);
    }

    #[test]
    fn error_kinds_round_trip_through_their_slots_and_print_like_grpc() {
        for code in 0..=16 {
            let kind = ErrorKind::Status(Code::from_i32(code));
            assert_eq!(ErrorKind::from_slot(kind.slot()), kind);
        }
        assert_eq!(
            ErrorKind::from_slot(ErrorKind::Skipped.slot()),
            ErrorKind::Skipped
        );
        assert_eq!(
            ErrorKind::Status(Code::DeadlineExceeded).to_string(),
            "DEADLINE_EXCEEDED"
        );
        assert_eq!(ErrorKind::Skipped.to_string(), "SKIPPED");
    }
}
