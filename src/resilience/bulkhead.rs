//! A backend's bulkheads (`circuitBreaker` in a BackendTrafficPolicy): caps
//! on requests in flight, on callers waiting for a slot, and on open
//! connections.
//!
//! [`Bulkhead`] admits a request at once while fewer than
//! `maxParallelRequests` are in flight. When it is full, up to
//! `maxPendingRequests` callers (none when unset) wait for a slot, each at
//! most until the instant it gives; anyone beyond that fails at once. The
//! wait is bounded both in length and in the number of waiters, so the
//! bulkhead never queues without bound. Waiters are woken in arrival order,
//! but a caller arriving just as a slot frees may take it first; fairness is
//! not promised, only the caps.
//!
//! Limits change at run time without revoking anything: a lowered limit
//! applies to new admissions while the permits already handed out stay valid
//! until dropped; a raised limit wakes the waiters at once.
//!
//! [`ConnectionLimit`] counts open connections (`maxConnections`) and
//! never waits.
//!
//! Nothing here answers the caller: the proxy turns an [`Overflow`] into
//! RESOURCE_EXHAUSTED (or 503).

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until};

/// Why [`Bulkhead::acquire`] gave no permit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Overflow {
    /// Every slot is taken and the waiting line is full (or not allowed).
    #[error("too many requests in flight and waiting")]
    Full,
    /// The caller waited, and no slot came free before its time was up.
    #[error("no request slot came free in time")]
    TimedOut,
}

/// Caps requests in flight to one backend, with a bounded waiting line.
#[derive(Debug)]
pub struct Bulkhead {
    /// [`u32::MAX`] stands for unlimited.
    max_parallel: AtomicU32,
    max_pending: AtomicU32,
    in_flight: AtomicU32,
    pending: AtomicU32,
    /// Woken when a slot frees while someone waits, and when limits change.
    slot_freed: Notify,
}

impl Bulkhead {
    /// `None` for `max_parallel_requests` is unlimited; `None` for
    /// `max_pending_requests` means nobody waits: a full bulkhead fails fast.
    pub fn new(max_parallel_requests: Option<u32>, max_pending_requests: Option<u32>) -> Self {
        Bulkhead {
            max_parallel: AtomicU32::new(max_parallel_requests.unwrap_or(u32::MAX)),
            max_pending: AtomicU32::new(max_pending_requests.unwrap_or(0)),
            in_flight: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            slot_freed: Notify::new(),
        }
    }

    /// Applies reloaded limits. Permits already held stay valid and callers
    /// already waiting keep their place; new arrivals see the new limits.
    pub fn set_limits(
        &self,
        max_parallel_requests: Option<u32>,
        max_pending_requests: Option<u32>,
    ) {
        self.max_parallel
            .store(max_parallel_requests.unwrap_or(u32::MAX), Ordering::SeqCst);
        self.max_pending
            .store(max_pending_requests.unwrap_or(0), Ordering::SeqCst);
        // A raised limit may have room for the waiters right now.
        self.slot_freed.notify_waiters();
    }

