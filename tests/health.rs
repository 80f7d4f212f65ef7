//! Health checks that move weights live, end to end over loopback: active HTTP probes against
//! the mock inference server of `examples/mock_inference.rs`, passive ejection, slow start,
//! `all_unhealthy`, load-following weights, and checkers that end with their backend.
//!
//! Intervals are tens of milliseconds so the file runs in seconds; every wait is a poll with a
//! deadline, and bounds on measured times carry a slack for a busy two-core machine.

#[allow(dead_code)] // Only `Mock` and its options are used here, not the example's `main`.
#[path = "../examples/mock_inference.rs"]
mod mock_inference;
mod support;

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use mock_inference::{Mock, MockOptions};
use support::{LISTENER, Refusing, Running, bounded, eventually, start_balancer};
use weighbridge::{Config, Health, HealthStatus, ProbeError};

/// Overall bound on each test.
const LIMIT: Duration = Duration::from_secs(60);
/// Upper bound on one request through the balancer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound on something that should happen within a few probe intervals.
const SOON: Duration = Duration::from_secs(10);
/// Probe interval of most tests.
const INTERVAL: Duration = Duration::from_millis(50);
/// Probe timeout of most tests: twice the interval, so a loaded machine does not fail probes.
const TIMEOUT: Duration = Duration::from_millis(100);
/// Allowance for scheduling delays on a shared two-core machine, added to computed bounds.
const SLACK: Duration = Duration::from_millis(400);

/// One backend of a test config.
struct Backend {
    addr: SocketAddr,
    weight: f64,
    health_addr: Option<SocketAddr>,
}

fn backend(addr: SocketAddr) -> Backend {
    Backend {
        addr,
        weight: 1.0,
        health_addr: None,
    }
}

/// A config with listener [`LISTENER`]; `tables` holds `[listener.health]` and friends.
fn config_text(strategy: &str, tables: &str, backends: &[Backend]) -> String {
    let mut text = format!(
        "shutdown_grace = \"2s\"\n[[listener]]\nname = \"{LISTENER}\"\nbind = \"127.0.0.1:0\"\n\
         strategy = \"{strategy}\"\nconnect_timeout = \"1s\"\n{tables}\n"
    );
    for b in backends {
        text += &format!(
            "[[listener.backend]]\naddr = \"{}\"\nweight = {:?}\n",
            b.addr, b.weight
        );
        if let Some(health_addr) = b.health_addr {
            text += &format!("health_addr = \"{health_addr}\"\n");
        }
    }
    text
}

/// `[listener.health]` with the test interval and timeout, plus `extra` lines.
fn health(extra: &str) -> String {
    format!(
        "[listener.health]\nkind = \"http\"\npath = \"/health\"\ninterval = \"{}ms\"\n\
         timeout = \"{}ms\"\nrise = 2\nfall = 3\n{extra}\n",
        INTERVAL.as_millis(),
        TIMEOUT.as_millis()
    )
}

async fn mock(options: MockOptions) -> Mock {
    Mock::start(SocketAddr::from(([127, 0, 0, 1], 0)), options)
        .await
        .expect("start a mock inference server on loopback")
}

async fn mocks(n: usize) -> Vec<Mock> {
    let mut all = Vec::with_capacity(n);
    for _ in 0..n {
        all.push(mock(MockOptions::default()).await);
    }
    all
}

/// GETs `/` through the balancer and returns who served it; `None` when the balancer closed the
/// connection without an answer.
async fn fetch(balancer: SocketAddr) -> Option<SocketAddr> {
    let exchange = async {
        let mut stream = TcpStream::connect(balancer).await?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        io::Result::Ok(answer)
    };
    let answer = match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
        Ok(Ok(answer)) => answer,
        // Closed at once (all_unhealthy = "reject"): the request may meet a reset.
        Ok(Err(e))
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
            ) =>
        {
            return None;
        }
        Ok(Err(e)) => panic!("request through the balancer failed: {e}"),
        Err(_) => panic!("no answer through the balancer within {REQUEST_TIMEOUT:?}"),
    };
    let text = String::from_utf8_lossy(&answer);
    let served = text.split("served by ").nth(1)?;
    let addr = served.lines().next().unwrap_or_default();
    Some(
        addr.parse()
            .unwrap_or_else(|_| panic!("bad answer {text:?}")),
    )
}

