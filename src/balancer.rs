//! The running balancer: its control task, its listeners, and orderly shutdown.
//!
//! [`Balancer::run`] is the control task. It owns the configuration in force, the live-state
//! registry and the accept loops, and it is the only writer of the snapshot: reload requests
//! (SIGHUP, the file watcher, tests) reach it as messages over a channel and are handled one at a
//! time, so two writers can never race and a reader never sees half an update.
//!
//! The admin endpoint, when configured, is bound together with the listeners and served by a
//! task that `run` owns: it keeps answering reads while open connections drain after a shutdown
//! request, and stops when `run` returns.
//!
//! Health results reach it the same way: checkers and the connection path (passive ejection)
//! only mark live state as changed and wake it; the health supervisor it owns applies ejections
//! and tells it when the next weight change falls due (an ejection's end, a slow-start step), and
//! it sleeps until then.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tracing::{debug, error, info, warn};

use crate::admin;
use crate::backend::{
    AdminState, BackendCounters, ListenerCounters, Registry, RemovedBackend, Republisher,
};
use crate::config::{self, Config, ListenerConfig};
use crate::health::Health;
use crate::health::supervisor::Supervisor;
use crate::listener::{self, BindError, Bound, Serving};
use crate::reactor::Command;
use crate::reload::{ReloadError, ReloadSummary};
use crate::snapshot::{Snapshot, SnapshotCell};
use crate::workers::{self, Placement, Workers};

/// Reload requests waiting for the control task; senders wait when it is full.
const REQUEST_QUEUE: usize = 16;
/// How long the admin endpoint may take to finish the requests in progress once the balancer
/// has stopped, before it is closed anyway.
const ADMIN_STOP_GRACE: Duration = Duration::from_secs(1);

/// Why a balancer could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A listener could not bind.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The admin endpoint could not bind.
    #[error("[admin] `bind`: cannot bind {addr}: {source}")]
    AdminBind {
        /// The address it asked for.
        addr: SocketAddr,
        /// Why the kernel refused.
        #[source]
        source: std::io::Error,
    },
    /// The worker threads could not be started.
    #[error("cannot start {threads} worker threads: {source}")]
    Workers {
        /// How many were asked for.
        threads: usize,
        /// Why the system refused.
        #[source]
        source: std::io::Error,
    },
}

/// A balancer whose listeners are bound; [`run`](Balancer::run) starts serving.
#[derive(Debug)]
pub struct Balancer {
    bound: Vec<Bound>,
    workers: Workers,
    admin: Option<TcpListener>,
    config: Config,
    config_path: Option<PathBuf>,
    registry: Arc<Registry>,
    requests: mpsc::Receiver<Request>,
    /// Wake-ups from [`Republisher`]s (checkers, passive ejection, [`Handle::republish`]).
    woken: mpsc::Receiver<()>,
    handle: Handle,
}

/// A cheap, cloneable handle on a balancer: live state, and reload requests.
#[derive(Debug, Clone)]
pub struct Handle {
    shared: Arc<Shared>,
    requests: mpsc::Sender<Request>,
}

#[derive(Debug)]
struct Shared {
    snapshots: Arc<SnapshotCell>,
    reloads: ReloadStats,
    /// Where the admin endpoint listens, if there is one.
    admin_addr: Option<SocketAddr>,
    /// Marks live state as changed and wakes the control task, which then rebuilds.
    republisher: Republisher,
    /// The health checker tasks.
    checkers: TaskTracker,
    /// The workers, for their loads.
    placement: Placement,
    /// Every backend's live state, those a reload removed included.
    registry: Arc<Registry>,
}

type Reply = oneshot::Sender<Result<ReloadSummary, ReloadError>>;

#[derive(Debug)]
enum Request {
    /// Re-read the configuration file.
    ReloadFile(Reply),
    /// Apply this configuration.
    Apply(Box<Config>, Reply),
    /// Set an operator state on a backend.
    SetAdmin {
        listener: String,
        addr: SocketAddr,
        state: AdminState,
        reply: oneshot::Sender<Result<(), AdminError>>,
    },
}

