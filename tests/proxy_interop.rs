//! The PROXY protocol against the real thing: HAProxy and nginx in front of weighbridge, sending
//! it v1 and v2 headers (with TLVs, and from HAProxy's own health checks), and behind it,
//! reading the headers it sends and the ones its health probes start with; clients on IPv4 and
//! IPv6. Each test starts its own processes on loopback, with ports the kernel picked and
//! configs in a temporary directory, and kills them when it ends.
//!
//! The chains end at a backend that parses the header it is given (with the `ppp` crate) and
//! answers with the line `vN SOURCE DESTINATION`, so the client reads back, through the whole
//! chain, the address the last hop was told it has; or, for nginx behind weighbridge, at nginx
//! itself returning `$proxy_protocol_addr $proxy_protocol_port`. Clients connect from 127.0.0.7
//! (or ::1), never from the 127.0.0.1 the proxies connect from, so a proxy's own address passed
//! on by mistake cannot pass for the client's.
//!
//! The `peer_*` tests run the same chains without weighbridge: they check the peers and the
//! parsing backend, so that a failure elsewhere is weighbridge's. HAProxy and nginx come from
//! `scripts/install-test-peers.sh`; without them every test here fails saying so.

mod support;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ppp::{HeaderResult, PartialResult, v1, v2};
use tempfile::{NamedTempFile, TempDir};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixStream};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use weighbridge::HealthStatus;

use support::{
    LISTENER, POLL, Process, assert_closed_without_data, bounded, close, config_file, poll_until,
    start_balancer, within,
};

/// Bound on a whole test.
const LIMIT: Duration = Duration::from_secs(30);
/// How long a process may take to listen, a line to be logged.
const SOON: Duration = Duration::from_secs(10);
/// What to do when a peer is missing.
const INSTALL: &str =
    "run `bash scripts/install-test-peers.sh` as root to install HAProxy and nginx";

/// The clients' IPv4 address: loopback, but not the 127.0.0.1 the proxies connect from.
const CLIENT_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7));
/// The clients' IPv6 address: there is only one loopback address in IPv6, so the port alone
/// tells the client from a proxy.
const CLIENT_V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
/// Where the proxies and backends listen, and connect from.
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// The proxies' IPv6 address.
const LOOPBACK_V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
/// A source address a test client claims in a header it writes itself.
const CLAIMED_V4: &str = "127.0.0.9:4242";
/// The same for IPv6.
const CLAIMED_V6: &str = "[::1]:4243";
/// Debian's nginx has its stream module apart; a build with it built in has no such file.
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// A version of the PROXY protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pp {
    V1,
    V2,
}

impl Pp {
    /// As weighbridge's `accept_proxy` and `send_proxy` and the backend's answers write it.
    fn name(self) -> &'static str {
        match self {
            Pp::V1 => "v1",
            Pp::V2 => "v2",
        }
    }

    /// HAProxy's `server` option that sends it.
    fn haproxy_send(self) -> &'static str {
        match self {
            Pp::V1 => "send-proxy",
            Pp::V2 => "send-proxy-v2",
        }
    }

    /// A header claiming a connection from `source` to `port` on the loopback address of the
    /// same family: both addresses of a header are of one family (ppp writes `PROXY UNKNOWN`
    /// for a mixed pair).
    fn header(self, source: SocketAddr, port: u16) -> Vec<u8> {
        let destination = SocketAddr::new(loopback_for(source.ip()), port);
        match self {
            Pp::V1 => v1::Addresses::from((source, destination))
                .to_string()
                .into_bytes(),
            Pp::V2 => v2::Builder::with_addresses(
                v2::Version::Two | v2::Command::Proxy,
                v2::Protocol::Stream,
                (source, destination),
            )
            .build()
            .expect("a v2 header builds"),
        }
    }
}

/// Where the first hop listens for a client on `client`: the proxies' loopback address of the
/// client's family.
fn loopback_for(client: IpAddr) -> IpAddr {
    match client {
        IpAddr::V4(_) => LOOPBACK,
        IpAddr::V6(_) => LOOPBACK_V6,
    }
}

// ------------------------------------------------------------------------- the parsing backend

/// A backend that reads the PROXY header each connection starts with and answers one line
/// saying what it read (`v1 SOURCE DESTINATION`, `v2 local`, `v2 SOURCE DESTINATION tlvs=0x4,0x5`,
/// `error: ...`), then echoes the rest of the stream.
struct HeaderBackend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// Every line it answered, in order.
    answers: Arc<Mutex<Vec<String>>>,
}

