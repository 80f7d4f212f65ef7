//! One client connection: wait for a slot if its pool has none free, pick a backend, connect
//! (trying others on failure), relay both ways.
//!
//! [`Conn`] is a state machine its worker (`event_loop`) drives with readiness events and one
//! timer; each call does what can be done without waiting and returns. Everything that can go
//! wrong here stays with this connection: errors are logged and end it, never the worker or
//! another connection.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry};
use tracing::{debug, info, warn};

use super::access_log::{AccessLine, End, Reason};
use super::client_hello;
use super::connect::{
    DESCRIPTOR_WAIT, connect_failed, log_no_local_port, no_local_port, open_backend,
    out_of_descriptors,
};
use super::proxy;
use super::relay::{BUDGET, Direction, Mode, Path, Pumped, Ready, SCRATCH, shutdown_write};
use super::remote::Counted;
use super::throttle::Throttle;
use super::token::{Side, Tokens};
use crate::config::HashKey;
use crate::config::{AllUnhealthy, ProxyAccept};
use crate::snapshot::{Listener, Pool, Take};
use crate::state::{
    ActiveConn, BackendState, ClientGuard, Limited, ListenerStats, Refused, Rejection, note_freed,
};
use crate::strategy::{client_key, name_key};

/// How often each kind of refusal (bad PROXY header, denied, over a per-client limit, bad
/// ClientHello, no route) is logged at most.
const REFUSED_LOG_PERIOD: Duration = Duration::from_secs(1);

/// The throttles of those log lines, one per kind.
static REFUSED_LOG: [Throttle; 6] = [
    Throttle::new(),
    Throttle::new(),
    Throttle::new(),
    Throttle::new(),
    Throttle::new(),
    Throttle::new(),
];

/// The affinity key of a connection from `client` that asked for server name `name`, in
/// `pool`: `None` unless the pool hashes. A client that sent no name is keyed by its address.
fn keyed(pool: Option<&Arc<Pool>>, client: SocketAddr, name: Option<&str>) -> Option<u64> {
    match pool?.hash_key()? {
        HashKey::Sni if name.is_some() => name.map(name_key),
        HashKey::Sni | HashKey::ClientIp => Some(client_key(client.ip())),
    }
}

// A whole ClientHello fits the worker's buffer it is peeked into.
const _: () = assert!(SCRATCH >= client_hello::MAX_PEEK);

/// Whether a connection goes on after a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Open,
    /// Open, with bytes possibly left to move: [`Conn::resume`] in the next turn of the loop.
    Again,
    /// Over: the worker closes it with [`Conn::finish`].
    Done,
}

/// One client connection: wait for a slot if its pool has none free, pick a backend, connect
/// (trying others on failure), relay both ways.
///
/// A state machine driven by its worker (`event_loop`): readiness events, its timer, a slot
/// handed to it while it waits, and the order to cut. Everything that can go wrong here stays
/// with this connection: errors end it, never the worker or another connection.
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
    /// What only connections of listeners with client controls carry: the PROXY header's
    /// addresses, the per-client guard. One box, absent on most listeners: an idle
    /// connection's size counts.
    controls: Option<Box<ClientState>>,
    /// Keeps the connection in its worker's count while it lives.
    _counted: Counted,
}

/// Where a connection is in its life.
enum Phase {
    /// Waiting for the client's PROXY header.
    Header(Box<Awaiting>),
    /// Waiting for the client's TLS ClientHello, to pick its route (or its key).
    Hello(Box<Awaiting>),
    /// Waiting in its pool's queue for a free slot.
    Queued(Box<Queued>),
    /// Waiting for a backend to accept.
    Connecting(Box<Connecting>),
    /// Relaying; counts itself active on its backend.
    Relaying(ActiveConn),
    /// Over, or never started.
    Ended,
}

