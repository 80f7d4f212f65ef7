//! Live state of backends and listeners: counters and states that outlive snapshots.
//!
//! A snapshot is rebuilt whenever weights change (a reload, a health result), but the number of
//! connections open to a backend does not change with it. So counters live here, in
//! reference-counted structs keyed by (listener name, backend address) in a [`Registry`]; every
//! snapshot built for the same key points at the same struct, and a connection keeps the struct it
//! started with alive until it ends, even if its backend has left the configuration meanwhile.
//!
//! The registry's map is touched only when a snapshot is built, never per connection: the data
//! path reaches counters through the snapshot's `Arc`s and updates them with relaxed atomics.
//! Health state sits behind a mutex of its own, which checkers, the control task and status
//! readers take; the connection path never does (its only health input, the consecutive
//! connect-failure count, is an atomic).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;

use crate::config::Config;
use crate::health::{Health, HealthState};
use crate::histogram::{CONNECT_TIME_BOUNDS, CONNECTION_DURATION_BOUNDS, Histogram};

/// Live state of one backend within one listener: its counters, and the states (set by an
/// operator, by health checks, by passive ejection, by reported load) that scale its configured
/// weight.
#[derive(Debug)]
pub struct BackendState {
    drained: AtomicBool,
    active: AtomicU64,
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

/// A point-in-time copy of [`BackendState`]'s counters.
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
    /// Counts one more connection assigned to this backend until the returned guard drops.
    ///
    /// Taken as soon as the backend is picked, before the connect: load-aware strategies must
    /// see connections in flight, or a burst would all pick the same idle backend.
    pub fn acquire(this: &Arc<BackendState>) -> ActiveConn {
        this.active.fetch_add(1, Ordering::Relaxed);
        ActiveConn {
            stats: Arc::clone(this),
        }
    }

