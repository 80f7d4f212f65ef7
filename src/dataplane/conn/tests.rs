use super::*;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::num::NonZeroUsize;
use std::path::Path;

use arc_swap::ArcSwap;
use tokio_util::task::TaskTracker;

use crate::dataplane::accept::{self, Serving};
use crate::dataplane::connect::OPEN_FAILS_WITH;
use crate::dataplane::remote::Command;
use crate::dataplane::workers::Workers;
use crate::snapshot::Snapshot;
use crate::state::{Registry, Republisher};

/// A worker serving listener `lb` of config `text`, with no control task: (the worker, the
/// listener's address, its pool, the republish wake-ups).
fn one_worker(
    text: &str,
) -> (
    Workers,
    SocketAddr,
    Arc<Listener>,
    tokio::sync::mpsc::Receiver<()>,
) {
    let config = crate::config::parse(text, Path::new("t.toml")).expect("valid");
    let (republisher, woken) = Republisher::new();
    let registry = Registry::with_republisher(republisher);
    let snapshot = Snapshot::build(&config, &registry, &HashMap::new(), None, &HashMap::new());
    let pool = Arc::clone(snapshot.listener("lb").expect("listener lb"));
    let workers = Workers::start(NonZeroUsize::MIN).expect("a worker");
    let bound = accept::bind(&config.listeners[0], 1).expect("bind the listener");
    let serving = Serving {
        snapshots: Arc::new(ArcSwap::from_pointee(snapshot)),
        connections: TaskTracker::new(),
        placement: workers.placement().clone(),
    };
    for (id, socket) in bound.sockets.into_iter().enumerate() {
        let listen = Command::Listen {
            id: id as u64,
            name: "lb".to_owned(),
            socket,
            serving: serving.clone(),
        };
        assert!(workers.placement().remote(0).send(listen).is_ok());
    }
    (workers, bound.local_addr, pool, woken)
}

/// Bytes sent through in the budget test.
const STREAM: usize = 8 << 20;
/// How long the budget test's client waits on a read or a write before it fails.
const LIMIT: Option<Duration> = Some(Duration::from_secs(10));

/// With the crate's test budget of two reads, a few MiB cannot go through in one pump: they
/// arrive only if the worker resumes a direction that stopped at its budget, which no new
/// readiness event would prompt.
#[test]
fn a_stream_goes_through_in_budgets() {
    let backend = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a backend");
    let backend_addr = backend.local_addr().expect("backend address");
    // Counts what arrives and answers with the count once the client is done.
    std::thread::spawn(move || {
        let Ok((mut stream, _)) = backend.accept() else {
            return;
        };
        let mut buf = vec![0_u8; 1 << 20];
        let mut total = 0_u64;
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        if let Err(e) = stream.write_all(&total.to_be_bytes()) {
            eprintln!("test backend: {e}");
        }
    });
    let text = format!(
        "[[listener]]\nname = \"lb\"\nbind = \"127.0.0.1:0\"\n\
         [[listener.backend]]\naddr = \"{backend_addr}\"\n"
    );
    let (_workers, lb_addr, _pool, _woken) = one_worker(&text);
    let mut client = std::net::TcpStream::connect(lb_addr).expect("connect");
    for timeout in [
        client.set_read_timeout(LIMIT),
        client.set_write_timeout(LIMIT),
    ] {
        timeout.expect("a socket timeout");
    }
    client.write_all(&vec![9_u8; STREAM]).expect("send");
    client
        .shutdown(std::net::Shutdown::Write)
        .expect("end of stream");
    let mut count = [0_u8; 8];
    client
        .read_exact(&mut count)
        .expect("the backend's count arrives");
    assert_eq!(u64::from_be_bytes(count), STREAM as u64);
}

/// A backend on a thread of its own that sends `x` to every connection; its address.
fn greeting_backend() -> SocketAddr {
    let backend = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a backend");
    let backend_addr = backend.local_addr().expect("backend address");
    std::thread::spawn(move || {
        for mut stream in backend.incoming().map_while(Result::ok) {
            if let Err(e) = stream.write_all(b"x") {
                eprintln!("test backend: {e}");
            }
        }
    });
    backend_addr
}

/// Reads the greeting backend's `x` through `client` within 5 s; `served` says what a
/// failure means.
fn assert_greeted(client: &mut std::net::TcpStream, served: &str) {
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    let mut byte = [0_u8; 1];
    client.read_exact(&mut byte).expect(served);
    assert_eq!(&byte, b"x");
}

