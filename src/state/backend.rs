//! Live state of one backend within one pool: counters, the operator's drain, health, and
//! the guard that counts a connection while it lives.
//!
//! The data path reaches a backend's state through the snapshot's `Arc`s and updates it with
//! relaxed atomics. Health sits behind a mutex of its own, which checkers, the control task and
//! status readers take; the connection path never does (its only health input, the consecutive
//! connect-failure count, is an atomic).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::histogram::{CONNECT_TIME_BOUNDS, Histogram};
use super::pool::{PoolState, note_freed};
use crate::health::{Health, HealthState};

/// Live state of one backend within one pool: its counters, and the states (set by an
/// operator, by health checks, by passive ejection, by reported load) that scale its configured
/// weight.
#[derive(Debug)]
pub(crate) struct BackendState {
    drained: AtomicBool,
    active: AtomicU64,
    /// Load the server reported beyond this balancer's connections at its last fresh scrape:
    /// in-flight requests then, less the connections open from here then. 0 without a scrape.
    hidden: AtomicU64,
    /// In-flight requests the server reported at its last fresh scrape; [`NOT_REPORTED`] if none.
    reported_in_flight: AtomicU64,
    /// The pool whose queue a freed slot may serve; `None` outside a balancer.
    pool: Option<Arc<PoolState>>,
    connections: AtomicU64,
    connect_failures: AtomicU64,
    /// Failed connects since the last successful one: passive ejection's input.
    consecutive_failures: AtomicU64,
    /// When the latest connect failed, in [`ticks`]; 0 before the first failure.
    last_failure: AtomicU64,
    bytes_to_backend: AtomicU64,
    bytes_from_backend: AtomicU64,
    spliced_to_backend: AtomicU64,
    spliced_from_backend: AtomicU64,
    connect_time: Histogram,
    health: Mutex<HealthState>,
}

impl Default for BackendState {
    fn default() -> BackendState {
        BackendState {
            drained: AtomicBool::new(false),
            active: AtomicU64::new(0),
            hidden: AtomicU64::new(0),
            reported_in_flight: AtomicU64::new(NOT_REPORTED),
            pool: None,
            connections: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            consecutive_failures: AtomicU64::new(0),
            last_failure: AtomicU64::new(0),
            bytes_to_backend: AtomicU64::new(0),
            bytes_from_backend: AtomicU64::new(0),
            spliced_to_backend: AtomicU64::new(0),
            spliced_from_backend: AtomicU64::new(0),
            connect_time: Histogram::new(CONNECT_TIME_BOUNDS),
            health: Mutex::default(),
        }
    }
}

/// `reported_in_flight` when there is no fresh report.
const NOT_REPORTED: u64 = u64::MAX;

/// `at` as nanoseconds since the first call (plus one, so that 0 can mean "never"): an
/// [`Instant`](std::time::Instant) that fits an atomic.
fn ticks(at: std::time::Instant) -> u64 {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(std::time::Instant::now);
    u64::try_from(at.saturating_duration_since(epoch).as_nanos())
        .unwrap_or(u64::MAX - 1)
        .saturating_add(1)
}

/// What an operator has said about a backend. Live state: it survives reloads for as long as
/// the backend stays in the file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AdminState {
    /// Takes new connections according to its weight.
    #[default]
    Ready,
    /// Takes no new connection; open ones go on.
    Drained,
}

impl AdminState {
    /// `ready` or `drained`.
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drained => "drained",
        }
    }
}

/// A point-in-time copy of one backend's live counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendCounters {
    /// Connections assigned to the backend and not yet closed (including ones still connecting).
    pub active: u64,
    /// Connections established to the backend since start.
    pub connections: u64,
    /// Connect attempts that were refused, failed or timed out.
    pub connect_failures: u64,
    /// Bytes read from clients and written towards the backend.
    pub bytes_to_backend: u64,
    /// Bytes read from the backend and written towards clients.
    pub bytes_from_backend: u64,
    /// Of `bytes_to_backend`, those moved by splice(2), without entering user space.
    pub spliced_to_backend: u64,
    /// Of `bytes_from_backend`, those moved by splice(2).
    pub spliced_from_backend: u64,
}

impl BackendState {
    /// The state of a backend of `pool`, whose waiting clients its freed slots serve.
    pub(crate) fn in_pool(pool: Arc<PoolState>) -> BackendState {
        BackendState {
            pool: Some(pool),
            ..BackendState::default()
        }
    }

