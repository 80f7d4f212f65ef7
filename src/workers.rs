//! The data path's threads: one single-threaded tokio runtime per thread ("thread per core").
//!
//! Every listener has one listening socket per worker (`SO_REUSEPORT`), and each worker runs an
//! accept loop on its own socket. The kernel spreads new connections over the sockets, and a
//! connection lives its whole life on the worker that accepted it: its task is never handed to
//! another thread, so a readiness event wakes the thread that will do the work, and the
//! per-thread buffers and pipes of [`crate::proxy`] stay in that core's cache. This is how
//! HAProxy (`nbthread` with per-thread listeners) and nginx (`reuseport`) spend their cores.
//! A work-stealing runtime measured 10–25 % fewer short connections and keep-alive requests per
//! second here, most of the difference being cross-thread wake-ups (see the README's
//! Performance section).
//!
//! The kernel spreads connections by a hash of their addresses, blind to how busy each worker
//! is: 16 long-lived streams over two workers land 10/6 or worse about half the time, and a
//! work-stealing runtime would have evened that out. So each accept loop asks [`Placement`]
//! where a new connection should live: on its own worker unless that one holds clearly more
//! connections than another worker it compares with (see [`choose`]), in which case the socket
//! moves to that worker before anything is read from it (HAProxy also picks a less loaded
//! thread at accept). Short connections at a steady rate seldom move; long-lived streams end up even.
//!
//! The control plane (control task, health checkers, admin endpoint, reload watcher) stays on the
//! runtime that calls [`crate::balancer::Balancer::run`]; it reaches the workers only through
//! [`Handle::spawn`] and the shared snapshot and counters.

use std::io;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::runtime::{Builder, Handle};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// Period of each worker's pacing timer (see [`pace_timers`]).
const TIMER_PACE: Duration = Duration::from_millis(250);

/// Worker threads, each driving its own current-thread runtime until the set is dropped.
#[derive(Debug)]
pub(crate) struct Workers {
    placement: Placement,
    /// Cancelled on drop: each worker's runtime then stops and drops the tasks it still has.
    stop: CancellationToken,
}

/// Where connections run: the workers' runtimes and how many connections each holds.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    handles: Arc<[Handle]>,
    loads: Arc<[Load]>,
}

/// One worker's open connections, on a cache line of its own: written by that worker (and by
/// an accept loop handing it a connection), read by the other workers' accept loops.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Load(AtomicUsize);

/// A connection counted on the worker it runs on until dropped.
#[derive(Debug)]
#[must_use = "the connection is only counted while this lives"]
pub(crate) struct Placed {
    loads: Arc<[Load]>,
    worker: usize,
}

impl Placed {
    /// The worker the connection runs on.
    pub(crate) fn worker(&self) -> usize {
        self.worker
    }
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.loads[self.worker].0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Placement {
    /// Chooses the worker for a connection accepted on worker `here` and counts it there.
    ///
    /// `nonce` varies from one connection to the next (the connection's turn): it picks the
    /// other worker compared with.
    pub(crate) fn place(&self, here: usize, nonce: u64) -> Placed {
        let workers = self.loads.len();
        let worker = if workers < 2 {
            here
        } else {
            // Any worker but `here`; the remainder is below `workers`, so the cast is exact.
            let other = (here + 1 + (nonce % (workers as u64 - 1)) as usize) % workers;
            let load = |i: usize| self.loads[i].0.load(Ordering::Relaxed);
            choose(here, load(here), other, load(other))
        };
        self.loads[worker].0.fetch_add(1, Ordering::Relaxed);
        Placed {
            loads: Arc::clone(&self.loads),
            worker,
        }
    }

    /// Worker `index`'s runtime; `index` is below [`count`](Placement::count).
    pub(crate) fn handle(&self, index: usize) -> &Handle {
        &self.handles[index]
    }

    /// How many workers there are.
    pub(crate) fn count(&self) -> usize {
        self.handles.len()
    }

    /// Open connections on each worker, in worker order.
    pub(crate) fn loads(&self) -> Vec<usize> {
        self.loads
            .iter()
            .map(|load| load.0.load(Ordering::Relaxed))
            .collect()
    }
}

/// The worker for a connection accepted on worker `here` (holding `mine` connections), given
/// one `other` worker and its load.
///
/// It stays where it was accepted (no hand-over, no cross-thread wake-up) unless that worker
/// holds more than the other plus a quarter of that (at least one more); then it goes to the
/// other. Comparing with one other worker, a different one each time ("two choices"), keeps the
/// cost at two loads however many workers there are — reading every worker's counter, each
/// written by its own core, would cost a cache miss per worker per connection on a large
/// machine — and still brings loads within about a quarter of each other (within two when
/// there are few).
fn choose(here: usize, mine: usize, other: usize, theirs: usize) -> usize {
    if mine <= theirs + (theirs / 4).max(1) {
        here
    } else {
        other
    }
}

impl Workers {
    /// Starts `count` workers.
    pub(crate) fn start(count: NonZeroUsize) -> io::Result<Workers> {
        let stop = CancellationToken::new();
        // Stops the workers already started if a later one fails.
        let guard = stop.clone().drop_guard();
        let mut handles = Vec::with_capacity(count.get());
        for index in 0..count.get() {
            // I/O and timers only: signals are the control plane's (a signal driver per
            // worker would only hold another descriptor).
            let runtime = Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()?;
            let handle = runtime.handle().clone();
            handle.spawn(pace_timers());
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("weighbridge-worker-{index}"))
                .spawn(move || runtime.block_on(stop.cancelled()))?;
            handles.push(handle);
        }
        guard.disarm();
        let loads = (0..count.get()).map(|_| Load::default()).collect();
        Ok(Workers {
            placement: Placement {
                handles: handles.into(),
                loads,
            },
            stop,
        })
    }

