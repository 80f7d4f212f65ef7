use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use super::*;
use crate::state::{ActiveConn, PoolState};

fn addrs(n: usize) -> Vec<SocketAddr> {
    (0..n)
        .map(|i| {
            SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250) as u8 + 1)),
                8000,
            )
        })
        .collect()
}

/// Backends of one pool, sharing its count of open connections.
fn pool(n: usize) -> Vec<Arc<BackendState>> {
    let state = Arc::new(PoolState::new("p"));
    (0..n)
        .map(|_| Arc::new(BackendState::in_pool(Arc::clone(&state))))
        .collect()
}

fn ring(
    addrs: &[SocketAddr],
    weights: &[f64],
    live: &[Arc<BackendState>],
    factor: f64,
) -> ConsistentHash {
    ConsistentHash::new(addrs, weights, live, factor)
}

fn client(i: u32) -> u64 {
    client_key(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)))
}

const KEYS: u32 = 10_000;

/// Where each of the keys goes, by backend address.
fn placement(strategy: &ConsistentHash, addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    (0..KEYS)
        .map(|k| addrs[strategy.pick_key(client(k), &[]).expect("a backend")])
        .collect()
}

#[test]
fn a_key_always_lands_on_the_same_backend_and_two_builds_agree() {
    let a = addrs(8);
    let live = pool(8);
    let one = ring(&a, &[1.0; 8], &live, 0.0);
    let two = ring(&a, &[1.0; 8], &pool(8), 0.0);
    for k in 0..KEYS {
        let first = one.pick_key(client(k), &[]);
        assert_eq!(first, one.pick_key(client(k), &[]));
        assert_eq!(
            first,
            two.pick_key(client(k), &[]),
            "another balancer agrees"
        );
    }
}

#[test]
fn shares_follow_the_weights() {
    let a = addrs(4);
    let weights = [1.0, 2.0, 1.0, 4.0];
    let strategy = ring(&a, &weights, &pool(4), 0.0);
    let mut counts: HashMap<SocketAddr, u32> = HashMap::new();
    for addr in placement(&strategy, &a) {
        *counts.entry(addr).or_default() += 1;
    }
    let total: f64 = weights.iter().sum();
    for (addr, weight) in a.iter().zip(weights) {
        let share = f64::from(counts[addr]) / f64::from(KEYS);
        let expected = weight / total;
        println!("weight {weight}: {share:.4} of the keys against {expected:.4}");
        assert!(
            (share / expected - 1.0).abs() < 0.2,
            "{addr}: {share:.3} of the keys against {expected:.3}"
        );
    }
}

#[test]
fn removing_or_adding_one_of_n_moves_about_one_nth_of_the_keys() {
    let n = 10;
    let a = addrs(n + 1);
    let before = ring(&a[..n], &vec![1.0; n], &pool(n), 0.0);
    let placed = placement(&before, &a);
    // Removed: only its keys move, and they are about 1/n.
    let removed = a[3];
    let rest: Vec<SocketAddr> = a[..n].iter().copied().filter(|&x| x != removed).collect();
    let after = ring(&rest, &vec![1.0; n - 1], &pool(n - 1), 0.0);
    let now = placement(&after, &rest);
    let moved = placed.iter().zip(&now).filter(|(b, a)| b != a).count();
    let on_removed = placed.iter().filter(|&&b| b == removed).count();
    assert_eq!(moved, on_removed, "only the removed backend's keys move");
    let share = moved as f64 / f64::from(KEYS);
    println!("removing one of {n}: {share:.4} of the keys moved");
    assert!(
        (0.05..0.15).contains(&share),
        "removing one of {n} moved {share:.3}"
    );
    // Added: the keys that move all go to the new one, about 1/(n+1) of them.
    let grown = ring(&a, &vec![1.0; n + 1], &pool(n + 1), 0.0);
    let now = placement(&grown, &a);
    let newest = a[n];
    let moved: Vec<_> = placed.iter().zip(&now).filter(|(b, x)| b != x).collect();
    assert!(
        moved.iter().all(|(_, x)| **x == newest),
        "moved keys go to the new backend"
    );
    let share = moved.len() as f64 / f64::from(KEYS);
    println!("adding an 11th: {share:.4} of the keys moved");
    assert!(
        (0.045..0.14).contains(&share),
        "adding an 11th moved {share:.3}"
    );
}

