//! The client's side: connecting through the balancer, echo round trips, bulk random data with
//! its SHA-256, and checking how a connection ends.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::SmallRng;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Size of the chunks bulk transfers write and read: larger than the balancer's read buffer, so
/// each write fills one of its reads.
pub const CHUNK: usize = 64 * 1024;
/// Upper bound on one socket operation of [`within`]; nothing here should take more than
/// milliseconds.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs one socket operation, failing with `TimedOut` after [`IO_TIMEOUT`].
pub async fn within<T>(operation: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(IO_TIMEOUT, operation)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no progress within 5 s"))?
}

/// Connects to `addr` and reads the one-byte id the backend greets with.
pub async fn open_identify(addr: SocketAddr) -> io::Result<(TcpStream, u8)> {
    let mut stream = within(TcpStream::connect(addr)).await?;
    let mut id = [0_u8; 1];
    within(stream.read_exact(&mut id)).await?;
    Ok((stream, id[0]))
}

/// Connects through the balancer and reads the one-byte id the backend greets with.
pub async fn connect_identify(addr: SocketAddr) -> (TcpStream, u8) {
    open_identify(addr)
        .await
        .expect("connect to the balancer and read the backend's id through it")
}

/// Sends `data` to an echo backend and checks that exactly `data` comes back; reads while
/// writing, so a message larger than the socket buffers cannot deadlock.
pub async fn echo(stream: &mut TcpStream, data: &[u8]) -> io::Result<()> {
    let (mut reader, mut writer) = stream.split();
    let mut back = vec![0_u8; data.len()];
    within(async { tokio::try_join!(writer.write_all(data), reader.read_exact(&mut back)) })
        .await?;
    if back != data {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "echo differs"));
    }
    Ok(())
}

/// Closes the write side and checks that the connection then ends cleanly with nothing unread.
pub async fn close(mut stream: TcpStream) -> io::Result<()> {
    within(stream.shutdown()).await?;
    let mut rest = Vec::new();
    within(stream.read_to_end(&mut rest)).await?;
    if !rest.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} unexpected bytes before end of stream", rest.len()),
        ));
    }
    Ok(())
}

/// Asserts that `stream` is closed by the peer within `within` without sending any byte: a read
/// returns end of stream or an error (a reset counts). Returns how long it took.
pub async fn assert_closed_without_data(stream: &mut TcpStream, within: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0_u8; 64];
    match tokio::time::timeout(within, stream.read(&mut buf)).await {
        Err(_) => panic!("connection still open after {within:?}"),
        Ok(Ok(0)) | Ok(Err(_)) => started.elapsed(),
        Ok(Ok(n)) => panic!(
            "expected the connection closed, got {n} bytes: {:?}",
            &buf[..n]
        ),
    }
}

/// One side's view of a bulk transfer: what it sent and what it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    /// SHA-256 of the bytes sent.
    pub sent: [u8; 32],
    /// SHA-256 of the bytes received.
    pub received: [u8; 32],
    /// How many bytes were received.
    pub received_len: u64,
}

/// Writes `len` pseudo-random bytes (seeded by `seed`) to `writer` in [`CHUNK`]s and returns
/// their SHA-256.
async fn write_random(
    writer: &mut (impl AsyncWrite + Unpin),
    seed: u64,
    len: u64,
) -> io::Result<[u8; 32]> {
    use rand::Rng;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut hasher = Sha256::new();
    let mut buf = vec![0_u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(CHUNK as u64)).expect("chunk fits in usize");
        rng.fill_bytes(&mut buf[..n]);
        hasher.update(&buf[..n]);
        writer.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    Ok(hasher.finalize().into())
}

/// Reads from `reader` until end of stream, or until `limit` bytes when given; returns the
/// SHA-256 and length of what it read.
async fn read_hashed(
    reader: &mut (impl AsyncRead + Unpin),
    limit: Option<u64>,
) -> io::Result<([u8; 32], u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0_u8; CHUNK];
    let mut total = 0_u64;
    loop {
        let want = limit.map_or(CHUNK as u64, |limit| (limit - total).min(CHUNK as u64));
        if want == 0 {
            return Ok((hasher.finalize().into(), total));
        }
        let want = usize::try_from(want).expect("chunk fits in usize");
        let n = reader.read(&mut buf[..want]).await?;
        if n == 0 {
            if limit.is_some() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            return Ok((hasher.finalize().into(), total));
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}

/// Writes `len` pseudo-random bytes (seeded by `seed`) to `writer`, shuts its write side down
/// and returns their SHA-256.
pub async fn send_random(
    mut writer: impl AsyncWrite + Unpin,
    seed: u64,
    len: u64,
) -> io::Result<[u8; 32]> {
    let sent = write_random(&mut writer, seed, len).await?;
    writer.shutdown().await?;
    Ok(sent)
}

/// Reads `reader` to end of stream; returns the SHA-256 and length of what it read.
pub async fn receive_all(mut reader: impl AsyncRead + Unpin) -> io::Result<([u8; 32], u64)> {
    read_hashed(&mut reader, None).await
}

/// Sends `len` random bytes seeded by `seed` on `stream` while receiving everything the peer
/// sends, both at once; returns when both directions are done.
pub async fn exchange(stream: TcpStream, seed: u64, len: u64) -> io::Result<Transfer> {
    let (reader, writer) = stream.into_split();
    let (sent, received) = tokio::try_join!(send_random(writer, seed, len), receive_all(reader))?;
    Ok(Transfer {
        sent,
        received: received.0,
        received_len: received.1,
    })
}

/// Sends `len` random bytes seeded by `seed` to an echo backend while reading them back, and
/// checks that exactly those bytes came back. The connection stays open both ways.
pub async fn echo_random(stream: &mut TcpStream, seed: u64, len: u64) -> io::Result<()> {
    let (mut reader, mut writer) = stream.split();
    let (sent, (received, _)) = tokio::try_join!(
        write_random(&mut writer, seed, len),
        read_hashed(&mut reader, Some(len))
    )?;
    if sent != received {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the echo of {len} random bytes differs from what was sent"),
        ));
    }
    Ok(())
}
