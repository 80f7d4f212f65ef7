//! Client networks: a listener's `allow` and `deny` lists, and the question the data path asks
//! of them for every accepted connection, "may this address come in?".
//!
//! A list is parsed once, when the file is validated, into two prefix tries (one per address
//! family, from the `prefix-trie` crate), so a lookup walks at most one trie's depth, whatever
//! the list's length: ten thousand networks cost about what ten do (docs/benchmarks.md).
//!
//! Addresses are compared in their canonical form: an IPv4-mapped IPv6 address
//! (`::ffff:192.0.2.7`, what a dual-stack socket reports for an IPv4 client) is the IPv4
//! address it carries, and a network written inside `::ffff:0:0/96` is the IPv4 network it
//! maps. A shorter IPv6 network such as `::/0` covers IPv6 clients only, as in nginx.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use prefix_trie::PrefixSet;

/// Why an entry of a network list is not a network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NetworkError {
    /// The part before `/` (or the whole entry) is not an IP address.
    #[error(
        "`{entry}` is not an IP address or network: expected an address (192.0.2.7, 2001:db8::7) or address/prefix length (10.0.0.0/8, 2001:db8::/32)"
    )]
    Address {
        /// The entry as written.
        entry: String,
    },
    /// The part after `/` is not a prefix length the address's family has.
    #[error(
        "`{entry}`: the prefix length must be a number from 0 to {max} for an {family} network"
    )]
    PrefixLength {
        /// The entry as written.
        entry: String,
        /// The longest prefix of the family: 32 or 128.
        max: u8,
        /// `IPv4` or `IPv6`.
        family: &'static str,
    },
}

/// A set of IPv4 and IPv6 networks, answering whether an address lies in any of them.
///
/// Equality is set equality: two lists naming the same networks, in any order or with
/// duplicates, are equal, so a reload that only reorders a list changes nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Networks {
    v4: PrefixSet<Ipv4Net>,
    v6: PrefixSet<Ipv6Net>,
}

impl Networks {
    /// Parses a list whose entries are each a network in CIDR notation (`10.0.0.0/8`,
    /// `2001:db8::/32`) or a bare address (`192.0.2.7` is `192.0.2.7/32`, `::1` is `::1/128`).
    ///
    /// A network written with host bits set, such as `10.0.0.1/8`, is accepted and masked to
    /// the network it lies in (`10.0.0.0/8`), as HAProxy and nginx do: the prefix length says
    /// what the writer meant to cover. Nothing is trimmed: an entry with spaces is an error.
    pub(crate) fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Networks, NetworkError> {
        let mut networks = Networks::default();
        for entry in entries {
            networks.insert(parse_entry(entry.as_ref())?);
        }
        Ok(networks)
    }

    /// Whether `ip` lies in one of the networks.
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(ip) => self.v4.is_covered(&Ipv4Net::from(ip)),
            IpAddr::V6(ip) => self.v6.is_covered(&Ipv6Net::from(ip)),
        }
    }

    fn insert(&mut self, network: Network) {
        match network {
            Network::V4(net) => self.v4.insert(net),
            Network::V6(net) => self.v6.insert(net),
        };
    }
}

/// Who may connect to a listener: its `allow` and `deny` lists together.
///
/// The default admits everyone, as a listener without either key does.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Access {
    /// `None`: every address is allowed. An empty list allows nobody.
    allow: Option<Networks>,
    /// Refused even when allowed; no list and an empty list both refuse nobody.
    deny: Networks,
}

impl Access {
    /// Combines a listener's `allow` list (if it has one) and `deny` list (if it has one).
    pub(crate) fn new(allow: Option<Networks>, deny: Option<Networks>) -> Access {
        Access {
            allow,
            deny: deny.unwrap_or_default(),
        }
    }

    /// Whether a client at `ip` may connect: it is allowed (every address is when there is no
    /// `allow` list) and not denied. A denial wins over an allowance, however specific the
    /// allowing network is: `deny` carves holes out of `allow`, never the other way round.
    pub(crate) fn admits(&self, ip: IpAddr) -> bool {
        self.allow.as_ref().is_none_or(|allow| allow.contains(ip)) && !self.deny.contains(ip)
    }
}

/// One parsed entry, in its canonical family.
enum Network {
    V4(Ipv4Net),
    V6(Ipv6Net),
}