impl HeaderBackend {
    async fn start() -> HeaderBackend {
        let listener = TcpListener::bind(SocketAddr::new(LOOPBACK, 0))
            .await
            .expect("bind the header backend on loopback");
        let addr = listener.local_addr().expect("header backend address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::clone(&accepted);
        let record = Arc::clone(&answers);
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        count.fetch_add(1, Ordering::SeqCst);
                        tokio::spawn(serve_header(stream, Arc::clone(&record)));
                    }
                    Err(e) => {
                        eprintln!("header backend: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
        HeaderBackend {
            addr,
            accepted,
            answers,
        }
    }

    /// The lines it answered so far.
    fn answers(&self) -> Vec<String> {
        self.answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Connections accepted so far.
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn serve_header(mut stream: TcpStream, answers: Arc<Mutex<Vec<String>>>) {
    // A header is at most 107 bytes in v1 and 16 + 65535 in v2; anything that long here is wrong.
    const TOO_LONG: usize = 4096;
    let mut buf = Vec::new();
    let mut chunk = [0_u8; 1024];
    let (line, consumed) = loop {
        match describe(&buf) {
            Ok(Some(found)) => break found,
            Ok(None) if buf.len() < TOO_LONG => {}
            Ok(None) => break (format!("error: no header in {TOO_LONG} bytes"), buf.len()),
            Err(e) => break (format!("error: {e} in {buf:?}"), buf.len()),
        }
        match stream.read(&mut chunk).await {
            Ok(0) => break (format!("error: end of stream after {buf:?}"), buf.len()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => {
                eprintln!("header backend: read failed: {e}");
                return;
            }
        }
    };
    answers
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(line.clone());
    let answer = format!("{line}\n");
    if stream.write_all(answer.as_bytes()).await.is_err() || line.starts_with("error") {
        return;
    }
    if stream.write_all(&buf[consumed..]).await.is_err() {
        return;
    }
    let (mut reader, mut writer) = stream.split();
    if tokio::io::copy(&mut reader, &mut writer).await.is_ok() {
        let _ = writer.shutdown().await;
    }
}

/// What the header at the start of `buf` says and how long it is; `None` if more bytes may
/// complete it.
fn describe(buf: &[u8]) -> Result<Option<(String, usize)>, String> {
    let header = HeaderResult::parse(buf);
    if header.is_incomplete() {
        return Ok(None);
    }
    let found = match header {
        HeaderResult::V1(Ok(header)) => {
            let what = match header.addresses {
                v1::Addresses::Tcp4(a) => pair(
                    (a.source_address.into(), a.source_port),
                    (a.destination_address.into(), a.destination_port),
                ),
                v1::Addresses::Tcp6(a) => pair(
                    (a.source_address.into(), a.source_port),
                    (a.destination_address.into(), a.destination_port),
                ),
                v1::Addresses::Unknown => "unknown".to_owned(),
            };
            (format!("v1 {what}"), header.header.len())
        }
        HeaderResult::V2(Ok(header)) => {
            let what = match (header.command, header.addresses) {
                (v2::Command::Local, _) => "local".to_owned(),
                (_, v2::Addresses::IPv4(a)) => pair(
                    (a.source_address.into(), a.source_port),
                    (a.destination_address.into(), a.destination_port),
                ),
                (_, v2::Addresses::IPv6(a)) => pair(
                    (a.source_address.into(), a.source_port),
                    (a.destination_address.into(), a.destination_port),
                ),
                (_, other) => format!("other {other:?}"),
            };
            let tlvs: Vec<String> = header
                .tlvs()
                .map(|tlv| tlv.map_or_else(|e| format!("bad({e})"), |t| format!("{:#x}", t.kind)))
                .collect();
            let what = if tlvs.is_empty() {
                what
            } else {
                format!("{what} tlvs={}", tlvs.join(","))
            };
            (format!("v2 {what}"), header.len())
        }
        HeaderResult::V1(Err(e)) => return Err(format!("v1: {e}")),
        HeaderResult::V2(Err(e)) => return Err(format!("v2: {e}")),
    };
    Ok(Some(found))
}

fn pair(source: (IpAddr, u16), destination: (IpAddr, u16)) -> String {
    format!(
        "{} {}",
        SocketAddr::from(source),
        SocketAddr::from(destination)
    )
}

/// Asserts that the backend's answer `line` names `version` and the source `client`.
fn assert_source(line: &str, version: Pp, client: SocketAddr) {
    let mut words = line.split_whitespace();
    assert_eq!(
        words.next(),
        Some(version.name()),
        "the last hop should read a {} header; it answered {line:?}",
        version.name()
    );
    let source: Option<SocketAddr> = words.next().and_then(|w| w.parse().ok());
    assert_eq!(
        source,
        Some(client),
        "the last hop should read the client's address; it answered {line:?}"
    );
}

// ----------------------------------------------------------------------------------- clients

/// Connects to `to` from `from` (the kernel picks the port).
async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = match from {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .expect("create the client socket");
    socket
        .bind(SocketAddr::new(from, 0))
        .unwrap_or_else(|e| panic!("bind the client to {from}: {e}"));
    within(socket.connect(to))
        .await
        .unwrap_or_else(|e| panic!("connect from {from} to {to}: {e}"))
}

/// Reads one line (without its newline) within the I/O timeout.
async fn read_line(reader: &mut (impl AsyncBufRead + Unpin)) -> String {
    let mut line = Vec::new();
    within(reader.read_until(b'\n', &mut line))
        .await
        .expect("read the backend's answer through the chain");
    assert_eq!(
        line.pop(),
        Some(b'\n'),
        "the chain closed before a whole answer line: {:?}",
        String::from_utf8_lossy(&line)
    );
    String::from_utf8(line).expect("the answer is text")
}

/// What a client sends as soon as it has connected, before it reads anything: the first bytes
/// may reach a proxy with the header, in one segment, and the next hop must take the header off
/// exactly. Larger than weighbridge's 56 KiB reads, so the rest takes its splice path.
fn payload() -> Vec<u8> {
    // A period prime to every buffer size: a byte lost, doubled or moved shows.
    (0..256 * 1024_u32).map(|i| (i % 251) as u8).collect()
}

/// A connection from `from` through the chain that starts at `entry` and ends at a
/// [`HeaderBackend`]: the client's address, and the line the backend answered (see
/// [`converse`]).
async fn through(from: IpAddr, entry: SocketAddr) -> (SocketAddr, String) {
    let stream = connect_from(from, entry).await;
    let me = stream.local_addr().expect("client address");
    (me, converse(stream).await)
}

/// Like [`through`] for a client on 127.0.0.1 that writes `header` itself first.
async fn through_with_header(header: &[u8], entry: SocketAddr) -> (SocketAddr, String) {
    let mut stream = connect_from(LOOPBACK, entry).await;
    let me = stream.local_addr().expect("client address");
    within(stream.write_all(header))
        .await
        .expect("send the header");
    (me, converse(stream).await)
}

/// Sends [`payload`] at once while reading the backend's answer line and then the payload's
/// echo, checks that the echo is exact and that the stream ends cleanly; returns the line.
/// After an `error` line the backend closes, and only the line is returned.
async fn converse(mut stream: TcpStream) -> String {
    let sent = payload();
    let (reader, mut writer) = stream.split();
    let mut reader = BufReader::new(reader);
    let (written, (line, echoed)) = tokio::join!(within(writer.write_all(&sent)), async {
        let line = read_line(&mut reader).await;
        if line.starts_with("error") {
            return (line, None);
        }
        let mut back = vec![0_u8; sent.len()];
        let echoed = within(reader.read_exact(&mut back)).await.map(|_| back);
        (line, Some(echoed))
    });
    let Some(echoed) = echoed else {
        return line;
    };
    written.expect("send the payload through the chain");
    let echoed = echoed.expect("read the payload's echo through the chain");
    let differs = echoed.iter().zip(&sent).position(|(a, b)| a != b);
    assert_eq!(
        differs, None,
        "the bytes behind the header came back changed from this offset on"
    );
    assert!(reader.buffer().is_empty(), "bytes beyond the echo");
    drop(reader);
    close(stream).await.expect("the chain ends cleanly");
    line
}

/// What a client reads from nginx's `return "$proxy_protocol_addr $proxy_protocol_port\n"`
/// behind `entry`, connecting from `from`: the client's address and nginx's answer as an
/// address (or the answer itself, if it is none).
async fn nginx_returns(
    from: IpAddr,
    entry: SocketAddr,
) -> (SocketAddr, Result<SocketAddr, String>) {
    let mut stream = connect_from(from, entry).await;
    let me = stream.local_addr().expect("client address");
    (me, read_nginx_answer(&mut stream).await)
}

async fn read_nginx_answer(stream: &mut TcpStream) -> Result<SocketAddr, String> {
    let mut answer = Vec::new();
    within(stream.read_to_end(&mut answer))
        .await
        .expect("nginx answers and closes");
    let answer = String::from_utf8(answer).expect("nginx answers text");
    let parsed = answer
        .trim_end()
        .split_once(' ')
        .and_then(|(ip, port)| Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?)));
    parsed.ok_or(answer)
}

// ------------------------------------------------------------------------------------ peers

/// `name` on the PATH or in the sbin directories (a user's PATH may lack them). When it is
/// missing, the repository's script installs the peers first (once for every test of this
/// file; it needs root), so `cargo test` works on a fresh machine.
fn program(name: &str) -> PathBuf {
    let find = || {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
            .map(|dir| dir.join(name))
            .find(|file| file.is_file())
    };
    if let Some(found) = find() {
        return found;
    }
    static INSTALLED: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
    let mut outcome = INSTALLED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let outcome = outcome.get_or_insert_with(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install-test-peers.sh");
        match std::process::Command::new("bash").arg(script).output() {
            Ok(out) if out.status.success() => String::new(),
            Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            Err(e) => format!("cannot run {script}: {e}"),
        }
    });
    find().unwrap_or_else(|| panic!("{name} is not installed ({outcome}): {INSTALL}"))
}

/// Whether something listens on `addr`, as the kernel's socket table says: asking by
/// connecting would send a connection down the chain under test.
fn listening(addr: SocketAddr) -> bool {
    // The table prints each 32-bit word of an address in host byte order, the port in hex.
    let (table, ip) = match addr {
        SocketAddr::V4(a) => ("/proc/net/tcp", words(&a.ip().octets())),
        SocketAddr::V6(a) => ("/proc/net/tcp6", words(&a.ip().octets())),
    };
    let local = format!("{ip}:{:04X}", addr.port());
    let text = std::fs::read_to_string(table).unwrap_or_else(|e| panic!("read {table}: {e}"));
    // `sl local_address rem_address st ...`; st 0A is LISTEN.
    text.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 3 && fields[1] == local && fields[3] == "0A"
    })
}

