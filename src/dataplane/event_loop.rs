//! One worker's event loop: its listening sockets, its connections and their timers, driven by
//! one `epoll` instance (through `mio`) on one thread.
//!
//! Why not an async runtime per worker: a relayed request costs the balancer two `recv` and two
//! `send` either way, and everything else is overhead. A task per connection sends every
//! readiness event through waker registration, a scheduler queue and a poll of the
//! connection's whole future, and removes every socket from `epoll` explicitly before closing
//! it, which the close does by itself. HAProxy, nginx and Sōzu all run loops of this kind;
//! docs/benchmarks.md has what the difference measures.
//!
//! Here an event goes straight to its connection's state machine (`conn::Conn`),
//! which moves the bytes and returns. Timers are one heap of deadlines per worker, checked
//! lazily: a connection's activity only updates a timestamp, and an expired entry whose
//! connection has been active since is pushed again for its new deadline. The clock is read
//! once per turn of the loop.
//!
//! The control plane reaches a worker only through [`Remote`]: a channel of [`Command`]s and a
//! waker. Listening sockets are added and taken back that way, connections handed over from
//! another worker arrive that way, and so does the order to cut every connection at the end of
//! shutdown's grace period.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use tracing::{debug, error};

use super::conn::{Conn, Status};
use super::relay::SCRATCH;
use super::token::{LISTENER_BIT, MASK, Side, Tokens, WAKER, conn_of};
use crate::dataplane::accept::{ErrorPacer, Serving, is_connection_error};
use crate::snapshot::Listener;
use crate::state::{ListenerStats, take_freed};

use super::access_log::log_rejected;
use super::queue::{self, Grant};
use super::remote::{Adopted, Command, Counted, Remote};
use super::table::{Table, shrunk};

/// Connections accepted from one listener before the loop looks at the other events again: a
/// burst of new connections does not hold up the ones already open (nginx accepts one per
/// event by default; HAProxy a few dozen).
const ACCEPT_BATCH: usize = 16;
/// Events taken from the kernel per `epoll_wait`.
const EVENTS: usize = 1024;
/// Rounds of queue serving per turn of the loop (see [`Worker::serve_freed`]).
const SERVE_ROUNDS: usize = 8;

#[cfg(test)]
thread_local! {
    /// `accept` calls this thread made serving closing sockets' queues.
    pub(crate) static QUEUE_ACCEPTS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}
/// Stale timer entries tolerated beyond twice the open connections (see
/// [`Worker::prune_timers`]).
const PRUNE_FLOOR: usize = 1024;

/// A worker's loop before it runs: created on the thread that starts the workers, so that a
/// failure to create the `epoll` instance is an error there.
pub(crate) struct EventLoop {
    poll: Poll,
    commands: mpsc::Receiver<Command>,
    index: usize,
}

impl EventLoop {
    /// A new worker loop numbered `index`, and how to reach it.
    pub(crate) fn new(index: usize) -> io::Result<(EventLoop, Remote)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (send, commands) = mpsc::channel();
        let remote = Remote {
            commands: send,
            waker,
        };
        Ok((
            EventLoop {
                poll,
                commands,
                index,
            },
            remote,
        ))
    }

    /// Runs until [`Command::Exit`] or until every [`Remote`] is gone.
    pub(crate) fn run(self) {
        let EventLoop {
            mut poll,
            commands,
            index,
        } = self;
        let mut worker = Worker::new(index);
        let mut events = Events::with_capacity(EVENTS);
        loop {
            let timeout = worker.timeout();
            if let Err(e) = poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    error!(worker = index, error = %e, "epoll_wait failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            worker.now = Instant::now();
            let mut wake = false;
            for event in events.iter() {
                let token = event.token();
                if token == WAKER {
                    wake = true;
                } else if token.0 & LISTENER_BIT != 0 {
                    if let Some(Some(listener)) = worker.listeners.get_mut(token.0 & !LISTENER_BIT)
                    {
                        listener.ready = true;
                    }
                } else {
                    worker.conn_event(&poll, token, event);
                }
            }
            if wake {
                loop {
                    match commands.try_recv() {
                        Ok(Command::Exit) | Err(mpsc::TryRecvError::Disconnected) => return,
                        Ok(command) => worker.command(&poll, command),
                        Err(mpsc::TryRecvError::Empty) => break,
                    }
                }
            }
            worker.resume_all();
            worker.accept_all(&poll);
            worker.fire_timers(&poll);
            worker.serve_freed(&poll);
        }
    }
}

