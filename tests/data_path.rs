//! The data path end to end: bulk data arrives intact both ways, half-closes travel in either
//! direction while the other keeps flowing, and the byte counters match what moved.
//!
//! The cases run on both data paths move at least [`SPLICE_AT_LEAST`] bytes each way they
//! check, so that on the splice path the relay switches to splice(2); the metrics then show
//! that it did, and that the copy path never did.

#[macro_use]
mod support;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use weighbridge::BackendCounters;

use support::{
    BOTH_WAYS, Bulk, LISTENER, Mock, Running, SPLICE_AT_LEAST, TO_BACKEND, Transfer, bounded,
    config, connect_identify, data_path_config, echo_random, eventually_eq, exchange, receive_all,
    send_random, start_balancer,
};

/// A backend's (open connections, connections, bytes to it, bytes from it).
fn flow(c: BackendCounters) -> (u64, u64, u64, u64) {
    (
        c.active,
        c.connections,
        c.bytes_to_backend,
        c.bytes_from_backend,
    )
}

/// Concurrent connections in the bulk test.
const STREAMS: u64 = 4;
/// Bytes each side of each bulk connection sends.
const BULK: u64 = 64 << 20;
/// Limit for the bulk test; a debug build moves its 512 MiB in a few seconds.
const BULK_LIMIT: Duration = Duration::from_secs(45);
/// Limit for the small tests.
const LIMIT: Duration = Duration::from_secs(15);
/// How long counters may take to settle after the last byte.
const SETTLE: Duration = Duration::from_secs(5);

fn sorted(mut digests: Vec<[u8; 32]>) -> Vec<[u8; 32]> {
    digests.sort_unstable();
    digests
}

async fn bulk_random_data_arrives_intact_both_ways_on_concurrent_connections(splice: bool) {
    bounded(BULK_LIMIT, async {
        let mut backend = Bulk::start(BULK, 1_000).await;
        let lb = start_balancer(&data_path_config(splice, "", &[(backend.addr, 1.0)]));
        let addr = lb.addr;
        let clients: Vec<JoinHandle<io::Result<Transfer>>> = (0..STREAMS)
            .map(|seed| {
                tokio::spawn(async move {
                    let stream = TcpStream::connect(addr).await?;
                    exchange(stream, seed, BULK).await
                })
            })
            .collect();
        let mut at_clients = Vec::new();
        for client in clients {
            let transfer = client
                .await
                .expect("client task does not panic")
                .expect("client transfer through the balancer succeeds");
            at_clients.push(transfer);
        }
        let mut at_backend = Vec::new();
        for _ in 0..STREAMS {
            let transfer = backend
                .transfers
                .recv()
                .await
                .expect("the backend reports every connection");
            at_backend.push(transfer);
        }

        for t in at_clients.iter().chain(&at_backend) {
            assert_eq!(t.received_len, BULK, "a side received a short stream");
        }
        let client_sent = sorted(at_clients.iter().map(|t| t.sent).collect());
        let mut distinct = client_sent.clone();
        distinct.dedup();
        assert_eq!(distinct.len() as u64, STREAMS, "streams must differ");
        assert_eq!(
            client_sent,
            sorted(at_backend.iter().map(|t| t.received).collect()),
            "client -> backend bytes differ"
        );
        assert_eq!(
            sorted(at_backend.iter().map(|t| t.sent).collect()),
            sorted(at_clients.iter().map(|t| t.received).collect()),
            "backend -> client bytes differ"
        );

        eventually_eq(
            SETTLE,
            "byte counters",
            (0, STREAMS * BULK, STREAMS * BULK),
            || {
                let c = lb.backend(backend.addr);
                (c.active, c.bytes_to_backend, c.bytes_from_backend)
            },
        )
        .await;
        assert_eq!(lb.backend(backend.addr).connections, STREAMS);
        lb.assert_data_path(backend.addr, splice, &BOTH_WAYS).await;
        assert_eq!(lb.stop().await.cut_connections, 0);
    })
    .await;
}

/// A backend's listening socket nobody accepts on yet, its address, and a balancer in front of
/// it alone on the data path `splice` chooses.
async fn behind_balancer(splice: bool) -> (TcpListener, SocketAddr, Running) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("backend address");
    let lb = start_balancer(&data_path_config(splice, "", &[(addr, 1.0)]));
    (listener, addr, lb)
}

