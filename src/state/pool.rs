//! Live state of one pool: the queue of clients waiting for a free slot, its counters, and the
//! pool's turn sequence.
//!
//! The queue is first come, first served across worker threads: a waiting client is an entry
//! (its worker, its connection) under a ticket drawn from one counter, and whoever frees a slot
//! hands it to the entry with the lowest ticket, whichever worker holds that client. The entries
//! sit in an ordered map behind a mutex. Only clients that wait, and the threads that serve them,
//! take it: a pool whose queue is empty costs a connection one atomic load, of a line nobody
//! writes, when it frees a slot. HAProxy keeps its server and backend queues under a lock in the
//! same way.
//!
//! A freed slot is noticed where it is freed: dropping an [`ActiveConn`](super::ActiveConn) of a
//! pool with clients waiting notes the pool in a per-thread list, which the thread's event loop
//! takes with [`take_freed`] at the end of its turn and serves then. The release and the enqueue
//! order their two atomics sequentially consistently: a client that enqueues just as a slot
//! frees is either seen by the thread freeing it or sees the free slot itself when it tries
//! once more after enqueueing.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::histogram::{Histogram, QUEUE_WAIT_BOUNDS};

/// Where a waiting client is: its worker and its connection there (slot and generation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Waiter {
    /// The worker thread holding the client.
    pub worker: usize,
    /// The connection's slot in that worker's table.
    pub slot: u32,
    /// The slot's generation, so a reused slot is not mistaken for the client.
    pub generation: u32,
    /// The client's affinity key, in a pool that keeps affinity: its slot is taken by it.
    pub key: Option<u64>,
}

/// Why a client could not join the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `max_queued` clients wait already.
    Full,
    /// The balancer is shutting down: queues take nobody.
    Closed,
}

/// Live state of one pool, shared by every snapshot that has the pool.
#[derive(Debug)]
pub(crate) struct PoolState {
    name: Arc<str>,
    /// Waiting clients by ticket: the first entry is the oldest.
    queue: Mutex<BTreeMap<u64, Waiter>>,
    /// Entries in `queue`, read without the lock.
    waiting: AtomicUsize,
    next_ticket: AtomicU64,
    /// Set at shutdown: nobody joins any more.
    closed: AtomicBool,
    /// Picks made for the pool's connections: round robin's sequence when the pool is shared by
    /// listeners or has slots (a listener's own pool without slots numbers by its accepts).
    turns: AtomicU64,
    /// Connections open to the pool's backends (as [`BackendState::active`] counts them):
    /// the pool-wide load consistent hashing bounds each backend's share of.
    open: AtomicU64,
    queued: AtomicU64,
    served: AtomicU64,
    timed_out: AtomicU64,
    full: AtomicU64,
    abandoned: AtomicU64,
    closed_queued: AtomicU64,
    wait: Histogram,
}

/// A point-in-time copy of one pool's queue counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounters {
    /// Clients waiting now.
    pub length: u64,
    /// Clients that joined the queue since start.
    pub queued: u64,
    /// Of those, the ones that got a slot.
    pub served: u64,
    /// Closed after `queue_timeout` without a slot.
    pub timed_out: u64,
    /// Closed at once because `max_queued` clients were waiting (or `queue_timeout` is 0).
    pub full: u64,
    /// Left the queue by disconnecting.
    pub abandoned: u64,
    /// Closed while waiting because the pool lost its last listener or the balancer stopped.
    pub closed: u64,
}

impl PoolState {
    /// The state of pool `name`.
    pub(crate) fn new(name: &str) -> PoolState {
        PoolState {
            name: name.into(),
            queue: Mutex::default(),
            waiting: AtomicUsize::new(0),
            next_ticket: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            turns: AtomicU64::new(0),
            open: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            served: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            full: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            closed_queued: AtomicU64::new(0),
            wait: Histogram::new(QUEUE_WAIT_BOUNDS),
        }
    }

    /// The pool's name.
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Clients waiting now (lock-free; may be a moment out of date).
    #[inline]
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// The next number of the pool's turn sequence.
    pub(crate) fn next_turn(&self) -> u64 {
        self.turns.fetch_add(1, Ordering::Relaxed)
    }

