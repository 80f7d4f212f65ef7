//! The listening sockets a running balancer hands to its workers, taken back on a reload or at
//! shutdown, and the wait for open connections at the end.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Config, Forward, ListenerConfig, Routes};
use crate::dataplane::accept::{Bound, Serving};
use crate::dataplane::queue;
use crate::dataplane::remote::Command;
use crate::dataplane::workers::Placement;
use crate::snapshot::SnapshotCell;
use crate::state::{Registry, Rejection};

/// How [`Balancer::run`](crate::Balancer::run) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// Connections still open when the grace period ran out, and therefore closed.
    pub cut_connections: usize,
}

/// A listener the control task runs: one socket per worker, each accepted on by its worker.
#[derive(Debug)]
pub(crate) struct Running {
    /// The configured address (port 0 stays 0), to tell whether a reload moved it.
    pub(crate) bind: SocketAddr,
    /// The address actually bound.
    pub(crate) local_addr: SocketAddr,
    /// (worker, socket id): one listening socket per worker, accepted on by that worker.
    sockets: Vec<(usize, u64)>,
    /// A copy of each socket, to hand to a new process in a binary upgrade; `None` when one
    /// could not be made (no descriptor left), which refuses the handover rather than lose a
    /// socket's queue.
    pub(crate) copies: Option<Vec<std::net::TcpListener>>,
}

/// The accept loops and connections of a running balancer.
#[derive(Debug)]
pub(crate) struct Listeners {
    /// The workers accept loops run on, one per worker and listener, and their loads.
    pub(crate) placement: Placement,
    pub(crate) running: HashMap<String, Running>,
    connections: TaskTracker,
    pub(crate) snapshots: Arc<SnapshotCell>,
    /// Numbers the listening sockets handed to workers, for taking them back.
    next_socket: u64,
}

impl Listeners {
    pub(crate) fn new(placement: Placement, snapshots: Arc<SnapshotCell>) -> Listeners {
        Listeners {
            placement,
            running: HashMap::new(),
            connections: TaskTracker::new(),
            snapshots,
            next_socket: 0,
        }
    }

    pub(crate) fn start(&mut self, bound: Bound, bind: SocketAddr) {
        let name = bound.name.clone();
        let local_addr = bound.local_addr;
        let serving = Serving {
            snapshots: Arc::clone(&self.snapshots),
            connections: self.connections.clone(),
            placement: self.placement.clone(),
        };
        let copies: std::io::Result<Vec<_>> = bound.sockets.iter().map(|s| s.try_clone()).collect();
        let copies = copies
            .inspect_err(|e| warn!(listener = %name, error = %e, "cannot keep a copy of the listening sockets; a binary upgrade will be refused"))
            .ok();
        let sockets = bound
            .sockets
            .into_iter()
            .enumerate()
            .map(|(index, socket)| {
                let worker = index % self.placement.count();
                let id = self.next_socket;
                self.next_socket += 1;
                let listen = Command::Listen {
                    id,
                    name: name.clone(),
                    socket,
                    serving: serving.clone(),
                };
                if self.placement.remote(worker).send(listen).is_err() {
                    warn!(listener = %name, worker, "worker gone; socket not accepted on");
                }
                (worker, id)
            })
            .collect();
        let running = Running {
            bind,
            local_addr,
            sockets,
            copies,
        };
        self.running.insert(name, running);
    }

    /// Stops accepting for listener `name` and returns its sockets, still listening. With
    /// `serve_queue` (the sockets are about to close), the connections waiting in their queues
    /// are accepted and served first rather than reset by the close.
    pub(crate) async fn retire(&mut self, name: &str, serve_queue: bool) -> Option<Bound> {
        let running = self.running.remove(name)?;
        let mut replies = Vec::with_capacity(running.sockets.len());
        for (worker, id) in running.sockets {
            let (reply, answer) = tokio::sync::oneshot::channel();
            if self
                .placement
                .remote(worker)
                .send(Command::Unlisten {
                    id,
                    serve_queue,
                    reply,
                })
                .is_ok()
            {
                replies.push(answer);
            }
        }
        let mut sockets = Vec::with_capacity(replies.len());
        for answer in replies {
            match answer.await {
                Ok(Ok(socket)) => sockets.push(socket),
                Ok(Err(e)) => warn!(listener = name, error = %e, "accept loop lost its socket"),
                Err(_) => warn!(
                    listener = name,
                    "worker ended before giving its socket back"
                ),
            }
        }
        (!sockets.is_empty()).then(|| Bound {
            name: name.to_owned(),
            sockets,
            local_addr: running.local_addr,
        })
    }