    /// Counts one more connection assigned to this backend until the returned guard drops.
    ///
    /// Taken as soon as the backend is picked, before the connect: load-aware strategies must
    /// see connections in flight, or a burst would all pick the same idle backend.
    pub(crate) fn acquire(this: &Arc<BackendState>) -> ActiveConn {
        this.active.fetch_add(1, Ordering::SeqCst);
        if let Some(pool) = &this.pool {
            pool.count_open(true);
        }
        ActiveConn {
            stats: Arc::clone(this),
        }
    }

    /// Takes one of `slots` for a connection unless the load estimate has them all taken.
    ///
    /// A compare-and-swap on the open count, so two threads never both take the last slot.
    #[inline]
    pub(crate) fn try_acquire(this: &Arc<BackendState>, slots: u64) -> Option<ActiveConn> {
        let hidden = this.hidden.load(Ordering::Relaxed);
        let mut active = this.active.load(Ordering::SeqCst);
        loop {
            if active.saturating_add(hidden) >= slots {
                return None;
            }
            match this.active.compare_exchange_weak(
                active,
                active + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => {
                    if let Some(pool) = &this.pool {
                        pool.count_open(true);
                    }
                    return Some(ActiveConn {
                        stats: Arc::clone(this),
                    });
                }
                Err(now) => active = now,
            }
        }
    }

    /// Connections open to every backend of this one's pool; `None` outside a pool.
    #[inline]
    pub(crate) fn pool_open(&self) -> Option<u64> {
        self.pool.as_ref().map(|pool| pool.open())
    }

    /// Connections currently assigned.
    pub(crate) fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// The load estimate: connections open from here, plus what the server reported beyond
    /// them at its last fresh scrape.
    #[inline]
    pub(crate) fn load_estimate(&self) -> u64 {
        self.active
            .load(Ordering::Relaxed)
            .saturating_add(self.hidden.load(Ordering::Relaxed))
    }

    /// Takes in a fresh report of `in_flight` requests on the server; `open_then` is how many
    /// connections this balancer had open to it when the report was made.
    pub(crate) fn set_reported_in_flight(&self, in_flight: u64, open_then: u64) {
        self.reported_in_flight
            .store(in_flight.min(NOT_REPORTED - 1), Ordering::Relaxed);
        self.hidden
            .store(in_flight.saturating_sub(open_then), Ordering::Relaxed);
    }

    /// Clients waiting in the backend's pool now.
    pub(crate) fn pool_waiting(&self) -> usize {
        self.pool.as_ref().map_or(0, |p| p.waiting())
    }

    /// Forgets the last report: too old to count, the estimate is own connections again.
    pub(crate) fn clear_reported_in_flight(&self) {
        self.reported_in_flight
            .store(NOT_REPORTED, Ordering::Relaxed);
        self.hidden.store(0, Ordering::Relaxed);
    }

    /// In-flight requests the server reported at its last fresh scrape, if any.
    pub(crate) fn reported_in_flight(&self) -> Option<u64> {
        let reported = self.reported_in_flight.load(Ordering::Relaxed);
        (reported != NOT_REPORTED).then_some(reported)
    }

