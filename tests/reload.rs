//! Hot reload: a new configuration is applied all or nothing, under load, without failing a
//! connection or losing a byte, whether it comes in process (`Handle::apply`/`reload`), from the
//! file watcher or from SIGHUP.
//!
//! Backends here are echo servers that first send one byte, their id, so a client can tell where
//! the balancer sent it. Weighted round robin over two backends with weights 3:1 (or 1:3) gives an
//! exact split over 8 sequential connections, whatever the cycle's starting point, which is how
//! these tests tell which weights are in force. Every wait is a poll with a deadline and every
//! test has an overall time bound.

mod support;

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, RngExt, SeedableRng};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use support::{
    Mock, POLL, Process, Running, bounded, close, echo, open_identify, poll_until, within,
};
use weighbridge::Config;
use weighbridge::ReloadError;

/// Upper bound on a condition that should hold "soon" (a reload applied, a socket closed).
const SOON: Duration = Duration::from_secs(10);
/// Sequential connections that show which weights are in force (two WRR cycles of 3:1).
const PROBES: usize = 8;
/// Long-lived streaming connections held open through the reloads of the load test.
const STREAMS: usize = 200;
/// Largest chunk a streaming client sends before reading its echo.
const CHUNK_MAX: usize = 2048;
/// Pause between two chunks of one streaming client: keeps 200 streams within a debug build on
/// two cores while still sending every few milliseconds.
const STREAM_PACE: Duration = Duration::from_millis(10);
/// Tasks opening short connections in a loop during the load test.
const CHURN_TASKS: usize = 4;
/// Pause between two short connections of one churn task.
const CHURN_PACE: Duration = Duration::from_millis(3);
/// Reloads applied under load.
const RELOADS: usize = 50;
/// Reloads of the descriptor-leak test (each adds or removes a listener and a backend).
const LEAK_RELOADS: usize = 100;

// ---------------------------------------------------------------------------------------------
// Clients

/// Opens `PROBES` connections to `addr` one after another, each echoing once, and returns how
/// many reached each of `backends` (in that order). Panics if one reached another backend.
async fn split(addr: SocketAddr, backends: &[&Mock]) -> Vec<usize> {
    let mut ids = Vec::with_capacity(PROBES);
    for _ in 0..PROBES {
        let (mut stream, id) = open_identify(addr)
            .await
            .expect("probe connection is served");
        echo(&mut stream, b"probe").await.expect("probe echo");
        ids.push(id);
    }
    let counts: Vec<usize> = backends
        .iter()
        .map(|b| ids.iter().filter(|&&id| id == b.id()).count())
        .collect();
    assert_eq!(
        counts.iter().sum::<usize>(),
        PROBES,
        "a probe reached an unexpected backend: {ids:?}"
    );
    counts
}

/// The probe split weights `[wa, wb]` give under weighted round robin.
fn expected_split(weights: [f64; 2]) -> Vec<usize> {
    let total = weights[0] + weights[1];
    weights
        .iter()
        .map(|w| (w / total * PROBES as f64).round() as usize)
        .collect()
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    socket.local_addr().expect("ephemeral address").port()
}

// ---------------------------------------------------------------------------------------------
// Configuration text

/// One `[[listener]]` table.
struct Listener<'a> {
    name: &'a str,
    bind: SocketAddr,
    strategy: &'a str,
    backends: Vec<(SocketAddr, f64)>,
}

