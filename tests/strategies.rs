//! Each strategy over real connections: which backend a client lands on is read from the byte
//! the backend greets it with.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use tokio::net::TcpStream;

use support::{
    Mock, Refusing, Running, bounded, config, connect_identify, eventually_eq, start_balancer,
};

/// Weights of the four backends every test here uses; Σ = 7.
const WEIGHTS: [f64; 4] = [1.5, 2.0, 1.0, 2.5];
/// The weights as integer units of one round-robin cycle.
const UNITS: [usize; 4] = [3, 4, 2, 5];
/// Round-robin cycles run.
const CYCLES: usize = 20;
/// Connections in the weighted-random test.
const RANDOM_CONNECTIONS: usize = 3_000;
/// Connections held open at once in the capacity test.
const HELD: usize = 140;
/// Close-and-refill rounds in the capacity test.
const REFILL_ROUNDS: usize = 3;
/// How long counters may take to follow closed connections.
const SETTLE: Duration = Duration::from_secs(10);

async fn backends() -> (Vec<Mock>, Vec<SocketAddr>) {
    let mocks = Mock::identify_many(WEIGHTS.len() as u8).await;
    let addrs = mocks.iter().map(|m| m.addr).collect();
    (mocks, addrs)
}

fn pool(addrs: &[SocketAddr]) -> Vec<(SocketAddr, f64)> {
    addrs.iter().copied().zip(WEIGHTS).collect()
}

