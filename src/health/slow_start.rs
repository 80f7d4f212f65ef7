//! Slow start: after a backend turns healthy, is added or comes back from an ejection, its
//! weight ramps linearly from about zero to full over the `slow_start` window.
//!
//! Inference servers are cold after a start: CUDA graphs, torch.compile and first-request JIT
//! make their first requests slow (vllm#19824: "the very first request ... takes 30-60
//! seconds"). A ramp lets a few requests warm them before they get their full share.
//!
//! The ramp is `floor(20 · elapsed / window) / 20`, never below 1/20: 5 % of the weight at once
//! (HAProxy starts at 1/16), then 5 % more every window/20, full weight at the end of the window.
//! Steps rather than a smooth curve because the weight only reaches strategies when a snapshot is rebuilt: the control task
//! rebuilds exactly at each step boundary ([`Ramp::next_step`]), so a 60 s ramp costs 20
//! rebuilds instead of one per health event. Unlike HAProxy, the ramp also runs for backends
//! that are new (a scale-out), as the research on inference fleets recommends; when every
//! backend is new at once (the balancer starts) they all ramp together and their shares are
//! unchanged, so nothing is starved.

use std::time::Duration;

use tokio::time::Instant;

/// Number of equal steps of a ramp. The weight starts at 1/STEPS of full, never at zero: a
/// backend at zero would get no traffic to warm up with.
pub(crate) const STEPS: u32 = 20;

/// A weight ramp in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ramp {
    /// When it started.
    pub start: Instant,
    /// How long it lasts.
    pub window: Duration,
}

impl Ramp {
    /// The share of the weight the ramp allows at `now`: 1/[`STEPS`] to 1.
    pub(crate) fn factor(&self, now: Instant) -> f64 {
        f64::from(self.step(now)) / f64::from(STEPS)
    }

    /// True once the ramp has reached full weight.
    pub(crate) fn is_over(&self, now: Instant) -> bool {
        self.step(now) >= STEPS
    }

    /// When the weight changes next, if it still will.
    pub(crate) fn next_step(&self, now: Instant) -> Option<Instant> {
        let step = self.step(now);
        // The first instant of step + 1, rounded up to the nanosecond so that it lies in it.
        // (Steps 0 and 1 share the factor 1/STEPS, so the first boundary is that of step 2.)
        let window = self.window.as_nanos();
        let nanos = (window * u128::from(step + 1)).div_ceil(u128::from(STEPS));
        (step < STEPS).then(|| self.start + nanos_to_duration(nanos))
    }

    /// The current step, 1..=STEPS: floor(STEPS · elapsed / window), at least 1. Integer
    /// arithmetic, so that the boundaries `next_step` computes fall exactly in the step they
    /// start.
    fn step(&self, now: Instant) -> u32 {
        let elapsed = now.saturating_duration_since(self.start);
        if elapsed >= self.window {
            return STEPS;
        }
        let done = elapsed.as_nanos() * u128::from(STEPS) / self.window.as_nanos();
        u32::try_from(done).map_or(STEPS, |d| d.clamp(1, STEPS))
    }
}

fn nanos_to_duration(nanos: u128) -> Duration {
    let secs = u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX);
    Duration::new(secs, (nanos % 1_000_000_000) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ramp_climbs_in_equal_steps_from_a_twentieth_to_full() {
        let ramp = Ramp {
            start: Instant::now(),
            window: Duration::from_secs(20),
        };
        let at = |secs: f64| ramp.start + Duration::from_secs_f64(secs);
        assert_eq!(ramp.factor(at(0.0)), 0.05);
        assert_eq!(ramp.factor(at(1.999)), 0.05);
        assert_eq!(ramp.factor(at(2.0)), 0.10);
        assert_eq!(ramp.factor(at(10.0)), 0.5);
        assert_eq!(ramp.factor(at(19.999)), 0.95);
        assert_eq!(ramp.factor(at(20.0)), 1.0);
        assert!(!ramp.is_over(at(19.0)));
        assert!(ramp.is_over(at(20.0)));
        let mut last = 0.0;
        for tenth in 0..=250 {
            let f = ramp.factor(at(f64::from(tenth) / 10.0));
            assert!(f >= last, "the ramp never goes down");
            last = f;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn next_step_is_the_next_boundary_until_the_end() {
        let start = Instant::now();
        let ramp = Ramp {
            start,
            window: Duration::from_secs(20),
        };
        assert_eq!(ramp.next_step(start), Some(start + Duration::from_secs(2)));
        assert_eq!(
            ramp.next_step(start + Duration::from_millis(2500)),
            Some(start + Duration::from_secs(3))
        );
        assert_eq!(
            ramp.next_step(start + Duration::from_secs(19)),
            Some(start + Duration::from_secs(20))
        );
        assert_eq!(ramp.next_step(start + Duration::from_secs(20)), None);
        // A boundary always moves the factor up.
        let boundary = ramp.next_step(start).expect("ramping");
        assert!(ramp.factor(boundary) > ramp.factor(start));
    }
}