/// One worker, not started, and the command that gives it listener `lb` (in front of the
/// greeting backend), bound at the address returned.
fn unstarted_worker_with_listener() -> (
    crate::dataplane::workers::Placement,
    crate::dataplane::event_loop::EventLoop,
    Command,
    SocketAddr,
) {
    let backend_addr = greeting_backend();
    let text = format!(
        "[[listener]]\nname = \"lb\"\nbind = \"127.0.0.1:0\"\n\
         [[listener.backend]]\naddr = \"{backend_addr}\"\n"
    );
    let (placement, event_loop, listen, addr, _pool) = unstarted_worker(&text);
    (placement, event_loop, listen, addr)
}

/// One worker, not started, and the command that gives it listener `lb` of config `text`,
/// bound at the address returned, with its pool.
fn unstarted_worker(
    text: &str,
) -> (
    crate::dataplane::workers::Placement,
    crate::dataplane::event_loop::EventLoop,
    Command,
    SocketAddr,
    Arc<Listener>,
) {
    let config = crate::config::parse(text, Path::new("t.toml")).expect("valid");
    let registry = Registry::with_republisher(Republisher::new().0);
    let snapshot = Snapshot::build(&config, &registry, &HashMap::new(), None, &HashMap::new());
    let pool = Arc::clone(snapshot.listener("lb").expect("listener lb"));
    let (placement, event_loop) = Workers::unstarted().expect("a worker");
    let mut bound = accept::bind(&config.listeners[0], 1).expect("bind the listener");
    let serving = Serving {
        snapshots: Arc::new(ArcSwap::from_pointee(snapshot)),
        connections: TaskTracker::new(),
        placement: placement.clone(),
    };
    let socket = bound.sockets.pop().expect("one socket");
    let listen = Command::Listen {
        id: 0,
        name: "lb".to_owned(),
        socket,
        serving,
    };
    (placement, event_loop, listen, bound.local_addr, pool)
}

/// A bug (a panic) in a connection's first step closes that client only: the worker goes
/// on serving the next one.
#[test]
fn a_panic_while_starting_a_connection_closes_only_that_connection() {
    let (placement, event_loop, listen, addr) = unstarted_worker_with_listener();
    assert!(placement.remote(0).send(listen).is_ok());
    let worker = std::thread::spawn(move || {
        PANIC_AT_START.set(true);
        event_loop.run();
    });
    let mut first = std::net::TcpStream::connect(addr).expect("connect");
    first
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    let mut byte = [0_u8; 1];
    match first.read(&mut byte) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the first client is closed, not served: {other:?}"),
    }
    let mut second = std::net::TcpStream::connect(addr).expect("connect");
    assert_greeted(&mut second, "the worker serves the next client");
    assert!(placement.remote(0).send(Command::Exit).is_ok());
    worker.join().expect("the worker ends without a panic");
}

/// A listening socket given back to be closed first serves the connections already in its
/// queue: their handshakes completed, and the close would reset them. The worker sees the
/// socket and is told to give it back in the same turn, so nothing was accepted before.
#[test]
fn a_closing_listener_serves_the_connections_in_its_queue_first() {
    let (placement, event_loop, listen, addr) = unstarted_worker_with_listener();
    // Queued: the kernel completes the handshakes before anyone accepts.
    let mut clients: Vec<std::net::TcpStream> = (0..3)
        .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
        .collect();
    let (reply, given_back) = tokio::sync::oneshot::channel();
    let unlisten = Command::Unlisten {
        id: 0,
        serve_queue: true,
        reply,
    };
    assert!(placement.remote(0).send(listen).is_ok());
    assert!(placement.remote(0).send(unlisten).is_ok());
    let worker = std::thread::spawn(move || {
        event_loop.run();
        crate::dataplane::event_loop::QUEUE_ACCEPTS.get()
    });
    let socket = given_back
        .blocking_recv()
        .expect("the worker answers")
        .expect("the socket comes back");
    drop(socket);
    for client in &mut clients {
        assert_greeted(client, "served, not reset by the close");
    }
    assert!(placement.remote(0).send(Command::Exit).is_ok());
    let accepts = worker.join().expect("the worker ends");
    // One accept per queued client and one that finds the queue empty: an empty queue ends
    // the serving at once rather than being asked again up to the largest queue's size.
    assert_eq!(accepts, clients.len() + 1);
}

