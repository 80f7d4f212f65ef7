//! The immutable runtime view the connection path reads.
//!
//! A [`Snapshot`] is built from a validated [`Config`] and the live-state [`Registry`], then
//! published through one `ArcSwap` ([`SnapshotCell`]). A connection loads it once, takes the
//! [`Pool`] of its listener, and never sees it change under its feet; the one writer, the control
//! task (at start, on a reload, when live state changes), builds a whole new snapshot and swaps
//! it in, so a reader can never observe half an update and neither side ever waits for the
//! other.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::{AllUnhealthy, Config, CongestionControl, ListenerConfig, Weight};
use crate::state::{BackendState, ListenerStats, OpenConn, Registry, Republisher};
use crate::strategy::{BuildStrategy, Candidate, LiveBackend, Strategy};

/// Strategies a library caller set by listener name, in place of the file's `strategy`.
pub(crate) type CustomStrategies = HashMap<String, Arc<dyn BuildStrategy>>;

/// The one place the current snapshot is published.
pub(crate) type SnapshotCell = ArcSwap<Snapshot>;

/// Every listener's pool, as of one configuration and one set of effective weights.
#[derive(Debug)]
pub(crate) struct Snapshot {
    /// In configuration order, so status output reads like the file.
    pools: Vec<Arc<Pool>>,
    by_name: HashMap<String, usize>,
}

impl Snapshot {
    /// Builds a snapshot; live counters come from (and are created in) `registry`, and
    /// `local_addrs` tells where each listener is bound. With `previous`, each pool keeps that
    /// snapshot's turn numbering, so round robins carry on where they were (a rebuild for live
    /// state, which can come many times a second: starting over each time would hand the first
    /// backends of the cycle more than their share); without, every pool's next connection is
    /// turn 0 and round robins start their cycle over (a new configuration).
    pub(crate) fn build(
        config: &Config,
        registry: &Registry,
        local_addrs: &HashMap<String, SocketAddr>,
        previous: Option<&Snapshot>,
        custom: &CustomStrategies,
    ) -> Snapshot {
        let pools: Vec<Arc<Pool>> = config
            .listeners
            .iter()
            .map(|listener| {
                let local_addr = local_addrs.get(&listener.name).copied();
                let turn_base = previous
                    .and_then(|p| p.pool(&listener.name))
                    .map(|p| p.turn_base);
                let pool = Pool::build(
                    listener,
                    registry,
                    local_addr,
                    config.log.access_log,
                    turn_base,
                    custom,
                );
                Arc::new(pool)
            })
            .collect();
        let by_name = config
            .listeners
            .iter()
            .enumerate()
            .map(|(index, listener)| (listener.name.clone(), index))
            .collect();
        Snapshot { pools, by_name }
    }

    /// The pool of listener `name`.
    pub(crate) fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.get(*self.by_name.get(name)?)
    }

    /// Every pool, in configuration order.
    pub(crate) fn pools(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.pools.iter()
    }
}

/// One listener's backends, settings and strategy.
#[derive(Debug)]
pub(crate) struct Pool {
    name: Arc<str>,
    /// The listener's accepted count when this pool's turn numbering began (see [`Pool::turn`]).
    turn_base: u64,
    local_addr: Option<SocketAddr>,
    settings: ListenerSettings,
    backends: Box<[Backend]>,
    strategy: Box<dyn Strategy>,
    /// What status output calls the strategy.
    strategy_name: Arc<str>,
    stats: Arc<ListenerStats>,
    /// What the listener does now because no backend is healthy; `None` while one is.
    all_unhealthy: Option<AllUnhealthy>,
    /// Wakes the control task when passive ejection needs it.
    republisher: Republisher,
}

/// The per-connection settings of a listener.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ListenerSettings {
    /// Upper bound on one connect attempt.
    pub connect_timeout: Duration,
    /// Idle time after which a connection is closed.
    pub idle_timeout: Duration,
    /// Distinct backends tried per connection.
    pub connect_attempts: NonZeroU32,
    /// Open client connections beyond this are refused.
    pub max_connections: NonZeroUsize,
    /// Relay with `splice(2)` where available.
    pub splice: bool,
    /// Congestion control for the sockets toward the backends, if not the system's.
    pub backend_congestion_control: Option<CongestionControl>,
    /// Whether each closed (or refused) client connection is logged; `[log] access_log`.
    pub access_log: bool,
    /// Consecutive connect failures that eject a backend, if passive checks are on.
    pub max_connect_failures: Option<NonZeroU32>,
}