    /// Requests holding a permit.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Callers waiting for a slot.
    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }

    /// A slot for one request if one is free now.
    pub fn try_acquire(self: &Arc<Self>) -> Option<BulkheadPermit> {
        self.try_take_slot().then(|| self.permit())
    }

    /// Whether a cap on requests in flight is set.
    pub fn limited(&self) -> bool {
        self.max_parallel.load(Ordering::Relaxed) != u32::MAX
    }

    /// A slot for one request: at once if one is free; else, if the waiting
    /// line has room, the first slot to come free before `wait_until`.
    pub async fn acquire(
        self: &Arc<Self>,
        wait_until: Instant,
    ) -> Result<BulkheadPermit, Overflow> {
        if self.try_take_slot() {
            return Ok(self.permit());
        }
        let _waiting = self.join_waiting_line().ok_or(Overflow::Full)?;
        let mut deadline = pin!(sleep_until(wait_until));
        loop {
            // Registered before the check, so a slot freed between the check
            // and the await still wakes us.
            let mut freed = pin!(self.slot_freed.notified());
            freed.as_mut().enable();
            if self.try_take_slot() {
                return Ok(self.permit());
            }
            tokio::select! {
                biased;
                () = &mut freed => {}
                () = &mut deadline => return Err(Overflow::TimedOut),
            }
        }
    }

    fn permit(self: &Arc<Self>) -> BulkheadPermit {
        BulkheadPermit {
            bulkhead: self.clone(),
        }
    }

    // The slot and waiting counts use SeqCst: a waiter increments `pending`
    // then reads `in_flight`, a releaser decrements `in_flight` then reads
    // `pending`; only a single total order guarantees that one of them sees
    // the other, so no wake-up is lost.
    fn try_take_slot(&self) -> bool {
        let max = self.max_parallel.load(Ordering::SeqCst);
        self.in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then(|| n + 1)
            })
            .is_ok()
    }

    fn join_waiting_line(&self) -> Option<WaitingPlace<'_>> {
        let max = self.max_pending.load(Ordering::SeqCst);
        self.pending
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then(|| n + 1)
            })
            .ok()
            .map(|_| WaitingPlace { bulkhead: self })
    }

    fn release(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.pending.load(Ordering::SeqCst) > 0 {
            // A woken waiter that has gone (timed out, cancelled) passes the
            // wake-up on to the next one.
            self.slot_freed.notify_one();
        }
    }
}

/// A request's slot in a [`Bulkhead`]; dropping it frees the slot and wakes
/// one waiter.
#[derive(Debug)]
pub struct BulkheadPermit {
    bulkhead: Arc<Bulkhead>,
}

impl Drop for BulkheadPermit {
    fn drop(&mut self) {
        self.bulkhead.release();
    }
}

/// A caller's place in the waiting line, given up however the wait ends
/// (slot, timeout, or the caller's future dropped).
struct WaitingPlace<'a> {
    bulkhead: &'a Bulkhead,
}

impl Drop for WaitingPlace<'_> {
    fn drop(&mut self) {
        self.bulkhead.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Caps open connections to one backend (`maxConnections`).
#[derive(Debug)]
pub struct ConnectionLimit {
    /// [`u32::MAX`] stands for unlimited.
    max: AtomicU32,
    open: AtomicU32,
}

impl ConnectionLimit {
    /// `None`: unlimited.
    pub fn new(max_connections: Option<u32>) -> Self {
        ConnectionLimit {
            max: AtomicU32::new(max_connections.unwrap_or(u32::MAX)),
            open: AtomicU32::new(0),
        }
    }

    /// Applies a reloaded limit; connections already open stay open.
    pub fn set_max(&self, max_connections: Option<u32>) {
        self.max
            .store(max_connections.unwrap_or(u32::MAX), Ordering::Relaxed);
    }

    /// Connections counted open.
    pub fn open(&self) -> u32 {
        self.open.load(Ordering::Relaxed)
    }

    /// Counts one more open connection, or `None` when the limit is reached.
    /// Takes the `Arc` so the guard can live in a connection's own task.
    pub fn try_open(self: &Arc<Self>) -> Option<ConnectionGuard> {
        let max = self.max.load(Ordering::Relaxed);
        self.open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then(|| n + 1)
            })
            .ok()
            .map(|_| ConnectionGuard {
                limit: self.clone(),
            })
    }
}

/// One connection counted by a [`ConnectionLimit`]; dropping it uncounts it.
#[derive(Debug)]
pub struct ConnectionGuard {
    limit: Arc<ConnectionLimit>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.limit.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::FutureExt;
    use tokio::task::JoinHandle;

    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn bulkhead(parallel: Option<u32>, pending: Option<u32>) -> Arc<Bulkhead> {
        Arc::new(Bulkhead::new(parallel, pending))
    }

    /// A permit that must be granted without waiting.
    fn take(bulkhead: &Arc<Bulkhead>) -> BulkheadPermit {
        match bulkhead.acquire(Instant::now() + SECOND).now_or_never() {
            Some(Ok(permit)) => permit,
            other => panic!("expected an immediate permit, got {other:?}"),
        }
    }

    /// What `acquire` answers without waiting.
    fn refused(bulkhead: &Arc<Bulkhead>) -> Option<Overflow> {
        match bulkhead.acquire(Instant::now() + SECOND).now_or_never() {
            Some(Err(overflow)) => Some(overflow),
            _ => None,
        }
    }

