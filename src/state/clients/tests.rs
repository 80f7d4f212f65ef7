use std::net::Ipv4Addr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use super::*;
use crate::config::Rate;

fn limits(max_open: Option<u32>, rate: Option<(u32, Duration)>) -> ClientLimits {
    let count = |n| NonZeroU32::new(n).expect("a test count is not zero");
    ClientLimits {
        max_open: max_open.map(count),
        rate: rate.map(|(n, per)| Rate::new(count(n), per).expect("a test rate")),
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("a test address")
}

/// Distinct addresses, IPv4 and IPv6 in turn.
fn nth(i: u32) -> IpAddr {
    if i % 2 == 0 {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
    } else {
        IpAddr::V6(Ipv6Addr::from((0x2001_0db8_u128 << 96) | u128::from(i)))
    }
}

fn table() -> (ClientTable, Instant) {
    let table = ClientTable::new();
    (table, Instant::now())
}

fn open_of(table: &ClientTable, ip: IpAddr) -> u32 {
    let key = key(ip);
    let hash = table.hasher.hash_one(key);
    let shard = table.lock(shard_of(hash));
    shard
        .map
        .find(hash, |(k, _)| *k == key)
        .map_or(0, |(_, entry)| entry.open)
}

#[test]
fn entries_are_small() {
    assert_eq!(size_of::<(Ipv6Addr, Entry)>(), 28);
}

#[test]
fn open_limit_per_address() {
    let (table, now) = table();
    let two = limits(Some(2), None);
    let (a, b) = (ip("10.0.0.1"), ip("2001:db8::1"));
    let a1 = table.admit(a, &two, now).expect("a: 1st");
    let _a2 = table.admit(a, &two, now).expect("a: 2nd");
    assert_eq!(table.admit(a, &two, now).err(), Some(Limited::Open));
    assert_eq!(
        table.admit(ip("::ffff:10.0.0.1"), &two, now).err(),
        Some(Limited::Open),
        "the IPv4-mapped form is the same client"
    );
    let _b1 = table.admit(b, &two, now).expect("b: 1st");
    let _b2 = table.admit(b, &two, now).expect("b: 2nd");
    assert_eq!(table.admit(b, &two, now).err(), Some(Limited::Open));
    drop(a1);
    let _a3 = table.admit(a, &two, now).expect("a: a slot freed");
    assert_eq!(open_of(&table, a), 2);
    assert_eq!(open_of(&table, b), 2);
    assert_eq!(table.tracked(), 2);
}

#[test]
fn rate_limit_follows_the_bucket() {
    let (table, t0) = table();
    let three = limits(None, Some((3, Duration::from_secs(1))));
    let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
    for i in 0..3 {
        assert!(table.admit(a, &three, t0).is_ok(), "burst {i}");
    }
    assert_eq!(table.admit(a, &three, t0).err(), Some(Limited::Rate));
    assert!(
        table.admit(b, &three, t0).is_ok(),
        "another client's bucket"
    );
    // One token comes back every 333_333_333 ns.
    let almost = t0 + Duration::from_nanos(333_333_332);
    assert_eq!(table.admit(a, &three, almost).err(), Some(Limited::Rate));
    let one = t0 + Duration::from_nanos(333_333_333);
    assert!(table.admit(a, &three, one).is_ok());
    assert_eq!(table.admit(a, &three, one).err(), Some(Limited::Rate));
    // A quiet client gets its whole burst back, and no more.
    let later = t0 + Duration::from_secs(10);
    for i in 0..3 {
        assert!(table.admit(a, &three, later).is_ok(), "burst {i} again");
    }
    assert_eq!(table.admit(a, &three, later).err(), Some(Limited::Rate));
}

#[test]
fn twenty_a_second() {
    let (table, t0) = table();
    let rate = limits(None, Some((20, Duration::from_secs(1))));
    let a = ip("10.0.0.1");
    for _ in 0..20 {
        assert!(table.admit(a, &rate, t0).is_ok());
    }
    assert_eq!(table.admit(a, &rate, t0).err(), Some(Limited::Rate));
    let next = t0 + Duration::from_millis(50);
    assert!(table.admit(a, &rate, next).is_ok());
    assert_eq!(table.admit(a, &rate, next).err(), Some(Limited::Rate));
}

#[test]
fn refusals_cost_nothing() {
    let (table, now) = table();
    let a = ip("10.0.0.1");
    let both = limits(Some(1), Some((2, Duration::from_secs(1))));
    let held = table.admit(a, &both, now).expect("1st token");
    assert_eq!(table.admit(a, &both, now).err(), Some(Limited::Open));
    assert_eq!(table.admit(a, &both, now).err(), Some(Limited::Open));
    drop(held);
    let held = table
        .admit(a, &both, now)
        .expect("2nd token: refusals took none");
    drop(held);
    assert_eq!(table.admit(a, &both, now).err(), Some(Limited::Rate));
    assert_eq!(open_of(&table, a), 0, "a refusal for rate opens nothing");
}

#[test]
fn guard_drop_frees_and_forgets_without_rate() {
    let (table, now) = table();
    let one = limits(Some(1), None);
    let guards: Vec<_> = (0..3)
        .map(|i| table.admit(nth(i), &one, now).expect("admitted"))
        .collect();
    let two = limits(Some(2), None);
    let again = table.admit(nth(0), &two, now).expect("a second one");
    assert_eq!(table.tracked(), 3);
    drop(guards);
    assert_eq!(table.tracked(), 1, "nth(0) still has a connection");
    assert_eq!(open_of(&table, nth(0)), 1);
    drop(again);
    assert_eq!(table.tracked(), 0);
}

#[test]
fn a_guard_may_outlive_its_table() {
    let (table, now) = table();
    let guard = table.admit(nth(0), &limits(Some(1), None), now);
    drop(table);
    drop(guard);
}

#[test]
fn nothing_is_tracked_without_limits() {
    let (table, now) = table();
    let guards: Vec<_> = (0..100)
        .map(|i| table.admit(nth(i), &ClientLimits::default(), now))
        .collect();
    assert!(guards.iter().all(Result::is_ok));
    assert_eq!(table.tracked(), 0);
}

#[test]
fn rate_only_holds_no_count() {
    let (table, now) = table();
    let rate = limits(None, Some((5, Duration::from_secs(1))));
    let guard = table.admit(nth(0), &rate, now).expect("admitted");
    assert_eq!(open_of(&table, nth(0)), 0);
    drop(guard);
    assert_eq!(table.tracked(), 1, "kept for its bucket");
}

#[test]
fn idle_entries_go_busy_and_limited_ones_stay() {
    let (table, t0) = table();
    let both = limits(Some(4), Some((2, Duration::from_secs(1))));
    let (busy, limited, idle) = (nth(0), nth(1), nth(2));
    let held = table.admit(busy, &both, t0).expect("busy");
    drop(table.admit(limited, &both, t0).expect("limited 1"));
    drop(table.admit(limited, &both, t0).expect("limited 2"));
    drop(table.admit(idle, &both, t0).expect("idle"));
    assert_eq!(table.sweep(t0 + Duration::from_millis(499)), 3);
    // `idle` has its token back after 500 ms; `limited` needs a second.
    assert_eq!(table.sweep(t0 + Duration::from_millis(500)), 2);
    assert_eq!(table.sweep(t0 + Duration::from_secs(2)), 1, "busy stays");
    assert_eq!(open_of(&table, busy), 1);
    drop(held);
    assert_eq!(
        table.tracked(),
        1,
        "kept until a sweep: a rate was in force"
    );
    assert_eq!(table.sweep(t0 + Duration::from_secs(2)), 0);
}

#[test]
fn growth_sweeps_idle_entries() {
    let (table, t0) = table();
    let rate = limits(None, Some((1, Duration::from_secs(1))));
    const PER_ROUND: u32 = 1_000;
    for round in 0..100 {
        let now = t0 + Duration::from_secs(2 * u64::from(round));
        for i in 0..PER_ROUND {
            assert!(table.admit(nth(round * PER_ROUND + i), &rate, now).is_ok());
        }
    }
    // 100,000 clients came, at most the last round's are still limited: each shard holds
    // at most twice what it held after its last sweep, or MIN_SWEEP_LEN.
    let tracked = table.tracked();
    assert!(tracked >= PER_ROUND as usize);
    assert!(
        tracked <= 2 * PER_ROUND as usize + SHARDS * MIN_SWEEP_LEN,
        "{tracked} tracked"
    );
}

#[test]
fn a_period_sweep_gives_memory_back() {
    let (table, t0) = table();
    let rate = limits(None, Some((1, Duration::from_secs(1))));
    for i in 0..20_000 {
        assert!(table.admit(nth(i), &rate, t0).is_ok());
    }
    let big = table.capacity();
    assert!(big >= 20_000);
    // A few new clients a period later: too few to double a shard, but each shard's first
    // admission sweeps it, as a period has passed.
    let later = t0 + SWEEP_PERIOD;
    for i in 0..2_000 {
        assert!(table.admit(nth(1_000_000 + i), &rate, later).is_ok());
    }
    assert_eq!(table.tracked(), 2_000);
    assert!(table.capacity() < big / 4, "{} of {big}", table.capacity());
    assert_eq!(table.sweep(later + Duration::from_secs(1)), 0);
    assert!(table.capacity() <= SHARDS * 4 * MIN_SWEEP_LEN);
}

#[test]
fn limits_apply_from_the_next_connection() {
    let (table, now) = table();
    let a = nth(0);
    let _g1 = table.admit(a, &limits(Some(2), None), now).expect("1st");
    let _g2 = table.admit(a, &limits(Some(2), None), now).expect("2nd");
    assert_eq!(
        table.admit(a, &limits(Some(1), None), now).err(),
        Some(Limited::Open),
        "lowered"
    );
    let g3 = table.admit(a, &limits(Some(3), None), now).expect("raised");
    drop(g3);
    // A rate removed is forgotten: the client's last guard then takes its entry along.
    let (b, rate) = (nth(1), Some((1, Duration::from_secs(60))));
    drop(table.admit(b, &limits(Some(5), rate), now).expect("rated"));
    assert_eq!(
        table.admit(b, &limits(Some(5), rate), now).err(),
        Some(Limited::Rate)
    );
    let g = table
        .admit(b, &limits(Some(5), None), now)
        .expect("no rate now");
    drop(g);
    assert_eq!(table.tracked(), 1, "only `a` is left");
}

#[test]
fn concurrent_admissions_are_exact() {
    let (table, now) = table();
    let fifty = limits(Some(50), None);
    let a = nth(0);
    let admitted: Vec<Vec<ClientGuard>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    (0..100)
                        .filter_map(|_| table.admit(a, &fifty, now).ok())
                        .collect()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a worker"))
            .collect()
    });
    assert_eq!(admitted.iter().map(Vec::len).sum::<usize>(), 50);
    assert_eq!(open_of(&table, a), 50);
    drop(admitted);
    assert_eq!(table.tracked(), 0);
}

