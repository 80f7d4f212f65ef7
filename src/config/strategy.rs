//! The `strategy` key: which of the built-in strategies a listener uses. How each one picks is
//! the `strategy` module's business; here is only the name the file gives it.

use std::fmt;

use serde::Deserialize;

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
    /// Sends a client (by address or server name, the pool's `hash_key`) back to the same
    /// backend, within a bound on each backend's load (`hash_balance_factor`).
    ConsistentHash,
}

impl StrategyKind {
    /// Every strategy, in the order the docs list them.
    pub const ALL: [StrategyKind; 4] = [
        StrategyKind::WeightedRoundRobin,
        StrategyKind::WeightedRandom,
        StrategyKind::CapacityProportional,
        StrategyKind::ConsistentHash,
    ];

    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            StrategyKind::WeightedRoundRobin => "weighted_round_robin",
            StrategyKind::WeightedRandom => "weighted_random",
            StrategyKind::CapacityProportional => "capacity_proportional",
            StrategyKind::ConsistentHash => "consistent_hash",
        }
    }
}

impl fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