/// Opens one connection, reads which backend answered, closes it.
async fn pick_once(lb: &Running) -> usize {
    let (_stream, id) = connect_identify(lb.addr).await;
    usize::from(id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_is_exact_per_cycle_and_smooth_in_every_prefix() {
    bounded(Duration::from_secs(30), async {
        let (mocks, addrs) = backends().await;
        let lb = start_balancer(&config("weighted_round_robin", "", &pool(&addrs)));
        let total: f64 = WEIGHTS.iter().sum();
        let cycle: usize = UNITS.iter().sum();
        let mut counts = [0_usize; 4];
        let mut order = Vec::new();
        for n in 1..=cycle * CYCLES {
            let id = pick_once(&lb).await;
            counts[id] += 1;
            order.push(id);
            for (i, (&count, weight)) in counts.iter().zip(WEIGHTS).enumerate() {
                let ideal = weight / total * n as f64;
                assert!(
                    (count as f64 - ideal).abs() <= 1.0 + 1e-9,
                    "after {n} connections backend {i} has {count}, ideal {ideal:.2}; order {order:?}"
                );
            }
            if n % cycle == 0 {
                let cycles = n / cycle;
                assert_eq!(
                    counts,
                    UNITS.map(|u| u * cycles),
                    "after {cycles} cycle(s)"
                );
            }
        }
        // Every cycle is the same sequence.
        for (n, chunk) in order.chunks(cycle).enumerate() {
            assert_eq!(chunk, &order[..cycle], "cycle {n} differs from the first");
        }
        let accepted: Vec<usize> = mocks.iter().map(Mock::accepted).collect();
        assert_eq!(accepted, UNITS.map(|u| u * CYCLES));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_random_shares_follow_weights() {
    bounded(Duration::from_secs(40), async {
        let (_mocks, addrs) = backends().await;
        let lb = start_balancer(&config("weighted_random", "", &pool(&addrs)));
        let mut counts = [0_usize; 4];
        for _ in 0..RANDOM_CONNECTIONS {
            counts[pick_once(&lb).await] += 1;
        }
        let total: f64 = WEIGHTS.iter().sum();
        let n = RANDOM_CONNECTIONS as f64;
        for (i, (&count, weight)) in counts.iter().zip(WEIGHTS).enumerate() {
            let p = weight / total;
            let mean = n * p;
            let sigma = (n * p * (1.0 - p)).sqrt();
            assert!(
                (count as f64 - mean).abs() <= 5.0 * sigma,
                "backend {i}: {count} of {RANDOM_CONNECTIONS}, expected {mean:.0} ± {:.0}; all {counts:?}",
                5.0 * sigma
            );
        }
    })
    .await;
}

/// Checks that the open connections per backend, as the clients, the backends and the balancer
/// each see them, agree and are within one of each backend's capacity share.
fn assert_within_one_of_share(
    held: &[(TcpStream, usize)],
    mocks: &[Mock],
    lb: &Running,
    addrs: &[SocketAddr],
) {
    let mut by_client = [0_u64; 4];
    for (_, id) in held {
        by_client[*id] += 1;
    }
    let by_backend: Vec<u64> = mocks.iter().map(|m| m.open() as u64).collect();
    assert_eq!(by_backend, by_client, "backends' open counts vs clients'");
    assert_eq!(
        lb.active(addrs),
        by_client,
        "balancer's active counts vs clients'"
    );
    let total: f64 = WEIGHTS.iter().sum();
    let open = held.len() as f64;
    for (i, (&count, weight)) in by_client.iter().zip(WEIGHTS).enumerate() {
        let ideal = weight / total * open;
        assert!(
            (count as f64 - ideal).abs() <= 1.0 + 1e-9,
            "backend {i}: {count} open, ideal {ideal:.2}; all {by_client:?}"
        );
    }
}

/// Opens `n` connections one at a time, each established (id read) before the next.
async fn open_one_by_one(lb: &Running, n: usize, held: &mut Vec<(TcpStream, usize)>) {
    for _ in 0..n {
        let (stream, id) = connect_identify(lb.addr).await;
        held.push((stream, usize::from(id)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_proportional_keeps_open_connections_in_proportion() {
    bounded(Duration::from_secs(40), async {
        let (mocks, addrs) = backends().await;
        let lb = start_balancer(&config("capacity_proportional", "", &pool(&addrs)));
        let mut held = Vec::with_capacity(HELD);
        open_one_by_one(&lb, HELD, &mut held).await;
        assert_within_one_of_share(&held, &mocks, &lb, &addrs);
        // 140 = 20 × Σ capacity: the shares are exact.
        assert_eq!(lb.active(&addrs), [30, 40, 20, 50]);

        let mut rng = SmallRng::seed_from_u64(0x5eed);
        for round in 0..REFILL_ROUNDS {
            let before = held.len();
            held.retain(|_| rng.random_bool(0.6));
            let closed = before - held.len();
            assert!(
                closed > 0,
                "round {round}: the seeded draw closes something"
            );
            let mut expected = [0_u64; 4];
            for (_, id) in &held {
                expected[*id] += 1;
            }
            eventually_eq(
                SETTLE,
                "active counts after closing",
                expected.to_vec(),
                || lb.active(&addrs),
            )
            .await;
            open_one_by_one(&lb, closed, &mut held).await;
            assert_eq!(held.len(), HELD);
            assert_within_one_of_share(&held, &mocks, &lb, &addrs);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_proportional_does_not_send_every_client_first_to_a_refusing_backend() {
    bounded(Duration::from_secs(40), async {
        let mocks = Mock::identify_many(2).await;
        let refusing = Refusing::new();
        let backends = [
            (mocks[0].addr, 1.0),
            (mocks[1].addr, 1.0),
            (refusing.addr, 1.0),
        ];
        let lb = start_balancer(&config(
            "capacity_proportional",
            "connect_attempts = 3",
            &backends,
        ));
        // Long-lived streams, as capacity_proportional is for: each stays open. The refusing
        // backend never holds one, so by count it always looks the least loaded.
        const CLIENTS: usize = 60;
        let started = tokio::time::Instant::now();
        let mut held = Vec::with_capacity(CLIENTS);
        open_one_by_one(&lb, CLIENTS, &mut held).await;
        let elapsed = started.elapsed();
        let failures = lb.backend(refusing.addr).connect_failures;
        // It is tried again once per second of cooldown, plus the first try.
        let allowed = 1 + elapsed.as_secs_f64().ceil() as u64;
        assert!(
            failures <= allowed,
            "{failures} of {CLIENTS} clients tried the refusing backend first in {elapsed:?}"
        );
        assert!(failures >= 1, "the refusing backend was tried");
        let mut on = [0_usize; 2];
        for (_, id) in &held {
            on[*id] += 1;
        }
        assert_eq!(on, [CLIENTS / 2, CLIENTS / 2], "the rest is split evenly");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_retries_a_dead_backends_share_by_weight() {
    bounded(Duration::from_secs(30), async {
        let mocks = Mock::identify_many(2).await;
        let refusing = Refusing::new();
        // nginx's example weights, the heavy one dead: its five slots of every seven are
        // retried, and the two left, of equal weight, should share them equally.
        let backends = [
            (refusing.addr, 5.0),
            (mocks[0].addr, 1.0),
            (mocks[1].addr, 1.0),
        ];
        let lb = start_balancer(&config(
            "weighted_round_robin",
            "connect_attempts = 2",
            &backends,
        ));
        const CLIENTS: usize = 140;
        let mut on = [0_usize; 2];
        for _ in 0..CLIENTS {
            on[pick_once(&lb).await] += 1;
        }
        assert_eq!(lb.backend(refusing.addr).connect_failures, 100);
        for count in on {
            assert!(
                count.abs_diff(CLIENTS / 2) <= CLIENTS / 20,
                "split {on:?}, not about {} each",
                CLIENTS / 2
            );
        }
    })
    .await;
}