fn parse_entry(entry: &str) -> Result<Network, NetworkError> {
    let (address, length) = match entry.split_once('/') {
        Some((address, length)) => (address, Some(length)),
        None => (entry, None),
    };
    let address: IpAddr = address.parse().map_err(|_| NetworkError::Address {
        entry: entry.to_owned(),
    })?;
    let bad_length = || {
        let (max, family) = match address {
            IpAddr::V4(_) => (Ipv4Addr::BITS as u8, "IPv4"),
            IpAddr::V6(_) => (Ipv6Addr::BITS as u8, "IPv6"),
        };
        NetworkError::PrefixLength {
            entry: entry.to_owned(),
            max,
            family,
        }
    };
    let length = length
        .map(|length| parse_length(length).ok_or_else(bad_length))
        .transpose()?;
    match address {
        IpAddr::V4(address) => {
            let net = Ipv4Net::new(address, length.unwrap_or(Ipv4Addr::BITS as u8));
            Ok(Network::V4(net.map_err(|_| bad_length())?.trunc()))
        }
        IpAddr::V6(address) => {
            let length = length.unwrap_or(Ipv6Addr::BITS as u8);
            let net = Ipv6Net::new(address, length).map_err(|_| bad_length())?;
            // Inside ::ffff:0:0/96 the last 32 bits are an IPv4 address: compare as IPv4.
            let mapped = address
                .to_ipv4_mapped()
                .zip(length.checked_sub(96))
                .and_then(|(address, length)| Ipv4Net::new(address, length).ok());
            Ok(match mapped {
                Some(net) => Network::V4(net.trunc()),
                None => Network::V6(net.trunc()),
            })
        }
    }
}

