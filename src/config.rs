//! The configuration file: read, parse, validate, and turn into typed [`Config`].
//!
//! Three stages, three types. `raw` mirrors the file for serde and keeps every value's span;
//! `validate` checks what TOML types cannot express (addresses, durations, weights, uniqueness)
//! and reports the line of the offending key; [`Config`] is what the runtime gets, and holds
//! only values that are valid by construction. Nothing here touches the network: binding a
//! listener is the listener module's job, so `--check` cannot fail on a busy port. One key is
//! checked against the machine: `congestion` tries `backend_congestion_control` on a socket
//! that is never connected, so an algorithm the kernel refuses fails `--check`.
//!
//! Beside the typed configuration, its defaults and the entry points ([`load`], [`read`],
//! [`parse`]) here: `error` says what can be wrong and how it is reported ([`ConfigError`]),
//! `token` holds the admin bearer [`Token`], `health` the health, load and passive tables,
//! `networks` a listener's client networks (`allow`, `deny`) and `client_limits` its
//! per-client limits.

mod client_limits;
mod clients;
mod congestion;
mod discovery;
mod error;
mod health;
mod networks;
mod raw;
mod routes;
mod strategy;
mod token;
mod validate;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

pub(crate) use discovery::{MIN_REFRESH, NamedBackend, ResolverSettings};
use error::toml_message;
use raw::RawConfig;

pub(crate) use client_limits::{ClientLimits, Rate};
pub(crate) use clients::{ClientsConfig, SendProxy};
pub(crate) use clients::{ProxyAccept, ProxyVersion};
pub(crate) use congestion::{CongestionControl, CongestionError};
pub use discovery::Target;
pub use error::ConfigError;
pub(crate) use error::{ConfigErrorKind, Location};
#[cfg(test)]
pub(crate) use health::ExpectStatus;
pub(crate) use health::{
    AllUnhealthy, HealthConfig, HttpProbe, LoadConfig, LoadPreset, MAX_EJECTION, PassiveConfig,
    Probe, ProbeKind,
};
pub(crate) use networks::{Access, NetworkError, Networks};
pub(crate) use routes::{
    Affinity, DEFAULT_BALANCE_FACTOR, DEFAULT_CLIENT_HELLO_TIMEOUT, HashKey, Routes, SniPattern,
};
pub use strategy::StrategyKind;
pub(crate) use token::Token;

/// Path the `weighbridge` command reads when neither `--config` nor `$WEIGHBRIDGE_CONFIG` names
/// a file: where packages and the container image install it.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/weighbridge/weighbridge.toml";
/// How long open connections may take to finish after SIGTERM before the process exits anyway.
/// 30 s matches Kubernetes' default termination grace period.
pub(crate) const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Upper bound on one TCP connect to a backend. 2 s is long for a LAN (a healthy backend answers in
/// microseconds) yet short enough that a dead one costs a client little before the next is tried.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A connection with no byte in either direction for this long is closed. 10 minutes is nginx's
/// `proxy_timeout`; inference streams send tokens far more often than that.
pub(crate) const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Distinct backends tried per client connection when connects are refused or time out
/// (HAProxy's `retries` defaults to 3 too).
pub(crate) const DEFAULT_CONNECT_ATTEMPTS: NonZeroU32 = NonZeroU32::new(3).expect("3 is not zero");
/// How long a client may wait in its pool's queue for a free slot. A minute covers a long
/// generation finishing somewhere in a busy fleet; HAProxy's `timeout queue` falls back to
/// `timeout connect`, which is too short to wait out a stream.
pub(crate) const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(60);
/// Clients waiting in one pool's queue at most (as many as a listener holds by default).
pub(crate) const DEFAULT_MAX_QUEUED: usize = 10_000;
/// Open client connections per listener beyond which new ones are closed at once.
pub(crate) const DEFAULT_MAX_CONNECTIONS: NonZeroUsize =
    NonZeroUsize::new(10_000).expect("not zero");

/// Whether listeners splice by default: yes. A direction starts on the copy path and moves to
/// `splice(2)` only at its first read that fills the whole buffer, so request/response traffic
/// is copied and only bulk streams go zero-copy (what HAProxy's `splice-auto` aims
/// at, without its opt-in).
///
/// Splice is the default because it costs the balancer less CPU per byte on bulk streams and
/// keeps a single stream's rate steady wherever the scheduler puts the threads; the
/// measurements are in docs/benchmarks.md, "Copy or splice". `splice = false` copies.
/// Elsewhere than Linux the key is accepted and ignored.
pub(crate) const DEFAULT_SPLICE: bool = true;

/// Most worker threads `threads` may ask for (HAProxy builds allow 64 by default, 4,096 at most).
pub(crate) const MAX_THREADS: usize = 1024;

/// The longest duration any key accepts. Deadlines are `Instant`s, and an instant plus
/// "300000000000y" overflows (a panic in the timer code); a year is far beyond any sensible
/// timeout, interval or ejection (HAProxy's timeouts stop at about 24 days).
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// The validated configuration: every value here is usable as it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// How long shutdown waits for open connections.
    pub(crate) shutdown_grace: Duration,
    /// Worker threads; `None` means one per CPU core. Read at start only.
    pub(crate) threads: Option<NonZeroUsize>,
    /// The admin HTTP endpoint, if the file has an `[admin]` table.
    pub(crate) admin: Option<AdminConfig>,
    /// Log format and the access log.
    pub(crate) log: LogConfig,
    /// At least one listener; names and bind addresses are unique.
    pub(crate) listeners: Vec<ListenerConfig>,
    /// Every pool, the listeners' own (inline) ones included, in file order; names unique.
    pub(crate) pools: Vec<PoolConfig>,
    /// How backend names are resolved.
    pub(crate) resolver: ResolverSettings,
}

