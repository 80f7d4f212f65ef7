//! Cost of the per-client checks a listener makes on every accepted connection: its `allow` and
//! `deny` lists, and its per-client limits.
//!
//! ```text
//! cargo bench --features bench-internals --bench clients
//! cargo bench --features bench-internals --bench clients -- --quick
//! cargo bench --features bench-internals --bench clients -- access/10000
//! ```
//!
//! `access/<networks>` is one `Access::admits` of a client address, against an `allow` list
//! and a `deny` list holding `<networks>` networks between them, IPv4 and IPv6 of every prefix
//! length a real list has; half the addresses asked lie in a listed network, half anywhere.
//!
//! `admit_drop/<limits>` is one admission by a listener's client table and its guard dropped,
//! as a connection that opens and closes makes them, over `CLIENTS` client addresses in turn on
//! a clock that moves `TICK` per connection, so the table holds every client and no
//! connection is refused: `none` has no limit (nothing is looked up), `open` has
//! `max_connections_per_client` (an entry made and removed each time), `rate` has
//! `connection_rate_per_client` (an entry looked up and kept), `both` has both.
//! `admit_drop_2_threads/both` is `both` made by two threads at once on one table, each over
//! its own half of the clients, as two workers do: wall time per admission per thread, which
//! equals the one-thread figure when the shards keep the threads apart.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use weighbridge::bench::{Access, ClientTable};

/// Networks in `allow` and `deny` together.
const NETWORK_COUNTS: [usize; 3] = [10, 1_000, 10_000];
/// Of those, one in this many is in `deny`, the rest in `allow`.
const DENY_ONE_IN: usize = 5;
/// Of those, one in this many is IPv6, the rest IPv4.
const IPV6_ONE_IN: usize = 3;
/// Addresses asked about in turn; more than fit in L1, so the trie's nodes are not all hot.
const QUERIES: usize = 4_096;
/// Client addresses the table is asked about in turn.
const CLIENTS: u32 = 10_000;
/// How far the clock moves per connection: a client comes back every `CLIENTS * TICK`, 10 ms.
const TICK: Duration = Duration::from_micros(1);
/// `connection_rate_per_client` of the `rate` and `both` cases: a token every 20 ms, longer
/// than a client takes to come back, so every client stays tracked; a burst of a million, so
/// none is refused while the bench runs.
const RATE: (u32, Duration) = (1_000_000, Duration::from_secs(20_000));
/// `max_connections_per_client` of the `open` and `both` cases.
const MAX_OPEN: u32 = 64;
/// Time spent measuring each benchmark.
const MEASUREMENT_TIME: Duration = Duration::from_secs(3);
/// Time spent warming up before each benchmark.
const WARM_UP_TIME: Duration = Duration::from_secs(1);

/// A network as a list has it, seeded: IPv4 prefixes of 8 to 32 bits (most /16 to /24), IPv6
/// of 16 to 128 (most /32 to /64).
fn network(rng: &mut SmallRng, ipv6: bool) -> String {
    if ipv6 {
        let length = match rng.random_range(0..10) {
            0 => rng.random_range(16..32),
            1 => 128,
            _ => rng.random_range(32..=64),
        };
        format!("{}/{length}", Ipv6Addr::from(rng.random::<u128>()))
    } else {
        let length = match rng.random_range(0..10) {
            0 => rng.random_range(8..16),
            1 => 32,
            _ => rng.random_range(16..=24),
        };
        format!("{}/{length}", Ipv4Addr::from(rng.random::<u32>()))
    }
}

/// `networks` networks split into allow and deny, and addresses to ask about: half inside a
/// listed network (its address with random host bits), half anywhere.
fn lists(networks: usize) -> (Access, Vec<IpAddr>) {
    let mut rng = SmallRng::seed_from_u64(7);
    let all: Vec<String> = (0..networks)
        .map(|i| network(&mut rng, i % IPV6_ONE_IN == 0))
        .collect();
    let (deny, allow): (Vec<_>, Vec<_>) = all
        .iter()
        .enumerate()
        .partition(|(i, _)| i % DENY_ONE_IN == 0);
    let strings = |list: Vec<(usize, &String)>| list.into_iter().map(|(_, s)| s.clone()).collect();
    let (allow, deny): (Vec<String>, Vec<String>) = (strings(allow), strings(deny));
    let access = Access::parse(Some(&allow), Some(&deny)).expect("generated networks parse");
    let queries = (0..QUERIES)
        .map(|i| {
            let ipv6 = i % IPV6_ONE_IN == 0;
            if i % 2 == 0 {
                let listed = &all[rng.random_range(0..all.len())];
                inside(listed, &mut rng)
            } else if ipv6 {
                IpAddr::V6(Ipv6Addr::from(rng.random::<u128>()))
            } else {
                IpAddr::V4(Ipv4Addr::from(rng.random::<u32>()))
            }
        })
        .collect();
    (access, queries)
}