/// Request bytes the client sends before half-closing.
const REQUEST: u64 = SPLICE_AT_LEAST;
/// Bytes the backend answers with after the request's end.
const REPLY: u64 = 3 << 19;
/// Count (8 bytes) and SHA-256 (32 bytes) the reply starts with.
const HEADER: usize = 40;

async fn client_half_close_reaches_backend_and_its_reply_still_arrives(splice: bool) {
    bounded(LIMIT, async {
        let (listener, backend_addr, lb) = behind_balancer(splice).await;
        let backend = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await?;
            let (received, len) = receive_all(&mut stream).await?;
            let mut header = len.to_be_bytes().to_vec();
            header.extend_from_slice(&received);
            stream.write_all(&header).await?;
            let sent = send_random(&mut stream, 2, REPLY).await?;
            io::Result::Ok((received, len, sent))
        });

        let mut client = TcpStream::connect(lb.addr)
            .await
            .expect("connect to the balancer");
        let sent = send_random(&mut client, 1, REQUEST)
            .await
            .expect("send the request and half-close");
        let mut header = [0_u8; HEADER];
        client
            .read_exact(&mut header)
            .await
            .expect("the reply starts after the client's half-close");
        let (reply, reply_len) = receive_all(&mut client)
            .await
            .expect("read the reply to its end");
        let (backend_received, backend_len, backend_sent) = backend
            .await
            .expect("backend task does not panic")
            .expect("backend exchange succeeds");

        assert_eq!((backend_len, backend_received), (REQUEST, sent));
        assert_eq!(header[..8], REQUEST.to_be_bytes());
        assert_eq!(header[8..], sent);
        assert_eq!((reply_len, reply), (REPLY, backend_sent));

        let expected = (0, 1, REQUEST, HEADER as u64 + REPLY);
        eventually_eq(SETTLE, "counters after close", expected, || {
            flow(lb.backend(backend_addr))
        })
        .await;
        lb.assert_data_path(backend_addr, splice, &BOTH_WAYS).await;
        assert_eq!(lb.stop().await.cut_connections, 0);
    })
    .await;
}

/// Bytes the backend sends before half-closing.
const GREETING: u64 = SPLICE_AT_LEAST;
/// Bytes the client sends after it has seen the backend's end of stream.
const LATE: u64 = 3 << 19;

async fn backend_half_close_reaches_client_which_can_still_send(splice: bool) {
    bounded(LIMIT, async {
        let (listener, backend_addr, lb) = behind_balancer(splice).await;
        let backend = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await?;
            let sent = send_random(&mut stream, 3, GREETING).await?;
            let (received, len) = receive_all(&mut stream).await?;
            io::Result::Ok((sent, received, len))
        });

        let mut client = TcpStream::connect(lb.addr)
            .await
            .expect("connect to the balancer");
        let (greeting, greeting_len) = receive_all(&mut client)
            .await
            .expect("read the backend's data up to its half-close");
        let late = send_random(&mut client, 4, LATE)
            .await
            .expect("the client can still send after end of stream");
        let (backend_sent, backend_received, backend_len) = backend
            .await
            .expect("backend task does not panic")
            .expect("backend exchange succeeds");

        assert_eq!((greeting_len, greeting), (GREETING, backend_sent));
        assert_eq!((backend_len, backend_received), (LATE, late));
        let mut rest = [0_u8; 1];
        let n = client
            .read(&mut rest)
            .await
            .expect("read after end of stream");
        assert_eq!(n, 0, "nothing follows the backend's end of stream");

        eventually_eq(
            SETTLE,
            "counters after close",
            (0, 1, LATE, GREETING),
            || flow(lb.backend(backend_addr)),
        )
        .await;
        lb.assert_data_path(backend_addr, splice, &BOTH_WAYS).await;
        assert_eq!(lb.stop().await.cut_connections, 0);
    })
    .await;
}

