//! Each strategy at work, over real loopback sockets, in one process.
//!
//! ```text
//! cargo run --release --example demo
//! cargo run --release --example demo -- --admin 127.0.0.1:9900 --hold 60s
//! ```
//!
//! Starts four mock inference servers with capacities 1.5, 2, 1 and 2.5 (Σ = 7), and a balancer
//! with one listener per strategy over them. Short request/reply connections go through
//! `weighted_round_robin` and `weighted_random`; for `capacity_proportional` long-lived
//! connections are held open at once. For each strategy it prints every backend's expected share
//! (w_i / Σw) next to the share it observed.
//!
//! Then health checks at work: four mock inference servers (`examples/mock_inference.rs`) behind
//! a listener with HTTP health checks and a slow start, under steady client traffic. One server
//! dies mid-run and comes back; every half second a row shows each server's share of the
//! requests in that half second, so you see its traffic leave, return and ramp up. Then the
//! balancer shuts down. The whole demo takes about 10 s. The balancer's health transitions are
//! logged (stderr) as they happen; set `RUST_LOG` (e.g. `RUST_LOG=weighbridge=debug`) to see
//! more of its logs.
//!
//! `--admin ADDR` also serves the admin endpoint there, and `--hold DURATION` keeps the balancer
//! running that long after the tables (Ctrl-C ends it sooner), so that
//! `curl http://ADDR/metrics` and `curl http://ADDR/status` show the traffic the tables count.

#[allow(dead_code)] // The demo uses the mock server, not the example's own `main`.
mod mock_inference;

use std::error::Error;
use std::io::{self, IsTerminal};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use tracing_subscriber::EnvFilter;
use weighbridge::{Balancer, Config, Handle, HealthStatus, StrategyKind};

use mock_inference::{Mock, MockOptions};

/// Capacities (weights) of the four mock servers.
const CAPACITIES: [f64; 4] = [1.5, 2.0, 1.0, 2.5];
/// Short connections sent through weighted round robin: 200 full cycles of 14 picks.
const ROUND_ROBIN_CONNECTIONS: usize = 2800;
/// Short connections sent through weighted random.
const RANDOM_CONNECTIONS: usize = 4000;
/// Connections held open at once through capacity-proportional.
const HELD_CONNECTIONS: usize = 700;
/// Client connections being opened or served at any one time.
const IN_FLIGHT: usize = 32;
/// Longest wait for one client's reply; a stuck demo fails instead of hanging.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Name of the health-checked listener.
const HEALTH_LISTENER: &str = "health";
/// Its health checks: probe every 200 ms, out after 2 failures, back after 2 passes, then a 3 s
/// ramp.
const HEALTH_TABLE: &str = "[listener.health]\nkind = \"http\"\npath = \"/health\"\n\
    interval = \"200ms\"\ntimeout = \"200ms\"\nfall = 2\nrise = 2\nslow_start = \"3s\"\n";
/// How long the health phase runs, and when its victim dies and comes back.
const HEALTH_RUN: Duration = Duration::from_secs(9);
const DIES_AT: Duration = Duration::from_millis(1500);
const RETURNS_AT: Duration = Duration::from_millis(4000);
/// Length of one row of the health table.
const ROW: Duration = Duration::from_millis(500);
/// Clients sending requests back to back during the health phase.
const HEALTH_CLIENTS: usize = 4;

/// What the command line asks for beyond the tables.
struct Options {
    /// Where to serve the admin endpoint.
    admin: Option<SocketAddr>,
    /// How long to keep running after the tables.
    hold: Duration,
}

