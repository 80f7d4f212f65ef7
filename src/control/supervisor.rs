//! The health supervisor: owns every checker task, applies passive ejections and keeps the
//! deadlines (ejection ends, slow-start steps) at which effective weights change by themselves.
//!
//! It lives inside the control task and is driven by it: [`sync`](Supervisor::sync) after the
//! start and after every applied reload, [`update`](Supervisor::update) whenever the control task
//! wakes, and [`next_deadline`](Supervisor::next_deadline) tells the control task when to wake
//! next (it sleeps until the earliest deadline, never on a fixed tick). So ejections, their ends
//! and ramp steps are all applied by the one task that publishes snapshots.
//!
//! One checker task per (pool, backend) with active checks; each has its own cancellation
//! token, and all are tracked by one `TaskTracker` whose length is the number of live checkers.
//! A backend that leaves the configuration has its task cancelled, which drops any probe in
//! flight with its socket: nothing keeps running, connecting or sleeping for it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use super::checker::{self, Target};
use crate::config::{Config, HealthConfig, PassiveConfig, ProxyVersion};
use crate::health::{HealthState, HealthStatus};
use crate::state::{BackendState, Registry, Republisher};

/// What a backend is watched with; a change restarts its checker.
#[derive(Debug, Clone, PartialEq)]
struct Spec {
    health: Option<HealthConfig>,
    passive: Option<PassiveConfig>,
    probe_addr: SocketAddr,
    /// The header probes and scrapes of the backend's own address start with, when its
    /// connections carry one.
    proxy: Option<ProxyVersion>,
}

#[derive(Debug)]
struct Watch {
    spec: Spec,
    state: Arc<BackendState>,
    /// Cancels the checker task, if one runs.
    checker: Option<CancellationToken>,
}

/// Every watched backend of a running balancer.
#[derive(Debug)]
pub(crate) struct Supervisor {
    watches: HashMap<(Arc<str>, SocketAddr), Watch>,
    tasks: TaskTracker,
    stop: CancellationToken,
    republisher: Republisher,
}

impl Supervisor {
    /// A supervisor whose tasks run on `tasks` and all stop when `stop` is cancelled.
    pub(crate) fn new(
        tasks: TaskTracker,
        stop: CancellationToken,
        republisher: Republisher,
    ) -> Supervisor {
        Supervisor {
            watches: HashMap::new(),
            tasks,
            stop,
            republisher,
        }
    }

