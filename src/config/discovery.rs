//! Backends given by DNS name: what a `[[pool.backend]]` entry with a name (or `srv`) says,
//! and the `[resolver]` table.
//!
//! A name is not a backend: it is a source of backends. The file keeps the names
//! ([`PoolConfig::names`](super::PoolConfig::names)); the control task resolves them and adds one
//! [`BackendConfig`](super::BackendConfig) per address to the pool it builds snapshots from.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::validate::{Invalid, duration};
use super::{ConfigErrorKind, Weight};

/// How long one query may take before it counts as failed (per attempt, per nameserver).
pub(crate) const DEFAULT_RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often every name is resolved again at most: a fleet's pods come and go within seconds,
/// and Envoy's `dns_refresh_rate` defaults to 5 s too.
pub(crate) const DEFAULT_REFRESH: Duration = Duration::from_secs(5);
/// The shortest time between two resolutions of one name, whatever its records' TTL (0 or 1
/// in many service-discovery systems): keeps a TTL of zero from becoming a query loop.
pub(crate) const MIN_REFRESH: Duration = Duration::from_secs(1);

/// The `[resolver]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawResolver {
    pub(crate) nameservers: Option<Spanned<Vec<Spanned<String>>>>,
    pub(crate) timeout: Option<Spanned<String>>,
    pub(crate) refresh: Option<Spanned<String>>,
}

/// How names are resolved: the `[resolver]` table, or the system's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResolverSettings {
    /// The nameservers to ask instead of the system's (`/etc/resolv.conf`), if set. Search
    /// domains and `ndots` still come from the system's file.
    pub nameservers: Option<Vec<SocketAddr>>,
    /// Per query.
    pub timeout: Duration,
    /// Every name is resolved again at least this often; a shorter TTL brings it forward (to no
    /// less than [`MIN_REFRESH`]).
    pub refresh: Duration,
}

impl Default for ResolverSettings {
    fn default() -> Self {
        ResolverSettings {
            nameservers: None,
            timeout: DEFAULT_RESOLVE_TIMEOUT,
            refresh: DEFAULT_REFRESH,
        }
    }
}

impl ResolverSettings {
    pub(super) fn from_raw(raw: &RawResolver) -> Result<ResolverSettings, Invalid> {
        let nameservers = match &raw.nameservers {
            None => None,
            Some(list) => {
                if list.get_ref().is_empty() {
                    return Err((Some(list.span()), ConfigErrorKind::NoNameservers));
                }
                let mut parsed = Vec::with_capacity(list.get_ref().len());
                for value in list.get_ref() {
                    parsed.push(nameserver(value)?);
                }
                Some(parsed)
            }
        };
        Ok(ResolverSettings {
            nameservers,
            timeout: duration(&raw.timeout, "timeout", DEFAULT_RESOLVE_TIMEOUT)?,
            refresh: duration(&raw.refresh, "refresh", DEFAULT_REFRESH)?.max(MIN_REFRESH),
        })
    }
}

/// A nameserver: `IP` (port 53) or `IP:port`.
fn nameserver(value: &Spanned<String>) -> Result<SocketAddr, Invalid> {
    let text = value.get_ref().trim();
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    match text.parse::<SocketAddr>() {
        Ok(addr) if addr.port() != 0 => Ok(addr),
        _ => Err((
            Some(value.span()),
            ConfigErrorKind::BadNameserver(value.get_ref().clone()),
        )),
    }
}

/// What a name entry asks the DNS for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// Every A and AAAA address of `host`, each with `port`.
    Host {
        /// The name, lower case, without a trailing dot (DNS names ignore case).
        host: String,
        /// The port every address gets.
        port: u16,
    },
    /// The targets and ports of `name`'s SRV records.
    Srv {
        /// The SRV name, e.g. `_http._tcp.vllm.inference.svc.cluster.local`.
        name: String,
    },
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Host { host, port } => write!(f, "{host}:{port}"),
            Target::Srv { name } => write!(f, "srv:{name}"),
        }
    }
}

/// A backend entry given by name: every address the name resolves to becomes a backend with
/// these settings.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NamedBackend {
    /// What to resolve.
    pub target: Target,
    /// Every address's weight.
    pub weight: Weight,
    /// Every address's slots.
    pub max_connections: Option<NonZeroU32>,
    /// Every address's `send_proxy`, if set.
    pub send_proxy: Option<super::SendProxy>,
}

/// Where a backend entry's `addr` points: a literal address, or a name and port.
pub(super) enum Addr {
    Literal(SocketAddr),
    Name(Target),
}

/// Reads a backend's `addr`: `IP:port`, or `NAME:port` with a DNS name.
pub(super) fn backend_addr(value: &Spanned<String>) -> Result<Addr, Invalid> {
    let text = value.get_ref().trim();
    let bad = || {
        let kind = ConfigErrorKind::BadBackendAddress(value.get_ref().clone());
        (Some(value.span()), kind)
    };
    let port_zero = || {
        let kind = ConfigErrorKind::BackendPortZero {
            key: "addr",
            value: value.get_ref().clone(),
        };
        (Some(value.span()), kind)
    };
    if let Ok(addr) = text.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(port_zero());
        }
        return Ok(Addr::Literal(addr));
    }
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if !is_dns_name(host) {
        return Err(bad());
    }
    if port == 0 {
        return Err(port_zero());
    }
    Ok(Addr::Name(Target::Host {
        host: host.trim_end_matches('.').to_ascii_lowercase(),
        port,
    }))
}

/// Reads a backend's `srv`: a DNS name whose SRV records give targets and ports.
pub(super) fn srv_name(value: &Spanned<String>) -> Result<Target, Invalid> {
    let text = value.get_ref().trim();
    if !is_dns_name(text) {
        return Err((
            Some(value.span()),
            ConfigErrorKind::BadSrv(value.get_ref().clone()),
        ));
    }
    Ok(Target::Srv {
        name: text.trim_end_matches('.').to_ascii_lowercase(),
    })
}

/// Whether `name` is a DNS name a resolver can be asked for: dot-separated labels of 1–63
/// letters, digits, `-` or `_` (SRV owner names start with `_`), 253 characters at most, an
/// optional final dot. A last label of digits only is refused: no top-level domain is numeric,
/// and `10.0.0:8000` is a mistyped address, not a name.
pub(super) fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    let labels_ok = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    let last_numeric = name
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
    labels_ok && !last_numeric
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names_are_told_from_mistyped_addresses() {
        for good in [
            "localhost",
            "vllm-headless.inference.svc.cluster.local",
            "_http._tcp.vllm.inference.svc.cluster.local",
            "gpu-01.",
            "a1.b2",
        ] {
            assert!(is_dns_name(good), "{good}");
        }
        let long_label = "a".repeat(64);
        let long_name = ["abcdefghij"; 26].join(".");
        for bad in [
            "",
            ".",
            "10.0.0",
            "::1",
            "a..b",
            "a b",
            "host/path",
            long_label.as_str(),
            long_name.as_str(),
        ] {
            assert!(!is_dns_name(bad), "{bad}");
        }
    }
}
