//! Smooth weighted round robin, nginx's algorithm, made lock-free.
//!
//! nginx (`ngx_stream_upstream_get_peer`, 2012) keeps a `current_weight` per peer. On every pick
//! each peer's current weight grows by its weight, the peer with the largest current weight wins
//! (the first one on ties) and loses the total. Over one cycle of Σw picks every peer is chosen
//! exactly w times, and the picks are interleaved as evenly as possible: weights 5, 1, 1 give
//! `a a b a c a a`, never `a a a a a b c`.
//!
//! Running that state machine per pick needs a lock (every pick writes every peer's state).
//! Weights only change when a snapshot is built, so the whole cycle is computed there instead,
//! and a pick is an array read at the connection's turn (see [`Strategy::pick`]): the sequence is
//! the one nginx would produce, and nothing shared is written, so pickers on two cores never
//! contend for a counter: a shared `fetch_add` per pick would make two threads picking at once
//! fight over one cache line (docs/benchmarks.md has the figures).
//!
//! Weights are real numbers; the cycle needs integers. They are scaled so that the heaviest
//! backend gets 10^6 units, rounded (a positive weight never rounds to 0) and divided by their
//! greatest common divisor, so weights like 1.5, 2, 1, 2.5 become 3, 4, 2, 5 and shares are exact.
//! When the cycle would exceed [`max_cycle`] picks it is scaled down proportionally; shares are
//! then exact to within one pick per cycle per backend.

use super::{Strategy, eligible};

/// Upper bound on the cycle length, whatever the backend count. 65,536 picks of `u32` is 256 KiB.
const MAX_CYCLE: u64 = 1 << 16;
/// Upper bound on the work (cycle length × backends) spent building one cycle, so that a
/// snapshot of 1,024 backends still builds in a few milliseconds.
const MAX_BUILD_STEPS: u64 = 1 << 22;
/// Resolution of weight scaling: the heaviest backend gets this many units before reduction.
const RESOLUTION: f64 = 1e6;

/// Longest cycle built for `backends` backends.
fn max_cycle(backends: usize) -> u64 {
    let backends = backends.max(1) as u64;
    (MAX_BUILD_STEPS / backends).clamp(backends, MAX_CYCLE.max(backends))
}

/// Smooth weighted round robin over a precomputed cycle.
#[derive(Debug)]
pub(super) struct WeightedRoundRobin {
    /// One full cycle of picks (backend indices); empty when every weight is 0.
    cycle: Box<[u32]>,
    /// Each backend's integer weight, for retries.
    units: Box<[u64]>,
}

impl WeightedRoundRobin {
    /// Builds the cycle for `weights` (finite, ≥ 0).
    pub(super) fn new(weights: &[f64]) -> WeightedRoundRobin {
        let units = integer_weights(weights);
        WeightedRoundRobin {
            cycle: smooth_cycle(&units).into_boxed_slice(),
            units: units.into_boxed_slice(),
        }
    }

    /// The number of picks after which the sequence repeats.
    #[cfg(test)]
    pub(super) fn cycle_len(&self) -> usize {
        self.cycle.len()
    }
}

impl Strategy for WeightedRoundRobin {
    fn pick(&self, turn: u64, tried: &[usize]) -> Option<usize> {
        let len = self.cycle.len();
        if len == 0 {
            return None;
        }
        // Below `len`, a usize: the cast cannot truncate.
        let start = (turn % len as u64) as usize;
        if tried.is_empty() {
            return Some(self.cycle[start] as usize);
        }
        self.retry(turn, tried)
    }
}