fn words(octets: &[u8]) -> String {
    octets
        .chunks(4)
        .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
        .collect()
}

/// A port free on `ip` a moment ago.
fn free_port(ip: IpAddr) -> u16 {
    std::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("find a free port on {ip}: {e}"))
        .port()
}

/// HAProxy or nginx, running in the foreground from a config in its own temporary directory;
/// killed when dropped.
struct Peer {
    name: &'static str,
    /// Where it listens.
    addr: SocketAddr,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// Reads stderr into `log` until the process closes it.
    reader: JoinHandle<()>,
    dir: TempDir,
}

impl Peer {
    /// HAProxy on `ip` with the sections `proxies` writes for the address it binds (its
    /// `frontend` binds it); TCP mode unless a section says otherwise. Its stats socket is
    /// [`Peer::haproxy_stat`]'s.
    async fn haproxy(ip: IpAddr, proxies: impl Fn(SocketAddr) -> String) -> Peer {
        let haproxy = program("haproxy");
        Peer::start("haproxy", ip, |addr, dir| {
            let config = dir.join("haproxy.cfg");
            let text = format!(
                "global\n\
                 \tnbthread 1\n\
                 \tpidfile {pid}\n\
                 \tstats socket {socket}\n\
                 defaults\n\
                 \tmode tcp\n\
                 \ttimeout connect 5s\n\
                 \ttimeout client 30s\n\
                 \ttimeout server 30s\n\
                 {proxies}",
                pid = dir.join("haproxy.pid").display(),
                socket = dir.join("stats.sock").display(),
                proxies = proxies(addr),
            );
            std::fs::write(&config, text).expect("write haproxy.cfg");
            // -db: in the foreground, one process, so killing it stops it all.
            let mut command = Command::new(&haproxy);
            command.arg("-db").arg("-f").arg(&config);
            command
        })
        .await
    }

    /// nginx on `ip` with the top-level block (`stream` or `http`) `block` writes for the
    /// address it listens on.
    async fn nginx(ip: IpAddr, block: impl Fn(SocketAddr) -> String) -> Peer {
        let nginx = program("nginx");
        let module = Path::new(NGINX_STREAM_MODULE);
        let load = if module.exists() {
            format!("load_module {};\n", module.display())
        } else {
            String::new()
        };
        Peer::start("nginx", ip, |addr, dir| {
            let config = dir.join("nginx.conf");
            // One process (no master): killing it stops it all, with no worker left behind.
            let text = format!(
                "{load}\
                 master_process off;\n\
                 worker_processes 1;\n\
                 pid {pid};\n\
                 error_log stderr notice;\n\
                 events {{ worker_connections 64; }}\n\
                 {block}\n",
                pid = dir.join("nginx.pid").display(),
                block = block(addr),
            );
            std::fs::write(&config, text).expect("write nginx.conf");
            // -p and -e: nothing under /var or /etc is opened, even before the config is read.
            let mut command = Command::new(&nginx);
            command
                .arg("-p")
                .arg(dir)
                .arg("-c")
                .arg(&config)
                .arg("-e")
                .arg("stderr")
                .arg("-g")
                .arg("daemon off;");
            command
        })
        .await
    }

