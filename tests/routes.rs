//! Routing by server name without terminating TLS, over real sockets: real TLS clients
//! (rustls) complete their handshakes with real TLS backends through the balancer, which holds
//! no key; split, slow and malformed ClientHellos; clients without a name or without TLS.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use support::{Mock, Running, client_hello, eventually, records};

const WAIT: Duration = Duration::from_secs(10);

/// A self-signed certificate for the test's names, its key, and a client trusting it.
struct Pki {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

/// ring's provider: these tests need a handshake, not post-quantum key exchange (the one
/// rustls provider with it, aws-lc-rs, needs a C toolchain to build).
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pki() -> Pki {
    let names = [
        "llama.example.com",
        "*.llama.example.com",
        "embed.example.com",
        "other.example.com",
        "127.0.0.1",
    ];
    let key = rcgen::generate_simple_self_signed(names.map(str::to_owned).to_vec())
        .expect("a self-signed certificate");
    let cert: CertificateDer<'static> = key.cert.der().clone();
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.key_pair.serialize_der()));
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], private)
        .expect("the server's certificate");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).expect("the test's root");
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Pki {
        acceptor: TlsAcceptor::from(Arc::new(server)),
        connector: TlsConnector::from(Arc::new(client)),
    }
}

/// A TLS backend: completes the handshake, writes `id` and a newline, then echoes.
async fn tls_backend(acceptor: TlsAcceptor, id: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a backend");
    let addr = listener.local_addr().expect("its address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                if tls.write_all(format!("{id}\n").as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = [0_u8; 1024];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A listener named `tls` routing llama names to pool `llama`, `embed.example.com` to
/// `embed`, and the rest to `fallback` when `default` is set.
fn routed(llama: &[SocketAddr], embed: SocketAddr, fallback: Option<SocketAddr>) -> String {
    let mut text = String::from(
        "shutdown_grace = \"1s\"\nthreads = 2\n\
         [[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\nclient_hello_timeout = \"500ms\"\n\
         [[listener.route]]\nsni = [\"llama.example.com\", \"*.llama.example.com\"]\npool = \"llama\"\n\
         [[listener.route]]\nsni = [\"EMBED.example.com\"]\npool = \"embed\"\n",
    );
    if fallback.is_some() {
        text += "[[listener.route]]\npool = \"fallback\"\n";
    }
    text += "[[pool]]\nname = \"llama\"\n";
    for b in llama {
        text += &format!("[[pool.backend]]\naddr = \"{b}\"\n");
    }
    text += &format!("[[pool]]\nname = \"embed\"\n[[pool.backend]]\naddr = \"{embed}\"\n");
    if let Some(fallback) = fallback {
        text +=
            &format!("[[pool]]\nname = \"fallback\"\n[[pool.backend]]\naddr = \"{fallback}\"\n");
    }
    text
}

fn start(text: &str) -> Running {
    let config = weighbridge::Config::parse(text, std::path::Path::new("routes.toml"))
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    Running::try_start(&config, None, "tls").expect("bind on loopback")
}

/// A TLS session through `lb` asking for `name` (an IP address sends no name): the backend's
/// id, and an echo through the session.
async fn session(connector: &TlsConnector, lb: SocketAddr, name: &str) -> String {
    let stream = TcpStream::connect(lb).await.expect("connect");
    let server = ServerName::try_from(name.to_owned()).expect("a server name");
    let tls = tokio::time::timeout(WAIT, connector.connect(server, stream))
        .await
        .expect("handshake in time")
        .expect("the handshake completes end to end");
    let mut tls = BufReader::new(tls);
    let mut id = String::new();
    tls.read_line(&mut id).await.expect("the backend's id");
    tls.get_mut().write_all(b"ping").await.expect("write");
    let mut back = [0_u8; 4];
    tls.read_exact(&mut back).await.expect("echo");
    assert_eq!(&back, b"ping");
    id.trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_name_lands_on_its_pool_and_the_handshake_completes_end_to_end() {
    let pki = pki();
    let llama = [
        tls_backend(pki.acceptor.clone(), "llama-0").await,
        tls_backend(pki.acceptor.clone(), "llama-1").await,
    ];
    let embed = tls_backend(pki.acceptor.clone(), "embed").await;
    let fallback = tls_backend(pki.acceptor.clone(), "fallback").await;
    let lb = start(&routed(&llama, embed, Some(fallback)));
    for _ in 0..4 {
        let id = session(&pki.connector, lb.addr, "llama.example.com").await;
        assert!(id.starts_with("llama-"), "{id}");
        let id = session(&pki.connector, lb.addr, "a.llama.example.com").await;
        assert!(id.starts_with("llama-"), "one-label wildcard: {id}");
        assert_eq!(
            session(&pki.connector, lb.addr, "embed.example.com").await,
            "embed"
        );
        assert_eq!(
            session(&pki.connector, lb.addr, "other.example.com").await,
            "fallback"
        );
        // An IP address as the server name: rustls sends no SNI at all.
        assert_eq!(
            session(&pki.connector, lb.addr, "127.0.0.1").await,
            "fallback"
        );
    }
    let c = lb.listener();
    assert_eq!((c.rejected_bad_client_hello, c.rejected_no_route), (0, 0));
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_default_route_unmatched_and_nameless_clients_are_closed_and_counted() {
    let pki = pki();
    let llama = [tls_backend(pki.acceptor.clone(), "llama-0").await];
    let embed = tls_backend(pki.acceptor.clone(), "embed").await;
    let lb = start(&routed(&llama, embed, None));
    for name in ["other.example.com", "127.0.0.1"] {
        let stream = TcpStream::connect(lb.addr).await.expect("connect");
        let server = ServerName::try_from(name.to_owned()).expect("a server name");
        let outcome = tokio::time::timeout(WAIT, pki.connector.connect(server, stream))
            .await
            .expect("an answer in time");
        assert!(outcome.is_err(), "{name}: closed without a backend");
    }
    eventually(WAIT, "two clients counted under no_route", || {
        lb.listener().rejected_no_route == 2
    })
    .await;
    assert_eq!(
        lb.handle
            .pool_backend_counters("llama", llama[0])
            .map(|c| c.connections),
        Some(0)
    );
    lb.stop().await;
}

/// Routes to echo backends, so what comes back is what the backend received.
async fn echo_routes() -> (Running, Mock, Mock, Mock) {
    let (llama, embed, fallback) = (Mock::echo().await, Mock::echo().await, Mock::echo().await);
    let lb = start(&routed(&[llama.addr], embed.addr, Some(fallback.addr)));
    (lb, llama, embed, fallback)
}

fn connections(lb: &Running, pool: &str, addr: SocketAddr) -> u64 {
    lb.handle
        .pool_backend_counters(pool, addr)
        .map_or(0, |c| c.connections)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_hello_split_over_records_and_small_writes_is_read_whole_and_passed_untouched() {
    let (lb, llama, embed, _fallback) = echo_routes().await;
    for (size, split, write) in [(2_000, 16_384, 7), (4_000, 1_000, 300), (3_000, 500, 1)] {
        let bytes = records(&client_hello("embed.example.com", size), split);
        let mut stream = TcpStream::connect(lb.addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        for chunk in bytes.chunks(write.max(bytes.len() / 40)) {
            stream.write_all(chunk).await.expect("write a piece");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut back = vec![0_u8; bytes.len()];
        tokio::time::timeout(WAIT, stream.read_exact(&mut back))
            .await
            .expect("echoed in time")
            .expect("echoed whole");
        assert!(
            back == bytes,
            "the backend received the client's bytes untouched"
        );
    }
    assert_eq!(connections(&lb, "embed", embed.addr), 3);
    assert_eq!(connections(&lb, "llama", llama.addr), 0);
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_malformed_and_oversized_hellos_are_closed_before_any_backend_work() {
    let (lb, llama, embed, fallback) = echo_routes().await;
    let whole = records(&client_hello("llama.example.com", 600), 16_384);
    // Half a hello, then nothing: late.
    let mut slow = TcpStream::connect(lb.addr).await.expect("connect");
    slow.write_all(&whole[..300]).await.expect("write");
    // A handshake record that is no ClientHello.
    let mut garbage = TcpStream::connect(lb.addr).await.expect("connect");
    garbage
        .write_all(&[22, 3, 1, 0, 6, 2, 0, 0, 2, 0, 0])
        .await
        .expect("write");
    // Over 16 KiB.
    let big = records(&client_hello("llama.example.com", 17_000), 16_000);
    let mut oversized = TcpStream::connect(lb.addr).await.expect("connect");
    let _ = oversized.write_all(&big).await;
    for stream in [&mut slow, &mut garbage, &mut oversized] {
        let mut buf = [0_u8; 16];
        let read = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("closed in time");
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "closed without a reply: {read:?}"
        );
    }
    eventually(WAIT, "three bad hellos counted", || {
        lb.listener().rejected_bad_client_hello == 3
    })
    .await;
    let untouched = [
        ("llama", llama.addr),
        ("embed", embed.addr),
        ("fallback", fallback.addr),
    ];
    for (pool, addr) in untouched {
        assert_eq!(connections(&lb, pool, addr), 0, "{pool} saw no connection");
    }
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_tls_take_the_default_route() {
    let (lb, _llama, _embed, fallback) = echo_routes().await;
    // One that speaks first, one that waits for the server to (it gets the default route once
    // client_hello_timeout passes).
    let mut plain = TcpStream::connect(lb.addr).await.expect("connect");
    plain
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .await
        .expect("write");
    let mut back = [0_u8; 18];
    tokio::time::timeout(WAIT, plain.read_exact(&mut back))
        .await
        .expect("in time")
        .expect("echoed");
    assert_eq!(&back, b"GET / HTTP/1.1\r\n\r\n");
    let _quiet = TcpStream::connect(lb.addr).await.expect("connect");
    eventually(WAIT, "both on the default route", || {
        connections(&lb, "fallback", fallback.addr) == 2
    })
    .await;
    lb.stop().await;
}

/// A listener with routes and `pool` is refused, naming the key and its line.
#[test]
fn routes_beside_a_pool_are_refused_naming_the_key() {
    let text = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\
                [[listener.route]]\npool = \"p\"\n\
                [[pool]]\nname = \"p\"\n[[pool.backend]]\naddr = \"127.0.0.1:1\"\n";
    let error = weighbridge::Config::parse(text, std::path::Path::new("x.toml"))
        .expect_err("routes and pool together")
        .to_string();
    assert!(
        error.contains("`pool`") && error.contains("x.toml:4"),
        "{error}"
    );
}

/// A PROXY header and the ClientHello in one write: the readiness event is spent on the
/// header, and the hello behind it is read at once; the backend receives the hello alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_that_comes_with_the_proxy_header_routes() {
    let (llama, embed) = (Mock::echo().await, Mock::echo().await);
    let text = routed(&[llama.addr], embed.addr, None).replace(
        "client_hello_timeout = \"500ms\"\n",
        "client_hello_timeout = \"500ms\"\naccept_proxy = \"v1\"\nproxy_trusted = [\"127.0.0.1\"]\n",
    );
    let lb = start(&text);
    let hello = records(&client_hello("embed.example.com", 300), 16_384);
    let mut bytes = b"PROXY TCP4 10.1.2.3 10.0.0.1 40000 443\r\n".to_vec();
    bytes.extend_from_slice(&hello);
    let mut stream = TcpStream::connect(lb.addr).await.expect("connect");
    stream.write_all(&bytes).await.expect("write");
    let mut back = vec![0_u8; hello.len()];
    tokio::time::timeout(WAIT, stream.read_exact(&mut back))
        .await
        .expect("echoed in time")
        .expect("echoed");
    assert!(
        back == hello,
        "the backend received the hello, without the header"
    );
    assert_eq!(connections(&lb, "embed", embed.addr), 1);
    lb.stop().await;
}
