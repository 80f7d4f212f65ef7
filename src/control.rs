//! The control plane: everything that changes what the data plane does.
//!
//! One control task ([`task`]) owns the snapshot and is its only writer. Reloads (file edits
//! seen by the [`watch`]er, SIGHUP, the admin endpoint), operator drain and enable, and health
//! verdicts from the checkers the [`supervisor`] runs all reach it as messages or wake-ups
//! through a [`Handle`]; it rebuilds what changed ([`reload`]) and publishes one new snapshot.
//! The listening sockets it hands to the workers are kept in [`listeners`].

mod checker;
pub(crate) mod discovery;
mod handle;
mod lifecycle;
mod listeners;
mod reload;
mod summary;
mod supervisor;
pub(crate) mod task;
mod watch;

pub use discovery::resolve_names;
pub use handle::{AdminError, Handle, LastReload, ReloadCounters};
pub(crate) use handle::{Request, Scope};
pub use lifecycle::Lifecycle;
pub(crate) use lifecycle::{Observer, Observers};
pub use listeners::Stopped;
pub(crate) use listeners::log_listening;
pub use summary::{ReloadError, ReloadSummary};
pub use watch::watch;