    /// Stops every accept loop; once this returns, nothing listens any more. Clients waiting
    /// for a slot are closed (counted, `reason="shutdown"`) and queues take nobody from now on;
    /// connections with a backend go on.
    pub(crate) async fn stop_accepting(&mut self, registry: &Registry) {
        let names: Vec<String> = self.running.keys().cloned().collect();
        for name in names {
            drop(self.retire(&name, true).await);
        }
        for state in registry.pool_states() {
            queue::close_waiting(&state, &self.placement, Rejection::Shutdown, true);
        }
    }

    /// Hands the slots free now to clients waiting in any pool of the snapshot in force.
    pub(crate) fn dispatch_all(&self) {
        queue::serve_all(&self.snapshots.load(), &self.placement);
    }

    /// Closes the clients waiting in pools that `config` no longer sends any listener to
    /// (counted, `reason="pool_removed"`): no slot of theirs will come free for them.
    pub(crate) fn close_orphaned_queues(&self, config: &Config, registry: &Registry) {
        for state in registry.pool_states() {
            let used = config.listeners.iter().any(|l| l.uses_pool(state.name()));
            if !used && state.waiting() > 0 {
                info!(pool = %state.name(), waiting = state.waiting(), "pool has no listener any more; closing its waiting clients");
                queue::close_waiting(&state, &self.placement, Rejection::PoolRemoved, false);
            }
        }
    }

    /// Waits up to `grace` for open connections, then closes the rest.
    pub(crate) async fn drain(self, grace: std::time::Duration) -> Stopped {
        self.connections.close();
        let open = self.connections.len();
        info!(
            open_connections = open,
            grace = %humantime::format_duration(grace),
            "stopped accepting; waiting for open connections"
        );
        if tokio::time::timeout(grace, self.connections.wait())
            .await
            .is_ok()
        {
            info!("all connections finished");
            return Stopped { cut_connections: 0 };
        }
        let cut = self.connections.len();
        warn!(
            cut_connections = cut,
            "shutdown grace period over; closing remaining connections"
        );
        self.placement.broadcast(|| Command::Cut);
        self.connections.wait().await;
        Stopped {
            cut_connections: cut,
        }
    }
}

/// Logs that `listener` listens on `local_addr`, with its pool's strategy and backends, or its
/// routes.
pub(crate) fn log_listening(config: &Config, listener: &ListenerConfig, local_addr: SocketAddr) {
    let pool_name = match &listener.forward {
        Forward::Pool(pool) => pool,
        Forward::Routes(routes) => {
            info!(
                listener = %listener.name,
                bind = %local_addr,
                routes = %describe_routes(routes),
                "listening"
            );
            return;
        }
    };
    let Some(pool) = config.pool(pool_name) else {
        return;
    };
    let backends: Vec<String> = pool
        .backends
        .iter()
        .map(|b| match b.max_connections {
            Some(slots) => format!("{}*{}/{slots}", b.addr, b.weight),
            None => format!("{}*{}", b.addr, b.weight),
        })
        .collect();
    let names: Vec<String> = pool.names.iter().map(|n| n.target.to_string()).collect();
    info!(
        listener = %listener.name,
        bind = %local_addr,
        pool = %pool.name,
        strategy = %pool.strategy,
        backends = %backends.join(","),
        names = %names.join(","),
        "listening"
    );
}

/// Routes as one line: `llama.example.com|*.llama.example.com->llama,default->embed`.
pub(crate) fn describe_routes(routes: &Routes) -> String {
    let parts: Vec<String> = routes
        .routes
        .iter()
        .map(|route| {
            let names: Vec<String> = route.sni.iter().map(ToString::to_string).collect();
            let names = if names.is_empty() {
                "default".to_owned()
            } else {
                names.join("|")
            };
            format!("{names}->{}", route.pool)
        })
        .collect();
    parts.join(",")
}
