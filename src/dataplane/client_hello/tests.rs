use rand::rngs::SmallRng;
use rand::{Rng, RngExt, SeedableRng};

use super::*;

/// A ClientHello handshake message asking for `name` (none without), padded with an extension
/// of `padding` bytes (a large key share stands in for a post-quantum one).
fn hello_message(name: Option<&str>, padding: usize) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&[3, 3]); // legacy_version TLS 1.2
    body.extend_from_slice(&[7; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&[0, 4, 0x13, 0x01, 0x13, 0x02]); // two cipher suites
    body.extend_from_slice(&[1, 0]); // null compression
    let mut extensions = Vec::new();
    if let Some(name) = name {
        let name = name.as_bytes();
        let list_len = name.len() + 3;
        extensions.extend_from_slice(&[0, 0]); // server_name
        extensions.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
        extensions.extend_from_slice(&(list_len as u16).to_be_bytes());
        extensions.push(0); // host_name
        extensions.extend_from_slice(&(name.len() as u16).to_be_bytes());
        extensions.extend_from_slice(name);
    }
    if padding > 0 {
        extensions.extend_from_slice(&[0, 21]); // padding
        extensions.extend_from_slice(&(padding as u16).to_be_bytes());
        extensions.extend(std::iter::repeat_n(0, padding));
    }
    body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    body.extend_from_slice(&extensions);
    let mut message = vec![CLIENT_HELLO];
    message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    message.extend_from_slice(&body);
    message
}

