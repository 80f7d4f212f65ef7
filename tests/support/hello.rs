//! TLS ClientHellos built by hand, for the tests of routing by server name: sizes and record
//! splits a TLS library does not produce on demand. Only what a balancer reads is real (record
//! and handshake framing, the server_name extension); the rest could not complete a handshake.

/// A ClientHello handshake message asking for `name`, padded to about `size` bytes with a
/// padding extension (a post-quantum key share makes real ones this large).
pub fn client_hello(name: &str, size: usize) -> Vec<u8> {
    let name = name.as_bytes();
    let mut ext = vec![0, 0];
    ext.extend_from_slice(&((name.len() + 5) as u16).to_be_bytes());
    ext.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    ext.push(0);
    ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
    ext.extend_from_slice(name);
    let padding = size.saturating_sub(100);
    if padding > 0 {
        ext.extend_from_slice(&[0, 21]);
        ext.extend_from_slice(&(padding as u16).to_be_bytes());
        ext.extend(std::iter::repeat_n(0, padding));
    }
    let mut body = vec![3, 3];
    body.extend_from_slice(&[9; 32]);
    body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut message = vec![1];
    message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    message.extend_from_slice(&body);
    message
}

/// `message` as TLS handshake records of at most `split` bytes each.
pub fn records(message: &[u8], split: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in message.chunks(split.max(1)) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}
