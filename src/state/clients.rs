//! Per-client accounting of one listener: the connections each client address holds open and
//! how fast it opens new ones, for `max_connections_per_client` and
//! `connection_rate_per_client`. The limits come with every call, from the snapshot in force,
//! so the table lives across reloads and a changed limit applies from the next connection.
//!
//! **The rate** is a token bucket whose burst is the rate's count, kept the way GCRA (the
//! generic cell rate algorithm; redis-cell and the governor crate use it too) keeps one: as a
//! single time per client, when its bucket is full again. A connection at `now` is admitted
//! when that time is at most `burst - 1` token intervals after `now`, and moves it one interval
//! on. Once the time has passed the bucket is full and the entry tells nothing.
//!
//! **Memory.** A tracked client is one map entry: its address (16 bytes, IPv4 as IPv4-mapped
//! IPv6) and an [`Entry`] (12 bytes), plus hashbrown's control byte, in tables that are
//! between 7/16 and 7/8 full while they grow: 33 to 66 bytes a client; a million clients take
//! about 60 MiB (`benches/client_memory.rs`). A sweep that leaves a table under a quarter full
//! shrinks it. A client is tracked while it holds a connection admitted
//! under `max_open`, and up to the rate's period after its last connection under `rate`; a
//! listener without either limit tracks nobody. An entry that tells nothing goes: at once when
//! its last connection closes if no rate is in force, otherwise when its shard is swept, which
//! an admission does when the shard has doubled since its last sweep or [`SWEEP_PERIOD`] has
//! passed. A shard so never holds more than twice the entries that told something at its last
//! sweep, or [`MIN_SWEEP_LEN`]: memory follows the clients with connections open and those
//! seen within the last period, not every client ever seen.
//!
//! **Concurrency.** Workers admit and close connections at once, so the map is split into
//! [`SHARDS`] shards by a hash of the address, each a mutex over a hash table, on cache lines
//! of their own; a lock is held for one map operation (or a sweep), never across anything
//! else. Addresses hash with std's SipHash under random keys: whoever connects chooses them,
//! and a keyed hash keeps them from being chosen to collide. An address is hashed once per
//! admission, for both its shard and its place in the shard's table (hashbrown's `HashTable`,
//! the table beneath std's `HashMap`, takes the hash from its caller), and its guard keeps the
//! hash for the release.

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hashbrown::HashTable;
use hashbrown::hash_table::Entry as Slot;

use crate::config::ClientLimits;

/// Shards of a table: with a worker per core, two workers touch the same shard at the same
/// moment rarely, and an empty table stays small (64 blocks of 256 bytes, 16 KiB).
const SHARDS: usize = 64;

/// A shard is swept at an admission at least this often, so memory held after a burst of
/// clients is given back even when the shard does not grow again.
pub(crate) const SWEEP_PERIOD: Duration = Duration::from_secs(60);

const SWEEP_PERIOD_NANOS: u64 = SWEEP_PERIOD.as_nanos() as u64;

/// A shard is not swept for growing before it holds this many entries.
pub(crate) const MIN_SWEEP_LEN: usize = 64;

/// [`Entry::full_at`] of a client whose last connection came while no rate was in force.
const NO_RATE: u64 = 0;

/// Why a client's new connection is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Limited {
    /// The client holds `max_connections_per_client` connections already.
    #[error("the client holds max_connections_per_client connections already")]
    Open,
    /// The client has used up its `connection_rate_per_client` burst.
    #[error("the client opens connections faster than connection_rate_per_client")]
    Rate,
}

/// What one listener knows of each client address it tracks.
pub(crate) struct ClientTable {
    /// Times are kept as nanoseconds after this.
    epoch: Instant,
    /// Hashes addresses, for their shard and their place in it.
    hasher: RandomState,
    shards: Box<[Arc<Padded<Mutex<Shard>>>]>,
}

