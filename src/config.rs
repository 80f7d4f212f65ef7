//! The configuration file: read, parse, validate, and turn into typed [`Config`].
//!
//! Three stages, three types. [`raw`] mirrors the file for serde and keeps every value's span;
//! [`validate`](Config::from_raw) checks what TOML types cannot express (addresses, durations,
//! weights, uniqueness) and reports the line of the offending key; [`Config`] is what the runtime
//! gets, and holds only values that are valid by construction. Nothing here touches the network:
//! binding a listener is the listener module's job, so `--check` cannot fail on a busy port. One
//! key is checked against the machine: [`congestion`] tries `backend_congestion_control` on a
//! socket that is never connected, so an algorithm the kernel refuses fails `--check`.

mod congestion;
mod health;
mod raw;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::strategy::StrategyKind;
use raw::{RawAdmin, RawBackend, RawConfig, RawListener, RawLog};

pub use congestion::{CongestionControl, CongestionError};
pub use health::{
    AllUnhealthy, DEFAULT_EJECT_FOR, DEFAULT_FALL, DEFAULT_HEALTH_PATH, DEFAULT_INTERVAL,
    DEFAULT_LOAD_INTERVAL, DEFAULT_MAX_CONNECT_FAILURES, DEFAULT_METRICS_PATH,
    DEFAULT_MIN_WEIGHT_PERCENT, DEFAULT_RISE, DEFAULT_SATURATION, DEFAULT_STARTUP_GRACE,
    DEFAULT_TIMEOUT, ExpectStatus, HealthConfig, HttpProbe, LoadConfig, LoadPreset, MAX_EJECTION,
    PassiveConfig, Probe, ProbeKind,
};

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

/// Whether listeners splice by default: yes. A direction starts on the copy path and moves to
/// `splice(2)` only at its first read that fills the whole buffer, so request/response traffic
/// is copied as before and only bulk streams go zero-copy (what HAProxy's `splice-auto` aims
/// at, without its opt-in).
///
/// Why splice is the default, with the measurements: README, "Copy or splice". In short, on a
/// 2-core AMD VM copying cost the balancer 1.2–1.3x HAProxy-with-splice's CPU per GB and its
/// one-stream rate swung with where the scheduler put sender, receiver and worker; splicing
/// cost 0.8–0.9x and held steady. `splice = false` copies.
/// Elsewhere than Linux the key is accepted and ignored.
pub const DEFAULT_SPLICE: bool = true;

/// Most worker threads `threads` may ask for (HAProxy builds allow 64 by default, 4,096 at most).
pub const MAX_THREADS: usize = 1024;

/// The validated configuration: every value here is usable as it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// How long shutdown waits for open connections.
    pub shutdown_grace: Duration,
    /// Worker threads; `None` means one per CPU core. Read at start only.
    pub threads: Option<NonZeroUsize>,
    /// The admin HTTP endpoint, if the file has an `[admin]` table.
    pub admin: Option<AdminConfig>,
    /// Log format and the access log.
    pub log: LogConfig,
    /// At least one listener; names and bind addresses are unique.
    pub listeners: Vec<ListenerConfig>,
}

/// The `[admin]` table: where the admin HTTP endpoint listens and who may use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Address of the endpoint; no listener binds the same one.
    pub bind: SocketAddr,
    /// Bearer token every request but `GET /healthz` must carry. Always set when `bind` is not
    /// a loopback address: whoever reaches the port could otherwise drain every backend.
    pub token: Option<Token>,
}

/// A bearer token: non-empty visible ASCII, since it travels in an HTTP header.
///
/// `Debug` does not show it, so a logged or printed configuration never leaks it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Returns the token if `value` can be sent in an `Authorization` header as it is.
    pub fn new(value: &str) -> Option<Token> {
        (!value.is_empty() && value.bytes().all(|b| b.is_ascii_graphic()))
            .then(|| Token(value.to_owned()))
    }

    /// True when `presented` is this token. The comparison takes the same time wherever the
    /// first differing byte is, so response times do not reveal how much of a guess was right.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        if expected.len() != presented.len() {
            return false;
        }
        let difference = expected
            .iter()
            .zip(presented)
            .fold(0_u8, |acc, (a, b)| std::hint::black_box(acc | (a ^ b)));
        difference == 0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// The `[log]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogConfig {
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
    /// Move bytes with `splice(2)` (zero copy, Linux) rather than through user-space buffers.
    pub splice: bool,
    /// The TCP congestion control set on sockets toward the backends; `None` leaves the
    /// system's (`net.ipv4.tcp_congestion_control`), as HAProxy and nginx do.
    pub backend_congestion_control: Option<CongestionControl>,
    /// Active health checks (and load-following weights), if configured.
    pub health: Option<HealthConfig>,
    /// Passive ejection on connect failures of live traffic, if configured.
    pub passive: Option<PassiveConfig>,
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
    /// Where health probes and load scrapes go instead of `addr`, if set.
    pub health_addr: Option<SocketAddr>,
}

