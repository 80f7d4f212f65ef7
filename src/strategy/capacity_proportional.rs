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
//!
//! Finding the exact minimum reads every backend's count, about a nanosecond each. Pools of up to
//! [`FULL_SCAN_MAX`] backends — the fleets one listener usually fronts — get that exact scan. A
//! larger pool would spend microseconds per connection on it, so
//! there a pick draws two candidates at random in proportion to capacity and takes the
//! less loaded of them: "power of two choices", Envoy's `LEAST_REQUEST` and nginx's `random two
//! least_conn`, weighted. Drawing by capacity keeps every backend's expected share at C_i / ΣC;
//! comparing two keeps the spread around it to a few connections (the unit tests measure it)
//! instead of the ±1 of the full scan, at a cost that does not grow with the pool.
//!
//! A backend that refuses connections (or times them out) never holds one open, so by count
//! alone it would look the least loaded forever and be every client's first try: each client
//! would pay a failed connect before its retry. So a backend whose latest connect failed less
//! than [`FAILED_COOLDOWN`] ago is picked only when no other is left, as nginx's `max_fails=1`
//! skips a server for `fail_timeout`. After the cooldown one client tries it again; a success
//! ends the streak and it is counted as usual. Passive ejection, where configured, takes it out
//! altogether; this only keeps the strategy from steering everyone at it meanwhile.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;

use super::{Strategy, WeightedRandom, eligible, with_pick_rng};
use crate::state::BackendState;

/// Largest pool whose picks scan every backend for the exact minimum.
pub(super) const FULL_SCAN_MAX: usize = 64;
/// How long a backend whose latest connect failed is passed over while others are left.
pub(super) const FAILED_COOLDOWN: Duration = Duration::from_secs(1);

/// Least (active + 1) / capacity.
#[derive(Debug)]
pub(super) struct CapacityProportional {
    members: Box<[Member]>,
    /// Draws candidates by capacity; only for pools larger than [`FULL_SCAN_MAX`].
    sampler: Option<WeightedRandom>,
}

#[derive(Debug)]
struct Member {
    capacity: f64,
    stats: Arc<BackendState>,
}

impl CapacityProportional {
    /// Builds the strategy; `capacities[i]` and `live[i]` describe backend i.
    pub(super) fn new<'a>(
        capacities: &[f64],
        live: impl IntoIterator<Item = &'a Arc<BackendState>>,
    ) -> CapacityProportional {
        let members = capacities
            .iter()
            .zip(live)
            .map(|(&capacity, stats)| Member {
                capacity,
                stats: Arc::clone(stats),
            })
            .collect();
        let sampler = (capacities.len() > FULL_SCAN_MAX).then(|| WeightedRandom::new(capacities));
        CapacityProportional { members, sampler }
    }

    /// Picks for the connection numbered `turn` with a caller-supplied random source (seeded in
    /// tests).
    pub(super) fn pick_with<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        turn: u64,
        tried: &[usize],
    ) -> Option<usize> {
        match &self.sampler {
            None => self.scan(turn, tried),
            Some(sampler) => {
                let first = sampler.pick_with(rng, tried)?;
                let Some(second) = sampler.pick_with(rng, tried) else {
                    return Some(first);
                };
                let (a, b) = (&self.members[first], &self.members[second]);
                let (best, other) = if below(b.load(), b.capacity, a.load(), a.capacity) {
                    (second, first)
                } else {
                    (first, second)
                };
                // A failing backend loses to the other candidate, whatever the counts.
                let mut now = None;
                if self.members[best].failing(&mut now) && !self.members[other].failing(&mut now) {
                    Some(other)
                } else {
                    Some(best)
                }
            }
        }
    }

    /// The exact minimum over every eligible backend.
    ///
    /// The scan starts at the backend the connection's turn points to and keeps the first
    /// minimum it meets, so tied backends take turns (as nginx's `least_conn` hands ties to its
    /// round robin) without drawing a random number on every pick. Whether a backend is failing
    /// is asked of the winner only, so the common case reads one more atomic per pick, not per
    /// backend; when the winner is failing, a second scan leaves out every failing backend.
    fn scan(&self, turn: u64, tried: &[usize]) -> Option<usize> {
        let n = self.members.len();
        // Below `n`, a usize: the cast cannot truncate.
        let start = (turn % n.max(1) as u64) as usize;
        let best = self.least_loaded_in(start, tried, |_| true)?;
        let mut now = None;
        if !self.members[best].failing(&mut now) {
            return Some(best);
        }
        self.least_loaded_in(start, tried, |m| !m.failing(&mut now))
            .or(Some(best))
    }

    /// The least loaded eligible backend among those `keep` accepts, scanning from `start`
    /// round to just before it; ties go to the first met. Two plain loops, not a chained
    /// iterator: `Chain` costs a branch per step of this hot loop.
    #[inline(always)]
    fn least_loaded_in(
        &self,
        start: usize,
        tried: &[usize],
        mut keep: impl FnMut(&Member) -> bool,
    ) -> Option<usize> {
        let mut best = Best::default();
        for i in start..self.members.len() {
            if keep(&self.members[i]) {
                best.consider(i, &self.members[i], tried);
            }
        }
        for i in 0..start {
            if keep(&self.members[i]) {
                best.consider(i, &self.members[i], tried);
            }
        }
        best.index
    }
}