impl<'a> Listener<'a> {
    /// A weighted-round-robin listener on an ephemeral port.
    fn wrr(name: &'a str, backends: Vec<(SocketAddr, f64)>) -> Listener<'a> {
        Listener {
            name,
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            strategy: "weighted_round_robin",
            backends,
        }
    }
}

/// The config file for `listeners`.
fn toml(listeners: &[Listener<'_>]) -> String {
    let mut text = String::from("shutdown_grace = \"2s\"\n");
    for listener in listeners {
        write!(
            text,
            "\n[[listener]]\nname = \"{}\"\nbind = \"{}\"\nstrategy = \"{}\"\n",
            listener.name, listener.bind, listener.strategy
        )
        .expect("write to a String");
        for (addr, weight) in &listener.backends {
            write!(
                text,
                "[[listener.backend]]\naddr = \"{addr}\"\nweight = {weight:?}\n"
            )
            .expect("write to a String");
        }
    }
    text
}

fn parse(text: &str) -> Config {
    weighbridge::Config::parse(text, Path::new("reload-test.toml")).expect("valid test config")
}

/// One listener `main` over backends `a` and `b` with weights `weights`.
fn two_backends(a: &Mock, b: &Mock, weights: [f64; 2]) -> String {
    toml(&[Listener::wrr(
        "main",
        vec![(a.addr, weights[0]), (b.addr, weights[1])],
    )])
}

// ---------------------------------------------------------------------------------------------
// The balancer, in process and as the binary

/// A balancer on `config` serving in the test's runtime; `listener` is the one it talks to.
fn start(config: &Config, path: Option<&Path>, listener: &str) -> Running {
    Running::try_start(config, path, listener).expect("bind the balancer's listeners")
}

/// The binary on `config`, once it serves listener `main` and watches the file; the listener's
/// address.
async fn watching(config: &Path) -> (Process, SocketAddr) {
    let mut lb = Process::start(config, &[]);
    let addr = lb.listening("main").await;
    lb.wait_for("watching the configuration file", 1).await;
    (lb, addr)
}

/// Replaces `path` the way editors and config-management tools do: a new file renamed over it.
fn replace_by_rename(path: &Path, text: &str) {
    let temp = path.with_extension("toml.new");
    std::fs::write(&temp, text).expect("write the replacement config");
    std::fs::rename(&temp, path).expect("rename the replacement over the config");
}

// ---------------------------------------------------------------------------------------------
// 1. Reloads under load

/// The configuration of step `step` of the load test and the probe weights it sets.
///
/// Every step flips the weights of `probe` and `stream` between 3:1 and 1:3; backend `c` joins
/// `stream` on two steps out of four; listener `extra` exists on three steps out of six; the
/// strategy of `stream` cycles through all three.
fn load_step(step: usize, a: &Mock, b: &Mock, c: &Mock) -> ([f64; 2], String) {
    let weights = if step % 2 == 0 {
        [3.0, 1.0]
    } else {
        [1.0, 3.0]
    };
    let strategies = [
        "weighted_round_robin",
        "weighted_random",
        "capacity_proportional",
    ];
    let mut stream = Listener::wrr("stream", vec![(a.addr, weights[0]), (b.addr, weights[1])]);
    stream.strategy = strategies[step % strategies.len()];
    if matches!(step % 4, 1 | 2) {
        stream.backends.push((c.addr, 2.0));
    }
    let mut listeners = vec![
        stream,
        Listener::wrr("probe", vec![(a.addr, weights[0]), (b.addr, weights[1])]),
    ];
    if step % 6 >= 3 {
        listeners.push(Listener::wrr("extra", vec![(c.addr, 1.0)]));
    }
    (weights, toml(&listeners))
}

/// A long-lived client: sends a seeded pseudo-random stream in chunks and checks every echoed
/// byte until `stop`, then closes cleanly. Returns the bytes that made the round trip.
async fn stream_client(
    addr: SocketAddr,
    seed: u64,
    rounds: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Result<u64, String> {
    let fail = |what: &str, total: u64, e: io::Error| {
        format!("stream {seed}: {what} after {total} bytes: {e}")
    };
    let (mut stream, _) = open_identify(addr).await.map_err(|e| fail("open", 0, e))?;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut chunk = Vec::with_capacity(CHUNK_MAX);
    let mut total = 0_u64;
    while !stop.is_cancelled() {
        chunk.resize(rng.random_range(1..=CHUNK_MAX), 0);
        rng.fill_bytes(&mut chunk);
        echo(&mut stream, &chunk)
            .await
            .map_err(|e| fail("echo", total, e))?;
        total += chunk.len() as u64;
        rounds.fetch_add(1, Ordering::SeqCst);
        tokio::select! {
            () = tokio::time::sleep(STREAM_PACE) => {}
            () = stop.cancelled() => {}
        }
    }
    close(stream).await.map_err(|e| fail("close", total, e))?;
    Ok(total)
}

/// Opens short connections one after another until `stop`: read the backend's id, echo a
/// request, close. Counts each success in `done`.
async fn churn(
    addr: SocketAddr,
    ids: [u8; 3],
    done: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Result<(), String> {
    while !stop.is_cancelled() {
        let n = done.load(Ordering::SeqCst);
        let (mut stream, id) = open_identify(addr)
            .await
            .map_err(|e| format!("short connection after {n}: open: {e}"))?;
        if !ids.contains(&id) {
            return Err(format!("short connection reached unknown backend {id}"));
        }
        echo(&mut stream, b"GET /id\n")
            .await
            .map_err(|e| format!("short connection after {n}: echo: {e}"))?;
        close(stream)
            .await
            .map_err(|e| format!("short connection after {n}: close: {e}"))?;
        done.fetch_add(1, Ordering::SeqCst);
        tokio::select! {
            () = tokio::time::sleep(CHURN_PACE) => {}
            () = stop.cancelled() => {}
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_under_load_fail_no_connection_and_lose_no_byte() {
    bounded(Duration::from_secs(50), async {
        // 200 streams hold four descriptors each in this process.
        rlimit::increase_nofile_limit(u64::MAX).expect("raise the open file limit");
        let (a, b, c) = (
            Mock::identify(1).await,
            Mock::identify(2).await,
            Mock::identify(3).await,
        );
        let (_, text) = load_step(0, &a, &b, &c);
        let lb = start(&parse(&text), None, "stream");
        let stream_addr = lb.addr_of("stream");
        let probe_addr = lb.addr_of("probe");
        assert_eq!(split(probe_addr, &[&a, &b]).await, [6, 2]);

        let stop = CancellationToken::new();
        let rounds: Vec<Arc<AtomicU64>> = (0..STREAMS).map(|_| Arc::default()).collect();
        let streams: Vec<JoinHandle<Result<u64, String>>> = rounds
            .iter()
            .enumerate()
            .map(|(i, rounds)| {
                let client = stream_client(stream_addr, i as u64, Arc::clone(rounds), stop.clone());
                tokio::spawn(client)
            })
            .collect();
        let done = Arc::new(AtomicU64::new(0));
        let churners: Vec<JoinHandle<Result<(), String>>> = (0..CHURN_TASKS)
            .map(|_| {
                let ids = [a.id(), b.id(), c.id()];
                tokio::spawn(churn(stream_addr, ids, Arc::clone(&done), stop.clone()))
            })
            .collect();
        let all_streaming =
            poll_until(SOON, || rounds.iter().all(|r| r.load(Ordering::SeqCst) > 0)).await;
        assert!(all_streaming, "not every stream got going");
        let churn_at_start = done.load(Ordering::SeqCst);

        // An open connection through `extra`, held across the reload that removes it.
        let mut extra_conn: Option<TcpStream> = None;
        for step in 1..=RELOADS {
            let (weights, text) = load_step(step, &a, &b, &c);
            let summary = lb
                .handle
                .apply(parse(&text))
                .await
                .unwrap_or_else(|e| panic!("reload {step} refused: {e}"));
            assert!(
                !summary.weights_changed.is_empty(),
                "reload {step}: {summary}"
            );
            let counters = lb.handle.reload_counters();
            assert_eq!((counters.succeeded, counters.failed), (step as u64, 0));
            let rounds_now: Vec<u64> = rounds.iter().map(|r| r.load(Ordering::SeqCst)).collect();
            let done_now = done.load(Ordering::SeqCst);

            // New connections follow the new weights at once.
            assert_eq!(
                split(probe_addr, &[&a, &b]).await,
                expected_split(weights),
                "reload {step} to weights {weights:?}: {summary}"
            );

            if let Some(conn) = extra_conn.as_mut() {
                echo(conn, format!("extra at step {step}").as_bytes())
                    .await
                    .expect("a connection through `extra` survives reloads, even its removal");
            }
            match lb.handle.local_addr("extra") {
                Some(addr) if extra_conn.is_none() => {
                    let (mut conn, id) = open_identify(addr)
                        .await
                        .expect("the added listener serves");
                    assert_eq!(id, c.id());
                    echo(&mut conn, b"extra")
                        .await
                        .expect("echo through `extra`");
                    extra_conn = Some(conn);
                }
                Some(_) => {}
                None => {
                    if let Some(conn) = extra_conn.take() {
                        close(conn)
                            .await
                            .expect("close the connection through `extra`");
                    }
                }
            }

            // Every stream and new short connections keep flowing after this reload.
            let flowing = poll_until(SOON, || {
                done.load(Ordering::SeqCst) >= done_now + CHURN_TASKS as u64
                    && rounds
                        .iter()
                        .zip(&rounds_now)
                        .all(|(r, &then)| r.load(Ordering::SeqCst) > then)
            })
            .await;
            assert!(flowing, "traffic stalled after reload {step}: {summary}");
        }
        let short_during_reloads = done.load(Ordering::SeqCst) - churn_at_start;
        if let Some(conn) = extra_conn.take() {
            close(conn)
                .await
                .expect("close the connection through `extra`");
        }

        stop.cancel();
        let mut failures = Vec::new();
        let mut bytes = 0;
        for task in streams {
            match task.await.expect("stream task did not panic") {
                Ok(n) => bytes += n,
                Err(e) => failures.push(e),
            }
        }
        for task in churners {
            if let Err(e) = task.await.expect("churn task did not panic") {
                failures.push(e);
            }
        }
        assert!(
            failures.is_empty(),
            "{} failures: {failures:#?}",
            failures.len()
        );
        assert!(
            short_during_reloads >= (RELOADS * CHURN_TASKS) as u64,
            "only {short_during_reloads} short connections during the reloads"
        );
        eprintln!(
            "{STREAMS} streams echoed {bytes} bytes; {} short connections, \
             {short_during_reloads} of them during {RELOADS} reloads",
            done.load(Ordering::SeqCst)
        );
        for name in ["stream", "probe"] {
            let counters = lb.handle.listener_counters(name).expect("listener exists");
            assert_eq!(counters.rejected_no_backend, 0, "{name}: {counters:?}");
            assert_eq!(counters.rejected_max_connections, 0, "{name}: {counters:?}");
        }
        for backend in [&a, &b] {
            let counters = lb
                .handle
                .backend_counters("stream", backend.addr)
                .expect("backend is configured");
            assert_eq!(counters.connect_failures, 0, "{counters:?}");
        }
        assert_eq!(lb.stop().await.cut_connections, 0);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 2. Rejected reloads

/// The 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .expect("needle is in the text")
        + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_reloads_change_nothing_and_are_reported() {
    bounded(Duration::from_secs(30), async {
        let (a, b) = (Mock::identify(1).await, Mock::identify(2).await);
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("wb.toml");
        std::fs::write(&path, two_backends(&a, &b, [3.0, 1.0])).expect("write config");
        let config = weighbridge::Config::load(&path).expect("valid config");
        let lb = start(&config, Some(&path), "main");
        let addr = lb.addr_of("main");
        let (mut held, _) = open_identify(addr)
            .await
            .expect("open a long-lived connection");
        echo(&mut held, b"before").await.expect("echo before");
        assert_eq!(split(addr, &[&a, &b]).await, [6, 2]);

        // Each case would flip the weights to 1:3 if it were applied.
        let flipped = two_backends(&a, &b, [1.0, 3.0]);
        let syntax = format!("{flipped}[[listener\n");
        let syntax_line = syntax.lines().count();
        let unknown = format!("{flipped}wieght = 2\n");
        let unknown_line = unknown.lines().count();
        let negative = two_backends(&a, &b, [1.0, -1.0]);
        let negative_line = line_of(&negative, "weight = -1");
        // A listener whose address is taken, in the same file as a weight change.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("occupy a port");
        let taken_addr = taken.local_addr().expect("occupied address");
        let mut extra = Listener::wrr("extra", vec![(a.addr, 1.0)]);
        extra.bind = taken_addr;
        let busy = toml(&[
            Listener::wrr("main", vec![(a.addr, 1.0), (b.addr, 3.0)]),
            extra,
        ]);
        let cases = [
            (
                "syntax error",
                syntax,
                vec![format!("wb.toml:{syntax_line}:")],
            ),
            (
                "unknown key",
                unknown,
                vec![format!("wb.toml:{unknown_line}:"), "wieght".to_owned()],
            ),
            (
                "negative weight",
                negative,
                vec![
                    format!("wb.toml:{negative_line}:"),
                    "`weight`".to_owned(),
                    "-1".to_owned(),
                ],
            ),
            (
                "bind address taken",
                busy,
                vec!["`extra`".to_owned(), taken_addr.to_string()],
            ),
        ];
        for (failed, (case, text, needles)) in (1..).zip(cases) {
            std::fs::write(&path, &text).expect("write config");
            let error = lb
                .handle
                .reload()
                .await
                .expect_err(&format!("{case}: the reload is refused"));
            let counters = lb.handle.reload_counters();
            assert_eq!((counters.succeeded, counters.failed), (0, failed), "{case}");
            let message = counters
                .last_error
                .expect("a failed reload records its error");
            assert_eq!(message, error.to_string(), "{case}");
            for needle in &needles {
                assert!(
                    message.contains(needle.as_str()),
                    "{case}: {message:?} lacks {needle:?}"
                );
            }
            // Nothing changed: open and new connections are served with the old weights.
            echo(&mut held, case.as_bytes())
                .await
                .unwrap_or_else(|e| panic!("{case}: the open connection broke: {e}"));
            assert_eq!(
                split(addr, &[&a, &b]).await,
                [6, 2],
                "{case}: weights changed"
            );
            assert_eq!(lb.handle.local_addr("extra"), None, "{case}");
        }
        drop(taken);

        // A good file after all that is applied, and clears the error.
        std::fs::write(&path, &flipped).expect("write config");
        let summary = lb.handle.reload().await.expect("a valid reload succeeds");
        assert_eq!(summary.weights_changed.len(), 2, "{summary}");
        let counters = lb.handle.reload_counters();
        assert_eq!((counters.succeeded, counters.failed), (1, 4));
        assert_eq!(counters.last_error, None);
        assert_eq!(split(addr, &[&a, &b]).await, [2, 6]);
        echo(&mut held, b"after").await.expect("echo after");
        close(held).await.expect("close the long-lived connection");
        assert_eq!(lb.stop().await.cut_connections, 0);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 3. Triggers of the binary: the file watcher and SIGHUP

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_reloads_a_config_replaced_by_rename() {
    bounded(Duration::from_secs(30), async {
        let (a, b) = (Mock::identify(1).await, Mock::identify(2).await);
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("wb.toml");
        std::fs::write(&path, two_backends(&a, &b, [3.0, 1.0])).expect("write config");
        let (mut lb, addr) = watching(&path).await;
        assert_eq!(split(addr, &[&a, &b]).await, [6, 2]);

        // Twice: the watch must survive the replacement of the file it first saw.
        for (n, weights) in [(1, [1.0, 3.0]), (2, [3.0, 1.0])] {
            replace_by_rename(&path, &two_backends(&a, &b, weights));
            lb.wait_for("reload applied", n).await;
            assert_eq!(
                split(addr, &[&a, &b]).await,
                expected_split(weights),
                "after replacement {n}; stderr:\n{}",
                lb.tail()
            );
        }
        assert_eq!(lb.count("reload failed"), 0, "{}", lb.tail());
    })
    .await;
}

/// An edit made after the file was read and before the watch began (while the listeners were
/// binding) sends no event the watcher sees; it is applied once the watch is in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_made_before_the_watch_began_is_applied() {
    bounded(Duration::from_secs(30), async {
        let (a, b) = (Mock::identify(1).await, Mock::identify(2).await);
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("wb.toml");
        let loaded = two_backends(&a, &b, [3.0, 1.0]);
        std::fs::write(&path, &loaded).expect("write config");
        let lb = start(&parse(&loaded), Some(&path), "main");
        std::fs::write(&path, two_backends(&a, &b, [1.0, 3.0])).expect("edit config");
        let watcher = weighbridge::watch(&path, &loaded, lb.handle.clone(), lb.shutdown.clone())
            .expect("watch the config");
        let applied = poll_until(SOON, || lb.handle.reload_counters().succeeded == 1).await;
        assert!(applied, "the edit made before the watch is applied");
        assert_eq!(split(lb.addr_of("main"), &[&a, &b]).await, [2, 6]);
        assert_eq!(lb.stop().await.cut_connections, 0);
        timeout(SOON, watcher)
            .await
            .expect("the watcher ends with the balancer")
            .expect("the watcher does not panic");
    })
    .await;
}

/// A reload that failed for a reason outside the file (a new listener's port taken) is tried
/// again when the file is saved again unchanged, once the port is free: the watcher does not
/// take the failed content as seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_retries_a_failed_reload_when_the_same_file_is_saved_again() {
    bounded(Duration::from_secs(30), async {
        let (a, b) = (Mock::identify(1).await, Mock::identify(2).await);
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("wb.toml");
        std::fs::write(&path, two_backends(&a, &b, [3.0, 1.0])).expect("write config");
        let (mut lb, _) = watching(&path).await;

        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("take a port");
        let freed = taken.local_addr().expect("address");
        let mut extra = Listener::wrr("extra", vec![(b.addr, 1.0)]);
        extra.bind = freed;
        let text = toml(&[
            Listener::wrr("main", vec![(a.addr, 3.0), (b.addr, 1.0)]),
            extra,
        ]);
        replace_by_rename(&path, &text);
        lb.wait_for("reload failed", 1).await;

        drop(taken);
        replace_by_rename(&path, &text);
        lb.wait_for("reload applied", 1).await;
        let (_, id) = within(open_identify(freed))
            .await
            .expect("the new listener serves on the freed port");
        assert_eq!(id, 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_reloads_while_files_beside_the_config_are_written_all_the_time() {
    bounded(Duration::from_secs(40), async {
        let (a, b) = (Mock::identify(1).await, Mock::identify(2).await);
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("wb.toml");
        std::fs::write(&path, two_backends(&a, &b, [3.0, 1.0])).expect("write config");
        let (mut lb, addr) = watching(&path).await;

        // A log appended to beside the config far more often than the debounce's quiet time,
        // then an entry the watcher cannot tell from a ConfigMap swap churned the same way:
        // neither may hold an edit back.
        for (n, noisy, weights) in [(1, "access.log", [1.0, 3.0]), (2, "..data_tmp", [3.0, 1.0])] {
            let stop = Arc::new(AtomicBool::new(false));
            let writer = {
                let (stop, noisy) = (Arc::clone(&stop), dir.path().join(noisy));
                std::thread::spawn(move || {
                    // Bounded: the test's own limit ends long before.
                    for _ in 0..4_000 {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        std::fs::write(&noisy, b"noise\n").expect("write beside the config");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                })
            };
            replace_by_rename(&path, &two_backends(&a, &b, weights));
            lb.wait_for("reload applied", n).await;
            stop.store(true, Ordering::Relaxed);
            writer.join().expect("the writer ends");
            assert_eq!(
                split(addr, &[&a, &b]).await,
                expected_split(weights),
                "{}",
                lb.tail()
            );
        }
        assert_eq!(lb.count("reload failed"), 0, "{}", lb.tail());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_reloads_a_config_linked_from_another_directory_when_its_target_changes() {
    bounded(Duration::from_secs(30), async {
        let (a, b) = (Mock::identify(1).await, Mock::identify(2).await);
        let (etc, srv) = (
            tempfile::tempdir().expect("temp dir"),
            tempfile::tempdir().expect("temp dir"),
        );
        let target = srv.path().join("lb.toml");
        let link = etc.path().join("wb.toml");
        std::fs::write(&target, two_backends(&a, &b, [3.0, 1.0])).expect("write config");
        std::os::unix::fs::symlink(&target, &link).expect("link the config");
        let (mut lb, addr) = watching(&link).await;
        assert_eq!(split(addr, &[&a, &b]).await, [6, 2]);

        // Edited where it lives, in place and then by rename.
        std::fs::write(&target, two_backends(&a, &b, [1.0, 3.0])).expect("edit the target");
        lb.wait_for("reload applied", 1).await;
        assert_eq!(split(addr, &[&a, &b]).await, [2, 6], "{}", lb.tail());
        replace_by_rename(&target, &two_backends(&a, &b, [3.0, 1.0]));
        lb.wait_for("reload applied", 2).await;
        assert_eq!(split(addr, &[&a, &b]).await, [6, 2], "{}", lb.tail());
        assert_eq!(lb.count("reload failed"), 0, "{}", lb.tail());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_follows_a_config_link_repointed_to_another_release_directory() {
    bounded(Duration::from_secs(30), async {
        let (a, b) = (Mock::identify(1).await, Mock::identify(2).await);
        let (etc, v1, v2) = (
            tempfile::tempdir().expect("temp dir"),
            tempfile::tempdir().expect("temp dir"),
            tempfile::tempdir().expect("temp dir"),
        );
        let link = etc.path().join("wb.toml");
        for release in [&v1, &v2] {
            std::fs::write(
                release.path().join("lb.toml"),
                two_backends(&a, &b, [3.0, 1.0]),
            )
            .expect("write config");
        }
        std::os::unix::fs::symlink(v1.path().join("lb.toml"), &link).expect("link the config");
        let (mut lb, addr) = watching(&link).await;

        // A deploy: the new release's config, then the link swapped to it atomically.
        std::fs::write(v2.path().join("lb.toml"), two_backends(&a, &b, [1.0, 3.0]))
            .expect("write the new release");
        let swap = etc.path().join("wb.toml.new");
        std::os::unix::fs::symlink(v2.path().join("lb.toml"), &swap).expect("new link");
        std::fs::rename(&swap, &link).expect("swap the link");
        lb.wait_for("reload applied", 1).await;
        assert_eq!(split(addr, &[&a, &b]).await, [2, 6], "{}", lb.tail());

        // An edit where the link now points is seen, as one in the first release was.
        std::fs::write(v2.path().join("lb.toml"), two_backends(&a, &b, [3.0, 1.0]))
            .expect("edit the new release");
        lb.wait_for("reload applied", 2).await;
        assert_eq!(split(addr, &[&a, &b]).await, [6, 2], "{}", lb.tail());
        assert_eq!(lb.count("reload failed"), 0, "{}", lb.tail());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_with_no_watch_ignores_edits_until_sighup() {
    bounded(Duration::from_secs(30), async {
        let (a, b) = (Mock::identify(1).await, Mock::identify(2).await);
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("wb.toml");
        std::fs::write(&path, two_backends(&a, &b, [3.0, 1.0])).expect("write config");
        let mut lb = Process::start(&path, &["--no-watch"]);
        let addr = lb.listening("main").await;
        assert_eq!(split(addr, &[&a, &b]).await, [6, 2]);

        std::fs::write(&path, two_backends(&a, &b, [1.0, 3.0])).expect("edit config");
        // The one wait for something *not* to happen: five debounce periods of the watcher.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(lb.count("reload"), 0, "{}", lb.tail());
        assert_eq!(lb.count("watching"), 0, "{}", lb.tail());
        assert_eq!(split(addr, &[&a, &b]).await, [6, 2]);

        lb.hangup();
        lb.wait_for("reload applied", 1).await;
        assert_eq!(split(addr, &[&a, &b]).await, [2, 6], "{}", lb.tail());
        assert_eq!(lb.count("reload failed"), 0, "{}", lb.tail());
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 4. A removed backend's open connections

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_a_removed_backend_flow_until_the_client_closes() {
    bounded(Duration::from_secs(30), async {
        let (a, b) = (Mock::identify(1).await, Mock::identify(2).await);
        let lb = start(&parse(&two_backends(&a, &b, [1.0, 1.0])), None, "main");
        let addr = lb.addr_of("main");
        let mut to_b = None;
        for _ in 0..2 {
            let (stream, id) = open_identify(addr).await.expect("connection is served");
            if id == b.id() {
                to_b = Some(stream);
                break;
            }
        }
        let mut to_b = to_b.expect("1:1 round robin reaches b within two connections");
        echo(&mut to_b, b"before").await.expect("echo before");

        let only_a = toml(&[Listener::wrr("main", vec![(a.addr, 1.0)])]);
        let summary = lb.handle.apply(parse(&only_a)).await.expect("reload");
        assert_eq!(summary.backends_removed, [format!("main/{}", b.addr)]);
        assert_eq!(lb.handle.backend_counters("main", b.addr), None);
        for round in 0..5 {
            let data = format!("after removal, round {round}");
            echo(&mut to_b, data.as_bytes())
                .await
                .expect("the open connection to the removed backend still echoes");
            assert_eq!(
                split(addr, &[&a]).await,
                [PROBES],
                "new connections avoid b"
            );
        }
        assert_eq!(b.open(), 1, "b keeps the open connection");
        close(to_b).await.expect("the connection to b ends cleanly");
        assert!(
            poll_until(SOON, || b.open() == 0).await,
            "b's connection is closed after the client closed"
        );
        assert!(
            poll_until(SOON, || {
                lb.handle.listener_counters("main").map(|c| c.open) == Some(0)
            })
            .await,
            "the balancer finished every connection"
        );

        // Nothing refers to b's state any more, so the next reload forgets it: when b comes
        // back it starts from zero.
        let heavier_a = toml(&[Listener::wrr("main", vec![(a.addr, 2.0)])]);
        lb.handle.apply(parse(&heavier_a)).await.expect("reload");
        let readded = two_backends(&a, &b, [1.0, 1.0]);
        lb.handle.apply(parse(&readded)).await.expect("reload");
        let fresh = lb
            .handle
            .backend_counters("main", b.addr)
            .expect("b is configured again");
        assert_eq!(
            (fresh.connections, fresh.active, fresh.bytes_to_backend),
            (0, 0, 0)
        );
        assert_eq!(split(addr, &[&a, &b]).await, [4, 4]);
        assert_eq!(lb.stop().await.cut_connections, 0);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 5. No descriptor leaks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_reloads_leak_no_descriptor() {
    bounded(Duration::from_secs(45), async {
        let (a, b) = (Mock::identify(1).await, Mock::identify(2).await);
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("wb.toml");
        // The copy data path: the splice path keeps a bounded per-thread pool of empty pipes for
        // reuse, which would make descriptor counts depend on which worker thread served what.
        let copy_path = |text: String| text.replace("strategy = ", "splice = false\nstrategy = ");
        let small = copy_path(toml(&[Listener::wrr("main", vec![(a.addr, 1.0)])]));
        let large = copy_path(toml(&[
            Listener::wrr("main", vec![(a.addr, 1.0), (b.addr, 1.0)]),
            Listener::wrr("extra", vec![(b.addr, 1.0)]),
        ]));
        std::fs::write(&path, &small).expect("write config");
        let mut lb = Process::start(&path, &["--no-watch"]);
        let main = lb.listening("main").await;
        let (mut conn, _) = open_identify(main).await.expect("the balancer serves");
        echo(&mut conn, b"hello").await.expect("echo");
        close(conn).await.expect("close");

        let mut reloads = 0;
        let mut reload = async |lb: &mut Process, text: &str| {
            std::fs::write(&path, text).expect("write config");
            lb.hangup();
            reloads += 1;
            lb.wait_for("reload applied", reloads).await;
            assert_eq!(lb.count("reload failed"), 0, "{}", lb.tail());
            if text == large {
                // Serve through the new listener and the new backend before moving on.
                let extra = lb.listening("extra").await;
                let (mut conn, id) = open_identify(extra).await.expect("`extra` serves");
                assert_eq!(id, b.id());
                echo(&mut conn, b"extra")
                    .await
                    .expect("echo through `extra`");
                close(conn).await.expect("close");
                let (mut conn, _) = open_identify(main).await.expect("`main` serves");
                echo(&mut conn, b"main").await.expect("echo through `main`");
                close(conn).await.expect("close");
            }
        };
        // Warm up, so that anything created once on first use is in the baseline.
        reload(&mut lb, &large).await;
        reload(&mut lb, &small).await;
        let idle = || a.open() + b.open() == 0;
        assert!(
            poll_until(SOON, idle).await,
            "backends see every connection closed"
        );
        let mut before = lb.fds();
        let mut steady = 0;
        // The last connection's descriptors close asynchronously: wait for a steady count.
        let settled = poll_until(SOON, || {
            let now = lb.fds();
            steady = if now == before { steady + 1 } else { 0 };
            before = now;
            steady >= 10
        })
        .await;
        assert!(settled, "descriptor count never settled");

        for step in 0..LEAK_RELOADS {
            let text = if step % 2 == 0 { &large } else { &small };
            reload(&mut lb, text).await;
        }
        assert!(
            poll_until(SOON, idle).await,
            "backends see every connection closed"
        );
        let mut after = 0;
        let no_growth = poll_until(SOON, || {
            after = lb.fds();
            after <= before
        })
        .await;
        assert!(
            no_growth,
            "{after} descriptors open after {LEAK_RELOADS} reloads, {before} before"
        );
        eprintln!("descriptors: {before} before, {after} after {LEAK_RELOADS} reloads");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 6. Moving a listener

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_listener_serves_on_the_new_address_only_and_keeps_open_connections() {
    bounded(Duration::from_secs(30), async {
        let a = Mock::identify(1).await;
        let lb = start(
            &parse(&toml(&[Listener::wrr("main", vec![(a.addr, 1.0)])])),
            None,
            "main",
        );
        let old = lb.addr_of("main");
        let (mut held, id) = open_identify(old).await.expect("served on the old address");
        assert_eq!(id, a.id());
        echo(&mut held, b"before the move").await.expect("echo");

        // The port was free a moment ago; should something take it meanwhile, try another.
        let mut moved = None;
        for _ in 0..5 {
            let mut listener = Listener::wrr("main", vec![(a.addr, 1.0)]);
            listener.bind = SocketAddr::from(([127, 0, 0, 1], free_port()));
            match lb.handle.apply(parse(&toml(&[listener]))).await {
                Ok(summary) => {
                    moved = Some(summary);
                    break;
                }
                Err(ReloadError::Bind(e)) => eprintln!("port taken meanwhile: {e}"),
                Err(e) => panic!("moving the listener was refused: {e}"),
            }
        }
        let summary = moved.expect("the listener moved to a free port");
        let new = lb.addr_of("main");
        assert_eq!(
            summary.listeners_changed,
            // The keys as written: the old file asked for port 0.
            [format!("main (bind 127.0.0.1:0->{new})")],
            "{summary}"
        );
        assert_ne!(new, old);

        let (mut fresh, id) = open_identify(new).await.expect("served on the new address");
        assert_eq!(id, a.id());
        echo(&mut fresh, b"new address").await.expect("echo");
        close(fresh).await.expect("close");

        let accepted = lb.listener().accepted;
        let deadline = Instant::now() + SOON;
        loop {
            match TcpStream::connect(old).await {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
                Err(e) => panic!("connecting to the old address failed oddly: {e}"),
                Ok(mut stream) => {
                    // The freed port is ephemeral: another test's listener (another balancer
                    // of this test binary, even) may have it by now, which proves the old
                    // socket closed. Only this balancer counting the connection means it still
                    // accepts there; whoever did accept it has answered once a byte arrives.
                    let mut id = [0_u8; 1];
                    let answer = timeout(POLL * 20, stream.read_exact(&mut id)).await;
                    if lb.listener().accepted == accepted {
                        eprintln!("{old} was taken by another listener: {answer:?}");
                        break;
                    }
                    drop(stream);
                    assert!(
                        Instant::now() < deadline,
                        "{old} still accepts after the move"
                    );
                    tokio::time::sleep(POLL).await;
                }
            }
        }

        echo(&mut held, b"after the move")
            .await
            .expect("a connection accepted on the old address keeps working");
        close(held).await.expect("close");
        assert_eq!(lb.stop().await.cut_connections, 0);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 7. Renaming a listener

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_listener_keeps_its_socket_and_drops_no_connection() {
    bounded(Duration::from_secs(30), async {
        let a = Mock::identify(1).await;
        // A socket is only handed over between listeners on the same explicit port.
        let named = |name: &str, port: u16| {
            let mut listener = Listener::wrr(name, vec![(a.addr, 1.0)]);
            listener.bind = SocketAddr::from(([127, 0, 0, 1], port));
            parse(&toml(&[listener]))
        };
        // The port was free a moment ago; should something take it meanwhile, try another.
        let (lb, port) = (0..5)
            .find_map(|_| {
                let port = free_port();
                let started = Running::try_start(&named("before", port), None, "before");
                started.map(|lb| (lb, port)).ok()
            })
            .expect("the balancer binds a free port");
        let addr = lb.addr_of("before");
        let stop = CancellationToken::new();
        let done = Arc::new(AtomicU64::new(0));
        let churners: Vec<JoinHandle<Result<(), String>>> = (0..2 * CHURN_TASKS)
            .map(|_| tokio::spawn(churn(addr, [a.id(); 3], Arc::clone(&done), stop.clone())))
            .collect();
        for step in 0..200 {
            let name = if step % 2 == 0 { "after" } else { "before" };
            let summary = lb.handle.apply(named(name, port)).await.expect("rename");
            assert_eq!(summary.listeners_added, [name], "{summary}");
            assert_eq!(lb.addr_of(name), addr, "the socket moves to the new name");
            let then = done.load(Ordering::SeqCst);
            let flowing = poll_until(SOON, || {
                done.load(Ordering::SeqCst) > then + 2 || churners.iter().any(|c| c.is_finished())
            })
            .await;
            assert!(flowing, "short connections stalled after rename {step}");
            if churners.iter().any(|c| c.is_finished()) {
                break;
            }
        }
        stop.cancel();
        for task in churners {
            task.await
                .expect("churn task did not panic")
                .expect("no connection to the renamed listener failed");
        }
        assert_eq!(lb.stop().await.cut_connections, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinning_a_port_0_listener_to_the_port_it_holds_keeps_its_socket() {
    bounded(Duration::from_secs(30), async {
        let a = Mock::identify(1).await;
        let mut listener = Listener::wrr("main", vec![(a.addr, 1.0)]);
        let lb = start(&parse(&toml(std::slice::from_ref(&listener))), None, "main");
        let addr = lb.addr_of("main");
        let (mut held, id) = open_identify(addr)
            .await
            .expect("served on the ephemeral port");
        assert_eq!(id, 1);
        // Writing down the port the kernel chose must not try to bind it a second time.
        listener.bind = addr;
        lb.handle
            .apply(parse(&toml(&[listener])))
            .await
            .expect("the socket is handed over, not bound again");
        assert_eq!(lb.addr_of("main"), addr);
        let (fresh, id) = open_identify(addr)
            .await
            .expect("still served on the same port");
        assert_eq!(id, 1);
        echo(&mut held, b"still here")
            .await
            .expect("open connection unaffected");
        close(fresh).await.expect("close");
        close(held).await.expect("close");
        assert_eq!(lb.stop().await.cut_connections, 0);
    })
    .await;
}
