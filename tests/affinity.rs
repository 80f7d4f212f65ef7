//! `consistent_hash` over real sockets: clients bound to distinct loopback addresses land on
//! the same backend every time; removing a backend moves only its clients; a hot client
//! spills over within the balance factor; weights hold; a pool keyed by server name keeps a
//! name on its backend whatever address it comes from; routes reload for new connections only.

mod support;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use support::{Mock, Running, client_hello, eventually, records};
use weighbridge::Config;

const WAIT: Duration = Duration::from_secs(10);

/// Client addresses: 127.0.1.1, 127.0.1.2, ...
fn client(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x7f00_0100 + i + 1))
}

/// Opens a connection from `from` and reads the one-byte id of the backend that took it.
async fn open_from(from: IpAddr, lb: SocketAddr) -> (TcpStream, u8) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(from, 0))
        .expect("bind the client's address");
    let mut stream = tokio::time::timeout(WAIT, socket.connect(lb))
        .await
        .expect("connect in time")
        .expect("connect");
    let mut id = [0_u8; 1];
    tokio::time::timeout(WAIT, stream.read_exact(&mut id))
        .await
        .expect("id in time")
        .expect("the backend's id");
    (stream, id[0])
}

/// One connection from `from`, closed once the backend's id is read and the balancer has let
/// it go (the backend echoes nothing after the client's end).
async fn id_from(from: IpAddr, lb: SocketAddr) -> u8 {
    let (mut stream, id) = open_from(from, lb).await;
    stream.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
    id
}

fn config(backends: &[(SocketAddr, f64)], keys: &str) -> String {
    let mut text = format!(
        "shutdown_grace = \"1s\"\nthreads = 2\n[[listener]]\nname = \"hash\"\n\
         bind = \"127.0.0.1:0\"\npool = \"gpu\"\n[[pool]]\nname = \"gpu\"\n\
         strategy = \"consistent_hash\"\n{keys}\n"
    );
    for (addr, weight) in backends {
        text += &format!("[[pool.backend]]\naddr = \"{addr}\"\nweight = {weight}\n");
    }
    text
}

fn start(text: &str, listener: &str) -> Running {
    let config = Config::parse(text, Path::new("affinity.toml")).unwrap_or_else(|e| panic!("{e}"));
    Running::try_start(&config, None, listener).expect("bind on loopback")
}

const CLIENTS: u32 = 120;

/// Where each client address lands, one connection each, one at a time: each is let go by the
/// balancer before the next opens, so the load bound (at one open connection, about one per
/// backend) never moves a client.
async fn placement(lb: &Running) -> Vec<u8> {
    let mut ids = Vec::with_capacity(CLIENTS as usize);
    for i in 0..CLIENTS {
        ids.push(id_from(client(i), lb.addr).await);
        eventually(WAIT, "the connection let go", || pool_open(lb) == 0).await;
    }
    ids
}

