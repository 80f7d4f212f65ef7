//! One client connection: pick a backend, connect (trying others on failure), relay both ways.
//!
//! Everything that can go wrong here stays with this connection: errors are logged and end
//! this task, never the accept loop or another connection.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span, warn};

use crate::backend::{ActiveConn, BackendState, OpenConn};
use crate::config::AllUnhealthy;
use crate::snapshot::Pool;

/// Size of each of the two copy buffers of a connection. 16 KiB moves bulk data in few system
/// calls while keeping a connection's memory small (tokio's default is 8 KiB).
const COPY_BUFFER: usize = 16 * 1024;

/// How a relayed connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions reached end of stream.
    Closed,
    /// Nothing moved for `idle_timeout`.
    IdleTimeout,
    /// A read or write failed (reset, broken pipe, ...).
    Error,
    /// Shutdown's grace period ran out.
    ShutDown,
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
    let span = debug_span!("conn", listener = %pool.name(), client = %peer);
    async move {
        let _open = open;
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
        if let Err(e) = client.set_nodelay(true) {
            debug!(error = %e, "cannot set TCP_NODELAY on client socket");
        }
        // Shutdown's grace period bounds connects too, not only relays.
        let connected = tokio::select! {
            connected = connect(&pool) => connected,
            () = stop.cancelled() => {
                debug!("shut down while connecting");
                return;
            }
        };
        let Some((upstream, backend, active)) = connected else {
            pool.stats().record_no_backend();
            warn!(
                listener = %pool.name(),
                client = %peer,
                attempts = pool.settings().connect_attempts.get(),
                "no backend reachable, closing client connection"
            );
            return;
        };
        debug!(%backend, "connected");
        // The connection needs nothing more from its snapshot; letting go of it here means a
        // long-lived stream does not keep a replaced snapshot (and its tables) alive.
        let idle_timeout = pool.settings().idle_timeout;
        drop(pool);
        let started = Instant::now();
        let stats = active.stats();
        let (outcome, up, down) = relay(client, upstream, idle_timeout, stats, &stop).await;
        debug!(
            %backend,
            ?outcome,
            bytes_up = up,
            bytes_down = down,
            duration_ms = started.elapsed().as_millis() as u64,
            "closed"
        );
        drop(active);
    }
    .instrument(span)
    .await;
}

/// Connects to a backend picked by the pool's strategy, trying up to `connect_attempts` distinct
/// backends. The returned guard counts the connection as active on that backend.
async fn connect(pool: &Pool) -> Option<(TcpStream, SocketAddr, ActiveConn)> {
    let settings = pool.settings();
    // Allocates only on a retry.
    let mut tried = Vec::new();
    for attempt in 1..=settings.connect_attempts.get() {
        let (index, backend) = pool.pick(&tried)?;
        let active = BackendState::acquire(&backend.stats);
        let error =
            match tokio::time::timeout(settings.connect_timeout, TcpStream::connect(backend.addr))
                .await
            {
                Ok(Ok(stream)) => {
                    backend.stats.record_connected();
                    if let Err(e) = stream.set_nodelay(true) {
                        debug!(error = %e, "cannot set TCP_NODELAY on backend socket");
                    }
                    return Some((stream, backend.addr, active));
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!(
                    "timed out after {}",
                    humantime::format_duration(settings.connect_timeout)
                ),
            };
        let streak = backend.stats.record_connect_failure();
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
    None
}

/// Copies both ways until both directions are done, nothing moves for `idle`, or `stop` fires.
///
/// Half-close is tokio's: end of stream on one side becomes a write shutdown on the other, and
/// the opposite direction keeps flowing. Returns the outcome and the bytes moved client→backend
/// and backend→client (also added to `stats` as they move, so long streams show up live).
async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    idle: Duration,
    stats: &BackendState,
    stop: &CancellationToken,
) -> (Outcome, u64, u64) {
    let activity = Activity::new();
    let mut client = Metered::new(client, &activity, |n| stats.add_bytes_to_backend(n));
    let mut upstream = Metered::new(upstream, &activity, |n| stats.add_bytes_from_backend(n));
    let outcome = tokio::select! {
        result = tokio::io::copy_bidirectional_with_sizes(
            &mut client, &mut upstream, COPY_BUFFER, COPY_BUFFER,
        ) => match result {
            Ok(_) => Outcome::Closed,
            Err(e) => {
                debug!(error = %e, "relay ended with an error");
                Outcome::Error
            }
        },
        () = activity.idle_for(idle) => Outcome::IdleTimeout,
        () = stop.cancelled() => Outcome::ShutDown,
    };
    (outcome, client.read, upstream.read)
}

/// The time of the last byte moved in either direction of one connection.
#[derive(Debug)]
struct Activity {
    start: Instant,
    /// Milliseconds after `start`. Atomic only so the two directions can share it by reference;
    /// both run in the same task, so it is never contended.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
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

/// A stream that counts the bytes read from it and marks activity on every read and write.
struct Metered<'a, S, F> {
    inner: S,
    activity: &'a Activity,
    on_read: F,
    read: u64,
}

impl<'a, S, F: Fn(u64)> Metered<'a, S, F> {
    fn new(inner: S, activity: &'a Activity, on_read: F) -> Self {
        Metered {
            inner,
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
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            this.read += n;
            (this.on_read)(n);
            this.activity.touch();
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
        let snapshot = Snapshot::build(&config, &registry, &HashMap::new());
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
        let stop = CancellationToken::new();
        let started = Instant::now();
        for _ in 0..20 {
            let mut client = TcpStream::connect(clients_addr).await.expect("connect");
            let (accepted, peer) = clients.accept().await.expect("accept");
            let open = ListenerStats::admit(pool.stats(), 100).expect("under the limit");
            tokio::spawn(serve(accepted, peer, Arc::clone(&pool), open, stop.clone()));
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
        stop.cancel();
        holder.join().expect("the holder thread ends");
    }

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
}
