//! Moving bytes both ways between a client and its backend.
//!
//! Each direction moves what its source has to its destination whenever the source is
//! readable (or the destination writable again after back-pressure); at the source's end of
//! stream it shuts down the destination's write side (half-close) and is done. The two
//! directions are independent, so one side's end of stream never stops the other.
//!
//! Readiness is edge-triggered: the worker's loop reports each change once, and a direction
//! keeps what it knows in [`Ready`] until a system call says otherwise ("would block").
//!
//! Two ways to move the bytes:
//! - **copy** (portable; everything with `splice = false`): `recv` into a buffer, `send` from it.
//! - **splice** (Linux, on by default): `splice(2)` from the source socket into a pipe and from
//!   the pipe into the destination socket. The bytes never enter user space.
//!
//! With splice on, each direction starts on the copy path and switches to splice at its first
//! read that fills the whole buffer, so request/response traffic of small messages keeps the
//! cheaper path and bulk streams get zero copy.
//!
//! Either way an *idle* connection holds no buffer and no pipe. The copy path reads into the
//! worker's scratch buffer and writes straight on; only when the destination cannot take
//! everything at once does the remainder move into a buffer of the direction's own, freed as
//! soon as it is written. The splice path takes a pipe from a per-thread pool when the source
//! is readable and gives it back as soon as the pipe is empty again.

use std::io;

use mio::event::Event;
use mio::net::TcpStream;

/// Size of the worker's scratch buffer: one read, and so one write, moves at most this much.
///
/// Just under 64 KiB on purpose. With `TCP_NODELAY` every write is sent at once, and the
/// kernel builds at most one 64 KiB GSO packet per send, headers included (on loopback, one
/// segment of its 65,483-byte MSS). A 64 KiB write is a few hundred bytes too big for either:
/// each one left as a full packet plus a small one, and a bulk stream paid for twice the packets.
/// Smaller reads cost more system calls per byte (docs/benchmarks.md has the figures).
pub(crate) const SCRATCH: usize = 56 * 1024;

/// The way a chunk of bytes went from source to destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Path {
    /// Read into the scratch buffer and written out of it.
    Copied,
    /// Through a pipe by splice(2), never entering user space.
    Spliced,
}

/// How bytes are moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// `splice(2)` through a pipe (Linux only; elsewhere falls back to `Copy`).
    Splice,
    /// `read` and `write` through a buffer.
    Copy,
}

/// What is known of one socket's readiness since the last system call on it.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Ready {
    readable: bool,
    writable: bool,
    /// The peer's end of stream (or an error) has been reported. Kept once seen: the kernel
    /// reports it once, and a read may still have bytes to return before it.
    read_closed: bool,
    /// An error (a reset) has been reported and not yet looked at; see [`Ready::take_error`].
    error: bool,
    /// TCP urgent data has been reported and a read has not yet come up empty since. A read
    /// stops short at the urgent mark with bytes still queued behind it, and a splice stops
    /// there as if the stream had ended, so neither may be taken at its word while this is set.
    urgent: bool,
}

impl Ready {
    /// A socket just accepted can take bytes at once.
    pub(crate) fn writable() -> Ready {
        Ready {
            writable: true,
            ..Ready::default()
        }
    }

    /// Takes in what `event` reports.
    pub(crate) fn update(&mut self, event: &Event) {
        let error = event.is_error();
        if event.is_readable() || event.is_read_closed() || error {
            self.readable = true;
        }
        if event.is_read_closed() || error {
            self.read_closed = true;
        }
        if error {
            self.error = true;
        }
        if event.is_priority() {
            self.urgent = true;
        }
        if event.is_writable() || event.is_write_closed() || error {
            self.writable = true;
        }
    }

    /// Whether the socket reported it could be written to.
    pub(crate) fn is_writable(&self) -> bool {
        self.writable
    }

    /// Whether the peer's end of stream (or an error) has been reported.
    pub(crate) fn read_closed(&self) -> bool {
        self.read_closed
    }

    /// Whether an error was reported since the last call. A direction that reads or writes
    /// the socket meets the error in that call; this is for a socket neither direction is
    /// using (its peer's end of stream passed on, nothing to write to it).
    pub(crate) fn take_error(&mut self) -> bool {
        std::mem::take(&mut self.error)
    }
}

/// What a direction's [`Direction::pump`] ended with.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pumped {
    /// Nothing more to do until the next readiness change.
    Waiting,
    /// The source's end of stream: the direction is done.
    Eof,
    /// Stopped after its budget of reads with more possibly left: the other connections of
    /// the worker get their turn, and this one is pumped again in the next turn of the loop
    /// (no new readiness event will come for what is already there).
    Budget,
}

