//! The PROXY protocol against the real thing: HAProxy and nginx (stream) in front of weighbridge,
//! sending it v1 and v2 headers, and behind it, reading the headers it sends; clients on IPv4
//! and IPv6. Each test starts its own processes on loopback, with ports the kernel picked and
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

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ppp::{HeaderResult, PartialResult, v1, v2};
use tempfile::{NamedTempFile, TempDir};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use support::{
    Process, assert_closed_without_data, bounded, close, config_file, echo, poll_until, within,
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
/// The clients' IPv6 address.
const CLIENT_V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
/// Where the proxies and backends listen, and connect from.
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
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
        let loopback = match source {
            SocketAddr::V4(_) => LOOPBACK,
            SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        let destination = SocketAddr::new(loopback, port);
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

// ------------------------------------------------------------------------- the parsing backend

/// A backend that reads the PROXY header each connection starts with and answers one line
/// saying what it read (`v1 SOURCE DESTINATION`, `v2 local`, `error: ...`), then echoes the
/// rest of the stream.
struct HeaderBackend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl HeaderBackend {
    async fn start() -> HeaderBackend {
        let listener = TcpListener::bind(SocketAddr::new(LOOPBACK, 0))
            .await
            .expect("bind the header backend on loopback");
        let addr = listener.local_addr().expect("header backend address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        count.fetch_add(1, Ordering::SeqCst);
                        tokio::spawn(serve_header(stream));
                    }
                    Err(e) => {
                        eprintln!("header backend: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
        HeaderBackend { addr, accepted }
    }

    /// Connections accepted so far.
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn serve_header(mut stream: TcpStream) {
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
async fn read_line(stream: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut reader = BufReader::new(stream);
    within(reader.read_until(b'\n', &mut line))
        .await
        .expect("read the backend's answer through the chain");
    assert!(
        reader.buffer().is_empty(),
        "bytes after the answer line before anything was sent"
    );
    assert_eq!(
        line.pop(),
        Some(b'\n'),
        "the chain closed before a whole answer line: {:?}",
        String::from_utf8_lossy(&line)
    );
    String::from_utf8(line).expect("the answer is text")
}

/// A connection from `from` through the chain that starts at `entry` and ends at a
/// [`HeaderBackend`]: the client's address, and the line the backend answered. The stream then
/// carries bytes both ways and ends cleanly.
async fn through(from: IpAddr, entry: SocketAddr) -> (SocketAddr, String) {
    let mut stream = connect_from(from, entry).await;
    let me = stream.local_addr().expect("client address");
    let line = read_line(&mut stream).await;
    if !line.starts_with("error") {
        echo(&mut stream, b"after the header, the stream itself")
            .await
            .expect("echo through the chain");
        close(stream).await.expect("the chain ends cleanly");
    }
    (me, line)
}

/// Like [`through`] for a client on 127.0.0.1 that writes a `version` header of its own first,
/// claiming to be `claimed`; the line the backend answered.
async fn through_claiming(version: Pp, claimed: SocketAddr, entry: SocketAddr) -> String {
    let mut stream = connect_from(LOOPBACK, entry).await;
    let header = version.header(claimed, entry.port());
    within(stream.write_all(&header))
        .await
        .expect("send the header");
    let line = read_line(&mut stream).await;
    echo(&mut stream, b"ping")
        .await
        .expect("echo through the chain");
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

/// `name` on the PATH or in the sbin directories (a user's PATH may lack them).
fn program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|file| file.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed: {INSTALL}"))
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
    _dir: TempDir,
}

impl Peer {
    /// HAProxy on `ip` in TCP mode, relaying to `next` with the `server` line's `options`;
    /// `bind_options` go on its `bind` line.
    async fn haproxy(ip: IpAddr, bind_options: &str, next: SocketAddr, options: &str) -> Peer {
        let haproxy = program("haproxy");
        Peer::start("haproxy", ip, |addr, dir| {
            let config = dir.join("haproxy.cfg");
            let text = format!(
                "global\n\
                 \tnbthread 1\n\
                 \tpidfile {pid}\n\
                 defaults\n\
                 \tmode tcp\n\
                 \ttimeout connect 5s\n\
                 \ttimeout client 30s\n\
                 \ttimeout server 30s\n\
                 frontend front\n\
                 \tbind {addr} {bind_options}\n\
                 \tdefault_backend next\n\
                 backend next\n\
                 \tserver next {next} {options}\n",
                pid = dir.join("haproxy.pid").display(),
            );
            std::fs::write(&config, text).expect("write haproxy.cfg");
            // -db: in the foreground, one process, so killing it stops it all.
            let mut command = Command::new(&haproxy);
            command.arg("-db").arg("-f").arg(&config);
            command
        })
        .await
    }

    /// nginx on `ip` with one stream `server` whose `listen` takes `listen_options` and whose
    /// body is `body`.
    async fn nginx(ip: IpAddr, listen_options: &str, body: &str) -> Peer {
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
                 stream {{\n\
                 \tserver {{\n\
                 \t\tlisten {addr} {listen_options};\n\
                 \t\t{body}\n\
                 \t}}\n\
                 }}\n",
                pid = dir.join("nginx.pid").display(),
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
                _dir: dir,
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

/// HAProxy sending `version` to `next`.
async fn haproxy_sending(ip: IpAddr, version: Pp, next: SocketAddr) -> Peer {
    Peer::haproxy(ip, "", next, version.haproxy_send()).await
}

/// HAProxy accepting a header of either version, and sending v2 to `next`.
async fn haproxy_accepting(ip: IpAddr, next: SocketAddr) -> Peer {
    Peer::haproxy(ip, "accept-proxy", next, Pp::V2.haproxy_send()).await
}

/// nginx sending v1 (the only version nginx sends) to `next`.
async fn nginx_sending(ip: IpAddr, next: SocketAddr) -> Peer {
    let body = format!("proxy_pass {next};\n\t\tproxy_protocol on;");
    Peer::nginx(ip, "", &body).await
}

/// nginx accepting a header of either version and answering with the address it carries.
async fn nginx_accepting(ip: IpAddr) -> Peer {
    Peer::nginx(
        ip,
        "proxy_protocol",
        r#"return "$proxy_protocol_addr $proxy_protocol_port\n";"#,
    )
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
    let haproxy = haproxy_sending(client, version, backend.addr).await;
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
                let line = through_claiming(version, claimed, haproxy.addr).await;
                assert_source(&line, Pp::V2, claimed);
            }
        }
    })
    .await;
}

/// client → nginx `proxy_protocol on` → parsing backend.
async fn peer_nginx_sends(client: IpAddr) {
    let backend = HeaderBackend::start().await;
    let nginx = nginx_sending(client, backend.addr).await;
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
    let haproxy = haproxy_sending(client, haproxy_sends, wb.addr).await;
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
        let haproxy = haproxy_sending(CLIENT_V4, Pp::V2, wb.addr).await;
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
        let haproxy = haproxy_sending(CLIENT_V4, Pp::V2, wb.addr).await;
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
    let wb = Weighbridge::in_front_of(client, wb_sends, haproxy.addr).await;
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
    let nginx = nginx_sending(client, wb.addr).await;
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
    let wb = Weighbridge::in_front_of(client, wb_sends, nginx.addr).await;
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
