//! Running out of file descriptors is survived: accept errors are logged and backed off, and the
//! balancer serves again as soon as descriptors are free.

mod support;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::time::Instant;

use support::{BIN, LOG_WITHIN, Mock, Process, bounded, eventually, eventually_async, within};

/// Limit for the test.
const LIMIT: Duration = Duration::from_secs(60);
/// Descriptor limit for the balancer: about two dozen for itself with [`THREADS`] workers (each
/// runtime holds a few, each worker its own listening socket), a few connections' worth besides.
const FD_LIMIT: u32 = 32;
/// Worker threads, fixed so that the descriptors the balancer needs do not depend on the cores.
const THREADS: usize = 2;
/// Client connections held open at once, far more than `FD_LIMIT` allows to be proxied.
const CLIENTS: usize = 40;

/// One echo through the balancer; an error if it is not served, a failure if the echo differs.
async fn echo_once(addr: SocketAddr) -> io::Result<()> {
    let mut stream = within(TcpStream::connect(addr)).await?;
    within(stream.write_all(b"ping")).await?;
    let mut reply = [0_u8; 4];
    within(stream.read_exact(&mut reply)).await?;
    assert_eq!(&reply, b"ping");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emfile_is_logged_backed_off_and_recovered_from() {
    bounded(LIMIT, async {
        let backend = Mock::echo().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("wb.toml");
        std::fs::write(
            &config,
            format!(
                "threads = {THREADS}\n[[listener]]\nname = \"tight\"\nbind = \"127.0.0.1:0\"\n\
                 [[listener.backend]]\naddr = \"{}\"\n",
                backend.addr
            ),
        )
        .expect("write config");
        // `ulimit -n` sets the hard limit too, so raising the soft limit at start cannot escape
        // it.
        let script =
            format!("ulimit -n {FD_LIMIT} && exec \"$0\" --config \"$1\" --log-level info");
        let mut wb = Process::spawn(Command::new("sh").args([
            "-c",
            &script,
            BIN,
            config.to_str().expect("utf-8 path"),
        ]));
        let addr = wb.listening("tight").await;
        echo_once(addr).await.expect("served before exhaustion");

        // Hold many connections open: the kernel queues them, the balancer runs out of
        // descriptors.
        let mut held = Vec::with_capacity(CLIENTS);
        for _ in 0..CLIENTS {
            let stream = TcpStream::connect(addr)
                .await
                .expect("kernel accepts into the backlog");
            held.push(stream);
        }
        wb.wait_for("accept failed", 1).await;
        let first_error = Instant::now();
        // Rate-limited: later lines report how many failures went unlogged since the last one. A
        // line with a non-zero count proves failed accepts were counted rather than each logged.
        eventually(
            LOG_WITHIN,
            "an accept-error line counting suppressed failures",
            || {
                wb.lines().iter().any(|l| {
                    l.contains("accept failed")
                        && l.split("suppressed=")
                            .nth(1)
                            .and_then(|rest| rest.split_whitespace().next())
                            .and_then(|n| n.parse::<u64>().ok())
                            .is_some_and(|n| n > 0)
                })
            },
        )
        .await;
        let elapsed = first_error.elapsed().as_secs();
        let logged = wb.count("accept failed");
        // At most one line per worker per second (plus the first of each, and a second for the
        // reader's lag), not one per failed accept.
        let most = THREADS * (usize::try_from(elapsed).expect("seconds fit") + 2);
        assert!(
            logged <= most,
            "{logged} accept-error lines in {elapsed}s from {THREADS} workers"
        );

        drop(held);
        eventually_async(
            Duration::from_secs(15),
            "service after descriptors are free",
            || async { echo_once(addr).await.is_ok() },
        )
        .await;
    })
    .await;
}
