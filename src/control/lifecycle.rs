//! What a process supervisor wants to hear from a running balancer: that it serves, that a reload
//! starts and ends, that shutdown starts. The library only reports these moments to the
//! observer set with [`Builder::on_lifecycle`](crate::Builder::on_lifecycle); the binary turns
//! them into systemd notifications.

use std::fmt;
use std::sync::Arc;

/// A moment in a balancer's life, as the control task passes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lifecycle {
    /// Every listener is bound and accepting, and the first snapshot is in force.
    Ready,
    /// A reload (file watcher, SIGHUP, the admin endpoint, [`Handle::apply`](crate::Handle::apply))
    /// starts.
    Reloading,
    /// That reload ended, applied or refused: the balancer serves again as before or as new.
    Reloaded,
    /// Shutdown started: no new connections; open ones drain.
    Stopping,
}

/// The observer of a balancer's [`Lifecycle`], called on the control task, in order.
pub(crate) type Observer = Arc<dyn Fn(Lifecycle) + Send + Sync>;

/// An optional [`Observer`].
#[derive(Clone, Default)]
pub(crate) struct Observers(Option<Observer>);

impl Observers {
    pub(crate) fn new(observer: Option<Observer>) -> Observers {
        Observers(observer)
    }

    /// Tells the observer, if there is one.
    pub(crate) fn tell(&self, moment: Lifecycle) {
        if let Some(observer) = &self.0 {
            observer(moment);
        }
    }
}

impl fmt::Debug for Observers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Observers")
            .field(&self.0.as_ref().map(|_| "Fn(Lifecycle)"))
            .finish()
    }
}
