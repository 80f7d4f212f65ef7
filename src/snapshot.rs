//! The immutable runtime view the connection path reads.
//!
//! A [`Snapshot`] is built from a validated [`Config`] and the live-state [`Registry`], then
//! published through one `ArcSwap` ([`SnapshotCell`]). A connection loads it once, takes its
//! [`Listener`] (and through it the listener's [`Pool`]), and never sees it change under its
//! feet; the one writer, the control task (at start, on a reload, when live state changes),
//! builds a whole new snapshot and swaps it in, so a reader can never observe half an update
//! and neither side ever waits for the other.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::{
    Access, Affinity, AllUnhealthy, ClientLimits, ClientsConfig, Config, CongestionControl,
    Forward, HashKey, ListenerConfig, Networks, PoolConfig, ProxyAccept, ProxyVersion, Routes,
    SendProxy, SniPattern, Weight,
};
use crate::state::{
    ActiveConn, BackendState, ListenerStats, OpenConn, PoolState, Registry, Republisher,
};
use crate::strategy::{Bounded, BuildStrategy, Candidate, LiveBackend, Strategy};

/// Strategies a library caller set by pool name, in place of the file's `strategy`.
pub(crate) type CustomStrategies = HashMap<String, Arc<dyn BuildStrategy>>;

/// The one place the current snapshot is published.
pub(crate) type SnapshotCell = ArcSwap<Snapshot>;

/// Picks a large slotted pool's strategy makes before the pool scans for the least loaded
/// backend with a free slot instead: past this many full picks, most of the pool is full.
const FULL_PICKS: usize = 8;
/// Pools up to this size scan after the first full pick: their strategies scan the pool on
/// every pick anyway, so asking again costs as much as the scan that settles it.
const SCAN_AFTER_ONE_MISS: usize = 64;

/// Every listener and pool, as of one configuration and one set of effective weights.
#[derive(Debug)]
pub(crate) struct Snapshot {
    /// In configuration order, so status output reads like the file.
    listeners: Vec<Arc<Listener>>,
    listener_index: HashMap<String, usize>,
    /// In configuration order: `[[pool]]`s, then the listeners' own.
    pools: Vec<Arc<Pool>>,
    pool_index: HashMap<String, usize>,
}

impl Snapshot {
    /// Builds a snapshot; live counters come from (and are created in) `registry`, and
    /// `local_addrs` tells where each listener is bound. With `previous`, each pool and
    /// listener keeps that snapshot's turn numbering, so round robins carry on where they were
    /// (a rebuild for live state, which can come many times a second: starting over each time
    /// would hand the first backends of the cycle more than their share); without, every
    /// pool's next connection is turn 0 and round robins start their cycle over (a new
    /// configuration).
    pub(crate) fn build(
        config: &Config,
        registry: &Registry,
        local_addrs: &HashMap<String, SocketAddr>,
        previous: Option<&Snapshot>,
        custom: &CustomStrategies,
    ) -> Snapshot {
        let pools: Vec<Arc<Pool>> = config
            .pools
            .iter()
            .map(|pool| {
                let users: Vec<&ListenerConfig> = config
                    .listeners
                    .iter()
                    .filter(|l| l.uses_pool(&pool.name))
                    .collect();
                let listeners: Vec<Arc<str>> =
                    users.iter().map(|l| Arc::from(l.name.as_str())).collect();
                // A listener that routes numbers its accepts across several pools: each pool
                // it reaches numbers its own picks.
                let routed = users
                    .iter()
                    .any(|l| matches!(l.forward, Forward::Routes(_)));
                let turn_base = previous
                    .and_then(|p| p.pool(&pool.name))
                    .map(|p| p.turn_base);
                Arc::new(Pool::build(
                    pool, listeners, routed, registry, turn_base, custom,
                ))
            })
            .collect();
        let pool_index: HashMap<String, usize> = config
            .pools
            .iter()
            .enumerate()
            .map(|(index, pool)| (pool.name.clone(), index))
            .collect();
        let listeners: Vec<Arc<Listener>> = config
            .listeners
            .iter()
            .filter_map(|listener| {
                let targets: Option<Vec<Arc<Pool>>> = listener
                    .pools()
                    .into_iter()
                    .map(|name| pools.get(*pool_index.get(name)?).cloned())
                    .collect();
                let turn_base = previous
                    .and_then(|p| p.listener(&listener.name))
                    .map(|l| l.turn_base);
                Some(Arc::new(Listener::build(
                    listener,
                    targets?,
                    registry,
                    local_addrs.get(&listener.name).copied(),
                    config.log.access_log,
                    turn_base,
                )))
            })
            .collect();
        let listener_index = listeners
            .iter()
            .enumerate()
            .map(|(index, listener)| (listener.name.to_string(), index))
            .collect();
        Snapshot {
            listeners,
            listener_index,
            pools,
            pool_index,
        }
    }

