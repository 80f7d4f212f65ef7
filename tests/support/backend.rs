//! Backends on loopback, one kind per behaviour a test needs: echo (optionally greeting with an
//! id), bulk data both ways, a greeting and nothing more, refusing connects, and never
//! completing a handshake.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::client::{CHUNK, Transfer, exchange};

/// How long a backend waits before accepting again after an accept failed.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// Binds a backend's listening socket on an ephemeral loopback port.
async fn bind(kind: &str) -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind {kind} backend on loopback: {e}"));
    let addr = listener.local_addr().expect("backend address");
    (listener, addr)
}

/// Accepts on `listener` for as long as the runtime lives, handing every connection to
/// `serve`; an accept failure is logged and retried after [`ACCEPT_BACKOFF`].
fn serve_each(
    listener: TcpListener,
    kind: &'static str,
    mut serve: impl FnMut(TcpStream) + Send + 'static,
) {
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => serve(stream),
                Err(e) => {
                    eprintln!("{kind} backend: accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    });
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
    greeting: Option<u8>,
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

    /// An identify backend on `addr` (an address and port of the test's choosing, such as
    /// one port on several 127.0.0.x addresses); `None` if `addr` is taken.
    pub async fn identify_at(addr: SocketAddr, id: u8) -> Option<Mock> {
        let listener = TcpListener::bind(addr).await.ok()?;
        let addr = listener.local_addr().ok()?;
        Some(Mock::serve(listener, addr, Some(id)))
    }

    async fn start(greeting: Option<u8>) -> Mock {
        let (listener, addr) = bind("mock").await;
        Mock::serve(listener, addr, greeting)
    }

    fn serve(listener: TcpListener, addr: SocketAddr, greeting: Option<u8>) -> Mock {
        let tally = Arc::new(Tally::default());
        let counts = Arc::clone(&tally);
        serve_each(listener, "mock", move |stream| {
            let guard = OpenGuard::new(&counts);
            tokio::spawn(serve_mock(stream, greeting, guard));
        });
        Mock {
            addr,
            greeting,
            tally,
        }
    }

    /// The id an identify backend greets with.
    pub fn id(&self) -> u8 {
        self.greeting.expect("an identify backend has an id")
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
///
/// Echoes in writes of up to [`CHUNK`], as large as the bulk senders' own, so a bulk echo comes
/// back in chunks that fill the balancer's reads as the bytes going out do.
async fn echo_until_closed(stream: &mut TcpStream, greeting: Option<u8>) -> bool {
    if let Some(id) = greeting {
        if let Err(e) = stream.write_all(&[id]).await {
            eprintln!("mock backend: greeting failed: {e}");
            return false;
        }
    }
    let mut buf = vec![0_u8; CHUNK];
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

/// A backend that writes `greeting` on every connection and closes it at once: the backend ends
/// the conversation.
pub async fn greeter(greeting: &'static [u8]) -> SocketAddr {
    let (listener, addr) = bind("greeter").await;
    serve_each(listener, "greeter", move |mut stream| {
        tokio::spawn(async move {
            if let Err(e) = stream.write_all(greeting).await {
                eprintln!("greeter backend: {e}");
            }
        });
    });
    addr
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
        let (listener, addr) = bind("bulk").await;
        let (tx, transfers) = mpsc::unbounded_channel();
        let next_seed = AtomicU64::new(seed_base);
        serve_each(listener, "bulk", move |stream| {
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
        });
        Bulk { addr, transfers }
    }
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
