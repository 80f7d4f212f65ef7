//! Shared helpers for the end-to-end tests: mock backends on loopback, a balancer started
//! in-process, and deadline-bounded polling instead of sleeps.
//!
//! Every socket is on 127.0.0.1 with a port the kernel picks, so test files can run in parallel.

// Each test file uses its own subset of these helpers.
#![allow(dead_code)]

use std::fmt::Debug;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::SmallRng;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use weighbridge::backend::{BackendCounters, ListenerCounters};
use weighbridge::{Balancer, Handle, Stopped};

/// The listener name every in-process config uses.
pub const LISTENER: &str = "lb";
/// How often `eventually` re-checks its condition.
const POLL: Duration = Duration::from_millis(5);
/// Size of the chunks bulk transfers write and read.
const CHUNK: usize = 64 * 1024;

/// Runs `test`, failing if it has not finished within `limit`.
pub async fn bounded<F: Future>(limit: Duration, test: F) -> F::Output {
    match tokio::time::timeout(limit, test).await {
        Ok(output) => output,
        Err(_) => panic!("test did not finish within {limit:?}"),
    }
}

/// Polls `condition` until it holds; fails naming `what` once `within` has passed.
pub async fn eventually(within: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `probe` until it returns `expected`; fails with the last value seen once `within` has
/// passed.
pub async fn eventually_eq<T: PartialEq + Debug>(
    within: Duration,
    what: &str,
    expected: T,
    mut probe: impl FnMut() -> T,
) {
    let deadline = Instant::now() + within;
    loop {
        let seen = probe();
        if seen == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}: want {expected:?}, last saw {seen:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Like [`eventually`], for a condition that has to do I/O to find out.
pub async fn eventually_async<F, Fut>(within: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// What a mock backend has seen of its connections.
#[derive(Debug, Default)]
struct Tally {
    accepted: AtomicUsize,
    open: AtomicUsize,
    eofs: AtomicUsize,
}

/// Keeps one connection counted in [`Tally::open`] until dropped.
struct OpenGuard(Arc<Tally>);

impl OpenGuard {
    fn new(tally: &Arc<Tally>) -> OpenGuard {
        tally.accepted.fetch_add(1, Ordering::SeqCst);
        tally.open.fetch_add(1, Ordering::SeqCst);
        OpenGuard(Arc::clone(tally))
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A mock backend that echoes what it receives until the client closes, optionally greeting each
/// connection first with its one-byte id; it counts accepted, open and cleanly-ended connections.
#[derive(Debug)]
pub struct Mock {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The byte it greets with, if any.
    pub id: Option<u8>,
    tally: Arc<Tally>,
}

impl Mock {
    /// An "identify" backend: writes `id` as soon as it accepts, then echoes.
    pub async fn identify(id: u8) -> Mock {
        Mock::start(Some(id)).await
    }

    /// A plain echo backend.
    pub async fn echo() -> Mock {
        Mock::start(None).await
    }

    /// `n` identify backends with ids 0..n.
    pub async fn identify_many(n: u8) -> Vec<Mock> {
        let mut mocks = Vec::with_capacity(n.into());
        for id in 0..n {
            mocks.push(Mock::identify(id).await);
        }
        mocks
    }

    async fn start(greeting: Option<u8>) -> Mock {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind mock backend on loopback");
        let addr = listener.local_addr().expect("mock backend address");
        let tally = Arc::new(Tally::default());
        let counts = Arc::clone(&tally);
        tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        eprintln!("mock backend {addr}: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let guard = OpenGuard::new(&counts);
                tokio::spawn(serve_mock(stream, greeting, guard));
            }
        });
        Mock {
            addr,
            id: greeting,
            tally,
        }
    }

    /// Connections accepted since start.
    pub fn accepted(&self) -> usize {
        self.tally.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.tally.open.load(Ordering::SeqCst)
    }

    /// Connections that ended because the peer closed its sending side (read returned 0).
    pub fn eofs(&self) -> usize {
        self.tally.eofs.load(Ordering::SeqCst)
    }
}

async fn serve_mock(mut stream: TcpStream, greeting: Option<u8>, guard: OpenGuard) {
    if echo_until_closed(&mut stream, greeting).await {
        guard.0.eofs.fetch_add(1, Ordering::SeqCst);
    }
    // Counted as closed before the peer can see it close.
    drop(guard);
    drop(stream);
}

/// Greets, then echoes until end of stream (returns true) or an error (false).
async fn echo_until_closed(stream: &mut TcpStream, greeting: Option<u8>) -> bool {
    if let Some(id) = greeting {
        if let Err(e) = stream.write_all(&[id]).await {
            eprintln!("mock backend: greeting failed: {e}");
            return false;
        }
    }
    let mut buf = vec![0_u8; 16 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return true,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
}

/// A loopback address nothing listens on: a socket is bound to it (so no one else can take the
/// port while the value lives) but never listens, so connects are refused.
#[derive(Debug)]
pub struct Refusing {
    /// The refusing address.
    pub addr: SocketAddr,
    _socket: TcpSocket,
}

impl Refusing {
    /// Reserves a refusing port.
    pub fn new() -> Refusing {
        let socket = TcpSocket::new_v4().expect("create a TCP socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind a port to refuse on");
        let addr = socket.local_addr().expect("refusing port address");
        Refusing {
            addr,
            _socket: socket,
        }
    }
}

/// One side's view of a bulk transfer: what it sent and what it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    /// SHA-256 of the bytes sent.
    pub sent: [u8; 32],
    /// SHA-256 of the bytes received.
    pub received: [u8; 32],
    /// How many bytes were received.
    pub received_len: u64,
}

/// Writes `len` pseudo-random bytes (seeded by `seed`) to `writer`, shuts its write side down
/// and returns their SHA-256.
pub async fn send_random(
    mut writer: impl AsyncWrite + Unpin,
    seed: u64,
    len: u64,
) -> io::Result<[u8; 32]> {
    use rand::Rng;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut hasher = Sha256::new();
    let mut buf = vec![0_u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(CHUNK as u64)).expect("chunk fits in usize");
        rng.fill_bytes(&mut buf[..n]);
        hasher.update(&buf[..n]);
        writer.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    writer.shutdown().await?;
    Ok(hasher.finalize().into())
}

/// Reads `reader` to end of stream; returns the SHA-256 and length of what it read.
pub async fn receive_all(mut reader: impl AsyncRead + Unpin) -> io::Result<([u8; 32], u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0_u8; CHUNK];
    let mut total = 0_u64;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok((hasher.finalize().into(), total));
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}

/// Sends `len` random bytes seeded by `seed` on `stream` while receiving everything the peer
/// sends, both at once; returns when both directions are done.
pub async fn exchange(stream: TcpStream, seed: u64, len: u64) -> io::Result<Transfer> {
    let (reader, writer) = stream.into_split();
    let (sent, received) = tokio::try_join!(send_random(writer, seed, len), receive_all(reader))?;
    Ok(Transfer {
        sent,
        received: received.0,
        received_len: received.1,
    })
}

/// A backend for bulk data: on every connection it sends `len` random bytes of its own while
/// hashing what it receives, and reports each connection's [`Transfer`] on a channel.
#[derive(Debug)]
pub struct Bulk {
    /// Where it listens.
    pub addr: SocketAddr,
    /// One report per finished connection.
    pub transfers: mpsc::UnboundedReceiver<Transfer>,
}

impl Bulk {
    /// Starts a bulk backend whose streams are seeded from `seed_base` upwards.
    pub async fn start(len: u64, seed_base: u64) -> Bulk {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind bulk backend on loopback");
        let addr = listener.local_addr().expect("bulk backend address");
        let (tx, transfers) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let next_seed = AtomicU64::new(seed_base);
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        eprintln!("bulk backend {addr}: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let seed = next_seed.fetch_add(1, Ordering::Relaxed);
                let tx = tx.clone();
                tokio::spawn(async move {
                    match exchange(stream, seed, len).await {
                        Ok(transfer) => {
                            if tx.send(transfer).is_err() {
                                eprintln!("bulk backend {addr}: nobody reads the reports");
                            }
                        }
                        Err(e) => eprintln!("bulk backend {addr}: transfer failed: {e}"),
                    }
                });
            }
        });
        Bulk { addr, transfers }
    }
}

/// Text of a config with one listener named [`LISTENER`] on an ephemeral loopback port.
///
/// `settings` holds extra `key = value` lines for the listener (timeouts, limits).
pub fn config(strategy: &str, settings: &str, backends: &[(SocketAddr, f64)]) -> String {
    let mut text = format!(
        "shutdown_grace = \"5s\"\n[[listener]]\nname = \"{LISTENER}\"\nbind = \"127.0.0.1:0\"\n\
         strategy = \"{strategy}\"\n{settings}\n"
    );
    for (addr, weight) in backends {
        text.push_str(&format!(
            "[[listener.backend]]\naddr = \"{addr}\"\nweight = {weight:?}\n"
        ));
    }
    text
}

/// A balancer serving in a task of the test's runtime.
#[derive(Debug)]
pub struct Running {
    /// Where listener [`LISTENER`] accepts.
    pub addr: SocketAddr,
    /// Live counters.
    pub handle: Handle,
    /// Cancelling it starts shutdown.
    pub shutdown: CancellationToken,
    /// The task running [`Balancer::run`].
    pub task: JoinHandle<Stopped>,
}

/// Parses `toml`, binds and starts serving it. Must be called inside a tokio runtime.
pub fn start_balancer(toml: &str) -> Running {
    // Capacity tests hold a few hundred sockets in this one process.
    if let Err(e) = weighbridge::listener::raise_open_file_limit() {
        eprintln!("cannot raise the open file limit: {e}");
    }
    let config = weighbridge::config::parse(toml, Path::new("test.toml"))
        .unwrap_or_else(|e| panic!("test config must be valid: {e}\n{toml}"));
    run(Balancer::bind(&config).expect("bind the balancer on loopback"))
}

/// Spawns `balancer`'s run in the test's runtime.
fn run(balancer: Balancer) -> Running {
    let addr = balancer
        .local_addr(LISTENER)
        .expect("the config has listener `lb`");
    let handle = balancer.handle();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(balancer.run(shutdown.clone()));
    Running {
        addr,
        handle,
        shutdown,
        task,
    }
}

impl Running {
    /// Counters of `backend` in listener [`LISTENER`].
    pub fn backend(&self, backend: SocketAddr) -> BackendCounters {
        self.handle
            .backend_counters(LISTENER, backend)
            .unwrap_or_else(|| panic!("backend {backend} is configured"))
    }

    /// Counters of listener [`LISTENER`].
    pub fn listener(&self) -> ListenerCounters {
        self.handle
            .listener_counters(LISTENER)
            .expect("listener `lb` is configured")
    }

    /// Connections the balancer counts as active on `backends`, in order.
    pub fn active(&self, backends: &[SocketAddr]) -> Vec<u64> {
        backends.iter().map(|&b| self.backend(b).active).collect()
    }

    /// Starts shutdown and waits (at most 10 s) for the balancer to stop.
    pub async fn stop(self) -> Stopped {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the balancer stops within 10 s of shutdown")
            .expect("the balancer task does not panic")
    }
}

/// Connects through the balancer and reads the one-byte id the backend greets with.
pub async fn connect_identify(addr: SocketAddr) -> (TcpStream, u8) {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connect to the balancer");
    let mut id = [0_u8; 1];
    stream
        .read_exact(&mut id)
        .await
        .expect("read the backend's id through the balancer");
    (stream, id[0])
}

/// Asserts that `stream` is closed by the peer within `within` without sending any byte: a read
/// returns end of stream or an error (a reset counts). Returns how long it took.
pub async fn assert_closed_without_data(stream: &mut TcpStream, within: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0_u8; 64];
    match tokio::time::timeout(within, stream.read(&mut buf)).await {
        Err(_) => panic!("connection still open after {within:?}"),
        Ok(Ok(0)) | Ok(Err(_)) => started.elapsed(),
        Ok(Ok(n)) => panic!(
            "expected the connection closed, got {n} bytes: {:?}",
            &buf[..n]
        ),
    }
}

