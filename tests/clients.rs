//! Who is calling, end to end over loopback: PROXY headers accepted from trusted peers (v1, v2,
//! split into single bytes, LOCAL), refused when missing, malformed, late or untrusted (no
//! backend ever sees a byte of those), written to backends (per listener, overridden per
//! backend), and allow/deny lists by client address (clients bound to distinct 127.0.0.x).

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ppp::HeaderResult;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use support::{LISTENER, Running, assert_closed_without_data, bounded, eventually_eq, within};
use weighbridge::{Config, ListenerCounters};

const LIMIT: Duration = Duration::from_secs(30);
const SOON: Duration = Duration::from_secs(5);

/// What a backend that reads a PROXY header saw on one connection: the header's source (or
/// `None` for LOCAL/UNKNOWN) and destination, and the bytes after it.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    source: Option<SocketAddr>,
    destination: Option<SocketAddr>,
    version: u8,
    rest: Vec<u8>,
}

/// A backend that expects a PROXY header on every connection, records what it carried, and
/// echoes what follows it.
struct HeaderBackend {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl HeaderBackend {
    async fn start() -> HeaderBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let record = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_header(stream, Arc::clone(&record)));
            }
        });
        HeaderBackend { addr, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

async fn serve_header(mut stream: TcpStream, seen: Arc<Mutex<Vec<Seen>>>) {
    let mut buf = Vec::new();
    let mut chunk = [0_u8; 1024];
    let (source, destination, version, len) = loop {
        let Ok(n) = stream.read(&mut chunk).await else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        match read_header(&buf) {
            Some((version, len, addresses)) => {
                break (addresses.map(|a| a.0), addresses.map(|a| a.1), version, len);
            }
            None if buf.len() < 16 || buf.starts_with(b"PROXY") && !buf.contains(&b'\n') => {}
            None => {
                // No header: record what came, as it came.
                seen.lock().expect("seen").push(Seen {
                    source: None,
                    destination: None,
                    version: 0,
                    rest: buf,
                });
                return;
            }
        }
    };
    let rest = buf[len..].to_vec();
    seen.lock().expect("seen").push(Seen {
        source,
        destination,
        version,
        rest: rest.clone(),
    });
    if stream.write_all(&rest).await.is_err() {
        return;
    }
    let mut chunk = [0_u8; 1024];
    while let Ok(n) = stream.read(&mut chunk).await {
        if n == 0 || stream.write_all(&chunk[..n]).await.is_err() {
            return;
        }
    }
}

fn start(text: &str) -> Running {
    let config = Config::parse(text, Path::new("test.toml"))
        .unwrap_or_else(|e| panic!("test config must be valid: {e}\n{text}"));
    Running::try_start(&config, None, LISTENER).expect("bind the balancer on loopback")
}

/// A listener named [`LISTENER`] with `keys`, in front of `backend` with `backend_keys`.
fn config(keys: &str, backend: SocketAddr, backend_keys: &str) -> String {
    format!(
        "shutdown_grace = \"1s\"\nthreads = 2\n[[listener]]\nname = \"{LISTENER}\"\n\
         bind = \"127.0.0.1:0\"\nconnect_timeout = \"500ms\"\n{keys}\n\
         [[listener.backend]]\naddr = \"{backend}\"\n{backend_keys}\n"
    )
}

/// A connection to `to` from the loopback address `from` (any 127.0.0.x).
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(from.parse().expect("address"), 0))
        .expect("bind the client's address");
    within(socket.connect(to)).await.expect("connect")
}

/// Writes `data` and reads the same number of bytes back.
async fn round_trip(stream: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    within(stream.write_all(data)).await.expect("write");
    let mut back = vec![0_u8; data.len()];
    within(stream.read_exact(&mut back))
        .await
        .expect("read back");
    back
}

fn counters(lb: &Running) -> ListenerCounters {
    lb.listener()
}

fn v1(source: &str, destination: &str) -> Vec<u8> {
    let (s, d): (SocketAddr, SocketAddr) = (
        source.parse().expect("address"),
        destination.parse().expect("address"),
    );
    ppp::v1::Addresses::from((s, d)).to_string().into_bytes()
}

