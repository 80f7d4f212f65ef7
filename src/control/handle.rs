//! [`Handle`]: how everything outside the control task (the admin endpoint, the command line,
//! the file watcher, tests) reads live state and asks for changes. Requests reach the control
//! task over a bounded channel and are answered one at a time; reads go straight to the
//! snapshot and the live state, never through the control task.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use super::summary::{ReloadError, ReloadSummary};
use crate::config::{Config, Target};
use crate::dataplane::accept::InheritedSocket;
use crate::dataplane::workers::Placement;
use crate::health::Health;
use crate::snapshot::{Pool, Snapshot, SnapshotCell};
use crate::state::{
    AdminState, BackendCounters, ListenerCounters, NameStatus, QueueCounters, Registry,
    RemovedBackend, Republisher,
};

/// Requests waiting for the control task; senders wait when it is full.
const REQUEST_QUEUE: usize = 16;

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

pub(crate) type Reply = oneshot::Sender<Result<ReloadSummary, ReloadError>>;

#[derive(Debug)]
pub(crate) enum Request {
    /// Re-read the configuration file.
    ReloadFile(Reply),
    /// Apply this configuration.
    Apply(Box<Config>, Reply),
    /// Set an operator state on a backend.
    SetAdmin {
        scope: Scope,
        addr: SocketAddr,
        state: AdminState,
        reply: oneshot::Sender<Result<(), AdminError>>,
    },
    /// Answer at once: the control task still turns.
    Alive(oneshot::Sender<()>),
    /// Copies of every listening socket, for a new process to take over.
    Sockets(oneshot::Sender<std::io::Result<Vec<InheritedSocket>>>),
}

/// Where an operator names a backend: by a listener (its pool's backend) or by a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scope {
    /// The backend of the pool listener `0` sends to.
    Listener(String),
    /// The backend of pool `0`.
    Pool(String),
}

impl Scope {
    /// The pool the scope names in `snapshot`, or why there is none.
    pub(crate) fn pool<'s>(&self, snapshot: &'s Snapshot) -> Result<&'s Arc<Pool>, AdminError> {
        match self {
            Scope::Listener(name) => {
                let listener = snapshot
                    .listener(name)
                    .ok_or_else(|| AdminError::UnknownListener(name.clone()))?;
                listener.single_pool().ok_or_else(|| {
                    let pools = listener.pools().iter().map(|p| p.name().to_string());
                    AdminError::RoutedListener(name.clone(), pools.collect::<Vec<_>>().join(", "))
                })
            }
            Scope::Pool(name) => snapshot
                .pool(name)
                .ok_or_else(|| AdminError::UnknownPool(name.clone())),
        }
    }

    /// The error for a backend the scope's pool does not have.
    pub(crate) fn unknown_backend(&self, addr: SocketAddr) -> AdminError {
        match self {
            Scope::Listener(name) => AdminError::UnknownBackend(name.clone(), addr),
            Scope::Pool(name) => AdminError::UnknownPoolBackend(name.clone(), addr),
        }
    }
}

/// Why an operator action was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// No listener of that name.
    #[error("no listener named `{0}`")]
    UnknownListener(String),
    /// The listener's pool has no backend at that address.
    #[error("listener `{0}` has no backend {1}")]
    UnknownBackend(String, SocketAddr),
    /// No pool of that name.
    #[error("no pool named `{0}`")]
    UnknownPool(String),
    /// The pool has no backend at that address.
    #[error("pool `{0}` has no backend {1}")]
    UnknownPoolBackend(String, SocketAddr),
    /// The listener routes to several pools: a backend is named by its pool.
    #[error("listener `{0}` routes to pools by server name: name the pool instead ({1})")]
    RoutedListener(String, String),
    /// The balancer has stopped.
    #[error("the balancer is shutting down")]
    ShuttingDown,
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

impl ReloadStats {
    pub(crate) fn record(&self, result: &Result<ReloadSummary, ReloadError>) {
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
    /// A handle on `snapshot`, and the receiver of its requests, which the control task owns.
    pub(crate) fn new(
        snapshot: Snapshot,
        admin_addr: Option<SocketAddr>,
        placement: Placement,
        registry: Arc<Registry>,
    ) -> (Handle, mpsc::Receiver<Request>) {
        let (requests, receiver) = mpsc::channel(REQUEST_QUEUE);
        let handle = Handle {
            shared: Arc::new(Shared {
                snapshots: Arc::new(ArcSwap::from_pointee(snapshot)),
                reloads: ReloadStats::default(),
                admin_addr,
                republisher: registry.republisher().clone(),
                checkers: TaskTracker::new(),
                placement,
                registry,
            }),
            requests,
        };
        (handle, receiver)
    }

    /// The cell the snapshot is published in; the control task is its only writer.
    pub(crate) fn snapshots(&self) -> &Arc<SnapshotCell> {
        &self.shared.snapshots
    }

    /// The health checker tasks, which the control task starts and stops.
    pub(crate) fn checkers(&self) -> &TaskTracker {
        &self.shared.checkers
    }

    /// Records a reload's outcome for [`Handle::reload_counters`].
    pub(crate) fn record_reload(&self, result: &Result<ReloadSummary, ReloadError>) {
        self.shared.reloads.record(result);
    }

    /// The snapshot in force now.
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshots.load_full()
    }