/// The least loaded backend a scan has met so far.
#[derive(Default)]
struct Best {
    index: Option<usize>,
    load: f64,
    capacity: f64,
}

impl Best {
    #[inline(always)]
    fn consider(&mut self, index: usize, member: &Member, tried: &[usize]) {
        if !eligible(member.capacity, index, tried) {
            return;
        }
        let load = member.load();
        if self.index.is_none() || below(load, member.capacity, self.load, self.capacity) {
            *self = Best {
                index: Some(index),
                load,
                capacity: member.capacity,
            };
        }
    }
}

impl Member {
    /// The load estimate (open connections, plus what the server reported beyond them) plus
    /// the connection being placed.
    #[inline]
    fn load(&self) -> f64 {
        self.stats.load_estimate() as f64 + 1.0
    }

    /// Whether the latest connect failed within [`FAILED_COOLDOWN`].
    #[inline]
    fn failing(&self, now: &mut Option<Instant>) -> bool {
        self.stats.failed_within(now, FAILED_COOLDOWN)
    }
}

/// Whether load / capacity is lower than other_load / other_capacity, compared without dividing
/// (capacities are positive wherever this is asked).
#[inline]
fn below(load: f64, capacity: f64, other_load: f64, other_capacity: f64) -> bool {
    load * other_capacity < other_load * capacity
}

