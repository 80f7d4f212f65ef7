//! weighbridge: a Layer-4 TCP load balancer for fleets of AI inference servers.
//!
//! Clients connect to a listener; the listener's strategy picks a backend by weight from the
//! current snapshot; the data plane relays bytes both ways until both sides are done. Health
//! checks, passive ejection, slow start and reported load move the effective weights while it
//! runs; an optional admin HTTP endpoint serves Prometheus metrics and status and takes drain,
//! enable and reload requests.
//!
//! The library holds all of it; the `weighbridge` binary is a thin command line over
//! [`Config::load`], [`Balancer::bind`] and [`Balancer::run`]. ARCHITECTURE.md at the root of
//! the repository maps the modules and the invariants they keep.

#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]

mod admin;
mod balancer;
#[cfg(feature = "bench-internals")]
#[doc(hidden)]
pub mod bench;
mod config;
mod control;
mod dataplane;
mod health;
mod snapshot;
mod state;
mod strategy;

pub use balancer::{Balancer, Builder, StartError};
pub use config::{Config, ConfigError, DEFAULT_CONFIG_PATH, LogFormat, Target};
pub use control::{
    AdminError, Handle, LastReload, Lifecycle, ReloadCounters, ReloadError, ReloadSummary, Stopped,
    resolve_names, watch,
};
pub use dataplane::ACCESS_LOG_TARGET;
pub use dataplane::accept::{BindError, InheritedSocket, Served};
pub use health::{Health, HealthStatus, LastCheck, ProbeError};
pub use state::{AdminState, BackendCounters, ListenerCounters, NameStatus, QueueCounters};
pub use strategy::{BuildStrategy, Candidate, LiveBackend, OpenGuard, Strategy, StrategyKind};
