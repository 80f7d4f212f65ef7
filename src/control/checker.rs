//! One backend's checker task: the probe schedule, feeding results to its rise/fall state
//! machine (`health::tracker`), and the load scraper beside it.
//!
//! Schedule: the first probe comes at a random point within the first tenth of an interval (a new
//! backend is presumed healthy until then, so that presumption is checked soon), and each next one
//! `interval` ± 10 % after the previous one started (HAProxy's `spread-checks`): the random walk
//! spreads a fleet's probes within a few rounds, so they never stay lined up, however many
//! backends start at once. A probe that outlasts the
//! interval delays the next one rather than overlapping it. Detection of a dead backend therefore
//! takes about fall × interval, plus up to one timeout when probes hang rather than fail fast.
//!
//! The task only writes the backend's health state and asks the control task to republish; the
//! snapshot itself is never touched here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::RngExt;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::config::{HealthConfig, LoadConfig, ProxyVersion};
use crate::health::load::{self, HOLD_SCRAPES, LoadTracker};
use crate::health::probe;
use crate::health::tracker::Tracker;
use crate::health::{HealthStatus, LastCheck};
use crate::state::{BackendState, Republisher};

/// Largest deviation of one probe interval from the configured one, as a fraction.
const JITTER: f64 = 0.1;

/// The backend a checker task works for.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) pool: Arc<str>,
    /// The backend's address (for logs).
    pub(crate) addr: SocketAddr,
    /// Where probes go: `health_addr`, else `addr`.
    pub(crate) probe_addr: SocketAddr,
    /// The backend's connections start with a PROXY header of this version.
    pub(crate) proxy: Option<ProxyVersion>,
    pub(crate) state: Arc<BackendState>,
    pub(crate) republisher: Republisher,
}

impl Target {
    /// What a probe or scrape to `to` sends first: a LOCAL header when `to` is the backend's
    /// own address and its connections carry one. A `health_addr` or a load `port` elsewhere
    /// (a sidecar, a metrics port) is spoken to plainly.
    fn preamble(&self, to: SocketAddr) -> Option<&'static [u8]> {
        let version = self.proxy?;
        (to == self.addr).then(|| version.local_header())
    }
}

/// Probes (and scrapes, when load is configured) `target` forever; the supervisor ends it by
/// dropping the future, which closes any probe socket at once.
pub(crate) async fn run(target: Target, config: HealthConfig) {
    let probes = probe_loop(&target, &config);
    match &config.load {
        Some(load) => {
            tokio::join!(probes, load_loop(&target, load, config.timeout));
        }
        None => probes.await,
    }
}

async fn probe_loop(target: &Target, config: &HealthConfig) {
    let mut tracker = target.state.with_health(|h| {
        let tracker = Tracker::resume(h.status, h.confirmed, h.progress, config, Instant::now());
        // Stored at once: a reload before the first probe must not restart the grace period.
        h.progress = Some(tracker.progress());
        tracker
    });
    let mut next = Instant::now() + first_delay(config.interval);
    loop {
        tokio::time::sleep_until(next).await;
        let started = Instant::now();
        let result = probe::run(
            &config.probe,
            target.probe_addr,
            target.preamble(target.probe_addr),
            config.timeout,
        )
        .await;
        let now = Instant::now();
        if let Err(e) = result {
            debug!(pool = %target.pool, backend = %target.addr, reason = %e, "probe failed");
        }
        let transition = tracker.observe(result, now);
        target.state.with_health(|h| {
            h.last_check = Some(LastCheck { at: now, result });
            h.confirmed = tracker.confirmed();
            h.progress = Some(tracker.progress());
            if let Some(t) = &transition {
                h.status = t.to;
                match t.to {
                    HealthStatus::Healthy => h.start_ramp(now, config.slow_start),
                    _ => h.ramp = None,
                }
            }
        });
        if let Some(t) = transition {
            info!(
                pool = %target.pool,
                backend = %target.addr,
                from = t.from.as_str(),
                to = t.to.as_str(),
                reason = %t.reason,
                "backend health changed"
            );
            target.republisher.republish();
        }
        next = (started + jittered(config.interval)).max(now);
    }
}

async fn load_loop(target: &Target, config: &LoadConfig, timeout: Duration) {
    let addr = config.port.map_or(target.probe_addr, |port| {
        SocketAddr::new(target.probe_addr.ip(), port)
    });
    let (smoothed, factor) = target.state.with_health(|h| (h.load_value, h.load_factor));
    let mut tracker = LoadTracker::resume(config, smoothed, factor);
    let mut next = Instant::now() + first_delay(config.interval);
    // When the server last reported its requests in flight.
    let mut reported_at: Option<Instant> = None;
    loop {
        tokio::time::sleep_until(next).await;
        let started = Instant::now();
        match load::scrape(addr, target.preamble(addr), config, timeout).await {
            Ok(scraped) => {
                let value = scraped.value;
                if tracker.failures() >= HOLD_SCRAPES {
                    info!(pool = %target.pool, backend = %target.addr, value, "load reported again");
                }
                tracker.observe(value);
                if let Some(in_flight) = scraped.in_flight {
                    reported_at = Some(Instant::now());
                    let state = &target.state;
                    let before = state.load_estimate();
                    state.set_reported_in_flight(in_flight, state.active());
                    if state.load_estimate() < before {
                        slots_freed(target);
                    }
                }
            }
            Err(e) => {
                if tracker.fail() {
                    warn!(
                        pool = %target.pool,
                        backend = %target.addr,
                        scrape = %addr,
                        reason = %e,
                        failures = HOLD_SCRAPES,
                        "load scrapes failing; load factor back to 1"
                    );
                } else {
                    debug!(pool = %target.pool, backend = %target.addr, reason = %e, "load scrape failed");
                }
            }
        }
        // A report too old to count: the estimate is this balancer's connections again.
        if reported_at.is_some_and(|at| at.elapsed() > config.interval * HOLD_SCRAPES) {
            reported_at = None;
            let state = &target.state;
            let before = state.load_estimate();
            state.clear_reported_in_flight();
            debug!(pool = %target.pool, backend = %target.addr, "no fresh in-flight report; estimating from own connections");
            if state.load_estimate() < before {
                slots_freed(target);
            }
        }
        let (value, factor) = (tracker.smoothed(), tracker.factor());
        let changed = target.state.with_health(|h| {
            h.load_value = value;
            let changed = h.load_factor != factor;
            h.load_factor = factor;
            changed
        });
        if changed {
            debug!(pool = %target.pool, backend = %target.addr, factor, ?value, "load factor changed");
            target.republisher.republish();
        }
        next = (started + jittered(config.interval)).max(Instant::now());
    }
}

/// The backend's load estimate fell: clients waiting in its pool may fit now. The control task
/// serves queues after each rebuild; without waiting clients there is nothing to serve.
fn slots_freed(target: &Target) {
    if target.state.pool_waiting() > 0 {
        target.republisher.republish();
    }
}

/// A random point within the first [`JITTER`] of an interval.
fn first_delay(interval: Duration) -> Duration {
    interval.mul_f64(rand::rng().random_range(0.0..JITTER))
}

/// `interval` ± [`JITTER`].
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(rand::rng().random_range(1.0 - JITTER..=1.0 + JITTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_ten_percent() {
        let interval = Duration::from_secs(2);
        for _ in 0..1000 {
            let j = jittered(interval);
            assert!(
                j >= Duration::from_millis(1800) && j <= Duration::from_millis(2200),
                "{j:?}"
            );
            assert!(first_delay(interval) < interval / 10);
        }
    }
}