/// How many of `n` sequential requests each of `backends` served.
async fn spread(balancer: SocketAddr, backends: &[SocketAddr], n: usize) -> Vec<usize> {
    let mut counts = vec![0; backends.len()];
    for _ in 0..n {
        let served = fetch(balancer).await.expect("a backend answers");
        let index = backends
            .iter()
            .position(|&b| b == served)
            .unwrap_or_else(|| panic!("served by unknown backend {served}"));
        counts[index] += 1;
    }
    counts
}

fn health_of(lb: &Running, addr: SocketAddr) -> Health {
    lb.handle
        .backend_health(LISTENER, addr)
        .unwrap_or_else(|| panic!("backend {addr} is configured"))
}

fn status(lb: &Running, addr: SocketAddr) -> HealthStatus {
    health_of(lb, addr).status
}

/// Connect attempts the balancer made to `addr`, successful or not.
fn attempts(lb: &Running, addr: SocketAddr) -> u64 {
    let c = lb.backend(addr);
    c.connections + c.connect_failures
}

/// Waits until `addr` has `want` status; returns how long that took.
async fn until_status(lb: &Running, addr: SocketAddr, want: HealthStatus) -> Duration {
    let started = Instant::now();
    eventually(SOON, &format!("{addr} {want}"), || status(lb, addr) == want).await;
    started.elapsed()
}

/// The effective weight of `addr` in the snapshot in force.
fn effective_weight(lb: &Running, addr: SocketAddr) -> f64 {
    let weights = lb.handle.effective_weights(LISTENER).expect("listener lb");
    weights
        .iter()
        .find(|(backend, _)| *backend == addr)
        .map_or(0.0, |(_, weight)| *weight)
}

/// Waits until the snapshot in force gives `addr` no weight (a status change reaches the
/// snapshot when the control task has rebuilt it, a moment after the checker saw it).
async fn until_out(lb: &Running, addr: SocketAddr) {
    eventually(
        SOON,
        &format!("{addr} out of the snapshot's rotation"),
        || effective_weight(lb, addr) == 0.0,
    )
    .await;
}

/// Waits until the snapshot in force gives `addr` its full configured weight of 1.
async fn until_in(lb: &Running, addr: SocketAddr) {
    eventually(
        SOON,
        &format!("{addr} at full weight in the snapshot"),
        || effective_weight(lb, addr) == 1.0,
    )
    .await;
}

/// Waits until every backend's presumed health has been confirmed by a passing probe.
async fn until_confirmed(lb: &Running, addrs: &[SocketAddr]) {
    eventually(SOON, "every backend passed a probe", || {
        addrs.iter().all(|&a| {
            let h = health_of(lb, a);
            h.status == HealthStatus::Healthy && h.last_check.is_some_and(|c| c.result.is_ok())
        })
    })
    .await;
}

#[tokio::test]
async fn killed_backend_gets_no_connections_after_fall_intervals_and_returns_after_rise() {
    bounded(LIMIT, async {
        let mut servers = mocks(3).await;
        let addrs: Vec<SocketAddr> = servers.iter().map(Mock::addr).collect();
        let backends: Vec<Backend> = addrs.iter().map(|&a| backend(a)).collect();
        let lb = start_balancer(&config_text("weighted_round_robin", &health(""), &backends));
        until_confirmed(&lb, &addrs).await;

        let dead = addrs[1];
        servers[1].kill().await;
        let detection = until_status(&lb, dead, HealthStatus::Unhealthy).await;
        // fall = 3 probes, each interval ± 10 % apart; refused connects fail fast.
        let bound = INTERVAL.mul_f64(3.0 * 1.1) + TIMEOUT + SLACK;
        eprintln!("dead backend detected after {detection:?} (fall x interval = 150ms; bound {bound:?})");
        assert!(detection <= bound, "detection took {detection:?}");
        let last = health_of(&lb, dead).last_check.expect("probed");
        assert_eq!(last.result, Err(ProbeError::Connect(io::ErrorKind::ConnectionRefused)));

        until_out(&lb, dead).await;
        let before = attempts(&lb, dead);
        let counts = spread(lb.addr, &[addrs[0], addrs[2]], 200).await;
        assert_eq!(counts.iter().sum::<usize>(), 200, "every request answered");
        assert_eq!(attempts(&lb, dead), before, "no connection went to the dead backend");

        // Back on the same port: healthy after rise = 2 passing probes.
        servers[1] = Mock::start(dead, MockOptions::default())
            .await
            .expect("restart the backend on its port");
        let recovery = until_status(&lb, dead, HealthStatus::Healthy).await;
        let bound = INTERVAL.mul_f64(2.0 * 1.1) + TIMEOUT + SLACK;
        eprintln!("restarted backend healthy after {recovery:?} (rise x interval = 100ms; bound {bound:?})");
        assert!(recovery <= bound, "recovery took {recovery:?}");
        until_in(&lb, dead).await;
        let counts = spread(lb.addr, &addrs, 30).await;
        // Equal weights: round robin, exact unless a rebuild restarts the cycle meanwhile.
        assert!(counts.iter().all(|&c| c.abs_diff(10) <= 2), "{counts:?}");
        lb.stop().await;
    })
    .await;
}

