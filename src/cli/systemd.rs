//! systemd's notification protocol (`Type=notify`): READY=1 once every listener accepts,
//! RELOADING=1 with MONOTONIC_USEC and then READY=1 around each reload, STOPPING=1 when shutdown
//! starts, and WATCHDOG=1 pings while the control task answers. Without `NOTIFY_SOCKET` (not
//! under systemd) every notification is a no-op.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, warn};
use weighbridge::{Handle, Lifecycle};

use super::upgrade::Predecessor;

/// Sends `states` to the service manager; a failure is logged, never fatal (the balancer
/// serves whether or not systemd hears of it).
pub(crate) fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "cannot notify the service manager");
    }
}

/// What the binary tells systemd at each [`Lifecycle`] moment. `handed_over` is set once the
/// listening sockets belong to a new process (a binary upgrade): this one's shutdown is then
/// not the service's, and says nothing.
///
/// A process started by a binary upgrade (`predecessor`) becomes the service's main process
/// when it is ready (`MAINPID`), before it lets the old one go: systemd must not take the old
/// one's exit for the service's.
pub(crate) fn observer(
    handed_over: Arc<AtomicBool>,
    predecessor: Option<Predecessor>,
) -> impl Fn(Lifecycle) + Send + Sync {
    move |moment| match moment {
        Lifecycle::Ready => {
            notify(&[NotifyState::MainPid(std::process::id()), NotifyState::Ready]);
            if let Some(predecessor) = &predecessor {
                predecessor.ready();
            }
        }
        Lifecycle::Reloaded => notify(&[NotifyState::Ready]),
        Lifecycle::Reloading => match NotifyState::monotonic_usec_now() {
            Ok(now) => notify(&[NotifyState::Reloading, now]),
            Err(e) => {
                warn!(error = %e, "cannot read the monotonic clock");
                notify(&[NotifyState::Reloading]);
            }
        },
        Lifecycle::Stopping if handed_over.load(Ordering::SeqCst) => {}
        Lifecycle::Stopping => notify(&[NotifyState::Stopping]),
        _ => {}
    }
}

/// Pings systemd's watchdog every half `WATCHDOG_USEC`, each time the control task has
/// answered: a control loop that is stuck stops the pings, and systemd restarts the service.
/// Returns at once when no watchdog is set, and when the balancer has stopped.
pub(crate) async fn watchdog(handle: Handle) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (period / 2).max(Duration::from_millis(1));
    debug!(every_ms = every.as_millis(), "pinging the systemd watchdog");
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match tokio::time::timeout(every, handle.alive()).await {
            Ok(true) => notify(&[NotifyState::Watchdog]),
            Ok(false) => return,
            Err(_) => warn!(
                waited_ms = every.as_millis(),
                "the control task did not answer; watchdog ping withheld"
            ),
        }
    }
}