    /// Where connections run, for the accept loops and the status readers.
    pub(crate) fn placement(&self) -> &Placement {
        &self.placement
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Keeps a timer due within [`TIMER_PACE`] on the worker, so that registering a connection's
/// timers does not cost a system call.
///
/// tokio's timer driver wakes the I/O driver (an `eventfd` write, then an extra trip through
/// `epoll_wait`) whenever a timer is registered with a deadline earlier than the one the driver
/// last parked for, even when the registering thread *is* the driver's thread and it is not
/// parked (tokio issue #5207). Every connection registers a connect timeout and an idle timer,
/// and on a quiet worker they are the earliest: 0.75 wake-ups per connection measured with
/// `perf` on `Connection: close` traffic. With this timer always due soon, the driver never
/// parks for longer than the pace, and timeouts of `connect_timeout` (≥ 2 s by default) or
/// `idle_timeout` lie beyond its wake-up: no wake-up is needed. The price is four wake-ups a
/// second per idle worker.
async fn pace_timers() {
    let mut pace = tokio::time::interval(TIMER_PACE);
    pace.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        pace.tick().await;
    }
}

/// Workers to start when the config does not say: one per core the process may run on.
pub(crate) fn default_count() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_their_own_worker_thread() {
        let workers = Workers::start(NonZeroUsize::new(2).expect("2 > 0")).expect("workers");
        let placement = workers.placement();
        assert_eq!(placement.count(), 2);
        let names: Vec<String> = (0..2)
            .map(|index| {
                let handle = placement.handle(index);
                let (send, receive) = std::sync::mpsc::channel();
                handle.spawn(async move {
                    let name = std::thread::current().name().map(str::to_owned);
                    send.send(name).expect("the test waits");
                });
                receive
                    .recv_timeout(std::time::Duration::from_secs(5))
                    .expect("the worker ran the task")
                    .expect("a named thread")
            })
            .collect();
        assert_eq!(names, ["weighbridge-worker-0", "weighbridge-worker-1"]);
    }

    /// Places `n` connections accepted on the workers in `accepted_on` order, cycling; the
    /// connection's index is its nonce.
    fn place_all(placement: &Placement, accepted_on: &[usize], n: usize) -> Vec<Placed> {
        (0..n)
            .map(|i| placement.place(accepted_on[i % accepted_on.len()], i as u64))
            .collect()
    }

    #[test]
    fn connections_stay_where_accepted_while_loads_are_even() {
        let workers = Workers::start(NonZeroUsize::new(2).expect("2 > 0")).expect("workers");
        let placement = workers.placement();
        let placed = place_all(placement, &[0, 1], 40);
        assert!(placed.iter().enumerate().all(|(i, p)| p.worker() == i % 2));
        assert_eq!(placement.loads(), [20, 20]);
        drop(placed);
        assert_eq!(placement.loads(), [0, 0]);
    }

    #[test]
    fn a_lopsided_hash_is_evened_out() {
        let workers = Workers::start(NonZeroUsize::new(3).expect("3 > 0")).expect("workers");
        let placement = workers.placement();
        // Every connection lands on worker 0, as an unlucky hash can make it.
        let mut placed = place_all(placement, &[0], 8);
        assert_eq!(placement.loads(), [4, 2, 2]);
        placed.extend(place_all(placement, &[0], 92));
        let loads = placement.loads();
        let (fewest, most) = (loads.iter().min(), loads.iter().max());
        assert!(
            most.zip(fewest).is_some_and(|(m, f)| m - f <= f / 4 + 1),
            "{loads:?}"
        );
        // Connections closing on one worker send the next ones compared with it there.
        placed.retain(|p| p.worker() != 2);
        let next = placement.place(0, 1);
        assert_eq!(next.worker(), 2);
    }

    #[test]
    fn dropping_the_workers_stops_their_threads() {
        let workers = Workers::start(NonZeroUsize::MIN).expect("workers");
        let (send, receive) = std::sync::mpsc::channel::<()>();
        // The task holds the sender until its runtime drops it.
        workers.placement().handle(0).spawn(async move {
            let _send = send;
            std::future::pending::<()>().await;
        });
        drop(workers);
        assert_eq!(
            receive.recv_timeout(std::time::Duration::from_secs(5)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected),
            "the runtime stopped and dropped its task"
        );
    }
}
