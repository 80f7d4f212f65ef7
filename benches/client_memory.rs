//! Memory a listener's per-client table takes per tracked client: `CLIENTS` distinct addresses
//! connect once each under a rate limit long enough that every one stays tracked, and the
//! process's resident set (VmRSS in /proc/self/status, Linux only) is read before and after.
//! Then the rate's period passes, one sweep empties the table, and the resident set is read
//! again: how much of that memory goes back.
//!
//! ```text
//! cargo bench --features bench-internals --bench client_memory
//! ```
//!
//! The resident set counts what the allocator holds, not only what the maps use: tables left
//! behind as shards grew, if the allocator keeps them, count too, as they would in the running
//! balancer. `capacity` is how many entries the maps have room for without growing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use weighbridge::bench::ClientTable;

/// Distinct client addresses admitted.
const CLIENTS: u32 = 1_000_000;
/// One connection per period per client: a period far longer than the run keeps them all.
const RATE: (u32, Duration) = (1, Duration::from_secs(3_600));
/// One in this many clients is IPv6 (the key is 16 bytes either way).
const IPV6_ONE_IN: u32 = 4;

fn main() {
    let rss_empty = rss_bytes();
    let table = ClientTable::new(None, Some(RATE));
    let start = Instant::now();
    for i in 0..CLIENTS {
        let guard = table.admit(client(i), start);
        assert!(guard.is_some(), "client {i} refused");
    }
    let elapsed = start.elapsed();
    let rss_full = rss_bytes();
    let tracked = table.tracked();
    assert_eq!(tracked, CLIENTS as usize, "every client stays tracked");
    let grown = rss_full.saturating_sub(rss_empty);
    println!(
        "{tracked} clients tracked in {:.0} ms ({:.0} ns each); capacity {} ({:.0} % full)",
        elapsed.as_secs_f64() * 1e3,
        elapsed.as_secs_f64() * 1e9 / f64::from(CLIENTS),
        table.capacity(),
        100.0 * tracked as f64 / table.capacity() as f64,
    );
    println!(
        "resident set grew {:.1} MiB: {:.1} bytes per tracked client",
        mib(grown),
        grown as f64 / tracked as f64,
    );

    let left = table.sweep(start + RATE.1);
    let rss_swept = rss_bytes();
    println!(
        "after the period, one sweep: {left} tracked, capacity {}, resident set {:.1} MiB above empty",
        table.capacity(),
        mib(rss_swept.saturating_sub(rss_empty)),
    );
}

/// Client `i`: distinct, spread over IPv4 and IPv6.
fn client(i: u32) -> IpAddr {
    if i % IPV6_ONE_IN == 0 {
        IpAddr::V6(Ipv6Addr::from((0x2001_0db8_u128 << 96) | u128::from(i)))
    } else {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
    }
}

/// This process's resident set, from /proc/self/status.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status (Linux)");
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .expect("a VmRSS line in kB");
    kib * 1024
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