/// Why an operator action was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// No listener of that name.
    #[error("no listener named `{0}`")]
    UnknownListener(String),
    /// The listener has no backend at that address.
    #[error("listener `{0}` has no backend {1}")]
    UnknownBackend(String, SocketAddr),
    /// The balancer has stopped.
    #[error("the balancer is shutting down")]
    ShuttingDown,
}

/// How [`Balancer::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// Connections still open when the grace period ran out, and therefore closed.
    pub cut_connections: usize,
}

/// Reload outcomes since start.
#[derive(Debug, Default)]
struct ReloadStats {
    succeeded: AtomicU64,
    failed: AtomicU64,
    /// Taken by the control task once per reload and by status requests; never by connections.
    last: Mutex<Option<LastReload>>,
}

/// A copy of the reload outcomes since start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadCounters {
    /// Reloads applied.
    pub succeeded: u64,
    /// Reloads refused.
    pub failed: u64,
    /// The error of the latest reload, if it failed.
    pub last_error: Option<String>,
    /// The latest reload, if there has been one.
    pub last: Option<LastReload>,
}

/// The outcome of the latest reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastReload {
    /// When it finished.
    pub at: SystemTime,
    /// Whether it was applied.
    pub ok: bool,
    /// What changed if it was applied, else why it was refused (the text `--check` prints).
    pub message: String,
}

/// A listener the control task runs: one socket per worker, each accepted on by its worker.
#[derive(Debug)]
struct Running {
    /// The configured address (port 0 stays 0), to tell whether a reload moved it.
    bind: SocketAddr,
    /// The address actually bound.
    local_addr: SocketAddr,
    /// (worker, socket id): one listening socket per worker, accepted on by that worker.
    sockets: Vec<(usize, u64)>,
}

impl Balancer {
    /// Binds every listener of `config` and its admin endpoint, all or nothing. Must be called
    /// inside a tokio runtime.
    pub fn bind(config: &Config) -> Result<Balancer, StartError> {
        // The admin endpoint first: when it cannot bind, nothing has been logged as listening.
        let admin = match &config.admin {
            None => None,
            Some(admin) => {
                Some(
                    admin::bind(admin.bind).map_err(|source| StartError::AdminBind {
                        addr: admin.bind,
                        source,
                    })?,
                )
            }
        };
        let admin_addr = admin.as_ref().map(|(_, addr)| *addr);
        let admin = admin.map(|(socket, _)| socket);
        let threads = config.threads.unwrap_or_else(workers::default_count);
        let bound = config
            .listeners
            .iter()
            .map(|l| listener::bind(l, threads.get()))
            .collect::<Result<Vec<_>, _>>()?;
        let workers = Workers::start(threads).map_err(|source| StartError::Workers {
            threads: threads.get(),
            source,
        })?;
        let (republisher, woken) = Republisher::new();
        let registry = Arc::new(Registry::with_republisher(republisher.clone()));
        let addrs = bound
            .iter()
            .map(|b| (b.name.clone(), b.local_addr))
            .collect();
        let snapshot = Snapshot::build(config, &registry, &addrs, None);
        if let Some(addr) = admin_addr {
            let token = config.admin.as_ref().is_some_and(|a| a.token.is_some());
            info!(bind = %addr, token, "admin endpoint listening");
        }
        for listener in &config.listeners {
            log_listening(listener, addrs[&listener.name]);
        }
        let (sender, requests) = mpsc::channel(REQUEST_QUEUE);
        let placement = workers.placement().clone();
        Ok(Balancer {
            bound,
            workers,
            admin,
            config: config.clone(),
            config_path: None,
            registry: Arc::clone(&registry),
            requests,
            woken,
            handle: Handle {
                shared: Arc::new(Shared {
                    snapshots: Arc::new(ArcSwap::from_pointee(snapshot)),
                    reloads: ReloadStats::default(),
                    admin_addr,
                    republisher,
                    checkers: TaskTracker::new(),
                    placement,
                    registry,
                }),
                requests: sender,
            },
        })
    }

    /// Sets the file [`Handle::reload`] re-reads.
    pub fn with_config_path(mut self, path: impl Into<PathBuf>) -> Balancer {
        self.config_path = Some(path.into());
        self
    }

