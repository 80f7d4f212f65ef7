//! The data plane: where a connection lives, from accept to close.
//!
//! Worker threads ([`workers`]), one per core, each run an `epoll` event loop
//! ([`event_loop`]) over their own listening sockets ([`accept`]) and connections. A connection
//! is a state machine ([`conn`]) that picks a backend from the snapshot it loaded at accept
//! (waiting in its pool's queue, [`queue`], when every slot is taken), connects ([`connect`]),
//! relays bytes both ways ([`relay`], [`splice`]) and writes its access log line
//! ([`access_log`]) when it ends.
//!
//! Nothing here waits on the control plane, and the only lock is a pool's queue, taken only by
//! clients that wait for a slot and by whoever serves them: a connection reads the snapshot
//! once and updates live state with atomics. The control plane reaches a worker only through its
//! `Remote` (a command channel and a waker).

pub(crate) mod accept;
pub(crate) mod access_log;
mod client_hello;
mod conn;
mod connect;
pub(crate) mod event_loop;
pub(crate) mod proxy;
pub(crate) mod queue;
mod relay;
pub(crate) mod remote;
#[cfg(target_os = "linux")]
mod splice;
mod table;
mod throttle;
mod token;
pub(crate) mod workers;

pub use access_log::ACCESS_LOG_TARGET;