impl BackendConfig {
    /// The address health probes (and load scrapes) go to: `health_addr`, else `addr`.
    pub fn probe_addr(&self) -> SocketAddr {
        self.health_addr.unwrap_or(self.addr)
    }
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
        // One line whatever the file holds: a control character in a value written back (a
        // newline in `host`) is shown escaped.
        f.write_str(": ")?;
        for c in self.kind.to_string().chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        Ok(())
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
    /// A listener name with characters that would garble a log line or a metric label.
    #[error(
        "`name`: invalid listener name {0:?}: use letters, digits, `-`, `_`, `.` and `:` (it appears in log lines and metric labels)"
    )]
    BadName(String),
    /// Two listeners with one name.
    #[error("duplicate listener name `{0}`")]
    DuplicateName(String),
    /// Two listeners on one address, or on overlapping ones (see [`binds_overlap`]).
    #[error(
        "listener `{listener}`: bind address {} is already used by listener `{other}`, bound to {}",
        .addrs.0, .addrs.1
    )]
    DuplicateBind {
        /// The later listener.
        listener: String,
        /// The earlier one.
        other: String,
        /// The later listener's address, then the earlier one's (boxed: errors stay small).
        addrs: Box<(SocketAddr, SocketAddr)>,
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
    /// A backend address with port 0, which no connect can reach.
    #[error("`{key}`: port 0 in `{value}`: a backend needs the port it listens on")]
    BackendPortZero {
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
    /// A duration beyond [`MAX_DURATION`].
    #[error("`{0}` must be at most 365 days")]
    LongDuration(&'static str),
    /// A count of zero where zero would make no sense.
    #[error("`{0}` must be at least 1")]
    ZeroCount(&'static str),
    /// A count beyond what makes sense.
    #[error("`{key}` must be at most {max}")]
    TooLarge {
        /// The key.
        key: &'static str,
        /// The largest value taken.
        max: u64,
    },
    /// A negative, NaN or infinite weight.
    #[error("`weight`: invalid value {0}: a weight must be a finite number >= 0")]
    BadWeight(f64),
    /// Every weight of a listener is zero.
    #[error("listener `{0}`: every backend has weight 0, so no connection could be routed")]
    AllWeightsZero(String),
    /// An admin endpoint reachable from other hosts without a token.
    #[error(
        "[admin] `bind` = {0} is not a loopback address, so [admin] `token` is required: \
         without it anyone who reaches the port could drain every backend"
    )]
    AdminTokenRequired(SocketAddr),
    /// A token that cannot travel in an HTTP header.
    #[error("[admin] `token` must be non-empty visible ASCII without spaces")]
    BadToken,
    /// The admin endpoint on a listener's address (or an overlapping one).
    #[error(
        "[admin] `bind` {addr} is already used by listener `{listener}`, bound to {other_addr}"
    )]
    AdminBindTaken {
        /// The listener.
        listener: String,
        /// The admin address.
        addr: SocketAddr,
        /// The listener's address.
        other_addr: SocketAddr,
    },
    /// An HTTP-only health key on a TCP probe.
    #[error("`{0}` applies only to kind = \"http\"; remove it or set kind = \"http\"")]
    HttpOnly(&'static str),
    /// A value that must not be empty is.
    #[error("`{0}` must not be empty")]
    Empty(&'static str),
    /// An HTTP path that does not start with `/` or is not a valid request target.
    #[error("`{key}`: invalid path `{value}`: expected an absolute path such as \"/health\"")]
    BadPath {
        /// The key.
        key: &'static str,
        /// What was written.
        value: String,
    },
    /// A header value with spaces or control characters.
    #[error("`{key}`: invalid value `{value}`: only visible ASCII characters are allowed")]
    BadHeader {
        /// The key.
        key: &'static str,
        /// What was written.
        value: String,
    },
    /// An HTTP status outside 100..=599.
    #[error("`expect_status`: invalid status {0}: expected a number from 100 to 599")]
    BadStatus(i64),
    /// A port outside 1..=65535.
    #[error("`port`: invalid port {0}: expected a number from 1 to 65535")]
    BadPort(u64),
    /// A load block that names no metric.
    #[error(
        "[listener.health.load] needs `preset` (vllm, sglang, tgi, triton, llamacpp) or `metric`"
    )]
    NoLoadMetric,
    /// A metric name Prometheus would not accept.
    #[error("`metric`: invalid metric name `{0}`: expected letters, digits, `_` and `:`")]
    BadMetric(String),
    /// A saturation that is not a finite number above 0.
    #[error("`saturation`: invalid value {0}: must be a finite number > 0")]
    BadSaturation(f64),
    /// A percentage outside 0..=100.
    #[error(
        "`min_weight_percent`: invalid value {0}: must be more than 0 and at most 100 (a floor of 0 lets a busy fleet reach weight 0 everywhere and refuse every client)"
    )]
    BadPercent(f64),
    /// A congestion control this machine cannot give the backend sockets.
    #[error("`backend_congestion_control`: {0}")]
    Congestion(CongestionError),
}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    parse(&read(path)?, path)
}

/// Reads the config file at `path` (to be [`parse`]d), for a caller that keeps the text: the
/// file watcher compares it with the file once its watch is in place.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        path: path.to_owned(),
        location: None,
        kind: Box::new(ConfigErrorKind::Read(e)),
    })
}

/// Parses and validates config `text`; `path` is only used in error messages.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
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

/// Keys whose values are durations, written as strings with a unit.
const DURATION_KEYS: [&str; 8] = [
    "shutdown_grace",
    "connect_timeout",
    "idle_timeout",
    "interval",
    "timeout",
    "startup_grace",
    "slow_start",
    "eject_for",
];

/// The TOML parser's `message` about `span` of `text`, made to say which key it is about and,
/// for the usual slips, what to write instead.
fn toml_message(text: &str, span: Option<Range<usize>>, message: &str) -> String {
    let mut message = message.trim().replace('\n', "; ");
    let start = span.as_ref().map(|s| s.start);
    // A table header written `[listener]` where a list of tables, `[[listener]]`, is meant.
    let header = start.and_then(|offset| single_header_at(text, offset));
    if message == "duplicate key" {
        // The span is the repeated key (or the header's name); say which.
        let key = span
            .and_then(|s| text.get(s))
            .map(|k| k.trim().trim_matches('"'))
            .filter(|k| !k.is_empty() && !k.contains('\n'));
        if let Some(key) = key {
            message = format!("duplicate key `{key}`");
        }
    }
    if let Some(name) = header {
        if message.contains("expected a sequence") {
            message = format!("`{name}`: {message}");
        }
        if message.starts_with("duplicate key") || message.contains("expected a sequence") {
            message = format!("{message}: write each entry of `{name}` as [[{name}]]");
        }
        return message;
    }
    // serde's type errors ("invalid type: string \"x\", expected f64") do not say which key;
    // the span does, so name the key written on that line.
    if let Some(key) = start.and_then(|offset| key_at(text, offset)) {
        if !message.contains(&format!("`{key}`")) {
            message = format!("`{key}`: {message}");
        }
        let number = message.contains("invalid type: integer")
            || message.contains("invalid type: floating point");
        if number && DURATION_KEYS.contains(&key) {
            message.push_str(" (a duration is a string with a unit, e.g. \"2s\" or \"500ms\")");
        }
    }
    message
}

