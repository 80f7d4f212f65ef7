//! One client connection: pick a backend, connect (trying others on failure), relay both ways.
//!
//! Everything that can go wrong here stays with this connection: errors are logged and end
//! this task, never the accept loop or another connection.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span, warn};

mod relay;
#[cfg(target_os = "linux")]
mod splice;

use crate::backend::{ActiveConn, BackendState, OpenConn};
use crate::snapshot::Pool;

/// How a relayed connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions reached end of stream; the client's came first.
    ClientClosed,
    /// Both directions reached end of stream; the backend's came first.
    BackendClosed,
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
        let mode = if pool.settings().splice {
            relay::Mode::Splice
        } else {
            relay::Mode::Copy
        };
        drop(pool);
        let started = Instant::now();
        let stats = active.stats();
        let (outcome, moved) = relay::relay(
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
            ?outcome,
            bytes_up = moved.to_backend,
            bytes_down = moved.to_client,
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
        backend.stats.record_connect_failure();
        warn!(listener = %pool.name(), backend = %backend.addr, attempt, %error, "connect failed");
        tried.push(index);
    }
    None
}
