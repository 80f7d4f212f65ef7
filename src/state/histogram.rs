//! A fixed-bucket histogram of durations that the connection path records into without a lock.
//!
//! Prometheus histograms are a count per bucket plus a sum and a count. Recording one value here
//! is a short linear search over a dozen static bounds and two relaxed atomic additions, so a
//! connection never waits for another one or for a scrape. A scrape reads the atomics one by
//! one: it may see a value in a bucket but not yet in the sum (or the other way round) for a
//! moment, which Prometheus tolerates; the count it reports is the sum of the buckets it read, so
//! the `+Inf` bucket and `_count` always agree.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds, in seconds, of the buckets of the time one connect to a backend takes. A
/// backend on the same LAN answers in well under a millisecond; the top bounds cover connects
/// that crawl towards `connect_timeout` (default 2 s).
pub(crate) const CONNECT_TIME_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Upper bounds, in seconds, of the buckets of how long client connections stay open. Inference
/// requests last from milliseconds (embeddings) to many minutes (long generations and streams);
/// the top bound is the default `idle_timeout` doubled.
pub(crate) const CONNECTION_DURATION_BOUNDS: &[f64] = &[
    0.005, 0.05, 0.25, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
];

/// Upper bounds, in seconds, of the buckets of how long clients waited in a pool's queue for a
/// slot: from a slot freed at once to the default `queue_timeout`.
pub(crate) const QUEUE_WAIT_BOUNDS: &[f64] = &[
    0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A histogram of durations with fixed bucket bounds (in seconds).
#[derive(Debug)]
pub(crate) struct Histogram {
    bounds: &'static [f64],
    /// One counter per bound, then one for values above the last bound; not cumulative.
    buckets: Box<[AtomicU64]>,
    /// Sum of every recorded value, in microseconds: fine enough for sub-millisecond connects,
    /// and a u64 of them lasts for half a million years of summed connection time.
    sum_micros: AtomicU64,
}

/// A copy of a [`Histogram`] at one moment, in the shape Prometheus encoders want.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HistogramSnapshot {
    /// `(upper bound in seconds, values in this bucket)`, not cumulative; the last bound is
    /// `f64::INFINITY`.
    pub buckets: Vec<(f64, u64)>,
    /// Values recorded.
    pub count: u64,
    /// Their sum, in seconds.
    pub sum: f64,
}

impl Histogram {
    /// An empty histogram over `bounds`, which must be finite and increasing.
    pub(crate) fn new(bounds: &'static [f64]) -> Histogram {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bounds increase");
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records one value.
    pub(crate) fn record(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        let index = self
            .bounds
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(self.bounds.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// A copy of the buckets, count and sum.
    pub(crate) fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        HistogramSnapshot {
            count: buckets.iter().map(|&(_, n)| n).sum(),
            sum: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_land_in_the_first_bucket_whose_bound_they_do_not_exceed() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.record(Duration::from_millis(100)); // on the bound: first bucket
        h.record(Duration::from_millis(101));
        h.record(Duration::from_secs(1));
        h.record(Duration::from_secs(7));
        h.record(Duration::ZERO);
        let s = h.snapshot();
        assert_eq!(s.buckets, [(0.1, 2), (1.0, 2), (f64::INFINITY, 1)]);
        assert_eq!(s.count, 5);
        assert!((s.sum - 8.201).abs() < 1e-9, "{}", s.sum);
    }

    #[test]
    fn empty_histogram_has_every_bucket_at_zero() {
        let s = Histogram::new(CONNECT_TIME_BOUNDS).snapshot();
        assert_eq!(s.buckets.len(), CONNECT_TIME_BOUNDS.len() + 1);
        assert!(s.buckets.iter().all(|&(_, n)| n == 0));
        assert_eq!((s.count, s.sum), (0, 0.0));
    }

    #[test]
    fn shipped_bounds_increase() {
        for bounds in [
            CONNECT_TIME_BOUNDS,
            CONNECTION_DURATION_BOUNDS,
            QUEUE_WAIT_BOUNDS,
        ] {
            assert!(bounds.windows(2).all(|w| w[0] < w[1]));
            assert!(bounds.iter().all(|b| b.is_finite() && *b > 0.0));
        }
    }
}
