//! One client connection: pick a backend, connect (trying others on failure), relay both ways.
//!
//! [`Conn`] is a state machine its worker ([`crate::reactor`]) drives with readiness events and
//! one timer; each call does what can be done without waiting and returns. Everything that can
//! go wrong here stays with this connection: errors are logged and end it, never the worker or
//! another connection.

mod relay;
#[cfg(target_os = "linux")]
mod splice;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::io;
use std::time::Instant;

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use tracing::{debug, info, warn};

use crate::backend::{ActiveConn, BackendState, ListenerStats};
use crate::config::{AllUnhealthy, CongestionControl};
use crate::reactor::Counted;
use crate::snapshot::Pool;
use relay::{BUDGET, Direction, Mode, Path, Pumped, Ready, shutdown_write};

pub(crate) use relay::SCRATCH;

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
    /// Closed at once without a backend: `max_connections` were open, or no backend was healthy
    /// under `all_unhealthy = "reject"` (the line's `reason` says which).
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

/// Which socket of a connection an event is for. The backend socket's token carries the parity
/// of the connect attempt it belongs to: after a failed attempt, events still queued for the
/// closed socket of the previous attempt are recognised and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Backend { odd_attempt: bool },
}

impl Side {
    /// The two low bits of the socket's token.
    pub(crate) fn bits(self) -> usize {
        match self {
            Side::Client => 0,
            Side::Backend { odd_attempt: false } => 1,
            Side::Backend { odd_attempt: true } => 2,
        }
    }

    /// The side a token's two low bits name.
    pub(crate) fn from_bits(token: usize) -> Side {
        match token & 3 {
            0 => Side::Client,
            1 => Side::Backend { odd_attempt: false },
            _ => Side::Backend { odd_attempt: true },
        }
    }

    fn backend(attempt: u32) -> Side {
        Side::Backend {
            odd_attempt: attempt % 2 == 1,
        }
    }
}

/// Whether a connection goes on after a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Open,
    /// Open, with bytes possibly left to move: [`Conn::resume`] in the next turn of the loop.
    Again,
    /// Over: the worker closes it with [`Conn::finish`].
    Done,
}

/// One client connection: pick a backend, connect (trying others on failure), relay both ways.
///
/// A state machine driven by its worker ([`crate::reactor`]): readiness events, its timer and
/// the order to cut. Everything that can go wrong here stays with this connection: errors end
/// it, never the worker or another connection.
pub(crate) struct Conn {
    client: TcpStream,
    client_ready: Ready,
    backend: Option<TcpStream>,
    backend_ready: Ready,
    phase: Phase,
    up: Direction,
    down: Direction,
    /// Which side's end of stream came first.
    first_eof: Option<End>,
    mode: Mode,
    idle: Duration,
    last_active: Instant,
    /// The deadline of this connection's entry in its worker's timer heap.
    timer_at: Instant,
    accepted: Instant,
    access: AccessLine,
    listener_stats: Arc<ListenerStats>,
    /// Keeps the connection in its worker's count while it lives.
    _counted: Counted,
}

/// Where a connection is in its life.
enum Phase {
    /// Waiting for a backend to accept.
    Connecting(Box<Connecting>),
    /// Relaying; counts itself active on its backend.
    Relaying(ActiveConn),
    /// Over, or never started.
    Ended,
}

/// A connect in progress and what the next attempt needs.
struct Connecting {
    pool: Arc<Pool>,
    turn: u64,
    /// Backends already tried (indices into the pool).
    tried: Vec<usize>,
    /// The backend being tried now.
    index: usize,
    /// Counts the connection active on that backend from the attempt on (none while waiting
    /// for a descriptor).
    active: Option<ActiveConn>,
    attempt: u32,
    started: Instant,
    deadline: Instant,
    /// No socket could be opened (the process is out of descriptors): the attempt waits for
    /// one until `deadline` and is made again then.
    no_socket: bool,
}

/// A function from a side to the token of that side's socket.
pub(crate) type Tokens<'a> = &'a dyn Fn(Side) -> Token;

