//! What keeps connections away from a backend or closes them: weight 0, refused connects,
//! idleness and `max_connections`.

#[macro_use]
mod support;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use support::{
    BOTH_WAYS, Mock, Refusing, SPLICE_AT_LEAST, assert_closed_without_data, black_hole, bounded,
    config, connect_identify, data_path_config, echo_random, eventually_eq, start_balancer,
};

/// Limit for every test here.
const LIMIT: Duration = Duration::from_secs(20);
/// How long counters may take to follow a closed connection.
const SETTLE: Duration = Duration::from_secs(5);
/// How long a rejected connection may take to be closed.
const CLOSE_WITHIN: Duration = Duration::from_secs(3);

const STRATEGIES: [&str; 3] = [
    "weighted_round_robin",
    "weighted_random",
    "capacity_proportional",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_zero_backend_gets_no_connection_under_any_strategy() {
    bounded(LIMIT, async {
        for strategy in STRATEGIES {
            let mocks = Mock::identify_many(3).await;
            let lb = start_balancer(&config(
                strategy,
                "",
                &[
                    (mocks[0].addr, 1.0),
                    (mocks[1].addr, 0.0),
                    (mocks[2].addr, 2.0),
                ],
            ));
            let mut held = Vec::new();
            for _ in 0..100 {
                let (stream, id) = connect_identify(lb.addr).await;
                assert_ne!(id, 1, "{strategy}: the weight-0 backend was picked");
                // Held open so that capacity_proportional sees load and spreads it.
                held.push(stream);
            }
            let accepted: Vec<usize> = mocks.iter().map(Mock::accepted).collect();
            assert_eq!(accepted[1], 0, "{strategy}: {accepted:?}");
            assert!(
                accepted[0] > 0 && accepted[2] > 0,
                "{strategy}: every weighted backend serves: {accepted:?}"
            );
            assert_eq!(accepted[0] + accepted[2], 100, "{strategy}: {accepted:?}");
            let zero = lb.backend(mocks[1].addr);
            assert_eq!(
                (zero.connections, zero.connect_failures),
                (0, 0),
                "{strategy}"
            );
            drop(held);
            eventually_eq(SETTLE, "connections closed", 0, || lb.listener().open).await;
            assert_eq!(lb.stop().await.cut_connections, 0);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_backend_is_skipped_and_every_client_is_served() {
    bounded(LIMIT, async {
        for strategy in STRATEGIES {
            let mocks = Mock::identify_many(2).await;
            let refusing = Refusing::new();
            let lb = start_balancer(&config(
                strategy,
                "connect_attempts = 3",
                &[
                    (mocks[0].addr, 1.0),
                    (refusing.addr, 1.0),
                    (mocks[1].addr, 1.0),
                ],
            ));
            for client in 0..50 {
                let (_stream, id) = connect_identify(lb.addr).await;
                assert!(id < 2, "{strategy}: client {client} got id {id}");
            }
            let dead = lb.backend(refusing.addr);
            assert_eq!(dead.connections, 0, "{strategy}");
            assert!(
                dead.connect_failures > 0,
                "{strategy}: the refusing backend was never tried, so nothing was skipped"
            );
            let served: usize = mocks.iter().map(Mock::accepted).sum();
            assert_eq!(served, 50, "{strategy}");
            let listener = lb.listener();
            assert_eq!(
                (listener.accepted, listener.rejected_no_backend),
                (50, 0),
                "{strategy}"
            );
            eventually_eq(SETTLE, "connections closed", 0, || lb.listener().open).await;
            assert_eq!(lb.stop().await.cut_connections, 0);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_is_closed_when_every_backend_refuses() {
    bounded(LIMIT, async {
        let refusing = [Refusing::new(), Refusing::new()];
        let lb = start_balancer(&config(
            "weighted_round_robin",
            "connect_attempts = 3",
            &[(refusing[0].addr, 1.0), (refusing[1].addr, 1.0)],
        ));
        for n in 1..=3 {
            let mut client = TcpStream::connect(lb.addr)
                .await
                .expect("the listener accepts");
            assert_closed_without_data(&mut client, CLOSE_WITHIN).await;
            eventually_eq(SETTLE, "rejected_no_backend", n, || {
                lb.listener().rejected_no_backend
            })
            .await;
        }
        for dead in &refusing {
            // Each client tried both backends once: attempts are over distinct backends.
            eventually_eq(SETTLE, "connect failures", (0, 3, 0), || {
                let c = lb.backend(dead.addr);
                (c.connections, c.connect_failures, c.active)
            })
            .await;
        }
        // The worker lets go of a connection's count just after it has closed the client and
        // counted the rejection, so the count may lag what the client saw by a moment.
        eventually_eq(SETTLE, "connections closed", 0, || lb.listener().open).await;
        assert_eq!(lb.stop().await.cut_connections, 0);
    })
    .await;
}

/// A backend that never answers the handshake is given up on after `connect_timeout` and the
/// client is served by the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_moves_on_to_the_next_backend() {
    bounded(LIMIT, async {
        let (_hole, hole_addr, fillers) = black_hole().await;
        let mock = Mock::identify(5).await;
        let lb = start_balancer(&config(
            "weighted_round_robin",
            "connect_timeout = \"200ms\"\nconnect_attempts = 2",
            &[(hole_addr, 1.0), (mock.addr, 1.0)],
        ));
        // Round robin sends every other client to the black hole first.
        for client in 0..4 {
            let (_stream, id) = connect_identify(lb.addr).await;
            assert_eq!(id, 5, "client {client}");
        }
        let hole = lb.backend(hole_addr);
        assert_eq!((hole.connections, hole.connect_failures), (0, 2));
        assert_eq!(lb.backend(mock.addr).connections, 4);
        fillers.iter().for_each(tokio::task::JoinHandle::abort);
    })
    .await;
}

/// The idle timeout runs from the connect, even when it is shorter than the connect timeout the
/// connection started with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_shorter_than_connect_timeout_still_applies() {
    bounded(LIMIT, async {
        let mock = Mock::identify(3).await;
        let lb = start_balancer(&config(
            "weighted_round_robin",
            "idle_timeout = \"300ms\"\nconnect_timeout = \"30s\"",
            &[(mock.addr, 1.0)],
        ));
        let started = Instant::now();
        let (mut client, id) = connect_identify(lb.addr).await;
        assert_eq!(id, 3);
        // Well before the 30 s connect timeout: the idle timer was not left behind it.
        assert_closed_without_data(&mut client, Duration::from_secs(10)).await;
        assert!(started.elapsed() >= IDLE, "closed before the idle timeout");
        assert_eq!(lb.stop().await.cut_connections, 0);
    })
    .await;
}

/// Idle timeout of the idle tests.
const IDLE: Duration = Duration::from_millis(300);

/// A connection that has moved bulk data both ways and then goes quiet.
async fn idle_connection_is_closed_on_both_sides(splice: bool) {
    bounded(LIMIT, async {
        let mock = Mock::identify(7).await;
        let lb = start_balancer(&data_path_config(
            splice,
            "idle_timeout = \"300ms\"",
            &[(mock.addr, 1.0)],
        ));
        let started = Instant::now();
        let (mut client, id) = connect_identify(lb.addr).await;
        assert_eq!(id, 7);
        echo_random(&mut client, 7, SPLICE_AT_LEAST)
            .await
            .expect("bulk data comes back before the connection goes idle");
        assert_closed_without_data(&mut client, Duration::from_secs(5)).await;
        // The idle clock starts after `started`, so closing can't come sooner than this.
        let elapsed = started.elapsed();
        assert!(
            elapsed >= IDLE,
            "closed after {elapsed:?}, before the idle timeout"
        );
        eventually_eq(SETTLE, "the backend's end of stream", (1, 0), || {
            (mock.eofs(), mock.open())
        })
        .await;
        eventually_eq(SETTLE, "connection no longer counted", (0, 0), || {
            (lb.listener().open, lb.backend(mock.addr).active)
        })
        .await;
        lb.assert_data_path(mock.addr, splice, &BOTH_WAYS).await;
        assert_eq!(lb.stop().await.cut_connections, 0);
    })
    .await;
}

async fn connection_with_steady_traffic_outlives_the_idle_timeout(splice: bool) {
    bounded(LIMIT, async {
        let mock = Mock::identify(7).await;
        let lb = start_balancer(&data_path_config(
            splice,
            "idle_timeout = \"300ms\"",
            &[(mock.addr, 1.0)],
        ));
        let (mut client, _) = connect_identify(lb.addr).await;
        let started = Instant::now();
        echo_random(&mut client, 7, SPLICE_AT_LEAST)
            .await
            .expect("bulk data comes back");
        // Pacing traffic, not synchronizing: one byte per 100 ms for over three idle periods.
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        for n in 0..12_u8 {
            tick.tick().await;
            client
                .write_all(&[n])
                .await
                .expect("send a keep-alive byte");
            let mut echo = [0_u8; 1];
            client
                .read_exact(&mut echo)
                .await
                .expect("the busy connection stays open");
            assert_eq!(echo, [n]);
        }
        assert!(
            started.elapsed() >= IDLE * 3,
            "the test must outlast the timeout"
        );
        assert_eq!((mock.open(), mock.eofs()), (1, 0));
        assert_eq!(lb.listener().open, 1);
        drop(client);
        eventually_eq(SETTLE, "connection closed", 0, || lb.listener().open).await;
        lb.assert_data_path(mock.addr, splice, &BOTH_WAYS).await;
        assert_eq!(lb.stop().await.cut_connections, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_max_are_closed_at_once_until_one_frees_up() {
    bounded(LIMIT, async {
        let mock = Mock::identify(7).await;
        let lb = start_balancer(&config(
            "weighted_round_robin",
            "max_connections = 5",
            &[(mock.addr, 1.0)],
        ));
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(connect_identify(lb.addr).await.0);
        }
        assert_eq!(lb.listener().open, 5);

        let mut sixth = TcpStream::connect(lb.addr)
            .await
            .expect("the kernel accepts the sixth");
        assert_closed_without_data(&mut sixth, CLOSE_WITHIN).await;
        eventually_eq(SETTLE, "rejected_max_connections", 1, || {
            lb.listener().rejected_max_connections
        })
        .await;
        assert_eq!(mock.accepted(), 5, "the rejected client reached no backend");
        // The held ones are unaffected.
        let probe = &mut held[0];
        probe.write_all(b"ping").await.expect("send on a held one");
        let mut echo = [0_u8; 4];
        probe
            .read_exact(&mut echo)
            .await
            .expect("echo on a held one");
        assert_eq!(&echo, b"ping");

        drop(held.pop());
        eventually_eq(SETTLE, "a slot freed", 4, || lb.listener().open).await;
        let (replacement, id) = connect_identify(lb.addr).await;
        assert_eq!(id, 7);
        held.push(replacement);
        let c = lb.listener();
        assert_eq!((c.open, c.accepted, c.rejected_max_connections), (5, 7, 1));
        drop(held);
        eventually_eq(SETTLE, "connections closed", 0, || lb.listener().open).await;
        assert_eq!(lb.stop().await.cut_connections, 0);
    })
    .await;
}

on_both_paths!(
    idle_connection_is_closed_on_both_sides,
    connection_with_steady_traffic_outlives_the_idle_timeout,
);