#[test]
fn weight_zero_and_tried_backends_are_skipped() {
    let a = addrs(3);
    let strategy = ring(&a, &[1.0, 0.0, 1.0], &pool(3), 0.0);
    for k in 0..KEYS {
        let first = strategy.pick_key(client(k), &[]).expect("a backend");
        assert_ne!(first, 1, "weight 0 is never picked");
        let retry = strategy.pick_key(client(k), &[first]).expect("another");
        assert!(retry != first && retry != 1);
        assert_eq!(strategy.pick_key(client(k), &[0, 2]), None);
    }
    assert_eq!(ring(&a, &[0.0; 3], &pool(3), 0.0).pick_key(1, &[]), None);
}

#[test]
fn a_hot_key_spills_over_and_no_backend_exceeds_its_bound() {
    for (weights, factor) in [
        (vec![1.0; 5], 1.25),
        (vec![1.0, 2.0, 1.0, 3.0, 1.0], 1.25),
        (vec![1.0; 5], 1.0),
    ] {
        let n = weights.len();
        let a = addrs(n);
        let live = pool(n);
        let strategy = ring(&a, &weights, &live, factor);
        let total: f64 = weights.iter().sum();
        let hot = client(42);
        let home = strategy.pick_key(hot, &[]).expect("a backend");
        let mut open: Vec<ActiveConn> = Vec::new();
        for _ in 0..200 {
            let index = strategy.pick_key(hot, &[]).expect("a backend");
            let pool_open = open.len() as f64;
            let bound = (factor * (pool_open + 1.0) * weights[index] / total).ceil();
            assert!(
                (live[index].active() as f64) < bound,
                "backend {index} over its bound {bound} at {pool_open} open"
            );
            open.push(BackendState::acquire(&live[index]));
        }
        let home_load = live[home].active() as f64;
        let fair = 200.0 * weights[home] / total;
        assert!(
            home_load <= (factor * fair).ceil() + 1.0,
            "home {home_load} against share {fair}"
        );
        // Each spills to the next on its sequence: the bounds add up to factor × the open
        // connections, so about 1 / (factor × share) backends carry it, not every one.
        let used = live.iter().filter(|b| b.active() > 0).count();
        assert!(used >= 3, "the hot key spilled over {used} backends only");
        // Plain consistent hashing keeps it home whatever the load.
        let plain = ring(&a, &weights, &live, 0.0);
        assert_eq!(plain.pick_key(hot, &[]), Some(home));
    }
}

#[test]
fn without_a_key_the_turns_spread_over_the_ring() {
    let a = addrs(4);
    let strategy = ring(&a, &[1.0; 4], &pool(4), 0.0);
    let mut counts = [0_u32; 4];
    for turn in 0..4_000 {
        counts[strategy.pick(turn, &[]).expect("a backend")] += 1;
    }
    assert!(counts.iter().all(|&c| c > 700), "{counts:?}");
}

#[test]
fn client_keys_ignore_the_port_and_name_keys_ignore_case() {
    assert_eq!(name_key("LLama.Example.COM"), name_key("llama.example.com"));
    assert_ne!(name_key("a.example.com"), name_key("b.example.com"));
    let v4: IpAddr = "10.1.2.3".parse().expect("literal");
    let mapped: IpAddr = "::ffff:10.1.2.3".parse().expect("literal");
    assert_eq!(client_key(v4), client_key(mapped));
    let long = "x".repeat(300);
    assert_eq!(name_key(&long.to_uppercase()), name_key(&long));
}
