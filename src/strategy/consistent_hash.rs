//! Consistent hashing with bounded loads: a client (by address, or by the server name it asks
//! for) goes back to the same backend while the pool is unchanged, and no backend carries more
//! than `balance_factor` times its share of the pool's open connections.
//!
//! The ring is Karger's: each backend owns points on a 64-bit circle, as many as its weight
//! gives it (`POINTS_PER_UNIT` for the mean weight), placed by hashing its address and the
//! point's number; a key goes to the owner of the first point at or after the key's hash. A
//! backend added or removed takes or gives up only its own points, so only about 1/n of the keys
//! move, and a weight that changes (slow start, reported load) adds or drops points at the end
//! of its sequence and moves only the keys of those points. Point positions depend on nothing
//! but the backend's address, so two balancers with the same backends map keys alike.
//!
//! Bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2017; HAProxy's `hash-balance-factor`,
//! Envoy's `hash_balance_factor`): a backend may take a new connection while its open
//! connections stay within `ceil(factor × (open in the pool + 1) × weight / total weight)`. A
//! key whose backend is at its bound goes on round the ring to the next backend that is not, so
//! a hot key spills over to the same few neighbours each time rather than anywhere. With a
//! factor of at least 1 the bounds add up to more than the pool holds, so some backend always
//! has room.
//!
//! The ring is built with the strategy, by the control task, never on the connection path. A
//! pick finds the key's point through a table of the ring's first index for each 16-bit prefix
//! of the circle, so its cost does not grow with the pool: a few comparisons, then the walk.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64;

use super::Strategy;
use crate::state::BackendState;

/// Points a backend of the pool's mean weight owns. Karger's analysis and HAProxy (which uses
/// 16 per unit of its 1–256 weights) trade memory against evenness: with 100 points per
/// backend, shares stay within about ±10 % of the weights (the unit tests measure it).
const POINTS_PER_UNIT: f64 = 100.0;
/// Most points one backend owns, however much heavier than the mean it is.
const MAX_POINTS: f64 = 100.0 * 64.0;
/// Bits of the circle the lookup table resolves.
const PREFIX_BITS: u32 = 16;

/// Consistent hashing over a ring of points, with an optional bound on each backend's load.
#[derive(Debug)]
pub(crate) struct ConsistentHash {
    /// Point positions, ascending.
    hashes: Box<[u64]>,
    /// The backend owning each point.
    owners: Box<[u32]>,
    /// For each 16-bit prefix, the first point at or after its start (`hashes.len()` past the
    /// last one).
    first: Box<[u32]>,
    /// Each backend's weight (0 for those without points) and live counters.
    members: Box<[Member]>,
    /// The sum of the weights of backends with points.
    total_weight: f64,
    /// `None` for plain consistent hashing.
    balance_factor: Option<f64>,
}

#[derive(Debug)]
struct Member {
    weight: f64,
    stats: Arc<BackendState>,
}

