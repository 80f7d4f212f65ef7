//! One client connection: pick a backend, connect (trying others on failure), relay both ways.
//!
//! Everything that can go wrong here stays with this connection: errors are logged and end
//! this task, never the accept loop or another connection.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span, info, warn};

use crate::backend::{ActiveConn, BackendState, OpenConn};
use crate::snapshot::Pool;

/// Size of each of the two copy buffers of a connection. 16 KiB moves bulk data in few system
/// calls while keeping a connection's memory small (tokio's default is 8 KiB).
const COPY_BUFFER: usize = 16 * 1024;

/// The `tracing` target of access log lines, so a filter such as `weighbridge::access=off` or a
/// log shipper can tell them from the balancer's own lines.
pub const ACCESS_LOG_TARGET: &str = "weighbridge::access";

/// How a client connection ended: the `end` field of its access log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client finished sending first; then both directions reached end of stream.
    ClientClosed,
    /// The backend finished sending first; then both directions reached end of stream.
    BackendClosed,
    /// Nothing moved for `idle_timeout`.
    IdleTimeout,
    /// No backend could be reached within `connect_attempts` (the line says how many were
    /// tried; 0 when every backend has weight 0).
    ConnectFailed,
    /// Refused at once because `max_connections` were open.
    Rejected,
    /// Shutdown's grace period ran out.
    ShutDown,
    /// A read or write failed (reset, broken pipe, ...).
    Error,
}

impl End {
    /// The name the access log uses.
    pub fn as_str(self) -> &'static str {
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

/// Serves one accepted client connection until it is done.
///
/// `open` keeps the connection counted against the listener's `max_connections`; `stop` is
/// cancelled when shutdown's grace period ends.
pub(crate) async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    pool: Arc<Pool>,
    open: OpenConn,
    stop: CancellationToken,
) {
    let accepted = Instant::now();
    let span = debug_span!("conn", listener = %pool.name(), client = %peer);
    async move {
        let _open = open;
        let listener = Arc::clone(pool.name());
        let listener_stats = Arc::clone(pool.stats());
        let mut access = AccessLine {
            client: peer,
            listener: &listener,
            backend: None,
            connect_time: None,
            attempts: 0,
            bytes_up: 0,
            bytes_down: 0,
            end: End::ShutDown,
            error: None,
        };
        let access_log = pool.settings().access_log;
        if let Err(e) = client.set_nodelay(true) {
            debug!(error = %e, "cannot set TCP_NODELAY on client socket");
        }
        // Shutdown's grace period bounds connects too, not only relays.
        let connected = tokio::select! {
            connected = connect(&pool) => Some(connected),
            () = stop.cancelled() => {
                debug!("shut down while connecting");
                None
            }
        };
        match connected {
            None => {}
            Some(Err(attempts)) => {
                pool.stats().record_no_backend();
                warn!(
                    listener = %pool.name(),
                    client = %peer,
                    attempts,
                    "no backend reachable, closing client connection"
                );
                access.attempts = attempts;
                access.end = End::ConnectFailed;
            }
            Some(Ok(connected)) => {
                let Connected {
                    stream: upstream,
                    addr: backend,
                    active,
                    attempts,
                } = connected;
                debug!(%backend, "connected");
                access.backend = Some(backend);
                access.attempts = attempts;
                access.connect_time = Some(accepted.elapsed());
                // The connection needs nothing more from its snapshot; letting go of it here
                // means a long-lived stream does not keep a replaced snapshot (and its tables)
                // alive.
                let idle_timeout = pool.settings().idle_timeout;
                drop(pool);
                let relayed = relay(client, upstream, idle_timeout, active.stats(), &stop).await;
                debug!(
                    %backend,
                    end = %relayed.end,
                    bytes_up = relayed.up,
                    bytes_down = relayed.down,
                    "closed"
                );
                drop(active);
                access.end = relayed.end;
                access.error = relayed.error;
                access.bytes_up = relayed.up;
                access.bytes_down = relayed.down;
            }
        }
        let open_for = accepted.elapsed();
        listener_stats.record_duration(open_for);
        if access_log {
            access.log(open_for);
        }
    }
    .instrument(span)
    .await;
}

