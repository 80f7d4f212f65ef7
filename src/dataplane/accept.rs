//! Listening sockets: binding one per worker, and how accept errors are told apart and paced.
//!
//! The workers (`event_loop`) accept, admit (against `max_connections`) and start
//! connections. Accept errors never stop a listener: connection-level ones (the peer gave up)
//! are skipped, resource exhaustion such as EMFILE is logged at most once a second and backed
//! off, so a full fd table is neither a busy loop nor an exit.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;
use tracing::error;

use super::throttle::Throttle;
use crate::config::ListenerConfig;
use crate::dataplane::workers::Placement;
use crate::snapshot::SnapshotCell;

/// Listen backlog: room for a burst of connections while the loop is busy. The kernel caps it at
/// `net.core.somaxconn` (4096 on current kernels).
const LISTEN_BACKLOG: i32 = 4096;
/// First pause after an accept error that is not about one connection.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause after repeated accept errors.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one accept-error log line per this period; the others are counted.
const ACCEPT_LOG_PERIOD: Duration = Duration::from_secs(1);

/// A listener that failed to bind.
#[derive(Debug, thiserror::Error)]
#[error("listener `{listener}`: cannot bind {addr}: {source}")]
pub struct BindError {
    /// The listener's name.
    pub listener: String,
    /// The address it asked for.
    pub addr: SocketAddr,
    /// Why the kernel refused.
    #[source]
    pub source: io::Error,
}

/// A listener's bound sockets: one per worker, all on one address.
#[derive(Debug)]
pub(crate) struct Bound {
    pub(crate) name: String,
    /// Listening, non-blocking, registered with no runtime: each worker registers its own.
    pub(crate) sockets: Vec<std::net::TcpListener>,
    pub(crate) local_addr: SocketAddr,
}

/// Binds `listener`'s address `sockets` times (one per worker).
///
/// With more than one socket they share the address through `SO_REUSEPORT`, the kernel spreading
/// new connections over them; the first is bound as configured and the others to the address it
/// got, so port 0 means one kernel-chosen port for all of them.
///
/// The first socket binds *without* `SO_REUSEPORT` and sets it only before listening: a port
/// that anything else holds, another weighbridge included, still fails the bind with "address
/// in use", where plain `SO_REUSEPORT` would quietly share it with any process of the same user
/// (a second instance started by mistake would take half the connections).
pub(crate) fn bind(listener: &ListenerConfig, sockets: usize) -> Result<Bound, BindError> {
    let fail = |source| BindError {
        listener: listener.name.clone(),
        addr: listener.bind,
        source,
    };
    let shared = sockets > 1;
    let first = bind_one(listener.bind, shared.then_some(Join::AfterBind)).map_err(fail)?;
    let local_addr = first.local_addr().map_err(fail)?;
    let mut bound = Bound {
        name: listener.name.clone(),
        sockets: vec![first],
        local_addr,
    };
    for _ in 1..sockets {
        bound
            .sockets
            .push(bind_one(local_addr, Some(Join::BeforeBind)).map_err(fail)?);
    }
    Ok(bound)
}

/// A listening socket taken over instead of bound: from systemd (socket activation) or from the
/// process a binary upgrade replaces.
#[derive(Debug)]
pub struct InheritedSocket {
    /// What it served where it comes from, if that is known.
    pub served: Served,
    /// The socket, listening.
    pub socket: std::net::TcpListener,
}

/// What an [`InheritedSocket`] served in the process that hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Served {
    /// Not known (systemd's sockets): it is matched by its address alone.
    Unknown,
    /// The listener `name`, configured with `bind` (port 0 stays 0).
    Listener {
        /// The listener's name.
        name: String,
        /// Its configured `bind`.
        bind: SocketAddr,
    },
    /// The admin endpoint, configured with `bind`.
    Admin {
        /// Its configured `bind`.
        bind: SocketAddr,
    },
}

impl InheritedSocket {
    /// Whether this socket should serve listener `listener`: it served a listener of the same
    /// name and `bind` (so port 0 finds the port the old process got), or it is bound to exactly
    /// the configured address.
    pub(crate) fn fits_listener(&self, listener: &ListenerConfig) -> bool {
        match &self.served {
            Served::Listener { name, bind } if *name == listener.name && *bind == listener.bind => {
                true
            }
            Served::Admin { .. } => false,
            _ => self.bound_to(listener.bind),
        }
    }

    /// Whether this socket should serve an admin endpoint configured with `bind`.
    pub(crate) fn fits_admin(&self, bind: SocketAddr) -> bool {
        match &self.served {
            Served::Admin { bind: was } if *was == bind => true,
            Served::Listener { .. } => false,
            _ => self.bound_to(bind),
        }
    }

