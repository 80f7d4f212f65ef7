//! Binary upgrade on SIGUSR2: the old process hands its listening sockets to a new one it
//! starts, then drains and exits. A client opening 2,000 connections a second across the
//! upgrade sees none refused or reset, and a stream opened through the old process before it
//! finishes intact.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::{Mock, Process, bounded, config_file, echo, eventually};

/// Limit for the whole test.
const LIMIT: Duration = Duration::from_secs(90);
/// Connections the client loop opens, at [`RATE`] a second.
const CONNECTIONS: usize = 6_000;
const RATE: u64 = 2_000;

/// The new process, which the old one started: not the test's child, so stopped here.
struct Successor(Pid);

impl Drop for Successor {
    fn drop(&mut self) {
        // Already gone is fine: the test stopped it.
        kill_process(self.0, Signal::KILL).ok();
    }
}

fn alive(pid: Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_pid()))
        .is_ok_and(|stat| !stat.contains(") Z "))
}

#[derive(Default)]
struct Outcomes {
    ok: AtomicUsize,
    refused: AtomicUsize,
    reset: AtomicUsize,
    other: AtomicUsize,
}

/// One short connection: a few bytes there and back.
async fn one(addr: std::net::SocketAddr, outcomes: Arc<Outcomes>) {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(b"ping").await?;
        let mut buf = [0; 4];
        stream.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let counter = match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(Ok(buf)) if &buf == b"ping" => &outcomes.ok,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => &outcomes.refused,
        Ok(Err(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            &outcomes.reset
        }
        _ => &outcomes.other,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_hands_the_sockets_over_without_refusing_a_connection() {
    bounded(LIMIT, async {
        let backend = Mock::echo().await;
        let config = config_file(&format!(
            "shutdown_grace = \"20s\"\nthreads = 2\n\
             [admin]\nbind = \"127.0.0.1:0\"\n\
             [[listener]]\nname = \"lb\"\nbind = \"127.0.0.1:0\"\n\
             [[listener.backend]]\naddr = \"{}\"\n",
            backend.addr
        ));
        let mut old = Process::start(config.path(), &["--no-watch"]);
        let addr = old.listening("lb").await;
        let mut long = TcpStream::connect(addr).await.expect("connect a long stream");
        echo(&mut long, b"before the upgrade").await.expect("relayed");

        let outcomes = Arc::new(Outcomes::default());
        let client = {
            let outcomes = Arc::clone(&outcomes);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
                let mut tasks = Vec::with_capacity(CONNECTIONS);
                for _ in 0..CONNECTIONS {
                    tick.tick().await;
                    tasks.push(tokio::spawn(one(addr, Arc::clone(&outcomes))));
                }
                for task in tasks {
                    task.await.expect("a client task does not panic");
                }
            })
        };
        // A third of the way into the loop.
        let started = std::time::Instant::now();
        eventually(Duration::from_secs(10), "traffic flows", || {
            outcomes.ok.load(Ordering::Relaxed) >= CONNECTIONS / 3
        })
        .await;
        old.signal(Signal::USR2);
        old.wait_for("binary upgrade: the new process accepts", 1).await;
        let line = old
            .logged("binary upgrade: the new process accepts")
            .expect("waited for it");
        let new_pid = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("new_pid="))
            .and_then(|p| p.parse::<i32>().ok())
            .and_then(Pid::from_raw)
            .unwrap_or_else(|| panic!("no new_pid in {line:?}"));
        let _successor = Successor(new_pid);
        let upgraded_after = started.elapsed();

        // The stream opened through the old process goes on while it drains.
        echo(&mut long, b"after the upgrade").await.expect("still relayed");
        drop(long);
        client.await.expect("the client loop ends");
        let ok = outcomes.ok.load(Ordering::Relaxed);
        let refused = outcomes.refused.load(Ordering::Relaxed);
        let reset = outcomes.reset.load(Ordering::Relaxed);
        let other = outcomes.other.load(Ordering::Relaxed);
        eprintln!(
            "upgrade after {upgraded_after:?}: {ok} ok, {refused} refused, {reset} reset, {other} other of {CONNECTIONS}"
        );
        assert_eq!(
            (ok, refused, reset, other),
            (CONNECTIONS, 0, 0, 0),
            "stderr:\n{}",
            old.tail()
        );
        // Its stderr stays open in the new process, which inherited it: watch the process, not
        // the pipe.
        eventually(Duration::from_secs(30), "the old process exits", || !old.running()).await;
        old.wait_for("exiting cut_connections=0", 1).await;
        assert!(alive(new_pid), "the new process runs on");

        // The new process serves the same address.
        let mut stream = TcpStream::connect(addr).await.expect("connect after the old one exited");
        echo(&mut stream, b"served by the new process").await.expect("relayed");
        drop(stream);
        kill_process(new_pid, Signal::TERM).expect("stop the new process");
        eventually(Duration::from_secs(30), "the new process exits", || !alive(new_pid)).await;
    })
    .await;
}