impl Options {
    fn parse() -> Result<Options, String> {
        const USAGE: &str = "usage: demo [--admin IP:PORT] [--hold DURATION]";
        let mut options = Options {
            admin: None,
            hold: Duration::ZERO,
        };
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            let value = args
                .next()
                .ok_or_else(|| format!("{flag} needs a value; {USAGE}"))?;
            match flag.as_str() {
                "--admin" => {
                    let addr = value
                        .parse()
                        .map_err(|_| format!("--admin: `{value}` is not IP:PORT"))?;
                    options.admin = Some(addr);
                }
                "--hold" => {
                    options.hold = humantime::parse_duration(&value)
                        .map_err(|e| format!("--hold: `{value}`: {e}"))?;
                }
                _ => return Err(format!("unknown argument `{flag}`; {USAGE}")),
            }
        }
        Ok(options)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let options = Options::parse()?;
    // Health transitions as they happen; not the connect failure of every request that meets
    // the dying server before the checks take it out (each is retried on another server).
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("warn,weighbridge::dataplane=error,weighbridge::control::checker=info,weighbridge::control::supervisor=info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        // Colour only on a terminal: a redirected log stays plain text.
        .with_ansi(io::stderr().is_terminal())
        .init();
    // 700 held connections take 2,800 descriptors here: client, balancer (two) and mock ends.
    rlimit::increase_nofile_limit(u64::MAX)?;

    let mut backends = Vec::with_capacity(CAPACITIES.len());
    for capacity in CAPACITIES {
        backends.push((start_mock().await?, capacity));
    }
    let mut inference = Vec::with_capacity(4);
    for _ in 0..4 {
        inference.push(
            Mock::start(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                MockOptions::default(),
            )
            .await?,
        );
    }
    let inference_addrs: Vec<SocketAddr> = inference.iter().map(Mock::addr).collect();
    let text = config_text(&backends, options.admin) + &health_config_text(&inference_addrs);
    let config = Config::parse(&text, Path::new("<demo>"))?;
    let balancer = Balancer::bind(&config)?;
    let admin = balancer.admin_addr();
    let handle = balancer.handle();
    let shutdown = CancellationToken::new();
    let addr_of = |kind: StrategyKind| {
        balancer
            .local_addr(kind.as_str())
            .expect("the config has one listener per strategy")
    };
    let [round_robin, random, capacity, hashed] = StrategyKind::ALL.map(addr_of);
    let health_addr = balancer
        .local_addr(HEALTH_LISTENER)
        .expect("the config has the health listener");
    let running = tokio::spawn(balancer.run(shutdown.clone()));

    for (kind, addr, connections) in [
        (
            StrategyKind::WeightedRoundRobin,
            round_robin,
            ROUND_ROBIN_CONNECTIONS,
        ),
        (StrategyKind::WeightedRandom, random, RANDOM_CONNECTIONS),
    ] {
        let started = Instant::now();
        let replies = clients(addr, connections, false).await?;
        show(
            &handle,
            kind,
            &backends,
            &replies,
            Count::Established,
            started,
        )?;
    }

    let started = Instant::now();
    let held = clients(capacity, HELD_CONNECTIONS, true).await?;
    let kind = StrategyKind::CapacityProportional;
    show(&handle, kind, &backends, &held, Count::Open, started)?;
    drop(held);
    wait_until_closed(&handle, kind, &backends).await?;

    affinity_phase(hashed).await?;

    health_phase(&handle, health_addr, &mut inference).await?;

    if !options.hold.is_zero() {
        if let Some(admin) = admin {
            println!("admin endpoint: curl http://{admin}/metrics  |  curl http://{admin}/status");
        }
        println!(
            "holding for {} (Ctrl-C to stop sooner)",
            humantime::format_duration(options.hold)
        );
        tokio::select! {
            () = tokio::time::sleep(options.hold) => {}
            interrupted = tokio::signal::ctrl_c() => interrupted?,
        }
    }
    shutdown.cancel();
    let stopped = running.await?;
    println!(
        "balancer stopped; {} connection(s) cut",
        stopped.cut_connections
    );
    Ok(())
}

/// Starts a mock inference server on a free port: it reads one request line, replies with its
/// own address, then keeps the connection open until the client closes it.
async fn start_mock() -> io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, addr).await {
                            warn!(mock = %addr, error = %e, "mock connection failed");
                        }
                    });
                }
                Err(e) => {
                    warn!(mock = %addr, error = %e, "mock accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    });
    Ok(addr)
}

/// Serves one connection of the mock at `me`.
async fn answer(mut stream: TcpStream, me: SocketAddr) -> io::Result<()> {
    let (reader, mut writer) = stream.split();
    let mut reader = BufReader::new(reader);
    let mut request = String::new();
    reader.read_line(&mut request).await?;
    writer.write_all(format!("{me}\n").as_bytes()).await?;
    tokio::io::copy(&mut reader, &mut tokio::io::sink()).await?;
    Ok(())
}

/// The balancer's configuration: one listener per strategy, all over the same backends, and the
/// admin endpoint if asked for.
fn config_text(backends: &[(SocketAddr, f64)], admin: Option<SocketAddr>) -> String {
    let mut text = String::from("shutdown_grace = \"2s\"\n");
    if let Some(admin) = admin {
        text += &format!("\n[admin]\nbind = \"{admin}\"\n");
    }
    for kind in StrategyKind::ALL {
        text += &format!("\n[[listener]]\nname = \"{kind}\"\nbind = \"127.0.0.1:0\"\n");
        text += &format!("strategy = \"{kind}\"\n");
        for (addr, weight) in backends {
            text += &format!("[[listener.backend]]\naddr = \"{addr}\"\nweight = {weight}\n");
        }
    }
    text
}

/// Opens `n` client connections to `balancer`, at most [`IN_FLIGHT`] at a time. Each sends a
/// request and reads which backend answered; with `hold` the connection is returned open,
/// otherwise it is closed at once.
async fn clients(
    balancer: SocketAddr,
    n: usize,
    hold: bool,
) -> io::Result<Vec<(SocketAddr, Option<TcpStream>)>> {
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let permit = Arc::clone(&in_flight)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        tasks.spawn(async move {
            let _permit = permit;
            let (backend, stream) =
                tokio::time::timeout(REPLY_TIMEOUT, request(balancer)).await??;
            io::Result::Ok((backend, hold.then_some(stream)))
        });
    }
    let mut replies = Vec::with_capacity(n);
    while let Some(joined) = tasks.join_next().await {
        replies.push(joined??);
    }
    Ok(replies)
}