    type Admission = Result<(Instant, BulkheadPermit), Overflow>;

    /// A task waiting for a permit until `wait_until`. Its output holds the
    /// permit (and so the slot) until the test drops it.
    fn waiter(bulkhead: &Arc<Bulkhead>, wait_until: Instant) -> JoinHandle<Admission> {
        let bulkhead = bulkhead.clone();
        tokio::spawn(async move {
            let permit = bulkhead.acquire(wait_until).await?;
            Ok((Instant::now(), permit))
        })
    }

    /// When the waiter was admitted, or why not.
    fn admitted_at(admission: &Admission) -> Result<Instant, Overflow> {
        admission.as_ref().map(|(at, _)| *at).map_err(|e| *e)
    }

    /// Lets the spawned tasks run until `pending` callers wait.
    async fn until_pending(bulkhead: &Bulkhead, pending: u32) {
        for _ in 0..100 {
            if bulkhead.pending() == pending {
                return;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(bulkhead.pending(), pending);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_waiting_line_a_full_bulkhead_fails_fast() {
        let bulkhead = bulkhead(Some(2), None);
        let _a = take(&bulkhead);
        let _b = take(&bulkhead);
        assert_eq!(bulkhead.in_flight(), 2);
        assert_eq!(refused(&bulkhead), Some(Overflow::Full));
        assert_eq!(bulkhead.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn overflows_exactly_at_parallel_plus_pending() {
        let bulkhead = bulkhead(Some(2), Some(3));
        let first = take(&bulkhead);
        let _second = take(&bulkhead);
        let t0 = Instant::now();
        let waiters: Vec<_> = (0..3).map(|_| waiter(&bulkhead, t0 + SECOND)).collect();
        until_pending(&bulkhead, 3).await;
        assert_eq!(refused(&bulkhead), Some(Overflow::Full));

        drop(first);
        until_pending(&bulkhead, 2).await;
        assert_eq!(bulkhead.in_flight(), 2);
        // The freed slot went to a waiter; the line has room for one again.
        let late = waiter(&bulkhead, t0 + SECOND);
        until_pending(&bulkhead, 3).await;
        assert_eq!(refused(&bulkhead), Some(Overflow::Full));

        let mut outcomes = Vec::new();
        for task in waiters.into_iter().chain([late]) {
            outcomes.push(task.await.unwrap());
        }
        let outcomes: Vec<_> = outcomes.iter().map(admitted_at).collect();
        assert_eq!(
            outcomes,
            [
                Ok(t0),
                Err(Overflow::TimedOut),
                Err(Overflow::TimedOut),
                Err(Overflow::TimedOut)
            ]
        );
        assert_eq!(bulkhead.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gives_up_exactly_at_its_time() {
        let bulkhead = bulkhead(Some(1), Some(1));
        let _held = take(&bulkhead);
        let t0 = Instant::now();
        let result = bulkhead.acquire(t0 + Duration::from_millis(100)).await;
        assert_eq!(result.err(), Some(Overflow::TimedOut));
        assert_eq!(Instant::now() - t0, Duration::from_millis(100));
        assert_eq!(bulkhead.pending(), 0);
        assert_eq!(bulkhead.in_flight(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_slot_goes_to_the_waiter_at_once() {
        let bulkhead = bulkhead(Some(1), Some(1));
        let held = take(&bulkhead);
        let t0 = Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            drop(held);
        });
        let permit = bulkhead.acquire(t0 + SECOND).await;
        assert!(permit.is_ok());
        assert_eq!(Instant::now() - t0, Duration::from_millis(30));
        assert_eq!(bulkhead.in_flight(), 1);
        drop(permit);
        assert_eq!(bulkhead.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_in_arrival_order() {
        let bulkhead = bulkhead(Some(1), Some(2));
        let held = take(&bulkhead);
        let t0 = Instant::now();
        let first = waiter(&bulkhead, t0 + Duration::from_millis(500));
        until_pending(&bulkhead, 1).await;
        let second = waiter(&bulkhead, t0 + SECOND);
        until_pending(&bulkhead, 2).await;
        drop(held);
        let first = first.await.unwrap();
        assert_eq!(admitted_at(&first), Ok(t0));
        let second = second.await.unwrap();
        assert_eq!(admitted_at(&second), Err(Overflow::TimedOut));
        assert_eq!(Instant::now() - t0, SECOND);
    }

    #[tokio::test(start_paused = true)]
    async fn lowering_the_limit_revokes_no_permit() {
        let bulkhead = bulkhead(Some(3), None);
        let mut held: Vec<_> = (0..3).map(|_| take(&bulkhead)).collect();
        bulkhead.set_limits(Some(1), None);
        assert_eq!(bulkhead.in_flight(), 3);
        assert_eq!(refused(&bulkhead), Some(Overflow::Full));
        held.truncate(1);
        assert_eq!(bulkhead.in_flight(), 1);
        assert_eq!(refused(&bulkhead), Some(Overflow::Full));
        held.clear();
        let _only = take(&bulkhead);
        assert_eq!(refused(&bulkhead), Some(Overflow::Full));
    }

    #[tokio::test(start_paused = true)]
    async fn raising_the_limit_admits_the_waiters_at_once() {
        let bulkhead = bulkhead(Some(1), Some(2));
        let _held = take(&bulkhead);
        let t0 = Instant::now();
        let waiters = [
            waiter(&bulkhead, t0 + SECOND),
            waiter(&bulkhead, t0 + SECOND),
        ];
        until_pending(&bulkhead, 2).await;
        bulkhead.set_limits(Some(3), Some(2));
        let mut admitted = Vec::new();
        for task in waiters {
            admitted.push(task.await.unwrap());
        }
        assert!(admitted.iter().all(|a| admitted_at(a) == Ok(t0)));
        assert_eq!(bulkhead.in_flight(), 3);
        assert_eq!(bulkhead.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn lowering_the_waiting_line_keeps_those_already_waiting() {
        let bulkhead = bulkhead(Some(1), Some(2));
        let held = take(&bulkhead);
        let t0 = Instant::now();
        let waiters = [
            waiter(&bulkhead, t0 + SECOND),
            waiter(&bulkhead, t0 + SECOND),
        ];
        until_pending(&bulkhead, 2).await;
        bulkhead.set_limits(Some(1), None);
        until_pending(&bulkhead, 2).await;
        assert_eq!(refused(&bulkhead), Some(Overflow::Full));
        drop(held);
        let [first, second] = waiters;
        let first = first.await.unwrap();
        assert_eq!(admitted_at(&first), Ok(t0));
        let second = second.await.unwrap();
        assert_eq!(admitted_at(&second), Err(Overflow::TimedOut));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_leaves_the_line() {
        let bulkhead = bulkhead(Some(1), Some(1));
        let _held = take(&bulkhead);
        let task = waiter(&bulkhead, Instant::now() + SECOND);
        until_pending(&bulkhead, 1).await;
        task.abort();
        assert!(task.await.is_err());
        assert_eq!(bulkhead.pending(), 0);
        let next = waiter(&bulkhead, Instant::now() + SECOND);
        until_pending(&bulkhead, 1).await;
        next.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_admits_everyone() {
        let bulkhead = bulkhead(None, None);
        let held: Vec<_> = (0..10_000).map(|_| take(&bulkhead)).collect();
        assert_eq!(bulkhead.in_flight(), 10_000);
        drop(held);
        assert_eq!(bulkhead.in_flight(), 0);
    }

    #[test]
    fn connection_limit_counts_guards_and_follows_reloads() {
        let limit = Arc::new(ConnectionLimit::new(Some(2)));
        let a = limit.try_open();
        let b = limit.try_open();
        assert!(a.is_some() && b.is_some());
        assert!(limit.try_open().is_none());
        assert_eq!(limit.open(), 2);
        drop(a);
        assert_eq!(limit.open(), 1);
        let c = limit.try_open();
        assert!(c.is_some());

        limit.set_max(Some(1));
        assert_eq!(limit.open(), 2);
        drop(b);
        assert!(limit.try_open().is_none());
        drop(c);
        let d = limit.try_open();
        assert!(d.is_some());
        assert!(limit.try_open().is_none());

        limit.set_max(None);
        let many: Vec<_> = (0..1000).filter_map(|_| limit.try_open()).collect();
        assert_eq!(many.len(), 1000);
        assert_eq!(limit.open(), 1001);
    }
}