    /// Listener `name`.
    pub(crate) fn listener(&self, name: &str) -> Option<&Arc<Listener>> {
        self.listeners.get(*self.listener_index.get(name)?)
    }

    /// Every listener, in configuration order.
    pub(crate) fn listeners(&self) -> impl Iterator<Item = &Arc<Listener>> {
        self.listeners.iter()
    }

    /// Pool `name`.
    pub(crate) fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.get(*self.pool_index.get(name)?)
    }

    /// Every pool, in configuration order.
    pub(crate) fn pools(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.pools.iter()
    }
}

/// One listener: its per-connection settings, its counters, and its pools.
#[derive(Debug)]
pub(crate) struct Listener {
    name: Arc<str>,
    /// The listener's accepted count when its turn numbering began (see [`Listener::turn`]).
    turn_base: u64,
    local_addr: Option<SocketAddr>,
    settings: ListenerSettings,
    clients: ClientControls,
    stats: Arc<ListenerStats>,
    /// The pools its connections go to: one, or each its routes name, once, in route order.
    pools: Box<[Arc<Pool>]>,
    /// How a connection's pool is chosen by server name; `None`: always the first pool.
    routes: Option<Box<RouteTable>>,
    /// How long a connection's ClientHello is waited for, if the listener reads it: to route
    /// by name, or because a pool keys connections by name.
    hello_timeout: Option<Duration>,
}

/// A listener's routes, as lookups by server name: the first route (in file order) that
/// matches a name wins.
#[derive(Debug, Default)]
pub(crate) struct RouteTable {
    /// Exact names: (route number, pool index).
    exact: HashMap<Box<str>, (usize, usize)>,
    /// Wildcards by the suffix after `*.`: (route number, pool index).
    wildcard: HashMap<Box<str>, (usize, usize)>,
    /// The default route's pool index.
    default: Option<usize>,
    /// The routes as written, for status output: (names, pool).
    pub(crate) described: Vec<(Vec<String>, Arc<str>)>,
}

impl RouteTable {
    fn build(routes: &Routes, pools: &[Arc<Pool>]) -> RouteTable {
        let index_of = |name: &str| pools.iter().position(|p| &**p.name() == name);
        let mut table = RouteTable::default();
        for (number, route) in routes.routes.iter().enumerate() {
            let Some(pool) = index_of(&route.pool) else {
                continue;
            };
            if route.sni.is_empty() {
                table.default = Some(pool);
            }
            for pattern in &route.sni {
                // Validation refused a name two routes match: the first keeps it anyway.
                let (map, name) = match pattern {
                    SniPattern::Exact(name) => (&mut table.exact, name),
                    SniPattern::Wildcard(suffix) => (&mut table.wildcard, suffix),
                };
                map.entry(name.clone()).or_insert((number, pool));
            }
            table.described.push((
                route.sni.iter().map(ToString::to_string).collect(),
                Arc::clone(&pools[pool].name),
            ));
        }
        table
    }

    /// The pool index for a client that asked for `name` (lower case), or sent none: the first
    /// route matching it, else the default route; `None` when neither is there.
    pub(crate) fn route(&self, name: Option<&str>) -> Option<usize> {
        let Some(name) = name else {
            return self.default;
        };
        let exact = self.exact.get(name);
        // `*.example.com` matches `a.example.com`, one label more, not `example.com`.
        let wildcard = name
            .split_once('.')
            .and_then(|(_, suffix)| self.wildcard.get(suffix));
        let best = match (exact, wildcard) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        };
        best.map(|&(_, pool)| pool).or(self.default)
    }
}

