//! The configuration file: read, parse, validate, and turn into typed [`Config`].
//!
//! Three stages, three types. [`raw`] mirrors the file for serde and keeps every value's span;
//! [`validate`](Config::from_raw) checks what TOML types cannot express (addresses, durations,
//! weights, uniqueness) and reports the line of the offending key; [`Config`] is what the runtime
//! gets, and holds only values that are valid by construction. Nothing here touches the network:
//! binding a listener is the listener module's job, so `--check` cannot fail on a busy port.

mod raw;

use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use crate::strategy::StrategyKind;
use raw::{RawBackend, RawConfig, RawListener};

/// Path read when `--config` is not given, relative to the working directory.
pub const DEFAULT_CONFIG_PATH: &str = "conf/weighbridge.toml";
/// How long open connections may take to finish after SIGTERM before the process exits anyway.
/// 30 s matches Kubernetes' default termination grace period.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Upper bound on one TCP connect to a backend. 2 s is long for a LAN (a healthy backend answers in
/// microseconds) yet short enough that a dead one costs a client little before the next is tried.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A connection with no byte in either direction for this long is closed. 10 minutes is nginx's
/// `proxy_timeout`; inference streams send tokens far more often than that.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Distinct backends tried per client connection when connects are refused or time out
/// (HAProxy's `retries` defaults to 3 too).
pub const DEFAULT_CONNECT_ATTEMPTS: NonZeroU32 = NonZeroU32::new(3).expect("3 is not zero");
/// Open client connections per listener beyond which new ones are closed at once.
pub const DEFAULT_MAX_CONNECTIONS: NonZeroUsize = NonZeroUsize::new(10_000).expect("not zero");

/// The validated configuration: every value here is usable as it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// How long shutdown waits for open connections.
    pub shutdown_grace: Duration,
    /// At least one listener; names and bind addresses are unique.
    pub listeners: Vec<ListenerConfig>,
}

/// One listening socket, its backends and how it spreads connections over them.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    /// Unique, non-empty name used in logs and to key live state.
    pub name: String,
    /// Address to listen on; port 0 asks the kernel for a free port.
    pub bind: SocketAddr,
    /// How a backend is picked for each new connection.
    pub strategy: StrategyKind,
    /// Upper bound on one connect attempt to a backend.
    pub connect_timeout: Duration,
    /// A connection idle this long in both directions is closed.
    pub idle_timeout: Duration,
    /// Distinct backends tried per client connection.
    pub connect_attempts: NonZeroU32,
    /// Open client connections beyond this are refused.
    pub max_connections: NonZeroUsize,
    /// At least one backend, addresses unique, not every weight zero.
    pub backends: Vec<BackendConfig>,
}

/// One upstream server.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackendConfig {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Configured weight (capacity for `capacity_proportional`).
    pub weight: Weight,
}

/// A backend weight: a finite number ≥ 0. Zero means "drained": no new connections.
///
/// A newtype so that a NaN, an infinity or a negative weight cannot reach a strategy, whose
/// arithmetic (shares, ratios, cumulative sums) would silently go wrong with one.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Weight(f64);

impl Weight {
    /// Weight 1, the default.
    pub const ONE: Weight = Weight(1.0);
    /// Weight 0: drained.
    pub const ZERO: Weight = Weight(0.0);

    /// Returns the weight if `value` is finite and not negative.
    pub fn new(value: f64) -> Option<Weight> {
        (value.is_finite() && value >= 0.0).then_some(Weight(value + 0.0))
    }

    /// The weight as a number.
    pub fn get(self) -> f64 {
        self.0
    }

    /// True for weight 0.
    pub fn is_zero(self) -> bool {
        self.0 == 0.0
    }
}

impl fmt::Display for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Line and column (both 1-based) in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
}

impl Location {
    /// The location of byte `offset` of `text`.
    fn of(text: &str, offset: usize) -> Location {
        let before = &text[..offset.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        Location { line, column }
    }
}

/// A config file that cannot be used, with where and why.
///
/// Displays as one line, `path:line:column: message`, the form compilers use, so editors and
/// terminals can jump to it.
#[derive(Debug)]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// Where in it, when the problem has a place.
    pub location: Option<Location>,
    /// What is wrong (boxed: errors are rare, `Result`s of config are moved around often).
    pub kind: Box<ConfigErrorKind>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(Location { line, column }) = self.location {
            write!(f, ":{line}:{column}")?;
        }
        write!(f, ": {}", self.kind)
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.kind)
    }
}