/// One backend as a snapshot sees it.
#[derive(Debug)]
pub(crate) struct Backend {
    /// Where to connect.
    pub addr: SocketAddr,
    /// The weight the configuration gives it.
    pub weight: Weight,
    /// The weight strategies use: the configured weight as live state (drain, health,
    /// ejection, slow start, load) made it when this snapshot was built.
    pub effective_weight: f64,
    /// Its live counters, shared with every other snapshot.
    pub stats: Arc<BackendState>,
}

impl Pool {
    fn build(
        listener: &ListenerConfig,
        registry: &Registry,
        local_addr: Option<SocketAddr>,
        access_log: bool,
        turn_base: Option<u64>,
        custom: &CustomStrategies,
    ) -> Pool {
        let now = Instant::now();
        let states: Vec<Arc<BackendState>> = listener
            .backends
            .iter()
            .map(|b| registry.backend(&listener.name, b.addr))
            .collect();
        // Backends the operator lets take traffic, and whether any of them is also healthy.
        let admitted: Vec<bool> = (listener.backends.iter().zip(&states))
            .map(|(b, s)| s.admin_weight(b.weight.get()) > 0.0)
            .collect();
        let none_healthy = admitted.contains(&true)
            && !(admitted.iter().zip(&states)).any(|(&a, s)| a && s.in_rotation_at(now));
        let all_unhealthy = none_healthy.then(|| {
            listener
                .health
                .as_ref()
                .map_or(AllUnhealthy::default(), |h| h.all_unhealthy)
        });
        let backends: Box<[Backend]> = (listener.backends.iter().zip(states))
            .map(|(b, stats)| {
                let configured = b.weight.get();
                let effective_weight = match all_unhealthy {
                    None => stats.effective_weight_at(configured, now),
                    Some(AllUnhealthy::RouteAnyway) => stats.admin_weight(configured),
                    Some(AllUnhealthy::Reject) => 0.0,
                };
                Backend {
                    addr: b.addr,
                    weight: b.weight,
                    effective_weight,
                    stats,
                }
            })
            .collect();
        let stats = registry.listener(&listener.name);
        if stats.set_all_unhealthy(all_unhealthy.is_some()) {
            match all_unhealthy {
                Some(policy) => warn!(
                    listener = %listener.name,
                    all_unhealthy = policy.as_str(),
                    "no backend is healthy; {}",
                    match policy {
                        AllUnhealthy::RouteAnyway => "routing to every backend anyway",
                        AllUnhealthy::Reject => "closing new client connections",
                    }
                ),
                None => {
                    info!(listener = %listener.name, "a backend is healthy again; routing by health resumes")
                }
            }
        }
        let candidates: Vec<Candidate> = backends
            .iter()
            .map(|b| Candidate::new(b.addr, b.effective_weight, LiveBackend::of(&b.stats)))
            .collect();
        let builder: &dyn BuildStrategy = match custom.get(&listener.name) {
            Some(custom) => &**custom,
            None => &listener.strategy,
        };
        Pool {
            name: listener.name.as_str().into(),
            turn_base: turn_base.unwrap_or_else(|| stats.accepted()),
            local_addr,
            settings: ListenerSettings {
                connect_timeout: listener.connect_timeout,
                idle_timeout: listener.idle_timeout,
                connect_attempts: listener.connect_attempts,
                max_connections: listener.max_connections,
                splice: listener.splice,
                backend_congestion_control: listener.backend_congestion_control,
                access_log,
                max_connect_failures: listener.passive.map(|p| p.max_connect_failures),
            },
            strategy: builder.build(&candidates),
            strategy_name: builder.name().into(),
            backends,
            stats,
            all_unhealthy,
            republisher: registry.republisher().clone(),
        }
    }

    /// The name of the strategy in use.
    pub(crate) fn strategy_name(&self) -> &str {
        &self.strategy_name
    }

    /// What the listener does because no backend is healthy, or `None` while one is.
    pub(crate) fn all_unhealthy(&self) -> Option<AllUnhealthy> {
        self.all_unhealthy
    }

    /// Asks the control task to rebuild the snapshot (lock-free; see [`Republisher`]).
    pub(crate) fn republish(&self) {
        self.republisher.republish();
    }

    /// The listener's name.
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The address the listener is bound to, if it is.
    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// The listener's per-connection settings.
    pub(crate) fn settings(&self) -> &ListenerSettings {
        &self.settings
    }

