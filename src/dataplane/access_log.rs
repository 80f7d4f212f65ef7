//! The access log: one line per client connection, when it ends, under its own `tracing`
//! target. The field names are documented in docs/observability.md.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use crate::snapshot::Listener;
use crate::state::Rejection;

/// The `tracing` target of access log lines, so a filter such as `weighbridge::access=off` or a
/// log shipper can tell them from the balancer's own lines.
pub const ACCESS_LOG_TARGET: &str = "weighbridge::access";

/// How a client connection ended: the `end` field of its access log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The client finished sending first; then both directions reached end of stream.
    ClientClosed,
    /// The backend finished sending first; then both directions reached end of stream.
    BackendClosed,
    /// Nothing moved for `idle_timeout`.
    IdleTimeout,
    /// No backend could be reached within `connect_attempts` (the line says how many were
    /// tried; 0 when every backend has weight 0).
    ConnectFailed,
    /// Closed without a backend: `max_connections` were open, no backend was healthy under
    /// `all_unhealthy = "reject"`, or no slot came free in time (the line's `reason` says which).
    Rejected,
    /// Shutdown's grace period ran out.
    ShutDown,
    /// A read or write failed (reset, broken pipe, ...).
    Error,
}

impl End {
    /// The name the access log uses.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            End::ClientClosed => "client_closed",
            End::BackendClosed => "backend_closed",
            End::IdleTimeout => "idle_timeout",
            End::ConnectFailed => "connect_failed",
            End::Rejected => "rejected",
            End::ShutDown => "shutdown",
            End::Error => "error",
        }
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a client was closed without a backend: the access log's `reason`, and the `reason`
/// label of `weighbridge_connections_rejected_total`. One byte in every connection, where a
/// string would take sixteen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// `max_connections` were open.
    MaxConnections,
    /// No backend was healthy, under `all_unhealthy = "reject"`.
    AllUnhealthy,
    /// No slot came free for it (see [`Rejection`]).
    Queue(Rejection),
}

impl Reason {
    /// The name the access log uses.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::MaxConnections => "max_connections",
            Reason::AllUnhealthy => "all_unhealthy",
            Reason::Queue(rejection) => rejection.as_str(),
        }
    }
}

/// Logs the access line of a client connection refused because `max_connections` were open.
/// Called by the accept loop, which refuses before a connection exists.
pub(crate) fn log_rejected(listener: &Listener, peer: SocketAddr) {
    if !listener.settings().access_log {
        return;
    }
    let mut line = AccessLine::new(peer, listener, End::Rejected);
    line.reason = Some(Reason::MaxConnections);
    line.log(Duration::ZERO);
}

/// What the access log says about one client connection.
#[derive(Debug)]
pub(super) struct AccessLine {
    pub(super) client: SocketAddr,
    pub(super) listener: Arc<str>,
    pub(super) backend: Option<SocketAddr>,
    /// From accept until the backend accepted, retries included: what the client waited.
    pub(super) connect_time: Option<Duration>,
    /// Of that, the microseconds spent in the pool's queue waiting for a slot (saturating at
    /// 71 minutes); 0 if it never waited. Four bytes in the padding beside `attempts`, where a
    /// `Duration` would add 16 to every connection.
    pub(super) queued_us: u32,
    /// Connects tried (1 unless a backend refused or timed out).
    pub(super) attempts: u32,
    /// Client to backend.
    pub(super) bytes_up: u64,
    /// Backend to client.
    pub(super) bytes_down: u64,
    pub(super) end: End,
    /// Why a rejected connection was rejected: the `reason` label of
    /// `weighbridge_connections_rejected_total`.
    pub(super) reason: Option<Reason>,
    pub(super) error: Option<String>,
    /// The listener's `access_log` setting.
    pub(super) enabled: bool,
}

impl AccessLine {
    /// The line of a connection from `client` to `listener`, with nothing known yet but how it
    /// ends if nothing else happens.
    pub(super) fn new(client: SocketAddr, listener: &Listener, end: End) -> AccessLine {
        AccessLine {
            client,
            listener: Arc::clone(listener.name()),
            backend: None,
            connect_time: None,
            queued_us: 0,
            attempts: 0,
            bytes_up: 0,
            bytes_down: 0,
            end,
            reason: None,
            error: None,
            enabled: listener.settings().access_log,
        }
    }

    /// Records that the client waited `waited` for a slot.
    pub(super) fn set_queued(&mut self, waited: Duration) {
        self.queued_us = u32::try_from(waited.as_micros()).unwrap_or(u32::MAX).max(1);
    }

    /// One info line; times in milliseconds, to the microsecond.
    pub(super) fn log(&self, duration: Duration) {
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        info!(
            target: ACCESS_LOG_TARGET,
            client = %self.client,
            listener = %self.listener,
            backend = self.backend.map(tracing::field::display),
            connect_ms = self.connect_time.map(ms),
            queued_ms = (self.queued_us > 0).then(|| f64::from(self.queued_us) / 1e3),
            duration_ms = ms(duration),
            bytes_up = self.bytes_up,
            bytes_down = self.bytes_down,
            end = %self.end,
            reason = self.reason.map(Reason::as_str),
            attempts = self.attempts,
            error = self.error.as_deref().map(tracing::field::display),
            "connection closed"
        );
    }
}
