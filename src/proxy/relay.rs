//! Moving bytes both ways between a client and its backend.
//!
//! Each direction is a small loop driven by socket readiness: wait until the source is
//! readable, move what it has to the destination, repeat; at the source's end of stream, shut
//! down the destination's write side (half-close) and stop. The two directions run side by side
//! in the connection's task, so one side's end of stream never stops the other.
//!
//! Two ways to move the bytes:
//! - **splice** (Linux): `splice(2)` from the source socket into a pipe and from the pipe into
//!   the destination socket. The bytes never enter user space.
//! - **copy** (portable, the default): `read` into a buffer, `write` from it.
//!
//! With splice on, each direction starts on the copy path and switches to splice at its first
//! read that fills the whole buffer, so request/response traffic of small messages keeps the
//! cheaper path and bulk streams get zero copy.
//!
//! Either way an *idle* connection holds no buffer and no pipe. The copy path reads into a
//! per-thread scratch buffer and writes straight on; only when the destination cannot take
//! everything at once does the remainder move into a buffer of the connection's own, freed as
//! soon as it is written. The splice path takes a pipe from a per-thread pool when the source
//! is readable and gives it back as soon as the pipe is empty again. What a connection costs
//! while it waits is its two sockets and the task's state, nothing per byte.

use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::End;
use crate::stop::Signal;

/// Per-thread scratch buffer of the copy path: one read, and so one write, moves at most this
/// much.
///
/// Just under 64 KiB on purpose. With `TCP_NODELAY` every write is sent at once, and the
/// kernel builds at most one 64 KiB GSO packet per send, headers included (on loopback, one
/// segment of its 65,483-byte MSS). A 64 KiB write is a few hundred bytes too big for either:
/// each one left as a full packet plus a small one, and a bulk stream paid for twice the packets.
/// Measured on one machine, 2 workers, one iperf3 stream: over loopback 64 KiB moved 12.5–13.5
/// Gbit/s, 48 and 56 KiB 16–20; over a veth pair (MTU 1500) 64 KiB cost 0.55–0.61 s of CPU per
/// GB, 48 and 56 KiB 0.34–0.46, and 32 KiB 0.50–0.55 (more system calls per byte).
const SCRATCH: usize = 56 * 1024;

thread_local! {
    static SCRATCH_BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// How bytes are moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// `splice(2)` through a pipe (Linux only; elsewhere falls back to `Copy`).
    Splice,
    /// `read` and `write` through a buffer.
    Copy,
}

/// How a relay ended and what it moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Relayed {
    /// Which side ended it, or why it was ended.
    pub(crate) end: End,
    /// The read or write error that ended it, for [`End::Error`].
    pub(crate) error: Option<String>,
    /// Bytes moved client → backend.
    pub(crate) up: u64,
    /// Bytes moved backend → client.
    pub(crate) down: u64,
}

/// Relays until both directions are done, nothing moves for `idle`, or `stop` fires.
///
/// `to_backend` and `to_client` are called with every chunk moved, so long streams are counted
/// as they go, not only when they end.
pub(crate) async fn relay(
    client: &TcpStream,
    backend: &TcpStream,
    mode: Mode,
    idle: Duration,
    stop: &Signal,
    to_backend: impl Fn(u64),
    to_client: impl Fn(u64),
) -> Relayed {
    let activity = Activity::new();
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    // Which side's end of stream came first: 0 none yet, 1 client, 2 backend.
    let first_eof = AtomicU8::new(0);
    let count_up = |n| {
        up.fetch_add(n, Ordering::Relaxed);
        to_backend(n);
    };
    let count_down = |n| {
        down.fetch_add(n, Ordering::Relaxed);
        to_client(n);
    };
    let both = async {
        tokio::try_join!(
            async {
                one_way(client, backend, mode, &activity, count_up).await?;
                end_of_stream(&first_eof, 1, backend)
            },
            async {
                one_way(backend, client, mode, &activity, count_down).await?;
                end_of_stream(&first_eof, 2, client)
            },
        )
    };
    let mut error = None;
    let end = tokio::select! {
        result = both => match result {
            Ok(_) if first_eof.load(Ordering::Relaxed) == 2 => End::BackendClosed,
            Ok(_) => End::ClientClosed,
            Err(e) => {
                tracing::debug!(error = %e, "relay ended with an error");
                error = Some(e.to_string());
                End::Error
            }
        },
        () = activity.idle_for(idle) => End::IdleTimeout,
        () = stop.stopped() => End::ShutDown,
    };
    Relayed {
        end,
        error,
        up: up.load(Ordering::Relaxed),
        down: down.load(Ordering::Relaxed),
    }
}