    /// Writes a config with `configure` for a port free on `ip`, starts the command it returns
    /// and waits for it to listen. A port taken by someone else in between costs a retry.
    async fn start(
        name: &'static str,
        ip: IpAddr,
        configure: impl Fn(SocketAddr, &Path) -> Command,
    ) -> Peer {
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix(&format!("weighbridge-{name}-"))
                .tempdir()
                .expect("create a temporary directory");
            let addr = SocketAddr::new(ip, free_port(ip));
            let mut command = configure(addr, dir.path());
            let mut child = command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| panic!("start {name}: {e} ({INSTALL})"));
            let stderr = child.stderr.take().expect("stderr is piped");
            let log = Arc::new(Mutex::new(Vec::new()));
            let sink = Arc::clone(&log);
            let reader = tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    sink.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(line);
                }
            });
            let mut peer = Peer {
                name,
                addr,
                child,
                log,
                reader,
                dir,
            };
            let mut exited = false;
            poll_until(SOON, || {
                exited = !matches!(peer.child.try_wait(), Ok(None));
                exited || listening(addr)
            })
            .await;
            if !exited && listening(addr) {
                return peer;
            }
            // Its stderr is complete once it has exited and the reader has seen the end.
            let _ = within(peer.child.wait()).await;
            let _ = tokio::time::timeout(SOON, &mut peer.reader).await;
            let log = peer.lines();
            let taken = log.iter().any(|l| l.contains("in use"));
            if exited && taken && attempt < ATTEMPTS {
                eprintln!("{name}: {addr} was taken meanwhile; trying another port");
                continue;
            }
            panic!(
                "{name} is not listening on {addr} within {SOON:?} (exited: {exited}); \
                 stderr:\n{}",
                log.join("\n")
            );
        }
        unreachable!("the last attempt returns or panics")
    }

    /// HAProxy's `show stat` for `proxy`/`server`, field by field (`status`, `check_status`...).
    async fn haproxy_stat(&self, proxy: &str, server: &str) -> HashMap<String, String> {
        let socket = self.dir.path().join("stats.sock");
        let mut stream = within(UnixStream::connect(&socket))
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()));
        within(stream.write_all(b"show stat\n"))
            .await
            .expect("ask HAProxy for its stats");
        let mut csv = String::new();
        within(stream.read_to_string(&mut csv))
            .await
            .expect("read HAProxy's stats");
        let mut lines = csv.lines();
        let names: Vec<&str> = lines
            .next()
            .and_then(|header| header.strip_prefix("# "))
            .unwrap_or_else(|| panic!("no header in HAProxy's stats: {csv:?}"))
            .split(',')
            .collect();
        lines
            .map(|line| line.split(',').collect::<Vec<&str>>())
            .find(|row| row.len() > 1 && row[0] == proxy && row[1] == server)
            .unwrap_or_else(|| panic!("no {proxy}/{server} in HAProxy's stats:\n{csv}"))
            .into_iter()
            .zip(&names)
            .map(|(value, name)| ((*name).to_owned(), value.to_owned()))
            .collect()
    }

    fn lines(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Err(e) = self.child.start_kill() {
                eprintln!("kill {}: {e}", self.name);
            }
        }
        if std::thread::panicking() {
            eprintln!("{} stderr:\n{}", self.name, self.lines().join("\n"));
        }
    }
}

/// HAProxy's TCP `frontend` on `addr` (with `bind_options`) and the `backend` it relays to:
/// one server, `next`, with `server_options`. `frontend` and `backend` are more lines for each.
fn haproxy_relay(
    addr: SocketAddr,
    bind_options: &str,
    frontend: &str,
    backend: &str,
    next: SocketAddr,
    server_options: &str,
) -> String {
    format!(
        "frontend front\n\
         \tbind {addr} {bind_options}\n\
         {frontend}\
         \tdefault_backend next\n\
         backend next\n\
         {backend}\
         \tserver next {next} {server_options}\n"
    )
}

/// HAProxy sending `version` to `next`.
async fn haproxy_sending(ip: IpAddr, version: Pp, next: SocketAddr) -> Peer {
    Peer::haproxy(ip, |addr| {
        haproxy_relay(addr, "", "", "", next, version.haproxy_send())
    })
    .await
}

/// HAProxy accepting a header of either version, and sending v2 to `next`.
async fn haproxy_accepting(ip: IpAddr, next: SocketAddr) -> Peer {
    Peer::haproxy(ip, |addr| {
        haproxy_relay(addr, "accept-proxy", "", "", next, Pp::V2.haproxy_send())
    })
    .await
}

/// HAProxy sending v2 with TLVs after the addresses, as `proxy-v2-options` adds them: a
/// checksum (CRC32C, type 0x3) and a unique id (type 0x5).
async fn haproxy_sending_tlvs(ip: IpAddr, next: SocketAddr) -> Peer {
    Peer::haproxy(ip, |addr| {
        haproxy_relay(
            addr,
            "",
            "\tunique-id-format %{+X}o\\ %ci:%cp_%fi:%fp_%Ts_%rt:%pid\n",
            "",
            next,
            "send-proxy-v2 proxy-v2-options crc32c,unique-id",
        )
    })
    .await
}

/// HAProxy sending `version` to `next` and checking `next` every 100 ms with the header
/// `check-send-proxy` makes its checks send: a check passes when `next` answers a line that
/// starts with `expect` (`v1 ` or `v2 `, what a [`HeaderBackend`] answers to a header). The
/// answer may take up to 5 s (without `timeout check`, `inter` would bound it: too tight on a
/// busy machine).
async fn haproxy_checking(ip: IpAddr, version: Pp, next: SocketAddr, expect: Pp) -> Peer {
    let checks = format!(
        "\toption tcp-check\n\ttcp-check expect rstring \"^{} \"\n\ttimeout check 5s\n",
        expect.name()
    );
    let server = format!(
        "{} check check-send-proxy inter 100ms fall 1 rise 1",
        version.haproxy_send()
    );
    Peer::haproxy(ip, |addr| {
        haproxy_relay(addr, "", "", &checks, next, &server)
    })
    .await
}