/// One listening socket of a worker.
struct Listening {
    id: u64,
    name: String,
    socket: TcpListener,
    serving: Serving,
    /// The socket has reported connections that have not all been accepted yet.
    ready: bool,
    /// After an accept error that is not about one connection: no accepting until then.
    paused_until: Option<Instant>,
    errors: ErrorPacer,
}

/// An open connection in the worker's table.
struct Slot {
    conn: Conn,
    /// In the worker's `again` list already.
    queued: bool,
}

/// The state of one worker's loop.
struct Worker {
    index: usize,
    /// Read once per turn of the loop, after `epoll_wait` returns.
    now: Instant,
    listeners: Vec<Option<Listening>>,
    slots: Table<Slot>,
    /// (deadline, slot, generation): one live entry per open connection, the one at its
    /// `timer_at`; others are stale and dropped when they come due or are pruned.
    timers: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    /// Shutdown's grace period is over: connections that arrive now are closed at once.
    cut: bool,
    /// (slot, generation) of connections that stopped at their budget with bytes possibly left.
    again: Vec<(u32, u32)>,
    /// Where the copy path reads into, shared by every connection of the worker.
    scratch: Box<[u8]>,
    /// The snapshot and the other workers, from the first listening socket: what serving a
    /// pool's queue needs.
    serving: Option<Serving>,
}

/// Runs `step` on `conn`; a panic in it ends that connection only ([`Status::Done`]), as a
/// panicking task did under tokio, instead of the worker and every connection on it.
fn guarded(conn: &mut Conn, step: impl FnOnce(&mut Conn) -> Status) -> Status {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| step(&mut *conn))) {
        Ok(status) => status,
        Err(_) => {
            error!("a connection's handler panicked; closing that connection");
            conn.mark_panicked();
            Status::Done
        }
    }
}

/// Puts a connection on the list of those to pump again next turn, unless it is on it already.
fn queue(again: &mut Vec<(u32, u32)>, queued: &mut bool, slot: usize, generation: u32) {
    if !*queued {
        *queued = true;
        again.push((slot as u32, generation));
    }
}

impl Worker {
    fn new(index: usize) -> Worker {
        Worker {
            index,
            now: Instant::now(),
            listeners: Vec::new(),
            slots: Table::new(),
            timers: BinaryHeap::new(),
            cut: false,
            again: Vec::new(),
            scratch: vec![0; SCRATCH].into_boxed_slice(),
            serving: None,
        }
    }

    /// How long `epoll_wait` may sleep: until the next timer or paused listener, not at all if a
    /// listener still has connections waiting.
    fn timeout(&self) -> Option<Duration> {
        if !self.again.is_empty() {
            return Some(Duration::ZERO);
        }
        let mut next = self.timers.peek().map(|Reverse((at, _, _))| *at);
        for listener in self.listeners.iter().flatten() {
            match listener.paused_until {
                Some(until) => next = Some(next.map_or(until, |n| n.min(until))),
                None if listener.ready => return Some(Duration::ZERO),
                None => {}
            }
        }
        // Rounded up to the next millisecond by `mio`, so a timer is never woken for early.
        next.map(|at| at.saturating_duration_since(Instant::now()))
    }