/// A prefix length as written: decimal digits only (no sign, no spaces), at most three.
fn parse_length(text: &str) -> Option<u8> {
    let digits = !text.is_empty() && text.len() <= 3 && text.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| text.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("a test address")
    }

    fn networks(entries: &[&str]) -> Networks {
        Networks::parse(entries).expect("valid test networks")
    }

    #[test]
    fn cidr_and_bare_addresses() {
        let set = networks(&["10.0.0.0/8", "192.168.1.7", "2001:db8::/32", "::1"]);
        assert!(set.contains(ip("10.255.0.1")));
        assert!(!set.contains(ip("11.0.0.1")));
        assert!(set.contains(ip("192.168.1.7")));
        assert!(!set.contains(ip("192.168.1.8")));
        assert!(set.contains(ip("2001:db8:1::5")));
        assert!(!set.contains(ip("2001:db9::5")));
        assert!(set.contains(ip("::1")));
        assert!(!set.contains(ip("::2")));
    }

    #[test]
    fn empty_list_contains_nothing() {
        let set = networks(&[]);
        assert!(!set.contains(ip("10.0.0.1")));
        assert!(!set.contains(ip("::1")));
    }

    #[test]
    fn whole_families() {
        let v4 = networks(&["0.0.0.0/0"]);
        assert!(v4.contains(ip("203.0.113.9")));
        assert!(v4.contains(ip("::ffff:203.0.113.9")));
        assert!(!v4.contains(ip("2001:db8::1")));
        let v6 = networks(&["::/0"]);
        assert!(v6.contains(ip("2001:db8::1")));
        assert!(
            !v6.contains(ip("203.0.113.9")),
            "::/0 covers IPv6 clients only"
        );
        assert!(!v6.contains(ip("::ffff:203.0.113.9")));
    }

    #[test]
    fn ipv4_mapped_clients_match_ipv4_networks() {
        let set = networks(&["10.0.0.0/8"]);
        assert!(set.contains(ip("::ffff:10.1.2.3")));
        assert!(!set.contains(ip("::ffff:11.1.2.3")));
    }

    #[test]
    fn ipv4_mapped_networks_are_ipv4_networks() {
        let set = networks(&["::ffff:10.0.0.0/104", "::ffff:192.0.2.7"]);
        assert!(set.contains(ip("10.9.8.7")));
        assert!(set.contains(ip("::ffff:10.9.8.7")));
        assert!(set.contains(ip("192.0.2.7")));
        assert!(!set.contains(ip("192.0.2.8")));
        assert_eq!(set, networks(&["10.0.0.0/8", "192.0.2.7/32"]));
    }

    #[test]
    fn host_bits_are_masked() {
        let set = networks(&["10.0.0.1/8", "2001:db8::1/32"]);
        assert!(set.contains(ip("10.200.0.1")));
        assert!(set.contains(ip("2001:db8:ffff::1")));
        assert_eq!(set, networks(&["10.0.0.0/8", "2001:db8::/32"]));
    }

    #[test]
    fn nested_networks() {
        let set = networks(&["10.1.2.0/24", "10.0.0.0/8"]);
        assert!(set.contains(ip("10.1.2.3")));
        assert!(set.contains(ip("10.3.2.1")));
    }

    #[test]
    fn equality_ignores_order_and_duplicates() {
        assert_eq!(
            networks(&["10.0.0.0/8", "::1", "10.0.0.0/8"]),
            networks(&["::1/128", "10.0.0.0/8"])
        );
        assert_ne!(networks(&["10.0.0.0/8"]), networks(&["10.0.0.0/9"]));
    }

    #[test]
    fn bad_entries_are_named() {
        let cases = [
            ("10.0.0.0/33", "from 0 to 32 for an IPv4"),
            ("::/129", "from 0 to 128 for an IPv6"),
            ("10.0.0.0/", "prefix length"),
            ("10.0.0.0/+8", "prefix length"),
            ("10.0.0.0/08 ", "prefix length"),
            ("10.0.0.0/0008", "prefix length"),
            ("10.0.0.0/8/8", "prefix length"),
            ("10.0.0/8", "not an IP address"),
            ("example.com", "not an IP address"),
            (" 10.0.0.1", "not an IP address"),
            ("", "not an IP address"),
            ("/8", "not an IP address"),
            ("[::1]/128", "not an IP address"),
        ];
        for (entry, why) in cases {
            let err = Networks::parse(&["10.0.0.0/8", entry]).expect_err(entry);
            let message = err.to_string();
            assert!(message.contains(&format!("`{entry}`")), "{message}");
            assert!(message.contains(why), "{entry}: {message}");
        }
    }

    #[test]
    fn parses_owned_strings() {
        let entries = vec![String::from("10.0.0.0/8")];
        assert!(
            Networks::parse(&entries)
                .expect("valid")
                .contains(ip("10.0.0.1"))
        );
    }

    #[test]
    fn access_without_lists_admits_everyone() {
        let access = Access::default();
        assert!(access.admits(ip("203.0.113.9")));
        assert!(access.admits(ip("2001:db8::1")));
        assert_eq!(access, Access::new(None, Some(networks(&[]))));
    }

    #[test]
    fn access_allow_then_deny() {
        let access = Access::new(
            Some(networks(&["10.0.0.0/8", "192.168.0.0/16", "::1/128"])),
            Some(networks(&["10.1.2.0/24"])),
        );
        assert!(access.admits(ip("10.0.0.1")));
        assert!(access.admits(ip("::ffff:10.0.0.1")));
        assert!(access.admits(ip("192.168.3.4")));
        assert!(access.admits(ip("::1")));
        assert!(!access.admits(ip("10.1.2.3")), "denied inside allowed");
        assert!(!access.admits(ip("::ffff:10.1.2.3")));
        assert!(!access.admits(ip("172.16.0.1")), "not allowed");
        assert!(!access.admits(ip("2001:db8::1")));
    }

    #[test]
    fn deny_wins_over_a_more_specific_allow() {
        let access = Access::new(
            Some(networks(&["10.1.2.3/32"])),
            Some(networks(&["10.0.0.0/8"])),
        );
        assert!(!access.admits(ip("10.1.2.3")));
    }

    #[test]
    fn deny_only() {
        let access = Access::new(None, Some(networks(&["10.0.0.0/8", "2001:db8::/32"])));
        assert!(!access.admits(ip("10.0.0.1")));
        assert!(!access.admits(ip("2001:db8::1")));
        assert!(access.admits(ip("11.0.0.1")));
        assert!(access.admits(ip("::1")));
    }

    #[test]
    fn empty_allow_admits_nobody() {
        let access = Access::new(Some(networks(&[])), None);
        assert!(!access.admits(ip("10.0.0.1")));
        assert!(!access.admits(ip("::1")));
    }
}