/// HAProxy answering HTTP itself (200, `pp-ok`) to connections that start with a header.
async fn haproxy_http_accepting(ip: IpAddr) -> Peer {
    Peer::haproxy(ip, |addr| {
        format!(
            "frontend front\n\
             \tmode http\n\
             \tbind {addr} accept-proxy\n\
             \thttp-request return status 200 content-type text/plain string pp-ok\n"
        )
    })
    .await
}

/// The result of HAProxy's first finished check of server `next`: its `show stat` fields.
async fn haproxy_checked(haproxy: &Peer) -> HashMap<String, String> {
    let deadline = Instant::now() + SOON;
    loop {
        let mut stat = haproxy.haproxy_stat("next", "next").await;
        // "INI" until the first check ends; "* " before the last result marks a check under way.
        let check = stat["check_status"].trim_start_matches("* ").to_owned();
        if !check.is_empty() && check != "INI" {
            stat.insert("check_status".to_owned(), check);
            return stat;
        }
        assert!(
            Instant::now() < deadline,
            "HAProxy finished no check within {SOON:?}: {stat:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// nginx sending v1 (the only version nginx sends) to `next`.
async fn nginx_sending(ip: IpAddr, next: SocketAddr) -> Peer {
    Peer::nginx(ip, |addr| {
        format!("stream {{ server {{ listen {addr}; proxy_pass {next}; proxy_protocol on; }} }}")
    })
    .await
}

/// nginx accepting a header of either version and answering with the address it carries.
async fn nginx_accepting(ip: IpAddr) -> Peer {
    Peer::nginx(ip, |addr| {
        format!(
            "stream {{ server {{ listen {addr} proxy_protocol; \
             return \"$proxy_protocol_addr $proxy_protocol_port\\n\"; }} }}"
        )
    })
    .await
}

/// nginx answering HTTP itself (200, `pp-ok`) to connections that start with a header.
async fn nginx_http_accepting(ip: IpAddr) -> Peer {
    Peer::nginx(ip, |addr| {
        format!(
            "http {{ access_log off; server {{ listen {addr} proxy_protocol; \
             location / {{ return 200 \"pp-ok\\n\"; }} }} }}"
        )
    })
    .await
}

// ------------------------------------------------------------------------------- weighbridge

/// The weighbridge binary with one listener, `pp`, and one backend, its access log on.
struct Weighbridge {
    process: Process,
    addr: SocketAddr,
    _config: NamedTempFile,
}

impl Weighbridge {
    /// Listener `pp` on `ip` with the extra `listener` keys, relaying to `backend` with the
    /// extra `backend_keys`.
    async fn start(ip: IpAddr, listener: &str, backend: SocketAddr, backend_keys: &str) -> Self {
        let text = format!(
            "shutdown_grace = \"1s\"\n\
             [log]\naccess_log = true\n\
             [[listener]]\nname = \"pp\"\nbind = \"{bind}\"\n{listener}\n\
             [[listener.backend]]\naddr = \"{backend}\"\n{backend_keys}\n",
            bind = SocketAddr::new(ip, 0),
        );
        let config = config_file(&text);
        let mut process = Process::start(config.path(), &["--no-watch"]);
        // A config it refuses ends it at once: say so then, not after the wait for `listening`.
        poll_until(SOON, || {
            !process.running() || process.logged(" listening listener=pp ").is_some()
        })
        .await;
        if !process.running() {
            let status = process.exit_status(SOON).await;
            panic!(
                "weighbridge exited ({status}) instead of listening; config:\n{text}\nstderr:\n{}",
                process.tail()
            );
        }
        let addr = process.listening("pp").await;
        Weighbridge {
            process,
            addr,
            _config: config,
        }
    }

    /// Accepting `accept` from the proxies on loopback, sending `send` to `backend`.
    async fn behind_a_proxy(accept: &str, send: Pp, backend: SocketAddr) -> Self {
        let keys = format!(
            "accept_proxy = \"{accept}\"\nproxy_trusted = [\"127.0.0.0/8\"]\n\
             send_proxy = \"{}\"",
            send.name()
        );
        Weighbridge::start(LOOPBACK, &keys, backend, "").await
    }

    /// Facing clients on `ip` directly, sending `send` to `backend`.
    async fn in_front_of(ip: IpAddr, send: Pp, backend: SocketAddr) -> Self {
        let keys = format!("send_proxy = \"{}\"", send.name());
        Weighbridge::start(ip, &keys, backend, "").await
    }

    /// Waits for the access log line of the connection from `client`.
    async fn assert_logged(&self, client: SocketAddr) {
        let field = format!("client={client}");
        let found = poll_until(SOON, || {
            self.process.lines().iter().any(|line| {
                line.contains("weighbridge::access")
                    && line.split_whitespace().any(|word| word == field)
            })
        })
        .await;
        assert!(
            found,
            "no access log line with {field} within {SOON:?}; stderr:\n{}",
            self.process.tail()
        );
    }
}

// -------------------------------------------------------- the peers alone, without weighbridge

/// client → HAProxy `send-proxy(-v2)` → parsing backend.
async fn peer_haproxy_sends(client: IpAddr, version: Pp) {
    let backend = HeaderBackend::start().await;
    let haproxy = haproxy_sending(loopback_for(client), version, backend.addr).await;
    let (me, line) = through(client, haproxy.addr).await;
    assert_source(&line, version, me);
}

#[tokio::test]
async fn peer_haproxy_send_proxy_v1_ipv4() {
    bounded(LIMIT, peer_haproxy_sends(CLIENT_V4, Pp::V1)).await;
}

#[tokio::test]
async fn peer_haproxy_send_proxy_v2_ipv4() {
    bounded(LIMIT, peer_haproxy_sends(CLIENT_V4, Pp::V2)).await;
}

#[tokio::test]
async fn peer_haproxy_send_proxy_v1_ipv6() {
    bounded(LIMIT, peer_haproxy_sends(CLIENT_V6, Pp::V1)).await;
}

#[tokio::test]
async fn peer_haproxy_send_proxy_v2_ipv6() {
    bounded(LIMIT, peer_haproxy_sends(CLIENT_V6, Pp::V2)).await;
}

/// A header written by the test → HAProxy `accept-proxy` → `send-proxy-v2` → parsing backend.
#[tokio::test]
async fn peer_haproxy_accept_proxy_believes_v1_and_v2_headers() {
    bounded(LIMIT, async {
        let backend = HeaderBackend::start().await;
        let haproxy = haproxy_accepting(LOOPBACK, backend.addr).await;
        for version in [Pp::V1, Pp::V2] {
            for claimed in [CLAIMED_V4, CLAIMED_V6] {
                let claimed: SocketAddr = claimed.parse().expect("literal address");
                let header = version.header(claimed, haproxy.addr.port());
                let (_, line) = through_with_header(&header, haproxy.addr).await;
                assert_source(&line, Pp::V2, claimed);
            }
        }
    })
    .await;
}

/// client → nginx `proxy_protocol on` → parsing backend.
async fn peer_nginx_sends(client: IpAddr) {
    let backend = HeaderBackend::start().await;
    let nginx = nginx_sending(loopback_for(client), backend.addr).await;
    let (me, line) = through(client, nginx.addr).await;
    assert_source(&line, Pp::V1, me);
}

#[tokio::test]
async fn peer_nginx_proxy_protocol_ipv4() {
    bounded(LIMIT, peer_nginx_sends(CLIENT_V4)).await;
}

#[tokio::test]
async fn peer_nginx_proxy_protocol_ipv6() {
    bounded(LIMIT, peer_nginx_sends(CLIENT_V6)).await;
}

/// A header written by the test → nginx `listen ... proxy_protocol` → nginx's answer.
#[tokio::test]
async fn peer_nginx_listen_proxy_protocol_believes_v1_and_v2_headers() {
    bounded(LIMIT, async {
        let nginx = nginx_accepting(LOOPBACK).await;
        for version in [Pp::V1, Pp::V2] {
            for claimed in [CLAIMED_V4, CLAIMED_V6] {
                let claimed: SocketAddr = claimed.parse().expect("literal address");
                let mut stream = connect_from(LOOPBACK, nginx.addr).await;
                within(stream.write_all(&version.header(claimed, nginx.addr.port())))
                    .await
                    .expect("send the header");
                assert_eq!(
                    read_nginx_answer(&mut stream).await,
                    Ok(claimed),
                    "{version:?}"
                );
            }
        }
    })
    .await;
}

// ------------------------------------------------------------- HAProxy in front of weighbridge

/// client → HAProxy sending `haproxy_sends` → weighbridge with `accept_proxy = accept`, sending
/// `wb_sends` → parsing backend: the backend reads the client's address, and so does the
/// access log.
async fn haproxy_in_front(client: IpAddr, haproxy_sends: Pp, accept: &str, wb_sends: Pp) {
    let backend = HeaderBackend::start().await;
    let wb = Weighbridge::behind_a_proxy(accept, wb_sends, backend.addr).await;
    let haproxy = haproxy_sending(loopback_for(client), haproxy_sends, wb.addr).await;
    let (me, line) = through(client, haproxy.addr).await;
    assert_source(&line, wb_sends, me);
    wb.assert_logged(me).await;
}

#[tokio::test]
async fn haproxy_send_proxy_v1_to_accept_v1() {
    bounded(LIMIT, haproxy_in_front(CLIENT_V4, Pp::V1, "v1", Pp::V2)).await;
}

#[tokio::test]
async fn haproxy_send_proxy_v2_to_accept_v2() {
    bounded(LIMIT, haproxy_in_front(CLIENT_V4, Pp::V2, "v2", Pp::V1)).await;
}

#[tokio::test]
async fn haproxy_send_proxy_v1_to_accept_any() {
    bounded(LIMIT, haproxy_in_front(CLIENT_V4, Pp::V1, "any", Pp::V1)).await;
}

#[tokio::test]
async fn haproxy_send_proxy_v2_to_accept_any() {
    bounded(LIMIT, haproxy_in_front(CLIENT_V4, Pp::V2, "any", Pp::V2)).await;
}

#[tokio::test]
async fn haproxy_send_proxy_v1_ipv6_client() {
    bounded(LIMIT, haproxy_in_front(CLIENT_V6, Pp::V1, "v1", Pp::V1)).await;
}

#[tokio::test]
async fn haproxy_send_proxy_v2_ipv6_client() {
    bounded(LIMIT, haproxy_in_front(CLIENT_V6, Pp::V2, "any", Pp::V2)).await;
}

#[tokio::test]
async fn haproxy_send_proxy_v2_ipv6_client_sent_on_as_v1() {
    bounded(LIMIT, haproxy_in_front(CLIENT_V6, Pp::V2, "v2", Pp::V1)).await;
}

/// A backend's own `send_proxy` wins over its listener's.
#[tokio::test]
async fn backend_send_proxy_overrides_the_listeners() {
    bounded(LIMIT, async {
        let backend = HeaderBackend::start().await;
        let keys = "accept_proxy = \"any\"\nproxy_trusted = [\"127.0.0.0/8\"]\n\
                    send_proxy = \"v2\"";
        let wb = Weighbridge::start(LOOPBACK, keys, backend.addr, "send_proxy = \"v1\"").await;
        let haproxy = haproxy_sending(LOOPBACK, Pp::V2, wb.addr).await;
        let (me, line) = through(CLIENT_V4, haproxy.addr).await;
        assert_source(&line, Pp::V1, me);
    })
    .await;
}

/// A listener that accepts only v1 closes a connection that starts with HAProxy's v2 header,
/// without connecting to a backend.
#[tokio::test]
async fn accept_v1_closes_a_v2_header() {
    bounded(LIMIT, async {
        let backend = HeaderBackend::start().await;
        let wb = Weighbridge::behind_a_proxy("v1", Pp::V1, backend.addr).await;
        let haproxy = haproxy_sending(LOOPBACK, Pp::V2, wb.addr).await;
        let mut stream = connect_from(CLIENT_V4, haproxy.addr).await;
        assert_closed_without_data(&mut stream, SOON).await;
        assert_eq!(backend.accepted(), 0, "no backend connection for it");
    })
    .await;
}

// ---------------------------------------------------------------- HAProxy behind weighbridge

/// client → weighbridge sending `wb_sends` → HAProxy `accept-proxy`, sending v2 → parsing
/// backend: HAProxy believed the client's address.
async fn haproxy_behind(client: IpAddr, wb_sends: Pp) {
    let backend = HeaderBackend::start().await;
    let haproxy = haproxy_accepting(LOOPBACK, backend.addr).await;
    let wb = Weighbridge::in_front_of(loopback_for(client), wb_sends, haproxy.addr).await;
    let (me, line) = through(client, wb.addr).await;
    assert_source(&line, Pp::V2, me);
    wb.assert_logged(me).await;
}

#[tokio::test]
async fn send_proxy_v1_to_haproxy_accept_proxy() {
    bounded(LIMIT, haproxy_behind(CLIENT_V4, Pp::V1)).await;
}

#[tokio::test]
async fn send_proxy_v2_to_haproxy_accept_proxy() {
    bounded(LIMIT, haproxy_behind(CLIENT_V4, Pp::V2)).await;
}

#[tokio::test]
async fn send_proxy_v1_to_haproxy_accept_proxy_ipv6_client() {
    bounded(LIMIT, haproxy_behind(CLIENT_V6, Pp::V1)).await;
}

#[tokio::test]
async fn send_proxy_v2_to_haproxy_accept_proxy_ipv6_client() {
    bounded(LIMIT, haproxy_behind(CLIENT_V6, Pp::V2)).await;
}

// ---------------------------------------------------------------- nginx around weighbridge

/// client → nginx `proxy_protocol on` (v1) → weighbridge accepting v1, sending `wb_sends` →
/// parsing backend.
async fn nginx_in_front(client: IpAddr, wb_sends: Pp) {
    let backend = HeaderBackend::start().await;
    let wb = Weighbridge::behind_a_proxy("v1", wb_sends, backend.addr).await;
    let nginx = nginx_sending(loopback_for(client), wb.addr).await;
    let (me, line) = through(client, nginx.addr).await;
    assert_source(&line, wb_sends, me);
    wb.assert_logged(me).await;
}

#[tokio::test]
async fn nginx_proxy_protocol_to_accept_v1() {
    bounded(LIMIT, nginx_in_front(CLIENT_V4, Pp::V2)).await;
}

#[tokio::test]
async fn nginx_proxy_protocol_to_accept_v1_ipv6_client() {
    bounded(LIMIT, nginx_in_front(CLIENT_V6, Pp::V1)).await;
}

/// client → weighbridge sending `wb_sends` → nginx `listen ... proxy_protocol`, answering with
/// the address it read.
async fn nginx_behind(client: IpAddr, wb_sends: Pp) {
    let nginx = nginx_accepting(LOOPBACK).await;
    let wb = Weighbridge::in_front_of(loopback_for(client), wb_sends, nginx.addr).await;
    let (me, answer) = nginx_returns(client, wb.addr).await;
    assert_eq!(answer, Ok(me), "nginx should read the client's address");
    wb.assert_logged(me).await;
}

#[tokio::test]
async fn send_proxy_v1_to_nginx() {
    bounded(LIMIT, nginx_behind(CLIENT_V4, Pp::V1)).await;
}

#[tokio::test]
async fn send_proxy_v2_to_nginx() {
    bounded(LIMIT, nginx_behind(CLIENT_V4, Pp::V2)).await;
}

#[tokio::test]
async fn send_proxy_v1_to_nginx_ipv6_client() {
    bounded(LIMIT, nginx_behind(CLIENT_V6, Pp::V1)).await;
}

#[tokio::test]
async fn send_proxy_v2_to_nginx_ipv6_client() {
    bounded(LIMIT, nginx_behind(CLIENT_V6, Pp::V2)).await;
}

// ------------------------------------------------------------ TLVs, LOCAL headers, health checks

/// A header that tells no client: v2 LOCAL (a proxy's own connection, such as a health check)
/// or v1 UNKNOWN.
fn local_header(version: Pp) -> Vec<u8> {
    match version {
        Pp::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        Pp::V2 => v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Local,
            v2::Protocol::Unspecified,
            v2::Addresses::Unspecified,
        )
        .build()
        .expect("a LOCAL header builds"),
    }
}

#[tokio::test]
async fn peer_haproxy_send_proxy_v2_with_tlvs() {
    bounded(LIMIT, async {
        let backend = HeaderBackend::start().await;
        let haproxy = haproxy_sending_tlvs(LOOPBACK, backend.addr).await;
        let (me, line) = through(CLIENT_V4, haproxy.addr).await;
        assert_source(&line, Pp::V2, me);
        assert!(line.ends_with(" tlvs=0x3,0x5"), "{line:?}");
    })
    .await;
}

/// TLVs after the addresses (counted in the header's length) are taken off with the header:
/// the client's bytes behind them arrive exact.
#[tokio::test]
async fn haproxy_send_proxy_v2_with_tlvs_to_accept_v2() {
    bounded(LIMIT, async {
        let backend = HeaderBackend::start().await;
        let wb = Weighbridge::behind_a_proxy("v2", Pp::V2, backend.addr).await;
        let haproxy = haproxy_sending_tlvs(LOOPBACK, wb.addr).await;
        let (me, line) = through(CLIENT_V4, haproxy.addr).await;
        assert_source(&line, Pp::V2, me);
        wb.assert_logged(me).await;
    })
    .await;
}

/// What HAProxy's health checks send with `check-send-proxy`: in v1 the check connection's
/// own addresses, in v2 LOCAL.
#[tokio::test]
async fn peer_haproxy_checks_send_their_own_addresses_in_v1_and_local_in_v2() {
    bounded(LIMIT, async {
        for version in [Pp::V1, Pp::V2] {
            let backend = HeaderBackend::start().await;
            let haproxy = haproxy_checking(LOOPBACK, version, backend.addr, version).await;
            let stat = haproxy_checked(&haproxy).await;
            assert_eq!(
                (stat["status"].as_str(), stat["check_status"].as_str()),
                ("UP", "L7OK"),
                "{version:?}: {stat:?}"
            );
            let answer = &backend.answers()[0];
            match version {
                Pp::V1 => assert!(
                    answer.starts_with("v1 127.0.0.1:")
                        && answer.ends_with(&format!(" {}", backend.addr)),
                    "{answer:?}"
                ),
                Pp::V2 => assert_eq!(answer, "v2 local"),
            }
        }
    })
    .await;
}

/// HAProxy's health checks of weighbridge (which accepts the PROXY protocol) pass: their
/// header (v1 with the check's addresses, v2 LOCAL) is accepted, and the check goes through to
/// the backend with a header of weighbridge's.
async fn haproxy_checks_weighbridge(version: Pp) {
    let backend = HeaderBackend::start().await;
    let wb = Weighbridge::behind_a_proxy(version.name(), Pp::V2, backend.addr).await;
    let haproxy = haproxy_checking(LOOPBACK, version, wb.addr, Pp::V2).await;
    let stat = haproxy_checked(&haproxy).await;
    assert_eq!(
        (stat["status"].as_str(), stat["check_status"].as_str()),
        ("UP", "L7OK"),
        "HAProxy's check of weighbridge: {stat:?}; backend answered {:?}; weighbridge:\n{}",
        backend.answers(),
        wb.process.tail()
    );
}

#[tokio::test]
async fn haproxy_v1_checks_through_accept_v1() {
    bounded(LIMIT, haproxy_checks_weighbridge(Pp::V1)).await;
}

#[tokio::test]
async fn haproxy_v2_checks_with_local_through_accept_v2() {
    bounded(LIMIT, haproxy_checks_weighbridge(Pp::V2)).await;
}

/// HAProxy, given a LOCAL or UNKNOWN header, takes the connection's real source for the client
/// (as doc/proxy-protocol.txt asks of a receiver) and passes that on in its own header.
#[tokio::test]
async fn peer_haproxy_passes_on_its_peer_for_local_and_unknown() {
    bounded(LIMIT, async {
        let backend = HeaderBackend::start().await;
        let haproxy = haproxy_accepting(LOOPBACK, backend.addr).await;
        for version in [Pp::V1, Pp::V2] {
            let (me, line) = through_with_header(&local_header(version), haproxy.addr).await;
            assert_source(&line, Pp::V2, me);
        }
    })
    .await;
}

/// The same through weighbridge: the peer's address is the client's (it is in the access log)
/// and so would go on with `send_proxy`, as HAProxy does.
#[tokio::test]
async fn local_and_unknown_go_on_as_the_peers_address_like_haproxy() {
    bounded(LIMIT, async {
        for send in [Pp::V1, Pp::V2] {
            let backend = HeaderBackend::start().await;
            let wb = Weighbridge::behind_a_proxy("any", send, backend.addr).await;
            for version in [Pp::V1, Pp::V2] {
                let (me, line) = through_with_header(&local_header(version), wb.addr).await;
                wb.assert_logged(me).await;
                assert_source(&line, send, me);
            }
        }
    })
    .await;
}

/// weighbridge's health probes of a backend that gets PROXY headers start with a LOCAL (v2)
/// or UNKNOWN (v1) one: `peer` (HAProxy or nginx, answering `pp-ok` to any HTTP request on a
/// connection that starts with a header) must accept it for the probe to pass.
async fn probes_pass_at(peer: &Peer, version: Pp) {
    let toml = format!(
        "shutdown_grace = \"1s\"\n\
         [[listener]]\nname = \"{LISTENER}\"\nbind = \"127.0.0.1:0\"\nsend_proxy = \"{send}\"\n\
         [listener.health]\nkind = \"http\"\npath = \"/health\"\nexpect_body = \"pp-ok\"\n\
         interval = \"100ms\"\nstartup_grace = \"0s\"\n\
         [[listener.backend]]\naddr = \"{peer}\"\n",
        send = version.name(),
        peer = peer.addr,
    );
    let lb = start_balancer(&toml);
    let mut health = None;
    poll_until(SOON, || {
        health = lb.handle.backend_health(LISTENER, peer.addr);
        health.is_some_and(|h| h.last_check.is_some())
    })
    .await;
    let health = health.expect("the backend is configured");
    let check = health
        .last_check
        .unwrap_or_else(|| panic!("no probe of {} within {SOON:?}", peer.name));
    assert_eq!(
        (check.result, health.status),
        (Ok(()), HealthStatus::Healthy),
        "{} should accept a {} probe",
        peer.name,
        version.name()
    );
    lb.stop().await;
}

#[tokio::test]
async fn probes_with_unknown_pass_at_haproxy() {
    bounded(LIMIT, async {
        probes_pass_at(&haproxy_http_accepting(LOOPBACK).await, Pp::V1).await;
    })
    .await;
}

#[tokio::test]
async fn probes_with_local_pass_at_haproxy() {
    bounded(LIMIT, async {
        probes_pass_at(&haproxy_http_accepting(LOOPBACK).await, Pp::V2).await;
    })
    .await;
}

#[tokio::test]
async fn probes_with_unknown_pass_at_nginx() {
    bounded(LIMIT, async {
        probes_pass_at(&nginx_http_accepting(LOOPBACK).await, Pp::V1).await;
    })
    .await;
}

#[tokio::test]
async fn probes_with_local_pass_at_nginx() {
    bounded(LIMIT, async {
        probes_pass_at(&nginx_http_accepting(LOOPBACK).await, Pp::V2).await;
    })
    .await;
}
