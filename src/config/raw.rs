//! The serde mirror of the TOML file.
//!
//! These types say what may be *written*, not what is *valid*: every value a user can get wrong
//! beyond its TOML type is kept as written, with its span, so that validation in the parent module
//! can name the line of the offending key. `deny_unknown_fields` everywhere: a typo is an error,
//! never a silently ignored key.

use serde::Deserialize;
use toml::Spanned;

use super::LogFormat;
use crate::strategy::StrategyKind;

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

/// One `[[listener]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListener {
    pub(crate) name: Spanned<String>,
    pub(crate) bind: Spanned<String>,
    pub(crate) strategy: Option<Spanned<StrategyKind>>,
    pub(crate) connect_timeout: Option<Spanned<String>>,
    pub(crate) idle_timeout: Option<Spanned<String>>,
    pub(crate) connect_attempts: Option<Spanned<u64>>,
    pub(crate) max_connections: Option<Spanned<u64>>,
    pub(crate) splice: Option<bool>,
    #[serde(default)]
    pub(crate) backend: Vec<Spanned<RawBackend>>,
}

/// One `[[listener.backend]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBackend {
    pub(crate) addr: Spanned<String>,
    pub(crate) weight: Option<Spanned<f64>>,
}
