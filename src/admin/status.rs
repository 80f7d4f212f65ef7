//! `GET /status`: the running snapshot and its live state as JSON.
//!
//! Built per request from one snapshot load and the atomics behind it; nothing is cached, so the
//! answer is as fresh as a connection's view.

use std::time::SystemTime;

use serde::Serialize;

use super::Endpoint;
use crate::health::Health;
use crate::snapshot::{Backend, Listener, Pool};
use crate::state::{BackendCounters, ListenerCounters};

/// The whole answer.
#[derive(Debug, Serialize)]
pub(super) struct Status {
    /// The balancer's version.
    version: &'static str,
    /// The file reloads read, if the balancer was started from one.
    config_file: Option<String>,
    /// RFC 3339, UTC: when the balancer started running.
    started_at: String,
    /// Seconds since then, to the millisecond.
    uptime_seconds: f64,
    /// Open client connections on each worker thread, in worker order.
    worker_connections: Vec<usize>,
    reloads: Reloads,
    listeners: Vec<ListenerStatus>,
    /// Every pool, the listeners' own included, with its queue and backends.
    pools: Vec<PoolStatus>,
    /// Backends a reload removed (with their pool, or from it) that still carry connections:
    /// those go on until they end, and are listed here until the last one has.
    removed_backends: Vec<RemovedStatus>,
    /// Every backend name the pools resolve, with what it resolved to.
    names: Vec<NameStatusJson>,
}

#[derive(Debug, Serialize)]
struct NameStatusJson {
    /// `host:port`, or `srv:` and the SRV name, as the backends it gave show it.
    name: String,
    /// The addresses in force: the last good answer, kept through failures.
    addresses: Vec<String>,
    /// RFC 3339, UTC: when the last good answer came; `null` before the first.
    resolved_at: Option<String>,
    /// Why the latest resolution failed (`timeout`, `nxdomain`, `servfail`, `refused`,
    /// `empty`, ...); `null` when it succeeded.
    failing: Option<&'static str>,
    /// Failed resolutions by reason.
    failures: std::collections::BTreeMap<&'static str, u64>,
}

#[derive(Debug, Serialize)]
struct RemovedStatus {
    pool: String,
    /// The pool's name again, as before pools were named apart (a listener's own pool has
    /// its name).
    listener: String,
    addr: String,
    active_connections: u64,
    #[serde(flatten)]
    counters: BackendTotals,
}

#[derive(Debug, Serialize)]
struct Reloads {
    succeeded: u64,
    failed: u64,
    /// The latest reload; `null` before the first.
    last: Option<LastReload>,
}

#[derive(Debug, Serialize)]
struct LastReload {
    ok: bool,
    /// RFC 3339, UTC.
    at: String,
    /// What changed, or why the file was refused.
    message: String,
}

#[derive(Debug, Serialize)]
struct ListenerStatus {
    name: String,
    /// The address actually bound (port 0 resolved).
    bind: Option<String>,
    /// The pool its connections go to (its own has its name); absent for a listener that
    /// routes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pool: Option<String>,
    /// The pool's strategy; absent for a listener that routes.
    #[serde(skip_serializing_if = "Option::is_none")]
    strategy: Option<String>,
    /// Its routes, in order, for a listener that routes by server name.
    #[serde(skip_serializing_if = "Option::is_none")]
    routes: Option<Vec<RouteStatus>>,
    max_connections: usize,
    /// `null`: the system's.
    backend_congestion_control: Option<String>,
    connections: ListenerConnections,
    /// Client addresses the per-client limits track now (0 without them).
    tracked_clients: usize,
    /// The pool's backends, as under `pools` (none for a listener that routes: see its pools).
    backends: Vec<BackendStatus>,
}

/// One route of a listener.
#[derive(Debug, Serialize)]
struct RouteStatus {
    /// Server names and wildcards; empty for the default route.
    sni: Vec<String>,
    pool: String,
}