#[tokio::test]
async fn http_probes_fail_on_status_body_hang_and_refusal_and_pass_on_200() {
    bounded(LIMIT, async {
        let mut servers = mocks(5).await;
        let addrs: Vec<SocketAddr> = servers.iter().map(Mock::addr).collect();
        let backends: Vec<Backend> = addrs.iter().map(|&a| backend(a)).collect();
        let tables = health("expect_status = [200]\nexpect_body = \"ok\"");
        let lb = start_balancer(&config_text("weighted_round_robin", &tables, &backends));
        until_confirmed(&lb, &addrs).await;

        let broken = Instant::now();
        servers[0].state().set_health_status(Some(503));
        servers[1]
            .state()
            .set_health_body(Some("{\"status\":\"degraded\"}"));
        servers[2].state().set_hang_health(true);
        servers[3].kill().await;
        let expected = [
            ProbeError::Status(503),
            ProbeError::BodyMismatch,
            ProbeError::Timeout(TIMEOUT),
            ProbeError::Connect(io::ErrorKind::ConnectionRefused),
        ];
        for (i, want) in expected.iter().enumerate() {
            until_status(&lb, addrs[i], HealthStatus::Unhealthy).await;
            eprintln!("{want}: unhealthy within {:?}", broken.elapsed());
            let last = health_of(&lb, addrs[i]).last_check.expect("probed");
            assert_eq!(last.result, Err(*want), "backend {i}");
            until_out(&lb, addrs[i]).await;
        }
        assert_eq!(status(&lb, addrs[4]), HealthStatus::Healthy);
        // Only the healthy one takes connections.
        assert_eq!(spread(lb.addr, &addrs, 20).await, [0, 0, 0, 0, 20]);

        servers[0].state().set_health_status(None);
        servers[1].state().set_health_body(None);
        servers[2].state().set_hang_health(false);
        servers[3] = Mock::start(addrs[3], MockOptions::default())
            .await
            .expect("restart the refusing backend");
        for &addr in &addrs {
            until_status(&lb, addr, HealthStatus::Healthy).await;
            until_in(&lb, addr).await;
        }
        let counts = spread(lb.addr, &addrs, 25).await;
        assert!(counts.iter().all(|&c| c.abs_diff(5) <= 2), "{counts:?}");
        lb.stop().await;
    })
    .await;
}

#[tokio::test]
async fn health_addr_is_probed_instead_of_the_serving_address() {
    bounded(LIMIT, async {
        let serving = mock(MockOptions::default()).await;
        let probed = mock(MockOptions::default()).await;
        let other = mock(MockOptions::default()).await;
        let backends = [
            Backend {
                addr: serving.addr(),
                weight: 1.0,
                health_addr: Some(probed.addr()),
            },
            backend(other.addr()),
        ];
        let lb = start_balancer(&config_text("weighted_round_robin", &health(""), &backends));
        eventually(SOON, "a few probes of the health address", || {
            probed.state().health_probes() >= 3
        })
        .await;
        assert_eq!(
            serving.state().health_probes(),
            0,
            "the serving port is not probed"
        );
        // The health address says no: the backend goes, although its serving port is fine.
        until_confirmed(&lb, &[serving.addr()]).await;
        probed.state().set_health_status(Some(503));
        until_status(&lb, serving.addr(), HealthStatus::Unhealthy).await;
        until_out(&lb, serving.addr()).await;
        assert_eq!(
            spread(lb.addr, &[serving.addr(), other.addr()], 10).await,
            [0, 10]
        );
        lb.stop().await;
    })
    .await;
}

/// The share of the summed effective weights that backend `index` has in the current snapshot.
fn weight_share(lb: &Running, index: usize) -> f64 {
    let weights: Vec<f64> = (lb.handle.effective_weights(LISTENER).expect("listener lb"))
        .into_iter()
        .map(|(_, weight)| weight)
        .collect();
    weights[index] / weights.iter().sum::<f64>()
}