/// Serves one client through listener `lb` of config `text` on a worker whose first backend
/// socket fails to open with EADDRNOTAVAIL; asserts the client is served (by the next
/// backend) and returns the listener's pool once the worker has ended.
fn serve_past_addrnotavail(text: &str) -> Arc<Listener> {
    let (placement, event_loop, listen, addr, pool) = unstarted_worker(text);
    assert!(placement.remote(0).send(listen).is_ok());
    let worker = std::thread::spawn(move || {
        OPEN_FAILS_WITH.set(Some(rustix::io::Errno::ADDRNOTAVAIL.raw_os_error()));
        event_loop.run();
    });
    let mut client = std::net::TcpStream::connect(addr).expect("connect");
    assert_greeted(&mut client, "served by the other backend");
    assert!(placement.remote(0).send(Command::Exit).is_ok());
    worker.join().expect("the worker ends without a panic");
    pool
}

/// No local port left toward a backend (EADDRNOTAVAIL) is the balancer's shortage, not the
/// backend's failure: nothing is counted against the backend, so passive ejection cannot
/// eject it, and the connection is served by another backend.
#[test]
fn no_local_port_is_not_counted_against_the_backend() {
    let (first, second) = (greeting_backend(), greeting_backend());
    let pool = serve_past_addrnotavail(&format!(
        "[[listener]]\nname = \"lb\"\nbind = \"127.0.0.1:0\"\n\
         [listener.passive]\nmax_connect_failures = 1\n\
         [[listener.backend]]\naddr = \"{first}\"\n\
         [[listener.backend]]\naddr = \"{second}\"\n"
    ));
    let failures: Vec<_> = pool.pools()[0]
        .backends()
        .iter()
        .map(|b| {
            let state = &b.stats;
            (
                state.consecutive_connect_failures(),
                state.counters().connect_failures,
            )
        })
        .collect();
    assert_eq!(failures, [(0, 0), (0, 0)]);
    let listener = pool.stats().counters();
    assert_eq!(
        (listener.connect_attempts, listener.connect_failures),
        (2, 1)
    );
}

/// EADDRNOTAVAIL for a backend no socket can reach from here (no source address for it) is
/// the backend's address being unusable, and counts against it like any failed connect.
/// A link-local IPv6 address without a scope is one: no interface to send from.
#[test]
fn an_address_with_no_source_is_counted_against_the_backend() {
    let unusable: SocketAddr = "[fe80::1]:9".parse().expect("an address");
    let reachable = greeting_backend();
    let pool = serve_past_addrnotavail(&format!(
        "[[listener]]\nname = \"lb\"\nbind = \"127.0.0.1:0\"\n\
         [[listener.backend]]\naddr = \"{unusable}\"\n\
         [[listener.backend]]\naddr = \"{reachable}\"\n"
    ));
    let failures: Vec<_> = pool.pools()[0]
        .backends()
        .iter()
        .map(|b| b.stats.counters().connect_failures)
        .collect();
    assert_eq!(failures, [1, 0]);
}

/// The connection path, passive ejection's part included, never waits for a backend's health
/// mutex: with every one of them held by another thread, connections are served at once,
/// and the connect failures that reach `max_connect_failures` ask for a republish without
/// waiting either. No control task runs here, so nothing but a worker could be the one
/// waiting.
#[test]
fn connections_are_served_while_every_health_lock_is_held() {
    let backend_addr = greeting_backend();
    // Bound and closed: connects to it are refused.
    let refusing_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let text = format!(
        "[[listener]]\nname = \"lb\"\nbind = \"127.0.0.1:0\"\nconnect_attempts = 2\n\
         [listener.passive]\nmax_connect_failures = 2\n\
         [[listener.backend]]\naddr = \"{backend_addr}\"\n\
         [[listener.backend]]\naddr = \"{refusing_addr}\"\n"
    );
    let (_workers, lb_addr, pool, mut woken) = one_worker(&text);
    let states: Vec<_> = pool.pools()[0]
        .backends()
        .iter()
        .map(|b| Arc::clone(&b.stats))
        .collect();
    // The locks are held until the test has finished with its connections: a worker that
    // waited for one would never serve, and the read timeout fails the test.
    let (locked, is_locked) = std::sync::mpsc::channel();
    let (done, is_done) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let guards: Vec<_> = states.iter().map(|s| s.lock_health()).collect();
        locked.send(()).expect("the test waits for the locks");
        // Returns when the test is done (or has panicked and dropped `done`).
        let _ = is_done.recv();
        drop(guards);
    });
    is_locked.recv().expect("the holder thread locks");

    for _ in 0..20 {
        let mut client = std::net::TcpStream::connect(lb_addr).expect("connect");
        assert_greeted(&mut client, "served while every health lock is held");
    }
    let refusing_state = &pool.pools()[0].backends()[1].stats;
    assert!(refusing_state.counters().connect_failures >= 2);
    assert!(
        woken.try_recv().is_ok(),
        "the threshold asked for a republish"
    );
    drop(done);
    holder.join().expect("the holder thread ends");
}