fn v2(source: &str, destination: &str) -> Vec<u8> {
    let (s, d): (SocketAddr, SocketAddr) = (
        source.parse().expect("address"),
        destination.parse().expect("address"),
    );
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (s, d),
    )
    .build()
    .expect("v2 header")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_address_a_trusted_header_carries_is_the_client_sent_on_to_the_backend() {
    bounded(LIMIT, async {
        let backend = HeaderBackend::start().await;
        for (accept, header, send) in [
            ("v1", v1("192.0.2.7:51000", "198.51.100.1:443"), "v2"),
            ("v2", v2("192.0.2.7:51000", "198.51.100.1:443"), "v1"),
            ("any", v1("192.0.2.7:51000", "198.51.100.1:443"), "v1"),
            ("any", v2("[2001:db8::7]:51000", "[2001:db8::1]:443"), "v2"),
        ] {
            let lb = start(&config(
                &format!(
                    "accept_proxy = \"{accept}\"\nproxy_trusted = [\"127.0.0.0/8\"]\n\
                     send_proxy = \"{send}\""
                ),
                backend.addr,
                "",
            ));
            let before = backend.seen().len();
            let mut client = within(TcpStream::connect(lb.addr)).await.expect("connect");
            // The header one byte at a time, then the client's own bytes in the same write as
            // the header's last: only the header is taken off.
            let (last, head) = header.split_last().expect("a header");
            for byte in head {
                within(client.write_all(&[*byte])).await.expect("write");
                client.flush().await.expect("flush");
            }
            let mut tail = vec![*last];
            tail.extend_from_slice(b"hello");
            within(client.write_all(&tail)).await.expect("write");
            let mut back = [0_u8; 5];
            within(client.read_exact(&mut back)).await.expect("echo");
            assert_eq!(&back, b"hello");
            let seen = backend.seen()[before].clone();
            let source = header_source(&header);
            assert_eq!(seen.source, Some(source), "{accept} → {send}");
            assert_eq!(seen.version, if send == "v1" { 1 } else { 2 });
            lb.stop().await;
        }
    })
    .await;
}

/// A whole header at the start of `buf`: its version, length and (source, destination),
/// `None` for LOCAL or UNKNOWN.
type Read = (u8, usize, Option<(SocketAddr, SocketAddr)>);

fn read_header(buf: &[u8]) -> Option<Read> {
    let pair = |s: SocketAddr, d: SocketAddr| Some((s, d));
    match HeaderResult::parse(buf) {
        HeaderResult::V1(Ok(h)) => {
            let addresses = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => pair(
                    (a.source_address, a.source_port).into(),
                    (a.destination_address, a.destination_port).into(),
                ),
                ppp::v1::Addresses::Tcp6(a) => pair(
                    (a.source_address, a.source_port).into(),
                    (a.destination_address, a.destination_port).into(),
                ),
                ppp::v1::Addresses::Unknown => None,
            };
            Some((1, h.header.len(), addresses))
        }
        HeaderResult::V2(Ok(h)) => {
            let addresses = match h.addresses {
                ppp::v2::Addresses::IPv4(a) => pair(
                    (a.source_address, a.source_port).into(),
                    (a.destination_address, a.destination_port).into(),
                ),
                ppp::v2::Addresses::IPv6(a) => pair(
                    (a.source_address, a.source_port).into(),
                    (a.destination_address, a.destination_port).into(),
                ),
                _ => None,
            };
            Some((2, h.len(), addresses))
        }
        _ => None,
    }
}