/// What the next connect attempt needs.
struct Plan {
    listener: Arc<Listener>,
    /// Which of the listener's pools the connection goes to (0 without routes).
    route: usize,
    /// Its affinity key, in a pool that keeps affinity.
    key: Option<u64>,
    /// The pool the indices in `tried` refer to when it is not the listener's: a newer
    /// snapshot's, whose queue handed the client a slot. `None` for nearly every connection,
    /// which so costs no reference count of its own.
    newer: Option<Arc<Pool>>,
    turn: u64,
    /// Backends already tried (indices into the pool).
    tried: Vec<usize>,
    /// The attempt to be made next (1 for the first).
    attempt: u32,
}

impl Plan {
    /// The pool the indices in `tried` refer to.
    fn pool(&self) -> &Arc<Pool> {
        match &self.newer {
            Some(newer) => newer,
            None => &self.listener.pools()[self.route],
        }
    }
}

/// A connect in progress.
struct Connecting {
    plan: Plan,
    /// The backend being tried now.
    index: usize,
    /// Counts the connection active on that backend (holding its slot) from the attempt on;
    /// none while waiting for a descriptor.
    active: Option<ActiveConn>,
    started: Instant,
    deadline: Instant,
    /// No socket could be opened (the process is out of descriptors): the attempt waits for
    /// one until `deadline` and is made again then.
    no_socket: bool,
}

/// A connection's client controls state (see `Conn::controls`).
#[derive(Default)]
struct ClientState {
    /// The (client, destination) pair an accepted PROXY header carried; `None` without one
    /// (or with a LOCAL one).
    from_header: Option<(SocketAddr, SocketAddr)>,
    /// Counts the connection as one of its client's, under `max_connections_per_client`.
    guard: Option<ClientGuard>,
}

/// A client whose PROXY header (or ClientHello) has not arrived whole yet.
struct Awaiting {
    listener: Arc<Listener>,
    turn: u64,
    /// `connect_timeout` (or `client_hello_timeout`) after it began waiting.
    deadline: Instant,
}

/// A client waiting for a slot.
struct Queued {
    plan: Plan,
    ticket: u64,
    since: Instant,
    /// `queue_timeout` after `since`.
    deadline: Instant,
}

/// A slot handed to a waiting client: backend `index` of `pool`, held by `active`.
pub(crate) struct Granted {
    pub(crate) pool: Arc<Pool>,
    pub(crate) index: usize,
    pub(crate) active: ActiveConn,
    pub(crate) turn: u64,
}

