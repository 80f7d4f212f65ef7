//! The running balancer: bound listeners, the published snapshot, and orderly shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::backend::{BackendCounters, ListenerCounters, Registry};
use crate::config::Config;
use crate::listener::{self, BindError, Bound};
use crate::snapshot::{Snapshot, SnapshotCell};

/// A balancer whose listeners are bound; [`run`](Balancer::run) starts serving.
#[derive(Debug)]
pub struct Balancer {
    bound: Vec<Bound>,
    shutdown_grace: Duration,
    handle: Handle,
}

/// A cheap, cloneable view of a balancer's live state, usable while it runs.
#[derive(Debug, Clone)]
pub struct Handle {
    snapshots: Arc<SnapshotCell>,
}

/// How [`Balancer::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// Connections still open when the grace period ran out, and therefore closed.
    pub cut_connections: usize,
}

impl Balancer {
    /// Binds every listener of `config`, all or nothing. Must be called inside a tokio runtime.
    pub fn bind(config: &Config) -> Result<Balancer, BindError> {
        let bound = config
            .listeners
            .iter()
            .map(listener::bind)
            .collect::<Result<Vec<_>, _>>()?;
        let registry = Registry::default();
        let snapshot = Snapshot::build(config, &registry);
        for (listener, bound) in config.listeners.iter().zip(&bound) {
            let backends: Vec<String> = listener
                .backends
                .iter()
                .map(|b| format!("{}*{}", b.addr, b.weight))
                .collect();
            info!(
                listener = %listener.name,
                bind = %bound.local_addr,
                strategy = %listener.strategy,
                backends = %backends.join(","),
                "listening"
            );
        }
        Ok(Balancer {
            bound,
            shutdown_grace: config.shutdown_grace,
            handle: Handle {
                snapshots: Arc::new(ArcSwap::from_pointee(snapshot)),
            },
        })
    }

    /// The address listener `name` is bound to (useful with port 0).
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.bound
            .iter()
            .find(|b| b.name == name)
            .map(|b| b.local_addr)
    }

    /// A handle on the live state.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Serves until `shutdown` is cancelled; then stops accepting (the listening sockets are
    /// closed at once), waits up to the configured grace period for open connections to finish,
    /// closes the rest and returns.
    pub async fn run(self, shutdown: CancellationToken) -> Stopped {
        let connections = TaskTracker::new();
        let stop = CancellationToken::new();
        let mut accept_loops = JoinSet::new();
        for bound in self.bound {
            accept_loops.spawn(listener::accept_loop(
                bound,
                Arc::clone(&self.handle.snapshots),
                shutdown.clone(),
                connections.clone(),
                stop.clone(),
            ));
        }
        shutdown.cancelled().await;
        // Each loop drops its socket as it returns: once joined, nothing listens any more.
        while let Some(joined) = accept_loops.join_next().await {
            if let Err(e) = joined {
                warn!(error = %e, "accept loop ended abnormally");
            }
        }
        connections.close();
        let open = connections.len();
        info!(open_connections = open, grace = %humantime::format_duration(self.shutdown_grace), "stopped accepting; waiting for open connections");
        if tokio::time::timeout(self.shutdown_grace, connections.wait())
            .await
            .is_ok()
        {
            info!("all connections finished");
            return Stopped { cut_connections: 0 };
        }
        let cut = connections.len();
        warn!(
            cut_connections = cut,
            "shutdown grace period over; closing remaining connections"
        );
        stop.cancel();
        connections.wait().await;
        Stopped {
            cut_connections: cut,
        }
    }
}

impl Handle {
    /// The snapshot in force now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.load_full()
    }

    /// Counters of backend `addr` in listener `listener`, if it is configured.
    pub fn backend_counters(&self, listener: &str, addr: SocketAddr) -> Option<BackendCounters> {
        let snapshot = self.snapshots.load();
        let pool = snapshot.pool(listener)?;
        let backend = pool.backends().iter().find(|b| b.addr == addr)?;
        Some(backend.stats.counters())
    }

    /// Counters of listener `name`, if it is configured.
    pub fn listener_counters(&self, name: &str) -> Option<ListenerCounters> {
        Some(self.snapshots.load().pool(name)?.stats().counters())
    }
}
