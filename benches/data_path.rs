//! Cost of the data path: bytes and connections through a running balancer on loopback.
//!
//! ```text
//! cargo bench --bench data_path               # full run
//! cargo bench --bench data_path -- --quick    # a rough number in seconds
//! cargo bench --bench data_path -- bulk/splice
//! ```
//!
//! A [`Balancer`] from the library runs in-process with its worker threads, in front of one
//! backend written here; client and backend run on a small tokio runtime of their own.
//!
//! - `bulk/<path>`: 16 MiB from the client through the balancer to a backend that discards them
//!   and answers with the count, on one connection; reported as throughput. `<path>` is the
//!   listener's `splice` setting: `splice` (zero copy for bulk, the default on Linux) or `copy`.
//! - `connection`: a new connection through the balancer, one byte each way, closed: the
//!   per-connection cost (accept, pick, connect, relay set-up, teardown).
//! - `round_trip`: 64 bytes to an echo backend and back on an open connection: the latency the
//!   balancer adds to a small request.
//!
//! The whole machine (client, balancer, backend) shares the cores, so these figures compare
//! builds of weighbridge with each other; `benches/compare/run.sh` compares it with HAProxy
//! and nginx.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;
use weighbridge::Balancer;

/// Bytes sent per `bulk` iteration.
const BULK_BYTES: usize = 16 << 20;
/// Size of each client write in `bulk`.
const WRITE_SIZE: usize = 256 << 10;
/// Size of a `round_trip` message.
const MESSAGE: usize = 64;
/// Time spent measuring each benchmark (criterion's default is 5 s).
const MEASUREMENT_TIME: Duration = Duration::from_secs(4);
/// Time spent warming up before each benchmark (criterion's default is 3 s).
const WARM_UP_TIME: Duration = Duration::from_secs(1);

/// A backend that reads each connection to its end, then answers with the byte count (8 bytes,
/// big-endian) and closes.
async fn counting_backend() -> SocketAddr {
    serve(|mut stream| async move {
        let mut buf = vec![0_u8; 256 << 10];
        let mut total = 0_u64;
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(_) => return,
            }
        }
        let _ = stream.write_all(&total.to_be_bytes()).await;
    })
    .await
}

/// A backend that echoes everything back.
async fn echo_backend() -> SocketAddr {
    serve(|mut stream| async move {
        let (mut read, mut write) = stream.split();
        let _ = tokio::io::copy(&mut read, &mut write).await;
    })
    .await
}

/// A backend that takes the PROXY header off each connection (v1: up to its line end; v2: its
/// 16 bytes and the length they give), then echoes everything back, the bytes that came with
/// the header first.
async fn header_echo_backend() -> SocketAddr {
    serve(|mut stream| async move {
        let mut buf = vec![0_u8; 4096];
        let mut have = 0;
        let end = loop {
            match stream.read(&mut buf[have..]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => have += n,
            }
            if buf[..have].starts_with(b"PROXY ") {
                if let Some(at) = buf[..have].iter().position(|&b| b == b'\n') {
                    break at + 1;
                }
            } else if have >= 16 {
                let len = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
                if have >= len {
                    break len;
                }
            }
        };
        if stream.write_all(&buf[end..have]).await.is_err() {
            return;
        }
        let (mut read, mut write) = stream.split();
        let _ = tokio::io::copy(&mut read, &mut write).await;
    })
    .await
}

/// Binds an ephemeral loopback port and serves every connection with `handle`.
async fn serve<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a backend");
    let addr = listener.local_addr().expect("backend address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(handle(stream));
        }
    });
    addr
}

/// A running balancer with one listener in front of `backend`.
struct Proxy {
    addr: SocketAddr,
    shutdown: CancellationToken,
}

impl Proxy {
    async fn start(backend: SocketAddr, splice: bool) -> Proxy {
        Proxy::with(backend, splice, "").await
    }

