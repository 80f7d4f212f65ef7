//! A DNS name of 1,000 addresses, changed while thousands of connections are open through the
//! balancer: how long the control plane takes to apply the change, and whether any open
//! connection or new client stalls meanwhile.
//!
//! Three processes, so that no one of them runs out of descriptors: this one (the DNS server of
//! tests/support/dns.rs, the clients, the measurements), a copy of it serving the backends (one
//! echo listener per address), and the weighbridge binary. Run with
//! `cargo bench --bench discovery` (optionally `-- CONNECTIONS`); figures go to
//! docs/benchmarks.md by hand.

#[allow(dead_code)]
#[path = "../tests/support/dns.rs"]
mod dns;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Addresses the name gives at first.
const ADDRESSES: usize = 1_000;
/// Addresses the change replaces (removed, and as many new ones added).
const REPLACED: usize = 100;
/// Open connections held through the balancer while the name changes, unless given on the
/// command line. Two descriptors each in the balancer: its 20,000-descriptor hard limit here
/// leaves room for about 9,900.
const DEFAULT_CONNECTIONS: usize = 9_500;
/// Connections doing echo round trips throughout, whose latencies are measured.
const PROBES: usize = 32;
/// How long each measured window lasts.
const WINDOW: Duration = Duration::from_secs(3);

/// The `i`th backend address: 127.1.x.y, clear of 127.0.0.x that tests use.
fn address(i: usize) -> IpAddr {
    let i = u32::try_from(i).expect("few addresses");
    IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 1, 0, 1)) + i))
}

fn main() {
    if std::env::var_os("DISCOVERY_BENCH_BACKENDS").is_some() {
        return backends();
    }
    // `cargo bench` passes `--bench`; a number among the arguments is the connection count.
    let connections = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(DEFAULT_CONNECTIONS);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(measure(connections));
}

/// The backend process: an echo listener on every address, all on one port, printed first.
fn backends() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let port = 'port: loop {
            let first = TcpListener::bind(SocketAddr::new(address(0), 0))
                .await
                .expect("bind the first backend");
            let port = first.local_addr().expect("address").port();
            let mut listeners = vec![first];
            for i in 1..ADDRESSES + REPLACED {
                match TcpListener::bind(SocketAddr::new(address(i), port)).await {
                    Ok(listener) => listeners.push(listener),
                    Err(_) => continue 'port,
                }
            }
            for listener in listeners {
                tokio::spawn(async move {
                    while let Ok((stream, _)) = listener.accept().await {
                        tokio::spawn(echo(stream));
                    }
                });
            }
            break port;
        };
        println!("PORT {port}");
        std::io::stdout().flush().expect("stdout");
        std::future::pending::<()>().await;
    });
}