    /// The address listener `name` is bound to (useful with port 0).
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.handle.local_addr(name)
    }

    /// The address the admin endpoint is bound to, if `[admin]` is configured (useful with
    /// port 0).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.handle.admin_addr()
    }

    /// A handle on the live state.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Serves and handles reloads until `shutdown` is cancelled; then stops accepting (the
    /// listening sockets are closed at once), waits up to `shutdown_grace` for open connections
    /// to finish, closes the rest and returns. The admin endpoint answers reads until then;
    /// actions and reloads asked for after `shutdown` are refused.
    pub async fn run(mut self, shutdown: CancellationToken) -> Stopped {
        let stop_admin = CancellationToken::new();
        let admin = self.admin.take().map(|socket| {
            let endpoint = admin::Endpoint {
                handle: self.handle.clone(),
                token: self.config.admin.as_ref().and_then(|a| a.token.clone()),
                config_path: self.config_path.clone(),
                shutting_down: shutdown.clone(),
            };
            // Aborted if `run` itself is dropped: the endpoint never outlives its balancer.
            AbortOnDropHandle::new(tokio::spawn(admin::serve(
                socket,
                endpoint,
                stop_admin.clone(),
            )))
        });
        let mut control = Control {
            placement: self.workers.placement().clone(),
            running: HashMap::new(),
            connections: TaskTracker::new(),
            snapshots: Arc::clone(&self.handle.shared.snapshots),
            next_socket: 0,
            health: Supervisor::new(
                self.handle.shared.checkers.clone(),
                shutdown.child_token(),
                self.registry.republisher().clone(),
            ),
        };
        let binds: HashMap<&str, SocketAddr> = self
            .config
            .listeners
            .iter()
            .map(|l| (l.name.as_str(), l.bind))
            .collect();
        for bound in std::mem::take(&mut self.bound) {
            let bind = binds[bound.name.as_str()];
            control.start(bound, bind);
        }
        control.health.sync(&self.config, &self.registry);
        // New backends may have started slow-start ramps.
        self.registry.republisher().republish();
        loop {
            let deadline = control.health.next_deadline(Instant::now());
            let mut due = false;
            let request = tokio::select! {
                () = shutdown.cancelled() => break,
                request = self.requests.recv() => match request {
                    Some(request) => Some(request),
                    None => break,
                },
                Some(()) = self.woken.recv() => None,
                () = sleep_until(deadline) => {
                    due = true;
                    None
                }
            };
            if let Some(request) = request {
                self.handle_request(request, &mut control).await;
            }
            // Live state changed since the last build (a health result, a passive ejection, a
            // ramp step, ...): apply what is due, then rebuild once, however many changes and
            // wake-ups came in meanwhile.
            let changed = control.health.update(Instant::now());
            if self.registry.republisher().take() || changed || due {
                self.republish(&control);
            }
        }
        // The listening sockets close first: a client that connects from now on is refused
        // rather than left waiting in a backlog nobody accepts from.
        control.stop_accepting().await;
        control.health.shutdown().await;
        // Requests from now on (SIGHUP, the watcher, the admin endpoint) are answered "shutting
        // down" at once instead of waiting for a control task that no longer listens.
        self.requests.close();
        while let Ok(request) = self.requests.try_recv() {
            drop(request);
        }
        let stopped = control.drain(self.config.shutdown_grace).await;
        stop_admin.cancel();
        if let Some(mut task) = admin {
            match tokio::time::timeout(ADMIN_STOP_GRACE, &mut task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "admin endpoint ended abnormally"),
                Err(_) => {
                    debug!("admin requests still in progress; closing them");
                    task.abort();
                }
            }
        }
        stopped
    }

    /// Handles one request from a [`Handle`].
    async fn handle_request(&mut self, request: Request, control: &mut Control) {
        match request {
            Request::ReloadFile(reply) => {
                let result = self.reload_file(control).await;
                self.finish_reload(result, reply);
            }
            Request::Apply(config, reply) => {
                let result = self.apply(*config, control).await;
                self.finish_reload(result, reply);
            }
            Request::SetAdmin {
                listener,
                addr,
                state,
                reply,
            } => {
                let result = self.set_admin(&listener, addr, state, control);
                // The requester may have given up waiting; the change stands all the same.
                drop(reply.send(result));
            }
        }
    }

    /// Records, logs and answers a reload's outcome.
    fn finish_reload(&self, result: Result<ReloadSummary, ReloadError>, reply: Reply) {
        self.handle.shared.reloads.record(&result);
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
        listener: &str,
        addr: SocketAddr,
        state: AdminState,
        control: &Control,
    ) -> Result<(), AdminError> {
        let snapshot = control.snapshots.load();
        let pool = snapshot
            .pool(listener)
            .ok_or_else(|| AdminError::UnknownListener(listener.to_owned()))?;
        let backend = pool
            .backends()
            .iter()
            .find(|b| b.addr == addr)
            .ok_or_else(|| AdminError::UnknownBackend(listener.to_owned(), addr))?;
        let before = backend.stats.admin_state();
        backend.stats.set_admin_state(state);
        drop(snapshot);
        if before != state {
            info!(listener, backend = %addr, from = before.as_str(), to = state.as_str(), "admin state changed");
            self.republish(control);
        }
        Ok(())
    }

    /// Rebuilds the snapshot from the configuration in force, so that changed live state
    /// (admin state, ...) reaches the strategies.
    fn republish(&self, control: &Control) {
        let current = control.snapshots.load();
        let addrs: HashMap<String, SocketAddr> = current
            .pools()
            .filter_map(|p| Some((p.name().to_string(), p.local_addr()?)))
            .collect();
        let snapshot = Snapshot::build(&self.config, &self.registry, &addrs, Some(&current));
        drop(current);
        control.snapshots.store(Arc::new(snapshot));
    }

    async fn reload_file(&mut self, control: &mut Control) -> Result<ReloadSummary, ReloadError> {
        let path = self.config_path.as_ref().ok_or(ReloadError::NoConfigFile)?;
        let config = config::load(path)?;
        self.apply(config, control).await
    }

    /// Switches to `new`: all or nothing (see the `reload` module).
    async fn apply(
        &mut self,
        mut new: Config,
        control: &mut Control,
    ) -> Result<ReloadSummary, ReloadError> {
        // 1. Decide what happens to each listener, and bind every new socket. A failure here
        //    drops the sockets bound so far and changes nothing else.
        let kept: HashSet<&str> = new
            .listeners
            .iter()
            .filter(|l| {
                control
                    .running
                    .get(&l.name)
                    .is_some_and(|r| r.bind == l.bind)
            })
            .map(|l| l.name.as_str())
            .collect();
        let mut fresh = Vec::new();
        // new listener name -> old listener name whose socket it takes over
        let mut takeovers: HashMap<String, String> = HashMap::new();
        for listener in &new.listeners {
            if kept.contains(listener.name.as_str()) {
                continue;
            }
            // A socket already bound to this address (under another name, or under port 0)
            // is handed over rather than bound again, which would fail with "address in use".
            let reusable = control.running.iter().find(|(name, r)| {
                listener.bind.port() != 0
                    && (r.bind == listener.bind || r.local_addr == listener.bind)
                    && !kept.contains(name.as_str())
            });
            match reusable {
                Some((old, _)) => {
                    takeovers.insert(listener.name.clone(), old.clone());
                }
                None => fresh.push(listener::bind(listener, self.workers.placement().count())?),
            }
        }
        // Nothing can fail from here on.

        // 2. Stop the accept loops whose sockets move to another name *before* publishing:
        //    otherwise they would accept connections for a name the new snapshot no longer
        //    has. Meanwhile connections wait in the socket's queue; none is lost.
        let mut handed_over: HashMap<String, Bound> = HashMap::new();
        for old_name in takeovers.values() {
            if let Some(bound) = control.retire(old_name, false).await {
                handed_over.insert(old_name.clone(), bound);
            }
        }

        // 3. Start checkers for new backends, stop those of removed ones, restart those whose
        //    health settings changed; then publish the new snapshot: from here on, new
        //    connections follow the new file.
        control.health.sync(&new, &self.registry);
        let current = control.snapshots.load();
        let addrs: HashMap<String, SocketAddr> = new
            .listeners
            .iter()
            .filter_map(|listener| {
                let name = &listener.name;
                let addr = match takeovers.get(name) {
                    Some(old) => handed_over.get(old).map(|b| b.local_addr),
                    None => fresh
                        .iter()
                        .find(|b: &&Bound| &b.name == name)
                        .map(|b| b.local_addr)
                        .or_else(|| current.pool(name).and_then(|p| p.local_addr())),
                };
                Some((name.clone(), addr?))
            })
            .collect();
        drop(current);
        control.snapshots.store(Arc::new(Snapshot::build(
            &new,
            &self.registry,
            &addrs,
            None,
        )));

        // 4. Stop the accept loops that are neither kept nor handed over (removed or moved
        //    listeners): their sockets close, their open connections go on.
        let retiring: Vec<String> = control
            .running
            .keys()
            .filter(|name| !kept.contains(name.as_str()))
            .cloned()
            .collect();
        for name in retiring {
            drop(control.retire(&name, true).await);
        }

        // 5. Start the listeners on handed-over and new sockets.
        let new_by_name: HashMap<&str, &ListenerConfig> =
            new.listeners.iter().map(|l| (l.name.as_str(), l)).collect();
        for (new_name, old_name) in takeovers {
            let Some(mut bound) = handed_over.remove(&old_name) else {
                error!(listener = %new_name, from = %old_name, "socket to take over was lost");
                continue;
            };
            bound.name = new_name;
            fresh.push(bound);
        }
        for bound in fresh {
            let config = new_by_name[bound.name.as_str()];
            log_listening(config, bound.local_addr);
            control.start(bound, config.bind);
        }

        self.registry.retain(&new);
        let summary = ReloadSummary::between(&self.config, &new);
        // The admin endpoint, the log format and the worker threads are set up once, at start.
        // Keeping the values in force here means the next reload still reports them as waiting
        // for a restart.
        new.admin = self.config.admin.clone();
        new.threads = self.config.threads;
        new.log.format = self.config.log.format;
        self.config = new;
        Ok(summary)
    }
}

