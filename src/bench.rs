//! What the benches measure beneath the public API, with feature `bench-internals`: a pool's
//! pick with slots (`benches/slots.rs`), a listener's `allow`/`deny` lookup and per-client
//! admission (`benches/clients.rs`), and the memory a tracked client takes
//! (`benches/client_memory.rs`).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

pub use crate::snapshot::bench::{Slot, SlotPool};

use crate::config::{self, ClientLimits, Networks, Rate};
use crate::state;

/// A listener's `allow` and `deny` lists.
#[derive(Debug, Clone)]
pub struct Access(config::Access);

impl Access {
    /// Parses both lists as the configuration does; `None` is a key left out. The error names
    /// the bad entry.
    pub fn parse(allow: Option<&[String]>, deny: Option<&[String]>) -> Result<Access, String> {
        let parse = |list: Option<&[String]>| {
            list.map(Networks::parse)
                .transpose()
                .map_err(|e| e.to_string())
        };
        Ok(Access(config::Access::new(parse(allow)?, parse(deny)?)))
    }

    /// Whether a client at `ip` may connect.
    pub fn admits(&self, ip: IpAddr) -> bool {
        self.0.admits(ip)
    }
}

/// A listener's per-client table with its limits.
#[derive(Debug)]
pub struct ClientTable {
    table: state::clients::ClientTable,
    limits: ClientLimits,
}

/// A connection admitted by [`ClientTable::admit`], counted open until dropped.
#[derive(Debug)]
pub struct ClientGuard {
    _held: state::ClientGuard,
}

impl ClientTable {
    /// A table under `max_open` connections per client and `rate` (a count per period); a
    /// zero count or period is no limit.
    pub fn new(max_open: Option<u32>, rate: Option<(u32, Duration)>) -> ClientTable {
        let rate = rate.and_then(|(count, per)| Rate::new(NonZeroU32::new(count)?, per));
        ClientTable {
            table: state::clients::ClientTable::new(),
            limits: ClientLimits {
                max_open: max_open.and_then(NonZeroU32::new),
                rate,
            },
        }
    }

    /// Admits a connection from `ip` at `now`, or `None` if a limit refuses it.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Option<ClientGuard> {
        let held = self.table.admit(ip, &self.limits, now).ok()?;
        Some(ClientGuard { _held: held })
    }

    /// Clients tracked now.
    pub fn tracked(&self) -> usize {
        self.table.tracked()
    }

    /// Entries the table has room for without growing.
    pub fn capacity(&self) -> usize {
        self.table.capacity()
    }

    /// Removes what tells nothing at `now`; returns the clients left.
    pub fn sweep(&self, now: Instant) -> usize {
        self.table.sweep(now)
    }
}