#[test]
fn concurrent_churn_keeps_counts() {
    const MAX: u32 = 3;
    const ADDRESSES: u32 = 8;
    let (table, now) = table();
    let three = limits(Some(MAX), None);
    // What the workers hold, counted after each admission and before each drop: never
    // more than the table itself counts.
    let held: Vec<AtomicU32> = (0..ADDRESSES).map(|_| AtomicU32::new(0)).collect();
    std::thread::scope(|scope| {
        for worker in 0..4_u32 {
            let (table, three, held) = (&table, &three, &held);
            scope.spawn(move || {
                let mut mine = std::collections::VecDeque::new();
                for i in 0..20_000_u32 {
                    let n = (i * 7 + worker) % ADDRESSES;
                    if let Ok(guard) = table.admit(nth(n), three, now) {
                        let count = held[n as usize].fetch_add(1, Ordering::SeqCst) + 1;
                        assert!(count <= MAX, "{count} open for address {n}");
                        mine.push_back((n, guard));
                    }
                    if mine.len() > 2 || (i % 5 == 0 && !mine.is_empty()) {
                        if let Some((n, guard)) = mine.pop_front() {
                            held[n as usize].fetch_sub(1, Ordering::SeqCst);
                            drop(guard);
                        }
                    }
                }
                for (n, guard) in mine {
                    held[n as usize].fetch_sub(1, Ordering::SeqCst);
                    drop(guard);
                }
            });
        }
    });
    assert_eq!(table.tracked(), 0);
}