/// One client's state. Packed to 4-byte alignment so that, beside its 16-byte key, an entry
/// takes 28 bytes rather than 32.
#[derive(Debug, Clone, Copy)]
#[repr(C, packed(4))]
struct Entry {
    /// Its connections open now that were admitted under a `max_open`: only those hold a
    /// guard that will give the count back.
    open: u32,
    /// Nanoseconds after the epoch at which its token bucket is full again, or [`NO_RATE`].
    full_at: u64,
}

struct Shard {
    map: HashTable<(Ipv6Addr, Entry)>,
    /// The table's hasher, to place entries again when the map grows or shrinks.
    hasher: RandomState,
    /// Swept when `map` reaches this length.
    sweep_len: usize,
    /// Nanoseconds after the epoch of its last sweep.
    swept_at: u64,
}

/// Keeps what it holds on a cache line pair of its own (x86 prefetches lines in pairs), so
/// that two workers locking neighbouring shards do not slow each other. Behind an `Arc`, the
/// reference counts get a pair of their own too: a guard takes its shard's, never one that
/// every admission in the table would touch.
#[repr(align(128))]
struct Padded<T>(T);

/// A connection admitted by [`ClientTable::admit`]: while it lives, it counts as one of its
/// client's open connections (if `max_open` was set when it was admitted).
#[derive(Debug)]
#[must_use = "the connection counts as open only while the guard lives"]
pub(crate) struct ClientGuard {
    /// Gives the count back when dropped; `None` when nothing was counted.
    _held: Option<Held>,
}

struct Held {
    shard: Arc<Padded<Mutex<Shard>>>,
    hash: u64,
    key: Ipv6Addr,
}

impl ClientTable {
    /// An empty table.
    pub(crate) fn new() -> ClientTable {
        let hasher = RandomState::new();
        let shards = (0..SHARDS)
            .map(|_| {
                Arc::new(Padded(Mutex::new(Shard {
                    map: HashTable::new(),
                    hasher: hasher.clone(),
                    sweep_len: MIN_SWEEP_LEN,
                    swept_at: 0,
                })))
            })
            .collect();
        ClientTable {
            epoch: Instant::now(),
            hasher,
            shards,
        }
    }

    /// Admits one new connection from `ip` under `limits` at `now`, or says which limit
    /// refuses it. A refused connection costs its client nothing: neither a token nor an open
    /// slot. The guard keeps the connection counted open until it is dropped. Without limits
    /// nothing is looked up or stored.
    pub(crate) fn admit(
        &self,
        ip: IpAddr,
        limits: &ClientLimits,
        now: Instant,
    ) -> Result<ClientGuard, Limited> {
        if limits.is_unlimited() {
            return Ok(ClientGuard { _held: None });
        }
        let key = key(ip);
        let hash = self.hasher.hash_one(key);
        let shard = &self.shards[shard_of(hash)];
        lock(shard).admit(key, hash, limits, self.nanos(now))?;
        let held = limits.max_open.map(|_| Held {
            shard: Arc::clone(shard),
            hash,
            key,
        });
        Ok(ClientGuard { _held: held })
    }

    /// Clients tracked now, over all shards.
    pub(crate) fn tracked(&self) -> usize {
        (0..SHARDS).map(|shard| self.lock(shard).map.len()).sum()
    }

    /// Entries the maps have room for without growing, over all shards: what the memory
    /// they hold is proportional to.
    #[cfg(any(test, feature = "bench-internals"))]
    pub(crate) fn capacity(&self) -> usize {
        (0..SHARDS)
            .map(|shard| self.lock(shard).map.capacity())
            .sum()
    }

    /// Removes every entry that tells nothing at `now`, in every shard, and returns the
    /// entries left. Admissions sweep on their own; this is for a caller with a timer, so a
    /// table that sees no more connections gives its memory back too.
    pub(crate) fn sweep(&self, now: Instant) -> usize {
        let now = self.nanos(now);
        (0..SHARDS)
            .map(|shard| {
                let mut shard = self.lock(shard);
                shard.sweep(now);
                shard.map.len()
            })
            .sum()
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Shard> {
        lock(&self.shards[shard])
    }

    fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }
}

impl Default for ClientTable {
    fn default() -> ClientTable {
        ClientTable::new()
    }
}

