//! Weighted random: every pick is independent, backend i is chosen with probability w_i / Σw.
//!
//! No shared state is written on a pick (unlike round robin's counter), so pickers on different
//! threads never touch the same cache line. The sampling itself is rand's `WeightedIndex`, a
//! binary search over cumulative weights: O(log n), no allocation per pick.
//!
//! On a retry the backends in `tried` are excluded by rejection sampling, which keeps the
//! probabilities exactly proportional among the rest; if the tried ones carry nearly all the
//! weight, a direct search over the untried ones takes over after a few rejections.

use rand::Rng;
use rand::distr::Distribution;
use rand::distr::weighted::WeightedIndex;

use super::{Strategy, eligible};

/// Rejected draws before falling back to a direct search over untried backends.
const REJECTION_TRIES: usize = 8;

/// Independent weighted random picks.
#[derive(Debug)]
pub struct WeightedRandom {
    /// `None` when every weight is 0 (or there is no backend).
    index: Option<WeightedIndex<f64>>,
    weights: Box<[f64]>,
}

impl WeightedRandom {
    /// Builds the sampler for `weights` (finite, ≥ 0).
    pub fn new(weights: &[f64]) -> WeightedRandom {
        WeightedRandom {
            index: WeightedIndex::new(weights.iter().copied()).ok(),
            weights: weights.into(),
        }
    }

    /// Picks with a caller-supplied random source (seeded in tests).
    pub fn pick_with<R: Rng + ?Sized>(&self, rng: &mut R, tried: &[usize]) -> Option<usize> {
        let index = self.index.as_ref()?;
        for _ in 0..REJECTION_TRIES {
            let pick = index.sample(rng);
            if !tried.contains(&pick) {
                return Some(pick);
            }
        }
        self.pick_untried(rng, tried)
    }

    /// Direct weighted search over the backends not in `tried`.
    fn pick_untried<R: Rng + ?Sized>(&self, rng: &mut R, tried: &[usize]) -> Option<usize> {
        let untried = || {
            self.weights
                .iter()
                .enumerate()
                .filter(|&(i, &w)| eligible(w, i, tried))
        };
        let total: f64 = untried().map(|(_, w)| w).sum();
        if total <= 0.0 {
            return None;
        }
        let mut point = unit_interval(rng) * total;
        let mut last = None;
        for (i, &w) in untried() {
            if point < w {
                return Some(i);
            }
            point -= w;
            last = Some(i);
        }
        last // rounding left `point` just past the end
    }
}

impl Strategy for WeightedRandom {
    fn pick(&self, _turn: u64, tried: &[usize]) -> Option<usize> {
        self.pick_with(&mut rand::rng(), tried)
    }
}

/// A uniform number in [0, 1) with 53 random bits.
fn unit_interval<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1_u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn counts(weights: &[f64], tried: &[usize], n: usize, seed: u64) -> Vec<usize> {
        let strategy = WeightedRandom::new(weights);
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut counts = vec![0; weights.len()];
        for _ in 0..n {
            counts[strategy.pick_with(&mut rng, tried).expect("a pick")] += 1;
        }
        counts
    }

    /// Asserts every count is within 5 standard deviations of its binomial expectation.
    fn assert_proportional(counts: &[usize], weights: &[f64]) {
        let n: usize = counts.iter().sum();
        let total: f64 = weights.iter().sum();
        for (i, (&c, &w)) in counts.iter().zip(weights).enumerate() {
            let p = w / total;
            let mean = p * n as f64;
            let sigma = (n as f64 * p * (1.0 - p)).sqrt();
            assert!(
                (c as f64 - mean).abs() <= 5.0 * sigma + 1.0,
                "backend {i}: {c} picks, expected {mean:.0} ± {:.0}",
                5.0 * sigma
            );
        }
    }

    #[test]
    fn shares_follow_weights() {
        let weights = [1.5, 2.0, 1.0, 2.5];
        assert_proportional(&counts(&weights, &[], 100_000, 7), &weights);
    }

    #[test]
    fn same_seed_same_picks() {
        assert_eq!(
            counts(&[1.0, 2.0, 3.0], &[], 1000, 42),
            counts(&[1.0, 2.0, 3.0], &[], 1000, 42)
        );
    }

    #[test]
    fn zero_weight_is_never_picked() {
        let c = counts(&[0.0, 1.0, 0.0, 2.0], &[], 10_000, 1);
        assert_eq!((c[0], c[2]), (0, 0));
    }

    #[test]
    fn all_zero_or_empty_picks_nothing() {
        assert_eq!(WeightedRandom::new(&[0.0, 0.0]).pick(0, &[]), None);
        assert_eq!(WeightedRandom::new(&[]).pick(0, &[]), None);
    }

    #[test]
    fn one_backend_always_wins() {
        assert_eq!(counts(&[0.5], &[], 100, 3), [100]);
    }

    #[test]
    fn retries_exclude_tried_and_stay_proportional() {
        let c = counts(&[100.0, 1.0, 3.0], &[0], 40_000, 9);
        assert_eq!(c[0], 0);
        assert_proportional(&c[1..], &[1.0, 3.0]);
        assert_eq!(WeightedRandom::new(&[1.0, 1.0]).pick(0, &[0, 1]), None);
    }
}
