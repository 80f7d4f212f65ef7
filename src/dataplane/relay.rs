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
/// Measured on one machine, 2 workers, one iperf3 stream: over loopback 64 KiB moved 12.5–13.5
/// Gbit/s, 48 and 56 KiB 16–20; over a veth pair (MTU 1500) 64 KiB cost 0.55–0.61 s of CPU per
/// GB, 48 and 56 KiB 0.34–0.46, and 32 KiB 0.50–0.55 (more system calls per byte).
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
/// worker then reads what has arrived since instead of sleeping until more has. Measured with
/// 8 iperf3 streams over two workers: a budget of 16 reads cost the balancer 1.4–1.6x the CPU
/// of no budget at the same throughput; 64 cost the same as none (3 alternating pairs each, and
/// 4 pairs on one stream).
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
    /// Bytes read but not yet written; empty (and unallocated) except under back-pressure.
    pending: Vec<u8>,
    /// Moving by splice (a read filled the whole scratch buffer and splice is on).
    splicing: bool,
    /// The pipe holding bytes spliced in but not yet out, and how many.
    #[cfg(target_os = "linux")]
    pipe: Option<(super::splice::Pipe, usize)>,
}

impl Direction {
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
                let written = send_now(dst, dst_ready, &self.pending)?;
                self.written += written as u64;
                delivered(written as u64, Path::Copied);
                self.pending.drain(..written);
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
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A connected pair over loopback: (ours, non-blocking, as the worker has it; the peer's).
    fn pair() -> (TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let peer =
            std::net::TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let (ours, _) = listener.accept().expect("accept");
        ours.set_nonblocking(true).expect("non-blocking");
        (TcpStream::from_std(ours), peer)
    }

    /// Calls `done` until it holds, for a few seconds at most: the bytes a peer writes on
    /// loopback arrive at once, but not necessarily before the next line runs.
    fn until(mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "condition not met in time"
            );
            std::thread::yield_now();
        }
    }

    /// One direction between two socket pairs: `src_peer` writes into it, `dst_peer` reads
    /// what it moved.
    struct Rig {
        src: TcpStream,
        src_peer: std::net::TcpStream,
        src_ready: Ready,
        dst: TcpStream,
        dst_peer: std::net::TcpStream,
        dst_ready: Ready,
        direction: Direction,
        mode: Mode,
        scratch: Vec<u8>,
        counted: u64,
    }

    impl Rig {
        fn new() -> Rig {
            let (src, src_peer) = pair();
            let (dst, dst_peer) = pair();
            Rig {
                src,
                src_peer,
                src_ready: Ready::default(),
                dst,
                dst_peer,
                dst_ready: Ready::writable(),
                direction: Direction::default(),
                mode: Mode::Copy,
                scratch: vec![0; SCRATCH],
                counted: 0,
            }
        }

        /// One pump in the rig's mode with a budget of `budget` reads.
        fn pump(&mut self, budget: usize) -> Pumped {
            let counted = &mut self.counted;
            self.direction
                .pump(
                    budget,
                    &self.src,
                    &mut self.src_ready,
                    &self.dst,
                    &mut self.dst_ready,
                    self.mode,
                    &mut self.scratch,
                    &mut |n, _| *counted += n,
                )
                .expect("pump")
        }
    }

    #[test]
    fn an_end_of_stream_behind_the_last_bytes_is_not_lost() {
        let mut rig = Rig::new();
        rig.src_peer.write_all(b"last words").expect("write");
        rig.src_peer
            .shutdown(std::net::Shutdown::Write)
            .expect("FIN");
        // What the event of bytes-and-FIN reports; the kernel says nothing more after it.
        rig.src_ready.readable = true;
        rig.src_ready.read_closed = true;
        let mut ended = false;
        until(|| {
            // The bytes come in a short read, and the end of stream right after them.
            ended = rig.pump(BUDGET) == Pumped::Eof;
            ended || !rig.src_ready.readable
        });
        assert!(ended, "the end of stream was read in the same pass");
        assert_eq!((rig.direction.moved, rig.counted), (10, 10));
        let mut got = [0_u8; 10];
        rig.dst_peer
            .read_exact(&mut got)
            .expect("the bytes arrived");
        assert_eq!(&got, b"last words");
    }

    /// Bytes behind a TCP urgent mark, all queued before the direction reads, so that no later
    /// event comes: a read stops short at the mark and a splice there moves nothing (0, as at
    /// an end of stream, when the end is queued too), yet with the urgent data reported by the
    /// worker's registration the direction steps over the mark (leaving the urgent byte out)
    /// and moves them in the same pass, on either path, the end of stream after them.
    #[cfg(target_os = "linux")]
    #[test]
    fn bytes_behind_an_urgent_mark_go_through_in_the_same_pass() {
        for (splicing, end) in [(false, false), (true, false), (false, true), (true, true)] {
            let case = format!("splicing: {splicing}, end of stream: {end}");
            let mut rig = Rig::new();
            rig.mode = Mode::Splice;
            rig.direction.splicing = splicing;
            let mut poll = mio::Poll::new().expect("a poll");
            poll.registry()
                .register(
                    &mut rig.src,
                    mio::Token(0),
                    crate::dataplane::conn::INTEREST,
                )
                .expect("register as a connection's sockets are");
            // Waits for an event `until` accepts, taking every event in as the worker does.
            let mut poll_until = |until: &dyn Fn(&mio::event::Event) -> bool, ready: &mut Ready| {
                let mut events = mio::Events::with_capacity(8);
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                loop {
                    poll.poll(&mut events, Some(std::time::Duration::from_millis(100)))
                        .expect("poll");
                    events.iter().for_each(|e| ready.update(e));
                    if events.iter().any(until) {
                        return;
                    }
                    assert!(std::time::Instant::now() < deadline, "no event in time");
                }
            };
            rig.src_peer.write_all(b"abc").expect("write");
            rustix::net::send(&rig.src_peer, b"!", rustix::net::SendFlags::OOB)
                .expect("send urgent data");
            poll_until(&|e| e.is_priority(), &mut rig.src_ready);
            // The last bytes (and the end): once their event is in, they are queued, and no
            // event follows.
            rig.src_peer.write_all(b"def").expect("write");
            if end {
                rig.src_peer
                    .shutdown(std::net::Shutdown::Write)
                    .expect("FIN");
                poll_until(&|e| e.is_read_closed(), &mut rig.src_ready);
            } else {
                poll_until(&|e| e.is_readable(), &mut rig.src_ready);
            }
            let expected = if end { Pumped::Eof } else { Pumped::Waiting };
            assert_eq!(rig.pump(8), expected, "{case}");
            assert_eq!((rig.direction.moved, rig.counted), (6, 6), "{case}");
            assert!(!rig.src_ready.readable, "drained: {case}");
            assert!(end || !rig.src_ready.urgent, "the mark passed: {case}");
            let mut got = [0_u8; 6];
            rig.dst_peer
                .read_exact(&mut got)
                .expect("the bytes arrived");
            assert_eq!(&got, b"abcdef", "{case}");
        }
    }

    #[test]
    fn a_short_read_marks_the_source_drained() {
        let mut rig = Rig::new();
        rig.src_peer.write_all(b"ping").expect("write");
        until(|| {
            rig.src_ready.readable = true;
            assert_eq!(rig.pump(BUDGET), Pumped::Waiting);
            rig.direction.moved == 4
        });
        assert!(
            !rig.src_ready.readable,
            "no read is wasted on an empty socket"
        );
    }

    #[test]
    fn a_direction_stops_at_its_budget_and_picks_up_where_it_stopped() {
        let mut rig = Rig::new();
        rig.src_peer.write_all(&[1_u8; 2 * SCRATCH]).expect("write");
        // Until both chunks are queued on our side, so that each read is a full one.
        until(|| rustix::io::ioctl_fionread(&rig.src).is_ok_and(|n| n >= 2 * SCRATCH as u64));
        rig.src_ready.readable = true;
        assert_eq!(rig.pump(1), Pumped::Budget);
        assert!(rig.src_ready.readable, "more may be waiting");
        assert_eq!(rig.pump(1), Pumped::Budget);
        // Nothing left: no event will say so, the read that would block does.
        assert_eq!(rig.pump(1), Pumped::Waiting);
        assert!(!rig.src_ready.readable);
        assert_eq!(rig.direction.moved, 2 * SCRATCH as u64);
        let mut got = vec![0_u8; 2 * SCRATCH];
        rig.dst_peer
            .read_exact(&mut got)
            .expect("everything arrived");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_direction_with_no_pipe_to_be_had_copies_instead() {
        let mut rig = Rig::new();
        rig.mode = Mode::Splice;
        let sent: Vec<u8> = (0..2 * SCRATCH).map(|i| (i % 251) as u8).collect();
        rig.src_peer.write_all(&sent).expect("write");
        until(|| rustix::io::ioctl_fionread(&rig.src).is_ok_and(|n| n >= sent.len() as u64));
        // The first full read switches the direction to splice; its first pipe is refused.
        super::super::splice::REFUSE.set(1);
        until(|| {
            rig.src_ready.readable = true;
            rig.pump(8);
            rig.direction.moved == sent.len() as u64
        });
        assert_eq!(super::super::splice::REFUSE.get(), 0, "a pipe was refused");
        assert!(
            rig.direction.splicing,
            "the next full read tried splice again"
        );
        let mut got = vec![0_u8; sent.len()];
        rig.dst_peer
            .read_exact(&mut got)
            .expect("everything arrived");
        assert!(got == sent, "the bytes arrived in order");
    }

    #[test]
    fn back_pressure_buffers_only_until_the_destination_takes_it() {
        const TOTAL: u64 = 16 << 20;
        let mut rig = Rig::new();
        let mut writer = rig.src_peer.try_clone().expect("a handle for the writer");
        let writing = std::thread::spawn(move || {
            // More than both sockets' buffers hold; the writes end once it is all taken.
            let chunk = vec![7_u8; 1 << 20];
            for _ in 0..TOTAL >> 20 {
                if writer.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        // Nobody reads the destination: sooner or later it takes no more.
        until(|| {
            rig.src_ready.readable = true;
            rig.pump(BUDGET);
            !rig.dst_ready.writable
        });
        assert!(!rig.direction.pending.is_empty(), "the remainder is kept");
        let mut sink = vec![0_u8; 1 << 20];
        let mut received = 0_u64;
        // Never waits on an empty socket: the pump below is what fills it.
        rig.dst_peer.set_nonblocking(true).expect("non-blocking");
        until(|| {
            if let Ok(n) = rig.dst_peer.read(&mut sink) {
                received += n as u64;
            }
            rig.dst_ready.writable = true;
            rig.src_ready.readable = true;
            rig.pump(BUDGET);
            received == TOTAL
        });
        writing.join().expect("the writer ends");
        assert_eq!(rig.direction.moved, TOTAL);
        assert_eq!(
            rig.direction.pending.capacity(),
            0,
            "no buffer left once drained"
        );
    }
}