/// The kernel spreads connections over the workers' sockets by a hash; accept hands them over
/// so that long-lived connections end up even across the workers (half the time a hash alone
/// leaves 64 connections more than two apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lived_connections_are_spread_evenly_over_the_workers() {
    bounded(LIMIT, async {
        let mocks = Mock::identify_many(2).await;
        let pool = [(mocks[0].addr, 1.0), (mocks[1].addr, 1.0)];
        let text = format!("threads = 2\n{}", config("weighted_round_robin", "", &pool));
        let lb = start_balancer(&text);
        let mut held = Vec::new();
        for _ in 0..64 {
            held.push(connect_identify(lb.addr).await.0);
        }
        let loads = lb.handle.worker_connections();
        assert_eq!(loads.iter().sum::<usize>(), 64, "{loads:?}");
        let (fewest, most) = (loads[0].min(loads[1]), loads[0].max(loads[1]));
        assert!(most - fewest <= fewest / 4 + 1, "{loads:?}");
        drop(held);
        eventually_eq(
            SETTLE,
            "connections on the workers after close",
            vec![0, 0],
            || lb.handle.worker_connections(),
        )
        .await;
        assert_eq!(lb.stop().await.cut_connections, 0);
    })
    .await;
}

async fn counters_credit_bytes_to_the_backend_that_moved_them(splice: bool) {
    bounded(LIMIT, async {
        let mocks = Mock::identify_many(2).await;
        let addrs = [mocks[0].addr, mocks[1].addr];
        let lb = start_balancer(&data_path_config(
            splice,
            "",
            &[(addrs[0], 1.0), (addrs[1], 1.0)],
        ));
        let sizes = [SPLICE_AT_LEAST, 3 * SPLICE_AT_LEAST];
        let mut seen = Vec::new();
        let mut held = Vec::new();
        for (seed, size) in (0..).zip(sizes) {
            let (mut stream, id) = connect_identify(lb.addr).await;
            echo_random(&mut stream, seed, size)
                .await
                .expect("the message comes back");
            seen.push(id);
            held.push(stream);
        }
        // Equal weights: one connection each.
        assert_eq!(seen, [0, 1]);
        for (backend, size) in addrs.iter().zip(sizes) {
            // The greeting byte plus the echo came back; the message went out. A chunk is
            // counted once written, so the client may read it a moment before it is counted.
            eventually_eq(
                SETTLE,
                &format!("backend {backend}: connections, bytes to, bytes from"),
                (1, size, size + 1),
                || {
                    let c = lb.backend(*backend);
                    (c.connections, c.bytes_to_backend, c.bytes_from_backend)
                },
            )
            .await;
        }
        let listener = lb
            .handle
            .listener_counters(LISTENER)
            .expect("listener counters");
        assert_eq!((listener.accepted, listener.open), (2, 2));
        drop(held);
        eventually_eq(SETTLE, "open connections after close", 0, || {
            lb.listener().open
        })
        .await;
        for backend in addrs {
            lb.assert_data_path(backend, splice, &BOTH_WAYS).await;
        }
        assert_eq!(lb.stop().await.cut_connections, 0);
    })
    .await;
}

/// Resets `stream` instead of closing it gracefully: with a zero linger time the close sends
/// RST.
fn reset(stream: TcpStream) {
    rustix::net::sockopt::set_socket_linger(&stream, Some(Duration::ZERO))
        .expect("set SO_LINGER to 0");
    drop(stream);
}

/// Sends [`SPLICE_AT_LEAST`] random bytes (seeded by `seed`) from `from` and half-closes it,
/// while `to` reads up to their end; checks that exactly those bytes arrived.
async fn send_then_half_close(from: &mut TcpStream, to: &mut TcpStream, seed: u64) {
    let (sent, received) = tokio::join!(
        send_random(&mut *from, seed, SPLICE_AT_LEAST),
        receive_all(&mut *to)
    );
    let sent = sent.expect("send and half-close");
    let received = received.expect("the bytes and their end arrive");
    assert_eq!(received, (sent, SPLICE_AT_LEAST));
}