/// Passes one direction's end of stream on to `dst`, the socket that direction wrote to, and
/// records `side` as the first to finish unless the other already is.
///
/// The first direction to end half-closes `dst` (shutdown of its write side) so the peer sees
/// the end of stream while the other direction goes on. When the other direction has already
/// ended, both sockets are closed as soon as this returns and the close sends the same FIN: the
/// shutdown is skipped, one system call fewer per connection (HAProxy skips it too). Nothing
/// is left unread at that point, so the close is a FIN, not a reset.
fn end_of_stream(first: &AtomicU8, side: u8, dst: &TcpStream) -> io::Result<()> {
    // Both directions run in one task, never at the same instant: a plain check is enough.
    if first.load(Ordering::Relaxed) != 0 {
        return Ok(());
    }
    first.store(side, Ordering::Relaxed);
    shutdown_write(dst)
}

/// Moves `src`'s bytes to `dst` until `src`'s end of stream.
async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    mode: Mode,
    activity: &Activity,
    count: impl Fn(u64),
) -> io::Result<()> {
    match mode {
        #[cfg(target_os = "linux")]
        Mode::Splice => {
            // Small messages (requests, tokens) cost the same two system calls either way, and
            // splice's pipe handling makes them slower; so a direction starts on the copy path
            // and moves to splice once one read fills the whole buffer: a bulk stream.
            if copy(src, dst, activity, &count, true).await? == Copied::Bulk {
                super::splice::one_way(src, dst, activity, count).await?;
            }
        }
        _ => {
            copy(src, dst, activity, &count, false).await?;
        }
    }
    Ok(())
}

/// Why [`copy`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copied {
    /// The source's end of stream.
    Eof,
    /// A read filled the whole buffer (only when asked to stop there).
    Bulk,
}

/// The portable path (see the module docs). With `stop_at_bulk`, returns once a read has filled
/// the whole scratch buffer and everything read has been written.
async fn copy(
    src: &TcpStream,
    dst: &TcpStream,
    activity: &Activity,
    count: impl Fn(u64),
    stop_at_bulk: bool,
) -> io::Result<Copied> {
    // Bytes read but not yet written; empty (and unallocated) except under back-pressure.
    let mut pending: Vec<u8> = Vec::new();
    loop {
        if !pending.is_empty() {
            write_all(dst, &pending, activity).await?;
            pending = Vec::new();
        }
        src.readable().await?;
        let read = SCRATCH_BUFFER.with_borrow_mut(|buf| -> io::Result<Option<usize>> {
            let n = match try_recv(src, buf) {
                Ok(0) => return Ok(Some(0)),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            };
            if n < buf.len() {
                assume_drained(src);
            }
            let written = write_now(dst, &buf[..n])?;
            pending.extend_from_slice(&buf[written..n]);
            Ok(Some(n))
        })?;
        match read {
            None => continue,
            Some(0) => return Ok(Copied::Eof),
            Some(n) => {
                count(n as u64);
                activity.touch();
                if stop_at_bulk && n == SCRATCH {
                    write_all(dst, &pending, activity).await?;
                    return Ok(Copied::Bulk);
                }
            }
        }
    }
}

/// Marks `src` as having nothing more to read, without asking the kernel.
///
/// A read that returned less than it asked for has emptied the socket's receive queue, so the
/// next read would only fail with "would block": one wasted system call per message, a third of
/// a small message's cost. Readiness is edge-triggered, so bytes arriving after that read mark
/// the socket readable again. (tokio's own `AsyncRead` for sockets does the same.)
fn assume_drained(src: &TcpStream) {
    let cleared = src.try_io(tokio::io::Interest::READABLE, || {
        Err::<(), _>(io::ErrorKind::WouldBlock.into())
    });
    debug_assert!(cleared.is_err());
}

