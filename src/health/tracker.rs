//! One backend's rise/fall state machine with startup grace: the verdict a run of probe
//! results gives. The task that feeds it probes is `control::checker`.

use std::time::Duration;

use tokio::time::Instant;

use super::HealthStatus;
use super::probe::ProbeError;
use crate::config::HealthConfig;

/// A change of health status and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Transition {
    /// Status before.
    pub from: HealthStatus,
    /// Status after.
    pub to: HealthStatus,
    /// Why, for the log line: "http 503 (3 in a row)", "2 passes in a row"...
    pub reason: String,
}

/// The rise/fall state machine of one backend.
///
/// - A backend starts [`HealthStatus::Healthy`] but unconfirmed. Its first probe decides: a pass
///   confirms it; a failure takes it out at once, as *starting* while `startup_grace` (counted
///   from when checks began) runs, as *unhealthy* after it.
/// - Confirmed and healthy: `fall` failures in a row make it unhealthy.
/// - Starting or unhealthy: `rise` passes in a row make it healthy (and confirmed).
/// - Starting: a failure after `startup_grace` is over makes it unhealthy.
///
/// Every kind of failure (refused, timeout, status, body) counts the same.
#[derive(Debug, Clone)]
pub(crate) struct Tracker {
    status: HealthStatus,
    confirmed: bool,
    passes: u32,
    failures: u32,
    rise: u32,
    fall: u32,
    startup_grace: Duration,
    began: Instant,
    grace_until: Instant,
}

/// What a [`Tracker`] has seen short of a verdict, kept in the backend's health state so that
/// a checker restarted by a reload (new interval, path, `rise`...) picks up where the last one
/// stopped: a backend two failures into `fall = 3` falls at the next one, and a backend still
/// starting keeps its original `startup_grace` deadline instead of getting a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Progress {
    passes: u32,
    failures: u32,
    began: Instant,
}

impl Tracker {
    #[cfg(test)]
    /// A tracker picking up from `status` (kept across checker restarts) at `now`.
    pub(crate) fn new(
        status: HealthStatus,
        confirmed: bool,
        config: &HealthConfig,
        now: Instant,
    ) -> Tracker {
        Tracker::resume(status, confirmed, None, config, now)
    }

    /// As [`new`](Tracker::new), continuing the streaks and the grace period of `progress`
    /// (from an earlier tracker of the same backend) when there is one.
    pub(crate) fn resume(
        status: HealthStatus,
        confirmed: bool,
        progress: Option<Progress>,
        config: &HealthConfig,
        now: Instant,
    ) -> Tracker {
        let began = progress.map_or(now, |p| p.began);
        Tracker {
            status,
            confirmed,
            passes: progress.map_or(0, |p| p.passes),
            failures: progress.map_or(0, |p| p.failures),
            rise: config.rise.get(),
            fall: config.fall.get(),
            startup_grace: config.startup_grace,
            began,
            grace_until: began + config.startup_grace,
        }
    }

    /// What a successor should resume from.
    pub(crate) fn progress(&self) -> Progress {
        Progress {
            passes: self.passes,
            failures: self.failures,
            began: self.began,
        }
    }

    #[cfg(test)]
    /// The current status.
    pub(crate) fn status(&self) -> HealthStatus {
        self.status
    }

    /// True once the backend has passed a probe (or been brought back by `rise` passes).
    pub(crate) fn confirmed(&self) -> bool {
        self.confirmed
    }