/// Everything that can be wrong with a config file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    /// The file could not be read.
    #[error("cannot read config file: {0}")]
    Read(#[source] std::io::Error),
    /// TOML syntax, an unknown key, a missing key or a value of the wrong type.
    #[error("{0}")]
    Toml(String),
    /// No `[[listener]]` at all.
    #[error("no listener defined: add at least one [[listener]] table")]
    NoListeners,
    /// A listener without backends.
    #[error("listener `{0}` has no backend: add at least one [[listener.backend]] table")]
    NoBackends(String),
    /// An empty listener name.
    #[error("`name` must not be empty")]
    EmptyName,
    /// Two listeners with one name.
    #[error("duplicate listener name `{0}`")]
    DuplicateName(String),
    /// Two listeners on one address.
    #[error("listener `{listener}`: bind address {addr} is already used by listener `{other}`")]
    DuplicateBind {
        /// The later listener.
        listener: String,
        /// The earlier one.
        other: String,
        /// The address both name.
        addr: SocketAddr,
    },
    /// Two backends of one listener with one address.
    #[error("listener `{listener}`: backend {addr} is listed twice")]
    DuplicateBackend {
        /// The listener.
        listener: String,
        /// The repeated address.
        addr: SocketAddr,
    },
    /// An address that is not `IP:port`.
    #[error(
        "`{key}`: invalid address `{value}`: expected IP:port such as 127.0.0.1:8000 or [::1]:8000"
    )]
    BadAddress {
        /// The key.
        key: &'static str,
        /// What was written.
        value: String,
    },
    /// A duration humantime cannot read.
    #[error(
        "`{key}`: invalid duration `{value}`: {reason} (write e.g. \"500ms\", \"2s\", \"10m\")"
    )]
    BadDuration {
        /// The key.
        key: &'static str,
        /// What was written.
        value: String,
        /// Why it failed.
        reason: String,
    },
    /// A duration of zero where zero would make no sense.
    #[error("`{0}` must be longer than 0")]
    ZeroDuration(&'static str),
    /// A count of zero where zero would make no sense.
    #[error("`{0}` must be at least 1")]
    ZeroCount(&'static str),
    /// A negative, NaN or infinite weight.
    #[error("`weight`: invalid value {0}: a weight must be a finite number >= 0")]
    BadWeight(f64),
    /// Every weight of a listener is zero.
    #[error("listener `{0}`: every backend has weight 0, so no connection could be routed")]
    AllWeightsZero(String),
}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        path: path.to_owned(),
        location: None,
        kind: Box::new(ConfigErrorKind::Read(e)),
    })?;
    parse(&text, path)
}

/// Parses and validates config `text`; `path` is only used in error messages.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let error_at = |span: Option<Range<usize>>, kind| ConfigError {
        path: path.to_owned(),
        location: span.map(|s| Location::of(text, s.start)),
        kind: Box::new(kind),
    };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let message = e.message().trim().replace('\n', "; ");
        error_at(e.span(), ConfigErrorKind::Toml(message))
    })?;
    Config::from_raw(raw).map_err(|(span, kind)| error_at(span, kind))
}

/// A validation failure and the span of the value it is about.
type Invalid = (Option<Range<usize>>, ConfigErrorKind);

impl Config {
    fn from_raw(raw: RawConfig) -> Result<Config, Invalid> {
        let shutdown_grace = duration(
            &raw.shutdown_grace,
            "shutdown_grace",
            DEFAULT_SHUTDOWN_GRACE,
        )?;
        if raw.listener.is_empty() {
            return Err((None, ConfigErrorKind::NoListeners));
        }
        let mut listeners: Vec<ListenerConfig> = Vec::with_capacity(raw.listener.len());
        for spanned in raw.listener {
            let span = spanned.span();
            let raw_listener = spanned.into_inner();
            let (name_span, bind_span) = (raw_listener.name.span(), raw_listener.bind.span());
            let listener = ListenerConfig::from_raw(raw_listener, span)?;
            if listeners.iter().any(|l| l.name == listener.name) {
                return Err((
                    Some(name_span),
                    ConfigErrorKind::DuplicateName(listener.name),
                ));
            }
            if let Some(other) = listeners
                .iter()
                .find(|l| l.bind == listener.bind && listener.bind.port() != 0)
            {
                return Err((
                    Some(bind_span),
                    ConfigErrorKind::DuplicateBind {
                        listener: listener.name.clone(),
                        other: other.name.clone(),
                        addr: listener.bind,
                    },
                ));
            }
            listeners.push(listener);
        }
        Ok(Config {
            shutdown_grace,
            listeners,
        })
    }
}