/// Reads (or splices) one direction makes per pump before it yields: 64 × 56 KiB is 3.5 MiB,
/// about a millisecond and a half of copying, so a bulk stream whose source never runs dry
/// cannot hold up its worker's other connections for longer than that.
///
/// Not smaller: a resumed connection makes the next `epoll_wait` return at once, and the
/// worker then reads what has arrived since instead of sleeping until more has: a small budget
/// costs CPU at the same throughput (docs/benchmarks.md).
#[cfg(not(test))]
pub(crate) const BUDGET: usize = 64;
/// In the crate's own tests, a budget any transfer of a few hundred KiB runs out of, so that
/// every test through a worker also takes the path that resumes a direction.
#[cfg(test)]
pub(crate) const BUDGET: usize = 2;

/// One direction of a connection.
#[derive(Debug, Default)]
pub(crate) struct Direction {
    /// The source's end of stream has been passed on.
    pub(crate) done: bool,
    /// Bytes read from the source so far.
    pub(crate) moved: u64,
    /// Bytes written to the destination so far: progress too (a slow reader draining what
    /// was read earlier keeps the connection from being idle).
    pub(crate) written: u64,
    /// Bytes read but not yet written; empty (and unallocated) except under back-pressure
    /// or while a [`Direction::preamble`] waits to go out.
    pending: Vec<u8>,
    /// Of `pending`, the first bytes that are the balancer's own (a PROXY header), not the
    /// source's: written first, never counted as relayed.
    own: u16,
    /// Moving by splice (a read filled the whole scratch buffer and splice is on).
    splicing: bool,
    /// The pipe holding bytes spliced in but not yet out, and how many.
    #[cfg(target_os = "linux")]
    pipe: Option<(super::splice::Pipe, usize)>,
}

impl Direction {
    /// Queues `bytes` of the balancer's own to go out before anything from the source (a
    /// PROXY header to the backend, at most 4 KiB); they are not counted as relayed.
    pub(crate) fn preamble(&mut self, bytes: Vec<u8>) {
        debug_assert!(self.pending.is_empty());
        self.own = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
        self.pending = bytes;
    }