    /// Takes in one probe result at `now`; returns the transition it causes, if any.
    pub(crate) fn observe(
        &mut self,
        result: Result<(), ProbeError>,
        now: Instant,
    ) -> Option<Transition> {
        let from = self.status;
        let (to, reason) = match result {
            Ok(()) => {
                self.failures = 0;
                self.passes = self.passes.saturating_add(1);
                match self.status {
                    HealthStatus::Healthy => {
                        self.confirmed = true;
                        return None;
                    }
                    _ if self.passes >= self.rise => {
                        self.confirmed = true;
                        let reason = match self.passes {
                            1 => "passed".to_owned(),
                            n => format!("{n} passes in a row"),
                        };
                        (HealthStatus::Healthy, reason)
                    }
                    _ => return None,
                }
            }
            Err(error) => {
                self.passes = 0;
                self.failures = self.failures.saturating_add(1);
                let in_grace = now < self.grace_until;
                match self.status {
                    HealthStatus::Healthy if !self.confirmed && in_grace => {
                        (HealthStatus::Starting, format!("first check: {error}"))
                    }
                    HealthStatus::Healthy if !self.confirmed => {
                        (HealthStatus::Unhealthy, format!("first check: {error}"))
                    }
                    HealthStatus::Healthy if self.failures >= self.fall => {
                        let reason = match self.failures {
                            1 => error.to_string(),
                            n => format!("{error} ({n} in a row)"),
                        };
                        (HealthStatus::Unhealthy, reason)
                    }
                    HealthStatus::Starting if !in_grace => {
                        let grace = humantime::format_duration(self.startup_grace);
                        let reason = format!("no pass within startup_grace {grace}; last: {error}");
                        (HealthStatus::Unhealthy, reason)
                    }
                    _ => return None,
                }
            }
        };
        self.status = to;
        self.passes = 0;
        self.failures = 0;
        Some(Transition { from, to, reason })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::num::NonZeroU32;

    use crate::config::{AllUnhealthy, Probe};

    fn config(rise: u32, fall: u32, grace: Duration) -> HealthConfig {
        HealthConfig {
            probe: Probe::Tcp,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(2),
            rise: NonZeroU32::new(rise).expect("test rise"),
            fall: NonZeroU32::new(fall).expect("test fall"),
            startup_grace: grace,
            slow_start: None,
            all_unhealthy: AllUnhealthy::RouteAnyway,
            load: None,
        }
    }

    const FAIL: Result<(), ProbeError> = Err(ProbeError::Status(503));
    const PASS: Result<(), ProbeError> = Ok(());

    fn statuses(
        tracker: &mut Tracker,
        results: &[Result<(), ProbeError>],
        now: Instant,
    ) -> Vec<&'static str> {
        results
            .iter()
            .map(|&r| {
                tracker.observe(r, now);
                tracker.status().as_str()
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn confirmed_backend_falls_after_fall_failures_and_rises_after_rise_passes() {
        let now = Instant::now();
        let mut t = Tracker::new(
            HealthStatus::Healthy,
            false,
            &config(2, 3, Duration::ZERO),
            now,
        );
        let seen = statuses(
            &mut t,
            &[
                PASS, FAIL, FAIL, PASS, FAIL, FAIL, FAIL, PASS, FAIL, PASS, PASS,
            ],
            now,
        );
        assert_eq!(
            seen,
            [
                "healthy",
                "healthy",
                "healthy",
                "healthy",
                "healthy",
                "healthy",
                "unhealthy",
                "unhealthy",
                "unhealthy",
                "unhealthy",
                "healthy"
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn transitions_say_why() {
        let now = Instant::now();
        let mut t = Tracker::new(
            HealthStatus::Healthy,
            true,
            &config(2, 3, Duration::ZERO),
            now,
        );
        assert_eq!(
            t.observe(Err(ProbeError::Timeout(Duration::from_secs(2))), now),
            None
        );
        assert_eq!(t.observe(FAIL, now), None);
        let down = t.observe(
            Err(ProbeError::Connect(io::ErrorKind::ConnectionRefused)),
            now,
        );
        assert_eq!(
            down,
            Some(Transition {
                from: HealthStatus::Healthy,
                to: HealthStatus::Unhealthy,
                reason: "connection refused (3 in a row)".into(),
            })
        );
        assert_eq!(t.observe(PASS, now), None);
        let up = t.observe(PASS, now).expect("rise reached");
        assert_eq!(
            (up.to, up.reason.as_str()),
            (HealthStatus::Healthy, "2 passes in a row")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unconfirmed_backend_is_out_at_its_first_failure_as_starting_during_grace() {
        let now = Instant::now();
        let grace = Duration::from_secs(60);
        let mut t = Tracker::new(HealthStatus::Healthy, false, &config(2, 3, grace), now);
        let first = t.observe(FAIL, now).expect("out at once");
        assert_eq!(
            (first.to, first.reason.as_str()),
            (HealthStatus::Starting, "first check: http 503")
        );
        // Failing on within the grace is still starting, no new transition.
        assert_eq!(t.observe(FAIL, now + Duration::from_secs(30)), None);
        // A pass is not enough with rise = 2; two are.
        assert_eq!(t.observe(PASS, now + Duration::from_secs(31)), None);
        let up = t
            .observe(PASS, now + Duration::from_secs(32))
            .expect("rise reached");
        assert_eq!(up.from, HealthStatus::Starting);
        assert!(t.confirmed());
        // Now confirmed: it takes `fall` failures again.
        assert_eq!(t.observe(FAIL, now + Duration::from_secs(100)), None);
    }

    /// A checker restarted by a reload continues the streak and the grace period.
    #[tokio::test(start_paused = true)]
    async fn a_resumed_tracker_continues_streaks_and_the_grace_period() {
        let now = Instant::now();
        let c = config(2, 3, Duration::from_secs(60));
        let mut t = Tracker::new(HealthStatus::Healthy, true, &c, now);
        assert_eq!(t.observe(FAIL, now), None);
        assert_eq!(t.observe(FAIL, now), None);
        let mut resumed = Tracker::resume(t.status(), t.confirmed(), Some(t.progress()), &c, now);
        let down = resumed.observe(FAIL, now).expect("third failure in a row");
        assert_eq!(down.reason, "http 503 (3 in a row)");
        let mut fresh = Tracker::new(t.status(), t.confirmed(), &c, now);
        assert_eq!(fresh.observe(FAIL, now), None, "a new tracker starts over");

        // Starting since `now`; restarted 50 s later with the same 60 s grace.
        let mut t = Tracker::new(HealthStatus::Healthy, false, &c, now);
        t.observe(FAIL, now).expect("starting");
        let later = now + Duration::from_secs(50);
        let mut resumed = Tracker::resume(t.status(), false, Some(t.progress()), &c, later);
        let out = resumed
            .observe(FAIL, now + Duration::from_secs(61))
            .expect("the first grace period is over");
        assert_eq!(out.to, HealthStatus::Unhealthy);
        let mut fresh = Tracker::new(t.status(), false, &c, later);
        assert_eq!(
            fresh.observe(FAIL, now + Duration::from_secs(61)),
            None,
            "a new tracker would grant a new grace period"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn starting_turns_unhealthy_once_the_grace_is_over() {
        let now = Instant::now();
        let mut t = Tracker::new(
            HealthStatus::Healthy,
            false,
            &config(2, 3, Duration::from_secs(60)),
            now,
        );
        t.observe(FAIL, now);
        let late = t
            .observe(FAIL, now + Duration::from_secs(61))
            .expect("grace over");
        assert_eq!(
            (late.from, late.to),
            (HealthStatus::Starting, HealthStatus::Unhealthy)
        );
        assert_eq!(
            late.reason,
            "no pass within startup_grace 1m; last: http 503"
        );
        // Without a grace, the first failure is unhealthy straight away.
        let mut t = Tracker::new(
            HealthStatus::Healthy,
            false,
            &config(2, 3, Duration::ZERO),
            now,
        );
        assert_eq!(
            t.observe(FAIL, now).map(|t| t.to),
            Some(HealthStatus::Unhealthy)
        );
    }
}