    /// The backends, in configuration order.
    pub(crate) fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The listener's live counters.
    pub(crate) fn stats(&self) -> &Arc<ListenerStats> {
        &self.stats
    }

    /// The turn of an admitted connection: its number among the listener's connections since
    /// this pool's numbering began, at the last reload (rebuilds for live state carry it on).
    ///
    /// The number comes from the listener's `accepted` counter, which admitting a connection
    /// increments anyway, so however many threads accept for the listener, its connections
    /// form one sequence and round robin stays exact, at no extra cost.
    pub(crate) fn turn(&self, open: &OpenConn) -> u64 {
        open.number().wrapping_sub(self.turn_base)
    }

    /// Picks a backend for the connection numbered `turn` (see [`Strategy::pick`]), skipping
    /// the indices in `tried`.
    pub(crate) fn pick(&self, turn: u64, tried: &[usize]) -> Option<(usize, &Backend)> {
        let index = self.strategy.pick(turn, tried)?;
        Some((index, &self.backends[index]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const TWO_LISTENERS: &str = r#"
        [[listener]]
        name = "a"
        bind = "127.0.0.1:0"
        [[listener.backend]]
        addr = "127.0.0.1:9001"
        weight = 2
        [[listener]]
        name = "b"
        bind = "127.0.0.1:0"
        strategy = "capacity_proportional"
        [[listener.backend]]
        addr = "127.0.0.1:9001"
    "#;

    #[test]
    fn rebuilt_snapshots_share_live_state() {
        let config = crate::config::parse(TWO_LISTENERS, Path::new("t.toml")).expect("valid");
        let registry = Registry::default();
        let first = Snapshot::build(&config, &registry, &HashMap::new(), None, &HashMap::new());
        let second = Snapshot::build(&config, &registry, &HashMap::new(), None, &HashMap::new());
        let a1 = &first.pool("a").expect("a").backends()[0];
        let a2 = &second.pool("a").expect("a").backends()[0];
        let b1 = &first.pool("b").expect("b").backends()[0];
        assert!(Arc::ptr_eq(&a1.stats, &a2.stats));
        // Same address under another listener is another backend.
        assert!(!Arc::ptr_eq(&a1.stats, &b1.stats));
        assert_eq!(a1.effective_weight, 2.0);
    }

    #[test]
    fn a_rebuild_for_live_state_carries_the_round_robin_on_and_a_new_config_restarts_it() {
        let text = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\n\
                    [[listener.backend]]\naddr = \"127.0.0.1:9001\"\n\
                    [[listener.backend]]\naddr = \"127.0.0.1:9002\"\n";
        let config = crate::config::parse(text, Path::new("t.toml")).expect("valid");
        let registry = Registry::default();
        // Admits one connection to the snapshot's pool and picks for it.
        let pick = |s: &Snapshot| {
            let pool = s.pool("a").expect("a");
            let open = ListenerStats::admit(pool.stats(), 10).expect("admitted");
            pool.pick(pool.turn(&open), &[]).expect("a pick").0
        };
        let first = Snapshot::build(&config, &registry, &HashMap::new(), None, &HashMap::new());
        assert_eq!(pick(&first), 0);
        let rebuilt = Snapshot::build(
            &config,
            &registry,
            &HashMap::new(),
            Some(&first),
            &HashMap::new(),
        );
        assert_eq!(pick(&rebuilt), 1, "carries on after backend 0");
        assert_eq!(pick(&rebuilt), 0);
        assert_eq!(pick(&rebuilt), 1);
        let reloaded = Snapshot::build(&config, &registry, &HashMap::new(), None, &HashMap::new());
        assert_eq!(
            pick(&reloaded),
            0,
            "a new configuration starts the cycle over"
        );
    }

    #[test]
    fn pool_picks_through_its_strategy() {
        let config = crate::config::parse(TWO_LISTENERS, Path::new("t.toml")).expect("valid");
        let snapshot = Snapshot::build(
            &config,
            &Registry::default(),
            &HashMap::new(),
            None,
            &HashMap::new(),
        );
        let pool = snapshot.pool("b").expect("b");
        let (index, backend) = pool.pick(0, &[]).expect("one backend");
        assert_eq!((index, backend.addr.port()), (0, 9001));
        assert!(pool.pick(1, &[0]).is_none());
        assert!(snapshot.pool("missing").is_none());
    }
}
