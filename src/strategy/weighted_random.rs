//! Weighted random: every pick is independent, backend i is chosen with probability w_i / Σw.
//!
//! No shared state is written on a pick (unlike round robin's counter), so pickers on different
//! threads never touch the same cache line. The sampling itself is Walker's alias method (in
//! Vose's O(n) construction): one random number picks a slot and decides between the slot's
//! backend and its alias, so a pick is one table read whatever the pool's size, where a binary
//! search over cumulative weights (rand's `WeightedIndex`) makes ten dependent reads at 1,024
//! backends; capacity-proportional draws twice per pick from this sampler in large pools.
//!
//! On a retry the backends in `tried` are excluded by rejection sampling, which keeps the
//! probabilities exactly proportional among the rest; if the tried ones carry nearly all the
//! weight, a direct search over the untried ones takes over after a few rejections.

use rand::Rng;

use super::{Strategy, eligible, with_pick_rng};

/// Rejected draws before falling back to a direct search over untried backends.
const REJECTION_TRIES: usize = 8;

/// Independent weighted random picks.
#[derive(Debug)]
pub(super) struct WeightedRandom {
    /// `None` when every weight is 0 (or there is no backend).
    index: Option<AliasTable>,
    weights: Box<[f64]>,
}

impl WeightedRandom {
    /// Builds the sampler for `weights` (finite, ≥ 0).
    pub(super) fn new(weights: &[f64]) -> WeightedRandom {
        WeightedRandom {
            index: AliasTable::new(weights),
            weights: weights.into(),
        }
    }

    /// Picks with a caller-supplied random source (seeded in tests).
    pub(super) fn pick_with<R: Rng + ?Sized>(&self, rng: &mut R, tried: &[usize]) -> Option<usize> {
        let index = self.index.as_ref()?;
        for _ in 0..REJECTION_TRIES {
            let pick = index.sample(rng.next_u64());
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
        with_pick_rng(|rng| self.pick_with(rng, tried))
    }
}

/// Walker's alias table: slot i keeps backend i with probability `keep[i]` / 2³² and otherwise
/// sends the pick to `alias[i]`; every slot is drawn with probability 1/n.
#[derive(Debug)]
struct AliasTable {
    slots: Box<[Slot]>,
}

/// One slot, both halves in one 8-byte read.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Keep the slot's own backend when the draw's low 32 bits are below this. `u32::MAX` for a
    /// slot that always keeps it; a draw of exactly `u32::MAX` then goes to `alias`, which for
    /// such slots is the slot itself.
    keep: u32,
    alias: u32,
}

impl AliasTable {
    /// Vose's construction; `None` when no weight is positive. Weights are finite and ≥ 0.
    fn new(weights: &[f64]) -> Option<AliasTable> {
        let n = weights.len();
        let total: f64 = weights.iter().sum();
        let any_positive = weights.iter().position(|&w| w > 0.0)?;
        if !(total.is_finite() && total > 0.0) || u32::try_from(n).is_err() {
            return None;
        }
        // Each slot's share scaled so that an average slot holds exactly 1.
        let mut scaled: Vec<f64> = weights.iter().map(|&w| w * n as f64 / total).collect();
        let mut slots: Vec<Slot> = (0..n)
            .map(|i| Slot {
                keep: u32::MAX,
                alias: i as u32,
            })
            .collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) =
            (0..n).partition(|&i| scaled[i] < 1.0);
        while let (Some(&s), Some(&l)) = (small.last(), large.last()) {
            small.pop();
            // Below 1, so the product is below 2³²: the cast cannot overflow.
            slots[s] = Slot {
                keep: (scaled[s] * 4_294_967_296.0) as u32,
                alias: l as u32,
            };
            scaled[l] -= 1.0 - scaled[s];
            if scaled[l] < 1.0 {
                large.pop();
                small.push(l);
            }
        }
        // What is left is 1 up to rounding and keeps its own backend (the initial slot), except
        // that a backend of weight 0 must never be kept, whatever rounding left it.
        for (i, slot) in slots.iter_mut().enumerate() {
            if weights[i] <= 0.0 {
                slot.keep = 0;
                if weights[slot.alias as usize] <= 0.0 {
                    slot.alias = any_positive as u32;
                }
            }
        }
        Some(AliasTable {
            slots: slots.into_boxed_slice(),
        })
    }

    /// The backend for 64 random bits: the high half picks the slot (by multiplication, not
    /// modulo), the low half decides between it and its alias.
    #[inline]
    fn sample(&self, bits: u64) -> usize {
        let n = self.slots.len() as u64;
        // (high 32 bits × n) / 2³² < n: in range, and below u32::MAX.
        let slot = (((bits >> 32) * n) >> 32) as usize;
        let Slot { keep, alias } = self.slots[slot];
        if (bits as u32) < keep {
            slot
        } else {
            alias as usize
        }
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

    /// The probability each backend gets from the alias table, computed from its slots: exact
    /// to the 2⁻³² the thresholds are kept in.
    fn table_shares(table: &AliasTable) -> Vec<f64> {
        let n = table.slots.len() as f64;
        let mut shares = vec![0.0; table.slots.len()];
        for (i, slot) in table.slots.iter().enumerate() {
            // A slot keeping everything still sends a draw of u32::MAX to its alias, itself.
            let keep = f64::from(slot.keep) / 4_294_967_296.0;
            shares[i] += keep / n;
            shares[slot.alias as usize] += (1.0 - keep) / n;
        }
        shares
    }

    #[test]
    fn alias_table_gives_every_backend_exactly_its_share() {
        let uneven: Vec<f64> = (0..1024)
            .map(|i| match i % 13 {
                0 => 0.0,
                k => 1.0 + f64::from(k) * 0.37 + f64::from(i) * 1e-3,
            })
            .collect();
        for weights in [
            vec![1.5, 2.0, 1.0, 2.5],
            vec![0.0, 1.0, 0.0, 2.0],
            vec![1e9, 1.0, 1e-3],
            vec![0.3],
            uneven,
        ] {
            let table = AliasTable::new(&weights).expect("a positive weight");
            let total: f64 = weights.iter().sum();
            for (i, (&share, &w)) in table_shares(&table).iter().zip(&weights).enumerate() {
                assert!(
                    (share - w / total).abs() < 1e-8,
                    "{} backends: backend {i} gets {share}, not {}",
                    weights.len(),
                    w / total
                );
                if w == 0.0 {
                    assert_eq!(share, 0.0, "weight 0 is never picked");
                }
            }
        }
        assert!(AliasTable::new(&[0.0, 0.0]).is_none());
        assert!(AliasTable::new(&[]).is_none());
    }

    #[test]
    fn sampling_maps_the_extreme_draws_inside_the_table() {
        let table = AliasTable::new(&[1.0, 0.0, 3.0]).expect("a positive weight");
        for bits in [0, u64::MAX, u64::MAX >> 32, u64::MAX << 32, 1 << 63] {
            assert_ne!(table.sample(bits), 1, "draw {bits:#x}");
        }
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