#[derive(Debug, Serialize)]
struct PoolStatus {
    name: String,
    /// A listener's own pool, written inline in its `[[listener]]` table.
    inline: bool,
    /// The listeners that send their connections here.
    listeners: Vec<String>,
    strategy: String,
    /// `consistent_hash` only: `client_ip` or `sni`.
    #[serde(skip_serializing_if = "Option::is_none")]
    hash_key: Option<&'static str>,
    /// `consistent_hash` only: 0 for no bound.
    #[serde(skip_serializing_if = "Option::is_none")]
    hash_balance_factor: Option<f64>,
    /// Seconds a client may wait for a slot.
    queue_timeout: f64,
    max_queued: usize,
    queue: QueueStatus,
    backends: Vec<BackendStatus>,
}

/// A pool's queue: waiting now, and what became of the clients that waited since start.
#[derive(Debug, Serialize)]
struct QueueStatus {
    /// Clients waiting now.
    length: u64,
    queued: u64,
    served: u64,
    timed_out: u64,
    full: u64,
    abandoned: u64,
    closed: u64,
}

#[derive(Debug, Serialize)]
struct BackendStatus {
    addr: String,
    /// From the file.
    weight: f64,
    /// What the strategy uses: 0 while drained (or, with health checks, unhealthy).
    effective_weight: f64,
    /// `ready` or `drained`.
    admin_state: &'static str,
    health: HealthStatus,
    active_connections: u64,
    /// Slots; `null`: no limit.
    max_connections: Option<u32>,
    /// Connections open from here, plus the load the server last reported beyond them: what
    /// fills slots and what `capacity_proportional` ranks by.
    load_estimate: u64,
    /// Requests in flight the server reported at its last fresh scrape; `null` without one.
    reported_in_flight: Option<u64>,
    /// The backend name it was resolved from; absent for an address written in the file.
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(flatten)]
    counters: BackendTotals,
}

#[derive(Debug, Serialize)]
struct BackendTotals {
    connections_total: u64,
    connect_failures: u64,
    bytes_to_backend: u64,
    bytes_from_backend: u64,
}

#[derive(Debug, Serialize)]
struct HealthStatus {
    /// In rotation: the checks pass and passive ejection does not keep it out.
    healthy: bool,
    /// `healthy`, `starting` or `unhealthy`: what the active checks say.
    status: &'static str,
    ejected: bool,
    /// `passed`, or why the check failed (`http 503`, `timeout after 2s`, ...); `null` until
    /// an active check has run.
    last_check: Option<String>,
    /// RFC 3339, UTC; `null` until an active check has run.
    last_check_at: Option<String>,
    /// The load factor in force (1 without `[listener.health.load]`).
    load_factor: f64,
    /// Share of the weight while a slow-start ramp runs; `null` otherwise.
    slow_start: Option<f64>,
}

/// A listener's counters since start.
#[derive(Debug, Serialize)]
struct ListenerConnections {
    /// Client connections open now.
    open: u64,
    accepted: u64,
    rejected_max_connections: u64,
    rejected_no_backend: u64,
    connect_attempts: u64,
    connect_failures: u64,
    /// No backend is healthy now: `all_unhealthy` applies.
    all_unhealthy: bool,
    /// Times the listener entered that state.
    all_unhealthy_episodes: u64,
    /// Clients routed while no backend was healthy (`all_unhealthy = "route_anyway"`).
    routed_all_unhealthy: u64,
    /// Clients closed because no backend was healthy (`all_unhealthy = "reject"`).
    rejected_all_unhealthy: u64,
    /// Clients closed after waiting `queue_timeout` for a slot.
    rejected_queue_timeout: u64,
    /// Clients closed at once because their pool's queue was full.
    rejected_queue_full: u64,
    /// Waiting clients closed because the balancer was stopping.
    rejected_shutdown: u64,
    /// Waiting clients closed because a reload left their pool without a listener.
    rejected_pool_removed: u64,
    rejected_bad_proxy_header: u64,
    rejected_denied: u64,
    rejected_client_limit: u64,
    rejected_client_rate: u64,
    rejected_bad_client_hello: u64,
    rejected_no_route: u64,
}