impl WeightedRoundRobin {
    /// A retry: the backends not yet tried, in proportion to their weights.
    ///
    /// Walking on along the cycle to the next untried backend would not do: the slot after a
    /// dead backend's is whoever the smooth order put there, so with weights 5, 1, 1 and the 5
    /// dead, its five slots went 4 to one of the 1s and 1 to the other. Instead the turn picks
    /// a point in the untried backends' total weight: multiplied by the golden ratio (a Weyl
    /// sequence), successive turns spread evenly over it, deterministically and without
    /// shared state. Retries are rare, so a pass over the weights is cheap enough.
    fn retry(&self, turn: u64, tried: &[usize]) -> Option<usize> {
        let untried = || {
            self.units
                .iter()
                .enumerate()
                .filter(|&(index, &unit)| eligible(unit as f64, index, tried))
        };
        let total: u64 = untried().map(|(_, &unit)| unit).sum();
        if total == 0 {
            return None;
        }
        // frac(turn × φ) scaled to [0, total).
        let point = turn.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut target = ((u128::from(point) * u128::from(total)) >> 64) as u64;
        for (index, &unit) in untried() {
            if target < unit {
                return Some(index);
            }
            target -= unit;
        }
        None
    }
}

/// Scales `weights` to integers with the same ratios (see the module docs).
fn integer_weights(weights: &[f64]) -> Vec<u64> {
    let max = weights.iter().copied().fold(0.0_f64, f64::max);
    if max <= 0.0 {
        return vec![0; weights.len()];
    }
    let mut units: Vec<u64> = weights
        .iter()
        .map(|&w| match w {
            w if w > 0.0 => ((w / max * RESOLUTION).round() as u64).max(1),
            _ => 0,
        })
        .collect();
    reduce(&mut units);
    let total: u64 = units.iter().sum();
    let limit = max_cycle(weights.len());
    if total > limit {
        let scale = limit as f64 / total as f64;
        for unit in units.iter_mut().filter(|u| **u > 0) {
            *unit = ((*unit as f64 * scale).round() as u64).max(1);
        }
        reduce(&mut units);
    }
    units
}