    /// Records a successful connect that took `took`; ends a streak of failures.
    pub(crate) fn record_connected(&self, took: Duration) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.connect_time.record(took);
    }

    /// How long successful connects took.
    pub(crate) fn connect_time(&self) -> &Histogram {
        &self.connect_time
    }

    /// Records a failed connect attempt and returns the failures in a row it makes.
    pub(crate) fn record_connect_failure(&self) -> u64 {
        self.last_failure
            .store(ticks(std::time::Instant::now()), Ordering::Relaxed);
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Failed connects since the last successful one.
    pub(crate) fn consecutive_connect_failures(&self) -> u64 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Whether the latest connect to the backend failed, with no success since, less than
    /// `window` before `now`. Reads the clock only when there is a streak: `now` is filled in
    /// on first need, so a pick that asks about many backends reads it once at most.
    #[inline]
    pub(crate) fn failed_within(
        &self,
        now: &mut Option<std::time::Instant>,
        window: Duration,
    ) -> bool {
        if self.consecutive_failures.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let now = ticks(*now.get_or_insert_with(std::time::Instant::now));
        let since = now.saturating_sub(self.last_failure.load(Ordering::Relaxed));
        u128::from(since) < window.as_nanos()
    }

    /// Starts a new streak (the ejection the last one earned is over).
    pub(crate) fn reset_consecutive_failures(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// A copy of the backend's health: status, ejection, latest probe, load, slow start.
    pub(crate) fn health(&self) -> Health {
        let now = Instant::now();
        self.with_health(|h| h.snapshot(now, self.consecutive_connect_failures()))
    }

    /// Holds the health mutex until the guard drops: lets a test prove the connection path
    /// never waits for it.
    #[cfg(test)]
    pub(crate) fn lock_health(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the health state. Never called on the connection path.
    pub(crate) fn with_health<R>(&self, f: impl FnOnce(&mut HealthState) -> R) -> R {
        let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut health)
    }

    /// Adds bytes moved from a client to this backend; `spliced` when splice(2) moved them.
    pub(crate) fn add_bytes_to_backend(&self, n: u64, spliced: bool) {
        self.bytes_to_backend.fetch_add(n, Ordering::Relaxed);
        if spliced {
            self.spliced_to_backend.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Adds bytes moved from this backend to a client; `spliced` when splice(2) moved them.
    pub(crate) fn add_bytes_from_backend(&self, n: u64, spliced: bool) {
        self.bytes_from_backend.fetch_add(n, Ordering::Relaxed);
        if spliced {
            self.spliced_from_backend.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The operator's state for this backend.
    pub(crate) fn admin_state(&self) -> AdminState {
        if self.drained.load(Ordering::Relaxed) {
            AdminState::Drained
        } else {
            AdminState::Ready
        }
    }

    /// Sets the operator's state; takes effect when the next snapshot is built.
    pub(crate) fn set_admin_state(&self, state: AdminState) {
        self.drained
            .store(state == AdminState::Drained, Ordering::Relaxed);
    }

    #[cfg(test)]
    /// What the live state makes of `configured`, the weight from the file: the effective
    /// weight strategies use.
    ///
    /// configured × (0 if unhealthy, starting or ejected) × slow-start ramp × load factor.
    /// Precedence: an operator's drain wins over everything; then health and ejection (a broken
    /// backend gets nothing, however idle it says it is); then the load factor, which only ever
    /// scales down to its floor and never to zero; then the configured weight.
    pub(crate) fn effective_weight(&self, configured: f64) -> f64 {
        self.effective_weight_at(configured, Instant::now())
    }

    /// [`effective_weight`](BackendState::effective_weight) as of `now`.
    pub(crate) fn effective_weight_at(&self, configured: f64, now: Instant) -> f64 {
        if self.admin_state() == AdminState::Drained {
            return 0.0;
        }
        self.with_health(|h| {
            if h.in_rotation(now) {
                configured * h.weight_factor(now)
            } else {
                0.0
            }
        })
    }

    /// The weight with only the operator's say applied: what `all_unhealthy = "route_anyway"`
    /// uses when no backend is healthy.
    pub(crate) fn admin_weight(&self, configured: f64) -> f64 {
        match self.admin_state() {
            AdminState::Drained => 0.0,
            AdminState::Ready => configured,
        }
    }

    /// True when health and passive ejection let the backend take connections at `now`.
    pub(crate) fn in_rotation_at(&self, now: Instant) -> bool {
        self.with_health(|h| h.in_rotation(now))
    }

    /// A copy of every counter.
    pub(crate) fn counters(&self) -> BackendCounters {
        BackendCounters {
            active: self.active(),
            connections: self.connections.load(Ordering::Relaxed),
            connect_failures: self.connect_failures.load(Ordering::Relaxed),
            bytes_to_backend: self.bytes_to_backend.load(Ordering::Relaxed),
            bytes_from_backend: self.bytes_from_backend.load(Ordering::Relaxed),
            spliced_to_backend: self.spliced_to_backend.load(Ordering::Relaxed),
            spliced_from_backend: self.spliced_from_backend.load(Ordering::Relaxed),
        }
    }
}

/// One connection counted in [`BackendState::active`]; the count drops with the guard, so no
/// early return or error path can leak it.
#[derive(Debug)]
#[must_use = "the connection is only counted while the guard lives"]
pub(crate) struct ActiveConn {
    stats: Arc<BackendState>,
}

impl ActiveConn {
    /// The backend's counters.
    pub(crate) fn stats(&self) -> &Arc<BackendState> {
        &self.stats
    }
}

impl Drop for ActiveConn {
    fn drop(&mut self) {
        // Sequentially consistent with the enqueue's count of waiting clients (see
        // `state::pool`); on x86 every read-modify-write is a full barrier anyway.
        self.stats.active.fetch_sub(1, Ordering::SeqCst);
        if let Some(pool) = &self.stats.pool {
            pool.count_open(false);
            note_freed(pool);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ListenerStats;

    #[test]
    fn active_count_follows_guards() {
        let stats = Arc::new(BackendState::default());
        let a = BackendState::acquire(&stats);
        let b = BackendState::acquire(&stats);
        assert_eq!(stats.active(), 2);
        drop(a);
        assert_eq!(stats.active(), 1);
        drop(b);
        assert_eq!(stats.active(), 0);
    }

    #[test]
    fn drain_zeroes_the_effective_weight_until_ready() {
        let state = BackendState::default();
        assert_eq!(state.effective_weight(2.5), 2.5);
        state.set_admin_state(AdminState::Drained);
        assert_eq!(state.effective_weight(2.5), 0.0);
        state.set_admin_state(AdminState::Ready);
        assert_eq!(state.effective_weight(2.5), 2.5);
    }

    #[tokio::test(start_paused = true)]
    async fn effective_weight_applies_drain_then_health_then_ramp_and_load() {
        use crate::health::HealthStatus;
        use std::time::Duration;

        let state = BackendState::default();
        let now = Instant::now();
        // A new backend is presumed healthy: full weight.
        assert_eq!(state.effective_weight_at(2.0, now), 2.0);
        state.with_health(|h| h.load_factor = 0.5);
        assert_eq!(state.effective_weight_at(2.0, now), 1.0);
        state.with_health(|h| h.start_ramp(now, Some(Duration::from_secs(20))));
        assert_eq!(state.effective_weight_at(2.0, now), 2.0 * 0.05 * 0.5);
        assert_eq!(
            state.effective_weight_at(2.0, now + Duration::from_secs(20)),
            1.0
        );
        // Unhealthy beats load and ramp; ejected likewise.
        state.with_health(|h| h.status = HealthStatus::Unhealthy);
        assert_eq!(state.effective_weight_at(2.0, now), 0.0);
        assert!(!state.in_rotation_at(now));
        state.with_health(|h| h.status = HealthStatus::Healthy);
        let ejected_for = state.with_health(|h| h.ejections.eject(now, Duration::from_secs(10)));
        assert_eq!(ejected_for, Duration::from_secs(10));
        assert_eq!(state.effective_weight_at(2.0, now), 0.0);
        assert!(state.health().ejected);
        // Ejection over: back (the ramp set above is over too).
        let later = now + Duration::from_secs(30);
        assert_eq!(state.effective_weight_at(2.0, later), 1.0);
        // Drain beats everything, and route_anyway's weight only knows drain.
        state.set_admin_state(AdminState::Drained);
        assert_eq!(state.effective_weight_at(2.0, later), 0.0);
        assert_eq!(state.admin_weight(2.0), 0.0);
        state.set_admin_state(AdminState::Ready);
        state.with_health(|h| h.status = HealthStatus::Unhealthy);
        assert_eq!(state.admin_weight(2.0), 2.0);
    }

    #[test]
    fn consecutive_failures_count_a_streak_that_a_connect_ends() {
        let state = BackendState::default();
        assert_eq!(state.record_connect_failure(), 1);
        assert_eq!(state.record_connect_failure(), 2);
        state.record_connected(Duration::ZERO);
        assert_eq!(state.consecutive_connect_failures(), 0);
        assert_eq!(state.record_connect_failure(), 1);
        assert_eq!(state.counters().connect_failures, 3);
    }

    #[test]
    fn all_unhealthy_transitions_are_counted_once() {
        let stats = ListenerStats::default();
        assert!(!stats.set_all_unhealthy(false));
        assert!(stats.set_all_unhealthy(true));
        assert!(!stats.set_all_unhealthy(true));
        assert!(stats.set_all_unhealthy(false));
        assert!(stats.set_all_unhealthy(true));
        let c = stats.counters();
        assert_eq!((c.all_unhealthy, c.all_unhealthy_episodes), (true, 2));
    }
}