/// A random address inside `network` (written `address/length`).
fn inside(network: &str, rng: &mut SmallRng) -> IpAddr {
    let (address, length) = network.split_once('/').expect("address/length");
    let length: u32 = length.parse().expect("a length");
    match address.parse().expect("an address") {
        IpAddr::V4(a) => {
            let host = u32::MAX.checked_shr(length).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(
                (u32::from(a) & !host) | (rng.random::<u32>() & host),
            ))
        }
        IpAddr::V6(a) => {
            let host = u128::MAX.checked_shr(length).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(
                (u128::from(a) & !host) | (rng.random::<u128>() & host),
            ))
        }
    }
}

fn access(c: &mut Criterion) {
    let mut group = c.benchmark_group("access");
    for networks in NETWORK_COUNTS {
        let (access, queries) = lists(networks);
        let admitted = queries.iter().filter(|&&ip| access.admits(ip)).count();
        eprintln!("access/{networks}: {admitted} of {QUERIES} addresses admitted");
        group.bench_with_input(
            BenchmarkId::from_parameter(networks),
            &access,
            |b, access| {
                let mut i = 0;
                b.iter(|| {
                    i = (i + 1) % QUERIES;
                    black_box(access.admits(black_box(queries[i])))
                })
            },
        );
    }
    group.finish();
}

/// Client `i`: IPv4 and IPv6 in turn.
fn client(i: u32) -> IpAddr {
    if i % 2 == 0 {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
    } else {
        IpAddr::V6(Ipv6Addr::from((0x2001_0db8_u128 << 96) | u128::from(i)))
    }
}

/// The clock `tick` ticks after `start`.
fn at(start: Instant, tick: u64) -> Instant {
    start + TICK * u32::try_from(tick).expect("a bench run makes fewer than 2^32 connections")
}

fn admit_drop(c: &mut Criterion) {
    let cases = [
        ("none", None, None),
        ("open", Some(MAX_OPEN), None),
        ("rate", None, Some(RATE)),
        ("both", Some(MAX_OPEN), Some(RATE)),
    ];
    let mut group = c.benchmark_group("admit_drop");
    for (name, max_open, rate) in cases {
        let table = ClientTable::new(max_open, rate);
        let clients: Vec<IpAddr> = (0..CLIENTS).map(client).collect();
        let start = Instant::now();
        let mut tick = 0_u64;
        group.bench_function(name, |b| {
            b.iter(|| {
                tick += 1;
                let now = at(start, tick);
                let ip = clients[(tick % u64::from(CLIENTS)) as usize];
                let guard = table.admit(black_box(ip), now);
                assert!(guard.is_some(), "{name}: refused");
                drop(black_box(guard));
            })
        });
        eprintln!("admit_drop/{name}: {} clients tracked", table.tracked());
    }
    group.finish();
}

/// Threads admitting at once in `admit_drop_2_threads`.
const ADMITTING_THREADS: u32 = 2;

fn admit_drop_concurrently(c: &mut Criterion) {
    let mut group = c.benchmark_group(format!("admit_drop_{ADMITTING_THREADS}_threads"));
    let table = ClientTable::new(Some(MAX_OPEN), Some(RATE));
    let clients: Vec<IpAddr> = (0..CLIENTS).map(client).collect();
    let start = Instant::now();
    // Where the clock stands: every batch goes on from where the last one stopped.
    let mut ticks = 0_u64;
    group.bench_function("both", |b| {
        b.iter_custom(|iters| {
            let ready = Barrier::new(ADMITTING_THREADS as usize);
            let elapsed = std::thread::scope(|scope| {
                let workers: Vec<_> = (0..ADMITTING_THREADS)
                    .map(|thread| {
                        let (table, clients, ready) = (&table, &clients, &ready);
                        scope.spawn(move || {
                            ready.wait();
                            let began = Instant::now();
                            for k in 0..iters {
                                // Each thread's own clients: every other one.
                                let n = (k * u64::from(ADMITTING_THREADS)) % u64::from(CLIENTS);
                                let ip = clients[n as usize + thread as usize];
                                let now = at(start, ticks + k);
                                let guard = table.admit(black_box(ip), now);
                                assert!(guard.is_some(), "refused");
                                drop(black_box(guard));
                            }
                            began.elapsed()
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .map(|w| w.join().expect("admitting thread"))
                    .max()
                    .unwrap_or_default()
            });
            ticks += iters;
            elapsed
        })
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(MEASUREMENT_TIME)
        .warm_up_time(WARM_UP_TIME)
}

criterion_group! {
    name = benches;
    config = config();
    targets = access, admit_drop, admit_drop_concurrently
}
criterion_main!(benches);