    fn command(&mut self, poll: &Poll, command: Command) {
        match command {
            Command::Listen {
                id,
                name,
                socket,
                serving,
            } => {
                let mut socket = TcpListener::from_std(socket);
                let entry = self
                    .listeners
                    .iter()
                    .position(Option::is_none)
                    .unwrap_or_else(|| {
                        self.listeners.push(None);
                        self.listeners.len() - 1
                    });
                if let Err(e) = poll.registry().register(
                    &mut socket,
                    Token(entry | LISTENER_BIT),
                    Interest::READABLE,
                ) {
                    // Closing it is the best left: the kernel then spreads the listener's
                    // connections over its other workers' sockets.
                    error!(listener = %name, worker = self.index, error = %e, "cannot watch a listening socket; closing it");
                    return;
                }
                if self.serving.is_none() {
                    self.serving = Some(serving.clone());
                }
                self.listeners[entry] = Some(Listening {
                    id,
                    name,
                    socket,
                    serving,
                    ready: true,
                    paused_until: None,
                    errors: ErrorPacer::default(),
                });
            }
            Command::Unlisten {
                id,
                serve_queue,
                reply,
            } => {
                let entry = self
                    .listeners
                    .iter()
                    .position(|l| l.as_ref().is_some_and(|l| l.id == id));
                if let (Some(entry), true) = (entry, serve_queue) {
                    self.serve_queue(poll, entry);
                }
                let result = match entry.and_then(|entry| self.listeners[entry].take()) {
                    Some(mut listening) => {
                        // Explicitly: the socket stays open, so its close will not do it. Were
                        // it to fail, the socket still goes back: its events would only find
                        // an empty entry here, and closing it would close the port.
                        if let Err(e) = poll.registry().deregister(&mut listening.socket) {
                            debug!(listener = %listening.name, error = %e, "cannot unwatch a listening socket");
                        }
                        debug!(listener = %listening.name, worker = self.index, "stopped accepting");
                        Ok(std::net::TcpListener::from(std::os::fd::OwnedFd::from(
                            listening.socket,
                        )))
                    }
                    None => Err(io::Error::other("no such listening socket")),
                };
                // The control task may have stopped waiting; nothing to do then.
                drop(reply.send(result));
            }
            Command::Adopt(adopted) => self.adopt(poll, *adopted),
            Command::Grant(grant) => self.grant(poll, *grant),
            Command::Dequeue {
                slot,
                generation,
                rejection,
            } => {
                let slot = slot as usize;
                if let Some(entry) = self.slots.get(slot, generation) {
                    let status = guarded(&mut entry.conn, |conn| conn.dequeued(rejection));
                    self.follow_up(slot, status);
                }
            }
            Command::Cut => {
                self.cut = true;
                // Highest first: closing the highest open entry drops the table's end.
                for slot in (0..self.slots.len()).rev() {
                    if let Some((_, entry)) = self.slots.entry(slot) {
                        entry.conn.cut();
                        self.close(slot);
                    }
                }
            }
            Command::Exit => {}
        }
    }

    /// Accepts from every listener that has connections waiting, up to [`ACCEPT_BATCH`] each.
    fn accept_all(&mut self, poll: &Poll) {
        for entry in 0..self.listeners.len() {
            let Some(listener) = self.listeners[entry].as_mut() else {
                continue;
            };
            if let Some(until) = listener.paused_until {
                if self.now < until {
                    continue;
                }
                listener.paused_until = None;
                listener.ready = true;
            }
            if !listener.ready {
                continue;
            }
            for _ in 0..ACCEPT_BATCH {
                let Some(listener) = self.listeners[entry].as_mut() else {
                    break;
                };
                match listener.socket.accept() {
                    Ok((stream, peer)) => {
                        listener.errors.reset();
                        self.admit(poll, entry, stream, peer);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        listener.ready = false;
                        break;
                    }
                    Err(e) if is_connection_error(&e) => {
                        debug!(listener = %listener.name, error = %e, "accept: connection gone before accepted");
                    }
                    Err(e) => {
                        let pause = listener.errors.failed(&listener.name, &e);
                        listener.paused_until = Some(self.now + pause);
                        break;
                    }
                }
            }
        }
    }

    /// Accepts and serves every connection waiting on listener entry `entry`, up to the most a
    /// listen queue can hold (`somaxconn` is at most 65,535), ignoring readiness and pauses.
    fn serve_queue(&mut self, poll: &Poll, entry: usize) {
        for _ in 0..=u16::MAX {
            let Some(listener) = self.listeners[entry].as_mut() else {
                return;
            };
            #[cfg(test)]
            QUEUE_ACCEPTS.set(QUEUE_ACCEPTS.get() + 1);
            match listener.socket.accept() {
                Ok((stream, peer)) => self.admit(poll, entry, stream, peer),
                // Empty: all served.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if is_connection_error(&e) => {}
                // An error that stops accepting (out of descriptors): what is left is reset
                // with the socket, as it would have been.
                Err(e) => {
                    debug!(listener = %listener.name, error = %e, "cannot serve the rest of a closing socket's queue");
                    return;
                }
            }
        }
    }