impl ListenerConfig {
    fn from_raw(raw: RawListener, span: Range<usize>) -> Result<ListenerConfig, Invalid> {
        let name = raw.name.get_ref().trim().to_owned();
        if name.is_empty() {
            return Err((Some(raw.name.span()), ConfigErrorKind::EmptyName));
        }
        let bind = address(&raw.bind, "bind")?;
        let count = |value: &Option<Spanned<u64>>, key| match value {
            Some(v) if *v.get_ref() == 0 => Err((Some(v.span()), ConfigErrorKind::ZeroCount(key))),
            Some(v) => Ok(Some(*v.get_ref())),
            None => Ok(None),
        };
        let connect_attempts = count(&raw.connect_attempts, "connect_attempts")?
            .and_then(|n| NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX)))
            .unwrap_or(DEFAULT_CONNECT_ATTEMPTS);
        let max_connections = count(&raw.max_connections, "max_connections")?
            .and_then(|n| NonZeroUsize::new(usize::try_from(n).unwrap_or(usize::MAX)))
            .unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if raw.backend.is_empty() {
            return Err((Some(span), ConfigErrorKind::NoBackends(name)));
        }
        let mut backends: Vec<BackendConfig> = Vec::with_capacity(raw.backend.len());
        for spanned in raw.backend {
            let backend = BackendConfig::from_raw(spanned.get_ref())?;
            if backends.iter().any(|b| b.addr == backend.addr) {
                let addr_span = spanned.get_ref().addr.span();
                return Err((
                    Some(addr_span),
                    ConfigErrorKind::DuplicateBackend {
                        listener: name,
                        addr: backend.addr,
                    },
                ));
            }
            backends.push(backend);
        }
        if backends.iter().all(|b| b.weight.is_zero()) {
            return Err((Some(span), ConfigErrorKind::AllWeightsZero(name)));
        }
        Ok(ListenerConfig {
            name,
            bind,
            strategy: raw.strategy.map(Spanned::into_inner).unwrap_or_default(),
            connect_timeout: duration(
                &raw.connect_timeout,
                "connect_timeout",
                DEFAULT_CONNECT_TIMEOUT,
            )?,
            idle_timeout: duration(&raw.idle_timeout, "idle_timeout", DEFAULT_IDLE_TIMEOUT)?,
            connect_attempts,
            max_connections,
            backends,
        })
    }
}

impl BackendConfig {
    fn from_raw(raw: &RawBackend) -> Result<BackendConfig, Invalid> {
        let addr = address(&raw.addr, "addr")?;
        let weight = match &raw.weight {
            None => Weight::ONE,
            Some(w) => Weight::new(*w.get_ref())
                .ok_or((Some(w.span()), ConfigErrorKind::BadWeight(*w.get_ref())))?,
        };
        Ok(BackendConfig { addr, weight })
    }
}

fn address(value: &Spanned<String>, key: &'static str) -> Result<SocketAddr, Invalid> {
    value.get_ref().trim().parse().map_err(|_| {
        let kind = ConfigErrorKind::BadAddress {
            key,
            value: value.get_ref().clone(),
        };
        (Some(value.span()), kind)
    })
}

fn duration(
    value: &Option<Spanned<String>>,
    key: &'static str,
    default: Duration,
) -> Result<Duration, Invalid> {
    let Some(value) = value else {
        return Ok(default);
    };
    let parsed = humantime::parse_duration(value.get_ref().trim()).map_err(|e| {
        let kind = ConfigErrorKind::BadDuration {
            key,
            value: value.get_ref().clone(),
            reason: e.to_string(),
        };
        (Some(value.span()), kind)
    })?;
    if parsed.is_zero() {
        return Err((Some(value.span()), ConfigErrorKind::ZeroDuration(key)));
    }
    Ok(parsed)
}