/// The name of a single-bracket table header (`[listener]`, `[ listener ]`) on the line that
/// holds `offset`.
fn single_header_at(text: &str, offset: usize) -> Option<&str> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next()?.trim();
    let inner = line.strip_prefix('[')?.split_once(']')?.0;
    (!inner.starts_with('[')).then(|| inner.trim())
}

/// The key of a `key = value` line when `offset` lies in its value.
fn key_at(text: &str, offset: usize) -> Option<&str> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let (key, _) = text[line_start..offset].split_once('=')?;
    let key = key.trim().trim_matches('"');
    (!key.is_empty() && !key.starts_with('[') && !key.starts_with('#')).then_some(key)
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
        let log = raw.log.map(LogConfig::from_raw).unwrap_or_default();
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
                .find(|l| binds_overlap(l.bind, listener.bind))
            {
                return Err((
                    Some(bind_span),
                    ConfigErrorKind::DuplicateBind {
                        listener: listener.name.clone(),
                        other: other.name.clone(),
                        addrs: Box::new((listener.bind, other.bind)),
                    },
                ));
            }
            listeners.push(listener);
        }
        let threads = match raw.threads {
            Some(t) if *t.get_ref() == 0 => {
                return Err((Some(t.span()), ConfigErrorKind::ZeroCount("threads")));
            }
            // Each worker holds an epoll instance, a waker and a socket per listener: far more
            // than the cores of any machine only runs the process out of descriptors at start,
            // with an error about a listener's bind.
            Some(t) if *t.get_ref() > MAX_THREADS as u64 => {
                return Err((
                    Some(t.span()),
                    ConfigErrorKind::TooLarge {
                        key: "threads",
                        max: MAX_THREADS as u64,
                    },
                ));
            }
            Some(t) => NonZeroUsize::new(usize::try_from(*t.get_ref()).unwrap_or(usize::MAX)),
            None => None,
        };
        let admin = match raw.admin {
            None => None,
            Some(admin) => Some(AdminConfig::from_raw(admin.into_inner(), &listeners)?),
        };
        Ok(Config {
            shutdown_grace,
            threads,
            admin,
            log,
            listeners,
        })
    }
}

impl AdminConfig {
    fn from_raw(raw: RawAdmin, listeners: &[ListenerConfig]) -> Result<AdminConfig, Invalid> {
        let bind = address(&raw.bind, "bind")?;
        let token = match &raw.token {
            None => None,
            Some(t) => {
                Some(Token::new(t.get_ref()).ok_or((Some(t.span()), ConfigErrorKind::BadToken))?)
            }
        };
        if token.is_none() && !bind.ip().to_canonical().is_loopback() {
            return Err((
                Some(raw.bind.span()),
                ConfigErrorKind::AdminTokenRequired(bind),
            ));
        }
        if let Some(listener) = listeners.iter().find(|l| binds_overlap(l.bind, bind)) {
            return Err((
                Some(raw.bind.span()),
                ConfigErrorKind::AdminBindTaken {
                    listener: listener.name.clone(),
                    addr: bind,
                    other_addr: listener.bind,
                },
            ));
        }
        Ok(AdminConfig { bind, token })
    }
}

impl LogConfig {
    fn from_raw(raw: RawLog) -> LogConfig {
        LogConfig {
            format: raw.format.unwrap_or_default(),
            access_log: raw.access_log.unwrap_or(false),
        }
    }
}

impl ListenerConfig {
    fn from_raw(raw: RawListener, span: Range<usize>) -> Result<ListenerConfig, Invalid> {
        let name = raw.name.get_ref().trim().to_owned();
        if name.is_empty() {
            return Err((Some(raw.name.span()), ConfigErrorKind::EmptyName));
        }
        // HAProxy's rule for proxy names: nothing a text log line prints raw can break it.
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
        {
            return Err((Some(raw.name.span()), ConfigErrorKind::BadName(name)));
        }
        let bind = address(&raw.bind, "bind")?;
        let connect_attempts =
            count(&raw.connect_attempts, "connect_attempts")?.unwrap_or(DEFAULT_CONNECT_ATTEMPTS);
        let max_connections = match &raw.max_connections {
            Some(v) if *v.get_ref() == 0 => {
                return Err((
                    Some(v.span()),
                    ConfigErrorKind::ZeroCount("max_connections"),
                ));
            }
            Some(v) => NonZeroUsize::new(usize::try_from(*v.get_ref()).unwrap_or(usize::MAX))
                .unwrap_or(DEFAULT_MAX_CONNECTIONS),
            None => DEFAULT_MAX_CONNECTIONS,
        };
        let health = match &raw.health {
            Some(h) => Some(HealthConfig::from_raw(h.get_ref())?),
            None => None,
        };
        let passive = match &raw.passive {
            Some(p) => Some(PassiveConfig::from_raw(p.get_ref())?),
            None => None,
        };
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
        let backend_congestion_control = match &raw.backend_congestion_control {
            Some(v) => Some(
                CongestionControl::new(v.get_ref())
                    .map_err(|e| (Some(v.span()), ConfigErrorKind::Congestion(e)))?,
            ),
            None => None,
        };
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
            splice: raw.splice.unwrap_or(DEFAULT_SPLICE),
            backend_congestion_control,
            health,
            passive,
            backends,
        })
    }
}