/// Logs the access line of a client connection refused because `max_connections` were open.
/// Called by the accept loop, which refuses before a connection task exists.
pub(crate) fn log_rejected(pool: &Pool, peer: SocketAddr) {
    if !pool.settings().access_log {
        return;
    }
    let line = AccessLine {
        client: peer,
        listener: pool.name(),
        backend: None,
        connect_time: None,
        attempts: 0,
        bytes_up: 0,
        bytes_down: 0,
        end: End::Rejected,
        error: None,
    };
    line.log(Duration::ZERO);
}

/// What the access log says about one client connection.
#[derive(Debug)]
struct AccessLine<'a> {
    client: SocketAddr,
    listener: &'a str,
    backend: Option<SocketAddr>,
    /// From accept until the backend accepted, retries included: what the client waited.
    connect_time: Option<Duration>,
    /// Connects tried (1 unless a backend refused or timed out).
    attempts: u32,
    /// Client to backend.
    bytes_up: u64,
    /// Backend to client.
    bytes_down: u64,
    end: End,
    error: Option<String>,
}

impl AccessLine<'_> {
    /// One info line; times in milliseconds, to the microsecond.
    fn log(&self, duration: Duration) {
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        info!(
            target: ACCESS_LOG_TARGET,
            client = %self.client,
            listener = %self.listener,
            backend = self.backend.map(tracing::field::display),
            connect_ms = self.connect_time.map(ms),
            duration_ms = ms(duration),
            bytes_up = self.bytes_up,
            bytes_down = self.bytes_down,
            end = %self.end,
            attempts = self.attempts,
            error = self.error.as_deref().map(tracing::field::display),
            "connection closed"
        );
    }
}

/// A connection established to a backend.
#[derive(Debug)]
struct Connected {
    stream: TcpStream,
    addr: SocketAddr,
    /// Counts the connection as active on the backend.
    active: ActiveConn,
    /// Connects tried, this one included.
    attempts: u32,
}

/// Connects to a backend picked by the pool's strategy, trying up to `connect_attempts` distinct
/// backends. On failure returns how many connects were tried.
async fn connect(pool: &Pool) -> Result<Connected, u32> {
    let settings = pool.settings();
    // Allocates only on a retry.
    let mut tried = Vec::new();
    for attempt in 1..=settings.connect_attempts.get() {
        let Some((index, backend)) = pool.pick(&tried) else {
            return Err(attempt - 1);
        };
        let active = BackendState::acquire(&backend.stats);
        pool.stats().record_connect_attempt();
        let started = Instant::now();
        let error =
            match tokio::time::timeout(settings.connect_timeout, TcpStream::connect(backend.addr))
                .await
            {
                Ok(Ok(stream)) => {
                    backend.stats.record_connected(started.elapsed());
                    if let Err(e) = stream.set_nodelay(true) {
                        debug!(error = %e, "cannot set TCP_NODELAY on backend socket");
                    }
                    return Ok(Connected {
                        stream,
                        addr: backend.addr,
                        active,
                        attempts: attempt,
                    });
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!(
                    "timed out after {}",
                    humantime::format_duration(settings.connect_timeout)
                ),
            };
        backend.stats.record_connect_failure();
        pool.stats().record_connect_failure();
        warn!(listener = %pool.name(), backend = %backend.addr, attempt, %error, "connect failed");
        tried.push(index);
    }
    Err(settings.connect_attempts.get())
}

/// The end of a relay.
#[derive(Debug)]
struct Relayed {
    end: End,
    /// The read or write error that ended it, for [`End::Error`].
    error: Option<String>,
    /// Bytes moved client to backend.
    up: u64,
    /// Bytes moved backend to client.
    down: u64,
}

/// Copies both ways until both directions are done, nothing moves for `idle`, or `stop` fires.
///
/// Half-close is tokio's: end of stream on one side becomes a write shutdown on the other, and
/// the opposite direction keeps flowing. Bytes are also added to `stats` as they move, so long
/// streams show up live.
async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    idle: Duration,
    stats: &BackendState,
    stop: &CancellationToken,
) -> Relayed {
    let activity = Activity::new();
    let mut client = Metered::new(client, Side::Client, &activity, |n| {
        stats.add_bytes_to_backend(n)
    });
    let mut upstream = Metered::new(upstream, Side::Backend, &activity, |n| {
        stats.add_bytes_from_backend(n)
    });
    let mut error = None;
    let end = tokio::select! {
        result = tokio::io::copy_bidirectional_with_sizes(
            &mut client, &mut upstream, COPY_BUFFER, COPY_BUFFER,
        ) => match result {
            Ok(_) => match activity.first_eof() {
                Some(Side::Backend) => End::BackendClosed,
                Some(Side::Client) | None => End::ClientClosed,
            },
            Err(e) => {
                debug!(error = %e, "relay ended with an error");
                error = Some(e.to_string());
                End::Error
            }
        },
        () = activity.idle_for(idle) => End::IdleTimeout,
        () = stop.cancelled() => End::ShutDown,
    };
    Relayed {
        end,
        error,
        up: client.read,
        down: upstream.read,
    }
}

