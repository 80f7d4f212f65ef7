//! What can be wrong with a config file, and how it is reported: one line, `path:line:column:
//! message`, naming the offending key and, where a slip is common, what to write instead.
//!
//! The TOML parser's own messages say what was expected but not always which key it was about;
//! [`toml_message`] adds the key from the span and a hint for the usual slips (`[listener]` for
//! `[[listener]]`, a duration written as a bare number).

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;

use super::discovery::Target;
use super::{CongestionError, NetworkError};

/// Line and column (both 1-based) in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Location {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
}

impl Location {
    /// The location of byte `offset` of `text`.
    pub(super) fn of(text: &str, offset: usize) -> Location {
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
    pub(crate) path: PathBuf,
    /// Where in it, when the problem has a place.
    pub(crate) location: Option<Location>,
    /// What is wrong (boxed: errors are rare, `Result`s of config are moved around often).
    pub(crate) kind: Box<ConfigErrorKind>,
}

impl ConfigError {
    /// The file the error is about.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The line of the offending key or value (1-based), when the problem has a place.
    pub fn line(&self) -> Option<usize> {
        self.location.map(|l| l.line)
    }
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

/// Whose backends an error is about: a listener's own pool (the inline form) or a `[[pool]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Owner {
    /// `listener` or `pool`, as the file's tables say.
    pub kind: &'static str,
    /// Its name.
    pub name: String,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} `{}`", self.kind, self.name)
    }
}