/// One client: connects, sends a request and returns the backend that answered, with the
/// connection still open.
async fn request(balancer: SocketAddr) -> io::Result<(SocketAddr, TcpStream)> {
    let mut stream = TcpStream::connect(balancer).await?;
    stream.write_all(b"generate\n").await?;
    let mut reply = String::new();
    // The mock sends nothing after its one line, so the buffer holds nothing beyond it.
    BufReader::new(&mut stream).read_line(&mut reply).await?;
    let backend = reply.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected reply {reply:?}"),
        )
    })?;
    Ok((backend, stream))
}

/// Which of a backend's counters a table shows.
#[derive(Clone, Copy)]
enum Count {
    /// Connections established since start.
    Established,
    /// Connections open now.
    Open,
}

/// What `kind` does, in one line.
fn explain(kind: StrategyKind) -> &'static str {
    match kind {
        StrategyKind::WeightedRoundRobin => {
            "smooth round robin (nginx's): each cycle of 14 picks gives backend i exactly \
             2 x w_i, interleaved, so shares are exact"
        }
        StrategyKind::WeightedRandom => {
            "independent draws with probability w_i / Σw: shares match the weights up to \
             sampling noise"
        }
        StrategyKind::CapacityProportional => {
            "a new connection goes where (open + 1) / capacity is least, so *open* \
             connections stay proportional to capacity, within one"
        }
        StrategyKind::ConsistentHash => {
            "a client address always lands on the same backend while the pool is unchanged, \
             unless that backend carries 1.25 x its share of the open connections"
        }
    }
}

