//! One client connection: pick a backend, connect (trying others on failure), relay both ways.
//!
//! Everything that can go wrong here stays with this connection: errors are logged and end
//! this task, never the accept loop or another connection.

mod relay;
#[cfg(target_os = "linux")]
mod splice;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span, info, warn};

use crate::backend::{ActiveConn, BackendState};
use crate::config::AllUnhealthy;
use crate::snapshot::Pool;
use crate::stop::Signal;

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
/// `counted` holds the guards that count the connection while it lives: against the listener's
/// `max_connections` (an `OpenConn`) and, from the accept loop, on its worker's load. `stop` is
/// its worker's part of the signal that ends connections when shutdown's grace period ends.
///
/// Not an `async fn`: one would keep its arguments for the connection's whole life beside the
/// instrumented future that takes them over, about 100 bytes per connection, and tokio rounds
/// a task up to a multiple of 128 bytes (measured: 3.36 KiB per idle connection as an
/// `async fn`, 3.12 KiB like this).
pub(crate) fn serve(
    client: TcpStream,
    peer: SocketAddr,
    pool: Arc<Pool>,
    turn: u64,
    counted: impl Send + 'static,
    stop: Arc<Signal>,
) -> impl Future<Output = ()> + Send + 'static {
    let accepted = Instant::now();
    let span = debug_span!("conn", listener = %pool.name(), client = %peer);
    async move {
        let _counted = counted;
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
        // No backend is healthy: the pool was built for it, and the transition was logged
        // once; each connection is only counted here.
        match pool.all_unhealthy() {
            Some(AllUnhealthy::Reject) => {
                pool.stats().record_rejected_all_unhealthy();
                debug!("no backend is healthy; closing (all_unhealthy = \"reject\")");
                return;
            }
            Some(AllUnhealthy::RouteAnyway) => pool.stats().record_routed_all_unhealthy(),
            None => {}
        }
        // Small messages (requests, tokens) go out at once, not after Nagle's delay. On Linux
        // the client socket has it already, inherited from its listener (`listener::bind_one`).
        #[cfg(not(target_os = "linux"))]
        if let Err(e) = client.set_nodelay(true) {
            debug!(error = %e, "cannot set TCP_NODELAY on client socket");
        }
        // Shutdown's grace period bounds connects too, not only relays.
        let connected = tokio::select! {
            connected = connect(&pool, turn) => Some(connected),
            () = stop.stopped() => {
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
                let mode = if pool.settings().splice {
                    relay::Mode::Splice
                } else {
                    relay::Mode::Copy
                };
                drop(pool);
                let stats = active.stats();
                let relayed = relay::relay(
                    &client,
                    &upstream,
                    mode,
                    idle_timeout,
                    &stop,
                    |n| stats.add_bytes_to_backend(n),
                    |n| stats.add_bytes_from_backend(n),
                )
                .await;
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

/// Connects to a backend picked by the pool's strategy for the connection numbered `turn`, trying
/// up to `connect_attempts` distinct backends. On failure returns how many connects were tried.
async fn connect(pool: &Pool, turn: u64) -> Result<Connected, u32> {
    let settings = pool.settings();
    // Allocates only on a retry.
    let mut tried = Vec::new();
    for attempt in 1..=settings.connect_attempts.get() {
        let Some((index, backend)) = pool.pick(turn, &tried) else {
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
        let streak = backend.stats.record_connect_failure();
        pool.stats().record_connect_failure();
        warn!(listener = %pool.name(), backend = %backend.addr, attempt, %error, "connect failed");
        // Passive ejection: the failure that completes the streak asks the control task to
        // eject (exactly one connection sees the count reach the threshold). Atomics and a
        // non-blocking wake-up only: no lock on the connection path.
        if settings
            .max_connect_failures
            .is_some_and(|max| streak == u64::from(max.get()))
        {
            pool.republish();
        }
        tried.push(index);
    }
    Err(settings.connect_attempts.get())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::Path;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpSocket};

    use crate::backend::{ListenerStats, Registry, Republisher};
    use crate::snapshot::Snapshot;

    /// How long the health locks are held while connections are served.
    const HOLD: Duration = Duration::from_millis(1000);

    /// The connection path, passive ejection's part included, never waits for a backend's health
    /// mutex: with every one of them held by another thread, connections are served at once,
    /// and the connect failures that reach `max_connect_failures` ask for a republish without
    /// waiting either. No control task runs here, so nothing but the connection path could be
    /// the one waiting.
    #[tokio::test]
    async fn connections_are_served_while_every_health_lock_is_held() {
        let backend = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a backend");
        let backend_addr = backend.local_addr().expect("backend address");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = backend.accept().await {
                tokio::spawn(async move {
                    if let Err(e) = stream.write_all(b"x").await {
                        eprintln!("test backend: {e}");
                    }
                });
            }
        });
        let refusing = TcpSocket::new_v4().expect("a socket");
        refusing
            .bind("127.0.0.1:0".parse().expect("literal"))
            .expect("bind a refusing port");
        let refusing_addr = refusing.local_addr().expect("refusing address");
        let text = format!(
            "[[listener]]\nname = \"lb\"\nbind = \"127.0.0.1:0\"\nconnect_attempts = 2\n\
             [listener.passive]\nmax_connect_failures = 2\n\
             [[listener.backend]]\naddr = \"{backend_addr}\"\n\
             [[listener.backend]]\naddr = \"{refusing_addr}\"\n"
        );
        let config = crate::config::parse(&text, Path::new("t.toml")).expect("valid");
        let (republisher, mut woken) = Republisher::new();
        let registry = Registry::with_republisher(republisher);
        let snapshot = Snapshot::build(&config, &registry, &HashMap::new(), None);
        let pool = Arc::clone(snapshot.pool("lb").expect("listener lb"));
        let states: Vec<_> = pool
            .backends()
            .iter()
            .map(|b| Arc::clone(&b.stats))
            .collect();

        let (locked, is_locked) = std::sync::mpsc::channel();
        let holder = std::thread::spawn(move || {
            let guards: Vec<_> = states.iter().map(|s| s.lock_health()).collect();
            locked.send(()).expect("the test waits for the locks");
            std::thread::sleep(HOLD);
            drop(guards);
        });
        is_locked.recv().expect("the holder thread locks");

        let clients = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a client side");
        let clients_addr = clients.local_addr().expect("client side address");
        let stop = Signal::new();
        let started = Instant::now();
        for turn in 0..20 {
            let mut client = TcpStream::connect(clients_addr).await.expect("connect");
            let (accepted, peer) = clients.accept().await.expect("accept");
            let open = ListenerStats::admit(pool.stats(), 100).expect("under the limit");
            tokio::spawn(serve(
                accepted,
                peer,
                Arc::clone(&pool),
                turn,
                open,
                Arc::clone(&stop),
            ));
            let mut byte = [0_u8; 1];
            tokio::time::timeout(Duration::from_secs(1), client.read_exact(&mut byte))
                .await
                .expect("served without waiting for a lock")
                .expect("read the backend's byte");
        }
        let elapsed = started.elapsed();
        assert!(
            elapsed < HOLD,
            "20 connections took {elapsed:?} while the locks were held"
        );
        let refusing_state = &pool.backends()[1].stats;
        assert!(refusing_state.counters().connect_failures >= 2);
        assert!(
            woken.try_recv().is_ok(),
            "the threshold asked for a republish"
        );
        stop.stop();
        holder.join().expect("the holder thread ends");
    }
}