/// The `[admin]` table: where the admin HTTP endpoint listens and who may use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AdminConfig {
    /// Address of the endpoint; no listener binds the same one.
    pub bind: SocketAddr,
    /// Bearer token every request but `GET /healthz` must carry. Always set when `bind` is not
    /// a loopback address: whoever reaches the port could otherwise drain every backend.
    pub token: Option<Token>,
}

/// The `[log]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct LogConfig {
    /// How every log line is written.
    pub format: LogFormat,
    /// One info line per closed client connection (target `weighbridge::access`). Off by
    /// default: at thousands of short connections a second it is most of the log.
    pub access_log: bool,
}

/// How log lines are written; the `format` key of `[log]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// `tracing`'s human-readable lines: time, level, target, message, `key=value` fields.
    #[default]
    Text,
    /// One JSON object per line, fields at the top level, for log shippers.
    Json,
}

impl LogFormat {
    /// `text` or `json`, as written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// One listening socket: what is about the client. Which backends its connections go to is its
/// pool's business.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ListenerConfig {
    /// Unique, non-empty name used in logs and to key live state.
    pub name: String,
    /// Address to listen on; port 0 asks the kernel for a free port.
    pub bind: SocketAddr,
    /// Where its connections go: one pool, or a pool by server name.
    pub forward: Forward,
    /// How long a client may take to send its whole TLS ClientHello, where the listener reads
    /// it (to route by name, or for a pool keyed by name).
    pub client_hello_timeout: Duration,
    /// Upper bound on one connect attempt to a backend.
    pub connect_timeout: Duration,
    /// A connection idle this long in both directions is closed.
    pub idle_timeout: Duration,
    /// Distinct backends tried per client connection.
    pub connect_attempts: NonZeroU32,
    /// Open client connections beyond this are refused.
    pub max_connections: NonZeroUsize,
    /// Move bytes with `splice(2)` (zero copy, Linux) rather than through user-space buffers.
    pub splice: bool,
    /// The TCP congestion control set on sockets toward the backends; `None` leaves the
    /// system's (`net.ipv4.tcp_congestion_control`), as HAProxy and nginx do.
    pub backend_congestion_control: Option<CongestionControl>,
    /// The PROXY protocol both ways, allow/deny lists, per-client limits.
    pub clients: ClientsConfig,
}

/// Where a listener's connections go.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Forward {
    /// Every connection to one pool: a `[[pool]]`, or the listener's own (named after it) in
    /// the inline form. Always one of [`Config::pools`].
    Pool(String),
    /// To the pool of the first route matching the ClientHello's server name; every route's
    /// pool is one of [`Config::pools`].
    Routes(Routes),
}