impl ConsistentHash {
    /// The ring over backends at `addrs` with weights `weights` (0 for none) and live counters
    /// `live`; `balance_factor` 0 means no bound.
    pub(crate) fn new<'a>(
        addrs: &[SocketAddr],
        weights: &[f64],
        live: impl IntoIterator<Item = &'a Arc<BackendState>>,
        balance_factor: f64,
    ) -> ConsistentHash {
        let members: Box<[Member]> = weights
            .iter()
            .zip(live)
            .map(|(&weight, stats)| Member {
                weight,
                stats: Arc::clone(stats),
            })
            .collect();
        let positive: Vec<f64> = weights.iter().copied().filter(|&w| w > 0.0).collect();
        let total_weight: f64 = positive.iter().sum();
        let mean = if positive.is_empty() {
            1.0
        } else {
            total_weight / positive.len() as f64
        };
        let mut points: Vec<(u64, u32)> = Vec::new();
        for (index, (addr, &weight)) in addrs.iter().zip(weights).enumerate() {
            if weight <= 0.0 {
                continue;
            }
            // At least one point: a light backend still takes some keys.
            let count = (POINTS_PER_UNIT * weight / mean)
                .round()
                .clamp(1.0, MAX_POINTS) as u32;
            let owner = u32::try_from(index).unwrap_or(u32::MAX);
            // Address (16 bytes), port (2), point number (4).
            let mut seed = [0_u8; 22];
            seed[..16].copy_from_slice(&octets(addr.ip()));
            seed[16..18].copy_from_slice(&addr.port().to_be_bytes());
            for point in 0..count {
                seed[18..].copy_from_slice(&point.to_be_bytes());
                points.push((xxh3_64(&seed), owner));
            }
        }
        points.sort_unstable();
        let hashes: Box<[u64]> = points.iter().map(|&(hash, _)| hash).collect();
        let owners: Box<[u32]> = points.iter().map(|&(_, owner)| owner).collect();
        let mut first = Vec::with_capacity((1 << PREFIX_BITS) + 1);
        let mut at = 0_usize;
        for prefix in 0..(1_u64 << PREFIX_BITS) {
            let start = prefix << (64 - PREFIX_BITS);
            while at < hashes.len() && hashes[at] < start {
                at += 1;
            }
            first.push(u32::try_from(at).unwrap_or(u32::MAX));
        }
        first.push(u32::try_from(hashes.len()).unwrap_or(u32::MAX));
        ConsistentHash {
            hashes,
            owners,
            first: first.into_boxed_slice(),
            members,
            total_weight,
            balance_factor: (balance_factor > 0.0).then_some(balance_factor),
        }
    }

    /// The index of the first point at or after `hash`, wrapping to 0 past the last.
    #[inline]
    fn start(&self, hash: u64) -> usize {
        let prefix = (hash >> (64 - PREFIX_BITS)) as usize;
        let low = self.first[prefix] as usize;
        let high = self.first[prefix + 1] as usize;
        let within = self.hashes[low..high].partition_point(|&h| h < hash);
        let index = low + within;
        if index == self.hashes.len() { 0 } else { index }
    }

    /// Connections open to the pool: its own count, or for backends outside a balancer (tests,
    /// benchmarks) the sum of theirs.
    fn pool_open(&self) -> u64 {
        match self.members.first().and_then(|m| m.stats.pool_open()) {
            Some(open) => open,
            None => self.members.iter().map(|m| m.stats.active()).sum(),
        }
    }

    /// Whether backend `index` may take one more connection under the load bound.
    #[inline]
    fn has_room(&self, index: usize, pool_open: u64) -> bool {
        let Some(factor) = self.balance_factor else {
            return true;
        };
        let member = &self.members[index];
        let bound = (factor * (pool_open as f64 + 1.0) * member.weight / self.total_weight).ceil();
        (member.stats.active() as f64) < bound
    }

    /// The backend for `key`, skipping `tried`.
    pub(crate) fn pick_key(&self, key: u64, tried: &[usize]) -> Option<usize> {
        if self.hashes.is_empty() {
            return None;
        }
        let pool_open = match self.balance_factor {
            Some(_) => self.pool_open(),
            None => 0,
        };
        let start = self.start(hash_u64(key));
        let len = self.hashes.len();
        // The first backend met that was passed over only for its bound: where the key goes
        // if every backend is at its bound (the counts moved under the walk).
        let mut over_bound: Option<usize> = None;
        let mut last = usize::MAX;
        for step in 0..len {
            let index = self.owners[(start + step) % len] as usize;
            // Runs of one owner's points: judged once.
            if index == last || tried.contains(&index) {
                continue;
            }
            last = index;
            if self.has_room(index, pool_open) {
                return Some(index);
            }
            over_bound.get_or_insert(index);
        }
        over_bound
    }
}

impl Strategy for ConsistentHash {
    /// A connection without a key of its own: its turn stands for one, so such connections
    /// spread over the ring in proportion to the weights.
    fn pick(&self, turn: u64, tried: &[usize]) -> Option<usize> {
        self.pick_key(turn, tried)
    }

    fn pick_keyed(&self, key: u64, _turn: u64, tried: &[usize]) -> Option<usize> {
        self.pick_key(key, tried)
    }
}

/// The 16 bytes of an address, IPv4 ones mapped into IPv6.
fn octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Spreads a key over the circle: keys that differ in a few low bits (turns, small hashes)
/// land far apart.
#[inline]
fn hash_u64(key: u64) -> u64 {
    xxh3_64(&key.to_le_bytes())
}

/// The key of a client address: the same for an address whichever port it connects from.
pub(crate) fn client_key(ip: IpAddr) -> u64 {
    xxh3_64(&octets(ip))
}

/// The key of a server name, compared without case.
pub(crate) fn name_key(name: &str) -> u64 {
    let mut lower = [0_u8; 256];
    let bytes = name.as_bytes();
    if bytes.len() <= lower.len() {
        for (out, byte) in lower.iter_mut().zip(bytes) {
            *out = byte.to_ascii_lowercase();
        }
        xxh3_64(&lower[..bytes.len()])
    } else {
        xxh3_64(name.to_ascii_lowercase().as_bytes())
    }
}

#[cfg(test)]
mod tests;