/// Clients from eight addresses (127.0.0.11 to .18), ten connections each, through the
/// `consistent_hash` listener: each address stays on one backend.
async fn affinity_phase(addr: SocketAddr) -> io::Result<()> {
    let kind = StrategyKind::ConsistentHash;
    println!("\n{kind}: {}", explain(kind));
    for host in 11..=18_u8 {
        let from = SocketAddr::from(([127, 0, 0, host], 0));
        let mut seen: Vec<SocketAddr> = Vec::new();
        for _ in 0..10 {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(from)?;
            let mut stream = tokio::time::timeout(REPLY_TIMEOUT, socket.connect(addr)).await??;
            stream.write_all(b"generate\n").await?;
            let mut reply = String::new();
            BufReader::new(&mut stream).read_line(&mut reply).await?;
            let backend: SocketAddr = reply.trim().parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected reply {reply:?}"),
                )
            })?;
            if !seen.contains(&backend) {
                seen.push(backend);
            }
            // Closed before the next one opens: one client, one connection at a time. (Two at
            // once from one address would count against its backend's bound, which at this
            // load is a single connection.)
            stream.shutdown().await?;
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).await?;
        }
        let list: Vec<String> = seen.iter().map(ToString::to_string).collect();
        println!(
            "  client {}: 10 connections, all to {}",
            from.ip(),
            list.join(" and ")
        );
        if seen.len() != 1 {
            return Err(io::Error::other(format!(
                "client {} moved between backends",
                from.ip()
            )));
        }
    }
    Ok(())
}

/// Prints `kind`'s table from the balancer's counters, after checking that the clients' replies
/// tell the same story.
fn show(
    handle: &Handle,
    kind: StrategyKind,
    backends: &[(SocketAddr, f64)],
    replies: &[(SocketAddr, Option<TcpStream>)],
    count: Count,
    started: Instant,
) -> Result<(), Box<dyn Error>> {
    let mut counts = Vec::with_capacity(backends.len());
    for &(addr, _) in backends {
        let counters = handle
            .backend_counters(kind.as_str(), addr)
            .ok_or_else(|| format!("{kind}: backend {addr} is not in the snapshot"))?;
        let counted = match count {
            Count::Established => counters.connections,
            Count::Open => counters.active,
        };
        let seen = replies
            .iter()
            .filter(|(backend, _)| *backend == addr)
            .count() as u64;
        if seen != counted {
            return Err(
                format!("{kind}: {addr}: balancer counted {counted}, clients saw {seen}").into(),
            );
        }
        counts.push(counted);
    }
    let total_weight: f64 = backends.iter().map(|&(_, weight)| weight).sum();
    let total: u64 = counts.iter().sum();
    let title = match count {
        Count::Established => "connections",
        Count::Open => "open",
    };
    let elapsed = started.elapsed().as_secs_f64();
    let mut table = format!("{kind}: {total} connections in {elapsed:.2} s\n");
    table += &format!("  {}\n", explain(kind));
    table += &format!(
        "  {:<21} {:>6} {:>9} {:>9} {title:>12}\n",
        "backend", "weight", "expected", "observed"
    );
    for (&(addr, weight), &count) in backends.iter().zip(&counts) {
        let expected = 100.0 * weight / total_weight;
        let observed = 100.0 * count as f64 / total.max(1) as f64;
        table += &format!(
            "  {:<21} {weight:>6.1} {expected:>8.1}% {observed:>8.1}% {count:>12}\n",
            addr.to_string()
        );
    }
    println!("{table}");
    Ok(())
}

