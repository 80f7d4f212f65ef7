//! How a listener picks a backend for each new connection.
//!
//! One trait, [`Strategy`], and one file per algorithm. A strategy is *built* from a pool's
//! effective weights whenever a snapshot is built, and *picks* many times from `&self`: picking
//! only reads immutable tables and atomics and writes nothing shared, so any number of
//! connection tasks may pick at once on any number of cores without a lock and without fighting
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
mod weighted_random;
mod weighted_round_robin;

use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

use rand::SeedableRng;
use rand::rngs::SmallRng;

use serde::Deserialize;

use crate::backend::BackendState;

pub use capacity_proportional::CapacityProportional;
pub use weighted_random::WeightedRandom;
pub use weighted_round_robin::WeightedRoundRobin;

/// Picks backends for new connections.
pub trait Strategy: Send + Sync + fmt::Debug {
    /// Returns the index of the backend a connection should go to.
    ///
    /// `turn` is the connection's number in its listener's sequence (0, 1, 2, …); round robin
    /// maps it onto its cycle, capacity-proportional starts its scan there, weighted random
    /// ignores it. Never returns an
    /// index in `tried` nor one whose weight is 0; returns `None` when no backend is left.
    /// `tried` is empty for a connection's first attempt and holds the backends already tried
    /// (at most `connect_attempts - 1`) on retries, which keep the connection's turn.
    fn pick(&self, turn: u64, tried: &[usize]) -> Option<usize>;
}

/// The strategies a listener can use; the `strategy` key of `[[listener]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StrategyKind {
    /// Smooth weighted round robin, as nginx does it. The default.
    #[default]
    WeightedRoundRobin,
    /// Independent random picks with probability proportional to weight.
    WeightedRandom,
    /// Keeps open connections proportional to weight (capacity).
    CapacityProportional,
}

impl StrategyKind {
    /// Every strategy, in the order the docs list them.
    pub const ALL: [StrategyKind; 3] = [
        StrategyKind::WeightedRoundRobin,
        StrategyKind::WeightedRandom,
        StrategyKind::CapacityProportional,
    ];

    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            StrategyKind::WeightedRoundRobin => "weighted_round_robin",
            StrategyKind::WeightedRandom => "weighted_random",
            StrategyKind::CapacityProportional => "capacity_proportional",
        }
    }

    /// Builds this strategy over a pool.
    ///
    /// `weights[i]` is backend i's effective weight (finite, ≥ 0); `live[i]` its live counters,
    /// read by load-aware strategies. Both slices have one entry per backend.
    pub fn build(self, weights: &[f64], live: &[Arc<BackendState>]) -> Box<dyn Strategy> {
        debug_assert_eq!(weights.len(), live.len());
        // Each weight is finite, but their sum need not be (two weights of 1e308): the samplers'
        // cumulative sums would then fail and the pool would route nothing. Only the ratios
        // matter, so such weights are scaled down to a largest weight of 1.
        let scaled: Vec<f64>;
        let weights = if weights.iter().sum::<f64>().is_finite() {
            weights
        } else {
            let max = weights.iter().copied().fold(0.0, f64::max);
            scaled = weights.iter().map(|w| w / max).collect();
            &scaled
        };
        match self {
            StrategyKind::WeightedRoundRobin => Box::new(WeightedRoundRobin::new(weights)),
            StrategyKind::WeightedRandom => Box::new(WeightedRandom::new(weights)),
            StrategyKind::CapacityProportional => {
                Box::new(CapacityProportional::new(weights, live))
            }
        }
    }
}

impl fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

thread_local! {
    /// The random strategies' generator, one per thread: picks need an even spread, not
    /// secrecy, and rand's thread generator (ChaCha, for secrets) cost about 8 ns of an 11 ns
    /// weighted-random pick. Seeded from that generator, so threads and processes differ.
    static PICK_RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
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
            let live: Vec<Arc<BackendState>> = (0..n).map(|_| Arc::default()).collect();
            for kind in StrategyKind::ALL {
                let strategy = kind.build(&weights, &live);
                let mut picked = vec![0_usize; n];
                // Connections stay open, as capacity-proportional balances open connections.
                let mut open = Vec::new();
                for turn in 0..(40 * n as u64) {
                    let i = strategy.pick(turn, &[]).expect("a backend to route to");
                    picked[i] += 1;
                    open.push(BackendState::acquire(&live[i]));
                }
                assert_eq!(picked[1], 0, "{kind} at {n}: weight 0 was picked");
                assert!(picked[0] > 0 && picked[2] > 0, "{kind} at {n}: {picked:?}");
            }
        }
    }
}