    fn bound_to(&self, bind: SocketAddr) -> bool {
        bind.port() != 0 && self.socket.local_addr().is_ok_and(|addr| addr == bind)
    }
}

/// Serves `listener` on `inherited` sockets instead of binding: the sockets as they are (a group
/// a previous process shared with `SO_REUSEPORT` stays whole, so no queued connection is lost),
/// copied to give each of `workers` one to accept on when there are fewer.
pub(crate) fn adopt(
    listener: &ListenerConfig,
    inherited: Vec<std::net::TcpListener>,
    workers: usize,
) -> Result<Bound, BindError> {
    let fail = |source| BindError {
        listener: listener.name.clone(),
        addr: listener.bind,
        source,
    };
    let mut sockets = Vec::with_capacity(inherited.len().max(workers));
    for socket in inherited {
        socket.set_nonblocking(true).map_err(fail)?;
        // As `bind_one` does: accepted sockets inherit TCP_NODELAY from their listener.
        rustix::net::sockopt::set_tcp_nodelay(&socket, true).map_err(|e| fail(e.into()))?;
        sockets.push(socket);
    }
    let first = sockets
        .first()
        .ok_or_else(|| fail(io::ErrorKind::NotFound.into()))?;
    let local_addr = first.local_addr().map_err(fail)?;
    let mut index = 0;
    while sockets.len() < workers {
        let copy = sockets[index].try_clone().map_err(fail)?;
        sockets.push(copy);
        index += 1;
    }
    Ok(Bound {
        name: listener.name.clone(),
        sockets,
        local_addr,
    })
}

/// When a socket sets `SO_REUSEPORT` (see [`bind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Join {
    /// After binding: the first socket of a group, which must find the port free.
    AfterBind,
    /// Before binding: the others, which join the first one's group.
    BeforeBind,
}

fn bind_one(addr: SocketAddr, join: Option<Join>) -> io::Result<std::net::TcpListener> {
    use rustix::net::{AddressFamily, SocketType, sockopt};
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let socket = rustix::net::socket(family, SocketType::STREAM, None)?;
    // Lets a restarted balancer bind while old connections linger in TIME_WAIT.
    sockopt::set_socket_reuseaddr(&socket, true)?;
    // On Linux an accepted socket inherits TCP_NODELAY from its listener: set here once, it
    // saves one system call per connection (see `proxy::Conn::start`).
    sockopt::set_tcp_nodelay(&socket, true)?;
    if join == Some(Join::BeforeBind) {
        sockopt::set_socket_reuseport(&socket, true)?;
    }
    rustix::net::bind(&socket, &addr)?;
    if join == Some(Join::AfterBind) {
        sockopt::set_socket_reuseport(&socket, true)?;
    }
    rustix::net::listen(&socket, LISTEN_BACKLOG)?;
    let listener = std::net::TcpListener::from(socket);
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// What every listening socket of a balancer shares.
#[derive(Debug, Clone)]
pub(crate) struct Serving {
    /// Where each connection finds its listener's pool.
    pub(crate) snapshots: Arc<SnapshotCell>,
    /// Counts every open connection, for shutdown to wait on.
    pub(crate) connections: TaskTracker,
    /// The workers and their loads.
    pub(crate) placement: Placement,
}

/// Errors that concern one incoming connection only; the next accept is unaffected.
///
/// Not "would block": that says the queue is empty, which each accept loop handles first
/// (retrying on it would ask an empty queue again).
///
/// Besides the reset and aborted connections, Linux `accept(2)` passes on network errors already
/// pending on the new connection (EPROTO, ENETDOWN, EHOSTUNREACH, ...), and its manual says to
/// retry those like EAGAIN: they say nothing about the listener or the process.
pub(crate) fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::NetworkDown
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::HostUnreachable
    ) || {
        use rustix::io::Errno;
        Errno::from_io_error(e).is_some_and(|errno| {
            [
                Errno::PROTO,
                Errno::NOPROTOOPT,
                Errno::HOSTDOWN,
                Errno::OPNOTSUPP,
            ]
            .contains(&errno)
        })
    }
}

/// Back-off and log rate limit for accept errors.
#[derive(Debug, Default)]
pub(crate) struct ErrorPacer {
    pause: Option<Duration>,
    log: Throttle,
}

impl ErrorPacer {
    pub(crate) fn reset(&mut self) {
        self.pause = None;
    }