impl fmt::Debug for ClientTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No count here: formatting takes no lock.
        f.debug_struct("ClientTable")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl Shard {
    fn admit(
        &mut self,
        key: Ipv6Addr,
        hash: u64,
        limits: &ClientLimits,
        now: u64,
    ) -> Result<(), Limited> {
        if self.map.len() >= self.sweep_len
            || now.saturating_sub(self.swept_at) >= SWEEP_PERIOD_NANOS
        {
            self.sweep(now);
        }
        // A new client is never refused (`max_open` and the burst are at least 1), so
        // inserting before deciding never leaves an entry behind for a refusal.
        let hasher = &self.hasher;
        let slot = self
            .map
            .entry(hash, |(k, _)| *k == key, |(k, _)| hasher.hash_one(k));
        let (_, entry) = match slot {
            Slot::Occupied(found) => found.into_mut(),
            Slot::Vacant(free) => {
                let new = Entry {
                    open: 0,
                    full_at: NO_RATE,
                };
                free.insert((key, new)).into_mut()
            }
        };
        if let Some(max) = limits.max_open {
            if entry.open >= max.get() {
                return Err(Limited::Open);
            }
        }
        entry.full_at = match limits.rate {
            // Whatever an earlier rate left is forgotten: it would only hold the entry.
            None => NO_RATE,
            Some(rate) => {
                let interval = rate.interval_nanos();
                let tolerance = interval.saturating_mul(u64::from(rate.burst().get() - 1));
                let from = entry.full_at.max(now);
                if from - now > tolerance {
                    return Err(Limited::Rate);
                }
                from.saturating_add(interval)
            }
        };
        if limits.max_open.is_some() {
            entry.open += 1;
        }
        Ok(())
    }

    /// Gives back one open connection of `key`, and forgets the client if that was its last
    /// and no rate is in force.
    fn release(&mut self, hash: u64, key: Ipv6Addr) {
        let Ok(mut found) = self.map.find_entry(hash, |(k, _)| *k == key) else {
            debug_assert!(false, "a guard's entry is kept while it lives");
            return;
        };
        let entry = &mut found.get_mut().1;
        let open = entry.open;
        debug_assert!(open > 0, "a guard counts one open connection");
        entry.open = open.saturating_sub(1);
        if entry.open == 0 && entry.full_at == NO_RATE {
            found.remove();
        }
    }

    /// Removes the entries that tell nothing at `now` (no open connection, bucket full) and
    /// gives memory back when most of the map is empty.
    fn sweep(&mut self, now: u64) {
        self.map
            .retain(|(_, entry)| entry.open > 0 || entry.full_at > now);
        let len = self.map.len();
        if self.map.capacity() > 4 * len.max(MIN_SWEEP_LEN) {
            let hasher = &self.hasher;
            self.map.shrink_to(2 * len, |(k, _)| hasher.hash_one(k));
        }
        self.sweep_len = (2 * len).max(MIN_SWEEP_LEN);
        self.swept_at = now;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        lock(&self.shard).release(self.hash, self.key);
    }
}

impl fmt::Debug for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Held")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

fn lock(shard: &Padded<Mutex<Shard>>) -> MutexGuard<'_, Shard> {
    // A panic under the lock (there is no code that panics there) would leave the map whole:
    // each operation on it completes or does not start.
    shard.0.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The shard of an address hashed to `hash`: bits 32 to 37, which a shard's table uses for
/// neither the bucket (the low bits, of which a table under 2^32 buckets uses fewer than 32)
/// nor the tag it keeps beside it (the top 7), so the addresses of one shard still spread over
/// all of its table.
fn shard_of(hash: u64) -> usize {
    (hash >> 32) as usize % SHARDS
}

/// An address as the table keys it: IPv4 as IPv4-mapped IPv6, so that a client reaching a
/// dual-stack socket and an IPv4 one is the same client.
fn key(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(ip) => ip.to_ipv6_mapped(),
        IpAddr::V6(ip) => ip,
    }
}

#[cfg(test)]
mod tests;