    /// A connection just accepted on listener entry `entry`: admitted against `max_connections` and
    /// served here or handed to a less loaded worker.
    fn admit(&mut self, poll: &Poll, entry: usize, stream: TcpStream, peer: SocketAddr) {
        let Some(listener) = self.listeners[entry].as_ref() else {
            return;
        };
        let name = &listener.name;
        // The snapshot is loaded once per connection; the connection keeps its listener (and
        // through it, its pool) as they are now.
        let Some(config) = listener.serving.snapshots.load().listener(name).cloned() else {
            debug!(listener = %name, "listener no longer configured, dropping connection");
            return;
        };
        let max = config.settings().max_connections.get() as u64;
        let Some(open) = ListenerStats::admit(config.stats(), max) else {
            debug!(listener = %name, client = %peer, max, "max_connections reached, closing");
            log_rejected(&config, peer);
            return;
        };
        let turn = config.turn(&open);
        let placed = listener.serving.placement.place(self.index, turn);
        let worker = placed.worker();
        let counted = Counted {
            _open: open,
            _placed: placed,
            _tracked: listener.serving.connections.token(),
        };
        if worker == self.index {
            self.start(poll, stream, peer, config, turn, counted);
            return;
        }
        // Not registered here yet: the socket goes to the other worker as it is, and nothing
        // has been read from it.
        let adopted = Adopted {
            stream: stream.into(),
            peer,
            listener: config,
            turn,
            counted,
        };
        let sent = listener
            .serving
            .placement
            .remote(worker)
            .send(Command::Adopt(Box::new(adopted)));
        // That worker has ended (it cannot, short of a bug): served here after all.
        if let Err(Command::Adopt(adopted)) = sent {
            error!(client = %peer, worker, "cannot hand a connection over; serving it here");
            self.adopt(poll, *adopted);
        }
    }

    /// Serves here a connection accepted by another worker.
    fn adopt(&mut self, poll: &Poll, adopted: Adopted) {
        let Adopted {
            stream,
            peer,
            listener,
            turn,
            counted,
        } = adopted;
        self.start(
            poll,
            TcpStream::from_std(stream),
            peer,
            listener,
            turn,
            counted,
        );
    }

    /// Hands a slot to a waiting client of this worker; if the client is gone, the slot goes
    /// back (and the queue is served again at the end of the turn).
    fn grant(&mut self, poll: &Poll, grant: Grant) {
        let Grant { waiter, granted } = grant;
        let slot = waiter.slot as usize;
        let Some((generation, Slot { conn, .. })) = self.slots.entry(slot) else {
            return;
        };
        if generation != waiter.generation {
            return;
        }
        let tokens = Tokens {
            worker: self.index,
            slot: slot as u32,
            generation,
        };
        let now = self.now;
        let status = guarded(conn, |conn| {
            conn.granted(poll.registry(), tokens, granted, now)
        });
        self.follow_up(slot, status);
    }

    /// Serves the queues of the pools in which this worker freed slots while clients waited
    /// (or into which its clients just queued). Grants for its own clients are handed over
    /// here; a grant whose client is gone frees its slot again, hence the loop, which a bound
    /// keeps from spinning (what is left is served at the end of the next turn).
    fn serve_freed(&mut self, poll: &Poll) {
        for _ in 0..SERVE_ROUNDS {
            let freed = take_freed();
            if freed.is_empty() {
                return;
            }
            let Some(serving) = self.serving.clone() else {
                return;
            };
            let snapshot = serving.snapshots.load();
            for state in freed {
                for grant in queue::serve(&snapshot, &state, &serving.placement, Some(self.index)) {
                    self.grant(poll, grant);
                }
            }
        }
    }

