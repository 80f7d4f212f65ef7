//! How a listener picks a backend for each new connection.
//!
//! One trait, [`Strategy`], and one file per algorithm. A strategy is *built* from a pool's
//! effective weights whenever a snapshot is built, and *picks* many times from `&self`: picking
//! only reads immutable tables and atomics and writes nothing shared, so any number of
//! worker threads may pick at once on any number of cores without a lock and without fighting
//! over a cache line (Pingora's "build once, pick many").
//!
//! Where a strategy needs to know where it is in a sequence (round robin), the caller tells it:
//! each pick is given the connection's *turn*, its number among the listener's connections (see
//! `Pool::turn`), which the listener's accepted counter hands out as it counts the connection.
//! A listener's turns form one sequence — the exact smooth round robin — and the strategy itself
//! keeps no counter to fight over.
//!
//! This module knows nothing of sockets, tokio or files: it maps weights (and, for
//! [`CapacityProportional`], live connection counts) to an index, so it is unit-tested and
//! benchmarked without I/O.
//!
//! Every strategy obeys the same two rules: a backend whose weight is 0 is never picked, and a
//! backend listed in `tried` (the ones a connection already failed to reach) is never picked.

mod capacity_proportional;
mod consistent_hash;
mod weighted_random;
mod weighted_round_robin;

use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

use rand::SeedableRng;
use rand::rngs::SmallRng;

use std::net::SocketAddr;

use crate::config::DEFAULT_BALANCE_FACTOR;
pub use crate::config::StrategyKind;
use crate::state::{ActiveConn, BackendCounters, BackendState};

use capacity_proportional::CapacityProportional;
pub(crate) use consistent_hash::{ConsistentHash, client_key, name_key};
use weighted_random::WeightedRandom;
use weighted_round_robin::WeightedRoundRobin;

/// Picks backends for new connections: the one extension point of the balancer.
///
/// A strategy is built by a [`BuildStrategy`] each time the pool's snapshot is rebuilt, and
/// then picks from `&self` on every worker thread at once: keep picking to reads of immutable
/// tables and atomics. `examples/custom_strategy.rs` shows one defined outside the crate.
pub trait Strategy: Send + Sync + fmt::Debug {
    /// Returns the index of the backend a connection should go to.
    ///
    /// `turn` is the connection's number in its listener's sequence (0, 1, 2, …); round robin
    /// maps it onto its cycle, capacity-proportional starts its scan there, weighted random
    /// ignores it. Never returns an index in `tried` nor one whose weight is 0; returns `None`
    /// when no backend is left. `tried` is empty for a connection's first attempt and holds
    /// the backends already tried (at most `connect_attempts - 1`) on retries, which keep the
    /// connection's turn.
    fn pick(&self, turn: u64, tried: &[usize]) -> Option<usize>;

    /// [`pick`](Strategy::pick) for a connection of a pool that keeps affinity (`hash_key`):
    /// `key` is the hash of its client's address or server name, the same for every
    /// connection of that client. A strategy that keeps no affinity ignores it, as this default
    /// does.
    fn pick_keyed(&self, key: u64, turn: u64, tried: &[usize]) -> Option<usize> {
        let _ = key;
        self.pick(turn, tried)
    }
}

/// Builds a [`Strategy`] over a pool's backends. Called whenever the pool's effective weights
/// change (a reload, a health verdict, a drain, a slow-start step), never per connection.
pub trait BuildStrategy: Send + Sync + fmt::Debug {
    /// The strategy over `backends`, in pool order: the index [`Strategy::pick`] returns is an
    /// index into this slice.
    fn build(&self, backends: &[Candidate]) -> Box<dyn Strategy>;

    /// The name status output and logs show for the strategy.
    fn name(&self) -> &str;
}

/// One backend of a pool, as a strategy is built over it.
#[derive(Debug, Clone)]
pub struct Candidate {
    addr: SocketAddr,
    weight: f64,
    live: LiveBackend,
}

impl Candidate {
    /// A backend at `addr` with effective weight `weight` (finite and ≥ 0; anything else counts
    /// as 0) and live counters `live`.
    pub fn new(addr: SocketAddr, weight: f64, live: LiveBackend) -> Candidate {
        let weight = if weight.is_finite() && weight > 0.0 {
            weight
        } else {
            0.0
        };
        Candidate { addr, weight, live }
    }

    /// Where the backend is.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its effective weight: the configured one as drain, health, ejection, slow start and
    /// reported load leave it. A strategy never picks a backend of weight 0.
    pub fn weight(&self) -> f64 {
        self.weight
    }

    /// Its live counters, which go on changing after the strategy is built.
    pub fn live(&self) -> &LiveBackend {
        &self.live
    }
}

/// Read access to one backend's live counters, shared with the data path: a strategy may keep
/// it and read it on every pick (relaxed atomic loads, no lock).
#[derive(Debug, Clone, Default)]
pub struct LiveBackend(Arc<BackendState>);

impl LiveBackend {
    /// Counters of a backend that no balancer serves, for testing and benchmarking strategies.
    pub fn detached() -> LiveBackend {
        LiveBackend::default()
    }

    /// Counters of `count` backends of one pool that no balancer serves: as
    /// [`detached`](LiveBackend::detached), sharing the pool's count of open connections, which
    /// `consistent_hash` bounds each backend's share of (detached ones are summed instead).
    pub fn pool(count: usize) -> Vec<LiveBackend> {
        let pool = Arc::new(crate::state::PoolState::new("detached"));
        (0..count)
            .map(|_| LiveBackend(Arc::new(BackendState::in_pool(Arc::clone(&pool)))))
            .collect()
    }