    /// Makes the watched set match `config`: starts checkers for new backends, stops those of
    /// removed ones, restarts those whose pool's health settings (or `health_addr`)
    /// changed. New backends start a slow-start ramp when their pool has one.
    pub(crate) fn sync(&mut self, config: &Config, registry: &Registry) {
        let now = Instant::now();
        let mut wanted: HashMap<(Arc<str>, SocketAddr), Spec> = HashMap::new();
        for pool in &config.pools {
            if pool.health.is_none() && pool.passive.is_none() {
                continue;
            }
            let name: Arc<str> = pool.name.as_str().into();
            for backend in &pool.backends {
                let spec = Spec {
                    health: pool.health.clone(),
                    passive: pool.passive,
                    probe_addr: backend.probe_addr(),
                    proxy: config.send_proxy(pool, backend),
                };
                wanted.insert((Arc::clone(&name), backend.addr), spec);
            }
        }
        // Stop what is no longer wanted (or wanted differently); forget what it set.
        let stale: Vec<(Arc<str>, SocketAddr)> = self
            .watches
            .iter()
            .filter(|(key, watch)| wanted.get(*key) != Some(&watch.spec))
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            let Some(watch) = self.watches.remove(&key) else {
                continue;
            };
            if let Some(checker) = &watch.checker {
                checker.cancel();
            }
            let next = wanted.get(&key);
            watch.state.with_health(|h| forget(h, &watch.spec, next));
            if next.is_none_or(|n| n.health.as_ref().is_none_or(|h| h.load.is_none())) {
                watch.state.clear_reported_in_flight();
            }
            debug!(pool = %key.0, backend = %key.1, restarted = next.is_some(), "checker stopped");
            if let Some(spec) = next {
                self.start(key, spec.clone(), registry, None);
            }
        }
        // Start what is new: a backend added (or the balancer starting) ramps up.
        for (key, spec) in wanted {
            if !self.watches.contains_key(&key) {
                let ramp_from = spec
                    .health
                    .as_ref()
                    .and_then(|h| h.slow_start)
                    .map(|w| (now, w));
                self.start(key, spec, registry, ramp_from);
            }
        }
    }

    fn start(
        &mut self,
        key: (Arc<str>, SocketAddr),
        spec: Spec,
        registry: &Registry,
        ramp_from: Option<(Instant, std::time::Duration)>,
    ) {
        let state = registry.backend(&key.0, key.1);
        if let Some((now, window)) = ramp_from {
            state.with_health(|h| h.start_ramp(now, Some(window)));
        }
        let checker = spec.health.clone().map(|health| {
            let token = self.stop.child_token();
            let target = Target {
                pool: Arc::clone(&key.0),
                addr: key.1,
                probe_addr: spec.probe_addr,
                proxy: spec.proxy,
                state: Arc::clone(&state),
                republisher: self.republisher.clone(),
            };
            let cancelled = token.clone();
            self.tasks.spawn(async move {
                // Cancellation first: once `sync` has stopped a checker (and `forget` has reset
                // what it set), a probe finishing in the same poll must not write its verdict.
                tokio::select! {
                    biased;
                    () = cancelled.cancelled() => {}
                    () = checker::run(target, health) => {}
                }
            });
            token
        });
        debug!(pool = %key.0, backend = %key.1, active = checker.is_some(), "watching backend");
        self.watches.insert(
            key,
            Watch {
                spec,
                state,
                checker,
            },
        );
    }

    /// Applies what is due at `now`: ejects backends whose connect failures reached the
    /// threshold, ends ejections whose time is over (starting a ramp), drops finished ramps.
    /// Returns true when an effective weight may have changed.
    pub(crate) fn update(&mut self, now: Instant) -> bool {
        let mut changed = false;
        for ((pool, addr), watch) in &self.watches {
            let slow_start = watch.spec.health.as_ref().and_then(|h| h.slow_start);
            let mut failures = watch.state.consecutive_connect_failures();
            watch.state.with_health(|h| {
                if h.ejections.expire(now) {
                    // Connects begun before the ejection kept failing (and counting) during it:
                    // the backend comes back with a clean slate, not ejected again at once for
                    // what it did while it was out.
                    watch.state.reset_consecutive_failures();
                    failures = 0;
                    info!(
                        pool = %pool,
                        backend = %addr,
                        from = "ejected",
                        to = "in rotation",
                        reason = %format!("ejected for {} is over", humantime::format_duration(h.ejections.last_length())),
                        "backend ejection ended"
                    );
                    h.start_ramp(now, slow_start);
                    changed = true;
                }
                if let Some(passive) = watch.spec.passive {
                    let max = u64::from(passive.max_connect_failures.get());
                    if failures >= max && !h.ejections.is_ejected(now) {
                        // The streak stays until the ejection ends: until then it keeps
                        // the backend's slots from being offered by a snapshot built before
                        // the ejection (see `Backend::ejecting`).
                        let length = h.ejections.eject(now, passive.eject_for);
                        h.ramp = None;
                        info!(
                            pool = %pool,
                            backend = %addr,
                            from = "in rotation",
                            to = "ejected",
                            reason = %format!("{failures} connect failures"),
                            eject_for = %humantime::format_duration(length),
                            "backend ejected"
                        );
                        changed = true;
                    }
                }
                if h.ramp.is_some_and(|r| r.is_over(now)) {
                    h.ramp = None;
                }
            });
        }
        changed
    }

    /// The earliest instant after `now` at which an effective weight changes by itself: an
    /// ejection ends or a slow-start ramp takes its next step.
    pub(crate) fn next_deadline(&self, now: Instant) -> Option<Instant> {
        self.watches
            .values()
            .filter_map(|watch| {
                watch.state.with_health(|h| {
                    let ejection = h.ejections.until();
                    let ramp = h.ramp.and_then(|r| r.next_step(now));
                    match (ejection, ramp) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    }
                })
            })
            .min()
    }

    /// Stops every checker and waits for them to end.
    pub(crate) async fn shutdown(&mut self) {
        self.stop.cancel();
        self.watches.clear();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Resets what a watch set when it stops, as far as the next spec (if any) no longer covers it:
/// without active checks a backend is presumed healthy again, without load reports its factor
/// is 1, without passive checks it is not ejected.
fn forget(h: &mut HealthState, old: &Spec, next: Option<&Spec>) {
    let health_kept = next.is_some_and(|n| n.health.is_some());
    let load_kept = next.is_some_and(|n| n.health.as_ref().is_some_and(|h| h.load.is_some()));
    let passive_kept = next.is_some_and(|n| n.passive.is_some());
    if old.health.is_some() && !health_kept {
        h.status = HealthStatus::Healthy;
        h.confirmed = false;
        h.last_check = None;
        h.progress = None;
        h.ramp = None;
    }
    if !load_kept {
        h.load_value = None;
        h.load_factor = 1.0;
    }
    if old.passive.is_some() && !passive_kept {
        h.ejections.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Duration;

    fn config(tables: &str) -> Config {
        let text = format!(
            "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\n{tables}\n\
             [[listener.backend]]\naddr = \"127.0.0.1:9001\"\n\
             [[listener.backend]]\naddr = \"127.0.0.1:9002\"\n"
        );
        crate::config::parse(&text, Path::new("t.toml")).expect("valid test config")
    }

    fn supervisor() -> Supervisor {
        Supervisor::new(
            TaskTracker::new(),
            CancellationToken::new(),
            Republisher::default(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn connect_failures_eject_and_the_deadline_brings_the_backend_back() {
        let registry = Registry::default();
        let mut s = supervisor();
        s.sync(
            &config("[listener.passive]\nmax_connect_failures = 2\neject_for = \"10s\""),
            &registry,
        );
        let addr: SocketAddr = "127.0.0.1:9001".parse().expect("literal");
        let state = registry.backend("a", addr);
        let now = Instant::now();
        assert!(!s.update(now));
        assert_eq!(s.next_deadline(now), None);
        state.record_connect_failure();
        assert!(!s.update(now), "one failure is not enough");
        state.record_connect_failure();
        assert!(s.update(now), "two eject");
        assert!(!state.in_rotation_at(now));
        assert_eq!(
            state.consecutive_connect_failures(),
            2,
            "the streak lasts as long as the ejection"
        );
        // Connects begun before the ejection fail while it lasts.
        for _ in 0..3 {
            state.record_connect_failure();
        }
        let back = now + Duration::from_secs(10);
        assert_eq!(s.next_deadline(now), Some(back));
        assert!(s.update(back), "the ejection ends at its deadline");
        assert!(
            state.in_rotation_at(back),
            "failures counted while ejected do not eject it again"
        );
        assert_eq!(state.consecutive_connect_failures(), 0);
        assert_eq!(s.next_deadline(back), None);
        // No active checks, so no checker task.
        assert_eq!(s.tasks.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn checkers_follow_the_configuration_and_turning_checks_off_forgets_their_verdicts() {
        let registry = Registry::default();
        let mut s = supervisor();
        let checked =
            config("[listener.health]\nkind = \"tcp\"\ninterval = \"1h\"\nslow_start = \"10s\"");
        s.sync(&checked, &registry);
        assert_eq!(s.tasks.len(), 2);
        let addr: SocketAddr = "127.0.0.1:9002".parse().expect("literal");
        let state = registry.backend("a", addr);
        // New backends ramp: the deadline is the ramp's next step.
        let now = Instant::now();
        assert_eq!(s.next_deadline(now), Some(now + Duration::from_secs(1)));
        state.with_health(|h| h.status = HealthStatus::Unhealthy);
        // The same configuration again changes nothing.
        s.sync(&checked, &registry);
        assert_eq!(s.tasks.len(), 2);
        assert!(!state.in_rotation_at(now));
        // Checks switched off: tasks end and the backend is presumed healthy again.
        s.sync(&config(""), &registry);
        tokio::task::yield_now().await;
        assert_eq!(s.tasks.len(), 0);
        assert!(state.in_rotation_at(now));
        s.shutdown().await;
    }
}
