//! `GET /status`: the running snapshot and its live state as JSON.
//!
//! Built per request from one snapshot load and the atomics behind it; nothing is cached, so the
//! answer is as fresh as a connection's view.

use std::time::SystemTime;

use serde::Serialize;

use super::Endpoint;
use crate::health::Health;
use crate::snapshot::{Backend, Pool};
use crate::state::{BackendCounters, ListenerCounters};

/// The whole answer.
#[derive(Debug, Serialize)]
pub(super) struct Status {
    /// The balancer's version.
    version: &'static str,
    /// The file reloads read, if the balancer was started from one.
    config_file: Option<String>,
    /// Open client connections on each worker thread, in worker order.
    worker_connections: Vec<usize>,
    reloads: Reloads,
    listeners: Vec<ListenerStatus>,
    /// Backends a reload removed (with their listener, or from it) that still carry
    /// connections: those go on until they end, and are listed here until the last one has.
    removed_backends: Vec<RemovedStatus>,
}

#[derive(Debug, Serialize)]
struct RemovedStatus {
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
    strategy: String,
    max_connections: usize,
    /// `null`: the system's.
    backend_congestion_control: Option<String>,
    connections: ListenerConnections,
    backends: Vec<BackendStatus>,
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
            listeners: snapshot.pools().map(|p| ListenerStatus::of(p)).collect(),
            removed_backends: handle
                .removed_backends(&snapshot)
                .iter()
                .map(|r| {
                    let (active_connections, counters) = BackendTotals::of(r.state.counters());
                    RemovedStatus {
                        listener: r.listener.to_string(),
                        addr: r.addr.to_string(),
                        active_connections,
                        counters,
                    }
                })
                .collect(),
        }
    }
}

impl ListenerStatus {
    fn of(pool: &Pool) -> ListenerStatus {
        ListenerStatus {
            name: pool.name().to_string(),
            bind: pool.local_addr().map(|a| a.to_string()),
            strategy: pool.strategy_name().to_owned(),
            max_connections: pool.settings().max_connections.get(),
            backend_congestion_control: pool
                .settings()
                .backend_congestion_control
                .map(|cc| cc.to_string()),
            connections: pool.stats().counters().into(),
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
