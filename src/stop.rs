//! The signal that ends the connections still open when shutdown's grace period is over.
//!
//! Every connection task waits on it beside its sockets, so it is polled on every wake-up of
//! every connection: hundreds of thousands of times a second under load. A shared
//! `CancellationToken` would take two mutexes on each of those polls (its tree node's and its
//! `Notify`'s waiter list), mutexes every worker thread shares: a cache line bouncing between
//! cores on the connection path. Here a connection's poll is one read of a flag that is
//! written once, at stop, and it registers its waker with its own worker's `Notify` only when
//! the waker changes (for a task: once). Registration and removal then lock a mutex only its
//! own worker uses.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use tokio::sync::Notify;
use tokio::sync::futures::Notified;

/// The stop signal of every worker; cloning it shares it.
#[derive(Debug, Clone)]
pub(crate) struct Stop {
    /// One per worker; see [`Signal`] for why each is apart from the others.
    signals: Arc<[Arc<Signal>]>,
}

impl Stop {
    /// A signal for `workers` workers (at least one).
    pub(crate) fn new(workers: usize) -> Stop {
        Stop {
            signals: (0..workers.max(1))
                .map(|_| Arc::new(Signal::default()))
                .collect(),
        }
    }

    /// What connections on worker `worker` wait on (taken modulo the worker count).
    pub(crate) fn signal(&self, worker: usize) -> Arc<Signal> {
        Arc::clone(&self.signals[worker % self.signals.len()])
    }

    /// Ends every wait, present and future.
    pub(crate) fn stop(&self) {
        for signal in self.signals.iter() {
            signal.stop();
        }
    }
}

/// One worker's part of a [`Stop`].
///
/// Aligned to 128 bytes (two cache lines, what adjacent-line prefetching pairs) so that no two
/// workers' signals share a line: each worker locks its own `Notify` as its connections start
/// and end, and separate small allocations could otherwise sit side by side.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Signal {
    stopped: AtomicBool,
    notify: Notify,
}

impl Signal {
    /// A signal of its own, not part of a [`Stop`].
    #[cfg(test)]
    pub(crate) fn new() -> Arc<Signal> {
        Arc::new(Signal::default())
    }

    pub(crate) fn stop(&self) {
        // The flag first: a waiter that is woken, or that comes later, finds it set.
        self.stopped.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Completes once [`Signal::stop`] has been called.
    pub(crate) fn stopped(&self) -> Stopped<'_> {
        Stopped {
            signal: self,
            // Created before the first look at the flag: a stop from here on either sets the
            // flag before that look or completes `notified` (notify_waiters reaches every
            // `Notified` created before it, polled or not). No stop is lost between the two.
            notified: self.notify.notified(),
            registered: None,
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Signal::stopped`]. A hand-written future rather than an `async fn`: it
    /// lives in every connection's task, and the `async fn` kept 40 bytes more, enough to cross
    /// one of the 128-byte steps tokio sizes tasks by (3.12 → 3.25 KiB per idle connection).
    pub(crate) struct Stopped<'a> {
        signal: &'a Signal,
        #[pin]
        notified: Notified<'a>,
        // The waker `notified` was registered with.
        registered: Option<Waker>,
    }
}

impl Future for Stopped<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.signal.stopped.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        // Registered with this very waker: the stop will wake it, nothing to renew.
        if this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        if this.notified.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        *this.registered = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::future::poll_fn;
    use std::time::Duration;

    /// Every worker's waiters end, whether they were waiting before the stop or come after it.
    #[tokio::test]
    async fn stop_ends_every_wait_on_every_worker() {
        let stop = Stop::new(3);
        let waiting: Vec<_> = (0..6)
            .map(|i| {
                let signal = stop.signal(i);
                tokio::spawn(async move { signal.stopped().await })
            })
            .collect();
        // Let every waiter register before the stop.
        tokio::task::yield_now().await;
        stop.stop();
        for task in waiting {
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("woken by the stop")
                .expect("the waiter ends normally");
        }
        tokio::time::timeout(Duration::from_secs(5), stop.signal(1).stopped())
            .await
            .expect("a wait begun after the stop ends at once");
    }

    /// A wait polled again with the same waker stays pending and still sees the stop; one polled
    /// with a new waker (moved to another task) is woken through the new one.
    #[tokio::test]
    async fn a_moved_wait_is_woken_through_its_new_waker() {
        let signal = Signal::new();
        let wait = {
            let signal = Arc::clone(&signal);
            async move { signal.stopped().await }
        };
        let mut wait = Box::pin(wait);
        // First polled by this task...
        assert!(futures_poll_once(&mut wait).await.is_pending());
        assert!(futures_poll_once(&mut wait).await.is_pending());
        // ... then handed to another one, which the stop must wake.
        let task = tokio::spawn(wait);
        tokio::task::yield_now().await;
        signal.stop();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the new task was woken")
            .expect("the waiter ends normally");
    }

    /// Polls `fut` once with the current task's waker.
    async fn futures_poll_once<F: std::future::Future + Unpin>(fut: &mut F) -> Poll<F::Output> {
        poll_fn(|cx| Poll::Ready(std::pin::Pin::new(&mut *fut).poll(cx))).await
    }
}
