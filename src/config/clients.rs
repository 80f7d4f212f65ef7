//! What a listener knows of its clients: the PROXY protocol both ways, which networks may
//! connect, and per-client limits.

use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::ConfigErrorKind;
use super::validate::Invalid;

/// Which PROXY protocol headers a listener takes (`accept_proxy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ProxyAccept {
    /// The text header only.
    V1,
    /// The binary header only.
    V2,
    /// Either, told apart by their first bytes.
    Any,
}

/// A PROXY protocol version to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProxyVersion {
    /// `PROXY TCP4 ...\r\n`.
    V1,
    /// The binary header.
    V2,
}

impl ProxyVersion {
    /// The header of a connection that carries no client (v2 LOCAL, v1 UNKNOWN): what a
    /// health probe or a load scrape sends first to a backend that expects a header
    /// (HAProxy's `check-send-proxy`).
    pub(crate) fn local_header(self) -> &'static [u8] {
        match self {
            ProxyVersion::V1 => b"PROXY UNKNOWN\r\n",
            // Signature, version 2 + LOCAL, AF_UNSPEC, no address bytes.
            ProxyVersion::V2 => b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00",
        }
    }
}

/// `send_proxy` as written: a version, or `"none"` (a backend that does not speak it, under a
/// listener that sends it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum SendProxy {
    None,
    V1,
    V2,
}

impl SendProxy {
    pub(crate) fn version(self) -> Option<ProxyVersion> {
        match self {
            SendProxy::None => None,
            SendProxy::V1 => Some(ProxyVersion::V1),
            SendProxy::V2 => Some(ProxyVersion::V2),
        }
    }
}

/// New connections per client address: `count` per `per`, with a burst of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rate {
    pub count: NonZeroU32,
    pub per: Duration,
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, humantime::format_duration(self.per))
    }
}

/// A listener's client controls. All off by default.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct ClientsConfig {
    /// Each connection must start with a PROXY header of this kind.
    pub accept_proxy: Option<ProxyAccept>,
    /// Peers allowed to send a header (required with `accept_proxy`).
    pub proxy_trusted: Vec<IpNet>,
    /// The header written to backends, unless a backend says otherwise.
    pub send_proxy: Option<ProxyVersion>,
    /// Client networks accepted; `None`: all.
    pub allow: Option<Vec<IpNet>>,
    /// Client networks refused, even when allowed.
    pub deny: Vec<IpNet>,
    /// Open connections per client address at most.
    pub max_connections_per_client: Option<NonZeroU32>,
    /// New connections per client address.
    pub connection_rate_per_client: Option<Rate>,
}

/// The raw keys of [`ClientsConfig`], from a `[[listener]]` table.
pub(super) struct RawClients<'a> {
    pub accept_proxy: &'a Option<Spanned<ProxyAccept>>,
    pub proxy_trusted: &'a Option<Spanned<Vec<Spanned<String>>>>,
    pub send_proxy: &'a Option<Spanned<SendProxy>>,
    pub allow: &'a Option<Spanned<Vec<Spanned<String>>>>,
    pub deny: &'a Option<Spanned<Vec<Spanned<String>>>>,
    pub max_connections_per_client: &'a Option<Spanned<u64>>,
    pub connection_rate_per_client: &'a Option<Spanned<String>>,
}

impl ClientsConfig {
    pub(super) fn from_raw(raw: RawClients<'_>) -> Result<ClientsConfig, Invalid> {
        let accept_proxy = raw.accept_proxy.as_ref().map(|v| *v.get_ref());
        let proxy_trusted = match raw.proxy_trusted {
            Some(list) => networks(list, "proxy_trusted")?,
            None => Vec::new(),
        };
        match (raw.accept_proxy, raw.proxy_trusted) {
            (Some(accept), None) => {
                return Err((Some(accept.span()), ConfigErrorKind::ProxyTrustedMissing));
            }
            (None, Some(trusted)) => {
                return Err((Some(trusted.span()), ConfigErrorKind::ProxyTrustedAlone));
            }
            _ => {}
        }
        let max_connections_per_client = match raw.max_connections_per_client {
            Some(v) => Some(
                NonZeroU32::new(u32::try_from(*v.get_ref()).unwrap_or(u32::MAX)).ok_or((
                    Some(v.span()),
                    ConfigErrorKind::ZeroCount("max_connections_per_client"),
                ))?,
            ),
            None => None,
        };
        Ok(ClientsConfig {
            accept_proxy,
            proxy_trusted,
            send_proxy: raw.send_proxy.as_ref().and_then(|v| v.get_ref().version()),
            allow: match raw.allow {
                Some(list) => Some(networks(list, "allow")?),
                None => None,
            },
            deny: match raw.deny {
                Some(list) => networks(list, "deny")?,
                None => Vec::new(),
            },
            max_connections_per_client,
            connection_rate_per_client: match raw.connection_rate_per_client {
                Some(v) => Some(rate(v)?),
                None => None,
            },
        })
    }
}

/// A list of networks: `10.0.0.0/8`, `::1/128`, or a bare address (one host). Host bits set
/// under the prefix are cleared, as HAProxy and nginx do (`10.1.2.3/8` is `10.0.0.0/8`).
fn networks(
    list: &Spanned<Vec<Spanned<String>>>,
    key: &'static str,
) -> Result<Vec<IpNet>, Invalid> {
    let mut parsed = Vec::with_capacity(list.get_ref().len());
    for value in list.get_ref() {
        let text = value.get_ref().trim();
        let net = match text.parse::<IpNet>() {
            Ok(net) => net.trunc(),
            Err(_) => match text.parse::<IpAddr>() {
                Ok(ip) => IpNet::from(ip),
                Err(_) => {
                    return Err((
                        Some(value.span()),
                        ConfigErrorKind::BadNetwork {
                            key,
                            value: value.get_ref().clone(),
                        },
                    ));
                }
            },
        };
        parsed.push(net);
    }
    Ok(parsed)
}

/// A rate: `COUNT/s`, `COUNT/m`, `COUNT/h`, or `COUNT/DURATION` (`5/100ms`).
fn rate(value: &Spanned<String>) -> Result<Rate, Invalid> {
    let bad = || {
        (
            Some(value.span()),
            ConfigErrorKind::BadRate(value.get_ref().clone()),
        )
    };
    let (count, per) = value.get_ref().trim().split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    let count = NonZeroU32::new(count).ok_or_else(bad)?;
    let per = match per.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        other => humantime::parse_duration(other).map_err(|_| bad())?,
    };
    if per.is_zero() || per > super::MAX_DURATION {
        return Err(bad());
    }
    Ok(Rate { count, per })
}
