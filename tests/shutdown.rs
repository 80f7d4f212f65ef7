//! SIGTERM on the real binary: it stops accepting at once, lets open connections finish within
//! the grace period, cuts what is left after it, and exits 0 either way.

mod support;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use rustix::process::Signal;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use support::{
    LOG_WITHIN, Mock, Process, assert_closed_without_data, black_hole, bounded, command,
    config_file, connect_identify, echo, eventually, eventually_async,
};

/// Limit for every test here.
const LIMIT: Duration = Duration::from_secs(30);

/// A config file with one listener on an ephemeral port in front of `backend`.
fn config_with_grace(grace: &str, backend: SocketAddr) -> tempfile::NamedTempFile {
    config_file(&format!(
        "shutdown_grace = \"{grace}\"\n[[listener]]\nname = \"lb\"\nbind = \"127.0.0.1:0\"\n\
         [[listener.backend]]\naddr = \"{backend}\"\n"
    ))
}

/// Sends `message` through an echo backend and checks it comes back.
async fn round_trip(stream: &mut TcpStream, message: &[u8]) {
    echo(stream, message)
        .await
        .expect("the message comes back through the balancer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_but_open_connections_finish_and_exit_is_0() {
    bounded(LIMIT, async {
        let echo = Mock::echo().await;
        let config = config_with_grace("30s", echo.addr);
        let mut wb = Process::start(config.path(), &[]);
        let addr = wb.listening("lb").await;
        let mut held = TcpStream::connect(addr)
            .await
            .expect("connect to the balancer");
        round_trip(&mut held, b"before SIGTERM").await;

        wb.terminate();
        eventually_async(
            Duration::from_secs(10),
            "new connects refused",
            || async move {
                matches!(
                    TcpStream::connect(addr).await,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused
                )
            },
        )
        .await;
        eventually(Duration::from_secs(5), "the draining log line", || {
            wb.logged("stopped accepting").is_some()
        })
        .await;
        // Draining: the open connection still relays both ways, the process waits for it.
        round_trip(&mut held, b"after the listener closed").await;
        round_trip(&mut held, &[0xab; 100_000]).await;
        assert!(wb.running(), "exited while a connection was open");

        drop(held);
        // Far less than the 30 s grace: the exit follows the last connection, not the timer.
        let status = wb.exit_status(Duration::from_secs(10)).await;
        assert_eq!(status.code(), Some(0), "{status}");
        assert!(wb.logged("all connections finished").is_some());
        assert!(wb.logged("cut_connections=0").is_some());
    })
    .await;
}

/// `timeout` (and supervisors like it) signal the process and then its whole process group, so
/// one stop arrives as two SIGTERMs: that is still one graceful shutdown, not the operator's
/// "second signal, exit now".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_process_and_its_group_at_once_is_one_graceful_shutdown() {
    bounded(LIMIT, async {
        let echo = Mock::echo().await;
        let config = config_with_grace("30s", echo.addr);
        // In a process group of its own that it leads.
        let mut wb = Process::spawn(command(config.path(), &[]).process_group(0));
        let addr = wb.listening("lb").await;
        let mut held = TcpStream::connect(addr)
            .await
            .expect("connect to the balancer");
        round_trip(&mut held, b"before SIGTERM").await;

        wb.signal(Signal::TERM);
        wb.signal_group(Signal::TERM);
        eventually(Duration::from_secs(5), "the draining log line", || {
            wb.logged("stopped accepting").is_some()
        })
        .await;
        round_trip(&mut held, b"still served while draining").await;
        assert!(wb.running(), "exited while a connection was open");
        drop(held);
        let status = wb.exit_status(Duration::from_secs(10)).await;
        assert_eq!(status.code(), Some(0), "{status}");
        assert!(wb.logged("second signal").is_none());
        assert!(wb.logged("cut_connections=0").is_some());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_that_never_closes_is_cut_after_the_grace_period_and_exit_is_0() {
    bounded(LIMIT, async {
        let backend = Mock::identify(9).await;
        let config = config_with_grace("500ms", backend.addr);
        let mut wb = Process::start(config.path(), &[]);
        let addr = wb.listening("lb").await;
        let (mut held, id) = connect_identify(addr).await;
        assert_eq!(id, 9);

        let signalled = Instant::now();
        wb.terminate();
        let status = wb.exit_status(Duration::from_secs(5)).await;
        let took = signalled.elapsed();
        assert_eq!(status.code(), Some(0), "{status}");
        assert!(
            took >= Duration::from_millis(500),
            "exited {took:?} after SIGTERM, before the grace period ended"
        );
        assert!(wb.logged("cut_connections=1").is_some());
        // Both ends of the cut connection see it closed.
        assert_closed_without_data(&mut held, Duration::from_secs(3)).await;
        eventually(Duration::from_secs(3), "the backend's side closed", || {
            backend.open() == 0
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn grace_period_also_bounds_connections_still_connecting() {
    bounded(LIMIT, async {
        let (_hole, hole_addr, fillers) = black_hole().await;
        let config = support::config(
            "weighted_round_robin",
            "connect_timeout = \"20s\"\nconnect_attempts = 1",
            &[(hole_addr, 1.0)],
        )
        .replacen("shutdown_grace = \"5s\"", "shutdown_grace = \"300ms\"", 1);
        let lb = support::start_balancer(&config);
        let _client = TcpStream::connect(lb.addr)
            .await
            .expect("connect to the balancer");
        eventually(
            LOG_WITHIN,
            "the connection is counted as connecting",
            || lb.listener().open == 1,
        )
        .await;
        let started = Instant::now();
        let stopped = lb.stop().await;
        assert_eq!(stopped.cut_connections, 1);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "shutdown took {:?}; the connect timeout is 20 s",
            started.elapsed()
        );
        fillers.iter().for_each(JoinHandle::abort);
    })
    .await;
}

#[tokio::test]
async fn sigterm_right_after_listening_is_a_graceful_exit() {
    bounded(LIMIT, async {
        let backend = Mock::echo().await;
        let config = config_with_grace("30s", backend.addr);
        // A supervisor may signal the moment it sees `listening`; the handlers must be in place
        // by then, or the default action kills the process. A race, so try it several times.
        for attempt in 0..10 {
            let mut lb = Process::start(config.path(), &[]);
            lb.listening("lb").await;
            lb.terminate();
            let status = lb.exit_status(LOG_WITHIN).await;
            assert_eq!(status.code(), Some(0), "attempt {attempt}: {status}");
        }
    })
    .await;
}