#[tokio::test]
async fn loading_server_gets_traffic_only_once_ready_then_ramps_up() {
    bounded(LIMIT, async {
        // llama.cpp answers 503 "Loading model" while it loads (3 s, scaled down here). Every
        // backend ramps when the balancer starts; the ready one's ramp is over before the
        // loader is ready, so the loader's share is its own ramp alone.
        let loading = Duration::from_millis(900);
        let slow_start = Duration::from_millis(600);
        let ready = mock(MockOptions::default()).await;
        let loader = mock(MockOptions {
            loading,
            ..MockOptions::default()
        })
        .await;
        let started = Instant::now();
        let addrs = [ready.addr(), loader.addr()];
        let tables = health(&format!("slow_start = \"{}ms\"", slow_start.as_millis()));
        let backends: Vec<Backend> = addrs.iter().map(|&a| backend(a)).collect();
        let lb = start_balancer(&config_text("weighted_random", &tables, &backends));

        // Its first probe fails: it is starting, not in rotation, not a flap.
        until_status(&lb, loader.addr(), HealthStatus::Starting).await;
        let last = health_of(&lb, loader.addr()).last_check.expect("probed");
        assert_eq!(last.result, Err(ProbeError::Status(503)));
        let served_while_presumed = loader.state().served();
        let mut during_load = 0;
        while started.elapsed() < loading {
            let served = fetch(lb.addr).await.expect("the ready backend answers");
            assert_eq!(served, ready.addr(), "a loading server gets no request");
            during_load += 1;
        }
        assert!(during_load > 0, "traffic flowed during the load ({during_load} requests)");
        assert_eq!(loader.state().served(), served_while_presumed);

        // Ready: rise passes bring it in, then its weight ramps over slow_start.
        until_status(&lb, loader.addr(), HealthStatus::Healthy).await;
        let ramp_started = Instant::now();
        let mut shares = Vec::new();
        let mut early = [0; 2];
        let mut late = [0; 2];
        while ramp_started.elapsed() < slow_start + Duration::from_millis(100) {
            shares.push(weight_share(&lb, 1));
            let served = fetch(lb.addr).await.expect("answered");
            let bucket = if ramp_started.elapsed() < slow_start / 3 {
                &mut early
            } else if ramp_started.elapsed() > slow_start * 2 / 3 {
                &mut late
            } else {
                continue;
            };
            bucket[usize::from(served == loader.addr())] += 1;
        }
        assert!(
            shares.windows(2).all(|w| w[1] >= w[0]),
            "weight shares only rise: {shares:?}"
        );
        // Below half weight (share 1/3) when first seen: a ramp, not a jump, even if this loop
        // was scheduled late.
        assert!(shares[0] < 0.34, "the ramp starts low: {}", shares[0]);
        let early_share = f64::from(early[1]) / f64::from(early[0] + early[1]);
        let late_share = f64::from(late[1]) / f64::from(late[0] + late[1]);
        eprintln!("loader's traffic share: first third of the ramp {early_share:.2}, last third {late_share:.2}");
        assert!(early_share < late_share, "traffic follows the ramp");
        eventually(SOON, "the ramp reaches full weight", || {
            health_of(&lb, loader.addr()).slow_start.is_none() && weight_share(&lb, 1) == 0.5
        })
        .await;
        lb.stop().await;
    })
    .await;
}

