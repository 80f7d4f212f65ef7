//! SIGTERM on the real binary: it stops accepting at once, lets open connections finish within
//! the grace period, cuts what is left after it, and exits 0 either way.

mod support;

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use support::{
    Mock, assert_closed_without_data, black_hole, bounded, connect_identify, eventually,
    eventually_async,
};

const BIN: &str = env!("CARGO_BIN_EXE_weighbridge");
/// Limit for every test here.
const LIMIT: Duration = Duration::from_secs(30);
/// How long the binary may take to start listening.
const START_WITHIN: Duration = Duration::from_secs(10);

/// The balancer process; killed when the test ends, whether it passed or not.
struct Weighbridge {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// Reads stderr into `log` until the process closes it.
    reader: Option<JoinHandle<()>>,
}

impl Weighbridge {
    /// Starts the binary on `config`, collecting its stderr.
    fn start(config: &Path) -> Weighbridge {
        Weighbridge::spawn(Command::new(BIN).arg("--config").arg(config))
    }

    /// Like [`Weighbridge::start`], in a process group of its own that it leads.
    fn start_group_leader(config: &Path) -> Weighbridge {
        Weighbridge::spawn(
            Command::new(BIN)
                .arg("--config")
                .arg(config)
                .process_group(0),
        )
    }

    fn spawn(command: &mut Command) -> Weighbridge {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn weighbridge");
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
        Weighbridge {
            child,
            log,
            reader: Some(reader),
        }
    }

    /// The first log line containing `needle`.
    fn logged(&self, needle: &str) -> Option<String> {
        let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        log.iter().find(|line| line.contains(needle)).cloned()
    }

    /// Waits for the `listening` line and returns the address it names.
    async fn listening_addr(&self) -> SocketAddr {
        eventually(START_WITHIN, "the `listening` log line", || {
            self.logged("listening").is_some()
        })
        .await;
        let line = self.logged("listening").expect("seen just now");
        line.split_whitespace()
            .find_map(|field| field.strip_prefix("bind="))
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no bind=IP:PORT in {line:?}"))
    }

    /// Sends SIGTERM.
    async fn terminate(&self) {
        let pid = self.child.id().expect("the balancer is still running");
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid}: {status}");
    }

    /// Whether the process is still running.
    fn running(&mut self) -> bool {
        self.child
            .try_wait()
            .expect("poll the balancer process")
            .is_none()
    }

    /// Waits for the process to exit, failing after `within`, then for the rest of its log.
    async fn exit_status(&mut self, within: Duration) -> ExitStatus {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("weighbridge still running {within:?} after SIGTERM"))
            .expect("wait for weighbridge");
        let reader = self.reader.take().expect("exit_status is called once");
        tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("stderr reaches end of file once the process has exited")
            .expect("the stderr reader does not panic");
        status
    }
}

impl Drop for Weighbridge {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Err(e) = self.child.start_kill() {
                eprintln!("kill weighbridge: {e}");
            }
        }
        if std::thread::panicking() {
            let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
            eprintln!("weighbridge stderr:\n{}", log.join("\n"));
        }
    }
}

/// A config file with one listener on an ephemeral port in front of `backend`.
fn config_file(grace: &str, backend: SocketAddr) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("create temp config");
    std::fs::write(
        file.path(),
        format!(
            "shutdown_grace = \"{grace}\"\n[[listener]]\nname = \"lb\"\nbind = \"127.0.0.1:0\"\n\
             [[listener.backend]]\naddr = \"{backend}\"\n"
        ),
    )
    .expect("write temp config");
    file
}

