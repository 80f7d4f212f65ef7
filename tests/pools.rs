//! Pools, slots and the queue, end to end over loopback: clients beyond a pool's slots wait in
//! its queue and are served first come, first served across worker threads; a client that
//! leaves, waits too long or finds the queue full is counted; listeners share a pool's slots;
//! reloads, drains and the load a server reports move slots.

#[allow(dead_code)] // Only `Mock` and its options are used here, not the example's `main`.
#[path = "../examples/mock_inference.rs"]
mod mock_inference;
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::{
    LISTENER, Mock, Running, assert_closed_without_data, bounded, connect_identify, eventually,
    eventually_eq, within,
};
use weighbridge::{AdminState, Config, QueueCounters};

/// Overall bound on each test.
const LIMIT: Duration = Duration::from_secs(30);
/// How long something the balancer does at once may take to show.
const SOON: Duration = Duration::from_secs(5);

/// A config with one `[[pool]]` named `gpu` and listeners `names` sending to it; `pool_keys`
/// are extra lines of the pool table; each backend is (address, slots).
fn pool_config(pool_keys: &str, backends: &[(SocketAddr, Option<u32>)], names: &[&str]) -> String {
    let mut text = format!(
        "shutdown_grace = \"2s\"\nthreads = 2\n[[pool]]\nname = \"gpu\"\n\
         strategy = \"capacity_proportional\"\n{pool_keys}\n"
    );
    for (addr, slots) in backends {
        text.push_str(&format!("[[pool.backend]]\naddr = \"{addr}\"\n"));
        if let Some(slots) = slots {
            text.push_str(&format!("max_connections = {slots}\n"));
        }
    }
    for name in names {
        text.push_str(&format!(
            "[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\npool = \"gpu\"\n"
        ));
    }
    text
}

fn start(text: &str) -> Running {
    let config = Config::parse(text, Path::new("test.toml"))
        .unwrap_or_else(|e| panic!("test config must be valid: {e}\n{text}"));
    Running::try_start(&config, None, LISTENER).expect("bind the balancer on loopback")
}

fn queue(lb: &Running) -> QueueCounters {
    lb.handle.queue_counters("gpu").expect("pool gpu")
}

/// Connects a client that the balancer accepts and puts in the queue (the `n`th waiting one).
async fn enqueue(lb: &Running, addr: SocketAddr, n: u64) -> TcpStream {
    let stream = within(TcpStream::connect(addr))
        .await
        .expect("the balancer accepts while every slot is taken");
    eventually_eq(SOON, "clients waiting", n, || queue(lb).length).await;
    stream
}

/// Reads the backend's one-byte greeting: the client got a slot and reached the backend.
async fn greeted(stream: &mut TcpStream) -> u8 {
    let mut id = [0_u8; 1];
    within(stream.read_exact(&mut id))
        .await
        .expect("a slot and the backend's greeting");
    id[0]
}

/// A balancer whose pool (with `tables`) has one slot on a mock inference server and one on a
/// port that refuses.
async fn one_slot_each_on_a_server_and_a_refusing_port(
    tables: &str,
) -> (mock_inference::Mock, support::Refusing, Running) {
    let up = mock_inference::Mock::start(
        "127.0.0.1:0".parse().expect("literal"),
        mock_inference::MockOptions::default(),
    )
    .await
    .expect("mock inference server");
    let down = support::Refusing::new();
    let lb = start(&pool_config(
        tables,
        &[(up.addr(), Some(1)), (down.addr, Some(1))],
        &[LISTENER],
    ));
    (up, down, lb)
}

