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
//! The control plane (control task, health checkers, admin endpoint, reload watcher) stays on the
//! runtime that calls [`crate::balancer::Balancer::run`]; it reaches the workers only through
//! [`Handle::spawn`] and the shared snapshot and counters.

use std::io;
use std::num::NonZeroUsize;
use std::time::Duration;

use tokio::runtime::{Builder, Handle};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// Period of each worker's pacing timer (see [`pace_timers`]).
const TIMER_PACE: Duration = Duration::from_millis(250);

/// Worker threads, each driving its own current-thread runtime until the set is dropped.
#[derive(Debug)]
pub(crate) struct Workers {
    handles: Vec<Handle>,
    /// Cancelled on drop: each worker's runtime then stops and drops the tasks it still has.
    stop: CancellationToken,
}

impl Workers {
    /// Starts `count` workers.
    pub(crate) fn start(count: NonZeroUsize) -> io::Result<Workers> {
        // Built up in place so that an error part-way stops the workers already started.
        let mut workers = Workers {
            handles: Vec::with_capacity(count.get()),
            stop: CancellationToken::new(),
        };
        for index in 0..count.get() {
            // I/O and timers only: signals are the control plane's (a signal driver per
            // worker would only hold another descriptor).
            let runtime = Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()?;
            let handle = runtime.handle().clone();
            handle.spawn(pace_timers());
            let stop = workers.stop.clone();
            std::thread::Builder::new()
                .name(format!("weighbridge-worker-{index}"))
                .spawn(move || runtime.block_on(stop.cancelled()))?;
            workers.handles.push(handle);
        }
        Ok(workers)
    }

    /// One handle per worker, to spawn accept loops on.
    pub(crate) fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// How many workers there are.
    pub(crate) fn count(&self) -> usize {
        self.handles.len()
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
        assert_eq!(workers.count(), 2);
        let names: Vec<String> = workers
            .handles()
            .iter()
            .map(|handle| {
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

    #[test]
    fn dropping_the_workers_stops_their_threads() {
        let workers = Workers::start(NonZeroUsize::MIN).expect("workers");
        let (send, receive) = std::sync::mpsc::channel::<()>();
        // The task holds the sender until its runtime drops it.
        workers.handles()[0].spawn(async move {
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