impl ListenerConfig {
    /// The pools its connections may go to, each once, in route order.
    pub(crate) fn pools(&self) -> Vec<&str> {
        match &self.forward {
            Forward::Pool(pool) => vec![pool.as_str()],
            Forward::Routes(routes) => {
                let mut pools: Vec<&str> = Vec::with_capacity(routes.routes.len());
                for route in &routes.routes {
                    if !pools.contains(&route.pool.as_str()) {
                        pools.push(&route.pool);
                    }
                }
                pools
            }
        }
    }

    /// Whether some of its connections may go to pool `name`.
    pub(crate) fn uses_pool(&self, name: &str) -> bool {
        match &self.forward {
            Forward::Pool(pool) => pool == name,
            Forward::Routes(routes) => routes.routes.iter().any(|r| r.pool == name),
        }
    }
}

/// A set of backends and what is about them: how to choose, how to judge health and load, and
/// the queue of clients waiting for a free slot. Live state (counters, health, slots, the
/// queue) belongs to the pool's backends, whichever listener a connection came through.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PoolConfig {
    /// Unique, non-empty; a listener's own pool has the listener's name.
    pub name: String,
    /// Written inline in a `[[listener]]` table rather than as a `[[pool]]`: errors and status
    /// output name it after its listener.
    pub inline: bool,
    /// How a backend is picked for each new connection.
    pub strategy: StrategyKind,
    /// What `consistent_hash` keys connections by, and its load bound; `Some` exactly when the
    /// strategy is `consistent_hash`.
    pub affinity: Option<Affinity>,
    /// How long a client may wait for a free slot; zero closes it at once.
    pub queue_timeout: Duration,
    /// Clients waiting at most; one more is closed at once.
    pub max_queued: usize,
    /// Active health checks (and load-following weights), if configured.
    pub health: Option<HealthConfig>,
    /// Passive ejection on connect failures of live traffic, if configured.
    pub passive: Option<PassiveConfig>,
    /// The backends: those the file gives by address, then (once the control task has
    /// resolved them) one per address of each name in [`PoolConfig::names`]. Addresses unique.
    pub backends: Vec<BackendConfig>,
    /// The backend entries given by DNS name, in file order; names unique. With
    /// [`PoolConfig::backends`]' literal ones, at least one entry, not every weight zero.
    pub names: Vec<NamedBackend>,
}

impl PoolConfig {
    /// True when some backend has `max_connections`: only then can a client wait.
    pub(crate) fn has_slots(&self) -> bool {
        self.backends.iter().any(|b| b.max_connections.is_some())
    }
}

/// One upstream server.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct BackendConfig {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Configured weight (capacity for `capacity_proportional`).
    pub weight: Weight,
    /// Where health probes and load scrapes go instead of `addr`, if set.
    pub health_addr: Option<SocketAddr>,
    /// Slots: connections open to it through this balancer at most (counting the load it
    /// reports beyond them); `None` is no limit.
    pub max_connections: Option<NonZeroU32>,
    /// For an address a name resolved to: the index of that name in [`PoolConfig::names`].
    pub from_name: Option<usize>,
    /// `send_proxy` of its own, in place of the listener's.
    pub send_proxy: Option<SendProxy>,
}

impl BackendConfig {
    /// The address health probes (and load scrapes) go to: `health_addr`, else `addr`.
    pub(crate) fn probe_addr(&self) -> SocketAddr {
        self.health_addr.unwrap_or(self.addr)
    }
}

impl Config {
    /// The PROXY header version connections to `backend` of `pool` start with: the backend's
    /// own `send_proxy`, else that of the first listener (in file order) sending to the pool.
    pub(crate) fn send_proxy(
        &self,
        pool: &PoolConfig,
        backend: &BackendConfig,
    ) -> Option<ProxyVersion> {
        match backend.send_proxy {
            Some(own) => own.version(),
            None => self
                .listeners
                .iter()
                .find(|l| l.uses_pool(&pool.name))
                .and_then(|l| l.clients.send_proxy),
        }
    }
}

/// A backend weight: a finite number ≥ 0. Zero means "drained": no new connections.
///
/// A newtype so that a NaN, an infinity or a negative weight cannot reach a strategy, whose
/// arithmetic (shares, ratios, cumulative sums) would silently go wrong with one.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub(crate) struct Weight(f64);

impl Weight {
    /// Weight 1, the default.
    pub(crate) const ONE: Weight = Weight(1.0);
    /// Weight 0: drained.
    #[cfg(test)]
    pub(crate) const ZERO: Weight = Weight(0.0);