/// The accept loops and connections of a running balancer.
#[derive(Debug)]
struct Control {
    /// The workers accept loops run on, one per worker and listener, and their loads.
    placement: Placement,
    running: HashMap<String, Running>,
    connections: TaskTracker,
    snapshots: Arc<SnapshotCell>,
    /// Numbers the listening sockets handed to workers, for taking them back.
    next_socket: u64,
    health: Supervisor,
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

impl Control {
    fn start(&mut self, bound: Bound, bind: SocketAddr) {
        let name = bound.name.clone();
        let local_addr = bound.local_addr;
        let serving = Serving {
            snapshots: Arc::clone(&self.snapshots),
            connections: self.connections.clone(),
            placement: self.placement.clone(),
        };
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
        };
        self.running.insert(name, running);
    }

    /// Stops accepting for listener `name` and returns its sockets, still listening. With
    /// `serve_queue` (the sockets are about to close), the connections waiting in their queues
    /// are accepted and served first rather than reset by the close.
    async fn retire(&mut self, name: &str, serve_queue: bool) -> Option<Bound> {
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

    /// Stops every accept loop; once this returns, nothing listens any more.
    async fn stop_accepting(&mut self) {
        let names: Vec<String> = self.running.keys().cloned().collect();
        for name in names {
            drop(self.retire(&name, true).await);
        }
    }

    /// Waits up to `grace` for open connections, then closes the rest.
    async fn drain(self, grace: std::time::Duration) -> Stopped {
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

fn log_listening(listener: &ListenerConfig, local_addr: SocketAddr) {
    let backends: Vec<String> = listener
        .backends
        .iter()
        .map(|b| format!("{}*{}", b.addr, b.weight))
        .collect();
    info!(
        listener = %listener.name,
        bind = %local_addr,
        strategy = %listener.strategy,
        backends = %backends.join(","),
        "listening"
    );
}

impl ReloadStats {
    fn record(&self, result: &Result<ReloadSummary, ReloadError>) {
        let counter = match result {
            Ok(_) => &self.succeeded,
            Err(_) => &self.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let outcome = LastReload {
            at: SystemTime::now(),
            ok: result.is_ok(),
            message: match result {
                Ok(summary) => summary.to_string(),
                Err(e) => e.to_string(),
            },
        };
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(outcome);
    }
}

impl Handle {
    /// The snapshot in force now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshots.load_full()
    }

    /// The address listener `name` is bound to now.
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.shared.snapshots.load().pool(name)?.local_addr()
    }

    /// Counters of backend `addr` in listener `listener`, if it is configured.
    pub fn backend_counters(&self, listener: &str, addr: SocketAddr) -> Option<BackendCounters> {
        let snapshot = self.shared.snapshots.load();
        let pool = snapshot.pool(listener)?;
        let backend = pool.backends().iter().find(|b| b.addr == addr)?;
        Some(backend.stats.counters())
    }

    /// Health of backend `addr` in listener `listener`, if it is configured.
    pub fn backend_health(&self, listener: &str, addr: SocketAddr) -> Option<Health> {
        let snapshot = self.shared.snapshots.load();
        let pool = snapshot.pool(listener)?;
        let backend = pool.backends().iter().find(|b| b.addr == addr)?;
        Some(backend.stats.health())
    }

    /// The backends `snapshot` does not have that still carry connections: a reload removed
    /// them, and their connections go on until they end.
    pub fn removed_backends(&self, snapshot: &Snapshot) -> Vec<RemovedBackend> {
        let configured: std::collections::HashSet<(&str, SocketAddr)> = snapshot
            .pools()
            .flat_map(|p| p.backends().iter().map(|b| (&**p.name(), b.addr)))
            .collect();
        self.shared
            .registry
            .removed_with_connections(|listener, addr| configured.contains(&(listener, addr)))
    }

    /// Health checker tasks running now: one per backend of every listener with
    /// `[listener.health]`.
    pub fn health_checkers(&self) -> usize {
        self.shared.checkers.len()
    }

    /// Counters of listener `name`, if it is configured.
    pub fn listener_counters(&self, name: &str) -> Option<ListenerCounters> {
        Some(self.shared.snapshots.load().pool(name)?.stats().counters())
    }

    /// Open client connections on each worker thread, in worker order (see `threads`).
    pub fn worker_connections(&self) -> Vec<usize> {
        self.shared.placement.loads()
    }

    /// Reload outcomes since start.
    pub fn reload_counters(&self) -> ReloadCounters {
        let reloads = &self.shared.reloads;
        let last = reloads
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        ReloadCounters {
            succeeded: reloads.succeeded.load(Ordering::Relaxed),
            failed: reloads.failed.load(Ordering::Relaxed),
            last_error: last.as_ref().filter(|l| !l.ok).map(|l| l.message.clone()),
            last,
        }
    }

    /// Where the admin endpoint listens, if `[admin]` is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.shared.admin_addr
    }

    /// Re-reads the configuration file and applies it, all or nothing (as SIGHUP does).
    pub async fn reload(&self) -> Result<ReloadSummary, ReloadError> {
        self.request(Request::ReloadFile).await
    }

    /// Applies `config`, all or nothing, as if it had been read from the file.
    pub async fn apply(&self, config: Config) -> Result<ReloadSummary, ReloadError> {
        self.request(|reply| Request::Apply(Box::new(config), reply))
            .await
    }

    /// Sets the operator state of backend `addr` of `listener`: [`AdminState::Drained`] takes it
    /// out of every strategy (open connections go on), [`AdminState::Ready`] brings it back. The
    /// state survives reloads while the backend stays in the file.
    pub async fn set_admin_state(
        &self,
        listener: &str,
        addr: SocketAddr,
        state: AdminState,
    ) -> Result<(), AdminError> {
        let (reply, answer) = oneshot::channel();
        let request = Request::SetAdmin {
            listener: listener.to_owned(),
            addr,
            state,
            reply,
        };
        self.requests
            .send(request)
            .await
            .map_err(|_| AdminError::ShuttingDown)?;
        answer.await.map_err(|_| AdminError::ShuttingDown)?
    }

    /// Asks the control task to rebuild the snapshot because live state changed. Never waits,
    /// and never loses a change: the request is a flag plus a wake-up, and when the queue is full
    /// the requests already in it wake the control task, which then sees the flag.
    pub fn republish(&self) {
        self.shared.republisher.republish();
    }

    async fn request(
        &self,
        make: impl FnOnce(Reply) -> Request,
    ) -> Result<ReloadSummary, ReloadError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(make(reply))
            .await
            .map_err(|_| ReloadError::ShuttingDown)?;
        answer.await.map_err(|_| ReloadError::ShuttingDown)?
    }
}
