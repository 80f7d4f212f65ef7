//! Where live state is found by name when a snapshot is built, and how a change to it reaches
//! the control task.
//!
//! A snapshot is rebuilt whenever weights change (a reload, a health result), but the number of
//! connections open to a backend does not change with it. So live state sits in
//! reference-counted structs keyed by (pool name, backend address) in a [`Registry`]; every
//! snapshot built for the same key points at the same struct, and a connection keeps the struct
//! it started with alive until it ends, even if its backend has left the configuration
//! meanwhile. The registry's map is touched only when a snapshot is built, never per connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use super::backend::{AdminState, BackendState};
use super::listener::ListenerStats;
use super::names::Names;
use super::pool::PoolState;
use crate::config::Config;

/// Asks the control task to rebuild the snapshot because live state changed.
///
/// A flag plus a wake-up on a channel of capacity one: both lock-free and never waiting, so the
/// connection path may call it (passive ejection does). No change is lost: when the channel is
/// full a wake-up is already pending, and the control task reads the flag when it wakes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Republisher {
    dirty: Arc<AtomicBool>,
    wake: Option<mpsc::Sender<()>>,
}

impl Republisher {
    /// A republisher and the receiver its wake-ups arrive on.
    pub(crate) fn new() -> (Republisher, mpsc::Receiver<()>) {
        let (wake, woken) = mpsc::channel(1);
        let republisher = Republisher {
            dirty: Arc::new(AtomicBool::new(false)),
            wake: Some(wake),
        };
        (republisher, woken)
    }

    /// Marks live state as changed and wakes the control task.
    pub(crate) fn republish(&self) {
        self.dirty.store(true, Ordering::Release);
        if let Some(wake) = &self.wake {
            match wake.try_send(()) {
                // Full: a wake-up is pending already. Closed: the balancer has stopped.
                Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Closed(())) => {}
            }
        }
    }

    /// True (once) if a republish was asked for since the last call.
    pub(crate) fn take(&self) -> bool {
        self.dirty.swap(false, Ordering::AcqRel)
    }
}

/// Where live state is found by name when a snapshot is built.
///
/// Holds a mutex, taken by snapshot builds (start, reload, health changes) and by `/status`
/// and `/metrics` for the removed backends still carrying connections; the connection path
/// never takes it.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    inner: Mutex<RegistryInner>,
    republisher: Republisher,
    /// What the resolver found for each backend name.
    names: Names,
}

/// A backend the running configuration no longer has that still carries connections (see
/// [`Registry::removed_with_connections`]).
#[derive(Debug, Clone)]
pub(crate) struct RemovedBackend {
    /// The pool it was removed from.
    pub pool: Arc<str>,
    /// Its address.
    pub addr: SocketAddr,
    /// Its live state, the counters of its remaining connections included.
    pub state: Arc<BackendState>,
}

#[derive(Debug, Default)]
struct RegistryInner {
    listeners: HashMap<String, Arc<ListenerStats>>,
    pools: HashMap<String, Arc<PoolState>>,
    backends: HashMap<(String, SocketAddr), Arc<BackendState>>,
}

impl Registry {
    /// A registry whose snapshots' pools can wake the control task through `republisher`.
    pub(crate) fn with_republisher(republisher: Republisher) -> Registry {
        Registry {
            inner: Mutex::default(),
            republisher,
            names: Names::default(),
        }
    }

    /// What the resolver found for each backend name.
    pub(crate) fn names(&self) -> &Names {
        &self.names
    }

    /// Forgets the live state of listeners, pools and backends `config` no longer has (see
    /// [`Registry::retain`]).
    pub(crate) fn retain_config(&self, config: &Config) {
        self.retain(
            |name| config.listeners.iter().any(|l| l.name == name),
            |name| config.pool(name).is_some(),
            |name, addr| {
                config
                    .pool(name)
                    .is_some_and(|p| p.backends.iter().any(|b| b.addr == addr))
            },
        );
    }

    /// The republisher pools hand to the connection path.
    pub(crate) fn republisher(&self) -> &Republisher {
        &self.republisher
    }