/// Writes as much of `buf` as `dst` takes without waiting; returns how much that was.
fn write_now(dst: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < buf.len() {
        match try_send(dst, &buf[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// `recv(2)` on a socket tokio has said is readable, clearing that readiness on "would block"
/// (what `TcpStream::try_read` does).
///
/// The system call itself goes through rustix, not the C library: glibc's `recv` and `send` are
/// thread-cancellation points that switch cancellation on and off around every call, and set
/// the thread-local `errno`, about 2 % of the samples of a keep-alive load where each request is
/// one `recv` and one `send` each way. weighbridge never cancels threads.
fn try_recv(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    src.try_io(tokio::io::Interest::READABLE, || {
        rustix::net::recv(src, buf, rustix::net::RecvFlags::empty())
            .map(|(n, _)| n)
            .map_err(io::Error::from)
    })
}

/// `send(2)` with `MSG_NOSIGNAL` (a closed peer is an error, not a SIGPIPE), as
/// `TcpStream::try_write` does; see [`try_recv`].
fn try_send(dst: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    dst.try_io(tokio::io::Interest::WRITABLE, || {
        rustix::net::send(dst, buf, rustix::net::SendFlags::NOSIGNAL).map_err(io::Error::from)
    })
}

/// Writes all of `buf`, waiting for `dst` to become writable as often as needed.
async fn write_all(dst: &TcpStream, mut buf: &[u8], activity: &Activity) -> io::Result<()> {
    while !buf.is_empty() {
        dst.writable().await?;
        let n = write_now(dst, buf)?;
        if n > 0 {
            activity.touch();
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// Half-close: tells the peer no more bytes will come, while it may still send.
fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    match rustix::net::shutdown(stream, rustix::net::Shutdown::Write) {
        // The peer is gone already; there is no one left to tell.
        Err(rustix::io::Errno::NOTCONN) => Ok(()),
        other => other.map_err(io::Error::from),
    }
}

/// The time of the last byte moved in either direction of one connection.
#[derive(Debug)]
pub(crate) struct Activity {
    start: Instant,
    /// Milliseconds after `start`. Atomic only so the two directions can share it by reference;
    /// both run in the same task, so it is never contended.
    last_ms: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    pub(crate) fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Completes once nothing has moved for `idle`.
    pub(crate) async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A connected pair over loopback: (our side, the peer's side).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (ours, peer) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (ours.expect("connect"), peer.expect("accept").0)
    }

    #[tokio::test]
    async fn only_the_first_end_of_stream_half_closes_and_it_is_remembered() {
        let (first_dst, mut first_peer) = pair().await;
        let (second_dst, mut second_peer) = pair().await;
        let first = AtomicU8::new(0);
        end_of_stream(&first, 2, &first_dst).expect("half-close");
        end_of_stream(&first, 1, &second_dst).expect("nothing to do");
        assert_eq!(first.load(Ordering::Relaxed), 2);
        let mut byte = [0_u8; 1];
        assert_eq!(first_peer.read(&mut byte).await.expect("end of stream"), 0);
        // The second was left open for the close that follows...
        assert_eq!(
            second_peer.try_read(&mut byte).map_err(|e| e.kind()),
            Err(io::ErrorKind::WouldBlock)
        );
        // ... which ends its stream cleanly.
        drop(second_dst);
        assert_eq!(
            second_peer
                .read(&mut byte)
                .await
                .expect("a FIN, not a reset"),
            0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timer_restarts_on_activity() {
        let activity = Activity::new();
        let idle = Duration::from_secs(10);
        tokio::time::advance(Duration::from_secs(6)).await;
        activity.touch();
        let started = Instant::now();
        activity.idle_for(idle).await;
        // Fired 10 s after the touch, not 10 s after creation.
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }
}