/// Starts a server where `down` refused and checks that `waiting`, the one client in the queue,
/// is served from the queue by it.
async fn served_by_a_server_started_at(
    lb: &Running,
    mut waiting: TcpStream,
    down: support::Refusing,
) {
    let down_addr = down.addr;
    drop(down);
    let _second = mock_inference::Mock::start(down_addr, mock_inference::MockOptions::default())
        .await
        .expect("the second server on the freed port");
    eventually_eq(SOON, "served from the queue", 1, || queue(lb).served).await;
    waiting
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut answer = String::new();
    within(waiting.read_to_string(&mut answer))
        .await
        .expect("answer");
    assert!(
        answer.contains(&format!("served by {down_addr}")),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freed_slots_go_to_the_oldest_waiting_client_whichever_worker_holds_it() {
    bounded(LIMIT, async {
        let mock = Mock::identify(7).await;
        let lb = start(&pool_config(
            "queue_timeout = \"20s\"",
            &[(mock.addr, Some(1))],
            &[LISTENER],
        ));
        let (holder, id) = connect_identify(lb.addr).await;
        assert_eq!(id, 7);
        let mut waiting = Vec::new();
        for n in 1..=8 {
            waiting.push(enqueue(&lb, lb.addr, n).await);
        }
        // Eight long-lived clients over two workers: both hold some (connections move to the
        // less loaded worker at accept), so the order below is kept across threads.
        eventually(SOON, "both workers hold clients", || {
            lb.handle.worker_connections().iter().all(|&n| n > 0)
        })
        .await;
        drop(holder);
        for (n, mut client) in waiting.into_iter().enumerate() {
            // Only one slot: the client greeted is the one the slot went to.
            assert_eq!(greeted(&mut client).await, 7, "client {n}");
            eventually_eq(SOON, "clients left waiting", 7 - n as u64, || {
                queue(&lb).length
            })
            .await;
            assert_eq!(mock.open(), 1, "one slot, one connection at the backend");
            drop(client);
        }
        let q = queue(&lb);
        assert_eq!((q.queued, q.served, q.length), (8, 8, 0));
        assert_eq!(mock.accepted(), 9);
        lb.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_leave_wait_too_long_or_find_the_queue_full_are_counted_and_never_reach_a_backend()
 {
    bounded(LIMIT, async {
        let mock = Mock::identify(1).await;
        let lb = start(&pool_config(
            "queue_timeout = \"500ms\"\nmax_queued = 1",
            &[(mock.addr, Some(1))],
            &[LISTENER],
        ));
        let (holder, _) = connect_identify(lb.addr).await;

        // Full: one waits already, the next is closed at once.
        let leaving = enqueue(&lb, lb.addr, 1).await;
        let mut refused = within(TcpStream::connect(lb.addr)).await.expect("accepted");
        assert_closed_without_data(&mut refused, SOON).await;
        assert_eq!(queue(&lb).full, 1);
        assert_eq!(lb.listener().rejected_queue_full, 1);

        // Abandoned: the waiting client goes away and is out of the queue.
        drop(leaving);
        eventually_eq(SOON, "abandoned", 1, || queue(&lb).abandoned).await;
        assert_eq!(queue(&lb).length, 0);

        // Timed out: closed after queue_timeout, counted with its reason. What it sent while
        // waiting is dropped, so it sees the connection closed, not reset.
        let mut late = enqueue(&lb, lb.addr, 1).await;
        late.write_all(b"a request nobody reads")
            .await
            .expect("send");
        let mut buf = [0_u8; 16];
        let read = tokio::time::timeout(SOON, late.read(&mut buf))
            .await
            .expect("closed within the queue timeout");
        assert!(matches!(read, Ok(0)), "a clean close, not {read:?}");
        assert_eq!(queue(&lb).timed_out, 1);
        assert_eq!(lb.listener().rejected_queue_timeout, 1);

        // None of them took the slot: after the holder leaves, the next client is served.
        drop(holder);
        eventually_eq(SOON, "the holder's slot free", 0, || {
            lb.handle
                .pool_backend_counters("gpu", mock.addr)
                .map_or(1, |c| c.active)
        })
        .await;
        let (_next, id) = connect_identify(lb.addr).await;
        assert_eq!(id, 1);
        assert_eq!(
            mock.accepted(),
            2,
            "only the holder and the last client reached it"
        );
        let q = queue(&lb);
        assert_eq!((q.queued, q.served), (2, 0));
        lb.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_timeout_zero_closes_at_once_when_every_slot_is_taken() {
    bounded(LIMIT, async {
        let mock = Mock::identify(1).await;
        let lb = start(&pool_config(
            "queue_timeout = \"0s\"",
            &[(mock.addr, Some(1))],
            &[LISTENER],
        ));
        let (_holder, _) = connect_identify(lb.addr).await;
        let mut refused = within(TcpStream::connect(lb.addr)).await.expect("accepted");
        assert_closed_without_data(&mut refused, SOON).await;
        let q = queue(&lb);
        assert_eq!((q.queued, q.full), (0, 1));
        assert_eq!(lb.listener().rejected_queue_full, 1);
        lb.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_listeners_share_one_pools_slots() {
    bounded(LIMIT, async {
        let mock = Mock::identify(3).await;
        let lb = start(&pool_config(
            "",
            &[(mock.addr, Some(2))],
            &[LISTENER, "second"],
        ));
        let second = lb.addr_of("second");
        let (first_a, _) = connect_identify(lb.addr).await;
        let (_first_b, _) = connect_identify(second).await;
        // Both slots are taken, one through each listener: a third client waits, on either.
        let mut third = enqueue(&lb, second, 1).await;
        assert_eq!(mock.open(), 2);
        drop(first_a);
        assert_eq!(greeted(&mut third).await, 3);
        let counters = lb
            .handle
            .pool_backend_counters("gpu", mock.addr)
            .expect("backend of gpu");
        assert_eq!(counters.active, 2);
        // The listener view reports the same backend state.
        assert_eq!(lb.backend(mock.addr).active, 2);
        lb.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_raising_slots_serves_waiting_clients_and_lowering_them_cuts_nothing() {
    bounded(LIMIT, async {
        let mock = Mock::identify(4).await;
        let text = |slots: u32| pool_config("", &[(mock.addr, Some(slots))], &[LISTENER]);
        let lb = start(&text(1));
        let (a, _) = connect_identify(lb.addr).await;
        let mut b = enqueue(&lb, lb.addr, 1).await;

        let reloaded = |slots| {
            let config = Config::parse(&text(slots), Path::new("test.toml")).expect("valid");
            lb.handle.apply(config)
        };
        let summary = reloaded(2).await.expect("reload to 2 slots");
        assert!(
            summary.to_string().contains("max_connections 1->2"),
            "{summary}"
        );
        assert_eq!(
            greeted(&mut b).await,
            4,
            "the new slot goes to the waiting client"
        );

        reloaded(1).await.expect("reload to 1 slot");
        // Two open on one slot: both go on, a newcomer waits.
        let mut c = enqueue(&lb, lb.addr, 1).await;
        assert_eq!(mock.open(), 2);
        drop(a);
        eventually_eq(SOON, "one connection at the backend", 1, || mock.open()).await;
        assert_eq!(queue(&lb).length, 1, "one open on one slot: still full");
        b.write_all(b"still here")
            .await
            .expect("b's stream goes on");
        let mut echo = [0_u8; 10];
        within(b.read_exact(&mut echo)).await.expect("echo");
        drop(b);
        assert_eq!(greeted(&mut c).await, 4);
        lb.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enabling_a_drained_backend_serves_the_queue_and_draining_takes_its_slots_away() {
    bounded(LIMIT, async {
        let mocks = Mock::identify_many(2).await;
        let (a, b) = (mocks[0].addr, mocks[1].addr);
        let lb = start(&pool_config("", &[(a, Some(1)), (b, Some(1))], &[LISTENER]));
        lb.handle
            .set_pool_admin_state("gpu", b, AdminState::Drained)
            .await
            .expect("drain b");
        let (_first, id) = connect_identify(lb.addr).await;
        assert_eq!(id, 0, "b is drained");
        let mut waiting = enqueue(&lb, lb.addr, 1).await;
        lb.handle
            .set_pool_admin_state("gpu", b, AdminState::Ready)
            .await
            .expect("enable b");
        assert_eq!(greeted(&mut waiting).await, 1, "b's free slot");
        lb.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_waiting_clients_at_once_and_counts_them() {
    bounded(LIMIT, async {
        let mock = Mock::identify(1).await;
        let lb = start(&pool_config("", &[(mock.addr, Some(1))], &[LISTENER]));
        let (_holder, _) = connect_identify(lb.addr).await;
        let mut waiting = enqueue(&lb, lb.addr, 1).await;
        let handle = lb.handle.clone();
        lb.shutdown.cancel();
        assert_closed_without_data(&mut waiting, SOON).await;
        let counters = handle.listener_counters(LISTENER).expect("listener lb");
        assert_eq!(counters.rejected_shutdown, 1);
        assert_eq!(handle.queue_counters("gpu").map(|q| q.closed), Some(1));
    })
    .await;
}

/// The load a server reports beyond this balancer's connections takes slots, and slots come
/// back when the report falls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_in_flight_requests_take_slots_until_the_server_reports_them_done() {
    bounded(LIMIT, async {
        let options = mock_inference::MockOptions {
            waiting: Some(3),
            ..Default::default()
        };
        let server = mock_inference::Mock::start("127.0.0.1:0".parse().expect("literal"), options)
            .await
            .expect("mock inference server");
        let addr = server.addr();
        let tables = "[pool.health]\nkind = \"tcp\"\ninterval = \"50ms\"\n\
                      [pool.health.load]\nmetric = \"vllm:num_requests_waiting\"\n\
                      in_flight_metrics = [\"vllm:num_requests_waiting\"]\ninterval = \"50ms\"";
        let lb = start(&pool_config(tables, &[(addr, Some(4))], &[LISTENER]));
        eventually(SOON, "the reported load in the estimate", || {
            lb.handle.load_estimate("gpu", addr) == Some(3)
        })
        .await;
        // One slot is left: the first client takes it, the second waits.
        let mut first = within(TcpStream::connect(lb.addr)).await.expect("accepted");
        eventually_eq(SOON, "first connected", 1, || {
            lb.handle
                .pool_backend_counters("gpu", addr)
                .map_or(0, |c| c.active)
        })
        .await;
        let mut second = enqueue(&lb, lb.addr, 1).await;
        // The other client's requests end: its slots come back, and the waiting client is served.
        server.state().set_waiting(Some(0));
        eventually_eq(SOON, "served from the queue", 1, || queue(&lb).served).await;
        for client in [&mut first, &mut second] {
            client
                .write_all(b"GET /generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .expect("request");
            let mut answer = String::new();
            within(client.read_to_string(&mut answer))
                .await
                .expect("answer");
            assert!(answer.contains("served by"), "{answer}");
        }
        lb.stop().await;
    })
    .await;
}

/// A backend that turns healthy gives its slots to the clients waiting for one; one that
/// turns unhealthy takes its slots away from new clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_turning_healthy_serves_the_queue() {
    bounded(LIMIT, async {
        let tables = "[pool.health]\nkind = \"tcp\"\ninterval = \"50ms\"\ntimeout = \"200ms\"\n\
                      rise = 1\nfall = 1\nstartup_grace = \"0s\"";
        let (up, down, lb) = one_slot_each_on_a_server_and_a_refusing_port(tables).await;
        let down_addr = down.addr;
        eventually(SOON, "the refusing backend out of rotation", || {
            lb.handle
                .backend_health(LISTENER, down_addr)
                .is_some_and(|h| !h.in_rotation())
        })
        .await;
        let _holder = within(TcpStream::connect(lb.addr)).await.expect("accepted");
        eventually_eq(SOON, "the healthy backend's slot taken", 1, || {
            lb.handle
                .pool_backend_counters("gpu", up.addr())
                .map_or(0, |c| c.active)
        })
        .await;
        let waiting = enqueue(&lb, lb.addr, 1).await;
        // The second server comes up where the refusing one was.
        served_by_a_server_started_at(&lb, waiting, down).await;
        lb.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejected_backend_gives_no_slots_and_serves_the_queue_when_its_ejection_ends() {
    bounded(LIMIT, async {
        let tables = "[pool.passive]\nmax_connect_failures = 1\neject_for = \"500ms\"";
        let (up, down, lb) = one_slot_each_on_a_server_and_a_refusing_port(tables).await;
        let down_addr = down.addr;
        // Whichever backend the first client tries first, it ends on the one that answers,
        // and the refusing one is ejected on its first refusal.
        let _holder = within(TcpStream::connect(lb.addr)).await.expect("accepted");
        eventually_eq(SOON, "the answering backend's slot taken", 1, || {
            lb.handle
                .pool_backend_counters("gpu", up.addr())
                .map_or(0, |c| c.active)
        })
        .await;
        // The refusing backend's free slot is tried (if the first client did not), refused,
        // and the client waits: an ejected backend's slots are not there to take.
        let waiting = enqueue(&lb, lb.addr, 1).await;
        eventually(SOON, "the refusing backend ejected", || {
            lb.handle
                .backend_health(LISTENER, down_addr)
                .is_some_and(|h| h.ejected)
        })
        .await;
        assert_eq!(
            queue(&lb).served,
            0,
            "nothing served while every slot is taken"
        );
        // The server comes back where the refusing one was; the ejection ends and the oldest
        // waiting client gets its slot.
        served_by_a_server_started_at(&lb, waiting, down).await;
        lb.stop().await;
    })
    .await;
}