impl BackendConfig {
    fn from_raw(raw: &RawBackend) -> Result<BackendConfig, Invalid> {
        let addr = backend_address(&raw.addr, "addr")?;
        let weight = match &raw.weight {
            None => Weight::ONE,
            Some(w) => Weight::new(*w.get_ref())
                .ok_or((Some(w.span()), ConfigErrorKind::BadWeight(*w.get_ref())))?,
        };
        let health_addr = match &raw.health_addr {
            Some(value) => Some(backend_address(value, "health_addr")?),
            None => None,
        };
        Ok(BackendConfig {
            addr,
            weight,
            health_addr,
        })
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

/// An address to connect to: as [`address`], and not port 0 (which a listener may bind, to
/// pick a free port, but which every connect would fail on).
fn backend_address(value: &Spanned<String>, key: &'static str) -> Result<SocketAddr, Invalid> {
    let addr = address(value, key)?;
    if addr.port() == 0 {
        let kind = ConfigErrorKind::BackendPortZero {
            key,
            value: value.get_ref().clone(),
        };
        return Err((Some(value.span()), kind));
    }
    Ok(addr)
}

/// True when two listening sockets on `a` and `b` cannot both be bound: the same port (not 0,
/// which picks a free one) and addresses that overlap. A wildcard covers its own family, and
/// `[::ffff:a.b.c.d]` is `a.b.c.d`. Caught here, such a pair fails `--check` instead of the
/// start. (`[::]` also covers IPv4 unless `net.ipv6.bindv6only` is set; that depends on the
/// host, so it is left to the bind to report.)
fn binds_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() == 0 || a.port() != b.port() {
        return false;
    }
    let (a, b) = (a.ip().to_canonical(), b.ip().to_canonical());
    let covers =
        |wild: IpAddr, other: IpAddr| wild.is_unspecified() && wild.is_ipv4() == other.is_ipv4();
    a == b || covers(a, b) || covers(b, a)
}

/// A count of at least 1; values beyond `u32::MAX` saturate.
fn count(value: &Option<Spanned<u64>>, key: &'static str) -> Result<Option<NonZeroU32>, Invalid> {
    match value {
        Some(v) => NonZeroU32::new(u32::try_from(*v.get_ref()).unwrap_or(u32::MAX))
            .map(Some)
            .ok_or((Some(v.span()), ConfigErrorKind::ZeroCount(key))),
        None => Ok(None),
    }
}

/// The longest duration any key accepts. Deadlines are `Instant`s, and an instant plus
/// "300000000000y" overflows (a panic in the timer code); a year is far beyond any sensible
/// timeout, interval or ejection (HAProxy's timeouts stop at about 24 days).
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

fn duration(
    value: &Option<Spanned<String>>,
    key: &'static str,
    default: Duration,
) -> Result<Duration, Invalid> {
    Ok(optional_duration(value, key, false)?.unwrap_or(default))
}

/// A duration if one is written; zero is refused unless `zero_ok`.
fn optional_duration(
    value: &Option<Spanned<String>>,
    key: &'static str,
    zero_ok: bool,
) -> Result<Option<Duration>, Invalid> {
    let Some(value) = value else {
        return Ok(None);
    };
    let parsed = humantime::parse_duration(value.get_ref().trim()).map_err(|e| {
        let kind = ConfigErrorKind::BadDuration {
            key,
            value: value.get_ref().clone(),
            reason: e.to_string(),
        };
        (Some(value.span()), kind)
    })?;
    if parsed.is_zero() && !zero_ok {
        return Err((Some(value.span()), ConfigErrorKind::ZeroDuration(key)));
    }
    if parsed > MAX_DURATION {
        return Err((Some(value.span()), ConfigErrorKind::LongDuration(key)));
    }
    Ok(Some(parsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[listener]]
name = "chat"
bind = "127.0.0.1:8000"
[[listener.backend]]
addr = "127.0.0.1:9001"
"#;

    fn parse_str(text: &str) -> Result<Config, ConfigError> {
        parse(text, Path::new("test.toml"))
    }

    /// Parses `text`, which must fail, and returns (line, message).
    fn error(text: &str) -> (Option<usize>, String) {
        let e = parse_str(text).expect_err("config should be rejected");
        (e.location.map(|l| l.line), e.to_string())
    }

    #[test]
    fn minimal_config_gets_every_default() {
        let config = parse_str(MINIMAL).expect("valid");
        assert_eq!(config.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        let l = &config.listeners[0];
        assert_eq!(l.strategy, StrategyKind::WeightedRoundRobin);
        assert_eq!(l.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(l.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(l.connect_attempts, DEFAULT_CONNECT_ATTEMPTS);
        assert_eq!(l.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(l.splice, DEFAULT_SPLICE);
        assert_eq!(l.backend_congestion_control, None);
        assert_eq!(config.threads, None);
        assert_eq!(l.backends[0].weight, Weight::ONE);
        assert_eq!(config.admin, None);
        assert_eq!(config.log, LogConfig::default());
        assert_eq!(config.log.format, LogFormat::Text);
        assert!(!config.log.access_log);
    }

    #[test]
    fn admin_and_log_tables_are_read() {
        let text = format!(
            "[admin]\nbind = \"0.0.0.0:9900\"\ntoken = \"s3cret-Token\"\n\
             [log]\nformat = \"json\"\naccess_log = true\n{MINIMAL}"
        );
        let config = parse_str(&text).expect("valid");
        let admin = config.admin.expect("[admin] given");
        assert_eq!(admin.bind, "0.0.0.0:9900".parse().expect("literal"));
        let token = admin.token.expect("token given");
        assert!(token.matches(b"s3cret-Token"));
        assert!(!token.matches(b"s3cret-Tokem"));
        assert!(!token.matches(b"s3cret"));
        assert_eq!(format!("{token:?}"), "Token(<redacted>)");
        assert_eq!(config.log.format, LogFormat::Json);
        assert!(config.log.access_log);
        // On loopback the token is optional.
        let text = format!("[admin]\nbind = \"[::1]:0\"\n{MINIMAL}");
        assert_eq!(
            parse_str(&text).expect("valid").admin,
            Some(AdminConfig {
                bind: "[::1]:0".parse().expect("literal"),
                token: None
            })
        );
    }

    #[test]
    fn every_key_is_read() {
        let text = r#"
shutdown_grace = "5s"
threads = 3
[[listener]]
name = "embed"
bind = "[::1]:0"
strategy = "capacity_proportional"
connect_timeout = "250ms"
idle_timeout = "1h"
connect_attempts = 5
max_connections = 7
splice = false
backend_congestion_control = "reno"
[[listener.backend]]
addr = "[::1]:9001"
weight = 2
[[listener.backend]]
addr = "127.0.0.1:9002"
weight = 0.5
"#;
        let config = parse_str(text).expect("valid");
        assert_eq!(config.shutdown_grace, Duration::from_secs(5));
        assert_eq!(config.threads.map(NonZeroUsize::get), Some(3));
        let l = &config.listeners[0];
        assert!(
            !l.splice,
            "the default is true: false proves the key is read"
        );
        assert_eq!(l.bind, "[::1]:0".parse::<SocketAddr>().expect("literal"));
        assert_eq!(l.strategy, StrategyKind::CapacityProportional);
        assert_eq!(l.connect_timeout, Duration::from_millis(250));
        assert_eq!(l.idle_timeout, Duration::from_secs(3600));
        assert_eq!((l.connect_attempts.get(), l.max_connections.get()), (5, 7));
        assert_eq!(
            l.backend_congestion_control
                .as_ref()
                .map(CongestionControl::as_str),
            Some("reno")
        );
        let weights: Vec<f64> = l.backends.iter().map(|b| b.weight.get()).collect();
        assert_eq!(weights, [2.0, 0.5]);
        assert_eq!((l.health.as_ref(), l.passive), (None, None));
        assert_eq!(l.backends[0].health_addr, None);
    }

    #[test]
    fn every_health_key_is_read() {
        let text = r#"
[[listener]]
name = "chat"
bind = "127.0.0.1:0"
[listener.health]
kind = "http"
path = "/v2/health/ready"
host = "models.internal"
expect_status = [200, 204]
expect_body = "ok"
interval = "500ms"
timeout = "250ms"
rise = 4
fall = 5
startup_grace = "0s"
slow_start = "1m"
all_unhealthy = "reject"
[listener.health.load]
preset = "triton"
path = "/custom"
port = 9002
metric = "my_queue"
saturation = 8.5
min_weight_percent = 25
interval = "3s"
[listener.passive]
max_connect_failures = 2
eject_for = "1s"
[[listener.backend]]
addr = "127.0.0.1:9001"
health_addr = "127.0.0.1:9101"
"#;
        let config = parse_str(text).expect("valid");
        let l = &config.listeners[0];
        let h = l.health.as_ref().expect("health configured");
        assert_eq!(
            h.probe,
            Probe::Http(HttpProbe {
                path: "/v2/health/ready".into(),
                host: Some("models.internal".into()),
                expect_status: ExpectStatus::AnyOf(vec![200, 204]),
                expect_body: Some("ok".into()),
            })
        );
        assert_eq!(
            (h.interval, h.timeout),
            (Duration::from_millis(500), Duration::from_millis(250))
        );
        assert_eq!((h.rise.get(), h.fall.get()), (4, 5));
        assert_eq!(h.startup_grace, Duration::ZERO);
        assert_eq!(h.slow_start, Some(Duration::from_secs(60)));
        assert_eq!(h.all_unhealthy, AllUnhealthy::Reject);
        let load = h.load.as_ref().expect("load configured");
        assert_eq!(
            *load,
            LoadConfig {
                path: "/custom".into(),
                port: Some(9002),
                metric: "my_queue".into(),
                saturation: 8.5,
                min_factor: 0.25,
                interval: Duration::from_secs(3),
            }
        );
        let passive = l.passive.expect("passive configured");
        assert_eq!(passive.max_connect_failures.get(), 2);
        assert_eq!(passive.eject_for, Duration::from_secs(1));
        let backend = l.backends[0];
        assert_eq!(
            backend.probe_addr(),
            "127.0.0.1:9101".parse::<SocketAddr>().expect("literal")
        );
    }

    #[test]
    fn empty_health_tables_get_every_default() {
        let text = format!(
            "{MINIMAL}[listener.health]\n[listener.health.load]\npreset = \"vllm\"\n[listener.passive]\n"
        );
        let config = parse_str(&text).expect("valid");
        let l = &config.listeners[0];
        let h = l.health.as_ref().expect("health configured");
        let Probe::Http(http) = &h.probe else {
            panic!("http is the default probe: {:?}", h.probe)
        };
        assert_eq!(http.path, DEFAULT_HEALTH_PATH);
        assert_eq!(
            (http.host.as_ref(), http.expect_body.as_ref()),
            (None, None)
        );
        assert_eq!(http.expect_status, ExpectStatus::Success);
        assert_eq!((h.interval, h.timeout), (DEFAULT_INTERVAL, DEFAULT_TIMEOUT));
        assert_eq!((h.rise, h.fall), (DEFAULT_RISE, DEFAULT_FALL));
        assert_eq!(h.startup_grace, DEFAULT_STARTUP_GRACE);
        assert_eq!(h.slow_start, None);
        assert_eq!(h.all_unhealthy, AllUnhealthy::RouteAnyway);
        let load = h.load.as_ref().expect("load configured");
        assert_eq!(load.metric, "vllm:num_requests_waiting");
        assert_eq!(
            (load.path.as_str(), load.port),
            (DEFAULT_METRICS_PATH, None)
        );
        assert_eq!(load.saturation, DEFAULT_SATURATION);
        assert_eq!(load.min_factor, DEFAULT_MIN_WEIGHT_PERCENT / 100.0);
        assert_eq!(load.interval, DEFAULT_LOAD_INTERVAL);
        let passive = l.passive.expect("passive configured");
        assert_eq!(passive.max_connect_failures, DEFAULT_MAX_CONNECT_FAILURES);
        assert_eq!(passive.eject_for, DEFAULT_EJECT_FOR);
        // Triton's metrics live on their own port unless told otherwise.
        let triton = format!("{MINIMAL}[listener.health.load]\npreset = \"triton\"\n");
        let config = parse_str(&triton).expect("valid");
        let load = config.listeners[0]
            .health
            .as_ref()
            .and_then(|h| h.load.as_ref());
        assert_eq!(load.map(|l| l.port), Some(Some(8002)));
        // A TCP probe carries no HTTP settings.
        let tcp = format!("{MINIMAL}[listener.health]\nkind = \"tcp\"\n");
        let config = parse_str(&tcp).expect("valid");
        assert_eq!(
            config.listeners[0].health.as_ref().map(|h| &h.probe),
            Some(&Probe::Tcp)
        );
    }

    #[test]
    fn overlapping_binds_are_the_ones_the_kernel_refuses() {
        let overlap = |a: &str, b: &str| {
            let (a, b) = (a.parse().expect("literal"), b.parse().expect("literal"));
            assert_eq!(binds_overlap(a, b), binds_overlap(b, a), "symmetric");
            binds_overlap(a, b)
        };
        assert!(overlap("127.0.0.1:80", "127.0.0.1:80"));
        assert!(overlap("0.0.0.0:80", "10.0.0.1:80"));
        assert!(overlap("[::]:80", "[::1]:80"));
        assert!(overlap("[::ffff:10.0.0.1]:80", "10.0.0.1:80"));
        assert!(overlap("[::ffff:10.0.0.1]:80", "0.0.0.0:80"));
        assert!(!overlap("127.0.0.1:80", "127.0.0.2:80"));
        assert!(!overlap("0.0.0.0:80", "0.0.0.0:81"));
        assert!(
            !overlap("127.0.0.1:0", "127.0.0.1:0"),
            "port 0 picks a free port each"
        );
        assert!(!overlap("0.0.0.0:80", "[::1]:80"), "other family");
    }

    #[test]
    fn errors_name_the_line_and_the_problem() {
        let listener = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n";
        let backend = "[[listener.backend]]\naddr = \"127.0.0.1:2\"\n";
        let health = "[listener.health]\n";
        let load = "[listener.health.load]\n";
        let cases: Vec<(String, Option<usize>, &str)> = vec![
            ("[[listener]\n".into(), Some(1), "expected `]`"),
            (
                format!("{listener}strategyy = \"x\"\n{backend}"),
                Some(4),
                "unknown field `strategyy`",
            ),
            (
                format!("{listener}{backend}colour = 1\n"),
                Some(6),
                "unknown field `colour`",
            ),
            (
                format!("{listener}strategy = \"fastest\"\n{backend}"),
                Some(4),
                "`fastest`, expected one of `weighted_round_robin`, `weighted_random`, `capacity_proportional`",
            ),
            (
                format!("{listener}{backend}weight = -1\n"),
                Some(6),
                "invalid value -1",
            ),
            (
                format!("{listener}backend_congestion_control = \"nosuchcc\"\n{backend}"),
                Some(4),
                "`backend_congestion_control`: `nosuchcc` is not available on this machine (net.ipv4.tcp_available_congestion_control: ",
            ),
            (
                format!("{listener}backend_congestion_control = \"BBR\"\n{backend}"),
                Some(4),
                "`backend_congestion_control`: invalid name `BBR`",
            ),
            (
                format!("{listener}{backend}weight = nan\n"),
                Some(6),
                "invalid value NaN",
            ),
            (
                format!("{listener}{backend}weight = inf\n"),
                Some(6),
                "invalid value inf",
            ),
            (
                format!("{listener}{backend}weight = \"x\"\n"),
                Some(6),
                "`weight`: invalid type",
            ),
            (
                format!("{listener}{backend}weight = 0\n"),
                Some(1),
                "every backend has weight 0",
            ),
            (String::new(), None, "no listener defined"),
            (
                "shutdown_grace = \"1s\"\n".into(),
                None,
                "no listener defined",
            ),
            (listener.into(), Some(1), "listener `a` has no backend"),
            (
                format!("{listener}{backend}{listener}{backend}"),
                Some(7),
                "duplicate listener name `a`",
            ),
            (
                format!(
                    "{listener}{backend}[[listener]]\nname = \"b\"\nbind = \"127.0.0.1:1\"\n{backend}"
                ),
                Some(8),
                "already used by listener `a`",
            ),
            (
                format!(
                    "{listener}{backend}[[listener]]\nname = \"b\"\nbind = \"0.0.0.0:1\"\n{backend}"
                ),
                Some(8),
                "bind address 0.0.0.0:1 is already used by listener `a`, bound to 127.0.0.1:1",
            ),
            (
                format!("[admin]\nbind = \"[::ffff:127.0.0.1]:1\"\n{listener}{backend}"),
                Some(2),
                "is already used by listener `a`, bound to 127.0.0.1:1",
            ),
            (
                format!("{listener}{backend}{backend}"),
                Some(7),
                "backend 127.0.0.1:2 is listed twice",
            ),
            (
                "[[listener]]\nname = \"a\"\nbind = \"localhost:80\"\n".into(),
                Some(3),
                "`bind`: invalid address `localhost:80`",
            ),
            (
                format!("{listener}[[listener.backend]]\naddr = \"10.0.0.1\"\n"),
                Some(5),
                "`addr`: invalid address `10.0.0.1`",
            ),
            (
                format!("{listener}connect_timeout = \"2 parsecs\"\n{backend}"),
                Some(4),
                "`connect_timeout`: invalid duration",
            ),
            (
                format!("{listener}connect_timeout = 2\n{backend}"),
                Some(4),
                "`connect_timeout`: invalid type: integer `2`, expected a string (a duration is a string with a unit, e.g. \"2s\"",
            ),
            (
                format!("{listener}{backend}weight = 1\nweight = 2\n"),
                Some(7),
                "duplicate key `weight`",
            ),
            (
                "[listener]\nname = \"a\"\n".into(),
                Some(1),
                "`listener`: invalid type: map, expected a sequence: write each entry of `listener` as [[listener]]",
            ),
            (
                format!("{listener}{backend}[listener]\nname = \"b\"\n"),
                Some(6),
                "duplicate key `listener`: write each entry of `listener` as [[listener]]",
            ),
            (
                format!("threads = 1025\n{listener}{backend}"),
                Some(1),
                "`threads` must be at most 1024",
            ),
            (
                format!("{listener}idle_timeout = \"0s\"\n{backend}"),
                Some(4),
                "`idle_timeout` must be longer than 0",
            ),
            (
                format!("{listener}connect_attempts = 0\n{backend}"),
                Some(4),
                "`connect_attempts` must be at least 1",
            ),
            (
                format!("{listener}max_connections = -5\n{backend}"),
                Some(4),
                "`max_connections`: invalid value",
            ),
            (
                format!("{listener}name = \"b\"\n{backend}"),
                Some(4),
                "duplicate key",
            ),
            (
                "[[listener]]\nname = \" \"\nbind = \"127.0.0.1:1\"\n".into(),
                Some(2),
                "`name` must not be empty",
            ),
            (
                "[[listener]]\nname = \"chat\\nINFO forged\"\nbind = \"127.0.0.1:1\"\n".into(),
                Some(2),
                "`name`: invalid listener name \"chat\\nINFO forged\": use letters",
            ),
            (
                "[[listener]]\nname = \"chat api\"\nbind = \"127.0.0.1:1\"\n".into(),
                Some(2),
                "invalid listener name \"chat api\"",
            ),
            (
                "[[listener]]\nbind = \"127.0.0.1:1\"\n".into(),
                Some(1),
                "missing field `name`",
            ),
            (
                format!("[admin]\nbind = \"0.0.0.0:9900\"\n{listener}{backend}"),
                Some(2),
                "[admin] `bind` = 0.0.0.0:9900 is not a loopback address, so [admin] `token` is required",
            ),
            (
                format!("[admin]\nbind = \"10.1.2.3:9900\"\ntoken = \"\"\n{listener}{backend}"),
                Some(3),
                "[admin] `token` must be non-empty visible ASCII",
            ),
            (
                format!("[admin]\nbind = \"127.0.0.1:9900\"\ntoken = \"a b\"\n{listener}{backend}"),
                Some(3),
                "[admin] `token` must be non-empty visible ASCII",
            ),
            (
                format!("[admin]\nbind = \"localhost\"\n{listener}{backend}"),
                Some(2),
                "`bind`: invalid address `localhost`",
            ),
            (
                format!("[admin]\nbind = \"127.0.0.1:1\"\n{listener}{backend}"),
                Some(2),
                "[admin] `bind` 127.0.0.1:1 is already used by listener `a`",
            ),
            (
                format!("[admin]\ntoken = \"t\"\n{listener}{backend}"),
                Some(1),
                "missing field `bind`",
            ),
            (
                format!("[admin]\nbind = \"127.0.0.1:9\"\nport = 1\n{listener}{backend}"),
                Some(3),
                "unknown field `port`",
            ),
            (
                format!("[log]\nformat = \"xml\"\n{listener}{backend}"),
                Some(2),
                "unknown variant `xml`, expected `text` or `json`",
            ),
            (
                format!("[log]\naccess_log = \"yes\"\n{listener}{backend}"),
                Some(2),
                "`access_log`: invalid type",
            ),
            (
                format!("[log]\nlevel = \"info\"\n{listener}{backend}"),
                Some(2),
                "unknown field `level`",
            ),
            (
                format!("{listener}[[listener.backend]]\naddr = \"10.0.0.1:0\"\n"),
                Some(5),
                "`addr`: port 0 in `10.0.0.1:0`",
            ),
            (
                format!("{listener}{backend}health_addr = \"[::1]:0\"\n"),
                Some(6),
                "`health_addr`: port 0 in `[::1]:0`",
            ),
            (
                format!("{listener}{backend}health_addr = \"h:1\"\n"),
                Some(6),
                "`health_addr`: invalid address `h:1`",
            ),
            (
                format!("{listener}{health}kind = \"tcp\"\npath = \"/x\"\n{backend}"),
                Some(6),
                "`path` applies only to kind = \"http\"",
            ),
            (
                format!("{listener}{health}kind = \"grpc\"\n{backend}"),
                Some(5),
                "unknown variant `grpc`, expected `tcp` or `http`",
            ),
            (
                format!("{listener}{health}colour = 1\n{backend}"),
                Some(5),
                "unknown field `colour`",
            ),
            (
                format!("{listener}{health}interval = \"0s\"\n{backend}"),
                Some(5),
                "`interval` must be longer than 0",
            ),
            (
                format!("{listener}{health}timeout = \"fast\"\n{backend}"),
                Some(5),
                "`timeout`: invalid duration `fast`",
            ),
            (
                format!("{listener}{health}rise = 0\n{backend}"),
                Some(5),
                "`rise` must be at least 1",
            ),
            (
                format!("{listener}{health}fall = 0\n{backend}"),
                Some(5),
                "`fall` must be at least 1",
            ),
            (
                format!("{listener}{health}slow_start = \"0s\"\n{backend}"),
                Some(5),
                "`slow_start` must be longer than 0",
            ),
            (
                format!("{listener}{health}expect_status = [200,\n 700]\n{backend}"),
                Some(6),
                "`expect_status`: invalid status 700",
            ),
            (
                format!("{listener}{health}expect_status = []\n{backend}"),
                Some(5),
                "`expect_status` must not be empty",
            ),
            (
                format!("{listener}{health}path = \"health\"\n{backend}"),
                Some(5),
                "`path`: invalid path `health`",
            ),
            (
                format!("{listener}{health}host = \"a b\"\n{backend}"),
                Some(5),
                "`host`: invalid value `a b`",
            ),
            (
                format!("{listener}{health}host = \"a\\nb\"\n{backend}"),
                Some(5),
                "`host`: invalid value `a\\nb`",
            ),
            (
                format!("{listener}{health}expect_body = \"\"\n{backend}"),
                Some(5),
                "`expect_body` must not be empty",
            ),
            (
                format!("{listener}{health}all_unhealthy = \"panic\"\n{backend}"),
                Some(5),
                "unknown variant `panic`, expected `route_anyway` or `reject`",
            ),
            (
                format!("{listener}{load}interval = \"1s\"\n{backend}"),
                Some(4),
                "needs `preset`",
            ),
            (
                format!("{listener}{load}preset = \"ollama\"\n{backend}"),
                Some(5),
                "unknown variant `ollama`",
            ),
            (
                format!("{listener}{load}preset = \"vllm\"\nsaturation = 0\n{backend}"),
                Some(6),
                "`saturation`: invalid value 0",
            ),
            (
                format!("{listener}{load}preset = \"vllm\"\nmin_weight_percent = 150\n{backend}"),
                Some(6),
                "`min_weight_percent`: invalid value 150",
            ),
            (
                format!("{listener}{load}preset = \"vllm\"\nmin_weight_percent = 0\n{backend}"),
                Some(6),
                "`min_weight_percent`: invalid value 0: must be more than 0",
            ),
            (
                format!("{listener}{load}preset = \"triton\"\nport = 70000\n{backend}"),
                Some(6),
                "`port`: invalid port 70000",
            ),
            (
                format!("{listener}{load}metric = \"queue depth\"\n{backend}"),
                Some(5),
                "`metric`: invalid metric name `queue depth`",
            ),
            (
                format!("{listener}{load}preset = \"vllm\"\npath = \"metrics\"\n{backend}"),
                Some(6),
                "`path`: invalid path `metrics`",
            ),
            (
                format!("{listener}[listener.passive]\nmax_connect_failures = 0\n{backend}"),
                Some(5),
                "`max_connect_failures` must be at least 1",
            ),
            (
                format!("{listener}[listener.passive]\neject_for = \"soon\"\n{backend}"),
                Some(5),
                "`eject_for`: invalid duration `soon`",
            ),
            (
                format!("{listener}[listener.passive]\neject_for = \"300000000000y\"\n{backend}"),
                Some(5),
                "`eject_for` must be at most 365 days",
            ),
            (
                format!("{listener}idle_timeout = \"366d\"\n{backend}"),
                Some(4),
                "`idle_timeout` must be at most 365 days",
            ),
            (
                format!("{listener}[listener.passive]\neject_after = 3\n{backend}"),
                Some(5),
                "unknown field `eject_after`, expected `max_connect_failures` or `eject_for`",
            ),
        ];
        for (text, line, needle) in cases {
            let (got_line, message) = error(&text);
            assert!(
                message.contains(needle),
                "{message:?} lacks {needle:?} for:\n{text}"
            );
            assert_eq!(got_line, line, "wrong line in {message:?} for:\n{text}");
            assert!(message.starts_with("test.toml"), "{message:?}");
            assert!(!message.contains('\n'), "not one line: {message:?}");
        }
    }

    #[test]
    fn missing_file_names_the_path() {
        let e = load(Path::new("/nonexistent/weighbridge.toml")).expect_err("no such file");
        assert!(matches!(*e.kind, ConfigErrorKind::Read(_)));
        assert!(
            e.to_string()
                .starts_with("/nonexistent/weighbridge.toml: cannot read")
        );
    }

    #[test]
    fn weight_rejects_what_strategies_cannot_use() {
        for bad in [-0.5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(Weight::new(bad).is_none(), "{bad}");
        }
        assert_eq!(Weight::new(-0.0), Some(Weight::ZERO));
        assert!(Weight::new(0.0).is_some_and(Weight::is_zero));
    }

    #[test]
    fn locations_count_lines_and_characters() {
        assert_eq!(Location::of("ab\ncd", 4), Location { line: 2, column: 2 });
        assert_eq!(Location::of("µ=1", 2), Location { line: 1, column: 2 });
    }

    #[test]
    fn shipped_example_configs_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).expect("conf/ exists") {
            let path = entry.expect("readable conf/ entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                load(&path).unwrap_or_else(|e| panic!("{e}"));
                checked += 1;
            }
        }
        assert!(checked > 0, "no example in {}", dir.display());
    }
}