/// A token bucket counted in nanoseconds of tokens, to check the table against.
struct Model {
    open: u32,
    level: u64,
    at: u64,
}

#[test]
fn random_sequences_match_a_plain_token_bucket() {
    for seed in 0..30 {
        let mut rng = SmallRng::seed_from_u64(seed);
        let (table, t0) = table();
        let max_open = rng.random_range(1..=3_u32);
        let burst = rng.random_range(1..=4_u32);
        let interval = rng.random_range(20..=100_u64) * 1_000_000;
        let (with_open, with_rate) = match seed % 3 {
            0 => (true, false),
            1 => (false, true),
            _ => (true, true),
        };
        let per = Duration::from_nanos(interval * u64::from(burst));
        let limits = limits(
            with_open.then_some(max_open),
            with_rate.then_some((burst, per)),
        );
        let capacity = interval * u64::from(burst);
        let mut models: Vec<Model> = (0..6)
            .map(|_| Model {
                open: 0,
                level: capacity,
                at: 0,
            })
            .collect();
        let mut held: Vec<(usize, ClientGuard)> = Vec::new();
        let mut now = 0_u64;
        for step in 0..2_000 {
            now += rng.random_range(0..=60_u64) * 1_000_000;
            if held.is_empty() || rng.random_bool(0.6) {
                let n = rng.random_range(0..models.len());
                let model = &mut models[n];
                model.level = (model.level + (now - model.at)).min(capacity);
                model.at = now;
                let expected = if with_open && model.open >= max_open {
                    Err(Limited::Open)
                } else if with_rate && model.level < interval {
                    Err(Limited::Rate)
                } else {
                    Ok(())
                };
                let at = t0 + Duration::from_nanos(now);
                let got = table.admit(nth(n as u32), &limits, at);
                assert_eq!(
                    got.as_ref().err().copied(),
                    expected.err(),
                    "seed {seed} step {step}"
                );
                if let Ok(guard) = got {
                    model.level -= if with_rate { interval } else { 0 };
                    if with_open {
                        model.open += 1;
                        held.push((n, guard));
                    }
                }
            } else {
                let (n, guard) = held.swap_remove(rng.random_range(0..held.len()));
                drop(guard);
                models[n].open -= 1;
            }
            for (n, model) in models.iter().enumerate() {
                assert_eq!(open_of(&table, nth(n as u32)), model.open, "seed {seed}");
                assert!(model.open <= max_open);
            }
        }
        drop(held);
        let end = t0 + Duration::from_nanos(now) + per;
        assert_eq!(table.sweep(end), 0, "seed {seed}");
    }
}