    /// The stats of listener `name`, created on first use.
    pub(crate) fn listener(&self, name: &str) -> Arc<ListenerStats> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(inner.listeners.entry(name.to_owned()).or_default())
    }

    /// The live state of pool `name`, created on first use.
    pub(crate) fn pool(&self, name: &str) -> Arc<PoolState> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            inner
                .pools
                .entry(name.to_owned())
                .or_insert_with(|| Arc::new(PoolState::new(name))),
        )
    }

    /// The live state of backend `addr` in pool `pool`, created on first use.
    pub(crate) fn backend(&self, pool: &str, addr: SocketAddr) -> Arc<BackendState> {
        let state = self.pool(pool);
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            inner
                .backends
                .entry((pool.to_owned(), addr))
                .or_insert_with(|| Arc::new(BackendState::in_pool(state))),
        )
    }

    /// Every pool's live state, configured or not, by name.
    pub(crate) fn pool_states(&self) -> Vec<Arc<PoolState>> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.pools.values().cloned().collect()
    }

    /// Forgets the state of listeners, pools and backends that are no longer configured and that
    /// nothing else refers to. State still referenced (by an open connection, or an older
    /// snapshot that one holds) is kept, so a backend removed and re-added while its connections
    /// are open finds its counters again. Its drain is not kept: that was the operator's word
    /// about the backend as configured, and one removed, upgraded and added back is expected in
    /// rotation.
    pub(crate) fn retain(
        &self,
        listener_configured: impl Fn(&str) -> bool,
        pool_configured: impl Fn(&str) -> bool,
        backend_configured: impl Fn(&str, SocketAddr) -> bool,
    ) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner
            .listeners
            .retain(|name, stats| Arc::strong_count(stats) > 1 || listener_configured(name));
        inner.backends.retain(|(pool, addr), stats| {
            let configured = backend_configured(pool, *addr);
            if !configured {
                stats.set_admin_state(AdminState::Ready);
            }
            configured || Arc::strong_count(stats) > 1
        });
        // After the backends: each one still kept holds its pool's state.
        inner
            .pools
            .retain(|name, state| Arc::strong_count(state) > 1 || pool_configured(name));
    }

    /// The backends for which `configured` is false that still carry connections, in
    /// (pool, address) order: a reload removed them (or their pool) and their
    /// connections go on. `/metrics` and `/status` show them until the last one ends.
    pub(crate) fn removed_with_connections(
        &self,
        configured: impl Fn(&str, SocketAddr) -> bool,
    ) -> Vec<RemovedBackend> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut removed: Vec<RemovedBackend> = inner
            .backends
            .iter()
            .filter(|((pool, addr), state)| state.active() > 0 && !configured(pool, *addr))
            .map(|((pool, addr), state)| RemovedBackend {
                pool: Arc::from(pool.as_str()),
                addr: *addr,
                state: Arc::clone(state),
            })
            .collect();
        drop(inner);
        removed.sort_by(|a, b| (&a.pool, a.addr).cmp(&(&b.pool, b.addr)));
        removed
    }

    #[cfg(test)]
    /// How many listener and backend entries are kept.
    pub(crate) fn len(&self) -> (usize, usize) {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        (inner.listeners.len(), inner.backends.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_returns_the_same_state_for_the_same_key() {
        let registry = Registry::default();
        let addr: SocketAddr = "127.0.0.1:9001".parse().expect("literal");
        let a = registry.backend("chat", addr);
        let b = registry.backend("chat", addr);
        let c = registry.backend("embed", addr);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
    }

    #[test]
    fn a_removed_backend_keeps_its_counters_while_referenced_but_not_its_drain() {
        let config = |backends: &[&str]| {
            let mut text = "[[listener]]\nname = \"chat\"\nbind = \"127.0.0.1:0\"\n".to_owned();
            for b in backends {
                text.push_str(&format!("[[listener.backend]]\naddr = \"{b}\"\n"));
            }
            crate::config::parse(&text, std::path::Path::new("t.toml")).expect("valid")
        };
        let retain =
            |registry: &Registry, config: &crate::config::Config| registry.retain_config(config);
        let registry = Registry::default();
        let kept: SocketAddr = "127.0.0.1:9001".parse().expect("literal");
        let removed: SocketAddr = "127.0.0.1:9002".parse().expect("literal");
        let (k, r) = (
            registry.backend("chat", kept),
            registry.backend("chat", removed),
        );
        k.set_admin_state(AdminState::Drained);
        r.set_admin_state(AdminState::Drained);
        let open = BackendState::acquire(&r);

        retain(&registry, &config(&["127.0.0.1:9001"]));
        assert_eq!(registry.len().1, 2, "an open connection keeps the state");
        assert_eq!(k.admin_state(), AdminState::Drained, "still configured");
        assert_eq!(
            r.admin_state(),
            AdminState::Ready,
            "removed: its drain is gone"
        );
        assert!(Arc::ptr_eq(&registry.backend("chat", removed), &r));
        assert_eq!(r.active(), 1);

        drop((open, r));
        retain(&registry, &config(&["127.0.0.1:9001"]));
        assert_eq!(registry.len().1, 1, "nothing refers to it any more");
    }
}
