//! Opening a backend socket, and what a failed connect means: the backend's fault (counted,
//! and passive ejection's input) or the balancer's own shortage (out of descriptors, out of
//! local ports), which must not count against a healthy backend.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use rustix::io::Errno;
use tracing::{debug, warn};

use super::throttle::Throttle;
use crate::config::CongestionControl;
use crate::snapshot::{Listener, Pool};

/// How long a connection waits before trying again to open a backend socket when the process
/// is out of descriptors.
pub(super) const DESCRIPTOR_WAIT: Duration = Duration::from_millis(20);

/// A non-blocking connect to `addr` under way, with congestion control `cc` if one is set.
///
/// `cc` goes on the socket *before* `connect`: on loopback or a fast LAN the handshake can
/// complete within the `connect` call, and the system's algorithm is initialised at that
/// moment. Under BBR that switches the kernel's pacing on for the socket, and changing the
/// algorithm afterwards never switches it off again, so set later the key would rename the
/// algorithm and keep the pacing it is there to remove. Without `cc` this is mio's connect.
pub(super) fn open_backend(
    addr: SocketAddr,
    cc: Option<CongestionControl>,
) -> io::Result<TcpStream> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    #[cfg(test)]
    if let Some(errno) = OPEN_FAILS_WITH.take() {
        return Err(io::Error::from_raw_os_error(errno));
    }
    let Some(cc) = cc else {
        return TcpStream::connect(addr);
    };
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
    let socket = rustix::net::socket_with(family, SocketType::STREAM, flags, None)?;
    if let Err(e) = cc.apply(&socket) {
        // Checked against the kernel when the file was loaded; failing now means the machine
        // changed since (a sysctl, an unloaded module). The connection goes on with the
        // system's algorithm; the first such failure is a warning, the rest debug lines.
        if !CC_FAILED.swap(true, Ordering::Relaxed) {
            warn!(backend = %addr, congestion_control = %cc, error = %e, "cannot set backend_congestion_control; backend connections use the system's congestion control (logged once)");
        } else {
            debug!(backend = %addr, congestion_control = %cc, error = %e, "cannot set backend_congestion_control");
        }
    }
    match rustix::net::connect(&socket, &addr) {
        Ok(()) | Err(Errno::INPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(TcpStream::from_std(std::net::TcpStream::from(socket)))
}

#[cfg(test)]
thread_local! {
    /// Makes this thread's next backend socket fail to open with this `errno`, as the kernel
    /// would when short of a resource a test cannot exhaust on a shared machine.
    pub(crate) static OPEN_FAILS_WITH: std::cell::Cell<Option<i32>> = const { std::cell::Cell::new(None) };
}

/// Set at the first failure to apply `backend_congestion_control` at run time.
static CC_FAILED: AtomicBool = AtomicBool::new(false);

/// Whether `e`, from a TCP connect to `addr`, says every local port of the ephemeral range is
/// taken toward `addr`.
///
/// The kernel answers EADDRNOTAVAIL for that, and also when it has no source address for
/// `addr` at all: an IPv6 backend on a host with IPv6 disabled, say. That one is the backend's
/// address being unusable from here, which passive ejection should see, so the two are told
/// apart with a UDP socket connected to `addr`: it takes the same route and source address
/// choice without TCP's ports. One socket more, and only on this rare error.
pub(super) fn no_local_port(e: &io::Error, addr: SocketAddr) -> bool {
    if e.raw_os_error() != Some(Errno::ADDRNOTAVAIL.raw_os_error()) {
        return false;
    }
    let any: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    std::net::UdpSocket::bind(any).is_ok_and(|probe| probe.connect(addr).is_ok())
}

/// Paces [`log_no_local_port`]: a shortage of ports comes with thousands of connections a
/// second.
static NO_LOCAL_PORT_LOG: Throttle = Throttle::new();

/// How often a shortage of local ports is logged at most.
const NO_LOCAL_PORT_LOG_PERIOD: Duration = Duration::from_secs(1);

/// Logs, at most once a second, that a connect to `backend` found no local port.
pub(super) fn log_no_local_port(
    listener: &Listener,
    client: SocketAddr,
    backend: SocketAddr,
    attempt: u32,
    now: Instant,
) {
    if NO_LOCAL_PORT_LOG.allow(now, NO_LOCAL_PORT_LOG_PERIOD) {
        warn!(
            listener = %listener.name(),
            %client,
            %backend,
            attempt,
            "no local port left for a connection to the backend (net.ipv4.ip_local_port_range); \
             not counted against the backend, trying another (logged at most once a second)"
        );
    }
}

/// Whether `e` says the process (or the system) has no descriptor or buffer left for a socket.
pub(super) fn out_of_descriptors(e: &io::Error) -> bool {
    Errno::from_io_error(e).is_some_and(|errno| {
        [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM].contains(&errno)
    })
}

/// Counts and logs a failed connect attempt to backend `index` of `pool` for `client` of
/// `listener`.
pub(super) fn connect_failed(
    listener: &Listener,
    pool: &Pool,
    client: SocketAddr,
    index: usize,
    attempt: u32,
    error: &str,
) {
    let backend = &pool.backends()[index];
    let streak = backend.stats.record_connect_failure();
    listener.stats().record_connect_failure();
    warn!(
        listener = %listener.name(),
        pool = %pool.name(),
        %client,
        backend = %backend.addr,
        attempt,
        %error,
        "connect failed"
    );
    // Passive ejection: the failure that completes the streak asks the control task to eject
    // (exactly one connection sees the count reach the threshold). Atomics and a non-blocking
    // wake-up only: no lock on the connection path.
    if pool
        .settings()
        .max_connect_failures
        .is_some_and(|max| streak == u64::from(max.get()))
    {
        pool.republish();
    }
}