    /// Connections open to the pool's backends now.
    #[inline]
    pub(crate) fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Counts a connection opened (`true`) or closed on one of the pool's backends.
    #[inline]
    pub(crate) fn count_open(&self, opened: bool) {
        if opened {
            self.open.fetch_add(1, Ordering::Relaxed);
        } else {
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Turns handed out so far.
    pub(crate) fn turns(&self) -> u64 {
        self.turns.load(Ordering::Relaxed)
    }

    /// Puts `waiter` at the end of the queue unless `max_queued` wait already; its ticket.
    pub(crate) fn enqueue(&self, waiter: Waiter, max_queued: usize) -> Result<u64, Refused> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Refused::Closed);
        }
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if queue.len() >= max_queued {
            drop(queue);
            self.full.fetch_add(1, Ordering::Relaxed);
            return Err(Refused::Full);
        }
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        queue.insert(ticket, waiter);
        self.waiting.fetch_add(1, Ordering::SeqCst);
        drop(queue);
        self.queued.fetch_add(1, Ordering::Relaxed);
        Ok(ticket)
    }

    /// Counts a client closed at once because the queue takes nobody (`queue_timeout` 0).
    pub(crate) fn record_full(&self) {
        self.full.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes the client with `ticket` out of the queue; false if it is no longer there (a slot
    /// was handed to it, and is on its way).
    pub(crate) fn leave(&self, ticket: u64) -> bool {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let left = queue.remove(&ticket).is_some();
        if left {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        left
    }

    /// Hands slots to the oldest waiting clients for as long as `take` finds one: each client
    /// taken out is returned with its slot, oldest first.
    pub(crate) fn serve<S>(&self, mut take: impl FnMut(&Waiter) -> Option<S>) -> Vec<(Waiter, S)> {
        let mut served = Vec::new();
        if self.waiting() == 0 {
            return served;
        }
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(entry) = queue.first_entry() {
            let Some(slot) = take(entry.get()) else {
                break;
            };
            served.push((entry.remove(), slot));
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        served
    }

    /// Takes every client out of the queue, to be closed; with `close`, nobody joins any more.
    pub(crate) fn drain(&self, close: bool) -> Vec<Waiter> {
        if close {
            self.closed.store(true, Ordering::SeqCst);
        }
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let drained: Vec<Waiter> = std::mem::take(&mut *queue).into_values().collect();
        self.waiting.fetch_sub(drained.len(), Ordering::SeqCst);
        drained
    }

    /// Records a waiting client that got its slot after `waited`.
    pub(crate) fn record_served(&self, waited: Duration) {
        self.served.fetch_add(1, Ordering::Relaxed);
        self.wait.record(waited);
    }

    /// Records a client closed after `queue_timeout`.
    pub(crate) fn record_timed_out(&self) {
        self.timed_out.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a client that disconnected while waiting.
    pub(crate) fn record_abandoned(&self) {
        self.abandoned.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a waiting client closed because the pool lost its listeners or the balancer stopped.
    pub(crate) fn record_closed(&self) {
        self.closed_queued.fetch_add(1, Ordering::Relaxed);
    }

    /// How long the clients that got a slot waited for it.
    pub(crate) fn wait(&self) -> &Histogram {
        &self.wait
    }

    /// A copy of the queue's counters.
    pub(crate) fn counters(&self) -> QueueCounters {
        QueueCounters {
            length: self.waiting() as u64,
            queued: self.queued.load(Ordering::Relaxed),
            served: self.served.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
            full: self.full.load(Ordering::Relaxed),
            abandoned: self.abandoned.load(Ordering::Relaxed),
            closed: self.closed_queued.load(Ordering::Relaxed),
        }
    }
}

thread_local! {
    /// Pools in which this thread freed a slot while clients waited, to be served at the end of
    /// the thread's turn (see the module's documentation).
    static FREED: RefCell<Vec<Arc<PoolState>>> = const { RefCell::new(Vec::new()) };
}

/// Notes that this thread freed a slot of `pool`, if clients wait there.
#[inline]
pub(crate) fn note_freed(pool: &Arc<PoolState>) {
    if pool.waiting() == 0 {
        return;
    }
    FREED.with_borrow_mut(|freed| {
        if !freed.iter().any(|p| Arc::ptr_eq(p, pool)) {
            freed.push(Arc::clone(pool));
        }
    });
}

/// The pools in which this thread freed slots while clients waited, since the last call.
pub(crate) fn take_freed() -> Vec<Arc<PoolState>> {
    FREED.with_borrow_mut(std::mem::take)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter(slot: u32) -> Waiter {
        Waiter {
            worker: 0,
            slot,
            generation: 0,
            key: None,
        }
    }

    #[test]
    fn the_oldest_waiter_is_served_first_and_a_left_one_never() {
        let pool = PoolState::new("p");
        let a = pool.enqueue(waiter(1), 10).expect("room");
        let b = pool.enqueue(waiter(2), 10).expect("room");
        let _c = pool.enqueue(waiter(3), 10).expect("room");
        assert!(a < b);
        assert!(pool.leave(b));
        assert!(!pool.leave(b), "gone already");
        let mut slots = 1;
        let served = pool.serve(|_| (slots > 0).then(|| slots -= 1));
        assert_eq!(served, vec![(waiter(1), ())]);
        assert_eq!(pool.waiting(), 1);
        let served = pool.serve(|_| Some(()));
        assert_eq!(served, vec![(waiter(3), ())]);
        assert_eq!(pool.waiting(), 0);
    }

    #[test]
    fn a_full_queue_refuses_and_counts_and_a_drained_closed_one_takes_nobody() {
        let pool = PoolState::new("p");
        pool.enqueue(waiter(1), 2).expect("room");
        pool.enqueue(waiter(2), 2).expect("room");
        assert_eq!(pool.enqueue(waiter(3), 2), Err(Refused::Full));
        assert_eq!(pool.counters().full, 1);
        assert_eq!(pool.drain(true), vec![waiter(1), waiter(2)]);
        assert_eq!(pool.waiting(), 0);
        assert_eq!(pool.enqueue(waiter(4), 2), Err(Refused::Closed));
    }

    #[test]
    fn freed_slots_are_noted_only_while_clients_wait() {
        let pool = Arc::new(PoolState::new("p"));
        note_freed(&pool);
        assert!(take_freed().is_empty());
        pool.enqueue(waiter(1), 2).expect("room");
        note_freed(&pool);
        note_freed(&pool);
        assert_eq!(take_freed().len(), 1);
        assert!(take_freed().is_empty());
    }
}