/// Runs each named test body (an `async fn(splice: bool)`) once per data path: zero-copy
/// splice and the portable copy, as `name::splice` and `name::copy`.
#[allow(unused_macros)]
macro_rules! on_both_paths {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn splice() {
                super::$name(true).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn copy() {
                super::$name(false).await;
            }
        }
    )*};
}

/// The listener setting that selects the data path.
pub fn data_path(splice: bool) -> String {
    format!("splice = {splice}")
}

/// An HTTP answer from the admin endpoint.
#[derive(Debug)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Header lines, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body, as text.
    pub body: String,
}

impl HttpResponse {
    /// The body parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    /// The value of header `name` (lowercase), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one HTTP/1.1 request to `addr` (with `Connection: close`) and reads the whole answer.
/// `token` adds `Authorization: Bearer <token>`. Fails the test after 10 s.
pub async fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> HttpResponse {
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .expect("connect to the admin endpoint");
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send the request");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read the answer");
        raw
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer within 10 s"));
    let text = String::from_utf8(raw).expect("the answer is UTF-8");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("a status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    assert!(
        !headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked")),
        "this helper reads only length-delimited bodies"
    );
    HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// [`config`] with an `[admin]` table on an ephemeral loopback port (and `token`, if given).
pub fn config_with_admin(
    strategy: &str,
    settings: &str,
    backends: &[(SocketAddr, f64)],
    token: Option<&str>,
) -> String {
    let mut text = config(strategy, settings, backends);
    text.push_str("\n[admin]\nbind = \"127.0.0.1:0\"\n");
    if let Some(token) = token {
        text.push_str(&format!("token = \"{token}\"\n"));
    }
    text
}

impl Running {
    /// Where the admin endpoint listens; the config must have an `[admin]` table.
    pub fn admin(&self) -> SocketAddr {
        self.handle
            .admin_addr()
            .expect("the config has an [admin] table")
    }
}

/// Like [`start_balancer`], from a file that [`Handle::reload`] (and `POST /reload`) re-read.
pub fn start_balancer_from_file(path: &Path) -> Running {
    let config = weighbridge::config::load(path)
        .unwrap_or_else(|e| panic!("test config must be valid: {e}"));
    run(Balancer::bind(&config)
        .expect("bind the balancer on loopback")
        .with_config_path(path))
}

/// A backend that never completes a handshake: its accept queue is full, so further SYNs are
/// dropped and connects to it hang until they time out.
pub async fn black_hole() -> (TcpListener, SocketAddr, Vec<JoinHandle<()>>) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("literal address"))
        .expect("bind black hole");
    let listener = socket.listen(0).expect("listen with no backlog");
    let addr = listener.local_addr().expect("black hole address");
    // Fill the queue; these connects are never accepted.
    let fillers = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                drop(TcpStream::connect(addr).await);
            })
        })
        .collect();
    (listener, addr, fillers)
}
