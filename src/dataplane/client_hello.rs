//! Reading the server name of a TLS ClientHello from the bytes a client has sent so far,
//! without consuming them: the backend receives them untouched, from the first.
//!
//! A ClientHello may come in several TLS records (a large one, with post-quantum key shares,
//! does) and each record in several TCP segments: the records are reassembled here, then the
//! handshake message is handed whole to `tls-parser`. Only a ClientHello counts; any other
//! first record from a client that began as TLS is malformed. With Encrypted Client Hello the
//! name read is the outer, public one, which is what routing may see.

use tls_parser::{
    SNIType, TlsExtension, TlsMessage, TlsMessageHandshake, parse_tls_client_hello_extensions,
    parse_tls_message_handshake,
};

/// The largest ClientHello handshake message taken (HAProxy and nginx cap theirs at one record's
/// 16 KiB too); a larger one is refused.
pub(crate) const MAX_HELLO: usize = 16 * 1024;
/// Bytes peeked at most: the largest ClientHello and the headers of the records it is split
/// into, at up to 64 records (a client that splits further is refused too).
pub(crate) const MAX_PEEK: usize = MAX_HELLO + 4 + 64 * RECORD_HEADER;

/// A TLS record's header: type, version, length.
const RECORD_HEADER: usize = 5;
/// The record type of a handshake message.
const HANDSHAKE: u8 = 22;
/// The handshake type of a ClientHello.
const CLIENT_HELLO: u8 = 1;
/// The longest record payload TLS allows (RFC 8446, 5.1).
const MAX_RECORD: usize = 1 << 14;

/// What the bytes so far say.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Hello {
    /// A TLS record has begun and the ClientHello is not whole yet.
    Incomplete,
    /// The client does not speak TLS first (its first byte opens no handshake record).
    NotTls,
    /// A whole ClientHello, with the host name it asks for, lower case and without a trailing
    /// dot (`None` without one).
    Read(Option<String>),
    /// Malformed, or larger than [`MAX_HELLO`].
    Invalid(&'static str),
}

/// Reads `buf`, the first bytes a client sent (at most [`MAX_PEEK`] are looked at).
pub(crate) fn parse(buf: &[u8]) -> Hello {
    let Some(&first) = buf.first() else {
        return Hello::Incomplete;
    };
    if first != HANDSHAKE {
        return Hello::NotTls;
    }
    let buf = &buf[..buf.len().min(MAX_PEEK)];
    // The handshake message, borrowed while it lies in one record, else copied together.
    let mut joined: Vec<u8> = Vec::new();
    let mut single: Option<&[u8]> = None;
    let mut at = 0;
    loop {
        let Some(header) = buf.get(at..at + RECORD_HEADER) else {
            return incomplete_or_too_long(buf);
        };
        if header[0] != HANDSHAKE {
            return Hello::Invalid("a record other than a handshake before the ClientHello");
        }
        if header[1] != 3 {
            return Hello::Invalid("not a TLS record version");
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD {
            return Hello::Invalid("a record of a length TLS does not allow");
        }
        let Some(payload) = buf.get(at + RECORD_HEADER..at + RECORD_HEADER + len) else {
            return incomplete_or_too_long(buf);
        };
        at += RECORD_HEADER + len;
        let message: &[u8] = match single {
            None if joined.is_empty() => {
                single = Some(payload);
                payload
            }
            _ => {
                if let Some(first) = single.take() {
                    joined.extend_from_slice(first);
                }
                joined.extend_from_slice(payload);
                &joined
            }
        };
        match whole_message(message) {
            Ok(Some(len)) => return read(&message[..len]),
            Ok(None) => {}
            Err(why) => return Hello::Invalid(why),
        }
    }
}

/// More bytes are needed: unless the peek window is full, when the hello is too large (or in
/// too many records) to be taken.
fn incomplete_or_too_long(buf: &[u8]) -> Hello {
    if buf.len() >= MAX_PEEK {
        Hello::Invalid("a ClientHello larger than 16 KiB or in too many records")
    } else {
        Hello::Incomplete
    }
}

/// The length of the handshake message at the start of `message` if it is all there, `None`
/// if more is to come.
fn whole_message(message: &[u8]) -> Result<Option<usize>, &'static str> {
    let Some(&kind) = message.first() else {
        return Ok(None);
    };
    if kind != CLIENT_HELLO {
        return Err("a handshake message other than a ClientHello");
    }
    let Some(len) = message.get(1..4) else {
        return Ok(None);
    };
    let len = usize::from(len[0]) << 16 | usize::from(len[1]) << 8 | usize::from(len[2]);
    if len > MAX_HELLO {
        return Err("a ClientHello larger than 16 KiB");
    }
    Ok((message.len() >= 4 + len).then_some(4 + len))
}

/// The server name of the whole ClientHello handshake message `message`.
fn read(message: &[u8]) -> Hello {
    let hello = match parse_tls_message_handshake(message) {
        Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) => hello,
        _ => return Hello::Invalid("a malformed ClientHello"),
    };
    let Some(extensions) = hello.ext else {
        return Hello::Read(None);
    };
    let Ok((_, extensions)) = parse_tls_client_hello_extensions(extensions) else {
        return Hello::Invalid("malformed ClientHello extensions");
    };
    for extension in extensions {
        if let TlsExtension::SNI(names) = extension {
            let Some((_, name)) = names.iter().find(|(kind, _)| *kind == SNIType::HostName) else {
                return Hello::Read(None);
            };
            return match host_name(name) {
                Some(name) => Hello::Read(Some(name)),
                None => Hello::Invalid("a server name that is not a host name"),
            };
        }
    }
    Hello::Read(None)
}

/// `name` as a host name: ASCII letters, digits, `-`, `_` and dots, lower-cased, without a
/// trailing dot.
fn host_name(name: &[u8]) -> Option<String> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty()
        || name.len() > 253
        || !name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return None;
    }
    Some(
        name.iter()
            .map(|b| char::from(b.to_ascii_lowercase()))
            .collect(),
    )
}

#[cfg(test)]
mod tests;