#[cfg(target_os = "linux")]
/// The congestion control of this process's TCP socket from `local` to `peer`, found among
/// its descriptors (a copy of each is taken with `pidfd_getfd`, which needs no `unsafe`).
fn congestion_control_of(local: SocketAddr, peer: SocketAddr) -> Option<String> {
    use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};
    let me = pidfd_open(getpid(), PidfdFlags::empty()).expect("pidfd_open");
    let addr = |a: Option<rustix::net::SocketAddrAny>| a.and_then(|a| SocketAddr::try_from(a).ok());
    for entry in std::fs::read_dir("/proc/self/fd").expect("list descriptors") {
        let Some(fd) = entry
            .ok()
            .and_then(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        else {
            continue;
        };
        let Ok(copy) = pidfd_getfd(&me, fd, PidfdGetfdFlags::empty()) else {
            continue;
        };
        if addr(rustix::net::getsockname(&copy).ok()) == Some(local)
            && addr(rustix::net::getpeername(&copy).ok().flatten()) == Some(peer)
        {
            return rustix::net::sockopt::tcp_congestion(&copy).ok();
        }
    }
    None
}

/// `backend_congestion_control` reaches the socket toward the backend, and only that one.
/// (The algorithm is set before `connect`, so it is in place once the backend accepts.)
#[cfg(target_os = "linux")]
#[test]
fn the_backend_socket_gets_the_configured_congestion_control() {
    // An algorithm this process may set that differs from the system's, so the test tells
    // the two apart (Reno is always allowed; on a machine whose default is Reno and that
    // allows nothing else, there is no second one to tell apart).
    let sysctl =
        |name: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).expect("sysctl");
    let default = sysctl("tcp_congestion_control").trim().to_owned();
    let allowed = sysctl("tcp_allowed_congestion_control");
    let chosen = allowed
        .split_whitespace()
        .find(|cc| *cc != default)
        .unwrap_or("reno")
        .to_owned();

    let backend = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a backend");
    let backend_addr = backend.local_addr().expect("backend address");
    let text = format!(
        "[[listener]]\nname = \"lb\"\nbind = \"127.0.0.1:0\"\n\
         backend_congestion_control = \"{chosen}\"\n\
         [[listener.backend]]\naddr = \"{backend_addr}\"\n"
    );
    let (_workers, lb_addr, _pool, _woken) = one_worker(&text);
    let client = std::net::TcpStream::connect(lb_addr).expect("connect");
    let (_accepted, balancer_side) = backend.accept().expect("the balancer connects");

    assert_eq!(
        congestion_control_of(balancer_side, backend_addr).as_deref(),
        Some(chosen.as_str()),
        "the balancer's socket toward the backend"
    );
    let client_addr = client.local_addr().expect("client address");
    assert_eq!(
        congestion_control_of(lb_addr, client_addr),
        Some(default),
        "the balancer's socket toward the client keeps the system's"
    );
}

#[test]
fn a_timeout_too_long_for_the_clock_means_never() {
    let now = Instant::now();
    assert!(later(now, Duration::MAX) > now + Duration::from_secs(3600 * 24 * 365));
    assert_eq!(
        later(now, Duration::from_secs(1)),
        now + Duration::from_secs(1)
    );
}

#[test]
fn tokens_keep_the_side_and_the_attempt_parity() {
    for side in [
        Side::Client,
        Side::Backend { odd_attempt: false },
        Side::Backend { odd_attempt: true },
    ] {
        assert_eq!(Side::from_bits(side.bits() | 0b1100), side);
    }
    assert_ne!(Side::backend(1), Side::backend(2));
    assert_eq!(Side::backend(1), Side::backend(3));
}
