//! The serde mirror of the TOML file.
//!
//! These types say what may be *written*, not what is *valid*: every value a user can get wrong
//! beyond its TOML type is kept as written, with its span, so that validation in the parent module
//! can name the line of the offending key. `deny_unknown_fields` everywhere: a typo is an error,
//! never a silently ignored key.

use serde::Deserialize;
use toml::Spanned;

use super::LogFormat;
use super::StrategyKind;
use super::clients::{ProxyAccept, SendProxy};
use super::discovery::RawResolver;
use super::routes::{HashKey, RawRoute};
use crate::config::{AllUnhealthy, LoadPreset, ProbeKind};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub(crate) shutdown_grace: Option<Spanned<String>>,
    pub(crate) threads: Option<Spanned<u64>>,
    pub(crate) admin: Option<Spanned<RawAdmin>>,
    pub(crate) log: Option<RawLog>,
    #[serde(default)]
    pub(crate) listener: Vec<Spanned<RawListener>>,
    #[serde(default)]
    pub(crate) pool: Vec<Spanned<RawPool>>,
    pub(crate) resolver: Option<Spanned<RawResolver>>,
}

/// The `[admin]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    pub(crate) bind: Spanned<String>,
    pub(crate) token: Option<Spanned<String>>,
}

/// The `[log]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLog {
    pub(crate) format: Option<LogFormat>,
    pub(crate) access_log: Option<bool>,
}

/// One `[[listener]]` table. The pool keys (`strategy`, `queue_timeout`, `max_queued`,
/// `health`, `passive`, `backend`) make the listener's own pool, the inline form; `pool` names a
/// `[[pool]]` instead, and then none of them may be written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListener {
    pub(crate) name: Spanned<String>,
    pub(crate) bind: Spanned<String>,
    pub(crate) pool: Option<Spanned<String>>,
    pub(crate) strategy: Option<Spanned<StrategyKind>>,
    pub(crate) queue_timeout: Option<Spanned<String>>,
    pub(crate) max_queued: Option<Spanned<u64>>,
    pub(crate) connect_timeout: Option<Spanned<String>>,
    pub(crate) idle_timeout: Option<Spanned<String>>,
    pub(crate) connect_attempts: Option<Spanned<u64>>,
    pub(crate) max_connections: Option<Spanned<u64>>,
    pub(crate) splice: Option<bool>,
    pub(crate) backend_congestion_control: Option<Spanned<String>>,
    pub(crate) accept_proxy: Option<Spanned<ProxyAccept>>,
    pub(crate) proxy_trusted: Option<Spanned<Vec<Spanned<String>>>>,
    pub(crate) send_proxy: Option<Spanned<SendProxy>>,
    pub(crate) allow: Option<Spanned<Vec<Spanned<String>>>>,
    pub(crate) deny: Option<Spanned<Vec<Spanned<String>>>>,
    pub(crate) max_connections_per_client: Option<Spanned<u64>>,
    pub(crate) connection_rate_per_client: Option<Spanned<String>>,
    pub(crate) client_hello_timeout: Option<Spanned<String>>,
    pub(crate) hash_key: Option<Spanned<HashKey>>,
    pub(crate) hash_balance_factor: Option<Spanned<f64>>,
    pub(crate) health: Option<Spanned<RawHealth>>,
    pub(crate) passive: Option<Spanned<RawPassive>>,
    #[serde(default)]
    pub(crate) backend: Vec<Spanned<RawBackend>>,
    #[serde(default)]
    pub(crate) route: Vec<Spanned<RawRoute>>,
}

/// One `[[pool]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPool {
    pub(crate) name: Spanned<String>,
    pub(crate) strategy: Option<Spanned<StrategyKind>>,
    pub(crate) queue_timeout: Option<Spanned<String>>,
    pub(crate) max_queued: Option<Spanned<u64>>,
    pub(crate) hash_key: Option<Spanned<HashKey>>,
    pub(crate) hash_balance_factor: Option<Spanned<f64>>,
    pub(crate) health: Option<Spanned<RawHealth>>,
    pub(crate) passive: Option<Spanned<RawPassive>>,
    #[serde(default)]
    pub(crate) backend: Vec<Spanned<RawBackend>>,
}

/// The `[listener.health]` (or `[pool.health]`) table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealth {
    pub(crate) kind: Option<Spanned<ProbeKind>>,
    pub(crate) path: Option<Spanned<String>>,
    pub(crate) host: Option<Spanned<String>>,
    pub(crate) expect_status: Option<Spanned<Vec<Spanned<i64>>>>,
    pub(crate) expect_body: Option<Spanned<String>>,
    pub(crate) interval: Option<Spanned<String>>,
    pub(crate) timeout: Option<Spanned<String>>,
    pub(crate) rise: Option<Spanned<u64>>,
    pub(crate) fall: Option<Spanned<u64>>,
    pub(crate) startup_grace: Option<Spanned<String>>,
    pub(crate) slow_start: Option<Spanned<String>>,
    pub(crate) all_unhealthy: Option<Spanned<AllUnhealthy>>,
    pub(crate) load: Option<Spanned<RawLoad>>,
}

/// The `[listener.health.load]` (or `[pool.health.load]`) table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLoad {
    pub(crate) preset: Option<Spanned<LoadPreset>>,
    pub(crate) path: Option<Spanned<String>>,
    pub(crate) port: Option<Spanned<u64>>,
    pub(crate) metric: Option<Spanned<String>>,
    pub(crate) in_flight_metrics: Option<Spanned<Vec<Spanned<String>>>>,
    pub(crate) saturation: Option<Spanned<f64>>,
    pub(crate) min_weight_percent: Option<Spanned<f64>>,
    pub(crate) interval: Option<Spanned<String>>,
}

/// The `[listener.passive]` (or `[pool.passive]`) table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPassive {
    pub(crate) max_connect_failures: Option<Spanned<u64>>,
    pub(crate) eject_for: Option<Spanned<String>>,
}

/// One `[[listener.backend]]` (or `[[pool.backend]]`) table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBackend {
    pub(crate) addr: Option<Spanned<String>>,
    pub(crate) srv: Option<Spanned<String>>,
    pub(crate) weight: Option<Spanned<f64>>,
    pub(crate) health_addr: Option<Spanned<String>>,
    pub(crate) max_connections: Option<Spanned<u64>>,
    pub(crate) send_proxy: Option<Spanned<SendProxy>>,
}