/// `message` in TLS records of at most `split` bytes each.
fn records(message: &[u8], split: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in message.chunks(split.clamp(1, MAX_RECORD)) {
        out.extend_from_slice(&[HANDSHAKE, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

#[test]
fn a_hello_in_one_record_gives_its_name() {
    let bytes = records(&hello_message(Some("LLama.Example.com."), 0), MAX_RECORD);
    assert_eq!(parse(&bytes), Hello::Read(Some("llama.example.com".into())));
    // Bytes after the hello (the client's next records) change nothing.
    let mut more = bytes.clone();
    more.extend_from_slice(&[23, 3, 3, 0, 5, 1, 2, 3, 4, 5]);
    assert_eq!(parse(&more), Hello::Read(Some("llama.example.com".into())));
    let none = records(&hello_message(None, 0), MAX_RECORD);
    assert_eq!(parse(&none), Hello::Read(None));
}

#[test]
fn with_encrypted_client_hello_the_outer_name_routes() {
    // The outer ClientHello carries the public name in server_name and the real one encrypted
    // in an encrypted_client_hello extension (0xfe0d), which is left alone.
    let mut message = hello_message(Some("public.example.com"), 0);
    let ech = [0xfe, 0x0d, 0, 8, 0, 0, 1, 0, 1, 0xab, 0xcd, 0xef];
    let ext_len_at = 4 + 2 + 32 + 1 + 6 + 2;
    let ext_len = u16::from_be_bytes([message[ext_len_at], message[ext_len_at + 1]]);
    message[ext_len_at..ext_len_at + 2]
        .copy_from_slice(&(ext_len + ech.len() as u16).to_be_bytes());
    message.extend_from_slice(&ech);
    let body_len = (message.len() - 4) as u32;
    message[1..4].copy_from_slice(&body_len.to_be_bytes()[1..]);
    assert_eq!(
        parse(&records(&message, MAX_RECORD)),
        Hello::Read(Some("public.example.com".into()))
    );
}

#[test]
fn a_large_hello_split_over_records_and_segments_is_read_whole() {
    for padding in [2_000, 3_500, 12_000] {
        let message = hello_message(Some("embed.example.com"), padding);
        for split in [200, 1_000, 1_400, MAX_RECORD] {
            let bytes = records(&message, split);
            // Every prefix is incomplete; the whole is read.
            for cut in [0, 1, 4, 5, 6, split / 2, bytes.len() - 1] {
                assert_eq!(parse(&bytes[..cut.min(bytes.len() - 1)]), Hello::Incomplete);
            }
            assert_eq!(
                parse(&bytes),
                Hello::Read(Some("embed.example.com".into())),
                "padding {padding}, records of {split}"
            );
        }
    }
}

#[test]
fn too_large_or_malformed_hellos_are_refused() {
    let big = hello_message(Some("a.example.com"), MAX_HELLO);
    assert!(matches!(
        parse(&records(&big, MAX_RECORD)),
        Hello::Invalid(_)
    ));
    // Many tiny records fill the peek window before the hello is whole.
    let split = records(&hello_message(Some("a.example.com"), 12_000), 10);
    assert!(split.len() > MAX_PEEK);
    assert!(matches!(parse(&split), Hello::Invalid(_)));
    assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
    assert_eq!(parse(b""), Hello::Incomplete);
    // A handshake record that is no ClientHello; a record that is no handshake.
    assert!(matches!(
        parse(&[22, 3, 1, 0, 4, 2, 0, 0, 0]),
        Hello::Invalid(_)
    ));
    let mut alert_first = records(&hello_message(None, 0), 10);
    alert_first[5 + 10] = 21;
    assert!(matches!(parse(&alert_first), Hello::Invalid(_)));
    assert!(matches!(parse(&[22, 9, 1, 0, 4]), Hello::Invalid(_)));
    assert!(matches!(parse(&[22, 3, 1, 0, 0]), Hello::Invalid(_)));
    let bad_name = records(&hello_message(Some("bad name"), 0), MAX_RECORD);
    assert!(matches!(parse(&bad_name), Hello::Invalid(_)));
}

/// The parser's property test: a million hellos, well formed or mutated (bytes flipped,
/// inserted, removed, truncated), in random record splits. None makes it panic; a well formed
/// one gives back the name it was written with, whatever the split; any prefix of one is
/// incomplete.
#[test]
fn a_million_random_and_mutated_hellos() {
    let mut rng = SmallRng::seed_from_u64(0x5eed_c11e);
    let names = [
        "llama.example.com",
        "a.b",
        "x",
        "embed.example.com",
        "xn--bcher-kva.example",
    ];
    let mut read_back = 0;
    for round in 0..1_000_000_u32 {
        let name = names[rng.random_range(0..names.len())];
        let with_name = rng.random_bool(0.9);
        let padding = if rng.random_bool(0.05) {
            rng.random_range(0..5_000)
        } else {
            rng.random_range(0..200)
        };
        let message = hello_message(with_name.then_some(name), padding);
        let mut bytes = records(&message, rng.random_range(1..2_000));
        match round % 4 {
            // Split so finely that it does not fit the peek window: refused whole.
            0 if bytes.len() > MAX_PEEK => {
                assert!(matches!(parse(&bytes), Hello::Invalid(_)), "round {round}");
                read_back += 1;
            }
            0 => {
                assert_eq!(
                    parse(&bytes),
                    Hello::Read(with_name.then(|| name.to_owned())),
                    "round {round}"
                );
                read_back += 1;
                let cut = rng.random_range(0..bytes.len());
                assert_eq!(parse(&bytes[..cut]), Hello::Incomplete, "round {round}");
            }
            1 => {
                for _ in 0..rng.random_range(1..8) {
                    let at = rng.random_range(0..bytes.len());
                    bytes[at] = rng.random();
                }
                let _ = parse(&bytes);
            }
            2 => {
                let at = rng.random_range(0..bytes.len());
                if rng.random_bool(0.5) {
                    bytes.insert(at, rng.random());
                } else {
                    bytes.remove(at);
                }
                let _ = parse(&bytes);
            }
            _ => {
                let len = rng.random_range(0..64);
                let mut noise = vec![0_u8; len];
                rng.fill_bytes(&mut noise);
                if let Some(first) = noise.first_mut() {
                    *first = HANDSHAKE;
                }
                let _ = parse(&noise);
            }
        }
    }
    assert_eq!(read_back, 250_000);
}