impl Conn {
    /// Starts serving `client`: the first connect attempt is under way when this returns, unless
    /// the connection is already over ([`Status::Done`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        registry: &Registry,
        tokens: Tokens<'_>,
        client: TcpStream,
        peer: SocketAddr,
        pool: Arc<Pool>,
        turn: u64,
        counted: Counted,
        now: Instant,
    ) -> (Conn, Status) {
        #[cfg(test)]
        if PANIC_AT_START.replace(false) {
            panic!("injected: a bug in a connection's first step");
        }
        let settings = pool.settings();
        let mut conn = Conn {
            client,
            client_ready: Ready::writable(),
            backend: None,
            backend_ready: Ready::default(),
            phase: Phase::Ended,
            up: Direction::default(),
            down: Direction::default(),
            first_eof: None,
            mode: if settings.splice {
                Mode::Splice
            } else {
                Mode::Copy
            },
            idle: settings.idle_timeout,
            last_active: now,
            timer_at: now,
            accepted: now,
            access: AccessLine::new(peer, &pool, End::ShutDown),
            listener_stats: Arc::clone(pool.stats()),
            _counted: counted,
        };
        // No backend is healthy: the pool was built for it, and the transition was logged
        // once; each connection is only counted here.
        match pool.all_unhealthy() {
            Some(AllUnhealthy::Reject) => {
                pool.stats().record_rejected_all_unhealthy();
                debug!(client = %peer, "no backend is healthy; closing (all_unhealthy = \"reject\")");
                conn.access.end = End::Rejected;
                conn.access.reason = Some(REASON_ALL_UNHEALTHY);
                return (conn, Status::Done);
            }
            Some(AllUnhealthy::RouteAnyway) => pool.stats().record_routed_all_unhealthy(),
            None => {}
        }
        // Small messages (requests, tokens) go out at once, not after Nagle's delay. On Linux
        // the client socket has it already, inherited from its listener (`listener::bind_one`).
        #[cfg(not(target_os = "linux"))]
        if let Err(e) = conn.client.set_nodelay(true) {
            debug!(error = %e, "cannot set TCP_NODELAY on client socket");
        }
        if let Err(e) = registry.register(&mut conn.client, tokens(Side::Client), INTEREST) {
            return (conn.failed(e), Status::Done);
        }
        let status = conn.connect(registry, tokens, pool, turn, Vec::new(), 1, now);
        (conn, status)
    }

    /// Tries backends from attempt `attempt` on until a connect is under way or none is left.
    #[allow(clippy::too_many_arguments)]
    fn connect(
        &mut self,
        registry: &Registry,
        tokens: Tokens<'_>,
        pool: Arc<Pool>,
        turn: u64,
        mut tried: Vec<usize>,
        mut attempt: u32,
        now: Instant,
    ) -> Status {
        let settings = pool.settings();
        while attempt <= settings.connect_attempts.get() {
            let Some((index, backend)) = pool.pick(turn, &tried) else {
                return self.no_backend(&pool, attempt - 1);
            };
            let mut stream = match open_backend(backend.addr, settings.backend_congestion_control) {
                Ok(stream) => stream,
                // The balancer's own limit, not the backend's fault: nothing is counted against
                // the backend (passive ejection would otherwise eject healthy backends while
                // the process is out of descriptors), and the client is kept waiting for a
                // descriptor rather than closed, which would only free one for the next accept
                // to take. The accept loop meanwhile backs off on the same error and logs it.
                Err(e) if out_of_descriptors(&e) => {
                    let give_up = later(self.accepted, settings.connect_timeout);
                    if now >= give_up {
                        return self.no_backend(&pool, attempt - 1);
                    }
                    debug!(client = %self.access.client, error = %e, "no descriptor for a backend socket; waiting");
                    self.backend = None;
                    self.phase = Phase::Connecting(Box::new(Connecting {
                        deadline: (now + DESCRIPTOR_WAIT).min(give_up),
                        pool,
                        turn,
                        tried,
                        index,
                        active: None,
                        attempt,
                        started: now,
                        no_socket: true,
                    }));
                    return Status::Open;
                }
                // No local port left toward this backend: the balancer's shortage too, so it is
                // not counted against the backend (whose health it says nothing about). Linux
                // picks a port per destination, so another backend may well have ports left:
                // the attempt moves on to it, as after a failed connect.
                Err(e) if no_local_port(&e, backend.addr) => {
                    pool.stats().record_connect_attempt();
                    pool.stats().record_connect_failure();
                    log_no_local_port(&pool, self.access.client, backend.addr, attempt, now);
                    tried.push(index);
                    attempt += 1;
                    continue;
                }
                Err(e) => {
                    pool.stats().record_connect_attempt();
                    connect_failed(&pool, self.access.client, index, attempt, &e.to_string());
                    tried.push(index);
                    attempt += 1;
                    continue;
                }
            };
            if let Err(e) = registry.register(&mut stream, tokens(Side::backend(attempt)), INTEREST)
            {
                // The worker's own epoll set refused it (out of memory, `max_user_watches`):
                // not the backend's fault either.
                self.access.end = End::Error;
                self.access.error = Some(format!("cannot watch the backend socket: {e}"));
                self.phase = Phase::Ended;
                return Status::Done;
            }
            pool.stats().record_connect_attempt();
            let active = BackendState::acquire(&backend.stats);
            self.backend = Some(stream);
            self.backend_ready = Ready::default();
            self.phase = Phase::Connecting(Box::new(Connecting {
                deadline: later(now, settings.connect_timeout),
                pool,
                turn,
                tried,
                index,
                active: Some(active),
                attempt,
                started: now,
                no_socket: false,
            }));
            return Status::Open;
        }
        self.no_backend(&pool, settings.connect_attempts.get())
    }

    /// No backend could be reached after `attempts` tries.
    fn no_backend(&mut self, pool: &Pool, attempts: u32) -> Status {
        pool.stats().record_no_backend();
        warn!(
            listener = %pool.name(),
            client = %self.access.client,
            attempts,
            "no backend reachable, closing client connection"
        );
        self.access.attempts = attempts;
        self.access.end = End::ConnectFailed;
        self.phase = Phase::Ended;
        Status::Done
    }

    /// The deadline of the connection's next timeout.
    pub(crate) fn deadline(&self) -> Instant {
        match &self.phase {
            Phase::Connecting(connecting) => connecting.deadline,
            _ => later(self.last_active, self.idle),
        }
    }

    /// The deadline of the connection's entry in the timer heap.
    pub(crate) fn timer_at(&self) -> Instant {
        self.timer_at
    }

    /// Records that the connection's timer heap entry is now due at `at`.
    pub(crate) fn set_timer_at(&mut self, at: Instant) {
        self.timer_at = at;
    }

    /// A readiness event for the socket on `side`.
    pub(crate) fn event(
        &mut self,
        registry: &Registry,
        tokens: Tokens<'_>,
        side: Side,
        event: &Event,
        now: Instant,
        scratch: &mut [u8],
    ) -> Status {
        match side {
            Side::Client => self.client_ready.update(event),
            Side::Backend { .. } => {
                if let Phase::Connecting(connecting) = &self.phase
                    && (connecting.no_socket || Side::backend(connecting.attempt) != side)
                {
                    // For the socket of an earlier attempt, closed since.
                    return Status::Open;
                }
                self.backend_ready.update(event);
            }
        }
        if let Phase::Connecting(_) = self.phase {
            if side == Side::Client || !(self.backend_ready.is_writable() || event.is_error()) {
                return Status::Open;
            }
            // A connect that failed is reported with EPOLLERR and EPOLLHUP; writable alone
            // means it succeeded (HAProxy reads the poll flags the same way). `SO_ERROR` is
            // then only read to name a failure: one system call less per connection.
            let clean = event.is_writable()
                && !event.is_error()
                && !event.is_write_closed()
                && !event.is_read_closed();
            let error = match self.backend.as_ref() {
                None => Some("no socket".to_owned()),
                Some(_) if clean => None,
                Some(backend) => match backend.take_error() {
                    Ok(None) => None,
                    Ok(Some(e)) | Err(e) => Some(e.to_string()),
                },
            };
            let status = match error {
                None => self.connected(now),
                Some(error) => self.retry(registry, tokens, &error, now),
            };
            if status == Status::Done || matches!(self.phase, Phase::Connecting(_)) {
                return status;
            }
        }
        self.relay(now, scratch)
    }

    /// The backend accepted: from now on the connection relays.
    fn connected(&mut self, now: Instant) -> Status {
        let Phase::Connecting(connecting) = std::mem::replace(&mut self.phase, Phase::Ended) else {
            return Status::Open;
        };
        let Connecting {
            pool,
            index,
            active,
            attempt,
            started,
            ..
        } = *connecting;
        let backend = &pool.backends()[index];
        let addr = backend.addr;
        let active = active.unwrap_or_else(|| BackendState::acquire(&backend.stats));
        active.stats().record_connected(now.duration_since(started));
        if let Some(backend) = &self.backend
            && let Err(e) = backend.set_nodelay(true)
        {
            debug!(error = %e, "cannot set TCP_NODELAY on backend socket");
        }
        debug!(client = %self.access.client, backend = %addr, "connected");
        self.access.backend = Some(addr);
        self.access.attempts = attempt;
        self.access.connect_time = Some(now.duration_since(self.accepted));
        self.last_active = now;
        // The pool goes with `connecting`: a long-lived stream does not keep a replaced
        // snapshot (and its tables) alive.
        self.phase = Phase::Relaying(active);
        Status::Open
    }

    /// The attempt under way failed with `error`: on to the next backend, if any.
    fn retry(
        &mut self,
        registry: &Registry,
        tokens: Tokens<'_>,
        error: &str,
        now: Instant,
    ) -> Status {
        let Phase::Connecting(connecting) = std::mem::replace(&mut self.phase, Phase::Ended) else {
            return Status::Open;
        };
        let Connecting {
            pool,
            turn,
            mut tried,
            index,
            active,
            attempt,
            ..
        } = *connecting;
        // Closing the socket takes it out of the worker's epoll set.
        self.backend = None;
        drop(active);
        connect_failed(&pool, self.access.client, index, attempt, error);
        tried.push(index);
        self.connect(registry, tokens, pool, turn, tried, attempt + 1, now)
    }

    /// The connection's deadline may have passed.
    pub(crate) fn timer(
        &mut self,
        registry: &Registry,
        tokens: Tokens<'_>,
        now: Instant,
    ) -> Status {
        let deadline = self.deadline();
        if now < deadline {
            return Status::Open;
        }
        match &self.phase {
            Phase::Connecting(connecting) if connecting.no_socket => {
                let Phase::Connecting(connecting) =
                    std::mem::replace(&mut self.phase, Phase::Ended)
                else {
                    return Status::Done;
                };
                let Connecting {
                    pool,
                    turn,
                    tried,
                    attempt,
                    ..
                } = *connecting;
                self.connect(registry, tokens, pool, turn, tried, attempt, now)
            }
            Phase::Connecting(connecting) => {
                let timeout = connecting.pool.settings().connect_timeout;
                let error = format!("timed out after {}", humantime::format_duration(timeout));
                self.retry(registry, tokens, &error, now)
            }
            Phase::Relaying(_) => {
                self.access.end = End::IdleTimeout;
                Status::Done
            }
            Phase::Ended => Status::Done,
        }
    }

    /// Moves what can be moved both ways.
    fn relay(&mut self, now: Instant, scratch: &mut [u8]) -> Status {
        let Phase::Relaying(active) = &self.phase else {
            return Status::Open;
        };
        let Some(backend) = &self.backend else {
            return Status::Done;
        };
        let stats = active.stats();
        let progress = |c: &Conn| c.up.moved + c.up.written + c.down.moved + c.down.written;
        let before = progress(self);
        let up = if self.up.done {
            Ok(Pumped::Waiting)
        } else {
            self.up.pump(
                BUDGET,
                &self.client,
                &mut self.client_ready,
                backend,
                &mut self.backend_ready,
                self.mode,
                scratch,
                &mut |n, path| stats.add_bytes_to_backend(n, path == Path::Spliced),
            )
        };
        let down = if self.down.done {
            Ok(Pumped::Waiting)
        } else {
            self.down.pump(
                BUDGET,
                backend,
                &mut self.backend_ready,
                &self.client,
                &mut self.client_ready,
                self.mode,
                scratch,
                &mut |n, path| stats.add_bytes_from_backend(n, path == Path::Spliced),
            )
        };
        if progress(self) != before {
            self.last_active = now;
        }
        let mut again = false;
        for (pumped, first, dst) in [
            (up, End::ClientClosed, backend),
            (down, End::BackendClosed, &self.client),
        ] {
            match pumped {
                Ok(Pumped::Waiting) => {}
                Ok(Pumped::Budget) => again = true,
                Ok(Pumped::Eof) => {
                    self.last_active = now;
                    if self.first_eof.is_none() {
                        // The first direction to end half-closes its destination so the peer
                        // sees the end of stream while the other direction goes on. When the
                        // other has already ended, the close that follows sends the same FIN:
                        // the shutdown is skipped, one system call fewer per connection
                        // (HAProxy skips it too). Nothing is left unread then, so the close is
                        // a FIN, not a reset.
                        self.first_eof = Some(first);
                        if let Err(e) = shutdown_write(dst) {
                            self.access.end = End::Error;
                            self.access.error = Some(e.to_string());
                            return Status::Done;
                        }
                    }
                }
                Err(e) => {
                    debug!(client = %self.access.client, error = %e, "relay ended with an error");
                    self.access.end = End::Error;
                    self.access.error = Some(e.to_string());
                    return Status::Done;
                }
            }
        }
        if self.up.done && self.down.done {
            self.access.end = self.first_eof.unwrap_or(End::ClientClosed);
            return Status::Done;
        }
        // A reset on a socket no direction is using: the client half-closed, then reset while
        // the backend is quiet (or the other way round). Unnoticed, the connection and its
        // other socket would stay open until the other side sent something or `idle_timeout`.
        for (ready, socket) in [
            (&mut self.client_ready, &self.client),
            (&mut self.backend_ready, backend),
        ] {
            if ready.take_error()
                && let Ok(Some(e)) | Err(e) = socket.take_error()
            {
                debug!(client = %self.access.client, error = %e, "relay ended with an error");
                self.access.end = End::Error;
                self.access.error = Some(e.to_string());
                return Status::Done;
            }
        }
        if again { Status::Again } else { Status::Open }
    }

    /// Goes on moving bytes after a [`Status::Again`].
    pub(crate) fn resume(&mut self, now: Instant, scratch: &mut [u8]) -> Status {
        self.relay(now, scratch)
    }

    /// Shutdown's grace period is over: the connection ends now.
    pub(crate) fn cut(&mut self) {
        debug!(client = %self.access.client, "shut down before the connection was done");
        self.access.end = End::ShutDown;
    }

    /// A bug (a panic) ended the connection.
    pub(crate) fn broke(&mut self) {
        self.access.end = End::Error;
        self.access.error = Some("internal error: the connection's handler panicked".to_owned());
    }

    /// A setup step failed: the connection ends with `error`.
    fn failed(mut self, error: io::Error) -> Conn {
        self.access.end = End::Error;
        self.access.error = Some(error.to_string());
        self
    }

    /// Logs and counts the connection; its sockets close when it is dropped.
    pub(crate) fn finish(mut self, now: Instant) {
        self.access.bytes_up = self.up.written;
        self.access.bytes_down = self.down.written;
        debug!(
            client = %self.access.client,
            backend = self.access.backend.map(tracing::field::display),
            end = %self.access.end,
            bytes_up = self.up.written,
            bytes_down = self.down.written,
            "closed"
        );
        let open_for = now.duration_since(self.accepted);
        self.listener_stats.record_duration(open_for);
        if self.access.enabled {
            self.access.log(open_for);
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Makes this thread's next [`Conn::start`] panic, as a bug there would.
    pub(crate) static PANIC_AT_START: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Makes this thread's next backend socket fail to open with this `errno`, as the kernel
    /// would when short of a resource a test cannot exhaust on a shared machine.
    pub(crate) static OPEN_FAILS_WITH: std::cell::Cell<Option<i32>> = const { std::cell::Cell::new(None) };
}

/// `at` + `d`, or a time too far away to matter if that is beyond what `Instant` holds (a
/// timeout of a few hundred billion years passes validation).
fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .or_else(|| at.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(at)
}

/// What the worker watches on both sockets of a connection. Priority is TCP urgent data: a read
/// stops short at its mark, and a splice stops there as if the stream had ended, so the relay
/// needs to know one is queued (see `relay::Ready`).
#[cfg(any(target_os = "linux", target_os = "android"))]
const INTEREST: Interest = Interest::READABLE
    .add(Interest::WRITABLE)
    .add(Interest::PRIORITY);
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const INTEREST: Interest = Interest::READABLE.add(Interest::WRITABLE);

/// How long a connection waits before trying again to open a backend socket when the process
/// is out of descriptors.
const DESCRIPTOR_WAIT: Duration = Duration::from_millis(20);

/// A non-blocking connect to `addr` under way, with congestion control `cc` if one is set.
///
/// `cc` goes on the socket *before* `connect`: on loopback or a fast LAN the handshake can
/// complete within the `connect` call, and the system's algorithm is initialised at that
/// moment. Under BBR that switches the kernel's pacing on for the socket, and changing the
/// algorithm afterwards never switches it off again, so set later the key would rename the
/// algorithm and keep the pacing it is there to remove. Without `cc` this is mio's connect.
fn open_backend(addr: SocketAddr, cc: Option<CongestionControl>) -> io::Result<TcpStream> {
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
        if !CC_FAILED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            warn!(backend = %addr, congestion_control = %cc, error = %e, "cannot set backend_congestion_control; backend connections use the system's congestion control (logged once)");
        } else {
            debug!(backend = %addr, congestion_control = %cc, error = %e, "cannot set backend_congestion_control");
        }
    }
    match rustix::net::connect(&socket, &addr) {
        Ok(()) | Err(rustix::io::Errno::INPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(TcpStream::from_std(std::net::TcpStream::from(socket)))
}

/// Set at the first failure to apply `backend_congestion_control` at run time.
static CC_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether `e`, from a TCP connect to `addr`, says every local port of the ephemeral range is
/// taken toward `addr`.
///
/// The kernel answers EADDRNOTAVAIL for that, and also when it has no source address for
/// `addr` at all: an IPv6 backend on a host with IPv6 disabled, say. That one is the backend's
/// address being unusable from here, which passive ejection should see, so the two are told
/// apart with a UDP socket connected to `addr`: it takes the same route and source address
/// choice without TCP's ports. One socket more, and only on this rare error.
fn no_local_port(e: &io::Error, addr: SocketAddr) -> bool {
    if e.raw_os_error() != Some(rustix::io::Errno::ADDRNOTAVAIL.raw_os_error()) {
        return false;
    }
    let any: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    std::net::UdpSocket::bind(any).is_ok_and(|probe| probe.connect(addr).is_ok())
}

/// When [`log_no_local_port`] last logged, in milliseconds since [`log_clock`]'s start (0:
/// never). A shortage of ports comes with thousands of connections a second: a line for
/// each would add the cost of logging to a machine already short of a resource.
static NO_LOCAL_PORT_LOGGED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The start of the clock [`NO_LOCAL_PORT_LOGGED`] counts on.
fn log_clock() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Logs, at most once a second, that a connect to `backend` found no local port.
fn log_no_local_port(
    pool: &Pool,
    client: SocketAddr,
    backend: SocketAddr,
    attempt: u32,
    now: Instant,
) {
    use std::sync::atomic::Ordering;
    // 1 ms past the clock's start at the least, so that a first line is never mistaken for
    // "never logged".
    let at = now.saturating_duration_since(log_clock()).as_millis() as u64 + 1;
    let last = NO_LOCAL_PORT_LOGGED.load(Ordering::Relaxed);
    if last != 0 && at < last + 1000 {
        return;
    }
    if NO_LOCAL_PORT_LOGGED
        .compare_exchange(last, at, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
    {
        warn!(
            listener = %pool.name(),
            %client,
            %backend,
            attempt,
            "no local port left for a connection to the backend (net.ipv4.ip_local_port_range); \
             not counted against the backend, trying another (logged at most once a second)"
        );
    }
}

/// Whether `e` says the process (or the system) has no descriptor or buffer left for a socket.
fn out_of_descriptors(e: &io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM.
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// Counts and logs a failed connect attempt to backend `index` of `pool` for `client`.
fn connect_failed(pool: &Pool, client: SocketAddr, index: usize, attempt: u32, error: &str) {
    let backend = &pool.backends()[index];
    let streak = backend.stats.record_connect_failure();
    pool.stats().record_connect_failure();
    warn!(
        listener = %pool.name(),
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

/// The access log's `reason` for a client refused because `max_connections` were open.
const REASON_MAX_CONNECTIONS: &str = "max_connections";
/// The access log's `reason` for a client refused because no backend was healthy.
const REASON_ALL_UNHEALTHY: &str = "all_unhealthy";

/// Logs the access line of a client connection refused because `max_connections` were open.
/// Called by the accept loop, which refuses before a connection exists.
pub(crate) fn log_rejected(pool: &Pool, peer: SocketAddr) {
    if !pool.settings().access_log {
        return;
    }
    let mut line = AccessLine::new(peer, pool, End::Rejected);
    line.reason = Some(REASON_MAX_CONNECTIONS);
    line.log(Duration::ZERO);
}

/// What the access log says about one client connection.
#[derive(Debug)]
struct AccessLine {
    client: SocketAddr,
    listener: Arc<str>,
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
    /// Why a rejected connection was rejected: the `reason` label of
    /// `weighbridge_connections_rejected_total`.
    reason: Option<&'static str>,
    error: Option<String>,
    /// The listener's `access_log` setting.
    enabled: bool,
}

impl AccessLine {
    /// The line of a connection from `client` to `pool`'s listener, with nothing known yet
    /// but how it ends if nothing else happens.
    fn new(client: SocketAddr, pool: &Pool, end: End) -> AccessLine {
        AccessLine {
            client,
            listener: Arc::clone(pool.name()),
            backend: None,
            connect_time: None,
            attempts: 0,
            bytes_up: 0,
            bytes_down: 0,
            end,
            reason: None,
            error: None,
            enabled: pool.settings().access_log,
        }
    }

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
            reason = self.reason,
            attempts = self.attempts,
            error = self.error.as_deref().map(tracing::field::display),
            "connection closed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::num::NonZeroUsize;
    use std::path::Path;

    use arc_swap::ArcSwap;
    use tokio_util::task::TaskTracker;

    use crate::backend::{Registry, Republisher};
    use crate::listener::{self, Serving};
    use crate::reactor::Command;
    use crate::snapshot::Snapshot;
    use crate::workers::Workers;

    /// A worker serving listener `lb` of config `text`, with no control task: (the worker, the
    /// listener's address, its pool, the republish wake-ups).
    fn one_worker(
        text: &str,
    ) -> (
        Workers,
        SocketAddr,
        Arc<Pool>,
        tokio::sync::mpsc::Receiver<()>,
    ) {
        let config = crate::config::parse(text, Path::new("t.toml")).expect("valid");
        let (republisher, woken) = Republisher::new();
        let registry = Registry::with_republisher(republisher);
        let snapshot = Snapshot::build(&config, &registry, &HashMap::new(), None);
        let pool = Arc::clone(snapshot.pool("lb").expect("listener lb"));
        let workers = Workers::start(NonZeroUsize::MIN).expect("a worker");
        let bound = listener::bind(&config.listeners[0], 1).expect("bind the listener");
        let serving = Serving {
            snapshots: Arc::new(ArcSwap::from_pointee(snapshot)),
            connections: TaskTracker::new(),
            placement: workers.placement().clone(),
        };
        for (id, socket) in bound.sockets.into_iter().enumerate() {
            let listen = Command::Listen {
                id: id as u64,
                name: "lb".to_owned(),
                socket,
                serving: serving.clone(),
            };
            assert!(workers.placement().remote(0).send(listen).is_ok());
        }
        (workers, bound.local_addr, pool, woken)
    }

    /// Bytes sent through in the budget test.
    const STREAM: usize = 8 << 20;
    /// How long the budget test's client waits on a read or a write before it fails.
    const LIMIT: Option<Duration> = Some(Duration::from_secs(10));

    /// With the crate's test budget of two reads, a few MiB cannot go through in one pump: they
    /// arrive only if the worker resumes a direction that stopped at its budget, which no new
    /// readiness event would prompt.
    #[test]
    fn a_stream_goes_through_in_budgets() {
        let backend = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a backend");
        let backend_addr = backend.local_addr().expect("backend address");
        // Counts what arrives and answers with the count once the client is done.
        std::thread::spawn(move || {
            let Ok((mut stream, _)) = backend.accept() else {
                return;
            };
            let mut buf = vec![0_u8; 1 << 20];
            let mut total = 0_u64;
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            if let Err(e) = stream.write_all(&total.to_be_bytes()) {
                eprintln!("test backend: {e}");
            }
        });
        let text = format!(
            "[[listener]]\nname = \"lb\"\nbind = \"127.0.0.1:0\"\n\
             [[listener.backend]]\naddr = \"{backend_addr}\"\n"
        );
        let (_workers, lb_addr, _pool, _woken) = one_worker(&text);
        let mut client = std::net::TcpStream::connect(lb_addr).expect("connect");
        for timeout in [
            client.set_read_timeout(LIMIT),
            client.set_write_timeout(LIMIT),
        ] {
            timeout.expect("a socket timeout");
        }
        client.write_all(&vec![9_u8; STREAM]).expect("send");
        client
            .shutdown(std::net::Shutdown::Write)
            .expect("end of stream");
        let mut count = [0_u8; 8];
        client
            .read_exact(&mut count)
            .expect("the backend's count arrives");
        assert_eq!(u64::from_be_bytes(count), STREAM as u64);
    }

    /// A backend on a thread of its own that sends `x` to every connection; its address.
    fn greeting_backend() -> SocketAddr {
        let backend = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a backend");
        let backend_addr = backend.local_addr().expect("backend address");
        std::thread::spawn(move || {
            for mut stream in backend.incoming().map_while(Result::ok) {
                if let Err(e) = stream.write_all(b"x") {
                    eprintln!("test backend: {e}");
                }
            }
        });
        backend_addr
    }

    /// Reads the greeting backend's `x` through `client` within 5 s; `served` says what a
    /// failure means.
    fn assert_greeted(client: &mut std::net::TcpStream, served: &str) {
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        let mut byte = [0_u8; 1];
        client.read_exact(&mut byte).expect(served);
        assert_eq!(&byte, b"x");
    }

    /// One worker, not started, and the command that gives it listener `lb` (in front of the
    /// greeting backend), bound at the address returned.
    fn unstarted_worker_with_listener() -> (
        crate::workers::Placement,
        crate::reactor::Reactor,
        Command,
        SocketAddr,
    ) {
        let backend_addr = greeting_backend();
        let text = format!(
            "[[listener]]\nname = \"lb\"\nbind = \"127.0.0.1:0\"\n\
             [[listener.backend]]\naddr = \"{backend_addr}\"\n"
        );
        let (placement, reactor, listen, addr, _pool) = unstarted_worker(&text);
        (placement, reactor, listen, addr)
    }

    /// One worker, not started, and the command that gives it listener `lb` of config `text`,
    /// bound at the address returned, with its pool.
    fn unstarted_worker(
        text: &str,
    ) -> (
        crate::workers::Placement,
        crate::reactor::Reactor,
        Command,
        SocketAddr,
        Arc<Pool>,
    ) {
        let config = crate::config::parse(text, Path::new("t.toml")).expect("valid");
        let registry = Registry::with_republisher(Republisher::new().0);
        let snapshot = Snapshot::build(&config, &registry, &HashMap::new(), None);
        let pool = Arc::clone(snapshot.pool("lb").expect("listener lb"));
        let (placement, reactor) = Workers::unstarted().expect("a worker");
        let mut bound = listener::bind(&config.listeners[0], 1).expect("bind the listener");
        let serving = Serving {
            snapshots: Arc::new(ArcSwap::from_pointee(snapshot)),
            connections: TaskTracker::new(),
            placement: placement.clone(),
        };
        let socket = bound.sockets.pop().expect("one socket");
        let listen = Command::Listen {
            id: 0,
            name: "lb".to_owned(),
            socket,
            serving,
        };
        (placement, reactor, listen, bound.local_addr, pool)
    }

    /// A bug (a panic) in a connection's first step closes that client only: the worker goes
    /// on serving the next one.
    #[test]
    fn a_panic_while_starting_a_connection_closes_only_that_connection() {
        let (placement, reactor, listen, addr) = unstarted_worker_with_listener();
        assert!(placement.remote(0).send(listen).is_ok());
        let worker = std::thread::spawn(move || {
            PANIC_AT_START.set(true);
            reactor.run();
        });
        let mut first = std::net::TcpStream::connect(addr).expect("connect");
        first
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        let mut byte = [0_u8; 1];
        match first.read(&mut byte) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("the first client is closed, not served: {other:?}"),
        }
        let mut second = std::net::TcpStream::connect(addr).expect("connect");
        assert_greeted(&mut second, "the worker serves the next client");
        assert!(placement.remote(0).send(Command::Exit).is_ok());
        worker.join().expect("the worker ends without a panic");
    }

    /// A listening socket given back to be closed first serves the connections already in its
    /// queue: their handshakes completed, and the close would reset them. The worker sees the
    /// socket and is told to give it back in the same turn, so nothing was accepted before.
    #[test]
    fn a_closing_listener_serves_the_connections_in_its_queue_first() {
        let (placement, reactor, listen, addr) = unstarted_worker_with_listener();
        // Queued: the kernel completes the handshakes before anyone accepts.
        let mut clients: Vec<std::net::TcpStream> = (0..3)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        let (reply, given_back) = tokio::sync::oneshot::channel();
        let unlisten = Command::Unlisten {
            id: 0,
            serve_queue: true,
            reply,
        };
        assert!(placement.remote(0).send(listen).is_ok());
        assert!(placement.remote(0).send(unlisten).is_ok());
        let worker = std::thread::spawn(move || {
            reactor.run();
            crate::reactor::QUEUE_ACCEPTS.get()
        });
        let socket = given_back
            .blocking_recv()
            .expect("the worker answers")
            .expect("the socket comes back");
        drop(socket);
        for client in &mut clients {
            assert_greeted(client, "served, not reset by the close");
        }
        assert!(placement.remote(0).send(Command::Exit).is_ok());
        let accepts = worker.join().expect("the worker ends");
        // One accept per queued client and one that finds the queue empty: an empty queue ends
        // the serving at once rather than being asked again up to the largest queue's size.
        assert_eq!(accepts, clients.len() + 1);
    }

    /// Serves one client through listener `lb` of config `text` on a worker whose first backend
    /// socket fails to open with EADDRNOTAVAIL; asserts the client is served (by the next
    /// backend) and returns the listener's pool once the worker has ended.
    fn serve_past_addrnotavail(text: &str) -> Arc<Pool> {
        let (placement, reactor, listen, addr, pool) = unstarted_worker(text);
        assert!(placement.remote(0).send(listen).is_ok());
        let worker = std::thread::spawn(move || {
            OPEN_FAILS_WITH.set(Some(rustix::io::Errno::ADDRNOTAVAIL.raw_os_error()));
            reactor.run();
        });
        let mut client = std::net::TcpStream::connect(addr).expect("connect");
        assert_greeted(&mut client, "served by the other backend");
        assert!(placement.remote(0).send(Command::Exit).is_ok());
        worker.join().expect("the worker ends without a panic");
        pool
    }

    /// No local port left toward a backend (EADDRNOTAVAIL) is the balancer's shortage, not the
    /// backend's failure: nothing is counted against the backend, so passive ejection cannot
    /// eject it, and the connection is served by another backend.
    #[test]
    fn no_local_port_is_not_counted_against_the_backend() {
        let (first, second) = (greeting_backend(), greeting_backend());
        let pool = serve_past_addrnotavail(&format!(
            "[[listener]]\nname = \"lb\"\nbind = \"127.0.0.1:0\"\n\
             [listener.passive]\nmax_connect_failures = 1\n\
             [[listener.backend]]\naddr = \"{first}\"\n\
             [[listener.backend]]\naddr = \"{second}\"\n"
        ));
        let failures: Vec<_> = pool
            .backends()
            .iter()
            .map(|b| {
                let state = &b.stats;
                (
                    state.consecutive_connect_failures(),
                    state.counters().connect_failures,
                )
            })
            .collect();
        assert_eq!(failures, [(0, 0), (0, 0)]);
        let listener = pool.stats().counters();
        assert_eq!(
            (listener.connect_attempts, listener.connect_failures),
            (2, 1)
        );
    }

    /// EADDRNOTAVAIL for a backend no socket can reach from here (no source address for it) is
    /// the backend's address being unusable, and counts against it like any failed connect.
    /// A link-local IPv6 address without a scope is one: no interface to send from.
    #[test]
    fn an_address_with_no_source_is_counted_against_the_backend() {
        let unusable: SocketAddr = "[fe80::1]:9".parse().expect("an address");
        let reachable = greeting_backend();
        let pool = serve_past_addrnotavail(&format!(
            "[[listener]]\nname = \"lb\"\nbind = \"127.0.0.1:0\"\n\
             [[listener.backend]]\naddr = \"{unusable}\"\n\
             [[listener.backend]]\naddr = \"{reachable}\"\n"
        ));
        let failures: Vec<_> = pool
            .backends()
            .iter()
            .map(|b| b.stats.counters().connect_failures)
            .collect();
        assert_eq!(failures, [1, 0]);
    }

    /// The connection path, passive ejection's part included, never waits for a backend's health
    /// mutex: with every one of them held by another thread, connections are served at once,
    /// and the connect failures that reach `max_connect_failures` ask for a republish without
    /// waiting either. No control task runs here, so nothing but a worker could be the one
    /// waiting.
    #[test]
    fn connections_are_served_while_every_health_lock_is_held() {
        let backend_addr = greeting_backend();
        // Bound and closed: connects to it are refused.
        let refusing_addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let text = format!(
            "[[listener]]\nname = \"lb\"\nbind = \"127.0.0.1:0\"\nconnect_attempts = 2\n\
             [listener.passive]\nmax_connect_failures = 2\n\
             [[listener.backend]]\naddr = \"{backend_addr}\"\n\
             [[listener.backend]]\naddr = \"{refusing_addr}\"\n"
        );
        let (_workers, lb_addr, pool, mut woken) = one_worker(&text);
        let states: Vec<_> = pool
            .backends()
            .iter()
            .map(|b| Arc::clone(&b.stats))
            .collect();
        // The locks are held until the test has finished with its connections: a worker that
        // waited for one would never serve, and the read timeout fails the test.
        let (locked, is_locked) = std::sync::mpsc::channel();
        let (done, is_done) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let guards: Vec<_> = states.iter().map(|s| s.lock_health()).collect();
            locked.send(()).expect("the test waits for the locks");
            // Returns when the test is done (or has panicked and dropped `done`).
            let _ = is_done.recv();
            drop(guards);
        });
        is_locked.recv().expect("the holder thread locks");

        for _ in 0..20 {
            let mut client = std::net::TcpStream::connect(lb_addr).expect("connect");
            assert_greeted(&mut client, "served while every health lock is held");
        }
        let refusing_state = &pool.backends()[1].stats;
        assert!(refusing_state.counters().connect_failures >= 2);
        assert!(
            woken.try_recv().is_ok(),
            "the threshold asked for a republish"
        );
        drop(done);
        holder.join().expect("the holder thread ends");
    }

    #[cfg(target_os = "linux")]
    /// The congestion control of this process's TCP socket from `local` to `peer`, found among
    /// its descriptors (a copy of each is taken with `pidfd_getfd`, which needs no `unsafe`).
    fn congestion_control_of(local: SocketAddr, peer: SocketAddr) -> Option<String> {
        use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};
        let me = pidfd_open(getpid(), PidfdFlags::empty()).expect("pidfd_open");
        let addr =
            |a: Option<rustix::net::SocketAddrAny>| a.and_then(|a| SocketAddr::try_from(a).ok());
        for entry in std::fs::read_dir("/proc/self/fd").expect("list descriptors") {
            let Some(fd) = entry
                .ok()
                .and_then(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            else {
                continue;
            };
            let Ok(copy) = pidfd_getfd(&me, fd, PidfdGetfdFlags::empty()) else {
                continue;
            };
            if addr(rustix::net::getsockname(&copy).ok()) == Some(local)
                && addr(rustix::net::getpeername(&copy).ok().flatten()) == Some(peer)
            {
                return rustix::net::sockopt::tcp_congestion(&copy).ok();
            }
        }
        None
    }

    /// `backend_congestion_control` reaches the socket toward the backend, and only that one.
    /// (The algorithm is set before `connect`, so it is in place once the backend accepts.)
    #[cfg(target_os = "linux")]
    #[test]
    fn the_backend_socket_gets_the_configured_congestion_control() {
        // An algorithm this process may set that differs from the system's, so the test tells
        // the two apart (Reno is always allowed; on a machine whose default is Reno and that
        // allows nothing else, there is no second one to tell apart).
        let sysctl = |name: &str| {
            std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).expect("sysctl")
        };
        let default = sysctl("tcp_congestion_control").trim().to_owned();
        let allowed = sysctl("tcp_allowed_congestion_control");
        let chosen = allowed
            .split_whitespace()
            .find(|cc| *cc != default)
            .unwrap_or("reno")
            .to_owned();

        let backend = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a backend");
        let backend_addr = backend.local_addr().expect("backend address");
        let text = format!(
            "[[listener]]\nname = \"lb\"\nbind = \"127.0.0.1:0\"\n\
             backend_congestion_control = \"{chosen}\"\n\
             [[listener.backend]]\naddr = \"{backend_addr}\"\n"
        );
        let (_workers, lb_addr, _pool, _woken) = one_worker(&text);
        let client = std::net::TcpStream::connect(lb_addr).expect("connect");
        let (_accepted, balancer_side) = backend.accept().expect("the balancer connects");

        assert_eq!(
            congestion_control_of(balancer_side, backend_addr).as_deref(),
            Some(chosen.as_str()),
            "the balancer's socket toward the backend"
        );
        let client_addr = client.local_addr().expect("client address");
        assert_eq!(
            congestion_control_of(lb_addr, client_addr),
            Some(default),
            "the balancer's socket toward the client keeps the system's"
        );
    }

    #[test]
    fn a_timeout_too_long_for_the_clock_means_never() {
        let now = Instant::now();
        assert!(later(now, Duration::MAX) > now + Duration::from_secs(3600 * 24 * 365));
        assert_eq!(
            later(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
    }

    #[test]
    fn tokens_keep_the_side_and_the_attempt_parity() {
        for side in [
            Side::Client,
            Side::Backend { odd_attempt: false },
            Side::Backend { odd_attempt: true },
        ] {
            assert_eq!(Side::from_bits(side.bits() | 0b1100), side);
        }
        assert_ne!(Side::backend(1), Side::backend(2));
        assert_eq!(Side::backend(1), Side::backend(3));
    }
}