    pub(crate) fn of(state: &Arc<BackendState>) -> LiveBackend {
        LiveBackend(Arc::clone(state))
    }

    pub(crate) fn state(&self) -> &Arc<BackendState> {
        &self.0
    }

    /// Connections open to the backend now, those still connecting included.
    pub fn active(&self) -> u64 {
        self.0.active()
    }

    /// All of its counters.
    pub fn counters(&self) -> BackendCounters {
        self.0.counters()
    }

    /// Counts one connection as open to this backend until the guard drops, as the data path
    /// does from pick to close; for testing and benchmarking strategies.
    pub fn open(&self) -> OpenGuard {
        OpenGuard(BackendState::acquire(&self.0))
    }
}

/// One connection counted by [`LiveBackend::open`].
#[derive(Debug)]
#[must_use = "the connection is only counted while the guard lives"]
pub struct OpenGuard(#[allow(dead_code)] ActiveConn);

impl BuildStrategy for StrategyKind {
    fn build(&self, backends: &[Candidate]) -> Box<dyn Strategy> {
        let weights = finite_weights(backends);
        match self {
            StrategyKind::WeightedRoundRobin => Box::new(WeightedRoundRobin::new(&weights)),
            StrategyKind::WeightedRandom => Box::new(WeightedRandom::new(&weights)),
            StrategyKind::CapacityProportional => {
                let live = backends.iter().map(|b| b.live().state());
                Box::new(CapacityProportional::new(&weights, live))
            }
            StrategyKind::ConsistentHash => {
                Box::new(Bounded(DEFAULT_BALANCE_FACTOR).ring(backends, &weights))
            }
        }
    }

    fn name(&self) -> &str {
        self.as_str()
    }
}

/// Builds consistent hashing with a balance factor (0: none), the `hash_balance_factor` of a
/// pool.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounded(pub(crate) f64);

impl Bounded {
    fn ring(self, backends: &[Candidate], weights: &[f64]) -> ConsistentHash {
        let addrs: Vec<SocketAddr> = backends.iter().map(Candidate::addr).collect();
        let live = backends.iter().map(|b| b.live().state());
        ConsistentHash::new(&addrs, weights, live, self.0)
    }
}

impl BuildStrategy for Bounded {
    fn build(&self, backends: &[Candidate]) -> Box<dyn Strategy> {
        let weights = finite_weights(backends);
        Box::new(self.ring(backends, &weights))
    }

    fn name(&self) -> &str {
        StrategyKind::ConsistentHash.as_str()
    }
}

thread_local! {
    /// The random strategies' generator, one per thread: picks need an even spread, not
    /// secrecy, and rand's thread generator (ChaCha, for secrets) would be most of a
    /// weighted-random pick's cost. Seeded from that generator, so threads and processes differ.
    static PICK_RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
}

/// The candidates' weights, scaled so that their sum is finite.
///
/// Each weight is finite, but their sum need not be (two weights of 1e308): the samplers'
/// cumulative sums would then fail and the pool would route nothing. Only the ratios matter, so
/// such weights are scaled down to a largest weight of 1.
fn finite_weights(backends: &[Candidate]) -> Vec<f64> {
    let weights: Vec<f64> = backends.iter().map(Candidate::weight).collect();
    if weights.iter().sum::<f64>().is_finite() {
        weights
    } else {
        let max = weights.iter().copied().fold(0.0, f64::max);
        weights.iter().map(|w| w / max).collect()
    }
}

/// Runs `f` with this thread's pick generator. Not reentrant: `f` never picks again.
fn with_pick_rng<T>(f: impl FnOnce(&mut SmallRng) -> T) -> T {
    PICK_RNG.with_borrow_mut(f)
}

/// True when `weight` may receive connections and `index` has not been tried yet.
#[inline]
fn eligible(weight: f64, index: usize, tried: &[usize]) -> bool {
    weight > 0.0 && !tried.contains(&index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_whose_sum_overflows_still_route_in_proportion() {
        // 3 and 100 backends: capacity-proportional samples instead of scanning above 64.
        for n in [3, 100] {
            let mut weights = vec![f64::MAX / 2.0; n];
            weights[0] = f64::MAX;
            weights[1] = 0.0;
            let addr: SocketAddr = "127.0.0.1:1".parse().expect("literal");
            let live: Vec<LiveBackend> = (0..n).map(|_| LiveBackend::detached()).collect();
            let backends: Vec<Candidate> = (weights.iter().zip(&live))
                .map(|(&w, l)| Candidate::new(addr, w, l.clone()))
                .collect();
            for kind in StrategyKind::ALL {
                let strategy = kind.build(&backends);
                let mut picked = vec![0_usize; n];
                // Connections stay open, as capacity-proportional balances open connections.
                let mut open = Vec::new();
                for turn in 0..(40 * n as u64) {
                    let i = strategy.pick(turn, &[]).expect("a backend to route to");
                    picked[i] += 1;
                    open.push(live[i].open());
                }
                assert_eq!(picked[1], 0, "{kind} at {n}: weight 0 was picked");
                assert!(picked[0] > 0 && picked[2] > 0, "{kind} at {n}: {picked:?}");
            }
        }
    }
}