/// One side half-closes, then resets while the other side is quiet. Neither direction reads or
/// writes the reset socket any more (its end of stream was passed on, nothing goes to it), yet
/// the balancer closes the connection at once rather than at `idle_timeout` (ten minutes by
/// default), with its other socket.
async fn a_reset_after_a_half_close_ends_the_connection(splice: bool) {
    bounded(LIMIT, async {
        let (listener, backend_addr, lb) = behind_balancer(splice).await;
        let active = || lb.backend(backend_addr).active;

        // The client sends and half-closes, then resets; the backend stays silent and open.
        let mut client = TcpStream::connect(lb.addr).await.expect("connect");
        let (mut backend, _) = listener.accept().await.expect("accept");
        send_then_half_close(&mut client, &mut backend, 5).await;
        eventually_eq(SETTLE, "the connection is open", 1, active).await;
        reset(client);
        eventually_eq(SETTLE, "closed after the client's reset", 0, active).await;
        drop(backend);

        // The backend sends and half-closes, then resets; the client stays silent and open.
        let mut client = TcpStream::connect(lb.addr).await.expect("connect");
        let (mut backend, _) = listener.accept().await.expect("accept");
        send_then_half_close(&mut backend, &mut client, 6).await;
        reset(backend);
        eventually_eq(SETTLE, "closed after the backend's reset", 0, active).await;
        drop(client);
        lb.assert_data_path(backend_addr, splice, &BOTH_WAYS).await;
        assert_eq!(lb.stop().await.cut_connections, 0);
    })
    .await;
}

/// A connection that ends with bytes still inside the balancer (read from the client, not yet
/// taken by a backend that stopped reading) counts what reached the backend, not what was read.
async fn a_reset_mid_transfer_counts_what_reached_the_backend(splice: bool) {
    /// How long the count must stand still for the transfer to be taken as stalled.
    const STALLED: Duration = Duration::from_millis(200);

    bounded(LIMIT, async {
        let (listener, backend_addr, lb) = behind_balancer(splice).await;
        let counted = || lb.backend(backend_addr).bytes_to_backend;
        let mut client = TcpStream::connect(lb.addr).await.expect("connect");
        // The backend accepts, takes the first MiB, then reads nothing until the end.
        let (backend, _) = listener.accept().await.expect("accept");
        let head = tokio::spawn(async move {
            let mut backend = backend;
            let mut head = vec![0_u8; SPLICE_AT_LEAST as usize];
            backend.read_exact(&mut head).await.map(|_| backend)
        });

        // More than every buffer on the way holds: the transfer stalls with the balancer
        // holding what the backend cannot take. Written until the count stops moving past the
        // first MiB, so that bytes beyond it are on their way to the backend.
        let data = vec![7_u8; 64 << 20];
        {
            let write = client.write_all(&data);
            tokio::pin!(write);
            let deadline = tokio::time::Instant::now() + SETTLE;
            let (mut last, mut since) = (0, tokio::time::Instant::now());
            loop {
                tokio::select! {
                    written = &mut write => panic!("64 MiB fit in the buffers: {written:?}"),
                    () = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
                let now = counted();
                if now != last {
                    (last, since) = (now, tokio::time::Instant::now());
                } else if now > SPLICE_AT_LEAST && since.elapsed() >= STALLED {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the transfer stalls"
                );
            }
        }
        reset(client);
        let mut backend = head
            .await
            .expect("the backend task does not panic")
            .expect("the first MiB arrives");
        // What arrives after the stall: bytes the buffers on the way held.
        let mut received = 0_u64;
        let mut buf = vec![0_u8; 1 << 16];
        loop {
            match backend.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => received += n as u64,
                Err(e) => panic!("the balancer closes the backend side cleanly: {e}"),
            }
        }
        assert!(received > 0);
        let received = SPLICE_AT_LEAST + received;
        // The worker lets go of the connection's count just after it has closed the backend's
        // side, so the count may lag the end of stream the backend saw by a moment.
        eventually_eq(
            SETTLE,
            "bytes counted to the backend, and the connection closed",
            (received, 0),
            || {
                let c = lb.backend(backend_addr);
                (c.bytes_to_backend, c.active)
            },
        )
        .await;
        lb.assert_data_path(backend_addr, splice, &[TO_BACKEND])
            .await;
        assert_eq!(lb.stop().await.cut_connections, 0);
    })
    .await;
}