/// What a listener checks of its clients before any backend work, and what it tells the
/// backends about them.
#[derive(Debug, Default)]
pub(crate) struct ClientControls {
    /// Each connection starts with a PROXY header of this kind.
    pub accept_proxy: Option<ProxyAccept>,
    /// Peers whose PROXY header is believed.
    pub trusted: Networks,
    /// The header written before a connection's bytes to its backend, unless the backend has
    /// its own `send_proxy`.
    pub send_proxy: Option<ProxyVersion>,
    /// `allow` and `deny`.
    pub access: Access,
    /// Per-client limits, enforced in the listener's `ClientTable`.
    pub limits: ClientLimits,
}

impl ClientControls {
    fn of(config: &ClientsConfig) -> ClientControls {
        ClientControls {
            accept_proxy: config.accept_proxy,
            trusted: config.proxy_trusted.clone(),
            send_proxy: config.send_proxy,
            access: config.access.clone(),
            limits: config.limits,
        }
    }

    /// Whether `peer` may send a PROXY header.
    pub(crate) fn trusts(&self, peer: IpAddr) -> bool {
        self.trusted.contains(peer)
    }

    /// Whether a client from `ip` is let in by the allow and deny lists.
    pub(crate) fn admits(&self, ip: IpAddr) -> bool {
        self.access.admits(ip)
    }
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
}

