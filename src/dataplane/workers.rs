//! The data path's threads: one event loop per thread (`event_loop`), "thread per core".
//!
//! Every listener has one listening socket per worker (`SO_REUSEPORT`), and each worker runs an
//! accept loop on its own socket. The kernel spreads new connections over the sockets, and a
//! connection lives its whole life on the worker that accepted it, so a readiness event wakes
//! the thread that will do the work, and the per-thread buffers and pipes of the relay
//! stay in that core's cache. This is how
//! HAProxy (`nbthread` with per-thread listeners) and nginx (`reuseport`) spend their cores.
//! A work-stealing runtime serves fewer short connections and keep-alive requests per second,
//! most of the difference being cross-thread wake-ups (docs/benchmarks.md).
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
//! runtime that calls `Balancer::run`; it reaches the workers only through
//! their [`Remote`]s and the shared snapshot and counters.

use std::io;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::dataplane::event_loop::EventLoop;
use crate::dataplane::remote::{Command, Remote};

/// Worker threads, each running its own event loop until the set is dropped.
#[derive(Debug)]
pub(crate) struct Workers {
    placement: Placement,
}

/// Where connections run: the workers and how many connections each holds.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    remotes: Arc<[Remote]>,
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

    /// How to reach worker `index`; `index` is below [`count`](Placement::count).
    pub(crate) fn remote(&self, index: usize) -> &Remote {
        &self.remotes[index]
    }

    /// How many workers there are.
    pub(crate) fn count(&self) -> usize {
        self.remotes.len()
    }

    /// Sends `command` to every worker.
    pub(crate) fn broadcast(&self, command: impl Fn() -> Command) {
        for remote in self.remotes.iter() {
            // A worker that has ended has nothing left to act on.
            let _ = remote.send(command());
        }
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
        let mut remotes = Vec::with_capacity(count.get());
        for index in 0..count.get() {
            let started = EventLoop::new(index).and_then(|(event_loop, remote)| {
                std::thread::Builder::new()
                    .name(format!("weighbridge-worker-{index}"))
                    .spawn(move || event_loop.run())?;
                Ok(remote)
            });
            match started {
                Ok(remote) => remotes.push(remote),
                Err(e) => {
                    // The workers already started end with their remotes' Exit, whichever
                    // step failed (an epoll or eventfd refused, or the thread itself).
                    for remote in &remotes {
                        // Already gone if this fails: nothing more to stop.
                        let _ = Remote::send(remote, Command::Exit);
                    }
                    return Err(e);
                }
            }
        }
        let loads = (0..count.get()).map(|_| Load::default()).collect();
        Ok(Workers {
            placement: Placement {
                remotes: remotes.into(),
                loads,
            },
        })
    }

    /// One worker whose loop the caller runs (`EventLoop::run`) when it chooses: commands sent
    /// before then are all handled in its first turn, before it accepts anything.
    #[cfg(test)]
    pub(crate) fn unstarted() -> io::Result<(Placement, EventLoop)> {
        let (event_loop, remote) = EventLoop::new(0)?;
        let placement = Placement {
            remotes: vec![remote].into(),
            loads: vec![Load::default()].into(),
        };
        Ok((placement, event_loop))
    }

    /// Where connections run, for the accept loops and the status readers.
    pub(crate) fn placement(&self) -> &Placement {
        &self.placement
    }
}

impl Drop for Workers {
    /// Each worker closes what it still has and ends.
    fn drop(&mut self) {
        self.placement.broadcast(|| Command::Exit);
    }
}

/// Workers to start when the config does not say: one per core the process may run on.
pub(crate) fn default_count() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