/// Divides every unit by their greatest common divisor.
fn reduce(units: &mut [u64]) {
    let divisor = units.iter().copied().fold(0, gcd);
    if divisor > 1 {
        units.iter_mut().for_each(|u| *u /= divisor);
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// One full cycle of nginx's smooth weighted round robin over integer weights.
fn smooth_cycle(units: &[u64]) -> Vec<u32> {
    let total: u64 = units.iter().sum();
    let total_signed = total as i64;
    let mut current = vec![0_i64; units.len()];
    let mut cycle = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, &unit) in units.iter().enumerate() {
            current[i] += unit as i64;
            // Strictly greater: the first backend wins ties, as in nginx.
            if unit > 0 && (units[best] == 0 || current[i] > current[best]) {
                best = i;
            }
        }
        current[best] -= total_signed;
        cycle.push(best as u32);
    }
    cycle
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picks(strategy: &WeightedRoundRobin, n: u64) -> Vec<usize> {
        (0..n)
            .map(|turn| strategy.pick(turn, &[]).expect("a pick"))
            .collect()
    }

    #[test]
    fn nginx_example_sequence() {
        // The worked example of nginx's smooth WRR: weights a=5, b=1, c=1.
        let wrr = WeightedRoundRobin::new(&[5.0, 1.0, 1.0]);
        assert_eq!(picks(&wrr, 14), [0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn fractional_weights_give_exact_shares() {
        let wrr = WeightedRoundRobin::new(&[1.5, 2.0, 1.0, 2.5]);
        assert_eq!(wrr.cycle_len(), 14);
        let seq = picks(&wrr, 14 * 100);
        for (i, expected) in [3, 4, 2, 5].into_iter().enumerate() {
            assert_eq!(seq.iter().filter(|&&p| p == i).count(), expected * 100);
        }
    }

    #[test]
    fn every_prefix_stays_within_one_pick_of_its_share() {
        let weights = [1.5, 2.0, 1.0, 2.5, 0.25, 7.0];
        let total: f64 = weights.iter().sum();
        let wrr = WeightedRoundRobin::new(&weights);
        let mut counts = [0_usize; 6];
        for n in 1..=5_000 {
            counts[wrr.pick(n - 1, &[]).expect("a pick")] += 1;
            for (i, &w) in weights.iter().enumerate() {
                let ideal = w / total * n as f64;
                assert!(
                    (counts[i] as f64 - ideal).abs() <= 1.0 + 1e-9,
                    "after {n} picks backend {i} has {} (ideal {ideal:.2})",
                    counts[i]
                );
            }
        }
    }

    #[test]
    fn equal_weights_alternate() {
        let wrr = WeightedRoundRobin::new(&[1.0, 1.0, 1.0]);
        assert_eq!(picks(&wrr, 6), [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn zero_weight_is_never_picked() {
        let wrr = WeightedRoundRobin::new(&[0.0, 3.0, 0.0, 1.0]);
        assert!(picks(&wrr, 400).iter().all(|&p| p == 1 || p == 3));
    }

    #[test]
    fn all_zero_or_empty_picks_nothing() {
        assert_eq!(WeightedRoundRobin::new(&[0.0, 0.0]).pick(0, &[]), None);
        assert_eq!(WeightedRoundRobin::new(&[]).pick(0, &[]), None);
    }

    #[test]
    fn one_backend_always_wins() {
        let wrr = WeightedRoundRobin::new(&[0.3]);
        assert_eq!(picks(&wrr, 5), [0; 5]);
    }

    #[test]
    fn retries_skip_tried_backends() {
        let wrr = WeightedRoundRobin::new(&[5.0, 1.0, 1.0]);
        for turn in 0..50 {
            let pick = wrr.pick(turn, &[0]).expect("b or c remain");
            assert!(pick == 1 || pick == 2);
        }
        assert_eq!(wrr.pick(0, &[0, 1, 2]), None);
    }

    /// A dead backend's connections are retried on the others in proportion to their weights,
    /// not handed to whoever follows it in the cycle.
    #[test]
    fn retries_follow_the_weights_of_the_backends_left() {
        for (weights, dead, expected) in [
            (vec![5.0, 1.0, 1.0], 0, vec![0.0, 0.5, 0.5]),
            (vec![5.0, 1.0, 1.0], 2, vec![5.0 / 6.0, 1.0 / 6.0, 0.0]),
            (vec![1.0, 3.0, 1.0, 2.0], 1, vec![0.25, 0.0, 0.25, 0.5]),
        ] {
            let wrr = WeightedRoundRobin::new(&weights);
            let mut retried = vec![0_usize; weights.len()];
            let mut total = 0;
            for turn in 0..7_000 {
                if wrr.pick(turn, &[]) == Some(dead) {
                    retried[wrr.pick(turn, &[dead]).expect("others remain")] += 1;
                    total += 1;
                }
            }
            for (i, &share) in expected.iter().enumerate() {
                let got = retried[i] as f64 / total as f64;
                assert!(
                    (got - share).abs() < 0.02,
                    "weights {weights:?}, {dead} dead: backend {i} got {got:.3} of the retries, \
                     not {share:.3} ({retried:?})"
                );
            }
        }
    }

    #[test]
    fn huge_cycles_are_bounded_and_keep_ratios() {
        let weights: Vec<f64> = (1..=1024).map(|i| i as f64 * 1.001).collect();
        let units = integer_weights(&weights);
        let total: u64 = units.iter().sum();
        // Rounding each backend may add half a unit.
        assert!(total <= max_cycle(1024) + 512, "cycle {total}");
        assert!(units.iter().all(|&u| u > 0));
        // Still ordered as the weights are.
        assert!(units.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn tiny_weights_next_to_huge_ones_still_get_picked() {
        let wrr = WeightedRoundRobin::new(&[1e9, 1e-9]);
        let seq = picks(&wrr, wrr.cycle_len() as u64);
        assert!(seq.contains(&1));
    }
}