/// Connections open to the pool's backends.
fn pool_open(lb: &Running) -> u64 {
    let status = lb.handle.effective_weights("hash").unwrap_or_default();
    status
        .iter()
        .map(|&(addr, _)| {
            lb.handle
                .pool_backend_counters("gpu", addr)
                .map_or(0, |c| c.active)
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stays_on_its_backend_and_a_removed_backend_moves_only_its_clients() {
    let mocks = Mock::identify_many(4).await;
    let backends: Vec<(SocketAddr, f64)> = mocks.iter().map(|m| (m.addr, 1.0)).collect();
    let lb = start(&config(&backends, ""), "hash");
    let first = placement(&lb).await;
    assert_eq!(
        placement(&lb).await,
        first,
        "every client lands where it did"
    );
    let mut per_backend = [0_u32; 4];
    for &id in &first {
        per_backend[usize::from(id)] += 1;
    }
    assert!(
        per_backend.iter().all(|&n| n >= 10),
        "spread: {per_backend:?}"
    );
    // Backend 2 goes: its clients move, nobody else does.
    let fewer: Vec<(SocketAddr, f64)> = backends
        .iter()
        .copied()
        .filter(|&(a, _)| a != mocks[2].addr)
        .collect();
    let new = Config::parse(&config(&fewer, ""), Path::new("affinity.toml")).expect("valid");
    lb.handle.apply(new).await.expect("reload applies");
    let after = placement(&lb).await;
    for (i, (&before, &now)) in first.iter().zip(&after).enumerate() {
        if before == 2 {
            assert_ne!(now, 2, "client {i} left the removed backend");
        } else {
            assert_eq!(now, before, "client {i} stayed where it was");
        }
    }
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_decide_the_share_of_clients() {
    let mocks = Mock::identify_many(2).await;
    let backends = [(mocks[0].addr, 1.0), (mocks[1].addr, 3.0)];
    let lb = start(&config(&backends, ""), "hash");
    let ids = placement(&lb).await;
    let heavy = ids.iter().filter(|&&id| id == 1).count() as f64 / f64::from(CLIENTS);
    assert!(
        (0.6..0.9).contains(&heavy),
        "weight 3 of 4 took {heavy:.2} of the clients"
    );
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_client_spills_over_within_the_balance_factor() {
    let mocks = Mock::identify_many(4).await;
    let backends: Vec<(SocketAddr, f64)> = mocks.iter().map(|m| (m.addr, 1.0)).collect();
    let lb = start(&config(&backends, "hash_balance_factor = 1.25"), "hash");
    let hot = client(7);
    let home = id_from(hot, lb.addr).await;
    eventually(WAIT, "the first connection let go", || {
        backends.iter().all(|&(a, _)| {
            lb.handle
                .pool_backend_counters("gpu", a)
                .is_some_and(|c| c.active == 0)
        })
    })
    .await;
    let mut held = Vec::new();
    let mut per_backend = [0_u32; 4];
    for n in 0..60_u32 {
        let (stream, id) = open_from(hot, lb.addr).await;
        per_backend[usize::from(id)] += 1;
        held.push(stream);
        // Each backend within ceil(1.25 × open / 4), counted after this connection.
        let bound = (1.25 * f64::from(n + 1) / 4.0).ceil() as u32;
        assert!(
            per_backend.iter().all(|&c| c <= bound),
            "{per_backend:?} over the bound {bound} at {} open",
            n + 1
        );
    }
    assert!(
        per_backend[usize::from(home)] >= 15,
        "home kept its share: {per_backend:?}"
    );
    // Plain consistent hashing keeps every connection home.
    let plain = start(&config(&backends, "hash_balance_factor = 0"), "hash");
    let mut ids = Vec::new();
    let mut held_plain = Vec::new();
    for _ in 0..20 {
        let (stream, id) = open_from(hot, plain.addr).await;
        ids.push(id);
        held_plain.push(stream);
    }
    assert!(ids.iter().all(|&id| id == home), "{ids:?}");
    drop((held, held_plain));
    lb.stop().await;
    plain.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_keyed_by_server_name_keeps_a_name_on_its_backend_from_any_address() {
    let mocks = [Mock::echo().await, Mock::echo().await, Mock::echo().await];
    let backends: Vec<(SocketAddr, f64)> = mocks.iter().map(|m| (m.addr, 1.0)).collect();
    // No load bound: the ten connections of a name are open at once.
    let lb = start(
        &config(&backends, "hash_key = \"sni\"\nhash_balance_factor = 0"),
        "hash",
    );
    let connections = |addr: SocketAddr| {
        lb.handle
            .pool_backend_counters("gpu", addr)
            .map_or(0, |c| c.connections)
    };
    let mut homes: HashMap<&str, SocketAddr> = HashMap::new();
    for name in [
        "a.example.com",
        "b.example.com",
        "c.example.com",
        "d.example.com",
    ] {
        let before: Vec<u64> = backends.iter().map(|&(a, _)| connections(a)).collect();
        for i in 0..10 {
            let socket = TcpSocket::new_v4().expect("socket");
            socket.bind(SocketAddr::new(client(i), 0)).expect("bind");
            let mut stream = socket.connect(lb.addr).await.expect("connect");
            let bytes = records(&client_hello(name, 0), 16_384);
            stream.write_all(&bytes).await.expect("write");
            let mut back = vec![0_u8; bytes.len()];
            tokio::time::timeout(WAIT, stream.read_exact(&mut back))
                .await
                .expect("echo in time")
                .expect("echo");
        }
        let gained: Vec<SocketAddr> = backends
            .iter()
            .zip(&before)
            .filter(|&(&(a, _), &b)| connections(a) > b)
            .map(|(&(a, _), _)| a)
            .collect();
        assert_eq!(
            gained.len(),
            1,
            "{name}: ten connections from ten addresses, one backend"
        );
        homes.insert(name, gained[0]);
    }
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_reload_for_new_connections_and_open_ones_stay() {
    let (a, b) = (Mock::identify(0).await, Mock::identify(1).await);
    let routes = |to: &str| {
        format!(
            "shutdown_grace = \"1s\"\nthreads = 2\n[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\n\
             [[listener.route]]\nsni = [\"x.example.com\"]\npool = \"a\"\n\
             [[listener.route]]\npool = \"{to}\"\n\
             [[pool]]\nname = \"a\"\n[[pool.backend]]\naddr = \"{}\"\n\
             [[pool]]\nname = \"b\"\n[[pool.backend]]\naddr = \"{}\"\n",
            a.addr, b.addr
        )
    };
    let lb = start(&routes("a"), "tls");
    // A client that speaks no TLS first takes the default route.
    let mut open = TcpStream::connect(lb.addr).await.expect("connect");
    open.write_all(b"hello").await.expect("write");
    let mut id = [0_u8; 1];
    open.read_exact(&mut id).await.expect("id");
    assert_eq!(id[0], 0);
    let new = Config::parse(&routes("b"), Path::new("affinity.toml")).expect("valid");
    lb.handle.apply(new).await.expect("reload applies");
    let mut next = TcpStream::connect(lb.addr).await.expect("connect");
    next.write_all(b"hello").await.expect("write");
    next.read_exact(&mut id).await.expect("id");
    assert_eq!(id[0], 1, "a new connection takes the new default route");
    // The open one still relays to its backend.
    open.write_all(b"still").await.expect("write");
    let mut back = [0_u8; 10];
    tokio::time::timeout(WAIT, open.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&back, b"hellostill");
    lb.stop().await;
}
