//! Passive ejection: live traffic's connect failures take a backend out for a while.
//!
//! The connection path only counts: every failed connect adds one to the backend's consecutive
//! failure counter and every successful one resets it (relaxed atomics, no lock). The connect
//! that reaches `max_connect_failures` asks the control task to republish; the control task (the
//! health supervisor's sweep) then ejects the backend with [`Ejections::eject`] and rebuilds the
//! snapshot, and its deadline timer brings the backend back once the ejection is over.
//!
//! Ejections double, Envoy-style: `eject_for`, then 2×, 4×... up to [`MAX_EJECTION`] (or
//! `eject_for` if that is longer), so a server that keeps failing is retried less and less
//! often. The doubling resets once the backend has stayed in rotation for as long as its last
//! ejection lasted: recovered servers start again from `eject_for`.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::MAX_EJECTION;

/// The ejection record of one backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Ejections {
    /// Ejected until then (kept after it passes, until [`expire`](Ejections::expire) runs).
    until: Option<Instant>,
    /// Ejections in a row without a long enough stay in rotation in between.
    streak: u32,
    /// How long the latest ejection lasted.
    last_length: Duration,
    /// When the latest ejection ended.
    returned_at: Option<Instant>,
}

impl Ejections {
    /// True while an ejection is in force.
    pub(crate) fn is_ejected(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until)
    }

    /// When the current ejection ends, if there is one (it may be just over and not yet
    /// expired).
    pub(crate) fn until(&self) -> Option<Instant> {
        self.until
    }

    /// Ejections in a row; the next one lasts `eject_for` × 2^streak (capped).
    pub(crate) fn streak(&self) -> u32 {
        self.streak
    }

    /// How long the latest ejection lasted (or lasts).
    pub(crate) fn last_length(&self) -> Duration {
        self.last_length
    }

    /// Ejects the backend at `now` and returns for how long.
    pub(crate) fn eject(&mut self, now: Instant, eject_for: Duration) -> Duration {
        if self
            .returned_at
            .is_some_and(|back| now.saturating_duration_since(back) >= self.last_length)
        {
            self.streak = 0;
        }
        let cap = MAX_EJECTION.max(eject_for);
        let length = eject_for
            .checked_mul(1_u32.checked_shl(self.streak).unwrap_or(u32::MAX))
            .map_or(cap, |d| d.min(cap));
        self.streak = self.streak.saturating_add(1);
        self.until = Some(now + length);
        self.last_length = length;
        self.returned_at = None;
        length
    }

    /// Ends the ejection if its time is over at `now`; true if one ended.
    pub(crate) fn expire(&mut self, now: Instant) -> bool {
        match self.until {
            Some(until) if now >= until => {
                self.until = None;
                self.returned_at = Some(now);
                true
            }
            _ => false,
        }
    }

    /// Forgets everything (passive checks were switched off).
    pub(crate) fn clear(&mut self) {
        *self = Ejections::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ejections_double_up_to_the_cap_and_reset_after_a_stay() {
        let base = Duration::from_secs(10);
        let mut e = Ejections::default();
        let mut now = Instant::now();
        let mut lengths = Vec::new();
        for _ in 0..7 {
            let length = e.eject(now, base);
            assert!(e.is_ejected(now));
            assert!(!e.expire(now), "not over yet");
            now += length;
            assert!(!e.is_ejected(now));
            assert!(e.expire(now));
            lengths.push(length.as_secs());
            // Fails again at once: the streak goes on.
        }
        assert_eq!(lengths, [10, 20, 40, 80, 160, 300, 300]);
        // In rotation for as long as the last ejection: the next one starts from the base.
        now += Duration::from_secs(300);
        assert_eq!(e.eject(now, base), base);
        assert_eq!(e.streak(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_stay_keeps_the_streak() {
        let base = Duration::from_millis(100);
        let mut e = Ejections::default();
        let now = Instant::now();
        let first = e.eject(now, base);
        assert!(e.expire(now + first));
        // Back for less than the 100 ms it was out: doubled.
        let second = e.eject(now + first + Duration::from_millis(50), base);
        assert_eq!(second, base * 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_base_above_the_cap_is_its_own_cap() {
        let base = Duration::from_secs(600);
        let mut e = Ejections::default();
        let now = Instant::now();
        assert_eq!(e.eject(now, base), base);
        assert!(e.expire(now + base));
        assert_eq!(e.eject(now + base, base), base);
    }
}
