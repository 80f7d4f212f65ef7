//! A listener's per-client limits, `max_connections_per_client` and
//! `connection_rate_per_client`, as values. The data path enforces them per client address in
//! its `ClientTable` (`src/state/clients.rs`), which is given them with every connection, so a
//! reload that changes them applies from the next connection on.

use std::num::NonZeroU32;
use std::time::Duration;

/// New connections one client address may open: `count` per `per`, as a token bucket that
/// holds `count` tokens (the burst) and gains them back one every `per / count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rate {
    count: NonZeroU32,
    per: Duration,
}

impl Rate {
    /// `count` connections per `per`, or `None` if `per` is zero.
    pub(crate) fn new(count: NonZeroU32, per: Duration) -> Option<Rate> {
        (!per.is_zero()).then_some(Rate { count, per })
    }

    /// The burst: connections a client that has been quiet for `per` may open at once.
    pub(crate) fn burst(&self) -> NonZeroU32 {
        self.count
    }

    /// The period the count is given over; a quiet client's bucket is full again after it.
    #[cfg(test)]
    pub(crate) fn per(&self) -> Duration {
        self.per
    }

    /// How long one connection's token takes to come back, `per / count`, in nanoseconds and
    /// at least 1. Rounding down allows at most one connection more per `count` nanoseconds
    /// of `per` than written, which no configurable rate notices.
    pub(crate) fn interval_nanos(&self) -> u64 {
        let nanos = self.per.as_nanos() / u128::from(self.count.get());
        u64::try_from(nanos).unwrap_or(u64::MAX).max(1)
    }
}

/// What a listener limits per client address. The default limits nothing, and then no client
/// is tracked at all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ClientLimits {
    /// Connections one address may hold open at once.
    pub(crate) max_open: Option<NonZeroU32>,
    /// New connections one address may open over time.
    pub(crate) rate: Option<Rate>,
}

impl ClientLimits {
    /// Whether neither limit is set.
    pub(crate) fn is_unlimited(&self) -> bool {
        self.max_open.is_none() && self.rate.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).expect("a test count is not zero")
    }

    #[test]
    fn zero_period_is_no_rate() {
        assert_eq!(Rate::new(count(20), Duration::ZERO), None);
    }

    #[test]
    fn interval_is_period_over_count() {
        let rate = Rate::new(count(20), Duration::from_secs(1)).expect("a rate");
        assert_eq!(rate.burst().get(), 20);
        assert_eq!(rate.per(), Duration::from_secs(1));
        assert_eq!(rate.interval_nanos(), 50_000_000);
        let thirds = Rate::new(count(3), Duration::from_secs(1)).expect("a rate");
        assert_eq!(thirds.interval_nanos(), 333_333_333);
    }

    #[test]
    fn interval_is_at_least_a_nanosecond() {
        let rate = Rate::new(count(u32::MAX), Duration::from_nanos(1)).expect("a rate");
        assert_eq!(rate.interval_nanos(), 1);
        let slow = Rate::new(count(1), Duration::MAX).expect("a rate");
        assert_eq!(slow.interval_nanos(), u64::MAX);
    }

    #[test]
    fn default_is_unlimited() {
        assert!(ClientLimits::default().is_unlimited());
        let limits = ClientLimits {
            max_open: Some(count(1)),
            rate: None,
        };
        assert!(!limits.is_unlimited());
    }
}
