//! Live state of one listener: its counters, and the guard that counts a client connection
//! against `max_connections` while it lives.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::clients::ClientTable;
use super::histogram::{CONNECTION_DURATION_BOUNDS, Histogram};

/// Counters of one listener.
#[derive(Debug)]
pub(crate) struct ListenerStats {
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
    /// By [`Rejection`], in its order.
    rejected_queue: [AtomicU64; Rejection::ALL.len()],
    /// Per-client open connections and rates, for the per-client limits; empty without them.
    clients: Arc<ClientTable>,
}

/// Why a client was closed without a backend: at its pool's queue, or before any backend work
/// (its PROXY header, the allow/deny lists, its per-client limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejection {
    /// It waited `queue_timeout` without a slot.
    QueueTimeout,
    /// The queue held `max_queued` clients (or `queue_timeout` is 0).
    QueueFull,
    /// The balancer was stopping.
    Shutdown,
    /// A reload left its pool without a listener.
    PoolRemoved,
    /// Its PROXY header was missing, malformed, too long, late, or from an untrusted peer.
    BadProxyHeader,
    /// Its address is not allowed, or is denied.
    Denied,
    /// Its address had `max_connections_per_client` open.
    ClientLimit,
    /// Its address opened connections faster than `connection_rate_per_client`.
    ClientRate,
    /// Its TLS ClientHello was malformed, larger than 16 KiB, or not whole within
    /// `client_hello_timeout`.
    BadClientHello,
    /// No route matched its server name, and the listener has no default route.
    NoRoute,
}

impl Rejection {
    /// Every reason, in the order of the counters.
    pub(crate) const ALL: [Rejection; 10] = [
        Rejection::QueueTimeout,
        Rejection::QueueFull,
        Rejection::Shutdown,
        Rejection::PoolRemoved,
        Rejection::BadProxyHeader,
        Rejection::Denied,
        Rejection::ClientLimit,
        Rejection::ClientRate,
        Rejection::BadClientHello,
        Rejection::NoRoute,
    ];

    /// The `reason` label and access-log field.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Rejection::QueueTimeout => "queue_timeout",
            Rejection::QueueFull => "queue_full",
            Rejection::Shutdown => "shutdown",
            Rejection::PoolRemoved => "pool_removed",
            Rejection::BadProxyHeader => "bad_proxy_header",
            Rejection::Denied => "denied",
            Rejection::ClientLimit => "client_limit",
            Rejection::ClientRate => "client_rate",
            Rejection::BadClientHello => "bad_client_hello",
            Rejection::NoRoute => "no_route",
        }
    }
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
            rejected_queue: Default::default(),
            clients: Arc::new(ClientTable::new()),
        }
    }
}

/// A point-in-time copy of one listener's live counters.
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
    /// Closed after waiting `queue_timeout` for a slot.
    pub rejected_queue_timeout: u64,
    /// Closed at once because the pool's queue was full (or `queue_timeout` is 0).
    pub rejected_queue_full: u64,
    /// Closed while waiting for a slot because the balancer was stopping.
    pub rejected_shutdown: u64,
    /// Closed while waiting for a slot because a reload left the pool without a listener.
    pub rejected_pool_removed: u64,
    /// Closed before any backend work: no valid PROXY header in time, or one from an untrusted
    /// peer.
    pub rejected_bad_proxy_header: u64,
    /// Closed at once: the client's address is not allowed, or denied.
    pub rejected_denied: u64,
    /// Closed at once: the client's address had `max_connections_per_client` open.
    pub rejected_client_limit: u64,
    /// Closed at once: the client's address was over `connection_rate_per_client`.
    pub rejected_client_rate: u64,
    /// Closed before any backend work: its TLS ClientHello was malformed, over 16 KiB, or late.
    pub rejected_bad_client_hello: u64,
    /// Closed before any backend work: no route for its server name, and no default route.
    pub rejected_no_route: u64,
}

impl ListenerStats {
    /// Admits one more client connection unless `max` are open already.
    pub(crate) fn admit(this: &Arc<ListenerStats>, max: u64) -> Option<OpenConn> {
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
    pub(crate) fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Records a client closed because no backend could be reached.
    pub(crate) fn record_no_backend(&self) {
        self.rejected_no_backend.fetch_add(1, Ordering::Relaxed);
    }

    /// Records the start of one connect to a backend.
    pub(crate) fn record_connect_attempt(&self) {
        self.connect_attempts.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a connect to a backend that was refused, failed or timed out, or found no local port.
    pub(crate) fn record_connect_failure(&self) {
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Records how long an admitted client connection was open, from accept to close.
    pub(crate) fn record_duration(&self, open_for: Duration) {
        self.duration.record(open_for);
    }

    /// How long admitted client connections were open.
    pub(crate) fn duration(&self) -> &Histogram {
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
    pub(crate) fn record_routed_all_unhealthy(&self) {
        self.routed_all_unhealthy.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a client closed because no backend was healthy.
    pub(crate) fn record_rejected_all_unhealthy(&self) {
        self.rejected_all_unhealthy.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a client closed for `rejection`.
    pub(crate) fn record_rejected(&self, rejection: Rejection) {
        self.rejected_queue[rejection as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Its clients' open connections and rates.
    pub(crate) fn clients(&self) -> &Arc<ClientTable> {
        &self.clients
    }

    /// A copy of every counter.
    pub(crate) fn counters(&self) -> ListenerCounters {
        let queue = |r: Rejection| self.rejected_queue[r as usize].load(Ordering::Relaxed);
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
            rejected_queue_timeout: queue(Rejection::QueueTimeout),
            rejected_queue_full: queue(Rejection::QueueFull),
            rejected_shutdown: queue(Rejection::Shutdown),
            rejected_pool_removed: queue(Rejection::PoolRemoved),
            rejected_bad_proxy_header: queue(Rejection::BadProxyHeader),
            rejected_denied: queue(Rejection::Denied),
            rejected_client_limit: queue(Rejection::ClientLimit),
            rejected_client_rate: queue(Rejection::ClientRate),
            rejected_bad_client_hello: queue(Rejection::BadClientHello),
            rejected_no_route: queue(Rejection::NoRoute),
        }
    }
}

/// One client connection counted in [`ListenerStats`]'s open count until dropped.
#[derive(Debug)]
#[must_use = "the connection is only counted while the guard lives"]
pub(crate) struct OpenConn {
    stats: Arc<ListenerStats>,
    number: u64,
}

impl OpenConn {
    /// This connection's number among all the listener accepted since start (0 for the first).
    pub(crate) fn number(&self) -> u64 {
        self.number
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