async fn echo(mut stream: TcpStream) {
    let mut buf = [0_u8; 512];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn measure(connections: usize) {
    let dns = dns::DnsServer::start().await;
    let mut backend_process = Command::new(std::env::current_exe().expect("own path"))
        .env("DISCOVERY_BENCH_BACKENDS", "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the backends");
    let mut line = String::new();
    BufReader::new(backend_process.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the backends' port");
    let _backends = Killed(backend_process);
    let port: u16 = line
        .trim()
        .strip_prefix("PORT ")
        .and_then(|p| p.parse().ok())
        .expect("PORT line");
    let first: Vec<IpAddr> = (0..ADDRESSES).map(address).collect();
    dns.set_a("fleet.bench", &first, 1);

    let listen = TcpListener::bind("127.0.0.1:0").await.expect("free port");
    let lb_addr = listen.local_addr().expect("address");
    drop(listen);
    let config = format!(
        "shutdown_grace = \"1s\"\n[resolver]\nnameservers = [\"{}\"]\nrefresh = \"1s\"\n\
         [[listener]]\nname = \"bench\"\nbind = \"{lb_addr}\"\nmax_connections = 20000\n\
         [[listener.backend]]\naddr = \"fleet.bench:{port}\"\n",
        dns.addr
    );
    let file = std::env::temp_dir().join(format!("discovery-bench-{}.toml", std::process::id()));
    std::fs::write(&file, config).expect("write config");
    let mut balancer = Command::new(env!("CARGO_BIN_EXE_weighbridge"))
        .arg("--config")
        .arg(&file)
        .args([
            "--no-watch",
            "--log-level",
            "info,weighbridge::control=debug",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("start weighbridge");
    let stderr = balancer.stderr.take().expect("stderr");
    let _balancer = Killed(balancer);
    // Every "backend names applied" line's time to apply, in µs, as the log reports it.
    let applied: Arc<Mutex<Vec<u64>>> = Arc::default();
    std::thread::spawn({
        let applied = Arc::clone(&applied);
        move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("backend names applied") {
                    if let Some(us) = line
                        .split_whitespace()
                        .find_map(|f| f.strip_prefix("took_us="))
                        .and_then(|v| v.parse().ok())
                    {
                        applied.lock().expect("applied").push(us);
                    }
                }
            }
        }
    });
    wait_until(|| !applied.lock().expect("applied").is_empty()).await;
    eprintln!("{ADDRESSES} addresses resolved; opening {connections} connections");

    let mut held = Vec::with_capacity(connections);
    for _ in 0..connections {
        let mut stream = TcpStream::connect(lb_addr).await.expect("connect");
        stream.write_all(b"x").await.expect("write");
        let mut byte = [0_u8; 1];
        stream.read_exact(&mut byte).await.expect("echo");
        held.push(stream);
    }
    eprintln!("{connections} connections open; probing");

    // Round trips on open connections, and new connections, each with its start time.
    let samples: Arc<Mutex<Vec<(Instant, Duration, bool)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut probes = Vec::new();
    for (i, mut stream) in held.drain(..PROBES).enumerate() {
        let (samples, stop) = (Arc::clone(&samples), Arc::clone(&stop));
        probes.push(tokio::spawn(async move {
            let mut buf = [0_u8; 64];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let start = Instant::now();
                let fresh = i % 2 == 0;
                if fresh {
                    // A new client each time: connect, one round trip, close.
                    let mut new = TcpStream::connect(lb_addr).await.expect("connect");
                    new.write_all(&buf[..16]).await.expect("write");
                    new.read_exact(&mut buf[..16]).await.expect("echo");
                } else {
                    stream.write_all(&buf[..16]).await.expect("write");
                    stream.read_exact(&mut buf[..16]).await.expect("echo");
                }
                samples
                    .lock()
                    .expect("samples")
                    .push((start, start.elapsed(), fresh));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    tokio::time::sleep(WINDOW).await;
    let changed_at = Instant::now();
    let before = applied.lock().expect("applied").len();
    let second: Vec<IpAddr> = (REPLACED..ADDRESSES + REPLACED).map(address).collect();
    dns.set_a("fleet.bench", &second, 1);
    wait_until(|| applied.lock().expect("applied").len() > before).await;
    let seen_at = Instant::now();
    tokio::time::sleep(WINDOW).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for probe in probes {
        probe.await.expect("probe");
    }
    // The held connections still echo.
    let mut alive = 0;
    for stream in &mut held {
        let mut byte = [0_u8; 1];
        if stream.write_all(b"y").await.is_ok() && stream.read_exact(&mut byte).await.is_ok() {
            alive += 1;
        }
    }

    let took = applied.lock().expect("applied").clone();
    let samples = samples.lock().expect("samples").clone();
    let window = |from: Instant, to: Instant, fresh: bool| -> Vec<Duration> {
        let mut w: Vec<Duration> = samples
            .iter()
            .filter(|(at, _, f)| *at >= from && *at < to && *f == fresh)
            .map(|(_, d, _)| *d)
            .collect();
        w.sort();
        w
    };
    let report = |label: &str, w: &[Duration]| {
        let q = |p: f64| w[((w.len() as f64 - 1.0) * p) as usize];
        println!(
            "{label}: {} samples, p50 {:?}, p99 {:?}, max {:?}",
            w.len(),
            q(0.5),
            q(0.99),
            w[w.len() - 1]
        );
    };
    println!(
        "one name: {ADDRESSES} addresses, {REPLACED} replaced, {connections} connections open"
    );
    println!(
        "control plane: apply the change {} µs (first resolution {} µs; every apply: {took:?})",
        took.last().copied().unwrap_or_default(),
        took.first().copied().unwrap_or_default()
    );
    println!(
        "change seen applied {:?} after the records changed",
        seen_at - changed_at
    );
    let quiet = changed_at - WINDOW;
    report(
        "round trip on an open connection, before",
        &window(quiet, changed_at, false),
    );
    report(
        "round trip on an open connection, around the change",
        &window(changed_at, seen_at + WINDOW, false),
    );
    report(
        "new client (connect + round trip), before",
        &window(quiet, changed_at, true),
    );
    report(
        "new client (connect + round trip), around the change",
        &window(changed_at, seen_at + WINDOW, true),
    );
    println!(
        "held connections still echoing after the change: {alive} of {}",
        held.len()
    );
    let _ = std::fs::remove_file(&file);
}

/// Polls `condition` every 10 ms for up to a minute.
async fn wait_until(mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
