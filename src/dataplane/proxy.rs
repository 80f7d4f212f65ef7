//! The PROXY protocol (HAProxy's `doc/proxy-protocol.txt`): reading the header a front
//! balancer puts before a client's bytes, and writing one before the bytes relayed to a
//! backend. Parsing and encoding are the `ppp` crate's; this module decides what a header
//! means for a connection and how large one may be.

use std::net::SocketAddr;

use ppp::HeaderResult;
use ppp::PartialResult;
use ppp::v2;

use crate::config::{ProxyAccept, ProxyVersion};

/// The longest header accepted. A v1 header is 107 bytes at most; a v2 header is 16 bytes plus
/// its addresses and TLVs, and a front balancer's TLVs (a cloud load balancer's connection id,
/// TLS details) fit in far less. HAProxy takes whatever fits its 16 KiB buffer; a cap this size
/// keeps a connection that has not said who it is from holding more.
pub(crate) const MAX_HEADER: usize = 4096;

/// The longest v1 header, its CRLF included (the spec's 107 bytes).
const V1_MAX: usize = 107;

/// The first 12 bytes of every v2 header.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// What the bytes at the start of a connection say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// Not a whole header yet: read more.
    Incomplete,
    /// A header of `len` bytes. `addresses` is the (client, destination) pair it carries; `None`
    /// for a v2 LOCAL command (the front balancer's own connection, a health check) or an
    /// address family without one (v1 UNKNOWN, v2 UNSPEC or UNIX): the peer is the client then.
    Header {
        len: usize,
        addresses: Option<(SocketAddr, SocketAddr)>,
    },
    /// Not a header this listener accepts; why.
    Invalid(&'static str),
}

/// Reads the header at the start of `input`, which holds every byte received so far (at most
/// [`MAX_HEADER`]): never looks past the header's own length.
pub(crate) fn parse(input: &[u8], accept: ProxyAccept) -> Parsed {
    // Whether what has arrived so far can still be the start of `signature`.
    let starts = |signature: &[u8]| {
        let n = input.len().min(signature.len());
        input[..n] == signature[..n]
    };
    let looks_v2 = starts(V2_SIGNATURE);
    let looks_v1 = starts(b"PROXY ");
    if input.is_empty() {
        return Parsed::Incomplete;
    }
    match (looks_v1, looks_v2, accept) {
        (false, false, _) => return Parsed::Invalid("no PROXY header"),
        (true, _, ProxyAccept::V2) => return Parsed::Invalid("a v1 header where v2 is expected"),
        (_, true, ProxyAccept::V1) => return Parsed::Invalid("a v2 header where v1 is expected"),
        _ => {}
    }
    // A v1 header is one line: until its end has arrived, it is incomplete, however the
    // bytes so far look (`ppp` takes a line cut between its CR and LF for a malformed one).
    if looks_v1 && !input.contains(&b'\n') {
        return if input.len() >= V1_MAX {
            Parsed::Invalid("v1 header too long")
        } else {
            Parsed::Incomplete
        };
    }
    // A v2 header says its length in its 16th byte: one announcing more than the cap is
    // refused at once rather than after 4 KiB have arrived.
    if looks_v2
        && input.len() >= 16
        && 16 + usize::from(u16::from_be_bytes([input[14], input[15]])) > MAX_HEADER
    {
        return Parsed::Invalid("header too long");
    }
    let result = HeaderResult::parse(input);
    // `ppp` reports a whole v1 line that lacks fields as incomplete; more bytes cannot change
    // a line that has ended.
    if looks_v1 && result.is_incomplete() {
        return Parsed::Invalid("malformed v1 header");
    }
    if result.is_incomplete() {
        return if input.len() >= MAX_HEADER {
            Parsed::Invalid("header too long")
        } else {
            Parsed::Incomplete
        };
    }
    match result {
        HeaderResult::V1(Ok(header)) => {
            let addresses = match header.addresses {
                ppp::v1::Addresses::Tcp4(a) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                ppp::v1::Addresses::Tcp6(a) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                ppp::v1::Addresses::Unknown => None,
            };
            Parsed::Header {
                len: header.header.len(),
                addresses,
            }
        }
        HeaderResult::V2(Ok(header)) => {
            let len = header.len();
            if len > MAX_HEADER {
                return Parsed::Invalid("header too long");
            }
            let addresses = match (header.command, header.addresses) {
                (v2::Command::Local, _) => None,
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                (v2::Command::Proxy, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => None,
            };
            Parsed::Header { len, addresses }
        }
        HeaderResult::V1(Err(_)) => Parsed::Invalid("malformed v1 header"),
        HeaderResult::V2(Err(_)) => Parsed::Invalid("malformed v2 header"),
    }
}

/// The header to write before the bytes of a connection from `client` to `destination` (the
/// address it connected to); with `addresses` `None`, one that says the connection carries no
/// client (v2 LOCAL, v1 UNKNOWN): a front balancer's health check, or a probe of our own.
pub(crate) fn header(
    version: ProxyVersion,
    addresses: Option<(SocketAddr, SocketAddr)>,
) -> Vec<u8> {
    // Addresses of two families (a v4 client on a v6 listener) are sent as v6, with the v4
    // one mapped, as HAProxy does.
    let addresses = addresses.map(|(client, destination)| match (client, destination) {
        (SocketAddr::V4(_), SocketAddr::V6(_)) => (mapped(client), destination),
        (SocketAddr::V6(_), SocketAddr::V4(_)) => (client, mapped(destination)),
        _ => (client, destination),
    });
    match version {
        ProxyVersion::V1 => match addresses {
            Some(pair) => ppp::v1::Addresses::from(pair).to_string().into_bytes(),
            None => ppp::v1::Addresses::Unknown.to_string().into_bytes(),
        },
        ProxyVersion::V2 => {
            let (command, addresses) = match addresses {
                Some(pair) => (v2::Command::Proxy, v2::Addresses::from(pair)),
                None => (v2::Command::Local, v2::Addresses::Unspecified),
            };
            let builder = v2::Builder::with_addresses(
                v2::Version::Two | command,
                v2::Protocol::Stream,
                addresses,
            );
            // Only a payload beyond u16::MAX fails to build, and addresses alone are 36 bytes at
            // most.
            builder.build().unwrap_or_default()
        }
    }
}

/// `addr` as an IPv6 address (IPv4-mapped if it is IPv4).
fn mapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) => SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port())),
        v6 => v6,
    }
}

#[cfg(test)]
mod tests;