    /// As [`Proxy::start`], with `keys` added to the listener.
    async fn with(backend: SocketAddr, splice: bool, keys: &str) -> Proxy {
        let text = format!(
            "threads = 1\n[[listener]]\nname = \"bench\"\nbind = \"127.0.0.1:0\"\n\
             splice = {splice}\n{keys}\n[[listener.backend]]\naddr = \"{backend}\"\n"
        );
        let config = weighbridge::Config::parse(&text, Path::new("bench.toml"))
            .expect("a valid bench config");
        let balancer = Balancer::bind(&config).expect("bind the balancer on loopback");
        let addr = balancer
            .local_addr("bench")
            .expect("the listener's address");
        let shutdown = CancellationToken::new();
        tokio::spawn(balancer.run(shutdown.clone()));
        Proxy { addr, shutdown }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Sends `BULK_BYTES` through `proxy` and checks the backend's count.
async fn bulk_once(proxy: SocketAddr, chunk: &[u8]) {
    let mut stream = TcpStream::connect(proxy).await.expect("connect");
    let mut sent = 0;
    while sent < BULK_BYTES {
        stream.write_all(chunk).await.expect("send");
        sent += chunk.len();
    }
    stream.shutdown().await.expect("half-close");
    let mut count = [0_u8; 8];
    stream
        .read_exact(&mut count)
        .await
        .expect("the backend's count");
    assert_eq!(u64::from_be_bytes(count), BULK_BYTES as u64);
}

fn bulk(c: &mut Criterion, runtime: &Runtime) {
    let backend = runtime.block_on(counting_backend());
    let chunk = vec![0x5a_u8; WRITE_SIZE];
    let mut group = c.benchmark_group("bulk");
    group.throughput(Throughput::Bytes(BULK_BYTES as u64));
    for (name, splice) in [("splice", true), ("copy", false)] {
        let proxy = runtime.block_on(Proxy::start(backend, splice));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iters {
                        bulk_once(proxy.addr, &chunk).await;
                    }
                    started.elapsed()
                })
            })
        });
    }
    group.finish();
}

fn connection(c: &mut Criterion, runtime: &Runtime) {
    let backend = runtime.block_on(echo_backend());
    let proxy = runtime.block_on(Proxy::start(backend, true));
    c.bench_function("connection", |b| {
        b.iter_custom(|iters| runtime.block_on(connections(proxy.addr, iters)))
    });
    // The same with a PROXY header written to the backend first (its backend takes it off).
    let backend = runtime.block_on(header_echo_backend());
    let mut group = c.benchmark_group("connection_send_proxy");
    for version in ["v1", "v2"] {
        let keys = format!("send_proxy = \"{version}\"");
        let proxy = runtime.block_on(Proxy::with(backend, true, &keys));
        group.bench_function(version, |b| {
            b.iter_custom(|iters| runtime.block_on(connections(proxy.addr, iters)))
        });
    }
    group.finish();
}

/// Opens `iters` connections through `proxy`, one byte each way on each.
async fn connections(proxy: SocketAddr, iters: u64) -> Duration {
    let started = Instant::now();
    for _ in 0..iters {
        let mut stream = TcpStream::connect(proxy).await.expect("connect");
        stream.write_all(b"x").await.expect("send");
        let mut byte = [0_u8; 1];
        stream.read_exact(&mut byte).await.expect("the echo");
    }
    started.elapsed()
}

fn round_trip(c: &mut Criterion, runtime: &Runtime) {
    let backend = runtime.block_on(echo_backend());
    let proxy = runtime.block_on(Proxy::start(backend, true));
    let mut stream = runtime.block_on(async {
        let stream = TcpStream::connect(proxy.addr).await.expect("connect");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        stream
    });
    let message = [0xa5_u8; MESSAGE];
    c.bench_function("round_trip", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let mut echo = [0_u8; MESSAGE];
                let started = Instant::now();
                for _ in 0..iters {
                    stream.write_all(&message).await.expect("send");
                    stream.read_exact(&mut echo).await.expect("the echo");
                }
                started.elapsed()
            })
        })
    });
}

fn data_path(c: &mut Criterion) {
    // Client and backends: one thread, so the balancer's worker has the other core.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    bulk(c, &runtime);
    connection(c, &runtime);
    round_trip(c, &runtime);
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(MEASUREMENT_TIME)
        .warm_up_time(WARM_UP_TIME)
}

criterion_group! {
    name = benches;
    config = config();
    targets = data_path
}
criterion_main!(benches);