impl From<ListenerCounters> for ListenerConnections {
    fn from(c: ListenerCounters) -> ListenerConnections {
        ListenerConnections {
            open: c.open,
            accepted: c.accepted,
            rejected_max_connections: c.rejected_max_connections,
            rejected_no_backend: c.rejected_no_backend,
            connect_attempts: c.connect_attempts,
            connect_failures: c.connect_failures,
            all_unhealthy: c.all_unhealthy,
            all_unhealthy_episodes: c.all_unhealthy_episodes,
            routed_all_unhealthy: c.routed_all_unhealthy,
            rejected_all_unhealthy: c.rejected_all_unhealthy,
            rejected_queue_timeout: c.rejected_queue_timeout,
            rejected_queue_full: c.rejected_queue_full,
            rejected_shutdown: c.rejected_shutdown,
            rejected_pool_removed: c.rejected_pool_removed,
            rejected_bad_proxy_header: c.rejected_bad_proxy_header,
            rejected_denied: c.rejected_denied,
            rejected_client_limit: c.rejected_client_limit,
            rejected_client_rate: c.rejected_client_rate,
            rejected_bad_client_hello: c.rejected_bad_client_hello,
            rejected_no_route: c.rejected_no_route,
        }
    }
}

impl Status {
    /// The status as of now.
    pub(super) fn of(endpoint: &Endpoint) -> Status {
        let handle = &endpoint.handle;
        let snapshot = handle.snapshot();
        let reloads = handle.reload_counters();
        Status {
            version: env!("CARGO_PKG_VERSION"),
            config_file: endpoint
                .config_path
                .as_ref()
                .map(|p| p.display().to_string()),
            started_at: rfc3339(endpoint.started.wall),
            uptime_seconds: (endpoint.started.at.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
            worker_connections: handle.worker_connections(),
            reloads: Reloads {
                succeeded: reloads.succeeded,
                failed: reloads.failed,
                last: reloads.last.map(|last| LastReload {
                    ok: last.ok,
                    at: rfc3339(last.at),
                    message: last.message,
                }),
            },
            listeners: snapshot
                .listeners()
                .map(|l| ListenerStatus::of(l))
                .collect(),
            pools: snapshot.pools().map(|p| PoolStatus::of(p)).collect(),
            removed_backends: handle
                .removed_backends(&snapshot)
                .iter()
                .map(|r| {
                    let (active_connections, counters) = BackendTotals::of(r.state.counters());
                    RemovedStatus {
                        pool: r.pool.to_string(),
                        listener: r.pool.to_string(),
                        addr: r.addr.to_string(),
                        active_connections,
                        counters,
                    }
                })
                .collect(),
            names: handle
                .names()
                .into_iter()
                .map(|(target, status)| NameStatusJson {
                    name: target.to_string(),
                    addresses: status.addresses.iter().map(ToString::to_string).collect(),
                    resolved_at: status.resolved_at.map(rfc3339),
                    failing: status.failing,
                    failures: status.failures,
                })
                .collect(),
        }
    }
}

impl ListenerStatus {
    fn of(listener: &Listener) -> ListenerStatus {
        let pool = listener.single_pool();
        ListenerStatus {
            name: listener.name().to_string(),
            bind: listener.local_addr().map(|a| a.to_string()),
            pool: pool.map(|p| p.name().to_string()),
            strategy: pool.map(|p| p.strategy_name().to_owned()),
            routes: listener.routes().map(|table| {
                (table.described.iter())
                    .map(|(sni, pool)| RouteStatus {
                        sni: sni.clone(),
                        pool: pool.to_string(),
                    })
                    .collect()
            }),
            max_connections: listener.settings().max_connections.get(),
            backend_congestion_control: listener
                .settings()
                .backend_congestion_control
                .map(|cc| cc.to_string()),
            connections: listener.stats().counters().into(),
            tracked_clients: listener.stats().clients().tracked(),
            backends: pool.map_or_else(Vec::new, |p| {
                p.backends().iter().map(BackendStatus::of).collect()
            }),
        }
    }
}

impl PoolStatus {
    fn of(pool: &Pool) -> PoolStatus {
        let q = pool.state().counters();
        PoolStatus {
            name: pool.name().to_string(),
            inline: pool.inline(),
            listeners: pool.listeners().iter().map(|l| l.to_string()).collect(),
            strategy: pool.strategy_name().to_owned(),
            hash_key: pool.affinity().map(|a| a.key.as_str()),
            hash_balance_factor: pool.affinity().map(|a| a.balance_factor),
            queue_timeout: pool.settings().queue_timeout.as_secs_f64(),
            max_queued: pool.settings().max_queued,
            queue: QueueStatus {
                length: q.length,
                queued: q.queued,
                served: q.served,
                timed_out: q.timed_out,
                full: q.full,
                abandoned: q.abandoned,
                closed: q.closed,
            },
            backends: pool.backends().iter().map(BackendStatus::of).collect(),
        }
    }
}

impl BackendStatus {
    fn of(backend: &Backend) -> BackendStatus {
        let (active, counters) = BackendTotals::of(backend.stats.counters());
        BackendStatus {
            addr: backend.addr.to_string(),
            weight: backend.weight.get(),
            effective_weight: rounded(backend.effective_weight),
            admin_state: backend.stats.admin_state().as_str(),
            health: HealthStatus::of(backend.stats.health()),
            active_connections: active,
            max_connections: backend.max_connections.map(|m| m.get()),
            load_estimate: backend.stats.load_estimate(),
            reported_in_flight: backend.stats.reported_in_flight(),
            name: backend.name.as_deref().map(str::to_owned),
            counters,
        }
    }
}

impl BackendTotals {
    /// (Connections open now, the totals) of `counters`.
    fn of(counters: BackendCounters) -> (u64, BackendTotals) {
        let BackendCounters {
            active,
            connections,
            connect_failures,
            bytes_to_backend,
            bytes_from_backend,
            ..
        } = counters;
        let totals = BackendTotals {
            connections_total: connections,
            connect_failures,
            bytes_to_backend,
            bytes_from_backend,
        };
        (active, totals)
    }
}

impl HealthStatus {
    fn of(health: Health) -> HealthStatus {
        // Health keeps monotonic instants; status shows wall-clock time.
        let (now, wall) = (tokio::time::Instant::now(), SystemTime::now());
        HealthStatus {
            healthy: health.in_rotation(),
            status: health.status.as_str(),
            ejected: health.ejected,
            last_check: health.last_check.map(|c| match c.result {
                Ok(()) => "passed".to_owned(),
                Err(e) => e.to_string(),
            }),
            last_check_at: health
                .last_check
                .map(|c| rfc3339(wall - now.saturating_duration_since(c.at))),
            load_factor: rounded(health.load_factor),
            slow_start: health.slow_start.map(rounded),
        }
    }
}

/// `x` to twelve significant digits, for people reading status: a weight of 1.5 at a load
/// factor of 0.2 reads 0.3, not the 0.30000000000000004 of the exact product. Significant
/// digits rather than decimals, so that a small positive weight never reads as 0 (drained).
/// The strategies use the exact figures.
fn rounded(x: f64) -> f64 {
    format!("{x:.11e}").parse().unwrap_or(x)
}

/// `2025-01-02T03:04:05Z`: seconds are precise enough for an operator reading status.
fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::rounded;

    #[test]
    fn products_of_weights_and_factors_read_as_written() {
        assert_eq!(rounded(1.5 * 0.2), 0.3);
        assert_eq!(rounded(0.1 + 0.2), 0.3);
        assert_eq!(rounded(2.5), 2.5);
        assert_eq!(rounded(0.0), 0.0);
        assert_eq!(rounded(1.0 / 3.0), 0.333333333333);
        assert_eq!(rounded(5e-8 * 3.0), 1.5e-7, "small stays positive");
        assert_eq!(rounded(1e308), 1e308);
        assert!(rounded(f64::NAN).is_nan());
    }
}
