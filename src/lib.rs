//! weighbridge: a Layer-4 TCP load balancer for fleets of AI inference servers.
//!
//! Clients connect to a listener; the listener's [`strategy`] picks a backend by weight from the
//! current [`snapshot`]; the [`proxy`] relays bytes both ways until both sides are done. An
//! optional admin HTTP endpoint (`[admin]` in the file) serves Prometheus metrics and status and
//! takes drain, enable and reload requests.
//! [`health`] checks, passive ejection, slow start and reported load move the effective weights
//! while it runs.
//!
//! The library holds all of it; the `weighbridge` binary is a thin command line over
//! [`config::load`], [`Balancer::bind`] and [`Balancer::run`]. See `ARCHITECTURE` in the README
//! for the map of modules and the invariants they keep.

#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]

mod admin;
pub mod backend;
mod balancer;
pub mod config;
pub mod health;
pub mod histogram;
pub mod listener;
pub mod proxy;
mod reactor;
pub mod reload;
pub mod snapshot;
pub mod strategy;
mod workers;

pub use balancer::{AdminError, Balancer, Handle, LastReload, ReloadCounters, StartError, Stopped};
pub use config::{Config, ConfigError};
pub use listener::BindError;
