//! The control task: the one writer of the snapshot.
//!
//! It owns the configuration in force, the live-state registry and the listening sockets.
//! Reload requests (SIGHUP, the file watcher, the admin endpoint), operator actions and health
//! results reach it as messages or wake-ups and are handled one at a time, so two writers never
//! race and a reader never sees half an update. Checkers and the connection path (passive
//! ejection) only mark live state as changed and wake it; the health supervisor it owns applies
//! ejections and tells it when the next weight change falls due (an ejection's end, a
//! slow-start step), and it sleeps until then.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::discovery::Discovery;
use super::handle::{AdminError, Handle, Reply, Request, Scope};
use super::lifecycle::{Lifecycle, Observers};
use super::listeners::{Listeners, Stopped};
use super::summary::{ReloadError, ReloadSummary};
use super::supervisor::Supervisor;
use crate::config::{self, Config};
use crate::dataplane::accept::{Bound, InheritedSocket, Served};
use crate::dataplane::workers::Placement;
use crate::snapshot::{CustomStrategies, Snapshot};
use crate::state::{AdminState, Registry};

/// How long the first resolution of the backend names may hold up the first accept, in
/// resolver timeouts (a query is sent twice), plus [`FIRST_ANSWERS_MARGIN`].
const FIRST_ANSWERS_FACTOR: u32 = 2;
/// How often the per-client state of every listener is swept of clients that went quiet.
const CLIENT_SWEEP: std::time::Duration = std::time::Duration::from_secs(60);

/// Time beyond the queries' own for the answers to be applied.
const FIRST_ANSWERS_MARGIN: std::time::Duration = std::time::Duration::from_millis(250);

/// The control task's state.
#[derive(Debug)]
pub(crate) struct ControlTask {
    pub(super) config: Config,
    pub(super) config_path: Option<PathBuf>,
    pub(super) registry: Arc<Registry>,
    requests: mpsc::Receiver<Request>,
    /// Wake-ups from the registry's republisher (checkers, passive ejection, [`Handle::republish`]).
    woken: mpsc::Receiver<()>,
    pub(super) handle: Handle,
    pub(super) listeners: Listeners,
    pub(super) health: Supervisor,
    /// Strategies set by the library caller in place of the file's, by listener name.
    pub(super) strategies: CustomStrategies,
    /// The backend names being resolved, and their addresses in force.
    pub(super) discovery: Discovery,
    /// Told when the balancer serves, reloads and stops.
    observers: Observers,
    /// A copy of the admin endpoint's socket and its configured `bind`, for a binary upgrade.
    admin_copy: Option<(SocketAddr, std::net::TcpListener)>,
}