/// Polls until every backend of `kind`'s listener reports no open connection.
async fn wait_until_closed(
    handle: &Handle,
    kind: StrategyKind,
    backends: &[(SocketAddr, f64)],
) -> Result<(), Box<dyn Error>> {
    let deadline = Instant::now() + REPLY_TIMEOUT;
    loop {
        let open: u64 = backends
            .iter()
            .filter_map(|&(addr, _)| handle.backend_counters(kind.as_str(), addr))
            .map(|c| c.active)
            .sum();
        if open == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("{kind}: {open} connection(s) still open after closing").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The health-checked listener over the mock inference servers.
fn health_config_text(servers: &[SocketAddr]) -> String {
    let mut text = format!(
        "\n[[listener]]\nname = \"{HEALTH_LISTENER}\"\nbind = \"127.0.0.1:0\"\n\
         strategy = \"weighted_random\"\n{HEALTH_TABLE}"
    );
    for addr in servers {
        text += &format!("[[listener.backend]]\naddr = \"{addr}\"\n");
    }
    text
}

/// Steady traffic through `balancer` while server 2 dies and comes back; prints one row per
/// [`ROW`] with each server's share of that row's requests and server 2's state.
async fn health_phase(
    handle: &Handle,
    balancer: SocketAddr,
    servers: &mut [Mock],
) -> Result<(), Box<dyn Error>> {
    let addrs: Vec<SocketAddr> = servers.iter().map(Mock::addr).collect();
    let victim = 2;
    println!(
        "health checks: 4 mock inference servers, equal weights, weighted_random; {} dies at \
         {:.1} s and comes back at {:.1} s",
        addrs[victim],
        DIES_AT.as_secs_f64(),
        RETURNS_AT.as_secs_f64()
    );
    println!(
        "  probes every 200 ms; out after 2 failures, back after 2 passes, then a 3 s slow start"
    );
    let header: Vec<String> = addrs
        .iter()
        .map(|a| format!("{:>17}", a.to_string()))
        .collect();
    println!(
        "  {:>6} {}  state of the dying server",
        "time",
        header.join(" ")
    );

    let stop = CancellationToken::new();
    let mut clients = JoinSet::new();
    for _ in 0..HEALTH_CLIENTS {
        let stop = stop.clone();
        clients.spawn(async move {
            let mut failed = 0_u64;
            while !stop.is_cancelled() {
                if tokio::time::timeout(REPLY_TIMEOUT, get(balancer))
                    .await
                    .map_or(true, |r| r.is_err())
                {
                    failed += 1;
                }
            }
            failed
        });
    }
    let started = Instant::now();
    let counts = |handle: &Handle| -> Vec<u64> {
        addrs
            .iter()
            .map(|&a| {
                handle
                    .backend_counters(HEALTH_LISTENER, a)
                    .map_or(0, |c| c.connections)
            })
            .collect()
    };
    let mut last = counts(handle);
    let mut died = false;
    let mut returned = false;
    let mut row_end = started + ROW;
    while started.elapsed() < HEALTH_RUN {
        let next_event = if !died {
            started + DIES_AT
        } else if !returned {
            started + RETURNS_AT
        } else {
            row_end
        };
        tokio::time::sleep_until(row_end.min(next_event).into()).await;
        if !died && started.elapsed() >= DIES_AT {
            servers[victim].kill().await;
            died = true;
            println!("  -- {} dies", addrs[victim]);
        }
        if !returned && started.elapsed() >= RETURNS_AT {
            servers[victim] = Mock::start(addrs[victim], MockOptions::default()).await?;
            returned = true;
            println!("  -- {} is back", addrs[victim]);
        }
        if Instant::now() < row_end {
            continue;
        }
        let now = counts(handle);
        let delta: Vec<u64> = now.iter().zip(&last).map(|(n, l)| n - l).collect();
        let total = delta.iter().sum::<u64>().max(1) as f64;
        let shares: Vec<String> = delta
            .iter()
            .map(|&d| format!("{:>16.1}%", 100.0 * d as f64 / total))
            .collect();
        let state = match handle.backend_health(HEALTH_LISTENER, addrs[victim]) {
            Some(h) if h.status != HealthStatus::Healthy => format!(
                "{} ({})",
                h.status,
                h.last_check
                    .and_then(|c| c.result.err())
                    .map_or(String::new(), |e| e.to_string())
            ),
            Some(h) => match h.slow_start {
                Some(ramp) => format!("healthy, slow start at {:.0}% of its weight", ramp * 100.0),
                None => "healthy".to_owned(),
            },
            None => "not configured".to_owned(),
        };
        println!(
            "  {:>5.1}s {}  {state}",
            started.elapsed().as_secs_f64(),
            shares.join(" ")
        );
        last = now;
        row_end += ROW;
    }
    stop.cancel();
    let mut failed = 0;
    while let Some(joined) = clients.join_next().await {
        failed += joined?;
    }
    println!("  {failed} request(s) failed: the few cut when the server died, if any\n");
    Ok(())
}

/// One HTTP request through the balancer to a mock inference server.
async fn get(balancer: SocketAddr) -> io::Result<()> {
    let mut stream = TcpStream::connect(balancer).await?;
    stream
        .write_all(b"GET /v1/completions HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    if !answer.windows(10).any(|w| w == b"served by ") {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "no answer"));
    }
    Ok(())
}
