//! weighbridge under systemd: the unit in deploy/systemd/ passes `systemd-analyze verify`, and
//! the real binary speaks the notification protocol `Type=notify` expects (READY=1 once it
//! accepts, RELOADING=1 with MONOTONIC_USEC then READY=1 around a reload, STOPPING=1 at
//! shutdown, WATCHDOG=1 pings), heard on a datagram socket standing in for systemd's.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{TcpStream, UnixDatagram};

use support::{BIN, Mock, Process, bounded, command, config_file, echo};

/// Limit for every test here.
const LIMIT: Duration = Duration::from_secs(60);
/// How long a notification may take to arrive.
const NOTIFY_WITHIN: Duration = Duration::from_secs(10);

/// Where systemd-analyze is (scripts/install-test-peers.sh installs the `systemd` package).
fn systemd_analyze() -> PathBuf {
    ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("systemd-analyze is installed (bash scripts/install-test-peers.sh, as root)")
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// `systemd-analyze verify` checks that ExecStart's binary exists and is executable, and the
/// shipped unit names /usr/local/bin/weighbridge, where the docs install it. The unit is
/// verified as shipped except for that path, pointed at the binary under test.
#[tokio::test]
async fn the_units_pass_systemd_analyze_verify() {
    bounded(LIMIT, async {
        let dir = tempfile::tempdir().expect("temp dir");
        let unit = std::fs::read_to_string(repo("deploy/systemd/weighbridge.service"))
            .expect("read the service unit");
        assert!(
            unit.contains("ExecStart=/usr/local/bin/weighbridge "),
            "the unit runs the installed binary"
        );
        let unit = unit.replace("/usr/local/bin/weighbridge", BIN);
        let service = dir.path().join("weighbridge.service");
        std::fs::write(&service, unit).expect("write the unit");
        let socket = dir.path().join("weighbridge.socket");
        std::fs::copy(repo("deploy/systemd/weighbridge.socket"), &socket)
            .expect("copy the socket unit");
        let output = tokio::process::Command::new(systemd_analyze())
            .arg("verify")
            .arg(&service)
            .arg(&socket)
            .output()
            .await
            .expect("run systemd-analyze");
        assert!(
            output.status.success() && output.stderr.is_empty(),
            "systemd-analyze verify: {:?}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    })
    .await;
}

/// The socket systemd would listen on, in a temp dir.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        NotifySocket {
            socket,
            path,
            _dir: dir,
        }
    }

    /// The next notification.
    async fn next(&self) -> String {
        let mut buf = vec![0; 4096];
        let n = tokio::time::timeout(NOTIFY_WITHIN, self.socket.recv(&mut buf))
            .await
            .expect("a notification within the deadline")
            .expect("receive a notification");
        String::from_utf8(buf[..n].to_vec()).expect("notifications are UTF-8")
    }

    /// The next notification that is not a watchdog ping.
    async fn next_state(&self) -> String {
        loop {
            let message = self.next().await;
            if message != "WATCHDOG=1\n" {
                return message;
            }
        }
    }
}

fn one_listener(backend: std::net::SocketAddr) -> tempfile::NamedTempFile {
    config_file(&format!(
        "shutdown_grace = \"5s\"\n[[listener]]\nname = \"lb\"\nbind = \"127.0.0.1:0\"\n\
         [[listener.backend]]\naddr = \"{backend}\"\n"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_after_listening_reloading_around_sighup_stopping_at_sigterm() {
    bounded(LIMIT, async {
        let backend = Mock::echo().await;
        let config = one_listener(backend.addr);
        let notify = NotifySocket::bind();
        let mut wb = Process::spawn(
            command(config.path(), &["--no-watch"]).env("NOTIFY_SOCKET", &notify.path),
        );

        // MAINPID too: after a binary upgrade the process that is ready is not the one started.
        let ready = notify.next_state().await;
        assert_eq!(
            ready,
            format!("MAINPID={}\nREADY=1\n", wb.pid().as_raw_pid()),
            "READY=1 with the process's own pid"
        );
        // Ready means accepting: the listener takes a connection the moment READY=1 is heard.
        let addr = wb.listening("lb").await;
        let mut stream = TcpStream::connect(addr)
            .await
            .expect("connect after READY=1");
        echo(&mut stream, b"ready")
            .await
            .expect("relayed after READY=1");

        wb.hangup();
        let reloading = notify.next_state().await;
        let lines: Vec<&str> = reloading.lines().collect();
        assert_eq!(lines.first(), Some(&"RELOADING=1"), "{reloading:?}");
        let usec: u64 = lines
            .iter()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("MONOTONIC_USEC with RELOADING=1: {reloading:?}"));
        assert!(usec > 0);
        assert_eq!(
            notify.next_state().await,
            "READY=1\n",
            "READY=1 after the reload"
        );
        wb.wait_for("reload applied", 1).await;

        wb.terminate();
        assert_eq!(notify.next_state().await, "STOPPING=1\n");
        assert!(wb.exit_status(Duration::from_secs(20)).await.success());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_pings_while_the_control_task_answers() {
    bounded(LIMIT, async {
        let backend = Mock::echo().await;
        let config = one_listener(backend.addr);
        let notify = NotifySocket::bind();
        let _wb = Process::spawn(
            command(config.path(), &["--no-watch"])
                .env("NOTIFY_SOCKET", &notify.path)
                .env("WATCHDOG_USEC", "200000"),
        );
        let mut pings = 0;
        while pings < 3 {
            if notify.next().await == "WATCHDOG=1\n" {
                pings += 1;
            }
        }
    })
    .await;
}
