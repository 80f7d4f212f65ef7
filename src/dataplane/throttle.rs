//! At most one log line per period for an event that can come thousands of times a second (a
//! shortage of local ports, of descriptors): a line for each would add the cost of logging to a
//! machine already short of a resource. Shared by every worker thread, so lock-free.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lets one caller through per period, whichever thread it is on, and counts the others.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    /// When a caller was last let through, in milliseconds since [`clock`]'s start plus one
    /// (0: never).
    last: AtomicU64,
    /// Callers held back since then.
    suppressed: AtomicU64,
}

impl Throttle {
    pub(crate) const fn new() -> Throttle {
        Throttle {
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// True for the first call, then for the first call at least `period` after the last one
    /// that returned true. Of callers racing for the same turn, exactly one wins.
    pub(crate) fn allow(&self, now: Instant, period: Duration) -> bool {
        self.allow_counting(now, period).is_some()
    }

    /// As [`allow`](Throttle::allow), and says how many calls were held back before this one
    /// was let through (for a `suppressed` field in the line it logs).
    pub(crate) fn allow_counting(&self, now: Instant, period: Duration) -> Option<u64> {
        // 1 ms past the clock's start at the least, so that a first call is never mistaken for
        // "never let through".
        let at = now.saturating_duration_since(clock()).as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        let allowed = (last == 0 || at >= last.saturating_add(period.as_millis() as u64))
            && self
                .last
                .compare_exchange(last, at, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        if allowed {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// The start of the clock throttles count on.
fn clock() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_one_call_through_per_period() {
        let throttle = Throttle::new();
        let now = Instant::now();
        let period = Duration::from_secs(1);
        assert!(throttle.allow(now, period), "the first call");
        assert!(!throttle.allow(now, period));
        assert!(!throttle.allow(now + Duration::from_millis(999), period));
        assert!(throttle.allow(now + period, period));
        assert!(!throttle.allow(now + period, period));
    }

    #[test]
    fn counts_the_calls_held_back() {
        let throttle = Throttle::new();
        let now = Instant::now();
        let period = Duration::from_secs(1);
        assert_eq!(throttle.allow_counting(now, period), Some(0));
        for _ in 0..5 {
            assert_eq!(throttle.allow_counting(now, period), None);
        }
        assert_eq!(throttle.allow_counting(now + period, period), Some(5));
    }
}
