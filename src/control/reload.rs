//! The reload algorithm: from the configuration in force to a new one, all or nothing.
//!
//! Every socket a new or moved listener needs is bound before anything changes; a listener
//! whose address is already bound (renamed, or moved onto a port another listener gives up)
//! takes that socket over instead, so its port never closes. Checkers follow the backends, the
//! new snapshot is published, then the listeners that are gone stop accepting: their open
//! connections go on. Live state is kept for every backend the new file still has.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use tracing::error;

use super::listeners::log_listening;
use super::summary::{ReloadError, ReloadSummary};
use super::task::ControlTask;
use crate::config::{Config, ListenerConfig};
use crate::dataplane::accept::{self, Bound};
use crate::snapshot::Snapshot;

impl ControlTask {
    /// Switches to `new`: all or nothing (see the `reload` module).
    pub(super) async fn apply(&mut self, mut new: Config) -> Result<ReloadSummary, ReloadError> {
        // A name the running configuration has keeps its addresses; a new one has none until
        // its first answer (see `ControlTask::follow_names`).
        new.expand(self.discovery.answers());
        // 1. Decide what happens to each listener, and bind every new socket. A failure here
        //    drops the sockets bound so far and changes nothing else.
        let kept: HashSet<&str> = new
            .listeners
            .iter()
            .filter(|l| {
                self.listeners
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
            let reusable = self.listeners.running.iter().find(|(name, r)| {
                listener.bind.port() != 0
                    && (r.bind == listener.bind || r.local_addr == listener.bind)
                    && !kept.contains(name.as_str())
            });
            match reusable {
                Some((old, _)) => {
                    takeovers.insert(listener.name.clone(), old.clone());
                }
                None => fresh.push(accept::bind(listener, self.listeners.placement.count())?),
            }
        }
        // Nothing can fail from here on.

        // 2. Stop the accept loops whose sockets move to another name *before* publishing:
        //    otherwise they would accept connections for a name the new snapshot no longer
        //    has. Meanwhile connections wait in the socket's queue; none is lost.
        let mut handed_over: HashMap<String, Bound> = HashMap::new();
        for old_name in takeovers.values() {
            if let Some(bound) = self.listeners.retire(old_name, false).await {
                handed_over.insert(old_name.clone(), bound);
            }
        }

        // 3. Start checkers for new backends, stop those of removed ones, restart those whose
        //    health settings changed; then publish the new snapshot: from here on, new
        //    connections follow the new file.
        self.health.sync(&new, &self.registry);
        let current = self.listeners.snapshots.load();
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
                        .or_else(|| current.listener(name).and_then(|l| l.local_addr())),
                };
                Some((name.clone(), addr?))
            })
            .collect();
        drop(current);
        self.listeners.snapshots.store(Arc::new(Snapshot::build(
            &new,
            &self.registry,
            &addrs,
            None,
            &self.strategies,
        )));

        // 4. Stop the accept loops that are neither kept nor handed over (removed or moved
        //    listeners): their sockets close, their open connections go on.
        let retiring: Vec<String> = self
            .listeners
            .running
            .keys()
            .filter(|name| !kept.contains(name.as_str()))
            .cloned()
            .collect();
        for name in retiring {
            drop(self.listeners.retire(&name, true).await);
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
            log_listening(&new, config, bound.local_addr);
            self.listeners.start(bound, config.bind);
        }

        // 6. Clients waiting in a pool no listener sends to any more are closed; the others
        //    may find slots the new file added.
        self.listeners.close_orphaned_queues(&new, &self.registry);
        self.listeners.dispatch_all();

        self.registry.retain_config(&new);
        let summary = ReloadSummary::between(&self.config, &new);
        // The admin endpoint, the log format and the worker threads are set up once, at start.
        // Keeping the values in force here means the next reload still reports them as waiting
        // for a restart.
        new.admin = self.config.admin.clone();
        new.threads = self.config.threads;
        new.log.format = self.config.log.format;
        self.config = new;
        self.discovery.sync(&self.config, self.registry.names());
        Ok(summary)
    }
}