    /// Moves what can be moved from `src` to `dst` without waiting, in at most `budget` reads
    /// ([`BUDGET`] but in tests); `delivered` is called with each chunk written to `dst`.
    ///
    /// Counters and the access log count what was written, not what was read: a connection
    /// that ends with bytes still in its buffer or pipe (a reset, a cut at shutdown) reports
    /// what reached the destination.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn pump(
        &mut self,
        budget: usize,
        src: &TcpStream,
        src_ready: &mut Ready,
        dst: &TcpStream,
        dst_ready: &mut Ready,
        mode: Mode,
        scratch: &mut [u8],
        delivered: &mut dyn FnMut(u64, Path),
    ) -> io::Result<Pumped> {
        let mut reads = 0;
        loop {
            if !self.pending.is_empty() {
                if !dst_ready.writable {
                    return Ok(Pumped::Waiting);
                }
                let sent = send_now(dst, dst_ready, &self.pending)?;
                let own = sent.min(usize::from(self.own));
                // `own` ≤ its old value, which fits.
                self.own -= u16::try_from(own).unwrap_or(self.own);
                let written = sent - own;
                self.written += written as u64;
                delivered(written as u64, Path::Copied);
                self.pending.drain(..sent);
                if !self.pending.is_empty() {
                    return Ok(Pumped::Waiting);
                }
                self.pending = Vec::new();
            }
            #[cfg(target_os = "linux")]
            if self.splicing {
                if let Some(pumped) = self.splice(
                    budget, &mut reads, src, src_ready, dst, dst_ready, delivered,
                )? {
                    return Ok(pumped);
                }
                // No pipe to be had, or a mark or an end to tell apart: this chunk is copied,
                // and the next full read splices again.
            }
            if self.done || !src_ready.readable {
                return Ok(Pumped::Waiting);
            }
            if reads == budget {
                return Ok(Pumped::Budget);
            }
            reads += 1;
            let n = match recv(src, scratch) {
                Ok(0) => {
                    self.done = true;
                    src_ready.readable = false;
                    return Ok(Pumped::Eof);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    src_ready.readable = false;
                    src_ready.urgent = false;
                    return Ok(Pumped::Waiting);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            // A read that returned less than it asked for has emptied the socket's receive
            // queue, so the next read would only fail with "would block": one wasted system
            // call per message, a third of a small message's cost. Bytes arriving after it
            // are a new edge. An end of stream already reported is not: it stays readable.
            // Nor is an urgent mark: the read stopped at it, and the next one steps over it
            // (the urgent byte itself is left out, as by any reader that does not ask for it).
            if n < scratch.len() && !src_ready.read_closed && !src_ready.urgent {
                src_ready.readable = false;
            }
            self.moved += n as u64;
            let written = send_now(dst, dst_ready, &scratch[..n])?;
            self.written += written as u64;
            delivered(written as u64, Path::Copied);
            if written < n {
                self.pending.extend_from_slice(&scratch[written..n]);
            }
            if mode == Mode::Splice && n == scratch.len() {
                self.splicing = true;
            }
        }
    }

    /// The splice path of [`Direction::pump`], sharing its count of `reads`.
    ///
    /// `None` when the pipe of the last chunk is empty and the next chunk is to be copied: the
    /// direction is back on the copy path until a read fills the scratch buffer again.
    /// - No pipe can be had (the process is out of descriptors, say): the copy path needs no
    ///   descriptor, so the connection goes on instead of ending.
    /// - The splice moved nothing, as at an end of stream, or there may be urgent data: a
    ///   splice stops at the urgent mark, moving nothing, while a `recv` steps over it. The
    ///   copy path's `recv` tells an end of stream from a mark, at one system call per
    ///   direction's end.
    #[allow(clippy::too_many_arguments)]
    #[cfg(target_os = "linux")]
    fn splice(
        &mut self,
        budget: usize,
        reads: &mut usize,
        src: &TcpStream,
        src_ready: &mut Ready,
        dst: &TcpStream,
        dst_ready: &mut Ready,
        delivered: &mut dyn FnMut(u64, Path),
    ) -> io::Result<Option<Pumped>> {
        use super::splice::{Pipe, Spliced};
        loop {
            if let Some((pipe, left)) = self.pipe.as_mut() {
                if !dst_ready.writable {
                    return Ok(Some(Pumped::Waiting));
                }
                match pipe.drain_into(dst, *left)? {
                    Spliced::WouldBlock => {
                        dst_ready.writable = false;
                        return Ok(Some(Pumped::Waiting));
                    }
                    Spliced::Moved(m) => {
                        *left -= m;
                        self.written += m as u64;
                        delivered(m as u64, Path::Spliced);
                    }
                }
                if *left > 0 {
                    continue;
                }
                if let Some((pipe, _)) = self.pipe.take() {
                    pipe.give_back();
                }
            }
            if self.done || !src_ready.readable {
                return Ok(Some(Pumped::Waiting));
            }
            if *reads == budget {
                return Ok(Some(Pumped::Budget));
            }
            let pipe = match Pipe::take() {
                Ok(pipe) => pipe,
                Err(e) => {
                    tracing::debug!(error = %e, "no pipe for splice; copying instead");
                    self.splicing = false;
                    return Ok(None);
                }
            };
            *reads += 1;
            // No "short read means drained" shortcut here: a splice may also stop early when
            // the pipe runs out of slots, with bytes still queued on the socket.
            match pipe.fill_from(src) {
                Ok(Spliced::Moved(n)) if n > 0 => {
                    self.moved += n as u64;
                    self.pipe = Some((pipe, n));
                }
                Ok(Spliced::WouldBlock) if !src_ready.urgent => {
                    pipe.give_back();
                    src_ready.readable = false;
                    return Ok(Some(Pumped::Waiting));
                }
                // Nothing moved: the end of the stream, or an urgent mark. `recv` tells.
                Ok(_) => {
                    pipe.give_back();
                    self.splicing = false;
                    return Ok(None);
                }
                Err(e) => {
                    pipe.give_back();
                    return Err(e);
                }
            }
        }
    }
}

/// Sends as much of `buf` as `dst` takes without waiting; returns how much that was.
fn send_now(dst: &TcpStream, ready: &mut Ready, buf: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < buf.len() {
        match send(dst, &buf[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                ready.writable = false;
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// `recv(2)`.
///
/// Through rustix, not the C library: glibc's `recv` and `send` are thread-cancellation points
/// that switch cancellation on and off around every call, and set the thread-local `errno`, a
/// visible share of a keep-alive load where each request is one `recv` and one `send` each
/// way. weighbridge never cancels threads.
fn recv(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    rustix::net::recv(src, buf, rustix::net::RecvFlags::empty())
        .map(|(n, _)| n)
        .map_err(io::Error::from)
}

/// `send(2)` with `MSG_NOSIGNAL`: a closed peer is an error, not a SIGPIPE.
fn send(dst: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    rustix::net::send(dst, buf, rustix::net::SendFlags::NOSIGNAL).map_err(io::Error::from)
}

/// Half-close: tells the peer no more bytes will come, while it may still send.
pub(crate) fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    match rustix::net::shutdown(stream, rustix::net::Shutdown::Write) {
        // The peer is gone already; there is no one left to tell.
        Err(rustix::io::Errno::NOTCONN) => Ok(()),
        other => other.map_err(io::Error::from),
    }
}

#[cfg(test)]
mod tests;