/// Everything that can be wrong with a config file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum ConfigErrorKind {
    /// The file could not be read.
    #[error("cannot read config file: {0}")]
    Read(#[source] std::io::Error),
    /// TOML syntax, an unknown key, a missing key or a value of the wrong type.
    #[error("{0}")]
    Toml(String),
    /// No `[[listener]]` at all.
    #[error("no listener defined: add at least one [[listener]] table")]
    NoListeners,
    /// A pool without backends (a listener in the inline form without any, and without `pool`).
    #[error("{0} has no backend: add at least one [[{kind}.backend]] table{hint}",
        kind = .0.kind, hint = if .0.kind == "listener" { ", or `pool = \"...\"`" } else { "" })]
    NoBackends(Owner),
    /// A listener with `pool` and a key of the inline form.
    #[error(
        "listener `{listener}`: `{key}` belongs to its pool `{pool}`; set it in that [[pool]] table, or drop `pool` to give the listener a pool of its own"
    )]
    PoolAndInline {
        /// The listener.
        listener: String,
        /// The inline key written beside `pool`.
        key: &'static str,
        /// The pool named.
        pool: String,
    },
    /// `pool` naming no `[[pool]]`.
    #[error("listener `{listener}`: `pool`: no [[pool]] is named `{pool}`{known}")]
    UnknownPool {
        /// The listener.
        listener: String,
        /// The name written.
        pool: String,
        /// The pools there are, as a hint (empty when there are none).
        known: String,
    },
    /// Two pools with one name; a listener's own pool has the listener's name.
    #[error(
        "duplicate pool name `{0}` (a listener with inline backends has a pool of its own named after it)"
    )]
    DuplicatePool(String),
    /// An empty listener name.
    #[error("`name` must not be empty")]
    EmptyName,
    /// A listener or pool name with characters that would garble a log line or a metric label.
    #[error(
        "`name`: invalid {0} name {1:?}: use letters, digits, `-`, `_`, `.` and `:` (it appears in log lines and metric labels)"
    )]
    BadName(&'static str, String),
    /// Two listeners with one name.
    #[error("duplicate listener name `{0}`")]
    DuplicateName(String),
    /// Two listeners on one address, or on addresses the kernel would not let both bind (a
    /// wildcard and an address of its family, on one port).
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
    /// Two backends of one pool with one address.
    #[error("{owner}: backend {addr} is listed twice")]
    DuplicateBackend {
        /// The pool.
        owner: Owner,
        /// The repeated address.
        addr: SocketAddr,
    },
    /// Two name entries of one pool with one name.
    #[error("{owner}: backend name `{target}` is listed twice")]
    DuplicateBackendName {
        /// The pool.
        owner: Owner,
        /// The repeated name.
        target: Target,
    },
    /// A backend `addr` that is neither `IP:port` nor `NAME:port`.
    #[error(
        "`addr`: invalid address `{0}`: expected IP:port such as 127.0.0.1:8000 or [::1]:8000, or a DNS name and port such as vllm.inference.svc.cluster.local:8000"
    )]
    BadBackendAddress(String),
    /// A `srv` that is not a DNS name.
    #[error(
        "`srv`: invalid name `{0}`: expected a DNS name such as _http._tcp.vllm.inference.svc.cluster.local"
    )]
    BadSrv(String),
    /// A backend with both `addr` and `srv`.
    #[error("a backend has `addr` or `srv`, not both")]
    AddrAndSrv,
    /// A backend with neither `addr` nor `srv`.
    #[error("a backend needs `addr` (IP:port or NAME:port) or `srv`")]
    NoBackendAddress,
    /// `health_addr` on a backend given by name.
    #[error(
        "`health_addr` cannot be set on a backend given by name: each address the name resolves to is probed at its own address"
    )]
    HealthAddrWithName,
    /// `accept_proxy` without `proxy_trusted`.
    #[error(
        "`accept_proxy` needs `proxy_trusted`: the networks of the front balancers allowed to send a PROXY header (e.g. [\"10.0.0.0/8\"])"
    )]
    ProxyTrustedMissing,
    /// A listener with routes and a key of the one-pool forms.
    #[error(
        "listener `{listener}`: `{key}` cannot be used with [[listener.route]]: a listener either routes to pools by server name or has one pool (`pool`, or backends of its own)"
    )]
    RoutesAndPool {
        /// The listener.
        listener: String,
        /// The key written beside the routes.
        key: &'static str,
    },
    /// A route after the default one, which matches every client.
    #[error(
        "listener `{listener}`: route {default} has no `sni` and so takes every client: it must be the last route (routes after it would never be used)"
    )]
    RouteAfterDefault {
        /// The listener.
        listener: String,
        /// The default route's place (1-based).
        default: usize,
    },
    /// A route's `pool` naming no `[[pool]]`.
    #[error("listener `{listener}`: route `pool`: no [[pool]] is named `{pool}`{known}")]
    UnknownRoutePool {
        /// The listener.
        listener: String,
        /// The name written.
        pool: String,
        /// The pools there are, as a hint.
        known: String,
    },
    /// `sni = []`.
    #[error(
        "`sni`: an empty list matches no client; leave `sni` out to make this the default route"
    )]
    EmptySni,
    /// A server name pattern that is not one.
    #[error(
        "`sni`: invalid server name {name:?}: {why}; expected a name such as llama.example.com or *.llama.example.com"
    )]
    BadSni {
        /// As written.
        name: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A server name two routes match: the later one would never see it.
    #[error("`sni`: `{name}` is already routed by route {route}")]
    DuplicateSni {
        /// The pattern.
        name: String,
        /// The route that has it first (1-based).
        route: usize,
    },
    /// `hash_balance_factor` neither 0 nor between 1 and 100.
    #[error(
        "`hash_balance_factor`: invalid factor {0}: use 0 (no bound) or a factor from 1 to 100, such as 1.25"
    )]
    BadBalanceFactor(f64),
    /// `hash_key` or `hash_balance_factor` on a pool that does not hash.
    #[error("`{0}` applies to `strategy = \"consistent_hash\"` only")]
    HashWithoutConsistentHash(&'static str),
    /// `proxy_trusted` without `accept_proxy`.
    #[error("`proxy_trusted` does nothing without `accept_proxy`")]
    ProxyTrustedAlone,
    /// A network that is neither `ADDRESS/PREFIX` nor an address.
    #[error("`{key}`: {error}")]
    BadNetwork {
        /// The key.
        key: &'static str,
        /// What is wrong with the entry.
        error: NetworkError,
    },
    /// A rate that is not `COUNT/UNIT`.
    #[error(
        "`connection_rate_per_client`: invalid rate `{0}`: expected a count above 0 per unit, such as \"20/s\", \"600/m\" or \"5/100ms\""
    )]
    BadRate(String),
    /// A `[resolver] nameservers` entry that is not `IP` or `IP:port`.
    #[error(
        "`nameservers`: invalid nameserver `{0}`: expected IP or IP:port such as 10.96.0.10 or 127.0.0.1:5353"
    )]
    BadNameserver(String),
    /// An empty `nameservers` list.
    #[error("`nameservers`: empty; leave the key out to use the system's (/etc/resolv.conf)")]
    NoNameservers,
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
    /// A duration beyond [`MAX_DURATION`](super::MAX_DURATION).
    #[error("`{0}` must be at most 365 days")]
    LongDuration(&'static str),
    /// A backend with `max_connections = 0`.
    #[error(
        "`max_connections` must be at least 1: to keep new connections from a backend, set `weight = 0` or drain it"
    )]
    ZeroSlots,
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
    /// Every weight of a pool is zero.
    #[error("{0}: every backend has weight 0, so no connection could be routed")]
    AllWeightsZero(Owner),
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

/// Keys whose values are durations, written as strings with a unit.
const DURATION_KEYS: [&str; 9] = [
    "shutdown_grace",
    "queue_timeout",
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
pub(super) fn toml_message(text: &str, span: Option<Range<usize>>, message: &str) -> String {
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
