//! The running balancer: binds what the configuration asks for, starts the worker threads, the
//! control task and the admin endpoint, and stops them in order.
//!
//! This is where the parts are wired together and nothing else: the data plane lives in
//! `dataplane`, the control task in `control`, the admin endpoint (a plain client of
//! [`Handle`]) in `admin`.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};

use crate::admin;
use crate::config::{Config, Forward};
use crate::control::Request;
use crate::control::task::ControlTask;
use crate::control::{Handle, Lifecycle, Observer, Observers, Stopped, log_listening};
use crate::dataplane::accept::{self, BindError, Bound, InheritedSocket};
use crate::dataplane::workers::{self, Workers};
use crate::snapshot::{CustomStrategies, Snapshot};
use crate::state::{Registry, Republisher};
use crate::strategy::BuildStrategy;

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
    /// [`Builder::strategy`] named a listener the configuration does not have.
    #[error("a strategy was set for listener `{0}`, which the configuration does not have")]
    UnknownListener(String),
    /// [`Builder::strategy`] named a listener that routes to several pools by server name.
    #[error(
        "a strategy was set for listener `{0}`, which routes to pools by server name: set it for one of its pools by name"
    )]
    RoutedListener(String),
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
    requests: tokio::sync::mpsc::Receiver<Request>,
    /// Wake-ups from the registry's republisher (checkers, passive ejection, [`Handle::republish`]).
    woken: tokio::sync::mpsc::Receiver<()>,
    handle: Handle,
    strategies: CustomStrategies,
    observers: Observers,
    /// A copy of the admin endpoint's socket and its configured `bind`, for a binary upgrade.
    admin_copy: Option<(SocketAddr, std::net::TcpListener)>,
}

/// Sets up a [`Balancer`] before it binds: [`Balancer::builder`].
#[derive(Debug)]
pub struct Builder {
    config: Config,
    config_path: Option<PathBuf>,
    strategies: CustomStrategies,
    observer: Observers,
    inherited: Vec<InheritedSocket>,
}

impl Builder {
    /// Sets the file [`Handle::reload`] and the admin endpoint's reload re-read.
    pub fn config_path(mut self, path: impl Into<PathBuf>) -> Builder {
        self.config_path = Some(path.into());
        self
    }

    /// Uses `strategy` for listener `listener`'s pool instead of the `strategy` its
    /// configuration names, now and after every reload that keeps the pool. `listener` may
    /// also name a `[[pool]]`; a listener with inline backends has a pool of its own, named
    /// after it.
    pub fn strategy(mut self, listener: &str, strategy: impl BuildStrategy + 'static) -> Builder {
        self.strategies
            .insert(listener.to_owned(), Arc::new(strategy));
        self
    }

    /// Calls `observer` on the control task when the balancer starts serving, when each reload
    /// starts and ends, and when shutdown starts (for a process supervisor such as systemd).
    /// It must return quickly: the control task waits for it.
    pub fn on_lifecycle(mut self, observer: impl Fn(Lifecycle) + Send + Sync + 'static) -> Builder {
        let observer: Observer = Arc::new(observer);
        self.observer = Observers::new(Some(observer));
        self
    }

    /// Listening sockets to serve on instead of binding (systemd's socket activation, a binary
    /// upgrade). A listener takes every one that served a listener of its name and `bind`, or
    /// that is bound to exactly its configured address; the admin endpoint likewise. Those that
    /// fit nothing are closed; listeners that find none bind as usual.
    pub fn inherit(mut self, sockets: impl IntoIterator<Item = InheritedSocket>) -> Builder {
        self.inherited.extend(sockets);
        self
    }

    /// Binds every listener and the admin endpoint, all or nothing, and starts the worker
    /// threads. Must be called inside a tokio runtime.
    pub fn bind(self) -> Result<Balancer, StartError> {
        let Builder {
            config,
            config_path,
            strategies,
            observer,
            inherited,
        } = self;
        let mut by_pool = CustomStrategies::new();
        for (name, strategy) in strategies {
            let pool = match config.listeners.iter().find(|l| l.name == name) {
                Some(listener) => match &listener.forward {
                    Forward::Pool(pool) => pool.clone(),
                    Forward::Routes(_) => return Err(StartError::RoutedListener(name)),
                },
                None if config.pool(&name).is_some() => name,
                None => return Err(StartError::UnknownListener(name)),
            };
            by_pool.insert(pool, strategy);
        }
        Balancer::start(config, config_path, by_pool, observer, inherited)
    }
}

impl Balancer {
    /// A balancer for `config`, to be set up further before it binds.
    pub fn builder(config: Config) -> Builder {
        Builder {
            config,
            config_path: None,
            strategies: CustomStrategies::new(),
            observer: Observers::default(),
            inherited: Vec::new(),
        }
    }