    /// Logs (at most once per period) and returns how long to pause before accepting again.
    pub(crate) fn failed(&mut self, listener: &str, e: &io::Error) -> Duration {
        if let Some(suppressed) = self
            .log
            .allow_counting(std::time::Instant::now(), ACCEPT_LOG_PERIOD)
        {
            error!(
                listener,
                error = %e,
                suppressed,
                "accept failed; backing off (raise the open-file limit if this is EMFILE)"
            );
        }
        let pause = self
            .pause
            .map_or(ACCEPT_BACKOFF_MIN, |p| (p * 2).min(ACCEPT_BACKOFF_MAX));
        self.pause = Some(pause);
        pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    fn listener(bind: SocketAddr) -> ListenerConfig {
        let text = format!(
            "[[listener]]\nname = \"l\"\nbind = \"{bind}\"\n[[listener.backend]]\naddr = \"127.0.0.1:9\"\n"
        );
        crate::config::parse(&text, std::path::Path::new("t.toml"))
            .expect("valid")
            .listeners
            .remove(0)
    }

    /// `Conn::start` relies on this instead of setting TCP_NODELAY on every client socket.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let bound = bind(&listener("127.0.0.1:0".parse().expect("address")), 1).expect("bind");
        let _client = std::net::TcpStream::connect(bound.local_addr).expect("connect");
        // Non-blocking: the connection may reach the accept queue just after connect returns.
        let deadline = Instant::now() + Duration::from_secs(5);
        let accepted = loop {
            match bound.sockets[0].accept() {
                Ok((accepted, _)) => break accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        assert!(accepted.nodelay().expect("TCP_NODELAY"));
    }

    #[tokio::test]
    async fn every_worker_gets_a_socket_on_one_port_that_no_one_else_can_share() {
        let bound = bind(&listener("127.0.0.1:0".parse().expect("address")), 3).expect("bind");
        assert_eq!(bound.sockets.len(), 3);
        for socket in &bound.sockets {
            assert_eq!(socket.local_addr().expect("address"), bound.local_addr);
        }
        // A second balancer (a group of its own) and a plain socket are both refused.
        let again = listener(bound.local_addr);
        for sockets in [2, 1] {
            let error = bind(&again, sockets).expect_err("the port is taken");
            assert_eq!(
                error.source.kind(),
                io::ErrorKind::AddrInUse,
                "{sockets} sockets"
            );
        }
        assert!(std::net::TcpListener::bind(bound.local_addr).is_err());
    }

    #[tokio::test]
    async fn the_kernel_spreads_connections_over_the_sockets() {
        let bound = bind(&listener("127.0.0.1:0".parse().expect("address")), 2).expect("bind");
        // 64 connections from 64 source ports: each socket gets some unless the hash sends all
        // of them one way, a chance of 2^-63, or the first socket is outside the group.
        let clients: Vec<_> = (0..64)
            .map(|_| std::net::TcpStream::connect(bound.local_addr).expect("connect"))
            .collect();
        let mut accepted = [0; 2];
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while accepted.iter().sum::<usize>() < clients.len() {
            assert!(std::time::Instant::now() < deadline, "{accepted:?}");
            for (socket, count) in bound.sockets.iter().zip(&mut accepted) {
                // Non-blocking: take what the kernel has queued on this socket so far.
                while socket.accept().is_ok() {
                    *count += 1;
                }
            }
            std::thread::yield_now();
        }
        assert!(accepted.iter().all(|&n| n > 0), "{accepted:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn accept_backoff_doubles_up_to_its_cap_and_resets() {
        let mut pacer = ErrorPacer::default();
        let e = io::Error::from_raw_os_error(24); // EMFILE
        let pauses: Vec<_> = (0..12).map(|_| pacer.failed("t", &e)).collect();
        assert_eq!(pauses[0], ACCEPT_BACKOFF_MIN);
        assert_eq!(pauses[1], ACCEPT_BACKOFF_MIN * 2);
        assert_eq!(*pauses.last().expect("12 pauses"), ACCEPT_BACKOFF_MAX);
        let later = std::time::Instant::now() + ACCEPT_LOG_PERIOD;
        assert_eq!(
            pacer.log.allow_counting(later, ACCEPT_LOG_PERIOD),
            Some(11),
            "one line logged, eleven held back"
        );
        pacer.reset();
        assert_eq!(pacer.failed("t", &e), ACCEPT_BACKOFF_MIN);
    }

    #[test]
    fn connection_errors_are_not_backed_off() {
        assert!(is_connection_error(
            &io::ErrorKind::ConnectionAborted.into()
        ));
        use rustix::io::Errno;
        for errno in [
            Errno::CONNABORTED,
            Errno::PROTO,
            Errno::HOSTUNREACH,
            Errno::NETDOWN,
        ] {
            let e = io::Error::from_raw_os_error(errno.raw_os_error());
            assert!(is_connection_error(&e), "{e}");
        }
        for errno in [
            Errno::MFILE,
            Errno::NFILE,
            Errno::NOBUFS,
            Errno::NOMEM,
            Errno::AGAIN,
        ] {
            let e = io::Error::from_raw_os_error(errno.raw_os_error());
            assert!(!is_connection_error(&e), "{e}");
        }
    }
}
