use std::net::SocketAddr;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use super::*;

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("literal")
}

#[test]
fn what_the_writer_writes_the_parser_reads_back() {
    let pairs = [
        (addr("192.0.2.7:51000"), addr("10.0.0.1:443")),
        (addr("[2001:db8::7]:51000"), addr("[2001:db8::1]:443")),
    ];
    for version in [ProxyVersion::V1, ProxyVersion::V2] {
        let accept = match version {
            ProxyVersion::V1 => ProxyAccept::V1,
            ProxyVersion::V2 => ProxyAccept::V2,
        };
        for pair in pairs {
            let bytes = header(version, Some(pair));
            for accept in [accept, ProxyAccept::Any] {
                assert_eq!(
                    parse(&bytes, accept),
                    Parsed::Header {
                        len: bytes.len(),
                        addresses: Some(pair)
                    },
                    "{version:?} {pair:?}"
                );
            }
            // Bytes after the header are the client's, not the header's.
            let mut more = bytes.clone();
            more.extend_from_slice(b"GET / HTTP/1.1\r\n");
            assert_eq!(
                parse(&more, accept),
                Parsed::Header {
                    len: bytes.len(),
                    addresses: Some(pair)
                }
            );
            // Every strict prefix is incomplete, never an error or a header.
            for cut in 1..bytes.len() {
                assert_eq!(parse(&bytes[..cut], accept), Parsed::Incomplete, "{cut}");
            }
        }
        // No client: LOCAL (v2) or UNKNOWN (v1), read back as a header without addresses.
        let bytes = header(version, None);
        assert_eq!(
            parse(&bytes, ProxyAccept::Any),
            Parsed::Header {
                len: bytes.len(),
                addresses: None
            }
        );
    }
}

#[test]
fn a_v4_client_on_a_v6_listener_is_sent_as_mapped_v6() {
    let client = addr("192.0.2.7:51000");
    let bytes = header(ProxyVersion::V1, Some((client, addr("[::1]:443"))));
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        "PROXY TCP6 ::ffff:192.0.2.7 ::1 51000 443\r\n"
    );
}

#[test]
fn the_wrong_version_garbage_and_oversized_headers_are_refused() {
    let v1 = header(
        ProxyVersion::V1,
        Some((addr("192.0.2.7:1"), addr("10.0.0.1:2"))),
    );
    let v2 = header(
        ProxyVersion::V2,
        Some((addr("192.0.2.7:1"), addr("10.0.0.1:2"))),
    );
    assert!(matches!(parse(&v1, ProxyAccept::V2), Parsed::Invalid(_)));
    assert!(matches!(parse(&v2, ProxyAccept::V1), Parsed::Invalid(_)));
    assert!(matches!(
        parse(b"GET / HTTP/1.1\r\n", ProxyAccept::Any),
        Parsed::Invalid("no PROXY header")
    ));
    assert!(matches!(
        parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", ProxyAccept::V1),
        Parsed::Invalid(_)
    ));
    // Whole v1 lines that lack fields.
    for line in [&b"PROXY TCP4 1.2.3.4\r\n"[..], b"PROXY TCP4\r\n"] {
        assert!(
            matches!(parse(line, ProxyAccept::V1), Parsed::Invalid(_)),
            "{line:?}"
        );
    }
    // A v1 line that never ends.
    let long = format!("PROXY TCP4 {}", "1".repeat(200));
    assert!(matches!(
        parse(long.as_bytes(), ProxyAccept::V1),
        Parsed::Invalid(_)
    ));
    // A v2 header announcing more than MAX_HEADER bytes: refused from its first 16.
    let mut big = v2[..16].to_vec();
    big[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    assert!(matches!(parse(&big, ProxyAccept::V2), Parsed::Invalid(_)));
}

/// A million random and mutated headers: no panic, never a header longer than the input, and
/// a header read is read again the same from its own bytes (nothing past it counted).
#[test]
fn a_million_random_and_mutated_headers_never_panic_nor_read_past_the_header() {
    let mut rng = SmallRng::seed_from_u64(0x5eed_f00d);
    let seeds = [
        header(
            ProxyVersion::V1,
            Some((addr("192.0.2.7:51000"), addr("10.0.0.1:443"))),
        ),
        header(
            ProxyVersion::V1,
            Some((addr("[2001:db8::7]:1"), addr("[::1]:2"))),
        ),
        header(ProxyVersion::V1, None),
        header(
            ProxyVersion::V2,
            Some((addr("192.0.2.7:51000"), addr("10.0.0.1:443"))),
        ),
        header(
            ProxyVersion::V2,
            Some((addr("[2001:db8::7]:1"), addr("[::1]:2"))),
        ),
        header(ProxyVersion::V2, None),
    ];
    let accepts = [ProxyAccept::V1, ProxyAccept::V2, ProxyAccept::Any];
    let mut headers = 0_u32;
    for round in 0..1_000_000_u32 {
        let mut input: Vec<u8> = if round % 4 == 0 {
            // Random bytes, sometimes behind a real signature.
            let len = rng.random_range(0..300);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if rng.random_bool(0.5) {
                let seed = &seeds[rng.random_range(0..seeds.len())];
                let keep = rng.random_range(0..seed.len().min(16));
                bytes.splice(0..0, seed[..keep].iter().copied());
            }
            bytes
        } else {
            // A real header, mutated: bytes flipped, cut, repeated or extended.
            let mut bytes = seeds[rng.random_range(0..seeds.len())].clone();
            for _ in 0..rng.random_range(1..4) {
                match rng.random_range(0..4) {
                    0 => {
                        let at = rng.random_range(0..bytes.len());
                        bytes[at] = rng.random();
                    }
                    1 => bytes.truncate(rng.random_range(0..bytes.len().max(1))),
                    2 => {
                        let extra: Vec<u8> =
                            (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
                        bytes.extend_from_slice(&extra);
                    }
                    _ => {
                        if bytes.len() > 15 {
                            // The v2 length field.
                            bytes[14] = rng.random();
                            bytes[15] = rng.random();
                        }
                    }
                }
                if bytes.is_empty() {
                    break;
                }
            }
            bytes
        };
        input.truncate(MAX_HEADER);
        let accept = accepts[rng.random_range(0..accepts.len())];
        if let Parsed::Header { len, addresses } = parse(&input, accept) {
            headers += 1;
            assert!(len <= input.len(), "read past the input: {input:?}");
            assert_eq!(
                parse(&input[..len], accept),
                Parsed::Header { len, addresses },
                "the header alone reads differently: {input:?}"
            );
        }
    }
    // The mutations leave many headers whole: the check above ran on real headers.
    assert!(headers > 100_000, "only {headers} headers parsed");
}
