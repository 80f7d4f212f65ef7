//! Capacity-proportional: keep *open* connections proportional to each backend's capacity.
//!
//! Weight is read as capacity C_i. A new connection goes to the backend with the smallest
//! (active_i + 1) / C_i, i.e. the one whose load would be lowest relative to its capacity after
//! taking it; ties are broken uniformly at random so equal backends share evenly. Greedily
//! filling the least-loaded backend this way keeps active_i within about one connection of
//! C_i / ΣC × total, which is the allocation the "optimal load balancing" model prescribes for
//! long-lived connections such as inference streams: capacities 1.5, 2, 1, 2.5 (Σ = 7) carry
//! 21.4 %, 28.6 %, 14.3 % and 35.7 % of the open connections.
//!
//! This is weighted least-connections (nginx's `least_conn` compares conns/weight the same way),
//! with the +1 so that a backend of higher capacity wins when every backend is idle. Counts are
//! live atomics shared with the data path; a pick reads them and writes nothing.

use std::sync::Arc;

use rand::Rng;

use super::{Strategy, eligible};
use crate::backend::BackendState;

/// Least (active + 1) / capacity.
#[derive(Debug)]
pub struct CapacityProportional {
    members: Box<[Member]>,
}

#[derive(Debug)]
struct Member {
    capacity: f64,
    stats: Arc<BackendState>,
}

impl CapacityProportional {
    /// Builds the strategy; `capacities[i]` and `live[i]` describe backend i.
    pub fn new(capacities: &[f64], live: &[Arc<BackendState>]) -> CapacityProportional {
        let members = capacities
            .iter()
            .zip(live)
            .map(|(&capacity, stats)| Member {
                capacity,
                stats: Arc::clone(stats),
            })
            .collect();
        CapacityProportional { members }
    }

    /// Picks with a caller-supplied random source for tie-breaking (seeded in tests).
    pub fn pick_with<R: Rng + ?Sized>(&self, rng: &mut R, tried: &[usize]) -> Option<usize> {
        // (index, active + 1, capacity) of the best so far, and how many tie with it.
        let mut best: Option<(usize, f64, f64)> = None;
        let mut ties = 0_u64;
        for (i, member) in self.members.iter().enumerate() {
            if !eligible(member.capacity, i, tried) {
                continue;
            }
            let load = member.stats.active() as f64 + 1.0;
            // load / capacity < best_load / best_capacity, without dividing.
            let order = match best {
                None => std::cmp::Ordering::Less,
                Some((_, best_load, best_capacity)) => {
                    (load * best_capacity).total_cmp(&(best_load * member.capacity))
                }
            };
            match order {
                std::cmp::Ordering::Less => {
                    best = Some((i, load, member.capacity));
                    ties = 1;
                }
                std::cmp::Ordering::Equal => {
                    // Reservoir sampling: each of the k tied backends ends up chosen with
                    // probability 1/k.
                    ties += 1;
                    if rng.next_u64() % ties == 0 {
                        best = Some((i, load, member.capacity));
                    }
                }
                std::cmp::Ordering::Greater => {}
            }
        }
        best.map(|(i, _, _)| i)
    }
}

impl Strategy for CapacityProportional {
    fn pick(&self, tried: &[usize]) -> Option<usize> {
        self.pick_with(&mut rand::rng(), tried)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn pool(capacities: &[f64]) -> (CapacityProportional, Vec<Arc<BackendState>>) {
        let live: Vec<_> = capacities.iter().map(|_| Arc::default()).collect();
        (CapacityProportional::new(capacities, &live), live)
    }

    /// Opens `n` connections, each held (its guard kept) so the counts grow.
    fn fill(
        strategy: &CapacityProportional,
        live: &[Arc<BackendState>],
        n: usize,
        rng: &mut SmallRng,
    ) -> Vec<crate::backend::ActiveConn> {
        (0..n)
            .map(|_| {
                let i = strategy.pick_with(rng, &[]).expect("a pick");
                BackendState::acquire(&live[i])
            })
            .collect()
    }

    fn assert_within_one(live: &[Arc<BackendState>], capacities: &[f64]) {
        let total_active: u64 = live.iter().map(|s| s.active()).sum();
        let total_capacity: f64 = capacities.iter().sum();
        for (i, (stats, c)) in live.iter().zip(capacities).enumerate() {
            let ideal = c / total_capacity * total_active as f64;
            let active = stats.active() as f64;
            assert!(
                (active - ideal).abs() <= 1.0 + 1e-9,
                "backend {i}: {active} open, ideal {ideal:.2}"
            );
        }
    }

    #[test]
    fn open_connections_follow_capacity() {
        let capacities = [1.5, 2.0, 1.0, 2.5];
        let (strategy, live) = pool(&capacities);
        let mut rng = SmallRng::seed_from_u64(1);
        let mut held = Vec::new();
        for _ in 0..100 {
            held.extend(fill(&strategy, &live, 7, &mut rng));
            assert_within_one(&live, &capacities);
        }
        // 700 connections over Σ = 7: exactly 150, 200, 100, 250.
        let active: Vec<u64> = live.iter().map(|s| s.active()).collect();
        assert_eq!(active, [150, 200, 100, 250]);
    }

    #[test]
    fn refills_after_random_closes_stay_within_one() {
        let capacities = [1.5, 2.0, 1.0, 2.5];
        let (strategy, live) = pool(&capacities);
        let mut rng = SmallRng::seed_from_u64(2);
        let mut held = fill(&strategy, &live, 400, &mut rng);
        for round in 0..20 {
            // Close a random third, then open as many again.
            let mut kept = Vec::new();
            for (n, guard) in held.into_iter().enumerate() {
                if (n * 7 + round) % 3 != 0 {
                    kept.push(guard);
                }
            }
            let closed = 400 - kept.len();
            kept.extend(fill(&strategy, &live, closed, &mut rng));
            held = kept;
            assert_within_one(&live, &capacities);
        }
    }

    #[test]
    fn ties_are_broken_at_random() {
        let (strategy, _live) = pool(&[1.0, 1.0, 1.0]);
        let mut rng = SmallRng::seed_from_u64(3);
        let mut counts = [0; 3];
        for _ in 0..3000 {
            counts[strategy.pick_with(&mut rng, &[]).expect("a pick")] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn higher_capacity_wins_when_idle() {
        let (strategy, _live) = pool(&[1.0, 4.0, 2.0]);
        assert_eq!(strategy.pick(&[]), Some(1));
    }

    #[test]
    fn zero_capacity_and_tried_are_never_picked() {
        let (strategy, live) = pool(&[0.0, 1.0, 1.0]);
        let mut rng = SmallRng::seed_from_u64(4);
        let _held = fill(&strategy, &live, 50, &mut rng);
        assert_eq!(live[0].active(), 0);
        assert_eq!(strategy.pick_with(&mut rng, &[1]), Some(2));
        assert_eq!(strategy.pick_with(&mut rng, &[1, 2]), None);
    }

    #[test]
    fn all_zero_or_empty_picks_nothing() {
        assert_eq!(pool(&[0.0, 0.0]).0.pick(&[]), None);
        assert_eq!(pool(&[]).0.pick(&[]), None);
    }
}