impl Strategy for CapacityProportional {
    fn pick(&self, turn: u64, tried: &[usize]) -> Option<usize> {
        with_pick_rng(|rng| self.pick_with(rng, turn, tried))
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

    /// A backend that just failed a connect holds no connection, yet is not everyone's first
    /// try: it is passed over while another is left, in the exact scan and among sampled
    /// candidates alike, and counted as usual again once a connect succeeds.
    #[test]
    fn a_backend_whose_connects_fail_is_passed_over_while_others_are_left() {
        for n in [3, FULL_SCAN_MAX + 6] {
            let (strategy, live) = pool(&vec![1.0; n]);
            let mut picker = Picker::new(7);
            // Everyone else busy; backend 0 idle, but failing.
            let _held: Vec<_> = (1..n)
                .flat_map(|i| (0..5).map(move |_| i))
                .map(|i| BackendState::acquire(&live[i]))
                .collect();
            live[0].record_connect_failure();
            for _ in 0..200 {
                assert_ne!(picker.pick(&strategy, &[]), Some(0), "pool of {n}");
            }
            // The last one left.
            let others: Vec<usize> = (1..n).collect();
            assert_eq!(picker.pick(&strategy, &others), Some(0));
            // A success ends the streak: the idle backend is the least loaded again.
            live[0].record_connected(Duration::from_millis(1));
            let zero = (0..200)
                .filter(|_| picker.pick(&strategy, &[]) == Some(0))
                .count();
            // The scan always finds it; sampling draws it now and then, and it then wins.
            let least = if n <= FULL_SCAN_MAX { 200 } else { 1 };
            assert!(zero >= least, "pool of {n}: picked {zero} of 200");
        }
    }

    /// Picks as an accept loop does: turns 0, 1, 2, … and a seeded random source.
    struct Picker {
        rng: SmallRng,
        turn: u64,
    }

    impl Picker {
        fn new(seed: u64) -> Picker {
            Picker {
                rng: SmallRng::seed_from_u64(seed),
                turn: 0,
            }
        }

        fn pick(&mut self, strategy: &CapacityProportional, tried: &[usize]) -> Option<usize> {
            self.turn += 1;
            strategy.pick_with(&mut self.rng, self.turn, tried)
        }

        /// Opens `n` connections, each held (its guard kept) so the counts grow.
        fn fill(
            &mut self,
            strategy: &CapacityProportional,
            live: &[Arc<BackendState>],
            n: usize,
        ) -> Vec<crate::state::ActiveConn> {
            (0..n)
                .map(|_| {
                    let i = self.pick(strategy, &[]).expect("a pick");
                    BackendState::acquire(&live[i])
                })
                .collect()
        }
    }

    /// The largest distance, in connections, of any backend's open count from its capacity
    /// share of all open connections.
    fn spread(live: &[Arc<BackendState>], capacities: &[f64]) -> f64 {
        let total_active: u64 = live.iter().map(|s| s.active()).sum();
        let total_capacity: f64 = capacities.iter().sum();
        live.iter()
            .zip(capacities)
            .map(|(stats, c)| {
                let ideal = c / total_capacity * total_active as f64;
                (stats.active() as f64 - ideal).abs()
            })
            .fold(0.0, f64::max)
    }

    /// Closes about a third of `held` (chosen by `round`), then opens as many again.
    fn churn(
        picker: &mut Picker,
        strategy: &CapacityProportional,
        live: &[Arc<BackendState>],
        held: Vec<crate::state::ActiveConn>,
        round: usize,
    ) -> Vec<crate::state::ActiveConn> {
        let before = held.len();
        let mut kept: Vec<_> = held
            .into_iter()
            .enumerate()
            .filter(|(n, _)| (n * 7 + round) % 3 != 0)
            .map(|(_, guard)| guard)
            .collect();
        let closed = before - kept.len();
        kept.extend(picker.fill(strategy, live, closed));
        kept
    }

    #[test]
    fn open_connections_follow_capacity() {
        let capacities = [1.5, 2.0, 1.0, 2.5];
        let (strategy, live) = pool(&capacities);
        let mut picker = Picker::new(1);
        let mut held = Vec::new();
        for _ in 0..100 {
            held.extend(picker.fill(&strategy, &live, 7));
            assert!(spread(&live, &capacities) <= 1.0 + 1e-9);
        }
        // 700 connections over Σ = 7: exactly 150, 200, 100, 250.
        let active: Vec<u64> = live.iter().map(|s| s.active()).collect();
        assert_eq!(active, [150, 200, 100, 250]);
    }

    #[test]
    fn refills_after_random_closes_stay_within_one() {
        let capacities = [1.5, 2.0, 1.0, 2.5];
        let (strategy, live) = pool(&capacities);
        let mut picker = Picker::new(2);
        let mut held = picker.fill(&strategy, &live, 400);
        for round in 0..20 {
            held = churn(&mut picker, &strategy, &live, held, round);
            assert!(spread(&live, &capacities) <= 1.0 + 1e-9, "round {round}");
        }
    }

    #[test]
    fn ties_take_turns() {
        let (strategy, _live) = pool(&[1.0, 1.0, 1.0]);
        let mut picker = Picker::new(3);
        let mut counts = [0; 3];
        for _ in 0..3000 {
            counts[picker.pick(&strategy, &[]).expect("a pick")] += 1;
        }
        assert_eq!(counts, [1000; 3]);
    }

    #[test]
    fn higher_capacity_wins_when_idle() {
        let (strategy, _live) = pool(&[1.0, 4.0, 2.0]);
        assert_eq!(strategy.pick(0, &[]), Some(1));
        assert_eq!(strategy.pick(2, &[]), Some(1));
    }

    #[test]
    fn zero_capacity_and_tried_are_never_picked() {
        let (strategy, live) = pool(&[0.0, 1.0, 1.0]);
        let mut picker = Picker::new(4);
        let _held = picker.fill(&strategy, &live, 50);
        assert_eq!(live[0].active(), 0);
        assert_eq!(picker.pick(&strategy, &[1]), Some(2));
        assert_eq!(picker.pick(&strategy, &[1, 2]), None);
    }

    #[test]
    fn all_zero_or_empty_picks_nothing() {
        assert_eq!(pool(&[0.0, 0.0]).0.pick(0, &[]), None);
        assert_eq!(pool(&[]).0.pick(0, &[]), None);
        let large = vec![0.0; FULL_SCAN_MAX + 1];
        assert_eq!(pool(&large).0.pick(0, &[]), None);
    }

    /// Capacities 1, 1.5, … 4 over a pool too large to scan.
    fn large_capacities() -> Vec<f64> {
        (0..4 * FULL_SCAN_MAX)
            .map(|i| 1.0 + (i % 7) as f64 * 0.5)
            .collect()
    }

    /// Two choices keep a large pool within a few connections of its shares: across 40 seeds
    /// the worst moment was 10.3 connections off, where shares are 20 to 80 per backend and
    /// independent weighted random draws would stray ±45 (5σ at 80).
    #[test]
    fn large_pools_sample_and_stay_close_to_capacity_shares() {
        let capacities = large_capacities();
        for seed in 0..8 {
            let (strategy, live) = pool(&capacities);
            assert!(strategy.sampler.is_some());
            let mut picker = Picker::new(seed);
            let mut held = Vec::new();
            let mut worst: f64 = 0.0;
            // Up to 20 connections per unit of capacity, checked as they fill, then churned.
            for _ in 0..40 {
                held.extend(picker.fill(&strategy, &live, capacities.len() * 5 / 4));
                worst = worst.max(spread(&live, &capacities));
            }
            for round in 0..20 {
                held = churn(&mut picker, &strategy, &live, held, round);
                worst = worst.max(spread(&live, &capacities));
            }
            assert!(worst <= 12.0, "seed {seed}: {worst:.2} connections off");
        }
    }

    #[test]
    fn large_pools_never_pick_zero_capacity_or_tried() {
        let mut capacities = large_capacities();
        capacities[0] = 0.0;
        capacities[5] = 0.0;
        let (strategy, live) = pool(&capacities);
        let mut picker = Picker::new(6);
        let _held = picker.fill(&strategy, &live, 5_000);
        assert_eq!((live[0].active(), live[5].active()), (0, 0));
        let tried: Vec<usize> = (1..capacities.len()).filter(|&i| i != 9).collect();
        for _ in 0..10 {
            assert_eq!(picker.pick(&strategy, &tried), Some(9));
        }
    }
}
