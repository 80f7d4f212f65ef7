//! What a listener knows of its clients: the PROXY protocol both ways, which networks may
//! connect, and per-client limits.

use std::num::NonZeroU32;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::validate::Invalid;
use super::{Access, ClientLimits, ConfigErrorKind, Networks, Rate};

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

/// A listener's client controls. All off by default.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct ClientsConfig {
    /// Each connection must start with a PROXY header of this kind.
    pub accept_proxy: Option<ProxyAccept>,
    /// Peers allowed to send a header (required with `accept_proxy`).
    pub proxy_trusted: Networks,
    /// The header written to backends, unless a backend says otherwise.
    pub send_proxy: Option<ProxyVersion>,
    /// `allow` and `deny`.
    pub access: Access,
    /// `max_connections_per_client` and `connection_rate_per_client`.
    pub limits: ClientLimits,
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
            None => Networks::default(),
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
        let allow = match raw.allow {
            Some(list) => Some(networks(list, "allow")?),
            None => None,
        };
        let deny = match raw.deny {
            Some(list) => Some(networks(list, "deny")?),
            None => None,
        };
        Ok(ClientsConfig {
            accept_proxy,
            proxy_trusted,
            send_proxy: raw.send_proxy.as_ref().and_then(|v| v.get_ref().version()),
            access: Access::new(allow, deny),
            limits: ClientLimits {
                max_open: max_connections_per_client,
                rate: match raw.connection_rate_per_client {
                    Some(v) => Some(rate(v)?),
                    None => None,
                },
            },
        })
    }
}

/// A list of networks: `10.0.0.0/8`, `::1/128`, or a bare address (one host); the error
/// names the first entry that is none of these, on its line.
fn networks(list: &Spanned<Vec<Spanned<String>>>, key: &'static str) -> Result<Networks, Invalid> {
    let entries: Vec<&str> = list
        .get_ref()
        .iter()
        .map(|v| v.get_ref().as_str())
        .collect();
    Networks::parse(&entries).map_err(|error| {
        let at = list
            .get_ref()
            .iter()
            .find(|v| Networks::parse(&[v.get_ref()]).is_err())
            .map_or(list.span(), Spanned::span);
        (Some(at), ConfigErrorKind::BadNetwork { key, error })
    })
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
    Rate::new(count, per).ok_or_else(bad)
}