impl ControlTask {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: Config,
        config_path: Option<PathBuf>,
        registry: Arc<Registry>,
        requests: mpsc::Receiver<Request>,
        woken: mpsc::Receiver<()>,
        handle: Handle,
        placement: Placement,
        strategies: CustomStrategies,
        observers: Observers,
        shutdown: &CancellationToken,
    ) -> ControlTask {
        let health = Supervisor::new(
            handle.checkers().clone(),
            shutdown.child_token(),
            registry.republisher().clone(),
        );
        let listeners = Listeners::new(placement, Arc::clone(handle.snapshots()));
        ControlTask {
            config,
            config_path,
            registry,
            requests,
            woken,
            handle,
            listeners,
            health,
            strategies,
            discovery: Discovery::default(),
            observers,
            admin_copy: None,
        }
    }

    /// Starts accepting on `bound`, the listeners bound at start, then serves requests and
    /// wake-ups until `shutdown` is cancelled; then stops accepting, waits up to
    /// `shutdown_grace` for open connections and closes the rest.
    pub(crate) async fn run(
        mut self,
        bound: Vec<Bound>,
        admin_copy: Option<(SocketAddr, std::net::TcpListener)>,
        shutdown: CancellationToken,
    ) -> Stopped {
        self.admin_copy = admin_copy;
        let binds: HashMap<String, SocketAddr> = self
            .config
            .listeners
            .iter()
            .map(|l| (l.name.clone(), l.bind))
            .collect();
        // Backend names get one try at resolving before the first client is accepted (the
        // sockets are bound: clients wait in the backlog meanwhile); a name that does not
        // answer in time joins when it does.
        self.discovery.sync(&self.config, self.registry.names());
        let first_answers = Instant::now()
            + FIRST_ANSWERS_FACTOR * self.config.resolver.timeout
            + FIRST_ANSWERS_MARGIN;
        if self
            .discovery
            .first(self.registry.names(), first_answers)
            .await
        {
            self.follow_names();
        }
        for bound in bound {
            let bind = binds[bound.name.as_str()];
            self.listeners.start(bound, bind);
        }
        self.health.sync(&self.config, &self.registry);
        // New backends may have started slow-start ramps.
        self.registry.republisher().republish();
        self.observers.tell(Lifecycle::Ready);
        // Per-client state of clients that went quiet is swept at admissions; this gives it
        // back on a listener that stopped seeing new connections too.
        let mut sweep = tokio::time::interval(CLIENT_SWEEP);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.health.next_deadline(Instant::now());
            let mut due = false;
            let mut resolution = None;
            let request = tokio::select! {
                () = shutdown.cancelled() => break,
                request = self.requests.recv() => match request {
                    Some(request) => Some(request),
                    None => break,
                },
                Some(()) = self.woken.recv() => None,
                resolved = self.discovery.next() => {
                    resolution = Some(resolved);
                    None
                }
                _ = sweep.tick() => {
                    let now = std::time::Instant::now();
                    for listener in self.listeners.snapshots.load().listeners() {
                        listener.stats().clients().sweep(now);
                    }
                    None
                }
                () = sleep_until(deadline) => {
                    due = true;
                    None
                }
            };
            if let Some(request) = request {
                self.handle_request(request).await;
            }
            if let Some(resolved) = resolution {
                if self.discovery.record(resolved, self.registry.names()) {
                    self.follow_names();
                }
            }
            // Live state changed since the last build (a health result, a passive ejection, a
            // ramp step, ...): apply what is due, then rebuild once, however many changes and
            // wake-ups came in meanwhile.
            let changed = self.health.update(Instant::now());
            if self.registry.republisher().take() || changed || due {
                self.republish();
            }
        }
        self.observers.tell(Lifecycle::Stopping);
        // The listening sockets close first: a client that connects from now on is refused
        // rather than left waiting in a backlog nobody accepts from.
        self.listeners.stop_accepting(&self.registry).await;
        self.health.shutdown().await;
        // Requests from now on (SIGHUP, the watcher, the admin endpoint) are answered "shutting
        // down" at once instead of waiting for a control task that no longer listens.
        self.requests.close();
        while let Ok(request) = self.requests.try_recv() {
            drop(request);
        }
        self.listeners.drain(self.config.shutdown_grace).await
    }

    /// Handles one request from a [`Handle`].
    async fn handle_request(&mut self, request: Request) {
        match request {
            Request::ReloadFile(reply) => {
                self.observers.tell(Lifecycle::Reloading);
                let result = self.reload_file().await;
                self.finish_reload(result, reply);
                self.observers.tell(Lifecycle::Reloaded);
            }
            Request::Apply(config, reply) => {
                self.observers.tell(Lifecycle::Reloading);
                let result = self.apply(*config).await;
                self.finish_reload(result, reply);
                self.observers.tell(Lifecycle::Reloaded);
            }
            Request::Alive(reply) => drop(reply.send(())),
            Request::Sockets(reply) => drop(reply.send(self.socket_copies())),
            Request::SetAdmin {
                scope,
                addr,
                state,
                reply,
            } => {
                let result = self.set_admin(&scope, addr, state);
                // The requester may have given up waiting; the change stands all the same.
                drop(reply.send(result));
            }
        }
    }

    /// Copies of every listening socket, for a new process to take over.
    fn socket_copies(&self) -> std::io::Result<Vec<InheritedSocket>> {
        let mut out = Vec::new();
        if let Some((bind, socket)) = &self.admin_copy {
            out.push(InheritedSocket {
                served: Served::Admin { bind: *bind },
                socket: socket.try_clone()?,
            });
        }
        for (name, running) in &self.listeners.running {
            let copies = running.copies.as_ref().ok_or_else(|| {
                std::io::Error::other(format!(
                    "listener `{name}`: no copy of its sockets could be kept"
                ))
            })?;
            for socket in copies {
                out.push(InheritedSocket {
                    served: Served::Listener {
                        name: name.clone(),
                        bind: running.bind,
                    },
                    socket: socket.try_clone()?,
                });
            }
        }
        Ok(out)
    }

    /// Records, logs and answers a reload's outcome.
    fn finish_reload(&self, result: Result<ReloadSummary, ReloadError>, reply: Reply) {
        self.handle.record_reload(&result);
        match &result {
            Ok(summary) => {
                info!(changes = %summary, "reload applied");
                if !summary.needs_restart.is_empty() {
                    warn!(
                        settings = %summary.needs_restart.join(", "),
                        "changed in the file but applied only at the next restart; the values in force stay"
                    );
                }
            }
            Err(e) => error!(error = %e, "reload failed; the running configuration stays in force"),
        }
        // The requester may have given up waiting; the reload happened all the same.
        drop(reply.send(result));
    }

    /// Sets an operator state on a configured backend and republishes.
    fn set_admin(
        &self,
        scope: &Scope,
        addr: SocketAddr,
        state: AdminState,
    ) -> Result<(), AdminError> {
        let snapshot = self.listeners.snapshots.load();
        let pool = scope.pool(&snapshot)?;
        let backend = pool
            .backends()
            .iter()
            .find(|b| b.addr == addr)
            .ok_or_else(|| scope.unknown_backend(addr))?;
        let before = backend.stats.admin_state();
        backend.stats.set_admin_state(state);
        let pool = Arc::clone(pool.name());
        drop(snapshot);
        if before != state {
            info!(%pool, backend = %addr, from = before.as_str(), to = state.as_str(), "admin state changed");
            self.republish();
        }
        Ok(())
    }

    /// Rebuilds the snapshot from the configuration in force, so that changed live state
    /// (admin state, ...) reaches the strategies.
    fn republish(&self) {
        let current = self.listeners.snapshots.load();
        let addrs: HashMap<String, SocketAddr> = current
            .listeners()
            .filter_map(|l| Some((l.name().to_string(), l.local_addr()?)))
            .collect();
        let snapshot = Snapshot::build(
            &self.config,
            &self.registry,
            &addrs,
            Some(&current),
            &self.strategies,
        );
        drop(current);
        self.listeners.snapshots.store(Arc::new(snapshot));
        // Weights, health or reported load changed: waiting clients may fit now.
        self.listeners.dispatch_all();
    }

    /// Gives the pools the addresses their names resolve to now: new addresses join as new
    /// backends, vanished ones leave as a reload removes backends (their connections go on).
    fn follow_names(&mut self) {
        let started = std::time::Instant::now();
        let mut new = self.config.clone();
        new.expand(self.discovery.answers());
        self.health.sync(&new, &self.registry);
        self.config = new;
        self.republish();
        self.registry.retain_config(&self.config);
        debug!(
            backends = self.config.backend_count(),
            took_us = started.elapsed().as_micros(),
            "backend names applied"
        );
    }

    async fn reload_file(&mut self) -> Result<ReloadSummary, ReloadError> {
        let path = self.config_path.as_ref().ok_or(ReloadError::NoConfigFile)?;
        let config = config::load(path)?;
        self.apply(config).await
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