    /// The address listener `name` is bound to now.
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.shared.snapshots.load().listener(name)?.local_addr()
    }

    /// Counters of backend `addr` of listener `listener`'s pool, if it is configured.
    pub fn backend_counters(&self, listener: &str, addr: SocketAddr) -> Option<BackendCounters> {
        self.counters_in(&Scope::Listener(listener.to_owned()), addr)
    }

    /// Counters of backend `addr` of pool `pool`, if it is configured.
    pub fn pool_backend_counters(&self, pool: &str, addr: SocketAddr) -> Option<BackendCounters> {
        self.counters_in(&Scope::Pool(pool.to_owned()), addr)
    }

    pub(crate) fn counters_in(&self, scope: &Scope, addr: SocketAddr) -> Option<BackendCounters> {
        let snapshot = self.shared.snapshots.load();
        let pool = scope.pool(&snapshot).ok()?;
        let backend = pool.backends().iter().find(|b| b.addr == addr)?;
        Some(backend.stats.counters())
    }

    /// The load estimate of backend `addr` of pool `pool`: connections open from here, plus
    /// what the server last reported beyond them.
    pub fn load_estimate(&self, pool: &str, addr: SocketAddr) -> Option<u64> {
        let snapshot = self.shared.snapshots.load();
        let backend = snapshot
            .pool(pool)?
            .backends()
            .iter()
            .find(|b| b.addr == addr)?;
        Some(backend.stats.load_estimate())
    }

    /// The queue counters of pool `name`, if it is configured.
    pub fn queue_counters(&self, name: &str) -> Option<QueueCounters> {
        Some(self.shared.snapshots.load().pool(name)?.state().counters())
    }

    /// The weight strategies give each backend of `listener` now, in file order: its
    /// configured weight as drain, health, ejection, slow start and reported load leave it.
    /// `None` if there is no such listener.
    pub fn effective_weights(&self, listener: &str) -> Option<Vec<(SocketAddr, f64)>> {
        let snapshot = self.shared.snapshots.load();
        let pool = snapshot.listener(listener)?.single_pool()?;
        Some(
            pool.backends()
                .iter()
                .map(|b| (b.addr, b.effective_weight))
                .collect(),
        )
    }

    /// Client addresses listener `name`'s per-client limits track now.
    pub fn tracked_clients(&self, name: &str) -> Option<usize> {
        let snapshot = self.shared.snapshots.load();
        Some(snapshot.listener(name)?.stats().clients().tracked())
    }

    /// Every backend name the pools resolve, with its addresses in force and its failures.
    pub fn names(&self) -> Vec<(Target, NameStatus)> {
        self.shared.registry.names().all()
    }

    /// Health of backend `addr` in listener `listener`, if it is configured.
    pub fn backend_health(&self, listener: &str, addr: SocketAddr) -> Option<Health> {
        let snapshot = self.shared.snapshots.load();
        let pool = snapshot.listener(listener)?.single_pool()?;
        let backend = pool.backends().iter().find(|b| b.addr == addr)?;
        Some(backend.stats.health())
    }

    /// The backends `snapshot` does not have that still carry connections: a reload removed
    /// them, and their connections go on until they end.
    pub(crate) fn removed_backends(&self, snapshot: &Snapshot) -> Vec<RemovedBackend> {
        let configured: std::collections::HashSet<(&str, SocketAddr)> = snapshot
            .pools()
            .flat_map(|p| p.backends().iter().map(|b| (&**p.name(), b.addr)))
            .collect();
        self.shared
            .registry
            .removed_with_connections(|pool, addr| configured.contains(&(pool, addr)))
    }

    /// Health checker tasks running now: one per backend of every pool with health checks.
    pub fn health_checkers(&self) -> usize {
        self.shared.checkers.len()
    }

    /// Counters of listener `name`, if it is configured.
    pub fn listener_counters(&self, name: &str) -> Option<ListenerCounters> {
        Some(
            self.shared
                .snapshots
                .load()
                .listener(name)?
                .stats()
                .counters(),
        )
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

    /// Whether the control task answers: it handles requests one at a time, so an answer says
    /// its loop still turns (a watchdog asks this). False once it has stopped.
    pub async fn alive(&self) -> bool {
        let (reply, answer) = oneshot::channel();
        if self.requests.send(Request::Alive(reply)).await.is_err() {
            return false;
        }
        answer.await.is_ok()
    }

    /// Copies of every listening socket in use now, the admin endpoint's included, each with
    /// what it serves: what a new process started for a binary upgrade is given
    /// ([`Builder::inherit`](crate::Builder::inherit)). The balancer keeps accepting on its own.
    pub async fn listening_sockets(&self) -> std::io::Result<Vec<InheritedSocket>> {
        let stopped = || std::io::Error::other("the balancer is shutting down");
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Sockets(reply))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
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
        self.set_admin_state_in(Scope::Listener(listener.to_owned()), addr, state)
            .await
    }

    /// Sets the operator state of backend `addr` of pool `pool`, as
    /// [`set_admin_state`](Handle::set_admin_state) does through a listener.
    pub async fn set_pool_admin_state(
        &self,
        pool: &str,
        addr: SocketAddr,
        state: AdminState,
    ) -> Result<(), AdminError> {
        self.set_admin_state_in(Scope::Pool(pool.to_owned()), addr, state)
            .await
    }

    pub(crate) async fn set_admin_state_in(
        &self,
        scope: Scope,
        addr: SocketAddr,
        state: AdminState,
    ) -> Result<(), AdminError> {
        let (reply, answer) = oneshot::channel();
        let request = Request::SetAdmin {
            scope,
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