impl Conn {
    /// Starts serving `client`: the first connect attempt is under way (or the client waits
    /// for a slot) when this returns, unless the connection is already over ([`Status::Done`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        registry: &Registry,
        tokens: Tokens,
        client: TcpStream,
        peer: SocketAddr,
        listener: Arc<Listener>,
        turn: u64,
        counted: Counted,
        now: Instant,
    ) -> (Conn, Status) {
        #[cfg(test)]
        if PANIC_AT_START.replace(false) {
            panic!("injected: a bug in a connection's first step");
        }
        let settings = listener.settings();
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
            access: AccessLine::new(peer, &listener, End::ShutDown),
            listener_stats: Arc::clone(listener.stats()),
            controls: None,
            _counted: counted,
        };
        // Small messages (requests, tokens) go out at once, not after Nagle's delay. On Linux
        // the client socket has it already, inherited from its listener (`listener::bind_one`).
        #[cfg(not(target_os = "linux"))]
        if let Err(e) = conn.client.set_nodelay(true) {
            debug!(error = %e, "cannot set TCP_NODELAY on client socket");
        }
        if let Err(e) = registry.register(&mut conn.client, tokens.token(Side::Client), INTEREST) {
            return (conn.failed(e), Status::Done);
        }
        if listener.clients().accept_proxy.is_some() {
            if !listener.clients().trusts(peer.ip()) {
                conn.access.error = Some("PROXY header from an untrusted peer".to_owned());
                let status = conn.turn_away(&listener, Rejection::BadProxyHeader);
                return (conn, status);
            }
            conn.phase = Phase::Header(Box::new(Awaiting {
                deadline: later(now, listener.settings().connect_timeout),
                listener,
                turn,
            }));
            // The header may be there already: the first readiness event says so.
            return (conn, Status::Open);
        }
        // No scratch here: a hello that is there already is reported by the first readiness
        // event, which registering the socket raises.
        let status = conn.await_hello(registry, tokens, listener, turn, now, None);
        (conn, status)
    }

    /// Waits for the client's ClientHello if the listener reads it (to route by name, or for
    /// a pool keyed by name); else admits the client to the listener's one pool. With the
    /// worker's `scratch`, a hello already there is read at once.
    fn await_hello(
        &mut self,
        registry: &Registry,
        tokens: Tokens,
        listener: Arc<Listener>,
        turn: u64,
        now: Instant,
        scratch: Option<&mut [u8]>,
    ) -> Status {
        match listener.hello_timeout() {
            None => {
                let key = keyed(listener.pools().first(), self.access.client, None);
                self.admit(registry, tokens, listener, 0, key, turn, now)
            }
            Some(timeout) => {
                self.phase = Phase::Hello(Box::new(Awaiting {
                    deadline: later(now, timeout),
                    listener,
                    turn,
                }));
                // After a PROXY header the hello may have come with it, in a readiness event
                // spent on the header.
                match scratch {
                    Some(scratch) => self.read_hello(registry, tokens, now, scratch),
                    None => Status::Open,
                }
            }
        }
    }

    /// Reads the client's ClientHello if it has arrived whole, without consuming it, and sends
    /// the client on by the server name it asks for. The bytes are peeked into the worker's
    /// `scratch` buffer.
    fn read_hello(
        &mut self,
        registry: &Registry,
        tokens: Tokens,
        now: Instant,
        scratch: &mut [u8],
    ) -> Status {
        let Phase::Hello(awaiting) = &self.phase else {
            return Status::Open;
        };
        let listener = Arc::clone(&awaiting.listener);
        let len = client_hello::MAX_PEEK.min(scratch.len());
        let buf = &mut scratch[..len];
        let n = loop {
            match self.client.peek(buf) {
                Ok(n) => break n,
                // The rest arrives as a new readiness event.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Status::Open,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.bad_hello(&listener, &e.to_string()),
            }
        };
        let name = match client_hello::parse(&buf[..n]) {
            // A client that closes before sending anything sent no hello either.
            client_hello::Hello::Incomplete if n == 0 => {
                self.access.end = End::ClientClosed;
                self.phase = Phase::Ended;
                return Status::Done;
            }
            client_hello::Hello::Incomplete if self.client_ready.read_closed() => {
                return self.bad_hello(&listener, "closed before its ClientHello was whole");
            }
            client_hello::Hello::Incomplete => return Status::Open,
            client_hello::Hello::Invalid(why) => return self.bad_hello(&listener, why),
            client_hello::Hello::NotTls => None,
            client_hello::Hello::Read(name) => name,
        };
        self.route(registry, tokens, name, now)
    }

    /// Sends the waiting client to the pool of the first route matching `name` (the server
    /// name its ClientHello asked for, if any), keyed by it in a pool that hashes by name.
    fn route(
        &mut self,
        registry: &Registry,
        tokens: Tokens,
        name: Option<String>,
        now: Instant,
    ) -> Status {
        let Phase::Hello(awaiting) = std::mem::replace(&mut self.phase, Phase::Ended) else {
            return Status::Done;
        };
        let Awaiting { listener, turn, .. } = *awaiting;
        let route = match listener.routes() {
            None => Some(0),
            Some(table) => table.route(name.as_deref()),
        };
        let Some(route) = route else {
            self.access.error = Some(match &name {
                Some(name) => format!("no route for server name {name}"),
                None => "no server name, and no default route".to_owned(),
            });
            return self.turn_away(&listener, Rejection::NoRoute);
        };
        let key = keyed(
            listener.pools().get(route),
            self.access.client,
            name.as_deref(),
        );
        self.admit(registry, tokens, listener, route, key, turn, now)
    }

    /// Closes a client whose ClientHello is malformed, too large or late.
    fn bad_hello(&mut self, listener: &Listener, why: &str) -> Status {
        self.access.error = Some(why.to_owned());
        self.turn_away(listener, Rejection::BadClientHello)
    }

    /// Lets the client in, or not, by its address (the one its PROXY header gave, if any):
    /// the allow and deny lists, then the health of its pool (the listener's `route`th); then
    /// the first connect attempt.
    #[allow(clippy::too_many_arguments)]
    fn admit(
        &mut self,
        registry: &Registry,
        tokens: Tokens,
        listener: Arc<Listener>,
        route: usize,
        key: Option<u64>,
        turn: u64,
        now: Instant,
    ) -> Status {
        let client = self.access.client;
        if !listener.clients().admits(client.ip()) {
            return self.turn_away(&listener, Rejection::Denied);
        }
        let Some(pool) = listener.pools().get(route) else {
            return self.turn_away(&listener, Rejection::NoRoute);
        };
        // The pools of a listener that routes number their own picks: the accept's number
        // only spread the connection over the workers.
        let turn = if listener.routes().is_some() {
            pool.next_turn()
        } else {
            turn
        };
        // No backend is healthy: the pool was built for it, and the transition was logged
        // once; each connection is only counted here.
        let all_unhealthy = pool.all_unhealthy();
        if all_unhealthy == Some(AllUnhealthy::Reject) {
            listener.stats().record_rejected_all_unhealthy();
            debug!(%client, "no backend is healthy; closing (all_unhealthy = \"reject\")");
            self.discard_unread();
            self.access.end = End::Rejected;
            self.access.reason = Some(Reason::AllUnhealthy);
            return Status::Done;
        }
        // After the health verdict, so that a client closed for it spends no token.
        let limits = &listener.clients().limits;
        if !limits.is_unlimited() {
            match listener.stats().clients().admit(client.ip(), limits, now) {
                Ok(guard) => self.controls.get_or_insert_with(Box::default).guard = Some(guard),
                Err(Limited::Open) => return self.turn_away(&listener, Rejection::ClientLimit),
                Err(Limited::Rate) => return self.turn_away(&listener, Rejection::ClientRate),
            }
        }
        if all_unhealthy == Some(AllUnhealthy::RouteAnyway) {
            listener.stats().record_routed_all_unhealthy();
        }
        let plan = Plan {
            listener,
            route,
            key,
            newer: None,
            turn,
            tried: Vec::new(),
            attempt: 1,
        };
        self.connect(registry, tokens, plan, None, now)
    }

    /// Reads the client's PROXY header if it has arrived whole: the client's address is the
    /// one it carries from then on. Peeks first and reads no more than the header, so the
    /// client's own bytes stay in the socket for the relay.
    fn read_header(
        &mut self,
        registry: &Registry,
        tokens: Tokens,
        now: Instant,
        scratch: &mut [u8],
    ) -> Status {
        let Phase::Header(awaiting) = &self.phase else {
            return Status::Open;
        };
        let listener = Arc::clone(&awaiting.listener);
        let accept = listener.clients().accept_proxy.unwrap_or(ProxyAccept::Any);
        let mut buf = [0_u8; proxy::MAX_HEADER];
        let n = loop {
            match self.client.peek(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Status::Open,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.bad_header(&listener, &e.to_string()),
            }
        };
        if n == 0 {
            return self.bad_header(&listener, "closed before its PROXY header");
        }
        let (len, addresses) = match proxy::parse(&buf[..n], accept) {
            proxy::Parsed::Incomplete if self.client_ready.read_closed() => {
                return self.bad_header(&listener, "closed before its PROXY header was whole");
            }
            // The rest arrives as a new readiness event.
            proxy::Parsed::Incomplete => return Status::Open,
            proxy::Parsed::Invalid(why) => return self.bad_header(&listener, why),
            proxy::Parsed::Header { len, addresses } => (len, addresses),
        };
        let mut read = 0;
        while read < len {
            match io::Read::read(&mut self.client, &mut buf[read..len]) {
                Ok(0) => return self.bad_header(&listener, "closed in its PROXY header"),
                Ok(k) => read += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Peeked, so there; a failure here is the socket's.
                Err(e) => return self.bad_header(&listener, &e.to_string()),
            }
        }
        // A LOCAL (or UNKNOWN) header leaves the peer as the client, and the connection goes
        // on as any other from the peer would, as HAProxy does.
        if let Some((client, destination)) = addresses {
            self.access.client = client;
            self.controls.get_or_insert_with(Box::default).from_header =
                Some((client, destination));
        }
        let Phase::Header(awaiting) = std::mem::replace(&mut self.phase, Phase::Ended) else {
            return Status::Done;
        };
        let (listener, turn) = (awaiting.listener, awaiting.turn);
        self.await_hello(registry, tokens, listener, turn, now, Some(scratch))
    }

    /// Closes a client whose PROXY header is missing, malformed, too long or late.
    fn bad_header(&mut self, listener: &Listener, why: &str) -> Status {
        self.access.error = Some(why.to_owned());
        self.turn_away(listener, Rejection::BadProxyHeader)
    }

    /// Tries backends from `plan`'s attempt on until a connect is under way, the client waits
    /// for a slot, or no backend is left. `granted` is a slot handed over from the queue, for
    /// the first of these attempts.
    fn connect(
        &mut self,
        registry: &Registry,
        tokens: Tokens,
        mut plan: Plan,
        mut granted: Option<(usize, ActiveConn)>,
        now: Instant,
    ) -> Status {
        let settings = *plan.listener.settings();
        while plan.attempt <= settings.connect_attempts.get() {
            let pool = plan.pool();
            let (index, active) = match granted.take() {
                Some(granted) => granted,
                // Clients already waiting go first: a newcomer queues behind them.
                None if pool.slotted() && pool.state().waiting() > 0 => {
                    return self.wait(tokens, plan, now);
                }
                None => match pool.take_slot(plan.turn, plan.key, &plan.tried) {
                    Take::Slot(index, active) => (index, active),
                    Take::Full => return self.wait(tokens, plan, now),
                    Take::NoBackend => return self.no_backend(&plan, plan.attempt - 1),
                },
            };
            let addr = pool.backends()[index].addr;
            let attempt = plan.attempt;
            let mut stream = match open_backend(addr, settings.backend_congestion_control) {
                Ok(stream) => stream,
                // The balancer's own limit, not the backend's fault: nothing is counted against
                // the backend (passive ejection would otherwise eject healthy backends while
                // the process is out of descriptors), and the client is kept waiting for a
                // descriptor rather than closed, which would only free one for the next accept
                // to take. The accept loop meanwhile backs off on the same error and logs it.
                // The slot is given back meanwhile: a socket, not the backend, is missing.
                Err(e) if out_of_descriptors(&e) => {
                    drop(active);
                    let give_up = later(self.accepted, settings.connect_timeout);
                    if now >= give_up {
                        return self.no_backend(&plan, attempt - 1);
                    }
                    debug!(client = %self.access.client, error = %e, "no descriptor for a backend socket; waiting");
                    self.backend = None;
                    self.phase = Phase::Connecting(Box::new(Connecting {
                        deadline: (now + DESCRIPTOR_WAIT).min(give_up),
                        plan,
                        index,
                        active: None,
                        started: now,
                        no_socket: true,
                    }));
                    return Status::Open;
                }
                // No local port left toward this backend: the balancer's shortage too, so it is
                // not counted against the backend (whose health it says nothing about). Linux
                // picks a port per destination, so another backend may well have ports left:
                // the attempt moves on to it, as after a failed connect.
                Err(e) if no_local_port(&e, addr) => {
                    drop(active);
                    let stats = plan.listener.stats();
                    stats.record_connect_attempt();
                    stats.record_connect_failure();
                    log_no_local_port(&plan.listener, self.access.client, addr, attempt, now);
                    plan.tried.push(index);
                    plan.attempt += 1;
                    continue;
                }
                Err(e) => {
                    drop(active);
                    plan.listener.stats().record_connect_attempt();
                    connect_failed(
                        &plan.listener,
                        plan.pool(),
                        self.access.client,
                        index,
                        attempt,
                        &e.to_string(),
                    );
                    plan.tried.push(index);
                    plan.attempt += 1;
                    continue;
                }
            };
            if let Err(e) =
                registry.register(&mut stream, tokens.token(Side::backend(attempt)), INTEREST)
            {
                // The worker's own epoll set refused it (out of memory, `max_user_watches`):
                // not the backend's fault either.
                self.access.end = End::Error;
                self.access.error = Some(format!("cannot watch the backend socket: {e}"));
                self.phase = Phase::Ended;
                return Status::Done;
            }
            plan.listener.stats().record_connect_attempt();
            self.backend = Some(stream);
            self.backend_ready = Ready::default();
            self.phase = Phase::Connecting(Box::new(Connecting {
                deadline: later(now, settings.connect_timeout),
                plan,
                index,
                active: Some(active),
                started: now,
                no_socket: false,
            }));
            return Status::Open;
        }
        let attempts = settings.connect_attempts.get();
        self.no_backend(&plan, attempts)
    }

    /// Every slot of the pool is taken (or clients wait already): the client joins the queue,
    /// or is closed if it cannot.
    fn wait(&mut self, tokens: Tokens, plan: Plan, now: Instant) -> Status {
        let pool = plan.pool();
        let settings = *pool.settings();
        if settings.queue_timeout.is_zero() {
            pool.state().record_full();
            return self.turn_away(&plan.listener, Rejection::QueueFull);
        }
        let mut waiter = tokens.waiter();
        waiter.key = plan.key;
        match pool.state().enqueue(waiter, settings.max_queued) {
            Ok(ticket) => {
                // A slot freed between the pick and the enqueue saw no one waiting: the worker
                // serves the queue at the end of this turn, which finds it.
                note_freed(pool.state());
                debug!(client = %self.access.client, pool = %pool.name(), ticket, "every slot taken; waiting");
                self.phase = Phase::Queued(Box::new(Queued {
                    deadline: later(now, settings.queue_timeout),
                    since: now,
                    ticket,
                    plan,
                }));
                Status::Open
            }
            Err(Refused::Full) => self.turn_away(&plan.listener, Rejection::QueueFull),
            Err(Refused::Closed) => self.turn_away(&plan.listener, Rejection::Shutdown),
        }
    }

    /// A slot was handed to the waiting client: it connects with it now.
    pub(crate) fn granted(
        &mut self,
        registry: &Registry,
        tokens: Tokens,
        granted: Granted,
        now: Instant,
    ) -> Status {
        let Phase::Queued(queued) = std::mem::replace(&mut self.phase, Phase::Ended) else {
            // Not waiting (it cannot be, short of a bug): the slot goes back with the guard.
            return Status::Open;
        };
        let Queued {
            mut plan, since, ..
        } = *queued;
        let waited = now.saturating_duration_since(since);
        plan.pool().state().record_served(waited);
        self.access.set_queued(waited);
        // The index is into the pool as the snapshot that served the queue has it.
        if !Arc::ptr_eq(plan.pool(), &granted.pool) {
            plan.tried.clear();
            plan.newer = Some(granted.pool);
        }
        plan.turn = granted.turn;
        self.connect(
            registry,
            tokens,
            plan,
            Some((granted.index, granted.active)),
            now,
        )
    }

    /// The client gave up while waiting (it closed, or reset).
    fn abandon(&mut self) -> Status {
        if let Phase::Queued(queued) = std::mem::replace(&mut self.phase, Phase::Ended) {
            let state = queued.plan.pool().state();
            // Not in the queue any more: a slot is on its way, and goes back when it arrives.
            if state.leave(queued.ticket) {
                state.record_abandoned();
            }
            debug!(client = %self.access.client, pool = %queued.plan.pool().name(), "client left the queue");
        }
        self.access.end = End::ClientClosed;
        Status::Done
    }

    /// The waiting client is closed without a slot: its pool lost its last listener, or the
    /// balancer is stopping.
    pub(crate) fn dequeued(&mut self, rejection: Rejection) -> Status {
        let Phase::Queued(queued) = std::mem::replace(&mut self.phase, Phase::Ended) else {
            return Status::Open;
        };
        queued.plan.pool().state().record_closed();
        self.turn_away(&queued.plan.listener, rejection)
    }

    /// Closes the client without a backend, counted under `rejection`.
    fn turn_away(&mut self, listener: &Listener, rejection: Rejection) -> Status {
        self.discard_unread();
        listener.stats().record_rejected(rejection);
        let refused = match rejection {
            Rejection::BadProxyHeader => Some(0),
            Rejection::Denied => Some(1),
            Rejection::ClientLimit => Some(2),
            Rejection::ClientRate => Some(3),
            Rejection::BadClientHello => Some(4),
            Rejection::NoRoute => Some(5),
            _ => None,
        };
        // Refusals a client's own traffic can repeat thousands of times a second: one line a
        // second at most for each kind, with how many were not logged.
        if let Some(kind) = refused
            && let Some(suppressed) =
                REFUSED_LOG[kind].allow_counting(Instant::now(), REFUSED_LOG_PERIOD)
        {
            info!(
                client = %self.access.client,
                listener = %listener.name(),
                reason = rejection.as_str(),
                error = self.access.error.as_deref().unwrap_or(""),
                suppressed,
                "client refused"
            );
        }
        debug!(client = %self.access.client, listener = %listener.name(), reason = rejection.as_str(), "closing client connection");
        self.access.end = End::Rejected;
        self.access.reason = Some(Reason::Queue(rejection));
        self.phase = Phase::Ended;
        Status::Done
    }

    /// Reads and drops what a client turned away sent and nobody read (a request, while it
    /// waited), up to [`DISCARD_MAX`] bytes: closing a socket with unread bytes makes the kernel
    /// send a reset, and the client should see the connection closed, not reset.
    fn discard_unread(&mut self) {
        let mut buf = [0_u8; 4096];
        let mut left = DISCARD_MAX;
        while left > 0 {
            match io::Read::read(&mut &self.client, &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    }

    /// No backend could be reached after `attempts` tries.
    fn no_backend(&mut self, plan: &Plan, attempts: u32) -> Status {
        plan.listener.stats().record_no_backend();
        warn!(
            listener = %plan.listener.name(),
            pool = %plan.pool().name(),
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
            Phase::Header(awaiting) | Phase::Hello(awaiting) => awaiting.deadline,
            Phase::Connecting(connecting) => connecting.deadline,
            Phase::Queued(queued) => queued.deadline,
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
        tokens: Tokens,
        side: Side,
        event: &Event,
        now: Instant,
        scratch: &mut [u8],
    ) -> Status {
        match side {
            Side::Client => {
                self.client_ready.update(event);
                if let Phase::Header(_) = self.phase {
                    return self.read_header(registry, tokens, now, scratch);
                }
                if let Phase::Hello(_) = self.phase {
                    return self.read_hello(registry, tokens, now, scratch);
                }
                // Nothing is read from a waiting client; its end is watched for (HAProxy's
                // `option abortonclose`): one that closes, or closes its sending side, has
                // given up, and must not take a slot from the next in line.
                if let Phase::Queued(_) = self.phase {
                    if event.is_read_closed() || event.is_error() {
                        return self.abandon();
                    }
                    return Status::Open;
                }
            }
            Side::Backend { .. } => {
                if let Phase::Connecting(connecting) = &self.phase
                    && (connecting.no_socket || Side::backend(connecting.plan.attempt) != side)
                {
                    // For the socket of an earlier attempt, closed since.
                    return Status::Open;
                }
                if let Phase::Queued(_) = self.phase {
                    // Of an attempt before the client queued again.
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
            if status == Status::Done || !matches!(self.phase, Phase::Relaying(_)) {
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
            plan,
            index,
            active,
            started,
            ..
        } = *connecting;
        let backend = &plan.pool().backends()[index];
        let addr = backend.addr;
        let active = active.unwrap_or_else(|| BackendState::acquire(&backend.stats));
        active.stats().record_connected(now.duration_since(started));
        if let Some(backend) = &self.backend
            && let Err(e) = backend.set_nodelay(true)
        {
            debug!(error = %e, "cannot set TCP_NODELAY on backend socket");
        }
        let send_proxy = match backend.send_proxy {
            Some(own) => own.version(),
            None => plan.listener.clients().send_proxy,
        };
        if let Some(version) = send_proxy {
            // The addresses a PROXY header carried on, else this connection's own.
            let addresses = match self.controls.as_ref().and_then(|c| c.from_header) {
                Some(addresses) => Some(addresses),
                None => self
                    .client
                    .local_addr()
                    .ok()
                    .map(|local| (self.access.client, local)),
            };
            self.up.preamble(proxy::header(version, addresses));
        }
        debug!(client = %self.access.client, backend = %addr, "connected");
        self.access.backend = Some(addr);
        self.access.attempts = plan.attempt;
        self.access.connect_time = Some(now.duration_since(self.accepted));
        self.last_active = now;
        // The plan (and the snapshot's pool in it) goes with `connecting`: a long-lived stream
        // does not keep a replaced snapshot (and its tables) alive.
        self.phase = Phase::Relaying(active);
        Status::Open
    }

    /// The attempt under way failed with `error`: on to the next backend, if any.
    fn retry(&mut self, registry: &Registry, tokens: Tokens, error: &str, now: Instant) -> Status {
        let Phase::Connecting(connecting) = std::mem::replace(&mut self.phase, Phase::Ended) else {
            return Status::Open;
        };
        let Connecting {
            mut plan,
            index,
            active,
            ..
        } = *connecting;
        // Closing the socket takes it out of the worker's epoll set.
        self.backend = None;
        // The slot is free at once: the retry (or a waiting client) competes for it again.
        drop(active);
        connect_failed(
            &plan.listener,
            plan.pool(),
            self.access.client,
            index,
            plan.attempt,
            error,
        );
        plan.tried.push(index);
        plan.attempt += 1;
        self.connect(registry, tokens, plan, None, now)
    }

    /// The connection's deadline may have passed.
    pub(crate) fn timer(&mut self, registry: &Registry, tokens: Tokens, now: Instant) -> Status {
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
                self.connect(registry, tokens, connecting.plan, None, now)
            }
            Phase::Connecting(connecting) => {
                let timeout = connecting.plan.listener.settings().connect_timeout;
                let error = format!("timed out after {}", humantime::format_duration(timeout));
                self.retry(registry, tokens, &error, now)
            }
            Phase::Queued(queued) => {
                let state = queued.plan.pool().state();
                // Not in the queue any more: a slot is on its way, and goes back when it
                // arrives to find the client gone.
                if state.leave(queued.ticket) {
                    state.record_timed_out();
                }
                self.access
                    .set_queued(now.saturating_duration_since(queued.since));
                let listener = Arc::clone(&queued.plan.listener);
                self.turn_away(&listener, Rejection::QueueTimeout)
            }
            Phase::Header(awaiting) => {
                let listener = Arc::clone(&awaiting.listener);
                self.bad_header(&listener, "no whole PROXY header within connect_timeout")
            }
            Phase::Hello(awaiting) => {
                let listener = Arc::clone(&awaiting.listener);
                // Nothing at all sent: a client that waits for the server to speak first (no
                // TLS) takes the default route, as HAProxy's does after its inspect-delay.
                match self.client.peek(&mut [0_u8; 1]) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.route(registry, tokens, None, now)
                    }
                    _ => self.bad_hello(
                        &listener,
                        "no whole ClientHello within client_hello_timeout",
                    ),
                }
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

    /// Marks the connection as ended by a bug (a panic in one of its steps).
    pub(crate) fn mark_panicked(&mut self) {
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
}

/// Most bytes read and dropped from a client turned away (see [`Conn::discard_unread`]): a
/// request's worth. Beyond it the close resets.
const DISCARD_MAX: usize = 64 * 1024;

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
pub(super) const INTEREST: Interest = Interest::READABLE
    .add(Interest::WRITABLE)
    .add(Interest::PRIORITY);
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(super) const INTEREST: Interest = Interest::READABLE.add(Interest::WRITABLE);

#[cfg(test)]
mod tests;