impl Listener {
    fn build(
        listener: &ListenerConfig,
        pools: Vec<Arc<Pool>>,
        registry: &Registry,
        local_addr: Option<SocketAddr>,
        access_log: bool,
        turn_base: Option<u64>,
    ) -> Listener {
        let stats = registry.listener(&listener.name);
        let routes = match &listener.forward {
            Forward::Pool(_) => None,
            Forward::Routes(routes) => Some(Box::new(RouteTable::build(routes, &pools))),
        };
        // Each listener logs and counts its own episodes: its metrics say what its clients met.
        // A listener that routes has as many episodes as pools; each pool's backends say them.
        if let (None, Some(pool)) = (&routes, pools.first())
            && stats.set_all_unhealthy(pool.all_unhealthy.is_some())
        {
            match pool.all_unhealthy {
                Some(policy) => warn!(
                    listener = %listener.name,
                    pool = %pool.name,
                    all_unhealthy = policy.as_str(),
                    "no backend is healthy; {}",
                    match policy {
                        AllUnhealthy::RouteAnyway => "routing to every backend anyway",
                        AllUnhealthy::Reject => "closing new client connections",
                    }
                ),
                None => {
                    info!(listener = %listener.name, pool = %pool.name, "a backend is healthy again; routing by health resumes")
                }
            }
        }
        let by_name = match &listener.forward {
            Forward::Pool(_) => false,
            Forward::Routes(routes) => routes.by_name(),
        };
        let keyed_by_name = pools.iter().any(|p| p.hash_key() == Some(HashKey::Sni));
        Listener {
            name: listener.name.as_str().into(),
            turn_base: turn_base.unwrap_or_else(|| stats.accepted()),
            local_addr,
            clients: ClientControls::of(&listener.clients),
            settings: ListenerSettings {
                connect_timeout: listener.connect_timeout,
                idle_timeout: listener.idle_timeout,
                connect_attempts: listener.connect_attempts,
                max_connections: listener.max_connections,
                splice: listener.splice,
                backend_congestion_control: listener.backend_congestion_control,
                access_log,
            },
            stats,
            pools: pools.into_boxed_slice(),
            routes,
            hello_timeout: (by_name || keyed_by_name).then_some(listener.client_hello_timeout),
        }
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

    /// Its client controls: PROXY protocol, allow and deny lists.
    pub(crate) fn clients(&self) -> &ClientControls {
        &self.clients
    }

    /// The listener's live counters.
    pub(crate) fn stats(&self) -> &Arc<ListenerStats> {
        &self.stats
    }

    /// The pools its connections go to (one, without routes); [`RouteTable::route`] indexes it.
    pub(crate) fn pools(&self) -> &[Arc<Pool>] {
        &self.pools
    }

    /// The one pool of a listener without routes.
    pub(crate) fn single_pool(&self) -> Option<&Arc<Pool>> {
        match self.routes {
            None => self.pools.first(),
            Some(_) => None,
        }
    }

    /// Its routes, if it routes by server name.
    pub(crate) fn routes(&self) -> Option<&RouteTable> {
        self.routes.as_deref()
    }

    /// How long to wait for a connection's ClientHello, if the listener reads it.
    pub(crate) fn hello_timeout(&self) -> Option<Duration> {
        self.hello_timeout
    }

    /// The turn of an admitted connection: its place in the sequence the pool's round robin
    /// follows (also what spreads connections over the workers).
    ///
    /// A listener's own pool without slots numbers by the listener's `accepted` counter, which
    /// admitting a connection increments anyway: however many threads accept, its connections
    /// form one sequence at no extra cost. A pool that several listeners share, or whose
    /// clients may wait (and are then picked for in another order), numbers its picks itself;
    /// so do the pools of a listener that routes, whose pool is known only once the client's
    /// ClientHello is read (see [`Pool::next_turn`]).
    pub(crate) fn turn(&self, open: &OpenConn) -> u64 {
        match (&self.routes, self.pools.first()) {
            (None, Some(pool)) if pool.own_turns => pool.next_turn(),
            _ => open.number().wrapping_sub(self.turn_base),
        }
    }
}

/// One pool: its backends, strategy, queue settings and live state.
#[derive(Debug)]
pub(crate) struct Pool {
    name: Arc<str>,
    /// A listener's own pool, written inline (status output and metrics name it after it).
    inline: bool,
    /// The listeners that send their connections here, in configuration order.
    listeners: Vec<Arc<str>>,
    backends: Box<[Backend]>,
    strategy: Box<dyn Strategy>,
    /// What status output calls the strategy.
    strategy_name: Arc<str>,
    /// The queue and its counters, shared with every other snapshot.
    state: Arc<PoolState>,
    /// Some backend has `max_connections`: picks take slots, and clients may wait.
    slotted: bool,
    /// Picks are numbered by the pool (see [`Listener::turn`]).
    own_turns: bool,
    /// What `consistent_hash` keys connections by, and its bound; `None` for other strategies.
    affinity: Option<Affinity>,
    /// The pool's turn count when this snapshot's numbering began.
    turn_base: u64,
    /// What the pool does now because no backend is healthy; `None` while one is.
    all_unhealthy: Option<AllUnhealthy>,
    settings: PoolSettings,
    /// Wakes the control task when passive ejection needs it.
    republisher: Republisher,
}

/// What a pool says about waiting and failing connections.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PoolSettings {
    /// How long a client may wait for a free slot; zero closes it at once.
    pub queue_timeout: Duration,
    /// Clients waiting at most.
    pub max_queued: usize,
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
    /// Slots: its load estimate never goes beyond this through new connections.
    pub max_connections: Option<NonZeroU32>,
    /// The name it was resolved from (`host:port`, or `srv:` and the SRV name), if any.
    pub name: Option<Arc<str>>,
    /// Its own `send_proxy`, in place of the listener's.
    pub send_proxy: Option<SendProxy>,
    /// Its live counters, shared with every other snapshot.
    pub stats: Arc<BackendState>,
}

impl Backend {
    /// Takes a slot on this backend for one connection, if it has one free and is not about
    /// to be ejected.
    #[inline]
    fn take(&self, eject_at: Option<NonZeroU32>) -> Option<ActiveConn> {
        if self.ejecting(eject_at) {
            return None;
        }
        match self.max_connections {
            None => Some(BackendState::acquire(&self.stats)),
            Some(max) => BackendState::try_acquire(&self.stats, u64::from(max.get())),
        }
    }