    /// Returns the weight if `value` is finite and not negative.
    pub(crate) fn new(value: f64) -> Option<Weight> {
        (value.is_finite() && value >= 0.0).then_some(Weight(value + 0.0))
    }

    /// The weight as a number.
    pub(crate) fn get(self) -> f64 {
        self.0
    }

    /// True for weight 0.
    pub(crate) fn is_zero(self) -> bool {
        self.0 == 0.0
    }
}

impl fmt::Display for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        load(path)
    }

    /// Reads and validates the config file at `path`, and returns the text it was read from
    /// too: [`watch`](crate::watch) compares it with the file once its watch is in place.
    pub fn read(path: &Path) -> Result<(Config, String), ConfigError> {
        let text = read(path)?;
        Ok((parse(&text, path)?, text))
    }

    /// Validates config `text`; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        parse(text, path)
    }

    /// The listeners' names, in file order.
    pub fn listener_names(&self) -> impl Iterator<Item = &str> {
        self.listeners.iter().map(|l| l.name.as_str())
    }

    /// How many listeners the file has.
    pub fn listener_count(&self) -> usize {
        self.listeners.len()
    }

    /// How many backends the file has, over every pool.
    pub fn backend_count(&self) -> usize {
        self.pools.iter().map(|p| p.backends.len()).sum()
    }

    /// How many pools the file has, the listeners' own included.
    pub fn pool_count(&self) -> usize {
        self.pools.len()
    }

    /// The pool named `name`.
    pub(crate) fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// Where the admin endpoint listens (`[admin] bind`), if the file has one: what
    /// `weighbridge ctl` and `top` talk to on the balancer's own host.
    pub fn admin_bind(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.bind)
    }

    /// The admin endpoint's bearer token (`[admin] token`), if one is set: a client on the
    /// balancer's host that can read the file may present it.
    pub fn admin_token(&self) -> Option<&str> {
        self.admin.as_ref()?.token.as_ref().map(Token::as_str)
    }

    /// How log lines are written (`[log] format`).
    pub fn log_format(&self) -> LogFormat {
        self.log.format
    }

    /// Every backend name of every pool, each once, in file order.
    pub fn names(&self) -> Vec<&Target> {
        let mut targets: Vec<&Target> = Vec::new();
        for named in self.pools.iter().flat_map(|p| &p.names) {
            if !targets.contains(&&named.target) {
                targets.push(&named.target);
            }
        }
        targets
    }

    /// Gives every pool the backends its names resolve to in `answers` (a name with no answer
    /// gives none), in place of those they gave before. An address a pool already has (written
    /// as an address, or given by an earlier name) is not added twice.
    pub(crate) fn expand(&mut self, answers: &HashMap<Target, Vec<SocketAddr>>) {
        for pool in &mut self.pools {
            if pool.names.is_empty() {
                continue;
            }
            pool.backends.retain(|b| b.from_name.is_none());
            for (index, named) in pool.names.iter().enumerate() {
                for &addr in answers.get(&named.target).into_iter().flatten() {
                    if pool.backends.iter().any(|b| b.addr == addr) {
                        continue;
                    }
                    pool.backends.push(BackendConfig {
                        addr,
                        weight: named.weight,
                        health_addr: None,
                        max_connections: named.max_connections,
                        from_name: Some(index),
                        send_proxy: named.send_proxy,
                    });
                }
            }
        }
    }
}

/// Reads and validates the config file at `path`.
pub(crate) fn load(path: &Path) -> Result<Config, ConfigError> {
    parse(&read(path)?, path)
}

/// Reads the config file at `path`, to be [`parse`]d.
pub(crate) fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        path: path.to_owned(),
        location: None,
        kind: Box::new(ConfigErrorKind::Read(e)),
    })
}

/// Parses and validates config `text`; `path` is only used in error messages.
pub(crate) fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let error_at = |span: Option<Range<usize>>, kind| ConfigError {
        path: path.to_owned(),
        location: span.map(|s| Location::of(text, s.start)),
        kind: Box::new(kind),
    };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let message = toml_message(text, e.span(), e.message());
        error_at(e.span(), ConfigErrorKind::Toml(message))
    })?;
    Config::from_raw(raw).map_err(|(span, kind)| error_at(span, kind))
}