/// The source address in a header the test wrote.
fn header_source(header: &[u8]) -> SocketAddr {
    read_header(header)
        .and_then(|(_, _, addresses)| addresses)
        .expect("a header with addresses")
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_malformed_late_and_untrusted_headers_are_closed_before_any_backend_work() {
    bounded(LIMIT, async {
        let backend = HeaderBackend::start().await;
        let lb = start(&config(
            "accept_proxy = \"any\"\nproxy_trusted = [\"127.0.0.1/32\"]",
            backend.addr,
            "",
        ));
        let too_long = format!("PROXY TCP4 {}", "1".repeat(200));
        let cases: [(&str, &[u8]); 4] = [
            ("no header", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            ("malformed v1", b"PROXY TCP4 1.2.3 4.5.6.7 1 2\r\nrest"),
            ("v1 too long", too_long.as_bytes()),
            ("closed mid-header", b"PROXY TCP4 192.0.2.1"),
        ];
        let mut expected = 0;
        for (what, bytes) in cases {
            let mut client = within(TcpStream::connect(lb.addr)).await.expect("connect");
            within(client.write_all(bytes)).await.expect("write");
            if what == "closed mid-header" {
                client.shutdown().await.expect("half-close");
            }
            assert_closed_without_data(&mut client, SOON).await;
            expected += 1;
            eventually_eq(SOON, what, expected, || {
                counters(&lb).rejected_bad_proxy_header
            })
            .await;
        }
        // Nothing at all within connect_timeout (500 ms).
        let mut silent = within(TcpStream::connect(lb.addr)).await.expect("connect");
        assert_closed_without_data(&mut silent, SOON).await;
        expected += 1;
        eventually_eq(SOON, "late", expected, || {
            counters(&lb).rejected_bad_proxy_header
        })
        .await;
        // A well-formed header, but from a peer not in proxy_trusted.
        let mut untrusted = connect_from("127.0.0.9", lb.addr).await;
        within(untrusted.write_all(&v1("192.0.2.7:1", "198.51.100.1:2")))
            .await
            .expect("write");
        assert_closed_without_data(&mut untrusted, SOON).await;
        expected += 1;
        eventually_eq(SOON, "untrusted", expected, || {
            counters(&lb).rejected_bad_proxy_header
        })
        .await;
        assert!(
            backend.seen().is_empty(),
            "a backend saw {:?}",
            backend.seen()
        );
        assert_eq!(counters(&lb).connect_attempts, 0);
        lb.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_header_leaves_the_peer_as_the_client_and_a_backend_may_opt_out() {
    bounded(LIMIT, async {
        let backend = HeaderBackend::start().await;
        let lb = start(&config(
            "accept_proxy = \"v2\"\nproxy_trusted = [\"127.0.0.0/8\"]\nsend_proxy = \"v2\"",
            backend.addr,
            "",
        ));
        let local = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::Protocol::Stream,
            ppp::v2::Addresses::Unspecified,
        )
        .build()
        .expect("LOCAL header");
        let mut client = within(TcpStream::connect(lb.addr)).await.expect("connect");
        let peer = client.local_addr().expect("address");
        within(client.write_all(&local)).await.expect("write");
        assert_eq!(round_trip(&mut client, b"ping").await, b"ping");
        let seen = backend.seen()[0].clone();
        assert_eq!(
            (seen.source, seen.version),
            (Some(peer), 2),
            "sent on with the peer's address, as HAProxy does"
        );
        lb.stop().await;

        // send_proxy without accept_proxy: the peer's own address; "none" on a backend: no
        // header for it.
        let lb = start(&config("send_proxy = \"v1\"", backend.addr, ""));
        let mut client = connect_from("127.0.0.5", lb.addr).await;
        let port = client.local_addr().expect("address").port();
        assert_eq!(round_trip(&mut client, b"ping").await, b"ping");
        let seen = backend.seen()[1].clone();
        assert_eq!(seen.source, Some(SocketAddr::from(([127, 0, 0, 5], port))));
        assert_eq!(seen.destination, Some(lb.addr));
        lb.stop().await;
        let lb = start(&config(
            "send_proxy = \"v1\"",
            backend.addr,
            "send_proxy = \"none\"",
        ));
        let mut client = within(TcpStream::connect(lb.addr)).await.expect("connect");
        within(client.write_all(b"0123456789abcdefghij"))
            .await
            .expect("write");
        eventually_eq(SOON, "the third connection", 3, || backend.seen().len()).await;
        assert_eq!(backend.seen()[2].version, 0, "no header for that backend");
        lb.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_and_deny_lists_go_by_the_clients_address() {
    bounded(LIMIT, async {
        let backend = HeaderBackend::start().await;
        let lb = start(&config(
            "allow = [\"127.0.0.0/29\", \"::1\"]\ndeny = [\"127.0.0.3\"]\nsend_proxy = \"v1\"",
            backend.addr,
            "",
        ));
        for (from, admitted) in [
            ("127.0.0.2", true),
            ("127.0.0.3", false),
            ("127.0.0.9", false),
            ("127.0.0.4", true),
        ] {
            let mut client = connect_from(from, lb.addr).await;
            if admitted {
                assert_eq!(round_trip(&mut client, b"hi").await, b"hi", "{from}");
            } else {
                within(client.write_all(b"hi")).await.expect("write");
                assert_closed_without_data(&mut client, SOON).await;
            }
        }
        assert_eq!(counters(&lb).rejected_denied, 2);
        let sources: Vec<IpAddr> = backend
            .seen()
            .iter()
            .filter_map(|s| s.source.map(|a| a.ip()))
            .collect();
        assert_eq!(
            sources,
            vec![
                "127.0.0.2".parse::<IpAddr>().expect("address"),
                "127.0.0.4".parse().expect("address")
            ]
        );
        lb.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_probes_to_a_backend_that_gets_headers_send_a_local_one() {
    bounded(LIMIT, async {
        for (send, kind, version) in [("v1", "tcp", 1), ("v2", "http", 2)] {
            let backend = HeaderBackend::start().await;
            let lb = start(&config(
                &format!(
                    "send_proxy = \"{send}\"\n[listener.health]\nkind = \"{kind}\"\n\
                     interval = \"100ms\"\ntimeout = \"500ms\""
                ),
                backend.addr,
                "",
            ));
            eventually_eq(SOON, "a probe's header", true, || {
                backend
                    .seen()
                    .iter()
                    .any(|s| s.version == version && s.source.is_none())
            })
            .await;
            lb.stop().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_address_has_its_own_connection_and_rate_limits() {
    bounded(LIMIT, async {
        let backend = HeaderBackend::start().await;
        let lb = start(&config(
            "max_connections_per_client = 2\nsend_proxy = \"v1\"",
            backend.addr,
            "",
        ));
        let mut first = connect_from("127.0.0.2", lb.addr).await;
        let mut second = connect_from("127.0.0.2", lb.addr).await;
        for client in [&mut first, &mut second] {
            assert_eq!(round_trip(client, b"ok").await, b"ok");
        }
        let mut third = connect_from("127.0.0.2", lb.addr).await;
        assert_closed_without_data(&mut third, SOON).await;
        assert_eq!(counters(&lb).rejected_client_limit, 1);
        // Another address has limits of its own.
        let mut other = connect_from("127.0.0.3", lb.addr).await;
        assert_eq!(round_trip(&mut other, b"ok").await, b"ok");
        assert_eq!(lb.handle.tracked_clients(LISTENER), Some(2));
        // A closed connection gives its place back.
        drop(first);
        let mut again = loop {
            let mut client = connect_from("127.0.0.2", lb.addr).await;
            within(client.write_all(b"ok")).await.expect("write");
            let mut back = [0_u8; 2];
            if client.read_exact(&mut back).await.is_ok() {
                break client;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(round_trip(&mut again, b"ok").await, b"ok");
        // With no rate limit, an address with nothing open is forgotten at once.
        drop((second, again, other));
        eventually_eq(SOON, "nobody tracked", Some(0), || {
            lb.handle.tracked_clients(LISTENER)
        })
        .await;
        lb.stop().await;

        let lb = start(&config(
            "connection_rate_per_client = \"3/1m\"\nsend_proxy = \"v1\"",
            backend.addr,
            "",
        ));
        for _ in 0..3 {
            let mut client = connect_from("127.0.0.4", lb.addr).await;
            assert_eq!(round_trip(&mut client, b"ok").await, b"ok");
        }
        let mut fourth = connect_from("127.0.0.4", lb.addr).await;
        assert_closed_without_data(&mut fourth, SOON).await;
        assert_eq!(counters(&lb).rejected_client_rate, 1);
        let mut other = connect_from("127.0.0.5", lb.addr).await;
        assert_eq!(round_trip(&mut other, b"ok").await, b"ok");
        lb.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_denies_a_client_cuts_none_of_its_open_connections() {
    bounded(LIMIT, async {
        let backend = HeaderBackend::start().await;
        let lb = start(&config("send_proxy = \"v1\"", backend.addr, ""));
        let mut open = connect_from("127.0.0.6", lb.addr).await;
        assert_eq!(round_trip(&mut open, b"before").await, b"before");
        let denying = config(
            "send_proxy = \"v1\"\ndeny = [\"127.0.0.6\"]",
            backend.addr,
            "",
        );
        lb.handle
            .apply(Config::parse(&denying, Path::new("test.toml")).expect("valid"))
            .await
            .expect("reload");
        let mut new = connect_from("127.0.0.6", lb.addr).await;
        within(new.write_all(b"hi")).await.expect("write");
        assert_closed_without_data(&mut new, SOON).await;
        assert_eq!(counters(&lb).rejected_denied, 1);
        assert_eq!(
            round_trip(&mut open, b"after").await,
            b"after",
            "the open connection goes on"
        );
        lb.stop().await;
    })
    .await;
}