    /// Whether its failures in a row reached the passive ejection threshold `eject_at`: the
    /// control task ejects it at its next turn. Until then its free slots are not offered, or
    /// a client served from the queue would be sent to a backend that has just refused.
    #[inline]
    fn ejecting(&self, eject_at: Option<NonZeroU32>) -> bool {
        eject_at
            .is_some_and(|max| self.stats.consecutive_connect_failures() >= u64::from(max.get()))
    }
}

/// What [`Pool::take_slot`] found.
#[derive(Debug)]
pub(crate) enum Take {
    /// Backend `index`, its slot held by the guard.
    Slot(usize, ActiveConn),
    /// Every backend that may take connections has every slot taken: the client waits.
    Full,
    /// No backend may take connections (every one drained, unhealthy or tried).
    NoBackend,
}

impl Pool {
    fn build(
        pool: &PoolConfig,
        listeners: Vec<Arc<str>>,
        routed: bool,
        registry: &Registry,
        turn_base: Option<u64>,
        custom: &CustomStrategies,
    ) -> Pool {
        let now = Instant::now();
        let state = registry.pool(&pool.name);
        let states: Vec<Arc<BackendState>> = pool
            .backends
            .iter()
            .map(|b| registry.backend(&pool.name, b.addr))
            .collect();
        // Backends the operator lets take traffic, and whether any of them is also healthy.
        let admitted: Vec<bool> = (pool.backends.iter().zip(&states))
            .map(|(b, s)| s.admin_weight(b.weight.get()) > 0.0)
            .collect();
        let none_healthy = admitted.contains(&true)
            && !(admitted.iter().zip(&states)).any(|(&a, s)| a && s.in_rotation_at(now));
        let all_unhealthy = none_healthy.then(|| {
            pool.health
                .as_ref()
                .map_or(AllUnhealthy::default(), |h| h.all_unhealthy)
        });
        let names: Vec<Arc<str>> = pool
            .names
            .iter()
            .map(|n| n.target.to_string().into())
            .collect();
        let backends: Box<[Backend]> = (pool.backends.iter().zip(states))
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
                    max_connections: b.max_connections,
                    name: b.from_name.and_then(|i| names.get(i)).cloned(),
                    send_proxy: b.send_proxy,
                    stats,
                }
            })
            .collect();
        let candidates: Vec<Candidate> = backends
            .iter()
            .map(|b| Candidate::new(b.addr, b.effective_weight, LiveBackend::of(&b.stats)))
            .collect();
        let bounded = pool.affinity.map(|a| Bounded(a.balance_factor));
        let builder: &dyn BuildStrategy = match (custom.get(&pool.name), &bounded) {
            (Some(custom), _) => &**custom,
            (None, Some(bounded)) => bounded,
            (None, None) => &pool.strategy,
        };
        let slotted = pool.has_slots();
        Pool {
            name: pool.name.as_str().into(),
            inline: pool.inline,
            own_turns: slotted || routed || listeners.len() > 1,
            affinity: pool.affinity,
            listeners,
            turn_base: turn_base.unwrap_or_else(|| state.turns()),
            strategy: builder.build(&candidates),
            strategy_name: builder.name().into(),
            backends,
            state,
            slotted,
            all_unhealthy,
            settings: PoolSettings {
                queue_timeout: pool.queue_timeout,
                max_queued: pool.max_queued,
                max_connect_failures: pool.passive.map(|p| p.max_connect_failures),
            },
            republisher: registry.republisher().clone(),
        }
    }

    /// The pool's name.
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Whether it is a listener's own pool, written inline.
    pub(crate) fn inline(&self) -> bool {
        self.inline
    }

    /// The listeners that use it.
    pub(crate) fn listeners(&self) -> &[Arc<str>] {
        &self.listeners
    }

    /// The name of the strategy in use.
    pub(crate) fn strategy_name(&self) -> &str {
        &self.strategy_name
    }

    /// What the pool does because no backend is healthy, or `None` while one is.
    pub(crate) fn all_unhealthy(&self) -> Option<AllUnhealthy> {
        self.all_unhealthy
    }

    /// Its queue and queue counters.
    pub(crate) fn state(&self) -> &Arc<PoolState> {
        &self.state
    }

    /// Whether some backend has slots (only then can a client wait).
    pub(crate) fn slotted(&self) -> bool {
        self.slotted
    }

    /// Its queue and passive-check settings.
    pub(crate) fn settings(&self) -> &PoolSettings {
        &self.settings
    }

    /// Asks the control task to rebuild the snapshot (lock-free; see [`Republisher`]).
    pub(crate) fn republish(&self) {
        self.republisher.republish();
    }

    /// The backends, in configuration order.
    pub(crate) fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// What `consistent_hash` keys this pool's connections by, if it hashes.
    pub(crate) fn hash_key(&self) -> Option<HashKey> {
        self.affinity.map(|a| a.key)
    }

    /// Its `consistent_hash` settings, if it hashes.
    pub(crate) fn affinity(&self) -> Option<Affinity> {
        self.affinity
    }

    /// The next turn of the pool's own sequence.
    pub(crate) fn next_turn(&self) -> u64 {
        self.state.next_turn().wrapping_sub(self.turn_base)
    }

    /// Picks a backend for the connection numbered `turn` (see [`Strategy::pick`]), skipping
    /// the indices in `tried`, without taking a slot.
    #[cfg(test)]
    pub(crate) fn pick(&self, turn: u64, tried: &[usize]) -> Option<(usize, &Backend)> {
        let index = self.strategy.pick(turn, tried)?;
        Some((index, &self.backends[index]))
    }

    /// Picks a backend for the connection numbered `turn`, skipping `tried`, and takes one of
    /// its slots.
    ///
    /// Without slots this is the strategy's pick. With slots the strategy still chooses, among
    /// the backends with a free slot: a pick that finds its backend full passes it over and
    /// asks again. Past [`FULL_PICKS`] such misses most of the pool is full, and one scan takes
    /// the least loaded backend (by load estimate per unit of weight) that has a slot, so a
    /// pool of a thousand full backends costs one pass, not a thousand picks.
    pub(crate) fn take_slot(&self, turn: u64, key: Option<u64>, tried: &[usize]) -> Take {
        if !self.slotted {
            return match self.pick_index(turn, key, tried) {
                Some(index) => {
                    Take::Slot(index, BackendState::acquire(&self.backends[index].stats))
                }
                None => Take::NoBackend,
            };
        }
        let picks = if self.backends.len() <= SCAN_AFTER_ONE_MISS {
            1
        } else {
            FULL_PICKS
        };
        let eject_at = self.settings.max_connect_failures;
        let mut passed: Vec<usize> = Vec::new();
        for _ in 0..picks {
            let index = if passed.is_empty() {
                self.pick_index(turn, key, tried)
            } else {
                self.pick_index(turn, key, &passed)
            };
            let Some(index) = index else {
                return if passed.len() > tried.len() {
                    Take::Full
                } else {
                    Take::NoBackend
                };
            };
            if let Some(active) = self.backends[index].take(eject_at) {
                return Take::Slot(index, active);
            }
            if passed.is_empty() {
                passed.extend_from_slice(tried);
            }
            passed.push(index);
        }
        self.least_loaded_with_room(tried)
    }

    /// The strategy's pick: by `key` for a connection of a pool that keeps affinity.
    #[inline]
    fn pick_index(&self, turn: u64, key: Option<u64>, tried: &[usize]) -> Option<usize> {
        match key {
            Some(key) => self.strategy.pick_keyed(key, turn, tried),
            None => self.strategy.pick(turn, tried),
        }
    }

    /// The least loaded backend (load estimate + 1 per unit of effective weight) with a free
    /// slot, not in `tried`, its slot taken.
    fn least_loaded_with_room(&self, tried: &[usize]) -> Take {
        let eject_at = self.settings.max_connect_failures;
        loop {
            // (index, load + 1, weight) of the least loaded so far, compared without dividing.
            let mut best: Option<(usize, f64, f64)> = None;
            let mut any = false;
            for (index, backend) in self.backends.iter().enumerate() {
                if backend.effective_weight <= 0.0 || tried.contains(&index) {
                    continue;
                }
                any = true;
                if backend.ejecting(eject_at) {
                    continue;
                }
                let estimate = backend.stats.load_estimate();
                if backend
                    .max_connections
                    .is_some_and(|max| estimate >= u64::from(max.get()))
                {
                    continue;
                }
                let (load, weight) = (estimate as f64 + 1.0, backend.effective_weight);
                if best.is_none_or(|(_, l, w)| load * w < l * weight) {
                    best = Some((index, load, weight));
                }
            }
            let Some((index, _, _)) = best else {
                return if any { Take::Full } else { Take::NoBackend };
            };
            // Another thread may have taken the slot since: scan again.
            if let Some(active) = self.backends[index].take(eject_at) {
                return Take::Slot(index, active);
            }
        }
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

    fn build(text: &str, registry: &Registry) -> Snapshot {
        let config = crate::config::parse(text, Path::new("t.toml")).expect("valid");
        Snapshot::build(&config, registry, &HashMap::new(), None, &HashMap::new())
    }

    #[test]
    fn rebuilt_snapshots_share_live_state() {
        let registry = Registry::default();
        let first = build(TWO_LISTENERS, &registry);
        let second = build(TWO_LISTENERS, &registry);
        let a1 = &first.pool("a").expect("a").backends()[0];
        let a2 = &second.pool("a").expect("a").backends()[0];
        let b1 = &first.pool("b").expect("b").backends()[0];
        assert!(Arc::ptr_eq(&a1.stats, &a2.stats));
        // Same address in another pool is another backend.
        assert!(!Arc::ptr_eq(&a1.stats, &b1.stats));
        assert_eq!(a1.effective_weight, 2.0);
        let listener = first.listener("a").expect("a");
        assert!(Arc::ptr_eq(
            &listener.pools()[0],
            first.pool("a").expect("a")
        ));
        assert!(listener.pools()[0].inline());
    }

    #[test]
    fn a_rebuild_for_live_state_carries_the_round_robin_on_and_a_new_config_restarts_it() {
        let text = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\n\
                    [[listener.backend]]\naddr = \"127.0.0.1:9001\"\n\
                    [[listener.backend]]\naddr = \"127.0.0.1:9002\"\n";
        let config = crate::config::parse(text, Path::new("t.toml")).expect("valid");
        let registry = Registry::default();
        // Admits one connection to the snapshot's listener and picks for it.
        let pick = |s: &Snapshot| {
            let listener = s.listener("a").expect("a");
            let open = ListenerStats::admit(listener.stats(), 10).expect("admitted");
            listener.pools()[0]
                .pick(listener.turn(&open), &[])
                .expect("a pick")
                .0
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
        let snapshot = build(TWO_LISTENERS, &Registry::default());
        let pool = snapshot.pool("b").expect("b");
        let (index, backend) = pool.pick(0, &[]).expect("one backend");
        assert_eq!((index, backend.addr.port()), (0, 9001));
        assert!(pool.pick(1, &[0]).is_none());
        assert!(snapshot.pool("missing").is_none());
    }

    const SHARED: &str = r#"
        [[pool]]
        name = "gpu"
        strategy = "capacity_proportional"
        [[pool.backend]]
        addr = "127.0.0.1:9001"
        weight = 2
        max_connections = 2
        [[pool.backend]]
        addr = "127.0.0.1:9002"
        max_connections = 1
        [[listener]]
        name = "a"
        bind = "127.0.0.1:0"
        pool = "gpu"
        [[listener]]
        name = "b"
        bind = "127.0.0.1:0"
        pool = "gpu"
    "#;

    #[test]
    fn listeners_sharing_a_pool_share_its_backends_and_slots() {
        let registry = Registry::default();
        let snapshot = build(SHARED, &registry);
        let (a, b) = (
            snapshot.listener("a").expect("a"),
            snapshot.listener("b").expect("b"),
        );
        assert!(Arc::ptr_eq(&a.pools()[0], &b.pools()[0]));
        assert_eq!(a.pools()[0].listeners().len(), 2);
        let pool = &a.pools()[0];
        let mut held = Vec::new();
        for turn in 0..3 {
            match pool.take_slot(turn, None, &[]) {
                Take::Slot(index, active) => held.push((index, active)),
                other => panic!("turn {turn}: {other:?}"),
            }
        }
        let mut picked: Vec<usize> = held.iter().map(|(i, _)| *i).collect();
        picked.sort_unstable();
        assert_eq!(picked, [0, 0, 1], "each backend up to its slots");
        assert!(matches!(pool.take_slot(3, None, &[]), Take::Full));
        // Tried backends are not full: with every one tried there is no backend at all.
        assert!(matches!(pool.take_slot(3, None, &[0, 1]), Take::NoBackend));
        held.retain(|(i, _)| *i != 1);
        match pool.take_slot(4, None, &[]) {
            Take::Slot(1, _) => {}
            other => panic!("the freed slot: {other:?}"),
        }
    }

    #[test]
    fn a_pool_of_many_full_backends_finds_the_one_free_slot() {
        let mut text = String::from("[[pool]]\nname = \"p\"\nstrategy = \"weighted_random\"\n");
        for port in 1..=300 {
            text.push_str(&format!(
                "[[pool.backend]]\naddr = \"127.0.0.1:{port}\"\nmax_connections = 1\n"
            ));
        }
        text.push_str("[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n");
        let snapshot = build(&text, &Registry::default());
        let pool = snapshot.pool("p").expect("p");
        let mut held: Vec<(usize, ActiveConn)> = (0..300)
            .map(|turn| match pool.take_slot(turn, None, &[]) {
                Take::Slot(index, active) => (index, active),
                other => panic!("turn {turn}: {other:?}"),
            })
            .collect();
        assert!(matches!(pool.take_slot(0, None, &[]), Take::Full));
        let freed = 137;
        held.retain(|(index, _)| *index != freed);
        assert_eq!(held.len(), 299, "one slot each");
        assert!(matches!(pool.take_slot(0, None, &[]), Take::Slot(i, _) if i == freed));
    }

    #[test]
    fn reported_load_takes_slots() {
        let registry = Registry::default();
        let snapshot = build(SHARED, &registry);
        let pool = snapshot.pool("gpu").expect("gpu");
        // Backend 0 reports 2 requests in flight that are not ours: both its slots are taken.
        pool.backends()[0].stats.set_reported_in_flight(2, 0);
        match pool.take_slot(0, None, &[]) {
            Take::Slot(1, _active) => {}
            other => panic!("{other:?}"),
        }
    }
}

/// A pool's pick with slots, for `benches/slots.rs` through `weighbridge::bench`.
#[cfg(feature = "bench-internals")]
pub(crate) mod bench {
    use std::collections::HashMap;
    use std::sync::Arc;

    use super::{Pool, Snapshot, Take};
    use crate::config::Config;
    use crate::state::{ActiveConn, Registry};

    /// One pool of a configuration, built as a running balancer builds it.
    #[derive(Debug)]
    pub struct SlotPool {
        pool: Arc<Pool>,
        // Keeps the live state the pool's backends point at.
        _registry: Registry,
    }

    /// A slot taken; given back when dropped.
    #[derive(Debug)]
    pub struct Slot {
        /// The backend's index in the pool.
        pub index: usize,
        _active: ActiveConn,
    }

    impl SlotPool {
        /// Pool `name` of `config`, or `None` if there is none.
        pub fn new(config: &Config, name: &str) -> Option<SlotPool> {
            let registry = Registry::default();
            let snapshot =
                Snapshot::build(config, &registry, &HashMap::new(), None, &HashMap::new());
            let pool = Arc::clone(snapshot.pool(name)?);
            Some(SlotPool {
                pool,
                _registry: registry,
            })
        }

        /// Takes a slot for the connection numbered `turn`, as a new connection does; `None`
        /// when every slot is taken (or no backend may take connections).
        pub fn take_slot(&self, turn: u64) -> Option<Slot> {
            match self.pool.take_slot(turn, None, &[]) {
                Take::Slot(index, active) => Some(Slot {
                    index,
                    _active: active,
                }),
                Take::Full | Take::NoBackend => None,
            }
        }
    }
}