/// The two ends of a relayed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client = 1,
    Backend = 2,
}

/// What the two directions of one connection share: the time of the last byte moved either
/// way, and which side reached end of stream first (to tell "client closed" from "backend
/// closed"). Atomics only so both directions can share it by reference; both run in the same
/// task, so they are never contended.
#[derive(Debug)]
struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last_ms: AtomicU64,
    /// 0 until a side's read returns end of stream, then that [`Side`].
    first_eof: AtomicU8,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            first_eof: AtomicU8::new(0),
        }
    }

    /// Notes that `side` finished sending, unless the other side did so first.
    fn saw_eof(&self, side: Side) {
        // Both directions are polled by the connection's one task: no race between the two.
        if self.first_eof.load(Ordering::Relaxed) == 0 {
            self.first_eof.store(side as u8, Ordering::Relaxed);
        }
    }

    /// The side whose read saw end of stream first, if any has.
    fn first_eof(&self) -> Option<Side> {
        match self.first_eof.load(Ordering::Relaxed) {
            1 => Some(Side::Client),
            2 => Some(Side::Backend),
            _ => None,
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Completes once nothing has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A stream that counts the bytes read from it, marks activity on every read and write, and
/// reports when its read side reaches end of stream.
struct Metered<'a, S, F> {
    inner: S,
    side: Side,
    activity: &'a Activity,
    on_read: F,
    read: u64,
}

impl<'a, S, F: Fn(u64)> Metered<'a, S, F> {
    fn new(inner: S, side: Side, activity: &'a Activity, on_read: F) -> Self {
        Metered {
            inner,
            side,
            activity,
            on_read,
            read: 0,
        }
    }
}

impl<S: AsyncRead + Unpin, F: Fn(u64) + Unpin> AsyncRead for Metered<'_, S, F> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let had_room = buf.remaining() > 0;
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            this.read += n;
            (this.on_read)(n);
            this.activity.touch();
        } else if had_room {
            this.activity.saw_eof(this.side);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin, F: Unpin> AsyncWrite for Metered<'_, S, F> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        if n > 0 {
            this.activity.touch();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_timer_restarts_on_activity() {
        let activity = Activity::new();
        let idle = Duration::from_secs(10);
        tokio::time::advance(Duration::from_secs(6)).await;
        activity.touch();
        let started = Instant::now();
        activity.idle_for(idle).await;
        // Fired 10 s after the touch, not 10 s after creation.
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[test]
    fn the_first_side_to_finish_is_the_one_remembered() {
        let activity = Activity::new();
        assert_eq!(activity.first_eof(), None);
        activity.saw_eof(Side::Backend);
        activity.saw_eof(Side::Client);
        assert_eq!(activity.first_eof(), Some(Side::Backend));
    }
}