#[tokio::test]
async fn slow_start_shares_rise_monotonically_to_full_weight_after_recovery() {
    bounded(LIMIT, async {
        let slow_start = Duration::from_millis(1000);
        let mut servers = mocks(3).await;
        let addrs: Vec<SocketAddr> = servers.iter().map(Mock::addr).collect();
        let tables = health(&format!("slow_start = \"{}ms\"", slow_start.as_millis()));
        let backends: Vec<Backend> = addrs.iter().map(|&a| backend(a)).collect();
        let lb = start_balancer(&config_text("weighted_round_robin", &tables, &backends));
        until_confirmed(&lb, &addrs).await;
        // Every backend is new at start and ramps; those ramps are over before the test proper.
        for &addr in &addrs {
            until_in(&lb, addr).await;
        }

        servers[2].kill().await;
        until_status(&lb, addrs[2], HealthStatus::Unhealthy).await;
        assert_eq!(weight_share(&lb, 2), 0.0);
        servers[2] = Mock::start(addrs[2], MockOptions::default())
            .await
            .expect("restart the backend");
        until_status(&lb, addrs[2], HealthStatus::Healthy).await;
        eventually(SOON, "the ramp reaches the snapshot", || {
            weight_share(&lb, 2) > 0.0
        })
        .await;
        let ramp_started = Instant::now();
        let mut samples = Vec::new();
        while ramp_started.elapsed() < slow_start + Duration::from_millis(200) {
            samples.push((ramp_started.elapsed(), weight_share(&lb, 2)));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let shares: Vec<f64> = samples.iter().map(|&(_, s)| s).collect();
        assert!(
            shares.windows(2).all(|w| w[1] >= w[0]),
            "monotonic: {samples:?}"
        );
        // Full weight is 1/3 of three equal backends; the ramp starts at 5 % of it and is seen
        // below half weight (share 0.2) even if this loop was scheduled late.
        let first = shares[0];
        assert!(first > 0.0 && first < 0.2, "starts near zero: {first}");
        let distinct = {
            let mut d = shares.clone();
            d.dedup();
            d.len()
        };
        // 20 steps of 50 ms, sampled every 10 ms or so: a ramp shows many of them.
        assert!(distinct >= 6, "moves in many steps, not a jump: {distinct}");
        eventually(SOON, "full weight at the end", || {
            weight_share(&lb, 2) == 1.0 / 3.0
        })
        .await;
        assert_eq!(health_of(&lb, addrs[2]).slow_start, None);
        lb.stop().await;
    })
    .await;
}

#[tokio::test]
async fn passive_ejection_after_connect_failures_retries_after_eject_for_with_doubling() {
    bounded(LIMIT, async {
        let good = mock(MockOptions::default()).await;
        let refusing = Refusing::new();
        let eject_for = Duration::from_millis(300);
        let tables = format!(
            "connect_attempts = 3\n[listener.passive]\nmax_connect_failures = 3\n\
             eject_for = \"{}ms\"\n",
            eject_for.as_millis()
        );
        let backends = [backend(good.addr()), backend(refusing.addr)];
        let lb = start_balancer(&config_text("weighted_round_robin", &tables, &backends));
        // No active checks: only traffic can find out.
        assert_eq!(lb.handle.health_checkers(), 0);

        // Clients keep coming; every one is answered (retried on the good backend).
        let mut ejections = Vec::new();
        let mut returns = Vec::new();
        let mut was_ejected = false;
        let started = Instant::now();
        // Each change is seen between two samples: it happened after the earlier one and by
        // the later one, whatever the scheduler did in between.
        let mut last_sampled = started;
        while ejections.len() < 2 || returns.len() < 2 {
            assert!(
                started.elapsed() < SOON,
                "two ejections and returns within {SOON:?}"
            );
            let attempts_before = attempts(&lb, refusing.addr);
            let sampled = Instant::now();
            let h = health_of(&lb, refusing.addr);
            let failures = lb.backend(refusing.addr).connect_failures;
            assert_eq!(fetch(lb.addr).await, Some(good.addr()));
            if h.ejected && health_of(&lb, refusing.addr).ejected {
                assert_eq!(
                    attempts(&lb, refusing.addr),
                    attempts_before,
                    "an ejected backend gets no connect"
                );
            }
            match (was_ejected, h.ejected) {
                (false, true) => ejections.push(((last_sampled, sampled), h, failures)),
                (true, false) => returns.push((last_sampled, sampled)),
                _ => {}
            }
            was_ejected = h.ejected;
            last_sampled = sampled;
        }
        let (first_at, first, failures_first) = ejections[0];
        let (second_at, second, failures_second) = ejections[1];
        assert_eq!((first.ejections, second.ejections), (1, 2));
        // Ejected at the third consecutive failure each time (a fourth may already have been
        // under way while the control task applied the ejection).
        assert!((3..=4).contains(&failures_first), "{failures_first}");
        assert!((failures_first + 3..=failures_first + 4).contains(&failures_second));
        // The longest and the shortest each ejection can have lasted, given when it was seen.
        let out = |(ejected_after, ejected_by): (Instant, Instant),
                   (back_after, back_by): (Instant, Instant)| {
            (
                back_by - ejected_after,
                back_after.saturating_duration_since(ejected_by),
            )
        };
        let (first_most, first_least) = out(first_at, returns[0]);
        let (second_most, second_least) = out(second_at, returns[1]);
        eprintln!(
            "ejected for {first_least:?}..{first_most:?}, then {second_least:?}..{second_most:?} \
             (eject_for {eject_for:?}, doubling)"
        );
        assert!(
            first_most >= eject_for,
            "first ejection too short: {first_most:?}"
        );
        assert!(
            second_most >= eject_for * 2,
            "second too short: {second_most:?}"
        );
        assert!(
            first_least <= eject_for + SLACK,
            "first too long: {first_least:?}"
        );
        assert!(
            second_least <= eject_for * 2 + SLACK,
            "second too long: {second_least:?}"
        );
        lb.stop().await;
    })
    .await;
}

#[tokio::test]
async fn all_unhealthy_routes_anyway_or_rejects_as_configured() {
    bounded(LIMIT, async {
        for policy in ["route_anyway", "reject"] {
            let servers = mocks(2).await;
            let addrs: Vec<SocketAddr> = servers.iter().map(Mock::addr).collect();
            let tables = health(&format!("all_unhealthy = \"{policy}\""));
            let backends: Vec<Backend> = addrs.iter().map(|&a| backend(a)).collect();
            let lb = start_balancer(&config_text("weighted_round_robin", &tables, &backends));
            until_confirmed(&lb, &addrs).await;
            for server in &servers {
                server.state().set_health_status(Some(503));
            }
            for &addr in &addrs {
                until_status(&lb, addr, HealthStatus::Unhealthy).await;
            }
            eventually(SOON, "listener knows", || lb.listener().all_unhealthy).await;
            let answers: Vec<Option<SocketAddr>> = {
                let mut all = Vec::new();
                for _ in 0..10 {
                    all.push(fetch(lb.addr).await);
                }
                all
            };
            let counters = lb.listener();
            assert_eq!(counters.all_unhealthy_episodes, 1, "{policy}");
            if policy == "route_anyway" {
                assert!(
                    answers.iter().all(Option::is_some),
                    "served anyway: {answers:?}"
                );
                assert_eq!(counters.routed_all_unhealthy, 10);
                assert_eq!(counters.rejected_all_unhealthy, 0);
            } else {
                assert!(answers.iter().all(Option::is_none), "rejected: {answers:?}");
                assert_eq!(counters.rejected_all_unhealthy, 10);
                assert_eq!(counters.routed_all_unhealthy, 0);
            }
            servers[0].state().set_health_status(None);
            eventually(SOON, "a backend is healthy again", || {
                !lb.listener().all_unhealthy
            })
            .await;
            assert_eq!(fetch(lb.addr).await, Some(addrs[0]));
            lb.stop().await;
        }
    })
    .await;
}

#[tokio::test]
async fn weights_follow_reported_queue_depth_and_a_failed_scrape_holds_then_resets() {
    bounded(LIMIT, async {
        let idle = mock(MockOptions {
            waiting: Some(0),
            ..MockOptions::default()
        })
        .await;
        let busy = mock(MockOptions {
            waiting: Some(16),
            ..MockOptions::default()
        })
        .await;
        let addrs = [idle.addr(), busy.addr()];
        let tables = format!(
            "{}[listener.health.load]\npreset = \"vllm\"\nsaturation = 32\n\
             min_weight_percent = 10\ninterval = \"{}ms\"\n",
            health(""),
            INTERVAL.as_millis()
        );
        let backends: Vec<Backend> = addrs.iter().map(|&a| backend(a)).collect();
        let lb = start_balancer(&config_text("weighted_round_robin", &tables, &backends));
        // factor = max(0.1, 1 - waiting / 32): 1 and 0.5, so shares 2/3 and 1/3.
        eventually(SOON, "load factors settle in the snapshot", || {
            effective_weight(&lb, idle.addr()) == 1.0 && effective_weight(&lb, busy.addr()) == 0.5
        })
        .await;
        assert_eq!(health_of(&lb, busy.addr()).load_value, Some(16.0));
        let counts = spread(lb.addr, &addrs, 300).await;
        eprintln!("300 requests by reported load 0 and 16: {counts:?} (expected 200, 100)");
        // Weighted round robin over weights 1 and 0.5 is exact to one request per cycle; the
        // bound allows for a snapshot rebuilt mid-run restarting the cycle.
        assert!(
            counts[0].abs_diff(200) <= 6 && counts[1].abs_diff(100) <= 6,
            "{counts:?}"
        );

        // The busy server's metrics fail: its factor holds for two failed scrapes, then resets.
        let before = busy.state().scrapes();
        busy.state().set_metrics_status(Some(500));
        let deadline = Instant::now() + SOON;
        loop {
            let failed = busy.state().scrapes() - before;
            let factor = health_of(&lb, busy.addr()).load_factor;
            if failed <= 2 {
                assert_eq!(factor, 0.5, "held after {failed} failed scrape(s)");
            } else if factor == 1.0 {
                break;
            }
            assert!(Instant::now() < deadline, "factor not reset: {factor}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let h = health_of(&lb, busy.addr());
        assert_eq!(h.load_value, None);
        assert_eq!(
            h.status,
            HealthStatus::Healthy,
            "a failed scrape is not a failed check"
        );
        lb.stop().await;
    })
    .await;
}

/// A reload that changes the health settings restarts the checkers; a busy backend keeps its
/// low load factor through that (rather than starting again from 1, a step per scrape), and
/// failing scrapes right after the restart hold it like any others.
#[tokio::test]
async fn a_reload_that_restarts_the_checker_keeps_the_load_factor() {
    bounded(LIMIT, async {
        let busy = mock(MockOptions {
            waiting: Some(30),
            ..MockOptions::default()
        })
        .await;
        let tables = |interval: Duration| {
            format!(
                "{}[listener.health.load]\npreset = \"vllm\"\nsaturation = 32\n\
                 min_weight_percent = 10\ninterval = \"{}ms\"\n",
                health(""),
                interval.as_millis()
            )
        };
        let backends = [backend(busy.addr())];
        let lb = start_balancer(&config_text(
            "weighted_round_robin",
            &tables(INTERVAL),
            &backends,
        ));
        let factor = || health_of(&lb, busy.addr()).load_factor;
        // max(0.1, 1 - 30 / 32): the floor, reached in steps of at most 0.25.
        eventually(SOON, "the load factor reaches its floor", || {
            factor() == 0.1
        })
        .await;
        let reload = |interval: Duration| {
            let text = config_text("weighted_round_robin", &tables(interval), &backends);
            lb.handle
                .apply(Config::parse(&text, Path::new("t.toml")).expect("valid"))
        };
        let interval = INTERVAL + Duration::from_millis(10);
        reload(interval).await.expect("reload");
        let before = busy.state().scrapes();
        let deadline = Instant::now() + SOON;
        while busy.state().scrapes() - before < 3 {
            assert_eq!(factor(), 0.1, "kept through the checker's restart");
            assert!(Instant::now() < deadline, "three scrapes within {SOON:?}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(factor(), 0.1);

        // Scrapes fail from before the next restart on: the first two after it hold the factor.
        busy.state().set_metrics_status(Some(500));
        reload(INTERVAL).await.expect("reload");
        let before = busy.state().scrapes();
        let deadline = Instant::now() + SOON;
        loop {
            let failed = busy.state().scrapes() - before;
            if failed <= 2 {
                assert_eq!(factor(), 0.1, "held after {failed} failed scrape(s)");
            } else if factor() == 1.0 {
                break;
            }
            assert!(Instant::now() < deadline, "factor not reset: {}", factor());
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        lb.stop().await;
    })
    .await;
}

/// Reloads that restart a starting backend's checker (here: a new interval each time) do not
/// grant it a new `startup_grace`: it turns unhealthy when the first grace period ends, though
/// a reload comes far more often than the grace is long.
#[tokio::test]
async fn reloads_that_restart_the_checker_keep_the_startup_grace_deadline() {
    bounded(LIMIT, async {
        let refusing = Refusing::new();
        let grace = Duration::from_millis(1500);
        let tables = |interval: Duration| {
            format!(
                "[listener.health]\nkind = \"tcp\"\ninterval = \"{}ms\"\nstartup_grace = \"{}ms\"\n",
                interval.as_millis(),
                grace.as_millis()
            )
        };
        let backends = [backend(refusing.addr)];
        let lb = start_balancer(&config_text(
            "weighted_round_robin",
            &tables(INTERVAL),
            &backends,
        ));
        until_status(&lb, refusing.addr, HealthStatus::Starting).await;
        let deadline = Instant::now() + SOON;
        let mut reloads = 0_u32;
        while status(&lb, refusing.addr) != HealthStatus::Unhealthy {
            assert!(
                Instant::now() < deadline,
                "still {} after {reloads} reloads: each one restarted the grace period",
                status(&lb, refusing.addr)
            );
            let interval = INTERVAL + Duration::from_millis(u64::from(reloads % 2));
            let text = config_text("weighted_round_robin", &tables(interval), &backends);
            lb.handle
                .apply(Config::parse(&text, Path::new("t.toml")).expect("valid"))
                .await
                .expect("reload");
            reloads += 1;
            tokio::time::sleep(grace / 5).await;
        }
        lb.stop().await;
    })
    .await;
}

#[tokio::test]
async fn removed_backends_stop_being_probed_and_their_checkers_end() {
    bounded(LIMIT, async {
        let servers = mocks(3).await;
        let addrs: Vec<SocketAddr> = servers.iter().map(Mock::addr).collect();
        let all: Vec<Backend> = addrs.iter().map(|&a| backend(a)).collect();
        let text = config_text("weighted_round_robin", &health(""), &all);
        let lb = start_balancer(&text);
        eventually(SOON, "three checkers", || lb.handle.health_checkers() == 3).await;
        until_confirmed(&lb, &addrs).await;

        let kept = config_text("weighted_round_robin", &health(""), &all[..2]);
        let kept = Config::parse(&kept, Path::new("t.toml")).expect("valid");
        lb.handle.apply(kept).await.expect("reload");
        eventually(SOON, "the removed backend's checker ends", || {
            lb.handle.health_checkers() == 2
        })
        .await;
        let probes = servers[2].state().health_probes();
        let kept_probes = servers[0].state().health_probes();
        // Ten intervals later it still has not been probed again.
        tokio::time::sleep(INTERVAL * 10).await;
        assert_eq!(
            servers[2].state().health_probes(),
            probes,
            "no probe after removal"
        );
        // The control: a kept backend was probed all along in the same time.
        assert!(
            servers[0].state().health_probes() >= kept_probes + 3,
            "a kept backend is still probed"
        );

        // Health checks switched off: every checker ends.
        let none = config_text("weighted_round_robin", "", &all[..2]);
        let none = Config::parse(&none, Path::new("t.toml")).expect("valid");
        lb.handle.apply(none).await.expect("reload");
        eventually(SOON, "no checker left", || lb.handle.health_checkers() == 0).await;
        let probes: Vec<u64> = servers.iter().map(|s| s.state().health_probes()).collect();
        tokio::time::sleep(INTERVAL * 10).await;
        let after: Vec<u64> = servers.iter().map(|s| s.state().health_probes()).collect();
        assert_eq!(after, probes, "no probe at all");

        // And a shutdown ends them too.
        lb.handle
            .apply(Config::parse(&text, Path::new("t.toml")).expect("valid"))
            .await
            .expect("reload");
        eventually(SOON, "checkers back", || lb.handle.health_checkers() == 3).await;
        let handle = lb.handle.clone();
        lb.stop().await;
        assert_eq!(handle.health_checkers(), 0);
    })
    .await;
}

#[tokio::test]
async fn passive_ejection_switched_on_by_a_reload_mid_streak_still_ejects() {
    bounded(LIMIT, async {
        let good = mock(MockOptions::default()).await;
        let refusing = Refusing::new();
        let backends = [backend(good.addr()), backend(refusing.addr)];
        let tables = "connect_attempts = 2\n";
        let lb = start_balancer(&config_text("weighted_round_robin", tables, &backends));
        // No passive ejection yet: the refusing backend's streak just grows.
        const STREAK: u64 = 4;
        let started = Instant::now();
        while health_of(&lb, refusing.addr).consecutive_connect_failures < STREAK {
            assert!(
                started.elapsed() < SOON,
                "a streak of {STREAK} within {SOON:?}"
            );
            assert_eq!(fetch(lb.addr).await, Some(good.addr()));
        }
        assert!(!health_of(&lb, refusing.addr).ejected);

        // Now switched on with a threshold the streak has already passed: the next failure
        // ejects, rather than the streak having to come round to exactly the threshold.
        let tables =
            format!("{tables}[listener.passive]\nmax_connect_failures = 2\neject_for = \"60s\"\n");
        let text = config_text("weighted_round_robin", &tables, &backends);
        lb.handle
            .apply(Config::parse(&text, Path::new("t.toml")).expect("valid"))
            .await
            .expect("reload");
        let started = Instant::now();
        while !health_of(&lb, refusing.addr).ejected {
            assert!(
                started.elapsed() < SOON,
                "ejected within {SOON:?}; {:?}",
                health_of(&lb, refusing.addr)
            );
            assert_eq!(fetch(lb.addr).await, Some(good.addr()));
        }
        let attempts_before = attempts(&lb, refusing.addr);
        for _ in 0..10 {
            assert_eq!(fetch(lb.addr).await, Some(good.addr()));
        }
        assert_eq!(
            attempts(&lb, refusing.addr),
            attempts_before,
            "an ejected backend gets no connect"
        );
        lb.stop().await;
    })
    .await;
}
