//! Live state that the data plane and the control plane share beside the snapshot: counters,
//! operator and health states, and the registry that keeps them across snapshots.
//!
//! A snapshot is immutable and rebuilt on every change; what must survive a rebuild (the
//! connections open to a backend, its drain, its health streaks) lives here, reached from the
//! snapshot through `Arc`s. The connection path only touches atomics here, never a lock, but
//! for a pool's queue, which only clients that wait for a slot (and whoever serves them) take,
//! and a shard of a listener's client table, on listeners with per-client limits.

pub(crate) mod backend;
pub(crate) mod clients;
pub(crate) mod histogram;
pub(crate) mod listener;
pub(crate) mod names;
pub(crate) mod pool;
pub(crate) mod registry;

pub(crate) use backend::{ActiveConn, BackendState};
pub use backend::{AdminState, BackendCounters};
pub(crate) use clients::{ClientGuard, Limited};
pub use listener::ListenerCounters;
pub(crate) use listener::{ListenerStats, OpenConn, Rejection};
pub use names::NameStatus;
pub(crate) use names::Names;
pub use pool::QueueCounters;
pub(crate) use pool::{PoolState, Refused, Waiter, note_freed, take_freed};
pub(crate) use registry::{Registry, RemovedBackend, Republisher};
