//! Health: active checks, passive ejection, slow start and load-following weights, the four
//! things that move a backend's effective weight without an operator.
//!
//! - [`probe`]: one TCP connect or HTTP GET, judged.
//! - [`passive`]: ejection on consecutive connect failures of live traffic, doubling.
//! - [`slow_start`]: the linear weight ramp after a backend comes (back) into rotation.
//! - [`load`]: a Prometheus gauge, smoothed, turned into a load factor.
//! - [`HealthState`]: one backend's verdict, ejection and ramp, as the state machine they form.
//!
//! This module knows nothing of snapshots or the live-state registry. The tasks that run the
//! checks (`control::checker`, one per backend) and the supervisor that owns them and every
//! ejection and ramp deadline (`control::supervisor`) belong to the control plane, the only
//! writer of snapshots.
//!
//! All results land in the backend's live state (`state::BackendState`), where
//! `effective_weight` combines them: configured weight × (0 if unhealthy or ejected) × slow-start
//! ramp × load factor, with an operator's drain above everything. Changes reach the connection
//! path only through a rebuilt snapshot: a checker that changes state asks the control task to
//! republish, never touches the snapshot itself.
//!
//! **A new backend starts healthy**, as in HAProxy and Envoy's defaults and Pingora: restarting
//! the balancer (or adding a backend) must not black-hole traffic for rise × interval. The
//! presumption lasts until the first probe answers: a first failure takes the backend out at
//! once (it is *starting*, or *unhealthy* once `startup_grace` is over), a first pass confirms
//! it. From then on rise and fall apply.

pub(crate) mod load;
pub(crate) mod passive;
pub(crate) mod probe;
pub(crate) mod slow_start;
pub(crate) mod tracker;

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use passive::Ejections;
pub use probe::ProbeError;
use slow_start::Ramp;

/// What the active checks say about a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HealthStatus {
    /// Takes connections. Where every backend starts (see the module docs).
    #[default]
    Healthy,
    /// Has never passed and is within `startup_grace`: takes no connections, and its failures
    /// are a slow start-up, not a flap.
    Starting,
    /// Failed `fall` probes in a row (or never passed within `startup_grace`): takes no
    /// connections until it passes `rise` in a row.
    Unhealthy,
}

impl HealthStatus {
    /// `healthy`, `starting` or `unhealthy`.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Healthy => "healthy",
            HealthStatus::Starting => "starting",
            HealthStatus::Unhealthy => "unhealthy",
        }
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The latest probe of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastCheck {
    /// When it finished.
    pub at: Instant,
    /// Pass, or why it failed.
    pub result: Result<(), ProbeError>,
}

/// A point-in-time copy of a backend's health, for status pages and metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Health {
    /// What the active checks say.
    pub status: HealthStatus,
    /// True while passive ejection keeps the backend out.
    pub ejected: bool,
    /// When the current ejection ends.
    pub ejected_until: Option<Instant>,
    /// Ejections in a row; the next one lasts `eject_for` × 2^this (capped at 5 minutes).
    pub ejections: u32,
    /// Failed connects from live traffic since the last successful one.
    pub consecutive_connect_failures: u64,
    /// The latest probe, if any ran.
    pub last_check: Option<LastCheck>,
    /// The smoothed load metric, while scrapes succeed.
    pub load_value: Option<f64>,
    /// The load factor in force (1 when load is not configured or not known).
    pub load_factor: f64,
    /// The slow-start ramp's share of the weight while a ramp runs (0.05..1), `None` otherwise.
    pub slow_start: Option<f64>,
}

impl Health {
    /// True when health and passive checks let the backend take connections.
    pub fn in_rotation(&self) -> bool {
        self.status == HealthStatus::Healthy && !self.ejected
    }
}

/// The health part of a backend's live state. Written by checkers and the control task, read
/// when a snapshot is built and by status readers; never touched by the connection path.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HealthState {
    pub(crate) status: HealthStatus,
    /// True once a probe has passed since the backend was added: the start-healthy presumption
    /// has been confirmed.
    pub(crate) confirmed: bool,
    pub(crate) last_check: Option<LastCheck>,
    /// Streaks and grace start of the active checks, for a restarted checker to resume.
    pub(crate) progress: Option<tracker::Progress>,
    pub(crate) ejections: Ejections,
    pub(crate) ramp: Option<Ramp>,
    pub(crate) load_value: Option<f64>,
    pub(crate) load_factor: f64,
}

impl Default for HealthState {
    fn default() -> HealthState {
        HealthState {
            status: HealthStatus::Healthy,
            confirmed: false,
            last_check: None,
            progress: None,
            ejections: Ejections::default(),
            ramp: None,
            load_value: None,
            load_factor: 1.0,
        }
    }
}

impl HealthState {
    /// True when neither health nor ejection keeps the backend out at `now`.
    pub(crate) fn in_rotation(&self, now: Instant) -> bool {
        self.status == HealthStatus::Healthy && !self.ejections.is_ejected(now)
    }

    /// The part of the configured weight the backend may use at `now` if in rotation:
    /// slow-start ramp × load factor.
    pub(crate) fn weight_factor(&self, now: Instant) -> f64 {
        let ramp = self.ramp.map_or(1.0, |r| r.factor(now));
        ramp * self.load_factor
    }

    /// Starts a slow-start ramp at `now` if one is configured.
    pub(crate) fn start_ramp(&mut self, now: Instant, slow_start: Option<Duration>) {
        self.ramp = slow_start.map(|window| Ramp { start: now, window });
    }

    pub(crate) fn snapshot(&self, now: Instant, consecutive_connect_failures: u64) -> Health {
        Health {
            status: self.status,
            ejected: self.ejections.is_ejected(now),
            ejected_until: self.ejections.until().filter(|&until| now < until),
            ejections: self.ejections.streak(),
            consecutive_connect_failures,
            last_check: self.last_check,
            load_value: self.load_value,
            load_factor: self.load_factor,
            slow_start: self.ramp.filter(|r| !r.is_over(now)).map(|r| r.factor(now)),
        }
    }
}