/// Sends `message` through an echo backend and checks it comes back; reads while writing, so a
/// message larger than the socket buffers cannot deadlock.
async fn round_trip(stream: &mut TcpStream, message: &[u8]) {
    let (mut reader, mut writer) = stream.split();
    let mut echo = vec![0_u8; message.len()];
    let (sent, received) = tokio::join!(writer.write_all(message), reader.read_exact(&mut echo));
    sent.expect("send to the backend");
    received.expect("receive from the backend");
    assert!(echo == message, "the echo differs from what was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_but_open_connections_finish_and_exit_is_0() {
    bounded(LIMIT, async {
        let echo = Mock::echo().await;
        let config = config_file("30s", echo.addr);
        let mut wb = Weighbridge::start(config.path());
        let addr = wb.listening_addr().await;
        let mut held = TcpStream::connect(addr)
            .await
            .expect("connect to the balancer");
        round_trip(&mut held, b"before SIGTERM").await;

        wb.terminate().await;
        eventually_async(
            Duration::from_secs(10),
            "new connects refused",
            || async move {
                matches!(
                    TcpStream::connect(addr).await,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused
                )
            },
        )
        .await;
        eventually(Duration::from_secs(5), "the draining log line", || {
            wb.logged("stopped accepting").is_some()
        })
        .await;
        // Draining: the open connection still relays both ways, the process waits for it.
        round_trip(&mut held, b"after the listener closed").await;
        round_trip(&mut held, &[0xab; 100_000]).await;
        assert!(wb.running(), "exited while a connection was open");

        drop(held);
        // Far less than the 30 s grace: the exit follows the last connection, not the timer.
        let status = wb.exit_status(Duration::from_secs(10)).await;
        assert_eq!(status.code(), Some(0), "{status}");
        assert!(wb.logged("all connections finished").is_some());
        assert!(wb.logged("cut_connections=0").is_some());
    })
    .await;
}

/// `timeout` (and supervisors like it) signal the process and then its whole process group, so
/// one stop arrives as two SIGTERMs: that is still one graceful shutdown, not the operator's
/// "second signal, exit now".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_process_and_its_group_at_once_is_one_graceful_shutdown() {
    bounded(LIMIT, async {
        let echo = Mock::echo().await;
        let config = config_file("30s", echo.addr);
        let mut wb = Weighbridge::start_group_leader(config.path());
        let addr = wb.listening_addr().await;
        let mut held = TcpStream::connect(addr)
            .await
            .expect("connect to the balancer");
        round_trip(&mut held, b"before SIGTERM").await;

        let pid = wb.child.id().expect("the balancer is still running");
        for target in [pid.to_string(), format!("-{pid}")] {
            let status = Command::new("kill")
                .args(["-TERM", "--", &target])
                .status()
                .await
                .expect("run kill");
            assert!(status.success(), "kill -TERM {target}: {status}");
        }
        eventually(Duration::from_secs(5), "the draining log line", || {
            wb.logged("stopped accepting").is_some()
        })
        .await;
        round_trip(&mut held, b"still served while draining").await;
        assert!(wb.running(), "exited while a connection was open");
        drop(held);
        let status = wb.exit_status(Duration::from_secs(10)).await;
        assert_eq!(status.code(), Some(0), "{status}");
        assert!(wb.logged("second signal").is_none());
        assert!(wb.logged("cut_connections=0").is_some());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_that_never_closes_is_cut_after_the_grace_period_and_exit_is_0() {
    bounded(LIMIT, async {
        let backend = Mock::identify(9).await;
        let config = config_file("500ms", backend.addr);
        let mut wb = Weighbridge::start(config.path());
        let addr = wb.listening_addr().await;
        let (mut held, id) = connect_identify(addr).await;
        assert_eq!(id, 9);

        let signalled = Instant::now();
        wb.terminate().await;
        let status = wb.exit_status(Duration::from_secs(5)).await;
        let took = signalled.elapsed();
        assert_eq!(status.code(), Some(0), "{status}");
        assert!(
            took >= Duration::from_millis(500),
            "exited {took:?} after SIGTERM, before the grace period ended"
        );
        assert!(wb.logged("cut_connections=1").is_some());
        // Both ends of the cut connection see it closed.
        assert_closed_without_data(&mut held, Duration::from_secs(3)).await;
        eventually(Duration::from_secs(3), "the backend's side closed", || {
            backend.open() == 0
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn grace_period_also_bounds_connections_still_connecting() {
    bounded(LIMIT, async {
        let (_hole, hole_addr, fillers) = black_hole().await;
        let config = support::config(
            "weighted_round_robin",
            "connect_timeout = \"20s\"\nconnect_attempts = 1",
            &[(hole_addr, 1.0)],
        )
        .replacen("shutdown_grace = \"5s\"", "shutdown_grace = \"300ms\"", 1);
        let lb = support::start_balancer(&config);
        let _client = TcpStream::connect(lb.addr)
            .await
            .expect("connect to the balancer");
        eventually(
            START_WITHIN,
            "the connection is counted as connecting",
            || lb.listener().open == 1,
        )
        .await;
        let started = Instant::now();
        let stopped = lb.stop().await;
        assert_eq!(stopped.cut_connections, 1);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "shutdown took {:?}; the connect timeout is 20 s",
            started.elapsed()
        );
        fillers.iter().for_each(JoinHandle::abort);
    })
    .await;
}

#[tokio::test]
async fn sigterm_right_after_listening_is_a_graceful_exit() {
    bounded(LIMIT, async {
        let backend = Mock::echo().await;
        let config = config_file("30s", backend.addr);
        // A supervisor may signal the moment it sees `listening`; the handlers must be in place
        // by then, or the default action kills the process. A race, so try it several times.
        for attempt in 0..10 {
            let mut lb = Weighbridge::start(config.path());
            lb.listening_addr().await;
            lb.terminate().await;
            let status = lb.exit_status(START_WITHIN).await;
            assert_eq!(status.code(), Some(0), "attempt {attempt}: {status}");
        }
    })
    .await;
}
