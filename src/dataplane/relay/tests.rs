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