    /// Binds every listener of `config` and its admin endpoint, all or nothing. Must be called
    /// inside a tokio runtime. The same as `Balancer::builder(config.clone()).bind()`.
    pub fn bind(config: &Config) -> Result<Balancer, StartError> {
        Balancer::builder(config.clone()).bind()
    }

    fn start(
        config: Config,
        config_path: Option<PathBuf>,
        strategies: CustomStrategies,
        observers: Observers,
        mut inherited: Vec<InheritedSocket>,
    ) -> Result<Balancer, StartError> {
        let config = &config;
        // The admin endpoint first: when it cannot bind, nothing has been logged as listening.
        let admin = match &config.admin {
            None => None,
            Some(admin) => {
                let fail = |source| StartError::AdminBind {
                    addr: admin.bind,
                    source,
                };
                let mine = take(&mut inherited, |s| s.fits_admin(admin.bind));
                let socket = match mine.into_iter().next() {
                    Some(socket) => {
                        info!(bind = %admin.bind, "admin endpoint on an inherited socket");
                        admin::adopt(socket.socket).map_err(fail)?
                    }
                    None => admin::bind(admin.bind).map_err(fail)?,
                };
                let copy = socket
                    .0
                    .as_fd()
                    .try_clone_to_owned()
                    .map(std::net::TcpListener::from)
                    .map_err(fail)?;
                Some((socket, (admin.bind, copy)))
            }
        };
        let (admin, admin_copy) = match admin {
            Some((socket, copy)) => (Some(socket), Some(copy)),
            None => (None, None),
        };
        let admin_addr = admin.as_ref().map(|(_, addr)| *addr);
        let admin = admin.map(|(socket, _)| socket);
        let threads = config.threads.unwrap_or_else(workers::default_count);
        let bound = config
            .listeners
            .iter()
            .map(|l| {
                let mine = take(&mut inherited, |s| s.fits_listener(l));
                if mine.is_empty() {
                    return accept::bind(l, threads.get());
                }
                info!(listener = %l.name, sockets = mine.len(), "listener on inherited sockets");
                accept::adopt(
                    l,
                    mine.into_iter().map(|s| s.socket).collect(),
                    threads.get(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        for left in inherited {
            let addr = left.socket.local_addr().ok();
            warn!(addr = ?addr, served = ?left.served, "an inherited socket fits no listener; closed");
        }
        let workers = Workers::start(threads).map_err(|source| StartError::Workers {
            threads: threads.get(),
            source,
        })?;
        let (republisher, woken) = Republisher::new();
        let registry = Arc::new(Registry::with_republisher(republisher));
        let addrs = bound
            .iter()
            .map(|b| (b.name.clone(), b.local_addr))
            .collect();
        let snapshot = Snapshot::build(config, &registry, &addrs, None, &strategies);
        if let Some(addr) = admin_addr {
            let token = config.admin.as_ref().is_some_and(|a| a.token.is_some());
            info!(bind = %addr, token, "admin endpoint listening");
        }
        for listener in &config.listeners {
            log_listening(config, listener, addrs[&listener.name]);
        }
        let (handle, requests) = Handle::new(
            snapshot,
            admin_addr,
            workers.placement().clone(),
            Arc::clone(&registry),
        );
        Ok(Balancer {
            bound,
            workers,
            admin,
            config: config.clone(),
            config_path,
            registry,
            requests,
            woken,
            handle,
            strategies,
            observers,
            admin_copy,
        })
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
    pub async fn run(self, shutdown: CancellationToken) -> Stopped {
        let Balancer {
            bound,
            workers,
            admin,
            config,
            config_path,
            registry,
            requests,
            woken,
            handle,
            strategies,
            observers,
            admin_copy,
        } = self;
        let stop_admin = CancellationToken::new();
        let admin = admin.map(|socket| {
            let endpoint = admin::Endpoint {
                handle: handle.clone(),
                token: config.admin.as_ref().and_then(|a| a.token.clone()),
                config_path: config_path.clone(),
                shutting_down: shutdown.clone(),
                started: admin::Started::now(),
            };
            // Aborted if `run` itself is dropped: the endpoint never outlives its balancer.
            AbortOnDropHandle::new(tokio::spawn(admin::serve(
                socket,
                endpoint,
                stop_admin.clone(),
            )))
        });
        let control = ControlTask::new(
            config,
            config_path,
            registry,
            requests,
            woken,
            handle,
            workers.placement().clone(),
            strategies,
            observers,
            &shutdown,
        );
        let stopped = control.run(bound, admin_copy, shutdown).await;
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
        // The worker threads end here, once every connection has closed.
        drop(workers);
        stopped
    }
}

/// Takes the sockets `fits` accepts out of `sockets`.
fn take(
    sockets: &mut Vec<InheritedSocket>,
    fits: impl Fn(&InheritedSocket) -> bool,
) -> Vec<InheritedSocket> {
    let (taken, rest) = std::mem::take(sockets).into_iter().partition(|s| fits(s));
    *sockets = rest;
    taken
}