/// TCP urgent data (`MSG_OOB`) is left out of the stream, as the kernel leaves it out for any
/// reader that has not asked for it inline, and as HAProxy and nginx pass it on. Every byte
/// around it goes through, with the stream's end after them. The urgent mark stops a read
/// short of what is queued, and a splice stops there as at an end of stream.
async fn urgent_data_is_left_out_and_the_bytes_around_it_go_through(splice: bool) {
    /// Connections to try: whether the end of stream is already in when the balancer reaches
    /// the mark depends on timing, so one connection alone would not always meet that case.
    const CONNECTIONS: u64 = 8;

    bounded(LIMIT, async {
        let (listener, backend_addr, lb) = behind_balancer(splice).await;
        for _ in 0..CONNECTIONS {
            let mut client = TcpStream::connect(lb.addr).await.expect("connect");
            let (mut backend, _) = listener.accept().await.expect("accept");
            exchange_around_marks(&mut client, &mut backend).await;
        }
        let to_backend = CONNECTIONS * (2 * BEFORE_MARK as u64 + 12);
        eventually_eq(
            SETTLE,
            "counters after close",
            (0, CONNECTIONS, to_backend, CONNECTIONS * 5),
            || flow(lb.backend(backend_addr)),
        )
        .await;
        lb.assert_data_path(backend_addr, splice, &[TO_BACKEND])
            .await;
        assert_eq!(lb.stop().await.cut_connections, 0);
    })
    .await;
}

/// Bytes sent before each urgent byte: enough for full reads, after which the splice path takes
/// the direction over.
const BEFORE_MARK: usize = 1 << 20;

/// Two urgent bytes on one connection, one in the middle of the stream and one right before
/// its end.
async fn exchange_around_marks(client: &mut TcpStream, backend: &mut TcpStream) {
    send_around_mark(client, backend, [b"abc", b"def"], false).await;
    let mut tail = [0_u8; 6];
    backend
        .read_exact(&mut tail)
        .await
        .expect("the bytes after the mark arrive");
    assert_eq!(&tail, b"abcdef");
    // The connection still carries bytes both ways.
    backend.write_all(b"reply").await.expect("reply");
    let mut reply = [0_u8; 5];
    client
        .read_exact(&mut reply)
        .await
        .expect("the reply arrives");
    assert_eq!(&reply, b"reply");

    // The end of stream right behind the mark: a splice at the mark then moves nothing and
    // reports no error either, as at the end itself.
    send_around_mark(client, backend, [b"ghi", b"jkl"], true).await;
    let mut rest = Vec::new();
    backend
        .read_to_end(&mut rest)
        .await
        .expect("the bytes after the mark and the end of stream arrive");
    assert_eq!(rest, b"ghijkl");
}

/// Sends [`BEFORE_MARK`] bytes and waits until they have arrived; then `parts[0]`, one urgent
/// byte and `parts[1]` back to back, and with `end` the end of stream right behind them.
///
/// Whether the balancer reads before the bytes after the mark are in, or after (when no later
/// event comes for them), depends on timing, as does whether the end of stream is in when it
/// reaches the mark: the test sends several connections to meet both, and the relay's unit
/// test (`bytes_behind_an_urgent_mark_go_through_in_the_same_pass`) makes each case certain.
async fn send_around_mark(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    parts: [&[u8]; 2],
    end: bool,
) {
    let before = vec![1_u8; BEFORE_MARK];
    client
        .write_all(&before)
        .await
        .expect("send the bytes before");
    let mut received = vec![0_u8; BEFORE_MARK];
    backend
        .read_exact(&mut received)
        .await
        .expect("the bytes before arrive");
    assert!(received == before);
    client
        .write_all(parts[0])
        .await
        .expect("send before the mark");
    rustix::net::send(&*client, b"!", rustix::net::SendFlags::OOB).expect("send urgent data");
    client
        .write_all(parts[1])
        .await
        .expect("send after the mark");
    if end {
        client.shutdown().await.expect("half-close");
    }
}

on_both_paths!(
    urgent_data_is_left_out_and_the_bytes_around_it_go_through,
    a_reset_mid_transfer_counts_what_reached_the_backend,
    a_reset_after_a_half_close_ends_the_connection,
    bulk_random_data_arrives_intact_both_ways_on_concurrent_connections,
    client_half_close_reaches_backend_and_its_reply_still_arrives,
    backend_half_close_reaches_client_which_can_still_send,
    counters_credit_bytes_to_the_backend_that_moved_them,
);