    /// Connections currently assigned.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Records a successful connect that took `took`; ends a streak of failures.
    pub fn record_connected(&self, took: Duration) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.connect_time.record(took);
    }

    /// How long successful connects took.
    pub fn connect_time(&self) -> &Histogram {
        &self.connect_time
    }

    /// Records a failed connect attempt and returns the failures in a row it makes.
    pub fn record_connect_failure(&self) -> u64 {
        self.last_failure
            .store(ticks(std::time::Instant::now()), Ordering::Relaxed);
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Failed connects since the last successful one.
    pub fn consecutive_connect_failures(&self) -> u64 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Whether the latest connect to the backend failed, with no success since, less than
    /// `window` before `now`. Reads the clock only when there is a streak: `now` is filled in
    /// on first need, so a pick that asks about many backends reads it once at most.
    #[inline]
    pub fn failed_within(&self, now: &mut Option<std::time::Instant>, window: Duration) -> bool {
        if self.consecutive_failures.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let now = ticks(*now.get_or_insert_with(std::time::Instant::now));
        let since = now.saturating_sub(self.last_failure.load(Ordering::Relaxed));
        u128::from(since) < window.as_nanos()
    }

    /// Starts a new streak (the backend was just ejected for the current one).
    pub(crate) fn reset_consecutive_failures(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// A copy of the backend's health: status, ejection, latest probe, load, slow start.
    pub fn health(&self) -> Health {
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
    pub fn admin_state(&self) -> AdminState {
        if self.drained.load(Ordering::Relaxed) {
            AdminState::Drained
        } else {
            AdminState::Ready
        }
    }

    /// Sets the operator's state; takes effect when the next snapshot is built.
    pub fn set_admin_state(&self, state: AdminState) {
        self.drained
            .store(state == AdminState::Drained, Ordering::Relaxed);
    }

    /// What the live state makes of `configured`, the weight from the file: the effective
    /// weight strategies use.
    ///
    /// configured × (0 if unhealthy, starting or ejected) × slow-start ramp × load factor.
    /// Precedence: an operator's drain wins over everything; then health and ejection (a broken
    /// backend gets nothing, however idle it says it is); then the load factor, which only ever
    /// scales down to its floor and never to zero; then the configured weight.
    pub fn effective_weight(&self, configured: f64) -> f64 {
        self.effective_weight_at(configured, Instant::now())
    }

    /// [`effective_weight`](BackendState::effective_weight) as of `now`.
    pub fn effective_weight_at(&self, configured: f64, now: Instant) -> f64 {
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
    pub fn admin_weight(&self, configured: f64) -> f64 {
        match self.admin_state() {
            AdminState::Drained => 0.0,
            AdminState::Ready => configured,
        }
    }

    /// True when health and passive ejection let the backend take connections at `now`.
    pub fn in_rotation_at(&self, now: Instant) -> bool {
        self.with_health(|h| h.in_rotation(now))
    }

    /// A copy of every counter.
    pub fn counters(&self) -> BackendCounters {
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
pub struct ActiveConn {
    stats: Arc<BackendState>,
}

impl ActiveConn {
    /// The backend's counters.
    pub fn stats(&self) -> &Arc<BackendState> {
        &self.stats
    }
}

impl Drop for ActiveConn {
    fn drop(&mut self) {
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counters of one listener.
#[derive(Debug)]
pub struct ListenerStats {
    open: AtomicU64,
    accepted: AtomicU64,
    rejected_max_connections: AtomicU64,
    rejected_no_backend: AtomicU64,
    connect_attempts: AtomicU64,
    connect_failures: AtomicU64,
    duration: Histogram,
    all_unhealthy: AtomicBool,
    all_unhealthy_episodes: AtomicU64,
    routed_all_unhealthy: AtomicU64,
    rejected_all_unhealthy: AtomicU64,
}

impl Default for ListenerStats {
    fn default() -> ListenerStats {
        ListenerStats {
            open: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            rejected_max_connections: AtomicU64::new(0),
            rejected_no_backend: AtomicU64::new(0),
            connect_attempts: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            duration: Histogram::new(CONNECTION_DURATION_BOUNDS),
            all_unhealthy: AtomicBool::new(false),
            all_unhealthy_episodes: AtomicU64::new(0),
            routed_all_unhealthy: AtomicU64::new(0),
            rejected_all_unhealthy: AtomicU64::new(0),
        }
    }
}

/// A point-in-time copy of [`ListenerStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListenerCounters {
    /// Client connections open now.
    pub open: u64,
    /// Client connections accepted since start (including rejected ones).
    pub accepted: u64,
    /// Client connections closed at once because `max_connections` were open.
    pub rejected_max_connections: u64,
    /// Client connections closed because no backend could be reached.
    pub rejected_no_backend: u64,
    /// Connects to backends started, over all backends (retries included).
    pub connect_attempts: u64,
    /// Of those, the ones refused, failed or timed out, or with no local port left.
    pub connect_failures: u64,
    /// True while no backend is healthy (or every one is ejected).
    pub all_unhealthy: bool,
    /// Times the listener entered that state.
    pub all_unhealthy_episodes: u64,
    /// Client connections routed while no backend was healthy (`all_unhealthy = "route_anyway"`).
    pub routed_all_unhealthy: u64,
    /// Client connections closed because no backend was healthy (`all_unhealthy = "reject"`).
    pub rejected_all_unhealthy: u64,
}

impl ListenerStats {
    /// Admits one more client connection unless `max` are open already.
    pub fn admit(this: &Arc<ListenerStats>, max: u64) -> Option<OpenConn> {
        let number = this.accepted.fetch_add(1, Ordering::Relaxed);
        let admitted = this
            .open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |open| {
                (open < max).then_some(open + 1)
            })
            .is_ok();
        if admitted {
            Some(OpenConn {
                stats: Arc::clone(this),
                number,
            })
        } else {
            this.rejected_max_connections
                .fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// Client connections accepted so far: the number the next one will get.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Records a client closed because no backend could be reached.
    pub fn record_no_backend(&self) {
        self.rejected_no_backend.fetch_add(1, Ordering::Relaxed);
    }

    /// Records the start of one connect to a backend.
    pub fn record_connect_attempt(&self) {
        self.connect_attempts.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a connect to a backend that was refused, failed or timed out, or found no local port.
    pub fn record_connect_failure(&self) {
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Records how long an admitted client connection was open, from accept to close.
    pub fn record_duration(&self, open_for: Duration) {
        self.duration.record(open_for);
    }

    /// How long admitted client connections were open.
    pub fn duration(&self) -> &Histogram {
        &self.duration
    }

    /// Records whether no backend is healthy now; true when that changed. Only snapshot builds
    /// (the control task) call it, so each change is seen, logged and counted once.
    pub(crate) fn set_all_unhealthy(&self, all_unhealthy: bool) -> bool {
        let before = self.all_unhealthy.swap(all_unhealthy, Ordering::Relaxed);
        if all_unhealthy && !before {
            self.all_unhealthy_episodes.fetch_add(1, Ordering::Relaxed);
        }
        before != all_unhealthy
    }

    /// Records a client routed while no backend was healthy.
    pub fn record_routed_all_unhealthy(&self) {
        self.routed_all_unhealthy.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a client closed because no backend was healthy.
    pub fn record_rejected_all_unhealthy(&self) {
        self.rejected_all_unhealthy.fetch_add(1, Ordering::Relaxed);
    }

    /// A copy of every counter.
    pub fn counters(&self) -> ListenerCounters {
        ListenerCounters {
            open: self.open.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
            rejected_max_connections: self.rejected_max_connections.load(Ordering::Relaxed),
            rejected_no_backend: self.rejected_no_backend.load(Ordering::Relaxed),
            connect_attempts: self.connect_attempts.load(Ordering::Relaxed),
            connect_failures: self.connect_failures.load(Ordering::Relaxed),
            all_unhealthy: self.all_unhealthy.load(Ordering::Relaxed),
            all_unhealthy_episodes: self.all_unhealthy_episodes.load(Ordering::Relaxed),
            routed_all_unhealthy: self.routed_all_unhealthy.load(Ordering::Relaxed),
            rejected_all_unhealthy: self.rejected_all_unhealthy.load(Ordering::Relaxed),
        }
    }
}

/// One client connection counted in [`ListenerStats`]'s open count until dropped.
#[derive(Debug)]
#[must_use = "the connection is only counted while the guard lives"]
pub struct OpenConn {
    stats: Arc<ListenerStats>,
    number: u64,
}

impl OpenConn {
    /// This connection's number among all the listener accepted since start (0 for the first).
    pub fn number(&self) -> u64 {
        self.number
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Asks the control task to rebuild the snapshot because live state changed.
///
/// A flag plus a wake-up on a channel of capacity one: both lock-free and never waiting, so the
/// connection path may call it (passive ejection does). No change is lost: when the channel is
/// full a wake-up is already pending, and the control task reads the flag when it wakes.
#[derive(Debug, Clone, Default)]
pub struct Republisher {
    dirty: Arc<AtomicBool>,
    wake: Option<mpsc::Sender<()>>,
}

impl Republisher {
    /// A republisher and the receiver its wake-ups arrive on.
    pub(crate) fn new() -> (Republisher, mpsc::Receiver<()>) {
        let (wake, woken) = mpsc::channel(1);
        let republisher = Republisher {
            dirty: Arc::new(AtomicBool::new(false)),
            wake: Some(wake),
        };
        (republisher, woken)
    }

    /// Marks live state as changed and wakes the control task.
    pub fn republish(&self) {
        self.dirty.store(true, Ordering::Release);
        if let Some(wake) = &self.wake {
            match wake.try_send(()) {
                // Full: a wake-up is pending already. Closed: the balancer has stopped.
                Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Closed(())) => {}
            }
        }
    }

    /// True (once) if a republish was asked for since the last call.
    pub(crate) fn take(&self) -> bool {
        self.dirty.swap(false, Ordering::AcqRel)
    }
}

/// Where live state is found by name when a snapshot is built.
///
/// Holds a mutex, taken by snapshot builds (start, reload, health changes) and by `/status`
/// and `/metrics` for the removed backends still carrying connections; the connection path
/// never takes it.
#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<RegistryInner>,
    republisher: Republisher,
}

/// A backend the running configuration no longer has that still carries connections (see
/// [`Registry::removed_with_connections`]).
#[derive(Debug, Clone)]
pub struct RemovedBackend {
    /// The listener it was removed from.
    pub listener: Arc<str>,
    /// Its address.
    pub addr: SocketAddr,
    /// Its live state, the counters of its remaining connections included.
    pub state: Arc<BackendState>,
}

#[derive(Debug, Default)]
struct RegistryInner {
    listeners: HashMap<String, Arc<ListenerStats>>,
    backends: HashMap<(String, SocketAddr), Arc<BackendState>>,
}

impl Registry {
    /// A registry whose snapshots' pools can wake the control task through `republisher`.
    pub(crate) fn with_republisher(republisher: Republisher) -> Registry {
        Registry {
            inner: Mutex::default(),
            republisher,
        }
    }

    /// The republisher pools hand to the connection path.
    pub fn republisher(&self) -> &Republisher {
        &self.republisher
    }

    /// The stats of listener `name`, created on first use.
    pub fn listener(&self, name: &str) -> Arc<ListenerStats> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(inner.listeners.entry(name.to_owned()).or_default())
    }

    /// The stats of backend `addr` in listener `listener`, created on first use.
    pub fn backend(&self, listener: &str, addr: SocketAddr) -> Arc<BackendState> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            inner
                .backends
                .entry((listener.to_owned(), addr))
                .or_default(),
        )
    }

    /// Forgets the state of listeners and backends that `config` no longer has and that nothing
    /// else refers to. State still referenced (by an open connection, or an older snapshot that
    /// one holds) is kept, so a backend removed and re-added while its connections are open finds
    /// its counters again. Its drain is not kept: that was the operator's word about the backend
    /// as configured, and one removed, upgraded and added back is expected in rotation.
    pub fn retain(&self, config: &Config) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.listeners.retain(|name, stats| {
            Arc::strong_count(stats) > 1 || config.listeners.iter().any(|l| &l.name == name)
        });
        inner.backends.retain(|(listener, addr), stats| {
            let configured = config
                .listeners
                .iter()
                .any(|l| &l.name == listener && l.backends.iter().any(|b| b.addr == *addr));
            if !configured {
                stats.set_admin_state(AdminState::Ready);
            }
            configured || Arc::strong_count(stats) > 1
        });
    }

    /// The backends for which `configured` is false that still carry connections, in
    /// (listener, address) order: a reload removed them (or their listener) and their
    /// connections go on. `/metrics` and `/status` show them until the last one ends.
    pub fn removed_with_connections(
        &self,
        configured: impl Fn(&str, SocketAddr) -> bool,
    ) -> Vec<RemovedBackend> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut removed: Vec<RemovedBackend> = inner
            .backends
            .iter()
            .filter(|((listener, addr), state)| state.active() > 0 && !configured(listener, *addr))
            .map(|((listener, addr), state)| RemovedBackend {
                listener: Arc::from(listener.as_str()),
                addr: *addr,
                state: Arc::clone(state),
            })
            .collect();
        drop(inner);
        removed.sort_by(|a, b| (&a.listener, a.addr).cmp(&(&b.listener, b.addr)));
        removed
    }

    /// How many listener and backend entries are kept.
    pub fn len(&self) -> (usize, usize) {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        (inner.listeners.len(), inner.backends.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn admit_stops_at_the_limit_and_counts_rejections() {
        let stats = Arc::new(ListenerStats::default());
        let held: Vec<_> = (0..3)
            .filter_map(|_| ListenerStats::admit(&stats, 3))
            .collect();
        assert_eq!(held.len(), 3);
        assert!(ListenerStats::admit(&stats, 3).is_none());
        drop(held);
        assert!(ListenerStats::admit(&stats, 3).is_some());
        let c = stats.counters();
        assert_eq!((c.accepted, c.rejected_max_connections, c.open), (5, 1, 0));
    }

    #[test]
    fn registry_returns_the_same_state_for_the_same_key() {
        let registry = Registry::default();
        let addr: SocketAddr = "127.0.0.1:9001".parse().expect("literal");
        let a = registry.backend("chat", addr);
        let b = registry.backend("chat", addr);
        let c = registry.backend("embed", addr);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
    }

    #[test]
    fn a_removed_backend_keeps_its_counters_while_referenced_but_not_its_drain() {
        let config = |backends: &[&str]| {
            let mut text = "[[listener]]\nname = \"chat\"\nbind = \"127.0.0.1:0\"\n".to_owned();
            for b in backends {
                text.push_str(&format!("[[listener.backend]]\naddr = \"{b}\"\n"));
            }
            crate::config::parse(&text, std::path::Path::new("t.toml")).expect("valid")
        };
        let registry = Registry::default();
        let kept: SocketAddr = "127.0.0.1:9001".parse().expect("literal");
        let removed: SocketAddr = "127.0.0.1:9002".parse().expect("literal");
        let (k, r) = (
            registry.backend("chat", kept),
            registry.backend("chat", removed),
        );
        k.set_admin_state(AdminState::Drained);
        r.set_admin_state(AdminState::Drained);
        let open = BackendState::acquire(&r);

        registry.retain(&config(&["127.0.0.1:9001"]));
        assert_eq!(registry.len().1, 2, "an open connection keeps the state");
        assert_eq!(k.admin_state(), AdminState::Drained, "still configured");
        assert_eq!(
            r.admin_state(),
            AdminState::Ready,
            "removed: its drain is gone"
        );
        assert!(Arc::ptr_eq(&registry.backend("chat", removed), &r));
        assert_eq!(r.active(), 1);

        drop((open, r));
        registry.retain(&config(&["127.0.0.1:9001"]));
        assert_eq!(registry.len().1, 1, "nothing refers to it any more");
    }
}