    /// Starts serving a connection on this worker.
    fn start(
        &mut self,
        poll: &Poll,
        stream: TcpStream,
        peer: SocketAddr,
        listener: Arc<Listener>,
        turn: u64,
        counted: Counted,
    ) {
        if self.cut {
            // Shutdown's grace period is over: not even a connect is tried.
            debug!(client = %peer, "shut down before the connection started");
            return;
        }
        let (now, worker) = (self.now, self.index);
        // Like `guarded` for the later steps: a bug in a connection's first step (its pick, its
        // first connect) closes that client only, not the worker and every connection on it.
        let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.slots.insert_with(|slot, generation| {
                // `slot` indexes a table that never holds more than one entry per open descriptor
                // pair.
                let tokens = Tokens {
                    worker,
                    slot: slot as u32,
                    generation,
                };
                let (conn, status) = Conn::start(
                    poll.registry(),
                    tokens,
                    stream,
                    peer,
                    listener,
                    turn,
                    counted,
                    now,
                );
                let queued = false;
                (Slot { conn, queued }, status)
            })
        }));
        match started {
            Ok((slot, status)) => self.follow_up(slot, status),
            Err(_) => {
                error!(client = %peer, "starting a connection panicked; closing that connection")
            }
        }
    }

    /// Makes sure the connection in `slot` has a timer heap entry due no later than its
    /// deadline. Deadlines mostly move later (activity), and then the old entry stays: when it
    /// comes due, [`Worker::fire_timers`] finds the connection's deadline later and pushes it
    /// again. Only a deadline earlier than the entry (a connect done, an idle timeout shorter
    /// than what is left of the connect timeout) needs a new entry; the old one is then stale.
    fn schedule(&mut self, slot: usize) {
        let Some((generation, Slot { conn, .. })) = self.slots.entry(slot) else {
            return;
        };
        let deadline = conn.deadline();
        if conn.timer_at() <= deadline && conn.timer_at() > self.now {
            return;
        }
        conn.set_timer_at(deadline);
        self.timers
            .push(Reverse((deadline, slot as u32, generation)));
    }

    fn conn_event(&mut self, poll: &Poll, token: Token, event: &mio::event::Event) {
        let (slot, masked) = conn_of(token);
        let Some((generation, Slot { conn, .. })) = self.slots.entry(slot) else {
            return;
        };
        if generation as usize & MASK != masked as usize {
            return;
        }
        let tokens = Tokens {
            worker: self.index,
            slot: slot as u32,
            generation,
        };
        let (now, scratch) = (self.now, &mut self.scratch);
        let status = guarded(conn, |conn| {
            conn.event(
                poll.registry(),
                tokens,
                Side::from_bits(token.0),
                event,
                now,
                scratch,
            )
        });
        self.follow_up(slot, status);
    }

    /// Acts on the `status` a call on the connection in `slot` returned: pumps it again next
    /// turn, reschedules its timer, or closes it.
    fn follow_up(&mut self, slot: usize, status: Status) {
        match status {
            Status::Done => self.close(slot),
            Status::Open => self.schedule(slot),
            Status::Again => {
                self.schedule(slot);
                if let Some((generation, entry)) = self.slots.entry(slot) {
                    queue(&mut self.again, &mut entry.queued, slot, generation);
                }
            }
        }
    }

    /// Pumps again the connections that stopped at their budget in the last turn.
    fn resume_all(&mut self) {
        let mut again = std::mem::take(&mut self.again);
        for &(slot, generation) in &again {
            let slot = slot as usize;
            let now = self.now;
            let Some(entry) = self.slots.get(slot, generation) else {
                continue;
            };
            entry.queued = false;
            let scratch = &mut self.scratch;
            let status = guarded(&mut entry.conn, |conn| conn.resume(now, scratch));
            self.follow_up(slot, status);
        }
        // Keeps the allocation for the next turn.
        again.clear();
        if self.again.is_empty() {
            self.again = again;
        }
    }

    /// Ends the connection in `slot`: logs and counts it, closes its sockets (which removes
    /// them from `epoll`: no `epoll_ctl` needed) and frees the slot.
    fn close(&mut self, slot: usize) {
        if let Some(Slot { conn, .. }) = self.slots.remove(slot) {
            conn.finish(self.now);
        }
        self.prune_timers();
    }

    /// Drops the heap entries of closed connections once they outnumber the open ones.
    ///
    /// A closed connection's entry stays until it comes due, up to `idle_timeout` later: with
    /// many connections living longer than the connect timeout, the heap would hold
    /// connections per second × `idle_timeout` entries. Pruning when the heap holds more than
    /// twice the open connections (plus a floor) keeps it proportional to what is open, at an
    /// amortised cost of a few entries checked per close.
    fn prune_timers(&mut self) {
        let open = self.slots.occupied();
        if self.timers.len() <= 2 * open + PRUNE_FLOOR {
            return;
        }
        let slots = &self.slots;
        self.timers.retain(|Reverse((at, slot, generation))| {
            slots
                .peek(*slot as usize, *generation)
                .is_some_and(|entry| entry.conn.timer_at() == *at)
        });
        // A spike's worth of entries is gone: so is its memory.
        if let Some(capacity) = shrunk(self.timers.capacity(), self.timers.len(), PRUNE_FLOOR) {
            self.timers.shrink_to(capacity);
        }
    }

    fn fire_timers(&mut self, poll: &Poll) {
        while let Some(&Reverse((at, slot, generation))) = self.timers.peek() {
            if at > self.now {
                break;
            }
            self.timers.pop();
            let slot = slot as usize;
            let Some(Slot { conn, .. }) = self.slots.get(slot, generation) else {
                continue;
            };
            if conn.timer_at() != at {
                // Superseded by an earlier entry (see `schedule`).
                continue;
            }
            let tokens = Tokens {
                worker: self.index,
                slot: slot as u32,
                generation,
            };
            let now = self.now;
            let status = guarded(conn, |conn| conn.timer(poll.registry(), tokens, now));
            self.follow_up(slot, status);
        }
    }
}

#[cfg(test)]
mod tests;
